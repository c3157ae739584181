package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Several replicas sharing one Redis (README "Several replicas", SPEC §12).
//
// Configuration. Every shared config item (a channel today; tokens and
// prices plug in with one configKind each) lives in Redis as one field of
// the hash ccload:cfg:items:<kind>, "<rev>\n<json>" ("<rev>\n" once
// deleted). Each replica keeps its own SQLite copy and, in cluster_items,
// the last form of each item it agreed with Redis on and that revision. The
// mirror's one writer reconciles the three after every local change, every
// pub/sub notice and whenever the version counter moved:
//   - an item whose local form differs from the agreed one was edited here:
//     it is pushed with a compare-and-set on the agreed revision; if another
//     replica got there first the two edits are merged field by field (the
//     fields this replica changed go onto the newer item) and pushed again;
//   - an item with a newer revision in Redis is pulled into SQLite.
//
// Edits made while Redis is away stay local and are pushed on reconnect by
// the same rule, so nothing is lost and nothing is a second mechanism: one
// replica alone is the same code with nobody to pull from, and the whole set
// is still written to ccload:channels as the backup SPEC §6 describes.
//
// Health, sessions and heartbeats are small and separate: cooldown changes
// go out on a pub/sub channel from a goroutine fed by a bounded queue (the
// hot path only does a non-blocking send), sessions are keys with a TTL, and
// each replica writes a heartbeat every few seconds.
//
// Tokens and the price table are configKinds too (clusterkinds.go); token
// spend/rpm/concurrency counters (counters.go) and session bindings
// (sharedaffinity.go) are shared beside this, each behind its feature's
// local structure, so a Redis outage falls back to local state.

const (
	cfgVersionKey = "ccload:cfg:version"
	cfgNotify     = "ccload:cfg:notify"
	healthNotify  = "ccload:health"
	replicasKey   = "ccload:replicas"
	sessionPrefix = "ccload:session:"

	// pollEvery bounds how late a replica notices a change whose pub/sub
	// notice it missed (a reconnect, a lost message).
	pollEvery = 400 * time.Millisecond
	// heartbeatEvery and aliveFor: a replica is listed as alive while its
	// last heartbeat is younger than aliveFor.
	heartbeatEvery = 2 * time.Second
	aliveFor       = 10 * time.Second
	// idBlock is how many ids a replica reserves for creating items while
	// Redis is unreachable.
	idBlock = 32
)

func cfgItemsKey(kind string) string { return "ccload:cfg:items:" + kind }
func cfgIDsKey(kind string) string   { return "ccload:cfg:ids:" + kind }

// configKind is one kind of shared configuration item. Items are JSON
// objects with an int64 id; fields are compared and merged by name, so a
// kind needs no merge code of its own.
type configKind struct {
	name string
	// list returns every local item in its canonical JSON form.
	list func(ctx context.Context) (map[int64][]byte, error)
	// canon validates an item (from Redis or a merge) and returns its
	// canonical form, the bytes list would give once it is stored.
	canon func(data []byte) ([]byte, error)
	// put stores an item, keeping its id; nil data deletes it. It runs
	// inside change and must not call the store's change hook.
	put func(ctx context.Context, id int64, data []byte) error
	// change runs write serialized with the kind's local writes (the admin
	// API) and reloads whatever serves from the items afterwards.
	change func(ctx context.Context, write func() error) error
	// floor, if set, is the highest id this replica has used: the kind's
	// ids come from Redis (newID), and a block is kept for outages.
	floor func(ctx context.Context) int64
}

// channelKind shares the channel set. change is admin.changeChannels when
// the app runs; a bare mirror (tests) serializes nothing.
func channelKind(s *Store, change func(ctx context.Context, write func() error) error) *configKind {
	if change == nil {
		change = func(_ context.Context, write func() error) error { return write() }
	}
	return &configKind{
		name:  "channels",
		floor: s.maxChannelID,
		list: func(ctx context.Context) (map[int64][]byte, error) {
			chs, err := s.ListChannels(ctx)
			if err != nil {
				return nil, err
			}
			out := make(map[int64][]byte, len(chs))
			for _, c := range chs {
				b, err := json.Marshal(c)
				if err != nil {
					return nil, err
				}
				out[c.ID] = b
			}
			return out, nil
		},
		canon: func(data []byte) ([]byte, error) {
			var c Channel
			if err := json.Unmarshal(data, &c); err != nil {
				return nil, err
			}
			nc, err := c.normalized()
			if err != nil {
				return nil, err
			}
			// Stored times have millisecond precision, in UTC.
			nc.CreatedAt = time.UnixMilli(c.CreatedAt.UnixMilli()).UTC()
			nc.UpdatedAt = time.UnixMilli(c.UpdatedAt.UnixMilli()).UTC()
			return json.Marshal(nc)
		},
		put: func(ctx context.Context, id int64, data []byte) error {
			if data == nil {
				_, err := s.db.ExecContext(ctx, `DELETE FROM channels WHERE id = ?`, id)
				return err
			}
			var c Channel
			if err := json.Unmarshal(data, &c); err != nil {
				return err
			}
			c.ID = id
			return s.putChannelYielding(ctx, c)
		},
		change: change,
	}
}

// putChannel writes c under its id as it is, times included, creating or
// replacing it.
func (s *Store) putChannel(ctx context.Context, c Channel) error {
	keys, models, redirects := channelArgs(&c)
	_, err := s.db.ExecContext(ctx, `INSERT INTO channels
		(id, name, url, api_keys, channel_type, priority, models, model_redirects, key_strategy, enabled, created_at, updated_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT(id) DO UPDATE SET name = excluded.name, url = excluded.url, api_keys = excluded.api_keys,
		channel_type = excluded.channel_type, priority = excluded.priority, models = excluded.models,
		model_redirects = excluded.model_redirects, key_strategy = excluded.key_strategy,
		enabled = excluded.enabled, created_at = excluded.created_at, updated_at = excluded.updated_at`,
		c.ID, c.Name, c.URL, keys, c.Type, c.Priority, models, redirects, c.KeyStrategy, c.Enabled,
		c.CreatedAt.UnixMilli(), c.UpdatedAt.UnixMilli())
	if err != nil {
		return channelWriteError(&c, err)
	}
	return nil
}

// putChannelYielding stores c; if another channel here has its name (two
// replicas created the same name at once), the one with the higher id is
// renamed "name (id)", on every replica alike, so they converge instead of
// refusing each other's channel forever. The rename is then an edit like
// any other and is pushed.
func (s *Store) putChannelYielding(ctx context.Context, c Channel) error {
	err := s.putChannel(ctx, c)
	if !errors.Is(err, errDuplicate) {
		return err
	}
	var other int64
	if s.db.QueryRowContext(ctx, `SELECT id FROM channels WHERE name = ? AND id != ?`, c.Name, c.ID).Scan(&other) != nil {
		return err
	}
	if c.ID > other {
		c.Name = fmt.Sprintf("%s (%d)", c.Name, c.ID)
		return s.putChannel(ctx, c)
	}
	if _, rerr := s.db.ExecContext(ctx, `UPDATE channels SET name = name || ? WHERE id = ?`, fmt.Sprintf(" (%d)", other), other); rerr != nil {
		return errors.Join(err, rerr)
	}
	return s.putChannel(ctx, c)
}

// syncedItem is a cluster_items row: the form this replica last agreed with
// Redis on (nil: deleted) and its revision there.
type syncedItem struct {
	rev  int64
	data []byte
}

func (s *Store) clusterItems(ctx context.Context, kind string) (map[int64]syncedItem, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, rev, data FROM cluster_items WHERE kind = ?`, kind)
	if err != nil {
		return nil, fmt.Errorf("read cluster_items: %w", err)
	}
	defer rows.Close()
	out := map[int64]syncedItem{}
	for rows.Next() {
		var id int64
		var it syncedItem
		var data sql.NullString
		if err := rows.Scan(&id, &it.rev, &data); err != nil {
			return nil, err
		}
		if data.Valid {
			it.data = []byte(data.String)
		}
		out[id] = it
	}
	return out, rows.Err()
}

func (s *Store) setClusterItem(ctx context.Context, kind string, id int64, it syncedItem) error {
	var data any
	if it.data != nil {
		data = string(it.data)
	}
	_, err := s.db.ExecContext(ctx, `INSERT OR REPLACE INTO cluster_items (kind, id, rev, data) VALUES (?, ?, ?, ?)`,
		kind, id, it.rev, data)
	return err
}

// parseRemote reads a hash field "<rev>\n<json>".
func parseRemote(v string) (syncedItem, error) {
	revText, data, ok := strings.Cut(v, "\n")
	rev, err := strconv.ParseInt(revText, 10, 64)
	if !ok || err != nil {
		return syncedItem{}, fmt.Errorf("bad item %.20q", v)
	}
	it := syncedItem{rev: rev}
	if data != "" {
		it.data = []byte(data)
	}
	return it, nil
}

// casScript writes an item if its revision in Redis is still the one the
// writer started from, bumps the version, keeps the id counter above every
// id in use (items created while Redis was away, or before the cluster),
// and tells the other replicas. It returns the new revision, or -1. The
// revision is at least ARGV[5], so that an item written back into a Redis
// that lost its data still reads as newer to every replica.
var casScript = redis.NewScript(`
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local rev = 0
if cur then rev = tonumber(string.match(cur, '^(%d+)')) end
if rev ~= tonumber(ARGV[2]) then return -1 end
rev = math.max(rev + 1, tonumber(ARGV[5]))
redis.call('HSET', KEYS[1], ARGV[1], rev .. '\n' .. ARGV[3])
if tonumber(redis.call('GET', KEYS[3]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[3], ARGV[1])
end
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', KEYS[4], v .. ' ' .. ARGV[4])
return rev
`)

// idScript allocates an id above both the counter and every id this
// replica knows of.
var idScript = redis.NewScript(`
local n = redis.call('INCRBY', KEYS[1], ARGV[2])
local floor = tonumber(ARGV[1])
if n <= floor then
  n = floor + tonumber(ARGV[2])
  redis.call('SET', KEYS[1], n)
end
return n
`)

var errCASLost = errors.New("another replica wrote the item first")

func (m *redisMirror) cas(ctx context.Context, kind string, id, base, minRev int64, data []byte) (int64, error) {
	rev, err := casScript.Run(ctx, m.client,
		[]string{cfgItemsKey(kind), cfgVersionKey, cfgIDsKey(kind), cfgNotify},
		id, base, string(data), m.replica, minRev).Int64()
	if err != nil {
		return 0, fmt.Errorf("write %s %d: %w", kind, id, err)
	}
	if rev < 0 {
		return 0, errCASLost
	}
	return rev, nil
}

// reconcile brings one kind's local items and Redis together (see the top
// of this file). It reports how many items it changed locally.
func (m *redisMirror) reconcile(ctx context.Context, k *configKind) (changed int, again bool, err error) {
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	raw, err := m.client.HGetAll(rctx, cfgItemsKey(k.name)).Result()
	if err != nil {
		return 0, false, fmt.Errorf("read %s: %w", k.name, err)
	}
	remote := make(map[int64]syncedItem, len(raw))
	for f, v := range raw {
		id, err := strconv.ParseInt(f, 10, 64)
		it, perr := parseRemote(v)
		if err != nil || perr != nil {
			m.log.Warn("cluster: skipping an unreadable item in Redis", "kind", k.name, "field", f)
			continue
		}
		remote[id] = it
	}
	err = k.change(ctx, func() error {
		local, err := k.list(ctx)
		if err != nil {
			return err
		}
		synced, err := m.store.clusterItems(ctx, k.name)
		if err != nil {
			return err
		}
		ids := slices.Sorted(maps.Keys(local))
		for id := range synced {
			if _, ok := local[id]; !ok {
				ids = append(ids, id)
			}
		}
		for id := range remote {
			if _, ok := local[id]; !ok {
				if _, ok := synced[id]; !ok {
					ids = append(ids, id)
				}
			}
		}
		for _, id := range ids {
			n, lost, err := m.reconcileItem(ctx, k, id, local, synced, remote)
			if err != nil {
				return err
			}
			changed += n
			again = again || lost
		}
		return nil
	})
	return changed, again, err
}

// reconcileItem settles one item; see reconcile.
func (m *redisMirror) reconcileItem(ctx context.Context, k *configKind, id int64, local map[int64][]byte, synced, remote map[int64]syncedItem) (changed int, lost bool, err error) {
	l, lok := local[id]
	s, sok := synced[id]
	r, rok := remote[id]
	apply := func(it syncedItem) error {
		data := it.data
		if data != nil {
			var err error
			if data, err = k.canon(data); err != nil {
				// Refused, not half applied; retried on the next change.
				m.log.Error("cluster: an item from Redis is invalid here; keeping the local one", "kind", k.name, "id", id, "err", err)
				return nil
			}
		}
		if err := k.put(ctx, id, data); err != nil {
			m.log.Error("cluster: cannot store an item from Redis; will retry", "kind", k.name, "id", id, "err", err)
			return nil
		}
		changed++
		return m.store.setClusterItem(ctx, k.name, id, syncedItem{rev: it.rev, data: data})
	}
	var next []byte
	if lok {
		next = l
	}
	if !rok && sok {
		// Redis lost it (it restarted without its data): write back what
		// this replica has, edited or not.
		if next == nil && s.data == nil {
			return 0, false, nil
		}
		rev, err := m.cas(ctx, k.name, id, 0, s.rev+1, next)
		if errors.Is(err, errCASLost) {
			return 0, true, nil
		}
		if err != nil {
			return 0, false, err
		}
		return 0, false, m.store.setClusterItem(ctx, k.name, id, syncedItem{rev: rev, data: next})
	}
	edited := !sok && lok || sok && (lok != (s.data != nil) || lok && !bytes.Equal(l, s.data))
	if !edited {
		// Any other revision is newer: revisions only go down when Redis
		// lost its data, and then the write-back above raised them again.
		if rok && r.rev != s.rev {
			return changed, false, apply(r)
		}
		return 0, false, nil
	}
	base := s.rev
	if rok && r.rev != s.rev {
		switch {
		case !sok:
			// Never agreed on: a restore from the backup or data from
			// before the cluster. The same item is simply adopted; a
			// different one under the same id yields to Redis, which the
			// other replicas already serve.
			if lok && r.data != nil && bytes.Equal(l, r.data) {
				return 0, false, m.store.setClusterItem(ctx, k.name, id, r)
			}
			if canon, err := k.canon(r.data); r.data == nil || err == nil && bytes.Equal(l, canon) {
				return changed, false, apply(r)
			}
			m.log.Warn("cluster: a local item differs from Redis's under the same id; Redis's wins", "kind", k.name, "id", id)
			return changed, false, apply(r)
		default:
			merged, fields, err := mergeItem(s.data, next, r.data)
			if err != nil {
				return 0, false, fmt.Errorf("merge %s %d: %w", k.name, id, err)
			}
			if merged != nil {
				if merged, err = k.canon(merged); err != nil {
					// The two edits together are not a valid item: the
					// other replica's stands, and this one's is reported.
					m.log.Error("cluster: concurrent edits do not combine; the other replica's is kept", "kind", k.name, "id", id, "fields", fields, "err", err)
					return changed, false, apply(r)
				}
			}
			if len(fields) > 0 {
				m.log.Warn("cluster: the same field was edited on two replicas at once; this replica's value is the later", "kind", k.name, "id", id, "fields", fields)
			}
			next, base = merged, r.rev
		}
	}
	rev, err := m.cas(ctx, k.name, id, base, s.rev+1, next)
	if errors.Is(err, errCASLost) {
		return 0, true, nil
	}
	if err != nil {
		return 0, false, err
	}
	if !bytes.Equal(next, l) || (next == nil) != !lok {
		if err := k.put(ctx, id, next); err != nil {
			return 0, false, err
		}
		changed++
	}
	return changed, false, m.store.setClusterItem(ctx, k.name, id, syncedItem{rev: rev, data: next})
}

// mergeItem puts the fields ours changed since base onto theirs. A delete
// on either side wins. It also names the fields both sides changed to
// different values (ours is kept: it is the later write).
func mergeItem(base, ours, theirs []byte) (merged []byte, both []string, err error) {
	if ours == nil || theirs == nil {
		return nil, nil, nil
	}
	var b, o, t map[string]json.RawMessage
	if base != nil {
		if err := json.Unmarshal(base, &b); err != nil {
			return nil, nil, err
		}
	}
	if err := json.Unmarshal(ours, &o); err != nil {
		return nil, nil, err
	}
	if err := json.Unmarshal(theirs, &t); err != nil {
		return nil, nil, err
	}
	for f, v := range o {
		if bytes.Equal(v, b[f]) {
			continue
		}
		if tv, ok := t[f]; ok && !bytes.Equal(tv, b[f]) && !bytes.Equal(tv, v) && f != "updated_at" {
			both = append(both, f)
		}
		t[f] = v
	}
	slices.Sort(both)
	merged, err = json.Marshal(t)
	return merged, both, err
}

// newID allocates an id for a new item of kind that no replica will hand
// out again: from Redis when it answers, else from the block this replica
// reserved while it could, else an error (nothing is created).
func (m *redisMirror) newID(ctx context.Context, kind string, floor int64) (int64, error) {
	ctx2, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	id, err := idScript.Run(ctx2, m.client, []string{cfgIDsKey(kind)}, floor, 1).Int64()
	if err == nil {
		return id, nil
	}
	m.idMu.Lock()
	defer m.idMu.Unlock()
	// Block ids were taken from the counter when reserved, so no replica
	// hands them out again, however far the counter has moved since.
	next, last := m.store.idBlock(ctx, kind)
	if last == 0 || next > last {
		return 0, &apiError{503, "Redis is unreachable and this replica has no cluster ids left to create with: try again when Redis is back (" + scrub(err.Error(), m.secrets) + ")"}
	}
	if err := m.store.SetSetting(ctx, "cluster_ids_"+kind, fmt.Sprintf("%d,%d", next+1, last)); err != nil {
		return 0, err
	}
	return next, nil
}

// reserveIDs tops up the block of ids for creating while Redis is away.
func (m *redisMirror) reserveIDs(ctx context.Context, kind string, floor int64) error {
	m.idMu.Lock()
	defer m.idMu.Unlock()
	if next, last := m.store.idBlock(ctx, kind); last > 0 && last-next+1 >= idBlock/2 {
		return nil
	}
	last, err := idScript.Run(ctx, m.client, []string{cfgIDsKey(kind)}, floor, idBlock).Int64()
	if err != nil {
		return fmt.Errorf("reserve ids: %w", err)
	}
	return m.store.SetSetting(ctx, "cluster_ids_"+kind, fmt.Sprintf("%d,%d", last-idBlock+1, last))
}

// idBlock reads the reserved block [next, last]; zeros when there is none.
func (s *Store) idBlock(ctx context.Context, kind string) (next, last int64) {
	v, err := s.Setting(ctx, "cluster_ids_"+kind)
	if err != nil || v == "" {
		return 0, 0
	}
	a, b, _ := strings.Cut(v, ",")
	next, _ = strconv.ParseInt(a, 10, 64)
	last, _ = strconv.ParseInt(b, 10, 64)
	return next, last
}

// maxChannelID is the highest channel id this database has used.
func (s *Store) maxChannelID(ctx context.Context) int64 {
	var n sql.NullInt64
	s.rdb.QueryRowContext(ctx, `SELECT max(m) FROM (SELECT max(id) AS m FROM channels UNION ALL SELECT seq FROM sqlite_sequence WHERE name = 'channels' UNION ALL SELECT max(id) FROM cluster_items WHERE kind = 'channels')`).Scan(&n)
	return n.Int64
}

// watch follows the other replicas: config notices and a version poll kick
// the writer, health notices are applied to cool, and the heartbeat is
// written. It returns when ctx ends.
func (m *redisMirror) watch(ctx context.Context) {
	listened := make(chan struct{})
	go func() { m.listen(ctx); close(listened) }()
	defer func() { <-listened }()
	poll := time.NewTicker(pollEvery)
	defer poll.Stop()
	beat := time.NewTicker(heartbeatEvery)
	defer beat.Stop()
	m.heartbeat(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-poll.C:
			pctx, cancel := context.WithTimeout(ctx, time.Second)
			v, err := m.client.Get(pctx, cfgVersionKey).Int64()
			cancel()
			switch {
			case (err == nil || errors.Is(err, redis.Nil)) && m.isDown():
				select { // Redis is back: catch up now, not after the backoff
				case m.back <- struct{}{}:
				default:
				}
			case err == nil || errors.Is(err, redis.Nil):
				if v != m.seen.Load() {
					m.poke()
				}
			case !m.isDown():
				m.poke() // the writer's attempt notices the outage and reports it
			}
		case <-beat.C:
			m.heartbeat(ctx)
		}
	}
}

// listen follows the pub/sub channels, subscribing again whenever the
// connection ends (a Redis restart), until ctx ends.
func (m *redisMirror) listen(ctx context.Context) {
	for ctx.Err() == nil {
		ps := m.client.Subscribe(ctx, cfgNotify, healthNotify)
		stop := context.AfterFunc(ctx, func() { ps.Close() }) // ends the range below
		for msg := range ps.Channel(redis.WithChannelHealthCheckInterval(time.Second)) {
			switch msg.Channel {
			case cfgNotify:
				if _, from, _ := strings.Cut(msg.Payload, " "); from != m.replica {
					m.poke()
				}
			case healthNotify:
				m.applyHealth(msg.Payload)
			}
		}
		stop()
		ps.Close()
		select {
		case <-ctx.Done():
		case <-time.After(pollEvery):
		}
	}
}

// poke wakes the writer without counting a local change.
func (m *redisMirror) poke() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

func (m *redisMirror) isDown() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.down
}

// healthMsg is one cooldown change on the wire. All clears every scope of
// the channel (the admin's "clear cooldown").
type healthMsg struct {
	Replica  string `json:"r"`
	Channel  int64  `json:"c"`
	Key      int    `json:"k"`
	Model    string `json:"m,omitempty"`
	Until    int64  `json:"u,omitempty"` // Unix ms; 0: cleared
	Failures int    `json:"f,omitempty"`
	Reason   string `json:"why,omitempty"`
	Status   int    `json:"s,omitempty"`
	All      bool   `json:"all,omitempty"`
}

// announce queues a local cooldown change for the other replicas. It is
// called on the hot path (cooldowns.persist), so it never blocks: a full
// queue drops the message and counts it; the replicas still converge when
// the scope next changes, and a missed cooldown only costs a retry there.
func (m *redisMirror) announce(rec cooldownRecord, all bool) {
	msg := healthMsg{Replica: m.replica, Channel: rec.ChannelID, Key: rec.KeyIndex, Model: rec.Model,
		Failures: rec.Failures, Reason: rec.Reason, Status: rec.Status, All: all}
	if !rec.Until.IsZero() {
		msg.Until = rec.Until.UnixMilli()
	}
	select {
	case m.healthOut <- msg:
	default:
		m.healthDropped.Add(1)
	}
}

// publishHealth sends queued cooldown changes until ctx ends.
func (m *redisMirror) publishHealth(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case msg := <-m.healthOut:
			b, _ := json.Marshal(msg)
			pctx, cancel := context.WithTimeout(ctx, time.Second)
			if err := m.client.Publish(pctx, healthNotify, b).Err(); err != nil {
				m.healthDropped.Add(1)
			}
			cancel()
		}
	}
}

// applyHealth applies another replica's cooldown change to the local
// registry, and persists it here too so a restart keeps it.
func (m *redisMirror) applyHealth(payload string) {
	var msg healthMsg
	if err := json.Unmarshal([]byte(payload), &msg); err != nil || msg.Replica == m.replica || m.cool == nil {
		return
	}
	c := m.cool
	h := c.get(msg.Channel)
	if h == nil {
		return
	}
	if msg.All {
		c.exclusive(func() error {
			c.resetAll(h)
			return m.store.ClearCooldowns(context.Background(), msg.Channel)
		})
		return
	}
	rec := cooldownRecord{ChannelID: msg.Channel, KeyIndex: msg.Key, Model: msg.Model,
		Failures: msg.Failures, Reason: msg.Reason, Status: msg.Status}
	if msg.Until > 0 {
		rec.Until = time.UnixMilli(msg.Until)
	}
	c.applyRemote(h, rec)
}

// applyRemote sets one scope to a state another replica recorded, without
// announcing it again.
func (c *cooldowns) applyRemote(h *channelHealth, r cooldownRecord) {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.slotFor(r)
	if s == nil {
		return
	}
	s.failures, s.reason, s.status = r.Failures, r.Reason, r.Status
	if r.Until.IsZero() {
		s.until.Store(0)
		s.lastFail = 0
	} else {
		s.until.Store(r.Until.UnixNano())
		s.lastFail = c.now().UnixNano()
	}
	if !h.retired {
		c.queue(cooldownKey{r.ChannelID, r.KeyIndex, r.Model}, r)
	}
}

// sessionStore keeps admin sessions by the hash of their token. *Store is
// one (this replica only); clusterSessions shares them through Redis.
// Each session carries the fingerprint of the admin password it was opened
// under (see auth.go): one opened under another password is not valid.
type sessionStore interface {
	CreateSessionFor(ctx context.Context, tokenHash, passFP string, expires time.Time) error
	SessionValidFor(ctx context.Context, tokenHash, passFP string) (bool, error)
	DeleteSession(ctx context.Context, tokenHash string) error
	DeleteAllSessions(ctx context.Context) (int64, error)
}

// clusterSessions writes every session to the local database and to Redis.
// A check asks Redis first: "1" and the password fingerprint is valid
// anywhere under that password, "0" was logged out on some replica; no
// answer (Redis away, or a session made while it was) falls back to the
// local database.
type clusterSessions struct {
	local  *Store
	client *redis.Client
	now    func() time.Time
}

func (cs clusterSessions) CreateSessionFor(ctx context.Context, hash, passFP string, expires time.Time) error {
	if err := cs.local.CreateSessionFor(ctx, hash, passFP, expires); err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if err := cs.client.Set(rctx, sessionPrefix+hash, "1"+passFP, expires.Sub(cs.now())).Err(); err != nil {
		slog.Warn("cluster: session kept on this replica only (Redis unreachable)", "err", err)
	}
	return nil
}

func (cs clusterSessions) SessionValidFor(ctx context.Context, hash, passFP string) (bool, error) {
	rctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	v, err := cs.client.Get(rctx, sessionPrefix+hash).Result()
	cancel()
	if err == nil {
		return v == "1"+passFP, nil
	}
	return cs.local.SessionValidFor(ctx, hash, passFP)
}

// DeleteAllSessions ends every session here and, through tombstones in
// Redis, on every replica.
func (cs clusterSessions) DeleteAllSessions(ctx context.Context) (int64, error) {
	n, err := cs.local.DeleteAllSessions(ctx)
	if err != nil {
		return 0, err
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	iter := cs.client.Scan(rctx, 0, sessionPrefix+"*", 1000).Iterator()
	for iter.Next(rctx) {
		cs.client.Set(rctx, iter.Val(), "0", sessionTTL)
	}
	if err := iter.Err(); err != nil {
		slog.Warn("cluster: log-out-everywhere not shared (Redis unreachable): other replicas end their sessions when they expire", "err", err)
	}
	return n, nil
}

func (cs clusterSessions) DeleteSession(ctx context.Context, hash string) error {
	if err := cs.local.DeleteSession(ctx, hash); err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	// A tombstone for as long as the session could have lived, so that a
	// replica holding it locally refuses it too.
	if err := cs.client.Set(rctx, sessionPrefix+hash, "0", sessionTTL).Err(); err != nil {
		slog.Warn("cluster: logout not shared (Redis unreachable): other replicas see it when the session expires", "err", err)
	}
	return nil
}

// replicaInfo is one heartbeat.
type replicaInfo struct {
	Replica string    `json:"replica"`
	Version string    `json:"version"`
	Started time.Time `json:"started"`
	Seen    time.Time `json:"seen"`
	Alive   bool      `json:"alive"`
	Self    bool      `json:"self"`
}

func (m *redisMirror) heartbeat(ctx context.Context) {
	b, _ := json.Marshal(replicaInfo{Replica: m.replica, Version: version, Started: m.started, Seen: m.now().UTC()})
	hctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	m.client.HSet(hctx, replicasKey, m.replica, b)
}

// replicas lists the replicas that sent a heartbeat in the last hour, this
// one first; older entries are dropped.
func (m *redisMirror) replicas(ctx context.Context) ([]replicaInfo, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	raw, err := m.client.HGetAll(ctx, replicasKey).Result()
	if err != nil {
		return nil, err
	}
	now := m.now()
	var out []replicaInfo
	for name, v := range raw {
		var ri replicaInfo
		if json.Unmarshal([]byte(v), &ri) != nil {
			continue
		}
		if now.Sub(ri.Seen) > time.Hour {
			m.client.HDel(ctx, replicasKey, name)
			continue
		}
		ri.Alive, ri.Self = now.Sub(ri.Seen) < aliveFor, name == m.replica
		out = append(out, ri)
	}
	slices.SortFunc(out, func(a, b replicaInfo) int {
		if a.Self != b.Self {
			return boolInt(b.Self) - boolInt(a.Self)
		}
		return strings.Compare(a.Replica, b.Replica)
	})
	return out, nil
}

// sessionStore returns where admin sessions live: shared through Redis with
// several replicas, else the database.
func (a *admin) sessionStore() sessionStore {
	if a.sessions != nil {
		return a.sessions
	}
	return a.store
}

// replicaLister is what the admin shows of the other replicas.
type replicaLister interface {
	replicas(ctx context.Context) ([]replicaInfo, error)
}

// handleReplicas lists the replicas sharing this Redis (GET
// /admin/replicas); without Redis, only this one.
func (a *admin) handleReplicas() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		self := replicaInfo{Replica: a.replica, Version: version, Alive: true, Self: true, Seen: a.now().UTC()}
		out := map[string]any{"self": a.replica, "shared": a.replicas != nil}
		if a.replicas == nil {
			out["replicas"] = []replicaInfo{self}
			writeJSON(w, http.StatusOK, out)
			return nil
		}
		list, err := a.replicas.replicas(r.Context())
		if err != nil {
			out["replicas"] = []replicaInfo{self}
			out["error"] = "Redis unreachable: only this replica is shown"
			writeJSON(w, http.StatusOK, out)
			return nil
		}
		if len(list) == 0 || !list[0].Self {
			list = append([]replicaInfo{self}, list...)
		}
		out["replicas"] = list
		writeJSON(w, http.StatusOK, out)
		return nil
	})
}

// replicaLabeler adds the replica label to every sample line written
// through it. Writes may end mid-line (a bufio.Writer's chunks): the
// unfinished line waits for the next write. The exposition ends each line
// with a newline, so nothing is left at the end.
type replicaLabeler struct {
	w       io.Writer
	label   string
	partial []byte
}

func (l *replicaLabeler) Write(p []byte) (int, error) {
	var out bytes.Buffer
	buf := append(l.partial, p...)
	end := bytes.LastIndexByte(buf, '\n') + 1
	l.partial = append([]byte(nil), buf[end:]...)
	for line := range bytes.SplitAfterSeq(buf[:end], []byte("\n")) {
		if len(line) == 0 || line[0] == '#' {
			out.Write(line)
			continue
		}
		if i := bytes.IndexByte(line, '{'); i >= 0 {
			out.Write(line[:i+1])
			out.WriteString(l.label + ",")
			out.Write(line[i+1:])
		} else if i := bytes.IndexByte(line, ' '); i >= 0 {
			out.Write(line[:i])
			out.WriteString("{" + l.label + "}")
			out.Write(line[i:])
		} else {
			out.Write(line)
		}
	}
	if _, err := l.w.Write(out.Bytes()); err != nil {
		return 0, err
	}
	return len(p), nil
}
