//! Configuration through the real binary: `wxauth check-config` and `wxauth serve`.

use crate::common;

use common::*;
use std::process::{Command, Output};

/// Runs the binary in a fresh directory with `toml` as its config file.
fn run(toml: &str, env: &[(&str, &str)], args: &[&str]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (run_with_config(dir.path(), toml, env, args), dir)
}

const VALID: &str = VALID_CONFIG;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts exit code 2 and one stderr line that names `key`.
fn assert_rejected(toml: &str, env: &[(&str, &str)], key: &str) {
    for args in [&["check-config"][..], &["serve"][..]] {
        let (out, _dir) = run(toml, env, args);
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?} should exit 2 for {key}; stderr: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(key), "the line names {key}: {err}");
    }
}

#[test]
fn a_valid_config_checks_out() {
    let (out, _dir) = run(VALID, &[], &["check-config"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
}

#[test]
fn the_repository_config_is_valid_and_uses_the_mock() {
    let repo_config = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let toml = std::fs::read_to_string(repo_config).unwrap();
    assert!(toml.contains("mock = true"));
    let (out, _dir) = run(&toml, &[], &["check-config"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("mock"),
        "the mock is announced: {}",
        stderr(&out)
    );
}

#[test]
fn bad_values_stop_the_start_with_exit_2_and_the_key() {
    let cases: &[(&str, &str)] = &[
        (
            "[server]\nbind = \"nowhere\"\n[wechat]\nmock = true\n",
            "server.bind",
        ),
        (
            "[server]\nworkers = \"many\"\n[wechat]\nmock = true\n",
            "server.workers",
        ),
        (
            "[wechat]\nmock = true\ntimeout = \"5 parsecs\"\n",
            "wechat.timeout",
        ),
        ("[wechat]\nmock = true\nretries = -1\n", "wechat.retries"),
        (
            "[server]\nbind = \"0.0.0.0:8000\"\n[wechat]\nmock = true\n",
            "wechat.mock",
        ),
        ("[wechat]\nmock = false\n", "wechat.appid"),
        ("[wechat]\nappid = \"wxabc\"\n", "wechat.secret"),
        (
            "[wechat]\nappid = \"wxabc\"\nsecret = \"a\"\nsecret_file = \"/etc/hosts\"\n",
            "wechat.secret_file",
        ),
        (
            "[wechat]\nappid = \"wxabc\"\nsecret_file = \"/nonexistent/secret\"\n",
            "wechat.secret_file",
        ),
        (
            "[wechat]\nmock = true\napi_base = \"ftp://x\"\n",
            "wechat.api_base",
        ),
        (
            "[wechat]\nmock = true\n[[wechat.apps]]\nappid = \"wxb\"\n",
            "wechat.apps[0].secret",
        ),
        (
            "[wechat]\nmock = true\n[jwt]\nalgorithm = \"none\"\n",
            "jwt.algorithm",
        ),
        (
            "[wechat]\nmock = true\n[jwt]\nalgorithm = \"RS256\"\n",
            "jwt.signing_key_file",
        ),
        (
            "[wechat]\nmock = true\n[jwt]\naccess_ttl = \"2d\"\n",
            "jwt.refresh_ttl",
        ),
        (
            "[wechat]\nmock = true\n[jwt]\nleeway = \"soon\"\n",
            "jwt.leeway",
        ),
        (
            "[wechat]\nmock = true\n[jwt]\njwks_max_age = \"2d\"\n",
            "jwt.jwks_max_age",
        ),
        (
            "[wechat]\nmock = true\n[jwt]\njwks_max_age = \"1500ms\"\n",
            "jwt.jwks_max_age",
        ),
        (
            "[wechat]\nmock = true\n[storage]\ncache_capacity = \"lots\"\n",
            "storage.cache_capacity",
        ),
        (
            "[wechat]\nmock = true\n[log]\nformat = \"xml\"\n",
            "log.format",
        ),
        (
            "[wechat]\nmock = true\n[metrics]\nbind = \"here\"\n",
            "metrics.bind",
        ),
        (
            "[wechat]\nmock = true\n[admin]\nio_timeout = \"20m\"\n",
            "admin.io_timeout",
        ),
        ("this is not toml", "config"),
    ];
    for (toml, key) in cases {
        assert_rejected(toml, &[], key);
    }
}

#[test]
fn environment_variables_override_the_file_and_are_checked_too() {
    assert_rejected(
        VALID,
        &[("WXAUTH_WECHAT__TIMEOUT", "fast")],
        "wechat.timeout",
    );
    assert_rejected(
        VALID,
        &[
            ("WXAUTH_SERVER__BIND", "0.0.0.0:1"),
            ("WXAUTH_WECHAT__MOCK", "true"),
        ],
        "wechat.mock",
    );
    let (out, _dir) = run(
        VALID,
        &[("WXAUTH_WECHAT__TIMEOUT", "250ms")],
        &["check-config"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn a_missing_config_file_is_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_wxauth"))
        .args(["--config", "/nonexistent/wxauth.toml", "check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/nonexistent/wxauth.toml"));
}

#[test]
fn unknown_keys_and_variables_are_named_in_warnings() {
    let toml = format!("{VALID}\n[jwt]\naccess_tll = \"5m\"\n");
    let (out, _dir) = run(
        &toml,
        &[("WXAUTH_WECHAT__SECERT", "typo")],
        &["check-config"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("jwt.access_tll"), "{err}");
    assert!(err.contains("WXAUTH_WECHAT__SECERT"), "{err}");
}

#[test]
fn the_secret_can_come_from_a_file_or_the_credentials_directory() {
    let mock = MockWeChat::start();
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("wechat_secret"), "from-a-file\n").unwrap();
    let toml = format!(
        "[server]\nbind = \"127.0.0.1:0\"\n[wechat]\nappid = \"{APPID}\"\nsecret_file = \"wechat_secret\"\napi_base = \"{}\"\n[limits]\nlogin_per_minute = 0\n[metrics]\nbind = \"\"\n",
        mock.base_url()
    );
    let config = TestConfig {
        toml,
        env: vec![(
            "CREDENTIALS_DIRECTORY".into(),
            creds.path().display().to_string(),
        )],
    };
    let server = TestServer::start(config);
    login(&server, "ok:filed");
    let seen = mock.state.lock().unwrap().credentials[0].1.clone();
    assert_eq!(
        seen, "from-a-file",
        "the file's secret, without its newline"
    );
}
