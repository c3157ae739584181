package main

import (
	"encoding/json"
	"time"
)

// The attempt trace: every try of a request, in order, kept in its log row
// (README "Request log"), so that a request that took 4 s because two
// channels failed first says so. It costs nothing on the common path: a
// request served by its first try stores an empty trace and the row stands
// for that try; only a request that tried more than once, or whose one try
// differs from the row, stores a compact JSON list in the same row, written
// in the same insert.

// maxTraceTries bounds the tries stored per row; attempts counts them all.
const maxTraceTries = 16

// tryView is one try as the admin API shows it.
type tryView struct {
	ChannelID   int64  `json:"channel_id"`
	ChannelName string `json:"channel_name"`
	KeyIndex    int    `json:"key_index"`
	Status      int    `json:"status"`
	DurationMS  int64  `json:"duration_ms"`
	Error       string `json:"error"`
	// Cooled is what the failure cooled: "channel", "key", "model", or ""
	// for nothing (an answer, the client's own error, count_tokens on a
	// channel without it, an admin's test).
	Cooled string `json:"cooled"`
}

// encodeTrace returns the stored form of x's tries for a row with status
// and duration: "" when the row itself says all there is.
func encodeTrace(tries []try, status int, start time.Time, dur time.Duration) string {
	if len(tries) == 1 && tries[0].status == status && tries[0].err == "" {
		return ""
	}
	// [channel_id, key_index, status, duration_ms, cooled, error, channel_name]
	rows := make([][]any, 0, min(len(tries), maxTraceTries))
	for i, t := range tries {
		if i == maxTraceTries {
			break
		}
		d := t.dur
		if i == len(tries)-1 && t.err == "" {
			d = start.Add(dur).Sub(t.start) // the answer's try lasts until the request ends
		}
		rows = append(rows, []any{t.entry.ch.ID, t.key, t.status, d.Milliseconds(), cooledName(t.cooled),
			truncate(t.err, 200), t.entry.ch.Name})
	}
	b, _ := json.Marshal(rows)
	return string(b)
}

func cooledName(s scope) string {
	switch s {
	case scopeChannel, scopeKey, scopeModel:
		return s.String()
	}
	return ""
}

// decodeTrace reads a stored trace back; an empty one is the row's only try.
func decodeTrace(stored string, row *logEntry) []tryView {
	if stored == "" {
		if row.Attempts == 0 {
			return []tryView{}
		}
		return []tryView{{ChannelID: row.ChannelID, ChannelName: row.ChannelName, KeyIndex: row.KeyIndex,
			Status: row.Status, DurationMS: row.DurationMS}}
	}
	var rows [][]json.RawMessage
	if err := json.Unmarshal([]byte(stored), &rows); err != nil {
		return []tryView{}
	}
	out := make([]tryView, 0, len(rows))
	for _, r := range rows {
		if len(r) < 7 {
			continue
		}
		var v tryView
		json.Unmarshal(r[0], &v.ChannelID)
		json.Unmarshal(r[1], &v.KeyIndex)
		json.Unmarshal(r[2], &v.Status)
		json.Unmarshal(r[3], &v.DurationMS)
		json.Unmarshal(r[4], &v.Cooled)
		json.Unmarshal(r[5], &v.Error)
		json.Unmarshal(r[6], &v.ChannelName)
		out = append(out, v)
	}
	return out
}
