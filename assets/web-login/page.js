// wxauth's web login page: shows the mini-program code and the status, and hands the
// tokens to the embedding site (postMessage to web_login.embedder_origin). See
// docs/API.md, "Web login".
import { startWebLogin } from '/web-login/wxauth-web.js';

const img = document.getElementById('code');
const status = document.getElementById('status');
const again = document.getElementById('again');
const embedder = document.querySelector('meta[name="wxauth-embedder-origin"]').content;

function show(text, state) {
  status.textContent = text;
  document.body.className = state || '';
}

async function whoAmI(access) {
  const response = await fetch('/api/weixin/data/', {
    headers: { Authorization: 'Bearer ' + access },
    cache: 'no-store',
  });
  if (!response.ok) throw new Error('GET /api/weixin/data/ answered ' + response.status);
  return (await response.json()).user;
}

async function run() {
  again.hidden = true;
  show('Preparing a code…');
  try {
    const tokens = await startWebLogin({
      baseUrl: '',
      onCode(code) {
        img.src = code.qr;
        img.hidden = false;
        show('Scan the code with WeChat to log in.');
      },
      onScanned() {
        show('Scanned: confirm on your phone.', 'scanned');
      },
    });
    const user = await whoAmI(tokens.access);
    show('Logged in as user ' + user.id + '.', 'done');
    const target = window.opener || (window.parent !== window ? window.parent : null);
    if (embedder && target) {
      target.postMessage(Object.assign({ type: 'wxauth:web-login' }, tokens), embedder);
    }
  } catch (e) {
    const text = {
      denied: 'The login was refused on the phone.',
      expired: 'The code expired.',
    }[e && e.code] || 'The login failed: ' + (e && e.message ? e.message : e);
    show(text, 'failed');
    img.hidden = true;
    again.hidden = false;
  }
}

again.addEventListener('click', run);
run();
