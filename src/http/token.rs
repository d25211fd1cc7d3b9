//! simplejwt's token endpoints: refresh (with rotation), verify, blacklist (logout).

use super::{body::Fields, AppState};
use crate::actors::issuer::{Blacklist, Refresh};
use crate::http::error::ApiError;
use crate::tokens::check::{self, Accept, CheckError, RefreshStanding};
use crate::tokens::TokenError;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use serde_json::json;

pub async fn refresh(
    req: HttpRequest,
    state: web::Data<AppState>,
    fields: Fields,
) -> Result<HttpResponse, ApiError> {
    state.limit_refresh(&req)?;
    let token = fields.required_str("refresh")?.to_string();
    let refreshed = state
        .issuer
        .send(Refresh {
            token,
            span: tracing::Span::current(),
        })
        .timeout(super::ACTOR_TIMEOUT)
        .await??;
    Ok(HttpResponse::Ok().json(RefreshAnswer {
        access: &refreshed.access,
        refresh: refreshed.refresh.as_deref(),
    }))
}

/// simplejwt's refresh answer; `refresh` only when tokens rotate.
#[derive(Serialize)]
struct RefreshAnswer<'a> {
    access: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh: Option<&'a str>,
}

/// Any token the one check accepts, access or refresh. A refresh token must also be
/// its family's current one: rotated out (even within the grace) is blacklisted.
pub async fn verify(state: web::Data<AppState>, fields: Fields) -> Result<HttpResponse, ApiError> {
    let token = fields.required_str("token")?;
    let accepted = match check::check(
        &state.keys,
        &state.reads,
        token,
        Accept::AnyType,
        crate::clock::now_ms(),
    )
    .await
    {
        Ok(accepted) => accepted,
        Err(CheckError::Refused(refusal)) => return Err(ApiError::from_verify_refusal(refusal)),
        Err(CheckError::Storage(e)) => return Err(e.into()),
    };
    if let Some(RefreshStanding::InGrace { .. }) = accepted.refresh {
        return Err(TokenError::Blacklisted.into());
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
        .send(Blacklist {
            token,
            span: tracing::Span::current(),
        })
        .timeout(super::ACTOR_TIMEOUT)
        .await??;
    Ok(HttpResponse::Ok().json(json!({})))
}
