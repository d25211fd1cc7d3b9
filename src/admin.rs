//! Operator commands (`wxauth users …`, `tokens revoke`, `keys …`, `backup`, `restore`).
//!
//! sled allows one process per data directory, so while the server runs it serves
//! these commands itself, over a Unix socket in the data directory (mode 0600
//! inside the 0700 directory: being able to open it is the authentication), and
//! its writes go through the owner actors like any other. With no server running,
//! the CLI opens the data directory and runs the same commands directly.
//!
//! Protocol: one JSON request line in (at most [`MAX_REQUEST_LINE`] bytes); JSON
//! lines out, ending with a status line `{"wxauth_admin": "ok"}` or
//! `{"wxauth_admin": "error", "error": "…"}`. Every request the server cannot run,
//! malformed or not, gets the error status line; the error never echoes the input.
//! A client that stops sending or stops reading for [`CLIENT_IO_TIMEOUT`] is dropped.

use crate::actors::issuer::{RevokeUserFamilies, TokenIssuer};
use crate::actors::registry::{RevokeTokens, SetDisabled, UserRegistry};
use crate::config::Config;
use crate::config::JwtConfig;
use crate::secret::Secret;
use crate::storage::{GroupCommit, SledStore, StorageError, Store, Tree, WriteBatch};
use crate::tokens::keys::KEYRING_FILE;
use crate::tokens::{records, JwtKeys, GENERATED_KEY_FILE};
use crate::users::{self, User, UserId};
use actix::Addr;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const SOCKET_FILE: &str = "admin.sock";
const STATUS_KEY: &str = "wxauth_admin";
const BACKUP_FORMAT: &str = "wxauth-backup";
const BACKUP_VERSION: u64 = 1;
const RESTORE_BATCH: usize = 10_000;
/// The longest request line the socket accepts (a real request is under 100 bytes).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// How long the server waits for an admin client to send its request, or to take
/// the next part of the output (a stalled backup reader is dropped after this).
pub const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    UsersList,
    UsersShow {
        id: UserId,
    },
    UsersSetDisabled {
        id: UserId,
        disabled: bool,
    },
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
}

/// The one place a key leaves a [`Secret`]: the request line to our own socket.
fn expose_secret<S: serde::Serializer>(key: &Option<Secret>, out: S) -> Result<S::Ok, S::Error> {
    match key {
        Some(secret) => out.serialize_some(secret.expose()),
        None => out.serialize_none(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no user with id {0}")]
    NoSuchUser(UserId),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
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

/// The operator's view of a user: everything but the session key.
pub fn user_view(user: &User) -> Value {
    json!({
        "id": user.id,
        "appid": user.appid,
        "openid": user.openid,
        "unionid": user.unionid,
        "created_at": users::rfc3339(user.created_at),
        "last_login_at": users::rfc3339(user.last_login_at),
        "disabled": user.disabled,
    })
}

/// Where a command's writes go.
pub enum Writes {
    /// Through the running server's owner actors, then its group commit.
    Server {
        registry: Addr<UserRegistry>,
        issuer: Addr<TokenIssuer>,
        commit: GroupCommit,
        runtime: tokio::runtime::Handle,
        keys: Arc<JwtKeys>,
    },
    /// Straight into the data directory (no server holds it), flushed at once.
    Direct {
        store: Arc<dyn Store>,
        registry: UserRegistry,
        /// Keys are loaded only by the `keys` commands: listing users needs no key file.
        jwt: JwtConfig,
    },
}

fn mailbox(e: actix::MailboxError) -> AdminError {
    AdminError::Server(format!("the server is shutting down ({e})"))
}

impl Writes {
    /// The server's live key set, or the data directory's when no server runs.
    fn keys(&self, data_dir: &Path) -> Result<Arc<JwtKeys>, AdminError> {
        match self {
            Writes::Server { keys, .. } => Ok(keys.clone()),
            Writes::Direct { jwt, .. } => JwtKeys::load(jwt, data_dir)
                .map(Arc::new)
                .map_err(|e| AdminError::Refused(e.to_string())),
        }
    }

    fn set_disabled(&mut self, id: UserId, disabled: bool) -> Result<Option<User>, AdminError> {
        match self {
            Writes::Server {
                registry,
                commit,
                runtime,
                ..
            } => runtime.block_on(async {
                let user = registry
                    .send(SetDisabled {
                        user_id: id,
                        disabled,
                    })
                    .await
                    .map_err(mailbox)??;
                commit.durable().await?;
                Ok(user)
            }),
            Writes::Direct {
                store, registry, ..
            } => {
                let user = registry.set_disabled(id, disabled)?;
                store.flush()?;
                Ok(user)
            }
        }
    }

    /// Sets the user's `tokens_not_before` and revokes its refresh-token families.
    fn revoke_tokens(&mut self, id: UserId) -> Result<Option<usize>, AdminError> {
        match self {
            Writes::Server {
                registry,
                issuer,
                runtime,
                ..
            } => runtime.block_on(async {
                if registry
                    .send(RevokeTokens { user_id: id })
                    .await
                    .map_err(mailbox)??
                    .is_none()
                {
                    return Ok(None);
                }
                // Durable on return; its commit also covers the registry's write.
                let families = issuer
                    .send(RevokeUserFamilies { user_id: id })
                    .await
                    .map_err(mailbox)??;
                Ok(Some(families))
            }),
            Writes::Direct {
                store, registry, ..
            } => {
                if registry.revoke_tokens(id)?.is_none() {
                    return Ok(None);
                }
                let families =
                    records::revoke_user_families(store.as_ref(), id, crate::now_unix())?;
                store.flush()?;
                Ok(Some(families))
            }
        }
    }
}

fn line(out: &mut dyn Write, value: &Value) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")
}

/// Runs one request, writing its output as JSON lines to `out`. Reads (and the
/// backup's snapshot) use `store` directly; writes go through `writes`.
pub fn execute(
    request: &Request,
    store: &dyn Store,
    data_dir: &Path,
    writes: &mut Writes,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    match *request {
        Request::UsersList => {
            let mut result = Ok(());
            store.for_each(Tree::Users, &mut |_, value| {
                result = users::decode(value)
                    .map_err(AdminError::from)
                    .and_then(|user| Ok(line(out, &user_view(&user))?));
                if result.is_ok() {
                    std::ops::ControlFlow::Continue(())
                } else {
                    std::ops::ControlFlow::Break(())
                }
            })?;
            result
        }
        Request::UsersShow { id } => {
            let user = users::load(store, id)?.ok_or(AdminError::NoSuchUser(id))?;
            Ok(line(out, &user_view(&user))?)
        }
        Request::UsersSetDisabled { id, disabled } => {
            let user = writes
                .set_disabled(id, disabled)?
                .ok_or(AdminError::NoSuchUser(id))?;
            Ok(line(out, &user_view(&user))?)
        }
        Request::TokensRevoke { user } => {
            let families = writes
                .revoke_tokens(user)?
                .ok_or(AdminError::NoSuchUser(user))?;
            Ok(line(
                out,
                &json!({ "user_id": user, "families_revoked": families }),
            )?)
        }
        Request::Backup => match writes {
            // The server's writers wait only while the snapshot is written to disk.
            Writes::Server { .. } => spooled_backup(store, data_dir, out),
            // No server: nobody waits, and `out` is the operator's file already.
            Writes::Direct { .. } => backup(store, data_dir, out),
        },
        Request::KeysList => {
            for key in writes.keys(data_dir)?.list() {
                line(out, &key)?;
            }
            Ok(())
        }
        Request::KeysRotate { ref key } => {
            let made = writes.keys(data_dir)?.rotate(key.as_ref())?;
            Ok(line(out, &made)?)
        }
        Request::KeysRetire { ref kid } => {
            writes.keys(data_dir)?.retire(kid)?;
            Ok(line(out, &json!({ "retired": kid }))?)
        }
    }
}

/// A backup for a client that may read slowly or not at all: the snapshot goes to
/// a private scratch file in the data directory first (writes wait only for that),
/// then the file is streamed to `out` with the writers free again.
fn spooled_backup(
    store: &dyn Store,
    data_dir: &Path,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(format!(".backup-spool-{}", crate::random_hex(8)));
    // create_new: never a file (or symlink) someone else put there; 0600: it holds
    // the signing key and session keys.
    let mut spool = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    // Unlinked at once: the open handle is all we need, and whatever happens next
    // (an error, a dropped client, a crash) nothing is left behind.
    std::fs::remove_file(&path)?;
    {
        let mut writer = std::io::BufWriter::new(&mut spool);
        backup(store, data_dir, &mut writer)?;
        writer.flush()?;
    }
    spool.rewind()?;
    std::io::copy(&mut spool, out)?;
    out.flush()?;
    Ok(())
}

/// The key files of the data directory a backup carries: the generated signing key
/// and the key ring of `wxauth keys rotate`.
const KEY_FILES: [&str; 2] = [GENERATED_KEY_FILE, KEYRING_FILE];

/// A JSON-lines snapshot: a header, the key files (those that exist),
/// every entry of every tree as of one instant, and a closing line with the count.
fn backup(store: &dyn Store, data_dir: &Path, out: &mut dyn Write) -> Result<(), AdminError> {
    let header = json!({
        "format": BACKUP_FORMAT,
        "version": BACKUP_VERSION,
        "created_at": users::rfc3339(crate::now_unix()),
    });
    line(out, &header)?;
    for file in KEY_FILES {
        match std::fs::read_to_string(data_dir.join(file)) {
            Ok(content) => line(out, &json!({ "file": file, "content": content }))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut entries: u64 = 0;
    store.snapshot(&mut |tree, key, value| {
        let mut entry = json!({ "tree": tree.name(), "key": hex::encode(key) });
        // Records are JSON: keep them readable. Anything else (counters) as hex.
        match serde_json::from_slice::<Value>(value) {
            Ok(record) if record.is_object() => entry["value"] = record,
            _ => entry["value_hex"] = Value::String(hex::encode(value)),
        }
        entries += 1;
        line(out, &entry).map_err(|e| StorageError::Io(format!("writing the backup: {e}")))
    })?;
    line(out, &json!({ "end": true, "entries": entries }))?;
    out.flush()?;
    Ok(())
}

/// Restores a backup into an empty (or missing) data directory. On any error what
/// it wrote is removed again. An existing directory keeps its owner: files restored
/// by root into the service's directory are handed to the directory's owner, so the
/// service (systemd's `DynamicUser=` included) can open them.
pub fn restore(file: &Path, data_dir: &Path, cache_capacity: u64) -> Result<u64, AdminError> {
    use std::os::unix::fs::MetadataExt;
    let existing = std::fs::metadata(data_dir).ok();
    if std::fs::read_dir(data_dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(AdminError::Refused(format!(
            "{} is not empty: restore only into an empty or new data directory",
            data_dir.display()
        )));
    }
    let input = BufReader::new(std::fs::File::open(file)?);
    let result = restore_into(input, data_dir, cache_capacity);
    match (&result, &existing) {
        (Err(_), Some(_)) => empty_directory(data_dir),
        (Err(_), None) => {
            let _ = std::fs::remove_dir_all(data_dir);
        }
        (Ok(_), Some(meta)) => chown_tree(data_dir, meta.uid(), meta.gid())?,
        (Ok(_), None) => {}
    }
    result
}

/// Removes what is inside `dir` (which may be reached through a symlink).
fn empty_directory(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        if path.is_dir() && !path.is_symlink() {
            chown_tree(&path, uid, gid)?;
        }
    }
    Ok(())
}

fn restore_into(
    input: impl BufRead,
    data_dir: &Path,
    cache_capacity: u64,
) -> Result<u64, AdminError> {
    let bad = |n: usize, why: &str| AdminError::Refused(format!("backup line {n}: {why}"));
    let store = SledStore::open(data_dir, cache_capacity)?;
    let mut lines = input.lines().enumerate();
    let header: Value = match lines.next() {
        Some((_, text)) => {
            serde_json::from_str(&text?).map_err(|_| bad(1, "not a wxauth backup"))?
        }
        None => return Err(bad(1, "the file is empty")),
    };
    if header["format"] != BACKUP_FORMAT || header["version"] != BACKUP_VERSION {
        return Err(bad(1, "not a wxauth backup of version 1"));
    }
    let mut batch = WriteBatch::default();
    let mut restored: u64 = 0;
    for (i, text) in lines {
        let n = i + 1;
        let entry: Value = serde_json::from_str(&text?).map_err(|_| bad(n, "not JSON"))?;
        if entry["end"] == true {
            if entry["entries"].as_u64() != Some(restored) {
                return Err(bad(
                    n,
                    "the entry count does not match: the backup is incomplete",
                ));
            }
            store.apply(std::mem::take(&mut batch))?;
            store.flush()?;
            return Ok(restored);
        }
        if let Some(name) = entry["file"].as_str() {
            let name = KEY_FILES
                .into_iter()
                .find(|file| *file == name)
                .ok_or_else(|| bad(n, "unknown file"))?;
            let content = entry["content"]
                .as_str()
                .ok_or_else(|| bad(n, "no content"))?;
            write_private_file(&data_dir.join(name), content.as_bytes())?;
            continue;
        }
        let tree = Tree::ALL
            .into_iter()
            .find(|t| entry["tree"].as_str() == Some(t.name()))
            .ok_or_else(|| bad(n, "unknown tree"))?;
        let key = entry["key"]
            .as_str()
            .and_then(|k| hex::decode(k).ok())
            .ok_or_else(|| bad(n, "bad key"))?;
        let value = match (&entry["value"], entry["value_hex"].as_str()) {
            (Value::Object(_), _) => {
                serde_json::to_vec(&entry["value"]).expect("a JSON value serializes")
            }
            (_, Some(h)) => hex::decode(h).map_err(|_| bad(n, "bad value_hex"))?,
            _ => return Err(bad(n, "no value")),
        };
        batch.put(tree, key, value);
        restored += 1;
        if batch.len() >= RESTORE_BATCH {
            store.apply(std::mem::take(&mut batch))?;
        }
    }
    Err(AdminError::Refused(
        "the backup has no closing line: it is incomplete".into(),
    ))
}

fn write_private_file(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(content)?;
    file.sync_all()
}

/// The running server's side: what a connection needs to execute requests.
#[derive(Clone)]
pub struct ServerContext {
    pub store: Arc<dyn Store>,
    pub data_dir: PathBuf,
    pub registry: Addr<UserRegistry>,
    pub issuer: Addr<TokenIssuer>,
    pub commit: GroupCommit,
    pub runtime: tokio::runtime::Handle,
    pub keys: Arc<JwtKeys>,
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
        .set_read_timeout(Some(CLIENT_IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CLIENT_IO_TIMEOUT)));
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
        failed: false,
    });
    let result = match request {
        Ok(request) => {
            tracing::info!(?request, "admin command");
            let mut writes = Writes::Server {
                registry: ctx.registry.clone(),
                issuer: ctx.issuer.clone(),
                commit: ctx.commit.clone(),
                runtime: ctx.runtime.clone(),
                keys: ctx.keys.clone(),
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
        Err(e) => json!({ STATUS_KEY: "error", "error": e.to_string() }),
    };
    if line(&mut out, &status).and_then(|_| out.flush()).is_err() {
        tracing::warn!("admin client stopped reading: connection dropped");
    }
}

/// The socket towards an admin client. Once a write failed or waited out the
/// timeout (the client went away or stopped reading), every later write fails at
/// once instead of waiting out the timeout again.
struct ClientWriter {
    stream: UnixStream,
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
        if written.is_err() || started.elapsed() >= CLIENT_IO_TIMEOUT {
            self.failed = true;
        }
        written
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The CLI's side: send `request` to the running server, or, when none answers on
/// the socket, run it on the data directory directly. Output goes to `out`.
pub fn run(request: &Request, cfg: &Config, out: &mut dyn Write) -> Result<(), AdminError> {
    let data_dir = &cfg.storage.path;
    if let Ok(stream) = UnixStream::connect(data_dir.join(SOCKET_FILE)) {
        return remote(stream, request, out);
    }
    // A wrong storage.path must not quietly become a new, empty database.
    if !data_dir.is_dir() {
        return Err(AdminError::Refused(format!(
            "no data directory at {}: check storage.path (nothing was created)",
            data_dir.display()
        )));
    }
    let store: Arc<dyn Store> = match SledStore::open(data_dir, cfg.storage.cache_capacity) {
        Ok(store) => Arc::new(store),
        Err(StorageError::Locked(path)) => {
            return Err(AdminError::Refused(format!(
                "a wxauth server holds {path} but does not answer on its {SOCKET_FILE}"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let registry = UserRegistry::new(store.clone(), cfg.wechat.link_by_unionid)?;
    let mut writes = Writes::Direct {
        store: store.clone(),
        registry,
        jwt: cfg.jwt.clone(),
    };
    execute(request, store.as_ref(), data_dir, &mut writes, out)
}

fn remote(stream: UnixStream, request: &Request, out: &mut dyn Write) -> Result<(), AdminError> {
    let mut writer = stream.try_clone()?;
    serde_json::to_writer(&mut writer, request).map_err(std::io::Error::from)?;
    writer.write_all(b"\n")?;
    for text in BufReader::new(stream).lines() {
        let text = text?;
        if text.contains(STATUS_KEY) {
            if let Ok(status) = serde_json::from_str::<Value>(&text) {
                match status[STATUS_KEY].as_str() {
                    Some("ok") => return Ok(()),
                    Some(_) => {
                        let error = status["error"]
                            .as_str()
                            .unwrap_or("the server refused the command");
                        return Err(AdminError::Server(error.to_string()));
                    }
                    None => {}
                }
            }
        }
        out.write_all(text.as_bytes())?;
        out.write_all(b"\n")?;
    }
    Err(AdminError::Server(
        "the server closed the connection early".into(),
    ))
}
