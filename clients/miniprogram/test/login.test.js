'use strict';

// The first login, what is stored, and the errors the client rejects with: all against
// the real wxauth binary on its built-in WeChat mock.

const test = require('node:test');
const assert = require('node:assert/strict');

const { createClient, WxAuthError } = require('..');
const { createFakeWx } = require('../testing/fake-wx');
const { startServer } = require('../testing/server');
const { PATHS, SESSION_KEY, assertServerSaw } = require('../testing/check');

test('first login: tokens stored in one entry, the user shown with the bearer token, a relaunch logs in no more', async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const fake = createFakeWx({ user: 'alice' });
  const auth = createClient({ baseUrl: server.base, wx: fake });

  const me = await auth.login();
  assert.equal(typeof me.id, 'number');
  assert.equal(me.created, true);
  const stored = fake.getStorageSync(SESSION_KEY);
  assert.equal(typeof stored.access, 'string');
  assert.equal(typeof stored.refresh, 'string');
  assert.deepEqual(fake.requests[0].body, { code: 'alice.1' });

  const user = await auth.user();
  assert.equal(user.id, me.id);
  assert.equal(typeof user.openid, 'string');
  assert.ok(user.openid.length > 0);
  assert.equal(fake.requests[1].authorization, `Bearer ${stored.access}`);

  // The app is closed and opened again: the stored session is used, no new login.
  const relaunched = createClient({ baseUrl: server.base, wx: fake });
  assert.equal((await relaunched.user()).id, me.id);
  assert.equal(fake.logins, 1);
  assert.equal(fake.count(PATHS.login), 1);
  assert.equal(fake.count(PATHS.data, 200), 2);

  const seen = await assertServerSaw(server, fake);
  assert.equal(seen[`${PATHS.login} 200`], 1);
});

test('concurrent first calls share one wx.login and one login request', async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const fake = createFakeWx({ user: 'bob' });
  const auth = createClient({ baseUrl: server.base, wx: fake });

  const users = await Promise.all(Array.from({ length: 5 }, () => auth.user()));
  assert.equal(new Set(users.map((u) => u.id)).size, 1);
  assert.equal(fake.logins, 1);
  assert.equal(fake.count(PATHS.login), 1);
  assert.equal(fake.count(PATHS.data, 200), 5);
  await assertServerSaw(server, fake);
});

test('the appid option is sent with the login code', async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const fake = createFakeWx({ user: 'carol' });
  const auth = createClient({ baseUrl: server.base, wx: fake, appid: 'wxnotconfigured' });

  // The mock serves one app, so an appid it does not know is the contract's 400.
  const err = await auth.login().then(
    () => assert.fail('login with an unknown appid succeeded'),
    (e) => e
  );
  assert.deepEqual(fake.requests[0].body, { code: 'carol.1', appid: 'wxnotconfigured' });
  assert.equal(err.status, 400);
  assert.equal(err.code, 'unknown_app');
});

test('errors reject with the contract code, detail and HTTP status', async (t) => {
  const server = await startServer();
  t.after(() => server.stop());

  // A code the server refuses: WxAuthError 401 code_invalid, nothing stored, no retry.
  const badCode = createFakeWx({ code: () => 'no-dot-so-invalid' });
  const refused = await createClient({ baseUrl: server.base, wx: badCode })
    .user()
    .then(() => assert.fail('resolved'), (e) => e);
  assert.ok(refused instanceof WxAuthError);
  assert.ok(refused instanceof Error);
  assert.equal(refused.status, 401);
  assert.equal(refused.code, 'code_invalid');
  assert.equal(typeof refused.detail, 'string');
  assert.ok(refused.detail.length > 0);
  assert.equal(badCode.getStorageSync(SESSION_KEY), '');
  assert.equal(badCode.logins, 1);
  assert.equal(badCode.count(PATHS.login), 1);
  assert.equal(badCode.count(PATHS.data), 0);
  await assertServerSaw(server, badCode);

  // wx.login itself fails (the user denied, no network): status 0, nothing sent.
  const noLogin = createFakeWx();
  noLogin.login = (opts) => setImmediate(() => opts.fail({ errMsg: 'login:fail auth deny' }));
  const denied = await createClient({ baseUrl: server.base, wx: noLogin })
    .login()
    .then(() => assert.fail('resolved'), (e) => e);
  assert.equal(denied.status, 0);
  assert.equal(denied.code, 'wx_login_failed');
  assert.match(denied.detail, /auth deny/);
  assert.equal(noLogin.requests.length, 0);

  // A path the server does not know: its JSON 404 comes through as it is.
  const fake = createFakeWx();
  const auth = createClient({ baseUrl: server.base, wx: fake });
  const missing = await auth.request({ url: '/api/no/such/path/' }).then(() => assert.fail('resolved'), (e) => e);
  assert.equal(missing.status, 404);
  assert.equal(missing.code, 'not_found');
  assert.equal(fake.requests.length, 2); // login, then the one request: a 404 is not retried

  // No answer at all: status 0 network_error.
  await server.stop();
  const offline = await auth.user().then(() => assert.fail('resolved'), (e) => e);
  assert.equal(offline.status, 0);
  assert.equal(offline.code, 'network_error');
});

test('phone(code) posts the code with the bearer token and returns the number', async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const fake = createFakeWx({ user: 'dave' });
  const auth = createClient({ baseUrl: server.base, wx: fake });
  await auth.login();
  const access = fake.getStorageSync(SESSION_KEY).access;

  const info = await auth.phone('dave.phone');
  const sent = fake.requests.find((r) => r.path === PATHS.phone);
  assert.equal(sent.method, 'POST');
  assert.equal(sent.authorization, `Bearer ${access}`);
  assert.deepEqual(sent.body, { code: 'dave.phone' });
  assert.equal(fake.count(PATHS.phone), 1);
  // The built-in mock's number for a code `name.x`: 138 and eight digits.
  assert.match(info.pure_phone_number, /^138\d{8}$/);
  assert.equal(info.country_code, '86');
  assert.match(info.phone_number, /138\d{8}$/);
});
