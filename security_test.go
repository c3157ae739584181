package main

import (
	"net/http"
	"net/url"
	"path"
	"strings"
	"testing"
)

// Each test here is one attack from issue 17, named after it. Each failed
// before its fix.

// TestPathEscapeThroughEncodedDotSegments: a token holder made the
// channel's key call any path of the upstream host by putting encoded dot
// segments and slashes in the part of the path ccload appends.
func TestPathEscapeThroughEncodedDotSegments(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "gem", Type: "gemini", URL: up.URL + "/base", APIKeys: []string{"gem-key-0123456789"}})
	e.addChannel(Channel{Name: "oai", Type: "openai", URL: up.URL + "/base", APIKeys: []string{"oai-key-0123456789"}})
	for _, p := range []string{
		"/v1beta/models/x:a%2F..%2F..%2F..%2F..%2Fanything",
		"/v1beta/models/x:a%2f..%2f..%2fanything",
		"/v1beta/models/x:a%5C..%5C..%5Canything",
		"/v1/responses/..%2F..%2Fx",
		"/v1/responses/%2E%2E/%2e%2e/x",
		"/v1/responses/a%5Cb",
	} {
		body := `{"model":"x","input":"hi"}`
		if strings.HasPrefix(p, "/v1beta/") {
			body = `{"contents":[{"parts":[{"text":"hi"}]}]}`
		}
		resp, b := e.do("POST", p, body, nil)
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("POST %s: got %d %s; want 400", p, resp.StatusCode, b)
		}
	}
	if n := up.count(); n != 0 {
		t.Errorf("the upstream got %d requests; want none: %+v", n, up.requests())
	}
	// A plain path still goes through, under the base.
	resp, b := e.do("POST", "/v1beta/models/gemini-x:generateContent", `{"contents":[{"parts":[{"text":"hi"}]}]}`, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("plain path: got %d %s", resp.StatusCode, b)
	}
	if got := up.requests()[0].Path; got != "/base/v1beta/models/gemini-x:generateContent" {
		t.Errorf("sent path %q; want it under /base", got)
	}
}

// FuzzUpstreamPath: whatever the client's path, the path ccload sends stays
// under the channel's base path once the upstream resolves it.
func FuzzUpstreamPath(f *testing.F) {
	for _, s := range []string{"/v1/messages", "/v1beta/models/x:a%2F..%2F..%2Fy", "/v1/responses/..%2F..%2Fx",
		"/v1/responses/%2e%2e", "/a/./b", "/a%5C..", "/a/%252e%252e/b", "//x/../../y", "/%zz"} {
		f.Add("/base/v", s)
	}
	f.Fuzz(func(t *testing.T, base, escaped string) {
		base = path.Clean("/" + base)
		p, ok := clientPath(escaped)
		if !ok {
			return
		}
		u := url.URL{Scheme: "http", Host: "up.example", Path: base + p}
		// What the upstream sees: the escaped path, decoded and resolved.
		sent, err := url.Parse(u.String())
		if err != nil {
			t.Fatalf("sent URL %q does not parse: %v", u.String(), err)
		}
		got := path.Clean(sent.Path)
		if got != base && !strings.HasPrefix(got, strings.TrimSuffix(base, "/")+"/") {
			t.Fatalf("client path %q resolved to %q, outside the base %q", escaped, got, base)
		}
	})
}
