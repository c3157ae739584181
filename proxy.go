package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// relay is the proxy: it picks channels for each client request and tries
// them in order until one answers. It is built on httputil.ReverseProxy,
// whose Transport is the retry loop (see relay.RoundTrip) and whose
// ErrorHandler speaks the protocol's error shape when every channel failed.
type relay struct {
	relayConfig
	sel      *selector
	cool     *cooldowns
	logs     *logWriter
	metrics  *metrics
	auth     *clientAuth
	alerts   *alerter          // hears a model go down; nil: nobody
	trust    proxyTrust        // whose X-Forwarded-For names the client
	prices   *prices           // nil: nothing is priced
	upstream http.RoundTripper // the real transport to the channels
	aff      *affinity         // nil when off
	counters *sharedCounters   // token limits shared through Redis (counters.go); nil: one replica
	Now      func() time.Time

	proxy    *httputil.ReverseProxy
	inflight sync.WaitGroup // proxied requests not yet logged
}

// relayConfig tunes the relay. The zero value of each field means its
// default, so that the defaults live here and nowhere else.
type relayConfig struct {
	// FirstByteTimeout bounds, for a stream, the wait from sending the
	// request to the first content event. Zero means 60 s.
	FirstByteTimeout time.Duration
	// ResponseTimeout bounds, for a non-stream request, the wait for the
	// response to begin: the whole answer is generated before it does.
	// Zero means 10 minutes, or FirstByteTimeout if that is longer.
	ResponseTimeout time.Duration
	// IdleTimeout bounds the silence between reads once a response flows.
	// A stream that outlasts it ends with an error event and cools its
	// channel. Zero means 5 minutes; negative means no limit.
	IdleTimeout time.Duration
	// MaxBody is the largest request body accepted (413 above it). Zero
	// means 32 MiB.
	MaxBody int64
	// Affinity keeps a conversation on its channel and key (affinity.go).
	Affinity affinityConfig
	// MaxEvent is the largest SSE event relayed; a larger one is an
	// upstream failure (see sse.go). Zero means 16 MiB.
	MaxEvent int
	// MaxResponse is the largest non-stream response body relayed; a
	// larger one is cut off and blamed (see hostile.go). Zero means 256 MiB.
	MaxResponse int64
	// BodyTimeout bounds the read of a request body (408 when it passes),
	// so a client that announces a body and sends it slowly or never
	// cannot hold its connection. Zero means 60 s.
	BodyTimeout time.Duration
}

func (c *relayConfig) bodyWait() time.Duration {
	if c.BodyTimeout > 0 {
		return c.BodyTimeout
	}
	return 60 * time.Second
}

func (c *relayConfig) firstByteWait() time.Duration {
	if c.FirstByteTimeout > 0 {
		return c.FirstByteTimeout
	}
	return 60 * time.Second
}

func (c *relayConfig) responseWait() time.Duration {
	if c.ResponseTimeout > 0 {
		return c.ResponseTimeout
	}
	return max(10*time.Minute, c.firstByteWait())
}

// idleWait is the idle timeout; 0 means none.
func (c *relayConfig) idleWait() time.Duration {
	switch {
	case c.IdleTimeout < 0:
		return 0
	case c.IdleTimeout == 0:
		return 5 * time.Minute
	}
	return c.IdleTimeout
}

func (c *relayConfig) maxBody() int64 {
	if c.MaxBody > 0 {
		return c.MaxBody
	}
	return 32 << 20
}

// maxErrorBody bounds the error bodies kept to classify and to replay.
const maxErrorBody = 64 << 10

var (
	errClientGone       = errors.New("client went away")
	errFirstByteTimeout = errors.New("first byte timeout")
	errIdleTimeout      = errors.New("upstream idle timeout")
)

// attemptTimer bounds one attempt: first the wait for the response to
// begin, then, once it flows, each silence between reads. Either ends the
// attempt by cancelling its context with the cause. One timer serves both
// waits, so an open stream holds one timer, not two.
type attemptTimer struct {
	t      *time.Timer
	cancel context.CancelCauseFunc
	// idle is the silence allowed once the response flows, in
	// nanoseconds; 0 while it has not begun. Atomic: the timer's function
	// reads it on the timer's goroutine.
	idle atomic.Int64
}

func startAttemptTimer(cancel context.CancelCauseFunc, wait time.Duration) *attemptTimer {
	at := &attemptTimer{cancel: cancel}
	at.t = time.AfterFunc(wait, at.fire)
	return at
}

// fire ends the attempt with the cause of the wait that ran out.
func (at *attemptTimer) fire() {
	if at.idle.Load() > 0 {
		at.cancel(errIdleTimeout)
	} else {
		at.cancel(errFirstByteTimeout)
	}
}

// flowing switches from the first-byte wait to the idle timeout (0: none).
func (at *attemptTimer) flowing(idle time.Duration) {
	if !at.t.Stop() {
		return // the first-byte wait ran out meanwhile: the attempt is over
	}
	if idle > 0 {
		at.idle.Store(int64(idle))
		at.t.Reset(idle)
	}
}

// touch restarts the idle timeout: data just arrived.
func (at *attemptTimer) touch() {
	if idle := at.idle.Load(); idle > 0 {
		at.t.Reset(time.Duration(idle))
	}
}

func (at *attemptTimer) stop() {
	at.t.Stop()
	at.cancel(nil)
}

// newUpstreamTransport is the transport to channels. Timeouts sit on the
// transport, never on a client or server, which would cut long streams.
func newUpstreamTransport() *http.Transport {
	return &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		ForceAttemptHTTP2:      true,
		MaxIdleConns:           0, // no global limit; per host below
		MaxIdleConnsPerHost:    512,
		IdleConnTimeout:        90 * time.Second,
		TLSHandshakeTimeout:    10 * time.Second,
		ExpectContinueTimeout:  time.Second,
		MaxResponseHeaderBytes: maxResponseHeader,
	}
}

func newRelay(cfg relayConfig, sel *selector, cool *cooldowns, logs *logWriter, m *metrics, auth *clientAuth, upstream http.RoundTripper) *relay {
	rl := &relay{
		relayConfig: cfg,
		sel:         sel, cool: cool, logs: logs, metrics: m, auth: auth, upstream: upstream,
		aff: newAffinity(cfg.Affinity), Now: time.Now,
	}
	rl.proxy = &httputil.ReverseProxy{
		Rewrite:   rl.rewrite,
		Transport: rl,
		ModifyResponse: func(res *http.Response) error {
			hideUpstreamHeaders(res.Header)
			return nil
		},
		ErrorHandler: rl.proxyError,
		BufferPool:   copyBuffers{},
		ErrorLog:     slog.NewLogLogger(slog.Default().Handler(), slog.LevelWarn),
	}
	return rl
}

// copyBuffers lends ReverseProxy its copy buffers. A stream holds one for
// its whole life, and events are small: 8 KiB keeps thousands of open
// streams cheap (ReverseProxy's own default is 32 KiB each).
type copyBuffers struct{}

var copyBufPool = sync.Pool{New: func() any { b := make([]byte, 8<<10); return &b }}

func (copyBuffers) Get() []byte  { return *copyBufPool.Get().(*[]byte) }
func (copyBuffers) Put(b []byte) { copyBufPool.Put(&b) }

// exchange is the state of one client request, from arrival to log row.
// The request's part is fixed once read; the outcome's part is written by
// few hands: each attempt appends its try, commit and settle record the
// answer the client got, and finish builds the log row from all of it.
type exchange struct {
	start     time.Time
	proto     protocol
	responses bool // the OpenAI Responses API (Codex)
	aux       bool // count_tokens: not every channel has it
	probe     bool // an admin's channel test: failures cool nothing
	stream    bool
	token     string
	client    *managedToken   // the managed token it came with; nil for CCLOAD_AUTH or open mode
	holds     bool            // client's concurrency slot is taken (see settleToken)
	sharedBy  *sharedCounters // its slot is also held in Redis; nil: not
	clientIP  string
	model     string
	gemAction string // gemini: the action after the model in the path
	path      string // the client's path, decoded and checked (see clientPath)
	secret    string // the client's token as presented, to mask it in what upstreams echo
	info      bodyInfo
	buf       *bodyBuf // holds body; released once a response is committed
	body      []byte   // the request body, dropped once a response is committed
	sent      sentBody // the body as the current attempt sends it (model redirected)

	plan    plan
	planBuf [8]*channelEntry
	keyBuf  [8]int
	aff     affinityState

	// Outcome.
	tries     []try // every attempt, in order
	tryBuf    [2]try
	served    int // index in tries of the attempt whose answer the client got; -1 if none
	status    int // what the client got (499 if it left)
	firstByte time.Duration
	usage     usage
	errText   string
	logged    bool
}

// try is one attempt at one channel and key, for the log's trace.
type try struct {
	entry  *channelEntry
	key    int
	start  time.Time
	dur    time.Duration
	status int    // the upstream's, or the one judge stood in (502, 504)
	cooled scope  // what the failure cooled; scopeNone for an answer
	err    string // short, "" for an answer
}

type exchangeKey struct{}

func exchangeFrom(ctx context.Context) *exchange {
	x, _ := ctx.Value(exchangeKey{}).(*exchange)
	return x
}

// handle returns the handler for one protocol's proxied paths.
func (rl *relay) handle(p protocol) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		x := &exchange{start: rl.Now(), proto: p, served: -1, clientIP: rl.trust.clientIP(r)}
		x.tries = x.tryBuf[:0]
		rl.inflight.Add(1)
		// Deferred so that the row is written even when ReverseProxy aborts
		// the handler with http.ErrAbortHandler (the client went away
		// mid-stream).
		defer rl.finish(x)
		if rl.admit(x, w, r) {
			rl.proxy.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), exchangeKey{}, x)))
		}
	})
}

// admit reads and checks the request and plans its channels; false means it
// was answered here. It returns before anything is relayed, so that its
// frame is not on the stack of a stream that runs for minutes.
func (rl *relay) admit(x *exchange, w http.ResponseWriter, r *http.Request) bool {
	p := x.proto
	if msg := rl.auth.openRefusal(r); msg != "" {
		rl.reject(w, x, http.StatusForbidden, msg)
		return false
	}
	name, mt, deny := rl.auth.identifyClient(r, p, rl.Now())
	if deny != "" {
		rl.reject(w, x, http.StatusUnauthorized, deny)
		return false
	}
	x.token, x.client = name, mt
	if !rl.auth.open() {
		x.secret = presentedToken(r, p)
	}
	path, ok := clientPath(r.URL.EscapedPath())
	if !ok {
		rl.reject(w, x, http.StatusBadRequest, "the path has a dot segment, an encoded slash or a backslash: ccload does not send such paths upstream")
		return false
	}
	x.path = path
	x.responses = strings.HasPrefix(r.URL.Path, "/v1/responses")
	x.aux = strings.HasSuffix(r.URL.Path, "/count_tokens") || strings.HasSuffix(r.URL.Path, ":countTokens")

	// A body that arrives slowly or never must not hold the connection;
	// the deadline goes once the body is in, since a stream may then run
	// for minutes with the connection idle.
	rc := http.NewResponseController(w)
	rc.SetReadDeadline(time.Now().Add(rl.bodyWait()))
	bb, err := readBody(w, r, rl.maxBody())
	rc.SetReadDeadline(time.Time{})
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			rl.reject(w, x, http.StatusRequestEntityTooLarge,
				fmt.Sprintf("request body is larger than the %s limit (CCLOAD_MAX_BODY)", formatBytes(tooBig.Limit)))
			return false
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			w.Header().Set("Connection", "close")
			rl.reject(w, x, http.StatusRequestTimeout,
				fmt.Sprintf("the request body did not arrive within %s (CCLOAD_BODY_TIMEOUT)", rl.bodyWait()))
			return false
		}
		if r.Context().Err() != nil || errors.Is(err, io.ErrUnexpectedEOF) {
			// The connection ended inside the body: nobody is left to answer.
			x.status, x.errText = 499, "client disconnected while sending the body"
			return false
		}
		rl.reject(w, x, http.StatusBadRequest, "could not read the request body: "+err.Error())
		return false
	}
	x.buf, x.body = bb, bb.b
	body := x.body

	if p == protoGemini {
		model, action, ok := geminiTarget(r.PathValue("target"))
		if !ok {
			rl.reject(w, x, http.StatusBadRequest, "path must be /v1beta/models/{model}:{action}")
			return false
		}
		x.model, x.gemAction = model, action
		x.stream = strings.HasPrefix(action, "stream")
	}
	if len(body) == 0 && p != protoGemini {
		rl.reject(w, x, http.StatusBadRequest, "request body is empty: send a JSON object with a \"model\"")
		return false
	}
	if len(body) > 0 {
		info, err := inspectBody(body)
		if err != nil {
			var se *syntaxError
			if errors.As(err, &se) {
				rl.reject(w, x, http.StatusBadRequest, "request body is not valid JSON: "+se.Error())
				return false
			}
			rl.reject(w, x, http.StatusBadRequest, err.Error())
			return false
		}
		x.info = info
		if p != protoGemini {
			x.model, x.stream = info.model, info.stream
		}
	}
	if x.model == "" {
		rl.reject(w, x, http.StatusBadRequest, `request body has no "model": say which model to use`)
		return false
	}

	if !rl.admitToken(x, w) {
		return false
	}

	rt := rl.sel.current().route(p, x.model)
	if rt == nil {
		rl.reject(w, x, http.StatusNotFound, fmt.Sprintf("no enabled %s channel serves model %q", p, x.model))
		return false
	}
	x.plan = rt.makePlan(x.model, rl.Now().UnixNano(), x.planBuf[:0])
	if !rl.restrictPlan(x, rt, w) {
		return false
	}
	rl.aff.route(x, r.Header, rl.Now())
	return true
}

// reject answers a request that never reached an upstream.
func (rl *relay) reject(w http.ResponseWriter, x *exchange, status int, msg string) {
	x.status, x.errText = status, msg
	writeError(w, x.proto, status, msg)
}

// rewrite prepares the outbound request once; each attempt then sets its
// own destination and key (see prepare). The client's credentials never go
// upstream. Accept-Encoding is left to the transport, which decodes what it
// asks for, so the relay can read events and usage from every response.
func (rl *relay) rewrite(pr *httputil.ProxyRequest) {
	h := pr.Out.Header
	for _, k := range credentialHeaders {
		delete(h, k)
	}
	// A browser on the admin's origin would send the admin session.
	delete(h, "Cookie")
	delete(h, "Accept-Encoding")
	// Gemini clients may send their token as ?key=; the name is matched
	// decoded, as presentedToken reads it (?%6Bey= is the same key).
	if q := pr.Out.URL.RawQuery; q != "" && (strings.Contains(q, "ey") || strings.IndexByte(q, '%') >= 0) {
		v := pr.Out.URL.Query()
		if _, ok := v["key"]; ok {
			v.Del("key")
			pr.Out.URL.RawQuery = v.Encode()
		}
	}
}

// prepare points req at channel e with key k and gives it a fresh body.
func (rl *relay) prepare(req *http.Request, x *exchange, e *channelEntry, k int) {
	x.sent = sentBody{body: x.body}
	// The client's path as admit checked it, never req.URL.Path: the first
	// attempt's request shares its URL with ReverseProxy's, so a retry
	// would find the previous channel's base path already in front.
	path := x.path
	if m := e.upstreamModel(x.model); m != x.model {
		if x.proto == protoGemini {
			path = "/v1beta/models/" + m + ":" + x.gemAction
		} else {
			x.sent.redirect(x.info, m)
		}
	}
	u := req.URL
	u.Scheme, u.Host = e.base.Scheme, e.base.Host
	u.Path, u.RawPath = e.base.Path+path, ""
	req.Host = ""
	if n := x.sent.size(); n > 0 {
		req.Body, req.GetBody = x.newBodyReader(), x.reopenBody
		req.ContentLength = int64(n)
	} else {
		req.Body, req.GetBody, req.ContentLength = nil, nil, 0
	}

	h := req.Header
	switch e.proto {
	case protoAnthropic:
		h["X-Api-Key"] = e.keyValue[k]
		if e.official {
			delete(h, "Authorization")
		} else {
			h["Authorization"] = e.bearerValue[k]
		}
	case protoOpenAI:
		h["Authorization"] = e.bearerValue[k]
	case protoGemini:
		h["X-Goog-Api-Key"] = e.keyValue[k]
	}
}

// RoundTrip is the retry loop. It tries the planned channels, and inside a
// channel its keys, until one gives a response the client should see. A
// response goes back only when it is a success or the client's own error;
// everything else cools what failed and moves on. It never retries once the
// response has begun: by then the client has seen headers.
func (rl *relay) RoundTrip(out *http.Request) (*http.Response, error) {
	x := exchangeFrom(out.Context())
	if x == nil {
		return nil, errors.New("ccload: request without exchange state")
	}
	var last *http.Response // the last upstream error answer, buffered
	lastTry := -1
	defer func() {
		if last != nil {
			last.Body.Close()
		}
	}()
	// Channels whose expired cooldown another request is trying right now
	// (see coolSlot.claimTrial) go after the plan's own order, before its
	// last resort: tried only if nothing else serves. So do those that began
	// cooling after the plan was made (another request saw them fail): not
	// skipped, since they may be all that is left to serve this request.
	var behind [4]*channelEntry
	later := behind[:0]
	for i, j := 0, 0; ; {
		var e *channelEntry
		switch {
		case i < len(x.plan.order):
			e = x.plan.order[i]
			i++
			if !e.health.claimTrial(x.model, rl.Now().UnixNano()) {
				later = append(later, e)
				continue
			}
		case j < len(later):
			e = later[j]
			j++
		default:
			e = x.plan.candidate(i)
			i++
		}
		if e == nil {
			break
		}
		for _, k := range x.aff.keyOrder(e, e.keyOrder(rl.Now().UnixNano(), x.keyBuf[:0])) {
			res, v, err := rl.attempt(out, x, e, k)
			if err != nil {
				return nil, err
			}
			if v.scope == scopeNone {
				return res, nil
			}
			if res != nil {
				if last != nil {
					last.Body.Close()
				}
				last, lastTry = res, len(x.tries)-1
			}
			if v.scope != scopeKey {
				break // the next key would fail alike: next channel
			}
		}
	}
	// A token held to some channels saw only those fail: not the model down.
	if !x.probe && !x.aux && len(x.tries) > 0 && (x.client == nil || x.client.channels == nil) {
		rl.alerts.modelDown(x.model, len(x.tries), x.errText)
	}
	if last == nil {
		return nil, &exhaustedError{x: x, free: rl.firstFree(x)}
	}
	// Every candidate failed and some answered: the last answer goes back
	// as it was, and the log names whoever gave it, not the last tried.
	res := last
	last = nil
	t := &x.tries[lastTry]
	x.served, x.status, x.errText = lastTry, t.status, t.entry.ch.Name+": "+t.err
	if res.Header.Get("Retry-After") == "" && res.Header.Get("Retry-After-Ms") == "" {
		adviseRetry(res.Header, rl.firstFree(x), rl.Now())
	}
	return res, nil
}

// attempt sends the request to e with key k once. It returns the response
// for the client with a verdict of scopeNone (a success or the client's own
// error, committed), or the failure's verdict with, when the upstream
// answered, its buffered answer (kept as the last resort); or errClientGone.
func (rl *relay) attempt(out *http.Request, x *exchange, e *channelEntry, k int) (res *http.Response, v verdict, err error) {
	x.tries = append(x.tries, try{entry: e, key: k, start: rl.Now()})
	rl.metrics.attempt()
	ctx := out.Context()
	actx, cancel := context.WithCancelCause(withoutClientTrace{ctx})
	wait := rl.responseWait()
	if x.stream {
		wait = rl.firstByteWait()
	}
	at := startAttemptTimer(cancel, wait)
	defer func() {
		t := &x.tries[len(x.tries)-1]
		t.dur = rl.Now().Sub(t.start)
		switch {
		case err != nil:
			at.stop()
			t.status, t.err = 499, "client disconnected"
		case v.scope == scopeNone:
			// Committed: the body holds the timer now and stops it when
			// it closes.
		default:
			at.stop()
			rl.blame(x, t, v)
			x.errText = e.ch.Name + ": " + v.reason
		}
	}()

	// The first attempt may use ReverseProxy's outbound request itself; a
	// retry gets its own copy, since a transport may still look at the
	// previous attempt's request after giving up on it.
	var req *http.Request
	if len(x.tries) == 1 {
		req = out.WithContext(actx)
	} else {
		req = out.Clone(actx)
	}
	rl.prepare(req, x, e, k)
	res, err = rl.upstream.RoundTrip(req)
	if err != nil {
		switch {
		case ctx.Err() != nil:
			return nil, verdict{}, errClientGone
		case context.Cause(actx) == errFirstByteTimeout:
			return nil, rl.judge(evidence{status: http.StatusGatewayTimeout, reason: fmt.Sprintf("no response within %s", wait)}), nil
		}
		return nil, rl.judge(evidence{status: http.StatusBadGateway, reason: "request failed: " + shortError(err)}), nil
	}

	switch s := res.StatusCode; {
	case s >= 200 && s < 300:
		return rl.accept(ctx, actx, res, x, at)
	case clientFault(s):
		// The client's own error: it goes back as is (but for our keys and
		// the client's token, should the upstream echo them), nothing
		// cools. It is read whole to be masked, up to maxEchoBody: an
		// upstream that echoes a Claude Code request (often over 64 KiB)
		// with its headers echoes the key too. Beyond that it streams on
		// as it is.
		head, herr := io.ReadAll(io.LimitReader(res.Body, maxEchoBody+1))
		src := res.Body
		if herr == nil && len(head) <= maxEchoBody {
			res.Body.Close()
			head, _ = x.redact(e, head)
			res, src = bufferedResponse(res, head), http.NoBody
		}
		at.flowing(rl.idleWait())
		rl.commit(x, s, false)
		res.Body = &plainBody{src: src, head: head, keepTail: true, wantError: true, limit: rl.maxResponse(),
			onClose: func(end streamEnd) { rl.settle(x, end); at.stop() }}
		return res, verdict{}, nil
	}
	body, rerr := io.ReadAll(io.LimitReader(res.Body, maxErrorBody))
	res.Body.Close()
	if rerr != nil && ctx.Err() != nil {
		return nil, verdict{}, errClientGone
	}
	body, _ = x.redact(e, body)
	ue, isDoc := parseErrorDoc(body)
	ev := evidence{status: res.StatusCode, apiDoc: isDoc, aux: x.aux, header: res.Header}
	if isDoc && ue.message != "" {
		ev.reason = fmt.Sprintf("%d %s", res.StatusCode, truncate(ue.message, 160))
	}
	v = rl.judge(ev)
	if res.StatusCode < 400 {
		return nil, v, nil // a redirect is never relayed (see judge)
	}
	return bufferedResponse(res, body), v, nil
}

// judge is the failure table, at the relay's clock.
func (rl *relay) judge(ev evidence) verdict { return judge(ev, rl.Now()) }

// blame records a failed try: it cools what the verdict blames and notes
// that in the trace. It is the one place failures are counted.
func (rl *relay) blame(x *exchange, t *try, v verdict) {
	t.status, t.err = v.status, v.reason
	if v.scope == scopeNone || v.scope == scopeNext || x.probe {
		return
	}
	v.started = t.start
	rl.cool.fail(t.entry.health, t.key, x.model, v)
	rl.metrics.cooled(v.scope)
	t.cooled = v.scope
}

// accept checks a 2xx response before the client sees it: a stream must
// bring a content event in time, and a body must be neither empty, HTML nor
// an error document. Bad ones are failures like any other.
func (rl *relay) accept(ctx, actx context.Context, res *http.Response, x *exchange, at *attemptTimer) (*http.Response, verdict, error) {
	idle := rl.idleWait()
	// explain names a silence that outlasted the idle timeout; any other
	// read error stays as it is (a client that left stays a cancellation).
	explain := func(err error) error {
		if context.Cause(actx) == errIdleTimeout {
			return fmt.Errorf("no data from upstream for %s", idle)
		}
		return err
	}
	broken := func(status int, reason string) (*http.Response, verdict, error) {
		res.Body.Close()
		if ctx.Err() != nil {
			return nil, verdict{}, errClientGone
		}
		return nil, rl.judge(evidence{status: status, reason: reason}), nil
	}
	ct := mediaType(res.Header.Get("Content-Type"))
	if ct == "text/event-stream" {
		sb := &sseBody{src: res.Body, scan: sseScanner{proto: x.proto}, maxEvent: rl.MaxEvent,
			clientGone: func() bool { return ctx.Err() != nil }}
		if x.responses {
			sb.scan.rs = newResponsesState()
		}
		ue, err := sb.waitFirst()
		if err != nil {
			if context.Cause(actx) == errFirstByteTimeout {
				return broken(http.StatusGatewayTimeout, fmt.Sprintf("no first event within %s", rl.firstByteWait()))
			}
			if errors.Is(err, io.EOF) {
				return broken(http.StatusBadGateway, "stream ended before any content")
			}
			return broken(http.StatusBadGateway, "stream failed before any content: "+shortError(err))
		}
		if ue != nil {
			sb.Close()
			return rl.errorIn200(x, res, ue, sb.scan.earlyData, at)
		}
		at.flowing(idle)
		rl.commit(x, res.StatusCode, true)
		sb.touch, sb.explain = at.touch, explain
		sb.onClose = func(end streamEnd) { rl.settle(x, end); at.stop() }
		res.Body = sb
		return res, verdict{}, nil
	}

	head := getBuf()[:512] // back to the pool when the body closes
	n, err := readSome(res.Body, head)
	head = head[:n]
	if err != nil && !errors.Is(err, io.EOF) {
		putBuf(head)
		if context.Cause(actx) == errFirstByteTimeout {
			return broken(http.StatusGatewayTimeout, fmt.Sprintf("no response body within %s", rl.responseWait()))
		}
		return broken(http.StatusBadGateway, "response body failed: "+shortError(err))
	}
	var rest io.ReadCloser = res.Body
	trimmed := bytes.TrimLeft(head, " \t\r\n")
	switch {
	case n == 0 && res.StatusCode == http.StatusOK:
		putBuf(head)
		return broken(http.StatusBadGateway, "empty response body")
	case ct == "text/html" || bytes.HasPrefix(trimmed, []byte("<")):
		putBuf(head)
		return broken(http.StatusBadGateway, "HTML page instead of an API response")
	case looksLikeErrorDoc(trimmed):
		// Error documents are small: read up to the cap, and if the body
		// is longer it is no error and goes on whole.
		more, rerr := io.ReadAll(io.LimitReader(res.Body, maxErrorBody+1))
		if rerr != nil {
			// Cut off inside what may be an error: neither an answer to
			// relay as a 200 nor a success to clear cooldowns with.
			putBuf(head)
			if context.Cause(actx) == errFirstByteTimeout {
				return broken(http.StatusGatewayTimeout, fmt.Sprintf("no response body within %s", rl.responseWait()))
			}
			return broken(http.StatusBadGateway, "response body failed: "+shortError(rerr))
		}
		doc := append(head, more...)
		if len(more) > maxErrorBody {
			head = doc
			break
		}
		res.Body.Close()
		if ue, ok := parseErrorDoc(doc); ok {
			return rl.errorIn200(x, res, &ue, doc, at)
		}
		// Not an error after all: relay what was read.
		head, rest = doc, http.NoBody
	case errors.Is(err, io.EOF):
		res.Body.Close()
		rest = http.NoBody
	}
	at.flowing(idle)
	rl.commit(x, res.StatusCode, true)
	res.Body = &plainBody{src: rest, head: head, pooled: head, keepTail: true, touch: at.touch, explain: explain, limit: rl.maxResponse(),
		onClose: func(end streamEnd) { rl.settle(x, end); at.stop() }}
	return res, verdict{}, nil
}

// errorIn200 turns a 200 that carried an error into the failure it stands
// for. The client sees nothing of it unless it is the last answer, and then
// as a plain error response with the status the error names.
func (rl *relay) errorIn200(x *exchange, res *http.Response, ue *upstreamError, doc []byte, at *attemptTimer) (*http.Response, verdict, error) {
	e := x.tries[len(x.tries)-1].entry
	doc, _ = x.redact(e, doc)
	ue.message = x.redactText(e, ue.message)
	v := rl.judge(evidence{status: ue.status, apiDoc: true, aux: x.aux, header: res.Header,
		reason: "error in a 200 response: " + truncate(ue.message, 160)})
	synth := bufferedResponse(&http.Response{
		Status:     fmt.Sprintf("%d %s", ue.status, http.StatusText(ue.status)),
		StatusCode: ue.status, Proto: res.Proto, ProtoMajor: res.ProtoMajor, ProtoMinor: res.ProtoMinor,
		Header:  http.Header{"Content-Type": {"application/json"}},
		Request: res.Request,
	}, doc)
	if v.scope == scopeNone {
		// The client's own error, delivered in a 200: give it back properly.
		rl.commit(x, synth.StatusCode, false)
		x.errText = v.reason
		synth.Body = &plainBody{src: synth.Body, onClose: func(end streamEnd) { rl.settle(x, end); at.stop() }}
	}
	return synth, v, nil
}

// commit records that the current attempt's response goes to the client. A
// success clears what it disproves at once, so other requests may use the
// channel again even while this one streams.
func (rl *relay) commit(x *exchange, status int, ok bool) {
	i := len(x.tries) - 1
	t := &x.tries[i]
	t.status = status
	x.served, x.status, x.errText = i, status, ""
	x.firstByte = rl.Now().Sub(x.start)
	// No retry can follow: let the request body go, however long the
	// response runs.
	x.dropBody()
	if ok {
		rl.cool.succeed(t.entry.health, t.key, x.model)
		if x.stream {
			rl.metrics.streamOpened()
		}
	}
}

// settle records how a relayed body ended: usage, and a failure after the
// headers went out, which judge blames like any other.
func (rl *relay) settle(x *exchange, end streamEnd) {
	if x.stream && x.status >= 200 && x.status < 300 {
		rl.metrics.streamClosed()
	}
	x.usage = end.usage
	e := x.tries[x.served].entry
	if end.message != "" && x.errText == "" {
		x.errText = truncate(x.redactText(e, end.message), 200)
	}
	var ev evidence
	switch {
	case errors.Is(end.err, errClientClosed) || errors.Is(end.err, context.Canceled):
		x.status, x.errText = 499, "client disconnected"
		return
	case end.err != nil:
		ev = evidence{status: http.StatusBadGateway, reason: "upstream failed mid-response: " + shortError(end.err)}
	case end.incomplete:
		ev = evidence{status: http.StatusBadGateway, reason: "upstream closed the stream before it finished"}
	case end.lateErr != nil:
		ev = evidence{status: end.lateErr.status, apiDoc: true, aux: x.aux,
			reason: "error event mid-stream: " + truncate(x.redactText(e, end.lateErr.message), 160)}
	default:
		return
	}
	x.status, x.errText = ev.status, ev.reason
	rl.blame(x, &x.tries[x.served], rl.judge(ev))
}

// bufferedResponse gives res a body that was already read in full.
func bufferedResponse(res *http.Response, body []byte) *http.Response {
	res.Body = io.NopCloser(bytes.NewReader(body))
	res.ContentLength = int64(len(body))
	res.TransferEncoding = nil
	res.Uncompressed = false
	res.Header.Set("Content-Length", strconv.Itoa(len(body)))
	res.Header.Del("Content-Encoding")
	return res
}

// looksLikeErrorDoc reports whether a JSON body opens the way the
// protocols' error documents do: with an "error" member, or "type": "error".
// Whitespace is allowed anywhere (Python's json.dumps adds it).
func looksLikeErrorDoc(b []byte) bool {
	if len(b) == 0 || b[0] != '{' {
		return false
	}
	rest := b[skipSpace(b, 1):]
	if bytes.HasPrefix(rest, []byte(`"error"`)) {
		return true
	}
	if !bytes.HasPrefix(rest, []byte(`"type"`)) {
		return false
	}
	rest = rest[skipSpace(rest, len(`"type"`)):]
	if len(rest) == 0 || rest[0] != ':' {
		return false
	}
	rest = rest[skipSpace(rest, 1):]
	return bytes.HasPrefix(rest, []byte(`"error"`))
}

// mediaType is the lower-cased type of a Content-Type value, without
// parameters: all the relay needs, without mime.ParseMediaType's map.
func mediaType(v string) string {
	if i := strings.IndexByte(v, ';'); i >= 0 {
		v = v[:i]
	}
	v = strings.TrimSpace(v)
	for i := 0; i < len(v); i++ {
		if c := v[i]; c >= 'A' && c <= 'Z' {
			return strings.ToLower(v)
		}
	}
	return v
}

func readSome(r io.Reader, p []byte) (int, error) {
	for {
		n, err := r.Read(p)
		if n > 0 || err != nil {
			return n, err
		}
	}
}

// finish writes the log row and the metrics of one request.
func (rl *relay) finish(x *exchange) {
	defer rl.inflight.Done()
	defer x.releaseToken()
	x.dropBody()
	if x.logged {
		return
	}
	x.logged = true
	if x.status == 0 {
		// The handler was aborted before any outcome was set.
		x.status, x.errText = 499, "client disconnected"
	}
	dur := rl.Now().Sub(x.start)
	e := logEntry{
		Time:         x.start,
		Token:        x.token,
		Protocol:     x.proto.String(),
		Model:        x.model,
		KeyIndex:     -1,
		Attempts:     len(x.tries),
		Status:       x.status,
		DurationMS:   dur.Milliseconds(),
		FirstByteMS:  x.firstByte.Milliseconds(),
		Stream:       x.stream,
		InputTokens:  x.usage.Input,
		OutputTokens: x.usage.Output,
		CacheRead:    x.usage.CacheRead,
		CacheWrite:   x.usage.CacheWrite,
		ClientIP:     x.clientIP,
		Error:        truncate(x.errText, 300),
	}
	// The row names the channel that answered, or else the last one tried.
	if t := x.logTry(); t != nil {
		e.ChannelID, e.ChannelName, e.KeyIndex = t.entry.ch.ID, t.entry.ch.Name, t.key
		e.UpstreamModel = t.entry.upstreamModel(x.model)
	}
	e.trace = encodeTrace(x.tries, x.status, x.start, dur)
	rl.aff.settle(x, &e, rl.metrics, rl.Now())
	rl.metrics.request(&e, dur)
	rl.settleToken(x, &e) // price it, charge its token
	rl.logs.add(e)
}

// logTry is the try the log row is about: the one whose answer the client
// got, else the last; nil when none was made.
func (x *exchange) logTry() *try {
	switch {
	case x.served >= 0:
		return &x.tries[x.served]
	case len(x.tries) > 0:
		return &x.tries[len(x.tries)-1]
	}
	return nil
}

func shortError(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	return truncate(err.Error(), 200)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	// Cut on a rune boundary.
	for n > 0 && n < len(s) && s[n]&0xC0 == 0x80 {
		n--
	}
	return s[:n] + "…"
}

func formatBytes(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%dGiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return fmt.Sprintf("%d bytes", n)
}
