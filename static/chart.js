// A stacked bar chart in SVG, drawn at the container's real pixel width so
// text stays readable on a phone, and redrawn when that width changes.

import { t } from './i18n.js';
import { fmtCompact } from './ui.js';

const NS = 'http://www.w3.org/2000/svg';

function s(tag, attrs, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c !== null && c !== undefined) el.append(c);
  }
  return el;
}

// niceMax rounds up to 1, 2 or 5 times a power of ten, so axis labels are
// round numbers.
function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) {
    if (m * p >= v) return m * p;
  }
  return 10 * p;
}

// barChart draws buckets (objects with a "start" time) into container.
// series: [{key, label, class}], stacked bottom to top.
// label(bucket) is the tooltip of one bar. It returns a function that stops
// the redrawing.
export function barChart(container, { buckets, series, label, title, height = 180 }) {
  const draw = (width) => {
    if (width < 50) return;
    const top = 8, bottom = 22, left = 44, right = 6;
    const plotW = width - left - right, plotH = height - top - bottom;
    const totals = buckets.map((b) => series.reduce((n, sr) => n + (b[sr.key] || 0), 0));
    const max = niceMax(Math.max(0, ...totals));
    const y = (v) => top + plotH - (v / max) * plotH;
    const step = plotW / Math.max(1, buckets.length);
    const barW = Math.max(1, Math.min(28, step * 0.72));

    const svg = s('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', class: 'chart',
      'aria-label': title });
    svg.append(s('title', {}, title));

    // Counts are whole numbers: no "0.5" line on a nearly empty chart.
    for (const v of Number.isInteger(max / 2) ? [0, max / 2, max] : [0, max]) {
      const yy = Math.round(y(v)) + 0.5;
      svg.append(s('line', { x1: left, x2: width - right, y1: yy, y2: yy, class: 'grid' }));
      svg.append(s('text', { x: left - 6, y: yy + 4, 'text-anchor': 'end', class: 'axis' }, fmtCompact(v)));
    }

    // One hour label every few bars, never closer than ~44px.
    const every = Math.max(1, Math.ceil(44 / step));
    buckets.forEach((b, i) => {
      const x = left + i * step + (step - barW) / 2;
      const g = s('g', { class: 'bar' });
      let base = 0;
      for (const sr of series) {
        const v = b[sr.key] || 0;
        if (v > 0) {
          g.append(s('rect', { x: x.toFixed(1), y: y(base + v).toFixed(1), width: barW.toFixed(1),
            height: Math.max(1, (v / max) * plotH).toFixed(1), class: sr.class }));
        }
        base += v;
      }
      // A full-height hit area carries the tooltip, so thin bars are easy
      // to point at.
      g.append(s('rect', { x: (left + i * step).toFixed(1), y: top, width: step.toFixed(1), height: plotH, class: 'hit' },
        s('title', {}, label(b))));
      svg.append(g);
      if ((buckets.length - 1 - i) % every === 0) {
        const d = new Date(b.start);
        svg.append(s('text', { x: (left + i * step + step / 2).toFixed(1), y: height - 6, 'text-anchor': 'middle', class: 'axis' },
          // Minutes too: the buckets are UTC hours, which start at :30
          // or :45 in some time zones.
          `${String(d.getHours()).padStart(2, '0')}:${String(d.getMinutes()).padStart(2, '0')}`));
      }
    });

    const wrap = document.createElement('div');
    wrap.className = 'chart-box';
    wrap.append(svg);
    if (totals.every((n) => n === 0)) {
      const p = document.createElement('p');
      p.className = 'chart-empty';
      p.textContent = t('dash.noTraffic');
      wrap.append(p);
    }
    container.replaceChildren(wrap);
  };

  let lastWidth = 0;
  const ro = new ResizeObserver((entries) => {
    const w = Math.floor(entries[0].contentRect.width);
    if (w !== lastWidth) {
      lastWidth = w;
      draw(w);
    }
  });
  ro.observe(container);
  return () => ro.disconnect();
}

export function legend(series) {
  const ul = document.createElement('ul');
  ul.className = 'legend';
  for (const sr of series) {
    const li = document.createElement('li');
    const sw = document.createElement('span');
    sw.className = `swatch ${sr.class}`;
    sw.setAttribute('aria-hidden', 'true');
    li.append(sw, sr.label);
    ul.append(li);
  }
  return ul;
}
