//! The sled implementation of [`Store`]: the only file that names sled.

use super::{Op, ReadStore, SnapshotVisitor, StorageError, Store, Tree, Visitor, WriteBatch};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::path::Path;
use std::sync::RwLock;

pub struct SledStore {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    /// Writers share it; a snapshot takes it alone, so that what it reads across
    /// trees is one instant (sled has no multi-tree snapshots of its own).
    gate: RwLock<()>,
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
        Ok(SledStore {
            db,
            trees,
            gate: RwLock::new(()),
        })
    }

    fn tree(&self, tree: Tree) -> &sled::Tree {
        // Tree::ALL and self.trees share one order.
        &self.trees[Tree::ALL
            .iter()
            .position(|t| *t == tree)
            .expect("every Tree is opened")]
    }
}

fn is_lock_error(e: &std::io::Error) -> bool {
    let text = e.to_string();
    text.contains("lock") || text.contains("Resource temporarily unavailable")
}

fn io(e: sled::Error) -> StorageError {
    StorageError::Io(e.to_string())
}

impl ReadStore for SledStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.tree(tree).get(key).map_err(io)?.map(|v| v.to_vec()))
    }

    fn for_each(&self, tree: Tree, visit: &mut Visitor<'_>) -> Result<(), StorageError> {
        for entry in self.tree(tree).iter() {
            let (k, v) = entry.map_err(io)?;
            if visit(&k, &v).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn len(&self, tree: Tree) -> usize {
        self.tree(tree).len()
    }

    fn size_on_disk(&self) -> Result<u64, StorageError> {
        self.db.size_on_disk().map_err(io)
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
        let trees: Vec<&sled::Tree> = touched.iter().map(|t| self.tree(*t)).collect();
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
        result.map_err(|e| match e {
            TransactionError::Storage(e) => io(e),
            TransactionError::Abort(()) => StorageError::Io("transaction aborted".into()),
        })
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.db.flush().map(|_| ()).map_err(io)
    }

    fn snapshot(&self, visit: &mut SnapshotVisitor<'_>) -> Result<(), StorageError> {
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        for tree in Tree::ALL {
            for entry in self.tree(tree).iter() {
                let (k, v) = entry.map_err(io)?;
                visit(tree, &k, &v)?;
            }
        }
        Ok(())
    }
}
