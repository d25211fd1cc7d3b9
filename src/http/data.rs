//! GET /api/weixin/data/: the seed stack's "who am I", behind the access-token extractor.

use super::auth::Authenticated;
use crate::users::rfc3339;
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
}

pub async fn data(Authenticated(user): Authenticated) -> HttpResponse {
    HttpResponse::Ok().json(Answer {
        code: "Authenticated.",
        user: UserView {
            id: user.id,
            openid: &user.openid,
            created_at: rfc3339(user.created_at),
            last_login_at: rfc3339(user.last_login_at),
        },
    })
}
