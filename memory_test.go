//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestIdleStreamMemory measures the resident memory each open, slow stream
// costs in ccload (the real binary) and in a bare httputil.ReverseProxy,
// side by side in one run. Every measurement is its own fresh process, and
// only one runs at a time: each relays N streams from the fake upstream
// (in this process), and the figure is the process's RSS growth divided by
// N. Two phases are measured: "thinking", where the upstream has sent a
// ping and holds the stream before its first token (the model is thinking;
// ccload still holds the request body to fail over with), and "streaming",
// where the first token has reached the client and the stream then idles.
// Rounds alternate which proxy goes first and the median is reported, so
// drift in the machine falls on both alike. It is a measurement and runs
// only when asked:
//
//	CCLOAD_MEM_STREAMS=2000 go test -run TestIdleStreamMemory -v -timeout 30m
//
// CCLOAD_MEM_BODY lists the request sizes in bytes (default 512 and
// 50000: a small request and a Claude Code-sized one); CCLOAD_MEM_ROUNDS
// the rounds (default 3). Both proxies run with the same GOMAXPROCS.
func TestIdleStreamMemory(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("CCLOAD_MEM_STREAMS"))
	if n == 0 {
		t.Skip("set CCLOAD_MEM_STREAMS=2000 to measure memory per idle stream")
	}
	sizes := []int{512, 50000}
	if v := os.Getenv("CCLOAD_MEM_BODY"); v != "" {
		sizes = nil
		for _, f := range strings.Split(v, ",") {
			k, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || k < 200 {
				t.Fatalf("CCLOAD_MEM_BODY: %q is not a size in bytes (at least 200)", f)
			}
			sizes = append(sizes, k)
		}
	}
	rounds := 3
	if v, _ := strconv.Atoi(os.Getenv("CCLOAD_MEM_ROUNDS")); v > 0 {
		rounds = v
	}
	var lim syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	lim.Cur = lim.Max
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	if lim.Cur < uint64(2*n+400) {
		t.Skipf("open file limit %d is too low for %d streams", lim.Cur, n)
	}

	up := newFakeUpstream(t, "mem")
	up.noRecord.Store(true)
	hold := make(chan struct{}) // never sent on: streams stay open
	up.script(func(_ int, r *http.Request) fakeBehavior {
		if r.Header.Get("X-Mem-Phase") == "thinking" {
			return fakeBehavior{StallFirst: true}
		}
		return fakeBehavior{Deltas: 2, BlockDeltas: hold}
	})

	bin := filepath.Join(t.TempDir(), "ccload")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	targets := []string{"bare-proxy", "ccload"}
	phases := []string{"thinking", "streaming"}
	type key struct {
		size          int
		phase, target string
	}
	per := map[key][]float64{}
	for _, size := range sizes {
		body := memBody(size)
		for _, phase := range phases {
			for r := range rounds {
				for k := range targets {
					target := targets[(k+r)%len(targets)]
					kib := measureStreams(t, up, target, bin, phase, body, n)
					per[key{size, phase, target}] = append(per[key{size, phase, target}], kib)
					t.Logf("%d-byte requests, %s, round %d: %-10s %.1f KiB/stream", size, phase, r+1, target, kib)
				}
			}
		}
	}
	fmt.Printf("\nidle-stream memory (%d streams, GOMAXPROCS=%d, median of %d rounds; RSS growth / streams)\n",
		n, runtime.GOMAXPROCS(0), rounds)
	fmt.Printf("%-9s %-10s %10s %10s %7s %9s   %s\n", "request", "phase", "bare KiB", "ccload KiB", "ratio", "ccl-bare", "rounds (bare | ccload)")
	for _, size := range sizes {
		for _, phase := range phases {
			bs, cs := per[key{size, phase, "bare-proxy"}], per[key{size, phase, "ccload"}]
			bare, cc := median(bs), median(cs)
			fmt.Printf("%-9s %-10s %10.1f %10.1f %6.2fx %9.1f   %s | %s\n", strconv.Itoa(size)+" B", phase,
				bare, cc, cc/bare, cc-bare, fmtRounds(bs), fmtRounds(cs))
		}
	}
}

// measureStreams starts target in a fresh process, opens n streams through
// it in the given phase with body as the request, and returns its RSS
// growth per stream in KiB. The process is gone when it returns.
func measureStreams(t *testing.T, up *fakeUpstream, target, bin, phase, body string, n int) float64 {
	t.Helper()
	port := freePort(t)
	var cmd *exec.Cmd
	if target == "ccload" {
		cmd = exec.Command(bin)
		cmd.Env = append(os.Environ(), "PORT="+strconv.Itoa(port), "HOST=127.0.0.1",
			"SQLITE_PATH="+filepath.Join(t.TempDir(), "c.db"), "CCLOAD_PASS=pw", "CCLOAD_LOG_LEVEL=warn",
			"CCLOAD_FIRST_BYTE_TIMEOUT=1h")
		cmd.Dir = t.TempDir()
	} else {
		cmd = exec.Command(os.Args[0], "-test.run=^TestBareProxyProcess$")
		cmd.Env = append(os.Environ(), "CCLOAD_BARE_TARGET="+up.URL, "CCLOAD_BARE_PORT="+strconv.Itoa(port))
	}
	cmd.Env = append(cmd.Env, "GOMAXPROCS="+strconv.Itoa(runtime.GOMAXPROCS(0)))
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	base := "http://127.0.0.1:" + strconv.Itoa(port)
	waitListening(t, port)
	if target == "ccload" {
		addChannelOver(t, base, up.URL)
	}

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: n, DisableCompression: true}}
	defer client.CloseIdleConnections()
	// open starts k streams and returns once all are open: for "streaming"
	// when the client has its first token, for "thinking" when the
	// upstream has sent its ping and holds the stream. close ends them.
	open := func(k int) (close func()) {
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		ready := make(chan struct{}, k)
		sem := make(chan struct{}, 50) // streaming: at most 50 waiting for the first token
		for range k {
			if phase == "streaming" {
				sem <- struct{}{}
			}
			wg.Go(func() {
				req, _ := http.NewRequestWithContext(ctx, "POST", base+"/v1/messages", strings.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("X-Mem-Phase", phase)
				resp, err := client.Do(req)
				if err != nil {
					if ctx.Err() == nil {
						t.Errorf("%s: %v", target, err)
					}
					return
				}
				defer resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					b, _ := io.ReadAll(resp.Body)
					t.Errorf("%s: status %d: %s", target, resp.StatusCode, b)
					return
				}
				if phase == "streaming" {
					br := bufio.NewReader(resp.Body)
					for {
						line, err := br.ReadString('\n')
						if err != nil {
							t.Errorf("%s: stream ended early: %v", target, err)
							return
						}
						if strings.HasPrefix(line, "event: content_block_delta") {
							break
						}
					}
					<-sem
					ready <- struct{}{}
				}
				<-ctx.Done()
			})
		}
		src := ready
		if phase == "thinking" {
			src = up.stalled
		}
		deadline := time.After(5 * time.Minute)
		for range k {
			select {
			case <-src:
			case <-deadline:
				t.Fatalf("%s: streams did not open", target)
			}
		}
		return func() { cancel(); wg.Wait() }
	}
	// Warm up, so one-time costs (code pages, pools) are in the base.
	open(100)()
	rss0 := rssKiB(t, cmd.Process.Pid)
	done := open(n)
	rss1 := rssKiB(t, cmd.Process.Pid)
	done()
	return float64(rss1-rss0) / float64(n)
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

func fmtRounds(v []float64) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = strconv.FormatFloat(x, 'f', 1, 64)
	}
	return strings.Join(parts, " ")
}

// TestBareProxyProcess is the bare proxy's process for
// TestIdleStreamMemory; it does nothing in a normal run.
func TestBareProxyProcess(t *testing.T) {
	target := os.Getenv("CCLOAD_BARE_TARGET")
	if target == "" {
		t.Skip("helper process")
	}
	u, _ := url.Parse(target)
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(u)
			pr.Out.Header.Set("X-Api-Key", "sk-bench")
		},
		Transport: newUpstreamTransport(),
	}
	http.ListenAndServe("127.0.0.1:"+os.Getenv("CCLOAD_BARE_PORT"), rp)
}

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// waitListening waits until something accepts on port: the child process
// says nothing we could wait on instead.
func waitListening(t *testing.T, port int) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing listening on %d", port)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func addChannelOver(t *testing.T, base, upstream string) {
	resp, err := http.Post(base+"/login", "application/json", strings.NewReader(`{"password":"pw"}`))
	if err != nil {
		t.Fatal(err)
	}
	var login struct{ Token string }
	json.NewDecoder(resp.Body).Decode(&login)
	resp.Body.Close()
	req, _ := http.NewRequest("POST", base+"/admin/channels", strings.NewReader(
		`{"name":"mem","url":"`+upstream+`","api_key":"sk-mem-upstream-key"}`))
	req.Header.Set("Authorization", "Bearer "+login.Token)
	resp, err = http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 201 {
		t.Fatalf("create channel: %v %v", err, resp.Status)
	}
	resp.Body.Close()
}

func rssKiB(t *testing.T, pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range bytes.Split(b, []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte("VmRSS:")); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(string(v)), " kB"), 10, 64)
			return n
		}
	}
	t.Fatal("no VmRSS")
	return 0
}
