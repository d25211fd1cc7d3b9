//! POST /api/weixin/decrypt/: WeChat's encrypted data (`encryptedData`, `iv`), opened
//! with the user's stored session key. The watermark must name the user's own app.

use super::{auth::Authenticated, body::Fields};
use crate::http::error::ApiError;
use crate::wechat_crypto;
use actix_web::HttpResponse;
use serde_json::json;

pub async fn decrypt(
    Authenticated(user): Authenticated,
    fields: Fields,
) -> Result<HttpResponse, ApiError> {
    let encrypted_data = fields.required_str("encryptedData")?;
    let iv = fields.required_str("iv")?;
    let data =
        wechat_crypto::decrypt_for_app(&user.appid, user.session_key.expose(), iv, encrypted_data)?;
    Ok(HttpResponse::Ok().json(json!({ "code": "success", "data": data })))
}
