'use strict';

// The end of a session against the real binary: a user revoked by the operator, a user
// disabled (the client must not loop), and logout.

const test = require('node:test');
const assert = require('node:assert/strict');

const { createClient, WxAuthError } = require('..');
const { createFakeWx } = require('../testing/fake-wx');
const { startServer, waitForExpiry } = require('../testing/server');
const { PATHS, SESSION_KEY, assertServerSaw } = require('../testing/check');

function steps(fake, from = 0) {
  return fake.requests.slice(from).map((r) => `${r.path} ${r.statusCode}`);
}

test('a revoked user: the refresh is refused, the client logs in again once and the request succeeds', async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const fake = createFakeWx({ user: 'ivan' });
  const auth = createClient({ baseUrl: server.base, wx: fake });
  const me = await auth.login();
  await auth.user();

  await server.revokeUser(me.id);
  const before = fake.requests.length;
  const user = await auth.user();
  assert.equal(user.id, me.id);
  assert.deepEqual(steps(fake, before), [
    `${PATHS.data} 401`, // the revoked access token
    `${PATHS.refresh} 401`, // the revoked refresh token: Token is blacklisted
    `${PATHS.login} 200`, // wx.login again, once
    `${PATHS.data} 200`, // the one retry
  ]);
  assert.equal(fake.requests[before + 1].response.detail, 'Token is blacklisted');
  assert.equal(fake.logins, 2);

  // Settled: the next request goes straight through.
  await auth.user();
  assert.deepEqual(steps(fake, before + 4), [`${PATHS.data} 200`]);
  const seen = await assertServerSaw(server, fake);
  assert.equal(seen[`${PATHS.login} 200`], 2);
  assert.equal(seen[`${PATHS.refresh} 401`], 1);
});

test('a disabled user: one refresh, one new login, then the error; no loop', async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const fake = createFakeWx({ user: 'judy' });
  const auth = createClient({ baseUrl: server.base, wx: fake });
  const me = await auth.login();

  await server.disableUser(me.id);
  const before = fake.requests.length;
  const err = await auth.user().then(() => assert.fail('resolved'), (e) => e);
  assert.ok(err instanceof WxAuthError);
  assert.equal(err.status, 403);
  assert.equal(err.code, 'user_disabled');
  assert.deepEqual(steps(fake, before), [
    `${PATHS.data} 401`, // user_inactive
    `${PATHS.refresh} 401`, // no_active_account
    `${PATHS.login} 403`, // user_disabled: given up
  ]);
  assert.equal(fake.getStorageSync(SESSION_KEY), '', 'the dead session is forgotten');

  // Asked again, it tries one login and gives up again.
  const again = await auth.user().then(() => assert.fail('resolved'), (e) => e);
  assert.equal(again.code, 'user_disabled');
  assert.deepEqual(steps(fake, before + 3), [`${PATHS.login} 403`]);
  assert.equal(fake.logins, 3);
  await assertServerSaw(server, fake);
});

test('logout revokes the login on the server and clears storage', async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const fake = createFakeWx({ user: 'ken' });
  const auth = createClient({ baseUrl: server.base, wx: fake });
  await auth.login();
  const { refresh } = fake.getStorageSync(SESSION_KEY);

  await auth.logout();
  const sent = fake.requests.filter((r) => r.path === PATHS.blacklist);
  assert.equal(sent.length, 1);
  assert.deepEqual(sent[0].body, { refresh });
  assert.equal(sent[0].statusCode, 200);
  assert.equal(fake.getStorageSync(SESSION_KEY), '');
  const after = await server.probe(PATHS.refresh, { refresh });
  assert.equal(after.status, 401);
  assert.equal(after.body.detail, 'Token is blacklisted');

  // Nothing left to revoke: no request.
  await auth.logout();
  assert.equal(fake.count(PATHS.blacklist), 1);

  // The next call starts a new login.
  await auth.user();
  assert.equal(fake.logins, 2);
  await assertServerSaw(server, fake);
});

test('logout during a refresh waits for it and revokes the newest refresh token', async (t) => {
  const server = await startServer({ accessTtl: '3s' });
  t.after(() => server.stop());
  const fake = createFakeWx({ user: 'lena' });
  const auth = createClient({ baseUrl: server.base, wx: fake });
  await auth.login();
  await waitForExpiry(server, fake.getStorageSync(SESSION_KEY).access);

  // user() starts a refresh; logout() is called before it is answered.
  const [user] = await Promise.all([auth.user(), auth.logout()]);
  assert.equal(typeof user.id, 'number');
  const refreshed = fake.requests.find((r) => r.path === PATHS.refresh);
  const revoked = fake.requests.find((r) => r.path === PATHS.blacklist);
  assert.equal(refreshed.statusCode, 200);
  assert.deepEqual(revoked.body, { refresh: refreshed.response.refresh });
  assert.equal(revoked.statusCode, 200);
  assert.equal(fake.getStorageSync(SESSION_KEY), '');
  const seen = await assertServerSaw(server, fake);
  assert.equal(seen[`${PATHS.refresh} 401`], undefined);
  assert.equal(seen[`${PATHS.blacklist} 200`], 1);
});
