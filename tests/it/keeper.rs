//! The access-token keeper's own faults: a forced refresh is on record before it is
//! asked for, and a storage fault is ours (5xx of our own), never WeChat's.

use crate::common;

use common::*;
use serde_json::json;

#[test]
fn a_forced_refresh_is_recorded_even_when_its_request_runs_out_of_time() {
    let mock = MockWeChat::start();
    // The keeper's deadline is 4 × wechat.timeout: 4 s here.
    let server = TestServer::start(
        TestConfig::against(&mock)
            .with_env("WXAUTH_WECHAT__TIMEOUT", "1s")
            .with_env("WXAUTH_WECHAT__RETRIES", "5"),
    );
    let access = login(&server, "ok:late")["access"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(phone(&server, &access, "ok:late").status, 200);
    // WeChat refuses the token, then answers the forced fetch slowly with -1 (busy),
    // and its retries outlast the request's deadline.
    mock.revoke_tokens();
    mock.set_token_delay(900);
    mock.fail_stable_token(Some(-1));
    phone(&server, &access, "ok:late").assert_error(504, "upstream_timeout");
    assert!(mock.token_fetches().1 >= 1, "no forced fetch was made");
    // WeChat counted it, and so did we.
    let status = json_lines(&server.cli(&["wechat", "token"]));
    assert_eq!(status[0]["forced_refreshes_last_24h"], 1, "{status:?}");
    mock.fail_stable_token(None);
    mock.set_token_delay(0);
}

#[test]
fn a_storage_fault_in_the_keeper_is_not_blamed_on_wechat() {
    let (_mock, mut server) = start_with_mock();
    let access = login(&server, "ok:stored")["access"]
        .as_str()
        .unwrap()
        .to_string();
    let backup = server.dir.path().join("backup.jsonl");
    assert!(server
        .cli(&["backup", backup.to_str().unwrap()])
        .status
        .success());
    assert!(server.terminate().success());
    // A stored access-token record that is not one (its text must not reach the log).
    let key = hex::encode(format!("wechat_access_token\0{APPID}"));
    let text = std::fs::read_to_string(&backup).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let end = lines.pop().unwrap();
    let entries: u64 = serde_json::from_str::<serde_json::Value>(&end).unwrap()["entries"]
        .as_u64()
        .unwrap();
    lines.push(
        json!({"tree": "meta", "key": key, "value": {"access_token": "RECORD-TEXT-NEVER-LOGGED", "expires_at_ms": "RECORD-TEXT-NEVER-LOGGED"}})
            .to_string(),
    );
    lines.push(json!({"end": true, "entries": entries + 1}).to_string());
    std::fs::write(&backup, lines.join("\n") + "\n").unwrap();
    let data = server.data_dir();
    std::fs::remove_dir_all(&data).unwrap();
    let restored = server.cli(&["restore", backup.to_str().unwrap()]);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    server.restart();

    let reply = phone(&server, &access, "ok:stored");
    reply.assert_error(500, "internal_error");
    assert!(reply.header("retry-after").is_none());
    let logs = server.logs();
    assert!(
        logs.contains("corrupt record in tree meta: access token record"),
        "the cause is not logged:\n{logs}"
    );
    assert!(!logs.contains("RECORD-TEXT-NEVER-LOGGED"), "{logs}");
}
