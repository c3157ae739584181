//go:build linux

package main

import (
	"bufio"
	"bytes"
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
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestIdleStreamMemory measures the resident memory each open, idle stream
// costs: ccload (the real binary, in its own process) and a bare
// httputil.ReverseProxy (also its own process) each relay N streams from
// the fake upstream, which sends the first events and then holds every
// stream open. It is a measurement, not a pass/fail test, and runs only
// when asked:
//
//	CCLOAD_MEM_STREAMS=5000 go test -run TestIdleStreamMemory -v -timeout 10m
func TestIdleStreamMemory(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("CCLOAD_MEM_STREAMS"))
	// CCLOAD_MEM_BODY=100 sends Claude Code-sized 100 KiB requests, to show
	// what the relay keeps of a request once its stream has begun.
	bodyKiB, _ := strconv.Atoi(os.Getenv("CCLOAD_MEM_BODY"))
	reqBody := anthropicBody("claude-mem", true)
	if bodyKiB > 0 {
		reqBody = strings.Replace(largeBody(bodyKiB<<10), `"max_tokens"`, `"stream":true,"max_tokens"`, 1)
	}
	if n == 0 {
		t.Skip("set CCLOAD_MEM_STREAMS=5000 to measure memory per idle stream")
	}
	var lim syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	lim.Cur = lim.Max
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	if lim.Cur < uint64(2*n+200) {
		t.Skipf("open file limit %d is too low for %d streams", lim.Cur, n)
	}

	up := newFakeUpstream(t, "mem")
	up.noRecord.Store(true)
	hold := make(chan struct{}) // never sent on: streams stay open
	up.set(fakeBehavior{Deltas: 2, BlockDeltas: hold})

	bin := filepath.Join(t.TempDir(), "ccload")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	for _, target := range []string{"ccload", "bare-proxy"} {
		t.Run(target, func(t *testing.T) {
			port := freePort(t)
			var cmd *exec.Cmd
			if target == "ccload" {
				cmd = exec.Command(bin)
				cmd.Env = append(os.Environ(), "PORT="+strconv.Itoa(port), "HOST=127.0.0.1",
					"SQLITE_PATH="+filepath.Join(t.TempDir(), "c.db"), "CCLOAD_PASS=pw", "CCLOAD_LOG_LEVEL=warn")
				cmd.Dir = t.TempDir()
			} else {
				cmd = exec.Command(os.Args[0], "-test.run=^TestBareProxyProcess$")
				cmd.Env = append(os.Environ(), "CCLOAD_BARE_TARGET="+up.URL, "CCLOAD_BARE_PORT="+strconv.Itoa(port))
			}
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
			base := "http://127.0.0.1:" + strconv.Itoa(port)
			waitListening(t, port)
			if target == "ccload" {
				addChannelOver(t, base, up.URL)
			}

			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: n, DisableCompression: true}}
			open := func(k int) []io.Closer {
				var mu sync.Mutex
				var bodies []io.Closer
				var wg sync.WaitGroup
				sem := make(chan struct{}, 200)
				for range k {
					sem <- struct{}{}
					wg.Go(func() {
						defer func() { <-sem }()
						resp, err := client.Post(base+"/v1/messages", "application/json", strings.NewReader(reqBody))
						if err != nil {
							t.Error(err)
							return
						}
						br := bufio.NewReader(resp.Body)
						for {
							line, err := br.ReadString('\n')
							if err != nil {
								t.Errorf("stream ended early: %v", err)
								resp.Body.Close()
								return
							}
							if strings.HasPrefix(line, "event: content_block_delta") {
								break
							}
						}
						mu.Lock()
						bodies = append(bodies, resp.Body)
						mu.Unlock()
					})
				}
				wg.Wait()
				return bodies
			}
			// Warm up, so one-time costs (code pages, pools) are in the base.
			for _, b := range open(100) {
				b.Close()
			}
			rss0 := rssKiB(t, cmd.Process.Pid)
			bodies := open(n)
			if len(bodies) != n {
				t.Fatalf("%d of %d streams open", len(bodies), n)
			}
			rss1 := rssKiB(t, cmd.Process.Pid)
			per := float64(rss1-rss0) / float64(n)
			t.Logf("%s: %d idle streams: RSS %d KiB -> %d KiB, %.1f KiB per stream", target, n, rss0, rss1, per)
			fmt.Printf("idle-stream memory: %-10s %5d streams, %d-byte requests: %7.1f KiB/stream (RSS %d -> %d KiB)\n",
				target, n, len(reqBody), per, rss0, rss1)
			for _, b := range bodies {
				b.Close()
			}
			client.CloseIdleConnections()
		})
	}
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
