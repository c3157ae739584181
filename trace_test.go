package main

import (
	"net/http"
	"testing"
	"time"
)

// TestTraceShowsEveryTry: a request that failed over twice before it was
// served shows all three tries in its log row, in /admin/logs, with what
// each failure cooled.
func TestTraceShowsEveryTry(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	a, b := newFakeUpstream(t, "a"), newFakeUpstream(t, "b")
	// a is slow to fail, so that the served try's own duration is told
	// apart from the request's.
	a.script(func(int, *http.Request) fakeBehavior {
		time.Sleep(300 * time.Millisecond)
		return fakeBehavior{Status: 529}
	})
	b.set(fakeBehavior{RequireKey: "sk-b-good-1111111"})
	ach := e.addChannel(Channel{Name: "a", URL: a.URL, Priority: 2})
	bch := e.addChannel(Channel{Name: "b", URL: b.URL, Priority: 1, APIKeys: []string{"sk-b-bad-00000000", "sk-b-good-1111111"}})
	if resp, _ := e.post("/v1/messages", anthropicBody("m", false)); resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	e.settle()
	st, body := e.admin(tok, "GET", "/admin/logs?limit=1", "")
	if st != 200 {
		t.Fatalf("logs: %d %s", st, body)
	}
	rows := decode[struct{ Logs []logEntry }](t, body).Logs
	if len(rows) != 1 {
		t.Fatalf("rows %s", body)
	}
	row := rows[0]
	want := []tryView{
		{ChannelID: ach.ID, ChannelName: "a", KeyIndex: 0, Status: 529, Cooled: "channel"},
		{ChannelID: bch.ID, ChannelName: "b", KeyIndex: 0, Status: 401, Cooled: "key"},
		{ChannelID: bch.ID, ChannelName: "b", KeyIndex: 1, Status: 200, Cooled: ""},
	}
	if row.Attempts != 3 || len(row.Tries) != 3 {
		t.Fatalf("attempts %d, tries %+v; want 3", row.Attempts, row.Tries)
	}
	for i, w := range want {
		g := row.Tries[i]
		if g.ChannelID != w.ChannelID || g.ChannelName != w.ChannelName || g.KeyIndex != w.KeyIndex ||
			g.Status != w.Status || g.Cooled != w.Cooled || (w.Status != 200) != (g.Error != "") {
			t.Errorf("try %d: %+v; want %+v (an error text on failures only)", i, g, w)
		}
	}
	// The served try runs from its own start to the request's end: the
	// tries add up to the request, give or take the ms each rounds off.
	sum := int64(0)
	for _, tr := range row.Tries {
		sum += tr.DurationMS
	}
	if row.Tries[0].DurationMS < 300 || sum > row.DurationMS+1 || sum < row.DurationMS-5 {
		t.Errorf("tries lasted %+v ms in all %d; the request %d ms", row.Tries, sum, row.DurationMS)
	}
}

// TestTraceOfOneTry: a request served by its first try stores no trace and
// still shows that one try; one that gave up after one try stores it,
// since the try's status (502, refused) is not the row's (503).
func TestTraceOfOneTry(t *testing.T) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "a")
	e.addChannel(Channel{Name: "a", URL: up.URL, Models: []string{"m"}})
	e.post("/v1/messages", anthropicBody("m", false))
	dead := e.addChannel(Channel{Name: "dead", URL: deadURL(t), Models: []string{"gone"}})
	e.post("/v1/messages", anthropicBody("gone", false))
	rows := e.logs()
	if len(rows) != 2 {
		t.Fatalf("%d rows", len(rows))
	}
	var stored []string
	rs, err := e.app.store.rdb.Query(`SELECT tries FROM logs ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	for rs.Next() {
		var s string
		rs.Scan(&s)
		stored = append(stored, s)
	}
	rs.Close()
	if stored[0] != "" || stored[1] == "" {
		t.Errorf("stored traces %q; want none for the plain success, one for the give-up", stored)
	}
	if tr := rows[0].Tries; len(tr) != 1 || tr[0].Status != 200 || tr[0].ChannelName != "a" {
		t.Errorf("success: tries %+v", tr)
	}
	if tr := rows[1].Tries; rows[1].Status != 503 || len(tr) != 1 || tr[0].Status != http.StatusBadGateway ||
		tr[0].ChannelID != dead.ID || tr[0].Cooled != "channel" {
		t.Errorf("give-up: status %d tries %+v", rows[1].Status, tr)
	}
}
