'use strict';

const assert = require('node:assert/strict');

const PATHS = {
  login: '/api/weixin/login/',
  data: '/api/weixin/data/',
  refresh: '/api/token/refresh/',
  blacklist: '/api/token/blacklist/',
  phone: '/api/weixin/phone/',
};

const SESSION_KEY = 'wxauth.session';

function tally(entries) {
  const counts = {};
  for (const { route, status } of entries) {
    const key = `${route} ${status}`;
    counts[key] = (counts[key] || 0) + 1;
  }
  return counts;
}

/**
 * Cross-checks the client's side with the server's: the requests the fake `wx` sent
 * (plus the test's own probes), per path and status, are exactly the requests in the
 * server's access log. Returns the access log's counts ("route status" -> n).
 */
async function assertServerSaw(server, fake) {
  const sent = fake.requests.map((r) => ({ route: r.path, status: r.statusCode }));
  const logged = await server.loggedRequests(sent.length + server.probes.length);
  const seen = tally(logged);
  assert.deepEqual(seen, tally(sent.concat(server.probes)), 'the server logged exactly the requests sent');
  return seen;
}

module.exports = { PATHS, SESSION_KEY, assertServerSaw };
