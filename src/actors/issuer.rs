//! The token issuer: signs token pairs and is the only writer of the refresh-token
//! trees. Rotation, logout (blacklist) and reuse detection are decided here, one
//! message at a time, so two racing refreshes of one token cannot both rotate it.

use crate::config::JwtConfig;
use crate::metrics::Metrics;
use crate::storage::{GroupCommit, ReadStore, StorageError, Store, Tree, WriteBatch};
use crate::tokens::records::{self, Family, RefreshRecord, RefreshState};
use crate::tokens::{JwtKeys, Signed, TokenError, TokenType};
use crate::users::{self, UserId};
use actix::prelude::*;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

/// How often expired refresh tokens and families are removed.
const PURGE_EVERY: Duration = Duration::from_secs(600);
const PURGE_BATCH: usize = 1000;

pub struct TokenIssuer {
    store: Arc<dyn Store>,
    keys: Arc<JwtKeys>,
    commit: GroupCommit,
    rotate: bool,
    reuse_grace: i64,
    leeway: i64,
    metrics: Arc<Metrics>,
    /// Set by [`apply`](Self::apply): the message being handled wrote, so its
    /// answer waits for the group commit (even when the answer is an error,
    /// as when a reuse revoked a family).
    wrote: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("no active account for this token")]
    NoActiveAccount,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl TokenIssuer {
    pub fn new(
        store: Arc<dyn Store>,
        keys: Arc<JwtKeys>,
        commit: GroupCommit,
        cfg: &JwtConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        TokenIssuer {
            store,
            keys,
            commit,
            rotate: cfg.rotate_refresh,
            reuse_grace: cfg.reuse_grace.as_secs() as i64,
            leeway: cfg.leeway.as_secs() as i64,
            metrics,
            wrote: false,
        }
    }

    fn apply(&mut self, batch: WriteBatch) -> Result<(), StorageError> {
        self.wrote = true;
        self.store.apply(batch)
    }

    /// Wraps a handler's result so that it resolves only once its writes are durable.
    fn answer<T: 'static>(
        &mut self,
        result: Result<T, RefreshError>,
    ) -> ResponseFuture<Result<T, RefreshError>> {
        let commit = std::mem::take(&mut self.wrote).then(|| self.commit.clone());
        Box::pin(async move {
            if let Some(commit) = commit {
                commit.durable().await?;
            }
            result
        })
    }

    /// Signs a refresh token into `family` and queues its record in `batch`.
    fn add_refresh(
        &self,
        batch: &mut WriteBatch,
        family_id: &str,
        family: &mut Family,
        user_id: UserId,
        now: i64,
    ) -> Signed {
        let refresh = self.keys.sign(TokenType::Refresh, user_id, now);
        let record = RefreshRecord {
            family: family_id.to_string(),
            user_id,
            exp: refresh.claims.exp,
            rotated_at: None,
        };
        batch.put(
            Tree::RefreshTokens,
            refresh.claims.jti.as_bytes(),
            records::encode(&record),
        );
        family.current = refresh.claims.jti.clone();
        family.exp = family.exp.max(refresh.claims.exp);
        refresh
    }

    fn mark_rotated(
        &self,
        batch: &mut WriteBatch,
        jti: &str,
        now: i64,
    ) -> Result<(), StorageError> {
        if let Some(mut record) = records::load_refresh(self.store.as_ref(), jti)? {
            if record.rotated_at.is_none() {
                record.rotated_at = Some(now);
                batch.put(
                    Tree::RefreshTokens,
                    jti.as_bytes(),
                    records::encode(&record),
                );
            }
        }
        Ok(())
    }

    fn revoke_family(
        &mut self,
        family_id: &str,
        mut family: Family,
        now: i64,
    ) -> Result<(), StorageError> {
        family.revoked_at = Some(now);
        let mut batch = WriteBatch::default();
        batch.put(
            Tree::TokenFamilies,
            family_id.as_bytes(),
            records::encode(&family),
        );
        self.apply(batch)
    }

    /// Verifies a refresh token against the store: signature, expiry, type,
    /// the user's state, and whether its family is still alive.
    fn check_refresh(
        &self,
        token: &str,
    ) -> Result<(crate::tokens::Claims, RefreshState), RefreshError> {
        let claims = self.keys.verify(token, TokenType::Refresh)?;
        let store = self.store.as_ref();
        let user = match users::load(store, claims.user_id)? {
            Some(user) if !user.disabled => user,
            _ => return Err(RefreshError::NoActiveAccount),
        };
        let state = records::refresh_state(store, &claims, user.tokens_not_before)??;
        Ok((claims, state))
    }

    fn refresh(&mut self, token: &str) -> Result<Refreshed, RefreshError> {
        let (claims, state) = self.check_refresh(token)?;
        let now = crate::now_unix();
        let access = self.keys.sign(TokenType::Access, claims.user_id, now).token;
        if !self.rotate {
            self.metrics.tokens_issued(1, 0);
            return Ok(Refreshed {
                access,
                refresh: None,
            });
        }
        let (record, mut family) = match state {
            RefreshState::Current(record, family) => (record, family),
            RefreshState::RotatedOut(record, family, at) if now - at <= self.reuse_grace => {
                // A retry of a refresh whose answer was lost: a fresh pair, and the
                // token handed out in between is rotated out too.
                (record, family)
            }
            RefreshState::RotatedOut(record, family, _) => {
                tracing::warn!(
                    user_id = claims.user_id,
                    family = %record.family,
                    "refresh token reused after rotation: revoking its family"
                );
                self.metrics.reuse_detected();
                self.revoke_family(&record.family, family, now)?;
                return Err(RefreshError::Token(TokenError::Blacklisted));
            }
        };
        let mut batch = WriteBatch::default();
        // The presented token's record is in hand already; only the family's
        // current one (a grace-period retry) needs reading.
        if record.rotated_at.is_none() {
            let rotated = RefreshRecord {
                rotated_at: Some(now),
                ..record.clone()
            };
            batch.put(
                Tree::RefreshTokens,
                claims.jti.as_bytes(),
                records::encode(&rotated),
            );
        }
        if family.current != claims.jti {
            let current = family.current.clone();
            self.mark_rotated(&mut batch, &current, now)?;
        }
        let refresh =
            self.add_refresh(&mut batch, &record.family, &mut family, claims.user_id, now);
        batch.put(
            Tree::TokenFamilies,
            record.family.as_bytes(),
            records::encode(&family),
        );
        self.apply(batch)?;
        self.metrics.tokens_issued(1, 1);
        Ok(Refreshed {
            access,
            refresh: Some(refresh.token),
        })
    }

    fn blacklist(&mut self, token: &str) -> Result<(), RefreshError> {
        let claims = self.keys.verify(token, TokenType::Refresh)?;
        let store = self.store.as_ref();
        let not_before = users::load(store, claims.user_id)?.map_or(0, |u| u.tokens_not_before);
        let now = crate::now_unix();
        match records::refresh_state(store, &claims, not_before)?? {
            RefreshState::Current(record, family) => {
                self.revoke_family(&record.family, family, now)?
            }
            RefreshState::RotatedOut(record, family, at) => {
                self.revoke_family(&record.family, family, now)?;
                if now - at > self.reuse_grace {
                    self.metrics.reuse_detected();
                    tracing::warn!(
                        user_id = claims.user_id,
                        "rotated-out refresh token presented for logout"
                    );
                    return Err(TokenError::Blacklisted.into());
                }
            }
        }
        Ok(())
    }

    /// Deletes records found expired by [`expired_records`] (run off this thread).
    /// Losing a purge in a crash only means purging again: no wait for the disk.
    fn delete_expired(&mut self, expired: Vec<(Tree, Vec<u8>)>) -> Result<usize, StorageError> {
        for chunk in expired.chunks(PURGE_BATCH) {
            let mut batch = WriteBatch::default();
            for (tree, key) in chunk {
                batch.delete(*tree, key.clone());
            }
            self.store.apply(batch)?;
        }
        Ok(expired.len())
    }
}

/// Refresh records and families whose every token expired before `cutoff`.
/// A read-only scan: it runs on a blocking thread so that the actor keeps serving.
fn expired_records(
    store: &dyn ReadStore,
    cutoff: i64,
) -> Result<Vec<(Tree, Vec<u8>)>, StorageError> {
    #[derive(serde::Deserialize)]
    struct Expiry {
        exp: i64,
    }
    let mut expired = Vec::new();
    for tree in [Tree::RefreshTokens, Tree::TokenFamilies] {
        store.for_each(tree, &mut |key, value| {
            if let Ok(Expiry { exp }) = serde_json::from_slice(value) {
                if exp < cutoff {
                    expired.push((tree, key.to_vec()));
                }
            }
            ControlFlow::Continue(())
        })?;
    }
    Ok(expired)
}

impl Actor for TokenIssuer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(PURGE_EVERY, |this, ctx| {
            let store = this.store.clone();
            // A token still inside the leeway verifies, so its record must stay.
            let cutoff = crate::now_unix() - this.leeway;
            let scan = actix_web::rt::task::spawn_blocking(move || {
                expired_records(store.as_ref(), cutoff)
            });
            ctx.spawn(scan.into_actor(this).map(|scanned, this, _| {
                let result = match scanned {
                    Ok(Ok(expired)) => this.delete_expired(expired),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(StorageError::Io(format!("purge scan: {e}"))),
                };
                match result {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(records = n, "purged expired token records"),
                    Err(e) => tracing::error!(error = %e, "purging expired token records failed"),
                }
            }));
        });
    }
}

pub struct TokenPair {
    pub access: Signed,
    pub refresh: Signed,
}

/// Start a new login family for `user_id`: an access token and a refresh token.
/// Durable on return (this is the last write of a login).
#[derive(Message)]
#[rtype(result = "Result<TokenPair, StorageError>")]
pub struct IssuePair {
    pub user_id: UserId,
}

impl Handler<IssuePair> for TokenIssuer {
    type Result = ResponseFuture<Result<TokenPair, StorageError>>;

    fn handle(&mut self, msg: IssuePair, _: &mut Context<Self>) -> Self::Result {
        debug_fault();
        let now = crate::now_unix();
        let family_id = crate::random_hex(16);
        let mut family = Family {
            user_id: msg.user_id,
            created_at: now,
            exp: now,
            current: String::new(),
            revoked_at: None,
        };
        let mut batch = WriteBatch::default();
        let refresh = self.add_refresh(&mut batch, &family_id, &mut family, msg.user_id, now);
        batch.put(
            Tree::TokenFamilies,
            family_id.as_bytes(),
            records::encode(&family),
        );
        let access = self.keys.sign(TokenType::Access, msg.user_id, now);
        self.metrics.tokens_issued(1, 1);
        let applied = self.store.apply(batch);
        self.wrote = false;
        let commit = self.commit.clone();
        // Always waits: this commit also covers the user registry's writes for the login.
        Box::pin(async move {
            applied?;
            commit.durable().await?;
            Ok(TokenPair { access, refresh })
        })
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
}

impl Handler<Refresh> for TokenIssuer {
    type Result = ResponseFuture<Result<Refreshed, RefreshError>>;

    fn handle(&mut self, msg: Refresh, _: &mut Context<Self>) -> Self::Result {
        debug_fault();
        let result = self.refresh(&msg.token);
        self.answer(result)
    }
}

/// POST /api/token/blacklist/ (logout): revoke the token's family. Durable on return.
#[derive(Message)]
#[rtype(result = "Result<(), RefreshError>")]
pub struct Blacklist {
    pub token: String,
}

impl Handler<Blacklist> for TokenIssuer {
    type Result = ResponseFuture<Result<(), RefreshError>>;

    fn handle(&mut self, msg: Blacklist, _: &mut Context<Self>) -> Self::Result {
        let result = self.blacklist(&msg.token);
        self.answer(result)
    }
}

/// Operator: revoke every refresh-token family of a user. Durable on return.
#[derive(Message)]
#[rtype(result = "Result<usize, StorageError>")]
pub struct RevokeUserFamilies {
    pub user_id: UserId,
}

impl Handler<RevokeUserFamilies> for TokenIssuer {
    type Result = ResponseFuture<Result<usize, StorageError>>;

    fn handle(&mut self, msg: RevokeUserFamilies, _: &mut Context<Self>) -> Self::Result {
        let result =
            records::revoke_user_families(self.store.as_ref(), msg.user_id, crate::now_unix());
        let commit = self.commit.clone();
        Box::pin(async move {
            let revoked = result?;
            commit.durable().await?;
            Ok(revoked)
        })
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
/// `WXAUTH_DEBUG_FAULT=issuer_panic` the issuer panics on its next IssuePair or
/// Refresh; with `issuer_stall` it blocks for 30 s on each (a stuck owner actor).
fn debug_fault() {
    #[cfg(debug_assertions)]
    match std::env::var("WXAUTH_DEBUG_FAULT").as_deref() {
        Ok("issuer_panic") => panic!("debug fault: issuer_panic"),
        Ok("issuer_stall") => std::thread::sleep(std::time::Duration::from_secs(30)),
        _ => {}
    }
}
