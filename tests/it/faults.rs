//! A full disk under a running server: clear 503s, readiness fails, reads go on,
//! nothing answered is lost, and the server recovers by itself when space returns.
//!
//! Needs root to mount a small tmpfs as the data directory. Without it the test
//! says so and passes, except in CI (CI=true), where it must run.

use crate::common;

use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` until a write fails.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while file
        .write_all(&chunk)
        .and_then(|_| file.sync_data())
        .is_ok()
    {}
    path
}

#[test]
fn a_full_disk_gives_503s_loses_nothing_answered_and_heals() {
    let mock = MockWeChat::start();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let Some(_mount) = Tmpfs::mount(&data, "24m") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root and must run this test"
        );
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    };
    let mut server = TestServer::start(
        TestConfig::against(&mock)
            .with_env("WXAUTH_STORAGE__PATH", data.to_str().unwrap())
            .with_env("WXAUTH_STORAGE__CACHE_CAPACITY", "4MiB"),
    );
    let login_url = server.url("/api/weixin/login/");
    let mut answered = vec![login(&server, "ok:before.1")];

    let filler = fill(&data);
    let mut refused = None;
    for n in 0..5000 {
        let reply = post_json(&login_url, &json!({ "code": format!("ok:full-{n}") }));
        match reply.status {
            200 => answered.push(reply.json()),
            _ => {
                refused = Some(reply);
                break;
            }
        }
    }
    let refused = refused.expect("a full disk must refuse writes");
    refused.assert_error(503, "storage_unavailable");
    assert!(refused.header("retry-after").is_some());
    get(&server.url("/readyz"), None).assert_error(503, "not_ready");
    // Reads need no disk space: a valid access token still works.
    let first = answered[0]["access"].as_str().unwrap();
    assert_eq!(
        get(&server.url("/api/weixin/data/"), Some(&bearer(first))).status,
        200
    );

    std::fs::remove_file(filler).unwrap();
    wait_for(
        Duration::from_secs(20),
        "readiness after the disk has room again",
        || (get(&server.url("/readyz"), None).status == 200).then_some(()),
    );
    answered.push(login(&server, "ok:after.1"));

    // Every login that was answered 200 is still there, also after a restart.
    assert_eq!(server.terminate().code(), Some(0));
    server.restart();
    for body in &answered {
        let reply = get(
            &server.url("/api/weixin/data/"),
            Some(&bearer(body["access"].as_str().unwrap())),
        );
        assert_eq!(
            reply.status, 200,
            "an answered login was lost: {}",
            reply.text
        );
    }
    assert!(server
        .logs()
        .contains("storage reopened after an I/O error"));
}
