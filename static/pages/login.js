// The login page: one password field. The server sets an HttpOnly session
// cookie; the token in the JSON answer is for scripts and is ignored here.

import { t } from '../i18n.js';
import { api } from '../api.js';
import { h, errorBox, showError } from '../ui.js';

export function render(root, ctx) {
  const password = h('input', { type: 'password', id: 'password', name: 'password', autocomplete: 'current-password',
    required: true, autofocus: true });
  const err = errorBox();
  err.id = 'login-error';
  const submit = h('button', { type: 'submit', class: 'btn primary wide', id: 'login-submit' }, t('login.submit'));

  const form = h('form', { class: 'login-form', id: 'login-form', novalidate: true },
    h('div', { class: 'field' }, h('label', { for: 'password' }, t('login.password')), password),
    err, submit);

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    if (!password.value) {
      showError(err, new Error(t('login.empty')));
      password.focus();
      return;
    }
    submit.disabled = true;
    showError(err, null);
    try {
      await api('POST', '/login', { password: password.value });
      const next = ctx.params.get('next');
      // Only ever go to one of our own routes.
      location.hash = next && /^[a-z]+(\?|$)/.test(next) && !next.startsWith('login') ? `#/${next}` : '#/dashboard';
    } catch (e2) {
      if (e2.status === 401) showError(err, new Error(t('login.wrong')));
      else if (e2.status === 429) showError(err, new Error(`${t('login.locked')} ${e2.message}`));
      else showError(err, e2);
      password.select();
      password.focus();
    } finally {
      submit.disabled = false;
    }
  });

  root.append(h('section', { class: 'login-card card', 'aria-labelledby': 'login-title' },
    h('div', { class: 'login-brand' }, h('img', { src: 'favicon.svg', alt: '', width: 40, height: 40 }),
      h('h1', { id: 'login-title' }, 'ccload')),
    h('p', { class: 'muted' }, t('login.subtitle')),
    form));
  password.focus();
}
