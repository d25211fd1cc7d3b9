//! simplejwt's token endpoints: refresh (with rotation), verify, blacklist (logout).

use super::{body::Fields, AppState};
use crate::actors::issuer::{Blacklist, Refresh};
use crate::error::ApiError;
use crate::tokens::records::{self, RefreshState};
use crate::tokens::TokenError;
use crate::users;
use actix_web::{web, HttpResponse};
use serde_json::json;

pub async fn refresh(state: web::Data<AppState>, fields: Fields) -> Result<HttpResponse, ApiError> {
    let token = fields.required_str("refresh")?.to_string();
    let refreshed = state
        .issuer
        .send(Refresh { token })
        .timeout(super::ACTOR_TIMEOUT)
        .await??;
    Ok(HttpResponse::Ok().json(match refreshed.refresh {
        Some(refresh) => json!({ "access": refreshed.access, "refresh": refresh }),
        None => json!({ "access": refreshed.access }),
    }))
}

/// Any valid token, access or refresh. A refresh token must also still be its
/// family's current one: rotated-out and logged-out tokens are blacklisted.
pub async fn verify(state: web::Data<AppState>, fields: Fields) -> Result<HttpResponse, ApiError> {
    let token = fields.required_str("token")?;
    let claims = state.keys.verify_any(token)?;
    if claims.token_type == "refresh" {
        let store = state.reader.as_ref();
        let not_before = users::load(store, claims.user_id)?.map_or(0, |u| u.tokens_not_before);
        match records::refresh_state(store, &claims, not_before)? {
            Ok(RefreshState::Current(..)) => {}
            Ok(RefreshState::RotatedOut(..)) => return Err(TokenError::Blacklisted.into()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(HttpResponse::Ok().json(json!({})))
}

pub async fn blacklist(
    state: web::Data<AppState>,
    fields: Fields,
) -> Result<HttpResponse, ApiError> {
    let token = fields.required_str("refresh")?.to_string();
    state
        .issuer
        .send(Blacklist { token })
        .timeout(super::ACTOR_TIMEOUT)
        .await??;
    Ok(HttpResponse::Ok().json(json!({})))
}
