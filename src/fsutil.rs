//! Private files: the data directory (0700) and the secrets written into it (0600),
//! whole or not at all.
//!
//! The process also runs under umask 0o077 (set first thing in `main`), so what sled
//! creates is private too; the explicit modes here do not rely on it.

use crate::secret::Secret;
use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Owner-only directory.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Owner-only file.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) with mode 0700 from the start: there is no
/// moment in which it exists with wider permissions. An existing directory is left
/// as it is (see [`restrict_tree`]).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

/// Takes group and other permissions away from `root` and everything under it
/// (symbolic links are not followed). Returns how many entries it changed: data
/// directories written by older versions held 0644 files and 0755 directories.
pub fn restrict_tree(root: &Path) -> io::Result<usize> {
    let mut changed = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        // The root may be a symlink (systemd's DynamicUser= makes /var/lib/NAME one):
        // follow it there, nowhere below.
        let meta = if path == root {
            std::fs::metadata(&path)?
        } else {
            std::fs::symlink_metadata(&path)?
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&path, Permissions::from_mode(mode & 0o700))?;
            changed += 1;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(changed)
}

/// Where [`write_atomically`] stages `path`: a hidden sibling, so the rename stays
/// within one directory (and one filesystem).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Replaces `path` with `content`, mode 0600, so that after a crash at any point the
/// file is either absent (or its old version) or whole: write a temporary file,
/// fsync it, rename it over `path`, fsync the directory (which makes the rename
/// durable). A temporary file left by an earlier crash is overwritten.
pub fn write_atomically(path: &Path, content: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let temp = temp_path(path);
    remove_if_present(&temp)?;
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&temp)?;
        file.write_all(content)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    File::open(dir)?.sync_all()
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Reads the secret kept in `path` (trailing whitespace removed), or, when there is
/// none, creates its directory (0700) and the file with `generate()` (atomically,
/// 0600).
///
/// An existing file shorter than `min_len` is an error that names it, never a
/// silent regeneration: a new key would quietly log every user out, and the short
/// file is more likely damage (a full disk, an interrupted copy) the operator should
/// see. A temporary file left by a crash during an earlier generation is removed.
pub fn read_or_create_secret(
    path: &Path,
    min_len: usize,
    generate: impl FnOnce() -> String,
) -> io::Result<Secret> {
    let leftover = temp_path(path);
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let text = text.trim_end();
            if text.len() < min_len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} holds {} characters, fewer than the {min_len} of a generated key: \
                         it is damaged. Restore it from a backup (`wxauth restore`), or delete it \
                         to generate a new one, which logs every user out",
                        path.display(),
                        text.len()
                    ),
                ));
            }
            // Left by a crash while an earlier start generated the key: never read.
            if let Err(e) = remove_if_present(&leftover) {
                tracing::warn!(path = %leftover.display(), "cannot remove a leftover temporary file: {e}");
            }
            return Ok(Secret::new(text));
        }
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot read {}: {e}", path.display()),
            ))
        }
        Err(_) => {}
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(dir)?;
    }
    let secret = generate();
    write_atomically(path, secret.as_bytes())?;
    tracing::info!(path = %path.display(), "generated a new secret file");
    Ok(Secret::new(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn write_atomically_creates_a_whole_private_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_atomically(&path, b"first").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert_eq!(mode(&path), 0o600);
        assert!(!temp_path(&path).exists());
        // Replacing keeps it whole and private.
        write_atomically(&path, b"second version").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second version");
        assert_eq!(mode(&path), 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["key"], "only the file itself is left");
    }

    #[test]
    fn write_atomically_replaces_a_leftover_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        // A crash after the temporary file was created, before the rename.
        std::fs::write(temp_path(&path), b"half").unwrap();
        std::fs::set_permissions(temp_path(&path), Permissions::from_mode(0o644)).unwrap();
        write_atomically(&path, b"whole").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole");
        assert_eq!(mode(&path), 0o600, "not the leftover's mode");
        assert!(!temp_path(&path).exists());
    }

    #[test]
    fn write_atomically_leaves_the_old_file_when_it_cannot_finish() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_atomically(&path, b"old").unwrap();
        // The temporary name is taken by a directory that cannot be removed as a file.
        std::fs::create_dir(temp_path(&path)).unwrap();
        assert!(write_atomically(&path, b"new").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }

    #[test]
    fn create_private_dir_makes_every_new_level_0700() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        create_private_dir(&nested).unwrap();
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&nested), 0o700);
        create_private_dir(&nested).unwrap(); // exists: fine
    }

    #[test]
    fn restrict_tree_takes_group_and_other_bits_away() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir_all(root.join("blobs")).unwrap();
        std::fs::write(root.join("db"), b"x").unwrap();
        std::fs::write(root.join("blobs/1"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        for (p, m) in [
            ("", 0o755),
            ("blobs", 0o755),
            ("db", 0o644),
            ("blobs/1", 0o664),
        ] {
            std::fs::set_permissions(root.join(p), Permissions::from_mode(m)).unwrap();
        }
        let passwd_mode = mode(Path::new("/etc/passwd"));
        assert_eq!(restrict_tree(&root).unwrap(), 4);
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("blobs")), 0o700);
        assert_eq!(mode(&root.join("db")), 0o600);
        assert_eq!(mode(&root.join("blobs/1")), 0o600);
        assert_eq!(
            mode(Path::new("/etc/passwd")),
            passwd_mode,
            "links not followed"
        );
        assert_eq!(restrict_tree(&root).unwrap(), 0, "nothing left to change");
    }

    #[test]
    fn a_missing_secret_is_generated_once_and_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/key");
        let made = read_or_create_secret(&path, 4, || "abcdef".into()).unwrap();
        assert_eq!(made.expose(), "abcdef");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("new")), 0o700);
        let read = read_or_create_secret(&path, 4, || unreachable!()).unwrap();
        assert_eq!(read.expose(), "abcdef");
    }

    #[test]
    fn a_short_or_empty_secret_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        for content in ["", "abc\n"] {
            std::fs::write(&path, content).unwrap();
            let err = read_or_create_secret(&path, 64, || unreachable!()).unwrap_err();
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
            assert_eq!(std::fs::read_to_string(&path).unwrap(), content, "kept");
        }
    }

    #[test]
    fn a_leftover_temporary_file_is_cleaned_and_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        // Crash while generating: only the temporary file exists.
        std::fs::write(temp_path(&path), b"ab").unwrap();
        let made = read_or_create_secret(&path, 4, || "fresh-key".into()).unwrap();
        assert_eq!(made.expose(), "fresh-key");
        assert!(!temp_path(&path).exists());
        // A leftover beside a whole key is removed as well.
        std::fs::write(temp_path(&path), b"ab").unwrap();
        let read = read_or_create_secret(&path, 4, || unreachable!()).unwrap();
        assert_eq!(read.expose(), "fresh-key");
        assert!(!temp_path(&path).exists());
    }
}
