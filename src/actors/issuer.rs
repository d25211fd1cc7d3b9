//! The token issuer: signs token pairs and is the only writer of the refresh-token
//! trees. Rotation, logout (blacklist) and reuse detection are decided here, one
//! message at a time, so two racing refreshes of one token cannot both rotate it.

use crate::storage::{GroupCommit, StorageError, Store, Tree, WriteBatch};
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
        rotate: bool,
        reuse_grace: Duration,
    ) -> Self {
        TokenIssuer {
            store,
            keys,
            commit,
            rotate,
            reuse_grace: reuse_grace.as_secs() as i64,
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
                self.revoke_family(&record.family, family, now)?;
                return Err(RefreshError::Token(TokenError::Blacklisted));
            }
        };
        let mut batch = WriteBatch::default();
        self.mark_rotated(&mut batch, &claims.jti, now)?;
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

    /// Deletes refresh records and families whose tokens have all expired.
    fn purge(&mut self) -> Result<usize, StorageError> {
        let now = crate::now_unix();
        let mut purged = 0;
        for tree in [Tree::RefreshTokens, Tree::TokenFamilies] {
            let mut expired: Vec<Vec<u8>> = Vec::new();
            self.store.for_each(tree, &mut |key, value| {
                #[derive(serde::Deserialize)]
                struct Expiry {
                    exp: i64,
                }
                if let Ok(Expiry { exp }) = serde_json::from_slice(value) {
                    if exp < now {
                        expired.push(key.to_vec());
                    }
                }
                ControlFlow::Continue(())
            })?;
            for chunk in expired.chunks(PURGE_BATCH) {
                let mut batch = WriteBatch::default();
                for key in chunk {
                    batch.delete(tree, key.clone());
                }
                self.apply(batch)?;
            }
            purged += expired.len();
        }
        Ok(purged)
    }
}

impl Actor for TokenIssuer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(PURGE_EVERY, |this, _| {
            let result = this.purge();
            this.wrote = false;
            match result {
                Ok(0) => {}
                Ok(n) => tracing::info!(records = n, "purged expired token records"),
                Err(e) => tracing::error!(error = %e, "purging expired token records failed"),
            }
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

/// Remove expired token records now (also runs every ten minutes).
#[derive(Message)]
#[rtype(result = "Result<usize, StorageError>")]
pub struct PurgeExpired;

impl Handler<PurgeExpired> for TokenIssuer {
    type Result = Result<usize, StorageError>;

    fn handle(&mut self, _: PurgeExpired, _: &mut Context<Self>) -> Self::Result {
        // Losing a purge in a crash only means purging again: no need to wait for disk.
        let result = self.purge();
        self.wrote = false;
        result
    }
}
