//! The state owners. Handlers talk to them by message; nothing else writes their state.
//!
//! - [`wechat::WeChatWorker`]s on a `SyncArbiter` make the blocking `jscode2session`
//!   calls; [`wechat::WeChatClient`], the handle logins call, coalesces concurrent
//!   submissions of one code and bounds the calls in flight.
//! - [`registry::UserRegistry`]: owns the user trees; find-or-create is serialized
//!   here, and a login's user writes and new token family are one batch.
//! - [`issuer::TokenIssuer`]: owns every change to existing refresh-token records
//!   (rotation, blacklist, reuse detection, purge).
//! - [`access_token::AccessTokenKeeper`]: holds each app's WeChat access token and
//!   makes the calls that need it (phone number, checksession).

pub mod access_token;
pub mod issuer;
pub mod registry;
pub mod wechat;
