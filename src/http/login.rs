//! POST /api/weixin/login/: a `wx.login()` code in, our token pair out.

use super::{body::Fields, AppState};
use crate::actors::registry::{Login, LoginOutcome};
use crate::actors::wechat::Code2Session;
use crate::http::error::ApiError;
use crate::users::UserId;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use std::time::Instant;

const MAX_CODE_LEN: usize = 128;

/// A WeChat code field (`wx.login`, getPhoneNumber): 1 to 128 printable ASCII
/// characters, else 400 `invalid_request`.
pub(super) fn wechat_code(fields: &Fields) -> Result<&str, ApiError> {
    let code = fields.required_str("code")?;
    if code.is_empty()
        || code.len() > MAX_CODE_LEN
        || !code.bytes().all(|b| (0x20..=0x7e).contains(&b))
    {
        return Err(ApiError::InvalidRequest(
            "The field `code` must be 1 to 128 printable ASCII characters.".into(),
        ));
    }
    Ok(code)
}

pub async fn login(
    req: HttpRequest,
    state: web::Data<AppState>,
    fields: Fields,
) -> Result<HttpResponse, ApiError> {
    // The WeChat deadline (`wechat.timeout`) counts from here.
    let started = Instant::now();
    state.limit_login(&req)?;
    let code = wechat_code(&fields)?;
    let appid = state
        .resolve_app(fields.optional_str("appid")?)?
        .to_string();

    // The call to wait on; that wait ends by the login's deadline. Dropping it (the
    // client left) cancels a call not yet started.
    let session = state
        .wechat
        .code2session(Code2Session {
            appid: appid.clone(),
            code: code.to_string(),
            started,
            span: tracing::Span::current(),
        })
        .answer()
        .await?;
    let (user, created, deletion_cancelled, pair) = match state
        .registry
        .send(Login {
            appid,
            session,
            keys: state.keys.clone(),
            span: tracing::Span::current(),
        })
        .timeout(super::ACTOR_TIMEOUT)
        .await??
    {
        LoginOutcome::LoggedIn {
            user,
            created,
            deletion_cancelled,
            pair,
        } => (user, created, deletion_cancelled, pair),
        LoginOutcome::Disabled => return Err(ApiError::UserDisabled),
    };
    // Durable here: the user's writes and the new family were one batch, and the
    // registry joined the commit in the same turn.
    state.metrics.tokens_issued(1, 1);
    if created {
        tracing::info!(user_id = user.id, "new user");
    }
    if deletion_cancelled {
        tracing::info!(
            user_id = user.id,
            "a login cancelled the account's deletion"
        );
    }
    Ok(HttpResponse::Ok().json(LoginAnswer {
        code: "success",
        access: &pair.access.token,
        refresh: &pair.refresh.token,
        access_expires_in: pair.access.claims.exp - pair.access.claims.iat,
        refresh_expires_in: pair.refresh.claims.exp - pair.refresh.claims.iat,
        user: LoginUser {
            id: user.id,
            created,
            deletion_cancelled,
        },
    }))
}

/// The contract's login answer (typed: no JSON tree built per login).
#[derive(Serialize)]
struct LoginAnswer<'a> {
    code: &'static str,
    access: &'a str,
    refresh: &'a str,
    access_expires_in: i64,
    refresh_expires_in: i64,
    user: LoginUser,
}

#[derive(Serialize)]
struct LoginUser {
    id: UserId,
    created: bool,
    /// Only when true: the account was marked for deletion and this login kept it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    deletion_cancelled: bool,
}
