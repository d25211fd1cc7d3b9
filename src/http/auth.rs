//! The access-token extractor: the per-request hot path.
//!
//! It asks the one token check ([`crate::tokens::check`]) with the shared, immutable
//! keys, the shared read handle and the registry's cache of decoded users: no actor,
//! no queue, and (once the user is cached) no storage read; on a miss the worker
//! awaits the store's read instead of blocking on it.
//! Its refusals match simplejwt 5.5's `JWTAuthentication` for the same input.

use super::AppState;
use crate::http::error::{ApiError, AuthError};
use crate::tokens::check::{self, Accept, CheckError};
use crate::tokens::TokenError;
use crate::users::User;
use actix_web::dev::Payload;
use actix_web::{http::header, web, FromRequest, HttpRequest};
use futures_util::future::{Either, LocalBoxFuture};
use std::future::{ready, Ready};
use std::sync::Arc;

/// The user of a valid access token, enabled and existing.
pub struct Authenticated(pub Arc<User>);

/// At once when the user is cached (the data path's common case: no allocation, no
/// wait); else the store's read, awaited.
type Extracted<T> =
    Either<Ready<Result<T, ApiError>>, LocalBoxFuture<'static, Result<T, ApiError>>>;

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = Extracted<Self>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        accept(req, |accepted| Authenticated(accepted.user))
    }
}

/// The user of a valid access token and the session (family) the token names, when
/// it names one (tokens issued before access tokens carried `fam` name none).
pub struct AuthenticatedSession {
    pub user: Arc<User>,
    pub family: Option<crate::storage::model::FamilyId>,
}

impl FromRequest for AuthenticatedSession {
    type Error = ApiError;
    type Future = Extracted<Self>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        accept(req, |accepted| AuthenticatedSession {
            family: accepted
                .claims
                .fam
                .as_deref()
                .and_then(crate::storage::model::FamilyId::from_hex),
            user: accepted.user,
        })
    }
}

fn accept<T: 'static>(
    req: &HttpRequest,
    shape: impl FnOnce(check::Accepted) -> T + 'static,
) -> Extracted<T> {
    let checked = match start_check(req) {
        Ok(checked) => checked,
        Err(e) => return Either::Left(ready(Err(e))),
    };
    match checked.now() {
        Ok(answer) => Either::Left(ready(answered(answer).map(shape))),
        Err(later) => Either::Right(Box::pin(async move { answered(later.await).map(shape) })),
    }
}

fn start_check(req: &HttpRequest) -> Result<check::Checked<check::Accepted>, ApiError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::Internal("AppState is not registered".into()))?;
    single_authorization(req)?;
    let token = bearer_token(req)?;
    Ok(check::check(
        &state.keys,
        &state.reads,
        token,
        Accept::Access,
        crate::clock::now_ms(),
    ))
}

fn answered(answer: Result<check::Accepted, CheckError>) -> Result<check::Accepted, ApiError> {
    match answer {
        Ok(accepted) => Ok(accepted),
        Err(CheckError::Refused(refusal)) => Err(AuthError::from(refusal).into()),
        Err(CheckError::Storage(e)) => Err(e.into()),
    }
}

/// Two or more `Authorization` headers are refused with 400, as nginx refuses them:
/// which one a proxy and a back end each read is anyone's guess.
pub(super) fn single_authorization(req: &HttpRequest) -> Result<(), ApiError> {
    if req
        .headers()
        .get_all(header::AUTHORIZATION)
        .nth(1)
        .is_some()
    {
        return Err(ApiError::InvalidRequest(
            "The request has more than one Authorization header.".into(),
        ));
    }
    Ok(())
}

/// simplejwt's `get_raw_token`: split the header on whitespace; a first word other
/// than `Bearer` means "no credentials", any count but two is a malformed header.
fn bearer_token(req: &HttpRequest) -> Result<&str, AuthError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(AuthError::NotAuthenticated);
    };
    let mut parts = value
        .as_bytes()
        .split(|b| b.is_ascii_whitespace())
        .filter(|p| !p.is_empty());
    if parts.next() != Some(b"Bearer".as_slice()) {
        return Err(AuthError::NotAuthenticated);
    }
    match (parts.next(), parts.next()) {
        (Some(token), None) => {
            std::str::from_utf8(token).map_err(|_| AuthError::TokenNotValid(TokenError::Invalid))
        }
        _ => Err(AuthError::BadAuthorizationHeader),
    }
}

/// For fuzz/ (`bearer`): an `Authorization` header value through [`bearer_token`],
/// then the storage-free steps of the one token check with `keys`.
#[doc(hidden)]
pub fn fuzz_bearer(
    keys: &crate::tokens::JwtKeys,
    authorization: &[u8],
) -> Result<crate::tokens::Claims, AuthError> {
    // Bytes no HTTP parser would accept as a header value never reach us.
    let Ok(value) = header::HeaderValue::from_bytes(authorization) else {
        return Err(AuthError::NotAuthenticated);
    };
    let req = actix_web::test::TestRequest::default()
        .insert_header((header::AUTHORIZATION, value))
        .to_http_request();
    let token = bearer_token(&req)?;
    check::token_claims(keys, token, Accept::Access, crate::clock::now_ms())
        .map_err(AuthError::TokenNotValid)
}
