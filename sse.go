package main

import (
	"bytes"
	"errors"
	"io"
	"sync"
)

// eventKind is what one SSE event means to the relay.
type eventKind uint8

const (
	evPreamble eventKind = iota // before content: ping, message_start, response.created
	evContent                   // the answer has begun
	evError                     // an error event
	evEnd                       // the stream finished properly
)

// classifyEvent sorts one event by protocol. name is the event: field (may
// be empty), data the joined data: lines.
func classifyEvent(p protocol, name, data []byte) eventKind {
	if len(name) == 0 {
		name = jsonTypeField(data)
	}
	switch p {
	case protoAnthropic:
		switch string(name) {
		case "ping", "message_start", "content_block_start", "":
			return evPreamble
		case "error":
			return evError
		case "message_stop":
			return evEnd
		}
		return evContent
	case protoOpenAI:
		if bytes.HasPrefix(name, []byte("response.")) || string(name) == "error" {
			switch string(name) {
			case "response.created", "response.in_progress", "response.queued":
				return evPreamble
			case "response.completed", "response.incomplete", "response.done":
				return evEnd
			case "response.failed", "error":
				return evError
			}
			return evContent
		}
		if string(data) == "[DONE]" {
			return evEnd
		}
		if len(data) == 0 {
			return evPreamble
		}
		if _, isErr := parseErrorDoc(data); isErr {
			return evError
		}
		if hasMember(data, `"finish_reason"`, func(v []byte) bool { return v[0] == '"' }) {
			return evEnd
		}
		if roleOnlyChunk(data) {
			return evPreamble
		}
		return evContent
	default:
		if len(data) == 0 {
			return evPreamble
		}
		if _, isErr := parseErrorDoc(data); isErr {
			return evError
		}
		return evContent
	}
}

// roleOnlyChunk reports whether a chat completion chunk only announces the
// assistant's role, with no text or tool call yet: not content, so a
// stream that fails right after it can still fail over unseen.
func roleOnlyChunk(data []byte) bool {
	return hasMember(data, `"role"`, func(v []byte) bool { return bytes.HasPrefix(v, []byte(`"assistant"`)) }) &&
		hasMember(data, `"content"`, func(v []byte) bool {
			return bytes.HasPrefix(v, []byte(`""`)) || bytes.HasPrefix(v, []byte("null"))
		}) &&
		!bytes.Contains(data, []byte(`"tool_calls"`)) && !bytes.Contains(data, []byte(`"reasoning`))
}

// hasMember reports whether data holds a member named key (given with its
// quotes) whose value, wherever it is nested, satisfies is; is gets the
// bytes from the value's start, at least one. It searches the bytes rather
// than decoding the document, which runs for every event: inside a string
// every quote is escaped, so the text of a message never matches a key
// followed by a colon. JSON allows whitespace around the colon, and
// Python's json.dumps puts a space after it.
func hasMember(data []byte, key string, is func(v []byte) bool) bool {
	for at := 0; ; {
		i := bytes.Index(data[at:], []byte(key))
		if i < 0 {
			return false
		}
		at += i + len(key)
		j := skipSpace(data, at)
		if j >= len(data) || data[j] != ':' {
			continue
		}
		if j = skipSpace(data, j+1); j < len(data) && is(data[j:]) {
			return true
		}
	}
}

// jsonTypeField returns the value of a leading "type" member, the way every
// Anthropic and Responses event starts, without decoding the document.
// Whitespace may stand wherever JSON allows it.
func jsonTypeField(data []byte) []byte {
	i := skipSpace(data, 0)
	if i >= len(data) || data[i] != '{' {
		return nil
	}
	i = skipSpace(data, i+1)
	if !bytes.HasPrefix(data[i:], []byte(`"type"`)) {
		return nil
	}
	i = skipSpace(data, i+len(`"type"`))
	if i >= len(data) || data[i] != ':' {
		return nil
	}
	i = skipSpace(data, i+1)
	if i >= len(data) || data[i] != '"' {
		return nil
	}
	rest := data[i+1:]
	if j := bytes.IndexByte(rest, '"'); j >= 0 {
		return rest[:j]
	}
	return nil
}

// sseScanner reads complete events and keeps what the relay must know about
// the stream: whether content began, the first error, whether it ended
// properly, and the token usage.
type sseScanner struct {
	proto protocol

	sawContent bool
	done       bool
	earlyErr   *upstreamError // an error event before any content
	earlyData  []byte         // its data, to hand to the client as a body
	lateErr    *upstreamError // an error event after content began
	usage      usage
	rs         *responsesState // a Responses stream's identity and progress; nil for others

	name    []byte // current event name (points into the fed bytes)
	data    []byte // current event data
	joined  []byte // scratch for multi-line data
	nData   int
	pending bool // a line was seen since the last dispatch
}

// feed processes b, which must end at an event boundary (or be the final
// bytes of the stream).
func (s *sseScanner) feed(b []byte) {
	for len(b) > 0 {
		var line []byte
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			line, b = b, nil
		}
		line = bytes.TrimSuffix(line, []byte{'\r'})
		if len(line) == 0 {
			s.dispatch()
			continue
		}
		s.pending = true
		switch {
		case line[0] == ':':
		case bytes.HasPrefix(line, []byte("event:")):
			s.name = bytes.TrimPrefix(line[6:], []byte{' '})
		case bytes.HasPrefix(line, []byte("data:")):
			d := bytes.TrimPrefix(line[5:], []byte{' '})
			s.nData++
			switch s.nData {
			case 1:
				s.data = d
			case 2:
				s.joined = append(append(append(s.joined[:0], s.data...), '\n'), d...)
				s.data = s.joined
			default:
				s.joined = append(append(s.joined, '\n'), d...)
				s.data = s.joined
			}
		}
	}
}

// finish dispatches an event the stream ended in without a blank line.
func (s *sseScanner) finish() { s.dispatch() }

func (s *sseScanner) dispatch() {
	if !s.pending {
		return
	}
	name, data := s.name, s.data
	s.name, s.data, s.nData, s.pending = nil, nil, 0, false
	switch classifyEvent(s.proto, name, data) {
	case evContent:
		s.sawContent = true
	case evEnd:
		if !s.sawContent && s.earlyErr == nil {
			// An end with nothing before it ([DONE] alone, say) is a
			// broken upstream, not an empty answer.
			s.earlyErr = &upstreamError{status: 502, message: "stream ended before any content"}
			return
		}
		s.done = true
	case evError:
		e, ok := parseErrorDoc(data)
		if !ok {
			e = upstreamError{status: 502, message: "upstream sent an error event"}
		}
		if s.sawContent {
			if s.lateErr == nil {
				s.lateErr = &e
			}
		} else if s.earlyErr == nil {
			s.earlyErr = &e
			s.earlyData = bytes.Clone(data)
		}
		return
	}
	if s.rs != nil {
		s.rs.observe(data)
	}
	s.usage.absorb(data)
}

// lastBoundary returns the length of the prefix of b that ends with a blank
// line, that is the complete events in b; 0 if there is none.
func lastBoundary(b []byte) int {
	// Walk back over line ends: a blank line is "\n\n" or "\n\r\n".
	for i := len(b) - 1; i > 0; i-- {
		if b[i] != '\n' {
			continue
		}
		switch {
		case b[i-1] == '\n':
			return i + 1
		case b[i-1] == '\r' && i > 1 && b[i-2] == '\n':
			return i + 1
		}
	}
	return 0
}

// newBoundary is lastBoundary(b) for a b whose first old bytes hold no
// boundary: only the new bytes (and the two before them, which a boundary
// may start in) are searched, so an event that grows by many reads costs
// linear time, not quadratic.
func newBoundary(b []byte, old int) int {
	from := max(old-2, 0)
	if k := lastBoundary(b[from:]); k > 0 {
		return from + k
	}
	return 0
}

// defaultMaxEvent is the largest SSE event relayed (CCLOAD_MAX_EVENT). An
// event is held until its blank line, so the client only ever gets whole
// events; one that grows past the cap without ending (a data: line that
// never gets its newline) is no answer at all but a broken upstream, judged
// like any other failure. The cap is also what one stream can hold.
const defaultMaxEvent = 16 << 20

// errEventTooLarge is an event over the cap.
type errEventTooLarge struct{ limit int }

func (e errEventTooLarge) Error() string {
	return "SSE event larger than " + formatBytes(int64(e.limit)) + " (CCLOAD_MAX_EVENT)"
}

// firstEventBuf is what a stream waiting for its first content event holds
// to start with (see waitFirst).
const firstEventBuf = 1 << 10

// bufPool recycles the buffers that hold a partial event. A stream that is
// idle between events holds none.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

func getBuf() []byte { return (*bufPool.Get().(*[]byte))[:0] }

func putBuf(b []byte) {
	// Only buffers of a useful size: one grown for a huge event is left to
	// the collector, and a small one would make every later read small.
	if cap(b) > 64<<10 || cap(b) < 4096 {
		return
	}
	b = b[:0]
	bufPool.Put(&b)
}

// streamEnd is how a relayed body finished.
type streamEnd struct {
	err        error // read error from upstream, nil for a clean end
	incomplete bool  // a stream ended without its terminal event
	usage      usage
	lateErr    *upstreamError
	message    string // the error message of a relayed error body
}

// sseBody relays an event stream: it gives the client complete events only,
// reads usage as they pass, and turns an upstream failure into a proper
// error event so the client never sees a silent EOF.
type sseBody struct {
	src  io.ReadCloser
	scan sseScanner

	pend  []byte // read from src, not yet returned; pend[:ready] is complete events
	ready int
	tail  []byte // an error event to send before EOF
	err   error  // returned once pend and tail are drained

	end    streamEnd
	closed bool
	// clientGone reports whether the client went away, which makes a read
	// error ours to swallow and not the upstream's fault.
	clientGone func() bool
	onClose    func(streamEnd)
	// touch restarts the idle timeout; may be nil. It is called for
	// complete events only, so bytes trickled into an event that never
	// ends do not keep a dead stream alive.
	touch   func()
	explain func(error) error // describes a read error; may be nil
	// maxEvent caps one event's size; 0 means defaultMaxEvent.
	maxEvent int
}

// arrived notes that complete events came, for the idle timeout.
func (b *sseBody) arrived(events bool) {
	if events && b.touch != nil {
		b.touch()
	}
}

func (b *sseBody) eventCap() int {
	if b.maxEvent > 0 {
		return b.maxEvent
	}
	return defaultMaxEvent
}

// waitFirst reads until the first content event. It returns the early error
// event if one came first, or the read error (io.EOF for an empty stream).
//
// The wait is most of a stream's life while the model thinks, and what
// comes before the first token is small (a ping, message_start), so the
// buffer starts at firstEventBuf and grows only if the events need more.
func (b *sseBody) waitFirst() (*upstreamError, error) {
	b.pend = make([]byte, 0, firstEventBuf)
	for !b.scan.sawContent && b.scan.earlyErr == nil {
		if len(b.pend) == cap(b.pend) {
			b.pend = append(b.pend, 0)[:len(b.pend)]
		}
		n, err := b.src.Read(b.pend[len(b.pend):cap(b.pend)])
		old := len(b.pend)
		b.pend = b.pend[:old+n]
		if k := newBoundary(b.pend[b.ready:], old-b.ready); k > 0 {
			b.scan.feed(b.pend[b.ready : b.ready+k])
			b.ready += k
		}
		if err != nil {
			if errors.Is(err, io.EOF) && b.ready < len(b.pend) {
				b.scan.feed(b.pend[b.ready:])
				b.scan.finish()
				b.ready = len(b.pend)
			}
			if b.scan.earlyErr != nil {
				return b.scan.earlyErr, nil
			}
			if b.scan.sawContent {
				// A whole (short) stream arrived before the first read
				// returned EOF: relay it and end there.
				b.finishRead(err)
				return nil, nil
			}
			return nil, err
		}
		if len(b.pend)-b.ready > b.eventCap() {
			return nil, errEventTooLarge{b.eventCap()}
		}
	}
	return b.scan.earlyErr, nil
}

func (b *sseBody) Read(p []byte) (int, error) {
	for {
		if b.ready > 0 {
			n := copy(p, b.pend[:b.ready])
			// Shift what is left down rather than slicing forward, so pend
			// always starts at its buffer's start: the whole buffer goes
			// back to the pool, not a remnant of it.
			b.pend = b.pend[:copy(b.pend, b.pend[n:])]
			b.ready -= n
			if len(b.pend) == 0 {
				putBuf(b.pend)
				b.pend = nil
			}
			return n, nil
		}
		if len(b.tail) > 0 {
			n := copy(p, b.tail)
			b.tail = b.tail[n:]
			return n, nil
		}
		if b.err != nil {
			return 0, b.err
		}
		if len(b.pend) == 0 {
			// Nothing held: read straight into the caller's buffer and keep
			// back only a trailing partial event.
			n, err := b.src.Read(p)
			k := lastBoundary(p[:n])
			b.arrived(k > 0)
			if k > 0 {
				b.scan.feed(p[:k])
			}
			if k < n {
				if b.pend == nil {
					b.pend = getBuf()
				}
				b.pend = append(b.pend, p[k:n]...)
			}
			if err != nil {
				b.finishRead(err)
			}
			if k > 0 {
				return k, nil
			}
			continue
		}
		if len(b.pend) == cap(b.pend) {
			b.pend = append(b.pend, 0)[:len(b.pend)]
		}
		n, err := b.src.Read(b.pend[len(b.pend):cap(b.pend)])
		old := len(b.pend)
		b.pend = b.pend[:old+n]
		if k := newBoundary(b.pend, old); k > 0 {
			b.scan.feed(b.pend[:k])
			b.ready = k
			b.arrived(true)
		} else if len(b.pend) > b.eventCap() {
			b.tooLarge()
			continue
		}
		if err != nil {
			b.finishRead(err)
		}
	}
}

// finishRead decides how the stream ends once src returned err.
func (b *sseBody) finishRead(err error) {
	rest := b.pend[b.ready:]
	if errors.Is(err, io.EOF) {
		if len(rest) > 0 {
			b.scan.feed(rest)
		}
		b.scan.finish()
		if b.scan.done || b.scan.proto == protoGemini || b.scan.lateErr != nil {
			// A proper end (or the upstream's own error event, which the
			// client already has): relay what is left as it came.
			b.ready = len(b.pend)
			b.err = io.EOF
			return
		}
		b.end.incomplete = true
		b.dropPartial()
		b.tail = streamErrorEvent(b.scan.proto, b.scan.rs, "upstream closed the stream before it finished", b.scan.usage)
		b.err = io.EOF
		return
	}
	if b.scan.done || b.scan.lateErr != nil {
		// The terminal event has been relayed: the client has the whole
		// answer, whoever hangs up now (Codex closes its connection as
		// soon as it reads response.completed). Not a failure, not a 499.
		// Likewise after the upstream's own error event: the client has
		// its end, and a second one of ours would follow it (settle
		// judges the error event).
		b.dropPartial()
		b.err = io.EOF
		return
	}
	if b.clientGone != nil && b.clientGone() {
		b.end.err, b.err = err, err
		return
	}
	msg := "upstream connection lost mid-stream: " + shortError(err)
	if b.explain != nil {
		if e := b.explain(err); e != err {
			err, msg = e, e.Error()
		}
	}
	b.end.err = err
	b.dropPartial()
	b.tail = streamErrorEvent(b.scan.proto, b.scan.rs, msg, b.scan.usage)
	b.err = io.EOF
}

// tooLarge ends a committed stream whose current event outgrew the cap:
// the event is dropped, never relayed, and the stream ends with the
// protocol's error event; settle blames the channel.
func (b *sseBody) tooLarge() {
	err := errEventTooLarge{b.eventCap()}
	b.end.err = err
	b.dropPartial()
	if b.pend != nil && len(b.pend) == 0 {
		putBuf(b.pend) // too big for the pool: dropped there
		b.pend = nil
	}
	b.tail = streamErrorEvent(b.scan.proto, b.scan.rs, "upstream sent "+err.Error(), b.scan.usage)
	b.err = io.EOF
}

// dropPartial discards a trailing incomplete event: half an event would
// only confuse the client's parser before the error event.
func (b *sseBody) dropPartial() {
	b.pend = b.pend[:b.ready]
}

func (b *sseBody) Close() error {
	if b.closed {
		return nil
	}
	b.closed = true
	err := b.src.Close()
	if b.pend != nil {
		putBuf(b.pend)
		b.pend = nil
	}
	b.end.usage = b.scan.usage
	b.end.lateErr = b.scan.lateErr
	if b.end.err == nil && !b.scan.done && !b.end.incomplete && b.err == nil && b.scan.proto != protoGemini {
		// Closed before the stream ended: the client stopped reading.
		b.end.err = errClientClosed
	}
	if b.onClose != nil {
		b.onClose(b.end)
	}
	return err
}

var errClientClosed = errors.New("client closed the stream")

// plainBody relays a non-stream response and reads usage from its last
// bytes, where every protocol puts it, without holding the whole body.
type plainBody struct {
	src    io.ReadCloser
	head   []byte // peeked bytes, returned first
	pooled []byte // head's buffer, from bufPool, returned at Close
	tail   []byte // the last tailSize bytes seen
	// keepTail asks for usage to be read from the tail at the end;
	// wantError for the message of an error document.
	keepTail  bool
	wantError bool
	end       streamEnd
	closed    bool
	sawEOF    bool
	onClose   func(streamEnd)
	touch     func()            // data arrived (restarts the idle timeout); may be nil
	explain   func(error) error // describes a read error; may be nil
	// limit cuts the body after this many bytes from src (hostile.go:
	// errResponseTooLarge); 0 means none. n counts them.
	limit, n int64
}

const tailSize = 4096

func (b *plainBody) Read(p []byte) (int, error) {
	if len(b.head) > 0 {
		n := copy(p, b.head)
		b.remember(b.head[:n])
		b.head = b.head[n:]
		return n, nil
	}
	n, err := b.src.Read(p)
	if n > 0 && b.touch != nil {
		b.touch()
	}
	if b.n += int64(n); b.limit > 0 && b.n > b.limit {
		b.end.err = errResponseTooLarge
		return n, errResponseTooLarge
	}
	b.remember(p[:n])
	if err != nil {
		if errors.Is(err, io.EOF) {
			b.sawEOF = true
		} else {
			if b.explain != nil {
				err = b.explain(err)
			}
			b.end.err = err
		}
	}
	return n, err
}

func (b *plainBody) remember(p []byte) {
	if !(b.keepTail || b.wantError) || len(p) == 0 {
		return
	}
	if b.tail == nil {
		b.tail = getBuf()
	}
	if len(p) >= tailSize {
		b.tail = append(b.tail[:0], p[len(p)-tailSize:]...)
		return
	}
	if over := len(b.tail) + len(p) - tailSize; over > 0 {
		b.tail = b.tail[:copy(b.tail, b.tail[over:])]
	}
	b.tail = append(b.tail, p...)
}

func (b *plainBody) Close() error {
	if b.closed {
		return nil
	}
	b.closed = true
	err := b.src.Close()
	if b.tail != nil {
		if b.sawEOF && b.keepTail {
			b.end.usage = usageFromTail(b.tail)
		}
		if b.sawEOF && b.wantError {
			if ue, ok := parseErrorDoc(b.tail); ok {
				b.end.message = ue.message
			}
		}
		putBuf(b.tail)
		b.tail = nil
	}
	if b.pooled != nil {
		putBuf(b.pooled)
		b.pooled, b.head = nil, nil
	}
	if !b.sawEOF && b.end.err == nil {
		b.end.err = errClientClosed
	}
	if b.onClose != nil {
		b.onClose(b.end)
	}
	return err
}

// usageFromTail finds the last "usage" or "usageMetadata" object in the end
// of a JSON response.
func usageFromTail(tail []byte) usage {
	var u usage
	for _, marker := range [][]byte{usageMarker, usageMetaMarker} {
		i := bytes.LastIndex(tail, marker)
		if i < 0 {
			continue
		}
		j := skipSpace(tail, i+len(marker))
		if j >= len(tail) || tail[j] != ':' {
			continue
		}
		j = skipSpace(tail, j+1)
		if j >= len(tail) || tail[j] != '{' {
			continue
		}
		end := skipValue(tail, j)
		if end > len(tail) || tail[end-1] != '}' {
			continue
		}
		if bytes.Equal(marker, usageMetaMarker) {
			u.applyGemini(tail[j:end])
		} else {
			u.applyCounts(tail[j:end])
		}
	}
	return u
}
