'use strict';

// The example mini-program (examples/miniprogram/) run as DevTools would run it: its
// app.js and page under App(), Page() and getApp(), require('wxauth-miniprogram')
// giving this package, against the real binary through the fake wx.

const test = require('node:test');
const assert = require('node:assert/strict');
const Module = require('node:module');
const path = require('node:path');

const pkg = require('..');
const { createFakeWx } = require('../testing/fake-wx');
const { startServer } = require('../testing/server');
const { PATHS, SESSION_KEY, assertServerSaw } = require('../testing/check');

const EXAMPLE = path.resolve(__dirname, '..', '..', '..', 'examples', 'miniprogram');

// Loads the example with this package in place of the installed one; the client it
// creates talks to `baseUrl` through `wx` instead of the placeholder domain.
function loadExample(baseUrl, wx, pageName = 'index') {
  const stand = { ...pkg, createClient: (options) => pkg.createClient({ ...options, baseUrl, wx }) };
  const load = Module._load;
  let app;
  let pageDef;
  Module._load = function (request, ...rest) {
    return request === 'wxauth-miniprogram' ? stand : load.call(this, request, ...rest);
  };
  Object.assign(globalThis, {
    App: (def) => (app = def),
    getApp: () => app,
    Page: (def) => (pageDef = def),
  });
  try {
    for (const file of ['app.js', path.join('pages', pageName, 'index.js')]) {
      const full = path.join(EXAMPLE, file);
      delete require.cache[full];
      require(full);
    }
  } finally {
    Module._load = load;
    delete globalThis.App;
    delete globalThis.getApp;
    delete globalThis.Page;
  }
  const page = Object.create(pageDef);
  page.data = { ...pageDef.data };
  page.setData = (changes) => Object.assign(page.data, changes);
  return page;
}

test('the example page: signs in on load, calls the data endpoint, logs out, shows errors', async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  const fake = createFakeWx({ user: 'peggy' });
  const page = loadExample(server.base, fake);

  await page.onLoad();
  assert.equal(page.data.error, '');
  assert.equal(typeof page.data.user.id, 'number');
  assert.equal(fake.logins, 1);
  const id = page.data.user.id;

  await page.callData();
  assert.equal(page.data.error, '');
  assert.equal(page.data.user.id, id);
  assert.equal(fake.count(PATHS.data, 200), 2);

  await page.signOut();
  assert.equal(page.data.user, null);
  assert.equal(fake.count(PATHS.blacklist, 200), 1);
  assert.equal(fake.getStorageSync(SESSION_KEY), '');
  await assertServerSaw(server, fake);

  await server.stop();
  await page.callData();
  assert.match(page.data.error, /^0 network_error: request:fail/);
});

test('the web login page: scanned on load, then confirm or deny at a tap', async (t) => {
  const server = await startServer({ webLogin: true });
  t.after(() => server.stop());
  const ticket = async () => (await fetch(`${server.base}/api/weixin/web-login/`, { method: 'POST' })).json();
  const status = async (tk) =>
    (
      await (
        await fetch(`${server.base}/api/weixin/web-login/${tk.ticket}/`, {
          headers: { Authorization: `Bearer ${tk.poll_secret}` },
        })
      ).json()
    ).status;

  const first = await ticket();
  const page = loadExample(server.base, createFakeWx({ user: 'quinn' }), 'web-login');
  await page.onLoad({ scene: first.ticket });
  assert.equal(page.data.state, 'asking');
  assert.equal(await status(first), 'scanned');
  await page.confirm();
  assert.equal(page.data.state, 'confirmed');
  assert.equal(await status(first), 'confirmed');

  const second = await ticket();
  const other = loadExample(server.base, createFakeWx({ user: 'quinn' }), 'web-login');
  await other.onLoad({ scene: second.ticket });
  await other.deny();
  assert.equal(other.data.state, 'denied');
  assert.equal(await status(second), 'denied');
  await other.confirm();
  assert.equal(other.data.state, 'failed');
  assert.match(other.data.error, /^409 ticket_closed/);
});
