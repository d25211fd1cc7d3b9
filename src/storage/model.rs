//! The storage model the owner actors call: operations with conditional results.
//!
//! Every backend implements [`AuthStore`]. Each operation states what must hold
//! (find-or-create on a unique key, compare-and-swap on a family's generation), not
//! which keys to write, so that an engine with one process (sled: the owner actors
//! serialize the callers) and an engine with many (PostgreSQL: unique constraints and
//! conditional `UPDATE ... WHERE ... RETURNING` decide) give the same answers.
//!
//! # Records
//!
//! - A **user**: [`User`] (`users.rs`), found by the unique `(appid, openid)` key
//!   and, when apps are linked, by the unique `unionid`.
//! - A **family** ([`FamilyRecord`]): one per login, keyed `user_id ‖ family_id`
//!   ([`family_key`]), so a user's families are a prefix scan. It holds a generation
//!   counter, when it last rotated (ms), its expiry and whether it is revoked.
//! - No per-token record: a refresh token carries, signed, its family (claim `fam`)
//!   and its generation (claim `gen`) (see [`crate::tokens::Claims`]).
//!
//! # Durability and concurrency
//!
//! Every operation's future resolves once its change is **durable** (sled: applied
//! in the caller's turn, then the group commit awaited inside the returned future;
//! PostgreSQL: its transaction's `COMMIT` returned). An operation that changes
//! nothing resolves without waiting for the disk. A failed future means the change
//! may or may not have happened; it is never answered as success.
//!
//! The sled implementation does its read-check-write **eagerly**, synchronously,
//! before it returns the future, and is correct only when its callers are
//! serialized: each operation has ONE owner actor that calls it on the actor's own
//! (single) thread, in its turn or in an answer's future running there (the issuer
//! awaits the token check's reads first), and hands the future back as its
//! `ResponseFuture` (user operations: `UserRegistry`; family operations:
//! `TokenIssuer`). One thread runs one synchronous call at a time, so no two of
//! them interleave. A backend that decides in the database (SQL)
//! must not rely on that serialization: the same actors call it, but any number of
//! processes may run the same operations at once.
//!
//! Signing stays in `tokens`: the store says what happened, the caller signs.

use crate::storage::StorageError;
use crate::users::{PhoneNumber, User, UserId};
use crate::wechat::Session;
use std::future::Future;
use std::pin::Pin;

/// What every operation returns: resolves once the change is durable. `'static`,
/// so that an actor can hand it back as its answer without holding its turn.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StorageError>> + Send + 'static>>;

/// A family's generation: 1 for the login's first refresh token, one more at each
/// rotation.
pub type Generation = u64;

/// 16 random bytes naming one login's family; in tokens (claim `fam`) as 32
/// lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FamilyId(pub [u8; 16]);

impl FamilyId {
    pub fn random() -> Self {
        use ring::rand::SecureRandom;
        let mut id = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut id)
            .expect("the OS random number generator failed");
        FamilyId(id)
    }

    /// As claim `fam` carries it.
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    /// The claim's text: exactly 32 hex characters (either case), else `None`.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut id = [0u8; 16];
        (text.len() == 32).then_some(())?;
        hex::decode_to_slice(text, &mut id).ok()?;
        Some(FamilyId(id))
    }
}

impl std::fmt::Debug for FamilyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FamilyId({})", self.to_hex())
    }
}

/// The key of a family: the user id (8 bytes big-endian) then the family id (16
/// bytes). A user's families are the keys starting with the user id.
pub fn family_key(user_id: UserId, family: FamilyId) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&user_id.to_be_bytes());
    key[8..].copy_from_slice(&family.0);
    key
}

/// The inverse of [`family_key`] (`None`: not 24 bytes).
pub fn split_family_key(key: &[u8]) -> Option<(UserId, FamilyId)> {
    let key: &[u8; 24] = key.try_into().ok()?;
    let user = UserId::from_be_bytes(key[..8].try_into().ok()?);
    Some((user, FamilyId(key[8..].try_into().ok()?)))
}

/// One login's refresh family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyRecord {
    pub user_id: UserId,
    pub id: FamilyId,
    /// The generation the family's newest refresh token carries.
    pub generation: Generation,
    /// When the login started it (unix milliseconds).
    pub created_ms: i64,
    /// When it last rotated (unix milliseconds; `created_ms` until the first
    /// rotation): the reuse grace of the generation before counts from here.
    pub rotated_ms: i64,
    /// The latest `exp` of any refresh token it issued (unix seconds): after it (and
    /// the leeway and the grace), the family can be purged.
    pub exp: i64,
    /// When it was revoked (unix milliseconds): logout, a reuse, or the operator.
    /// A revoked family refuses every token it issued; only its presence is read.
    pub revoked_ms: Option<i64>,
    /// The user's token stamp when the login started it: every token of the family
    /// carries it (a family cannot rotate once the user's stamp moved on). Not a
    /// rule the store applies (the token check compares the token's own stamp);
    /// it tells whether `wxauth tokens revoke` ended the family.
    pub stamp: u64,
}

impl FamilyRecord {
    /// A new family at generation 1 of a user whose token stamp is `stamp`, started
    /// (and last rotated) at `now_ms`.
    pub fn first(user_id: UserId, id: FamilyId, stamp: u64, exp: i64, now_ms: i64) -> Self {
        FamilyRecord {
            user_id,
            id,
            stamp,
            generation: 1,
            created_ms: now_ms,
            rotated_ms: now_ms,
            exp,
            revoked_ms: None,
        }
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked_ms.is_some()
    }

    /// Can a token of this family still refresh, for a user whose token stamp is
    /// `user_stamp`, at `now` (unix seconds)? Not revoked, not expired, and not
    /// ended by `wxauth tokens revoke`.
    pub fn is_live(&self, user_stamp: u64, now: i64) -> bool {
        !self.is_revoked() && self.exp >= now && self.stamp == user_stamp
    }
}

/// [`AuthStore::login`]'s input.
#[derive(Debug, Clone)]
pub struct LoginRequest {
    pub appid: String,
    pub session: Session,
    /// `wechat.link_by_unionid`: find the user by unionid first, and index it.
    pub link_by_unionid: bool,
    /// The new family's id (the caller's random [`FamilyId::random`]).
    pub family: FamilyId,
    /// The first refresh token's `exp` (unix seconds): the family's expiry.
    pub family_exp: i64,
    /// Unix milliseconds: the user's `last_login_at` (seconds) and the family's
    /// `created_ms`/`rotated_ms`.
    pub now_ms: i64,
}

/// What [`AuthStore::login`] did. (Not boxed: it lives for one answer, and the
/// common case is the large variant.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum LoginResult {
    /// The user (found or created) with its last login, session key and indexes
    /// updated, and the new family at generation 1. `created`: the user is new.
    /// The tokens are signed with `user.token_stamp` as read in the same unit.
    LoggedIn {
        user: User,
        created: bool,
        family: FamilyRecord,
        /// The user was marked for deletion: this login cancelled it.
        deletion_cancelled: bool,
    },
    /// The user exists and is disabled: nothing was written.
    Disabled,
}

/// [`AuthStore::start_family`]'s input.
#[derive(Debug, Clone, Copy)]
pub struct StartFamilyRequest {
    pub user_id: UserId,
    /// The new family's id (the caller's random [`FamilyId::random`]).
    pub family: FamilyId,
    /// The first refresh token's `exp` (unix seconds): the family's expiry.
    pub family_exp: i64,
    /// Unix milliseconds: the family's `created_ms`/`rotated_ms`.
    pub now_ms: i64,
}

/// What [`AuthStore::start_family`] did.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum StartFamilyResult {
    /// The user as read in the same unit (its `token_stamp` signs the tokens), and
    /// the new family at generation 1.
    Started { user: User, family: FamilyRecord },
    /// The user exists and is disabled: nothing was written.
    Disabled,
    /// No such user: nothing was written.
    Missing,
}

/// [`AuthStore::rotate`]'s input: a refresh token of `family` carrying `presented`.
#[derive(Debug, Clone, Copy)]
pub struct RotateRequest {
    pub user_id: UserId,
    pub family: FamilyId,
    /// The generation the presented token carries (claim `gen`).
    pub presented: Generation,
    /// Unix milliseconds.
    pub now_ms: i64,
    /// `jwt.reuse_grace` in milliseconds; 0 turns the grace off.
    pub grace_ms: i64,
    /// The new refresh token's `exp` (unix seconds): the family's expiry becomes
    /// the later of this and its own.
    pub exp: i64,
}

/// What [`AuthStore::rotate`] decided, all from the one family record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateOutcome {
    /// `presented` was the family's generation: it is now `generation`
    /// (`presented + 1`) and `rotated_ms` is now. One write. Exactly one of any
    /// number of concurrent rotations of one generation gets this.
    Rotated { generation: Generation },
    /// `presented` is one behind and the family rotated at most `grace_ms` ago (the
    /// grace on): a retry of a rotation whose answer was lost. Answered with a pair
    /// for the current `generation`; NOTHING is written.
    Retry { generation: Generation },
    /// One behind after the grace (or with the grace off), or older: a reuse. The
    /// family is revoked now (durably, before this resolves).
    Reused,
    /// The family was revoked already (logout, reuse, operator): nothing written.
    Revoked,
    /// No such family for this user (never issued here, or purged).
    Missing,
    /// `presented` is ahead of the family (a restore from an older backup): the
    /// token is invalid; nothing written.
    Ahead,
}

/// Where a presented generation stands in its family, read without writing
/// ([`standing`]): the token check (`/api/token/verify/`, logout) and the
/// backends' [`AuthStore::rotate`] share this one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Current,
    /// One behind, within the grace.
    InGrace,
    /// One behind after the grace, or older.
    Reused,
    Revoked,
    Ahead,
}

/// The rule of [`AuthStore::rotate`], on a family as read.
pub fn standing(
    family: &FamilyRecord,
    presented: Generation,
    now_ms: i64,
    grace_ms: i64,
) -> Standing {
    if family.is_revoked() {
        Standing::Revoked
    } else if presented == family.generation {
        Standing::Current
    } else if presented > family.generation {
        Standing::Ahead
    } else if presented.checked_add(1) == Some(family.generation)
        && within_grace(family.rotated_ms, now_ms, grace_ms)
    {
        Standing::InGrace
    } else {
        Standing::Reused
    }
}

/// [`AuthStore::set_profile`]'s change (a record, so that events describe it too).
pub use crate::users::ProfileChange;

/// What [`AuthStore::delete_user`] did.
#[derive(Debug)]
pub enum Deletion {
    /// Marked: erased at `due` (unix seconds) unless a login comes first.
    Scheduled { user: User, due: i64 },
    /// The personal data is erased (the record as it is now).
    Erased { user: User },
}

/// One bounded step of [`AuthStore::purge_expired`].
#[derive(Debug, Default)]
pub struct PurgeProgress {
    /// Records deleted in this step.
    pub deleted: usize,
    /// Where the next step starts (opaque to the caller); `None`: done.
    pub next: Option<Vec<u8>>,
}

/// The storage operations the actors call. Object-safe: `Arc<dyn AuthStore>`.
///
/// Callers: user operations from `UserRegistry`, family operations from
/// `TokenIssuer`, each inside its turn (see the module docs for why sled needs
/// that and SQL does not).
pub trait AuthStore: Send + Sync {
    // ---- users (owner: UserRegistry) ----

    /// Find-or-create the user of `(appid, openid)` (or, when linking, of its
    /// unionid), record the login (last login, session key, a missing index or
    /// unionid added) and start a new family at generation 1: one durable unit.
    /// Resolves only once all of it is durable; a crash before leaves none of it or
    /// a part no login or token can reach (never an index without its user, never
    /// a token for a family that is not there). Two concurrent logins of one new
    /// openid create ONE user (the unique key decides). A disabled user: nothing
    /// written.
    fn login(&self, request: LoginRequest) -> StoreFuture<LoginResult>;

    /// Starts a new family (generation 1) for an EXISTING, enabled user, with no
    /// WeChat session (the web login: a second device of a user who is logged in
    /// on the phone). Reads the user and writes the family as one unit: the user's
    /// disabled flag and `token_stamp` are read in it (the family records that
    /// stamp, as a login's does), so a disable or a revoke
    /// lands wholly before it (then `Disabled`, or tokens signed with the new stamp)
    /// or wholly after it (then it covers the new family too). Resolves `Started`
    /// only once the family is durable, before any token for it is handed out; a
    /// crash before leaves no family or one no token names. The user record is not
    /// written. `Disabled` / `Missing`: nothing written. The family id is the
    /// caller's fresh random value, so nothing can race its creation.
    fn start_family(&self, request: StartFamilyRequest) -> StoreFuture<StartFamilyResult>;

    /// One user by id.
    fn user(&self, id: UserId) -> StoreFuture<Option<User>>;

    /// Disables (or enables) a user; `None`: no such user. Every token check after
    /// this resolves reads the new state.
    fn set_disabled(&self, id: UserId, disabled: bool) -> StoreFuture<Option<User>>;

    /// Bumps the user's token stamp (`wxauth tokens revoke`): every token issued
    /// before carries the old stamp and is refused on every path. No family is
    /// touched. `None`: no such user.
    fn revoke_tokens(&self, id: UserId) -> StoreFuture<Option<User>>;

    /// Records the phone number WeChat gave for the user; `None`: no such user.
    fn set_phone(&self, id: UserId, phone: PhoneNumber) -> StoreFuture<Option<User>>;

    /// Replaces the profile fields given; `None`: no such user (or erased).
    fn set_profile(&self, id: UserId, change: ProfileChange) -> StoreFuture<Option<User>>;

    /// Deletes the account: with `due` later than `now` (unix seconds), marks it
    /// (a login of the user before `due` clears the mark, [`LoginResult`] says so;
    /// a second request keeps the earlier `due`); otherwise erases it now: the
    /// indexes that point at it (openid, unionid), its families and its personal
    /// fields ([`User::erase`]), the record itself kept so that its id is never
    /// handed out again. One durable unit that a crash leaves done or resumable:
    /// the mark is written first and removed last, and [`AuthStore::due_deletions`]
    /// finds it again. `None`: no such user, or erased already.
    ///
    /// `only_if_due` (the sweep's call): erase only a user still marked with a due
    /// at or before `now`, else `None` and nothing written: a login may have
    /// cancelled the mark since [`AuthStore::due_deletions`] listed it, and the
    /// check and the erasure are one unit.
    fn delete_user(
        &self,
        id: UserId,
        due: i64,
        now: i64,
        only_if_due: bool,
    ) -> StoreFuture<Option<Deletion>>;

    /// The marked users whose `due` is at or before `now`, at most `limit`, earliest
    /// first (the sweep erases each with [`AuthStore::delete_user`]).
    fn due_deletions(&self, now: i64, limit: usize) -> StoreFuture<Vec<UserId>>;

    // ---- families (owner: TokenIssuer) ----

    /// The compare-and-swap of a refresh: see [`RotateOutcome`] for each answer.
    /// Decided from the family record alone, read and written as one unit.
    fn rotate(&self, request: RotateRequest) -> StoreFuture<RotateOutcome>;

    /// Revokes the family (logout, or the issuer after a reuse it found itself).
    /// `true`: it was live and is revoked now; `false`: revoked already, or missing.
    fn revoke_family(&self, user_id: UserId, family: FamilyId, now_ms: i64) -> StoreFuture<bool>;

    /// Revokes every live family of the user (log out everywhere): the number
    /// revoked. Each is revoked once, as [`AuthStore::revoke_family`] does it.
    fn revoke_families(&self, user_id: UserId, now_ms: i64) -> StoreFuture<usize>;

    /// One family (the token check of a refresh token reads it).
    fn family(&self, user_id: UserId, family: FamilyId) -> StoreFuture<Option<FamilyRecord>>;

    /// Every family of a user, live or not, in family-id order (a prefix scan).
    fn families(&self, user_id: UserId) -> StoreFuture<Vec<FamilyRecord>>;

    /// One bounded step of the purge: deletes at most about `limit` records whose
    /// every token expired before `cutoff` (unix seconds; the caller subtracts the
    /// leeway and the grace), from `from` on (`None`: the start). Losing a step in a
    /// crash only means purging again: its future need not wait for the disk.
    fn purge_expired(
        &self,
        cutoff: i64,
        from: Option<Vec<u8>>,
        limit: usize,
    ) -> StoreFuture<PurgeProgress>;

    // ---- meta (owner: the access-token keeper) ----

    /// The WeChat access-token record of `appid` (its JSON, as the keeper encodes it).
    fn access_token(&self, appid: &str) -> StoreFuture<Option<Vec<u8>>>;

    /// Replaces the access-token record of `appid`. Durable on resolve.
    fn put_access_token(&self, appid: &str, record: Vec<u8>) -> StoreFuture<()>;

    /// Takes the lease `name` for `holder` until `until_ms` if it is free, expired
    /// (its end before `now_ms`) or `holder`'s already: `true` when taken. One holder
    /// at a time across every process on the store (the refresh of an app's WeChat
    /// access token). With one process there is no one to share with: the default
    /// always grants it.
    fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreFuture<bool> {
        let _ = (name, holder, now_ms, until_ms);
        Box::pin(std::future::ready(Ok(true)))
    }
}

/// A token rotated out at `rotated_at_ms` may still be presented at `now_ms` when the
/// grace is on and has not ended: it ends at exactly `grace_ms` (one millisecond later
/// is a reuse). A grace of 0 is off: any presentation after rotation is a reuse.
pub fn within_grace(rotated_at_ms: i64, now_ms: i64, grace_ms: i64) -> bool {
    grace_ms > 0 && now_ms.saturating_sub(rotated_at_ms) <= grace_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grace_ends_at_exactly_its_length_and_zero_turns_it_off() {
        assert!(within_grace(1_000, 1_000, 1));
        assert!(within_grace(1_000, 2_000, 1_000));
        assert!(!within_grace(1_000, 2_001, 1_000));
        assert!(!within_grace(1_000, 1_000, 0), "grace 0: refused at once");
        assert!(!within_grace(i64::MIN, i64::MAX, i64::MAX - 1), "no wrap");
    }

    fn family(generation: Generation, rotated_ms: i64) -> FamilyRecord {
        FamilyRecord {
            user_id: 7,
            id: FamilyId([1; 16]),
            generation,
            created_ms: 0,
            rotated_ms,
            exp: 0,
            revoked_ms: None,
            stamp: 0,
        }
    }

    #[test]
    fn the_standing_of_a_generation() {
        let f = family(5, 1_000);
        assert_eq!(standing(&f, 5, 9_999, 0), Standing::Current);
        assert_eq!(standing(&f, 6, 1_000, 0), Standing::Ahead);
        assert_eq!(standing(&f, 4, 2_000, 1_000), Standing::InGrace);
        assert_eq!(standing(&f, 4, 2_001, 1_000), Standing::Reused);
        assert_eq!(standing(&f, 4, 1_000, 0), Standing::Reused, "grace off");
        assert_eq!(
            standing(&f, 3, 1_000, 1_000),
            Standing::Reused,
            "two behind"
        );
        let revoked = FamilyRecord {
            revoked_ms: Some(1),
            ..f
        };
        assert_eq!(standing(&revoked, 5, 1_000, 0), Standing::Revoked);
    }

    #[test]
    fn keys_sort_by_user_then_family_and_split_back() {
        let a = family_key(1, FamilyId([0xff; 16]));
        let b = family_key(2, FamilyId([0; 16]));
        assert!(a < b, "a user's families are one prefix");
        assert_eq!(split_family_key(&b), Some((2, FamilyId([0; 16]))));
        assert_eq!(split_family_key(&b[..23]), None);
        let id = FamilyId::random();
        assert_eq!(FamilyId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(FamilyId::from_hex("00"), None);
        assert_eq!(FamilyId::from_hex(&"g".repeat(32)), None);
    }
}
