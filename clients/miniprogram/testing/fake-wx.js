'use strict';

// A stand-in for the mini-program's `wx`: login, request (over node's http),
// getStorageSync and setStorageSync, with WeChat's callback shapes (success / fail /
// complete, res.statusCode, res.data, errMsg). Every request is recorded, so that a test
// can count what reached the server per path, and see the headers and bodies it carried.

const http = require('node:http');

function later(fn, arg) {
  if (typeof fn === 'function') setImmediate(fn, arg);
}

function finish(options, ok, res) {
  later(ok ? options.success : options.fail, res);
  later(options.complete, res);
}

function toQuery(data) {
  return new URLSearchParams(
    Object.keys(data).map((k) => [k, typeof data[k] === 'string' ? data[k] : JSON.stringify(data[k])])
  ).toString();
}

/**
 * @param {object} [options]
 * @param {string} [options.user] mock user name: wx.login gives codes `user.1`, `user.2`, ...
 * @param {() => string} [options.code] overrides the codes wx.login gives
 * @param {Map<string,string>} [options.storage] shared storage (a relaunched app keeps it)
 * @param {(record: object) => (Promise<void>|undefined)} [options.hold] called when an
 *   answer has arrived, before the client sees it: a promise holds the answer back
 * @param {(header: object, record: object) => void} [options.rewrite] may change a
 *   request's headers before it is sent (a proxy in the way)
 */
function createFakeWx(options = {}) {
  const storage = options.storage || new Map();
  const requests = [];
  let logins = 0;

  const fake = {
    storage,
    /** Every request sent: { method, path, authorization, body, statusCode, response }. */
    requests,
    get logins() {
      return logins;
    },
    /** How many requests reached this path (optionally: answered with this status). */
    count(path, statusCode) {
      return requests.filter((r) => r.path === path && (statusCode === undefined || r.statusCode === statusCode))
        .length;
    },

    login(opts) {
      logins += 1;
      const code = options.code ? options.code() : `${options.user || 'alice'}.${logins}`;
      finish(opts, true, { code, errMsg: 'login:ok' });
    },

    getStorageSync(key) {
      // WeChat answers '' for a key never set; values come back as copies.
      return storage.has(key) ? JSON.parse(storage.get(key)) : '';
    },

    setStorageSync(key, data) {
      if (data === undefined) throw new Error('setStorageSync:fail parameter error');
      storage.set(key, JSON.stringify(data));
    },

    request(opts) {
      const method = (opts.method || 'GET').toUpperCase();
      const url = new URL(opts.url);
      const headers = {};
      for (const [k, v] of Object.entries(opts.header || {})) headers[k.toLowerCase()] = String(v);
      let body = null;
      if (opts.data !== undefined && opts.data !== null) {
        if (method === 'GET') {
          const query = typeof opts.data === 'string' ? opts.data : toQuery(opts.data);
          url.search = url.search ? `${url.search}&${query}` : `?${query}`;
        } else if (typeof opts.data === 'string') {
          body = opts.data;
        } else if ((headers['content-type'] || '').includes('application/x-www-form-urlencoded')) {
          body = toQuery(opts.data);
        } else {
          headers['content-type'] = headers['content-type'] || 'application/json';
          body = JSON.stringify(opts.data);
        }
      }
      const record = {
        method,
        path: url.pathname,
        authorization: headers.authorization,
        body: opts.data,
        statusCode: undefined,
        response: undefined,
        delivered: false,
      };
      requests.push(record);
      if (options.rewrite) options.rewrite(headers, record);

      let done = false;
      const fail = (errMsg) => {
        if (done) return;
        done = true;
        finish(opts, false, { errMsg });
      };
      const req = http.request(url, { method, headers }, (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('error', (e) => fail(`request:fail ${e.message}`));
        res.on('end', () => {
          if (done) return;
          done = true;
          const text = Buffer.concat(chunks).toString('utf8');
          let data = text;
          if ((opts.dataType || 'json') === 'json') {
            try {
              data = JSON.parse(text);
            } catch {
              // WeChat hands over the raw string when the body is not JSON.
            }
          }
          record.statusCode = res.statusCode;
          record.response = data;
          const answer = {
            statusCode: res.statusCode,
            header: res.headers,
            data,
            cookies: [],
            errMsg: 'request:ok',
          };
          Promise.resolve(options.hold && options.hold(record)).then(() =>
            setImmediate(() => {
              record.delivered = true;
              finish(opts, true, answer);
            })
          );
        });
      });
      req.setTimeout(opts.timeout || 60000, () => {
        req.destroy();
        fail('request:fail timeout');
      });
      req.on('error', (e) => fail(`request:fail ${e.message}`));
      if (body !== null) req.write(body);
      req.end();
      return {
        abort() {
          req.destroy();
          fail('request:fail abort');
        },
      };
    },
  };
  return fake;
}

module.exports = { createFakeWx };
