// The tokens page: client tokens managed in the admin, with their limits
// and usage bars against them. A new token's secret is shown once, in the
// dialog that follows its creation, with a copy button; after that only its
// masked hint exists anywhere.

import { t } from '../i18n.js';
import { api, get } from '../api.js';
import {
  h, fmtNum, fmtUSD, fmtTime, fmtAgo, table, field, errorBox, showError, toast, openDialog, confirmDialog, spinner,
} from '../ui.js';

const USD_LIMITS = [['daily_usd', 'spent_today_usd'], ['monthly_usd', 'spent_month_usd'], ['total_usd', 'spent_total_usd']];

export function render(root, ctx) {
  const err = errorBox();
  const listBox = h('div', { id: 'tokens-list' }, spinner());
  const sortState = { key: 'name', dir: 'asc' };
  let tokens = [];

  root.append(
    h('div', { class: 'page-head' }, h('h1', {}, t('nav.tokens')),
      h('div', { class: 'head-tools' },
        h('button', { type: 'button', class: 'btn primary', id: 'add-token', onclick: () => editDialog(null) }, t('tok.add')))),
    h('p', { class: 'muted small' }, t('tok.intro')),
    err,
    h('section', { class: 'card flush' }, listBox),
  );

  // bar shows used against limit; without a limit, just the figure.
  function bar(used, limit, fmt) {
    if (limit === null || limit === undefined) return h('span', {}, fmt(used), h('span', { class: 'muted small' }, ` · ${t('tok.noLimit')}`));
    const ratio = limit > 0 ? Math.min(used / limit, 1) : 1;
    return h('div', { class: 'usage-bar' },
      h('span', {}, `${fmt(used)} / ${fmt(limit)}`),
      h('meter', { min: 0, max: 1, low: 0.7, high: 0.9, optimum: 0, value: ratio, 'aria-label': `${fmt(used)} / ${fmt(limit)}` }));
  }

  function usageCell(tok) {
    if (tok.source === 'env') return h('span', { class: 'muted small' }, t('tok.envHint'));
    const u = tok.usage || {};
    const l = tok.limits || {};
    return h('div', { class: 'usage-cell' },
      USD_LIMITS.map(([lim, spent]) => h('div', { class: 'small', dataset: { limit: lim } },
        h('span', { class: 'muted' }, `${t(`tok.${lim}`)}: `), bar(u[spent] || 0, l[lim], fmtUSD))),
      h('div', { class: 'small', dataset: { limit: 'concurrency' } },
        h('span', { class: 'muted' }, `${t('tok.concurrency')}: `), bar(u.in_flight || 0, l.concurrency, fmtNum)),
      l.rpm ? h('div', { class: 'small muted' }, `${t('tok.rpm')}: ${fmtNum(l.rpm)}`) : null);
  }

  function draw() {
    listBox.replaceChildren(table({
      id: 'tokens-table', className: 'responsive', state: sortState, caption: t('nav.tokens'), rows: tokens,
      empty: t('tok.none'),
      rowProps: (tok) => ({ dataset: { id: tok.id, name: tok.name }, class: tok.enabled ? null : 'disabled' }),
      columns: [
        { key: 'name', label: t('tok.name'), sort: (x) => x.name,
          render: (x) => h('div', { class: 'name-cell' }, h('strong', {}, x.name), ' ', h('code', { class: 'muted small' }, x.hint || '')) },
        { key: 'scope', label: t('tok.scope'), render: (x) => h('div', { class: 'small' },
          (x.models || []).length ? (x.models || []).map((m) => h('code', { class: 'chip' }, m)) : h('span', { class: 'muted' }, t('tok.anyModel')),
          (x.channels || []).length ? h('div', { class: 'muted' }, t('tok.channelsN', { ids: x.channels.join(', ') })) : null) },
        { key: 'usage', label: t('tok.usage'), render: usageCell },
        { key: 'requests', label: t('tok.requests'), num: true, sort: (x) => (x.usage || {}).requests || 0,
          render: (x) => (x.source === 'env' ? '—' : h('span', { title: x.usage && x.usage.last_used_at ? fmtTime(x.usage.last_used_at) : '' },
            fmtNum((x.usage || {}).requests || 0), x.usage && x.usage.last_used_at ? h('div', { class: 'muted small' }, fmtAgo(x.usage.last_used_at)) : null)) },
        { key: 'expires', label: t('tok.expires'), sort: (x) => x.expires_at || '',
          render: (x) => (x.expires_at ? fmtTime(x.expires_at, { seconds: false }) : h('span', { class: 'muted' }, t('tok.never'))) },
        { key: 'enabled', label: t('tok.enabled'), sort: (x) => (x.enabled ? 1 : 0), render: enabledSwitch },
        { key: 'actions', label: t('ch.actions'), class: 'actions', render: (x) => (x.source === 'env' ? h('span', { class: 'tag' }, 'CCLOAD_AUTH')
          : h('div', { class: 'btn-row' },
            h('button', { type: 'button', class: 'btn small', dataset: { action: 'edit' }, onclick: () => editDialog(x) }, t('common.edit')),
            h('a', { class: 'btn small ghost', href: `#/logs?token_id=${x.id}` }, t('nav.logs')),
            h('button', { type: 'button', class: 'btn small danger ghost', dataset: { action: 'delete' }, onclick: () => remove(x) }, t('common.delete')))) },
      ],
    }));
  }

  function enabledSwitch(x) {
    if (x.source === 'env') return h('span', { class: 'muted' }, t('common.yes'));
    const sw = h('input', { type: 'checkbox', role: 'switch', class: 'switch', checked: x.enabled,
      'aria-label': t('tok.enableNamed', { name: x.name }), dataset: { action: 'toggle' } });
    sw.addEventListener('change', async () => {
      sw.disabled = true;
      try {
        replace(await api('PUT', `/admin/tokens/${x.id}`, { enabled: sw.checked }));
        toast(t(sw.checked ? 'tok.enabledToast' : 'tok.disabledToast', { name: x.name }), 'ok');
      } catch (e) {
        sw.checked = !sw.checked;
        showError(err, e);
      } finally {
        sw.disabled = false;
      }
    });
    return sw;
  }

  function replace(tok) {
    tokens = tokens.map((x) => (x.source !== 'env' && x.id === tok.id ? tok : x));
    draw();
  }

  async function remove(x) {
    if (!(await confirmDialog(t('tok.confirmDelete', { name: x.name }), { ok: t('common.delete'), danger: true }))) return;
    try {
      await api('DELETE', `/admin/tokens/${x.id}`);
      toast(t('tok.deleted', { name: x.name }), 'ok');
      load();
    } catch (e) {
      showError(err, e);
    }
  }

  // editDialog creates (x null) or edits a token.
  function editDialog(x) {
    const editing = !!x;
    const v = x || { name: '', models: [], channels: [], limits: {}, expires_at: null, enabled: true };
    const l = v.limits || {};
    const num = (id, val, step) => h('input', { type: 'number', id, min: '0', step, value: val === null || val === undefined ? '' : String(val) });
    const name = h('input', { type: 'text', id: 'tok-name', required: true, value: v.name, autocomplete: 'off' });
    const models = h('input', { type: 'text', id: 'tok-models', value: (v.models || []).join(', '), placeholder: t('tok.anyModel') });
    const channels = h('input', { type: 'text', id: 'tok-channels', value: (v.channels || []).join(', '), placeholder: t('tok.anyChannel') });
    const daily = num('tok-daily', l.daily_usd, 'any');
    const monthly = num('tok-monthly', l.monthly_usd, 'any');
    const total = num('tok-total', l.total_usd, 'any');
    const conc = num('tok-concurrency', l.concurrency, '1');
    const rpm = num('tok-rpm', l.rpm, '1');
    const expires = h('input', { type: 'datetime-local', id: 'tok-expires',
      value: v.expires_at ? localInput(v.expires_at) : '' });
    const formErr = errorBox();
    formErr.id = 'tok-error';
    const save = h('button', { type: 'submit', class: 'btn primary', id: 'tok-save', form: 'token-form' }, editing ? t('common.save') : t('tok.create'));
    const form = h('form', { id: 'token-form', class: 'form-grid', novalidate: true },
      field(t('tok.name'), name),
      field(t('tok.expires'), expires, t('tok.expiresHint')),
      field(t('tok.models'), models, t('tok.modelsHint')),
      field(t('tok.channels'), channels, t('tok.channelsHint')),
      field(t('tok.daily_usd'), daily, t('tok.usdHint')),
      field(t('tok.monthly_usd'), monthly),
      field(t('tok.total_usd'), total),
      field(t('tok.concurrency'), conc, t('tok.intHint')),
      field(t('tok.rpm'), rpm),
      formErr);
    const dlg = openDialog({
      id: 'token-dialog', className: 'wide', title: editing ? t('tok.editTitle', { name: v.name }) : t('tok.addTitle'), body: form,
      footer: [h('button', { type: 'button', class: 'btn', onclick: () => dlg.close() }, t('common.cancel')), save],
    });
    name.focus();

    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const limit = (input, int) => {
        const s = input.value.trim();
        if (s === '') return null;
        const n = Number(s);
        return int ? Math.trunc(n) : n;
      };
      const body = {
        name: name.value.trim(),
        models: models.value.split(/[\s,;]+/).filter(Boolean),
        channels: channels.value.split(/[\s,;]+/).filter(Boolean).map(Number),
        expires_at: expires.value ? new Date(expires.value).toISOString() : null,
        limits: { daily_usd: limit(daily), monthly_usd: limit(monthly), total_usd: limit(total), concurrency: limit(conc, true), rpm: limit(rpm, true) },
      };
      if (!body.name) {
        showError(formErr, new Error(t('tok.needName')));
        name.focus();
        return;
      }
      save.disabled = true;
      try {
        if (editing) {
          replace(await api('PUT', `/admin/tokens/${v.id}`, body));
          toast(t('tok.saved', { name: body.name }), 'ok');
          dlg.close();
        } else {
          const created = await api('POST', '/admin/tokens', body);
          dlg.close();
          reveal(created);
          load();
        }
      } catch (e2) {
        showError(formErr, e2);
      } finally {
        save.disabled = false;
      }
    });
  }

  // reveal shows a new token's secret, the one time it exists outside the
  // client that will use it.
  function reveal(created) {
    const secret = h('input', { type: 'text', id: 'tok-secret', readonly: true, value: created.token, class: 'mono', 'aria-label': t('tok.secret') });
    const copied = h('span', { class: 'muted small', id: 'tok-copied', 'aria-live': 'polite' });
    const copy = h('button', { type: 'button', class: 'btn primary', id: 'tok-copy', onclick: async () => {
      try {
        await navigator.clipboard.writeText(created.token);
      } catch {
        // No clipboard permission (plain HTTP, say): select it for Ctrl+C.
        secret.select();
        document.execCommand('copy');
      }
      copied.textContent = t('tok.copied');
    } }, t('tok.copy'));
    const dlg = openDialog({
      id: 'token-reveal', title: t('tok.revealTitle', { name: created.name }),
      body: [h('p', { role: 'alert' }, t('tok.revealOnce')), h('div', { class: 'btn-row' }, secret, copy), copied],
      footer: [h('button', { type: 'button', class: 'btn', id: 'tok-done', onclick: () => dlg.close() }, t('tok.done'))],
    });
    secret.select();
  }

  async function load() {
    try {
      const list = await get('/admin/tokens', { signal: ctx.signal });
      if (ctx.signal.aborted) return;
      tokens = list;
      showError(err, null);
      draw();
    } catch (e) {
      if (e.name === 'AbortError') return;
      showError(err, e);
      listBox.replaceChildren();
    }
  }

  ctx.every(15000, () => {
    if (!document.querySelector('dialog')) load();
  });
  load();
}

// localInput turns an RFC 3339 time into a datetime-local value.
function localInput(iso) {
  const d = new Date(iso);
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
}
