//! GET /api/weixin/data/: the seed stack's "who am I", behind the access-token extractor.

use super::auth::Authenticated;
use crate::users::rfc3339;
use actix_web::HttpResponse;
use serde_json::json;

pub async fn data(Authenticated(user): Authenticated) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "code": "Authenticated.",
        "user": {
            "id": user.id,
            "openid": user.openid,
            "created_at": rfc3339(user.created_at),
            "last_login_at": rfc3339(user.last_login_at),
        },
    }))
}
