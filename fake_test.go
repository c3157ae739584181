package main

import (
	"bytes"
	"cmp"
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
	// noRecord turns off keeping requests, for load runs.
	noRecord atomic.Bool
	// conns counts connections accepted, to check connection reuse.
	conns atomic.Int64
	// cuts counts streams this upstream broke off after content began.
	cuts atomic.Int64
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
	// EchoHeaders, with Status, puts the request's headers in the error
	// message, as debugging upstreams do: keys and all.
	EchoHeaders bool

	HTML404        bool   // 404 with an HTML page (a wrong URL)
	Redirect       string // answer 308 to this Location
	Reset          bool   // reset the connection before any response
	StallHeaders   bool   // never answer (until the client gives up or release)
	StallFirst     bool   // stream: headers and a ping, then nothing
	FirstEventErr  bool   // stream: 200, then an error event first
	CutAfter       int    // stream: drop the connection after this many deltas
	CutClean       bool   // with CutAfter: end the body cleanly (no terminal event) instead
	MidStreamError bool   // with CutAfter: send an error event there instead of cutting
	EmptyBody      bool   // 200 with an empty body
	HTMLBody       bool   // 200 with an HTML page
	ErrorIn200     bool   // non-stream: 200 whose JSON body is an error (ErrType, default overloaded_error)

	Deltas     int           // content deltas in a stream (default 3)
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
}

// Usage the fake reports, fixed so tests can assert what the log holds.
const (
	fakeInputTokens  = 12
	fakeOutputTokens = 34
	fakeCacheRead    = 5
	fakeCacheWrite   = 7
)

func newFakeUpstream(tb testing.TB, name string) *fakeUpstream {
	f := &fakeUpstream{name: name, release: make(chan struct{}), ended: make(chan struct{}, 1<<16)}
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

	switch {
	case b.Reset:
		resetConn(w)
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
		if b.EchoHeaders {
			msg += fmt.Sprintf("; request headers: %v", r.Header)
		}
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
	return fmt.Sprint(kind, p, responses, model, b.text(), b.deltas(), b.ToolName, b.ToolInput, b.Spaced, b.Bare)
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
			"usage": map[string]any{"input_tokens": fakeInputTokens, "output_tokens": fakeOutputTokens,
				"cache_creation_input_tokens": fakeCacheWrite, "cache_read_input_tokens": fakeCacheRead}}
	case p == protoOpenAI && responses:
		v = map[string]any{"id": "resp_fake", "object": "response", "status": "completed", "model": model,
			"output": []any{map[string]any{"type": "message", "role": "assistant",
				"content": []any{map[string]any{"type": "output_text", "text": text}}}},
			"usage": map[string]any{"input_tokens": fakeInputTokens + fakeCacheRead, "output_tokens": fakeOutputTokens,
				"input_tokens_details": map[string]any{"cached_tokens": fakeCacheRead}, "total_tokens": fakeInputTokens + fakeCacheRead + fakeOutputTokens}}
	case p == protoOpenAI:
		v = map[string]any{"id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
			"choices": []any{map[string]any{"index": 0, "message": map[string]any{"role": "assistant", "content": text}, "finish_reason": "stop"}},
			"usage": map[string]any{"prompt_tokens": fakeInputTokens + fakeCacheRead, "completion_tokens": fakeOutputTokens,
				"total_tokens":          fakeInputTokens + fakeCacheRead + fakeOutputTokens,
				"prompt_tokens_details": map[string]any{"cached_tokens": fakeCacheRead}}}
	default:
		v = map[string]any{"candidates": []any{map[string]any{"content": map[string]any{"parts": []any{map[string]any{"text": text}}, "role": "model"},
			"finishReason": "STOP", "index": 0}},
			"usageMetadata": map[string]any{"promptTokenCount": fakeInputTokens + fakeCacheRead, "candidatesTokenCount": fakeOutputTokens,
				"cachedContentTokenCount": fakeCacheRead, "totalTokenCount": fakeInputTokens + fakeCacheRead + fakeOutputTokens},
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
	n := b.deltas()
	fs := &fakeStream{}
	switch {
	case p == protoAnthropic:
		fs.head = append(fs.head, sseEvent("message_start", map[string]any{"type": "message_start", "message": map[string]any{
			"id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": []any{},
			"stop_reason": nil, "stop_sequence": nil,
			"usage": map[string]any{"input_tokens": fakeInputTokens, "cache_creation_input_tokens": fakeCacheWrite,
				"cache_read_input_tokens": fakeCacheRead, "output_tokens": 1}}}))
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
				"usage": map[string]any{"output_tokens": fakeOutputTokens}}),
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
				"input_tokens": fakeInputTokens + fakeCacheRead, "input_tokens_details": map[string]any{"cached_tokens": fakeCacheRead},
				"output_tokens": fakeOutputTokens, "output_tokens_details": map[string]any{"reasoning_tokens": 0},
				"total_tokens": fakeInputTokens + fakeCacheRead + fakeOutputTokens})}))
	case p == protoOpenAI:
		chunk := func(delta map[string]any, finish any) []byte {
			return sseEvent("", map[string]any{"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
				"choices": []any{map[string]any{"index": 0, "delta": delta, "finish_reason": finish}}})
		}
		fs.mid = append(fs.mid, chunk(map[string]any{"role": "assistant", "content": ""}, nil))
		fs.delta = chunk(map[string]any{"content": text}, nil)
		fs.tail = append(fs.tail, chunk(map[string]any{}, "stop"),
			sseEvent("", map[string]any{"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
				"choices": []any{}, "usage": map[string]any{"prompt_tokens": fakeInputTokens + fakeCacheRead, "completion_tokens": fakeOutputTokens,
					"total_tokens": fakeInputTokens + fakeCacheRead + fakeOutputTokens, "prompt_tokens_details": map[string]any{"cached_tokens": fakeCacheRead}}}),
			sseEvent("", "[DONE]"))
	default:
		fs.delta = sseEvent("", map[string]any{"candidates": []any{map[string]any{"content": map[string]any{"parts": []any{map[string]any{"text": text}}, "role": "model"}, "index": 0}},
			"usageMetadata": map[string]any{"promptTokenCount": fakeInputTokens + fakeCacheRead, "candidatesTokenCount": 1,
				"cachedContentTokenCount": fakeCacheRead},
			"modelVersion": model})
		fs.tail = append(fs.tail, sseEvent("", map[string]any{"candidates": []any{map[string]any{"content": map[string]any{"parts": []any{map[string]any{"text": ""}}, "role": "model"},
			"finishReason": "STOP", "index": 0}},
			"usageMetadata": map[string]any{"promptTokenCount": fakeInputTokens + fakeCacheRead, "candidatesTokenCount": fakeOutputTokens,
				"cachedContentTokenCount": fakeCacheRead, "totalTokenCount": fakeInputTokens + fakeCacheRead + fakeOutputTokens},
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
		case <-r.Context().Done():
		case <-release:
		}
		return
	}
	for _, ev := range fs.mid {
		send(ev)
	}
	for i := range b.deltas() {
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
