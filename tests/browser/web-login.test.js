'use strict';

// The web login page in a real browser: Debian's chromium, driven by playwright-core.
// An embedding site (a small node server on another loopback port: an origin of its
// own) frames wxauth's /web-login/; the page
// shows a code that decodes (jsQR) to a live ticket; the mini-program package, under
// node, scans and confirms it; the page then says "Logged in as user N" and posts the
// tokens to the embedder, and those tokens call /api/weixin/data/.
//
// Without chromium: a loud SKIPPED locally, a failure in CI (CI=true).

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const http = require('node:http');

const REPO = path.resolve(__dirname, '..', '..');
const { createClient } = require(path.join(REPO, 'clients', 'miniprogram'));
const { createFakeWx } = require(path.join(REPO, 'clients', 'miniprogram', 'testing', 'fake-wx'));
const { startServer } = require(path.join(REPO, 'clients', 'miniprogram', 'testing', 'server'));

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

function chromiumOrSkip(t) {
  if (fs.existsSync(CHROMIUM)) return true;
  const message = `chromium not found at ${CHROMIUM}: install Debian's chromium (.ci/run does)`;
  if (process.env.CI === 'true') throw new Error(message);
  console.error(`\n*** SKIPPED: the web login browser test: ${message} ***\n`);
  t.skip(message);
  return false;
}

function decodeQr(dataUrl) {
  const { PNG } = require('pngjs');
  const jsQR = require('jsqr');
  const match = /^data:image\/png;base64,(.+)$/.exec(dataUrl);
  assert.ok(match, `not a PNG data URL: ${dataUrl.slice(0, 40)}`);
  const png = PNG.sync.read(Buffer.from(match[1], 'base64'));
  const code = jsQR(new Uint8ClampedArray(png.data), png.width, png.height);
  assert.ok(code, 'the image holds no QR code');
  return code.data;
}

test('the page shows a code of the ticket; a confirm on the phone logs the browser in', async (t) => {
  if (!chromiumOrSkip(t)) return;
  const { chromium } = require('playwright-core');
  // The embedding site: frames the page and keeps what it posts to it.
  let server = null;
  const embedder = http.createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end(`<!doctype html><body style="margin:0">
<iframe src="${server.base}/web-login/" style="border:0;width:440px;height:520px"></iframe>
<script>
window.received = [];
window.addEventListener('message', (e) => {
  if (e.origin === ${JSON.stringify(server.base)}) window.received.push(e.data);
});
</script></body>`);
  });
  await new Promise((resolve) => embedder.listen(0, '127.0.0.1', resolve));
  t.after(() => embedder.close());
  const EMBEDDER = `http://127.0.0.1:${embedder.address().port}`;
  server = await startServer({ webLogin: { embedderOrigin: EMBEDDER } });
  t.after(() => server.stop());
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'wxauth-chromium-'));
  t.after(() => fs.rmSync(profile, { recursive: true, force: true }));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
    ],
    viewport: { width: 480, height: 560 },
  });
  t.after(() => context.close());
  const errors = [];
  context.on('weberror', (e) => errors.push(String(e.error())));

  const page = context.pages()[0] || (await context.newPage());
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(m.text());
  });
  await page.goto(`${EMBEDDER}/`);
  const frame = page.frameLocator('iframe');
  const img = frame.locator('#code');
  try {
    await img.waitFor({ state: 'visible', timeout: 20000 });
  } catch (e) {
    const inner = page.frames().map((f) => f.url());
    throw new Error(`${e.message}\nframes: ${inner}\nerrors: ${errors.join('\n')}\nlog: ${JSON.stringify(server.accessLog())}`);
  }
  await frame.getByText('Scan the code with WeChat to log in.').waitFor({ timeout: 20000 });

  const ticket = decodeQr(await img.getAttribute('src'));
  assert.match(ticket, /^[0-9a-f]{32}$/);
  const shot = process.env.WEB_LOGIN_SCREENSHOT || path.join(REPO, 'target', 'web-login.png');
  await page.locator('iframe').screenshot({ path: shot });

  // The phone: a logged-in mini-program opened on the scene.
  const phone = createClient({ baseUrl: server.base, wx: createFakeWx({ user: 'browser' }) });
  const me = await phone.login();
  await phone.scanWebLogin(ticket);
  await frame.getByText('Scanned: confirm on your phone.').waitFor({ timeout: 30000 });
  await phone.confirmWebLogin(ticket);
  await frame.getByText(`Logged in as user ${me.id}.`).waitFor({ timeout: 30000 });

  // The tokens the page posted to the embedder work.
  await page.waitForFunction(() => window.received.length > 0, null, { timeout: 10000 });
  const [tokens] = await page.evaluate(() => window.received);
  assert.equal(tokens.type, 'wxauth:web-login');
  assert.equal(tokens.user.id, me.id);
  const data = await fetch(`${server.base}/api/weixin/data/`, {
    headers: { Authorization: `Bearer ${tokens.access}` },
  });
  assert.equal(data.status, 200);
  assert.equal((await data.json()).user.id, me.id);
  assert.deepEqual(errors, [], 'no script or CSP errors in the page');
});
