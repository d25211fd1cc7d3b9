//! The `Authorization` header (src/http/auth.rs `bearer_token`), then access-token
//! verification with a fixed HS256 key. Must never panic, and must never accept a
//! token that the key did not sign.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use wxauth::config::JwtConfig;
use wxauth::tokens::JwtKeys;

/// The fixed HMAC key; the seed corpus holds tokens signed with it (fuzz/README.md).
pub const KEY: &str = "wxauth-fuzz-fixed-hs256-key-0123456789abcdef";

fn keys() -> &'static JwtKeys {
    static KEYS: OnceLock<JwtKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        // JwtKeys reads its key from a file, as the server does.
        let path = std::env::temp_dir().join(format!("wxauth-fuzz-key-{}", std::process::id()));
        std::fs::write(&path, KEY).expect("write the key file");
        let cfg = JwtConfig {
            signing_key_file: Some(path.clone()),
            ..JwtConfig::default()
        };
        let keys = JwtKeys::load(&cfg, &std::env::temp_dir()).expect("a valid HS256 key");
        let _ = std::fs::remove_file(path);
        keys
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(claims) = wxauth::fuzzing::fuzz_bearer(keys(), data) {
        // Only a token that verified: an access token, unexpired.
        assert_eq!(claims.token_type, wxauth::tokens::TokenType::Access);
    }
});
