package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// cooldownPolicy sets how long failures cool. A failure likely to pass by
// itself (a 5xx, a reset connection) starts at Transient; one a person must
// fix (a revoked key, a model the channel does not have) at Persistent. Each
// consecutive failure doubles the wait, up to Cap. A reset time the upstream
// gives (Retry-After and kin) replaces the computed wait, up to
// MaxUpstreamWait, which guards against nonsense headers.
type cooldownPolicy struct {
	Transient       time.Duration
	Persistent      time.Duration
	Cap             time.Duration
	MaxUpstreamWait time.Duration
}

// defaultCooldownPolicy is README's "Failover and cooldown".
var defaultCooldownPolicy = cooldownPolicy{
	Transient:       30 * time.Second,
	Persistent:      5 * time.Minute,
	Cap:             30 * time.Minute,
	MaxUpstreamWait: 24 * time.Hour,
}

// backoff is the wait after the n-th consecutive failure (n >= 1).
func backoff(base, limit time.Duration, n int) time.Duration {
	d := base
	for i := 1; i < n && d < limit; i++ {
		d *= 2
	}
	return min(d, limit)
}

// failClass sorts failures by how soon they are likely to pass.
type failClass uint8

const (
	transient failClass = iota
	persistent
)

// scope says what a failure is blamed on.
type scope uint8

const (
	scopeNone    scope = iota // the client's fault, or nobody's: nothing cools
	scopeKey                  // one key of the channel
	scopeChannel              // the whole channel
	scopeModel                // one model on the channel
	scopeNext                 // nobody's fault here: try the next channel, cool nothing
)

func (s scope) String() string {
	return [...]string{"none", "key", "channel", "model", "next"}[s]
}

// verdict is what the proxy concluded from one attempt.
type verdict struct {
	scope  scope
	class  failClass     // picks the backoff base from the policy
	base   time.Duration // overrides the policy's base when > 0
	wait   time.Duration // the upstream's own reset time; wins when > 0
	status int           // upstream status, or a synthetic one (502 for a dead connection)
	// started is when the failed attempt began. Only an attempt begun after
	// the scope's last counted failure counts as a consecutive one: ten
	// requests in flight when a channel hiccups once are one failure, not a
	// backoff doubled ten times. Zero counts always.
	started time.Time
	reason  string // short, for the log and the admin
}

// evidence is what one attempt showed, as judge reads it.
type evidence struct {
	// status is the HTTP status of an error answer, the status an error
	// document names (in a 200 or an SSE event), or one ccload stands in
	// for what happened: 502 for a dead connection or a broken body, 504
	// for a timeout.
	status int
	apiDoc bool        // the body or event was the protocol's JSON error document
	aux    bool        // count_tokens, an endpoint not every channel has
	header http.Header // the answer's headers, for the upstream's reset time; may be nil
	reason string      // short, for the log and the admin
}

// judge is the failure table (README "Failover and cooldown"): what one
// attempt's outcome blames, and how. Every place that sees an upstream fail
// (an error status, a 200 that carries an error, a stream that dies) asks
// it, so a rule changes here and nowhere else. scopeNone means the answer
// goes to the client as it is: a success, or the client's own error.
func judge(ev evidence, now time.Time) verdict {
	v := verdict{status: ev.status, reason: ev.reason}
	switch s := ev.status; {
	case s >= 200 && s < 300:
		return v
	case s == http.StatusNotFound && ev.aux:
		// A relay without count_tokens says nothing about the model or
		// the channel's real work: try the next one, cool nothing.
		v.scope = scopeNext
		if v.reason == "" {
			v.reason = "endpoint not supported by this channel"
		}
		return v
	case s == http.StatusNotFound && ev.apiDoc:
		v.scope, v.class = scopeModel, persistent // the API says: no such model here
	case s == http.StatusNotFound:
		v.scope, v.class = scopeChannel, transient // a wrong URL or a broken relay
	case s == 401 || s == 402 || s == 403:
		v.scope, v.class = scopeKey, persistent
	case s == http.StatusTooManyRequests:
		v.scope, v.class = scopeKey, transient
	case s == http.StatusRequestTimeout || s >= 500:
		v.scope, v.class = scopeChannel, transient
	case s < 400:
		// 1xx and 3xx: a redirect means a wrong channel URL (http for
		// https, a moved relay). It is never passed on: a client following
		// it would send its own token wherever it points.
		v.scope, v.class = scopeChannel, transient
		if v.reason == "" {
			v.reason = fmt.Sprintf("%d %s (check the channel URL)", s, http.StatusText(s))
		}
	default:
		return v // the client's own error: back as it is, nothing cools
	}
	v.wait = retryAfter(ev.header, ev.status, now)
	if v.reason == "" {
		v.reason = fmt.Sprintf("%d %s", ev.status, http.StatusText(ev.status))
	}
	return v
}

// clientFault reports whether an upstream status is the client's own error
// (400, 413, 422 and the like): it goes back as it is, unread, and nothing
// cools. It is judge's verdict, asked before the body is read.
func clientFault(status int) bool {
	return status >= 400 && judge(evidence{status: status}, time.Time{}).scope == scopeNone
}

// retryAfter reads the upstream's own reset time: Retry-After (seconds or a
// date) and retry-after-ms on any status; on a 429 also OpenAI's
// x-ratelimit-reset-* durations and Anthropic's anthropic-ratelimit-*-reset
// times, which APIs send on every response and which say when a limit
// resets, not when a failing key or channel recovers. 0 when none applies.
func retryAfter(h http.Header, status int, now time.Time) time.Duration {
	if v := h.Get("Retry-After-Ms"); v != "" {
		if ms, err := strconv.ParseFloat(v, 64); err == nil && ms > 0 {
			return time.Duration(ms * float64(time.Millisecond))
		}
	}
	if v := h.Get("Retry-After"); v != "" {
		if s, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && s > 0 {
			return time.Duration(s) * time.Second
		}
		if t, err := http.ParseTime(v); err == nil && t.After(now) {
			return t.Sub(now)
		}
	}
	var d time.Duration
	if status != http.StatusTooManyRequests {
		return 0
	}
	for name, vs := range h {
		lower := strings.ToLower(name)
		switch {
		case strings.HasPrefix(lower, "x-ratelimit-reset"):
			if v, err := time.ParseDuration(vs[0]); err == nil {
				d = max(d, v)
			}
		case strings.HasPrefix(lower, "anthropic-ratelimit-") && strings.HasSuffix(lower, "-reset"):
			if t, err := time.Parse(time.RFC3339, vs[0]); err == nil && t.After(now) {
				d = max(d, t.Sub(now))
			}
		}
	}
	return d
}

// coolSlot is the state of one scope. until is read on the hot path without
// a lock; everything else is guarded by the owning channelHealth.mu.
type coolSlot struct {
	until    atomic.Int64 // UnixNano; 0 when the scope has no failure on record
	trial    atomic.Int64 // UnixNano until which one request's trial of an expired cooldown holds; see claimTrial
	failures int
	lastFail int64 // UnixNano of the last failure counted in failures
	reason   string
	status   int
}

// cooling reports whether the slot blocks traffic at now (UnixNano).
func (s *coolSlot) cooling(now int64) bool {
	u := s.until.Load()
	return u != 0 && u > now
}

// trialHold bounds how long one request's trial of an expired cooldown keeps
// the others off the channel. The trial normally ends much sooner, when its
// attempt is judged (a failure cools again, a success clears); the hold
// only matters when the trying request vanishes without a verdict (its
// client went away), and must not stall the channel for long then.
const trialHold = 5 * time.Second

// claimTrial reports whether a request that planned the slot's scope may
// try it now, or should put it after every other candidate. A cooldown that
// has run out stays on record until a success clears it; until then the
// scope is on trial: one request at a time tries it. Without this, each
// request in flight when a dead channel's cooldown ends tries it before its
// next failure is judged, and a steadily failing channel takes a share of
// attempts that grows with the load. A scope that began cooling after the
// request planned it (the trial failed meanwhile) is put last too. The
// plan's last resort, cooling by definition, does not ask.
func (s *coolSlot) claimTrial(now int64) bool {
	u := s.until.Load()
	switch {
	case u == 0:
		return true
	case u > now:
		return false
	}
	t := s.trial.Load()
	return t <= now && s.trial.CompareAndSwap(t, now+int64(trialHold))
}

// claimTrial is coolSlot.claimTrial for the channel and the model: whether a
// request may try the channel for model now, or should put it last.
func (h *channelHealth) claimTrial(model string, now int64) bool {
	ms := h.modelSlot(model)
	if ms == nil {
		return h.ch.claimTrial(now)
	}
	// Both or neither: a request that holds the model's trial but is
	// refused the channel's puts the channel last and may never try it,
	// and would keep every request for the model off it meanwhile.
	if !ms.claimTrial(now) {
		return false
	}
	if !h.ch.claimTrial(now) {
		ms.releaseTrial(now)
		return false
	}
	return true
}

// releaseTrial gives back a trial claimed at now and not used.
func (s *coolSlot) releaseTrial(now int64) {
	s.trial.CompareAndSwap(now+int64(trialHold), 0)
}

// channelHealth is the mutable health of one channel. It lives apart from
// the channel's configuration, so that a snapshot rebuild for an unrelated
// edit keeps it; it is replaced when the channel's URL or keys change.
type channelHealth struct {
	id          int64
	fingerprint string // URL and keys this health describes

	mu sync.Mutex // guards retired, the non-atomic fields of ch, keys and models' slots, and writes to models
	// retired is set when the channel's URL or keys change or it is
	// deleted: requests still in flight on the old configuration must not
	// persist cooldowns that a restart would apply to the new one.
	retired bool
	ch      coolSlot
	keys    []coolSlot
	models  atomic.Pointer[map[string]*coolSlot] // copy on write; nil until a model first fails

	rr atomic.Uint32 // round robin position over keys
}

func (h *channelHealth) modelSlot(model string) *coolSlot {
	if m := h.models.Load(); m != nil {
		return (*m)[model]
	}
	return nil
}

// blockedUntil returns when the channel can next serve model, as UnixNano:
// 0 if it can now. A channel whose keys are all cooling is blocked until the
// first key frees.
func (h *channelHealth) blockedUntil(model string, now int64) int64 {
	var until int64
	if h.ch.cooling(now) {
		until = h.ch.until.Load()
	}
	if s := h.modelSlot(model); s != nil && s.cooling(now) {
		until = max(until, s.until.Load())
	}
	if len(h.keys) > 0 {
		soonest := int64(0)
		for i := range h.keys {
			if !h.keys[i].cooling(now) {
				soonest = 0
				break
			}
			if u := h.keys[i].until.Load(); soonest == 0 || u < soonest {
				soonest = u
			}
		}
		until = max(until, soonest)
	}
	return until
}

// cooldowns is the registry of every channel's health, plus the queue of
// changes waiting to be persisted.
type cooldowns struct {
	now    func() time.Time
	policy cooldownPolicy
	alerts *alerter // hears a scope start cooling and a cooldown cleared; nil: nobody

	mu   sync.Mutex // guards byID
	byID map[int64]*channelHealth

	pendingMu sync.Mutex // guards pending
	pending   map[cooldownKey]cooldownRecord
	wake      chan struct{} // capacity 1: "pending is not empty"

	// writeMu orders writes of cooldown rows: the persister holds it while
	// it writes a batch, and so does anything that deletes rows (a clear, a
	// change of URL or keys), so a batch taken before a clear can never be
	// written after it and bring the cooldown back on the next start.
	writeMu sync.Mutex

	// announce, if set, tells the other replicas of a change (cluster.go:
	// redisMirror.announce); it never blocks. all: every scope cleared.
	announce func(r cooldownRecord, all bool)
}

type cooldownKey struct {
	channelID int64
	keyIndex  int
	model     string
}

func newCooldowns(now func() time.Time) *cooldowns {
	return &cooldowns{
		now:     now,
		policy:  defaultCooldownPolicy,
		byID:    make(map[int64]*channelHealth),
		pending: make(map[cooldownKey]cooldownRecord),
		wake:    make(chan struct{}, 1),
	}
}

// sync makes the registry match the channel set: a health per channel, kept
// when its fingerprint (URL and keys) is unchanged and fresh otherwise;
// health of deleted channels is dropped. It returns the health by channel
// id, and the ids whose old health it retired: their stored cooldown rows
// describe an upstream that is no longer configured, and the caller
// deletes them. This is the one place that rule lives.
func (c *cooldowns) sync(channels []Channel) (health map[int64]*channelHealth, retired []int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	next := make(map[int64]*channelHealth, len(channels))
	for i := range channels {
		ch := &channels[i]
		fp := channelFingerprint(ch)
		h := c.byID[ch.ID]
		if h == nil || h.fingerprint != fp {
			if h != nil {
				c.retire(h)
				retired = append(retired, ch.ID)
			}
			h = &channelHealth{id: ch.ID, fingerprint: fp, keys: make([]coolSlot, len(ch.APIKeys))}
		}
		next[ch.ID] = h
	}
	for id, h := range c.byID {
		if _, kept := next[id]; !kept {
			c.retire(h)
			retired = append(retired, id)
		}
	}
	c.byID = next
	health = make(map[int64]*channelHealth, len(next))
	for id, h := range next {
		health[id] = h
	}
	return health, retired
}

// retire stops h persisting anything more and forgets what it queued.
// Marking under h.mu orders it against fail and succeed, which queue under
// h.mu: a row queued before is dropped here, and none is queued after.
func (c *cooldowns) retire(h *channelHealth) {
	h.mu.Lock()
	h.retired = true
	h.mu.Unlock()
	c.dropPending(h.id)
}

func channelFingerprint(ch *Channel) string {
	n := len(ch.URL)
	for _, k := range ch.APIKeys {
		n += len(k) + 1
	}
	b := make([]byte, 0, n)
	b = append(b, ch.URL...)
	for _, k := range ch.APIKeys {
		b = append(b, 0)
		b = append(b, k...)
	}
	return string(b)
}

func (c *cooldowns) get(id int64) *channelHealth {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.byID[id]
}

// restore applies persisted records to the registry; records of unknown
// channels or keys are ignored.
func (c *cooldowns) restore(recs []cooldownRecord) int {
	n := 0
	for _, r := range recs {
		h := c.get(r.ChannelID)
		if h == nil {
			continue
		}
		h.mu.Lock()
		if s := h.slotFor(r); s != nil {
			s.failures, s.reason, s.status = r.Failures, r.Reason, r.Status
			s.until.Store(r.Until.UnixNano())
			n++
		}
		h.mu.Unlock()
	}
	return n
}

// slotFor is the slot a stored or announced record describes, nil when its
// key index is out of range. The caller holds h.mu.
func (h *channelHealth) slotFor(r cooldownRecord) *coolSlot {
	switch {
	case r.Model != "":
		return h.modelSlotLocked(r.Model)
	case r.KeyIndex >= 0 && r.KeyIndex < len(h.keys):
		return &h.keys[r.KeyIndex]
	case r.KeyIndex < 0:
		return &h.ch
	}
	return nil
}

// modelSlotLocked returns the slot for model, creating it. h.mu must be held.
func (h *channelHealth) modelSlotLocked(model string) *coolSlot {
	old := h.models.Load()
	if old != nil {
		if s := (*old)[model]; s != nil {
			return s
		}
	}
	next := make(map[string]*coolSlot, 1)
	if old != nil {
		for k, v := range *old {
			next[k] = v
		}
	}
	s := &coolSlot{}
	next[model] = s
	h.models.Store(&next)
	return s
}

// fail records a failure of the given verdict and returns the time the scope
// frees.
func (c *cooldowns) fail(h *channelHealth, keyIndex int, model string, v verdict) time.Time {
	now := c.now()
	h.mu.Lock()
	var (
		s   *coolSlot
		key = cooldownKey{channelID: h.id, keyIndex: -1}
	)
	switch v.scope {
	case scopeKey:
		if keyIndex < 0 || keyIndex >= len(h.keys) {
			h.mu.Unlock()
			return now
		}
		s, key.keyIndex = &h.keys[keyIndex], keyIndex
	case scopeModel:
		s, key.model = h.modelSlotLocked(model), model
	case scopeChannel:
		s = &h.ch
	default:
		h.mu.Unlock()
		return now
	}
	wasCooling := s.cooling(now.UnixNano())
	counted := v.started.IsZero() || v.started.UnixNano() > s.lastFail || s.failures == 0
	if counted {
		s.failures++
		s.lastFail = now.UnixNano()
	}
	base := v.base
	if base <= 0 {
		base = c.policy.Transient
		if v.class == persistent {
			base = c.policy.Persistent
		}
	}
	d := backoff(base, c.policy.Cap, s.failures)
	if v.wait > 0 {
		d = min(v.wait, c.policy.MaxUpstreamWait)
	}
	until := now.Add(d)
	if !counted {
		if u := time.Unix(0, s.until.Load()); u.After(until) {
			until = u
		}
	}
	s.reason, s.status = v.reason, v.status
	s.until.Store(until.UnixNano())
	s.trial.Store(0) // the trial, if this was one, has its verdict
	rec := cooldownRecord{ChannelID: h.id, KeyIndex: key.keyIndex, Model: key.model,
		Until: until, Failures: s.failures, Reason: s.reason, Status: s.status}
	// Queued under h.mu, so a retirement (see sync) orders against it.
	if !h.retired {
		c.persist(key, rec)
		if !wasCooling {
			c.alerts.cooling(h.id, v.scope, keyIndex, model, v, until)
		}
	}
	h.mu.Unlock()
	return until
}

// succeed clears what a success disproves: the channel's cooldown, the key's
// and the model's. The check before locking keeps the common case (nothing
// on record) free of locks.
func (c *cooldowns) succeed(h *channelHealth, keyIndex int, model string) {
	ks := (*coolSlot)(nil)
	if keyIndex >= 0 && keyIndex < len(h.keys) {
		ks = &h.keys[keyIndex]
	}
	ms := h.modelSlot(model)
	if h.ch.until.Load() == 0 && (ks == nil || ks.until.Load() == 0) && (ms == nil || ms.until.Load() == 0) {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	back := false // a cooldown worth an alert was cleared: not a rate limit's
	clear := func(s *coolSlot, k cooldownKey) {
		if s != nil && s.until.Load() != 0 {
			back = back || s.status != http.StatusTooManyRequests
			s.until.Store(0)
			s.failures, s.lastFail, s.reason, s.status = 0, 0, "", 0
			if !h.retired {
				c.persist(k, cooldownRecord{ChannelID: k.channelID, KeyIndex: k.keyIndex, Model: k.model})
			}
		}
	}
	clear(&h.ch, cooldownKey{h.id, -1, ""})
	clear(ks, cooldownKey{h.id, keyIndex, ""})
	clear(ms, cooldownKey{h.id, -1, model})
	if back && !h.retired {
		c.alerts.recovered(h.id, model)
	}
}

// clearAll lifts every cooldown of the channel (admin action). The caller
// deletes the stored rows, inside exclusive, so nothing is queued.
func (c *cooldowns) clearAll(h *channelHealth) {
	c.resetAll(h)
	if c.announce != nil {
		c.announce(cooldownRecord{ChannelID: h.id, KeyIndex: -1}, true)
	}
}

// resetAll is clearAll without telling the other replicas (it is how their
// clear is applied here).
func (c *cooldowns) resetAll(h *channelHealth) {
	h.mu.Lock()
	defer h.mu.Unlock()
	reset := func(s *coolSlot) {
		s.until.Store(0)
		s.failures, s.lastFail, s.reason, s.status = 0, 0, "", 0
	}
	reset(&h.ch)
	for i := range h.keys {
		reset(&h.keys[i])
	}
	if m := h.models.Load(); m != nil {
		for _, s := range *m {
			reset(s)
		}
	}
	c.dropPending(h.id)
}

// persist queues a change for the database and tells the other replicas.
func (c *cooldowns) persist(k cooldownKey, r cooldownRecord) {
	c.queue(k, r)
	if c.announce != nil {
		c.announce(r, false)
	}
}

func (c *cooldowns) queue(k cooldownKey, r cooldownRecord) {
	c.pendingMu.Lock()
	c.pending[k] = r
	c.pendingMu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *cooldowns) takePending() []cooldownRecord {
	c.pendingMu.Lock()
	defer c.pendingMu.Unlock()
	if len(c.pending) == 0 {
		return nil
	}
	out := make([]cooldownRecord, 0, len(c.pending))
	for k, r := range c.pending {
		out = append(out, r)
		delete(c.pending, k)
	}
	return out
}

// persistLoop writes queued cooldown changes to the store until ctx ends,
// then writes what is left. Bursts coalesce: only the latest state of a
// scope is written. A failed write is retried on the next change or flush.
func (c *cooldowns) persistLoop(ctx context.Context, s *Store) {
	for {
		select {
		case <-c.wake:
			// Not cancelled with ctx: a batch already taken is written
			// whole, so shutdown never loses it.
			c.flush(context.WithoutCancel(ctx), s)
		case <-ctx.Done():
			c.flush(context.WithoutCancel(ctx), s)
			return
		}
	}
}

// flush writes the pending changes now.
func (c *cooldowns) flush(ctx context.Context, s *Store) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	recs := c.takePending()
	if len(recs) == 0 {
		return
	}
	if err := s.SaveCooldowns(ctx, recs); err != nil {
		slog.Error("persist cooldowns", "err", err, "records", len(recs))
		c.pendingMu.Lock()
		for _, r := range recs {
			k := cooldownKey{r.ChannelID, r.KeyIndex, r.Model}
			if _, newer := c.pending[k]; !newer {
				c.pending[k] = r
			}
		}
		c.pendingMu.Unlock()
	}
}

// exclusive runs f while no batch of cooldown rows is being written; see
// writeMu.
func (c *cooldowns) exclusive(f func() error) error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	return f()
}

// dropPending forgets queued changes of a channel whose rows are being
// deleted.
func (c *cooldowns) dropPending(channelID int64) {
	c.pendingMu.Lock()
	defer c.pendingMu.Unlock()
	for k := range c.pending {
		if k.channelID == channelID {
			delete(c.pending, k)
		}
	}
}

// healthState is the admin view of a channel's health.
type healthState struct {
	CooldownUntil  *time.Time   `json:"cooldown_until"`
	CooldownReason string       `json:"cooldown_reason"`
	Failures       int          `json:"failures"`
	Keys           []keyState   `json:"keys"`
	Models         []modelState `json:"models"`
}

type keyState struct {
	Index         int        `json:"index"`
	CooldownUntil *time.Time `json:"cooldown_until"`
	Reason        string     `json:"reason"`
	Failures      int        `json:"failures"`
}

type modelState struct {
	Model         string     `json:"model"`
	CooldownUntil *time.Time `json:"cooldown_until"`
	Reason        string     `json:"reason"`
	Failures      int        `json:"failures"`
}

// state returns the admin view at now. Only scopes still cooling carry a
// cooldown_until; failures show the consecutive count either way.
func (h *channelHealth) state(now time.Time) healthState {
	n := now.UnixNano()
	at := func(s *coolSlot) *time.Time {
		if !s.cooling(n) {
			return nil
		}
		t := time.Unix(0, s.until.Load()).UTC()
		return &t
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	st := healthState{
		CooldownUntil: at(&h.ch),
		Failures:      h.ch.failures,
		Keys:          make([]keyState, len(h.keys)),
		Models:        []modelState{},
	}
	if st.CooldownUntil != nil {
		st.CooldownReason = h.ch.reason
	}
	for i := range h.keys {
		k := &h.keys[i]
		st.Keys[i] = keyState{Index: i, CooldownUntil: at(k), Failures: k.failures}
		if st.Keys[i].CooldownUntil != nil {
			st.Keys[i].Reason = k.reason
		}
	}
	if m := h.models.Load(); m != nil {
		for name, s := range *m {
			if u := at(s); u != nil {
				st.Models = append(st.Models, modelState{Model: name, CooldownUntil: u, Reason: s.reason, Failures: s.failures})
			}
		}
		slices.SortFunc(st.Models, func(a, b modelState) int { return strings.Compare(a.Model, b.Model) })
	}
	return st
}
