//! The one place where every error becomes the contract's JSON:
//! `{"code": "<snake_case>", "detail": "<one English sentence>"}` with its status.

use crate::cause::cause_chain;
use crate::storage::StorageError;
use crate::tokens::check::Refusal;
use crate::tokens::TokenError;
use crate::web_login::WebLoginError;
use crate::wechat::errors::WeChatError;
use crate::wechat::errors::WxApiError;
use crate::wechat_crypto::DecryptError;
use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

/// Why the access-token extractor refused a request (GET /api/weixin/data/).
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("Authentication credentials were not provided.")]
    NotAuthenticated,
    #[error("Authorization header must contain two space-delimited values")]
    BadAuthorizationHeader,
    #[error("Given token not valid for any token type")]
    TokenNotValid(TokenError),
    #[error("User not found")]
    UserNotFound,
    #[error("User is inactive")]
    UserInactive,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("No mini-program with appid {0:?} is configured.")]
    UnknownApp(String),
    #[error("The request body is larger than 16 KiB.")]
    PayloadTooLarge,
    #[error(
        "Unsupported media type {0:?}; send application/json or application/x-www-form-urlencoded."
    )]
    UnsupportedMediaType(String),
    #[error("Not found.")]
    NotFound,
    /// `GET /.well-known/jwks.json` with an HMAC algorithm: nothing may be published.
    #[error("The signing key is symmetric ({0}): there are no public keys to publish.")]
    SymmetricKey(&'static str),
    /// The body did not arrive within `server.request_timeout`.
    #[error("The request did not arrive in time.")]
    RequestTimeout,
    #[error("Method not allowed; this path accepts {allow}.")]
    MethodNotAllowed { allow: &'static str },
    #[error("This user has been disabled.")]
    UserDisabled,
    /// `DELETE /api/weixin/sessions/{id}/`: no live session of this user has that id.
    #[error("No live session with this id.")]
    SessionNotFound,
    /// `DELETE /api/weixin/user/`: the wx.login code is another WeChat user's.
    #[error("The code does not belong to this account's WeChat user.")]
    CodeMismatch,
    #[error("Too many requests; try again later.")]
    RateLimited { retry_after_secs: u64 },
    /// The API's sentence is [`wechat_detail`]'s; this Display is for logs.
    #[error("WeChat login failed: {0}")]
    WeChat(#[from] WeChatError),
    /// The phone number and checksession calls (with the access token). Their
    /// `WeChat` errors become [`ApiError::WeChat`] (see `From`), mapped as login's.
    #[error(transparent)]
    WxApi(WxApiError),
    /// POST /api/weixin/decrypt/.
    #[error(transparent)]
    Decrypt(#[from] DecryptError),
    #[error(transparent)]
    WebLogin(#[from] WebLoginError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Token endpoints (refresh, verify, blacklist): simplejwt's `{"detail", "code"}`.
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("No active account found for the given token.")]
    NoActiveAccount,
    #[error("Storage is unavailable; try again later.")]
    Storage(#[from] StorageError),
    /// An owner actor did not answer in time (or is gone): a prompt 503, never a hang.
    #[error("The server is busy; try again shortly.")]
    Unavailable(#[source] actix::MailboxError),
    #[error("Internal server error.")]
    Internal(String),
}

impl From<crate::ratelimit::Limited> for ApiError {
    fn from(e: crate::ratelimit::Limited) -> Self {
        ApiError::RateLimited {
            retry_after_secs: e.retry_after_secs,
        }
    }
}

impl From<actix::MailboxError> for ApiError {
    fn from(e: actix::MailboxError) -> Self {
        ApiError::Unavailable(e)
    }
}

impl From<WxApiError> for ApiError {
    fn from(e: WxApiError) -> Self {
        match e {
            WxApiError::WeChat(e) => ApiError::WeChat(e),
            WxApiError::Storage(e) => ApiError::Storage(e),
            other => ApiError::WxApi(other),
        }
    }
}

impl ApiError {
    /// The machine-readable code of the contract's tables.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::UnknownApp(_) => "unknown_app",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::NotFound => "not_found",
            ApiError::SymmetricKey(_) => "symmetric_key",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::UserDisabled => "user_disabled",
            ApiError::SessionNotFound => "session_not_found",
            ApiError::CodeMismatch => "code_mismatch",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::WeChat(e) => e.code(),
            ApiError::WxApi(e) => e.code(),
            ApiError::Decrypt(e) => match e {
                DecryptError::BadInput(_) => "invalid_request",
                DecryptError::Failed => "decrypt_failed",
                DecryptError::WatermarkMismatch => "watermark_mismatch",
            },
            ApiError::WebLogin(e) => match e {
                WebLoginError::TooManyTickets => "too_many_tickets",
                WebLoginError::TooManyWaiters => "service_unavailable",
                WebLoginError::PollSecret => "poll_secret_invalid",
                WebLoginError::Expired => "ticket_expired",
                WebLoginError::Closed => "ticket_closed",
                WebLoginError::Taken => "ticket_taken",
            },
            ApiError::Auth(e) => match e {
                AuthError::NotAuthenticated => "not_authenticated",
                AuthError::BadAuthorizationHeader => "bad_authorization_header",
                AuthError::TokenNotValid(_) => "token_not_valid",
                AuthError::UserNotFound => "user_not_found",
                AuthError::UserInactive => "user_inactive",
            },
            ApiError::Token(_) => "token_not_valid",
            ApiError::NoActiveAccount => "no_active_account",
            ApiError::Storage(StorageError::Corrupt { .. }) => "internal_error",
            ApiError::Storage(StorageError::Database { .. }) => "service_unavailable",
            ApiError::Storage(_) => "storage_unavailable",
            ApiError::Internal(_) => "internal_error",
            ApiError::Unavailable(_) => "service_unavailable",
        }
    }

    /// The `detail` sentence of the JSON body.
    pub fn detail(&self) -> String {
        match self {
            ApiError::WeChat(e) => wechat_detail(e),
            other => other.to_string(),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            ApiError::WeChat(e) => e.retry_after(),
            ApiError::WxApi(e) => e.retry_after(),
            ApiError::WebLogin(WebLoginError::TooManyTickets) => Some(5),
            ApiError::WebLogin(WebLoginError::TooManyWaiters) => Some(1),
            ApiError::Storage(StorageError::Corrupt { .. }) => None,
            ApiError::Storage(_) => Some(5),
            ApiError::Unavailable(_) => Some(1),
            _ => None,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) | ApiError::UnknownApp(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound | ApiError::SymmetricKey(_) => StatusCode::NOT_FOUND,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UserDisabled | ApiError::CodeMismatch => StatusCode::FORBIDDEN,
            ApiError::SessionNotFound => StatusCode::NOT_FOUND,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::WeChat(e) => e.status(),
            ApiError::WxApi(e) => e.status(),
            ApiError::Decrypt(_) => StatusCode::BAD_REQUEST,
            ApiError::WebLogin(e) => match e {
                WebLoginError::TooManyTickets | WebLoginError::TooManyWaiters => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                WebLoginError::PollSecret => StatusCode::UNAUTHORIZED,
                WebLoginError::Expired => StatusCode::GONE,
                WebLoginError::Closed | WebLoginError::Taken => StatusCode::CONFLICT,
            },
            ApiError::Auth(_) | ApiError::Token(_) | ApiError::NoActiveAccount => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Storage(StorageError::Corrupt { .. }) | ApiError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ApiError::Storage(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if status.is_server_error() {
            // Internal causes are logged, never sent: the client gets the generic sentence.
            match self {
                ApiError::Internal(cause) => tracing::error!(%cause, "internal error"),
                ApiError::Storage(e) => {
                    tracing::error!(error = %cause_chain(e), "storage error")
                }
                ApiError::Unavailable(e) => {
                    tracing::error!(error = %cause_chain(e), "an owner actor did not answer")
                }
                ApiError::WxApi(e @ WxApiError::CodePageInvalid) => {
                    tracing::error!(error = %e, "getwxacodeunlimit refused the configured page")
                }
                _ => {}
            }
        }
        let mut body = json!({ "detail": self.detail(), "code": self.code() });
        if let ApiError::Auth(AuthError::TokenNotValid(reason)) = self {
            body["messages"] = json!([{
                "token_class": "AccessToken",
                "token_type": "access",
                "message": reason.to_string(),
            }]);
        }
        let mut response = HttpResponse::build(status);
        if status == StatusCode::UNAUTHORIZED {
            response.insert_header((header::WWW_AUTHENTICATE, r#"Bearer realm="api""#));
        }
        if let ApiError::MethodNotAllowed { allow } = self {
            response.insert_header((header::ALLOW, *allow));
        }
        if let Some(secs) = self.retry_after() {
            response.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        response.json(body)
    }
}

/// The API's wording for a failed code exchange (the contract's `detail`).
fn wechat_detail(e: &WeChatError) -> String {
    let sentence = match e {
        WeChatError::CodeInvalid => "The login code is invalid.",
        WeChatError::CodeUsed => "The login code has already been used.",
        WeChatError::UserBlocked => "WeChat flagged this user as high-risk.",
        WeChatError::RateLimited => "WeChat's frequency limit was reached; try again later.",
        WeChatError::Config(errcode) => {
            return format!("WeChat rejected this server's appid or secret (errcode {errcode}).")
        }
        WeChatError::Busy => "WeChat is busy; try again shortly.",
        WeChatError::NoCallSlot => "Too many requests are waiting for WeChat; try again shortly.",
        WeChatError::Timeout => "WeChat did not answer in time.",
        WeChatError::Http(status) => return format!("WeChat answered with HTTP status {status}."),
        WeChatError::Malformed(_) => "WeChat's answer could not be understood.",
        WeChatError::Unknown(errcode) => {
            return format!("WeChat answered with an unknown error (errcode {errcode}).")
        }
        WeChatError::Connect(_) => "WeChat could not be reached.",
        WeChatError::Unavailable => "The WeChat client is unavailable.",
    };
    sentence.to_string()
}

/// A JSON error body for a bare status (used for errors actix-web raises itself).
pub fn status_error_body(status: StatusCode) -> serde_json::Value {
    let code = match status {
        StatusCode::BAD_REQUEST => "invalid_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
        s if s.is_server_error() => "internal_error",
        _ => "error",
    };
    let reason = status.canonical_reason().unwrap_or("Error");
    json!({ "detail": format!("{reason}."), "code": code })
}

impl From<crate::actors::issuer::RefreshError> for ApiError {
    fn from(e: crate::actors::issuer::RefreshError) -> Self {
        use crate::actors::issuer::RefreshError;
        match e {
            RefreshError::Refused(refusal) => refusal.into(),
            RefreshError::Storage(s) => ApiError::Storage(s),
            RefreshError::RateLimited(limited) => limited.into(),
        }
    }
}

/// The token check's answer on the access-token path (`/api/weixin/data/`), in
/// simplejwt `JWTAuthentication`'s terms. simplejwt has no message for a revoked or
/// logged-out token there: "Token is invalid".
impl From<Refusal> for AuthError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Token(e) => AuthError::TokenNotValid(e),
            Refusal::UserNotFound => AuthError::UserNotFound,
            Refusal::UserInactive => AuthError::UserInactive,
            Refusal::Revoked
            | Refusal::NotIssued
            | Refusal::FamilyRevoked
            | Refusal::Reused { .. } => AuthError::TokenNotValid(TokenError::Invalid),
        }
    }
}

/// The token check's answer on refresh and logout, in simplejwt's token-endpoint terms:
/// a disabled or missing user is `no_active_account` (simplejwt 5.5's refresh), a
/// revoked, logged-out or reused token "Token is blacklisted".
impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Token(e) => ApiError::Token(e),
            Refusal::UserNotFound | Refusal::UserInactive => ApiError::NoActiveAccount,
            Refusal::NotIssued => ApiError::Token(TokenError::Invalid),
            Refusal::Revoked | Refusal::FamilyRevoked | Refusal::Reused { .. } => {
                ApiError::Token(TokenError::Blacklisted)
            }
        }
    }
}

impl ApiError {
    /// The token check's answer on `/api/token/verify/`, whose only refusal is
    /// `token_not_valid`: a token of a disabled or missing user is "Token is invalid".
    pub fn from_verify_refusal(refusal: Refusal) -> Self {
        match refusal {
            Refusal::UserNotFound | Refusal::UserInactive => ApiError::Token(TokenError::Invalid),
            other => other.into(),
        }
    }
}
