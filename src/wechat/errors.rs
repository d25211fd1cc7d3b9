//! Every way a call to WeChat can fail.

use crate::storage::StorageError;
use actix_web::http::StatusCode;

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

/// The `outcome` label of a call to WeChat, in the metrics (`metrics::WECHAT_OUTCOMES`
/// and the two lists after it). An enum, so that a label is never mistyped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    CodeInvalid,
    CodeUsed,
    UserBlocked,
    RateLimited,
    ConfigError,
    Busy,
    Timeout,
    HttpError,
    Malformed,
    UnknownErrcode,
    ConnectError,
    Unavailable,
    ForcedOk,
    ForcedRefused,
    TokenInvalid,
}

impl Outcome {
    /// Every outcome, in the order of [`Outcome::index`]: first the outcomes of a
    /// login's call (`metrics::WECHAT_OUTCOMES`), then those only the access-token
    /// keeper has.
    pub const ALL: [Outcome; 16] = [
        Outcome::Ok,
        Outcome::CodeInvalid,
        Outcome::CodeUsed,
        Outcome::UserBlocked,
        Outcome::RateLimited,
        Outcome::ConfigError,
        Outcome::Busy,
        Outcome::Timeout,
        Outcome::HttpError,
        Outcome::Malformed,
        Outcome::UnknownErrcode,
        Outcome::ConnectError,
        Outcome::Unavailable,
        Outcome::ForcedOk,
        Outcome::ForcedRefused,
        Outcome::TokenInvalid,
    ];

    /// Its position in [`Outcome::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ForcedOk => "forced_ok",
            Outcome::ForcedRefused => "forced_refused",
            Outcome::TokenInvalid => "token_invalid",
            Outcome::CodeInvalid => "code_invalid",
            Outcome::CodeUsed => "code_used",
            Outcome::UserBlocked => "user_blocked",
            Outcome::RateLimited => "rate_limited",
            Outcome::ConfigError => "config_error",
            Outcome::Busy => "busy",
            Outcome::Timeout => "timeout",
            Outcome::HttpError => "http_error",
            Outcome::Malformed => "malformed",
            Outcome::UnknownErrcode => "unknown_errcode",
            Outcome::ConnectError => "connect_error",
            Outcome::Unavailable => "unavailable",
        }
    }
}

impl WeChatError {
    /// The contract's `code` for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            WeChatError::CodeInvalid => "code_invalid",
            WeChatError::CodeUsed => "code_used",
            WeChatError::UserBlocked => "user_blocked",
            WeChatError::RateLimited => "rate_limited",
            WeChatError::Config(_) => "wechat_config_error",
            WeChatError::Busy | WeChatError::NoCallSlot => "upstream_busy",
            WeChatError::Timeout => "upstream_timeout",
            WeChatError::Http(_)
            | WeChatError::Malformed(_)
            | WeChatError::Unknown(_)
            | WeChatError::Connect(_)
            | WeChatError::Unavailable => "upstream_error",
        }
    }

    /// The HTTP status the contract gives it.
    pub fn status(&self) -> StatusCode {
        match self {
            WeChatError::CodeInvalid | WeChatError::CodeUsed => StatusCode::UNAUTHORIZED,
            WeChatError::UserBlocked => StatusCode::FORBIDDEN,
            WeChatError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            WeChatError::Busy | WeChatError::NoCallSlot => StatusCode::SERVICE_UNAVAILABLE,
            WeChatError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            WeChatError::Config(_)
            | WeChatError::Http(_)
            | WeChatError::Malformed(_)
            | WeChatError::Unknown(_)
            | WeChatError::Connect(_)
            | WeChatError::Unavailable => StatusCode::BAD_GATEWAY,
        }
    }

    /// `Retry-After` seconds, where the contract sends one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            WeChatError::RateLimited => Some(60),
            WeChatError::Busy | WeChatError::NoCallSlot => Some(1),
            _ => None,
        }
    }

    /// The call's `outcome` label.
    pub fn metric_label(&self) -> Outcome {
        match self {
            WeChatError::CodeInvalid => Outcome::CodeInvalid,
            WeChatError::CodeUsed => Outcome::CodeUsed,
            WeChatError::UserBlocked => Outcome::UserBlocked,
            WeChatError::RateLimited => Outcome::RateLimited,
            WeChatError::Config(_) => Outcome::ConfigError,
            WeChatError::Busy | WeChatError::NoCallSlot => Outcome::Busy,
            WeChatError::Timeout => Outcome::Timeout,
            WeChatError::Http(_) => Outcome::HttpError,
            WeChatError::Malformed(_) => Outcome::Malformed,
            WeChatError::Unknown(_) => Outcome::UnknownErrcode,
            WeChatError::Connect(_) => Outcome::ConnectError,
            WeChatError::Unavailable => Outcome::Unavailable,
        }
    }

    /// What may be tried again: WeChat's explicit "busy" (-1), and a connection that
    /// failed before the request was sent. Neither can have spent a code.
    pub fn is_transient(&self) -> bool {
        matches!(self, WeChatError::Busy | WeChatError::Connect(_))
    }
}

impl WxApiError {
    /// The contract's `code` for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            WxApiError::PhoneCodeInvalid => "phone_code_invalid",
            WxApiError::ForcedRefreshLimited { .. } => "access_token_unavailable",
            WxApiError::TokenRejected => "upstream_error",
            WxApiError::UnknownApp(_) => "unknown_app",
            WxApiError::CodePageInvalid => "wechat_config_error",
            WxApiError::Storage(StorageError::Corrupt { .. }) => "internal_error",
            WxApiError::Storage(_) => "storage_unavailable",
            WxApiError::WeChat(e) => e.code(),
        }
    }

    /// The HTTP status the contract gives it.
    pub fn status(&self) -> StatusCode {
        match self {
            WxApiError::PhoneCodeInvalid | WxApiError::UnknownApp(_) => StatusCode::BAD_REQUEST,
            WxApiError::ForcedRefreshLimited { .. } => StatusCode::SERVICE_UNAVAILABLE,
            WxApiError::TokenRejected | WxApiError::CodePageInvalid => StatusCode::BAD_GATEWAY,
            WxApiError::Storage(StorageError::Corrupt { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
            WxApiError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
            WxApiError::WeChat(e) => e.status(),
        }
    }

    /// `Retry-After` seconds, where the contract sends one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            WxApiError::ForcedRefreshLimited { retry_after_secs } => Some(*retry_after_secs),
            WxApiError::Storage(StorageError::Corrupt { .. }) => None,
            WxApiError::Storage(_) => Some(5),
            WxApiError::WeChat(e) => e.retry_after(),
            _ => None,
        }
    }

    /// The call's `outcome` label.
    pub fn metric_label(&self) -> Outcome {
        match self {
            WxApiError::PhoneCodeInvalid => Outcome::CodeInvalid,
            WxApiError::ForcedRefreshLimited { .. } => Outcome::ForcedRefused,
            WxApiError::TokenRejected => Outcome::TokenInvalid,
            WxApiError::UnknownApp(_) | WxApiError::CodePageInvalid => Outcome::ConfigError,
            WxApiError::Storage(_) => Outcome::Unavailable,
            WxApiError::WeChat(e) => e.metric_label(),
        }
    }

    /// See [`WeChatError::is_transient`].
    pub fn is_transient(&self) -> bool {
        matches!(self, WxApiError::WeChat(e) if e.is_transient())
    }
}
