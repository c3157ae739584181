package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	cdpbrowser "github.com/chromedp/cdproto/browser"
	"github.com/chromedp/cdproto/emulation"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"
)

// ---------------------------------------------------------------------------
// The file server (web.go), tested through the real routes.

// getWeb fetches url as it is: redirects are reported, not followed, and
// Accept-Encoding is left to hdr, so the tests see what the server chose.
func getWeb(t *testing.T, url string, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	c := &http.Client{
		Transport:     &http.Transport{DisableCompression: true, DisableKeepAlives: true},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

func TestWebRootRedirectsToAdmin(t *testing.T) {
	e := newTestEnv(t)
	for _, tc := range []struct{ path, want string }{
		{"/", "/web/"},
		{"/web", "/web/"},
	} {
		resp, _ := getWeb(t, e.URL+tc.path, nil)
		if resp.StatusCode < 300 || resp.StatusCode > 308 {
			t.Errorf("GET %s: status %d; want a redirect", tc.path, resp.StatusCode)
		}
		if got := resp.Header.Get("Location"); got != tc.want {
			t.Errorf("GET %s: Location %q; want %q", tc.path, got, tc.want)
		}
	}
	// Only the bare root redirects; other unknown paths stay 404.
	resp, _ := getWeb(t, e.URL+"/nothing-here", nil)
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /nothing-here: status %d; want 404", resp.StatusCode)
	}
}

func TestWebServesFilesWithTypesAndHeaders(t *testing.T) {
	e := newTestEnv(t)
	for _, tc := range []struct{ path, ctype, contains string }{
		{"/web/", "text/html; charset=utf-8", `<script type="module" src="app.js">`},
		{"/web/index.html", "text/html; charset=utf-8", "<main id=\"view\""},
		{"/web/app.js", "text/javascript; charset=utf-8", "import"},
		{"/web/pages/logs.js", "text/javascript; charset=utf-8", "before_id"},
		{"/web/style.css", "text/css; charset=utf-8", "prefers-color-scheme"},
		{"/web/favicon.svg", "image/svg+xml", "<svg"},
	} {
		resp, body := getWeb(t, e.URL+tc.path, nil)
		if resp.StatusCode != 200 {
			t.Errorf("GET %s: status %d; want 200", tc.path, resp.StatusCode)
			continue
		}
		h := resp.Header
		if got := h.Get("Content-Type"); got != tc.ctype {
			t.Errorf("GET %s: Content-Type %q; want %q", tc.path, got, tc.ctype)
		}
		if !bytes.Contains(body, []byte(tc.contains)) {
			t.Errorf("GET %s: body lacks %q", tc.path, tc.contains)
		}
		want := map[string]string{
			"X-Content-Type-Options": "nosniff",
			"X-Frame-Options":        "DENY",
			"Referrer-Policy":        "no-referrer",
			"Cache-Control":          "no-cache",
		}
		for k, v := range want {
			if got := h.Get(k); got != v {
				t.Errorf("GET %s: %s %q; want %q", tc.path, k, got, v)
			}
		}
		csp := h.Get("Content-Security-Policy")
		for _, d := range []string{"script-src 'self'", "frame-ancestors 'none'", "default-src 'none'"} {
			if !strings.Contains(csp, d) {
				t.Errorf("GET %s: CSP %q lacks %q", tc.path, csp, d)
			}
		}
		if strings.Contains(csp, "unsafe-inline") || strings.Contains(csp, "unsafe-eval") {
			t.Errorf("GET %s: CSP %q allows inline or eval", tc.path, csp)
		}
		if h.Get("ETag") == "" {
			t.Errorf("GET %s: no ETag", tc.path)
		}
	}
}

func TestWebUnknownFilesAre404(t *testing.T) {
	e := newTestEnv(t)
	for _, p := range []string{"/web/nope.js", "/web/pages/", "/web/pages", "/web/static/index.html", "/web/INDEX.HTML", "/web/app.js.map"} {
		resp, body := getWeb(t, e.URL+p, nil)
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s: status %d; want 404", p, resp.StatusCode)
		}
		if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
			t.Errorf("GET %s: Content-Type %q; want text/plain (never the index page)", p, ct)
		}
		if bytes.Contains(body, []byte("<html")) {
			t.Errorf("GET %s: 404 body is HTML", p)
		}
		if resp.Header.Get("X-Content-Type-Options") != "nosniff" || resp.Header.Get("Content-Security-Policy") == "" {
			t.Errorf("GET %s: 404 without security headers: %v", p, resp.Header)
		}
	}
	// Path tricks are cleaned by the mux and never leave static/.
	resp, body := getWeb(t, e.URL+"/web/../main.go", nil)
	if resp.StatusCode == 200 && bytes.Contains(body, []byte("package main")) {
		t.Errorf("GET /web/../main.go served source code")
	}
}

func TestWebMethods(t *testing.T) {
	e := newTestEnv(t)
	resp, body := e.do("HEAD", "/web/app.js", "", nil)
	if resp.StatusCode != 200 || len(body) != 0 {
		t.Errorf("HEAD: status %d, %d body bytes; want 200 and none", resp.StatusCode, len(body))
	}
	if resp.ContentLength <= 0 {
		t.Errorf("HEAD: Content-Length %d; want the file size", resp.ContentLength)
	}
	resp, _ = e.do("POST", "/web/", "x", nil)
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /web/: status %d; want 405", resp.StatusCode)
	}
}

func TestWebConditionalAndCompressed(t *testing.T) {
	e := newTestEnv(t)
	plainResp, plain := getWeb(t, e.URL+"/web/app.js", nil)
	etag := plainResp.Header.Get("ETag")
	if plainResp.Header.Get("Content-Encoding") != "" {
		t.Fatalf("no Accept-Encoding: got Content-Encoding %q", plainResp.Header.Get("Content-Encoding"))
	}
	if !strings.Contains(plainResp.Header.Get("Vary"), "Accept-Encoding") {
		t.Errorf("Vary %q; want Accept-Encoding", plainResp.Header.Get("Vary"))
	}

	resp, body := getWeb(t, e.URL+"/web/app.js", map[string]string{"If-None-Match": etag})
	if resp.StatusCode != http.StatusNotModified || len(body) != 0 {
		t.Errorf("If-None-Match current: status %d, %d bytes; want 304, none", resp.StatusCode, len(body))
	}
	resp, _ = getWeb(t, e.URL+"/web/app.js", map[string]string{"If-None-Match": `"stale", W/` + etag})
	if resp.StatusCode != http.StatusNotModified {
		t.Errorf("If-None-Match list with weak match: status %d; want 304", resp.StatusCode)
	}
	resp, _ = getWeb(t, e.URL+"/web/app.js", map[string]string{"If-None-Match": `"stale"`})
	if resp.StatusCode != 200 {
		t.Errorf("If-None-Match stale: status %d; want 200", resp.StatusCode)
	}

	gzResp, gz := getWeb(t, e.URL+"/web/app.js", map[string]string{"Accept-Encoding": "br, gzip;q=0.8"})
	if gzResp.Header.Get("Content-Encoding") != "gzip" {
		t.Fatalf("Accept-Encoding gzip: Content-Encoding %q; want gzip", gzResp.Header.Get("Content-Encoding"))
	}
	if gzResp.Header.Get("ETag") == etag {
		t.Errorf("gzip and identity share the ETag %s", etag)
	}
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatal(err)
	}
	unz, err := io.ReadAll(zr)
	if err != nil || !bytes.Equal(unz, plain) {
		t.Errorf("gzip body does not decompress to the file (err %v)", err)
	}
	resp, _ = getWeb(t, e.URL+"/web/app.js", map[string]string{"Accept-Encoding": "gzip;q=0, *"})
	if resp.Header.Get("Content-Encoding") != "" {
		t.Errorf("gzip;q=0: got Content-Encoding %q; want none", resp.Header.Get("Content-Encoding"))
	}
}

func TestAcceptsGzip(t *testing.T) {
	for v, want := range map[string]bool{
		"": false, "gzip": true, "GZIP": true, "deflate, gzip;q=1.0": true, "br": false,
		"gzip;q=0": false, "*": true, "*;q=0": false, "gzip;q=0, *": false, "identity, *;q=0.5": true,
	} {
		if got := acceptsGzip(v); got != want {
			t.Errorf("acceptsGzip(%q) = %v; want %v", v, got, want)
		}
	}
}

// TestWebAssetsAreConsistent reads the shipped files the way a browser
// would: every file index.html names and every module a script imports must
// exist, and nothing may need what the CSP forbids (inline script or style,
// eval) or build HTML from strings.
func TestWebAssetsAreConsistent(t *testing.T) {
	sfs := webStatic()
	index, err := fs.ReadFile(sfs, "index.html")
	if err != nil {
		t.Fatal(err)
	}
	refs := regexp.MustCompile(`(?:src|href)="([^"#:]+)"`).FindAllSubmatch(index, -1)
	if len(refs) < 3 {
		t.Fatalf("index.html names only %d files", len(refs))
	}
	for _, m := range refs {
		if _, err := fs.Stat(sfs, string(m[1])); err != nil {
			t.Errorf("index.html names %q, which is not in static/", m[1])
		}
	}
	if regexp.MustCompile(`<script(?:\s+type="module")?>`).Match(index) {
		t.Error("index.html has an inline script; the CSP blocks it")
	}
	if regexp.MustCompile(`\s(?:on[a-z]+|style)=`).Match(index) {
		t.Error("index.html has an inline handler or style attribute; the CSP blocks it")
	}
	importRe := regexp.MustCompile(`(?m)^import .* from '([^']+)';|import\('([^']+)'\)`)
	err = fs.WalkDir(sfs, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || path.Ext(p) != ".js" {
			return err
		}
		src, err := fs.ReadFile(sfs, p)
		if err != nil {
			return err
		}
		for _, m := range importRe.FindAllSubmatch(src, -1) {
			target := string(m[1]) + string(m[2])
			full := path.Join(path.Dir(p), target)
			if _, err := fs.Stat(sfs, full); err != nil {
				t.Errorf("%s imports %q (%s), which does not exist", p, target, full)
			}
		}
		for _, bad := range []string{"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "setAttribute('style'"} {
			if bytes.Contains(src, []byte(bad)) {
				t.Errorf("%s uses %s", p, bad)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// ---------------------------------------------------------------------------
// Browser tests: the real admin in headless Chromium, against a real ccload.

const browserTimeout = 20 * time.Second

// browser is one tab of the shared headless Chromium, for one test.
type browser struct {
	t   *testing.T
	ctx context.Context
	env *testEnv

	mu       sync.Mutex // guards problems
	problems []string   // console errors and uncaught exceptions
}

func chromiumPath() string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if _, err := os.Stat("/usr/bin/chromium"); err == nil {
		return "/usr/bin/chromium"
	}
	return ""
}

// startChromium starts one headless Chromium for the browser tests; each
// test gets its own tab in its own browser context (cookies and storage
// apart) from newBrowser. Without Chromium the tests are skipped, loudly,
// unless CCLOAD_REQUIRE_BROWSER=1 (as in CI) makes that a failure.
func startChromium(t *testing.T) context.Context {
	t.Helper()
	exe := chromiumPath()
	if exe == "" {
		msg := "BROWSER TESTS NOT RUN: no chromium found (apt-get install chromium)"
		if os.Getenv("CCLOAD_REQUIRE_BROWSER") == "1" {
			t.Fatal(msg + "; CCLOAD_REQUIRE_BROWSER=1 requires it")
		}
		t.Skip(msg)
	}
	if testing.Short() {
		t.Skip("browser tests skipped in -short mode")
	}
	profile := t.TempDir()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(exe),
		chromedp.Headless,
		chromedp.NoSandbox, // tests run as root in CI containers
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.UserDataDir(profile),
		chromedp.WindowSize(1280, 900),
		// This network is closed: without these Chromium keeps trying to
		// reach Google and slows everything down.
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("disable-domain-reliability", true),
		chromedp.Flag("no-default-browser-check", true),
		chromedp.Flag("lang", "en-US"),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelBrowser := chromedp.NewContext(actx)
	t.Cleanup(func() {
		cancelBrowser()
		cancelAlloc() // waits for the browser to exit, before TempDir removes the profile
	})
	// The first Run starts the browser; it must not carry a timeout.
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	return ctx
}

// newBrowser opens a fresh tab for one test against e, and watches its
// console: an uncaught exception or console error fails the test.
func newBrowser(t *testing.T, bctx context.Context, e *testEnv) *browser {
	t.Helper()
	ctx, cancel := chromedp.NewContext(bctx, chromedp.WithNewBrowserContext())
	t.Cleanup(cancel)
	b := &browser{t: t, ctx: ctx, env: e}
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("open a tab: %v", err)
	}
	b.emulate(1280, 860, false)
	msgs := chromedp.Console(ctx)
	go func() {
		for m, err := range msgs {
			if err != nil {
				return
			}
			b.noteConsole(m)
		}
	}()
	t.Cleanup(b.checkConsole)
	return b
}

func (b *browser) noteConsole(m chromedp.ConsoleMessage) {
	if !m.IsException() && m.Type != chromedp.ConsoleError {
		return
	}
	// The browser logs every API error answer as a failed resource. The
	// tests cause some on purpose (a wrong password, a duplicate name, a
	// 401 after logout) and check the page shows them; a failed load of
	// the admin's own files is still a problem.
	if m.Source == "network" && (strings.Contains(m.URL, "/admin/") || strings.HasSuffix(m.URL, "/login")) {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	text := m.Text
	if m.URL != "" {
		text = fmt.Sprintf("%s (%s:%d)", text, m.URL, m.Line+1)
	}
	b.problems = append(b.problems, string(m.Type)+": "+text)
}

func (b *browser) checkConsole() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, p := range b.problems {
		b.t.Errorf("browser console: %s", p)
	}
}

// do runs steps with a deadline, failing the test with what was running.
func (b *browser) do(what string, steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, browserTimeout)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		b.t.Fatalf("%s: %v\n%s", what, err, b.describePage())
	}
}

// describePage is what a failure message shows of the page.
func (b *browser) describePage() string {
	ctx, cancel := context.WithTimeout(b.ctx, 3*time.Second)
	defer cancel()
	s, err := chromedp.Run(ctx, chromedp.Evaluate[string](`location.hash + "\n" + (document.querySelector('#view') || document.body).innerText.slice(0, 1500)`))
	if err != nil {
		return "(page unavailable: " + err.Error() + ")"
	}
	return "page " + s
}

// eval returns the value of a JavaScript expression.
func eval[T any](b *browser, expr string) T {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, browserTimeout)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr, chromedp.EvalAwaitPromise))
	if err != nil {
		b.t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// waitJS waits until a JavaScript condition holds in the page, re-checking
// on every DOM change (the page re-renders on each API answer).
func (b *browser) waitJS(what, cond string) {
	b.t.Helper()
	b.do("wait for "+what, chromedp.Steps(func(ctx context.Context, t *chromedp.Target) (chromedp.Void, error) {
		_, err := chromedp.Poll[bool](cond, chromedp.WithPollingMutation(), chromedp.WithPollingTimeout(browserTimeout))(ctx, t)
		return chromedp.Void{}, err
	}))
}

func (b *browser) text(sel string) string {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, browserTimeout)
	defer cancel()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
	if err != nil {
		b.t.Fatalf("text of %s: %v\n%s", sel, err, b.describePage())
	}
	return s
}

// route moves the app to a page; the hash changes, the document stays.
func (b *browser) route(hash, readySel string) {
	b.t.Helper()
	b.do("go to "+hash,
		chromedp.Evaluate[chromedp.Void](fmt.Sprintf("location.hash = %q", hash)),
		chromedp.WaitVisible(chromedp.CSS(readySel)))
}

// open loads the admin afresh at hash.
func (b *browser) open(hash, readySel string) {
	b.t.Helper()
	b.do("open "+hash, chromedp.Navigate(b.env.URL+"/web/"+hash), chromedp.WaitVisible(chromedp.CSS(readySel)))
}

// loginAt opens the admin at hash with a session. The login form has its
// own test; the others take a session from POST /login and give the browser
// the cookie the form would have received.
func (b *browser) loginAt(hash, readySel string) {
	b.t.Helper()
	tok := b.env.login()
	b.do("set the session cookie", chromedp.Func(func(ctx context.Context, _ *chromedp.Target) error {
		_, err := chromedp.Call(ctx, network.SetCookie, network.SetCookieParams{
			Name: sessionCookie, Value: tok, URL: b.env.URL + "/", HTTPOnly: new(true), SameSite: network.CookieSameSiteStrict})
		return err
	}))
	b.open(hash, readySel)
}

// shot saves a full-page PNG under testdata/artifacts for people to look at.
func (b *browser) shot(name string) {
	b.t.Helper()
	b.save(name, chromedp.FullScreenshot(100)) // quality 100 means PNG
}

func (b *browser) save(name string, capture chromedp.Action[[]byte]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, browserTimeout)
	defer cancel()
	png, err := chromedp.Run(ctx, capture)
	if err != nil {
		b.t.Fatalf("screenshot %s: %v", name, err)
	}
	dir := filepath.Join("testdata", "artifacts")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+".png"), png, 0o644); err != nil {
		b.t.Fatal(err)
	}
}

// shotViewport saves what the screen shows, as a phone user sees it.
func (b *browser) shotViewport(name string) {
	b.t.Helper()
	b.save(name, chromedp.CaptureScreenshot())
}

func (b *browser) emulate(width, height int64, dark bool) {
	b.t.Helper()
	scheme := "light"
	if dark {
		scheme = "dark"
	}
	b.do("emulate", chromedp.EmulateViewport(width, height), chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		_, err := chromedp.Call(ctx, emulation.SetEmulatedMedia, emulation.SetEmulatedMediaParams{
			Features: []*emulation.MediaFeature{{Name: "prefers-color-scheme", Value: scheme}}})
		return err
	}))
}

// rowSel is the CSS selector of a table row by a data attribute.
func rowSel(table, attr, value string) string {
	return fmt.Sprintf(`#%s tr[data-%s=%q]`, table, attr, value)
}

// TestBrowser drives the web admin in headless Chromium against a real
// ccload: one browser, one fresh tab and server per subtest.
func TestBrowser(t *testing.T) {
	bctx := startChromium(t)
	for _, tc := range []struct {
		name string
		run  func(*testing.T, context.Context)
	}{
		{"Login", testBrowserLogin},
		{"Channels", testBrowserChannels},
		{"Cooldown", testBrowserCooldown},
		{"CSV", testBrowserCSV},
		{"Redis", testBrowserRedis},
		{"Webhooks", testBrowserWebhooks},
		{"Logs", testBrowserLogs},
		{"Language", testBrowserLanguage},
		{"DefaultLanguage", testBrowserDefaultLanguage},
		{"Screenshots", testBrowserScreenshots},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.run(t, bctx) })
	}
}

func testBrowserLogin(t *testing.T, bctx context.Context) {
	e := newTestEnv(t)
	b := newBrowser(t, bctx, e)

	// / leads to the admin, which sends a visitor without a session to login.
	b.do("open /", chromedp.Navigate(e.URL+"/"), chromedp.WaitVisible(chromedp.CSS("#password")))
	if h := eval[string](b, "location.pathname + location.hash"); !strings.HasPrefix(h, "/web/#/login") {
		t.Errorf("without a session, landed on %q; want /web/#/login…", h)
	}
	b.shot("login")

	b.do("wrong password",
		chromedp.SendKeys(chromedp.CSS("#password"), "not the password"),
		chromedp.Click(chromedp.CSS("#login-submit")),
		chromedp.WaitVisible(chromedp.CSS("#login-error")))
	if got := b.text("#login-error"); !strings.Contains(got, "Wrong password") {
		t.Errorf("login error says %q; want it to say Wrong password", got)
	}
	b.shot("login-error")

	b.do("right password",
		chromedp.Clear(chromedp.CSS("#password")),
		chromedp.SendKeys(chromedp.CSS("#password"), testAdminPass+kb.Enter),
		chromedp.WaitVisible(chromedp.CSS("#summary-cards .stat")))
	if got := b.text("h1"); got != "Dashboard" {
		t.Errorf("after login, h1 = %q; want Dashboard", got)
	}
	// The session cookie is HttpOnly: scripts never see it.
	if c := eval[string](b, "document.cookie"); strings.Contains(c, sessionCookie) {
		t.Errorf("document.cookie exposes the session: %q", c)
	}

	// Logging out ends the session on the server; the next API call's 401
	// leads back to the login page, remembering where the user was.
	b.do("log out", chromedp.Click(chromedp.CSS("#logout")), chromedp.WaitVisible(chromedp.CSS("#password")))
	b.route("#/channels", "#password")
	if h := eval[string](b, "location.hash"); h != "#/login?next=channels" {
		t.Errorf("after logout, #/channels went to %q; want #/login?next=channels", h)
	}
	b.do("log in again",
		chromedp.SendKeys(chromedp.CSS("#password"), testAdminPass+kb.Enter),
		chromedp.WaitVisible(chromedp.CSS("#add-channel")))
}

func testBrowserChannels(t *testing.T, bctx context.Context) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "up")
	spare := e.addChannel(Channel{Name: "Spare", URL: up.URL, Priority: -1})
	b := newBrowser(t, bctx, e)
	b.loginAt("#/channels", rowSel("channels-table", "name", "Spare"))

	// Add a channel through the dialog, with every field.
	b.do("open the add dialog", chromedp.Click(chromedp.CSS("#add-channel")), chromedp.WaitVisible(chromedp.CSS("#channel-dialog #ch-name")))
	b.do("fill the form",
		chromedp.SendKeys(chromedp.CSS("#ch-name"), "Primary relay"),
		// Typing is slow over the protocol; the form reads values on
		// submit, so the long fields are set directly.
		chromedp.SetValue(chromedp.CSS("#ch-url"), up.URL+"/"),
		chromedp.SetValue(chromedp.CSS("#ch-priority"), "5"),
		chromedp.SetValue(chromedp.CSS("#ch-strategy"), "round_robin"),
		chromedp.SetValue(chromedp.CSS("#ch-keys"), "sk-test-aaaa-1111-first\nsk-test-bbbb-2222-second"),
		chromedp.SetValue(chromedp.CSS("#ch-models"), "claude-sonnet-4-5, claude-haiku-4-5"),
		chromedp.Click(chromedp.CSS("#ch-add-redirect")),
		chromedp.SetValue(chromedp.CSS(`#ch-redirects input[data-role="from"]`), "claude-opus-4"),
		chromedp.SendKeys(chromedp.CSS(`#ch-redirects input[data-role="to"]`), "claude-sonnet-4-5"))
	b.shot("channel-add-dialog")
	b.do("save", chromedp.Click(chromedp.CSS("#ch-save")),
		chromedp.WaitNotPresent(chromedp.CSS("#channel-dialog")),
		chromedp.WaitVisible(chromedp.CSS(rowSel("channels-table", "name", "Primary relay"))))

	chs, err := e.app.store.ListChannels(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var got *Channel
	for i := range chs {
		if chs[i].Name == "Primary relay" {
			got = &chs[i]
		}
	}
	if got == nil {
		t.Fatalf("the dialog's channel is not stored; have %d channels", len(chs))
	}
	if got.URL != up.URL || got.Priority != 5 || got.KeyStrategy != keyRoundRobin || !got.Enabled ||
		!slices.Equal(got.APIKeys, []string{"sk-test-aaaa-1111-first", "sk-test-bbbb-2222-second"}) ||
		!slices.Equal(got.Models, []string{"claude-sonnet-4-5", "claude-haiku-4-5"}) ||
		got.ModelRedirects["claude-opus-4"] != "claude-sonnet-4-5" || len(got.ModelRedirects) != 1 {
		t.Errorf("stored channel = %+v", *got)
	}
	row := rowSel("channels-table", "name", "Primary relay")
	// Priority 5 sorts above Spare (-1) by default.
	if first := eval[string](b, `document.querySelector('#channels-table tbody tr').dataset.name`); first != "Primary relay" {
		t.Errorf("first row is %q; want the higher priority Primary relay", first)
	}
	if html := eval[string](b, "document.body.innerHTML"); strings.Contains(html, "sk-test-aaaa-1111-first") {
		t.Error("the page shows a full key")
	}

	// Sorting by name puts Primary relay before Spare; again reverses it.
	b.do("sort by name", chromedp.Click(chromedp.CSS(`#channels-table th button[data-key="name"]`)))
	order := eval[[]string](b, `[...document.querySelectorAll('#channels-table tbody tr')].map(r => r.dataset.name)`)
	if !slices.Equal(order, []string{"Primary relay", "Spare"}) {
		t.Errorf("sorted by name: %v", order)
	}
	b.do("sort by name, reversed", chromedp.Click(chromedp.CSS(`#channels-table th button[data-key="name"]`)))
	order = eval[[]string](b, `[...document.querySelectorAll('#channels-table tbody tr')].map(r => r.dataset.name)`)
	if !slices.Equal(order, []string{"Spare", "Primary relay"}) {
		t.Errorf("sorted by name, reversed: %v", order)
	}
	b.shot("channels")

	// Edit: the keys field shows masked keys only; saving without touching
	// it keeps the stored keys.
	b.do("open the edit dialog", chromedp.Click(chromedp.CSS(row+` [data-action="edit"]`)), chromedp.WaitVisible(chromedp.CSS("#channel-dialog #ch-keys")))
	keysField := eval[string](b, `document.querySelector('#ch-keys').value`)
	if strings.Contains(keysField, "1111-first") || strings.Count(keysField, "…") != 2 {
		t.Errorf("edit dialog keys field = %q; want two masked keys", keysField)
	}
	b.shot("channel-edit-dialog")
	b.do("edit priority", chromedp.SetValue(chromedp.CSS("#ch-priority"), "7"), chromedp.Click(chromedp.CSS("#ch-save")),
		chromedp.WaitNotPresent(chromedp.CSS("#channel-dialog")))
	b.waitJS("priority 7 in the table", `document.querySelector('`+row+` td:nth-child(3)')?.textContent === '7'`)
	c, err := e.app.store.GetChannel(context.Background(), got.ID)
	if err != nil {
		t.Fatal(err)
	}
	if c.Priority != 7 || !slices.Equal(c.APIKeys, got.APIKeys) {
		t.Errorf("after edit: priority %d, keys %q; want 7 and the keys unchanged", c.Priority, c.APIKeys)
	}

	// An API error shows in the dialog: a duplicate name is refused.
	b.do("add a duplicate", chromedp.Click(chromedp.CSS("#add-channel")), chromedp.WaitVisible(chromedp.CSS("#ch-name")),
		chromedp.SendKeys(chromedp.CSS("#ch-name"), "Spare"),
		chromedp.SetValue(chromedp.CSS("#ch-url"), up.URL),
		chromedp.SetValue(chromedp.CSS("#ch-keys"), "sk-dup-key-000000"),
		chromedp.Click(chromedp.CSS("#ch-save")),
		chromedp.WaitVisible(chromedp.CSS("#ch-error")))
	if msg := b.text("#ch-error"); !strings.Contains(strings.ToLower(msg), "spare") && !strings.Contains(strings.ToLower(msg), "exist") {
		t.Errorf("duplicate name error = %q; want the API's message", msg)
	}
	b.do("close with Escape", chromedp.KeyEvent(kb.Escape), chromedp.WaitNotPresent(chromedp.CSS("#channel-dialog")))

	// Test: a real request through the channel to the fake upstream.
	b.do("test", chromedp.Click(chromedp.CSS(row+` [data-action="test"]`)),
		chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf("#test-result-%d.ok", got.ID))))
	if res := b.text(fmt.Sprintf("#test-result-%d", got.ID)); !strings.Contains(res, "200") || !strings.Contains(res, "ms") {
		t.Errorf("test result = %q; want status 200 and a latency", res)
	}
	if up.count() == 0 {
		t.Error("the test button sent nothing upstream")
	}

	// The switch disables the channel.
	b.do("disable", chromedp.Click(chromedp.CSS(row+` [data-action="toggle"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#channels-table tr.disabled[data-name="Primary relay"]`)))
	if c, _ := e.app.store.GetChannel(context.Background(), got.ID); c.Enabled {
		t.Error("the switch did not disable the channel")
	}

	// Delete asks first; Cancel keeps the channel, OK deletes it.
	spareRow := rowSel("channels-table", "name", "Spare")
	b.do("delete, cancel", chromedp.Click(chromedp.CSS(spareRow+` [data-action="delete"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-ok")),
		chromedp.KeyEvent(kb.Escape), chromedp.WaitNotPresent(chromedp.CSS("#confirm-dialog")))
	if _, err := e.app.store.GetChannel(context.Background(), spare.ID); err != nil {
		t.Fatalf("cancelled delete removed the channel: %v", err)
	}
	b.do("delete, confirm", chromedp.Click(chromedp.CSS(spareRow+` [data-action="delete"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-ok")),
		chromedp.Click(chromedp.CSS("#confirm-ok")), chromedp.WaitNotPresent(chromedp.CSS(spareRow)))
	if _, err := e.app.store.GetChannel(context.Background(), spare.ID); !errors.Is(err, errNotFound) {
		t.Errorf("after delete, GetChannel: %v; want not found", err)
	}
}

func testBrowserCooldown(t *testing.T, bctx context.Context) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "up")
	ch := e.addChannel(Channel{Name: "Flaky", URL: up.URL, APIKeys: []string{"sk-flaky-key-0000", "sk-flaky-key-1111"}})
	e.addChannel(Channel{Name: "Steady", URL: up.URL})
	h := e.app.cool.get(ch.ID)
	e.app.cool.fail(h, -1, "", verdict{scope: scopeChannel, base: defaultCooldownPolicy.Transient, status: 503, reason: "upstream 503 overloaded"})
	e.app.cool.fail(h, 1, "", verdict{scope: scopeKey, base: defaultCooldownPolicy.Persistent, status: 401, reason: "401 invalid x-api-key"})
	e.app.cool.fail(h, -1, "claude-gone", verdict{scope: scopeModel, base: defaultCooldownPolicy.Persistent, status: 404, reason: "model not found"})

	b := newBrowser(t, bctx, e)
	flaky := rowSel("health-table", "name", "Flaky")
	b.loginAt("#/dashboard", flaky+" .badge.err .countdown")
	rowText := b.text(flaky)
	for _, want := range []string{"upstream 503 overloaded", "401 invalid x-api-key", "claude-gone", "model not found"} {
		if !strings.Contains(rowText, want) {
			t.Errorf("health row lacks %q:\n%s", want, rowText)
		}
	}
	if s := b.text(rowSel("health-table", "name", "Steady")); !strings.Contains(s, "Healthy") {
		t.Errorf("Steady's row = %q; want Healthy", s)
	}
	if got := b.text("#summary-cards"); !regexp.MustCompile(`(?i)cooling down\s*1`).MatchString(got) {
		t.Errorf("summary cards = %q; want 1 channel cooling down", got)
	}
	// The countdown is live: it changes without a reload.
	first := b.text(flaky + " .badge.err .countdown")
	if !regexp.MustCompile(`^\d+s$`).MatchString(first) {
		t.Errorf("countdown reads %q; want seconds like 29s", first)
	}
	b.waitJS("the countdown to tick", fmt.Sprintf(`document.querySelector(%q)?.textContent !== %q`, flaky+" .badge.err .countdown", first))
	if !strings.Contains(b.text("#redis-status"), "not configured") {
		t.Errorf("redis line = %q; want not configured", b.text("#redis-status"))
	}
	b.shot("dashboard-cooldown")

	row := rowSel("channels-table", "name", "Flaky")
	b.route("#/channels", row)
	if s := b.text(row); !strings.Contains(s, "Cooling down") {
		t.Errorf("channels row = %q; want Cooling down", s)
	}
	b.do("clear cooldown", chromedp.Click(chromedp.CSS(row+` [data-action="clear"]`)),
		chromedp.WaitNotPresent(chromedp.CSS(row+` [data-action="clear"]`)),
		chromedp.WaitVisible(chromedp.CSS(row+" .badge.ok")))
	st := e.health(ch.ID)
	if st.CooldownUntil != nil || len(st.Models) != 0 || st.Keys[1].CooldownUntil != nil {
		t.Errorf("after clearing, state = %+v; want nothing cooling", st)
	}
}

func testBrowserCSV(t *testing.T, bctx context.Context) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "up")
	e.addChannel(Channel{Name: "existing", URL: up.URL, APIKeys: []string{"sk-existing-full-key-123"}})
	b := newBrowser(t, bctx, e)
	b.loginAt("#/channels", rowSel("channels-table", "name", "existing"))
	dir := t.TempDir()
	count := func() int {
		chs, err := e.app.store.ListChannels(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return len(chs)
	}

	// A bad file changes nothing, and the page lists its problems by line.
	bad := filepath.Join(dir, "bad.csv")
	if err := os.WriteFile(bad, []byte("name,url,api_key,priority\nbroken,not-a-url,sk-broken-key-1,high\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	b.do("import a bad file", chromedp.SetUploadFiles(chromedp.CSS("#csv-file"), []string{bad}),
		chromedp.WaitVisible(chromedp.CSS("#import-problems tbody tr")))
	if txt := b.text("#import-problems"); !strings.Contains(txt, "bad.csv") || !regexp.MustCompile(`(?m)^\s*2\s`).MatchString(txt) {
		t.Errorf("import problems dialog = %q; want the file name and line 2", txt)
	}
	b.shot("csv-import-problems")
	b.do("close", chromedp.KeyEvent(kb.Escape), chromedp.WaitNotPresent(chromedp.CSS("#import-problems")))
	if n := count(); n != 1 {
		t.Fatalf("a refused import changed the channels: %d; want 1", n)
	}

	// A good file, with Chinese headers, is imported and shows up.
	good := filepath.Join(dir, "good.csv")
	if err := os.WriteFile(good, []byte("名称,地址,密钥,优先级\nimported-one,https://api.example.com,sk-imported-key-aaaa,3\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	b.do("import a good file", chromedp.SetUploadFiles(chromedp.CSS("#csv-file"), []string{good}),
		chromedp.WaitVisible(chromedp.CSS(rowSel("channels-table", "name", "imported-one"))))
	if txt := b.text("#toasts"); !strings.Contains(txt, "1 created") {
		t.Errorf("toast = %q; want 1 created", txt)
	}

	// Export downloads the backup, which (unlike the page) has full keys.
	downloads := t.TempDir()
	wctx, cancel := context.WithTimeout(b.ctx, browserTimeout)
	defer cancel()
	events := chromedp.BrowserEvents(wctx, cdpbrowser.DownloadProgress)
	b.do("allow downloads", chromedp.Func(func(ctx context.Context, _ *chromedp.Target) error {
		_, err := chromedp.CallBrowser(ctx, cdpbrowser.SetDownloadBehavior, cdpbrowser.SetDownloadBehaviorParams{
			Behavior: cdpbrowser.SetDownloadBehaviorBehaviorAllow, DownloadPath: downloads,
			BrowserContextID: chromedp.FromContext(b.ctx).BrowserContextID, EventsEnabled: new(true)})
		return err
	}), chromedp.Click(chromedp.CSS("#csv-export")))
	for ev, err := range events {
		if err != nil {
			t.Fatalf("waiting for the export download: %v", err)
		}
		if ev.State == cdpbrowser.DownloadProgressStateCompleted {
			break
		}
		if ev.State == cdpbrowser.DownloadProgressStateCanceled {
			t.Fatalf("export download ended as %s", ev.State)
		}
	}
	files, _ := filepath.Glob(filepath.Join(downloads, "*.csv"))
	if len(files) != 1 {
		t.Fatalf("downloaded files: %v; want one .csv", files)
	}
	csv, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(csv, []byte("\ufeffid,name,api_key")) || !bytes.Contains(csv, []byte("sk-existing-full-key-123")) ||
		!bytes.Contains(csv, []byte("imported-one")) {
		t.Errorf("exported CSV:\n%s", csv)
	}
}

// testBrowserRedis shows the mirror's state on the dashboard, up and down,
// with a real redis-server.
func testBrowserRedis(t *testing.T, bctx context.Context) {
	r := startRedis(t, "")
	e := newTestEnv(t, func(c *config) { c.RedisURL = r.redisURL() })
	m := e.app.mirror
	m.caughtUp(t)
	b := newBrowser(t, bctx, e)
	b.loginAt("#/dashboard", "#summary-cards .stat")
	b.waitJS("mirror in sync", `document.querySelector('#redis-status .badge.ok') !== null`)
	if s := b.text("#redis-status"); !strings.Contains(s, "in sync") || !strings.Contains(s, "127.0.0.1:") {
		t.Errorf("redis line = %q; want in sync and the address", s)
	}
	// The replicas line: this replica, alive, from its own heartbeat.
	b.waitJS("replicas listed", `document.querySelector('#replicas .badge.ok[data-replica]') !== null`)
	if s := b.text("#replicas"); !strings.Contains(s, e.cfg.Replica) || !strings.Contains(s, "this one") {
		t.Errorf("replicas line = %q; want %q (this one)", s, e.cfg.Replica)
	}

	// Redis goes away; the next change cannot be written.
	r.stop()
	tok := e.login()
	if st, body := e.admin(tok, "POST", "/admin/channels", `{"name":"after-redis","url":"https://x.example.com","api_key":"sk-after-redis-1"}`); st != 201 {
		t.Fatalf("create: %d %s", st, body)
	}
	m.await(t, "the mirror to notice", func(m *redisMirror) bool { return m.down })
	b.do("refresh", chromedp.Click(chromedp.CSS("#dash-refresh")))
	b.waitJS("mirror down", `document.querySelector('#redis-status .badge.err') !== null`)
	if s := b.text("#redis-status"); !strings.Contains(s, "unavailable") {
		t.Errorf("redis line = %q; want unavailable and the error", s)
	}
	b.shot("dashboard-redis-down")
}

func testBrowserLogs(t *testing.T, bctx context.Context) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "up")
	ch := e.addChannel(Channel{Name: "logs-ch", URL: up.URL, Models: []string{"claude-logs-model"}})
	b := newBrowser(t, bctx, e)
	b.loginAt("#/logs", "#logs-list .empty")
	b.do("auto-refresh on", chromedp.Click(chromedp.CSS("#logs-auto")))
	if !eval[bool](b, `document.querySelector('#logs-auto').checked && localStorage.getItem('ccload.logs.autoRefresh') === '1'`) {
		t.Error("auto-refresh switch is not on, or not remembered")
	}

	// A proxied request appears by itself.
	resp, body := e.post("/v1/messages", anthropicBody("claude-logs-model", false))
	if resp.StatusCode != 200 {
		t.Fatalf("proxied request: %d %s", resp.StatusCode, body)
	}
	newRow := rowSel("logs-table", "model", "claude-logs-model")
	b.do("see the request", chromedp.WaitVisible(chromedp.CSS(newRow)))
	if s := b.text(newRow); !strings.Contains(s, "logs-ch") || !strings.Contains(s, "200") {
		t.Errorf("log row = %q; want the channel and status 200", s)
	}
	b.do("open the row", chromedp.Click(chromedp.CSS(newRow+` [data-action="detail"]`)), chromedp.WaitVisible(chromedp.CSS("#log-detail")))
	detail := b.text("#log-detail")
	for _, want := range []string{"logs-ch", "claude-logs-model", "anthropic", fmt.Sprint(fakeInputTokens), fmt.Sprint(fakeOutputTokens)} {
		if !strings.Contains(detail, want) {
			t.Errorf("detail lacks %q:\n%s", want, detail)
		}
	}
	b.shot("logs-detail")
	b.do("close the detail with Escape", chromedp.KeyEvent(kb.Escape), chromedp.WaitNotPresent(chromedp.CSS("#log-detail")))

	// Enough rows for three pages, some failing, all older than the request.
	var rows []logEntry
	base := time.Now().Add(-2 * time.Hour)
	for i := range 120 {
		st := 200
		if i%10 == 0 {
			st = 503
		}
		rows = append(rows, logEntry{Time: base.Add(time.Duration(i) * time.Second), Protocol: "anthropic", Model: "claude-bulk",
			ChannelID: ch.ID, ChannelName: ch.Name, Attempts: 1, Status: st, DurationMS: int64(100 + i), InputTokens: 10, OutputTokens: 20,
			CacheRead: 25, CacheWrite: 5})
	}
	if err := e.app.store.InsertLogs(context.Background(), rows); err != nil {
		t.Fatal(err)
	}
	b.do("turn auto-refresh off", chromedp.Click(chromedp.CSS("#logs-auto")), chromedp.Click(chromedp.CSS("#logs-refresh")))
	b.waitJS("121 rows in all", `document.querySelector('#logs-total').textContent.includes('121')`)
	firstPage := eval[[]string](b, `[...document.querySelectorAll('#logs-table tbody tr')].map(r => r.dataset.id)`)
	if len(firstPage) != 50 {
		t.Fatalf("first page has %d rows; want 50", len(firstPage))
	}
	b.do("older", chromedp.Click(chromedp.CSS("#logs-older")))
	b.waitJS("page 2", `document.querySelector('#logs-page').textContent === 'Page 2'`)
	second := eval[[]string](b, `[...document.querySelectorAll('#logs-table tbody tr')].map(r => r.dataset.id)`)
	if len(second) != 50 || slices.Contains(firstPage, second[0]) {
		t.Errorf("page 2 = %d rows starting at %v; want 50 rows older than page 1", len(second), second[:min(1, len(second))])
	}
	b.do("older again", chromedp.Click(chromedp.CSS("#logs-older")))
	b.waitJS("page 3", `document.querySelector('#logs-page').textContent === 'Page 3'`)
	if n := eval[int](b, `document.querySelectorAll('#logs-table tbody tr').length`); n != 21 {
		t.Errorf("page 3 has %d rows; want 21", n)
	}
	if !eval[bool](b, `document.querySelector('#logs-older').disabled`) {
		t.Error("Older is enabled on the last page")
	}
	b.do("newer", chromedp.Click(chromedp.CSS("#logs-newer")))
	b.waitJS("page 2 again", `document.querySelector('#logs-page').textContent === 'Page 2'`)

	// Filter by status: only the 503s, and the filter is in the URL.
	b.do("filter 5xx", chromedp.SetValue(chromedp.CSS("#f-status"), "5xx"), chromedp.Click(chromedp.CSS("#logs-apply")))
	b.waitJS("12 failures", `document.querySelector('#logs-total').textContent.includes('12 ')`)
	statuses := eval[[]string](b, `[...document.querySelectorAll('#logs-table tbody tr')].map(r => r.dataset.status)`)
	if len(statuses) != 12 || slices.ContainsFunc(statuses, func(s string) bool { return s != "503" }) {
		t.Errorf("5xx filter shows statuses %v; want twelve 503s", statuses)
	}
	if h := eval[string](b, "location.hash"); !strings.Contains(h, "status=5xx") {
		t.Errorf("hash %q does not keep the filter", h)
	}
	// Filter by channel and model from the row detail's link.
	b.do("filter by model", chromedp.SetValue(chromedp.CSS("#f-status"), ""), chromedp.SetValue(chromedp.CSS("#f-model"), "claude-logs-model"),
		chromedp.Click(chromedp.CSS("#logs-apply")))
	b.waitJS("one row", `document.querySelectorAll('#logs-table tbody tr').length === 1 && document.querySelector('#logs-total').textContent.startsWith('1 ')`)
	// A bad filter is the API's 400, shown as a message.
	b.route("#/logs?status=teapot", "#logs-filters")
	b.waitJS("the 400 message", `[...document.querySelectorAll('.error-box')].some(e => !e.hidden && e.textContent.includes('status'))`)

	b.route("#/logs", rowSel("logs-table", "model", "claude-bulk"))
	b.shot("logs")

	b.route("#/stats", rowSel("stats-channel-table", "channel", fmt.Sprint(ch.ID)))
	if s := b.text(rowSel("stats-model-table", "model", "claude-bulk")); !strings.Contains(s, "120") {
		t.Errorf("stats row for claude-bulk = %q; want 120 requests", s)
	}
	// Cache hit ratio: 25 read of 10 + 25 + 5 input tokens a request.
	if s := b.text(rowSel("stats-model-table", "model", "claude-bulk")); !strings.Contains(s, "62.5%") {
		t.Errorf("stats row for claude-bulk = %q; want a cache hit ratio of 62.5%%", s)
	}
	b.do("stats window", chromedp.SetValue(chromedp.CSS("#stats-hours"), "1"), chromedp.Evaluate[chromedp.Void](
		`document.querySelector('#stats-hours').dispatchEvent(new Event('change'))`))
	b.waitJS("1-hour window", `location.hash === '#/stats?hours=1' && !!document.querySelector('#stats-model-table tr[data-model="claude-logs-model"]') && !document.querySelector('#stats-model-table tr[data-model="claude-bulk"]')`)
	// The dashboard gives the 24-hour cache hit ratio beside the token chart.
	b.route("#/dashboard", "#token-chart svg")
	b.waitJS("cache hit ratio", `/^cache hit ratio \d+(\.\d)?%$/.test(document.querySelector('#dash-cache-hit').textContent)`)

	// A request that failed over shows every try, in order, in its detail.
	bad := newFakeUpstream(t, "bad")
	bad.set(fakeBehavior{Status: 529})
	e.addChannel(Channel{Name: "logs-529", URL: bad.URL, Priority: 9, Models: []string{"claude-failover"}})
	e.addChannel(Channel{Name: "logs-ok", URL: up.URL, Models: []string{"claude-failover"}})
	if resp, body := e.post("/v1/messages", anthropicBody("claude-failover", false)); resp.StatusCode != 200 {
		t.Fatalf("failover request: %d %s", resp.StatusCode, body)
	}
	foRow := rowSel("logs-table", "model", "claude-failover")
	e.settle() // the row is written before the page asks for it
	b.route("#/logs?model=claude-failover", foRow)
	b.do("open its detail", chromedp.Click(chromedp.CSS(foRow+` [data-action="detail"]`)), chromedp.WaitVisible(chromedp.CSS("#log-tries")))
	tries := b.text("#log-tries")
	for _, want := range []string{"Tries (2)", "#1", "logs-529", "529", "cooled the channel", "#2", "logs-ok", "200"} {
		if !strings.Contains(tries, want) {
			t.Errorf("timeline lacks %q:\n%s", want, tries)
		}
	}
	if n := eval[int](b, `document.querySelectorAll('#log-tries li.try').length`); n != 2 {
		t.Errorf("%d tries in the timeline; want 2", n)
	}
	if w := eval[string](b, `document.querySelector('#log-tries .try-bar').style.width`); w == "" {
		t.Error("the first try's bar has no width (blocked by the CSP?)")
	}
	b.shot("logs-tries")
	b.do("close the timeline", chromedp.KeyEvent(kb.Escape), chromedp.WaitNotPresent(chromedp.CSS("#log-detail")))
}

func testBrowserLanguage(t *testing.T, bctx context.Context) {
	e := newTestEnv(t)
	b := newBrowser(t, bctx, e)
	b.loginAt("#/dashboard", "#summary-cards .stat")
	if got := b.text(`.mainnav a[data-route="channels"]`); got != "Channels" {
		t.Fatalf("English nav says %q", got)
	}
	b.do("switch to Chinese", chromedp.Click(chromedp.CSS("#lang-toggle")))
	b.waitJS("Chinese labels", `document.querySelector('.mainnav a[data-route="channels"]').textContent === '渠道' && document.querySelector('h1').textContent === '仪表盘'`)
	if l := eval[string](b, "document.documentElement.lang"); l != "zh-CN" {
		t.Errorf("html lang = %q; want zh-CN", l)
	}
	b.do("reload", chromedp.Reload(), chromedp.WaitVisible(chromedp.CSS("#summary-cards .stat")))
	b.waitJS("Chinese after reload", `document.querySelector('h1').textContent === '仪表盘' && document.querySelector('#lang-toggle').textContent === 'English'`)
	if got := b.text("#summary-cards"); !strings.Contains(got, "成功率") {
		t.Errorf("summary cards in Chinese = %q", got)
	}
	b.shot("dashboard-zh")
	b.route("#/channels", "#add-channel")
	if got := b.text("#add-channel"); got != "添加渠道" {
		t.Errorf("add button = %q; want 添加渠道", got)
	}
	b.do("back to English", chromedp.Click(chromedp.CSS("#lang-toggle")))
	b.waitJS("English labels", `document.querySelector('#add-channel').textContent === 'Add channel'`)

	// Both languages have every message.
	missing := eval[[]string](b, `import('/web/i18n.js').then(({messages}) => {
		const en = Object.keys(messages.en), zh = Object.keys(messages.zh);
		return [...en.filter(k => !zh.includes(k)).map(k => 'zh lacks ' + k), ...zh.filter(k => !en.includes(k)).map(k => 'en lacks ' + k)];
	})`)
	for _, m := range missing {
		t.Error(m)
	}
	// Every key the code asks for exists (a missing one shows as its key).
	used := eval[[]string](b, `Promise.all(['app.js','ui.js','chart.js','pages/login.js','pages/dashboard.js','pages/channels.js','pages/logs.js','pages/stats.js','pages/tokens.js','pages/prices.js']
		.map(f => fetch('/web/' + f).then(r => r.text()))).then(srcs => srcs.flatMap(s => [...s.matchAll(/\bt\('([a-zA-Z0-9_.]+)'/g)].map(m => m[1])))`)
	en := eval[[]string](b, `import('/web/i18n.js').then(({messages}) => Object.keys(messages.en))`)
	if len(used) < 50 {
		t.Errorf("found only %d message keys in the code", len(used))
	}
	for _, k := range used {
		if !slices.Contains(en, k) {
			t.Errorf("the code uses message %q, which is not defined", k)
		}
	}
}

// testBrowserDefaultLanguage checks that a Chinese browser gets Chinese
// without choosing.
func testBrowserDefaultLanguage(t *testing.T, bctx context.Context) {
	e := newTestEnv(t)
	b := newBrowser(t, bctx, e)
	b.do("Chinese browser", chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		_, err := chromedp.Call(ctx, emulation.SetUserAgentOverride, emulation.SetUserAgentOverrideParams{
			UserAgent: "Mozilla/5.0 (X11; Linux x86_64) ccload-test", AcceptLanguage: "zh-CN,zh;q=0.9"})
		return err
	}))
	b.open("#/login", "#password")
	if got := b.text("#login-submit"); got != "登录" {
		t.Errorf("login button for a zh-CN browser = %q; want 登录", got)
	}
	b.shot("login-zh")
}

// seedTraffic fills the log with a day of varied requests, for screenshots
// that look like real use.
func seedTraffic(t *testing.T, e *testEnv, chs []Channel) {
	t.Helper()
	var rows []logEntry
	now := time.Now()
	models := []string{"claude-sonnet-4-5", "claude-haiku-4-5", "gpt-5-codex"}
	for i := range 400 {
		c := chs[i%len(chs)]
		st := 200
		switch {
		case i%23 == 0:
			st = 529
		case i%37 == 0:
			st = 429
		case i%51 == 0:
			st = 499
		}
		errText := ""
		if st != 200 {
			errText = fmt.Sprintf("upstream %d: overloaded_error: Overloaded", st)
		}
		rows = append(rows, logEntry{
			Time: now.Add(-time.Duration(i*i%(24*60)) * time.Minute), Token: "alice", Protocol: "anthropic",
			Model: models[i%len(models)], UpstreamModel: models[i%len(models)], ChannelID: c.ID, ChannelName: c.Name,
			KeyIndex: i % 2, Attempts: 1 + i%3/2, Status: st, DurationMS: int64(800 + i*37%5000), FirstByteMS: int64(300 + i*13%900),
			Stream: i%2 == 0, InputTokens: int64(1000 + i*97%20000), OutputTokens: int64(200 + i*31%4000),
			CacheRead: int64(i * 11 % 5000), ClientIP: "127.0.0.1", Error: errText,
		})
	}
	if err := e.app.store.InsertLogs(context.Background(), rows); err != nil {
		t.Fatal(err)
	}
}

// testBrowserScreenshots renders every page with data, on a desktop and a
// phone, light and dark, saving PNGs for review, and checks that nothing
// overflows the phone's width.
func testBrowserScreenshots(t *testing.T, bctx context.Context) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "up")
	a := e.addChannel(Channel{Name: "anthropic-main", URL: up.URL, Priority: 10,
		APIKeys: []string{"sk-ant-api03-aaaaaaaaaaaa", "sk-ant-api03-bbbbbbbbbbbb"}, Models: []string{"claude-sonnet-4-5", "claude-haiku-4-5"}})
	bk := e.addChannel(Channel{Name: "relay-backup-with-a-long-name", URL: up.URL + "/some/long/path/prefix", Priority: 5,
		ModelRedirects: map[string]string{"claude-opus-4-1": "claude-sonnet-4-5"}})
	cx := e.addChannel(Channel{Name: "codex", URL: up.URL, Type: "openai", Models: []string{"gpt-5-codex"}})
	off := e.addChannel(Channel{Name: "old-relay", URL: up.URL})
	off.Enabled = false
	if err := e.app.store.UpdateChannel(context.Background(), &off); err != nil {
		t.Fatal(err)
	}
	e.reload()
	h := e.app.cool.get(bk.ID)
	e.app.cool.fail(h, -1, "", verdict{scope: scopeChannel, base: defaultCooldownPolicy.Transient, status: 529, reason: "529 overloaded_error: Overloaded"})
	e.app.cool.fail(e.app.cool.get(a.ID), 1, "", verdict{scope: scopeKey, base: defaultCooldownPolicy.Persistent, status: 401, reason: "401 authentication_error: invalid x-api-key"})
	seedTraffic(t, e, []Channel{a, bk, cx})

	b := newBrowser(t, bctx, e)
	b.loginAt("#/dashboard", "#summary-cards .stat")
	pages := map[string]struct{ hash, ready string }{
		"dashboard": {"#/dashboard", "#trend-chart svg"},
		"channels":  {"#/channels", "#channels-table"},
		"logs":      {"#/logs", "#logs-table"},
		"stats":     {"#/stats", "#stats-model-table"},
	}
	all := []string{"dashboard", "channels", "logs", "stats"}
	for _, mode := range []struct {
		suffix string
		w, h   int64
		dark   bool
		pages  []string
	}{
		{"", 1280, 860, false, all},
		{"-dark", 1280, 860, true, []string{"dashboard", "channels"}},
		{"-phone", 390, 844, false, all},
		{"-phone-dark", 390, 844, true, []string{"dashboard", "logs"}},
	} {
		b.emulate(mode.w, mode.h, mode.dark)
		for _, name := range mode.pages {
			p := pages[name]
			if eval[string](b, "location.hash") == p.hash {
				// Same page, new viewport: the layout and the charts follow
				// by themselves; wait for the chart to be redrawn at the new
				// width.
				b.waitJS("redraw", `!document.querySelector('#trend-chart svg') || Math.abs(document.querySelector('#trend-chart svg').getAttribute('width') - document.querySelector('#trend-chart').clientWidth) < 2`)
			} else {
				b.route(p.hash, p.ready)
			}
			if mode.w < 500 {
				// Nothing may stick out of the screen, except inside the
				// containers that scroll on purpose (wide stats tables, the
				// nav strip) and the visually hidden table heads.
				over := eval[[]string](b, `document.scrollingElement.scrollWidth > window.innerWidth ? ['page is ' + document.scrollingElement.scrollWidth + 'px wide'] : []`)
				over = append(over, eval[[]string](b, `[...document.querySelectorAll('#view *')].filter(el => {
					const r = el.getBoundingClientRect();
					return r.width > 0 && r.right > window.innerWidth + 1 && !el.closest('.table-wrap.scroll, .mainnav, .responsive thead');
				}).slice(0, 5).map(el => el.tagName + '.' + el.className + ' right=' + Math.round(el.getBoundingClientRect().right))`)...)
				if len(over) > 0 {
					t.Errorf("%s on a phone: wider than the screen: %v", name, over)
				}
				b.shotViewport(name + mode.suffix)
			} else {
				b.shot(name + mode.suffix)
			}
		}
	}
	// The dialog on a phone, in the dark.
	b.route("#/channels", "#channels-table")
	b.do("open the edit dialog", chromedp.Click(chromedp.CSS(rowSel("channels-table", "name", "relay-backup-with-a-long-name")+` [data-action="edit"]`)),
		chromedp.WaitVisible(chromedp.CSS("#channel-dialog")))
	b.shotViewport("channel-edit-dialog-phone-dark")
}
