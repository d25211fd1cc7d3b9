//! WeChat's two pieces of session-key cryptography:
//! - encrypted data (`wx.getUserInfo`, `wx.getWeRunData`, …): AES-128-CBC with PKCS#7,
//!   key = the user's session_key, IV from the client, both base64;
//! - `wxa/checksession`'s signature: hex(HMAC-SHA256(key = the session_key's base64
//!   text, message = "")).
//!
//! ring has no CBC mode, so the decryption uses RustCrypto's `aes` + `cbc`; the HMAC
//! stays on ring, the backend of everything else.

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, KeyIvInit};
use base64::Engine;

type Aes128CbcDec = cbc::Decryptor<aes::Aes128>;

/// The largest `encryptedData` accepted, in base64 characters (the body limit is 16 KiB anyway).
const MAX_ENCRYPTED_LEN: usize = 12 * 1024;

/// Why encrypted data could not be opened. The messages never quote the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    /// The request itself is malformed: not base64, wrong lengths.
    #[error("{0}")]
    BadInput(&'static str),
    /// Decryption under the stored session key gave no valid padding or no JSON:
    /// tampered data, or data encrypted under another (older or newer) session key.
    #[error(
        "The data could not be decrypted with this user's session key; log in again and retry."
    )]
    Failed,
    /// The decrypted data carries another app's watermark.
    #[error("The data's watermark names another mini-program.")]
    WatermarkMismatch,
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// Decrypts WeChat's `encryptedData` and parses it as a JSON object.
pub fn decrypt(
    session_key: &str,
    iv: &str,
    encrypted_data: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, DecryptError> {
    if encrypted_data.len() > MAX_ENCRYPTED_LEN {
        return Err(DecryptError::BadInput("encryptedData is too long."));
    }
    let key: [u8; 16] = decode_base64(session_key)
        .and_then(|k| k.try_into().ok())
        // The stored key is WeChat's: 16 bytes in base64. Anything else cannot decrypt.
        .ok_or(DecryptError::Failed)?;
    let iv: [u8; 16] = decode_base64(iv)
        .and_then(|v| v.try_into().ok())
        .ok_or(DecryptError::BadInput("iv must be base64 of 16 bytes."))?;
    let mut data = decode_base64(encrypted_data)
        .ok_or(DecryptError::BadInput("encryptedData must be base64."))?;
    if data.is_empty() || data.len() % 16 != 0 {
        return Err(DecryptError::BadInput(
            "encryptedData must be a whole number of 16-byte blocks.",
        ));
    }
    let plain = Aes128CbcDec::new(&key.into(), &iv.into())
        .decrypt_padded_mut::<Pkcs7>(&mut data)
        .map_err(|_| DecryptError::Failed)?;
    match serde_json::from_slice(plain) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        _ => Err(DecryptError::Failed),
    }
}

/// Decrypts and checks that `watermark.appid` is `appid` (several SDKs skip this:
/// without it, data a user produced in another mini-program would be accepted).
pub fn decrypt_for_app(
    appid: &str,
    session_key: &str,
    iv: &str,
    encrypted_data: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, DecryptError> {
    let data = decrypt(session_key, iv, encrypted_data)?;
    let watermark_appid = data
        .get("watermark")
        .and_then(|w| w.get("appid"))
        .and_then(|a| a.as_str());
    if watermark_appid != Some(appid) {
        return Err(DecryptError::WatermarkMismatch);
    }
    Ok(data)
}

/// `wxa/checksession`'s `signature` for a session key (`sig_method=hmac_sha256`).
pub fn checksession_signature(session_key: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, session_key.as_bytes());
    hex::encode(ring::hmac::sign(&key, b"").as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// WeChat's official demo (also in wechatpy's and easywechat's test suites).
    const APPID: &str = "wx4f4bc4dec97d474b";
    const SESSION_KEY: &str = "tiihtNczf5v6AKRyjwEUhQ==";
    const IV: &str = "r7BXXKkLb8qrSNn05n0qiA==";
    const ENCRYPTED: &str = "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS9uT5geRa0W4oTOb1WT7fJlAC+oNPdbB+3hVbJSRgv+4lGOETKUQz6OYStslQ142dNCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyxVLW1zAo6/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn/Hz7saL8xz+W//FRAUid1OksQaQx4CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4PC7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAYB6Y5anaHqZ9J6nKEBvB4DnNLIVWSgARns/8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYVoKlaRv85IfVunYzO0IKXsyl7JCUjCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuyDb/XcxxmK01EpqOyuxINew==";

    #[test]
    fn the_demo_vector_decrypts_to_its_393_bytes() {
        let data = decrypt_for_app(APPID, SESSION_KEY, IV, ENCRYPTED).unwrap();
        let text = serde_json::to_string(&data).unwrap();
        assert!(text.contains(r#""nickName":"Band""#), "{text}");
        assert_eq!(data["watermark"]["appid"], APPID);
        assert_eq!(data["watermark"]["timestamp"], 1477314187);
        // The plaintext length itself, before parsing.
        let mut raw = decode_base64(ENCRYPTED).unwrap();
        let key: [u8; 16] = decode_base64(SESSION_KEY).unwrap().try_into().unwrap();
        let iv: [u8; 16] = decode_base64(IV).unwrap().try_into().unwrap();
        let plain = Aes128CbcDec::new(&key.into(), &iv.into())
            .decrypt_padded_mut::<Pkcs7>(&mut raw)
            .unwrap();
        assert_eq!(plain.len(), 393);
        let plain = std::str::from_utf8(plain).unwrap();
        assert!(
            plain.contains(r#""watermark":{"timestamp":1477314187,"appid":"wx4f4bc4dec97d474b"}"#)
        );
    }

    #[test]
    fn another_apps_watermark_is_refused() {
        assert_eq!(
            decrypt_for_app("wxsomeoneelse", SESSION_KEY, IV, ENCRYPTED),
            Err(DecryptError::WatermarkMismatch)
        );
    }

    #[test]
    fn tampered_data_or_another_key_fails() {
        let mut raw = decode_base64(ENCRYPTED).unwrap();
        raw[3] ^= 0x01;
        let tampered = base64::engine::general_purpose::STANDARD.encode(raw);
        assert_eq!(
            decrypt(SESSION_KEY, IV, &tampered),
            Err(DecryptError::Failed)
        );
        assert_eq!(
            decrypt("AAAAAAAAAAAAAAAAAAAAAA==", IV, ENCRYPTED),
            Err(DecryptError::Failed)
        );
        assert!(matches!(
            decrypt(SESSION_KEY, "short", ENCRYPTED),
            Err(DecryptError::BadInput(_))
        ));
        assert!(matches!(
            decrypt(SESSION_KEY, IV, "AAAA"),
            Err(DecryptError::BadInput(_))
        ));
    }

    #[test]
    fn the_checksession_signature_matches_the_known_answer() {
        assert_eq!(
            checksession_signature("o0q0otL8aEzpcZL/FT9WsQ=="),
            "46e043c5525c2d817c44be603d30837a808a1d930d038f6fdc3e62a201fed128"
        );
    }
}
