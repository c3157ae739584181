// Command ccload is a relay for Claude Code and Codex traffic: it spreads
// each request over many upstream channels, fails over on errors and cools
// down what keeps failing, so the client never switches by hand.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// version is stamped at build time: -ldflags "-X main.version=v1.2.3".
var version = ""

func init() {
	if version != "" {
		return
	}
	version = "dev"
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		version = bi.Main.Version
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.LookupEnv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "ccload:", err)
		os.Exit(1)
	}
}

// config is the whole configuration, from the environment (README
// "Configuration"). The relay's part keeps its zero values for what the
// environment does not set: the relay owns those defaults.
type config struct {
	Host            string
	Port            int
	SQLitePath      string
	AdminPass       string
	AuthTokens      []string
	RedisURL        string
	LogDays         int
	ShutdownTimeout time.Duration
	LogLevel        slog.Level
	Replica         string          // CCLOAD_REPLICA: this replica's id, default the host name
	Webhooks        []webhookTarget // CCLOAD_WEBHOOK_URL
	Alerts          alerterOptions  // Quiet is CCLOAD_WEBHOOK_QUIET
	TZ              *time.Location  // CCLOAD_TZ: where token spend days and months begin
	relayConfig
	securityConfig
}

func loadConfig(getenv func(string) string) (config, error) {
	c := config{
		Host:            getenv("HOST"),
		Port:            8080,
		SQLitePath:      "data/ccload.db",
		AdminPass:       getenv("CCLOAD_PASS"),
		RedisURL:        strings.TrimSpace(getenv("REDIS_URL")),
		LogDays:         7,
		ShutdownTimeout: 60 * time.Second,
		Replica:         strings.TrimSpace(getenv("CCLOAD_REPLICA")),
		Alerts:          alerterOptions{Quiet: 5 * time.Minute},
	}
	if c.Replica == "" {
		c.Replica, _ = os.Hostname()
	}
	var errs []error
	if v := getenv("PORT"); v != "" {
		p, err := strconv.Atoi(v)
		if err != nil || p < 1 || p > 65535 {
			errs = append(errs, fmt.Errorf("PORT=%q: want a port number 1-65535", v))
		}
		c.Port = p
	}
	if v := getenv("SQLITE_PATH"); v != "" {
		c.SQLitePath = v
	}
	for t := range strings.SplitSeq(getenv("CCLOAD_AUTH"), ",") {
		if t = strings.TrimSpace(t); t != "" {
			c.AuthTokens = append(c.AuthTokens, t)
		}
	}
	if v := getenv("CCLOAD_LOG_DAYS"); v != "" {
		d, err := strconv.Atoi(v)
		if err != nil || d < 0 {
			errs = append(errs, fmt.Errorf("CCLOAD_LOG_DAYS=%q: want a whole number of days (0 keeps logs forever)", v))
		}
		c.LogDays = d
	}
	if v := getenv("CCLOAD_FIRST_BYTE_TIMEOUT"); v != "" {
		d, err := parseDuration(v)
		if err != nil || d <= 0 {
			errs = append(errs, fmt.Errorf("CCLOAD_FIRST_BYTE_TIMEOUT=%q: want a duration like 60s or 2m", v))
		}
		c.FirstByteTimeout = d
	}
	if v := getenv("CCLOAD_STREAM_IDLE_TIMEOUT"); v != "" {
		d, err := parseDuration(v)
		if err != nil || d < 0 {
			errs = append(errs, fmt.Errorf("CCLOAD_STREAM_IDLE_TIMEOUT=%q: want a duration like 5m (0 turns it off)", v))
		}
		c.IdleTimeout = d
		if d == 0 {
			c.IdleTimeout = -1 // off; zero would mean the default
		}
	}
	if v := getenv("CCLOAD_SHUTDOWN_TIMEOUT"); v != "" {
		d, err := parseDuration(v)
		if err != nil || d < 0 {
			errs = append(errs, fmt.Errorf("CCLOAD_SHUTDOWN_TIMEOUT=%q: want a duration like 60s", v))
		}
		c.ShutdownTimeout = d
	}
	if v := getenv("CCLOAD_MAX_BODY"); v != "" {
		n, err := parseSize(v)
		if err != nil || n <= 0 {
			errs = append(errs, fmt.Errorf("CCLOAD_MAX_BODY=%q: want a size like 32MiB, 10MB or 1048576", v))
		}
		c.MaxBody = n
	}
	if hooks, err := parseWebhooks(getenv("CCLOAD_WEBHOOK_URL")); err != nil {
		errs = append(errs, err)
	} else {
		c.Webhooks = hooks
	}
	if v := getenv("CCLOAD_WEBHOOK_QUIET"); v != "" {
		d, err := parseDuration(v)
		if err != nil || d < 0 {
			errs = append(errs, fmt.Errorf("CCLOAD_WEBHOOK_QUIET=%q: want a duration like 5m (0 sends every event)", v))
		}
		c.Alerts.Quiet = d
	}
	if v := getenv("CCLOAD_MAX_EVENT"); v != "" {
		n, err := parseSize(v)
		if err != nil || n < 64<<10 || n > 1<<30 {
			errs = append(errs, fmt.Errorf("CCLOAD_MAX_EVENT=%q: want a size from 64KiB to 1GiB, like 16MiB", v))
		}
		c.MaxEvent = int(n)
	}
	if v := getenv("CCLOAD_MAX_RESPONSE"); v != "" {
		n, err := parseSize(v)
		if err != nil || n < 1<<20 {
			errs = append(errs, fmt.Errorf("CCLOAD_MAX_RESPONSE=%q: want a size of at least 1MiB, like 256MiB", v))
		}
		c.MaxResponse = n
	}
	if v := getenv("CCLOAD_LOG_LEVEL"); v != "" {
		if err := c.LogLevel.UnmarshalText([]byte(strings.TrimSpace(v))); err != nil {
			errs = append(errs, fmt.Errorf("CCLOAD_LOG_LEVEL=%q: want DEBUG, INFO, WARN or ERROR", v))
		}
	}
	var affErrs []error
	c.Affinity, affErrs = loadAffinityConfig(getenv)
	errs = append(errs, affErrs...)
	errs = append(errs, c.securityConfig.load(getenv)...)
	if v := getenv("CCLOAD_BODY_TIMEOUT"); v != "" {
		d, err := parseDuration(v)
		if err != nil || d <= 0 {
			errs = append(errs, fmt.Errorf("CCLOAD_BODY_TIMEOUT=%q: want a duration like 60s", v))
		}
		c.BodyTimeout = d
	}
	c.TZ = time.UTC
	if v := strings.TrimSpace(getenv("CCLOAD_TZ")); v != "" {
		loc, err := time.LoadLocation(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("CCLOAD_TZ=%q: want an IANA time zone such as Asia/Shanghai or UTC", v))
		} else {
			c.TZ = loc
		}
	}
	if c.RedisURL != "" && !strings.HasPrefix(c.RedisURL, "redis://") && !strings.HasPrefix(c.RedisURL, "rediss://") {
		errs = append(errs, errors.New("REDIS_URL must start with redis:// or rediss://"))
	}
	return c, errors.Join(errs...)
}

// parseDuration accepts Go durations and bare seconds.
func parseDuration(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if n, err := strconv.ParseFloat(s, 64); err == nil {
		return time.Duration(n * float64(time.Second)), nil
	}
	return time.ParseDuration(s)
}

// parseSize accepts bytes with an optional unit: KB/MB/GB (powers of 1000),
// KiB/MiB/GiB and K/M/G (powers of 1024).
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	i := len(s)
	for i > 0 && (s[i-1] < '0' || s[i-1] > '9') {
		i--
	}
	n, err := strconv.ParseFloat(strings.TrimSpace(s[:i]), 64)
	if err != nil {
		return 0, err
	}
	mult := map[string]float64{
		"": 1, "b": 1,
		"k": 1 << 10, "kib": 1 << 10, "kb": 1e3,
		"m": 1 << 20, "mib": 1 << 20, "mb": 1e6,
		"g": 1 << 30, "gib": 1 << 30, "gb": 1e9,
	}[strings.ToLower(strings.TrimSpace(s[i:]))]
	if mult == 0 {
		return 0, fmt.Errorf("unknown unit in %q", s)
	}
	return int64(n * mult), nil
}

// readDotEnv parses a .env file: KEY=VALUE lines, optional "export ",
// comments, and single- or double-quoted values. A missing file is no error.
func readDotEnv(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	vals := map[string]string{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		line = strings.TrimPrefix(line, "export ")
		k, v, ok := strings.Cut(line, "=")
		k = strings.TrimSpace(k)
		if !ok || k == "" {
			return nil, fmt.Errorf("%s:%d: want KEY=VALUE", path, n)
		}
		v = strings.TrimSpace(v)
		switch {
		case len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"':
			uq, err := strconv.Unquote(v)
			if err != nil {
				return nil, fmt.Errorf("%s:%d: bad quoted value: %w", path, n, err)
			}
			v = uq
		case len(v) >= 2 && v[0] == '\'' && v[len(v)-1] == '\'':
			v = v[1 : len(v)-1]
		default:
			if i := strings.Index(v, " #"); i >= 0 {
				v = strings.TrimSpace(v[:i])
			}
		}
		vals[k] = v
	}
	return vals, sc.Err()
}

// run is the whole program. It returns when ctx ends and everything has
// shut down, or on a start-up error.
func run(ctx context.Context, args []string, lookupEnv func(string) (string, bool), stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ccload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	showVersion := fs.Bool("version", false, "print the version and exit")
	envFile := fs.String("env", ".env", "`file` of KEY=VALUE settings; real environment variables win")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: ccload [flags] [healthcheck]\n\nStarts the relay; configure it with environment variables (see README).\n`ccload healthcheck` exits 0 if the local server answers /healthz.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *showVersion {
		fmt.Fprintln(stdout, "ccload", version)
		return nil
	}
	dotenv, err := readDotEnv(*envFile)
	if err != nil {
		return err
	}
	getenv := func(k string) string {
		if v, ok := lookupEnv(k); ok {
			return v
		}
		return dotenv[k]
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	switch fs.Arg(0) {
	case "":
	case "healthcheck":
		return healthcheck(ctx, cfg)
	case "token":
		return tokenCommand(ctx, cfg, fs.Args()[1:], stdout)
	default:
		return fmt.Errorf("unknown command %q (try -h)", fs.Arg(0))
	}

	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: cfg.LogLevel}))
	slog.SetDefault(logger)

	app, err := newApp(ctx, cfg, stderr)
	if err != nil {
		return err
	}
	return app.serve(ctx)
}

// app is ccload wired together.
type app struct {
	cfg     config
	store   *Store
	cool    *cooldowns
	sel     *selector
	logs    *logWriter
	metrics *metrics
	relay   *relay
	admin   *admin
	mirror  *redisMirror
	alerts  *alerter // nil without CCLOAD_WEBHOOK_URL
	tokens  *tokenSet
	prices  *prices
	handler http.Handler

	bgCancel context.CancelFunc
	bgDone   chan struct{}
}

func newApp(ctx context.Context, cfg config, stderr io.Writer) (*app, error) {
	store, err := OpenStore(ctx, cfg.SQLitePath)
	if err != nil {
		return nil, err
	}
	a := &app{cfg: cfg, store: store, metrics: newMetrics()}
	fail := func(err error) (*app, error) {
		store.Close()
		return nil, err
	}

	pass, generated, err := setupPassword(ctx, store, cfg.AdminPass)
	if err != nil {
		return fail(err)
	}
	if generated != "" {
		// Printed once, on the first start; only its hash is kept.
		fmt.Fprintf(stderr, "\n  ccload admin password (shown once, set CCLOAD_PASS to choose your own): %s\n\n", generated)
	}

	a.cool = newCooldowns(time.Now)
	a.sel = newSelector(a.cool)
	a.alerts = newAlerter(cfg.Webhooks, cfg.Alerts, time.Now)
	a.cool.alerts = a.alerts
	a.alerts.watch(a.sel)
	if cfg.RedisURL != "" {
		if a.mirror, err = newRedisMirror(cfg.RedisURL, store); err != nil {
			return fail(err)
		}
		a.mirror.alerts = a.alerts
		// Every committed channel change wakes the mirror's writer.
		store.onChange = a.mirror.notify
		a.mirror.replica = cfg.Replica
		store.allocID = func(ctx context.Context) (int64, error) {
			return a.mirror.newID(ctx, "channels", store.maxChannelID(ctx))
		}
		// A failure is logged by the mirror, once, and retried by its
		// writer; start-up goes on with the database.
		a.mirror.restoreOrSeed(ctx)
	}
	chs, err := store.ListChannels(ctx)
	if err != nil {
		return fail(err)
	}
	if _, err := a.sel.load(chs); err != nil {
		return fail(err)
	}
	recs, err := store.LoadCooldowns(ctx)
	if err != nil {
		return fail(err)
	}
	if n := a.cool.restore(recs); n > 0 {
		slog.Info("restored cooldowns", "scopes", n)
	}

	if cfg.TZ != nil {
		store.TZ = cfg.TZ
	}
	a.logs = newLogWriter(store, logQueueSize)
	auth := newClientAuth(cfg.AuthTokens)
	auth.origins = cfg.Origins
	if auth.managed, err = newTokenSet(ctx, store, store.TZ, auth.tokens); err != nil {
		return fail(err)
	}
	a.tokens = auth.managed
	if a.prices, err = loadPrices(ctx, store); err != nil {
		return fail(err)
	}
	a.relay = newRelay(cfg.relayConfig, a.sel, a.cool, a.logs, a.metrics, auth, newUpstreamTransport())
	a.relay.alerts = a.alerts
	a.relay.prices = a.prices
	a.admin = &admin{store: store, sel: a.sel, cool: a.cool, relay: a.relay, pass: pass,
		limiter: newLoginLimiter(time.Now), now: time.Now, sessions: store, replica: cfg.Replica}
	if a.mirror != nil {
		// Shared with the other replicas (cluster.go): channels through the
		// admin's own write path, cooldowns, sessions.
		a.mirror.kinds = sharedKinds(store, a.admin.changeChannels, a.tokens, a.prices)
		a.tokens.onChange, a.prices.onChange = a.mirror.notify, a.mirror.notify
		a.tokens.allocID = func(ctx context.Context) (int64, error) {
			return a.mirror.newID(ctx, "tokens", store.maxTokenID(ctx))
		}
		a.mirror.cool = a.cool
		a.relay.counters = newSharedCounters(a.mirror.client, cfg.Replica)
		if a.relay.aff != nil {
			a.relay.aff.shared = newSharedBindings(a.mirror.client, cfg.Replica, a.relay.aff.cfg.ttl())
		}
		a.cool.announce = a.mirror.announce
		a.admin.sessions = clusterSessions{local: store, client: a.mirror.client, now: time.Now}
		a.admin.replicas = a.mirror
		// A restore that happens late (Redis was down at start) reloads
		// the proxy like any other change.
		a.admin.mirror = a.mirror
		a.mirror.onRestore = func() {
			if err := a.admin.changeChannels(context.Background(), nil); err != nil {
				slog.Error("reload after restore", "err", err)
			}
		}
	}
	a.relay.trust, a.admin.trust = cfg.TrustedProxies, cfg.TrustedProxies
	a.handler = a.routes(auth)

	bg, cancel := context.WithCancel(context.WithoutCancel(ctx))
	a.bgCancel, a.bgDone = cancel, make(chan struct{})
	go func() {
		defer close(a.bgDone)
		done := make(chan struct{}, 7)
		go func() { a.cool.persistLoop(bg, store); done <- struct{}{} }()
		go func() { a.alerts.run(bg); done <- struct{}{} }()
		go func() { a.tokens.watch(bg, time.Second); done <- struct{}{} }()
		n := 3
		if cfg.LogDays > 0 {
			n++
			go func() { retentionLoop(bg, store, cfg.LogDays, nil); done <- struct{}{} }()
		}
		if a.mirror != nil {
			n++
			go func() { a.mirror.run(bg); done <- struct{}{} }()
			n += 2
			go func() { a.mirror.watch(bg); done <- struct{}{} }()
			go func() { a.mirror.publishHealth(bg); done <- struct{}{} }()
			n++
			go func() { a.relay.counters.run(bg); done <- struct{}{} }()
			if a.relay.aff != nil && a.relay.aff.shared != nil {
				n++
				go func() { a.relay.aff.shared.run(bg, &a.relay.aff.table); done <- struct{}{} }()
			}
		}
		for range n {
			<-done
		}
	}()
	if len(cfg.AuthTokens) == 0 && !a.tokens.any() {
		slog.Warn("no client tokens (CCLOAD_AUTH or managed): the proxy serves loopback clients only, and anyone a reverse proxy " +
			"on this machine lets in if it sends none of X-Forwarded-For, X-Real-IP, Forwarded, CF-Connecting-IP, " +
			"True-Client-IP, X-Client-IP or Via: set CCLOAD_AUTH or create a token before putting a proxy in front")
	}
	return a, nil
}

// routes is every route of ccload in one place.
func (a *app) routes(auth *clientAuth) http.Handler {
	mux := http.NewServeMux()
	rl, ad := a.relay, a.admin

	mux.Handle("POST /v1/messages", rl.handle(protoAnthropic))
	mux.Handle("POST /v1/messages/count_tokens", rl.handle(protoAnthropic))
	mux.Handle("POST /v1/responses", rl.handle(protoOpenAI))
	mux.Handle("POST /v1/responses/", rl.handle(protoOpenAI))
	mux.Handle("POST /v1/chat/completions", rl.handle(protoOpenAI))
	mux.Handle("POST /v1/completions", rl.handle(protoOpenAI))
	mux.Handle("POST /v1/embeddings", rl.handle(protoOpenAI))
	mux.Handle("POST /v1beta/models/{target}", rl.handle(protoGemini))
	mux.Handle("GET /v1/models", rl.handleModels())

	mux.Handle("GET /healthz", ad.handleHealthz())
	mux.Handle("GET /public/summary", ad.handleSummary())
	ms := metricsSource{m: a.metrics, sel: a.sel, logs: a.logs, alerts: a.alerts, now: time.Now}
	if a.mirror != nil {
		ms.replica = a.cfg.Replica
	}
	mux.Handle("GET /metrics", handleMetrics(ms, auth))

	mux.Handle("POST /login", ad.handleLogin())
	mux.Handle("POST /logout", ad.handleLogout())

	// The web admin; "/" sends a browser there.
	mux.Handle("GET /web/", newWebHandler(webStatic()))
	mux.Handle("GET /{$}", http.RedirectHandler("/web/", http.StatusFound))

	admin := func(pattern string, h http.Handler) { mux.Handle(pattern, ad.requireSession(h)) }
	admin("GET /admin/channels", ad.handleListChannels())
	admin("POST /admin/channels", ad.handleCreateChannel())
	admin("GET /admin/channels/{id}", ad.handleGetChannel())
	admin("PUT /admin/channels/{id}", ad.handleUpdateChannel())
	admin("DELETE /admin/channels/{id}", ad.handleDeleteChannel())
	admin("DELETE /admin/channels/{id}/cooldown", ad.handleClearCooldown())
	admin("POST /admin/channels/{id}/test", ad.handleTestChannel())
	admin("GET /admin/channels/export", ad.handleExportChannels())
	admin("POST /admin/channels/import", ad.handleImportChannels())
	admin("GET /admin/summary", ad.handleSummary())
	admin("GET /admin/redis", ad.handleRedisStatus())
	admin("GET /admin/replicas", ad.handleReplicas())
	admin("GET /admin/logs", ad.handleLogs())
	admin("GET /admin/stats", ad.handleStats())
	admin("GET /admin/trends", ad.handleTrends())
	admin("GET /admin/webhooks", a.alerts.handleStatus())
	admin("POST /admin/webhooks/test", a.alerts.handleTest())
	admin("POST /admin/logout-all", ad.handleLogoutAll())
	admin("GET /admin/tokens", a.tokens.handleList())
	admin("POST /admin/tokens", a.tokens.handleCreate())
	admin("GET /admin/tokens/{id}", a.tokens.handleGet())
	admin("PUT /admin/tokens/{id}", a.tokens.handleUpdate())
	admin("DELETE /admin/tokens/{id}", a.tokens.handleDelete())
	admin("GET /admin/prices", a.prices.handleGet())
	admin("GET /admin/spend", handleSpend(a.store, time.Now))
	admin("PUT /admin/prices", a.prices.handlePut())
	admin("/admin/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "no such admin endpoint: " + r.Method + " " + r.URL.Path})
	}))
	return mux
}

// serve listens until ctx ends, then shuts down in order: stop accepting,
// let requests and streams finish (bounded), flush the log, close the
// database.
func (a *app) serve(ctx context.Context) error {
	addr := net.JoinHostPort(a.cfg.Host, strconv.Itoa(a.cfg.Port))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		a.close(context.Background())
		return fmt.Errorf("listen on %s: %w", addr, err)
	}
	return a.serveOn(ctx, ln)
}

func (a *app) serveOn(ctx context.Context, ln net.Listener) error {
	ln = limitConns(ln, a.cfg.MaxConnsPerIP)
	srv := &http.Server{
		Handler:           a.handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(slog.Default().Handler(), slog.LevelWarn),
		// No ReadTimeout or WriteTimeout: they would cut long streams.
	}
	slog.Info("ccload listening", "addr", ln.Addr().String(), "version", version, "db", a.cfg.SQLitePath)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		a.close(context.Background())
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	slog.Info("shutting down: waiting for requests in flight", "timeout", a.cfg.ShutdownTimeout)
	sctx, cancel := context.WithTimeout(context.Background(), a.cfg.ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		slog.Warn("shutdown timeout: closing remaining connections", "err", err)
		srv.Close()
	}
	return a.close(context.Background())
}

// close waits for proxied requests to log, flushes the log and cooldowns,
// and closes the database.
func (a *app) close(ctx context.Context) error {
	waited := make(chan struct{})
	go func() { a.relay.inflight.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(10 * time.Second):
		slog.Warn("some requests did not finish; their log rows may be missing")
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var errs []error
	if err := a.logs.close(ctx); err != nil {
		errs = append(errs, err)
	}
	a.bgCancel()
	<-a.bgDone
	if a.mirror != nil {
		a.mirror.close()
	}
	if err := a.store.Close(); err != nil {
		errs = append(errs, err)
	}
	slog.Info("ccload stopped", "log_rows_written", a.logs.written.Load(), "log_rows_dropped", a.logs.dropped.Load())
	return errors.Join(errs...)
}

// healthcheck asks the local server for /healthz, for container health
// checks in images without curl.
func healthcheck(ctx context.Context, cfg config) error {
	host := cfg.Host
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	u := "http://" + net.JoinHostPort(host, strconv.Itoa(cfg.Port)) + "/healthz"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: %s answered %s", u, resp.Status)
	}
	return nil
}
