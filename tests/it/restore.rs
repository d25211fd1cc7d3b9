//! Large writes: what `wxauth restore` and a revocation journal stays far below
//! sled's blob size (blob files are not fsynced by sled's flush), and handing the
//! restored files to the data directory's owner never follows a symbolic link
//! planted in it, and no command opens a database whose files are links.

use crate::common;

use common::*;
use serde_json::json;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A backup of `entries` refresh records of about 300 bytes each.
fn write_backup(path: &Path, entries: usize) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let header =
        json!({"format": "wxauth-backup", "version": 1, "created_at": "2026-01-01T00:00:00Z"});
    writeln!(out, "{header}").unwrap();
    for n in 0..entries {
        let entry = json!({
            "tree": "refresh_tokens",
            "key": hex::encode(format!("{n:032x}")),
            "value": {"family": format!("{:032x}", n / 4), "user_id": n / 4 + 1, "exp": 4_000_000_000u64, "padding": "p".repeat(200)},
        });
        writeln!(out, "{entry}").unwrap();
    }
    writeln!(out, "{}", json!({"end": true, "entries": entries})).unwrap();
}

fn config_for(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "{VALID_CONFIG}[storage]\npath = {:?}\n",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    config
}

fn restore_command(config: &Path, backup: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wxauth"));
    cmd.arg("--config")
        .arg(config)
        .arg("restore")
        .arg(backup)
        .env_remove("RUST_LOG");
    cmd
}

#[test]
fn a_large_restore_writes_no_blob_files() {
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup.jsonl");
    write_backup(&backup, 25_000);
    let config = config_for(dir.path());
    let out = restore_command(&config, &backup).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let blobs: Vec<_> = std::fs::read_dir(dir.path().join("data").join("blobs"))
        .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(blobs.is_empty(), "sled wrote blob files: {blobs:?}");
    // And everything is there.
    let copy = dir.path().join("again.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_wxauth"))
        .arg("--config")
        .arg(&config)
        .arg("backup")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&copy).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    // Every entry, and the storage format version the restore records.
    assert_eq!(last["entries"], 25_001);
}

#[test]
fn restore_hands_files_to_the_owner_without_following_a_planted_symlink() {
    if !running_as_root() {
        eprintln!("SKIPPED: restore hands files to another owner only when run as root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup.jsonl");
    write_backup(&backup, 150_000);
    let config = config_for(dir.path());
    // The service's (empty) data directory, owned by the service user.
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    chown_to(&data, 65534);
    // A file only root may read: what the service user would like to own.
    let target = dir.path().join("root-only");
    std::fs::write(&target, b"secret").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();

    let mut restore = restore_command(&config, &backup)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While root restores, the service user plants a link in its own directory.
    wait_for(
        Duration::from_secs(60),
        "restore to open the database",
        || data.join("db").exists().then_some(()),
    );
    let link = data.join("planted");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let status = wait_for(Duration::from_secs(300), "restore to finish", || {
        restore.try_wait().unwrap()
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(restore.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");

    let target_meta = std::fs::metadata(&target).unwrap();
    assert_eq!(
        (target_meta.uid(), target_meta.gid()),
        (0, 0),
        "restore followed the planted link"
    );
    // The link itself was handed over: the walk saw it (it was planted in time).
    let link_meta = std::fs::symlink_metadata(&link).unwrap();
    assert_eq!(
        link_meta.uid(),
        65534,
        "the restore finished before the link was planted: make the backup larger"
    );
    // The restored files are the service user's.
    for name in ["db", "conf", "jwt_signing_key"] {
        let path = data.join(name);
        if path.exists() {
            assert_eq!(std::fs::metadata(&path).unwrap().uid(), 65534, "{name}");
        }
    }
}

fn chown_to(path: &Path, id: u32) {
    std::os::unix::fs::chown(path, Some(id), Some(id)).unwrap();
}

#[test]
fn revoking_a_user_with_a_thousand_families_writes_no_blob_files() {
    let (_mock, server) = start_with_mock();
    // One user, a thousand logins: a thousand live refresh-token families.
    std::thread::scope(|scope| {
        for t in 0..8 {
            let server = &server;
            scope.spawn(move || {
                for n in (t..1000).step_by(8) {
                    login(server, &format!("ok:many.{n}"));
                }
            });
        }
    });
    let out = server.cli(&["tokens", "revoke", "--user", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let blobs: Vec<_> = std::fs::read_dir(server.data_dir().join("blobs"))
        .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(blobs.is_empty(), "sled wrote blob files: {blobs:?}");
}

#[test]
fn a_symbolic_link_among_the_databases_files_stops_the_open_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(dir.path());
    let list = |config: &Path| {
        Command::new(env!("CARGO_BIN_EXE_wxauth"))
            .arg("--config")
            .arg(config)
            .args(["users", "list"])
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    // A restore creates the database; an offline command opens it.
    let backup = dir.path().join("backup.jsonl");
    write_backup(&backup, 1);
    let out = restore_command(&config, &backup).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = list(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Whoever owns the directory swaps sled's `conf` for a link to someone else's file.
    let data = dir.path().join("data");
    let target = dir.path().join("not-the-services.txt");
    std::fs::write(&target, "keep me\n").unwrap();
    std::fs::remove_file(data.join("conf")).unwrap();
    std::os::unix::fs::symlink(&target, data.join("conf")).unwrap();
    let out = list(&config);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("conf is a symbolic link"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me\n");
}
