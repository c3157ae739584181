package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestProxyForwardsAndLogs(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	ch := e.addChannel(Channel{Name: "a", URL: up.URL + "/relay/", APIKeys: []string{"sk-upstream-a"}})

	body := `{"model":"claude-sonnet-4-5", "max_tokens": 64,"messages":[{"role":"user","content":"héllo"}]}`
	resp, got := e.do("POST", "/v1/messages?beta=true", body, map[string]string{
		"Anthropic-Version": "2023-06-01",
		"Anthropic-Beta":    "fine-grained-tool-streaming-2025-05-14",
		"X-Api-Key":         "client-secret",
		"Authorization":     "Bearer client-secret",
		"X-Custom":          "kept as is",
	})
	if resp.StatusCode != 200 {
		t.Fatalf("status %d; want 200: %s", resp.StatusCode, got)
	}
	var msg struct {
		Type  string
		Model string
	}
	if err := json.Unmarshal(got, &msg); err != nil || msg.Type != "message" || msg.Model != "claude-sonnet-4-5" {
		t.Fatalf("body %s: got %+v, %v", got, msg, err)
	}
	reqs := up.requests()
	if len(reqs) != 1 {
		t.Fatalf("upstream hits %d; want 1", len(reqs))
	}
	r := reqs[0]
	if r.Path != "/relay/v1/messages" || r.Query != "beta=true" {
		t.Errorf("upstream path %q query %q; want /relay/v1/messages, beta=true", r.Path, r.Query)
	}
	if string(r.Body) != body {
		t.Errorf("body changed:\n got %s\nwant %s", r.Body, body)
	}
	if got := r.Header.Get("X-Api-Key"); got != "sk-upstream-a" {
		t.Errorf("x-api-key %q; want the channel's key", got)
	}
	if got := r.Header.Get("Authorization"); got != "Bearer sk-upstream-a" {
		t.Errorf("authorization %q; want the channel's key (non-Anthropic host)", got)
	}
	for _, h := range []string{"Anthropic-Version", "Anthropic-Beta", "X-Custom"} {
		if r.Header.Get(h) == "" {
			t.Errorf("header %s was not forwarded", h)
		}
	}
	for _, v := range r.Header {
		for _, s := range v {
			if strings.Contains(s, "client-secret") {
				t.Errorf("client credential reached the upstream: %v", r.Header)
			}
		}
	}

	l := e.lastLog()
	if l.Status != 200 || l.ChannelID != ch.ID || l.ChannelName != "a" || l.Attempts != 1 || l.KeyIndex != 0 ||
		l.Model != "claude-sonnet-4-5" || l.UpstreamModel != "claude-sonnet-4-5" || l.Protocol != "anthropic" || l.Stream {
		t.Errorf("log row: %+v", l)
	}
	if l.InputTokens != fakeInputTokens || l.OutputTokens != fakeOutputTokens || l.CacheRead != fakeCacheRead || l.CacheWrite != fakeCacheWrite {
		t.Errorf("usage in log: in %d out %d cr %d cw %d", l.InputTokens, l.OutputTokens, l.CacheRead, l.CacheWrite)
	}
	if l.Token != "local" || l.ClientIP != "127.0.0.1" {
		t.Errorf("token %q ip %q", l.Token, l.ClientIP)
	}
}

// TestFailoverTable covers the rows of the failure table that move on to
// the next channel: which upstream was hit how often, what the client got,
// and what cooled.
func TestFailoverTable(t *testing.T) {
	type want struct {
		scope  scope
		status int // status of the failed attempt as recorded in the cooldown
	}
	cases := []struct {
		name   string
		stream bool
		b      fakeBehavior
		want   want
	}{
		{"500", false, fakeBehavior{Status: 500}, want{scopeChannel, 500}},
		{"502", false, fakeBehavior{Status: 502}, want{scopeChannel, 502}},
		{"503", false, fakeBehavior{Status: 503}, want{scopeChannel, 503}},
		{"504", false, fakeBehavior{Status: 504}, want{scopeChannel, 504}},
		{"520", false, fakeBehavior{Status: 520}, want{scopeChannel, 520}},
		{"521", false, fakeBehavior{Status: 521}, want{scopeChannel, 521}},
		{"522", false, fakeBehavior{Status: 522}, want{scopeChannel, 522}},
		{"523", false, fakeBehavior{Status: 523}, want{scopeChannel, 523}},
		{"524", false, fakeBehavior{Status: 524}, want{scopeChannel, 524}},
		{"529", false, fakeBehavior{Status: 529, ErrType: "overloaded_error"}, want{scopeChannel, 529}},
		{"529 stream", true, fakeBehavior{Status: 529, ErrType: "overloaded_error"}, want{scopeChannel, 529}},
		{"reset before headers", false, fakeBehavior{Reset: true}, want{scopeChannel, 502}},
		{"reset before headers stream", true, fakeBehavior{Reset: true}, want{scopeChannel, 502}},
		{"html 404", false, fakeBehavior{HTML404: true}, want{scopeChannel, 404}},
		{"401", false, fakeBehavior{Status: 401}, want{scopeKey, 401}},
		{"402", false, fakeBehavior{Status: 402}, want{scopeKey, 402}},
		{"403", false, fakeBehavior{Status: 403}, want{scopeKey, 403}},
		{"429", false, fakeBehavior{Status: 429}, want{scopeKey, 429}},
		{"json 404 model", false, fakeBehavior{Status: 404, ErrType: "not_found_error"}, want{scopeModel, 404}},
		{"200 first event overloaded", true, fakeBehavior{FirstEventErr: true}, want{scopeChannel, 529}},
		{"200 first event rate limit", true, fakeBehavior{FirstEventErr: true, ErrType: "rate_limit_error"}, want{scopeKey, 429}},
		{"200 empty body", false, fakeBehavior{EmptyBody: true}, want{scopeChannel, 502}},
		{"200 empty stream", true, fakeBehavior{EmptyBody: true}, want{scopeChannel, 502}},
		{"200 html", false, fakeBehavior{HTMLBody: true}, want{scopeChannel, 502}},
		{"200 json error", false, fakeBehavior{ErrorIn200: true}, want{scopeChannel, 529}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newTestEnv(t)
			bad, good := newFakeUpstream(t, "bad"), newFakeUpstream(t, "good")
			bad.set(tc.b)
			badCh := e.addChannel(Channel{Name: "bad", URL: bad.URL, Priority: 10})
			goodCh := e.addChannel(Channel{Name: "good", URL: good.URL, Priority: 0})

			resp, body := e.post("/v1/messages", anthropicBody("claude-x", tc.stream))
			if resp.StatusCode != 200 {
				t.Fatalf("status %d; want 200 from the good channel: %s", resp.StatusCode, body)
			}
			if tc.stream {
				if !bytes.Contains(body, []byte("event: message_stop")) || bytes.Contains(body, []byte("event: error")) {
					t.Errorf("stream from good channel is not clean:\n%s", body)
				}
				if bytes.Count(body, []byte("event: message_start")) != 1 {
					t.Errorf("client saw more than one message_start (the bad channel leaked):\n%s", body)
				}
			}
			if bad.count() != 1 || good.count() != 1 {
				t.Errorf("hits bad=%d good=%d; want 1 and 1", bad.count(), good.count())
			}
			st := e.health(badCh.ID)
			var until *time.Time
			switch tc.want.scope {
			case scopeChannel:
				until = st.CooldownUntil
			case scopeKey:
				until = st.Keys[0].CooldownUntil
				if st.CooldownUntil != nil {
					t.Errorf("channel cooled for a key failure")
				}
			case scopeModel:
				if len(st.Models) == 1 && st.Models[0].Model == "claude-x" {
					until = st.Models[0].CooldownUntil
				}
				if st.CooldownUntil != nil {
					t.Errorf("channel cooled for a model failure")
				}
			}
			if until == nil {
				t.Fatalf("%s scope not cooling: %+v", tc.want.scope, st)
			}
			if gs := e.health(goodCh.ID); gs.CooldownUntil != nil || gs.Failures != 0 {
				t.Errorf("good channel has failures: %+v", gs)
			}
			l := e.lastLog()
			if l.Status != 200 || l.ChannelID != goodCh.ID || l.Attempts != 2 {
				t.Errorf("log: status %d channel %d attempts %d; want 200, %d, 2", l.Status, l.ChannelID, l.Attempts, goodCh.ID)
			}
			rec := e.app.cool.get(badCh.ID)
			rec.mu.Lock()
			var gotStatus int
			switch tc.want.scope {
			case scopeChannel:
				gotStatus = rec.ch.status
			case scopeKey:
				gotStatus = rec.keys[0].status
			case scopeModel:
				gotStatus = rec.modelSlot("claude-x").status
			}
			rec.mu.Unlock()
			if gotStatus != tc.want.status {
				t.Errorf("cooldown recorded status %d; want %d", gotStatus, tc.want.status)
			}
		})
	}
}

func TestConnectionRefusedFailsOver(t *testing.T) {
	e := newTestEnv(t)
	// Listen, then close: a port that refuses connections.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + ln.Addr().String()
	ln.Close()
	good := newFakeUpstream(t, "good")
	deadCh := e.addChannel(Channel{Name: "dead", URL: dead, Priority: 1})
	e.addChannel(Channel{Name: "good", URL: good.URL})
	resp, body := e.post("/v1/messages", anthropicBody("m", false))
	if resp.StatusCode != 200 || good.count() != 1 {
		t.Fatalf("status %d, good hits %d: %s", resp.StatusCode, good.count(), body)
	}
	if st := e.health(deadCh.ID); st.CooldownUntil == nil || !strings.Contains(st.CooldownReason, "request failed") {
		t.Errorf("dead channel state %+v", st)
	}
}

func TestHeaderTimeoutFailsOver(t *testing.T) {
	for _, stream := range []bool{true, false} {
		t.Run(fmt.Sprint("stream=", stream), func(t *testing.T) {
			e := newTestEnv(t, func(c *config) { c.FirstByteTimeout = 300 * time.Millisecond })
			e.app.relay.ResponseTimeout = 300 * time.Millisecond
			slow, good := newFakeUpstream(t, "slow"), newFakeUpstream(t, "good")
			slow.set(fakeBehavior{StallHeaders: true})
			slowCh := e.addChannel(Channel{Name: "slow", URL: slow.URL, Priority: 1})
			e.addChannel(Channel{Name: "good", URL: good.URL})
			resp, body := e.post("/v1/messages", anthropicBody("m", stream))
			if resp.StatusCode != 200 || good.count() != 1 {
				t.Fatalf("status %d good hits %d: %s", resp.StatusCode, good.count(), body)
			}
			if st := e.health(slowCh.ID); st.CooldownUntil == nil || !strings.Contains(st.CooldownReason, "no response within") {
				t.Errorf("slow channel state %+v", st)
			}
			// The stalled upstream request was cancelled, not left behind.
			e.settle()
			if n := slow.inFlight.Load(); n != 0 {
				t.Errorf("stalled upstream still has %d requests open", n)
			}
		})
	}
}

func TestFirstByteTimeoutFailsOver(t *testing.T) {
	e := newTestEnv(t, func(c *config) { c.FirstByteTimeout = 300 * time.Millisecond })
	stall, good := newFakeUpstream(t, "stall"), newFakeUpstream(t, "good")
	// Headers, message_start and a ping arrive; content never does.
	stall.set(fakeBehavior{StallFirst: true})
	stallCh := e.addChannel(Channel{Name: "stall", URL: stall.URL, Priority: 1})
	e.addChannel(Channel{Name: "good", URL: good.URL})
	resp, body := e.post("/v1/messages", anthropicBody("m", true))
	if resp.StatusCode != 200 || good.count() != 1 {
		t.Fatalf("status %d good hits %d", resp.StatusCode, good.count())
	}
	if n := bytes.Count(body, []byte("event: message_start")); n != 1 {
		t.Errorf("client saw %d message_start events; want 1 (the stalled channel's must not leak)", n)
	}
	if st := e.health(stallCh.ID); st.CooldownUntil == nil || !strings.Contains(st.CooldownReason, "no first event") {
		t.Errorf("stalled channel state %+v", st)
	}
}

func TestKeyFailoverInsideChannel(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	up.set(fakeBehavior{RequireKey: "sk-good-key"})
	ch := e.addChannel(Channel{Name: "a", URL: up.URL, APIKeys: []string{"sk-revoked-key", "sk-good-key"}})
	resp, body := e.post("/v1/messages", anthropicBody("m", false))
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	reqs := up.requests()
	if len(reqs) != 2 || reqs[0].Key != "sk-revoked-key" || reqs[1].Key != "sk-good-key" {
		t.Fatalf("keys tried: %+v", reqs)
	}
	st := e.health(ch.ID)
	if st.Keys[0].CooldownUntil == nil || st.Keys[1].CooldownUntil != nil || st.CooldownUntil != nil {
		t.Errorf("state %+v; want key 0 cooling only", st)
	}
	// The auth cooldown is the long one.
	if d := time.Until(*st.Keys[0].CooldownUntil); d < 4*time.Minute || d > 5*time.Minute {
		t.Errorf("auth cooldown %s; want about 5m", d)
	}
	l := e.lastLog()
	if l.KeyIndex != 1 || l.Attempts != 2 {
		t.Errorf("log key %d attempts %d; want 1, 2", l.KeyIndex, l.Attempts)
	}
	// Next request skips the cooling key.
	e.post("/v1/messages", anthropicBody("m", false))
	if reqs := up.requests(); len(reqs) != 3 || reqs[2].Key != "sk-good-key" {
		t.Errorf("cooling key was tried again: %+v", reqs[2:])
	}
}

func TestAllKeysFailThenNextChannel(t *testing.T) {
	e := newTestEnv(t)
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	a.set(fakeBehavior{Status: 401})
	e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 1, APIKeys: []string{"k1-aaaaaaaaaaaa", "k2-aaaaaaaaaaaa", "k3-aaaaaaaaaaaa"}})
	e.addChannel(Channel{Name: "b", URL: b.URL})
	resp, _ := e.post("/v1/messages", anthropicBody("m", false))
	if resp.StatusCode != 200 || a.count() != 3 || b.count() != 1 {
		t.Fatalf("status %d hits a=%d b=%d; want 200, 3, 1", resp.StatusCode, a.count(), b.count())
	}
}

func TestRateLimitHonoursRetryAfter(t *testing.T) {
	e := newTestEnv(t)
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	a.set(fakeBehavior{Status: 429, ErrType: "rate_limit_error", RetryAfter: "120"})
	ach := e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 1})
	e.addChannel(Channel{Name: "b", URL: b.URL})
	start := time.Now()
	resp, _ := e.post("/v1/messages", anthropicBody("m", false))
	if resp.StatusCode != 200 || b.count() != 1 {
		t.Fatalf("status %d b hits %d", resp.StatusCode, b.count())
	}
	st := e.health(ach.ID)
	if st.Keys[0].CooldownUntil == nil {
		t.Fatalf("key not cooling: %+v", st)
	}
	if d := st.Keys[0].CooldownUntil.Sub(start); d < 119*time.Second || d > 122*time.Second {
		t.Errorf("cooldown %s; want the 120s Retry-After", d)
	}
}

func TestModelNotFoundCoolsOnlyThatModel(t *testing.T) {
	e := newTestEnv(t)
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	// a knows only "known"; asking it for "gone" is a JSON 404.
	a.script(func(n int, r *http.Request) fakeBehavior {
		if n == 1 {
			return fakeBehavior{Status: 404, ErrType: "not_found_error"}
		}
		return fakeBehavior{}
	})
	ach := e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 1})
	e.addChannel(Channel{Name: "b", URL: b.URL})
	if resp, _ := e.post("/v1/messages", anthropicBody("gone", false)); resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	// Another model still goes to a first.
	e.post("/v1/messages", anthropicBody("known", false))
	if a.count() != 2 || b.count() != 1 {
		t.Errorf("hits a=%d b=%d; want 2, 1", a.count(), b.count())
	}
	// The cooled model skips a.
	e.post("/v1/messages", anthropicBody("gone", false))
	if a.count() != 2 || b.count() != 2 {
		t.Errorf("after: hits a=%d b=%d; want 2, 2", a.count(), b.count())
	}
	st := e.health(ach.ID)
	if st.CooldownUntil != nil || len(st.Models) != 1 || st.Models[0].Model != "gone" {
		t.Errorf("state %+v", st)
	}
}

func TestClientErrorsReturnAsIs(t *testing.T) {
	for _, status := range []int{400, 413, 422} {
		t.Run(fmt.Sprint(status), func(t *testing.T) {
			e := newTestEnv(t)
			a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
			a.set(fakeBehavior{Status: status, ErrType: "invalid_request_error"})
			ach := e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 1})
			e.addChannel(Channel{Name: "b", URL: b.URL})
			resp, body := e.post("/v1/messages", anthropicBody("m", false))
			if resp.StatusCode != status {
				t.Fatalf("status %d; want %d", resp.StatusCode, status)
			}
			want := string(fakeErrorBody(protoAnthropic, status, "invalid_request_error", fmt.Sprintf("fake a error %d", status)))
			if string(body) != want {
				t.Errorf("body %s; want the upstream's %s", body, want)
			}
			if resp.Header.Get("Request-Id") != "req_fake" {
				t.Errorf("upstream headers not passed on: %v", resp.Header)
			}
			if a.count() != 1 || b.count() != 0 {
				t.Errorf("hits a=%d b=%d; want 1, 0", a.count(), b.count())
			}
			if st := e.health(ach.ID); st.CooldownUntil != nil || st.Keys[0].CooldownUntil != nil || len(st.Models) != 0 {
				t.Errorf("client error cooled something: %+v", st)
			}
			if l := e.lastLog(); l.Status != status || !strings.Contains(l.Error, "fake a error") {
				t.Errorf("log status %d error %q", l.Status, l.Error)
			}
		})
	}
}

func TestGiveUpReturnsLastUpstreamError(t *testing.T) {
	e := newTestEnv(t)
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	a.set(fakeBehavior{Status: 503})
	b.set(fakeBehavior{Status: 529, ErrType: "overloaded_error"})
	e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 1})
	e.addChannel(Channel{Name: "b", URL: b.URL})
	resp, body := e.post("/v1/messages", anthropicBody("m", false))
	if resp.StatusCode != 529 {
		t.Fatalf("status %d; want the last upstream's 529", resp.StatusCode)
	}
	if want := string(fakeErrorBody(protoAnthropic, 529, "overloaded_error", "fake b error 529")); string(body) != want {
		t.Errorf("body %s; want %s", body, want)
	}
	if l := e.lastLog(); l.Status != 529 || l.Attempts != 2 {
		t.Errorf("log status %d attempts %d", l.Status, l.Attempts)
	}
}

func TestGiveUp503InProtocolShape(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := "http://" + ln.Addr().String()
	ln.Close()
	for _, tc := range []struct {
		path, body, typ string
		proto           protocol
	}{
		{"/v1/messages", anthropicBody("claude-z", false), "anthropic", protoAnthropic},
		{"/v1/chat/completions", `{"model":"claude-z","messages":[]}`, "openai", protoOpenAI},
		{"/v1beta/models/claude-z:generateContent", `{"contents":[]}`, "gemini", protoGemini},
	} {
		t.Run(tc.typ, func(t *testing.T) {
			e := newTestEnv(t)
			e.addChannel(Channel{Name: "dead1", URL: dead, Type: tc.typ})
			e.addChannel(Channel{Name: "dead2", URL: dead, Type: tc.typ})
			resp, body := e.post(tc.path, tc.body)
			if resp.StatusCode != 503 {
				t.Fatalf("status %d; want 503: %s", resp.StatusCode, body)
			}
			var msg string
			switch tc.proto {
			case protoAnthropic:
				var v struct {
					Type  string
					Error struct{ Type, Message string }
				}
				json.Unmarshal(body, &v)
				if v.Type != "error" || v.Error.Type != "api_error" {
					t.Errorf("not Anthropic's shape: %s", body)
				}
				msg = v.Error.Message
			case protoOpenAI:
				var v struct {
					Error struct{ Type, Message string }
				}
				json.Unmarshal(body, &v)
				if v.Error.Type != "server_error" {
					t.Errorf("not OpenAI's shape: %s", body)
				}
				msg = v.Error.Message
			default:
				var v struct {
					Error struct {
						Code            int
						Message, Status string
					}
				}
				json.Unmarshal(body, &v)
				if v.Error.Code != 503 || v.Error.Status != "UNAVAILABLE" {
					t.Errorf("not Gemini's shape: %s", body)
				}
				msg = v.Error.Message
			}
			for _, part := range []string{`"claude-z"`, "2 of 2 channels tried", "the first frees in 30s"} {
				if !strings.Contains(msg, part) {
					t.Errorf("message %q lacks %q", msg, part)
				}
			}
			if h := resp.Header; h.Get("Retry-After") != "" || h.Get("X-Should-Retry") != "false" {
				t.Errorf("503 headers Retry-After %q x-should-retry %q; want none and false: a retry cannot help for 30 s",
					h.Get("Retry-After"), h.Get("X-Should-Retry"))
			}
			// Now both are cooling: the next request tries the one that
			// frees first, once, and then gives up again.
			resp, body = e.post(tc.path, tc.body)
			if resp.StatusCode != 503 || !strings.Contains(string(body), "1 of 2 channels tried") {
				t.Errorf("all cooling: status %d body %s; want 503 after trying 1 of 2", resp.StatusCode, body)
			}
			rows := e.logs()
			if len(rows) != 2 || rows[0].Status != 503 || rows[0].Attempts != 2 || rows[1].Attempts != 1 {
				t.Errorf("log rows %+v", rows)
			}
		})
	}
}

func TestAllCoolingTriesSoonestOnce(t *testing.T) {
	e := newTestEnv(t)
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	a.script(func(n int, _ *http.Request) fakeBehavior {
		if n == 1 {
			return fakeBehavior{Status: 500}
		}
		return fakeBehavior{}
	})
	b.set(fakeBehavior{Status: 429, RetryAfter: "3600"})
	ach := e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 1})
	e.addChannel(Channel{Name: "b", URL: b.URL})
	// a cools for 30s (500), b's key for an hour (429): both cooling.
	if resp, _ := e.post("/v1/messages", anthropicBody("m", false)); resp.StatusCode != 429 {
		t.Fatalf("status %d; want b's 429", resp.StatusCode)
	}
	// a frees first, has recovered, and serves.
	resp, _ := e.post("/v1/messages", anthropicBody("m", false))
	if resp.StatusCode != 200 || a.count() != 2 || b.count() != 1 {
		t.Fatalf("status %d hits a=%d b=%d; want 200, 2, 1", resp.StatusCode, a.count(), b.count())
	}
	// Its success cleared its cooldown.
	if st := e.health(ach.ID); st.CooldownUntil != nil || st.Failures != 0 {
		t.Errorf("a still cooling after success: %+v", st)
	}
}

// readEvents reads SSE events from r as they arrive.
func readEvent(t *testing.T, br *bufio.Reader) string {
	t.Helper()
	var ev strings.Builder
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("read event: %v (so far %q)", err, ev.String())
		}
		if line == "\n" {
			return ev.String()
		}
		ev.WriteString(line)
	}
}

func TestStreamEventsFlushedAsTheyCome(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	gate := make(chan struct{})
	up.set(fakeBehavior{Deltas: 3, BlockDeltas: gate, Text: "tok"})
	e.addChannel(Channel{Name: "a", URL: up.URL})
	req, _ := http.NewRequest("POST", e.URL+"/v1/messages", strings.NewReader(anthropicBody("m", true)))
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("content type %q", ct)
	}
	br := bufio.NewReader(resp.Body)
	// The upstream holds the second delta until the gate opens, so the first
	// one can only be here if it was flushed on its own.
	for {
		ev := readEvent(t, br)
		if strings.HasPrefix(ev, "event: content_block_delta") {
			break
		}
	}
	gate <- struct{}{}
	if ev := readEvent(t, br); !strings.Contains(ev, `"text":"tok"`) {
		t.Fatalf("second delta: %q", ev)
	}
	gate <- struct{}{}
	rest, _ := io.ReadAll(br)
	if !bytes.Contains(rest, []byte("event: message_stop")) {
		t.Errorf("stream did not end properly: %s", rest)
	}
	l := e.lastLog()
	if !l.Stream || l.Status != 200 || l.InputTokens != fakeInputTokens || l.OutputTokens != fakeOutputTokens ||
		l.CacheRead != fakeCacheRead || l.CacheWrite != fakeCacheWrite || l.FirstByteMS > l.DurationMS {
		t.Errorf("log row %+v", l)
	}
}

func TestMidStreamFailureEndsWithErrorEvent(t *testing.T) {
	cases := []struct {
		name   string
		b      fakeBehavior
		status int
	}{
		{"connection cut", fakeBehavior{Deltas: 5, CutAfter: 2}, 502},
		{"clean EOF before the end", fakeBehavior{Deltas: 5, CutAfter: 2, CutClean: true}, 502},
		{"upstream error event", fakeBehavior{Deltas: 5, CutAfter: 2, MidStreamError: true}, 529},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newTestEnv(t)
			a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
			a.set(tc.b)
			ach := e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 1})
			e.addChannel(Channel{Name: "b", URL: b.URL})
			resp, body := e.post("/v1/messages", anthropicBody("m", true))
			if resp.StatusCode != 200 {
				t.Fatalf("status %d", resp.StatusCode)
			}
			// Two deltas went out, then a proper error event, and nothing
			// half-written before it.
			if n := bytes.Count(body, []byte("event: content_block_delta")); n != 2 {
				t.Errorf("client got %d deltas; want 2:\n%s", n, body)
			}
			if name, data := lastEvent(body); name != "error" || !bytes.HasSuffix(body, []byte("\n\n")) {
				t.Errorf("stream does not end with an error event:\n%s", body)
			} else if ue, ok := parseErrorDoc(data); !ok || ue.message == "" {
				t.Errorf("last event is not an Anthropic error: %s", data)
			}
			if bytes.Contains(body, []byte(`"content_blo`+"\n")) || bytes.Contains(body, []byte("message_stop")) {
				t.Errorf("partial event or false end leaked:\n%s", body)
			}
			if b.count() != 0 {
				t.Errorf("retried after the stream began: b hits %d", b.count())
			}
			l := e.lastLog()
			if l.Status != tc.status || l.Error == "" {
				t.Errorf("log status %d error %q; want %d", l.Status, l.Error, tc.status)
			}
			if st := e.health(ach.ID); st.CooldownUntil == nil {
				t.Errorf("mid-stream failure did not cool the channel: %+v", st)
			}
		})
	}
}

func TestClientDisconnectCancelsUpstream(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	gate := make(chan struct{})
	up.set(fakeBehavior{Deltas: 10, BlockDeltas: gate})
	ch := e.addChannel(Channel{Name: "a", URL: up.URL})
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "POST", e.URL+"/v1/messages", strings.NewReader(anthropicBody("m", true)))
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(resp.Body)
	for !strings.HasPrefix(readEvent(t, br), "event: content_block_delta") {
	}
	cancel()
	resp.Body.Close()
	// The upstream handler is blocked on the gate or on its request's
	// context; the relay must cancel that context.
	select {
	case <-up.ended:
	case <-time.After(time.Second):
		t.Fatal("upstream request still open a second after the client left")
	}
	l := e.lastLog()
	if l.Status != 499 {
		t.Errorf("log status %d; want 499", l.Status)
	}
	if st := e.health(ch.ID); st.CooldownUntil != nil || st.Failures != 0 {
		t.Errorf("client disconnect cooled the channel: %+v", st)
	}
}

func TestRoundRobinSharesATier(t *testing.T) {
	e := newTestEnv(t)
	var ups []*fakeUpstream
	for i := range 3 {
		u := newFakeUpstream(t, fmt.Sprint(i))
		ups = append(ups, u)
		e.addChannel(Channel{Name: fmt.Sprint("c", i), URL: u.URL, Priority: 5})
	}
	low := newFakeUpstream(t, "low")
	e.addChannel(Channel{Name: "low", URL: low.URL, Priority: 1})
	// Each request is a conversation of its own: the round robin spreads
	// sessions (a session's later turns stick, see TestAffinityStaysOnChannel).
	var wg sync.WaitGroup
	var n atomic.Int64
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 30 {
				e.do("POST", "/v1/messages", anthropicBody("m", false), map[string]string{
					"Anthropic-Version": "2023-06-01", "X-Claude-Code-Session-Id": fmt.Sprint("rr-", n.Add(1))})
			}
		}()
	}
	wg.Wait()
	for i, u := range ups {
		if u.count() != 80 {
			t.Errorf("channel %d served %d; want exactly 80 of 240", i, u.count())
		}
	}
	if low.count() != 0 {
		t.Errorf("lower priority served %d while the higher tier was healthy", low.count())
	}
}

func TestRoundRobinSkipsCoolingEvenly(t *testing.T) {
	e := newTestEnv(t)
	var ups []*fakeUpstream
	var chs []Channel
	for i := range 3 {
		u := newFakeUpstream(t, fmt.Sprint(i))
		ups = append(ups, u)
		chs = append(chs, e.addChannel(Channel{Name: fmt.Sprint("c", i), URL: u.URL}))
	}
	e.app.cool.fail(e.app.cool.get(chs[0].ID), 0, "", verdict{scope: scopeChannel, base: time.Hour, status: 500})
	for i := range 40 { // forty conversations, as in TestRoundRobinSharesATier
		e.do("POST", "/v1/messages", anthropicBody("m", false), map[string]string{
			"Anthropic-Version": "2023-06-01", "X-Claude-Code-Session-Id": fmt.Sprint("rr-", i)})
	}
	if ups[0].count() != 0 || ups[1].count() != 20 || ups[2].count() != 20 {
		t.Errorf("served %d/%d/%d; want 0/20/20", ups[0].count(), ups[1].count(), ups[2].count())
	}
}

func TestKeyStrategies(t *testing.T) {
	e := newTestEnv(t)
	seq, rr := newFakeUpstream(t, "seq"), newFakeUpstream(t, "rr")
	e.addChannel(Channel{Name: "seq", URL: seq.URL, APIKeys: []string{"key-one-111111", "key-two-222222"}, Models: []string{"s"}})
	e.addChannel(Channel{Name: "rr", URL: rr.URL, APIKeys: []string{"key-one-111111", "key-two-222222"}, Models: []string{"r"}, KeyStrategy: keyRoundRobin})
	for i := range 4 { // four conversations: a conversation's own turns keep their key
		for _, m := range []string{"s", "r"} {
			e.do("POST", "/v1/messages", anthropicBody(m, false), map[string]string{
				"Anthropic-Version": "2023-06-01", "X-Claude-Code-Session-Id": fmt.Sprint("keys-", i)})
		}
	}
	var seqKeys, rrKeys []string
	for _, r := range seq.requests() {
		seqKeys = append(seqKeys, r.Key)
	}
	for _, r := range rr.requests() {
		rrKeys = append(rrKeys, r.Key)
	}
	if strings.Join(seqKeys, ",") != "key-one-111111,key-one-111111,key-one-111111,key-one-111111" {
		t.Errorf("sequential keys %v", seqKeys)
	}
	if strings.Join(rrKeys, ",") != "key-one-111111,key-two-222222,key-one-111111,key-two-222222" {
		t.Errorf("round robin keys %v", rrKeys)
	}
}

func TestModelFilterAndRedirect(t *testing.T) {
	e := newTestEnv(t)
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 1, Models: []string{"only-a"},
		ModelRedirects: map[string]string{"alias": "real-model-v2"}})
	e.addChannel(Channel{Name: "b", URL: b.URL})
	body := `{ "stream" : false, "model" : "alias", "messages": [{"role":"user","content":"\"model\": \"x\""}], "metadata": {"model":"keep"} }`
	resp, _ := e.post("/v1/messages", body)
	if resp.StatusCode != 200 || a.count() != 1 {
		t.Fatalf("status %d a hits %d", resp.StatusCode, a.count())
	}
	want := strings.Replace(body, `"alias"`, `"real-model-v2"`, 1)
	if got := string(a.requests()[0].Body); got != want {
		t.Errorf("redirected body:\n got %s\nwant %s", got, want)
	}
	if l := e.lastLog(); l.Model != "alias" || l.UpstreamModel != "real-model-v2" {
		t.Errorf("log models %q → %q", l.Model, l.UpstreamModel)
	}
	// A model a does not list goes to b (which serves any).
	e.post("/v1/messages", anthropicBody("other", false))
	if b.count() != 1 || a.count() != 1 {
		t.Errorf("hits a=%d b=%d; want 1, 1", a.count(), b.count())
	}
}

func TestGeminiPathRedirectAndKey(t *testing.T) {
	e := newTestEnv(t)
	g := newFakeUpstream(t, "g")
	e.addChannel(Channel{Name: "g", URL: g.URL, Type: "gemini", APIKeys: []string{"AIza-upstream-key"},
		ModelRedirects: map[string]string{"gem": "gemini-2.5-pro"}})
	resp, body := e.post("/v1beta/models/gem:streamGenerateContent?alt=sse&key=client-key", `{"contents":[{"parts":[{"text":"hi"}]}]}`)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	r := g.requests()[0]
	if r.Path != "/v1beta/models/gemini-2.5-pro:streamGenerateContent" || r.Query != "alt=sse" || r.Key != "AIza-upstream-key" {
		t.Errorf("upstream got path %q query %q key %q", r.Path, r.Query, r.Key)
	}
	l := e.lastLog()
	if !l.Stream || l.Protocol != "gemini" || l.OutputTokens != fakeOutputTokens || l.InputTokens != fakeInputTokens || l.CacheRead != fakeCacheRead {
		t.Errorf("log %+v", l)
	}
}

func TestOpenAIProtocolsUsage(t *testing.T) {
	cases := []struct {
		name, path, body string
		stream           bool
		end              string
	}{
		{"chat", "/v1/chat/completions", `{"model":"gpt-x","messages":[]}`, false, ""},
		{"chat stream", "/v1/chat/completions", `{"model":"gpt-x","stream":true,"messages":[]}`, true, "data: [DONE]"},
		{"responses", "/v1/responses", `{"model":"gpt-x","input":"hi"}`, false, ""},
		{"responses stream", "/v1/responses", `{"model":"gpt-x","stream":true,"input":"hi"}`, true, "event: response.completed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newTestEnv(t)
			up := newFakeUpstream(t, "o")
			e.addChannel(Channel{Name: "o", URL: up.URL, Type: "codex", APIKeys: []string{"sk-openai-upstream"}})
			resp, body := e.do("POST", tc.path, tc.body, map[string]string{"Authorization": "Bearer whatever"})
			if resp.StatusCode != 200 {
				t.Fatalf("status %d: %s", resp.StatusCode, body)
			}
			if tc.end != "" && !bytes.Contains(body, []byte(tc.end)) {
				t.Errorf("stream lacks %q:\n%s", tc.end, body)
			}
			if r := up.requests()[0]; r.Header.Get("Authorization") != "Bearer sk-openai-upstream" || r.Header.Get("X-Api-Key") != "" {
				t.Errorf("upstream auth headers %v", r.Header)
			}
			l := e.lastLog()
			if l.Protocol != "openai" || l.Stream != tc.stream || l.InputTokens != fakeInputTokens ||
				l.OutputTokens != fakeOutputTokens || l.CacheRead != fakeCacheRead {
				t.Errorf("log %+v", l)
			}
		})
	}
}

func TestResponsesFirstEventFailureFailsOver(t *testing.T) {
	e := newTestEnv(t)
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	a.set(fakeBehavior{FirstEventErr: true, ErrType: "server_is_overloaded"})
	e.addChannel(Channel{Name: "a", URL: a.URL, Type: "openai", Priority: 1})
	e.addChannel(Channel{Name: "b", URL: b.URL, Type: "openai"})
	resp, body := e.do("POST", "/v1/responses", `{"model":"gpt-5-codex","stream":true,"input":"hi"}`, nil)
	if resp.StatusCode != 200 || b.count() != 1 || bytes.Contains(body, []byte("response.failed")) {
		t.Fatalf("status %d b hits %d body:\n%s", resp.StatusCode, b.count(), body)
	}
	if n := bytes.Count(body, []byte("event: response.created")); n != 1 {
		t.Errorf("%d response.created events; want 1", n)
	}
}

func TestResponsesMidStreamCutEndsWithResponseFailed(t *testing.T) {
	e := newTestEnv(t)
	a := newFakeUpstream(t, "a")
	a.set(fakeBehavior{Deltas: 4, CutAfter: 1})
	e.addChannel(Channel{Name: "a", URL: a.URL, Type: "openai"})
	_, body := e.do("POST", "/v1/responses", `{"model":"gpt-5-codex","stream":true,"input":"hi"}`, nil)
	if !bytes.HasSuffix(body, []byte("\n\n")) || !bytes.Contains(body, []byte("event: response.failed\ndata: {\"type\":\"response.failed\"")) {
		t.Errorf("cut Responses stream does not end with response.failed:\n%s", body)
	}
}

func TestCountTokensForwarded(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	resp, body := e.post("/v1/messages/count_tokens", `{"model":"m","messages":[]}`)
	if resp.StatusCode != 200 || string(body) != fmt.Sprintf(`{"input_tokens":%d}`, fakeInputTokens) {
		t.Fatalf("status %d body %s", resp.StatusCode, body)
	}
	if up.requests()[0].Path != "/v1/messages/count_tokens" {
		t.Errorf("path %q", up.requests()[0].Path)
	}
}

func TestBadInput(t *testing.T) {
	e := newTestEnv(t, func(c *config) { c.MaxBody = 1024 })
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL, Models: []string{"known"}})
	e.addChannel(Channel{Name: "o", URL: up.URL, Type: "openai", Models: []string{"known"}})
	cases := []struct {
		name, path, body string
		status           int
		msg              string
	}{
		{"malformed json", "/v1/messages", `{"model":"known",`, 400, "not valid JSON"},
		{"not an object", "/v1/messages", `["model"]`, 400, "JSON object"},
		{"missing model", "/v1/messages", `{"messages":[]}`, 400, `no "model"`},
		{"model not a string", "/v1/messages", `{"model":42}`, 400, `"model" must be a string`},
		{"empty body", "/v1/messages", ``, 400, "empty"},
		{"too big", "/v1/messages", `{"model":"known","pad":"` + strings.Repeat("x", 2000) + `"}`, 413, "1KiB"},
		{"unknown model", "/v1/messages", `{"model":"nobody-serves-this"}`, 404, `"nobody-serves-this"`},
		{"openai shape", "/v1/chat/completions", `{"model":`, 400, "not valid JSON"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := e.post(tc.path, tc.body)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d; want %d: %s", resp.StatusCode, tc.status, body)
			}
			var anth struct {
				Type  string
				Error struct{ Type, Message string }
			}
			if err := json.Unmarshal(body, &anth); err != nil || anth.Error.Message == "" {
				t.Fatalf("not a protocol error body: %s", body)
			}
			if strings.HasPrefix(tc.path, "/v1/messages") && anth.Type != "error" {
				t.Errorf("not Anthropic's shape: %s", body)
			}
			if strings.HasPrefix(tc.path, "/v1/chat") && (anth.Type != "" || anth.Error.Type != "invalid_request_error") {
				t.Errorf("not OpenAI's shape: %s", body)
			}
			if !strings.Contains(anth.Error.Message, tc.msg) {
				t.Errorf("message %q lacks %q", anth.Error.Message, tc.msg)
			}
		})
	}
	if up.count() != 0 {
		t.Errorf("bad input reached the upstream %d times", up.count())
	}
	if rows := e.logs(); len(rows) != len(cases) {
		t.Errorf("%d log rows; want one per request (%d)", len(rows), len(cases))
	}
}

func TestClientTokens(t *testing.T) {
	e := newTestEnv(t, func(c *config) { c.AuthTokens = []string{"alice:tok-alice-123", "tok-bare-456"} })
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	e.addChannel(Channel{Name: "g", URL: up.URL, Type: "gemini"})
	cases := []struct {
		name   string
		path   string
		hdr    map[string]string
		status int
		token  string
	}{
		{"none", "/v1/messages", nil, 401, ""},
		{"wrong", "/v1/messages", map[string]string{"X-Api-Key": "tok-alice-12"}, 401, ""},
		{"bearer", "/v1/messages", map[string]string{"Authorization": "Bearer tok-alice-123"}, 200, "alice"},
		{"x-api-key", "/v1/messages", map[string]string{"X-Api-Key": "tok-bare-456"}, 200, "tok-"},
		{"gemini query", "/v1beta/models/m:generateContent?key=tok-alice-123", nil, 200, "alice"},
		{"gemini header", "/v1beta/models/m:generateContent", map[string]string{"X-Goog-Api-Key": "tok-alice-123"}, 200, "alice"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			body := anthropicBody("m", false)
			if strings.Contains(tc.path, "v1beta") {
				body = `{"contents":[]}`
			}
			resp, got := e.do("POST", tc.path, body, tc.hdr)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d; want %d: %s", resp.StatusCode, tc.status, got)
			}
			l := e.lastLog()
			if !strings.HasPrefix(l.Token, tc.token) || strings.Contains(l.Token, "123") || strings.Contains(l.Token, "456") {
				t.Errorf("logged token %q; want prefix %q and never the secret", l.Token, tc.token)
			}
		})
	}
	for _, r := range up.requests() {
		if strings.Contains(r.Query, "tok-") || strings.Contains(fmt.Sprint(r.Header), "tok-") {
			t.Errorf("client token reached the upstream: %+v", r)
		}
	}
}

func TestLoopbackOnlyWithoutTokens(t *testing.T) {
	a := newClientAuth(nil)
	local, _ := http.NewRequest("POST", "/v1/messages", nil)
	local.RemoteAddr = "127.0.0.1:5000"
	if _, ok := a.identify(local, protoAnthropic); !ok {
		t.Error("loopback refused without tokens")
	}
	local.RemoteAddr = "[::1]:5000"
	if _, ok := a.identify(local, protoAnthropic); !ok {
		t.Error("IPv6 loopback refused without tokens")
	}
	remote := local.Clone(context.Background())
	remote.RemoteAddr = "203.0.113.9:5000"
	remote.Header.Set("X-Forwarded-For", "127.0.0.1")
	if _, ok := a.identify(remote, protoAnthropic); ok {
		t.Error("remote client served without tokens")
	}
}

func TestModelsAnsweredLocally(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL, Models: []string{"claude-b", "claude-a"}, ModelRedirects: map[string]string{"alias": "claude-a"}})
	e.addChannel(Channel{Name: "o", URL: up.URL, Type: "openai", Models: []string{"gpt-5-codex"}})
	_, body := e.do("GET", "/v1/models", "", map[string]string{"Anthropic-Version": "2023-06-01"})
	var anth struct {
		Data []struct{ Type, ID string }
	}
	json.Unmarshal(body, &anth)
	if len(anth.Data) != 3 || anth.Data[0].ID != "alias" || anth.Data[1].ID != "claude-a" || anth.Data[0].Type != "model" {
		t.Errorf("anthropic models: %s", body)
	}
	_, body = e.do("GET", "/v1/models", "", nil)
	var oai struct {
		Object string
		Data   []struct{ ID, Object string }
	}
	json.Unmarshal(body, &oai)
	if oai.Object != "list" || len(oai.Data) != 1 || oai.Data[0].ID != "gpt-5-codex" {
		t.Errorf("openai models: %s", body)
	}
	if up.count() != 0 {
		t.Error("models request went upstream")
	}
}

func TestCooldownsSurviveRestart(t *testing.T) {
	e := newTestEnv(t)
	a := newFakeUpstream(t, "a")
	a.set(fakeBehavior{Status: 503})
	ch := e.addChannel(Channel{Name: "a", URL: a.URL, APIKeys: []string{"key-0-aaaaaaaa", "key-1-bbbbbbbb"}})
	a.script(func(n int, _ *http.Request) fakeBehavior {
		if n == 1 {
			return fakeBehavior{Status: 401}
		}
		return fakeBehavior{Status: 503}
	})
	e.post("/v1/messages", anthropicBody("m", false))
	before := e.health(ch.ID)
	if before.CooldownUntil == nil || before.Keys[0].CooldownUntil == nil {
		t.Fatalf("not cooling before restart: %+v", before)
	}
	cfg := e.cfg
	e.close()

	e2 := startEnv(t, cfg)
	after := e2.health(ch.ID)
	if after.CooldownUntil == nil || !after.CooldownUntil.Equal(before.CooldownUntil.Truncate(time.Millisecond)) ||
		after.Keys[0].CooldownUntil == nil || after.Failures != 1 || after.CooldownReason != before.CooldownReason {
		t.Errorf("after restart %+v; want %+v", after, before)
	}
	// The restored cooldown is live: the channel is skipped... and as the
	// only one, tried once as the last resort.
	resp, _ := e2.post("/v1/messages", anthropicBody("m", false))
	if resp.StatusCode != 503 {
		t.Errorf("status %d", resp.StatusCode)
	}
}

func TestGracefulShutdownLetsStreamsFinish(t *testing.T) {
	cfg := testConfig(t)
	a, err := newApp(context.Background(), cfg, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	up := newFakeUpstream(t, "a")
	gate := make(chan struct{})
	up.set(fakeBehavior{Deltas: 3, BlockDeltas: gate})
	c := Channel{Name: "a", URL: up.URL, Type: "anthropic", KeyStrategy: keySequential, Enabled: true, APIKeys: []string{"sk-aaaaaaaaaaaa"}}
	a.store.CreateChannel(context.Background(), &c)
	a.admin.changeChannels(context.Background(), nil)

	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- a.serveOn(ctx, ln) }()

	resp, err := http.Post("http://"+ln.Addr().String()+"/v1/messages", "application/json", strings.NewReader(anthropicBody("m", true)))
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(resp.Body)
	for !strings.HasPrefix(readEvent(t, br), "event: content_block_delta") {
	}
	stop() // SIGTERM, in effect, mid-stream
	gate <- struct{}{}
	gate <- struct{}{}
	rest, err := io.ReadAll(br)
	if err != nil || !bytes.Contains(rest, []byte("event: message_stop")) {
		t.Fatalf("stream cut by shutdown: %v\n%s", err, rest)
	}
	resp.Body.Close()
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	// The database is closed; reopen it and find the row.
	s, err := OpenStore(context.Background(), cfg.SQLitePath)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rows, _, err := s.QueryLogs(context.Background(), logFilter{})
	if err != nil || len(rows) != 1 || rows[0].Status != 200 || rows[0].OutputTokens != fakeOutputTokens {
		t.Fatalf("log after shutdown: %+v, %v", rows, err)
	}
}

// lastEvent returns the name and data of the last SSE event in a stream.
func lastEvent(stream []byte) (name string, data []byte) {
	events := bytes.Split(bytes.TrimRight(stream, "\n"), []byte("\n\n"))
	for _, line := range bytes.Split(events[len(events)-1], []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte("event: ")); ok {
			name = string(v)
		}
		if v, ok := bytes.CutPrefix(line, []byte("data: ")); ok {
			data = v
		}
	}
	return name, data
}

func TestClientGoneMidBodyLogs499(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	c, err := net.Dial("tcp", strings.TrimPrefix(e.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":")
	c.Close()
	select {
	case <-e.connClosed:
	case <-time.After(10 * time.Second):
		t.Fatal("server never closed the connection")
	}
	if l := e.lastLog(); l.Status != 499 || up.count() != 0 {
		t.Errorf("log status %d, upstream hits %d; want 499, 0", l.Status, up.count())
	}
}

// TestPooledBodiesNeverCross sends many distinct large bodies at once, half
// of them failing over, and has the upstream check each body against the
// hash its client sent: a pooled buffer reused while still in use would
// send one client's bytes to another's request.
func TestPooledBodiesNeverCross(t *testing.T) {
	e := newTestEnv(t)
	flaky, good := newFakeUpstream(t, "flaky"), newFakeUpstream(t, "good")
	flaky.noRecord.Store(true)
	good.noRecord.Store(true)
	flaky.script(func(n int, _ *http.Request) fakeBehavior {
		if n%2 == 0 {
			return fakeBehavior{Status: 503}
		}
		return fakeBehavior{}
	})
	e.app.cool.policy.Transient = time.Millisecond // keep the flaky channel in play
	e.app.cool.policy.Cap = time.Millisecond
	e.addChannel(Channel{Name: "flaky", URL: flaky.URL, Priority: 1})
	e.addChannel(Channel{Name: "good", URL: good.URL})
	var wg sync.WaitGroup
	var failed atomic.Int64
	for c := range 64 {
		wg.Go(func() {
			for i := range 20 {
				body := fmt.Sprintf(`{"model":"m","max_tokens":8,"system":"%s","messages":[{"role":"user","content":"%d-%d"}]}`,
					strings.Repeat(string(rune('a'+c%26)), 60000+c*7+i), c, i)
				sum := sha256.Sum256([]byte(body))
				resp, got := e.do("POST", "/v1/messages", body, map[string]string{"X-Body-Sha256": hex.EncodeToString(sum[:])})
				if resp.StatusCode != 200 {
					failed.Add(1)
					t.Errorf("client %d request %d: %d %s", c, i, resp.StatusCode, got)
					return
				}
			}
		})
	}
	wg.Wait()
	if failed.Load() == 0 && flaky.count() == 0 {
		t.Error("the flaky channel was never tried: no failover exercised")
	}
}

// A redirect means a wrong channel URL; it is never passed on, since a
// client following it would send its own token to wherever it points.
func TestRedirectIsAChannelFailure(t *testing.T) {
	e := newTestEnv(t)
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	a.set(fakeBehavior{Redirect: "https://elsewhere.example/v1/messages"})
	ach := e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 1})
	e.addChannel(Channel{Name: "b", URL: b.URL})
	resp, body := e.post("/v1/messages", anthropicBody("m", false))
	if resp.StatusCode != 200 || b.count() != 1 || resp.Header.Get("Location") != "" {
		t.Fatalf("status %d, b hits %d, Location %q: %s", resp.StatusCode, b.count(), resp.Header.Get("Location"), body)
	}
	if st := e.health(ach.ID); st.CooldownUntil == nil || !strings.Contains(st.CooldownReason, "308") {
		t.Errorf("redirecting channel not cooled: %+v", st)
	}
	// With nothing else to try, the client gets a 503, never the redirect.
	b.set(fakeBehavior{Redirect: "https://elsewhere.example/"})
	e.app.cool.clearAll(e.app.cool.get(ach.ID))
	resp, _ = e.post("/v1/messages", anthropicBody("m", false))
	if resp.StatusCode != 503 || resp.Header.Get("Location") != "" {
		t.Errorf("all redirect: status %d Location %q; want 503 without Location", resp.StatusCode, resp.Header.Get("Location"))
	}
}

// A relay without count_tokens answers 404 there; that says nothing about
// the model or the channel's real work.
func TestCountTokens404TriesNextWithoutCooling(t *testing.T) {
	e := newTestEnv(t)
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	a.script(func(_ int, r *http.Request) fakeBehavior {
		if strings.HasSuffix(r.URL.Path, "/count_tokens") {
			return fakeBehavior{Status: 404, ErrType: "not_found_error"}
		}
		return fakeBehavior{}
	})
	ach := e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 1})
	e.addChannel(Channel{Name: "b", URL: b.URL})
	resp, _ := e.post("/v1/messages/count_tokens", `{"model":"m","messages":[]}`)
	if resp.StatusCode != 200 || b.count() != 1 {
		t.Fatalf("count_tokens: status %d, b hits %d; want 200 from b", resp.StatusCode, b.count())
	}
	if st := e.health(ach.ID); st.CooldownUntil != nil || len(st.Models) != 0 || st.Keys[0].CooldownUntil != nil {
		t.Errorf("count_tokens 404 cooled something: %+v", st)
	}
	e.post("/v1/messages", anthropicBody("m", false))
	if a.count() != 2 || b.count() != 1 {
		t.Errorf("messages went elsewhere: hits a=%d b=%d; want a=2", a.count(), b.count())
	}
	// No channel has it: the last 404 goes back as is.
	b.set(fakeBehavior{Status: 404, ErrType: "not_found_error"})
	if resp, _ := e.post("/v1/messages/count_tokens", `{"model":"m","messages":[]}`); resp.StatusCode != 404 {
		t.Errorf("none has count_tokens: status %d; want the upstream's 404", resp.StatusCode)
	}
}

// A stream that goes silent after content began ends with an error event
// once the idle timeout passes, and its channel cools.
func TestStreamIdleTimeout(t *testing.T) {
	e := newTestEnv(t)
	e.app.relay.IdleTimeout = 300 * time.Millisecond
	up := newFakeUpstream(t, "a")
	up.set(fakeBehavior{Deltas: 3, BlockDeltas: make(chan struct{})}) // the second delta never comes
	ch := e.addChannel(Channel{Name: "a", URL: up.URL})
	resp, body := e.post("/v1/messages", anthropicBody("m", true))
	if resp.StatusCode != 200 || bytes.Count(body, []byte("event: content_block_delta")) != 1 {
		t.Fatalf("status %d body:\n%s", resp.StatusCode, body)
	}
	name, data := lastEvent(body)
	if ue, ok := parseErrorDoc(data); name != "error" || !ok || !strings.Contains(ue.message, "no data from upstream for 300ms") {
		t.Errorf("stream does not end with the idle error event: %s %s", name, data)
	}
	l := e.lastLog()
	if l.Status != 502 || !strings.Contains(l.Error, "no data from upstream") {
		t.Errorf("log status %d error %q", l.Status, l.Error)
	}
	if st := e.health(ch.ID); st.CooldownUntil == nil {
		t.Errorf("stalled channel not cooled: %+v", st)
	}
}

// Review follow-ups: each case below once went wrong.

func TestLongNonErrorBodyStartingWithErrorKey(t *testing.T) {
	e := newTestEnv(t)
	payload := strings.Repeat("x", 100<<10)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"error":null,"data":"%s","usage":{"input_tokens":3,"output_tokens":4}}`, payload)
	}))
	defer up.Close()
	e.addChannel(Channel{Name: "a", URL: up.URL})
	resp, body := e.post("/v1/messages", anthropicBody("m", false))
	if resp.StatusCode != 200 || !bytes.Contains(body, []byte(payload)) || !bytes.HasSuffix(body, []byte(`"output_tokens":4}}`)) {
		t.Errorf("status %d, %d bytes; want the whole %d-byte body", resp.StatusCode, len(body), len(payload)+60)
	}
}

func TestSpacedJSONErrorIn200FailsOver(t *testing.T) {
	e := newTestEnv(t)
	bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}`)
	}))
	defer bad.Close()
	good := newFakeUpstream(t, "good")
	badCh := e.addChannel(Channel{Name: "bad", URL: bad.URL, Priority: 1})
	e.addChannel(Channel{Name: "good", URL: good.URL})
	if resp, body := e.post("/v1/messages", anthropicBody("m", false)); resp.StatusCode != 200 || good.count() != 1 {
		t.Fatalf("status %d good hits %d: %s", resp.StatusCode, good.count(), body)
	}
	if st := e.health(badCh.ID); st.CooldownUntil == nil {
		t.Errorf("channel with a 200 error not cooled: %+v", st)
	}
}

func TestHugeFirstEventIsRelayed(t *testing.T) {
	e := newTestEnv(t)
	img := strings.Repeat("A", 1200<<10) // a base64 image chunk, 1.2 MB
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprintf(w, "data: {\"candidates\":[{\"content\":{\"parts\":[{\"inlineData\":{\"data\":\"%s\"}}]}}]}\n\n", img)
	}))
	defer up.Close()
	e.addChannel(Channel{Name: "g", URL: up.URL, Type: "gemini"})
	resp, body := e.post("/v1beta/models/img:streamGenerateContent?alt=sse", `{"contents":[]}`)
	if resp.StatusCode != 200 || !bytes.Contains(body, []byte(img)) {
		t.Errorf("status %d, %d bytes; want the 1.2 MB event relayed", resp.StatusCode, len(body))
	}
}

func TestOpenAIStreamWithoutContentFailsOver(t *testing.T) {
	for _, tc := range []struct{ name, stream string }{
		{"done only", "data: [DONE]\n\n"},
		{"role then error", "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n" +
			"data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newTestEnv(t)
			bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "text/event-stream")
				io.WriteString(w, tc.stream)
			}))
			defer bad.Close()
			good := newFakeUpstream(t, "good")
			e.addChannel(Channel{Name: "bad", URL: bad.URL, Type: "openai", Priority: 1})
			e.addChannel(Channel{Name: "good", URL: good.URL, Type: "openai"})
			resp, body := e.post("/v1/chat/completions", `{"model":"gpt-x","stream":true,"messages":[]}`)
			if resp.StatusCode != 200 || good.count() != 1 || !bytes.Contains(body, []byte(`"content":"Hello"`)) {
				t.Errorf("status %d good hits %d body:\n%s", resp.StatusCode, good.count(), body)
			}
		})
	}
}

func TestRateLimitHeadersDoNotShortenOtherCooldowns(t *testing.T) {
	e := newTestEnv(t)
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	a.script(func(int, *http.Request) fakeBehavior { return fakeBehavior{Status: 401} })
	// The fake can't add headers to errors, so wrap it.
	wrapped := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Ratelimit-Reset-Requests", "20ms")
		w.Header().Set("Anthropic-Ratelimit-Requests-Reset", time.Now().Add(time.Second).UTC().Format(time.RFC3339))
		a.Config.Handler.ServeHTTP(w, r)
	}))
	defer wrapped.Close()
	ach := e.addChannel(Channel{Name: "a", URL: wrapped.URL, Priority: 1})
	e.addChannel(Channel{Name: "b", URL: b.URL})
	e.post("/v1/messages", anthropicBody("m", false))
	st := e.health(ach.ID)
	if st.Keys[0].CooldownUntil == nil || time.Until(*st.Keys[0].CooldownUntil) < 4*time.Minute {
		t.Errorf("401 key cooldown %v; want the 5-minute auth base, not the rate-limit reset", st.Keys[0].CooldownUntil)
	}
}

func TestLastErrorLoggedUnderItsChannel(t *testing.T) {
	e := newTestEnv(t)
	a := newFakeUpstream(t, "a")
	a.set(fakeBehavior{Status: 500})
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := "http://" + ln.Addr().String()
	ln.Close()
	ach := e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 1})
	e.addChannel(Channel{Name: "dead", URL: dead})
	resp, _ := e.post("/v1/messages", anthropicBody("m", false))
	l := e.lastLog()
	if resp.StatusCode != 500 || l.Status != 500 || l.ChannelID != ach.ID || !strings.HasPrefix(l.Error, "a:") || l.Attempts != 2 {
		t.Errorf("status %d; log channel %d (%s) error %q attempts %d; want a's 500 under a", resp.StatusCode, l.ChannelID, l.ChannelName, l.Error, l.Attempts)
	}
}

func TestNoTokensRefusesForwardedRequests(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	// A reverse proxy on this machine: the peer is loopback, the client not.
	resp, body := e.do("POST", "/v1/messages", anthropicBody("m", false), map[string]string{"X-Forwarded-For": "203.0.113.7"})
	if resp.StatusCode != 401 || !strings.Contains(string(body), "CCLOAD_AUTH") || up.count() != 0 {
		t.Errorf("forwarded request without tokens: %d %s", resp.StatusCode, body)
	}
	if resp, _ := e.do("GET", "/metrics", "", map[string]string{"X-Forwarded-For": "203.0.113.7"}); resp.StatusCode != 401 {
		t.Errorf("forwarded /metrics: %d; want 401", resp.StatusCode)
	}
}

func TestForwardedForTrustedFromLoopbackOnly(t *testing.T) {
	for _, tc := range []struct{ peer, want string }{
		{"127.0.0.1:5", "198.51.100.9"},
		{"10.0.0.5:5", "10.0.0.5"},
		{"203.0.113.1:5", "203.0.113.1"},
	} {
		r, _ := http.NewRequest("GET", "/", nil)
		r.RemoteAddr = tc.peer
		r.Header.Set("X-Forwarded-For", "1.2.3.4, 198.51.100.9")
		if got := clientIP(r); got != tc.want {
			t.Errorf("peer %s: clientIP %q; want %q", tc.peer, got, tc.want)
		}
	}
}

func TestCookieNotForwarded(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	e.do("POST", "/v1/messages", anthropicBody("m", false), map[string]string{"Cookie": sessionCookie + "=secret-session"})
	if c := up.requests()[0].Header.Get("Cookie"); c != "" {
		t.Errorf("cookie reached the upstream: %q", c)
	}
}

// Real APIs speak HTTP/2 over TLS. A stream relays through it, and an
// upstream that answers before reading a large body (the transport then
// closes the body from another goroutine) is race-free.
func TestHTTP2Upstream(t *testing.T) {
	e := newTestEnv(t)
	fake := newFakeUpstream(t, "inner")
	h2 := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor != 2 {
			http.Error(w, "want HTTP/2", http.StatusHTTPVersionNotSupported)
			return
		}
		if r.ContentLength > 1<<20 {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(400) // before reading the body
			io.WriteString(w, `{"type":"error","error":{"type":"invalid_request_error","message":"too long"}}`)
			return
		}
		fake.Config.Handler.ServeHTTP(w, r)
	}))
	h2.EnableHTTP2 = true
	h2.StartTLS()
	defer h2.Close()
	tr := newUpstreamTransport()
	tr.TLSClientConfig = h2.Client().Transport.(*http.Transport).TLSClientConfig.Clone()
	e.app.relay.upstream = tr
	e.addChannel(Channel{Name: "h2", URL: h2.URL})
	resp, body := e.post("/v1/messages", anthropicBody("m", true))
	if resp.StatusCode != 200 || !bytes.Contains(body, []byte("event: message_stop")) {
		t.Fatalf("h2 stream: %d\n%s", resp.StatusCode, body)
	}
	big := `{"model":"m","system":"` + strings.Repeat("y", 3<<20) + `","messages":[]}`
	for range 5 {
		if resp, body := e.post("/v1/messages", big); resp.StatusCode != 400 {
			t.Errorf("early 400 over h2: %d %s", resp.StatusCode, body)
		}
	}
}

// An error event after content began is judged like any failure: a
// not_found_error cools the model on that channel, not the whole channel.
func TestMidStreamNotFoundCoolsTheModel(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	up.set(fakeBehavior{Deltas: 3, CutAfter: 1, MidStreamError: true, ErrType: "not_found_error"})
	ch := e.addChannel(Channel{Name: "a", URL: up.URL})
	resp, body := e.post("/v1/messages", anthropicBody("claude-x", true))
	if resp.StatusCode != 200 || !strings.Contains(string(body), "not_found_error") {
		t.Fatalf("status %d body %s", resp.StatusCode, body)
	}
	st := e.health(ch.ID)
	if st.CooldownUntil != nil || len(st.Models) != 1 || st.Models[0].Model != "claude-x" {
		t.Errorf("state %+v; want only the model cooling", st)
	}
	if row := e.lastLog(); row.Status != 404 || !strings.Contains(row.Error, "error event mid-stream") {
		t.Errorf("log row status %d error %q", row.Status, row.Error)
	}
}

// A 200 that carries a 404 on count_tokens is what a 404 there is: a relay
// without the endpoint. It cools nothing and the next channel answers.
func TestCountTokens200Carrying404CoolsNothing(t *testing.T) {
	e := newTestEnv(t)
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	a.set(fakeBehavior{ErrorIn200: true, ErrType: "not_found_error"})
	ach := e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 1})
	e.addChannel(Channel{Name: "b", URL: b.URL})
	resp, body := e.post("/v1/messages/count_tokens", `{"model":"m","messages":[]}`)
	if resp.StatusCode != 200 || b.count() != 1 || !strings.Contains(string(body), "input_tokens") {
		t.Fatalf("status %d, b hits %d, body %s; want 200 from b", resp.StatusCode, b.count(), body)
	}
	if st := e.health(ach.ID); st.CooldownUntil != nil || len(st.Models) != 0 || st.Keys[0].CooldownUntil != nil {
		t.Errorf("cooled something: %+v", st)
	}
}

// A client that hangs up once the terminal event reached it (Codex does, at
// response.completed) got the whole answer: the row says 200, with usage,
// and nothing cools, even though the upstream had not ended its body yet.
func TestHangUpAfterTheEndIsNotA499(t *testing.T) {
	for _, tc := range []struct{ path, body, end string }{
		{"/v1/messages", anthropicBody("m", true), "message_stop"},
		{"/v1/responses", `{"model":"m","stream":true,"input":"hi"}`, "response.completed"},
	} {
		t.Run(tc.end, func(t *testing.T) {
			e := newTestEnv(t)
			up := newFakeUpstream(t, "a")
			up.set(fakeBehavior{HoldEnd: true})
			typ := "anthropic"
			if strings.HasPrefix(tc.path, "/v1/responses") {
				typ = "openai"
			}
			ch := e.addChannel(Channel{Name: "a", URL: up.URL, Type: typ})
			req, _ := http.NewRequest("POST", e.URL+tc.path, strings.NewReader(tc.body))
			req.Header.Set("Content-Type", "application/json")
			resp, err := e.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			br := bufio.NewReader(resp.Body)
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					t.Fatalf("stream ended before %s: %v", tc.end, err)
				}
				if strings.Contains(line, tc.end) && strings.HasPrefix(line, "data:") {
					break
				}
			}
			resp.Body.Close() // hang up, as Codex does
			row := e.lastLog()
			if row.Status != 200 || row.OutputTokens == 0 || row.Error != "" {
				t.Errorf("row status %d output %d error %q; want 200 with usage", row.Status, row.OutputTokens, row.Error)
			}
			if st := e.health(ch.ID); st.CooldownUntil != nil {
				t.Errorf("the channel cooled: %+v", st)
			}
		})
	}
}

// testClock is a time source for a whole ccload, safe to read from its
// request goroutines while the test moves it.
type testClock struct{ ns atomic.Int64 }

func (c *testClock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *testClock) advance(d time.Duration) { c.ns.Add(int64(d)) }

// When a failed channel's cooldown runs out, one request tries it; the
// requests beside it go elsewhere instead of all hitting a channel that may
// still be dead, and try it only if nothing else serves.
func TestExpiredCooldownTriedByOneRequestAtATime(t *testing.T) {
	e := newTestEnv(t)
	clk := &testClock{}
	clk.ns.Store(time.Now().UnixNano())
	e.app.cool.now, e.app.relay.Now = clk.now, clk.now
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	a.script(func(n int, _ *http.Request) fakeBehavior {
		switch n {
		case 1:
			return fakeBehavior{Status: 500}
		case 2:
			return fakeBehavior{StallHeaders: true} // the trial, held open
		}
		return fakeBehavior{}
	})
	e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 10})
	e.addChannel(Channel{Name: "b", URL: b.URL})
	if resp, _ := e.post("/v1/messages", anthropicBody("m", false)); resp.StatusCode != 200 || b.count() != 1 {
		t.Fatalf("status %d, b hits %d; want a's 500 to fail over to b", resp.StatusCode, b.count())
	}
	clk.advance(31 * time.Second) // a's 30 s cooldown has run out

	trial := make(chan int, 1)
	go func() {
		resp, _ := e.post("/v1/messages", anthropicBody("m", false))
		trial <- resp.StatusCode
	}()
	for a.count() < 2 { // the trial request has reached a
		select {
		case <-trial:
			t.Fatal("the trial request ended before reaching a")
		case <-time.After(time.Millisecond):
		}
	}
	if resp, _ := e.post("/v1/messages", anthropicBody("m", false)); resp.StatusCode != 200 || a.count() != 2 || b.count() != 2 {
		t.Fatalf("beside a trial: status %d, hits a=%d b=%d; want 200 from b, a untouched", resp.StatusCode, a.count(), b.count())
	}
	// b fails too: a, put last, is still tried, and serves.
	b.set(fakeBehavior{Status: 500})
	if resp, body := e.post("/v1/messages", anthropicBody("m", false)); resp.StatusCode != 200 || a.count() != 3 {
		t.Fatalf("status %d (%s), a hits %d; want a tried after b failed", resp.StatusCode, body, a.count())
	}
	// Released, the held trial answers nothing usable and fails over to b,
	// which has recovered.
	b.set(fakeBehavior{})
	a.releaseAll()
	if got := <-trial; got != 200 {
		t.Errorf("the trial request: status %d", got)
	}
	served := map[string]int{}
	for _, l := range e.logs() {
		served[l.ChannelName]++
	}
	if served["a"] != 1 || served["b"] != 3 {
		t.Errorf("log rows by channel %v; want a 1 (the last try), b 3", served)
	}
}

// Every attempt goes to its channel's base path plus the client's path: the
// first attempt's rewrite once leaked into the next key's and channel's
// (/relay/relay/v1/messages, /other/relay/v1/messages).
func TestRetriesKeepEachChannelsBasePath(t *testing.T) {
	e := newTestEnv(t)
	bad, good := newFakeUpstream(t, "bad"), newFakeUpstream(t, "good")
	bad.set(fakeBehavior{Status: 401})
	e.addChannel(Channel{Name: "a", URL: bad.URL + "/relay", APIKeys: []string{"k0-0000000", "k1-1111111"}, Priority: 10})
	e.addChannel(Channel{Name: "b", URL: good.URL + "/other", Priority: 1})
	if resp, body := e.post("/v1/messages", anthropicBody("m", false)); resp.StatusCode != 200 {
		t.Fatalf("status %d %s", resp.StatusCode, body)
	}
	var paths []string
	for _, r := range append(bad.requests(), good.requests()...) {
		paths = append(paths, r.Path)
	}
	if want := []string{"/relay/v1/messages", "/relay/v1/messages", "/other/v1/messages"}; !slices.Equal(paths, want) {
		t.Errorf("upstream paths %q; want %q", paths, want)
	}
}
