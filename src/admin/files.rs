//! File-system helpers for restore: emptying a directory, handing files to the
//! directory's owner, writing a private file.

use std::io::Write;
use std::path::Path;

/// Removes what is inside `dir` (which may be reached through a symlink).
pub(super) fn empty_directory(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

pub(super) fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        if path.is_dir() && !path.is_symlink() {
            chown_tree(&path, uid, gid)?;
        }
    }
    Ok(())
}

pub(super) fn write_private_file(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(content)?;
    file.sync_all()
}
