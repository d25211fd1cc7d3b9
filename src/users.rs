//! The user record and its keys. Written only by the user registry actor;
//! read from anywhere through a [`ReadStore`] (the request path reads here).
//!
//! Layout:
//! - `users`: id as 8 bytes big-endian → JSON [`User`]
//! - `users_by_openid`: `appid 0x00 openid` → id (8 bytes BE)
//! - `users_by_unionid`: `unionid` → id (8 bytes BE)
//! - `meta`: `next_user_id` → 8 bytes BE (ids are never reused)

use crate::secret::Secret;
use crate::storage::{ReadStore, StorageError, Tree};
use serde::{Deserialize, Serialize};

pub type UserId = u64;

pub const NEXT_USER_ID_KEY: &[u8] = b"next_user_id";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub id: UserId,
    pub appid: String,
    pub openid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unionid: Option<String>,
    /// WeChat's latest session key for this user (for decrypting wx data later).
    pub session_key: Secret,
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
    /// Legacy: revokes made before token stamps refused tokens issued before this unix
    /// second. No longer written; still honoured so that those revokes stay in force.
    #[serde(default)]
    pub tokens_not_before: i64,
}

impl User {
    /// A user first seen now: enabled, no revocation.
    pub fn new(
        id: UserId,
        appid: &str,
        openid: &str,
        unionid: Option<String>,
        session_key: Secret,
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
        }
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

pub fn encode(user: &User) -> Vec<u8> {
    serde_json::to_vec(user).expect("a User always serializes")
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
    Ok(store
        .get(Tree::Meta, NEXT_USER_ID_KEY)?
        .map(|b| decode_id(Tree::Meta, &b))
        .transpose()?
        .map_or(0, |next| next - 1))
}

/// RFC 3339 text for a unix timestamp, as the API shows it.
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
