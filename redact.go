package main

import (
	"bytes"
	"strings"
)

// Upstreams sometimes echo the request back in an error ("invalid key
// sk-…", or every header in a debug dump). What ccload reads of an
// upstream's answer (error bodies, the channel test's answer, the messages
// it stores in the log) has every key of the channel and the client's own
// token masked first, so that no answer, log row or admin view holds a
// full secret. Relayed success bodies are not read this way: they stream
// through untouched, and the hot path copies nothing.

// maxEchoBody is the largest answer to the client's own error (a 4xx)
// that is read whole to mask echoed secrets before it is relayed.
const maxEchoBody = 4 << 20

// minRedact is the shortest secret masked: shorter strings would mask
// ordinary words, and no real API key is that short.
const minRedact = 8

// redactBytes returns b with every secret replaced by its mask (maskKey),
// and whether it changed anything. It returns b itself, without copying,
// when no secret occurs.
func redactBytes(b []byte, keys []string, token string) ([]byte, bool) {
	hit := token != "" && len(token) >= minRedact && bytes.Contains(b, []byte(token))
	for _, k := range keys {
		if hit {
			break
		}
		hit = len(k) >= minRedact && bytes.Contains(b, []byte(k))
	}
	if !hit {
		return b, false
	}
	return []byte(redactString(string(b), keys, token)), true
}

// redactString is redactBytes for a string.
func redactString(s string, keys []string, token string) string {
	if len(s) < minRedact {
		return s
	}
	// Not range append(keys, token): keys is the channel's own slice,
	// shared by every request, and an append into its spare capacity
	// would race with the others'.
	mask := func(k string) {
		if len(k) >= minRedact && strings.Contains(s, k) {
			s = strings.ReplaceAll(s, k, maskKey(k))
		}
	}
	for _, k := range keys {
		mask(k)
	}
	mask(token)
	return s
}

// redact masks the secrets of exchange x at channel e in b.
func (x *exchange) redact(e *channelEntry, b []byte) ([]byte, bool) {
	return redactBytes(b, e.ch.APIKeys, x.secret)
}

func (x *exchange) redactText(e *channelEntry, s string) string {
	return redactString(s, e.ch.APIKeys, x.secret)
}
