//! The access-token keeper: the one holder of each configured app's WeChat
//! `access_token`, and the caller of the WeChat APIs that need it
//! (`getuserphonenumber`, `checksession`, `getwxacodeunlimit`).
//!
//! WeChat's advice is one central holder: a second process fetching a token can
//! invalidate the first one's. So:
//! - tokens come from `cgi-bin/stable_token` (`force_refresh: false`), never
//!   `cgi-bin/token` (which rotates the token on every call);
//! - single flight: one fetch per app, however many requests wait (a per-app lock;
//!   whoever waits behind the fetch finds the fresh token);
//! - refresh ahead: a token is refreshed once it is within `wechat.token_refresh_ahead`
//!   (default 5 min) of its expiry. WeChat rotates 5 minutes ahead and the old and new
//!   tokens overlap, so that is safe; a failed refresh keeps serving the old token
//!   until it really expires;
//! - the token is stored (meta tree) with its expiry: a restart does not refetch;
//! - -1 (busy) is retried `wechat.retries` times, while the backoff still fits the
//!   request's deadline;
//! - on 40001/40014/42001 from an API that used the token, one `force_refresh: true`
//!   fetch and one retry; WeChat allows 20 forced refreshes a day, 30 s apart, and the
//!   keeper keeps (and stores) that count so it never spends more.
//!
//! Login never goes through here: `jscode2session` needs no access token.
//! The blocking HTTP calls run on tokio's blocking pool, never on this actor's thread.

use crate::config::{WeChatApp, WeChatConfig};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::storage::model::AuthStore;
use crate::storage::{GroupCommit, ReadStore, StorageError, Store, Tree, WriteBatch};
use crate::wechat::errors::{Outcome, WeChatError, WxApiError};
use crate::wechat::token_key;
use crate::wechat::wire::{
    self as wx, common_error, encode, json_object, mock_hash, with_retries, Upstream,
    MAX_REPLY_BYTES,
};

/// How often a process that does not hold an app's lease looks for the token the
/// holder fetches.
const LEASE_POLL: Duration = Duration::from_millis(50);
use crate::users::PhoneNumber;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// WeChat's limit on forced refreshes per app per day.
pub const FORCED_REFRESHES_PER_DAY: usize = 20;
/// WeChat's minimum time between two forced refreshes of one app.
pub const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
const DAY_MS: i64 = 24 * 3600 * 1000;
/// After a failed fetch, requests within this time get the same failure instead of
/// another fetch each (50 waiting requests must not become 50 fetches).
const FAILURE_HOLD: Duration = Duration::from_secs(1);
/// Errcodes that mean "this access token is invalid or expired".
const TOKEN_ERRCODES: &[i64] = &[40001, 40014, 42001];

/// A token as handed out: the value and how long it lives.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub access_token: Secret,
    pub expires_in_secs: i64,
}

/// The stored record of one app's token (meta tree, key [`token_key`]).
#[derive(Clone, Serialize, Deserialize)]
struct TokenRecord {
    access_token: String,
    expires_at_ms: i64,
    fetched_at_ms: i64,
    /// When forced refreshes were made (ms), the last 24 hours' worth.
    #[serde(default)]
    forced_ms: Vec<i64>,
}

/// What the operator sees (`wxauth wechat token`): never the token itself.
#[derive(Debug, Clone, Serialize)]
pub struct TokenStatus {
    pub appid: String,
    pub present: bool,
    pub expires_at: Option<String>,
    pub expires_in_secs: Option<i64>,
    pub age_secs: Option<i64>,
    pub forced_refreshes_last_24h: usize,
}

/// The lease that decides which process fetches an app's token.
fn lease_name(appid: &str) -> String {
    format!("access_token:{appid}")
}

fn now_ms() -> i64 {
    crate::clock::now_ms()
}

fn load_record(store: &dyn ReadStore, appid: &str) -> Result<Option<TokenRecord>, StorageError> {
    store
        .get(Tree::Meta, &token_key(appid))?
        .map(|bytes| {
            serde_json::from_slice(&bytes).map_err(|e| StorageError::Corrupt {
                tree: Tree::Meta.name(),
                reason: format!("access token record: {}", wx::json_error_kind(&e)),
            })
        })
        .transpose()
}

/// The stored token's status for `appid` (read straight from storage, so it works
/// with the server stopped too).
pub fn status(store: &dyn ReadStore, appid: &str) -> Result<TokenStatus, StorageError> {
    let record = load_record(store, appid)?;
    let now = now_ms();
    Ok(match record {
        None => TokenStatus {
            appid: appid.to_string(),
            present: false,
            expires_at: None,
            expires_in_secs: None,
            age_secs: None,
            forced_refreshes_last_24h: 0,
        },
        Some(r) => TokenStatus {
            appid: appid.to_string(),
            present: true,
            expires_at: Some(crate::clock::rfc3339(r.expires_at_ms.div_euclid(1000))),
            expires_in_secs: Some((r.expires_at_ms - now).div_euclid(1000)),
            age_secs: Some((now - r.fetched_at_ms).div_euclid(1000)),
            forced_refreshes_last_24h: r.forced_ms.iter().filter(|&&t| now - t < DAY_MS).count(),
        },
    })
}

/// Every app that has a stored token.
pub fn stored_appids(store: &dyn ReadStore) -> Result<Vec<String>, StorageError> {
    let prefix = token_key("");
    let mut appids = Vec::new();
    store.for_each_from(Tree::Meta, &prefix, &mut |key, _| match key
        .strip_prefix(prefix.as_slice())
    {
        Some(appid) => {
            appids.push(String::from_utf8_lossy(appid).into_owned());
            std::ops::ControlFlow::Continue(())
        }
        None => std::ops::ControlFlow::Break(()),
    })?;
    Ok(appids)
}

/// One app's state: the cached record and the last failure.
#[derive(Default)]
struct Slot {
    loaded: bool,
    record: Option<TokenRecord>,
    last_failure: Option<(Instant, WxApiError)>,
}

/// The calls that take the access token, each cut off at `wechat.timeout` or the
/// request's deadline, whichever comes first.
struct Api {
    upstream: Upstream,
    timeout: Duration,
}

struct Keeper {
    api: Arc<Api>,
    secrets: HashMap<String, Secret>,
    slots: HashMap<String, Arc<tokio::sync::Mutex<Slot>>>,
    store: Arc<dyn Store>,
    commit: GroupCommit,
    metrics: Arc<Metrics>,
    refresh_ahead: Duration,
    retries: u32,
    /// API calls in flight at once (`wechat.max_concurrent_calls`, like login's): the
    /// rest wait, within their deadline, instead of taking a blocking thread each.
    call_slots: tokio::sync::Semaphore,
    /// The longest a call waits for one of them (`wechat.queue_timeout`, like
    /// login's), then 503 `upstream_busy` and no call.
    queue_timeout: Duration,
    /// The whole of one request's work here (token, call, forced refresh, retry).
    deadline: Duration,
    /// Decides which process refreshes a token when several share the store.
    leases: Arc<dyn AuthStore>,
    /// This process's name as a lease holder.
    holder: String,
    /// How long a lease lasts: one fetch with its retries.
    lease_ms: i64,
}

/// The keeper: a shared handle, cheap to clone, called on the caller's own thread
/// (an HTTP worker, the admin thread). Not an actor: its state is per app, behind
/// each app's own lock (the single flight), and its blocking calls run on tokio's
/// blocking pool, so a mailbox would add a thread hop and nothing else.
#[derive(Clone)]
pub struct AccessTokenKeeper {
    keeper: Arc<Keeper>,
}

/// The app's current token (fetched first if needed).
pub struct GetToken {
    pub appid: String,
}

/// `wxa/business/getuserphonenumber` for a getPhoneNumber code.
pub struct GetPhoneNumber {
    pub appid: String,
    pub openid: String,
    pub code: String,
}

/// `wxa/checksession`: does WeChat still hold this session key? `Ok(false)`: no.
pub struct CheckSession {
    pub appid: String,
    pub openid: String,
    pub signature: String,
}

/// `wxa/getwxacodeunlimit`: a mini-program code (an image) that opens `page`
/// with `scene`.
pub struct GetWxaCode {
    pub appid: String,
    pub scene: String,
    pub page: String,
    pub env_version: String,
    pub check_path: bool,
    pub width: u32,
}

/// WeChat's image, as it sent it (never re-encoded).
#[derive(Clone)]
pub struct WxaCode {
    /// `image/png` or `image/jpeg`, from the image's own signature.
    pub content_type: &'static str,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for WxaCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WxaCode({}, {} bytes)",
            self.content_type,
            self.bytes.len()
        )
    }
}

impl AccessTokenKeeper {
    /// A mini-program code from `getwxacodeunlimit`.
    pub async fn wxa_code(&self, msg: GetWxaCode) -> Result<WxaCode, WxApiError> {
        let body = json!({
            "scene": msg.scene,
            "page": msg.page,
            "env_version": msg.env_version,
            "check_path": msg.check_path,
            "width": msg.width,
        });
        self.with_token(&msg.appid, move |api, token, time_left| {
            api.wxa_code(token, &body, time_left)
        })
        .await
    }

    /// The app's current token (fetched first if needed).
    pub async fn token(&self, msg: GetToken) -> Result<IssuedToken, WxApiError> {
        let keeper = &self.keeper;
        let deadline = keeper.deadline;
        let until = Instant::now() + deadline;
        within(deadline, async {
            let record = keeper.token(&msg.appid, until).await?;
            Ok(IssuedToken {
                access_token: Secret::new(record.access_token),
                expires_in_secs: (record.expires_at_ms - now_ms()).div_euclid(1000),
            })
        })
        .await
    }

    /// The user's phone number for a getPhoneNumber code.
    pub async fn phone_number(&self, msg: GetPhoneNumber) -> Result<PhoneNumber, WxApiError> {
        let body = json!({ "code": msg.code, "openid": msg.openid });
        self.with_token(&msg.appid, move |api, token, time_left| {
            api.phone_number(token, &body, time_left)
        })
        .await
    }

    /// Whether WeChat still holds the session key the signature was made with.
    pub async fn check_session(&self, msg: CheckSession) -> Result<bool, WxApiError> {
        self.with_token(&msg.appid, move |api, token, time_left| {
            api.check_session(token, &msg.openid, &msg.signature, time_left)
        })
        .await
    }

    /// `call` with the app's token, all within the keeper's deadline.
    async fn with_token<T, F>(&self, appid: &str, call: F) -> Result<T, WxApiError>
    where
        T: Send + 'static,
        F: Fn(&Api, &str, Duration) -> Result<ApiReply<T>, WxApiError> + Send + Sync + 'static,
    {
        let deadline = self.keeper.deadline;
        let until = Instant::now() + deadline;
        within(deadline, self.keeper.call_with_token(appid, until, call)).await
    }
}

async fn within<T>(
    deadline: Duration,
    work: impl std::future::Future<Output = Result<T, WxApiError>>,
) -> Result<T, WxApiError> {
    tokio::time::timeout(deadline, work)
        .await
        .unwrap_or(Err(WxApiError::WeChat(WeChatError::Timeout)))
}

/// What an API call that used a token can say.
enum ApiReply<T> {
    Ok(T),
    /// 40001/40014/42001: the token is invalid or expired.
    TokenInvalid,
}

/// The keeper's handle.
pub fn start(
    cfg: &WeChatConfig,
    apps: &[WeChatApp],
    store: Arc<dyn Store>,
    commit: GroupCommit,
    leases: Arc<dyn AuthStore>,
    metrics: Arc<Metrics>,
) -> AccessTokenKeeper {
    let keeper = Keeper {
        api: Arc::new(Api {
            upstream: Upstream::new(cfg, None),
            timeout: cfg.timeout,
        }),
        secrets: apps
            .iter()
            .map(|a| (a.appid.clone(), a.secret.clone()))
            .collect(),
        slots: apps
            .iter()
            .map(|a| (a.appid.clone(), Arc::default()))
            .collect(),
        store,
        commit,
        metrics,
        refresh_ahead: cfg.token_refresh_ahead,
        retries: cfg.retries,
        call_slots: tokio::sync::Semaphore::new(cfg.max_concurrent_calls),
        queue_timeout: cfg.queue_timeout,
        // A token fetch, a call, a forced fetch and a retry, each with its retries.
        deadline: cfg.timeout * 4,
        leases,
        holder: crate::ids::random_hex(8),
        lease_ms: i64::try_from((cfg.timeout * (cfg.retries + 1)).as_millis()).unwrap_or(i64::MAX),
    };
    AccessTokenKeeper {
        keeper: Arc::new(keeper),
    }
}

impl Keeper {
    fn slot(&self, appid: &str) -> Result<Arc<tokio::sync::Mutex<Slot>>, WxApiError> {
        self.slots
            .get(appid)
            .cloned()
            .ok_or_else(|| WxApiError::UnknownApp(appid.chars().take(64).collect()))
    }

    /// The app's token: cached, stored, or fetched (one fetch at a time per app).
    async fn token(&self, appid: &str, until: Instant) -> Result<TokenRecord, WxApiError> {
        let slot = self.slot(appid)?;
        let mut slot = slot.lock().await;
        if !slot.loaded {
            slot.record = load_record(self.store.as_ref(), appid)?;
            slot.loaded = true;
        }
        let now = now_ms();
        if let Some(record) = &slot.record {
            let refresh_at = record.expires_at_ms - self.refresh_ahead.as_millis() as i64;
            if now < refresh_at {
                return Ok(record.clone());
            }
        }
        if let Some((at, error)) = &slot.last_failure {
            if at.elapsed() < FAILURE_HOLD {
                return self.old_token_or(&slot, error.clone());
            }
        }
        if let Some(record) = self.fetched_elsewhere(appid).await? {
            slot.record = Some(record.clone());
            return Ok(record);
        }
        let fetched = self.fetch(appid, false, until).await;
        let answer = match fetched {
            Ok((token, expires_in)) => {
                let forced_ms = slot
                    .record
                    .as_ref()
                    .map(|r| r.forced_ms.clone())
                    .unwrap_or_default();
                let record = self
                    .keep(appid, &mut slot, token, expires_in, forced_ms)
                    .await;
                Ok(record)
            }
            Err(e) => {
                slot.last_failure = Some((Instant::now(), e.clone()));
                self.old_token_or(&slot, e)
            }
        };
        self.release_lease(appid).await;
        answer
    }

    /// The stored token when it does not need a refresh, else `None` once this
    /// process holds the app's lease and so may fetch. Several processes on one
    /// store (PostgreSQL nodes) each come here when the token is due: one takes the
    /// lease and fetches; the others wait for its stored record (at most the
    /// keeper's deadline; after a lease lapses, one of them takes it over).
    async fn fetched_elsewhere(&self, appid: &str) -> Result<Option<TokenRecord>, WxApiError> {
        let started = Instant::now();
        let mut leased = false;
        loop {
            let stored = load_record(self.store.as_ref(), appid).map_err(WxApiError::from)?;
            let now = now_ms();
            if let Some(record) = stored {
                let refresh_at = record.expires_at_ms - self.refresh_ahead.as_millis() as i64;
                if now < refresh_at {
                    if leased {
                        self.release_lease(appid).await;
                    }
                    return Ok(Some(record));
                }
            }
            // Read again once the lease is ours: its last holder may have stored a
            // token between the read above and the lease.
            if leased {
                return Ok(None);
            }
            leased = self.take_lease(appid).await?;
            if !leased {
                if started.elapsed() >= self.deadline {
                    return Err(WxApiError::WeChat(WeChatError::Busy));
                }
                tokio::time::sleep(LEASE_POLL).await;
            }
        }
    }

    /// The app's lease (`access_token:<appid>`), for one fetch.
    async fn take_lease(&self, appid: &str) -> Result<bool, WxApiError> {
        let now = now_ms();
        self.leases
            .take_lease(
                &lease_name(appid),
                &self.holder,
                now,
                now.saturating_add(self.lease_ms),
            )
            .await
            .map_err(WxApiError::from)
    }

    /// Ends this process's lease now (its fetch is stored, or failed), so that
    /// another process need not wait for it to lapse; a no-op if another holds it.
    async fn release_lease(&self, appid: &str) {
        let now = now_ms();
        if let Err(e) = self
            .leases
            .take_lease(&lease_name(appid), &self.holder, now, now)
            .await
        {
            tracing::debug!(appid, error = %e, "cannot release the access token lease; it lapses");
        }
    }

    /// During the overlap, a failed refresh still leaves a token that works.
    fn old_token_or(&self, slot: &Slot, error: WxApiError) -> Result<TokenRecord, WxApiError> {
        match &slot.record {
            Some(record) if now_ms() < record.expires_at_ms => {
                tracing::warn!(error = %error, "access token refresh failed: the current token is kept until it expires");
                Ok(record.clone())
            }
            _ => Err(error),
        }
    }

    /// One forced refresh after WeChat refused `rejected`, if the guard allows it.
    /// A token other than `rejected` already in hand (someone else refreshed) is
    /// returned as it is.
    ///
    /// Across processes on one store (PostgreSQL nodes) the refresh is conditional:
    /// it is made only by the holder of the app's lease, and only if the stored token
    /// is still `rejected` once the lease is held; the others wait for the token it
    /// stores (at most the keeper's deadline). So of any number of nodes refused at
    /// once, one forces; and the guard's count, kept in the stored record, is the
    /// one every node reads.
    async fn force(
        &self,
        appid: &str,
        rejected: &str,
        until: Instant,
    ) -> Result<TokenRecord, WxApiError> {
        let slot = self.slot(appid)?;
        let mut slot = slot.lock().await;
        let mut leased = false;
        loop {
            // Another process on the same store (a PostgreSQL node) may have replaced it.
            if let Ok(Some(stored)) = load_record(self.store.as_ref(), appid) {
                slot.record = Some(stored);
            }
            if let Some(record) = &slot.record {
                if record.access_token != rejected && now_ms() < record.expires_at_ms {
                    let record = record.clone();
                    if leased {
                        self.release_lease(appid).await;
                    }
                    return Ok(record);
                }
            }
            if leased {
                break;
            }
            leased = self.take_lease(appid).await?;
            if !leased {
                if Instant::now() >= until {
                    return Err(WxApiError::WeChat(WeChatError::Busy));
                }
                tokio::time::sleep(LEASE_POLL).await;
            }
        }
        let forced = self.force_holding_lease(appid, &mut slot, until).await;
        self.release_lease(appid).await;
        forced
    }

    /// [`force`](Self::force)'s refresh itself, under the lease: the guard, the
    /// count stored first, the forced fetch.
    async fn force_holding_lease(
        &self,
        appid: &str,
        slot: &mut Slot,
        until: Instant,
    ) -> Result<TokenRecord, WxApiError> {
        let now = now_ms();
        let mut forced_ms: Vec<i64> = slot
            .record
            .as_ref()
            .map(|r| r.forced_ms.clone())
            .unwrap_or_default();
        forced_ms.retain(|&t| now - t < DAY_MS);
        let wait_ms = forced_refresh_wait_ms(&forced_ms, now);
        if wait_ms > 0 {
            self.metrics.observe_token_fetch(Outcome::ForcedRefused);
            tracing::warn!(
                appid,
                forced_last_24h = forced_ms.len(),
                retry_after_ms = wait_ms,
                "WeChat refused the access token; a forced refresh is not allowed yet"
            );
            return Err(WxApiError::ForcedRefreshLimited {
                retry_after_secs: (wait_ms as u64).div_ceil(1000).max(1),
            });
        }
        // Counted, and stored, before it is asked for: WeChat counts the call whatever
        // it answers, and this request may be cancelled (its deadline) while the call
        // still goes out.
        forced_ms.push(now);
        tracing::info!(
            appid,
            forced_last_24h = forced_ms.len(),
            "WeChat refused the access token: one forced refresh"
        );
        if let Some(record) = &mut slot.record {
            record.forced_ms = forced_ms.clone();
            let record = record.clone();
            self.store_record(appid, &record).await;
        }
        let (token, expires_in) = self.fetch(appid, true, until).await?;
        Ok(self.keep(appid, slot, token, expires_in, forced_ms).await)
    }

    /// Caches and stores a fetched token; returns its record.
    async fn keep(
        &self,
        appid: &str,
        slot: &mut Slot,
        token: String,
        expires_in: i64,
        forced_ms: Vec<i64>,
    ) -> TokenRecord {
        let now = now_ms();
        let record = TokenRecord {
            access_token: token,
            expires_at_ms: now + expires_in.max(1) * 1000,
            fetched_at_ms: now,
            forced_ms,
        };
        slot.record = Some(record.clone());
        slot.last_failure = None;
        self.store_record(appid, &record).await;
        record
    }

    /// Stored and committed; a storage failure costs a refetch after a restart,
    /// nothing more, so it is logged and not returned.
    async fn store_record(&self, appid: &str, record: &TokenRecord) {
        let mut batch = WriteBatch::default();
        batch.put(
            Tree::Meta,
            token_key(appid),
            serde_json::to_vec(record).expect("a token record serializes"),
        );
        let stored = match self.store.apply(batch) {
            Ok(()) => self.commit.durable().await,
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            tracing::warn!(appid, error = %e, "cannot store the access token; a restart will fetch a new one");
        }
    }

    /// One `stable_token` fetch with its retries on -1, on the blocking pool.
    async fn fetch(
        &self,
        appid: &str,
        force: bool,
        until: Instant,
    ) -> Result<(String, i64), WxApiError> {
        let secret = self
            .secrets
            .get(appid)
            .cloned()
            .ok_or_else(|| WxApiError::UnknownApp(appid.to_string()))?;
        let api = self.api.clone();
        let appid_owned = appid.to_string();
        let retries = self.retries;
        let result = blocking(move || {
            with_retries(retries, until, WxApiError::is_transient, |time_left| {
                api.stable_token(&appid_owned, secret.expose(), force, time_left)
            })
        })
        .await;
        let outcome = match (&result, force) {
            (Ok(_), false) => Outcome::Ok,
            (Ok(_), true) => Outcome::ForcedOk,
            (Err(e), _) => e.metric_label(),
        };
        self.metrics.observe_token_fetch(outcome);
        if let Err(e) = &result {
            match e {
                WxApiError::WeChat(WeChatError::Config(errcode)) => tracing::error!(
                    appid,
                    errcode,
                    "WeChat refused our credentials for stable_token: check wechat.appid / wechat.secret"
                ),
                other => tracing::warn!(appid, error = %other, "stable_token failed"),
            }
        }
        result
    }

    /// Runs `call` with the app's token; on a token error, one forced refresh and
    /// one retry.
    async fn call_with_token<T, F>(
        &self,
        appid: &str,
        until: Instant,
        call: F,
    ) -> Result<T, WxApiError>
    where
        T: Send + 'static,
        F: Fn(&Api, &str, Duration) -> Result<ApiReply<T>, WxApiError> + Send + Sync + 'static,
    {
        let call = Arc::new(call);
        let token = self.token(appid, until).await?;
        match self
            .call_once(call.clone(), token.access_token.clone(), until)
            .await?
        {
            ApiReply::Ok(answer) => Ok(answer),
            ApiReply::TokenInvalid => {
                let fresh = self.force(appid, &token.access_token, until).await?;
                match self.call_once(call, fresh.access_token, until).await? {
                    ApiReply::Ok(answer) => Ok(answer),
                    ApiReply::TokenInvalid => Err(WxApiError::TokenRejected),
                }
            }
        }
    }

    async fn call_once<T, F>(
        &self,
        call: Arc<F>,
        token: String,
        until: Instant,
    ) -> Result<ApiReply<T>, WxApiError>
    where
        T: Send + 'static,
        F: Fn(&Api, &str, Duration) -> Result<ApiReply<T>, WxApiError> + Send + Sync + 'static,
    {
        let _slot = match tokio::time::timeout(self.queue_timeout, self.call_slots.acquire()).await
        {
            Ok(slot) => slot.map_err(|_closed| WxApiError::WeChat(WeChatError::Unavailable))?,
            Err(_) => {
                tracing::warn!(
                    waited_ms = self.queue_timeout.as_millis() as u64,
                    "every WeChat call slot is busy: refused with upstream_busy"
                );
                return Err(WeChatError::NoCallSlot.into());
            }
        };
        let api = self.api.clone();
        let retries = self.retries;
        let metrics = self.metrics.clone();
        blocking(move || {
            with_retries(retries, until, WxApiError::is_transient, |time_left| {
                let result = call(&api, &token, time_left);
                let outcome = match &result {
                    Ok(ApiReply::Ok(_)) => Outcome::Ok,
                    Ok(ApiReply::TokenInvalid) => Outcome::TokenInvalid,
                    Err(e) => e.metric_label(),
                };
                metrics.observe_wechat_api(outcome);
                result
            })
        })
        .await
    }
}

/// How long until the guard allows another forced refresh (0: now), given the
/// forced refreshes of the last 24 hours: at most 20 a day, 30 s apart.
fn forced_refresh_wait_ms(forced_ms: &[i64], now: i64) -> i64 {
    let recent: Vec<i64> = forced_ms
        .iter()
        .copied()
        .filter(|&t| now - t < DAY_MS)
        .collect();
    let interval_ms = FORCED_REFRESH_INTERVAL.as_millis() as i64;
    let daily = match recent.iter().min() {
        Some(&first) if recent.len() >= FORCED_REFRESHES_PER_DAY => first + DAY_MS - now,
        _ => 0,
    };
    let spacing = recent
        .iter()
        .max()
        .map_or(0, |&last| last + interval_ms - now);
    daily.max(spacing).max(0)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, WxApiError> + Send + 'static,
) -> Result<T, WxApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or(Err(WxApiError::WeChat(WeChatError::Unavailable)))
}

/// An errcode of a call that took the token, as its error.
fn api_error(errcode: i64) -> WxApiError {
    common_error(errcode)
        .unwrap_or(WeChatError::Unknown(errcode))
        .into()
}

fn errcode_of(reply: &Value) -> i64 {
    reply.get("errcode").and_then(Value::as_i64).unwrap_or(0)
}

/// WeChat's `countryCode` is a number in its doc's example and a string in its table.
fn text_or_number(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Longest phone field accepted from WeChat.
const MAX_PHONE_FIELD: usize = 32;

fn phone_from_reply(reply: &Value) -> Result<PhoneNumber, WxApiError> {
    let info = reply.get("phone_info").unwrap_or(&Value::Null);
    let field = |name: &str| {
        text_or_number(info.get(name)).filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_PHONE_FIELD
                && v.bytes()
                    .all(|b| b.is_ascii_digit() || b == b'+' || b == b' ' || b == b'-')
        })
    };
    match (
        field("phoneNumber"),
        field("purePhoneNumber"),
        field("countryCode"),
    ) {
        (Some(phone_number), Some(pure_phone_number), Some(country_code)) => Ok(PhoneNumber {
            phone_number,
            pure_phone_number,
            country_code,
        }),
        _ => Err(WeChatError::Malformed(
            "getuserphonenumber: phone_info without phoneNumber, purePhoneNumber or countryCode of digits"
                .into(),
        )
        .into()),
    }
}

impl Api {
    /// A JSON answer: POST with a JSON body, or GET (`body` `None`).
    fn reply(
        &self,
        path: &str,
        query: &str,
        body: Option<&Value>,
        time_left: Duration,
    ) -> Result<Value, WxApiError> {
        let Upstream::Http(http) = &self.upstream else {
            return Err(WeChatError::Unavailable.into());
        };
        let time_left = time_left.min(self.timeout);
        let bytes = match body {
            Some(body) => http.post(path, query, body, time_left, MAX_REPLY_BYTES)?,
            None => http.get(path, query, time_left, MAX_REPLY_BYTES)?,
        };
        Ok(json_object(&bytes)?)
    }

    fn stable_token(
        &self,
        appid: &str,
        secret: &str,
        force: bool,
        time_left: Duration,
    ) -> Result<(String, i64), WxApiError> {
        let reply = match &self.upstream {
            Upstream::Mock => {
                return Ok((
                    format!("mock-access-token-{}", crate::ids::random_hex(16)),
                    7200,
                ))
            }
            Upstream::Http(_) => self.reply(
                "/cgi-bin/stable_token",
                "",
                Some(&json!({
                    "grant_type": "client_credential",
                    "appid": appid,
                    "secret": secret,
                    "force_refresh": force,
                })),
                time_left,
            )?,
        };
        if let Some(e) = common_error(errcode_of(&reply)) {
            return Err(e.into());
        }
        let token = reply.get("access_token").and_then(Value::as_str);
        let expires_in = reply.get("expires_in").and_then(Value::as_i64);
        match (token, expires_in) {
            (Some(token), Some(expires_in))
                if !token.is_empty()
                    && token.len() <= 1024
                    && token.bytes().all(|b| b.is_ascii_graphic())
                    && expires_in > 0 =>
            {
                Ok((token.to_string(), expires_in))
            }
            _ => Err(WeChatError::Malformed(
                "stable_token without a printable access_token or a positive expires_in".into(),
            )
            .into()),
        }
    }

    fn phone_number(
        &self,
        token: &str,
        body: &Value,
        time_left: Duration,
    ) -> Result<ApiReply<PhoneNumber>, WxApiError> {
        let reply = match &self.upstream {
            Upstream::Mock => return mock_phone(body["code"].as_str().unwrap_or("")),
            Upstream::Http(_) => self.reply(
                "/wxa/business/getuserphonenumber",
                &format!("access_token={}", encode(token)),
                Some(body),
                time_left,
            )?,
        };
        match errcode_of(&reply) {
            0 => phone_from_reply(&reply).map(ApiReply::Ok),
            40029 => Err(WxApiError::PhoneCodeInvalid),
            code if TOKEN_ERRCODES.contains(&code) => Ok(ApiReply::TokenInvalid),
            code => Err(api_error(code)),
        }
    }

    fn check_session(
        &self,
        token: &str,
        openid: &str,
        signature: &str,
        time_left: Duration,
    ) -> Result<ApiReply<bool>, WxApiError> {
        let reply = match &self.upstream {
            Upstream::Mock => return Ok(ApiReply::Ok(true)),
            Upstream::Http(_) => self.reply(
                "/wxa/checksession",
                &format!(
                    "access_token={}&signature={}&openid={}&sig_method=hmac_sha256",
                    encode(token),
                    encode(signature),
                    encode(openid)
                ),
                None,
                time_left,
            )?,
        };
        match errcode_of(&reply) {
            0 => Ok(ApiReply::Ok(true)),
            // "invalid signature": WeChat holds another session key (or none).
            87009 => Ok(ApiReply::Ok(false)),
            code if TOKEN_ERRCODES.contains(&code) => Ok(ApiReply::TokenInvalid),
            code => Err(api_error(code)),
        }
    }
}

/// The longest image accepted from getwxacodeunlimit (a 1280-pixel code is far
/// smaller).
const MAX_IMAGE_BYTES: u64 = 2 * 1024 * 1024;

impl Api {
    /// WeChat answers the image's bytes on success and a JSON errcode on failure.
    fn wxa_code(
        &self,
        token: &str,
        body: &Value,
        time_left: Duration,
    ) -> Result<ApiReply<WxaCode>, WxApiError> {
        let bytes = match &self.upstream {
            Upstream::Mock => {
                let scene = body["scene"].as_str().unwrap_or("");
                let width = body["width"].as_u64().unwrap_or(430) as u32;
                return Ok(ApiReply::Ok(WxaCode {
                    content_type: "image/png",
                    bytes: mock_code_png(scene, width),
                }));
            }
            Upstream::Http(http) => http.post(
                "/wxa/getwxacodeunlimit",
                &format!("access_token={}", encode(token)),
                body,
                time_left.min(self.timeout),
                MAX_IMAGE_BYTES,
            )?,
        };
        if let Some(content_type) = image_type(&bytes) {
            return Ok(ApiReply::Ok(WxaCode {
                content_type,
                bytes,
            }));
        }
        let reply: Value = match serde_json::from_slice(&bytes) {
            Ok(value @ Value::Object(_)) => value,
            _ => {
                return Err(WeChatError::Malformed(
                    "getwxacodeunlimit: neither a PNG or JPEG image nor a JSON object".into(),
                )
                .into())
            }
        };
        match errcode_of(&reply) {
            // An errcode-less object is not an image either.
            0 => {
                Err(WeChatError::Malformed("getwxacodeunlimit: JSON without errcode".into()).into())
            }
            // The daily quota of codes: WeChat's frequency limit, as 45011 is.
            45009 => Err(WeChatError::RateLimited.into()),
            41030 => Err(WxApiError::CodePageInvalid),
            code if TOKEN_ERRCODES.contains(&code) => Ok(ApiReply::TokenInvalid),
            code => Err(api_error(code)),
        }
    }
}

/// An image's type from its signature: PNG or JPEG, the two WeChat sends.
fn image_type(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else {
        None
    }
}

/// The built-in mock's mini-program code: a grayscale PNG of about `width` pixels
/// holding `scene` as a QR code (a real WeChat code is a round "sun" code that
/// only WeChat reads; a QR code lets a browser test and a person check it).
pub fn mock_code_png(scene: &str, width: u32) -> Vec<u8> {
    let code = qrcode::QrCode::new(scene.as_bytes())
        .or_else(|_| qrcode::QrCode::new(b"wxauth"))
        .expect("a short text always fits a QR code");
    let modules = code.width();
    let quiet = 4;
    let side = modules + 2 * quiet;
    let scale = (width as usize / side).clamp(1, 32);
    let pixels = side * scale;
    let colors = code.to_colors();
    let mut image = vec![255u8; pixels * pixels];
    for y in 0..modules {
        for x in 0..modules {
            if colors[y * modules + x] == qrcode::Color::Dark {
                for dy in 0..scale {
                    let row = (y + quiet) * scale + dy;
                    let start = row * pixels + (x + quiet) * scale;
                    image[start..start + scale].fill(0);
                }
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, pixels as u32, pixels as u32);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder
            .write_header()
            .expect("writing a PNG to memory cannot fail");
        writer
            .write_image_data(&image)
            .expect("writing a PNG to memory cannot fail");
    }
    out
}

/// The built-in mock: `name.anything` gives a mainland number derived from `name`;
/// anything else is 40029.
fn mock_phone(code: &str) -> Result<ApiReply<PhoneNumber>, WxApiError> {
    match code.split_once('.') {
        Some((name, _)) if !name.is_empty() => {
            let pure = format!("138{:08}", mock_hash(name) % 100_000_000);
            Ok(ApiReply::Ok(PhoneNumber {
                phone_number: pure.clone(),
                pure_phone_number: pure,
                country_code: "86".into(),
            }))
        }
        _ => Err(WxApiError::PhoneCodeInvalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn country_code_is_read_as_a_number_or_a_string() {
        for reply in [
            json!({"errcode":0,"phone_info":{"phoneNumber":"13800138000","purePhoneNumber":"13800138000","countryCode":86}}),
            json!({"errcode":0,"phone_info":{"phoneNumber":"13800138000","purePhoneNumber":"13800138000","countryCode":"86"}}),
        ] {
            let phone = phone_from_reply(&reply).unwrap();
            assert_eq!(phone.country_code, "86");
            assert_eq!(phone.pure_phone_number, "13800138000");
        }
        let bad = json!({"errcode":0,"phone_info":{"phoneNumber":"<script>","purePhoneNumber":"1","countryCode":"86"}});
        assert!(phone_from_reply(&bad).is_err());
    }

    #[test]
    fn forced_refreshes_are_20_a_day_and_30_seconds_apart() {
        let now = 10 * DAY_MS;
        assert_eq!(forced_refresh_wait_ms(&[], now), 0);
        assert_eq!(forced_refresh_wait_ms(&[now - 10_000], now), 20_000);
        assert_eq!(forced_refresh_wait_ms(&[now - 30_000], now), 0);
        // 20 in the last day, a minute apart: the next one when the first is a day old.
        let twenty: Vec<i64> = (1..=20).map(|i| now - i * 60_000).collect();
        assert_eq!(forced_refresh_wait_ms(&twenty, now), DAY_MS - 20 * 60_000);
        // 19 in the last day (one older than a day): allowed.
        let mut nineteen = twenty.clone();
        nineteen[19] = now - DAY_MS - 1;
        assert_eq!(forced_refresh_wait_ms(&nineteen, now), 0);
    }

    #[test]
    fn a_phone_number_never_prints() {
        let phone = PhoneNumber {
            phone_number: "13800138000".into(),
            pure_phone_number: "13800138000".into(),
            country_code: "86".into(),
        };
        assert!(!format!("{phone:?}").contains("138"));
    }

    #[test]
    fn the_mock_code_is_a_png_of_about_the_width_asked() {
        let png = mock_code_png("0123456789abcdef0123456789abcdef", 430);
        assert_eq!(image_type(&png), Some("image/png"));
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let info = decoder.read_info().unwrap().info().clone();
        assert_eq!(info.width, info.height);
        assert!((300..=430).contains(&info.width), "{}", info.width);
    }

    #[test]
    fn the_mock_gives_one_number_per_name() {
        let number = |code: &str| match mock_phone(code) {
            Ok(ApiReply::Ok(p)) => p.pure_phone_number,
            _ => panic!("refused {code}"),
        };
        assert_eq!(number("alice.1"), number("alice.2"));
        assert_ne!(number("alice.1"), number("bob.1"));
        assert!(matches!(
            mock_phone("nodot"),
            Err(WxApiError::PhoneCodeInvalid)
        ));
    }
}
