package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/bits"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"unicode/utf8"
)

// protocol is the API family of a request and of a channel.
type protocol uint8

const (
	protoAnthropic protocol = iota + 1
	protoOpenAI
	protoGemini
	protocolCount
)

func (p protocol) String() string {
	switch p {
	case protoAnthropic:
		return "anthropic"
	case protoOpenAI:
		return "openai"
	case protoGemini:
		return "gemini"
	}
	return "unknown"
}

// parseChannelType maps a channel_type value to its protocol. "codex" is an
// alias for openai: Codex speaks the OpenAI Responses API.
func parseChannelType(s string) (protocol, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "anthropic", "claude":
		return protoAnthropic, nil
	case "openai", "codex":
		return protoOpenAI, nil
	case "gemini":
		return protoGemini, nil
	}
	return 0, fmt.Errorf("channel_type %q: want anthropic, openai (or codex) or gemini", s)
}

// errorKind is how each protocol names one HTTP status in its error body.
type errorKind struct {
	status     int
	anthropic  string // error.type
	openAIType string // error.type
	openAICode string // error.code; "" is null
	gemini     string // error.status (google.rpc.Code)
}

// errorKinds is the one table from a status ccload answers with itself to
// each protocol's own name for it, so that an official SDK raises its
// matching exception. Anthropic's follows its API reference (400
// invalid_request_error … 5xx api_error, 529 overloaded_error); OpenAI's
// follows what api.openai.com sends (type plus a machine-readable code);
// Gemini's is google.rpc's. A status not listed takes its class's row
// (see errorKindFor).
var errorKinds = []errorKind{
	{400, "invalid_request_error", "invalid_request_error", "", "INVALID_ARGUMENT"},
	{401, "authentication_error", "invalid_request_error", "invalid_api_key", "UNAUTHENTICATED"},
	{402, "billing_error", "insufficient_quota", "insufficient_quota", "FAILED_PRECONDITION"},
	{403, "permission_error", "invalid_request_error", "permission_denied", "PERMISSION_DENIED"},
	{404, "not_found_error", "invalid_request_error", "model_not_found", "NOT_FOUND"},
	{408, "invalid_request_error", "invalid_request_error", "request_timeout", "DEADLINE_EXCEEDED"},
	{413, "request_too_large", "invalid_request_error", "request_too_large", "INVALID_ARGUMENT"},
	{422, "invalid_request_error", "invalid_request_error", "", "INVALID_ARGUMENT"},
	{429, "rate_limit_error", "requests", "rate_limit_exceeded", "RESOURCE_EXHAUSTED"},
	{500, "api_error", "server_error", "", "INTERNAL"},
	{502, "api_error", "server_error", "bad_gateway", "UNAVAILABLE"},
	{503, "api_error", "server_error", "service_unavailable", "UNAVAILABLE"},
	{504, "api_error", "server_error", "timeout", "DEADLINE_EXCEEDED"},
	{529, "overloaded_error", "server_error", "server_is_overloaded", "UNAVAILABLE"},
}

// errorKindFor returns status's row: its own, else 400's for a 4xx and
// 500's for anything else.
func errorKindFor(status int) errorKind {
	for _, k := range errorKinds {
		if k.status == status {
			return k
		}
	}
	fallback := 500
	if status >= 400 && status < 500 {
		fallback = 400
	}
	k := errorKindFor(fallback)
	k.status = status
	return k
}

func anthropicErrorType(status int) string { return errorKindFor(status).anthropic }

func geminiStatus(status int) string { return errorKindFor(status).gemini }

// errorBody is the body of an error response in p's shape.
func errorBody(p protocol, status int, msg string) []byte {
	k := errorKindFor(status)
	var v any
	switch p {
	case protoOpenAI:
		type e struct {
			Message string  `json:"message"`
			Type    string  `json:"type"`
			Param   *string `json:"param"`
			Code    *string `json:"code"`
		}
		var code *string
		if k.openAICode != "" {
			code = &k.openAICode
		}
		v = struct {
			Error e `json:"error"`
		}{e{Message: msg, Type: k.openAIType, Code: code}}
	case protoGemini:
		type e struct {
			Code    int    `json:"code"`
			Message string `json:"message"`
			Status  string `json:"status"`
		}
		v = struct {
			Error e `json:"error"`
		}{e{Code: status, Message: msg, Status: k.gemini}}
	default:
		type e struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		}
		v = struct {
			Type  string `json:"type"`
			Error e      `json:"error"`
		}{"error", e{Type: k.anthropic, Message: msg}}
	}
	b, _ := json.Marshal(v)
	return b
}

// writeError answers with an error in the protocol's shape.
func writeError(w http.ResponseWriter, p protocol, status int, msg string) {
	b := errorBody(p, status, msg)
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	w.Write(b)
}

// streamErrorEvent is the SSE event that ends a stream which failed after
// its headers were sent, so the client sees an error and not a silent EOF.
// rs is the Responses stream's state (nil for any other stream); u the
// usage seen so far.
func streamErrorEvent(p protocol, rs *responsesState, msg string, u usage) []byte {
	var b bytes.Buffer
	m, _ := json.Marshal(msg)
	switch {
	case p == protoAnthropic:
		b.WriteString(`event: error` + "\n" + `data: {"type":"error","error":{"type":"api_error","message":`)
		b.Write(m)
		b.WriteString("}}\n\n")
	case p == protoOpenAI && rs != nil:
		return rs.failedEvent(msg, u)
	case p == protoOpenAI:
		b.WriteString(`data: {"error":{"message":`)
		b.Write(m)
		b.WriteString(`,"type":"server_error","param":null,"code":"stream_interrupted"}}` + "\n\n")
	default:
		b.WriteString(`data: {"error":{"code":502,"message":`)
		b.Write(m)
		b.WriteString(`,"status":"UNAVAILABLE"}}` + "\n\n")
	}
	return b.Bytes()
}

// bodyInfo is what the proxy needs from a request body.
type bodyInfo struct {
	model      string
	modelStart int // byte span of the model's JSON string, quotes included; 0, 0 when none
	modelEnd   int
	stream     bool
	// Where the session identity sits (see affinity.go), as byte spans of
	// body; a zero span is absent. userID is metadata.user_id's value and
	// cacheKey prompt_cache_key's, quotes included when a string. system,
	// tools and firstMsg (the first element of messages, input or
	// contents) are the leading conversation, hashed when no id is sent.
	userID, cacheKey, system, tools, firstMsg span
}

// span is a byte range [start, end) of a request body.
type span struct{ start, end int }

func (p span) of(b []byte) []byte { return b[p.start:p.end] }

func (p span) empty() bool { return p.end <= p.start }

var (
	errNotObject    = errors.New("the request body must be a JSON object")
	errModelNotText = errors.New(`"model" must be a string`)
)

// syntaxError is malformed JSON, with where it went wrong.
type syntaxError struct {
	msg    string
	offset int
}

func (e *syntaxError) Error() string { return fmt.Sprintf("%s at byte %d", e.msg, e.offset) }

// maxJSONDepth bounds nesting, as encoding/json does, so a hostile body
// cannot exhaust the stack.
const maxJSONDepth = 10000

// inspectBody validates body as JSON (accepting exactly what json.Valid
// accepts) and, in the same pass, finds the top-level "model" and "stream"
// members. One pass matters: Claude Code sends 100 KiB and more per
// request. On a body of its shape this scan takes 95 µs per 100 KiB, and
// encoding/json's validator alone 638 µs (6.7×; medians of
// BenchmarkInspectBody and BenchmarkJSONValid, -count 5, 2 vCPU).
func inspectBody(body []byte) (bodyInfo, error) {
	s := jsonScan{b: body}
	s.space()
	if s.i >= len(s.b) {
		return bodyInfo{}, &syntaxError{"unexpected end of JSON input", s.i}
	}
	top := s.b[s.i]
	if !s.value(0) {
		return bodyInfo{}, s.err
	}
	s.space()
	if s.i < len(s.b) {
		s.fail("invalid character " + quoteChar(s.b[s.i]) + " after top-level value")
		return bodyInfo{}, s.err
	}
	if top != '{' {
		return bodyInfo{}, errNotObject
	}
	if s.badModel {
		return bodyInfo{}, errModelNotText
	}
	return s.info, nil
}

// jsonScan is a validating JSON scanner that records the top-level members
// the proxy needs.
type jsonScan struct {
	b        []byte
	i        int
	err      error
	info     bodyInfo
	badModel bool
	// firstEnd is where the first element of the latest top-level array
	// member ended (-1: the array was empty), so the leading message of a
	// conversation is known without scanning it again.
	firstEnd int
}

func (s *jsonScan) fail(msg string) bool {
	if s.err == nil {
		s.err = &syntaxError{msg, s.i}
	}
	return false
}

func (s *jsonScan) eof() bool { return s.fail("unexpected end of JSON input") }

func quoteChar(c byte) string {
	if c == '\'' {
		return `'\''`
	}
	if c == '"' {
		return `'"'`
	}
	return strconv.QuoteRune(rune(c))
}

func (s *jsonScan) space() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

func (s *jsonScan) value(depth int) bool {
	if s.i >= len(s.b) {
		return s.eof()
	}
	switch c := s.b[s.i]; {
	case c == '{':
		return s.object(depth + 1)
	case c == '[':
		return s.array(depth + 1)
	case c == '"':
		_, ok := s.str()
		return ok
	case c == 't':
		return s.literal("true")
	case c == 'f':
		return s.literal("false")
	case c == 'n':
		return s.literal("null")
	case c == '-' || (c >= '0' && c <= '9'):
		return s.number()
	default:
		return s.fail("invalid character " + quoteChar(c) + " looking for beginning of value")
	}
}

func (s *jsonScan) object(depth int) bool {
	if depth > maxJSONDepth {
		return s.fail("exceeded max depth")
	}
	s.i++ // {
	s.space()
	if s.i < len(s.b) && s.b[s.i] == '}' {
		s.i++
		return true
	}
	for {
		if s.i >= len(s.b) {
			return s.eof()
		}
		if s.b[s.i] != '"' {
			return s.fail("invalid character " + quoteChar(s.b[s.i]) + " looking for beginning of object key string")
		}
		keyStart := s.i
		escaped, ok := s.str()
		if !ok {
			return false
		}
		key := s.b[keyStart+1 : s.i-1]
		s.space()
		if s.i >= len(s.b) {
			return s.eof()
		}
		if s.b[s.i] != ':' {
			return s.fail("invalid character " + quoteChar(s.b[s.i]) + " after object key")
		}
		s.i++
		s.space()
		valStart := s.i
		if !s.value(depth) {
			return false
		}
		if depth == 1 {
			if escaped {
				var k string
				json.Unmarshal(s.b[keyStart:keyStart+len(key)+2], &k)
				key = []byte(k)
			}
			s.member(string(key), valStart, s.i)
		}
		s.space()
		if s.i >= len(s.b) {
			return s.eof()
		}
		switch s.b[s.i] {
		case ',':
			s.i++
			s.space()
		case '}':
			s.i++
			return true
		default:
			return s.fail("invalid character " + quoteChar(s.b[s.i]) + " after object key:value pair")
		}
	}
}

// member records a top-level member the proxy cares about. The last
// occurrence wins, as it does for encoding/json.
func (s *jsonScan) member(key string, start, end int) {
	v := s.b[start:end]
	switch key {
	case "model":
		s.badModel = false
		s.info.model, s.info.modelStart, s.info.modelEnd = "", 0, 0
		switch {
		case v[0] == '"':
			raw := v[1 : len(v)-1]
			if bytes.IndexByte(raw, '\\') >= 0 || !utf8.Valid(raw) {
				// Escapes and invalid UTF-8 decode as encoding/json does.
				var m string
				json.Unmarshal(v, &m)
				s.info.model = m
			} else {
				s.info.model = string(raw)
			}
			s.info.modelStart, s.info.modelEnd = start, end
		case string(v) == "null":
		default:
			s.badModel = true
		}
	case "stream":
		s.info.stream = string(v) == "true"
	case "metadata":
		// A small object at the end of Claude Code's body; only user_id
		// is wanted from it.
		s.info.userID = span{}
		forEachMember(v, func(k, val []byte) {
			if string(k) == "user_id" {
				off := start + int(cap(v)-cap(val)) // val is a subslice of v
				s.info.userID = span{off, off + len(val)}
			}
		})
	case "prompt_cache_key":
		s.info.cacheKey = span{start, end}
	case "system", "instructions", "systemInstruction":
		s.info.system = span{start, end}
	case "tools":
		s.info.tools = span{start, end}
	case "messages", "input", "contents":
		switch {
		case v[0] == '[' && s.firstEnd > start:
			s.info.firstMsg = span{start + 1, s.firstEnd}
		case v[0] == '"': // Responses: input may be one string
			s.info.firstMsg = span{start, end}
		default:
			s.info.firstMsg = span{}
		}
	}
}

func (s *jsonScan) array(depth int) bool {
	if depth > maxJSONDepth {
		return s.fail("exceeded max depth")
	}
	s.i++ // [
	// A top-level member's value: note where its first element ends.
	top := depth == 2
	if top {
		s.firstEnd = -1
	}
	s.space()
	if s.i < len(s.b) && s.b[s.i] == ']' {
		s.i++
		return true
	}
	for {
		if !s.value(depth) {
			return false
		}
		if top && s.firstEnd < 0 {
			s.firstEnd = s.i
		}
		s.space()
		if s.i >= len(s.b) {
			return s.eof()
		}
		switch s.b[s.i] {
		case ',':
			s.i++
			s.space()
		case ']':
			s.i++
			return true
		default:
			return s.fail("invalid character " + quoteChar(s.b[s.i]) + " after array element")
		}
	}
}

// plainStringByte marks the bytes a JSON string may hold unescaped.
var plainStringByte = func() (t [256]bool) {
	for c := 0x20; c < 256; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

// str scans a string starting at the opening quote and reports whether it
// held escapes.
func (s *jsonScan) str() (escaped, ok bool) {
	b, i := s.b, s.i+1
	for {
		// Eight bytes at a time while none of them ends or escapes the
		// string: most of a Claude Code request is long strings. The
		// lowest bit of specialBytes marks the first byte that does, so
		// the step to it needs no byte loop: Claude Code's strings hold an
		// escape every few dozen bytes.
		for {
			if i+8 > len(b) {
				for i < len(b) && plainStringByte[b[i]] {
					i++
				}
				break
			}
			if m := specialBytes(binary.LittleEndian.Uint64(b[i:])); m != 0 {
				i += bits.TrailingZeros64(m) >> 3
				break
			}
			i += 8
		}
		if i >= len(b) {
			s.i = i
			return escaped, s.eof()
		}
		switch c := b[i]; c {
		case '"':
			s.i = i + 1
			return escaped, true
		case '\\':
			escaped = true
			if i+1 >= len(b) {
				s.i = i + 1
				return escaped, s.eof()
			}
			switch b[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				for k := 2; k < 6; k++ {
					if i+k >= len(b) {
						s.i = i + k
						return escaped, s.eof()
					}
					if !isHex(b[i+k]) {
						s.i = i + k
						return escaped, s.fail("invalid character " + quoteChar(b[i+k]) + " in \\u hexadecimal character escape")
					}
				}
				i += 6
			default:
				s.i = i + 1
				return escaped, s.fail("invalid character " + quoteChar(b[i+1]) + " in string escape code")
			}
		default:
			s.i = i
			return escaped, s.fail("invalid character " + quoteChar(c) + " in string literal")
		}
	}
}

// specialBytes marks, in the high bit of each byte, the bytes of w that are
// a quote, a backslash or a control character (< 0x20), by the same bit
// trick as plainWord. Above the first marked byte a mark may be false (the
// subtraction borrows), but the lowest one is exact: bytes below it borrow
// nothing and match nothing.
func specialBytes(w uint64) uint64 {
	const (
		ones  = 0x0101010101010101
		highs = 0x8080808080808080
	)
	q, bs := w^('"'*ones), w^('\\'*ones)
	return ((w-0x20*ones)&^w | (q-ones)&^q | (bs-ones)&^bs) & highs
}

// plainWord reports whether none of the eight bytes in w is a quote, a
// backslash or a control character (< 0x20). The tests are the classic
// "has a zero byte" bit trick, which is exact for whether any byte matches.
func plainWord(w uint64) bool {
	const (
		ones  = 0x0101010101010101
		highs = 0x8080808080808080
	)
	hasZero := func(x uint64) uint64 { return (x - ones) & ^x & highs }
	control := (w - 0x20*ones) & ^w & highs // some byte < 0x20
	return control|hasZero(w^('"'*ones))|hasZero(w^('\\'*ones)) == 0
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func (s *jsonScan) literal(word string) bool {
	for k := 0; k < len(word); k++ {
		if s.i >= len(s.b) {
			return s.eof()
		}
		if s.b[s.i] != word[k] {
			return s.fail("invalid character " + quoteChar(s.b[s.i]) + " in literal " + word)
		}
		s.i++
	}
	return true
}

func (s *jsonScan) number() bool {
	b := s.b
	digits := func() int {
		n := 0
		for s.i < len(b) && b[s.i] >= '0' && b[s.i] <= '9' {
			s.i++
			n++
		}
		return n
	}
	if b[s.i] == '-' {
		s.i++
		if s.i >= len(b) {
			return s.eof()
		}
	}
	switch {
	case b[s.i] == '0':
		s.i++
	case b[s.i] >= '1' && b[s.i] <= '9':
		digits()
	default:
		return s.fail("invalid character " + quoteChar(b[s.i]) + " in numeric literal")
	}
	if s.i < len(b) && b[s.i] == '.' {
		s.i++
		if s.i >= len(b) {
			return s.eof()
		}
		if digits() == 0 {
			return s.fail("invalid character " + quoteChar(b[s.i]) + " after decimal point in numeric literal")
		}
	}
	if s.i < len(b) && (b[s.i] == 'e' || b[s.i] == 'E') {
		s.i++
		if s.i < len(b) && (b[s.i] == '+' || b[s.i] == '-') {
			s.i++
		}
		if s.i >= len(b) {
			return s.eof()
		}
		if digits() == 0 {
			return s.fail("invalid character " + quoteChar(b[s.i]) + " in exponent of numeric literal")
		}
	}
	return true
}

func skipSpace(b []byte, i int) int {
	for i < len(b) {
		switch b[i] {
		case ' ', '\t', '\n', '\r':
			i++
		default:
			return i
		}
	}
	return i
}

// skipString returns the index after the JSON string starting at b[i] == '"'
// in text already known to be valid.
func skipString(b []byte, i int) int {
	i++
	for i < len(b) {
		j := bytes.IndexAny(b[i:], `"\`)
		if j < 0 {
			return len(b)
		}
		i += j
		if b[i] == '\\' {
			i += 2
			continue
		}
		return i + 1
	}
	return i
}

// skipValue returns the index after the JSON value starting at b[i], in
// text already known to be valid (or cut short: it stops at the end).
func skipValue(b []byte, i int) int {
	if i >= len(b) {
		return i
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				i = skipString(b, i)
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
			i++
		}
		return i
	}
	for i < len(b) {
		switch b[i] {
		case ',', '}', ']', ' ', '\t', '\n', '\r':
			return i
		}
		i++
	}
	return i
}

// geminiTarget splits the last path element of /v1beta/models/{model}:{action}.
func geminiTarget(rest string) (model, action string, ok bool) {
	i := strings.LastIndexByte(rest, ':')
	if i <= 0 || i == len(rest)-1 {
		return "", "", false
	}
	return rest[:i], rest[i+1:], true
}

// usage is the token count of one response.
type usage struct {
	Input, Output, CacheRead, CacheWrite int64
	// CacheWrite1h is the part of CacheWrite cached for an hour
	// (Anthropic's cache_creation.ephemeral_1h_input_tokens), which costs
	// more than the 5-minute rest (see pricing.go).
	CacheWrite1h int64
}

var (
	usageMarker       = []byte(`"usage"`)
	usageMetaMarker   = []byte(`"usageMetadata"`)
	errorMarker       = []byte(`"error"`)
	anthropicErrorTag = []byte(`"type":"error"`)
)

// absorb updates u from one JSON document (an SSE data payload or a whole
// response) if it carries usage: Anthropic's message_start (message.usage)
// and message_delta (usage), OpenAI chat (usage), Responses
// (response.usage) and Gemini (usageMetadata). Later figures replace
// earlier ones, which is how the protocols report them. It reads only the
// integers it needs, without decoding the document: this runs for every
// stream, and encoding/json cost ~25 µs per stream here.
func (u *usage) absorb(data []byte) {
	if !bytes.Contains(data, usageMarker) && !bytes.Contains(data, usageMetaMarker) {
		return
	}
	forEachMember(data, func(key, val []byte) {
		switch string(key) {
		case "usage":
			u.applyCounts(val)
		case "usageMetadata":
			u.applyGemini(val)
		case "message", "response":
			forEachMember(val, func(k, v []byte) {
				if string(k) == "usage" {
					u.applyCounts(v)
				}
			})
		}
	})
}

// applyCounts reads an Anthropic or OpenAI usage object.
func (u *usage) applyCounts(obj []byte) {
	var (
		input, output, cacheWrite, cacheRead, prompt, completion, cached int64 = -1, -1, -1, -1, -1, -1, 0
		write5m, write1h                                                 int64 = -1, -1
		inputDetails                                                     bool
	)
	forEachMember(obj, func(k, v []byte) {
		switch string(k) {
		case "input_tokens":
			input = jsonInt(v)
		case "output_tokens":
			output = jsonInt(v)
		case "cache_creation_input_tokens":
			cacheWrite = jsonInt(v)
		case "cache_read_input_tokens":
			cacheRead = jsonInt(v)
		case "cache_creation":
			forEachMember(v, func(dk, dv []byte) {
				switch string(dk) {
				case "ephemeral_5m_input_tokens":
					write5m = jsonInt(dv)
				case "ephemeral_1h_input_tokens":
					write1h = jsonInt(dv)
				}
			})
		case "prompt_tokens":
			prompt = jsonInt(v)
		case "completion_tokens":
			completion = jsonInt(v)
		case "prompt_tokens_details", "input_tokens_details":
			inputDetails = inputDetails || string(k) == "input_tokens_details"
			cached = 0 // the last details member says, as for any repeated member
			forEachMember(v, func(dk, dv []byte) {
				if string(dk) == "cached_tokens" {
					cached = max(jsonInt(dv), 0)
				}
			})
		}
	})
	set := func(dst *int64, v int64) {
		if v > 0 {
			*dst = v
		}
	}
	// Anthropic's input_tokens excludes cache reads; OpenAI's prompt and
	// input counts include cached tokens. Logged input is the uncached part
	// in both, so the columns add up the same way for every protocol.
	switch {
	case prompt >= 0:
		set(&u.Input, prompt-cached)
	case input >= 0 && inputDetails:
		set(&u.Input, input-cached)
	case input >= 0:
		set(&u.Input, input)
	}
	set(&u.Output, output)
	set(&u.Output, completion)
	set(&u.CacheWrite, cacheWrite)
	if cacheWrite < 0 && write5m+write1h > 0 {
		// Only the split was given: its sum is the total.
		set(&u.CacheWrite, max(write5m, 0)+max(write1h, 0))
	}
	set(&u.CacheWrite1h, write1h)
	set(&u.CacheRead, cacheRead)
	if cached > 0 {
		u.CacheRead = cached
	}
}

// applyGemini reads a Gemini usageMetadata object.
func (u *usage) applyGemini(obj []byte) {
	if len(obj) == 0 || obj[0] != '{' {
		return // not a report: it must not zero the running totals
	}
	var prompt, candidates, cached, thoughts int64
	forEachMember(obj, func(k, v []byte) {
		switch string(k) {
		case "promptTokenCount":
			prompt = max(jsonInt(v), 0)
		case "candidatesTokenCount":
			candidates = max(jsonInt(v), 0)
		case "cachedContentTokenCount":
			cached = max(jsonInt(v), 0)
		case "thoughtsTokenCount":
			thoughts = max(jsonInt(v), 0)
		}
	})
	u.Input = max(prompt-cached, 0)
	u.Output = candidates + thoughts
	u.CacheRead = cached
}

// forEachMember calls fn with the key and raw value of each member of the
// JSON object at the start of b. Keys with escapes are passed raw, which
// is fine for the plain keys looked for here. On malformed input it stops:
// upstream bytes are not trusted to be valid.
func forEachMember(b []byte, fn func(key, val []byte)) {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return
	}
	i++
	for {
		i = skipSpace(b, i)
		if i >= len(b) || b[i] != '"' {
			return
		}
		ks := i
		i = skipString(b, i)
		if i > len(b) || i-ks < 2 || b[i-1] != '"' {
			return
		}
		key := b[ks+1 : i-1]
		i = skipSpace(b, i)
		if i >= len(b) || b[i] != ':' {
			return
		}
		i = skipSpace(b, i+1)
		vs := i
		i = skipValue(b, i)
		if i <= vs || i > len(b) {
			return
		}
		fn(key, b[vs:i])
		i = skipSpace(b, i)
		if i >= len(b) || b[i] != ',' {
			return
		}
		i++
	}
}

// jsonInt reads a non-negative JSON integer; -1 for anything else.
func jsonInt(v []byte) int64 {
	if len(v) == 0 || len(v) > 18 {
		return -1
	}
	var n int64
	for _, c := range v {
		if c < '0' || c > '9' {
			return -1
		}
		n = n*10 + int64(c-'0')
	}
	return n
}

// statusForErrorType maps the error type an upstream names in a JSON body or
// SSE error event to the HTTP status it stands for.
func statusForErrorType(t string) int {
	switch strings.ToLower(t) {
	case "overloaded_error", "overloaded", "server_is_overloaded", "unavailable", "service_unavailable":
		return 529
	case "rate_limit_error", "rate_limit_exceeded", "resource_exhausted", "insufficient_quota", "too_many_requests":
		return 429
	case "authentication_error", "invalid_api_key", "unauthenticated":
		return 401
	case "billing_error", "payment_required":
		return 402
	case "permission_error", "permission_denied":
		return 403
	case "not_found_error", "model_not_found", "not_found":
		return 404
	case "invalid_request_error", "invalid_argument", "context_length_exceeded":
		return 400
	case "request_too_large":
		return 413
	case "timeout_error", "deadline_exceeded":
		return 504
	}
	return 502
}

// upstreamError is the error an upstream put in a JSON body or SSE event.
type upstreamError struct {
	status  int
	message string
}

// parseErrorDoc recognises an error document in any of the protocols'
// shapes: {"type":"error","error":{...}}, {"error":{...}},
// {"type":"response.failed","response":{"error":{...}}} and
// {"type":"error","code":...,"message":...}. ok is false for anything else.
func parseErrorDoc(data []byte) (upstreamError, bool) {
	if !bytes.Contains(data, errorMarker) && !bytes.Contains(data, anthropicErrorTag) && !bytes.Contains(data, []byte("response.failed")) {
		return upstreamError{}, false
	}
	type detail struct {
		Type    string          `json:"type"`
		Code    json.RawMessage `json:"code"`
		Status  string          `json:"status"`
		Message string          `json:"message"`
	}
	var doc struct {
		Type     string          `json:"type"`
		Error    json.RawMessage `json:"error"`
		Code     json.RawMessage `json:"code"`
		Message  string          `json:"message"`
		Response *struct {
			Error *detail `json:"error"`
		} `json:"response"`
	}
	if json.Unmarshal(data, &doc) != nil {
		return upstreamError{}, false
	}
	var d detail
	switch {
	case len(doc.Error) > 0 && doc.Error[0] == '{':
		if json.Unmarshal(doc.Error, &d) != nil {
			return upstreamError{}, false
		}
	case len(doc.Error) > 0 && doc.Error[0] == '"':
		json.Unmarshal(doc.Error, &d.Message)
	case doc.Type == "response.failed" && doc.Response != nil && doc.Response.Error != nil:
		d = *doc.Response.Error
	case doc.Type == "error":
		d = detail{Code: doc.Code, Message: doc.Message}
	default:
		return upstreamError{}, false
	}
	status := 0
	var code string
	if len(d.Code) > 0 {
		if n, err := strconv.Atoi(string(d.Code)); err == nil && n >= 400 && n < 600 {
			status = n
		} else {
			json.Unmarshal(d.Code, &code)
		}
	}
	if status == 0 {
		status = statusForErrorType(firstNonEmpty(d.Type, code, d.Status))
	}
	if status == 502 && code != "" {
		status = statusForErrorType(code)
	}
	return upstreamError{status: status, message: firstNonEmpty(d.Message, d.Type, code, "upstream error")}, true
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

// handleModels answers GET /v1/models from the configuration: Anthropic's
// shape when the client sent anthropic-version, OpenAI's otherwise.
func (rl *relay) handleModels() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		anthropic := r.Header.Get("Anthropic-Version") != ""
		p := protoOpenAI
		if anthropic {
			p = protoAnthropic
		}
		if _, ok := rl.auth.identify(r, p); !ok {
			writeError(w, p, http.StatusUnauthorized, rl.auth.denyMessage(r))
			return
		}
		models := rl.sel.current().routes[p].models
		w.Header().Set("Content-Type", "application/json")
		if anthropic {
			type model struct {
				Type        string `json:"type"`
				ID          string `json:"id"`
				DisplayName string `json:"display_name"`
				CreatedAt   string `json:"created_at"`
			}
			data := make([]model, 0, len(models))
			for _, m := range models {
				data = append(data, model{Type: "model", ID: m, DisplayName: m, CreatedAt: "1970-01-01T00:00:00Z"})
			}
			resp := map[string]any{"data": data, "has_more": false, "first_id": nil, "last_id": nil}
			if len(models) > 0 {
				resp["first_id"], resp["last_id"] = models[0], models[len(models)-1]
			}
			json.NewEncoder(w).Encode(resp)
			return
		}
		type model struct {
			ID      string `json:"id"`
			Object  string `json:"object"`
			Created int64  `json:"created"`
			OwnedBy string `json:"owned_by"`
		}
		data := make([]model, 0, len(models))
		for _, m := range models {
			data = append(data, model{ID: m, Object: "model", OwnedBy: "ccload"})
		}
		json.NewEncoder(w).Encode(map[string]any{"object": "list", "data": data})
	})
}

// clientPath returns the decoded path a client asked for, checked so that
// appending it to a channel's base path can never leave that base: every
// segment is decoded once, and a segment that is "." or "..", or that
// decodes to hold a slash or backslash, is refused. Without this,
// /v1beta/models/x:a%2F..%2F..%2Fanything reached the upstream as
// <base>/v1beta/models/x:a/../../anything, with the channel's key on it.
func clientPath(escaped string) (string, bool) {
	if escaped == "" || escaped[0] != '/' {
		return "", false
	}
	if strings.IndexByte(escaped, '%') < 0 && strings.IndexByte(escaped, '\\') < 0 &&
		!strings.Contains(escaped, "/.") {
		return escaped, true // the common case: nothing to decode or check
	}
	var b strings.Builder
	for seg := range strings.SplitSeq(escaped[1:], "/") {
		d, err := url.PathUnescape(seg)
		if err != nil || d == "." || d == ".." || strings.ContainsAny(d, "/\\") {
			return "", false
		}
		b.WriteByte('/')
		b.WriteString(d)
	}
	return b.String(), true
}

// withModel returns body with its model value replaced: every other byte
// stays as the client sent it.
func withModel(body []byte, info bodyInfo, model string) []byte {
	q, _ := json.Marshal(model)
	out := make([]byte, 0, len(body)-(info.modelEnd-info.modelStart)+len(q))
	out = append(out, body[:info.modelStart]...)
	out = append(out, q...)
	return append(out, body[info.modelEnd:]...)
}
