//! Running it on a VPS: the admin CLI (over the Unix socket and offline), backup
//! and restore, metrics, request ids, keys, health checks, and one process per
//! data directory.

use crate::common;

use common::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn disabling_a_user_through_the_running_server_takes_effect_at_once() {
    let (mock, server) = start_with_mock();
    let body = login(&server, "ok:ada.1");
    let id = body["user"]["id"].to_string();
    let access = body["access"].as_str().unwrap();
    let socket = server.data_dir().join("admin.sock");
    {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let meta = std::fs::metadata(&socket).expect("the admin socket exists while serving");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    let list = server.cli(&["users", "list"]);
    let listed = json_lines(&list);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["openid"], "o-ada");
    // The session key is never shown, under any name: look for its value.
    let session_key = mock.state.lock().unwrap().session_keys[0].clone();
    let show = server.cli(&["users", "show", &id]);
    let data = get(&server.url("/api/weixin/data/"), Some(&bearer(access)));
    for (what, text) in [
        (
            "users list",
            String::from_utf8_lossy(&list.stdout).into_owned(),
        ),
        (
            "users show",
            String::from_utf8_lossy(&show.stdout).into_owned(),
        ),
        ("/api/weixin/data/", data.text.clone()),
    ] {
        assert!(text.contains("o-ada"), "{what} shows the user: {text}");
        assert!(
            !text.contains(&session_key),
            "{what} shows the session key: {text}"
        );
    }

    let shown = json_lines(&server.cli(&["users", "disable", &id]));
    assert_eq!(shown[0]["disabled"], true);
    get(&server.url("/api/weixin/data/"), Some(&bearer(access))).assert_error(401, "user_inactive");
    let refresh = post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": body["refresh"] }),
    );
    refresh.assert_error(401, "no_active_account");
    post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "ok:ada.2" }),
    )
    .assert_error(403, "user_disabled");

    let shown = json_lines(&server.cli(&["users", "enable", &id]));
    assert_eq!(shown[0]["disabled"], false);
    assert_eq!(
        get(&server.url("/api/weixin/data/"), Some(&bearer(access))).status,
        200
    );
    assert_eq!(
        json_lines(&server.cli(&["users", "show", &id]))[0]["disabled"],
        false
    );

    let missing = server.cli(&["users", "show", "999"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no user with id 999"));
    assert!(
        server.logs().contains("admin command"),
        "admin commands are logged"
    );
}

#[test]
fn revoking_a_users_tokens_kills_its_access_and_refresh_tokens() {
    let (_mock, server) = start_with_mock();
    let body = login(&server, "ok:bo.1");
    let other = login(&server, "ok:cy.1");
    // Revocation bumps the user's token stamp: no wait for the clock.
    let user = body["user"]["id"].to_string();
    let sessions = json_lines(&server.cli(&["users", "sessions", &user]));
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["active"], true, "{sessions:?}");
    let out = json_lines(&server.cli(&["tokens", "revoke", "--user", &user]));
    assert_eq!(out[0]["families_revoked"], 1);
    // The session ends with the stamp: no family is written, and none is live.
    let sessions = json_lines(&server.cli(&["users", "sessions", &user]));
    assert_eq!(sessions[0]["active"], false, "{sessions:?}");
    assert_eq!(sessions[0]["revoked"], false, "{sessions:?}");

    let reply = get(
        &server.url("/api/weixin/data/"),
        Some(&bearer(body["access"].as_str().unwrap())),
    );
    reply.assert_error(401, "token_not_valid");
    let reply = post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": body["refresh"] }),
    );
    assert_eq!(
        reply.assert_error(401, "token_not_valid")["detail"],
        "Token is blacklisted"
    );
    // Other users are untouched, and the revoked user can log in again.
    assert_eq!(
        get(
            &server.url("/api/weixin/data/"),
            Some(&bearer(other["access"].as_str().unwrap()))
        )
        .status,
        200
    );
    let again = login(&server, "ok:bo.2");
    assert_eq!(
        get(
            &server.url("/api/weixin/data/"),
            Some(&bearer(again["access"].as_str().unwrap()))
        )
        .status,
        200
    );
}

#[test]
fn the_cli_works_on_the_data_directory_when_no_server_runs() {
    let (_mock, mut server) = start_with_mock();
    let body = login(&server, "ok:dee.1");
    assert_eq!(server.terminate().code(), Some(0));
    assert!(
        !server.data_dir().join("admin.sock").exists(),
        "the socket is removed on shutdown"
    );
    let id = body["user"]["id"].to_string();
    assert_eq!(json_lines(&server.cli(&["users", "list"])).len(), 1);
    assert_eq!(
        json_lines(&server.cli(&["users", "disable", &id]))[0]["disabled"],
        true
    );
    server.restart();
    get(
        &server.url("/api/weixin/data/"),
        Some(&bearer(body["access"].as_str().unwrap())),
    )
    .assert_error(401, "user_inactive");
}

#[test]
fn backup_while_serving_and_restore_keep_every_user_id_and_token() {
    let (mock, server) = start_with_mock();
    let mut bodies = Vec::new();
    for name in ["eli", "fox", "gus", "hal"] {
        bodies.push(login(&server, &format!("ok:{name}.1")));
    }
    let backup = server.dir.path().join("backup.jsonl");
    let out = server.cli(&["backup", backup.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the backup holds secrets");
    }
    let text = std::fs::read_to_string(&backup).unwrap();
    assert!(text.lines().next().unwrap().contains("wxauth-backup"));
    assert!(text.lines().last().unwrap().contains("\"end\":true"));
    let original_list = json_lines(&server.cli(&["users", "list"]));

    // Restore into a new data directory (no server needed) and serve from it.
    let target = tempfile::tempdir().unwrap();
    let data = target.path().join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wxauth"))
        .args([
            "--config",
            server.config.to_str().unwrap(),
            "restore",
            backup.to_str().unwrap(),
        ])
        .env("WXAUTH_STORAGE__PATH", &data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let second = TestServer::start(
        TestConfig::against(&mock).with_env("WXAUTH_STORAGE__PATH", data.to_str().unwrap()),
    );
    assert_eq!(json_lines(&second.cli(&["users", "list"])), original_list);
    for body in &bodies {
        // Tokens issued before the backup still verify: the signing key came along.
        let reply = get(
            &second.url("/api/weixin/data/"),
            Some(&bearer(body["access"].as_str().unwrap())),
        );
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.json()["user"]["id"], body["user"]["id"]);
    }
    let again = login(&second, "ok:fox.2");
    assert_eq!(
        (
            again["user"]["id"].clone(),
            again["user"]["created"].clone()
        ),
        (bodies[1]["user"]["id"].clone(), json!(false))
    );
    let new = login(&second, "ok:ivy.1");
    assert_eq!(
        new["user"]["id"].as_u64(),
        Some(5),
        "ids continue after the restored ones"
    );

    // Restore never overwrites: the directory is not empty now.
    let out = second.cli(&["restore", backup.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
}

#[test]
fn a_truncated_backup_is_refused_and_leaves_nothing_behind() {
    let (_mock, server) = start_with_mock();
    login(&server, "ok:jo.1");
    let backup = server.dir.path().join("b.jsonl");
    assert!(server
        .cli(&["backup", backup.to_str().unwrap()])
        .status
        .success());
    let text = std::fs::read_to_string(&backup).unwrap();
    let cut: Vec<&str> = text.lines().collect();
    let truncated = server.dir.path().join("cut.jsonl");
    std::fs::write(&truncated, cut[..cut.len() - 1].join("\n")).unwrap();
    let target = server.dir.path().join("restored");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wxauth"))
        .args([
            "--config",
            server.config.to_str().unwrap(),
            "restore",
            truncated.to_str().unwrap(),
        ])
        .env("WXAUTH_STORAGE__PATH", &target)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("incomplete"));
    assert!(
        !target.exists(),
        "a failed restore leaves no half-written directory"
    );
}

#[test]
fn metrics_are_served_on_their_own_listener() {
    let (_mock, server, metrics_addr) = start_with_metrics();
    let body = login(&server, "ok:kim.1");
    get(
        &server.url("/api/weixin/data/"),
        Some(&bearer(body["access"].as_str().unwrap())),
    );
    get(&server.url("/api/weixin/data/"), None);
    // The JWKS route has its own label (404 here: an HMAC key publishes nothing).
    get(&server.url("/.well-known/jwks.json"), None);
    post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "err40029:x" }),
    );
    // The API listener does not serve metrics.
    get(&server.url("/metrics"), None).assert_error(404, "not_found");

    let reply = get(&format!("http://{metrics_addr}/metrics"), None);
    assert_eq!(reply.status, 200);
    assert!(reply
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let text = reply.text;
    for expected in [
        "wxauth_http_requests_total{route=\"/api/weixin/login/\",status=\"200\"} 1",
        "wxauth_http_requests_total{route=\"/api/weixin/login/\",status=\"401\"} 1",
        "wxauth_http_requests_total{route=\"/api/weixin/data/\",status=\"200\"} 1",
        "wxauth_http_requests_total{route=\"/api/weixin/data/\",status=\"401\"} 1",
        "wxauth_http_request_duration_seconds_count{route=\"/api/weixin/login/\"} 2",
        "wxauth_wechat_calls_total{outcome=\"ok\"} 1",
        "wxauth_wechat_calls_total{outcome=\"code_invalid\"} 1",
        "wxauth_wechat_call_duration_seconds_count 2",
        "wxauth_tokens_issued_total{type=\"access\"} 1",
        "wxauth_tokens_issued_total{type=\"refresh\"} 1",
        "wxauth_refresh_reuse_detected_total 0",
        "wxauth_users 1",
        "wxauth_http_requests_total{route=\"/.well-known/jwks.json\",status=\"404\"} 1",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    assert!(text.contains("wxauth_storage_size_bytes "));
    // The access line names the same route.
    let logs = server.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("wxauth::access") && l.contains("route=\"/.well-known/jwks.json\"")),
        "{logs}"
    );
}

#[test]
fn every_request_gets_an_id_and_one_log_line() {
    let (_mock, server) = start_with_mock();
    let reply = get(&server.url("/healthz"), None);
    let id = reply
        .header("x-request-id")
        .expect("x-request-id")
        .to_string();
    let mut req = agent().get(&server.url("/healthz"));
    req = req.header("X-Request-Id", "proxy-given-42");
    let echoed = req.call().unwrap();
    assert_eq!(
        echoed.headers().get("x-request-id").unwrap(),
        "proxy-given-42"
    );
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|l| l.contains(&id))
        .expect("an access line with the id");
    assert!(
        line.contains("status=200") && line.contains("route=\"/healthz\""),
        "{line}"
    );
    assert!(logs.contains("request_id=\"proxy-given-42\""));
}

#[test]
fn a_second_instance_on_the_same_data_directory_exits_with_a_clear_message() {
    let (_mock, mut server) = start_with_mock();
    let out = server.cli(&["serve"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another wxauth process"), "{err}");
    assert!(server.is_running(), "the first instance is unharmed");
    assert_eq!(get(&server.url("/healthz"), None).status, 200);
}

#[test]
fn healthcheck_probes_the_configured_address() {
    let mock = MockWeChat::start();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut server = TestServer::start(
        TestConfig::against(&mock).with_env("WXAUTH_SERVER__BIND", &format!("127.0.0.1:{port}")),
    );
    assert!(server.cli(&["healthcheck"]).status.success());
    server.terminate();
    assert_eq!(server.cli(&["healthcheck"]).status.code(), Some(1));
}

#[test]
fn keygen_makes_keys_the_server_signs_with() {
    for (alg, flag) in [("HS256", "HS256"), ("EdDSA", "EdDSA"), ("ES256", "ES256")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wxauth"))
            .args(["keygen", "--algorithm", flag])
            .output()
            .unwrap();
        assert!(out.status.success());
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("signing.key");
        std::fs::write(&key, &out.stdout).unwrap();
        let mock = MockWeChat::start();
        let server = TestServer::start(
            TestConfig::against(&mock)
                .with_env("WXAUTH_JWT__ALGORITHM", alg)
                .with_env("WXAUTH_JWT__SIGNING_KEY_FILE", key.to_str().unwrap()),
        );
        let body = login(&server, "ok:key.1");
        let (header, _) = jwt_parts(body["access"].as_str().unwrap());
        assert_eq!(header["alg"], alg);
        let reply = get(
            &server.url("/api/weixin/data/"),
            Some(&bearer(body["access"].as_str().unwrap())),
        );
        assert_eq!(reply.status, 200, "{alg}: {}", reply.text);
        // And a token signed with HS256 by anyone is refused when we use another algorithm.
        if alg != "HS256" {
            let forged = forge_hs256_with(
                b"0123456789abcdef0123456789abcdef",
                body["user"]["id"].as_u64().unwrap(),
            );
            get(&server.url("/api/weixin/data/"), Some(&bearer(&forged)))
                .assert_error(401, "token_not_valid");
        }
    }
}

fn forge_hs256_with(key: &[u8], user_id: u64) -> String {
    let claims = json!({ "token_type": "access", "exp": now() + 60, "iat": now(), "jti": "0".repeat(32),
        "user_id": user_id, "sub": user_id.to_string() });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )
    .unwrap()
}

#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let mock = MockWeChat::start();
    let server = TestServer::start(
        TestConfig::against(&mock)
            .with_env("WXAUTH_LIMITS__LOGIN_PER_MINUTE", "2")
            .with_env("WXAUTH_SERVER__TRUSTED_PROXIES", "[\"127.0.0.1\"]"),
    );
    let url = server.url("/api/weixin/login/");
    let login_as = |xff: &str, n: u32| -> u16 {
        let mut response = agent()
            .post(&url)
            .header("Content-Type", "application/json")
            .header("X-Forwarded-For", xff)
            .send(json!({ "code": format!("ok:xff.{xff}.{n}") }).to_string())
            .unwrap();
        let _ = response.body_mut().read_to_string();
        response.status().as_u16()
    };
    assert_eq!(login_as("203.0.113.1", 1), 200);
    assert_eq!(login_as("203.0.113.1", 2), 200);
    assert_eq!(
        login_as("203.0.113.1", 3),
        429,
        "the third login of one client is limited"
    );
    assert_eq!(
        login_as("203.0.113.2", 1),
        200,
        "another client behind the proxy has its own budget"
    );
    // A client-written entry on the left does not buy a new budget.
    assert_eq!(login_as("198.51.100.7, 203.0.113.1", 4), 429);
}

#[test]
fn systemd_hears_ready_once_listening_and_stopping_on_sigterm() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mock = MockWeChat::start();
    let mut server = TestServer::start(
        TestConfig::against(&mock).with_env("NOTIFY_SOCKET", path.to_str().unwrap()),
    );
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("a notification");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "READY=1");
    // READY came after the socket listened: the server answers now.
    assert_eq!(get(&server.url("/healthz"), None).status, 200);
    assert_eq!(server.terminate().code(), Some(0));
    let n = socket.recv(&mut buf).expect("a notification");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "STOPPING=1");
}

#[test]
fn json_logs_are_one_object_per_line_with_the_request_fields() {
    let mock = MockWeChat::start();
    let server =
        TestServer::start(TestConfig::against(&mock).with_env("WXAUTH_LOG__FORMAT", "json"));
    login(&server, "ok:json.1");
    let logs = server.logs();
    let events: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access = events
        .iter()
        .find(|e| e["route"] == "/api/weixin/login/")
        .expect("an access event for the login");
    assert_eq!(access["status"], 200);
    assert!(access["request_id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    assert_eq!(access["level"], "INFO");
}

#[test]
fn admin_commands_need_no_secret_files() {
    let mock = MockWeChat::start();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "file-secret").unwrap();
    // The operator's shell cannot read the service's credential: the commands
    // that only touch the data directory still work.
    let config = format!(
        "[server]\nbind = \"127.0.0.1:0\"\n[wechat]\nappid = \"{APPID}\"\nsecret_file = \"{}\"\napi_base = \"{}\"\n[limits]\nlogin_per_minute = 0\n[metrics]\nbind = \"\"\n",
        secret.path().display(),
        mock.base_url()
    );
    let server = TestServer::start(TestConfig {
        toml: config,
        env: Vec::new(),
    });
    login(&server, "ok:nosecret.1");
    let secret_path = secret.path().to_path_buf();
    drop(secret);
    assert!(!secret_path.exists());
    assert_eq!(json_lines(&server.cli(&["users", "list"])).len(), 1);
    let out = server.cli(&["check-config"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "check-config still checks the secret file"
    );
}

#[test]
fn offline_commands_never_create_a_missing_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wxauth"))
        .args(["users", "list"])
        .env("WXAUTH_STORAGE__PATH", &missing)
        .env("WXAUTH_WECHAT__MOCK", "true")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("check storage.path"));
    assert!(!missing.exists());
}

#[test]
fn restore_into_the_services_empty_directory_keeps_its_owner_and_cleans_up_on_failure() {
    use std::os::unix::fs::MetadataExt;
    let (_mock, server) = start_with_mock();
    login(&server, "ok:own.1");
    let backup = server.dir.path().join("b.jsonl");
    assert!(server
        .cli(&["backup", backup.to_str().unwrap()])
        .status
        .success());

    let target = tempfile::tempdir().unwrap();
    let data = target.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let nobody = 65534;
    if std::os::unix::fs::chown(&data, Some(nobody), Some(nobody)).is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root and must run this test"
        );
        eprintln!("skipped: cannot chown (not root?)");
        return;
    }
    let restore = |file: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_wxauth"))
            .args(["restore", file.to_str().unwrap()])
            .env("WXAUTH_STORAGE__PATH", &data)
            .current_dir(target.path())
            .output()
            .unwrap()
    };
    // A truncated backup: refused, and the directory is left as it was (empty, kept).
    let text = std::fs::read_to_string(&backup).unwrap();
    let truncated = target.path().join("cut.jsonl");
    std::fs::write(
        &truncated,
        text.lines().take(3).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    assert_eq!(restore(&truncated).status.code(), Some(1));
    assert!(data.is_dir() && std::fs::read_dir(&data).unwrap().next().is_none());

    let out = restore(&backup);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&data).unwrap() {
        let entry = entry.unwrap();
        assert_eq!(
            entry.metadata().unwrap().uid(),
            nobody,
            "{} keeps the directory's owner",
            entry.path().display()
        );
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    for restored in ["db", "conf", "jwt_signing_key"] {
        assert!(
            names.iter().any(|n| n == restored),
            "{restored} in {names:?}"
        );
    }
}

#[test]
fn the_announce_file_names_every_listener_and_goes_at_a_clean_exit() {
    let mock = MockWeChat::start();
    let (mut server, token_url, _secret_dir) = start_with_token_endpoint(&mock);
    let file = server.announce_file();
    let announced: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(
        format!("http://{}", announced["api"].as_str().unwrap()),
        server.base
    );
    assert_eq!(announced["metrics"], serde_json::Value::Null, "off");
    let token = announced["access_token"].as_str().expect("its address");
    assert!(token_url.starts_with(&format!("http://{token}/")));
    get(&token_url, None).assert_error(401, "not_authenticated");
    assert_eq!(
        announced["admin"].as_str(),
        server.data_dir().join("admin.sock").to_str(),
        "{announced}"
    );
    assert_eq!(server.terminate().code(), Some(0));
    assert!(!file.exists(), "the announce file outlived the server");
}
