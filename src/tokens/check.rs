//! The one definition of a token that counts. The access-token extractor,
//! `POST /api/token/verify/`, and the issuer's refresh and logout all ask [`check`],
//! and each maps its typed answer to the status and body its endpoint owes
//! (`src/error.rs`): the rules cannot drift apart between endpoints.
//!
//! In order (the first failing rule answers):
//! 1. the header has no `crit` (RFC 7515 §4.1.11: we implement no extension);
//! 2. the algorithm is the configured one and the signature is right;
//! 3. the claims have their types (`token_type` access/refresh, integer `user_id`...);
//! 4. `iat` and `nbf` are not in the future, `exp` is not past (PyJWT's rules,
//!    in milliseconds, `jwt.leeway` allowed each way);
//! 5. `iss`/`aud` are the configured ones (an `aud` when none is configured is wrong);
//! 6. `sub`, when present, is `user_id` as a string;
//! 7. the type is the one the endpoint takes;
//! 8. the user exists and is enabled;
//! 9. the token carries the user's current token stamp (not revoked by
//!    `wxauth tokens revoke`);
//! 10. a refresh token is one we issued, its family is alive, and it is the family's
//!     current token, or was rotated out at most `jwt.reuse_grace` ago.
//!
//! Steps 1 to 7 need no storage; 8 and 9 are one user read (all the data path
//! does); only refresh tokens read their record and family.

use super::records::{self, Family, RefreshRecord};
use super::{Claims, JwtKeys, TokenError, TokenType};
use crate::storage::{ReadStore, StorageError};
use crate::users::{self, User, UserId};
use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};

/// Which tokens an endpoint takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    Access,
    Refresh,
    /// `/api/token/verify/`: either type, each under its own rules.
    AnyType,
}

/// A token that counts, with what the check read to decide so.
#[derive(Debug)]
pub struct Accepted {
    pub claims: Claims,
    pub user: User,
    /// For a refresh token: where it stands in its family. `None` for access tokens.
    pub refresh: Option<RefreshStanding>,
}

#[derive(Debug)]
pub enum RefreshStanding {
    /// The family's current token.
    Current {
        record: RefreshRecord,
        family: Family,
    },
    /// Rotated out at most `jwt.reuse_grace` ago: a client retrying a refresh whose
    /// answer it lost. Refresh answers it; verify calls it blacklisted.
    InGrace {
        record: RefreshRecord,
        family: Family,
    },
}

/// Why a token does not count.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The token itself: malformed, badly signed, wrong claims, expired, wrong type.
    #[error("{0}")]
    Token(TokenError),
    #[error("the token's user does not exist")]
    UserNotFound,
    #[error("the token's user is disabled")]
    UserInactive,
    /// Issued before the user's last `wxauth tokens revoke`.
    #[error("the token was revoked with its user's tokens")]
    Revoked,
    /// Well signed, but no refresh record has its jti (never issued here, or purged).
    #[error("no such refresh token was issued")]
    NotIssued,
    /// Its family was logged out, revoked as reused, or revoked by the operator.
    #[error("the token's family is revoked")]
    FamilyRevoked,
    /// Rotated out longer than `jwt.reuse_grace` ago (or the grace is off): a reuse.
    /// The issuer revokes the family; the record and family are here for that.
    #[error("a rotated-out refresh token was presented again")]
    Reused {
        record: RefreshRecord,
        family: Family,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Refused(Refusal),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<Refusal> for CheckError {
    fn from(refusal: Refusal) -> Self {
        CheckError::Refused(refusal)
    }
}

impl From<TokenError> for CheckError {
    fn from(e: TokenError) -> Self {
        CheckError::Refused(Refusal::Token(e))
    }
}

/// Is `token` acceptable now (`now_ms`, unix milliseconds) to an endpoint that takes
/// `accept`, and if not, why not. Reads the user, and a refresh token's record and
/// family, through `store`; writes nothing.
pub fn check(
    keys: &JwtKeys,
    store: &dyn ReadStore,
    token: &str,
    accept: Accept,
    now_ms: i64,
) -> Result<Accepted, CheckError> {
    let claims = token_claims(keys, token, accept, now_ms)?;
    let user = users::load(store, claims.user_id)?.ok_or(Refusal::UserNotFound)?;
    if user.disabled {
        return Err(Refusal::UserInactive.into());
    }
    // The stamp is exact by construction. `tokens_not_before` (whole seconds) is only
    // what revokes made before stamps existed left behind; new revokes do not set it.
    if claims.stamp != user.token_stamp || claims.iat < user.tokens_not_before {
        return Err(Refusal::Revoked.into());
    }
    let refresh = match claims.token_type {
        TokenType::Access => None,
        TokenType::Refresh => Some(refresh_standing(keys, store, &claims, now_ms)?),
    };
    Ok(Accepted {
        claims,
        user,
        refresh,
    })
}

/// Steps 1 to 7: the token on its own, no storage. Public for the micro-benchmarks;
/// endpoints call [`check`].
pub fn token_claims(
    keys: &JwtKeys,
    token: &str,
    accept: Accept,
    now_ms: i64,
) -> Result<Claims, TokenError> {
    if header_has_crit(token)? {
        return Err(TokenError::Invalid);
    }
    let claims = keys.decode_signed(token)?;
    let leeway = keys.leeway_ms;
    let in_future = |secs: i64| secs.saturating_mul(1000) > now_ms.saturating_add(leeway);
    if in_future(claims.iat) || claims.nbf.is_some_and(in_future) {
        return Err(TokenError::Invalid);
    }
    if claims.exp.saturating_mul(1000) <= now_ms.saturating_sub(leeway) {
        return Err(TokenError::Expired);
    }
    if let Some(issuer) = &keys.issuer {
        if claims.iss.as_deref() != Some(issuer) {
            return Err(TokenError::Invalid);
        }
    }
    // Like PyJWT: a configured audience must be named, and a token naming an
    // audience is refused when none is configured.
    if claims.aud != keys.audience {
        return Err(TokenError::Invalid);
    }
    if claims
        .sub
        .as_deref()
        .is_some_and(|sub| !names_user(sub, claims.user_id))
    {
        return Err(TokenError::Invalid);
    }
    let type_ok = match accept {
        Accept::Access => claims.token_type == TokenType::Access,
        Accept::Refresh => claims.token_type == TokenType::Refresh,
        Accept::AnyType => true,
    };
    if !type_ok {
        return Err(TokenError::WrongType);
    }
    Ok(claims)
}

/// Step 10, for a refresh token whose claims and user passed.
fn refresh_standing(
    keys: &JwtKeys,
    store: &dyn ReadStore,
    claims: &Claims,
    now_ms: i64,
) -> Result<RefreshStanding, CheckError> {
    let record = match records::load_refresh(store, &claims.jti)? {
        Some(record) if record.user_id == claims.user_id => record,
        _ => return Err(Refusal::NotIssued.into()),
    };
    let family = match records::load_family(store, &record.family)? {
        Some(family) if family.revoked_at.is_none() => family,
        _ => return Err(Refusal::FamilyRevoked.into()),
    };
    Ok(match record.rotated_at_ms {
        None => RefreshStanding::Current { record, family },
        Some(at) if within_grace(at, now_ms, keys.reuse_grace_ms) => {
            RefreshStanding::InGrace { record, family }
        }
        Some(_) => return Err(Refusal::Reused { record, family }.into()),
    })
}

/// A token rotated out at `rotated_at_ms` may still be presented at `now_ms` when the
/// grace is on and has not ended: it ends at exactly `grace_ms` (one millisecond later
/// is a reuse). A grace of 0 is off: any presentation after rotation is a reuse.
pub fn within_grace(rotated_at_ms: i64, now_ms: i64, grace_ms: i64) -> bool {
    grace_ms > 0 && now_ms.saturating_sub(rotated_at_ms) <= grace_ms
}

/// `sub` names `user_id` exactly (`"7"`, not `"07"` or `"+7"`), without allocating.
fn names_user(sub: &str, user_id: UserId) -> bool {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut rest = user_id;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    sub.as_bytes() == &digits[start..]
}

/// Whether the JOSE header (the token's first segment) has a `crit` member, whatever
/// its value. jsonwebtoken's `Header` drops unknown members, so the raw segment is
/// read here: decoded into a stack buffer (our headers are about 60 bytes) and
/// scanned by serde without building a map. An unreadable header is invalid (and
/// never passes as one without `crit`).
fn header_has_crit(token: &str) -> Result<bool, TokenError> {
    use base64::Engine;
    #[derive(Deserialize)]
    struct HeaderProbe {
        #[serde(default)]
        crit: Present,
    }
    let segment = token.split('.').next().unwrap_or_default();
    let engine = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut buf = [0u8; 256];
    let probe: HeaderProbe = match engine.decode_slice(segment, &mut buf) {
        Ok(len) => serde_json::from_slice(&buf[..len]),
        // A header this long is not one of ours; read it the slow way.
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
            let bytes = engine.decode(segment).map_err(|_| TokenError::Invalid)?;
            serde_json::from_slice(&bytes)
        }
        Err(_) => return Err(TokenError::Invalid),
    }
    .map_err(|_| TokenError::Invalid)?;
    Ok(probe.crit.0)
}

/// A member that is there, whatever its value (even `null`).
#[derive(Default)]
struct Present(bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(d)?;
        Ok(Present(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn segment(json: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn the_grace_ends_at_exactly_its_length_and_zero_turns_it_off() {
        assert!(within_grace(1_000, 1_000, 1));
        assert!(within_grace(1_000, 2_000, 1_000));
        assert!(!within_grace(1_000, 2_001, 1_000));
        assert!(!within_grace(1_000, 1_000, 0), "grace 0: refused at once");
        assert!(!within_grace(i64::MIN, i64::MAX, i64::MAX - 1), "no wrap");
    }

    #[test]
    fn sub_must_spell_the_user_id() {
        assert!(names_user("7", 7));
        assert!(names_user("0", 0));
        assert!(names_user("18446744073709551615", u64::MAX));
        for wrong in ["07", "+7", "7 ", "", "8", "seven"] {
            assert!(!names_user(wrong, 7), "{wrong:?}");
        }
    }

    #[test]
    fn any_crit_member_is_found() {
        let token = |header: &str| format!("{}.e30.sig", segment(header));
        assert_eq!(
            header_has_crit(&token(r#"{"alg":"HS256","typ":"JWT"}"#)),
            Ok(false)
        );
        for header in [
            r#"{"alg":"HS256","crit":["exp"],"exp":1}"#,
            r#"{"alg":"HS256","crit":null}"#,
            r#"{"alg":"HS256","cr\u0069t":[]}"#,
        ] {
            assert_eq!(header_has_crit(&token(header)), Ok(true), "{header}");
        }
        let long = format!(
            r#"{{"alg":"HS256","kid":"{}","crit":["x"]}}"#,
            "k".repeat(400)
        );
        assert_eq!(header_has_crit(&token(&long)), Ok(true));
        assert_eq!(
            header_has_crit("!!!.e30.sig"),
            Err(TokenError::Invalid),
            "not base64"
        );
        // serde reads an array as a struct's fields in order: refused either way.
        assert_ne!(header_has_crit(&token("[1]")), Ok(false), "not an object");
    }
}
