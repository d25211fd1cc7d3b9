// startWebLogin under node (its fetch), against the real binary, with the
// mini-program package confirming or denying on the "phone".

import test from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { startWebLogin, WebLoginError } from '../index.js';

const require = createRequire(import.meta.url);
const { createClient } = require('../../miniprogram');
const { createFakeWx } = require('../../miniprogram/testing/fake-wx');
const { startServer } = require('../../miniprogram/testing/server');

function phoneOf(server, user) {
  return createClient({ baseUrl: server.base, wx: createFakeWx({ user }) });
}

test('the code, "scanned", then the tokens of the user who confirmed', async (t) => {
  const server = await startServer({ webLogin: true });
  t.after(() => server.stop());
  const phone = phoneOf(server, 'yuki');
  const me = await phone.login();
  const events = [];
  let ticket = null;
  let confirmed = null;
  const tokens = await startWebLogin({
    baseUrl: server.base + '/',
    onCode(code) {
      events.push('code');
      assert.match(code.ticket, /^[0-9a-f]{32}$/);
      assert.match(code.qr, /^data:image\/png;base64,/);
      assert.equal(code.expiresIn, 120);
      ticket = code.ticket;
      phone.scanWebLogin(ticket);
    },
    onScanned() {
      events.push('scanned');
      confirmed = phone.confirmWebLogin(ticket);
    },
  });
  assert.deepEqual(await confirmed, { status: 'confirmed' });
  assert.deepEqual(events, ['code', 'scanned']);
  assert.equal(tokens.user.id, me.id);
  const data = await fetch(`${server.base}/api/weixin/data/`, {
    headers: { Authorization: `Bearer ${tokens.access}` },
  });
  assert.equal(data.status, 200);
  assert.equal((await data.json()).user.id, me.id);
});

test('a deny rejects with "denied"; cancel rejects with "cancelled" and stops polling', async (t) => {
  const server = await startServer({ webLogin: true });
  t.after(() => server.stop());
  const phone = phoneOf(server, 'zoe');
  const denied = await startWebLogin({
    baseUrl: server.base,
    onCode(code) {
      phone.denyWebLogin(code.ticket);
    },
  }).then(() => assert.fail('resolved'), (e) => e);
  assert.ok(denied instanceof WebLoginError);
  assert.equal(denied.code, 'denied');

  let polls = 0;
  const login = startWebLogin({
    baseUrl: server.base,
    onCode() {
      setImmediate(() => login.cancel());
    },
    fetch: (url, init) => {
      if (url.includes('wait=')) polls += 1;
      return fetch(url, init);
    },
  });
  const cancelled = await login.then(() => assert.fail('resolved'), (e) => e);
  assert.equal(cancelled.code, 'cancelled');
  // The one poll in flight was aborted; none followed it.
  assert.ok(polls <= 1, `${polls} polls`);

  const controller = new AbortController();
  controller.abort();
  const early = await startWebLogin({ baseUrl: server.base, signal: controller.signal }).catch((e) => e);
  assert.equal(early.code, 'cancelled');
});

test('a server error is a WebLoginError with its code', async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const err = await startWebLogin({ baseUrl: server.base }).catch((e) => e);
  assert.ok(err instanceof WebLoginError);
  assert.equal(err.status, 404);
  assert.equal(err.code, 'not_found');
});
