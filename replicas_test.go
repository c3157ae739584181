package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Several real ccload processes sharing one real redis-server (README
// "Several replicas"). The binary is built once for the whole test.

// replicaProc is one ccload process.
type replicaProc struct {
	t     *testing.T
	bin   string
	name  string
	dir   string // its working folder and database
	redis string
	port  int
	URL   string
	cmd   *exec.Cmd
	done  chan struct{}
	out   *lockedBuffer
	http  *http.Client
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

const replicaToken = "sk-client-replicas"

// startReplica starts a ccload named name on its own database in dir (kept
// across restarts of the same replica).
func startReplica(t *testing.T, bin, name, dir, redisURL string) *replicaProc {
	t.Helper()
	p := &replicaProc{t: t, bin: bin, name: name, dir: dir, redis: redisURL,
		http: &http.Client{Timeout: 20 * time.Second}}
	p.start()
	t.Cleanup(p.stop)
	return p
}

func (p *replicaProc) start() {
	p.t.Helper()
	p.port = freePort(p.t)
	p.URL = "http://127.0.0.1:" + strconv.Itoa(p.port)
	p.out = &lockedBuffer{}
	cmd := exec.Command(p.bin, "-env", filepath.Join(p.dir, "none.env"))
	cmd.Dir = p.dir
	cmd.Env = append(os.Environ(), "PORT="+strconv.Itoa(p.port), "HOST=127.0.0.1",
		"SQLITE_PATH="+filepath.Join(p.dir, "ccload.db"), "CCLOAD_PASS="+testAdminPass,
		"REDIS_URL="+p.redis, "CCLOAD_REPLICA="+p.name, "CCLOAD_AUTH="+replicaToken,
		"CCLOAD_LOG_DAYS=0", "CCLOAD_LOG_LEVEL=info")
	cmd.Stdout, cmd.Stderr = p.out, p.out
	if err := cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	p.cmd, p.done = cmd, make(chan struct{})
	go func() { cmd.Wait(); close(p.done) }()
	// The process says nothing we could wait on but its /healthz.
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := p.http.Get(p.URL + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		select {
		case <-p.done:
			p.t.Fatalf("replica %s exited at start:\n%s", p.name, p.out)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("replica %s did not answer /healthz:\n%s", p.name, p.out)
		}
	}
}

func (p *replicaProc) stop() {
	if p.cmd == nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
	p.cmd = nil
	if p.t.Failed() {
		p.t.Logf("replica %s log:\n%s", p.name, p.out)
	}
}

func (p *replicaProc) do(method, path, body string, hdr map[string]string) (int, []byte) {
	p.t.Helper()
	req, err := http.NewRequest(method, p.URL+path, strings.NewReader(body))
	if err != nil {
		p.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := p.http.Do(req)
	if err != nil {
		p.t.Fatalf("%s %s on %s: %v", method, path, p.name, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func (p *replicaProc) login() string {
	p.t.Helper()
	st, b := p.do("POST", "/login", `{"password":"`+testAdminPass+`"}`, nil)
	if st != 200 {
		p.t.Fatalf("login on %s: %d %s", p.name, st, b)
	}
	var out struct{ Token string }
	json.Unmarshal(b, &out)
	return out.Token
}

func (p *replicaProc) admin(tok, method, path, body string) (int, []byte) {
	p.t.Helper()
	return p.do(method, path, body, map[string]string{"Authorization": "Bearer " + tok})
}

// ask sends one Anthropic request for model through the replica.
func (p *replicaProc) ask(model string) (int, []byte) {
	p.t.Helper()
	return p.do("POST", "/v1/messages", anthropicBody(model, false),
		map[string]string{"Authorization": "Bearer " + replicaToken, "Anthropic-Version": "2023-06-01"})
}

// channels lists the channels the replica's admin shows.
func (p *replicaProc) channels(tok string) []channelView {
	p.t.Helper()
	st, b := p.admin(tok, "GET", "/admin/channels", "")
	if st != 200 {
		p.t.Fatalf("list on %s: %d %s", p.name, st, b)
	}
	var out []channelView
	if err := json.Unmarshal(b, &out); err != nil {
		p.t.Fatal(err)
	}
	return out
}

func (p *replicaProc) create(tok, body string) channelView {
	p.t.Helper()
	st, b := p.admin(tok, "POST", "/admin/channels", body)
	if st != 201 {
		p.t.Fatalf("create on %s: %d %s", p.name, st, b)
	}
	var v channelView
	json.Unmarshal(b, &v)
	return v
}

// convergence collects the times replicas took to agree, for the summary
// TestReplicas logs.
var convergence struct {
	mu sync.Mutex
	d  []time.Duration
}

// until waits for cond, checking it every 10 ms, and fails after limit. It
// returns how long it took, which it also records.
func until(t *testing.T, what string, limit time.Duration, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > limit {
			t.Fatalf("%s: not within %v", what, limit)
		}
		time.Sleep(10 * time.Millisecond) // the condition is another process's state: nothing to wait on
	}
	d := time.Since(start)
	convergence.mu.Lock()
	convergence.d = append(convergence.d, d)
	convergence.mu.Unlock()
	return d
}

func channelJSON(name, url, models string) string {
	return fmt.Sprintf(`{"name":%q,"url":%q,"api_key":"sk-%s-key","models":%q}`, name, url, name, models)
}

func TestReplicas(t *testing.T) {
	if testing.Short() {
		t.Skip("starts several processes")
	}
	startRedis(t, "") // skips, loudly, without redis-server
	bin := filepath.Join(t.TempDir(), "ccload")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	pair := func(t *testing.T) (*testRedis, *replicaProc, *replicaProc) {
		r := startRedis(t, "")
		a := startReplica(t, bin, "alpha", t.TempDir(), r.redisURL())
		b := startReplica(t, bin, "beta", t.TempDir(), r.redisURL())
		return r, a, b
	}

	t.Run("config", func(t *testing.T) {
		_, a, b := pair(t)
		up := newFakeUpstream(t, "up")
		ta, tb := a.login(), b.login()

		// Created on A, served through B within a second.
		if st, _ := b.ask("claude-shared"); st == 200 {
			t.Fatal("B served a model before any channel had it")
		}
		start := time.Now()
		ch := a.create(ta, channelJSON("shared", up.URL, "claude-shared"))
		d := until(t, "B serves the channel created on A", time.Second, func() bool {
			st, _ := b.ask("claude-shared")
			return st == 200
		})
		t.Logf("create on A → served by B after %v (%v since the create began)", d, time.Since(start))
		if up.count() == 0 {
			t.Fatal("the upstream saw no request")
		}

		// Disabled on B, refused on A within a second.
		id := strconv.FormatInt(ch.ID, 10)
		if st, body := b.admin(tb, "PUT", "/admin/channels/"+id, `{"enabled":false}`); st != 200 {
			t.Fatalf("disable on B: %d %s", st, body)
		}
		until(t, "A refuses the channel disabled on B", time.Second, func() bool {
			st, _ := a.ask("claude-shared")
			return st != 200
		})
		served := up.count()
		if st, _ := a.ask("claude-shared"); st == 200 || up.count() != served {
			t.Fatalf("A still serves a disabled channel: %d", st)
		}

		// Two edits of one channel at once, different fields: both stay.
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); a.admin(ta, "PUT", "/admin/channels/"+id, `{"priority":7}`) }()
		go func() {
			defer wg.Done()
			b.admin(tb, "PUT", "/admin/channels/"+id, `{"models":"claude-shared,claude-two"}`)
		}()
		wg.Wait()
		for _, p := range []*replicaProc{a, b} {
			tok := map[*replicaProc]string{a: ta, b: tb}[p]
			until(t, p.name+" has both edits", 2*time.Second, func() bool {
				for _, c := range p.channels(tok) {
					if c.ID == ch.ID {
						return c.Priority == 7 && len(c.Models) == 2 && !c.Enabled
					}
				}
				return false
			})
		}

		// Ten channels created at once, five on each: ten distinct ids, the
		// same on both.
		var mu sync.Mutex
		ids := map[int64]string{}
		wg.Add(10)
		for i := range 10 {
			p, tok := a, ta
			if i%2 == 1 {
				p, tok = b, tb
			}
			go func() {
				defer wg.Done()
				st, body := p.admin(tok, "POST", "/admin/channels", channelJSON("c"+strconv.Itoa(i), up.URL, "m"+strconv.Itoa(i)))
				var v channelView
				json.Unmarshal(body, &v)
				mu.Lock()
				defer mu.Unlock()
				if st != 201 {
					t.Errorf("create c%d on %s: %d %s", i, p.name, st, body)
				}
				if prev, dup := ids[v.ID]; dup {
					t.Errorf("id %d given to both %s and c%d", v.ID, prev, i)
				}
				ids[v.ID] = "c" + strconv.Itoa(i)
			}()
		}
		wg.Wait()
		if len(ids) != 10 {
			t.Fatalf("%d distinct ids for 10 channels", len(ids))
		}
		until(t, "both list the same 11 channels", 2*time.Second, func() bool {
			la, lb := a.channels(ta), b.channels(tb)
			return len(la) == 11 && len(lb) == 11 && slices.EqualFunc(la, lb, func(x, y channelView) bool {
				return x.ID == y.ID && x.Name == y.Name
			})
		})
	})

	t.Run("health", func(t *testing.T) {
		_, a, b := pair(t)
		bad, good := newFakeUpstream(t, "bad"), newFakeUpstream(t, "good")
		bad.set(fakeBehavior{Status: 529, ErrType: "overloaded_error"})
		ta, tb := a.login(), b.login()
		cb := a.create(ta, `{"name":"bad","url":"`+bad.URL+`","api_key":"sk-bad","models":"claude-h","priority":10}`)
		a.create(ta, `{"name":"good","url":"`+good.URL+`","api_key":"sk-good","models":"claude-h","priority":1}`)
		until(t, "B has both channels", time.Second, func() bool { return len(b.channels(tb)) == 2 })

		if st, body := a.ask("claude-h"); st != 200 || bad.count() != 1 || good.count() != 1 {
			t.Fatalf("A: %d %s; bad %d good %d", st, body, bad.count(), good.count())
		}
		cooling := func(p *replicaProc, tok string) bool {
			_, body := p.admin(tok, "GET", "/admin/channels/"+strconv.FormatInt(cb.ID, 10), "")
			var v channelView
			json.Unmarshal(body, &v)
			return v.State.CooldownUntil != nil || slices.ContainsFunc(v.State.Keys, func(k keyState) bool { return k.CooldownUntil != nil })
		}
		d := until(t, "B sees the cooldown A recorded", time.Second, func() bool { return cooling(b, tb) })
		t.Logf("529 on A → cooling on B after %v", d)
		if st, _ := b.ask("claude-h"); st != 200 || bad.count() != 1 || good.count() != 2 {
			t.Fatalf("B: %d; bad %d good %d: B did not skip the channel A saw fail", st, bad.count(), good.count())
		}

		// Cleared on B, cleared on A.
		if st, body := b.admin(tb, "DELETE", "/admin/channels/"+strconv.FormatInt(cb.ID, 10)+"/cooldown", ""); st != 200 {
			t.Fatalf("clear on B: %d %s", st, body)
		}
		until(t, "A sees the clear made on B", time.Second, func() bool { return !cooling(a, ta) })
	})

	t.Run("sessions and identity", func(t *testing.T) {
		_, a, b := pair(t)
		tok := a.login()
		if st, body := b.admin(tok, "GET", "/admin/channels", ""); st != 200 {
			t.Fatalf("A's session on B: %d %s", st, body)
		}
		if st, _ := b.admin(tok, "POST", "/logout", ""); st != 200 {
			t.Fatalf("logout on B: %d", st)
		}
		if st, _ := a.admin(tok, "GET", "/admin/channels", ""); st != 401 {
			t.Fatalf("a session logged out on B still works on A: %d", st)
		}

		_, body := b.do("GET", "/healthz", "", nil)
		if !strings.Contains(string(body), `"replica":"beta"`) {
			t.Errorf("/healthz on B: %s", body)
		}
		_, body = a.do("GET", "/metrics", "", map[string]string{"Authorization": "Bearer " + replicaToken})
		if !strings.Contains(string(body), `replica="alpha"`) {
			t.Errorf("/metrics on A has no replica label:\n%.400s", body)
		}
		tok = b.login()
		until(t, "B lists both replicas alive", 5*time.Second, func() bool {
			_, body := b.admin(tok, "GET", "/admin/replicas", "")
			var out struct{ Replicas []replicaInfo }
			json.Unmarshal(body, &out)
			return len(out.Replicas) == 2 && out.Replicas[0].Replica == "beta" && out.Replicas[0].Self &&
				out.Replicas[1].Replica == "alpha" && out.Replicas[1].Alive
		})
	})

	t.Run("outage", func(t *testing.T) {
		r, a, b := pair(t)
		up := newFakeUpstream(t, "up")
		ta, tb := a.login(), b.login()
		ch := a.create(ta, channelJSON("kept", up.URL, "claude-o"))
		until(t, "B has the channel", time.Second, func() bool { return len(b.channels(tb)) == 1 })

		r.stop()
		// Both serve and edit on their own.
		for _, p := range []*replicaProc{a, b} {
			if st, body := p.ask("claude-o"); st != 200 {
				t.Fatalf("%s with Redis down: %d %s", p.name, st, body)
			}
		}
		if st, body := a.admin(ta, "PUT", "/admin/channels/"+strconv.FormatInt(ch.ID, 10), `{"priority":3}`); st != 200 {
			t.Fatalf("edit on A with Redis down: %d %s", st, body)
		}
		nb := b.create(tb, channelJSON("offline", up.URL, "claude-off"))
		na := a.create(ta, channelJSON("offline-a", up.URL, "claude-off-a"))
		if na.ID == nb.ID {
			t.Fatalf("offline creates on A and B both got id %d", na.ID)
		}

		r.start() // comes back empty
		start := time.Now()
		for _, p := range []*replicaProc{a, b} {
			tok := map[*replicaProc]string{a: ta, b: tb}[p]
			until(t, p.name+" converges after Redis returns", 5*time.Second, func() bool {
				l := p.channels(tok)
				return len(l) == 3 && slices.ContainsFunc(l, func(c channelView) bool { return c.Name == "kept" && c.Priority == 3 }) &&
					slices.ContainsFunc(l, func(c channelView) bool { return c.Name == "offline" }) &&
					slices.ContainsFunc(l, func(c channelView) bool { return c.Name == "offline-a" })
			})
		}
		t.Logf("Redis back → both replicas agree after %v", time.Since(start))
		if st, _ := a.ask("claude-off"); st != 200 {
			t.Errorf("A does not serve the channel B created during the outage: %d", st)
		}
	})

	t.Run("start while redis is down", func(t *testing.T) {
		r, a, b := pair(t)
		up := newFakeUpstream(t, "up")
		ta := a.login()
		a.create(ta, channelJSON("first", up.URL, "claude-1"))
		until(t, "B has the channel", time.Second, func() bool { return len(b.channels(b.login())) == 1 })
		b.stop()
		a.create(ta, channelJSON("second", up.URL, "claude-2"))
		r.stop()
		b.start() // Redis is down: B serves from its own database
		if st, body := b.ask("claude-1"); st != 200 {
			t.Fatalf("B started with Redis down: %d %s", st, body)
		}
		if st, _ := b.ask("claude-2"); st == 200 {
			t.Fatal("B served a channel it cannot know yet")
		}
		r.start()
		d := until(t, "B catches up", 5*time.Second, func() bool {
			st, _ := b.ask("claude-2")
			return st == 200
		})
		t.Logf("replica started during the outage caught up %v after Redis returned", d)
	})

	t.Run("tokens and prices", func(t *testing.T) {
		_, a, b := pair(t)
		replicaTokens(t, a, b)
	})
	t.Run("token limits", func(t *testing.T) {
		r, a, b := pair(t)
		replicaLimits(t, r, a, b)
	})
	t.Run("affinity", func(t *testing.T) {
		_, a, b := pair(t)
		replicaAffinity(t, a, b)
	})
	t.Run("soak", func(t *testing.T) { replicaSoak(t, bin) })
	t.Run("scaling", func(t *testing.T) { replicaScaling(t, bin) })

	convergence.mu.Lock()
	ds := slices.Clone(convergence.d)
	convergence.mu.Unlock()
	slices.Sort(ds)
	if len(ds) > 0 {
		t.Logf("convergence over %d waits: p50 %v, max %v", len(ds), ds[len(ds)/2], ds[len(ds)-1])
	}
}

// balancer is the test's round-robin load balancer over replicas.
func balancer(t *testing.T, ps []*replicaProc) *httptest.Server {
	var next atomic.Uint64
	targets := make([]*url.URL, len(ps))
	for i, p := range ps {
		targets[i], _ = url.Parse(p.URL)
	}
	lb := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(targets[next.Add(1)%uint64(len(targets))])
		},
		FlushInterval: -1,
		Transport:     &http.Transport{MaxIdleConnsPerHost: 512},
	}
	srv := httptest.NewServer(lb)
	t.Cleanup(srv.Close)
	return srv
}

// replicaLogRows counts the request log rows in a stopped replica's database, by
// status.
func replicaLogRows(t *testing.T, p *replicaProc) map[int]int {
	t.Helper()
	s := storeAt(t, filepath.Join(p.dir, "ccload.db"))
	rows, err := s.rdb.Query(`SELECT status, count(*) FROM logs GROUP BY status`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[int]int{}
	for rows.Next() {
		var st, n int
		if err := rows.Scan(&st, &n); err != nil {
			t.Fatal(err)
		}
		out[st] = n
	}
	return out
}

// replicaSoak: 3 replicas behind the round-robin balancer, 300 concurrent
// clients, upstreams that fail at random before the first byte (529, 500,
// resets) beside one that never does, and Redis restarted (empty) in the
// middle. Every request is answered 200, and each has exactly one log row
// across the three databases.
func replicaSoak(t *testing.T, bin string) {
	if testing.Short() {
		t.Skip("300 clients on 3 processes")
	}
	r := startRedis(t, "")
	var ps []*replicaProc
	for _, name := range []string{"r1", "r2", "r3"} {
		ps = append(ps, startReplica(t, bin, name, t.TempDir(), r.redisURL()))
	}
	tok := ps[0].login()
	rng := newLockedRand(1)
	for i := range 2 {
		up := newFakeUpstream(t, "chaos"+strconv.Itoa(i))
		up.noRecord.Store(true)
		up.script(func(int, *http.Request) fakeBehavior {
			switch rng.intn(6) {
			case 0:
				return fakeBehavior{Status: 529, ErrType: "overloaded_error"}
			case 1:
				return fakeBehavior{Status: 500, ErrType: "api_error"}
			case 2:
				return fakeBehavior{Reset: true}
			}
			return fakeBehavior{}
		})
		ps[0].create(tok, `{"name":"chaos`+strconv.Itoa(i)+`","url":"`+up.URL+`","api_key":"sk-chaos","models":"claude-soak","priority":10}`)
	}
	steady := newFakeUpstream(t, "steady")
	steady.noRecord.Store(true)
	ps[0].create(tok, `{"name":"steady","url":"`+steady.URL+`","api_key":"sk-steady","models":"claude-soak","priority":1}`)
	for _, p := range ps {
		until(t, p.name+" has the channels", 2*time.Second, func() bool { return len(p.channels(p.login())) == 3 })
	}
	lb := balancer(t, ps)

	const clients, each = 300, 5
	var (
		wg      sync.WaitGroup
		done    atomic.Int64
		failed  atomic.Int64
		restart sync.Once
		firstMu sync.Mutex
		first   []string
	)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients}, Timeout: 60 * time.Second}
	start := time.Now()
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				body := anthropicBody("claude-soak", (c+i)%2 == 0)
				req, _ := http.NewRequest("POST", lb.URL+"/v1/messages", strings.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+replicaToken)
				req.Header.Set("Anthropic-Version", "2023-06-01")
				req.Header.Set("Content-Type", "application/json")
				resp, err := client.Do(req)
				st := 0
				var b []byte
				if err == nil {
					b, _ = io.ReadAll(resp.Body)
					resp.Body.Close()
					st = resp.StatusCode
				}
				if st != 200 || bytes.Contains(b, []byte("event: error")) {
					failed.Add(1)
					firstMu.Lock()
					if len(first) < 5 {
						first = append(first, fmt.Sprintf("%d %v %.200s", st, err, b))
					}
					firstMu.Unlock()
				}
				if done.Add(1) == clients*each/2 {
					restart.Do(func() { r.stop(); r.start() }) // mid-run, comes back empty
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if n := failed.Load(); n > 0 {
		t.Errorf("%d of %d requests lost; first: %q", n, clients*each, first)
	}
	total := 0
	for _, p := range ps {
		p.stop() // flushes its log
		rows := replicaLogRows(t, p)
		n := 0
		for _, c := range rows {
			n += c
		}
		t.Logf("%s logged %d rows %v", p.name, n, rows)
		total += n
	}
	if total != clients*each {
		t.Errorf("%d log rows across the replicas for %d requests; want one each", total, clients*each)
	}
	t.Logf("soak: %d requests from %d clients in %v (%.0f req/s), Redis restarted mid-run", clients*each, clients, elapsed,
		float64(clients*each)/elapsed.Seconds())
}

// lockedRand is a seeded random source safe for the upstreams' handlers.
type lockedRand struct {
	mu sync.Mutex
	r  *rand.Rand
}

func newLockedRand(seed uint64) *lockedRand {
	return &lockedRand{r: rand.New(rand.NewPCG(seed, seed))}
}

func (l *lockedRand) intn(n int) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.r.IntN(n)
}

// replicaScaling: two replicas behind the balancer serve at least 1.8× the
// requests one does, each replica capped at 0.3 CPU by a cgroup v1 CPU
// quota (cpu.cfs_quota_us 30000 per cpu.cfs_period_us 100000) or cgroup v2
// cpu.max "30000 100000", so the replicas, not the load generator or the
// machine's other work, are what the run measures. Needs root; runs only
// with CCLOAD_SCALING=1. CCLOAD_SCALING_QUOTA sets another quota: on a
// small or busy machine the load generator (this process: clients,
// balancer, fake upstream) can saturate before two 0.3-CPU replicas do,
// and the run then measures the generator.
func replicaScaling(t *testing.T, bin string) {
	if os.Getenv("CCLOAD_SCALING") == "" {
		t.Skip("set CCLOAD_SCALING=1 (as root) to measure two replicas against one")
	}
	r := startRedis(t, "")
	up := newFakeUpstream(t, "scale")
	up.noRecord.Store(true)
	a := startReplica(t, bin, "s1", t.TempDir(), r.redisURL())
	b := startReplica(t, bin, "s2", t.TempDir(), r.redisURL())
	tok := a.login()
	a.create(tok, channelJSON("scale", up.URL, "claude-scale"))
	until(t, "s2 has the channel", 2*time.Second, func() bool { return len(b.channels(b.login())) == 1 })
	for _, p := range []*replicaProc{a, b} {
		capCPU(t, p, scalingQuota(), 100000)
	}
	run := func(ps []*replicaProc) float64 {
		lb := balancer(t, ps)
		client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
		defer client.CloseIdleConnections()
		body := anthropicBody("claude-scale", false)
		var n atomic.Int64
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var wg sync.WaitGroup
		for range 32 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ctx.Err() == nil {
					req, _ := http.NewRequestWithContext(ctx, "POST", lb.URL+"/v1/messages", strings.NewReader(body))
					req.Header.Set("Authorization", "Bearer "+replicaToken)
					req.Header.Set("Anthropic-Version", "2023-06-01")
					resp, err := client.Do(req)
					if err != nil {
						continue
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode == 200 {
						n.Add(1)
					}
				}
			}()
		}
		wg.Wait()
		return float64(n.Load()) / 5
	}
	one := run([]*replicaProc{a})
	two := run([]*replicaProc{a, b})
	t.Logf("scaling, each replica capped at %.2f CPU: one replica %.0f req/s, two %.0f req/s: %.2fx",
		float64(scalingQuota())/100000, one, two, two/one)
	if two < 1.8*one {
		t.Errorf("two replicas serve %.2fx one; want at least 1.8x", two/one)
	}
}

// capCPU puts the replica's process in a cgroup of its own with a CPU
// quota, removed when the test ends.
func capCPU(t *testing.T, p *replicaProc, quota, period int) {
	t.Helper()
	pid := strconv.Itoa(p.cmd.Process.Pid)
	name := "ccload-test-" + p.name + "-" + pid
	if v1 := "/sys/fs/cgroup/cpu"; dirExists(v1) {
		dir := filepath.Join(v1, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatalf("cgroup v1: %v (run as root)", err)
		}
		t.Cleanup(func() {
			// Back to the root group so the folder can go.
			os.WriteFile(filepath.Join(v1, "cgroup.procs"), []byte(pid), 0o644)
			os.Remove(dir)
		})
		for f, v := range map[string]string{"cpu.cfs_period_us": strconv.Itoa(period), "cpu.cfs_quota_us": strconv.Itoa(quota), "cgroup.procs": pid} {
			if err := os.WriteFile(filepath.Join(dir, f), []byte(v), 0o644); err != nil {
				t.Fatalf("cgroup v1 %s: %v", f, err)
			}
		}
		return
	}
	dir := filepath.Join("/sys/fs/cgroup", name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("cgroup v2: %v (run as root)", err)
	}
	t.Cleanup(func() {
		os.WriteFile("/sys/fs/cgroup/cgroup.procs", []byte(pid), 0o644)
		os.Remove(dir)
	})
	if err := os.WriteFile(filepath.Join(dir, "cpu.max"), []byte(fmt.Sprintf("%d %d", quota, period)), 0o644); err != nil {
		t.Fatalf("cgroup v2 cpu.max: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(pid), 0o644); err != nil {
		t.Fatalf("cgroup v2 cgroup.procs: %v", err)
	}
}

func dirExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// scalingQuota is the CPU quota per replica in µs per 100 ms period:
// CCLOAD_SCALING_QUOTA, default 30000 (0.3 CPU).
func scalingQuota() int {
	if n, err := strconv.Atoi(os.Getenv("CCLOAD_SCALING_QUOTA")); err == nil && n > 0 {
		return n
	}
	return 30000
}

// askAs sends one Anthropic request for model with a client token.
func (p *replicaProc) askAs(token, model string) (int, []byte) {
	p.t.Helper()
	return p.do("POST", "/v1/messages", anthropicBody(model, false),
		map[string]string{"Authorization": "Bearer " + token, "Anthropic-Version": "2023-06-01"})
}

// replicaLog is the newest row of the replica's request log for model,
// once there is one.
func replicaLog(t *testing.T, p *replicaProc, tok, model string, want int) clientLogRowCost {
	t.Helper()
	var row clientLogRowCost
	until(t, p.name+" logged the request", 5*time.Second, func() bool {
		_, body := p.admin(tok, "GET", "/admin/logs?limit=1000", "")
		var page struct{ Logs []clientLogRowCost }
		json.Unmarshal(body, &page)
		n := 0
		for _, r := range page.Logs {
			if r.Model == model {
				if n == 0 {
					row = r
				}
				n++
			}
		}
		return n >= want
	})
	return row
}

type clientLogRowCost struct {
	Model  string   `json:"model"`
	Token  string   `json:"token"`
	Input  int64    `json:"input_tokens"`
	Output int64    `json:"output_tokens"`
	Cost   *float64 `json:"cost_usd"`
}

// replicaTokens: managed tokens and the price table are shared config.
func replicaTokens(t *testing.T, a, b *replicaProc) {
	up := newFakeUpstream(t, "up")
	ta, tb := a.login(), b.login()
	a.create(ta, channelJSON("tok", up.URL, "zz-priced"))
	until(t, "B has the channel", time.Second, func() bool { return len(b.channels(tb)) == 1 })

	// Created on A, accepted by B within a second.
	st, body := a.admin(ta, "POST", "/admin/tokens", `{"name":"shared"}`)
	if st != 201 {
		t.Fatalf("create token on A: %d %s", st, body)
	}
	var tok struct {
		ID    int64
		Token string
	}
	json.Unmarshal(body, &tok)
	if st, _ := b.askAs("sk-ccl-not-a-token", "zz-priced"); st != 401 {
		t.Fatalf("B accepted an unknown token: %d", st)
	}
	d := until(t, "B accepts the token created on A", time.Second, func() bool {
		st, _ := b.askAs(tok.Token, "zz-priced")
		return st == 200
	})
	t.Logf("token created on A → accepted by B after %v", d)

	// Disabled on B, refused on A.
	id := strconv.FormatInt(tok.ID, 10)
	if st, body := b.admin(tb, "PUT", "/admin/tokens/"+id, `{"enabled":false}`); st != 200 {
		t.Fatalf("disable on B: %d %s", st, body)
	}
	until(t, "A refuses the token disabled on B", time.Second, func() bool {
		st, _ := a.askAs(tok.Token, "zz-priced")
		return st != 200
	})
	served := up.count()
	if st, _ := a.askAs(tok.Token, "zz-priced"); st == 200 || up.count() != served {
		t.Fatalf("A still serves a disabled token: %d", st)
	}

	// Tokens created on both at once get distinct ids, listed on both.
	var wg sync.WaitGroup
	ids := make([]int64, 6)
	for i := range ids {
		p, at := a, ta
		if i%2 == 1 {
			p, at = b, tb
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, body := p.admin(at, "POST", "/admin/tokens", fmt.Sprintf(`{"name":"t%d"}`, i))
			if st != 201 {
				t.Errorf("create t%d on %s: %d %s", i, p.name, st, body)
			}
			var v struct{ ID int64 }
			json.Unmarshal(body, &v)
			ids[i] = v.ID
		}()
	}
	wg.Wait()
	if slices.Sort(ids); len(slices.Compact(slices.Clone(ids))) != len(ids) || ids[0] == tok.ID {
		t.Fatalf("token ids collide: %v (first token %d)", ids, tok.ID)
	}
	count := func(p *replicaProc, at string) int {
		_, body := p.admin(at, "GET", "/admin/tokens", "")
		var l []struct{ Source string }
		json.Unmarshal(body, &l)
		n := 0
		for _, v := range l {
			if v.Source == "db" {
				n++
			}
		}
		return n
	}
	until(t, "both list the 7 tokens", 2*time.Second, func() bool { return count(a, ta) == 7 && count(b, tb) == 7 })

	// Prices PUT on A price B's log rows.
	if st, body := b.ask("zz-priced"); st != 200 {
		t.Fatalf("B: %d %s", st, body)
	}
	if row := replicaLog(t, b, tb, "zz-priced", 2); row.Cost != nil {
		t.Fatalf("B priced a model no table names: %+v", row)
	}
	table := `{"as_of":"2026-12-01","prices":[{"model":"zz-priced","input":1000,"output":2000,"cache_write_5m":0,"cache_write_1h":0,"cache_read":0}]}`
	if st, body := a.admin(ta, "PUT", "/admin/prices", table); st != 200 {
		t.Fatalf("PUT prices on A: %d %s", st, body)
	}
	until(t, "B has A's price table", time.Second, func() bool {
		_, body := b.admin(tb, "GET", "/admin/prices", "")
		return strings.Contains(string(body), `"zz-priced"`)
	})
	if st, body := b.ask("zz-priced"); st != 200 {
		t.Fatalf("B: %d %s", st, body)
	}
	row := replicaLog(t, b, tb, "zz-priced", 3)
	want := float64(row.Input)*1000/1e6 + float64(row.Output)*2000/1e6
	if row.Cost == nil || row.Input == 0 || math.Abs(*row.Cost-want) > 1e-9 {
		t.Fatalf("B's row after A's price PUT: %+v, want cost %v", row, want)
	}
}

// replicaLimits: a token's rpm and spend limits hold across replicas
// exactly, and each replica enforces them alone while Redis is away.
func replicaLimits(t *testing.T, r *testRedis, a, b *replicaProc) {
	up := newFakeUpstream(t, "up")
	ta, tb := a.login(), b.login()
	a.create(ta, channelJSON("lim", up.URL, "zz-lim"))
	table := `{"as_of":"2026-12-01","prices":[{"model":"zz-lim","input":1000,"output":1000,"cache_write_5m":0,"cache_write_1h":0,"cache_read":0}]}`
	if st, body := a.admin(ta, "PUT", "/admin/prices", table); st != 200 {
		t.Fatalf("PUT prices: %d %s", st, body)
	}
	newToken := func(name, limits string) string {
		t.Helper()
		st, body := a.admin(ta, "POST", "/admin/tokens", `{"name":"`+name+`","limits":`+limits+`}`)
		if st != 201 {
			t.Fatalf("create %s: %d %s", name, st, body)
		}
		var v struct{ Token string }
		json.Unmarshal(body, &v)
		until(t, "B has token "+name, time.Second, func() bool {
			_, body := b.admin(tb, "GET", "/admin/tokens", "")
			return strings.Contains(string(body), `"name":"`+name+`"`)
		})
		return v.Token
	}
	until(t, "B has the channel and the prices", time.Second, func() bool {
		_, body := b.admin(tb, "GET", "/admin/prices", "")
		return len(b.channels(tb)) == 1 && strings.Contains(string(body), "zz-lim")
	})
	// admitted sends n requests with tok through p and counts the 200s;
	// every other answer must be the named limit's 429.
	admitted := func(p *replicaProc, tok, limit string, n int) int {
		t.Helper()
		ok := 0
		for range n {
			switch st, body := p.askAs(tok, "zz-lim"); {
			case st == 200:
				ok++
			case st != 429 || !strings.Contains(string(body), limit):
				t.Fatalf("%s: %d %s; want 200 or a 429 for %s", p.name, st, body, limit)
			}
		}
		return ok
	}

	// rpm 3 across both: exactly three of eight requests, alternating.
	rpm := newToken("rpm3", `{"rpm":3}`)
	ok := 0
	for i := range 8 {
		ok += admitted([]*replicaProc{a, b}[i%2], rpm, "rpm limit", 1)
	}
	if ok != 3 {
		t.Fatalf("rpm 3 over two replicas admitted %d of 8", ok)
	}

	// A daily spend of a millionth of a dollar: one request on A spends
	// it, and B, which never served the token, refuses the next.
	spend := newToken("spend", `{"daily_usd":0.000001}`)
	if n := admitted(a, spend, "daily_usd", 1); n != 1 {
		t.Fatal("A refused the first request under a spend limit")
	}
	until(t, "B refuses once A spent the limit", time.Second, func() bool {
		st, _ := b.askAs(spend, "zz-lim")
		return st == 429
	})
	served := up.count()
	if admitted(a, spend, "daily_usd", 1)+admitted(b, spend, "daily_usd", 1) != 0 || up.count() != served {
		t.Fatal("a spent token was served")
	}

	// Redis away: each replica enforces its limits alone, so the total
	// overshoots by at most one local limit per replica.
	local := newToken("local2", `{"rpm":2}`)
	r.stop()
	if na, nb := admitted(a, local, "rpm limit", 4), admitted(b, local, "rpm limit", 4); na != 2 || nb != 2 {
		t.Fatalf("with Redis down, rpm 2 admitted %d on A and %d on B; want 2 each", na, nb)
	}
	if admitted(a, spend, "daily_usd", 1) != 0 {
		t.Fatal("A forgot its own spend with Redis down")
	}
}

// replicaAffinity: a session bound on A goes to the same channel on B.
func replicaAffinity(t *testing.T, a, b *replicaProc) {
	u1, u2 := newFakeUpstream(t, "u1"), newFakeUpstream(t, "u2")
	ta, tb := a.login(), b.login()
	a.create(ta, channelJSON("one", u1.URL, "claude-aff"))
	a.create(ta, channelJSON("two", u2.URL, "claude-aff"))
	until(t, "B has both channels", time.Second, func() bool { return len(b.channels(tb)) == 2 })
	// turn sends one turn of session sid through p and says which upstream
	// served it.
	turn := func(p *replicaProc, sid string) *fakeUpstream {
		t.Helper()
		n1, n2 := u1.count(), u2.count()
		st, body := p.do("POST", "/v1/messages", anthropicBody("claude-aff", false), map[string]string{
			"Authorization": "Bearer " + replicaToken, "Anthropic-Version": "2023-06-01", "X-Claude-Code-Session-Id": sid})
		switch {
		case st != 200:
			t.Fatalf("%s, session %s: %d %s", p.name, sid, st, body)
		case u1.count() > n1 && u2.count() == n2:
			return u1
		case u2.count() > n2 && u1.count() == n1:
			return u2
		}
		t.Fatalf("%s, session %s: served by neither or both upstreams", p.name, sid)
		return nil
	}
	// Six sessions bound on A (round robin spreads them over both), then
	// a last one whose arrival on B says the earlier ones arrived too (one
	// publisher, in order).
	bound := map[string]*fakeUpstream{}
	for i := range 6 {
		sid := fmt.Sprintf("aff-session-%d", i)
		bound[sid] = turn(a, sid)
	}
	last := turn(a, "aff-session-last")
	until(t, "B honours the binding made on A", time.Second, func() bool { return turn(b, "aff-session-last") == last })
	for sid, up := range bound {
		if got := turn(b, sid); got != up {
			t.Errorf("session %s: bound to %s on A, served by %s on B", sid, up.name, got.name)
		}
	}
}
