//! `GET /.well-known/jwks.json`: the public keys that verify our tokens (RFC 7517).

use super::AppState;
use crate::http::error::ApiError;
use actix_web::http::header;
use actix_web::{web, HttpResponse};

/// Cached for `jwt.jwks_max_age`: a key made by `wxauth keys rotate` signs only once
/// every cache has had time to learn it, and a retired key stops being trusted soon
/// after `wxauth keys retire`.
pub async fn jwks(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let set = state
        .keys
        .jwks()
        .ok_or(ApiError::SymmetricKey(state.keys.algorithm_name()))?;
    Ok(HttpResponse::Ok()
        .content_type(header::ContentType::json())
        .insert_header((
            header::CACHE_CONTROL,
            format!("public, max-age={}", state.keys.jwks_max_age_secs()),
        ))
        .body(set.jwks.clone()))
}
