//! The state owners. Handlers talk to them by message; nothing else writes their state.
//!
//! - [`wechat::WeChatClient`]: coalesces concurrent submissions of one code and hands
//!   the blocking `jscode2session` call to [`wechat::WeChatWorker`]s on a `SyncArbiter`.
//! - [`registry::UserRegistry`]: owns the user trees; find-or-create is serialized here.
//! - [`issuer::TokenIssuer`]: signs token pairs and owns the refresh-token trees
//!   (rotation, blacklist, reuse detection, purge).
//! - [`access_token::AccessTokenKeeper`]: holds each app's WeChat access token and
//!   makes the calls that need it (phone number, checksession).

pub mod access_token;
pub mod issuer;
pub mod registry;
pub mod wechat;
