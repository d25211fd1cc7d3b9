//! The request-body extractor shared by every POST endpoint: JSON or form, at most
//! 16 KiB, an object of fields. Each endpoint then asks for the fields it needs,
//! and every failure is a contract error (400/413/415), never actix-web's text.

use crate::http::error::ApiError;
use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use serde_json::{Map, Value};

pub const MAX_BODY_BYTES: usize = 16 * 1024;

enum BodyKind {
    Json,
    Form,
}

/// The decoded fields of a request body.
pub struct Fields(Map<String, Value>);

/// Field names only: the values are codes, tokens and the like. A name that does not
/// look like one of ours is hidden too (a form body `eyJ…` without `=` is a field
/// named by a token).
impl std::fmt::Debug for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const REDACTED: &str = "[redacted]";
        let shown = |name: &str| {
            name.len() <= 16 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        let mut map = f.debug_map();
        for name in self.0.keys() {
            let name = if shown(name) { name.as_str() } else { REDACTED };
            map.key(&format_args!("{name}"))
                .value(&format_args!("{REDACTED}"));
        }
        map.finish()
    }
}

impl Fields {
    /// A required string field.
    pub fn required_str(&self, name: &str) -> Result<&str, ApiError> {
        self.optional_str(name)?
            .ok_or_else(|| ApiError::InvalidRequest(format!("The field `{name}` is required.")))
    }

    /// An optional string field (absent and `null` are the same).
    pub fn optional_str(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::InvalidRequest(format!(
                "The field `{name}` must be a string."
            ))),
        }
    }

    /// Like [`optional_str`](Self::optional_str), but an explicit `null` is refused:
    /// for fields where `null` could be read as "clear it", which they cannot do.
    pub fn optional_str_not_null(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.0.get(name) {
            Some(Value::Null) => Err(ApiError::InvalidRequest(format!(
                "The field `{name}` must be a string."
            ))),
            _ => self.optional_str(name),
        }
    }
}

fn body_kind(req: &HttpRequest) -> Result<Option<BodyKind>, ApiError> {
    let Some(value) = req.headers().get(header::CONTENT_TYPE) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("");
    let essence = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(Some(BodyKind::Json)),
        "application/x-www-form-urlencoded" => Ok(Some(BodyKind::Form)),
        _ => Err(ApiError::UnsupportedMediaType(essence)),
    }
}

fn decode(kind: Option<BodyKind>, bytes: &[u8]) -> Result<Fields, ApiError> {
    match kind {
        // No Content-Type: an empty body is an empty form; anything else is unlabelled.
        None if bytes.is_empty() => Ok(Fields(Map::new())),
        None => Err(ApiError::UnsupportedMediaType(String::new())),
        Some(BodyKind::Json) => match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => Ok(Fields(map)),
            Ok(_) => Err(ApiError::InvalidRequest(
                "The request body must be a JSON object.".into(),
            )),
            Err(_) => Err(ApiError::InvalidRequest(
                "The request body is not valid JSON.".into(),
            )),
        },
        Some(BodyKind::Form) => {
            let pairs: Vec<(String, String)> =
                serde_urlencoded::from_bytes(bytes).map_err(|_| {
                    ApiError::InvalidRequest("The request body is not a valid form.".into())
                })?;
            Ok(Fields(
                pairs
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect(),
            ))
        }
    }
}

impl FromRequest for Fields {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let kind = body_kind(req);
        let declared_len = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let mut payload = payload.take();
        Box::pin(async move {
            if declared_len.is_some_and(|n| n > MAX_BODY_BYTES) {
                return Err(ApiError::PayloadTooLarge);
            }
            let kind = kind?;
            let mut body = Vec::with_capacity(declared_len.unwrap_or(256).min(MAX_BODY_BYTES));
            while let Some(chunk) = payload.next().await {
                let chunk = chunk.map_err(|_| {
                    ApiError::InvalidRequest("The request body could not be read.".into())
                })?;
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(ApiError::PayloadTooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            decode(kind, &body)
        })
    }
}

/// For fuzz/ (`body`): the parser behind [`Fields`], for a JSON or a form body.
#[doc(hidden)]
pub fn fuzz_decode(json: bool, bytes: &[u8]) -> Result<Fields, ApiError> {
    decode(
        Some(if json { BodyKind::Json } else { BodyKind::Form }),
        bytes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_field_names_never_values() {
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyX2lkIjoxfQ.c2lnbmF0dXJlc2lnbmF0dXJl";
        let body = format!(r#"{{"code": "0a1B2c3D4e5F", "refresh": "{token}", "n": 5}}"#);
        let fields = decode(Some(BodyKind::Json), body.as_bytes()).unwrap();
        let debug = format!("{fields:?}");
        assert_eq!(
            debug,
            "{code: [redacted], n: [redacted], refresh: [redacted]}"
        );
        // A form body that is only a token: its "name" is the secret.
        let fields = decode(Some(BodyKind::Form), token.as_bytes()).unwrap();
        let debug = format!("{fields:?}");
        assert_eq!(debug, "{[redacted]: [redacted]}");
    }
}
