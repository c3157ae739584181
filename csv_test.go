package main

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"mime/multipart"
	"net/http"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf16"
)

// csvAnswer is every field an import answer may have.
type csvAnswer struct {
	Created        int
	Updated        int
	Unchanged      int
	IgnoredColumns []string `json:"ignored_columns"`
	Error          string
	Problems       []importProblem
	ProblemCount   int `json:"problem_count"`
}

// csvImport posts body with the given Content-Type and decodes the answer.
func csvImport(e *testEnv, tok, contentType string, body []byte) (int, csvAnswer) {
	e.t.Helper()
	hdr := map[string]string{"Authorization": "Bearer " + tok, "Content-Type": contentType}
	resp, b := e.do("POST", "/admin/channels/import", string(body), hdr)
	var a csvAnswer
	if err := json.Unmarshal(b, &a); err != nil {
		e.t.Fatalf("import answer %d is not JSON: %s", resp.StatusCode, b)
	}
	return resp.StatusCode, a
}

func csvImportText(e *testEnv, tok, text string) (int, csvAnswer) {
	e.t.Helper()
	return csvImport(e, tok, "text/csv", []byte(text))
}

// csvMultipart builds a form upload with the file in field.
func csvMultipart(t *testing.T, field string, data []byte) (string, []byte) {
	t.Helper()
	var b bytes.Buffer
	mw := multipart.NewWriter(&b)
	mw.WriteField("note", "uploaded by a test")
	fw, err := mw.CreateFormFile(field, "渠道.csv")
	if err != nil {
		t.Fatal(err)
	}
	fw.Write(data)
	mw.Close()
	return mw.FormDataContentType(), b.Bytes()
}

func csvExport(e *testEnv, tok string) (*http.Response, []byte) {
	e.t.Helper()
	resp, b := e.do("GET", "/admin/channels/export", "", map[string]string{"Authorization": "Bearer " + tok})
	if resp.StatusCode != 200 {
		e.t.Fatalf("export: %d %s", resp.StatusCode, b)
	}
	return resp, b
}

// csvChannels returns the stored channels, full keys and all.
func csvChannels(e *testEnv) []Channel {
	e.t.Helper()
	chs, err := e.app.store.ListChannels(context.Background())
	if err != nil {
		e.t.Fatal(err)
	}
	return chs
}

// csvContent strips what an import does not carry (times) and the
// nil/empty difference, for comparing channel sets.
func csvContent(chs []Channel) []Channel {
	out := make([]Channel, len(chs))
	for i, c := range chs {
		c.CreatedAt, c.UpdatedAt = time.Time{}, time.Time{}
		c.APIKeys, c.Models = nonNil(c.APIKeys), nonNil(c.Models)
		if c.ModelRedirects == nil {
			c.ModelRedirects = map[string]string{}
		}
		out[i] = c
	}
	return out
}

// csvFixture creates, through the admin API, channels that exercise every
// column: several keys, redirects, Chinese names, a comma and quotes in a
// name, every type, a disabled one.
func csvFixture(e *testEnv, tok string) []Channel {
	e.t.Helper()
	for _, body := range []string{
		`{"name":"官方 Anthropic","url":"https://api.anthropic.com","api_key":"sk-ant-aaaaaaaaaaaa1,sk-ant-bbbbbbbbbbbb2\nsk-ant-cccccccccccc3",
		  "priority":10,"models":["claude-sonnet-4-5","claude-haiku-4-5"],
		  "model_redirects":{"claude-3-5-sonnet":"claude-sonnet-4-5","a<b":"c&d"},"key_strategy":"round_robin"}`,
		`{"name":"codex 中转, 备用","url":"https://relay.example.com/openai/","api_keys":["sk-o-1"],"channel_type":"codex",
		  "priority":-1,"enabled":false}`,
		`{"name":"Gemini \"quoted\"","url":"https://gemini.example.com","api_keys":["AIza-key-1","AIza-key-2"],
		  "channel_type":"gemini","models":"gemini-2.5-pro"}`,
	} {
		if st, b := e.admin(tok, "POST", "/admin/channels", body); st != 201 {
			e.t.Fatalf("create fixture: %d %s", st, b)
		}
	}
	return csvChannels(e)
}

func TestExportFormat(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	chs := csvFixture(e, tok)
	resp, body := csvExport(e, tok)

	if ct := resp.Header.Get("Content-Type"); ct != "text/csv; charset=utf-8" {
		t.Errorf("Content-Type %q; want text/csv; charset=utf-8", ct)
	}
	cd := resp.Header.Get("Content-Disposition")
	if !regexp.MustCompile(`^attachment; filename="ccload-channels-\d{8}-\d{4}\.csv"; filename\*=UTF-8''ccload-channels-\d{8}-\d{4}\.csv$`).MatchString(cd) {
		t.Errorf("Content-Disposition %q", cd)
	}
	if cc := resp.Header.Get("Cache-Control"); cc != "no-store" {
		t.Errorf("Cache-Control %q; want no-store (the file holds keys)", cc)
	}
	if !bytes.HasPrefix(body, []byte("\xEF\xBB\xBFid,name,api_key,url,priority,models,model_redirects,channel_type,key_strategy,enabled,price_multiplier\r\n")) {
		t.Fatalf("export does not start with a BOM and the fixed header:\n%q", body[:min(len(body), 120)])
	}
	// Several keys share one quoted cell, joined by commas.
	if !bytes.Contains(body, []byte(`"sk-ant-aaaaaaaaaaaa1,sk-ant-bbbbbbbbbbbb2,sk-ant-cccccccccccc3"`)) {
		t.Errorf("keys not in one quoted cell:\n%s", body)
	}
	recs, err := csv.NewReader(bytes.NewReader(body[3:])).ReadAll()
	if err != nil {
		t.Fatalf("export is not valid CSV: %v", err)
	}
	if len(recs) != 1+len(chs) {
		t.Fatalf("got %d records; want header + %d", len(recs), len(chs))
	}
	want := [][]string{
		{strconv.FormatInt(chs[0].ID, 10), "官方 Anthropic", "sk-ant-aaaaaaaaaaaa1,sk-ant-bbbbbbbbbbbb2,sk-ant-cccccccccccc3",
			"https://api.anthropic.com", "10", "claude-sonnet-4-5,claude-haiku-4-5",
			`{"a<b":"c&d","claude-3-5-sonnet":"claude-sonnet-4-5"}`, "anthropic", "round_robin", "true", "1"},
		{strconv.FormatInt(chs[1].ID, 10), "codex 中转, 备用", "sk-o-1", "https://relay.example.com/openai", "-1", "", "",
			"openai", "sequential", "false", "1"},
		{strconv.FormatInt(chs[2].ID, 10), `Gemini "quoted"`, "AIza-key-1,AIza-key-2", "https://gemini.example.com", "0",
			"gemini-2.5-pro", "", "gemini", "sequential", "true", "1"},
	}
	for i, w := range want {
		if !slices.Equal(recs[i+1], w) {
			t.Errorf("row %d:\n got %q\nwant %q", i+1, recs[i+1], w)
		}
	}
}

func TestImportExportRoundTripIsNoOp(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	before := csvFixture(e, tok)
	_, body := csvExport(e, tok)

	for _, how := range []string{"text/csv", "multipart"} {
		var st int
		var a csvAnswer
		if how == "multipart" {
			ct, mp := csvMultipart(t, "file", body)
			st, a = csvImport(e, tok, ct, mp)
		} else {
			st, a = csvImport(e, tok, "text/csv; charset=utf-8", body)
		}
		if st != 200 || a.Created != 0 || a.Updated != 0 || a.Unchanged != 3 {
			t.Fatalf("%s: re-importing an export: %d %+v; want 200 and 3 unchanged", how, st, a)
		}
		// Nothing at all was written: not even updated_at moved.
		if after := csvChannels(e); !reflect.DeepEqual(after, before) {
			t.Fatalf("%s: re-import changed the channels:\n got %+v\nwant %+v", how, after, before)
		}
	}
}

func TestImportRestoresWipedDatabase(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	before := csvFixture(e, tok)
	_, body := csvExport(e, tok)
	for _, c := range before {
		if st, b := e.admin(tok, "DELETE", "/admin/channels/"+strconv.FormatInt(c.ID, 10), ""); st != 200 {
			t.Fatalf("delete: %d %s", st, b)
		}
	}
	if n := len(e.app.sel.current().all); n != 0 {
		t.Fatalf("snapshot still has %d channels after deleting all", n)
	}
	ct, mp := csvMultipart(t, "file", body)
	st, a := csvImport(e, tok, ct, mp)
	if st != 200 || a.Created != 3 || a.Updated != 0 || a.Unchanged != 0 {
		t.Fatalf("import into an empty database: %d %+v; want 3 created", st, a)
	}
	after := csvChannels(e)
	if !reflect.DeepEqual(csvContent(after), csvContent(before)) {
		t.Fatalf("restored channels differ:\n got %+v\nwant %+v", csvContent(after), csvContent(before))
	}
	// The proxy sees them without a restart.
	if n := len(e.app.sel.current().all); n != 3 {
		t.Errorf("snapshot has %d channels after the import; want 3", n)
	}
}

func TestImportChineseHeadersAnyOrder(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	file := "\ufeff启用,渠道类型,名称,地址,API密钥,优先级,模型,模型重定向,密钥策略,备注\r\n" +
		"禁用,codex,中文渠道,https://cn.example.com/v1/,\"k-1\nk-2\",5,gpt-5;gpt-5-codex,\"{\"\"gpt-4\"\":\"\"gpt-5\"\"}\",Round Robin,随便写\r\n"
	st, a := csvImportText(e, tok, file)
	if st != 200 || a.Created != 1 {
		t.Fatalf("import: %d %+v", st, a)
	}
	if !slices.Equal(a.IgnoredColumns, []string{"备注"}) {
		t.Errorf("ignored_columns %q; want [备注]", a.IgnoredColumns)
	}
	// A second spelling of the headers: 状态, 类型, URL, 密钥, models as a
	// JSON list, and a header in mixed case with spaces.
	file2 := "状态,类型,名称,URL,密钥,模型,Key Strategy\n启用,gemini,双子座,https://g.example.com,AIza-1,\"[\"\"gemini-2.5-pro\"\",\"\"gemini-2.5-flash\"\"]\",sequential\n"
	if st, a := csvImportText(e, tok, file2); st != 200 || a.Created != 1 {
		t.Fatalf("import 2: %d %+v", st, a)
	}
	got := csvContent(csvChannels(e))
	want := []Channel{
		{ID: got[0].ID, Name: "中文渠道", URL: "https://cn.example.com/v1", APIKeys: []string{"k-1", "k-2"}, Type: "openai",
			Priority: 5, Models: []string{"gpt-5", "gpt-5-codex"}, ModelRedirects: map[string]string{"gpt-4": "gpt-5"},
			KeyStrategy: "round_robin", Enabled: false, PriceMultiplier: 1},
		{ID: got[1].ID, Name: "双子座", URL: "https://g.example.com", APIKeys: []string{"AIza-1"}, Type: "gemini",
			Models: []string{"gemini-2.5-pro", "gemini-2.5-flash"}, ModelRedirects: map[string]string{},
			KeyStrategy: "sequential", Enabled: true, PriceMultiplier: 1},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("imported:\n got %+v\nwant %+v", got, want)
	}
}

// TestImportOldFormat feeds files as the seed project's export wrote them:
// models as a JSON list, "{}" for no redirects, codex as a type, and in
// later versions extra columns this project does not have.
func TestImportOldFormat(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	old := "\ufeffid,name,api_key,url,priority,models,model_redirects,channel_type,key_strategy,enabled\n" +
		"1,老渠道,\"sk-old-1,sk-old-2\",https://old.example.com,10,\"[\"\"claude-sonnet-4-5\"\",\"\"claude-opus-4-1\"\"]\",{},codex,sequential,true\n" +
		"4,Old Gemini,AIza-old,https://gem.example.com,0,[],\"{\"\"gemini-pro\"\":\"\"gemini-2.5-pro\"\"}\",gemini,round_robin,false\n"
	st, a := csvImportText(e, tok, old)
	if st != 200 || a.Created != 2 {
		t.Fatalf("old export: %d %+v", st, a)
	}
	later := "id,name,api_key,url,priority,models,model_redirects,channel_type,key_strategy,enabled,preset,quota_config\n" +
		"9,Later,sk-later,https://later.example.com,1,claude-haiku-4-5,{},anthropic,sequential,true,official,{}\n"
	st, a = csvImportText(e, tok, later)
	if st != 200 || a.Created != 1 || !slices.Equal(a.IgnoredColumns, []string{"preset", "quota_config"}) {
		t.Fatalf("later export: %d %+v", st, a)
	}
	got := csvContent(csvChannels(e))
	want := []Channel{
		{ID: 1, Name: "老渠道", URL: "https://old.example.com", APIKeys: []string{"sk-old-1", "sk-old-2"}, Type: "openai",
			Priority: 10, Models: []string{"claude-sonnet-4-5", "claude-opus-4-1"}, ModelRedirects: map[string]string{},
			KeyStrategy: "sequential", Enabled: true, PriceMultiplier: 1},
		{ID: 4, Name: "Old Gemini", URL: "https://gem.example.com", APIKeys: []string{"AIza-old"}, Type: "gemini",
			Models: []string{}, ModelRedirects: map[string]string{"gemini-pro": "gemini-2.5-pro"},
			KeyStrategy: "round_robin", Enabled: false, PriceMultiplier: 1},
		{ID: 9, Name: "Later", URL: "https://later.example.com", APIKeys: []string{"sk-later"}, Type: "anthropic",
			Priority: 1, Models: []string{"claude-haiku-4-5"}, ModelRedirects: map[string]string{},
			KeyStrategy: "sequential", Enabled: true, PriceMultiplier: 1},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("imported:\n got %+v\nwant %+v", got, want)
	}
	// Importing the old file again is a no-op.
	if st, a := csvImportText(e, tok, old); st != 200 || a.Unchanged != 2 || a.Created+a.Updated != 0 {
		t.Errorf("old export again: %d %+v; want 2 unchanged", st, a)
	}
}

func TestImportUpsertsByIDThenName(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	alpha := e.addChannel(Channel{Name: "Alpha", URL: "https://a.example.com", APIKeys: []string{"sk-alpha-0000001"}})
	beta := e.addChannel(Channel{Name: "Beta", URL: "https://b.example.com", APIKeys: []string{"sk-beta-00000001", "sk-beta-00000002"}})
	ctx := context.Background()
	until := time.Now().Add(time.Hour)
	if err := e.app.store.SaveCooldowns(ctx, []cooldownRecord{
		{ChannelID: alpha.ID, KeyIndex: -1, Until: until, Failures: 1, Reason: "test"},
		{ChannelID: beta.ID, KeyIndex: 0, Until: until, Failures: 1, Reason: "test"},
	}); err != nil {
		t.Fatal(err)
	}
	file := "id,name,url,api_key,priority\n" +
		strconv.FormatInt(alpha.ID, 10) + ",Alpha Renamed,https://a.example.com,sk-alpha-0000001,1\n" + // by id: rename
		",BETA,https://b2.example.com,,2\n" + // by name, any case; empty keys keep the keys
		"999,Gamma,https://g.example.com,kg,0\n" // unknown id: created with it
	st, a := csvImportText(e, tok, file)
	if st != 200 || a.Created != 1 || a.Updated != 2 || a.Unchanged != 0 {
		t.Fatalf("import: %d %+v; want 1 created, 2 updated", st, a)
	}
	got := csvChannels(e)
	if len(got) != 3 || got[0].ID != alpha.ID || got[0].Name != "Alpha Renamed" || got[0].Priority != 1 ||
		got[1].ID != beta.ID || got[1].Name != "BETA" || got[1].URL != "https://b2.example.com" ||
		!slices.Equal(got[1].APIKeys, []string{"sk-beta-00000001", "sk-beta-00000002"}) || got[2].ID != 999 || got[2].Name != "Gamma" {
		t.Fatalf("after import: %+v", got)
	}
	// Beta's URL changed, so its cooldowns went; Alpha kept URL and keys,
	// so its cooldown stayed.
	recs, err := e.app.store.LoadCooldowns(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 1 || recs[0].ChannelID != alpha.ID {
		t.Errorf("cooldowns after import: %+v; want only Alpha's", recs)
	}

	// Two channels swap names in one file.
	swap := "id,name\n" + strconv.FormatInt(alpha.ID, 10) + ",BETA\n" + strconv.FormatInt(beta.ID, 10) + ",Alpha Renamed\n"
	if st, a := csvImportText(e, tok, swap); st != 200 || a.Updated != 2 {
		t.Fatalf("swap names: %d %+v", st, a)
	}
	got = csvChannels(e)
	if got[0].Name != "BETA" || got[1].Name != "Alpha Renamed" {
		t.Errorf("after swap: %q, %q", got[0].Name, got[1].Name)
	}

	// Masked keys, as the admin list shows them, stand for the stored keys.
	masked := "name,api_key\nBETA," + maskKey("sk-alpha-0000001") + "\nAlpha Renamed,\"" +
		maskKey("sk-beta-00000001") + "," + maskKey("sk-beta-00000002") + "\"\n"
	if st, a := csvImportText(e, tok, masked); st != 200 || a.Unchanged != 2 {
		t.Errorf("masked keys: %d %+v; want 2 unchanged", st, a)
	}
}

func TestImportBadRows(t *testing.T) {
	const header = "id,name,url,api_key,channel_type,priority,enabled,model_redirects,models,key_strategy\n"
	cases := []struct {
		name, rows string
		line       int
		column     string
		want       string // in the message
	}{
		{"missing name", ",,https://x.example.com,k1,,,,,,\n", 2, "name", "name is required"},
		{"bad url", ",a,ftp://x.example.com,k1,,,,,,\n", 2, "url", "http(s)"},
		{"relative url", ",a,api.example.com,k1,,,,,,\n", 2, "url", "absolute"},
		{"bad type", ",a,https://x.example.com,k1,claudex,,,,,\n", 2, "channel_type", `"claudex"`},
		{"bad enabled", ",a,https://x.example.com,k1,,,maybe,,,\n", 2, "enabled", `"maybe"`},
		{"bad priority", ",a,https://x.example.com,k1,,high,,,,\n", 2, "priority", `"high"`},
		{"bad redirects JSON", `,a,https://x.example.com,k1,,,,"{""a"":",,` + "\n", 2, "model_redirects", "object"},
		{"bad models JSON", `,a,https://x.example.com,k1,,,,,"[""a"",",` + "\n", 2, "models", "JSON list"},
		{"bad key strategy", ",a,https://x.example.com,k1,,,,,,random\n", 2, "key_strategy", `"random"`},
		{"missing key", ",a,https://x.example.com,,,,,,,\n", 2, "api_key", "required"},
		{"masked key on a new channel", ",a,https://x.example.com,sk-a…xyz,,,,,,\n", 2, "api_key", "masked"},
		{"control character in name", ",\"a\x00b\",https://x.example.com,k1,,,,,,\n", 2, "name", "control"},
		{"bad id", "abc,a,https://x.example.com,k1,,,,,,\n", 2, "id", `"abc"`},
		{"negative id", "-3,a,https://x.example.com,k1,,,,,,\n", 2, "id", `"-3"`},
		{"duplicate name in file", ",dup,https://x.example.com,k1,,,,,,\n,DUP,https://y.example.com,k2,,,,,,\n", 3, "name", "line 2"},
		{"duplicate id in file", "50,a,https://x.example.com,k1,,,,,,\n50,b,https://y.example.com,k2,,,,,,\n", 3, "id", "line 2"},
		{"name of an untouched channel", "1,Other,https://x.example.com,k1,,,,,,\n", 2, "name", "channel 2"},
		{"too many cells", ",a,https://x.example.com,k1,k2,,,,,,,extra\n", 2, "", "double quotes"},
		{"bare quote", ",a\"b,https://x.example.com,k1,,,,,,\n", 2, "", "quote"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newTestEnv(t)
			tok := e.login()
			e.addChannel(Channel{Name: "Existing", URL: "https://e.example.com"})
			e.addChannel(Channel{Name: "Other", URL: "https://o.example.com"})
			before := csvChannels(e)
			st, a := csvImportText(e, tok, header+tc.rows)
			if st != 400 || len(a.Problems) != 1 || a.ProblemCount != 1 {
				t.Fatalf("got %d %+v; want 400 with one problem", st, a)
			}
			p := a.Problems[0]
			if p.Line != tc.line || p.Column != tc.column || !strings.Contains(p.Message, tc.want) {
				t.Errorf("problem %+v; want line %d, column %q, message with %q", p, tc.line, tc.column, tc.want)
			}
			if !strings.Contains(a.Error, "nothing was imported") {
				t.Errorf("error %q does not say nothing was imported", a.Error)
			}
			if after := csvChannels(e); !reflect.DeepEqual(after, before) {
				t.Errorf("a refused import changed the channels")
			}
		})
	}
}

// TestImportAllOrNothing: good rows beside bad ones are not imported, and
// every problem of every row is listed, in line order.
func TestImportAllOrNothing(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	e.addChannel(Channel{Name: "Keep Me", URL: "https://keep.example.com", APIKeys: []string{"k0"}})
	before := csvChannels(e)
	file := "name,url,api_key,priority,enabled\n" +
		"Keep Me,https://changed.example.com,k0,3,true\n" + // a good update
		"good one,https://g1.example.com,k1,1,yes\n" + // a good create
		"bad two,not a url,k2,x,perhaps\n" + // three problems in one row
		"good three,https://g3.example.com,k3,0,启用\n" +
		",https://g4.example.com,k4,0,0\n" // no name
	st, a := csvImportText(e, tok, file)
	if st != 400 {
		t.Fatalf("status %d; want 400", st)
	}
	type lc struct {
		line int
		col  string
	}
	var got []lc
	for _, p := range a.Problems {
		got = append(got, lc{p.Line, p.Column})
	}
	want := []lc{{4, "url"}, {4, "priority"}, {4, "enabled"}, {6, "name"}}
	if !slices.Equal(got, want) {
		t.Errorf("problems %+v; want %v", a.Problems, want)
	}
	if after := csvChannels(e); !reflect.DeepEqual(after, before) {
		t.Errorf("channels changed by a refused import:\n got %+v\nwant %+v", after, before)
	}
}

func TestImportBodies(t *testing.T) {
	e := newTestEnv(t)
	tok := e.login()
	good := "name,url,api_key\nOne,https://one.example.com,k1\n"

	ct, mp := csvMultipart(t, "upload", []byte(good))
	if st, a := csvImport(e, tok, ct, mp); st != 400 || !strings.Contains(a.Error, `"file"`) {
		t.Errorf("multipart without a file field: %d %+v", st, a)
	}
	if st, a := csvImport(e, tok, "application/json", []byte(`{"name":"x"}`)); st != 415 || a.Error == "" {
		t.Errorf("JSON body: %d %+v; want 415", st, a)
	}
	if st, a := csvImport(e, tok, "text/csv", nil); st != 400 || a.ProblemCount != 1 || !strings.Contains(a.Error, "empty") {
		t.Errorf("empty body: %d %+v", st, a)
	}
	big := append([]byte("name,url,api_key\n"), bytes.Repeat([]byte("x"), maxImportBody)...)
	if st, a := csvImport(e, tok, "text/csv", big); st != 413 || a.Error == "" {
		t.Errorf("body over the cap: %d %+v; want 413", st, a)
	}
	ct, mp = csvMultipart(t, "file", big)
	if st, a := csvImport(e, tok, ct, mp); st != 413 || a.Error == "" {
		t.Errorf("multipart body over the cap: %d %+v; want 413", st, a)
	}
	// Excel's plain "CSV" in a Chinese locale is GBK: refused with a hint.
	gbk := append([]byte("name,url,api_key\n"), 0xD6, 0xD0, 0xCE, 0xC4) // 中文 in GBK
	gbk = append(gbk, []byte(",https://x.example.com,k\n")...)
	if st, a := csvImport(e, tok, "text/csv", gbk); st != 400 || len(a.Problems) != 1 || a.Problems[0].Line != 2 ||
		!strings.Contains(a.Problems[0].Message, "CSV UTF-8") {
		t.Errorf("GBK file: %d %+v", st, a)
	}
	// Excel's "Unicode text": UTF-16 with a BOM, tab separated.
	u16 := []byte{0xFF, 0xFE}
	for _, r := range utf16.Encode([]rune("名称\t地址\t密钥\r\n宽字符\thttps://w.example.com\tkw\r\n")) {
		u16 = append(u16, byte(r), byte(r>>8))
	}
	if st, a := csvImport(e, tok, "application/octet-stream", u16); st != 200 || a.Created != 1 {
		t.Errorf("UTF-16 tab-separated: %d %+v", st, a)
	}
	// Semicolon-separated, as spreadsheets in some locales save.
	if st, a := csvImport(e, tok, "", []byte("name;url;api_key;models\nSemi;https://s.example.com;ks;a,b\n")); st != 200 || a.Created != 1 {
		t.Errorf("semicolon-separated: %d %+v", st, a)
	}
	ct, mp = csvMultipart(t, "file", []byte(good))
	if st, a := csvImport(e, tok, ct, mp); st != 200 || a.Created != 1 {
		t.Errorf("multipart: %d %+v", st, a)
	}
	if st, a := csvImportText(e, tok, good); st != 200 || a.Unchanged != 1 {
		t.Errorf("text/csv: %d %+v", st, a)
	}
	// A header only: nothing to do, and no error.
	if st, a := csvImportText(e, tok, "name,url,api_key\r\n,,\r\n"); st != 200 || a.Created+a.Updated+a.Unchanged != 0 {
		t.Errorf("header only: %d %+v", st, a)
	}
	if st, a := csvImportText(e, tok, "foo,bar\n1,2\n"); st != 400 || len(a.Problems) != 1 || a.Problems[0].Line != 1 {
		t.Errorf("no known columns: %d %+v", st, a)
	}
	names := []string{}
	for _, c := range csvChannels(e) {
		names = append(names, c.Name)
	}
	if !slices.Equal(names, []string{"宽字符", "Semi", "One"}) {
		t.Errorf("channels %q", names)
	}
}

func TestImportRowCap(t *testing.T) {
	var b strings.Builder
	b.WriteString("name,url,api_key\n")
	for i := range maxImportRows + 5 {
		b.WriteString("c" + strconv.Itoa(i) + ",https://x.example.com,k\n")
	}
	f := parseImportFile([]byte(b.String()))
	if len(f.rows) != maxImportRows || len(f.problems) != 1 || f.problems[0].Line != maxImportRows+2 ||
		!strings.Contains(f.problems[0].Message, "split") {
		t.Errorf("%d rows, problems %+v", len(f.rows), f.problems)
	}
}

func TestCSVRoutesRequireSession(t *testing.T) {
	e := newTestEnv(t)
	for _, r := range []struct{ method, path string }{{"GET", "/admin/channels/export"}, {"POST", "/admin/channels/import"}} {
		for _, hdr := range []map[string]string{{"Content-Type": "text/csv"}, {"Authorization": "Bearer nope", "Content-Type": "text/csv"}} {
			resp, body := e.do(r.method, r.path, "name,url,api_key\nx,https://x.example.com,k\n", hdr)
			if resp.StatusCode != 401 || bytes.Contains(body, []byte("name,url")) {
				t.Errorf("%s %s with %v: %d %s; want 401", r.method, r.path, hdr, resp.StatusCode, body)
			}
		}
	}
	if n := len(csvChannels(e)); n != 0 {
		t.Errorf("an unauthenticated import stored %d channels", n)
	}
}

// FuzzImportCSV: no input may panic, hang, or import half a file. Either
// the import is refused and the database is as it was, or it succeeds with
// counts that add up, stores only valid channels, and doing it again
// changes nothing.
func FuzzImportCSV(f *testing.F) {
	ctx := context.Background()
	st, err := OpenStore(ctx, f.TempDir()+"/fuzz.db")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { st.Close() })
	seed := []Channel{
		{ID: 1, Name: "alpha", URL: "https://a.example.com", APIKeys: []string{"sk-alpha-000001"}, Type: "anthropic", KeyStrategy: keySequential, Enabled: true},
		{ID: 2, Name: "Beta", URL: "https://b.example.com", APIKeys: []string{"kb1", "kb2"}, Type: "openai", KeyStrategy: keyRoundRobin,
			Models: []string{"gpt-5"}, ModelRedirects: map[string]string{"gpt-4": "gpt-5"}},
		{ID: 7, Name: "中文", URL: "https://c.example.com/v1", APIKeys: []string{"kc"}, Type: "gemini", KeyStrategy: keySequential, Enabled: true},
	}
	reset := func(tb testing.TB) {
		tb.Helper()
		if _, err := st.db.ExecContext(ctx, `DELETE FROM channels`); err != nil {
			tb.Fatal(err)
		}
		for _, c := range seed {
			c := cloneChannel(c)
			if err := st.CreateChannel(ctx, &c); err != nil {
				tb.Fatal(err)
			}
		}
	}
	reset(f)
	list := func(tb testing.TB) []Channel {
		tb.Helper()
		chs, err := st.ListChannels(ctx)
		if err != nil {
			tb.Fatal(err)
		}
		return chs
	}
	f.Add([]byte("id,name,url,api_key\n1,alpha,https://a.example.com,sk-alpha-000001\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		before := list(t)
		file := parseImportFile(data)
		res, err := st.ImportChannels(ctx, file)
		after := list(t)
		if err != nil {
			var ie *importError
			if !errors.As(err, &ie) || len(ie.problems) == 0 {
				t.Fatalf("import failed with %v; want problems listed", err)
			}
			if !reflect.DeepEqual(before, after) {
				t.Fatalf("a refused import changed the database")
			}
			return
		}
		if n := res.Created + res.Updated + res.Unchanged; n != len(file.rows) {
			t.Fatalf("counts %+v add up to %d; the file has %d rows", res, n, len(file.rows))
		}
		if len(after) != len(before)+res.Created {
			t.Fatalf("%d channels before, %d after, %d created", len(before), len(after), res.Created)
		}
		for _, c := range after {
			if _, err := c.normalized(); err != nil {
				t.Fatalf("import stored an invalid channel %+v: %v", c, err)
			}
		}
		res2, err := st.ImportChannels(ctx, parseImportFile(data))
		if err != nil || res2.Created+res2.Updated != 0 || res2.Unchanged != len(file.rows) {
			t.Fatalf("the same file again: %+v, %v; want all unchanged", res2, err)
		}
		if again := list(t); !reflect.DeepEqual(again, after) {
			t.Fatalf("the same file again changed the database")
		}
		if res.Created+res.Updated > 0 {
			reset(t)
		}
	})
}
