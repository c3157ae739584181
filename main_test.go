package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestMain keeps the program's log out of test output unless asked for
// (CCLOAD_TEST_LOG=1): tests assert on behaviour, not on log lines.
func TestMain(m *testing.M) {
	if os.Getenv("CCLOAD_TEST_LOG") == "" {
		slog.SetDefault(slog.New(slog.NewTextHandler(io.Discard, nil)))
	}
	os.Exit(m.Run())
}

// testEnv is a real ccload (real SQLite file, real sockets) for one test.
type testEnv struct {
	t      testing.TB
	cfg    config
	app    *app
	srv    *httptest.Server
	URL    string
	client *http.Client
	closed bool
	// connClosed receives when the server closes a client connection,
	// which it does only after that connection's handler has returned.
	connClosed chan struct{}
}

const testAdminPass = "correct horse battery staple"

func testConfig(tb testing.TB) config {
	return config{
		SQLitePath:      filepath.Join(tb.TempDir(), "ccload.db"),
		AdminPass:       testAdminPass,
		LogDays:         7,
		ShutdownTimeout: 5 * time.Second,
		relayConfig:     relayConfig{FirstByteTimeout: 2 * time.Second},
	}
}

func newTestEnv(tb testing.TB, opts ...func(*config)) *testEnv {
	tb.Helper()
	cfg := testConfig(tb)
	for _, o := range opts {
		o(&cfg)
	}
	return startEnv(tb, cfg)
}

func startEnv(tb testing.TB, cfg config) *testEnv {
	tb.Helper()
	return startEnvWith(tb, cfg, nil)
}

// startEnvWith is startEnv with prep run on the app before it serves, for
// what must be set before any request (an injected clock).
func startEnvWith(tb testing.TB, cfg config, prep func(*app)) *testEnv {
	tb.Helper()
	a, err := newApp(context.Background(), cfg, io.Discard)
	if err != nil {
		tb.Fatalf("newApp: %v", err)
	}
	if prep != nil {
		prep(a)
	}
	e := &testEnv{t: tb, cfg: cfg, app: a, connClosed: make(chan struct{}, 1<<16)}
	e.srv = httptest.NewUnstartedServer(a.handler)
	e.srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateClosed {
			select {
			case e.connClosed <- struct{}{}:
			default:
			}
		}
	}
	if cfg.MaxConnsPerIP > 0 {
		e.srv.Listener = limitConns(e.srv.Listener, cfg.MaxConnsPerIP)
	}
	e.srv.Start()
	e.URL = e.srv.URL
	e.client = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	tb.Cleanup(e.close)
	return e
}

// close stops the server and the app, as a shutdown would.
func (e *testEnv) close() {
	if e.closed {
		return
	}
	e.closed = true
	e.client.CloseIdleConnections()
	e.srv.CloseClientConnections()
	e.srv.Close()
	if err := e.app.close(context.Background()); err != nil {
		e.t.Errorf("app close: %v", err)
	}
}

// addChannel stores c (filling defaults) and reloads the proxy's snapshot.
func (e *testEnv) addChannel(c Channel) Channel {
	e.t.Helper()
	if c.Type == "" {
		c.Type = "anthropic"
	}
	if c.KeyStrategy == "" {
		c.KeyStrategy = keySequential
	}
	if len(c.APIKeys) == 0 {
		c.APIKeys = []string{"sk-" + strings.ReplaceAll(c.Name, " ", "-") + "-key0"}
	}
	c.Enabled = true
	if err := e.app.store.CreateChannel(context.Background(), &c); err != nil {
		e.t.Fatalf("create channel %q: %v", c.Name, err)
	}
	e.reload()
	return c
}

func (e *testEnv) reload() {
	e.t.Helper()
	if err := e.app.admin.changeChannels(context.Background(), nil); err != nil {
		e.t.Fatalf("reload: %v", err)
	}
}

// do sends a request and returns the response with its body read.
func (e *testEnv) do(method, path, body string, hdr map[string]string) (*http.Response, []byte) {
	e.t.Helper()
	req, err := http.NewRequest(method, e.URL+path, strings.NewReader(body))
	if err != nil {
		e.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := e.client.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatalf("%s %s: read body: %v", method, path, err)
	}
	return resp, b
}

func (e *testEnv) post(path, body string) (*http.Response, []byte) {
	e.t.Helper()
	return e.do("POST", path, body, map[string]string{"Anthropic-Version": "2023-06-01"})
}

// settle waits until every request so far has written its log row.
func (e *testEnv) settle() {
	e.t.Helper()
	e.app.relay.inflight.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.app.logs.flush(ctx); err != nil {
		e.t.Fatalf("flush logs: %v", err)
	}
}

// logs returns the request log, oldest first, after settle.
func (e *testEnv) logs() []logEntry {
	e.t.Helper()
	e.settle()
	rows, _, err := e.app.store.QueryLogs(context.Background(), logFilter{Limit: 100000})
	if err != nil {
		e.t.Fatal(err)
	}
	for i, j := 0, len(rows)-1; i < j; i, j = i+1, j-1 {
		rows[i], rows[j] = rows[j], rows[i]
	}
	return rows
}

func (e *testEnv) lastLog() logEntry {
	e.t.Helper()
	rows := e.logs()
	if len(rows) == 0 {
		e.t.Fatal("request log is empty")
	}
	return rows[len(rows)-1]
}

// health returns the admin view of a channel's health.
func (e *testEnv) health(id int64) healthState {
	e.t.Helper()
	h := e.app.cool.get(id)
	if h == nil {
		e.t.Fatalf("no health for channel %d", id)
	}
	return h.state(time.Now())
}

func (e *testEnv) login() string {
	e.t.Helper()
	resp, body := e.do("POST", "/login", `{"password":"`+testAdminPass+`"}`, nil)
	if resp.StatusCode != 200 {
		e.t.Fatalf("login: %d %s", resp.StatusCode, body)
	}
	var out struct{ Token string }
	json.Unmarshal(body, &out)
	return out.Token
}

// admin sends an admin API request with a bearer session token.
func (e *testEnv) admin(tok, method, path, body string) (int, []byte) {
	e.t.Helper()
	resp, b := e.do(method, path, body, map[string]string{"Authorization": "Bearer " + tok})
	return resp.StatusCode, b
}

func anthropicBody(model string, stream bool) string {
	s := ""
	if stream {
		s = `,"stream":true`
	}
	return `{"model":"` + model + `","max_tokens":64` + s + `,"messages":[{"role":"user","content":"hi"}]}`
}

func TestLoadConfigDefaultsAndErrors(t *testing.T) {
	c, err := loadConfig(func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if c.Port != 8080 || c.SQLitePath != "data/ccload.db" || c.LogDays != 7 || c.LogLevel != slog.LevelInfo ||
		c.firstByteWait() != 60*time.Second || c.maxBody() != 32<<20 || c.idleWait() != 5*time.Minute ||
		c.responseWait() != 10*time.Minute {
		t.Errorf("defaults: got %+v", c)
	}
	env := map[string]string{"PORT": "9090", "CCLOAD_AUTH": "alice:t1, t2 ,", "CCLOAD_MAX_BODY": "10MB",
		"CCLOAD_FIRST_BYTE_TIMEOUT": "15m", "CCLOAD_LOG_DAYS": "0", "CCLOAD_STREAM_IDLE_TIMEOUT": "0",
		"CCLOAD_LOG_LEVEL": "debug"}
	c, err = loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if c.Port != 9090 || len(c.AuthTokens) != 2 || c.maxBody() != 10_000_000 || c.firstByteWait() != 15*time.Minute ||
		c.responseWait() != 15*time.Minute || c.idleWait() != 0 || c.LogDays != 0 || c.LogLevel != slog.LevelDebug {
		t.Errorf("parsed: got %+v", c)
	}
	bad := map[string]string{"PORT": "http", "CCLOAD_MAX_BODY": "lots", "CCLOAD_FIRST_BYTE_TIMEOUT": "soon",
		"REDIS_URL": "localhost:6379", "CCLOAD_LOG_DAYS": "-1", "CCLOAD_LOG_LEVEL": "loud"}
	_, err = loadConfig(func(k string) string { return bad[k] })
	for k := range bad {
		if err == nil || !strings.Contains(err.Error(), k) {
			t.Errorf("error for bad %s: got %v", k, err)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"32MiB": 32 << 20, "1048576": 1 << 20, "10m": 10 << 20, "2 GB": 2e9, "512k": 512 << 10} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	if _, err := parseSize("12 parsecs"); err == nil {
		t.Error("parseSize accepted an unknown unit")
	}
}

func TestDotEnvRealEnvironmentWins(t *testing.T) {
	dir := t.TempDir()
	envPath := filepath.Join(dir, ".env")
	os.WriteFile(envPath, []byte("# settings\nexport PORT=1234\nCCLOAD_PASS=\"from file\"\nCCLOAD_AUTH='a,b' \nSQLITE_PATH=x.db # comment\n"), 0o600)
	vals, err := readDotEnv(envPath)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"PORT": "1234", "CCLOAD_PASS": "from file", "CCLOAD_AUTH": "a,b", "SQLITE_PATH": "x.db"}
	for k, v := range want {
		if vals[k] != v {
			t.Errorf("%s = %q; want %q", k, vals[k], v)
		}
	}
	os.WriteFile(envPath, []byte("not a setting\n"), 0o600)
	if _, err := readDotEnv(envPath); err == nil || !strings.Contains(err.Error(), ":1") {
		t.Errorf("bad line: got %v; want an error naming line 1", err)
	}
	if vals, err := readDotEnv(filepath.Join(dir, "missing")); err != nil || vals != nil {
		t.Errorf("missing file: got %v, %v", vals, err)
	}
}

func TestVersionFlag(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"-version"}, func(string) (string, bool) { return "", false }, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.String(), "ccload ") {
		t.Errorf("got %q", out.String())
	}
}

// TestRunServesAndShutsDown starts the real program on a free port, checks
// /healthz and the healthcheck subcommand, then stops it with its context.
func TestRunServesAndShutsDown(t *testing.T) {
	defaultLogger := slog.Default()
	t.Cleanup(func() { slog.SetDefault(defaultLogger) })
	dir := t.TempDir()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	env := map[string]string{"PORT": strconv.Itoa(port), "HOST": "127.0.0.1", "SQLITE_PATH": filepath.Join(dir, "db", "c.db")}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	ctx, cancel := context.WithCancel(context.Background())
	var stderr syncBuffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"-env", filepath.Join(dir, ".env")}, lookup, io.Discard, &stderr) }()

	// The healthcheck subcommand is what Docker runs; it must succeed once
	// the server is up. The log line says when it is.
	stderr.waitFor(t, "ccload listening")
	if err := run(context.Background(), []string{"healthcheck"}, lookup, io.Discard, io.Discard); err != nil {
		t.Fatalf("healthcheck: %v", err)
	}
	if !strings.Contains(stderr.String(), "admin password (shown once") {
		t.Errorf("first start did not print the generated password:\n%s", stderr.String())
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
	if err := run(context.Background(), []string{"healthcheck"}, lookup, io.Discard, io.Discard); err == nil {
		t.Error("healthcheck succeeded after shutdown")
	}
	// The second start must not print a password again.
	stderr.Reset()
	ctx2, cancel2 := context.WithCancel(context.Background())
	go func() { done <- run(ctx2, nil, lookup, io.Discard, &stderr) }()
	stderr.waitFor(t, "ccload listening")
	cancel2()
	<-done
	if strings.Contains(stderr.String(), "admin password") {
		t.Errorf("second start printed a password:\n%s", stderr.String())
	}
}

// syncBuffer is a log sink tests can wait on: waitFor wakes on each write
// instead of polling.
type syncBuffer struct {
	mu      sync.Mutex // guards b and changed
	b       bytes.Buffer
	changed chan struct{}
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.changed != nil {
		close(s.changed)
		s.changed = nil
	}
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func (s *syncBuffer) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.b.Reset()
}

// waitFor blocks until the buffer contains substr.
func (s *syncBuffer) waitFor(t testing.TB, substr string) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		s.mu.Lock()
		if strings.Contains(s.b.String(), substr) {
			s.mu.Unlock()
			return
		}
		if s.changed == nil {
			s.changed = make(chan struct{})
		}
		ch := s.changed
		s.mu.Unlock()
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("timed out waiting for %q in:\n%s", substr, s.String())
		}
	}
}
