package main

import (
	"context"
	"database/sql"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

//go:embed schema.sql
var schemaSQL string

var (
	errNotFound  = errors.New("not found")
	errDuplicate = errors.New("duplicate")
)

// Store is the SQLite database. Writes go through a pool of one connection so
// that SQLite never answers SQLITE_BUSY to ourselves; reads use a separate
// pool, which WAL lets run beside the writer.
type Store struct {
	db  *sql.DB // writer: exactly one connection
	rdb *sql.DB // readers

	// Now is the clock; tests replace it.
	Now func() time.Time
	// TZ is where days and months begin for token spend (CCLOAD_TZ);
	// UTC unless set.
	TZ *time.Location

	// onChange, if set, is called after every committed change to the
	// channel set (the Redis mirror hooks in here).
	onChange func()

	// allocID, if set, gives a new channel its id: with several replicas
	// ids come from Redis so that no two replicas hand out the same one
	// (cluster.go). Unset, SQLite assigns them.
	allocID func(ctx context.Context) (int64, error)

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
	s := &Store{db: db, rdb: rdb, Now: time.Now, TZ: time.UTC}
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

// Ping checks that the database answers.
func (s *Store) Ping(ctx context.Context) error { return s.rdb.PingContext(ctx) }

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

const channelColumns = `id, name, url, api_keys, channel_type, priority, models, model_redirects, key_strategy, enabled, created_at, updated_at, price_multiplier`

type scanner interface{ Scan(dest ...any) error }

func scanChannel(row scanner) (Channel, error) {
	var (
		c                       Channel
		keys, models, redirects string
		created, updated        int64
	)
	err := row.Scan(&c.ID, &c.Name, &c.URL, &keys, &c.Type, &c.Priority, &models, &redirects,
		&c.KeyStrategy, &c.Enabled, &created, &updated, &c.PriceMultiplier)
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
	if err := s.assignID(ctx, c); err != nil {
		return err
	}
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

// assignID gives c an id from allocID when it has none.
func (s *Store) assignID(ctx context.Context, c *Channel) error {
	if c.ID != 0 || s.allocID == nil {
		return nil
	}
	id, err := s.allocID(ctx)
	if err != nil {
		return fmt.Errorf("allocate an id for %q: %w", c.Name, err)
	}
	c.ID = id
	return nil
}

func insertChannel(ctx context.Context, tx *sql.Tx, c *Channel, now int64) error {
	c.PriceMultiplier = storedMultiplier(c)
	keys, models, redirects := channelArgs(c)
	var idArg any // nil lets SQLite assign one
	if c.ID > 0 {
		idArg = c.ID
	}
	res, err := tx.ExecContext(ctx, `INSERT INTO channels
		(id, name, url, api_keys, channel_type, priority, models, model_redirects, key_strategy, enabled, created_at, updated_at,
		price_multiplier) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		idArg, c.Name, c.URL, keys, c.Type, c.Priority, models, redirects, c.KeyStrategy, c.Enabled, now, now, storedMultiplier(c))
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

// UpdateChannel replaces every field of the channel c.ID.
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
	c.PriceMultiplier = storedMultiplier(c)
	keys, models, redirects := channelArgs(c)
	var created int64
	err := tx.QueryRowContext(ctx, `UPDATE channels SET name = ?, url = ?, api_keys = ?, channel_type = ?,
		priority = ?, models = ?, model_redirects = ?, key_strategy = ?, enabled = ?, updated_at = ?,
		price_multiplier = ? WHERE id = ? RETURNING created_at`,
		c.Name, c.URL, keys, c.Type, c.Priority, models, redirects, c.KeyStrategy, c.Enabled, now, storedMultiplier(c), c.ID).Scan(&created)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("channel %d: %w", c.ID, errNotFound)
	}
	if err != nil {
		return channelWriteError(c, err)
	}
	c.CreatedAt = time.UnixMilli(created).UTC()
	c.UpdatedAt = time.UnixMilli(now).UTC()
	return nil
}

// storedMultiplier is c's price multiplier, 1 when unset.
func storedMultiplier(c *Channel) float64 {
	if c.PriceMultiplier <= 0 {
		return 1
	}
	return c.PriceMultiplier
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
	return s.CreateSessionFor(ctx, tokenHash, "", expires)
}

// CreateSessionFor stores a session opened under the password with
// fingerprint passFP.
func (s *Store) CreateSessionFor(ctx context.Context, tokenHash, passFP string, expires time.Time) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO sessions (token_hash, expires, pass_fp) VALUES (?, ?, ?)`,
		tokenHash, expires.UnixMilli(), passFP)
	return err
}

// SessionValid reports whether a session with that hash exists and has not
// expired.
func (s *Store) SessionValid(ctx context.Context, tokenHash string) (bool, error) {
	return s.SessionValidFor(ctx, tokenHash, "")
}

// SessionValidFor is SessionValid for a session opened under the password
// with fingerprint passFP: one opened under another password is not.
func (s *Store) SessionValidFor(ctx context.Context, tokenHash, passFP string) (bool, error) {
	var n int
	err := s.rdb.QueryRowContext(ctx, `SELECT count(*) FROM sessions WHERE token_hash = ? AND pass_fp = ? AND expires > ?`,
		tokenHash, passFP, s.now()).Scan(&n)
	return n > 0, err
}

// DeleteAllSessions ends every session ("log out everywhere").
func (s *Store) DeleteAllSessions(ctx context.Context) (int64, error) {
	res, err := s.db.ExecContext(ctx, `DELETE FROM sessions`)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
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

// restoreChannels inserts channels, keeping their ids, into an empty
// channels table, in one transaction. It does nothing if the table is no
// longer empty. The caller validates them (see Channel.normalized).
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
		if err := insertChannel(ctx, tx, &chs[i], now); err != nil {
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
