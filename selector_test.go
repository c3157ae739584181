package main

import (
	"fmt"
	"slices"
	"testing"
	"time"
)

func names(es []*channelEntry) []string {
	var out []string
	for _, e := range es {
		out = append(out, e.ch.Name)
	}
	return out
}

func testSnapshot(t *testing.T, chs ...Channel) (*snapshot, *cooldowns, *fakeClock) {
	t.Helper()
	for i := range chs {
		if chs[i].ID == 0 {
			chs[i].ID = int64(i + 1)
		}
		if chs[i].URL == "" {
			chs[i].URL = "https://up.example/" + chs[i].Name
		}
		if len(chs[i].APIKeys) == 0 {
			chs[i].APIKeys = []string{"key-" + chs[i].Name}
		}
		if chs[i].Type == "" {
			chs[i].Type = "anthropic"
		}
		chs[i].Enabled = !chs[i].Enabled // tests list disabled ones with Enabled: true
	}
	c, clk, hs := newTestCooldowns(chs...)
	s, err := buildSnapshot(chs, hs)
	if err != nil {
		t.Fatal(err)
	}
	return s, c, clk
}

func TestRoutes(t *testing.T) {
	s, _, _ := testSnapshot(t,
		Channel{Name: "any-hi", Priority: 10},
		Channel{Name: "sonnet", Priority: 10, Models: []string{"sonnet"}},
		Channel{Name: "alias", Priority: 5, ModelRedirects: map[string]string{"fast": "haiku-4-5"}},
		Channel{Name: "listed", Priority: 10, Models: []string{"sonnet-x"}, ModelRedirects: map[string]string{"fast-listed": "sonnet-x"}},
		Channel{Name: "any-lo", Priority: 0},
		Channel{Name: "off", Priority: 99, Enabled: true}, // disabled
		Channel{Name: "codex", Type: "codex", Models: []string{"gpt-5-codex"}},
		Channel{Name: "gem", Type: "gemini"},
	)
	cases := []struct {
		p     protocol
		model string
		tiers [][]string
	}{
		{protoAnthropic, "sonnet", [][]string{{"any-hi", "sonnet"}, {"alias"}, {"any-lo"}}},
		{protoAnthropic, "fast", [][]string{{"any-hi"}, {"alias"}, {"any-lo"}}},
		// alias lists no models: the redirect renames one, it serves all.
		{protoAnthropic, "unlisted", [][]string{{"any-hi"}, {"alias"}, {"any-lo"}}},
		{protoAnthropic, "fast-listed", [][]string{{"any-hi", "listed"}, {"alias"}, {"any-lo"}}},
		{protoAnthropic, "other", [][]string{{"any-hi"}, {"alias"}, {"any-lo"}}},
		{protoOpenAI, "gpt-5-codex", [][]string{{"codex"}}},
		{protoOpenAI, "gpt-4o", nil},
		{protoGemini, "gemini-2.5-pro", [][]string{{"gem"}}},
	}
	for _, tc := range cases {
		r := s.route(tc.p, tc.model)
		var got [][]string
		if r != nil {
			for _, tr := range r.tiers {
				got = append(got, names(tr.entries))
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.tiers) {
			t.Errorf("route(%s, %q) = %v; want %v", tc.p, tc.model, got, tc.tiers)
		}
	}
	if got := s.routes[protoAnthropic].models; !slices.Equal(got, []string{"fast", "fast-listed", "sonnet", "sonnet-x"}) {
		t.Errorf("listed models %v", got)
	}
	if e := s.byID[3]; e.upstreamModel("fast") != "haiku-4-5" || e.upstreamModel("x") != "x" || e.serves != nil {
		t.Error("redirect")
	}
}

func TestPlanRotatesInsideTierAndSkipsCooling(t *testing.T) {
	s, c, clk := testSnapshot(t,
		Channel{Name: "a", Priority: 1}, Channel{Name: "b", Priority: 1}, Channel{Name: "c", Priority: 1},
		Channel{Name: "low"},
	)
	r := s.route(protoAnthropic, "m")
	now := func() int64 { return clk.now().UnixNano() }
	var firsts []string
	for range 6 {
		p := r.makePlan("m", now(), nil)
		firsts = append(firsts, p.order[0].ch.Name)
		if p.order[3].ch.Name != "low" || p.lastResort != nil {
			t.Fatalf("plan %v", names(p.order))
		}
	}
	if fmt.Sprint(firsts) != "[a b c a b c]" {
		t.Errorf("first choices %v; want each in turn", firsts)
	}

	// b cools: a and c share the tier evenly, b is the last resort.
	ub := c.fail(s.byID[2].health, -1, "", verdict{scope: scopeChannel, base: time.Minute})
	counts := map[string]int{}
	for range 10 {
		p := r.makePlan("m", now(), nil)
		counts[p.order[0].ch.Name]++
		if len(p.order) != 3 || p.lastResort.ch.Name != "b" || p.lastResortUntil != ub.UnixNano() {
			t.Fatalf("plan %v last resort %v", names(p.order), p.lastResort)
		}
	}
	if counts["a"] != 5 || counts["c"] != 5 {
		t.Errorf("first choices %v; want 5 and 5", counts)
	}

	// Everything cools: no order, and the soonest to free is the last resort.
	c.fail(s.byID[1].health, -1, "", verdict{scope: scopeChannel, base: 3 * time.Minute})
	c.fail(s.byID[3].health, -1, "", verdict{scope: scopeChannel, base: 3 * time.Minute})
	c.fail(s.byID[4].health, -1, "", verdict{scope: scopeChannel, base: 30 * time.Second})
	p := r.makePlan("m", now(), nil)
	if len(p.order) != 0 || p.lastResort.ch.Name != "low" || p.total != 4 {
		t.Errorf("all cooling: order %v last resort %s", names(p.order), p.lastResort.ch.Name)
	}
	clk.advance(2 * time.Minute)
	p = r.makePlan("m", now(), nil)
	if fmt.Sprint(names(p.order)) != "[b low]" {
		t.Errorf("after 2m: %v; want b then low", names(p.order))
	}
}

func TestKeyOrder(t *testing.T) {
	s, c, clk := testSnapshot(t,
		Channel{Name: "seq", APIKeys: []string{"k0", "k1", "k2"}},
		Channel{Name: "rr", APIKeys: []string{"k0", "k1", "k2"}, KeyStrategy: keyRoundRobin},
	)
	now := clk.now().UnixNano()
	seq, rr := s.byID[1], s.byID[2]
	for range 3 {
		if got := seq.keyOrder(now, nil); fmt.Sprint(got) != "[0 1 2]" {
			t.Errorf("sequential %v", got)
		}
	}
	var starts []int
	for range 4 {
		starts = append(starts, rr.keyOrder(now, nil)[0])
	}
	if fmt.Sprint(starts) != "[0 1 2 0]" {
		t.Errorf("round robin starts %v", starts)
	}
	c.fail(seq.health, 0, "", verdict{scope: scopeKey, base: 2 * time.Minute})
	c.fail(seq.health, 2, "", verdict{scope: scopeKey, base: time.Minute})
	now = clk.now().UnixNano()
	if got := seq.keyOrder(now, nil); fmt.Sprint(got) != "[1]" {
		t.Errorf("with 0 and 2 cooling: %v; want [1]", got)
	}
	c.fail(seq.health, 1, "", verdict{scope: scopeKey, base: 3 * time.Minute})
	if got := seq.keyOrder(now, nil); fmt.Sprint(got) != "[2]" {
		t.Errorf("all cooling: %v; want the soonest, [2]", got)
	}
}

func TestRotateLeft(t *testing.T) {
	mk := func(ns ...string) []*channelEntry {
		var out []*channelEntry
		for _, n := range ns {
			out = append(out, &channelEntry{ch: Channel{Name: n}})
		}
		return out
	}
	for k, want := range []string{"[a b c d]", "[b c d a]", "[c d a b]", "[d a b c]"} {
		s := mk("a", "b", "c", "d")
		rotateLeft(s, k)
		if got := fmt.Sprint(names(s)); got != want {
			t.Errorf("rotateLeft(%d) = %s; want %s", k, got, want)
		}
	}
}

func TestSelectorLoadSwapsSnapshot(t *testing.T) {
	c := newCooldowns(time.Now)
	sel := newSelector(c)
	if sel.current().route(protoAnthropic, "m") != nil {
		t.Fatal("empty selector has a route")
	}
	old := sel.current()
	if _, err := sel.load([]Channel{{ID: 1, Name: "a", URL: "https://a", APIKeys: []string{"k"}, Type: "anthropic", Enabled: true}}); err != nil {
		t.Fatal(err)
	}
	if sel.current() == old || sel.current().route(protoAnthropic, "m") == nil {
		t.Error("load did not swap in the new channels")
	}
	if _, err := sel.load([]Channel{{ID: 2, Name: "b", URL: "https://b", Type: "bogus", Enabled: true}}); err == nil {
		t.Error("bad channel type accepted")
	}
}
