//! The storage format version, and the upgrade from what older releases wrote.
//!
//! `meta` holds `format_version` (8 bytes big-endian). A data directory without it
//! was written by a release before it (format 1: a record per refresh token in
//! `refresh_tokens`, its family in `token_families`). Format 2 is one record per
//! login in `families` (`storage::model`). [`run`] (at every open, and after a
//! restore) refuses a newer format, and moves format-1 families into `families`:
//!
//! - each legacy family becomes a family at generation 1, keyed by its user and its
//!   id, with its creation, expiry and revocation; it "last rotated" when its
//!   newest rotated-out token was rotated (so the grace of those tokens holds);
//! - `refresh_tokens` stays, read only, until its tokens expire (the purge deletes
//!   them): a legacy refresh token (no `fam` claim) is read as generation 1 of its
//!   family when it was its family's current token, else generation 0
//!   ([`legacy_refresh`]). So it refreshes into the new form once, then counts as
//!   rotated out; a logged-out family stays revoked.
//!
//! Crash safety without the journal: each family is written to `families` before
//! its legacy record is deleted, an existing new record is never overwritten, and
//! the version is written last; an interrupted upgrade runs again at the next open.

use super::model::{family_key, FamilyId, FamilyRecord, Generation};
use super::{ReadStore, StorageError, Store, Tree, WriteBatch};
use crate::users::UserId;
use serde::Deserialize;
use std::collections::HashMap;
use std::ops::ControlFlow;

/// Opens (creating it if missing) the data directory `config.path`: the one place
/// the binary and the CLI get a store from, so only `sled.rs` names the engine.
/// Its storage format is checked and, when an older release wrote it, upgraded
/// (here) before anything else reads it.
pub fn open(
    config: &crate::config::StorageConfig,
) -> Result<std::sync::Arc<dyn Store>, StorageError> {
    let store = super::sled::SledStore::open(&config.path, config.cache_capacity.bytes())?;
    run(&store)?;
    Ok(std::sync::Arc::new(store))
}

/// The format this binary writes.
pub const FORMAT_VERSION: u64 = 2;
/// `meta` key of the format version.
pub const FORMAT_KEY: &[u8] = b"format_version";

/// A format-1 refresh record (`refresh_tokens`: jti → this JSON).
#[derive(Debug, Clone, Deserialize)]
pub struct LegacyRefresh {
    pub family: String,
    pub user_id: UserId,
    /// The token's `exp` (unix seconds).
    pub exp: i64,
    /// When a refresh replaced it (unix milliseconds; older releases wrote whole
    /// seconds as `rotated_at`).
    #[serde(default)]
    rotated_at_ms: Option<i64>,
    #[serde(default)]
    rotated_at: Option<i64>,
}

impl LegacyRefresh {
    pub fn rotated_ms(&self) -> Option<i64> {
        self.rotated_at_ms
            .or_else(|| self.rotated_at.map(|secs| secs.saturating_mul(1000)))
    }
}

/// A format-1 family (`token_families`: 32-hex id → this JSON).
#[derive(Debug, Clone, Deserialize)]
struct LegacyFamily {
    user_id: UserId,
    created_at: i64,
    exp: i64,
    #[serde(default)]
    revoked_at: Option<i64>,
}

fn corrupt(tree: Tree, reason: impl ToString) -> StorageError {
    StorageError::Corrupt {
        tree: tree.name(),
        reason: reason.to_string(),
    }
}

/// The stored format version (`None`: none recorded).
pub fn stored_version(store: &dyn ReadStore) -> Result<Option<u64>, StorageError> {
    store
        .get(Tree::Meta, FORMAT_KEY)?
        .map(|bytes| {
            <[u8; 8]>::try_from(bytes.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| corrupt(Tree::Meta, "format_version is not 8 bytes"))
        })
        .transpose()
}

/// Refuses a newer format; upgrades an older one; records the version. Durable on
/// return when it wrote anything.
pub fn run(store: &dyn Store) -> Result<(), StorageError> {
    let found = stored_version(store)?;
    if let Some(found) = found.filter(|v| *v > FORMAT_VERSION) {
        return Err(StorageError::NewerFormat {
            found,
            known: FORMAT_VERSION,
        });
    }
    let moved = migrate_families(store)?;
    if moved > 0 {
        tracing::warn!(
            families = moved,
            "upgraded the data directory: one record per login"
        );
    }
    if found != Some(FORMAT_VERSION) {
        let mut batch = WriteBatch::default();
        batch.put(Tree::Meta, FORMAT_KEY, FORMAT_VERSION.to_be_bytes());
        store.apply(batch)?;
    }
    if moved > 0 || found != Some(FORMAT_VERSION) {
        store.flush()?;
    }
    Ok(())
}

/// Moves every legacy family into `families`; returns how many.
fn migrate_families(store: &dyn Store) -> Result<usize, StorageError> {
    let mut legacy = Vec::new();
    store.for_each(Tree::TokenFamilies, &mut |key, value| {
        legacy.push((key.to_vec(), value.to_vec()));
        ControlFlow::Continue(())
    })?;
    if legacy.is_empty() {
        return Ok(0);
    }
    // When each family's newest rotated-out token was rotated out.
    let mut rotated: HashMap<String, i64> = HashMap::new();
    let mut bad = None;
    store.for_each(
        Tree::RefreshTokens,
        &mut |_, value| match serde_json::from_slice::<LegacyRefresh>(value) {
            Ok(record) => {
                if let Some(at) = record.rotated_ms() {
                    let newest = rotated.entry(record.family).or_insert(at);
                    *newest = (*newest).max(at);
                }
                ControlFlow::Continue(())
            }
            Err(e) => {
                bad = Some(corrupt(Tree::RefreshTokens, e));
                ControlFlow::Break(())
            }
        },
    )?;
    if let Some(e) = bad {
        return Err(e);
    }
    for (key, value) in &legacy {
        let family: LegacyFamily =
            serde_json::from_slice(value).map_err(|e| corrupt(Tree::TokenFamilies, e))?;
        let text = std::str::from_utf8(key).unwrap_or_default();
        let mut batch = WriteBatch::default();
        if let Some(id) = FamilyId::from_hex(text) {
            let new_key = family_key(family.user_id, id);
            if store.get(Tree::Families, &new_key)?.is_none() {
                let created_ms = family.created_at.saturating_mul(1000);
                let record = FamilyRecord {
                    user_id: family.user_id,
                    id,
                    generation: 1,
                    created_ms,
                    rotated_ms: rotated.get(text).copied().unwrap_or(created_ms),
                    exp: family.exp,
                    revoked_ms: family.revoked_at.map(|s| s.saturating_mul(1000)),
                    // A format-1 revoke bumped the stamp and revoked every family:
                    // a family still live was started under the current stamp.
                    stamp: crate::users::load(store, family.user_id)?
                        .map_or(0, |user| user.token_stamp),
                };
                batch.put(
                    Tree::Families,
                    new_key,
                    super::sled_model::encode_family(&record),
                );
            }
        }
        // First the new record, then the old one goes.
        batch.delete(Tree::TokenFamilies, key.clone());
        store.apply_in_order(batch)?;
    }
    Ok(legacy.len())
}

/// A legacy refresh token (one without `fam`): its family and the generation it
/// counts as (1: it was its family's current token; 0: rotated out). `None`: no
/// record of that jti for that user.
pub fn legacy_refresh(
    store: &dyn ReadStore,
    jti: &str,
    user_id: UserId,
) -> Result<Option<(FamilyId, Generation)>, StorageError> {
    let Some(bytes) = store.get(Tree::RefreshTokens, jti.as_bytes())? else {
        return Ok(None);
    };
    let record: LegacyRefresh =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(Tree::RefreshTokens, e))?;
    if record.user_id != user_id {
        return Ok(None);
    }
    let Some(family) = FamilyId::from_hex(&record.family) else {
        return Ok(None);
    };
    let generation = if record.rotated_ms().is_none() { 1 } else { 0 };
    Ok(Some((family, generation)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::sled::SledStore;

    #[test]
    fn format_1_families_move_and_legacy_tokens_map_to_generations() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        let fam = "0123456789abcdef0123456789abcdef";
        let mut batch = WriteBatch::default();
        batch.put(
            Tree::TokenFamilies,
            fam.as_bytes(),
            r#"{"user_id":3,"created_at":100,"exp":900,"current":"b","revoked_at":null}"#,
        );
        batch.put(
            Tree::RefreshTokens,
            b"a".as_slice(),
            format!(r#"{{"family":"{fam}","user_id":3,"exp":800,"rotated_at":200}}"#),
        );
        batch.put(
            Tree::RefreshTokens,
            b"b".as_slice(),
            format!(r#"{{"family":"{fam}","user_id":3,"exp":900}}"#),
        );
        store.apply(batch).unwrap();
        run(&store).unwrap();
        assert_eq!(stored_version(&store).unwrap(), Some(FORMAT_VERSION));
        let id = FamilyId::from_hex(fam).unwrap();
        let family = crate::storage::sled_model::load_family(&store, 3, id)
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                family.generation,
                family.created_ms,
                family.rotated_ms,
                family.exp
            ),
            (1, 100_000, 200_000, 900)
        );
        assert!(store
            .get(Tree::TokenFamilies, fam.as_bytes())
            .unwrap()
            .is_none());
        assert_eq!(legacy_refresh(&store, "b", 3).unwrap(), Some((id, 1)));
        assert_eq!(legacy_refresh(&store, "a", 3).unwrap(), Some((id, 0)));
        assert_eq!(
            legacy_refresh(&store, "a", 4).unwrap(),
            None,
            "another user"
        );

        // A newer format is refused, saying so.
        let mut batch = WriteBatch::default();
        batch.put(Tree::Meta, FORMAT_KEY, 3u64.to_be_bytes());
        store.apply(batch).unwrap();
        let err = run(&store).unwrap_err();
        assert!(matches!(
            err,
            StorageError::NewerFormat { found: 3, known: 2 }
        ));
        assert!(err.to_string().contains("newer wxauth"), "{err}");
    }
}
