// The dashboard: 24-hour totals, hourly traffic and tokens, the health of
// every channel with live cooldown countdowns, the Redis mirror and the
// alert webhooks.

import { t } from '../i18n.js';
import { get, api } from '../api.js';
import { h, fmtNum, fmtCompact, fmtPct, fmtMs, fmtUSD, fmtAgo, fmtTime, countdown, statusBadge, channelStatus, table, errorBox, showError, toast } from '../ui.js';
import { barChart, legend } from '../chart.js';

const REFRESH_MS = 15000;

export function render(root, ctx) {
  const err = errorBox();
  const updated = h('span', { class: 'muted small', id: 'dash-updated' });
  const refreshBtn = h('button', { type: 'button', class: 'btn small', id: 'dash-refresh', onclick: () => load() }, t('common.refresh'));
  const cards = h('div', { class: 'cards', id: 'summary-cards' });
  const reqChart = h('div', { class: 'chart-slot', id: 'trend-chart' });
  const tokChart = h('div', { class: 'chart-slot', id: 'token-chart' });
  const costChart = h('div', { class: 'chart-slot', id: 'cost-chart' });
  const health = h('div', { id: 'health' });
  const redis = h('p', { class: 'redis-line', id: 'redis-status' });
  const replicas = h('p', { class: 'redis-line', id: 'replicas' });
  const hooks = h('div', { class: 'redis-line', id: 'webhook-status' });
  const sortState = { key: 'priority', dir: 'desc' };
  const stops = [];
  ctx.signal.addEventListener('abort', () => stops.forEach((f) => f()));

  const reqSeries = [
    { key: 'success', label: t('dash.success'), class: 's-ok' },
    { key: 'errors', label: t('dash.errors'), class: 's-err' },
  ];
  const tokSeries = [
    { key: 'input_tokens', label: t('dash.inputTokens'), class: 's-in' },
    { key: 'output_tokens', label: t('dash.outputTokens'), class: 's-out' },
  ];
  const costSeries = [{ key: 'cost_usd', label: t('dash.cost'), class: 's-in' }];

  // The 24-hour cache hit ratio, beside the token chart: what session
  // affinity keeps up (README "Session affinity").
  const cacheHit = h('span', { id: 'dash-cache-hit', class: 'small' });

  root.append(
    h('div', { class: 'page-head' }, h('h1', {}, t('nav.dashboard')), h('div', { class: 'head-tools' }, updated, refreshBtn)),
    err,
    cards,
    h('div', { class: 'grid2' },
      h('section', { class: 'card', 'aria-labelledby': 'trend-h' },
        h('div', { class: 'section-head' }, h('h2', { id: 'trend-h' }, t('dash.traffic24')), legend(reqSeries)), reqChart),
      h('section', { class: 'card', 'aria-labelledby': 'tok-h' },
        h('div', { class: 'section-head' }, h('h2', { id: 'tok-h' }, t('dash.tokens24')), cacheHit, legend(tokSeries)), tokChart),
      h('section', { class: 'card', 'aria-labelledby': 'cost-h' },
        h('div', { class: 'section-head' }, h('h2', { id: 'cost-h' }, t('dash.cost24'))), costChart)),
    h('section', { class: 'card', 'aria-labelledby': 'health-h' },
      h('div', { class: 'section-head' }, h('h2', { id: 'health-h' }, t('dash.health')),
        h('a', { href: '#/channels', class: 'small' }, t('dash.manage'))),
      health),
    redis,
    replicas,
    hooks,
  );

  function card(label, value, sub, kind) {
    return h('div', { class: `stat ${kind || ''}` }, h('div', { class: 'stat-label' }, label),
      h('div', { class: 'stat-value' }, value), sub ? h('div', { class: 'stat-sub' }, sub) : null);
  }

  function drawSummary(s, spend) {
    cards.replaceChildren(
      card(t('dash.spendToday'), h('span', { id: 'spend-today' }, fmtUSD(spend.today_usd))),
      card(t('dash.spendMonth'), h('span', { id: 'spend-month' }, fmtUSD(spend.month_usd)), spend.tz),
      card(t('dash.requests24'), h('span', { title: fmtNum(s.requests) }, fmtCompact(s.requests))),
      card(t('dash.successRate'), fmtPct(s.success_rate, s.requests),
        s.requests ? t('dash.okOf', { ok: fmtNum(s.success), n: fmtNum(s.requests) }) : null,
        s.requests && s.success_rate < 0.9 ? 'warn' : ''),
      card(t('dash.errors'), fmtNum(s.errors), null, s.errors ? 'err' : ''),
      card(t('dash.enabled'), fmtNum(s.channels_enabled)),
      card(t('dash.cooling'), fmtNum(s.channels_cooling), null, s.channels_cooling ? 'warn' : ''),
      // Only when rows were lost (a full disk, a flooded queue): nothing to
      // show otherwise.
      ...(s.log_rows_lost ? [card(t('dash.logLost'), fmtNum(s.log_rows_lost), t('dash.logLostHint'), 'err')] : []),
    );
  }

  function drawTrends(tr) {
    stops.splice(0).forEach((f) => f());
    const sum = (k) => tr.buckets.reduce((n, b) => n + (b[k] || 0), 0);
    const read = sum('cache_read_tokens'), all = read + sum('cache_write_tokens') + sum('input_tokens');
    cacheHit.textContent = t('dash.cacheHit24', { p: fmtPct(all ? read / all : 0, all) });
    const range = (b) => {
      const end = fmtTime(new Date(Date.parse(b.start) + 3600e3).toISOString(), { seconds: false });
      return `${fmtTime(b.start, { seconds: false })}–${end.slice(11)}`;
    };
    stops.push(barChart(reqChart, {
      buckets: tr.buckets, series: reqSeries, title: t('dash.traffic24'),
      label: (b) => `${range(b)}\n${t('dash.tipRequests', { n: fmtNum(b.requests), e: fmtNum(b.errors) })}\n${t('dash.tipAvg', { d: fmtMs(b.avg_ms) })}`,
    }));
    stops.push(barChart(tokChart, {
      buckets: tr.buckets, series: tokSeries, title: t('dash.tokens24'),
      label: (b) => `${range(b)}\n${t('dash.tipTokens', { i: fmtNum(b.input_tokens), o: fmtNum(b.output_tokens) })}`,
    }));
    stops.push(barChart(costChart, {
      buckets: tr.buckets, series: costSeries, title: t('dash.cost24'),
      label: (b) => `${range(b)}\n${fmtUSD(b.cost_usd || 0)}`,
    }));
  }

  // keyList shows every key with its state; a cooling key gets a countdown
  // and the reason it was cooled.
  function keyList(ch) {
    const states = (ch.state && ch.state.keys) || [];
    return h('ul', { class: 'keylist' }, (ch.api_keys || []).map((masked, i) => {
      const ks = states.find((k) => k.index === i) || {};
      return h('li', { class: ks.cooldown_until ? 'cooling' : '' },
        h('code', {}, `#${i + 1} ${masked}`), ' ',
        ks.cooldown_until
          ? [h('span', { class: 'badge err small' }, countdown(ks.cooldown_until)), ks.reason ? h('span', { class: 'reason' }, ks.reason) : null]
          : h('span', { class: 'badge ok small' }, t('health.ok')));
    }));
  }

  function modelList(ch) {
    const ms = (ch.state && ch.state.models) || [];
    if (!ms.length) return h('span', { class: 'muted' }, '—');
    return h('ul', { class: 'keylist' }, ms.map((m) => h('li', { class: 'cooling' },
      h('code', {}, m.model), ' ', h('span', { class: 'badge err small' }, countdown(m.cooldown_until)),
      m.reason ? h('span', { class: 'reason' }, m.reason) : null)));
  }

  function drawHealth(chs) {
    health.replaceChildren(table({
      id: 'health-table', className: 'responsive', state: sortState, caption: t('dash.health'),
      empty: h('span', {}, t('dash.noChannels'), ' ', h('a', { href: '#/channels' }, t('dash.addFirst'))),
      rows: chs,
      rowProps: (c) => ({ dataset: { id: c.id, name: c.name } }),
      columns: [
        { key: 'name', label: t('ch.name'), sort: (c) => c.name, render: (c) => h('strong', {}, c.name) },
        { key: 'status', label: t('ch.status'), sort: (c) => ({ err: 0, warn: 1, ok: 2, off: 3 })[channelStatus(c).kind],
          render: (c) => h('div', {}, statusBadge(c),
            c.state && c.state.cooldown_reason ? h('div', { class: 'reason' }, c.state.cooldown_reason) : null) },
        { key: 'priority', label: t('ch.priority'), num: true, sort: (c) => c.priority, render: (c) => String(c.priority) },
        { key: 'failures', label: t('dash.failures'), num: true, sort: (c) => (c.state && c.state.failures) || 0,
          render: (c) => String((c.state && c.state.failures) || 0) },
        { key: 'keys', label: t('ch.keys'), render: keyList },
        { key: 'models', label: t('dash.coolingModels'), render: modelList },
      ],
    }));
  }

  function drawRedis(r) {
    redis.replaceChildren(h('span', { class: 'redis-label' }, t('redis.title')), ' ');
    if (!r.enabled) {
      redis.append(h('span', { class: 'badge off' }, h('span', { class: 'dot' }), t('redis.off')));
      return;
    }
    if (r.ok) {
      redis.append(h('span', { class: 'badge ok' }, h('span', { class: 'dot' }), t('redis.ok')), ' ',
        t('redis.synced', { n: fmtNum(r.channels || 0), ago: r.last_sync ? fmtAgo(r.last_sync) : '—' }));
    } else if (r.last_error) {
      redis.append(h('span', { class: 'badge err' }, h('span', { class: 'dot' }), t('redis.down')), ' ',
        h('span', { class: 'reason' }, r.last_error),
        r.last_error_at ? ` (${fmtAgo(r.last_error_at)})` : '');
    } else {
      redis.append(h('span', { class: 'badge warn' }, h('span', { class: 'dot' }), t('redis.pending')));
    }
    if (r.addr) redis.append(' · ', h('code', {}, r.addr));
  }

  // This replica, and with Redis every replica whose heartbeat it sees.
  function drawReplicas(r) {
    replicas.replaceChildren(h('span', { class: 'redis-label' }, t('replicas.title')), ' ');
    (r.replicas || []).forEach((p, i) => {
      if (i) replicas.append(' ');
      const badge = p.alive ? 'ok' : 'off';
      replicas.append(h('span', { class: `badge ${badge} replica`, 'data-replica': p.replica, title: p.alive ? t('replicas.alive') : t('replicas.gone', { ago: fmtAgo(p.seen) }) },
        h('span', { class: 'dot' }), p.replica, p.self ? ` (${t('replicas.self')})` : ''));
    });
    if (!r.shared) replicas.append(' ', h('span', { class: 'muted small' }, t('replicas.alone')));
    if (r.error) replicas.append(' ', h('span', { class: 'reason' }, t('replicas.unknown')));
  }

  // drawWebhooks shows each alert webhook by host (its path holds a token):
  // healthy or failing, what it sent, gave up on and dropped.
  function drawWebhooks(w) {
    hooks.replaceChildren(h('span', { class: 'redis-label' }, t('hooks.title')), ' ');
    if (!w.enabled) {
      hooks.append(h('span', { class: 'badge off' }, h('span', { class: 'dot' }), t('hooks.off')));
      return;
    }
    const testBtn = h('button', { type: 'button', class: 'btn small', id: 'webhook-test' }, t('hooks.test'));
    testBtn.onclick = async () => {
      testBtn.disabled = true;
      try {
        const r = await api('POST', '/admin/webhooks/test');
        const bad = r.results.filter((x) => !x.ok);
        toast(bad.length ? t('hooks.testFailed', { list: bad.map((x) => `${x.target}: ${x.error}`).join('; ') }) : t('hooks.testOk'),
          bad.length ? 'error' : 'ok');
        load();
      } catch (e) {
        showError(err, e);
      } finally {
        testBtn.disabled = false;
      }
    };
    hooks.append(h('ul', { class: 'keylist', id: 'webhook-list' }, w.webhooks.map((x) => h('li', { class: x.ok ? '' : 'cooling', dataset: { target: x.target } },
      h('span', { class: `badge ${x.ok ? 'ok' : 'err'} small` }, h('span', { class: 'dot' }), x.ok ? t('hooks.ok') : t('hooks.failing')), ' ',
      h('code', {}, x.target), ' ',
      h('span', { class: 'muted small' }, t('hooks.counts', { sent: fmtNum(x.sent), failed: fmtNum(x.failed), dropped: fmtNum(x.dropped) })),
      !x.ok && x.last_error ? h('span', { class: 'reason' }, x.last_error, x.last_error_at ? ` (${fmtAgo(x.last_error_at)})` : '') : null))),
    testBtn);
  }

  let loading = false;
  async function load() {
    if (loading) return;
    loading = true;
    refreshBtn.disabled = true;
    try {
      const opts = { signal: ctx.signal };
      const [s, tr, chs, r, reps, w, spend] = await Promise.all([
        get('/admin/summary', opts), get('/admin/trends?hours=24', opts), get('/admin/channels', opts), get('/admin/redis', opts),
        get('/admin/replicas', opts), get('/admin/webhooks', opts), get('/admin/spend', opts),
      ]);
      if (ctx.signal.aborted) return;
      drawSummary(s, spend);
      drawTrends(tr);
      drawHealth(chs);
      drawRedis(r);
      drawReplicas(reps);
      drawWebhooks(w);
      showError(err, null);
      updated.textContent = t('common.updatedAt', { time: fmtTime(new Date().toISOString()) });
    } catch (e) {
      if (e.name !== 'AbortError') showError(err, e);
    } finally {
      loading = false;
      refreshBtn.disabled = false;
    }
  }

  ctx.every(REFRESH_MS, load);
  ctx.on(document, 'cooldown-ended', () => load());
  load();
}
