package main

import (
	"cmp"
	"context"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// logEntry is one client request, as the request log stores it.
type logEntry struct {
	ID            int64     `json:"id"`
	Time          time.Time `json:"time"`
	Token         string    `json:"token"`
	Protocol      string    `json:"protocol"`
	Model         string    `json:"model"`
	UpstreamModel string    `json:"upstream_model"`
	ChannelID     int64     `json:"channel_id"`
	ChannelName   string    `json:"channel_name"`
	KeyIndex      int       `json:"key_index"`
	Attempts      int       `json:"attempts"`
	Status        int       `json:"status"`
	DurationMS    int64     `json:"duration_ms"`
	FirstByteMS   int64     `json:"first_byte_ms"`
	Stream        bool      `json:"stream"`
	InputTokens   int64     `json:"input_tokens"`
	OutputTokens  int64     `json:"output_tokens"`
	CacheRead     int64     `json:"cache_read_tokens"`
	CacheWrite    int64     `json:"cache_write_tokens"`
	ClientIP      string    `json:"client_ip"`
	Error         string    `json:"error"`
	TokenID       int64     `json:"token_id"` // a managed client token; 0 for CCLOAD_AUTH or open mode
	Session       string    `json:"session"`  // short hash of the conversation's session, "" if none
	Affinity      string    `json:"affinity"` // "new", "hit", "moved", or "" with affinity off
	CostUSD       *float64  `json:"cost_usd"` // nil: the model has no price
	Tries         []tryView `json:"tries"`

	trace string // Tries as stored (see encodeTrace)

	costPico int64 // CostUSD exactly, in pico-dollars (see pricing.go)
	priced   bool  // the model had a price

	// flushed, when set, marks a flush request rather than a row: the
	// writer closes it once everything queued before it is written.
	flushed chan struct{}
}

// logWriter is the one goroutine that writes the request log. Requests hand
// it entries through a bounded queue and never wait: when the queue is full
// the entry is dropped and counted, because a slow disk must not slow the
// proxy. Entries are written in batches, one transaction each.
type logWriter struct {
	store   *Store
	queue   chan logEntry
	dropped atomic.Uint64
	written atomic.Uint64
	failed  atomic.Uint64 // entries lost to write errors

	closeOnce sync.Once
	done      chan struct{}
}

const (
	logQueueSize = 8192
	logBatchMax  = 512
	logLinger    = 100 * time.Millisecond
)

func newLogWriter(s *Store, queueSize int) *logWriter {
	lw := &logWriter{store: s, queue: make(chan logEntry, queueSize), done: make(chan struct{})}
	go lw.run()
	return lw
}

// add queues e; it reports false when the queue was full and e was dropped.
func (lw *logWriter) add(e logEntry) bool {
	select {
	case lw.queue <- e:
		return true
	default:
		lw.dropped.Add(1)
		return false
	}
}

func (lw *logWriter) run() {
	defer close(lw.done)
	batch := make([]logEntry, 0, logBatchMax)
	var flushes []chan struct{}
	linger := time.NewTimer(time.Hour)
	linger.Stop()
	for e := range lw.queue {
		batch, flushes = batch[:0], flushes[:0]
		// Gather what arrives within logLinger of the first entry into one
		// transaction: a commit costs far more than a row, so this keeps
		// the writer's CPU per request low at any rate. A flush request
		// ends the wait at once.
		linger.Reset(logLinger)
	gather:
		for more := true; more; {
			if e.flushed != nil {
				flushes = append(flushes, e.flushed)
				break
			}
			batch = append(batch, e)
			if len(batch) == logBatchMax {
				break
			}
			select {
			case e, more = <-lw.queue:
			case <-linger.C:
				break gather
			}
		}
		linger.Stop()
		if len(batch) > 0 {
			lw.write(batch)
		}
		for _, f := range flushes {
			close(f)
		}
	}
}

func (lw *logWriter) write(batch []logEntry) {
	// Retry a failed batch a few times: a disk that is briefly full or a
	// locked database should not cost rows. Give up after that, counted.
	var err error
	for try := range 3 {
		if err = lw.store.InsertLogs(context.Background(), batch); err == nil {
			lw.written.Add(uint64(len(batch)))
			return
		}
		time.Sleep(time.Duration(try+1) * 100 * time.Millisecond)
	}
	lw.failed.Add(uint64(len(batch)))
	slog.Error("request log: batch lost", "rows", len(batch), "err", err)
}

// close stops accepting entries and returns once every queued entry has been
// written, or ctx ends.
func (lw *logWriter) close(ctx context.Context) error {
	lw.closeOnce.Do(func() { close(lw.queue) })
	select {
	case <-lw.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("request log: %d entries not flushed: %w", len(lw.queue), ctx.Err())
	}
}

// InsertLogs writes entries in one transaction.
func (s *Store) InsertLogs(ctx context.Context, entries []logEntry) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	stmt := tx.StmtContext(ctx, s.stmts.insertLog)
	args := make([]any, 0, 24)
	groups := map[rollupKey]*rollup{}
	totals := map[totalKey]int64{}
	for i := range entries {
		e := &entries[i]
		if _, err := stmt.ExecContext(ctx, appendLogArgs(args[:0], e)...); err != nil {
			return fmt.Errorf("insert log: %w", err)
		}
		k := rollupKey{hour: hourOf(e.Time), channelID: e.ChannelID, model: e.Model}
		g := groups[k]
		if g == nil {
			g = &rollup{}
			groups[k] = g
		}
		g.name = e.ChannelName
		g.addEntry(e)
		totals[totalKey{e.ChannelID, e.Model, e.Status}]++
	}
	if err := s.writeRollups(ctx, tx, groups, totals); err != nil {
		return err
	}
	if err := s.writeTokenRollups(ctx, tx, entries); err != nil {
		return err
	}
	return tx.Commit()
}

// logStmts are the log writer's statements, prepared once on the writer
// connection: modernc's prepare costs more than the insert it prepares.
type logStmts struct {
	insertLog, readRollup, writeRollup, addTotals *sql.Stmt
}

func prepareLogStmts(ctx context.Context, db *sql.DB) (logStmts, error) {
	var st logStmts
	var err error
	prep := func(q string) *sql.Stmt {
		if err != nil {
			return nil
		}
		var ps *sql.Stmt
		ps, err = db.PrepareContext(ctx, q)
		return ps
	}
	st.insertLog = prep(`INSERT INTO logs (time, token, protocol, model, upstream_model,
		channel_id, channel_name, key_index, attempts, status, duration_ms, first_byte_ms, stream,
		input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, client_ip, error,
		token_id, session, affinity, cost_usd, tries)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`)
	st.readRollup = prep(`SELECT durations FROM log_hourly WHERE hour = ? AND channel_id = ? AND model = ?`)
	st.writeRollup = prep(`INSERT INTO log_hourly (hour, channel_id, model, channel_name, requests, ok,
			client_errors, cancelled, server_errors, duration_ms, first_byte_ms, input_tokens, output_tokens,
			cache_read_tokens, cache_write_tokens, durations, cost_pico, unpriced)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
			ON CONFLICT (hour, channel_id, model) DO UPDATE SET channel_name = excluded.channel_name,
			requests = requests + excluded.requests, ok = ok + excluded.ok,
			client_errors = client_errors + excluded.client_errors, cancelled = cancelled + excluded.cancelled,
			server_errors = server_errors + excluded.server_errors, duration_ms = duration_ms + excluded.duration_ms,
			first_byte_ms = first_byte_ms + excluded.first_byte_ms, input_tokens = input_tokens + excluded.input_tokens,
			output_tokens = output_tokens + excluded.output_tokens,
			cache_read_tokens = cache_read_tokens + excluded.cache_read_tokens,
			cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens, durations = excluded.durations,
			cost_pico = cost_pico + excluded.cost_pico, unpriced = unpriced + excluded.unpriced`)
	st.addTotals = prep(`INSERT INTO log_totals (channel_id, model, status, requests) VALUES (?, ?, ?, ?)
		ON CONFLICT (channel_id, model, status) DO UPDATE SET requests = requests + excluded.requests`)
	if err != nil {
		return st, fmt.Errorf("prepare log statements: %w", err)
	}
	return st, nil
}

func appendLogArgs(args []any, e *logEntry) []any {
	return append(args, e.Time.UnixMilli(), e.Token, e.Protocol, e.Model, e.UpstreamModel,
		e.ChannelID, e.ChannelName, e.KeyIndex, e.Attempts, e.Status, e.DurationMS, e.FirstByteMS, e.Stream,
		e.InputTokens, e.OutputTokens, e.CacheRead, e.CacheWrite, e.ClientIP, e.Error,
		e.TokenID, e.Session, e.Affinity, e.CostUSD, e.trace)
}

// hourOf is the start of t's hour, in Unix milliseconds.
func hourOf(t time.Time) int64 { return t.UnixMilli() - t.UnixMilli()%3_600_000 }

type totalKey struct {
	channelID int64
	model     string
	status    int
}

type rollupKey struct {
	hour      int64
	channelID int64
	model     string
}

// rollup is one row of log_hourly, or the sum of several.
type rollup struct {
	name                                  string
	requests, ok, clientErr, cancel, srv  int64
	dur, fb, in, out, cacheRead, cacheWri int64
	cost, unpriced                        int64 // pico-dollars; requests without a price
	hist                                  durationHist
}

func (g *rollup) addEntry(e *logEntry) {
	g.requests++
	switch s := e.Status; {
	case s >= 200 && s < 300:
		g.ok++
	case s == 499:
		g.cancel++
	case s >= 400 && s < 500:
		g.clientErr++
	case s >= 500:
		g.srv++
	}
	g.dur += e.DurationMS
	g.fb += e.FirstByteMS
	g.in += e.InputTokens
	g.out += e.OutputTokens
	g.cacheRead += e.CacheRead
	g.cacheWri += e.CacheWrite
	g.cost += e.costPico
	if !e.priced {
		g.unpriced++
	}
	g.hist.add(e.DurationMS)
}

func (g *rollup) merge(o *rollup) {
	g.requests += o.requests
	g.ok += o.ok
	g.clientErr += o.clientErr
	g.cancel += o.cancel
	g.srv += o.srv
	g.dur += o.dur
	g.fb += o.fb
	g.in += o.in
	g.out += o.out
	g.cacheRead += o.cacheRead
	g.cacheWri += o.cacheWri
	g.cost += o.cost
	g.unpriced += o.unpriced
	g.hist.merge(o.hist)
}

// writeRollups adds a batch's groups to log_hourly.
func (s *Store) writeRollups(ctx context.Context, tx *sql.Tx, groups map[rollupKey]*rollup, totals map[totalKey]int64) error {
	read, write := tx.StmtContext(ctx, s.stmts.readRollup), tx.StmtContext(ctx, s.stmts.writeRollup)
	add := tx.StmtContext(ctx, s.stmts.addTotals)
	for k, n := range totals {
		if _, err := add.ExecContext(ctx, k.channelID, k.model, k.status, n); err != nil {
			return fmt.Errorf("write totals: %w", err)
		}
	}
	for k, g := range groups {
		var old []byte
		err := read.QueryRowContext(ctx, k.hour, k.channelID, k.model).Scan(&old)
		if err != nil && !errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("read rollup: %w", err)
		}
		if len(old) > 0 {
			var h durationHist
			if err := h.decode(old); err != nil {
				return fmt.Errorf("rollup %d/%d/%q: %w", k.hour, k.channelID, k.model, err)
			}
			g.hist.merge(h)
		}
		_, err = write.ExecContext(ctx,
			k.hour, k.channelID, k.model, g.name, g.requests, g.ok, g.clientErr, g.cancel, g.srv, g.dur, g.fb,
			g.in, g.out, g.cacheRead, g.cacheWri, g.hist.encode(), g.cost, g.unpriced)
		if err != nil {
			return fmt.Errorf("write rollup: %w", err)
		}
	}
	return nil
}

// durationHist counts durations (ms) in log-spaced buckets 10% wide, from
// 10 ms to about 3 hours, so a percentile read from it is within 10% of
// the exact one. It is stored sparse: a few dozen bytes per hour and group.
type durationHist struct {
	counts []int64 // nil when empty; else len(histBounds)
}

// histBounds[k] is the upper bound (ms) of bucket k; the last bucket also
// takes everything longer.
var histBounds = func() []int64 {
	var b []int64
	for v := 10.0; v < 1.2e7; v *= 1.1 {
		b = append(b, int64(math.Ceil(v)))
	}
	return b
}()

func histBucket(ms int64) int {
	if ms <= histBounds[0] {
		return 0
	}
	k := int(math.Ceil(math.Log(float64(ms)/10) / math.Log(1.1)))
	k = max(0, min(k, len(histBounds)-1))
	// Float rounding can land one off either way.
	for k > 0 && histBounds[k-1] >= ms {
		k--
	}
	for k < len(histBounds)-1 && histBounds[k] < ms {
		k++
	}
	return k
}

func (h *durationHist) add(ms int64) {
	if h.counts == nil {
		h.counts = make([]int64, len(histBounds))
	}
	h.counts[histBucket(ms)]++
}

func (h *durationHist) merge(o durationHist) {
	if o.counts == nil {
		return
	}
	if h.counts == nil {
		h.counts = make([]int64, len(histBounds))
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
}

// encode writes (bucket gap, count) uvarint pairs for non-empty buckets.
func (h *durationHist) encode() []byte {
	out := []byte{}
	last := -1
	for i, c := range h.counts {
		if c == 0 {
			continue
		}
		out = binary.AppendUvarint(out, uint64(i-last))
		out = binary.AppendUvarint(out, uint64(c))
		last = i
	}
	return out
}

func (h *durationHist) decode(b []byte) error {
	at := -1
	for len(b) > 0 {
		gap, n := binary.Uvarint(b)
		if n <= 0 {
			return errors.New("corrupt duration histogram")
		}
		b = b[n:]
		c, n := binary.Uvarint(b)
		if n <= 0 {
			return errors.New("corrupt duration histogram")
		}
		b = b[n:]
		at += int(gap)
		if at < 0 || at >= len(histBounds) {
			return errors.New("duration histogram bucket out of range")
		}
		if h.counts == nil {
			h.counts = make([]int64, len(histBounds))
		}
		h.counts[at] += int64(c)
	}
	return nil
}

// quantile estimates the q-th quantile, interpolating inside its bucket.
func (h *durationHist) quantile(q float64) int64 {
	var total int64
	for _, c := range h.counts {
		total += c
	}
	if total == 0 {
		return 0
	}
	target := q * float64(total)
	var cum int64
	for k, c := range h.counts {
		if c == 0 || float64(cum+c) < target {
			cum += c
			continue
		}
		lo := int64(0)
		if k > 0 {
			lo = histBounds[k-1]
		}
		frac := (target - float64(cum)) / float64(c)
		return lo + int64(math.Round(frac*float64(histBounds[k]-lo)))
	}
	return histBounds[len(histBounds)-1]
}

// logFilter selects rows of the request log.
type logFilter struct {
	ChannelID int64
	TokenID   int64 // a managed client token; rows only (see countLogs)
	Model     string
	Status    int // exact status; see StatusClass
	// StatusClass is 2, 4 or 5 for 2xx/4xx/5xx, or -1 for "not 2xx".
	StatusClass int
	Since       time.Time
	Until       time.Time
	BeforeID    int64
	Limit       int
}

// logTable is a table the request log is read or counted from.
type logTable uint8

const (
	logRows   logTable = iota // logs: a row per request
	logTotals                 // log_totals: requests by channel, model and status, all time
	logHours                  // log_hourly: by hour, channel and model, a column per status class
)

func (t logTable) name() string { return [...]string{"logs", "log_totals", "log_hourly"}[t] }

// where is the WHERE clause selecting f's requests in table t, and its
// arguments: every filter builds its clause here, whichever table answers.
// Each table tests the columns it has. countLogs reads log_totals only
// when f has no time filter, and log_hourly only without an exact status,
// summing the column of f's status class instead.
func (f logFilter) where(t logTable) (string, []any) {
	where, args := "WHERE 1=1", []any{}
	if f.ChannelID != 0 {
		where, args = where+" AND channel_id = ?", append(args, f.ChannelID)
	}
	if f.Model != "" {
		where, args = where+" AND model = ?", append(args, f.Model)
	}
	if f.TokenID != 0 && t == logRows {
		where, args = where+" AND token_id = ?", append(args, f.TokenID)
	}
	if t != logHours {
		if f.Status != 0 {
			where, args = where+" AND status = ?", append(args, f.Status)
		}
		switch {
		case f.StatusClass == -1:
			where += " AND (status < 200 OR status >= 300)"
		case f.StatusClass > 0:
			where, args = where+" AND status >= ? AND status < ?", append(args, f.StatusClass*100, f.StatusClass*100+100)
		}
	}
	if t != logTotals {
		col := "time"
		if t == logHours {
			col = "hour"
		}
		if !f.Since.IsZero() {
			where, args = where+" AND "+col+" >= ?", append(args, f.Since.UnixMilli())
		}
		if !f.Until.IsZero() {
			where, args = where+" AND "+col+" < ?", append(args, f.Until.UnixMilli())
		}
	}
	return where, args
}

// QueryLogs returns rows matching f, newest first, and how many match in all.
func (s *Store) QueryLogs(ctx context.Context, f logFilter) ([]logEntry, int, error) {
	total, err := s.countLogs(ctx, f)
	if err != nil {
		return nil, 0, err
	}
	where, args := f.where(logRows)
	if f.BeforeID > 0 {
		where, args = where+" AND id < ?", append(args, f.BeforeID) // the page, not the total
	}
	limit := f.Limit
	if limit <= 0 {
		limit = 50
	}
	rows, err := s.rdb.QueryContext(ctx, `SELECT id, time, token, protocol, model, upstream_model, channel_id,
		channel_name, key_index, attempts, status, duration_ms, first_byte_ms, stream, input_tokens,
		output_tokens, cache_read_tokens, cache_write_tokens, client_ip, error,
		token_id, session, affinity, cost_usd, tries
		FROM logs `+where+` ORDER BY id DESC LIMIT ?`, append(args, limit)...)
	if err != nil {
		return nil, 0, fmt.Errorf("query logs: %w", err)
	}
	defer rows.Close()
	out := []logEntry{}
	for rows.Next() {
		var e logEntry
		var t int64
		if err := rows.Scan(&e.ID, &t, &e.Token, &e.Protocol, &e.Model, &e.UpstreamModel, &e.ChannelID,
			&e.ChannelName, &e.KeyIndex, &e.Attempts, &e.Status, &e.DurationMS, &e.FirstByteMS, &e.Stream,
			&e.InputTokens, &e.OutputTokens, &e.CacheRead, &e.CacheWrite, &e.ClientIP, &e.Error,
			&e.TokenID, &e.Session, &e.Affinity, &e.CostUSD, &e.trace); err != nil {
			return nil, 0, err
		}
		e.Tries = decodeTrace(e.trace, &e)
		e.Time = time.UnixMilli(t).UTC()
		out = append(out, e)
	}
	return out, total, rows.Err()
}

// countLogs counts the rows f selects without reading them where it can:
// with no time filter from log_totals (any channel, model and status
// filter), over whole hours from the hourly rollups (any but an exact
// status). Anything finer counts the rows.
func (s *Store) countLogs(ctx context.Context, f logFilter) (int, error) {
	aligned := func(t time.Time) bool { return t.IsZero() || t.UnixMilli()%3_600_000 == 0 }
	table, sum := logRows, "count(*)"
	switch {
	case f.TokenID != 0:
		// Neither summary table is by token: count the rows (indexed).
	case f.Since.IsZero() && f.Until.IsZero():
		table, sum = logTotals, "coalesce(sum(requests), 0)"
	case f.Status == 0 && aligned(f.Since) && aligned(f.Until):
		col := map[int]string{0: "requests", 2: "ok", 4: "client_errors + cancelled", 5: "server_errors", -1: "requests - ok"}[f.StatusClass]
		table, sum = logHours, "coalesce(sum("+col+"), 0)"
	}
	where, args := f.where(table)
	var n int
	if err := s.rdb.QueryRowContext(ctx, "SELECT "+sum+" FROM "+table.name()+" "+where, args...).Scan(&n); err != nil {
		return 0, fmt.Errorf("count logs: %w", err)
	}
	return n, nil
}

// DeleteLogsBefore removes what was logged before the hour t falls in,
// one hour per transaction, oldest first: each transaction subtracts that
// hour's rows from log_totals, deletes them and deletes the hour's rollup,
// so totals, rollups and rows always agree and the writer is never held
// off for longer than one hour of rows takes. It returns how many rows
// went.
// rollupDays is how long hourly rollups are kept at least, whatever
// CCLOAD_LOG_DAYS keeps of the rows: two months, so that this month's spend
// is whole on its last day.
const rollupDays = 62

func (s *Store) DeleteLogsBefore(ctx context.Context, t time.Time) (int64, error) {
	cut := hourOf(t)
	var total int64
	for {
		var oldest sql.NullInt64
		if err := s.db.QueryRowContext(ctx, `SELECT min(time) FROM logs WHERE time < ?`, cut).Scan(&oldest); err != nil {
			return total, fmt.Errorf("find old logs: %w", err)
		}
		if !oldest.Valid {
			break
		}
		h := oldest.Int64 - oldest.Int64%3_600_000
		n, err := s.deleteLogHour(ctx, h)
		if err != nil {
			return total, err
		}
		total += n
	}
	// The hourly rollups outlive the rows: this month's spend (the
	// dashboard, SPEC §10) and long trends are summed from them, and they
	// are small (one row per hour, channel and model).
	rcut := min(cut, hourOf(t.AddDate(0, 0, -(rollupDays-1))))
	if _, err := s.db.ExecContext(ctx, `DELETE FROM log_hourly WHERE hour < ?`, rcut); err != nil {
		return total, fmt.Errorf("delete old rollups: %w", err)
	}
	if _, err := s.db.ExecContext(ctx, `DELETE FROM token_hourly WHERE hour < ?`, rcut); err != nil {
		return total, fmt.Errorf("delete old token rollups: %w", err)
	}
	return total, nil
}

func (s *Store) deleteLogHour(ctx context.Context, h int64) (int64, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback()
	end := h + 3_600_000
	if _, err := tx.ExecContext(ctx, `UPDATE log_totals SET requests = log_totals.requests - old.n
		FROM (SELECT channel_id, model, status, count(*) AS n FROM logs WHERE time >= ? AND time < ?
			GROUP BY channel_id, model, status) AS old
		WHERE log_totals.channel_id = old.channel_id AND log_totals.model = old.model
			AND log_totals.status = old.status`, h, end); err != nil {
		return 0, fmt.Errorf("subtract old totals: %w", err)
	}
	res, err := tx.ExecContext(ctx, `DELETE FROM logs WHERE time >= ? AND time < ?`, h, end)
	if err != nil {
		return 0, fmt.Errorf("delete old logs: %w", err)
	}
	n, _ := res.RowsAffected()
	if _, err := tx.ExecContext(ctx, `DELETE FROM log_totals WHERE requests <= 0`); err != nil {
		return 0, fmt.Errorf("delete empty totals: %w", err)
	}
	return n, tx.Commit()
}

// retentionLoop deletes log rows older than days, and expired sessions:
// with tick nil at once and then hourly, until ctx ends. A test passes its
// own tick instead, and the loop makes a pass only when a time arrives on
// it, with days counted back from that time; it returns when tick closes.
// Without that, a pass at start would race a test that writes old rows.
func retentionLoop(ctx context.Context, s *Store, days int, tick <-chan time.Time) {
	if tick == nil {
		t := time.NewTicker(time.Hour)
		defer t.Stop()
		tick = t.C
		retainLogs(ctx, s, days, s.Now())
	}
	for {
		select {
		case <-ctx.Done():
			return
		case now, ok := <-tick:
			if !ok {
				return
			}
			retainLogs(ctx, s, days, now)
		}
	}
}

// retainLogs is one pass of retentionLoop.
func retainLogs(ctx context.Context, s *Store, days int, now time.Time) {
	cutoff := now.AddDate(0, 0, -days)
	if n, err := s.DeleteLogsBefore(ctx, cutoff); err != nil {
		if ctx.Err() != nil {
			return
		}
		slog.Error("log retention", "err", err)
	} else if n > 0 {
		slog.Info("log retention", "deleted", n, "older_than", cutoff.Format(time.RFC3339))
	}
	if err := s.DeleteExpiredSessions(ctx); err != nil && ctx.Err() == nil {
		slog.Error("session cleanup", "err", err)
	}
}

// statsRow is one line of /admin/stats: a channel's or a model's traffic.
type statsRow struct {
	ChannelID       *int64  `json:"channel_id,omitempty"`
	ChannelName     *string `json:"channel_name,omitempty"`
	Model           *string `json:"model,omitempty"`
	Requests        int64   `json:"requests"`
	Success         int64   `json:"success"`
	Errors          int64   `json:"errors"`
	SuccessRate     float64 `json:"success_rate"`
	AvgMS           float64 `json:"avg_ms"`
	P95MS           int64   `json:"p95_ms"`
	AvgFirstByteMS  float64 `json:"avg_first_byte_ms"`
	InputTokens     int64   `json:"input_tokens"`
	OutputTokens    int64   `json:"output_tokens"`
	CacheReadTokens int64   `json:"cache_read_tokens"`
	CacheWriteToks  int64   `json:"cache_write_tokens"`
	// CacheHitRatio is cache read / (cache read + cache write + uncached
	// input): how much of the prompt the upstream's cache served. 0
	// without input tokens.
	CacheHitRatio float64 `json:"cache_hit_ratio"`
	CostUSD       float64 `json:"cost_usd"`
	Unpriced      int64   `json:"unpriced"` // requests whose model has no price
	TokenID       *int64  `json:"token_id,omitempty"`
	Token         *string `json:"token,omitempty"`

	sum rollup // not serialised
}

func (r *statsRow) finish() {
	g := &r.sum
	r.Requests, r.Success, r.Errors = g.requests, g.ok, g.requests-g.ok
	r.InputTokens, r.OutputTokens, r.CacheReadTokens, r.CacheWriteToks = g.in, g.out, g.cacheRead, g.cacheWri
	r.CacheHitRatio = cacheHitRatio(g.in, g.cacheRead, g.cacheWri)
	r.CostUSD, r.Unpriced = usd(g.cost), g.unpriced
	if g.requests > 0 {
		r.SuccessRate = float64(g.ok) / float64(g.requests)
		r.AvgMS = float64(g.dur) / float64(g.requests)
		r.AvgFirstByteMS = float64(g.fb) / float64(g.requests)
		r.P95MS = g.hist.quantile(0.95)
	}
}

// stats is the /admin/stats answer.
type stats struct {
	Hours    int        `json:"hours"`
	Since    time.Time  `json:"since"`
	Channels []statsRow `json:"channels"`
	Models   []statsRow `json:"models"`
	Tokens   []statsRow `json:"tokens"`
}

// windowStart is the start of an hours-long window ending with the current
// hour: stats, trends and the summary all count whole hours, the one in
// progress included.
func windowStart(now time.Time, hours int) time.Time {
	return now.UTC().Truncate(time.Hour).Add(-time.Duration(hours-1) * time.Hour)
}

// Stats aggregates the hourly rollups from since by channel and by model.
// names gives the current name of each channel; rows of deleted channels
// keep the name they were logged with.
func (s *Store) Stats(ctx context.Context, since time.Time, names map[int64]string) ([]statsRow, []statsRow, error) {
	rows, err := s.rdb.QueryContext(ctx, `SELECT channel_id, model, channel_name, requests, ok, client_errors,
		cancelled, server_errors, duration_ms, first_byte_ms, input_tokens, output_tokens, cache_read_tokens,
		cache_write_tokens, durations, cost_pico, unpriced FROM log_hourly WHERE hour >= ?`, since.UnixMilli())
	if err != nil {
		return nil, nil, fmt.Errorf("stats: %w", err)
	}
	defer rows.Close()
	byChannel := map[int64]*statsRow{}
	byModel := map[string]*statsRow{}
	for rows.Next() {
		var (
			ch    int64
			model string
			g     rollup
			hist  []byte
		)
		if err := rows.Scan(&ch, &model, &g.name, &g.requests, &g.ok, &g.clientErr, &g.cancel, &g.srv, &g.dur,
			&g.fb, &g.in, &g.out, &g.cacheRead, &g.cacheWri, &hist, &g.cost, &g.unpriced); err != nil {
			return nil, nil, err
		}
		if err := g.hist.decode(hist); err != nil {
			return nil, nil, fmt.Errorf("stats: %w", err)
		}
		c := byChannel[ch]
		if c == nil {
			id, name := ch, g.name
			if n, ok := names[ch]; ok {
				name = n
			}
			c = &statsRow{ChannelID: &id, ChannelName: &name}
			byChannel[ch] = c
		}
		c.sum.merge(&g)
		m := byModel[model]
		if m == nil {
			name := model
			m = &statsRow{Model: &name}
			byModel[model] = m
		}
		m.sum.merge(&g)
	}
	if err := rows.Err(); err != nil {
		return nil, nil, err
	}
	return collectStats(byChannel), collectStats(byModel), nil
}

// collectStats finishes the rows of one grouping and orders them: most
// requests first, then by name.
func collectStats[K comparable](rows map[K]*statsRow) []statsRow {
	out := make([]statsRow, 0, len(rows))
	for _, r := range rows {
		r.finish()
		out = append(out, *r)
	}
	slices.SortFunc(out, func(a, b statsRow) int {
		return cmp.Or(cmp.Compare(b.Requests, a.Requests), cmp.Compare(a.sortKey(), b.sortKey()))
	})
	return out
}

func (r statsRow) sortKey() string {
	if r.Model != nil {
		return *r.Model
	}
	return fmt.Sprintf("%020d", *r.ChannelID)
}

// trendBucket is one hour of /admin/trends.
type trendBucket struct {
	Start        time.Time `json:"start"`
	Requests     int64     `json:"requests"`
	Success      int64     `json:"success"`
	Errors       int64     `json:"errors"`
	AvgMS        float64   `json:"avg_ms"`
	InputTokens  int64     `json:"input_tokens"`
	OutputTokens int64     `json:"output_tokens"`
	CacheRead    int64     `json:"cache_read_tokens"`
	CacheWrite   int64     `json:"cache_write_tokens"`
	CacheHit     float64   `json:"cache_hit_ratio"`
	CostUSD      float64   `json:"cost_usd"`

	durSum int64
}

// cacheHitRatio is the share of a prompt the upstream's cache served (see
// statsRow.CacheHitRatio).
func cacheHitRatio(in, read, write int64) float64 {
	if all := in + read + write; all > 0 {
		return float64(read) / float64(all)
	}
	return 0
}

// Trends returns hourly buckets for the hours ending with the current one,
// every hour present, zeros included.
func (s *Store) Trends(ctx context.Context, now time.Time, hours int) ([]trendBucket, error) {
	first := windowStart(now, hours).UnixMilli()
	return s.trends(ctx, now, hours, `SELECT (hour - ?) / 3600000, sum(requests), sum(ok), sum(duration_ms),
		sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_pico)
		FROM log_hourly WHERE hour >= ? GROUP BY hour`, first, first)
}

// trends fills hours buckets ending at now from query, whose rows are
// (bucket index, requests, ok, duration_ms, input, output, cache read,
// cache write, cost_pico); Trends and TrendsForToken differ only in it.
func (s *Store) trends(ctx context.Context, now time.Time, hours int, query string, args ...any) ([]trendBucket, error) {
	first := windowStart(now, hours)
	buckets := make([]trendBucket, hours)
	for i := range buckets {
		buckets[i].Start = first.Add(time.Duration(i) * time.Hour)
	}
	rows, err := s.rdb.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("trends: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var h, n, ok, dur, in, out, cr, cw, cost int64
		if err := rows.Scan(&h, &n, &ok, &dur, &in, &out, &cr, &cw, &cost); err != nil {
			return nil, err
		}
		if h < 0 || h >= int64(hours) {
			continue // clock skew: a row from the future
		}
		b := &buckets[h]
		b.Requests, b.Success, b.durSum, b.InputTokens, b.OutputTokens = n, ok, dur, in, out
		b.CacheRead, b.CacheWrite, b.CacheHit = cr, cw, cacheHitRatio(in, cr, cw)
		b.CostUSD = usd(cost)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for i := range buckets {
		b := &buckets[i]
		b.Errors = b.Requests - b.Success
		if b.Requests > 0 {
			b.AvgMS = float64(b.durSum) / float64(b.Requests)
		}
	}
	return buckets, nil
}

// CountRequests returns how many requests the rollups hold from since (an
// hour boundary), and how many of them succeeded.
func (s *Store) CountRequests(ctx context.Context, since time.Time) (total, success int64, err error) {
	err = s.rdb.QueryRowContext(ctx, `SELECT coalesce(sum(requests), 0), coalesce(sum(ok), 0)
		FROM log_hourly WHERE hour >= ?`, since.UnixMilli()).Scan(&total, &success)
	return total, success, err
}

// flush returns once every entry queued before the call is written.
func (lw *logWriter) flush(ctx context.Context) error {
	done := make(chan struct{})
	select {
	case lw.queue <- logEntry{flushed: done}:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
