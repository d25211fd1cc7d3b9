//! The one definition of a token that counts. The access-token extractor,
//! `POST /api/token/verify/`, and the issuer's refresh and logout all ask [`check`],
//! and each maps its typed answer to the status and body its endpoint owes
//! (`src/http/error.rs`): the rules cannot drift apart between endpoints.
//!
//! In order (the first failing rule answers):
//! 1. the header has no `crit` (RFC 7515 §4.1.11: we implement no extension);
//! 2. the key is the live key the header's `kid` names (an unknown `kid` is
//!    refused), or without a `kid` any live key; `alg` is that key's algorithm
//!    (`jwt.algorithm`, or a previous or rotated key's) and the signature is right;
//! 3. the claims have their types (`token_type` access/refresh, integer `user_id`...);
//! 4. `iat` and `nbf` are not in the future, `exp` is not past (PyJWT's rules,
//!    in milliseconds, `jwt.leeway` allowed each way);
//! 5. `iss`/`aud` are the configured ones (an `aud` when none is configured is wrong);
//! 6. `sub`, when present, is `user_id` as a string;
//! 7. the type is the one the endpoint takes;
//! 8. the user exists and is enabled;
//! 9. the token carries the user's current token stamp (not revoked by
//!    `wxauth tokens revoke`);
//! 10. a refresh token names a family we issued (claims `fam`, `gen`; or, for a token
//!     from before families were one record, its legacy record), the family is
//!     alive, and the token carries its generation, or the one before within
//!     `jwt.reuse_grace` of the last rotation (`storage::model::standing`).
//!
//! Steps 1 to 7 need no storage (the token is parsed once, in `verified_claims`);
//! 8 and 9 read the user from the registry's users cache, the store only on a miss
//! (all the data path does); only refresh tokens read their family. The reads are
//! futures ([`Reads`]): the check answers at once when it read nothing, and is
//! awaited otherwise, never blocking its thread on the database.

use super::{Claims, JwtKeys, TokenError, TokenType};
use crate::storage::model::{self, AuthStore, FamilyId, FamilyRecord, Generation, Standing};
use crate::storage::{ReadStore, StorageError};
use crate::users::cache::{Fetch, UserCache};
use crate::users::{User, UserId};
use jsonwebtoken::Algorithm;
use serde::de::{IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

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
    /// Shared with the users cache.
    pub user: Arc<User>,
    /// For a refresh token: where it stands in its family. `None` for access tokens.
    pub refresh: Option<RefreshStanding>,
}

#[derive(Debug)]
pub enum RefreshStanding {
    /// It carries its family's generation.
    Current { family: FamilyRecord },
    /// One generation behind, within `jwt.reuse_grace` of the rotation: a client
    /// retrying a refresh whose answer it lost. Refresh answers it; verify calls it
    /// blacklisted.
    InGrace { family: FamilyRecord },
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
    /// Well signed, but it names no family we have (never issued here, or purged).
    #[error("no such refresh token was issued")]
    NotIssued,
    /// Its family was logged out, revoked as reused, or revoked by the operator.
    #[error("the token's family is revoked")]
    FamilyRevoked,
    /// Rotated out longer than `jwt.reuse_grace` ago (or the grace is off), or more
    /// than one generation behind: a reuse. The family is (or is to be) revoked.
    #[error("a rotated-out refresh token was presented again")]
    Reused { user_id: UserId, family: FamilyId },
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

/// What the check reads, and from where. A user comes from the users cache, or on a
/// miss from the store's [`AuthStore::user`]; a refresh token's family from the
/// store's [`AuthStore::family`]. Both are futures the caller awaits: with
/// PostgreSQL they run on the store's own runtime, so no HTTP worker and no actor
/// thread waits for the database; with sled they are ready at once. Only a refresh
/// token from before families (claims without `fam`/`gen`) reads its legacy record
/// through `store`, synchronously.
#[derive(Clone)]
pub struct Reads {
    pub model: Arc<dyn AuthStore>,
    pub store: Arc<dyn ReadStore>,
    pub users: Arc<UserCache>,
}

/// The check's answer: at once when nothing had to be read (a refusal from the
/// token alone, or an access token whose user is cached), else a future. Await it
/// either way; [`Checked::now`] takes an answer that needed no read.
pub enum Checked<T> {
    Now(Option<Result<T, CheckError>>),
    Later(Pin<Box<dyn Future<Output = Result<T, CheckError>> + Send>>),
}

impl<T> Checked<T> {
    fn ready(result: Result<T, CheckError>) -> Self {
        Checked::Now(Some(result))
    }

    fn later(work: impl Future<Output = Result<T, CheckError>> + Send + 'static) -> Self {
        Checked::Later(Box::pin(work))
    }

    /// The answer, when it needed no read; `Err(self)` when it must be awaited.
    pub fn now(self) -> Result<Result<T, CheckError>, Self> {
        match self {
            Checked::Now(Some(result)) => Ok(result),
            other => Err(other),
        }
    }
}

impl<T: Unpin> Future for Checked<T> {
    type Output = Result<T, CheckError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Checked::Now(result) => Poll::Ready(result.take().expect("polled after it was ready")),
            Checked::Later(work) => work.as_mut().poll(cx),
        }
    }
}

/// Is `token` acceptable now (`now_ms`, unix milliseconds) to an endpoint that takes
/// `accept`, and if not, why not. Reads the user through the cache (the store on a
/// miss), and a refresh token's family from the store; writes nothing.
pub fn check(
    keys: &JwtKeys,
    reads: &Reads,
    token: &str,
    accept: Accept,
    now_ms: i64,
) -> Checked<Accepted> {
    let grace_ms = keys.reuse_grace_ms;
    let user = match check_user(keys, reads, token, accept, now_ms).now() {
        Ok(Err(e)) => return Checked::ready(Err(e)),
        Ok(Ok((claims, user))) if claims.token_type == TokenType::Access => {
            return Checked::ready(Ok(Accepted {
                claims,
                user,
                refresh: None,
            }))
        }
        Ok(Ok(checked)) => Checked::ready(Ok(checked)),
        Err(later) => later,
    };
    let reads = reads.clone();
    Checked::later(async move {
        let (claims, user) = user.await?;
        let refresh = match claims.token_type {
            TokenType::Access => None,
            TokenType::Refresh => Some(refresh_standing(&reads, &claims, now_ms, grace_ms).await?),
        };
        Ok(Accepted {
            claims,
            user,
            refresh,
        })
    })
}

/// Steps 1 to 9: the token, its user and the user's token stamp; not the family.
/// The issuer's refresh calls this, then lets the store decide the family's step
/// (`storage::model::AuthStore::rotate`).
pub fn check_user(
    keys: &JwtKeys,
    reads: &Reads,
    token: &str,
    accept: Accept,
    now_ms: i64,
) -> Checked<(Claims, Arc<User>)> {
    let claims = match token_claims(keys, token, accept, now_ms) {
        Ok(claims) => claims,
        Err(e) => return Checked::ready(Err(e.into())),
    };
    match reads.users.fetch(reads.model.as_ref(), claims.user_id) {
        Fetch::Hit(user) => Checked::ready(user_counts(&claims, &user).map(|()| (claims, user))),
        Fetch::Read(read) => Checked::later(async move {
            let user = read.await?.ok_or(Refusal::UserNotFound)?;
            user_counts(&claims, &user)?;
            Ok((claims, user))
        }),
    }
}

/// Steps 8 and 9 on the user as read.
fn user_counts(claims: &Claims, user: &User) -> Result<(), CheckError> {
    // An erased account is no account: its record only keeps the id taken.
    if user.erased_at.is_some() {
        return Err(Refusal::UserNotFound.into());
    }
    if user.disabled {
        return Err(Refusal::UserInactive.into());
    }
    // The stamp is exact by construction. `tokens_not_before` (whole seconds) is only
    // what revokes made before stamps existed left behind; new revokes do not set it.
    if claims.stamp != user.token_stamp || claims.iat < user.tokens_not_before {
        return Err(Refusal::Revoked.into());
    }
    Ok(())
}

/// The family and generation a refresh token carries: its claims `fam` and `gen`,
/// or, for a token from before them, what its legacy record says
/// (`storage::upgrade::legacy_refresh`). A token with one claim and not the other,
/// or a malformed `fam`, is invalid.
pub fn refresh_family(
    store: &dyn ReadStore,
    claims: &Claims,
) -> Result<(FamilyId, Generation), CheckError> {
    match (&claims.fam, claims.gen) {
        (Some(fam), Some(gen)) => FamilyId::from_hex(fam)
            .map(|family| (family, gen))
            .ok_or_else(|| TokenError::Invalid.into()),
        (None, None) => {
            crate::storage::upgrade::legacy_refresh(store, &claims.jti, claims.user_id)?
                .ok_or_else(|| Refusal::NotIssued.into())
        }
        _ => Err(TokenError::Invalid.into()),
    }
}

/// Steps 1 to 7: the token on its own, no storage. Public for the micro-benchmarks;
/// endpoints call [`check`].
pub fn token_claims(
    keys: &JwtKeys,
    token: &str,
    accept: Accept,
    now_ms: i64,
) -> Result<Claims, TokenError> {
    let claims = verified_claims(keys, token)?;
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
async fn refresh_standing(
    reads: &Reads,
    claims: &Claims,
    now_ms: i64,
    grace_ms: i64,
) -> Result<RefreshStanding, CheckError> {
    let (id, generation) = refresh_family(reads.store.as_ref(), claims)?;
    let family = reads
        .model
        .family(claims.user_id, id)
        .await?
        .ok_or(Refusal::NotIssued)?;
    Ok(
        match model::standing(&family, generation, now_ms, grace_ms) {
            Standing::Current => RefreshStanding::Current { family },
            Standing::InGrace => RefreshStanding::InGrace { family },
            Standing::Reused => {
                return Err(Refusal::Reused {
                    user_id: claims.user_id,
                    family: id,
                }
                .into())
            }
            Standing::Revoked => return Err(Refusal::FamilyRevoked.into()),
            Standing::Ahead => return Err(TokenError::Invalid.into()),
        },
    )
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

/// Steps 1 and 2, and the claims' types: the token is split once, its header and
/// its payload are each decoded once (into stack buffers: ours are about 60 and 200
/// bytes), the signature is checked by jsonwebtoken's own `crypto::verify`, and the
/// claims are deserialized once. The key is chosen as ever: the one live key, or
/// the header's `kid`, or else every live key of the header's algorithm.
pub(super) fn verified_claims(keys: &JwtKeys, token: &str) -> Result<Claims, TokenError> {
    let mut segments = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(TokenError::Invalid);
    };
    // What the signature covers: `header.payload`.
    let message = &token[..header.len() + 1 + payload.len()];

    let mut header_buf = [0u8; 256];
    let header_json = decode_segment(header, &mut header_buf)?;
    let header = JoseHeader::parse(&header_json)?;
    if header.crit.0 {
        return Err(TokenError::Invalid);
    }
    let kid = header.kid.as_ref().map(|kid| kid.0.as_ref());
    keys.verify_signature(header.alg, kid, message, signature)?;

    let mut payload_buf = [0u8; 512];
    let claims_json = decode_segment(payload, &mut payload_buf)?;
    // PyJWT: "Invalid payload string: must be a json object".
    if !is_json_object(&claims_json) {
        return Err(TokenError::Invalid);
    }
    serde_json::from_slice(&claims_json).map_err(|_| TokenError::Invalid)
}

/// A segment's base64url (unpadded, as jsonwebtoken reads it) decoded into `buf`,
/// or onto the heap when it does not fit.
fn decode_segment<'b>(segment: &str, buf: &'b mut [u8]) -> Result<Cow<'b, [u8]>, TokenError> {
    use base64::Engine;
    let engine = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    match engine.decode_slice(segment, buf) {
        Ok(len) => Ok(Cow::Borrowed(&buf[..len])),
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => engine
            .decode(segment)
            .map(Cow::Owned)
            .map_err(|_| TokenError::Invalid),
        Err(_) => Err(TokenError::Invalid),
    }
}

/// serde reads a JSON array as a struct's fields in order: only an object is a
/// header or a claims set.
fn is_json_object(json: &[u8]) -> bool {
    json.iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|&b| b == b'{')
}

/// The JOSE header, read once. It takes exactly what jsonwebtoken's `Header` takes
/// (the same members, of the same types: a header it refuses is refused here), plus
/// `crit`, which `Header` drops: RFC 7515 §4.1.11, we implement no extension, so a
/// header that has one, whatever its value, is refused. Only `alg` and `kid` are kept.
#[derive(Deserialize)]
struct JoseHeader<'a> {
    #[serde(rename = "typ")]
    _typ: Option<AnyString>,
    alg: Algorithm,
    #[serde(rename = "cty")]
    _cty: Option<AnyString>,
    #[serde(rename = "jku")]
    _jku: Option<AnyString>,
    #[serde(rename = "jwk")]
    _jwk: Option<jsonwebtoken::jwk::Jwk>,
    #[serde(borrow)]
    kid: Option<Text<'a>>,
    #[serde(rename = "x5u")]
    _x5u: Option<AnyString>,
    #[serde(rename = "x5c")]
    _x5c: Option<Vec<AnyString>>,
    #[serde(rename = "x5t")]
    _x5t: Option<AnyString>,
    #[serde(rename = "x5t#S256")]
    _x5t_s256: Option<AnyString>,
    #[serde(default)]
    crit: Present,
}

impl<'a> JoseHeader<'a> {
    fn parse(json: &'a [u8]) -> Result<Self, TokenError> {
        if !is_json_object(json) {
            return Err(TokenError::Invalid);
        }
        serde_json::from_slice(json).map_err(|_| TokenError::Invalid)
    }
}

/// A member that must be a string (as `Header` has it), read without keeping it.
struct AnyString;

impl<'de> Deserialize<'de> for AnyString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Expect;
        impl Visitor<'_> for Expect {
            type Value = AnyString;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, _: &str) -> Result<AnyString, E> {
                Ok(AnyString)
            }
        }
        d.deserialize_string(Expect)
    }
}

/// A string member kept as it is in the JSON when it has no escapes (no copy).
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Expect<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Expect<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(text)))
            }
            fn visit_str<E>(self, text: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(text.to_string())))
            }
        }
        d.deserialize_string(Expect(std::marker::PhantomData))
    }
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
    fn sub_must_spell_the_user_id() {
        assert!(names_user("7", 7));
        assert!(names_user("0", 0));
        assert!(names_user("18446744073709551615", u64::MAX));
        for wrong in ["07", "+7", "7 ", "", "8", "seven"] {
            assert!(!names_user(wrong, 7), "{wrong:?}");
        }
    }

    /// `Some(has crit)` for a header jsonwebtoken's `Header` would take, else `None`.
    fn crit(header: &str) -> Option<bool> {
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(segment(header))
            .unwrap();
        JoseHeader::parse(&json).ok().map(|h| h.crit.0)
    }

    #[test]
    fn any_crit_member_is_found() {
        assert_eq!(crit(r#"{"alg":"HS256","typ":"JWT"}"#), Some(false));
        for header in [
            r#"{"alg":"HS256","crit":["exp"],"exp":1}"#,
            r#"{"alg":"HS256","crit":null}"#,
            r#"{"alg":"HS256","cr\u0069t":[]}"#,
        ] {
            assert_eq!(crit(header), Some(true), "{header}");
        }
        let long = format!(
            r#"{{"alg":"HS256","kid":"{}","crit":["x"]}}"#,
            "k".repeat(400)
        );
        assert_eq!(crit(&long), Some(true));
        // serde reads an array as a struct's fields in order: refused.
        assert_eq!(
            crit(r#"["JWT","HS256",null,null,null,null,null,null,null,null,[]]"#),
            None
        );
        assert_eq!(crit("[]"), None);
    }

    #[test]
    fn the_header_takes_what_jsonwebtoken_takes() {
        for header in [
            r#"{"alg":"HS256"}"#,
            r#"{"alg":"HS256","typ":"JWT","kid":"k\u0031","cty":"x","x5t#S256":"x","x5c":["a"]}"#,
            r#" {"alg":"HS256","unknown":{"nested":[1]}} "#,
        ] {
            assert_eq!(crit(header), Some(false), "{header}");
            let json = segment(header);
            let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(json)
                .unwrap();
            assert!(serde_json::from_slice::<jsonwebtoken::Header>(&json).is_ok());
        }
        for header in [
            r#"{"typ":"JWT"}"#,
            r#"{"alg":"none"}"#,
            r#"{"alg":"HS256","typ":5}"#,
            r#"{"alg":"HS256","kid":null,"kid":"a"}"#,
            r#"{"alg":"HS256","x5c":"a"}"#,
            r#"{"alg":"HS256","jwk":{}}"#,
            r#""HS256""#,
        ] {
            assert_eq!(crit(header), None, "{header}");
            let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(segment(header))
                .unwrap();
            assert!(
                serde_json::from_slice::<jsonwebtoken::Header>(&json).is_err()
                    || header.starts_with('['),
                "{header}"
            );
        }
        assert_eq!(
            kid_of(r#"{"alg":"HS256","kid":"k\u0031"}"#),
            Some("k1".into())
        );
        assert_eq!(
            kid_of(r#"{"alg":"HS256","kid":"plain"}"#),
            Some("plain".into())
        );
    }

    fn kid_of(header: &str) -> Option<String> {
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(segment(header))
            .unwrap();
        let header = JoseHeader::parse(&json).unwrap();
        header.kid.map(|kid| kid.0.into_owned())
    }

    #[test]
    fn a_token_is_three_segments_of_base64url() {
        let dir = tempfile::tempdir().unwrap();
        let keys = JwtKeys::load(&crate::config::JwtConfig::default(), dir.path()).unwrap();
        let good = keys
            .sign(TokenType::Access, 7, 0, crate::clock::now_ms() / 1000)
            .token;
        assert!(verified_claims(&keys, &good).is_ok());
        let mut parts = good.split('.');
        let (h, p, s) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        for bad in [
            format!("{h}.{p}"),
            format!("{h}.{p}.{s}."),
            format!("{h}.{p}.{s}.{s}"),
            format!("{h}=.{p}.{s}"),
            format!("{h}.{p}=.{s}"),
            format!("{h}.{p}.x{s}"),
        ] {
            assert_eq!(
                verified_claims(&keys, &bad).err(),
                Some(TokenError::Invalid),
                "{bad}"
            );
        }
        // Claims as an array, correctly signed: not a claims set (PyJWT refuses it;
        // serde alone would read it as the fields in order).
        let secret = std::fs::read(dir.path().join(super::super::GENERATED_KEY_FILE)).unwrap();
        let exp = crate::clock::now_ms() / 1000 + 60;
        let array = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!(["access", exp, exp - 60, "jti", 7]),
            &jsonwebtoken::EncodingKey::from_secret(&secret),
        )
        .unwrap();
        assert_eq!(
            verified_claims(&keys, &array).err(),
            Some(TokenError::Invalid)
        );
    }
}
