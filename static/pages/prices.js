// The prices page: the table costs are computed from, in USD per million
// tokens, edited in place and saved whole (the server checks every row and
// changes nothing if one is wrong). Saving prices only what comes after.

import { t } from '../i18n.js';
import { api, get } from '../api.js';
import { h, errorBox, showError, toast, spinner } from '../ui.js';

const FIELDS = ['input', 'output', 'cache_write_5m', 'cache_write_1h', 'cache_read'];

export function render(root, ctx) {
  const err = errorBox();
  const box = h('div', { id: 'prices-box' }, spinner());
  const asOf = h('input', { type: 'date', id: 'prices-as-of' });
  const save = h('button', { type: 'button', class: 'btn primary', id: 'prices-save', onclick: () => store() }, t('common.save'));
  const add = h('button', { type: 'button', class: 'btn', id: 'prices-add', onclick: () => addRow({}).querySelector('input').focus() }, t('price.add'));
  const body = h('tbody', {});

  root.append(
    h('div', { class: 'page-head' }, h('h1', {}, t('nav.prices')),
      h('div', { class: 'head-tools' }, h('label', { for: 'prices-as-of', class: 'muted small' }, t('price.asOf')), asOf, add, save)),
    h('p', { class: 'muted small' }, t('price.intro')),
    err,
    h('section', { class: 'card flush' }, box),
  );

  function addRow(p) {
    const cell = (f) => h('td', { class: 'num', 'data-label': t(`price.${f}`) },
      h('input', { type: 'number', min: '0', step: 'any', class: 'price-input', dataset: { field: f }, value: p[f] === undefined ? '' : String(p[f]),
        'aria-label': `${p.model || ''} ${t(`price.${f}`)}` }));
    const tr = h('tr', { dataset: { model: p.model || '' } },
      h('td', { 'data-label': t('price.model') }, h('input', { type: 'text', class: 'model-input', dataset: { field: 'model' }, value: p.model || '',
        'aria-label': t('price.model') })),
      FIELDS.map(cell),
      h('td', { class: 'actions' }, h('button', { type: 'button', class: 'btn small danger ghost', 'aria-label': t('price.remove'),
        onclick: () => tr.remove() }, '✕')));
    body.append(tr);
    return tr;
  }

  function draw(table) {
    asOf.value = table.as_of || '';
    body.replaceChildren();
    for (const p of table.prices) addRow(p);
    box.replaceChildren(h('div', { class: 'table-wrap responsive' }, h('table', { id: 'prices-table' },
      h('caption', { class: 'sr-only' }, t('nav.prices')),
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, t('price.model')),
        FIELDS.map((f) => h('th', { scope: 'col', class: 'num' }, t(`price.${f}`))), h('th', {}))),
      body)));
  }

  async function store() {
    const prices = [...body.querySelectorAll('tr')].map((tr) => {
      const row = { model: tr.querySelector('[data-field=model]').value.trim() };
      for (const f of FIELDS) {
        const s = tr.querySelector(`[data-field=${f}]`).value.trim();
        // Left empty: sent as missing, so the server names the gap.
        if (s !== '') row[f] = Number(s);
      }
      return row;
    });
    save.disabled = true;
    try {
      draw(await api('PUT', '/admin/prices', { as_of: asOf.value, prices }));
      showError(err, null);
      toast(t('price.saved'), 'ok');
    } catch (e) {
      showError(err, e);
    } finally {
      save.disabled = false;
    }
  }

  (async () => {
    try {
      const table = await get('/admin/prices', { signal: ctx.signal });
      if (!ctx.signal.aborted) draw(table);
    } catch (e) {
      if (e.name !== 'AbortError') showError(err, e);
      box.replaceChildren();
    }
  })();
}
