//! A mock of WeChat's `sns/jscode2session`, answering as WeChat does: HTTP 200,
//! `Content-Type: text/plain`, JSON with `errcode`/`errmsg` (errmsg with a varying
//! `rid` suffix), and single-use codes.
//!
//! The code chooses the behaviour: `<prefix>:<name>[.<anything>]`, user openid `o-<name>`
//! (WeChat-shaped: a name that is not 1–62 of `[A-Za-z0-9_-]` becomes a hash, see
//! [`openid_for`]).
//! - `ok:` success (a code works once; again → 40163)
//! - `union:<name>.<unionid>` success with a unionid
//! - `busyN:` -1 for the first N calls of the code, then success
//! - `slowMS:` sleeps MS milliseconds, then success
//! - `errN:` errcode N
//! - `http500:` HTTP 500 · `html:` an HTML page · `nosession:` errcode 0 without session_key
//! - `hold:` waits until [`MockWeChat::release_holds`] (at most 30 s), then success
//! - `redirect302:<name>` / `redirect307:<name>` a redirect to [`MockWeChat::redirect_to`]'s
//!   server, carrying the query (AppSecret included) with `js_code=ok:<name>`, which
//!   that server would accept
//! - `garbage:` an answer that is not HTTP (echoing the request target, as a hostile
//!   server could)
//! - `badopenid:nul|esc|rlo|long`, `badunionid:space`, `badkey:` errcode 0 with an openid
//!   holding NUL / ESC / U+202E or 10 KB long, a unionid with a space, a session_key
//!   that is not base64
//!
//! - `key:<name>.<session_key>` success with that session key (the decrypt demo vector)
//! - `typeerr:<value>` errcode as the JSON string `<value>` (a shape serde refuses,
//!   quoting the value in its error)
//!
//! Session keys are base64 of 16 bytes, as WeChat's are.
//!
//! The APIs that take the access token, in the same shapes:
//! - `POST /cgi-bin/stable_token`: a new token `tok-N` per fetch (`expires_in` from
//!   [`MockWeChat::set_token_expires_in`], default 7200); `force_refresh: true`
//!   invalidates every earlier token; [`MockWeChat::fail_stable_token`] answers an
//!   errcode instead; [`MockWeChat::set_token_delay`] makes each fetch slow.
//! - `POST /wxa/business/getuserphonenumber?access_token=`: 40001 for a token not
//!   (or no longer) valid (see [`MockWeChat::revoke_tokens`]); the code chooses:
//!   `ok:<name>` a number (countryCode a number, as in WeChat's example), `str:<name>`
//!   countryCode as a string, `busyN:` -1 for the first N calls, `errN:` errcode N,
//!   `hold:<name>` a number once [`MockWeChat::release_holds`] was called (at most 30 s).
//! - `POST /wxa/getwxacodeunlimit?access_token=`: the image's bytes on success
//!   (`Content-Type: image/jpeg`, as WeChat labels its codes: a JPEG signature, then
//!   `scene=<scene>;page=<page>;…` so a test can see what was asked); errors as JSON
//!   (`application/json`): 40001 for a token not valid, 40169 for a scene over 32
//!   characters, [`MockWeChat::fail_wxacode`]'s errcode while set.
//! - `GET /wxa/checksession`: 0 when the HMAC-SHA256 signature matches the session key
//!   last handed to that openid, else 87009.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
pub struct MockState {
    /// jscode2session calls per code.
    pub calls: HashMap<String, usize>,
    /// Codes already exchanged successfully.
    pub spent: Vec<String>,
    /// Every session key handed out (to check logs never show them).
    pub session_keys: Vec<String>,
    /// (appid, secret, grant_type) of each call.
    pub credentials: Vec<(String, String, String)>,
    /// Where `redirect…:` codes point (a base URL).
    pub redirect_to: Option<String>,
    /// Set by `release_holds`: `hold:` codes answer from then on.
    pub holds_released: bool,
    /// Every request the server received, on any path.
    pub requests: usize,
    /// stable_token fetches, and how many of them were forced.
    pub token_fetches: usize,
    pub forced_fetches: usize,
    /// Tokens handed out and still valid.
    pub valid_tokens: Vec<String>,
    pub tokens_issued: usize,
    /// `expires_in` of the next tokens (0: the default, 7200).
    pub token_expires_in: i64,
    /// stable_token answers this errcode while set.
    pub stable_token_errcode: Option<i64>,
    /// Each stable_token fetch first sleeps this long.
    pub token_delay_ms: u64,
    /// getuserphonenumber calls per code, and every (code, openid) body seen.
    pub phone_calls: HashMap<String, usize>,
    pub phone_bodies: Vec<(String, String)>,
    /// The session key last handed to each openid (for checksession).
    pub keys_by_openid: HashMap<String, String>,
    /// checksession calls.
    pub checksession_calls: usize,
    /// getwxacodeunlimit answers this errcode while set; its request bodies.
    pub wxacode_errcode: Option<i64>,
    pub wxacode_bodies: Vec<serde_json::Value>,
}

pub struct MockWeChat {
    stopped: Arc<AtomicBool>,
    pub state: Arc<Mutex<MockState>>,
    /// Wakes `hold:` calls when the holds are released.
    holds: Arc<Condvar>,
    port: u16,
}

impl MockWeChat {
    /// A plain HTTP/1.1 server: a thread per connection, keep-alive, GET only.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("mock bind");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(MockState::default()));
        let stopped = Arc::new(AtomicBool::new(false));
        let holds = Arc::new(Condvar::new());
        let (st, stop, hd) = (state.clone(), stopped.clone(), holds.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (st, hd) = (st.clone(), hd.clone());
                std::thread::spawn(move || serve_connection(stream, &st, &hd));
            }
        });
        MockWeChat {
            stopped,
            state,
            holds,
            port,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request received, whatever its path or code.
    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }

    /// `redirect…:` codes answer with a Location on this base URL.
    pub fn redirect_to(&self, base_url: &str) {
        self.state.lock().unwrap().redirect_to = Some(base_url.to_string());
    }

    /// Lets every `hold:` call (waiting or to come) answer.
    pub fn release_holds(&self) {
        self.state.lock().unwrap().holds_released = true;
        self.holds.notify_all();
    }

    pub fn token_fetches(&self) -> (usize, usize) {
        let st = self.state.lock().unwrap();
        (st.token_fetches, st.forced_fetches)
    }

    pub fn set_token_expires_in(&self, secs: i64) {
        self.state.lock().unwrap().token_expires_in = secs;
    }

    pub fn set_token_delay(&self, ms: u64) {
        self.state.lock().unwrap().token_delay_ms = ms;
    }

    /// stable_token answers `errcode` from now on (`None`: normal again).
    pub fn fail_stable_token(&self, errcode: Option<i64>) {
        self.state.lock().unwrap().stable_token_errcode = errcode;
    }

    /// Every token handed out so far stops working (as if WeChat rotated it).
    pub fn revoke_tokens(&self) {
        self.state.lock().unwrap().valid_tokens.clear();
    }

    /// getwxacodeunlimit answers `errcode` from now on (`None`: images again).
    pub fn fail_wxacode(&self, errcode: Option<i64>) {
        self.state.lock().unwrap().wxacode_errcode = errcode;
    }

    /// The JSON bodies getwxacodeunlimit received.
    pub fn wxacode_bodies(&self) -> Vec<serde_json::Value> {
        self.state.lock().unwrap().wxacode_bodies.clone()
    }

    pub fn phone_calls(&self) -> usize {
        self.state.lock().unwrap().phone_calls.values().sum()
    }

    pub fn calls(&self, code: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .calls
            .get(code)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for MockWeChat {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wake the accept loop
    }
}

/// What the handler answers: status, content type, body.
type Answer = (u16, &'static str, String);

/// Answers with a shape `Answer` cannot hold; the status carries which one.
const STATUS_GARBAGE: u16 = 999;
/// A redirect: `Answer`'s content type slot is unused, the body is the Location.
const STATUS_REDIRECT_302: u16 = 302;
const STATUS_REDIRECT_307: u16 = 307;

fn serve_connection(stream: TcpStream, state: &Mutex<MockState>, holds: &Condvar) {
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // The headers: only Content-Length matters (the POST APIs have a body).
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.trim().eq_ignore_ascii_case("content-length") {
                    content_length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut request_body = vec![0u8; content_length.min(1 << 20)];
        if std::io::Read::read_exact(&mut reader, &mut request_body).is_err() {
            return;
        }
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        state.lock().unwrap().requests += 1;
        if target.starts_with("/wxa/getwxacodeunlimit") {
            let (content_type, body) = wxa_code(&target, &request_body, state);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            if writer
                .write_all(&[head.as_bytes(), &body].concat())
                .is_err()
            {
                return;
            }
            continue;
        }
        let (status, content_type, body) =
            match target.split_once('?').map_or(target.as_str(), |(p, _)| p) {
                "/cgi-bin/stable_token" => stable_token(&request_body, state),
                "/wxa/business/getuserphonenumber" => {
                    phone_number(&target, &request_body, state, holds)
                }
                "/wxa/checksession" => check_session(&target, state),
                _ => handle(&target, state, holds),
            };
        // One write: head and body in separate segments would meet Nagle + delayed ACK.
        let response = match status {
            STATUS_GARBAGE => body,
            STATUS_REDIRECT_302 | STATUS_REDIRECT_307 => format!(
                "HTTP/1.1 {status} Moved\r\nLocation: {body}\r\nContent-Length: 0\r\n\r\n"
            ),
            _ => format!(
                "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        };
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn reply(status: u16, content_type: &'static str, body: String) -> Answer {
    (status, content_type, body)
}

fn errcode(code: i64, msg: &str) -> String {
    // WeChat's errmsg carries a request id that changes every time.
    let rid = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    format!(r#"{{"errcode":{code},"errmsg":"{msg}, rid: {rid}"}}"#)
}

fn handle(url: &str, state: &Mutex<MockState>, holds: &Condvar) -> Answer {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    if path != "/sns/jscode2session" {
        return reply(404, "text/html", "<html>not found</html>".into());
    }
    let params: HashMap<String, String> = serde_urlencoded::from_str(query).unwrap_or_default();
    let code = params.get("js_code").cloned().unwrap_or_default();
    let calls = {
        let mut st = state.lock().unwrap();
        st.credentials.push((
            params.get("appid").cloned().unwrap_or_default(),
            params.get("secret").cloned().unwrap_or_default(),
            params.get("grant_type").cloned().unwrap_or_default(),
        ));
        let n = st.calls.entry(code.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let Some((prefix, rest)) = code.split_once(':') else {
        return reply(200, "text/plain", errcode(40029, "invalid code"));
    };
    let (name, extra) = rest.split_once('.').unwrap_or((rest, ""));
    let mut unionid = None;
    match prefix {
        "ok" | "key" => {}
        "union" => unionid = Some(extra.to_string()),
        "http500" => {
            return reply(
                500,
                "text/html",
                "<html>Internal Server Error</html>".into(),
            )
        }
        "html" => {
            return reply(
                200,
                "text/html",
                "<html><body>maintenance</body></html>".into(),
            )
        }
        "nosession" => {
            return reply(200, "text/plain", format!(r#"{{"openid":"o-{name}"}}"#));
        }
        p if p.starts_with("busy") => {
            let n: usize = p[4..].parse().unwrap_or(1);
            if calls <= n {
                return reply(200, "text/plain", errcode(-1, "system error"));
            }
        }
        p if p.starts_with("slow") => {
            let ms: u64 = p[4..].parse().unwrap_or(100);
            std::thread::sleep(Duration::from_millis(ms));
        }
        p if p.starts_with("err") => {
            let n: i64 = p[3..].parse().unwrap_or(-2);
            return reply(200, "text/plain", errcode(n, "error"));
        }
        "hold" => {
            let st = state.lock().unwrap();
            let _ = holds
                .wait_timeout_while(st, Duration::from_secs(30), |st| !st.holds_released)
                .unwrap();
        }
        "redirect302" | "redirect307" => {
            let target = state
                .lock()
                .unwrap()
                .redirect_to
                .clone()
                .unwrap_or_default();
            let mut params: Vec<(String, String)> =
                serde_urlencoded::from_str(query).unwrap_or_default();
            for (k, v) in &mut params {
                if k == "js_code" {
                    *v = format!("ok:{name}");
                }
            }
            let query = serde_urlencoded::to_string(&params).unwrap_or_default();
            let status = if prefix == "redirect302" { 302 } else { 307 };
            return reply(status, "", format!("{target}/sns/jscode2session?{query}"));
        }
        "typeerr" => {
            return reply(200, "text/plain", format!(r#"{{"errcode":"{rest}"}}"#));
        }
        "garbage" => {
            return reply(
                STATUS_GARBAGE,
                "",
                format!("NOT-HTTP {url} \u{1}\r\n\r\n{{\"openid\":\"o-x\"}}"),
            );
        }
        "badopenid" => {
            let openid = match name {
                "nul" => r"o-evil\u0000x".to_string(),
                "esc" => r"o-evil\u001b[31mx".to_string(),
                "rlo" => "o-evil\u{202e}x".to_string(),
                _ => "o".repeat(10 * 1024),
            };
            let key = base64_key(0);
            return reply(
                200,
                "text/plain",
                format!(r#"{{"openid":"{openid}","session_key":"{key}"}}"#),
            );
        }
        "badunionid" => {
            let key = base64_key(0);
            return reply(
                200,
                "text/plain",
                format!(r#"{{"openid":"o-{name}","session_key":"{key}","unionid":"u {name}"}}"#),
            );
        }
        "badkey" => {
            return reply(
                200,
                "text/plain",
                format!(r#"{{"openid":"o-{name}","session_key":"not base64!"}}"#),
            );
        }
        _ => return reply(200, "text/plain", errcode(40029, "invalid code")),
    }
    let session_key = {
        let mut st = state.lock().unwrap();
        if st.spent.contains(&code) {
            drop(st);
            return reply(200, "text/plain", errcode(40163, "code been used"));
        }
        st.spent.push(code.clone());
        let key = if prefix == "key" {
            extra.to_string()
        } else {
            base64_key(st.session_keys.len() as u128)
        };
        st.session_keys.push(key.clone());
        st.keys_by_openid.insert(openid_for(name), key.clone());
        key
    };
    let openid = openid_for(name);
    let body = match unionid {
        Some(u) => {
            format!(r#"{{"openid":"{openid}","session_key":"{session_key}","unionid":"{u}"}}"#)
        }
        None => format!(r#"{{"openid":"{openid}","session_key":"{session_key}"}}"#),
    };
    reply(200, "text/plain", body)
}

/// A session key as WeChat makes them: base64 of 16 bytes (here: the time and `salt`).
fn base64_key(salt: u128) -> String {
    use base64::Engine;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    base64::engine::general_purpose::STANDARD.encode((nanos ^ (salt << 100)).to_le_bytes())
}

/// The openid the mock gives the user `name`: `o-<name>` when that has WeChat's shape
/// (1–64 of `[A-Za-z0-9_-]`), else `o-h<hash of name>` (any code still logs in).
pub fn openid_for(name: &str) -> String {
    let shaped = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !name.is_empty() && name.len() <= 62 && name.chars().all(shaped) {
        return format!("o-{name}");
    }
    // FNV-1a: the same name, the same openid, on every run.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("o-h{hash:016x}")
}

fn query_param(target: &str, name: &str) -> String {
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let params: HashMap<String, String> = serde_urlencoded::from_str(query).unwrap_or_default();
    params.get(name).cloned().unwrap_or_default()
}

/// `cgi-bin/stable_token`: `{"access_token", "expires_in"}` or an errcode.
fn stable_token(body: &[u8], state: &Mutex<MockState>) -> Answer {
    let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let delay = state.lock().unwrap().token_delay_ms;
    if delay > 0 {
        std::thread::sleep(Duration::from_millis(delay));
    }
    let mut st = state.lock().unwrap();
    st.token_fetches += 1;
    let forced = request["force_refresh"].as_bool() == Some(true);
    if forced {
        st.forced_fetches += 1;
    }
    if request["grant_type"] != "client_credential"
        || request["appid"].as_str().is_none_or(str::is_empty)
        || request["secret"].as_str().is_none_or(str::is_empty)
    {
        return reply(200, "text/plain", errcode(40002, "invalid grant_type"));
    }
    if let Some(code) = st.stable_token_errcode {
        return reply(200, "text/plain", errcode(code, "error"));
    }
    if forced {
        st.valid_tokens.clear();
    }
    st.tokens_issued += 1;
    let token = format!(
        "tok-{}-{}",
        st.tokens_issued,
        base64_key(7).replace(['+', '/', '='], "x")
    );
    st.valid_tokens.push(token.clone());
    let expires_in = if st.token_expires_in > 0 {
        st.token_expires_in
    } else {
        7200
    };
    reply(
        200,
        "text/plain",
        format!(r#"{{"access_token":"{token}","expires_in":{expires_in}}}"#),
    )
}

/// `wxa/business/getuserphonenumber`.
fn phone_number(target: &str, body: &[u8], state: &Mutex<MockState>, holds: &Condvar) -> Answer {
    let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let code = request["code"].as_str().unwrap_or("").to_string();
    let openid = request["openid"].as_str().unwrap_or("").to_string();
    let token = query_param(target, "access_token");
    let calls = {
        let mut st = state.lock().unwrap();
        st.phone_bodies.push((code.clone(), openid));
        let n = st.phone_calls.entry(code.clone()).or_insert(0);
        *n += 1;
        let n = *n;
        if !st.valid_tokens.contains(&token) {
            return reply(
                200,
                "text/plain",
                errcode(
                    40001,
                    "invalid credential, access_token is invalid or not latest",
                ),
            );
        }
        n
    };
    let (prefix, name) = code.split_once(':').unwrap_or(("", ""));
    let ok = |country_code: &str| {
        let n = phone_for(name);
        let body = format!(
            r#"{{"errcode":0,"errmsg":"ok","phone_info":{{"phoneNumber":"{n}","purePhoneNumber":"{n}","countryCode":{country_code},"watermark":{{"timestamp":1637744274,"appid":"x"}}}}}}"#
        );
        reply(200, "text/plain", body)
    };
    match prefix {
        "ok" => ok("86"),
        "str" => ok("\"86\""),
        "hold" => {
            let st = state.lock().unwrap();
            let _ = holds
                .wait_timeout_while(st, Duration::from_secs(30), |st| !st.holds_released)
                .unwrap();
            ok("86")
        }
        p if p.starts_with("busy") => {
            let n: usize = p[4..].parse().unwrap_or(1);
            if calls <= n {
                reply(200, "text/plain", errcode(-1, "system error"))
            } else {
                ok("86")
            }
        }
        p if p.starts_with("err") => {
            let n: i64 = p[3..].parse().unwrap_or(-2);
            reply(200, "text/plain", errcode(n, "error"))
        }
        _ => reply(200, "text/plain", errcode(40029, "invalid code")),
    }
}

/// `wxa/getwxacodeunlimit`: an image's bytes, or JSON with an errcode.
fn wxa_code(target: &str, body: &[u8], state: &Mutex<MockState>) -> (&'static str, Vec<u8>) {
    let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let token = query_param(target, "access_token");
    let mut st = state.lock().unwrap();
    st.wxacode_bodies.push(request.clone());
    let json = |code: i64, msg: &str| {
        (
            "application/json; encoding=utf-8",
            errcode(code, msg).into_bytes(),
        )
    };
    if !st.valid_tokens.contains(&token) {
        return json(
            40001,
            "invalid credential, access_token is invalid or not latest",
        );
    }
    if let Some(code) = st.wxacode_errcode {
        return json(code, "error");
    }
    let scene = request["scene"].as_str().unwrap_or("");
    if scene.is_empty() || scene.len() > 32 {
        return json(
            40169,
            "invalid length for scene, or the data is not json string",
        );
    }
    let mut image = vec![0xff, 0xd8, 0xff, 0xe0];
    image.extend_from_slice(
        format!(
            "scene={scene};page={};env_version={};check_path={};width={}",
            request["page"].as_str().unwrap_or(""),
            request["env_version"].as_str().unwrap_or(""),
            request["check_path"],
            request["width"],
        )
        .as_bytes(),
    );
    image.extend_from_slice(&[0x80, 0xff, 0x00, 0xff, 0xd9]);
    ("image/jpeg", image)
}

/// The phone number the mock gives for the code `ok:<name>`.
pub fn phone_for(name: &str) -> String {
    let hash = name
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    format!("139{:08}", hash % 100_000_000)
}

/// `wxa/checksession`: is the signature made with the session key WeChat holds?
fn check_session(target: &str, state: &Mutex<MockState>) -> Answer {
    let token = query_param(target, "access_token");
    let openid = query_param(target, "openid");
    let signature = query_param(target, "signature");
    let mut st = state.lock().unwrap();
    st.checksession_calls += 1;
    if !st.valid_tokens.contains(&token) {
        return reply(200, "text/plain", errcode(40001, "invalid credential"));
    }
    if query_param(target, "sig_method") != "hmac_sha256" {
        return reply(200, "text/plain", errcode(87009, "invalid signature"));
    }
    let expected = st.keys_by_openid.get(&openid).map(|key| {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
        hex::encode(ring::hmac::sign(&key, b"").as_ref())
    });
    if expected.as_deref() == Some(signature.as_str()) {
        reply(200, "text/plain", errcode(0, "ok"))
    } else {
        reply(200, "text/plain", errcode(87009, "invalid signature"))
    }
}
