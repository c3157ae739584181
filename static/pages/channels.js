// The channels page: the table of upstreams with their live state, and the
// actions on them (add/edit dialog, enable switch, test, clear cooldown,
// delete, CSV import and export).

import { t } from '../i18n.js';
import { api, get, ApiError } from '../api.js';
import {
  h, fmtNum, statusBadge, channelStatus, hasCooldown, table, field, errorBox, showError, toast,
  openDialog, confirmDialog, spinner,
} from '../ui.js';

const TYPES = ['anthropic', 'openai', 'gemini'];
const STRATEGIES = ['sequential', 'round_robin'];

export function render(root, ctx) {
  const err = errorBox();
  const listBox = h('div', { id: 'channels-list' }, spinner());
  const search = h('input', { type: 'search', id: 'channel-search', placeholder: t('ch.search'), 'aria-label': t('ch.search') });
  const fileInput = h('input', { type: 'file', accept: '.csv,text/csv', id: 'csv-file', hidden: true });
  const sortState = { key: 'priority', dir: 'desc' };
  const testResults = new Map(); // channel id → last test result, kept across redraws
  let channels = [];
  let drawn = false;

  root.append(
    h('div', { class: 'page-head' },
      h('h1', {}, t('nav.channels')),
      h('div', { class: 'head-tools' },
        search,
        h('button', { type: 'button', class: 'btn', id: 'csv-import', onclick: () => fileInput.click() }, t('ch.import')),
        h('button', { type: 'button', class: 'btn', id: 'csv-export', onclick: exportCSV }, t('ch.export')),
        h('button', { type: 'button', class: 'btn primary', id: 'add-channel', onclick: () => editDialog(null) }, t('ch.add')),
        fileInput)),
    err,
    h('section', { class: 'card flush' }, listBox),
  );

  search.addEventListener('input', draw);
  fileInput.addEventListener('change', importCSV);

  function matches(c, q) {
    if (!q) return true;
    return [c.name, c.url, c.channel_type, ...(c.models || []), ...Object.keys(c.model_redirects || {})]
      .some((v) => String(v).toLowerCase().includes(q));
  }

  function draw() {
    const q = search.value.trim().toLowerCase();
    const rows = channels.filter((c) => matches(c, q));
    listBox.replaceChildren(table({
      id: 'channels-table', className: 'responsive', state: sortState, caption: t('nav.channels'), rows,
      empty: channels.length ? t('ch.noMatch') : t('ch.none'),
      rowProps: (c) => ({ dataset: { id: c.id, name: c.name }, class: c.enabled ? null : 'disabled' }),
      columns: [
        { key: 'name', label: t('ch.name'), sort: (c) => c.name,
          render: (c) => h('div', { class: 'name-cell' }, h('strong', { class: 'ch-name' }, c.name), h('div', { class: 'url muted' }, c.url)) },
        { key: 'type', label: t('ch.type'), sort: (c) => c.channel_type, render: (c) => typeLabel(c.channel_type) },
        { key: 'priority', label: t('ch.priority'), num: true, sort: (c) => c.priority, render: (c) => String(c.priority) },
        { key: 'models', label: t('ch.models'), sort: (c) => (c.models || []).length, render: modelsCell },
        { key: 'keys', label: t('ch.keys'), num: true, sort: (c) => c.key_count,
          render: (c) => h('span', { title: (c.api_keys || []).join('\n') }, fmtNum(c.key_count ?? (c.api_keys || []).length)) },
        { key: 'status', label: t('ch.status'), sort: (c) => ({ err: 0, warn: 1, ok: 2, off: 3 })[channelStatus(c).kind],
          render: statusCell },
        { key: 'enabled', label: t('ch.enabled'), sort: (c) => (c.enabled ? 1 : 0), render: enabledSwitch },
        { key: 'actions', label: t('ch.actions'), class: 'actions', render: actionsCell },
      ],
    }));
  }

  function typeLabel(type) {
    return h('span', { class: `tag t-${type}` }, t(`type.${type}`));
  }

  function modelsCell(c) {
    const models = c.models || [];
    const redirects = Object.entries(c.model_redirects || {}).sort(([a], [b]) => a.localeCompare(b));
    const more = (n, all) => h('span', { class: 'muted small', title: all }, t('ch.more', { n }));
    return h('div', { class: 'models-cell' },
      models.length ? models.slice(0, 3).map((m) => h('code', { class: 'chip' }, m)) : h('span', { class: 'muted' }, t('ch.anyModel')),
      models.length > 3 ? more(models.length - 3, models.join(', ')) : null,
      redirects.length ? h('div', { class: 'redirect-list', title: t('ch.redirectsTitle') },
        redirects.slice(0, 2).map(([a, b]) => h('div', { class: 'small' }, h('code', {}, a), ' → ', h('code', {}, b))),
        redirects.length > 2 ? more(redirects.length - 2, redirects.map(([a, b]) => `${a} → ${b}`).join('\n')) : null) : null);
  }

  function enabledSwitch(c) {
    const sw = h('input', { type: 'checkbox', role: 'switch', class: 'switch', checked: c.enabled,
      'aria-label': t('ch.enableNamed', { name: c.name }), dataset: { action: 'toggle' } });
    sw.addEventListener('change', async () => {
      sw.disabled = true;
      try {
        replace(await api('PUT', `/admin/channels/${c.id}`, { enabled: sw.checked }));
        toast(t(sw.checked ? 'ch.enabledToast' : 'ch.disabledToast', { name: c.name }), 'ok');
      } catch (e) {
        sw.checked = !sw.checked;
        report(e);
      } finally {
        sw.disabled = false;
      }
    });
    return sw;
  }

  // statusCell shows the badge and, while anything of the channel cools,
  // the button that lifts it, next to what it acts on.
  function statusCell(c) {
    return h('div', { class: 'status-cell' }, statusBadge(c),
      hasCooldown(c) ? h('button', { type: 'button', class: 'btn small warn', dataset: { action: 'clear' },
        onclick: (e) => clearCooldown(c, e.currentTarget) }, t('ch.clear')) : null);
  }

  function actionsCell(c) {
    const result = h('output', { class: 'test-result', id: `test-result-${c.id}`, 'aria-live': 'polite' });
    const last = testResults.get(c.id);
    if (last) showTest(result, last);
    const testBtn = h('button', { type: 'button', class: 'btn small', dataset: { action: 'test' },
      title: t('ch.testHint'), onclick: () => runTest(c, testBtn, result) }, t('ch.test'));
    return h('div', { class: 'actions-cell' },
      h('div', { class: 'btn-row' },
        testBtn,
        h('button', { type: 'button', class: 'btn small', dataset: { action: 'edit' }, onclick: () => editDialog(c) }, t('common.edit')),
        h('a', { class: 'btn small ghost', href: `#/logs?channel_id=${c.id}` }, t('nav.logs')),
        h('button', { type: 'button', class: 'btn small danger ghost', dataset: { action: 'delete' }, onclick: () => remove(c) }, t('common.delete'))),
      result);
  }

  function showTest(out, r) {
    out.className = `test-result ${r.ok ? 'ok' : 'err'}`;
    out.replaceChildren(
      h('span', { 'aria-hidden': 'true' }, r.ok ? '✓ ' : '✗ '),
      r.status ? `${r.status}` : t('ch.testFailed'), ` · ${r.latency_ms} ms`,
      r.model ? h('span', { class: 'muted' }, ` · ${r.model}`) : null,
      !r.ok && r.message ? h('div', { class: 'reason' }, r.message) : null);
  }

  async function runTest(c, btn, out) {
    btn.disabled = true;
    out.className = 'test-result';
    out.textContent = t('ch.testing');
    try {
      const r = await api('POST', `/admin/channels/${c.id}/test`, {});
      testResults.set(c.id, r);
      showTest(out, r);
      // A good test clears cooldowns: show the new state.
      if (r.ok && hasCooldown(c)) load();
    } catch (e) {
      out.textContent = '';
      report(e);
    } finally {
      btn.disabled = false;
    }
  }

  async function clearCooldown(c, btn) {
    btn.disabled = true;
    try {
      replace(await api('DELETE', `/admin/channels/${c.id}/cooldown`));
      toast(t('ch.cleared', { name: c.name }), 'ok');
    } catch (e) {
      btn.disabled = false;
      report(e);
    }
  }

  async function remove(c) {
    if (!await confirmDialog(t('ch.confirmDelete', { name: c.name }), { ok: t('common.delete'), danger: true })) return;
    try {
      await api('DELETE', `/admin/channels/${c.id}`);
      channels = channels.filter((x) => x.id !== c.id);
      draw();
      toast(t('ch.deleted', { name: c.name }), 'ok');
    } catch (e) {
      report(e);
    }
  }

  function replace(updated) {
    channels = channels.map((x) => (x.id === updated.id ? updated : x));
    draw();
  }

  function report(e) {
    if (e.name === 'AbortError') return;
    showError(err, e);
    if (!(e instanceof ApiError) || e.status !== 401) toast(e.message, 'error');
  }

  async function load() {
    try {
      const fresh = await get('/admin/channels', { signal: ctx.signal });
      if (ctx.signal.aborted) return;
      showError(err, null);
      // Redraw only on a change, so a periodic refresh does not take the
      // keyboard focus away from someone working in the table.
      if (drawn && JSON.stringify(fresh) === JSON.stringify(channels)) return;
      channels = fresh;
      drawn = true;
      draw();
    } catch (e) {
      if (e.name === 'AbortError') return;
      showError(err, e);
      if (!channels.length) listBox.replaceChildren();
    }
  }

  // CSV ------------------------------------------------------------------

  async function exportCSV() {
    try {
      const resp = await api('GET', '/admin/channels/export', undefined, { raw: true });
      const blob = await resp.blob();
      const cd = resp.headers.get('Content-Disposition') || '';
      const m = /filename="?([^";]+)"?/.exec(cd);
      const d = new Date();
      const name = m ? m[1] : `ccload-channels-${d.getFullYear()}${String(d.getMonth() + 1).padStart(2, '0')}${String(d.getDate()).padStart(2, '0')}.csv`;
      const url = URL.createObjectURL(blob);
      const a = h('a', { href: url, download: name, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      toast(t('ch.exported', { name }), 'ok');
    } catch (e) {
      report(e);
    }
  }

  async function importCSV() {
    const file = fileInput.files[0];
    fileInput.value = '';
    if (!file) return;
    const form = new FormData();
    form.append('file', file);
    try {
      const r = await api('POST', '/admin/channels/import', form);
      toast(t('ch.imported', { c: r.created ?? 0, u: r.updated ?? 0, n: r.unchanged ?? 0 }), 'ok');
      load();
    } catch (e) {
      if (e instanceof ApiError && e.body && Array.isArray(e.body.problems) && e.body.problems.length) {
        importProblems(file.name, e);
      } else {
        report(e);
      }
    }
  }

  function importProblems(name, e) {
    const problems = e.body.problems;
    const dlg = openDialog({
      id: 'import-problems', title: t('ch.importFailed'),
      body: [
        // The table says it all; the server's one-line summary would repeat it.
        h('p', { role: 'alert' }, t('ch.importNothing', { file: name })),
        e.body.problem_count > problems.length
          ? h('p', { class: 'muted small' }, t('ch.importShown', { n: problems.length, total: e.body.problem_count })) : null,
        h('div', { class: 'table-wrap' }, h('table', {},
          h('thead', {}, h('tr', {}, h('th', { scope: 'col', class: 'num' }, t('csv.line')), h('th', { scope: 'col' }, t('csv.column')),
            h('th', { scope: 'col' }, t('csv.problem')))),
          h('tbody', {}, problems.map((p) => h('tr', {},
            h('td', { class: 'num' }, String(p.line ?? '')), h('td', {}, p.column || '—'), h('td', {}, p.message || '')))))),
      ],
      footer: h('button', { type: 'button', class: 'btn primary', onclick: () => dlg.close() }, t('common.ok')),
    });
  }

  // The add/edit dialog --------------------------------------------------------

  function editDialog(c) {
    const editing = Boolean(c);
    const v = c || { name: '', url: '', channel_type: 'anthropic', priority: 0, models: [], model_redirects: {},
      key_strategy: 'sequential', enabled: true, api_keys: [] };
    // The keys field starts with the masked keys, one a line: the API takes
    // a masked key back as "keep this stored key", so a person can drop one
    // line or add new ones. Untouched, the keys are not sent at all.
    const maskedKeys = (v.api_keys || []).join('\n');

    const name = h('input', { type: 'text', name: 'name', id: 'ch-name', required: true, maxlength: 100, value: v.name, autocomplete: 'off' });
    const url = h('input', { type: 'url', name: 'url', id: 'ch-url', required: true, value: v.url, placeholder: 'https://api.anthropic.com',
      autocomplete: 'off', spellcheck: 'false' });
    const type = h('select', { name: 'channel_type', id: 'ch-type' },
      TYPES.map((x) => h('option', { value: x, selected: x === v.channel_type }, t(`type.${x}`))));
    const priority = h('input', { type: 'number', name: 'priority', id: 'ch-priority', step: 1, value: String(v.priority ?? 0) });
    const multiplier = h('input', { type: 'number', name: 'price_multiplier', id: 'ch-multiplier', step: 'any', min: '0',
      value: String(v.price_multiplier ?? 1) });
    const strategy = h('select', { name: 'key_strategy', id: 'ch-strategy' },
      STRATEGIES.map((x) => h('option', { value: x, selected: x === v.key_strategy }, t(`strategy.${x}`))));
    const keys = h('textarea', { name: 'api_keys', id: 'ch-keys', rows: 3, spellcheck: 'false', autocomplete: 'off',
      placeholder: editing ? '' : 'sk-ant-…', required: !editing, class: 'mono' });
    keys.value = maskedKeys;
    const models = h('textarea', { name: 'models', id: 'ch-models', rows: 2, spellcheck: 'false', placeholder: 'claude-sonnet-4-5, claude-haiku-4-5',
      class: 'mono' });
    models.value = (v.models || []).join(', ');
    const enabled = h('input', { type: 'checkbox', role: 'switch', class: 'switch', name: 'enabled', id: 'ch-enabled', checked: v.enabled });
    const redirectRows = h('div', { class: 'redirects', id: 'ch-redirects' });
    const addRedirect = (from = '', to = '') => {
      const a = h('input', { type: 'text', class: 'mono', 'aria-label': t('ch.redirectFrom'), placeholder: t('ch.redirectFrom'), value: from, dataset: { role: 'from' } });
      const b = h('input', { type: 'text', class: 'mono', 'aria-label': t('ch.redirectTo'), placeholder: t('ch.redirectTo'), value: to, dataset: { role: 'to' } });
      const row = h('div', { class: 'redirect-row' }, a, h('span', { 'aria-hidden': 'true' }, '→'), b,
        h('button', { type: 'button', class: 'btn ghost icon', 'aria-label': t('ch.redirectRemove'), onclick: () => { row.remove(); } }, '✕'));
      redirectRows.append(row);
      return a;
    };
    for (const [from, to] of Object.entries(v.model_redirects || {})) addRedirect(from, to);

    const formErr = errorBox();
    formErr.id = 'ch-error';
    const save = h('button', { type: 'submit', class: 'btn primary', id: 'ch-save', form: 'channel-form' }, t('common.save'));
    const form = h('form', { id: 'channel-form', class: 'form-grid', novalidate: true },
      field(t('ch.name'), name),
      field(t('ch.url'), url, t('ch.urlHint')),
      field(t('ch.type'), type),
      field(t('ch.priority'), priority, t('ch.priorityHint')),
      field(t('ch.multiplier'), multiplier, t('ch.multiplierHint')),
      h('div', { class: 'field span2' }, h('label', { for: 'ch-keys' }, t('ch.keys')), keys,
        h('small', { class: 'hint', id: 'ch-keys-hint' }, editing ? t('ch.keysEditHint', { n: (v.api_keys || []).length }) : t('ch.keysHint'))),
      field(t('ch.strategy'), strategy, t('ch.strategyHint')),
      h('div', { class: 'field switch-field' }, h('label', { for: 'ch-enabled' }, t('ch.enabled')), enabled),
      h('div', { class: 'field span2' }, h('label', { for: 'ch-models' }, t('ch.models')), models,
        h('small', { class: 'hint' }, t('ch.modelsHint'))),
      h('fieldset', { class: 'field span2' }, h('legend', {}, t('ch.redirectsTitle')),
        h('small', { class: 'hint' }, t('ch.redirectsHint')),
        redirectRows,
        h('button', { type: 'button', class: 'btn small', id: 'ch-add-redirect', onclick: () => addRedirect().focus() }, t('ch.redirectAdd'))),
      formErr);
    keys.setAttribute('aria-describedby', 'ch-keys-hint');

    const dlg = openDialog({
      id: 'channel-dialog', className: 'wide',
      title: editing ? t('ch.editTitle', { name: v.name }) : t('ch.addTitle'),
      body: form,
      footer: [h('button', { type: 'button', class: 'btn', onclick: () => dlg.close() }, t('common.cancel')), save],
    });
    name.focus();

    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const body = {
        name: name.value.trim(),
        url: url.value.trim(),
        channel_type: type.value,
        priority: Number.parseInt(priority.value || '0', 10),
        key_strategy: strategy.value,
        price_multiplier: Number.parseFloat(multiplier.value || '1'),
        enabled: enabled.checked,
        models: models.value.split(/[\s,;]+/).map((m) => m.trim()).filter(Boolean),
        model_redirects: {},
      };
      const problems = [];
      if (!body.name) problems.push([name, t('ch.needName')]);
      if (!body.url) problems.push([url, t('ch.needURL')]);
      else if (!/^https?:\/\/[^/\s]+/i.test(body.url)) problems.push([url, t('ch.badURL')]);
      if (!Number.isInteger(body.priority)) problems.push([priority, t('ch.badPriority')]);
      if (!(body.price_multiplier > 0)) problems.push([multiplier, t('ch.badMultiplier')]);
      const keyList = keys.value.split(/[\n,]+/).map((k) => k.trim()).filter(Boolean);
      if (!editing || keys.value !== maskedKeys) {
        if (!keyList.length) problems.push([keys, t('ch.needKey')]);
        // A masked line stands for the stored key with that mask; when two
        // stored keys mask alike the server cannot tell them apart, so ask
        // for the keys in full rather than lose one.
        const masks = v.api_keys || [];
        if (keyList.some((k) => k.includes('…') && masks.indexOf(k) !== masks.lastIndexOf(k))) {
          problems.push([keys, t('ch.keysAmbiguous')]);
        }
        body.api_keys = keyList;
      }
      for (const row of redirectRows.querySelectorAll('.redirect-row')) {
        const from = row.querySelector('[data-role=from]'), to = row.querySelector('[data-role=to]');
        const a = from.value.trim(), b = to.value.trim();
        if (!a && !b) continue;
        if (!a || !b) problems.push([a ? to : from, t('ch.badRedirect')]);
        else body.model_redirects[a] = b;
      }
      for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
      if (problems.length) {
        for (const [el] of problems) el.setAttribute('aria-invalid', 'true');
        showError(formErr, new Error(problems.map(([, m]) => m).join(' ')));
        problems[0][0].focus();
        return;
      }
      save.disabled = true;
      showError(formErr, null);
      try {
        const saved = editing
          ? await api('PUT', `/admin/channels/${c.id}`, body)
          : await api('POST', '/admin/channels', body);
        dlg.close();
        toast(t(editing ? 'ch.saved' : 'ch.created', { name: saved.name }), 'ok');
        load();
      } catch (e2) {
        showError(formErr, e2);
      } finally {
        save.disabled = false;
      }
    });
  }

  ctx.on(document, 'cooldown-ended', () => load());
  ctx.every(30000, load);
  load();
}
