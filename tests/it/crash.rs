//! A crashed or stuck owner actor. The server is crash-only: a
//! panic anywhere ends the process with exit code 70 (EX_SOFTWARE) so that systemd
//! restarts it, and /readyz asks every owner actor through its mailbox.
//!
//! The faults come from a hook compiled into debug builds only
//! (`WXAUTH_DEBUG_FAULT`), so these tests are skipped in release builds.

use crate::common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

/// Exit code of a server that panicked (EX_SOFTWARE).
const EXIT_PANIC: i32 = 70;

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "the fault hook exists in debug builds only"
)]
fn a_panicking_issuer_ends_the_process_with_code_70_and_the_log_names_the_panic() {
    let mock = MockWeChat::start();
    let mut server = TestServer::start(
        TestConfig::against(&mock).with_env("WXAUTH_DEBUG_FAULT", "issuer_panic"),
    );
    // A login does not reach the issuer (the registry starts the token family);
    // a refresh does, and the issuer panics: the client may see a 503 or a closed
    // connection, but never a 200.
    let login = post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "ok:pat.1" }),
    );
    assert_eq!(login.status, 200, "{}", login.text);
    let reply = try_post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": login.json()["refresh"] }),
    );
    assert!(
        reply.as_ref().is_none_or(|r| r.status != 200),
        "a refresh answered 200 through a panicking issuer"
    );

    let status = server.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(EXIT_PANIC), "exit status: {status}");
    let logs = server.logs();
    let panic_line = logs
        .lines()
        .find(|l| l.contains("panic"))
        .unwrap_or_else(|| panic!("no panic in the log:\n{logs}"));
    assert!(
        panic_line.contains("debug fault: issuer_panic") && panic_line.contains("issuer.rs"),
        "the log line names neither the panic nor where it happened: {panic_line}"
    );
    assert!(!logs.contains(SECRET), "the AppSecret reached the log");

    // What systemd does next: start again on the same data directory.
    server.restart();
    assert_eq!(get(&server.url("/healthz"), None).status, 200);
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "the fault hook exists in debug builds only"
)]
fn readyz_is_unready_while_the_token_issuer_does_not_answer() {
    let mock = MockWeChat::start();
    let server = TestServer::start(
        TestConfig::against(&mock).with_env("WXAUTH_DEBUG_FAULT", "issuer_stall"),
    );
    let ready = get(&server.url("/readyz"), None);
    assert_eq!(ready.status, 200, "{}", ready.text);

    // A refresh wedges the issuer (30 s); the handler gives up after its timeout.
    let login = post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "ok:sam.1" }),
    );
    assert_eq!(login.status, 200, "{}", login.text);
    let refresh = json!({ "refresh": login.json()["refresh"] });
    let url = server.url("/api/token/refresh/");
    let stuck = std::thread::spawn(move || try_post_json(&url, &refresh));

    let started = Instant::now();
    let reply = wait_for(Duration::from_secs(20), "/readyz to turn 503", || {
        let reply = get(&server.url("/readyz"), None);
        (reply.status == 503).then_some(reply)
    });
    let body = reply.assert_error(503, "not_ready");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("token issuer")),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the probe waited for the stuck issuer instead of timing out"
    );
    if let Some(reply) = stuck.join().unwrap() {
        assert_eq!(reply.status, 503, "{}", reply.text);
    }
}
