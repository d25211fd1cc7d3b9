//! Operator commands (`wxauth users …`, `tokens revoke`, `keys …`, `backup`, `restore`).
//!
//! sled allows one process per data directory, so while the server runs it serves
//! these commands itself, over a Unix socket in the data directory (mode 0600
//! inside the 0700 directory: being able to open it is the authentication), and
//! its writes go through the owner actors like any other. With no server running,
//! the CLI opens the data directory and runs the same commands directly.
//!
//! - [`protocol`]: the request types and the line framing, shared by both sides;
//! - [`server`]: the socket, in the running server;
//! - [`client`]: the CLI side (socket, or the data directory directly);
//! - [`commands`]: what each request does;
//! - [`backup`]: backup and restore; `files`: the file-system helpers restore uses.
//!
//! A client that stops sending or stops reading for `admin.io_timeout` is dropped.

mod backup;
mod client;
mod commands;
mod files;
mod protocol;
mod server;

pub use backup::restore;
pub use client::run;
pub use commands::{execute, user_view, WriteTarget};
pub use protocol::{
    parse_request, read_request_line, Request, RequestError, MAX_REQUEST_LINE, SOCKET_FILE,
};
pub use server::{serve, ServerContext};

use crate::storage::StorageError;
use crate::users::UserId;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no user with id {0}")]
    NoSuchUser(UserId),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The server answered with an error.
    #[error("{0}")]
    Server(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    BadRequest(#[from] RequestError),
    #[error(transparent)]
    Key(#[from] crate::tokens::KeyError),
}
