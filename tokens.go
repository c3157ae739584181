package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"database/sql"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	_ "time/tzdata" // CCLOAD_TZ works in a static image without zoneinfo
	"unicode"
	"unicode/utf8"
)

// Client tokens managed in the admin (README "Client tokens"): stored by
// SHA-256 in SQLite, looked up in an immutable in-memory snapshot swapped
// whole on every change (like the channels), with limits checked in admit
// before any channel is picked. Spend and request counters live in memory
// per token, apart from the snapshot so that edits keep them, and are
// persisted by the log writer in the same transaction as the log rows.

// tokenLimits are a token's limits; nil means none.
type tokenLimits struct {
	DailyUSD    *float64 `json:"daily_usd"`
	MonthlyUSD  *float64 `json:"monthly_usd"`
	TotalUSD    *float64 `json:"total_usd"`
	Concurrency *int64   `json:"concurrency"`
	RPM         *int64   `json:"rpm"`
}

// tokenRecord is a managed token as stored (the secret only as its hash).
type tokenRecord struct {
	ID        int64       `json:"id"`
	Name      string      `json:"name"`
	Hint      string      `json:"hint"` // the token masked like a key, to recognise it
	Enabled   bool        `json:"enabled"`
	ExpiresAt *time.Time  `json:"expires_at"`
	Models    []string    `json:"models"`
	Channels  []int64     `json:"channels"`
	Limits    tokenLimits `json:"limits"`
	CreatedAt time.Time   `json:"created_at"`
	UpdatedAt time.Time   `json:"updated_at"`

	hash string // hex SHA-256 of the token
}

// managedToken is a token compiled for the hot path.
type managedToken struct {
	rec      tokenRecord
	digest   [32]byte
	expires  int64               // UnixNano; 0: never
	models   map[string]struct{} // nil: any
	channels map[int64]struct{}  // nil: any
	// Limits in the units the counters use; -1: none.
	daily, monthly, total int64 // pico-dollars
	concurrency, rpm      int64
	ctr                   *tokenCounters
}

// tokenCounters are one token's live usage.
type tokenCounters struct {
	mu sync.Mutex // guards every field below
	// day and month are the CCLOAD_TZ periods (20260102, 202601) that
	// spentDay and spentMonth count.
	day, month                       int
	spentDay, spentMonth, spentTotal int64 // pico-dollars
	requests                         int64
	inFlight                         int64
	lastUsed                         int64   // Unix ms; 0: never
	recent                           []int64 // admission times (UnixNano) within the last minute, oldest first
}

// tokenSnapshot is the set of managed tokens at one moment.
type tokenSnapshot struct {
	byHash map[[32]byte]*managedToken
	list   []*managedToken // by id
}

// tokenSet is the live managed tokens and their counters.
type tokenSet struct {
	store *Store
	loc   *time.Location
	now   func() time.Time
	env   []clientToken // CCLOAD_AUTH, listed read-only

	// With several replicas (clusterkinds.go): allocID gives a new token
	// its id, onChange tells the mirror's writer a token changed. nil: one
	// replica.
	allocID  func(ctx context.Context) (int64, error)
	onChange func()

	snap atomic.Pointer[tokenSnapshot]
	mu   sync.Mutex // serializes writes with the reload after each; guards ctrs
	ctrs map[int64]*tokenCounters
}

// periodKeys are t's day and month in loc, as the integers counters use.
func periodKeys(t time.Time, loc *time.Location) (day, month int) {
	y, m, d := t.In(loc).Date()
	return y*10000 + int(m)*100 + d, y*100 + int(m)
}

func newTokenSet(ctx context.Context, s *Store, loc *time.Location, env []clientToken) (*tokenSet, error) {
	ts := &tokenSet{store: s, loc: loc, now: time.Now, env: env, ctrs: map[int64]*tokenCounters{}}
	saved, err := s.loadTokenUsage(ctx)
	if err != nil {
		return nil, err
	}
	for id, c := range saved {
		ts.ctrs[id] = c
	}
	if err := ts.change(ctx, nil); err != nil {
		return nil, err
	}
	return ts, nil
}

// change runs write (if any) and rebuilds the snapshot from the database,
// under one lock: the live snapshot always reflects the latest write, and
// the next request sees it.
func (ts *tokenSet) change(ctx context.Context, write func() error) error {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if write != nil {
		if err := write(); err != nil {
			return err
		}
	}
	return ts.reloadLocked(ctx)
}

// edit is change for a local edit: the other replicas are told.
func (ts *tokenSet) edit(ctx context.Context, write func() error) error {
	if err := ts.change(ctx, write); err != nil {
		return err
	}
	if ts.onChange != nil {
		ts.onChange()
	}
	return nil
}

// reloadLocked rebuilds the snapshot. ts.mu must be held.
func (ts *tokenSet) reloadLocked(ctx context.Context) error {
	recs, err := ts.store.listTokens(ctx)
	if err != nil {
		return err
	}
	snap := &tokenSnapshot{byHash: make(map[[32]byte]*managedToken, len(recs))}
	live := make(map[int64]bool, len(recs))
	for _, rec := range recs {
		mt, err := compileToken(rec)
		if err != nil {
			return err
		}
		c := ts.ctrs[rec.ID]
		if c == nil {
			c = &tokenCounters{}
			ts.ctrs[rec.ID] = c
		}
		mt.ctr = c
		live[rec.ID] = true
		snap.byHash[mt.digest] = mt
		snap.list = append(snap.list, mt)
	}
	for id := range ts.ctrs {
		if !live[id] {
			delete(ts.ctrs, id)
		}
	}
	ts.snap.Store(snap)
	return nil
}

func compileToken(rec tokenRecord) (*managedToken, error) {
	mt := &managedToken{rec: rec, daily: -1, monthly: -1, total: -1, concurrency: -1, rpm: -1}
	d, err := hex.DecodeString(rec.hash)
	if err != nil || len(d) != 32 {
		return nil, fmt.Errorf("token %d: corrupt hash", rec.ID)
	}
	copy(mt.digest[:], d)
	if rec.ExpiresAt != nil {
		mt.expires = rec.ExpiresAt.UnixNano()
	}
	if len(rec.Models) > 0 {
		mt.models = make(map[string]struct{}, len(rec.Models))
		for _, m := range rec.Models {
			mt.models[m] = struct{}{}
		}
	}
	if len(rec.Channels) > 0 {
		mt.channels = make(map[int64]struct{}, len(rec.Channels))
		for _, c := range rec.Channels {
			mt.channels[c] = struct{}{}
		}
	}
	l := rec.Limits
	for _, f := range []struct {
		v   *float64
		dst *int64
	}{{l.DailyUSD, &mt.daily}, {l.MonthlyUSD, &mt.monthly}, {l.TotalUSD, &mt.total}} {
		if f.v != nil {
			*f.dst = int64(math.Round(*f.v * picoPerUSD))
		}
	}
	if l.Concurrency != nil {
		mt.concurrency = *l.Concurrency
	}
	if l.RPM != nil {
		mt.rpm = *l.RPM
	}
	return mt, nil
}

func (ts *tokenSet) current() *tokenSnapshot { return ts.snap.Load() }

// any reports whether a managed token exists (enabled or not): then the
// proxy is no longer in loopback-only open mode.
func (ts *tokenSet) any() bool { return ts != nil && len(ts.current().list) > 0 }

// find returns the managed token with digest d, compared in constant time.
func (ts *tokenSet) find(d [32]byte) *managedToken {
	if ts == nil {
		return nil
	}
	mt := ts.current().byHash[d]
	if mt == nil || subtle.ConstantTimeCompare(mt.digest[:], d[:]) != 1 {
		return nil
	}
	return mt
}

// usable says why mt may not be used at now (UnixNano), or "".
func (mt *managedToken) usable(now int64) string {
	switch {
	case !mt.rec.Enabled:
		return fmt.Sprintf("client token %q is disabled", mt.rec.Name)
	case mt.expires != 0 && now >= mt.expires:
		return fmt.Sprintf("client token %q expired at %s", mt.rec.Name, mt.rec.ExpiresAt.UTC().Format(time.RFC3339))
	}
	return ""
}

// refusal is a limit reached: which, and when it resets (zero: never by
// itself, e.g. a total spend cap).
type refusal struct {
	limit string
	msg   string
	reset time.Time
}

// roll moves the counters to now's periods. c.mu must be held.
func (c *tokenCounters) roll(day, month int) {
	if day > c.day {
		c.day, c.spentDay = day, 0
	}
	if month > c.month {
		c.month, c.spentMonth = month, 0
	}
}

// acquire admits one request at now if every limit allows it: it takes a
// concurrency slot (release gives it back) and counts it for the rpm
// window. Spend is checked against what finished requests cost, so a
// request in flight when a cap is crossed finishes, and the next is
// refused.
func (mt *managedToken) acquire(now time.Time, loc *time.Location) *refusal {
	c := mt.ctr
	day, month := periodKeys(now, loc)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.roll(day, month)
	local := now.In(loc)
	y, m, d := local.Date()
	spent := func(name string, used, limit int64, reset time.Time) *refusal {
		if limit < 0 || used < limit {
			return nil
		}
		return &refusal{limit: name, reset: reset,
			msg: fmt.Sprintf("client token %q reached its %s limit ($%s of $%s)", mt.rec.Name, name, formatUSD(used), formatUSD(limit))}
	}
	if r := spent("daily_usd", c.spentDay, mt.daily, time.Date(y, m, d+1, 0, 0, 0, 0, loc)); r != nil {
		return r
	}
	if r := spent("monthly_usd", c.spentMonth, mt.monthly, time.Date(y, m+1, 1, 0, 0, 0, 0, loc)); r != nil {
		return r
	}
	if r := spent("total_usd", c.spentTotal, mt.total, time.Time{}); r != nil {
		return r
	}
	ns := now.UnixNano()
	if mt.rpm >= 0 {
		cut := ns - int64(time.Minute)
		i := 0
		for i < len(c.recent) && c.recent[i] <= cut {
			i++
		}
		c.recent = c.recent[i:]
		if int64(len(c.recent)) >= mt.rpm {
			reset := now.Add(time.Minute)
			if len(c.recent) > 0 {
				reset = time.Unix(0, c.recent[len(c.recent)-int(mt.rpm)]).Add(time.Minute)
			}
			return &refusal{limit: "rpm", reset: reset,
				msg: fmt.Sprintf("client token %q reached its rpm limit (%d requests a minute)", mt.rec.Name, mt.rpm)}
		}
	}
	if mt.concurrency >= 0 && c.inFlight >= mt.concurrency {
		return &refusal{limit: "concurrency", reset: now.Add(time.Second),
			msg: fmt.Sprintf("client token %q reached its concurrency limit (%d requests at once)", mt.rec.Name, mt.concurrency)}
	}
	c.inFlight++
	if mt.rpm >= 0 {
		c.recent = append(c.recent, ns)
	}
	c.lastUsed = now.UnixMilli()
	return nil
}

func (c *tokenCounters) release() {
	c.mu.Lock()
	c.inFlight--
	c.mu.Unlock()
}

// charge counts one finished request that started at start and cost pico.
// It goes to the periods start fell in, as the log writer counts it.
func (c *tokenCounters) charge(start time.Time, loc *time.Location, pico int64) {
	day, month := periodKeys(start, loc)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.roll(day, month)
	if day == c.day {
		c.spentDay += pico
	}
	if month == c.month {
		c.spentMonth += pico
	}
	c.spentTotal += pico
	c.requests++
}

// tokenUsage is a token's live usage as the API shows it.
type tokenUsage struct {
	SpentTodayUSD float64    `json:"spent_today_usd"`
	SpentMonthUSD float64    `json:"spent_month_usd"`
	SpentTotalUSD float64    `json:"spent_total_usd"`
	Requests      int64      `json:"requests"`
	InFlight      int64      `json:"in_flight"`
	LastUsedAt    *time.Time `json:"last_used_at"`
}

func (c *tokenCounters) view(now time.Time, loc *time.Location) tokenUsage {
	day, month := periodKeys(now, loc)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.roll(day, month)
	u := tokenUsage{SpentTodayUSD: usd(c.spentDay), SpentMonthUSD: usd(c.spentMonth), SpentTotalUSD: usd(c.spentTotal),
		Requests: c.requests, InFlight: c.inFlight}
	if c.lastUsed > 0 {
		t := time.UnixMilli(c.lastUsed).UTC()
		u.LastUsedAt = &t
	}
	return u
}

// formatUSD shows pico-dollars as dollars, exactly, with at least cents.
func formatUSD(pico int64) string {
	s := strconv.FormatFloat(usd(pico), 'f', -1, 64)
	i := strings.IndexByte(s, '.')
	switch {
	case i < 0:
		s += ".00"
	case len(s)-i < 3:
		s += "0"
	}
	return s
}

// admitToken applies x's managed token to the request, once the model is
// known and before a channel is picked: the model allowlist (403) and the
// limits (429). false means it was refused and answered.
func (rl *relay) admitToken(x *exchange, w http.ResponseWriter) bool {
	mt := x.client
	if mt == nil {
		return true
	}
	if mt.models != nil {
		if _, ok := mt.models[x.model]; !ok {
			rl.reject(w, x, http.StatusForbidden, fmt.Sprintf("client token %q may not use model %q", mt.rec.Name, x.model))
			return false
		}
	}
	now := rl.Now()
	var ref *refusal
	if rl.counters == nil {
		ref = mt.acquire(now, rl.auth.managed.loc)
	} else {
		var shared bool
		if ref, shared = rl.counters.acquire(mt, now, rl.auth.managed.loc); shared {
			x.sharedBy = rl.counters
		}
	}
	if ref != nil {
		h := w.Header()
		msg := ref.msg
		if ref.reset.IsZero() {
			h.Set("X-Should-Retry", "false")
			msg += "; it does not reset by itself"
		} else {
			wait := max(int64(math.Ceil(ref.reset.Sub(now).Seconds())), 1)
			h.Set("Retry-After", strconv.FormatInt(wait, 10))
			msg += "; resets at " + ref.reset.UTC().Format(time.RFC3339)
			if ref.limit != "rpm" && ref.limit != "concurrency" {
				// Hours away: a client retrying by itself would only hang.
				h.Set("X-Should-Retry", "false")
			}
		}
		h.Set("X-Ccload-Limit", ref.limit)
		rl.reject(w, x, http.StatusTooManyRequests, msg)
		return false
	}
	x.holds = true
	return true
}

// restrictPlan keeps only the channels x's token may use; false (answered
// 403) when none is left.
// mayUse reports whether x's client may use channel e: any channel unless a
// managed token names its channels.
func (x *exchange) mayUse(e *channelEntry) bool {
	if x.client == nil || x.client.channels == nil {
		return true
	}
	_, ok := x.client.channels[e.ch.ID]
	return ok
}

func (rl *relay) restrictPlan(x *exchange, rt *route, w http.ResponseWriter) bool {
	mt := x.client
	if mt == nil || mt.channels == nil {
		return true
	}
	p := &x.plan
	keep := p.order[:0]
	for _, e := range p.order {
		if _, ok := mt.channels[e.ch.ID]; ok {
			keep = append(keep, e)
		}
	}
	p.order = keep
	if p.lastResort != nil {
		if _, ok := mt.channels[p.lastResort.ch.ID]; !ok {
			// The plan's last resort is the route's soonest to free; the
			// token's own is the soonest of the channels it may use.
			p.lastResort, p.lastResortUntil = nil, 0
			now := rl.Now().UnixNano()
			for ti := range rt.tiers {
				for _, e := range rt.tiers[ti].entries {
					if _, ok := mt.channels[e.ch.ID]; !ok {
						continue
					}
					if u := e.health.blockedUntil(x.model, now); u != 0 && (p.lastResort == nil || u < p.lastResortUntil) {
						p.lastResort, p.lastResortUntil = e, u
					}
				}
			}
		}
	}
	if len(p.order) == 0 && p.lastResort == nil {
		rl.reject(w, x, http.StatusForbidden, fmt.Sprintf("client token %q may use no channel that serves model %q", mt.rec.Name, x.model))
		return false
	}
	return true
}

// releaseToken gives back x's concurrency slot. finish defers it, so the
// slot comes back however the request ends: success, failure, a client
// gone, a panic in a handler.
func (x *exchange) releaseToken() {
	if x.holds {
		x.holds = false
		x.client.ctr.release()
		if x.sharedBy != nil {
			x.sharedBy.release(x.client.rec.ID)
			x.sharedBy = nil
		}
	}
}

// settleToken prices x from its usage (once, here) and counts it against
// its token.
func (rl *relay) settleToken(x *exchange, e *logEntry) {
	if rl.prices != nil {
		model := e.UpstreamModel
		if model == "" {
			model = x.model
		}
		if r := rl.prices.current().lookup(model); r != nil && model != "" {
			mult := int64(1_000_000)
			if t := x.logTry(); t != nil {
				mult = multiplierMillionths(t.entry.ch.PriceMultiplier)
			}
			e.costPico, e.priced = r.costOf(x.usage, mult), true
			c := usd(e.costPico)
			e.CostUSD = &c
		}
	}
	if x.client != nil {
		e.TokenID = x.client.rec.ID
		x.client.ctr.charge(x.start, rl.auth.managed.loc, e.costPico)
		switch {
		case x.sharedBy != nil:
			// One message gives back the Redis slot and adds the spend;
			// releaseToken, deferred, then gives back the local slot only.
			x.sharedBy.settle(e.TokenID, x.start, rl.auth.managed.loc, e.costPico)
			x.sharedBy = nil
		case rl.counters != nil:
			rl.counters.charge(e.TokenID, x.start, rl.auth.managed.loc, e.costPico)
		}
	}
}

// Storage.

const tokenColumns = `id, name, token_hash, hint, enabled, expires_at, models, channels, limits, created_at, updated_at`

func scanToken(row scanner) (tokenRecord, error) {
	var (
		t                        tokenRecord
		expires                  sql.NullInt64
		models, channels, limits string
		created, updated         int64
	)
	if err := row.Scan(&t.ID, &t.Name, &t.hash, &t.Hint, &t.Enabled, &expires, &models, &channels, &limits,
		&created, &updated); err != nil {
		return t, err
	}
	if err := errors.Join(json.Unmarshal([]byte(models), &t.Models), json.Unmarshal([]byte(channels), &t.Channels),
		json.Unmarshal([]byte(limits), &t.Limits)); err != nil {
		return t, fmt.Errorf("token %d: corrupt column: %w", t.ID, err)
	}
	if expires.Valid {
		e := time.UnixMilli(expires.Int64).UTC()
		t.ExpiresAt = &e
	}
	t.CreatedAt, t.UpdatedAt = time.UnixMilli(created).UTC(), time.UnixMilli(updated).UTC()
	return t, nil
}

func (s *Store) listTokens(ctx context.Context) ([]tokenRecord, error) {
	rows, err := s.rdb.QueryContext(ctx, `SELECT `+tokenColumns+` FROM tokens ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("list tokens: %w", err)
	}
	defer rows.Close()
	var out []tokenRecord
	for rows.Next() {
		t, err := scanToken(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	return out, rows.Err()
}

func tokenArgs(t *tokenRecord) (expires any, models, channels, limits string) {
	if t.ExpiresAt != nil {
		expires = t.ExpiresAt.UnixMilli()
	}
	m, _ := json.Marshal(nonNil(t.Models))
	ch := t.Channels
	if ch == nil {
		ch = []int64{}
	}
	c, _ := json.Marshal(ch)
	l, _ := json.Marshal(t.Limits)
	return expires, string(m), string(c), string(l)
}

func tokenWriteError(t *tokenRecord, err error) error {
	if err != nil && strings.Contains(err.Error(), "UNIQUE constraint failed: tokens.name") {
		return fmt.Errorf("a client token named %q already exists: %w", t.Name, errDuplicate)
	}
	return fmt.Errorf("save client token %q: %w", t.Name, err)
}

func (s *Store) createToken(ctx context.Context, t *tokenRecord) error {
	now := s.now()
	exp, models, channels, limits := tokenArgs(t)
	var id any // 0: the database picks
	if t.ID != 0 {
		id = t.ID
	}
	res, err := s.db.ExecContext(ctx, `INSERT INTO tokens (id, name, token_hash, hint, enabled, expires_at, models,
		channels, limits, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		id, t.Name, t.hash, t.Hint, t.Enabled, exp, models, channels, limits, now, now)
	if err != nil {
		return tokenWriteError(t, err)
	}
	t.ID, err = res.LastInsertId()
	t.CreatedAt = time.UnixMilli(now).UTC()
	t.UpdatedAt = t.CreatedAt
	return err
}

func (s *Store) updateToken(ctx context.Context, t *tokenRecord) error {
	now := s.now()
	exp, models, channels, limits := tokenArgs(t)
	res, err := s.db.ExecContext(ctx, `UPDATE tokens SET name = ?, enabled = ?, expires_at = ?, models = ?,
		channels = ?, limits = ?, updated_at = ? WHERE id = ?`,
		t.Name, t.Enabled, exp, models, channels, limits, now, t.ID)
	if err != nil {
		return tokenWriteError(t, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("client token %d: %w", t.ID, errNotFound)
	}
	t.UpdatedAt = time.UnixMilli(now).UTC()
	return nil
}

func (s *Store) deleteToken(ctx context.Context, id int64) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	res, err := tx.ExecContext(ctx, `DELETE FROM tokens WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("delete client token: %w", err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("client token %d: %w", id, errNotFound)
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM token_usage WHERE token_id = ?`, id); err != nil {
		return fmt.Errorf("delete client token usage: %w", err)
	}
	return tx.Commit()
}

// loadTokenUsage reads the persisted counters, for a restart.
func (s *Store) loadTokenUsage(ctx context.Context) (map[int64]*tokenCounters, error) {
	rows, err := s.rdb.QueryContext(ctx, `SELECT token_id, day, spent_day, month, spent_month, spent_total,
		requests, last_used FROM token_usage`)
	if err != nil {
		return nil, fmt.Errorf("load token usage: %w", err)
	}
	defer rows.Close()
	out := map[int64]*tokenCounters{}
	for rows.Next() {
		var id int64
		c := &tokenCounters{}
		if err := rows.Scan(&id, &c.day, &c.spentDay, &c.month, &c.spentMonth, &c.spentTotal, &c.requests, &c.lastUsed); err != nil {
			return nil, err
		}
		out[id] = c
	}
	return out, rows.Err()
}

type tokenPeriodKey struct {
	id         int64
	day, month int
}

type tokenPeriodSum struct {
	pico, requests, last int64
}

// writeTokenUsage adds a batch's requests to token_usage, in the log
// writer's transaction: the counters on disk never disagree with the rows.
// A newer period replaces an older one's spend; an older one (a request
// that started before midnight) adds to the total only. Rows of a token
// deleted meanwhile are skipped.
func (s *Store) writeTokenUsage(ctx context.Context, tx *sql.Tx, entries []logEntry) error {
	sums := map[tokenPeriodKey]*tokenPeriodSum{}
	var keys []tokenPeriodKey
	for i := range entries {
		e := &entries[i]
		if e.TokenID == 0 {
			continue
		}
		day, month := periodKeys(e.Time, s.TZ)
		k := tokenPeriodKey{e.TokenID, day, month}
		g := sums[k]
		if g == nil {
			g = &tokenPeriodSum{}
			sums[k] = g
			keys = append(keys, k)
		}
		g.pico += e.costPico
		g.requests++
		g.last = max(g.last, e.Time.UnixMilli())
	}
	for _, k := range keys {
		g := sums[k]
		if _, err := tx.ExecContext(ctx, `INSERT INTO token_usage (token_id, day, spent_day, month, spent_month,
			spent_total, requests, last_used)
			SELECT ?1, ?2, ?3, ?4, ?3, ?3, ?5, ?6 WHERE EXISTS (SELECT 1 FROM tokens WHERE id = ?1)
			ON CONFLICT (token_id) DO UPDATE SET
				spent_day = CASE WHEN excluded.day = day THEN spent_day + excluded.spent_day
					WHEN excluded.day > day THEN excluded.spent_day ELSE spent_day END,
				day = max(day, excluded.day),
				spent_month = CASE WHEN excluded.month = month THEN spent_month + excluded.spent_month
					WHEN excluded.month > month THEN excluded.spent_month ELSE spent_month END,
				month = max(month, excluded.month),
				spent_total = spent_total + excluded.spent_total,
				requests = requests + excluded.requests,
				last_used = max(last_used, excluded.last_used)`,
			k.id, k.day, g.pico, k.month, g.requests, g.last); err != nil {
			return fmt.Errorf("write token usage: %w", err)
		}
	}
	return nil
}

// Admin API.

// tokenView is a token as the admin API shows it.
type tokenView struct {
	tokenRecord
	Source string     `json:"source"` // "db", or "env" for CCLOAD_AUTH (read-only)
	Usage  tokenUsage `json:"usage"`
	Token  string     `json:"token,omitempty"` // only in the creation answer
}

func (ts *tokenSet) view(mt *managedToken) tokenView {
	return tokenView{tokenRecord: mt.rec, Source: "db", Usage: mt.ctr.view(ts.now(), ts.loc)}
}

// tokenInput is what POST and PUT accept; a field left out keeps its value.
// Output-only fields are accepted and ignored, so a client may send back
// what it read.
type tokenInput struct {
	Name      *string                    `json:"name"`
	Enabled   *bool                      `json:"enabled"`
	ExpiresAt json.RawMessage            `json:"expires_at"`
	Models    json.RawMessage            `json:"models"`
	Channels  *[]int64                   `json:"channels"`
	Limits    map[string]json.RawMessage `json:"limits"`

	ID        json.RawMessage `json:"id"`
	Hint      json.RawMessage `json:"hint"`
	Source    json.RawMessage `json:"source"`
	Usage     json.RawMessage `json:"usage"`
	CreatedAt json.RawMessage `json:"created_at"`
	UpdatedAt json.RawMessage `json:"updated_at"`
}

// apply sets the given fields on t, each checked.
func (in *tokenInput) apply(t *tokenRecord) error {
	if in.Name != nil {
		s := strings.TrimSpace(*in.Name)
		switch {
		case s == "":
			return invalid("name is required")
		case utf8.RuneCountInString(s) > 100:
			return invalid("name is longer than 100 characters")
		case strings.ContainsFunc(s, unicode.IsControl):
			return invalid("name must not contain control characters")
		}
		t.Name = s
	}
	if in.Enabled != nil {
		t.Enabled = *in.Enabled
	}
	if len(in.ExpiresAt) > 0 {
		if string(in.ExpiresAt) == "null" {
			t.ExpiresAt = nil
		} else {
			var s string
			if json.Unmarshal(in.ExpiresAt, &s) != nil {
				return invalid("expires_at must be an RFC 3339 time like 2026-12-31T00:00:00Z, or null")
			}
			e, err := time.Parse(time.RFC3339, strings.TrimSpace(s))
			if err != nil {
				return invalid("expires_at %q: want an RFC 3339 time like 2026-12-31T00:00:00Z, or null", s)
			}
			e = e.UTC()
			t.ExpiresAt = &e
		}
	}
	if len(in.Models) > 0 {
		if string(in.Models) == "null" {
			t.Models = nil
		} else {
			m, err := listInput(in.Models)
			if err != nil {
				return invalid("models must be a list of model names or a comma-separated string")
			}
			t.Models = m
		}
	}
	if in.Channels != nil {
		for _, id := range *in.Channels {
			if id <= 0 {
				return invalid("channels: %d is not a channel id", id)
			}
		}
		t.Channels = slices.Compact(slices.Sorted(slices.Values(*in.Channels)))
	}
	for k, raw := range in.Limits {
		var usdDst **float64
		var intDst **int64
		switch k {
		case "daily_usd":
			usdDst = &t.Limits.DailyUSD
		case "monthly_usd":
			usdDst = &t.Limits.MonthlyUSD
		case "total_usd":
			usdDst = &t.Limits.TotalUSD
		case "concurrency":
			intDst = &t.Limits.Concurrency
		case "rpm":
			intDst = &t.Limits.RPM
		default:
			return invalid("limits: unknown limit %q (known: daily_usd, monthly_usd, total_usd, concurrency, rpm)", k)
		}
		if string(raw) == "null" {
			if usdDst != nil {
				*usdDst = nil
			} else {
				*intDst = nil
			}
			continue
		}
		if usdDst != nil {
			var v float64
			if json.Unmarshal(raw, &v) != nil || v < 0 || v > 1e9 {
				return invalid("limits.%s must be a number of dollars ≥ 0, or null for none", k)
			}
			*usdDst = &v
			continue
		}
		var v int64
		if json.Unmarshal(raw, &v) != nil || v < 1 || v > 1_000_000 {
			return invalid("limits.%s must be a whole number ≥ 1, or null for none (disable the token to stop it)", k)
		}
		*intDst = &v
	}
	return nil
}

// decodeStrict is decodeJSON that refuses fields it does not know, so a
// misspelt limit is an error and not silently no limit.
func decodeStrict(w http.ResponseWriter, r *http.Request, v any) error {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxAdminBody))
	if err != nil {
		return err
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return invalid("request body is empty: send a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &se):
			return invalid("malformed JSON at byte %d: %v", se.Offset, se)
		case errors.As(err, &te):
			return invalid("field %q: expected %s, got %s", te.Field, te.Type, te.Value)
		case strings.HasPrefix(err.Error(), "json: unknown field"):
			return invalid("%s", strings.TrimPrefix(err.Error(), "json: "))
		}
		return invalid("malformed JSON: %v", err)
	}
	if dec.More() {
		return invalid("malformed JSON: more than one value")
	}
	return nil
}

// newTokenSecret is a fresh client token: 32 random bytes.
func newTokenSecret() string {
	b := make([]byte, 32)
	rand.Read(b)
	return "sk-ccl-" + base64.RawURLEncoding.EncodeToString(b)
}

// create stores a new token from in and returns it with its secret, the
// one time the secret is shown.
func (ts *tokenSet) create(ctx context.Context, in *tokenInput) (tokenView, error) {
	t := tokenRecord{Enabled: true}
	if in.Name == nil {
		return tokenView{}, invalid("name is required")
	}
	if err := in.apply(&t); err != nil {
		return tokenView{}, err
	}
	for _, e := range ts.env {
		if strings.EqualFold(e.name, t.Name) {
			return tokenView{}, fmt.Errorf("a CCLOAD_AUTH token is named %q: %w", t.Name, errDuplicate)
		}
	}
	secret := newTokenSecret()
	t.hash, t.Hint = tokenHash(secret), maskKey(secret)
	if ts.allocID != nil {
		id, err := ts.allocID(ctx)
		if err != nil {
			return tokenView{}, err
		}
		t.ID = id
	}
	if err := ts.edit(ctx, func() error { return ts.store.createToken(ctx, &t) }); err != nil {
		return tokenView{}, err
	}
	v := ts.byID(t.ID)
	v.Token = secret
	return v, nil
}

func (ts *tokenSet) byID(id int64) tokenView {
	for _, mt := range ts.current().list {
		if mt.rec.ID == id {
			return ts.view(mt)
		}
	}
	return tokenView{}
}

func (ts *tokenSet) get(id int64) (*managedToken, error) {
	for _, mt := range ts.current().list {
		if mt.rec.ID == id {
			return mt, nil
		}
	}
	return nil, fmt.Errorf("client token %d: %w", id, errNotFound)
}

func (ts *tokenSet) handleList() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		out := []tokenView{}
		for _, e := range ts.env {
			out = append(out, tokenView{tokenRecord: tokenRecord{Name: e.name, Enabled: true, Models: []string{},
				Channels: []int64{}, Hint: "CCLOAD_AUTH"}, Source: "env"})
		}
		for _, mt := range ts.current().list {
			out = append(out, ts.view(mt))
		}
		writeJSON(w, http.StatusOK, out)
		return nil
	})
}

func (ts *tokenSet) handleGet() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r)
		if err != nil {
			return err
		}
		mt, err := ts.get(id)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, ts.view(mt))
		return nil
	})
}

func (ts *tokenSet) handleCreate() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		var in tokenInput
		if err := decodeStrict(w, r, &in); err != nil {
			return err
		}
		v, err := ts.create(r.Context(), &in)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusCreated, v)
		return nil
	})
}

func (ts *tokenSet) handleUpdate() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r)
		if err != nil {
			return err
		}
		var in tokenInput
		if err := decodeStrict(w, r, &in); err != nil {
			return err
		}
		mt, err := ts.get(id)
		if err != nil {
			return err
		}
		t := mt.rec
		t.Models, t.Channels = slices.Clone(t.Models), slices.Clone(t.Channels)
		if err := in.apply(&t); err != nil {
			return err
		}
		// As at creation: a name is what sessions (affinity), the log and
		// the stats tell clients apart by.
		for _, e := range ts.env {
			if strings.EqualFold(e.name, t.Name) {
				return fmt.Errorf("a CCLOAD_AUTH token is named %q: %w", t.Name, errDuplicate)
			}
		}
		if err := ts.edit(r.Context(), func() error { return ts.store.updateToken(r.Context(), &t) }); err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, ts.byID(id))
		return nil
	})
}

func (ts *tokenSet) handleDelete() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r)
		if err != nil {
			return err
		}
		if err := ts.edit(r.Context(), func() error { return ts.store.deleteToken(r.Context(), id) }); err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, map[string]bool{"ok": true})
		return nil
	})
}

// writeTokenRollups is the log writer's part for tokens: usage counters
// and the hourly rollup by token, in the batch's transaction.
func (s *Store) writeTokenRollups(ctx context.Context, tx *sql.Tx, entries []logEntry) error {
	type key struct{ hour, id int64 }
	groups := map[key]*rollup{}
	var keys []key
	for i := range entries {
		e := &entries[i]
		if e.TokenID == 0 {
			continue
		}
		k := key{hourOf(e.Time), e.TokenID}
		g := groups[k]
		if g == nil {
			g = &rollup{}
			groups[k] = g
			keys = append(keys, k)
		}
		g.name = e.Token
		g.addEntry(e)
	}
	if len(keys) == 0 {
		return nil
	}
	for _, k := range keys {
		g := groups[k]
		if _, err := tx.ExecContext(ctx, `INSERT INTO token_hourly (hour, token_id, token, requests, ok, duration_ms,
			input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_pico, unpriced)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
			ON CONFLICT (hour, token_id) DO UPDATE SET token = excluded.token, requests = requests + excluded.requests,
			ok = ok + excluded.ok, duration_ms = duration_ms + excluded.duration_ms,
			input_tokens = input_tokens + excluded.input_tokens,
			output_tokens = output_tokens + excluded.output_tokens,
			cache_read_tokens = cache_read_tokens + excluded.cache_read_tokens,
			cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
			cost_pico = cost_pico + excluded.cost_pico, unpriced = unpriced + excluded.unpriced`,
			k.hour, k.id, g.name, g.requests, g.ok, g.dur, g.in, g.out, g.cacheRead, g.cacheWri, g.cost, g.unpriced); err != nil {
			return fmt.Errorf("write token rollup: %w", err)
		}
	}
	return s.writeTokenUsage(ctx, tx, entries)
}

// TokenStats sums the token rollups from since, one row per token.
func (s *Store) TokenStats(ctx context.Context, since time.Time, names map[int64]string) ([]statsRow, error) {
	rows, err := s.rdb.QueryContext(ctx, `SELECT token_id, max(token), sum(requests), sum(ok), sum(duration_ms), sum(input_tokens),
		sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_pico), sum(unpriced)
		FROM token_hourly WHERE hour >= ? GROUP BY token_id ORDER BY sum(requests) DESC, token_id`, since.UnixMilli())
	if err != nil {
		return nil, fmt.Errorf("token stats: %w", err)
	}
	defer rows.Close()
	out := []statsRow{}
	for rows.Next() {
		var (
			id   int64
			name string
			g    rollup
		)
		if err := rows.Scan(&id, &name, &g.requests, &g.ok, &g.dur, &g.in, &g.out, &g.cacheRead, &g.cacheWri, &g.cost, &g.unpriced); err != nil {
			return nil, err
		}
		if n, ok := names[id]; ok {
			name = n
		}
		r := statsRow{TokenID: &id, Token: &name, sum: g}
		r.finish()
		out = append(out, r)
	}
	return out, rows.Err()
}

// names maps each managed token's id to its current name.
func (ts *tokenSet) names() map[int64]string {
	out := map[int64]string{}
	if ts == nil {
		return out
	}
	for _, mt := range ts.current().list {
		out[mt.rec.ID] = mt.rec.Name
	}
	return out
}

// watch reloads the snapshot when the tokens table changed under it (the
// token CLI writes the database directly), checking every interval until
// ctx ends. Admin API edits reload at once and do not need it.
func (ts *tokenSet) watch(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	last := ""
	for {
		var n, maxUpdated, idSum int64
		err := ts.store.rdb.QueryRowContext(ctx, `SELECT count(*), coalesce(max(updated_at), 0), coalesce(sum(id), 0)
			FROM tokens`).Scan(&n, &maxUpdated, &idSum)
		if err == nil {
			mark := fmt.Sprint(n, maxUpdated, idSum)
			if last != "" && mark != last {
				if err := ts.change(ctx, nil); err != nil && ctx.Err() == nil {
					slog.Error("reload client tokens", "err", err)
				} else if ts.onChange != nil {
					ts.onChange() // the CLI's edit reaches the other replicas too
				}
			}
			last = mark
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// tokenCommand is `ccload token create NAME [flags]` and `ccload token
// list`: for people who manage a server over SSH. It writes the local
// database (SQLITE_PATH) directly; a running ccload picks the change up
// within a second (see watch).
func tokenCommand(ctx context.Context, cfg config, args []string, stdout io.Writer) error {
	usage := errors.New("usage: ccload token create NAME [--models a,b] [--channels 1,2] [--daily-usd N] [--monthly-usd N] [--total-usd N] [--rpm N] [--concurrency N] [--expires RFC3339]\n       ccload token list")
	if len(args) == 0 {
		return usage
	}
	store, err := OpenStore(ctx, cfg.SQLitePath)
	if err != nil {
		return err
	}
	defer store.Close()
	if cfg.TZ != nil {
		store.TZ = cfg.TZ
	}
	ts, err := newTokenSet(ctx, store, store.TZ, nil)
	if err != nil {
		return err
	}
	if cfg.RedisURL != "" {
		// Several replicas: the id comes from Redis like the admin's, or a
		// replica's reconcile would take it for another replica's token.
		m, err := newRedisMirror(cfg.RedisURL, store)
		if err != nil {
			return err
		}
		defer m.close()
		ts.allocID = func(ctx context.Context) (int64, error) { return m.newID(ctx, "tokens", store.maxTokenID(ctx)) }
	}
	switch args[0] {
	case "list":
		for _, mt := range ts.current().list {
			u := mt.ctr.view(time.Now(), ts.loc)
			fmt.Fprintf(stdout, "%d\t%s\t%s\tenabled=%t\ttoday=$%.4f\tmonth=$%.4f\trequests=%d\n",
				mt.rec.ID, mt.rec.Name, mt.rec.Hint, mt.rec.Enabled, u.SpentTodayUSD, u.SpentMonthUSD, u.Requests)
		}
		return nil
	case "create":
	default:
		return usage
	}
	fs := flag.NewFlagSet("ccload token create", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	models := fs.String("models", "", "")
	channels := fs.String("channels", "", "")
	expires := fs.String("expires", "", "")
	limits := map[string]*string{}
	for _, k := range []string{"daily-usd", "monthly-usd", "total-usd", "rpm", "concurrency"} {
		limits[k] = fs.String(k, "", "")
	}
	// NAME may come before or after the flags.
	rest := args[1:]
	var name string
	if len(rest) > 0 && !strings.HasPrefix(rest[0], "-") {
		name, rest = rest[0], rest[1:]
	}
	if err := fs.Parse(rest); err != nil {
		return fmt.Errorf("%w\n%w", err, usage)
	}
	if name == "" && fs.NArg() > 0 {
		name = fs.Arg(0)
	}
	if name == "" {
		return usage
	}
	in := tokenInput{Name: &name, Limits: map[string]json.RawMessage{}}
	if *models != "" {
		in.Models, _ = json.Marshal(*models)
	}
	if *channels != "" {
		var ids []int64
		for _, c := range splitList(*channels) {
			id, err := strconv.ParseInt(strings.TrimSpace(c), 10, 64)
			if err != nil {
				return fmt.Errorf("--channels: %q is not a channel id", c)
			}
			ids = append(ids, id)
		}
		in.Channels = &ids
	}
	if *expires != "" {
		in.ExpiresAt, _ = json.Marshal(*expires)
	}
	for k, v := range limits {
		if *v != "" {
			in.Limits[strings.ReplaceAll(k, "-", "_")] = json.RawMessage(*v)
		}
	}
	v, err := ts.create(ctx, &in)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s\n", v.Token)
	return nil
}

// StatsForToken is Stats for one token's requests: by channel and by
// model, summed from its log rows (the rollups are not by token), so it
// costs in proportion to that token's traffic in the window.
func (s *Store) StatsForToken(ctx context.Context, since time.Time, tokenID int64, names map[int64]string) ([]statsRow, []statsRow, error) {
	rows, err := s.rdb.QueryContext(ctx, `SELECT channel_id, channel_name, model, status, duration_ms, first_byte_ms,
		input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd
		FROM logs WHERE token_id = ? AND time >= ?`, tokenID, since.UnixMilli())
	if err != nil {
		return nil, nil, fmt.Errorf("token stats: %w", err)
	}
	defer rows.Close()
	byChannel := map[int64]*statsRow{}
	byModel := map[string]*statsRow{}
	for rows.Next() {
		var e logEntry
		var cost sql.NullFloat64
		if err := rows.Scan(&e.ChannelID, &e.ChannelName, &e.Model, &e.Status, &e.DurationMS, &e.FirstByteMS,
			&e.InputTokens, &e.OutputTokens, &e.CacheRead, &e.CacheWrite, &cost); err != nil {
			return nil, nil, err
		}
		if cost.Valid {
			// Stored as pico/1e12: the round trip through float64 is exact.
			e.costPico, e.priced = int64(math.Round(cost.Float64*picoPerUSD)), true
		}
		c := byChannel[e.ChannelID]
		if c == nil {
			id, name := e.ChannelID, e.ChannelName
			if n, ok := names[id]; ok {
				name = n
			}
			c = &statsRow{ChannelID: &id, ChannelName: &name}
			byChannel[id] = c
		}
		c.sum.addEntry(&e)
		m := byModel[e.Model]
		if m == nil {
			name := e.Model
			m = &statsRow{Model: &name}
			byModel[name] = m
		}
		m.sum.addEntry(&e)
	}
	if err := rows.Err(); err != nil {
		return nil, nil, err
	}
	return collectStats(byChannel), collectStats(byModel), nil
}

// TrendsForToken is Trends for one token, from its hourly rollups.
func (s *Store) TrendsForToken(ctx context.Context, now time.Time, hours int, tokenID int64) ([]trendBucket, error) {
	first := windowStart(now, hours).UnixMilli()
	return s.trends(ctx, now, hours, `SELECT (hour - ?) / 3600000, requests, ok, duration_ms, input_tokens,
		output_tokens, cache_read_tokens, cache_write_tokens, cost_pico FROM token_hourly WHERE token_id = ? AND hour >= ?`,
		first, tokenID, first)
}
