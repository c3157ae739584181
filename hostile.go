package main

import (
	"errors"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// Defences against upstreams that misbehave on purpose or by accident
// (README "Hostile upstreams"). The relay trusts no upstream's sizes: an SSE
// event is capped (sse.go, CCLOAD_MAX_EVENT), a non-stream body is capped
// here (CCLOAD_MAX_RESPONSE), response headers by the transport
// (maxResponseHeader), error bodies by maxErrorBody; and no upstream's
// words carry a channel's key onward (redact.go).

// defaultMaxResponse is the largest non-stream response body relayed.
// Bodies are relayed as they come, never held, so this bounds not memory
// but what a broken upstream (or a gzip bomb, which the transport inflates)
// can make the relay pass on: 2 GB of JSON helps no client.
const defaultMaxResponse = 256 << 20

// maxResponseHeader bounds an upstream's response headers. Real APIs send
// a few KiB; more is a broken relay, and it fails over like a dead one.
const maxResponseHeader = 1 << 20

func (c *relayConfig) maxResponse() int64 {
	if c.MaxResponse > 0 {
		return c.MaxResponse
	}
	return defaultMaxResponse
}

// errResponseTooLarge cuts a body over the cap. The client has the headers
// already, so all the relay can do is break the body off, and blame the
// channel.
var errResponseTooLarge = errors.New("response body larger than CCLOAD_MAX_RESPONSE")

// errStorageFull is a write the database refused for want of space. The
// transaction rolled back, so nothing changed; the admin hears 503 and can
// try again once space returns, which needs no restart.
var errStorageFull = errors.New("the database cannot be written: the disk is full; nothing was changed, try again once space is freed")

// storageFull reports whether err is SQLite's "database or disk is full"
// (or an I/O error writing, which is how a full disk can show in WAL mode).
func storageFull(err error) bool {
	var se *sqlite.Error
	if !errors.As(err, &se) {
		return false
	}
	return se.Code()&0xff == sqlite3.SQLITE_FULL || se.Code() == sqlite3.SQLITE_IOERR_WRITE
}
