'use strict';

// wxauth-miniprogram: log in to a wxauth server from a WeChat mini-program, keep the
// tokens in local storage, and refresh them without the classic mistakes (two refreshes
// racing, a rotated refresh token not stored, retrying forever).
//
// Written in plain ES2015 with promise chains (no async/await, no Promise#finally):
// DevTools' "build npm" copies this file as it is, and old base libraries run it.

const DEFAULT_PREFIX = 'wxauth.';
const DEFAULT_REFRESH_AHEAD_SECONDS = 30;

// An error answered by the server carries the contract's `code` and `detail` and the
// HTTP `status`; an error before any answer (network, wx.login) has status 0.
class WxAuthError extends Error {
  constructor(status, code, detail, data) {
    super(detail ? code + ': ' + detail : code);
    this.name = 'WxAuthError';
    this.status = status;
    this.code = code;
    this.detail = detail || '';
    this.data = data;
  }
}

function errorFromResponse(res) {
  const data = res.data;
  const body = data && typeof data === 'object' ? data : {};
  const code = typeof body.code === 'string' ? body.code : 'http_' + res.statusCode;
  const detail = typeof body.detail === 'string' ? body.detail : '';
  return new WxAuthError(res.statusCode, code, detail, data);
}

function loggedOutError() {
  return new WxAuthError(0, 'logged_out', 'logout() was called while this was in progress.');
}

// A refused refresh token (expired, blacklisted, revoked, reused, unknown user) means
// the session is over: log in again. Anything else (network, 5xx, 429) is not a verdict
// on the token, so the session is kept.
function isRefusal(err) {
  return err instanceof WxAuthError && (err.status === 401 || err.status === 400);
}

function isTransient(err) {
  return err instanceof WxAuthError && (err.status === 0 || err.status === 429 || err.status >= 500);
}

const BASE64URL = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';

// Decodes base64url to a binary string (one char per byte): enough to read a JWT's
// numeric claims, and needs neither atob nor Buffer, which mini-programs lack.
function base64UrlToBinary(text) {
  let out = '';
  let bits = 0;
  let value = 0;
  for (let i = 0; i < text.length; i++) {
    const digit = BASE64URL.indexOf(text.charAt(i));
    if (digit < 0) throw new Error('not base64url');
    value = (value << 6) | digit;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += String.fromCharCode((value >> bits) & 0xff);
    }
  }
  return out;
}

// The access token's lifetime in seconds (exp - iat), or null. The refresh answer has
// no `access_expires_in`; a difference of two server times is immune to a device whose
// clock is wrong, unlike `exp` itself.
function tokenLifetimeSeconds(jwt) {
  try {
    const claims = JSON.parse(base64UrlToBinary(String(jwt).split('.')[1] || ''));
    if (typeof claims.exp === 'number' && typeof claims.iat === 'number' && claims.exp > claims.iat) {
      return claims.exp - claims.iat;
    }
  } catch (e) {
    // Not a JWT we can read: rely on the server's 401 alone.
  }
  return null;
}

function isSession(value) {
  return (
    value !== null &&
    typeof value === 'object' &&
    typeof value.access === 'string' &&
    typeof value.refresh === 'string'
  );
}

function createClient(options) {
  const opts = options || {};
  if (typeof opts.baseUrl !== 'string' || opts.baseUrl === '') {
    throw new TypeError('wxauth-miniprogram: createClient needs { baseUrl }');
  }
  const baseUrl = opts.baseUrl.replace(/\/+$/, '');
  const storageKey = (typeof opts.storageKeyPrefix === 'string' ? opts.storageKeyPrefix : DEFAULT_PREFIX) + 'session';
  const appid = opts.appid;
  const refreshAheadMs =
    1000 * (typeof opts.refreshAheadSeconds === 'number' ? opts.refreshAheadSeconds : DEFAULT_REFRESH_AHEAD_SECONDS);

  // The session in memory; storage is its copy for the next launch. undefined: not read yet.
  let session;
  // Bumped by logout(): a login or refresh that started before it must not store its tokens.
  let epoch = 0;
  // Single flights: one wx.login + login call, and one renewal (refresh, or login after a
  // refused refresh), however many callers wait for them.
  let loginFlight = null;
  let renewalFlight = null;

  function wxApi() {
    if (opts.wx) return opts.wx;
    if (typeof wx !== 'undefined') return wx; // eslint-disable-line no-undef
    throw new TypeError('wxauth-miniprogram: no `wx` object (pass createClient({ wx }) outside a mini-program)');
  }

  function resolveUrl(url) {
    if (/^https?:\/\//i.test(url)) return url;
    return baseUrl + (url.charAt(0) === '/' ? url : '/' + url);
  }

  // wx.request as a promise that resolves with every HTTP answer, whatever its status,
  // and rejects only when there was no answer.
  function call(requestOptions) {
    return new Promise(function (resolve, reject) {
      const withCallbacks = Object.assign({}, requestOptions, {
        success: resolve,
        fail: function (res) {
          reject(new WxAuthError(0, 'network_error', (res && res.errMsg) || 'request:fail'));
        },
      });
      delete withCallbacks.complete;
      wxApi().request(withCallbacks);
    });
  }

  function post(path, data) {
    return call({
      url: resolveUrl(path),
      method: 'POST',
      data: data,
      header: { 'Content-Type': 'application/json' },
    });
  }

  function wxLoginCode() {
    return new Promise(function (resolve, reject) {
      wxApi().login({
        success: function (res) {
          if (res && typeof res.code === 'string' && res.code !== '') resolve(res.code);
          else reject(new WxAuthError(0, 'wx_login_failed', 'wx.login gave no code.'));
        },
        fail: function (res) {
          reject(new WxAuthError(0, 'wx_login_failed', (res && res.errMsg) || 'login:fail'));
        },
      });
    });
  }

  function loadSession() {
    if (session === undefined) {
      let stored;
      try {
        stored = wxApi().getStorageSync(storageKey);
      } catch (e) {
        stored = null;
      }
      session = isSession(stored) ? stored : null;
    }
    return session;
  }

  // One setStorageSync of the whole session: access and refresh tokens are never stored
  // half-updated. A storage failure (full) leaves the session in memory for this run.
  function saveSession(next) {
    session = next;
    try {
      wxApi().setStorageSync(storageKey, next);
    } catch (e) {
      // Keep going on the in-memory copy; the next launch will log in again.
    }
    return next;
  }

  function clearSession() {
    session = null;
    try {
      wxApi().setStorageSync(storageKey, '');
    } catch (e) {
      // Nothing more to do: the in-memory copy is gone.
    }
  }

  function newSession(access, refresh, expiresInSeconds, user) {
    const now = Date.now();
    const lifetime = typeof expiresInSeconds === 'number' ? expiresInSeconds : tokenLifetimeSeconds(access);
    // JWT times are whole seconds and `iat` is rounded down: the token may end up to a
    // second sooner than `lifetime` counted from now says, so count one second less.
    return {
      access: access,
      refresh: refresh,
      accessReceivedAt: now,
      accessExpiresAt: typeof lifetime === 'number' ? now + Math.max(0, lifetime - 1) * 1000 : null,
      user: user || null,
    };
  }

  // Nearly spent: less than refreshAheadSeconds, or a fifth of the token's lifetime,
  // is left (the smaller, so that a short-lived token is not refreshed on every call).
  function nearlySpent(s) {
    if (typeof s.accessExpiresAt !== 'number') return false;
    const lifetime = s.accessExpiresAt - (s.accessReceivedAt || s.accessExpiresAt);
    const margin = Math.min(refreshAheadMs, lifetime / 5);
    return Date.now() >= s.accessExpiresAt - margin;
  }

  function expired(s) {
    return typeof s.accessExpiresAt === 'number' && Date.now() >= s.accessExpiresAt;
  }

  function loginOnce() {
    if (loginFlight) return loginFlight;
    const started = epoch;
    const flight = wxLoginCode()
      .then(function (code) {
        const body = { code: code };
        if (appid) body.appid = appid;
        return post('/api/weixin/login/', body);
      })
      .then(function (res) {
        if (res.statusCode !== 200) throw errorFromResponse(res);
        const data = res.data || {};
        if (typeof data.access !== 'string' || typeof data.refresh !== 'string') {
          throw new WxAuthError(res.statusCode, 'bad_response', 'The login answer has no tokens.', data);
        }
        if (started !== epoch) throw loggedOutError();
        return saveSession(newSession(data.access, data.refresh, data.access_expires_in, data.user));
      });
    loginFlight = flight.then(
      function (s) {
        loginFlight = null;
        return s;
      },
      function (err) {
        loginFlight = null;
        throw err;
      }
    );
    return loginFlight;
  }

  function refreshOnce(current) {
    const started = epoch;
    return post('/api/token/refresh/', { refresh: current.refresh }).then(function (res) {
      if (res.statusCode !== 200) throw errorFromResponse(res);
      const data = res.data || {};
      if (typeof data.access !== 'string') {
        throw new WxAuthError(res.statusCode, 'bad_response', 'The refresh answer has no access token.', data);
      }
      if (started !== epoch) throw loggedOutError();
      // Rotation: the old refresh token is now spent. Store the new one before anything
      // uses it (without rotation the server sends no refresh token: keep ours).
      const refresh = typeof data.refresh === 'string' ? data.refresh : current.refresh;
      return saveSession(newSession(data.access, refresh, data.access_expires_in, current.user));
    });
  }

  // A new access token, in one flight. `staleAccess` is the token the caller found
  // wanting: if the session has moved on since (another caller renewed it), the new
  // session is the answer and nothing is sent.
  function renew(staleAccess) {
    if (renewalFlight) return renewalFlight;
    const current = loadSession();
    if (current && staleAccess && current.access !== staleAccess) return Promise.resolve(current);
    const started = epoch;
    const flight = current
      ? refreshOnce(current).catch(function (err) {
          if (!isRefusal(err)) throw err;
          // Expired, revoked or reused: this refresh token is dead, start over.
          if (started === epoch) clearSession();
          return loginOnce();
        })
      : loginOnce();
    renewalFlight = flight.then(
      function (s) {
        renewalFlight = null;
        return s;
      },
      function (err) {
        renewalFlight = null;
        throw err;
      }
    );
    return renewalFlight;
  }

  // The session to send with: the one being renewed if a renewal is under way, a new
  // one if there is none or the access token is nearly spent.
  function usableSession() {
    if (renewalFlight) return renewalFlight;
    const current = loadSession();
    if (!current) return renew(null);
    if (!nearlySpent(current)) return Promise.resolve(current);
    return renew(current.access).catch(function (err) {
      // Could not refresh ahead for a passing reason: the token still works for now.
      if (isTransient(err) && !expired(current)) return current;
      throw err;
    });
  }

  function send(options, s) {
    const req = Object.assign({}, options, {
      url: resolveUrl(options.url),
      header: Object.assign({}, options.header, { Authorization: 'Bearer ' + s.access }),
    });
    delete req.success;
    delete req.fail;
    return call(req);
  }

  function settle(res) {
    if (res.statusCode >= 200 && res.statusCode < 300) return res;
    throw errorFromResponse(res);
  }

  // An authenticated wx.request. On a 401: one renewal (refresh, or wx.login if the
  // refresh is refused), then one retry; never more.
  function request(options) {
    if (!options || typeof options.url !== 'string') {
      return Promise.reject(new TypeError('wxauth-miniprogram: request needs { url }'));
    }
    return usableSession().then(function (s) {
      return send(options, s).then(function (res) {
        if (res.statusCode !== 401) return settle(res);
        return renew(s.access).then(function (renewed) {
          return send(options, renewed).then(settle);
        });
      });
    });
  }

  function login() {
    return loginOnce().then(function (s) {
      return s.user;
    });
  }

  function user() {
    return request({ url: '/api/weixin/data/', method: 'GET' }).then(function (res) {
      return res.data.user;
    });
  }

  function phone(code) {
    if (typeof code !== 'string' || code === '') {
      return Promise.reject(new TypeError('wxauth-miniprogram: phone needs the code from getPhoneNumber'));
    }
    return request({ url: '/api/weixin/phone/', method: 'POST', data: { code: code } }).then(function (res) {
      return res.data;
    });
  }

  // Web login (wxauth's "log in on this computer"): the page that a scanned code opens
  // gets the ticket as its `scene` (onLoad's options.scene, URL-encoded by WeChat).
  function webLogin(action, scene) {
    const ticket = typeof scene === 'string' ? decodeURIComponent(scene) : '';
    if (!/^[0-9a-f]{32}$/.test(ticket)) {
      return Promise.reject(new TypeError('wxauth-miniprogram: ' + action + 'WebLogin needs the scene of the code (32 hex characters)'));
    }
    return request({ url: '/api/weixin/web-login/' + ticket + '/' + action, method: 'POST', data: {} }).then(function (res) {
      return res.data;
    });
  }

  // Tells the browser the code was scanned (it shows "confirm on your phone").
  function scanWebLogin(scene) {
    return webLogin('scan', scene);
  }

  // Logs the browser in as this user: a new session of the user's own.
  function confirmWebLogin(scene) {
    return webLogin('confirm', scene);
  }

  // Refuses the browser's login.
  function denyWebLogin(scene) {
    return webLogin('deny', scene);
  }

  // Waits until no login or renewal is in flight, so that logout revokes the newest
  // refresh token rather than one a refresh is about to rotate out.
  function idle() {
    const pending = renewalFlight || loginFlight;
    if (!pending) return Promise.resolve();
    return pending.then(idle, idle);
  }

  // Revokes this login on the server (its whole token family) and forgets it here.
  // Storage is cleared whatever the server says; a 401 means the refresh token was
  // already dead, which is what logout wants.
  function logout() {
    return idle().then(function () {
      const current = loadSession();
      epoch += 1;
      clearSession();
      if (!current) return undefined;
      return post('/api/token/blacklist/', { refresh: current.refresh }).then(function (res) {
        if (res.statusCode === 200 || res.statusCode === 401) return undefined;
        throw errorFromResponse(res);
      });
    });
  }

  return {
    login: login,
    request: request,
    logout: logout,
    user: user,
    phone: phone,
    scanWebLogin: scanWebLogin,
    confirmWebLogin: confirmWebLogin,
    denyWebLogin: denyWebLogin,
  };
}

module.exports = { createClient: createClient, WxAuthError: WxAuthError };
