// Statistics per channel and per model over a chosen window.

import { t } from '../i18n.js';
import { get } from '../api.js';
import { h, fmtNum, fmtCompact, fmtPct, fmtMs, fmtUSD, table, errorBox, showError, spinner } from '../ui.js';

const WINDOWS = [1, 6, 24, 72, 168, 720];

export function render(root, ctx) {
  let hours = Number.parseInt(ctx.params.get('hours') || '24', 10);
  if (!Number.isInteger(hours) || hours < 1) hours = 24;
  const err = errorBox();
  const windowSel = h('select', { id: 'stats-hours', 'aria-label': t('stats.window') },
    [...new Set([...WINDOWS, hours])].sort((a, b) => a - b).map((n) => h('option', { value: String(n), selected: n === hours }, windowLabel(n))));
  const tokenID = ctx.params.get('token_id') || '';
  const tokenSel = h('select', { id: 'stats-token', 'aria-label': t('stats.token') }, h('option', { value: '' }, t('stats.allTokens')));
  windowSel.addEventListener('change', () => ctx.navigate('stats', { hours: windowSel.value, token_id: tokenSel.value }));
  tokenSel.addEventListener('change', () => ctx.navigate('stats', { hours: windowSel.value, token_id: tokenSel.value }));
  const totals = h('div', { class: 'cards', id: 'stats-totals' });
  const byChannel = h('div', { id: 'stats-channels' }, spinner());
  const byModel = h('div', { id: 'stats-models' }, spinner());
  const byToken = h('div', { id: 'stats-tokens' }, spinner());
  const chSort = { key: 'requests', dir: 'desc' };
  const modelSort = { key: 'requests', dir: 'desc' };
  const tokenSort = { key: 'cost', dir: 'desc' };

  root.append(
    h('div', { class: 'page-head' }, h('h1', {}, t('nav.stats')),
      h('div', { class: 'head-tools' }, tokenSel, h('label', { for: 'stats-hours', class: 'muted small' }, t('stats.window')), windowSel)),
    err,
    totals,
    h('section', { class: 'card flush', 'aria-labelledby': 'sc-h' }, h('div', { class: 'section-head pad' }, h('h2', { id: 'sc-h' }, t('stats.byChannel'))), byChannel),
    h('section', { class: 'card flush', 'aria-labelledby': 'sm-h' }, h('div', { class: 'section-head pad' }, h('h2', { id: 'sm-h' }, t('stats.byModel'))), byModel),
    h('section', { class: 'card flush', 'aria-labelledby': 'st-h' }, h('div', { class: 'section-head pad' }, h('h2', { id: 'st-h' }, t('stats.byToken'))), byToken),
  );

  function windowLabel(n) {
    if (n === 1) return t('stats.hour');
    if (n >= 48 && n % 24 === 0) return t('stats.days', { n: n / 24 });
    return t('stats.hours', { n });
  }

  // The share of the prompt the upstream's cache served (SPEC §8).
  const cacheHit = (input, read, write) => (input + read + write ? read / (input + read + write) : 0);

  const tokens = (n) => h('span', { title: fmtNum(n) }, fmtCompact(n));

  // The columns both tables share; first is the channel or model column.
  function columns(first) {
    return [
      first,
      { key: 'requests', label: t('stats.requests'), num: true, sort: (r) => r.requests, render: (r) => fmtNum(r.requests) },
      { key: 'errors', label: t('stats.errors'), num: true, sort: (r) => r.errors,
        render: (r) => (r.errors ? h('span', { class: 'text-err' }, fmtNum(r.errors)) : '0') },
      { key: 'rate', label: t('stats.successRate'), num: true, sort: (r) => r.success_rate, render: (r) => h('div', { class: 'rate' },
        h('span', {}, fmtPct(r.success_rate, r.requests)),
        h('meter', { min: 0, max: 1, low: 0.9, high: 0.99, optimum: 1, value: r.success_rate, 'aria-hidden': 'true' })) },
      { key: 'avg', label: t('stats.avg'), num: true, sort: (r) => r.avg_ms, render: (r) => fmtMs(r.avg_ms) },
      { key: 'p95', label: t('stats.p95'), num: true, sort: (r) => r.p95_ms, render: (r) => fmtMs(r.p95_ms) },
      { key: 'fb', label: t('stats.firstByte'), num: true, sort: (r) => r.avg_first_byte_ms, render: (r) => fmtMs(r.avg_first_byte_ms) },
      { key: 'in', label: t('stats.inputTokens'), num: true, sort: (r) => r.input_tokens, render: (r) => tokens(r.input_tokens) },
      { key: 'out', label: t('stats.outputTokens'), num: true, sort: (r) => r.output_tokens, render: (r) => tokens(r.output_tokens) },
      { key: 'cache', label: t('stats.cache'), num: true, sort: (r) => (r.cache_read_tokens || 0) + (r.cache_write_tokens || 0),
        render: (r) => h('span', { title: `${t('logs.cacheRead')}: ${fmtNum(r.cache_read_tokens || 0)}\n${t('logs.cacheWrite')}: ${fmtNum(r.cache_write_tokens || 0)}` },
          `${fmtCompact(r.cache_read_tokens || 0)} / ${fmtCompact(r.cache_write_tokens || 0)}`) },
      { key: 'cacheHit', label: t('stats.cacheHit'), num: true, sort: (r) => r.cache_hit_ratio || 0,
        render: (r) => fmtPct(r.cache_hit_ratio || 0, (r.input_tokens || 0) + (r.cache_read_tokens || 0) + (r.cache_write_tokens || 0)) },
      costColumn,
    ];
  }

  // Cost, with the requests no price covered said beside it.
  const costColumn = { key: 'cost', label: t('stats.cost'), num: true, sort: (r) => r.cost_usd || 0,
    render: (r) => h('span', { class: 'cost', title: r.unpriced ? t('stats.unpricedHint', { n: r.unpriced }) : null },
      fmtUSD(r.cost_usd || 0), r.unpriced ? h('sup', { class: 'muted' }, '*') : null) };

  function card(label, value, title) {
    return h('div', { class: 'stat' }, h('div', { class: 'stat-label' }, label), h('div', { class: 'stat-value', title }, value));
  }

  async function load() {
    try {
      const [s, toks] = await Promise.all([
        get(`/admin/stats?hours=${hours}${tokenID ? `&token_id=${encodeURIComponent(tokenID)}` : ''}`, { signal: ctx.signal }),
        get('/admin/tokens', { signal: ctx.signal }),
      ]);
      if (ctx.signal.aborted) return;
      tokenSel.replaceChildren(h('option', { value: '' }, t('stats.allTokens')),
        ...toks.filter((x) => x.source !== 'env').map((x) => h('option', { value: String(x.id) }, x.name)));
      tokenSel.value = tokenID;
      showError(err, null);
      const sum = (k) => s.channels.reduce((n, r) => n + (r[k] || 0), 0);
      const req = sum('requests'), ok = sum('success');
      totals.replaceChildren(
        card(t('stats.requests'), fmtCompact(req), fmtNum(req)),
        card(t('stats.successRate'), fmtPct(req ? ok / req : 0, req)),
        card(t('stats.inputTokens'), fmtCompact(sum('input_tokens')), fmtNum(sum('input_tokens'))),
        card(t('stats.outputTokens'), fmtCompact(sum('output_tokens')), fmtNum(sum('output_tokens'))),
        card(t('stats.cacheHit'), fmtPct(cacheHit(sum('input_tokens'), sum('cache_read_tokens'), sum('cache_write_tokens')),
          sum('input_tokens') + sum('cache_read_tokens') + sum('cache_write_tokens'))),
        card(t('stats.cost'), fmtUSD(sum('cost_usd')), sum('unpriced') ? t('stats.unpricedHint', { n: sum('unpriced') }) : null),
      );
      byToken.replaceChildren(table({
        id: 'stats-token-table', className: 'scroll', rows: s.tokens || [], state: tokenSort,
        caption: t('stats.byToken'), empty: t('stats.noTokens'),
        rowProps: (r) => ({ dataset: { token: r.token_id } }),
        columns: [
          { key: 'token', label: t('stats.token'), class: 'sticky', sort: (r) => r.token || '',
            render: (r) => h('a', { href: `#/logs?token_id=${r.token_id}` }, r.token || `#${r.token_id}`) },
          { key: 'requests', label: t('stats.requests'), num: true, sort: (r) => r.requests, render: (r) => fmtNum(r.requests) },
          { key: 'rate', label: t('stats.successRate'), num: true, sort: (r) => r.success_rate, render: (r) => fmtPct(r.success_rate, r.requests) },
          { key: 'in', label: t('stats.inputTokens'), num: true, sort: (r) => r.input_tokens, render: (r) => tokens(r.input_tokens) },
          { key: 'out', label: t('stats.outputTokens'), num: true, sort: (r) => r.output_tokens, render: (r) => tokens(r.output_tokens) },
          costColumn,
        ],
      }));
      byChannel.replaceChildren(table({
        id: 'stats-channel-table', className: 'scroll', rows: s.channels, state: chSort,
        caption: t('stats.byChannel'), empty: t('stats.none'),
        rowProps: (r) => ({ dataset: { channel: r.channel_id } }),
        columns: columns({ key: 'name', label: t('stats.channel'), class: 'sticky', sort: (r) => r.channel_name || '',
          render: (r) => (r.channel_id ? h('a', { href: `#/logs?channel_id=${r.channel_id}` }, r.channel_name || `#${r.channel_id}`)
            : h('span', { class: 'muted', title: t('stats.noChannelHint') }, t('stats.noChannel'))) }),
      }));
      byModel.replaceChildren(table({
        id: 'stats-model-table', className: 'scroll', rows: s.models, state: modelSort,
        caption: t('stats.byModel'), empty: t('stats.none'),
        rowProps: (r) => ({ dataset: { model: r.model } }),
        columns: columns({ key: 'model', label: t('stats.model'), class: 'sticky', sort: (r) => r.model,
          render: (r) => h('a', { href: `#/logs?model=${encodeURIComponent(r.model)}` }, h('code', {}, r.model || '—')) }),
      }));
    } catch (e) {
      if (e.name !== 'AbortError') showError(err, e);
      byChannel.replaceChildren();
      byModel.replaceChildren();
      byToken.replaceChildren();
    }
  }

  ctx.every(60000, load);
  load();
}
