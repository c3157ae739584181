package main

import (
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Slow clients. A client that opens connections and sends their bodies
// slowly, or never, must not hold ccload's file descriptors: before these
// bounds 20,500 half-sent POST /login bodies reached the fd limit and
// /healthz stopped answering. Two bounds work together: each body read has
// a deadline (withBodyDeadline; the headers already have one, the server's
// ReadHeaderTimeout), and one client address may hold only so many
// connections at once (connLimitListener), so the others, and /healthz,
// stay reachable while the deadlines run.

// defaultMaxConnsPerIP is generous: behind a reverse proxy on this machine
// every client shares the proxy's address, and a stream holds its
// connection for minutes.
const defaultMaxConnsPerIP = 1024

// adminBodyTimeout bounds the body of /login and of admin writes: they are
// small (the largest, a CSV import, is at most 10 MiB).
const adminBodyTimeout = 10 * time.Second

// withBodyDeadline gives r's body until d from now to arrive. The deadline
// is lifted as soon as the body has been read (or failed), since the
// server's own read of the connection goes on while the handler runs and
// would otherwise take the deadline for a client that left.
func withBodyDeadline(w http.ResponseWriter, r *http.Request, d time.Duration) {
	if r.Body == nil || r.Body == http.NoBody {
		return
	}
	rc := http.NewResponseController(w)
	if rc.SetReadDeadline(time.Now().Add(d)) != nil {
		return // not a real connection (a test recorder, say)
	}
	r.Body = &deadlineBody{ReadCloser: r.Body, rc: rc}
}

type deadlineBody struct {
	io.ReadCloser
	rc   *http.ResponseController
	done bool
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && !b.done {
		b.done = true
		b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}

// connLimitListener refuses a connection, by closing it at once, while its
// client address already holds max. IPv6 clients are counted by /64, the
// block one host is usually given.
type connLimitListener struct {
	net.Listener
	max     int
	refused atomic.Int64

	mu   sync.Mutex // guards open
	open map[netip.Addr]int
}

// limitConns wraps ln with the bound max (0: the default; negative: none).
func limitConns(ln net.Listener, max int) net.Listener {
	switch {
	case max < 0:
		return ln
	case max == 0:
		max = defaultMaxConnsPerIP
	}
	return &connLimitListener{Listener: ln, max: max, open: make(map[netip.Addr]int)}
}

func (l *connLimitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		key := addrKey(c.RemoteAddr())
		l.mu.Lock()
		if l.open[key] >= l.max {
			l.mu.Unlock()
			l.refused.Add(1)
			c.Close()
			continue
		}
		l.open[key]++
		l.mu.Unlock()
		return &limitedConn{Conn: c, l: l, key: key}, nil
	}
}

func (l *connLimitListener) release(key netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[key]--; l.open[key] <= 0 {
		delete(l.open, key)
	}
}

type limitedConn struct {
	net.Conn
	l    *connLimitListener
	key  netip.Addr
	once sync.Once
}

func (c *limitedConn) Close() error {
	c.once.Do(func() { c.l.release(c.key) })
	return c.Conn.Close()
}

// addrKey is the client a network address counts for: the address, or for
// IPv6 its /64.
func addrKey(a net.Addr) netip.Addr {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Addr{}
	}
	return ipKey(ap.Addr())
}

func ipKey(addr netip.Addr) netip.Addr {
	addr = addr.Unmap()
	if addr.Is6() {
		if p, err := addr.Prefix(64); err == nil {
			return p.Addr()
		}
	}
	return addr
}
