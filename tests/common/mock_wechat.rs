//! A mock of WeChat's `sns/jscode2session`, answering as WeChat does: HTTP 200,
//! `Content-Type: text/plain`, JSON with `errcode`/`errmsg` (errmsg with a varying
//! `rid` suffix), and single-use codes.
//!
//! The code chooses the behaviour: `<prefix>:<name>[.<anything>]`, user openid `o-<name>`.
//! - `ok:` success (a code works once; again → 40163)
//! - `union:<name>.<unionid>` success with a unionid
//! - `busyN:` -1 for the first N calls of the code, then success
//! - `slowMS:` sleeps MS milliseconds, then success
//! - `errN:` errcode N
//! - `http500:` HTTP 500 · `html:` an HTML page · `nosession:` errcode 0 without session_key

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
}

pub struct MockWeChat {
    stopped: Arc<AtomicBool>,
    pub state: Arc<Mutex<MockState>>,
    port: u16,
}

impl MockWeChat {
    /// A plain HTTP/1.1 server: a thread per connection, keep-alive, GET only.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("mock bind");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(MockState::default()));
        let stopped = Arc::new(AtomicBool::new(false));
        let (st, stop) = (state.clone(), stopped.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let st = st.clone();
                std::thread::spawn(move || serve_connection(stream, &st));
            }
        });
        MockWeChat {
            stopped,
            state,
            port,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
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

fn serve_connection(stream: TcpStream, state: &Mutex<MockState>) {
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // Skip the headers (a GET has no body).
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        let (status, content_type, body) = handle(&target, state);
        // One write: head and body in separate segments would meet Nagle + delayed ACK.
        let response = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
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

fn handle(url: &str, state: &Mutex<MockState>) -> Answer {
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
        "ok" => {}
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
        _ => return reply(200, "text/plain", errcode(40029, "invalid code")),
    }
    let session_key = {
        let mut st = state.lock().unwrap();
        if st.spent.contains(&code) {
            drop(st);
            return reply(200, "text/plain", errcode(40163, "code been used"));
        }
        st.spent.push(code.clone());
        let key = format!(
            "sk{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        st.session_keys.push(key.clone());
        key
    };
    let body = match unionid {
        Some(u) => {
            format!(r#"{{"openid":"o-{name}","session_key":"{session_key}","unionid":"{u}"}}"#)
        }
        None => format!(r#"{{"openid":"o-{name}","session_key":"{session_key}"}}"#),
    };
    reply(200, "text/plain", body)
}
