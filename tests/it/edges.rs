//! Smaller hardening points: a token's `kid` always picks its key, WeChat's words
//! never reach the log, the access-token endpoint's refusals, duplicate
//! `Authorization` headers, what a failed start leaves behind, what errors echo,
//! and a readiness probe that cannot be turned into an fsync loop.

use crate::common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

#[test]
fn a_token_with_an_unknown_kid_is_refused_even_with_one_live_key() {
    let (_mock, server) = start_with_mock();
    let access = login(&server, "ok:kid")["access"]
        .as_str()
        .unwrap()
        .to_string();
    let (header, claims) = jwt_parts(&access);
    let key = std::fs::read(server.data_dir().join("jwt_signing_key")).unwrap();
    let sign = |kid: &str| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&key),
        )
        .unwrap()
    };
    // The same claims under the real kid are accepted: only the kid differs.
    let real = sign(header["kid"].as_str().unwrap());
    assert_eq!(
        get(&server.url("/api/weixin/data/"), Some(&bearer(&real))).status,
        200
    );
    let unknown = sign("00000000deadbeef");
    get(&server.url("/api/weixin/data/"), Some(&bearer(&unknown)))
        .assert_error(401, "token_not_valid");
    post_json(
        &server.url("/api/token/verify/"),
        &json!({ "token": unknown }),
    )
    .assert_error(401, "token_not_valid");
}

#[test]
fn a_json_error_in_wechats_answer_is_logged_without_its_values() {
    let (_mock, server) = start_with_mock();
    let reply = post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "typeerr:WECHAT-SAID-THIS" }),
    );
    reply.assert_error(502, "upstream_error");
    let logs = wait_for(Duration::from_secs(10), "the failure's log line", || {
        let logs = server.logs();
        logs.contains("jscode2session failed").then_some(logs)
    });
    assert!(!logs.contains("WECHAT-SAID-THIS"), "{logs}");
    assert!(logs.contains("JSON of the wrong shape"), "{logs}");
}

/// A request with two `Authorization` headers, written by hand (clients merge them).
fn twice_authorized(server: &TestServer, path: &str, first: &str, second: &str) -> (u16, String) {
    let addr = server.base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {first}\r\nAuthorization: {second}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn duplicate_authorization_headers_are_refused_with_400() {
    let (_mock, server) = start_with_mock();
    let access = login(&server, "ok:twice")["access"]
        .as_str()
        .unwrap()
        .to_string();
    for path in ["/api/weixin/data/", "/api/auth/check"] {
        for (first, second) in [
            (bearer(&access), "Bearer forged".to_string()),
            ("Bearer forged".to_string(), bearer(&access)),
            (bearer(&access), bearer(&access)),
        ] {
            let (status, body) = twice_authorized(&server, path, &first, &second);
            assert_eq!(status, 400, "{path}: {body}");
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["code"], "invalid_request", "{path}: {body}");
        }
    }
    // One header still works.
    assert_eq!(
        get(&server.url("/api/weixin/data/"), Some(&bearer(&access))).status,
        200
    );
}

#[test]
fn wrong_secrets_on_the_access_token_endpoint_are_logged_once_a_minute() {
    let mock = MockWeChat::start();
    let (server, url, _dir) = start_with_token_endpoint(&mock);
    for wrong in [
        "Bearer x",
        "Bearer a-long-enough-bearer-secreT",
        "Basic abc",
    ] {
        for _ in 0..10 {
            get(&url, Some(wrong)).assert_error(401, "not_authenticated");
        }
    }
    assert_eq!(
        get(&url, Some("Bearer a-long-enough-bearer-secret")).status,
        200
    );
    let warned = server
        .logs()
        .lines()
        .filter(|l| l.contains("without the right bearer secret"))
        .count();
    assert_eq!(warned, 1, "{}", server.logs());
}

#[test]
fn a_failed_bind_leaves_no_admin_socket() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = format!(
        "[server]\nbind = \"127.0.0.1:{port}\"\n[wechat]\nappid = \"wxabc123\"\nsecret = \"shh\"\n[metrics]\nbind = \"\"\n"
    );
    let out = run_with_config(dir.path(), &config, &[], &["serve"]);
    assert!(!out.status.success(), "it started on a taken port");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&port.to_string()), "{stderr}");
    let data = dir.path().join("data");
    assert!(data.join("db").exists(), "the start got as far as storage");
    assert!(
        !data.join("admin.sock").exists(),
        "a stale admin.sock was left behind"
    );
}

#[test]
fn keys_retire_does_not_echo_what_it_was_given() {
    let (_mock, server) = start_with_mock();
    let input = "ECHOED-INPUT-\u{1b}[31m";
    let out = server.cli(&["keys", "retire", input]);
    assert!(!out.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!said.contains("ECHOED-INPUT"), "{said}");
    assert!(!server.logs().contains("ECHOED-INPUT"));
    assert!(said.contains("no live key has that kid"), "{said}");
}

#[test]
fn a_private_directory_that_cannot_be_read_is_not_called_open_to_others() {
    if !running_as_root() {
        eprintln!("SKIPPED: needs root to run the server as another user");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // root's own 0700 data directory, with something in it.
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(data.join("conf"), b"").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, VALID_CONFIG).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    // A copy the other user can reach, wherever the build directory is.
    let binary = dir.path().join("wxauth");
    std::fs::copy(env!("CARGO_BIN_EXE_wxauth"), &binary).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&binary)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("setpriv");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mode 700"), "{stderr}");
    assert!(!stderr.contains("is open to other users"), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
}

#[test]
fn readiness_probes_storage_at_most_once_a_second() {
    let mock = MockWeChat::start();
    let server = TestServer::start(
        TestConfig::against(&mock).with_env("WXAUTH_METRICS__BIND", "127.0.0.1:0"),
    );
    let addr = server.metrics_addr().expect("the metrics listener");
    let flushes = || -> u64 {
        let text = get(&format!("http://{addr}/metrics"), None).text;
        text.lines()
            .find_map(|l| l.strip_prefix("wxauth_storage_flushes_total "))
            .expect("the flush counter")
            .parse()
            .unwrap()
    };
    let before = flushes();
    let started = Instant::now();
    for _ in 0..30 {
        let reply = get(&server.url("/readyz"), None);
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let seconds = started.elapsed().as_secs();
    let during = flushes() - before;
    // One probe (one fsync) per started second at most, however many requests.
    assert!(
        during <= seconds + 1,
        "{during} flushes for 30 readiness requests in {seconds} s"
    );
}
