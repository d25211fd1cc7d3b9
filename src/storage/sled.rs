//! The sled implementation of [`Store`]: the only file that names sled.
//!
//! Atomic batches. sled 0.34 makes a multi-key write atomic (a transaction or
//! `apply_batch`) by rolling and writing its log buffer around it, which costs two
//! buffer writes per batch and defeats the group commit. So a batch of more than one
//! write is journaled instead: the whole batch is first stored as one record in the
//! `journal` tree (a single insert, atomic by itself), then applied as plain inserts,
//! then the record is removed. sled recovers a prefix of its log, so after a crash a
//! batch is either absent (its record was not recovered, nor anything after it) or
//! its record is there and [`SledStore::open`] replays it (puts and deletes are
//! idempotent). Sequences whose every prefix is harmless skip the journal
//! ([`Store::apply_in_order`]): the same prefix recovery makes them safe.
//!
//! Durability. sled's `flush` pushes its buffers with `sync_file_range`, which does
//! not flush the disk's write cache: [`Store::flush`] follows it with an fdatasync
//! of the database file.

use super::{Op, ReadStore, SnapshotVisitor, StorageError, Store, Tree, Visitor, WriteBatch};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

/// The tree holding batches being applied (sequence number → encoded batch).
const JOURNAL: &str = "journal";
/// sled 0.34 keeps everything but large values in this one file.
const DATA_FILE: &str = "db";

pub struct SledStore {
    path: PathBuf,
    cache_capacity: u64,
    /// The open database. After an I/O error (a full or read-only disk) sled
    /// refuses every later write until it is reopened: [`Store::recover`] swaps in
    /// a fresh instance, recovered from what was durable. `None` between the two.
    db: RwLock<Option<Database>>,
    /// Writers share it; a snapshot takes it alone, so that what it reads across
    /// trees is one instant (sled has no multi-tree snapshots of its own).
    gate: RwLock<()>,
    /// A write or flush failed: the instance must be reopened before it writes again.
    failed: AtomicBool,
    /// The next journal sequence number.
    next_seq: AtomicU64,
}

/// One open sled instance: what [`Store::recover`] replaces as a whole.
struct Database {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    journal: sled::Tree,
    /// The database file, for fdatasync.
    file: std::fs::File,
}

impl Database {
    fn tree(&self, tree: Tree) -> &sled::Tree {
        // Tree::ALL and self.trees share one order.
        &self.trees[Tree::ALL
            .iter()
            .position(|t| *t == tree)
            .expect("every Tree is opened")]
    }
}

impl SledStore {
    /// Opens (or creates) the database in `path`. Fails with [`StorageError::Locked`]
    /// when another process holds it: sled allows one process per directory.
    pub fn open(path: &Path, cache_capacity: u64) -> Result<Self, StorageError> {
        prepare_private_dir(path)?;
        let open = open_database(path, cache_capacity)?;
        Ok(SledStore {
            path: path.to_path_buf(),
            cache_capacity,
            db: RwLock::new(Some(open)),
            gate: RwLock::new(()),
            failed: AtomicBool::new(false),
            next_seq: AtomicU64::new(0),
        })
    }

    /// The open database, held for one operation; an error while a reopen is under way.
    fn current_db(&self) -> Result<RwLockReadGuard<'_, Option<Database>>, StorageError> {
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            return Err(StorageError::unavailable("the database is being reopened"));
        }
        Ok(guard)
    }
}

/// The trees hold WeChat session keys: only our user may enter the directory or
/// read a file in it. A new directory is created 0700; an existing one that is open
/// to others (or holds files an older version created 0644) is tightened, with a
/// warning that says so. What sled creates afterwards is private by the umask.
fn prepare_private_dir(path: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::PermissionsExt;
    let existing = match std::fs::metadata(path) {
        Ok(meta) => Some(meta.permissions().mode() & 0o777),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(StorageError::io(
                format!("cannot use {}", path.display()),
                e,
            ))
        }
    };
    let Some(mode) = existing else {
        return crate::fsutil::create_private_dir(path)
            .map_err(|e| StorageError::io(format!("cannot create {}", path.display()), e));
    };
    let changed = crate::fsutil::restrict_tree(path).map_err(|e| {
        StorageError::io(
            if mode & 0o077 != 0 {
                format!(
                    "{} (mode {mode:o}) is open to other users and cannot be restricted to its owner (chmod -R go= it)",
                    path.display()
                )
            } else {
                format!(
                    "{} (mode {mode:o}): cannot check that what is in it is private to its owner",
                    path.display()
                )
            },
            e,
        )
    })?;
    if changed > 0 {
        tracing::warn!(
            path = %path.display(),
            was = %format!("{mode:o}"),
            entries = changed,
            "the data directory was open to other users: restricted it and its files to the owner (0700/0600)"
        );
    }
    Ok(())
}

/// sled opens its files by name and follows symbolic links: one planted in the data
/// directory (by whoever owns it) would have a root-run command (`restore`, an offline
/// admin command) write wherever it points. sled's own names must be plain files
/// and directories; anything else stops the open, naming it.
fn refuse_linked_files(path: &Path) -> Result<(), StorageError> {
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(StorageError::io(
                format!("cannot read {}", path.display()),
                e,
            ))
        }
    };
    let blobs = path.join("blobs");
    let blob_entries = std::fs::symlink_metadata(&blobs)
        .is_ok_and(|meta| meta.is_dir())
        .then(|| std::fs::read_dir(&blobs).ok())
        .flatten();
    for entry in entries.chain(blob_entries.into_iter().flatten()) {
        let entry =
            entry.map_err(|e| StorageError::io(format!("cannot read {}", path.display()), e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let sleds = entry.path().parent() == Some(blobs.as_path())
            || matches!(name.as_ref(), "db" | "conf" | "blobs")
            || name.starts_with("snap.");
        let linked = entry.file_type().is_ok_and(|t| t.is_symlink());
        if sleds && linked {
            return Err(StorageError::unavailable(format!(
                "{} is a symbolic link: the database's files must be plain files in the data directory",
                entry.path().display()
            )));
        }
    }
    Ok(())
}

/// Opens sled in `path` with every tree, the journal, and the data file for fdatasync.
fn open_database(path: &Path, cache_capacity: u64) -> Result<Database, StorageError> {
    refuse_linked_files(path)?;
    if held_elsewhere(&path.join(DATA_FILE))
        .map_err(|e| StorageError::io(format!("cannot lock {}", path.display()), e))?
    {
        return Err(StorageError::Locked(path.display().to_string()));
    }
    let db = sled::Config::new()
        .path(path)
        .cache_capacity(cache_capacity)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|e| StorageError::io("cannot open the database", e))?;
    let trees = Tree::ALL
        .iter()
        .map(|t| db.open_tree(t.name()).map_err(io))
        .collect::<Result<Vec<_>, _>>()?;
    let journal = db.open_tree(JOURNAL).map_err(io)?;
    let file = std::fs::File::open(path.join(DATA_FILE)).map_err(|e| {
        StorageError::io(format!("cannot open {}", path.join(DATA_FILE).display()), e)
    })?;
    let open = Database {
        db,
        trees,
        journal,
        file,
    };
    open.replay_journal()?;
    Ok(open)
}

impl Database {
    /// Finishes the batches a crash interrupted, in the order they were started.
    fn replay_journal(&self) -> Result<(), StorageError> {
        let mut replayed = 0;
        for entry in self.journal.iter() {
            let (seq, encoded) = entry.map_err(io)?;
            for op in decode_batch(&encoded)? {
                self.write(&op)?;
            }
            self.journal.remove(seq).map_err(io)?;
            replayed += 1;
        }
        if replayed > 0 {
            self.db.flush().map_err(io)?;
            self.file
                .sync_data()
                .map_err(|e| StorageError::io("fdatasync", e))?;
            tracing::warn!(
                batches = replayed,
                "finished write batches interrupted by a crash"
            );
        }
        Ok(())
    }

    fn write(&self, op: &Op) -> Result<(), StorageError> {
        match op {
            Op::Put(t, k, v) => self.tree(*t).insert(k.as_slice(), v.as_slice()).map(|_| ()),
            Op::Delete(t, k) => self.tree(*t).remove(k.as_slice()).map(|_| ()),
        }
        .map_err(io)
    }
}

/// A batch as one journal record: per op a tag (0 put, 1 delete), the tree's index
/// in [`Tree::ALL`], then length-prefixed (u32 BE) key and, for puts, value.
fn encode_batch(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ops.iter().map(|op| 16 + op_len(op)).sum());
    for op in ops {
        let (tag, tree, key, value) = match op {
            Op::Put(t, k, v) => (0u8, *t, k, Some(v)),
            Op::Delete(t, k) => (1u8, *t, k, None),
        };
        out.push(tag);
        out.push(tree_index(tree));
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
        out.extend_from_slice(key);
        if let Some(value) = value {
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value);
        }
    }
    out
}

fn op_len(op: &Op) -> usize {
    match op {
        Op::Put(_, k, v) => k.len() + v.len(),
        Op::Delete(_, k) => k.len(),
    }
}

fn tree_index(tree: Tree) -> u8 {
    Tree::ALL
        .iter()
        .position(|t| *t == tree)
        .expect("every Tree is in ALL") as u8
}

fn decode_batch(mut bytes: &[u8]) -> Result<Vec<Op>, StorageError> {
    let corrupt = || StorageError::Corrupt {
        tree: JOURNAL,
        reason: "truncated batch record".into(),
    };
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (bytes.get(..n)?, bytes.get(n..)?);
        *bytes = rest;
        Some(head)
    }
    fn take_sized(bytes: &mut &[u8]) -> Option<Vec<u8>> {
        let len = u32::from_be_bytes(take(bytes, 4)?.try_into().ok()?) as usize;
        take(bytes, len).map(<[u8]>::to_vec)
    }
    let mut ops = Vec::new();
    while !bytes.is_empty() {
        let head = take(&mut bytes, 2).ok_or_else(corrupt)?;
        let tree = *Tree::ALL.get(usize::from(head[1])).ok_or_else(corrupt)?;
        let key = take_sized(&mut bytes).ok_or_else(corrupt)?;
        ops.push(match head[0] {
            0 => Op::Put(tree, key, take_sized(&mut bytes).ok_or_else(corrupt)?),
            1 => Op::Delete(tree, key),
            _ => return Err(corrupt()),
        });
    }
    Ok(ops)
}

/// Writes, fsyncs and removes a scratch file the size of a sled segment's worth of
/// writes: can the data directory take writes again?
fn probe_write(dir: &Path) -> Result<(), StorageError> {
    use std::io::Write;
    let path = dir.join(".write-probe");
    let attempt = (|| {
        let mut file = std::fs::File::create(&path)?;
        file.write_all(&[0u8; 1 << 20])?;
        file.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    attempt.map_err(|e| StorageError::io("the data directory does not take writes yet", e))
}

/// Whether another open file holds the lock sled takes on its data file (an
/// exclusive `flock`). sled reports a held lock only as an `Other` error with a
/// text, so the same lock is tried here first and its errno decides; the probe's
/// lock goes with its file, before sled takes its own. A missing file: a new database.
fn held_elsewhere(data_file: &Path) -> std::io::Result<bool> {
    use rustix::fs::{flock, FlockOperation};
    let file = match std::fs::File::open(data_file) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(false),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

fn io(e: sled::Error) -> StorageError {
    StorageError::io("sled", e)
}

/// Runs `f` on the open database (or fails while it is being reopened).
macro_rules! with_db {
    ($self:ident, $db:ident => $body:expr) => {{
        let guard = $self.current_db()?;
        let $db = guard.as_ref().expect("checked by current_db");
        $body
    }};
}

impl ReadStore for SledStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        with_db!(self, db => Ok(db.tree(tree).get(key).map_err(io)?.map(|v| v.to_vec())))
    }

    fn for_each(&self, tree: Tree, visit: &mut Visitor<'_>) -> Result<(), StorageError> {
        with_db!(self, db => {
            for entry in db.tree(tree).iter() {
                let (k, v) = entry.map_err(io)?;
                if visit(&k, &v).is_break() {
                    break;
                }
            }
            Ok(())
        })
    }

    fn for_each_from(
        &self,
        tree: Tree,
        start: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<(), StorageError> {
        with_db!(self, db => {
            for entry in db.tree(tree).range(start..) {
                let (k, v) = entry.map_err(io)?;
                if visit(&k, &v).is_break() {
                    break;
                }
            }
            Ok(())
        })
    }

    fn size_on_disk(&self) -> Result<u64, StorageError> {
        with_db!(self, db => db.db.size_on_disk().map_err(io))
    }

    fn last(&self, tree: Tree) -> Result<Option<super::Entry>, StorageError> {
        with_db!(self, db => Ok(db
            .tree(tree)
            .last()
            .map_err(io)?
            .map(|(k, v)| (k.to_vec(), v.to_vec()))))
    }
}

impl Store for SledStore {
    fn apply(&self, batch: WriteBatch) -> Result<(), StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
        with_db!(self, db => {
            let result = (|| {
                if let [op] = batch.ops.as_slice() {
                    // One write is atomic by itself.
                    return db.write(op);
                }
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed).to_be_bytes();
                db.journal.insert(seq, encode_batch(&batch.ops)).map_err(io)?;
                for op in &batch.ops {
                    db.write(op)?;
                }
                db.journal.remove(seq).map_err(io).map(|_| ())
            })();
            if result.is_err() {
                self.failed.store(true, Ordering::SeqCst);
            }
            result
        })
    }

    fn apply_in_order(&self, batch: WriteBatch) -> Result<(), StorageError> {
        // One hold of the gate: a snapshot sees all of the sequence or none of it.
        let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
        with_db!(self, db => {
            let result = batch.ops.iter().try_for_each(|op| db.write(op));
            if result.is_err() {
                self.failed.store(true, Ordering::SeqCst);
            }
            result
        })
    }

    fn flush(&self) -> Result<(), StorageError> {
        with_db!(self, db => {
            let result = db
                .db
                .flush()
                .map_err(io)
                .and_then(|_| db.file.sync_data().map_err(|e| StorageError::io("fdatasync", e)));
            if result.is_err() {
                self.failed.store(true, Ordering::SeqCst);
            }
            result
        })
    }

    fn snapshot(&self, visit: &mut SnapshotVisitor<'_>) -> Result<(), StorageError> {
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        with_db!(self, db => {
            for tree in Tree::ALL {
                for entry in db.tree(tree).iter() {
                    let (k, v) = entry.map_err(io)?;
                    visit(tree, &k, &v)?;
                }
            }
            Ok(())
        })
    }

    fn recover(&self) -> Result<bool, StorageError> {
        if !self.failed.load(Ordering::SeqCst) {
            return Ok(false);
        }
        // Reopening means closing first (the instance holds the directory's lock),
        // and reads go on through the failed instance meanwhile: so reopen only once
        // the disk takes a write again.
        probe_write(&self.path)?;
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        // Drop the failed instance first: it holds the directory's lock.
        *slot = None;
        let open = open_database(&self.path, self.cache_capacity)?;
        // Prove the disk takes writes again before anyone relies on it.
        open.db.flush().map_err(io)?;
        open.file
            .sync_data()
            .map_err(|e| StorageError::io("fdatasync", e))?;
        *slot = Some(open);
        self.failed.store(false, Ordering::SeqCst);
        tracing::warn!(path = %self.path.display(), "storage reopened after an I/O error");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_told_by_its_errno_and_anything_else_is_not_a_lock() {
        let dir = tempfile::tempdir().unwrap();
        let data_file = dir.path().join(DATA_FILE);
        assert!(
            !held_elsewhere(&data_file).unwrap(),
            "no file: a new database"
        );
        std::fs::write(&data_file, b"").unwrap();
        assert!(!held_elsewhere(&data_file).unwrap());
        let holder = std::fs::File::open(&data_file).unwrap();
        rustix::fs::flock(&holder, rustix::fs::FlockOperation::LockExclusive).unwrap();
        assert!(held_elsewhere(&data_file).unwrap());
        drop(holder);
        assert!(!held_elsewhere(&data_file).unwrap());
        // A path that cannot be opened is an I/O error, whatever its text says.
        let file = dir.path().join("lock");
        std::fs::write(&file, b"").unwrap();
        assert!(held_elsewhere(&file.join(DATA_FILE)).is_err());
    }

    #[test]
    fn a_batch_record_round_trips() {
        let ops = vec![
            Op::Put(Tree::Users, b"k1".to_vec(), b"{\"v\":1}".to_vec()),
            Op::Delete(Tree::RefreshTokens, b"jti".to_vec()),
            Op::Put(Tree::Meta, Vec::new(), Vec::new()),
        ];
        let decoded = decode_batch(&encode_batch(&ops)).unwrap();
        assert_eq!(format!("{decoded:?}"), format!("{ops:?}"));
        assert!(decode_batch(&encode_batch(&ops)[..7]).is_err());
    }

    #[test]
    fn an_interrupted_batch_is_finished_when_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A crash after the journal record and the first of its writes.
            let store = SledStore::open(dir.path(), 1 << 20).unwrap();
            let guard = store.current_db().unwrap();
            let db = guard.as_ref().unwrap();
            let ops = vec![
                Op::Put(Tree::Users, b"a".to_vec(), b"1".to_vec()),
                Op::Put(Tree::UsersByOpenid, b"b".to_vec(), b"2".to_vec()),
            ];
            db.journal
                .insert(7u64.to_be_bytes(), encode_batch(&ops))
                .unwrap();
            db.write(&ops[0]).unwrap();
            db.db.flush().unwrap();
        }
        // sled's background flusher may hold the directory's lock for a moment
        // after the instance is dropped: reopen with a deadline, not once.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let store = loop {
            match SledStore::open(dir.path(), 1 << 20) {
                Err(StorageError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                other => break other.unwrap(),
            }
        };
        assert_eq!(
            store.get(Tree::Users, b"a").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(
            store.get(Tree::UsersByOpenid, b"b").unwrap().as_deref(),
            Some(&b"2"[..])
        );
        let guard = store.current_db().unwrap();
        assert!(
            guard.as_ref().unwrap().journal.is_empty(),
            "the record is removed once replayed"
        );
    }
}
