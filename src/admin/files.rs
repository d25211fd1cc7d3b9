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

/// Hands everything inside `dir` to `uid`:`gid` without following a symbolic link:
/// each entry is changed itself (`fchownat` with `AT_SYMLINK_NOFOLLOW`), and a
/// subdirectory is entered only through a descriptor opened with `O_NOFOLLOW`
/// relative to its parent's. A link planted inside (the directory's owner can, while
/// root restores) changes owner itself; what it points at keeps its owner. `dir`
/// itself is the operator's path and may be a link (systemd's `DynamicUser=`).
pub(super) fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    use rustix::fs::{openat, Gid, Mode, OFlags, Uid, CWD};
    let fd = openat(
        CWD,
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    chown_entries(&fd, Uid::from_raw(uid), Gid::from_raw(gid))
}

fn chown_entries(
    dir: &rustix::fd::OwnedFd,
    uid: rustix::fs::Uid,
    gid: rustix::fs::Gid,
) -> std::io::Result<()> {
    use rustix::fs::{chownat, openat, AtFlags, Dir, FileType, Mode, OFlags};
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?;
        // An unknown type (some file systems): O_NOFOLLOW | O_DIRECTORY decides.
        if matches!(entry.file_type(), FileType::Directory | FileType::Unknown) {
            let opened = openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            );
            match opened {
                Ok(sub) => chown_entries(&sub, uid, gid)?,
                Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP)
                    if entry.file_type() == FileType::Unknown => {}
                Err(e) => return Err(e.into()),
            }
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
