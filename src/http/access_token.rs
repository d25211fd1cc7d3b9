//! GET /api/weixin/access_token/: WeChat's access token for the other services of
//! this deployment (WeChat's "central control server" pattern), so that nothing
//! else ever fetches one and invalidates ours.
//!
//! Served only on its own listener, `wechat.token_endpoint_bind` (loopback, checked
//! at start; off by default), never on the API listener: a reverse proxy in front
//! of the API can then never expose it, whatever its rules. Every request needs
//! `Authorization: Bearer <the secret in wechat.token_endpoint_secret_file>`.

use super::AppState;
use crate::actors::access_token::GetToken;
use crate::http::error::{ApiError, AuthError};
use crate::secret::Secret;
use actix_web::{http::header, web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// The listener's bearer secret.
pub struct EndpointSecret(pub Secret);

#[derive(Deserialize)]
pub struct Query {
    appid: Option<String>,
}

pub async fn access_token(
    req: HttpRequest,
    state: web::Data<AppState>,
    secret: web::Data<EndpointSecret>,
    query: web::Query<Query>,
) -> Result<HttpResponse, ApiError> {
    super::auth::single_authorization(&req)?;
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if !same_secret(presented, secret.0.expose().as_bytes()) {
        log_refusal();
        return Err(AuthError::NotAuthenticated.into());
    }
    let appid = state.resolve_app(query.appid.as_deref())?.to_string();
    let token = state.keeper.token(GetToken { appid }).await?;
    Ok(HttpResponse::Ok().json(json!({
        "access_token": token.access_token.expose(),
        "expires_in": token.expires_in_secs,
    })))
}

/// Compares SHA-256 digests, fixed-length, without an early exit: the time taken
/// says nothing of the secret, its length included.
fn same_secret(presented: &[u8], secret: &[u8]) -> bool {
    use ring::digest::{digest, SHA256};
    let (a, b) = (digest(&SHA256, presented), digest(&SHA256, secret));
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// A WARN for refused requests, at most one a minute (each refusal would otherwise
/// be a log line anyone on the host can write), with how many there were.
fn log_refusal() {
    static REFUSED: AtomicU64 = AtomicU64::new(0);
    static NEXT_WARN_AT: AtomicI64 = AtomicI64::new(0);
    REFUSED.fetch_add(1, Ordering::Relaxed);
    let now = crate::clock::now_unix();
    let next = NEXT_WARN_AT.load(Ordering::Relaxed);
    if now >= next
        && NEXT_WARN_AT
            .compare_exchange(next, now + 60, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let refused = REFUSED.swap(0, Ordering::Relaxed);
        tracing::warn!(
            refused,
            "access token endpoint: requests without the right bearer secret (one line a minute at most)"
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn same_secret_compares_whole_secrets() {
        assert!(super::same_secret(b"abc", b"abc"));
        assert!(!super::same_secret(b"abc", b"abd"));
        assert!(!super::same_secret(b"abc", b"abcd"));
        assert!(!super::same_secret(b"", b"a"));
    }
}
