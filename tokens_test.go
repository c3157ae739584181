package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// createToken makes a managed token through the admin API and returns its
// view, secret included.
func (e *testEnv) createToken(session, body string) tokenView {
	e.t.Helper()
	st, b := e.admin(session, "POST", "/admin/tokens", body)
	if st != http.StatusCreated {
		e.t.Fatalf("create token %s: %d %s", body, st, b)
	}
	var v tokenView
	if err := json.Unmarshal(b, &v); err != nil || v.Token == "" || v.ID == 0 {
		e.t.Fatalf("create token: %s (%v)", b, err)
	}
	return v
}

func (e *testEnv) tokenUsage(session string, id int64) tokenUsage {
	e.t.Helper()
	st, b := e.admin(session, "GET", "/admin/tokens/"+strconv.FormatInt(id, 10), "")
	if st != 200 {
		e.t.Fatalf("get token %d: %d %s", id, st, b)
	}
	var v tokenView
	json.Unmarshal(b, &v)
	return v.Usage
}

// call sends a request of protocol p with the client token tok.
func (e *testEnv) call(p protocol, model, tok string) (*http.Response, []byte) {
	e.t.Helper()
	hdr := map[string]string{"Authorization": "Bearer " + tok}
	switch p {
	case protoOpenAI:
		return e.do("POST", "/v1/chat/completions", `{"model":"`+model+`","messages":[{"role":"user","content":"hi"}]}`, hdr)
	case protoGemini:
		return e.do("POST", "/v1beta/models/"+model+":generateContent", `{"contents":[]}`, hdr)
	}
	hdr["Anthropic-Version"] = "2023-06-01"
	return e.do("POST", "/v1/messages", anthropicBody(model, false), hdr)
}

// protocolError reads an error body of p's shape: its message and type
// (Anthropic's error.type, OpenAI's error.type, Gemini's error.status).
func protocolError(t *testing.T, p protocol, body []byte) (msg, typ string) {
	t.Helper()
	var d struct {
		Type  string
		Error struct{ Message, Type, Status string }
	}
	if err := json.Unmarshal(body, &d); err != nil {
		t.Fatalf("not JSON: %s", body)
	}
	switch p {
	case protoAnthropic:
		if d.Type != "error" {
			t.Errorf("not Anthropic's shape: %s", body)
		}
		return d.Error.Message, d.Error.Type
	case protoGemini:
		return d.Error.Message, d.Error.Status
	}
	return d.Error.Message, d.Error.Type
}

func TestTokenRefusalsNeverReachUpstream(t *testing.T) {
	e := newTestEnv(t)
	ups := map[protocol]*fakeUpstream{}
	for _, p := range []protocol{protoAnthropic, protoOpenAI, protoGemini} {
		ups[p] = newFakeUpstream(t, p.String())
		e.addChannel(Channel{Name: p.String(), URL: ups[p].URL, Type: p.String()})
	}
	s := e.login()
	allowed := e.createToken(s, `{"name":"alice","models":["good"]}`)
	disabled := e.createToken(s, `{"name":"bob","enabled":false}`)
	expired := e.createToken(s, `{"name":"carol","expires_at":"2020-01-01T00:00:00Z"}`)
	rpm := e.createToken(s, `{"name":"dave","limits":{"rpm":1}}`)

	wantType := map[protocol]map[int]string{
		protoAnthropic: {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"},
		protoOpenAI:    {401: "invalid_request_error", 403: "invalid_request_error", 429: "requests"},
		protoGemini:    {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED"},
	}
	for _, p := range []protocol{protoAnthropic, protoOpenAI, protoGemini} {
		for _, tc := range []struct {
			name, tok, model string
			status           int
			msg              string
		}{
			{"unknown", "sk-ccl-nobody", "good", 401, "invalid client token"},
			{"disabled", disabled.Token, "good", 401, `"bob" is disabled`},
			{"expired", expired.Token, "good", 401, `"carol" expired at 2020-01-01T00:00:00Z`},
			{"model not allowed", allowed.Token, "other", 403, `may not use model "other"`},
		} {
			resp, body := e.call(p, tc.model, tc.tok)
			msg, typ := protocolError(t, p, body)
			if resp.StatusCode != tc.status || !strings.Contains(msg, tc.msg) || typ != wantType[p][tc.status] {
				t.Errorf("%s %s: %d %s; want %d %s naming %q", p, tc.name, resp.StatusCode, body, tc.status, wantType[p][tc.status], tc.msg)
			}
		}
		// The allowed model passes; then the rpm token's second request in
		// the minute is refused with when it resets.
		if resp, body := e.call(p, "good", allowed.Token); resp.StatusCode != 200 {
			t.Errorf("%s allowed model: %d %s", p, resp.StatusCode, body)
		}
	}
	if resp, body := e.call(protoAnthropic, "good", rpm.Token); resp.StatusCode != 200 {
		t.Fatalf("rpm first request: %d %s", resp.StatusCode, body)
	}
	before := ups[protoAnthropic].count()
	for _, p := range []protocol{protoAnthropic, protoOpenAI, protoGemini} {
		resp, body := e.call(p, "good", rpm.Token)
		msg, typ := protocolError(t, p, body)
		ra, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
		if resp.StatusCode != 429 || typ != wantType[p][429] || !strings.Contains(msg, "rpm limit") ||
			!strings.Contains(msg, "resets at") || ra < 1 || ra > 60 || resp.Header.Get("X-Ccload-Limit") != "rpm" {
			t.Errorf("%s over rpm: %d %s Retry-After %q; want 429 naming rpm and its reset", p, resp.StatusCode, body, resp.Header.Get("Retry-After"))
		}
	}
	for p, up := range ups {
		want := 1
		if p == protoAnthropic {
			want = before
		}
		if up.count() != want {
			t.Errorf("%s upstream got %d requests; want %d (refusals must not reach it)", p, up.count(), want)
		}
	}
	// Every refusal is logged under its token.
	var refused int
	for _, l := range e.logs() {
		if l.Status == 429 && l.TokenID == rpm.ID && l.Token == "dave" {
			refused++
		}
	}
	if refused != 3 {
		t.Errorf("logged %d rpm refusals for dave; want 3", refused)
	}
}

func TestTokenRevocationTakesEffectNextRequest(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	s := e.login()
	v := e.createToken(s, `{"name":"alice"}`)
	// Another token stays: with none left the proxy is back in open mode
	// (loopback clients only), as on a fresh install.
	e.createToken(s, `{"name":"bob"}`)
	if resp, b := e.call(protoAnthropic, "m", v.Token); resp.StatusCode != 200 {
		t.Fatalf("fresh token: %d %s", resp.StatusCode, b)
	}
	if st, b := e.admin(s, "PUT", fmt.Sprintf("/admin/tokens/%d", v.ID), `{"enabled":false}`); st != 200 {
		t.Fatalf("disable: %d %s", st, b)
	}
	if resp, _ := e.call(protoAnthropic, "m", v.Token); resp.StatusCode != 401 {
		t.Errorf("after disabling: %d; want 401", resp.StatusCode)
	}
	e.admin(s, "PUT", fmt.Sprintf("/admin/tokens/%d", v.ID), `{"enabled":true}`)
	if resp, _ := e.call(protoAnthropic, "m", v.Token); resp.StatusCode != 200 {
		t.Errorf("after enabling again: %d; want 200", resp.StatusCode)
	}
	if st, b := e.admin(s, "DELETE", fmt.Sprintf("/admin/tokens/%d", v.ID), ""); st != 200 {
		t.Fatalf("delete: %d %s", st, b)
	}
	if resp, _ := e.call(protoAnthropic, "m", v.Token); resp.StatusCode != 401 {
		t.Errorf("after deleting: %d; want 401", resp.StatusCode)
	}
	if up.count() != 2 {
		t.Errorf("upstream got %d; want 2", up.count())
	}
}

func TestTokenSecretShownOnceAndStoredHashed(t *testing.T) {
	e := newTestEnv(t, func(c *config) { c.AuthTokens = []string{"ops:env-secret"} })
	s := e.login()
	v := e.createToken(s, `{"name":"alice","limits":{"daily_usd":5}}`)
	if !strings.HasPrefix(v.Token, "sk-ccl-") || len(v.Token) < 40 {
		t.Errorf("token %q: want sk-ccl- and 32 random bytes", v.Token)
	}
	_, list := e.admin(s, "GET", "/admin/tokens", "")
	if strings.Contains(string(list), v.Token) || strings.Contains(string(list), "env-secret") {
		t.Errorf("list reveals a secret: %s", list)
	}
	var views []tokenView
	json.Unmarshal(list, &views)
	if len(views) != 2 || views[0].Source != "env" || views[0].Name != "ops" || views[1].Source != "db" ||
		views[1].Limits.DailyUSD == nil || *views[1].Limits.DailyUSD != 5 {
		t.Errorf("list %s; want the env token read-only, then alice with her limit", list)
	}
	var stored string
	e.app.store.rdb.QueryRow(`SELECT token_hash FROM tokens WHERE id = ?`, v.ID).Scan(&stored)
	if stored != tokenHash(v.Token) {
		t.Errorf("stored %q; want the SHA-256 of the token", stored)
	}
	// Both kinds of token pass the proxy.
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	for _, tok := range []string{"env-secret", v.Token} {
		if resp, b := e.call(protoAnthropic, "m", tok); resp.StatusCode != 200 {
			t.Errorf("token %q: %d %s", tok[:4], resp.StatusCode, b)
		}
	}
	if st, _ := e.admin(s, "POST", "/admin/tokens", `{"name":"OPS"}`); st != 409 {
		t.Errorf("a name taken by CCLOAD_AUTH: %d; want 409", st)
	}
}

func TestTokenBadInputChangesNothing(t *testing.T) {
	e := newTestEnv(t)
	s := e.login()
	v := e.createToken(s, `{"name":"alice","limits":{"rpm":10}}`)
	for _, tc := range []struct{ method, path, body, want string }{
		{"POST", "/admin/tokens", `{"name":"x","limits":{"daily_usd":-1}}`, "daily_usd must be a number of dollars ≥ 0"},
		{"POST", "/admin/tokens", `{"name":"x","limits":{"weekly_usd":1}}`, `unknown limit "weekly_usd"`},
		{"POST", "/admin/tokens", `{"name":"x","colour":"red"}`, `unknown field "colour"`},
		{"POST", "/admin/tokens", `{"name":"x","limits":{"rpm":0}}`, "limits.rpm must be a whole number ≥ 1"},
		{"POST", "/admin/tokens", `{"name":"x","expires_at":"tomorrow"}`, "expires_at"},
		{"POST", "/admin/tokens", `{"limits":{}}`, "name is required"},
		{"PUT", fmt.Sprintf("/admin/tokens/%d", v.ID), `{"limits":{"rpm":-5}}`, "limits.rpm"},
		{"PUT", fmt.Sprintf("/admin/tokens/%d", v.ID), `{"limits":{"concurrency":"two"}}`, "limits.concurrency"},
	} {
		st, b := e.admin(s, tc.method, tc.path, tc.body)
		if st != 400 || !strings.Contains(errorOf(t, b), tc.want) {
			t.Errorf("%s %s: %d %s; want 400 saying %q", tc.method, tc.body, st, b, tc.want)
		}
	}
	big := `{"name":"` + strings.Repeat("x", 10<<20) + `"}`
	if st, b := e.admin(s, "PUT", fmt.Sprintf("/admin/tokens/%d", v.ID), big); st != 413 {
		t.Errorf("10 MB PUT: %d %s; want 413", st, b)
	}
	_, list := e.admin(s, "GET", "/admin/tokens", "")
	var views []tokenView
	json.Unmarshal(list, &views)
	if len(views) != 1 || views[0].Name != "alice" || views[0].Limits.RPM == nil || *views[0].Limits.RPM != 10 {
		t.Errorf("after bad input: %s; want alice unchanged", list)
	}
}

// TestConcurrencySlotReleased: however a request ends, its slot comes back.
func TestConcurrencySlotReleased(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	s := e.login()
	v := e.createToken(s, `{"name":"solo","limits":{"concurrency":1}}`)
	streamReq := func(ctx context.Context) *http.Response {
		req, _ := http.NewRequestWithContext(ctx, "POST", e.URL+"/v1/messages", strings.NewReader(anthropicBody("m", true)))
		req.Header.Set("Authorization", "Bearer "+v.Token)
		resp, err := e.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	slotFree := func(what string) {
		t.Helper()
		e.settle()
		if u := e.tokenUsage(s, v.ID); u.InFlight != 0 {
			t.Fatalf("after %s: in_flight %d; want 0", what, u.InFlight)
		}
		if resp, b := e.call(protoAnthropic, "m", v.Token); resp.StatusCode != 200 {
			t.Fatalf("after %s: next request %d %s; want 200", what, resp.StatusCode, b)
		}
	}

	// While one stream runs, a second request is refused.
	gate := make(chan struct{})
	up.set(fakeBehavior{Deltas: 3, BlockDeltas: gate})
	ctx, cancel := context.WithCancel(context.Background())
	resp := streamReq(ctx)
	br := bufio.NewReader(resp.Body)
	for !strings.HasPrefix(readEvent(t, br), "event: content_block_delta") {
	}
	r2, b2 := e.call(protoAnthropic, "m", v.Token)
	if r2.StatusCode != 429 || !strings.Contains(string(b2), "concurrency limit") || r2.Header.Get("Retry-After") == "" {
		t.Errorf("second at once: %d %s; want 429 naming concurrency", r2.StatusCode, b2)
	}
	// The client goes away mid-stream.
	cancel()
	resp.Body.Close()
	<-up.ended
	up.set(fakeBehavior{})
	slotFree("a client abort")

	// The upstream cuts the stream.
	up.set(fakeBehavior{Deltas: 5, CutAfter: 1})
	resp = streamReq(context.Background())
	resp.Body.Close()
	up.set(fakeBehavior{})
	slotFree("an upstream cut")

	// A handler panics while writing the answer.
	req := httptest.NewRequest("POST", "/v1/messages", strings.NewReader(anthropicBody("m", false)))
	req.Header.Set("Authorization", "Bearer "+v.Token)
	func() {
		defer func() {
			if r := recover(); r == nil {
				t.Error("the writer did not panic")
			}
		}()
		e.app.relay.handle(protoAnthropic).ServeHTTP(panicWriter{httptest.NewRecorder()}, req)
	}()
	slotFree("a panic")
}

// panicWriter panics when the answer is written, as a broken handler would.
type panicWriter struct{ *httptest.ResponseRecorder }

func (panicWriter) WriteHeader(int) { panic("boom") }

func TestSpendLimitLetsStreamInFlightFinish(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	s := e.login()
	// One fake answer on claude-sonnet-4-5 costs $0.00057375 (see
	// TestCostLoggedExactly); the cap is crossed by the first to finish.
	v := e.createToken(s, `{"name":"capped","limits":{"daily_usd":0.0005}}`)
	gate := make(chan struct{})
	up.set(fakeBehavior{Deltas: 3, BlockDeltas: gate})
	req, _ := http.NewRequest("POST", e.URL+"/v1/messages", strings.NewReader(anthropicBody("claude-sonnet-4-5", true)))
	req.Header.Set("Authorization", "Bearer "+v.Token)
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	for !strings.HasPrefix(readEvent(t, br), "event: content_block_delta") {
	}
	// A second request finishes while the stream is held: now over the cap.
	up.set(fakeBehavior{})
	if r, b := e.call(protoAnthropic, "claude-sonnet-4-5", v.Token); r.StatusCode != 200 {
		t.Fatalf("second: %d %s", r.StatusCode, b)
	}
	// The stream in flight still finishes whole.
	close(gate)
	rest := new(strings.Builder)
	for {
		ev := readEvent(t, br)
		rest.WriteString(ev)
		if ev == "" || strings.HasPrefix(ev, "event: message_stop") {
			break
		}
	}
	if !strings.Contains(rest.String(), "message_stop") {
		t.Errorf("stream cut after the cap was crossed: %s", rest)
	}
	resp.Body.Close()
	e.settle()
	r, b := e.call(protoAnthropic, "claude-sonnet-4-5", v.Token)
	msg, _ := protocolError(t, protoAnthropic, b)
	if r.StatusCode != 429 || !strings.Contains(msg, "daily_usd limit ($0.0011475 of $0.0005)") ||
		r.Header.Get("X-Should-Retry") != "false" || r.Header.Get("Retry-After") == "" {
		t.Errorf("over the daily cap: %d %s %v; want 429 naming daily_usd, $0.0011475 spent", r.StatusCode, b, r.Header)
	}
	if u := e.tokenUsage(s, v.ID); u.SpentTodayUSD != 0.0011475 || u.Requests != 3 || u.InFlight != 0 {
		t.Errorf("usage %+v; want $0.0011475 today, 3 requests, none in flight", u)
	}
}

func TestCostLoggedExactly(t *testing.T) {
	e := newTestEnv(t)
	a := newFakeUpstream(t, "a")
	o := newFakeUpstream(t, "o")
	e.addChannel(Channel{Name: "list", URL: a.URL, Models: []string{"claude-sonnet-4-5", "mystery-model"}})
	e.addChannel(Channel{Name: "half", URL: a.URL, Models: []string{"claude-haiku-4-5"}, PriceMultiplier: 0.5})
	e.addChannel(Channel{Name: "oa", URL: o.URL, Type: "openai"})
	s := e.login()
	v := e.createToken(s, `{"name":"alice"}`)
	for _, c := range []struct {
		p     protocol
		model string
	}{{protoAnthropic, "claude-sonnet-4-5"}, {protoAnthropic, "claude-haiku-4-5"}, {protoOpenAI, "gpt-5"}, {protoAnthropic, "mystery-model"}} {
		if r, b := e.call(c.p, c.model, v.Token); r.StatusCode != 200 {
			t.Fatalf("%s: %d %s", c.model, r.StatusCode, b)
		}
	}
	// The fake's usage: 12 input, 34 output, 7 cache write (5 min), 5 cache read.
	want := map[string]float64{
		// 12·3 + 34·15 + 7·3.75 + 5·0.3 = 573.75 µ$
		"claude-sonnet-4-5": 0.00057375,
		// (12·1 + 34·5 + 7·1.25 + 5·0.1)·0.5 = 191.25·0.5 = 95.625 µ$
		"claude-haiku-4-5": 0.000095625,
		// OpenAI: 12 fresh·1.25 + 5 cached·0.125 + 34·10 = 355.625 µ$
		"gpt-5": 0.000355625,
	}
	for _, l := range e.logs() {
		w, priced := want[l.Model]
		switch {
		case !priced && l.CostUSD != nil:
			t.Errorf("%s: cost %v; want null (unpriced)", l.Model, *l.CostUSD)
		case priced && (l.CostUSD == nil || *l.CostUSD != w):
			t.Errorf("%s: cost %v; want %v", l.Model, l.CostUSD, w)
		}
	}
	var st stats
	_, b := e.admin(s, "GET", "/admin/stats", "")
	json.Unmarshal(b, &st)
	if len(st.Tokens) != 1 || *st.Tokens[0].Token != "alice" || st.Tokens[0].CostUSD != 0.001025 ||
		st.Tokens[0].Unpriced != 1 || st.Tokens[0].Requests != 4 {
		t.Errorf("token stats %s; want alice, $0.001025, 1 unpriced of 4", b)
	}
	var sum float64
	for _, m := range st.Models {
		sum += m.CostUSD
		if *m.Model == "mystery-model" && m.Unpriced != 1 {
			t.Errorf("mystery-model: %+v; want counted as unpriced", m)
		}
	}
	if fmt.Sprintf("%.9f", sum) != "0.001025000" {
		t.Errorf("model stats cost %v; want 0.001025", sum)
	}
	// Another token's traffic stays out of alice's figures.
	bob := e.createToken(s, `{"name":"bob"}`)
	e.call(protoAnthropic, "claude-sonnet-4-5", bob.Token)
	e.settle()
	var mine stats
	_, b = e.admin(s, "GET", fmt.Sprintf("/admin/stats?token_id=%d", v.ID), "")
	json.Unmarshal(b, &mine)
	var n int64
	var cost float64
	for _, c := range mine.Channels {
		n += c.Requests
		cost += c.CostUSD
	}
	if n != 4 || fmt.Sprintf("%.9f", cost) != "0.001025000" || len(mine.Models) != 4 {
		t.Errorf("stats?token_id: %d requests, $%v over %d models; want alice's 4, $0.001025, 4 models: %s", n, cost, len(mine.Models), b)
	}
	var tr struct{ Buckets []trendBucket }
	_, b = e.admin(s, "GET", fmt.Sprintf("/admin/trends?hours=2&token_id=%d", v.ID), "")
	json.Unmarshal(b, &tr)
	n, cost = 0, 0
	for _, bk := range tr.Buckets {
		n += bk.Requests
		cost += bk.CostUSD
	}
	if n != 4 || fmt.Sprintf("%.9f", cost) != "0.001025000" {
		t.Errorf("trends?token_id: %d requests, $%v; want 4, $0.001025: %s", n, cost, b)
	}
	// Filter the log by token.
	_, b = e.admin(s, "GET", fmt.Sprintf("/admin/logs?token_id=%d", v.ID), "")
	var page struct{ Total int }
	json.Unmarshal(b, &page)
	if page.Total != 4 {
		t.Errorf("logs?token_id: total %d; want 4", page.Total)
	}
	_, b = e.admin(s, "GET", "/admin/logs?token_id=999", "")
	json.Unmarshal(b, &page)
	if page.Total != 0 {
		t.Errorf("logs?token_id=999: total %d; want 0", page.Total)
	}
}

func TestEditingPricesChangesFutureRowsOnly(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	s := e.login()
	e.post("/v1/messages", anthropicBody("m", false))
	_, before := e.admin(s, "GET", "/admin/prices", "")
	for _, tc := range []struct{ body, want string }{
		{`{"prices":[{"input":1,"output":1,"cache_write_5m":1,"cache_write_1h":1,"cache_read":1}]}`, "model is required"},
		{`{"prices":[{"model":"m","input":1,"output":1,"cache_write_5m":1,"cache_write_1h":1,"cache_read":1,"fee":2}]}`, `unknown field "fee"`},
		{`{"prices":[{"model":"m","input":1,"output":-1,"cache_write_5m":1,"cache_write_1h":1,"cache_read":1}]}`, "output must be ≥ 0"},
		{`{"as_of":"2026-01-01"}`, `"prices" is required`},
	} {
		if st, b := e.admin(s, "PUT", "/admin/prices", tc.body); st != 400 || !strings.Contains(errorOf(t, b), tc.want) {
			t.Errorf("PUT %s: %d %s; want 400 saying %q", tc.body, st, b, tc.want)
		}
	}
	if st, _ := e.admin(s, "PUT", "/admin/prices", `{"prices":[`+strings.Repeat(" ", 10<<20)+`]}`); st != 413 {
		t.Errorf("10 MB PUT: %d; want 413", st)
	}
	if _, after := e.admin(s, "GET", "/admin/prices", ""); string(after) != string(before) {
		t.Errorf("a refused PUT changed the table")
	}
	if st, b := e.admin(s, "PUT", "/admin/prices", `{"as_of":"2026-01-01","prices":[{"model":"m","input":1,"output":2,
		"cache_write_5m":0,"cache_write_1h":0,"cache_read":0}]}`); st != 200 {
		t.Fatalf("PUT: %d %s", st, b)
	}
	e.post("/v1/messages", anthropicBody("m", false))
	rows := e.logs()
	// Before: m had no price. After: 12·1 + 34·2 = 80 µ$.
	if rows[0].CostUSD != nil || rows[1].CostUSD == nil || *rows[1].CostUSD != 0.00008 {
		t.Errorf("costs %v, %v; want null then 0.00008", rows[0].CostUSD, rows[1].CostUSD)
	}
	// The table outlives a restart.
	e.close()
	e2 := startEnv(t, e.cfg)
	_, b := e2.admin(e2.login(), "GET", "/admin/prices", "")
	if !strings.Contains(string(b), `"as_of":"2026-01-01"`) {
		t.Errorf("after restart: %s", b)
	}
}

func TestRestartKeepsSpend(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	s := e.login()
	v := e.createToken(s, `{"name":"alice","limits":{"total_usd":0.001}}`)
	for range 2 {
		e.call(protoAnthropic, "claude-sonnet-4-5", v.Token)
	}
	e.close()
	e2 := startEnv(t, e.cfg)
	s2 := e2.login()
	u := e2.tokenUsage(s2, v.ID)
	if u.SpentTotalUSD != 0.0011475 || u.SpentTodayUSD != 0.0011475 || u.Requests != 2 || u.LastUsedAt == nil {
		t.Errorf("after restart: %+v; want $0.0011475 and 2 requests kept", u)
	}
	r, b := e2.call(protoAnthropic, "claude-sonnet-4-5", v.Token)
	if r.StatusCode != 429 || !strings.Contains(string(b), "total_usd") || r.Header.Get("Retry-After") != "" {
		t.Errorf("over the total cap after restart: %d %s; want 429 total_usd without Retry-After", r.StatusCode, b)
	}
}

func newTestClock(t time.Time) *testClock {
	c := &testClock{}
	c.ns.Store(t.UnixNano())
	return c
}
func (c *testClock) add(d time.Duration) { c.ns.Add(int64(d)) }

// install sets the clock on an app before it serves.
func (c *testClock) install(a *app) { a.relay.Now, a.tokens.now = c.now, c.now }

func TestSpendPeriodsRollOverInTZ(t *testing.T) {
	// 23:59:30 on 31 January in Shanghai (UTC+8).
	clock := newTestClock(time.Date(2026, 1, 31, 15, 59, 30, 0, time.UTC))
	cfg := testConfig(t)
	loc, err := time.LoadLocation("Asia/Shanghai")
	if err != nil {
		t.Fatal(err)
	}
	cfg.TZ = loc
	e := startEnvWith(t, cfg, clock.install)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	s := e.login()
	v := e.createToken(s, `{"name":"night","limits":{"daily_usd":0.0005,"monthly_usd":0.001}}`)
	call := func() (int, string) {
		r, b := e.call(protoAnthropic, "claude-sonnet-4-5", v.Token)
		e.settle()
		return r.StatusCode, string(b)
	}
	if st, b := call(); st != 200 {
		t.Fatalf("first: %d %s", st, b)
	}
	st, b := call()
	if st != 429 || !strings.Contains(b, "daily_usd") || !strings.Contains(b, "resets at 2026-01-31T16:00:00Z") {
		t.Fatalf("same day: %d %s; want 429 daily_usd resetting at local midnight", st, b)
	}
	// Local midnight: a new day and a new month.
	clock.add(time.Minute)
	if st, b := call(); st != 200 {
		t.Fatalf("after midnight in CCLOAD_TZ: %d %s", st, b)
	}
	u := e.tokenUsage(s, v.ID)
	if u.SpentTodayUSD != 0.00057375 || u.SpentMonthUSD != 0.00057375 || u.SpentTotalUSD != 0.0011475 {
		t.Errorf("usage %+v; want one request today and this month, two in all", u)
	}
	// The database agrees with memory: a restart at the same clock.
	e.close()
	e2 := startEnvWith(t, cfg, clock.install)
	u2 := e2.tokenUsage(e2.login(), v.ID)
	if u2.SpentTodayUSD != u.SpentTodayUSD || u2.SpentMonthUSD != u.SpentMonthUSD || u2.SpentTotalUSD != u.SpentTotalUSD ||
		u2.Requests != u.Requests || u2.LastUsedAt == nil || !u2.LastUsedAt.Equal(*u.LastUsedAt) {
		t.Errorf("after restart %+v; want %+v", u2, u)
	}
}

// TestTokenCountersRace hammers one token from many goroutines: the
// counters end exact, and -race sees no unguarded state.
func TestTokenCountersRace(t *testing.T) {
	mt, _ := compileToken(tokenRecord{ID: 1, Name: "x", Enabled: true, hash: strings.Repeat("00", 32)})
	mt.ctr = &tokenCounters{}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				if r := mt.acquire(time.Now(), time.UTC); r != nil {
					t.Error(r.msg)
					return
				}
				mt.ctr.charge(time.Now(), time.UTC, 1_000_000)
				mt.ctr.release()
			}
		}()
	}
	wg.Wait()
	if u := mt.ctr.view(time.Now(), time.UTC); u.Requests != 800 || u.InFlight != 0 || u.SpentTotalUSD != 0.0008 {
		t.Errorf("%+v", u)
	}
}

// loadBenchTokens gives e what a busy team's relay holds: 1,000 managed
// tokens, every one with every limit, and a price table of 100 models. The
// benchmark's clients send "client-token", which becomes one of them, so
// each request takes the whole managed path: lookup, limits, slot, price,
// charge.
func loadBenchTokens(tb testing.TB, e *testEnv) {
	tb.Helper()
	ctx := context.Background()
	ts := e.app.tokens
	err := ts.change(ctx, func() error {
		for i := range 1000 {
			secret := newTokenSecret()
			if i == 0 {
				secret = "client-token"
			}
			big, conc, rpm := 1e6, int64(10_000), int64(1_000_000)
			rec := tokenRecord{Name: fmt.Sprintf("bench-%04d", i), Enabled: true, hash: tokenHash(secret), Hint: maskKey(secret),
				Limits: tokenLimits{DailyUSD: &big, MonthlyUSD: &big, TotalUSD: &big, Concurrency: &conc, RPM: &rpm}}
			if err := e.app.store.createToken(ctx, &rec); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	table := defaultPrices()
	for i := len(table.Prices); i < 100; i++ {
		table.Prices = append(table.Prices, defaultPrices().Prices[i%10])
		table.Prices[i].Model = fmt.Sprintf("bench-model-%03d", i)
	}
	if _, err := e.app.prices.replace(ctx, table); err != nil {
		tb.Fatal(err)
	}
	if n := len(ts.current().list); n != 1000 {
		tb.Fatalf("%d tokens loaded; want 1000", n)
	}
}

// BenchmarkManagedTokenPath is what a managed token adds to one request,
// with 1,000 tokens and 100 priced models loaded: identify, limits and
// slot, price, charge, release. Run in parallel it also shows the cost of
// every request hitting the same token's mutex.
func BenchmarkManagedTokenPath(b *testing.B) {
	e := newTestEnv(b)
	loadBenchTokens(b, e)
	rl := e.app.relay
	u := usage{Input: 1200, Output: 340, CacheRead: 50_000, CacheWrite: 2_000, CacheWrite1h: 500}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		req := httptest.NewRequest("POST", "/v1/messages", nil)
		req.Header.Set("X-Api-Key", "client-token")
		for pb.Next() {
			_, mt, deny := rl.auth.identifyClient(req, protoAnthropic, time.Now())
			if deny != "" {
				b.Fatal(deny)
			}
			x := &exchange{start: time.Now(), client: mt, model: "claude-sonnet-4-5-20250929", usage: u, served: -1}
			if !rl.admitToken(x, nil) {
				b.Fatal("refused")
			}
			var le logEntry
			rl.settleToken(x, &le)
			x.releaseToken()
			if !le.priced {
				b.Fatal("not priced")
			}
		}
	})
}

func TestTokenCLI(t *testing.T) {
	cfg := testConfig(t)
	env := map[string]string{"SQLITE_PATH": cfg.SQLitePath, "CCLOAD_PASS": testAdminPass}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	var out strings.Builder
	args := []string{"-env", "/nonexistent", "token", "create", "ci-runner", "--models", "claude-haiku-4-5,claude-sonnet-4-5", "--daily-usd", "3", "--rpm", "30"}
	if err := run(context.Background(), args, lookup, &out, &out); err != nil {
		t.Fatalf("token create: %v (%s)", err, out.String())
	}
	secret := strings.TrimSpace(out.String())
	if !strings.HasPrefix(secret, "sk-ccl-") {
		t.Fatalf("printed %q; want the new token", secret)
	}
	out.Reset()
	if err := run(context.Background(), []string{"-env", "/nonexistent", "token", "create", "bad", "--rpm", "-1"}, lookup, &out, &out); err == nil ||
		!strings.Contains(err.Error(), "limits.rpm") {
		t.Errorf("a negative rpm: %v; want the limit named", err)
	}
	// A server on that database knows it, with its limits.
	e := startEnv(t, cfg)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	if r, b := e.call(protoAnthropic, "claude-haiku-4-5", secret); r.StatusCode != 200 {
		t.Errorf("the CLI's token: %d %s", r.StatusCode, b)
	}
	if r, _ := e.call(protoAnthropic, "claude-opus-4-1", secret); r.StatusCode != 403 {
		t.Errorf("a model outside --models: %d; want 403", r.StatusCode)
	}
	_, list := e.admin(e.login(), "GET", "/admin/tokens", "")
	var views []tokenView
	json.Unmarshal(list, &views)
	if len(views) != 1 || views[0].Name != "ci-runner" || views[0].Limits.DailyUSD == nil || *views[0].Limits.DailyUSD != 3 ||
		views[0].Limits.RPM == nil || *views[0].Limits.RPM != 30 {
		t.Errorf("tokens %s", list)
	}
}

// A token held to one channel that is only cooling gets that channel as its
// last resort (and so its answer), not a 403 that clients never retry: the
// route's own last resort was a channel the token may not use.
func TestTokenChannelsWhileTheirChannelCools(t *testing.T) {
	e := newTestEnv(t)
	ua, ub := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	ua.set(fakeBehavior{Status: 503, RetryAfter: "20"})
	ub.set(fakeBehavior{Status: 503, RetryAfter: "120"})
	e.addChannel(Channel{Name: "A", URL: ua.URL})
	cb := e.addChannel(Channel{Name: "B", URL: ub.URL})
	s := e.login()
	all := e.createToken(s, `{"name":"all"}`)
	onlyB := e.createToken(s, fmt.Sprintf(`{"name":"onlyb","channels":[%d]}`, cb.ID))
	e.call(protoAnthropic, "m", all.Token) // both fail and cool; A frees first
	ub.set(fakeBehavior{})
	resp, body := e.call(protoAnthropic, "m", onlyB.Token)
	if resp.StatusCode != 200 || ub.count() != 2 {
		t.Fatalf("restricted while its channel cools: %d %s, b hits %d; want B tried as the last resort", resp.StatusCode, body, ub.count())
	}
}
