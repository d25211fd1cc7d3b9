//! Events for the team's own back end: `user.created`, `user.updated`,
//! `user.disabled`, `user.enabled`, `user.deletion_scheduled`, `user.deleted`,
//! POSTed to `events.webhook_url` and signed as the Standard Webhooks specification
//! says. Rules: docs/API.md, "Events".
//!
//! **The outbox.** An event is a `meta` record `outbox 0x00 seq` (seq: 8 bytes
//! big-endian, one more than the greatest pending) written by the storage model in
//! the SAME atomic batch as the change it reports, so it is durable exactly when
//! the change is. With no `events.webhook_url` the model has no [`Outbox`] and
//! writes none.
//!
//! **Delivery.** One thread (`wxauth-events`), off every request path: it reads the
//! pending records in seq order, makes them durable first (a flush: a receiver
//! never hears of a change a crash could still undo), and POSTs each with a
//! blocking ureq call cut off at `events.timeout`. A 2xx deletes the record; anything
//! else records the attempt and waits (1 s, doubling, at most 30 s), and the user's
//! later events wait behind it (order per user); other users' events go on. After
//! `events.retry_for` an event is given up (kept, `failed`, for `wxauth events
//! list|retry`) and no longer holds the user's later events. A delivery whose answer
//! was lost is sent again: at least once; receivers dedupe by `webhook-id`. Once
//! written, a record has one writer, this thread: `wxauth events retry` on a running
//! node is a message to it ([`DeliveryThread::retry`]), run between two deliveries.
//!
//! **PostgreSQL** ([`SharedOutbox`], `storage/postgres/outbox.rs`): the event is a
//! row of `wxauth_outbox` inserted in the transaction of its change, after the
//! change locked the user's row (so a user's events are in commit order). Every
//! node runs a delivery thread that claims one event at a time with a lease
//! (`FOR UPDATE SKIP LOCKED`, then the lease column), only a user's oldest pending
//! event, so no two nodes send one event at once and a user's order holds across
//! nodes; the same backoff and give-up rule. A node killed mid-delivery leaves its
//! claim to expire (`events.timeout` + 10 s): another node sends the event again,
//! with the same `webhook-id`. `wxauth events retry` is one conditional `UPDATE`
//! ([`SharedOutbox::retry_all`]): it changes only rows still there, so an event a
//! node delivered meanwhile is not brought back.

use crate::metrics::Metrics;
use crate::storage::{ReadStore, StorageError, Store, Tree, WriteBatch};
use crate::users::UserId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `meta` keys of pending events: this prefix, then the seq (8 bytes big-endian).
pub const OUTBOX_PREFIX: &[u8] = b"outbox\0";
const FIRST_BACKOFF_MS: i64 = 1_000;
const MAX_BACKOFF_MS: i64 = 30_000;
/// Records read per round.
const ROUND: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Created,
    Updated,
    Disabled,
    Enabled,
    DeletionScheduled,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Created => "user.created",
            EventType::Updated => "user.updated",
            EventType::Disabled => "user.disabled",
            EventType::Enabled => "user.enabled",
            EventType::DeletionScheduled => "user.deletion_scheduled",
            EventType::Deleted => "user.deleted",
        }
    }
}

/// One pending event as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredEvent {
    /// `webhook-id`: `msg_` and 24 random hex characters.
    pub id: String,
    pub user_id: UserId,
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339, when the change was made.
    pub timestamp: String,
    pub data: Value,
    pub created_ms: i64,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub next_attempt_ms: i64,
    #[serde(default)]
    pub failed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl StoredEvent {
    /// A new event of `user_id` (its `data` gets the `user_id`), due at once.
    pub fn new(user_id: UserId, kind: EventType, mut data: Value, now_ms: i64) -> Self {
        data["user_id"] = json!(user_id);
        StoredEvent {
            id: format!("msg_{}", crate::ids::random_hex(12)),
            user_id,
            kind: kind.as_str().to_string(),
            timestamp: rfc3339_ms(now_ms),
            data,
            created_ms: now_ms,
            attempts: 0,
            next_attempt_ms: 0,
            failed: false,
            last_error: None,
        }
    }

    /// The stored JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event serializes")
    }

    /// After a failed attempt at `now` (unix ms): counts it and sets the next
    /// attempt (1 s, doubling, at most 30 s), or gives the event up once
    /// `events.retry_for` has passed since it was made. The backoff, or `None`: given up.
    fn attempt_failed(&mut self, reason: String, now: i64, retry_for: Duration) -> Option<i64> {
        self.attempts = self.attempts.saturating_add(1);
        self.last_error = Some(reason);
        let retry_for = i64::try_from(retry_for.as_millis()).unwrap_or(i64::MAX);
        if now - self.created_ms >= retry_for {
            self.failed = true;
            tracing::warn!(
                event_id = %self.id,
                user_id = self.user_id,
                attempts = self.attempts,
                "event given up after events.retry_for (wxauth events retry sends it again)"
            );
            return None;
        }
        let shift = self.attempts.saturating_sub(1).min(16);
        let backoff = (FIRST_BACKOFF_MS << shift).min(MAX_BACKOFF_MS);
        self.next_attempt_ms = now + backoff;
        Some(backoff)
    }

    /// The POSTed body: `{"type", "timestamp", "data": {"user_id", …}}`.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "type": self.kind,
            "timestamp": self.timestamp,
            "data": self.data,
        }))
        .expect("an event serializes")
    }

    /// What `wxauth events list` prints.
    pub fn view(&self, seq: u64) -> Value {
        json!({
            "seq": seq,
            "id": self.id,
            "user_id": self.user_id,
            "type": self.kind,
            "timestamp": self.timestamp,
            "attempts": self.attempts,
            "next_attempt_at": (self.next_attempt_ms > 0)
                .then(|| crate::clock::rfc3339(self.next_attempt_ms.div_euclid(1000))),
            "failed": self.failed,
            "last_error": self.last_error,
        })
    }
}

fn outbox_key(seq: u64) -> Vec<u8> {
    [OUTBOX_PREFIX, &seq.to_be_bytes()].concat()
}

fn decode(key: &[u8], value: &[u8]) -> Option<(u64, StoredEvent)> {
    let seq = u64::from_be_bytes(key.strip_prefix(OUTBOX_PREFIX)?.try_into().ok()?);
    Some((seq, serde_json::from_slice(value).ok()?))
}

/// Up to `limit` pending events, in seq order.
pub fn pending(
    store: &dyn ReadStore,
    limit: usize,
) -> Result<Vec<(u64, StoredEvent)>, StorageError> {
    let mut found = Vec::new();
    store.for_each_from(Tree::Meta, OUTBOX_PREFIX, &mut |key, value| {
        if !key.starts_with(OUTBOX_PREFIX) || found.len() >= limit {
            return ControlFlow::Break(());
        }
        if let Some(event) = decode(key, value) {
            found.push(event);
        }
        ControlFlow::Continue(())
    })?;
    Ok(found)
}

/// `wxauth events retry` on the embedded store: every waiting or given-up event is
/// due now. The count. Run by the delivery thread itself ([`Outbox::retry`]), or
/// by the CLI when no server holds the data directory: never beside that thread
/// ([`DeliveryThread::retry`] asks it).
pub fn retry_all(store: &dyn Store) -> Result<usize, StorageError> {
    let mut batch = WriteBatch::default();
    let mut count = 0;
    for (seq, mut event) in pending(store, usize::MAX)? {
        if event.failed || event.next_attempt_ms > 0 {
            event.failed = false;
            event.next_attempt_ms = 0;
            batch.put(
                Tree::Meta,
                outbox_key(seq),
                serde_json::to_vec(&event).expect("serializes"),
            );
            count += 1;
        }
    }
    if count > 0 {
        store.apply(batch)?;
    }
    Ok(count)
}

/// The writer's side, held by the storage model.
pub struct Outbox {
    next_seq: AtomicU64,
    wake: Wake,
}

impl Outbox {
    /// Continues after the greatest pending seq.
    pub fn open(store: &dyn ReadStore) -> Result<Arc<Self>, StorageError> {
        let last = pending(store, usize::MAX)?
            .last()
            .map_or(0, |(seq, _)| seq + 1);
        Ok(Arc::new(Outbox {
            next_seq: AtomicU64::new(last),
            wake: Wake::default(),
        }))
    }

    /// Adds the event to `batch` (the batch of the change it reports).
    pub fn add(
        &self,
        batch: &mut WriteBatch,
        user_id: UserId,
        kind: EventType,
        data: Value,
        now_ms: i64,
    ) {
        let event = StoredEvent::new(user_id, kind, data, now_ms);
        let seq = self.next_seq.fetch_add(1, Relaxed);
        batch.put(Tree::Meta, outbox_key(seq), event.encode());
    }

    /// Tells the delivery thread there is something new (never blocks).
    pub fn wake(&self) {
        self.wake.wake();
    }
}

/// A running node's line to its delivery thread, for `wxauth events retry`.
#[derive(Clone)]
pub struct DeliveryThread {
    outbox: Arc<Outbox>,
    /// The attempt under way (`events.timeout`) and then some.
    answer_within: Duration,
}

impl DeliveryThread {
    /// The thread, the records' one writer, makes every waiting or given-up event
    /// due, between two deliveries. The count.
    pub fn retry(&self) -> Result<usize, StorageError> {
        let unavailable = || StorageError::unavailable("the event delivery thread is not running");
        let sender = self
            .outbox
            .wake
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(unavailable)?;
        let (reply, answer) = sync_channel(1);
        sender
            .send(Signal::Retry(reply))
            .map_err(|_| unavailable())?;
        answer.recv_timeout(self.answer_within).map_err(|_| {
            StorageError::unavailable("the event delivery thread did not answer in time")
        })?
    }
}

/// What a delivery thread is told between two rounds.
enum Signal {
    /// Something new is in the outbox.
    Wake,
    /// Make every waiting or given-up event due now; answer with the count.
    Retry(SyncSender<Result<usize, StorageError>>),
}

/// Wakes a delivery thread (never blocks); does nothing before one started.
#[derive(Default)]
pub struct Wake(Mutex<Option<SyncSender<Signal>>>);

impl Wake {
    pub fn wake(&self) {
        if let Some(wake) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = wake.try_send(Signal::Wake);
        }
    }

    /// The receiving end, for the delivery thread (replacing any earlier one).
    fn channel(&self) -> Receiver<Signal> {
        let (wake, woken) = sync_channel(1);
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(wake);
        woken
    }
}

/// The `data` of `user.created`.
pub fn created_data(user: &crate::users::User) -> Value {
    json!({
        "appid": user.appid,
        "openid": user.openid,
        "unionid": user.unionid,
        "created_at": crate::clock::rfc3339(user.created_at),
    })
}

/// The `data` of `user.updated` for a new phone number.
pub fn phone_data(phone: &crate::users::PhoneNumber) -> Value {
    json!({
        "phone_number": phone.phone_number,
        "pure_phone_number": phone.pure_phone_number,
        "country_code": phone.country_code,
    })
}

/// The `data` of `user.updated` for a profile change: the fields given.
pub fn profile_data(change: &crate::users::ProfileChange) -> Value {
    let mut data = json!({});
    if let Some(nickname) = &change.nickname {
        data["nickname"] = json!(nickname);
    }
    if let Some(avatar_url) = &change.avatar_url {
        data["avatar_url"] = json!(avatar_url);
    }
    data
}

/// The `data` of `user.deletion_scheduled` (`due`: unix seconds).
pub fn deletion_scheduled_data(due: i64) -> Value {
    json!({ "deletion_scheduled_at": crate::clock::rfc3339(due) })
}

fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A Standard Webhooks secret: `whsec_` then base64 of the key bytes.
pub fn parse_secret(text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let encoded = text
        .trim()
        .strip_prefix("whsec_")
        .ok_or("must start with `whsec_` (a Standard Webhooks secret)")?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "the part after `whsec_` must be base64")?;
    if key.len() < 16 {
        return Err("the key must be at least 16 bytes".into());
    }
    Ok(key)
}

/// `v1,<base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    use base64::Engine;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut signed = ring::hmac::Context::with_key(&key);
    signed.update(format!("{id}.{timestamp}.").as_bytes());
    signed.update(body);
    let tag = signed.sign();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

/// The delivery thread's settings.
pub struct Delivery {
    pub url: String,
    pub key: Vec<u8>,
    pub timeout: Duration,
    pub retry_for: Duration,
}

/// Starts the delivery thread for `outbox` (detached: a stop mid-delivery only
/// means that event is sent again after the restart).
pub fn start(
    store: Arc<dyn Store>,
    outbox: &Arc<Outbox>,
    delivery: Delivery,
    metrics: Arc<Metrics>,
) -> std::io::Result<DeliveryThread> {
    let woken = outbox.wake.channel();
    let thread = DeliveryThread {
        outbox: outbox.clone(),
        answer_within: delivery.timeout + LEASE_MARGIN,
    };
    std::thread::Builder::new()
        .name("wxauth-events".into())
        .spawn(move || run(store.as_ref(), &delivery, &metrics, &woken))?;
    Ok(thread)
}

fn run(store: &dyn Store, delivery: &Delivery, metrics: &Metrics, woken: &Receiver<Signal>) {
    let agent = agent(delivery);
    loop {
        let wait = match round(store, delivery, metrics, &agent, woken) {
            Ok(wait) => wait,
            Err(e) => {
                tracing::warn!(error = %e, "event delivery: the outbox could not be read or written");
                Duration::from_secs(1)
            }
        };
        match woken.recv_timeout(wait) {
            Ok(Signal::Retry(reply)) => {
                let _ = reply.send(retry_all(store));
            }
            Ok(Signal::Wake) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
        }
    }
}

/// One pass over the pending events; how long to wait before the next.
fn round(
    store: &dyn Store,
    delivery: &Delivery,
    metrics: &Metrics,
    agent: &ureq::Agent,
    woken: &Receiver<Signal>,
) -> Result<Duration, StorageError> {
    let events = pending(store, ROUND)?;
    metrics.set_events_pending(events.iter().filter(|(_, e)| !e.failed).count() as u64);
    let mut blocked = HashSet::new();
    let mut wait_ms = 1_000;
    let mut flushed = false;
    let mut woken_meanwhile = false;
    for (seq, mut event) in events {
        let now = crate::clock::now_ms();
        if event.failed || blocked.contains(&event.user_id) {
            continue;
        }
        if event.next_attempt_ms > now {
            blocked.insert(event.user_id);
            wait_ms = wait_ms.min(event.next_attempt_ms - now);
            continue;
        }
        if !flushed {
            // Never tell the receiver of a change that is not durable yet.
            store.flush()?;
            flushed = true;
        }
        let mut batch = WriteBatch::default();
        match deliver(agent, delivery, &event) {
            Ok(()) => batch.delete(Tree::Meta, outbox_key(seq)),
            Err(reason) => {
                metrics.event_delivery_failed();
                blocked.insert(event.user_id);
                if let Some(backoff) = event.attempt_failed(reason, now, delivery.retry_for) {
                    wait_ms = wait_ms.min(backoff);
                }
                batch.put(Tree::Meta, outbox_key(seq), event.encode());
            }
        }
        store.apply(batch)?;
        // A retry asked for now is answered after this one delivery, not the
        // round; the round's records are stale after it, so a new round reads them.
        match woken.try_recv() {
            Ok(Signal::Retry(reply)) => {
                let _ = reply.send(retry_all(store));
                return Ok(Duration::ZERO);
            }
            // Taken off the channel: this round's end starts the next at once.
            Ok(Signal::Wake) => woken_meanwhile = true,
            Err(_) => {}
        }
    }
    if woken_meanwhile {
        return Ok(Duration::ZERO);
    }
    Ok(Duration::from_millis(wait_ms.max(10) as u64))
}

/// An outbox that several nodes deliver from (PostgreSQL): each event is claimed
/// by one node at a time, for a lease.
pub trait SharedOutbox: Send + Sync {
    /// Claims for `holder`, for `lease_ms`, one event that is due at `now_ms`, not
    /// given up, not claimed by a node whose lease still runs, and the oldest
    /// pending (not given-up) event of its user. `None`: nothing to send now.
    fn claim(
        &self,
        holder: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<(u64, StoredEvent)>, StorageError>;
    /// The event was delivered: gone.
    fn delivered(&self, seq: u64) -> Result<(), StorageError>;
    /// The attempt failed: `event` (attempts, next attempt, given up) replaces the
    /// stored one and the claim ends, if `holder` still holds it.
    fn attempt_failed(
        &self,
        seq: u64,
        holder: &str,
        event: &StoredEvent,
    ) -> Result<(), StorageError>;
    /// Pending events not given up (the metric).
    fn pending_count(&self) -> Result<u64, StorageError>;
    /// `wxauth events retry`: every waiting or given-up event still there is due
    /// now (one that a node delivers meanwhile stays delivered). The count.
    fn retry_all(&self) -> Result<usize, StorageError>;
}

/// How long a claim outlives the longest delivery attempt (`events.timeout`): a
/// node killed mid-delivery leaves its event to another node after this.
const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// Starts the delivery thread of this node on a shared outbox; `wake` wakes it
/// after this node wrote an event (other nodes' events are found by polling,
/// every second).
pub fn start_shared(
    outbox: Arc<dyn SharedOutbox>,
    wake: &Wake,
    delivery: Delivery,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let woken = wake.channel();
    let holder = format!("{}-{}", std::process::id(), crate::ids::random_hex(8));
    std::thread::Builder::new()
        .name("wxauth-events".into())
        .spawn(move || loop {
            let wait = match shared_round(outbox.as_ref(), &holder, &delivery, &metrics) {
                Ok(()) => Duration::from_secs(1),
                Err(e) => {
                    tracing::warn!(error = %crate::cause::cause_chain(&e), "event delivery: the outbox could not be read or written");
                    Duration::from_secs(1)
                }
            };
            match woken.recv_timeout(wait) {
                Ok(Signal::Retry(reply)) => {
                    let _ = reply.send(outbox.retry_all());
                }
                Ok(Signal::Wake) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
            }
        })?;
    Ok(())
}

/// Delivers claimed events one at a time until none is due.
fn shared_round(
    outbox: &dyn SharedOutbox,
    holder: &str,
    delivery: &Delivery,
    metrics: &Metrics,
) -> Result<(), StorageError> {
    let agent = agent(delivery);
    let lease = i64::try_from((delivery.timeout + LEASE_MARGIN).as_millis()).unwrap_or(i64::MAX);
    loop {
        let now = crate::clock::now_ms();
        let Some((seq, mut event)) = outbox.claim(holder, now, lease)? else {
            metrics.set_events_pending(outbox.pending_count()?);
            return Ok(());
        };
        // Committed before it was claimable: durable already.
        match deliver(&agent, delivery, &event) {
            Ok(()) => outbox.delivered(seq)?,
            Err(reason) => {
                metrics.event_delivery_failed();
                event.attempt_failed(reason, crate::clock::now_ms(), delivery.retry_for);
                outbox.attempt_failed(seq, holder, &event)?;
            }
        }
    }
}

fn agent(delivery: &Delivery) -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(delivery.timeout))
            .build(),
    )
}

/// One POST; `Err`: why it did not count as delivered (no URL, no body in it).
fn deliver(agent: &ureq::Agent, delivery: &Delivery, event: &StoredEvent) -> Result<(), String> {
    let body = event.body();
    let timestamp = crate::clock::now_unix();
    let signature = signature(&delivery.key, &event.id, timestamp, &body);
    let sent = agent
        .post(&delivery.url)
        .header("content-type", "application/json")
        .header("webhook-id", &event.id)
        .header("webhook-timestamp", &timestamp.to_string())
        .header("webhook-signature", &signature)
        .send(&body[..]);
    match sent {
        Ok(response) if response.status().is_success() => Ok(()),
        Ok(response) => Err(format!("HTTP {}", response.status().as_u16())),
        Err(e) => Err(match e {
            ureq::Error::Timeout(_) => "timed out".to_string(),
            ureq::Error::Io(e) => format!("connection: {}", e.kind()),
            _ => "the request failed".to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's own example.
    #[test]
    fn the_signature_is_the_specifications() {
        let key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(parse_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(parse_secret("whsec_!!").is_err());
    }
}
