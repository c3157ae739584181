package main

import (
	"net/http"
	"slices"
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	cases := []struct {
		base time.Duration
		n    int
		want time.Duration
	}{
		{defaultCooldownPolicy.Transient, 1, 30 * time.Second},
		{defaultCooldownPolicy.Transient, 2, time.Minute},
		{defaultCooldownPolicy.Transient, 3, 2 * time.Minute},
		{defaultCooldownPolicy.Transient, 6, 16 * time.Minute},
		{defaultCooldownPolicy.Transient, 7, 30 * time.Minute},
		{defaultCooldownPolicy.Transient, 1000, 30 * time.Minute},
		{defaultCooldownPolicy.Persistent, 1, 5 * time.Minute},
		{defaultCooldownPolicy.Persistent, 2, 10 * time.Minute},
		{defaultCooldownPolicy.Persistent, 3, 20 * time.Minute},
		{defaultCooldownPolicy.Persistent, 4, 30 * time.Minute},
	}
	for _, tc := range cases {
		if got := backoff(tc.base, defaultCooldownPolicy.Cap, tc.n); got != tc.want {
			t.Errorf("backoff(%s, %d) = %s; want %s", tc.base, tc.n, got, tc.want)
		}
	}
}

// fakeClock is a time source tests move by hand.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }

func newTestCooldowns(ch ...Channel) (*cooldowns, *fakeClock, map[int64]*channelHealth) {
	clk := &fakeClock{t: time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)}
	c := newCooldowns(clk.now)
	hs, _ := c.sync(ch)
	return c, clk, hs
}

func TestCooldownScopesAndDoubling(t *testing.T) {
	c, clk, hs := newTestCooldowns(Channel{ID: 1, URL: "u", APIKeys: []string{"a", "b"}})
	h := hs[1]
	transient := verdict{scope: scopeChannel, base: defaultCooldownPolicy.Transient, status: 503, reason: "503"}

	steps := []struct {
		v    verdict
		want time.Duration
	}{
		{transient, 30 * time.Second},
		{transient, time.Minute},
		{transient, 2 * time.Minute},
		{verdict{scope: scopeChannel, base: defaultCooldownPolicy.Transient, wait: 90 * time.Second}, 90 * time.Second}, // upstream's time wins
		{verdict{scope: scopeChannel, base: defaultCooldownPolicy.Transient, wait: 72 * time.Hour}, 24 * time.Hour},     // but not nonsense
	}
	for i, s := range steps {
		until := c.fail(h, -1, "", s.v)
		if got := until.Sub(clk.now()); got != s.want {
			t.Errorf("step %d: cooldown %s; want %s", i, got, s.want)
		}
	}
	if h.ch.failures != 5 {
		t.Errorf("failures %d; want 5", h.ch.failures)
	}

	// Key and model scopes are independent of the channel's.
	c.fail(h, 1, "", verdict{scope: scopeKey, base: defaultCooldownPolicy.Persistent, status: 401})
	c.fail(h, 0, "claude-x", verdict{scope: scopeModel, base: defaultCooldownPolicy.Persistent, status: 404})
	now := clk.now().UnixNano()
	if h.keys[0].cooling(now) || !h.keys[1].cooling(now) {
		t.Error("wrong key cooling")
	}
	if s := h.modelSlot("claude-x"); s == nil || !s.cooling(now) || h.modelSlot("other") != nil {
		t.Error("model scope wrong")
	}

	// A success clears the channel, the key used and the model asked.
	c.succeed(h, 1, "claude-x")
	if h.ch.until.Load() != 0 || h.ch.failures != 0 || h.keys[1].until.Load() != 0 || h.modelSlot("claude-x").until.Load() != 0 {
		t.Errorf("success left state behind: ch %d key %d", h.ch.failures, h.keys[1].failures)
	}
	// ...so the next failure starts again from the base.
	if until := c.fail(h, -1, "", transient); until.Sub(clk.now()) != defaultCooldownPolicy.Transient {
		t.Errorf("after success: %s; want %s", until.Sub(clk.now()), defaultCooldownPolicy.Transient)
	}
	// Expiry without a success keeps counting: the next failure doubles.
	clk.advance(time.Hour)
	if h.ch.cooling(clk.now().UnixNano()) {
		t.Error("still cooling after expiry")
	}
	if until := c.fail(h, -1, "", transient); until.Sub(clk.now()) != time.Minute {
		t.Errorf("consecutive after expiry: %s; want 1m", until.Sub(clk.now()))
	}
}

func TestBlockedUntil(t *testing.T) {
	c, clk, hs := newTestCooldowns(Channel{ID: 1, URL: "u", APIKeys: []string{"a", "b"}})
	h := hs[1]
	now := func() int64 { return clk.now().UnixNano() }
	if got := h.blockedUntil("m", now()); got != 0 {
		t.Fatalf("fresh channel blocked until %d", got)
	}
	u1 := c.fail(h, 0, "", verdict{scope: scopeKey, base: time.Minute})
	if got := h.blockedUntil("m", now()); got != 0 {
		t.Error("one key of two cooling blocks the channel")
	}
	u2 := c.fail(h, 1, "", verdict{scope: scopeKey, base: 2 * time.Minute})
	if got := h.blockedUntil("m", now()); got != u1.UnixNano() {
		t.Errorf("all keys cooling: blocked until %d; want the first key's %d", got, u1.UnixNano())
	}
	um := c.fail(h, 0, "m", verdict{scope: scopeModel, base: 10 * time.Minute})
	if got := h.blockedUntil("m", now()); got != um.UnixNano() {
		t.Errorf("model cooling longest: %d; want %d", got, um.UnixNano())
	}
	if got := h.blockedUntil("other", now()); got != u1.UnixNano() {
		t.Errorf("other model: %d; want %d", got, u1.UnixNano())
	}
	clk.advance(3 * time.Minute)
	_ = u2
	if got := h.blockedUntil("other", now()); got != 0 {
		t.Error("still blocked after the keys freed")
	}
}

func TestSyncKeepsHealthUnlessURLOrKeysChange(t *testing.T) {
	ch := Channel{ID: 1, URL: "https://a", APIKeys: []string{"k1"}}
	c, _, hs := newTestCooldowns(ch)
	h := hs[1]
	c.fail(h, -1, "", verdict{scope: scopeChannel, base: time.Minute})

	sync := func(chs ...Channel) (map[int64]*channelHealth, []int64) { return c.sync(chs) }

	ch.Priority, ch.Models, ch.Name, ch.Enabled = 5, []string{"x"}, "renamed", false
	if got, retired := sync(ch); got[1] != h || len(retired) != 0 {
		t.Errorf("an unrelated edit replaced the health (retired %v)", retired)
	}
	ch.URL = "https://b"
	if got, retired := sync(ch); got[1] == h || got[1].ch.until.Load() != 0 || !slices.Equal(retired, []int64{1}) {
		t.Errorf("a URL change kept the health (retired %v)", retired)
	}
	h = c.get(1)
	ch.APIKeys = []string{"k1", "k2"}
	if got, retired := sync(ch); got[1] == h || len(got[1].keys) != 2 || !slices.Equal(retired, []int64{1}) {
		t.Errorf("a key change kept the health (retired %v)", retired)
	}
	h = c.get(1)
	ch.APIKeys = []string{"k2", "k1"}
	if got, retired := sync(ch); got[1] == h || !slices.Equal(retired, []int64{1}) {
		t.Errorf("a new key order kept the health (retired %v): key indexes name other keys now", retired)
	}
	if got, retired := sync(); len(got) != 0 || c.get(1) != nil || !slices.Equal(retired, []int64{1}) {
		t.Errorf("a deleted channel kept its health (retired %v)", retired)
	}
}

func TestRestoreAndPending(t *testing.T) {
	c, clk, hs := newTestCooldowns(Channel{ID: 1, URL: "u", APIKeys: []string{"a"}})
	until := clk.now().Add(time.Minute)
	n := c.restore([]cooldownRecord{
		{ChannelID: 1, KeyIndex: -1, Until: until, Failures: 2, Reason: "503", Status: 503},
		{ChannelID: 1, KeyIndex: 0, Until: until, Failures: 1},
		{ChannelID: 1, KeyIndex: -1, Model: "m", Until: until, Failures: 1},
		{ChannelID: 1, KeyIndex: 5, Until: until, Failures: 1},  // key no longer there
		{ChannelID: 9, KeyIndex: -1, Until: until, Failures: 1}, // channel gone
	})
	if n != 3 {
		t.Errorf("restored %d; want 3", n)
	}
	h := hs[1]
	st := h.state(clk.now())
	if st.CooldownUntil == nil || !st.CooldownUntil.Equal(until) || st.Failures != 2 || st.CooldownReason != "503" ||
		st.Keys[0].CooldownUntil == nil || len(st.Models) != 1 {
		t.Errorf("state %+v", st)
	}
	// Failures queue their rows; the latest state of a scope wins.
	c.fail(h, -1, "", verdict{scope: scopeChannel, base: time.Minute})
	c.fail(h, -1, "", verdict{scope: scopeChannel, base: time.Minute})
	recs := c.takePending()
	if len(recs) != 1 || recs[0].Failures != 4 {
		t.Errorf("pending %+v; want one record with 4 failures", recs)
	}
	c.succeed(h, 0, "m")
	recs = c.takePending()
	if len(recs) != 3 {
		t.Errorf("clears queued %d rows; want 3 (channel, key, model)", len(recs))
	}
	for _, r := range recs {
		if r.Failures != 0 {
			t.Errorf("clear row %+v", r)
		}
	}
}

// Requests already in flight when a channel fails are one failure, not
// several: only an attempt started after the last counted failure doubles
// the wait.
func TestInFlightFailuresCountOnce(t *testing.T) {
	c, clk, hs := newTestCooldowns(Channel{ID: 1, URL: "u", APIKeys: []string{"a"}})
	h := hs[1]
	began := clk.now() // ten requests start together...
	clk.advance(time.Second)
	for range 10 { // ...and all get a 529
		c.fail(h, -1, "", verdict{scope: scopeChannel, class: transient, started: began})
	}
	if h.ch.failures != 1 {
		t.Fatalf("failures %d; want 1", h.ch.failures)
	}
	if d := time.Unix(0, h.ch.until.Load()).Sub(clk.now()); d != 30*time.Second {
		t.Errorf("cooldown %s; want 30s", d)
	}
	// A request started after that failure, failing again, doubles it.
	clk.advance(time.Minute)
	later := clk.now()
	clk.advance(time.Second)
	c.fail(h, -1, "", verdict{scope: scopeChannel, class: transient, started: later})
	if h.ch.failures != 2 || time.Unix(0, h.ch.until.Load()).Sub(clk.now()) != time.Minute {
		t.Errorf("failures %d; want 2 with a 1m wait", h.ch.failures)
	}
	// An old in-flight failure never shortens a longer cooldown.
	before := time.Unix(0, h.ch.until.Load())
	c.fail(h, -1, "", verdict{scope: scopeChannel, class: transient, started: began})
	if got := time.Unix(0, h.ch.until.Load()); got.Before(before) || h.ch.failures != 2 {
		t.Errorf("old failure moved until %s -> %s, failures %d", before, got, h.ch.failures)
	}
}

// A health replaced by a change of URL or keys (or a delete) persists
// nothing more: a request still in flight on the old configuration must not
// leave a row that a restart would apply to the new one.
func TestRetiredHealthPersistsNothing(t *testing.T) {
	ch := Channel{ID: 1, URL: "https://a", APIKeys: []string{"k"}}
	c, _, hs := newTestCooldowns(ch)
	old := hs[1]
	ch.APIKeys = []string{"new-key"}
	c.sync([]Channel{ch})
	c.fail(old, 0, "", verdict{scope: scopeChannel, class: transient, status: 500})
	c.fail(old, 0, "", verdict{scope: scopeKey, class: persistent, status: 401})
	if recs := c.takePending(); len(recs) != 0 {
		t.Errorf("retired health queued %+v", recs)
	}
	cur := c.get(1)
	c.sync(nil) // deleted
	c.fail(cur, 0, "", verdict{scope: scopeChannel})
	if recs := c.takePending(); len(recs) != 0 {
		t.Errorf("deleted channel queued %+v", recs)
	}
}

// TestJudge is the failure table of README "Failover and cooldown", one row
// per subtest: a rule changes in judge and here, nowhere else.
func TestJudge(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	type want struct {
		scope scope
		class failClass
		wait  time.Duration
	}
	rows := []struct {
		row  string
		ev   evidence
		want want
	}{
		{"success", evidence{status: 200}, want{scope: scopeNone}},
		{"connect, DNS or TLS error; reset before headers", evidence{status: 502, reason: "request failed"}, want{scopeChannel, transient, 0}},
		{"no response in time (non-streaming)", evidence{status: 504}, want{scopeChannel, transient, 0}},
		{"500", evidence{status: 500}, want{scopeChannel, transient, 0}},
		{"502", evidence{status: 502}, want{scopeChannel, transient, 0}},
		{"503", evidence{status: 503}, want{scopeChannel, transient, 0}},
		{"504", evidence{status: 504}, want{scopeChannel, transient, 0}},
		{"520", evidence{status: 520}, want{scopeChannel, transient, 0}},
		{"524", evidence{status: 524}, want{scopeChannel, transient, 0}},
		{"529", evidence{status: 529}, want{scopeChannel, transient, 0}},
		{"408", evidence{status: 408}, want{scopeChannel, transient, 0}},
		{"5xx with Retry-After", evidence{status: 503, header: http.Header{"Retry-After": {"90"}}}, want{scopeChannel, transient, 90 * time.Second}},
		{"401", evidence{status: 401}, want{scopeKey, persistent, 0}},
		{"402", evidence{status: 402}, want{scopeKey, persistent, 0}},
		{"403", evidence{status: 403}, want{scopeKey, persistent, 0}},
		{"401 ignores rate-limit reset headers", evidence{status: 401, header: http.Header{"X-Ratelimit-Reset-Requests": {"2s"}}}, want{scopeKey, persistent, 0}},
		{"429 without a reset time", evidence{status: 429}, want{scopeKey, transient, 0}},
		{"429 with Retry-After", evidence{status: 429, header: http.Header{"Retry-After": {"12"}}}, want{scopeKey, transient, 12 * time.Second}},
		{"429 with retry-after-ms", evidence{status: 429, header: http.Header{"Retry-After-Ms": {"1500"}}}, want{scopeKey, transient, 1500 * time.Millisecond}},
		{"429 with x-ratelimit-reset", evidence{status: 429, header: http.Header{"X-Ratelimit-Reset-Tokens": {"7s"}}}, want{scopeKey, transient, 7 * time.Second}},
		{"429 with anthropic-ratelimit reset", evidence{status: 429, header: http.Header{"Anthropic-Ratelimit-Requests-Reset": {now.Add(20 * time.Second).Format(time.RFC3339)}}}, want{scopeKey, transient, 20 * time.Second}},
		{"404 with the protocol's JSON error (model not found)", evidence{status: 404, apiDoc: true}, want{scopeModel, persistent, 0}},
		{"404 without it (wrong URL, broken relay)", evidence{status: 404}, want{scopeChannel, transient, 0}},
		{"404 on count_tokens", evidence{status: 404, aux: true}, want{scope: scopeNext}},
		{"404 JSON error on count_tokens", evidence{status: 404, apiDoc: true, aux: true}, want{scope: scopeNext}},
		{"3xx redirect", evidence{status: 308}, want{scopeChannel, transient, 0}},
		{"1xx", evidence{status: 101}, want{scopeChannel, transient, 0}},
		{"400", evidence{status: 400}, want{scope: scopeNone}},
		{"413", evidence{status: 413}, want{scope: scopeNone}},
		{"422", evidence{status: 422}, want{scope: scopeNone}},
		{"other 4xx (405, 409)", evidence{status: 409}, want{scope: scopeNone}},
		{"200 carrying overloaded_error (stands for 529)", evidence{status: 529, apiDoc: true}, want{scopeChannel, transient, 0}},
		{"200 carrying not_found_error", evidence{status: 404, apiDoc: true}, want{scopeModel, persistent, 0}},
		{"200 carrying not_found_error on count_tokens", evidence{status: 404, apiDoc: true, aux: true}, want{scope: scopeNext}},
		{"200 carrying invalid_request_error", evidence{status: 400, apiDoc: true}, want{scope: scopeNone}},
		{"200 that is empty, HTML or ends before content (stands for 502)", evidence{status: 502}, want{scopeChannel, transient, 0}},
		{"stream: no first content event in time (stands for 504)", evidence{status: 504}, want{scopeChannel, transient, 0}},
		{"stream cut or idle after content (stands for 502)", evidence{status: 502}, want{scopeChannel, transient, 0}},
		{"stream: not_found_error event after content", evidence{status: 404, apiDoc: true}, want{scopeModel, persistent, 0}},
		{"stream: overloaded_error event after content", evidence{status: 529, apiDoc: true}, want{scopeChannel, transient, 0}},
		{"stream: rate_limit_error event after content", evidence{status: 429, apiDoc: true}, want{scopeKey, transient, 0}},
	}
	for _, r := range rows {
		t.Run(r.row, func(t *testing.T) {
			v := judge(r.ev, now)
			if v.scope != r.want.scope || v.wait != r.want.wait || (v.scope != scopeNone && v.scope != scopeNext && v.class != r.want.class) {
				t.Errorf("judge(%+v) = scope %s, class %d, wait %s; want %s, %d, %s",
					r.ev, v.scope, v.class, v.wait, r.want.scope, r.want.class, r.want.wait)
			}
			if v.status != r.ev.status {
				t.Errorf("status %d; want %d", v.status, r.ev.status)
			}
			if v.scope != scopeNone && v.reason == "" {
				t.Error("a failure without a reason")
			}
		})
	}
	for s := 100; s < 600; s++ {
		if clientFault(s) != (s >= 400 && judge(evidence{status: s}, now).scope == scopeNone) {
			t.Errorf("clientFault(%d) disagrees with judge", s)
		}
	}
}

// An expired cooldown stays on record until a success clears it, and while
// it does one request at a time may try the scope: the others are told to
// put it last. The trial ends with its verdict or after trialHold.
func TestExpiredCooldownIsOnTrialForOneRequest(t *testing.T) {
	c, clk, hs := newTestCooldowns(Channel{ID: 1, URL: "u"})
	h := hs[1]
	now := func() int64 { return clk.now().UnixNano() }
	if !h.claimTrial("m", now()) || !h.claimTrial("m", now()) {
		t.Fatal("a channel with nothing on record refused a request")
	}
	transient := verdict{scope: scopeChannel, base: defaultCooldownPolicy.Transient, status: 503, reason: "503"}
	c.fail(h, -1, "m", transient) // cools 30 s
	clk.advance(time.Second)
	if h.claimTrial("m", now()) {
		t.Fatal("a channel that cools since the request planned it was not put last")
	}
	clk.advance(30 * time.Second)
	if !h.claimTrial("m", now()) {
		t.Fatal("the first request after the cooldown ran out was refused its trial")
	}
	for i := range 3 {
		if h.claimTrial("m", now()) {
			t.Fatalf("claim %d during another request's trial granted", i+2)
		}
	}
	clk.advance(trialHold)
	if !h.claimTrial("m", now()) || h.claimTrial("m", now()) {
		t.Fatal("after trialHold one new trial (and only one) may start")
	}
	c.fail(h, -1, "m", transient) // the trial failed: cools 60 s, trial over
	clk.advance(61 * time.Second)
	if !h.claimTrial("m", now()) || h.claimTrial("m", now()) {
		t.Fatal("after the second cooldown one trial (and only one) may start")
	}
	c.succeed(h, -1, "m")
	if !h.claimTrial("m", now()) || !h.claimTrial("m", now()) {
		t.Fatal("a success ends the trial for everyone")
	}

	// A model's cooldown puts only that model on trial.
	c.fail(h, -1, "m", verdict{scope: scopeModel, base: defaultCooldownPolicy.Persistent, status: 404, reason: "404"})
	clk.advance(defaultCooldownPolicy.Persistent + time.Second)
	if !h.claimTrial("m", now()) || h.claimTrial("m", now()) {
		t.Fatal("model m: want one trial")
	}
	if !h.claimTrial("other", now()) || !h.claimTrial("other", now()) {
		t.Fatal("another model of the channel is not on trial")
	}
}
