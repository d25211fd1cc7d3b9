//! WeChat: what its API answers, shared by the login workers, the access-token
//! keeper and the storage model.

pub mod errors;
pub mod resolver;
pub mod wire;

use crate::secret::SessionKey;

/// What WeChat tells us about a code.
#[derive(Debug, Clone)]
pub struct Session {
    pub openid: String,
    pub unionid: Option<String>,
    pub session_key: SessionKey,
}

/// The `meta` key of an app's stored access-token record.
pub fn token_key(appid: &str) -> Vec<u8> {
    let mut key = b"wechat_access_token\0".to_vec();
    key.extend_from_slice(appid.as_bytes());
    key
}
