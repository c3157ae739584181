//go:build unix

package main

// The real-client conformance suite: the real Claude Code, Codex, Anthropic
// SDK and OpenAI SDK (pinned in testdata/clients/package.json) talk to the
// real ccload binary, which relays to the fake upstream. Each case asserts
// what the client printed and its exit code, what the upstream received,
// and the request log row.
//
// It needs Node and the packages (npm ci --prefix testdata/clients); without
// them it skips, unless CCLOAD_REQUIRE_CLIENTS=1 (CI), where it fails.
// Cases that wait for a ccload feature skip with "pending: …";
// CCLOAD_CLIENTS_PENDING=1 runs them anyway, to see whether the feature
// has landed.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

const clientsDir = "testdata/clients"

// Client tokens of the relay under test, by the name its log shows.
var clientTokens = map[string]string{
	"claude": "tok-conformance-claude",
	"codex":  "tok-conformance-codex",
	"sdk":    "tok-conformance-sdk",
}

// clientKit is what the suite runs: the ccload binary built for this run
// and the installed clients.
type clientKit struct {
	ccload    string
	node      string
	path      string // PATH for the clients: node's folder and the system's
	claudeBin string
	codexBin  string
	sdkJS     string // sdk.mjs
	versions  map[string]string
}

// needClients finds node and the installed clients, or skips (fails under
// CCLOAD_REQUIRE_CLIENTS=1) saying how to install them.
func needClients(t *testing.T) clientKit {
	t.Helper()
	dir, err := filepath.Abs(clientsDir)
	if err != nil {
		t.Fatal(err)
	}
	kit := clientKit{
		claudeBin: filepath.Join(dir, "node_modules", ".bin", "claude"),
		codexBin:  filepath.Join(dir, "node_modules", ".bin", "codex"),
		sdkJS:     filepath.Join(dir, "sdk.mjs"),
		versions:  map[string]string{},
	}
	var missing []string
	node, err := exec.LookPath("node")
	if err != nil {
		missing = append(missing, "node (Node.js 20 or newer) on PATH")
	} else {
		kit.node = node
		kit.path = filepath.Dir(node) + string(os.PathListSeparator) + "/usr/local/bin:/usr/bin:/bin"
	}
	var pkg struct{ Dependencies map[string]string }
	if b, err := os.ReadFile(filepath.Join(dir, "package.json")); err != nil {
		t.Fatal(err)
	} else if err := json.Unmarshal(b, &pkg); err != nil {
		t.Fatalf("%s/package.json: %v", clientsDir, err)
	}
	for name, want := range pkg.Dependencies {
		var got struct{ Version string }
		b, err := os.ReadFile(filepath.Join(dir, "node_modules", name, "package.json"))
		if err == nil {
			err = json.Unmarshal(b, &got)
		}
		switch {
		case err != nil:
			missing = append(missing, name+"@"+want)
		case got.Version != want:
			missing = append(missing, fmt.Sprintf("%s@%s (%s is installed)", name, want, got.Version))
		default:
			kit.versions[name] = got.Version
		}
	}
	if len(missing) == 0 && kit.path != "" {
		// The CLIs are native binaries that npm's install scripts put in
		// place: check that they run, and are the pinned versions.
		for bin, pkg := range map[string]string{kit.claudeBin: "@anthropic-ai/claude-code", kit.codexBin: "@openai/codex"} {
			cmd := exec.Command(bin, "--version")
			cmd.Env = []string{"HOME=" + t.TempDir(), "PATH=" + kit.path}
			out, err := cmd.CombinedOutput()
			if err != nil || !bytes.Contains(out, []byte(kit.versions[pkg])) {
				missing = append(missing, fmt.Sprintf("a working %s (--version: %v: %s)", filepath.Base(bin), err, bytes.TrimSpace(out)))
			}
		}
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		msg := "real-client conformance suite NOT RUN: missing " + strings.Join(missing, ", ") +
			"; install with: npm ci --prefix " + clientsDir
		if os.Getenv("CCLOAD_REQUIRE_CLIENTS") == "1" {
			t.Fatal(msg)
		}
		fmt.Fprintln(os.Stderr, "--- SKIP: TestClients: "+msg)
		t.Skip(msg)
	}
	return kit
}

// pending skips a case that asserts behaviour ccload does not have yet,
// unless CCLOAD_CLIENTS_PENDING=1 asks to run it.
func pending(t *testing.T, what string) {
	t.Helper()
	if os.Getenv("CCLOAD_CLIENTS_PENDING") != "1" {
		t.Skip("pending: " + what)
	}
}

// No case waits for a feature right now; the helper stays for the next one
// (README "Compatibility with real clients" documents it).
var _ = pending

// relayProc is the real ccload binary, started as a process for one case.
type relayProc struct {
	t     *testing.T
	URL   string
	token string // admin session
	out   *syncBuffer
}

const relayAdminPass = "conformance admin password"

func startRelay(t *testing.T, kit clientKit) *relayProc {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	dir := t.TempDir()
	var auth []string
	for name, tok := range clientTokens {
		auth = append(auth, name+":"+tok)
	}
	cmd := exec.Command(kit.ccload)
	cmd.Dir = dir // its .env, if any, is this folder's: none
	cmd.Env = []string{"PATH=" + kit.path, "HOST=127.0.0.1", "PORT=" + strconv.Itoa(port),
		"SQLITE_PATH=" + filepath.Join(dir, "ccload.db"), "CCLOAD_PASS=" + relayAdminPass,
		"CCLOAD_AUTH=" + strings.Join(auth, ",")}
	r := &relayProc{t: t, URL: "http://127.0.0.1:" + strconv.Itoa(port), out: &syncBuffer{}}
	cmd.Stdout, cmd.Stderr = r.out, r.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("ccload's output:\n%s", r.out.String())
		}
	})
	r.out.waitFor(t, "ccload listening")

	var login struct{ Token string }
	r.call("POST", "/login", map[string]any{"password": relayAdminPass}, 200, &login)
	r.token = login.Token
	return r
}

// call sends an admin API request and decodes its answer into out.
func (r *relayProc) call(method, path string, body any, want int, out any) {
	r.t.Helper()
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest(method, r.URL+path, bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	if r.token != "" {
		req.Header.Set("Authorization", "Bearer "+r.token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		r.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	got, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		r.t.Fatalf("%s %s: status %d; want %d: %s", method, path, resp.StatusCode, want, got)
	}
	if out != nil {
		if err := json.Unmarshal(got, out); err != nil {
			r.t.Fatalf("%s %s: %v: %s", method, path, err, got)
		}
	}
}

// channel adds a channel through the admin API; typ is anthropic or
// openai. Its key is channelKey(name).
func (r *relayProc) channel(name, url, typ string, priority int, models ...string) {
	r.t.Helper()
	if models == nil {
		models = []string{} // any model
	}
	r.call("POST", "/admin/channels", map[string]any{"name": name, "url": url, "channel_type": typ,
		"api_key": channelKey(name), "priority": priority, "models": models}, 201, nil)
}

func channelKey(name string) string { return "sk-upstream-" + name }

// clientLogRow is a row of GET /admin/logs.
type clientLogRow struct {
	Token       string `json:"token"`
	Protocol    string `json:"protocol"`
	Model       string `json:"model"`
	ChannelName string `json:"channel_name"`
	Attempts    int    `json:"attempts"`
	Status      int    `json:"status"`
	Stream      bool   `json:"stream"`
	Input       int64  `json:"input_tokens"`
	Output      int64  `json:"output_tokens"`
	CacheRead   int64  `json:"cache_read_tokens"`
	CacheWrite  int64  `json:"cache_write_tokens"`
	Error       string `json:"error"`
	Session     string `json:"session"`
	Affinity    string `json:"affinity"`
}

// logs returns the request log, oldest first, once it holds at least n
// rows: ccload writes rows in the background, a moment after the answer.
func (r *relayProc) logs(n int) []clientLogRow {
	r.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var page struct{ Logs []clientLogRow }
		r.call("GET", "/admin/logs?limit=1000", nil, 200, &page)
		if len(page.Logs) >= n || time.Now().After(deadline) {
			slices.Reverse(page.Logs)
			if len(page.Logs) < n {
				r.t.Fatalf("request log has %d rows after 10s; want %d: %+v", len(page.Logs), n, page.Logs)
			}
			return page.Logs
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// clientRun is what one run of a client did.
type clientRun struct {
	stdout, stderr string
	code           int
	elapsed        time.Duration
}

func (c clientRun) String() string {
	return fmt.Sprintf("exit %d after %s\n--- stdout:\n%s\n--- stderr:\n%s", c.code, c.elapsed.Round(time.Millisecond), c.stdout, c.stderr)
}

// runClient runs cmd with no input, in its own process group so that
// nothing it started outlives it, and fails the test if it is still
// running at limit: a client that hangs.
func runClient(t *testing.T, cmd *exec.Cmd, limit time.Duration) clientRun {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	timedOut := false
	select {
	case err = <-done:
	case <-time.After(limit):
		timedOut = true
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		err = <-done
	}
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // whatever it left behind
	res := clientRun{stdout: stdout.String(), stderr: stderr.String(), elapsed: time.Since(start)}
	res.code = cmd.ProcessState.ExitCode()
	if err != nil && res.code == 0 {
		res.code = -1
	}
	if timedOut {
		t.Fatalf("%s did not finish within %s:\n%s", filepath.Base(cmd.Path), limit, res)
	}
	return res
}

// clientHome is a client's HOME and working folder, kept across the runs
// of one conversation.
type clientHome struct{ home, work string }

func newClientHome(t *testing.T) clientHome {
	return clientHome{home: t.TempDir(), work: t.TempDir()}
}

// claudeEnv is everything Claude Code needs to run offline against ccload:
// no telemetry, error reports, update checks or other traffic of its own,
// so it never waits on the network this machine does not have.
func (k clientKit) claudeEnv(r *relayProc, h clientHome) []string {
	return []string{"HOME=" + h.home, "PATH=" + k.path, "TERM=dumb", "NO_COLOR=1", "LANG=C.UTF-8",
		"ANTHROPIC_BASE_URL=" + r.URL, "ANTHROPIC_AUTH_TOKEN=" + clientTokens["claude"],
		"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1", "DISABLE_TELEMETRY=1",
		"DISABLE_AUTOUPDATER=1", "DISABLE_ERROR_REPORTING=1"}
}

// claude runs claude -p with args in h.
func (k clientKit) claude(t *testing.T, r *relayProc, h clientHome, args ...string) clientRun {
	t.Helper()
	cmd := exec.Command(k.claudeBin, append([]string{"-p"}, args...)...)
	cmd.Dir, cmd.Env = h.work, k.claudeEnv(r, h)
	return runClient(t, cmd, 90*time.Second)
}

const codexModel = "gpt-5-codex"

// codexConfig points Codex at ccload, with update checks, analytics,
// feedback, telemetry and the features that fetch plugins and apps from
// the internet turned off. --strict-config (below) makes a key that a new
// version no longer knows an error rather than silently ignored.
const codexConfig = `model = %q
model_provider = "ccload"
check_for_update_on_startup = false

[analytics]
enabled = false

[feedback]
enabled = false

[otel]
exporter = "none"

[features]
plugins = false
remote_plugin = false
apps = false
tool_suggest = false
api_key_model_discovery = false

[model_providers.ccload]
name = "ccload"
base_url = %q
wire_api = "responses"
env_key = "CODEX_RELAY_TOKEN"
request_max_retries = 0
stream_max_retries = 2
`

// codex runs codex exec with args in h.
func (k clientKit) codex(t *testing.T, r *relayProc, h clientHome, args ...string) clientRun {
	t.Helper()
	codexHome := filepath.Join(h.home, ".codex")
	if err := os.MkdirAll(codexHome, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(codexConfig, codexModel, r.URL+"/v1")
	if err := os.WriteFile(filepath.Join(codexHome, "config.toml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(k.codexBin, append([]string{"exec", "--strict-config", "--skip-git-repo-check", "--color", "never"}, args...)...)
	cmd.Dir = h.work
	cmd.Env = []string{"HOME=" + h.home, "PATH=" + k.path, "CODEX_HOME=" + codexHome, "LANG=C.UTF-8",
		"CODEX_RELAY_TOKEN=" + clientTokens["codex"]}
	return runClient(t, cmd, 90*time.Second)
}

// sdkResult is what sdk.mjs printed.
type sdkResult struct {
	OK      bool             `json:"ok"`
	Text    string           `json:"text"`
	Usage   map[string]any   `json:"usage"`
	Stop    string           `json:"stop_reason"`
	Deltas  int              `json:"deltas"`
	Input   int              `json:"input_tokens"`
	IDs     []string         `json:"ids"`
	Events  []map[string]any `json:"events"`
	Status  string           `json:"status"`
	Elapsed int64            `json:"elapsed_ms"`
	Error   *struct {
		Class      string `json:"class"`
		APIError   bool   `json:"api_error"`
		Status     int    `json:"status"`
		Type       string `json:"type"`
		Message    string `json:"message"`
		APIMessage string `json:"api_message"`
	} `json:"error"`
	RespError *struct{ Code, Message string } `json:"response_error"`
}

// sdk runs one call of sdk.mjs.
func (k clientKit) sdk(t *testing.T, r *relayProc, call, model string) (sdkResult, clientRun) {
	t.Helper()
	cmd := exec.Command(k.node, k.sdkJS, call)
	cmd.Dir = t.TempDir()
	cmd.Env = []string{"HOME=" + cmd.Dir, "PATH=" + k.path, "CCLOAD_URL=" + r.URL,
		"CCLOAD_TOKEN=" + clientTokens["sdk"], "CCLOAD_MODEL=" + model}
	res := runClient(t, cmd, 120*time.Second)
	var out sdkResult
	lines := strings.Split(strings.TrimSpace(res.stdout), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &out); err != nil {
		t.Fatalf("sdk.mjs %s printed no result: %v\n%s", call, err, res)
	}
	return out, res
}

func TestClients(t *testing.T) {
	kit := needClients(t)
	kit.ccload = filepath.Join(t.TempDir(), "ccload")
	if out, err := exec.Command("go", "build", "-o", kit.ccload, ".").CombinedOutput(); err != nil {
		t.Fatalf("build ccload: %v\n%s", err, out)
	}
	t.Logf("clients: %v", kit.versions)
	t.Run("ClaudeCode", func(t *testing.T) { t.Parallel(); testClaudeCode(t, kit) })
	t.Run("Codex", func(t *testing.T) { t.Parallel(); testCodex(t, kit) })
	t.Run("SDK", func(t *testing.T) { t.Parallel(); testSDKs(t, kit) })
}

// downURL is an upstream address where nothing listens.
// downUpstream is a channel URL that accepts each connection and closes it
// at once, as a dead upstream does, counting them. Every attempt of ccload's
// happens inside one of the client's requests, and the channel is its only
// one (the last resort once cooling), so once the client has exited the count
// is final: the requests the client sent. The log is not: its rows are
// written a moment after each answer.
type downUpstream struct {
	URL  string
	hits atomic.Int64
}

func newDownUpstream(t *testing.T) *downUpstream {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	d := &downUpstream{URL: "http://" + ln.Addr().String()}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			d.hits.Add(1)
			c.Close()
		}
	}()
	return d
}

// leaks fails if any header the upstream received carries a client token.
func leaks(t *testing.T, req fakeRequest) {
	t.Helper()
	for name, vals := range req.Header {
		for _, v := range vals {
			for _, tok := range clientTokens {
				if strings.Contains(v, tok) {
					t.Errorf("the upstream received the client's token in %s", name)
				}
			}
		}
	}
}

// wantUsage checks the token counts of a log row against the fake's.
func wantUsage(t *testing.T, row clientLogRow, cacheWrite int64) {
	t.Helper()
	if row.Input != fakeInputTokens || row.Output != fakeOutputTokens || row.CacheRead != fakeCacheRead || row.CacheWrite != cacheWrite {
		t.Errorf("log tokens in/out/read/write %d/%d/%d/%d; want %d/%d/%d/%d", row.Input, row.Output, row.CacheRead, row.CacheWrite,
			fakeInputTokens, fakeOutputTokens, fakeCacheRead, cacheWrite)
	}
}

// claudeBody is the part of a Claude Code request body the suite checks.
type claudeBody struct {
	Model    string `json:"model"`
	Stream   bool   `json:"stream"`
	Metadata struct {
		UserID string `json:"user_id"`
	} `json:"metadata"`
}

func parseClaudeBody(t *testing.T, req fakeRequest) claudeBody {
	t.Helper()
	var b claudeBody
	if err := json.Unmarshal(req.Body, &b); err != nil {
		t.Fatalf("upstream body: %v", err)
	}
	return b
}

// messagesCalls is the upstream requests to /v1/messages itself.
func messagesCalls(f *fakeUpstream) []fakeRequest {
	var out []fakeRequest
	for _, r := range f.requests() {
		if r.Path == "/v1/messages" {
			out = append(out, r)
		}
	}
	return out
}

func testClaudeCode(t *testing.T, kit clientKit) {
	const text = "conformance-ok "
	want := strings.Repeat(text, 3)

	t.Run("plain", func(t *testing.T) {
		t.Parallel()
		r := startRelay(t, kit)
		up := newFakeUpstream(t, "main")
		up.set(fakeBehavior{Text: text})
		r.channel("main", up.URL, "anthropic", 0)
		res := kit.claude(t, r, newClientHome(t), "say hello")
		if res.code != 0 || strings.TrimSpace(res.stdout) != strings.TrimSpace(want) {
			t.Fatalf("want exit 0 and %q:\n%s", want, res)
		}

		calls := messagesCalls(up)
		if len(calls) != 1 {
			t.Fatalf("upstream got %d /v1/messages requests; want 1", len(calls))
		}
		req := calls[0]
		if req.Query != "beta=true" {
			t.Errorf("query %q; want beta=true", req.Query)
		}
		if !strings.Contains(req.Header.Get("Anthropic-Beta"), "claude-code-") {
			t.Errorf("anthropic-beta %q did not come through", req.Header.Get("Anthropic-Beta"))
		}
		if req.Key != channelKey("main") {
			t.Errorf("upstream got key %q; want the channel's", req.Key)
		}
		leaks(t, req)
		sid := req.Header.Get("X-Claude-Code-Session-Id")
		body := parseClaudeBody(t, req)
		var uid struct {
			SessionID string `json:"session_id"`
		}
		if err := json.Unmarshal([]byte(body.Metadata.UserID), &uid); err != nil || sid == "" || uid.SessionID != sid {
			t.Errorf("session: header %q, metadata.user_id %q; want the same session in both", sid, body.Metadata.UserID)
		}
		if !body.Stream || body.Model == "" {
			t.Errorf("body: stream %v, model %q", body.Stream, body.Model)
		}
		t.Logf("Claude Code sent model %q, a %d-byte body, %d upstream requests in all", body.Model, len(req.Body), len(up.requests()))

		// Any other call this version makes (count_tokens, say) must have
		// been answered too.
		for _, row := range r.logs(len(up.requests())) {
			if row.Status != 200 {
				t.Errorf("log row %+v", row)
			}
		}
		row := r.logs(1)[0]
		if row.Token != "claude" || row.Protocol != "anthropic" || row.Model != body.Model || row.Status != 200 ||
			!row.Stream || row.ChannelName != "main" || row.Attempts != 1 {
			t.Errorf("log row %+v", row)
		}
		wantUsage(t, row, fakeCacheWrite)
	})

	t.Run("failover 529", func(t *testing.T) {
		t.Parallel()
		r := startRelay(t, kit)
		bad, good := newFakeUpstream(t, "overloaded"), newFakeUpstream(t, "good")
		bad.set(fakeBehavior{Status: 529, ErrType: "overloaded_error"})
		good.set(fakeBehavior{Text: text})
		r.channel("overloaded", bad.URL, "anthropic", 10)
		r.channel("good", good.URL, "anthropic", 0)
		res := kit.claude(t, r, newClientHome(t), "say hello")
		if res.code != 0 || strings.TrimSpace(res.stdout) != strings.TrimSpace(want) {
			t.Fatalf("want exit 0 and %q:\n%s", want, res)
		}
		if bad.count() != 1 || good.count() != 1 {
			t.Errorf("upstream hits: overloaded %d, good %d; want 1 and 1", bad.count(), good.count())
		}
		row := r.logs(1)[0]
		if row.Status != 200 || row.Attempts != 2 || row.ChannelName != "good" {
			t.Errorf("log row %+v; want 200 from good after 2 attempts", row)
		}
	})

	t.Run("tool use", func(t *testing.T) {
		t.Parallel()
		r := startRelay(t, kit)
		up := newFakeUpstream(t, "main")
		h := newClientHome(t)
		note := filepath.Join(h.work, "note.txt")
		const secret = "the password is periwinkle"
		if err := os.WriteFile(note, []byte(secret+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		input, _ := json.Marshal(map[string]string{"file_path": note})
		up.script(func(_ int, req *http.Request) fakeBehavior {
			body, _ := io.ReadAll(req.Body)
			if bytes.Contains(body, []byte(`"tool_result"`)) {
				return fakeBehavior{Text: "read it "}
			}
			return fakeBehavior{ToolName: "Read", ToolInput: string(input)}
		})
		r.channel("main", up.URL, "anthropic", 0)
		res := kit.claude(t, r, h, "read note.txt")
		if res.code != 0 || strings.TrimSpace(res.stdout) != "read it read it read it" {
			t.Fatalf("want exit 0 and the answer after the tool result:\n%s", res)
		}
		calls := messagesCalls(up)
		if len(calls) != 2 {
			t.Fatalf("upstream got %d /v1/messages requests; want 2 (the tool call, then its result)", len(calls))
		}
		if !bytes.Contains(calls[1].Body, []byte("periwinkle")) {
			t.Errorf("the second request does not carry the file's content as the tool result")
		}
		if calls[0].Header.Get("X-Claude-Code-Session-Id") != calls[1].Header.Get("X-Claude-Code-Session-Id") {
			t.Errorf("the two requests of one turn carry different session ids")
		}
		for _, row := range r.logs(len(up.requests())) {
			if row.Status != 200 {
				t.Errorf("log row %+v", row)
			}
		}
	})

	t.Run("cut mid-stream", func(t *testing.T) {
		t.Parallel()
		r := startRelay(t, kit)
		up := newFakeUpstream(t, "main")
		// Streams break off after the first delta; a non-streaming request
		// gets the whole answer.
		up.set(fakeBehavior{Text: text, Deltas: 3, CutAfter: 1})
		r.channel("main", up.URL, "anthropic", 0)
		res := kit.claude(t, r, newClientHome(t), "say hello")
		// Claude Code takes ccload's error event for a failed stream and
		// asks again without streaming, so the user gets the answer.
		if res.code != 0 || strings.TrimSpace(res.stdout) != strings.TrimSpace(want) {
			t.Fatalf("want exit 0 and %q from Claude Code's non-streaming retry:\n%s", want, res)
		}
		if up.cuts.Load() != 1 {
			t.Errorf("the upstream cut %d streams; want 1", up.cuts.Load())
		}
		rows := r.logs(2)
		if cut := rows[0]; cut.Status != 502 || !cut.Stream || !strings.Contains(cut.Error, "mid-response") {
			t.Errorf("first log row %+v; want the cut stream as 502 naming it", cut)
		}
		if retry := rows[1]; retry.Status != 200 || retry.Stream {
			t.Errorf("second log row %+v; want Claude Code's non-streaming retry, 200", retry)
		}
	})

	t.Run("all channels down", func(t *testing.T) {
		t.Parallel()
		r := startRelay(t, kit)
		down := newDownUpstream(t)
		r.channel("down", down.URL, "anthropic", 0)
		res := kit.claude(t, r, newClientHome(t), "say hello")
		rows := r.logs(1)
		t.Logf("Claude Code, every channel down: %d requests: %s", down.hits.Load(), res)
		if model := rows[0].Model; res.code == 0 || !strings.Contains(res.stdout+res.stderr, fmt.Sprintf("no channel could serve model %q", model)) {
			t.Errorf("want a non-zero exit and ccload's error naming %s:\n%s", model, res)
		}
		if n := down.hits.Load(); n != 1 {
			t.Errorf("Claude Code sent %d requests; want 1: ccload says retrying cannot help", n)
		}
		if res.elapsed > 5*time.Second {
			t.Errorf("the error took %s to show; want under 5s", res.elapsed.Round(time.Millisecond))
		}
	})

	t.Run("session affinity", func(t *testing.T) {
		t.Parallel()
		r := startRelay(t, kit)
		a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
		a.set(fakeBehavior{Text: text})
		b.set(fakeBehavior{Text: text})
		r.channel("a", a.URL, "anthropic", 0)
		r.channel("b", b.URL, "anthropic", 0)
		h := newClientHome(t)
		for i, args := range [][]string{{"first turn"}, {"--continue", "second turn"}, {"--continue", "third turn"}} {
			if res := kit.claude(t, r, h, args...); res.code != 0 {
				t.Fatalf("turn %d:\n%s", i+1, res)
			}
		}
		calls := append(messagesCalls(a), messagesCalls(b)...)
		if len(calls) != 3 {
			t.Fatalf("upstreams got %d /v1/messages requests; want 3", len(calls))
		}
		sid := calls[0].Header.Get("X-Claude-Code-Session-Id")
		for _, c := range calls {
			if got := c.Header.Get("X-Claude-Code-Session-Id"); got != sid || sid == "" {
				t.Fatalf("--continue sent session %q after %q; the suite assumes one session", got, sid)
			}
		}
		if a.count() != 3 && b.count() != 3 {
			t.Errorf("one conversation went to a %d times and to b %d times; want all 3 turns on one channel", a.count(), b.count())
		}
		rows := r.logs(3)
		for i, row := range rows {
			want := "hit"
			if i == 0 {
				want = "new"
			}
			if row.Session == "" || row.Session != rows[0].Session || row.Affinity != want {
				t.Errorf("turn %d: log session %q affinity %q; want one session, affinity %s", i+1, row.Session, row.Affinity, want)
			}
		}
	})
}

func testCodex(t *testing.T, kit clientKit) {
	const text = "codex-ok "
	want := strings.Repeat(text, 3)
	// Codex prints the turn's tokens: fresh input plus output.
	const tokens = "tokens used\n" + "46"

	t.Run("plain", func(t *testing.T) {
		t.Parallel()
		r := startRelay(t, kit)
		up := newFakeUpstream(t, "main")
		up.set(fakeBehavior{Text: text})
		r.channel("main", up.URL, "openai", 0)
		res := kit.codex(t, r, newClientHome(t), "say hello")
		// The answer comes from response.output_item.done and the count
		// from response.completed: both must be what the real API sends.
		if res.code != 0 || strings.TrimSpace(res.stdout) != strings.TrimSpace(want) || !strings.Contains(res.stderr, tokens) {
			t.Fatalf("want exit 0, %q on stdout and %q on stderr:\n%s", want, tokens, res)
		}
		reqs := up.requests()
		if len(reqs) != 1 || reqs[0].Path != "/v1/responses" {
			t.Fatalf("upstream got %d requests (first %s); want one POST /v1/responses", len(reqs), reqs[0].Path)
		}
		req := reqs[0]
		if req.Key != channelKey("main") {
			t.Errorf("upstream got key %q; want the channel's", req.Key)
		}
		leaks(t, req)
		var body struct {
			Model          string `json:"model"`
			Stream         bool   `json:"stream"`
			PromptCacheKey string `json:"prompt_cache_key"`
		}
		if err := json.Unmarshal(req.Body, &body); err != nil {
			t.Fatal(err)
		}
		if sid := req.Header.Get("Session-Id"); body.PromptCacheKey == "" || body.PromptCacheKey != sid {
			t.Errorf("session: prompt_cache_key %q, session-id header %q; want the same id in both", body.PromptCacheKey, sid)
		}
		if body.Model != codexModel || !body.Stream {
			t.Errorf("body: model %q stream %v", body.Model, body.Stream)
		}
		t.Logf("Codex sent a %d-byte body", len(req.Body))
		row := r.logs(1)[0]
		if row.Token != "codex" || row.Protocol != "openai" || row.Model != codexModel || row.Status != 200 ||
			!row.Stream || row.ChannelName != "main" || row.Attempts != 1 {
			t.Errorf("log row %+v", row)
		}
		wantUsage(t, row, 0)
	})

	t.Run("failover", func(t *testing.T) {
		t.Parallel()
		r := startRelay(t, kit)
		bad, good := newFakeUpstream(t, "failing"), newFakeUpstream(t, "good")
		bad.set(fakeBehavior{Status: 500, ErrType: "server_error"})
		good.set(fakeBehavior{Text: text})
		r.channel("failing", bad.URL, "openai", 10)
		r.channel("good", good.URL, "openai", 0)
		res := kit.codex(t, r, newClientHome(t), "say hello")
		if res.code != 0 || strings.TrimSpace(res.stdout) != strings.TrimSpace(want) {
			t.Fatalf("want exit 0 and %q:\n%s", want, res)
		}
		if bad.count() != 1 || good.count() != 1 {
			t.Errorf("upstream hits: failing %d, good %d; want 1 and 1", bad.count(), good.count())
		}
		row := r.logs(1)[0]
		if row.Status != 200 || row.Attempts != 2 || row.ChannelName != "good" {
			t.Errorf("log row %+v; want 200 from good after 2 attempts", row)
		}
	})

	t.Run("upstream ends its body late", func(t *testing.T) {
		t.Parallel()
		r := startRelay(t, kit)
		up := newFakeUpstream(t, "main")
		up.set(fakeBehavior{Text: text, HoldEnd: true})
		r.channel("main", up.URL, "openai", 0)
		res := kit.codex(t, r, newClientHome(t), "say hello")
		// Codex is done at response.completed and hangs up.
		if res.code != 0 || strings.TrimSpace(res.stdout) != strings.TrimSpace(want) {
			t.Fatalf("want exit 0 and %q:\n%s", want, res)
		}
		row := r.logs(1)[0]
		if row.Status != 200 {
			t.Errorf("log row %+v; want 200: the whole answer reached the client", row)
		}
		wantUsage(t, row, 0)
	})

	t.Run("cut mid-stream", func(t *testing.T) {
		t.Parallel()
		r := startRelay(t, kit)
		up := newFakeUpstream(t, "main")
		up.set(fakeBehavior{Text: text, Deltas: 3, CutAfter: 1})
		r.channel("main", up.URL, "openai", 0)
		res := kit.codex(t, r, newClientHome(t), "say hello")
		rows := r.logs(up.count())
		t.Logf("Codex after cuts: %d requests: %s", len(rows), res)
		if res.code == 0 || !strings.Contains(res.stderr, "mid-stream") {
			t.Errorf("want a non-zero exit and ccload's response.failed message:\n%s", res)
		}
		for _, row := range rows {
			if row.Status != 502 || !strings.Contains(row.Error, "mid-response") {
				t.Errorf("log row %+v; want 502 naming the cut", row)
			}
		}
	})

	t.Run("all channels down", func(t *testing.T) {
		t.Parallel()
		// ccload answers 503 with x-should-retry: false at once, but Codex
		// 0.171 retries a 503 whatever the headers say: with its default
		// retries (4 requests × 5 streams) 29 requests in 25 s. README's
		// provider config leaves the retrying to ccload (request_max_retries
		// = 0, stream_max_retries = 2), as the config above does.
		r := startRelay(t, kit)
		down := newDownUpstream(t)
		r.channel("down", down.URL, "openai", 0)
		res := kit.codex(t, r, newClientHome(t), "say hello")
		t.Logf("Codex, every channel down: %d requests: %s", down.hits.Load(), res)
		if res.code == 0 || !strings.Contains(res.stderr, codexModel) {
			t.Errorf("want a non-zero exit and an error naming %s:\n%s", codexModel, res)
		}
		if res.elapsed > 5*time.Second {
			t.Errorf("the error took %s to show; want under 5s", res.elapsed.Round(time.Millisecond))
		}
	})

	t.Run("session affinity", func(t *testing.T) {
		t.Parallel()
		r := startRelay(t, kit)
		a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
		a.set(fakeBehavior{Text: text})
		b.set(fakeBehavior{Text: text})
		r.channel("a", a.URL, "openai", 0)
		r.channel("b", b.URL, "openai", 0)
		h := newClientHome(t)
		for i, args := range [][]string{{"first turn"}, {"resume", "--last", "second turn"}, {"resume", "--last", "third turn"}} {
			if res := kit.codex(t, r, h, args...); res.code != 0 {
				t.Fatalf("turn %d:\n%s", i+1, res)
			}
		}
		var calls []fakeRequest
		for _, f := range []*fakeUpstream{a, b} {
			for _, c := range f.requests() {
				if c.Path == "/v1/responses" {
					calls = append(calls, c)
				}
			}
		}
		if len(calls) != 3 {
			t.Fatalf("upstreams got %d /v1/responses requests; want 3", len(calls))
		}
		sid := calls[0].Header.Get("Session-Id")
		for _, c := range calls {
			if got := c.Header.Get("Session-Id"); got != sid || sid == "" {
				t.Fatalf("resume --last sent session %q after %q; the suite assumes one session", got, sid)
			}
		}
		if a.count() != 3 && b.count() != 3 {
			t.Errorf("one conversation went to a %d times and to b %d times; want all 3 turns on one channel", a.count(), b.count())
		}
		rows := r.logs(3)
		for i, row := range rows {
			want := "hit"
			if i == 0 {
				want = "new"
			}
			if row.Session == "" || row.Session != rows[0].Session || row.Affinity != want {
				t.Errorf("turn %d: log session %q affinity %q; want one session, affinity %s", i+1, row.Session, row.Affinity, want)
			}
		}
	})
}

func testSDKs(t *testing.T, kit clientKit) {
	const text = "sdk-ok "
	want := strings.Repeat(text, 3)

	// sdkCase starts a relay with one channel of typ whose upstream
	// behaves as b, and runs one SDK call against it.
	sdkCase := func(t *testing.T, typ string, b fakeBehavior, call, model string) (sdkResult, *fakeUpstream, *relayProc) {
		t.Helper()
		r := startRelay(t, kit)
		up := newFakeUpstream(t, "main")
		up.set(b)
		r.channel("main", up.URL, typ, 0, "claude-b", "claude-a", "gpt-b", "gpt-a")
		out, res := kit.sdk(t, r, call, model)
		t.Logf("%s: %s", call, strings.TrimSpace(res.stdout))
		return out, up, r
	}
	wantRow := func(t *testing.T, r *relayProc, status int, stream bool) clientLogRow {
		t.Helper()
		row := r.logs(1)[0]
		if row.Token != "sdk" || row.Status != status || row.Stream != stream || row.ChannelName != "main" {
			t.Errorf("log row %+v; want status %d, stream %v", row, status, stream)
		}
		return row
	}

	t.Run("anthropic messages.create", func(t *testing.T) {
		t.Parallel()
		out, up, r := sdkCase(t, "anthropic", fakeBehavior{Text: text}, "anthropic.create", "claude-a")
		if !out.OK || out.Text != want || out.Stop != "end_turn" || out.Usage["output_tokens"] != float64(fakeOutputTokens) ||
			out.Usage["cache_read_input_tokens"] != float64(fakeCacheRead) {
			t.Errorf("got %+v; want %q with the upstream's usage", out, want)
		}
		leaks(t, up.requests()[0])
		wantUsage(t, wantRow(t, r, 200, false), fakeCacheWrite)
	})

	t.Run("anthropic messages.stream", func(t *testing.T) {
		t.Parallel()
		out, _, r := sdkCase(t, "anthropic", fakeBehavior{Text: text}, "anthropic.stream", "claude-a")
		if !out.OK || out.Text != want || out.Deltas != 3 || out.Usage["input_tokens"] != float64(fakeInputTokens) ||
			out.Usage["output_tokens"] != float64(fakeOutputTokens) {
			t.Errorf("got %+v; want %q in 3 deltas with the upstream's usage", out, want)
		}
		wantUsage(t, wantRow(t, r, 200, true), fakeCacheWrite)
	})

	t.Run("anthropic countTokens", func(t *testing.T) {
		t.Parallel()
		out, up, r := sdkCase(t, "anthropic", fakeBehavior{}, "anthropic.countTokens", "claude-a")
		if !out.OK || out.Input != fakeInputTokens {
			t.Errorf("got %+v; want input_tokens %d", out, fakeInputTokens)
		}
		if reqs := up.requests(); len(reqs) != 1 || reqs[0].Path != "/v1/messages/count_tokens" {
			t.Errorf("upstream got %+v; want one count_tokens", reqs)
		}
		wantRow(t, r, 200, false)
	})

	t.Run("anthropic models.list", func(t *testing.T) {
		t.Parallel()
		out, up, _ := sdkCase(t, "anthropic", fakeBehavior{}, "anthropic.models", "")
		if !out.OK || !slices.Equal(out.IDs, []string{"claude-a", "claude-b", "gpt-a", "gpt-b"}) {
			t.Errorf("got %+v; want the configured models, sorted", out)
		}
		if up.count() != 0 {
			t.Errorf("models.list reached the upstream %d times; ccload answers it itself", up.count())
		}
	})

	t.Run("anthropic 400 passes through", func(t *testing.T) {
		t.Parallel()
		out, up, r := sdkCase(t, "anthropic", fakeBehavior{Status: 400, ErrType: "invalid_request_error"}, "anthropic.create", "claude-a")
		if out.OK || out.Error.Class != "BadRequestError" || out.Error.Type != "invalid_request_error" ||
			out.Error.APIMessage != "fake main error 400" {
			t.Errorf("got %+v; want BadRequestError with the upstream's message", out.Error)
		}
		if up.count() != 1 {
			t.Errorf("upstream got %d requests; want 1 (no retry of a 400)", up.count())
		}
		wantRow(t, r, 400, false)
	})

	// allDown checks the SDK shows ccload's all-down error at once.
	allDown := func(t *testing.T, typ, call, model, errType string) {
		r := startRelay(t, kit)
		down := newDownUpstream(t)
		r.channel("down", down.URL, typ, 0)
		out, res := kit.sdk(t, r, call, model)
		t.Logf("%s, every channel down: %d requests in %s: %s", call, down.hits.Load(), res.elapsed.Round(time.Millisecond), strings.TrimSpace(res.stdout))
		msg := fmt.Sprintf("no channel could serve model %q", model)
		if out.OK || !out.Error.APIError || out.Error.Status != 503 || out.Error.Type != errType || !strings.Contains(out.Error.APIMessage, msg) {
			t.Errorf("got %+v; want an APIError, 503 %s, saying %s", out.Error, errType, msg)
		}
		if n := down.hits.Load(); n != 1 {
			t.Errorf("the SDK sent %d requests; want 1: retrying cannot help", n)
		}
		if res.elapsed > 5*time.Second {
			t.Errorf("the error took %s to show; want under 5s", res.elapsed.Round(time.Millisecond))
		}
	}
	t.Run("anthropic all channels down", func(t *testing.T) {
		t.Parallel()
		allDown(t, "anthropic", "anthropic.create", "claude-a", "api_error")
	})
	t.Run("openai all channels down", func(t *testing.T) {
		t.Parallel()
		allDown(t, "openai", "openai.chat", "gpt-a", "server_error")
	})

	t.Run("openai responses.create stream", func(t *testing.T) {
		t.Parallel()
		out, _, r := sdkCase(t, "openai", fakeBehavior{Text: text}, "openai.responses", "gpt-a")
		if !out.OK || out.Text != want || out.Usage["output_tokens"] != float64(fakeOutputTokens) {
			t.Errorf("got %+v; want %q with the upstream's usage", out, want)
		}
		// The events arrive as the upstream sent them: all of them, in
		// order, numbered without gaps.
		wantTypes := []string{"response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
			"response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
			"response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"}
		var types []string
		for i, e := range out.Events {
			types = append(types, fmt.Sprint(e["type"]))
			if e["seq"] != float64(i) {
				t.Errorf("event %d (%s) has sequence_number %v", i, e["type"], e["seq"])
			}
		}
		if !slices.Equal(types, wantTypes) {
			t.Errorf("events %q; want %q", types, wantTypes)
		}
		wantUsage(t, wantRow(t, r, 200, true), 0)
	})

	t.Run("openai responses.stream helper", func(t *testing.T) {
		t.Parallel()
		out, _, _ := sdkCase(t, "openai", fakeBehavior{Text: text}, "openai.responses.stream", "gpt-a")
		if !out.OK || out.Text != want || out.Status != "completed" {
			t.Errorf("got %+v; want a completed response saying %q", out, want)
		}
	})

	t.Run("openai chat.completions stream with usage", func(t *testing.T) {
		t.Parallel()
		out, _, r := sdkCase(t, "openai", fakeBehavior{Text: text}, "openai.chat", "gpt-a")
		if !out.OK || out.Text != want || out.Usage["completion_tokens"] != float64(fakeOutputTokens) ||
			out.Usage["prompt_tokens"] != float64(fakeInputTokens+fakeCacheRead) {
			t.Errorf("got %+v; want %q with the upstream's usage", out, want)
		}
		wantUsage(t, wantRow(t, r, 200, true), 0)
	})

	t.Run("openai models.list", func(t *testing.T) {
		t.Parallel()
		out, up, _ := sdkCase(t, "openai", fakeBehavior{}, "openai.models", "")
		if !out.OK || !slices.Equal(out.IDs, []string{"claude-a", "claude-b", "gpt-a", "gpt-b"}) {
			t.Errorf("got %+v; want the configured models, sorted", out)
		}
		if up.count() != 0 {
			t.Errorf("models.list reached the upstream %d times; ccload answers it itself", up.count())
		}
	})

	cut := fakeBehavior{Text: text, Deltas: 3, CutAfter: 1}
	t.Run("openai chat cut mid-stream", func(t *testing.T) {
		t.Parallel()
		out, _, r := sdkCase(t, "openai", cut, "openai.chat", "gpt-a")
		if out.OK || !out.Error.APIError || !strings.Contains(out.Error.Message, "mid-stream") {
			t.Errorf("got %+v; want an APIError saying the stream broke off", out)
		}
		wantRow(t, r, 502, true)
	})

	t.Run("openai responses cut mid-stream", func(t *testing.T) {
		t.Parallel()
		out, _, r := sdkCase(t, "openai", cut, "openai.responses.stream", "gpt-a")
		wantRow(t, r, 502, true)
		// The SDK's helper checks that every lifecycle event names the same
		// response; a response.failed that does gives the reason.
		if out.Status != "failed" || out.RespError == nil || !strings.Contains(out.RespError.Message, "mid-stream") {
			t.Errorf("got %+v; want a failed response saying the stream broke off", out)
		}
	})
}

// TestReadmeClientVersions keeps the compatibility tables of the READMEs at
// the versions the suite runs.
func TestReadmeClientVersions(t *testing.T) {
	var pkg struct{ Dependencies map[string]string }
	if err := json.Unmarshal([]byte(readFile(t, filepath.Join(clientsDir, "package.json"))), &pkg); err != nil {
		t.Fatal(err)
	}
	for _, doc := range readmes {
		text := readFile(t, doc)
		for name, version := range pkg.Dependencies {
			row := ""
			for line := range strings.Lines(text) {
				if strings.HasPrefix(line, "|") && strings.Contains(line, "(`"+name+"`)") {
					row = line
				}
			}
			if !strings.Contains(row, "| "+version+" |") {
				t.Errorf("%s: the compatibility table does not give %s %s (package.json): %q", doc, name, version, row)
			}
		}
	}
}
