//! The admin line protocol: the types and framing both the server and the client use.
//!
//! One JSON request line in (at most [`MAX_REQUEST_LINE`] bytes); JSON lines out,
//! ending with a status line `{"wxauth_admin": "ok"}` or
//! `{"wxauth_admin": "error", "error": "…"}`. Every request the server cannot run,
//! malformed or not, gets the error status line; the error never echoes the input.

use crate::secret::Secret;
use crate::users::UserId;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::{BufRead, Read, Write};

pub const SOCKET_FILE: &str = "admin.sock";
/// The key of the status line that ends every answer.
pub(super) const STATUS_KEY: &str = "wxauth_admin";
/// The longest request line the socket accepts (a real request is under 100 bytes).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    UsersList,
    UsersShow {
        id: UserId,
    },
    /// The user's families (sessions), one line each.
    UsersSessions {
        id: UserId,
    },
    /// Everything held on the user (`users::export`).
    UsersExport {
        id: UserId,
    },
    /// Deletes the account: marked for `users.deletion_delay`, or erased at once
    /// (`now`, or a delay of 0).
    UsersDelete {
        id: UserId,
        #[serde(default)]
        now: bool,
    },
    UsersSetDisabled {
        id: UserId,
        disabled: bool,
    },
    /// The outbox: every pending or given-up event.
    EventsList,
    /// Every waiting or given-up event is due now.
    EventsRetry,
    TokensRevoke {
        user: UserId,
    },
    Backup,
    KeysList,
    /// `key`: the PEM private key or HMAC secret to sign with from now on; `None`
    /// generates one of the configured algorithm.
    KeysRotate {
        #[serde(default, serialize_with = "expose_secret")]
        key: Option<Secret>,
    },
    KeysRetire {
        kid: String,
    },
    /// Sign with the rotated-in key `kid` from now on, before `jwt.jwks_max_age`.
    KeysActivate {
        kid: String,
    },
    /// The stored access token's status (one app, or every app with a stored token).
    WechatToken {
        appid: Option<String>,
    },
    /// Does WeChat still hold the user's session key? (`wxa/checksession`)
    UsersCheckSession {
        id: UserId,
    },
}

/// The one place a key leaves a [`Secret`]: the request line to our own socket.
fn expose_secret<S: serde::Serializer>(key: &Option<Secret>, out: S) -> Result<S::Ok, S::Error> {
    match key {
        Some(secret) => out.serialize_some(secret.expose()),
        None => out.serialize_none(),
    }
}

/// Why a request line was refused. The messages are fixed: none repeats the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request too long (at most 65536 bytes)")]
    TooLong,
    #[error("bad request: not valid UTF-8")]
    NotUtf8,
    #[error("bad request: not a JSON object on one line")]
    NotJson,
    #[error("bad request: not a wxauth admin request (unknown command or fields)")]
    NotARequest,
    #[error("could not read the request: {0}")]
    Read(String),
}

/// Reads one request line, newline excluded, without ever holding more than
/// [`MAX_REQUEST_LINE`] + 1 bytes of it. `Ok(None)`: the client sent nothing at all.
/// A longer line is refused at once; the rest of it is never read.
pub fn read_request_line(input: &mut impl BufRead) -> Result<Option<Vec<u8>>, RequestError> {
    let mut line = Vec::new();
    input
        .take(MAX_REQUEST_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| RequestError::Read(e.to_string()))?;
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_REQUEST_LINE {
        return Err(RequestError::TooLong);
    } else if line.is_empty() {
        return Ok(None);
    }
    Ok(Some(line))
}

/// Parses a request line (as [`read_request_line`] returns it).
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    let text = std::str::from_utf8(line).map_err(|_| RequestError::NotUtf8)?;
    serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => RequestError::NotARequest,
        _ => RequestError::NotJson,
    })
}

/// Writes `value` as one JSON line.
pub(super) fn write_line(out: &mut dyn Write, value: &Value) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")
}
