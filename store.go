package main

import (
	"context"
	"database/sql"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

//go:embed schema.sql
var schemaSQL string

var (
	errNotFound  = errors.New("not found")
	errDuplicate = errors.New("duplicate")
)

// Channel is an upstream the user bought access to, as stored. It holds the
// full keys; admin responses go through channelView, which masks them.
type Channel struct {
	ID             int64             `json:"id"`
	Name           string            `json:"name"`
	URL            string            `json:"url"`
	APIKeys        []string          `json:"api_keys"`
	Type           string            `json:"channel_type"`
	Priority       int               `json:"priority"`
	Models         []string          `json:"models"`
	ModelRedirects map[string]string `json:"model_redirects"`
	KeyStrategy    string            `json:"key_strategy"`
	Enabled        bool              `json:"enabled"`
	CreatedAt      time.Time         `json:"created_at"`
	UpdatedAt      time.Time         `json:"updated_at"`
}

// Store is the SQLite database. Writes go through a pool of one connection so
// that SQLite never answers SQLITE_BUSY to ourselves; reads use a separate
// pool, which WAL lets run beside the writer.
type Store struct {
	db  *sql.DB // writer: exactly one connection
	rdb *sql.DB // readers

	// Now is the clock; tests replace it.
	Now func() time.Time

	// onChange, if set, is called after every committed change to the
	// channel set (the Redis mirror hooks in here).
	onChange func()

	stmts logStmts
}

// OpenStore opens (creating if needed) the database at path and brings its
// schema up to date.
func OpenStore(ctx context.Context, path string) (*Store, error) {
	if dir := filepath.Dir(path); dir != "" {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return nil, fmt.Errorf("create database folder: %w", err)
		}
	}
	// Pragmas are per connection, so they go in the DSN.
	base := "file:" + (&url.URL{Path: path}).EscapedPath() +
		"?_pragma=busy_timeout(10000)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)&_pragma=journal_mode(WAL)"
	db, err := sql.Open("sqlite", base+"&_txlock=immediate")
	if err != nil {
		return nil, fmt.Errorf("open database: %w", err)
	}
	db.SetMaxOpenConns(1)
	db.SetConnMaxIdleTime(0)
	rdb, err := sql.Open("sqlite", base+"&_pragma=query_only(1)")
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open database: %w", err)
	}
	rdb.SetMaxOpenConns(4)
	rdb.SetMaxIdleConns(4)
	s := &Store{db: db, rdb: rdb, Now: time.Now}
	if err := s.migrate(ctx); err != nil {
		s.Close()
		return nil, fmt.Errorf("database %s: %w", path, err)
	}
	if s.stmts, err = prepareLogStmts(ctx, db); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (s *Store) Close() error {
	return errors.Join(s.rdb.Close(), s.db.Close())
}

// migrate runs the blocks of schema.sql whose version is above the
// database's user_version, each in its own transaction.
func (s *Store) migrate(ctx context.Context) error {
	var have int
	if err := s.db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&have); err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	blocks := strings.Split(schemaSQL, "-- version ")
	for _, b := range blocks[1:] {
		numText, body, _ := strings.Cut(b, "\n")
		n, err := strconv.Atoi(strings.TrimSpace(numText))
		if err != nil {
			return fmt.Errorf("schema.sql: bad version line %q", numText)
		}
		if n <= have {
			continue
		}
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, body); err != nil {
			tx.Rollback()
			return fmt.Errorf("migrate to version %d: %w", n, err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", n)); err != nil {
			tx.Rollback()
			return err
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migrate to version %d: %w", n, err)
		}
	}
	return nil
}

func (s *Store) now() int64 { return s.Now().UnixMilli() }

func (s *Store) changed() {
	if s.onChange != nil {
		s.onChange()
	}
}

const channelColumns = `id, name, url, api_keys, channel_type, priority, models, model_redirects, key_strategy, enabled, created_at, updated_at`

type scanner interface{ Scan(dest ...any) error }

func scanChannel(row scanner) (Channel, error) {
	var (
		c                       Channel
		keys, models, redirects string
		created, updated        int64
	)
	err := row.Scan(&c.ID, &c.Name, &c.URL, &keys, &c.Type, &c.Priority, &models, &redirects,
		&c.KeyStrategy, &c.Enabled, &created, &updated)
	if err != nil {
		return c, err
	}
	if err := errors.Join(
		json.Unmarshal([]byte(keys), &c.APIKeys),
		json.Unmarshal([]byte(models), &c.Models),
		json.Unmarshal([]byte(redirects), &c.ModelRedirects),
	); err != nil {
		return c, fmt.Errorf("channel %d: corrupt column: %w", c.ID, err)
	}
	c.CreatedAt = time.UnixMilli(created).UTC()
	c.UpdatedAt = time.UnixMilli(updated).UTC()
	return c, nil
}

// ListChannels returns every channel, ordered by id.
func (s *Store) ListChannels(ctx context.Context) ([]Channel, error) {
	return listChannels(ctx, s.rdb)
}

type queryer interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

func listChannels(ctx context.Context, q queryer) ([]Channel, error) {
	rows, err := q.QueryContext(ctx, `SELECT `+channelColumns+` FROM channels ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("list channels: %w", err)
	}
	defer rows.Close()
	var out []Channel
	for rows.Next() {
		c, err := scanChannel(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

// GetChannel returns the channel with id, or errNotFound.
func (s *Store) GetChannel(ctx context.Context, id int64) (Channel, error) {
	c, err := scanChannel(s.rdb.QueryRowContext(ctx, `SELECT `+channelColumns+` FROM channels WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return c, fmt.Errorf("channel %d: %w", id, errNotFound)
	}
	return c, err
}

// channelArgs returns the stored form of c's JSON columns.
func channelArgs(c *Channel) (keys, models, redirects string) {
	k, _ := json.Marshal(nonNil(c.APIKeys))
	m, _ := json.Marshal(nonNil(c.Models))
	r := c.ModelRedirects
	if r == nil {
		r = map[string]string{}
	}
	rd, _ := json.Marshal(r)
	return string(k), string(m), string(rd)
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// CreateChannel inserts c and sets its ID and times. A name already in use
// gives errDuplicate.
func (s *Store) CreateChannel(ctx context.Context, c *Channel) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := insertChannel(ctx, tx, c, s.now()); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	s.changed()
	return nil
}

func insertChannel(ctx context.Context, tx *sql.Tx, c *Channel, now int64) error {
	keys, models, redirects := channelArgs(c)
	var idArg any // nil lets SQLite assign one
	if c.ID > 0 {
		idArg = c.ID
	}
	res, err := tx.ExecContext(ctx, `INSERT INTO channels
		(id, name, url, api_keys, channel_type, priority, models, model_redirects, key_strategy, enabled, created_at, updated_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		idArg, c.Name, c.URL, keys, c.Type, c.Priority, models, redirects, c.KeyStrategy, c.Enabled, now, now)
	if err != nil {
		return channelWriteError(c, err)
	}
	if c.ID, err = res.LastInsertId(); err != nil {
		return err
	}
	c.CreatedAt = time.UnixMilli(now).UTC()
	c.UpdatedAt = c.CreatedAt
	return nil
}

// UpdateChannel replaces every field of the channel c.ID. When the URL or the
// keys change, its cooldowns go too: they described an upstream that is no
// longer the one configured.
func (s *Store) UpdateChannel(ctx context.Context, c *Channel) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := updateChannel(ctx, tx, c, s.now()); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	s.changed()
	return nil
}

func updateChannel(ctx context.Context, tx *sql.Tx, c *Channel, now int64) error {
	keys, models, redirects := channelArgs(c)
	var oldURL, oldKeys string
	err := tx.QueryRowContext(ctx, `SELECT url, api_keys FROM channels WHERE id = ?`, c.ID).Scan(&oldURL, &oldKeys)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("channel %d: %w", c.ID, errNotFound)
	}
	if err != nil {
		return err
	}
	var created int64
	err = tx.QueryRowContext(ctx, `UPDATE channels SET name = ?, url = ?, api_keys = ?, channel_type = ?,
		priority = ?, models = ?, model_redirects = ?, key_strategy = ?, enabled = ?, updated_at = ?
		WHERE id = ? RETURNING created_at`,
		c.Name, c.URL, keys, c.Type, c.Priority, models, redirects, c.KeyStrategy, c.Enabled, now, c.ID).Scan(&created)
	if err != nil {
		return channelWriteError(c, err)
	}
	if oldURL != c.URL || oldKeys != keys {
		if _, err := tx.ExecContext(ctx, `DELETE FROM cooldowns WHERE channel_id = ?`, c.ID); err != nil {
			return err
		}
	}
	c.CreatedAt = time.UnixMilli(created).UTC()
	c.UpdatedAt = time.UnixMilli(now).UTC()
	return nil
}

func channelWriteError(c *Channel, err error) error {
	var se *sqlite.Error
	if errors.As(err, &se) && se.Code() == sqlite3.SQLITE_CONSTRAINT_UNIQUE {
		return fmt.Errorf("a channel named %q already exists: %w", c.Name, errDuplicate)
	}
	if errors.As(err, &se) && se.Code() == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY {
		return fmt.Errorf("a channel with id %d already exists: %w", c.ID, errDuplicate)
	}
	return fmt.Errorf("save channel %q: %w", c.Name, err)
}

// DeleteChannel removes the channel and, by cascade, its cooldowns.
func (s *Store) DeleteChannel(ctx context.Context, id int64) error {
	res, err := s.db.ExecContext(ctx, `DELETE FROM channels WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("delete channel %d: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("channel %d: %w", id, errNotFound)
	}
	s.changed()
	return nil
}

// cooldownRecord is one persisted cooldown; see the cooldowns table.
type cooldownRecord struct {
	ChannelID int64
	KeyIndex  int // -1: not a key scope
	Model     string
	Until     time.Time
	Failures  int
	Reason    string
	Status    int
}

// LoadCooldowns returns every stored cooldown.
func (s *Store) LoadCooldowns(ctx context.Context) ([]cooldownRecord, error) {
	rows, err := s.rdb.QueryContext(ctx, `SELECT channel_id, key_index, model, until, failures, reason, status FROM cooldowns`)
	if err != nil {
		return nil, fmt.Errorf("load cooldowns: %w", err)
	}
	defer rows.Close()
	var out []cooldownRecord
	for rows.Next() {
		var r cooldownRecord
		var until int64
		if err := rows.Scan(&r.ChannelID, &r.KeyIndex, &r.Model, &until, &r.Failures, &r.Reason, &r.Status); err != nil {
			return nil, err
		}
		r.Until = time.UnixMilli(until)
		out = append(out, r)
	}
	return out, rows.Err()
}

// SaveCooldowns writes the given scopes in one transaction: a record with
// zero failures is a cleared scope and is deleted. Records for channels that
// no longer exist are dropped.
func (s *Store) SaveCooldowns(ctx context.Context, recs []cooldownRecord) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	for _, r := range recs {
		if r.Failures == 0 {
			_, err = tx.ExecContext(ctx, `DELETE FROM cooldowns WHERE channel_id = ? AND key_index = ? AND model = ?`,
				r.ChannelID, r.KeyIndex, r.Model)
		} else {
			_, err = tx.ExecContext(ctx, `INSERT OR REPLACE INTO cooldowns
				(channel_id, key_index, model, until, failures, reason, status)
				SELECT ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM channels WHERE id = ?)`,
				r.ChannelID, r.KeyIndex, r.Model, r.Until.UnixMilli(), r.Failures, r.Reason, r.Status, r.ChannelID)
		}
		if err != nil {
			return fmt.Errorf("save cooldown: %w", err)
		}
	}
	return tx.Commit()
}

// ClearCooldowns deletes every stored cooldown of a channel.
func (s *Store) ClearCooldowns(ctx context.Context, channelID int64) error {
	_, err := s.db.ExecContext(ctx, `DELETE FROM cooldowns WHERE channel_id = ?`, channelID)
	return err
}

// Setting returns a value from the settings table, or "" if absent.
func (s *Store) Setting(ctx context.Context, key string) (string, error) {
	var v string
	err := s.rdb.QueryRowContext(ctx, `SELECT value FROM settings WHERE key = ?`, key).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	return v, err
}

func (s *Store) SetSetting(ctx context.Context, key, value string) error {
	_, err := s.db.ExecContext(ctx, `INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)`, key, value)
	return err
}

// CreateSession stores a session by the hash of its token.
func (s *Store) CreateSession(ctx context.Context, tokenHash string, expires time.Time) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO sessions (token_hash, expires) VALUES (?, ?)`, tokenHash, expires.UnixMilli())
	return err
}

// SessionValid reports whether a session with that hash exists and has not
// expired.
func (s *Store) SessionValid(ctx context.Context, tokenHash string) (bool, error) {
	var n int
	err := s.rdb.QueryRowContext(ctx, `SELECT count(*) FROM sessions WHERE token_hash = ? AND expires > ?`,
		tokenHash, s.now()).Scan(&n)
	return n > 0, err
}

func (s *Store) DeleteSession(ctx context.Context, tokenHash string) error {
	_, err := s.db.ExecContext(ctx, `DELETE FROM sessions WHERE token_hash = ?`, tokenHash)
	return err
}

// DeleteExpiredSessions is housekeeping, run with log retention.
func (s *Store) DeleteExpiredSessions(ctx context.Context) error {
	_, err := s.db.ExecContext(ctx, `DELETE FROM sessions WHERE expires <= ?`, s.now())
	return err
}

// The Redis mirror (SPEC §6). After every channel change the whole channel
// set, keys included, is written to one Redis key, so that a container that
// lost its disk can restore itself on the next start.

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
	now     func() time.Time
	log     *slog.Logger

	// retryMin and retryMax bound the backoff between attempts while Redis
	// is unreachable. Set before run.
	retryMin, retryMax time.Duration

	// onRestore reloads the proxy after a restore that happened late (Redis
	// was down at start and came back while the database was still empty).
	onRestore func()

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
	opt.PoolSize = 2
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
		kick: make(chan struct{}, 1), now: time.Now, log: slog.Default(),
		retryMin: time.Second, retryMax: 30 * time.Second,
		progress: make(chan struct{}),
	}
	s.onChange = m.notify
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
	n, err := m.store.restoreChannels(ctx, doc.Channels)
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

// restoreChannels inserts channels, keeping their ids, into an empty
// channels table, in one transaction. It does nothing if the table is no
// longer empty.
func (s *Store) restoreChannels(ctx context.Context, chs []Channel) (int, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback()
	var have int
	if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM channels`).Scan(&have); err != nil {
		return 0, err
	}
	if have > 0 {
		return 0, nil
	}
	now := s.now()
	for i := range chs {
		c, err := validateStored(chs[i])
		if err != nil {
			return 0, fmt.Errorf("channel %d (%q): %w", chs[i].ID, chs[i].Name, err)
		}
		if err := insertChannel(ctx, tx, &c, now); err != nil {
			return 0, err
		}
	}
	if err := tx.Commit(); err != nil {
		return 0, err
	}
	if len(chs) > 0 {
		s.changed()
	}
	return len(chs), nil
}

// validateStored checks a channel from a backup the way the admin API
// checks a new one, so that a hand-edited backup cannot store what the API
// would refuse.
func validateStored(c Channel) (Channel, error) {
	fields := map[string]any{"name": c.Name, "url": c.URL, "api_keys": c.APIKeys, "channel_type": c.Type,
		"priority": c.Priority, "models": c.Models, "model_redirects": c.ModelRedirects,
		"key_strategy": c.KeyStrategy, "enabled": c.Enabled}
	in := make(map[string]json.RawMessage, len(fields))
	for k, v := range fields {
		in[k], _ = json.Marshal(v)
	}
	out := Channel{ID: c.ID}
	err := applyChannelInput(&out, in, true)
	return out, err
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
		"pending": m.wanted > m.written}
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
