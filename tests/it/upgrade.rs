//! An upgrade keeps everyone logged in: a data directory and a backup written by
//! the release before families were one record (commit b6ef4d5), with its tokens,
//! open and restore in this binary. Access tokens verify; refresh tokens refresh
//! into the new form; logged-out, rotated-out and revoked tokens stay refused.
//! And a refresh retried inside the grace writes nothing.
//!
//! The fixture (`tests/fixtures/upgrade/`) was made by that release's binary with
//! `make_the_upgrade_fixture` below:
//!
//! ```text
//! WXAUTH_OLD_BIN=/path/to/wxauth-b6ef4d5 cargo test --test it make_the_upgrade_fixture -- --ignored
//! ```

use crate::common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upgrade")
}

/// Long-lived tokens, so that the fixture's stay valid for years.
fn config(mock: &MockWeChat) -> TestConfig {
    TestConfig::against(mock).with_toml("\n[jwt]\naccess_ttl = \"10y\"\nrefresh_ttl = \"10y\"\n")
}

fn refresh(server: &TestServer, token: &str) -> Reply {
    post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": token }),
    )
}

fn verify(server: &TestServer, token: &str) -> Reply {
    post_json(
        &server.url("/api/token/verify/"),
        &json!({ "token": token }),
    )
}

fn blacklist(server: &TestServer, token: &str) -> Reply {
    post_json(
        &server.url("/api/token/blacklist/"),
        &json!({ "refresh": token }),
    )
}

fn data(server: &TestServer, token: &str) -> Reply {
    get(&server.url("/api/weixin/data/"), Some(&bearer(token)))
}

fn str_of<'a>(body: &'a Value, key: &str) -> &'a str {
    body[key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {body}"))
}

/// Not run by default: makes the fixture with the previous release's binary.
#[test]
#[ignore]
fn make_the_upgrade_fixture() {
    let old = std::env::var("WXAUTH_OLD_BIN").expect("WXAUTH_OLD_BIN: the previous release");
    let mock = MockWeChat::start();
    let mut server = TestServer::start_with(config(&mock), Path::new(&old), |_| {});
    // A: logged in, refreshed once (a_r1 rotated out, a_r2 current), then a second
    // login that logged out.
    let a = login(&server, "ok:upgrade-a.1");
    let a_r1 = str_of(&a, "refresh").to_string();
    let rotated = refresh(&server, &a_r1);
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    let rotated = rotated.json();
    let a2 = login(&server, "ok:upgrade-a.2");
    assert_eq!(blacklist(&server, str_of(&a2, "refresh")).status, 200);
    // B: logged in, untouched.
    let b = login(&server, "ok:upgrade-b.1");
    // C: logged in, then every token revoked by the operator.
    let c = login(&server, "ok:upgrade-c.1");
    let out = server.cli(&["tokens", "revoke", "--user", &c["user"]["id"].to_string()]);
    assert!(out.status.success(), "{out:?}");

    let dir = fixture_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let backup = server.cli(&["backup", dir.join("backup.jsonl").to_str().unwrap()]);
    assert!(backup.status.success(), "{backup:?}");
    server.terminate();
    let tar = Command::new("tar")
        .arg("czf")
        .arg(dir.join("data.tar.gz"))
        .arg("-C")
        .arg(server.data_dir())
        .arg(".")
        .status()
        .unwrap();
    assert!(tar.success());
    let tokens = json!({
        "a_user": a["user"]["id"],
        "a_access": a["access"],
        "a_r1_rotated_out": a_r1,
        "a_access2": rotated["access"],
        "a_r2": rotated["refresh"],
        "a2_r1_logged_out": a2["refresh"],
        "b_user": b["user"]["id"],
        "b_access": b["access"],
        "b_r1": b["refresh"],
        "c_access_revoked": c["access"],
        "c_r1_revoked": c["refresh"],
    });
    std::fs::write(
        dir.join("tokens.json"),
        serde_json::to_string_pretty(&tokens).unwrap(),
    )
    .unwrap();
}

fn tokens() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("tokens.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn untar_fixture(data: &Path) {
    std::fs::create_dir_all(data).unwrap();
    let status = Command::new("tar")
        .arg("xzf")
        .arg(fixture_dir().join("data.tar.gz"))
        .arg("-C")
        .arg(data)
        .status()
        .expect("tar");
    assert!(status.success());
}

/// Everything an upgrade must keep, on a server running on the upgraded data.
fn everyone_is_still_logged_in(server: &TestServer) {
    let t = tokens();
    let s = |key: &str| t[key].as_str().unwrap().to_string();
    for key in ["a_access", "a_access2", "b_access"] {
        let reply = data(server, &s(key));
        assert_eq!(reply.status, 200, "{key}: {}", reply.text);
    }
    data(server, &s("c_access_revoked")).assert_error(401, "token_not_valid");
    assert_eq!(verify(server, &s("a_r2")).status, 200);
    assert_eq!(verify(server, &s("b_r1")).status, 200);
    for key in ["a_r1_rotated_out", "a2_r1_logged_out", "c_r1_revoked"] {
        verify(server, &s(key)).assert_error(401, "token_not_valid");
    }

    // B's token refreshes into the new form (family and generation), which refreshes.
    let b2 = refresh(server, &s("b_r1"));
    assert_eq!(b2.status, 200, "{}", b2.text);
    let b2 = str_of(&b2.json(), "refresh").to_string();
    let (_, claims) = jwt_parts(&b2);
    assert_eq!(claims["gen"], 2, "{claims}");
    assert_eq!(claims["fam"].as_str().map(str::len), Some(32), "{claims}");
    let b3 = refresh(server, &b2);
    assert_eq!(b3.status, 200, "{}", b3.text);
    let b3 = str_of(&b3.json(), "refresh").to_string();
    assert_eq!(jwt_parts(&b3).1["gen"], 3);
    // The legacy token is now two generations behind: a reuse, the family revoked.
    refresh(server, &s("b_r1")).assert_error(401, "token_not_valid");
    refresh(server, &b3).assert_error(401, "token_not_valid");

    // Logged out, rotated out, revoked: still refused.
    for key in ["a2_r1_logged_out", "c_r1_revoked"] {
        refresh(server, &s(key)).assert_error(401, "token_not_valid");
    }
    let a3 = refresh(server, &s("a_r2"));
    assert_eq!(a3.status, 200, "{}", a3.text);
    refresh(server, &s("a_r1_rotated_out")).assert_error(401, "token_not_valid");

    // A's sessions: the two logins, the logged-out one revoked.
    let user = t["a_user"].to_string();
    let sessions = json_lines(&server.cli(&["users", "sessions", &user]));
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    assert!(
        sessions.iter().all(|s| s["revoked"] == true),
        "{sessions:?}"
    );
}

#[test]
fn a_data_directory_of_the_previous_release_opens_and_keeps_everyone_logged_in() {
    let mock = MockWeChat::start();
    let server = TestServer::start_with(
        config(&mock),
        Path::new(env!("CARGO_BIN_EXE_wxauth")),
        untar_fixture,
    );
    everyone_is_still_logged_in(&server);
}

#[test]
fn a_backup_of_the_previous_release_restores_and_keeps_everyone_logged_in() {
    let mock = MockWeChat::start();
    let backup = fixture_dir().join("backup.jsonl");
    let server = TestServer::start_with(
        config(&mock),
        Path::new(env!("CARGO_BIN_EXE_wxauth")),
        |data| {
            let config = data.parent().unwrap().join("config.toml");
            let out = Command::new(env!("CARGO_BIN_EXE_wxauth"))
                .arg("--config")
                .arg(&config)
                .arg("restore")
                .arg(&backup)
                .env_remove("RUST_LOG")
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        },
    );
    everyone_is_still_logged_in(&server);
}

#[test]
fn a_newer_storage_format_refuses_to_start_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let store = wxauth::storage::sled::SledStore::open(&data, 1 << 20).unwrap();
        let mut batch = wxauth::storage::WriteBatch::default();
        batch.put(
            wxauth::storage::Tree::Meta,
            wxauth::storage::upgrade::FORMAT_KEY,
            (wxauth::storage::upgrade::FORMAT_VERSION + 1).to_be_bytes(),
        );
        use wxauth::storage::Store;
        store.apply(batch).unwrap();
        store.flush().unwrap();
    }
    let toml = format!(
        "{VALID_CONFIG}\n[storage]\npath = {:?}\n",
        data.display().to_string()
    );
    // sled's background flusher may hold the lock for a moment after the drop.
    let out = wait_for(
        std::time::Duration::from_secs(10),
        "the data directory's lock",
        || {
            let out = run_with_config(dir.path(), &toml, &[], &["serve"]);
            let text = String::from_utf8_lossy(&out.stderr).to_string();
            (!text.contains("in use by another")).then_some(out)
        },
    );
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("newer wxauth") && text.contains("storage format 3"),
        "{text}"
    );
}

/// Sum of the sizes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                dir_bytes(&entry.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

#[test]
fn two_thousand_retries_inside_the_grace_write_nothing() {
    let mock = MockWeChat::start();
    let server =
        TestServer::start(TestConfig::against(&mock).with_env("WXAUTH_JWT__REUSE_GRACE", "10m"));
    let r1 = str_of(&login(&server, "ok:retrier"), "refresh").to_string();
    let r2 = refresh(&server, &r1);
    assert_eq!(r2.status, 200);
    let generation = jwt_parts(str_of(&r2.json(), "refresh")).1["gen"].clone();
    let before = dir_bytes(&server.data_dir());
    for _ in 0..2000 {
        let retry = refresh(&server, &r1);
        assert_eq!(retry.status, 200, "{}", retry.text);
        // A pair for the family's current generation.
        assert_eq!(
            jwt_parts(str_of(&retry.json(), "refresh")).1["gen"],
            generation
        );
    }
    let grown = dir_bytes(&server.data_dir()).saturating_sub(before);
    eprintln!("2,000 retries grew the data directory by {grown} bytes");
    assert!(grown < 300 * 1024, "grew by {grown} bytes");
}
