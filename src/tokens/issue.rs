//! Issuing: the pair a login or a rotation answers. The store says which family
//! and generation (`storage::model`); the tokens are signed here.

use super::{JwtKeys, Signed};
use crate::storage::model::FamilyRecord;
use crate::users::User;

/// A login's tokens.
pub struct TokenPair {
    pub access: Signed,
    pub refresh: Signed,
}

/// An access token and a refresh token of `family` at its generation, for `user`
/// (carrying its token stamp as read with the family), issued at `now`.
pub fn pair(keys: &JwtKeys, user: &User, family: &FamilyRecord, now: i64) -> TokenPair {
    TokenPair {
        access: keys.sign_access(user.id, user.token_stamp, Some(family.id), now),
        refresh: keys.sign_refresh(user.id, user.token_stamp, family.id, family.generation, now),
    }
}
