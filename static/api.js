// The admin API, as the pages use it: same-origin fetches that carry the
// HttpOnly session cookie (this code never sees the session token), JSON in
// and out, and every failure turned into an ApiError with a readable message.

import { t } from './i18n.js';

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body; // the parsed error document, e.g. CSV import problems
  }
}

// AuthError means the session is gone; the app has already moved to the
// login page, so pages should not show it as an error.
export class AuthError extends ApiError {}

let onAuthLost = () => {};

export function setAuthLostHandler(fn) {
  onAuthLost = fn;
}

// The difference between the server's clock and ours, so countdowns to
// cooldown_until (a server time) are right even on a badly set laptop.
let clockSkew = 0;

export function serverNow() {
  return Date.now() + clockSkew;
}

function noteServerTime(resp) {
  const d = Date.parse(resp.headers.get('Date') || '');
  if (Number.isNaN(d)) return;
  const skew = d - Date.now();
  // Date has whole seconds: ignore the rounding, keep real skew.
  clockSkew = Math.abs(skew) > 2000 ? skew : 0;
}

// api sends one request. body may be a plain object (sent as JSON) or
// FormData. With raw, a successful Response is returned unread.
export async function api(method, path, body, { raw = false, signal } = {}) {
  const opts = { method, headers: { Accept: 'application/json' }, credentials: 'same-origin', signal };
  if (body instanceof FormData) {
    opts.body = body;
  } else if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, opts);
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(0, t('err.network'));
  }
  noteServerTime(resp);
  if (resp.status === 401 && path !== '/login') {
    onAuthLost();
    throw new AuthError(401, t('err.session'));
  }
  if (raw && resp.ok) return resp;
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    // Not JSON (a proxy's error page, say): the text itself is the message.
  }
  if (!resp.ok) {
    const msg = (data && typeof data.error === 'string' && data.error) ||
      text.trim().slice(0, 300) || `HTTP ${resp.status}`;
    throw new ApiError(resp.status, msg, data);
  }
  return data;
}

export const get = (path, opts) => api('GET', path, undefined, opts);

// query builds "path?a=1&b=2", leaving out empty values.
export function query(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}
