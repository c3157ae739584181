package main

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fillLogs writes n synthetic request-log rows spread evenly over span
// ending now, through InsertLogs (rows and rollups, as the writer does) in
// large batches. Channels, models and statuses vary the way real traffic
// does: a few channels, a dozen models, mostly successes.
func fillLogs(tb testing.TB, s *Store, n int, span time.Duration, now time.Time) {
	tb.Helper()
	r := rand.New(rand.NewPCG(1, 2))
	statuses := []int{200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 429, 500, 529, 499}
	start := now.Add(-span)
	step := span / time.Duration(n)
	batch := make([]logEntry, 0, 10000)
	for i := range n {
		ch := int64(r.IntN(8) + 1)
		e := logEntry{Time: start.Add(step * time.Duration(i)), Token: "team", Protocol: "anthropic",
			Model: fmt.Sprintf("model-%d", r.IntN(12)), UpstreamModel: "m", ChannelID: ch,
			ChannelName: fmt.Sprintf("channel-%d", ch), Attempts: 1, Status: statuses[r.IntN(len(statuses))],
			DurationMS: int64(200 + r.IntN(30000)), FirstByteMS: int64(100 + r.IntN(2000)), Stream: r.IntN(2) == 0,
			InputTokens: int64(r.IntN(20000)), OutputTokens: int64(r.IntN(2000)), CacheRead: int64(r.IntN(50000)),
			CacheWrite: int64(r.IntN(5000)), ClientIP: "10.0.0.7"}
		if e.Status != 200 {
			e.Error = "fake error"
		}
		batch = append(batch, e)
		if len(batch) == cap(batch) || i == n-1 {
			if err := s.InsertLogs(context.Background(), batch); err != nil {
				tb.Fatal(err)
			}
			batch = batch[:0]
		}
	}
	if _, err := s.db.Exec("ANALYZE"); err != nil {
		tb.Fatal(err)
	}
}

// BenchmarkAdminQueries times the admin's heavy reads on a 1,000,000-row
// log, through the real handlers: stats and trends over 24 hours and a
// filtered logs page. "year" spreads the rows over a year (the issue's
// case, CCLOAD_LOG_DAYS=365); "day" puts all of them in the last 24 hours,
// the worst case for a 24-hour window. Run it as
//
//	go test -run '^$' -bench AdminQueries -benchtime 20x
//
// CCLOAD_BENCH_ROWS changes the row count.
func BenchmarkAdminQueries(b *testing.B) {
	rows := 1_000_000
	if v := os.Getenv("CCLOAD_BENCH_ROWS"); v != "" {
		rows, _ = strconv.Atoi(v)
	}
	for _, dist := range []struct {
		name string
		span time.Duration
	}{{"year", 365 * 24 * time.Hour}, {"day", 24 * time.Hour}} {
		b.Run(dist.name, func(b *testing.B) {
			e := newTestEnv(b, noRetention) // a year of rows, kept 7 days
			start := time.Now()
			fillLogs(b, e.app.store, rows, dist.span, time.Now())
			b.Logf("filled %d rows over %s in %s", rows, dist.span, time.Since(start).Round(time.Millisecond))
			tok := e.login()
			for _, q := range []string{
				"/admin/stats?hours=24",
				"/admin/trends?hours=24",
				"/admin/logs?limit=50",
				"/admin/logs?model=model-3&status=5xx&limit=50",
				"/admin/logs?status=529&limit=50", // an exact status: its total counts rows
				"/admin/logs?channel_id=3&limit=50&before_id=" + strconv.Itoa(rows/2),
				"/admin/summary",
			} {
				name := strings.NewReplacer("/admin/", "", "?", " ", "&", " ").Replace(q)
				b.Run(name, func(b *testing.B) {
					for b.Loop() {
						req, _ := http.NewRequest("GET", e.URL+q, nil)
						req.Header.Set("Authorization", "Bearer "+tok)
						resp, err := e.client.Do(req)
						if err != nil {
							b.Fatal(err)
						}
						resp.Body.Close()
						if resp.StatusCode != 200 {
							b.Fatalf("%s: %d", q, resp.StatusCode)
						}
					}
					b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(b.N), "ms/req")
				})
			}
		})
	}
}

// noRetention starts ccload without its retention loop, for tests that
// write rows older than the test config's 7 days: the loop's pass at start
// would race them, deleting some of the rows as they are written.
func noRetention(c *config) { c.LogDays = 0 }

func TestRetentionDeletesOldRows(t *testing.T) {
	e := newTestEnv(t, noRetention)
	ctx := context.Background()
	now := time.Now().Truncate(time.Hour).Add(30 * time.Minute)
	fillLogs(t, e.app.store, 1000, 10*24*time.Hour, now)
	cutHour := hourOf(now.AddDate(0, 0, -7))
	var want int
	e.app.store.rdb.QueryRow(`SELECT count(*) FROM logs WHERE time < ?`, cutHour).Scan(&want)
	n, err := e.app.store.DeleteLogsBefore(ctx, now.AddDate(0, 0, -7))
	if err != nil {
		t.Fatal(err)
	}
	left, total, _ := e.app.store.QueryLogs(ctx, logFilter{Limit: 5000})
	if n != int64(want) || len(left) != 1000-want || want < 290 || want > 300 {
		t.Errorf("deleted %d, %d left; want %d deleted (whole hours before the cutoff)", n, len(left), want)
	}
	// The all-time total (from log_totals) and every class count still
	// match the rows.
	if total != len(left) {
		t.Errorf("total %d after retention; %d rows left", total, len(left))
	}
	for _, status := range []int{200, 429, 499, 500, 529} {
		_, got, _ := e.app.store.QueryLogs(ctx, logFilter{Status: status, Limit: 1})
		var rows int
		e.app.store.rdb.QueryRow(`SELECT count(*) FROM logs WHERE status = ?`, status).Scan(&rows)
		if got != rows {
			t.Errorf("status %d: total %d; rows %d", status, got, rows)
		}
	}
	for _, class := range []int{2, 4, 5, -1} {
		_, got, _ := e.app.store.QueryLogs(ctx, logFilter{StatusClass: class, Limit: 1})
		var rows int
		switch class {
		case -1:
			e.app.store.rdb.QueryRow(`SELECT count(*) FROM logs WHERE status < 200 OR status >= 300`).Scan(&rows)
		default:
			e.app.store.rdb.QueryRow(`SELECT count(*) FROM logs WHERE status >= ? AND status < ?`, class*100, class*100+100).Scan(&rows)
		}
		if got != rows {
			t.Errorf("class %d: total %d; rows %d", class, got, rows)
		}
	}
	// The rollups of those hours stay (this month's spend is summed from
	// them), for rollupDays.
	var oldHours int
	e.app.store.rdb.QueryRow(`SELECT count(*) FROM log_hourly WHERE hour < ?`, cutHour).Scan(&oldHours)
	if oldHours == 0 {
		t.Errorf("the rollups of the deleted hours went with their rows")
	}
	for _, l := range left {
		if l.Time.UnixMilli() < cutHour {
			t.Fatalf("row from %s survived", l.Time)
		}
	}
}

// TestRetentionLoopPassesOnItsTick drives retentionLoop with a test's tick:
// no pass of its own at start, one per time sent, days counted back from
// that time, and an end when the tick closes.
func TestRetentionLoopPassesOnItsTick(t *testing.T) {
	e := newTestEnv(t, noRetention)
	s := e.app.store
	now := time.Date(2026, 3, 1, 12, 30, 0, 0, time.UTC)
	fillLogs(t, s, 1000, 10*24*time.Hour, now)
	count := func() (n int) {
		s.rdb.QueryRow(`SELECT count(*) FROM logs`).Scan(&n)
		return n
	}
	var keep int
	s.rdb.QueryRow(`SELECT count(*) FROM logs WHERE time >= ?`, hourOf(now.AddDate(0, 0, -7))).Scan(&keep)

	tick := make(chan time.Time)
	done := make(chan struct{})
	go func() { retentionLoop(context.Background(), s, 7, tick); close(done) }()
	// Three days after the oldest row: nothing is older than 7 days yet. A
	// pass at start, by the real clock, would have deleted every row.
	tick <- now.AddDate(0, 0, -7)
	tick <- now // received only once the pass before it is done
	if n := count(); n != 1000 {
		t.Errorf("%d rows after a pass 7 days before the rows' end; want all 1000", n)
	}
	close(tick) // the loop ends once the pass at now is done
	<-done
	if n := count(); n != keep || keep < 700 || keep > 710 {
		t.Errorf("%d rows after a pass at %s; want the %d of the last 7 days", n, now, keep)
	}
}

func TestDurationHistogram(t *testing.T) {
	for k := 1; k < len(histBounds); k++ {
		if histBounds[k] <= histBounds[k-1] {
			t.Fatalf("bounds not increasing at %d: %d, %d", k, histBounds[k-1], histBounds[k])
		}
		for _, ms := range []int64{histBounds[k-1] + 1, histBounds[k]} {
			if got := histBucket(ms); got != k {
				t.Errorf("histBucket(%d) = %d; want %d", ms, got, k)
			}
		}
	}
	if histBucket(0) != 0 || histBucket(-5) != 0 || histBucket(1<<40) != len(histBounds)-1 {
		t.Error("edges")
	}

	r := rand.New(rand.NewPCG(3, 4))
	for _, dist := range []struct {
		name string
		gen  func() int64
	}{
		{"uniform 0.2-30s", func() int64 { return int64(200 + r.IntN(30000)) }},
		{"log-normal", func() int64 { return int64(math.Exp(7 + r.NormFloat64())) }},
		{"fast", func() int64 { return int64(1 + r.IntN(40)) }},
	} {
		var h, half1, half2 durationHist
		exact := make([]int64, 20000)
		for i := range exact {
			exact[i] = dist.gen()
			h.add(exact[i])
			if i%2 == 0 {
				half1.add(exact[i])
			} else {
				half2.add(exact[i])
			}
		}
		var round durationHist
		if err := round.decode(half1.encode()); err != nil {
			t.Fatal(err)
		}
		round.merge(half2)
		slices.Sort(exact)
		want := exact[int(math.Ceil(0.95*float64(len(exact))))-1]
		for _, got := range []int64{h.quantile(0.95), round.quantile(0.95)} {
			if math.Abs(float64(got-want)) > 0.1*float64(want)+1 {
				t.Errorf("%s: p95 %d; exact %d (more than 10%% off)", dist.name, got, want)
			}
		}
	}
	var bad durationHist
	if err := bad.decode([]byte{0xff}); err == nil {
		t.Error("corrupt histogram accepted")
	}
	if err := bad.decode([]byte{200, 1}); err == nil {
		t.Error("out-of-range bucket accepted")
	}
}

func TestRollupsMatchRows(t *testing.T) {
	e := newTestEnv(t)
	now := time.Now()
	fillLogs(t, e.app.store, 5000, 48*time.Hour, now)
	ctx := context.Background()
	// Totals the rollups give equal counts of the rows themselves.
	for _, f := range []logFilter{
		{}, {ChannelID: 3}, {Model: "model-5"}, {StatusClass: 5}, {StatusClass: 4}, {StatusClass: -1}, {StatusClass: 2},
		{ChannelID: 2, Model: "model-1", StatusClass: -1}, {Since: windowStart(now, 24)},
		{Status: 529}, {Status: 200, ChannelID: 2}, {Status: 499, Model: "model-7"},
	} {
		_, viaRollup, err := e.app.store.QueryLogs(ctx, f)
		if err != nil {
			t.Fatal(err)
		}
		where, args := "WHERE 1=1", []any{}
		if f.ChannelID != 0 {
			where, args = where+" AND channel_id = ?", append(args, f.ChannelID)
		}
		if f.Model != "" {
			where, args = where+" AND model = ?", append(args, f.Model)
		}
		switch f.StatusClass {
		case -1:
			where += " AND (status < 200 OR status >= 300)"
		case 2, 4, 5:
			where, args = where+" AND status >= ? AND status < ?", append(args, f.StatusClass*100, f.StatusClass*100+100)
		}
		if f.Status != 0 {
			where, args = where+" AND status = ?", append(args, f.Status)
		}
		if !f.Since.IsZero() {
			where, args = where+" AND time >= ?", append(args, f.Since.UnixMilli())
		}
		var rows int
		e.app.store.rdb.QueryRow("SELECT count(*) FROM logs "+where, args...).Scan(&rows)
		if viaRollup != rows || rows == 0 {
			t.Errorf("filter %+v: rollups count %d, rows %d", f, viaRollup, rows)
		}
	}
	// Stats over 24 hours agree with the rows of those hours.
	chs, _, err := e.app.store.Stats(ctx, windowStart(now, 24), nil)
	if err != nil {
		t.Fatal(err)
	}
	var total, ok, in int64
	for _, c := range chs {
		total += c.Requests
		ok += c.Success
		in += c.InputTokens
	}
	var wantTotal, wantOK, wantIn int64
	e.app.store.rdb.QueryRow(`SELECT count(*), sum(status >= 200 AND status < 300), sum(input_tokens) FROM logs WHERE time >= ?`,
		windowStart(now, 24).UnixMilli()).Scan(&wantTotal, &wantOK, &wantIn)
	if total != wantTotal || ok != wantOK || in != wantIn {
		t.Errorf("stats: %d/%d/%d; rows say %d/%d/%d", total, ok, in, wantTotal, wantOK, wantIn)
	}
}

// BenchmarkInsertLogs is the log writer's cost per row, in batches of the
// size a busy relay produces.
func BenchmarkInsertLogs(b *testing.B) {
	e := newTestEnv(b)
	batch := make([]logEntry, 64)
	now := time.Now()
	for i := range batch {
		batch[i] = logEntry{Time: now, Token: "local", Protocol: "anthropic", Model: fmt.Sprintf("model-%d", i%4),
			UpstreamModel: "m", ChannelID: int64(i%3 + 1), ChannelName: "c", Attempts: 1, Status: 200,
			DurationMS: int64(100 + i), FirstByteMS: 50, InputTokens: 12, OutputTokens: 34, ClientIP: "127.0.0.1"}
	}
	b.ResetTimer()
	for b.Loop() {
		if err := e.app.store.InsertLogs(context.Background(), batch); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(batch))/1000, "µs/row")
}

// TestLogFilterWhere pins which conditions each table gets: a table is
// asked only about columns it has, and the rows get every filter.
func TestLogFilterWhere(t *testing.T) {
	since := time.UnixMilli(7_200_000)
	until := time.UnixMilli(10_800_000)
	f := logFilter{ChannelID: 3, Model: "m", Status: 529, Since: since, Until: until, BeforeID: 9, Limit: 5}
	for _, tc := range []struct {
		table logTable
		where string
		args  []any
	}{
		{logRows, "WHERE 1=1 AND channel_id = ? AND model = ? AND status = ? AND time >= ? AND time < ?",
			[]any{int64(3), "m", 529, int64(7_200_000), int64(10_800_000)}},
		{logTotals, "WHERE 1=1 AND channel_id = ? AND model = ? AND status = ?", []any{int64(3), "m", 529}},
		{logHours, "WHERE 1=1 AND channel_id = ? AND model = ? AND hour >= ? AND hour < ?",
			[]any{int64(3), "m", int64(7_200_000), int64(10_800_000)}},
	} {
		where, args := f.where(tc.table)
		if where != tc.where || fmt.Sprint(args) != fmt.Sprint(tc.args) {
			t.Errorf("%s: %q %v; want %q %v", tc.table.name(), where, args, tc.where, tc.args)
		}
	}
	for class, want := range map[int]string{
		-1: "WHERE 1=1 AND (status < 200 OR status >= 300)",
		4:  "WHERE 1=1 AND status >= ? AND status < ?",
	} {
		if where, _ := (logFilter{StatusClass: class}).where(logTotals); where != want {
			t.Errorf("class %d: %q; want %q", class, where, want)
		}
		if where, _ := (logFilter{StatusClass: class}).where(logHours); where != "WHERE 1=1" {
			t.Errorf("class %d on log_hourly: %q; the class is the column summed, not a condition", class, where)
		}
	}
}
