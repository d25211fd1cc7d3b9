//! The WeChat client: `sns/jscode2session` over a pooled ureq agent (rustls).
//!
//! [`WeChatClient`] is an async actor that keeps the in-flight calls: a second
//! submission of a code already being exchanged (a double tap) waits for the same
//! answer instead of spending the code twice. The blocking HTTP call itself runs on
//! [`WeChatWorker`]s, a `SyncArbiter` pool, never on an async worker thread.

use crate::config::{WeChatApp, WeChatConfig};
use crate::metrics::Metrics;
use crate::secret::{Secret, SessionKey};
use actix::prelude::*;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What WeChat tells us about a code.
#[derive(Debug, Clone)]
pub struct Session {
    pub openid: String,
    pub unionid: Option<String>,
    pub session_key: SessionKey,
}

/// Every way a code exchange can fail; `error.rs` maps each to the contract's row.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WeChatError {
    #[error("The login code is invalid.")]
    CodeInvalid,
    #[error("The login code has already been used.")]
    CodeUsed,
    #[error("WeChat flagged this user as high-risk.")]
    UserBlocked,
    #[error("WeChat's frequency limit was reached; try again later.")]
    RateLimited,
    #[error("WeChat rejected this server's appid or secret (errcode {0}).")]
    Config(i64),
    #[error("WeChat is busy; try again shortly.")]
    Busy,
    #[error("WeChat did not answer in time.")]
    Timeout,
    #[error("WeChat answered with HTTP status {0}.")]
    Http(u16),
    #[error("WeChat's answer could not be understood.")]
    Malformed(String),
    #[error("WeChat answered with an unknown error (errcode {0}).")]
    Unknown(i64),
    #[error("WeChat could not be reached.")]
    Connect(String),
    #[error("The WeChat client is unavailable.")]
    Unavailable,
}

/// Exchange a `wx.login()` code for a session. `appid` must be a configured app.
#[derive(Message, Clone)]
#[rtype(result = "Result<Session, WeChatError>")]
pub struct Code2Session {
    pub appid: String,
    pub code: String,
}

type Waiter = oneshot::Sender<Result<Session, WeChatError>>;

pub struct WeChatClient {
    workers: Addr<WeChatWorker>,
    in_flight: HashMap<(String, String), Vec<Waiter>>,
}

impl Actor for WeChatClient {
    type Context = Context<Self>;
}

impl Handler<Code2Session> for WeChatClient {
    type Result = ResponseFuture<Result<Session, WeChatError>>;

    fn handle(&mut self, msg: Code2Session, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let key = (msg.appid.clone(), msg.code.clone());
        if let Some(waiters) = self.in_flight.get_mut(&key) {
            waiters.push(tx);
        } else {
            self.in_flight.insert(key.clone(), vec![tx]);
            let call = self.workers.send(msg);
            ctx.spawn(call.into_actor(self).map(move |result, this, _| {
                let result = result.unwrap_or(Err(WeChatError::Unavailable));
                for waiter in this.in_flight.remove(&key).unwrap_or_default() {
                    let _ = waiter.send(result.clone());
                }
            }));
        }
        Box::pin(async move { rx.await.unwrap_or(Err(WeChatError::Unavailable)) })
    }
}

/// Where codes are exchanged: WeChat over HTTP, or the built-in mock.
enum Upstream {
    Http(HttpUpstream),
    Mock,
}

struct HttpUpstream {
    agent: ureq::Agent,
    api_base: String,
    secrets: HashMap<String, Secret>,
    retries: u32,
}

pub struct WeChatWorker {
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
}

impl Actor for WeChatWorker {
    type Context = SyncContext<Self>;
}

impl Handler<Code2Session> for WeChatWorker {
    type Result = Result<Session, WeChatError>;

    fn handle(&mut self, msg: Code2Session, _: &mut SyncContext<Self>) -> Self::Result {
        match self.upstream.as_ref() {
            Upstream::Mock => {
                let started = Instant::now();
                let result = mock_exchange(&msg.code);
                self.metrics
                    .observe_wechat(outcome_label(&result), started.elapsed());
                result
            }
            Upstream::Http(http) => http.exchange(&msg.appid, &msg.code, &self.metrics),
        }
    }
}

/// Starts the worker pool (`threads` blocking calls at once) and the coalescing client.
pub fn start(
    cfg: &WeChatConfig,
    apps: &[WeChatApp],
    threads: usize,
    metrics: Arc<Metrics>,
) -> Addr<WeChatClient> {
    let upstream = Arc::new(if cfg.mock {
        Upstream::Mock
    } else {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.timeout))
            .http_status_as_error(false)
            // One pooled connection per worker thread (the total defaults to 10).
            .max_idle_connections(threads)
            .max_idle_connections_per_host(threads)
            .user_agent(concat!("wxauth/", env!("CARGO_PKG_VERSION")))
            .build();
        Upstream::Http(HttpUpstream {
            agent: ureq::Agent::new_with_config(config),
            api_base: cfg.api_base.trim_end_matches('/').to_string(),
            secrets: apps
                .iter()
                .map(|a| (a.appid.clone(), a.secret.clone()))
                .collect(),
            retries: cfg.retries,
        })
    });
    let workers = SyncArbiter::start(threads, move || WeChatWorker {
        upstream: upstream.clone(),
        metrics: metrics.clone(),
    });
    WeChatClient {
        workers,
        in_flight: HashMap::new(),
    }
    .start()
}

/// The built-in mock: `name.anything` logs in the user `name`; anything else is 40029.
fn mock_exchange(code: &str) -> Result<Session, WeChatError> {
    match code.split_once('.') {
        Some((name, _)) if !name.is_empty() => Ok(Session {
            openid: format!("mock-openid-{name}"),
            unionid: None,
            session_key: SessionKey::new(crate::random_hex(12)),
        }),
        _ => Err(WeChatError::CodeInvalid),
    }
}

/// jscode2session's answer. `errmsg` is deliberately absent: it carries a varying
/// suffix (the request id) and must never be matched on.
#[derive(Deserialize)]
struct Jscode2SessionReply {
    #[serde(default)]
    errcode: i64,
    openid: Option<String>,
    session_key: Option<String>,
    unionid: Option<String>,
}

/// Errcodes that mean our own appid/secret/whitelist is wrong: the operator must act.
const CONFIG_ERRCODES: &[i64] = &[
    40001, 40002, 40013, 40125, 40164, 41002, 41004, 48001, 61024,
];

const BUSY_BACKOFF: Duration = Duration::from_millis(100);
const MAX_REPLY_BYTES: u64 = 64 * 1024;

impl HttpUpstream {
    fn exchange(&self, appid: &str, code: &str, metrics: &Metrics) -> Result<Session, WeChatError> {
        let Some(secret) = self.secrets.get(appid) else {
            return Err(WeChatError::Config(0));
        };
        let enc = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
        // The URL holds the secret: it is built here and never logged.
        let url = format!(
            "{}/sns/jscode2session?appid={}&secret={}&js_code={}&grant_type=authorization_code",
            self.api_base,
            enc(appid),
            enc(secret.expose()),
            enc(code),
        );
        let mut attempt = 0;
        loop {
            let started = Instant::now();
            let result = self.call(&url);
            metrics.observe_wechat(outcome_label(&result), started.elapsed());
            match result {
                // Retry only what cannot have spent the code: WeChat's explicit "busy",
                // and a connection that failed before the request was sent.
                Err(WeChatError::Busy | WeChatError::Connect(_)) if attempt < self.retries => {
                    attempt += 1;
                    std::thread::sleep(BUSY_BACKOFF * attempt);
                }
                Err(e) => {
                    log_failure(appid, &e);
                    return Err(e);
                }
                Ok(session) => return Ok(session),
            }
        }
    }

    fn call(&self, url: &str) -> Result<Session, WeChatError> {
        let mut response = self.agent.get(url).call().map_err(transport_error)?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(WeChatError::Http(status));
        }
        // WeChat labels its JSON text/plain: read the bytes whatever the content type.
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::Timeout(_) => WeChatError::Timeout,
                other => WeChatError::Malformed(other.to_string()),
            })?;
        let reply: Jscode2SessionReply = serde_json::from_slice(&body)
            .map_err(|e| WeChatError::Malformed(format!("not JSON: {e}")))?;
        match reply.errcode {
            0 => match (reply.openid, reply.session_key) {
                (Some(openid), Some(session_key))
                    if !openid.is_empty() && !session_key.is_empty() =>
                {
                    Ok(Session {
                        openid,
                        unionid: reply.unionid.filter(|u| !u.is_empty()),
                        session_key: SessionKey::new(session_key),
                    })
                }
                _ => Err(WeChatError::Malformed(
                    "errcode 0 without openid or session_key".into(),
                )),
            },
            -1 => Err(WeChatError::Busy),
            40029 => Err(WeChatError::CodeInvalid),
            40163 => Err(WeChatError::CodeUsed),
            40226 => Err(WeChatError::UserBlocked),
            45011 => Err(WeChatError::RateLimited),
            code if CONFIG_ERRCODES.contains(&code) => Err(WeChatError::Config(code)),
            code => Err(WeChatError::Unknown(code)),
        }
    }
}

/// The `outcome` label of one call (see `metrics::WECHAT_OUTCOMES`).
fn outcome_label(result: &Result<Session, WeChatError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => match e {
            WeChatError::CodeInvalid => "code_invalid",
            WeChatError::CodeUsed => "code_used",
            WeChatError::UserBlocked => "user_blocked",
            WeChatError::RateLimited => "rate_limited",
            WeChatError::Config(_) => "config_error",
            WeChatError::Busy => "busy",
            WeChatError::Timeout => "timeout",
            WeChatError::Http(_) => "http_error",
            WeChatError::Malformed(_) => "malformed",
            WeChatError::Unknown(_) => "unknown_errcode",
            WeChatError::Connect(_) => "connect_error",
            WeChatError::Unavailable => "unavailable",
        },
    }
}

fn transport_error(e: ureq::Error) -> WeChatError {
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
        // Anything else may have happened after the request left: not retried.
        ureq::Error::Io(io) => WeChatError::Malformed(format!("I/O error: {}", io.kind())),
        other => WeChatError::Malformed(format!("{other}")),
    }
}

fn log_failure(appid: &str, e: &WeChatError) {
    match e {
        WeChatError::Config(errcode) => {
            tracing::error!(
                appid,
                errcode,
                "WeChat rejected our credentials: check wechat.appid / wechat.secret"
            )
        }
        WeChatError::CodeInvalid | WeChatError::CodeUsed | WeChatError::UserBlocked => {
            tracing::info!(appid, reason = %e, "login refused by WeChat")
        }
        other => tracing::warn!(appid, error = ?other, "jscode2session failed"),
    }
}
