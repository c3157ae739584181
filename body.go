package main

import (
	"encoding/json"
	"io"
	"math/bits"
	"net/http"
	"sync"
	"sync/atomic"
)

// Request bodies. The relay reads each body whole (to find the model and to
// send it again on failover) into a pooled, reference-counted buffer, and
// hands every attempt a fresh reader over the same bytes.

// readBody reads the whole request body, refusing more than limit bytes. The
// proxy needs all of it: to find the model, and to send it again on retry.
// A body of known length is read into a pooled buffer (see bodyBuf).
func readBody(w http.ResponseWriter, r *http.Request, limit int64) (*bodyBuf, error) {
	if r.ContentLength > limit {
		return nil, &http.MaxBytesError{Limit: limit}
	}
	rd := http.MaxBytesReader(w, r.Body, limit)
	// Up to the largest pooled class the buffer is taken at once; beyond
	// it the body grows as it arrives, so a client cannot pin 32 MiB by
	// announcing it and sending nothing.
	if r.ContentLength >= 0 && r.ContentLength <= maxPooledBody {
		bb := newBodyBuf(int(r.ContentLength))
		if _, err := io.ReadFull(rd, bb.b); err != nil {
			bb.release()
			return nil, err
		}
		return bb, nil
	}
	b, err := io.ReadAll(rd)
	if err != nil {
		return nil, err
	}
	bb := &bodyBuf{b: b}
	bb.refs.Store(1)
	return bb, nil
}

// bodyBuf is a request body shared by the exchange and the readers the
// transport sends it with. Claude Code sends 100 KiB and more per request;
// allocating and zeroing that afresh each time made the collector a large
// share of the relay's CPU. The buffer goes back to its pool when the last
// holder lets go: the exchange once a response is committed (or the
// request ends), a reader when the transport closes it.
type bodyBuf struct {
	b    []byte
	pool *sync.Pool   // nil: not pooled
	refs atomic.Int32 // holders left
}

// A stream holds its request body until the first token (it may fail over
// before then), which for a thinking model is most of the stream's life: so
// the buffer should be the body's size, not a size class far above it.
// Bodies up to minPooledBody are allocated exactly: small allocations are
// cheap, and a 4 KiB class for a 500-byte request would double what an
// open stream costs. Larger ones come from pools in quarter-octave classes
// (5, 6, 7, 8, 10, 12 … KiB up to 4 MiB), at most a quarter above the body:
// from 32 KiB on every class is a whole number of the allocator's 8 KiB
// pages, so a pooled buffer costs what an exact allocation would. Larger
// bodies are not pooled.
const (
	minPooledBody = 4 << 10
	maxPooledBody = 4 << 20
)

var bodyPools [4 * 10]sync.Pool // 4 classes per doubling, from 4 KiB to 4 MiB

// bodyClass returns the pool class for a body of n bytes and that class's
// capacity; -1 when n is allocated exactly.
func bodyClass(n int) (class, size int) {
	if n <= minPooledBody || n > maxPooledBody {
		return -1, n
	}
	k := bits.Len(uint(n-1)) - 1 // 2^k < n <= 2^(k+1)
	step := 1 << (k - 2)
	q := (n - 1 - 1<<k) / step // which quarter of the doubling
	return (k-12)*4 + q, 1<<k + (q+1)*step
}

func newBodyBuf(n int) *bodyBuf {
	bb := &bodyBuf{}
	bb.refs.Store(1)
	c, size := bodyClass(n)
	if c < 0 {
		bb.b = make([]byte, n)
		return bb
	}
	bb.pool = &bodyPools[c]
	if p, ok := bb.pool.Get().(*[]byte); ok {
		bb.b = (*p)[:n]
	} else {
		bb.b = make([]byte, n, size)
	}
	return bb
}

func (bb *bodyBuf) hold() { bb.refs.Add(1) }

func (bb *bodyBuf) release() {
	if bb.refs.Add(-1) == 0 && bb.pool != nil {
		b := bb.b[:0]
		bb.b = nil
		bb.pool.Put(&b)
	}
}

// sentBody is the request body one attempt sends: the client's bytes and,
// when the channel redirects the model, the new model's JSON string in
// place of the old one's. The swap is made as the bytes go out (see
// bodyReader), not in a copy: a copy would hold a second 100 KiB request
// for as long as the stream waits for its first token.
type sentBody struct {
	body       []byte
	model      []byte // the upstream model, quoted; nil: body goes as is
	start, end int    // the span of body that model replaces
}

// redirect sends the body with model in place of the client's; info
// locates the client's model in the body.
func (s *sentBody) redirect(info bodyInfo, model string) {
	q, _ := json.Marshal(model)
	s.model, s.start, s.end = q, info.modelStart, info.modelEnd
}

func (s *sentBody) size() int {
	if s.model == nil {
		return len(s.body)
	}
	return len(s.body) - (s.end - s.start) + len(s.model)
}

// bodyReader is a request body over bytes the exchange holds. Close lets
// the bytes go: the transport closes the body once it has sent it, and a
// stream that runs for minutes should not keep a 100 KiB request alive.
// The HTTP/2 transport may Close from one goroutine while another Reads,
// so both take mu (never held across a network write: there is no WriteTo).
type bodyReader struct {
	mu     sync.Mutex // guards parts and closed
	parts  [3][]byte  // what is left to send, in order: body up to the model, the model, the rest
	buf    *bodyBuf   // the pooled buffer the parts point into; nil if not pooled
	closed bool
}

func (r *bodyReader) Read(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for i := range r.parts {
		k := copy(p[n:], r.parts[i])
		r.parts[i] = r.parts[i][k:]
		n += k
	}
	if n == 0 && len(p) > 0 {
		return 0, io.EOF
	}
	return n, nil
}

func (r *bodyReader) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.closed {
		r.closed = true
		r.parts = [3][]byte{}
		if r.buf != nil {
			r.buf.release()
		}
	}
	return nil
}

// newBodyReader returns a reader over the body the current attempt sends,
// holding the pooled buffer when that is what it reads.
func (x *exchange) newBodyReader() *bodyReader {
	s := &x.sent
	r := &bodyReader{}
	if s.model == nil {
		r.parts[0] = s.body
	} else {
		r.parts = [3][]byte{s.body[:s.start], s.model, s.body[s.end:]}
	}
	if x.buf != nil && len(s.body) > 0 && len(x.buf.b) > 0 && &s.body[0] == &x.buf.b[0] {
		x.buf.hold()
		r.buf = x.buf
	}
	return r
}

// reopenBody is the request's GetBody: the transport may resend a body on a
// fresh connection before any response arrives.
func (x *exchange) reopenBody() (io.ReadCloser, error) { return x.newBodyReader(), nil }

// dropBody lets go of the request body: no attempt can follow.
func (x *exchange) dropBody() {
	x.body, x.sent = nil, sentBody{}
	if x.buf != nil {
		x.buf.release()
		x.buf = nil
	}
}
