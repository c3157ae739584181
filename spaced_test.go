package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
)

// TestSpacedStreamsRelayed sends streams the way upstreams on Python
// frameworks write them (json.dumps separators; with Bare, no event: lines
// and no [DONE]) through ccload: each must be relayed whole, its end seen
// (no error event appended), and its usage logged.
func TestSpacedStreamsRelayed(t *testing.T) {
	cases := []struct {
		name, typ, path, body string
		last                  string // the stream's final event, as the upstream wrote it
		cacheWrite            int64
	}{
		{"anthropic", "anthropic", "/v1/messages", anthropicBody("claude-x", true), `data: {"type": "message_stop"}`, fakeCacheWrite},
		{"chat", "openai", "/v1/chat/completions", `{"model":"gpt-x","stream":true,"messages":[]}`, `"completion_tokens": 34`, 0},
		{"responses", "openai", "/v1/responses", `{"model":"gpt-x","stream":true,"input":"hi"}`, `data: {"type": "response.completed"`, 0},
	}
	for _, tc := range cases {
		for _, b := range []fakeBehavior{{Spaced: true}, {Spaced: true, Bare: true}} {
			t.Run(fmt.Sprintf("%s/bare=%v", tc.name, b.Bare), func(t *testing.T) {
				e := newTestEnv(t)
				up := newFakeUpstream(t, "py")
				up.set(b)
				e.addChannel(Channel{Name: "py", URL: up.URL, Type: tc.typ})
				resp, body := e.post(tc.path, tc.body)
				if resp.StatusCode != 200 || up.count() != 1 {
					t.Fatalf("status %d, %d upstream hits; want 200, 1: %s", resp.StatusCode, up.count(), body)
				}
				if n := bytes.Count(body, []byte(`"Hello"`)); n != 3 {
					t.Errorf("%d deltas relayed; want 3:\n%s", n, body)
				}
				events := bytes.Split(bytes.TrimSuffix(body, []byte("\n\n")), []byte("\n\n"))
				if last := events[len(events)-1]; b.Bare && !bytes.Contains(last, []byte(tc.last)) {
					t.Errorf("stream ends with %q; want the upstream's own last event (%s)", last, tc.last)
				}
				// (The Responses events carry "error": null; an error event
				// carries an object there.)
				if bytes.Contains(body, []byte("before it finished")) || bytes.Contains(body, []byte(`"error": {`)) ||
					bytes.Contains(body, []byte(`"error":{`)) || bytes.Contains(body, []byte("response.failed")) {
					t.Errorf("an error event was appended to a stream that ended properly:\n%s", body)
				}
				l := e.lastLog()
				if l.Status != 200 || !l.Stream || l.Error != "" || l.InputTokens != fakeInputTokens ||
					l.OutputTokens != fakeOutputTokens || l.CacheRead != fakeCacheRead || l.CacheWrite != tc.cacheWrite {
					t.Errorf("log %+v; want 200, no error, usage %d/%d/%d/%d", l,
						fakeInputTokens, fakeOutputTokens, fakeCacheRead, tc.cacheWrite)
				}
			})
		}
	}
}

// TestSpacedRoleChunkThenErrorFailsOver: a spaced chunk that only names the
// assistant's role is not content yet, so an error right after it still
// fails over unseen.
func TestSpacedRoleChunkThenErrorFailsOver(t *testing.T) {
	e := newTestEnv(t)
	bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, `data: {"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}`+"\n\n"+
			`data: {"error": {"message": "overloaded", "type": "server_error"}}`+"\n\n")
	}))
	defer bad.Close()
	good := newFakeUpstream(t, "good")
	e.addChannel(Channel{Name: "bad", URL: bad.URL, Type: "openai", Priority: 1})
	e.addChannel(Channel{Name: "good", URL: good.URL, Type: "openai"})
	resp, body := e.post("/v1/chat/completions", `{"model":"gpt-x","stream":true,"messages":[]}`)
	if resp.StatusCode != 200 || good.count() != 1 || bytes.Contains(body, []byte("overloaded")) {
		t.Errorf("status %d, good hits %d; want 200, 1 and no error relayed:\n%s", resp.StatusCode, good.count(), body)
	}
}
