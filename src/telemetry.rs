//! Logging: `tracing` to stderr, text or JSON. `RUST_LOG` overrides `log.level`.

use crate::config::LogConfig;
use tracing_subscriber::EnvFilter;

/// The HTTP client logs request URLs at debug level, and jscode2session's URL holds
/// the app secret and the code: its debug output stays off whatever the level. The
/// PostgreSQL client logs every statement's parameters (session keys, tokens' family
/// ids) at debug level: off too.
const ALWAYS_QUIET: &str =
    "ureq=warn,ureq_proto=warn,rustls=warn,tokio_postgres=warn,deadpool=warn,deadpool_postgres=warn";

pub fn init(cfg: &LogConfig) {
    let base = std::env::var("RUST_LOG").unwrap_or_else(|_| cfg.level.clone());
    let filter = EnvFilter::try_new(format!("{base},{ALWAYS_QUIET}"))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{ALWAYS_QUIET}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if cfg.format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.with_ansi(false).try_init()
    };
    // A second init (tests, embedding) keeps the first subscriber.
    drop(result);
}
