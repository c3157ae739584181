package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"
)

// chunkReader returns its data in pieces of the given sizes, then err.
type chunkReader struct {
	data   []byte
	sizes  []int
	err    error
	closed bool
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		return 0, io.EOF
	}
	n := len(r.data)
	if len(r.sizes) > 0 {
		n = min(n, r.sizes[0])
		r.sizes = r.sizes[1:]
	}
	n = copy(p, r.data[:n])
	r.data = r.data[n:]
	return n, nil
}

func (r *chunkReader) Close() error { r.closed = true; return nil }

const anthropicStream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n" +
	"event: ping\ndata: {\"type\":\"ping\"}\n\n" +
	"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"a\"}}\n\n" +
	"event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"b\"}}\r\n\r\n" +
	"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n" +
	"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"

// relaySSE runs an sseBody over src the way ReverseProxy does, recording the
// chunks the client would receive.
func relaySSE(t *testing.T, src *chunkReader, bufSize int) (chunks []string, end streamEnd, early *upstreamError, err error) {
	t.Helper()
	b := &sseBody{src: src, scan: sseScanner{proto: protoAnthropic}, onClose: func(e streamEnd) { end = e }}
	early, err = b.waitFirst()
	if err != nil || early != nil {
		b.Close()
		return nil, end, early, err
	}
	buf := make([]byte, bufSize)
	for {
		n, rerr := b.Read(buf)
		if n > 0 {
			chunks = append(chunks, string(buf[:n]))
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			err = rerr
			break
		}
	}
	b.Close()
	return chunks, end, nil, err
}

func TestSSERelayWholeEventsAtAnySplit(t *testing.T) {
	for _, split := range []int{1, 2, 7, 13, 64, 4096} {
		for _, bufSize := range []int{16, 33, 1024} {
			var sizes []int
			for range len(anthropicStream) {
				sizes = append(sizes, split)
			}
			src := &chunkReader{data: []byte(anthropicStream), sizes: sizes}
			chunks, end, _, err := relaySSE(t, src, bufSize)
			if err != nil {
				t.Fatalf("split %d buf %d: %v", split, bufSize, err)
			}
			if got := strings.Join(chunks, ""); got != anthropicStream {
				t.Fatalf("split %d buf %d: relayed stream differs:\n%q", split, bufSize, got)
			}
			if end.err != nil || end.incomplete || end.usage != (usage{Input: 5, Output: 9}) || !src.closed {
				t.Errorf("split %d: end %+v closed %v", split, end, src.closed)
			}
			// Whenever the client's buffer is big enough, a chunk ends on an
			// event boundary: the client never waits on half an event.
			if bufSize >= 1024 {
				for _, c := range chunks {
					if !strings.HasSuffix(c, "\n\n") && !strings.HasSuffix(c, "\n\r\n") {
						t.Errorf("split %d: chunk %q ends mid-event", split, c)
					}
				}
			}
		}
	}
}

func TestSSEEarlyErrorAndEmptyStream(t *testing.T) {
	src := &chunkReader{data: []byte("event: message_start\ndata: {\"type\":\"message_start\"}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"busy\"}}\n\n")}
	_, _, early, err := relaySSE(t, src, 1024)
	if err != nil || early == nil || early.status != 529 || early.message != "busy" {
		t.Errorf("early error: %+v, %v", early, err)
	}
	_, _, early, err = relaySSE(t, &chunkReader{}, 1024)
	if !errors.Is(err, io.EOF) || early != nil {
		t.Errorf("empty stream: %v, %+v; want EOF", err, early)
	}
	// Only pings, then EOF: no content ever came.
	_, _, _, err = relaySSE(t, &chunkReader{data: []byte("event: ping\ndata: {}\n\n")}, 1024)
	if !errors.Is(err, io.EOF) {
		t.Errorf("pings only: %v; want EOF", err)
	}
}

func TestSSECutMidEventEndsWithErrorEvent(t *testing.T) {
	cut := strings.Index(anthropicStream, "event: content_block_delta\r\n") + 30 // inside the second delta
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"reset", errors.New("connection reset by peer")},
		{"clean EOF", nil},
	} {
		src := &chunkReader{data: []byte(anthropicStream[:cut]), err: tc.err}
		chunks, end, _, err := relaySSE(t, src, 4096)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		got := strings.Join(chunks, "")
		complete := anthropicStream[:strings.Index(anthropicStream, "event: content_block_delta\r\n")]
		if !strings.HasPrefix(got, complete) {
			t.Errorf("%s: complete events not relayed:\n%q", tc.name, got)
		}
		rest := got[len(complete):]
		if !strings.HasPrefix(rest, "event: error\n") || strings.Contains(rest, "content_block_delta") {
			t.Errorf("%s: after the complete events got %q; want only an error event", tc.name, rest)
		}
		if tc.err != nil && end.err == nil || tc.err == nil && !end.incomplete {
			t.Errorf("%s: end %+v", tc.name, end)
		}
	}
}

func TestSSEFinalEventWithoutBlankLine(t *testing.T) {
	s := strings.TrimSuffix(anthropicStream, "\n") // ends "...message_stop\"}\n"
	chunks, end, _, err := relaySSE(t, &chunkReader{data: []byte(s)}, 4096)
	if err != nil || strings.Join(chunks, "") != s || end.incomplete {
		t.Errorf("got %q end %+v err %v", strings.Join(chunks, ""), end, err)
	}
}

func TestSSEIdleStreamHoldsNoBuffer(t *testing.T) {
	src := &chunkReader{data: []byte(anthropicStream)}
	b := &sseBody{src: src, scan: sseScanner{proto: protoAnthropic}}
	if _, err := b.waitFirst(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<16)
	if _, err := b.Read(buf); err != nil {
		t.Fatal(err)
	}
	// Everything read so far ended on a boundary and went out.
	if b.pend != nil {
		t.Errorf("idle stream holds %d bytes of buffer (cap %d)", len(b.pend), cap(b.pend))
	}
	b.Close()
}

func TestPlainBodyUsageAndClientClose(t *testing.T) {
	body := `{"id":"msg","content":[{"text":"` + strings.Repeat("y", 9000) + `"}],"usage":{"input_tokens":11,"output_tokens":22}}`
	var end streamEnd
	pb := &plainBody{src: &chunkReader{data: []byte(body[10:]), sizes: []int{1000, 3000, 5000}}, head: []byte(body[:10]), keepTail: true,
		onClose: func(e streamEnd) { end = e }}
	got, _ := io.ReadAll(pb)
	pb.Close()
	if string(got) != body || end.usage != (usage{Input: 11, Output: 22}) || end.err != nil {
		t.Errorf("plain body: %d bytes, end %+v", len(got), end)
	}
	pb = &plainBody{src: &chunkReader{data: []byte(body)}, onClose: func(e streamEnd) { end = e }}
	pb.Read(make([]byte, 10))
	pb.Close()
	if !errors.Is(end.err, errClientClosed) {
		t.Errorf("closed early: %+v; want errClientClosed", end)
	}
}

// FuzzClassifyEventSpacing checks that the event classifiers and the usage
// scanner read JSON, not its layout: a valid document means the same
// compact, spaced as Python's json.dumps writes it, or spread over lines
// with every kind of JSON whitespace.
func FuzzClassifyEventSpacing(f *testing.F) {
	for _, s := range []string{
		`{"type":"message_start","message":{"usage":{"input_tokens":5,"cache_read_input_tokens":2}}}`,
		`{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}`,
		`{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a, b: c"}}`,
		`{"type":"message_delta","usage":{"output_tokens":9}}`,
		`{"type":"message_stop"}`,
		`{"type":"error","error":{"type":"overloaded_error","message":"busy"}}`,
		`{"choices":[{"delta":{"role":"assistant","content":""},"finish_reason":null}]}`,
		`{"choices":[{"delta":{"role":"assistant","content":null}}]}`,
		`{"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}`,
		`{"choices":[{"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":1}}}`,
		`{"choices":[{"delta":{"content":"\"finish_reason\":\"stop\""}}]}`,
		`{"type":"response.created","response":{}}`,
		`{"type":"response.completed","response":{"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":4}}}}`,
		`{"candidates":[],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":2}}`,
	} {
		for _, p := range []protocol{protoAnthropic, protoOpenAI, protoGemini} {
			f.Add(uint8(p), s)
		}
	}
	f.Fuzz(func(t *testing.T, pn uint8, doc string) {
		p := protocol(pn%3 + 1)
		var compact bytes.Buffer
		if json.Compact(&compact, []byte(doc)) != nil {
			return
		}
		var indented bytes.Buffer
		json.Indent(&indented, compact.Bytes(), "\r", "\t")
		want := classifyEvent(p, nil, compact.Bytes())
		var wantUsage usage
		wantUsage.absorb(compact.Bytes())
		for _, v := range [][]byte{pythonSpaced(compact.Bytes()), append(append([]byte(" "), indented.Bytes()...), " \n"...)} {
			if got := classifyEvent(p, nil, v); got != want {
				t.Errorf("%s: classifyEvent(%s) = %d; compact %s is %d", p, v, got, compact.Bytes(), want)
			}
			var u usage
			u.absorb(v)
			if u != wantUsage {
				t.Errorf("absorb(%s) = %+v; compact %s gives %+v", v, u, compact.Bytes(), wantUsage)
			}
		}
	})
}

// TestSSEFirstEventBufferGrowsOnDemand checks what a stream waiting for its
// first token holds: firstEventBuf for the usual small preamble, and more
// only when the events before the first token need it (a large
// message_start), which then reach the client intact.
func TestSSEFirstEventBufferGrowsOnDemand(t *testing.T) {
	src := &chunkReader{data: []byte("event: ping\ndata: {\"type\":\"ping\"}\n\n")}
	b := &sseBody{src: src, scan: sseScanner{proto: protoAnthropic}}
	if _, err := b.waitFirst(); !errors.Is(err, io.EOF) {
		t.Fatalf("pings only: %v; want EOF", err)
	}
	if cap(b.pend) != firstEventBuf {
		t.Errorf("a stream waiting after a ping holds %d bytes; want %d", cap(b.pend), firstEventBuf)
	}
	b.Close()

	big := "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"" +
		strings.Repeat("m", 5000) + "\"}}\n\n"
	stream := big + anthropicStream[strings.Index(anthropicStream, "event: ping"):]
	for _, split := range []int{100, 1500, len(stream)} {
		chunks, end, _, err := relaySSE(t, &chunkReader{data: []byte(stream), sizes: []int{split, split, split, split, split, split, split, split}}, 8192)
		if err != nil || end.incomplete {
			t.Fatalf("split %d: %v, end %+v", split, err, end)
		}
		if got := strings.Join(chunks, ""); got != stream {
			t.Fatalf("split %d: relayed stream differs (%d of %d bytes)", split, len(got), len(stream))
		}
	}
}
