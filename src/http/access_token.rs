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
use crate::error::{ApiError, AuthError};
use crate::secret::Secret;
use actix_web::{http::header, web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

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
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if !constant_time_eq(presented, secret.0.expose().as_bytes()) {
        tracing::warn!("access token endpoint: a request without the right bearer secret");
        return Err(AuthError::NotAuthenticated.into());
    }
    let appid = state.resolve_app(query.appid.as_deref())?.to_string();
    let token = state.keeper.send(GetToken { appid }).await??;
    Ok(HttpResponse::Ok().json(json!({
        "access_token": token.access_token.expose(),
        "expires_in": token.expires_in_secs,
    })))
}

/// Compares without an early exit, so the time taken says nothing of the secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares_whole_slices() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"abcd"));
        assert!(!super::constant_time_eq(b"", b"a"));
    }
}
