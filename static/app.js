// The admin's entry point: a hash router (#/dashboard, #/logs?model=x …)
// over the page modules, the language switch, and the way back to the login
// page when the session ends.

import { t, lang, setLang, applyStatic } from './i18n.js';
import { api, setAuthLostHandler } from './api.js';
import { closeAllDialogs, toast } from './ui.js';
import * as login from './pages/login.js';
import * as dashboard from './pages/dashboard.js';
import * as channels from './pages/channels.js';
import * as logs from './pages/logs.js';
import * as stats from './pages/stats.js';
import * as tokens from './pages/tokens.js';
import * as prices from './pages/prices.js';

const pages = { login, dashboard, channels, logs, stats, tokens, prices };
const view = document.getElementById('view');
let current = null; // {controller} of the page on screen

// CSP violations would otherwise pass silently; the console is where the
// browser tests and developers look.
document.addEventListener('securitypolicyviolation', (e) => {
  console.error(`CSP blocked ${e.blockedURI || 'inline code'} (${e.violatedDirective})`);
});

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [name, q] = raw.split('?');
  return { name: name || 'dashboard', params: new URLSearchParams(q || '') };
}

// navigate changes the route; params is an object of query values.
export function navigate(name, params = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') q.set(k, v);
  }
  const s = q.toString();
  const hash = `#/${name}${s ? `?${s}` : ''}`;
  if (location.hash === hash) render();
  else location.hash = hash;
}

function render() {
  let { name, params } = parseHash();
  if (!pages[name]) name = 'dashboard';
  current?.controller.abort();
  closeAllDialogs();
  const controller = new AbortController();
  current = { controller, name };

  document.body.dataset.page = name;
  for (const a of document.querySelectorAll('.mainnav a')) {
    if (a.dataset.route === name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  document.title = `${t(`nav.${name}`)} · ccload`;

  // ctx is what a page gets: its query params, a signal that ends when the
  // page is left, and timers that stop with it.
  const ctx = {
    params,
    signal: controller.signal,
    navigate,
    every(ms, fn) {
      const id = setInterval(() => {
        if (!document.hidden) fn();
      }, ms);
      controller.signal.addEventListener('abort', () => clearInterval(id));
    },
    on(target, type, fn) {
      target.addEventListener(type, fn, { signal: controller.signal });
    },
  };
  const root = document.createElement('div');
  root.className = `page page-${name}`;
  view.replaceChildren(root);
  pages[name].render(root, ctx);
  // After choosing a page from the menu, keyboard and screen reader users
  // continue in the page, not back at the menu.
  if (document.activeElement && document.activeElement.closest('.mainnav')) view.focus();
}

setAuthLostHandler(() => {
  const { name } = parseHash();
  if (name === 'login') return;
  const next = location.hash.replace(/^#\/?/, '');
  closeAllDialogs();
  location.hash = `#/login?next=${encodeURIComponent(next)}`;
});

function updateLangButton() {
  const btn = document.getElementById('lang-toggle');
  const other = lang() === 'zh' ? 'en' : 'zh';
  btn.textContent = other === 'zh' ? '中文' : 'English';
  btn.lang = other === 'zh' ? 'zh-CN' : 'en';
  btn.title = other === 'zh' ? '切换到中文' : 'Switch to English';
  btn.dataset.lang = other;
}

document.getElementById('lang-toggle').addEventListener('click', () => {
  setLang(lang() === 'zh' ? 'en' : 'zh');
  applyStatic();
  updateLangButton();
  render();
});

document.getElementById('logout').addEventListener('click', async () => {
  try {
    await api('POST', '/logout');
  } catch (err) {
    toast(err.message, 'error');
  }
  location.hash = '#/login';
});

document.getElementById('logout-all').addEventListener('click', async () => {
  try {
    await api('POST', '/admin/logout-all');
  } catch (err) {
    toast(err.message, 'error');
  }
  location.hash = '#/login';
});

window.addEventListener('hashchange', render);
applyStatic();
updateLangButton();
render();
