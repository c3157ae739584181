package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// hookReceiver is a real loopback webhook receiver. It answers status
// (200 when zero), or never answers when stall is set.
type hookReceiver struct {
	*httptest.Server
	got     chan []byte
	hits    atomic.Int64
	status  atomic.Int32
	stall   atomic.Bool
	release chan struct{}

	mu  sync.Mutex // guards all
	all []string   // every body received
}

func (r *hookReceiver) bodies() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.all)
}

func newHookReceiver(t *testing.T) *hookReceiver {
	r := &hookReceiver{got: make(chan []byte, 1024), release: make(chan struct{})}
	r.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.hits.Add(1)
		if r.stall.Load() {
			select {
			case <-req.Context().Done():
			case <-r.release:
			}
			return
		}
		b, _ := io.ReadAll(req.Body)
		r.mu.Lock()
		r.all = append(r.all, string(b))
		r.mu.Unlock()
		if s := r.status.Load(); s != 0 {
			w.WriteHeader(int(s))
			return
		}
		r.got <- b
	}))
	t.Cleanup(func() {
		close(r.release)
		r.Server.CloseClientConnections()
		r.Server.Close()
	})
	return r
}

// next waits for the next delivered event.
func (r *hookReceiver) next(t *testing.T) alertEvent {
	t.Helper()
	select {
	case b := <-r.got:
		var ev alertEvent
		if err := json.Unmarshal(b, &ev); err != nil {
			t.Fatalf("webhook body %q: %v", b, err)
		}
		return ev
	case <-time.After(10 * time.Second):
		t.Fatal("timed out waiting for a webhook delivery")
	}
	return alertEvent{}
}

// nextEvent waits for the next event named name, returning the others seen
// on the way.
func (r *hookReceiver) nextEvent(t *testing.T, name string) (alertEvent, []string) {
	t.Helper()
	var skipped []string
	for {
		ev := r.next(t)
		if ev.Event == name {
			return ev, skipped
		}
		skipped = append(skipped, ev.Event)
	}
}

// none checks that nothing more was delivered, after the alerter has gone
// through its queue (waitIdle).
func (r *hookReceiver) none(t *testing.T) {
	t.Helper()
	select {
	case b := <-r.got:
		t.Errorf("unexpected webhook delivery: %s", b)
	default:
	}
}

// lockedClock is a clock tests move by hand, safe to read from the server's
// goroutines.
type lockedClock struct {
	mu sync.Mutex // guards t
	t  time.Time
}

func (c *lockedClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *lockedClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// withWebhooks points ccload at the receivers, with quiet as the quiet
// period and fast retries.
func withWebhooks(quiet time.Duration, rs ...*hookReceiver) func(*config) {
	return func(c *config) {
		for _, r := range rs {
			c.Webhooks = append(c.Webhooks, webhookTarget{url: r.URL + "/hook/secret-token", format: formatJSON})
		}
		c.Alerts = alerterOptions{Quiet: quiet, Retries: 2, Backoff: time.Millisecond, Timeout: 2 * time.Second}
	}
}

// waitDelivered waits until the webhook at i has sent plus failed n events.
func waitDelivered(t *testing.T, a *alerter, i int, n uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	s := a.sinks[i]
	for s.sent.Load()+s.failed.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("webhook %d: %d sent, %d failed; want %d handled", i, s.sent.Load(), s.failed.Load(), n)
		}
		time.Sleep(time.Millisecond) // polling a counter the goroutine owns; no ordering rests on it
	}
}

// TestWebhookEvents raises each proxy event through real traffic and checks
// what the receiver gets, keys kept out.
func TestWebhookEvents(t *testing.T) {
	hook := newHookReceiver(t)
	e := newTestEnv(t, withWebhooks(0, hook))
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	chA := e.addChannel(Channel{Name: "alpha", URL: a.URL, Priority: 10, APIKeys: []string{"sk-alpha-secret-0"}, Models: []string{"m1"}})
	chB := e.addChannel(Channel{Name: "beta", URL: b.URL, Priority: 0, APIKeys: []string{"sk-beta-secret-0"}, Models: []string{"m1"}})

	// 1. alpha fails: channel_cooling; beta serves.
	a.set(fakeBehavior{Status: 500})
	if resp, body := e.post("/v1/messages", anthropicBody("m1", false)); resp.StatusCode != 200 {
		t.Fatalf("failover: %d %s", resp.StatusCode, body)
	}
	ev := hook.next(t)
	if ev.Event != evChannelCooling || ev.ChannelID != chA.ID || ev.ChannelName != "alpha" || ev.KeyIndex != nil ||
		!strings.Contains(ev.Message, "500") || !strings.Contains(ev.Text, "channel_cooling") || !strings.Contains(ev.Text, "alpha") {
		t.Errorf("cooling event: %+v", ev)
	}

	// 2. beta fails too; alpha, the last resort, serves: channel_cooling
	// for beta, channel_recovered for alpha.
	a.set(fakeBehavior{})
	b.set(fakeBehavior{Status: 503})
	if resp, body := e.post("/v1/messages", anthropicBody("m1", false)); resp.StatusCode != 200 {
		t.Fatalf("last resort: %d %s", resp.StatusCode, body)
	}
	got := map[string]alertEvent{}
	for range 2 {
		ev := hook.next(t)
		got[ev.Event] = ev
	}
	if ev := got[evChannelCooling]; ev.ChannelID != chB.ID {
		t.Errorf("beta cooling: %+v", got)
	}
	if ev := got[evChannelRecovered]; ev.ChannelID != chA.ID || ev.ChannelName != "alpha" {
		t.Errorf("alpha recovered: %+v", got)
	}

	// 3. a revoked key: key_auth_failed with its index; the next key serves.
	k := newFakeUpstream(t, "k")
	k.set(fakeBehavior{RequireKey: "sk-kappa-good-1"})
	chK := e.addChannel(Channel{Name: "kappa", URL: k.URL, APIKeys: []string{"sk-kappa-revoked-0", "sk-kappa-good-1"}, Models: []string{"m2"}})
	if resp, body := e.post("/v1/messages", anthropicBody("m2", false)); resp.StatusCode != 200 {
		t.Fatalf("key failover: %d %s", resp.StatusCode, body)
	}
	ev = hook.next(t)
	if ev.Event != evKeyAuthFailed || ev.ChannelID != chK.ID || ev.KeyIndex == nil || *ev.KeyIndex != 0 || !strings.Contains(ev.Message, "401") {
		t.Errorf("key event: %+v", ev)
	}

	// 4. the only channel of a model fails: channel_cooling and model_down.
	d := newFakeUpstream(t, "d")
	d.set(fakeBehavior{Status: 529, ErrType: "overloaded_error"})
	e.addChannel(Channel{Name: "delta", URL: d.URL, APIKeys: []string{"sk-delta-secret-0"}, Models: []string{"m3"}})
	if resp, _ := e.post("/v1/messages", anthropicBody("m3", false)); resp.StatusCode == 200 {
		t.Fatal("a failing channel answered 200")
	}
	down, skipped := hook.nextEvent(t, evModelDown)
	if down.Model != "m3" || !strings.Contains(down.Message, "delta") || !slices.Equal(skipped, []string{evChannelCooling}) {
		t.Errorf("model_down: %+v after %v", down, skipped)
	}

	// No key in any payload, and the URL's token not on the admin API.
	for _, b := range hook.bodies() {
		if strings.Contains(b, "-secret-") || strings.Contains(b, "sk-kappa") {
			t.Errorf("a key in a webhook payload: %s", b)
		}
	}
	// The sender counts a delivery once it has read the receiver's answer,
	// a moment after the receiver has the event: wait for the count.
	tok := e.login()
	var st struct{ Webhooks []webhookHealth }
	for deadline := time.Now().Add(5 * time.Second); ; {
		status, body := e.admin(tok, "GET", "/admin/webhooks", "")
		if status != 200 || strings.Contains(string(body), "secret-token") || !strings.Contains(string(body), `"sent":`) {
			t.Fatalf("GET /admin/webhooks: %d %s", status, body)
		}
		json.Unmarshal(body, &st)
		if len(st.Webhooks) != 1 || st.Webhooks[0].Sent >= 6 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond) // polling a count; the condition, not the sleep, decides
	}
	if len(st.Webhooks) != 1 || st.Webhooks[0].Sent < 6 || !st.Webhooks[0].OK || st.Webhooks[0].Failed != 0 {
		t.Errorf("webhook health: %+v", st.Webhooks)
	}
}

// TestWebhookRedis takes a real Redis down and back: redis_down, then
// redis_recovered.
func TestWebhookRedis(t *testing.T) {
	r := startRedis(t, "")
	hook := newHookReceiver(t)
	s := storeAt(t, filepath.Join(t.TempDir(), "c.db"))
	m, _ := testMirror(t, s, r.redisURL())
	al := newAlerter([]webhookTarget{{url: hook.URL, format: formatJSON}}, alerterOptions{Backoff: time.Millisecond}, time.Now)
	m.alerts = al
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { al.run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	if err := m.restoreOrSeed(ctx); err != nil {
		t.Fatal(err)
	}
	runMirror(t, m)
	m.caughtUp(t)

	r.stop()
	c := storeChannel("Alpha")
	if err := s.CreateChannel(ctx, &c); err != nil {
		t.Fatal(err)
	}
	ev := hook.next(t)
	if ev.Event != evRedisDown || !strings.Contains(ev.Message, "127.0.0.1") {
		t.Errorf("redis down: %+v", ev)
	}
	r.start()
	ev = hook.next(t)
	if ev.Event != evRedisRecovered {
		t.Errorf("redis back: %+v", ev)
	}
}

// TestWebhookQuietPeriod: the same event for the same scope goes out once
// per quiet period; another scope, or the period over, goes out again.
func TestWebhookQuietPeriod(t *testing.T) {
	hook := newHookReceiver(t)
	clk := &lockedClock{t: time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)}
	al := newAlerter([]webhookTarget{{url: hook.URL, format: formatJSON}}, alerterOptions{Quiet: 5 * time.Minute}, clk.now)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { al.run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	v := verdict{status: 500, reason: "500 Internal Server Error"}
	until := clk.now().Add(time.Minute)
	al.cooling(1, scopeChannel, -1, "", v, until)
	if ev := hook.next(t); ev.Event != evChannelCooling || ev.ChannelID != 1 {
		t.Fatalf("first: %+v", ev)
	}
	clk.advance(4 * time.Minute)
	al.cooling(1, scopeChannel, -1, "", v, until) // quiet: dropped
	al.cooling(2, scopeChannel, -1, "", v, until) // another channel: sent
	al.recovered(1, "")                           // another event: sent
	if ev := hook.next(t); ev.ChannelID != 2 {
		t.Errorf("other scope: %+v", ev)
	}
	if ev := hook.next(t); ev.Event != evChannelRecovered {
		t.Errorf("other event: %+v", ev)
	}
	clk.advance(time.Minute + time.Second) // 5m1s after the first
	al.cooling(1, scopeChannel, -1, "", v, until)
	if ev := hook.next(t); ev.ChannelID != 1 || ev.Event != evChannelCooling {
		t.Errorf("after the quiet period: %+v", ev)
	}
	waitDelivered(t, al, 0, 4)
	hook.none(t)
	if n := hook.hits.Load(); n != 4 {
		t.Errorf("receiver saw %d posts; want 4", n)
	}
}

// TestWebhookReceiverFails: a receiver answering 500 is retried, then given
// up on; the failure is counted on the admin API and in /metrics.
func TestWebhookReceiverFails(t *testing.T) {
	hook := newHookReceiver(t)
	hook.status.Store(500)
	e := newTestEnv(t, withWebhooks(0, hook))
	al := e.app.alerts
	al.raise(alertScope{event: evModelDown, keyIndex: -1, model: "m"}, alertEvent{Model: "m", Message: "test"})
	waitDelivered(t, al, 0, 1)
	s := al.sinks[0]
	if s.failed.Load() != 1 || s.sent.Load() != 0 || s.retried.Load() != 2 || hook.hits.Load() != 3 {
		t.Errorf("failed %d, sent %d, retried %d, posts %d; want 1, 0, 2, 3", s.failed.Load(), s.sent.Load(), s.retried.Load(), hook.hits.Load())
	}
	h := s.health()
	if h.OK || !strings.Contains(h.LastError, "500") || strings.Contains(h.LastError, "secret-token") {
		t.Errorf("health: %+v", h)
	}
	_, body := e.do("GET", "/metrics", "", nil)
	for _, want := range []string{`ccload_webhook_failed_total{webhook="0",host="127.0.0.1:`, `ccload_webhook_retries_total{webhook="0"`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if strings.Contains(string(body), "secret-token") {
		t.Error("/metrics shows the webhook's token")
	}
	if !strings.Contains(string(body), "} 1\n") {
		t.Errorf("/metrics: failed count not 1:\n%s", body)
	}
}

// TestWebhookDeadReceiverKeepsLatency: a receiver that never answers must
// not slow the proxy. Every request raises an event (quiet period 0, a
// cooldown too short to skip the failing channel); the p50 latency is
// compared with the same traffic without webhooks, and the full queue
// drops and counts.
func TestWebhookDeadReceiverKeepsLatency(t *testing.T) {
	const n = 60
	measure := func(opts ...func(*config)) (time.Duration, *testEnv) {
		e := newTestEnv(t, opts...)
		e.app.cool.policy.Transient = time.Nanosecond // the failing channel is tried every time
		e.app.cool.policy.Cap = time.Nanosecond
		bad, good := newFakeUpstream(t, "bad"), newFakeUpstream(t, "good")
		bad.set(fakeBehavior{Status: 500})
		e.addChannel(Channel{Name: "bad", URL: bad.URL, Priority: 10})
		e.addChannel(Channel{Name: "good", URL: good.URL})
		var ds []time.Duration
		for range n {
			start := time.Now()
			if resp, body := e.post("/v1/messages", anthropicBody("m", false)); resp.StatusCode != 200 {
				t.Fatalf("%d %s", resp.StatusCode, body)
			}
			ds = append(ds, time.Since(start))
		}
		if bad.count() != n {
			t.Fatalf("the failing channel saw %d of %d requests", bad.count(), n)
		}
		slices.Sort(ds)
		return ds[n/2], e
	}
	base, _ := measure()
	hook := newHookReceiver(t)
	hook.stall.Store(true)
	withDead := func(c *config) {
		withWebhooks(0, hook)(c)
		c.Alerts.QueueSize = 4
		c.Alerts.Timeout = time.Minute
	}
	p50, e := measure(withDead)
	ratio := float64(p50) / float64(base)
	t.Logf("p50 without webhooks %s, with a dead webhook %s: ratio %.2f", base, p50, ratio)
	// A proxy that waited on the webhook would take its minute-long timeout.
	if ratio > 3 && p50-base > 5*time.Millisecond {
		t.Errorf("a dead webhook slowed the proxy: p50 %s vs %s (ratio %.2f)", p50, base, ratio)
	}
	s := e.app.alerts.sinks[0]
	if s.dropped.Load() < n-10 || s.sent.Load() != 0 {
		t.Errorf("dropped %d, sent %d; want most of %d dropped, none sent", s.dropped.Load(), s.sent.Load(), n)
	}
}

// TestWebhookTestEndpoint: POST /admin/webhooks/test reaches every webhook
// at once and reports each one's result.
func TestWebhookTestEndpoint(t *testing.T) {
	ok, broken := newHookReceiver(t), newHookReceiver(t)
	broken.status.Store(404)
	e := newTestEnv(t, withWebhooks(time.Hour, ok, broken))
	tok := e.login()
	status, body := e.admin(tok, "POST", "/admin/webhooks/test", "")
	if status != 200 {
		t.Fatalf("test: %d %s", status, body)
	}
	var out struct {
		Results []struct {
			Target, Error string
			OK            bool
		}
	}
	json.Unmarshal(body, &out)
	if len(out.Results) != 2 || !out.Results[0].OK || out.Results[1].OK || !strings.Contains(out.Results[1].Error, "404") {
		t.Errorf("results: %s", body)
	}
	if strings.Contains(string(body), "secret-token") {
		t.Errorf("the answer shows a webhook token: %s", body)
	}
	if ev := ok.next(t); ev.Event != evTest || !strings.Contains(ev.Text, "test") {
		t.Errorf("test event: %+v", ev)
	}
	// Without webhooks: a clear 400.
	e2 := newTestEnv(t)
	status, body = e2.admin(e2.login(), "POST", "/admin/webhooks/test", "")
	if status != 400 || !strings.Contains(string(body), "CCLOAD_WEBHOOK_URL") {
		t.Errorf("no webhooks: %d %s", status, body)
	}
}

// TestWebhookFormats: each chat service gets the field it reads, and no
// key reaches a payload even when the message quotes it.
func TestWebhookFormats(t *testing.T) {
	ev := alertEvent{Event: evChannelCooling, ChannelID: 3, ChannelName: "alpha", Message: "401 invalid key sk-live-0123456789"}
	al := &alerter{names: func(int64) string { return "" }, redact: func(s string) string { return redactString(s, []string{"sk-live-0123456789"}, "") }}
	ev = al.finish(ev)
	if strings.Contains(ev.Text, "sk-live") || strings.Contains(ev.Message, "sk-live") {
		t.Fatalf("key in the event: %+v", ev)
	}
	for f, path := range map[webhookFormat][]string{
		formatJSON:     {"text"},
		formatDiscord:  {"content"},
		formatFeishu:   {"content", "text"},
		formatDingTalk: {"text", "content"},
	} {
		b, err := f.body(ev)
		if err != nil {
			t.Fatal(err)
		}
		var v any
		json.Unmarshal(b, &v)
		for _, k := range path {
			v = v.(map[string]any)[k]
		}
		if v != ev.Text {
			t.Errorf("%s: %s at %v is %v; want the text", f, b, path, v)
		}
	}
	if b, _ := formatFeishu.body(ev); !strings.Contains(string(b), `"msg_type":"text"`) {
		t.Errorf("feishu: %s", b)
	}
	if b, _ := formatDingTalk.body(ev); !strings.Contains(string(b), `"msgtype":"text"`) {
		t.Errorf("dingtalk: %s", b)
	}
}

func TestParseWebhooks(t *testing.T) {
	got, err := parseWebhooks(" https://hooks.slack.com/services/T/B/x , dingtalk:https://example.com/robot?access_token=t," +
		"https://discord.com/api/webhooks/1/t,https://open.feishu.cn/open-apis/bot/v2/hook/t,json:http://127.0.0.1:9/h")
	if err != nil {
		t.Fatal(err)
	}
	var formats []string
	for _, w := range got {
		formats = append(formats, string(w.format))
	}
	if want := []string{"json", "dingtalk", "discord", "feishu", "json"}; !slices.Equal(formats, want) {
		t.Errorf("formats %v; want %v", formats, want)
	}
	if got[1].url != "https://example.com/robot?access_token=t" {
		t.Errorf("prefix not stripped: %q", got[1].url)
	}
	_, err = parseWebhooks("https://ok.example/h,ftp://tok-en-secret@x/y")
	if err == nil || !strings.Contains(err.Error(), "entry 2") || strings.Contains(err.Error(), "tok-en-secret") {
		t.Errorf("bad entry: %v", err)
	}
	c, err := loadConfig(func(k string) string {
		return map[string]string{"CCLOAD_WEBHOOK_URL": "http://127.0.0.1:1/h", "CCLOAD_WEBHOOK_QUIET": "90s"}[k]
	})
	if err != nil || len(c.Webhooks) != 1 || c.Alerts.Quiet != 90*time.Second {
		t.Errorf("config: %+v, %v", c.Alerts, err)
	}
	if _, err := loadConfig(func(k string) string { return map[string]string{"CCLOAD_WEBHOOK_QUIET": "soon"}[k] }); err == nil {
		t.Error("a bad CCLOAD_WEBHOOK_QUIET was accepted")
	}
}

// testBrowserWebhooks shows webhook health on the dashboard, in English and
// Chinese, and sends a test event from it (run by TestBrowser).
func testBrowserWebhooks(t *testing.T, bctx context.Context) {
	good, bad := newHookReceiver(t), newHookReceiver(t)
	bad.status.Store(500)
	e := newTestEnv(t, withWebhooks(0, good, bad))
	al := e.app.alerts
	al.raise(alertScope{event: evModelDown, keyIndex: -1, model: "m"}, alertEvent{Model: "m", Message: "all failed"})
	waitDelivered(t, al, 0, 1)
	waitDelivered(t, al, 1, 1)
	good.next(t)

	b := newBrowser(t, bctx, e)
	b.loginAt("#/dashboard", "#webhook-list li")
	goodSel := fmt.Sprintf(`#webhook-list li[data-target=%q]`, good.Listener.Addr().String())
	badSel := fmt.Sprintf(`#webhook-list li[data-target=%q]`, bad.Listener.Addr().String())
	if s := b.text(goodSel); !strings.Contains(s, "working") || !strings.Contains(s, "1 sent") {
		t.Errorf("good webhook = %q; want working, 1 sent", s)
	}
	if s := b.text(badSel); !strings.Contains(s, "failing") || !strings.Contains(s, "1 given up") || !strings.Contains(s, "500") {
		t.Errorf("failing webhook = %q; want failing, 1 given up, the 500", s)
	}
	if s := b.text("#webhook-status"); strings.Contains(s, "secret-token") {
		t.Errorf("the dashboard shows a webhook token: %q", s)
	}
	b.do("send a test event", chromedp.Click(chromedp.CSS("#webhook-test")))
	if ev := good.next(t); ev.Event != evTest {
		t.Errorf("test event: %+v", ev)
	}
	b.waitJS("the failure toast", `[...document.querySelectorAll('.toast.error')].some(el => el.textContent.includes('500'))`)
	b.shot("dashboard-webhooks")

	b.do("switch to Chinese", chromedp.Click(chromedp.CSS("#lang-toggle")))
	b.waitJS("Chinese webhook line", `document.querySelector('#webhook-status')?.textContent.includes('告警 Webhook')`)
	if s := b.text(badSel); !strings.Contains(s, "投递失败") {
		t.Errorf("failing webhook in Chinese = %q", s)
	}
	b.do("back to English", chromedp.Click(chromedp.CSS("#lang-toggle")))
}

// TestWebhookQuietScopesBounded: model names come from clients, so the
// quiet period's memory of scopes is bounded.
func TestWebhookQuietScopesBounded(t *testing.T) {
	al := newAlerter([]webhookTarget{{url: "http://127.0.0.1:1/h", format: formatJSON}}, alerterOptions{Quiet: time.Hour, QueueSize: 1}, time.Now)
	for i := range 3 * maxQuietScopes {
		al.modelDown(fmt.Sprint("model-", i), 1, "x")
	}
	if n := len(al.last); n > maxQuietScopes {
		t.Errorf("%d scopes remembered; want at most %d", n, maxQuietScopes)
	}
	if d := al.sinks[0].dropped.Load(); d != 3*maxQuietScopes-1 {
		t.Errorf("dropped %d; want all but the one queued", d)
	}
}
