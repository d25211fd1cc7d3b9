//! GET /api/auth/check: forward-auth for a reverse proxy in front of other back ends
//! (nginx `auth_request`, Caddy `forward_auth`, Traefik `forwardAuth`).
//!
//! The same extractor, and so the same one token check, as GET /api/weixin/data/:
//! one user read, no actor. A valid access token answers 200 with the user in
//! headers the proxy copies to its upstream, and no body (the proxy drops it).
//! Every refusal is the extractor's: 401 with the contract's JSON and
//! `WWW-Authenticate`, which the proxy passes back to the client.

use super::auth::Authenticated;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::HttpResponse;

pub const USER_ID: HeaderName = HeaderName::from_static("x-auth-user-id");
pub const OPENID: HeaderName = HeaderName::from_static("x-auth-openid");
pub const UNIONID: HeaderName = HeaderName::from_static("x-auth-unionid");

pub async fn check(Authenticated(user): Authenticated) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    response.insert_header((USER_ID, HeaderValue::from(user.id)));
    // Login admits only WeChat-shaped ids ([A-Za-z0-9_-]), which are valid header
    // values; a record that somehow is not is left out rather than failing the check.
    if let Ok(openid) = HeaderValue::from_str(&user.openid) {
        response.insert_header((OPENID, openid));
    }
    if let Some(Ok(unionid)) = user.unionid.as_deref().map(HeaderValue::from_str) {
        response.insert_header((UNIONID, unionid));
    }
    response.finish()
}
