package main

import (
	"cmp"
	"context"
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
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO logs (time, token, protocol, model, upstream_model,
		channel_id, channel_name, key_index, attempts, status, duration_ms, first_byte_ms, stream,
		input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, client_ip, error)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`)
	if err != nil {
		return err
	}
	defer stmt.Close()
	for i := range entries {
		e := &entries[i]
		if _, err := stmt.ExecContext(ctx, e.Time.UnixMilli(), e.Token, e.Protocol, e.Model, e.UpstreamModel,
			e.ChannelID, e.ChannelName, e.KeyIndex, e.Attempts, e.Status, e.DurationMS, e.FirstByteMS, e.Stream,
			e.InputTokens, e.OutputTokens, e.CacheRead, e.CacheWrite, e.ClientIP, e.Error); err != nil {
			return fmt.Errorf("insert log: %w", err)
		}
	}
	return tx.Commit()
}

// logFilter selects rows of the request log.
type logFilter struct {
	ChannelID int64
	Model     string
	Status    int // exact status; see StatusClass
	// StatusClass is 2, 4 or 5 for 2xx/4xx/5xx, or -1 for "not 2xx".
	StatusClass int
	Since       time.Time
	Until       time.Time
	BeforeID    int64
	Limit       int
}

// QueryLogs returns rows matching f, newest first, and how many match in all.
func (s *Store) QueryLogs(ctx context.Context, f logFilter) ([]logEntry, int, error) {
	where, args := "WHERE 1=1", []any{}
	if f.ChannelID != 0 {
		where += " AND channel_id = ?"
		args = append(args, f.ChannelID)
	}
	if f.Model != "" {
		where += " AND model = ?"
		args = append(args, f.Model)
	}
	if f.Status != 0 {
		where += " AND status = ?"
		args = append(args, f.Status)
	}
	switch {
	case f.StatusClass == -1:
		where += " AND (status < 200 OR status >= 300)"
	case f.StatusClass > 0:
		where += " AND status >= ? AND status < ?"
		args = append(args, f.StatusClass*100, f.StatusClass*100+100)
	}
	if !f.Since.IsZero() {
		where += " AND time >= ?"
		args = append(args, f.Since.UnixMilli())
	}
	if !f.Until.IsZero() {
		where += " AND time < ?"
		args = append(args, f.Until.UnixMilli())
	}
	var total int
	if err := s.rdb.QueryRowContext(ctx, "SELECT count(*) FROM logs "+where, args...).Scan(&total); err != nil {
		return nil, 0, fmt.Errorf("count logs: %w", err)
	}
	pageWhere, pageArgs := where, args
	if f.BeforeID > 0 {
		pageWhere += " AND id < ?"
		pageArgs = append(append([]any{}, args...), f.BeforeID)
	}
	limit := f.Limit
	if limit <= 0 {
		limit = 50
	}
	rows, err := s.rdb.QueryContext(ctx, `SELECT id, time, token, protocol, model, upstream_model, channel_id,
		channel_name, key_index, attempts, status, duration_ms, first_byte_ms, stream, input_tokens,
		output_tokens, cache_read_tokens, cache_write_tokens, client_ip, error
		FROM logs `+pageWhere+` ORDER BY id DESC LIMIT ?`, append(pageArgs, limit)...)
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
			&e.InputTokens, &e.OutputTokens, &e.CacheRead, &e.CacheWrite, &e.ClientIP, &e.Error); err != nil {
			return nil, 0, err
		}
		e.Time = time.UnixMilli(t).UTC()
		out = append(out, e)
	}
	return out, total, rows.Err()
}

// DeleteLogsBefore removes rows older than t in small chunks, so the writer
// is never locked out for long. It returns how many rows went.
func (s *Store) DeleteLogsBefore(ctx context.Context, t time.Time) (int64, error) {
	var total int64
	for {
		res, err := s.db.ExecContext(ctx, `DELETE FROM logs WHERE id IN
			(SELECT id FROM logs WHERE time < ? ORDER BY time LIMIT 5000)`, t.UnixMilli())
		if err != nil {
			return total, fmt.Errorf("delete old logs: %w", err)
		}
		n, _ := res.RowsAffected()
		total += n
		if n < 5000 {
			return total, nil
		}
	}
}

// retentionLoop deletes log rows older than days, hourly, until ctx ends.
func retentionLoop(ctx context.Context, s *Store, days int) {
	tick := time.NewTicker(time.Hour)
	defer tick.Stop()
	for {
		cutoff := s.Now().AddDate(0, 0, -days)
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
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
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

	durations []int64 // for p95; not serialised
	durSum    int64
	fbSum     int64
}

func (r *statsRow) add(status int, dur, fb, in, out, cr, cw int64) {
	r.Requests++
	if status >= 200 && status < 300 {
		r.Success++
	}
	r.durations = append(r.durations, dur)
	r.durSum += dur
	r.fbSum += fb
	r.InputTokens += in
	r.OutputTokens += out
	r.CacheReadTokens += cr
	r.CacheWriteToks += cw
}

func (r *statsRow) finish() {
	r.Errors = r.Requests - r.Success
	if r.Requests > 0 {
		r.SuccessRate = float64(r.Success) / float64(r.Requests)
		r.AvgMS = float64(r.durSum) / float64(r.Requests)
		r.AvgFirstByteMS = float64(r.fbSum) / float64(r.Requests)
		r.P95MS = percentile(r.durations, 0.95)
	}
	r.durations = nil
}

// percentile returns the nearest-rank q-th percentile of v (reordered).
func percentile(v []int64, q float64) int64 {
	if len(v) == 0 {
		return 0
	}
	slices.Sort(v)
	i := int(math.Ceil(q*float64(len(v)))) - 1
	return v[max(0, min(i, len(v)-1))]
}

// stats is the /admin/stats answer.
type stats struct {
	Hours    int        `json:"hours"`
	Channels []statsRow `json:"channels"`
	Models   []statsRow `json:"models"`
}

// Stats aggregates the log since t by channel and by model. names gives the
// current name of each channel; rows of deleted channels keep the name they
// were logged with. One pass over the covering index serves both groupings.
func (s *Store) Stats(ctx context.Context, since time.Time, names map[int64]string) ([]statsRow, []statsRow, error) {
	rows, err := s.rdb.QueryContext(ctx, `SELECT channel_id, model, status, duration_ms, first_byte_ms,
		input_tokens, output_tokens, cache_read_tokens, cache_write_tokens
		FROM logs INDEXED BY logs_stats WHERE time >= ?`, since.UnixMilli())
	if err != nil {
		return nil, nil, fmt.Errorf("stats: %w", err)
	}
	defer rows.Close()
	byChannel := map[int64]*statsRow{}
	byModel := map[string]*statsRow{}
	for rows.Next() {
		var (
			ch                       int64
			model                    string
			status                   int
			dur, fb, in, out, cr, cw int64
		)
		if err := rows.Scan(&ch, &model, &status, &dur, &fb, &in, &out, &cr, &cw); err != nil {
			return nil, nil, err
		}
		c := byChannel[ch]
		if c == nil {
			id := ch
			c = &statsRow{ChannelID: &id}
			byChannel[ch] = c
		}
		c.add(status, dur, fb, in, out, cr, cw)
		m := byModel[model]
		if m == nil {
			name := model
			m = &statsRow{Model: &name}
			byModel[model] = m
		}
		m.add(status, dur, fb, in, out, cr, cw)
	}
	if err := rows.Err(); err != nil {
		return nil, nil, err
	}
	chOut := make([]statsRow, 0, len(byChannel))
	for id, r := range byChannel {
		name, ok := names[id]
		if !ok {
			name = s.loggedChannelName(ctx, id)
		}
		r.ChannelName = &name
		r.finish()
		chOut = append(chOut, *r)
	}
	mOut := make([]statsRow, 0, len(byModel))
	for _, r := range byModel {
		r.finish()
		mOut = append(mOut, *r)
	}
	byTraffic := func(a, b statsRow) int {
		return cmp.Or(cmp.Compare(b.Requests, a.Requests), cmp.Compare(a.sortKey(), b.sortKey()))
	}
	slices.SortFunc(chOut, byTraffic)
	slices.SortFunc(mOut, byTraffic)
	return chOut, mOut, nil
}

func (r statsRow) sortKey() string {
	if r.Model != nil {
		return *r.Model
	}
	return fmt.Sprintf("%020d", *r.ChannelID)
}

// loggedChannelName is the name a (since deleted) channel was logged with.
func (s *Store) loggedChannelName(ctx context.Context, id int64) string {
	if id == 0 {
		return ""
	}
	var name string
	s.rdb.QueryRowContext(ctx, `SELECT channel_name FROM logs WHERE channel_id = ? ORDER BY id DESC LIMIT 1`, id).Scan(&name)
	return name
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

	durSum int64
}

// Trends returns hourly buckets for the hours ending with the current one,
// every hour present, zeros included.
func (s *Store) Trends(ctx context.Context, now time.Time, hours int) ([]trendBucket, error) {
	first := now.UTC().Truncate(time.Hour).Add(-time.Duration(hours-1) * time.Hour)
	buckets := make([]trendBucket, hours)
	for i := range buckets {
		buckets[i].Start = first.Add(time.Duration(i) * time.Hour)
	}
	rows, err := s.rdb.QueryContext(ctx, `SELECT (time - ?) / 3600000 AS h, count(*),
		sum(status >= 200 AND status < 300), sum(duration_ms), sum(input_tokens), sum(output_tokens)
		FROM logs INDEXED BY logs_stats WHERE time >= ? GROUP BY h`, first.UnixMilli(), first.UnixMilli())
	if err != nil {
		return nil, fmt.Errorf("trends: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var h, n, ok, dur, in, out int64
		if err := rows.Scan(&h, &n, &ok, &dur, &in, &out); err != nil {
			return nil, err
		}
		if h < 0 || h >= int64(hours) {
			continue // clock skew: a row from the future
		}
		b := &buckets[h]
		b.Requests, b.Success, b.durSum, b.InputTokens, b.OutputTokens = n, ok, dur, in, out
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
