//! The token issuer: the only writer of existing refresh records and families
//! (a login's new family is written by the user registry, in the login's batch; see
//! `tokens::issue`). Rotation, logout (blacklist), reuse detection and the purge are
//! decided here, one message at a time, so two racing refreshes of one token cannot
//! both rotate it.

use crate::config::JwtConfig;
use crate::metrics::Metrics;
use crate::ratelimit::KeyedLimiter;
use crate::storage::{GroupCommit, ReadStore, ScannedKeys, StorageError, Store, Tree, WriteBatch};
use crate::tokens::check::{self, Accept, CheckError, RefreshStanding, Refusal};
use crate::tokens::records::{self, Family, RefreshRecord};
use crate::tokens::{issue, JwtKeys, TokenType};
use crate::users::cache::UserCache;
use crate::users::UserId;
use actix::prelude::*;
use std::sync::Arc;
use std::time::Duration;

/// Records looked at per step of the expired-record purge: each step's scan runs
/// off the actor, and its deletes (at most this many) take one actor turn, so a
/// login or refresh waits behind one step at most.
const PURGE_CHUNK: usize = 250;
/// The actor's rest between two purge steps: the purge is background work, and
/// without a rest it would take most of the actor's time (and the fsyncs' bandwidth)
/// while it runs. 1,000,000 records take about a minute.
const PURGE_PAUSE: Duration = Duration::from_millis(10);

pub struct TokenIssuer {
    store: Arc<dyn Store>,
    keys: Arc<JwtKeys>,
    commit: GroupCommit,
    rotate: bool,
    /// `jwt.leeway` in whole seconds, rounded up (for the purge: a token still inside
    /// the leeway verifies, so its record must stay).
    leeway: i64,
    metrics: Arc<Metrics>,
    /// How often expired records are purged (`jwt.purge_interval`).
    purge_interval: Duration,
    /// A purge is under way (it spans many actor turns); the next waits for it.
    purging: bool,
    /// The registry's cache of decoded users, read by the token check (an empty
    /// one, reading the store every time, until [`with_user_cache`](Self::with_user_cache)).
    users: Arc<UserCache>,
    /// Batches applied so far (only counts up). [`answer_durably`](Self::answer_durably)
    /// compares it before and after a message's work to know whether it wrote.
    batches_applied: u64,
    /// Refreshes per family (`limits.refresh_per_family_per_minute`).
    family_limit: Option<KeyedLimiter<String>>,
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
            leeway: i64::try_from(cfg.leeway.as_secs())
                .unwrap_or(i64::MAX)
                .saturating_add(i64::from(cfg.leeway.subsec_nanos() > 0)),
            metrics,
            purge_interval: cfg.purge_interval,
            purging: false,
            users: Arc::new(UserCache::new(0)),
            batches_applied: 0,
            family_limit: None,
        }
    }

    /// At most `per_minute` refreshes per family (0: no limit), counted before
    /// anything is written.
    pub fn with_family_limit(mut self, per_minute: u32) -> Self {
        self.family_limit = (per_minute > 0).then(|| KeyedLimiter::new(per_minute));
        self
    }

    /// Reads users through `users` (the registry's [`UserRegistry::user_cache`]).
    ///
    /// [`UserRegistry::user_cache`]: crate::actors::registry::UserRegistry::user_cache
    pub fn with_user_cache(mut self, users: Arc<UserCache>) -> Self {
        self.users = users;
        self
    }

    fn apply(&mut self, batch: WriteBatch) -> Result<(), StorageError> {
        self.batches_applied += 1;
        self.store.apply(batch)
    }

    /// Runs one message's `work` and answers once the writes it made (if any) are
    /// durable: even when the answer is an error, as when a reuse revoked a family.
    fn answer_durably<T: 'static>(
        &mut self,
        work: impl FnOnce(&mut Self) -> Result<T, RefreshError>,
    ) -> ResponseFuture<Result<T, RefreshError>> {
        let applied_before = self.batches_applied;
        let result = work(self);
        let wrote = self.batches_applied != applied_before;
        let commit = wrote.then(|| self.commit.clone());
        Box::pin(async move {
            if let Some(commit) = commit {
                commit.durable().await?;
            }
            result
        })
    }

    fn mark_rotated(
        &self,
        batch: &mut WriteBatch,
        jti: &str,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        if let Some(mut record) = records::load_refresh(self.store.as_ref(), jti)? {
            if record.rotated_at_ms.is_none() {
                record.rotated_at_ms = Some(now_ms);
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

    /// A refresh token that the one check accepts (current, or rotated out within
    /// the grace). A reuse past the grace revokes the token's family before the refusal
    /// is returned: the caller's answer then waits for that write to be durable.
    fn accepted_refresh(
        &mut self,
        token: &str,
        now_ms: i64,
    ) -> Result<(check::Accepted, RefreshStanding), RefreshError> {
        match check::check(
            &self.keys,
            self.store.as_ref(),
            &self.users,
            token,
            Accept::Refresh,
            now_ms,
        ) {
            Ok(mut accepted) => {
                let standing = accepted
                    .refresh
                    .take()
                    .expect("the check reads the standing of every refresh token");
                Ok((accepted, standing))
            }
            Err(CheckError::Refused(Refusal::Reused { record, family })) => {
                tracing::warn!(
                    user_id = record.user_id,
                    family = %record.family,
                    "refresh token reused after rotation: revoking its family"
                );
                self.metrics.reuse_detected();
                self.revoke_family(&record.family, family.clone(), now_ms / 1000)?;
                Err(Refusal::Reused { record, family }.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn refresh(&mut self, token: &str) -> Result<Refreshed, RefreshError> {
        let now_ms = crate::tokens::now_ms();
        let now = now_ms / 1000;
        let (accepted, standing) = self.accepted_refresh(token, now_ms)?;
        if let Some(limit) = &self.family_limit {
            let (RefreshStanding::Current { record, .. } | RefreshStanding::InGrace { record, .. }) =
                &standing;
            limit.check(record.family.clone())?;
        }
        let (claims, stamp) = (accepted.claims, accepted.user.token_stamp);
        let access = self
            .keys
            .sign(TokenType::Access, claims.user_id, stamp, now)
            .token;
        if !self.rotate {
            self.metrics.tokens_issued(1, 0);
            return Ok(Refreshed {
                access,
                refresh: None,
            });
        }
        // In the grace: a retry of a refresh whose answer was lost. It gets a fresh
        // pair, and the token handed out in between is rotated out too.
        let (record, mut family) = match standing {
            RefreshStanding::Current { record, family }
            | RefreshStanding::InGrace { record, family } => (record, family),
        };
        let mut batch = WriteBatch::default();
        // The presented token's record is in hand already; only the family's
        // current one (a grace-period retry) needs reading.
        if record.rotated_at_ms.is_none() {
            let rotated = RefreshRecord {
                rotated_at_ms: Some(now_ms),
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
            self.mark_rotated(&mut batch, &current, now_ms)?;
        }
        let refresh = issue::add_refresh(
            &self.keys,
            &mut batch,
            &record.family,
            &mut family,
            claims.user_id,
            stamp,
            now,
        );
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

    /// Logout: the family of a token the check accepts is revoked. A rotated-out token
    /// within the grace logs out too; past the grace it is a reuse (family revoked,
    /// 401). A token the check refuses otherwise changes nothing.
    fn blacklist(&mut self, token: &str) -> Result<(), RefreshError> {
        let now_ms = crate::tokens::now_ms();
        let (_, standing) = self.accepted_refresh(token, now_ms)?;
        let (RefreshStanding::Current { record, family }
        | RefreshStanding::InGrace { record, family }) = standing;
        self.revoke_family(&record.family, family, now_ms / 1000)?;
        Ok(())
    }

    /// Deletes one chunk of records found expired by [`expired_records`] (run off
    /// this thread). Losing a purge in a crash only means purging again: no wait
    /// for the disk.
    fn delete_expired(&mut self, tree: Tree, expired: Vec<Vec<u8>>) -> Result<usize, StorageError> {
        let count = expired.len();
        // One write per key: each is atomic by itself, and a purge needs no more
        // (a batch of several is journaled first, which doubles the work).
        for key in expired {
            let mut delete = WriteBatch::default();
            delete.delete(tree, key);
            self.store.apply(delete)?;
        }
        Ok(count)
    }

    /// One step of the purge: scan a chunk of `tree` from `from` off the actor, then
    /// (back on the actor, one turn) delete what expired and schedule the next step.
    /// A family's `exp` is the latest of its tokens', and an expired token cannot be
    /// refreshed, so a record found expired stays expired: no re-check is needed.
    fn purge_step(&mut self, ctx: &mut Context<Self>, step: PurgeStep) {
        let store = self.store.clone();
        let (tree, from, cutoff) = (step.tree, step.from.clone(), step.cutoff);
        let scan = actix_web::rt::task::spawn_blocking(move || {
            expired_records(store.as_ref(), tree, &from, cutoff)
        });
        ctx.spawn(scan.into_actor(self).map(move |scanned, this, ctx| {
            let deleted = match scanned {
                Ok(Ok(scanned)) => this
                    .delete_expired(tree, scanned.keys)
                    .map(|n| (n, scanned.next)),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(StorageError::io("purge scan", e)),
            };
            let (deleted, next) = match deleted {
                Ok(done) => done,
                Err(e) => {
                    this.purging = false;
                    tracing::error!(error = %crate::error::cause_chain(&e), "purging expired token records failed");
                    return;
                }
            };
            let purged = step.purged + deleted;
            let next_step = match next {
                Some(from) => Some(PurgeStep {
                    from,
                    purged,
                    ..step
                }),
                None if tree == Tree::RefreshTokens => Some(PurgeStep {
                    tree: Tree::TokenFamilies,
                    from: Vec::new(),
                    purged,
                    ..step
                }),
                None => None,
            };
            match next_step {
                Some(next_step) => {
                    ctx.run_later(PURGE_PAUSE, move |this, ctx| {
                        this.purge_step(ctx, next_step)
                    });
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

    /// One step of [`RevokeUserFamilies`]: scan a chunk of the families off the
    /// actor, revoke the user's (read again on the actor) in one batch, go on from
    /// where the scan stopped; at the end, wait for the commit and answer the count.
    fn revoke_step(
        &mut self,
        user_id: UserId,
        now: i64,
        from: Vec<u8>,
        revoked: usize,
    ) -> ResponseActFuture<Self, Result<usize, StorageError>> {
        let store = self.store.clone();
        let scan = actix_web::rt::task::spawn_blocking(move || {
            records::user_families_from(store.as_ref(), user_id, &from, records::REVOKE_SCAN_CHUNK)
        });
        Box::pin(scan.into_actor(self).then(move |scanned, this, _| {
            let step = match scanned {
                Ok(Ok(scanned)) => {
                    records::revoke_families(this.store.as_ref(), user_id, &scanned.keys, now)
                        .map(|n| (revoked + n, scanned.next))
                }
                Ok(Err(e)) => Err(e),
                Err(e) => Err(StorageError::io("revocation scan", e)),
            };
            match step {
                Ok((revoked, Some(next))) => this.revoke_step(user_id, now, next, revoked),
                Ok((revoked, None)) => {
                    let commit = this.commit.clone();
                    Box::pin(
                        async move {
                            commit.durable().await?;
                            Ok(revoked)
                        }
                        .into_actor(this),
                    )
                }
                Err(e) => {
                    // What was revoked before the error is applied: make it durable.
                    let commit = this.commit.clone();
                    Box::pin(
                        async move {
                            let _ = commit.durable().await;
                            Err(e)
                        }
                        .into_actor(this),
                    )
                }
            }
        }))
    }
}

/// Where a purge is: the tree, the key its next chunk starts from, the cutoff it
/// was started with, and how many records it has deleted so far.
#[derive(Clone)]
struct PurgeStep {
    tree: Tree,
    from: Vec<u8>,
    cutoff: i64,
    purged: usize,
    started: std::time::Instant,
}

/// The keys of the records, among at most [`PURGE_CHUNK`] of `tree` from `from`
/// on, whose every token expired before `cutoff` (refresh records and families
/// both carry `exp`), and where the next chunk starts (`None`: the tree is done).
/// A read-only scan: it runs on a blocking thread so that the actor keeps serving.
fn expired_records(
    store: &dyn ReadStore,
    tree: Tree,
    from: &[u8],
    cutoff: i64,
) -> Result<ScannedKeys, StorageError> {
    #[derive(serde::Deserialize)]
    struct Expiry {
        exp: i64,
    }
    let mut expired = Vec::new();
    let next = crate::storage::scan_chunk(store, tree, from, PURGE_CHUNK, &mut |key, value| {
        if let Ok(Expiry { exp }) = serde_json::from_slice(value) {
            if exp < cutoff {
                expired.push(key.to_vec());
            }
        }
    })?;
    Ok(ScannedKeys {
        keys: expired,
        next,
    })
}

impl Actor for TokenIssuer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.purge_interval, |this, ctx| {
            if std::mem::replace(&mut this.purging, true) {
                return; // the last purge is still going
            }
            let step = PurgeStep {
                tree: Tree::RefreshTokens,
                from: Vec::new(),
                // A token still inside the leeway verifies, so its record must stay.
                cutoff: crate::now_unix() - this.leeway,
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
        self.answer_durably(|this| this.refresh(&msg.token))
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
        self.answer_durably(|this| this.blacklist(&msg.token))
    }
}

/// Operator: revoke every refresh-token family of a user. Durable on return.
#[derive(Message)]
#[rtype(result = "Result<usize, StorageError>")]
pub struct RevokeUserFamilies {
    pub user_id: UserId,
}

impl Handler<RevokeUserFamilies> for TokenIssuer {
    type Result = ResponseActFuture<Self, Result<usize, StorageError>>;

    /// In chunks (see [`TokenIssuer::revoke_step`]): logins and refreshes go on
    /// between them. Answers after the commit that covers every revocation.
    fn handle(&mut self, msg: RevokeUserFamilies, _: &mut Context<Self>) -> Self::Result {
        self.revoke_step(msg.user_id, crate::now_unix(), Vec::new(), 0)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SledStore;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Arc<SledStore>,
        issuer: Addr<TokenIssuer>,
    }

    /// An issuer on a fresh store that `fill` wrote to first.
    fn start_issuer(purge_interval: Duration, fill: impl FnOnce(&SledStore)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(&dir.path().join("data"), 8 << 20).unwrap());
        fill(&store);
        let cfg = JwtConfig {
            purge_interval,
            ..JwtConfig::default()
        };
        let keys = Arc::new(JwtKeys::load(&cfg, dir.path()).unwrap());
        let commit = GroupCommit::start(store.clone());
        let issuer = TokenIssuer::new(
            store.clone(),
            keys,
            commit,
            &cfg,
            Arc::new(Metrics::default()),
        )
        .start();
        Fixture {
            _dir: dir,
            store,
            issuer,
        }
    }

    fn family(user_id: UserId, exp: i64, revoked_at: Option<i64>) -> Vec<u8> {
        records::encode(&Family {
            user_id,
            created_at: 0,
            exp,
            current: String::new(),
            revoked_at,
        })
    }

    fn count(store: &dyn ReadStore, tree: Tree) -> usize {
        let mut n = 0;
        store
            .for_each(tree, &mut |_, _| {
                n += 1;
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        n
    }

    async fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(std::time::Instant::now() < until, "timed out: {what}");
            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[actix_web::test]
    async fn the_purge_deletes_every_expired_record_over_many_chunks_and_keeps_live_ones() {
        let now = crate::now_unix();
        let expired = PURGE_CHUNK * 2 + 345;
        let fixture = start_issuer(Duration::from_secs(1), |store| {
            let mut batch = WriteBatch::default();
            for i in 0..expired {
                let record = RefreshRecord {
                    family: format!("f{i:031}"),
                    user_id: 1,
                    exp: now - 3600,
                    rotated_at_ms: None,
                };
                batch.put(
                    Tree::RefreshTokens,
                    format!("e{i:031}"),
                    records::encode(&record),
                );
                batch.put(
                    Tree::TokenFamilies,
                    format!("f{i:031}"),
                    family(1, now - 3600, None),
                );
            }
            for i in 0..7 {
                let record = RefreshRecord {
                    family: format!("l{i:031}"),
                    user_id: 2,
                    exp: now + 3600,
                    rotated_at_ms: None,
                };
                batch.put(
                    Tree::RefreshTokens,
                    format!("k{i:031}"),
                    records::encode(&record),
                );
                batch.put(
                    Tree::TokenFamilies,
                    format!("l{i:031}"),
                    family(2, now + 3600, None),
                );
            }
            store.apply(batch).unwrap();
        });
        // The issuer goes on answering while it runs.
        fixture.issuer.send(Probe).await.unwrap();
        let store = fixture.store.clone();
        poll_until("the purge to delete every expired record", || {
            count(store.as_ref(), Tree::RefreshTokens) == 7
                && count(store.as_ref(), Tree::TokenFamilies) == 7
        })
        .await;
    }

    #[test]
    fn an_expiry_scan_reads_one_chunk_and_says_where_the_next_starts() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let mut batch = WriteBatch::default();
        for i in 0..(PURGE_CHUNK + 10) {
            // Every other record expired.
            batch.put(
                Tree::TokenFamilies,
                format!("{i:08}"),
                family(1, if i % 2 == 0 { 10 } else { 1000 }, None),
            );
        }
        store.apply(batch).unwrap();
        let first = expired_records(&store, Tree::TokenFamilies, b"", 100).unwrap();
        let (first, next) = (first.keys, first.next);
        assert_eq!(first.len(), PURGE_CHUNK / 2);
        let next = next.expect("more to scan");
        let rest = expired_records(&store, Tree::TokenFamilies, &next, 100).unwrap();
        let (rest, end) = (rest.keys, rest.next);
        assert_eq!(rest.len(), 5);
        assert!(end.is_none());
        assert!(first.iter().chain(&rest).all(|k| {
            let i: usize = std::str::from_utf8(k).unwrap().parse().unwrap();
            i % 2 == 0
        }));
    }

    #[actix_web::test]
    async fn revoking_a_users_families_covers_every_chunk_and_answers_the_count() {
        let now = crate::now_unix();
        let families = records::REVOKE_SCAN_CHUNK * 2 + 17;
        let fixture = start_issuer(Duration::from_secs(3600), |store| {
            let mut batch = WriteBatch::default();
            for i in 0..families {
                // User 7: every third family already revoked; user 8 interleaved.
                let revoked = (i % 3 == 0).then_some(now - 5);
                batch.put(
                    Tree::TokenFamilies,
                    format!("a{i:031}"),
                    family(7, now + 3600, revoked),
                );
                batch.put(
                    Tree::TokenFamilies,
                    format!("b{i:031}"),
                    family(8, now + 3600, None),
                );
            }
            store.apply(batch).unwrap();
        });
        let live = (0..families).filter(|i| i % 3 != 0).count();
        let revoked = fixture
            .issuer
            .send(RevokeUserFamilies { user_id: 7 })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(revoked, live);
        let mut seen = (0, 0);
        fixture
            .store
            .for_each(Tree::TokenFamilies, &mut |_, value| {
                let family: Family = serde_json::from_slice(value).unwrap();
                match family.user_id {
                    7 => assert!(family.revoked_at.is_some()),
                    _ => {
                        assert!(family.revoked_at.is_none(), "another user's family revoked");
                        seen.1 += 1;
                    }
                }
                seen.0 += 1;
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(seen, (families * 2, families));
        // Again: nothing left to revoke.
        let again = fixture
            .issuer
            .send(RevokeUserFamilies { user_id: 7 })
            .await
            .unwrap();
        assert_eq!(again.unwrap(), 0);
    }
}
