//! The outbox of events on PostgreSQL (`wxauth_outbox`; the rules in
//! `events.rs`): written in the transaction of the change each event reports, and
//! delivered by every node's delivery thread through [`SharedOutbox`], each event
//! claimed by one node at a time.
//!
//! In the key-value view ([`ReadStore`](crate::storage::ReadStore)) an event is the
//! `meta` record `outbox 0x00 seq` it is in the embedded store, so `wxauth events
//! list|retry`, backup and restore treat both backends alike.

use super::{pg_error, PgStore, Shared};
use crate::events::{EventType, SharedOutbox, StoredEvent, OUTBOX_PREFIX};
use crate::storage::StorageError;
use crate::users::UserId;
use deadpool_postgres::GenericClient;
use serde_json::Value;

/// Adds the event of a change to its transaction `tx`, when events are on. Call it
/// after the statement that locked or wrote the user's row: a user's events then
/// take their `seq` in the order their changes commit.
pub(super) async fn add<C: GenericClient>(
    shared: &Shared,
    tx: &C,
    user_id: UserId,
    kind: EventType,
    data: Value,
) -> Result<(), StorageError> {
    if shared.events.is_none() {
        return Ok(());
    }
    let event = StoredEvent::new(user_id, kind, data, crate::clock::now_ms());
    let record = String::from_utf8(event.encode()).expect("JSON is UTF-8");
    tx.execute(
        "INSERT INTO wxauth_outbox (user_id, record) VALUES ($1, $2)",
        &[&(user_id as i64), &record],
    )
    .await
    .map_err(|e| pg_error("add an event", e))?;
    Ok(())
}

/// After the transaction that added an event committed: this node's delivery
/// thread looks at once.
pub(super) fn added(shared: &Shared) {
    if let Some(wake) = &shared.events {
        wake.wake();
    }
}

/// The seq of an outbox key of the key-value view (`None`: not one).
pub(super) fn seq_of(key: &[u8]) -> Option<i64> {
    let seq: [u8; 8] = key.strip_prefix(OUTBOX_PREFIX)?.try_into().ok()?;
    i64::try_from(u64::from_be_bytes(seq)).ok()
}

fn decode(record: &str) -> Result<StoredEvent, StorageError> {
    serde_json::from_str(record).map_err(|e| StorageError::Corrupt {
        tree: "wxauth_outbox",
        reason: e.to_string(),
    })
}

/// A put of the key-value view (a restore, `wxauth events retry`): the event as
/// given, its claim kept.
pub(super) async fn put<C: GenericClient>(
    client: &C,
    seq: i64,
    value: &[u8],
) -> Result<(), StorageError> {
    let event: StoredEvent = serde_json::from_slice(value).map_err(|e| StorageError::Corrupt {
        tree: "meta",
        reason: format!("an event: {e}"),
    })?;
    let record = String::from_utf8(event.encode()).expect("JSON is UTF-8");
    client
        .execute(
            "INSERT INTO wxauth_outbox (seq, user_id, record, failed, next_attempt_ms) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (seq) DO UPDATE SET user_id = EXCLUDED.user_id, \
             record = EXCLUDED.record, failed = EXCLUDED.failed, \
             next_attempt_ms = EXCLUDED.next_attempt_ms",
            &[
                &seq,
                &(event.user_id as i64),
                &record,
                &event.failed,
                &event.next_attempt_ms,
            ],
        )
        .await
        .map_err(|e| pg_error("write an event", e))?;
    // A restored seq is never handed out again.
    client
        .execute(
            "SELECT setval('wxauth_outbox_seq_seq', $1) FROM wxauth_outbox_seq_seq \
             WHERE $1 >= 1 AND ($1 > last_value OR NOT is_called)",
            &[&seq],
        )
        .await
        .map_err(|e| pg_error("move the event sequence", e))?;
    Ok(())
}

pub(super) async fn delete<C: GenericClient>(client: &C, seq: i64) -> Result<(), StorageError> {
    client
        .execute("DELETE FROM wxauth_outbox WHERE seq = $1", &[&seq])
        .await
        .map_err(|e| pg_error("delete an event", e))?;
    Ok(())
}

/// The key-value view's `meta` entries from the outbox, as `(key, value)`, joined
/// to the `wxauth_kv` rows of a scan of `meta`.
pub(super) const AS_META: &str = "UNION ALL SELECT '\\x6f7574626f7800'::bytea || int8send(seq), \
     convert_to(record, 'UTF8') FROM wxauth_outbox";

impl SharedOutbox for PgStore {
    /// One statement: the candidates are locked `FOR UPDATE SKIP LOCKED` (another
    /// node's claim in flight is skipped), and a row another node claimed and
    /// committed meanwhile is checked again under the lock (its lease no longer
    /// ends before now); the `NOT EXISTS` keeps a user's later events back while
    /// an earlier one is pending, whoever holds it.
    /// Leases are in the database's clock (`clock_timestamp()`), so that the
    /// nodes' clocks need not agree for one node at a time.
    fn claim(
        &self,
        holder: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<(u64, StoredEvent)>, StorageError> {
        let holder = holder.to_string();
        self.wait(self.run("claim an event", move |shared| async move {
            let client = shared.client().await?;
            let row = client
                .query_opt(
                    "UPDATE wxauth_outbox SET lease_holder = $3, \
                     lease_until_ms = (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $2 \
                     WHERE seq = (SELECT o.seq FROM wxauth_outbox o \
                        WHERE NOT o.failed AND o.next_attempt_ms <= $1 \
                        AND o.lease_until_ms <= (extract(epoch FROM clock_timestamp()) * 1000)::bigint \
                        AND NOT EXISTS (SELECT 1 FROM wxauth_outbox e \
                            WHERE e.user_id = o.user_id AND e.seq < o.seq AND NOT e.failed) \
                        ORDER BY o.seq LIMIT 1 FOR UPDATE SKIP LOCKED) \
                     RETURNING seq, record",
                    &[&now_ms, &lease_ms, &holder],
                )
                .await
                .map_err(|e| pg_error("claim an event", e))?;
            row.map(|row| {
                let seq: i64 = row.get(0);
                Ok((seq as u64, decode(row.get(1))?))
            })
            .transpose()
        }))
    }

    fn delivered(&self, seq: u64) -> Result<(), StorageError> {
        self.wait(
            self.run("delete a delivered event", move |shared| async move {
                let client = shared.client().await?;
                delete(&client, seq as i64).await
            }),
        )
    }

    fn attempt_failed(
        &self,
        seq: u64,
        holder: &str,
        event: &StoredEvent,
    ) -> Result<(), StorageError> {
        let holder = holder.to_string();
        let record = String::from_utf8(event.encode()).expect("JSON is UTF-8");
        let (failed, next) = (event.failed, event.next_attempt_ms);
        self.wait(
            self.run("record a failed attempt", move |shared| async move {
                let client = shared.client().await?;
                client
                    .execute(
                        "UPDATE wxauth_outbox SET record = $3, failed = $4, next_attempt_ms = $5, \
                     lease_until_ms = 0, lease_holder = NULL \
                     WHERE seq = $1 AND lease_holder = $2",
                        &[&(seq as i64), &holder, &record, &failed, &next],
                    )
                    .await
                    .map_err(|e| pg_error("record a failed attempt", e))?;
                Ok(())
            }),
        )
    }

    /// One statement on the rows still there: an event a node delivered (deleted)
    /// meanwhile is not written back. A node's attempt under way may record its
    /// failure after it, the event then waits for its next attempt as before.
    fn retry_all(&self) -> Result<usize, StorageError> {
        self.wait(self.run("make the events due", |shared| async move {
            let client = shared.client().await?;
            let changed = client
                .execute(
                    "UPDATE wxauth_outbox SET failed = false, next_attempt_ms = 0, \
                     record = jsonb_set(jsonb_set(record::jsonb, '{failed}', 'false'), \
                     '{next_attempt_ms}', '0')::text \
                     WHERE failed OR next_attempt_ms > 0",
                    &[],
                )
                .await
                .map_err(|e| pg_error("make the events due", e))?;
            Ok(usize::try_from(changed).unwrap_or(usize::MAX))
        }))
    }

    fn pending_count(&self) -> Result<u64, StorageError> {
        self.wait(self.run("count pending events", |shared| async move {
            let client = shared.client().await?;
            let row = client
                .query_one("SELECT count(*) FROM wxauth_outbox WHERE NOT failed", &[])
                .await
                .map_err(|e| pg_error("count pending events", e))?;
            Ok(row.get::<_, i64>(0).max(0) as u64)
        }))
    }
}
