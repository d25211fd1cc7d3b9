//! JWTs: the claims simplejwt issues, and the key material that signs and checks them.
//!
//! [`JwtKeys`] is shared by `Arc`: the access-token extractor verifies with it on
//! every request without going through an actor. Its key set ([`keys`]) is swapped
//! whole by `wxauth keys rotate`, `activate` and `retire`, which a running server
//! serves itself.
//! Whether a presented token counts is decided in one place, [`check`].

pub mod check;
pub mod issue;
pub mod keys;

use crate::clock::now_ms;
use crate::config::{ConfigError, JwtConfig, SigningAlgorithm};
use crate::secret::Secret;
use crate::users::UserId;
use jsonwebtoken::Algorithm;
use keys::{Key, KeyOrigin, KeySet, Ring, RingKey, KEYRING_FILE};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// File (in the data directory) holding the generated HMAC key.
pub const GENERATED_KEY_FILE: &str = "jwt_signing_key";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    Access,
    Refresh,
}

impl TokenType {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenType::Access => "access",
            TokenType::Refresh => "refresh",
        }
    }
}

/// simplejwt's claims, plus `sub` and `stamp`, and `iss`/`aud` when configured.
/// An unknown `token_type` does not deserialize: the token is invalid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub token_type: TokenType,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    pub user_id: UserId,
    /// The user id as a string. simplejwt's own tokens have none, so it is optional
    /// when read; when present it must name `user_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The user's token stamp when the token was issued: `wxauth tokens revoke` bumps
    /// the user's stamp, and a token whose stamp differs is refused. Tokens from before
    /// stamps existed have none, which counts as 0 (a user's stamp until a revoke).
    #[serde(default)]
    pub stamp: u64,
    /// Refresh tokens: the family (one login) the token belongs to, as 32 hex
    /// characters (`storage::model::FamilyId`). Refresh tokens from before families
    /// were records of their own have none: their `jti` names a legacy record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fam: Option<String>,
    /// Refresh tokens: the family's generation when the token was issued. A refresh
    /// is a compare-and-swap of this against the family's (`storage::model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen: Option<u64>,
    /// Never issued by us; honoured (PyJWT's rule) when someone else's token has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// Why a token was refused, with simplejwt's message for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("Token is invalid")]
    Invalid,
    #[error("Token is expired")]
    Expired,
    #[error("Token has wrong type")]
    WrongType,
    #[error("Token is blacklisted")]
    Blacklisted,
}

/// A freshly signed token and its claims.
pub struct Signed {
    pub token: String,
    pub claims: Claims,
}

pub struct JwtKeys {
    /// Swapped whole by a rotation or retirement; readers clone the `Arc` and never
    /// wait for a rotation's file writes.
    set: RwLock<Arc<KeySet>>,
    /// Serializes rotations and retirements (the key ring's read, change, write).
    ring_writes: Mutex<()>,
    config: JwtConfig,
    algorithm: Algorithm,
    data_dir: PathBuf,
    issuer: Option<String>,
    audience: Option<String>,
    /// Lifetimes in seconds (claims are whole seconds; config bounds them to 10 years).
    pub access_ttl: i64,
    pub refresh_ttl: i64,
    /// Clock skew allowed on `exp`, `iat` and `nbf`, in milliseconds.
    pub leeway_ms: i64,
    /// How long a rotated-out refresh token may be presented again (a retry), in
    /// milliseconds; 0 turns the grace off.
    pub reuse_grace_ms: i64,
    /// `jwt.jwks_max_age`: how long others may cache the JWKS, and so how long a
    /// rotated-in key is published before it signs, in milliseconds.
    jwks_max_age_ms: i64,
}

/// Why `wxauth keys rotate` or `retire` refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The kid asked for is not echoed: it is whatever was typed or pasted.
    #[error("no live key has that kid (`wxauth keys list` shows them)")]
    NoSuchKey,
    #[error(
        "key {0} signs new tokens: rotate, wait until the new key signs (or \
         `wxauth keys activate` it), then retire it"
    )]
    Signing(String),
    #[error(
        "key {0} was not made by `wxauth keys rotate` for jwt.algorithm, or is older than \
         the key that signs: only a rotated-in key that waits can be activated"
    )]
    NotWaiting(String),
    #[error(
        "ring cannot generate RSA keys: make one with \
         `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048` and pass it with --key-file"
    )]
    CannotGenerate,
    #[error("key {0} is already in the key set, or was retired")]
    Duplicate(String),
    #[error("{0}")]
    Unusable(String),
}

impl JwtKeys {
    /// Loads the configured keys, the generated one from `data_dir` (creating it,
    /// 256 random bits, mode 0600, on first start when no key file is configured),
    /// and the key ring.
    pub fn load(cfg: &JwtConfig, data_dir: &Path) -> Result<Self, ConfigError> {
        let algorithm = parse_algorithm(cfg)?;
        let ring = Ring::read(data_dir).map_err(|reason| ConfigError {
            key: "storage.path".into(),
            reason,
        })?;
        let set = build_set(cfg, algorithm, data_dir, &ring)?;
        let millis = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let secs = |d: std::time::Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        Ok(JwtKeys {
            set: RwLock::new(Arc::new(set)),
            ring_writes: Mutex::new(()),
            config: cfg.clone(),
            algorithm,
            data_dir: data_dir.to_path_buf(),
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            access_ttl: secs(cfg.access_ttl),
            refresh_ttl: secs(cfg.refresh_ttl),
            leeway_ms: millis(cfg.leeway),
            reuse_grace_ms: millis(cfg.reuse_grace),
            jwks_max_age_ms: millis(cfg.jwks_max_age),
        })
    }

    /// For `check-config`: loads configured key files without touching the data
    /// directory (a generated key needs no checking).
    pub fn check(cfg: &JwtConfig) -> Result<(), ConfigError> {
        let algorithm = parse_algorithm(cfg)?;
        if let Some(path) = &cfg.signing_key_file {
            let material = crate::config::read_secret_file("jwt.signing_key_file", path)?;
            Key::from_material(
                algorithm,
                material.expose().as_bytes(),
                KeyOrigin::Configured,
                None,
            )
            .map_err(|reason| ConfigError::new("jwt.signing_key_file", reason))?;
        }
        previous_keys(cfg, algorithm)?;
        Ok(())
    }

    /// The live key set as of now.
    pub fn current(&self) -> Arc<KeySet> {
        self.set
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The `kid` new tokens carry.
    pub fn kid(&self) -> String {
        self.current().signing().kid.clone()
    }

    /// The JWKS document (RFC 7517) of the live keys, or `None` when the configured
    /// algorithm is HMAC: a symmetric key is never published.
    pub fn jwks(&self) -> Option<Arc<KeySet>> {
        (!keys::is_hmac(self.algorithm)).then(|| self.current())
    }

    pub fn algorithm_name(&self) -> &'static str {
        keys::algorithm_name(self.algorithm)
    }

    /// `jwt.jwks_max_age`, whole seconds (the JWKS's `Cache-Control: max-age`).
    pub fn jwks_max_age_secs(&self) -> i64 {
        self.jwks_max_age_ms / 1000
    }

    /// Every live key, newest first, then the retired kids, as `wxauth keys list`
    /// prints them.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let set = self.current();
        let now = now_ms();
        let signing = set.signing_at(now).kid.clone();
        let mut listed: Vec<serde_json::Value> = set
            .keys
            .iter()
            .map(|key| key_view(key, key.kid == signing))
            .collect();
        // The ring is only read here for its retired kids; an unreadable ring would
        // have stopped the load.
        if let Ok(ring) = Ring::read(&self.data_dir) {
            listed.extend(ring.retired.iter().map(|kid| {
                serde_json::json!({
                    "kid": kid, "state": KeyState::Retired, "signing": false,
                    "published": false, "algorithm": null, "origin": null,
                    "created_at": null, "signs_from": null,
                })
            }));
        }
        listed
    }

    /// Adds a key to the ring (the given PEM or secret, or a new one of the
    /// configured algorithm): published at once, signing from `jwt.jwks_max_age`
    /// later (or `activate`). Older keys keep verifying.
    pub fn rotate(&self, material: Option<&Secret>) -> Result<serde_json::Value, KeyError> {
        let _writing = self
            .ring_writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let material = match material {
            Some(given) => given.clone(),
            None => Secret::new(generate_material(self.algorithm)?),
        };
        let created_ms = now_ms();
        let key = Key::from_material(
            self.algorithm,
            material.expose().as_bytes(),
            KeyOrigin::Rotated,
            Some(created_ms),
        )
        .map_err(KeyError::Unusable)?;
        let mut ring = Ring::read(&self.data_dir).map_err(KeyError::Unusable)?;
        if self.current().by_kid(&key.kid).is_some() || ring.retired.contains(&key.kid) {
            return Err(KeyError::Duplicate(key.kid));
        }
        ring.keys.push(RingKey {
            kid: key.kid.clone(),
            algorithm: keys::algorithm_name(self.algorithm).into(),
            created_ms,
            signs_from_ms: Some(created_ms.saturating_add(self.jwks_max_age_ms)),
            material: material.expose().to_string(),
        });
        let set = self.commit(&ring)?;
        let made = set.by_kid(&key.kid).expect("the new key is in the set");
        Ok(key_view(made, set.signing().kid == made.kid))
    }

    /// Makes the waiting ring key `kid` sign from now on, before its
    /// `jwt.jwks_max_age` has passed (the operator knows no cache still lacks it).
    /// Activating the key that signs already is a no-op.
    pub fn activate(&self, kid: &str) -> Result<serde_json::Value, KeyError> {
        let _writing = self
            .ring_writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.current();
        let now = now_ms();
        let key = current.by_kid(kid).ok_or(KeyError::NoSuchKey)?;
        let signing = current.signing_at(now);
        if signing.kid == kid {
            return Ok(key_view(key, true));
        }
        let newer_than_signing = current
            .keys
            .iter()
            .position(|k| k.kid == kid)
            .zip(current.keys.iter().position(|k| k.kid == signing.kid))
            .is_some_and(|(at, signing_at)| at < signing_at);
        if key.origin != KeyOrigin::Rotated
            || key.algorithm != self.algorithm
            || !newer_than_signing
        {
            return Err(KeyError::NotWaiting(kid.to_string()));
        }
        let mut ring = Ring::read(&self.data_dir).map_err(KeyError::Unusable)?;
        let stored = ring
            .keys
            .iter_mut()
            .find(|k| k.kid == kid)
            .ok_or(KeyError::NoSuchKey)?;
        stored.signs_from_ms = Some(now);
        let set = self.commit(&ring)?;
        let active = set.by_kid(kid).expect("the activated key is in the set");
        Ok(key_view(active, set.signing_at(now).kid == kid))
    }

    /// Stops the key `kid` verifying anything. The signing key cannot be retired.
    pub fn retire(&self, kid: &str) -> Result<(), KeyError> {
        let _writing = self
            .ring_writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.current();
        let key = current.by_kid(kid).ok_or(KeyError::NoSuchKey)?;
        if current.signing().kid == kid {
            return Err(KeyError::Signing(kid.to_string()));
        }
        let mut ring = Ring::read(&self.data_dir).map_err(KeyError::Unusable)?;
        if key.origin == KeyOrigin::Rotated {
            // Its material is gone for good: nothing can bring it back by mistake.
            ring.keys.retain(|k| k.kid != kid);
        }
        if !ring.retired.iter().any(|k| k == kid) {
            ring.retired.push(kid.to_string());
        }
        self.commit(&ring)?;
        Ok(())
    }

    /// Loads the key ring file again and makes its set live (another process changed
    /// it: with PostgreSQL, `storage::postgres::keys` keeps the file in step).
    pub fn reload(&self) -> Result<(), KeyError> {
        let _writing = self
            .ring_writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ring = Ring::read(&self.data_dir).map_err(KeyError::Unusable)?;
        let set = build_set(&self.config, self.algorithm, &self.data_dir, &ring)
            .map_err(|e| KeyError::Unusable(e.to_string()))?;
        *self
            .set
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(set);
        Ok(())
    }

    /// Builds the set `ring` describes, writes `ring` (only when the set is whole),
    /// then makes the set live.
    fn commit(&self, ring: &Ring) -> Result<Arc<KeySet>, KeyError> {
        let set = build_set(&self.config, self.algorithm, &self.data_dir, ring)
            .map_err(|e| KeyError::Unusable(e.to_string()))?;
        ring.write(&self.data_dir).map_err(KeyError::Unusable)?;
        let set = Arc::new(set);
        *self
            .set
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = set.clone();
        Ok(set)
    }

    /// Signs a new token of `kind` for `user_id` carrying the user's token `stamp`,
    /// with a fresh jti, issued at `now` (unix seconds).
    pub fn sign(&self, kind: TokenType, user_id: UserId, stamp: u64, now: i64) -> Signed {
        self.sign_with(kind, user_id, stamp, now, None, None)
    }

    /// Signs an access token for `user_id` carrying the user's token `stamp` and,
    /// when known, the family (session) it was issued with (claim `fam`, no `gen`):
    /// `GET /api/weixin/sessions/` marks that session `current`.
    pub fn sign_access(
        &self,
        user_id: UserId,
        stamp: u64,
        family: Option<crate::storage::model::FamilyId>,
        now: i64,
    ) -> Signed {
        let fam = family.map(|f| f.to_hex());
        self.sign_with(TokenType::Access, user_id, stamp, now, fam, None)
    }

    /// Signs a refresh token of `family` at `generation` (claims `fam` and `gen`)
    /// for `user_id` carrying the user's token `stamp`, issued at `now`.
    pub fn sign_refresh(
        &self,
        user_id: UserId,
        stamp: u64,
        family: crate::storage::model::FamilyId,
        generation: u64,
        now: i64,
    ) -> Signed {
        let fam = Some(family.to_hex());
        self.sign_with(
            TokenType::Refresh,
            user_id,
            stamp,
            now,
            fam,
            Some(generation),
        )
    }

    fn sign_with(
        &self,
        kind: TokenType,
        user_id: UserId,
        stamp: u64,
        now: i64,
        fam: Option<String>,
        gen: Option<u64>,
    ) -> Signed {
        let ttl = match kind {
            TokenType::Access => self.access_ttl,
            TokenType::Refresh => self.refresh_ttl,
        };
        let claims = Claims {
            token_type: kind,
            exp: now.saturating_add(ttl),
            iat: now,
            jti: crate::ids::random_hex(16),
            user_id,
            sub: Some(user_id.to_string()),
            stamp,
            fam,
            gen,
            nbf: None,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        let set = self.current();
        let key = set.signing();
        let token = jsonwebtoken::encode(&key.header, &claims, &key.encoding)
            .expect("signing with a validated key cannot fail");
        Signed { token, claims }
    }

    /// Step 2 of [`check`]: one of the live keys signed `message` (the token's
    /// `header.payload`) with `signature` under the header's `alg`, checked by
    /// jsonwebtoken's own `crypto::verify`. A key verifies only its own algorithm.
    ///
    /// With one live key (no rotation under way) it is the only candidate. Otherwise
    /// the header's `kid` picks the key; a token without one (simplejwt's own) is
    /// tried against the live keys of its algorithm.
    pub(crate) fn verify_signature(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
        message: &str,
        signature: &str,
    ) -> Result<(), TokenError> {
        let set = self.current();
        let signed_by = |key: &Key| {
            key.algorithm == alg
                && jsonwebtoken::crypto::verify(signature, message.as_bytes(), &key.decoding, alg)
                    .unwrap_or(false)
        };
        // A `kid` names the one key to try, also when only one key is live: an
        // unknown kid is refused.
        let verified = match kid {
            Some(kid) => set.by_kid(kid).is_some_and(signed_by),
            None => set.keys.iter().any(signed_by),
        };
        verified.then_some(()).ok_or(TokenError::Invalid)
    }
}

fn parse_algorithm(cfg: &JwtConfig) -> Result<Algorithm, ConfigError> {
    Ok(match cfg.algorithm {
        SigningAlgorithm::HS256 => Algorithm::HS256,
        SigningAlgorithm::HS384 => Algorithm::HS384,
        SigningAlgorithm::HS512 => Algorithm::HS512,
        SigningAlgorithm::RS256 => Algorithm::RS256,
        SigningAlgorithm::ES256 => Algorithm::ES256,
        SigningAlgorithm::EdDSA => Algorithm::EdDSA,
    })
}

/// A key's state, as `wxauth keys list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Verifies tokens (and is in the JWKS, for a key pair) but does not sign: a
    /// rotated-in key waiting for its `signs_from`, or an older key.
    Published,
    /// Signs new tokens (and verifies).
    Active,
    /// Verifies nothing (`wxauth keys retire`).
    Retired,
}

/// What `wxauth keys list`, `rotate` and `activate` print for a key: never its
/// material.
fn key_view(key: &Key, signing: bool) -> serde_json::Value {
    let rfc3339 = |ms: i64| crate::clock::rfc3339(ms.div_euclid(1000));
    serde_json::json!({
        "kid": key.kid,
        "algorithm": keys::algorithm_name(key.algorithm),
        "origin": key.origin,
        "state": if signing { KeyState::Active } else { KeyState::Published },
        "signing": signing,
        "created_at": key.created_ms.map(rfc3339),
        "signs_from": key.signs_from_ms.map(rfc3339),
        "published": key.jwk.is_some(),
    })
}

/// A new key of `algorithm` for the ring.
fn generate_material(algorithm: Algorithm) -> Result<String, KeyError> {
    Ok(match algorithm {
        Algorithm::HS512 => crate::ids::random_hex(64),
        Algorithm::HS256 | Algorithm::HS384 => crate::ids::random_hex(32),
        Algorithm::ES256 => keys::generate_es256_pem(),
        Algorithm::EdDSA => keys::generate_ed25519_pem(),
        _ => return Err(KeyError::CannotGenerate),
    })
}

/// The keys of `jwt.previous_key_files`. Each may be of another algorithm than the
/// configured one (a move from HMAC to a key pair keeps the old tokens): a PEM file
/// is tried as the configured algorithm first, then RS256, ES256 and EdDSA; anything
/// else is an HMAC secret (the configured HMAC algorithm, or HS256).
fn previous_keys(cfg: &JwtConfig, configured: Algorithm) -> Result<Vec<Key>, ConfigError> {
    let mut keys = Vec::new();
    for path in &cfg.previous_key_files {
        let name = "jwt.previous_key_files";
        let material = crate::config::read_secret_file(name, path)?;
        let bytes = material.expose().as_bytes();
        let is_pem = material.expose().trim_start().starts_with("-----BEGIN");
        let hmac = keys::is_hmac(configured);
        let candidates: Vec<Algorithm> = match (is_pem, hmac) {
            (true, false) => vec![
                configured,
                Algorithm::RS256,
                Algorithm::ES256,
                Algorithm::EdDSA,
            ],
            (true, true) => vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
            (false, true) => vec![configured],
            (false, false) => vec![Algorithm::HS256],
        };
        let key = candidates
            .into_iter()
            .find_map(|alg| Key::from_material(alg, bytes, KeyOrigin::Previous, None).ok())
            .ok_or_else(|| {
                ConfigError::new(
                    name,
                    format!(
                        "{} is neither a PEM private key (RS256, ES256, EdDSA) nor an HMAC \
                         secret of at least 32 bytes",
                        path.display()
                    ),
                )
            })?;
        keys.push(key);
    }
    Ok(keys)
}

/// The live keys, newest ring key first, then the base key and the previous keys,
/// without the retired ones; the newest ring key of `algorithm` signs, else the
/// base key.
fn build_set(
    cfg: &JwtConfig,
    algorithm: Algorithm,
    data_dir: &Path,
    ring: &Ring,
) -> Result<KeySet, ConfigError> {
    let ring_error = |reason: String| ConfigError {
        key: "storage.path".into(),
        reason,
    };
    let base_material = match &cfg.signing_key_file {
        Some(path) => (
            crate::config::read_secret_file("jwt.signing_key_file", path)?,
            KeyOrigin::Configured,
        ),
        None => (
            load_or_generate_hmac_key(data_dir).map_err(|e| ConfigError {
                key: "storage.path".into(),
                reason: format!("cannot create the signing key: {e}"),
            })?,
            KeyOrigin::Generated,
        ),
    };
    let base = Key::from_material(
        algorithm,
        base_material.0.expose().as_bytes(),
        base_material.1,
        None,
    )
    .map_err(|reason| ConfigError::new("jwt.signing_key_file", reason))?;

    let mut keys: Vec<Key> = Vec::new();
    for stored in ring.keys.iter().rev() {
        let alg: Algorithm = stored.algorithm.parse().map_err(|_| {
            ring_error(format!(
                "{KEYRING_FILE}: key {} has an unknown algorithm",
                stored.kid
            ))
        })?;
        let mut key = Key::from_material(
            alg,
            stored.material.as_bytes(),
            KeyOrigin::Rotated,
            Some(stored.created_ms),
        )
        .map_err(|e| ring_error(format!("{KEYRING_FILE}: key {}: {e}", stored.kid)))?;
        key.signs_from_ms = Some(stored.signs_from_ms.unwrap_or(stored.created_ms));
        if key.kid != stored.kid {
            return Err(ring_error(format!(
                "{KEYRING_FILE}: key {} does not match its kid: the file is damaged",
                stored.kid
            )));
        }
        keys.push(key);
    }
    keys.push(base);
    keys.extend(previous_keys(cfg, algorithm)?);
    let mut seen = std::collections::HashSet::new();
    keys.retain(|key| !ring.retired.contains(&key.kid) && seen.insert(key.kid.clone()));
    KeySet::new(keys, algorithm).ok_or_else(|| {
        ring_error(format!(
            "every key able to sign is retired ({KEYRING_FILE}): run `wxauth keys rotate`"
        ))
    })
}

/// The generated key lives in the data directory so that tokens survive restarts.
fn load_or_generate_hmac_key(data_dir: &Path) -> std::io::Result<crate::secret::Secret> {
    // 256 random bits as 64 hex characters: a shorter file is damage, not a key.
    crate::fsutil::read_or_create_secret(&data_dir.join(GENERATED_KEY_FILE), 64, || {
        crate::ids::random_hex(32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims_of(keys: &JwtKeys, token: &str) -> Result<Claims, TokenError> {
        check::verified_claims(keys, token)
    }

    #[test]
    fn a_rotated_key_signs_once_jwks_max_age_has_passed_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = JwtConfig {
            jwks_max_age: std::time::Duration::from_secs(3600),
            ..JwtConfig::default()
        };
        let keys = JwtKeys::load(&cfg, dir.path()).unwrap();
        let old = keys.kid();
        let made = keys.rotate(None).unwrap();
        let new = made["kid"].as_str().unwrap();
        assert_eq!(made["state"], "published");
        let set = keys.current();
        let at = set.by_kid(new).unwrap().signs_from_ms.unwrap();
        assert_eq!(set.signing_at(at - 1).kid, old);
        assert_eq!(set.signing_at(at).kid, new);
        // The next start reads the same time from the ring.
        let again = JwtKeys::load(&cfg, dir.path()).unwrap().current();
        assert_eq!(again.signing_at(at - 1).kid, old);
        assert_eq!(again.signing_at(at).kid, new);
    }

    #[test]
    fn after_a_rotation_tokens_verify_by_kid_and_without_one_by_trying_each_key() {
        let dir = tempfile::tempdir().unwrap();
        let keys = JwtKeys::load(&JwtConfig::default(), dir.path()).unwrap();
        let old = keys.sign(TokenType::Access, 7, 0, now_ms() / 1000);
        let old_secret = std::fs::read(dir.path().join(GENERATED_KEY_FILE)).unwrap();
        let first_kid = keys.kid();
        let made = keys.rotate(None).unwrap();
        assert_ne!(made["kid"], first_kid.as_str());
        // Published first: the old key signs until the new one is activated.
        assert_eq!(made["state"], "published");
        assert_eq!(keys.kid(), first_kid);
        let made_kid = made["kid"].as_str().unwrap();
        assert_eq!(keys.activate(made_kid).unwrap()["state"], "active");
        assert_eq!(keys.kid(), made_kid);
        let new = keys.sign(TokenType::Access, 7, 0, now_ms() / 1000);
        assert_eq!(claims_of(&keys, &old.token).unwrap().user_id, 7);
        assert_eq!(claims_of(&keys, &new.token).unwrap().user_id, 7);

        // simplejwt's tokens carry no kid: the old secret still verifies them.
        let no_kid = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &old.claims,
            &jsonwebtoken::EncodingKey::from_secret(&old_secret),
        )
        .unwrap();
        assert!(claims_of(&keys, &no_kid).is_ok());

        keys.retire(&first_kid).unwrap();
        assert!(matches!(
            claims_of(&keys, &old.token),
            Err(TokenError::Invalid)
        ));
        assert!(matches!(
            claims_of(&keys, &no_kid),
            Err(TokenError::Invalid)
        ));
        assert!(claims_of(&keys, &new.token).is_ok());
        assert!(matches!(
            keys.retire(&keys.kid()),
            Err(KeyError::Signing(_))
        ));

        // The next start sees the same set.
        let again = JwtKeys::load(&JwtConfig::default(), dir.path()).unwrap();
        assert_eq!(again.kid(), keys.kid());
        assert!(matches!(
            claims_of(&again, &old.token),
            Err(TokenError::Invalid)
        ));
        assert!(claims_of(&again, &new.token).is_ok());
    }
}
