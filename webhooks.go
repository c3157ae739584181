package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Alerts (README "Alerts"): the few events a person running ccload must
// hear about, POSTed as JSON to every CCLOAD_WEBHOOK_URL. Events are raised
// where the state changes (cooldowns.fail and succeed, the relay giving up,
// the Redis mirror) by a call that never blocks: it checks the quiet period
// and drops the event into each webhook's bounded queue. One goroutine per
// webhook delivers, with a timeout and retries, so a dead webhook slows
// nothing but its own queue, which then drops and counts.

// The events. key_auth_failed is a key cooling for 401/402/403; a key
// cooling for a 429 raises nothing (rate limits come and go by themselves,
// and model_down says when they add up to an outage).
const (
	evChannelCooling   = "channel_cooling"
	evKeyAuthFailed    = "key_auth_failed"
	evModelDown        = "model_down"
	evChannelRecovered = "channel_recovered"
	evRedisDown        = "redis_down"
	evRedisRecovered   = "redis_recovered"
	evTest             = "test"
)

// alertEvent is the payload of the generic format (SPEC §11). key_index is
// null unless the event is about one key.
type alertEvent struct {
	Event       string    `json:"event"`
	Time        time.Time `json:"time"`
	ChannelID   int64     `json:"channel_id"`
	ChannelName string    `json:"channel_name"`
	KeyIndex    *int      `json:"key_index"`
	Model       string    `json:"model"`
	Message     string    `json:"message"`
	Text        string    `json:"text"`
}

// alertScope is what the quiet period is counted per: the same event about
// the same channel, key or model is sent once per quiet period.
type alertScope struct {
	event     string
	channelID int64
	keyIndex  int
	model     string
}

// webhookFormat is the body shape a receiver reads.
type webhookFormat string

const (
	formatJSON     webhookFormat = "json"     // the event itself; Slack reads its text
	formatDiscord  webhookFormat = "discord"  // {"content": text}
	formatFeishu   webhookFormat = "feishu"   // {"msg_type":"text","content":{"text":text}}
	formatDingTalk webhookFormat = "dingtalk" // {"msgtype":"text","text":{"content":text}}
)

// webhookTarget is one parsed entry of CCLOAD_WEBHOOK_URL.
type webhookTarget struct {
	url    string
	format webhookFormat
}

// parseWebhooks reads CCLOAD_WEBHOOK_URL: comma-separated URLs, each
// optionally prefixed with its format ("dingtalk:https://..."). Without a
// prefix the format follows the host (discord.com, open.feishu.cn,
// open.larksuite.com, oapi.dingtalk.com), else the generic JSON.
func parseWebhooks(v string) ([]webhookTarget, error) {
	var out []webhookTarget
	for raw := range strings.SplitSeq(v, ",") {
		raw = strings.TrimSpace(raw)
		if raw == "" {
			continue
		}
		t := webhookTarget{url: raw}
		if name, rest, ok := strings.Cut(raw, ":"); ok {
			switch f := webhookFormat(strings.ToLower(name)); f {
			case formatJSON, formatDiscord, formatFeishu, formatDingTalk, "slack":
				t.url, t.format = rest, f
				if f == "slack" {
					t.format = formatJSON
				}
			}
		}
		u, err := url.Parse(t.url)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			// The URL itself is a secret (Slack and Discord put the token
			// in it): the error names its position, not its text.
			return nil, fmt.Errorf("CCLOAD_WEBHOOK_URL entry %d: want an http:// or https:// URL, optionally prefixed with one of the formats json, slack, discord, feishu, dingtalk and a colon", len(out)+1)
		}
		if t.format == "" {
			t.format = formatForHost(u.Hostname())
		}
		out = append(out, t)
	}
	return out, nil
}

func formatForHost(host string) webhookFormat {
	host = strings.ToLower(host)
	has := func(domain string) bool { return host == domain || strings.HasSuffix(host, "."+domain) }
	switch {
	case has("discord.com") || has("discordapp.com"):
		return formatDiscord
	case has("feishu.cn") || has("larksuite.com"):
		return formatFeishu
	case has("dingtalk.com"):
		return formatDingTalk
	}
	return formatJSON
}

// body renders ev in the format.
func (f webhookFormat) body(ev alertEvent) ([]byte, error) {
	switch f {
	case formatDiscord:
		return json.Marshal(map[string]string{"content": ev.Text})
	case formatFeishu:
		return json.Marshal(map[string]any{"msg_type": "text", "content": map[string]string{"text": ev.Text}})
	case formatDingTalk:
		return json.Marshal(map[string]any{"msgtype": "text", "text": map[string]string{"content": ev.Text}})
	}
	return json.Marshal(ev)
}

// Delivery defaults: the zero value of each alerter field means these.
const (
	maxQuietScopes   = 4096 // (event, scope) pairs remembered for the quiet period
	webhookQueueSize = 256
	webhookTimeout   = 10 * time.Second
	webhookRetries   = 3 // attempts after the first
	webhookBackoff   = 2 * time.Second
)

// alerter raises events and delivers them. A nil *alerter (no webhook
// configured) takes every call and does nothing.
type alerter struct {
	now   func() time.Time
	quiet time.Duration // per (event, scope); 0 sends every event
	// names resolves a channel id to its name at delivery time; redact
	// removes every configured key from a message. Both are set by the app
	// and read only by the delivery goroutines.
	names  func(id int64) string
	redact func(string) string

	mu   sync.Mutex // guards last
	last map[alertScope]time.Time

	sinks []*webhookSink
}

// webhookSink is one URL: its queue, its goroutine and its health.
type webhookSink struct {
	webhookTarget
	label   string // what the admin and /metrics show: the URL's host, never its path or query
	queue   chan alertEvent
	client  *http.Client
	timeout time.Duration
	retries int
	backoff time.Duration

	sent, failed, dropped, retried atomic.Uint64

	mu        sync.Mutex // guards the fields below
	lastOK    time.Time
	lastErr   string
	lastErrAt time.Time
}

// alerterOptions tune delivery; zero values mean the defaults above.
type alerterOptions struct {
	Quiet     time.Duration
	QueueSize int
	Timeout   time.Duration
	Retries   int // negative: no retry
	Backoff   time.Duration
}

// newAlerter returns nil when there is no target: every method of a nil
// alerter is a no-op, so callers never check.
func newAlerter(targets []webhookTarget, opt alerterOptions, now func() time.Time) *alerter {
	if len(targets) == 0 {
		return nil
	}
	a := &alerter{now: now, quiet: opt.Quiet, last: make(map[alertScope]time.Time),
		names: func(int64) string { return "" }, redact: func(s string) string { return s }}
	qs := opt.QueueSize
	if qs <= 0 {
		qs = webhookQueueSize
	}
	for _, t := range targets {
		s := &webhookSink{webhookTarget: t, label: webhookLabel(t.url), queue: make(chan alertEvent, qs),
			timeout: opt.Timeout, retries: opt.Retries, backoff: opt.Backoff}
		if s.timeout <= 0 {
			s.timeout = webhookTimeout
		}
		switch {
		case s.retries == 0:
			s.retries = webhookRetries
		case s.retries < 0:
			s.retries = 0
		}
		if s.backoff <= 0 {
			s.backoff = webhookBackoff
		}
		// Its own transport: a receiver that never answers holds only
		// these connections, never the upstreams'.
		s.client = &http.Client{Transport: &http.Transport{Proxy: http.ProxyFromEnvironment, MaxIdleConnsPerHost: 2},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		a.sinks = append(a.sinks, s)
	}
	return a
}

// webhookLabel is the host of a webhook URL: the path and query of Slack,
// Discord, Feishu and DingTalk URLs carry the token.
func webhookLabel(raw string) string {
	if u, err := url.Parse(raw); err == nil {
		return u.Host
	}
	return "webhook"
}

// raise queues ev for every webhook unless the same event for the same
// scope went out within the quiet period. It never blocks: a full queue
// drops the event and counts it.
func (a *alerter) raise(sc alertScope, ev alertEvent) {
	if a == nil {
		return
	}
	now := a.now()
	a.mu.Lock()
	if t, ok := a.last[sc]; ok && a.quiet > 0 && now.Sub(t) < a.quiet {
		a.mu.Unlock()
		return
	}
	if len(a.last) >= maxQuietScopes {
		// Scopes include model names clients choose: forget those whose
		// quiet period is over, and if that is not enough, all of them
		// (an extra alert beats unbounded memory).
		for k, t := range a.last {
			if now.Sub(t) >= a.quiet {
				delete(a.last, k)
			}
		}
		if len(a.last) >= maxQuietScopes {
			clear(a.last)
		}
	}
	a.last[sc] = now
	a.mu.Unlock()
	ev.Event, ev.Time = sc.event, now.UTC()
	for _, s := range a.sinks {
		select {
		case s.queue <- ev:
		default:
			s.dropped.Add(1)
		}
	}
}

// cooling is cooldowns.fail's call: scope s of a channel started cooling
// (it was not cooling before this failure).
func (a *alerter) cooling(channelID int64, s scope, keyIndex int, model string, v verdict, until time.Time) {
	if a == nil {
		return
	}
	sc := alertScope{event: evChannelCooling, channelID: channelID, keyIndex: -1}
	ev := alertEvent{ChannelID: channelID, Message: v.reason}
	switch {
	case s == scopeKey && (v.status == 401 || v.status == 402 || v.status == 403):
		sc.event, sc.keyIndex = evKeyAuthFailed, keyIndex
		ev.KeyIndex = &keyIndex
	case s == scopeKey:
		return // a rate limit: see the event list
	case s == scopeModel:
		sc.model, ev.Model = model, model
	}
	ev.Message = fmt.Sprintf("%s; cooling until %s", v.reason, until.UTC().Format(time.RFC3339))
	a.raise(sc, ev)
}

// recovered is cooldowns.succeed's call: a success cleared a cooldown.
func (a *alerter) recovered(channelID int64, model string) {
	a.raise(alertScope{event: evChannelRecovered, channelID: channelID, keyIndex: -1},
		alertEvent{ChannelID: channelID, Model: model, Message: "a request succeeded; cooldown cleared"})
}

// modelDown is the relay's call when every candidate for a model failed.
func (a *alerter) modelDown(model string, tries int, lastErr string) {
	a.raise(alertScope{event: evModelDown, keyIndex: -1, model: model},
		alertEvent{Model: model, Message: fmt.Sprintf("all %d attempts failed; last: %s", tries, lastErr)})
}

// redis is the mirror's call when Redis goes down or comes back.
func (a *alerter) redis(up bool, addr, errText string) {
	if up {
		a.raise(alertScope{event: evRedisRecovered, keyIndex: -1}, alertEvent{Message: "redis " + addr + " reachable again; backup up to date"})
		return
	}
	a.raise(alertScope{event: evRedisDown, keyIndex: -1}, alertEvent{Message: "redis " + addr + " unreachable: " + errText})
}

// summary is the one-line text chat webhooks show.
func summaryText(ev alertEvent) string {
	var b strings.Builder
	b.WriteString("[ccload] ")
	b.WriteString(ev.Event)
	if ev.ChannelID != 0 {
		fmt.Fprintf(&b, " channel %q (#%d)", ev.ChannelName, ev.ChannelID)
	}
	if ev.KeyIndex != nil {
		fmt.Fprintf(&b, " key %d", *ev.KeyIndex)
	}
	if ev.Model != "" {
		fmt.Fprintf(&b, " model %s", ev.Model)
	}
	if ev.Message != "" {
		b.WriteString(": ")
		b.WriteString(ev.Message)
	}
	return b.String()
}

// finish fills what raise left for the delivery goroutine: the channel's
// name, the text, and no key anywhere.
func (a *alerter) finish(ev alertEvent) alertEvent {
	if ev.ChannelID != 0 && ev.ChannelName == "" {
		ev.ChannelName = a.names(ev.ChannelID)
	}
	ev.Message = a.redact(truncate(ev.Message, 500))
	ev.ChannelName = a.redact(ev.ChannelName)
	ev.Text = summaryText(ev)
	return ev
}

// run starts one delivery goroutine per webhook; they end with ctx.
func (a *alerter) run(ctx context.Context) {
	if a == nil {
		return
	}
	var wg sync.WaitGroup
	for _, s := range a.sinks {
		wg.Go(func() {
			for {
				select {
				case <-ctx.Done():
					return
				case ev := <-s.queue:
					s.deliver(ctx, a.finish(ev))
				}
			}
		})
	}
	wg.Wait()
}

// deliver sends ev, retrying with a doubling wait; it gives up after the
// retries and counts the failure.
func (s *webhookSink) deliver(ctx context.Context, ev alertEvent) {
	wait := s.backoff
	for attempt := 0; ; attempt++ {
		err := s.send(ctx, ev)
		if err == nil {
			s.sent.Add(1)
			s.mu.Lock()
			s.lastOK = time.Now()
			s.mu.Unlock()
			return
		}
		s.mu.Lock()
		s.lastErr, s.lastErrAt = err.Error(), time.Now()
		s.mu.Unlock()
		if attempt >= s.retries || ctx.Err() != nil {
			s.failed.Add(1)
			slog.Warn("webhook delivery failed; event dropped", "webhook", s.label, "event", ev.Event, "attempts", attempt+1, "err", err)
			return
		}
		s.retried.Add(1)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			s.failed.Add(1)
			return
		case <-t.C:
		}
		wait *= 2
	}
}

// errWebhookRejected is a receiver that answered but refused the event.
var errWebhookRejected = errors.New("webhook refused the event")

// send makes one POST. Feishu and DingTalk answer 200 with an error code in
// the body, so a non-zero code there is a failure too.
func (s *webhookSink) send(ctx context.Context, ev alertEvent) error {
	body, err := s.format.body(ev)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("build request: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "ccload/"+version)
	res, err := s.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("no answer within %s", s.timeout)
		}
		// The error text of a failed request quotes the URL, whose path
		// holds the token: keep only the cause.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return fmt.Errorf("post: %w", err)
	}
	defer res.Body.Close()
	reply, _ := io.ReadAll(io.LimitReader(res.Body, 4<<10))
	if res.StatusCode < 200 || res.StatusCode > 299 {
		return fmt.Errorf("%w: %s", errWebhookRejected, res.Status)
	}
	if s.format == formatFeishu || s.format == formatDingTalk {
		var r struct {
			Code    *int   `json:"code"`
			ErrCode *int   `json:"errcode"`
			Msg     string `json:"msg"`
			ErrMsg  string `json:"errmsg"`
		}
		if json.Unmarshal(reply, &r) == nil {
			if (r.Code != nil && *r.Code != 0) || (r.ErrCode != nil && *r.ErrCode != 0) {
				return fmt.Errorf("%w: %s", errWebhookRejected, truncate(r.Msg+r.ErrMsg, 200))
			}
		}
	}
	return nil
}

// webhookHealth is the admin view of one webhook.
type webhookHealth struct {
	Target    string     `json:"target"` // host only
	Format    string     `json:"format"`
	OK        bool       `json:"ok"` // the last delivery worked, or none failed yet
	Sent      uint64     `json:"sent"`
	Failed    uint64     `json:"failed"`
	Dropped   uint64     `json:"dropped"`
	Retried   uint64     `json:"retried"`
	Queued    int        `json:"queued"`
	LastOK    *time.Time `json:"last_ok"`
	LastError string     `json:"last_error"`
	LastErrAt *time.Time `json:"last_error_at"`
}

func (s *webhookSink) health() webhookHealth {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := webhookHealth{Target: s.label, Format: string(s.format), Sent: s.sent.Load(), Failed: s.failed.Load(),
		Dropped: s.dropped.Load(), Retried: s.retried.Load(), Queued: len(s.queue), LastError: s.lastErr}
	h.OK = s.lastErrAt.IsZero() || s.lastOK.After(s.lastErrAt)
	if !s.lastOK.IsZero() {
		t := s.lastOK.UTC()
		h.LastOK = &t
	}
	if !s.lastErrAt.IsZero() {
		t := s.lastErrAt.UTC()
		h.LastErrAt = &t
	}
	return h
}

// status is GET /admin/webhooks.
func (a *alerter) status() map[string]any {
	if a == nil {
		return map[string]any{"enabled": false, "webhooks": []webhookHealth{}}
	}
	hs := make([]webhookHealth, len(a.sinks))
	for i, s := range a.sinks {
		hs[i] = s.health()
	}
	return map[string]any{"enabled": true, "quiet_seconds": a.quiet.Seconds(), "webhooks": hs}
}

func (a *alerter) handleStatus() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.status())
	})
}

// handleTest is POST /admin/webhooks/test: one test event to every webhook,
// sent now (one attempt each, no quiet period), with each one's result.
func (a *alerter) handleTest() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		if a == nil {
			return invalid("no webhook configured: set CCLOAD_WEBHOOK_URL")
		}
		ev := a.finish(alertEvent{Event: evTest, Time: a.now().UTC(), Message: "test event from the ccload admin"})
		type result struct {
			Target string `json:"target"`
			OK     bool   `json:"ok"`
			Error  string `json:"error,omitempty"`
		}
		out := make([]result, len(a.sinks))
		var wg sync.WaitGroup
		for i, s := range a.sinks {
			wg.Go(func() {
				out[i] = result{Target: s.label, OK: true}
				if err := s.send(r.Context(), ev); err != nil {
					out[i].OK, out[i].Error = false, err.Error()
					return
				}
				s.sent.Add(1)
				s.mu.Lock()
				s.lastOK = time.Now()
				s.mu.Unlock()
			})
		}
		wg.Wait()
		writeJSON(w, http.StatusOK, map[string]any{"results": out})
		return nil
	})
}

// writeMetrics adds the webhooks' counters to /metrics, labelled by
// position and host.
func (a *alerter) writeMetrics(w io.Writer) {
	if a == nil {
		return
	}
	for _, m := range []struct {
		name, help, kind string
		val              func(*webhookSink) uint64
	}{
		{"ccload_webhook_sent_total", "Alert events delivered, by webhook.", "counter", func(s *webhookSink) uint64 { return s.sent.Load() }},
		{"ccload_webhook_failed_total", "Alert events given up after every retry, by webhook.", "counter", func(s *webhookSink) uint64 { return s.failed.Load() }},
		{"ccload_webhook_dropped_total", "Alert events dropped because the webhook's queue was full.", "counter", func(s *webhookSink) uint64 { return s.dropped.Load() }},
		{"ccload_webhook_retries_total", "Alert delivery attempts retried, by webhook.", "counter", func(s *webhookSink) uint64 { return s.retried.Load() }},
		{"ccload_webhook_queue_length", "Alert events waiting for delivery, by webhook.", "gauge", func(s *webhookSink) uint64 { return uint64(len(s.queue)) }},
	} {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", m.name, m.help, m.name, m.kind)
		for i, s := range a.sinks {
			fmt.Fprintf(w, "%s{webhook=\"%d\",host=%s} %d\n", m.name, i, promQuote(s.label), m.val(s))
		}
	}
}

// watch gives the alerter the channel names and keys of the live snapshot:
// names for the payload, keys to scrub from every message (an upstream may
// echo the key it was sent into its error).
func (a *alerter) watch(sel *selector) {
	if a == nil {
		return
	}
	a.names = func(id int64) string {
		for _, c := range sel.current().all {
			if c.ID == id {
				return c.Name
			}
		}
		return ""
	}
	a.redact = func(s string) string {
		for _, c := range sel.current().all {
			s = redactString(s, c.APIKeys, "")
		}
		return s
	}
}
