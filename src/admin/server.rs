//! The running server's side: the Unix socket in the data directory, served on
//! plain threads. Being able to open the socket (mode 0600 inside the 0700 data
//! directory) is the authentication.

use super::commands::{execute, WriteTarget};
use super::protocol::{
    parse_request, read_request_line, write_line, Request, SOCKET_FILE, STATUS_KEY,
};
use crate::actors::issuer::TokenIssuer;
use crate::actors::registry::UserRegistry;
use crate::storage::{GroupCommit, Store};
use actix::Addr;
use serde_json::json;
use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The running server's side: what a connection needs to execute requests.
#[derive(Clone)]
pub struct ServerContext {
    pub store: Arc<dyn Store>,
    pub data_dir: PathBuf,
    pub registry: Addr<UserRegistry>,
    pub issuer: Addr<TokenIssuer>,
    pub keeper: crate::actors::access_token::AccessTokenKeeper,
    pub commit: GroupCommit,
    pub runtime: tokio::runtime::Handle,
    pub keys: Arc<crate::tokens::JwtKeys>,
    /// The embedded store's event delivery thread, when events are on.
    pub delivery_thread: Option<crate::events::DeliveryThread>,
    /// How long the server waits for a client to send its request, or to take the
    /// next part of the output (`admin.io_timeout`; a stalled backup reader is
    /// dropped after this).
    pub io_timeout: Duration,
}

/// Binds `admin.sock` in the data directory (mode 0600) and serves it on plain
/// threads: admin commands are rare, and a backup may stream for a while.
pub fn serve(ctx: ServerContext) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = ctx.data_dir.join(SOCKET_FILE);
    // A socket left by a killed server: we hold the data directory's lock now.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("wxauth-admin".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let ctx = ctx.clone();
                let _ = std::thread::Builder::new()
                    .name("wxauth-admin-conn".into())
                    .spawn(move || serve_connection(stream, &ctx));
            }
        })?;
    Ok(path)
}

fn serve_connection(stream: UnixStream, ctx: &ServerContext) {
    // A client that stops sending, or stops reading a backup, is dropped: it never
    // holds this thread (or anything else) for longer than the timeout.
    let timeouts = stream
        .set_read_timeout(Some(ctx.io_timeout))
        .and_then(|()| stream.set_write_timeout(Some(ctx.io_timeout)));
    let Ok(reader) = timeouts.and_then(|()| stream.try_clone()) else {
        return;
    };
    let request = match read_request_line(&mut BufReader::new(reader)) {
        Ok(None) => return,
        Ok(Some(line)) => parse_request(&line),
        Err(e) => Err(e),
    };
    let mut out = std::io::BufWriter::new(ClientWriter {
        stream,
        timeout: ctx.io_timeout,
        failed: false,
    });
    let result = match request {
        Ok(request) => {
            match &request {
                // A kid asked for is whatever was typed or pasted: not logged.
                Request::KeysRetire { .. } => {
                    tracing::info!(command = "keys_retire", "admin command")
                }
                other => tracing::info!(request = ?other, "admin command"),
            }
            let mut writes = WriteTarget::Server {
                registry: ctx.registry.clone(),
                issuer: ctx.issuer.clone(),
                keeper: ctx.keeper.clone(),
                commit: ctx.commit.clone(),
                runtime: ctx.runtime.clone(),
                keys: ctx.keys.clone(),
                delivery_thread: ctx.delivery_thread.clone(),
            };
            execute(
                &request,
                ctx.store.as_ref(),
                &ctx.data_dir,
                &mut writes,
                &mut out,
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "admin request refused");
            Err(e.into())
        }
    };
    let status = match result {
        Ok(()) => json!({ STATUS_KEY: "ok" }),
        Err(e) => json!({ STATUS_KEY: "error", "error": crate::cause::cause_chain(&e) }),
    };
    if write_line(&mut out, &status)
        .and_then(|_| out.flush())
        .is_err()
    {
        tracing::warn!("admin client stopped reading: connection dropped");
    }
}

/// The socket towards an admin client. Once a write failed or waited out the
/// timeout (the client went away or stopped reading), every later write fails at
/// once instead of waiting out the timeout again.
struct ClientWriter {
    stream: UnixStream,
    timeout: Duration,
    failed: bool,
}

impl Write for ClientWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.failed {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        let started = std::time::Instant::now();
        let written = self.stream.write(buf);
        // The kernel fails a write only when it sent nothing before the timeout; one
        // that sent a part and then waited out the timeout is a stalled client too.
        if written.is_err() || started.elapsed() >= self.timeout {
            self.failed = true;
        }
        written
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
