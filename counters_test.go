package main

import (
	"context"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// limitedToken is a compiled managed token with the given limits.
func limitedToken(t testing.TB, id int64, l tokenLimits) *managedToken {
	t.Helper()
	mt, err := compileToken(tokenRecord{ID: id, Name: "lim", Enabled: true, hash: strings.Repeat("ab", 32), Limits: l})
	if err != nil {
		t.Fatal(err)
	}
	mt.ctr = &tokenCounters{}
	return mt
}

func ptr[T any](v T) *T { return &v }

// Two replicas' counters on one Redis share a concurrency limit exactly,
// and a slot given back on one is free on the other.
func TestSharedConcurrency(t *testing.T) {
	r := startRedis(t, "")
	base := redis.NewClient(&redis.Options{Addr: strings.TrimPrefix(strings.TrimSuffix(r.redisURL(), "/0"), "redis://")})
	defer base.Close()
	a, b := newSharedCounters(base, "a"), newSharedCounters(base, "b")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go a.run(ctx)
	go b.run(ctx)
	// The same token as each replica compiles it: its own local counters.
	ma, mb := limitedToken(t, 7, tokenLimits{Concurrency: ptr(int64(2))}), limitedToken(t, 7, tokenLimits{Concurrency: ptr(int64(2))})
	now := time.Now()
	if ref, shared := a.acquire(ma, now, time.UTC); ref != nil || !shared {
		t.Fatalf("first on A: %+v shared=%v", ref, shared)
	}
	if ref, shared := b.acquire(mb, now, time.UTC); ref != nil || !shared {
		t.Fatalf("first on B: %+v shared=%v", ref, shared)
	}
	if ref, _ := a.acquire(ma, now, time.UTC); ref == nil || ref.limit != "concurrency" {
		t.Fatalf("third slot of two: %+v", ref)
	}
	b.release(7)
	mb.ctr.release()
	until(t, "A gets the slot B gave back", time.Second, func() bool {
		ref, _ := a.acquire(ma, time.Now(), time.UTC)
		return ref == nil
	})
}

// With Redis unreachable, admission falls back to the local counters at
// once, enforces them, and stops asking for sharedBackoff.
func TestSharedFallback(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens: every dial is refused
	base := redis.NewClient(&redis.Options{Addr: addr})
	defer base.Close()
	sc := newSharedCounters(base, "a")
	defer sc.client.Close()
	mt := limitedToken(t, 1, tokenLimits{RPM: ptr(int64(2))})
	now := time.Now()
	start := time.Now()
	if ref, shared := sc.acquire(mt, now, time.UTC); ref != nil || shared {
		t.Fatalf("first with Redis away: %+v shared=%v", ref, shared)
	}
	if d := time.Since(start); d > 5*sharedTimeout {
		t.Errorf("the fallback took %v", d)
	}
	if sc.skipUntil.Load() != now.Add(sharedBackoff).UnixNano() {
		t.Error("an unreachable Redis is asked again at once")
	}
	if ref, _ := sc.acquire(mt, now, time.UTC); ref != nil {
		t.Fatalf("second: %+v", ref)
	}
	if ref, _ := sc.acquire(mt, now, time.UTC); ref == nil || ref.limit != "rpm" {
		t.Fatalf("third of rpm 2 with Redis away: %+v", ref)
	}
}

// BenchmarkSharedAdmit is the Redis part of one limited request: the
// admission round trip (the release and charge go out in the background).
// It reports the p50 in µs.
func BenchmarkSharedAdmit(b *testing.B) {
	r := startRedis(b, "")
	base := redis.NewClient(&redis.Options{Addr: strings.TrimPrefix(strings.TrimSuffix(r.redisURL(), "/0"), "redis://")})
	defer base.Close()
	sc := newSharedCounters(base, "a")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go sc.run(ctx)
	big := 1e6
	mt := limitedToken(b, 1, tokenLimits{DailyUSD: &big, MonthlyUSD: &big, TotalUSD: &big,
		Concurrency: ptr(int64(10_000)), RPM: ptr(int64(1_000_000))})
	lats := make([]time.Duration, 0, b.N)
	for b.Loop() {
		start := time.Now()
		ref, shared := sc.acquire(mt, start, time.UTC)
		lats = append(lats, time.Since(start))
		if ref != nil || !shared {
			b.Fatalf("refused: %+v", ref)
		}
		mt.ctr.release()
		sc.release(1)
	}
	slices.Sort(lats)
	b.ReportMetric(float64(lats[len(lats)/2].Microseconds()), "p50-µs")
}
