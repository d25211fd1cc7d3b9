//! The token issuer: the owner of the family operations (`storage::model`).
//! Rotation, logout, reuse detection and the purge are asked of the store here, one
//! message at a time: with sled that serializes them (two racing refreshes of one
//! token cannot both rotate it); with a database, the conditional write decides.
//! A login's new family is started by the user registry, in the login itself.

use crate::config::JwtConfig;
use crate::metrics::Metrics;
use crate::ratelimit::KeyedLimiter;
use crate::storage::model::{AuthStore, FamilyId, RotateOutcome, RotateRequest};
use crate::storage::{ReadStore, StorageError};
use crate::tokens::check::{self, Accept, CheckError, RefreshStanding, Refusal};
use crate::tokens::{JwtKeys, TokenError};
use crate::users::cache::UserCache;
use crate::users::UserId;
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
    /// The registry's cache of decoded users, read by the token check (an empty
    /// one, reading the store every time, until [`with_user_cache`](Self::with_user_cache)).
    users: Arc<UserCache>,
    /// Refreshes per family (`limits.refresh_per_family_per_minute`).
    family_limit: Option<KeyedLimiter<FamilyId>>,
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

fn refused<T: 'static>(e: impl Into<RefreshError>) -> Answer<T> {
    let e = e.into();
    Box::pin(async move { Err(e) })
}

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
            model,
            reader,
            keys,
            rotate: cfg.rotate_refresh,
            purge_margin: secs_rounded_up(cfg.leeway)
                .saturating_add(secs_rounded_up(cfg.reuse_grace)),
            metrics,
            purge_interval: cfg.purge_interval,
            purging: false,
            users: Arc::new(UserCache::new(0)),
            family_limit: None,
        }
    }

    /// At most `per_minute` refreshes per family (0: no limit), counted after the
    /// token check and before anything is written.
    pub fn with_family_limit(mut self, per_minute: u32) -> Self {
        self.family_limit = (per_minute > 0).then(|| KeyedLimiter::new(per_minute));
        self
    }

    fn count_family_refresh(&self, family: FamilyId) -> Result<(), RefreshError> {
        match &self.family_limit {
            Some(limit) => Ok(limit.check(family)?),
            None => Ok(()),
        }
    }

    /// Reads users through `users` (the registry's cache).
    pub fn with_user_cache(mut self, users: Arc<UserCache>) -> Self {
        self.users = users;
        self
    }

    /// A reuse found: logged, counted, and the family revoked (durably) before the
    /// refusal is answered.
    fn reused<T: 'static>(&self, user_id: UserId, family: FamilyId, now_ms: i64) -> Answer<T> {
        tracing::warn!(
            user_id,
            family = %family.to_hex(),
            "refresh token reused after rotation: revoking its family"
        );
        self.metrics.reuse_detected();
        let revoked = self.model.revoke_family(user_id, family, now_ms);
        Box::pin(async move {
            revoked.await?;
            Err(Refusal::Reused { user_id, family }.into())
        })
    }

    /// The whole check of a refresh token, its family's standing included (read
    /// here). A reuse is answered by revoking the family.
    fn check_standing<T: 'static>(
        &self,
        token: &str,
        now_ms: i64,
    ) -> Result<check::Accepted, Answer<T>> {
        check::check(
            &self.keys,
            self.reader.as_ref(),
            &self.users,
            token,
            Accept::Refresh,
            now_ms,
        )
        .map_err(|e| match e {
            CheckError::Refused(Refusal::Reused { user_id, family }) => {
                self.reused(user_id, family, now_ms)
            }
            e => refused(e),
        })
    }

    /// Refresh: the token and its user are checked here (steps 1 to 9 of the
    /// check); the family's step is the store's compare-and-swap. A retry inside the
    /// grace gets a pair for the family's current generation and writes nothing.
    fn refresh(&mut self, token: &str) -> Answer<Refreshed> {
        let now_ms = crate::clock::now_ms();
        let now = now_ms.div_euclid(1000);
        if !self.rotate {
            // No rotation: the token must count as it is (its family read here).
            let accepted = match self.check_standing(token, now_ms) {
                Ok(accepted) => accepted,
                Err(answer) => return answer,
            };
            let counted = check::refresh_family(self.reader.as_ref(), &accepted.claims)
                .map_err(RefreshError::from)
                .and_then(|(family, _)| self.count_family_refresh(family));
            if let Err(e) = counted {
                return refused(e);
            }
            let (claims, stamp) = (accepted.claims, accepted.user.token_stamp);
            let family = claims.fam.as_deref().and_then(FamilyId::from_hex);
            let access = self
                .keys
                .sign_access(claims.user_id, stamp, family, now)
                .token;
            self.metrics.tokens_issued(1, 0);
            return Box::pin(async move {
                Ok(Refreshed {
                    access,
                    refresh: None,
                })
            });
        }
        let (claims, user) = match check::check_user(
            &self.keys,
            self.reader.as_ref(),
            &self.users,
            token,
            Accept::Refresh,
            now_ms,
        ) {
            Ok(checked) => checked,
            Err(e) => return refused(e),
        };
        let (family, presented) = match check::refresh_family(self.reader.as_ref(), &claims) {
            Ok(found) => found,
            Err(e) => return refused(e),
        };
        if let Err(e) = self.count_family_refresh(family) {
            return refused(e);
        }
        let (user_id, stamp) = (claims.user_id, user.token_stamp);
        let rotation = self.model.rotate(RotateRequest {
            user_id,
            family,
            presented,
            now_ms,
            grace_ms: self.keys.reuse_grace_ms,
            exp: now.saturating_add(self.keys.refresh_ttl),
        });
        let (keys, metrics) = (self.keys.clone(), self.metrics.clone());
        Box::pin(async move {
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
                    metrics.reuse_detected();
                    return Err(Refusal::Reused { user_id, family }.into());
                }
                RotateOutcome::Revoked => return Err(Refusal::FamilyRevoked.into()),
                RotateOutcome::Missing => return Err(Refusal::NotIssued.into()),
                RotateOutcome::Ahead => return Err(TokenError::Invalid.into()),
            };
            let access = keys.sign_access(user_id, stamp, Some(family), now).token;
            let refresh = keys
                .sign_refresh(user_id, stamp, family, generation, now)
                .token;
            metrics.tokens_issued(1, 1);
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
        let accepted = match self.check_standing(token, now_ms) {
            Ok(accepted) => accepted,
            Err(answer) => return answer,
        };
        let (RefreshStanding::Current { family } | RefreshStanding::InGrace { family }) = accepted
            .refresh
            .expect("the check reads the standing of every refresh token");
        let revoked = self.model.revoke_family(family.user_id, family.id, now_ms);
        Box::pin(async move {
            revoked.await?;
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
