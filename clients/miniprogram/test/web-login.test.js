'use strict';

// Web login from the mini-program's side, against the real binary: the browser's
// ticket (asked for here with fetch, as the page does), then scanWebLogin,
// confirmWebLogin and denyWebLogin with the client's session.

const test = require('node:test');
const assert = require('node:assert/strict');

const { createClient, WxAuthError } = require('..');
const { createFakeWx } = require('../testing/fake-wx');
const { startServer } = require('../testing/server');

async function newTicket(server) {
  const res = await fetch(`${server.base}/api/weixin/web-login/`, { method: 'POST' });
  assert.equal(res.status, 200);
  return res.json();
}

async function poll(server, ticket) {
  const res = await fetch(`${server.base}/api/weixin/web-login/${ticket.ticket}/?wait=0`, {
    headers: { Authorization: `Bearer ${ticket.poll_secret}` },
  });
  assert.equal(res.status, 200);
  return res.json();
}

test('scan then confirm: the browser gets tokens of the same user', async (t) => {
  const server = await startServer({ webLogin: true });
  t.after(() => server.stop());
  const auth = createClient({ baseUrl: server.base, wx: createFakeWx({ user: 'wendy' }) });
  const me = await auth.login();
  const ticket = await newTicket(server);
  assert.match(ticket.qr, /^data:image\/png;base64,/);

  // WeChat hands the page its scene URL-encoded; hex needs no encoding, but it is decoded.
  assert.deepEqual(await auth.scanWebLogin(encodeURIComponent(ticket.ticket)), { status: 'scanned' });
  assert.equal((await poll(server, ticket)).status, 'scanned');
  assert.deepEqual(await auth.confirmWebLogin(ticket.ticket), { status: 'confirmed' });
  const answer = await poll(server, ticket);
  assert.equal(answer.status, 'confirmed');
  assert.equal(answer.user.id, me.id);
  const data = await fetch(`${server.base}/api/weixin/data/`, {
    headers: { Authorization: `Bearer ${answer.access}` },
  });
  assert.equal((await data.json()).user.id, me.id);

  const again = await auth.confirmWebLogin(ticket.ticket).then(() => assert.fail('resolved'), (e) => e);
  assert.ok(again instanceof WxAuthError);
  assert.equal(again.status, 409);
  assert.equal(again.code, 'ticket_closed');
});

test('deny: the browser hears "denied"; a bad scene is refused before any request', async (t) => {
  const server = await startServer({ webLogin: true });
  t.after(() => server.stop());
  const fake = createFakeWx({ user: 'xena' });
  const auth = createClient({ baseUrl: server.base, wx: fake });
  const ticket = await newTicket(server);
  assert.deepEqual(await auth.denyWebLogin(ticket.ticket), { status: 'denied' });
  assert.equal((await poll(server, ticket)).status, 'denied');

  const sent = fake.requests.length;
  await assert.rejects(auth.confirmWebLogin('not-a-ticket'), TypeError);
  assert.equal(fake.requests.length, sent);
  const gone = await auth.confirmWebLogin('0123456789abcdef0123456789abcdef').then(() => assert.fail('resolved'), (e) => e);
  assert.equal(gone.status, 410);
  assert.equal(gone.code, 'ticket_expired');
});
