// wxauth-web: log a browser in as the WeChat user who scans a mini-program code and
// confirms on the phone (wxauth's web login; the rules are in docs/API.md, "Web
// login"). An ES module with no dependencies; wxauth's own page at /web-login/ uses it.

/** An answer of the server that ends the login, or a refusal of the flow itself. */
export class WebLoginError extends Error {
  constructor(code, detail, status) {
    super(detail ? code + ': ' + detail : code);
    this.name = 'WebLoginError';
    /** `denied`, `expired`, `cancelled`, or the server's error code. */
    this.code = code;
    this.detail = detail || '';
    /** The HTTP status (0 when the flow ended without an error answer). */
    this.status = status || 0;
  }
}

const API = '/api/weixin/web-login/';

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => {
      clearTimeout(timer);
      reject(new WebLoginError('cancelled', 'The web login was cancelled.'));
    }, { once: true });
  });
}

async function errorOf(response) {
  let body = {};
  try {
    body = await response.json();
  } catch (e) {
    // Not JSON: the status alone.
  }
  const code = typeof body.code === 'string' ? body.code : 'http_' + response.status;
  return new WebLoginError(code, typeof body.detail === 'string' ? body.detail : '', response.status);
}

function retryAfterMs(response) {
  const secs = Number(response.headers.get('Retry-After'));
  return Number.isFinite(secs) && secs > 0 ? Math.min(secs, 30) * 1000 : 1000;
}

/**
 * Starts a web login: asks for a ticket and its code, shows it through `onCode`, and
 * long-polls until the user confirms (resolves with the tokens), denies or lets the
 * code expire (rejects with a WebLoginError `denied` / `expired`).
 *
 * Cancel with `options.signal` (an AbortSignal) or the returned promise's `cancel()`:
 * it rejects with `cancelled` and sends nothing more.
 */
export function startWebLogin(options) {
  const opts = options || {};
  const base = String(opts.baseUrl || '').replace(/\/+$/, '');
  const fetchImpl = opts.fetch || globalThis.fetch.bind(globalThis);
  const wait = Math.max(0, Math.min(25, opts.wait === undefined ? 25 : opts.wait));
  const controller = new AbortController();
  if (opts.signal) {
    if (opts.signal.aborted) controller.abort();
    else opts.signal.addEventListener('abort', () => controller.abort(), { once: true });
  }
  const signal = controller.signal;
  const cancelled = () => new WebLoginError('cancelled', 'The web login was cancelled.');

  async function call(url, init) {
    if (signal.aborted) throw cancelled();
    try {
      return await fetchImpl(url, Object.assign({ signal, cache: 'no-store' }, init));
    } catch (e) {
      if (signal.aborted) throw cancelled();
      throw e;
    }
  }

  async function run() {
    const created = await call(base + API, { method: 'POST' });
    if (!created.ok) throw await errorOf(created);
    const ticket = await created.json();
    if (signal.aborted) throw cancelled();
    if (opts.onCode) {
      opts.onCode({ ticket: ticket.ticket, qr: ticket.qr, expiresIn: ticket.expires_in });
    }
    const pollUrl = base + API + encodeURIComponent(ticket.ticket) + '/?wait=' + wait;
    const headers = { Authorization: 'Bearer ' + ticket.poll_secret };
    // A little past the ticket's life: the server then says `expired` itself.
    const giveUpAt = Date.now() + (ticket.expires_in + 30) * 1000;
    let scanned = false;
    for (;;) {
      if (Date.now() > giveUpAt) throw new WebLoginError('expired', 'The code expired.');
      let response;
      try {
        response = await call(pollUrl, { headers });
      } catch (e) {
        if (e instanceof WebLoginError) throw e;
        await sleep(1000, signal); // the network: try again
        continue;
      }
      if (response.status === 503 || response.status === 429) {
        await sleep(retryAfterMs(response), signal);
        continue;
      }
      if (!response.ok) throw await errorOf(response);
      const body = await response.json();
      switch (body.status) {
        case 'pending':
          break;
        case 'scanned':
          if (!scanned) {
            scanned = true;
            if (opts.onScanned) opts.onScanned();
          }
          break;
        case 'confirmed':
          return {
            access: body.access,
            refresh: body.refresh,
            access_expires_in: body.access_expires_in,
            refresh_expires_in: body.refresh_expires_in,
            user: body.user,
          };
        case 'denied':
          throw new WebLoginError('denied', 'The login was refused on the phone.');
        default:
          throw new WebLoginError('expired', 'The code expired.');
      }
      if (wait === 0) await sleep(1000, signal);
    }
  }

  const promise = run();
  promise.cancel = () => controller.abort();
  return promise;
}
