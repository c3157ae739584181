package main

import (
	"bytes"
	"encoding/json"
	"strconv"
	"strings"
)

// This file is the reference for usage.absorb: what one JSON document
// reports, read with encoding/json. FuzzUsageAbsorb compares the two on every
// valid document. The rules, from the protocols as absorb's comments give
// them:
//
//   - Only a top-level object reports usage. Its members are read in
//     document order: "usage" (Anthropic, OpenAI chat), "message" and
//     "response" (a "usage" member inside: Anthropic's message_start, the
//     Responses API) and "usageMetadata" (Gemini). Each usage object found
//     is one report, applied to the running counts in turn: later figures
//     replace earlier ones, within a document as across a stream's events.
//   - Member names match as written: a name spelled with escapes matches
//     nothing. No upstream escapes its member names, and the scanner does
//     not decode them.
//   - A count is a JSON integer written as 1 to 18 digits: no sign, fraction
//     or exponent (the APIs write none, and 18 digits cannot overflow).
//     Anything else is no figure.
//   - Inside one report a member named twice means its last occurrence, as
//     encoding/json reads an object.
//   - Anthropic and OpenAI reports: a figure of zero or less is no figure and
//     leaves the earlier one (a message_delta saying "input_tokens": 0 does
//     not erase message_start's count). Anthropic's input_tokens excludes
//     cache reads (cache_read_input_tokens) and writes
//     (cache_creation_input_tokens). OpenAI's prompt_tokens (chat) and
//     input_tokens with input_tokens_details (Responses) include the cached
//     tokens, the cached_tokens of the last *_tokens_details member;
//     logged input is the uncached part, so the columns add up alike for
//     every protocol. prompt_tokens wins over input_tokens,
//     completion_tokens over output_tokens, cached_tokens over
//     cache_read_input_tokens.
//   - Gemini reports (usageMetadata, an object) carry running totals: every
//     figure replaces, zero included, and a missing count is zero. Input is
//     promptTokenCount less cachedContentTokenCount (not below zero),
//     output candidatesTokenCount plus thoughtsTokenCount.

// refMember is one member of a decoded object, in document order.
type refMember struct {
	key   string
	plain bool // the name was written without escapes
	val   any  // json.Number, string, bool, nil, []any or []refMember
}

// refDecode decodes one value, keeping objects as ordered members and
// noting which names were written with escapes.
func refDecode(dec *json.Decoder, data []byte) (any, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch tok {
	case json.Delim('{'):
		obj := []refMember{}
		for dec.More() {
			from := dec.InputOffset()
			k, err := dec.Token()
			if err != nil {
				return nil, err
			}
			// What the decoder read for the name: the separator, spaces and
			// the quoted name as written.
			written := data[from:dec.InputOffset()]
			v, err := refDecode(dec, data)
			if err != nil {
				return nil, err
			}
			obj = append(obj, refMember{key: k.(string), plain: bytes.IndexByte(written, '\\') < 0, val: v})
		}
		_, err := dec.Token()
		return obj, err
	case json.Delim('['):
		arr := []any{}
		for dec.More() {
			v, err := refDecode(dec, data)
			if err != nil {
				return nil, err
			}
			arr = append(arr, v)
		}
		_, err := dec.Token()
		return arr, err
	}
	return tok, nil
}

// refLast returns the last member of obj named name (as written), if obj is
// an object.
func refLast(obj any, name string) (any, bool) {
	members, _ := obj.([]refMember)
	for i := len(members) - 1; i >= 0; i-- {
		if m := members[i]; m.plain && m.key == name {
			return m.val, true
		}
	}
	return nil, false
}

// refCount reads member name of obj as a count: -1 when it is none.
func refCount(obj any, name string) int64 {
	v, _ := refLast(obj, name)
	n, ok := v.(json.Number)
	if !ok || len(n) > 18 || strings.ContainsAny(string(n), "-.eE") {
		return -1
	}
	c, err := strconv.ParseInt(string(n), 10, 64)
	if err != nil {
		return -1
	}
	return c
}

// refAbsorb is what absorb should make of data, a valid JSON document,
// given the counts so far.
func refAbsorb(u usage, data []byte) usage {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	doc, err := refDecode(dec, data)
	if err != nil {
		panic("refAbsorb wants valid JSON: " + err.Error())
	}
	top, _ := doc.([]refMember)
	for _, m := range top {
		if !m.plain {
			continue
		}
		switch m.key {
		case "usage":
			u = refCounts(u, m.val)
		case "usageMetadata":
			u = refGemini(u, m.val)
		case "message", "response":
			inner, _ := m.val.([]refMember)
			for _, im := range inner {
				if im.plain && im.key == "usage" {
					u = refCounts(u, im.val)
				}
			}
		}
	}
	return u
}

// refCounts applies an Anthropic or OpenAI usage object.
func refCounts(u usage, obj any) usage {
	members, ok := obj.([]refMember)
	if !ok {
		return u
	}
	input, output := refCount(obj, "input_tokens"), refCount(obj, "output_tokens")
	prompt, completion := refCount(obj, "prompt_tokens"), refCount(obj, "completion_tokens")
	cacheRead, cacheWrite := refCount(obj, "cache_read_input_tokens"), refCount(obj, "cache_creation_input_tokens")
	_, responses := refLast(obj, "input_tokens_details")
	var cached int64
	for i := len(members) - 1; i >= 0; i-- {
		if m := members[i]; m.plain && (m.key == "prompt_tokens_details" || m.key == "input_tokens_details") {
			cached = max(refCount(m.val, "cached_tokens"), 0)
			break
		}
	}
	figure := func(dst *int64, v int64) {
		if v > 0 {
			*dst = v
		}
	}
	switch {
	case prompt >= 0:
		figure(&u.Input, prompt-cached)
	case input >= 0 && responses:
		figure(&u.Input, input-cached)
	case input >= 0:
		figure(&u.Input, input)
	}
	figure(&u.Output, output)
	figure(&u.Output, completion)
	figure(&u.CacheWrite, cacheWrite)
	figure(&u.CacheRead, cacheRead)
	figure(&u.CacheRead, cached)
	return u
}

// refGemini applies a Gemini usageMetadata object.
func refGemini(u usage, obj any) usage {
	if _, ok := obj.([]refMember); !ok {
		return u
	}
	count := func(name string) int64 { return max(refCount(obj, name), 0) }
	u.Input = max(count("promptTokenCount")-count("cachedContentTokenCount"), 0)
	u.Output = count("candidatesTokenCount") + count("thoughtsTokenCount")
	u.CacheRead = count("cachedContentTokenCount")
	return u
}
