package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Token counters shared by several replicas (README "Several replicas").
// With REDIS_URL set, a managed token with limits is admitted by one Lua
// script in Redis that checks its spend, takes an rpm slot in a sliding
// one-minute window and a concurrency slot, all in one step, so that a
// limit holds across replicas exactly. Spend is added with INCRBY and slots
// are given back by a small queue drained in the background: the only
// Redis wait on the request path is the one admission round trip, bounded
// by sharedTimeout. The local counters (tokenCounters) keep counting this
// replica's own requests all along; while Redis is away they decide alone,
// so a limit can be exceeded by at most one local limit per replica.

const (
	// sharedTimeout bounds the admission round trip; slower, the request
	// is admitted by the local counters.
	sharedTimeout = 50 * time.Millisecond
	// sharedBackoff is how long, after Redis failed to answer, admission
	// stays local without asking, so an outage costs one timeout a second
	// rather than one per request.
	sharedBackoff = time.Second
	// concTTL is the concurrency key's safety: slots a crashed replica
	// held are forgotten this long after the token's last admission or
	// release.
	concTTL = 15 * time.Minute
	// sharedQueue bounds the charges and releases waiting to be sent.
	sharedQueue = 4096
	// exactRPM is the largest rpm limit counted in an exact sliding window
	// (one sorted-set member per request of the last minute, so at most
	// this many per token); a larger limit is counted per clock minute in
	// one integer, which may admit up to twice the limit across a minute's
	// edge.
	exactRPM = 10_000
)

// admitScript admits one request of a token. KEYS: spent today, this
// month, in total, the rpm window (a sorted set of admission times), the
// concurrency count, the count of this clock minute (for an rpm limit
// above exactRPM). ARGV: the three spend limits, the three local spends
// (a floor: this replica's own history counts even if Redis lost its
// data), the rpm limit, the concurrency limit (-1: none), a member name
// unique to this admission, the concurrency TTL. It returns {0, now ms} on
// admission, else {reason, value}: 1-3 a spend limit and the spend, 4 the
// rpm limit and when a slot frees (ms), 5 the concurrency limit.
var admitScript = redis.NewScript(`
for i = 1, 3 do
  local lim = tonumber(ARGV[i])
  if lim >= 0 then
    local v = math.max(tonumber(redis.call('GET', KEYS[i]) or '0'), tonumber(ARGV[3 + i]))
    if v >= lim then return {i, v} end
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm = tonumber(ARGV[7])
local exact = rpm <= tonumber(ARGV[11])
if rpm >= 0 and not exact then
  if tonumber(redis.call('GET', KEYS[6]) or '0') >= rpm then
    return {4, (math.floor(now / 60000) + 1) * 60000}
  end
elseif rpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - 60000)
  local n = redis.call('ZCARD', KEYS[4])
  if n >= rpm then
    local first = redis.call('ZRANGE', KEYS[4], n - rpm, n - rpm, 'WITHSCORES')
    return {4, tonumber(first[2]) + 60000}
  end
end
local conc = tonumber(ARGV[8])
if conc >= 0 then
  if tonumber(redis.call('GET', KEYS[5]) or '0') >= conc then return {5, conc} end
  redis.call('INCR', KEYS[5])
  redis.call('EXPIRE', KEYS[5], ARGV[10])
end
if rpm >= 0 and not exact then
  redis.call('INCR', KEYS[6])
  redis.call('PEXPIRE', KEYS[6], 120000)
elseif rpm >= 0 then
  redis.call('ZADD', KEYS[4], now, ARGV[9])
  redis.call('PEXPIRE', KEYS[4], 61000)
end
return {0, now}
`)

// releaseScript gives a concurrency slot back, never below zero (the key
// may have expired or Redis restarted empty meanwhile).
var releaseScript = redis.NewScript(`
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then
  redis.call('DECR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 0
`)

// counterOp is a charge (pico > 0), a slot release, or both, queued for
// Redis.
type counterOp struct {
	id         int64
	day, month int
	pico       int64
	release    bool
}

// sharedCounters is the Redis side of the token counters.
type sharedCounters struct {
	client  *redis.Client
	replica string
	seq     atomic.Uint64 // makes rpm members unique
	// skipUntil (UnixNano) is when admission asks Redis again after a
	// failure; down reports the outage once.
	skipUntil atomic.Int64
	down      atomic.Bool
	out       chan counterOp
	dropped   atomic.Int64 // charges and releases lost (queue full or Redis away)
}

// newSharedCounters makes the counters' own client from the mirror's
// options: a pool sized for the hot path, and timeouts that fit
// sharedTimeout rather than the mirror's patient ones.
func newSharedCounters(base *redis.Client, replica string) *sharedCounters {
	o := *base.Options()
	o.PoolSize = 32
	o.PoolTimeout = sharedTimeout
	o.DialTimeout = 200 * time.Millisecond
	o.ReadTimeout, o.WriteTimeout = 100*time.Millisecond, 100*time.Millisecond
	o.ContextTimeoutEnabled = true
	o.MaxRetries = -1
	return &sharedCounters{client: redis.NewClient(&o), replica: replica, out: make(chan counterOp, sharedQueue)}
}

func tokenKey(id int64, what string) string {
	return "ccload:tok:" + strconv.FormatInt(id, 10) + ":" + what
}

// limited reports whether mt has a limit the counters enforce.
func (mt *managedToken) limited() bool {
	return mt.daily >= 0 || mt.monthly >= 0 || mt.total >= 0 || mt.rpm >= 0 || mt.concurrency >= 0
}

// acquire admits one request of mt: through Redis when it answers in
// time, else by the local counters alone. shared reports a concurrency
// slot taken in Redis, which release must give back.
func (sc *sharedCounters) acquire(mt *managedToken, now time.Time, loc *time.Location) (ref *refusal, shared bool) {
	if !mt.limited() || now.UnixNano() < sc.skipUntil.Load() {
		return mt.acquire(now, loc), false
	}
	c := mt.ctr
	day, month := periodKeys(now, loc)
	c.mu.Lock()
	c.roll(day, month)
	localDay, localMonth, localTotal := c.spentDay, c.spentMonth, c.spentTotal
	c.mu.Unlock()
	id := mt.rec.ID
	ctx, cancel := context.WithTimeout(context.Background(), sharedTimeout)
	defer cancel()
	res, err := admitScript.Run(ctx, sc.client,
		[]string{tokenKey(id, "d:"+strconv.Itoa(day)), tokenKey(id, "m:"+strconv.Itoa(month)), tokenKey(id, "t"),
			tokenKey(id, "rpm"), tokenKey(id, "conc"), tokenKey(id, "rpm:"+strconv.FormatInt(now.Unix()/60, 10))},
		mt.daily, mt.monthly, mt.total, localDay, localMonth, localTotal, mt.rpm, mt.concurrency,
		sc.replica+":"+strconv.FormatUint(sc.seq.Add(1), 10), int64(concTTL/time.Second), exactRPM).Int64Slice()
	if err != nil || len(res) != 2 {
		sc.away(now, err)
		return mt.acquire(now, loc), false
	}
	if sc.down.CompareAndSwap(true, false) {
		slog.Info("shared token counters: Redis answers again; limits are shared")
	}
	if res[0] != 0 {
		return sharedRefusal(mt, res[0], res[1], now, loc), false
	}
	mt.note(now)
	return nil, mt.concurrency >= 0
}

// away records that Redis did not answer: admission stays local for
// sharedBackoff.
func (sc *sharedCounters) away(now time.Time, err error) {
	sc.skipUntil.Store(now.Add(sharedBackoff).UnixNano())
	if sc.down.CompareAndSwap(false, true) {
		if err == nil {
			err = errors.New("unexpected answer")
		}
		slog.Warn("shared token counters: Redis did not answer in time; each replica enforces token limits on its own until it does",
			"err", err)
	}
}

// sharedRefusal is the refusal for a reason admitScript gave, worded as
// the local counters word theirs.
func sharedRefusal(mt *managedToken, reason, v int64, now time.Time, loc *time.Location) *refusal {
	y, m, d := now.In(loc).Date()
	spend := func(name string, limit int64, reset time.Time) *refusal {
		return &refusal{limit: name, reset: reset,
			msg: fmt.Sprintf("client token %q reached its %s limit ($%s of $%s)", mt.rec.Name, name, formatUSD(v), formatUSD(limit))}
	}
	switch reason {
	case 1:
		return spend("daily_usd", mt.daily, time.Date(y, m, d+1, 0, 0, 0, 0, loc))
	case 2:
		return spend("monthly_usd", mt.monthly, time.Date(y, m+1, 1, 0, 0, 0, 0, loc))
	case 3:
		return spend("total_usd", mt.total, time.Time{})
	case 4:
		return &refusal{limit: "rpm", reset: time.UnixMilli(v),
			msg: fmt.Sprintf("client token %q reached its rpm limit (%d requests a minute)", mt.rec.Name, mt.rpm)}
	}
	return &refusal{limit: "concurrency", reset: now.Add(time.Second),
		msg: fmt.Sprintf("client token %q reached its concurrency limit (%d requests at once)", mt.rec.Name, mt.concurrency)}
}

// note counts an admission Redis granted in the local counters, unchecked:
// they count this replica's share, for the admin's view and for an outage.
func (mt *managedToken) note(now time.Time) {
	c := mt.ctr
	c.mu.Lock()
	defer c.mu.Unlock()
	c.inFlight++
	if mt.rpm >= 0 {
		ns := now.UnixNano()
		cut := ns - int64(time.Minute)
		i := 0
		for i < len(c.recent) && c.recent[i] <= cut {
			i++
		}
		c.recent = append(c.recent[i:], ns)
	}
	c.lastUsed = now.UnixMilli()
}

// release queues the return of a slot taken in Redis.
func (sc *sharedCounters) release(id int64) {
	sc.send(counterOp{id: id, release: true})
}

// charge queues a finished request's cost for the shared spend.
func (sc *sharedCounters) charge(id int64, start time.Time, loc *time.Location, pico int64) {
	if pico <= 0 {
		return
	}
	day, month := periodKeys(start, loc)
	sc.send(counterOp{id: id, day: day, month: month, pico: pico})
}

// settle is release and charge in one message, so a finished request
// costs one write to Redis rather than two.
func (sc *sharedCounters) settle(id int64, start time.Time, loc *time.Location, pico int64) {
	day, month := periodKeys(start, loc)
	sc.send(counterOp{id: id, day: day, month: month, pico: max(pico, 0), release: true})
}

// send never blocks: a full queue drops and counts. A dropped release is
// undone by concTTL; a dropped charge is still in the local counters.
func (sc *sharedCounters) send(op counterOp) {
	select {
	case sc.out <- op:
	default:
		sc.dropped.Add(1)
	}
}

// run sends queued charges and releases, batched in one pipeline, until
// ctx ends; then it closes the client.
func (sc *sharedCounters) run(ctx context.Context) {
	defer sc.client.Close()
	batch := make([]counterOp, 0, 128)
	for {
		select {
		case <-ctx.Done():
			return
		case op := <-sc.out:
			batch = append(batch[:0], op)
		}
	fill:
		for len(batch) < cap(batch) {
			select {
			case op := <-sc.out:
				batch = append(batch, op)
			default:
				break fill
			}
		}
		sc.flush(ctx, batch)
	}
}

func (sc *sharedCounters) flush(ctx context.Context, batch []counterOp) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	pipe := sc.client.Pipeline()
	for _, op := range batch {
		if op.release {
			// Eval, not Run: in a pipeline a NOSCRIPT answer comes too late
			// for Run's fallback, and the script is short.
			releaseScript.Eval(ctx, pipe, []string{tokenKey(op.id, "conc")}, int64(concTTL/time.Second))
		}
		if op.pico <= 0 {
			continue
		}
		d, m := tokenKey(op.id, "d:"+strconv.Itoa(op.day)), tokenKey(op.id, "m:"+strconv.Itoa(op.month))
		pipe.IncrBy(ctx, d, op.pico)
		pipe.Expire(ctx, d, 3*24*time.Hour)
		pipe.IncrBy(ctx, m, op.pico)
		pipe.Expire(ctx, m, 33*24*time.Hour)
		pipe.IncrBy(ctx, tokenKey(op.id, "t"), op.pico)
	}
	if _, err := pipe.Exec(ctx); err != nil {
		sc.dropped.Add(int64(len(batch)))
	}
}
