package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// The Redis mirror (README "Redis"):
// after every channel change the whole channel set, keys included, is
// written to one Redis key, so that a container that lost its disk can
// restore itself on the next start. The same writer shares the
// configuration between replicas, item by item (cluster.go): for a single
// replica that is the backup, for several it is how they agree.

const (
	mirrorKey     = "ccload:channels"
	mirrorVersion = 1
)

// mirrorDoc is the stored form. Fields may be added; version changes only
// when a reader of the old form would misread the new one.
type mirrorDoc struct {
	Version   int       `json:"version"`
	UpdatedAt time.Time `json:"updated_at"`
	Channels  []Channel `json:"channels"`
}

// redisMirror is the one background writer of the mirror. Changes only kick
// it; it reads the database itself when it runs, so a burst of edits
// coalesces into one write of the latest state. Nothing waits on Redis.
type redisMirror struct {
	client  *redis.Client
	store   *Store
	addr    string   // host:port, for messages
	secrets []string // the credentials in REDIS_URL, scrubbed from every message
	kick    chan struct{}
	// back is signalled by the watcher when Redis answers again during an
	// outage: the writer drops its backoff, so a long outage does not
	// delay the catch-up by up to retryMax.
	back chan struct{}
	now  func() time.Time
	log  *slog.Logger

	// retryMin and retryMax bound the backoff between attempts while Redis
	// is unreachable. Set before run.
	retryMin, retryMax time.Duration

	// onRestore reloads the proxy after a restore that happened late (Redis
	// was down at start and came back while the database was still empty).
	onRestore func()
	alerts    *alerter // hears Redis go down and come back; nil: nobody

	// The cluster (cluster.go). Set before run.
	replica string        // this replica's id (CCLOAD_REPLICA)
	started time.Time     // when this process started, for the replicas list
	kinds   []*configKind // the shared config kinds, reconciled in order
	cool    *cooldowns    // remote cooldown changes are applied here; nil: ignored
	// healthOut queues local cooldown changes for publishHealth; a full
	// queue drops (healthDropped counts) rather than block the hot path.
	healthOut     chan healthMsg
	healthDropped atomic.Int64
	seen          atomic.Int64 // the config version the last reconcile covered
	idMu          sync.Mutex   // serializes taking ids from the reserved block

	mu        sync.Mutex // guards the fields below
	startSync bool       // the start-up restore-or-push has happened
	down      bool       // in an outage: the error was logged once
	// wanted counts changes; written is the count the last successful write
	// covered. wanted > written means Redis is behind the database.
	wanted, written uint64
	// progress is closed and replaced after every attempt, so that waiters
	// (tests, shutdown) wake on events instead of polling.
	progress   chan struct{}
	lastErr    string
	lastErrAt  time.Time
	lastSyncAt time.Time
	lastCount  int
	restored   int
}

func newRedisMirror(rawURL string, s *Store) (*redisMirror, error) {
	opt, err := redis.ParseURL(rawURL)
	if err != nil {
		return nil, fmt.Errorf("REDIS_URL: %w", redactURLError(err, rawURL))
	}
	opt.Protocol = 2 // plain RESP2: no HELLO, works with every Redis and compatible server
	opt.DisableIdentity = true
	opt.MaxRetries = -1 // the mirror retries on its own schedule
	opt.DialTimeout = 3 * time.Second
	opt.ReadTimeout = 3 * time.Second
	opt.WriteTimeout = 3 * time.Second
	// The writer, the watcher's poll and heartbeat, the health publisher
	// and session checks; pub/sub has its own connection.
	opt.PoolSize = 6
	// One dial per attempt: the mirror's own backoff spaces the attempts,
	// and go-redis's five quick redials only made each failure slower.
	opt.DialerRetries = 1
	opt.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	// go-redis logs every failed dial to stderr itself; the mirror reports an
	// outage once, so the library's lines go to debug. (Process-wide, but
	// the mirror is ccload's only Redis client.)
	secrets := urlSecrets(rawURL)
	redis.SetLogger(redisLogger{secrets})
	m := &redisMirror{
		client: redis.NewClient(opt), store: s, addr: opt.Addr, secrets: secrets,
		kick: make(chan struct{}, 1), back: make(chan struct{}, 1), now: time.Now, log: slog.Default(),
		retryMin: time.Second, retryMax: 30 * time.Second,
		progress: make(chan struct{}),
		started:  time.Now(), healthOut: make(chan healthMsg, 1024),
	}
	m.replica, _ = os.Hostname()
	m.kinds = []*configKind{channelKind(s, nil)}
	return m, nil
}

// urlSecrets returns the password in a Redis URL in the forms it may take in
// a message: as written, percent-decoded, and Go-quoted. It works on the raw
// text because the URL that fails to parse is exactly the one url.Parse
// quotes whole in its error.
func urlSecrets(raw string) []string {
	_, rest, ok := strings.Cut(raw, "://")
	if !ok {
		rest = raw
	}
	at := strings.LastIndex(rest, "@")
	if at < 0 {
		return nil
	}
	_, pass, ok := strings.Cut(rest[:at], ":")
	if !ok || pass == "" {
		return nil
	}
	out := []string{pass}
	if dec, err := url.PathUnescape(pass); err == nil && dec != pass && dec != "" {
		out = append(out, dec)
	}
	if q := strconv.Quote(pass); q[1:len(q)-1] != pass {
		out = append(out, q[1:len(q)-1])
	}
	return out
}

func scrub(msg string, secrets []string) string {
	for _, s := range secrets {
		msg = strings.ReplaceAll(msg, s, "xxxxx")
	}
	return msg
}

// redactURLError keeps a password in REDIS_URL out of error messages.
func redactURLError(err error, raw string) error {
	secrets := urlSecrets(raw)
	if len(secrets) == 0 {
		return err
	}
	return errors.New(scrub(err.Error(), secrets))
}

// redisLogger sends go-redis's own messages to the debug log.
type redisLogger struct{ secrets []string }

func (l redisLogger) Printf(ctx context.Context, format string, v ...any) {
	slog.DebugContext(ctx, scrub(fmt.Sprintf(format, v...), l.secrets))
}

// notify records a change and wakes the writer. It never blocks.
func (m *redisMirror) notify() {
	m.mu.Lock()
	m.wanted++
	m.mu.Unlock()
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// wake releases everyone waiting for the next attempt. m.mu must be held.
func (m *redisMirror) wake() {
	close(m.progress)
	m.progress = make(chan struct{})
}

// restoreOrSeed is the start-up sync: an empty database is restored from a
// backup; a non-empty one will be pushed by the writer's first run. An empty
// database never overwrites a backup here: until this has succeeded, the
// writer writes nothing.
func (m *redisMirror) restoreOrSeed(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	chs, err := m.store.ListChannels(ctx)
	if err != nil {
		return err
	}
	if len(chs) > 0 {
		m.mu.Lock()
		m.startSync = true
		m.mu.Unlock()
		return nil
	}
	raw, err := m.client.Get(ctx, mirrorKey).Bytes()
	if errors.Is(err, redis.Nil) {
		m.mu.Lock()
		m.startSync = true
		m.mu.Unlock()
		m.log.Info("redis mirror: no backup yet", "redis", m.addr)
		return nil
	}
	if err != nil {
		err = fmt.Errorf("read backup: %w", err)
		m.failed(err)
		return err
	}
	var doc mirrorDoc
	if err := json.Unmarshal(raw, &doc); err != nil {
		err = fmt.Errorf("redis backup %s is not valid JSON, so it is left as it is: %w", mirrorKey, err)
		m.failed(err)
		return err
	}
	if doc.Version != mirrorVersion {
		err := fmt.Errorf("redis backup %s has version %d; this ccload reads version %d, so it is left as it is", mirrorKey, doc.Version, mirrorVersion)
		m.failed(err)
		return err
	}
	restore := make([]Channel, 0, len(doc.Channels))
	for _, c := range doc.Channels {
		nc, nerr := c.normalized()
		if nerr != nil {
			err := fmt.Errorf("redis backup %s: channel %d (%q): %w; nothing was restored", mirrorKey, c.ID, c.Name, nerr)
			m.failed(err)
			return err
		}
		restore = append(restore, nc)
	}
	n, err := m.store.restoreChannels(ctx, restore)
	if err != nil {
		err = fmt.Errorf("restore from redis: %w", err)
		m.failed(err)
		return err
	}
	m.mu.Lock()
	m.startSync, m.restored, m.lastCount, m.lastSyncAt = true, n, n, m.now()
	m.mu.Unlock()
	m.log.Info("redis mirror: restored channels from backup", "channels", n, "backup_time", doc.UpdatedAt.Format(time.RFC3339))
	return nil
}

// run writes the mirror after each change, retrying with backoff while
// Redis is down, until ctx ends.
func (m *redisMirror) run(ctx context.Context) {
	// The first attempt happens at once: it pushes the database, or finishes
	// the start-up sync if Redis was down when newApp tried it.
	m.notify()
	var retry time.Duration
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			m.flush()
			return
		case <-m.kick:
			if retry > 0 {
				// Backing off: the retry reads the latest state anyway, and
				// each early attempt could stall for the dial timeout.
				continue
			}
		case <-timer.C:
		case <-m.back:
			timer.Stop()
			retry = 0
		}
		if err := m.sync(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			m.failed(err)
			retry = min(max(retry*2, m.retryMin), m.retryMax)
			timer.Reset(retry)
			continue
		}
		retry = 0
	}
}

// flush makes one bounded last attempt at shutdown, so that an edit made
// just before does not wait for the next start to reach Redis. It does not
// try while Redis is known to be down: shutdown must not stall on it.
func (m *redisMirror) flush() {
	m.mu.Lock()
	behind := m.startSync && !m.down && m.wanted > m.written
	m.mu.Unlock()
	if !behind {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := m.sync(ctx); err != nil {
		m.failed(err)
	}
}

// sync finishes the start-up sync if it is still owed, then writes the
// database's channel set.
func (m *redisMirror) sync(ctx context.Context) error {
	m.mu.Lock()
	started, gen := m.startSync, m.wanted
	m.mu.Unlock()
	if !started {
		if err := m.restoreOrSeed(ctx); err != nil {
			return err
		}
		if m.onRestore != nil {
			m.onRestore()
		}
	}
	// The version is read before the items, so a change after it moves
	// the version again and is caught by the next run.
	vctx, vcancel := context.WithTimeout(ctx, 5*time.Second)
	ver, err := m.client.Get(vctx, cfgVersionKey).Int64()
	vcancel()
	if err != nil && !errors.Is(err, redis.Nil) {
		return fmt.Errorf("read version: %w", err)
	}
	for _, k := range m.kinds {
		// A lost compare-and-set means another replica wrote the same
		// item meanwhile: go round again with its revision.
		for range 5 {
			_, again, err := m.reconcile(ctx, k)
			if err != nil {
				return fmt.Errorf("share %s: %w", k.name, err)
			}
			if !again {
				break
			}
		}
	}
	m.seen.Store(ver)
	for _, k := range m.kinds {
		if k.floor == nil {
			continue
		}
		if err := m.reserveIDs(ctx, k.name, k.floor(ctx)); err != nil {
			return err
		}
	}
	// gen was read before this read of the database, so the write below
	// covers every change counted in it.
	chs, err := m.store.ListChannels(ctx)
	if err != nil {
		return err
	}
	if chs == nil {
		chs = []Channel{} // deleting the last channel writes an empty set, not null
	}
	doc, err := json.Marshal(mirrorDoc{Version: mirrorVersion, UpdatedAt: m.now().UTC(), Channels: chs})
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := m.client.Set(wctx, mirrorKey, doc, 0).Err(); err != nil {
		return fmt.Errorf("write backup: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.down {
		m.log.Info("redis mirror: working again, backup up to date", "redis", m.addr, "channels", len(chs))
		m.alerts.redis(true, m.addr, "")
	}
	m.down, m.lastErr, m.lastSyncAt, m.lastCount = false, "", m.now(), len(chs)
	m.written = max(m.written, gen)
	m.wake()
	return nil
}

// failed records an error, logging it once per outage.
func (m *redisMirror) failed(err error) {
	msg := scrub(err.Error(), m.secrets)
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.down {
		m.log.Error("redis mirror: sync failed; retrying with backoff, the database is unaffected", "redis", m.addr, "err", msg)
		m.alerts.redis(false, m.addr, msg)
	}
	m.down, m.lastErr, m.lastErrAt = true, msg, m.now()
	m.wake()
}

// Status is the mirror's state for the admin.
func (m *redisMirror) Status() map[string]any {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := map[string]any{"enabled": true, "ok": !m.down && m.startSync, "addr": m.addr,
		"last_error": m.lastErr, "channels": m.lastCount, "restored_at_start": m.restored,
		"pending": m.wanted > m.written, "replica": m.replica, "health_dropped": m.healthDropped.Load()}
	st["last_sync"] = nil
	if !m.lastSyncAt.IsZero() {
		st["last_sync"] = m.lastSyncAt.UTC()
	}
	st["last_error_at"] = nil
	if !m.lastErrAt.IsZero() {
		st["last_error_at"] = m.lastErrAt.UTC()
	}
	return st
}

func (m *redisMirror) close() { m.client.Close() }
