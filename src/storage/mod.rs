//! Storage: a small key-value trait over named trees, and the group commit.
//!
//! Everything above this module speaks [`ReadStore`] / [`Store`]; only `sled.rs`
//! knows the engine. Replacing sled means writing another implementation here.
//!
//! Durability rule: writes are applied with [`Store::apply`] (atomic across trees,
//! visible at once, not yet on disk), and a request that wrote answers only after
//! [`GroupCommit::durable`] resolves, which waits for one fsync that began after
//! its writes. Concurrent requests share that fsync.

pub mod model;
pub mod postgres;
pub mod sled;
pub mod sled_model;
pub mod upgrade;

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use tokio::sync::oneshot;

/// The named key spaces. Their key and value layouts are documented where they
/// are encoded: `users.rs`, `storage/sled_model.rs` and (the legacy trees, read
/// only to upgrade) `storage/upgrade.rs`. The order of [`Tree::ALL`] is part of
/// the journal's format: new trees go at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tree {
    /// `format_version` (the storage format, [`upgrade::FORMAT_VERSION`]),
    /// `next_user_id` (format 1's counter, read only), `last_probe` (readiness),
    /// WeChat access tokens, deletion marks, and the events outbox.
    Meta,
    /// user id (u64 BE) → user record.
    Users,
    /// appid 0x00 openid → user id.
    UsersByOpenid,
    /// unionid → user id (only when apps are linked by unionid).
    UsersByUnionid,
    /// Legacy (read only, to upgrade): refresh-token jti → refresh record. Kept
    /// until the tokens it names expire, so that they refresh into the new form.
    RefreshTokens,
    /// Legacy (read only, to upgrade): family id → family record. Emptied by the
    /// upgrade into [`Tree::Families`].
    TokenFamilies,
    /// `user_id ‖ family_id` → family record (one per login; see `model`).
    Families,
}

impl Tree {
    pub const ALL: [Tree; 7] = [
        Tree::Meta,
        Tree::Users,
        Tree::UsersByOpenid,
        Tree::UsersByUnionid,
        Tree::RefreshTokens,
        Tree::TokenFamilies,
        Tree::Families,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tree::Meta => "meta",
            Tree::Users => "users",
            Tree::UsersByOpenid => "users_by_openid",
            Tree::UsersByUnionid => "users_by_unionid",
            Tree::RefreshTokens => "refresh_tokens",
            Tree::TokenFamilies => "token_families",
            Tree::Families => "families",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("the data directory {0} is in use by another wxauth process")]
    Locked(String),
    /// `source`: the error underneath, kept for the log (see `cause::cause_chain`).
    #[error("storage I/O error: {context}")]
    Io {
        context: String,
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
    #[error("corrupt record in tree {tree}: {reason}")]
    Corrupt { tree: &'static str, reason: String },
    /// The shared database (`storage.backend = "postgres"`) did not answer, refused
    /// the connection, or cut the statement off (`storage.postgres_statement_timeout`):
    /// the node is fine and a retry may succeed (503 `service_unavailable`), unlike a
    /// local store that cannot write ([`Io`](Self::Io), 503 `storage_unavailable`).
    #[error("the database did not answer: {context}")]
    Database {
        context: String,
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
    /// The data directory's `format_version` is newer than this binary knows.
    #[error(
        "the data directory was written by a newer wxauth (storage format {found}; this \
         binary knows formats up to {known}): run that release or a newer one"
    )]
    NewerFormat { found: u64, known: u64 },
}

impl StorageError {
    /// An I/O failure with its cause.
    pub fn io(
        context: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StorageError::Io {
            context: context.into(),
            source: Some(Arc::new(cause)),
        }
    }

    /// A failure with nothing underneath (shutting down, a reopen under way).
    pub fn unavailable(context: impl Into<String>) -> Self {
        StorageError::Io {
            context: context.into(),
            source: None,
        }
    }

    /// The shared database failed an operation, with its error underneath.
    pub fn database(
        context: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StorageError::Database {
            context: context.into(),
            source: Some(Arc::new(cause)),
        }
    }

    /// The shared database did not answer in time (nothing underneath).
    pub fn database_timeout(context: impl Into<String>) -> Self {
        StorageError::Database {
            context: context.into(),
            source: None,
        }
    }
}

#[derive(Debug)]
enum Op {
    Put(Tree, Vec<u8>, Vec<u8>),
    Delete(Tree, Vec<u8>),
}

/// Writes applied together or not at all.
#[derive(Default)]
pub struct WriteBatch {
    ops: Vec<Op>,
}

impl WriteBatch {
    pub fn put(&mut self, tree: Tree, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put(tree, key.into(), value.into()));
    }

    pub fn delete(&mut self, tree: Tree, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete(tree, key.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Called for each entry of a scan, in key order; `Break` stops the scan.
pub type Visitor<'a> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 'a;

/// Reads: shared by every thread (the request hot path uses this directly).
pub trait ReadStore: Send + Sync {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Visits every entry of `tree` in key order until `visit` breaks.
    fn for_each(&self, tree: Tree, visit: &mut Visitor<'_>) -> Result<(), StorageError>;
    /// Like [`for_each`](Self::for_each), from the first key `>= start` on.
    /// The default skips to `start`; engines override it with a range read.
    fn for_each_from(
        &self,
        tree: Tree,
        start: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<(), StorageError> {
        self.for_each(tree, &mut |key, value| {
            if key < start {
                ControlFlow::Continue(())
            } else {
                visit(key, value)
            }
        })
    }
    fn size_on_disk(&self) -> Result<u64, StorageError>;
    /// The entry with the greatest key of `tree`. The default scans the tree;
    /// engines override it.
    fn last(&self, tree: Tree) -> Result<Option<Entry>, StorageError> {
        let mut last = None;
        self.for_each(tree, &mut |key, value| {
            last = Some((key.to_vec(), value.to_vec()));
            ControlFlow::Continue(())
        })?;
        Ok(last)
    }
}

/// What one step of a chunked scan found: the keys it picked, and the key the
/// next step starts from (`None`: the tree is done).
#[derive(Debug, Default)]
pub struct ScannedKeys {
    pub keys: Vec<Vec<u8>>,
    pub next: Option<Vec<u8>>,
}

/// One bounded step of a long scan (the expired-token purge, revocations): visits
/// at most `limit` entries of `tree` from `from` on, and returns the key the next
/// step starts from (`None`: the tree is done). Between steps the writers go on.
pub fn scan_chunk(
    store: &dyn ReadStore,
    tree: Tree,
    from: &[u8],
    limit: usize,
    visit: &mut dyn FnMut(&[u8], &[u8]),
) -> Result<Option<Vec<u8>>, StorageError> {
    let mut seen = 0;
    let mut last: Option<Vec<u8>> = None;
    store.for_each_from(tree, from, &mut |key, value| {
        if seen == limit {
            return ControlFlow::Break(());
        }
        seen += 1;
        visit(key, value);
        last = Some(key.to_vec());
        ControlFlow::Continue(())
    })?;
    Ok(match last {
        // The smallest key after the last one visited.
        Some(mut next) if seen == limit => {
            next.push(0);
            Some(next)
        }
        _ => None,
    })
}

/// Called for each entry of a snapshot, tree by tree in [`Tree::ALL`] order.
pub type SnapshotVisitor<'a> = dyn FnMut(Tree, &[u8], &[u8]) -> Result<(), StorageError> + 'a;

/// Writes: only the owner actors (user registry, token issuer) hold this.
pub trait Store: ReadStore {
    /// Applies `batch` atomically: all of it or, after a crash, none of it (sled
    /// journals a batch of more than one write for this; see `sled.rs`).
    fn apply(&self, batch: WriteBatch) -> Result<(), StorageError>;
    /// Applies `batch`'s writes one by one, in order, without the journal: after a
    /// crash, a prefix of them is there (sled recovers a prefix of its log). For
    /// write sequences whose every prefix is harmless (a login: the family first,
    /// the user's index last). The default applies each write as a batch of one.
    fn apply_in_order(&self, batch: WriteBatch) -> Result<(), StorageError> {
        for op in batch.ops {
            self.apply(WriteBatch { ops: vec![op] })?;
        }
        Ok(())
    }
    /// Makes every write applied so far durable (fsync).
    fn flush(&self) -> Result<(), StorageError>;
    /// Visits every entry of every tree as of one instant: writes wait meanwhile
    /// (a consistent backup).
    fn snapshot(&self, visit: &mut SnapshotVisitor<'_>) -> Result<(), StorageError>;
    /// After a failed write or flush (a full or read-only disk), reopens the engine
    /// from what was durable. `Ok(false)`: nothing had failed. Called by the commit
    /// thread, so a server recovers by itself once the disk does.
    fn recover(&self) -> Result<bool, StorageError>;
}

type Waiter = oneshot::Sender<Result<(), StorageError>>;

struct CommitQueue {
    waiters: Vec<Waiter>,
    stopping: bool,
}

struct CommitShared {
    queue: Mutex<CommitQueue>,
    wake: Condvar,
    healthy: AtomicBool,
    flushes: AtomicU64,
}

/// A place in the group commit's queue ([`GroupCommit::register`]).
pub struct CommitWait(Result<oneshot::Receiver<Result<(), StorageError>>, StorageError>);

impl CommitWait {
    pub async fn wait(self) -> Result<(), StorageError> {
        match self.0 {
            Ok(rx) => rx
                .await
                .unwrap_or_else(|_| Err(StorageError::unavailable("the commit thread stopped"))),
            Err(e) => Err(e),
        }
    }
}

/// Group commit: one thread fsyncs on behalf of everyone waiting. While a flush
/// runs, new waiters gather; the next flush serves them all at once.
#[derive(Clone)]
pub struct GroupCommit {
    shared: Arc<CommitShared>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl GroupCommit {
    pub fn start(store: Arc<dyn Store>) -> Self {
        Self::start_with(store, || {})
    }

    /// Like [`start`](Self::start); `on_recovered` runs each time the store has
    /// reopened from what was durable ([`Store::recover`]): whatever remembers what
    /// the store held (the users cache) must forget it, as writes may be gone.
    pub fn start_with(store: Arc<dyn Store>, on_recovered: impl Fn() + Send + 'static) -> Self {
        let shared = Arc::new(CommitShared {
            queue: Mutex::new(CommitQueue {
                waiters: Vec::new(),
                stopping: false,
            }),
            wake: Condvar::new(),
            healthy: AtomicBool::new(true),
            flushes: AtomicU64::new(0),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("wxauth-commit".into())
            .spawn(move || commit_loop(&worker, store.as_ref(), &on_recovered))
            .expect("cannot spawn the commit thread");
        GroupCommit {
            shared,
            thread: Arc::new(Mutex::new(Some(thread))),
        }
    }

    /// Resolves once every write applied before this call is on disk.
    pub async fn durable(&self) -> Result<(), StorageError> {
        self.register().wait().await
    }

    /// Joins the next flush now: the returned wait resolves once every write applied
    /// before this call is on disk. An owner actor registers in the turn that wrote
    /// and answers when the wait resolves: measured, that beats waking each request's
    /// own thread from the commit thread (docs/BENCHMARKS.md).
    pub fn register(&self) -> CommitWait {
        let (tx, rx) = oneshot::channel();
        {
            let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.stopping {
                return CommitWait(Err(StorageError::unavailable("storage is shutting down")));
            }
            queue.waiters.push(tx);
        }
        self.shared.wake.notify_one();
        CommitWait(Ok(rx))
    }

    /// False after a flush failed, until one succeeds again (readiness uses this).
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// How many fsyncs have run; with the number of writes it shows the grouping.
    pub fn flush_count(&self) -> u64 {
        self.shared.flushes.load(Ordering::Relaxed)
    }

    /// Serves the waiters still queued, then stops the thread. Idempotent.
    pub fn shutdown(&self) {
        {
            let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.stopping = true;
        }
        self.shared.wake.notify_one();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

/// How often an idle commit thread checks whether a broken store can be reopened.
const RECOVERY_POLL: std::time::Duration = std::time::Duration::from_secs(1);

fn commit_loop(shared: &CommitShared, store: &dyn Store, on_recovered: &dyn Fn()) {
    loop {
        let (batch, stopping) = {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.waiters.is_empty() && !queue.stopping {
                queue = shared
                    .wake
                    .wait_timeout(queue, RECOVERY_POLL)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            (std::mem::take(&mut queue.waiters), queue.stopping)
        };
        // A failed write or flush broke the store: reopen it once the disk allows.
        match store.recover() {
            Ok(false) => {}
            Ok(true) => {
                on_recovered();
                shared.healthy.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                shared.healthy.store(false, Ordering::Relaxed);
                tracing::debug!(error = %crate::cause::cause_chain(&e), "storage still cannot be reopened");
            }
        }
        if !batch.is_empty() || stopping {
            let result = store.flush();
            shared.flushes.fetch_add(1, Ordering::Relaxed);
            shared.healthy.store(result.is_ok(), Ordering::Relaxed);
            if let Err(e) = &result {
                tracing::error!(error = %crate::cause::cause_chain(&e), "storage flush failed");
            }
            for waiter in batch {
                let _ = waiter.send(result.clone());
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// A store that counts applied writes and records, for each flush, how many
    /// writes had been applied when it began. Its flushes are slow, as fsyncs are,
    /// and fail when `broken` is set.
    #[derive(Default)]
    struct FakeStore {
        applied: AtomicUsize,
        flushes: Mutex<Vec<usize>>,
        broken: bool,
        /// The next `recover` reports a reopen (a failed flush the disk healed).
        reopened: AtomicBool,
    }

    impl ReadStore for FakeStore {
        fn get(&self, _: Tree, _: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
            Ok(None)
        }
        fn for_each(&self, _: Tree, _: &mut Visitor<'_>) -> Result<(), StorageError> {
            Ok(())
        }
        fn size_on_disk(&self) -> Result<u64, StorageError> {
            Ok(0)
        }
    }

    impl Store for FakeStore {
        fn apply(&self, _: WriteBatch) -> Result<(), StorageError> {
            self.applied.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn flush(&self) -> Result<(), StorageError> {
            if self.broken {
                return Err(StorageError::unavailable("disk full"));
            }
            let covered = self.applied.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            self.flushes.lock().unwrap().push(covered);
            Ok(())
        }
        fn snapshot(&self, _: &mut SnapshotVisitor<'_>) -> Result<(), StorageError> {
            Ok(())
        }
        fn recover(&self) -> Result<bool, StorageError> {
            Ok(self.reopened.swap(false, Ordering::SeqCst))
        }
    }

    #[actix_web::test]
    async fn durable_waits_for_a_flush_that_covers_the_write_and_flushes_are_shared() {
        let store = Arc::new(FakeStore::default());
        let commit = GroupCommit::start(store.clone());
        let waiters = (0..50).map(|_| {
            let (store, commit) = (store.clone(), commit.clone());
            async move {
                store.apply(WriteBatch::default()).unwrap();
                let written = store.applied.load(Ordering::SeqCst);
                commit.durable().await.unwrap();
                // Some flush that had seen at least this many writes has completed.
                let flushes = store.flushes.lock().unwrap().clone();
                assert!(
                    flushes.iter().any(|&covered| covered >= written),
                    "answered before its flush"
                );
            }
        });
        futures_util::future::join_all(waiters).await;
        let flushes = store.flushes.lock().unwrap().len();
        assert!(
            flushes < 50,
            "50 concurrent commits took {flushes} flushes: not grouped"
        );
        commit.shutdown();
    }

    #[actix_web::test]
    async fn a_reopened_store_is_announced_once_before_the_next_flush() {
        let reopens = Arc::new(AtomicUsize::new(0));
        let seen = reopens.clone();
        let commit = GroupCommit::start_with(
            Arc::new(FakeStore {
                reopened: AtomicBool::new(true),
                ..FakeStore::default()
            }),
            move || {
                seen.fetch_add(1, Ordering::SeqCst);
            },
        );
        commit.durable().await.unwrap();
        assert_eq!(reopens.load(Ordering::SeqCst), 1);
        commit.durable().await.unwrap();
        assert_eq!(reopens.load(Ordering::SeqCst), 1, "only when it reopened");
        commit.shutdown();
    }

    #[actix_web::test]
    async fn a_failed_flush_fails_its_waiters_and_marks_unhealthy() {
        let commit = GroupCommit::start(Arc::new(FakeStore {
            broken: true,
            ..FakeStore::default()
        }));
        assert!(commit.durable().await.is_err());
        assert!(!commit.is_healthy());
        commit.shutdown();
        assert!(commit.durable().await.is_err(), "no commit after shutdown");
    }
}
