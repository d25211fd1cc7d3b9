//! Every way a call to WeChat can fail.

use crate::storage::StorageError;

/// Every way a code exchange can fail; `http/error.rs` maps each to the contract's row
/// and its API wording. The messages here are for logs and operators.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WeChatError {
    #[error("the code is invalid")]
    CodeInvalid,
    #[error("the code was already used")]
    CodeUsed,
    #[error("the user is flagged high-risk")]
    UserBlocked,
    #[error("WeChat's frequency limit was reached")]
    RateLimited,
    #[error("WeChat rejected the appid or secret (errcode {0})")]
    Config(i64),
    #[error("WeChat is busy")]
    Busy,
    /// Every call slot stayed busy for `wechat.queue_timeout`: refused before any call.
    #[error("no call slot became free within wechat.queue_timeout")]
    NoCallSlot,
    #[error("WeChat did not answer before the deadline")]
    Timeout,
    #[error("WeChat answered with HTTP status {0}")]
    Http(u16),
    #[error("WeChat's answer is malformed: {0}")]
    Malformed(String),
    #[error("WeChat answered with unknown errcode {0}")]
    Unknown(i64),
    #[error("cannot reach WeChat: {0}")]
    Connect(String),
    #[error("the WeChat client actor is gone")]
    Unavailable,
}

/// Every way a token-authenticated WeChat API can fail; `http/error.rs` maps each.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WxApiError {
    /// getuserphonenumber's 40029: the getPhoneNumber code is invalid or expired.
    #[error("The phone number code is invalid or has expired.")]
    PhoneCodeInvalid,
    /// WeChat refused the token and the forced-refresh guard (20 a day, 30 s apart)
    /// allows no refresh now.
    #[error("WeChat refused the access token and it cannot be refreshed again yet.")]
    ForcedRefreshLimited { retry_after_secs: u64 },
    /// WeChat refused even a freshly forced token.
    #[error("WeChat refused a freshly refreshed access token.")]
    TokenRejected,
    #[error("No mini-program with appid {0:?} is configured.")]
    UnknownApp(String),
    /// getwxacodeunlimit's 41030: `web_login.page` is not a published page of the
    /// mini-program (or `check_path` is on for an unpublished one).
    #[error("WeChat refused web_login.page: it is not a published page of the mini-program (errcode 41030).")]
    CodePageInvalid,
    /// The stored token could not be read: our fault, not WeChat's.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Everything login's calls can meet too (busy, timeout, config, HTTP, …).
    #[error(transparent)]
    WeChat(#[from] WeChatError),
}
