'use strict';

// Refresh against the real binary: one refresh however many requests wait, the rotated
// refresh token stored and never reused, refresh ahead of expiry. The servers here run
// with jwt.reuse_grace = "0s": a rotated-out refresh token presented again revokes the
// login at once, so a client that reused one would be sent back to wx.login.

const test = require('node:test');
const assert = require('node:assert/strict');

const { createClient } = require('..');
const { createFakeWx } = require('../testing/fake-wx');
const { startServer, waitFor, waitForExpiry } = require('../testing/server');
const { PATHS, SESSION_KEY, assertServerSaw } = require('../testing/check');

const CONCURRENT = 20;

function twenty(auth) {
  return Promise.all(Array.from({ length: CONCURRENT }, () => auth.user()));
}

test('20 concurrent requests after the access token expired: one refresh reaches the server, all 20 succeed', async (t) => {
  const server = await startServer({ accessTtl: '3s' });
  t.after(() => server.stop());
  const fake = createFakeWx({ user: 'erin' });
  const auth = createClient({ baseUrl: server.base, wx: fake });
  const me = await auth.login();
  await waitForExpiry(server, fake.getStorageSync(SESSION_KEY).access);

  const users = await twenty(auth);
  assert.equal(users.length, CONCURRENT);
  for (const user of users) assert.equal(user.id, me.id);

  // The client knew the token had expired: it refreshed before sending anything.
  assert.equal(fake.count(PATHS.refresh), 1);
  assert.equal(fake.count(PATHS.refresh, 200), 1);
  assert.equal(fake.count(PATHS.data), CONCURRENT);
  assert.equal(fake.count(PATHS.data, 200), CONCURRENT);
  assert.equal(fake.logins, 1);

  const seen = await assertServerSaw(server, fake);
  assert.equal(seen[`${PATHS.refresh} 200`], 1);
  assert.equal(seen[`${PATHS.refresh} 401`], undefined);
  t.diagnostic(`refresh calls the server saw: ${seen[`${PATHS.refresh} 200`]}`);
});

test('20 concurrent requests answered 401: one refresh reaches the server, each request retried once, all 20 succeed', async (t) => {
  const server = await startServer({ accessTtl: '3s' });
  t.after(() => server.stop());
  const fake = createFakeWx({ user: 'frank' });
  const me = await createClient({ baseUrl: server.base, wx: fake }).login();
  const stored = fake.getStorageSync(SESSION_KEY);
  await waitForExpiry(server, stored.access);

  // The client believes the token fresh (a device clock set back, say): only the server's
  // 401 tells it otherwise. A relaunch reads this session from storage.
  const now = Date.now();
  fake.setStorageSync(SESSION_KEY, { ...stored, accessReceivedAt: now, accessExpiresAt: now + 3600 * 1000 });
  const auth = createClient({ baseUrl: server.base, wx: fake });

  const users = await twenty(auth);
  for (const user of users) assert.equal(user.id, me.id);

  assert.equal(fake.count(PATHS.refresh), 1);
  assert.equal(fake.count(PATHS.refresh, 200), 1);
  assert.equal(fake.count(PATHS.data, 401), CONCURRENT);
  assert.equal(fake.count(PATHS.data, 200), CONCURRENT);
  assert.equal(fake.count(PATHS.data), 2 * CONCURRENT);
  assert.equal(fake.logins, 1);
  const renewed = fake.getStorageSync(SESSION_KEY);
  for (const r of fake.requests.filter((r) => r.path === PATHS.data && r.statusCode === 200)) {
    assert.equal(r.authorization, `Bearer ${renewed.access}`);
  }

  const seen = await assertServerSaw(server, fake);
  assert.equal(seen[`${PATHS.refresh} 200`], 1);
  assert.equal(seen[`${PATHS.data} 401`], CONCURRENT);
  assert.equal(seen[`${PATHS.data} 200`], CONCURRENT);
  t.diagnostic(`refresh calls the server saw: ${seen[`${PATHS.refresh} 200`]}`);
});

test('a 401 answered after the refresh is done: retried with the new token, no second refresh', async (t) => {
  const server = await startServer({ accessTtl: '3s' });
  t.after(() => server.stop());
  // The second request's 401 is held back until the first one's refresh has been
  // answered: it must not start a refresh of its own.
  let refusals = 0;
  const fake = createFakeWx({
    user: 'mallory',
    hold: (r) => {
      if (r.path !== PATHS.data || r.statusCode !== 401 || ++refusals !== 2) return undefined;
      return waitFor('the refresh to be answered', 10000, () =>
        fake.requests.some((x) => x.path === PATHS.refresh && x.delivered)
      );
    },
  });
  await createClient({ baseUrl: server.base, wx: fake }).login();
  const stored = fake.getStorageSync(SESSION_KEY);
  await waitForExpiry(server, stored.access);
  const now = Date.now();
  fake.setStorageSync(SESSION_KEY, { ...stored, accessReceivedAt: now, accessExpiresAt: now + 3600 * 1000 });
  const auth = createClient({ baseUrl: server.base, wx: fake });

  await Promise.all([auth.user(), auth.user()]);
  assert.equal(refusals, 2);
  assert.equal(fake.count(PATHS.refresh), 1);
  assert.equal(fake.count(PATHS.data, 401), 2);
  assert.equal(fake.count(PATHS.data, 200), 2);
  assert.equal(fake.logins, 1);
  await assertServerSaw(server, fake);
});

test('never more than one retry: a request still refused after the refresh rejects with the 401', async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  // Something in the way (a proxy, say) spoils the data requests' bearer token: the
  // server refuses every one of them, however fresh the token the client sent.
  const fake = createFakeWx({
    user: 'oscar',
    rewrite: (header, r) => {
      if (r.path === PATHS.data) header.authorization = 'Bearer spoiled';
    },
  });
  const auth = createClient({ baseUrl: server.base, wx: fake });
  await auth.login();

  const err = await auth.user().then(() => assert.fail('resolved'), (e) => e);
  assert.equal(err.status, 401);
  assert.equal(err.code, 'token_not_valid');
  assert.deepEqual(
    fake.requests.map((r) => `${r.path} ${r.statusCode}`),
    [`${PATHS.login} 200`, `${PATHS.data} 401`, `${PATHS.refresh} 200`, `${PATHS.data} 401`]
  );
  await assertServerSaw(server, fake);
});

test('refresh ahead: a nearly spent access token is refreshed before the request, no 401', async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const fake = createFakeWx({ user: 'grace' });
  await createClient({ baseUrl: server.base, wx: fake }).login();

  // 299 of its 300 seconds gone (as access_expires_in counted them): nearly spent.
  const now = Date.now();
  const stored = fake.getStorageSync(SESSION_KEY);
  fake.setStorageSync(SESSION_KEY, { ...stored, accessReceivedAt: now - 299 * 1000, accessExpiresAt: now + 1000 });
  const auth = createClient({ baseUrl: server.base, wx: fake });

  await auth.user();
  const paths = fake.requests.map((r) => `${r.path} ${r.statusCode}`);
  assert.deepEqual(paths, [`${PATHS.login} 200`, `${PATHS.refresh} 200`, `${PATHS.data} 200`]);
  const refreshed = fake.requests[1].response;
  assert.equal(fake.requests[2].authorization, `Bearer ${refreshed.access}`);
  // The refreshed token's lifetime comes from the token itself (exp - iat = 300 s), less
  // the second that whole-second JWT times can take off.
  const session = fake.getStorageSync(SESSION_KEY);
  assert.equal(session.accessExpiresAt - session.accessReceivedAt, 299 * 1000);

  // Fresh again: the next request goes straight out.
  await auth.user();
  assert.equal(fake.count(PATHS.refresh), 1);
  await assertServerSaw(server, fake);
});

test('after a rotation the client stores the new refresh token and never presents the old one', async (t) => {
  const server = await startServer({ accessTtl: '3s' });
  t.after(() => server.stop());
  const fake = createFakeWx({ user: 'heidi' });
  const auth = createClient({ baseUrl: server.base, wx: fake });
  await auth.login();
  const loginRefresh = fake.requests[0].response.refresh;

  const refreshes = () => fake.requests.filter((r) => r.path === PATHS.refresh);
  for (let round = 1; round <= 2; round++) {
    await waitForExpiry(server, fake.getStorageSync(SESSION_KEY).access);
    await auth.user();
    assert.equal(refreshes().length, round);
  }
  // A relaunch: the rotated token must have been stored, not only kept in memory.
  const relaunched = createClient({ baseUrl: server.base, wx: fake });
  await waitForExpiry(server, fake.getStorageSync(SESSION_KEY).access);
  await relaunched.user();

  const [first, second, third] = refreshes();
  assert.equal(refreshes().length, 3);
  assert.equal(first.body.refresh, loginRefresh);
  assert.equal(second.body.refresh, first.response.refresh);
  assert.equal(third.body.refresh, second.response.refresh);
  for (const r of refreshes()) assert.equal(r.statusCode, 200);
  assert.equal(new Set([loginRefresh, ...refreshes().map((r) => r.response.refresh)]).size, 4);
  assert.equal(fake.getStorageSync(SESSION_KEY).refresh, third.response.refresh);
  assert.equal(fake.logins, 1, 'no reuse was detected, so no new login was needed');
  const seen = await assertServerSaw(server, fake);
  assert.equal(seen[`${PATHS.refresh} 200`], 3);
  assert.equal(seen[`${PATHS.refresh} 401`], undefined);

  // The check above has teeth: this server refuses a rotated-out token at once.
  const reuse = await server.probe(PATHS.refresh, { refresh: loginRefresh });
  assert.equal(reuse.status, 401);
  assert.equal(reuse.body.detail, 'Token is blacklisted');
});
