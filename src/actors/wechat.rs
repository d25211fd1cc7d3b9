//! The WeChat client: `sns/jscode2session` over a pooled ureq agent (rustls).
//!
//! The blocking HTTP call runs on [`WeChatWorker`]s, a `SyncArbiter` pool of actors
//! that own the upstream (the ureq agent and the secrets), never on an async worker
//! thread. [`WeChatClient`] is the shared handle the login handler calls: it keeps the
//! in-flight calls, so that a second submission of a code already being exchanged (a
//! double tap) waits for the same answer instead of spending the code twice. Its
//! bookkeeping is a short critical section run on the handler's own thread, and the
//! call's task is spawned there too: a login crosses to a worker thread and back,
//! and no other thread in between.
//!
//! Bounds: every login has one deadline, `wechat.timeout` from when its handler
//! started, covering the wait for a call slot, the call and its retries. A call starts
//! only once it holds one of `wechat.max_concurrent_calls` slots (as many as there are
//! workers, so the workers never queue); a login that cannot get one within
//! `wechat.queue_timeout` is refused at once with 503 `upstream_busy`. A call whose
//! clients have all gone by the time its slot comes up is never sent: the code stays
//! unspent.

use crate::config::{WeChatApp, WeChatConfig};
use crate::metrics::Metrics;
use crate::secret::{Secret, SessionKey};
use crate::wechat::errors::{Outcome, WeChatError};
use crate::wechat::wire::{
    common_error, encode, json_error_kind, mock_hash, with_retries, Upstream, MAX_REPLY_BYTES,
};
use crate::wechat::Session;
use actix::prelude::*;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

/// A `wx.login()` code to exchange for a session. `appid` must be a configured app.
pub struct Code2Session {
    pub appid: String,
    pub code: String,
    /// When the login began: its WeChat deadline is this plus `wechat.timeout`.
    pub started: Instant,
    /// The request's span (its request id): the call's log lines carry it. Logins
    /// that share one call carry the first one's.
    pub span: tracing::Span,
}

/// A code exchange under way. The login awaits [`PendingSession::answer`]; when the
/// login is dropped (its client left), so is this, and a call not yet started for
/// it is never made.
pub struct PendingSession {
    answer: oneshot::Receiver<Result<Session, WeChatError>>,
    deadline: Instant,
}

impl PendingSession {
    /// The session, or why not, by the login's deadline (plus a short grace for the
    /// call's own timeout to answer first).
    pub async fn answer(self) -> Result<Session, WeChatError> {
        match tokio::time::timeout_at((self.deadline + ANSWER_GRACE).into(), self.answer).await {
            Ok(answer) => answer.unwrap_or(Err(WeChatError::Unavailable)),
            Err(_) => Err(WeChatError::Timeout),
        }
    }
}

/// One call for a worker, sent only while a call slot is held.
#[derive(Message)]
#[rtype(result = "Result<Session, WeChatError>")]
struct Exchange {
    appid: String,
    code: String,
    deadline: Instant,
    span: tracing::Span,
}

/// How long past its deadline a login waits for the worker's own answer (the call's
/// timeout ends it at the deadline) before it is answered `upstream_timeout` anyway.
const ANSWER_GRACE: Duration = Duration::from_millis(500);
/// How often a login waiting for a call slot looks whether its clients are still there.
const CLIENT_CHECK_INTERVAL: Duration = Duration::from_millis(100);

type Waiter = oneshot::Sender<Result<Session, WeChatError>>;
/// (appid, code): submissions with the same key share one call.
type CallKey = (String, String);

/// The handle logins exchange codes through; cheap to clone, shared by the workers.
#[derive(Clone)]
pub struct WeChatClient {
    calls: Arc<Calls>,
    login_timeout: Duration,
}

/// What the client's spawned calls share with it.
struct Calls {
    workers: Addr<WeChatWorker>,
    /// One permit per worker: a call starts only with one in hand.
    slots: Arc<Semaphore>,
    queue_timeout: Duration,
    in_flight: Mutex<HashMap<CallKey, Vec<Waiter>>>,
}

impl WeChatClient {
    /// Whether the worker pool still runs (readiness).
    pub fn running(&self) -> bool {
        self.calls.workers.connected()
    }

    /// Starts the exchange of `msg.code`, or joins the one already under way for it.
    /// Must be called inside an actix runtime: the call runs as a task of the caller's
    /// thread, and outlives the caller (other logins may wait on it).
    pub fn code2session(&self, msg: Code2Session) -> PendingSession {
        let deadline = msg.started + self.login_timeout;
        let (tx, rx) = oneshot::channel();
        let key = (msg.appid, msg.code);
        let first = {
            let mut in_flight = self.calls.in_flight();
            match in_flight.get_mut(&key) {
                Some(waiters) => {
                    waiters.push(tx);
                    false
                }
                None => {
                    in_flight.insert(key.clone(), vec![tx]);
                    true
                }
            }
        };
        if first {
            let call = self.calls.clone().run(key, deadline, msg.span.clone());
            actix_web::rt::spawn(call.instrument(msg.span));
        }
        PendingSession {
            answer: rx,
            deadline,
        }
    }
}

impl Calls {
    fn in_flight(&self) -> MutexGuard<'_, HashMap<CallKey, Vec<Waiter>>> {
        // Never held across an await or a panic-prone call: a poisoned map is still sound.
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a slot, makes the call, and answers every waiter of `key`.
    async fn run(self: Arc<Self>, key: CallKey, deadline: Instant, span: tracing::Span) {
        let result = match self.take_slot(&key, deadline).await {
            Err(refused) => Err(refused),
            Ok(None) => return,
            Ok(Some(slot)) => {
                if self.everyone_left(&key) {
                    tracing::debug!(
                        "every client of a login left before its WeChat call: not sent"
                    );
                    return;
                }
                let exchange = Exchange {
                    appid: key.0.clone(),
                    code: key.1.clone(),
                    deadline,
                    span,
                };
                let result = self.workers.send(exchange).await;
                drop(slot);
                result.unwrap_or(Err(WeChatError::Unavailable))
            }
        };
        for waiter in self.in_flight().remove(&key).unwrap_or_default() {
            let _ = waiter.send(result.clone());
        }
    }

    /// A call slot, waiting at most `wechat.queue_timeout` and never past the deadline.
    /// `None` when every client of `key` left while it waited (the entry is dropped):
    /// a place in the queue is not held for nobody.
    async fn take_slot(
        &self,
        key: &CallKey,
        deadline: Instant,
    ) -> Result<Option<OwnedSemaphorePermit>, WeChatError> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(Some(slot));
        }
        tracing::debug!("login waits for a WeChat call slot");
        let wait = self
            .queue_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let slot = self.slots.clone().acquire_owned();
        let give_up = tokio::time::sleep(wait);
        tokio::pin!(slot, give_up);
        let mut check_clients = tokio::time::interval(CLIENT_CHECK_INTERVAL);
        loop {
            tokio::select! {
                slot = &mut slot => return slot.map(Some).map_err(|_closed| WeChatError::Unavailable),
                _ = &mut give_up => {
                    tracing::warn!(
                        waited_ms = wait.as_millis() as u64,
                        "every WeChat call slot is busy: login refused with upstream_busy"
                    );
                    return Err(WeChatError::NoCallSlot);
                }
                _ = check_clients.tick() => {
                    if self.everyone_left(key) {
                        tracing::debug!("every client of a login left while it waited for a WeChat call slot");
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// True (and the entry dropped) when every client of this call has gone: the
    /// call is not made, so the code stays unspent for a retry.
    fn everyone_left(&self, key: &CallKey) -> bool {
        let mut in_flight = self.in_flight();
        let gone = in_flight
            .get(key)
            .is_none_or(|waiters| waiters.iter().all(|w| w.is_closed()));
        if gone {
            in_flight.remove(key);
        }
        gone
    }
}

/// What the workers share: where codes are exchanged, and the apps' secrets.
struct Exchanger {
    upstream: Upstream,
    secrets: HashMap<String, Secret>,
    retries: u32,
}

pub struct WeChatWorker {
    exchanger: Arc<Exchanger>,
    metrics: Arc<Metrics>,
}

impl Actor for WeChatWorker {
    type Context = SyncContext<Self>;
}

impl Handler<Exchange> for WeChatWorker {
    type Result = Result<Session, WeChatError>;

    fn handle(&mut self, msg: Exchange, _: &mut SyncContext<Self>) -> Self::Result {
        let _request = msg.span.clone().entered();
        // No call that could not finish in time: the code stays unspent.
        if Instant::now() >= msg.deadline {
            return Err(WeChatError::Timeout);
        }
        self.exchanger
            .exchange(&msg.appid, &msg.code, msg.deadline, &self.metrics)
    }
}

/// Starts the worker pool (`wechat.max_concurrent_calls` blocking calls at once, one
/// per call slot) and returns the coalescing client.
pub fn start(cfg: &WeChatConfig, apps: &[WeChatApp], metrics: Arc<Metrics>) -> WeChatClient {
    let threads = cfg.max_concurrent_calls;
    let exchanger = Arc::new(Exchanger {
        // One pooled connection per worker thread (the total defaults to 10). Each
        // call also gets the time left of its login's deadline (see `exchange`).
        upstream: Upstream::new(cfg, Some(threads)),
        secrets: apps
            .iter()
            .map(|a| (a.appid.clone(), a.secret.clone()))
            .collect(),
        retries: cfg.retries,
    });
    let workers = SyncArbiter::start(threads, move || WeChatWorker {
        exchanger: exchanger.clone(),
        metrics: metrics.clone(),
    });
    WeChatClient {
        calls: Arc::new(Calls {
            workers,
            slots: Arc::new(Semaphore::new(threads)),
            queue_timeout: cfg.queue_timeout,
            in_flight: Mutex::new(HashMap::new()),
        }),
        login_timeout: cfg.timeout,
    }
}

/// The built-in mock: `name.anything` logs in the user `name`; anything else is 40029.
fn mock_exchange(code: &str) -> Result<Session, WeChatError> {
    match code.split_once('.') {
        // Checked like WeChat's answers: nothing unchecked is ever stored.
        Some((name, _)) if !name.is_empty() => {
            checked_session(mock_openid(name), None, crate::ids::random_hex(12))
        }
        _ => Err(WeChatError::CodeInvalid),
    }
}

/// The mock's openid for `name`: `mock-openid-<name>` when that has WeChat's shape,
/// else `mock-openid-h<hash of name>`. Any printable code is a valid login code, so
/// `$a.1` or a 120-character name must log in too, not fail as a malformed answer.
fn mock_openid(name: &str) -> String {
    const PREFIX: &str = "mock-openid-";
    let readable = format!("{PREFIX}{name}");
    if is_wechat_id(&readable) {
        return readable;
    }
    format!("{PREFIX}h{:016x}", mock_hash(name))
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

impl Exchanger {
    /// Calls (and retries) until an answer or `deadline`, the end of the login's time.
    fn exchange(
        &self,
        appid: &str,
        code: &str,
        deadline: Instant,
        metrics: &Metrics,
    ) -> Result<Session, WeChatError> {
        let http = match &self.upstream {
            Upstream::Mock => {
                let started = Instant::now();
                let result = mock_exchange(code);
                metrics.observe_wechat(outcome(&result), started.elapsed());
                return result;
            }
            Upstream::Http(http) => http,
        };
        let Some(secret) = self.secrets.get(appid) else {
            return Err(WeChatError::Config(0));
        };
        // The query holds the secret: it is built here and never logged.
        let query = format!(
            "appid={}&secret={}&js_code={}&grant_type=authorization_code",
            encode(appid),
            encode(secret.expose()),
            encode(code),
        );
        // Retried: only what cannot have spent the code (see `is_transient`).
        let result = with_retries(
            self.retries,
            deadline,
            WeChatError::is_transient,
            |time_left| {
                let started = Instant::now();
                let result = http
                    .get("/sns/jscode2session", &query, time_left, MAX_REPLY_BYTES)
                    .and_then(|body| session_from_reply(&body));
                metrics.observe_wechat(outcome(&result), started.elapsed());
                result
            },
        );
        if let Err(e) = &result {
            log_failure(appid, e);
        }
        result
    }
}

/// jscode2session's answer: the session, or WeChat's errcode as an error.
fn session_from_reply(body: &[u8]) -> Result<Session, WeChatError> {
    let reply: Jscode2SessionReply =
        serde_json::from_slice(body).map_err(|e| WeChatError::Malformed(json_error_kind(&e)))?;
    match reply.errcode {
        0 => match (reply.openid, reply.session_key) {
            (Some(openid), Some(session_key)) if !openid.is_empty() && !session_key.is_empty() => {
                checked_session(openid, reply.unionid, session_key)
            }
            _ => Err(WeChatError::Malformed(
                "errcode 0 without openid or session_key".into(),
            )),
        },
        40029 => Err(WeChatError::CodeInvalid),
        40163 => Err(WeChatError::CodeUsed),
        40226 => Err(WeChatError::UserBlocked),
        code => Err(common_error(code).unwrap_or(WeChatError::Unknown(code))),
    }
}

/// The `outcome` label of one call.
fn outcome(result: &Result<Session, WeChatError>) -> Outcome {
    result
        .as_ref()
        .map_or_else(WeChatError::metric_label, |_| Outcome::Ok)
}

/// Longest openid or unionid accepted (WeChat's are 28 characters).
const MAX_WECHAT_ID_LEN: usize = 64;
/// Longest session_key accepted (WeChat's are 24: base64 of 16 bytes).
const MAX_SESSION_KEY_LEN: usize = 64;

/// The session, if what WeChat sent has the shape WeChat's ids and keys have:
/// anything else (control characters, bidi marks, kilobytes) is never stored.
/// The messages name the rule, never the value.
fn checked_session(
    openid: String,
    unionid: Option<String>,
    session_key: String,
) -> Result<Session, WeChatError> {
    if !is_wechat_id(&openid) {
        return Err(WeChatError::Malformed(
            "openid is not 1 to 64 characters of [A-Za-z0-9_-]".into(),
        ));
    }
    let unionid = unionid.filter(|u| !u.is_empty());
    if unionid.as_deref().is_some_and(|u| !is_wechat_id(u)) {
        return Err(WeChatError::Malformed(
            "unionid is not 1 to 64 characters of [A-Za-z0-9_-]".into(),
        ));
    }
    if !is_standard_base64(&session_key, MAX_SESSION_KEY_LEN) {
        return Err(WeChatError::Malformed(
            "session_key is not standard base64 of at most 64 characters".into(),
        ));
    }
    Ok(Session {
        openid,
        unionid,
        session_key: SessionKey::new(session_key),
    })
}

fn is_wechat_id(id: &str) -> bool {
    (1..=MAX_WECHAT_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Standard alphabet, padded to a multiple of four, at most `max_len` characters.
fn is_standard_base64(text: &str, max_len: usize) -> bool {
    let unpadded = text.trim_end_matches('=');
    !unpadded.is_empty()
        && text.len() <= max_len
        && text.len() % 4 == 0
        && text.len() - unpadded.len() <= 2
        && unpadded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wechat_ids_are_1_to_64_of_the_url_safe_alphabet() {
        assert!(is_wechat_id("oVBkZ0aYgDMDIywRdgPW8-joxXc4"));
        assert!(is_wechat_id(&"a".repeat(64)));
        for bad in ["", "o x", "o\0x", "o\u{1b}x", "o\u{202e}x", "o.x", "o+x"] {
            assert!(!is_wechat_id(bad), "{bad:?}");
        }
        assert!(!is_wechat_id(&"a".repeat(65)));
    }

    #[test]
    fn session_keys_are_padded_standard_base64() {
        assert!(is_standard_base64("tiihtNczf5v6AKRyjwEUhQ==", 64));
        assert!(is_standard_base64("abc+/def", 64));
        for bad in ["", "====", "abc", "ab=c", "abc===", "ab-_", "not base64!"] {
            assert!(!is_standard_base64(bad, 64), "{bad:?}");
        }
        assert!(!is_standard_base64(&"A".repeat(68), 64));
    }

    #[test]
    fn a_json_error_never_quotes_the_answer() {
        let e = serde_json::from_slice::<Jscode2SessionReply>(br#"{"errcode":"LEAKED-VALUE"}"#)
            .err()
            .expect("a string errcode is refused");
        assert!(
            e.to_string().contains("LEAKED-VALUE"),
            "serde quotes it: {e}"
        );
        let kind = json_error_kind(&e);
        assert!(!kind.contains("LEAKED"), "{kind}");
        assert!(kind.starts_with("JSON of the wrong shape"), "{kind}");
    }

    #[test]
    fn a_bad_session_key_is_refused_without_quoting_it() {
        let refused = checked_session("o-ok".into(), None, "secret value!".into());
        match refused {
            Err(WeChatError::Malformed(why)) => assert!(!why.contains("secret value")),
            other => panic!("accepted: {other:?}"),
        }
    }
}
