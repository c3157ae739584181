package main

import (
	"encoding/json"
	"strings"
	"testing"
)

// Figures below are worked by hand from the table's list prices (USD per
// million tokens), in pico-dollars: $P/M is P·1e6 pico-dollars a token.

func TestCostAnthropicExact(t *testing.T) {
	b, err := compilePrices(defaultPrices())
	if err != nil {
		t.Fatal(err)
	}
	// What a Claude Code turn reports: fresh input, output, a cache write
	// split between 5-minute and 1-hour lifetimes, and a cache read.
	var u usage
	u.absorb([]byte(`{"type":"message_start","message":{"id":"m","usage":{"input_tokens":1000,
		"cache_creation_input_tokens":3000,"cache_read_input_tokens":10000,
		"cache_creation":{"ephemeral_5m_input_tokens":2000,"ephemeral_1h_input_tokens":1000},"output_tokens":1}}}`))
	u.absorb([]byte(`{"type":"message_delta","usage":{"output_tokens":500}}`))
	if u != (usage{Input: 1000, Output: 500, CacheRead: 10000, CacheWrite: 3000, CacheWrite1h: 1000}) {
		t.Fatalf("usage %+v", u)
	}
	r := b.lookup("claude-sonnet-4-5-20250929") // a dated snapshot: by prefix
	if r == nil {
		t.Fatal("claude-sonnet-4-5-20250929 has no price")
	}
	// 1000·$3 + 500·$15 + 2000·$3.75 + 1000·$6 + 10000·$0.30, per million:
	// 0.003 + 0.0075 + 0.0075 + 0.006 + 0.003 = $0.027.
	if got := r.costOf(u, 1_000_000); got != 27_000_000_000 {
		t.Errorf("cost %d pico-dollars; want 27000000000 ($0.027)", got)
	}
	// A reseller at 30% of list: $0.0081.
	if got := r.costOf(u, multiplierMillionths(0.3)); got != 8_100_000_000 {
		t.Errorf("cost at 0.3×: %d; want 8100000000 ($0.0081)", got)
	}
	// Without the split every cache write is a 5-minute one:
	// 0.003 + 0.0075 + 3000·3.75e-6 + 0.003 = $0.02475.
	u.CacheWrite1h = 0
	if got := r.costOf(u, 1_000_000); got != 24_750_000_000 {
		t.Errorf("cost without 1h writes %d; want 24750000000", got)
	}
	// Opus 4.1: 1000·15 + 500·75 + 3000·18.75 + 10000·1.5 = 123,750 µ$ = $0.12375.
	if got := b.lookup("claude-opus-4-1-20250805").costOf(u, 1_000_000); got != 123_750_000_000 {
		t.Errorf("opus 4.1 cost %d; want 123750000000", got)
	}
}

func TestCostOpenAICachedInsideInput(t *testing.T) {
	b, _ := compilePrices(defaultPrices())
	for _, doc := range []string{
		// Chat: cached tokens are part of prompt_tokens.
		`{"usage":{"prompt_tokens":10000,"completion_tokens":2000,"prompt_tokens_details":{"cached_tokens":8000}}}`,
		// Responses: part of input_tokens.
		`{"type":"response.completed","response":{"usage":{"input_tokens":10000,"output_tokens":2000,
			"input_tokens_details":{"cached_tokens":8000}}}}`,
	} {
		var u usage
		u.absorb([]byte(doc))
		// 2000 fresh·$1.25 + 8000 cached·$0.125 + 2000 out·$10, per million:
		// 0.0025 + 0.001 + 0.02 = $0.0235, the cached ones never counted twice.
		if got := b.lookup("gpt-5").costOf(u, 1_000_000); got != 23_500_000_000 {
			t.Errorf("%s: cost %d; want 23500000000 ($0.0235); usage %+v", doc, got, u)
		}
	}
}

func TestPriceLookup(t *testing.T) {
	b, _ := compilePrices(defaultPrices())
	for model, wantInput := range map[string]int64{
		"claude-opus-4-5-20251101": 5_000_000,
		"claude-opus-4-1":          15_000_000,
		"claude-opus-4-20250514":   15_000_000,
		"claude-haiku-4-5":         1_000_000,
		"gpt-5-mini-2025-08-07":    250_000,
		"gpt-5.1-codex-mini":       250_000,
		"gpt-5.1-codex-max":        1_250_000,
		"gpt-5-nano":               50_000,
	} {
		r := b.lookup(model)
		if r == nil || r.input != wantInput {
			t.Errorf("%s: rate %+v; want input %d", model, r, wantInput)
		}
	}
	for range 2 { // the second answer comes from the remembered miss
		if r := b.lookup("mystery-model"); r != nil {
			t.Errorf("mystery-model priced %+v; want none", r)
		}
	}
}

func TestCompilePricesRefusesBadTables(t *testing.T) {
	for _, tc := range []struct{ doc, want string }{
		{`{"prices":[{"input":1,"output":1,"cache_write_5m":1,"cache_write_1h":1,"cache_read":1}]}`, "model is required"},
		{`{"prices":[{"model":"m","input":1,"output":1,"cache_write_5m":1,"cache_read":1}]}`, "cache_write_1h is required"},
		{`{"prices":[{"model":"m","input":-1,"output":1,"cache_write_5m":1,"cache_write_1h":1,"cache_read":1}]}`, "input must be ≥ 0"},
		{`{"prices":[{"model":"m","input":1,"output":1,"cache_write_5m":1,"cache_write_1h":1,"cache_read":1},
			{"model":"m","input":1,"output":1,"cache_write_5m":1,"cache_write_1h":1,"cache_read":1}]}`, "listed twice"},
		{`{"as_of":"yesterday","prices":[]}`, "as_of"},
	} {
		var pt priceTable
		if err := json.Unmarshal([]byte(tc.doc), &pt); err != nil {
			t.Fatal(err)
		}
		if _, err := compilePrices(pt); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v; want %q", tc.doc, err, tc.want)
		}
	}
}

func TestPriceMultiplierInCSVAndAPI(t *testing.T) {
	e := newTestEnv(t)
	s := e.login()
	csvBody := "名称,地址,密钥,倍率\r\nresold,https://r.example.com,sk-r-1,0.3\r\nlist,https://l.example.com,sk-l-1,\r\n"
	resp, b := e.do("POST", "/admin/channels/import", csvBody, map[string]string{"Authorization": "Bearer " + s, "Content-Type": "text/csv"})
	if resp.StatusCode != 200 {
		t.Fatalf("import: %d %s", resp.StatusCode, b)
	}
	got := map[string]float64{}
	chs, _ := e.app.store.ListChannels(t.Context())
	for _, c := range chs {
		got[c.Name] = c.PriceMultiplier
	}
	if got["resold"] != 0.3 || got["list"] != 1 {
		t.Errorf("multipliers %v; want resold 0.3, list 1", got)
	}
	bad := "name,url,api_key,price_multiplier\r\nx,https://x.example.com,sk-x,cheap\r\n"
	resp, b = e.do("POST", "/admin/channels/import", bad, map[string]string{"Authorization": "Bearer " + s, "Content-Type": "text/csv"})
	if resp.StatusCode != 400 || !strings.Contains(string(b), "price_multiplier") || !strings.Contains(string(b), `"line":2`) {
		t.Errorf("a bad multiplier: %d %s; want 400 naming line 2 and the column", resp.StatusCode, b)
	}
	for _, body := range []string{`{"price_multiplier": -1}`, `{"price_multiplier": 0}`, `{"price_multiplier": "x"}`} {
		if st, b := e.admin(s, "PUT", "/admin/channels/1", body); st != 400 || !strings.Contains(string(b), "price_multiplier") {
			t.Errorf("PUT %s: %d %s; want 400", body, st, b)
		}
	}
	if st, b := e.admin(s, "PUT", "/admin/channels/1", `{"price_multiplier": 0.5}`); st != 200 || !strings.Contains(string(b), `"price_multiplier":0.5`) {
		t.Errorf("PUT 0.5: %d %s", st, b)
	}
}
