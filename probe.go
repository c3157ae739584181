package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"
)

// The channel test (POST /admin/channels/{id}/test): one minimal real
// request through one channel and key, sent and judged by the same code as
// a client's request, so that the test and the relay never disagree about
// what a working channel is.

// testResult is the test's answer.
type testResult struct {
	OK        bool   `json:"ok"`
	Status    int    `json:"status"`
	LatencyMS int64  `json:"latency_ms"`
	Model     string `json:"model"`
	KeyIndex  int    `json:"key_index"`
	Message   string `json:"message"`
}

// defaultTestModel is what a test asks for when neither the request nor the
// channel names a model.
var defaultTestModel = map[protocol]string{
	protoAnthropic: "claude-haiku-4-5",
	protoOpenAI:    "gpt-5-codex",
	protoGemini:    "gemini-2.5-flash",
}

// testModel picks the model to test c with: the one asked for, else the
// channel's first listed model, else its first redirect (by name, so the
// choice is the same every time), else the protocol's default.
func testModel(c Channel, p protocol, asked string) string {
	switch {
	case asked != "":
		return asked
	case len(c.Models) > 0:
		return c.Models[0]
	case len(c.ModelRedirects) > 0:
		names := make([]string, 0, len(c.ModelRedirects))
		for m := range c.ModelRedirects {
			names = append(names, m)
		}
		return slices.Min(names)
	}
	return defaultTestModel[p]
}

// probe sends one minimal request through channel c with key k, the way a
// client's request goes (prepare, accept, judge), and reports what
// happened. A success clears the channel's cooldowns like any success; a
// failure cools nothing, since a person is probing. Nothing is logged.
func (rl *relay) probe(ctx context.Context, c Channel, k int, model string) testResult {
	p, err := parseChannelType(c.Type)
	if err != nil {
		return testResult{KeyIndex: k, Message: err.Error()}
	}
	model = testModel(c, p, model)
	res := testResult{Model: model, KeyIndex: k}
	e := rl.sel.current().byID[c.ID]
	if e == nil || e.ch.URL != c.URL || !slices.Equal(e.ch.APIKeys, c.APIKeys) {
		// A disabled channel is in no snapshot; test it all the same.
		if e, err = newEntry(c, rl.cool.get(c.ID)); err != nil {
			res.Message = err.Error()
			return res
		}
	}
	q, _ := json.Marshal(model)
	var path, body string
	switch p {
	case protoOpenAI:
		path, body = "/v1/responses", `{"model":`+string(q)+`,"input":"ping","max_output_tokens":16}`
	case protoGemini:
		path, body = "/v1beta/models/"+model+":generateContent", `{"contents":[{"parts":[{"text":"ping"}]}]}`
	default:
		path, body = "/v1/messages", `{"model":`+string(q)+`,"max_tokens":8,"messages":[{"role":"user","content":"ping"}]}`
	}
	x := &exchange{start: rl.Now(), proto: p, probe: true, served: -1, model: model,
		responses: p == protoOpenAI, body: []byte(body), path: path}
	x.tries = x.tryBuf[:0]
	if p == protoGemini {
		x.gemAction = "generateContent"
	} else if x.info, err = inspectBody(x.body); err != nil {
		res.Message = err.Error()
		return res
	}
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://ccload.invalid"+path, nil)
	if err != nil {
		res.Message = err.Error()
		return res
	}
	req.Header.Set("Content-Type", "application/json")
	if p == protoAnthropic {
		req.Header.Set("Anthropic-Version", "2023-06-01")
	}

	answer, v, err := rl.attempt(req, x, e, k)
	if answer != nil && v.scope == scopeNone {
		// Read the answer through, as a client would: a body that breaks
		// off is a failure too (settle judges it).
		io.Copy(io.Discard, io.LimitReader(answer.Body, 1<<20))
		answer.Body.Close()
	} else if answer != nil {
		answer.Body.Close()
	}
	t := x.tries[0]
	res.LatencyMS = t.dur.Milliseconds()
	switch {
	case err != nil:
		res.Message = "the test was cancelled"
	case v.scope != scopeNone:
		res.Status, res.Message = v.status, v.reason
	default:
		res.Status = x.status
		res.OK = x.status >= 200 && x.status < 300
		res.Message = "ok"
		if !res.OK {
			res.Message = strings.TrimSpace(firstNonEmpty(x.errText, fmt.Sprintf("%d %s", x.status, http.StatusText(x.status))))
		}
	}
	res.Message = truncate(res.Message, 300)
	return res
}
