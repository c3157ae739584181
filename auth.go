package main

import (
	"context"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Who may use ccload: client tokens for the proxy (and, without any, the
// loopback-only open mode), the admin password, the login limiter and admin
// sessions. Every secret here is compared in constant time.

// clientIP is the address the request came from, for the log and the
// login limit. Behind a reverse proxy on this machine that is the proxy, so
// its X-Forwarded-For (last hop) is used instead; from anyone else the
// header is not trusted, since any client can send it.
func clientIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	if addr, err := netip.ParseAddr(host); err == nil && addr.Unmap().IsLoopback() {
		if xff := r.Header.Get("X-Forwarded-For"); xff != "" {
			if i := strings.LastIndexByte(xff, ','); i >= 0 {
				xff = xff[i+1:]
			}
			return strings.TrimSpace(xff)
		}
	}
	return host
}

// clientAuth checks the proxy's client tokens (CCLOAD_AUTH).
type clientAuth struct {
	tokens  []clientToken
	managed *tokenSet // tokens managed in the admin; nil in tests that need none
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

func forwarded(r *http.Request) bool {
	h := r.Header
	return h.Get("X-Forwarded-For") != "" || h.Get("Forwarded") != "" || h.Get("X-Real-Ip") != ""
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
)

// password checks the admin password: CCLOAD_PASS when set, else the stored
// hash of the generated one.
type password struct {
	env    [32]byte // SHA-256 of CCLOAD_PASS
	hasEnv bool
	stored string // "pbkdf2-sha256$iter$salt$hash"
}

// setupPassword returns the checker, generating and storing a password on
// first start when none is configured. generated is non-empty only then.
func setupPassword(ctx context.Context, s *Store, envPass string) (p *password, generated string, err error) {
	p = &password{}
	if envPass != "" {
		p.env, p.hasEnv = sha256.Sum256([]byte(envPass)), true
		return p, "", nil
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
	return p, generated, nil
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

// loginLimiter counts failed logins per client IP.
type loginLimiter struct {
	now   func() time.Time
	mu    sync.Mutex // guards fails
	fails map[string][]time.Time
}

func newLoginLimiter(now func() time.Time) *loginLimiter {
	return &loginLimiter{now: now, fails: make(map[string][]time.Time)}
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
	l.fails[ip] = append(recent, now)
	if len(l.fails) > 10000 {
		// Keep memory bounded under a spray of addresses.
		for k := range l.fails {
			if len(l.prune(k, now)) == 0 {
				delete(l.fails, k)
			}
		}
	}
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
		if err := decodeJSON(w, r, &in); err != nil {
			return err
		}
		ip := clientIP(r)
		if wait, ok := a.limiter.begin(ip); !ok {
			w.Header().Set("Retry-After", strconv.Itoa(int(wait.Seconds())+1))
			return &apiError{http.StatusTooManyRequests, fmt.Sprintf("too many failed logins: try again in %s", wait.Round(time.Second))}
		}
		if in.Password == "" || !a.pass.check(in.Password) {
			return &apiError{http.StatusUnauthorized, "wrong password"}
		}
		a.limiter.forgive(ip)
		tok := rand.Text() + rand.Text()
		expires := a.now().Add(sessionTTL)
		if err := a.store.CreateSession(r.Context(), tokenHash(tok), expires); err != nil {
			return fmt.Errorf("create session: %w", err)
		}
		http.SetCookie(w, &http.Cookie{
			Name: sessionCookie, Value: tok, Path: "/", Expires: expires, MaxAge: int(sessionTTL.Seconds()),
			HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: isHTTPS(r),
		})
		writeJSON(w, http.StatusOK, map[string]any{"token": tok, "expires_at": expires.UTC()})
		return nil
	})
}

// isHTTPS reports whether the client reached us over TLS, directly or
// through a local reverse proxy that says so.
func isHTTPS(r *http.Request) bool {
	return r.TLS != nil || (isLoopback(r) && strings.EqualFold(r.Header.Get("X-Forwarded-Proto"), "https"))
}

func (a *admin) handleLogout() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		if tok, _ := sessionToken(r); tok != "" {
			if err := a.store.DeleteSession(r.Context(), tokenHash(tok)); err != nil {
				return err
			}
		}
		http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: "", Path: "/", MaxAge: -1,
			HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: isHTTPS(r)})
		writeJSON(w, http.StatusOK, map[string]bool{"ok": true})
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
		ok, err := a.store.SessionValid(r.Context(), tokenHash(tok))
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
		next.ServeHTTP(w, r)
		return nil
	})
}
