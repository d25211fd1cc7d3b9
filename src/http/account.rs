//! The user's own account, behind the access token: sessions (list, end one, end
//! all), the export, the profile (`PATCH /api/weixin/user/`) and deletion
//! (`DELETE /api/weixin/user/` with a fresh wx.login code of the same WeChat user).

use super::auth::{Authenticated, AuthenticatedSession};
use super::{body::Fields, AppState};
use crate::actors::issuer::{RevokeAllFamilies, RevokeFamily};
use crate::actors::registry::{DeleteUser, SetProfile};
use crate::actors::wechat::Code2Session;
use crate::clock::rfc3339;
use crate::http::error::{ApiError, AuthError};
use crate::storage::model::{Deletion, FamilyId, ProfileChange};
use crate::users::export::{export, session_view};
use actix_web::{web, HttpResponse};
use serde_json::json;
use std::time::Instant;

const MAX_NICKNAME_CHARS: usize = 32;
pub const MAX_AVATAR_URL_BYTES: usize = 1024;

/// GET /api/weixin/sessions/: the live sessions, oldest first.
pub async fn sessions(
    session: AuthenticatedSession,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let now = crate::clock::now_unix();
    let mut families = state.reads.model.families(session.user.id).await?;
    families.retain(|family| family.is_live(session.user.token_stamp, now));
    families.sort_by_key(|family| family.created_ms);
    let sessions: Vec<_> = families
        .iter()
        .map(|family| session_view(family, session.family))
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "sessions": sessions })))
}

/// DELETE /api/weixin/sessions/{id}/: ends one live session of this user.
pub async fn end_session(
    Authenticated(user): Authenticated,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let family = FamilyId::from_hex(&id).ok_or(ApiError::SessionNotFound)?;
    let revoked = state
        .issuer
        .send(RevokeFamily {
            user_id: user.id,
            family,
        })
        .timeout(super::ACTOR_TIMEOUT)
        .await??;
    if !revoked {
        return Err(ApiError::SessionNotFound);
    }
    Ok(HttpResponse::Ok().json(json!({ "code": "success" })))
}

/// POST /api/weixin/sessions/logout-all/: ends every session, this one included.
pub async fn logout_all(
    Authenticated(user): Authenticated,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let ended = state
        .issuer
        .send(RevokeAllFamilies { user_id: user.id })
        .timeout(super::ACTOR_TIMEOUT)
        .await??;
    Ok(HttpResponse::Ok().json(json!({ "code": "success", "sessions_ended": ended })))
}

/// GET /api/weixin/user/export/.
pub async fn export_user(
    Authenticated(user): Authenticated,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let families = state.reads.model.families(user.id).await?;
    Ok(HttpResponse::Ok().json(export(&user, &families, crate::clock::now_unix())))
}

/// `nickname`: 1 to 32 Unicode characters, none a control character.
fn valid_nickname(text: &str) -> Result<String, ApiError> {
    let chars = text.chars().count();
    if chars == 0 || chars > MAX_NICKNAME_CHARS || text.chars().any(char::is_control) {
        return Err(ApiError::InvalidRequest(
            "The field `nickname` must be 1 to 32 characters, without control characters.".into(),
        ));
    }
    Ok(text.to_string())
}

/// `avatar_url`: `https://host/…`, printable ASCII without spaces, at most 1024 bytes.
fn valid_avatar_url(text: &str) -> Result<String, ApiError> {
    let host = text
        .strip_prefix("https://")
        .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or(""));
    let printable = text.bytes().all(|b| (0x21..=0x7e).contains(&b));
    match host {
        Some(host) if !host.is_empty() && printable && text.len() <= MAX_AVATAR_URL_BYTES => {
            Ok(text.to_string())
        }
        _ => Err(ApiError::InvalidRequest(
            "The field `avatar_url` must be an https:// URL of at most 1024 printable ASCII characters."
                .into(),
        )),
    }
}

/// PATCH /api/weixin/user/: `nickname`, `avatar_url` (at least one).
pub async fn update_user(
    Authenticated(user): Authenticated,
    state: web::Data<AppState>,
    fields: Fields,
) -> Result<HttpResponse, ApiError> {
    let change = ProfileChange {
        nickname: fields
            .optional_str_not_null("nickname")?
            .map(valid_nickname)
            .transpose()?,
        avatar_url: fields
            .optional_str_not_null("avatar_url")?
            .map(valid_avatar_url)
            .transpose()?,
    };
    if change.nickname.is_none() && change.avatar_url.is_none() {
        return Err(ApiError::InvalidRequest(
            "Give `nickname`, `avatar_url` or both.".into(),
        ));
    }
    let user = state
        .registry
        .send(SetProfile {
            user_id: user.id,
            change,
        })
        .timeout(super::ACTOR_TIMEOUT)
        .await??
        .ok_or(AuthError::UserNotFound)?;
    Ok(HttpResponse::Ok().json(json!({
        "code": "success",
        "user": {
            "id": user.id,
            "nickname": user.nickname,
            "avatar_url": user.avatar_url,
        },
    })))
}

/// DELETE /api/weixin/user/ with `{"code": "<fresh wx.login code>"}`: the code
/// must resolve, through the login's own WeChat exchange, to this account's openid
/// (a stolen access token alone deletes nothing).
pub async fn delete_user(
    Authenticated(user): Authenticated,
    state: web::Data<AppState>,
    fields: Fields,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let code = super::login::wechat_code(&fields)?;
    let session = state
        .wechat
        .code2session(Code2Session {
            appid: user.appid.clone(),
            code: code.to_string(),
            started,
            span: tracing::Span::current(),
        })
        .answer()
        .await?;
    if session.openid != user.openid {
        tracing::warn!(
            user_id = user.id,
            "account deletion refused: another user's code"
        );
        return Err(ApiError::CodeMismatch);
    }
    let deletion = state
        .registry
        .send(DeleteUser {
            user_id: user.id,
            at_once: false,
        })
        .timeout(super::ACTOR_TIMEOUT)
        .await??
        .ok_or(AuthError::UserNotFound)?;
    Ok(match deletion {
        Deletion::Scheduled { due, .. } => {
            tracing::info!(user_id = user.id, "account marked for deletion");
            HttpResponse::Accepted().json(json!({
                "code": "deletion_scheduled",
                "deletion_scheduled_at": rfc3339(due),
            }))
        }
        Deletion::Erased { .. } => {
            tracing::info!(user_id = user.id, "account erased");
            HttpResponse::Ok().json(json!({ "code": "deleted" }))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nicknames_and_avatar_urls() {
        assert!(valid_nickname("微信用户").is_ok());
        assert!(valid_nickname(&"字".repeat(32)).is_ok());
        assert!(valid_nickname(&"字".repeat(33)).is_err());
        assert!(valid_nickname("").is_err());
        assert!(valid_nickname("a\u{7}b").is_err());
        assert!(valid_avatar_url("https://thirdwx.qlogo.cn/mmopen/vi_32/x/132").is_ok());
        assert!(valid_avatar_url("http://thirdwx.qlogo.cn/x").is_err());
        assert!(valid_avatar_url("https:///x").is_err());
        assert!(valid_avatar_url("https://a.cn/x y").is_err());
        assert!(valid_avatar_url(&format!("https://a.cn/{}", "x".repeat(1020))).is_err());
    }
}
