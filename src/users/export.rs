//! What wxauth holds on one user, as `GET /api/weixin/user/export/` and
//! `wxauth users export ID` answer it: everything personal, nothing secret (never
//! the session key, never a token).

use super::User;
use crate::clock::rfc3339;
use crate::storage::model::{FamilyId, FamilyRecord};
use serde_json::{json, Value};

/// One live session (a login's family) as the API shows it; `current` when the
/// request's access token names it.
pub fn session_view(family: &FamilyRecord, current: Option<FamilyId>) -> Value {
    json!({
        "id": family.id.to_hex(),
        "created_at": rfc3339(family.created_ms.div_euclid(1000)),
        "last_refreshed_at": rfc3339(family.rotated_ms.div_euclid(1000)),
        "expires_at": rfc3339(family.exp),
        "current": current == Some(family.id),
    })
}

/// The export: the user record's personal fields and timestamps, the phone, the
/// profile, the deletion mark, and every session still stored (live or not).
pub fn export(user: &User, families: &[FamilyRecord], now: i64) -> Value {
    let sessions: Vec<Value> = families
        .iter()
        .map(|family| {
            json!({
                "id": family.id.to_hex(),
                "created_at": rfc3339(family.created_ms.div_euclid(1000)),
                "last_refreshed_at": rfc3339(family.rotated_ms.div_euclid(1000)),
                "expires_at": rfc3339(family.exp),
                "revoked_at": family.revoked_ms.map(|ms| rfc3339(ms.div_euclid(1000))),
                "live": family.is_live(user.token_stamp, now),
            })
        })
        .collect();
    json!({
        "user": {
            "id": user.id,
            "appid": user.appid,
            "openid": (!user.openid.is_empty()).then_some(&user.openid),
            "unionid": user.unionid,
            "created_at": rfc3339(user.created_at),
            "last_login_at": rfc3339(user.last_login_at),
            "disabled": user.disabled,
            "nickname": user.nickname,
            "avatar_url": user.avatar_url,
            "phone_number": user.phone.as_ref().map(|p| &p.phone_number),
            "pure_phone_number": user.phone.as_ref().map(|p| &p.pure_phone_number),
            "country_code": user.phone.as_ref().map(|p| &p.country_code),
            "deletion_scheduled_at": user.deletion_due.map(rfc3339),
            "erased_at": user.erased_at.map(rfc3339),
        },
        "sessions": sessions,
        "exported_at": rfc3339(now),
    })
}
