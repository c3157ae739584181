package main

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"hash/maphash"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Session affinity (README "Session affinity", SPEC §8). Claude Code and
// Codex resend the whole conversation on every turn and the upstream's
// prompt cache makes that cheap, but only on the (channel, key) that saw
// the previous turn. So a conversation's session is bound to the (channel,
// key) that last served it, and its next turn goes there first, as long as
// that is healthy and in the best healthy priority; otherwise the normal
// plan runs and the binding follows whoever serves.
//
// The hot path costs one map lookup under a mutex when the request is
// admitted and one more when it is logged; the identity comes from spans
// the body scan already recorded (protocol.go: jsonScan.member).

// affinityConfig tunes session affinity. The zero value is on, with the
// defaults below.
type affinityConfig struct {
	// Off turns affinity off: every request takes the normal plan.
	Off bool
	// TTL is how long a binding lives without use. Zero means 1 h.
	TTL time.Duration
	// Max bounds the bindings held; the least recently used goes first.
	// Zero means 100 000 (about 7 MB).
	Max int
}

func (c affinityConfig) ttl() time.Duration {
	if c.TTL > 0 {
		return c.TTL
	}
	return time.Hour
}

func (c affinityConfig) max() int {
	if c.Max > 0 {
		return c.Max
	}
	return 100_000
}

// loadAffinityConfig reads CCLOAD_AFFINITY, CCLOAD_AFFINITY_TTL and
// CCLOAD_AFFINITY_MAX.
func loadAffinityConfig(getenv func(string) string) (affinityConfig, []error) {
	var c affinityConfig
	var errs []error
	switch v := strings.ToLower(strings.TrimSpace(getenv("CCLOAD_AFFINITY"))); v {
	case "", "on", "true", "1", "yes":
	case "off", "false", "0", "no":
		c.Off = true
	default:
		errs = append(errs, fmt.Errorf("CCLOAD_AFFINITY=%q: want on or off", v))
	}
	if v := getenv("CCLOAD_AFFINITY_TTL"); v != "" {
		d, err := parseDuration(v)
		if err != nil || d <= 0 {
			errs = append(errs, fmt.Errorf("CCLOAD_AFFINITY_TTL=%q: want a duration like 1h or 30m", v))
		}
		c.TTL = d
	}
	if v := getenv("CCLOAD_AFFINITY_MAX"); v != "" {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n <= 0 {
			errs = append(errs, fmt.Errorf("CCLOAD_AFFINITY_MAX=%q: want a positive number of sessions", v))
		}
		c.Max = n
	}
	return c, errs
}

// maxSessionID bounds the bytes of a client's session id that count: ids
// are uuids, and a hostile 10 MB id must cost no more than a real one.
const maxSessionID = 256

// sessionOf finds the session of a request, first match wins (SPEC §8):
// Anthropic's X-Claude-Code-Session-Id header, else metadata.user_id;
// OpenAI's prompt_cache_key, else the session headers Codex and others
// send; else a hash of the leading conversation (system, tools, first
// message). ok is false when the request carries none of them.
func sessionOf(h http.Header, p protocol, body []byte, info *bodyInfo) (id uint64, ok bool) {
	switch p {
	case protoAnthropic:
		if v := h.Get("X-Claude-Code-Session-Id"); v != "" {
			return hashID(v), true
		}
		if !info.userID.empty() {
			if v := userSession(info.userID.of(body)); v != "" {
				return hashID(v), true
			}
		}
	case protoOpenAI:
		if !info.cacheKey.empty() {
			if v := jsonText(info.cacheKey.of(body)); v != "" {
				return hashID(v), true
			}
		}
		// Current Codex sends session-id with the same uuid as
		// prompt_cache_key; the others are what other clients use.
		for _, k := range [...]string{"Session-Id", "Session_id", "X-Session-Id", "Conversation_id", "Conversation-Id"} {
			if v := h.Get(k); v != "" {
				return hashID(v), true
			}
		}
	}
	if info.firstMsg.empty() {
		return 0, false
	}
	// No id: the leading conversation names it. The three parts stay the
	// same on every turn of one conversation, and differ between
	// conversations as soon as the first message does.
	c, i := uint32(0), uint32(0)
	for _, sp := range [...]span{info.system, info.tools, info.firstMsg} {
		if !sp.empty() {
			b := sp.of(body)
			c, i = crc32.Update(c, castagnoli, b), crc32.Update(i, crc32.IEEETable, b)
		}
		c, i = crc32.Update(c, castagnoli, sep), crc32.Update(i, crc32.IEEETable, sep)
	}
	return uint64(c)<<32 | uint64(i) | 1, true // |1: never 0, which means none
}

var (
	castagnoli = crc32.MakeTable(crc32.Castagnoli)
	sep        = []byte{0}
)

// hashID is a session id's stable 64-bit digest (FNV-1a), so a log's
// session is the same across restarts. It reads the string in place: ids
// are short, and handing one to hash/crc32 would copy it to the heap.
func hashID(v string) uint64 {
	if len(v) > maxSessionID {
		v = v[:maxSessionID]
	}
	h := uint64(14695981039346656037)
	for i := 0; i < len(v); i++ {
		h = (h ^ uint64(v[i])) * 1099511628211
	}
	return h | 1
}

// userSession is the session in metadata.user_id: its session_id when it
// is a JSON object in a string (current Claude Code), the part after
// "_session_" in the older user_…_account_…_session_<uuid> form, or any
// other string as a whole. A value that is not a string names nothing.
func userSession(raw []byte) string {
	v := jsonText(raw)
	if v == "" {
		return ""
	}
	if strings.HasPrefix(v, "{") {
		var sid string
		forEachMember([]byte(v), func(k, val []byte) {
			if string(k) == "session_id" {
				sid = jsonText(val)
			}
		})
		if sid != "" {
			return sid
		}
		return v
	}
	if i := strings.LastIndex(v, "_session_"); i >= 0 && i+len("_session_") < len(v) {
		return v[i+len("_session_"):]
	}
	return v
}

// jsonText is the text of a JSON string value (raw, quotes included),
// "" for any other value. Past maxSessionID bytes the raw bytes are cut
// first, so a huge value is never decoded whole.
func jsonText(raw []byte) string {
	if len(raw) < 2 || raw[0] != '"' {
		return ""
	}
	if len(raw) > maxSessionID+2 {
		return string(raw[1 : maxSessionID+1])
	}
	inner := raw[1 : len(raw)-1]
	if bytes.IndexByte(inner, '\\') < 0 {
		return string(inner)
	}
	var s string
	json.Unmarshal(raw, &s) // valid: the body scan checked it
	return s
}

// affinityResult is what affinity did for one request, for the log row
// and /metrics.
type affinityResult uint8

const (
	affinityNone  affinityResult = iota // off, or no session
	affinityNew                         // no binding: the normal plan served it
	affinityHit                         // served by the bound (channel, key)
	affinityMoved                       // bound elsewhere; the binding moved to whoever served
	affinityMiss                        // bound, but nothing served it: the binding stays
	affinityResults
)

func (r affinityResult) String() string {
	return [...]string{"", "new", "hit", "moved", "miss"}[r]
}

// affinityState is one request's part in affinity, held by its exchange.
type affinityState struct {
	session uint64 // 0: none
	scoped  uint64 // session scoped by client token and protocol: the binding's key
	bound   bool
	channel int64 // the binding, when bound
	key     int
	// prefer is the channel the plan puts first (0: none): the bound
	// one when it was usable.
	prefer int64
}

// sessionLabel is the session as the log shows it: a short hash, never
// the raw id.
func (s *affinityState) sessionLabel() string {
	if s.session == 0 {
		return ""
	}
	var b [8]byte
	for i := range b {
		b[i] = byte(s.session >> (56 - 8*i))
	}
	return hex.EncodeToString(b[:6])
}

// keyOrder puts the bound key first in the keys planned for e, when it is
// among them (not cooling): key affinity holds with either key strategy.
func (s *affinityState) keyOrder(e *channelEntry, keys []int) []int {
	if s.prefer == 0 || e.ch.ID != s.prefer {
		return keys
	}
	for i, k := range keys {
		if k == s.key {
			copy(keys[1:i+1], keys[:i])
			keys[0] = k
			break
		}
	}
	return keys
}

// affinity is the relay's binding table and its configuration.
type affinity struct {
	cfg   affinityConfig
	seed  maphash.Seed
	table bindings
	// shared sends bindings to the other replicas (sharedaffinity.go);
	// nil: one replica.
	shared *sharedBindings
}

// newAffinity returns nil when affinity is off: every method of a nil
// *affinity does nothing.
func newAffinity(cfg affinityConfig) *affinity {
	if cfg.Off {
		return nil
	}
	a := &affinity{cfg: cfg, seed: maphash.MakeSeed()}
	a.table.init(cfg.max(), cfg.ttl())
	return a
}

// sessionScope is what one binding is for. The model is part of it: a
// prompt cache is per model, and Claude Code sends its side requests (a
// small model titling the conversation, say) with the same session id;
// were they one binding, each would pull the main conversation away from
// its cache.
type sessionScope struct {
	token   string
	proto   protocol
	model   string
	session uint64
}

// route finds the request's session and, when it is bound to a usable
// (channel, key), puts that channel first in the plan. Usable means: in
// the plan (enabled, serving the model, not cooling for it), in the
// plan's first priority (the best one with a healthy channel: a session
// that a failure moved down comes back up), and the key not cooling.
// Anything else leaves the plan as it is; the binding moves when the
// request succeeds elsewhere.
func (a *affinity) route(x *exchange, h http.Header, now time.Time) {
	if a == nil || x.probe {
		return
	}
	s := &x.aff
	id, ok := sessionOf(h, x.proto, x.body, &x.info)
	if !ok {
		return
	}
	s.session = id
	if a.shared == nil {
		s.scoped = maphash.Comparable(a.seed, sessionScope{x.token, x.proto, x.model, id})
	} else {
		s.scoped = stableScope(sessionScope{x.token, x.proto, x.model, id})
	}
	ch, k, ok := a.table.lookup(s.scoped, now.UnixNano())
	if !ok {
		if a.shared != nil {
			a.shared.fetch(s.scoped)
		}
		return
	}
	s.bound, s.channel, s.key = true, ch, k
	order := x.plan.order
	if len(order) == 0 {
		return
	}
	top := order[0].ch.Priority
	for i, e := range order {
		if e.ch.Priority != top {
			break
		}
		if e.ch.ID != ch {
			continue
		}
		if k >= len(e.health.keys) || e.health.keys[k].cooling(now.UnixNano()) {
			return
		}
		copy(order[1:i+1], order[:i])
		order[0] = e
		s.prefer = ch
		return
	}
}

// settle records what affinity did for a finished request in its log row
// and metrics, and binds the session to whoever served it. Only a success
// binds; count_tokens never does (not every channel has it, and it must
// not pull a conversation away from its cache).
func (a *affinity) settle(x *exchange, e *logEntry, m *metrics, now time.Time) {
	s := &x.aff
	if a == nil || s.session == 0 {
		return
	}
	e.Session = s.sessionLabel()
	var t *try
	if x.served >= 0 && x.status >= 200 && x.status < 300 {
		t = &x.tries[x.served]
	}
	r := affinityNew
	switch {
	case !s.bound:
	case t == nil:
		r = affinityMiss
	case t.entry.ch.ID == s.channel && t.key == s.key:
		r = affinityHit
	default:
		r = affinityMoved
	}
	if t != nil && !x.aux {
		a.table.bind(s.scoped, t.entry.ch.ID, t.key, now.UnixNano())
		if a.shared != nil && r != affinityHit {
			a.shared.share(s.scoped, t.entry.ch.ID, t.key)
		}
	}
	e.Affinity = r.String()
	m.affinity(r)
}

// bindings is an LRU table of session → (channel, key) with a sliding
// TTL. Nodes live in one slice linked by index and the map holds indexes,
// so the table holds no pointers for the collector to scan and costs
// about 70 bytes a binding (TestAffinityMemory measures it).
type bindings struct {
	mu    sync.Mutex // guards every field below
	idx   map[uint64]int32
	nodes []binding
	head  int32 // most recently used; -1 when empty
	tail  int32 // least recently used; -1 when empty
	free  int32 // first free node, linked by next; -1 when none
	max   int
	ttl   int64
}

type binding struct {
	key        uint64
	channel    int64
	used       int64 // UnixNano of the last success
	keyIndex   int32
	prev, next int32
}

func (t *bindings) init(max int, ttl time.Duration) {
	t.idx = make(map[uint64]int32)
	t.head, t.tail, t.free = -1, -1, -1
	t.max, t.ttl = max, int64(ttl)
}

// lookup returns key's binding, unless it expired (then it is dropped).
func (t *bindings) lookup(key uint64, now int64) (channel int64, keyIndex int, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	i, ok := t.idx[key]
	if !ok {
		return 0, 0, false
	}
	n := &t.nodes[i]
	if now-n.used > t.ttl {
		t.remove(i)
		return 0, 0, false
	}
	return n.channel, int(n.keyIndex), true
}

// bind sets key's binding and makes it the most recently used, dropping
// expired bindings and, at the bound, the least recently used.
func (t *bindings) bind(key uint64, channel int64, keyIndex int, now int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if i, ok := t.idx[key]; ok {
		n := &t.nodes[i]
		n.channel, n.keyIndex, n.used = channel, int32(keyIndex), now
		t.unlink(i)
		t.pushFront(i)
		return
	}
	for t.tail >= 0 && (len(t.idx) >= t.max || now-t.nodes[t.tail].used > t.ttl) {
		t.remove(t.tail)
	}
	var i int32
	if t.free >= 0 {
		i, t.free = t.free, t.nodes[t.free].next
	} else {
		i = int32(len(t.nodes))
		t.nodes = append(t.nodes, binding{})
	}
	t.nodes[i] = binding{key: key, channel: channel, used: now, keyIndex: int32(keyIndex)}
	t.idx[key] = i
	t.pushFront(i)
}

func (t *bindings) remove(i int32) {
	t.unlink(i)
	delete(t.idx, t.nodes[i].key)
	t.nodes[i] = binding{next: t.free}
	t.free = i
}

func (t *bindings) unlink(i int32) {
	n := &t.nodes[i]
	if n.prev >= 0 {
		t.nodes[n.prev].next = n.next
	} else {
		t.head = n.next
	}
	if n.next >= 0 {
		t.nodes[n.next].prev = n.prev
	} else {
		t.tail = n.prev
	}
	n.prev, n.next = -1, -1
}

func (t *bindings) pushFront(i int32) {
	n := &t.nodes[i]
	n.prev, n.next = -1, t.head
	if t.head >= 0 {
		t.nodes[t.head].prev = i
	}
	t.head = i
	if t.tail < 0 {
		t.tail = i
	}
}

func (t *bindings) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.idx)
}
