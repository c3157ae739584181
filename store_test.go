package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// storeAt opens the database file at path, closed when the test ends.
func storeAt(t *testing.T, path string) *Store {
	t.Helper()
	s, err := OpenStore(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func storeChannel(name string) Channel {
	return Channel{Name: name, URL: "https://" + strings.ToLower(name) + ".example.com",
		APIKeys: []string{"sk-" + name + "-1", "sk-" + name + "-2"}, Type: "anthropic",
		KeyStrategy: keySequential, Enabled: true}
}

func TestStoreChannelCRUD(t *testing.T) {
	ctx := context.Background()
	s := storeAt(t, filepath.Join(t.TempDir(), "c.db"))
	clock := time.Date(2026, 11, 26, 15, 4, 0, 0, time.UTC)
	s.Now = func() time.Time { return clock }

	a := storeChannel("Alpha")
	a.Models = []string{"m1", "m2"}
	a.ModelRedirects = map[string]string{"old": "new"}
	a.Priority = 7
	if err := s.CreateChannel(ctx, &a); err != nil {
		t.Fatal(err)
	}
	b := storeChannel("Beta")
	if err := s.CreateChannel(ctx, &b); err != nil {
		t.Fatal(err)
	}
	if a.ID <= 0 || b.ID <= a.ID || !a.CreatedAt.Equal(clock) || !a.UpdatedAt.Equal(clock) {
		t.Fatalf("created: id %d, %d, times %v %v", a.ID, b.ID, a.CreatedAt, a.UpdatedAt)
	}
	got, err := s.GetChannel(ctx, a.ID)
	if err != nil || !reflect.DeepEqual(got, a) {
		t.Fatalf("get: %+v, %v; want %+v", got, err, a)
	}

	clock = clock.Add(time.Minute)
	a.Name, a.Priority, a.Enabled, a.Models = "Alpha 2", 1, false, nil
	if err := s.UpdateChannel(ctx, &a); err != nil {
		t.Fatal(err)
	}
	got, _ = s.GetChannel(ctx, a.ID)
	if got.Name != "Alpha 2" || got.Priority != 1 || got.Enabled || len(got.Models) != 0 ||
		!got.CreatedAt.Equal(clock.Add(-time.Minute)) || !got.UpdatedAt.Equal(clock) {
		t.Errorf("after update: %+v", got)
	}

	list, err := s.ListChannels(ctx)
	if err != nil || len(list) != 2 || list[0].ID != a.ID || list[1].ID != b.ID {
		t.Fatalf("list: %+v, %v", list, err)
	}
	if err := s.DeleteChannel(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetChannel(ctx, a.ID); !errors.Is(err, errNotFound) {
		t.Errorf("get deleted: %v; want errNotFound", err)
	}
	if err := s.DeleteChannel(ctx, a.ID); !errors.Is(err, errNotFound) {
		t.Errorf("delete twice: %v; want errNotFound", err)
	}
	ghost := storeChannel("Ghost")
	ghost.ID = 999
	if err := s.UpdateChannel(ctx, &ghost); !errors.Is(err, errNotFound) {
		t.Errorf("update missing: %v; want errNotFound", err)
	}
}

func TestStoreUniqueNames(t *testing.T) {
	ctx := context.Background()
	s := storeAt(t, filepath.Join(t.TempDir(), "c.db"))
	a, b := storeChannel("Alpha"), storeChannel("Beta")
	for _, c := range []*Channel{&a, &b} {
		if err := s.CreateChannel(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	dup := storeChannel("ALPHA") // names are unique ignoring case
	if err := s.CreateChannel(ctx, &dup); !errors.Is(err, errDuplicate) {
		t.Errorf("create a duplicate name: %v; want errDuplicate", err)
	}
	b.Name = "alpha"
	if err := s.UpdateChannel(ctx, &b); !errors.Is(err, errDuplicate) {
		t.Errorf("rename onto a taken name: %v; want errDuplicate", err)
	}
	taken := storeChannel("Gamma")
	taken.ID = a.ID
	if err := s.CreateChannel(ctx, &taken); !errors.Is(err, errDuplicate) {
		t.Errorf("create with a taken id: %v; want errDuplicate", err)
	}
	if list, _ := s.ListChannels(ctx); len(list) != 2 || list[1].Name != "Beta" {
		t.Errorf("failed writes changed the table: %+v", list)
	}
}

// TestStoreCooldownsGoWithTheirChannel: deleting a channel deletes its
// cooldowns, and none is stored for a channel that no longer exists. (That
// new URLs or keys make cooldowns stale is cooldowns.sync's rule, tested
// there and end to end in TestEditsKeepOrClearCooldowns.)
func TestStoreCooldownsGoWithTheirChannel(t *testing.T) {
	ctx := context.Background()
	s := storeAt(t, filepath.Join(t.TempDir(), "c.db"))
	c := storeChannel("Alpha")
	if err := s.CreateChannel(ctx, &c); err != nil {
		t.Fatal(err)
	}
	until := time.Now().Add(time.Hour).Truncate(time.Millisecond)
	cool := func() {
		t.Helper()
		err := s.SaveCooldowns(ctx, []cooldownRecord{
			{ChannelID: c.ID, KeyIndex: -1, Until: until, Failures: 2, Reason: "overloaded", Status: 529},
			{ChannelID: c.ID, KeyIndex: 1, Until: until, Failures: 1, Reason: "unauthorized", Status: 401},
			{ChannelID: c.ID, KeyIndex: -1, Model: "m1", Until: until, Failures: 1, Reason: "model not found", Status: 404},
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	count := func() int {
		t.Helper()
		recs, err := s.LoadCooldowns(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return len(recs)
	}
	cool()
	if n := count(); n != 3 {
		t.Fatalf("%d cooldowns stored; want 3", n)
	}
	if err := s.DeleteChannel(ctx, c.ID); err != nil {
		t.Fatal(err)
	}
	if n := count(); n != 0 {
		t.Errorf("deleting the channel left %d cooldowns", n)
	}
	// Cooldowns for a channel that no longer exists are not stored.
	cool()
	if n := count(); n != 0 {
		t.Errorf("stored %d cooldowns of a deleted channel", n)
	}
}

// TestStoreSurvivesRestart closes and reopens a real file: channels,
// cooldowns, sessions and settings are all still there.
func TestStoreSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "sub", "ccload.db") // the folder is created
	s, err := OpenStore(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	c := storeChannel("渠道")
	c.ModelRedirects = map[string]string{"a": "b"}
	if err := s.CreateChannel(ctx, &c); err != nil {
		t.Fatal(err)
	}
	until := time.Now().Add(time.Hour).Truncate(time.Millisecond)
	rec := cooldownRecord{ChannelID: c.ID, KeyIndex: 0, Until: until, Failures: 3, Reason: "rate limited", Status: 429}
	if err := s.SaveCooldowns(ctx, []cooldownRecord{rec}); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateSession(ctx, "live-hash", time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateSession(ctx, "old-hash", time.Now().Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := s.SetSetting(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = storeAt(t, path)
	chs, err := s.ListChannels(ctx)
	if err != nil || !reflect.DeepEqual(csvContent(chs), csvContent([]Channel{c})) {
		t.Errorf("channels after restart: %+v, %v; want %+v", chs, err, c)
	}
	recs, err := s.LoadCooldowns(ctx)
	if err != nil || len(recs) != 1 || !recs[0].Until.Equal(until) || recs[0].Failures != 3 || recs[0].Status != 429 {
		t.Errorf("cooldowns after restart: %+v, %v; want %+v", recs, err, rec)
	}
	if ok, err := s.SessionValid(ctx, "live-hash"); !ok || err != nil {
		t.Errorf("live session after restart: %v, %v", ok, err)
	}
	if ok, _ := s.SessionValid(ctx, "old-hash"); ok {
		t.Error("an expired session is valid")
	}
	if v, _ := s.Setting(ctx, "k"); v != "v" {
		t.Errorf("setting after restart: %q", v)
	}
}

// TestStoreOnChange: the mirror's hook fires once per committed change,
// and not for failed writes or imports that change nothing.
func TestStoreOnChange(t *testing.T) {
	ctx := context.Background()
	s := storeAt(t, filepath.Join(t.TempDir(), "c.db"))
	n := 0
	s.onChange = func() { n++ }
	c := storeChannel("Alpha")
	s.CreateChannel(ctx, &c)
	c.Priority = 3
	s.UpdateChannel(ctx, &c)
	dup := storeChannel("alpha")
	s.CreateChannel(ctx, &dup) // refused
	file := parseImportFile([]byte("name,url,api_key\nB,https://b.example.com,k\nC,https://c.example.com,k\n"))
	if _, err := s.ImportChannels(ctx, file); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ImportChannels(ctx, file); err != nil { // all unchanged
		t.Fatal(err)
	}
	s.DeleteChannel(ctx, c.ID)
	s.DeleteChannel(ctx, c.ID) // not found
	if n != 4 {
		t.Errorf("onChange ran %d times; want 4 (create, update, one import, delete)", n)
	}
}

// testRedis is a real redis-server on a free loopback port, for one test.
// It can be killed and started again on the same port.
type testRedis struct {
	t    testing.TB
	bin  string
	port int
	dir  string
	pass string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
}

// startRedis starts redis-server, or skips the test loudly when it is not
// installed (fails instead under CCLOAD_REQUIRE_REDIS=1, as in CI).
func startRedis(t testing.TB, pass string) *testRedis {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		msg := "redis-server is not on PATH, so the Redis mirror is NOT TESTED; install it (apt-get install redis-server) or run .ci/run"
		if os.Getenv("CCLOAD_REQUIRE_REDIS") == "1" {
			t.Fatal(msg)
		}
		t.Skip("SKIPPING: " + msg)
	}
	r := &testRedis{t: t, bin: bin, dir: t.TempDir(), pass: pass}
	t.Cleanup(r.stop)
	// A port found free can be taken before redis binds it: try a few.
	for try := 0; ; try++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		r.port = ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		out, err := r.startErr()
		if err == nil {
			return r
		}
		if try == 2 || !strings.Contains(out, "in use") {
			t.Fatalf("redis-server: %v\n%s", err, out)
		}
	}
}

func (r *testRedis) start() {
	r.t.Helper()
	if out, err := r.startErr(); err != nil {
		r.t.Fatalf("redis-server: %v\n%s", err, out)
	}
}

// startErr starts the server and returns once it is ready: it has said so
// on its log, and a client has connected and been answered.
func (r *testRedis) startErr() (string, error) {
	args := []string{"--port", strconv.Itoa(r.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--dir", r.dir, "--loglevel", "notice"}
	if r.pass != "" {
		args = append(args, "--requirepass", r.pass)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return "", err
	}
	cmd := exec.Command(r.bin, args...)
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		pr.Close()
		pw.Close()
		return "", err
	}
	pw.Close()
	var (
		mu    sync.Mutex
		out   bytes.Buffer
		ready = make(chan struct{})
		done  = make(chan struct{})
		once  sync.Once
	)
	go func() {
		defer pr.Close()
		sc := bufio.NewScanner(pr)
		for sc.Scan() { // read to the end, so redis never blocks on a full pipe
			mu.Lock()
			out.WriteString(sc.Text() + "\n")
			mu.Unlock()
			if strings.Contains(sc.Text(), "Ready to accept connections") {
				once.Do(func() { close(ready) })
			}
		}
	}()
	go func() { cmd.Wait(); close(done) }()
	output := func() string { mu.Lock(); defer mu.Unlock(); return out.String() }
	select {
	case <-ready:
	case <-done:
		return output(), errors.New("exited before it was ready")
	case <-time.After(15 * time.Second):
		cmd.Process.Kill()
		<-done
		return output(), errors.New("not ready after 15s")
	}
	r.cmd, r.done = cmd, done
	c := r.client()
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		r.stop()
		return output(), err
	}
	return "", nil
}

// save writes the data set to disk, for the next start to load.
func (r *testRedis) save() {
	r.t.Helper()
	c := r.client()
	defer c.Close()
	if err := c.Save(context.Background()).Err(); err != nil {
		r.t.Fatal(err)
	}
}

// stop kills the server, as a crash would.
func (r *testRedis) stop() {
	if r.cmd == nil {
		return
	}
	r.cmd.Process.Kill()
	<-r.done
	r.cmd = nil
}

func (r *testRedis) redisURL() string {
	u := url.URL{Scheme: "redis", Host: "127.0.0.1:" + strconv.Itoa(r.port), Path: "/0"}
	if r.pass != "" {
		u.User = url.UserPassword("", r.pass)
	}
	return u.String()
}

func (r *testRedis) client() *redis.Client {
	return redis.NewClient(&redis.Options{Addr: "127.0.0.1:" + strconv.Itoa(r.port), Password: r.pass,
		Protocol: 2, DisableIdentity: true, MaxRetries: -1})
}

// backup reads the mirror's document; ok is false when there is none.
func (r *testRedis) backup() (doc mirrorDoc, raw string, ok bool) {
	r.t.Helper()
	c := r.client()
	defer c.Close()
	b, err := c.Get(context.Background(), mirrorKey).Bytes()
	if errors.Is(err, redis.Nil) {
		return doc, "", false
	}
	if err != nil {
		r.t.Fatalf("read backup: %v", err)
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		r.t.Fatalf("backup is not JSON: %v\n%s", err, b)
	}
	return doc, string(b), true
}

func (r *testRedis) setBackup(v any) {
	r.t.Helper()
	b, _ := json.Marshal(v)
	c := r.client()
	defer c.Close()
	if err := c.Set(context.Background(), mirrorKey, b, 0).Err(); err != nil {
		r.t.Fatal(err)
	}
}

// await blocks until cond holds, checking it (under m.mu) after every sync
// attempt of the mirror: no sleeping, no polling.
func (m *redisMirror) await(t testing.TB, what string, cond func(m *redisMirror) bool) {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		m.mu.Lock()
		ok, ch := cond(m), m.progress
		m.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("timed out waiting for the mirror: %s; status %v", what, m.Status())
		}
	}
}

// caughtUp waits until Redis holds every change made so far, and at least
// the running mirror's first write.
func (m *redisMirror) caughtUp(t testing.TB) {
	t.Helper()
	m.mu.Lock()
	gen := max(m.wanted, 1)
	m.mu.Unlock()
	m.await(t, "catch up", func(m *redisMirror) bool { return m.written >= gen })
}

// attempts waits for n more sync attempts to finish, failed or not.
func (m *redisMirror) attempts(t testing.TB, n int) {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for range n {
		m.mu.Lock()
		ch := m.progress
		m.mu.Unlock()
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("timed out waiting for %d mirror attempts; status %v", n, m.Status())
		}
	}
}

// mirrorLog is a log sink tests can count lines in.
type mirrorLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *mirrorLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *mirrorLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// testMirror builds a mirror on s with a captured log and a fast backoff.
// It is not running; see runMirror.
func testMirror(t *testing.T, s *Store, redisURL string) (*redisMirror, *mirrorLog) {
	t.Helper()
	m, err := newRedisMirror(redisURL, s)
	if err != nil {
		t.Fatal(err)
	}
	s.onChange = m.notify // as newApp wires it
	t.Cleanup(m.close)
	log := &mirrorLog{}
	m.log = slog.New(slog.NewTextHandler(log, nil))
	m.retryMin, m.retryMax = 5*time.Millisecond, 40*time.Millisecond
	return m, log
}

// runMirror runs m's writer until the test ends, or until the returned
// stop is called (which waits for it to return).
func runMirror(t *testing.T, m *redisMirror) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.run(ctx); close(done) }()
	stop = func() { cancel(); <-done }
	t.Cleanup(stop)
	return stop
}

// backupNames lists the channel names in a backup, and checks that the
// backup carries full keys.
func backupNames(t *testing.T, doc mirrorDoc, store *Store) []string {
	t.Helper()
	want, err := store.ListChannels(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for i, c := range doc.Channels {
		names = append(names, c.Name)
		if i < len(want) && !reflect.DeepEqual(c.APIKeys, want[i].APIKeys) {
			t.Errorf("backup keys of %q: %q; want the full keys %q", c.Name, c.APIKeys, want[i].APIKeys)
		}
	}
	return names
}

func TestRedisURLParsing(t *testing.T) {
	s := storeAt(t, filepath.Join(t.TempDir(), "c.db"))
	m, err := newRedisMirror("rediss://app:s3cret@cache.example.com:6380/3", s)
	if err != nil {
		t.Fatal(err)
	}
	defer m.close()
	o := m.client.Options()
	if o.TLSConfig == nil || o.TLSConfig.ServerName != "cache.example.com" || o.Addr != "cache.example.com:6380" ||
		o.Username != "app" || o.Password != "s3cret" || o.DB != 3 {
		t.Errorf("rediss options: tls %+v addr %q user %q db %d", o.TLSConfig, o.Addr, o.Username, o.DB)
	}
	if st := m.Status(); strings.Contains(toJSON(st), "s3cret") || st["addr"] != "cache.example.com:6380" {
		t.Errorf("status shows %v", st)
	}
	m2, err := newRedisMirror("redis://localhost", s)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.close()
	if o := m2.client.Options(); o.TLSConfig != nil || o.Addr != "localhost:6379" {
		t.Errorf("redis options: tls %v addr %q", o.TLSConfig, o.Addr)
	}
	// Bad URLs: the error says what is wrong and never shows the password,
	// even when the URL does not parse at all.
	for _, bad := range []string{
		"redis://:hunter2-pw@localhost:notaport",
		"redis://user:hunter2-pw@localhost:6379/notadb",
		"redis://:hunter2%2Dpw@local host:6379",
		"rediss://:hunter2-pw@localhost:6379/0?bogus=1",
	} {
		_, err := newRedisMirror(bad, s)
		if err == nil {
			t.Errorf("%s: no error", bad)
			continue
		}
		if strings.Contains(err.Error(), "hunter2") || !strings.Contains(err.Error(), "REDIS_URL") {
			t.Errorf("%s: error %q", bad, err)
		}
	}
}

func toJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// TestMirrorFollowsAdminEdits drives the real app: every kind of channel
// change reaches Redis, with full keys, and deleting the last channel
// writes an empty set.
func TestMirrorFollowsAdminEdits(t *testing.T) {
	r := startRedis(t, "")
	e := newTestEnv(t, func(c *config) { c.RedisURL = r.redisURL() })
	m := e.app.mirror
	tok := e.login()
	m.caughtUp(t)
	if doc, raw, ok := r.backup(); !ok || doc.Version != 1 || len(doc.Channels) != 0 || !strings.Contains(raw, `"channels":[]`) {
		t.Fatalf("first write of an empty database: %v %s", ok, raw)
	}

	st, b := e.admin(tok, "POST", "/admin/channels", `{"name":"渠道一","url":"https://one.example.com","api_key":"sk-one-aaaaaaaa,sk-one-bbbbbbbb"}`)
	if st != 201 {
		t.Fatalf("create: %d %s", st, b)
	}
	m.caughtUp(t)
	doc, _, _ := r.backup()
	if names := backupNames(t, doc, e.app.store); !reflect.DeepEqual(names, []string{"渠道一"}) {
		t.Errorf("after create: %q", names)
	}
	if time.Since(doc.UpdatedAt) > time.Minute {
		t.Errorf("updated_at %v", doc.UpdatedAt)
	}

	id := strconv.FormatInt(doc.Channels[0].ID, 10)
	if st, b := e.admin(tok, "PUT", "/admin/channels/"+id, `{"priority":9,"models":"m1,m2"}`); st != 200 {
		t.Fatalf("update: %d %s", st, b)
	}
	m.caughtUp(t)
	if doc, _, _ := r.backup(); doc.Channels[0].Priority != 9 || len(doc.Channels[0].Models) != 2 {
		t.Errorf("after update: %+v", doc.Channels[0])
	}

	if st, a := csvImportText(e, tok, "name,url,api_key\n导入,https://imp.example.com,sk-imp\n"); st != 200 || a.Created != 1 {
		t.Fatalf("import: %d %+v", st, a)
	}
	m.caughtUp(t)
	doc, _, _ = r.backup()
	if names := backupNames(t, doc, e.app.store); !reflect.DeepEqual(names, []string{"渠道一", "导入"}) {
		t.Errorf("after import: %q", names)
	}

	if st, b := e.admin(tok, "DELETE", "/admin/channels/"+id, ""); st != 200 {
		t.Fatalf("delete: %d %s", st, b)
	}
	m.caughtUp(t)
	doc, _, _ = r.backup()
	if names := backupNames(t, doc, e.app.store); !reflect.DeepEqual(names, []string{"导入"}) {
		t.Errorf("after delete: %q", names)
	}
	if st, b := e.admin(tok, "DELETE", "/admin/channels/"+strconv.FormatInt(doc.Channels[0].ID, 10), ""); st != 200 {
		t.Fatalf("delete the last: %d %s", st, b)
	}
	m.caughtUp(t)
	if _, raw, ok := r.backup(); !ok || !strings.Contains(raw, `"channels":[]`) {
		t.Errorf("after deleting the last channel: %s; want an empty set written", raw)
	}
}

// TestMirrorRestoresFreshDatabase: a new database (a container that lost
// its disk) starts from the backup, ids and keys included.
func TestMirrorRestoresFreshDatabase(t *testing.T) {
	r := startRedis(t, "")
	first := newTestEnv(t, func(c *config) { c.RedisURL = r.redisURL() })
	tok := first.login()
	csvFixture(first, tok)
	want := csvContent(csvChannels(first))
	first.app.mirror.caughtUp(t)
	first.close()

	second := newTestEnv(t, func(c *config) { c.RedisURL = r.redisURL() })
	if got := csvContent(csvChannels(second)); !reflect.DeepEqual(got, want) {
		t.Fatalf("restored:\n got %+v\nwant %+v", got, want)
	}
	if n := len(second.app.sel.current().all); n != 3 {
		t.Errorf("the proxy sees %d channels; want 3", n)
	}
	st, b := second.admin(second.login(), "GET", "/admin/redis", "")
	var status struct {
		Enabled, OK     bool
		RestoredAtStart int `json:"restored_at_start"`
	}
	json.Unmarshal(b, &status)
	if st != 200 || !status.Enabled || status.RestoredAtStart != 3 {
		t.Errorf("GET /admin/redis: %d %s", st, b)
	}

	// The start-up log says how many were restored.
	s := storeAt(t, filepath.Join(t.TempDir(), "third.db"))
	m, log := testMirror(t, s, r.redisURL())
	if err := m.restoreOrSeed(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(log.String(), "restored channels from backup") || !strings.Contains(log.String(), "channels=3") {
		t.Errorf("restore log: %s", log)
	}
}

// TestMirrorNeverOverwritesBackupAtStart: an empty database at start reads
// the backup and never replaces it with nothing.
func TestMirrorNeverOverwritesBackupAtStart(t *testing.T) {
	r := startRedis(t, "")
	ctx := context.Background()

	// A backup this version cannot read stays as it is, however often the
	// mirror is kicked, and the status says why.
	future := map[string]any{"version": 2, "channels": []any{map[string]any{"name": "from the future"}}}
	r.setBackup(future)
	s := storeAt(t, filepath.Join(t.TempDir(), "a.db"))
	m, _ := testMirror(t, s, r.redisURL())
	if err := m.restoreOrSeed(ctx); err == nil || !strings.Contains(err.Error(), "version 2") {
		t.Fatalf("restoreOrSeed with a version 2 backup: %v", err)
	}
	stopM := runMirror(t, m)
	m.await(t, "a failed attempt", func(m *redisMirror) bool { return m.down })
	m.notify()
	m.attempts(t, 3)
	if _, raw, _ := r.backup(); raw != toJSON(future) {
		t.Errorf("the unreadable backup was replaced by %s", raw)
	}
	if st := m.Status(); st["ok"] != false || !strings.Contains(st["last_error"].(string), "version 2") {
		t.Errorf("status %v", st)
	}
	// Stopped before the backups below: still retrying, it would restore
	// the next readable backup into its own database and write that back
	// over the ones the steps below set.
	stopM()

	// A readable backup is restored, and the first write puts back the
	// same channels, not an empty set.
	c := storeChannel("Kept")
	c.ID = 41
	r.setBackup(mirrorDoc{Version: 1, UpdatedAt: time.Now(), Channels: []Channel{c}})
	s2 := storeAt(t, filepath.Join(t.TempDir(), "b.db"))
	m2, _ := testMirror(t, s2, r.redisURL())
	if err := m2.restoreOrSeed(ctx); err != nil {
		t.Fatal(err)
	}
	stopM2 := runMirror(t, m2)
	m2.caughtUp(t)
	doc, _, _ := r.backup()
	if len(doc.Channels) != 1 || doc.Channels[0].ID != 41 || doc.Channels[0].Name != "Kept" {
		t.Errorf("backup after start: %+v", doc.Channels)
	}
	stopM2()

	// A backup with a channel the admin API would refuse is not half
	// restored: the database stays empty.
	bad := storeChannel("Bad")
	bad.URL = "ftp://nope"
	r.setBackup(mirrorDoc{Version: 1, Channels: []Channel{storeChannel("Fine"), bad}})
	s3 := storeAt(t, filepath.Join(t.TempDir(), "c.db"))
	m3, _ := testMirror(t, s3, r.redisURL())
	if err := m3.restoreOrSeed(ctx); err == nil || !strings.Contains(err.Error(), "Bad") {
		t.Errorf("restore of a bad backup: %v", err)
	}
	if chs, _ := s3.ListChannels(ctx); len(chs) != 0 {
		t.Errorf("a refused restore stored %d channels", len(chs))
	}
}

// TestMirrorLateRestore: Redis is down when ccload starts on an empty
// database; when it comes back, the backup is restored (not overwritten by
// the empty set) and the proxy reloaded.
func TestMirrorLateRestore(t *testing.T) {
	r := startRedis(t, "")
	ctx := context.Background()
	c := storeChannel("Late")
	c.ID = 5
	r.setBackup(mirrorDoc{Version: 1, Channels: []Channel{c}})
	r.save() // so that the backup is there again when the server restarts
	r.stop()

	s := storeAt(t, filepath.Join(t.TempDir(), "c.db"))
	m, log := testMirror(t, s, r.redisURL())
	reloads := make(chan struct{}, 10)
	m.onRestore = func() { reloads <- struct{}{} }
	if err := m.restoreOrSeed(ctx); err == nil {
		t.Fatal("restoreOrSeed succeeded with Redis down")
	}
	runMirror(t, m)
	m.attempts(t, 2) // the retries fail too, and write nothing
	if chs, _ := s.ListChannels(ctx); len(chs) != 0 {
		t.Fatalf("channels appeared with Redis down: %+v", chs)
	}

	r.start()
	m.caughtUp(t)
	chs, _ := s.ListChannels(ctx)
	if len(chs) != 1 || chs[0].ID != 5 || chs[0].Name != "Late" || len(reloads) != 1 {
		t.Errorf("late restore: %+v, %d reloads", chs, len(reloads))
	}
	if doc, _, _ := r.backup(); len(doc.Channels) != 1 || doc.Channels[0].Name != "Late" {
		t.Errorf("backup after late restore: %+v", doc.Channels)
	}
	if n := strings.Count(log.String(), "sync failed"); n != 1 {
		t.Errorf("%d failure lines for one outage; want 1:\n%s", n, log)
	}
}

// TestMirrorOutageCatchUp kills Redis mid-run: edits keep working, the
// error is logged once per outage, and once Redis is back the backup holds
// the edits made while it was down.
func TestMirrorOutageCatchUp(t *testing.T) {
	r := startRedis(t, "")
	ctx := context.Background()
	s := storeAt(t, filepath.Join(t.TempDir(), "c.db"))
	m, log := testMirror(t, s, r.redisURL())
	if err := m.restoreOrSeed(ctx); err != nil {
		t.Fatal(err)
	}
	runMirror(t, m)
	a := storeChannel("Alpha")
	if err := s.CreateChannel(ctx, &a); err != nil {
		t.Fatal(err)
	}
	m.caughtUp(t)

	for outage := 1; outage <= 2; outage++ {
		r.stop()
		// Edits while Redis is down: the store does not wait on it.
		b := storeChannel("Beta" + strconv.Itoa(outage))
		if err := s.CreateChannel(ctx, &b); err != nil {
			t.Fatal(err)
		}
		a.Priority = outage
		if err := s.UpdateChannel(ctx, &a); err != nil {
			t.Fatal(err)
		}
		// Several failed attempts.
		m.await(t, "a failed attempt", func(m *redisMirror) bool { return m.down })
		m.attempts(t, 3)
		if st := m.Status(); st["ok"] != false || st["last_error"] == "" || st["pending"] != true {
			t.Errorf("status during outage %d: %v", outage, st)
		}
		if n := strings.Count(log.String(), "sync failed"); n != outage {
			t.Errorf("after outage %d with 4 failed attempts: %d error lines; want %d (once per outage):\n%s",
				outage, n, outage, log)
		}

		r.start() // comes back empty
		m.caughtUp(t)
		doc, _, ok := r.backup()
		names := backupNames(t, doc, s)
		if !ok || len(names) != 1+outage || doc.Channels[0].Priority != outage {
			t.Errorf("after outage %d: backup %q, priority %d", outage, names, doc.Channels[0].Priority)
		}
		if n := strings.Count(log.String(), "working again"); n != outage {
			t.Errorf("after outage %d: %d recovery lines; want %d", outage, n, outage)
		}
		if st := m.Status(); st["ok"] != true || st["last_error"] != "" || st["pending"] != false {
			t.Errorf("status after outage %d: %v", outage, st)
		}
	}
}

// TestAdminRedisStatus: GET /admin/redis shows the mirror's health, and the
// admin keeps working while Redis is down.
func TestAdminRedisStatus(t *testing.T) {
	plain := newTestEnv(t)
	if st, b := plain.admin(plain.login(), "GET", "/admin/redis", ""); st != 200 || !strings.Contains(string(b), `"enabled":false`) {
		t.Errorf("without REDIS_URL: %d %s", st, b)
	}

	r := startRedis(t, "pass@word-123")
	e := newTestEnv(t, func(c *config) { c.RedisURL = r.redisURL() })
	tok := e.login()
	m := e.app.mirror
	m.caughtUp(t)
	type status struct {
		Enabled   bool
		OK        bool
		LastError string `json:"last_error"`
		Addr      string
	}
	get := func() (status, string) {
		t.Helper()
		st, b := e.admin(tok, "GET", "/admin/redis", "")
		if st != 200 {
			t.Fatalf("GET /admin/redis: %d %s", st, b)
		}
		var s status
		json.Unmarshal(b, &s)
		return s, string(b)
	}
	if s, raw := get(); !s.Enabled || !s.OK || s.LastError != "" || s.Addr != "127.0.0.1:"+strconv.Itoa(r.port) {
		t.Errorf("healthy: %s", raw)
	}

	r.stop()
	if st, b := e.admin(tok, "POST", "/admin/channels", `{"name":"while down","url":"https://d.example.com","api_key":"k"}`); st != 201 {
		t.Fatalf("create while Redis is down: %d %s", st, b)
	}
	m.await(t, "a failed attempt", func(m *redisMirror) bool { return m.down })
	s, raw := get()
	if !s.Enabled || s.OK || s.LastError == "" || strings.Contains(raw, "pass@word") || strings.Contains(raw, "word-123") {
		t.Errorf("during the outage: %s", raw)
	}

	r.start()
	m.caughtUp(t)
	if s, raw := get(); !s.OK || s.LastError != "" {
		t.Errorf("after the outage: %s", raw)
	}
	if doc, _, _ := r.backup(); len(doc.Channels) != 1 || doc.Channels[0].Name != "while down" {
		t.Errorf("backup after the outage: %+v", doc.Channels)
	}
}

// TestMirrorPasswordNeverLogged: a wrong password fails every attempt;
// neither the log nor the status shows it.
func TestMirrorPasswordNeverLogged(t *testing.T) {
	r := startRedis(t, "right-horse-battery")
	s := storeAt(t, filepath.Join(t.TempDir(), "c.db"))
	good, _ := testMirror(t, s, r.redisURL())
	if err := good.sync(context.Background()); err != nil {
		t.Fatalf("with the right password: %v", err)
	}
	if _, _, ok := r.backup(); !ok {
		t.Fatal("no backup written with the right password")
	}

	s2 := storeAt(t, filepath.Join(t.TempDir(), "d.db"))
	c := storeChannel("X")
	s2.CreateChannel(context.Background(), &c)
	bad, log := testMirror(t, s2, "redis://:wrong-staple-77@127.0.0.1:"+strconv.Itoa(r.port))
	runMirror(t, bad)
	bad.await(t, "a failed attempt", func(m *redisMirror) bool { return m.down })
	st := toJSON(bad.Status())
	if strings.Contains(log.String(), "wrong-staple") || strings.Contains(st, "wrong-staple") {
		t.Errorf("the password leaked:\nlog: %s\nstatus: %s", log, st)
	}
	if !strings.Contains(st, "WRONGPASS") && !strings.Contains(strings.ToLower(st), "auth") {
		t.Errorf("status does not say why: %s", st)
	}
	// Whatever an error says, the password is scrubbed from it.
	good.failed(errors.New("auth as right-horse-battery refused"))
	if st := toJSON(good.Status()); strings.Contains(st, "right-horse") || !strings.Contains(st, "auth as xxxxx refused") {
		t.Errorf("status after an error naming the password: %s", st)
	}
}
