//! Files: everything under `storage.path` private (0600/0700), the generated signing
//! key whole or refused by name, empty variables unset, and keys other tools read.

use crate::common;

use common::*;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Every entry under `root` (root included) with its permission bits; symlinks are
/// not followed.
fn walk(root: &Path) -> Vec<(PathBuf, bool, u32)> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let is_dir = meta.is_dir();
        found.push((path.clone(), is_dir, meta.permissions().mode() & 0o7777));
        if is_dir {
            for entry in std::fs::read_dir(&path).unwrap() {
                pending.push(entry.unwrap().path());
            }
        }
    }
    found
}

/// Asserts every directory under `root` is 0700 and every other entry 0600, and that
/// the walk saw the files that matter (so it cannot pass on an empty directory).
fn assert_private(root: &Path, must_include: &[&str]) {
    let entries = walk(root);
    let wrong: Vec<String> = entries
        .iter()
        .filter(|(_, is_dir, mode)| *mode != if *is_dir { 0o700 } else { 0o600 })
        .map(|(path, is_dir, mode)| {
            format!(
                "{} {:o} ({})",
                path.display(),
                mode,
                if *is_dir { "dir" } else { "file" }
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "not owner-only under {}: {wrong:#?}",
        root.display()
    );
    for name in must_include {
        assert!(
            entries
                .iter()
                .any(|(p, _, _)| p.file_name() == Some(name.as_ref())),
            "{name} was not found under {}: {entries:?}",
            root.display()
        );
    }
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Runs the binary to its exit, killing it (and failing) if it is still running
/// after `deadline`: for starts that must be refused.
fn run_to_exit(mut cmd: Command, deadline: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(deadline) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("wxauth was still running after {deadline:?}: it should have refused to start");
        }
    }
}

fn wxauth(server: &TestServer, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wxauth"));
    cmd.arg("--config")
        .arg(&server.config)
        .args(args)
        .current_dir(server.dir.path())
        .env_remove("RUST_LOG");
    cmd
}

#[test]
fn every_file_and_directory_under_storage_path_is_owner_only() {
    let (_mock, mut server) = start_with_mock();
    let data = server.data_dir();
    let mut refresh = Vec::new();
    for name in ["amy", "bob", "cal"] {
        let body = login(&server, &format!("ok:{name}.1"));
        refresh.push(body["refresh"].as_str().unwrap().to_string());
    }
    for token in &refresh {
        let reply = post_json(
            &server.url("/api/token/refresh/"),
            &json!({ "refresh": token }),
        );
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    // Written while it serves, through the admin socket.
    let backup = server.dir.path().join("backup.jsonl");
    let out = server.cli(&["backup", backup.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode_of(&backup), 0o600, "the backup file holds secrets");
    assert_private(&data, &["db", "conf", "jwt_signing_key"]);
    assert_eq!(server.terminate().code(), Some(0));
    assert_private(&data, &["db", "conf", "jwt_signing_key"]);

    // A restore into a new directory makes the same.
    let restored = server.dir.path().join("restored/data");
    let out = wxauth(&server, &["restore", backup.to_str().unwrap()])
        .env("WXAUTH_STORAGE__PATH", &restored)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode_of(&server.dir.path().join("restored")), 0o700);
    assert_private(&restored, &["db", "conf", "jwt_signing_key"]);
}

/// A data directory from an older version: 0755, with 0644 files and a 0755 `blobs/`.
/// It is tightened (not refused), and the log says so.
#[test]
fn an_existing_directory_open_to_others_is_tightened_with_a_warning() {
    let (_mock, mut server) = start_with_mock();
    let body = login(&server, "ok:dee.1");
    assert_eq!(server.terminate().code(), Some(0));
    let data = server.data_dir();
    let blobs = data.join("blobs");
    if !blobs.exists() {
        std::fs::create_dir(&blobs).unwrap();
    }
    for (path, mode) in [
        (data.clone(), 0o755),
        (blobs, 0o755),
        (data.join("db"), 0o644),
        (data.join("conf"), 0o644),
        (data.join("jwt_signing_key"), 0o644),
    ] {
        set_mode(&path, mode);
    }
    server.restart();
    assert_private(&data, &["db", "conf", "jwt_signing_key", "blobs"]);
    let logs = server.logs();
    assert!(
        logs.contains("open to other users") && logs.contains("restricted"),
        "the tightening is logged:\n{logs}"
    );
    // The same data, served on.
    let reply = get(
        &server.url("/api/weixin/data/"),
        Some(&bearer(body["access"].as_str().unwrap())),
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
}

#[test]
fn a_fresh_data_directory_is_0700_from_the_start() {
    // A missing parent too: every level the server creates is private.
    let mock = MockWeChat::start();
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("new/data");
    let server = TestServer::start(
        TestConfig::against(&mock).with_env("WXAUTH_STORAGE__PATH", data.to_str().unwrap()),
    );
    login(&server, "ok:fay.1");
    assert_eq!(mode_of(&parent.path().join("new")), 0o700);
    assert_private(&data, &["db", "conf", "jwt_signing_key"]);
}

#[test]
fn a_damaged_generated_key_stops_the_start_naming_the_file() {
    let (_mock, mut server) = start_with_mock();
    login(&server, "ok:gil.1");
    assert_eq!(server.terminate().code(), Some(0));
    let key = server.data_dir().join("jwt_signing_key");
    let whole = std::fs::read_to_string(&key).unwrap();
    for damaged in ["", &whole[..20]] {
        std::fs::write(&key, damaged).unwrap();
        let out = run_to_exit(wxauth(&server, &["serve"]), Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "a config-class error: {stderr}");
        assert!(
            stderr.contains(&key.display().to_string()),
            "the error names the file: {stderr}"
        );
        assert_eq!(
            std::fs::read_to_string(&key).unwrap(),
            damaged,
            "never silently replaced (that would log everyone out)"
        );
    }
    // Back to the whole key, with a leftover temporary file from a crashed
    // generation beside it: the key is used, the leftover removed.
    std::fs::write(&key, &whole).unwrap();
    let leftover = server.data_dir().join(".jwt_signing_key.tmp");
    std::fs::write(&leftover, "0123").unwrap();
    server.restart();
    assert!(!leftover.exists(), "the leftover temporary file is cleaned");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), whole);
}

#[test]
fn a_crash_before_the_key_was_renamed_into_place_generates_a_whole_key() {
    // Only the temporary file exists (a crash between its write and the rename).
    let mock = MockWeChat::start();
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("data");
    std::fs::create_dir(&data).unwrap();
    set_mode(&data, 0o700);
    std::fs::write(data.join(".jwt_signing_key.tmp"), "abc").unwrap();
    let server = TestServer::start(
        TestConfig::against(&mock).with_env("WXAUTH_STORAGE__PATH", data.to_str().unwrap()),
    );
    let key = std::fs::read_to_string(data.join("jwt_signing_key")).unwrap();
    assert_eq!(key.len(), 64, "a whole new key: {key:?}");
    assert!(!data.join(".jwt_signing_key.tmp").exists());
    let body = login(&server, "ok:hob.1");
    let reply = get(
        &server.url("/api/weixin/data/"),
        Some(&bearer(body["access"].as_str().unwrap())),
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
}

#[test]
fn empty_environment_variables_mean_unset() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("wechat_secret");
    std::fs::write(&secret_file, "from-the-file\n").unwrap();
    let toml = "[server]\nbind = \"127.0.0.1:0\"\n[wechat]\nappid = \"wxabc123\"\n";
    let secret_path = secret_file.to_str().unwrap();
    let env = [
        // The systemd way of blanking a variable, beside the one that is meant.
        ("WXAUTH_WECHAT__SECRET", ""),
        ("WXAUTH_WECHAT__SECRET_FILE", secret_path),
        // Empty would be refused as a value for each of these.
        ("WXAUTH_LOG__LEVEL", ""),
        ("WXAUTH_JWT__ISSUER", ""),
        ("WXAUTH_SERVER__WORKERS", ""),
    ];
    let out = run_with_config(dir.path(), toml, &env, &["check-config"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("unknown"), "no warnings: {stderr}");

    // WXAUTH_CONFIG= as well: ./config.toml is read as when it is unset.
    let out = Command::new(env!("CARGO_BIN_EXE_wxauth"))
        .arg("check-config")
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .env("WXAUTH_CONFIG", "")
        .envs(env)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("config.toml"), "{stdout}");
}

#[test]
fn metrics_off_from_the_environment() {
    // An empty variable means unset: the value "off" turns the listener off.
    let mock = MockWeChat::start();
    let server =
        TestServer::start(TestConfig::against(&mock).with_env("WXAUTH_METRICS__BIND", "off"));
    login(&server, "ok:ida.1");
    assert_eq!(server.metrics_addr(), None, "no metrics listener");
}

fn keygen(algorithm: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_wxauth"))
        .args(["keygen", "--algorithm", algorithm])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn keygen_pem_keys_are_read_by_openssl() {
    let openssl = Path::new("/usr/bin/openssl");
    if !openssl.exists() {
        eprintln!("SKIPPED keygen_pem_keys_are_read_by_openssl: /usr/bin/openssl is missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (algorithm, openssl_says) in [("EdDSA", "ED25519 Private-Key"), ("ES256", "P-256")] {
        let file = dir.path().join(format!("{algorithm}.pem"));
        std::fs::write(&file, keygen(algorithm)).unwrap();
        let out = Command::new(openssl)
            .args(["pkey", "-in", file.to_str().unwrap(), "-noout", "-text"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "openssl cannot read the {algorithm} key: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(openssl_says), "{algorithm}: {text}");
    }
    // HS256 is not PEM: 256 random bits as hex.
    let hs = keygen("HS256");
    assert!(hs.trim_end().len() == 64 && hs.trim_end().bytes().all(|b| b.is_ascii_hexdigit()));
}

#[test]
fn keygen_eddsa_key_is_read_by_python_cryptography() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ed.pem");
    std::fs::write(&file, keygen("EdDSA")).unwrap();
    let script = "import sys\n\
        from cryptography.hazmat.primitives.serialization import load_pem_private_key\n\
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey\n\
        key = load_pem_private_key(open(sys.argv[1], 'rb').read(), None)\n\
        assert isinstance(key, Ed25519PrivateKey)\n";
    let has_module = Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_module {
        eprintln!(
            "SKIPPED keygen_eddsa_key_is_read_by_python_cryptography: no python3 with cryptography"
        );
        return;
    }
    let out = Command::new("python3")
        .args(["-c", script, file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cryptography cannot read the key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
