//! GET /api/weixin/data/: the seed stack's "who am I", behind the access-token extractor.

use super::auth::Authenticated;
use crate::clock::rfc3339;
use actix_web::HttpResponse;
use serde::Serialize;

/// The answer, typed: this is the hot path, and a `json!` value would be built
/// (allocated, then walked) on every request.
#[derive(Serialize)]
struct Answer<'a> {
    code: &'static str,
    user: UserView<'a>,
}

#[derive(Serialize)]
struct UserView<'a> {
    id: u64,
    openid: &'a str,
    created_at: String,
    last_login_at: String,
    /// Once `POST /api/weixin/phone/` has stored one.
    #[serde(skip_serializing_if = "Option::is_none")]
    phone_number: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pure_phone_number: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    country_code: Option<&'a str>,
    /// Once `PATCH /api/weixin/user/` has stored them.
    #[serde(skip_serializing_if = "Option::is_none")]
    nickname: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    avatar_url: Option<&'a str>,
}

pub async fn data(Authenticated(user): Authenticated) -> HttpResponse {
    HttpResponse::Ok().json(Answer {
        code: "Authenticated.",
        user: UserView {
            id: user.id,
            openid: &user.openid,
            created_at: rfc3339(user.created_at),
            last_login_at: rfc3339(user.last_login_at),
            phone_number: user.phone.as_ref().map(|p| p.phone_number.as_str()),
            pure_phone_number: user.phone.as_ref().map(|p| p.pure_phone_number.as_str()),
            country_code: user.phone.as_ref().map(|p| p.country_code.as_str()),
            nickname: user.nickname.as_deref(),
            avatar_url: user.avatar_url.as_deref(),
        },
    })
}
