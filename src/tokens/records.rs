//! Refresh-token bookkeeping: every issued refresh token and the family (login)
//! it belongs to. Created at login by the user registry (`tokens::issue`), changed
//! only by the token issuer actor; read anywhere.
//!
//! Layout (keys are the 32-hex-char ids as bytes, values JSON):
//! - `refresh_tokens`: jti → [`RefreshRecord`]
//! - `token_families`: family id → [`Family`]

use crate::storage::{ReadStore, ScannedKeys, StorageError, Tree};
use crate::users::UserId;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "StoredRefreshRecord")]
pub struct RefreshRecord {
    pub family: String,
    pub user_id: UserId,
    /// The token's `exp` (unix seconds).
    pub exp: i64,
    /// Set when a refresh replaced this token (unix milliseconds): the reuse grace
    /// counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_at_ms: Option<i64>,
}

/// A refresh record as stored by any version: before rotation times were exact,
/// `rotated_at` was whole unix seconds. Read both; write only milliseconds.
#[derive(Deserialize)]
struct StoredRefreshRecord {
    family: String,
    user_id: UserId,
    exp: i64,
    #[serde(default)]
    rotated_at_ms: Option<i64>,
    #[serde(default)]
    rotated_at: Option<i64>,
}

impl From<StoredRefreshRecord> for RefreshRecord {
    fn from(stored: StoredRefreshRecord) -> Self {
        RefreshRecord {
            family: stored.family,
            user_id: stored.user_id,
            exp: stored.exp,
            rotated_at_ms: stored
                .rotated_at_ms
                .or_else(|| stored.rotated_at.map(|secs| secs.saturating_mul(1000))),
        }
    }
}

/// One login's chain of refresh tokens; revoking it ends them all.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Family {
    pub user_id: UserId,
    pub created_at: i64,
    /// The latest expiry of any member: after it, the family can be purged.
    pub exp: i64,
    /// The jti of the one refresh token that may rotate without a grace check.
    pub current: String,
    /// Set when the family was revoked (unix seconds; only its presence is read:
    /// a revoked family is a state, not a time comparison).
    #[serde(default)]
    pub revoked_at: Option<i64>,
}

pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records always serialize")
}

fn decode<T: DeserializeOwned>(tree: Tree, bytes: &[u8]) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt {
        tree: tree.name(),
        reason: e.to_string(),
    })
}

pub fn load_refresh(
    store: &dyn ReadStore,
    jti: &str,
) -> Result<Option<RefreshRecord>, StorageError> {
    let tree = Tree::RefreshTokens;
    store
        .get(tree, jti.as_bytes())?
        .map(|b| decode(tree, &b))
        .transpose()
}

pub fn load_family(store: &dyn ReadStore, id: &str) -> Result<Option<Family>, StorageError> {
    let tree = Tree::TokenFamilies;
    store
        .get(tree, id.as_bytes())?
        .map(|b| decode(tree, &b))
        .transpose()
}

/// Families scanned per step of a revocation (see [`user_families_from`]). A step's
/// revocations are one batch, journaled as one record: 250 families (about 170 bytes
/// each) keep it far below the ~128 KiB at which sled writes a blob file that its
/// flush does not fsync (1,000 did not).
pub const REVOKE_SCAN_CHUNK: usize = 250;

/// One bounded step of the scan for `user_id`'s live families: the ids found among
/// at most `limit` families from `from` on, and where the next step starts (`None`:
/// done). Read-only: it runs off the token issuer's thread.
pub fn user_families_from(
    store: &dyn ReadStore,
    user_id: UserId,
    from: &[u8],
    limit: usize,
) -> Result<ScannedKeys, StorageError> {
    let mut found = Vec::new();
    let next = crate::storage::scan_chunk(
        store,
        Tree::TokenFamilies,
        from,
        limit,
        &mut |key, value| {
            if let Ok(family) = serde_json::from_slice::<Family>(value) {
                if family.user_id == user_id && family.revoked_at.is_none() {
                    found.push(key.to_vec());
                }
            }
        },
    )?;
    Ok(ScannedKeys { keys: found, next })
}

/// Revokes the families `ids` that, read again now, still belong to `user_id` and
/// are live (the scan that found them ran earlier, on another thread). One batch.
/// Returns how many were revoked. Not durable on return: the caller commits.
pub fn revoke_families(
    store: &dyn crate::storage::Store,
    user_id: UserId,
    ids: &[Vec<u8>],
    now: i64,
) -> Result<usize, StorageError> {
    let mut batch = crate::storage::WriteBatch::default();
    for id in ids {
        let Some(bytes) = store.get(Tree::TokenFamilies, id)? else {
            continue;
        };
        let mut family: Family = decode(Tree::TokenFamilies, &bytes)?;
        if family.user_id == user_id && family.revoked_at.is_none() {
            family.revoked_at = Some(now);
            batch.put(Tree::TokenFamilies, id.clone(), encode(&family));
        }
    }
    let count = batch.len();
    store.apply(batch)?;
    Ok(count)
}

/// Revokes every live family of `user_id` (a full scan, in chunks: an operator
/// action, not a request path). Returns how many were revoked. The admin CLI with
/// the server stopped calls this; the running server's token issuer does the same
/// steps with the scans off its thread (`RevokeUserFamilies`).
pub fn revoke_user_families(
    store: &dyn crate::storage::Store,
    user_id: UserId,
    now: i64,
) -> Result<usize, StorageError> {
    let mut revoked = 0;
    let mut from = Vec::new();
    loop {
        let scanned = user_families_from(store, user_id, &from, REVOKE_SCAN_CHUNK)?;
        revoked += revoke_families(store, user_id, &scanned.keys, now)?;
        match scanned.next {
            Some(next) => from = next,
            None => return Ok(revoked),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_times_in_seconds_still_load_as_milliseconds() {
        let old: RefreshRecord = serde_json::from_slice(
            br#"{"family":"f","user_id":3,"exp":1700000100,"rotated_at":1700000000}"#,
        )
        .unwrap();
        assert_eq!(old.rotated_at_ms, Some(1_700_000_000_000));
        let current: RefreshRecord =
            serde_json::from_slice(br#"{"family":"f","user_id":3,"exp":1700000100}"#).unwrap();
        assert_eq!(current.rotated_at_ms, None);

        let rotated = RefreshRecord {
            rotated_at_ms: Some(1_700_000_000_123),
            ..current
        };
        let text = String::from_utf8(encode(&rotated)).unwrap();
        assert!(text.contains(r#""rotated_at_ms":1700000000123"#), "{text}");
        assert!(!text.contains(r#""rotated_at":"#), "{text}");
        let again: RefreshRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(again.rotated_at_ms, Some(1_700_000_000_123));
    }
}
