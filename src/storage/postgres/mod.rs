//! The PostgreSQL implementation of [`AuthStore`]: any number of wxauth nodes on one
//! database. Nothing here relies on the owner actors' serialization: every rule is
//! decided by the database, with a unique key or a conditional
//! `UPDATE ... WHERE ... RETURNING` checked by its row count, never by reading and
//! then writing (docs/ARCHITECTURE.md, "PostgreSQL", says which statement enforces
//! which rule). Each operation's future resolves once its `COMMIT` returned
//! (`synchronous_commit = on`, set on every connection): durable.
//!
//! Threads. actix runs each HTTP worker and each actor arbiter on its own
//! single-thread tokio runtime, and a tokio-postgres connection is driven by a task
//! on the runtime that opened it: a pooled connection opened on one worker would die
//! with it and could not be used from another. So the pool and every connection
//! live on one dedicated runtime ([`IoRuntime`], two threads, `wxauth-postgres`);
//! an operation is spawned there and its caller, on whatever runtime, awaits the
//! task's handle (the token check's reads included: no HTTP worker blocks on the
//! database). Every statement on the request path is prepared once per connection
//! (`prepared`) and then executed in one round trip.
//!
//! Bounds. At most `storage.postgres_pool_size` connections; the wait for one, the
//! connect, every statement (`statement_timeout`, set per connection) and the whole
//! operation are cut off after `storage.postgres_statement_timeout`. A database that
//! does not answer therefore fails an operation within that time, with a
//! [`StorageError`] (503 to a client), never a hang.

pub mod keys;
mod kv;
mod listen;
mod migrate;
mod outbox;

pub use migrate::{latest as latest_schema, Migrated};

use crate::config::StorageConfig;
use crate::postgres_url::PostgresUrl;
use crate::storage::model::{
    standing, AuthStore, Deletion, FamilyId, FamilyRecord, Generation, LoginRequest, LoginResult,
    ProfileChange, PurgeProgress, RotateOutcome, RotateRequest, Standing, StartFamilyRequest,
    StartFamilyResult, StoreFuture,
};
use crate::storage::{StorageError, Tree};
use crate::users::cache::UserCache;
use crate::users::{PhoneNumber, User, UserId};
use deadpool_postgres::{
    GenericClient, Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod,
};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::{Row, Statement};

/// The channel on which a node announces that a user record changed (payload: the
/// user id), so that every node drops it from its users cache.
pub const USERS_CHANNEL: &str = "wxauth_users";

/// A storage error with the database's error underneath (kept for the log).
pub(crate) fn pg_error(
    context: impl Into<String>,
    e: impl std::error::Error + Send + Sync + 'static,
) -> StorageError {
    StorageError::database(context, e)
}

/// The connection's prepared statement for `sql`: parsed and planned by the server
/// once per connection (its first use), then only bound and executed, one round trip
/// each time. deadpool keeps the cache per connection; every statement on the
/// request path goes through here.
pub(crate) async fn prepared<C: GenericClient>(
    client: &C,
    sql: &str,
) -> Result<Statement, StorageError> {
    client
        .prepare_cached(sql)
        .await
        .map_err(|e| pg_error("cannot prepare a statement", e))
}

/// The runtime that owns the pool's connections (see the module docs).
struct IoRuntime {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
}

impl IoRuntime {
    fn new() -> Result<Self, StorageError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("wxauth-postgres")
            .enable_all()
            .build()
            .map_err(|e| StorageError::io("cannot start the PostgreSQL runtime", e))?;
        Ok(IoRuntime {
            handle: runtime.handle().clone(),
            runtime: Mutex::new(Some(runtime)),
        })
    }

    /// Runs `work` on this runtime; the returned future may be awaited anywhere.
    fn spawn<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, StorageError>> + Send + 'static,
    ) -> StoreFuture<T> {
        let task = self.handle.spawn(work);
        Box::pin(async move {
            task.await.unwrap_or_else(|e| {
                Err(StorageError::database_timeout(format!(
                    "a PostgreSQL operation did not finish: {e}"
                )))
            })
        })
    }

    /// Runs `work` on this runtime and blocks the calling thread until it is done:
    /// for the start (before anything is served) and the offline CLI.
    fn block_on<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, StorageError>> + Send + 'static,
    ) -> Result<T, StorageError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(work.await);
        });
        rx.recv().unwrap_or_else(|_| {
            Err(StorageError::unavailable(
                "the PostgreSQL runtime stopped before the operation finished",
            ))
        })
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        // Never blocks: dropping a runtime inside another's async context would panic.
        if let Some(runtime) = self
            .runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            runtime.shutdown_background();
        }
    }
}

/// The shared part of [`PgStore`]; every operation's task holds an `Arc` of it.
struct Shared {
    pool: Pool,
    timeout: Duration,
    /// This node's users cache ([`PgStore::with_user_cache`]): a user row this node
    /// changed is dropped from it once committed (the next read fetches it).
    users: Option<Arc<UserCache>>,
    /// `events.webhook_url` set ([`PgStore::with_events`]): every user change adds
    /// its event to its own transaction, then wakes this node's delivery thread.
    events: Option<Arc<crate::events::Wake>>,
}

impl Shared {
    /// A pooled connection, within the timeout.
    /// After a committed change of user `id`.
    fn forget_user(&self, id: UserId) {
        if let Some(users) = &self.users {
            users.forget(id);
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StorageError> {
        self.pool
            .get()
            .await
            .map_err(|e| pg_error("no PostgreSQL connection", e))
    }
}

/// The PostgreSQL store. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct PgStore {
    shared: Arc<Shared>,
    io: Arc<IoRuntime>,
    /// What the notification listener connects with.
    client_config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// `storage.postgres_stale_for`: how long cached users are served once the
    /// notification connection is lost.
    stale_for: Duration,
}

impl PgStore {
    /// Connects to `storage.postgres_url` and brings the schema to this binary's
    /// version (or refuses a newer one). Blocks the calling thread: call it at
    /// start, before serving, or from the CLI.
    pub fn open(config: &StorageConfig) -> Result<Self, StorageError> {
        let url = config.postgres.as_ref().ok_or_else(|| {
            StorageError::unavailable("storage.backend = \"postgres\" but no postgres_url")
        })?;
        // storage.path still holds this node's own files (the admin socket).
        if !config.path.is_dir() {
            crate::fsutil::create_private_dir(&config.path).map_err(|e| {
                StorageError::io(format!("cannot create {}", config.path.display()), e)
            })?;
        }
        let mut store = Self::connect(
            url,
            config.postgres_pool_size,
            config.postgres_statement_timeout,
        )?;
        store.stale_for = config.postgres_stale_for;
        let shared = store.shared.clone();
        let migrated = store.io.block_on(async move {
            let mut client = shared.client().await?;
            migrate::run(&mut client).await
        })?;
        tracing::debug!(schema = migrated.to, "PostgreSQL schema ready");
        Ok(store)
    }

    /// The pool, without touching the database yet (connections open on first use).
    fn connect(
        url: &PostgresUrl,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<Self, StorageError> {
        let io = Arc::new(IoRuntime::new()?);
        let tls = url.tls_config().map_err(|reason| {
            StorageError::unavailable(format!("storage.postgres_url: {reason}"))
        })?;
        let mut client_config = url.client.clone();
        if client_config.get_connect_timeout().is_none() {
            client_config.connect_timeout(timeout);
        }
        // A peer that vanished (a failover, a cut link) is noticed within a minute.
        client_config.keepalives_idle(Duration::from_secs(30));
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
        let manager = Manager::from_config(
            client_config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let settings = format!(
            "SET statement_timeout = {ms}; \
             SET lock_timeout = {ms}; \
             SET idle_in_transaction_session_timeout = {idle}; \
             SET synchronous_commit = on",
            ms = timeout.as_millis(),
            idle = timeout.as_millis() * 2,
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .post_create(Hook::async_fn(move |client, _| {
                let settings = settings.clone();
                Box::pin(async move {
                    client
                        .batch_execute(&settings)
                        .await
                        .map_err(HookError::Backend)
                })
            }))
            .build()
            .map_err(|e| StorageError::io("cannot build the PostgreSQL pool", e))?;
        Ok(PgStore {
            shared: Arc::new(Shared {
                pool,
                timeout,
                users: None,
                events: None,
            }),
            io,
            client_config,
            tls,
            stale_for: Duration::ZERO,
        })
    }

    /// Runs one operation on the I/O runtime, cut off after the timeout.
    fn run<T, F, Fut>(&self, operation: &'static str, work: F) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Shared>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StorageError>> + Send + 'static,
    {
        self.run_for(operation, 1, work)
    }

    /// [`run`](Self::run) for an operation of `statements` statements (a restore's
    /// batch): cut off after the timeout for every 500 of them.
    fn run_for<T, F, Fut>(
        &self,
        operation: &'static str,
        statements: usize,
        work: F,
    ) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Shared>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StorageError>> + Send + 'static,
    {
        let shared = self.shared.clone();
        let rounds = u32::try_from(statements.div_ceil(500).max(1)).unwrap_or(u32::MAX);
        self.io.spawn(async move {
            let timeout = shared.timeout.saturating_mul(rounds);
            match tokio::time::timeout(timeout, work(shared)).await {
                Ok(result) => result,
                Err(_) => Err(StorageError::database_timeout(format!(
                    "PostgreSQL did not answer within {}ms ({operation})",
                    timeout.as_millis()
                ))),
            }
        })
    }

    /// Keeps `users` (the token check's cache) true across nodes: this node's user
    /// writes drop their user from it, and a listener drops the users other nodes
    /// announce, and bounds how long it is served when that channel is lost (see
    /// `listen`). Call once, before the store is shared.
    pub fn with_user_cache(mut self, users: Arc<UserCache>) -> Self {
        let shared = Arc::get_mut(&mut self.shared).expect("with_user_cache before sharing");
        shared.users = Some(users.clone());
        listen::start(
            &self.io,
            self.client_config.clone(),
            self.tls.clone(),
            users,
            self.stale_for,
        );
        self
    }

    /// Writes an event for every user change into the change's own transaction
    /// (`events.webhook_url` set); `wake` is woken after each commit that wrote one.
    /// Call once, before the store is shared.
    pub fn with_events(mut self, wake: Arc<crate::events::Wake>) -> Self {
        let shared = Arc::get_mut(&mut self.shared).expect("with_events before sharing");
        shared.events = Some(wake);
        self
    }

    fn io_handle(&self) -> &tokio::runtime::Handle {
        &self.io.handle
    }

    /// Blocks on an operation: for the offline CLI and the start.
    pub fn wait<T: Send + 'static>(&self, operation: StoreFuture<T>) -> Result<T, StorageError> {
        self.io.block_on(operation)
    }

    /// A round trip to the database (`/readyz`).
    pub fn probe(&self) -> StoreFuture<()> {
        self.run("probe", |shared| async move {
            let client = shared.client().await?;
            client
                .execute(&prepared(&client, "SELECT 1").await?, &[])
                .await
                .map_err(|e| pg_error("PostgreSQL did not answer the probe", e))?;
            Ok(())
        })
    }

    /// No user and no family yet (a restore's target).
    pub fn holds_no_users(&self) -> Result<bool, StorageError> {
        self.wait(self.run("look for users", |shared| async move {
            let client = shared.client().await?;
            let row = client
                .query_one(
                    "SELECT NOT EXISTS (SELECT 1 FROM wxauth_users) \
                     AND NOT EXISTS (SELECT 1 FROM wxauth_families)",
                    &[],
                )
                .await
                .map_err(|e| pg_error("look for users", e))?;
            Ok(row.get(0))
        }))
    }

    /// Deletes every row of wxauth's tables (a failed restore's cleanup); the schema
    /// stays.
    pub fn empty(&self) -> Result<(), StorageError> {
        self.wait(self.run("empty the database", |shared| async move {
            let client = shared.client().await?;
            client
                .batch_execute(
                    "TRUNCATE wxauth_user_openids, wxauth_user_unionids, wxauth_families, \
                     wxauth_kv, wxauth_users, wxauth_outbox",
                )
                .await
                .map_err(|e| pg_error("empty the database", e))
        }))
    }

    /// The schema version the database has now.
    pub fn schema_version(&self) -> StoreFuture<i32> {
        self.run("schema version", |shared| async move {
            let client = shared.client().await?;
            let row = client
                .query_one(
                    "SELECT coalesce(max(version), 0) FROM wxauth_schema_migrations",
                    &[],
                )
                .await
                .map_err(|e| pg_error("cannot read the schema version", e))?;
            Ok(row.get(0))
        })
    }
}

const USER_COLUMNS: &str = "id, appid, openid, unionid, session_key, created_at, last_login_at, \
                            disabled, token_stamp, tokens_not_before, phone, nickname, \
                            avatar_url, deletion_due, erased_at";

fn user_from_row(row: &Row) -> Result<User, StorageError> {
    let phone: Option<String> = row.get("phone");
    let phone = phone
        .map(|text| {
            serde_json::from_str::<PhoneNumber>(&text).map_err(|e| StorageError::Corrupt {
                tree: "wxauth_users",
                reason: format!("phone: {e}"),
            })
        })
        .transpose()?
        .map(Box::new);
    let id: i64 = row.get("id");
    let token_stamp: i64 = row.get("token_stamp");
    Ok(User {
        id: id as UserId,
        appid: row.get("appid"),
        openid: row.get("openid"),
        unionid: row.get("unionid"),
        session_key: crate::secret::SessionKey::new(row.get::<_, String>("session_key")),
        created_at: row.get("created_at"),
        last_login_at: row.get("last_login_at"),
        disabled: row.get("disabled"),
        token_stamp: token_stamp as u64,
        tokens_not_before: row.get("tokens_not_before"),
        phone,
        nickname: row.get("nickname"),
        avatar_url: row.get("avatar_url"),
        deletion_due: row.get("deletion_due"),
        erased_at: row.get("erased_at"),
    })
}

const FAMILY_COLUMNS: &str =
    "user_id, family_id, generation, created_ms, rotated_ms, exp, revoked_ms, stamp";

fn family_from_row(row: &Row) -> Result<FamilyRecord, StorageError> {
    let id: Vec<u8> = row.get("family_id");
    let id: [u8; 16] = id
        .as_slice()
        .try_into()
        .map_err(|_| StorageError::Corrupt {
            tree: "wxauth_families",
            reason: format!("family id of {} bytes", id.len()),
        })?;
    let user_id: i64 = row.get("user_id");
    let generation: i64 = row.get("generation");
    Ok(FamilyRecord {
        user_id: user_id as UserId,
        id: FamilyId(id),
        generation: generation as Generation,
        created_ms: row.get("created_ms"),
        rotated_ms: row.get("rotated_ms"),
        exp: row.get("exp"),
        revoked_ms: row.get("revoked_ms"),
        stamp: row.get::<_, i64>("stamp") as u64,
    })
}

/// How many times a login starts over after losing a race for a key to another
/// node (it then finds that node's user): twice is the most a race can cost.
const LOGIN_ATTEMPTS: usize = 4;

async fn login(shared: Arc<Shared>, request: LoginRequest) -> Result<LoginResult, StorageError> {
    let mut client = shared.client().await?;
    for _ in 0..LOGIN_ATTEMPTS {
        if let Some(result) = login_once(&shared, &mut client, &request).await? {
            if let LoginResult::LoggedIn { user, created, .. } = &result {
                shared.forget_user(user.id);
                if *created {
                    outbox::added(&shared);
                }
            }
            return Ok(result);
        }
    }
    Err(StorageError::database_timeout(
        "a login lost the race for its user's key too many times",
    ))
}

/// One attempt; `None`: another transaction claimed the key this one wanted first
/// (this one rolled back; the next attempt finds the winner's user).
async fn login_once(
    shared: &Shared,
    client: &mut deadpool_postgres::Client,
    request: &LoginRequest,
) -> Result<Option<LoginResult>, StorageError> {
    let e = |what: &'static str| move |e| pg_error(format!("login: {what}"), e);
    let session = &request.session;
    let appid = request.appid.as_str();
    let openid = session.openid.as_str();
    let unionid = session
        .unionid
        .as_deref()
        .filter(|_| request.link_by_unionid);
    let now = request.now_ms.div_euclid(1000);
    let tx = client.transaction().await.map_err(e("begin"))?;

    let by_unionid: Option<i64> = match unionid {
        Some(unionid) => {
            let sql = "SELECT user_id FROM wxauth_user_unionids WHERE unionid = $1";
            tx.query_opt(&prepared(&tx, sql).await?, &[&unionid])
                .await
                .map_err(e("find by unionid"))?
                .map(|row| row.get(0))
        }
        None => None,
    };
    let sql = "SELECT user_id FROM wxauth_user_openids WHERE appid = $1 AND openid = $2";
    let by_openid: Option<i64> = tx
        .query_opt(&prepared(&tx, sql).await?, &[&appid, &openid])
        .await
        .map_err(e("find by openid"))?
        .map(|row| row.get(0));
    let family_id = request.family.0.as_slice();

    let mut deletion_cancelled = false;
    let (user, created) = match by_unionid.or(by_openid) {
        Some(id) => {
            // Enabled users only: a disable committed before this statement wins. A
            // deletion mark is cleared (the login cancels it); `was_due` says whether
            // there was one, read under the row's lock. The family is inserted by the
            // same statement, from the updated row (so with its token stamp), and
            // other nodes are told (on commit) that the user changed: its session key
            // did. Nothing at all when the update matched no row.
            let sql = format!(
                "WITH u AS (\
                   UPDATE wxauth_users SET last_login_at = $2, session_key = $3, \
                   unionid = coalesce(unionid, $4), deletion_due = NULL \
                   FROM (SELECT id AS old_id, deletion_due AS was_due FROM wxauth_users \
                         WHERE id = $1 FOR UPDATE) old \
                   WHERE id = old.old_id AND NOT disabled \
                   RETURNING {USER_COLUMNS}, old.was_due), \
                 family AS (\
                   INSERT INTO wxauth_families \
                   (user_id, family_id, generation, created_ms, rotated_ms, exp, stamp) \
                   SELECT id, $5::bytea, 1, $6::bigint, $6::bigint, $7::bigint, token_stamp \
                   FROM u) \
                 SELECT u.*, pg_notify($8::text, u.id::text) FROM u"
            );
            let updated = tx
                .query_opt(
                    &prepared(&tx, &sql).await?,
                    &[
                        &id,
                        &now,
                        &session.session_key.expose(),
                        &session.unionid,
                        &family_id,
                        &request.now_ms,
                        &request.family_exp,
                        &USERS_CHANNEL,
                    ],
                )
                .await
                .map_err(e("update the user"))?;
            let Some(row) = updated else {
                let sql = "SELECT erased_at IS NOT NULL FROM wxauth_users WHERE id = $1";
                let disabled = tx
                    .query_opt(&prepared(&tx, sql).await?, &[&id])
                    .await
                    .map_err(e("read the user"))?;
                return match disabled {
                    // Erased while this login looked it up: its keys are gone, the
                    // next attempt creates a new user.
                    Some(row) if row.get::<_, bool>(0) => {
                        tx.rollback().await.map_err(e("roll back"))?;
                        Ok(None)
                    }
                    Some(_) => Ok(Some(LoginResult::Disabled)),
                    None => Err(StorageError::Corrupt {
                        tree: "wxauth_users",
                        reason: format!("a key points at missing user {id}"),
                    }),
                };
            };
            if by_openid != Some(id) {
                let sql = "INSERT INTO wxauth_user_openids (appid, openid, user_id) \
                           VALUES ($1, $2, $3) \
                           ON CONFLICT (appid, openid) DO UPDATE SET user_id = EXCLUDED.user_id";
                tx.execute(&prepared(&tx, sql).await?, &[&appid, &openid, &id])
                    .await
                    .map_err(e("index the openid"))?;
            }
            if let (Some(unionid), None) = (unionid, by_unionid) {
                let sql = "INSERT INTO wxauth_user_unionids (unionid, user_id) VALUES ($1, $2) \
                           ON CONFLICT (unionid) DO NOTHING";
                tx.execute(&prepared(&tx, sql).await?, &[&unionid, &id])
                    .await
                    .map_err(e("index the unionid"))?;
            }
            deletion_cancelled = row.get::<_, Option<i64>>("was_due").is_some();
            (user_from_row(&row)?, false)
        }
        None => {
            // The user row, the claim of its (appid, openid) key and the family, one
            // statement. The unique key decides who created the user: a concurrent
            // login of the same openid on any node waits here for the other
            // transaction, and claims nothing (and starts no family) if that one
            // committed; `claimed` then says to roll back and start over.
            let sql = format!(
                "WITH u AS (\
                   INSERT INTO wxauth_users \
                   (id, appid, openid, unionid, session_key, created_at, last_login_at) \
                   VALUES (nextval('wxauth_user_ids'), $1, $2, $3, $4, $5, $5) \
                   RETURNING {USER_COLUMNS}), \
                 claim AS (\
                   INSERT INTO wxauth_user_openids (appid, openid, user_id) \
                   SELECT appid, openid, id FROM u \
                   ON CONFLICT (appid, openid) DO NOTHING RETURNING user_id), \
                 family AS (\
                   INSERT INTO wxauth_families \
                   (user_id, family_id, generation, created_ms, rotated_ms, exp, stamp) \
                   SELECT u.id, $6::bytea, 1, $7::bigint, $7::bigint, $8::bigint, u.token_stamp \
                   FROM u JOIN claim ON claim.user_id = u.id) \
                 SELECT u.*, EXISTS (SELECT 1 FROM claim) AS claimed FROM u"
            );
            let row = tx
                .query_one(
                    &prepared(&tx, &sql).await?,
                    &[
                        &appid,
                        &openid,
                        &session.unionid,
                        &session.session_key.expose(),
                        &now,
                        &family_id,
                        &request.now_ms,
                        &request.family_exp,
                    ],
                )
                .await
                .map_err(e("create the user"))?;
            if !row.get::<_, bool>("claimed") {
                tx.rollback().await.map_err(e("roll back"))?;
                return Ok(None);
            }
            let user = user_from_row(&row)?;
            let id = user.id as i64;
            if let Some(unionid) = unionid {
                let sql = "INSERT INTO wxauth_user_unionids (unionid, user_id) VALUES ($1, $2) \
                           ON CONFLICT (unionid) DO NOTHING";
                let claimed = tx
                    .execute(&prepared(&tx, sql).await?, &[&unionid, &id])
                    .await
                    .map_err(e("claim the unionid"))?;
                if claimed == 0 {
                    tx.rollback().await.map_err(e("roll back"))?;
                    return Ok(None);
                }
            }
            let data = crate::events::created_data(&user);
            outbox::add(
                shared,
                &tx,
                user.id,
                crate::events::EventType::Created,
                data,
            )
            .await?;
            (user, true)
        }
    };
    let family = FamilyRecord {
        user_id: user.id,
        id: request.family,
        generation: 1,
        created_ms: request.now_ms,
        rotated_ms: request.now_ms,
        exp: request.family_exp,
        revoked_ms: None,
        stamp: user.token_stamp,
    };
    tx.commit().await.map_err(e("commit"))?;
    Ok(Some(LoginResult::LoggedIn {
        deletion_cancelled,
        user,
        created,
        family,
    }))
}

/// One transaction: the user's row read `FOR SHARE` (a concurrent disable, revoke or
/// erasure waits for this commit, or this read waits for theirs), then the family
/// at generation 1 with the user's `token_stamp`. The user row is not written.
async fn start_family(
    shared: Arc<Shared>,
    request: StartFamilyRequest,
) -> Result<StartFamilyResult, StorageError> {
    let e = |what: &'static str| move |e| pg_error(format!("start a family: {what}"), e);
    let mut client = shared.client().await?;
    let tx = client.transaction().await.map_err(e("begin"))?;
    let row = tx
        .query_opt(
            &format!("SELECT {USER_COLUMNS} FROM wxauth_users WHERE id = $1 FOR SHARE"),
            &[&(request.user_id as i64)],
        )
        .await
        .map_err(e("read the user"))?;
    let Some(row) = row else {
        return Ok(StartFamilyResult::Missing);
    };
    let user = user_from_row(&row)?;
    if user.disabled || user.erased_at.is_some() {
        return Ok(StartFamilyResult::Disabled);
    }
    let family = FamilyRecord::first(
        user.id,
        request.family,
        user.token_stamp,
        request.family_exp,
        request.now_ms,
    );
    tx.execute(
        "INSERT INTO wxauth_families \
         (user_id, family_id, generation, created_ms, rotated_ms, exp, stamp) \
         VALUES ($1, $2, 1, $3, $3, $4, $5)",
        &[
            &(user.id as i64),
            &family.id.0.as_slice(),
            &request.now_ms,
            &request.family_exp,
            &(user.token_stamp as i64),
        ],
    )
    .await
    .map_err(e("insert the family"))?;
    tx.commit().await.map_err(e("commit"))?;
    Ok(StartFamilyResult::Started { user, family })
}

/// Tells every node (on commit) that the user's record changed.
async fn notify_user(
    client: &deadpool_postgres::Transaction<'_>,
    id: UserId,
) -> Result<(), StorageError> {
    let sql = "SELECT pg_notify($1, $2)";
    client
        .execute(
            &prepared(client, sql).await?,
            &[&USERS_CHANNEL, &id.to_string()],
        )
        .await
        .map_err(|e| pg_error("cannot announce a user change", e))?;
    Ok(())
}

/// One conditional change of a user row, announced to every node in the same
/// transaction. `None`: no such user.
async fn update_user(
    shared: Arc<Shared>,
    id: UserId,
    set: &'static str,
    values: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    event: Option<(crate::events::EventType, serde_json::Value)>,
) -> Result<Option<User>, StorageError> {
    let mut client = shared.client().await?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| pg_error("update a user: begin", e))?;
    let sql = format!("UPDATE wxauth_users SET {set} WHERE id = $1 RETURNING {USER_COLUMNS}");
    let id_param = id as i64;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&id_param];
    params.extend_from_slice(values);
    let row = tx
        .query_opt(&prepared(&tx, &sql).await?, &params)
        .await
        .map_err(|e| pg_error("update a user", e))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let user = user_from_row(&row)?;
    notify_user(&tx, id).await?;
    let evented = event.is_some();
    if let Some((kind, data)) = event {
        outbox::add(&shared, &tx, id, kind, data).await?;
    }
    tx.commit()
        .await
        .map_err(|e| pg_error("update a user: commit", e))?;
    shared.forget_user(id);
    if evented {
        outbox::added(&shared);
    }
    Ok(Some(user))
}

async fn delete_user(
    shared: Arc<Shared>,
    id: UserId,
    due: i64,
    now: i64,
    only_if_due: bool,
) -> Result<Option<Deletion>, StorageError> {
    let e = |what: &'static str| move |e| pg_error(format!("delete a user: {what}"), e);
    let mut client = shared.client().await?;
    let tx = client.transaction().await.map_err(e("begin"))?;
    let id_param = id as i64;
    let row = tx
        .query_opt(
            &format!("SELECT {USER_COLUMNS} FROM wxauth_users WHERE id = $1 FOR UPDATE"),
            &[&id_param],
        )
        .await
        .map_err(e("lock the user"))?;
    let Some(row) = row else { return Ok(None) };
    let user = user_from_row(&row)?;
    let still_due = user.deletion_due.is_some_and(|d| d <= now);
    if user.erased_at.is_some() || (only_if_due && !still_due) {
        return Ok(None);
    }
    if due > now {
        if let Some(marked) = user.deletion_due.filter(|&d| d <= due) {
            return Ok(Some(Deletion::Scheduled { user, due: marked }));
        }
        let row = tx
            .query_one(
                &format!(
                    "UPDATE wxauth_users SET deletion_due = $2 WHERE id = $1 \
                     RETURNING {USER_COLUMNS}"
                ),
                &[&id_param, &due],
            )
            .await
            .map_err(e("mark the user"))?;
        let user = user_from_row(&row)?;
        notify_user(&tx, id).await?;
        let data = crate::events::deletion_scheduled_data(due);
        let kind = crate::events::EventType::DeletionScheduled;
        outbox::add(&shared, &tx, id, kind, data).await?;
        tx.commit().await.map_err(e("commit"))?;
        shared.forget_user(id);
        outbox::added(&shared);
        return Ok(Some(Deletion::Scheduled { user, due }));
    }
    // Every key that points at the user (any app's openid, the unionid), every
    // family, then the personal columns.
    for sql in [
        "DELETE FROM wxauth_user_openids WHERE user_id = $1",
        "DELETE FROM wxauth_user_unionids WHERE user_id = $1",
        "DELETE FROM wxauth_families WHERE user_id = $1",
    ] {
        tx.execute(sql, &[&id_param])
            .await
            .map_err(e("remove what points at the user"))?;
    }
    let row = tx
        .query_one(
            &format!(
                "UPDATE wxauth_users SET openid = '', unionid = NULL, session_key = '', \
                 phone = NULL, nickname = NULL, avatar_url = NULL, deletion_due = NULL, \
                 erased_at = $2, disabled = true, token_stamp = token_stamp + 1 \
                 WHERE id = $1 RETURNING {USER_COLUMNS}"
            ),
            &[&id_param, &now],
        )
        .await
        .map_err(e("erase the user"))?;
    let user = user_from_row(&row)?;
    notify_user(&tx, id).await?;
    let (kind, data) = (crate::events::EventType::Deleted, serde_json::json!({}));
    outbox::add(&shared, &tx, id, kind, data).await?;
    tx.commit().await.map_err(e("commit"))?;
    shared.forget_user(id);
    outbox::added(&shared);
    Ok(Some(Deletion::Erased { user }))
}

async fn read_family(
    client: &deadpool_postgres::Client,
    user_id: UserId,
    family: FamilyId,
) -> Result<Option<FamilyRecord>, StorageError> {
    let sql = format!(
        "SELECT {FAMILY_COLUMNS} FROM wxauth_families WHERE user_id = $1 AND family_id = $2"
    );
    client
        .query_opt(
            &prepared(client, &sql).await?,
            &[&(user_id as i64), &family.0.as_slice()],
        )
        .await
        .map_err(|e| pg_error("read a family", e))?
        .as_ref()
        .map(family_from_row)
        .transpose()
}

/// A logout, or a reuse's revocation: once, whatever the family's generation is now.
const REVOKE_FAMILY: &str = "UPDATE wxauth_families SET revoked_ms = $3 \
                             WHERE user_id = $1 AND family_id = $2 AND revoked_ms IS NULL";

/// How many times a rotation re-reads a family that changed under it between its
/// compare-and-swap and its read (each time another rotation won).
const ROTATE_ATTEMPTS: usize = 3;

async fn rotate(shared: Arc<Shared>, r: RotateRequest) -> Result<RotateOutcome, StorageError> {
    let client = shared.client().await?;
    let (user_id, family) = (r.user_id as i64, r.family.0.as_slice());
    for _ in 0..ROTATE_ATTEMPTS {
        // The compare-and-swap: only the current generation of a live family moves
        // on, and of any number of concurrent rotations of it (on any node) exactly
        // one matches; the others see the new generation.
        let sql = "UPDATE wxauth_families \
                   SET generation = generation + 1, rotated_ms = $4, exp = greatest(exp, $5) \
                   WHERE user_id = $1 AND family_id = $2 AND generation = $3 \
                   AND revoked_ms IS NULL \
                   RETURNING generation";
        let rotated = client
            .query_opt(
                &prepared(&client, sql).await?,
                &[&user_id, &family, &(r.presented as i64), &r.now_ms, &r.exp],
            )
            .await
            .map_err(|e| pg_error("rotate a family", e))?;
        if let Some(row) = rotated {
            let generation: i64 = row.get(0);
            return Ok(RotateOutcome::Rotated {
                generation: generation as Generation,
            });
        }
        let Some(current) = read_family(&client, r.user_id, r.family).await? else {
            return Ok(RotateOutcome::Missing);
        };
        match standing(&current, r.presented, r.now_ms, r.grace_ms) {
            Standing::Revoked => return Ok(RotateOutcome::Revoked),
            Standing::Ahead => return Ok(RotateOutcome::Ahead),
            Standing::InGrace => {
                return Ok(RotateOutcome::Retry {
                    generation: current.generation,
                })
            }
            Standing::Reused => {
                // A generation only grows, so a reuse stays a reuse: revoking whatever
                // the family is now is right (and idempotent across nodes).
                client
                    .execute(
                        &prepared(&client, REVOKE_FAMILY).await?,
                        &[&user_id, &family, &r.now_ms],
                    )
                    .await
                    .map_err(|e| pg_error("revoke a reused family", e))?;
                return Ok(RotateOutcome::Reused);
            }
            // The family was current when read: it changed between the two
            // statements (a restore?); compare and swap again.
            Standing::Current => continue,
        }
    }
    Err(StorageError::database_timeout(
        "a rotation kept losing to concurrent changes of its family",
    ))
}

impl AuthStore for PgStore {
    fn login(&self, request: LoginRequest) -> StoreFuture<LoginResult> {
        self.run("login", move |shared| login(shared, request))
    }

    fn start_family(&self, request: StartFamilyRequest) -> StoreFuture<StartFamilyResult> {
        self.run("start a family", move |shared| {
            start_family(shared, request)
        })
    }

    fn user(&self, id: UserId) -> StoreFuture<Option<User>> {
        self.run("read a user", move |shared| async move {
            let client = shared.client().await?;
            let sql = format!("SELECT {USER_COLUMNS} FROM wxauth_users WHERE id = $1");
            client
                .query_opt(&prepared(&client, &sql).await?, &[&(id as i64)])
                .await
                .map_err(|e| pg_error("read a user", e))?
                .as_ref()
                .map(user_from_row)
                .transpose()
        })
    }

    fn set_disabled(&self, id: UserId, disabled: bool) -> StoreFuture<Option<User>> {
        self.run("disable a user", move |shared| async move {
            let kind = if disabled {
                crate::events::EventType::Disabled
            } else {
                crate::events::EventType::Enabled
            };
            let event = Some((kind, serde_json::json!({})));
            update_user(shared, id, "disabled = $2", &[&disabled], event).await
        })
    }

    fn revoke_tokens(&self, id: UserId) -> StoreFuture<Option<User>> {
        self.run("revoke a user's tokens", move |shared| async move {
            update_user(shared, id, "token_stamp = token_stamp + 1", &[], None).await
        })
    }

    fn set_phone(&self, id: UserId, phone: PhoneNumber) -> StoreFuture<Option<User>> {
        self.run("set a phone number", move |shared| async move {
            let text = serde_json::to_string(&phone).expect("a phone number serializes");
            let event = Some((
                crate::events::EventType::Updated,
                crate::events::phone_data(&phone),
            ));
            update_user(shared, id, "phone = $2", &[&text], event).await
        })
    }

    /// One `UPDATE`; a field not given keeps its value (`coalesce`).
    fn set_profile(&self, id: UserId, change: ProfileChange) -> StoreFuture<Option<User>> {
        self.run("set a profile", move |shared| async move {
            let event = Some((
                crate::events::EventType::Updated,
                crate::events::profile_data(&change),
            ));
            let ProfileChange {
                nickname,
                avatar_url,
            } = change;
            update_user(
                shared,
                id,
                "nickname = coalesce($2, nickname), avatar_url = coalesce($3, avatar_url)",
                &[&nickname, &avatar_url],
                event,
            )
            .await
        })
    }

    /// One transaction holding the user's row lock (`FOR UPDATE`): the check (not
    /// erased; still due for the sweep) and the change are one unit against a
    /// concurrent login on any node, which waits for the lock and then either
    /// clears the mark first or finds the keys gone and creates a new user.
    fn delete_user(
        &self,
        id: UserId,
        due: i64,
        now: i64,
        only_if_due: bool,
    ) -> StoreFuture<Option<Deletion>> {
        self.run("delete a user", move |shared| {
            delete_user(shared, id, due, now, only_if_due)
        })
    }

    /// The partial index on `deletion_due`.
    fn due_deletions(&self, now: i64, limit: usize) -> StoreFuture<Vec<UserId>> {
        self.run("list due deletions", move |shared| async move {
            let client = shared.client().await?;
            let limit = limit.clamp(1, 10_000) as i64;
            Ok(client
                .query(
                    "SELECT id FROM wxauth_users WHERE deletion_due <= $1 \
                     AND erased_at IS NULL ORDER BY deletion_due LIMIT $2",
                    &[&now, &limit],
                )
                .await
                .map_err(|e| pg_error("list due deletions", e))?
                .iter()
                .map(|row| row.get::<_, i64>(0) as UserId)
                .collect())
        })
    }

    /// One `UPDATE`: every family of the user not revoked yet, each exactly once.
    fn revoke_families(&self, user_id: UserId, now_ms: i64) -> StoreFuture<usize> {
        self.run("revoke a user's families", move |shared| async move {
            let client = shared.client().await?;
            let sql = "UPDATE wxauth_families SET revoked_ms = $2 \
                       WHERE user_id = $1 AND revoked_ms IS NULL";
            let revoked = client
                .execute(
                    &prepared(&client, sql).await?,
                    &[&(user_id as i64), &now_ms],
                )
                .await
                .map_err(|e| pg_error("revoke a user's families", e))?;
            Ok(revoked as usize)
        })
    }

    fn rotate(&self, request: RotateRequest) -> StoreFuture<RotateOutcome> {
        self.run("rotate", move |shared| rotate(shared, request))
    }

    fn revoke_family(&self, user_id: UserId, family: FamilyId, now_ms: i64) -> StoreFuture<bool> {
        self.run("revoke a family", move |shared| async move {
            let client = shared.client().await?;
            let revoked = client
                .execute(
                    &prepared(&client, REVOKE_FAMILY).await?,
                    &[&(user_id as i64), &family.0.as_slice(), &now_ms],
                )
                .await
                .map_err(|e| pg_error("revoke a family", e))?;
            Ok(revoked == 1)
        })
    }

    fn family(&self, user_id: UserId, family: FamilyId) -> StoreFuture<Option<FamilyRecord>> {
        self.run("read a family", move |shared| async move {
            let client = shared.client().await?;
            read_family(&client, user_id, family).await
        })
    }

    fn families(&self, user_id: UserId) -> StoreFuture<Vec<FamilyRecord>> {
        self.run("read a user's families", move |shared| async move {
            let client = shared.client().await?;
            let sql = format!(
                "SELECT {FAMILY_COLUMNS} FROM wxauth_families \
                 WHERE user_id = $1 ORDER BY family_id"
            );
            client
                .query(&prepared(&client, &sql).await?, &[&(user_id as i64)])
                .await
                .map_err(|e| pg_error("read a user's families", e))?
                .iter()
                .map(family_from_row)
                .collect()
        })
    }

    /// Deletes up to `limit` expired families through the index on `exp` (the
    /// cursor is not needed: what is deleted is gone). Each row is checked again as
    /// it is deleted, so a family a rotation just extended stays.
    fn purge_expired(
        &self,
        cutoff: i64,
        _from: Option<Vec<u8>>,
        limit: usize,
    ) -> StoreFuture<PurgeProgress> {
        self.run("purge expired families", move |shared| async move {
            let client = shared.client().await?;
            let limit = limit.clamp(1, 100_000) as i64;
            let deleted = client
                .execute(
                    "DELETE FROM wxauth_families WHERE ctid IN \
                     (SELECT ctid FROM wxauth_families WHERE exp < $1 LIMIT $2) \
                     AND exp < $1",
                    &[&cutoff, &limit],
                )
                .await
                .map_err(|e| pg_error("purge expired families", e))?;
            let deleted = deleted as usize;
            Ok(PurgeProgress {
                deleted,
                next: (deleted as i64 == limit).then(Vec::new),
            })
        })
    }

    fn access_token(&self, appid: &str) -> StoreFuture<Option<Vec<u8>>> {
        let key = crate::wechat::token_key(appid);
        self.run("read an access token", move |shared| async move {
            let client = shared.client().await?;
            kv::get(&client, Tree::Meta, &key).await
        })
    }

    fn put_access_token(&self, appid: &str, record: Vec<u8>) -> StoreFuture<()> {
        let key = crate::wechat::token_key(appid);
        self.run("store an access token", move |shared| async move {
            let client = shared.client().await?;
            kv::put(&client, Tree::Meta, &key, &record).await
        })
    }

    /// The conditional upsert decides: of any number of nodes asking at once, one
    /// gets the row (or finds it expired or its own), the others 0 rows.
    fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreFuture<bool> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.run("take a lease", move |shared| async move {
            let client = shared.client().await?;
            let taken = client
                .execute(
                    "INSERT INTO wxauth_leases (name, holder, until_ms) VALUES ($1, $2, $4) \
                     ON CONFLICT (name) DO UPDATE \
                     SET holder = EXCLUDED.holder, until_ms = EXCLUDED.until_ms \
                     WHERE wxauth_leases.until_ms < $3 OR wxauth_leases.holder = EXCLUDED.holder",
                    &[&name, &holder, &now_ms, &until_ms],
                )
                .await
                .map_err(|e| pg_error("take a lease", e))?;
            Ok(taken == 1)
        })
    }
}
