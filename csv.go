package main

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"mime"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// CSV export and import of channels (README "CSV import and export"). The export is a backup and
// carries full keys. An import is one transaction: a file with any bad row
// changes nothing, and its answer lists every problem by line and column.

const (
	maxImportBody     = 10 << 20
	maxImportProblems = 1000 // listed in one answer; the count says how many more
	// maxImportRows bounds how long an import holds the database's write
	// lock (about 40µs a row); real setups have tens of channels.
	maxImportRows = 10000
	// maxImportCells bounds the cells of the header and of each row: a
	// channel has ten fields, and a spreadsheet may add a few columns of
	// its own. Without it a header of a million empty columns took 4.8 GB
	// (a map per row, sized to the header).
	maxImportCells = 100
	// maxImportCell bounds one cell: room for thousands of keys, not for
	// one cell of half a million that each become a string and a map entry.
	maxImportCell = 256 << 10
)

// csvColumns is the export's header, in order. Each is also the name of the
// field it carries in the admin API.
var csvColumns = []string{"id", "name", "api_key", "url", "priority", "models", "model_redirects",
	"channel_type", "key_strategy", "enabled", "price_multiplier"}

// csvAliases maps a header name, as headerKey normalises it, to its field.
// People write headers in English or Chinese, with any case and spacing.
var csvAliases = func() map[string]string {
	names := map[string][]string{
		"id":               {"id", "编号", "渠道id", "channel id"},
		"name":             {"name", "名称", "渠道名称", "渠道名", "名字", "channel name"},
		"api_key":          {"api_key", "api_keys", "apikey", "key", "keys", "密钥", "api密钥", "秘钥", "api秘钥", "密钥列表"},
		"url":              {"url", "base_url", "api_url", "地址", "url地址", "api地址", "接口地址", "渠道地址", "endpoint"},
		"priority":         {"priority", "优先级"},
		"models":           {"models", "model", "模型", "模型列表", "支持模型", "支持的模型"},
		"model_redirects":  {"model_redirects", "model_redirect", "redirects", "模型重定向", "重定向", "模型映射", "model_mapping"},
		"channel_type":     {"channel_type", "type", "渠道类型", "类型", "协议", "protocol"},
		"key_strategy":     {"key_strategy", "strategy", "密钥策略", "key策略", "密钥使用策略", "key使用策略"},
		"enabled":          {"enabled", "enable", "status", "启用", "状态", "是否启用", "启用状态"},
		"price_multiplier": {"price_multiplier", "multiplier", "价格倍率", "倍率", "价格系数"},
	}
	m := make(map[string]string)
	for field, l := range names {
		for _, n := range l {
			m[headerKey(n)] = field
		}
	}
	return m
}()

// headerKey normalises a header cell: "API Key", "api_key" and "Api-Key"
// are one name.
func headerKey(s string) string {
	s = strings.ToLower(strings.TrimSpace(strings.TrimPrefix(s, "\ufeff")))
	return strings.Map(func(r rune) rune {
		switch r {
		case ' ', '_', '-', '*', '\u3000':
			return -1
		}
		return r
	}, s)
}

func (a *admin) handleExportChannels() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		chs, err := a.store.ListChannels(r.Context())
		if err != nil {
			return err
		}
		name := "ccload-channels-" + a.now().Format("20060102-1504") + ".csv"
		h := w.Header()
		h.Set("Content-Type", "text/csv; charset=utf-8")
		h.Set("Content-Disposition", fmt.Sprintf(`attachment; filename="%s"; filename*=UTF-8''%s`, name, url.PathEscape(name)))
		h.Set("Cache-Control", "no-store") // it holds every key
		h.Set("X-Content-Type-Options", "nosniff")
		w.WriteHeader(http.StatusOK)
		// Excel reads a CSV without a BOM in the local code page, which
		// garbles Chinese names.
		io.WriteString(w, "\ufeff")
		cw := csv.NewWriter(w)
		cw.UseCRLF = true
		cw.Write(csvColumns)
		for _, c := range chs {
			cw.Write(csvRecord(c))
		}
		cw.Flush()
		if err := cw.Error(); err != nil {
			slog.Warn("channel export cut short", "err", err)
		}
		return nil
	})
}

// csvRecord is one channel in csvColumns order.
func csvRecord(c Channel) []string {
	redirects := ""
	if len(c.ModelRedirects) > 0 {
		var b bytes.Buffer
		enc := json.NewEncoder(&b)
		enc.SetEscapeHTML(false) // keep "<" readable in a spreadsheet
		enc.Encode(c.ModelRedirects)
		redirects = strings.TrimSpace(b.String())
	}
	rec := []string{
		strconv.FormatInt(c.ID, 10),
		c.Name,
		strings.Join(c.APIKeys, ","),
		c.URL,
		strconv.Itoa(c.Priority),
		strings.Join(c.Models, ","),
		redirects,
		c.Type,
		c.KeyStrategy,
		strconv.FormatBool(c.Enabled),
		strconv.FormatFloat(storedMultiplier(&c), 'f', -1, 64),
	}
	for i, v := range rec {
		rec[i] = neutralizeCell(v)
	}
	return rec
}

// A spreadsheet runs a cell that starts with =, +, -, @, tab or CR as a
// formula: a channel named =HYPERLINK(…&C2) would send the key column
// anywhere once the export is opened. The export puts a ' before such a
// cell (OWASP's advice), which spreadsheets read as "text"; the import
// takes exactly that ' off again, so export → import gives back every
// value as it was. A value that itself starts with quotes before a
// formula character gets one more, so the rule stays reversible.
func neutralizeCell(v string) string {
	if formulaStart(strings.TrimLeft(v, "'")) {
		return "'" + v
	}
	return v
}

// plainCell undoes neutralizeCell.
func plainCell(v string) string {
	if strings.HasPrefix(v, "'") && formulaStart(strings.TrimLeft(v, "'")) {
		return v[1:]
	}
	return v
}

// formulaStart reports whether a spreadsheet would evaluate v. A plain
// negative number (a priority of -1) is data, not a formula, and is left
// as it is so the export stays readable.
func formulaStart(v string) bool {
	if v == "" || strings.IndexByte("=+-@\t\r", v[0]) < 0 {
		return false
	}
	_, err := strconv.Atoi(v)
	return err != nil
}

// importProblem is one thing wrong with an import file. Column is the
// field's English name ("" for the whole row); Line is the text line where
// the row starts (the spreadsheet row, unless a cell above holds line
// breaks).
type importProblem struct {
	Line    int    `json:"line"`
	Column  string `json:"column"`
	Message string `json:"message"`
}

// importError is an import refused for the problems it lists.
type importError struct{ problems []importProblem }

// Is makes an import refused for its rows a bad request.
func (e *importError) Is(target error) bool { return target == errInvalid }

// details lists the problems beside the message (see writeAPIError).
func (e *importError) details() map[string]any {
	shown := e.problems[:min(len(e.problems), maxImportProblems)]
	return map[string]any{"problems": shown, "problem_count": len(e.problems)}
}

func (e *importError) Error() string {
	p := e.problems[0]
	where := fmt.Sprintf("line %d", p.Line)
	if p.Column != "" {
		where += ", " + p.Column
	}
	n := len(e.problems)
	s := "s"
	if n == 1 {
		s = ""
	}
	return fmt.Sprintf("nothing was imported: the file has %d problem%s; the first, on %s: %s", n, s, where, p.Message)
}

// importResult counts what an import did, row by row.
type importResult struct {
	Created        int      `json:"created"`
	Updated        int      `json:"updated"`
	Unchanged      int      `json:"unchanged"`
	IgnoredColumns []string `json:"ignored_columns"` // header cells naming no field
}

// importFile is a parsed import: the header mapped to fields, the rows, and
// whatever was wrong with the text itself.
type importFile struct {
	fields   []string // field of each column; "" for an ignored one
	ignored  []string
	rows     []importRow
	problems []importProblem
}

// importRow holds the cells of one row by field, for the columns the file
// has. A column the file lacks is absent; a cell left empty is "".
type importRow struct {
	line  int
	cells map[string]string
}

func (a *admin) handleImportChannels() http.Handler {
	return apiHandler(func(w http.ResponseWriter, r *http.Request) error {
		data, err := readImportBody(w, r)
		if err != nil {
			return err
		}
		f := parseImportFile(data)
		var res importResult
		err = a.changeChannels(r.Context(), func() error {
			var err error
			res, err = a.store.ImportChannels(r.Context(), f)
			return err
		})
		if err != nil {
			return err
		}
		slog.Info("channels imported", "created", res.Created, "updated", res.Updated, "unchanged", res.Unchanged)
		writeJSON(w, http.StatusOK, res)
		return nil
	})
}

// readImportBody returns the uploaded file: the multipart field "file", or
// the whole body of any other request that is not JSON or a form.
func readImportBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	r.Body = http.MaxBytesReader(w, r.Body, maxImportBody)
	mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	switch mt {
	case "multipart/form-data":
		mr, err := r.MultipartReader()
		if err != nil {
			return nil, invalid("malformed multipart body: %v", err)
		}
		for {
			p, err := mr.NextPart()
			if err == io.EOF {
				return nil, invalid(`the multipart body has no field "file": send the CSV file in a field named "file"`)
			}
			if err != nil {
				return nil, bodyError(err)
			}
			if p.FormName() == "file" {
				b, err := io.ReadAll(p)
				if err != nil {
					return nil, bodyError(err)
				}
				return b, nil
			}
		}
	case "application/json", "application/x-www-form-urlencoded":
		return nil, &apiError{http.StatusUnsupportedMediaType,
			`send the CSV file as a text/csv body or as the multipart field "file"`}
	}
	b, err := io.ReadAll(r.Body)
	if err != nil {
		return nil, bodyError(err)
	}
	return b, nil
}

// bodyError keeps a too-large body a 413 and makes any other read failure
// of the upload a 400.
func bodyError(err error) error {
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) || errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	return invalid("reading the upload: %v", err)
}

// parseImportFile reads the CSV. It never fails outright: problems with the
// text are recorded in the result, with as many rows as could be read.
func parseImportFile(data []byte) *importFile {
	f := &importFile{}
	text, err := csvText(data)
	if err != nil {
		f.problems = append(f.problems, *err)
		return f
	}
	if strings.TrimSpace(text) == "" {
		f.problems = append(f.problems, importProblem{1, "", "the file is empty: expected a header line such as " + strings.Join(csvColumns, ",")})
		return f
	}
	comma := sniffDelimiter(text)
	// csv.Reader holds a whole record before anyone can count its cells,
	// so a row of nine million commas must be refused before it is read.
	if line, msg := cellsWithin(text, byte(comma), maxImportCells, maxImportCell); msg != "" {
		f.problems = append(f.problems, importProblem{line, "", msg})
		return f
	}
	cr := csv.NewReader(strings.NewReader(text))
	cr.Comma = comma
	cr.FieldsPerRecord = -1
	cr.TrimLeadingSpace = true
	header, err2 := cr.Read()
	if err2 != nil {
		f.problems = append(f.problems, csvSyntaxProblem(err2))
		return f
	}
	headerLine, _ := cr.FieldPos(0)
	f.fields = make([]string, len(header))
	first := map[string]string{} // field → the header cell that gave it
	for i, h := range header {
		h = strings.TrimSpace(strings.TrimPrefix(h, "\ufeff"))
		field := csvAliases[headerKey(h)]
		if field == "" {
			if h != "" {
				f.ignored = append(f.ignored, h)
			}
			continue
		}
		if prev, dup := first[field]; dup {
			f.problems = append(f.problems, importProblem{headerLine, field,
				fmt.Sprintf("columns %q and %q both give %s: keep one", prev, h, field)})
			continue
		}
		first[field] = h
		f.fields[i] = field
	}
	if first["name"] == "" && first["id"] == "" {
		f.problems = append(f.problems, importProblem{headerLine, "",
			fmt.Sprintf("the header %q names neither a name nor an id column: expected columns such as %s (or 名称, 密钥, 地址 …)",
				clip(strings.Join(header, string(cr.Comma)), 120), strings.Join(csvColumns, ","))})
		return f
	}
	for {
		rec, err := cr.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			// After a syntax error the reader's idea of where cells start
			// cannot be trusted, so the rest of the file is not read.
			f.problems = append(f.problems, csvSyntaxProblem(err))
			break
		}
		line, _ := cr.FieldPos(0)
		if blankRecord(rec) {
			continue // spreadsheets leave rows of empty cells at the end
		}
		if len(rec) > len(f.fields) && !blankRecord(rec[len(f.fields):]) {
			f.problems = append(f.problems, importProblem{line, "",
				fmt.Sprintf("the row has %d cells but the header has %d: a cell holding a comma must be in double quotes", len(rec), len(f.fields))})
			continue
		}
		if len(f.rows) == maxImportRows {
			f.problems = append(f.problems, importProblem{line, "",
				fmt.Sprintf("the file has more than %d channels: split it into several files", maxImportRows)})
			break
		}
		row := importRow{line: line, cells: make(map[string]string, len(f.fields))}
		for i, field := range f.fields {
			if field == "" {
				continue
			}
			v := ""
			if i < len(rec) {
				v = plainCell(rec[i])
			}
			row.cells[field] = v
		}
		f.rows = append(f.rows, row)
	}
	return f
}

// csvText returns the upload as UTF-8 text without a byte-order mark. Excel
// writes UTF-8 with a BOM ("CSV UTF-8") or UTF-16 ("Unicode text"); its
// plain "CSV" is in the local code page, which is refused with a hint
// rather than guessed at.
func csvText(b []byte) (string, *importProblem) {
	switch {
	case bytes.HasPrefix(b, []byte{0xEF, 0xBB, 0xBF}):
		b = b[3:]
	case bytes.HasPrefix(b, []byte{0xFF, 0xFE}), bytes.HasPrefix(b, []byte{0xFE, 0xFF}):
		if len(b)%2 != 0 {
			return "", &importProblem{1, "", "the file starts like UTF-16 text but has an odd number of bytes"}
		}
		u := make([]uint16, 0, len(b)/2-1)
		for i := 2; i < len(b); i += 2 {
			if b[0] == 0xFF {
				u = append(u, uint16(b[i])|uint16(b[i+1])<<8)
			} else {
				u = append(u, uint16(b[i])<<8|uint16(b[i+1]))
			}
		}
		return string(utf16.Decode(u)), nil
	}
	if !utf8.Valid(b) {
		bad := 0
		for bad < len(b) {
			r, n := utf8.DecodeRune(b[bad:])
			if r == utf8.RuneError && n == 1 {
				break
			}
			bad += n
		}
		return "", &importProblem{bytes.Count(b[:bad], []byte{'\n'}) + 1, "",
			`the file is not UTF-8 text (Excel's plain "CSV" uses the local code page): save it as "CSV UTF-8", or export it from ccload again`}
	}
	return string(b), nil
}

// cellsWithin checks that every record of text has at most limit cells and
// every cell at most maxCell bytes; if not, it returns the line where the
// record starts and what is wrong. It follows the quoting csv.Reader reads
// (a quote opens a cell only at its start, after any spaces, and "" inside
// is one quote) without allocating.
func cellsWithin(text string, comma byte, limit, maxCell int) (line int, msg string) {
	line, start := 1, 1
	cells, inQuote, atStart := 1, false, true
	cellStart := 0
	for i := 0; i < len(text); i++ {
		c := text[i]
		if i-cellStart > maxCell {
			return start, fmt.Sprintf("a cell is longer than %s", formatBytes(int64(maxCell)))
		}
		if inQuote {
			switch {
			case c == '"' && i+1 < len(text) && text[i+1] == '"':
				i++
			case c == '"':
				inQuote = false
			case c == '\n':
				line++
			}
			continue
		}
		switch {
		case c == comma:
			if cells++; cells > limit {
				return start, fmt.Sprintf("the line has more than %d cells: a channel has %d fields", limit, len(csvColumns))
			}
			atStart, cellStart = true, i
		case c == '\n':
			line++
			start, cells, atStart, cellStart = line, 1, true, i
		case c == '"' && atStart:
			inQuote, atStart = true, false
		case c == ' ' || c == '\r':
		default:
			atStart = false
		}
	}
	return 0, ""
}

// sniffDelimiter picks the separator the header line uses: a comma, or the
// semicolon or tab that spreadsheets in some locales write instead.
func sniffDelimiter(text string) rune {
	line, _, _ := strings.Cut(text, "\n")
	best, n := ',', strings.Count(line, ",")
	for _, d := range []rune{';', '\t'} {
		if c := strings.Count(line, string(d)); c > n {
			best, n = d, c
		}
	}
	return best
}

func csvSyntaxProblem(err error) importProblem {
	var pe *csv.ParseError
	if !errors.As(err, &pe) {
		return importProblem{1, "", err.Error()}
	}
	msg := fmt.Sprintf("CSV syntax error at character %d: %v", pe.Column, pe.Err)
	if errors.Is(pe.Err, csv.ErrBareQuote) || errors.Is(pe.Err, csv.ErrQuote) {
		msg += `; a cell holding quotes must be in double quotes itself, with each quote inside doubled ("")`
	}
	return importProblem{pe.Line, "", msg}
}

func blankRecord(rec []string) bool {
	for _, v := range rec {
		if strings.TrimSpace(v) != "" {
			return false
		}
	}
	return true
}

// clip shortens s for a message.
func clip(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	return string([]rune(s)[:n]) + "…"
}

// ImportChannels applies an import file in one transaction: every row
// creates or updates a channel, or changes nothing, or the whole file is
// refused with an *importError listing every problem.
func (s *Store) ImportChannels(ctx context.Context, f *importFile) (importResult, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return importResult{}, err
	}
	defer tx.Rollback()
	existing, err := listChannels(ctx, tx)
	if err != nil {
		return importResult{}, err
	}
	plan := planImport(existing, f)
	if len(plan.problems) > 0 {
		return importResult{}, &importError{plan.problems}
	}
	now := s.now()
	// A file may swap two names or hand one channel's name to another that
	// it renames too; the UNIQUE index would refuse the first of those
	// updates, so renamed channels step aside first, under names no channel
	// can have (stored names are trimmed). Not NUL-prefixed: NOCASE stops
	// comparing at a NUL, so all such names would clash.
	for _, u := range plan.updates {
		if u.old.Name != u.ch.Name {
			if _, err := tx.ExecContext(ctx, `UPDATE channels SET name = ? WHERE id = ?`,
				fmt.Sprintf(" renaming %d", u.ch.ID), u.ch.ID); err != nil {
				return importResult{}, fmt.Errorf("import: %w", err)
			}
		}
	}
	for i := range plan.updates {
		if err := updateChannel(ctx, tx, &plan.updates[i].ch, now); err != nil {
			return importResult{}, err
		}
	}
	// Rows that bring their own id go first, so that SQLite cannot hand
	// one of those ids to a row without one.
	slices.SortStableFunc(plan.creates, func(a, b Channel) int {
		return boolInt(a.ID == 0) - boolInt(b.ID == 0)
	})
	for i := range plan.creates {
		if err := s.assignID(ctx, &plan.creates[i]); err != nil {
			return importResult{}, err
		}
		if err := insertChannel(ctx, tx, &plan.creates[i], now); err != nil {
			return importResult{}, err
		}
	}
	if err := tx.Commit(); err != nil {
		return importResult{}, err
	}
	if plan.result.Created+plan.result.Updated > 0 {
		s.changed()
	}
	return plan.result, nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// importPlan is what a file would do to the channels it was checked
// against.
type importPlan struct {
	creates  []Channel
	updates  []channelUpdate
	result   importResult
	problems []importProblem
}

type channelUpdate struct {
	old Channel
	ch  Channel
}

// planImport matches each row to a channel (by id when that id exists,
// else by name, else a new one), validates it as the admin API would, and
// checks that the names come out unique. It changes nothing.
func planImport(existing []Channel, f *importFile) importPlan {
	plan := importPlan{problems: slices.Clone(f.problems)}
	plan.result.IgnoredColumns = nonNil(f.ignored)
	byID := make(map[int64]*Channel, len(existing))
	byName := make(map[string]*Channel, len(existing))
	for i := range existing {
		byID[existing[i].ID] = &existing[i]
		byName[foldName(existing[i].Name)] = &existing[i]
	}
	ids := map[int64]int{} // id cell → line
	type claim struct {
		line int
		name string // the row's name cell
	}
	claimed := map[int64]claim{} // existing channel → the row that changes it
	type nameUse struct {
		line int   // 0: a channel the file leaves alone
		id   int64 // the channel, when it exists
		name string
	}
	var uses []nameUse

	for _, row := range f.rows {
		var probs []importProblem
		bad := func(col, format string, a ...any) {
			probs = append(probs, importProblem{row.line, col, fmt.Sprintf(format, a...)})
		}
		var id int64
		if v := strings.TrimSpace(row.cells["id"]); v != "" {
			n, err := strconv.ParseInt(v, 10, 64)
			switch {
			case err != nil || n <= 0:
				bad("id", "id %q is not a positive whole number", clip(v, 40))
			case ids[n] != 0:
				bad("id", "id %d is also on line %d", n, ids[n])
			default:
				ids[n] = row.line
				id = n
			}
		}
		name, hasName := row.cells["name"]
		name = strings.TrimSpace(name)
		target := byID[id]
		byNameMatch := false
		if target == nil && name != "" {
			target, byNameMatch = byName[foldName(name)], true
		}
		conflict := false
		if target != nil {
			if cl, ok := claimed[target.ID]; ok {
				conflict = true
				switch {
				case !byNameMatch:
					bad("id", "channel %d is also changed by line %d", target.ID, cl.line)
				case foldName(cl.name) == foldName(name):
					bad("name", "duplicate name %q: line %d has it too (names are unique, ignoring case)", name, cl.line)
				default:
					bad("name", "name %q matches channel %d, which line %d already changes", name, target.ID, cl.line)
				}
			} else {
				claimed[target.ID] = claim{row.line, name}
			}
		}
		create := target == nil
		base := Channel{ID: id, Enabled: true}
		if !create {
			base = cloneChannel(*target)
		}
		in := rowInput(row, create, bad)
		if create {
			for _, field := range []string{"name", "url", "api_key"} {
				if _, ok := in[field]; !ok {
					bad(field, "%s is required for a new channel (this row matches no existing id or name)", field)
				}
			}
		}
		// Each field alone, so that every bad cell of the row is reported,
		// not only the first apply would stop at.
		for _, field := range csvColumns {
			raw, ok := in[field]
			if !ok {
				continue
			}
			probe := cloneChannel(base)
			if err := probe.applyField(field, raw); err != nil {
				bad(field, "%s", cellMessage(err, field, row.cells[field]))
			}
		}
		finalName := name
		if !hasName && target != nil {
			finalName = target.Name
		}
		if len(probs) == 0 && !conflict {
			c := base
			err := c.apply(in)
			if err == nil {
				err = c.validate()
			}
			if err != nil {
				bad("", "%v", err)
			} else {
				finalName = c.Name
				switch {
				case create:
					plan.creates = append(plan.creates, c)
					plan.result.Created++
				case sameChannel(*target, c):
					plan.result.Unchanged++
				default:
					plan.updates = append(plan.updates, channelUpdate{old: *target, ch: c})
					plan.result.Updated++
				}
			}
		}
		plan.problems = append(plan.problems, probs...)
		if !conflict && finalName != "" {
			var tid int64
			if target != nil {
				tid = target.ID
			}
			uses = append(uses, nameUse{row.line, tid, finalName})
		}
	}

	// Names must come out unique, against each other and against the
	// channels the file leaves alone (a row can rename a channel by id).
	for _, c := range existing {
		if _, ok := claimed[c.ID]; !ok {
			uses = append(uses, nameUse{0, c.ID, c.Name})
		}
	}
	byFinal := map[string][]nameUse{}
	for _, u := range uses {
		k := foldName(u.name)
		byFinal[k] = append(byFinal[k], u)
	}
	for _, group := range byFinal {
		if len(group) < 2 {
			continue
		}
		var kept *nameUse
		for i := range group {
			if group[i].line == 0 {
				kept = &group[i]
			}
		}
		firstLine := 0
		for _, u := range group {
			switch {
			case u.line == 0:
			case kept != nil:
				plan.problems = append(plan.problems, importProblem{u.line, "name",
					fmt.Sprintf("name %q is already taken by channel %d, which this file does not change", u.name, kept.id)})
			case firstLine == 0 || u.line == firstLine:
				firstLine = u.line
			default:
				plan.problems = append(plan.problems, importProblem{u.line, "name",
					fmt.Sprintf("duplicate name %q: line %d has it too (names are unique, ignoring case)", u.name, firstLine)})
			}
		}
	}
	slices.SortStableFunc(plan.problems, func(a, b importProblem) int { return a.Line - b.Line })
	return plan
}

// rowInput turns a row into the admin API's input. An empty cell means the
// field's default (no models, priority 0, enabled, …), because that is how
// the export writes those defaults; an empty key cell on an existing
// channel keeps its keys, so that a file shared with the keys blanked out
// can still update everything else.
func rowInput(row importRow, create bool, bad func(col, format string, a ...any)) map[string]json.RawMessage {
	in := make(map[string]json.RawMessage, len(row.cells))
	str := func(v string) json.RawMessage {
		b, _ := json.Marshal(v)
		return b
	}
	for _, field := range csvColumns { // in order: problems come out in column order
		v, ok := row.cells[field]
		if !ok {
			continue
		}
		t := strings.TrimSpace(v)
		switch field {
		case "id":
			continue
		case "api_key", "models":
			if t == "" && field == "api_key" && !create {
				continue
			}
			if strings.HasPrefix(t, "[") {
				// A JSON list, as the seed project's export wrote models.
				var l []string
				if err := json.Unmarshal([]byte(t), &l); err != nil {
					if field == "api_key" {
						bad(field, "api_key starts with [ but is not a JSON list of strings")
					} else {
						bad(field, "models %q starts with [ but is not a JSON list of strings", clip(t, 60))
					}
					continue
				}
				in[field], _ = json.Marshal(l)
				continue
			}
			in[field] = str(t)
		case "priority":
			if t == "" {
				t = "0"
			}
			in[field] = str(t)
		case "enabled":
			if t == "" {
				t = "true"
			}
			in[field] = str(t)
		default:
			in[field] = str(t)
		}
	}
	return in
}

// cellMessage is the admin API's message for a bad value, with the value
// added when the message lacks it (never a key: those stay out of answers).
func cellMessage(err error, field, v string) string {
	msg := err.Error()
	v = strings.TrimSpace(v)
	if field == "api_key" || v == "" || strings.Contains(msg, strconv.Quote(v)) {
		return msg
	}
	return fmt.Sprintf("%s (got %q)", msg, clip(v, 60))
}

// foldName is the name comparison of the channels table (COLLATE NOCASE),
// which folds ASCII letters only: the import must agree with the UNIQUE
// index about which names clash.
func foldName(s string) string {
	return strings.Map(func(r rune) rune {
		if 'A' <= r && r <= 'Z' {
			return r + ('a' - 'A')
		}
		return r
	}, s)
}

func cloneChannel(c Channel) Channel {
	c.APIKeys = slices.Clone(c.APIKeys)
	c.Models = slices.Clone(c.Models)
	c.ModelRedirects = maps.Clone(c.ModelRedirects)
	return c
}

// sameChannel reports whether b would store what a holds.
func sameChannel(a, b Channel) bool {
	return a.Name == b.Name && a.URL == b.URL && slices.Equal(a.APIKeys, b.APIKeys) && a.Type == b.Type &&
		a.Priority == b.Priority && slices.Equal(a.Models, b.Models) && maps.Equal(a.ModelRedirects, b.ModelRedirects) &&
		a.KeyStrategy == b.KeyStrategy && a.Enabled == b.Enabled && storedMultiplier(&a) == storedMultiplier(&b)
}
