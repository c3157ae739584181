package main

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// How ccload gives up. When no candidate could serve a request, the client
// hears it at once, in its protocol's shape (see errorKinds), and is told
// whether retrying can help: the official SDKs, Claude Code and Codex all
// retry by themselves, obey Retry-After up to a minute and honour
// x-should-retry. Without that advice a default SDK retried into channels
// that had not recovered, doubling their cooldowns, and showed the error
// after 90 s.

// retryWindow is how soon a candidate must free for ccload to ask the
// client to retry (with Retry-After): within it a retry can find a channel
// that serves; beyond it the client is told not to retry, and the message
// says when the first channel frees.
const retryWindow = 5 * time.Second

// adviseRetry sets the headers that tell an SDK whether retrying helps:
// Retry-After when the first candidate frees within retryWindow, else
// x-should-retry: false and no Retry-After. free is when that candidate
// frees (UnixNano); 0 when none is cooling, and then the client's own
// policy stands.
func adviseRetry(h http.Header, free int64, now time.Time) {
	if free == 0 {
		return
	}
	wait := time.Unix(0, free).Sub(now)
	if wait <= retryWindow {
		secs := int64((wait + time.Second - 1) / time.Second) // rounded up: not before it frees
		h.Set("Retry-After", strconv.FormatInt(max(secs, 1), 10))
		h.Del("X-Should-Retry")
		return
	}
	h.Del("Retry-After")
	h.Del("Retry-After-Ms")
	h.Set("X-Should-Retry", "false")
}

// exhaustedError is the answer when no channel gave one.
type exhaustedError struct {
	x    *exchange
	free int64 // UnixNano when the first candidate frees; 0 if none is cooling
}

func (e *exhaustedError) message(now time.Time) string {
	x := e.x
	seen := map[int64]bool{}
	for _, t := range x.tries {
		seen[t.entry.ch.ID] = true
	}
	noun := "channels"
	if x.plan.total == 1 {
		noun = "channel"
	}
	msg := fmt.Sprintf("no channel could serve model %q: %d of %d %s tried", x.model, len(seen), x.plan.total, noun)
	if e.free > 0 {
		wait := max(time.Unix(0, e.free).Sub(now), 0).Round(time.Second)
		msg += fmt.Sprintf(", the first frees in %s (%s)", wait, time.Unix(0, e.free).UTC().Format(time.RFC3339))
	}
	if x.errText != "" {
		msg += "; last error: " + x.errText
	}
	return msg
}

func (e *exhaustedError) Error() string { return e.message(time.Now()) }

// firstFree is when the first candidate of x's route frees, as UnixNano; 0
// when none is cooling.
func (rl *relay) firstFree(x *exchange) int64 {
	rt := rl.sel.current().route(x.proto, x.model)
	if rt == nil {
		return 0
	}
	now := rl.Now().UnixNano()
	var soonest int64
	for _, t := range rt.tiers {
		for _, e := range t.entries {
			if !x.mayUse(e) {
				continue
			}
			if u := e.health.blockedUntil(x.model, now); u > 0 && (soonest == 0 || u < soonest) {
				soonest = u
			}
		}
	}
	return soonest
}

// proxyError answers when RoundTrip returned no response.
func (rl *relay) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	x := exchangeFrom(r.Context())
	if x == nil {
		http.Error(w, "proxy error", http.StatusBadGateway)
		return
	}
	if errors.Is(err, errClientGone) || r.Context().Err() != nil {
		x.status, x.errText = 499, "client disconnected"
		return
	}
	var ex *exhaustedError
	if errors.As(err, &ex) {
		now := rl.Now()
		adviseRetry(w.Header(), ex.free, now)
		msg := ex.message(now)
		x.status, x.errText = http.StatusServiceUnavailable, msg
		writeError(w, x.proto, http.StatusServiceUnavailable, msg)
		return
	}
	x.status, x.errText = http.StatusBadGateway, err.Error()
	writeError(w, x.proto, http.StatusBadGateway, err.Error())
}
