//! Wiring: open storage, load keys, start the actors, serve, and shut down cleanly.

use crate::actors::{access_token, issuer::TokenIssuer, registry::UserRegistry, wechat};
use crate::admin;
use crate::config::StorageBackend;
use crate::config::{ConfigError, Loaded};
use crate::http::{self, AppState, LoginLimiter};
use crate::metrics::Metrics;
use crate::storage::model::AuthStore;
use crate::storage::postgres::PgStore;
use crate::storage::{GroupCommit, ReadStore, SledModel, StorageError, Store};
use crate::tokens::JwtKeys;
use crate::users::cache::UserCache;
use actix::{Actor, Arbiter};
use actix_web::dev::Service;
use actix_web::{middleware, web, App, HttpServer};
use sd_notify::NotifyState;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// How long SIGTERM waits for in-flight requests before closing connections.
const SHUTDOWN_GRACE_SECS: u64 = 30;
/// File descriptors kept free of client connections: storage, the admin socket,
/// WeChat calls, the metrics listener, logs.
const FD_RESERVE: u64 = 256;
/// How long an idle kept-alive connection stays open (actix-web's default).
const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(5);

/// Raises the soft RLIMIT_NOFILE to the hard limit (a default soft limit of 1024
/// is a few hundred slow clients away from refusing everything). Returns the soft
/// limit in effect afterwards; `None` when it is unlimited or cannot be read.
fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let (soft, hard) = (limit.current, limit.maximum);
    if soft.is_some() && soft != hard {
        // Under systemd, LimitNOFILE= sets both already (and the unit's syscall
        // filter refuses setrlimit): this is for everywhere else.
        let raised = Rlimit {
            current: hard,
            maximum: hard,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::info!(from = ?soft, to = ?hard, "raised the open-file limit (RLIMIT_NOFILE) to its hard limit");
                return hard;
            }
            Err(e) => {
                tracing::warn!(soft = ?soft, hard = ?hard, error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)");
            }
        }
    } else {
        tracing::debug!(soft = ?soft, hard = ?hard, "open-file limit (RLIMIT_NOFILE)");
    }
    soft
}

/// `server.max_connections`, lowered when the open-file limit could not hold it:
/// past the limit, accept() fails and the server's own files (storage, WeChat
/// calls) would fail with it. Connections beyond the cap wait in the listen backlog.
fn connection_cap(configured: usize, open_files: Option<u64>) -> usize {
    let Some(open_files) = open_files else {
        return configured;
    };
    // Two descriptors per connection: its socket, and the duplicate its watch holds
    // (http::deadline::watch_connection).
    let usable = (open_files.saturating_sub(FD_RESERVE).max(open_files / 2) / 2).max(1);
    let usable = usize::try_from(usable).unwrap_or(usize::MAX);
    if usable < configured {
        tracing::warn!(
            configured,
            open_file_limit = open_files,
            using = usable,
            "server.max_connections is above what the open-file limit allows; raise LimitNOFILE / ulimit -n"
        );
    }
    configured.min(usable)
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("server error")]
    Server(#[from] std::io::Error),
}

/// The Prometheus listener on `metrics.bind` (none when it is empty): its own
/// socket, so that a reverse proxy in front of the API never exposes it.
fn start_metrics_listener(
    bind: Option<SocketAddr>,
    state: web::Data<AppState>,
) -> Result<Option<actix_web::dev::Server>, StartError> {
    let Some(bind) = bind else {
        return Ok(None);
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(http::json_errors())
            .configure(http::metrics_routes)
    })
    .workers(1)
    .disable_signals()
    .bind(bind)
    .map_err(|source| StartError::Bind {
        addr: bind.to_string(),
        source,
    })?;
    for addr in server.addrs() {
        tracing::info!(address = %addr, "serving metrics");
    }
    Ok(Some(server.run()))
}

/// The access-token listener on `wechat.token_endpoint_bind` (none when empty).
/// Its own loopback socket rather than a route on the API listener: a reverse proxy
/// in front of the API can never expose it, and no peer-address check (which a
/// proxy on the same host would pass) is needed.
fn start_token_listener(
    bind: Option<SocketAddr>,
    secret: Option<crate::secret::Secret>,
    state: web::Data<AppState>,
) -> Result<Option<actix_web::dev::Server>, StartError> {
    let (Some(bind), Some(secret)) = (bind, secret) else {
        return Ok(None);
    };
    let secret = web::Data::new(http::EndpointSecret(secret));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(secret.clone())
            .wrap(http::json_errors())
            .wrap(middleware::DefaultHeaders::new().add(("Cache-Control", "no-store")))
            .configure(http::access_token_routes)
    })
    .workers(1)
    .disable_signals()
    .bind(bind)
    .map_err(|source| StartError::Bind {
        addr: bind.to_string(),
        source,
    })?;
    for addr in server.addrs() {
        tracing::info!(address = %addr, "serving the access token endpoint");
    }
    Ok(Some(server.run()))
}

/// SIGTERM (systemd, kill) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop the server with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

/// Runs the server until SIGTERM/SIGINT, then drains, flushes and returns.
/// Must be called inside an actix system (`actix_web::rt::System`).
pub async fn run(loaded: Loaded) -> Result<(), StartError> {
    let cfg = &loaded.config;
    let open_files = raise_open_file_limit();
    // Before anything is opened: a bad certificate or key stops the start (exit 2).
    let tls = match (&cfg.server.tls.cert, &cfg.server.tls.key) {
        (Some(cert), Some(key)) => Some(crate::tls::server_config(cert, key)?),
        _ => None,
    };
    // Kept up to date by the store's user operations; read by every token check.
    let users = Arc::new(UserCache::new(crate::users::cache::DEFAULT_CAPACITY));
    // PostgreSQL: one object is both the tree view (reads, probe, backup) and the
    // operations; it keeps `users` true across nodes itself.
    let postgres = match cfg.storage.backend {
        StorageBackend::Sled => None,
        StorageBackend::Postgres => Some(Arc::new(
            PgStore::open(&cfg.storage)?.with_user_cache(users.clone()),
        )),
    };
    let store: Arc<dyn Store> = match &postgres {
        Some(pg) => pg.clone(),
        None => crate::storage::open(&cfg.storage)?,
    };
    if let Some(pg) = &postgres {
        // Every node signs with the database's keys (created there by the first).
        let generate = cfg.jwt.signing_key_file.is_none() && cfg.jwt.algorithm.is_hmac();
        pg.pull_key_files(&cfg.storage.path, generate)?;
    }
    let keys = Arc::new(JwtKeys::load(&cfg.jwt, &cfg.storage.path)?);
    if let Some(pg) = &postgres {
        pg.watch_key_ring(&cfg.storage.path, keys.clone());
    }
    let commit = GroupCommit::start_with(store.clone(), {
        let users = users.clone();
        move || users.clear()
    });
    let metrics = Arc::new(Metrics::default());
    let model: Arc<dyn AuthStore> = match postgres {
        Some(pg) => pg,
        None => {
            let model = SledModel::new(store.clone(), commit.clone(), users.clone())?;
            match cfg.events.delivery()? {
                Some(delivery) => {
                    let outbox = crate::events::Outbox::open(store.as_ref())?;
                    crate::events::start(store.clone(), &outbox, delivery, metrics.clone())
                        .map_err(|e| StorageError::io("start the event delivery thread", e))?;
                    Arc::new(model.with_events(outbox))
                }
                None => Arc::new(model),
            }
        }
    };
    let registry = UserRegistry::new(model.clone(), store.clone(), cfg.wechat.link_by_unionid)
        .with_deletion_delay(cfg.users.deletion_delay);

    // Each state-owning actor runs on its own thread (arbiter), off the HTTP workers.
    let registry_arbiter = Arbiter::new();
    let registry = UserRegistry::start_in_arbiter(&registry_arbiter.handle(), move |_| registry);
    let issuer_arbiter = Arbiter::new();
    let issuer = TokenIssuer::new(
        model.clone(),
        store.clone(),
        keys.clone(),
        &cfg.jwt,
        metrics.clone(),
    )
    .with_user_cache(users.clone());
    let issuer = TokenIssuer::start_in_arbiter(&issuer_arbiter.handle(), move |_| issuer);
    let wechat = wechat::start(&cfg.wechat, &loaded.apps, metrics.clone());
    // Its own thread: token fetches and the calls that use the token never wait
    // behind the registry or the issuer, and logins never wait behind them.
    let keeper_arbiter = Arbiter::new();
    let keeper = access_token::start(
        &cfg.wechat,
        &loaded.apps,
        store.clone(),
        commit.clone(),
        model.clone(),
        metrics.clone(),
        &keeper_arbiter.handle(),
    );
    let admin_socket = admin::serve(admin::ServerContext {
        store: store.clone(),
        data_dir: cfg.storage.path.clone(),
        registry: registry.clone(),
        issuer: issuer.clone(),
        keeper: keeper.clone(),
        commit: commit.clone(),
        runtime: tokio::runtime::Handle::current(),
        keys: keys.clone(),
    })?;

    let reader: Arc<dyn ReadStore> = store.clone();
    let state = web::Data::new(AppState {
        wechat,
        registry,
        issuer,
        keeper,
        keys: keys.clone(),
        reader,
        users,
        commit: commit.clone(),
        apps: loaded.apps.iter().map(|a| a.appid.clone()).collect(),
        limiter: (cfg.limits.login_per_minute > 0)
            .then(|| LoginLimiter::new(cfg.limits.login_per_minute, cfg.limits.ipv6_prefix)),
        trusted_proxies: cfg
            .server
            .trusted_proxies
            .iter()
            .copied()
            .map(http::canonical_ip)
            .collect(),
        metrics,
    });
    let api_state = state.clone();

    let bind = cfg.server.bind;
    let request_timeout = cfg.server.request_timeout;
    let max_connections = connection_cap(cfg.server.max_connections, open_files);
    // actix counts connections per worker.
    let per_worker = max_connections.div_ceil(cfg.server.workers).max(1);
    tracing::debug!(
        max_connections,
        per_worker,
        ?request_timeout,
        "connection limits"
    );
    let server = HttpServer::new(move || {
        App::new()
            .app_data(api_state.clone())
            // Innermost: the body's deadline, around the extractors that read it.
            .wrap_fn(move |mut req, srv| {
                let in_progress = http::deadline::request_started(&req);
                let timed_out = http::deadline::limit_body(&mut req, request_timeout);
                let response = srv.call(req);
                async move {
                    let response = response.await?;
                    drop(in_progress);
                    Ok(http::deadline::answer(response, &timed_out))
                }
            })
            .wrap(http::json_errors())
            .wrap(middleware::DefaultHeaders::new().add(("Cache-Control", "no-store")))
            // Outermost: sees the final status, after errors became JSON.
            .wrap_fn(|req, srv| {
                let started = Instant::now();
                let id = http::request_id(&req);
                let method = req.method().clone();
                // Every line logged while handling the request (in the handler and in
                // the actors its messages reach) carries the id. The access line is
                // written after it, outside the span: its fields stay as they were.
                let span = tracing::info_span!("request", request_id = %id);
                let response = span.in_scope(|| srv.call(req)).instrument(span);
                async move {
                    let mut response = response.await?;
                    http::finish_request(&mut response, &id, &method, started);
                    Ok(response)
                }
            })
            .configure(http::routes)
    })
    .workers(cfg.server.workers)
    // The head's deadline (actix's own); the body's is the middleware above.
    .client_request_timeout(request_timeout)
    .keep_alive(KEEP_ALIVE)
    // The next request's head on a kept-alive connection (see http::deadline).
    .on_connect(move |connection, extensions| {
        http::deadline::watch_connection(connection, extensions, KEEP_ALIVE + request_timeout)
    })
    .max_connections(per_worker)
    .shutdown_timeout(SHUTDOWN_GRACE_SECS)
    // Our own handler below tells systemd STOPPING=1 before draining.
    .disable_signals()
    // A client that closes its side has gone (as nginx takes it): its handler is
    // dropped, so a login still waiting for a WeChat call slot is never sent.
    .h1_allow_half_closed(false);
    let https = tls.is_some();
    let server = match tls {
        Some(tls) => server.bind_rustls_0_23(bind, tls),
        None => server.bind(bind),
    }
    .map_err(|source| StartError::Bind {
        addr: bind.to_string(),
        source,
    })?;
    let addrs: Vec<SocketAddr> = server.addrs();
    let users = crate::users::count(store.as_ref())?;
    for addr in &addrs {
        tracing::info!(address = %addr, tls = https, kid = keys.kid(), users, "listening");
    }
    let token_server = start_token_listener(
        cfg.wechat.token_endpoint_bind,
        loaded.token_endpoint_secret.clone(),
        state.clone(),
    )?;
    let metrics_server = start_metrics_listener(cfg.metrics.bind, state)?;
    let server = server.run();

    // READY=1 only now that the sockets listen (Type=notify); a no-op outside systemd.
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
    let handles = (
        server.handle(),
        metrics_server.as_ref().map(|s| s.handle()),
        token_server.as_ref().map(|s| s.handle()),
    );
    actix_web::rt::spawn(async move {
        shutdown_signal().await;
        let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
        tracing::info!("shutting down: draining in-flight requests");
        if let Some(metrics) = handles.1 {
            metrics.stop(true).await;
        }
        if let Some(token) = handles.2 {
            token.stop(true).await;
        }
        handles.0.stop(true).await;
    });
    if let Some(metrics_server) = metrics_server {
        actix_web::rt::spawn(metrics_server);
    }
    if let Some(token_server) = token_server {
        actix_web::rt::spawn(token_server);
    }
    let served = server.await;
    let _ = std::fs::remove_file(&admin_socket);

    // Every answered request already waited for its commit; this flushes the rest.
    commit.shutdown();
    let flushed = store.flush();
    for arbiter in [registry_arbiter, issuer_arbiter, keeper_arbiter] {
        arbiter.stop();
        let _ = arbiter.join();
    }
    served?;
    flushed?;
    tracing::info!("stopped: storage flushed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::connection_cap;

    #[test]
    fn the_connection_cap_leaves_descriptors_for_the_rest_of_the_server() {
        assert_eq!(connection_cap(10_000, None), 10_000);
        assert_eq!(connection_cap(10_000, Some(1_048_576)), 10_000);
        assert_eq!(connection_cap(10_000, Some(1024)), 384);
        assert_eq!(connection_cap(10_000, Some(256)), 64);
        assert_eq!(connection_cap(10, Some(1024)), 10);
    }
}
