// Small DOM helpers shared by the pages. Everything the API returns is put
// into the page as text nodes or attribute values, never as HTML, so a
// channel named <script> stays a name.

import { t, locale } from './i18n.js';
import { serverNow, AuthError } from './api.js';

// h builds an element: h('button', {class: 'btn', onclick: fn}, 'Save').
// Props named on* become listeners; value/checked/disabled/hidden/selected
// are set as properties; text sets textContent; the rest are attributes.
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  setProps(el, props);
  append(el, children);
  return el;
}

const asProperty = new Set(['value', 'checked', 'disabled', 'hidden', 'selected', 'indeterminate']);

function setProps(el, props) {
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || (v === false && !asProperty.has(k))) continue;
    if (k === 'text') el.textContent = v;
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (asProperty.has(k)) el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false || c === '') continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

// Formatting ----------------------------------------------------------------

export function fmtNum(n) {
  return new Intl.NumberFormat(locale()).format(n || 0);
}

// fmtCompact writes big counts short (12.3K, 1.2万); the exact number goes in
// a title by the caller.
export function fmtCompact(n) {
  return new Intl.NumberFormat(locale(), { notation: 'compact', maximumFractionDigits: 1 }).format(n || 0);
}

export function fmtPct(rate, requests) {
  if (!requests) return '—';
  const p = rate * 100;
  return (p === 100 || p === 0 ? p.toFixed(0) : p.toFixed(1)) + '%';
}

// fmtUSD shows a cost in dollars: null is a model without a price.
export function fmtUSD(v) {
  if (v === null || v === undefined) return '—';
  if (v === 0) return '$0';
  if (v < 0.01) return `$${v.toPrecision(3).replace(/0+$/, '')}`;
  return `$${v.toFixed(v < 100 ? 4 : 2)}`;
}

export function fmtMs(ms) {
  if (ms === null || ms === undefined) return '—';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  return fmtSpan(ms / 1000);
}

const pad = (n) => String(n).padStart(2, '0');

// fmtTime shows a timestamp as local "2026-01-02 15:04:05": sortable and the
// same in both languages.
export function fmtTime(iso, { seconds = true } = {}) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '—';
  const s = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
  return seconds ? `${s}:${pad(d.getSeconds())}` : s;
}

// fmtSpan writes a number of seconds as "4m 05s" or "1h 02m" (4分05秒 …).
export function fmtSpan(sec) {
  sec = Math.max(0, Math.ceil(sec));
  const hh = Math.floor(sec / 3600), mm = Math.floor(sec % 3600 / 60), ss = sec % 60;
  if (hh > 0) return t('span.hm', { h: hh, m: pad(mm) });
  if (mm > 0) return t('span.ms', { m: mm, s: pad(ss) });
  return t('span.s', { s: ss });
}

export function fmtAgo(iso) {
  const sec = (serverNow() - Date.parse(iso)) / 1000;
  const rtf = new Intl.RelativeTimeFormat(locale(), { numeric: 'auto' });
  if (sec < 60) return rtf.format(-Math.round(sec), 'second');
  if (sec < 3600) return rtf.format(-Math.round(sec / 60), 'minute');
  if (sec < 86400) return rtf.format(-Math.round(sec / 3600), 'hour');
  return rtf.format(-Math.round(sec / 86400), 'day');
}

// Countdowns ------------------------------------------------------------------

// countdown is a live "time left" for a server time. One ticker updates all
// of them; when one reaches zero it says so and fires "cooldown-ended" on
// document, so pages can fetch fresh state.
export function countdown(iso) {
  const until = Date.parse(iso);
  const el = h('span', { class: 'countdown', dataset: { until: String(until) } });
  tickOne(el, serverNow());
  return el;
}

function tickOne(el, now) {
  const left = (Number(el.dataset.until) - now) / 1000;
  if (left <= 0) {
    delete el.dataset.until;
    el.textContent = t('health.ready');
    el.classList.add('ended');
    return true;
  }
  el.textContent = fmtSpan(left);
  return false;
}

setInterval(() => {
  const now = serverNow();
  let ended = false;
  for (const el of document.querySelectorAll('[data-until]')) {
    if (tickOne(el, now)) ended = true;
  }
  if (ended) document.dispatchEvent(new CustomEvent('cooldown-ended'));
}, 1000);

// Channel health --------------------------------------------------------------

// channelStatus sums up a channel's state for a badge: kind is ok, warn
// (something cooling but it can serve), err (it cannot serve now) or off.
export function channelStatus(ch) {
  const st = ch.state || {};
  const keys = st.keys || [];
  const coolingKeys = keys.filter((k) => k.cooldown_until);
  const models = st.models || [];
  if (!ch.enabled) return { kind: 'off', label: t('health.disabled') };
  if (st.cooldown_until) {
    return { kind: 'err', label: t('health.cooling'), until: st.cooldown_until, reason: st.cooldown_reason };
  }
  if (keys.length > 0 && coolingKeys.length === keys.length) {
    const soonest = coolingKeys.map((k) => k.cooldown_until).sort()[0];
    return { kind: 'err', label: t('health.keysCooling'), until: soonest, reason: coolingKeys[0].reason };
  }
  if (coolingKeys.length || models.length) {
    return { kind: 'warn', label: t('health.partial') };
  }
  return { kind: 'ok', label: t('health.ok') };
}

export function hasCooldown(ch) {
  const st = ch.state || {};
  return Boolean(st.cooldown_until || (st.keys || []).some((k) => k.cooldown_until) || (st.models || []).length);
}

export function statusBadge(ch) {
  const s = channelStatus(ch);
  return h('span', { class: `badge ${s.kind}`, title: s.reason || null },
    h('span', { class: 'dot', 'aria-hidden': 'true' }), s.label,
    s.until ? [' ', countdown(s.until)] : null);
}

export function statusClass(code) {
  if (code >= 200 && code < 300) return 'ok';
  if (code === 499) return 'off';
  if (code >= 400 && code < 500) return 'warn';
  return 'err';
}

// Messages ------------------------------------------------------------------

export function toast(message, kind = 'info') {
  const box = document.getElementById('toasts');
  const el = h('div', { class: `toast ${kind}` }, message);
  box.append(el);
  setTimeout(() => el.remove(), kind === 'error' ? 8000 : 4000);
}

// errorBox shows err in a role=alert element, or hides it for null. A lost
// session is not shown: the app is already on its way to the login page.
export function showError(el, err) {
  if (!err || err instanceof AuthError) {
    el.hidden = true;
    el.textContent = '';
    return;
  }
  el.hidden = false;
  el.textContent = err.message || String(err);
}

export function errorBox() {
  return h('p', { class: 'error-box', role: 'alert', hidden: true });
}

// Dialogs ---------------------------------------------------------------------

// openDialog shows a modal <dialog>: the browser traps focus in it and closes
// it on Escape. It is removed from the page once closed.
export function openDialog({ title, body, footer, className = '', id }) {
  const heading = h('h2', { class: 'dialog-title', id: `${id || 'dlg'}-title` }, title);
  const dlg = h('dialog', { class: `dialog ${className}`, id, 'aria-labelledby': heading.id },
    h('div', { class: 'dialog-head' }, heading,
      h('button', { type: 'button', class: 'btn ghost icon', 'aria-label': t('common.close'), onclick: () => dlg.close() }, '✕')),
    h('div', { class: 'dialog-body' }, body),
    footer ? h('div', { class: 'dialog-foot' }, footer) : null);
  dlg.addEventListener('close', () => dlg.remove());
  document.body.append(dlg);
  dlg.showModal();
  return dlg;
}

// confirmDialog asks a yes/no question; it resolves true only on OK.
export function confirmDialog(message, { ok = t('common.ok'), danger = false } = {}) {
  return new Promise((resolve) => {
    let answer = false;
    const okBtn = h('button', { type: 'button', class: `btn ${danger ? 'danger' : 'primary'}`, id: 'confirm-ok',
      onclick: () => { answer = true; dlg.close(); } }, ok);
    const dlg = openDialog({
      id: 'confirm-dialog', title: t('common.confirm'), className: 'narrow',
      body: h('p', {}, message),
      footer: [h('button', { type: 'button', class: 'btn', onclick: () => dlg.close() }, t('common.cancel')), okBtn],
    });
    dlg.addEventListener('close', () => resolve(answer));
    okBtn.focus();
  });
}

export function closeAllDialogs() {
  for (const d of document.querySelectorAll('dialog')) d.close();
}

// Tables ------------------------------------------------------------------

// table renders rows under columns; a column with sort gets a header button
// that sorts by it (click again to reverse). Each cell carries its column's
// label, which the phone layout shows beside the value.
//
// column: {key, label, sort?: row => value, render: row => node|string,
//          class?, num?: true}
// state: {key, dir} (mutated on click); onchange is called after a re-sort.
export function table({ columns, rows, state, empty, rowProps, caption, className = '', id }) {
  const wrap = h('div', { class: `table-wrap ${className}`, id });
  const draw = () => {
    const col = columns.find((c) => c.key === state?.key);
    let sorted = rows;
    if (col && col.sort) {
      const dir = state.dir === 'desc' ? -1 : 1;
      sorted = [...rows].sort((a, b) => {
        const x = col.sort(a), y = col.sort(b);
        if (typeof x === 'string' || typeof y === 'string') {
          return dir * String(x).localeCompare(String(y), locale(), { numeric: true });
        }
        return dir * ((x ?? -Infinity) - (y ?? -Infinity));
      });
    }
    const head = h('tr', {}, columns.map((c) => {
      const active = state && state.key === c.key;
      const th = h('th', { scope: 'col', class: [c.class, c.num ? 'num' : ''].join(' ').trim() || null,
        'aria-sort': c.sort && active ? (state.dir === 'desc' ? 'descending' : 'ascending') : null });
      if (c.sort && state) {
        th.append(h('button', { type: 'button', class: 'sort', dataset: { key: c.key }, onclick: () => {
          state.dir = active && state.dir !== 'desc' ? 'desc' : active ? 'asc' : (c.num ? 'desc' : 'asc');
          state.key = c.key;
          draw();
        } }, c.label, h('span', { class: 'sort-mark', 'aria-hidden': 'true' }, active ? (state.dir === 'desc' ? '▼' : '▲') : '↕')));
      } else {
        th.textContent = c.label;
      }
      return th;
    }));
    const body = h('tbody', {}, sorted.map((r) => h('tr', rowProps ? rowProps(r) : {},
      columns.map((c) => h('td', { class: [c.class, c.num ? 'num' : ''].join(' ').trim() || null, 'data-label': c.label },
        c.render ? c.render(r) : r[c.key])))));
    const tbl = h('table', {}, caption ? h('caption', { class: 'sr-only' }, caption) : null, h('thead', {}, head), body);
    wrap.replaceChildren(rows.length ? tbl : h('p', { class: 'empty' }, empty || t('common.empty')));
  };
  draw();
  return wrap;
}

// field builds a labelled form control with an optional hint.
export function field(label, control, hint) {
  const id = control.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  control.id = id;
  let hintEl = null;
  if (hint) {
    hintEl = h('small', { class: 'hint', id: `${id}-hint` }, hint);
    control.setAttribute('aria-describedby', hintEl.id);
  }
  return h('div', { class: 'field' }, h('label', { for: id }, label), control, hintEl);
}

export function spinner() {
  return h('p', { class: 'loading', role: 'status' }, t('common.loading'));
}
