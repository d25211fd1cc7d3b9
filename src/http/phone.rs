//! POST /api/weixin/phone/: a getPhoneNumber code in, the user's phone number out
//! (and stored on the user). WeChat's `getuserphonenumber` takes the access token,
//! which the keeper holds; its errors map as login's do, 40029 being
//! `phone_code_invalid`.

use super::{auth::Authenticated, body::Fields, AppState};
use crate::actors::access_token::GetPhoneNumber;
use crate::actors::registry::SetPhone;
use crate::http::error::{ApiError, AuthError};
use actix_web::{web, HttpResponse};
use serde_json::json;

pub async fn phone(
    Authenticated(user): Authenticated,
    state: web::Data<AppState>,
    fields: Fields,
) -> Result<HttpResponse, ApiError> {
    if let Some(limiter) = &state.phone_limiter {
        limiter.check(user.id).map_err(ApiError::from)?;
    }
    let code = super::login::wechat_code(&fields)?;
    // The keeper bounds its own work (a multiple of `wechat.timeout`: token fetch,
    // call, forced refresh, retry).
    let phone = state
        .keeper
        .phone_number(GetPhoneNumber {
            appid: user.appid.clone(),
            openid: user.openid.clone(),
            code: code.to_string(),
        })
        .await?;
    let stored = state
        .registry
        .send(SetPhone {
            user_id: user.id,
            phone: phone.clone(),
        })
        .timeout(super::ACTOR_TIMEOUT)
        .await??;
    // Durable here: the registry answers once the write is.
    if stored.is_none() {
        return Err(AuthError::UserNotFound.into());
    }
    Ok(HttpResponse::Ok().json(json!({
        "code": "success",
        "phone_number": phone.phone_number,
        "pure_phone_number": phone.pure_phone_number,
        "country_code": phone.country_code,
    })))
}
