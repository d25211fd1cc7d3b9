//! JWTs: the claims simplejwt issues, and the key material that signs and checks them.
//!
//! [`JwtKeys`] is immutable after start-up and shared by `Arc`: the access-token
//! extractor verifies with it on every request without going through an actor.

pub mod records;

use crate::config::{ConfigError, JwtConfig};
use crate::users::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// File (in the data directory) holding the generated HMAC key.
pub const GENERATED_KEY_FILE: &str = "jwt_signing_key";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// simplejwt's claims, plus `sub`, and `iss`/`aud` when configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub token_type: String,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    pub user_id: UserId,
    pub sub: String,
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
    pub access_ttl: i64,
    pub refresh_ttl: i64,
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
        let algorithm: Algorithm = cfg.algorithm.parse().map_err(|_| ConfigError {
            key: "jwt.algorithm".into(),
            reason: format!("{:?} is not supported", cfg.algorithm),
        })?;
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

        let mut validation = Validation::new(algorithm);
        validation.leeway = cfg.leeway.as_secs();
        // A configured iss/aud must be present, not merely right when present.
        let mut required = vec!["exp"];
        match &cfg.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            // Checked in verify_any: like PyJWT, a token naming an audience is
            // refused when none is configured.
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(JwtKeys {
            header,
            encoding,
            decoding,
            validation,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            access_ttl: cfg.access_ttl.as_secs() as i64,
            refresh_ttl: cfg.refresh_ttl.as_secs() as i64,
        })
    }

    pub fn kid(&self) -> &str {
        self.header.kid.as_deref().unwrap_or_default()
    }

    /// Signs a new token of `kind` for `user_id`, with a fresh jti, issued `now`.
    pub fn sign(&self, kind: TokenType, user_id: UserId, now: i64) -> Signed {
        let ttl = match kind {
            TokenType::Access => self.access_ttl,
            TokenType::Refresh => self.refresh_ttl,
        };
        let claims = Claims {
            token_type: kind.as_str().into(),
            exp: now + ttl,
            iat: now,
            jti: crate::random_hex(16),
            user_id,
            sub: user_id.to_string(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        let token = jsonwebtoken::encode(&self.header, &claims, &self.encoding)
            .expect("signing with a validated key cannot fail");
        Signed { token, claims }
    }

    /// Checks signature, algorithm, `exp`, `iss`/`aud` and the token type.
    pub fn verify(&self, token: &str, expected: TokenType) -> Result<Claims, TokenError> {
        let claims = self.verify_any(token)?;
        if claims.token_type != expected.as_str() {
            return Err(TokenError::WrongType);
        }
        Ok(claims)
    }

    /// Like [`verify`](Self::verify) for a token of either type (the verify endpoint).
    pub fn verify_any(&self, token: &str) -> Result<Claims, TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?;
        let claims = data.claims;
        if self.audience.is_none() && claims.aud.is_some() {
            return Err(TokenError::Invalid);
        }
        if claims.token_type != "access" && claims.token_type != "refresh" {
            return Err(TokenError::Invalid);
        }
        Ok(claims)
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
