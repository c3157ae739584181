package main

import (
	"encoding/json"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Channels: the stored type and the one place that validates and
// normalises channel input, whoever sends it (the admin API, a CSV import,
// a Redis backup).

// Channel is an upstream the user bought access to, as stored. It holds the
// full keys; admin responses go through channelView, which masks them.
type Channel struct {
	ID             int64             `json:"id"`
	Name           string            `json:"name"`
	URL            string            `json:"url"`
	APIKeys        []string          `json:"api_keys"`
	Type           string            `json:"channel_type"`
	Priority       int               `json:"priority"`
	Models         []string          `json:"models"`
	ModelRedirects map[string]string `json:"model_redirects"`
	KeyStrategy    string            `json:"key_strategy"`
	Enabled        bool              `json:"enabled"`
	CreatedAt      time.Time         `json:"created_at"`
	UpdatedAt      time.Time         `json:"updated_at"`
}

// validateStored checks a channel from a backup the way the admin API
// checks a new one, so that a hand-edited backup cannot store what the API
// would refuse.
func validateStored(c Channel) (Channel, error) {
	fields := map[string]any{"name": c.Name, "url": c.URL, "api_keys": c.APIKeys, "channel_type": c.Type,
		"priority": c.Priority, "models": c.Models, "model_redirects": c.ModelRedirects,
		"key_strategy": c.KeyStrategy, "enabled": c.Enabled}
	in := make(map[string]json.RawMessage, len(fields))
	for k, v := range fields {
		in[k], _ = json.Marshal(v)
	}
	out := Channel{ID: c.ID}
	err := applyChannelInput(&out, in, true)
	return out, err
}

// maskKey shows enough of a key to recognise it and not enough to use it.
func maskKey(k string) string {
	n := len(k)
	switch {
	case n >= 12:
		return k[:4] + "…" + k[n-3:]
	case n >= 6:
		return "…" + k[n-2:]
	}
	return "…"
}

// Known input fields of a channel. Output-only fields are accepted and
// ignored, so a client may send back what it read.
var (
	channelInputFields = []string{"name", "url", "api_key", "api_keys", "channel_type", "priority", "models",
		"model_redirects", "key_strategy", "enabled"}
	channelOutputFields = []string{"id", "key_count", "state", "created_at", "updated_at"}
)

const (
	keySequential = "sequential"
	keyRoundRobin = "round_robin"
)

// applyChannelInput sets the fields present in in on c, validating each.
// When creating, name, url and a key are required.
func applyChannelInput(c *Channel, in map[string]json.RawMessage, create bool) error {
	for k := range in {
		if !slices.Contains(channelInputFields, k) && !slices.Contains(channelOutputFields, k) {
			return badRequest("unknown field %q (known: %s)", k, strings.Join(channelInputFields, ", "))
		}
	}
	str := func(field string) (string, bool, error) {
		raw, ok := in[field]
		if !ok || string(raw) == "null" {
			return "", false, nil
		}
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", true, badRequest("%s must be a string", field)
		}
		return s, true, nil
	}
	if s, ok, err := str("name"); err != nil {
		return err
	} else if ok || create {
		s = strings.TrimSpace(s)
		if s == "" {
			return badRequest("name is required")
		}
		if utf8.RuneCountInString(s) > 100 {
			return badRequest("name is longer than 100 characters")
		}
		// A NUL ends SQLite's NOCASE comparison, so such names would clash
		// in the UNIQUE index; line breaks and the like only garble tables.
		if strings.ContainsFunc(s, unicode.IsControl) {
			return badRequest("name must not contain control characters (line breaks, tabs, NUL…)")
		}
		c.Name = s
	}
	if s, ok, err := str("url"); err != nil {
		return err
	} else if ok || create {
		u, err := normalizeURL(s)
		if err != nil {
			return err
		}
		c.URL = u
	}
	keys, keysGiven, err := keysInput(in)
	if err != nil {
		return err
	}
	if keysGiven {
		if keys, err = unmaskKeys(keys, c.APIKeys); err != nil {
			return err
		}
		c.APIKeys = keys
	}
	if len(c.APIKeys) == 0 {
		return badRequest("api_key is required: give one or more keys (a list, or separated by commas or newlines)")
	}
	if s, ok, err := str("channel_type"); err != nil {
		return err
	} else if ok || c.Type == "" {
		p, err := parseChannelType(s)
		if err != nil {
			return badRequest("%v", err)
		}
		c.Type = p.String()
	}
	if raw, ok := in["priority"]; ok && string(raw) != "null" {
		p, err := intInput(raw)
		if err != nil {
			return badRequest("priority must be an integer")
		}
		c.Priority = p
	}
	if raw, ok := in["models"]; ok {
		m, err := listInput(raw)
		if err != nil {
			return badRequest("models must be a list of names or a comma-separated string")
		}
		c.Models = m
	}
	if raw, ok := in["model_redirects"]; ok {
		m, err := redirectsInput(raw)
		if err != nil {
			return err
		}
		c.ModelRedirects = m
	}
	if s, ok, err := str("key_strategy"); err != nil {
		return err
	} else if ok || c.KeyStrategy == "" {
		ks, err := parseKeyStrategy(s)
		if err != nil {
			return err
		}
		c.KeyStrategy = ks
	}
	if raw, ok := in["enabled"]; ok && string(raw) != "null" {
		b, err := boolInput(raw)
		if err != nil {
			return badRequest("enabled must be true or false")
		}
		c.Enabled = b
	}
	return nil
}

func normalizeURL(s string) (string, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return "", badRequest("url is required, e.g. https://api.anthropic.com")
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", badRequest("url %q must be an absolute http(s) URL, e.g. https://api.anthropic.com", s)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return "", badRequest("url %q must not have a query or fragment", s)
	}
	u.Path = strings.TrimRight(u.Path, "/")
	u.RawPath = ""
	return u.String(), nil
}

func parseKeyStrategy(s string) (string, error) {
	switch strings.ToLower(strings.NewReplacer("-", "_", " ", "_").Replace(strings.TrimSpace(s))) {
	case "", keySequential:
		return keySequential, nil
	case keyRoundRobin, "roundrobin", "rr":
		return keyRoundRobin, nil
	}
	return "", badRequest("key_strategy %q: want sequential or round_robin", s)
}

// keysInput reads api_keys (list or string) and api_key (string); both may
// hold several keys separated by commas or newlines.
func keysInput(in map[string]json.RawMessage) ([]string, bool, error) {
	var keys []string
	given := false
	for _, field := range []string{"api_keys", "api_key"} {
		raw, ok := in[field]
		if !ok || string(raw) == "null" {
			continue
		}
		given = true
		l, err := listInput(raw)
		if err != nil {
			return nil, true, badRequest("%s must be a string or a list of strings", field)
		}
		keys = append(keys, l...)
	}
	return dedupe(keys), given, nil
}

// unmaskKeys lets a client send back the masked keys it was shown: each
// masked entry stands for the stored key it masks. Two keys can share a
// mask, so the key at the same position is preferred, and no stored key
// stands in twice.
func unmaskKeys(keys, stored []string) ([]string, error) {
	out := make([]string, 0, len(keys))
	used := make([]bool, len(stored))
	for i, k := range keys {
		if !strings.Contains(k, "…") {
			out = append(out, k)
			continue
		}
		match := -1
		if i < len(stored) && !used[i] && maskKey(stored[i]) == k {
			match = i
		}
		for j := 0; match < 0 && j < len(stored); j++ {
			if !used[j] && maskKey(stored[j]) == k {
				match = j
			}
		}
		if match < 0 {
			return nil, badRequest("api_keys[%d] %q is a masked key that matches no stored key: send the full key", i, k)
		}
		used[match] = true
		out = append(out, stored[match])
	}
	return dedupe(out), nil
}

// listInput accepts a JSON list of strings or one string of items separated
// by commas, semicolons or newlines.
func listInput(raw json.RawMessage) ([]string, error) {
	var l []string
	if err := json.Unmarshal(raw, &l); err != nil {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, err
		}
		l = splitList(s)
	}
	out := make([]string, 0, len(l))
	for _, v := range l {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return dedupe(out), nil
}

func splitList(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ';' || r == '\n' || r == '\r' })
}

func dedupe(l []string) []string {
	out := l[:0:0]
	for _, v := range l {
		if !slices.Contains(out, v) {
			out = append(out, v)
		}
	}
	return out
}

func redirectsInput(raw json.RawMessage) (map[string]string, error) {
	if string(raw) == "null" {
		return map[string]string{}, nil
	}
	var m map[string]string
	if err := json.Unmarshal(raw, &m); err != nil {
		// A JSON object in a string, as forms and CSV cells send it.
		var s string
		if json.Unmarshal(raw, &s) != nil || (strings.TrimSpace(s) != "" && json.Unmarshal([]byte(s), &m) != nil) {
			return nil, badRequest(`model_redirects must be an object like {"asked-model": "upstream-model"}`)
		}
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if k == "" || v == "" {
			return nil, badRequest("model_redirects: empty model name in %q → %q", k, v)
		}
		out[k] = v
	}
	return out, nil
}

func intInput(raw json.RawMessage) (int, error) {
	var n int
	if err := json.Unmarshal(raw, &n); err == nil {
		return n, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(s))
}

func boolInput(raw json.RawMessage) (bool, error) {
	var b bool
	if err := json.Unmarshal(raw, &b); err == nil {
		return b, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return false, err
	}
	return parseBool(s)
}

// parseBool accepts the spellings people use in forms and spreadsheets.
func parseBool(s string) (bool, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "true", "1", "yes", "y", "on", "enabled", "enable", "启用", "是":
		return true, nil
	case "false", "0", "no", "n", "off", "disabled", "disable", "禁用", "否":
		return false, nil
	}
	return false, fmt.Errorf("%q is not a boolean", s)
}
