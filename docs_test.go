package main

// Tests that the documentation says what the code does: every environment
// variable the code reads is documented, every curl example in the READMEs
// reaches a real route, and the release plumbing (Dockerfile, build script,
// compose file, systemd unit, .ci/run) agrees with the program.

import (
	"go/ast"
	"go/parser"
	"go/token"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

var readmes = []string{"README.md", "README.zh-CN.md"}

func readFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// envReads returns the environment variables the program's own sources
// read: string literals passed to getenv, Getenv, LookupEnv or lookupEnv.
func envReads(t *testing.T) map[string]string {
	t.Helper()
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	reads := map[string]string{} // name → where
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok || len(call.Args) != 1 {
				return true
			}
			var fn string
			switch f := call.Fun.(type) {
			case *ast.Ident:
				fn = f.Name
			case *ast.SelectorExpr:
				fn = f.Sel.Name
			}
			switch strings.ToLower(fn) {
			case "getenv", "lookupenv":
			default:
				return true
			}
			if lit, ok := call.Args[0].(*ast.BasicLit); ok && lit.Kind == token.STRING {
				if v, err := strconv.Unquote(lit.Value); err == nil {
					reads[v] = fset.Position(lit.Pos()).String()
				}
			}
			return true
		})
	}
	return reads
}

func TestEnvVarsDocumented(t *testing.T) {
	reads := envReads(t)
	var envVars []string // every variable ccload reads, from the code itself
	for name := range reads {
		envVars = append(envVars, name)
	}
	slices.Sort(envVars)
	if len(envVars) < 10 {
		t.Fatalf("found only %d getenv calls: %v; is envReads still finding them?", len(envVars), envVars)
	}

	for _, doc := range readmes {
		text := readFile(t, doc)
		for _, name := range envVars {
			if !strings.Contains(text, "`"+name+"`") {
				t.Errorf("%s does not document `%s`", doc, name)
			}
		}
	}

	// .env.example: each variable appears as a NAME= line (commented out
	// or not), it names no variable ccload does not read, and ccload can
	// parse it.
	example := readFile(t, ".env.example")
	assigned := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^#?\s*([A-Z][A-Z0-9_]*)=`).FindAllStringSubmatch(example, -1) {
		assigned[m[1]] = true
		if !slices.Contains(envVars, m[1]) {
			t.Errorf(".env.example sets %s, which ccload does not read", m[1])
		}
	}
	for _, name := range envVars {
		if !assigned[name] {
			t.Errorf(".env.example has no %s= line", name)
		}
	}
	if _, err := readDotEnv(".env.example"); err != nil {
		t.Errorf(".env.example does not parse: %v", err)
	}
}

// shellCommands splits shell text into simple commands and their words,
// well enough for documentation examples: quotes, backslash line
// continuations, comments, and the separators newline ; | & ( ) and $( .
func shellCommands(src string) [][]string {
	var (
		cmds [][]string
		cur  []string
		tok  strings.Builder
		in   bool // inside a word
	)
	endWord := func() {
		if in {
			cur = append(cur, tok.String())
			tok.Reset()
			in = false
		}
	}
	endCmd := func() {
		endWord()
		if len(cur) > 0 {
			cmds = append(cmds, cur)
			cur = nil
		}
	}
	for i := 0; i < len(src); i++ {
		c := src[i]
		switch {
		case c == '\\' && i+1 < len(src):
			i++
			if src[i] != '\n' {
				tok.WriteByte(src[i])
				in = true
			}
		case c == '\'':
			j := strings.IndexByte(src[i+1:], '\'')
			if j < 0 {
				j = len(src) - i - 1
			}
			tok.WriteString(src[i+1 : i+1+j])
			i += j + 1
			in = true
		case c == '"':
			i++
			for ; i < len(src) && src[i] != '"'; i++ {
				if src[i] == '\\' && i+1 < len(src) {
					i++
				}
				tok.WriteByte(src[i])
			}
			in = true
		case c == '#' && !in:
			for i < len(src) && src[i] != '\n' {
				i++
			}
			endCmd()
		case c == ' ' || c == '\t':
			endWord()
		case c == '$' && i+1 < len(src) && src[i+1] == '(':
			endCmd()
			i++
		case strings.IndexByte("\n;|&()", c) >= 0:
			endCmd()
		default:
			tok.WriteByte(c)
			in = true
		}
	}
	endCmd()
	return cmds
}

// curlExample is the request one curl command in the docs sends.
type curlExample struct {
	method string
	url    *url.URL
	line   string // the command, for messages
}

// curl options that take a value, so that the value is not read as the URL.
var curlValueFlags = map[string]bool{
	"-H": true, "--header": true, "-o": true, "--output": true, "-d": true, "--data": true,
	"--data-raw": true, "--data-binary": true, "--data-urlencode": true, "--json": true,
	"-F": true, "--form": true, "-X": true, "--request": true, "-u": true, "--user": true,
	"-b": true, "--cookie": true, "-c": true, "--cookie-jar": true, "-w": true,
	"--write-out": true, "-T": true, "--upload-file": true, "-A": true, "--user-agent": true,
	"-e": true, "--referer": true, "-m": true, "--max-time": true,
}

// parseCurl returns the method and URL of a curl command's words, as curl
// would send them.
func parseCurl(words []string) (method, rawURL string) {
	var explicit string
	data, head, get, upload := false, false, false, false
	for i := 1; i < len(words); i++ {
		w := words[i]
		switch {
		case w == "-X" || w == "--request":
			if i+1 < len(words) {
				explicit = words[i+1]
			}
		case strings.HasPrefix(w, "-X") && len(w) > 2:
			explicit = w[2:]
		case w == "-I" || w == "--head":
			head = true
		case w == "-G" || w == "--get":
			get = true
		case w == "-T" || w == "--upload-file":
			upload = true
		case strings.HasPrefix(w, "--data") || w == "-d" || w == "--json" || w == "-F" || w == "--form":
			data = true
		case w == "--url":
			if i+1 < len(words) {
				rawURL = words[i+1]
			}
		case !strings.HasPrefix(w, "-") && (strings.HasPrefix(w, "http://") || strings.HasPrefix(w, "https://")):
			rawURL = w
		}
		if curlValueFlags[w] || w == "--url" {
			i++
		}
	}
	switch {
	case explicit != "":
		method = explicit
	case head:
		method = http.MethodHead
	case get:
		method = http.MethodGet
	case upload:
		method = http.MethodPut
	case data:
		method = http.MethodPost
	default:
		method = http.MethodGet
	}
	return method, rawURL
}

// curlExamples returns the curl commands in the fenced code blocks of a
// Markdown document.
func curlExamples(t *testing.T, markdown string) []curlExample {
	t.Helper()
	var out []curlExample
	blocks := regexp.MustCompile("(?ms)^```[a-z]*\\n(.*?)^```").FindAllStringSubmatch(markdown, -1)
	for _, b := range blocks {
		for _, words := range shellCommands(b[1]) {
			if words[0] != "curl" {
				continue
			}
			line := strings.Join(words, " ")
			method, raw := parseCurl(words)
			if raw == "" {
				t.Errorf("curl example without a URL: %s", line)
				continue
			}
			u, err := url.Parse(raw)
			if err != nil {
				t.Errorf("curl example with a bad URL %q: %v", raw, err)
				continue
			}
			out = append(out, curlExample{method: method, url: u, line: line})
		}
	}
	return out
}

var shellVar = regexp.MustCompile(`\$\{?[A-Za-z_][A-Za-z0-9_]*\}?`)

// routePattern returns the route that serves method and path, or "" when
// none does. A catch-all match does not count: the pattern must name the
// method, and a pattern ending in "/" (a subtree) must match exactly.
func routePattern(mux *http.ServeMux, method, path string) string {
	r := httptest.NewRequest(method, path, nil)
	_, pattern := mux.Handler(r)
	m, p, ok := strings.Cut(pattern, " ")
	if !ok || m != method || (strings.HasSuffix(p, "/") && p != path) {
		return ""
	}
	return pattern
}

// sourceRoutes returns the method-qualified route patterns registered in
// main.go, read from its source.
func sourceRoutes(t *testing.T) []string {
	t.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "main.go", nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	pat := regexp.MustCompile(`^(GET|POST|PUT|PATCH|DELETE) /`)
	var out []string
	ast.Inspect(f, func(n ast.Node) bool {
		if call, ok := n.(*ast.CallExpr); ok && len(call.Args) == 2 {
			if lit, ok := call.Args[0].(*ast.BasicLit); ok && lit.Kind == token.STRING {
				if v, err := strconv.Unquote(lit.Value); err == nil && pat.MatchString(v) {
					out = append(out, v)
				}
			}
		}
		return true
	})
	return out
}

func TestCurlExamplesHitRoutes(t *testing.T) {
	env := newTestEnv(t)
	mux, ok := env.app.handler.(*http.ServeMux)
	if !ok {
		t.Fatalf("app.handler is a %T, not the *http.ServeMux from routes(): teach this test to reach the mux", env.app.handler)
	}

	// The checker itself must refuse what is not a route.
	for _, bad := range [][2]string{{"GET", "/admin/nope"}, {"GET", "/v1/messages"}, {"POST", "/v1/nope"},
		{"GET", "/web"}, {"PATCH", "/admin/channels/1"}} {
		if p := routePattern(mux, bad[0], bad[1]); p != "" {
			t.Errorf("routePattern(%s %s) = %q; want no route", bad[0], bad[1], p)
		}
	}

	covered := map[string]map[string]bool{} // doc → patterns its examples reach
	for _, doc := range readmes {
		covered[doc] = map[string]bool{}
		examples := curlExamples(t, readFile(t, doc))
		if len(examples) < 10 {
			t.Errorf("%s: found %d curl examples; the parser or the document lost them", doc, len(examples))
		}
		for _, ex := range examples {
			if ex.url.Host == "github.com" { // release downloads
				continue
			}
			path := shellVar.ReplaceAllString(ex.url.Path, "1")
			p := routePattern(mux, ex.method, path)
			if p == "" {
				t.Errorf("%s: %s %s is not a route of ccload: %s", doc, ex.method, path, ex.line)
				continue
			}
			covered[doc][p] = true
		}
	}

	// Every admin route (and login/logout) has an example, in both
	// languages.
	routes := sourceRoutes(t)
	if len(routes) < 10 {
		t.Fatalf("found %d routes in main.go: %v", len(routes), routes)
	}
	for _, p := range routes {
		_, path, _ := strings.Cut(p, " ")
		if !strings.HasPrefix(path, "/admin/") && path != "/login" && path != "/logout" {
			continue
		}
		for _, doc := range readmes {
			if !covered[doc][p] {
				t.Errorf("%s has no curl example for %s", doc, p)
			}
		}
	}
	for p := range covered[readmes[0]] {
		if !covered[readmes[1]][p] {
			t.Errorf("%s has an example for %s; %s does not", readmes[0], p, readmes[1])
		}
	}
	for p := range covered[readmes[1]] {
		if !covered[readmes[0]][p] {
			t.Errorf("%s has an example for %s; %s does not", readmes[1], p, readmes[0])
		}
	}
}

func TestShellCommands(t *testing.T) {
	src := "TOKEN=$(curl -s http://h/login \\\n  -d '{\"a\": 1}' | jq -r .token)\n" +
		"curl -X PUT \"http://h/x/$ID\" -H \"A: b c\" # note\ncurl -F file=@f.csv http://h/i\n"
	var got []string
	for _, words := range shellCommands(src) {
		if words[0] == "curl" {
			m, u := parseCurl(words)
			got = append(got, m+" "+u)
		}
	}
	want := []string{"POST http://h/login", "PUT http://h/x/$ID", "POST http://h/i"}
	if !slices.Equal(got, want) {
		t.Errorf("got %q; want %q", got, want)
	}
}

// The README gives the two commands a newcomer needs, and .ci/run ends by
// running exactly the test command it gives.
func TestReadmeCommands(t *testing.T) {
	const runCmd, testCmd = "go run .", "go test -race -count=1 ./..."
	for _, doc := range readmes {
		text := readFile(t, doc)
		for _, cmd := range []string{runCmd, testCmd} {
			if !strings.Contains(text, "```sh\n"+cmd+"\n```") {
				t.Errorf("%s lacks a sh block with just %q", doc, cmd)
			}
		}
	}
	var last string
	for line := range strings.Lines(readFile(t, ".ci/run")) {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
			last = line
		}
	}
	if last != testCmd {
		t.Errorf(".ci/run ends with %q; want %q", last, testCmd)
	}
}

// The Dockerfile builds the binary the way scripts/build-release.sh does.
func TestReleaseBuildFlagsMatch(t *testing.T) {
	docker := readFile(t, "Dockerfile")
	script := readFile(t, "scripts/build-release.sh")
	ldflags := regexp.MustCompile(`-ldflags "(-s -w -X main\.version=)\$[A-Za-z_]+"`)
	dm := ldflags.FindStringSubmatch(docker)
	sm := regexp.MustCompile(`ldflags="(-s -w -X main\.version=)\$[A-Za-z_]+"`).FindStringSubmatch(script)
	if dm == nil || sm == nil || dm[1] != sm[1] {
		t.Errorf("ldflags differ: Dockerfile %q, build-release.sh %q", dm, sm)
	}
	for _, want := range []string{"CGO_ENABLED=0", "go build -trimpath"} {
		if !strings.Contains(docker, want) || !strings.Contains(script, want) {
			t.Errorf("Dockerfile and scripts/build-release.sh must both run %q", want)
		}
	}
	// -X main.version must name a string variable of package main, or the
	// linker ignores it without a word.
	f, err := parser.ParseFile(token.NewFileSet(), "main.go", nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, d := range f.Decls {
		if g, ok := d.(*ast.GenDecl); ok && g.Tok == token.VAR {
			for _, s := range g.Specs {
				for _, n := range s.(*ast.ValueSpec).Names {
					found = found || n.Name == "version"
				}
			}
		}
	}
	if !found {
		t.Error("main.go has no package-level var version for -X main.version")
	}
}

// Docker and systemd wait longer than ccload's own shutdown grace before
// they kill it, so streams in flight can finish.
func TestStopGraceExceedsShutdownTimeout(t *testing.T) {
	cfg, err := loadConfig(func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ file, re string }{
		{"docker-compose.yml", `(?m)^\s*stop_grace_period:\s*(\S+)`},
		{"deploy/ccload.service", `(?m)^TimeoutStopSec=(\S+)`},
	} {
		m := regexp.MustCompile(c.re).FindStringSubmatch(readFile(t, c.file))
		if m == nil {
			t.Errorf("%s sets no stop timeout", c.file)
			continue
		}
		d, err := time.ParseDuration(m[1])
		if err != nil {
			t.Errorf("%s: %v", c.file, err)
			continue
		}
		if d <= cfg.ShutdownTimeout {
			t.Errorf("%s: stop timeout %s; want more than CCLOAD_SHUTDOWN_TIMEOUT's default %s", c.file, d, cfg.ShutdownTimeout)
		}
	}
}
