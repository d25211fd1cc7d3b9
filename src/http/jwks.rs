//! `GET /.well-known/jwks.json`: the public keys that verify our tokens (RFC 7517).

use super::AppState;
use crate::error::ApiError;
use actix_web::http::header;
use actix_web::{web, HttpResponse};

/// How long a client may cache the key set. Short, so that a key made by
/// `wxauth keys rotate` is seen well before the older key's tokens expire, and a
/// retired key stops being trusted soon after `wxauth keys retire`.
pub const JWKS_MAX_AGE_SECS: u64 = 300;

pub async fn jwks(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let set = state
        .keys
        .jwks()
        .ok_or(ApiError::SymmetricKey(state.keys.algorithm_name()))?;
    Ok(HttpResponse::Ok()
        .content_type(header::ContentType::json())
        .insert_header((
            header::CACHE_CONTROL,
            format!("public, max-age={JWKS_MAX_AGE_SECS}"),
        ))
        .body(set.jwks.clone()))
}
