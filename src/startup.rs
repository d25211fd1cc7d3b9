//! Wiring: open storage, load keys, start the actors, serve, and shut down cleanly.

use crate::actors::{access_token, issuer::TokenIssuer, registry::UserRegistry, wechat};
use crate::admin;
use crate::config::StorageBackend;
use crate::config::{ConfigError, Loaded};
use crate::http::connection::{ListenerLimits, PerIpLimit};
use crate::http::{self, AppState, LoginLimiter};
use crate::metrics::Metrics;
use crate::storage::model::AuthStore;
use crate::storage::postgres::PgStore;
use crate::storage::sled_model::SledModel;
use crate::storage::{GroupCommit, ReadStore, StorageError, Store};
use crate::tokens::JwtKeys;
use crate::users::cache::UserCache;
use actix::{Actor, Arbiter};
use actix_web::web;
use sd_notify::NotifyState;
use std::net::SocketAddr;
use std::sync::Arc;

/// How long SIGTERM waits for in-flight requests before closing connections.
const SHUTDOWN_GRACE_SECS: u64 = 30;
/// File descriptors kept free of client connections: storage, the admin socket,
/// WeChat calls, logs.
const FD_RESERVE: u64 = 256;
/// Connections to the metrics listener (a scraper needs one at a time); the excess
/// waits in its listen backlog, using no descriptor.
const METRICS_MAX_CONNECTIONS: usize = 16;
/// Connections to the access-token listener (local services).
const TOKEN_MAX_CONNECTIONS: usize = 64;
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

/// `server.max_connections`, lowered when the open-file limit could not hold it
/// next to the other listeners' caps (`side`): past the limit, accept() fails and the
/// server's own files (storage, WeChat calls) would fail with it. Connections beyond
/// the cap wait in the listen backlog. One descriptor per connection.
fn connection_cap(configured: usize, side: usize, open_files: Option<u64>) -> usize {
    let Some(open_files) = open_files else {
        return configured;
    };
    let side = u64::try_from(side).unwrap_or(u64::MAX);
    let usable = open_files
        .saturating_sub(FD_RESERVE)
        .max(open_files / 2)
        .saturating_sub(side)
        .max(1);
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
    #[error("cannot write server.announce_file {path}")]
    Announce {
        path: String,
        source: std::io::Error,
    },
    #[error("server error")]
    Server(#[from] std::io::Error),
}

/// Binds `addr` for a listener (a bind error names the address).
fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    http::connection::bind(addr).map_err(|source| StartError::Bind {
        addr: addr.to_string(),
        source,
    })
}

/// Binds `addr` and serves `app` there (HTTPS with `tls`) on `workers` threads,
/// every connection under `limits`. Returns the server and the bound address.
fn listen(
    name: &'static str,
    addr: SocketAddr,
    tls: Option<rustls::ServerConfig>,
    workers: usize,
    limits: ListenerLimits,
    app: http::AppParts,
) -> Result<(actix_server::Server, SocketAddr), StartError> {
    let listener = bind(addr)?;
    let bound = listener.local_addr()?;
    let server = http::connection::serve(
        name,
        listener,
        tls,
        workers,
        SHUTDOWN_GRACE_SECS,
        limits,
        move || http::app(&app),
    )?;
    Ok((server, bound))
}

/// A loopback listener beside the API (metrics, the access-token endpoint), when
/// `addr` is set: one worker, `routes` only, its own connection cap in `limits`, no
/// observation. `secret`: the access-token endpoint's bearer secret.
fn start_local_listener(
    name: &'static str,
    addr: Option<SocketAddr>,
    state: web::Data<AppState>,
    secret: Option<web::Data<http::EndpointSecret>>,
    limits: ListenerLimits,
    routes: fn(&mut web::ServiceConfig),
) -> Result<Option<(actix_server::Server, SocketAddr)>, StartError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let app = http::AppParts {
        state,
        routes,
        secret,
        request_timeout: limits.request_timeout,
        observe: false,
    };
    let (server, bound) = listen(name, addr, None, 1, limits, app)?;
    tracing::info!(address = %bound, "serving {name}");
    Ok(Some((server, bound)))
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
    let delivery = cfg.events.delivery()?;
    // Woken by this node's changes that wrote an event (PostgreSQL).
    let events_wake = Arc::new(crate::events::Wake::default());
    let postgres = match cfg.storage.backend {
        StorageBackend::Sled => None,
        StorageBackend::Postgres => {
            let mut pg = PgStore::open(&cfg.storage)?;
            if delivery.is_some() {
                pg = pg.with_events(events_wake.clone());
            }
            Some(Arc::new(pg.with_user_cache(users.clone())))
        }
    };
    let store: Arc<dyn Store> = match &postgres {
        Some(pg) => pg.clone(),
        None => crate::storage::upgrade::open(&cfg.storage)?,
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
    // The embedded store's delivery thread, for `wxauth events retry`.
    let mut delivery_thread = None;
    let model: Arc<dyn AuthStore> = match postgres {
        Some(pg) => {
            if let Some(delivery) = delivery {
                crate::events::start_shared(pg.clone(), &events_wake, delivery, metrics.clone())
                    .map_err(|e| StorageError::io("start the event delivery thread", e))?;
            }
            pg
        }
        None => {
            let model = SledModel::new(store.clone(), commit.clone(), users.clone())?;
            match delivery {
                Some(delivery) => {
                    let outbox = crate::events::Outbox::open(store.as_ref())?;
                    delivery_thread = Some(
                        crate::events::start(store.clone(), &outbox, delivery, metrics.clone())
                            .map_err(|e| StorageError::io("start the event delivery thread", e))?,
                    );
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
    .with_user_cache(users.clone())
    .with_family_limit(cfg.limits.refresh_per_family_per_minute);
    let issuer = TokenIssuer::start_in_arbiter(&issuer_arbiter.handle(), move |_| issuer);
    let wechat = wechat::start(&cfg.wechat, &loaded.apps, metrics.clone());
    // A shared handle, not an actor: each caller runs the keeper's work on its own
    // thread (the blocking calls on tokio's blocking pool), so token fetches and the
    // calls that use the token never wait behind the registry or the issuer.
    let keeper = access_token::start(
        &cfg.wechat,
        &loaded.apps,
        store.clone(),
        commit.clone(),
        model.clone(),
        metrics.clone(),
    );
    // Removed on every way out from here on, a listener that cannot bind included.
    let admin_socket = RemovedOnDrop(admin::serve(admin::ServerContext {
        store: store.clone(),
        data_dir: cfg.storage.path.clone(),
        registry: registry.clone(),
        issuer: issuer.clone(),
        keeper: keeper.clone(),
        commit: commit.clone(),
        runtime: tokio::runtime::Handle::current(),
        keys: keys.clone(),
        delivery_thread,
        io_timeout: cfg.admin.io_timeout,
    })?);

    let reader: Arc<dyn ReadStore> = store.clone();
    let state = web::Data::new(AppState {
        wechat,
        registry,
        issuer,
        keeper,
        keys: keys.clone(),
        reads: crate::tokens::check::Reads {
            model: model.clone(),
            store: reader.clone(),
            users: users.clone(),
        },
        reader,
        users,
        commit: commit.clone(),
        apps: loaded.apps.iter().map(|a| a.appid.clone()).collect(),
        limiter: (cfg.limits.login_per_minute > 0)
            .then(|| LoginLimiter::new(cfg.limits.login_per_minute, cfg.limits.ipv6_prefix)),
        refresh_limiter: (cfg.limits.refresh_per_minute > 0)
            .then(|| LoginLimiter::new(cfg.limits.refresh_per_minute, cfg.limits.ipv6_prefix)),
        phone_limiter: (cfg.limits.phone_per_user_per_minute > 0)
            .then(|| crate::ratelimit::KeyedLimiter::new(cfg.limits.phone_per_user_per_minute)),
        trusted_proxies: cfg
            .server
            .trusted_proxies
            .iter()
            .copied()
            .map(http::canonical_ip)
            .collect(),
        metrics,
        web_login: cfg.web_login.enabled.then(|| http::WebLoginState {
            tickets: Arc::new(crate::web_login::WebLogins::new(
                cfg.web_login.ticket_ttl,
                cfg.web_login.max_tickets,
            )),
            config: cfg.web_login.clone(),
            limiter: (cfg.limits.login_per_minute > 0)
                .then(|| LoginLimiter::new(cfg.limits.login_per_minute, cfg.limits.ipv6_prefix)),
        }),
        readiness: Default::default(),
    });
    let api_state = state.clone();

    let request_timeout = cfg.server.request_timeout;
    let side_listeners = cfg.metrics.bind.map_or(0, |_| METRICS_MAX_CONNECTIONS)
        + cfg
            .wechat
            .token_endpoint_bind
            .map_or(0, |_| TOKEN_MAX_CONNECTIONS);
    let max_connections = connection_cap(cfg.server.max_connections, side_listeners, open_files);
    let limits = ListenerLimits {
        max_connections,
        keep_alive: KEEP_ALIVE,
        request_timeout,
        lifetime: cfg.server.max_connection_lifetime,
        per_ip: Some(PerIpLimit::new(
            cfg.server.max_connections_per_ip,
            cfg.limits.ipv6_prefix,
            api_state.trusted_proxies.clone(),
        )),
    };
    tracing::debug!(
        max_connections,
        max_connections_per_ip = cfg.server.max_connections_per_ip,
        side_listeners,
        ?request_timeout,
        "connection limits"
    );
    // The metrics and access-token listeners: the same deadlines, their own small
    // caps (counted above), and no per-address limit (their clients are local).
    let side_limits = |max_connections| ListenerLimits {
        max_connections,
        per_ip: None,
        ..limits.clone()
    };
    let https = tls.is_some();
    let api = http::AppParts {
        state: api_state,
        routes: http::routes,
        secret: None,
        request_timeout,
        observe: true,
    };
    let (server, addr) = listen(
        "api",
        cfg.server.bind,
        tls,
        cfg.server.workers,
        limits.clone(),
        api,
    )?;
    let users = crate::users::count(store.as_ref())?;
    tracing::info!(address = %addr, tls = https, kid = keys.kid(), users, "listening");
    // The access-token endpoint: its own loopback socket rather than a route on the
    // API listener, so that a reverse proxy in front of the API can never expose it,
    // and no peer-address check (which a proxy on the same host would pass) is
    // needed. Only with its secret.
    let token_secret = loaded.token_endpoint_secret.clone();
    let token_server = start_local_listener(
        "the access token endpoint",
        cfg.wechat
            .token_endpoint_bind
            .filter(|_| token_secret.is_some()),
        state.clone(),
        token_secret.map(|secret| web::Data::new(http::EndpointSecret(secret))),
        side_limits(TOKEN_MAX_CONNECTIONS),
        http::access_token_routes,
    )?;
    // Prometheus on `metrics.bind`: its own socket, so that a reverse proxy in front
    // of the API never exposes it.
    let metrics_server = start_local_listener(
        "metrics",
        cfg.metrics.bind,
        state,
        None,
        side_limits(METRICS_MAX_CONNECTIONS),
        http::metrics_routes,
    )?;
    let (metrics_server, metrics_addr) = metrics_server.unzip();
    let (token_server, token_addr) = token_server.unzip();
    let _announced = match &cfg.server.announce_file {
        Some(path) => {
            let addresses = serde_json::json!({
                "api": addr.to_string(),
                "metrics": metrics_addr.map(|a| a.to_string()),
                "access_token": token_addr.map(|a| a.to_string()),
                "admin": admin_socket.0.display().to_string(),
            });
            crate::fsutil::write_atomically(path, format!("{addresses}\n").as_bytes()).map_err(
                |source| StartError::Announce {
                    path: path.display().to_string(),
                    source,
                },
            )?;
            Some(RemovedOnDrop(path.clone()))
        }
        None => None,
    };

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
    drop(admin_socket);

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

/// A file removed when this is dropped (the admin socket, the announce file).
struct RemovedOnDrop(std::path::PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::connection_cap;

    #[test]
    fn the_connection_cap_leaves_descriptors_for_the_rest_of_the_server() {
        assert_eq!(connection_cap(10_000, 80, None), 10_000);
        assert_eq!(connection_cap(10_000, 80, Some(1_048_576)), 10_000);
        assert_eq!(connection_cap(10_000, 80, Some(1024)), 688);
        assert_eq!(connection_cap(10_000, 0, Some(1024)), 768);
        assert_eq!(connection_cap(10_000, 80, Some(256)), 48);
        assert_eq!(connection_cap(10_000, 80, Some(64)), 1);
        assert_eq!(connection_cap(10, 80, Some(1024)), 10);
    }
}
