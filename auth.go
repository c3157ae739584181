package main

import (
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Who may use ccload: client tokens for the proxy (and, without any, the
// loopback-only open mode), the admin password, the login limiter and admin
// sessions. Every secret here is compared in constant time.

// proxyTrust is the peers whose X-Forwarded-For is believed
// (CCLOAD_TRUSTED_PROXIES); nil means loopback only. Anyone can send the
// header, so only what trusted proxies appended counts: the client is the
// right-most address, over every header line, that is not itself a trusted
// proxy.
type proxyTrust []netip.Prefix

// Bounds on what is read of X-Forwarded-For: a client may send up to a
// megabyte of it.
const (
	maxForwardedHops = 16
	maxForwardedLen  = 1024
)

func (t proxyTrust) trusts(a netip.Addr) bool {
	if t == nil {
		return a.IsLoopback()
	}
	for _, p := range t {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func (t proxyTrust) clientIP(r *http.Request) string {
	a := t.clientAddr(r)
	if !a.IsValid() {
		host, _, err := net.SplitHostPort(r.RemoteAddr)
		if err != nil {
			return r.RemoteAddr
		}
		return host
	}
	return a.String()
}

// clientAddr is the client's address, or the zero Addr when the peer's is
// not one (a test's "pipe", say).
func (t proxyTrust) clientAddr(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	addr := ap.Addr().Unmap()
	if !t.trusts(addr) {
		return addr
	}
	lines := r.Header["X-Forwarded-For"]
	hops, budget := 0, maxForwardedLen
	for i := len(lines) - 1; i >= 0; i-- {
		v := lines[i]
		for v != "" {
			j := strings.LastIndexByte(v, ',')
			part := strings.TrimSpace(v[j+1:])
			budget -= len(v) - j
			v = v[:max(j, 0)]
			if hops++; hops > maxForwardedHops || budget < 0 || part == "" {
				return addr
			}
			a, err := parseHop(part)
			if err != nil {
				return addr // garbage: the last hop a trusted proxy named
			}
			if !t.trusts(a) {
				return a
			}
			addr = a
		}
	}
	return addr
}

// parseHop reads one X-Forwarded-For entry: an address, perhaps with a port.
func parseHop(s string) (netip.Addr, error) {
	if len(s) > 64 {
		return netip.Addr{}, fmt.Errorf("forwarded address too long")
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return a.Unmap(), nil
	}
	ap, err := netip.ParseAddrPort(s)
	return ap.Addr().Unmap(), err
}

// clientAuth checks the proxy's client tokens (CCLOAD_AUTH).
type clientAuth struct {
	tokens  []clientToken
	managed *tokenSet // tokens managed in the admin; nil in tests that need none
	// origins are the web origins open mode serves (CCLOAD_ORIGINS); "*"
	// is any. Without tokens every page in the local user's browser is a
	// loopback caller, so the browser's own marks decide.
	origins []string
}

type clientToken struct {
	name   string
	digest [32]byte
}

// newClientAuth parses "name:token" or bare "token" entries. A bare token is
// named by a short hash, so logs can tell clients apart without holding it.
func newClientAuth(entries []string) *clientAuth {
	a := &clientAuth{}
	for _, raw := range entries {
		raw = strings.TrimSpace(raw)
		if raw == "" {
			continue
		}
		name, tok, ok := strings.Cut(raw, ":")
		if !ok || name == "" || tok == "" {
			name, tok = "", raw
		}
		d := sha256.Sum256([]byte(tok))
		if name == "" {
			name = "tok-" + hex.EncodeToString(d[:4])
		}
		a.tokens = append(a.tokens, clientToken{name: name, digest: d})
	}
	return a
}

func (a *clientAuth) open() bool { return len(a.tokens) == 0 && !a.managed.any() }

// identify returns the client's token name, or ok=false. Without tokens the
// proxy serves loopback clients only.
func (a *clientAuth) identify(r *http.Request, p protocol) (string, bool) {
	name, _, deny := a.identifyClient(r, p, time.Now())
	return name, deny == ""
}

// identifyClient returns the client's token name and, for a token managed
// in the admin, the token; deny is why the client may not pass ("" if it
// may): a disabled or expired managed token is refused like an unknown one.
func (a *clientAuth) identifyClient(r *http.Request, p protocol, now time.Time) (name string, mt *managedToken, deny string) {
	if a.open() {
		if !isLocal(r) {
			return "", nil, a.denyMessage(r)
		}
		return "local", nil, ""
	}
	tok := presentedToken(r, p)
	if tok == "" {
		return "", nil, a.denyMessage(r)
	}
	d := sha256.Sum256([]byte(tok))
	// Compare against every token, always: the time taken says nothing
	// about which one (if any) matched.
	for i := range a.tokens {
		if subtle.ConstantTimeCompare(d[:], a.tokens[i].digest[:]) == 1 {
			name = a.tokens[i].name
		}
	}
	if name != "" {
		return name, nil, ""
	}
	if mt = a.managed.find(d); mt == nil {
		return "", nil, a.denyMessage(r)
	}
	if why := mt.usable(now.UnixNano()); why != "" {
		return "", nil, why
	}
	return mt.rec.Name, mt, ""
}

// openRefusal says why open mode refuses r as the work of a web page or a
// rebinding host name, or "" when it does not. A page anywhere can make the
// local user's browser POST to 127.0.0.1 (mode "no-cors" needs no
// permission), and a name that resolves to 127.0.0.1 gets the same reach;
// the browser marks the first with Origin and Sec-Fetch-Site, and the
// second cannot hide its Host.
func (a *clientAuth) openRefusal(r *http.Request) string {
	if !a.open() {
		return ""
	}
	if host := r.Host; host != "" && !loopbackHost(host) {
		return fmt.Sprintf("open mode serves only loopback host names, not %q: set client tokens (CCLOAD_AUTH) to serve other names", clip(host, 80))
	}
	origin := r.Header.Get("Origin")
	if origin != "" && a.originAllowed(origin) {
		return ""
	}
	cross := false
	switch r.Header.Get("Sec-Fetch-Site") {
	case "cross-site", "same-site":
		cross = true
	}
	if origin != "" {
		u, err := url.Parse(origin)
		cross = cross || err != nil || !loopbackHost(u.Host)
	}
	if cross {
		return "open mode refuses requests from web pages: list the page's origin in CCLOAD_ORIGINS, or set client tokens (CCLOAD_AUTH)"
	}
	return ""
}

func (a *clientAuth) originAllowed(origin string) bool {
	for _, o := range a.origins {
		if o == "*" || strings.EqualFold(o, origin) {
			return true
		}
	}
	return false
}

// loopbackHost reports whether a Host header (with or without a port) names
// this machine: localhost, a name under .localhost, or a loopback address.
func loopbackHost(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.Trim(host, "[]"), ".")
	if strings.EqualFold(host, "localhost") || strings.HasSuffix(strings.ToLower(host), ".localhost") {
		return true
	}
	addr, err := netip.ParseAddr(host)
	return err == nil && addr.Unmap().IsLoopback()
}

func (a *clientAuth) denyMessage(r *http.Request) string {
	if a.open() && forwarded(r) {
		return "this request came through a proxy: set client tokens (CCLOAD_AUTH) to serve anyone but this machine"
	}
	if a.open() {
		return "ccload serves only loopback clients until client tokens are set (CCLOAD_AUTH, or Tokens in the admin)"
	}
	return "missing or invalid client token: send Authorization: Bearer <token> or x-api-key"
}

func presentedToken(r *http.Request, p protocol) string {
	if v := r.Header.Get("Authorization"); len(v) > 7 && strings.EqualFold(v[:7], "bearer ") {
		return strings.TrimSpace(v[7:])
	}
	if v := r.Header.Get("X-Api-Key"); v != "" {
		return v
	}
	if p == protoGemini {
		if v := r.Header.Get("X-Goog-Api-Key"); v != "" {
			return v
		}
		return r.URL.Query().Get("key")
	}
	return ""
}

// isLocal reports whether the request comes from this machine itself, and
// not through a reverse proxy on it, which would make every client of the
// internet look local.
func isLocal(r *http.Request) bool { return isLoopback(r) && !forwarded(r) }

// proxyHeaders are the headers by which the reverse proxies and CDNs in
// common use say that a request came through them. A proxy that sends none
// of them cannot be told from a local client: README says so.
var proxyHeaders = []string{"X-Forwarded-For", "Forwarded", "X-Real-Ip", "Cf-Connecting-Ip",
	"True-Client-Ip", "X-Client-Ip", "Via"}

func forwarded(r *http.Request) bool {
	for _, k := range proxyHeaders {
		if len(r.Header[k]) > 0 {
			return true
		}
	}
	return false
}

func isLoopback(r *http.Request) bool {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return false
	}
	addr, err := netip.ParseAddr(host)
	return err == nil && addr.Unmap().IsLoopback()
}

const (
	sessionCookie   = "ccload_session"
	sessionTTL      = 24 * time.Hour
	loginWindow     = 15 * time.Minute
	loginMaxFails   = 5
	passwordSetting = "admin_password"
	pbkdf2Iter      = 200_000
	deviceCookie    = "ccload_device"
	deviceTTL       = 400 * 24 * time.Hour // browsers cap cookies at 400 days
	// maxLimited bounds the addresses and devices the limiter remembers.
	maxLimited = 10000
	// hashWait is how long a login waits for a free hashing slot before it
	// is answered 503.
	hashWait = 5 * time.Second
)

// password checks the admin password: CCLOAD_PASS when set, else the stored
// hash of the generated one.
type password struct {
	env    [32]byte // SHA-256 of CCLOAD_PASS
	hasEnv bool
	stored string // "pbkdf2-sha256$iter$salt$hash"
	// slots bounds concurrent PBKDF2 checks: each takes a core for tens
	// of milliseconds, and 200 at once slowed /healthz to a second.
	slots chan struct{}
	wait  time.Duration // for a slot; zero means hashWait
	// fp is the password's fingerprint, stored with each session so that
	// a session opened under another password is no longer valid.
	fp string
}

// fingerprint derives p.fp. A stored password is already a salted PBKDF2
// hash, and its fingerprint a hash of that. CCLOAD_PASS gets a PBKDF2 of its
// own, so that the sessions table does not hold a fast hash of it. Its salt
// is fixed, not per database: replicas that share sessions through Redis
// (cluster.go) must derive the same fingerprint from the same password, and
// a per-install salt would protect little here, since whoever reads the
// database also reads the channels' keys.
func (p *password) fingerprint(envPass string) error {
	if !p.hasEnv {
		d := sha256.Sum256([]byte("ccload session\x00" + p.stored))
		p.fp = hex.EncodeToString(d[:16])
		return nil
	}
	dk, err := pbkdf2.Key(sha256.New, envPass, []byte("ccload session fingerprint"), 10_000, 16)
	if err != nil {
		return err
	}
	p.fp = hex.EncodeToString(dk)
	return nil
}

var errHashBusy = &apiError{http.StatusServiceUnavailable, "too many logins at once: try again in a moment"}

// checkCtx is check behind the hashing slots; errHashBusy when none frees
// in time.
func (p *password) checkCtx(ctx context.Context, given string) (bool, error) {
	if p.hasEnv {
		return p.check(given), nil // one SHA-256: nothing to bound
	}
	t := time.NewTimer(cmp.Or(p.wait, hashWait))
	defer t.Stop()
	select {
	case p.slots <- struct{}{}:
	case <-t.C:
		return false, errHashBusy
	case <-ctx.Done():
		return false, ctx.Err()
	}
	defer func() { <-p.slots }()
	return p.check(given), nil
}

// setupPassword returns the checker, generating and storing a password on
// first start when none is configured. generated is non-empty only then.
func setupPassword(ctx context.Context, s *Store, envPass string) (p *password, generated string, err error) {
	p = &password{slots: make(chan struct{}, max(1, runtime.NumCPU()/2))}
	if envPass != "" {
		p.env, p.hasEnv = sha256.Sum256([]byte(envPass)), true
		return p, "", p.fingerprint(envPass)
	}
	stored, err := s.Setting(ctx, passwordSetting)
	if err != nil {
		return nil, "", fmt.Errorf("read admin password: %w", err)
	}
	if stored == "" {
		generated = rand.Text()
		if stored, err = hashPassword(generated); err != nil {
			return nil, "", err
		}
		if err := s.SetSetting(ctx, passwordSetting, stored); err != nil {
			return nil, "", fmt.Errorf("store admin password: %w", err)
		}
	}
	p.stored = stored
	return p, generated, p.fingerprint("")
}

func hashPassword(pw string) (string, error) {
	salt := make([]byte, 16)
	rand.Read(salt)
	dk, err := pbkdf2.Key(sha256.New, pw, salt, pbkdf2Iter, 32)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("pbkdf2-sha256$%d$%s$%s", pbkdf2Iter, hex.EncodeToString(salt), hex.EncodeToString(dk)), nil
}

func (p *password) check(given string) bool {
	if p.hasEnv {
		d := sha256.Sum256([]byte(given))
		return subtle.ConstantTimeCompare(d[:], p.env[:]) == 1
	}
	parts := strings.Split(p.stored, "$")
	if len(parts) != 4 || parts[0] != "pbkdf2-sha256" {
		return false
	}
	iter, err1 := strconv.Atoi(parts[1])
	salt, err2 := hex.DecodeString(parts[2])
	want, err3 := hex.DecodeString(parts[3])
	if err1 != nil || err2 != nil || err3 != nil {
		return false
	}
	got, err := pbkdf2.Key(sha256.New, given, salt, iter, len(want))
	return err == nil && subtle.ConstantTimeCompare(got, want) == 1
}

// loginLimiter counts failed logins per client address (IPv6 by /64) or,
// for a browser that logged in before, per device: a device cookie, signed
// by the limiter, gives that browser its own count, so that guesses from
// the same address (everyone behind one proxy) cannot lock the admin out.
type loginLimiter struct {
	now       func() time.Time
	deviceKey [32]byte   // signs device cookies; new each start
	mu        sync.Mutex // guards fails
	fails     map[string][]time.Time
}

func newLoginLimiter(now func() time.Time) *loginLimiter {
	l := &loginLimiter{now: now, fails: make(map[string][]time.Time)}
	rand.Read(l.deviceKey[:])
	return l
}

// newDevice returns a fresh device cookie value: an id and its signature.
func (l *loginLimiter) newDevice() string {
	id := rand.Text()
	return id + "." + l.sign(id)
}

func (l *loginLimiter) sign(id string) string {
	m := hmac.New(sha256.New, l.deviceKey[:])
	m.Write([]byte(id))
	return hex.EncodeToString(m.Sum(nil))
}

// key is what r's login attempts count against: its device when it shows a
// cookie the limiter signed, else its client address.
func (l *loginLimiter) key(r *http.Request, addr netip.Addr, ip string) string {
	if c, err := r.Cookie(deviceCookie); err == nil {
		if id, sig, ok := strings.Cut(c.Value, "."); ok && len(id) <= 64 &&
			subtle.ConstantTimeCompare([]byte(sig), []byte(l.sign(id))) == 1 {
			return "device " + id
		}
	}
	if addr.IsValid() {
		return ipKey(addr).String()
	}
	return clip(ip, 64)
}

// begin counts a login attempt from ip as failed until it succeeds, and
// reports whether ip may try at all (else for how long it must wait).
// Counting before the slow password check keeps a burst of concurrent
// guesses from slipping past the limit.
func (l *loginLimiter) begin(ip string) (time.Duration, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	recent := l.prune(ip, now)
	if len(recent) >= loginMaxFails {
		return recent[0].Add(loginWindow).Sub(now), false
	}
	if len(l.fails) >= maxLimited {
		// Keep memory bounded under a spray of addresses: first what has
		// expired, then, if all are recent, any one.
		for k := range l.fails {
			l.prune(k, now)
		}
		for k := range l.fails {
			if len(l.fails) < maxLimited {
				break
			}
			delete(l.fails, k)
		}
	}
	l.fails[ip] = append(recent, now)
	return 0, true
}

// forgive takes back the failure begin counted, after a right password.
func (l *loginLimiter) forgive(ip string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if f := l.fails[ip]; len(f) > 0 {
		l.fails[ip] = f[:len(f)-1]
	}
}

// prune drops failures older than the window. l.mu must be held.
func (l *loginLimiter) prune(ip string, now time.Time) []time.Time {
	f := l.fails[ip]
	i := 0
	for i < len(f) && now.Sub(f[i]) >= loginWindow {
		i++
	}
	f = f[i:]
	if len(f) == 0 {
		delete(l.fails, ip)
		return nil
	}
	l.fails[ip] = f
	return f
}

func tokenHash(tok string) string {
	d := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(d[:])
}

// sessionToken returns the session token a request presents, and whether it
// came from the cookie (which makes it subject to cross-site checks).
func sessionToken(r *http.Request) (tok string, fromCookie bool) {
	if v := r.Header.Get("Authorization"); len(v) > 7 && strings.EqualFold(v[:7], "bearer ") {
		return strings.TrimSpace(v[7:]), false
	}
	if c, err := r.Cookie(sessionCookie); err == nil {
		return c.Value, true
	}
	return "", false
}

func (a *admin) handleLogin() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		var in struct {
			Password string `json:"password"`
		}
		withBodyDeadline(w, r, a.bodyWait())
		if err := decodeJSON(w, r, &in); err != nil {
			return err
		}
		ip := a.limiter.key(r, a.trust.clientAddr(r), a.trust.clientIP(r))
		if wait, ok := a.limiter.begin(ip); !ok {
			w.Header().Set("Retry-After", strconv.Itoa(int(wait.Seconds())+1))
			return &apiError{http.StatusTooManyRequests, fmt.Sprintf("too many failed logins: try again in %s", wait.Round(time.Second))}
		}
		if in.Password == "" {
			return &apiError{http.StatusUnauthorized, "wrong password"}
		}
		if ok, err := a.pass.checkCtx(r.Context(), in.Password); err != nil || !ok {
			if err != nil {
				a.limiter.forgive(ip) // not a guess that was checked
				return err
			}
			return &apiError{http.StatusUnauthorized, "wrong password"}
		}
		a.limiter.forgive(ip)
		if !strings.HasPrefix(ip, "device ") {
			http.SetCookie(w, &http.Cookie{
				Name: deviceCookie, Value: a.limiter.newDevice(), Path: "/login", MaxAge: int(deviceTTL.Seconds()),
				HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: a.isHTTPS(r),
			})
		}
		tok := rand.Text() + rand.Text()
		expires := a.now().Add(sessionTTL)
		if err := a.sessionStore().CreateSessionFor(r.Context(), tokenHash(tok), a.pass.fp, expires); err != nil {
			return fmt.Errorf("create session: %w", err)
		}
		http.SetCookie(w, &http.Cookie{
			Name: sessionCookie, Value: tok, Path: "/", Expires: expires, MaxAge: int(sessionTTL.Seconds()),
			HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: a.isHTTPS(r),
		})
		writeJSON(w, http.StatusOK, map[string]any{"token": tok, "expires_at": expires.UTC()})
		return nil
	})
}

// isHTTPS reports whether the client reached us over TLS, directly or
// through a trusted reverse proxy that says so.
func (a *admin) isHTTPS(r *http.Request) bool {
	if r.TLS != nil {
		return true
	}
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	return err == nil && a.trust.trusts(ap.Addr().Unmap()) && strings.EqualFold(r.Header.Get("X-Forwarded-Proto"), "https")
}

func (a *admin) handleLogout() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		if tok, _ := sessionToken(r); tok != "" {
			if err := a.sessionStore().DeleteSession(r.Context(), tokenHash(tok)); err != nil {
				return err
			}
		}
		http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: "", Path: "/", MaxAge: -1,
			HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: a.isHTTPS(r)})
		writeJSON(w, http.StatusOK, map[string]bool{"ok": true})
		return nil
	})
}

// handleLogoutAll ends every session, this one too: after a leaked
// cookie or token, or a shared browser.
func (a *admin) handleLogoutAll() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		n, err := a.sessionStore().DeleteAllSessions(r.Context())
		if err != nil {
			return fmt.Errorf("end sessions: %w", err)
		}
		http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: "", Path: "/", MaxAge: -1,
			HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: a.isHTTPS(r)})
		writeJSON(w, http.StatusOK, map[string]any{"ok": true, "sessions_ended": n})
		return nil
	})
}

// requireSession guards the admin API: a valid session by cookie or bearer
// token, and for cookie-authenticated writes, a same-origin request.
func (a *admin) requireSession(next http.Handler) http.Handler {
	cop := http.NewCrossOriginProtection()
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		tok, fromCookie := sessionToken(r)
		if tok == "" {
			return &apiError{http.StatusUnauthorized, "login required: POST /login, then send the cookie or Authorization: Bearer <token>"}
		}
		ok, err := a.sessionStore().SessionValidFor(r.Context(), tokenHash(tok), a.pass.fp)
		if err != nil {
			return fmt.Errorf("check session: %w", err)
		}
		if !ok {
			return &apiError{http.StatusUnauthorized, "session expired or invalid: log in again"}
		}
		if fromCookie {
			if err := cop.Check(r); err != nil {
				return &apiError{http.StatusForbidden, "cross-site request refused"}
			}
		}
		withBodyDeadline(w, r, a.bodyWait())
		next.ServeHTTP(w, r)
		return nil
	})
}

// securityConfig is who ccload trusts beyond its tokens and password
// (README "Threat model").
type securityConfig struct {
	// Origins are the web origins open mode serves (CCLOAD_ORIGINS).
	Origins []string
	// TrustedProxies are the peers whose forwarded-for headers are
	// believed (CCLOAD_TRUSTED_PROXIES). Nil means loopback only.
	TrustedProxies proxyTrust
	// MaxConnsPerIP bounds the connections one client address holds open
	// (CCLOAD_MAX_CONNS_PER_IP). Zero means the default (see connlimit.go);
	// negative means no bound.
	MaxConnsPerIP int
}

func (c *securityConfig) load(getenv func(string) string) []error {
	var errs []error
	for o := range strings.SplitSeq(getenv("CCLOAD_ORIGINS"), ",") {
		if o = strings.TrimSpace(o); o == "" {
			continue
		}
		if u, err := url.Parse(o); o != "*" && (err != nil || u.Scheme == "" || u.Host == "" || u.Path != "") {
			errs = append(errs, fmt.Errorf("CCLOAD_ORIGINS: %q is not an origin like http://localhost:3000 (or *)", o))
			continue
		}
		c.Origins = append(c.Origins, strings.TrimSuffix(o, "/"))
	}
	if v := strings.TrimSpace(getenv("CCLOAD_TRUSTED_PROXIES")); v != "" {
		c.TrustedProxies = proxyTrust{} // set, even if to nothing: "none" trusts no proxy
		for p := range strings.SplitSeq(v, ",") {
			if p = strings.TrimSpace(p); p == "" || strings.EqualFold(p, "none") {
				continue
			}
			pfx, err := netip.ParsePrefix(p)
			if err != nil {
				addr, aerr := netip.ParseAddr(p)
				if aerr != nil {
					errs = append(errs, fmt.Errorf("CCLOAD_TRUSTED_PROXIES: %q is not a CIDR like 10.0.0.0/8 or an address", p))
					continue
				}
				pfx = netip.PrefixFrom(addr.Unmap(), addr.Unmap().BitLen())
			}
			c.TrustedProxies = append(c.TrustedProxies, pfx.Masked())
		}
	}
	if v := getenv("CCLOAD_MAX_CONNS_PER_IP"); v != "" {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n < 0 {
			errs = append(errs, fmt.Errorf("CCLOAD_MAX_CONNS_PER_IP=%q: want a whole number (0 turns the bound off)", v))
		}
		c.MaxConnsPerIP = n
		if n == 0 {
			c.MaxConnsPerIP = -1
		}
	}
	return errs
}

// clientIP is the address the request came from, for the log and the
// login limit, with the default trust (loopback proxies only).
func clientIP(r *http.Request) string { return proxyTrust(nil).clientIP(r) }
