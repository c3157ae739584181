package main

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"fmt"
	"io/fs"
	"net/http"
	"path"
	"strconv"
	"strings"
)

// The web admin: plain HTML, CSS and JavaScript modules, embedded in the
// binary so it works offline and needs no build step.
//
//go:embed static
var staticFiles embed.FS

// webCSP allows nothing but our own files: no inline script or style, no
// eval, no framing. The pages are written to need nothing more.
const webCSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; " +
	"connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// webTypes maps the extensions we ship to their content types. It is
// explicit because mime.TypeByExtension reads the host's tables, and a
// module script served with the wrong type does not run.
var webTypes = map[string]string{
	".html": "text/html; charset=utf-8",
	".css":  "text/css; charset=utf-8",
	".js":   "text/javascript; charset=utf-8",
	".svg":  "image/svg+xml",
	".png":  "image/png",
	".ico":  "image/x-icon",
	".json": "application/json",
	".txt":  "text/plain; charset=utf-8",
}

// webAsset is one embedded file, with what serving it needs computed once.
type webAsset struct {
	body   []byte
	gz     []byte // gzip of body, or nil when it would not be smaller
	ctype  string
	etag   string
	gzEtag string
}

// webHandler serves the embedded files under /web/.
type webHandler struct {
	assets map[string]*webAsset // by path relative to static/, e.g. "pages/logs.js"
}

// newWebHandler prepares every file of fsys (the static directory). The
// files are part of the binary, so a failure here is a build mistake and
// panics.
func newWebHandler(fsys fs.FS) *webHandler {
	h := &webHandler{assets: map[string]*webAsset{}}
	err := fs.WalkDir(fsys, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		ctype, ok := webTypes[path.Ext(p)]
		if !ok {
			return fmt.Errorf("static/%s: no content type for %q; add it to webTypes", p, path.Ext(p))
		}
		body, err := fs.ReadFile(fsys, p)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(body)
		tag := hex.EncodeToString(sum[:12])
		a := &webAsset{body: body, ctype: ctype, etag: `"` + tag + `"`, gzEtag: `"` + tag + `-gz"`}
		if strings.HasPrefix(ctype, "text/") || ctype == "image/svg+xml" || ctype == "application/json" {
			var buf bytes.Buffer
			zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
			zw.Write(body)
			zw.Close()
			if buf.Len() < len(body) {
				a.gz = buf.Bytes()
			}
		}
		h.assets[p] = a
		return nil
	})
	if err != nil {
		panic("web admin files: " + err.Error())
	}
	if h.assets["index.html"] == nil {
		panic("web admin files: static/index.html is missing")
	}
	return h
}

// webStatic returns the embedded static directory.
func webStatic() fs.FS {
	sub, err := fs.Sub(staticFiles, "static")
	if err != nil {
		panic(err)
	}
	return sub
}

// setWebSecurityHeaders is applied to every answer under /web/, 404s too.
func setWebSecurityHeaders(h http.Header) {
	h.Set("Content-Security-Policy", webCSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.Set("Cross-Origin-Resource-Policy", "same-origin")
}

func (h *webHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	hdr := w.Header()
	setWebSecurityHeaders(hdr)
	name := strings.TrimPrefix(r.URL.Path, "/web/")
	if name == "" {
		name = "index.html"
	}
	a := h.assets[name]
	if a == nil || name != path.Clean(name) {
		hdr.Set("Content-Type", "text/plain; charset=utf-8")
		hdr.Set("Cache-Control", "no-store")
		w.WriteHeader(http.StatusNotFound)
		fmt.Fprintf(w, "404: no file %q in the web admin\n", name)
		return
	}
	body, etag := a.body, a.etag
	if a.gz != nil {
		hdr.Set("Vary", "Accept-Encoding")
		if acceptsGzip(r.Header.Get("Accept-Encoding")) {
			body, etag = a.gz, a.gzEtag
			hdr.Set("Content-Encoding", "gzip")
		}
	}
	hdr.Set("Content-Type", a.ctype)
	// The files change only with the binary, but their names do not, so
	// browsers must revalidate each time; the ETag makes that a 304.
	hdr.Set("Cache-Control", "no-cache")
	hdr.Set("ETag", etag)
	if etagMatch(r.Header.Get("If-None-Match"), etag) {
		hdr.Del("Content-Encoding")
		w.WriteHeader(http.StatusNotModified)
		return
	}
	hdr.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		w.Write(body)
	}
}

// acceptsGzip reports whether an Accept-Encoding value allows gzip (by name
// or by *), honouring q=0 as a refusal.
func acceptsGzip(v string) bool {
	ok := false
	for part := range strings.SplitSeq(v, ",") {
		coding, params, _ := strings.Cut(strings.TrimSpace(part), ";")
		coding = strings.ToLower(strings.TrimSpace(coding))
		if coding != "gzip" && coding != "*" {
			continue
		}
		q := 1.0
		if k, val, found := strings.Cut(strings.TrimSpace(params), "="); found && strings.TrimSpace(k) == "q" {
			if f, err := strconv.ParseFloat(strings.TrimSpace(val), 64); err == nil {
				q = f
			}
		}
		if coding == "gzip" {
			return q > 0 // an explicit gzip entry wins over *
		}
		ok = q > 0
	}
	return ok
}

// etagMatch implements If-None-Match's weak comparison.
func etagMatch(header, etag string) bool {
	for t := range strings.SplitSeq(header, ",") {
		t = strings.TrimSpace(t)
		if t == "*" || strings.TrimPrefix(t, "W/") == etag {
			return true
		}
	}
	return false
}
