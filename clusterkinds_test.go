package main

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"
)

// The token CLI takes its id from Redis when REDIS_URL is set, so a token
// made on one replica's host never reuses an id another replica handed out.
func TestTokenCommandClusterID(t *testing.T) {
	r := startRedis(t, "")
	c := r.client()
	defer c.Close()
	ctx := context.Background()
	if err := c.Set(ctx, cfgIDsKey("tokens"), 100, 0).Err(); err != nil {
		t.Fatal(err)
	}
	cfg := config{SQLitePath: filepath.Join(t.TempDir(), "ccload.db"), RedisURL: r.redisURL()}
	var out bytes.Buffer
	if err := tokenCommand(ctx, cfg, []string{"create", "cli"}, &out); err != nil {
		t.Fatal(err)
	}
	s, err := OpenStore(ctx, cfg.SQLitePath)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	recs, err := s.listTokens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 1 || recs[0].ID != 101 {
		t.Fatalf("tokens after the CLI: %+v; want one with id 101", recs)
	}
}
