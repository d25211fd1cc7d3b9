//! Configuration: built-in defaults, then a TOML file, then `WXAUTH_<SECTION>__<KEY>`
//! environment variables (figment). [`Config::load`] returns a validated config or one
//! [`ConfigError`] naming the key; unknown keys come back as warnings, not silence.

mod load;
mod units;

use load::resolve_app;
pub use load::{read_secret_file, resolve_credential_path};
use units::{de_duration, de_ip_addrs, de_metrics_bind, de_server_bind};
pub use units::{parse_duration, parse_size, ByteSize};

use crate::secret::Secret;
use serde::{Deserialize, Deserializer};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest `jwt.access_ttl`, `refresh_ttl`, `reuse_grace` and `leeway`: humantime's
/// `"10y"` (a year is 365.25 days there).
pub const MAX_TOKEN_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

/// The file read when neither `--config` nor `WXAUTH_CONFIG` names one (if it exists).
pub const DEFAULT_CONFIG_FILE: &str = "config.toml";
const ENV_PREFIX: &str = "WXAUTH_";

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub wechat: WeChatConfig,
    pub jwt: JwtConfig,
    pub limits: LimitsConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub web_login: WebLoginConfig,
    pub users: UsersConfig,
    pub events: EventsConfig,
    pub admin: AdminConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    #[serde(deserialize_with = "de_server_bind")]
    pub bind: SocketAddr,
    pub workers: usize,
    pub tls: TlsConfig,
    #[serde(deserialize_with = "de_ip_addrs")]
    pub trusted_proxies: Vec<IpAddr>,
    /// A whole request, head and body, must arrive within this; else 408 and close.
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
    /// Open client connections, the whole server (not per worker); the excess waits
    /// in the kernel's listen backlog until one closes.
    pub max_connections: usize,
    /// Open API connections per client address (IPv6 per `limits.ipv6_prefix`);
    /// trusted proxies are exempt. The excess is closed at once.
    pub max_connections_per_ip: usize,
    /// A connection past this age is closed after its next answer.
    #[serde(deserialize_with = "de_duration")]
    pub max_connection_lifetime: Duration,
    /// Once every listener is bound, their addresses are written here as JSON.
    pub announce_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            tls: TlsConfig::default(),
            trusted_proxies: Vec::new(),
            request_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_ip: 256,
            max_connection_lifetime: Duration::from_secs(600),
            announce_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct StorageConfig {
    pub path: PathBuf,
    pub cache_capacity: ByteSize,
    pub backend: StorageBackend,
    /// `storage.backend = "postgres"`: the database, as a libpq-style URL
    /// (crate::postgres_url), or from a file (a systemd credential).
    pub postgres_url: Option<Secret>,
    pub postgres_url_file: Option<PathBuf>,
    /// Connections each node keeps open at most.
    pub postgres_pool_size: usize,
    /// Every statement, and the wait for a pooled connection, is cut off after this.
    #[serde(deserialize_with = "de_duration")]
    pub postgres_statement_timeout: Duration,
    /// How long cached users are still served once the node's notification
    /// connection is lost (docs/SCALING.md, "When the database does not answer").
    #[serde(deserialize_with = "de_duration")]
    pub postgres_stale_for: Duration,
    /// `postgres_url` or `postgres_url_file`, parsed: set by [`Config::load`] and
    /// [`Config::load_for_admin`] when `backend` is `postgres`, never read from a file.
    #[serde(skip)]
    pub postgres: Option<crate::postgres_url::PostgresUrl>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("./data"),
            cache_capacity: ByteSize(64 * 1024 * 1024),
            backend: StorageBackend::Sled,
            postgres_url: None,
            postgres_url_file: None,
            postgres_pool_size: 16,
            postgres_statement_timeout: Duration::from_secs(5),
            postgres_stale_for: Duration::from_secs(5),
            postgres: None,
        }
    }
}

/// `storage.backend`: the embedded store (one node), or PostgreSQL (one or more nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    #[default]
    Sled,
    Postgres,
}

impl StorageConfig {
    /// Checks the PostgreSQL keys and reads the URL (from its file, if so): the
    /// parsed URL when `backend` is `postgres`. With `sled`, a URL set anyway is a
    /// warning (it is not used).
    fn resolve_postgres(
        &self,
        warnings: &mut Vec<String>,
    ) -> Result<Option<crate::postgres_url::PostgresUrl>, ConfigError> {
        if self.backend == StorageBackend::Sled {
            if self.postgres_url.is_some() || self.postgres_url_file.is_some() {
                warnings.push(
                    "storage.postgres_url is set but storage.backend is \"sled\": it is not used"
                        .into(),
                );
            }
            return Ok(None);
        }
        if self.postgres_pool_size == 0 || self.postgres_pool_size > 256 {
            return Err(ConfigError::new(
                "storage.postgres_pool_size",
                "must be between 1 and 256",
            ));
        }
        if self.postgres_statement_timeout < Duration::from_millis(100)
            || self.postgres_statement_timeout > Duration::from_secs(60)
        {
            return Err(ConfigError::new(
                "storage.postgres_statement_timeout",
                "must be between 100ms and 60s",
            ));
        }
        if self.postgres_stale_for > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "storage.postgres_stale_for",
                "must be between 0s and 60s",
            ));
        }
        let (key, url) = match (&self.postgres_url, &self.postgres_url_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "storage.postgres_url_file",
                    "set either postgres_url or postgres_url_file, not both",
                ))
            }
            (Some(url), None) => ("storage.postgres_url", url.clone()),
            (None, Some(path)) => (
                "storage.postgres_url_file",
                read_secret_file("storage.postgres_url_file", path)?,
            ),
            (None, None) => return Err(ConfigError::new(
                "storage.postgres_url",
                "is required (or storage.postgres_url_file) when storage.backend = \"postgres\"",
            )),
        };
        let mut parsed = crate::postgres_url::parse(url.expose())
            .map_err(|reason| ConfigError::new(key, reason))?;
        // sslrootcert, like every file the config names, may be a systemd credential.
        use crate::postgres_url::{RootCerts, TlsCheck};
        if let TlsCheck::Chain(RootCerts::File(path)) | TlsCheck::Full(RootCerts::File(path)) =
            &mut parsed.tls
        {
            *path = resolve_credential_path(path);
        }
        parsed
            .tls_config()
            .map_err(|reason| ConfigError::new(key, reason))?;
        Ok(Some(parsed))
    }
}

/// One mini-program's credentials as written in the config.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct AppCredentials {
    pub appid: Option<String>,
    pub secret: Option<Secret>,
    pub secret_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct WeChatConfig {
    pub appid: Option<String>,
    pub secret: Option<Secret>,
    pub secret_file: Option<PathBuf>,
    pub apps: Vec<AppCredentials>,
    pub api_base: String,
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    pub retries: u32,
    /// jscode2session calls in flight at once (the worker threads).
    pub max_concurrent_calls: usize,
    /// How long a login may wait for a free call slot before 503 `upstream_busy`.
    #[serde(deserialize_with = "de_duration")]
    pub queue_timeout: Duration,
    pub mock: bool,
    /// Users of different configured apps who share a WeChat unionid are one local user.
    pub link_by_unionid: bool,
    /// The access-token keeper refreshes a token once it is this close to expiry.
    #[serde(deserialize_with = "de_duration")]
    pub token_refresh_ahead: Duration,
    /// The loopback listener of `GET /api/weixin/access_token/`; `None` (`""` or
    /// `"off"`): no listener.
    #[serde(deserialize_with = "de_metrics_bind")]
    pub token_endpoint_bind: Option<SocketAddr>,
    /// The bearer secret that listener requires (required when it is on).
    pub token_endpoint_secret_file: Option<PathBuf>,
}

impl Default for WeChatConfig {
    fn default() -> Self {
        WeChatConfig {
            appid: None,
            secret: None,
            secret_file: None,
            apps: Vec::new(),
            api_base: "https://api.weixin.qq.com".into(),
            timeout: Duration::from_secs(5),
            retries: 2,
            max_concurrent_calls: 16,
            queue_timeout: Duration::from_secs(1),
            mock: false,
            link_by_unionid: false,
            token_refresh_ahead: Duration::from_secs(5 * 60),
            token_endpoint_bind: None,
            token_endpoint_secret_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct JwtConfig {
    pub algorithm: SigningAlgorithm,
    pub signing_key_file: Option<PathBuf>,
    /// Older signing keys that still verify (never sign) until removed.
    pub previous_key_files: Vec<PathBuf>,
    #[serde(deserialize_with = "de_duration")]
    pub access_ttl: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub refresh_ttl: Duration,
    pub rotate_refresh: bool,
    #[serde(deserialize_with = "de_duration")]
    pub reuse_grace: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    #[serde(deserialize_with = "de_duration")]
    pub leeway: Duration,
    /// How often expired refresh-token records are purged.
    #[serde(deserialize_with = "de_duration")]
    pub purge_interval: Duration,
    /// The JWKS's `Cache-Control: max-age`, and how long a rotated-in key is
    /// published before it signs.
    #[serde(deserialize_with = "de_duration")]
    pub jwks_max_age: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            algorithm: SigningAlgorithm::HS256,
            signing_key_file: None,
            previous_key_files: Vec::new(),
            access_ttl: Duration::from_secs(5 * 60),
            refresh_ttl: Duration::from_secs(24 * 3600),
            rotate_refresh: true,
            reuse_grace: Duration::from_secs(10),
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
            purge_interval: Duration::from_secs(600),
            jwks_max_age: Duration::from_secs(300),
        }
    }
}

/// `events.*`: the webhook of the team's own back end (docs/CONFIGURATION.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct EventsConfig {
    /// Where events are POSTed; unset: no event is stored or sent.
    pub webhook_url: Option<String>,
    /// The Standard Webhooks secret (`whsec_` + base64); required with a URL.
    pub secret_file: Option<PathBuf>,
    /// How long an event is retried before it is given up.
    #[serde(deserialize_with = "de_duration")]
    pub retry_for: Duration,
    /// Each delivery's deadline.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            webhook_url: None,
            secret_file: None,
            retry_for: Duration::from_secs(3 * 86_400),
            timeout: Duration::from_secs(10),
        }
    }
}

impl EventsConfig {
    /// The delivery settings (the secret file read and parsed), or `None` when
    /// events are off.
    pub fn delivery(&self) -> Result<Option<crate::events::Delivery>, ConfigError> {
        let Some(url) = &self.webhook_url else {
            return Ok(None);
        };
        let path = self.secret_file.as_ref().ok_or_else(|| {
            ConfigError::new("events.secret_file", "required with events.webhook_url")
        })?;
        let secret = read_secret_file("events.secret_file", path)?;
        let key = crate::events::parse_secret(secret.expose())
            .map_err(|reason| ConfigError::new("events.secret_file", reason))?;
        Ok(Some(crate::events::Delivery {
            url: url.clone(),
            key,
            timeout: self.timeout,
            retry_for: self.retry_for,
        }))
    }
}

/// `admin.*`: the admin socket (docs/CONFIGURATION.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AdminConfig {
    /// A client that sends nothing, or takes none of the output, for this long is
    /// dropped.
    #[serde(deserialize_with = "de_duration")]
    pub io_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            io_timeout: Duration::from_secs(30),
        }
    }
}

impl AdminConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.io_timeout < Duration::from_millis(100)
            || self.io_timeout > Duration::from_secs(600)
        {
            return Err(ConfigError::new(
                "admin.io_timeout",
                "must be between 100ms and 10m",
            ));
        }
        Ok(())
    }
}

/// `users.*`: the account's own rules (docs/CONFIGURATION.md).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct UsersConfig {
    /// How long an account asked to be deleted stays marked (a login in between
    /// cancels it) before its personal data is erased; `0s`: erased at once.
    #[serde(deserialize_with = "de_duration")]
    pub deletion_delay: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LimitsConfig {
    /// Logins per client address per minute; 0 turns the limit off.
    pub login_per_minute: u32,
    /// IPv6 clients are counted per network of this prefix length (a /64 is
    /// what one subscriber usually gets).
    pub ipv6_prefix: u8,
    /// Refreshes per client address per minute; 0 turns the limit off.
    pub refresh_per_minute: u32,
    /// Refreshes per refresh-token family (one login's tokens) per minute; 0 turns
    /// the limit off.
    pub refresh_per_family_per_minute: u32,
    /// Phone-number requests per user per minute; 0 turns the limit off.
    pub phone_per_user_per_minute: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            login_per_minute: 60,
            ipv6_prefix: 64,
            refresh_per_minute: 600,
            refresh_per_family_per_minute: 10,
            phone_per_user_per_minute: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MetricsConfig {
    /// `None`: no metrics listener (`""` or `"off"` in the config).
    #[serde(deserialize_with = "de_metrics_bind")]
    pub bind: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            bind: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        }
    }
}

/// `web_login`: log in on the web by scanning a mini-program code (docs/API.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct WebLoginConfig {
    pub enabled: bool,
    /// How long a ticket (and its code) lives.
    #[serde(deserialize_with = "de_duration")]
    pub ticket_ttl: Duration,
    /// Open tickets at most, the whole server.
    pub max_tickets: usize,
    /// The mini-program page the code opens (getwxacodeunlimit's `page`).
    pub page: String,
    /// `release`, `trial` or `develop`.
    pub env_version: String,
    /// WeChat checks that `page` is published (turn off for an unpublished page).
    pub check_path: bool,
    /// The code's width in pixels (280–1280).
    pub width: u32,
    /// The origin of the site that embeds `/web-login/` (an iframe or a popup):
    /// the page posts the tokens to it, and only it may frame the page. `None`:
    /// the page keeps the tokens (the demo).
    pub embedder_origin: Option<String>,
}

impl Default for WebLoginConfig {
    fn default() -> Self {
        WebLoginConfig {
            enabled: false,
            ticket_ttl: Duration::from_secs(120),
            max_tickets: 10_000,
            page: "pages/web-login/index".into(),
            env_version: "release".into(),
            check_path: true,
            width: 430,
            embedder_origin: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    pub level: String,
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// A mini-program we may call WeChat for, with its secret resolved.
#[derive(Debug, Clone)]
pub struct WeChatApp {
    pub appid: String,
    pub secret: Secret,
}

/// The appid the built-in mock answers for when no app is configured.
pub const MOCK_APPID: &str = "wx_mock";

/// The config was rejected. Displays as one line that names the key and the reason.
#[derive(Debug, thiserror::Error)]
#[error("config error: {key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// A loaded, validated config and what loading noticed but did not refuse.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub apps: Vec<WeChatApp>,
    /// The bearer secret of the access-token endpoint, when `wechat.token_endpoint_bind` is set.
    pub token_endpoint_secret: Option<Secret>,
    pub warnings: Vec<String>,
    pub source: Option<PathBuf>,
}

impl Config {
    /// Cross-field checks and secret files, section by section. Returns the
    /// mini-programs, first = default.
    fn validate(&self, warnings: &mut Vec<String>) -> Result<Vec<WeChatApp>, ConfigError> {
        self.server.validate()?;
        self.storage.validate()?;
        let apps = self.wechat.validate(self.server.bind, warnings)?;
        self.jwt.validate()?;
        self.events.validate()?;
        self.users.validate()?;
        self.limits.validate()?;
        self.log.validate()?;
        self.web_login.validate()?;
        self.admin.validate()?;
        Ok(apps)
    }

    /// `wechat.token_endpoint_bind` must be loopback (it hands out WeChat's access
    /// token) and comes with a non-empty bearer secret from a file.
    fn token_endpoint_secret(&self) -> Result<Option<Secret>, ConfigError> {
        let w = &self.wechat;
        let Some(addr) = w.token_endpoint_bind else {
            return Ok(None);
        };
        if !addr.ip().is_loopback() {
            return Err(ConfigError::new(
                "wechat.token_endpoint_bind",
                "must be a loopback address (127.0.0.1 or ::1): it hands out WeChat's access token",
            ));
        }
        let Some(path) = &w.token_endpoint_secret_file else {
            return Err(ConfigError::new(
                "wechat.token_endpoint_secret_file",
                "is required when wechat.token_endpoint_bind is set",
            ));
        };
        let secret = read_secret_file("wechat.token_endpoint_secret_file", path)?;
        if secret.expose().len() < 16 {
            return Err(ConfigError::new(
                "wechat.token_endpoint_secret_file",
                "must hold a secret of at least 16 characters",
            ));
        }
        Ok(Some(secret))
    }
}

impl ServerConfig {
    /// `server.*`.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.workers == 0 || self.workers > 1024 {
            return Err(ConfigError::new(
                "server.workers",
                "must be between 1 and 1024",
            ));
        }
        match (&self.tls.cert, &self.tls.key) {
            (None, None) => {}
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "server.tls.key",
                    "is required when server.tls.cert is set",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "server.tls.cert",
                    "is required when server.tls.key is set",
                ))
            }
            // Parsed at start (and by check-config) in crate::tls::server_config.
            (Some(cert), Some(key)) => {
                for (name, path) in [("server.tls.cert", cert), ("server.tls.key", key)] {
                    if !resolve_credential_path(path).is_file() {
                        return Err(ConfigError::new(
                            name,
                            format!("{} does not exist or is not a file", path.display()),
                        ));
                    }
                }
            }
        }
        if self.request_timeout < Duration::from_millis(100)
            || self.request_timeout > Duration::from_secs(600)
        {
            return Err(ConfigError::new(
                "server.request_timeout",
                "must be between 100ms and 10m",
            ));
        }
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            return Err(ConfigError::new(
                "server.max_connections",
                "must be between 1 and 1000000",
            ));
        }
        if self.max_connections_per_ip == 0 || self.max_connections_per_ip > 1_000_000 {
            return Err(ConfigError::new(
                "server.max_connections_per_ip",
                "must be between 1 and 1000000",
            ));
        }
        if self.max_connection_lifetime < Duration::from_secs(1)
            || self.max_connection_lifetime > Duration::from_secs(24 * 3600)
        {
            return Err(ConfigError::new(
                "server.max_connection_lifetime",
                "must be between 1s and 24h",
            ));
        }
        Ok(())
    }
}

impl StorageConfig {
    /// `storage.*` (the PostgreSQL keys: [`StorageConfig::resolve_postgres`]).
    fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::new("storage.path", "must not be empty"));
        }
        if self.cache_capacity.bytes() < 1024 * 1024 {
            return Err(ConfigError::new(
                "storage.cache_capacity",
                "must be at least 1MiB",
            ));
        }
        Ok(())
    }
}

impl WeChatConfig {
    /// `wechat.*` and the app secrets: the mini-programs, first = default.
    /// `bind`: `server.bind` (the mock runs only on loopback).
    fn validate(
        &self,
        bind: SocketAddr,
        warnings: &mut Vec<String>,
    ) -> Result<Vec<WeChatApp>, ConfigError> {
        let w = self;
        if !(w.api_base.starts_with("https://") || w.api_base.starts_with("http://")) {
            return Err(ConfigError::new(
                "wechat.api_base",
                "must start with https:// or http://",
            ));
        }
        if w.timeout.is_zero() || w.timeout > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "wechat.timeout",
                "must be between 1ms and 60s",
            ));
        }
        if w.retries > 10 {
            return Err(ConfigError::new("wechat.retries", "must be 10 or fewer"));
        }
        if w.max_concurrent_calls == 0 || w.max_concurrent_calls > 256 {
            return Err(ConfigError::new(
                "wechat.max_concurrent_calls",
                "must be between 1 and 256",
            ));
        }
        if w.token_refresh_ahead > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "wechat.token_refresh_ahead",
                "must be 1h or less (WeChat's tokens live 2h)",
            ));
        }
        if w.queue_timeout > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "wechat.queue_timeout",
                "must be 60s or less",
            ));
        }
        let mut apps = Vec::new();
        if w.appid.is_some() || w.secret.is_some() || w.secret_file.is_some() {
            let creds = AppCredentials {
                appid: w.appid.clone(),
                secret: w.secret.clone(),
                secret_file: w.secret_file.clone(),
            };
            apps.push(resolve_app("wechat", &creds)?);
        }
        for (i, creds) in w.apps.iter().enumerate() {
            apps.push(resolve_app(&format!("wechat.apps[{i}]"), creds)?);
        }
        for (i, app) in apps.iter().enumerate() {
            if apps[..i].iter().any(|a| a.appid == app.appid) {
                return Err(ConfigError::new(
                    "wechat.apps",
                    format!("appid {} is configured twice", app.appid),
                ));
            }
        }
        if w.mock {
            if !bind.ip().is_loopback() {
                return Err(ConfigError::new(
                    "wechat.mock",
                    "the built-in WeChat mock only runs with a loopback server.bind (127.0.0.1 or ::1)",
                ));
            }
            if apps.is_empty() {
                apps.push(WeChatApp {
                    appid: MOCK_APPID.into(),
                    secret: Secret::new("mock"),
                });
            }
            warnings.push("wechat.mock = true: logins are answered by the built-in mock, not by WeChat; never use this in production".into());
        } else if apps.is_empty() {
            return Err(ConfigError::new(
                "wechat.appid",
                "is required (with wechat.secret or wechat.secret_file) unless wechat.mock = true",
            ));
        }
        Ok(apps)
    }
}

impl JwtConfig {
    /// `jwt.*`.
    fn validate(&self) -> Result<(), ConfigError> {
        let j = self;
        if !j.algorithm.is_hmac() && j.signing_key_file.is_none() {
            return Err(ConfigError::new(
                "jwt.signing_key_file",
                format!("is required for {} (a PEM private key)", j.algorithm.name()),
            ));
        }
        if let Some(path) = &j.signing_key_file {
            if !resolve_credential_path(path).is_file() {
                return Err(ConfigError::new(
                    "jwt.signing_key_file",
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
        }
        // Bounded so that no time arithmetic on them can wrap (token times are i64).
        for (key, value) in [
            ("jwt.access_ttl", j.access_ttl),
            ("jwt.refresh_ttl", j.refresh_ttl),
            ("jwt.reuse_grace", j.reuse_grace),
            ("jwt.leeway", j.leeway),
        ] {
            if value > MAX_TOKEN_DURATION {
                return Err(ConfigError::new(key, "must be at most 10 years (\"10y\")"));
            }
        }
        // A token's exp is whole seconds; rotation, grace and leeway are milliseconds.
        for (key, value) in [
            ("jwt.access_ttl", j.access_ttl),
            ("jwt.refresh_ttl", j.refresh_ttl),
        ] {
            if value.subsec_nanos() != 0 {
                return Err(ConfigError::new(key, "must be whole seconds, like \"5m\""));
            }
        }
        for (key, value) in [("jwt.reuse_grace", j.reuse_grace), ("jwt.leeway", j.leeway)] {
            if value.subsec_nanos() % 1_000_000 != 0 {
                return Err(ConfigError::new(
                    key,
                    "must be whole milliseconds, like \"500ms\"",
                ));
            }
        }
        if j.jwks_max_age > Duration::from_secs(24 * 3600) || j.jwks_max_age.subsec_nanos() != 0 {
            return Err(ConfigError::new(
                "jwt.jwks_max_age",
                "must be whole seconds, at most 1 day (\"1d\")",
            ));
        }
        if j.access_ttl < Duration::from_secs(1) {
            return Err(ConfigError::new("jwt.access_ttl", "must be at least 1s"));
        }
        if j.refresh_ttl < j.access_ttl {
            return Err(ConfigError::new(
                "jwt.refresh_ttl",
                "must not be shorter than jwt.access_ttl",
            ));
        }
        for (key, value) in [("jwt.issuer", &j.issuer), ("jwt.audience", &j.audience)] {
            if value.as_deref() == Some("") {
                return Err(ConfigError::new(
                    key,
                    "must not be empty (leave it out to turn it off)",
                ));
            }
        }
        if j.purge_interval < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "jwt.purge_interval",
                "must be at least 1s",
            ));
        }
        Ok(())
    }
}

impl EventsConfig {
    /// `events.*`; `backend`: `storage.backend`.
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.webhook_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::new(
                    "events.webhook_url",
                    "must be an http:// or https:// URL",
                ));
            }
        }
        if self.timeout < Duration::from_millis(100) || self.timeout > Duration::from_secs(60) {
            return Err(ConfigError::new("events.timeout", "100 ms – 60 s"));
        }
        Ok(())
    }
}

impl UsersConfig {
    /// `users.*`.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.deletion_delay > MAX_TOKEN_DURATION {
            return Err(ConfigError::new("users.deletion_delay", "at most 10 years"));
        }
        Ok(())
    }
}

impl LimitsConfig {
    /// `limits.*`.
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=128).contains(&self.ipv6_prefix) {
            return Err(ConfigError::new(
                "limits.ipv6_prefix",
                "must be between 1 and 128",
            ));
        }
        Ok(())
    }
}

impl LogConfig {
    /// `log.*`.
    fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(
            self.level.as_str(),
            "trace" | "debug" | "info" | "warn" | "error"
        ) {
            return Err(ConfigError::new(
                "log.level",
                "must be one of trace, debug, info, warn, error",
            ));
        }
        if !matches!(self.format.as_str(), "text" | "json") {
            return Err(ConfigError::new("log.format", "must be text or json"));
        }
        Ok(())
    }
}

impl WebLoginConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let w = self;
        if w.ticket_ttl < Duration::from_secs(10) || w.ticket_ttl > Duration::from_secs(600) {
            return Err(ConfigError::new(
                "web_login.ticket_ttl",
                "must be between 10s and 10m",
            ));
        }
        if w.max_tickets == 0 || w.max_tickets > 1_000_000 {
            return Err(ConfigError::new(
                "web_login.max_tickets",
                "must be between 1 and 1000000",
            ));
        }
        let page_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'.');
        if w.page.is_empty()
            || w.page.len() > 128
            || w.page.starts_with('/')
            || !w.page.bytes().all(page_char)
        {
            return Err(ConfigError::new(
                "web_login.page",
                "must be a mini-program page path like pages/web-login/index (no leading /)",
            ));
        }
        if !matches!(w.env_version.as_str(), "release" | "trial" | "develop") {
            return Err(ConfigError::new(
                "web_login.env_version",
                "must be release, trial or develop",
            ));
        }
        if !(280..=1280).contains(&w.width) {
            return Err(ConfigError::new(
                "web_login.width",
                "must be between 280 and 1280",
            ));
        }
        if let Some(origin) = &w.embedder_origin {
            let rest = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            let host_ok = rest.is_some_and(|r| {
                !r.is_empty()
                    && r.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
                    })
            });
            if !host_ok {
                return Err(ConfigError::new(
                    "web_login.embedder_origin",
                    "must be an origin like https://admin.example.com (scheme and host, optional port, no path)",
                ));
            }
        }
        Ok(())
    }
}

/// `jwt.algorithm`: the JWS algorithms wxauth signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningAlgorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    ES256,
    EdDSA,
}

impl SigningAlgorithm {
    const ALL: [SigningAlgorithm; 6] = [
        Self::HS256,
        Self::HS384,
        Self::HS512,
        Self::RS256,
        Self::ES256,
        Self::EdDSA,
    ];

    /// The name as written in the config and in a JWT header.
    pub fn name(self) -> &'static str {
        match self {
            Self::HS256 => "HS256",
            Self::HS384 => "HS384",
            Self::HS512 => "HS512",
            Self::RS256 => "RS256",
            Self::ES256 => "ES256",
            Self::EdDSA => "EdDSA",
        }
    }

    /// A shared secret (HMAC) rather than a PEM private key.
    pub fn is_hmac(self) -> bool {
        matches!(self, Self::HS256 | Self::HS384 | Self::HS512)
    }
}

impl<'de> Deserialize<'de> for SigningAlgorithm {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::ALL
            .into_iter()
            .find(|a| a.name() == text)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{text:?} is not one of HS256, HS384, HS512, RS256, ES256, EdDSA"
                ))
            })
    }
}
