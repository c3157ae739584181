package main

import (
	"bytes"
	"fmt"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
)

// TestBodyClassFits checks the buffer a request body is held in: exact up
// to minPooledBody, then never more than a quarter above the body, in
// whole allocator pages from 32 KiB on, and each class one capacity.
func TestBodyClassFits(t *testing.T) {
	capOf := map[int]int{}
	last := -1
	for n := 0; n <= maxPooledBody+1; n += 1 + n/97 {
		c, size := bodyClass(n)
		switch {
		case n <= minPooledBody || n > maxPooledBody:
			if c != -1 || size != n {
				t.Fatalf("bodyClass(%d) = %d, %d; want exact", n, c, size)
			}
			continue
		case c < 0 || c >= len(bodyPools):
			t.Fatalf("bodyClass(%d) = class %d, outside the %d pools", n, c, len(bodyPools))
		case size < n || size > n+n/4:
			t.Fatalf("bodyClass(%d) = size %d: not within a quarter above", n, size)
		case size > 32<<10 && size%(8<<10) != 0:
			t.Fatalf("bodyClass(%d) = size %d: not whole 8 KiB pages", n, size)
		case c < last:
			t.Fatalf("bodyClass(%d) = class %d after class %d", n, c, last)
		}
		if was, ok := capOf[c]; ok && was != size {
			t.Fatalf("class %d has sizes %d and %d", c, was, size)
		}
		capOf[c], last = size, c
	}
	for _, n := range []int{4097, 5120, 5121, 50000, 65536, 65537, maxPooledBody} {
		c, size := bodyClass(n)
		t.Logf("%d bytes: class %d, %d bytes", n, c, size)
	}
	if _, size := bodyClass(50000); size != 56<<10 {
		t.Fatalf("a 50 KB body is held in %d bytes, want 56 KiB", size)
	}
}

// TestReadBodyHoldsWhatArrived checks that a small body is held at its own
// size and a pooled one in its class, with the bytes intact either way.
func TestReadBodyHoldsWhatArrived(t *testing.T) {
	for _, n := range []int{0, 512, minPooledBody, 50000} {
		body := strings.Repeat("x", n)
		r := httptest.NewRequest("POST", "/v1/messages", strings.NewReader(body))
		bb, err := readBody(httptest.NewRecorder(), r, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(bb.b, []byte(body)) {
			t.Fatalf("%d bytes: body changed", n)
		}
		_, want := bodyClass(n)
		if cap(bb.b) != want {
			t.Fatalf("%d bytes held in a %d-byte buffer, want %d", n, cap(bb.b), want)
		}
		bb.release()
	}
}

// memBody is a streaming Anthropic request of exactly size bytes: the
// padding is a system prompt, as in the requests Claude Code sends.
func memBody(size int) string {
	head := `{"model":"claude-mem","max_tokens":64,"stream":true,"system":"`
	tail := `","messages":[{"role":"user","content":"hi"}]}`
	pad := size - len(head) - len(tail)
	const line = "You are a careful assistant. "
	return head + strings.Repeat(line, pad/len(line)+1)[:pad] + tail
}

// TestFailoverBeforeFirstTokenResendsExactBody: a Claude Code-sized stream
// request fails over twice before its first token (an overloaded answer,
// then a 200 whose first event is an error), and every upstream gets the
// client's bytes exactly; the one that redirects the model gets them with
// only the model changed. The body is held at its own size and the
// redirect is spliced in as it is sent, so this is what must not break.
func TestFailoverBeforeFirstTokenResendsExactBody(t *testing.T) {
	e := newTestEnv(t)
	a, b, c := newFakeUpstream(t, "a"), newFakeUpstream(t, "b"), newFakeUpstream(t, "c")
	a.set(fakeBehavior{Status: 529})
	b.set(fakeBehavior{FirstEventErr: true})
	chA := e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 3})
	chB := e.addChannel(Channel{Name: "b", URL: b.URL, Priority: 2})
	e.addChannel(Channel{Name: "c", URL: c.URL, Priority: 1, ModelRedirects: map[string]string{"claude-mem": "claude-real-model"}})
	body := memBody(50000)
	for round := range 3 { // again, so later requests reuse pooled buffers
		for _, id := range []int64{chA.ID, chB.ID} { // forget the last round's failures
			e.app.cool.clearAll(e.app.cool.get(id))
		}
		resp, got := e.post("/v1/messages", body)
		if resp.StatusCode != 200 || !strings.Contains(string(got), "event: message_stop") {
			t.Fatalf("round %d: status %d, body %.200s", round, resp.StatusCode, got)
		}
		for _, up := range []*fakeUpstream{a, b} {
			reqs := up.requests()
			if len(reqs) != round+1 || string(reqs[round].Body) != body {
				t.Fatalf("round %d: upstream %s got %d requests, last body of %d bytes; want the client's %d bytes",
					round, up.name, len(reqs), len(reqs[len(reqs)-1].Body), len(body))
			}
		}
		want := strings.Replace(body, `"claude-mem"`, `"claude-real-model"`, 1)
		if reqs := c.requests(); len(reqs) != round+1 || string(reqs[round].Body) != want {
			t.Fatalf("round %d: redirected body differs (%d bytes, want %d)", round, len(reqs[len(reqs)-1].Body), len(want))
		}
		if l := e.lastLog(); l.Attempts != 3 || l.ChannelName != "c" || l.Status != 200 {
			t.Fatalf("round %d: log attempts %d channel %q status %d", round, l.Attempts, l.ChannelName, l.Status)
		}
	}
}

// TestRedirectSendsNoCopy checks that sending a redirected 50 KB body does
// not allocate a second copy of it: the new model is spliced in as the
// bytes go out.
func TestRedirectSendsNoCopy(t *testing.T) {
	body := []byte(memBody(50000))
	info, err := inspectBody(body)
	if err != nil {
		t.Fatal(err)
	}
	ent, err := newEntry(Channel{ID: 1, Type: "anthropic", URL: "http://up.invalid", APIKeys: []string{"sk-x"},
		ModelRedirects: map[string]string{"claude-mem": "claude-real-model"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	rl := &relay{}
	x := &exchange{proto: protoAnthropic, model: info.model, info: info, body: body}
	req := httptest.NewRequest("POST", "/v1/messages", nil)
	sink := make([]byte, 4096) // the transport's write buffer
	var got bytes.Buffer
	got.Grow(len(body) + 64)
	send := func() {
		rl.prepare(req, x, ent, 0)
		for {
			n, err := req.Body.Read(sink)
			if got.Len() < len(body)+64 {
				got.Write(sink[:n])
			}
			if err != nil {
				break
			}
		}
		req.Body.Close()
	}
	send()
	if want := bytes.Replace(body, []byte(`"claude-mem"`), []byte(`"claude-real-model"`), 1); !bytes.Equal(got.Bytes(), want) ||
		req.ContentLength != int64(len(want)) {
		t.Fatalf("sent %d bytes (Content-Length %d), want the body with the model redirected (%d)", got.Len(), req.ContentLength, len(want))
	}
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	const runs = 50
	for range runs {
		send()
	}
	runtime.ReadMemStats(&m1)
	if per := (m1.TotalAlloc - m0.TotalAlloc) / runs; per > uint64(len(body))/8 {
		t.Errorf("sending a redirected %d-byte body allocates %d bytes: a copy of it", len(body), per)
	}
}

// BenchmarkBodyPath is the relay's work on a request body outside the
// network: read it into its buffer, send it to one upstream (with and
// without a model redirect) and let it go.
//
//	go test -run '^$' -bench BodyPath -benchmem
func BenchmarkBodyPath(b *testing.B) {
	plain, _ := newEntry(Channel{ID: 1, Type: "anthropic", URL: "http://up.invalid", APIKeys: []string{"sk-x"}}, nil)
	redir, _ := newEntry(Channel{ID: 2, Type: "anthropic", URL: "http://up.invalid", APIKeys: []string{"sk-x"},
		ModelRedirects: map[string]string{"claude-mem": "claude-real-model"}}, nil)
	for _, size := range []int{512, 50000, 100 << 10} {
		for _, ent := range []*channelEntry{plain, redir} {
			name := fmt.Sprintf("%dB", size)
			if ent == redir {
				name += "-redirect"
			}
			b.Run(name, func(b *testing.B) {
				body := memBody(size)
				info, _ := inspectBody([]byte(body))
				rl := &relay{}
				sink := make([]byte, 4096)
				w := httptest.NewRecorder()
				b.SetBytes(int64(size))
				for b.Loop() {
					r := httptest.NewRequest("POST", "/v1/messages", strings.NewReader(body))
					bb, err := readBody(w, r, 32<<20)
					if err != nil {
						b.Fatal(err)
					}
					x := &exchange{proto: protoAnthropic, model: info.model, info: info}
					x.buf, x.body = bb, bb.b
					rl.prepare(r, x, ent, 0)
					for {
						if _, err := r.Body.Read(sink); err != nil {
							break
						}
					}
					r.Body.Close()
					x.dropBody()
				}
			})
		}
	}
}
