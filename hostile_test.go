package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Hostile upstreams (issue 13 part 3, README "Hostile upstreams"): one test
// per case, each against the real relay and the fake's hostile modes.

// waitEnded waits until the upstream's handler for one request returned:
// the relay let go of it.
func waitEnded(t *testing.T, f *fakeUpstream) {
	t.Helper()
	select {
	case <-f.ended:
	case <-time.After(10 * time.Second):
		t.Fatalf("upstream %s: the relay never let go of the request", f.name)
	}
}

// heapInUse is the live heap after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// TestHostileEndlessEventBeforeCommit: a stream whose first event never
// ends is cut at the cap and fails over unseen; the client gets the next
// channel's answer.
func TestHostileEndlessEventBeforeCommit(t *testing.T) {
	e := newTestEnv(t, func(c *config) { c.MaxEvent = 256 << 10 })
	bad, good := newFakeUpstream(t, "bad"), newFakeUpstream(t, "good")
	bad.set(fakeBehavior{EndlessEvent: true})
	badCh := e.addChannel(Channel{Name: "bad", URL: bad.URL, Priority: 10})
	goodCh := e.addChannel(Channel{Name: "good", URL: good.URL})
	resp, body := e.post("/v1/messages", anthropicBody("m", true))
	if resp.StatusCode != 200 || !strings.Contains(string(body), "message_stop") || strings.Contains(string(body), "xxxx") {
		t.Fatalf("status %d, body %.300s; want good's whole stream and none of bad's bytes", resp.StatusCode, body)
	}
	waitEnded(t, bad)
	row := e.lastLog()
	if row.ChannelID != goodCh.ID || row.Status != 200 || len(row.Tries) != 2 || row.Tries[0].ChannelID != badCh.ID ||
		row.Tries[0].Status != 502 || !strings.Contains(row.Tries[0].Error, "SSE event larger than 256KiB") {
		t.Errorf("log row: %+v", row)
	}
	if st := e.health(badCh.ID); st.CooldownUntil == nil {
		t.Error("the channel that sent an endless event does not cool")
	}
}

// TestHostileEndlessEventAfterCommit: once content flowed, an endless
// event ends the stream with the protocol's error event; none of it is
// relayed as content, and the relay holds at most the cap.
func TestHostileEndlessEventAfterCommit(t *testing.T) {
	e := newTestEnv(t) // the default cap, 16 MiB
	up := newFakeUpstream(t, "up")
	up.set(fakeBehavior{EndlessEvent: true, EndlessAfter: 2, Deltas: 5})
	ch := e.addChannel(Channel{Name: "up", URL: up.URL})
	before := heapInUse()
	resp, body := e.post("/v1/messages", anthropicBody("m", true))
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	s := string(body)
	if strings.Count(s, "text_delta") != 2 || strings.Contains(s, "xxxx") || !strings.Contains(s, "event: error") ||
		!strings.Contains(s, "SSE event larger than 16MiB") || len(body) > 64<<10 {
		t.Errorf("body (%d bytes): %.600s; want two deltas, then an error event, and nothing of the endless event", len(body), s)
	}
	waitEnded(t, up)
	if grew := int64(heapInUse()) - int64(before); grew > 8<<20 {
		t.Errorf("the heap grew by %d MiB after the stream ended", grew>>20)
	}
	row := e.lastLog()
	if row.Status != 502 || !strings.Contains(row.Error, "SSE event larger than") {
		t.Errorf("log row: status %d, error %q", row.Status, row.Error)
	}
	if st := e.health(ch.ID); st.CooldownUntil == nil {
		t.Error("the channel does not cool")
	}
}

// TestHostileTrickle: a stream that trickles one byte at a time into an
// event that never completes is idle as far as the relay can tell: the
// idle timeout counts whole events, so it ends the stream.
func TestHostileTrickle(t *testing.T) {
	e := newTestEnv(t, func(c *config) { c.IdleTimeout = 300 * time.Millisecond })
	up := newFakeUpstream(t, "drip")
	up.set(fakeBehavior{EndlessEvent: true, EndlessAfter: 1, Trickle: 10 * time.Millisecond})
	e.addChannel(Channel{Name: "drip", URL: up.URL})
	start := time.Now()
	resp, body := e.post("/v1/messages", anthropicBody("m", true))
	took := time.Since(start)
	if resp.StatusCode != 200 || !strings.Contains(string(body), "event: error") || strings.Contains(string(body), "xx") {
		t.Errorf("status %d, body %.400s; want the delta, then an error event", resp.StatusCode, body)
	}
	if took > 5*time.Second {
		t.Errorf("a trickling stream ran %s; want it cut after the 300ms idle timeout", took)
	}
	waitEnded(t, up)
	if row := e.lastLog(); row.Status != 502 {
		t.Errorf("log status %d; want 502", row.Status)
	}
}

// TestHostileHugeHeaders: response headers over the transport's limit are
// a dead upstream: fail over.
func TestHostileHugeHeaders(t *testing.T) {
	e := newTestEnv(t)
	bad, good := newFakeUpstream(t, "bad"), newFakeUpstream(t, "good")
	bad.set(fakeBehavior{HugeHeader: 2 << 20})
	badCh := e.addChannel(Channel{Name: "bad", URL: bad.URL, Priority: 10})
	e.addChannel(Channel{Name: "good", URL: good.URL})
	resp, body := e.post("/v1/messages", anthropicBody("m", false))
	if resp.StatusCode != 200 || resp.Header.Get("X-Huge") != "" {
		t.Fatalf("status %d, body %.200s", resp.StatusCode, body)
	}
	row := e.lastLog()
	if len(row.Tries) != 2 || row.Tries[0].ChannelID != badCh.ID || !strings.Contains(row.Tries[0].Error, "headers exceeded") {
		t.Errorf("tries: %+v", row.Tries)
	}
}

// TestHostileGzipBombError: an error answer that inflates to a gigabyte is
// read only as far as an error document can go; failover is prompt.
func TestHostileGzipBombError(t *testing.T) {
	e := newTestEnv(t)
	bad, good := newFakeUpstream(t, "bad"), newFakeUpstream(t, "good")
	bad.set(fakeBehavior{Status: 503, GzipBomb: 1 << 30})
	e.addChannel(Channel{Name: "bad", URL: bad.URL, Priority: 10})
	e.addChannel(Channel{Name: "good", URL: good.URL})
	start := time.Now()
	resp, body := e.post("/v1/messages", anthropicBody("m", false))
	if resp.StatusCode != 200 {
		t.Fatalf("status %d, body %.200s", resp.StatusCode, body)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("failover past a gzip bomb took %s", took)
	}
	if row := e.lastLog(); len(row.Tries) != 2 || row.Tries[0].Status != 503 || !strings.Contains(row.Tries[0].Error, "gzip bomb follows") {
		t.Errorf("tries: %+v", row.Tries)
	}
	// Only the bad channel: its 503 is the answer, cut to an error
	// document's size.
	e2 := newTestEnv(t)
	e2.addChannel(Channel{Name: "bad", URL: bad.URL})
	resp, body = e2.post("/v1/messages", anthropicBody("m", false))
	if resp.StatusCode != 503 || len(body) > maxErrorBody {
		t.Errorf("status %d, %d bytes; want 503 and at most %d bytes", resp.StatusCode, len(body), maxErrorBody)
	}
}

// TestHostileGzipBomb200: a 200 that inflates past CCLOAD_MAX_RESPONSE is
// cut there and blamed; the relay never holds it.
func TestHostileGzipBomb200(t *testing.T) {
	e := newTestEnv(t, func(c *config) { c.MaxResponse = 4 << 20 })
	up := newFakeUpstream(t, "bomb")
	up.set(fakeBehavior{GzipBomb: 1 << 30})
	ch := e.addChannel(Channel{Name: "bomb", URL: up.URL})
	req, _ := http.NewRequest("POST", e.URL+"/v1/messages", strings.NewReader(anthropicBody("m", false)))
	req.Header.Set("Content-Type", "application/json")
	start := time.Now()
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	n, rerr := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if rerr == nil || n > 5<<20 {
		t.Errorf("client read %d bytes, err %v; want the body broken off near 4 MiB", n, rerr)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("took %s", took)
	}
	waitEnded(t, up)
	row := e.lastLog()
	if row.Status != 502 || !strings.Contains(row.Error, "CCLOAD_MAX_RESPONSE") {
		t.Errorf("log: status %d, error %q", row.Status, row.Error)
	}
	if st := e.health(ch.ID); st.CooldownUntil == nil {
		t.Error("the channel does not cool")
	}
}

// TestHostileBigBody: a huge non-stream body streams through in constant
// memory while under the cap, and is cut at it.
func TestHostileBigBody(t *testing.T) {
	e := newTestEnv(t, func(c *config) { c.MaxResponse = 64 << 20 })
	up := newFakeUpstream(t, "big")
	e.addChannel(Channel{Name: "big", URL: up.URL})
	up.set(fakeBehavior{BigBody: 48 << 20})
	before := heapInUse()
	req, _ := http.NewRequest("POST", e.URL+"/v1/messages", strings.NewReader(anthropicBody("m", false)))
	req.Header.Set("Content-Type", "application/json")
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	// Read slowly at first: the relay must not buffer what the client has
	// not taken.
	buf := make([]byte, 1<<20)
	if _, err := io.ReadFull(resp.Body, buf); err != nil {
		t.Fatal(err)
	}
	if grew := int64(heapInUse()) - int64(before); grew > 16<<20 {
		t.Errorf("the heap grew by %d MiB with a 48 MiB body in flight", grew>>20)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || n+int64(len(buf)) < 48<<20 {
		t.Errorf("read %d bytes, %v; want the whole 48 MiB", n+int64(len(buf)), err)
	}
	if row := e.lastLog(); row.Status != 200 {
		t.Errorf("log status %d", row.Status)
	}

	up.set(fakeBehavior{BigBody: 100 << 20})
	resp, err = e.client.Do(mustRequest(t, e.URL+"/v1/messages", anthropicBody("m", false)))
	if err != nil {
		t.Fatal(err)
	}
	n, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err == nil || n > 65<<20 {
		t.Errorf("read %d bytes, %v; want the body cut near 64 MiB", n, err)
	}
	if row := e.lastLog(); row.Status != 502 || !strings.Contains(row.Error, "CCLOAD_MAX_RESPONSE") {
		t.Errorf("log: status %d, error %q", row.Status, row.Error)
	}
}

func mustRequest(t *testing.T, url, body string) *http.Request {
	t.Helper()
	req, err := http.NewRequest("POST", url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	return req
}

// TestHostileEchoedKey: an upstream that quotes the request's headers, our
// key among them, in its error: the key reaches neither the client, nor
// the log, nor the admin API, nor a webhook.
func TestHostileEchoedKey(t *testing.T) {
	const key = "sk-ant-echoed-secret-0123456789"
	hook := newHookReceiver(t)
	e := newTestEnv(t, withWebhooks(0, hook))
	up := newFakeUpstream(t, "echo")
	ch := e.addChannel(Channel{Name: "echo", URL: up.URL, APIKeys: []string{key}})
	tok := e.login()
	check := func(where string, b []byte) {
		t.Helper()
		if strings.Contains(string(b), key) || strings.Contains(string(b), "echoed-secret") {
			t.Errorf("the key reached %s: %.400s", where, b)
		}
	}
	for _, b := range []fakeBehavior{
		{EchoHeaders: true},              // 401: the key cools, and the answer is the last one
		{EchoHeaders: true, Status: 400}, // the client's own error, relayed as is
		{EchoHeaders: true, Status: 500},
	} {
		up.set(b)
		e.app.cool.clearAll(e.app.cool.get(ch.ID))
		resp, body := e.post("/v1/messages", anthropicBody("m", false))
		if resp.StatusCode != b.Status && !(b.Status == 0 && resp.StatusCode == 401) {
			t.Errorf("status %d for an echoing %d", resp.StatusCode, b.Status)
		}
		if !strings.Contains(string(body), maskKey(key)) {
			t.Errorf("status %d: body %.300s; want the echo with the key redacted", resp.StatusCode, body)
		}
		check("the client", body)
	}
	e.settle()
	_, logs := e.admin(tok, "GET", "/admin/logs?limit=10", "")
	check("the admin log", logs)
	if !strings.Contains(string(logs), maskKey(key)) {
		t.Errorf("the log lost the upstream's message: %.300s", logs)
	}
	up.set(fakeBehavior{EchoHeaders: true})
	e.post("/v1/messages", anthropicBody("m", false))
	_, chs := e.admin(tok, "GET", "/admin/channels", "")
	check("the admin channels API", chs)
	ev, _ := hook.nextEvent(t, evKeyAuthFailed)
	if !strings.Contains(ev.Message, maskKey(key)) {
		t.Errorf("webhook message %q; want the echo, redacted", ev.Message)
	}
	for _, b := range hook.bodies() {
		check("a webhook", []byte(b))
	}
}

// TestHostileConfig: the caps read from the environment, and refuse
// nonsense.
func TestHostileConfig(t *testing.T) {
	c, err := loadConfig(func(k string) string {
		return map[string]string{"CCLOAD_MAX_EVENT": "4MiB", "CCLOAD_MAX_RESPONSE": "1GiB"}[k]
	})
	if err != nil || c.MaxEvent != 4<<20 || c.maxResponse() != 1<<30 {
		t.Errorf("got %d, %d, %v", c.MaxEvent, c.maxResponse(), err)
	}
	for _, bad := range []map[string]string{{"CCLOAD_MAX_EVENT": "10"}, {"CCLOAD_MAX_RESPONSE": "lots"}} {
		if _, err := loadConfig(func(k string) string { return bad[k] }); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
	if d := (&relayConfig{}).maxResponse(); d != defaultMaxResponse {
		t.Errorf("default max response %d", d)
	}
}

// TestHostileDiskFull puts the database on a small tmpfs and fills it: the
// proxy keeps serving, lost log rows are counted on /metrics and the
// dashboard's summary, admin writes get a clear 503 and change nothing, and
// everything works again by itself once space is freed. It needs to mount
// (root, as in CI); elsewhere it says loudly that it did not run.
func TestHostileDiskFull(t *testing.T) {
	mnt := filepath.Join(t.TempDir(), "small")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Skipf("SKIPPING: cannot mount a tmpfs (%v: %s), so a full disk is NOT TESTED; run as root", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() })
	e := newTestEnv(t, func(c *config) { c.SQLitePath = filepath.Join(mnt, "ccload.db") })
	up := newFakeUpstream(t, "up")
	e.addChannel(Channel{Name: "up", URL: up.URL})
	tok := e.login()
	ctx := context.Background()
	serve := func(n int) {
		t.Helper()
		for range n {
			if resp, body := e.post("/v1/messages", anthropicBody("m", false)); resp.StatusCode != 200 {
				t.Fatalf("the proxy stopped serving: %d %s", resp.StatusCode, body)
			}
		}
		if err := e.app.logs.flush(ctx); err != nil {
			t.Fatal(err)
		}
	}
	serve(5)

	// Fill the disk.
	filler := filepath.Join(mnt, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 64<<10)
	for {
		if _, err := f.Write(chunk); err != nil {
			break
		}
	}
	f.Close()

	// Log rows fail once the WAL needs room it cannot get; the proxy
	// serves on.
	for i := 0; e.app.logs.failed.Load() == 0; i++ {
		if i == 200 {
			t.Fatalf("no log write failed after %d requests on a full disk", i*50)
		}
		serve(50)
	}
	_, metrics := e.do("GET", "/metrics", "", nil)
	if !regexp.MustCompile(`ccload_log_failed_total [1-9]`).Match(metrics) {
		t.Errorf("/metrics does not count the lost rows")
	}
	st, body := e.admin(tok, "GET", "/admin/summary", "")
	if st != 200 || !regexp.MustCompile(`"log_rows_lost":[1-9]`).Match(body) {
		t.Errorf("summary: %d %s; want log_rows_lost > 0", st, body)
	}
	before, _ := e.app.store.ListChannels(ctx)
	st, body = e.admin(tok, "POST", "/admin/channels", `{"name":"while-full","url":"https://x.example.com","api_key":"sk-while-full-1234"}`)
	if st != 503 || !strings.Contains(string(body), "disk is full") {
		t.Errorf("admin write on a full disk: %d %s; want 503 saying the disk is full", st, body)
	}
	if after, _ := e.app.store.ListChannels(ctx); len(after) != len(before) {
		t.Errorf("a refused write changed the channels: %d, then %d", len(before), len(after))
	}

	// Space returns: no restart needed.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	written := e.app.logs.written.Load()
	serve(5)
	if e.app.logs.written.Load() < written+5 {
		t.Errorf("log rows are not written again after space returned")
	}
	if st, body := e.admin(tok, "POST", "/admin/channels", `{"name":"after-full","url":"https://x.example.com","api_key":"sk-after-full-1234"}`); st != 201 {
		t.Errorf("admin write after space returned: %d %s", st, body)
	}
}

// TestHostileSIGKILL kills a real ccload process with SIGKILL while it logs
// as fast as it can: the database opens again, passes integrity_check, and
// keeps its channels and cooldowns, and ccload starts on it and lets the
// admin in; the log lost at most the
// rows of the last batch window (README "Hostile upstreams").
func TestHostileSIGKILL(t *testing.T) {
	if os.Getenv("CCLOAD_SIGKILL_CHILD") != "" {
		t.Skip("the child's side runs in TestHostileSIGKILLChild")
	}
	dir := t.TempDir()
	dbPath := filepath.Join(dir, "ccload.db")
	up := newFakeUpstream(t, "up")
	up.noRecord.Store(true)
	bad := newFakeUpstream(t, "bad")
	bad.set(fakeBehavior{Status: 500})

	start := func() (*exec.Cmd, string) {
		t.Helper()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		cmd := exec.Command(os.Args[0], "-test.run=^TestHostileSIGKILLChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), "CCLOAD_SIGKILL_CHILD=1", "SQLITE_PATH="+dbPath, "HOST=127.0.0.1",
			"PORT="+strconv.Itoa(port), "CCLOAD_PASS="+testAdminPass, "CCLOAD_AUTH=sk-client-token")
		var stderr syncBuffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		stderr.waitFor(t, "ccload listening")
		return cmd, "http://127.0.0.1:" + strconv.Itoa(port)
	}
	cmd, base := start()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	call := func(method, path, tok, body string) (int, string) {
		req, _ := http.NewRequest(method, base+path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := client.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	_, login := call("POST", "/login", "", `{"password":"`+testAdminPass+`"}`)
	var sess struct{ Token string }
	json.Unmarshal([]byte(login), &sess)
	for _, c := range []string{
		`{"name":"up","url":"` + up.URL + `","api_key":"sk-up-key-123456"}`,
		`{"name":"bad","url":"` + bad.URL + `","api_key":"sk-bad-key-123456","priority":10}`,
	} {
		if st, body := call("POST", "/admin/channels", sess.Token, c); st != 201 {
			t.Fatalf("create channel: %d %s", st, body)
		}
	}
	// One request cools "bad"; its cooldown row is written by the
	// persister at once. The admin API shows it once it is in memory.
	if st, body := call("POST", "/v1/messages", "sk-client-token", anthropicBody("m", false)); st != 200 {
		t.Fatalf("first request: %d %s", st, body)
	}

	// Heavy logging from 8 clients; each answered request notes its time.
	var (
		mu       sync.Mutex // guards answered
		answered []time.Time
		stop     atomic.Bool
		wg       sync.WaitGroup
	)
	for range 8 {
		wg.Go(func() {
			for !stop.Load() {
				if st, _ := call("POST", "/v1/messages", "sk-client-token", anthropicBody("m", false)); st == 200 {
					mu.Lock()
					answered = append(answered, time.Now())
					mu.Unlock()
				}
			}
		})
	}
	// Two seconds of traffic, so that the last batch window is a small
	// part of it.
	began := time.Now()
	for {
		mu.Lock()
		n := len(answered)
		mu.Unlock()
		if n >= 1000 && time.Since(began) > 2*time.Second {
			break
		}
		time.Sleep(10 * time.Millisecond) // letting traffic run, not waiting for an event
	}
	killedAt := time.Now()
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	stop.Store(true)
	wg.Wait()

	s, err := OpenStore(context.Background(), dbPath)
	if err != nil {
		t.Fatalf("the database does not open after SIGKILL: %v", err)
	}
	var check string
	if err := s.db.QueryRow("PRAGMA integrity_check").Scan(&check); err != nil || check != "ok" {
		t.Errorf("integrity_check: %q, %v", check, err)
	}
	chs, _ := s.ListChannels(context.Background())
	recs, _ := s.LoadCooldowns(context.Background())
	var rows int
	s.db.QueryRow("SELECT count(*) FROM logs").Scan(&rows)
	s.Close()
	if len(chs) != 2 || len(recs) == 0 {
		t.Errorf("after SIGKILL: %d channels, %d cooldown rows; want 2 and bad's", len(chs), len(recs))
	}
	// The bound: rows of requests answered within the batch window (plus
	// the time one batch takes to commit on a loaded machine) before the
	// kill. Every earlier row is on disk.
	mu.Lock()
	total, recent := len(answered)+1, 0
	for _, at := range answered {
		if at.After(killedAt.Add(-(logLinger + time.Second))) {
			recent++
		}
	}
	mu.Unlock()
	lost := total - rows
	t.Logf("answered %d, logged %d: lost %d; %d answered in the last %s", total, rows, lost, recent, logLinger+time.Second)
	if lost < 0 || lost > recent {
		t.Errorf("lost %d log rows; want at most the %d of the last batch window", lost, recent)
	}

	// And ccload starts on it again.
	_, base = start()
	if st, body := call("POST", "/login", "", `{"password":"`+testAdminPass+`"}`); st != 200 {
		t.Errorf("login after restart: %d %s", st, body)
	}
}

// TestHostileSIGKILLChild is the ccload process TestHostileSIGKILL kills.
func TestHostileSIGKILLChild(t *testing.T) {
	if os.Getenv("CCLOAD_SIGKILL_CHILD") == "" {
		t.Skip("run by TestHostileSIGKILL")
	}
	run(context.Background(), nil, os.LookupEnv, io.Discard, os.Stderr)
}
