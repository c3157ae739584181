package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func decode[T any](t *testing.T, b []byte) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decode %T from %s: %v", v, b, err)
	}
	return v
}

func errorOf(t *testing.T, b []byte) string {
	t.Helper()
	return decode[struct{ Error string }](t, b).Error
}

func TestAdminRequiresSession(t *testing.T) {
	e := newTestEnv(t)
	routes := []struct{ method, path string }{
		{"GET", "/admin/channels"}, {"POST", "/admin/channels"}, {"GET", "/admin/channels/1"},
		{"PUT", "/admin/channels/1"}, {"DELETE", "/admin/channels/1"}, {"DELETE", "/admin/channels/1/cooldown"},
		{"POST", "/admin/channels/1/test"}, {"GET", "/admin/logs"}, {"GET", "/admin/stats"},
		{"GET", "/admin/trends"}, {"GET", "/admin/summary"}, {"GET", "/admin/redis"},
	}
	for _, r := range routes {
		for _, hdr := range []map[string]string{nil, {"Authorization": "Bearer not-a-session"}} {
			resp, body := e.do(r.method, r.path, "{}", hdr)
			if resp.StatusCode != 401 || errorOf(t, body) == "" {
				t.Errorf("%s %s with %v: status %d body %s; want 401 with an error", r.method, r.path, hdr, resp.StatusCode, body)
			}
		}
	}
}

func TestLoginLogoutAndCookie(t *testing.T) {
	e := newTestEnv(t)
	resp, body := e.do("POST", "/login", `{"password":"`+testAdminPass+`"}`, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("login: %d %s", resp.StatusCode, body)
	}
	tok := decode[struct{ Token string }](t, body).Token
	var cookie *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == sessionCookie {
			cookie = c
		}
	}
	if cookie == nil || cookie.Value != tok || !cookie.HttpOnly || cookie.SameSite != http.SameSiteStrictMode || cookie.MaxAge != 86400 {
		t.Fatalf("session cookie %+v", cookie)
	}
	// The cookie alone authenticates.
	resp, _ = e.do("GET", "/admin/channels", "", map[string]string{"Cookie": sessionCookie + "=" + tok})
	if resp.StatusCode != 200 {
		t.Errorf("cookie auth: %d", resp.StatusCode)
	}
	// The session is stored hashed, never as the token.
	var n int
	e.app.store.rdb.QueryRow(`SELECT count(*) FROM sessions WHERE token_hash = ?`, tok).Scan(&n)
	if n != 0 {
		t.Error("session token stored in clear")
	}
	if st, _ := e.admin(tok, "POST", "/logout", ""); st != 200 {
		t.Errorf("logout: %d", st)
	}
	if st, _ := e.admin(tok, "GET", "/admin/channels", ""); st != 401 {
		t.Errorf("after logout: %d; want 401", st)
	}
}

func TestCrossSiteCookieWritesRefused(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	cookie := sessionCookie + "=" + tok
	resp, body := e.do("POST", "/admin/channels", `{"name":"x","url":"http://example.com","api_key":"sk-1234567890ab"}`,
		map[string]string{"Cookie": cookie, "Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"})
	if resp.StatusCode != 403 {
		t.Errorf("cross-site write: %d %s; want 403", resp.StatusCode, body)
	}
	resp, _ = e.do("POST", "/admin/channels", `{"name":"x","url":"http://example.com","api_key":"sk-1234567890ab"}`,
		map[string]string{"Cookie": cookie, "Sec-Fetch-Site": "same-origin"})
	if resp.StatusCode != 201 {
		t.Errorf("same-origin write: %d; want 201", resp.StatusCode)
	}
}

func TestLoginRateLimit(t *testing.T) {
	e := newTestEnv(t)
	clock := time.Now()
	e.app.admin.limiter.now = func() time.Time { return clock }
	for i := range 5 {
		resp, body := e.do("POST", "/login", `{"password":"wrong"}`, nil)
		if resp.StatusCode != 401 || errorOf(t, body) != "wrong password" {
			t.Fatalf("attempt %d: %d %s", i, resp.StatusCode, body)
		}
	}
	// Even the right password is refused while locked out.
	resp, body := e.do("POST", "/login", `{"password":"`+testAdminPass+`"}`, nil)
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("6th attempt: %d %s; want 429 with Retry-After", resp.StatusCode, body)
	}
	clock = clock.Add(loginWindow)
	if resp, _ := e.do("POST", "/login", `{"password":"`+testAdminPass+`"}`, nil); resp.StatusCode != 200 {
		t.Errorf("after the window: %d; want 200", resp.StatusCode)
	}
	for _, bad := range []string{``, `{`, `{"password":5}`} {
		if resp, _ := e.do("POST", "/login", bad, nil); resp.StatusCode != 400 {
			t.Errorf("login body %q: %d; want 400", bad, resp.StatusCode)
		}
	}
}

func TestGeneratedPasswordStoredHashed(t *testing.T) {
	cfg := testConfig(t)
	cfg.AdminPass = ""
	e := startEnv(t, cfg)
	stored, _ := e.app.store.Setting(context.Background(), passwordSetting)
	if !strings.HasPrefix(stored, "pbkdf2-sha256$") {
		t.Fatalf("stored password %q", stored)
	}
	p := &password{stored: stored}
	if p.check("") || p.check("guess") {
		t.Error("wrong password accepted")
	}
	h, _ := hashPassword("pw-1")
	if !(&password{stored: h}).check("pw-1") {
		t.Error("hash of pw-1 does not verify")
	}
}

func TestSessionsSurviveRestart(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	cfg := e.cfg
	e.close()
	e2 := startEnv(t, cfg)
	if st, body := e2.admin(tok, "GET", "/admin/channels", ""); st != 200 {
		t.Errorf("session after restart: %d %s", st, body)
	}
}

func TestChannelCRUD(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	st, body := e.admin(tok, "POST", "/admin/channels", `{"name":"  Main  ","url":"https://relay.example.com/api/",
		"api_key":"sk-ant-aaaaaaaaaaaa1Yz\nsk-ant-bbbbbbbbbbbb2Yz, sk-ant-aaaaaaaaaaaa1Yz","channel_type":"codex","priority":"3",
		"models":"gpt-5, gpt-5-codex","model_redirects":{"gpt-5":"gpt-5-2025"},"key_strategy":"round-robin"}`)
	if st != 201 {
		t.Fatalf("create: %d %s", st, body)
	}
	c := decode[channelView](t, body)
	if c.Name != "Main" || c.URL != "https://relay.example.com/api" || c.Type != "openai" || c.Priority != 3 ||
		strings.Join(c.Models, ",") != "gpt-5,gpt-5-codex" || c.ModelRedirects["gpt-5"] != "gpt-5-2025" ||
		c.KeyStrategy != keyRoundRobin || !c.Enabled || c.KeyCount != 2 {
		t.Errorf("created %+v", c)
	}
	if strings.Join(c.APIKeys, ",") != "sk-a…1Yz,sk-a…2Yz" {
		t.Errorf("masked keys %v", c.APIKeys)
	}
	if strings.Contains(string(body), "aaaaaaaaaaaa") {
		t.Errorf("full key in response: %s", body)
	}
	if c.State.Keys == nil || len(c.State.Keys) != 2 || c.State.CooldownUntil != nil {
		t.Errorf("state %+v", c.State)
	}
	// The proxy sees it at once.
	if e.app.sel.current().byID[c.ID] == nil {
		t.Error("snapshot not rebuilt after create")
	}

	id := fmt.Sprint(c.ID)
	// PUT updates the fields given; keys omitted stay.
	st, body = e.admin(tok, "PUT", "/admin/channels/"+id, `{"priority":9,"enabled":false}`)
	if st != 200 {
		t.Fatalf("update: %d %s", st, body)
	}
	stored, _ := e.app.store.GetChannel(context.Background(), c.ID)
	if stored.Priority != 9 || stored.Enabled || len(stored.APIKeys) != 2 || stored.APIKeys[1] != "sk-ant-bbbbbbbbbbbb2Yz" {
		t.Errorf("after PUT: %+v", stored)
	}
	if e.app.sel.current().byID[c.ID] != nil {
		t.Error("disabled channel still in the snapshot")
	}
	// Masked keys sent back stand for the stored ones; new ones are added.
	st, body = e.admin(tok, "PUT", "/admin/channels/"+id, `{"api_keys":["sk-a…2Yz","sk-new-cccccccccc"]}`)
	if st != 200 {
		t.Fatalf("update keys: %d %s", st, body)
	}
	stored, _ = e.app.store.GetChannel(context.Background(), c.ID)
	if strings.Join(stored.APIKeys, ",") != "sk-ant-bbbbbbbbbbbb2Yz,sk-new-cccccccccc" {
		t.Errorf("keys after masked round trip: %v", stored.APIKeys)
	}

	st, body = e.admin(tok, "GET", "/admin/channels", "")
	list := decode[[]channelView](t, body)
	if st != 200 || len(list) != 1 || list[0].ID != c.ID {
		t.Errorf("list: %d %s", st, body)
	}
	if st, _ = e.admin(tok, "GET", "/admin/channels/"+id, ""); st != 200 {
		t.Errorf("get: %d", st)
	}
	if st, _ = e.admin(tok, "DELETE", "/admin/channels/"+id, ""); st != 200 {
		t.Errorf("delete: %d", st)
	}
	if st, body = e.admin(tok, "GET", "/admin/channels/"+id, ""); st != 404 || errorOf(t, body) == "" {
		t.Errorf("get after delete: %d %s", st, body)
	}
	if st, _ = e.admin(tok, "DELETE", "/admin/channels/"+id, ""); st != 404 {
		t.Errorf("delete twice: %d", st)
	}
}

func TestChannelValidation(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	valid := `"url":"https://a.example","api_key":"sk-123456789012"`
	cases := []struct {
		body   string
		status int
		msg    string
	}{
		{`{` + valid + `}`, 400, "name is required"},
		{`{"name":"a","api_key":"k"}`, 400, "url is required"},
		{`{"name":"a","url":"ftp://x","api_key":"k"}`, 400, "absolute http(s) URL"},
		{`{"name":"a","url":"relay.example.com","api_key":"k"}`, 400, "absolute http(s) URL"},
		{`{"name":"a","url":"https://a.example"}`, 400, "api_key is required"},
		{`{"name":"a",` + valid + `,"channel_type":"bard"}`, 400, "channel_type"},
		{`{"name":"a",` + valid + `,"key_strategy":"random"}`, 400, "key_strategy"},
		{`{"name":"a",` + valid + `,"priority":"high"}`, 400, "priority"},
		{`{"name":"a",` + valid + `,"model_redirects":["x"]}`, 400, "model_redirects"},
		{`{"name":"a",` + valid + `,"enabled":"maybe"}`, 400, "enabled"},
		{`{"name":"a",` + valid + `,"nmae":"typo"}`, 400, `unknown field "nmae"`},
		{`{"name":"a",` + valid + `,"api_keys":["sk-…Yz"]}`, 400, "masked key"},
		{`{"name":`, 400, "malformed JSON"},
		{``, 400, "empty"},
		{`{"name":` + strings.Repeat(" ", 2<<20) + `"x"}`, 413, "larger than"},
	}
	for _, tc := range cases {
		st, body := e.admin(tok, "POST", "/admin/channels", tc.body)
		if st != tc.status || !strings.Contains(errorOf(t, body), tc.msg) {
			t.Errorf("POST %.60s: %d %s; want %d containing %q", tc.body, st, body, tc.status, tc.msg)
		}
	}
	if st, body := e.admin(tok, "POST", "/admin/channels", `{"name":"dup",`+valid+`}`); st != 201 {
		t.Fatalf("create: %d %s", st, body)
	}
	if st, body := e.admin(tok, "POST", "/admin/channels", `{"name":"DUP",`+valid+`}`); st != 409 || !strings.Contains(errorOf(t, body), "already exists") {
		t.Errorf("duplicate name: %d %s; want 409", st, body)
	}
	if st, _ := e.admin(tok, "PUT", "/admin/channels/abc", `{}`); st != 400 {
		t.Errorf("bad id: %d", st)
	}
	if st, _ := e.admin(tok, "PUT", "/admin/channels/999", `{"priority":1}`); st != 404 {
		t.Errorf("missing id: %d", st)
	}
	if chs, _ := e.app.store.ListChannels(context.Background()); len(chs) != 1 {
		t.Errorf("%d channels stored; bad requests must store nothing", len(chs))
	}
}

func TestEditsKeepOrClearCooldowns(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	up := newFakeUpstream(t, "a")
	ch := e.addChannel(Channel{Name: "a", URL: up.URL})
	cool := func() {
		e.app.cool.fail(e.app.cool.get(ch.ID), 0, "", verdict{scope: scopeChannel, base: time.Minute, status: 503, reason: "503"})
		e.app.cool.fail(e.app.cool.get(ch.ID), 0, "", verdict{scope: scopeKey, base: time.Minute, status: 401, reason: "401"})
	}
	cool()
	id := fmt.Sprint(ch.ID)
	e.admin(tok, "PUT", "/admin/channels/"+id, `{"priority":5,"models":["x"]}`)
	_, body := e.admin(tok, "GET", "/admin/channels/"+id, "")
	if v := decode[channelView](t, body); v.State.CooldownUntil == nil || v.State.Keys[0].CooldownUntil == nil || v.State.CooldownReason != "503" {
		t.Errorf("an unrelated edit lost the cooldowns: %+v", v.State)
	}
	e.admin(tok, "PUT", "/admin/channels/"+id, `{"url":"`+up.URL+`/v2"}`)
	_, body = e.admin(tok, "GET", "/admin/channels/"+id, "")
	if v := decode[channelView](t, body); v.State.CooldownUntil != nil || v.State.Keys[0].CooldownUntil != nil {
		t.Errorf("a URL change kept the cooldowns: %+v", v.State)
	}
	cool()
	e.admin(tok, "PUT", "/admin/channels/"+id, `{"api_key":"sk-brand-new-key-1"}`)
	_, body = e.admin(tok, "GET", "/admin/channels/"+id, "")
	if v := decode[channelView](t, body); v.State.CooldownUntil != nil || len(v.State.Keys) != 1 || v.State.Keys[0].CooldownUntil != nil {
		t.Errorf("a key change kept the cooldowns: %+v", v.State)
	}
	// Nor do they come back from the database after a restart.
	e.settle()
	recs, _ := e.app.store.LoadCooldowns(context.Background())
	for _, r := range recs {
		if r.Failures > 0 && r.Until.After(time.Now()) {
			t.Errorf("stale cooldown row after key change: %+v", r)
		}
	}
}

func TestClearCooldownEndpoint(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	up := newFakeUpstream(t, "a")
	ch := e.addChannel(Channel{Name: "a", URL: up.URL})
	h := e.app.cool.get(ch.ID)
	e.app.cool.fail(h, 0, "", verdict{scope: scopeChannel, base: time.Minute, status: 503})
	e.app.cool.fail(h, 0, "", verdict{scope: scopeKey, base: time.Minute, status: 429})
	e.app.cool.fail(h, 0, "m", verdict{scope: scopeModel, base: time.Minute, status: 404})
	st, body := e.admin(tok, "DELETE", fmt.Sprintf("/admin/channels/%d/cooldown", ch.ID), "")
	if st != 200 {
		t.Fatalf("clear: %d %s", st, body)
	}
	v := decode[channelView](t, body)
	if v.State.CooldownUntil != nil || v.State.Keys[0].CooldownUntil != nil || len(v.State.Models) != 0 || v.State.Failures != 0 {
		t.Errorf("state after clear %+v", v.State)
	}
	e.settle()
	// The persister may still hold the failures queued above; they must not
	// resurrect the cooldowns on the next start.
	e.app.cool.flush(context.Background(), e.app.store)
	recs, _ := e.app.store.LoadCooldowns(context.Background())
	if len(recs) != 0 {
		t.Errorf("cooldown rows after clear: %+v", recs)
	}
	if st, _ := e.admin(tok, "DELETE", "/admin/channels/999/cooldown", ""); st != 404 {
		t.Errorf("clear missing channel: %d", st)
	}
}

func TestTestChannelEndpoint(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	good, bad := newFakeUpstream(t, "good"), newFakeUpstream(t, "bad")
	bad.set(fakeBehavior{Status: 401})
	g := e.addChannel(Channel{Name: "g", URL: good.URL, Models: []string{"claude-x"}, APIKeys: []string{"sk-good-0000000", "sk-good-1111111"}})
	b := e.addChannel(Channel{Name: "b", URL: bad.URL})
	e.app.cool.fail(e.app.cool.get(g.ID), 0, "", verdict{scope: scopeChannel, base: time.Minute, status: 503})

	st, body := e.admin(tok, "POST", fmt.Sprintf("/admin/channels/%d/test", g.ID), `{"key_index":1}`)
	res := decode[testResult](t, body)
	if st != 200 || !res.OK || res.Status != 200 || res.Model != "claude-x" || res.KeyIndex != 1 {
		t.Fatalf("test good: %d %s", st, body)
	}
	r := good.requests()[0]
	if r.Path != "/v1/messages" || r.Key != "sk-good-1111111" || !strings.Contains(string(r.Body), `"claude-x"`) {
		t.Errorf("test request %+v", r)
	}
	if s := e.health(g.ID); s.CooldownUntil != nil {
		t.Errorf("successful test left the cooldown: %+v", s)
	}
	st, body = e.admin(tok, "POST", fmt.Sprintf("/admin/channels/%d/test", b.ID), "")
	res = decode[testResult](t, body)
	if st != 200 || res.OK || res.Status != 401 || !strings.Contains(res.Message, "fake bad error 401") {
		t.Errorf("test bad: %d %s", st, body)
	}
	if s := e.health(b.ID); s.Keys[0].CooldownUntil != nil {
		t.Errorf("a failed test cooled the key: %+v", s)
	}
	if st, _ := e.admin(tok, "POST", fmt.Sprintf("/admin/channels/%d/test", g.ID), `{"key_index":7}`); st != 400 {
		t.Errorf("bad key index: %d", st)
	}
}

func TestLogsEndpoint(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	b.set(fakeBehavior{Status: 400})
	ach := e.addChannel(Channel{Name: "a", URL: a.URL, Models: []string{"m1"}})
	e.addChannel(Channel{Name: "b", URL: b.URL, Models: []string{"m2"}})
	for range 5 {
		e.post("/v1/messages", anthropicBody("m1", false))
	}
	for range 3 {
		e.post("/v1/messages", anthropicBody("m2", false))
	}
	e.settle()
	type page struct {
		Logs         []logEntry
		Total        int
		NextBeforeID *int64 `json:"next_before_id"`
	}
	get := func(q string) page {
		t.Helper()
		st, body := e.admin(tok, "GET", "/admin/logs"+q, "")
		if st != 200 {
			t.Fatalf("logs%s: %d %s", q, st, body)
		}
		return decode[page](t, body)
	}
	if p := get(""); p.Total != 8 || len(p.Logs) != 8 || p.NextBeforeID != nil || p.Logs[0].ID < p.Logs[7].ID {
		t.Errorf("all: total %d, %d rows, next %v", p.Total, len(p.Logs), p.NextBeforeID)
	}
	if p := get(fmt.Sprintf("?channel_id=%d", ach.ID)); p.Total != 5 || p.Logs[0].ChannelName != "a" {
		t.Errorf("by channel: %+v", p)
	}
	if p := get("?model=m2&status=400"); p.Total != 3 {
		t.Errorf("by model and status: total %d", p.Total)
	}
	if p := get("?status=4xx"); p.Total != 3 {
		t.Errorf("4xx: total %d", p.Total)
	}
	if p := get("?status=error"); p.Total != 3 {
		t.Errorf("errors: total %d", p.Total)
	}
	// Paging: 3 + 3 + 2, no overlap.
	seen := map[int64]bool{}
	q := "?limit=3"
	pages := 0
	for {
		p := get(q)
		pages++
		for _, l := range p.Logs {
			if seen[l.ID] {
				t.Fatalf("row %d on two pages", l.ID)
			}
			seen[l.ID] = true
		}
		if p.NextBeforeID == nil || pages > 5 {
			break
		}
		q = fmt.Sprintf("?limit=3&before_id=%d", *p.NextBeforeID)
	}
	if len(seen) != 8 {
		t.Errorf("paging saw %d rows; want 8", len(seen))
	}
	// A last page that is exactly full says there is nothing older.
	p1 := get("?limit=4")
	if p1.NextBeforeID == nil {
		t.Fatal("first of two full pages has no next_before_id")
	}
	if p2 := get(fmt.Sprintf("?limit=4&before_id=%d", *p1.NextBeforeID)); len(p2.Logs) != 4 || p2.NextBeforeID != nil {
		t.Errorf("last full page: %d rows, next %v; want 4 rows and no next", len(p2.Logs), p2.NextBeforeID)
	}
	future := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	if p := get("?since=" + future); p.Total != 0 {
		t.Errorf("since future: %d", p.Total)
	}
	if p := get("?until=" + future + "&since=2020-01-01"); p.Total != 8 {
		t.Errorf("window: %d", p.Total)
	}
	for _, bad := range []string{"?limit=0", "?limit=x", "?channel_id=-1", "?status=abc", "?since=yesterday",
		"?before_id=0", "?since=2026-01-02&until=2026-01-01"} {
		st, body := e.admin(tok, "GET", "/admin/logs"+bad, "")
		if st != 400 || errorOf(t, body) == "" {
			t.Errorf("logs%s: %d %s; want 400", bad, st, body)
		}
	}
}

func TestStatsTrendsSummary(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	b.set(fakeBehavior{Status: 500})
	ach := e.addChannel(Channel{Name: "a", URL: a.URL, Models: []string{"m1"}})
	bch := e.addChannel(Channel{Name: "b", URL: b.URL, Models: []string{"m2"}})
	for range 4 {
		e.post("/v1/messages", anthropicBody("m1", false))
	}
	e.post("/v1/messages", anthropicBody("m2", false))
	e.settle()

	st, body := e.admin(tok, "GET", "/admin/stats?hours=24", "")
	if st != 200 {
		t.Fatalf("stats: %d %s", st, body)
	}
	s := decode[stats](t, body)
	if s.Hours != 24 || len(s.Channels) != 2 || len(s.Models) != 2 {
		t.Fatalf("stats %s", body)
	}
	ca := s.Channels[0]
	if *ca.ChannelID != ach.ID || *ca.ChannelName != "a" || ca.Requests != 4 || ca.Success != 4 || ca.SuccessRate != 1 ||
		ca.InputTokens != 4*fakeInputTokens || ca.OutputTokens != 4*fakeOutputTokens {
		t.Errorf("channel a row %+v", ca)
	}
	cb := s.Channels[1]
	if *cb.ChannelID != bch.ID || cb.Requests != 1 || cb.Errors != 1 || cb.SuccessRate != 0 {
		t.Errorf("channel b row %+v", cb)
	}
	if m := s.Models[0]; *m.Model != "m1" || m.Requests != 4 || m.P95MS < 0 {
		t.Errorf("model row %+v", m)
	}
	for _, k := range []string{`"channel_id"`, `"channel_name"`, `"requests"`, `"success"`, `"errors"`, `"success_rate"`,
		`"avg_ms"`, `"p95_ms"`, `"avg_first_byte_ms"`, `"input_tokens"`, `"output_tokens"`, `"model"`} {
		if !strings.Contains(string(body), k) {
			t.Errorf("stats lacks %s", k)
		}
	}

	st, body = e.admin(tok, "GET", "/admin/trends?hours=24", "")
	tr := decode[struct {
		Hours   int
		Buckets []trendBucket
	}](t, body)
	if st != 200 || tr.Hours != 24 || len(tr.Buckets) != 24 {
		t.Fatalf("trends: %d %s", st, body)
	}
	last := tr.Buckets[23]
	if last.Requests != 5 || last.Success != 4 || last.Errors != 1 || !last.Start.Equal(time.Now().UTC().Truncate(time.Hour)) {
		t.Errorf("current hour %+v", last)
	}
	for i := 1; i < 24; i++ {
		if d := tr.Buckets[i].Start.Sub(tr.Buckets[i-1].Start); d != time.Hour {
			t.Errorf("bucket %d step %s", i, d)
		}
	}
	for _, bad := range []string{"/admin/stats?hours=0", "/admin/stats?hours=x", "/admin/trends?hours=99999"} {
		if st, _ := e.admin(tok, "GET", bad, ""); st != 400 {
			t.Errorf("%s: %d; want 400", bad, st)
		}
	}

	for _, path := range []string{"/admin/summary", "/public/summary"} {
		resp, body := e.do("GET", path, "", map[string]string{"Authorization": "Bearer " + tok})
		sum := decode[summary](t, body)
		if resp.StatusCode != 200 || sum.WindowHours != 24 || sum.Requests != 5 || sum.Success != 4 || sum.Errors != 1 ||
			sum.ChannelsEnabled != 2 || sum.ChannelsCooling != 1 || sum.SuccessRate != 0.8 {
			t.Errorf("%s: %d %s", path, resp.StatusCode, body)
		}
	}
	// Public summary needs no session and shows no secrets.
	resp, body := e.do("GET", "/public/summary", "", nil)
	if resp.StatusCode != 200 || strings.Contains(string(body), "sk-") {
		t.Errorf("public summary: %d %s", resp.StatusCode, body)
	}
}

func TestHealthzAndMetrics(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: `a "quoted"`, URL: up.URL})
	e.post("/v1/messages", anthropicBody("m", true))
	e.settle()
	resp, body := e.do("GET", "/healthz", "", nil)
	if resp.StatusCode != 200 || decode[map[string]string](t, body)["status"] != "ok" {
		t.Errorf("healthz %d %s", resp.StatusCode, body)
	}
	resp, body = e.do("GET", "/metrics", "", nil)
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
		t.Fatalf("metrics %d", resp.StatusCode)
	}
	for _, want := range []string{
		`ccload_requests_total{channel_id="1",channel="a \"quoted\"",class="2xx"} 1`,
		"ccload_upstream_attempts_total 1",
		`ccload_active_cooldowns{scope="channel"} 0`,
		"ccload_streams_in_flight 0",
		"ccload_log_dropped_total 0",
		`ccload_request_duration_seconds_bucket{le="+Inf"} 1`,
		"ccload_request_duration_seconds_count 1",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q:\n%s", want, body)
		}
	}
}

func TestMetricsNeedTokenFromAfar(t *testing.T) {
	e := newTestEnv(t, func(c *config) { c.AuthTokens = []string{"tok-metrics-1"} })
	h := handleMetrics(metricsSource{m: e.app.metrics, sel: e.app.sel, logs: e.app.logs, now: time.Now}, e.app.relay.auth)
	for _, tc := range []struct {
		remote, auth string
		status       int
	}{
		{"127.0.0.1:1", "", 200},
		{"198.51.100.7:1", "", 401},
		{"198.51.100.7:1", "Bearer wrong", 401},
		{"198.51.100.7:1", "Bearer tok-metrics-1", 200},
	} {
		req, _ := http.NewRequest("GET", "/metrics", nil)
		req.RemoteAddr = tc.remote
		if tc.auth != "" {
			req.Header.Set("Authorization", tc.auth)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != tc.status {
			t.Errorf("%s %q: %d; want %d", tc.remote, tc.auth, rec.Code, tc.status)
		}
	}
}

func TestUnmaskKeysSameMask(t *testing.T) {
	// Two keys that look alike once masked.
	stored := []string{"sk-a-one-key-9Yz", "sk-a-two-key-9Yz", "sk-other-123456"}
	if maskKey(stored[0]) != maskKey(stored[1]) {
		t.Fatal("test keys should share a mask")
	}
	m := maskKey(stored[0])
	got, err := unmaskKeys([]string{m, m, "sk-new-key-000000"}, stored)
	if err != nil || strings.Join(got, ",") != "sk-a-one-key-9Yz,sk-a-two-key-9Yz,sk-new-key-000000" {
		t.Errorf("both masked keys sent back: %v, %v", got, err)
	}
	// Dropping the first: the second mask, at index 0 now, still finds an
	// unused key rather than collapsing onto one.
	got, err = unmaskKeys([]string{m, maskKey(stored[2])}, stored)
	if err != nil || strings.Join(got, ",") != "sk-a-one-key-9Yz,sk-other-123456" {
		t.Errorf("got %v, %v", got, err)
	}
	if _, err := unmaskKeys([]string{m, m, m}, stored); err == nil {
		t.Error("a third copy of a mask matched a key already used")
	}
}

func TestChannelNameLengthCountsCharacters(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	name := strings.Repeat("渠", 100)
	if st, body := e.admin(tok, "POST", "/admin/channels", `{"name":"`+name+`","url":"https://a.example","api_key":"sk-123456789012"}`); st != 201 {
		t.Errorf("100 Chinese characters: %d %s", st, body)
	}
	if st, _ := e.admin(tok, "POST", "/admin/channels", `{"name":"`+name+`渠","url":"https://a.example","api_key":"sk-123456789012"}`); st != 400 {
		t.Errorf("101 characters: %d; want 400", st)
	}
}

func TestChannelIDsAreNotReused(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	mk := func(name string) int64 {
		_, body := e.admin(tok, "POST", "/admin/channels", `{"name":"`+name+`","url":"https://a.example","api_key":"sk-123456789012"}`)
		return decode[channelView](t, body).ID
	}
	mk("a")
	b := mk("b")
	e.admin(tok, "DELETE", fmt.Sprintf("/admin/channels/%d", b), "")
	if c := mk("c"); c == b {
		t.Errorf("deleted channel's id %d was given to a new channel: logs and stats would mix them", b)
	}
}

func TestConcurrentWrongLoginsAreLimited(t *testing.T) {
	e := newTestEnv(t)
	var wg sync.WaitGroup
	var checked atomic.Int64
	for range 30 {
		wg.Go(func() {
			resp, _ := e.do("POST", "/login", `{"password":"guess"}`, nil)
			if resp.StatusCode == 401 {
				checked.Add(1)
			}
		})
	}
	wg.Wait()
	if n := checked.Load(); n != loginMaxFails {
		t.Errorf("%d of 30 concurrent guesses were checked; want %d", n, loginMaxFails)
	}
}

// The channel test is sent and judged by the relay's own code: a 200 HTML
// page is a failure there, so it is one here too, and it must not clear the
// channel's cooldowns. The model it picks is the same every time.
func TestTestChannelJudgesLikeTheRelay(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	up := newFakeUpstream(t, "html")
	up.set(fakeBehavior{HTMLBody: true})
	ch := e.addChannel(Channel{Name: "h", URL: up.URL, ModelRedirects: map[string]string{"zeta": "z-up", "alpha": "a-up", "mid": "m-up"}})
	e.app.cool.fail(e.app.cool.get(ch.ID), 0, "", verdict{scope: scopeChannel, base: time.Minute, status: 503})
	for i := range 5 {
		st, body := e.admin(tok, "POST", fmt.Sprintf("/admin/channels/%d/test", ch.ID), "")
		res := decode[testResult](t, body)
		if st != 200 || res.OK || res.Status != 502 || !strings.Contains(res.Message, "HTML") || res.Model != "alpha" {
			t.Fatalf("test %d: %d %s", i, st, body)
		}
	}
	if s := e.health(ch.ID); s.CooldownUntil == nil {
		t.Error("a failed test cleared the channel's cooldown")
	}
	for _, r := range up.requests() {
		if !strings.Contains(string(r.Body), `"a-up"`) {
			t.Errorf("test sent %s; want the redirected model a-up", r.Body)
		}
	}
}
