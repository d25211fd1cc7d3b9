//! Restarts, SIGTERM, kill -9, and what the logs may never show.

use crate::common;

use common::*;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[test]
fn a_restart_keeps_users_ids_and_token_state() {
    let mock = MockWeChat::start();
    let mut server =
        TestServer::start(TestConfig::against(&mock).with_env("WXAUTH_JWT__REUSE_GRACE", "0s"));
    let ann = login(&server, "ok:ann.1");
    let ben = login(&server, "ok:ben.1");
    let rotated_out = ann["refresh"].as_str().unwrap().to_string();
    let rotated = post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": rotated_out }),
    );
    assert_eq!(rotated.status, 200);
    let current = rotated.json()["refresh"].as_str().unwrap().to_string();

    let status = server.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exits 0:\n{}",
        server.logs()
    );
    server.restart();

    let again = login(&server, "ok:ann.2");
    assert_eq!(
        again["user"]["id"], ann["user"]["id"],
        "same openid, same id after restart"
    );
    assert_eq!(again["user"]["created"], false);
    let data = get(
        &server.url("/api/weixin/data/"),
        Some(&bearer(ben["access"].as_str().unwrap())),
    );
    assert_eq!(
        data.status, 200,
        "an access token from before the restart is valid: {}",
        data.text
    );
    assert_eq!(data.json()["user"]["id"], ben["user"]["id"]);
    // The rotated-out token stays dead (with grace 0, presenting it is a reuse that
    // revokes its family).
    let replay = post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": rotated_out }),
    );
    assert_eq!(
        replay.assert_error(401, "token_not_valid")["detail"],
        "Token is blacklisted"
    );
    let after = post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": current }),
    );
    assert_eq!(
        after.assert_error(401, "token_not_valid")["detail"],
        "Token is blacklisted"
    );
    // Ids are never reused: the next user continues the sequence.
    let cat = login(&server, "ok:cat.1");
    assert_eq!(
        cat["user"]["id"].as_u64(),
        Some(ben["user"]["id"].as_u64().unwrap() + 1)
    );
}

#[test]
fn sigterm_drains_a_request_in_flight() {
    let mock = MockWeChat::start();
    let mut server = TestServer::start(TestConfig::against(&mock));
    let url = server.url("/api/weixin/login/");
    std::thread::scope(|s| {
        let slow = s.spawn(|| post_json(&url, &json!({ "code": "slow1500:dee" })));
        wait_for(Duration::from_secs(10), "the login to reach WeChat", || {
            (mock.calls("slow1500:dee") == 1).then_some(())
        });
        let status = server.terminate();
        let reply = slow.join().unwrap();
        assert_eq!(
            reply.status, 200,
            "the in-flight login completes: {}",
            reply.text
        );
        assert_eq!(status.code(), Some(0));
    });
}

/// A burst of logins and refreshes from 8 clients; kill -9 while it runs; restart.
/// Every login or refresh that was answered 200 must be there after the restart:
/// the login's user and access token, and the refresh's rotation (its new refresh
/// token rotates again, the one it replaced is refused).
///
/// kill -9 keeps the kernel's page cache, so this proves the process-crash half of
/// durability; that an answer waits for an fsync begun after its write is proven by
/// the group-commit unit tests in `src/storage/mod.rs`.
#[test]
fn kill_9_during_a_burst_loses_no_answered_change() {
    let mock = MockWeChat::start();
    // Grace 0: a rotated-out token presented after the restart is refused, not
    // answered with a fresh pair.
    let mut server =
        TestServer::start(TestConfig::against(&mock).with_env("WXAUTH_JWT__REUSE_GRACE", "0s"));
    let login_url = server.url("/api/weixin/login/");
    let refresh_url = server.url("/api/token/refresh/");
    let answered_logins = Mutex::new(Vec::new());
    // (the refresh token presented, the answer that rotated it)
    let answered_refreshes = Mutex::new(Vec::<(String, serde_json::Value)>::new());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for client in 0..8 {
            let (login_url, refresh_url) = (&login_url, &refresh_url);
            let (logins, refreshes, stop) = (&answered_logins, &answered_refreshes, &stop);
            s.spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let code = format!("ok:burst-{client}-{n}");
                    let Some(reply) = try_post_json(login_url, &json!({ "code": code })) else {
                        break;
                    };
                    if reply.status != 200 {
                        break;
                    }
                    let body = reply.json();
                    logins.lock().unwrap().push(body.clone());
                    let presented = body["refresh"].as_str().unwrap().to_string();
                    let Some(reply) = try_post_json(refresh_url, &json!({ "refresh": presented }))
                    else {
                        break;
                    };
                    if reply.status == 200 {
                        refreshes.lock().unwrap().push((presented, reply.json()));
                    }
                }
            });
        }
        wait_for(
            Duration::from_secs(60),
            "200 answered logins and 50 answered refreshes",
            || {
                (answered_logins.lock().unwrap().len() >= 200
                    && answered_refreshes.lock().unwrap().len() >= 50)
                    .then_some(())
            },
        );
        server.kill9();
        stop.store(true, Ordering::Relaxed);
    });
    server.restart();

    let logins = answered_logins.into_inner().unwrap();
    let refreshes = answered_refreshes.into_inner().unwrap();
    assert!(
        logins.len() >= 200 && refreshes.len() >= 50,
        "the burst was answered before the kill: {} logins, {} refreshes",
        logins.len(),
        refreshes.len()
    );
    let data_url = server.url("/api/weixin/data/");
    for body in &logins {
        let reply = get(&data_url, Some(&bearer(body["access"].as_str().unwrap())));
        assert_eq!(
            reply.status, 200,
            "an answered login was lost: {}",
            reply.text
        );
        assert_eq!(reply.json()["user"]["id"], body["user"]["id"]);
    }
    for (_, answer) in &refreshes {
        // The rotated-in refresh token was recorded durably: it rotates again.
        let reply = post_json(
            &server.url("/api/token/refresh/"),
            &json!({ "refresh": answer["refresh"] }),
        );
        assert_eq!(
            reply.status, 200,
            "an answered refresh was lost: {}",
            reply.text
        );
        let reply = get(&data_url, Some(&bearer(answer["access"].as_str().unwrap())));
        assert_eq!(
            reply.status, 200,
            "the refresh's access token: {}",
            reply.text
        );
    }
    for (presented, _) in &refreshes {
        // ...and the rotation itself survived: the token it replaced is refused.
        let reply = post_json(
            &server.url("/api/token/refresh/"),
            &json!({ "refresh": presented }),
        );
        reply.assert_error(401, "token_not_valid");
    }
    eprintln!(
        "kill -9 during burst: {} answered logins and {} answered refreshes, all back",
        logins.len(),
        refreshes.len()
    );
}

#[test]
fn logs_never_show_secrets_session_keys_tokens_or_codes() {
    let mock = MockWeChat::start();
    let server = TestServer::start(TestConfig::against(&mock));
    let mut tokens = Vec::new();
    let mut codes = vec![
        "ok:secretive-one".to_string(),
        "err40125:x7".into(),
        "err40029:x8".into(),
        "slow10:x9".into(),
    ];
    for code in &codes {
        let reply = post_json(&server.url("/api/weixin/login/"), &json!({ "code": code }));
        if reply.status == 200 {
            let body = reply.json();
            tokens.push(body["access"].as_str().unwrap().to_string());
            tokens.push(body["refresh"].as_str().unwrap().to_string());
        }
    }
    let refreshed = post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": tokens[1] }),
    )
    .json();
    tokens.push(refreshed["refresh"].as_str().unwrap().to_string());
    post_json(
        &server.url("/api/token/verify/"),
        &json!({ "token": tokens[0] }),
    );
    post_json(
        &server.url("/api/token/blacklist/"),
        &json!({ "refresh": tokens[2] }),
    );
    get(&server.url("/api/weixin/data/"), Some(&bearer(&tokens[0])));
    codes.push("ok:secretive-two".into()); // a code used twice
    login(&server, "ok:secretive-two");
    post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "ok:secretive-two" }),
    );

    let logs = server.logs();
    assert!(logs.contains("listening"), "the logs were captured");
    assert!(
        logs.contains("errcode=40125"),
        "the config error was logged"
    );
    let session_keys = mock.state.lock().unwrap().session_keys.clone();
    assert_eq!(session_keys.len(), 3, "the mock handed out session keys");
    let signing_key = std::fs::read_to_string(server.data_dir().join("jwt_signing_key")).unwrap();
    // Whole values: each is random or specific to this test, so any appearance is a
    // leak. The code and the secret also as they travel in WeChat's query string.
    let mut probes: Vec<String> = vec![SECRET.to_string(), percent_encoded(SECRET)];
    probes.extend(session_keys);
    probes.push(signing_key.trim_end().to_string());
    probes.push(signing_key[..16].to_string());
    for code in &codes {
        probes.push(code.clone());
        probes.push(percent_encoded(code));
    }
    // Tokens: not their first characters (the JWT header, the same in every token)
    // but the parts that differ: the whole signature and payload, and every
    // 16-character piece of either that no other token shares.
    assert!(tokens.len() >= 5, "tokens were issued: {tokens:?}");
    for token in &tokens {
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "a JWT: {token}");
        for part in &parts[1..] {
            probes.push(part.to_string());
            let mut distinct = 0;
            for start in (0..part.len().saturating_sub(16)).step_by(8) {
                let piece = &part[start..start + 16];
                if tokens.iter().filter(|t| t.contains(piece)).count() == 1 {
                    probes.push(piece.to_string());
                    distinct += 1;
                }
            }
            assert!(distinct > 0, "no piece of {part} is this token's own");
        }
    }
    for probe in &probes {
        assert!(
            !logs.contains(probe.as_str()),
            "the logs contain a secret ({probe}):\n{logs}"
        );
    }
}

/// As a query string carries it (every byte but letters and digits escaped).
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
