//! The signing keys in the database: every node signs with the same key, and
//! `wxauth keys rotate|retire` reaches every node.
//!
//! The key code (`tokens`) keeps its two files in a data directory: the generated
//! HMAC key (`jwt_signing_key`) and the key ring (`jwt_keys.json`). With PostgreSQL
//! the database holds the truth (`wxauth_kv`, tree `files`) and each node's data
//! directory a copy:
//! - at start a node copies both down ([`PgStore::pull_key_files`]); the generated key
//!   is created there first, by whichever node starts first (`INSERT ... ON CONFLICT
//!   DO NOTHING`: one key however many nodes start at once);
//! - every [`KEY_POLL`] a node compares the database's ring with the one it
//!   loaded, and on a change writes its copy and reloads its key set: a rotation
//!   or a retirement reaches every node within a few seconds;
//! - the CLI works in a private directory of its own: it copies the files down,
//!   changes the ring there, and writes it back only if nobody changed it meanwhile
//!   ([`PgStore::push_key_file`], a compare-and-swap).
//!
//! Backups carry the files as before (`admin::backup`), so keys move between
//! backends with the data.

use super::{pg_error, PgStore};
use crate::storage::StorageError;
use crate::tokens::keys::KEYRING_FILE;
use crate::tokens::{JwtKeys, GENERATED_KEY_FILE};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The `wxauth_kv` tree of the key files (not a tree of the embedded store, so not in
/// a snapshot's entries: backups carry them as files).
const FILES: &str = "files";

/// The key files a data directory holds.
pub const KEY_FILES: [&str; 2] = [GENERATED_KEY_FILE, KEYRING_FILE];

/// How often a node looks for a new key ring.
pub const KEY_POLL: Duration = Duration::from_secs(1);

fn read_local(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::io(
            format!("cannot read {}", path.display()),
            e,
        )),
    }
}

/// Makes `data_dir/name` hold `content` (absent: no file), atomically, 0600.
fn write_local(data_dir: &Path, name: &str, content: Option<&[u8]>) -> Result<(), StorageError> {
    let path = data_dir.join(name);
    if read_local(&path)?.as_deref() == content {
        return Ok(());
    }
    match content {
        Some(bytes) => crate::fsutil::write_atomically(&path, bytes)
            .map_err(|e| StorageError::io(format!("cannot write {}", path.display()), e)),
        None => std::fs::remove_file(&path)
            .map_err(|e| StorageError::io(format!("cannot remove {}", path.display()), e)),
    }
}

impl PgStore {
    /// The database's copy of a key file.
    fn key_file(&self, name: &'static str) -> Result<Option<Vec<u8>>, StorageError> {
        self.wait(self.run("read a key file", move |shared| async move {
            let client = shared.client().await?;
            Ok(client
                .query_opt(
                    "SELECT value FROM wxauth_kv WHERE tree = $1 AND key = $2",
                    &[&FILES, &name.as_bytes()],
                )
                .await
                .map_err(|e| pg_error("read a key file", e))?
                .map(|row| row.get(0)))
        }))
    }

    /// Copies the key files from the database into `data_dir` (which then holds
    /// exactly the database's). `generate`: no key file is configured and the
    /// algorithm is HMAC, so the shared generated key is created if missing.
    pub fn pull_key_files(&self, data_dir: &Path, generate: bool) -> Result<(), StorageError> {
        if generate {
            // 256 random bits as 64 hex characters, as the embedded store's key.
            let key = crate::ids::random_hex(32).into_bytes();
            self.wait(
                self.run("create the signing key", move |shared| async move {
                    let client = shared.client().await?;
                    client
                        .execute(
                            "INSERT INTO wxauth_kv (tree, key, value) VALUES ($1, $2, $3) \
                         ON CONFLICT (tree, key) DO NOTHING",
                            &[&FILES, &GENERATED_KEY_FILE.as_bytes(), &key],
                        )
                        .await
                        .map_err(|e| pg_error("create the signing key", e))?;
                    Ok(())
                }),
            )?;
        }
        crate::fsutil::create_private_dir(data_dir)
            .map_err(|e| StorageError::io(format!("cannot create {}", data_dir.display()), e))?;
        for name in KEY_FILES {
            write_local(data_dir, name, self.key_file(name)?.as_deref())?;
        }
        Ok(())
    }

    /// Writes `data_dir/name` to the database if the database still holds
    /// `expected` (what was pulled): a compare-and-swap, so that two operators'
    /// changes never silently undo each other. `Ok(false)`: it changed meanwhile.
    pub fn push_key_file(
        &self,
        data_dir: &Path,
        name: &'static str,
        expected: Option<Vec<u8>>,
    ) -> Result<bool, StorageError> {
        let Some(content) = read_local(&data_dir.join(name))? else {
            return Ok(true);
        };
        if expected.as_deref() == Some(content.as_slice()) {
            return Ok(true);
        }
        self.wait(self.run("write a key file", move |shared| async move {
            let client = shared.client().await?;
            let key = name.as_bytes();
            let changed = match expected {
                Some(old) => {
                    client
                        .execute(
                            "UPDATE wxauth_kv SET value = $3 \
                         WHERE tree = $1 AND key = $2 AND value = $4",
                            &[&FILES, &key, &content, &old],
                        )
                        .await
                }
                None => {
                    client
                        .execute(
                            "INSERT INTO wxauth_kv (tree, key, value) VALUES ($1, $2, $3) \
                         ON CONFLICT (tree, key) DO NOTHING",
                            &[&FILES, &key, &content],
                        )
                        .await
                }
            }
            .map_err(|e| pg_error("write a key file", e))?;
            Ok(changed == 1)
        }))
    }

    /// Makes the database's copy of `name` the one in `data_dir`, whatever it held
    /// (a restore, into a database no node serves yet).
    pub fn replace_key_file(
        &self,
        data_dir: &Path,
        name: &'static str,
    ) -> Result<(), StorageError> {
        let Some(content) = read_local(&data_dir.join(name))? else {
            return Ok(());
        };
        self.wait(self.run("write a key file", move |shared| async move {
            let client = shared.client().await?;
            client
                .execute(
                    "INSERT INTO wxauth_kv (tree, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value",
                    &[&FILES, &name.as_bytes(), &content],
                )
                .await
                .map_err(|e| pg_error("write a key file", e))?;
            Ok(())
        }))
    }

    /// Every [`KEY_POLL`], brings `data_dir`'s key ring up to the database's and
    /// reloads `keys` when it changed. Runs on its own thread until the process ends.
    pub fn watch_key_ring(&self, data_dir: &Path, keys: Arc<JwtKeys>) {
        let store = self.clone();
        let data_dir = data_dir.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("wxauth-keys".into())
            .spawn(move || {
                let mut loaded = read_local(&data_dir.join(KEYRING_FILE)).ok().flatten();
                loop {
                    std::thread::sleep(KEY_POLL);
                    let current = match store.key_file(KEYRING_FILE) {
                        Ok(current) => current,
                        Err(e) => {
                            tracing::debug!(error = %crate::cause::cause_chain(&e), "cannot read the key ring");
                            continue;
                        }
                    };
                    if current == loaded {
                        continue;
                    }
                    let reloaded = write_local(&data_dir, KEYRING_FILE, current.as_deref())
                        .map_err(|e| crate::cause::cause_chain(&e))
                        .and_then(|()| keys.reload().map_err(|e| e.to_string()));
                    match reloaded {
                        Ok(()) => {
                            tracing::info!(kid = keys.kid(), "key ring changed in the database: reloaded");
                            loaded = current;
                        }
                        Err(e) => tracing::error!(error = %e, "cannot load the database's key ring"),
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the key ring watcher");
        }
    }
}
