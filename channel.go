package main

import (
	"encoding/json"
	"errors"
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
	// PriceMultiplier scales list prices for this channel's cost: a
	// reseller selling at 30% of list is 0.3. 0 (unset) means 1.
	PriceMultiplier float64   `json:"price_multiplier"`
	CreatedAt       time.Time `json:"created_at"`
	UpdatedAt       time.Time `json:"updated_at"`
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

// errInvalid marks a request the user must change: bad or missing input.
// The admin API answers it with 400 and the message, and nothing changes.
var errInvalid = errors.New("invalid input")

// invalidError is a message about the user's input; it Is errInvalid.
type invalidError struct{ msg string }

func (e *invalidError) Error() string        { return e.msg }
func (e *invalidError) Is(target error) bool { return target == errInvalid }

// invalid is an errInvalid with a message for the user.
func invalid(format string, a ...any) error {
	return &invalidError{fmt.Sprintf(format, a...)}
}

const (
	keySequential = "sequential"
	keyRoundRobin = "round_robin"
)

// channelField is one input field of a channel: set reads its JSON value
// onto the channel, validated and normalised.
type channelField struct {
	name string
	set  func(c *Channel, raw json.RawMessage) error
}

// channelFields are a channel's input fields, in the order they are applied
// and their problems reported. api_key is another spelling of api_keys.
var channelFields = []channelField{
	{"name", (*Channel).setName},
	{"url", (*Channel).setURL},
	{"api_keys", nil}, // with api_key: see keysInput and setKeys
	{"channel_type", (*Channel).setType},
	{"priority", (*Channel).setPriority},
	{"models", (*Channel).setModels},
	{"model_redirects", (*Channel).setRedirects},
	{"key_strategy", (*Channel).setKeyStrategy},
	{"enabled", (*Channel).setEnabled},
	{"price_multiplier", (*Channel).setPriceMultiplier},
}

// channelOutputFields are accepted on input and ignored, so a client may
// send back what it read.
var channelOutputFields = []string{"id", "key_count", "state", "created_at", "updated_at"}

// apply sets the fields present in in on c, each validated; absent fields
// keep their values. It does not check that c is complete: see validate.
func (c *Channel) apply(in map[string]json.RawMessage) error {
	for k := range in {
		if k != "api_key" && !slices.ContainsFunc(channelFields, func(f channelField) bool { return f.name == k }) &&
			!slices.Contains(channelOutputFields, k) {
			names := make([]string, 0, len(channelFields)+1)
			for _, f := range channelFields {
				names = append(names, f.name)
			}
			return invalid("unknown field %q (known: api_key, %s)", k, strings.Join(names, ", "))
		}
	}
	for _, f := range channelFields {
		if f.set == nil {
			keys, given, err := keysInput(in)
			if err != nil {
				return err
			}
			if given {
				if err := c.setKeys(keys); err != nil {
					return err
				}
			}
			continue
		}
		if raw, ok := in[f.name]; ok {
			if err := f.set(c, raw); err != nil {
				return err
			}
		}
	}
	return nil
}

// applyField sets one field, as apply would; CSV import checks each cell
// alone this way, so that every bad cell of a row is reported.
func (c *Channel) applyField(name string, raw json.RawMessage) error {
	return c.apply(map[string]json.RawMessage{name: raw})
}

// validate checks what every stored channel has (a name, a URL and a key)
// and fills in the defaults of the rest.
func (c *Channel) validate() error {
	switch {
	case c.Name == "":
		return invalid("name is required")
	case c.URL == "":
		return invalid("url is required, e.g. https://api.anthropic.com")
	case len(c.APIKeys) == 0:
		return invalid("api_key is required: give one or more keys (a list, or separated by commas or newlines)")
	}
	if c.Type == "" {
		c.Type = protoAnthropic.String()
	}
	if c.KeyStrategy == "" {
		c.KeyStrategy = keySequential
	}
	if c.PriceMultiplier == 0 {
		c.PriceMultiplier = 1
	}
	return nil
}

// normalized returns c as it would be stored had it come through the
// admin API, or why it could not: a hand-edited Redis backup cannot store
// what the API would refuse.
func (c Channel) normalized() (Channel, error) {
	fields := map[string]any{"name": c.Name, "url": c.URL, "api_keys": c.APIKeys, "channel_type": c.Type,
		"priority": c.Priority, "models": c.Models, "model_redirects": c.ModelRedirects,
		"key_strategy": c.KeyStrategy, "enabled": c.Enabled, "price_multiplier": storedMultiplier(&c)}
	in := make(map[string]json.RawMessage, len(fields))
	for k, v := range fields {
		in[k], _ = json.Marshal(v)
	}
	out := Channel{ID: c.ID}
	if err := out.apply(in); err != nil {
		return out, err
	}
	return out, out.validate()
}

// stringInput reads a JSON string; null counts as absent.
func stringInput(field string, raw json.RawMessage) (string, bool, error) {
	if string(raw) == "null" {
		return "", false, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", true, invalid("%s must be a string", field)
	}
	return s, true, nil
}

func (c *Channel) setName(raw json.RawMessage) error {
	s, ok, err := stringInput("name", raw)
	if err != nil || !ok {
		return err
	}
	s = strings.TrimSpace(s)
	if s == "" {
		return invalid("name is required")
	}
	if utf8.RuneCountInString(s) > 100 {
		return invalid("name is longer than 100 characters")
	}
	// A NUL ends SQLite's NOCASE comparison, so such names would clash in
	// the UNIQUE index; line breaks and the like only garble tables.
	if strings.ContainsFunc(s, unicode.IsControl) {
		return invalid("name must not contain control characters (line breaks, tabs, NUL…)")
	}
	c.Name = s
	return nil
}

func (c *Channel) setURL(raw json.RawMessage) error {
	s, ok, err := stringInput("url", raw)
	if err != nil || !ok {
		return err
	}
	u, err := normalizeURL(s)
	if err != nil {
		return err
	}
	c.URL = u
	return nil
}

// setKeys takes the keys given (see keysInput); masked ones stand for the
// stored keys they mask.
func (c *Channel) setKeys(keys []string) error {
	keys, err := unmaskKeys(keys, c.APIKeys)
	if err != nil {
		return err
	}
	if len(keys) == 0 {
		return invalid("api_key is required: give one or more keys (a list, or separated by commas or newlines)")
	}
	c.APIKeys = keys
	return nil
}

func (c *Channel) setType(raw json.RawMessage) error {
	s, ok, err := stringInput("channel_type", raw)
	if err != nil || !ok {
		return err
	}
	p, err := parseChannelType(s)
	if err != nil {
		return invalid("%v", err)
	}
	c.Type = p.String()
	return nil
}

func (c *Channel) setPriority(raw json.RawMessage) error {
	if string(raw) == "null" {
		return nil
	}
	p, err := intInput(raw)
	if err != nil {
		return invalid("priority must be an integer")
	}
	c.Priority = p
	return nil
}

func (c *Channel) setModels(raw json.RawMessage) error {
	m, err := listInput(raw)
	if err != nil {
		return invalid("models must be a list of names or a comma-separated string")
	}
	c.Models = m
	return nil
}

func (c *Channel) setRedirects(raw json.RawMessage) error {
	m, err := redirectsInput(raw)
	if err != nil {
		return err
	}
	c.ModelRedirects = m
	return nil
}

func (c *Channel) setKeyStrategy(raw json.RawMessage) error {
	s, ok, err := stringInput("key_strategy", raw)
	if err != nil || !ok {
		return err
	}
	ks, err := parseKeyStrategy(s)
	if err != nil {
		return err
	}
	c.KeyStrategy = ks
	return nil
}

func (c *Channel) setEnabled(raw json.RawMessage) error {
	if string(raw) == "null" {
		return nil
	}
	b, err := boolInput(raw)
	if err != nil {
		return invalid("enabled must be true or false")
	}
	c.Enabled = b
	return nil
}

// setPriceMultiplier takes a number (or a numeric string, as forms and CSV
// cells send it); empty or null means list price.
func (c *Channel) setPriceMultiplier(raw json.RawMessage) error {
	if string(raw) == "null" || string(raw) == `""` {
		c.PriceMultiplier = 1
		return nil
	}
	var m float64
	if err := json.Unmarshal(raw, &m); err != nil {
		var s string
		if json.Unmarshal(raw, &s) != nil {
			return invalid("price_multiplier must be a number such as 1 or 0.3")
		}
		if m, err = strconv.ParseFloat(strings.TrimSpace(s), 64); err != nil {
			return invalid("price_multiplier %q must be a number such as 1 or 0.3", s)
		}
	}
	if !(m > 0 && m <= 100) {
		return invalid("price_multiplier must be above 0 and at most 100 (1 is list price)")
	}
	c.PriceMultiplier = m
	return nil
}

func normalizeURL(s string) (string, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return "", invalid("url is required, e.g. https://api.anthropic.com")
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", invalid("url %q must be an absolute http(s) URL, e.g. https://api.anthropic.com", s)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return "", invalid("url %q must not have a query or fragment", s)
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
	return "", invalid("key_strategy %q: want sequential or round_robin", s)
}

// keysInput reads api_keys (list or string) and api_key (string); both may
// hold several keys separated by commas or newlines. given is false when
// neither is there (null counts as absent).
func keysInput(in map[string]json.RawMessage) (keys []string, given bool, err error) {
	for _, field := range []string{"api_keys", "api_key"} {
		raw, ok := in[field]
		if !ok || string(raw) == "null" {
			continue
		}
		given = true
		l, err := listInput(raw)
		if err != nil {
			return nil, true, invalid("%s must be a string or a list of strings", field)
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
			return nil, invalid("api_keys[%d] %q is a masked key that matches no stored key: send the full key", i, k)
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

// dedupe keeps the first of each value, in order. A map, not a scan of
// what is kept: a CSV cell of half a million keys made the scan take
// minutes.
func dedupe(l []string) []string {
	out := l[:0:0]
	seen := make(map[string]struct{}, len(l))
	for _, v := range l {
		if _, dup := seen[v]; !dup {
			seen[v] = struct{}{}
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
			return nil, invalid(`model_redirects must be an object like {"asked-model": "upstream-model"}`)
		}
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if k == "" || v == "" {
			return nil, invalid("model_redirects: empty model name in %q → %q", k, v)
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
