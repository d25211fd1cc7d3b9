//! Wiring: open storage, load keys, start the actors, serve, and shut down cleanly.

use crate::actors::{issuer::TokenIssuer, registry::UserRegistry, wechat};
use crate::config::{ConfigError, Loaded};
use crate::http::{self, AppState, LoginLimiter};
use crate::storage::{GroupCommit, ReadStore, SledStore, StorageError, Store};
use crate::tokens::JwtKeys;
use actix::{Actor, Arbiter};
use actix_web::{middleware, web, App, HttpServer};
use std::net::SocketAddr;
use std::sync::Arc;

/// Blocking jscode2session calls that may run at once (each waits up to `wechat.timeout`).
const WECHAT_THREADS: usize = 16;
/// How long SIGTERM waits for in-flight requests before closing connections.
const SHUTDOWN_GRACE_SECS: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Server(#[from] std::io::Error),
}

/// Runs the server until SIGTERM/SIGINT, then drains, flushes and returns.
/// Must be called inside an actix system (`actix_web::rt::System`).
pub async fn run(loaded: Loaded) -> Result<(), StartError> {
    let cfg = &loaded.config;
    let store = Arc::new(SledStore::open(
        &cfg.storage.path,
        cfg.storage.cache_capacity,
    )?);
    let keys = Arc::new(JwtKeys::load(&cfg.jwt, &cfg.storage.path)?);
    let commit = GroupCommit::start(store.clone());

    // Each state-owning actor runs on its own thread (arbiter), off the HTTP workers.
    let registry_arbiter = Arbiter::new();
    let registry = UserRegistry::new(store.clone(), cfg.wechat.link_by_unionid)?;
    let registry = UserRegistry::start_in_arbiter(&registry_arbiter.handle(), move |_| registry);
    let issuer_arbiter = Arbiter::new();
    let issuer = TokenIssuer::new(store.clone(), keys.clone(), commit.clone(), &cfg.jwt);
    let issuer = TokenIssuer::start_in_arbiter(&issuer_arbiter.handle(), move |_| issuer);
    let wechat = wechat::start(&cfg.wechat, &loaded.apps, WECHAT_THREADS);

    let reader: Arc<dyn ReadStore> = store.clone();
    let state = web::Data::new(AppState {
        wechat,
        registry,
        issuer,
        keys: keys.clone(),
        reader,
        commit: commit.clone(),
        apps: loaded.apps.iter().map(|a| a.appid.clone()).collect(),
        limiter: (cfg.limits.login_per_minute > 0)
            .then(|| LoginLimiter::new(cfg.limits.login_per_minute)),
        trusted_proxies: cfg
            .server
            .trusted_proxies
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect(),
    });

    let bind = cfg.bind_addr();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(http::json_errors())
            .wrap(middleware::DefaultHeaders::new().add(("Cache-Control", "no-store")))
            .configure(http::routes)
    })
    .workers(cfg.server.workers)
    .shutdown_timeout(SHUTDOWN_GRACE_SECS)
    .bind(bind)
    .map_err(|source| StartError::Bind {
        addr: bind.to_string(),
        source,
    })?;
    let addrs: Vec<SocketAddr> = server.addrs();
    for addr in &addrs {
        tracing::info!(address = %addr, kid = keys.kid(), users = store.len(crate::storage::Tree::Users), "listening");
    }

    // actix-web handles SIGTERM/SIGINT: stop accepting, finish in-flight requests.
    let served = server.run().await;

    // Every answered request already waited for its commit; this flushes the rest.
    commit.shutdown();
    let flushed = store.flush();
    for arbiter in [registry_arbiter, issuer_arbiter] {
        arbiter.stop();
        let _ = arbiter.join();
    }
    served?;
    flushed?;
    tracing::info!("stopped: storage flushed");
    Ok(())
}
