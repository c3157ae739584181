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
	"strconv"
	"strings"
	"sync"
	"time"
)

// relay is the proxy: it picks channels for each client request and tries
// them in order until one answers. It is built on httputil.ReverseProxy,
// whose Transport is the retry loop (see relay.RoundTrip) and whose
// ErrorHandler speaks the protocol's error shape when every channel failed.
type relay struct {
	sel      *selector
	cool     *cooldowns
	logs     *logWriter
	metrics  *metrics
	auth     *clientAuth
	upstream http.RoundTripper // the real transport to the channels

	// FirstByteTimeout bounds, for a stream, the wait from sending the
	// request to the first content event.
	FirstByteTimeout time.Duration
	// ResponseTimeout bounds, for a non-stream request, the wait for the
	// response to begin: the whole answer is generated before it does.
	ResponseTimeout time.Duration
	// IdleTimeout bounds the silence between reads once a response flows;
	// 0 means none. A stream that outlasts it ends with an error event and
	// cools its channel.
	IdleTimeout time.Duration
	MaxBody     int64
	Now         func() time.Time

	proxy    *httputil.ReverseProxy
	inflight sync.WaitGroup // proxied requests not yet logged
}

const (
	defaultResponseTimeout = 10 * time.Minute
	maxErrorBody           = 64 << 10 // error bodies kept to classify and to replay
)

var (
	errClientGone       = errors.New("client went away")
	errFirstByteTimeout = errors.New("first byte timeout")
	errIdleTimeout      = errors.New("upstream idle timeout")
)

// attemptTimer bounds one attempt: first the wait for the response to
// begin, then, once it flows, each silence between reads. Either ends the
// attempt by cancelling its context with the cause.
type attemptTimer struct {
	t      *time.Timer
	cancel context.CancelCauseFunc
	idle   time.Duration // 0 until flowing; then the silence allowed
}

func startAttemptTimer(cancel context.CancelCauseFunc, wait time.Duration) *attemptTimer {
	at := &attemptTimer{cancel: cancel}
	at.t = time.AfterFunc(wait, func() { cancel(errFirstByteTimeout) })
	return at
}

// flowing switches from the first-byte wait to the idle timeout (0: none).
func (at *attemptTimer) flowing(idle time.Duration) {
	at.t.Stop()
	if idle > 0 {
		at.idle = idle
		at.t = time.AfterFunc(idle, func() { at.cancel(errIdleTimeout) })
	}
}

// touch restarts the idle timeout: data just arrived.
func (at *attemptTimer) touch() {
	if at.idle > 0 {
		at.t.Reset(at.idle)
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
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          0, // no global limit; per host below
		MaxIdleConnsPerHost:   512,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}

func newRelay(sel *selector, cool *cooldowns, logs *logWriter, m *metrics, auth *clientAuth, upstream http.RoundTripper) *relay {
	rl := &relay{
		sel: sel, cool: cool, logs: logs, metrics: m, auth: auth, upstream: upstream,
		FirstByteTimeout: 60 * time.Second,
		ResponseTimeout:  defaultResponseTimeout,
		IdleTimeout:      5 * time.Minute,
		MaxBody:          32 << 20,
		Now:              time.Now,
	}
	rl.proxy = &httputil.ReverseProxy{
		Rewrite:      rl.rewrite,
		Transport:    rl,
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
type exchange struct {
	start     time.Time
	proto     protocol
	responses bool // the OpenAI Responses API (Codex)
	token     string
	clientIP  string
	model     string
	info      bodyInfo
	buf       *bodyBuf // holds body; released once a response is committed
	body      []byte   // the request body, dropped once a response is committed
	sent      []byte   // the body as sent to the current attempt (model redirected)
	stream    bool
	gemAction string // gemini: the action after the model in the path
	auxiliary bool   // count_tokens: not every channel has it

	plan    plan
	planBuf [8]*channelEntry
	keyBuf  [8]int

	// Outcome.
	attempts      int
	entry         *channelEntry // channel of the last attempt
	keyIndex      int
	upstreamModel string
	status        int
	firstByte     time.Duration
	usage         usage
	errText       string
	lastFrom      attemptFrom // who gave the buffered last error response
	attemptStart  time.Time   // when the committed attempt began
	logged        bool
}

// attemptFrom is what the log says of an attempt.
type attemptFrom struct {
	entry         *channelEntry
	key           int
	upstreamModel string
	errText       string
}

type exchangeKey struct{}

func exchangeFrom(ctx context.Context) *exchange {
	x, _ := ctx.Value(exchangeKey{}).(*exchange)
	return x
}

// handle returns the handler for one protocol's proxied paths.
func (rl *relay) handle(p protocol) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rl.serve(p, w, r)
	})
}

func (rl *relay) serve(p protocol, w http.ResponseWriter, r *http.Request) {
	x := &exchange{start: rl.Now(), proto: p, keyIndex: -1, clientIP: clientIP(r)}
	rl.inflight.Add(1)
	// Deferred so that the row is written even when ReverseProxy aborts the
	// handler with http.ErrAbortHandler (the client went away mid-stream).
	defer rl.finish(x)

	name, ok := rl.auth.identify(r, p)
	if !ok {
		rl.reject(w, x, http.StatusUnauthorized, rl.auth.denyMessage(r))
		return
	}
	x.token = name
	x.responses = strings.HasPrefix(r.URL.Path, "/v1/responses")
	x.auxiliary = strings.HasSuffix(r.URL.Path, "/count_tokens") || strings.HasSuffix(r.URL.Path, ":countTokens")

	bb, err := readBody(w, r, rl.MaxBody)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			rl.reject(w, x, http.StatusRequestEntityTooLarge,
				fmt.Sprintf("request body is larger than the %s limit (CCLOAD_MAX_BODY)", formatBytes(tooBig.Limit)))
			return
		}
		if r.Context().Err() != nil || errors.Is(err, io.ErrUnexpectedEOF) {
			// The connection ended inside the body: nobody is left to answer.
			x.status, x.errText = 499, "client disconnected while sending the body"
			return
		}
		rl.reject(w, x, http.StatusBadRequest, "could not read the request body: "+err.Error())
		return
	}
	x.buf, x.body = bb, bb.b
	body := x.body

	if p == protoGemini {
		model, action, ok := geminiTarget(r.PathValue("target"))
		if !ok {
			rl.reject(w, x, http.StatusBadRequest, "path must be /v1beta/models/{model}:{action}")
			return
		}
		x.model, x.gemAction = model, action
		x.stream = strings.HasPrefix(action, "stream")
	}
	if len(body) == 0 && p != protoGemini {
		rl.reject(w, x, http.StatusBadRequest, "request body is empty: send a JSON object with a \"model\"")
		return
	}
	if len(body) > 0 {
		info, err := inspectBody(body)
		if err != nil {
			var se *syntaxError
			if errors.As(err, &se) {
				rl.reject(w, x, http.StatusBadRequest, "request body is not valid JSON: "+se.Error())
				return
			}
			rl.reject(w, x, http.StatusBadRequest, err.Error())
			return
		}
		x.info = info
		if p != protoGemini {
			x.model, x.stream = info.model, info.stream
		}
	}
	if x.model == "" {
		rl.reject(w, x, http.StatusBadRequest, `request body has no "model": say which model to use`)
		return
	}

	snap := rl.sel.current()
	rt := snap.route(p, x.model)
	if rt == nil {
		rl.reject(w, x, http.StatusNotFound, fmt.Sprintf("no enabled %s channel serves model %q", p, x.model))
		return
	}
	x.plan = rt.makePlan(x.model, rl.Now().UnixNano(), x.planBuf[:0])
	rl.proxy.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), exchangeKey{}, x)))
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
	if q := pr.Out.URL.RawQuery; q != "" && strings.Contains(q, "key=") {
		v := pr.Out.URL.Query()
		v.Del("key")
		pr.Out.URL.RawQuery = v.Encode()
	}
}

// prepare points req at channel e with key k and gives it a fresh body.
func (rl *relay) prepare(req *http.Request, x *exchange, e *channelEntry, k int) {
	x.upstreamModel = e.upstreamModel(x.model)
	body := x.body
	path := req.URL.Path
	if x.upstreamModel != x.model {
		if x.proto == protoGemini {
			path = "/v1beta/models/" + x.upstreamModel + ":" + x.gemAction
		} else {
			body = withModel(body, x.info, x.upstreamModel)
		}
	}
	u := req.URL
	u.Scheme, u.Host = e.base.Scheme, e.base.Host
	u.Path, u.RawPath = e.base.Path+path, ""
	req.Host = ""
	x.sent = body
	if len(body) > 0 {
		req.Body, req.GetBody = x.newBodyReader(), x.reopenBody
	} else {
		req.Body, req.GetBody = nil, nil
	}
	req.ContentLength = int64(len(body))

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
	var last *http.Response // the last upstream error response, buffered
	defer func() {
		if last != nil {
			last.Body.Close()
		}
	}()
	order := x.plan.order
	tried := 0
	for i := 0; ; i++ {
		var e *channelEntry
		switch {
		case i < len(order):
			e = order[i]
		case i == len(order) && x.plan.lastResort != nil:
			e = x.plan.lastResort
		default:
			if last != nil {
				res := last
				last = nil
				// The log names whoever gave this answer, not the last tried.
				f := x.lastFrom
				x.entry, x.keyIndex, x.upstreamModel, x.errText = f.entry, f.key, f.upstreamModel, f.errText
				x.status = res.StatusCode
				return res, nil
			}
			return nil, &exhaustedError{x: x, tried: tried, free: rl.firstFree(x)}
		}
		tried++
		res, err := rl.tryChannel(out, x, e, &last)
		if err != nil || res != nil {
			return res, err
		}
	}
}

// tryChannel tries e's keys in order. It returns a response for the client,
// or nil to go on to the next channel.
func (rl *relay) tryChannel(out *http.Request, x *exchange, e *channelEntry, last **http.Response) (*http.Response, error) {
	keys := e.keyOrder(rl.Now().UnixNano(), x.keyBuf[:0])
	for _, k := range keys {
		started := rl.Now()
		res, v, err := rl.attempt(out, x, e, k)
		if err != nil {
			return nil, err
		}
		if v.scope == scopeNone {
			x.attemptStart = started
			return res, nil
		}
		v.started = started
		if v.scope != scopeNext {
			rl.cool.fail(e.health, k, x.model, v)
			rl.metrics.cooled(v.scope)
		}
		x.errText = fmt.Sprintf("%s: %s", e.ch.Name, v.reason)
		if res != nil {
			if *last != nil {
				(*last).Body.Close()
			}
			*last = res
			x.lastFrom = attemptFrom{entry: e, key: k, upstreamModel: x.upstreamModel, errText: x.errText}
		}
		if v.scope != scopeKey {
			return nil, nil
		}
	}
	return nil, nil
}

// attempt sends the request to e with key k once. It returns the response
// to hand back (success, or a failure whose body was buffered for a possible
// last answer), the verdict, or errClientGone.
func (rl *relay) attempt(out *http.Request, x *exchange, e *channelEntry, k int) (*http.Response, verdict, error) {
	x.attempts++
	x.entry, x.keyIndex = e, k
	rl.metrics.attempt()
	ctx := out.Context()
	actx, cancel := context.WithCancelCause(ctx)
	wait := rl.ResponseTimeout
	if x.stream {
		wait = rl.FirstByteTimeout
	}
	at := startAttemptTimer(cancel, wait)
	stop := at.stop

	// The first attempt may use ReverseProxy's outbound request itself; a
	// retry gets its own copy, since a transport may still look at the
	// previous attempt's request after giving up on it.
	var req *http.Request
	if x.attempts == 1 {
		req = out.WithContext(actx)
	} else {
		req = out.Clone(actx)
	}
	rl.prepare(req, x, e, k)
	res, err := rl.upstream.RoundTrip(req)
	if err != nil {
		stop()
		if ctx.Err() != nil {
			return nil, verdict{}, errClientGone
		}
		if context.Cause(actx) == errFirstByteTimeout {
			return nil, verdict{scope: scopeChannel, class: transient, status: http.StatusGatewayTimeout,
				reason: fmt.Sprintf("no response within %s", wait)}, nil
		}
		return nil, verdict{scope: scopeChannel, class: transient, status: http.StatusBadGateway,
			reason: "request failed: " + shortError(err)}, nil
	}

	if res.StatusCode >= 200 && res.StatusCode < 300 {
		return rl.accept(ctx, actx, res, x, e, k, at)
	}

	if res.StatusCode < 200 || res.StatusCode >= 300 && res.StatusCode < 400 {
		// A redirect means a wrong channel URL (http for https, a moved
		// relay). It is never passed on: a client following it would send
		// its own token to wherever it points.
		io.Copy(io.Discard, io.LimitReader(res.Body, maxErrorBody))
		res.Body.Close()
		stop()
		return nil, verdict{scope: scopeChannel, class: transient, status: res.StatusCode,
			reason: fmt.Sprintf("%d %s (check the channel URL)", res.StatusCode, http.StatusText(res.StatusCode))}, nil
	}
	v := classifyStatus(res.StatusCode)
	if v.scope == scopeNone {
		// The client's own error: it goes back as is, nothing cools.
		at.flowing(rl.IdleTimeout)
		rl.commit(x, e, k, res.StatusCode, false)
		res.Body = &plainBody{src: res.Body, keepTail: true, wantError: true,
			onClose: func(end streamEnd) { rl.settle(x, e, k, end); stop() }}
		return res, v, nil
	}
	body, rerr := io.ReadAll(io.LimitReader(res.Body, maxErrorBody))
	res.Body.Close()
	stop()
	if rerr != nil && ctx.Err() != nil {
		return nil, verdict{}, errClientGone
	}
	ue, isDoc := parseErrorDoc(body)
	if res.StatusCode == http.StatusNotFound && x.auxiliary {
		// A relay without count_tokens says nothing about the model or
		// the channel's real work: try the next one, cool nothing.
		v = verdict{scope: scopeNext, reason: "endpoint not supported by this channel"}
	} else if res.StatusCode == http.StatusNotFound {
		if isDoc {
			v = verdict{scope: scopeModel, class: persistent, reason: "model not found"}
		} else {
			v = verdict{scope: scopeChannel, class: transient, reason: "404 without an API error body (wrong URL or broken relay?)"}
		}
	}
	v.status = res.StatusCode
	v.wait = retryAfter(res.Header, res.StatusCode, rl.Now())
	if isDoc && ue.message != "" {
		v.reason = fmt.Sprintf("%d %s", res.StatusCode, truncate(ue.message, 160))
	} else if v.reason == "" {
		v.reason = fmt.Sprintf("%d %s", res.StatusCode, http.StatusText(res.StatusCode))
	}
	return bufferedResponse(res, body), v, nil
}

// accept checks a 2xx response before the client sees it: a stream must
// bring a content event in time, and a body must be neither empty, HTML nor
// an error document. Bad ones are failures like any other.
func (rl *relay) accept(ctx, actx context.Context, res *http.Response, x *exchange, e *channelEntry, k int,
	at *attemptTimer) (*http.Response, verdict, error) {
	stop := at.stop
	// explain names a silence that outlasted the idle timeout; any other
	// read error stays as it is (a client that left stays a cancellation).
	explain := func(err error) error {
		if context.Cause(actx) == errIdleTimeout {
			return fmt.Errorf("no data from upstream for %s", rl.IdleTimeout)
		}
		return err
	}
	broken := func(status int, reason string) (*http.Response, verdict, error) {
		res.Body.Close()
		stop()
		if ctx.Err() != nil {
			return nil, verdict{}, errClientGone
		}
		return nil, verdict{scope: scopeChannel, class: transient, status: status, reason: reason}, nil
	}
	ct := mediaType(res.Header.Get("Content-Type"))
	if ct == "text/event-stream" {
		sb := &sseBody{src: res.Body, scan: sseScanner{proto: x.proto}, responses: x.responses,
			clientGone: func() bool { return ctx.Err() != nil }}
		ue, err := sb.waitFirst()
		if err != nil {
			if context.Cause(actx) == errFirstByteTimeout {
				return broken(http.StatusGatewayTimeout, fmt.Sprintf("no first event within %s", rl.FirstByteTimeout))
			}
			if errors.Is(err, io.EOF) {
				return broken(http.StatusBadGateway, "stream ended before any content")
			}
			return broken(http.StatusBadGateway, "stream failed before any content: "+shortError(err))
		}
		if ue != nil {
			sb.Close()
			stop()
			return rl.badOK(x, e, k, res, ue, sb.scan.earlyData)
		}
		at.flowing(rl.IdleTimeout)
		rl.commit(x, e, k, res.StatusCode, true)
		sb.touch, sb.explain = at.touch, explain
		sb.onClose = func(end streamEnd) { rl.settle(x, e, k, end); stop() }
		res.Body = sb
		return res, verdict{}, nil
	}

	head := getBuf()[:512] // back to the pool when the body closes
	n, err := readSome(res.Body, head)
	head = head[:n]
	if err != nil && !errors.Is(err, io.EOF) {
		if context.Cause(actx) == errFirstByteTimeout {
			return broken(http.StatusGatewayTimeout, fmt.Sprintf("no response body within %s", rl.ResponseTimeout))
		}
		return broken(http.StatusBadGateway, "response body failed: "+shortError(err))
	}
	var rest io.ReadCloser = res.Body
	trimmed := bytes.TrimLeft(head, " \t\r\n")
	switch {
	case n == 0 && res.StatusCode == http.StatusOK:
		return broken(http.StatusBadGateway, "empty response body")
	case ct == "text/html" || bytes.HasPrefix(trimmed, []byte("<")):
		return broken(http.StatusBadGateway, "HTML page instead of an API response")
	case looksLikeErrorDoc(trimmed):
		// Error documents are small: read up to the cap, and if the body
		// is longer it is no error and goes on whole.
		more, _ := io.ReadAll(io.LimitReader(res.Body, maxErrorBody+1))
		doc := append(head, more...)
		if len(more) > maxErrorBody {
			head = doc
			break
		}
		res.Body.Close()
		if ue, ok := parseErrorDoc(doc); ok {
			stop()
			return rl.badOK(x, e, k, res, &ue, doc)
		}
		// Not an error after all: relay what was read.
		head, rest = doc, http.NoBody
	case errors.Is(err, io.EOF):
		res.Body.Close()
		rest = http.NoBody
	}
	at.flowing(rl.IdleTimeout)
	rl.commit(x, e, k, res.StatusCode, true)
	res.Body = &plainBody{src: rest, head: head, pooled: head, keepTail: true, touch: at.touch, explain: explain,
		onClose: func(end streamEnd) { rl.settle(x, e, k, end); stop() }}
	return res, verdict{}, nil
}

// badOK turns a 200 that carried an error into the failure it stands for.
// The client sees nothing of it unless it is the last answer, and then as a
// plain error response with the status the error names.
func (rl *relay) badOK(x *exchange, e *channelEntry, k int, res *http.Response, ue *upstreamError, doc []byte) (*http.Response, verdict, error) {
	v := classifyStatus(ue.status)
	v.status = ue.status
	v.reason = "error in a 200 response: " + truncate(ue.message, 160)
	if ue.status == http.StatusNotFound {
		v.scope, v.class = scopeModel, persistent
	}
	synth := bufferedResponse(&http.Response{
		Status:     fmt.Sprintf("%d %s", ue.status, http.StatusText(ue.status)),
		StatusCode: ue.status, Proto: res.Proto, ProtoMajor: res.ProtoMajor, ProtoMinor: res.ProtoMinor,
		Header:  http.Header{"Content-Type": {"application/json"}},
		Request: res.Request,
	}, doc)
	if v.scope == scopeNone {
		// The client's own error, delivered in a 200: give it back properly.
		rl.commit(x, e, k, synth.StatusCode, false)
		x.errText = v.reason
		synth.Body = &plainBody{src: synth.Body, onClose: func(end streamEnd) { rl.settle(x, e, k, end) }}
	}
	return synth, v, nil
}

// commit records that this attempt's response goes to the client. A
// success clears what it disproves at once, so other requests may use the
// channel again even while this one streams.
func (rl *relay) commit(x *exchange, e *channelEntry, k int, status int, ok bool) {
	x.status = status
	x.firstByte = rl.Now().Sub(x.start)
	x.entry, x.keyIndex = e, k
	x.errText = ""
	// No retry can follow: let the request body go, however long the
	// response runs.
	x.dropBody()
	if ok {
		rl.cool.succeed(e.health, k, x.model)
		if x.stream {
			rl.metrics.streamOpened()
		}
	}
}

// settle records how a relayed body ended: usage, and a failure after the
// headers went out, which cools the channel like any other.
func (rl *relay) settle(x *exchange, e *channelEntry, k int, end streamEnd) {
	ok := x.status >= 200 && x.status < 300
	if x.stream && ok {
		rl.metrics.streamClosed()
	}
	x.usage = end.usage
	if end.message != "" && x.errText == "" {
		x.errText = truncate(end.message, 200)
	}
	switch {
	case errors.Is(end.err, errClientClosed) || errors.Is(end.err, context.Canceled):
		x.status, x.errText = 499, "client disconnected"
	case end.err != nil:
		x.status, x.errText = http.StatusBadGateway, "upstream failed mid-response: "+shortError(end.err)
		rl.cool.fail(e.health, k, x.model, verdict{scope: scopeChannel, class: transient, status: x.status, reason: "cut mid-stream", started: x.attemptStart})
	case end.incomplete:
		x.status, x.errText = http.StatusBadGateway, "upstream closed the stream before it finished"
		rl.cool.fail(e.health, k, x.model, verdict{scope: scopeChannel, class: transient, status: x.status, reason: "stream ended early", started: x.attemptStart})
	case end.lateErr != nil:
		v := classifyStatus(end.lateErr.status)
		if v.scope == scopeNone {
			v = verdict{scope: scopeChannel, class: transient}
		}
		v.status, v.reason = end.lateErr.status, "error event mid-stream: "+truncate(end.lateErr.message, 160)
		v.started = x.attemptStart
		x.status, x.errText = end.lateErr.status, v.reason
		rl.cool.fail(e.health, k, x.model, v)
	}
}

// classifyStatus maps an upstream status to what it blames (the failure
// table of SPEC §3). 404 is refined by its body in attempt.
func classifyStatus(status int) verdict {
	switch {
	case status == 401 || status == 402 || status == 403:
		return verdict{scope: scopeKey, class: persistent}
	case status == 429:
		return verdict{scope: scopeKey, class: transient}
	case status == 404:
		return verdict{scope: scopeChannel, class: transient}
	case status == 408 || status >= 500:
		return verdict{scope: scopeChannel, class: transient}
	}
	return verdict{scope: scopeNone}
}

// retryAfter reads the upstream's own reset time: Retry-After (seconds or a
// date) and retry-after-ms on any status; on a 429 also OpenAI's
// x-ratelimit-reset-* durations and Anthropic's anthropic-ratelimit-*-reset
// times, which APIs send on every response and which say when a limit
// resets, not when a failing key or channel recovers. 0 when none applies.
func retryAfter(h http.Header, status int, now time.Time) time.Duration {
	if v := h.Get("Retry-After-Ms"); v != "" {
		if ms, err := strconv.ParseFloat(v, 64); err == nil && ms > 0 {
			return time.Duration(ms * float64(time.Millisecond))
		}
	}
	if v := h.Get("Retry-After"); v != "" {
		if s, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && s > 0 {
			return time.Duration(s) * time.Second
		}
		if t, err := http.ParseTime(v); err == nil && t.After(now) {
			return t.Sub(now)
		}
	}
	var d time.Duration
	if status != http.StatusTooManyRequests {
		return 0
	}
	for name, vs := range h {
		lower := strings.ToLower(name)
		switch {
		case strings.HasPrefix(lower, "x-ratelimit-reset"):
			if v, err := time.ParseDuration(vs[0]); err == nil {
				d = max(d, v)
			}
		case strings.HasPrefix(lower, "anthropic-ratelimit-") && strings.HasSuffix(lower, "-reset"):
			if t, err := time.Parse(time.RFC3339, vs[0]); err == nil && t.After(now) {
				d = max(d, t.Sub(now))
			}
		}
	}
	return d
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

// exhaustedError is the answer when no channel gave one.
type exhaustedError struct {
	x     *exchange
	tried int
	free  int64 // UnixNano when the first channel frees; 0 if none is cooling
}

func (e *exhaustedError) Error() string {
	msg := fmt.Sprintf("no channel could serve model %q: tried %d of %d", e.x.model, e.tried, e.x.plan.total)
	if e.x.errText != "" {
		msg += "; last error: " + e.x.errText
	}
	if e.free > 0 {
		msg += "; first channel frees at " + time.Unix(0, e.free).UTC().Format(time.RFC3339)
	}
	return msg
}

func (rl *relay) firstFree(x *exchange) int64 {
	snap := rl.sel.current()
	rt := snap.route(x.proto, x.model)
	if rt == nil {
		return 0
	}
	now := rl.Now().UnixNano()
	var soonest int64
	for _, t := range rt.tiers {
		for _, e := range t.entries {
			if u := e.health.blockedUntil(x.model, now); u > 0 && (soonest == 0 || u < soonest) {
				soonest = u
			}
		}
	}
	return soonest
}

// proxyError answers when RoundTrip returned no response.
func (rl *relay) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	x := exchangeFrom(r.Context())
	if x == nil {
		http.Error(w, "proxy error", http.StatusBadGateway)
		return
	}
	if errors.Is(err, errClientGone) || r.Context().Err() != nil {
		x.status, x.errText = 499, "client disconnected"
		return
	}
	var ex *exhaustedError
	if errors.As(err, &ex) {
		x.status = http.StatusServiceUnavailable
		if ex.free > 0 {
			secs := int64(time.Until(time.Unix(0, ex.free)).Seconds()) + 1
			w.Header().Set("Retry-After", strconv.FormatInt(max(secs, 1), 10))
		}
		msg := ex.Error()
		x.errText = msg
		writeError(w, x.proto, http.StatusServiceUnavailable, msg)
		return
	}
	x.status, x.errText = http.StatusBadGateway, err.Error()
	writeError(w, x.proto, http.StatusBadGateway, err.Error())
}

// finish writes the log row and the metrics of one request.
func (rl *relay) finish(x *exchange) {
	defer rl.inflight.Done()
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
		Time:          x.start,
		Token:         x.token,
		Protocol:      x.proto.String(),
		Model:         x.model,
		UpstreamModel: x.upstreamModel,
		KeyIndex:      x.keyIndex,
		Attempts:      x.attempts,
		Status:        x.status,
		DurationMS:    dur.Milliseconds(),
		FirstByteMS:   x.firstByte.Milliseconds(),
		Stream:        x.stream,
		InputTokens:   x.usage.Input,
		OutputTokens:  x.usage.Output,
		CacheRead:     x.usage.CacheRead,
		CacheWrite:    x.usage.CacheWrite,
		ClientIP:      x.clientIP,
		Error:         truncate(x.errText, 300),
	}
	if x.entry != nil {
		e.ChannelID, e.ChannelName = x.entry.ch.ID, x.entry.ch.Name
	}
	rl.metrics.request(&e, dur)
	rl.logs.add(e)
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
