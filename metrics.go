package main

import (
	"bufio"
	"cmp"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// metrics counts what the proxy does, for GET /metrics in the Prometheus
// text format. Every counter is an atomic so the hot path never locks; the
// per-channel counters live in a sync.Map whose entries, once created, are
// only read.
type metrics struct {
	requests      sync.Map // requestKey -> *atomic.Uint64
	attempts      atomic.Uint64
	cooldowns     [5]atomic.Uint64 // by scope
	streams       atomic.Int64
	durationCount atomic.Uint64
	durationSumUS atomic.Uint64
	durationBkt   [len(durationBuckets)]atomic.Uint64
	affinityRes   [affinityResults]atomic.Uint64 // by affinityResult
}

type requestKey struct {
	channelID int64
	class     string // "2xx", "4xx", "5xx", "499"
}

// durationBuckets are upper bounds in seconds: LLM requests run from tens of
// milliseconds (count_tokens) to many minutes (long streams).
var durationBuckets = [...]float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}

func newMetrics() *metrics { return &metrics{} }

func (m *metrics) attempt()       { m.attempts.Add(1) }
func (m *metrics) cooled(s scope) { m.cooldowns[s].Add(1) }
func (m *metrics) streamOpened()  { m.streams.Add(1) }
func (m *metrics) streamClosed()  { m.streams.Add(-1) }

func (m *metrics) affinity(r affinityResult) { m.affinityRes[r].Add(1) }

func statusClass(status int) string {
	switch {
	case status == 499:
		return "499"
	case status >= 500:
		return "5xx"
	case status >= 400:
		return "4xx"
	case status >= 300:
		return "3xx"
	}
	return "2xx"
}

func (m *metrics) request(e *logEntry, d time.Duration) {
	k := requestKey{channelID: e.ChannelID, class: statusClass(e.Status)}
	c, ok := m.requests.Load(k)
	if !ok {
		c, _ = m.requests.LoadOrStore(k, new(atomic.Uint64))
	}
	c.(*atomic.Uint64).Add(1)
	m.durationCount.Add(1)
	m.durationSumUS.Add(uint64(d.Microseconds()))
	s := d.Seconds()
	for i, ub := range durationBuckets {
		if s <= ub {
			m.durationBkt[i].Add(1)
			break
		}
	}
}

// metricsSource is what the exposition needs besides the counters.
type metricsSource struct {
	m      *metrics
	sel    *selector
	logs   *logWriter
	alerts *alerter // nil without webhooks
	now    func() time.Time
	// replica, when set (several replicas share Redis), labels every
	// series, so that a sum across replicas keeps them apart.
	replica string
}

func (src metricsSource) write(w *bufio.Writer) {
	m := src.m
	snap := src.sel.current()
	names := make(map[int64]string, len(snap.all))
	for _, c := range snap.all {
		names[c.ID] = c.Name
	}

	type row struct {
		k requestKey
		n uint64
	}
	var rows []row
	m.requests.Range(func(k, v any) bool {
		rows = append(rows, row{k.(requestKey), v.(*atomic.Uint64).Load()})
		return true
	})
	slices.SortFunc(rows, func(a, b row) int {
		return cmp.Or(cmp.Compare(a.k.channelID, b.k.channelID), strings.Compare(a.k.class, b.k.class))
	})
	fmt.Fprintln(w, "# HELP ccload_requests_total Client requests, by the channel that answered last and status class.")
	fmt.Fprintln(w, "# TYPE ccload_requests_total counter")
	for _, r := range rows {
		fmt.Fprintf(w, "ccload_requests_total{channel_id=\"%d\",channel=%s,class=\"%s\"} %d\n",
			r.k.channelID, promQuote(names[r.k.channelID]), r.k.class, r.n)
	}

	fmt.Fprintln(w, "# HELP ccload_upstream_attempts_total Requests sent to upstream channels, retries included.")
	fmt.Fprintln(w, "# TYPE ccload_upstream_attempts_total counter")
	fmt.Fprintf(w, "ccload_upstream_attempts_total %d\n", m.attempts.Load())

	fmt.Fprintln(w, "# HELP ccload_cooldowns_started_total Cooldowns started, by scope.")
	fmt.Fprintln(w, "# TYPE ccload_cooldowns_started_total counter")
	for _, s := range []scope{scopeChannel, scopeKey, scopeModel} {
		fmt.Fprintf(w, "ccload_cooldowns_started_total{scope=\"%s\"} %d\n", s, m.cooldowns[s].Load())
	}

	var active [5]int
	now := src.now().UnixNano()
	for _, h := range snap.health {
		if h.ch.cooling(now) {
			active[scopeChannel]++
		}
		for i := range h.keys {
			if h.keys[i].cooling(now) {
				active[scopeKey]++
			}
		}
		if mm := h.models.Load(); mm != nil {
			for _, s := range *mm {
				if s.cooling(now) {
					active[scopeModel]++
				}
			}
		}
	}
	fmt.Fprintln(w, "# HELP ccload_active_cooldowns Scopes cooling now.")
	fmt.Fprintln(w, "# TYPE ccload_active_cooldowns gauge")
	for _, s := range []scope{scopeChannel, scopeKey, scopeModel} {
		fmt.Fprintf(w, "ccload_active_cooldowns{scope=\"%s\"} %d\n", s, active[s])
	}

	fmt.Fprintln(w, "# HELP ccload_affinity_total Requests with a session, by what session affinity did (new, hit, moved, miss).")
	fmt.Fprintln(w, "# TYPE ccload_affinity_total counter")
	for r := affinityNew; r < affinityResults; r++ {
		fmt.Fprintf(w, "ccload_affinity_total{result=\"%s\"} %d\n", r, m.affinityRes[r].Load())
	}

	fmt.Fprintln(w, "# HELP ccload_streams_in_flight Streams relaying now.")
	fmt.Fprintln(w, "# TYPE ccload_streams_in_flight gauge")
	fmt.Fprintf(w, "ccload_streams_in_flight %d\n", m.streams.Load())

	if src.logs != nil {
		fmt.Fprintln(w, "# HELP ccload_log_dropped_total Request log rows dropped because the queue was full.")
		fmt.Fprintln(w, "# TYPE ccload_log_dropped_total counter")
		fmt.Fprintf(w, "ccload_log_dropped_total %d\n", src.logs.dropped.Load())
		fmt.Fprintln(w, "# HELP ccload_log_failed_total Request log rows lost to database errors.")
		fmt.Fprintln(w, "# TYPE ccload_log_failed_total counter")
		fmt.Fprintf(w, "ccload_log_failed_total %d\n", src.logs.failed.Load())
		fmt.Fprintln(w, "# HELP ccload_log_queue_length Request log rows waiting to be written.")
		fmt.Fprintln(w, "# TYPE ccload_log_queue_length gauge")
		fmt.Fprintf(w, "ccload_log_queue_length %d\n", len(src.logs.queue))
	}

	fmt.Fprintln(w, "# HELP ccload_request_duration_seconds Client request duration, from arrival to the last byte.")
	fmt.Fprintln(w, "# TYPE ccload_request_duration_seconds histogram")
	var cum uint64
	for i, ub := range durationBuckets {
		cum += m.durationBkt[i].Load()
		fmt.Fprintf(w, "ccload_request_duration_seconds_bucket{le=\"%s\"} %d\n", strconv.FormatFloat(ub, 'g', -1, 64), cum)
	}
	count := m.durationCount.Load()
	fmt.Fprintf(w, "ccload_request_duration_seconds_bucket{le=\"+Inf\"} %d\n", count)
	fmt.Fprintf(w, "ccload_request_duration_seconds_sum %s\n",
		strconv.FormatFloat(float64(m.durationSumUS.Load())/1e6, 'f', 6, 64))
	fmt.Fprintf(w, "ccload_request_duration_seconds_count %d\n", count)
	src.alerts.writeMetrics(w)
}

// promQuote quotes a label value per the text exposition format.
func promQuote(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)
	return `"` + r.Replace(s) + `"`
}

// handleMetrics serves the exposition to loopback clients and to holders of
// a client token: counts of traffic are not for the whole internet.
func handleMetrics(src metricsSource, auth *clientAuth) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !isLocal(r) {
			if _, ok := auth.identify(r, protoOpenAI); !ok || auth.open() {
				http.Error(w, "metrics are open to loopback clients and client token holders", http.StatusUnauthorized)
				return
			}
		}
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		var out io.Writer = w
		if src.replica != "" {
			out = &replicaLabeler{w: w, label: `replica=` + promQuote(src.replica)}
		}
		bw := bufio.NewWriter(out)
		src.write(bw)
		bw.Flush()
	})
}
