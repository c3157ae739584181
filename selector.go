package main

import (
	"cmp"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
)

// channelEntry is one enabled channel as the proxy sees it: configuration
// prepared for the hot path plus a pointer to its mutable health. Entries are
// immutable once built.
type channelEntry struct {
	ch       Channel
	proto    protocol
	health   *channelHealth
	base     *url.URL
	official bool                // api.anthropic.com: x-api-key only
	serves   map[string]struct{} // nil serves any model
	// Header values per key, prepared once so an attempt sets them without
	// allocating. http.Header values are never mutated in place by net/http.
	keyValue    [][]string // the bare key
	bearerValue [][]string // "Bearer " + key
}

func (e *channelEntry) servesModel(model string) bool {
	if e.serves == nil {
		return true
	}
	_, ok := e.serves[model]
	return ok
}

// upstreamModel is the model name sent upstream for the asked one.
func (e *channelEntry) upstreamModel(model string) string {
	if m, ok := e.ch.ModelRedirects[model]; ok && m != "" {
		return m
	}
	return model
}

// keyOrder appends to buf the indexes of the keys to try, in order: keys not
// cooling, by the channel's strategy. If every key is cooling, it returns the
// one that frees first, so a channel chosen as the last resort still gets
// one attempt.
func (e *channelEntry) keyOrder(now int64, buf []int) []int {
	h := e.health
	n := len(h.keys)
	start := 0
	if e.ch.KeyStrategy == keyRoundRobin && n > 1 {
		start = int(h.rr.Add(1)-1) % n
	}
	soonest, soonestAt := -1, int64(0)
	for j := range n {
		i := (start + j) % n
		if !h.keys[i].cooling(now) {
			buf = append(buf, i)
			continue
		}
		if u := h.keys[i].until.Load(); soonest < 0 || u < soonestAt {
			soonest, soonestAt = i, u
		}
	}
	if len(buf) == 0 && soonest >= 0 {
		buf = append(buf, soonest)
	}
	return buf
}

// tier holds the channels of one priority that can serve a route, and the
// round robin counter that rotates among them.
type tier struct {
	priority int
	entries  []*channelEntry
	rr       *atomic.Uint64
}

// route is the ordered candidate set for one protocol and model.
type route struct {
	tiers []tier
	count int
}

// snapshot is an immutable view of every channel, swapped whole on each edit
// so the hot path reads it with one atomic load and no lock.
type snapshot struct {
	entries []*channelEntry // enabled, by id
	all     []Channel       // every channel, enabled or not
	byID    map[int64]*channelEntry
	routes  [protocolCount]protoRoutes
	health  map[int64]*channelHealth // every channel's, enabled or not
}

type protoRoutes struct {
	byModel map[string]*route // models some channel lists (or redirects)
	any     *route            // channels that serve any model
	models  []string          // sorted, for GET /v1/models
}

// route returns the candidates for p and model, nil when none.
func (s *snapshot) route(p protocol, model string) *route {
	pr := &s.routes[p]
	if r, ok := pr.byModel[model]; ok {
		return r
	}
	return pr.any
}

// newEntry prepares one channel for the hot path. h is its health; nil
// gives it a fresh one.
func newEntry(c Channel, h *channelHealth) (*channelEntry, error) {
	p, err := parseChannelType(c.Type)
	if err != nil {
		return nil, fmt.Errorf("channel %d: %w", c.ID, err)
	}
	base, err := url.Parse(c.URL)
	if err != nil {
		return nil, fmt.Errorf("channel %d: url: %w", c.ID, err)
	}
	base.Path = strings.TrimSuffix(base.Path, "/")
	base.RawPath = strings.TrimSuffix(base.RawPath, "/")
	e := &channelEntry{
		ch:       c,
		proto:    p,
		health:   h,
		base:     base,
		official: strings.EqualFold(base.Hostname(), "api.anthropic.com"),
	}
	if e.health == nil {
		e.health = &channelHealth{id: c.ID, keys: make([]coolSlot, len(c.APIKeys))}
	}
	for _, k := range c.APIKeys {
		e.keyValue = append(e.keyValue, []string{k})
		e.bearerValue = append(e.bearerValue, []string{"Bearer " + k})
	}
	// Empty models means any model, redirects or not; a list is widened by
	// the redirects' asked names.
	if len(c.Models) > 0 {
		e.serves = make(map[string]struct{})
		for _, m := range c.Models {
			e.serves[m] = struct{}{}
		}
		for m := range c.ModelRedirects {
			e.serves[m] = struct{}{}
		}
	}
	return e, nil
}

// buildSnapshot prepares channels for the hot path. health maps every
// channel id to its health (see cooldowns.sync).
func buildSnapshot(channels []Channel, health map[int64]*channelHealth) (*snapshot, error) {
	s := &snapshot{all: channels, byID: make(map[int64]*channelEntry), health: health}
	for i := range channels {
		c := channels[i]
		if !c.Enabled {
			continue
		}
		e, err := newEntry(c, health[c.ID])
		if err != nil {
			return nil, err
		}
		s.entries = append(s.entries, e)
		s.byID[c.ID] = e
	}
	for p := protocol(1); p < protocolCount; p++ {
		var mine []*channelEntry
		names := map[string]struct{}{}
		for _, e := range s.entries {
			if e.proto != p {
				continue
			}
			mine = append(mine, e)
			for m := range e.serves {
				names[m] = struct{}{}
			}
			for m := range e.ch.ModelRedirects {
				names[m] = struct{}{}
			}
		}
		pr := protoRoutes{byModel: make(map[string]*route, len(names))}
		for m := range names {
			pr.byModel[m] = newRoute(mine, func(e *channelEntry) bool { return e.servesModel(m) })
			pr.models = append(pr.models, m)
		}
		slices.Sort(pr.models)
		pr.any = newRoute(mine, func(e *channelEntry) bool { return e.serves == nil })
		s.routes[p] = pr
	}
	return s, nil
}

func newRoute(entries []*channelEntry, keep func(*channelEntry) bool) *route {
	var picked []*channelEntry
	for _, e := range entries {
		if keep(e) {
			picked = append(picked, e)
		}
	}
	if len(picked) == 0 {
		return nil
	}
	// Highest priority first; ids keep the order stable inside a tier.
	slices.SortStableFunc(picked, func(a, b *channelEntry) int {
		return cmp.Or(cmp.Compare(b.ch.Priority, a.ch.Priority), cmp.Compare(a.ch.ID, b.ch.ID))
	})
	r := &route{count: len(picked)}
	for _, e := range picked {
		if n := len(r.tiers); n == 0 || r.tiers[n-1].priority != e.ch.Priority {
			r.tiers = append(r.tiers, tier{priority: e.ch.Priority, rr: new(atomic.Uint64)})
		}
		t := &r.tiers[len(r.tiers)-1]
		t.entries = append(t.entries, e)
	}
	return r
}

// plan is the order in which one request tries channels.
type plan struct {
	order []*channelEntry // not cooling at planning time, in try order
	// lastResort is the cooling candidate that frees first: tried once after
	// order is exhausted, so a request is not refused while some channel
	// might already serve it.
	lastResort      *channelEntry
	lastResortUntil int64 // UnixNano
	total           int   // candidates considered
}

// candidate returns the i-th channel to try: the planned order, then the
// last resort; nil when there is none left.
func (p *plan) candidate(i int) *channelEntry {
	switch {
	case i < len(p.order):
		return p.order[i]
	case i == len(p.order):
		return p.lastResort
	}
	return nil
}

// makePlan orders r's channels for one request at now (UnixNano), appending
// to buf. Inside a tier the channels not cooling are rotated by the tier's
// counter, so equal channels share load evenly however many of them cool.
func (r *route) makePlan(model string, now int64, buf []*channelEntry) plan {
	p := plan{order: buf[:0], total: r.count}
	for ti := range r.tiers {
		t := &r.tiers[ti]
		first := len(p.order)
		for _, e := range t.entries {
			u := e.health.blockedUntil(model, now)
			if u == 0 {
				p.order = append(p.order, e)
				continue
			}
			if p.lastResort == nil || u < p.lastResortUntil {
				p.lastResort, p.lastResortUntil = e, u
			}
		}
		if healthy := p.order[first:]; len(healthy) > 1 {
			k := int(t.rr.Add(1)-1) % len(healthy)
			rotateLeft(healthy, k)
		}
	}
	return p
}

// rotateLeft moves s[k:] before s[:k] in place.
func rotateLeft(s []*channelEntry, k int) {
	if k == 0 {
		return
	}
	slices.Reverse(s[:k])
	slices.Reverse(s[k:])
	slices.Reverse(s)
}

// selector owns the current snapshot.
type selector struct {
	snap atomic.Pointer[snapshot]
	cool *cooldowns
}

func newSelector(cool *cooldowns) *selector {
	s := &selector{cool: cool}
	empty, _ := buildSnapshot(nil, nil)
	s.snap.Store(empty)
	return s
}

// load swaps in a snapshot of channels. Requests in flight keep the snapshot
// they started with. It returns the ids whose cooldowns no longer apply
// (see cooldowns.sync).
func (s *selector) load(channels []Channel) (retired []int64, err error) {
	health, retired := s.cool.sync(channels)
	snap, err := buildSnapshot(channels, health)
	if err != nil {
		return retired, err
	}
	s.snap.Store(snap)
	return retired, nil
}

func (s *selector) current() *snapshot { return s.snap.Load() }
