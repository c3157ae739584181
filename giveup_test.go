package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"strings"
	"testing"
	"time"
)

// deadURL is an address where nothing listens: connections are refused at
// once, as from a channel whose server is down.
func deadURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := "http://" + ln.Addr().String()
	ln.Close()
	return u
}

// errorMessage reads the message of an Anthropic error body.
func errorMessage(t *testing.T, body []byte) (typ, msg string) {
	t.Helper()
	var v struct {
		Type  string
		Error struct{ Type, Message string }
	}
	if err := json.Unmarshal(body, &v); err != nil || v.Type != "error" {
		t.Fatalf("not an Anthropic error body: %s", body)
	}
	return v.Error.Type, v.Error.Message
}

// TestGiveUpTellsSDKsWhetherToRetry: when no channel can serve, the answer
// comes at once and says whether retrying helps. An SDK obeys Retry-After
// up to a minute and x-should-retry always; before, every dead channel
// answered Retry-After: 30, then 60, 120…, and a default SDK waited 90 s
// for an error ccload knew at once.
func TestGiveUpTellsSDKsWhetherToRetry(t *testing.T) {
	dead := deadURL(t)

	t.Run("all dead", func(t *testing.T) {
		e := newTestEnv(t)
		e.addChannel(Channel{Name: "d1", URL: dead})
		e.addChannel(Channel{Name: "d2", URL: dead})
		for i, want := range []string{"2 of 2 channels tried", "1 of 2 channels tried"} {
			start := time.Now()
			resp, body := e.post("/v1/messages", anthropicBody("claude-dead", false))
			took := time.Since(start)
			typ, msg := errorMessage(t, body)
			if resp.StatusCode != 503 || typ != "api_error" {
				t.Fatalf("request %d: %d %s; want 503 api_error", i+1, resp.StatusCode, typ)
			}
			if h := resp.Header; h.Get("X-Should-Retry") != "false" || h.Get("Retry-After") != "" {
				t.Errorf("request %d: x-should-retry %q, Retry-After %q; want false and none",
					i+1, h.Get("X-Should-Retry"), h.Get("Retry-After"))
			}
			for _, part := range []string{`"claude-dead"`, want, "the first frees in"} {
				if !strings.Contains(msg, part) {
					t.Errorf("request %d: message %q lacks %q", i+1, msg, part)
				}
			}
			if took > 2*time.Second {
				t.Errorf("request %d took %s; dead channels answer at once", i+1, took)
			}
		}
	})

	t.Run("all cooling, one frees in 2s", func(t *testing.T) {
		e := newTestEnv(t)
		a := e.addChannel(Channel{Name: "a", URL: dead})
		b := e.addChannel(Channel{Name: "b", URL: dead})
		e.app.cool.fail(e.app.cool.get(a.ID), -1, "", verdict{scope: scopeChannel, wait: time.Second, status: 503, reason: "503"})
		e.app.cool.fail(e.app.cool.get(b.ID), -1, "", verdict{scope: scopeChannel, wait: 2 * time.Second, status: 503, reason: "503"})
		// a frees first: it is tried once, fails, and cools longer; b frees
		// within the window, so a retry in 2 s can reach it.
		resp, body := e.post("/v1/messages", anthropicBody("m", false))
		_, msg := errorMessage(t, body)
		if resp.StatusCode != 503 || resp.Header.Get("Retry-After") != "2" || resp.Header.Get("X-Should-Retry") != "" {
			t.Errorf("first: %d Retry-After %q x-should-retry %q; want 503, 2, none (%s)",
				resp.StatusCode, resp.Header.Get("Retry-After"), resp.Header.Get("X-Should-Retry"), msg)
		}
		if !strings.Contains(msg, "1 of 2 channels tried, the first frees in 2s") {
			t.Errorf("first: message %q", msg)
		}
		// At once again: b is now the one that frees first; it is tried
		// too, and then nothing frees soon.
		resp, body = e.post("/v1/messages", anthropicBody("m", false))
		_, msg = errorMessage(t, body)
		if resp.StatusCode != 503 || resp.Header.Get("X-Should-Retry") != "false" || resp.Header.Get("Retry-After") != "" {
			t.Errorf("second: %d Retry-After %q x-should-retry %q; want 503, none, false (%s)",
				resp.StatusCode, resp.Header.Get("Retry-After"), resp.Header.Get("X-Should-Retry"), msg)
		}
		rows := e.logs()
		if len(rows) != 2 || rows[0].ChannelName != "a" || rows[1].ChannelName != "b" {
			t.Errorf("log rows %+v; want a tried, then b", rows)
		}
	})

	t.Run("one frees in 10 min", func(t *testing.T) {
		e := newTestEnv(t)
		up := newFakeUpstream(t, "limited")
		up.set(fakeBehavior{Status: 429, RetryAfter: "600"})
		e.addChannel(Channel{Name: "only", URL: up.URL})
		// The upstream answers, so its answer goes back as is, with its own
		// Retry-After: the upstream's promise, not ccload's guess.
		resp, _ := e.post("/v1/messages", anthropicBody("m", false))
		if resp.StatusCode != 429 || resp.Header.Get("Retry-After") != "600" {
			t.Fatalf("first: %d Retry-After %q; want the upstream's 429 with 600", resp.StatusCode, resp.Header.Get("Retry-After"))
		}
		// Now its key cools for 10 min. The next request still tries it
		// once (it is the one that frees first) and relays the same answer.
		resp, _ = e.post("/v1/messages", anthropicBody("m", false))
		if resp.StatusCode != 429 || up.count() != 2 {
			t.Errorf("second: %d after %d upstream hits; want 429 after 2", resp.StatusCode, up.count())
		}
		// Without an upstream Retry-After, ccload says what it knows.
		up.set(fakeBehavior{Status: 529})
		resp, _ = e.post("/v1/messages", anthropicBody("m", false))
		if resp.StatusCode != 529 || resp.Header.Get("X-Should-Retry") != "false" || resp.Header.Get("Retry-After") != "" {
			t.Errorf("529 relayed: %d x-should-retry %q Retry-After %q; want 529, false, none",
				resp.StatusCode, resp.Header.Get("X-Should-Retry"), resp.Header.Get("Retry-After"))
		}
	})
}

func TestAdviseRetry(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, tc := range []struct {
		free        time.Duration // from now; 0: nothing cooling
		retryAfter  string
		shouldRetry string
	}{
		{0, "", ""},
		{-time.Second, "1", ""},
		{300 * time.Millisecond, "1", ""},
		{2 * time.Second, "2", ""},
		{2*time.Second + time.Millisecond, "3", ""},
		{retryWindow, "5", ""},
		{retryWindow + time.Millisecond, "", "false"},
		{30 * time.Second, "", "false"},
		{10 * time.Minute, "", "false"},
	} {
		h := http.Header{"Retry-After": {"99"}, "Retry-After-Ms": {"99000"}}
		var free int64
		if tc.free != 0 {
			free = now.Add(tc.free).UnixNano()
		} else {
			h = http.Header{}
		}
		adviseRetry(h, free, now)
		if h.Get("Retry-After") != tc.retryAfter || h.Get("X-Should-Retry") != tc.shouldRetry {
			t.Errorf("frees in %s: Retry-After %q x-should-retry %q; want %q, %q",
				tc.free, h.Get("Retry-After"), h.Get("X-Should-Retry"), tc.retryAfter, tc.shouldRetry)
		}
		if tc.shouldRetry == "false" && h.Get("Retry-After-Ms") != "" {
			t.Errorf("frees in %s: a long retry-after-ms survived", tc.free)
		}
	}
}

// TestErrorKinds is the table of README "Errors": each status ccload
// answers with itself, in each protocol's words, row by row.
func TestErrorKinds(t *testing.T) {
	rows := []struct {
		status                            int
		anthropic, openAIType, openAICode string
		gemini                            string
	}{
		{400, "invalid_request_error", "invalid_request_error", "", "INVALID_ARGUMENT"},
		{401, "authentication_error", "invalid_request_error", "invalid_api_key", "UNAUTHENTICATED"},
		{402, "billing_error", "insufficient_quota", "insufficient_quota", "FAILED_PRECONDITION"},
		{403, "permission_error", "invalid_request_error", "permission_denied", "PERMISSION_DENIED"},
		{404, "not_found_error", "invalid_request_error", "model_not_found", "NOT_FOUND"},
		{408, "invalid_request_error", "invalid_request_error", "request_timeout", "DEADLINE_EXCEEDED"},
		{409, "invalid_request_error", "invalid_request_error", "", "INVALID_ARGUMENT"},
		{413, "request_too_large", "invalid_request_error", "request_too_large", "INVALID_ARGUMENT"},
		{422, "invalid_request_error", "invalid_request_error", "", "INVALID_ARGUMENT"},
		{429, "rate_limit_error", "requests", "rate_limit_exceeded", "RESOURCE_EXHAUSTED"},
		{500, "api_error", "server_error", "", "INTERNAL"},
		{501, "api_error", "server_error", "", "INTERNAL"},
		{502, "api_error", "server_error", "bad_gateway", "UNAVAILABLE"},
		{503, "api_error", "server_error", "service_unavailable", "UNAVAILABLE"},
		{504, "api_error", "server_error", "timeout", "DEADLINE_EXCEEDED"},
		{529, "overloaded_error", "server_error", "server_is_overloaded", "UNAVAILABLE"},
	}
	for _, r := range rows {
		var a struct {
			Type  string
			Error struct{ Type, Message string }
		}
		json.Unmarshal(errorBody(protoAnthropic, r.status, "m"), &a)
		if a.Type != "error" || a.Error.Type != r.anthropic || a.Error.Message != "m" {
			t.Errorf("anthropic %d: %+v; want type %s", r.status, a, r.anthropic)
		}
		var o struct {
			Error struct {
				Message, Type string
				Code          *string
				Param         *string
			}
		}
		json.Unmarshal(errorBody(protoOpenAI, r.status, "m"), &o)
		code := ""
		if o.Error.Code != nil {
			code = *o.Error.Code
		}
		if o.Error.Type != r.openAIType || code != r.openAICode || o.Error.Message != "m" {
			t.Errorf("openai %d: %+v (code %q); want %s/%q", r.status, o, code, r.openAIType, r.openAICode)
		}
		var g struct {
			Error struct {
				Code            int
				Message, Status string
			}
		}
		json.Unmarshal(errorBody(protoGemini, r.status, "m"), &g)
		if g.Error.Code != r.status || g.Error.Status != r.gemini || g.Error.Message != "m" {
			t.Errorf("gemini %d: %+v; want %s", r.status, g, r.gemini)
		}
	}
}

// TestOwnErrorsFollowTheTable: the errors ccload writes itself carry the
// type of their status, so that `except anthropic.NotFoundError` and the
// like catch them.
func TestOwnErrorsFollowTheTable(t *testing.T) {
	e := newTestEnv(t, func(c *config) { c.AuthTokens = []string{"good-token"}; c.MaxBody = 1024 })
	e.addChannel(Channel{Name: "a", URL: deadURL(t), Models: []string{"served"}})
	auth := map[string]string{"Anthropic-Version": "2023-06-01", "X-Api-Key": "good-token"}
	for _, tc := range []struct {
		name, body string
		hdr        map[string]string
		status     int
	}{
		{"no token", anthropicBody("served", false), map[string]string{"Anthropic-Version": "2023-06-01"}, 401},
		{"bad JSON", `{"model":`, auth, 400},
		{"no model", `{"messages":[]}`, auth, 400},
		{"no channel serves it", anthropicBody("unserved", false), auth, 404},
		{"too large", `{"model":"served","x":"` + strings.Repeat("a", 2000) + `"}`, auth, 413},
		{"every channel down", anthropicBody("served", false), auth, 503},
	} {
		resp, body := e.do("POST", "/v1/messages", tc.body, tc.hdr)
		typ, _ := errorMessage(t, body)
		if resp.StatusCode != tc.status || typ != anthropicErrorType(tc.status) {
			t.Errorf("%s: %d %s; want %d %s", tc.name, resp.StatusCode, typ, tc.status, anthropicErrorType(tc.status))
		}
	}
}

// TestUpstreamHeadersHidden: what names or tracks the upstream (its server,
// its cookies, its load balancer, its account) stays behind; request ids,
// rate-limit headers and Retry-After pass, on a success and on an error
// passed on as is.
func TestUpstreamHeadersHidden(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	hdr := http.Header{
		"Server": {"cloudflare"}, "Set-Cookie": {"__cf_bm=abc; path=/"}, "Alt-Svc": {`h3=":443"`},
		"Via": {"1.1 vegur"}, "Cf-Ray": {"8f00-SJC"}, "Cf-Cache-Status": {"DYNAMIC"},
		"X-Amz-Cf-Id": {"abc"}, "X-Envoy-Upstream-Service-Time": {"12"}, "Openai-Organization": {"reseller-org"},
		"Anthropic-Organization-Id": {"org-uuid"}, "X-Powered-By": {"Express"}, "Nel": {"{}"}, "Report-To": {"{}"},
		"Request-Id": {"req_123"}, "X-Request-Id": {"xr_1"}, "Anthropic-Ratelimit-Requests-Remaining": {"99"},
		"X-Ratelimit-Remaining-Tokens": {"1000"}, "Openai-Processing-Ms": {"40"},
	}
	hidden := []string{"Server", "Set-Cookie", "Alt-Svc", "Via", "Cf-Ray", "Cf-Cache-Status", "X-Amz-Cf-Id",
		"X-Envoy-Upstream-Service-Time", "Openai-Organization", "Anthropic-Organization-Id", "X-Powered-By", "Nel", "Report-To"}
	passed := []string{"Request-Id", "X-Request-Id", "Anthropic-Ratelimit-Requests-Remaining", "X-Ratelimit-Remaining-Tokens", "Openai-Processing-Ms"}
	e.addChannel(Channel{Name: "a", URL: up.URL})
	check := func(what string, resp *http.Response) {
		t.Helper()
		for _, k := range hidden {
			if v := resp.Header.Values(k); len(v) > 0 {
				t.Errorf("%s: %s: %q reached the client", what, k, v)
			}
		}
		for _, k := range passed {
			if resp.Header.Get(k) != hdr.Get(k) {
				t.Errorf("%s: %s = %q; want %q", what, k, resp.Header.Get(k), hdr.Get(k))
			}
		}
	}
	up.set(fakeBehavior{Headers: hdr})
	resp, _ := e.post("/v1/messages", anthropicBody("m", false))
	check("JSON answer", resp)
	resp, _ = e.post("/v1/messages", anthropicBody("m", true))
	check("stream", resp)
	up.set(fakeBehavior{Headers: hdr, Status: 400})
	resp, _ = e.post("/v1/messages", anthropicBody("m", false))
	check("client error", resp)
	up.set(fakeBehavior{Headers: hdr, Status: 529, RetryAfter: "3"})
	resp, _ = e.post("/v1/messages", anthropicBody("m", false))
	check("last error", resp)
	if resp.StatusCode != 529 || resp.Header.Get("Retry-After") != "3" {
		t.Errorf("last error: %d Retry-After %q; want 529 and the upstream's 3", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
}

// An upstream's 1xx answers are not relayed: ReverseProxy would pass them
// on at once with the upstream's own headers, past hideUpstreamHeaders, and
// from a channel that then fails over.
func TestUpstream1xxNotRelayed(t *testing.T) {
	e := newTestEnv(t)
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	a.set(fakeBehavior{Status: 500, EarlyHints: http.Header{"Cf-Ray": {"8f00-SJC"}, "Server": {"secret-reseller"}, "Link": {"</x>; rel=preload"}}})
	e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 1})
	e.addChannel(Channel{Name: "b", URL: b.URL})
	var got []int
	ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
		Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
			got = append(got, code)
			return nil
		},
	})
	req, _ := http.NewRequestWithContext(ctx, "POST", e.URL+"/v1/messages", strings.NewReader(anthropicBody("m", false)))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || a.count() != 1 || b.count() != 1 {
		t.Fatalf("status %d, hits a=%d b=%d; want b's 200 after a's 500", resp.StatusCode, a.count(), b.count())
	}
	if len(got) != 0 {
		t.Errorf("the client got 1xx answers %v from the channel that failed", got)
	}
}
