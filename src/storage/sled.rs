//! The sled implementation of [`Store`]: the only file that names sled.

use super::{Op, ReadStore, SnapshotVisitor, StorageError, Store, Tree, Visitor, WriteBatch};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

pub struct SledStore {
    path: PathBuf,
    cache_capacity: u64,
    /// The open database. After an I/O error (a full or read-only disk) sled
    /// refuses every later write until it is reopened: [`Store::recover`] swaps in
    /// a fresh instance, recovered from what was durable. `None` between the two.
    db: RwLock<Option<Open>>,
    /// Writers share it; a snapshot takes it alone, so that what it reads across
    /// trees is one instant (sled has no multi-tree snapshots of its own).
    gate: RwLock<()>,
    /// A write or flush failed: the instance must be reopened before it writes again.
    failed: AtomicBool,
}

struct Open {
    db: sled::Db,
    trees: Vec<sled::Tree>,
}

impl Open {
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
        use std::os::unix::fs::PermissionsExt;
        if !path.exists() {
            std::fs::create_dir_all(path)
                .map_err(|e| StorageError::Io(format!("cannot create {}: {e}", path.display())))?;
            // The trees hold WeChat session keys: only our user may enter the directory.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(
                |e| StorageError::Io(format!("cannot restrict {}: {e}", path.display())),
            )?;
        } else if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
            tracing::warn!(path = %path.display(), "the data directory is open to other users; chmod 700 it");
        }
        let open = open_db(path, cache_capacity)?;
        Ok(SledStore {
            path: path.to_path_buf(),
            cache_capacity,
            db: RwLock::new(Some(open)),
            gate: RwLock::new(()),
            failed: AtomicBool::new(false),
        })
    }

    fn open_db(&self) -> Result<RwLockReadGuard<'_, Option<Open>>, StorageError> {
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            return Err(StorageError::Io("the database is being reopened".into()));
        }
        Ok(guard)
    }
}

fn open_db(path: &Path, cache_capacity: u64) -> Result<Open, StorageError> {
    let db = sled::Config::new()
        .path(path)
        .cache_capacity(cache_capacity)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|e| match e {
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock || is_lock_error(&io) =>
            {
                StorageError::Locked(path.display().to_string())
            }
            other => StorageError::Io(other.to_string()),
        })?;
    let trees = Tree::ALL
        .iter()
        .map(|t| db.open_tree(t.name()).map_err(io))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Open { db, trees })
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
    attempt
        .map_err(|e| StorageError::Io(format!("the data directory does not take writes yet: {e}")))
}

fn is_lock_error(e: &std::io::Error) -> bool {
    let text = e.to_string();
    text.contains("lock") || text.contains("Resource temporarily unavailable")
}

fn io(e: sled::Error) -> StorageError {
    StorageError::Io(e.to_string())
}

/// Runs `f` on the open database (or fails while it is being reopened).
macro_rules! with_db {
    ($self:ident, $db:ident => $body:expr) => {{
        let guard = $self.open_db()?;
        let $db = guard.as_ref().expect("checked by open_db");
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

    fn size_on_disk(&self) -> Result<u64, StorageError> {
        with_db!(self, db => db.db.size_on_disk().map_err(io))
    }
}

impl Store for SledStore {
    fn apply(&self, batch: WriteBatch) -> Result<(), StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
        // One transaction over every tree the batch touches: all or nothing.
        let mut touched: Vec<Tree> = Vec::new();
        for op in &batch.ops {
            let t = match op {
                Op::Put(t, ..) | Op::Delete(t, _) => *t,
            };
            if !touched.contains(&t) {
                touched.push(t);
            }
        }
        with_db!(self, db => {
            let trees: Vec<&sled::Tree> = touched.iter().map(|t| db.tree(*t)).collect();
            let result: Result<(), TransactionError<()>> = trees.as_slice().transaction(|views| {
                for op in &batch.ops {
                    let (t, key) = match op {
                        Op::Put(t, k, _) | Op::Delete(t, k) => (*t, k),
                    };
                    let view = &views[touched.iter().position(|x| *x == t).expect("touched")];
                    match op {
                        Op::Put(_, _, value) => {
                            view.insert(key.as_slice(), value.as_slice())?;
                        }
                        Op::Delete(..) => {
                            view.remove(key.as_slice())?;
                        }
                    }
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            });
            result.map_err(|e| {
                self.failed.store(true, Ordering::SeqCst);
                match e {
                    TransactionError::Storage(e) => io(e),
                    TransactionError::Abort(()) => StorageError::Io("transaction aborted".into()),
                }
            })
        })
    }

    fn flush(&self) -> Result<(), StorageError> {
        with_db!(self, db => db.db.flush().map(|_| ()).map_err(|e| {
            self.failed.store(true, Ordering::SeqCst);
            io(e)
        }))
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
        let open = open_db(&self.path, self.cache_capacity)?;
        // Prove the disk takes writes again before anyone relies on it.
        open.db.flush().map_err(io)?;
        *slot = Some(open);
        self.failed.store(false, Ordering::SeqCst);
        tracing::warn!(path = %self.path.display(), "storage reopened after an I/O error");
        Ok(true)
    }
}
