//! Micro-benchmarks of the pieces on wxauth's hot paths (criterion):
//!
//! ```text
//! cargo bench --bench hot_paths              # all of them
//! cargo bench --bench hot_paths -- verify    # those whose name contains "verify"
//! ```
//!
//! - `data/access_token_verify`, `data/user_load`: the two halves of the
//!   `Authenticated` extractor that `GET /api/weixin/data/` runs on every request;
//!   `data/user_cache_hit`: the user as the extractor reads it once cached (no
//!   storage read, no JSON decode); `data/check`: the whole token check, cached user.
//! - `token_pair_issue/sign`: signing an access and a refresh token (CPU only).
//! - `registry/find_existing`, `registry/create`: one login's storage work (`Login`
//!   through the `UserRegistry` actor: find-or-create and the new family, written in
//!   order, answered once the group commit flushed them), one login at a time.
//! - `group_commit/N`: N concurrent writers each apply a batch and wait for
//!   `GroupCommit::durable`; reported per writer, so the grouping shows.
//! - `storage/*`: what writes cost in sled 0.34: the store's multi-tree
//!   transaction against the same two inserts without a transaction, alone and
//!   as 64 writes made durable by one flush.
//!
//! Every data directory is a fresh temporary directory on the same disk as
//! `$TMPDIR` (default /tmp); results are recorded in docs/BENCHMARKS.md.

use actix::{Actor, Addr, SystemRunner};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wxauth::actors::registry::{Login, LoginOutcome, UserRegistry};
use wxauth::config::JwtConfig;
use wxauth::secret::SessionKey;
use wxauth::storage::sled::SledStore;
use wxauth::storage::sled_model::SledModel;
use wxauth::storage::{GroupCommit, Store, Tree, WriteBatch};
use wxauth::tokens::check::{self, Accept};
use wxauth::tokens::{JwtKeys, TokenType};
use wxauth::users::cache::UserCache;
use wxauth::wechat::Session;

/// The server's default `storage.cache_capacity`.
const CACHE: u64 = 64 * 1024 * 1024;
const APPID: &str = "wx_bench";

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<SledStore>,
    keys: Arc<JwtKeys>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Arc::new(SledStore::open(&dir.path().join("data"), CACHE).expect("open the store"));
    let keys = Arc::new(JwtKeys::load(&JwtConfig::default(), dir.path()).expect("generate a key"));
    Fixture {
        _dir: dir,
        store,
        keys,
    }
}

fn session(openid: String) -> Session {
    Session {
        openid,
        unionid: None,
        session_key: SessionKey::new("0123456789abcdef01234567"),
    }
}

/// A registry on `fx`'s store (its model waits for its own group commit).
struct Registry {
    addr: Addr<UserRegistry>,
    keys: Arc<JwtKeys>,
}

/// Starts a registry on `store`, with a users cache of the server's size.
fn start_registry(
    system: &SystemRunner,
    store: Arc<dyn Store>,
) -> (Addr<UserRegistry>, Arc<UserCache>) {
    let users = Arc::new(UserCache::new(wxauth::users::cache::DEFAULT_CAPACITY));
    let commit = GroupCommit::start(store.clone());
    let model = SledModel::new(store.clone(), commit, users.clone()).expect("model");
    let addr =
        system.block_on(async move { UserRegistry::new(Arc::new(model), store, false).start() });
    (addr, users)
}

impl Registry {
    fn login(&self, system: &SystemRunner, openid: String) -> u64 {
        let msg = Login {
            span: tracing::Span::none(),
            appid: APPID.into(),
            session: session(openid),
            keys: self.keys.clone(),
        };
        match system.block_on(self.addr.send(msg)) {
            Ok(Ok(LoginOutcome::LoggedIn { user, .. })) => user.id,
            _ => panic!("Login failed"),
        }
    }
}

fn data_path(c: &mut Criterion) {
    let fx = fixture();
    let system = actix::System::new();
    let (addr, users) = start_registry(&system, fx.store.clone());
    let registry = Registry {
        addr,
        keys: fx.keys.clone(),
    };
    // The login puts the user in the cache, as the server's registry does.
    let user_id = registry.login(&system, "o-data".into());
    let token = fx
        .keys
        .sign(TokenType::Access, user_id, 0, wxauth::clock::now_unix())
        .token;

    let mut group = c.benchmark_group("data");
    group.bench_function("access_token_verify", |b| {
        b.iter(|| {
            check::token_claims(
                &fx.keys,
                black_box(&token),
                Accept::Access,
                wxauth::clock::now_ms(),
            )
            .expect("valid")
        })
    });
    group.bench_function("user_load", |b| {
        b.iter(|| {
            wxauth::users::load(fx.store.as_ref(), black_box(user_id))
                .expect("read")
                .expect("exists")
        })
    });
    group.bench_function("user_cache_hit", |b| {
        b.iter(|| {
            users
                .load(fx.store.as_ref(), black_box(user_id))
                .expect("read")
                .expect("exists")
        })
    });
    let store: Arc<dyn Store> = fx.store.clone();
    let reads = check::Reads {
        model: Arc::new(
            SledModel::new(
                store.clone(),
                GroupCommit::start(store.clone()),
                users.clone(),
            )
            .expect("model"),
        ),
        store,
        users: users.clone(),
    };
    group.bench_function("check", |b| {
        b.iter(|| {
            check::check(
                &fx.keys,
                &reads,
                black_box(&token),
                Accept::Access,
                wxauth::clock::now_ms(),
            )
            .now()
            .ok()
            .expect("a cached user: answered at once")
            .expect("valid")
        })
    });
    group.finish();
    keep_running(system);
}

fn token_pair_issue(c: &mut Criterion) {
    let fx = fixture();
    let mut group = c.benchmark_group("token_pair_issue");
    group.bench_function("sign", |b| {
        let now = wxauth::clock::now_unix();
        b.iter(|| {
            let access = fx.keys.sign(TokenType::Access, black_box(7), 0, now);
            let refresh = fx.keys.sign(TokenType::Refresh, black_box(7), 0, now);
            (access, refresh)
        })
    });

    group.finish();
}

/// The actors' runtime lives until the process exits: dropping a runtime under a
/// running actor (the issuer's purge timer) panics inside actix.
fn keep_running(system: SystemRunner) {
    std::mem::forget(system);
}

fn registry(c: &mut Criterion) {
    let fx = fixture();
    let system = actix::System::new();
    let (addr, _) = start_registry(&system, fx.store.clone());
    let registry = Registry {
        addr,
        keys: fx.keys.clone(),
    };
    // A registry that already holds some users, as a running server would.
    for i in 0..1000 {
        registry.login(&system, format!("o-existing{i}"));
    }

    let mut group = c.benchmark_group("registry");
    let mut i = 0u64;
    group.bench_function("find_existing", |b| {
        b.iter(|| {
            i += 1;
            registry.login(&system, format!("o-existing{}", i % 1000))
        })
    });
    let mut n = 0u64;
    group.bench_function("create", |b| {
        b.iter(|| {
            n += 1;
            registry.login(&system, format!("o-new{n}"))
        })
    });
    group.finish();
    keep_running(system);
}

/// A write of the shape a refresh rotation makes: one family record.
fn small_batch(n: u64) -> WriteBatch {
    let mut batch = WriteBatch::default();
    let mut key = 7u64.to_be_bytes().to_vec();
    key.extend_from_slice(&u128::from(n).to_be_bytes());
    batch.put(
        Tree::Families,
        key,
        br#"{"gen":2,"created_ms":1,"rotated_ms":1,"exp":1}"#.as_slice(),
    );
    batch
}

fn group_commit(c: &mut Criterion) {
    let fx = fixture();
    let store: Arc<dyn Store> = fx.store.clone();
    let commit = GroupCommit::start(store.clone());
    let counter = AtomicU64::new(0);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");

    let mut group = c.benchmark_group("group_commit");
    for writers in [1u64, 16, 64] {
        group.throughput(Throughput::Elements(writers));
        group.bench_with_input(BenchmarkId::from_parameter(writers), &writers, |b, &w| {
            b.iter(|| {
                // Writers are spread over blocking threads, as requests are over
                // actix workers: each applies its batch, then waits for the commit.
                runtime.block_on(async {
                    let tasks = (0..w).map(|_| {
                        let (store, commit) = (store.clone(), commit.clone());
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        async move {
                            store.apply(small_batch(n)).expect("apply");
                            commit.durable().await.expect("durable");
                        }
                    });
                    futures_util::future::join_all(tasks).await;
                })
            })
        });
    }
    group.finish();
    commit.shutdown();
}

/// Refresh-record-shaped values for the plain sled inserts.
const RECORD: &[u8] = br#"{"family":"f","user_id":7,"exp":1}"#;
const FAMILY: &[u8] = br#"{"user_id":7,"created_at":1,"exp":1,"current":"c"}"#;

fn storage(c: &mut Criterion) {
    let fx = fixture();
    let counter = AtomicU64::new(0);
    // The same trees straight in sled, without the store's transaction.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(CACHE)
        .mode(sled::Mode::HighThroughput)
        .open()
        .expect("open sled");
    let tokens = db.open_tree("refresh_tokens").expect("tree");
    let families = db.open_tree("token_families").expect("tree");
    let plain = |n: u64| {
        let key = format!("{n:032x}");
        tokens.insert(key.as_bytes(), RECORD).expect("insert");
        families.insert(key.as_bytes(), FAMILY).expect("insert");
    };

    let mut group = c.benchmark_group("storage");
    group.bench_function("apply_2_trees/transaction", |b| {
        b.iter(|| {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            fx.store.apply(small_batch(n)).expect("apply")
        })
    });
    group.bench_function("apply_2_trees/plain_inserts", |b| {
        b.iter(|| plain(counter.fetch_add(1, Ordering::Relaxed)))
    });
    // 64 writes made durable by one flush: what a group commit of 64 requests
    // costs. sled 0.34 seals and writes its log buffer (pwrite + sync_file_range)
    // around every transaction, so 64 transactions are 64+ synchronous writes
    // however they are grouped; 64 plain inserts are one.
    group.throughput(Throughput::Elements(64));
    group.sample_size(30);
    group.bench_function("durable_64/transaction", |b| {
        b.iter(|| {
            for _ in 0..64 {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                fx.store.apply(small_batch(n)).expect("apply");
            }
            fx.store.flush().expect("flush")
        })
    });
    group.bench_function("durable_64/plain_inserts", |b| {
        b.iter(|| {
            for _ in 0..64 {
                plain(counter.fetch_add(1, Ordering::Relaxed));
            }
            db.flush().expect("flush")
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = data_path, token_pair_issue, registry, group_commit, storage
}
criterion_main!(benches);
