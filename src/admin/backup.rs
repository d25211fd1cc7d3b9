//! Backup (a JSON-lines snapshot) and restore (into an empty data directory).

use super::files::{chown_tree, empty_directory, write_private_file};
use super::protocol::write_line;
use super::AdminError;
use crate::config::{StorageBackend, StorageConfig};
use crate::storage::postgres::PgStore;
use crate::storage::{self, StorageError, Store, Tree, WriteBatch};
use crate::tokens::keys::KEYRING_FILE;
use crate::tokens::GENERATED_KEY_FILE;
use std::sync::Arc;

/// The key files of the data directory a backup carries: the generated signing key
/// and the key ring of `wxauth keys rotate`.
const KEY_FILES: [&str; 2] = [GENERATED_KEY_FILE, KEYRING_FILE];
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Seek, Write};
use std::path::Path;

const BACKUP_FORMAT: &str = "wxauth-backup";
const BACKUP_VERSION: u64 = 1;
/// A restore batch ends once its keys and values reach this many bytes. A batch
/// is journaled as one record, and sled stores a record over about 128 KiB as a
/// separate blob file that its flush does not fsync: every record stays far below.
const RESTORE_BATCH_BYTES: usize = 32 * 1024;

/// A backup for a client that may read slowly or not at all: the snapshot goes to
/// a private scratch file in the data directory first (writes wait only for that),
/// then the file is streamed to `out` with the writers free again.
pub(super) fn spooled_backup(
    store: &dyn Store,
    data_dir: &Path,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(format!(".backup-spool-{}", crate::ids::random_hex(8)));
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

/// A JSON-lines snapshot: a header, the key files (those that exist),
/// every entry of every tree as of one instant, and a closing line with the count.
pub(super) fn backup(
    store: &dyn Store,
    data_dir: &Path,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    let header = json!({
        "format": BACKUP_FORMAT,
        "version": BACKUP_VERSION,
        "created_at": crate::clock::rfc3339(crate::clock::now_unix()),
    });
    write_line(out, &header)?;
    for file in KEY_FILES {
        match std::fs::read_to_string(data_dir.join(file)) {
            Ok(content) => write_line(out, &json!({ "file": file, "content": content }))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut entries: u64 = 0;
    store.snapshot(&mut |tree, key, value| {
        let mut entry = json!({ "tree": tree.name(), "key": hex::encode(key) });
        // Records are JSON: keep them readable. Anything else (ids, times, the format
        // version) as hex.
        match serde_json::from_slice::<Value>(value) {
            Ok(record) if record.is_object() => entry["value"] = record,
            _ => entry["value_hex"] = Value::String(hex::encode(value)),
        }
        entries += 1;
        write_line(out, &entry).map_err(|e| StorageError::io("writing the backup", e))
    })?;
    write_line(out, &json!({ "end": true, "entries": entries }))?;
    out.flush()?;
    Ok(())
}

/// Restores a backup into an empty (or missing) data directory. On any error what
/// it wrote is removed again. An existing directory keeps its owner: files restored
/// by root into the service's directory are handed to the directory's owner, so the
/// service (systemd's `DynamicUser=` included) can open them.
///
/// Offline only (no server holds an empty directory), so no running server's users
/// cache can hold records from before the restore: a server starts with it empty.
pub fn restore(file: &Path, storage: &StorageConfig) -> Result<u64, AdminError> {
    if storage.backend == StorageBackend::Postgres {
        return restore_postgres(file, storage);
    }
    let data_dir = storage.path.as_path();
    use std::os::unix::fs::MetadataExt;
    let existing = std::fs::metadata(data_dir).ok();
    if std::fs::read_dir(data_dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(AdminError::Refused(format!(
            "{} is not empty: restore only into an empty or new data directory",
            data_dir.display()
        )));
    }
    let input = BufReader::new(std::fs::File::open(file)?);
    let result = restore_into(input, storage);
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

/// Restores a backup into an empty PostgreSQL database (no user, no session; the
/// nodes stopped: they load the keys at start). The key files go into the database
/// too, replacing a key a node generated there before. On any error the database is
/// emptied again.
fn restore_postgres(file: &Path, storage: &StorageConfig) -> Result<u64, AdminError> {
    let pg = PgStore::open(storage)?;
    if !pg.holds_no_users()? {
        return Err(AdminError::Refused(
            "the database already holds users or sessions: restore only into an empty database"
                .into(),
        ));
    }
    let input = BufReader::new(std::fs::File::open(file)?);
    let key_dir =
        std::env::temp_dir().join(format!("wxauth-restore-{}", crate::ids::random_hex(8)));
    crate::fsutil::create_private_dir(&key_dir)?;
    let store: Arc<dyn Store> = Arc::new(pg.clone());
    let result = restore_entries(input, &store, &key_dir).and_then(|restored| {
        for name in KEY_FILES {
            pg.replace_key_file(&key_dir, name)?;
        }
        Ok(restored)
    });
    let _ = std::fs::remove_dir_all(&key_dir);
    if result.is_err() {
        if let Err(e) = pg.empty() {
            tracing::error!(error = %crate::cause::cause_chain(&e), "cannot empty the database after a failed restore");
        }
    }
    result
}

fn restore_into(input: impl BufRead, storage: &StorageConfig) -> Result<u64, AdminError> {
    let store = storage::upgrade::open(storage)?;
    restore_entries(input, &store, &storage.path)
}

/// Applies the backup's entries to `store` and writes its key files into `data_dir`.
fn restore_entries(
    input: impl BufRead,
    store: &Arc<dyn Store>,
    data_dir: &Path,
) -> Result<u64, AdminError> {
    let bad = |n: usize, why: &str| AdminError::Refused(format!("backup line {n}: {why}"));
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
    let mut batch_bytes = 0;
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
            // A backup of an older release is upgraded now (a newer one refused),
            // as a data directory of one is when it opens.
            storage::upgrade::run(store.as_ref())?;
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
        batch_bytes += key.len() + value.len();
        // A user marked for deletion carries its `meta` mark (a database's backup
        // has the mark in the user's row only).
        if tree == Tree::Users {
            let mark = crate::users::decode(&value)
                .ok()
                .as_ref()
                .and_then(storage::sled_model::deletion_mark);
            if let Some((mark_key, due)) = mark {
                batch.put(Tree::Meta, mark_key, due);
            }
        }
        batch.put(tree, key, value);
        restored += 1;
        if batch_bytes >= RESTORE_BATCH_BYTES {
            store.apply(std::mem::take(&mut batch))?;
            batch_bytes = 0;
        }
    }
    Err(AdminError::Refused(
        "the backup has no closing line: it is incomplete".into(),
    ))
}
