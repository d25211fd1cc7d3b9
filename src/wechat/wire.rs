//! WeChat's wire protocol: what the login workers and the access-token keeper share.

use super::errors::WeChatError;

pub(crate) fn transport_error(e: ureq::Error) -> WeChatError {
    match e {
        ureq::Error::Timeout(_) => WeChatError::Timeout,
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
            WeChatError::Connect(e.to_string())
        }
        ureq::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            WeChatError::Connect(io.kind().to_string())
        }
        // Its text would contain the URL, and so the secret.
        ureq::Error::BadUri(_) => WeChatError::Malformed("bad URL: check wechat.api_base".into()),
        // Anything else may have happened after the request left: not retried. Only
        // the kind is kept: some ureq errors carry the URL (the secret) or header values.
        other => WeChatError::Malformed(format!("transport error: {}", error_kind(&other))),
    }
}

/// What was wrong with a JSON answer, without serde's text: that quotes the
/// offending value, which WeChat (or whoever answers in its place) chose.
pub(crate) fn json_error_kind(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "JSON of the wrong shape",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    format!("{kind} (line {}, column {})", e.line(), e.column())
}

/// A ureq error's kind, without its text (which may hold the URL or what WeChat sent).
pub(crate) fn error_kind(e: &ureq::Error) -> String {
    let kind = match e {
        ureq::Error::Io(io) => return format!("I/O ({})", io.kind()),
        ureq::Error::Protocol(_) => "HTTP protocol",
        ureq::Error::Http(_) => "HTTP request",
        ureq::Error::BadUri(_) => "bad URL",
        ureq::Error::Timeout(_) => "timeout",
        ureq::Error::HostNotFound => "host not found",
        ureq::Error::ConnectionFailed => "connection failed",
        ureq::Error::TooManyRedirects | ureq::Error::RedirectFailed => "redirect",
        ureq::Error::LargeResponseHeader(..) => "response header too large",
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_) => "TLS",
        ureq::Error::Decompress(..) => "decompression",
        _ => "other",
    };
    kind.to_string()
}

/// A 200 answer's body, at most `limit` bytes.
pub(crate) fn read_body(
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    limit: u64,
) -> Result<Vec<u8>, WeChatError> {
    let mut response = response.map_err(transport_error)?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(WeChatError::Http(status));
    }
    response
        .body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::Timeout(_) => WeChatError::Timeout,
            other => WeChatError::Malformed(format!("reading the body: {}", error_kind(&other))),
        })
}
