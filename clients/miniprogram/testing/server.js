'use strict';

// The real wxauth binary on a free loopback port, on its built-in WeChat mock (a code
// `name.anything` logs in the user `name`), with its data in a temp dir. The port is
// read from the "listening address=..." line on stderr; stderr is kept, so that a test
// can read the access log (one line per request, with its route and status).

const { spawn, execFile } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const REPO = path.resolve(__dirname, '..', '..', '..');
const BIN = process.env.WXAUTH_BIN || path.join(REPO, 'target', 'debug', 'wxauth');

function binary() {
  if (!fs.existsSync(BIN)) {
    throw new Error(
      `wxauth binary not found at ${BIN}: run \`cargo build\` at the repository root first, ` +
        'or point WXAUTH_BIN at a built binary'
    );
  }
  return BIN;
}

/** Polls `check` until it returns a truthy value, or fails after `ms`. */
async function waitFor(what, ms, check) {
  const until = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > until) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

// The server's own environment only: no RUST_LOG or WXAUTH_* from the caller.
function serverEnv() {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (k !== 'RUST_LOG' && !k.startsWith('WXAUTH_')) env[k] = v;
  }
  return env;
}

/**
 * @param {object} [options]
 * @param {string} [options.accessTtl] jwt.access_ttl (default "5m")
 * @param {string} [options.reuseGrace] jwt.reuse_grace; "0s" (the default here) makes any
 *   reuse of a rotated-out refresh token revoke the login at once, so a client that reuses
 *   one cannot go unnoticed
 * @param {boolean|{embedderOrigin?: string}} [options.webLogin] turns web_login on
 *   (with that embedder origin)
 */
async function startServer(options = {}) {
  const bin = binary();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wxauth-npm-'));
  const config = path.join(dir, 'config.toml');
  fs.writeFileSync(
    config,
    [
      '[server]',
      'bind = "127.0.0.1:0"',
      'workers = 2',
      '[wechat]',
      'mock = true',
      '[jwt]',
      `access_ttl = "${options.accessTtl || '5m'}"`,
      `reuse_grace = "${options.reuseGrace || '0s'}"`,
      '[limits]',
      'login_per_minute = 0',
      '[metrics]',
      'bind = ""',
      ...(options.webLogin ? ['[web_login]', 'enabled = true', ...(options.webLogin.embedderOrigin ? [`embedder_origin = "${options.webLogin.embedderOrigin}"`] : [])] : []),
      '[log]',
      'level = "info"',
      'format = "text"',
      '[storage]',
      `path = ${JSON.stringify(path.join(dir, 'data'))}`,
      '',
    ].join('\n')
  );

  const child = spawn(bin, ['--config', config, 'serve'], {
    cwd: dir,
    env: serverEnv(),
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  let exited = null;
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    stderr += chunk;
  });
  child.on('exit', (code, signal) => {
    exited = { code, signal };
  });

  let address;
  try {
    address = await waitFor('the server to listen', 20000, () => {
      if (exited) throw new Error(`wxauth exited during start-up (${JSON.stringify(exited)}):\n${stderr}`);
      const match = /listening address=(\S+)/.exec(stderr);
      return match && match[1];
    });
  } catch (err) {
    child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
    throw err;
  }

  function admin(...args) {
    return new Promise((resolve, reject) => {
      execFile(bin, ['--config', config, ...args], { cwd: dir, env: serverEnv() }, (err, stdout, errout) => {
        if (err) reject(new Error(`wxauth ${args.join(' ')} failed: ${err.message}\n${errout}`));
        else resolve(stdout);
      });
    });
  }

  const probes = [];

  /** The access log so far: [{ method, route, status }], one per request answered. */
  function accessLog() {
    const lines = [];
    const re = /wxauth::access: request .*?method=(\S+) route="([^"]*)" status=(\d+)/;
    for (const line of stderr.split('\n')) {
      const m = re.exec(line);
      if (m) lines.push({ method: m[1], route: m[2], status: Number(m[3]) });
    }
    return lines;
  }

  return {
    base: `http://${address}`,
    dir,
    accessLog,
    /** How many access-log lines name this route (optionally: with this status). */
    countRoute(route, status) {
      return accessLog().filter((l) => l.route === route && (status === undefined || l.status === status)).length;
    },
    /** The test's own requests (probe), for the cross-check with the access log. */
    probes,
    /** A JSON POST from the test itself, not the client; recorded in `probes`. */
    async probe(route, body) {
      const res = await fetch(`http://${address}${route}`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
      const answer = { status: res.status, body: await res.json() };
      probes.push({ route, status: res.status });
      return answer;
    },
    /**
     * The access log once it has at least `n` lines. A response can reach the client a
     * moment before its access line reaches stderr, hence the wait.
     */
    async loggedRequests(n) {
      await waitFor(`${n} access-log lines`, 10000, () => accessLog().length >= n);
      return accessLog();
    },
    revokeUser(id) {
      return admin('tokens', 'revoke', '--user', String(id));
    },
    disableUser(id) {
      return admin('users', 'disable', String(id));
    },
    async stop() {
      if (!exited) {
        child.kill('SIGTERM');
        await waitFor('the server to exit', 30000, () => exited);
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Waits until the server itself refuses this access token as expired. */
function waitForExpiry(server, access) {
  return waitFor('the access token to expire', 15000, async () => {
    const res = await server.probe('/api/token/verify/', { token: access });
    return res.status === 401;
  });
}

module.exports = { startServer, waitFor, waitForExpiry };
