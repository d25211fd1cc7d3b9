//! Issuing: signing refresh tokens and queuing the records that make them count.
//!
//! Two owners write here, each in its own batch:
//! - the user registry starts a login's family ([`start_family`]) in the same batch
//!   as the user's own writes, so a login is one durable batch. A new family cannot
//!   race anything: its id and its token's jti are fresh random values.
//! - the token issuer adds a token to an existing family at every rotation
//!   ([`add_refresh`]); every change to an existing record is its alone.

use super::records::{self, Family, RefreshRecord};
use super::{JwtKeys, Signed, TokenType};
use crate::storage::{Tree, WriteBatch};
use crate::users::UserId;

/// A login's tokens.
pub struct TokenPair {
    pub access: Signed,
    pub refresh: Signed,
}

/// Signs a refresh token into `family` and queues its record in `batch`.
pub fn add_refresh(
    keys: &JwtKeys,
    batch: &mut WriteBatch,
    family_id: &str,
    family: &mut Family,
    user_id: UserId,
    stamp: u64,
    now: i64,
) -> Signed {
    let refresh = keys.sign(TokenType::Refresh, user_id, stamp, now);
    let record = RefreshRecord {
        family: family_id.to_string(),
        user_id,
        exp: refresh.claims.exp,
        rotated_at_ms: None,
    };
    batch.put(
        Tree::RefreshTokens,
        refresh.claims.jti.as_bytes(),
        records::encode(&record),
    );
    family.current = refresh.claims.jti.clone();
    family.exp = family.exp.max(refresh.claims.exp);
    refresh
}

/// A new login family for `user_id` (`stamp`: the user's token stamp, read in the
/// same actor turn): its first refresh token and an access token, with the family's
/// and the token's records queued in `batch`.
pub fn start_family(
    keys: &JwtKeys,
    batch: &mut WriteBatch,
    user_id: UserId,
    stamp: u64,
    now: i64,
) -> TokenPair {
    let family_id = crate::random_hex(16);
    let mut family = Family {
        user_id,
        created_at: now,
        exp: now,
        current: String::new(),
        revoked_at: None,
    };
    let refresh = add_refresh(keys, batch, &family_id, &mut family, user_id, stamp, now);
    batch.put(
        Tree::TokenFamilies,
        family_id.as_bytes(),
        records::encode(&family),
    );
    let access = keys.sign(TokenType::Access, user_id, stamp, now);
    TokenPair { access, refresh }
}
