package main

import (
	"context"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Client tokens and the price table as shared config kinds (cluster.go,
// README "Several replicas"): the same revisions, compare-and-set and
// field-wise merge as channels, so an edit on one replica is served by
// every replica within a second. Ids of new tokens come from Redis
// (redisMirror.newID), so two replicas never hand out the same one.

// tokenItem is a token as shared: the record and its secret's hash (never
// the secret, which no replica keeps).
type tokenItem struct {
	tokenRecord
	Hash string `json:"token_hash"`
}

// canonToken is the form listTokens gives of t: millisecond UTC times,
// empty lists rather than null.
func canonToken(t tokenItem) ([]byte, error) {
	t.CreatedAt = time.UnixMilli(t.CreatedAt.UnixMilli()).UTC()
	t.UpdatedAt = time.UnixMilli(t.UpdatedAt.UnixMilli()).UTC()
	if t.ExpiresAt != nil {
		e := time.UnixMilli(t.ExpiresAt.UnixMilli()).UTC()
		t.ExpiresAt = &e
	}
	t.Models = nonNil(t.Models)
	if t.Channels == nil {
		t.Channels = []int64{}
	}
	return json.Marshal(t)
}

func tokenKind(s *Store, ts *tokenSet) *configKind {
	return &configKind{
		name:  "tokens",
		floor: s.maxTokenID,
		list: func(ctx context.Context) (map[int64][]byte, error) {
			recs, err := s.listTokens(ctx)
			if err != nil {
				return nil, err
			}
			out := make(map[int64][]byte, len(recs))
			for _, r := range recs {
				b, err := canonToken(tokenItem{tokenRecord: r, Hash: r.hash})
				if err != nil {
					return nil, err
				}
				out[r.ID] = b
			}
			return out, nil
		},
		canon: func(data []byte) ([]byte, error) {
			var t tokenItem
			if err := json.Unmarshal(data, &t); err != nil {
				return nil, err
			}
			if d, err := hex.DecodeString(t.Hash); err != nil || len(d) != 32 {
				return nil, invalid("token %d: token_hash is not a hex SHA-256", t.ID)
			}
			if t.Name == "" {
				return nil, invalid("token %d: no name", t.ID)
			}
			return canonToken(t)
		},
		put: func(ctx context.Context, id int64, data []byte) error {
			if data == nil {
				err := s.deleteToken(ctx, id)
				if errors.Is(err, errNotFound) {
					return nil
				}
				return err
			}
			var t tokenItem
			if err := json.Unmarshal(data, &t); err != nil {
				return err
			}
			t.ID, t.hash = id, t.Hash
			return s.putTokenYielding(ctx, t.tokenRecord)
		},
		change: ts.change,
	}
}

// putToken writes t under its id as it is, times included, creating or
// replacing it.
func (s *Store) putToken(ctx context.Context, t tokenRecord) error {
	exp, models, channels, limits := tokenArgs(&t)
	_, err := s.db.ExecContext(ctx, `INSERT INTO tokens (id, name, token_hash, hint, enabled, expires_at, models,
		channels, limits, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT(id) DO UPDATE SET name = excluded.name, token_hash = excluded.token_hash, hint = excluded.hint,
		enabled = excluded.enabled, expires_at = excluded.expires_at, models = excluded.models,
		channels = excluded.channels, limits = excluded.limits, created_at = excluded.created_at,
		updated_at = excluded.updated_at`,
		t.ID, t.Name, t.hash, t.Hint, t.Enabled, exp, models, channels, limits, t.CreatedAt.UnixMilli(), t.UpdatedAt.UnixMilli())
	if err != nil {
		return tokenWriteError(&t, err)
	}
	return nil
}

// putTokenYielding stores t; two replicas that created the same name at
// once converge the way channels do (putChannelYielding): the higher id
// is renamed "name (id)" everywhere, and the rename is pushed as an edit.
func (s *Store) putTokenYielding(ctx context.Context, t tokenRecord) error {
	err := s.putToken(ctx, t)
	if !errors.Is(err, errDuplicate) {
		return err
	}
	var other int64
	if s.db.QueryRowContext(ctx, `SELECT id FROM tokens WHERE name = ? AND id != ?`, t.Name, t.ID).Scan(&other) != nil {
		return err
	}
	if t.ID > other {
		t.Name = fmt.Sprintf("%s (%d)", t.Name, t.ID)
		return s.putToken(ctx, t)
	}
	if _, rerr := s.db.ExecContext(ctx, `UPDATE tokens SET name = name || ? WHERE id = ?`, fmt.Sprintf(" (%d)", other), other); rerr != nil {
		return errors.Join(err, rerr)
	}
	return s.putToken(ctx, t)
}

// maxTokenID is the highest token id this database has used.
func (s *Store) maxTokenID(ctx context.Context) int64 {
	var n sql.NullInt64
	s.rdb.QueryRowContext(ctx, `SELECT max(m) FROM (SELECT max(id) AS m FROM tokens UNION ALL SELECT seq FROM sqlite_sequence WHERE name = 'tokens' UNION ALL SELECT max(id) FROM cluster_items WHERE kind = 'tokens')`).Scan(&n)
	return n.Int64
}

// pricesItemID is the one item of the prices kind: the whole table.
const pricesItemID = 1

// priceItem is the price table as shared.
type priceItem struct {
	ID int64 `json:"id"`
	priceTable
}

// priceKind shares the price table once an admin has PUT one; a replica on
// the embedded defaults lists nothing and so pushes nothing.
func priceKind(s *Store, p *prices) *configKind {
	canonTable := func(t priceTable) ([]byte, error) {
		b, err := compilePrices(t)
		if err != nil {
			return nil, err
		}
		return json.Marshal(priceItem{ID: pricesItemID, priceTable: b.table})
	}
	return &configKind{
		name: "prices",
		list: func(ctx context.Context) (map[int64][]byte, error) {
			raw, err := s.Setting(ctx, pricesSetting)
			if err != nil || raw == "" {
				return map[int64][]byte{}, err
			}
			var t priceTable
			if err := json.Unmarshal([]byte(raw), &t); err != nil {
				return nil, fmt.Errorf("stored prices: %w", err)
			}
			b, err := canonTable(t)
			if err != nil {
				return nil, err
			}
			return map[int64][]byte{pricesItemID: b}, nil
		},
		canon: func(data []byte) ([]byte, error) {
			var it priceItem
			if err := json.Unmarshal(data, &it); err != nil {
				return nil, err
			}
			return canonTable(it.priceTable)
		},
		put: func(ctx context.Context, id int64, data []byte) error {
			if id != pricesItemID {
				return nil
			}
			if data == nil {
				_, err := s.db.ExecContext(ctx, `DELETE FROM settings WHERE key = ?`, pricesSetting)
				return err
			}
			var it priceItem
			if err := json.Unmarshal(data, &it); err != nil {
				return err
			}
			raw, err := json.Marshal(it.priceTable)
			if err != nil {
				return err
			}
			return s.SetSetting(ctx, pricesSetting, string(raw))
		},
		change: p.change,
	}
}

// change runs write under the edit lock and makes the stored table live.
func (p *prices) change(ctx context.Context, write func() error) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if write != nil {
		if err := write(); err != nil {
			return err
		}
	}
	fresh, err := loadPrices(ctx, p.store)
	if err != nil {
		return err
	}
	p.book.Store(fresh.current())
	return nil
}

// sharedKinds are the config kinds several replicas share, reconciled in
// this order (tokens name channels, so channels go first).
func sharedKinds(s *Store, change func(ctx context.Context, write func() error) error, ts *tokenSet, p *prices) []*configKind {
	return []*configKind{channelKind(s, change), tokenKind(s, ts), priceKind(s, p)}
}
