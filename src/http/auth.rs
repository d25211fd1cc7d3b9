//! The access-token extractor: the per-request hot path.
//!
//! It verifies with the shared, immutable [`JwtKeys`](crate::tokens::JwtKeys) and
//! reads the user through the shared read handle: no actor, no queue, no lock.
//! Its refusals match simplejwt 5.5's `JWTAuthentication` for the same input.

use super::AppState;
use crate::error::{ApiError, AuthError};
use crate::tokens::{TokenError, TokenType};
use crate::users::{self, User};
use actix_web::dev::Payload;
use actix_web::{http::header, web, FromRequest, HttpRequest};
use std::future::{ready, Ready};

/// The user of a valid access token, enabled and existing.
pub struct Authenticated(pub User);

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

fn authenticate(req: &HttpRequest) -> Result<Authenticated, ApiError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::Internal("AppState is not registered".into()))?;
    let token = bearer_token(req)?;
    let claims = state
        .keys
        .verify(token, TokenType::Access)
        .map_err(AuthError::TokenNotValid)?;
    let user =
        users::load(state.reader.as_ref(), claims.user_id)?.ok_or(AuthError::UserNotFound)?;
    if user.disabled {
        return Err(AuthError::UserInactive.into());
    }
    if claims.iat < user.tokens_not_before {
        // Revoked by "revoke all": simplejwt has no message for it, so "invalid".
        return Err(AuthError::TokenNotValid(TokenError::Invalid).into());
    }
    Ok(Authenticated(user))
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
/// then access-token verification with `keys`.
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
    keys.verify(token, TokenType::Access)
        .map_err(AuthError::TokenNotValid)
}
