package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/bits"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Cost: what each request cost, from its usage and the price table.
//
// Money is counted in integer pico-dollars (1e-12 USD). A price of $P per
// million tokens is P·1e6 pico-dollars per token, so any price given to a
// millionth of a dollar per million tokens is an exact integer rate, every
// request's cost is an exact integer sum, and totals never drift the way
// summed floats do. Only the API's answers turn pico-dollars into USD.

const picoPerUSD = 1_000_000_000_000

// modelPrice is one row of the price table, in USD per million tokens.
type modelPrice struct {
	Model        string   `json:"model"`
	Input        *float64 `json:"input"`
	Output       *float64 `json:"output"`
	CacheWrite5m *float64 `json:"cache_write_5m"`
	CacheWrite1h *float64 `json:"cache_write_1h"`
	CacheRead    *float64 `json:"cache_read"`
}

// priceTable is what GET|PUT /admin/prices carry.
type priceTable struct {
	AsOf   string       `json:"as_of"`
	Prices []modelPrice `json:"prices"`
}

// rate is a compiled price: pico-dollars per token.
type rate struct {
	input, output, write5m, write1h, read int64
}

// priceBook is a price table compiled for lookups. It is immutable; an
// edit builds a new one and swaps it in whole (see prices).
type priceBook struct {
	table    priceTable
	exact    map[string]*rate
	prefixes []prefixRate // longest first
	// resolved remembers each model's prefix match (or its absence), so
	// the prefix scan runs once per model name, not once per request.
	resolved sync.Map // string → *rate (nil: unpriced)
	cached   atomic.Int64
}

type prefixRate struct {
	prefix string
	r      *rate
}

// picoRate turns USD per million tokens into pico-dollars per token,
// exactly for any price with at most six decimals.
func picoRate(usdPerM float64) int64 { return int64(math.Round(usdPerM * 1e6)) }

// compilePrices checks t (every entry complete, prices ≥ 0 and not absurd,
// models unique and non-empty) and compiles it.
func compilePrices(t priceTable) (*priceBook, error) {
	b := &priceBook{table: t, exact: make(map[string]*rate, len(t.Prices))}
	if t.AsOf != "" {
		if _, err := time.Parse(time.DateOnly, t.AsOf); err != nil {
			return nil, invalid("as_of %q: want a date like 2025-11-24", t.AsOf)
		}
	}
	for i := range t.Prices {
		p := &t.Prices[i]
		p.Model = strings.TrimSpace(p.Model)
		if p.Model == "" {
			return nil, invalid("prices[%d]: model is required", i)
		}
		if _, dup := b.exact[p.Model]; dup {
			return nil, invalid("prices[%d]: model %q is listed twice", i, p.Model)
		}
		var r rate
		for _, f := range []struct {
			name string
			v    *float64
			dst  *int64
		}{
			{"input", p.Input, &r.input}, {"output", p.Output, &r.output},
			{"cache_write_5m", p.CacheWrite5m, &r.write5m}, {"cache_write_1h", p.CacheWrite1h, &r.write1h},
			{"cache_read", p.CacheRead, &r.read},
		} {
			switch {
			case f.v == nil:
				return nil, invalid("prices[%d] (%s): %s is required (0 where the vendor charges nothing)", i, p.Model, f.name)
			case *f.v < 0 || math.IsNaN(*f.v):
				return nil, invalid("prices[%d] (%s): %s must be ≥ 0", i, p.Model, f.name)
			case *f.v > 1e6:
				return nil, invalid("prices[%d] (%s): %s of $%g per million tokens is not a real price", i, p.Model, f.name, *f.v)
			}
			*f.dst = picoRate(*f.v)
		}
		b.exact[p.Model] = &r
		b.prefixes = append(b.prefixes, prefixRate{p.Model, &r})
	}
	slices.SortStableFunc(b.prefixes, func(a, c prefixRate) int { return len(c.prefix) - len(a.prefix) })
	return b, nil
}

// lookup is model's rate: its exact entry, else the longest listed prefix
// of it (a dated snapshot such as claude-sonnet-4-5-20250929); nil if none.
func (b *priceBook) lookup(model string) *rate {
	if r, ok := b.exact[model]; ok {
		return r
	}
	if v, ok := b.resolved.Load(model); ok {
		return v.(*rate)
	}
	var found *rate
	for _, p := range b.prefixes {
		if strings.HasPrefix(model, p.prefix) {
			found = p.r
			break
		}
	}
	// Bounded: a client can send any model name, so stop remembering
	// beyond a few thousand (a miss then costs one scan, no more).
	if b.cached.Add(1) < 4096 {
		b.resolved.Store(model, found)
	}
	return found
}

// costOf is what u costs at r, in pico-dollars, scaled by the channel's
// multiplier in millionths (1_000_000 = list price). u's input is the
// uncached part on every protocol (see usage.applyCounts), cache writes
// are split by lifetime, and cache reads are never counted twice.
func (r *rate) costOf(u usage, multMillionths int64) int64 {
	w1h := min(max(u.CacheWrite1h, 0), max(u.CacheWrite, 0))
	w5m := max(u.CacheWrite, 0) - w1h
	list := max(u.Input, 0)*r.input + max(u.Output, 0)*r.output + w5m*r.write5m + w1h*r.write1h +
		max(u.CacheRead, 0)*r.read
	if multMillionths == 1_000_000 || list <= 0 {
		return list
	}
	// list·mult/1e6, rounded half up, without overflowing int64 in between.
	hi, lo := bits.Mul64(uint64(list), uint64(max(multMillionths, 0)))
	lo, carry := bits.Add64(lo, 500_000, 0)
	hi += carry
	if hi >= 1_000_000 {
		return math.MaxInt64
	}
	q, _ := bits.Div64(hi, lo, 1_000_000)
	return int64(min(q, math.MaxInt64))
}

// multiplierMillionths turns a channel's price_multiplier into the
// integer costOf takes; 0 (unset) means list price.
func multiplierMillionths(m float64) int64 {
	if m <= 0 {
		return 1_000_000
	}
	return int64(math.Round(m * 1e6))
}

// usd turns pico-dollars into dollars for an API answer.
func usd(pico int64) float64 { return float64(pico) / picoPerUSD }

// prices holds the live price book.
type prices struct {
	book  atomic.Pointer[priceBook]
	store *Store
	mu    sync.Mutex // serializes edits: store write, then swap
	// onChange tells the mirror's writer the table changed (several
	// replicas, clusterkinds.go); nil: one replica.
	onChange func()
}

const pricesSetting = "prices"

// loadPrices starts from the stored table, or else the embedded one.
func loadPrices(ctx context.Context, s *Store) (*prices, error) {
	p := &prices{store: s}
	raw, err := s.Setting(ctx, pricesSetting)
	if err != nil {
		return nil, fmt.Errorf("read prices: %w", err)
	}
	t := defaultPrices()
	if raw != "" {
		if err := json.Unmarshal([]byte(raw), &t); err != nil {
			return nil, fmt.Errorf("stored prices: %w", err)
		}
	}
	b, err := compilePrices(t)
	if err != nil {
		return nil, fmt.Errorf("stored prices: %w", err)
	}
	p.book.Store(b)
	return p, nil
}

func (p *prices) current() *priceBook { return p.book.Load() }

// replace validates t, stores it and makes it live: later requests are
// priced by it, rows already logged keep the cost they were given.
func (p *prices) replace(ctx context.Context, t priceTable) (*priceBook, error) {
	b, err := compilePrices(t)
	if err != nil {
		return nil, err
	}
	raw, err := json.Marshal(b.table)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.store.SetSetting(ctx, pricesSetting, string(raw)); err != nil {
		return nil, fmt.Errorf("store prices: %w", err)
	}
	p.book.Store(b)
	if p.onChange != nil {
		p.onChange()
	}
	return b, nil
}

func (p *prices) handleGet() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		writeJSON(w, http.StatusOK, p.current().table)
		return nil
	})
}

func (p *prices) handlePut() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		var t priceTable
		if err := decodeStrict(w, r, &t); err != nil {
			return err
		}
		if t.Prices == nil {
			return invalid(`"prices" is required: a list of {"model", "input", "output", "cache_write_5m", "cache_write_1h", "cache_read"}`)
		}
		b, err := p.replace(r.Context(), t)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, b.table)
		return nil
	})
}

// defaultPrices is the embedded table, in USD per million tokens, from the
// vendors' public price pages on its as_of date. Anthropic's cache writes
// cost 1.25× input for 5 minutes and 2× for an hour, reads 0.1×; OpenAI
// bills no cache writes and cached input at a tenth of input. Long-context
// surcharges (Sonnet 4/4.5 above 200K input tokens) are not modelled: the
// rows give the standard rate. An admin edits the table at /admin/prices.
func defaultPrices() priceTable {
	p := func(model string, in, out, w5, w1, read float64) modelPrice {
		return modelPrice{Model: model, Input: &in, Output: &out, CacheWrite5m: &w5, CacheWrite1h: &w1, CacheRead: &read}
	}
	return priceTable{AsOf: "2025-11-24", Prices: []modelPrice{
		p("claude-opus-4-5", 5, 25, 6.25, 10, 0.50),
		p("claude-opus-4-1", 15, 75, 18.75, 30, 1.50),
		p("claude-opus-4", 15, 75, 18.75, 30, 1.50),
		p("claude-3-opus", 15, 75, 18.75, 30, 1.50),
		p("claude-sonnet-4-5", 3, 15, 3.75, 6, 0.30),
		p("claude-sonnet-4", 3, 15, 3.75, 6, 0.30),
		p("claude-3-7-sonnet", 3, 15, 3.75, 6, 0.30),
		p("claude-3-5-sonnet", 3, 15, 3.75, 6, 0.30),
		p("claude-haiku-4-5", 1, 5, 1.25, 2, 0.10),
		p("claude-3-5-haiku", 0.80, 4, 1, 1.6, 0.08),
		p("claude-3-haiku", 0.25, 1.25, 0.30, 0.50, 0.03),
		p("gpt-5.1", 1.25, 10, 0, 0, 0.125),
		p("gpt-5.1-codex", 1.25, 10, 0, 0, 0.125),
		p("gpt-5.1-codex-mini", 0.25, 2, 0, 0, 0.025),
		p("gpt-5", 1.25, 10, 0, 0, 0.125),
		p("gpt-5-codex", 1.25, 10, 0, 0, 0.125),
		p("gpt-5-mini", 0.25, 2, 0, 0, 0.025),
		p("gpt-5-nano", 0.05, 0.40, 0, 0, 0.005),
		p("gpt-5-pro", 15, 120, 0, 0, 15),
	}}
}

// spendSince sums the cost of the rollup hours from since.
func (s *Store) spendSince(ctx context.Context, since time.Time) (int64, error) {
	var pico int64
	err := s.rdb.QueryRowContext(ctx, `SELECT coalesce(sum(cost_pico), 0) FROM log_hourly WHERE hour >= ?`,
		hourOf(since)).Scan(&pico)
	if err != nil {
		return 0, fmt.Errorf("spend: %w", err)
	}
	return pico, nil
}

// handleSpend is the dashboard's spend today and this month, over every
// request, in CCLOAD_TZ. Rollups are by UTC hour, so in a zone whose offset
// is not whole hours the day starts at the hour its midnight falls in.
func handleSpend(s *Store, now func() time.Time) http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		local := now().In(s.TZ)
		y, m, d := local.Date()
		today, err := s.spendSince(r.Context(), time.Date(y, m, d, 0, 0, 0, 0, s.TZ))
		if err != nil {
			return err
		}
		month, err := s.spendSince(r.Context(), time.Date(y, m, 1, 0, 0, 0, 0, s.TZ))
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, map[string]any{"today_usd": usd(today), "month_usd": usd(month), "tz": s.TZ.String()})
		return nil
	})
}
