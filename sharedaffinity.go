package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"hash/fnv"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Session bindings shared by several replicas (README "Several replicas").
// A binding made or moved on one replica goes out from a background
// goroutine: SET ccload:aff:<scope> with the binding's TTL, and a pub/sub
// notice that every other replica applies to its own table. The hot path
// never waits: route reads the local table only; on a miss it queues a
// fetch of the key, so that a replica that missed the notice (it started
// later, or the connection dropped) serves the conversation's next turn
// from the binding. A turn served with the binding unchanged (a hit) is
// not sent: the other replicas' copies then expire one TTL after the
// last change they heard of.

const (
	affinityNotify = "ccload:affinity"
	affinityPrefix = "ccload:aff:"
)

// bindMsg is one binding on the wire; Fetch asks for one instead.
type bindMsg struct {
	Replica  string `json:"r"`
	Scope    uint64 `json:"s"`
	Channel  int64  `json:"c"`
	KeyIndex int    `json:"k"`
	fetch    bool
}

// sharedBindings is the Redis side of one replica's affinity table.
type sharedBindings struct {
	client  *redis.Client
	replica string
	ttl     time.Duration
	out     chan bindMsg
	dropped atomic.Int64 // bindings not shared: queue full or Redis away
	now     func() time.Time
}

func newSharedBindings(client *redis.Client, replica string, ttl time.Duration) *sharedBindings {
	return &sharedBindings{client: client, replica: replica, ttl: ttl, out: make(chan bindMsg, 4096), now: time.Now}
}

// stableScope is the binding key every replica computes alike (the local
// table's maphash seed is per process).
func stableScope(sc sessionScope) uint64 {
	h := fnv.New64a()
	h.Write([]byte(sc.token))
	h.Write([]byte{0, byte(sc.proto)})
	h.Write([]byte(sc.model))
	var b [9]byte
	binary.LittleEndian.PutUint64(b[1:], sc.session)
	h.Write(b[:])
	return h.Sum64() | 1
}

func affinityKey(scope uint64) string {
	return affinityPrefix + strconv.FormatUint(scope, 16)
}

// share queues a binding for the other replicas; never blocks.
func (sb *sharedBindings) share(scope uint64, channel int64, keyIndex int) {
	sb.send(bindMsg{Replica: sb.replica, Scope: scope, Channel: channel, KeyIndex: keyIndex})
}

// fetch queues a look-up of a binding this replica does not have.
func (sb *sharedBindings) fetch(scope uint64) {
	sb.send(bindMsg{Scope: scope, fetch: true})
}

func (sb *sharedBindings) send(m bindMsg) {
	select {
	case sb.out <- m:
	default:
		sb.dropped.Add(1)
	}
}

// run sends queued bindings and answers fetches into t, and applies the
// other replicas' notices to t, until ctx ends.
func (sb *sharedBindings) run(ctx context.Context, t *bindings) {
	listened := make(chan struct{})
	go func() { sb.listen(ctx, t); close(listened) }()
	defer func() { <-listened }()
	for {
		var m bindMsg
		select {
		case <-ctx.Done():
			return
		case m = <-sb.out:
		}
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		if m.fetch {
			v, err := sb.client.Get(rctx, affinityKey(m.Scope)).Result()
			var got bindMsg
			if err == nil && json.Unmarshal([]byte(v), &got) == nil {
				t.bind(m.Scope, got.Channel, got.KeyIndex, sb.now().UnixNano())
			}
		} else {
			b, _ := json.Marshal(m)
			pipe := sb.client.Pipeline()
			pipe.Set(rctx, affinityKey(m.Scope), b, sb.ttl)
			pipe.Publish(rctx, affinityNotify, b)
			if _, err := pipe.Exec(rctx); err != nil {
				sb.dropped.Add(1)
			}
		}
		cancel()
	}
}

// listen applies other replicas' bindings, subscribing again whenever the
// connection ends, until ctx ends.
func (sb *sharedBindings) listen(ctx context.Context, t *bindings) {
	for ctx.Err() == nil {
		ps := sb.client.Subscribe(ctx, affinityNotify)
		stop := context.AfterFunc(ctx, func() { ps.Close() })
		for msg := range ps.Channel(redis.WithChannelHealthCheckInterval(time.Second)) {
			var m bindMsg
			if json.Unmarshal([]byte(msg.Payload), &m) != nil || m.Replica == sb.replica || m.Scope == 0 {
				continue
			}
			t.bind(m.Scope, m.Channel, m.KeyIndex, sb.now().UnixNano())
		}
		stop()
		ps.Close()
		select {
		case <-ctx.Done():
		case <-time.After(pollEvery):
		}
	}
}
