//! The token issuer: the owner of the family operations (`storage::model`).
//! Rotation, logout, reuse detection and the purge are asked of the store here, on
//! this actor's one thread: with sled that serializes them (two racing refreshes of
//! one token cannot both rotate it); with a database, the conditional write decides.
//! A message's answer is a future: the token check's reads (a user missing from the
//! cache, a family) are awaited in it, so with PostgreSQL the thread never waits for
//! the database and goes on with the next message meanwhile.
//! A login's new family is started by the user registry, in the login itself.

use crate::config::JwtConfig;
use crate::metrics::Metrics;
use crate::ratelimit::KeyedLimiter;
use crate::storage::model::{AuthStore, FamilyId, RotateOutcome, RotateRequest};
use crate::storage::{ReadStore, StorageError};
use crate::tokens::check::{self, Accept, CheckError, RefreshStanding, Refusal};
use crate::tokens::{JwtKeys, TokenError};
use crate::users::cache::UserCache;
use actix::prelude::*;
use std::sync::Arc;
use std::time::Duration;

/// Records looked at per step of the expired-record purge: each step takes one
/// actor turn, so a login or refresh waits behind one step at most.
const PURGE_CHUNK: usize = 250;
/// The actor's rest between two purge steps: the purge is background work, and
/// without a rest it would take most of the actor's time (and the fsyncs' bandwidth)
/// while it runs. 1,000,000 records take about a minute.
const PURGE_PAUSE: Duration = Duration::from_millis(10);

pub struct TokenIssuer {
    model: Arc<dyn AuthStore>,
    /// The token check's reads (users on a cache miss, families, legacy records).
    reader: Arc<dyn ReadStore>,
    keys: Arc<JwtKeys>,
    rotate: bool,
    /// `jwt.leeway` plus `jwt.reuse_grace`, in whole seconds rounded up (for the
    /// purge: a token still inside the leeway verifies, and a retry inside the
    /// grace is answered with a token that expires up to the grace later than its
    /// family, so the family must stay that long).
    purge_margin: i64,
    metrics: Arc<Metrics>,
    /// How often expired records are purged (`jwt.purge_interval`).
    purge_interval: Duration,
    /// A purge is under way (it spans many actor turns); the next waits for it.
    purging: bool,
    /// The token check's reads: users through the registry's cache (an empty one,
    /// reading the store every time, until [`with_user_cache`](Self::with_user_cache)),
    /// families from the store, both awaited in the answer's future.
    reads: check::Reads,
    /// Refreshes per family (`limits.refresh_per_family_per_minute`).
    family_limit: Option<Arc<KeyedLimiter<FamilyId>>>,
}

/// Why refresh or logout did not succeed: the check's refusal, storage, or (refresh)
/// the family's rate limit.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The token's family was refreshed `limits.refresh_per_family_per_minute` times
    /// this minute.
    #[error(transparent)]
    RateLimited(#[from] crate::ratelimit::Limited),
}

impl From<CheckError> for RefreshError {
    fn from(e: CheckError) -> Self {
        match e {
            CheckError::Refused(refusal) => RefreshError::Refused(refusal),
            CheckError::Storage(e) => RefreshError::Storage(e),
        }
    }
}

impl From<TokenError> for RefreshError {
    fn from(e: TokenError) -> Self {
        RefreshError::Refused(Refusal::Token(e))
    }
}

type Answer<T> = ResponseFuture<Result<T, RefreshError>>;

fn secs_rounded_up(d: Duration) -> i64 {
    i64::try_from(d.as_secs())
        .unwrap_or(i64::MAX)
        .saturating_add(i64::from(d.subsec_nanos() > 0))
}

impl TokenIssuer {
    pub fn new(
        model: Arc<dyn AuthStore>,
        reader: Arc<dyn ReadStore>,
        keys: Arc<JwtKeys>,
        cfg: &JwtConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        TokenIssuer {
            model: model.clone(),
            reader: reader.clone(),
            keys,
            rotate: cfg.rotate_refresh,
            purge_margin: secs_rounded_up(cfg.leeway)
                .saturating_add(secs_rounded_up(cfg.reuse_grace)),
            metrics,
            purge_interval: cfg.purge_interval,
            purging: false,
            reads: check::Reads {
                model: model.clone(),
                store: reader.clone(),
                users: Arc::new(UserCache::new(0)),
            },
            family_limit: None,
        }
    }

    /// At most `per_minute` refreshes per family (0: no limit), counted after the
    /// token check and before anything is written.
    pub fn with_family_limit(mut self, per_minute: u32) -> Self {
        self.family_limit = (per_minute > 0).then(|| Arc::new(KeyedLimiter::new(per_minute)));
        self
    }

    /// Reads users through `users` (the registry's cache).
    pub fn with_user_cache(mut self, users: Arc<UserCache>) -> Self {
        self.reads.users = users;
        self
    }

    /// What an answer's future needs from the issuer.
    fn parts(&self) -> Parts {
        Parts {
            model: self.model.clone(),
            reader: self.reader.clone(),
            keys: self.keys.clone(),
            metrics: self.metrics.clone(),
            family_limit: self.family_limit.clone(),
        }
    }

    /// Refresh: the token and its user are checked (steps 1 to 9 of the check; the
    /// user read from the store on a cache miss, awaited); the family's step is the
    /// store's compare-and-swap. A retry inside the grace gets a pair for the
    /// family's current generation and writes nothing. Everything after the token's
    /// own checks runs in the answer's future, on this actor's thread: the store's
    /// operations are still called one at a time (sled decides each synchronously
    /// when it is called).
    fn refresh(&mut self, token: &str) -> Answer<Refreshed> {
        let now_ms = crate::clock::now_ms();
        let now = now_ms.div_euclid(1000);
        let parts = self.parts();
        if !self.rotate {
            // No rotation: the token must count as it is (its family read too).
            let checked = check::check(&self.keys, &self.reads, token, Accept::Refresh, now_ms);
            return Box::pin(async move {
                let accepted = match checked.await {
                    Ok(accepted) => accepted,
                    Err(e) => return Err(parts.refused(e, now_ms).await),
                };
                let (family, _) = check::refresh_family(parts.reader.as_ref(), &accepted.claims)?;
                parts.count_family_refresh(family)?;
                let (claims, stamp) = (accepted.claims, accepted.user.token_stamp);
                let family = claims.fam.as_deref().and_then(FamilyId::from_hex);
                let access = parts
                    .keys
                    .sign_access(claims.user_id, stamp, family, now)
                    .token;
                parts.metrics.tokens_issued(1, 0);
                Ok(Refreshed {
                    access,
                    refresh: None,
                })
            });
        }
        let checked = check::check_user(&self.keys, &self.reads, token, Accept::Refresh, now_ms);
        Box::pin(async move {
            let (claims, user) = checked.await?;
            let (family, presented) = check::refresh_family(parts.reader.as_ref(), &claims)?;
            parts.count_family_refresh(family)?;
            let (user_id, stamp) = (claims.user_id, user.token_stamp);
            let rotation = parts.model.rotate(RotateRequest {
                user_id,
                family,
                presented,
                now_ms,
                grace_ms: parts.keys.reuse_grace_ms,
                exp: now.saturating_add(parts.keys.refresh_ttl),
            });
            let generation = match rotation.await? {
                RotateOutcome::Rotated { generation } | RotateOutcome::Retry { generation } => {
                    generation
                }
                RotateOutcome::Reused => {
                    tracing::warn!(
                        user_id,
                        family = %family.to_hex(),
                        "refresh token reused after rotation: revoked its family"
                    );
                    parts.metrics.reuse_detected();
                    return Err(Refusal::Reused { user_id, family }.into());
                }
                RotateOutcome::Revoked => return Err(Refusal::FamilyRevoked.into()),
                RotateOutcome::Missing => return Err(Refusal::NotIssued.into()),
                RotateOutcome::Ahead => return Err(TokenError::Invalid.into()),
            };
            let access = parts
                .keys
                .sign_access(user_id, stamp, Some(family), now)
                .token;
            let refresh = parts
                .keys
                .sign_refresh(user_id, stamp, family, generation, now)
                .token;
            parts.metrics.tokens_issued(1, 1);
            Ok(Refreshed {
                access,
                refresh: Some(refresh),
            })
        })
    }

    /// Logout: the family of a token the check accepts is revoked. A rotated-out token
    /// within the grace logs out too; past the grace it is a reuse (family revoked,
    /// 401). A token the check refuses otherwise changes nothing.
    fn blacklist(&mut self, token: &str) -> Answer<()> {
        let now_ms = crate::clock::now_ms();
        let checked = check::check(&self.keys, &self.reads, token, Accept::Refresh, now_ms);
        let parts = self.parts();
        Box::pin(async move {
            let accepted = match checked.await {
                Ok(accepted) => accepted,
                Err(e) => return Err(parts.refused(e, now_ms).await),
            };
            let (RefreshStanding::Current { family } | RefreshStanding::InGrace { family }) =
                accepted
                    .refresh
                    .expect("the check reads the standing of every refresh token");
            parts
                .model
                .revoke_family(family.user_id, family.id, now_ms)
                .await?;
            Ok(())
        })
    }

    /// One step of the purge, in one actor turn; the next after a rest. Losing a
    /// purge in a crash only means purging again: no wait for the disk.
    fn purge_step(&mut self, ctx: &mut Context<Self>, step: PurgeStep) {
        let progress = self
            .model
            .purge_expired(step.cutoff, step.from.clone(), PURGE_CHUNK);
        ctx.spawn(progress.into_actor(self).map(move |progress, this, ctx| {
            let progress = match progress {
                Ok(progress) => progress,
                Err(e) => {
                    this.purging = false;
                    tracing::error!(error = %crate::cause::cause_chain(&e), "purging expired token records failed");
                    return;
                }
            };
            let purged = step.purged + progress.deleted;
            match progress.next {
                Some(from) => {
                    let next = PurgeStep {
                        from: Some(from),
                        purged,
                        ..step
                    };
                    ctx.run_later(PURGE_PAUSE, move |this, ctx| this.purge_step(ctx, next));
                }
                None => {
                    this.purging = false;
                    if purged > 0 {
                        tracing::info!(
                            records = purged,
                            took_ms = step.started.elapsed().as_millis() as u64,
                            "purged expired token records"
                        );
                    }
                }
            }
        }));
    }
}

/// The shared handles an answer's future holds.
struct Parts {
    model: Arc<dyn AuthStore>,
    reader: Arc<dyn ReadStore>,
    keys: Arc<JwtKeys>,
    metrics: Arc<Metrics>,
    family_limit: Option<Arc<KeyedLimiter<FamilyId>>>,
}

impl Parts {
    /// Refreshes per family, counted after the token check and before any write.
    fn count_family_refresh(&self, family: FamilyId) -> Result<(), RefreshError> {
        match &self.family_limit {
            Some(limit) => Ok(limit.check(family)?),
            None => Ok(()),
        }
    }

    /// The check's refusal as the answer; a reuse it found is logged, counted, and
    /// its family revoked (durably) before the refusal is answered.
    async fn refused(&self, e: CheckError, now_ms: i64) -> RefreshError {
        let CheckError::Refused(Refusal::Reused { user_id, family }) = e else {
            return e.into();
        };
        tracing::warn!(
            user_id,
            family = %family.to_hex(),
            "refresh token reused after rotation: revoking its family"
        );
        self.metrics.reuse_detected();
        if let Err(e) = self.model.revoke_family(user_id, family, now_ms).await {
            return e.into();
        }
        Refusal::Reused { user_id, family }.into()
    }
}

/// Where a purge is: where its next step starts, the cutoff it was started with,
/// and how many records it has deleted so far.
#[derive(Clone)]
struct PurgeStep {
    from: Option<Vec<u8>>,
    cutoff: i64,
    purged: usize,
    started: std::time::Instant,
}

impl Actor for TokenIssuer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.purge_interval, |this, ctx| {
            if std::mem::replace(&mut this.purging, true) {
                return; // the last purge is still going
            }
            let step = PurgeStep {
                from: None,
                cutoff: crate::clock::now_unix() - this.purge_margin,
                purged: 0,
                started: std::time::Instant::now(),
            };
            this.purge_step(ctx, step);
        });
    }
}

pub struct Refreshed {
    pub access: String,
    /// The rotated refresh token; `None` when `jwt.rotate_refresh` is off.
    pub refresh: Option<String>,
}

/// POST /api/token/refresh/. Durable on return.
#[derive(Message)]
#[rtype(result = "Result<Refreshed, RefreshError>")]
pub struct Refresh {
    pub token: String,
    /// The request's span (its request id): the handler's log lines carry it.
    pub span: tracing::Span,
}

impl Handler<Refresh> for TokenIssuer {
    type Result = ResponseFuture<Result<Refreshed, RefreshError>>;

    fn handle(&mut self, msg: Refresh, _: &mut Context<Self>) -> Self::Result {
        let _request = msg.span.clone().entered();
        debug_fault();
        self.refresh(&msg.token)
    }
}

/// POST /api/token/blacklist/ (logout): revoke the token's family. Durable on return.
#[derive(Message)]
#[rtype(result = "Result<(), RefreshError>")]
pub struct Blacklist {
    pub token: String,
    /// The request's span (its request id): the handler's log lines carry it.
    pub span: tracing::Span,
}

impl Handler<Blacklist> for TokenIssuer {
    type Result = ResponseFuture<Result<(), RefreshError>>;

    fn handle(&mut self, msg: Blacklist, _: &mut Context<Self>) -> Self::Result {
        let _request = msg.span.clone().entered();
        self.blacklist(&msg.token)
    }
}

/// Ends one session (`DELETE /api/weixin/sessions/{id}/`): revokes the family.
/// `true`: it was live and is revoked now (durable on return).
#[derive(Message)]
#[rtype(result = "Result<bool, crate::storage::StorageError>")]
pub struct RevokeFamily {
    pub user_id: crate::users::UserId,
    pub family: crate::storage::model::FamilyId,
}

impl Handler<RevokeFamily> for TokenIssuer {
    type Result = ResponseFuture<Result<bool, crate::storage::StorageError>>;

    fn handle(&mut self, msg: RevokeFamily, _: &mut Context<Self>) -> Self::Result {
        self.model
            .revoke_family(msg.user_id, msg.family, crate::clock::now_ms())
    }
}

/// Logs out everywhere (`POST /api/weixin/sessions/logout-all/`): revokes every
/// live family of the user; the number revoked (durable on return).
#[derive(Message)]
#[rtype(result = "Result<usize, crate::storage::StorageError>")]
pub struct RevokeAllFamilies {
    pub user_id: crate::users::UserId,
}

impl Handler<RevokeAllFamilies> for TokenIssuer {
    type Result = ResponseFuture<Result<usize, crate::storage::StorageError>>;

    fn handle(&mut self, msg: RevokeAllFamilies, _: &mut Context<Self>) -> Self::Result {
        self.model
            .revoke_families(msg.user_id, crate::clock::now_ms())
    }
}

/// Readiness probe: answered only while the issuer is alive and serves its mailbox.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Probe;

impl Handler<Probe> for TokenIssuer {
    type Result = ();

    fn handle(&mut self, _: Probe, _: &mut Context<Self>) {}
}

/// Fault injection for tests, compiled into debug builds only: with
/// `WXAUTH_DEBUG_FAULT=issuer_panic` the issuer panics on its next `Refresh`; with
/// `issuer_stall` it blocks for 30 s on each (a stuck owner actor).
fn debug_fault() {
    #[cfg(debug_assertions)]
    match std::env::var("WXAUTH_DEBUG_FAULT").as_deref() {
        Ok("issuer_panic") => panic!("debug fault: issuer_panic"),
        Ok("issuer_stall") => std::thread::sleep(std::time::Duration::from_secs(30)),
        _ => {}
    }
}
