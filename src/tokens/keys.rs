//! The key set: every key that verifies tokens, the one that signs, and the public
//! half of each asymmetric key as a JWK (RFC 7517).
//!
//! Keys come from three places:
//! - the base key: `jwt.signing_key_file`, or else the generated HMAC key in
//!   `storage.path/jwt_signing_key`;
//! - `jwt.previous_key_files`: older keys, for verification only;
//! - the key ring, `storage.path/jwt_keys.json` (0600): keys made by
//!   `wxauth keys rotate`, oldest first, and the kids retired by `wxauth keys retire`.
//!
//! Publish first, sign later: a ring key is published (and verifies) as soon as it
//! is made, and signs only from its `signs_from_ms` on (`jwt.jwks_max_age` after
//! `wxauth keys rotate` made it, or when `wxauth keys activate` said so), so that
//! every cached JWKS has had time to learn it. The newest ring key of the configured
//! algorithm that has reached its time signs; with none, the base key does. Every
//! key that is not retired verifies the tokens whose header names its
//! `kid` (a token without `kid`, like simplejwt's own, is tried against the keys of
//! its algorithm). A key verifies only its own algorithm, so no HMAC key can be fed
//! a public key.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;

/// The key ring's file in the data directory.
pub const KEYRING_FILE: &str = "jwt_keys.json";

/// Where a key came from, as `wxauth keys list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyOrigin {
    /// `jwt.signing_key_file`.
    Configured,
    /// `jwt.previous_key_files`: verification only.
    Previous,
    /// The generated `jwt_signing_key` of the data directory.
    Generated,
    /// Made by `wxauth keys rotate` (the key ring).
    Rotated,
}

/// One key: what signs and verifies with it, and its public JWK.
pub struct Key {
    pub kid: String,
    pub algorithm: Algorithm,
    pub origin: KeyOrigin,
    /// When `wxauth keys rotate` made it (unix ms); `None` for configured keys.
    pub created_ms: Option<i64>,
    /// From when a ring key signs (unix ms); `None` for the other keys.
    pub signs_from_ms: Option<i64>,
    pub(super) header: Header,
    pub(super) encoding: EncodingKey,
    pub(super) decoding: DecodingKey,
    /// The public key as a JWK; `None` for HMAC keys.
    pub jwk: Option<Value>,
}

impl Key {
    /// A key from its material: an HMAC secret (at least 32 bytes) or a PEM private
    /// key (PKCS#8; PKCS#1 for RSA). The `kid` is derived from the public half (the
    /// secret's hash for HMAC), so the same key always has the same `kid`.
    pub fn from_material(
        algorithm: Algorithm,
        material: &[u8],
        origin: KeyOrigin,
        created_ms: Option<i64>,
    ) -> Result<Key, String> {
        let (encoding, decoding, public, jwk_fields) = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                if material.len() < 32 {
                    return Err("an HMAC key must be at least 32 bytes".into());
                }
                (
                    EncodingKey::from_secret(material),
                    DecodingKey::from_secret(material),
                    material.to_vec(),
                    None,
                )
            }
            other => {
                let (enc, dec, public, jwk) = asymmetric_keys(other, material)?;
                (enc, dec, public, Some(jwk))
            }
        };
        let kid = hex::encode(&ring::digest::digest(&ring::digest::SHA256, &public).as_ref()[..8]);
        let mut header = Header::new(algorithm);
        header.kid = Some(kid.clone());
        let jwk = jwk_fields.map(|mut fields: Value| {
            fields["kid"] = json!(kid);
            fields["alg"] = json!(algorithm_name(algorithm));
            fields["use"] = json!("sig");
            fields
        });
        Ok(Key {
            kid,
            algorithm,
            origin,
            created_ms,
            signs_from_ms: None,
            header,
            encoding,
            decoding,
            jwk,
        })
    }
}

pub fn is_hmac(algorithm: Algorithm) -> bool {
    matches!(
        algorithm,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    )
}

pub fn algorithm_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        // Never configured: `jwt.algorithm` is one of the six above.
        _ => "unsupported",
    }
}

/// Every live key, and which ones may sign. Immutable: a rotation builds a new set;
/// which key signs changes with the clock alone, as ring keys reach their time.
pub struct KeySet {
    /// Ring keys newest first, then the base key and the previous keys.
    pub keys: Vec<Key>,
    /// The configured algorithm: only its ring keys sign.
    algorithm: Algorithm,
    /// Index into `keys` of the base key, unless it is retired.
    base: Option<usize>,
    /// `{"keys": [...]}` of the asymmetric keys, serialized once.
    pub jwks: String,
}

impl KeySet {
    /// `None` when no key of `keys` can ever sign.
    pub fn new(keys: Vec<Key>, algorithm: Algorithm) -> Option<KeySet> {
        let base = keys
            .iter()
            .position(|k| matches!(k.origin, KeyOrigin::Configured | KeyOrigin::Generated));
        let ring_signer = keys
            .iter()
            .any(|k| k.origin == KeyOrigin::Rotated && k.algorithm == algorithm);
        if base.is_none() && !ring_signer {
            return None;
        }
        let jwks: Vec<&Value> = keys.iter().filter_map(|k| k.jwk.as_ref()).collect();
        let jwks = json!({ "keys": jwks }).to_string();
        Some(KeySet {
            keys,
            algorithm,
            base,
            jwks,
        })
    }

    /// The key that signs at `now_ms`: the newest ring key of the configured
    /// algorithm whose time has come, else the base key, else (the base key retired
    /// while only newer ring keys wait, which `retire` prevents) the oldest ring key.
    pub fn signing_at(&self, now_ms: i64) -> &Key {
        let ring = |k: &&Key| k.origin == KeyOrigin::Rotated && k.algorithm == self.algorithm;
        self.keys
            .iter()
            .filter(ring)
            .find(|k| k.signs_from_ms.is_some_and(|from| from <= now_ms))
            .or_else(|| self.base.map(|i| &self.keys[i]))
            .or_else(|| self.keys.iter().rev().find(ring))
            .expect("a key set has a key that can sign")
    }

    /// The key that signs now.
    pub fn signing(&self) -> &Key {
        self.signing_at(crate::clock::now_ms())
    }

    pub fn by_kid(&self, kid: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

/// One key made by `wxauth keys rotate`, as the key ring file stores it.
#[derive(Serialize, Deserialize)]
pub struct RingKey {
    pub kid: String,
    pub algorithm: String,
    pub created_ms: i64,
    /// From when it signs (unix ms): `jwt.jwks_max_age` after `created_ms`, or when
    /// `wxauth keys activate` ran. Absent (a ring written before keys waited): from
    /// `created_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signs_from_ms: Option<i64>,
    /// The HMAC secret or the PEM private key.
    pub material: String,
}

/// `jwt_keys.json`: rotated keys, oldest first, and the kids that no longer verify.
#[derive(Default, Serialize, Deserialize)]
pub struct Ring {
    #[serde(default)]
    pub keys: Vec<RingKey>,
    /// Retired keys that are not in `keys` (the base key, a previous key file):
    /// their material stays where the operator put it, but they verify nothing.
    #[serde(default)]
    pub retired: Vec<String>,
}

impl Ring {
    /// The ring in `data_dir`, empty when there is no file yet.
    pub fn read(data_dir: &Path) -> Result<Ring, String> {
        let path = data_dir.join(KEYRING_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is damaged: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ring::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Replaces the file whole (0600), or leaves the old one on any error.
    pub fn write(&self, data_dir: &Path) -> Result<(), String> {
        let path = data_dir.join(KEYRING_FILE);
        let text = serde_json::to_vec_pretty(self).expect("the key ring serializes");
        crate::fsutil::create_private_dir(data_dir)
            .and_then(|()| crate::fsutil::write_atomically(&path, &text))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

/// Signing and verification keys from a PEM private key (PKCS#8; PKCS#1 for RSA),
/// the public key's bytes (what the `kid` hashes) and its JWK members.
/// ring derives the public half, so one file configures both.
fn asymmetric_keys(
    alg: Algorithm,
    pem_text: &[u8],
) -> Result<(EncodingKey, DecodingKey, Vec<u8>, Value), String> {
    use base64::Engine;
    use ring::signature::{self, KeyPair};
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let bad = |e: String| format!("not a usable {alg:?} private key: {e}");
    let der = pem::parse(pem_text).map_err(|e| bad(e.to_string()))?;
    let der = der.contents();
    match alg {
        Algorithm::RS256 => {
            let pair = signature::RsaKeyPair::from_pkcs8(der)
                .or_else(|_| signature::RsaKeyPair::from_der(der))
                .map_err(|e| bad(e.to_string()))?;
            let public = pair.public().as_ref().to_vec();
            let parts = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
            // RFC 7518 §6.3.1: unsigned big-endian, no leading zero octets.
            let unsigned = |bytes: &[u8]| {
                let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
                b64(&bytes[start..])
            };
            let jwk = json!({ "kty": "RSA", "n": unsigned(&parts.n), "e": unsigned(&parts.e) });
            let enc = EncodingKey::from_rsa_pem(pem_text).map_err(|e| bad(e.to_string()))?;
            Ok((enc, DecodingKey::from_rsa_der(&public), public, jwk))
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
            // An uncompressed point: 0x04, then x and y of 32 bytes each.
            if public.len() != 65 || public[0] != 4 {
                return Err(bad("not an uncompressed P-256 point".into()));
            }
            let jwk = json!({
                "kty": "EC",
                "crv": "P-256",
                "x": b64(&public[1..33]),
                "y": b64(&public[33..]),
            });
            let enc = EncodingKey::from_ec_pem(pem_text).map_err(|e| bad(e.to_string()))?;
            Ok((enc, DecodingKey::from_ec_der(&public), public, jwk))
        }
        Algorithm::EdDSA => {
            let pair = signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                .map_err(|e| bad(e.to_string()))?;
            let public = pair.public_key().as_ref().to_vec();
            let jwk = json!({ "kty": "OKP", "crv": "Ed25519", "x": b64(&public) });
            let enc = EncodingKey::from_ed_pem(pem_text).map_err(|e| bad(e.to_string()))?;
            Ok((enc, DecodingKey::from_ed_der(&public), public, jwk))
        }
        other => Err(format!("{other:?} is not supported")),
    }
}

/// The DER before the 32-byte seed in a PKCS#8 v1 Ed25519 private key (RFC 8410,
/// section 10.3): SEQUENCE { version 0, AlgorithmIdentifier { id-Ed25519 },
/// OCTET STRING { OCTET STRING (32 bytes) } }.
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

const RNG_FAILED: &str = "the OS random number generator failed";

/// A new P-256 private key as standard PKCS#8 PEM (OpenSSL and `cryptography` read it).
pub fn generate_es256_pem() -> String {
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect(RNG_FAILED);
    pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()))
}

/// A new Ed25519 private key as PKCS#8 v1 PEM. Not ring's `generate_pkcs8`: that
/// writes PKCS#8 v2 (the public key included) in a form OpenSSL 3 and `cryptography`
/// refuse. v1 is the seed alone.
pub fn generate_ed25519_pem() -> String {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .expect(RNG_FAILED);
    let mut der = ED25519_PKCS8_V1_PREFIX.to_vec();
    der.extend_from_slice(&seed);
    ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .expect("a 32-byte seed is always a valid Ed25519 key");
    pem::encode(&pem::Pem::new("PRIVATE KEY", der))
}
