//! [`AuthStore`] on the key-value [`Store`] (sled): each operation reads, decides
//! and writes eagerly, in its caller's turn (the owner actors serialize callers),
//! and its future waits for the group commit that covers the writes.
//!
//! Layout of the family tree (`families`): key [`family_key`] (user id, 8 bytes
//! big-endian, then the family id, 16 bytes), value JSON
//! `{"gen":…,"created_ms":…,"rotated_ms":…,"exp":…,"revoked_ms":…,"stamp":…}`.
//!
//! Write order instead of a journal (every sequence here is [`Store::apply_in_order`]
//! or a single write; sled recovers a prefix of its log):
//! - a login writes the family, then the user record, then the user's indexes
//!   (`users_by_openid`, `users_by_unionid`). Any prefix is harmless: a family
//!   alone is one no token was ever answered for (purged at its expiry); a user
//!   record without its index is not found by the next login, which writes it
//!   again (a returning user) or gives the id to the next user created (a new one).
//!   The user is answered only once all of it is durable.
//! - a rotation, a revocation, an operator change, a web login's new family: one
//!   write each.
//!
//! User ids: the next is one more than the greatest in `users` (or than older
//! releases' `meta` counter, when that is greater). A created user is its record;
//! no counter is written.

use super::model::*;
use super::{GroupCommit, ReadStore, StorageError, Store, Tree, WriteBatch};
use crate::users::cache::UserCache;
use crate::users::{self, PhoneNumber, User, UserId};
use serde::{Deserialize, Serialize};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

pub struct SledModel {
    store: Arc<dyn Store>,
    commit: GroupCommit,
    /// The token check's decoded users: every user record written here is put
    /// there once applied (see `users::cache` for why that keeps it exact).
    users: Arc<UserCache>,
    next_id: Mutex<UserId>,
    /// `events.webhook_url` set: every change is reported in its own batch.
    events: Option<Arc<crate::events::Outbox>>,
}

/// A family as stored (its key holds the user and the family id).
#[derive(Serialize, Deserialize)]
struct StoredFamily {
    gen: Generation,
    created_ms: i64,
    rotated_ms: i64,
    exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoked_ms: Option<i64>,
    #[serde(default)]
    stamp: u64,
}

/// A family's stored value (for tools that fill a directory by hand).
pub fn encode_family(family: &FamilyRecord) -> Vec<u8> {
    serde_json::to_vec(&StoredFamily {
        gen: family.generation,
        created_ms: family.created_ms,
        rotated_ms: family.rotated_ms,
        exp: family.exp,
        revoked_ms: family.revoked_ms,
        stamp: family.stamp,
    })
    .expect("a family always serializes")
}

pub(crate) fn decode_family(key: &[u8], value: &[u8]) -> Result<FamilyRecord, StorageError> {
    let corrupt = |reason: String| StorageError::Corrupt {
        tree: Tree::Families.name(),
        reason,
    };
    let (user_id, id) = split_family_key(key).ok_or_else(|| corrupt("key of a family".into()))?;
    let stored: StoredFamily = serde_json::from_slice(value).map_err(|e| corrupt(e.to_string()))?;
    Ok(FamilyRecord {
        user_id,
        id,
        generation: stored.gen,
        created_ms: stored.created_ms,
        rotated_ms: stored.rotated_ms,
        exp: stored.exp,
        revoked_ms: stored.revoked_ms,
        stamp: stored.stamp,
    })
}

/// One family, read on the caller's thread (the token check).
pub fn load_family(
    store: &dyn ReadStore,
    user_id: UserId,
    family: FamilyId,
) -> Result<Option<FamilyRecord>, StorageError> {
    let key = family_key(user_id, family);
    store
        .get(Tree::Families, &key)?
        .map(|value| decode_family(&key, &value))
        .transpose()
}

/// Every family of `user_id` (a prefix scan), on the caller's thread.
pub fn user_families(
    store: &dyn ReadStore,
    user_id: UserId,
) -> Result<Vec<FamilyRecord>, StorageError> {
    let prefix = user_id.to_be_bytes();
    let mut found = Vec::new();
    let mut failed = None;
    store.for_each_from(Tree::Families, &prefix, &mut |key, value| {
        if !key.starts_with(&prefix) {
            return ControlFlow::Break(());
        }
        match decode_family(key, value) {
            Ok(family) => {
                found.push(family);
                ControlFlow::Continue(())
            }
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(found),
    }
}

fn ready<T: Send + 'static>(result: Result<T, StorageError>) -> StoreFuture<T> {
    Box::pin(std::future::ready(result))
}

impl SledModel {
    pub fn new(
        store: Arc<dyn Store>,
        commit: GroupCommit,
        users: Arc<UserCache>,
    ) -> Result<Self, StorageError> {
        let next_id = users::first_free_id(store.as_ref())?;
        Ok(SledModel {
            store,
            commit,
            users,
            next_id: Mutex::new(next_id),
            events: None,
        })
    }

    /// Writes an event for every user change into the change's own batch.
    pub fn with_events(mut self, outbox: Arc<crate::events::Outbox>) -> Self {
        self.events = Some(outbox);
        self
    }

    /// Adds the event to `batch` when events are on; `true` if it did.
    fn event(
        &self,
        batch: &mut WriteBatch,
        user_id: UserId,
        kind: crate::events::EventType,
        data: serde_json::Value,
    ) -> bool {
        match &self.events {
            Some(outbox) => {
                outbox.add(batch, user_id, kind, data, crate::clock::now_ms());
                true
            }
            None => false,
        }
    }

    /// Applies `batch` (atomically), then wakes the delivery thread when it holds
    /// an event.
    fn apply_with_event(&self, batch: WriteBatch, evented: bool) -> Result<(), StorageError> {
        self.store.apply(batch)?;
        if evented {
            if let Some(outbox) = &self.events {
                outbox.wake();
            }
        }
        Ok(())
    }

    /// The cache this model keeps up to date, for the token check to read.
    pub fn user_cache(&self) -> Arc<UserCache> {
        self.users.clone()
    }

    /// `result`, once the writes made so far are durable (when `wrote`).
    fn durable<T: Send + 'static>(
        &self,
        wrote: bool,
        result: Result<T, StorageError>,
    ) -> StoreFuture<T> {
        if !wrote {
            return ready(result);
        }
        let wait = self.commit.register();
        Box::pin(async move {
            wait.wait().await?;
            result
        })
    }

    /// The user this session belongs to, and whether this app's openid already
    /// points at it (a user found through its unionid may be new to this app).
    fn find(
        &self,
        appid: &str,
        session: &crate::wechat::Session,
        link_by_unionid: bool,
    ) -> Result<Option<(User, bool)>, StorageError> {
        let store = self.store.as_ref();
        let openid_key = users::openid_key(appid, &session.openid);
        let by_openid = users::lookup(store, Tree::UsersByOpenid, &openid_key)?;
        let mut id = by_openid;
        if link_by_unionid {
            if let Some(unionid) = &session.unionid {
                id = users::lookup(store, Tree::UsersByUnionid, unionid.as_bytes())?.or(id);
            }
        }
        let Some(id) = id else { return Ok(None) };
        let user = users::load(store, id)?.ok_or_else(|| StorageError::Corrupt {
            tree: Tree::Users.name(),
            reason: format!("index points at missing user {id}"),
        })?;
        Ok(Some((user, by_openid == Some(id))))
    }

    fn login_now(&self, req: LoginRequest) -> Result<LoginResult, StorageError> {
        let now = req.now_ms.div_euclid(1000);
        let session = &req.session;
        let found = self
            .find(&req.appid, session, req.link_by_unionid)?
            .filter(|(user, _)| user.erased_at.is_none());
        if matches!(&found, Some((user, _)) if user.disabled) {
            return Ok(LoginResult::Disabled);
        }
        let family = FamilyRecord {
            user_id: 0,
            id: req.family,
            generation: 1,
            created_ms: req.now_ms,
            rotated_ms: req.now_ms,
            exp: req.family_exp,
            revoked_ms: None,
            stamp: 0,
        };
        let mut next_id = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
        let mut cancelled = None;
        let (user, created, index_openid) = match found {
            Some((mut user, openid_indexed)) => {
                cancelled = user.deletion_due.take().map(|_| user.id);
                user.last_login_at = now;
                user.session_key = session.session_key.clone();
                if user.unionid.is_none() {
                    user.unionid = session.unionid.clone();
                }
                (user, false, !openid_indexed)
            }
            None => {
                let user = User::new(
                    *next_id,
                    &req.appid,
                    &session.openid,
                    session.unionid.clone(),
                    session.session_key.clone(),
                    now,
                );
                (user, true, true)
            }
        };
        let family = FamilyRecord {
            user_id: user.id,
            stamp: user.token_stamp,
            ..family
        };
        // In order: family, user, indexes (see the module docs).
        let mut batch = WriteBatch::default();
        batch.put(
            Tree::Families,
            family_key(user.id, family.id),
            encode_family(&family),
        );
        batch.put(Tree::Users, users::id_key(user.id), users::encode(&user));
        if index_openid {
            batch.put(
                Tree::UsersByOpenid,
                users::openid_key(&req.appid, &session.openid),
                users::id_key(user.id),
            );
        }
        // A user created before WeChat sent a unionid (or before linking was turned
        // on) is indexed by it now, so the next app finds them.
        if let (true, Some(unionid)) = (req.link_by_unionid, &session.unionid) {
            if created
                || users::lookup(
                    self.store.as_ref(),
                    Tree::UsersByUnionid,
                    unionid.as_bytes(),
                )?
                .is_none()
            {
                batch.put(
                    Tree::UsersByUnionid,
                    unionid.as_bytes(),
                    users::id_key(user.id),
                );
            }
        }
        // The mark goes after the user record: a crash between leaves a mark the
        // sweep finds stale (the record no longer marked) and drops.
        if let Some(id) = cancelled {
            batch.delete(Tree::Meta, deletion_key(id));
        }
        let evented = created
            && self.event(
                &mut batch,
                user.id,
                crate::events::EventType::Created,
                crate::events::created_data(&user),
            );
        if evented {
            // The event and the user as one atomic batch: never one without the other.
            self.apply_with_event(batch, true)?;
        } else {
            self.store.apply_in_order(batch)?;
        }
        self.users.put(user.clone());
        if created {
            // Only after the writes applied: a failed write never burns an id in
            // memory that the store did not record.
            *next_id += 1;
        }
        Ok(LoginResult::LoggedIn {
            user,
            created,
            family,
            deletion_cancelled: cancelled.is_some(),
        })
    }

    /// The user read and the family written in one turn of the registry (its
    /// only caller): a disable or revoke is another message, before or after.
    fn start_family_now(&self, req: StartFamilyRequest) -> Result<StartFamilyResult, StorageError> {
        let Some(user) = users::load(self.store.as_ref(), req.user_id)? else {
            return Ok(StartFamilyResult::Missing);
        };
        if user.disabled {
            return Ok(StartFamilyResult::Disabled);
        }
        let family = FamilyRecord::first(
            user.id,
            req.family,
            user.token_stamp,
            req.family_exp,
            req.now_ms,
        );
        self.put_family(&family)?;
        Ok(StartFamilyResult::Started { user, family })
    }

    /// Reads a user, lets `change` edit it, and writes it back. `None`: no such user.
    fn update(
        &self,
        id: UserId,
        change: impl FnOnce(&mut User) -> Option<(crate::events::EventType, serde_json::Value)>,
    ) -> Result<Option<User>, StorageError> {
        let Some(mut user) = users::load(self.store.as_ref(), id)? else {
            return Ok(None);
        };
        let event = change(&mut user);
        let mut batch = WriteBatch::default();
        batch.put(Tree::Users, users::id_key(id), users::encode(&user));
        let evented = match event {
            Some((kind, data)) => self.event(&mut batch, id, kind, data),
            None => false,
        };
        self.apply_with_event(batch, evented)?;
        self.users.put(user.clone());
        Ok(Some(user))
    }

    fn update_durably(
        &self,
        id: UserId,
        change: impl FnOnce(&mut User) -> Option<(crate::events::EventType, serde_json::Value)>,
    ) -> StoreFuture<Option<User>> {
        let result = self.update(id, change);
        let wrote = matches!(result, Ok(Some(_)));
        self.durable(wrote, result)
    }

    fn put_family(&self, family: &FamilyRecord) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put(
            Tree::Families,
            family_key(family.user_id, family.id),
            encode_family(family),
        );
        self.store.apply(batch)
    }

    fn rotate_now(&self, req: RotateRequest) -> Result<(RotateOutcome, bool), StorageError> {
        let Some(mut family) = load_family(self.store.as_ref(), req.user_id, req.family)? else {
            return Ok((RotateOutcome::Missing, false));
        };
        Ok(
            match standing(&family, req.presented, req.now_ms, req.grace_ms) {
                Standing::Current => {
                    // 2^64 rotations do not happen; saturating all the same.
                    family.generation = family.generation.saturating_add(1);
                    family.rotated_ms = req.now_ms;
                    family.exp = family.exp.max(req.exp);
                    self.put_family(&family)?;
                    let generation = family.generation;
                    (RotateOutcome::Rotated { generation }, true)
                }
                Standing::InGrace => (
                    RotateOutcome::Retry {
                        generation: family.generation,
                    },
                    false,
                ),
                Standing::Reused => {
                    family.revoked_ms = Some(req.now_ms);
                    self.put_family(&family)?;
                    (RotateOutcome::Reused, true)
                }
                Standing::Revoked => (RotateOutcome::Revoked, false),
                Standing::Ahead => (RotateOutcome::Ahead, false),
            },
        )
    }

    fn revoke_now(&self, user_id: UserId, id: FamilyId, now_ms: i64) -> Result<bool, StorageError> {
        match load_family(self.store.as_ref(), user_id, id)? {
            Some(mut family) if !family.is_revoked() => {
                family.revoked_ms = Some(now_ms);
                self.put_family(&family)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// One chunk of one tree: deletes what expired, returns (deleted, next key).
    fn purge_tree(
        &self,
        tree: Tree,
        from: &[u8],
        cutoff: i64,
        limit: usize,
    ) -> Result<(usize, Option<Vec<u8>>), StorageError> {
        #[derive(Deserialize)]
        struct Expiry {
            exp: i64,
        }
        let mut expired = Vec::new();
        let next = super::scan_chunk(self.store.as_ref(), tree, from, limit, &mut |key, value| {
            if let Ok(Expiry { exp }) = serde_json::from_slice(value) {
                if exp < cutoff {
                    expired.push(key.to_vec());
                }
            }
        })?;
        let deleted = expired.len();
        // One write per key: each is atomic by itself, and a purge needs no more.
        for key in expired {
            let mut delete = WriteBatch::default();
            delete.delete(tree, key);
            self.store.apply(delete)?;
        }
        Ok((deleted, next))
    }
}

impl SledModel {
    fn delete_now(
        &self,
        id: UserId,
        due: i64,
        now: i64,
        only_if_due: bool,
    ) -> Result<(Option<Deletion>, bool), StorageError> {
        let store = self.store.as_ref();
        let Some(mut user) = users::load(store, id)? else {
            return Ok((None, false));
        };
        let still_due = user.deletion_due.is_some_and(|d| d <= now);
        if user.erased_at.is_some() || (only_if_due && !still_due) {
            return Ok((None, false));
        }
        let mut batch = WriteBatch::default();
        if due > now {
            if let Some(marked) = user.deletion_due.filter(|&d| d <= due) {
                return Ok((Some(Deletion::Scheduled { user, due: marked }), false));
            }
            user.deletion_due = Some(due);
            batch.put(Tree::Meta, deletion_key(id), due.to_be_bytes());
            batch.put(Tree::Users, users::id_key(id), users::encode(&user));
            let evented = self.event(
                &mut batch,
                id,
                crate::events::EventType::DeletionScheduled,
                crate::events::deletion_scheduled_data(due),
            );
            // One atomic batch: the mark, the record and the event together.
            self.apply_with_event(batch, evented)?;
            self.users.put(user.clone());
            return Ok((Some(Deletion::Scheduled { user, due }), true));
        }
        for key in openid_keys_of(store, &user)? {
            batch.delete(Tree::UsersByOpenid, key);
        }
        if let Some(unionid) = &user.unionid {
            if users::lookup(store, Tree::UsersByUnionid, unionid.as_bytes())? == Some(id) {
                batch.delete(Tree::UsersByUnionid, unionid.as_bytes());
            }
        }
        for family in user_families(store, id)? {
            batch.delete(Tree::Families, family_key(id, family.id).to_vec());
        }
        batch.delete(Tree::Meta, deletion_key(id));
        user.erase(now);
        batch.put(Tree::Users, users::id_key(id), users::encode(&user));
        let evented = self.event(
            &mut batch,
            id,
            crate::events::EventType::Deleted,
            serde_json::json!({}),
        );
        // One atomic batch (sled journals it): after a crash all of it or none.
        self.apply_with_event(batch, evented)?;
        self.users.put(user.clone());
        Ok((Some(Deletion::Erased { user }), true))
    }

    /// The marks due by `now`; a mark whose user is no longer marked (a login
    /// cancelled it and the crash came before the mark was removed) is dropped.
    fn due_now(&self, now: i64, limit: usize) -> Result<Vec<UserId>, StorageError> {
        let mut marks = Vec::new();
        self.store
            .for_each_from(Tree::Meta, DELETION_PREFIX, &mut |key, value| {
                let Some(id) = key.strip_prefix(DELETION_PREFIX) else {
                    return ControlFlow::Break(());
                };
                if let (Ok(id), Ok(due)) = (<[u8; 8]>::try_from(id), <[u8; 8]>::try_from(value)) {
                    marks.push((i64::from_be_bytes(due), UserId::from_be_bytes(id)));
                }
                ControlFlow::Continue(())
            })?;
        marks.sort_unstable();
        let mut due = Vec::new();
        for (_, id) in marks.into_iter().take_while(|(at, _)| *at <= now) {
            let marked = users::load(self.store.as_ref(), id)?
                .is_some_and(|u| u.erased_at.is_none() && u.deletion_due.is_some());
            if marked {
                due.push(id);
            } else {
                let mut stale = WriteBatch::default();
                stale.delete(Tree::Meta, deletion_key(id));
                self.store.apply(stale)?;
            }
            if due.len() >= limit {
                break;
            }
        }
        Ok(due)
    }

    fn revoke_all_now(&self, user_id: UserId, now_ms: i64) -> Result<usize, StorageError> {
        let mut batch = WriteBatch::default();
        let mut revoked = 0;
        for mut family in user_families(self.store.as_ref(), user_id)? {
            if !family.is_revoked() {
                family.revoked_ms = Some(now_ms);
                batch.put(
                    Tree::Families,
                    family_key(user_id, family.id),
                    encode_family(&family),
                );
                revoked += 1;
            }
        }
        if revoked > 0 {
            self.store.apply(batch)?;
        }
        Ok(revoked)
    }
}

/// Every `users_by_openid` key that points at `user`: its own app's and, for a user
/// with a unionid (whom `wechat.link_by_unionid` may have found from other apps),
/// every other app's. Those keys name no user in their value only, so they are
/// found by a scan of the index (an erasure is rare; one scan per erasure).
fn openid_keys_of(store: &dyn ReadStore, user: &User) -> Result<Vec<Vec<u8>>, StorageError> {
    let own = users::openid_key(&user.appid, &user.openid);
    if user.unionid.is_none() {
        let points_here = users::lookup(store, Tree::UsersByOpenid, &own)? == Some(user.id);
        return Ok(if points_here { vec![own] } else { Vec::new() });
    }
    let id = users::id_key(user.id);
    let mut keys = Vec::new();
    store.for_each(Tree::UsersByOpenid, &mut |key, value| {
        if value == id {
            keys.push(key.to_vec());
        }
        ControlFlow::Continue(())
    })?;
    Ok(keys)
}

/// `meta` keys marking accounts for deletion: the prefix, then the user id (8
/// bytes big-endian); the value is the due unix second (8 bytes big-endian).
const DELETION_PREFIX: &[u8] = b"deletion_due\0";

fn deletion_key(id: UserId) -> Vec<u8> {
    [DELETION_PREFIX, &id.to_be_bytes()].concat()
}

/// Whether `key` of `meta` is a deletion mark (a database keeps the mark in its
/// user row only).
pub fn is_deletion_mark(key: &[u8]) -> bool {
    key.starts_with(DELETION_PREFIX)
}

/// The `meta` mark (key, value) of a user record marked for deletion and not yet
/// erased: a restore writes it with the record, so that the sweep finds the user
/// whichever backend the backup came from.
pub fn deletion_mark(user: &User) -> Option<(Vec<u8>, Vec<u8>)> {
    let due = user.deletion_due.filter(|_| user.erased_at.is_none())?;
    Some((deletion_key(user.id), due.to_be_bytes().to_vec()))
}

/// The purge's trees, in order; a cursor is the tree's index then the key.
const PURGED: [Tree; 2] = [Tree::Families, Tree::RefreshTokens];

impl AuthStore for SledModel {
    fn login(&self, request: LoginRequest) -> StoreFuture<LoginResult> {
        let result = self.login_now(request);
        // A disabled user's login writes nothing: no commit to wait for.
        let wrote = matches!(result, Ok(LoginResult::LoggedIn { .. }));
        self.durable(wrote, result)
    }

    fn start_family(&self, request: StartFamilyRequest) -> StoreFuture<StartFamilyResult> {
        let result = self.start_family_now(request);
        let wrote = matches!(result, Ok(StartFamilyResult::Started { .. }));
        self.durable(wrote, result)
    }

    fn user(&self, id: UserId) -> StoreFuture<Option<User>> {
        ready(users::load(self.store.as_ref(), id))
    }

    fn set_disabled(&self, id: UserId, disabled: bool) -> StoreFuture<Option<User>> {
        self.update_durably(id, |user| {
            user.disabled = disabled;
            let kind = if disabled {
                crate::events::EventType::Disabled
            } else {
                crate::events::EventType::Enabled
            };
            Some((kind, serde_json::json!({})))
        })
    }

    /// Exact by construction (no clock involved); tokens signed after this write
    /// carry the new stamp. (Wrapping only after 2^64 revokes, and it still changes.)
    fn revoke_tokens(&self, id: UserId) -> StoreFuture<Option<User>> {
        self.update_durably(id, |user| {
            user.token_stamp = user.token_stamp.wrapping_add(1);
            None
        })
    }

    fn set_phone(&self, id: UserId, phone: PhoneNumber) -> StoreFuture<Option<User>> {
        self.update_durably(id, |user| {
            let data = crate::events::phone_data(&phone);
            user.phone = Some(Box::new(phone));
            Some((crate::events::EventType::Updated, data))
        })
    }

    fn set_profile(&self, id: UserId, change: ProfileChange) -> StoreFuture<Option<User>> {
        if matches!(users::load(self.store.as_ref(), id), Ok(Some(u)) if u.erased_at.is_some()) {
            return ready(Ok(None));
        }
        self.update_durably(id, |user| {
            let data = crate::events::profile_data(&change);
            if let Some(nickname) = change.nickname {
                user.nickname = Some(nickname);
            }
            if let Some(avatar_url) = change.avatar_url {
                user.avatar_url = Some(avatar_url);
            }
            Some((crate::events::EventType::Updated, data))
        })
    }

    fn delete_user(
        &self,
        id: UserId,
        due: i64,
        now: i64,
        only_if_due: bool,
    ) -> StoreFuture<Option<Deletion>> {
        match self.delete_now(id, due, now, only_if_due) {
            Ok((deletion, wrote)) => self.durable(wrote, Ok(deletion)),
            Err(e) => self.durable(true, Err(e)),
        }
    }

    fn due_deletions(&self, now: i64, limit: usize) -> StoreFuture<Vec<UserId>> {
        ready(self.due_now(now, limit))
    }

    fn revoke_families(&self, user_id: UserId, now_ms: i64) -> StoreFuture<usize> {
        let result = self.revoke_all_now(user_id, now_ms);
        let wrote = matches!(result, Ok(n) if n > 0);
        self.durable(wrote, result)
    }

    fn rotate(&self, request: RotateRequest) -> StoreFuture<RotateOutcome> {
        match self.rotate_now(request) {
            Ok((outcome, wrote)) => self.durable(wrote, Ok(outcome)),
            Err(e) => self.durable(true, Err(e)),
        }
    }

    fn revoke_family(&self, user_id: UserId, family: FamilyId, now_ms: i64) -> StoreFuture<bool> {
        let result = self.revoke_now(user_id, family, now_ms);
        let wrote = matches!(result, Ok(true));
        self.durable(wrote, result)
    }

    fn family(&self, user_id: UserId, family: FamilyId) -> StoreFuture<Option<FamilyRecord>> {
        ready(load_family(self.store.as_ref(), user_id, family))
    }

    fn families(&self, user_id: UserId) -> StoreFuture<Vec<FamilyRecord>> {
        ready(user_families(self.store.as_ref(), user_id))
    }

    fn purge_expired(
        &self,
        cutoff: i64,
        from: Option<Vec<u8>>,
        limit: usize,
    ) -> StoreFuture<PurgeProgress> {
        let from = from.unwrap_or_default();
        let (index, key) = match from.split_first() {
            Some((index, key)) => (usize::from(*index), key),
            None => (0, &[][..]),
        };
        let Some(&tree) = PURGED.get(index) else {
            return ready(Ok(PurgeProgress::default()));
        };
        let result = self
            .purge_tree(tree, key, cutoff, limit)
            .map(|(deleted, next)| {
                let next = match next {
                    Some(key) => Some([&[index as u8][..], &key].concat()),
                    None if index + 1 < PURGED.len() => Some(vec![index as u8 + 1]),
                    None => None,
                };
                PurgeProgress { deleted, next }
            });
        ready(result)
    }

    fn access_token(&self, appid: &str) -> StoreFuture<Option<Vec<u8>>> {
        let key = crate::wechat::token_key(appid);
        ready(self.store.get(Tree::Meta, &key))
    }

    fn put_access_token(&self, appid: &str, record: Vec<u8>) -> StoreFuture<()> {
        let mut batch = WriteBatch::default();
        batch.put(Tree::Meta, crate::wechat::token_key(appid), record);
        let result = self.store.apply(batch);
        self.durable(true, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::sled::SledStore;

    fn model() -> (tempfile::TempDir, Arc<SledStore>, SledModel) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path(), 1 << 20).unwrap());
        let commit = GroupCommit::start(store.clone());
        let model = SledModel::new(store.clone(), commit, Arc::new(UserCache::new(0))).unwrap();
        (dir, store, model)
    }

    fn rotate(
        family: &FamilyRecord,
        presented: Generation,
        now_ms: i64,
        grace_ms: i64,
    ) -> RotateRequest {
        RotateRequest {
            user_id: family.user_id,
            family: family.id,
            presented,
            now_ms,
            grace_ms,
            exp: 5_000,
        }
    }

    fn session(openid: &str) -> crate::wechat::Session {
        crate::wechat::Session {
            openid: openid.into(),
            unionid: None,
            session_key: crate::secret::SessionKey::new("k"),
        }
    }

    async fn login(model: &SledModel, openid: &str, now_ms: i64) -> (User, bool, FamilyRecord) {
        let request = LoginRequest {
            appid: "wxa".into(),
            session: session(openid),
            link_by_unionid: false,
            family: FamilyId::random(),
            family_exp: 1_000,
            now_ms,
        };
        match model.login(request).await.unwrap() {
            LoginResult::LoggedIn {
                user,
                created,
                family,
                ..
            } => (user, created, family),
            LoginResult::Disabled => panic!("disabled"),
        }
    }

    #[actix_web::test]
    async fn a_web_session_is_a_new_family_of_an_enabled_user_only() {
        let (_dir, store, model) = model();
        let (user, _, phone) = login(&model, "o1", 10_000).await;
        let start = |user_id| StartFamilyRequest {
            user_id,
            family: FamilyId::random(),
            family_exp: 99_999,
            now_ms: 12_000,
        };
        let request = start(user.id);
        match model.start_family(request).await.unwrap() {
            StartFamilyResult::Started { user: read, family } => {
                assert_eq!(read.id, user.id);
                assert_eq!((family.id, family.generation), (request.family, 1));
                assert_ne!(family.id, phone.id);
                assert_eq!(
                    load_family(store.as_ref(), user.id, family.id).unwrap(),
                    Some(family)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            model.start_family(start(99)).await.unwrap(),
            StartFamilyResult::Missing
        ));
        model.set_disabled(user.id, true).await.unwrap();
        assert!(matches!(
            model.start_family(start(user.id)).await.unwrap(),
            StartFamilyResult::Disabled
        ));
        assert_eq!(user_families(store.as_ref(), user.id).unwrap().len(), 2);
    }

    #[actix_web::test]
    async fn a_rotation_is_a_compare_and_swap_and_a_retry_writes_nothing() {
        let (_dir, store, model) = model();
        let (user, created, family) = login(&model, "o1", 10_000).await;
        assert!(created && user.id == 1 && family.generation == 1);
        let (again, created, _) = login(&model, "o1", 11_000).await;
        assert!(!created && again.id == 1);
        assert_eq!(user_families(store.as_ref(), 1).unwrap().len(), 2);

        assert_eq!(
            model
                .rotate(rotate(&family, 1, 20_000, 1_000))
                .await
                .unwrap(),
            RotateOutcome::Rotated { generation: 2 }
        );
        let before = load_family(store.as_ref(), 1, family.id).unwrap();
        assert_eq!(
            model
                .rotate(rotate(&family, 1, 20_500, 1_000))
                .await
                .unwrap(),
            RotateOutcome::Retry { generation: 2 }
        );
        assert_eq!(
            load_family(store.as_ref(), 1, family.id).unwrap(),
            before,
            "nothing written"
        );
        assert_eq!(
            model
                .rotate(rotate(&family, 3, 20_500, 1_000))
                .await
                .unwrap(),
            RotateOutcome::Ahead
        );
        assert_eq!(
            model
                .rotate(rotate(&family, 1, 21_001, 1_000))
                .await
                .unwrap(),
            RotateOutcome::Reused
        );
        assert_eq!(
            model
                .rotate(rotate(&family, 2, 21_002, 1_000))
                .await
                .unwrap(),
            RotateOutcome::Revoked
        );
        let other = FamilyRecord {
            id: FamilyId([9; 16]),
            ..family
        };
        assert_eq!(
            model.rotate(rotate(&other, 1, 0, 0)).await.unwrap(),
            RotateOutcome::Missing
        );
        assert!(
            !model.revoke_family(1, family.id, 1).await.unwrap(),
            "revoked already"
        );
    }

    /// Counts the writes that reach the store.
    struct Counting {
        inner: Arc<SledStore>,
        writes: std::sync::atomic::AtomicUsize,
    }

    impl ReadStore for Counting {
        fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
            self.inner.get(tree, key)
        }
        fn for_each(
            &self,
            tree: Tree,
            visit: &mut crate::storage::Visitor<'_>,
        ) -> Result<(), StorageError> {
            self.inner.for_each(tree, visit)
        }
        fn size_on_disk(&self) -> Result<u64, StorageError> {
            self.inner.size_on_disk()
        }
    }

    impl Store for Counting {
        fn apply(&self, batch: WriteBatch) -> Result<(), StorageError> {
            self.writes
                .fetch_add(batch.len(), std::sync::atomic::Ordering::SeqCst);
            self.inner.apply(batch)
        }
        fn apply_in_order(&self, batch: WriteBatch) -> Result<(), StorageError> {
            self.writes
                .fetch_add(batch.len(), std::sync::atomic::Ordering::SeqCst);
            self.inner.apply_in_order(batch)
        }
        fn flush(&self) -> Result<(), StorageError> {
            self.inner.flush()
        }
        fn snapshot(
            &self,
            visit: &mut crate::storage::SnapshotVisitor<'_>,
        ) -> Result<(), StorageError> {
            self.inner.snapshot(visit)
        }
        fn recover(&self) -> Result<bool, StorageError> {
            self.inner.recover()
        }
    }

    #[actix_web::test]
    async fn a_new_login_is_three_writes_a_returning_one_two_and_a_rotation_one() {
        let (_dir, inner, _) = model();
        let store = Arc::new(Counting {
            inner,
            writes: Default::default(),
        });
        let commit = GroupCommit::start(store.clone());
        let model = SledModel::new(store.clone(), commit, Arc::new(UserCache::new(0))).unwrap();
        let writes = || store.writes.swap(0, std::sync::atomic::Ordering::SeqCst);
        let (_, _, family) = login(&model, "new", 0).await;
        assert_eq!(writes(), 3, "family, user, openid index");
        login(&model, "new", 0).await;
        assert_eq!(writes(), 2, "family, user");
        model.rotate(rotate(&family, 1, 10, 1_000)).await.unwrap();
        assert_eq!(writes(), 1, "the family");
        model.rotate(rotate(&family, 1, 20, 1_000)).await.unwrap();
        assert_eq!(writes(), 0, "a retry inside the grace");
    }

    #[actix_web::test]
    async fn the_purge_deletes_expired_families_and_legacy_records_over_many_chunks() {
        let (_dir, store, model) = model();
        let mut batch = WriteBatch::default();
        for i in 0..600u32 {
            let family = FamilyRecord {
                user_id: u64::from(i % 7),
                id: FamilyId(u128::from(i).to_be_bytes()),
                generation: 1,
                created_ms: 0,
                rotated_ms: 0,
                // Every third one live.
                exp: if i % 3 == 0 { 2_000 } else { 500 },
                revoked_ms: None,
                stamp: 0,
            };
            batch.put(
                Tree::Families,
                family_key(family.user_id, family.id),
                encode_family(&family),
            );
            batch.put(
                Tree::RefreshTokens,
                format!("{i:032}"),
                format!(
                    r#"{{"family":"f","user_id":1,"exp":{}}}"#,
                    if i % 3 == 0 { 2_000 } else { 500 }
                ),
            );
        }
        store.apply(batch).unwrap();
        let (mut from, mut deleted, mut steps) = (None, 0, 0);
        loop {
            let step = model.purge_expired(1_000, from, 100).await.unwrap();
            deleted += step.deleted;
            steps += 1;
            match step.next {
                Some(next) => from = Some(next),
                None => break,
            }
        }
        assert_eq!(deleted, 800);
        assert!(steps >= 12, "{steps} steps");
        let mut left = 0;
        for tree in [Tree::Families, Tree::RefreshTokens] {
            store
                .for_each(tree, &mut |_, _| {
                    left += 1;
                    ControlFlow::Continue(())
                })
                .unwrap();
        }
        assert_eq!(left, 400);
    }

    #[actix_web::test]
    async fn ids_continue_after_the_greatest_user_and_an_older_counter() {
        let (_dir, store, model) = model();
        login(&model, "a", 0).await;
        login(&model, "b", 0).await;
        drop(model);
        let mut batch = WriteBatch::default();
        batch.put(Tree::Meta, users::NEXT_USER_ID_KEY, users::id_key(10));
        store.apply(batch).unwrap();
        let commit = GroupCommit::start(store.clone());
        let model = SledModel::new(store.clone(), commit, Arc::new(UserCache::new(0))).unwrap();
        assert_eq!(login(&model, "c", 0).await.0.id, 10);
        let commit = GroupCommit::start(store.clone());
        let model = SledModel::new(store.clone(), commit, Arc::new(UserCache::new(0))).unwrap();
        assert_eq!(login(&model, "d", 0).await.0.id, 11);
        assert_eq!(users::count(store.as_ref()).unwrap(), 11);
    }
}
