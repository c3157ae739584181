// The request log: filters (kept in the URL, so a reload or a shared link
// shows the same rows), paging back in time with before_id, auto-refresh of
// the newest page, and a detail view of one row.

import { t } from '../i18n.js';
import { get, query } from '../api.js';
import { h, fmtNum, fmtCompact, fmtMs, fmtTime, statusClass, table, errorBox, showError, openDialog, toast, fmtUSD } from '../ui.js';

const PAGE_SIZE = 50;
const AUTO_MS = 5000;
const AUTO_KEY = 'ccload.logs.autoRefresh';

// toISO turns a datetime-local value (local time, no zone) into RFC 3339.
function toISO(local) {
  if (!local) return '';
  const d = new Date(local);
  return Number.isNaN(d.getTime()) ? '' : d.toISOString();
}

export function render(root, ctx) {
  const p = ctx.params;
  const filters = {
    channel_id: p.get('channel_id') || '',
    model: p.get('model') || '',
    status: p.get('status') || '',
    since: p.get('since') || '',
    until: p.get('until') || '',
  };
  // Linked from the per-token statistics; not one of the filter fields.
  const tokenID = p.get('token_id') || '';
  const activeFilters = Object.values(filters).filter(Boolean).length;
  const err = errorBox();
  const totalEl = h('span', { class: 'muted small', id: 'logs-total' });
  const listBox = h('div', { id: 'logs-list' });
  const pageInfo = h('span', { class: 'muted small', id: 'logs-page' });
  const newer = h('button', { type: 'button', class: 'btn small', id: 'logs-newer', disabled: true, onclick: () => { stack.pop(); load(); } }, t('logs.newer'));
  const older = h('button', { type: 'button', class: 'btn small', id: 'logs-older', disabled: true, onclick: () => { stack.push(nextBefore); load(); } }, t('logs.older'));
  const auto = h('input', { type: 'checkbox', role: 'switch', class: 'switch', id: 'logs-auto', checked: localStorage.getItem(AUTO_KEY) === '1' });
  auto.addEventListener('change', () => {
    localStorage.setItem(AUTO_KEY, auto.checked ? '1' : '0');
    if (auto.checked) load();
  });
  const refreshBtn = h('button', { type: 'button', class: 'btn small', id: 'logs-refresh', onclick: () => load() }, t('common.refresh'));

  // Filters -------------------------------------------------------------
  const channelSel = h('select', { id: 'f-channel', name: 'channel_id' }, h('option', { value: '' }, t('logs.allChannels')));
  const modelIn = h('input', { type: 'text', id: 'f-model', name: 'model', value: filters.model, list: 'model-options',
    placeholder: t('logs.anyModel'), autocomplete: 'off', spellcheck: 'false' });
  const modelList = h('datalist', { id: 'model-options' });
  const statusOpts = [['', t('logs.anyStatus')], ['2xx', t('logs.s2xx')], ['4xx', t('logs.s4xx')], ['5xx', t('logs.s5xx')], ['error', t('logs.sError')]];
  if (filters.status && !statusOpts.some(([v]) => v === filters.status)) statusOpts.push([filters.status, filters.status]);
  const statusSel = h('select', { id: 'f-status', name: 'status' },
    statusOpts.map(([v, l]) => h('option', { value: v, selected: v === filters.status }, l)));
  const sinceIn = h('input', { type: 'datetime-local', id: 'f-since', name: 'since', value: filters.since });
  const untilIn = h('input', { type: 'datetime-local', id: 'f-until', name: 'until', value: filters.until });
  const form = h('form', { class: 'filters', id: 'logs-filters', role: 'search' },
    h('div', { class: 'field' }, h('label', { for: 'f-channel' }, t('logs.channel')), channelSel),
    h('div', { class: 'field' }, h('label', { for: 'f-model' }, t('logs.model')), modelIn, modelList),
    h('div', { class: 'field' }, h('label', { for: 'f-status' }, t('logs.status')), statusSel),
    h('div', { class: 'field' }, h('label', { for: 'f-since' }, t('logs.since')), sinceIn),
    h('div', { class: 'field' }, h('label', { for: 'f-until' }, t('logs.until')), untilIn),
    h('div', { class: 'filter-buttons' },
      h('button', { type: 'submit', class: 'btn primary', id: 'logs-apply' }, t('logs.apply')),
      h('button', { type: 'button', class: 'btn', id: 'logs-reset', onclick: () => ctx.navigate('logs') }, t('logs.reset'))));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    ctx.navigate('logs', {
      channel_id: channelSel.value, model: modelIn.value.trim(), status: statusSel.value,
      since: sinceIn.value, until: untilIn.value,
    });
  });

  root.append(
    h('div', { class: 'page-head' },
      h('h1', {}, t('nav.logs')),
      h('div', { class: 'head-tools' }, totalEl,
        h('label', { class: 'switch-label', for: 'logs-auto' }, auto, t('logs.auto')),
        refreshBtn)),
    // On a phone the filters fold away unless some are in use.
    h('details', { class: 'card filters-box', id: 'logs-filter-box',
      open: activeFilters > 0 || window.matchMedia('(min-width: 761px)').matches },
    h('summary', {}, t('logs.filters'), activeFilters ? h('span', { class: 'badge small warn' }, String(activeFilters)) : null),
    form),
    err,
    h('section', { class: 'card flush' }, listBox,
      h('div', { class: 'pager' }, newer, pageInfo, older)),
  );

  // Paging state: before_id of each page shown so far (null: the newest).
  const stack = [null];
  let nextBefore = null;
  let lastKey = '';

  // tries is the request's timeline: every try in order, each a bar as long
  // as its share of the request's time, with what its failure cooled.
  function tries(r) {
    const list = r.tries || [];
    if (!list.length) return null;
    const total = Math.max(1, list.reduce((n, x) => n + (x.duration_ms || 0), 0));
    return h('section', { class: 'tries', id: 'log-tries' },
      h('h3', {}, t('logs.tries', { n: list.length })),
      h('ol', {}, list.map((x, i) => {
        // Set through the CSSOM: the page's CSP allows no style attribute.
        const bar = h('div', { class: 'try-bar' });
        bar.style.width = `${Math.max(2, Math.round(100 * (x.duration_ms || 0) / total))}%`;
        return h('li', { class: `try ${x.error ? 'failed' : ''}` },
          h('div', { class: 'try-head' },
            h('span', { class: 'try-n' }, `#${i + 1}`),
            h('span', {}, `${x.channel_name} (#${x.channel_id}) · ${t('logs.key')} #${x.key_index + 1}`),
            h('span', { class: `badge ${statusClass(x.status)}` }, String(x.status)),
            h('span', { class: 'muted' }, fmtMs(x.duration_ms)),
            x.cooled ? h('span', { class: 'try-cooled' }, t(`logs.cooled.${x.cooled}`)) : null),
          bar,
          x.error ? h('div', { class: 'reason pre' }, x.error) : null);
      })));
  }

  function detail(r) {
    const rows = [
      [t('logs.id'), String(r.id)],
      [t('logs.time'), fmtTime(r.time)],
      [t('logs.status'), h('span', { class: `badge ${statusClass(r.status)}` }, String(r.status))],
      [t('logs.protocol'), r.protocol],
      [t('logs.model'), r.model],
      [t('logs.upstreamModel'), r.upstream_model || r.model],
      [t('logs.channel'), r.channel_id ? `${r.channel_name} (#${r.channel_id})` : '—'],
      [t('logs.key'), r.channel_id ? `#${r.key_index + 1}` : '—'],
      [t('logs.attempts'), String(r.attempts)],
      [t('logs.duration'), fmtMs(r.duration_ms)],
      [t('logs.firstByte'), r.first_byte_ms ? fmtMs(r.first_byte_ms) : '—'],
      [t('logs.stream'), r.stream ? t('common.yes') : t('common.no')],
      [t('logs.inputTokens'), fmtNum(r.input_tokens)],
      [t('logs.outputTokens'), fmtNum(r.output_tokens)],
      [t('logs.cacheRead'), fmtNum(r.cache_read_tokens)],
      [t('logs.cacheWrite'), fmtNum(r.cache_write_tokens)],
      [t('logs.cost'), fmtUSD(r.cost_usd)],
      [t('logs.token'), r.token || '—'],
      [t('logs.session'), r.session ? h('code', {}, r.session) : '—'],
      [t('logs.affinity'), r.affinity ? t(`affinity.${r.affinity}`) : '—'],
      [t('logs.clientIP'), r.client_ip || '—'],
      [t('logs.error'), r.error ? h('span', { class: 'reason pre' }, r.error) : '—'],
    ];
    const dlg = openDialog({
      id: 'log-detail', title: t('logs.detailTitle', { id: r.id }),
      body: [
        h('dl', { class: 'details' }, rows.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])),
        tries(r),
      ],
      footer: [
        r.channel_id ? h('a', { class: 'btn', href: `#/logs?channel_id=${r.channel_id}` }, t('logs.sameChannel')) : null,
        h('a', { class: 'btn', href: `#/logs?model=${encodeURIComponent(r.model)}` }, t('logs.sameModel')),
        h('button', { type: 'button', class: 'btn primary', onclick: () => dlg.close() }, t('common.close')),
      ],
    });
  }

  function draw(rows, fresh) {
    listBox.replaceChildren(table({
      id: 'logs-table', className: 'responsive compact', rows, caption: t('nav.logs'),
      empty: t('logs.none'),
      rowProps: (r) => ({ dataset: { id: r.id, model: r.model, status: r.status }, class: fresh.has(r.id) ? 'fresh' : null }),
      columns: [
        { key: 'time', label: t('logs.time'), render: (r) => h('button', { type: 'button', class: 'linkish', dataset: { action: 'detail' },
          title: t('logs.showDetail'), onclick: () => detail(r) }, fmtTime(r.time)) },
        { key: 'channel', label: t('logs.channel'), render: (r) => r.channel_name || h('span', { class: 'muted' }, '—') },
        { key: 'model', label: t('logs.model'), render: (r) => h('div', {}, h('code', {}, r.model),
          r.upstream_model && r.upstream_model !== r.model ? h('div', { class: 'muted small' }, `→ ${r.upstream_model}`) : null) },
        { key: 'status', label: t('logs.status'), render: (r) => h('span', { class: `badge ${statusClass(r.status)}` }, String(r.status),
          r.stream ? h('span', { class: 'muted', title: t('logs.stream') }, ' ⇣') : null) },
        { key: 'duration', label: t('logs.duration'), num: true, render: (r) => fmtMs(r.duration_ms) },
        { key: 'fb', label: t('logs.firstByte'), num: true, render: (r) => (r.first_byte_ms ? fmtMs(r.first_byte_ms) : '—') },
        { key: 'tokens', label: t('logs.tokens'), num: true, render: (r) => h('span', {
          title: `${t('logs.inputTokens')}: ${fmtNum(r.input_tokens)}\n${t('logs.outputTokens')}: ${fmtNum(r.output_tokens)}\n${t('logs.cacheRead')}: ${fmtNum(r.cache_read_tokens)}\n${t('logs.cacheWrite')}: ${fmtNum(r.cache_write_tokens)}`,
        }, `${fmtCompact(r.input_tokens)} / ${fmtCompact(r.output_tokens)}`) },
        { key: 'cost', label: t('logs.cost'), num: true, render: (r) => h('span', { class: 'cost' }, fmtUSD(r.cost_usd)) },
        { key: 'attempts', label: t('logs.attempts'), num: true, render: (r) => String(r.attempts) },
        { key: 'client', label: t('logs.client'), render: (r) => r.token || r.client_ip || '—' },
        { key: 'error', label: t('logs.error'), class: 'error-cell', render: (r) => (r.error ? h('span', { class: 'reason', title: r.error }, r.error) : '') },
      ],
    }));
  }

  let seen = null; // ids already shown, to mark rows that arrive on refresh
  let loading = false;
  async function load() {
    if (loading) return;
    loading = true;
    refreshBtn.disabled = true;
    const before = stack[stack.length - 1];
    try {
      const res = await get(query('/admin/logs', {
        channel_id: filters.channel_id, model: filters.model, status: filters.status, token_id: tokenID,
        since: toISO(filters.since), until: toISO(filters.until), limit: PAGE_SIZE, before_id: before,
      }), { signal: ctx.signal });
      if (ctx.signal.aborted) return;
      showError(err, null);
      if (!res.logs.length && stack.length > 1) {
        // The previous page ended exactly at the last row: there is no
        // older page after all. Stay where we were.
        stack.pop();
        older.disabled = true;
        toast(t('logs.noOlder'));
        return;
      }
      nextBefore = res.next_before_id;
      newer.disabled = stack.length <= 1;
      older.disabled = !nextBefore;
      pageInfo.textContent = t('logs.pageN', { n: stack.length });
      totalEl.textContent = t('logs.total', { n: fmtNum(res.total) });
      // Skip the redraw when nothing changed, so auto-refresh does not
      // disturb reading or keyboard focus.
      const key = `${before}|${res.total}|${res.logs.map((r) => r.id).join(',')}`;
      if (key === lastKey) return;
      lastKey = key;
      const fresh = new Set(seen && before === null ? res.logs.filter((r) => !seen.has(r.id)).map((r) => r.id) : []);
      seen = new Set(res.logs.map((r) => r.id));
      draw(res.logs, fresh);
    } catch (e) {
      if (e.name !== 'AbortError') showError(err, e);
    } finally {
      loading = false;
      refreshBtn.disabled = false;
    }
  }

  // The channel list fills the channel filter and the model suggestions.
  get('/admin/channels', { signal: ctx.signal }).then((chs) => {
    for (const c of chs) {
      channelSel.append(h('option', { value: String(c.id), selected: String(c.id) === filters.channel_id }, c.name));
    }
    if (filters.channel_id && !chs.some((c) => String(c.id) === filters.channel_id)) {
      channelSel.append(h('option', { value: filters.channel_id, selected: true }, `#${filters.channel_id}`));
    }
    const models = new Set(chs.flatMap((c) => [...(c.models || []), ...Object.keys(c.model_redirects || {})]));
    modelList.replaceChildren(...[...models].sort().map((m) => h('option', { value: m })));
  }).catch((e) => {
    if (e.name !== 'AbortError') showError(err, e);
  });

  // Only the newest page refreshes: an older page is history and stays put.
  ctx.every(AUTO_MS, () => {
    if (auto.checked && stack.length === 1) load();
  });
  load();
}
