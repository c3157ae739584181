//go:build unix

package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// BenchmarkOverhead measures, in one run, three ways to reach the same fake
// upstream: directly, through a bare httputil.ReverseProxy that only swaps
// the key, and through ccload with one channel and its request log on. It
// prints what each proxy adds per request and ccload's ratio to the bare
// proxy. Run it as
//
//	go test -run '^$' -bench Overhead -benchtime 3s          # both cores
//	go test -run '^$' -bench Overhead -benchtime 3s -cpu 1   # one core
//	CCLOAD_BENCH_REDIS=1 go test -run '^$' -bench Overhead    # replicas' shared state on
//
// The figures are per request: p50 and p99 latency at concurrency 1,
// throughput at concurrency 50, CPU time of the whole process per request
// (client, proxy and fake together; the proxy's share is the difference from
// the direct row), time to the first content event for streams, and new
// upstream connections per request.
func BenchmarkOverhead(b *testing.B) {
	up := newFakeUpstream(b, "bench")
	up.noRecord.Store(true)
	up.set(fakeBehavior{Deltas: 10, Text: "token "})

	// CCLOAD_BENCH_REDIS=1: with several replicas' shared state on (a real
	// redis-server; README "Several replicas").
	var opts []func(*config)
	if os.Getenv("CCLOAD_BENCH_REDIS") != "" {
		r := startRedis(b, "")
		opts = append(opts, func(c *config) { c.RedisURL = r.redisURL() })
	}
	e := newTestEnv(b, opts...)
	e.addChannel(Channel{Name: "bench", URL: up.URL, APIKeys: []string{"sk-bench-upstream-key"}})
	loadBenchTokens(b, e) // 1,000 managed tokens with limits, 100 priced models

	target, _ := url.Parse(up.URL)
	bare := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Header.Del("Authorization")
			pr.Out.Header.Set("X-Api-Key", "sk-bench-upstream-key")
		},
		Transport: newUpstreamTransport(),
	}
	bareSrv := httptest.NewServer(bare)
	b.Cleanup(bareSrv.Close)

	targets := []struct{ name, url string }{
		{"direct", up.URL},
		{"bare-proxy", bareSrv.URL},
		{"ccload", e.URL},
	}
	small := anthropicBody("claude-sonnet-4-5", false)
	large := largeBody(100 << 10)
	cases := []benchCase{
		{name: "json/c1", conc: 1, body: small},
		{name: "json/c50", conc: 50, body: small},
		{name: "sse/c1", conc: 1, body: strings.Replace(small, `"max_tokens"`, `"stream":true,"max_tokens"`, 1), stream: true},
		{name: "sse/c50", conc: 50, body: strings.Replace(small, `"max_tokens"`, `"stream":true,"max_tokens"`, 1), stream: true},
		{name: "json-100KiB/c1", conc: 1, body: large},
		// Claude Code's shape, metadata (the session) last: the path a real
		// request takes through the scan and session affinity.
		{name: "cc-200KiB/c1", conc: 1, body: strings.Replace(string(claudeCodeBody(200<<10)), `"stream":true`, `"stream":false`, 1)},
	}
	results := map[string]benchResult{}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			// Rounds interleave the targets in rotating order and pool the
			// samples, so drift in the machine's speed falls on all three
			// alike instead of on whichever ran last.
			const rounds = 6
			per := max(1, b.N/rounds)
			acc := make([]benchResult, len(targets))
			clients := make([]*http.Client, len(targets))
			for i, tg := range targets {
				clients[i] = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256, DisableCompression: true}}
				defer clients[i].CloseIdleConnections()
				warmUp(clients[i], tg.url, c)
			}
			for r := range rounds {
				for k := range targets {
					i := (k + r) % len(targets)
					acc[i].add(runLoad(b, clients[i], targets[i].url, c, up, per))
				}
			}
			for i, tg := range targets {
				r := acc[i].finish()
				results[c.name+"/"+tg.name] = r
				b.ReportMetric(float64(r.p50.Microseconds()), tg.name+"-p50-µs")
			}
			direct, bare, cc := results[c.name+"/direct"], results[c.name+"/bare-proxy"], results[c.name+"/ccload"]
			b.ReportMetric(ratio(cc.p50-direct.p50, bare.p50-direct.p50), "added-ratio")
			b.ReportMetric(cc.rps()/bare.rps(), "rps-ratio")
		})
	}
	printBenchTable(os.Stdout, cases, results)
}

type benchCase struct {
	name   string
	conc   int
	body   string
	stream bool
}

type benchResult struct {
	n        int
	elapsed  time.Duration
	p50, p99 time.Duration
	ttfb50   time.Duration
	cpu      time.Duration // process CPU, user+system
	newConns int64         // upstream connections opened
	failed   int64

	lats, ttfbs []time.Duration // samples, until finish
}

func (r benchResult) rps() float64 { return float64(r.n) / r.elapsed.Seconds() }
func (r benchResult) cpuPerReq() time.Duration {
	if r.n == 0 {
		return 0
	}
	return r.cpu / time.Duration(r.n)
}

// add pools another round's samples and totals into r.
func (r *benchResult) add(o benchResult) {
	r.n += o.n
	r.elapsed += o.elapsed
	r.cpu += o.cpu
	r.newConns += o.newConns
	r.failed += o.failed
	r.lats = append(r.lats, o.lats...)
	r.ttfbs = append(r.ttfbs, o.ttfbs...)
}

// finish computes the percentiles of the pooled samples.
func (r benchResult) finish() benchResult {
	slices.Sort(r.lats)
	if n := len(r.lats); n > 0 {
		r.p50, r.p99 = r.lats[n/2], r.lats[min(n-1, n*99/100)]
	}
	slices.Sort(r.ttfbs)
	if n := len(r.ttfbs); n > 0 && r.ttfbs[n-1] > 0 {
		r.ttfb50 = r.ttfbs[n/2]
	}
	r.lats, r.ttfbs = nil, nil
	return r
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// sendOne sends one request of case c and reads the whole answer; for a
// stream it notes when the first content event arrived.
func sendOne(client *http.Client, base string, c benchCase, lat, ttfb *time.Duration) bool {
	start := time.Now()
	req, _ := http.NewRequest("POST", base+"/v1/messages", strings.NewReader(c.body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Anthropic-Version", "2023-06-01")
	req.Header.Set("X-Api-Key", "client-token")
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	if c.stream {
		br := bufio.NewReader(resp.Body)
		first := true
		for {
			line, err := br.ReadSlice('\n')
			if first && bytes.HasPrefix(line, []byte("event: content_block_delta")) {
				*ttfb = time.Since(start)
				first = false
			}
			if err != nil {
				break
			}
		}
	} else {
		io.Copy(io.Discard, resp.Body)
	}
	*lat = time.Since(start)
	return resp.StatusCode == 200
}

// warmUp opens the connections a steady state keeps, on both hops.
func warmUp(client *http.Client, base string, c benchCase) {
	var wg sync.WaitGroup
	for range c.conc {
		wg.Go(func() {
			var l, t time.Duration
			for range 3 {
				sendOne(client, base, c, &l, &t)
			}
		})
	}
	wg.Wait()
}

// runLoad sends n requests to base with c.conc workers.
func runLoad(b *testing.B, client *http.Client, base string, c benchCase, up *fakeUpstream, n int) benchResult {
	lats := make([]time.Duration, n)
	ttfbs := make([]time.Duration, n)
	var next, failed atomic.Int64
	var wg sync.WaitGroup
	conns0, cpu0 := up.conns.Load(), processCPU()
	start := time.Now()
	for range c.conc {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if !sendOne(client, base, c, &lats[i], &ttfbs[i]) {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	r := benchResult{n: n, elapsed: time.Since(start), cpu: processCPU() - cpu0,
		newConns: up.conns.Load() - conns0, failed: failed.Load(), lats: lats, ttfbs: ttfbs}
	if r.failed > 0 {
		b.Errorf("%d of %d requests to %s failed", r.failed, n, base)
	}
	return r
}

// largeBody is a Claude Code-sized request: a long system prompt and history.
func largeBody(size int) string {
	var sb strings.Builder
	sb.WriteString(`{"model":"claude-sonnet-4-5","max_tokens":1024,"system":"`)
	sb.WriteString(strings.Repeat("You are a careful assistant. ", size/29))
	sb.WriteString(`","messages":[{"role":"user","content":"hi"}]}`)
	return sb.String()
}

func printBenchTable(w io.Writer, cases []benchCase, res map[string]benchResult) {
	fmt.Fprintf(w, "\nccload overhead (GOMAXPROCS=%d, %s/%s)\n", runtime.GOMAXPROCS(0), runtime.GOOS, runtime.GOARCH)
	fmt.Fprintf(w, "%-15s %-10s %9s %9s %10s %9s %9s %9s %10s\n",
		"case", "target", "p50 µs", "p99 µs", "req/s", "cpu µs/r", "ttfb µs", "added µs", "new conn/r")
	for _, c := range cases {
		direct := res[c.name+"/direct"]
		for _, t := range []string{"direct", "bare-proxy", "ccload"} {
			r, ok := res[c.name+"/"+t]
			if !ok {
				continue
			}
			added := "-"
			if t != "direct" {
				added = fmt.Sprintf("%d", (r.p50 - direct.p50).Microseconds())
			}
			ttfb := "-"
			if c.stream {
				ttfb = fmt.Sprintf("%d", r.ttfb50.Microseconds())
			}
			fmt.Fprintf(w, "%-15s %-10s %9d %9d %10.0f %9d %9s %9s %10.3f\n", c.name, t, r.p50.Microseconds(),
				r.p99.Microseconds(), r.rps(), r.cpuPerReq().Microseconds(), ttfb, added, float64(r.newConns)/float64(max(r.n, 1)))
		}
		bare, cc := res[c.name+"/bare-proxy"], res[c.name+"/ccload"]
		if bare.n > 0 && cc.n > 0 {
			bareAdd, ccAdd := bare.p50-direct.p50, cc.p50-direct.p50
			bareCPU, ccCPU := bare.cpuPerReq()-direct.cpuPerReq(), cc.cpuPerReq()-direct.cpuPerReq()
			fmt.Fprintf(w, "%-15s ccload/bare: added latency %.2fx, throughput %.2fx, proxy cpu %.2fx",
				"", ratio(ccAdd, bareAdd), cc.rps()/bare.rps(), ratio(ccCPU, bareCPU))
			if c.stream {
				fmt.Fprintf(w, ", ttfb %+d µs", (cc.ttfb50 - bare.ttfb50).Microseconds())
			}
			fmt.Fprintln(w)
		}
	}
}

func ratio(a, b time.Duration) float64 {
	if b <= 0 {
		return 0
	}
	return float64(a) / float64(b)
}
