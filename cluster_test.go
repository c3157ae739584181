package main

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestMergeItem(t *testing.T) {
	base := `{"name":"a","priority":1,"models":["x"]}`
	for _, tc := range []struct {
		name, ours, theirs string
		want               map[string]any
		both               []string
		deleted            bool
	}{
		{"different fields both kept", `{"name":"a","priority":5,"models":["x"]}`, `{"name":"a","priority":1,"models":["y"]}`,
			map[string]any{"name": "a", "priority": 5.0, "models": []any{"y"}}, nil, false},
		{"same field: ours is the later", `{"name":"b","priority":1,"models":["x"]}`, `{"name":"c","priority":1,"models":["x"]}`,
			map[string]any{"name": "b", "priority": 1.0, "models": []any{"x"}}, []string{"name"}, false},
		{"same field, same value: no conflict", `{"name":"b","priority":1,"models":["x"]}`, `{"name":"b","priority":1,"models":["x"]}`,
			map[string]any{"name": "b", "priority": 1.0, "models": []any{"x"}}, nil, false},
		{"deleted there wins", `{"name":"b","priority":1,"models":["x"]}`, ``, nil, nil, true},
		{"deleted here wins", ``, `{"name":"c","priority":1,"models":["x"]}`, nil, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ours, theirs []byte
			if tc.ours != "" {
				ours = []byte(tc.ours)
			}
			if tc.theirs != "" {
				theirs = []byte(tc.theirs)
			}
			got, both, err := mergeItem([]byte(base), ours, theirs)
			if err != nil {
				t.Fatal(err)
			}
			if tc.deleted {
				if got != nil {
					t.Fatalf("got %s; want deleted", got)
				}
				return
			}
			var m map[string]any
			if err := jsonUnmarshal(got, &m); err != nil || !reflect.DeepEqual(m, tc.want) || !reflect.DeepEqual(both, tc.both) {
				t.Errorf("got %s (both %v); want %v (both %v)", got, both, tc.want, tc.both)
			}
		})
	}
}

// clusterPair is two bare mirrors on their own databases and one Redis,
// synced by hand so the test decides the order of every step.
func clusterPair(t *testing.T) (r *testRedis, sa, sb *Store, ma, mb *redisMirror, logB *mirrorLog) {
	r = startRedis(t, "")
	sa = storeAt(t, filepath.Join(t.TempDir(), "a.db"))
	sb = storeAt(t, filepath.Join(t.TempDir(), "b.db"))
	ma, _ = testMirror(t, sa, r.redisURL())
	mb, logB = testMirror(t, sb, r.redisURL())
	ma.replica, mb.replica = "a", "b"
	sa.allocID = func(ctx context.Context) (int64, error) { return ma.newID(ctx, "channels", sa.maxChannelID(ctx)) }
	sb.allocID = func(ctx context.Context) (int64, error) { return mb.newID(ctx, "channels", sb.maxChannelID(ctx)) }
	for _, m := range []*redisMirror{ma, mb} {
		if err := m.restoreOrSeed(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	return r, sa, sb, ma, mb, logB
}

func mustSync(t *testing.T, ms ...*redisMirror) {
	t.Helper()
	for _, m := range ms {
		if err := m.sync(context.Background()); err != nil {
			t.Fatalf("sync %s: %v", m.replica, err)
		}
	}
}

func onlyChannel(t *testing.T, s *Store) Channel {
	t.Helper()
	chs, err := s.ListChannels(context.Background())
	if err != nil || len(chs) != 1 {
		t.Fatalf("channels: %+v %v", chs, err)
	}
	return chs[0]
}

// TestClusterConcurrentEdits: the same channel edited on two replicas
// before either hears of the other. Different fields: both edits stay
// everywhere. The same field: the later push wins everywhere and the log
// names the field. Never one replica left with a different channel.
func TestClusterConcurrentEdits(t *testing.T) {
	_, sa, sb, ma, mb, logB := clusterPair(t)
	ctx := context.Background()
	c := storeChannel("Shared")
	if err := sa.CreateChannel(ctx, &c); err != nil {
		t.Fatal(err)
	}
	mustSync(t, ma, mb)
	if got := onlyChannel(t, sb); got.Name != "Shared" || got.ID != c.ID {
		t.Fatalf("B pulled %+v", got)
	}

	ca, cb := onlyChannel(t, sa), onlyChannel(t, sb)
	ca.Priority = 7
	cb.Models = []string{"m-from-b"}
	if err := sa.UpdateChannel(ctx, &ca); err != nil {
		t.Fatal(err)
	}
	if err := sb.UpdateChannel(ctx, &cb); err != nil {
		t.Fatal(err)
	}
	mustSync(t, ma, mb, ma)
	for name, s := range map[string]*Store{"A": sa, "B": sb} {
		if got := onlyChannel(t, s); got.Priority != 7 || !reflect.DeepEqual(got.Models, []string{"m-from-b"}) {
			t.Errorf("%s after concurrent edits of different fields: priority %d models %v; want both edits", name, got.Priority, got.Models)
		}
	}

	ca, cb = onlyChannel(t, sa), onlyChannel(t, sb)
	ca.URL, cb.URL = "https://a.example.com", "https://b.example.com"
	sa.UpdateChannel(ctx, &ca)
	sb.UpdateChannel(ctx, &cb)
	mustSync(t, ma, mb, ma)
	ga, gb := onlyChannel(t, sa), onlyChannel(t, sb)
	if ga.URL != "https://b.example.com" || gb.URL != "https://b.example.com" {
		t.Errorf("same field edited on both: A %q B %q; want B's (the later) on both", ga.URL, gb.URL)
	}
	if !strings.Contains(logB.String(), "fields=[url]") {
		t.Errorf("B's log does not name the field both edited:\n%s", logB)
	}

	// A delete on one replica removes the channel from the other.
	if err := sb.DeleteChannel(ctx, c.ID); err != nil {
		t.Fatal(err)
	}
	mustSync(t, mb, ma)
	if chs, _ := sa.ListChannels(ctx); len(chs) != 0 {
		t.Errorf("A still has %+v after B deleted it", chs)
	}
}

// TestClusterIDs: ids from Redis never collide between replicas, also while
// Redis is away (each uses the block it reserved), and a replica with no
// block left refuses to create rather than guess.
func TestClusterIDs(t *testing.T) {
	r, sa, sb, ma, mb, _ := clusterPair(t)
	ctx := context.Background()
	// A database from before the cluster: its ids stay taken.
	old := storeChannel("Old")
	old.ID = 40
	if err := sa.CreateChannel(ctx, &old); err != nil {
		t.Fatal(err)
	}
	mustSync(t, ma, mb)
	seen := map[int64]bool{40: true}
	add := func(s *Store, name string) (int64, error) {
		c := storeChannel(name)
		err := s.CreateChannel(ctx, &c)
		return c.ID, err
	}
	for i, s := range []*Store{sa, sb, sa, sb} {
		id, err := add(s, "up"+string(rune('a'+i)))
		if err != nil || seen[id] || id <= 40 {
			t.Fatalf("create %d: id %d err %v (seen %v)", i, id, err, seen)
		}
		seen[id] = true
	}
	r.stop()
	for i, s := range []*Store{sa, sb, sa, sb} {
		id, err := add(s, "down"+string(rune('a'+i)))
		if err != nil || seen[id] {
			t.Fatalf("create %d with Redis down: id %d err %v", i, id, err)
		}
		seen[id] = true
	}
	// Use up B's block: then a create is refused with 503, and nothing is stored.
	next, last := sb.idBlock(ctx, "channels")
	sb.SetSetting(ctx, "cluster_ids_channels", "0,0")
	_, err := add(sb, "no-id")
	var ae *apiError
	if !errors.As(err, &ae) || ae.status != http.StatusServiceUnavailable {
		t.Errorf("create with no ids left: %v; want a 503", err)
	}
	if _, err := sb.ListChannels(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("B's block was %d..%d", next, last)
}

// TestClusterCatchUpAfterLongOutage: the writer's backoff has grown long,
// yet once Redis is back the watcher makes it catch up at once.
func TestClusterCatchUpAfterLongOutage(t *testing.T) {
	r, sa, _, ma, _, _ := clusterPair(t)
	ctx := context.Background()
	ma.retryMin, ma.retryMax = time.Hour, time.Hour // its own retries would come far too late
	runMirror(t, ma)
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { ma.watch(wctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	ma.caughtUp(t)

	r.stop()
	c := storeChannel("During")
	if err := sa.CreateChannel(ctx, &c); err != nil {
		t.Fatal(err)
	}
	ma.await(t, "the outage to be noticed", func(m *redisMirror) bool { return m.down })
	r.start() // empty
	start := time.Now()
	ma.caughtUp(t)
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("caught up %v after Redis returned; want within 5s", d)
	}
	cl := r.client()
	defer cl.Close()
	if n, err := cl.HLen(ctx, cfgItemsKey("channels")).Result(); err != nil || n != 1 {
		t.Errorf("Redis holds %d items (%v); want the channel made during the outage", n, err)
	}
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// TestClusterSameNameCreated: two replicas create a channel of the same
// name before hearing of each other. Both channels survive on both, the
// later id renamed "name (id)", and the replicas agree.
func TestClusterSameNameCreated(t *testing.T) {
	_, sa, sb, ma, mb, _ := clusterPair(t)
	ctx := context.Background()
	mustSync(t, ma, mb) // reserve ids
	ca, cb := storeChannel("Same"), storeChannel("Same")
	if err := sa.CreateChannel(ctx, &ca); err != nil {
		t.Fatal(err)
	}
	if err := sb.CreateChannel(ctx, &cb); err != nil {
		t.Fatal(err)
	}
	if ca.ID == cb.ID {
		t.Fatalf("both got id %d", ca.ID)
	}
	mustSync(t, ma, mb, ma, mb)
	lo, hi := min(ca.ID, cb.ID), max(ca.ID, cb.ID)
	want := map[int64]string{lo: "Same", hi: "Same (" + strconv.FormatInt(hi, 10) + ")"}
	for name, s := range map[string]*Store{"A": sa, "B": sb} {
		chs, _ := s.ListChannels(ctx)
		got := map[int64]string{}
		for _, c := range chs {
			got[c.ID] = c.Name
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: %v; want %v", name, got, want)
		}
	}
}
