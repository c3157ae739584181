package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// maxAdminBody bounds the JSON body of an admin request.
const maxAdminBody = 1 << 20

// admin serves the management API. Channel writes are serialized with the
// snapshot reload that follows them, so the live snapshot always reflects
// the latest write.
type admin struct {
	store   *Store
	sel     *selector
	cool    *cooldowns
	relay   *relay
	pass    *password
	limiter *loginLimiter
	trust   proxyTrust   // whose X-Forwarded-For names the client
	mirror  mirrorStatus // nil without Redis
	now     func() time.Time
	// bodyTimeout bounds the read of a login or admin write body; zero
	// means adminBodyTimeout.
	bodyTimeout time.Duration

	sessions sessionStore  // admin sessions: the store, or shared through Redis (cluster.go)
	replica  string        // CCLOAD_REPLICA
	replicas replicaLister // nil without Redis

	mu sync.Mutex // serializes channel writes and the reload after each
}

// mirrorStatus is what the admin shows of the Redis mirror.
type mirrorStatus interface {
	Status() map[string]any
}

// apiError is an error with its own status (415, say). The message is the
// user's to read.
type apiError struct {
	status int
	msg    string
}

func (e *apiError) Error() string { return e.msg }

// apiHandler is an admin handler that returns its error instead of writing
// it: ServeHTTP answers it once, with the status it maps to (see
// writeAPIError).
type apiHandler func(w http.ResponseWriter, r *http.Request) error

func (h apiHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if err := h(w, r); err != nil {
		writeAPIError(w, r, err)
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		slog.Error("encode response", "err", err)
		http.Error(w, `{"error":"internal error"}`, http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	// A browser must never read an answer that echoes user input (a
	// channel name, say) as anything but JSON.
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	w.Write(b)
	w.Write([]byte{'\n'})
}

// writeAPIError answers err with its status: the one table from errors to
// statuses. The user reads the message; anything unexpected is logged and
// answered as "internal error".
func writeAPIError(w http.ResponseWriter, r *http.Request, err error) {
	var ae *apiError
	var tooBig *http.MaxBytesError
	var de interface{ details() map[string]any }
	switch {
	case errors.As(err, &de) && errors.Is(err, errInvalid):
		body := de.details()
		body["error"] = err.Error()
		writeJSON(w, http.StatusBadRequest, body)
	case errors.As(err, &ae):
		writeJSON(w, ae.status, map[string]string{"error": ae.msg})
	case errors.Is(err, errInvalid):
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
	case errors.Is(err, errNotFound):
		writeJSON(w, http.StatusNotFound, map[string]string{"error": err.Error()})
	case storageFull(err):
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": errStorageFull.Error()})
	case errors.Is(err, errDuplicate):
		writeJSON(w, http.StatusConflict, map[string]string{"error": err.Error()})
	case errors.Is(err, os.ErrDeadlineExceeded):
		w.Header().Set("Connection", "close")
		writeJSON(w, http.StatusRequestTimeout, map[string]string{"error": "the request body did not arrive in time"})
	case errors.As(err, &tooBig):
		writeJSON(w, http.StatusRequestEntityTooLarge, map[string]string{"error": fmt.Sprintf("request body is larger than %s", formatBytes(tooBig.Limit))})
	default:
		slog.Error("admin request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "internal error"})
	}
}

// decodeJSON reads a JSON body of at most maxAdminBody into v.
func decodeJSON(w http.ResponseWriter, r *http.Request, v any) error {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxAdminBody))
	if err != nil {
		return err
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return invalid("request body is empty: send a JSON object")
	}
	if err := json.Unmarshal(body, v); err != nil {
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &se):
			return invalid("malformed JSON at byte %d: %v", se.Offset, se)
		case errors.As(err, &te):
			return invalid("field %q: expected %s, got %s", te.Field, te.Type, te.Value)
		}
		return invalid("malformed JSON: %v", err)
	}
	return nil
}

// channelView is a channel as the admin API shows it: keys masked, live
// health attached.
type channelView struct {
	ID              int64             `json:"id"`
	Name            string            `json:"name"`
	URL             string            `json:"url"`
	APIKeys         []string          `json:"api_keys"`
	KeyCount        int               `json:"key_count"`
	Type            string            `json:"channel_type"`
	Priority        int               `json:"priority"`
	Models          []string          `json:"models"`
	ModelRedirects  map[string]string `json:"model_redirects"`
	KeyStrategy     string            `json:"key_strategy"`
	Enabled         bool              `json:"enabled"`
	PriceMultiplier float64           `json:"price_multiplier"`
	CreatedAt       time.Time         `json:"created_at"`
	UpdatedAt       time.Time         `json:"updated_at"`
	State           healthState       `json:"state"`
}

func (a *admin) bodyWait() time.Duration {
	if a.bodyTimeout > 0 {
		return a.bodyTimeout
	}
	return adminBodyTimeout
}

func (a *admin) view(c Channel) channelView {
	v := channelView{
		ID: c.ID, Name: c.Name, URL: c.URL, KeyCount: len(c.APIKeys), Type: c.Type, Priority: c.Priority,
		Models: nonNil(c.Models), ModelRedirects: c.ModelRedirects, KeyStrategy: c.KeyStrategy, PriceMultiplier: storedMultiplier(&c),
		Enabled: c.Enabled, CreatedAt: c.CreatedAt, UpdatedAt: c.UpdatedAt,
	}
	if v.ModelRedirects == nil {
		v.ModelRedirects = map[string]string{}
	}
	v.APIKeys = make([]string, len(c.APIKeys))
	for i, k := range c.APIKeys {
		v.APIKeys[i] = maskKey(k)
	}
	if h := a.cool.get(c.ID); h != nil {
		v.State = h.state(a.now())
	} else {
		v.State = healthState{Keys: []keyState{}, Models: []modelState{}}
	}
	return v
}

// changeChannels runs write, a change to the stored channels, and swaps in
// a snapshot of the result. Channel writes are serialized (a.mu) so the
// live snapshot always reflects the latest one, and run inside
// cool.exclusive because a change of URL or keys deletes cooldown rows:
// those of the channels the new snapshot retired (see cooldowns.sync). A
// nil write only reloads.
func (a *admin) changeChannels(ctx context.Context, write func() error) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cool.exclusive(func() error {
		if write != nil {
			if err := write(); err != nil {
				return err
			}
		}
		// Committed: the proxy must see it even if the admin client left.
		ctx := context.WithoutCancel(ctx)
		chs, err := a.store.ListChannels(ctx)
		if err != nil {
			return err
		}
		retired, err := a.sel.load(chs)
		for _, id := range retired {
			err = errors.Join(err, a.store.ClearCooldowns(ctx, id))
		}
		return err
	})
}

func pathID(r *http.Request) (int64, error) {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil || id <= 0 {
		return 0, invalid("id %q is not a positive integer", r.PathValue("id"))
	}
	return id, nil
}

func (a *admin) handleListChannels() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		chs, err := a.store.ListChannels(r.Context())
		if err != nil {
			return err
		}
		out := make([]channelView, 0, len(chs))
		for _, c := range chs {
			out = append(out, a.view(c))
		}
		writeJSON(w, http.StatusOK, out)
		return nil
	})
}

func (a *admin) handleGetChannel() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r)
		if err != nil {
			return err
		}
		c, err := a.store.GetChannel(r.Context(), id)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, a.view(c))
		return nil
	})
}

func (a *admin) handleCreateChannel() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		var in map[string]json.RawMessage
		if err := decodeJSON(w, r, &in); err != nil {
			return err
		}
		c := Channel{Enabled: true}
		if err := c.apply(in); err != nil {
			return err
		}
		if err := c.validate(); err != nil {
			return err
		}
		if err := a.changeChannels(r.Context(), func() error { return a.store.CreateChannel(r.Context(), &c) }); err != nil {
			return err
		}
		writeJSON(w, http.StatusCreated, a.view(c))
		return nil
	})
}

func (a *admin) handleUpdateChannel() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r)
		if err != nil {
			return err
		}
		var in map[string]json.RawMessage
		if err := decodeJSON(w, r, &in); err != nil {
			return err
		}
		var c Channel
		err = a.changeChannels(r.Context(), func() error {
			var err error
			if c, err = a.store.GetChannel(r.Context(), id); err != nil {
				return err
			}
			if err := c.apply(in); err != nil {
				return err
			}
			if err := c.validate(); err != nil {
				return err
			}
			return a.store.UpdateChannel(r.Context(), &c)
		})
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, a.view(c))
		return nil
	})
}

func (a *admin) handleDeleteChannel() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r)
		if err != nil {
			return err
		}
		if err := a.changeChannels(r.Context(), func() error { return a.store.DeleteChannel(r.Context(), id) }); err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, map[string]any{"deleted": id})
		return nil
	})
}

func (a *admin) handleClearCooldown() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r)
		if err != nil {
			return err
		}
		c, err := a.store.GetChannel(r.Context(), id)
		if err != nil {
			return err
		}
		err = a.cool.exclusive(func() error {
			if h := a.cool.get(id); h != nil {
				a.cool.clearAll(h)
			}
			return a.store.ClearCooldowns(r.Context(), id)
		})
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, a.view(c))
		return nil
	})
}

// handleTestChannel sends a minimal real request through one channel and
// reports status and latency (see relay.probe).
func (a *admin) handleTestChannel() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r)
		if err != nil {
			return err
		}
		var in struct {
			Model    string `json:"model"`
			KeyIndex *int   `json:"key_index"`
		}
		if r.ContentLength != 0 {
			if err := decodeJSON(w, r, &in); err != nil {
				return err
			}
		}
		c, err := a.store.GetChannel(r.Context(), id)
		if err != nil {
			return err
		}
		k := 0
		if in.KeyIndex != nil {
			k = *in.KeyIndex
		}
		if k < 0 || k >= len(c.APIKeys) {
			return invalid("key_index %d: channel has %d keys", k, len(c.APIKeys))
		}
		writeJSON(w, http.StatusOK, a.relay.probe(r.Context(), c, k, in.Model))
		return nil
	})
}

// summary is the 24-hour overview on the dashboard and /public/summary.
type summary struct {
	WindowHours     int     `json:"window_hours"`
	Requests        int64   `json:"requests"`
	Success         int64   `json:"success"`
	Errors          int64   `json:"errors"`
	SuccessRate     float64 `json:"success_rate"`
	ChannelsEnabled int     `json:"channels_enabled"`
	ChannelsCooling int     `json:"channels_cooling"`
	// LogRowsLost counts request log rows dropped (queue full) or lost to
	// database errors (a full disk) since start.
	LogRowsLost uint64 `json:"log_rows_lost"`
}

func (a *admin) summary(ctx context.Context) (summary, error) {
	s := summary{WindowHours: 24}
	if a.relay != nil && a.relay.logs != nil {
		s.LogRowsLost = a.relay.logs.dropped.Load() + a.relay.logs.failed.Load()
	}
	var err error
	s.Requests, s.Success, err = a.store.CountRequests(ctx, windowStart(a.now(), 24))
	if err != nil {
		return s, err
	}
	s.Errors = s.Requests - s.Success
	if s.Requests > 0 {
		s.SuccessRate = float64(s.Success) / float64(s.Requests)
	}
	snap := a.sel.current()
	now := a.now().UnixNano()
	for _, e := range snap.entries {
		s.ChannelsEnabled++
		if e.health.blockedUntil("", now) != 0 {
			s.ChannelsCooling++
		}
	}
	return s, nil
}

func (a *admin) handleSummary() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		s, err := a.summary(r.Context())
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, s)
		return nil
	})
}

func (a *admin) handleHealthz() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := a.store.Ping(r.Context()); err != nil {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "database unavailable"})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok", "version": version, "replica": a.replica})
	})
}

func (a *admin) handleRedisStatus() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if a.mirror == nil {
			writeJSON(w, http.StatusOK, map[string]any{"enabled": false})
			return
		}
		writeJSON(w, http.StatusOK, a.mirror.Status())
	})
}

// queryParams reads URL query parameters, collecting every problem so a
// request with several bad ones hears about all of them at once.
type queryParams struct {
	q    url.Values
	errs []string
}

func (p *queryParams) int(name string, def, lo, hi int64) int64 {
	v := strings.TrimSpace(p.q.Get(name))
	if v == "" {
		return def
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < lo || n > hi {
		p.errs = append(p.errs, fmt.Sprintf("%s=%q: want a whole number from %d to %d", name, v, lo, hi))
		return def
	}
	return n
}

// time accepts RFC 3339, a date (2006-01-02, UTC), or Unix seconds or
// milliseconds.
func (p *queryParams) time(name string) time.Time {
	v := strings.TrimSpace(p.q.Get(name))
	if v == "" {
		return time.Time{}
	}
	if n, err := strconv.ParseInt(v, 10, 64); err == nil {
		if n > 1e11 {
			return time.UnixMilli(n)
		}
		return time.Unix(n, 0)
	}
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04", "2006-01-02"} {
		if t, err := time.Parse(layout, v); err == nil {
			return t
		}
	}
	p.errs = append(p.errs, fmt.Sprintf("%s=%q: want RFC 3339 (2026-01-02T15:04:05Z), a date, or Unix seconds", name, v))
	return time.Time{}
}

func (p *queryParams) err() error {
	if len(p.errs) == 0 {
		return nil
	}
	return invalid("%s", strings.Join(p.errs, "; "))
}

const maxStatsHours = 24 * 366

func (a *admin) handleLogs() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		p := &queryParams{q: r.URL.Query()}
		f := logFilter{
			ChannelID: p.int("channel_id", 0, 0, math.MaxInt64),
			TokenID:   p.int("token_id", 0, 0, math.MaxInt64),
			Model:     strings.TrimSpace(p.q.Get("model")),
			Since:     p.time("since"),
			Until:     p.time("until"),
			BeforeID:  p.int("before_id", 0, 1, math.MaxInt64),
			Limit:     int(p.int("limit", 50, 1, 1000)),
		}
		switch st := strings.ToLower(strings.TrimSpace(p.q.Get("status"))); st {
		case "":
		case "2xx", "4xx", "5xx":
			f.StatusClass = int(st[0] - '0')
		case "error", "errors", "failed":
			f.StatusClass = -1
		default:
			n, err := strconv.Atoi(st)
			if err != nil || n < 100 || n > 999 {
				p.errs = append(p.errs, fmt.Sprintf("status=%q: want a status code, 2xx, 4xx, 5xx or error", st))
			}
			f.Status = n
		}
		if !f.Since.IsZero() && !f.Until.IsZero() && !f.Until.After(f.Since) {
			p.errs = append(p.errs, "until must be after since")
		}
		if err := p.err(); err != nil {
			return err
		}
		// One row more than asked says whether an older page exists, so
		// next_before_id never leads to an empty page.
		limit := f.Limit
		f.Limit++
		rows, total, err := a.store.QueryLogs(r.Context(), f)
		if err != nil {
			return err
		}
		var next *int64
		if len(rows) > limit {
			rows = rows[:limit]
			id := rows[limit-1].ID
			next = &id
		}
		writeJSON(w, http.StatusOK, map[string]any{"logs": rows, "total": total, "next_before_id": next})
		return nil
	})
}

// hoursParam reads ?hours= (default 24) and ?token_id= (0: every request).
func hoursParam(r *http.Request) (hours int, tokenID int64, err error) {
	p := &queryParams{q: r.URL.Query()}
	hours = int(p.int("hours", 24, 1, maxStatsHours))
	tokenID = p.int("token_id", 0, 0, math.MaxInt64)
	return hours, tokenID, p.err()
}

func (a *admin) handleStats() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		hours, tokenID, err := hoursParam(r)
		if err != nil {
			return err
		}
		names := map[int64]string{}
		for _, c := range a.sel.current().all {
			names[c.ID] = c.Name
		}
		since := windowStart(a.now(), hours)
		chs, models, err := a.store.Stats(r.Context(), since, names)
		if tokenID != 0 {
			chs, models, err = a.store.StatsForToken(r.Context(), since, tokenID, names)
		}
		if err != nil {
			return err
		}
		toks, err := a.store.TokenStats(r.Context(), since, a.relay.auth.managed.names())
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, stats{Hours: hours, Since: since, Channels: chs, Models: models, Tokens: toks})
		return nil
	})
}

func (a *admin) handleTrends() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		hours, tokenID, err := hoursParam(r)
		if err != nil {
			return err
		}
		b, err := a.store.Trends(r.Context(), a.now(), hours)
		if tokenID != 0 {
			b, err = a.store.TrendsForToken(r.Context(), a.now(), hours, tokenID)
		}
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, map[string]any{"hours": hours, "buckets": b})
		return nil
	})
}
