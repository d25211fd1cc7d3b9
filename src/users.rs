//! The user record and its keys. Written only by the user registry actor;
//! read from anywhere through a [`ReadStore`] (the request path reads here).
//!
//! Layout:
//! - `users`: id as 8 bytes big-endian → JSON [`User`]
//! - `users_by_openid`: `appid 0x00 openid` → id (8 bytes BE)
//! - `users_by_unionid`: `unionid` → id (8 bytes BE)
//! - `meta`: `next_user_id` → 8 bytes BE: older releases' counter, read only (ids
//!   are never reused: the next is one more than the greatest, see [`first_free_id`])

pub mod cache;
pub mod export;

use crate::secret::SessionKey;
use crate::storage::{ReadStore, StorageError, Tree};
use serde::{Deserialize, Serialize};

pub type UserId = u64;

/// The phone number WeChat returned, as stored on the user.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhoneNumber {
    /// With the country code for numbers outside mainland China (WeChat's `phoneNumber`).
    pub phone_number: String,
    pub pure_phone_number: String,
    pub country_code: String,
}

/// Never printed: a phone number is personal data and stays out of logs.
impl std::fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PhoneNumber([redacted])")
    }
}

pub const NEXT_USER_ID_KEY: &[u8] = b"next_user_id";

/// No `Serialize`: the record is written only by [`encode`] (the one place the session
/// key leaves its type); answers build their own views of it.
///
/// ```compile_fail
/// fn leak(user: &wxauth::users::User) -> String { serde_json::to_string(user).unwrap() }
/// ```
#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub id: UserId,
    pub appid: String,
    pub openid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unionid: Option<String>,
    /// WeChat's latest session key for this user (for decrypting wx data later).
    pub session_key: SessionKey,
    /// Unix seconds.
    pub created_at: i64,
    pub last_login_at: i64,
    #[serde(default)]
    pub disabled: bool,
    /// Bumped by `wxauth tokens revoke`: a token counts only while it carries the
    /// user's current stamp (claim `stamp`; 0 before the first revoke, and for records
    /// and tokens from before stamps existed).
    #[serde(default)]
    pub token_stamp: u64,
    /// Legacy: revokes made before token stamps existed refused tokens issued before
    /// this unix second. Never written; honoured so that those revokes stay in force.
    #[serde(default)]
    pub tokens_not_before: i64,
    /// From `POST /api/weixin/phone/` (WeChat's getuserphonenumber); `None` until then.
    /// Boxed: most users have none, and a `User` travels by value in actor answers.
    #[serde(default)]
    pub phone: Option<Box<PhoneNumber>>,
    /// `PATCH /api/weixin/user/`: what the mini-program collected.
    #[serde(default)]
    pub nickname: Option<String>,
    #[serde(default)]
    pub avatar_url: Option<String>,
    /// The account is marked for deletion: its personal data is erased at this unix
    /// second unless a login comes first (`users.deletion_delay`).
    #[serde(default)]
    pub deletion_due: Option<i64>,
    /// The personal data was erased at this unix second: the record keeps only its
    /// id (never handed out again), app and timestamps. No token and no login
    /// reaches it.
    #[serde(default)]
    pub erased_at: Option<i64>,
}

impl User {
    /// A user first seen now: enabled, no revocation.
    pub fn new(
        id: UserId,
        appid: &str,
        openid: &str,
        unionid: Option<String>,
        session_key: SessionKey,
        now: i64,
    ) -> Self {
        User {
            id,
            appid: appid.to_string(),
            openid: openid.to_string(),
            unionid,
            session_key,
            created_at: now,
            last_login_at: now,
            disabled: false,
            token_stamp: 0,
            tokens_not_before: 0,
            phone: None,
            nickname: None,
            avatar_url: None,
            deletion_due: None,
            erased_at: None,
        }
    }
}

impl User {
    /// Erases the personal data in place: what stays is the id, the app, the
    /// timestamps and the erasure's time. Disabled, with a new token stamp: no
    /// token issued before reaches it, and no index points at it.
    pub fn erase(&mut self, now: i64) {
        self.openid = String::new();
        self.unionid = None;
        self.session_key = SessionKey::new("");
        self.phone = None;
        self.nickname = None;
        self.avatar_url = None;
        self.deletion_due = None;
        self.erased_at = Some(now);
        self.disabled = true;
        self.token_stamp = self.token_stamp.wrapping_add(1);
    }
}

pub fn id_key(id: UserId) -> [u8; 8] {
    id.to_be_bytes()
}

pub fn openid_key(appid: &str, openid: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(appid.len() + 1 + openid.len());
    key.extend_from_slice(appid.as_bytes());
    key.push(0);
    key.extend_from_slice(openid.as_bytes());
    key
}

pub fn decode_id(tree: Tree, bytes: &[u8]) -> Result<UserId, StorageError> {
    let raw: [u8; 8] = bytes.try_into().map_err(|_| StorageError::Corrupt {
        tree: tree.name(),
        reason: format!("user id of {} bytes", bytes.len()),
    })?;
    Ok(UserId::from_be_bytes(raw))
}

/// The stored form of a [`User`]: the same JSON as ever (existing data directories
/// and backups read unchanged), with the session key in clear; only [`encode`] makes
/// one.
#[derive(Serialize)]
struct StoredUser<'a> {
    id: UserId,
    appid: &'a str,
    openid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    unionid: &'a Option<String>,
    session_key: &'a str,
    created_at: i64,
    last_login_at: i64,
    disabled: bool,
    token_stamp: u64,
    tokens_not_before: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    phone: &'a Option<Box<PhoneNumber>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nickname: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    avatar_url: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deletion_due: &'a Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    erased_at: &'a Option<i64>,
}

pub fn encode(user: &User) -> Vec<u8> {
    // Destructured in full: a field added to User does not compile until it is
    // stored here too.
    let User {
        id,
        appid,
        openid,
        unionid,
        session_key,
        created_at,
        last_login_at,
        disabled,
        token_stamp,
        tokens_not_before,
        phone,
        nickname,
        avatar_url,
        deletion_due,
        erased_at,
    } = user;
    let stored = StoredUser {
        id: *id,
        appid,
        openid,
        unionid,
        session_key: session_key.expose(),
        created_at: *created_at,
        last_login_at: *last_login_at,
        disabled: *disabled,
        token_stamp: *token_stamp,
        tokens_not_before: *tokens_not_before,
        phone,
        nickname,
        avatar_url,
        deletion_due,
        erased_at,
    };
    serde_json::to_vec(&stored).expect("a User always serializes")
}

pub fn decode(bytes: &[u8]) -> Result<User, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt {
        tree: Tree::Users.name(),
        reason: e.to_string(),
    })
}

/// Reads one user by id.
pub fn load(store: &dyn ReadStore, id: UserId) -> Result<Option<User>, StorageError> {
    store
        .get(Tree::Users, &id_key(id))?
        .map(|b| decode(&b))
        .transpose()
}

/// Looks up a user id by an index tree (`users_by_openid` or `users_by_unionid`).
pub fn lookup(
    store: &dyn ReadStore,
    index: Tree,
    key: &[u8],
) -> Result<Option<UserId>, StorageError> {
    store
        .get(index, key)?
        .map(|b| decode_id(index, &b))
        .transpose()
}

/// How many users were ever created: ids are handed out in order and never reused,
/// so this is one read, not a scan (it matters at a million users).
pub fn count(store: &dyn ReadStore) -> Result<u64, StorageError> {
    Ok(first_free_id(store)? - 1)
}

/// The first user id never handed out: one more than the greatest in `users`, or
/// older releases' `meta` counter when that is greater (two reads).
pub fn first_free_id(store: &dyn ReadStore) -> Result<UserId, StorageError> {
    let counter = match store.get(Tree::Meta, NEXT_USER_ID_KEY)? {
        Some(bytes) => decode_id(Tree::Meta, &bytes)?,
        None => 1,
    };
    let after_last = match store.last(Tree::Users)? {
        Some((key, _)) => decode_id(Tree::Users, &key)? + 1,
        None => 1,
    };
    Ok(counter.max(after_last))
}

/// A change of a user's profile: each field given replaces the stored one.
#[derive(Debug, Clone, Default)]
pub struct ProfileChange {
    pub nickname: Option<String>,
    pub avatar_url: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as every earlier version wrote it.
    const STORED: &str = r#"{"id":7,"appid":"wxa","openid":"o-7","unionid":"u-7","session_key":"tiihtNczf5v6AKRyjwEUhQ==","created_at":1700000000,"last_login_at":1700000100,"disabled":true,"tokens_not_before":1700000050}"#;

    #[test]
    fn the_stored_format_is_unchanged_and_round_trips() {
        let user = decode(STORED.as_bytes()).unwrap();
        assert_eq!(user.session_key.expose(), "tiihtNczf5v6AKRyjwEUhQ==");
        // Re-encoded, it gains only the token stamp (0 for a record from before stamps).
        assert_eq!(
            String::from_utf8(encode(&user)).unwrap(),
            STORED.replace(r#""disabled":true,"#, r#""disabled":true,"token_stamp":0,"#)
        );
        let mut new = User::new(8, "wxa", "o-8", None, SessionKey::new("k8"), 5);
        new.tokens_not_before = 6;
        new.token_stamp = 3;
        let text = String::from_utf8(encode(&new)).unwrap();
        assert_eq!(
            text,
            r#"{"id":8,"appid":"wxa","openid":"o-8","session_key":"k8","created_at":5,"last_login_at":5,"disabled":false,"token_stamp":3,"tokens_not_before":6}"#
        );
        // Records written before `disabled` and `tokens_not_before` existed.
        let old = decode(br#"{"id":1,"appid":"a","openid":"o","session_key":"k","created_at":1,"last_login_at":2}"#).unwrap();
        assert!(!old.disabled && old.tokens_not_before == 0 && old.token_stamp == 0);
    }

    #[test]
    fn a_phone_number_is_stored_and_read_back_but_never_printed() {
        let mut user = User::new(9, "wxa", "o-9", None, SessionKey::new("k9"), 5);
        user.phone = Some(Box::new(PhoneNumber {
            phone_number: "+1 2025550123".into(),
            pure_phone_number: "2025550123".into(),
            country_code: "1".into(),
        }));
        let text = String::from_utf8(encode(&user)).unwrap();
        assert!(text.ends_with(r#""phone":{"phone_number":"+1 2025550123","pure_phone_number":"2025550123","country_code":"1"}}"#), "{text}");
        let back = decode(text.as_bytes()).unwrap();
        assert_eq!(back.phone, user.phone);
        assert!(!format!("{back:?}").contains("2025550123"));
    }

    #[test]
    fn debug_of_a_user_redacts_the_session_key() {
        let user = decode(STORED.as_bytes()).unwrap();
        let debug = format!("{user:?}");
        assert!(debug.contains("session_key: [redacted]"), "{debug}");
        assert!(!debug.contains("tiihtNczf5v6AKRyjwEUhQ=="), "{debug}");
    }
}
