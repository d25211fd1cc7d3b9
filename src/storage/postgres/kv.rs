//! The key-value view of the schema: [`ReadStore`] and [`Store`] for [`PgStore`],
//! with the embedded store's keys and values (`users.rs`, `storage/sled_model.rs`).
//!
//! It serves what speaks trees rather than operations: the admin commands' reads,
//! the readiness probe, the access token keeper's record, the metrics' gauges, and
//! backup and restore, which therefore move data between
//! the two backends unchanged (a backup is the same file whichever wrote it).
//! Writes through [`Store::apply`] are blind puts: they are for restore, the probe and
//! the keeper's own record, never for a rule that several nodes race on (those are
//! the [`AuthStore`](crate::storage::model::AuthStore) operations).
//!
//! Reads block the calling thread on the store's runtime for one round trip, so
//! nothing on an HTTP worker reads through here: the token check awaits the
//! operations' reads ([`AuthStore::user`](crate::storage::model::AuthStore::user),
//! [`AuthStore::family`](crate::storage::model::AuthStore::family)) instead.

use super::{family_from_row, pg_error, user_from_row, PgStore, FAMILY_COLUMNS, USER_COLUMNS};
use crate::storage::model::{family_key, split_family_key};
use crate::storage::{
    Op, ReadStore, SnapshotVisitor, StorageError, Store, Tree, Visitor, WriteBatch,
};
use crate::users::{self, User, UserId};
use deadpool_postgres::GenericClient;
use std::ops::ControlFlow;

/// Rows per page of a scan.
const PAGE: i64 = 1_000;

fn corrupt(tree: Tree, reason: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        tree: tree.name(),
        reason: reason.into(),
    }
}

fn user_id_of(key: &[u8]) -> Option<i64> {
    let raw: [u8; 8] = key.try_into().ok()?;
    i64::try_from(u64::from_be_bytes(raw)).ok()
}

/// `appid 0x00 openid` → its two parts.
fn split_openid_key(key: &[u8]) -> Option<(&str, &str)> {
    let at = key.iter().position(|&b| b == 0)?;
    let appid = std::str::from_utf8(&key[..at]).ok()?;
    let openid = std::str::from_utf8(&key[at + 1..]).ok()?;
    Some((appid, openid))
}

/// One entry, by its embedded-store key.
pub(super) async fn get<C: GenericClient>(
    client: &C,
    tree: Tree,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StorageError> {
    let e = |e| pg_error(format!("read {}", tree.name()), e);
    Ok(match tree {
        Tree::Users => {
            let Some(id) = user_id_of(key) else {
                return Ok(None);
            };
            let sql = format!("SELECT {USER_COLUMNS} FROM wxauth_users WHERE id = $1");
            match client.query_opt(&sql, &[&id]).await.map_err(e)? {
                Some(row) => Some(users::encode(&user_from_row(&row)?)),
                None => None,
            }
        }
        Tree::UsersByOpenid => {
            let Some((appid, openid)) = split_openid_key(key) else {
                return Ok(None);
            };
            client
                .query_opt(
                    "SELECT user_id FROM wxauth_user_openids WHERE appid = $1 AND openid = $2",
                    &[&appid, &openid],
                )
                .await
                .map_err(e)?
                .map(|row| (row.get::<_, i64>(0) as UserId).to_be_bytes().to_vec())
        }
        Tree::UsersByUnionid => {
            let Ok(unionid) = std::str::from_utf8(key) else {
                return Ok(None);
            };
            client
                .query_opt(
                    "SELECT user_id FROM wxauth_user_unionids WHERE unionid = $1",
                    &[&unionid],
                )
                .await
                .map_err(e)?
                .map(|row| (row.get::<_, i64>(0) as UserId).to_be_bytes().to_vec())
        }
        Tree::Families => {
            let Some((user_id, family)) = split_family_key(key) else {
                return Ok(None);
            };
            let sql = format!(
                "SELECT {FAMILY_COLUMNS} FROM wxauth_families WHERE user_id = $1 AND family_id = $2"
            );
            match client
                .query_opt(&sql, &[&(user_id as i64), &family.0.as_slice()])
                .await
                .map_err(e)?
            {
                Some(row) => Some(crate::storage::sled_model::encode_family(&family_from_row(
                    &row,
                )?)),
                None => None,
            }
        }
        Tree::Meta if super::outbox::seq_of(key).is_some() => {
            let seq = super::outbox::seq_of(key);
            client
                .query_opt(
                    "SELECT convert_to(record, 'UTF8') FROM wxauth_outbox WHERE seq = $1",
                    &[&seq],
                )
                .await
                .map_err(e)?
                .map(|row| row.get(0))
        }
        Tree::Meta | Tree::RefreshTokens | Tree::TokenFamilies => client
            .query_opt(
                "SELECT value FROM wxauth_kv WHERE tree = $1 AND key = $2",
                &[&tree.name(), &key],
            )
            .await
            .map_err(e)?
            .map(|row| row.get(0)),
    })
}

/// Writes one entry of a tree kept as it is in the embedded store (`wxauth_kv`).
pub(super) async fn put<C: GenericClient>(
    client: &C,
    tree: Tree,
    key: &[u8],
    value: &[u8],
) -> Result<(), StorageError> {
    client
        .execute(
            "INSERT INTO wxauth_kv (tree, key, value) VALUES ($1, $2, $3) \
             ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value",
            &[&tree.name(), &key, &value],
        )
        .await
        .map_err(|e| pg_error(format!("write {}", tree.name()), e))?;
    Ok(())
}

/// One write of a batch, translated to its table.
async fn apply_op<C: GenericClient>(client: &C, op: &Op) -> Result<(), StorageError> {
    let e = |tree: Tree| move |e| pg_error(format!("write {}", tree.name()), e);
    match op {
        Op::Put(tree @ Tree::Users, _, value) => {
            let user: User = serde_json::from_slice(value)
                .map_err(|e| corrupt(*tree, format!("a user record: {e}")))?;
            let phone = user
                .phone
                .as_ref()
                .map(|p| serde_json::to_string(p).expect("a phone number serializes"));
            client
                .execute(
                    "INSERT INTO wxauth_users (id, appid, openid, unionid, session_key, \
                     created_at, last_login_at, disabled, token_stamp, tokens_not_before, phone, \
                     nickname, avatar_url, deletion_due, erased_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                     ON CONFLICT (id) DO UPDATE SET appid = EXCLUDED.appid, \
                     openid = EXCLUDED.openid, unionid = EXCLUDED.unionid, \
                     session_key = EXCLUDED.session_key, created_at = EXCLUDED.created_at, \
                     last_login_at = EXCLUDED.last_login_at, disabled = EXCLUDED.disabled, \
                     token_stamp = EXCLUDED.token_stamp, \
                     tokens_not_before = EXCLUDED.tokens_not_before, phone = EXCLUDED.phone, \
                     nickname = EXCLUDED.nickname, avatar_url = EXCLUDED.avatar_url, \
                     deletion_due = EXCLUDED.deletion_due, erased_at = EXCLUDED.erased_at",
                    &[
                        &(user.id as i64),
                        &user.appid,
                        &user.openid,
                        &user.unionid,
                        &user.session_key.expose(),
                        &user.created_at,
                        &user.last_login_at,
                        &user.disabled,
                        &(user.token_stamp as i64),
                        &user.tokens_not_before,
                        &phone,
                        &user.nickname,
                        &user.avatar_url,
                        &user.deletion_due,
                        &user.erased_at,
                    ],
                )
                .await
                .map_err(e(*tree))?;
        }
        Op::Delete(tree @ Tree::Users, key) => {
            if let Some(id) = user_id_of(key) {
                client
                    .execute("DELETE FROM wxauth_users WHERE id = $1", &[&id])
                    .await
                    .map_err(e(*tree))?;
            }
        }
        Op::Put(tree @ Tree::UsersByOpenid, key, value) => {
            let (appid, openid) =
                split_openid_key(key).ok_or_else(|| corrupt(*tree, "an openid key"))?;
            let id = user_id_of(value).ok_or_else(|| corrupt(*tree, "a user id"))?;
            client
                .execute(
                    "INSERT INTO wxauth_user_openids (appid, openid, user_id) VALUES ($1, $2, $3) \
                     ON CONFLICT (appid, openid) DO UPDATE SET user_id = EXCLUDED.user_id",
                    &[&appid, &openid, &id],
                )
                .await
                .map_err(e(*tree))?;
        }
        Op::Delete(tree @ Tree::UsersByOpenid, key) => {
            if let Some((appid, openid)) = split_openid_key(key) {
                client
                    .execute(
                        "DELETE FROM wxauth_user_openids WHERE appid = $1 AND openid = $2",
                        &[&appid, &openid],
                    )
                    .await
                    .map_err(e(*tree))?;
            }
        }
        Op::Put(tree @ Tree::UsersByUnionid, key, value) => {
            let unionid = std::str::from_utf8(key).map_err(|_| corrupt(*tree, "a unionid key"))?;
            let id = user_id_of(value).ok_or_else(|| corrupt(*tree, "a user id"))?;
            client
                .execute(
                    "INSERT INTO wxauth_user_unionids (unionid, user_id) VALUES ($1, $2) \
                     ON CONFLICT (unionid) DO UPDATE SET user_id = EXCLUDED.user_id",
                    &[&unionid, &id],
                )
                .await
                .map_err(e(*tree))?;
        }
        Op::Delete(tree @ Tree::UsersByUnionid, key) => {
            if let Ok(unionid) = std::str::from_utf8(key) {
                client
                    .execute(
                        "DELETE FROM wxauth_user_unionids WHERE unionid = $1",
                        &[&unionid],
                    )
                    .await
                    .map_err(e(*tree))?;
            }
        }
        Op::Put(tree @ Tree::Families, key, value) => {
            let f = crate::storage::sled_model::decode_family(key, value)?;
            client
                .execute(
                    "INSERT INTO wxauth_families \
                     (user_id, family_id, generation, created_ms, rotated_ms, exp, revoked_ms, \
                     stamp) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (user_id, family_id) DO UPDATE SET \
                     generation = EXCLUDED.generation, created_ms = EXCLUDED.created_ms, \
                     rotated_ms = EXCLUDED.rotated_ms, exp = EXCLUDED.exp, \
                     revoked_ms = EXCLUDED.revoked_ms, stamp = EXCLUDED.stamp",
                    &[
                        &(f.user_id as i64),
                        &f.id.0.as_slice(),
                        &(f.generation as i64),
                        &f.created_ms,
                        &f.rotated_ms,
                        &f.exp,
                        &f.revoked_ms,
                        &(f.stamp as i64),
                    ],
                )
                .await
                .map_err(e(*tree))?;
        }
        Op::Delete(tree @ Tree::Families, key) => {
            if let Some((user_id, family)) = split_family_key(key) {
                client
                    .execute(
                        "DELETE FROM wxauth_families WHERE user_id = $1 AND family_id = $2",
                        &[&(user_id as i64), &family.0.as_slice()],
                    )
                    .await
                    .map_err(e(*tree))?;
            }
        }
        // The deletion mark is the user row's `deletion_due` here (a restore from
        // the embedded store carries it in both).
        Op::Put(Tree::Meta, key, _) | Op::Delete(Tree::Meta, key)
            if crate::storage::sled_model::is_deletion_mark(key) => {}
        // The events of the outbox are rows of their own table.
        Op::Put(Tree::Meta, key, value) if super::outbox::seq_of(key).is_some() => {
            let seq = super::outbox::seq_of(key).expect("checked");
            super::outbox::put(client, seq, value).await?;
        }
        Op::Delete(Tree::Meta, key) if super::outbox::seq_of(key).is_some() => {
            let seq = super::outbox::seq_of(key).expect("checked");
            super::outbox::delete(client, seq).await?;
        }
        Op::Put(tree, key, value) => put(client, *tree, key, value).await?,
        Op::Delete(tree, key) => {
            client
                .execute(
                    "DELETE FROM wxauth_kv WHERE tree = $1 AND key = $2",
                    &[&tree.name(), key],
                )
                .await
                .map_err(e(*tree))?;
        }
    }
    Ok(())
}

/// Where a scan of a tree goes on from: the last key it returned (exclusive), or
/// the first key it may return (inclusive) when it starts.
enum Cursor {
    From(Vec<u8>),
    After(Vec<u8>),
}

/// The smallest key of exactly `n` bytes that is `>= from` (keys of the users and
/// families trees have one length); `None`: there is none.
fn fixed_lower_bound(from: &[u8], n: usize) -> Option<Vec<u8>> {
    if from.len() <= n {
        let mut key = from.to_vec();
        key.resize(n, 0);
        return Some(key);
    }
    // Longer than a key: the next key after its first n bytes.
    let mut key = from[..n].to_vec();
    for byte in key.iter_mut().rev() {
        if *byte == 0xff {
            *byte = 0;
        } else {
            *byte += 1;
            return Some(key);
        }
    }
    None
}

type Entry = (Vec<u8>, Vec<u8>);

/// One page of `tree` in key order, from `cursor` on.
async fn page<C: GenericClient>(
    client: &C,
    tree: Tree,
    cursor: &Cursor,
) -> Result<Vec<Entry>, StorageError> {
    let e = |e| pg_error(format!("scan {}", tree.name()), e);
    let (bound, strict) = match cursor {
        Cursor::From(key) => (key.as_slice(), false),
        Cursor::After(key) => (key.as_slice(), true),
    };
    let cmp = if strict { ">" } else { ">=" };
    let rows = match tree {
        Tree::Users => {
            let Some(start) = fixed_lower_bound(bound, 8) else {
                return Ok(Vec::new());
            };
            let id = i64::try_from(u64::from_be_bytes(start.try_into().expect("8 bytes")))
                .unwrap_or(i64::MAX);
            let sql = format!(
                "SELECT {USER_COLUMNS} FROM wxauth_users WHERE id {cmp} $1 ORDER BY id LIMIT $2"
            );
            let rows = client.query(&sql, &[&id, &PAGE]).await.map_err(e)?;
            let mut entries = Vec::with_capacity(rows.len());
            for row in &rows {
                let user = user_from_row(row)?;
                entries.push((users::id_key(user.id).to_vec(), users::encode(&user)));
            }
            return Ok(entries);
        }
        Tree::Families => {
            let Some(start) = fixed_lower_bound(bound, 24) else {
                return Ok(Vec::new());
            };
            let (user_id, family) = split_family_key(&start).expect("24 bytes");
            let sql = format!(
                "SELECT {FAMILY_COLUMNS} FROM wxauth_families \
                 WHERE (user_id, family_id) {cmp} ($1, $2) \
                 ORDER BY user_id, family_id LIMIT $3"
            );
            let rows = client
                .query(&sql, &[&(user_id as i64), &family.0.as_slice(), &PAGE])
                .await
                .map_err(e)?;
            let mut entries = Vec::with_capacity(rows.len());
            for row in &rows {
                let f = family_from_row(row)?;
                entries.push((
                    family_key(f.user_id, f.id).to_vec(),
                    crate::storage::sled_model::encode_family(&f),
                ));
            }
            return Ok(entries);
        }
        Tree::UsersByOpenid => {
            // Byte order of `appid 0x00 openid` is the order of (appid, openid)
            // compared bytewise ("C").
            let (appid, openid) = match cursor {
                Cursor::After(key) => split_openid_key(key).unwrap_or(("", "")),
                Cursor::From(_) => ("", ""),
            };
            let cmp = if matches!(cursor, Cursor::After(_)) {
                ">"
            } else {
                ">="
            };
            let sql = format!(
                "SELECT appid, openid, user_id FROM wxauth_user_openids \
                 WHERE (appid COLLATE \"C\", openid COLLATE \"C\") {cmp} ($1, $2) \
                 ORDER BY appid COLLATE \"C\", openid COLLATE \"C\" LIMIT $3"
            );
            client
                .query(&sql, &[&appid, &openid, &PAGE])
                .await
                .map_err(e)?
                .iter()
                .map(|row| {
                    let key = users::openid_key(row.get(0), row.get(1));
                    (key, (row.get::<_, i64>(2) as UserId).to_be_bytes().to_vec())
                })
                .collect()
        }
        Tree::UsersByUnionid => {
            let after = match cursor {
                Cursor::After(key) => String::from_utf8_lossy(key).into_owned(),
                Cursor::From(_) => String::new(),
            };
            let cmp = if matches!(cursor, Cursor::After(_)) {
                ">"
            } else {
                ">="
            };
            let sql = format!(
                "SELECT unionid, user_id FROM wxauth_user_unionids \
                 WHERE unionid COLLATE \"C\" {cmp} $1 ORDER BY unionid COLLATE \"C\" LIMIT $2"
            );
            client
                .query(&sql, &[&after, &PAGE])
                .await
                .map_err(e)?
                .iter()
                .map(|row| {
                    let unionid: String = row.get(0);
                    (
                        unionid.into_bytes(),
                        (row.get::<_, i64>(1) as UserId).to_be_bytes().to_vec(),
                    )
                })
                .collect()
        }
        Tree::Meta | Tree::RefreshTokens | Tree::TokenFamilies => {
            // `meta` shows the outbox's events too, in one key order.
            let events = match tree {
                Tree::Meta => super::outbox::AS_META,
                _ => "",
            };
            let sql = format!(
                "SELECT key, value FROM (SELECT key, value FROM wxauth_kv WHERE tree = $1 \
                 {events}) AS entries WHERE key {cmp} $2 ORDER BY key LIMIT $3"
            );
            client
                .query(&sql, &[&tree.name(), &bound, &PAGE])
                .await
                .map_err(e)?
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect()
        }
    };
    Ok(rows)
}

impl PgStore {
    /// Visits `tree` from `start` on, a page at a time (each page one query; the
    /// visitor runs on the calling thread between them).
    fn scan(&self, tree: Tree, start: &[u8], visit: &mut Visitor<'_>) -> Result<(), StorageError> {
        let mut cursor = Cursor::From(start.to_vec());
        loop {
            let entries = self.wait(self.run("scan", move |shared| async move {
                let client = shared.client().await?;
                page(&client, tree, &cursor).await
            }))?;
            let full = entries.len() as i64 == PAGE;
            let mut last = None;
            for (key, value) in entries {
                // Trees whose pages cannot start at an arbitrary key skip up to it here.
                if key.as_slice() >= start && visit(&key, &value).is_break() {
                    return Ok(());
                }
                last = Some(key);
            }
            match (full, last) {
                (true, Some(key)) => cursor = Cursor::After(key),
                _ => return Ok(()),
            }
        }
    }
}

impl ReadStore for PgStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let key = key.to_vec();
        self.wait(self.run("read", move |shared| async move {
            let client = shared.client().await?;
            get(&client, tree, &key).await
        }))
    }

    fn for_each(&self, tree: Tree, visit: &mut Visitor<'_>) -> Result<(), StorageError> {
        self.scan(tree, &[], visit)
    }

    fn for_each_from(
        &self,
        tree: Tree,
        start: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<(), StorageError> {
        self.scan(tree, start, visit)
    }

    fn size_on_disk(&self) -> Result<u64, StorageError> {
        self.wait(self.run("database size", |shared| async move {
            let client = shared.client().await?;
            let row = client
                .query_one("SELECT pg_database_size(current_database())", &[])
                .await
                .map_err(|e| pg_error("read the database size", e))?;
            Ok(row.get::<_, i64>(0).max(0) as u64)
        }))
    }

    fn last(&self, tree: Tree) -> Result<Option<(Vec<u8>, Vec<u8>)>, StorageError> {
        if tree != Tree::Users {
            let mut last = None;
            self.for_each(tree, &mut |key, value| {
                last = Some((key.to_vec(), value.to_vec()));
                ControlFlow::Continue(())
            })?;
            return Ok(last);
        }
        self.wait(self.run("the last user", |shared| async move {
            let client = shared.client().await?;
            let sql = format!("SELECT {USER_COLUMNS} FROM wxauth_users ORDER BY id DESC LIMIT 1");
            match client
                .query_opt(&sql, &[])
                .await
                .map_err(|e| pg_error("read the last user", e))?
            {
                Some(row) => {
                    let user = user_from_row(&row)?;
                    Ok(Some((
                        users::id_key(user.id).to_vec(),
                        users::encode(&user),
                    )))
                }
                None => Ok(None),
            }
        }))
    }
}

impl Store for PgStore {
    /// One transaction: atomic, and durable once it returns. A batch that wrote
    /// users (a restore) moves the id sequence past them, so that ids are never
    /// handed out twice.
    fn apply(&self, batch: WriteBatch) -> Result<(), StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        let statements = batch.len();
        self.wait(
            self.run_for("write a batch", statements, move |shared| async move {
                let mut client = shared.client().await?;
                let tx = client
                    .transaction()
                    .await
                    .map_err(|e| pg_error("write a batch: begin", e))?;
                let mut wrote_users = false;
                for op in &batch.ops {
                    wrote_users |= matches!(op, Op::Put(Tree::Users, ..));
                    apply_op(&tx, op).await?;
                }
                if wrote_users {
                    tx.execute(
                        "SELECT setval('wxauth_user_ids', m) FROM \
                     (SELECT max(id) AS m FROM wxauth_users) AS users, wxauth_user_ids AS seq \
                     WHERE m IS NOT NULL AND (m > seq.last_value OR NOT seq.is_called)",
                        &[],
                    )
                    .await
                    .map_err(|e| pg_error("move the user id sequence", e))?;
                }
                tx.commit()
                    .await
                    .map_err(|e| pg_error("write a batch: commit", e))
            }),
        )
    }

    /// Every applied batch was committed already.
    fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }

    /// Every tree as of one instant: one `REPEATABLE READ` transaction, streamed to
    /// the visitor (on the calling thread) a page at a time. Writers do not wait.
    fn snapshot(&self, visit: &mut SnapshotVisitor<'_>) -> Result<(), StorageError> {
        let (tx_pages, mut pages) =
            tokio::sync::mpsc::channel::<Result<(Tree, Vec<Entry>), StorageError>>(4);
        let shared = self.shared.clone();
        self.io_handle().spawn(async move {
            let result: Result<(), StorageError> = async {
                let mut client = shared.client().await?;
                let tx = client
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await
                    .map_err(|e| pg_error("backup: begin", e))?;
                for tree in Tree::ALL {
                    let mut cursor = Cursor::From(Vec::new());
                    loop {
                        let entries = page(&tx, tree, &cursor).await?;
                        let full = entries.len() as i64 == PAGE;
                        let last = entries.last().map(|(key, _)| key.clone());
                        if tx_pages.send(Ok((tree, entries))).await.is_err() {
                            return Ok(());
                        }
                        match (full, last) {
                            (true, Some(key)) => cursor = Cursor::After(key),
                            _ => break,
                        }
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                let _ = tx_pages.send(Err(e)).await;
            }
        });
        while let Some(page) = pages.blocking_recv() {
            let (tree, entries) = page?;
            for (key, value) in entries {
                visit(tree, &key, &value)?;
            }
        }
        Ok(())
    }

    fn recover(&self) -> Result<bool, StorageError> {
        Ok(false)
    }
}
