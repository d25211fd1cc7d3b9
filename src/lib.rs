//! wxauth: a self-hosted login backend for WeChat mini-programs.
//!
//! The crate is laid out in layers, each importing only from its own and those below
//! it (the table is in `docs/ARCHITECTURE.md`, "Layers"; `scripts/modgraph.py`
//! checks it), from the bottom:
//! - leaves: [`clock`], [`ids`], [`cause`], [`secret`], [`fsutil`] and the like;
//! - [`config`]; the key-value [`storage`] traits and the group commit;
//! - the records: [`users`], [`wechat`], [`events`], [`metrics`];
//! - the storage model ([`storage::model`] and its backends), then [`tokens`];
//! - [`actors`], the owners of mutable state; [`http`], thin handlers, where every
//!   error meets the contract's JSON ([`http::error`]); [`admin`];
//! - the application: [`startup`], [`cli`], and this root.
#![forbid(unsafe_code)]

pub mod actors;
pub mod admin;
pub mod cause;
pub mod cli;
pub mod clock;
pub mod config;
pub mod events;
pub mod fsutil;
pub mod http;
pub mod ids;
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
pub mod wechat;
pub mod wechat_crypto;

/// Entry points for the fuzz targets in `fuzz/`: not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::admin::{parse_request, read_request_line, MAX_REQUEST_LINE};
    pub use crate::http::{fuzz_bearer, fuzz_decode};
}
