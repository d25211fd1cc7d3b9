//! wxauth: a self-hosted login backend for WeChat mini-programs.
//!
//! The crate is laid out by architecture (see `docs/ARCHITECTURE.md`):
//! - [`http`]: thin actix-web handlers and extractors; no state of their own.
//! - [`actors`]: the WeChat client and its workers, the access-token keeper, and the
//!   two state owners (user registry, token issuer).
//! - [`storage`]: the one module that knows the engines (sled, PostgreSQL) and the group commit.
//! - [`users`], [`tokens`]: the domain records and the JWT codec they share.
//! - [`error`]: every error type meets the contract's JSON in one place.
#![forbid(unsafe_code)]

pub mod actors;
pub mod admin;
pub mod cli;
pub mod config;
pub mod error;
pub mod events;
pub mod fsutil;
pub mod http;
pub mod metrics;
pub mod postgres_url;
pub mod ratelimit;
pub mod secret;
pub mod startup;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod tokens;
pub mod users;
pub mod web_login;
pub mod wechat_crypto;

/// Entry points for the fuzz targets in `fuzz/`: not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::admin::{parse_request, read_request_line, MAX_REQUEST_LINE};
    pub use crate::http::{fuzz_bearer, fuzz_decode};
}

/// Seconds since the Unix epoch: the one clock every record and claim uses.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `n` bytes from the operating system's CSPRNG, as lowercase hex.
pub fn random_hex(n: usize) -> String {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .expect("the OS random number generator failed");
    hex::encode(buf)
}
