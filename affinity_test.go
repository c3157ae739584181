package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"hash/maphash"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// ccTurn is the body of turn n (from 1) of a Claude-Code-shaped
// conversation: the same system prompt and tools every turn, the history
// growing by a user and an assistant message per turn. extra goes in last
// (metadata, say).
func ccTurn(n int, first, extra string) string {
	var msgs []string
	for i := 1; i <= n; i++ {
		text := fmt.Sprintf("turn %d: %s", i, strings.Repeat("please look at this code and fix it. ", 10))
		if i == 1 {
			text = first
		}
		msgs = append(msgs, fmt.Sprintf(`{"role":"user","content":[{"type":"text","text":%q}]}`, text))
		if i < n {
			msgs = append(msgs, fmt.Sprintf(`{"role":"assistant","content":[{"type":"text","text":%q}]}`,
				fmt.Sprintf("answer %d: %s", i, strings.Repeat("done, here is the change. ", 12))))
		}
	}
	return `{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":false,` +
		`"system":[{"type":"text","text":"` + strings.Repeat("You are Claude Code. ", 200) + `"}],` +
		`"tools":[{"name":"Bash","description":"` + strings.Repeat("Run a shell command. ", 100) + `","input_schema":{"type":"object"}}],` +
		`"messages":[` + strings.Join(msgs, ",") + `]` + extra + `}`
}

// sessionTurn sends turn n of session sid (as X-Claude-Code-Session-Id)
// and wants a 200.
func sessionTurn(t *testing.T, e *testEnv, sid string, n int) {
	t.Helper()
	resp, body := e.do("POST", "/v1/messages", ccTurn(n, "start "+sid, ""),
		map[string]string{"Anthropic-Version": "2023-06-01", "X-Claude-Code-Session-Id": sid})
	if resp.StatusCode != 200 {
		t.Fatalf("session %s turn %d: %d %s", sid, n, resp.StatusCode, body)
	}
}

func TestSessionOf(t *testing.T) {
	const sid = "2f0e4c55-3c7a-4b8e-9d1e-2b7c1a9f0d11"
	huge := strings.Repeat("x", 10<<20)
	id := func(s string) uint64 { return hashID(s) }
	first := ccTurn(1, "hello", "")
	fallback := func(body string) uint64 {
		info, err := inspectBody([]byte(body))
		if err != nil {
			t.Fatal(err)
		}
		v, _ := sessionOf(http.Header{}, protoAnthropic, []byte(body), &info)
		return v
	}
	cases := []struct {
		name   string
		p      protocol
		header map[string]string
		body   string
		want   uint64 // 0: none
	}{
		{"claude code header", protoAnthropic, map[string]string{"X-Claude-Code-Session-Id": sid}, first, id(sid)},
		{"header wins over metadata", protoAnthropic, map[string]string{"X-Claude-Code-Session-Id": sid},
			`{"model":"m","metadata":{"user_id":"user_abc_account_def_session_other"}}`, id(sid)},
		{"metadata json string", protoAnthropic, nil,
			`{"model":"m","metadata":{"user_id":"{\"device_id\":\"d1\",\"account_uuid\":\"a1\",\"session_id\":\"` + sid + `\"}"}}`, id(sid)},
		{"metadata legacy form", protoAnthropic, nil,
			`{"model":"m","metadata":{"user_id":"user_5e1f_account_9b2c_session_` + sid + `"}}`, id(sid)},
		{"metadata any other string", protoAnthropic, nil, `{"model":"m","metadata":{"user_id":"alice"}}`, id("alice")},
		{"metadata user_id not a string: fallback", protoAnthropic, nil,
			ccTurn(1, "hello", `,"metadata":{"user_id":{"session_id":"x"}}`), fallback(first)},
		{"metadata user_id with escapes", protoAnthropic, nil, `{"model":"m","metadata":{"user_id":"al\u0069ce"}}`, id("alice")},
		{"10 MB session id is cut", protoAnthropic, nil, `{"model":"m","metadata":{"user_id":"` + huge + `"}}`, id(huge[:maxSessionID])},
		{"invalid UTF-8 id", protoAnthropic, map[string]string{"X-Claude-Code-Session-Id": "\xff\xfe"}, first, id("\xff\xfe")},
		{"prompt_cache_key", protoOpenAI, map[string]string{"Session-Id": "other"},
			`{"model":"gpt-5","prompt_cache_key":"` + sid + `","input":[{"role":"user","content":"hi"}]}`, id(sid)},
		{"codex session-id header", protoOpenAI, map[string]string{"Session-Id": sid}, `{"model":"gpt-5","input":"hi"}`, id(sid)},
		{"session_id header", protoOpenAI, map[string]string{"Session_id": sid}, `{"model":"gpt-5"}`, id(sid)},
		{"x-session-id header", protoOpenAI, map[string]string{"X-Session-Id": sid}, `{"model":"gpt-5"}`, id(sid)},
		{"conversation_id header", protoOpenAI, map[string]string{"Conversation_id": sid}, `{"model":"gpt-5"}`, id(sid)},
		{"anthropic header means nothing to openai", protoOpenAI, map[string]string{"X-Claude-Code-Session-Id": sid}, `{"model":"gpt-5"}`, 0},
		{"no id, no messages", protoAnthropic, nil, `{"model":"m"}`, 0},
		{"empty messages", protoAnthropic, nil, `{"model":"m","messages":[]}`, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			info, err := inspectBody([]byte(c.body))
			if err != nil {
				t.Fatal(err)
			}
			h := http.Header{}
			for k, v := range c.header {
				h[k] = []string{v}
			}
			got, ok := sessionOf(h, c.p, []byte(c.body), &info)
			if ok != (c.want != 0) || got != c.want {
				t.Errorf("got %x, %v; want %x", got, ok, c.want)
			}
		})
	}

	// The fallback: every turn of one conversation has the same session,
	// and another first message is another session.
	s1, s5 := fallback(ccTurn(1, "hello", "")), fallback(ccTurn(5, "hello", ""))
	if s1 == 0 || s1 != s5 {
		t.Errorf("turns 1 and 5 of one conversation: sessions %x and %x; want one", s1, s5)
	}
	if other := fallback(ccTurn(5, "goodbye", "")); other == s1 {
		t.Errorf("two conversations with different first messages share session %x", s1)
	}
	// Responses' input as a string, and Gemini's contents.
	for _, body := range []string{`{"model":"m","input":"hi there"}`, `{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}`} {
		info, _ := inspectBody([]byte(body))
		if _, ok := sessionOf(http.Header{}, protoGemini, []byte(body), &info); !ok {
			t.Errorf("%s: no fallback session", body)
		}
	}
}

// TestAffinityStaysOnChannel: twelve turns of one conversation stay on
// one of three equal channels; twelve new conversations spread over all.
func TestAffinityStaysOnChannel(t *testing.T) {
	e := newTestEnv(t)
	ups := []*fakeUpstream{newFakeUpstream(t, "a"), newFakeUpstream(t, "b"), newFakeUpstream(t, "c")}
	for _, u := range ups {
		e.addChannel(Channel{Name: u.name, URL: u.URL})
	}
	for n := 1; n <= 12; n++ {
		sessionTurn(t, e, "conv-1", n)
	}
	rows := e.logs()
	for i, r := range rows {
		want := "hit"
		if i == 0 {
			want = "new"
		}
		if r.ChannelName != rows[0].ChannelName || r.Affinity != want || r.Session == "" || r.Session != rows[0].Session {
			t.Errorf("turn %d: channel %s affinity %q session %q; want %s, %s, %s", i+1, r.ChannelName, r.Affinity, r.Session,
				rows[0].ChannelName, want, rows[0].Session)
		}
		if strings.Contains(r.Session, "conv-1") {
			t.Errorf("the log holds the raw session id: %q", r.Session)
		}
	}

	for _, u := range ups {
		u.hits.Store(0)
	}
	for s := range 12 {
		sessionTurn(t, e, fmt.Sprintf("new-%d", s), 1)
	}
	for _, u := range ups {
		if n := u.count(); n != 4 {
			t.Errorf("12 new sessions: %s served %d; want 4 (round robin across sessions)", u.name, n)
		}
	}
}

// affinityPair starts ccload with two channels of one priority, runs turn
// 1 of session "s" and returns the bound upstream and the other one.
func affinityPair(t *testing.T, opts ...func(*config)) (e *testEnv, bound, other *fakeUpstream, chans map[string]Channel) {
	t.Helper()
	e = newTestEnv(t, opts...)
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	chans = map[string]Channel{}
	for _, u := range []*fakeUpstream{a, b} {
		chans[u.name] = e.addChannel(Channel{Name: u.name, URL: u.URL, Models: []string{"claude-sonnet-4-5"}})
	}
	sessionTurn(t, e, "s", 1)
	bound, other = a, b
	if b.count() == 1 {
		bound, other = b, a
	}
	return e, bound, other, chans
}

// wantAffinity checks the last len(want) log rows: channel and affinity.
func wantAffinity(t *testing.T, e *testEnv, want ...string) {
	t.Helper()
	rows := e.logs()
	rows = rows[len(rows)-len(want):]
	for i, w := range want {
		ch, aff, _ := strings.Cut(w, "/")
		if rows[i].ChannelName != ch || rows[i].Affinity != aff || rows[i].Status != 200 {
			t.Errorf("row %d: %d from %s, affinity %q; want 200 from %s, %s", i, rows[i].Status, rows[i].ChannelName, rows[i].Affinity, ch, aff)
		}
	}
}

// TestAffinityFailover: when the bound channel fails in any way, that turn
// still succeeds elsewhere and the conversation stays there afterwards.
func TestAffinityFailover(t *testing.T) {
	fast := func(c *config) { c.FirstByteTimeout = 300 * time.Millisecond }
	for _, c := range []struct {
		name  string
		fail  fakeBehavior
		cools func(healthState) bool
	}{
		{"529", fakeBehavior{Status: 529, ErrType: "overloaded_error"}, func(h healthState) bool { return h.CooldownUntil != nil }},
		{"401 on the bound key", fakeBehavior{RequireKey: "sk-not-this-one"}, func(h healthState) bool { return h.Keys[0].CooldownUntil != nil }},
		{"404 model", fakeBehavior{Status: 404, ErrType: "not_found_error"}, func(h healthState) bool { return len(h.Models) == 1 }},
		{"stall before first byte", fakeBehavior{StallFirst: true}, func(h healthState) bool { return h.CooldownUntil != nil }},
	} {
		t.Run(c.name, func(t *testing.T) {
			e, bound, other, chans := affinityPair(t, fast)
			bound.set(c.fail)
			resp, body := e.do("POST", "/v1/messages", strings.Replace(ccTurn(2, "start s", ""), `"stream":false`, `"stream":true`, 1),
				map[string]string{"Anthropic-Version": "2023-06-01", "X-Claude-Code-Session-Id": "s"})
			if resp.StatusCode != 200 {
				t.Fatalf("turn 2: %d %s; want 200 by failover", resp.StatusCode, body)
			}
			if h := e.health(chans[bound.name].ID); !c.cools(h) {
				t.Errorf("bound channel's health after %s: %+v", c.name, h)
			}
			bound.set(fakeBehavior{}) // healthy again, but cooling: the session stays moved
			for n := 3; n <= 5; n++ {
				sessionTurn(t, e, "s", n)
			}
			wantAffinity(t, e, bound.name+"/new", other.name+"/moved", other.name+"/hit", other.name+"/hit", other.name+"/hit")
		})
	}
}

// TestAffinitySkips: a bound channel that is disabled, deleted, no longer
// serves the model or cools (for another request's failure) is skipped
// without a failed attempt, and the binding moves.
func TestAffinitySkips(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		name string
		skip func(e *testEnv, ch Channel)
	}{
		{"disabled", func(e *testEnv, ch Channel) {
			ch.Enabled = false
			if err := e.app.store.UpdateChannel(ctx, &ch); err != nil {
				t.Fatal(err)
			}
			e.reload()
		}},
		{"deleted", func(e *testEnv, ch Channel) {
			if err := e.app.store.DeleteChannel(ctx, ch.ID); err != nil {
				t.Fatal(err)
			}
			e.reload()
		}},
		{"no longer serves the model", func(e *testEnv, ch Channel) {
			ch.Models = []string{"claude-opus-4-1"}
			if err := e.app.store.UpdateChannel(ctx, &ch); err != nil {
				t.Fatal(err)
			}
			e.reload()
		}},
		{"cooling", func(e *testEnv, ch Channel) {
			e.app.cool.fail(e.app.cool.get(ch.ID), -1, "", verdict{scope: scopeChannel, status: 529, reason: "test"})
		}},
		{"bound key cooling", func(e *testEnv, ch Channel) {
			e.app.cool.fail(e.app.cool.get(ch.ID), 0, "", verdict{scope: scopeKey, status: 401, reason: "test"})
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			e, bound, other, chans := affinityPair(t)
			c.skip(e, chans[bound.name])
			sessionTurn(t, e, "s", 2)
			sessionTurn(t, e, "s", 3)
			wantAffinity(t, e, bound.name+"/new", other.name+"/moved", other.name+"/hit")
			if bound.count() != 1 {
				t.Errorf("the skipped channel got %d requests; want only turn 1", bound.count())
			}
			if rows := e.logs(); rows[1].Attempts != 1 {
				t.Errorf("turn 2 took %d attempts; want 1: a skipped channel is not tried", rows[1].Attempts)
			}
		})
	}
}

// TestAffinityReturnsToBetterPriority: a session that a failure moved to a
// lower priority comes back when the better channel is healthy again,
// instead of staying on the fallback (SPEC §8).
func TestAffinityReturnsToBetterPriority(t *testing.T) {
	e := newTestEnv(t)
	hi, lo := newFakeUpstream(t, "hi"), newFakeUpstream(t, "lo")
	hiCh := e.addChannel(Channel{Name: "hi", URL: hi.URL, Priority: 10})
	e.addChannel(Channel{Name: "lo", URL: lo.URL})
	sessionTurn(t, e, "s", 1)
	hi.set(fakeBehavior{Status: 503})
	sessionTurn(t, e, "s", 2) // fails over to lo
	hi.set(fakeBehavior{})
	sessionTurn(t, e, "s", 3) // hi still cooling: stays on lo
	e.app.cool.clearAll(e.app.cool.get(hiCh.ID))
	sessionTurn(t, e, "s", 4) // hi recovered: back
	sessionTurn(t, e, "s", 5)
	wantAffinity(t, e, "hi/new", "lo/moved", "lo/hit", "hi/moved", "hi/hit")
}

// TestAffinityKeys: key affinity holds inside a channel with either key
// strategy, and a bound key that fails moves the binding to the next key.
func TestAffinityKeys(t *testing.T) {
	for _, strategy := range []string{keySequential, keyRoundRobin} {
		t.Run(strategy, func(t *testing.T) {
			e := newTestEnv(t)
			up := newFakeUpstream(t, "up")
			e.addChannel(Channel{Name: "up", URL: up.URL, KeyStrategy: strategy, APIKeys: []string{"sk-k0", "sk-k1", "sk-k2"}})
			// Interleave two sessions: each keeps its own key.
			for n := 1; n <= 4; n++ {
				sessionTurn(t, e, "s1", n)
				sessionTurn(t, e, "s2", n)
			}
			keys := map[string]map[string]bool{}
			for _, r := range up.requests() {
				var b struct {
					Messages []struct {
						Content []struct{ Text string }
					}
				}
				json.Unmarshal(r.Body, &b)
				s := b.Messages[0].Content[0].Text
				if keys[s] == nil {
					keys[s] = map[string]bool{}
				}
				keys[s][r.Key] = true
			}
			for s, ks := range keys {
				if len(ks) != 1 {
					t.Errorf("%s: session went to keys %v; want one", s, ks)
				}
			}
			// The bound key of s1 fails: the turn moves to another key.
			var k1 string
			for k := range keys["start s1"] {
				k1 = k
			}
			up.set(fakeBehavior{RequireKey: map[bool]string{true: "sk-k1", false: "sk-k0"}[k1 != "sk-k1"]})
			sessionTurn(t, e, "s1", 5)
			sessionTurn(t, e, "s1", 6)
			rows := e.logs()
			if r5, r6 := rows[len(rows)-2], rows[len(rows)-1]; r5.Affinity != "moved" || r6.Affinity != "hit" || r5.KeyIndex != r6.KeyIndex {
				t.Errorf("after the bound key failed: key %d %s, then key %d %s; want moved, then hit on the same key",
					r5.KeyIndex, r5.Affinity, r6.KeyIndex, r6.Affinity)
			}
		})
	}
}

// TestAffinityPerToken: two client tokens sending the same session id get
// bindings of their own.
func TestAffinityPerToken(t *testing.T) {
	e := newTestEnv(t, func(c *config) { c.AuthTokens = []string{"alice:tok-alice-1", "bob:tok-bob-2"} })
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	e.addChannel(Channel{Name: "a", URL: a.URL})
	e.addChannel(Channel{Name: "b", URL: b.URL})
	for _, tok := range []string{"tok-alice-1", "tok-bob-2", "tok-alice-1", "tok-bob-2"} {
		resp, body := e.do("POST", "/v1/messages", ccTurn(1, "same", ""), map[string]string{
			"Authorization": "Bearer " + tok, "X-Claude-Code-Session-Id": "shared-id"})
		if resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, body)
		}
	}
	rows := e.logs()
	got := []string{}
	for _, r := range rows {
		got = append(got, r.Token+":"+r.ChannelName+":"+r.Affinity)
	}
	// Round robin gives alice a and bob b: bob's first turn is new, not a
	// hit on alice's binding.
	want := []string{"alice:a:new", "bob:b:new", "alice:a:hit", "bob:b:hit"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("rows %v; want %v", got, want)
	}
	if n := e.app.relay.aff.table.len(); n != 2 {
		t.Errorf("%d bindings; want 2", n)
	}
}

// startedClock is a testClock (proxy_test.go) set to now.
func startedClock() *testClock {
	c := &testClock{}
	c.ns.Store(time.Now().UnixNano())
	return c
}

// TestAffinityTTL: a binding slides with use and ends after the TTL
// without use.
func TestAffinityTTL(t *testing.T) {
	e := newTestEnv(t, func(c *config) { c.Affinity.TTL = 10 * time.Minute })
	clk := startedClock()
	e.app.relay.Now = clk.now
	for _, n := range []string{"a", "b", "c"} {
		e.addChannel(Channel{Name: n, URL: newFakeUpstream(t, n).URL})
	}
	sessionTurn(t, e, "s", 1)
	clk.advance(9 * time.Minute)
	sessionTurn(t, e, "s", 2) // within the TTL: hit, and the TTL starts again
	clk.advance(9 * time.Minute)
	sessionTurn(t, e, "s", 3) // 18 min after the first turn, 9 after the last
	clk.advance(11 * time.Minute)
	sessionTurn(t, e, "s", 4) // expired: a new binding
	rows := e.logs()
	got := []string{}
	for _, r := range rows {
		got = append(got, r.Affinity)
	}
	if strings.Join(got, ",") != "new,hit,hit,new" {
		t.Errorf("affinity per turn %v; want new,hit,hit,new", got)
	}
}

// TestBindingsLRU: the table keeps at most max bindings, evicting the
// least recently used; a lookup of an expired binding drops it.
func TestBindingsLRU(t *testing.T) {
	var b bindings
	b.init(3, time.Minute)
	now := time.Now().UnixNano()
	for k := uint64(1); k <= 3; k++ {
		b.bind(k, int64(k), 0, now)
	}
	b.bind(1, 1, 1, now) // 1 is now the most recent: 2 goes next
	b.bind(4, 4, 0, now)
	if _, _, ok := b.lookup(2, now); ok {
		t.Error("binding 2 survived; want it evicted as the least recently used")
	}
	for _, k := range []uint64{1, 3, 4} {
		if ch, _, ok := b.lookup(k, now); !ok || ch != int64(k) {
			t.Errorf("binding %d: %d, %v", k, ch, ok)
		}
	}
	if ch, key, _ := b.lookup(1, now); ch != 1 || key != 1 {
		t.Errorf("rebinding 1 kept (%d, %d); want (1, 1)", ch, key)
	}
	if _, _, ok := b.lookup(3, now+int64(2*time.Minute)); ok || b.len() != 2 {
		t.Errorf("expired binding found (%v) or kept (%d bindings); want dropped", ok, b.len())
	}
	// Expired bindings make room before live ones are evicted.
	b.bind(5, 5, 0, now+int64(2*time.Minute))
	if b.len() != 1 {
		t.Errorf("%d bindings after binding past the TTL of all others; want 1", b.len())
	}
}

// TestAffinityMemory binds a million distinct sessions into a table of
// 100 000 and reports the bytes a binding costs.
func TestAffinityMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("a million bindings")
	}
	const max, n = 100_000, 1_000_000
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	a := newAffinity(affinityConfig{Max: max})
	now := time.Now().UnixNano()
	for i := range n {
		a.table.bind(hashID(fmt.Sprint("session-", i)), int64(i%7), i%3, now+int64(i))
	}
	after := heap()
	if got := a.table.len(); got != max {
		t.Fatalf("%d bindings after %d sessions; want the bound, %d", got, n, max)
	}
	per := float64(after-before) / max
	t.Logf("%d sessions into a table of %d: %.0f bytes a binding (%.1f MB)", n, max, per, float64(after-before)/1e6)
	if per > 150 {
		t.Errorf("%.0f bytes a binding; want at most 150", per)
	}
	runtime.KeepAlive(a)
}

// TestAffinityBurst: 200 concurrent turns of one session all succeed and
// leave one binding.
func TestAffinityBurst(t *testing.T) {
	e := newTestEnv(t)
	for _, n := range []string{"a", "b", "c"} {
		e.addChannel(Channel{Name: n, URL: newFakeUpstream(t, n).URL})
	}
	var wg sync.WaitGroup
	errs := make(chan string, 200)
	for range 200 {
		wg.Go(func() {
			req, _ := http.NewRequest("POST", e.URL+"/v1/messages", strings.NewReader(ccTurn(3, "burst", "")))
			req.Header.Set("X-Claude-Code-Session-Id", "burst")
			resp, err := e.client.Do(req)
			if err != nil {
				errs <- err.Error()
				return
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				errs <- resp.Status
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	e.settle()
	if n := e.app.relay.aff.table.len(); n != 1 {
		t.Errorf("%d bindings after one session's burst; want 1", n)
	}
}

// TestAffinityOff: CCLOAD_AFFINITY=off rotates every turn as before and
// logs no affinity.
func TestAffinityOff(t *testing.T) {
	c, err := loadConfig(func(k string) string {
		return map[string]string{"CCLOAD_AFFINITY": "off", "CCLOAD_AFFINITY_TTL": "30m", "CCLOAD_AFFINITY_MAX": "5000"}[k]
	})
	if err != nil || !c.Affinity.Off || c.Affinity.TTL != 30*time.Minute || c.Affinity.Max != 5000 {
		t.Fatalf("config %+v, %v", c.Affinity, err)
	}
	if _, err := loadConfig(func(k string) string {
		return map[string]string{"CCLOAD_AFFINITY": "maybe", "CCLOAD_AFFINITY_TTL": "-1s", "CCLOAD_AFFINITY_MAX": "lots"}[k]
	}); err == nil || strings.Count(err.Error(), "CCLOAD_AFFINITY") != 3 {
		t.Errorf("bad values: %v; want an error naming each", err)
	}
	if d, _ := loadConfig(func(string) string { return "" }); d.Affinity.Off || d.Affinity.ttl() != time.Hour || d.Affinity.max() != 100_000 {
		t.Errorf("defaults %+v", d.Affinity)
	}

	e := newTestEnv(t, func(c *config) { c.Affinity.Off = true })
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	e.addChannel(Channel{Name: "a", URL: a.URL})
	e.addChannel(Channel{Name: "b", URL: b.URL})
	for n := 1; n <= 4; n++ {
		sessionTurn(t, e, "s", n)
	}
	if a.count() != 2 || b.count() != 2 {
		t.Errorf("affinity off: a %d, b %d; want 2 and 2", a.count(), b.count())
	}
	for _, r := range e.logs() {
		if r.Affinity != "" || r.Session != "" {
			t.Errorf("affinity off: row affinity %q session %q; want none", r.Affinity, r.Session)
		}
	}
}

// TestAffinityBadInput: odd identities are served, never crash.
func TestAffinityBadInput(t *testing.T) {
	e := newTestEnv(t)
	e.addChannel(Channel{Name: "a", URL: newFakeUpstream(t, "a").URL})
	for name, c := range map[string]struct {
		extra string
		hdr   map[string]string
	}{
		"user_id a number":     {extra: `,"metadata":{"user_id":42}`},
		"user_id an object":    {extra: `,"metadata":{"user_id":{"session_id":"x"}}`},
		"metadata not object":  {extra: `,"metadata":"nope"`},
		"10 MB session id":     {extra: `,"metadata":{"user_id":"` + strings.Repeat("s", 10<<20) + `"}`},
		"invalid UTF-8 header": {hdr: map[string]string{"X-Claude-Code-Session-Id": "\xc3\x28"}},
		"escaped json id":      {extra: `,"metadata":{"user_id":"{\"session_id\":\"\\u00e9\\ud800\"}"}`},
	} {
		hdr := map[string]string{"Anthropic-Version": "2023-06-01"}
		for k, v := range c.hdr {
			hdr[k] = v
		}
		resp, body := e.do("POST", "/v1/messages", ccTurn(1, "odd", c.extra), hdr)
		if resp.StatusCode != 200 {
			t.Errorf("%s: %d %s; want 200", name, resp.StatusCode, body)
		}
	}
	for _, r := range e.logs() {
		if r.Session == "" || len(r.Session) > 12 {
			t.Errorf("row session %q; want a short hash", r.Session)
		}
	}
}

// TestAffinityMetrics: /metrics counts what affinity did.
func TestAffinityMetrics(t *testing.T) {
	e, bound, _, _ := affinityPair(t)
	sessionTurn(t, e, "s", 2)
	bound.set(fakeBehavior{Status: 529})
	sessionTurn(t, e, "s", 3)
	e.settle()
	_, body := e.do("GET", "/metrics", "", nil)
	for _, want := range []string{`ccload_affinity_total{result="new"} 1`, `ccload_affinity_total{result="hit"} 1`,
		`ccload_affinity_total{result="moved"} 1`, `ccload_affinity_total{result="miss"} 0`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// TestAffinityCacheSavings runs one 20-turn conversation over three equal
// channels whose upstreams cache prompts (fakeBehavior.PromptCache), with
// affinity on and off, and straight to one upstream, and compares the
// cache hit ratio (cache read / all input) and the input cost (fresh 1,
// cache write 1.25, cache read 0.1). Between turns the upstreams' clock
// moves on by the time a user or agent takes for a turn.
func TestAffinityCacheSavings(t *testing.T) {
	const turns = 20
	type tally struct{ in, read, write int64 }
	ratio := func(u tally) float64 { return float64(u.read) / float64(u.in+u.read+u.write) }
	cost := func(u tally) float64 { return float64(u.in) + 1.25*float64(u.write) + 0.1*float64(u.read) }
	for _, gap := range []time.Duration{30 * time.Second, 2 * time.Minute} {
		t.Run(fmt.Sprint("turn every ", gap), func(t *testing.T) {
			clk := startedClock()
			cached := func(name string) *fakeUpstream {
				u := newFakeUpstream(t, name)
				u.set(fakeBehavior{PromptCache: true})
				u.clock = clk.now
				return u
			}
			// Straight to one upstream.
			var direct tally
			up := cached("direct")
			for n := 1; n <= turns; n++ {
				resp, err := http.Post(up.URL+"/v1/messages", "application/json", strings.NewReader(ccTurn(n, "savings", "")))
				if err != nil {
					t.Fatal(err)
				}
				var body struct {
					Usage struct {
						In    int64 `json:"input_tokens"`
						Read  int64 `json:"cache_read_input_tokens"`
						Write int64 `json:"cache_creation_input_tokens"`
					}
				}
				json.NewDecoder(resp.Body).Decode(&body)
				resp.Body.Close()
				direct.in, direct.read, direct.write = direct.in+body.Usage.In, direct.read+body.Usage.Read, direct.write+body.Usage.Write
				clk.advance(gap)
			}
			through := func(off bool) tally {
				e := newTestEnv(t, func(c *config) { c.Affinity.Off = off })
				for _, n := range []string{"a", "b", "c"} {
					e.addChannel(Channel{Name: n, URL: cached(n).URL})
				}
				for n := 1; n <= turns; n++ {
					sessionTurn(t, e, "savings", n)
					clk.advance(gap)
				}
				var u tally
				for _, r := range e.logs() {
					u.in, u.read, u.write = u.in+r.InputTokens, u.read+r.CacheRead, u.write+r.CacheWrite
				}
				// What the admin sees: the ratio per channel, and the
				// cache tokens in the hourly trend.
				tok := e.login()
				var st stats
				_, body := e.admin(tok, "GET", "/admin/stats?hours=24", "")
				json.Unmarshal(body, &st)
				var sum tally
				for _, r := range st.Channels {
					sum.in, sum.read, sum.write = sum.in+r.InputTokens, sum.read+r.CacheReadTokens, sum.write+r.CacheWriteToks
					if want := cacheHitRatio(r.InputTokens, r.CacheReadTokens, r.CacheWriteToks); r.CacheHitRatio != want || (!off && want != ratio(u)) {
						t.Errorf("stats: channel %s cache_hit_ratio %v; want %v (log rows: %v)", *r.ChannelName, r.CacheHitRatio, want, ratio(u))
					}
				}
				var tr struct{ Buckets []trendBucket }
				_, body = e.admin(tok, "GET", "/admin/trends?hours=24", "")
				json.Unmarshal(body, &tr)
				var trRead, trWrite int64
				for _, b := range tr.Buckets {
					trRead, trWrite = trRead+b.CacheRead, trWrite+b.CacheWrite
				}
				if sum != u || trRead != u.read || trWrite != u.write {
					t.Errorf("stats sum %+v, trends read %d write %d; want the log's %+v", sum, trRead, trWrite, u)
				}
				return u
			}
			on, off := through(false), through(true)
			t.Logf("%d turns, one every %s: cache hit ratio direct %.3f, affinity on %.3f (%.2f of direct), off %.3f (%.2f of direct); "+
				"input cost vs direct: on %.2fx, off %.2fx",
				turns, gap, ratio(direct), ratio(on), ratio(on)/ratio(direct), ratio(off), ratio(off)/ratio(direct),
				cost(on)/cost(direct), cost(off)/cost(direct))
			if ratio(on) < 0.95*ratio(direct) {
				t.Errorf("affinity on: cache hit ratio %.3f; want at least 0.95 of direct's %.3f", ratio(on), ratio(direct))
			}
			if ratio(off) > 0.9*ratio(on) {
				t.Errorf("affinity off: cache hit ratio %.3f; want well below on's %.3f", ratio(off), ratio(on))
			}
		})
	}
}

// TestClaudeCodeBodySession: the benchmark's Claude-Code-shaped body is
// valid and names its session in metadata.user_id, so the benchmark runs
// the path a real Claude Code request takes.
func TestClaudeCodeBodySession(t *testing.T) {
	body := claudeCodeBody(200 << 10)
	info, err := inspectBody(body)
	if err != nil {
		t.Fatal(err)
	}
	got, ok := sessionOf(http.Header{}, protoAnthropic, body, &info)
	if want := hashID("9b1c4e2a-7d3f-4e8a-b6c5-0a1b2c3d4e5f"); !ok || got != want || len(body) < 190<<10 || len(body) > 210<<10 {
		t.Errorf("%d-byte body: session %x, %v; want %x", len(body), got, ok, want)
	}
}

// BenchmarkAffinity is what affinity adds to one request of a 200 KiB
// Claude Code body: finding the session (from metadata.user_id, or else
// hashing the leading conversation), the lookup at admission and the bind
// when it is logged. The body scan itself is BenchmarkInspectBody's.
func BenchmarkAffinity(b *testing.B) {
	withID := claudeCodeBody(200 << 10)
	i := bytes.LastIndex(withID, []byte(`,"metadata"`))
	noID := append(append([]byte{}, withID[:i]...), '}')
	for _, c := range []struct {
		name string
		body []byte
	}{{"metadata", withID}, {"fallback-hash", noID}} {
		b.Run(c.name, func(b *testing.B) {
			info, err := inspectBody(c.body)
			if err != nil {
				b.Fatal(err)
			}
			a := newAffinity(affinityConfig{})
			h := http.Header{}
			now := time.Now()
			b.ReportAllocs()
			for b.Loop() {
				id, ok := sessionOf(h, protoAnthropic, c.body, &info)
				if !ok {
					b.Fatal("no session")
				}
				k := maphash.Comparable(a.seed, sessionScope{"local", protoAnthropic, "claude-sonnet-4-5", id})
				a.table.lookup(k, now.UnixNano())
				a.table.bind(k, 1, 0, now.UnixNano())
			}
		})
	}
}

// TestAffinitySideRequests: Claude Code sends side requests on a small
// model with the conversation's session id. They get a binding of their
// own (a prompt cache is per model) and never pull the main conversation
// off its channel.
func TestAffinitySideRequests(t *testing.T) {
	e := newTestEnv(t)
	for _, n := range []string{"a", "b"} {
		e.addChannel(Channel{Name: n, URL: newFakeUpstream(t, n).URL})
	}
	// The small model has a channel of its own, tried first.
	e.addChannel(Channel{Name: "small", URL: newFakeUpstream(t, "small").URL, Priority: 10, Models: []string{"claude-haiku-4-5"}})
	hdr := map[string]string{"Anthropic-Version": "2023-06-01", "X-Claude-Code-Session-Id": "main"}
	for n := 1; n <= 4; n++ {
		sessionTurn(t, e, "main", n)
		side := strings.Replace(ccTurn(1, "title this", ""), "claude-sonnet-4-5", "claude-haiku-4-5", 1)
		if resp, body := e.do("POST", "/v1/messages", side, hdr); resp.StatusCode != 200 {
			t.Fatalf("side request: %d %s", resp.StatusCode, body)
		}
	}
	var main, side []string
	for _, r := range e.logs() {
		v := r.ChannelName + "/" + r.Affinity
		if r.Model == "claude-haiku-4-5" {
			side = append(side, v)
		} else {
			main = append(main, v)
		}
	}
	ch := strings.TrimSuffix(main[0], "/new")
	if want := []string{ch + "/new", ch + "/hit", ch + "/hit", ch + "/hit"}; strings.Join(main, " ") != strings.Join(want, " ") {
		t.Errorf("main conversation %v; want %v", main, want)
	}
	sch := strings.TrimSuffix(side[0], "/new")
	if want := []string{sch + "/new", sch + "/hit", sch + "/hit", sch + "/hit"}; strings.Join(side, " ") != strings.Join(want, " ") {
		t.Errorf("side requests %v; want %v", side, want)
	}
}
