package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestSoak drives ccload over real loopback sockets with hundreds of
// concurrent clients (stream and not, Anthropic and OpenAI paths) against
// upstreams that fail in every way the failure table names, while one
// channel per protocol stays healthy. It asserts that no request a channel
// could serve was dropped, that every cut stream ended with an error event,
// that the log has exactly one row per request with the status the client
// saw, that a steadily failing channel's share of traffic shrinks, and that
// goroutines and heap come back down afterwards.
//
// It runs for 5 s by default (-short skips it), with a fixed seed, so a
// failure replays: the same draws of faults and requests, though not the
// same interleaving of 200 clients. CCLOAD_SOAK_SEED picks another seed.
// For a long run:
//
//	CCLOAD_SOAK=5m CCLOAD_SOAK_CLIENTS=700 CCLOAD_SOAK_STREAM_PCT=90 CCLOAD_SOAK_SLOW=1 \
//	    go test -run TestSoak -v -timeout 30m
//
// CCLOAD_SOAK_SLOW=1 paces each stream (20 deltas, 50 ms apart), so
// hundreds of streams are open at once.
func TestSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("a 5 s soak; run without -short")
	}
	duration := 5 * time.Second
	if v := os.Getenv("CCLOAD_SOAK"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("CCLOAD_SOAK=%q: %v", v, err)
		}
		duration = d
	}
	clients := envInt(t, "CCLOAD_SOAK_CLIENTS", 200)
	streamPct := envInt(t, "CCLOAD_SOAK_STREAM_PCT", 60) // share of requests that stream
	slow := os.Getenv("CCLOAD_SOAK_SLOW") != ""
	seed, err := soakSeed(os.Getenv("CCLOAD_SOAK_SEED"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("soak: %s, %d clients, slow=%v, seed %d (CCLOAD_SOAK_SEED to repeat)", duration, clients, slow, seed)

	// Timeouts short enough that stalls fail over within the run, long
	// enough that a healthy upstream on a busy 2-core machine (the fakes
	// share the CPU with 200 clients and the relay) never trips them.
	e := newTestEnv(t, func(c *config) { c.FirstByteTimeout = 2 * time.Second })
	e.app.relay.ResponseTimeout = 3 * time.Second
	// Short cooldowns keep faulty channels coming back within the run, so
	// faults keep happening; the doubling and the cap are the real ones.
	e.app.cool.policy = cooldownPolicy{Transient: 100 * time.Millisecond, Persistent: 300 * time.Millisecond,
		Cap: 2 * time.Second, MaxUpstreamWait: 2 * time.Second}

	deltas, delay := 6, time.Duration(0)
	if slow {
		deltas, delay = 20, 50*time.Millisecond
	}
	var rngMu sync.Mutex // guards rng: fake handlers run concurrently
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	// A client that will cancel mid-stream gets a stream that stops after
	// its first delta until the client goes away, so its cancel always
	// lands while the upstream is still sending: then 499 is the only right
	// log status. (A paced stream was not enough: on a loaded machine the
	// client read its first delta after the upstream had sent everything,
	// and ccload rightly logged 200 for an answer the client had whole.)
	never := make(chan struct{}) // never closed
	paced := func(r *http.Request) fakeBehavior {
		if r.Header.Get("X-Soak-Cancel") != "" {
			return fakeBehavior{Deltas: deltas, BlockDeltas: never}
		}
		return fakeBehavior{Deltas: deltas, DeltaDelay: delay}
	}
	chaos := func(_ int, r *http.Request) fakeBehavior {
		rngMu.Lock()
		x := rng.IntN(100)
		rngMu.Unlock()
		ok := paced(r)
		switch {
		case x < 6:
			return fakeBehavior{Status: 500}
		case x < 12:
			return fakeBehavior{Status: 529, ErrType: "overloaded_error"}
		case x < 18:
			return fakeBehavior{Status: 429, ErrType: "rate_limit_error"}
		case x < 22:
			return fakeBehavior{Reset: true}
		case x < 25:
			return fakeBehavior{StallHeaders: true}
		case x < 28:
			return fakeBehavior{StallFirst: true}
		case x < 32:
			return fakeBehavior{FirstEventErr: true}
		case x < 38 && r.Header.Get("X-Soak-Cancel") == "":
			// Not for a client that will cancel: on a loaded machine its
			// cancel and the cut race, and either may be what ccload
			// sees first (a 499 or a 502), while the client saw its own.
			ok.CutAfter = 2
			return ok
		}
		return ok
	}
	sets := map[string]*upstreamSet{}
	var allUps []*fakeUpstream
	for _, typ := range []string{"anthropic", "openai"} {
		s := &upstreamSet{}
		for i := range 3 {
			u := newFakeUpstream(t, fmt.Sprintf("%s-chaos-%d", typ, i))
			u.noRecord.Store(true)
			u.script(chaos)
			s.chaos = append(s.chaos, u)
			e.addChannel(Channel{Name: u.name, URL: u.URL, Type: typ,
				APIKeys: []string{"sk-" + u.name + "-key-a", "sk-" + u.name + "-key-b"}})
		}
		s.steady = newFakeUpstream(t, typ+"-steady-fail")
		s.steady.noRecord.Store(true)
		s.steady.set(fakeBehavior{Status: 503})
		s.steadyID = e.addChannel(Channel{Name: s.steady.name, URL: s.steady.URL, Type: typ}).ID
		s.healthy = newFakeUpstream(t, typ+"-healthy")
		s.healthy.noRecord.Store(true)
		s.healthy.script(func(_ int, r *http.Request) fakeBehavior { return paced(r) })
		e.addChannel(Channel{Name: s.healthy.name, URL: s.healthy.URL, Type: typ})
		sets[typ] = s
		allUps = append(allUps, append(s.chaos, s.steady, s.healthy)...)
	}

	// Hits of the steadily failing channels: during the backoff's ramp (the
	// first 2 s, while its wait grows 100 ms -> 1.6 s) and after, at the cap.
	// Known hits are those that arrive once its failure is on record; the
	// others (before the first 503 is judged) are a fair share of however
	// many requests a loaded machine starts before that, not the rule's.
	const ramp = 2 * time.Second
	var steadyEarly, steadyLate, steadyKnown, knownFrom [2]atomic.Int64
	start := time.Now()
	for i, typ := range []string{"anthropic", "openai"} {
		set := sets[typ]
		set.steady.script(func(int, *http.Request) fakeBehavior {
			if time.Since(start) < ramp {
				steadyEarly[i].Add(1)
			} else {
				steadyLate[i].Add(1)
			}
			if h := e.app.cool.get(set.steadyID); h != nil && h.ch.until.Load() != 0 {
				knownFrom[i].CompareAndSwap(0, countHits(set))
				steadyKnown[i].Add(1)
			}
			return fakeBehavior{Status: 503}
		})
	}

	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	goroutines0, heap0 := runtime.NumGoroutine(), ms.HeapAlloc

	// Peak of streams open at once, sampled from the relay's own gauge.
	var peakStreams atomic.Int64
	stopSampler := make(chan struct{})
	samplerDone := make(chan struct{})
	go func() {
		defer close(samplerDone)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stopSampler:
				return
			case <-tick.C:
				if n := e.app.metrics.streams.Load(); n > peakStreams.Load() {
					peakStreams.Store(n)
				}
			}
		}
	}()

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients, DisableCompression: true}}
	var (
		ok, cut, canceled, total atomic.Int64
		problemsMu               sync.Mutex // guards problems
		problems                 []string
	)
	problem := func(format string, a ...any) {
		problemsMu.Lock()
		defer problemsMu.Unlock()
		if len(problems) < 20 {
			problems = append(problems, fmt.Sprintf(format, a...))
		}
	}
	deadline := start.Add(duration)
	var wg sync.WaitGroup
	for c := range clients {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(seed, uint64(c)))
			for time.Now().Before(deadline) {
				total.Add(1)
				switch soakRequest(client, e.URL, r, streamPct, problem) {
				case outcomeOK:
					ok.Add(1)
				case outcomeCut:
					cut.Add(1)
				case outcomeCanceled:
					canceled.Add(1)
				case outcomeProblem:
					// soakRequest says what went wrong
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(stopSampler)
	<-samplerDone

	for _, p := range problems {
		t.Error(p)
	}
	n := total.Load()
	if got := ok.Load() + cut.Load() + canceled.Load(); got != n {
		t.Errorf("%d of %d requests neither succeeded, nor were cut mid-stream, nor were cancelled by the client", n-got, n)
	}
	var fakeCuts int64
	for _, u := range allUps {
		fakeCuts += u.cuts.Load()
	}
	if cut.Load() > fakeCuts {
		t.Errorf("clients saw %d error-ended streams but upstreams cut only %d", cut.Load(), fakeCuts)
	}
	if duration >= 5*time.Second && cut.Load() == 0 {
		t.Error("no stream was cut: the soak did not exercise mid-stream failures")
	}

	// Exactly one log row per request, with the status the client saw.
	// Counted in SQL: a long run logs hundreds of thousands of rows.
	e.settle()
	byStatus := map[int]int64{}
	var rows, silent int64
	res, err := e.app.store.rdb.Query(`SELECT status, count(*), sum(error = '') FROM logs GROUP BY status`)
	if err != nil {
		t.Fatal(err)
	}
	for res.Next() {
		var status int
		var c, noErr int64
		res.Scan(&status, &c, &noErr)
		byStatus[status] = c
		rows += c
		if status != 200 && status != 499 {
			silent += noErr
		}
	}
	res.Close()
	if silent > 0 {
		t.Errorf("%d failed requests logged without an error text", silent)
	}
	other := rows - byStatus[200] - byStatus[499]
	if rows != n || byStatus[200] != ok.Load() || byStatus[499] != canceled.Load() || other != cut.Load() {
		t.Errorf("log: %d rows (%v); want %d rows: %d ok, %d cancelled, %d cut", rows, byStatus, n, ok.Load(), canceled.Load(), cut.Load())
	}
	if d := e.app.logs.dropped.Load(); d != 0 {
		t.Errorf("%d log rows dropped", d)
	}

	// The steadily failing channels: far below a fair share (1 in 5
	// channels) once their failure is on record. The hit rates before and
	// after the ramp are logged, not compared: how many requests a 2-core
	// machine starts in the first seconds depends on what else it runs.
	for i, typ := range []string{"anthropic", "openai"} {
		early := float64(steadyEarly[i].Load()) / ramp.Seconds()
		late := float64(steadyLate[i].Load()) / max(elapsed-ramp, time.Second).Seconds()
		share := float64(steadyKnown[i].Load()) / float64(max(1, countHits(sets[typ])-knownFrom[i].Load()+1))
		t.Logf("%s steady failer: %.1f hits/s in the first %s, %.1f/s after; %.2f%% of %s attempts once its failure was on record (%.2f%% of all)",
			typ, early, ramp, late, 100*share, typ, 100*float64(sets[typ].steady.count())/float64(max(1, countHits(sets[typ]))))
		// Once its failure is on record, each end of its cooldown lets one
		// request try it (coolSlot.claimTrial), so its share no longer
		// grows with the requests in flight. Half a fair share (1 in 5
		// channels) is a bound that holds on a loaded machine too; on an
		// idle one it takes about 1%.
		if share > 0.10 {
			t.Errorf("%s: a steadily failing channel took %.1f%% of attempts", typ, 100*share)
		}
	}

	// Leaks: close idle connections on both hops, then goroutines and heap
	// must come back down. The only wait is for goroutines to observe
	// their closed connections.
	client.CloseIdleConnections()
	e.app.relay.upstream.(*http.Transport).CloseIdleConnections()
	var goroutines1 int
	settleBy := time.Now().Add(10 * time.Second)
	for {
		goroutines1 = runtime.NumGoroutine()
		if goroutines1 <= goroutines0+5 || time.Now().After(settleBy) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Twice: sync.Pool keeps its buffers through one collection.
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	heap1 := ms.HeapAlloc
	if goroutines1 > goroutines0+5 {
		buf := make([]byte, 1<<20)
		t.Errorf("goroutines: %d before, %d after; stacks:\n%s", goroutines0, goroutines1, buf[:runtime.Stack(buf, true)])
	}
	if heap1 > heap0+32<<20 {
		t.Errorf("heap: %d MiB before, %d MiB after", heap0>>20, heap1>>20)
	}

	var attempts int64
	for _, u := range allUps {
		attempts += int64(u.count())
	}
	t.Logf("soak: %d requests in %s (%.0f/s), %d ok, %d cut mid-stream (upstreams cut %d), %d cancelled by the client; %d upstream attempts (%.2f per request); peak %d streams open; goroutines %d -> %d; heap %d -> %d MiB",
		n, elapsed.Round(time.Millisecond), float64(n)/elapsed.Seconds(), ok.Load(), cut.Load(), fakeCuts, canceled.Load(),
		attempts, float64(attempts)/float64(max(n, 1)), peakStreams.Load(), goroutines0, goroutines1, heap0>>20, heap1>>20)
}

// defaultSoakSeed seeds every soak unless CCLOAD_SOAK_SEED says otherwise.
const defaultSoakSeed = 1

// soakSeed is the seed for CCLOAD_SOAK_SEED's value v: a decimal uint64,
// or defaultSoakSeed when empty.
func soakSeed(v string) (uint64, error) {
	if v == "" {
		return defaultSoakSeed, nil
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("CCLOAD_SOAK_SEED=%q: %w", v, err)
	}
	return n, nil
}

func TestSoakSeed(t *testing.T) {
	for _, tc := range []struct {
		v    string
		want uint64
		ok   bool
	}{{"", defaultSoakSeed, true}, {"42", 42, true}, {"18446744073709551615", 1<<64 - 1, true}, {"-1", 0, false}, {"soon", 0, false}} {
		got, err := soakSeed(tc.v)
		if got != tc.want || (err == nil) != tc.ok {
			t.Errorf("soakSeed(%q) = %d, %v; want %d, ok %v", tc.v, got, err, tc.want, tc.ok)
		}
	}
}

// upstreamSet is one protocol's upstreams in the soak.
type upstreamSet struct {
	healthy, steady *fakeUpstream
	steadyID        int64
	chaos           []*fakeUpstream
}

func countHits(s *upstreamSet) int64 {
	n := int64(s.healthy.count() + s.steady.count())
	for _, u := range s.chaos {
		n += int64(u.count())
	}
	return n
}

func envInt(t *testing.T, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, v, err)
	}
	return n
}

type outcome int

const (
	outcomeOK outcome = iota
	outcomeCut
	outcomeCanceled
	outcomeProblem
)

// soakRequest sends one random request and checks what came back,
// reporting anything unexpected to problem.
func soakRequest(client *http.Client, base string, r *rand.Rand, streamPct int, problem func(string, ...any)) outcome {
	kind := r.IntN(4) // 0,1 anthropic; 2 chat; 3 responses
	stream := r.IntN(100) < streamPct
	cancelEarly := stream && r.IntN(30) == 0
	var path, body string
	model := fmt.Sprintf("model-%d", r.IntN(3))
	s := ""
	if stream {
		s = `"stream":true,`
	}
	switch kind {
	case 0, 1:
		path, body = "/v1/messages", `{"model":"`+model+`",`+s+`"max_tokens":64,"messages":[{"role":"user","content":"hi"}]}`
	case 2:
		path, body = "/v1/chat/completions", `{"model":"`+model+`",`+s+`"messages":[{"role":"user","content":"hi"}]}`
	default:
		path, body = "/v1/responses", `{"model":"`+model+`",`+s+`"input":"hi"}`
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "POST", base+path, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if cancelEarly {
		req.Header.Set("X-Soak-Cancel", "1")
	}
	resp, err := client.Do(req)
	if err != nil {
		problem("%s stream=%v: %v", path, stream, err)
		return outcomeProblem
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		problem("%s stream=%v: status %d: %s", path, stream, resp.StatusCode, b)
		return outcomeProblem
	}
	if !stream {
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			problem("%s: read: %v", path, err)
			return outcomeProblem
		}
		if want := []string{`"type":"message"`, `"type":"message"`, `"object":"chat.completion"`, `"object":"response"`}[kind]; !bytes.Contains(b, []byte(want)) {
			problem("%s: body lacks %s: %.200s", path, want, b)
			return outcomeProblem
		}
		return outcomeOK
	}
	br := bufio.NewReader(resp.Body)
	var last []byte // the last complete event
	var ev bytes.Buffer
	events := 0
	for {
		line, err := br.ReadBytes('\n')
		if len(line) > 0 {
			if string(line) == "\n" {
				last = append(last[:0], ev.Bytes()...)
				ev.Reset()
				events++
				if cancelEarly && bytes.Contains(last, []byte("delta")) {
					cancel()
					io.Copy(io.Discard, br)
					return outcomeCanceled
				}
			} else {
				ev.Write(line)
			}
		}
		if err != nil {
			break
		}
	}
	if ev.Len() > 0 {
		problem("%s: stream ended inside an event: %q", path, ev.String())
		return outcomeProblem
	}
	switch {
	case bytes.HasPrefix(last, []byte("event: message_stop")) ||
		bytes.Equal(last, []byte("data: [DONE]\n")) ||
		bytes.HasPrefix(last, []byte("event: response.completed")):
		return outcomeOK
	case bytes.HasPrefix(last, []byte("event: error")) ||
		bytes.HasPrefix(last, []byte("event: response.failed")) ||
		bytes.HasPrefix(last, []byte(`data: {"error"`)):
		return outcomeCut
	}
	problem("%s: stream ended silently after %d events; last %q", path, events, last)
	return outcomeProblem
}
