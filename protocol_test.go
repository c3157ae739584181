package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestInspectBody(t *testing.T) {
	cases := []struct {
		body   string
		model  string
		has    bool
		stream bool
		err    string
	}{
		{`{"model":"claude-x","stream":true}`, "claude-x", true, true, ""},
		{` { "stream" : false , "model" : "m" } `, "m", true, false, ""},
		{`{"messages":[{"model":"inner"}],"metadata":{"model":"meta"},"model":"outer"}`, "outer", true, false, ""},
		{`{"system":"say \"model\": \"x\"","model":"m"}`, "m", true, false, ""},
		{`{"mod\u0065l":"escaped-key"}`, "escaped-key", true, false, ""},
		{`{"model":"caf\u00e9"}`, "café", true, false, ""},
		{`{"stream":"true","model":"m"}`, "m", true, false, ""},
		{`{"model":null}`, "", false, false, ""},
		{`{}`, "", false, false, ""},
		{`{"model":42}`, "", false, false, "must be a string"},
		{`{"model":["a"]}`, "", false, false, "must be a string"},
		{`[1,2]`, "", false, false, "JSON object"},
		{`"model"`, "", false, false, "JSON object"},
		{`{"model":"a",}`, "", false, false, "invalid character '}' looking for beginning of object key string at byte 13"},
		{`{"model":"a"`, "", false, false, "unexpected end of JSON input"},
		{`{"model":"a\x"}`, "", false, false, "in string escape code"},
		{`{"model":"a"} x`, "", false, false, "after top-level value"},
		{strings.Repeat("[", 10001) + strings.Repeat("]", 10001), "", false, false, "exceeded max depth"},
		{`{"model":"a","model":"b"}`, "b", true, false, ""},
	}
	for _, tc := range cases {
		info, err := inspectBody([]byte(tc.body))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("inspectBody(%s) error %v; want %q", tc.body, err, tc.err)
			}
			continue
		}
		if err != nil || info.model != tc.model || (info.modelEnd > 0) != tc.has || info.stream != tc.stream {
			t.Errorf("inspectBody(%s) = %+v, %v; want model %q has %v stream %v", tc.body, info, err, tc.model, tc.has, tc.stream)
		}
	}
}

// FuzzInspectBody checks the scanner against encoding/json on any valid
// JSON object, and that withModel changes nothing but the model.
func FuzzInspectBody(f *testing.F) {
	for _, s := range []string{`{"model":"a","stream":true}`, `{"a":1e+5,"b":-0.5,"c":[true,false,null]}`, `{"a":01}`,
		`{"a":"\u00e9\ud83d"}`, `{"a":"tab	in string"}`, `[1,]`, `{"a" 1}`, "\"\xff\"", `{"x":-}`, `{"x":{"model":"b"},"model":"c\"d"}`, `{"stream":1}`,
		`{"a":[1,{"b":"}"}],"model":"m\\"}`, `{"model":"\ud83d\ude00"}`,
		`{"model": "claude-x", "stream": true, "messages": [{"role": "user", "content": "hi"}]}`, "{\r\n\t\"model\" :\n\"m\" }"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		_, err := inspectBody([]byte(body))
		var se *syntaxError
		if syntaxOK := !errors.As(err, &se); syntaxOK != json.Valid([]byte(body)) {
			t.Fatalf("inspectBody(%q): syntax verdict %v (%v); json.Valid says %v", body, syntaxOK, err, !syntaxOK)
		}
		if se != nil {
			return
		}
		// A map, not a struct: struct fields match keys case-insensitively,
		// and the APIs do not.
		var want map[string]any
		info, err := inspectBody([]byte(body))
		if !strings.HasPrefix(strings.TrimLeft(body, " \t\r\n"), "{") {
			if !errors.Is(err, errNotObject) {
				t.Fatalf("inspectBody(%s) = %v; want errNotObject", body, err)
			}
			return
		}
		json.Unmarshal([]byte(body), &want)
		m, isString := want["model"].(string)
		if err != nil {
			if isString || want["model"] == nil {
				t.Fatalf("inspectBody(%s): %v", body, err)
			}
			return
		}
		if info.model != m || (info.modelEnd > 0) != isString || info.stream != (want["stream"] == true) {
			t.Fatalf("inspectBody(%s) = %+v; encoding/json says model %v stream %v", body, info, want["model"], want["stream"])
		}
		if info.modelEnd > 0 {
			out := withModel([]byte(body), info, "new-model")
			var got map[string]any
			var orig map[string]any
			json.Unmarshal([]byte(body), &orig)
			if err := json.Unmarshal(out, &got); err != nil || got["model"] != "new-model" {
				t.Fatalf("withModel(%s) = %s", body, out)
			}
			delete(got, "model")
			delete(orig, "model")
			a, _ := json.Marshal(got)
			b, _ := json.Marshal(orig)
			if string(a) != string(b) {
				t.Fatalf("withModel changed more than the model: %s -> %s", body, out)
			}
		}
	})
}

func TestParseErrorDoc(t *testing.T) {
	cases := []struct {
		doc    string
		ok     bool
		status int
		msg    string
	}{
		{`{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}`, true, 529, "Overloaded"},
		{`{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}`, true, 429, "slow down"},
		{`{"error":{"message":"Incorrect API key","type":"invalid_request_error","code":"invalid_api_key"}}`, true, 400, "Incorrect API key"},
		{`{"error":{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}}`, true, 429, "quota"},
		{`{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}`, true, 503, "The model is overloaded."},
		{`{"error":{"code":429,"message":"Resource exhausted","status":"RESOURCE_EXHAUSTED"}}`, true, 429, "Resource exhausted"},
		{`{"type":"response.failed","response":{"status":"failed","error":{"code":"server_error","message":"boom"}}}`, true, 502, "boom"},
		{`{"type":"response.failed","response":{"error":{"code":"rate_limit_exceeded","message":"rl"}}}`, true, 429, "rl"},
		{`{"type":"error","code":"server_is_overloaded","message":"busy"}`, true, 529, "busy"},
		{`{"error":"plain string"}`, true, 502, "plain string"},
		{`{"id":"msg_1","type":"message","content":[]}`, false, 0, ""},
		{`{"choices":[{"delta":{"content":"the error was"}}]}`, false, 0, ""},
		{`not json with "error"`, false, 0, ""},
	}
	for _, tc := range cases {
		e, ok := parseErrorDoc([]byte(tc.doc))
		if ok != tc.ok || (ok && (e.status != tc.status || e.message != tc.msg)) {
			t.Errorf("parseErrorDoc(%s) = %+v, %v; want %d %q %v", tc.doc, e, ok, tc.status, tc.msg, tc.ok)
		}
	}
}

func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	cases := []struct {
		h    http.Header
		want time.Duration
	}{
		{http.Header{"Retry-After": {"17"}}, 17 * time.Second},
		{http.Header{"Retry-After": {now.Add(2 * time.Minute).Format(http.TimeFormat)}}, 2 * time.Minute},
		{http.Header{"Retry-After-Ms": {"1500"}, "Retry-After": {"9"}}, 1500 * time.Millisecond},
		{http.Header{"X-Ratelimit-Reset-Requests": {"6m0s"}, "X-Ratelimit-Reset-Tokens": {"20ms"}}, 6 * time.Minute},
		{http.Header{"Anthropic-Ratelimit-Requests-Reset": {now.Add(40 * time.Second).Format(time.RFC3339)}}, 40 * time.Second},
		{http.Header{"Retry-After": {"soon"}}, 0},
		{http.Header{}, 0},
	}
	for _, tc := range cases {
		if got := retryAfter(tc.h, 429, now); got != tc.want {
			t.Errorf("retryAfter(%v) = %s; want %s", tc.h, got, tc.want)
		}
	}
	// Rate-limit reset headers come with every response; only a 429 is
	// about them. Retry-After counts on any status.
	reset := http.Header{"X-Ratelimit-Reset-Requests": {"6m0s"}, "Anthropic-Ratelimit-Tokens-Reset": {now.Add(time.Minute).Format(time.RFC3339)}}
	if got := retryAfter(reset, 503, now); got != 0 {
		t.Errorf("reset headers on a 503: %s; want 0", got)
	}
	if got := retryAfter(http.Header{"Retry-After": {"7"}}, 503, now); got != 7*time.Second {
		t.Errorf("Retry-After on a 503: %s; want 7s", got)
	}
}

func TestClassifyEvent(t *testing.T) {
	cases := []struct {
		p          protocol
		name, data string
		want       eventKind
	}{
		{protoAnthropic, "ping", `{"type":"ping"}`, evPreamble},
		{protoAnthropic, "message_start", `{"type":"message_start"}`, evPreamble},
		{protoAnthropic, "content_block_start", `{}`, evPreamble},
		{protoAnthropic, "content_block_delta", `{}`, evContent},
		{protoAnthropic, "message_delta", `{}`, evContent},
		{protoAnthropic, "message_stop", `{}`, evEnd},
		{protoAnthropic, "error", `{"type":"error","error":{}}`, evError},
		{protoAnthropic, "", `{"type":"content_block_delta","delta":{}}`, evContent}, // no event: line
		{protoAnthropic, "", `{"type":"error","error":{"type":"overloaded_error"}}`, evError},
		{protoOpenAI, "", `{"choices":[{"delta":{"role":"assistant"},"finish_reason":null}]}`, evContent},
		{protoOpenAI, "", `{"choices":[{"delta":{},"finish_reason":"stop"}]}`, evEnd},
		{protoOpenAI, "", `[DONE]`, evEnd},
		{protoOpenAI, "", `{"error":{"message":"x","type":"server_error"}}`, evError},
		{protoOpenAI, "response.created", `{}`, evPreamble},
		{protoOpenAI, "response.in_progress", `{}`, evPreamble},
		{protoOpenAI, "response.output_text.delta", `{}`, evContent},
		{protoOpenAI, "response.completed", `{}`, evEnd},
		{protoOpenAI, "response.failed", `{}`, evError},
		{protoOpenAI, "error", `{}`, evError},
		{protoGemini, "", `{"candidates":[]}`, evContent},
		{protoGemini, "", `{"error":{"code":503}}`, evError},
		// As upstreams on Python frameworks write them: json.dumps puts a
		// space after every ',' and ':', and some leave out event: lines.
		{protoAnthropic, "", `{"type": "message_start", "message": {"usage": {"input_tokens": 5}}}`, evPreamble},
		{protoAnthropic, "", `{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "a"}}`, evContent},
		{protoAnthropic, "", `{"type": "message_delta", "usage": {"output_tokens": 9}}`, evContent},
		{protoAnthropic, "", `{"type": "message_stop"}`, evEnd},
		{protoAnthropic, "", " {\r\n\t\"type\" :\n \"message_stop\" }", evEnd},
		{protoAnthropic, "", `{"type": "error", "error": {"type": "overloaded_error"}}`, evError},
		{protoOpenAI, "", `{"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}`, evPreamble},
		{protoOpenAI, "", `{"choices": [{"delta": {"role" : "assistant", "content" : null}}]}`, evPreamble},
		{protoOpenAI, "", `{"choices": [{"delta": {"role": "assistant", "content": "hi"}}]}`, evContent},
		{protoOpenAI, "", `{"choices": [{"delta": {"content": "hi"}, "finish_reason": null}]}`, evContent},
		{protoOpenAI, "", `{"choices": [{"delta": {}, "finish_reason": "stop"}]}`, evEnd},
		{protoOpenAI, "", "{\"choices\":[{\"finish_reason\"\n:\t\"length\"}]}", evEnd},
		{protoOpenAI, "", `{"type": "response.created", "response": {}}`, evPreamble},
		{protoOpenAI, "", `{"type": "response.output_text.delta", "delta": "a"}`, evContent},
		{protoOpenAI, "", `{"type": "response.completed", "response": {}}`, evEnd},
		// A text that merely mentions the members is content.
		{protoOpenAI, "", `{"choices": [{"delta": {"content": "\"finish_reason\": \"stop\""}}]}`, evContent},
	}
	for _, tc := range cases {
		if got := classifyEvent(tc.p, []byte(tc.name), []byte(tc.data)); got != tc.want {
			t.Errorf("classifyEvent(%s, %q, %s) = %d; want %d", tc.p, tc.name, tc.data, got, tc.want)
		}
	}
}

func TestUsageAbsorb(t *testing.T) {
	cases := []struct {
		name   string
		events []string
		want   usage
	}{
		{"anthropic stream", []string{
			`{"type":"message_start","message":{"usage":{"input_tokens":10,"cache_creation_input_tokens":3,"cache_read_input_tokens":4,"output_tokens":1}}}`,
			`{"type":"content_block_delta","delta":{"text":"the usage of words"}}`,
			`{"type":"message_delta","usage":{"output_tokens":25}}`,
		}, usage{Input: 10, Output: 25, CacheRead: 4, CacheWrite: 3}},
		{"openai chat", []string{
			`{"choices":[{"delta":{"content":"hi"}}]}`,
			`{"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":20}}}`,
		}, usage{Input: 10, Output: 7, CacheRead: 20}},
		{"responses", []string{
			`{"type":"response.completed","response":{"usage":{"input_tokens":50,"output_tokens":9,"input_tokens_details":{"cached_tokens":40}}}}`,
		}, usage{Input: 10, Output: 9, CacheRead: 40}},
		{"gemini", []string{
			`{"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":2}}`,
			`{"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":6,"thoughtsTokenCount":4,"cachedContentTokenCount":3}}`,
		}, usage{Input: 5, Output: 10, CacheRead: 3}},
	}
	for _, tc := range cases {
		var u usage
		for _, ev := range tc.events {
			u.absorb([]byte(ev))
		}
		if u != tc.want {
			t.Errorf("%s: %+v; want %+v", tc.name, u, tc.want)
		}
	}
}

func TestUsageFromTail(t *testing.T) {
	long := strings.Repeat("x", 10000)
	cases := []struct {
		body string
		want usage
	}{
		{`{"content":[{"text":"` + long + `"}],"usage":{"input_tokens":3,"output_tokens":4,"cache_read_input_tokens":1}}`, usage{Input: 3, Output: 4, CacheRead: 1}},
		{`{"output":[],"usage":{"input_tokens":9,"output_tokens":2,"input_tokens_details":{"cached_tokens":5}},"user":null,"metadata":{}}`, usage{Input: 4, Output: 2, CacheRead: 5}},
		{`{"candidates":[],"usageMetadata":{"promptTokenCount":7,"candidatesTokenCount":1}}`, usage{Input: 7, Output: 1}},
		{`{"text":"no counts here"}`, usage{}},
	}
	for _, tc := range cases {
		b := []byte(tc.body)
		if len(b) > tailSize {
			b = b[len(b)-tailSize:]
		}
		if got := usageFromTail(b); got != tc.want {
			t.Errorf("usageFromTail(%.50s…) = %+v; want %+v", tc.body, got, tc.want)
		}
	}
}

func TestErrorShapes(t *testing.T) {
	for _, p := range []protocol{protoAnthropic, protoOpenAI, protoGemini} {
		b := errorBody(p, 503, `quote " and newline`+"\n")
		if e, ok := parseErrorDoc(b); !ok || e.message != `quote " and newline`+"\n" {
			t.Errorf("%s error body %s does not read back", p, b)
		}
		for _, rs := range []*responsesState{nil, newResponsesState()} {
			ev := streamErrorEvent(p, rs, "cut", usage{})
			_, data := lastEvent(ev)
			if e, ok := parseErrorDoc(data); !ok || e.message != "cut" || !strings.HasSuffix(string(ev), "\n\n") {
				t.Errorf("%s stream error event %q does not read back", p, ev)
			}
		}
	}
}

func TestMaskKey(t *testing.T) {
	for in, want := range map[string]string{
		"sk-ant-api03-abcdefghijklmnop9Yz": "sk-a…9Yz",
		"shortkey12":                       "…12",
		"abc":                              "…",
	} {
		if got := maskKey(in); got != want {
			t.Errorf("maskKey(%q) = %q; want %q", in, got, want)
		}
	}
}

// FuzzUsageAbsorb feeds upstream-shaped bytes to the usage scanner, which
// reads untrusted data: it must never panic or hang, and never count
// negative tokens; and on valid JSON it must count what refAbsorb, the
// same rules read with encoding/json, counts.
func FuzzUsageAbsorb(f *testing.F) {
	for _, s := range []string{
		`{"type":"message_start","message":{"usage":{"input_tokens":10,"cache_read_input_tokens":4}}}`,
		`{"usage":{"prompt_tokens":30,"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":20}}}`,
		`{"response":{"usage":{"input_tokens":50,"input_tokens_details":{"cached_tokens":40}}}}`,
		`{"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":6}}`,
		`{"usage":{"input_tokens":`, `{"usage":"x","usage":{"output_tokens":-5}}`, `{"usage" {`,
		// Spaced, as json.dumps writes it, and spread over lines.
		`{"type": "message_delta", "usage": {"output_tokens": 25, "input_tokens": 0}}`,
		`{"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 20}}}`,
		"{\n\t\"response\" : {\r\n\"usage\" :{ \"input_tokens\" : 50 , \"input_tokens_details\" : { \"cached_tokens\" : 40 } } } }",
		`{"candidates": [], "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 6, "thoughtsTokenCount": 2}}`,
		// The edges of refAbsorb's rules.
		`{"us\u0061ge":{"input_tokens":7},"usage":null,"message":"x","usageMetadata":[]}`,
		`{"usage":{"input_tokens":5,"input_tokens":"5","output_tokens":1.0,"cache_read_input_tokens":1234567890123456789}}`,
		`{"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":5},"prompt_tokens_details":null}}`,
		`{"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":4},"prompt_tokens_details":{"cached_tokens":2}}}`,
		`{"message":{"usage":{"input_tokens":3},"usage":{"output_tokens":4}},"usage":{"input_tokens":6},"message":{"usage":{"input_tokens":8}}}`,
		`{"usageMetadata":{"promptTokenCount":3,"cachedContentTokenCount":5},"usageMetadata":{"candidatesTokenCount":2}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		// Counts from an earlier event, so a document that reports
		// nothing, or no figure for a column, shows it leaves them.
		before := usage{Input: 1, Output: 2, CacheRead: 3, CacheWrite: 4}
		u := before
		u.absorb(data)
		_ = usageFromTail(data)
		if u.Input < 0 || u.Output < 0 || u.CacheRead < 0 || u.CacheWrite < 0 {
			t.Fatalf("negative counts %+v from %q", u, data)
		}
		if !json.Valid(data) {
			return
		}
		if want := refAbsorb(before, data); u != want {
			t.Fatalf("absorb(%s) = %+v; encoding/json reads %+v", data, u, want)
		}
	})
}

// claudeCodeBody is a request shaped like Claude Code's, of about size
// bytes: the model first, then a long conversation (text with newlines,
// quotes and non-ASCII, tool calls and their results), the system prompt,
// the tools with their JSON schemas, and metadata at the end.
func claudeCodeBody(size int) []byte {
	text := func(n int) string {
		const line = `Read the file, then explain: \"why\" does ` + "`go test`" + ` fail? 函数返回错误。\n`
		return strings.Repeat(line, max(1, n/len(line)))
	}
	var b strings.Builder
	b.WriteString(`{"model":"claude-sonnet-4-5-20250929","max_tokens":32000,"stream":true,"messages":[`)
	for i := 0; b.Len() < size*4/5; i++ {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"role":"user","content":[{"type":"text","text":"%s"}]},`, text(2000))
		fmt.Fprintf(&b, `{"role":"assistant","content":[{"type":"text","text":"%s"},`+
			`{"type":"tool_use","id":"toolu_%03d","name":"Read","input":{"file_path":"/src/proxy.go","offset":%d,"limit":200}}]},`, text(300), i, i*200)
		fmt.Fprintf(&b, `{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_%03d","content":"%s","is_error":false}]}`, i, text(3000))
	}
	fmt.Fprintf(&b, `],"system":[{"type":"text","text":"You are Claude Code, Anthropic's official CLI for Claude."},`+
		`{"type":"text","text":"%s","cache_control":{"type":"ephemeral"}}],"tools":[`, text(size/10))
	for i := 0; b.Len() < size-200; i++ {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"name":"Tool%d","description":"%s","input_schema":{"type":"object","properties":{"path":{"type":"string","description":"Absolute path"},`+
			`"limit":{"type":"number"},"flags":{"type":"array","items":{"type":"boolean"}}},"required":["path"],"additionalProperties":false}}`, i, text(400))
	}
	b.WriteString(`],"metadata":{"user_id":"user_2f6d0c0e5b4a_account_5f1e_session_9b1c4e2a-7d3f-4e8a-b6c5-0a1b2c3d4e5f"}}`)
	return []byte(b.String())
}

// BenchmarkInspectBody is the per-request cost of validating a Claude Code
// request and finding its model and stream flag; BenchmarkJSONValid is
// encoding/json's validator alone on the same bodies. The figures quoted in
// inspectBody's comment and the README come from
//
//	go test -run '^$' -bench 'InspectBody|JSONValid' -count 5
func BenchmarkInspectBody(b *testing.B) {
	for _, size := range []int{100, 200} {
		body := claudeCodeBody(size << 10)
		b.Run(fmt.Sprintf("%dKiB", size), func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			for b.Loop() {
				if info, err := inspectBody(body); err != nil || !(info.modelEnd > 0) || !info.stream {
					b.Fatalf("inspectBody: %+v, %v", info, err)
				}
			}
		})
	}
}

func BenchmarkJSONValid(b *testing.B) {
	for _, size := range []int{100, 200} {
		body := claudeCodeBody(size << 10)
		b.Run(fmt.Sprintf("%dKiB", size), func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			for b.Loop() {
				if !json.Valid(body) {
					b.Fatal("invalid body")
				}
			}
		})
	}
}

// TestClaudeCodeBody keeps the benchmarks' body what they claim: valid JSON
// of the asked size with the members in Claude Code's order.
func TestClaudeCodeBody(t *testing.T) {
	for _, size := range []int{100 << 10, 200 << 10} {
		body := claudeCodeBody(size)
		var doc map[string]json.RawMessage
		if err := json.Unmarshal(body, &doc); err != nil {
			t.Fatalf("%d: %v", size, err)
		}
		if len(body) < size*99/100 || len(body) > size*101/100 {
			t.Errorf("%d bytes; want about %d", len(body), size)
		}
		last := -1
		for _, k := range []string{`"model"`, `"messages"`, `"system"`, `"tools"`, `"metadata"`} {
			i := bytes.Index(body, []byte(k))
			if i <= last {
				t.Errorf("%d: %s at %d, not after the member before it (%d)", size, k, i, last)
			}
			last = i
		}
	}
}

func TestPlainWordMatchesByteTable(t *testing.T) {
	// Every byte value in every position, beside plain filler.
	for pos := range 8 {
		for c := range 256 {
			word := []byte("abcdefgh")
			word[pos] = byte(c)
			want := true
			for _, x := range word {
				want = want && plainStringByte[x]
			}
			if got := plainWord(binary.LittleEndian.Uint64(word)); got != want {
				t.Fatalf("byte %#x at %d: plainWord %v; table says %v", c, pos, got, want)
			}
		}
	}
}
