package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// sseEvents splits a relayed stream into (name, data) pairs.
func sseEvents(body []byte) (names []string, datas [][]byte) {
	for _, ev := range bytes.Split(bytes.TrimSpace(body), []byte("\n\n")) {
		var name string
		var data []byte
		for _, line := range bytes.Split(ev, []byte("\n")) {
			switch {
			case bytes.HasPrefix(line, []byte("event: ")):
				name = string(line[7:])
			case bytes.HasPrefix(line, []byte("data: ")):
				data = line[6:]
			}
		}
		names, datas = append(names, name), append(datas, data)
	}
	return names, datas
}

// TestCutEndsWithCompleteErrorEvent: a stream cut after content began ends
// with the protocol's error event, and for Responses that event is a whole
// response.failed: it continues the sequence, repeats the response's id,
// model and created_at, and carries the output items finished so far. The
// SDK's stream helper rejected the bare one ("Lifecycle response identity
// changed"), and Codex may.
func TestCutEndsWithCompleteErrorEvent(t *testing.T) {
	t.Run("responses", func(t *testing.T) {
		e := newTestEnv(t)
		up := newFakeUpstream(t, "a")
		up.set(fakeBehavior{Deltas: 4, CutAfter: 2})
		e.addChannel(Channel{Name: "a", URL: up.URL, Type: "openai"})
		resp, body := e.post("/v1/responses", `{"model":"gpt-cut","stream":true,"input":"hi"}`)
		names, datas := sseEvents(body)
		if resp.StatusCode != 200 || len(names) < 3 || names[len(names)-1] != "response.failed" {
			t.Fatalf("status %d, events %v; want a stream ending in response.failed", resp.StatusCode, names)
		}
		type ev struct {
			Type     string
			Seq      *int64 `json:"sequence_number"`
			Response struct {
				ID        string
				Model     string
				CreatedAt json.Number `json:"created_at"`
				Status    string
				Output    []json.RawMessage
				Usage     json.RawMessage
				Error     struct{ Code, Message string }
			}
		}
		var first, prev, last ev
		json.Unmarshal(datas[0], &first)
		json.Unmarshal(datas[len(datas)-2], &prev)
		if err := json.Unmarshal(datas[len(datas)-1], &last); err != nil {
			t.Fatalf("response.failed is not JSON: %v: %s", err, datas[len(datas)-1])
		}
		if first.Type != "response.created" || first.Response.ID == "" {
			t.Fatalf("first event %s", datas[0])
		}
		if last.Seq == nil || prev.Seq == nil || *last.Seq != *prev.Seq+1 {
			t.Errorf("response.failed sequence_number %v after %v; want the next one", last.Seq, prev.Seq)
		}
		r := last.Response
		if r.ID != first.Response.ID || r.Model != first.Response.Model || r.CreatedAt != first.Response.CreatedAt ||
			r.Status != "failed" || r.Output == nil || r.Error.Code != "server_error" || !strings.Contains(r.Error.Message, "mid-stream") {
			t.Errorf("response.failed %s; want the id, model and created_at of %s", datas[len(datas)-1], datas[0])
		}
	})

	t.Run("responses carries finished items", func(t *testing.T) {
		rs := newResponsesState()
		for _, d := range []string{
			`{"type":"response.created","sequence_number":0,"response":{"id":"resp_1","created_at":1700000000,"model":"m","output":[]}}`,
			`{"type":"response.output_item.done","sequence_number":7,"item":{"id":"fc_1","type":"function_call","name":"ls"}}`,
			`{"type":"response.output_text.delta","sequence_number":9,"delta":"x"}`,
		} {
			rs.observe([]byte(d))
		}
		ev := rs.failedEvent("cut", usage{Input: 3, CacheRead: 2, Output: 5})
		_, datas := sseEvents(ev)
		var v struct {
			Seq      int64 `json:"sequence_number"`
			Response struct {
				ID     string
				Output []struct{ ID string }
				Usage  struct {
					InputTokens        int64 `json:"input_tokens"`
					OutputTokens       int64 `json:"output_tokens"`
					InputTokensDetails struct {
						CachedTokens int64 `json:"cached_tokens"`
					} `json:"input_tokens_details"`
				}
			}
		}
		if err := json.Unmarshal(datas[0], &v); err != nil {
			t.Fatalf("%v: %s", err, ev)
		}
		if v.Seq != 10 || v.Response.ID != "resp_1" || len(v.Response.Output) != 1 || v.Response.Output[0].ID != "fc_1" ||
			v.Response.Usage.InputTokens != 5 || v.Response.Usage.InputTokensDetails.CachedTokens != 2 || v.Response.Usage.OutputTokens != 5 {
			t.Errorf("response.failed %s", ev)
		}
	})

	for _, tc := range []struct {
		name, typ, path, body, errPrefix string
	}{
		{"anthropic", "anthropic", "/v1/messages", anthropicBody("claude-cut", true), `{"type":"error","error":{"type":"api_error"`},
		{"chat", "openai", "/v1/chat/completions", `{"model":"gpt-cut","stream":true,"messages":[]}`, `{"error":{"message":`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newTestEnv(t)
			up := newFakeUpstream(t, "a")
			up.set(fakeBehavior{Deltas: 4, CutAfter: 2})
			e.addChannel(Channel{Name: "a", URL: up.URL, Type: tc.typ})
			_, body := e.post(tc.path, tc.body)
			names, datas := sseEvents(body)
			last := datas[len(datas)-1]
			if !bytes.HasPrefix(last, []byte(tc.errPrefix)) || (tc.typ == "anthropic" && names[len(names)-1] != "error") {
				t.Errorf("last event %q %s; want %s…", names[len(names)-1], last, tc.errPrefix)
			}
			if !json.Valid(last) {
				t.Errorf("last event is not JSON: %s", last)
			}
		})
	}
}

// An upstream error event mid-stream is the stream's end, even when the
// connection then drops: the client gets that one terminal event, not a
// response.failed of ccload's after it.
func TestErrorEventThenCutEndsOnce(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	up.set(fakeBehavior{Deltas: 4, CutAfter: 2, MidStreamError: true, CutAfterError: true})
	e.addChannel(Channel{Name: "a", URL: up.URL, Type: "openai"})
	resp, body := e.post("/v1/responses", `{"model":"gpt-cut","stream":true,"input":"hi"}`)
	names, _ := sseEvents(body)
	if resp.StatusCode != 200 || len(names) < 3 || names[len(names)-1] != "error" {
		t.Fatalf("status %d, events %v; want the stream to end with the upstream's error event", resp.StatusCode, names)
	}
	for _, n := range names {
		if n == "response.failed" {
			t.Errorf("events %v: a second terminal event after the upstream's error", names)
		}
	}
	if row := e.lastLog(); row.Status == 200 || !strings.Contains(row.Error, "error event mid-stream") {
		t.Errorf("log row status %d error %q; want the error event judged", row.Status, row.Error)
	}
}
