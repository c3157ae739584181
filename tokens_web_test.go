package main

import (
	"context"
	"strings"
	"testing"

	cdpbrowser "github.com/chromedp/cdproto/browser"
	"github.com/chromedp/chromedp"
)

// TestBrowserTokens drives the Tokens and Prices pages in headless
// Chromium, in English and in Chinese: create with the one-time reveal and
// the copy button, usage bars, disable, and a price edit.
func TestBrowserTokens(t *testing.T) {
	bctx := startChromium(t)
	for _, lang := range []string{"en", "zh"} {
		t.Run(lang, func(t *testing.T) { testBrowserTokens(t, bctx, lang) })
	}
}

func testBrowserTokens(t *testing.T, bctx context.Context, lang string) {
	e := newTestEnv(t)
	up := newFakeUpstream(t, "up")
	e.addChannel(Channel{Name: "up", URL: up.URL})
	b := newBrowser(t, bctx, e)
	b.do("allow the clipboard", chromedp.Func(func(ctx context.Context, _ *chromedp.Target) error {
		for _, name := range []string{"clipboard-read", "clipboard-write"} {
			if _, err := chromedp.CallBrowser(ctx, cdpbrowser.SetPermission, cdpbrowser.SetPermissionParams{
				Permission: &cdpbrowser.PermissionDescriptor{Name: name, AllowWithoutSanitization: true},
				Setting:    cdpbrowser.PermissionSettingGranted, Origin: e.URL,
				BrowserContextID: chromedp.FromContext(b.ctx).BrowserContextID}); err != nil {
				return err
			}
		}
		return nil
	}))
	b.loginAt("#/tokens", "#add-token")
	if lang == "zh" {
		b.do("switch to Chinese", chromedp.Click(chromedp.CSS("#lang-toggle")))
		b.waitJS("Chinese labels", `document.querySelector('#add-token').textContent === '新建令牌'`)
	}
	want := map[string]map[string]string{
		"en": {"nav": "Tokens", "reveal": "shown only this once", "copied": "Copied", "noLimit": "no limit", "prices": "Prices", "saved": "Prices saved"},
		"zh": {"nav": "令牌", "reveal": "只显示这一次", "copied": "已复制", "noLimit": "不限", "prices": "价格", "saved": "价格已保存"},
	}[lang]
	if got := b.text(`.mainnav a[data-route="tokens"]`); got != want["nav"] {
		t.Errorf("nav says %q; want %q", got, want["nav"])
	}

	// Create: the dialog, then the one-time reveal with a copy button.
	b.do("open the create dialog", chromedp.Click(chromedp.CSS("#add-token")), chromedp.WaitVisible(chromedp.CSS("#token-dialog #tok-name")))
	b.do("fill and create",
		chromedp.SendKeys(chromedp.CSS("#tok-name"), "laptop"),
		chromedp.SetValue(chromedp.CSS("#tok-daily"), "2.5"),
		chromedp.SetValue(chromedp.CSS("#tok-concurrency"), "3"),
		chromedp.Click(chromedp.CSS("#tok-save")),
		chromedp.WaitVisible(chromedp.CSS("#token-reveal #tok-secret")))
	secret := eval[string](b, `document.querySelector('#tok-secret').value`)
	if !strings.HasPrefix(secret, "sk-ccl-") {
		t.Fatalf("revealed %q; want a new token", secret)
	}
	if got := b.text("#token-reveal"); !strings.Contains(got, want["reveal"]) {
		t.Errorf("reveal dialog says %q; want it to say the token is shown once (%q)", got, want["reveal"])
	}
	b.shot("tokens-reveal-" + lang)
	b.do("copy", chromedp.Click(chromedp.CSS("#tok-copy")))
	b.waitJS("copied note", `document.querySelector('#tok-copied').textContent !== ''`)
	if got := b.text("#tok-copied"); !strings.Contains(got, want["copied"]) {
		t.Errorf("copy note %q", got)
	}
	if clip := eval[string](b, `navigator.clipboard.readText()`); clip != secret {
		t.Errorf("clipboard holds %q; want the new token", clip)
	}
	b.do("done", chromedp.Click(chromedp.CSS("#tok-done")), chromedp.WaitNotPresent(chromedp.CSS("#token-reveal")))
	row := rowSel("tokens-table", "name", "laptop")
	b.waitJS("the new row", `!!document.querySelector('`+row+`')`)
	// Reveal once: the secret is nowhere on the page any more, nor in the
	// list the page reads.
	if html := eval[string](b, "document.body.innerHTML"); strings.Contains(html, secret) {
		t.Error("the page still shows the secret after the reveal")
	}
	if _, list := e.admin(e.login(), "GET", "/admin/tokens", ""); strings.Contains(string(list), secret) {
		t.Error("GET /admin/tokens returns the secret")
	}

	// The token works; its usage shows against its limits.
	if r, body := e.call(protoAnthropic, "claude-sonnet-4-5", secret); r.StatusCode != 200 {
		t.Fatalf("the new token: %d %s", r.StatusCode, body)
	}
	e.settle()
	b.route("#/dashboard", "#summary-cards .stat")
	b.route("#/tokens", row)
	b.waitJS("usage bar", `document.querySelector('`+row+` [data-limit="daily_usd"] meter')?.value > 0`)
	if got := b.text(row + ` [data-limit="daily_usd"]`); !strings.Contains(got, "$0.000574 / $2.5") {
		t.Errorf("daily usage %q; want $0.000574 of $2.5", got)
	}
	if got := b.text(row + ` [data-limit="monthly_usd"]`); !strings.Contains(got, want["noLimit"]) {
		t.Errorf("monthly usage %q; want %q", got, want["noLimit"])
	}
	b.shot("tokens-" + lang)

	// Disable: the switch, and the next request is refused.
	b.do("disable", chromedp.Click(chromedp.CSS(row+` [data-action="toggle"]`)))
	b.waitJS("row disabled", `document.querySelector('`+row+`').classList.contains('disabled')`)
	if r, _ := e.call(protoAnthropic, "claude-sonnet-4-5", secret); r.StatusCode != 401 {
		t.Errorf("after disabling in the page: %d; want 401", r.StatusCode)
	}

	// Statistics filtered by the token: its request, its cost.
	id := eval[string](b, `document.querySelector('`+row+`').dataset.id`)
	b.route("#/stats?token_id="+id, `#stats-token-table tr[data-token="`+id+`"]`)
	b.waitJS("the token filter chosen", `document.querySelector('#stats-token').value === '`+id+`'`)
	if got := b.text(`#stats-channel-table tr[data-channel] td:nth-child(2)`); got != "1" {
		t.Errorf("requests of the token on its channel: %q; want 1", got)
	}
	if got := b.text("#stats-totals"); !strings.Contains(got, "$0.000574") {
		t.Errorf("stats totals %q; want the token's cost $0.000574", got)
	}

	// Prices: edit one and save; the API has it.
	b.route("#/prices", "#prices-table")
	if got := b.text("h1"); got != want["prices"] {
		t.Errorf("prices h1 %q; want %q", got, want["prices"])
	}
	b.do("edit a price", chromedp.SetValue(chromedp.CSS(`#prices-table tr[data-model="claude-haiku-4-5"] [data-field="input"]`), "1.5"),
		chromedp.Click(chromedp.CSS("#prices-save")))
	b.waitJS("saved", `[...document.querySelectorAll('.toast.ok')].some((el) => el.textContent.includes('`+want["saved"]+`'))`)
	if _, pr := e.admin(e.login(), "GET", "/admin/prices", ""); !strings.Contains(string(pr), `{"model":"claude-haiku-4-5","input":1.5,`) {
		t.Errorf("after saving: %s", pr)
	}
	// A row with a gap is refused and the page says why.
	b.do("break a price", chromedp.SetValue(chromedp.CSS(`#prices-table tr[data-model="gpt-5"] [data-field="output"]`), ""),
		chromedp.Click(chromedp.CSS("#prices-save")))
	b.waitJS("the refusal", `!document.querySelector('.page-prices .error-box').hidden`)
	if got := b.text(".page-prices .error-box"); !strings.Contains(got, "output is required") {
		t.Errorf("error %q; want the server's reason", got)
	}
	b.shot("prices-" + lang)
}
