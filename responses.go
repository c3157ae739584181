package main

import (
	"bytes"
	"encoding/json"
	"strconv"
)

// What a Responses API stream (Codex) has said so far, so that a stream cut
// after content began ends with a complete response.failed: one that
// continues the stream's sequence_number and repeats the id, model and
// created_at of its response.created, with the output items finished so far
// and the usage seen. Codex and the SDKs check the sequence; a failed
// response without an id shows as None.

// maxCarriedOutput bounds the output items a stream keeps for its
// response.failed. A stream's memory must not grow with its length; past
// the bound the items are left out (the client has them from their
// response.output_item.done events anyway).
const maxCarriedOutput = 64 << 10

// responsesState is the part of a Responses stream the relay keeps.
type responsesState struct {
	seq       int64  // last sequence_number seen; -1 before any
	id        []byte // raw JSON values from response.created / in_progress
	model     []byte
	createdAt []byte
	output    [][]byte // raw items of response.output_item.done, in order
	outBytes  int
	truncated bool // output items were left out past maxCarriedOutput
}

func newResponsesState() *responsesState { return &responsesState{seq: -1} }

// observe reads one event's data: its sequence number, the response's
// identity, finished output items. It reads only what it needs, without
// decoding the document.
func (rs *responsesState) observe(data []byte) {
	var typ, resp, item []byte
	forEachMember(data, func(k, v []byte) {
		switch string(k) {
		case "type":
			typ = v
		case "sequence_number":
			if n := jsonInt(v); n >= 0 {
				rs.seq = n
			}
		case "response":
			resp = v
		case "item":
			item = v
		}
	})
	switch string(typ) {
	case `"response.created"`, `"response.in_progress"`, `"response.queued"`:
		forEachMember(resp, func(k, v []byte) {
			switch string(k) {
			case "id":
				rs.id = bytes.Clone(v)
			case "model":
				rs.model = bytes.Clone(v)
			case "created_at":
				rs.createdAt = bytes.Clone(v)
			}
		})
	case `"response.output_item.done"`:
		if len(item) == 0 || rs.truncated {
			return
		}
		if rs.outBytes+len(item) > maxCarriedOutput {
			rs.truncated = true
			return
		}
		rs.output = append(rs.output, bytes.Clone(item))
		rs.outBytes += len(item)
	}
}

// failedEvent is the response.failed that ends a broken stream.
func (rs *responsesState) failedEvent(msg string, u usage) []byte {
	var b bytes.Buffer
	orNull := func(v []byte) []byte {
		if len(v) == 0 {
			return []byte("null")
		}
		return v
	}
	m, _ := json.Marshal(msg)
	b.WriteString("event: response.failed\ndata: {\"type\":\"response.failed\"")
	if rs.seq >= 0 {
		b.WriteString(`,"sequence_number":`)
		b.WriteString(strconv.FormatInt(rs.seq+1, 10))
	}
	b.WriteString(`,"response":{"id":`)
	b.Write(orNull(rs.id))
	b.WriteString(`,"object":"response","created_at":`)
	b.Write(orNull(rs.createdAt))
	b.WriteString(`,"status":"failed","model":`)
	b.Write(orNull(rs.model))
	b.WriteString(`,"output":[`)
	b.Write(bytes.Join(rs.output, []byte{','}))
	b.WriteString(`],"usage":`)
	if u == (usage{}) {
		b.WriteString("null")
	} else {
		// Responses counts cached tokens inside input_tokens.
		in := u.Input + u.CacheRead
		b.WriteString(`{"input_tokens":` + strconv.FormatInt(in, 10) +
			`,"input_tokens_details":{"cached_tokens":` + strconv.FormatInt(u.CacheRead, 10) + `}` +
			`,"output_tokens":` + strconv.FormatInt(u.Output, 10) +
			`,"total_tokens":` + strconv.FormatInt(in+u.Output, 10) + `}`)
	}
	b.WriteString(`,"incomplete_details":null,"error":{"code":"server_error","message":`)
	b.Write(m)
	b.WriteString("}}}\n\n")
	return b.Bytes()
}
