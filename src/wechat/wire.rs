//! WeChat's wire protocol: what the login workers and the access-token keeper share.

use super::errors::WeChatError;
use super::resolver;
use crate::config::WeChatConfig;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The longest JSON answer read from WeChat.
pub const MAX_REPLY_BYTES: u64 = 64 * 1024;
/// The pause before a retry, times the attempt's number.
pub const BUSY_BACKOFF: Duration = Duration::from_millis(100);

/// Errcodes that mean our own appid, secret or IP whitelist is wrong: the operator
/// must act. (An API that takes the access token reads 40001 as a refused token
/// first.)
pub const CONFIG_ERRCODES: &[i64] = &[
    40001, 40002, 40013, 40125, 40164, 41002, 41004, 48001, 61024,
];

/// An errcode every API shares; 0 is `None`, an errcode no API knows is `Unknown`.
pub fn common_error(errcode: i64) -> Option<WeChatError> {
    match errcode {
        0 => None,
        -1 => Some(WeChatError::Busy),
        45011 => Some(WeChatError::RateLimited),
        code if CONFIG_ERRCODES.contains(&code) => Some(WeChatError::Config(code)),
        code => Some(WeChatError::Unknown(code)),
    }
}

/// Where the calls go: WeChat over HTTP, or the built-in mock (`wechat.mock`).
pub enum Upstream {
    Http(Http),
    Mock,
}

impl Upstream {
    /// `pool`: how many idle connections to keep (ureq's default when `None`).
    pub fn new(cfg: &WeChatConfig, pool: Option<usize>) -> Self {
        if cfg.mock {
            return Upstream::Mock;
        }
        let mut config = resolver::wechat_config(cfg.timeout);
        if let Some(n) = pool {
            config = config
                .max_idle_connections(n)
                .max_idle_connections_per_host(n);
        }
        Upstream::Http(Http {
            agent: resolver::agent(config.build()),
            api_base: cfg.api_base.trim_end_matches('/').to_string(),
        })
    }
}

/// WeChat's API over a pooled ureq agent (rustls, no redirects).
pub struct Http {
    agent: ureq::Agent,
    api_base: String,
}

impl Http {
    /// The URL carries a secret (the AppSecret or the access token): it is built
    /// here and never logged.
    fn url(&self, path: &str, query: &str) -> String {
        if query.is_empty() {
            format!("{}{path}", self.api_base)
        } else {
            format!("{}{path}?{query}", self.api_base)
        }
    }

    /// A GET cut off after `time_left`; the body of a 200, at most `limit` bytes.
    pub fn get(
        &self,
        path: &str,
        query: &str,
        time_left: Duration,
        limit: u64,
    ) -> Result<Vec<u8>, WeChatError> {
        let response = self
            .agent
            .get(&self.url(path, query))
            .config()
            .timeout_global(Some(time_left))
            .build()
            .call();
        read_body(response, limit)
    }

    /// A POST of JSON cut off after `time_left`; the body of a 200, at most `limit` bytes.
    pub fn post(
        &self,
        path: &str,
        query: &str,
        body: &Value,
        time_left: Duration,
        limit: u64,
    ) -> Result<Vec<u8>, WeChatError> {
        let response = self
            .agent
            .post(&self.url(path, query))
            .config()
            .timeout_global(Some(time_left))
            .build()
            .header("Content-Type", "application/json")
            .send(body.to_string());
        read_body(response, limit)
    }
}

/// WeChat answers HTTP 200 with JSON, labelled text/plain or not: a JSON object.
pub fn json_object(body: &[u8]) -> Result<Value, WeChatError> {
    match serde_json::from_slice(body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        _ => Err(WeChatError::Malformed("not a JSON object".into())),
    }
}

/// Calls `call` with the time left before `deadline`, and again on a transient
/// failure (`transient`), at most `retries` more times, each after a longer pause,
/// and only while that pause leaves time before the deadline.
pub fn with_retries<T, E>(
    retries: u32,
    deadline: Instant,
    transient: impl Fn(&E) -> bool,
    mut call: impl FnMut(Duration) -> Result<T, E>,
) -> Result<T, E> {
    let mut attempt = 0;
    loop {
        match call(deadline.saturating_duration_since(Instant::now())) {
            Err(e)
                if transient(&e)
                    && attempt < retries
                    && Instant::now() + BUSY_BACKOFF * (attempt + 1) < deadline =>
            {
                attempt += 1;
                std::thread::sleep(BUSY_BACKOFF * attempt);
            }
            other => return other,
        }
    }
}

/// Percent-encodes a query value.
pub fn encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The mock's stable hash of a name (FNV-1a): the same name, the same user and
/// number, on every run.
pub fn mock_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub(crate) fn transport_error(e: ureq::Error) -> WeChatError {
    match e {
        ureq::Error::Timeout(_) => WeChatError::Timeout,
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
            WeChatError::Connect(e.to_string())
        }
        ureq::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            WeChatError::Connect(io.kind().to_string())
        }
        // Its text would contain the URL, and so the secret.
        ureq::Error::BadUri(_) => WeChatError::Malformed("bad URL: check wechat.api_base".into()),
        // Anything else may have happened after the request left: not retried. Only
        // the kind is kept: some ureq errors carry the URL (the secret) or header values.
        other => WeChatError::Malformed(format!("transport error: {}", error_kind(&other))),
    }
}

/// What was wrong with a JSON answer, without serde's text: that quotes the
/// offending value, which WeChat (or whoever answers in its place) chose.
pub(crate) fn json_error_kind(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "JSON of the wrong shape",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    format!("{kind} (line {}, column {})", e.line(), e.column())
}

/// A ureq error's kind, without its text (which may hold the URL or what WeChat sent).
pub(crate) fn error_kind(e: &ureq::Error) -> String {
    let kind = match e {
        ureq::Error::Io(io) => return format!("I/O ({})", io.kind()),
        ureq::Error::Protocol(_) => "HTTP protocol",
        ureq::Error::Http(_) => "HTTP request",
        ureq::Error::BadUri(_) => "bad URL",
        ureq::Error::Timeout(_) => "timeout",
        ureq::Error::HostNotFound => "host not found",
        ureq::Error::ConnectionFailed => "connection failed",
        ureq::Error::TooManyRedirects | ureq::Error::RedirectFailed => "redirect",
        ureq::Error::LargeResponseHeader(..) => "response header too large",
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_) => "TLS",
        ureq::Error::Decompress(..) => "decompression",
        _ => "other",
    };
    kind.to_string()
}

/// A 200 answer's body, at most `limit` bytes.
fn read_body(
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    limit: u64,
) -> Result<Vec<u8>, WeChatError> {
    let mut response = response.map_err(transport_error)?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(WeChatError::Http(status));
    }
    response
        .body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::Timeout(_) => WeChatError::Timeout,
            other => WeChatError::Malformed(format!("reading the body: {}", error_kind(&other))),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_is_never_started_when_its_backoff_would_end_past_the_deadline() {
        let mut calls = 0;
        let deadline = Instant::now() + BUSY_BACKOFF / 2;
        let result: Result<(), WeChatError> =
            with_retries(5, deadline, WeChatError::is_transient, |_| {
                calls += 1;
                Err(WeChatError::Busy)
            });
        assert!(matches!(result, Err(WeChatError::Busy)));
        assert_eq!(calls, 1, "no time for a backoff: no retry");

        let mut calls = 0;
        let far = Instant::now() + Duration::from_secs(3600);
        let _: Result<(), WeChatError> = with_retries(2, far, WeChatError::is_transient, |_| {
            calls += 1;
            Err(WeChatError::Busy)
        });
        assert_eq!(calls, 3, "time enough: the call and its 2 retries");

        let mut calls = 0;
        let _: Result<(), WeChatError> = with_retries(2, far, WeChatError::is_transient, |_| {
            calls += 1;
            Err(WeChatError::CodeUsed)
        });
        assert_eq!(calls, 1, "what may have spent the code is never retried");
    }

    #[test]
    fn every_api_reads_the_shared_errcodes_alike() {
        assert!(common_error(0).is_none());
        assert!(matches!(common_error(-1), Some(WeChatError::Busy)));
        assert!(matches!(
            common_error(45011),
            Some(WeChatError::RateLimited)
        ));
        for code in CONFIG_ERRCODES {
            assert!(matches!(common_error(*code), Some(WeChatError::Config(c)) if c == *code));
        }
        assert!(matches!(
            common_error(99999),
            Some(WeChatError::Unknown(99999))
        ));
    }
}
