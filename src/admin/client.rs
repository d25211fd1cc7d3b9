//! The CLI's side: talk to the running server over its socket, or, with no server
//! running, open the data directory and run the command directly.

use super::commands::{execute, WriteTarget};
use super::protocol::{Request, SOCKET_FILE, STATUS_KEY};
use super::AdminError;
use crate::config::{Config, StorageBackend};
use crate::storage::sled_model::SledModel;
use crate::storage::{self, GroupCommit, StorageError};
use crate::users::cache::UserCache;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

/// The CLI's side: send `request` to the running server, or, when none answers on
/// the socket, run it on the data directory directly. Output goes to `out`.
pub fn run(request: &Request, cfg: &Config, out: &mut dyn Write) -> Result<(), AdminError> {
    let data_dir = &cfg.storage.path;
    if cfg.storage.backend == StorageBackend::Postgres {
        return direct_postgres(request, cfg, out);
    }
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
    let store = match storage::upgrade::open(&cfg.storage) {
        Ok(store) => store,
        Err(StorageError::Locked(path)) => {
            return Err(AdminError::Refused(format!(
                "a wxauth server holds {path} but does not answer on its {SOCKET_FILE}"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let commit = GroupCommit::start(store.clone());
    let mut model = SledModel::new(store.clone(), commit.clone(), Arc::new(UserCache::new(0)))?;
    // The changes made here are reported too; the server delivers them when it runs.
    if cfg.events.webhook_url.is_some() {
        model = model.with_events(crate::events::Outbox::open(store.as_ref())?);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(AdminError::from)?;
    let mut writes = WriteTarget::Direct {
        model: Arc::new(model),
        runtime,
        jwt: Box::new(cfg.jwt.clone()),
        deletion_delay: cfg.users.deletion_delay,
        shared_outbox: None,
    };
    let result = execute(request, store.as_ref(), data_dir, &mut writes, out);
    commit.shutdown();
    result
}

/// With `storage.backend = "postgres"` the database is the one truth every node
/// reads: the command runs on it directly, whether nodes run or not. The users it
/// changes are announced to every node's cache (`storage::postgres`).
///
/// The key commands (and the backup, which carries the key files) work on a copy of
/// the database's key files in a private directory of their own, never in a node's
/// data directory; a changed key ring is written back only if nobody changed it
/// meanwhile (`storage::postgres::keys`).
fn direct_postgres(request: &Request, cfg: &Config, out: &mut dyn Write) -> Result<(), AdminError> {
    use storage::postgres::keys::KEY_FILES;
    let mut store = storage::postgres::PgStore::open(&cfg.storage)?;
    // The changes made here are reported too; the nodes deliver them.
    if cfg.events.webhook_url.is_some() {
        store = store.with_events(Arc::new(crate::events::Wake::default()));
    }
    let store = Arc::new(store);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(AdminError::from)?;
    let mut writes = WriteTarget::Direct {
        model: store.clone(),
        runtime,
        jwt: Box::new(cfg.jwt.clone()),
        deletion_delay: cfg.users.deletion_delay,
        shared_outbox: Some(store.clone()),
    };
    let key_dir = std::env::temp_dir().join(format!("wxauth-keys-{}", crate::ids::random_hex(8)));
    let result = (|| {
        store.pull_key_files(&key_dir, false)?;
        let pulled: Vec<Option<Vec<u8>>> = KEY_FILES
            .iter()
            .map(|name| std::fs::read(key_dir.join(name)).ok())
            .collect();
        execute(request, store.as_ref(), &key_dir, &mut writes, out)?;
        for (name, pulled) in KEY_FILES.into_iter().zip(pulled) {
            if !store.push_key_file(&key_dir, name, pulled)? {
                return Err(AdminError::Refused(format!(
                    "{name} changed in the database while this command ran: nothing was \
                     changed; run it again"
                )));
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&key_dir);
    result
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
