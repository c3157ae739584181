package main

import (
	"bytes"
	"cmp"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"
)

// fakeUpstream is a faithful stand-in for the Anthropic, OpenAI (chat and
// Responses) and Gemini APIs: real SSE framing, usage fields, error bodies
// in each protocol's shape, and the ways real upstreams fail. It is the only
// fake in the tests; everything else is real.
type fakeUpstream struct {
	*httptest.Server
	name string

	mu       sync.Mutex // guards behave and reqs
	behave   func(n int, r *http.Request) fakeBehavior
	reqs     []fakeRequest
	hits     atomic.Int64
	inFlight atomic.Int64
	// release unblocks stalled handlers when closed (see fakeBehavior.Stall*).
	release chan struct{}
	// ended receives once per request when its handler returns, so tests
	// can wait for an upstream request to end without polling.
	ended chan struct{}
	// stalled receives once per StallFirst stream when its ping has gone
	// out: the stream is open and waiting for its first token.
	stalled chan struct{}
	// noRecord turns off keeping requests, for load runs.
	noRecord atomic.Bool
	// conns counts connections accepted, to check connection reuse.
	conns atomic.Int64
	// cuts counts streams this upstream broke off after content began.
	cuts atomic.Int64

	// prompts is the simulated prompt cache (fakeBehavior.PromptCache):
	// by key, the hash of every prefix seen, with when it was last used.
	// clock is the fake's time for its 5 minute expiry. Both under mu.
	prompts map[string]map[[32]byte]time.Time
	clock   func() time.Time
}

// fakeRequest is what the upstream received.
type fakeRequest struct {
	Method, Path, Query string
	Header              http.Header
	Body                []byte
	Key                 string // the credential it was sent
}

// fakeBehavior says how to answer one request. The zero value is a prompt,
// correct answer in the request's protocol.
type fakeBehavior struct {
	Status     int    // answer this error status with a protocol error body
	ErrType    string // error type for Status or FirstEventError
	RetryAfter string // Retry-After header on an error
	RequireKey string // answer 401 unless this key is presented

	HTML404        bool   // 404 with an HTML page (a wrong URL)
	Redirect       string // answer 308 to this Location
	Reset          bool   // reset the connection before any response
	StallHeaders   bool   // never answer (until the client gives up or release)
	StallFirst     bool   // stream: headers and a ping, then nothing
	FirstEventErr  bool   // stream: 200, then an error event first
	CutAfter       int    // stream: drop the connection after this many deltas
	CutClean       bool   // with CutAfter: end the body cleanly (no terminal event) instead
	MidStreamError bool   // with CutAfter: send an error event there instead of cutting
	CutAfterError  bool   // with MidStreamError: then drop the connection, not end the body
	EmptyBody      bool   // 200 with an empty body
	HTMLBody       bool   // 200 with an HTML page
	ErrorIn200     bool   // non-stream: 200 whose JSON body is an error (ErrType, default overloaded_error)

	Deltas     int           // content deltas in a stream (default 3)
	EarlyHints http.Header   // sent first as a 103 answer, before the real one
	DeltaDelay time.Duration // slow mode: wait this long before each delta after the first
	Text       string        // text of each delta (default "Hello")
	// BlockDeltas, when set, is received from before each delta after the
	// first: tests pace a stream without sleeping.
	BlockDeltas chan struct{}
	// Headers are added to every answer, as real upstreams and the load
	// balancers in front of them add theirs.
	Headers http.Header

	// ToolName, for Anthropic, answers a tool_use block calling this tool
	// with ToolInput (a JSON object, streamed in Deltas pieces) instead of
	// text, and stop_reason "tool_use": a real client then runs the tool
	// and sends its result in the next request.
	ToolName  string
	ToolInput string

	// HoldEnd, for a stream, keeps the connection open after the last
	// event (until the client gives up or release): an upstream whose end
	// of body lags behind its terminal event.
	HoldEnd bool

	// Spaced writes JSON the way Python's json.dumps does by default, with
	// ", " and ": " as separators: what upstreams on Python frameworks send.
	// It and Bare style the answer; injected error events stay compact.
	Spaced bool
	// Bare frames a stream the minimal way some relays do: no event: lines
	// (the type is only in the data) and no data: [DONE] after a chat
	// stream's finish chunk.
	Bare bool

	// PromptCache simulates the upstream's prompt cache, per key, for
	// Anthropic messages and OpenAI Responses: the longest prefix of
	// (system, tools, messages…) this key saw within the last 5 minutes
	// of the fake's clock is reported as cache read, the rest as cache
	// write (Anthropic; OpenAI has no write and counts it as input).
	// Tokens are bytes / 4. Other usage stays as the constants below.
	PromptCache bool

	cacheUsage *fakeUsage // set by serve in PromptCache mode

	// Hostile upstreams (hostile_test.go).
	//
	// EndlessEvent, for a stream, starts after EndlessAfter deltas a data:
	// line that never gets its newline, and writes to it until the client
	// goes away; with Trickle, one byte per Trickle instead of as fast as
	// it can.
	EndlessEvent bool
	EndlessAfter int
	Trickle      time.Duration
	// HugeHeader adds a response header this many bytes long.
	HugeHeader int
	// GzipBomb answers (with Status, or 200) a gzip body that inflates to
	// this many bytes: a JSON document padded with spaces, which compress
	// about a thousand to one.
	GzipBomb int64
	// BigBody answers a non-stream 200 whose JSON is padded to this many
	// bytes, written as fast as the client reads.
	BigBody int64
	// EchoHeaders answers Status (default 401) with a JSON error whose
	// message quotes every request header, the key among them, as some
	// debugging proxies do.
	EchoHeaders bool
	EchoPad     int // with EchoHeaders: pad the message to make the body this much longer
}

// fakeUsage is the usage one answer reports.
type fakeUsage struct{ in, out, read, write int }

func (b fakeBehavior) usage() fakeUsage {
	if b.cacheUsage != nil {
		return *b.cacheUsage
	}
	return fakeUsage{fakeInputTokens, fakeOutputTokens, fakeCacheRead, fakeCacheWrite}
}

// Usage the fake reports, fixed so tests can assert what the log holds.
const (
	fakeInputTokens  = 12
	fakeOutputTokens = 34
	fakeCacheRead    = 5
	fakeCacheWrite   = 7
)

func newFakeUpstream(tb testing.TB, name string) *fakeUpstream {
	f := &fakeUpstream{name: name, release: make(chan struct{}), ended: make(chan struct{}, 1<<16),
		stalled: make(chan struct{}, 1<<16)}
	f.Server = httptest.NewUnstartedServer(http.HandlerFunc(f.serve))
	f.Server.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			f.conns.Add(1)
		}
	}
	f.Server.Start()
	tb.Cleanup(func() {
		f.releaseAll()
		f.Server.CloseClientConnections()
		f.Server.Close()
	})
	return f
}

// set makes every request get b.
func (f *fakeUpstream) set(b fakeBehavior) {
	f.script(func(int, *http.Request) fakeBehavior { return b })
}

// script chooses the behavior per request; n counts from 1.
func (f *fakeUpstream) script(fn func(n int, r *http.Request) fakeBehavior) {
	f.mu.Lock()
	f.behave = fn
	f.mu.Unlock()
}

func (f *fakeUpstream) releaseAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	select {
	case <-f.release:
	default:
		close(f.release)
	}
}

func (f *fakeUpstream) requests() []fakeRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]fakeRequest(nil), f.reqs...)
}

func (f *fakeUpstream) count() int { return int(f.hits.Load()) }

func presentedKey(r *http.Request) string {
	if k := r.Header.Get("X-Api-Key"); k != "" {
		return k
	}
	if k := r.Header.Get("X-Goog-Api-Key"); k != "" {
		return k
	}
	return strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
}

// fakeProto tells the protocol from the path, as a real upstream's routes do.
func fakeProto(path string) (p protocol, responses bool) {
	switch {
	case strings.Contains(path, "/v1beta/"):
		return protoGemini, false
	case strings.Contains(path, "/v1/responses"):
		return protoOpenAI, true
	case strings.Contains(path, "/v1/messages"):
		return protoAnthropic, false
	}
	return protoOpenAI, false
}

func (f *fakeUpstream) serve(w http.ResponseWriter, r *http.Request) {
	n := int(f.hits.Add(1))
	f.inFlight.Add(1)
	defer func() {
		f.inFlight.Add(-1)
		select {
		case f.ended <- struct{}{}:
		default:
		}
	}()
	body, _ := io.ReadAll(r.Body)
	f.mu.Lock()
	if !f.noRecord.Load() {
		f.reqs = append(f.reqs, fakeRequest{Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery,
			Header: r.Header.Clone(), Body: body, Key: presentedKey(r)})
	}
	behave, release := f.behave, f.release
	f.mu.Unlock()
	r.Body = io.NopCloser(bytes.NewReader(body)) // a script may read it
	var b fakeBehavior
	if behave != nil {
		b = behave(n, r)
	}
	if b.PromptCache {
		u := f.cachePrompt(presentedKey(r), body)
		if p, _ := fakeProto(r.URL.Path); p == protoOpenAI {
			u.in, u.write = u.write, 0 // no cache write: the rest is input
		}
		b.cacheUsage = &u
	}
	// A client may say what body it sent; a relay that garbled it (a buffer
	// reused too early, say) gets a distinctive 400.
	if want := r.Header.Get("X-Body-Sha256"); want != "" {
		sum := sha256.Sum256(body)
		if hex.EncodeToString(sum[:]) != want {
			writeFakeError(w, protoAnthropic, 400, "invalid_request_error", "body does not match X-Body-Sha256", "")
			return
		}
	}
	p, responses := fakeProto(r.URL.Path)
	if b.EarlyHints != nil {
		for k, vs := range b.EarlyHints {
			w.Header()[k] = vs
		}
		w.WriteHeader(http.StatusEarlyHints)
		clear(w.Header())
	}
	for k, vs := range b.Headers {
		w.Header()[k] = vs
	}

	var req struct {
		Model  string `json:"model"`
		Stream bool   `json:"stream"`
	}
	json.Unmarshal(body, &req)
	model := req.Model
	stream := req.Stream
	if p == protoGemini {
		rest := r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]
		model, _, _ = strings.Cut(rest, ":")
		stream = strings.Contains(rest, ":stream")
	}

	if b.HugeHeader > 0 {
		w.Header().Set("X-Huge", strings.Repeat("h", b.HugeHeader))
	}
	switch {
	case b.Reset:
		resetConn(w)
		return
	case b.EchoHeaders:
		// In name order, as a debug dump would: ranging over the map put
		// the key past the 500 characters a webhook message keeps in
		// some runs and not others.
		var sb strings.Builder
		for _, k := range slices.Sorted(maps.Keys(r.Header)) {
			fmt.Fprintf(&sb, "%s: %s; ", k, strings.Join(r.Header[k], ","))
		}
		sb.WriteString(strings.Repeat("a", b.EchoPad))
		writeFakeError(w, p, cmp.Or(b.Status, 401), "authentication_error", "rejected request with headers "+sb.String(), "")
		return
	case b.GzipBomb > 0:
		writeGzipBomb(w, p, cmp.Or(b.Status, 200), b.GzipBomb)
		return
	case b.BigBody > 0 && !stream:
		writeBigBody(w, b.BigBody)
		return
	case b.StallHeaders:
		select {
		case <-r.Context().Done():
		case <-release:
		}
		return
	case b.Redirect != "":
		http.Redirect(w, r, b.Redirect, http.StatusPermanentRedirect)
		return
	case b.HTML404:
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(404)
		io.WriteString(w, "<html><body><h1>404 Not Found</h1>nginx</body></html>")
		return
	case b.RequireKey != "" && presentedKey(r) != b.RequireKey:
		writeFakeError(w, p, 401, "authentication_error", "invalid x-api-key", "")
		return
	case b.Status != 0:
		msg := fmt.Sprintf("fake %s error %d", f.name, b.Status)
		writeFakeError(w, p, b.Status, b.ErrType, msg, b.RetryAfter)
		return
	case b.EmptyBody:
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(200)
		return
	case b.HTMLBody:
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		io.WriteString(w, "<!DOCTYPE html><html><body>Please log in</body></html>")
		return
	}
	if b.ErrorIn200 && !stream {
		errType := cmp.Or(b.ErrType, "overloaded_error")
		w.Header().Set("Content-Type", "application/json")
		w.Write(fakeErrorBody(p, statusForErrorType(errType), errType, "fake error in a 200"))
		return
	}
	if strings.HasSuffix(r.URL.Path, "/count_tokens") || strings.HasSuffix(r.URL.Path, ":countTokens") {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"input_tokens":%d}`, fakeInputTokens)
		return
	}
	if !stream {
		f.writeJSON(w, p, responses, model, b)
		return
	}
	f.writeStream(w, r, p, responses, model, b, release)
}

// resetConn drops the connection with a TCP reset, before any response.
func resetConn(w http.ResponseWriter) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		panic(http.ErrAbortHandler)
	}
	c, _, err := hj.Hijack()
	if err != nil {
		return
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

func fakeErrorBody(p protocol, status int, errType, msg string) []byte {
	if errType == "" {
		errType = anthropicErrorType(status)
	}
	var v any
	switch p {
	case protoOpenAI:
		v = map[string]any{"error": map[string]any{"message": msg, "type": errType, "param": nil, "code": errType}}
	case protoGemini:
		v = map[string]any{"error": map[string]any{"code": status, "message": msg, "status": geminiStatus(status)}}
	default:
		v = map[string]any{"type": "error", "error": map[string]any{"type": errType, "message": msg}}
	}
	b, _ := json.Marshal(v)
	return b
}

func writeFakeError(w http.ResponseWriter, p protocol, status int, errType, msg, retryAfter string) {
	if retryAfter != "" {
		w.Header().Set("Retry-After", retryAfter)
	}
	w.Header().Set("Content-Type", "application/json")
	if w.Header().Get("Request-Id") == "" {
		w.Header().Set("Request-Id", "req_fake")
	}
	w.WriteHeader(status)
	w.Write(fakeErrorBody(p, status, errType, msg))
}

func (b fakeBehavior) text() string {
	if b.Text == "" {
		return "Hello"
	}
	return b.Text
}

func (b fakeBehavior) deltas() int {
	if b.Deltas == 0 {
		return 3
	}
	return b.Deltas
}

// fakeCache holds rendered bodies and events, so a load run measures the
// proxies and not the fake's JSON encoding.
var fakeCache sync.Map // string -> []byte or *fakeStream

func fakeKey(kind string, p protocol, responses bool, model string, b fakeBehavior) string {
	return fmt.Sprint(kind, p, responses, model, b.text(), b.deltas(), b.ToolName, b.ToolInput, b.Spaced, b.Bare, b.usage())
}

// promptCacheTTL is how long the simulated cache keeps a prefix unused,
// as Anthropic's default (5 minute) cache does.
const promptCacheTTL = 5 * time.Minute

// cachePrompt runs body through key's simulated prompt cache and returns
// the usage to report. The prompt is split in the units a cache prefix
// can end on: the system prompt, the tools and each message or input item.
func (f *fakeUpstream) cachePrompt(key string, body []byte) fakeUsage {
	var req struct {
		System       json.RawMessage   `json:"system"`
		Instructions json.RawMessage   `json:"instructions"`
		Tools        json.RawMessage   `json:"tools"`
		Messages     []json.RawMessage `json:"messages"`
		Input        json.RawMessage   `json:"input"`
	}
	json.Unmarshal(body, &req)
	units := [][]byte{req.System, req.Instructions, req.Tools}
	for _, m := range req.Messages {
		units = append(units, m)
	}
	var items []json.RawMessage
	if json.Unmarshal(req.Input, &items) == nil {
		for _, m := range items {
			units = append(units, m)
		}
	} else if len(req.Input) > 0 {
		units = append(units, req.Input)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	if f.clock != nil {
		now = f.clock()
	}
	if f.prompts == nil {
		f.prompts = map[string]map[[32]byte]time.Time{}
	}
	seen := f.prompts[key]
	if seen == nil {
		seen = map[[32]byte]time.Time{}
		f.prompts[key] = seen
	}
	var u fakeUsage
	h := sha256.New()
	total, hit := 0, true
	for _, unit := range units {
		if len(unit) == 0 {
			continue
		}
		h.Write(unit)
		h.Write([]byte{0})
		var sum [32]byte
		h.Sum(sum[:0])
		total += max(1, len(unit)/4)
		if t, ok := seen[sum]; hit && ok && now.Sub(t) <= promptCacheTTL {
			u.read = total
		} else {
			hit = false
		}
		seen[sum] = now
	}
	u.write = total - u.read
	u.out = fakeOutputTokens
	return u
}

func (f *fakeUpstream) writeJSON(w http.ResponseWriter, p protocol, responses bool, model string, b fakeBehavior) {
	key := fakeKey("json", p, responses, model, b)
	out, ok := fakeCache.Load(key)
	if !ok {
		out, _ = fakeCache.LoadOrStore(key, renderJSON(p, responses, model, b))
	}
	body := out.([]byte)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Write(body)
}

func renderJSON(p protocol, responses bool, model string, b fakeBehavior) []byte {
	text := strings.Repeat(b.text(), b.deltas())
	u := b.usage()
	var v any
	switch {
	case p == protoAnthropic:
		content, stop := []any{map[string]any{"type": "text", "text": text}}, "end_turn"
		if b.ToolName != "" {
			content, stop = []any{map[string]any{"type": "tool_use", "id": "toolu_fake", "name": b.ToolName,
				"input": json.RawMessage(b.ToolInput)}}, "tool_use"
		}
		v = map[string]any{"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
			"content":     content,
			"stop_reason": stop, "stop_sequence": nil,
			"usage": map[string]any{"input_tokens": u.in, "output_tokens": u.out,
				"cache_creation_input_tokens": u.write, "cache_read_input_tokens": u.read}}
	case p == protoOpenAI && responses:
		v = map[string]any{"id": "resp_fake", "object": "response", "status": "completed", "model": model,
			"output": []any{map[string]any{"type": "message", "role": "assistant",
				"content": []any{map[string]any{"type": "output_text", "text": text}}}},
			"usage": map[string]any{"input_tokens": u.in + u.read, "output_tokens": u.out,
				"input_tokens_details": map[string]any{"cached_tokens": u.read}, "total_tokens": u.in + u.read + u.out}}
	case p == protoOpenAI:
		v = map[string]any{"id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
			"choices": []any{map[string]any{"index": 0, "message": map[string]any{"role": "assistant", "content": text}, "finish_reason": "stop"}},
			"usage": map[string]any{"prompt_tokens": u.in + u.read, "completion_tokens": u.out,
				"total_tokens":          u.in + u.read + u.out,
				"prompt_tokens_details": map[string]any{"cached_tokens": u.read}}}
	default:
		v = map[string]any{"candidates": []any{map[string]any{"content": map[string]any{"parts": []any{map[string]any{"text": text}}, "role": "model"},
			"finishReason": "STOP", "index": 0}},
			"usageMetadata": map[string]any{"promptTokenCount": u.in + u.read, "candidatesTokenCount": u.out,
				"cachedContentTokenCount": u.read, "totalTokenCount": u.in + u.read + u.out},
			"modelVersion": model}
	}
	out, _ := json.Marshal(v)
	if b.Spaced {
		out = pythonSpaced(out)
	}
	return out
}

// pythonSpaced re-renders compact JSON (as json.Marshal writes it) with the
// separators of Python's json.dumps: a space after each ',' and ':' outside
// strings.
func pythonSpaced(compact []byte) []byte {
	out := make([]byte, 0, len(compact)+len(compact)/8)
	inString, escaped := false, false
	for _, c := range compact {
		out = append(out, c)
		switch {
		case escaped:
			escaped = false
		case inString && c == '\\':
			escaped = true
		case c == '"':
			inString = !inString
		case !inString && (c == ',' || c == ':'):
			out = append(out, ' ')
		}
	}
	return out
}

// typeFirst moves the top-level "type" member of a compact JSON object to
// the front, where the real APIs (and Python relays, whose dicts keep their
// order) put it; json.Marshal of a map sorts the keys instead.
func typeFirst(compact []byte) []byte {
	var m map[string]json.RawMessage
	if json.Unmarshal(compact, &m) != nil || m["type"] == nil {
		return compact
	}
	out := append([]byte(`{"type":`), m["type"]...)
	delete(m, "type")
	for _, k := range slices.Sorted(maps.Keys(m)) {
		q, _ := json.Marshal(k)
		out = append(append(append(append(out, ','), q...), ':'), m[k]...)
	}
	return append(out, '}')
}

// restyle re-renders one event of a stream as b asks: Spaced JSON in its
// data, and for Bare no event: line and no [DONE] event at all. Either way
// the event's type comes first in its data, as upstreams write it.
func restyle(ev []byte, b fakeBehavior) []byte {
	var out []byte
	for line := range bytes.Lines(ev) {
		switch {
		case b.Bare && bytes.HasPrefix(line, []byte("event:")):
		case b.Bare && string(line) == "data: [DONE]\n":
			return nil
		case bytes.HasPrefix(line, []byte("data: {")):
			doc := typeFirst(bytes.TrimSuffix(line[len("data: "):], []byte("\n")))
			if b.Spaced {
				doc = pythonSpaced(doc)
			}
			out = append(append(append(out, "data: "...), doc...), '\n')
		default:
			out = append(out, line...)
		}
	}
	return out
}

// sseEvent renders one event with real framing.
func sseEvent(name string, data any) []byte {
	var b bytes.Buffer
	if name != "" {
		b.WriteString("event: " + name + "\n")
	}
	switch d := data.(type) {
	case string:
		b.WriteString("data: " + d + "\n\n")
	default:
		j, _ := json.Marshal(d)
		b.WriteString("data: ")
		b.Write(j)
		b.WriteString("\n\n")
	}
	return b.Bytes()
}

// fakeStream is one rendered stream: what comes before the content starts
// (head, where a failing upstream errs or stalls), the start of content
// (mid), one delta repeated (or, where each differs, deltas), and the end.
type fakeStream struct {
	head, mid [][]byte
	delta     []byte
	deltas    [][]byte
	tail      [][]byte
}

// splitJSON cuts s into n pieces on rune boundaries, as an API streams
// partial JSON.
func splitJSON(s string, n int) []string {
	out := make([]string, 0, n)
	start := 0
	for i := 1; i < n; i++ {
		end := max(start, len(s)*i/n)
		for end < len(s) && !utf8.RuneStart(s[end]) {
			end++
		}
		out = append(out, s[start:end])
		start = end
	}
	return append(out, s[start:])
}

func renderStream(p protocol, responses bool, model string, b fakeBehavior) *fakeStream {
	text := b.text()
	u := b.usage()
	n := b.deltas()
	fs := &fakeStream{}
	switch {
	case p == protoAnthropic:
		fs.head = append(fs.head, sseEvent("message_start", map[string]any{"type": "message_start", "message": map[string]any{
			"id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": []any{},
			"stop_reason": nil, "stop_sequence": nil,
			"usage": map[string]any{"input_tokens": u.in, "cache_creation_input_tokens": u.write,
				"cache_read_input_tokens": u.read, "output_tokens": 1}}}))
		block, stop := map[string]any{"type": "text", "text": ""}, "end_turn"
		if b.ToolName != "" {
			block, stop = map[string]any{"type": "tool_use", "id": "toolu_fake", "name": b.ToolName, "input": map[string]any{}}, "tool_use"
			for _, part := range splitJSON(b.ToolInput, n) {
				fs.deltas = append(fs.deltas, sseEvent("content_block_delta", map[string]any{"type": "content_block_delta", "index": 0,
					"delta": map[string]any{"type": "input_json_delta", "partial_json": part}}))
			}
		}
		fs.mid = append(fs.mid,
			sseEvent("content_block_start", map[string]any{"type": "content_block_start", "index": 0,
				"content_block": block}),
			sseEvent("ping", map[string]any{"type": "ping"}))
		fs.delta = sseEvent("content_block_delta", map[string]any{"type": "content_block_delta", "index": 0,
			"delta": map[string]any{"type": "text_delta", "text": text}})
		fs.tail = append(fs.tail,
			sseEvent("content_block_stop", map[string]any{"type": "content_block_stop", "index": 0}),
			sseEvent("message_delta", map[string]any{"type": "message_delta",
				"delta": map[string]any{"stop_reason": stop, "stop_sequence": nil},
				"usage": map[string]any{"output_tokens": u.out}}),
			sseEvent("message_stop", map[string]any{"type": "message_stop"}))
	case p == protoOpenAI && responses:
		// The event sequence of the real API, which Codex follows closely:
		// every event numbered, the text given whole again at the end of
		// its part and item (Codex takes the answer from output_item.done),
		// and usage in response.completed.
		seq := 0
		ev := func(typ string, fields map[string]any) []byte {
			fields["type"], fields["sequence_number"] = typ, seq
			seq++
			return sseEvent(typ, fields)
		}
		resp := func(status string, output []any, usage any) map[string]any {
			return map[string]any{"id": "resp_fake", "object": "response", "created_at": 1700000000, "status": status,
				"error": nil, "incomplete_details": nil, "model": model, "output": output, "usage": usage}
		}
		// at places an event in the one message's one text part.
		at := func(fields map[string]any) map[string]any {
			fields["item_id"], fields["output_index"], fields["content_index"] = "msg_fake", 0, 0
			return fields
		}
		full := strings.Repeat(text, n)
		part := map[string]any{"type": "output_text", "text": full, "annotations": []any{}}
		item := map[string]any{"id": "msg_fake", "type": "message", "status": "completed", "role": "assistant", "content": []any{part}}
		fs.head = append(fs.head,
			ev("response.created", map[string]any{"response": resp("in_progress", []any{}, nil)}),
			ev("response.in_progress", map[string]any{"response": resp("in_progress", []any{}, nil)}))
		fs.mid = append(fs.mid,
			ev("response.output_item.added", map[string]any{"output_index": 0,
				"item": map[string]any{"id": "msg_fake", "type": "message", "status": "in_progress", "role": "assistant", "content": []any{}}}),
			ev("response.content_part.added", at(map[string]any{"part": map[string]any{"type": "output_text", "text": "", "annotations": []any{}}})))
		for range n {
			fs.deltas = append(fs.deltas, ev("response.output_text.delta", at(map[string]any{"delta": text, "logprobs": []any{}})))
		}
		fs.tail = append(fs.tail,
			ev("response.output_text.done", at(map[string]any{"text": full, "logprobs": []any{}})),
			ev("response.content_part.done", at(map[string]any{"part": part})),
			ev("response.output_item.done", map[string]any{"output_index": 0, "item": item}),
			ev("response.completed", map[string]any{"response": resp("completed", []any{item}, map[string]any{
				"input_tokens": u.in + u.read, "input_tokens_details": map[string]any{"cached_tokens": u.read},
				"output_tokens": u.out, "output_tokens_details": map[string]any{"reasoning_tokens": 0},
				"total_tokens": u.in + u.read + u.out})}))
	case p == protoOpenAI:
		chunk := func(delta map[string]any, finish any) []byte {
			return sseEvent("", map[string]any{"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
				"choices": []any{map[string]any{"index": 0, "delta": delta, "finish_reason": finish}}})
		}
		fs.mid = append(fs.mid, chunk(map[string]any{"role": "assistant", "content": ""}, nil))
		fs.delta = chunk(map[string]any{"content": text}, nil)
		fs.tail = append(fs.tail, chunk(map[string]any{}, "stop"),
			sseEvent("", map[string]any{"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
				"choices": []any{}, "usage": map[string]any{"prompt_tokens": u.in + u.read, "completion_tokens": u.out,
					"total_tokens": u.in + u.read + u.out, "prompt_tokens_details": map[string]any{"cached_tokens": u.read}}}),
			sseEvent("", "[DONE]"))
	default:
		fs.delta = sseEvent("", map[string]any{"candidates": []any{map[string]any{"content": map[string]any{"parts": []any{map[string]any{"text": text}}, "role": "model"}, "index": 0}},
			"usageMetadata": map[string]any{"promptTokenCount": u.in + u.read, "candidatesTokenCount": 1,
				"cachedContentTokenCount": u.read},
			"modelVersion": model})
		fs.tail = append(fs.tail, sseEvent("", map[string]any{"candidates": []any{map[string]any{"content": map[string]any{"parts": []any{map[string]any{"text": ""}}, "role": "model"},
			"finishReason": "STOP", "index": 0}},
			"usageMetadata": map[string]any{"promptTokenCount": u.in + u.read, "candidatesTokenCount": u.out,
				"cachedContentTokenCount": u.read, "totalTokenCount": u.in + u.read + u.out},
			"modelVersion": model}))
	}
	if b.Spaced || b.Bare {
		for _, evs := range [][][]byte{fs.head, fs.mid, fs.tail} {
			for i, ev := range evs {
				evs[i] = restyle(ev, b)
			}
		}
		fs.delta = restyle(fs.delta, b)
	}
	return fs
}

func (f *fakeUpstream) writeStream(w http.ResponseWriter, r *http.Request, p protocol, responses bool, model string, b fakeBehavior, release chan struct{}) {
	key := fakeKey("sse", p, responses, model, b)
	v, ok := fakeCache.Load(key)
	if !ok {
		v, _ = fakeCache.LoadOrStore(key, renderStream(p, responses, model, b))
	}
	fs := v.(*fakeStream)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(200)
	fl := w.(http.Flusher)
	send := func(ev []byte) {
		w.Write(ev)
		fl.Flush()
	}
	for _, ev := range fs.head {
		send(ev)
	}
	if b.FirstEventErr {
		errType := b.ErrType
		if errType == "" {
			errType = "overloaded_error"
		}
		switch {
		case p == protoAnthropic:
			send(sseEvent("error", map[string]any{"type": "error", "error": map[string]any{"type": errType, "message": "Overloaded"}}))
		case responses:
			send(sseEvent("response.failed", map[string]any{"type": "response.failed", "response": map[string]any{
				"id": "resp_fake", "status": "failed", "error": map[string]any{"code": errType, "message": "Overloaded"}}}))
		default:
			send(sseEvent("", map[string]any{"error": map[string]any{"message": "Overloaded", "type": errType, "code": errType}}))
		}
		return
	}
	if b.StallFirst {
		if p == protoAnthropic {
			send(sseEvent("ping", map[string]any{"type": "ping"}))
		} else {
			send([]byte(": keep-alive\n\n"))
		}
		select {
		case f.stalled <- struct{}{}:
		default:
		}
		select {
		case <-r.Context().Done():
		case <-release:
		}
		return
	}
	for _, ev := range fs.mid {
		send(ev)
	}
	for i := range b.deltas() {
		if b.EndlessEvent && i == b.EndlessAfter {
			writeEndlessEvent(w, r, b.Trickle)
			return
		}
		if i > 0 && b.BlockDeltas != nil {
			select {
			case <-b.BlockDeltas:
			case <-r.Context().Done():
				return
			}
		}
		if i > 0 && b.DeltaDelay > 0 {
			select {
			case <-time.After(b.DeltaDelay):
			case <-r.Context().Done():
				return
			}
		}
		if b.CutAfter > 0 && i == b.CutAfter {
			f.cuts.Add(1)
			switch {
			case b.MidStreamError:
				send(sseEvent("error", map[string]any{"type": "error", "error": map[string]any{"type": cmp.Or(b.ErrType, "overloaded_error"), "message": "Overloaded mid-stream"}}))
				if b.CutAfterError {
					panic(http.ErrAbortHandler)
				}
				return
			case b.CutClean:
				return // the body ends without the terminal event
			}
			// Half an event, then the connection drops.
			send([]byte("event: content_block_delta\ndata: {\"type\":\"content_blo"))
			panic(http.ErrAbortHandler)
		}
		if fs.deltas != nil {
			send(fs.deltas[i])
			continue
		}
		send(fs.delta)
	}
	for _, ev := range fs.tail {
		send(ev)
	}
	if b.HoldEnd {
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}
}

// writeEndlessEvent writes a data: line that never ends, until the client
// goes away: fast, or one byte per trickle.
func writeEndlessEvent(w http.ResponseWriter, r *http.Request, trickle time.Duration) {
	fl := w.(http.Flusher)
	if _, err := io.WriteString(w, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\""); err != nil {
		return
	}
	fl.Flush()
	if trickle > 0 {
		t := time.NewTicker(trickle)
		defer t.Stop()
		for {
			select {
			case <-r.Context().Done():
				return
			case <-t.C:
			}
			if _, err := w.Write([]byte{'x'}); err != nil {
				return
			}
			fl.Flush()
		}
	}
	chunk := bytes.Repeat([]byte("x"), 32<<10)
	for r.Context().Err() == nil {
		if _, err := w.Write(chunk); err != nil {
			return
		}
	}
}

// writeGzipBomb answers a gzip body that inflates to n bytes: an error
// document (or the start of a message) and then n bytes of spaces. It is
// written as many gzip members (which a gzip reader reads as one stream),
// the spaces one precompressed MiB at a time, so the fake spends nothing
// on compressing and the relay all its time inflating.
func writeGzipBomb(w http.ResponseWriter, p protocol, status int, n int64) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Encoding", "gzip")
	w.WriteHeader(status)
	head := []byte(`{"id":"msg_fake","type":"message","role":"assistant","content":[{"type":"text","text":"`)
	if status >= 400 {
		head = fakeErrorBody(p, status, "api_error", "fake error, gzip bomb follows")
	}
	if _, err := w.Write(gzipMember(head)); err != nil {
		return
	}
	block := bombBlock()
	for written := int64(0); written < n; written += 1 << 20 {
		if _, err := w.Write(block); err != nil {
			return
		}
	}
}

func gzipMember(b []byte) []byte {
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	zw.Write(b)
	zw.Close()
	return buf.Bytes()
}

// bombBlock is one MiB of spaces, gzipped once.
var bombBlock = sync.OnceValue(func() []byte { return gzipMember(bytes.Repeat([]byte{' '}, 1<<20)) })

// writeBigBody answers a JSON message padded to n bytes.
func writeBigBody(w http.ResponseWriter, n int64) {
	w.Header().Set("Content-Type", "application/json")
	io.WriteString(w, `{"id":"msg_fake","type":"message","role":"assistant","content":[{"type":"text","text":"`)
	pad := bytes.Repeat([]byte{'x'}, 64<<10)
	for written := int64(0); written < n; written += int64(len(pad)) {
		if _, err := w.Write(pad); err != nil {
			return
		}
	}
	io.WriteString(w, `"}],"usage":{"input_tokens":1,"output_tokens":1}}`)
}
