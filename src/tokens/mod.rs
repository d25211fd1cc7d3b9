//! JWTs: the claims simplejwt issues, and the key material that signs and checks them.
//!
//! [`JwtKeys`] is immutable after start-up and shared by `Arc`: the access-token
//! extractor verifies with it on every request without going through an actor.
//! Whether a presented token counts is decided in one place, [`check`].

pub mod check;
pub mod records;

use crate::config::{ConfigError, JwtConfig, SigningAlgorithm};
use crate::users::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// File (in the data directory) holding the generated HMAC key.
pub const GENERATED_KEY_FILE: &str = "jwt_signing_key";

/// Milliseconds since the Unix epoch: the clock of every token rule (claims are
/// whole seconds; rotation times and the grace and leeway are milliseconds).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

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
    header: Header,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
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
}

impl JwtKeys {
    /// Loads the configured key, or the generated one from `data_dir`, creating it
    /// (256 random bits, mode 0600) on first start.
    pub fn load(cfg: &JwtConfig, data_dir: &Path) -> Result<Self, ConfigError> {
        let material = match &cfg.signing_key_file {
            Some(path) => crate::config::read_secret_file("jwt.signing_key_file", path)?,
            None => load_or_generate_hmac_key(data_dir).map_err(|e| ConfigError {
                key: "storage.path".into(),
                reason: format!("cannot create the signing key: {e}"),
            })?,
        };
        Self::from_material(cfg, &material)
    }

    /// For `check-config`: loads a configured key file without touching the data
    /// directory (a generated key needs no checking).
    pub fn check(cfg: &JwtConfig) -> Result<(), ConfigError> {
        if let Some(path) = &cfg.signing_key_file {
            let material = crate::config::read_secret_file("jwt.signing_key_file", path)?;
            Self::from_material(cfg, &material)?;
        }
        Ok(())
    }

    fn from_material(
        cfg: &JwtConfig,
        material: &crate::secret::Secret,
    ) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError {
            key: "jwt.signing_key_file".into(),
            reason,
        };
        let algorithm = match cfg.algorithm {
            SigningAlgorithm::HS256 => Algorithm::HS256,
            SigningAlgorithm::HS384 => Algorithm::HS384,
            SigningAlgorithm::HS512 => Algorithm::HS512,
            SigningAlgorithm::RS256 => Algorithm::RS256,
            SigningAlgorithm::ES256 => Algorithm::ES256,
            SigningAlgorithm::EdDSA => Algorithm::EdDSA,
        };
        let bytes = material.expose().as_bytes();
        let (encoding, decoding, public) = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                if bytes.len() < 32 {
                    return Err(err("an HMAC key must be at least 32 bytes".into()));
                }
                (
                    EncodingKey::from_secret(bytes),
                    DecodingKey::from_secret(bytes),
                    bytes.to_vec(),
                )
            }
            other => asymmetric_keys(other, bytes).map_err(err)?,
        };
        let kid = hex::encode(&ring::digest::digest(&ring::digest::SHA256, &public).as_ref()[..8]);
        let mut header = Header::new(algorithm);
        header.kid = Some(kid);

        // jsonwebtoken checks the algorithm and the signature only: every claim rule
        // (times in milliseconds, iss/aud, sub, type) is in `check`, in PyJWT's order.
        let mut validation = Validation::new(algorithm);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.set_required_spec_claims::<&str>(&[]);
        let millis = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let secs = |d: std::time::Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        Ok(JwtKeys {
            header,
            encoding,
            decoding,
            validation,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            access_ttl: secs(cfg.access_ttl),
            refresh_ttl: secs(cfg.refresh_ttl),
            leeway_ms: millis(cfg.leeway),
            reuse_grace_ms: millis(cfg.reuse_grace),
        })
    }

    pub fn kid(&self) -> &str {
        self.header.kid.as_deref().unwrap_or_default()
    }

    /// Signs a new token of `kind` for `user_id` carrying the user's token `stamp`,
    /// with a fresh jti, issued at `now` (unix seconds).
    pub fn sign(&self, kind: TokenType, user_id: UserId, stamp: u64, now: i64) -> Signed {
        let ttl = match kind {
            TokenType::Access => self.access_ttl,
            TokenType::Refresh => self.refresh_ttl,
        };
        let claims = Claims {
            token_type: kind,
            exp: now.saturating_add(ttl),
            iat: now,
            jti: crate::random_hex(16),
            user_id,
            sub: Some(user_id.to_string()),
            stamp,
            nbf: None,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        let token = jsonwebtoken::encode(&self.header, &claims, &self.encoding)
            .expect("signing with a validated key cannot fail");
        Signed { token, claims }
    }

    /// The claims of a token whose algorithm and signature are right. Nothing else is
    /// checked here: [`check`] decides whether the token counts.
    fn decode_signed(&self, token: &str) -> Result<Claims, TokenError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|_| TokenError::Invalid)
    }
}

/// The generated key lives in the data directory so that tokens survive restarts.
fn load_or_generate_hmac_key(data_dir: &Path) -> std::io::Result<crate::secret::Secret> {
    // 256 random bits as 64 hex characters: a shorter file is damage, not a key.
    crate::fsutil::read_or_create_secret(&data_dir.join(GENERATED_KEY_FILE), 64, || {
        crate::random_hex(32)
    })
}

/// Signing and verification keys from a PEM private key (PKCS#8; PKCS#1 for RSA).
/// ring derives the public half, so one file configures both.
fn asymmetric_keys(
    alg: Algorithm,
    pem_text: &[u8],
) -> Result<(EncodingKey, DecodingKey, Vec<u8>), String> {
    use ring::signature::{self, KeyPair};
    let bad = |e: String| format!("not a usable {alg:?} private key: {e}");
    let der = pem::parse(pem_text).map_err(|e| bad(e.to_string()))?;
    let der = der.contents();
    match alg {
        Algorithm::RS256 => {
            let pair = signature::RsaKeyPair::from_pkcs8(der)
                .or_else(|_| signature::RsaKeyPair::from_der(der))
                .map_err(|e| bad(e.to_string()))?;
            let public = pair.public().as_ref().to_vec();
            let enc = EncodingKey::from_rsa_pem(pem_text).map_err(|e| bad(e.to_string()))?;
            Ok((enc, DecodingKey::from_rsa_der(&public), public))
        }
        Algorithm::ES256 => {
            let rng = ring::rand::SystemRandom::new();
            let pair = signature::EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                der,
                &rng,
            )
            .map_err(|e| bad(e.to_string()))?;
            let public = pair.public_key().as_ref().to_vec();
            let enc = EncodingKey::from_ec_pem(pem_text).map_err(|e| bad(e.to_string()))?;
            Ok((enc, DecodingKey::from_ec_der(&public), public))
        }
        Algorithm::EdDSA => {
            let pair = signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                .map_err(|e| bad(e.to_string()))?;
            let public = pair.public_key().as_ref().to_vec();
            let enc = EncodingKey::from_ed_pem(pem_text).map_err(|e| bad(e.to_string()))?;
            Ok((enc, DecodingKey::from_ed_der(&public), public))
        }
        other => Err(format!("{other:?} is not supported")),
    }
}
