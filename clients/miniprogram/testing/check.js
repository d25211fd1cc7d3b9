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
 * Cross-checks the client's side with the server's: the requests the fake `wx` sent,
 * per path and status, are exactly the requests in the server's access log.
 * Returns the server's counts ("route status" -> n).
 */
async function assertServerSaw(server, fake) {
  const sent = fake.requests.map((r) => ({ route: r.path, status: r.statusCode }));
  const logged = await server.clientRequests(sent.length);
  const seen = tally(logged);
  assert.deepEqual(seen, tally(sent), 'the server logged exactly the requests the client sent');
  return seen;
}

module.exports = { PATHS, SESSION_KEY, assertServerSaw };
