//! Beyond login: the access-token keeper, the phone number, encrypted
//! data and the session-key check, through the real binary against the mock WeChat.

use crate::common;

use common::mock_wechat::phone_for;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

/// WeChat's official encrypted-data demo.
const DEMO_APPID: &str = "wx4f4bc4dec97d474b";
const DEMO_SESSION_KEY: &str = "tiihtNczf5v6AKRyjwEUhQ==";
const DEMO_IV: &str = "r7BXXKkLb8qrSNn05n0qiA==";
const DEMO_ENCRYPTED: &str = "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS9uT5geRa0W4oTOb1WT7fJlAC+oNPdbB+3hVbJSRgv+4lGOETKUQz6OYStslQ142dNCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyxVLW1zAo6/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn/Hz7saL8xz+W//FRAUid1OksQaQx4CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4PC7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAYB6Y5anaHqZ9J6nKEBvB4DnNLIVWSgARns/8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYVoKlaRv85IfVunYzO0IKXsyl7JCUjCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuyDb/XcxxmK01EpqOyuxINew==";

fn access_of(server: &TestServer, code: &str) -> String {
    login(server, code)["access"].as_str().unwrap().to_string()
}

fn post_authed(server: &TestServer, path: &str, access: &str, body: &serde_json::Value) -> Reply {
    let mut response = agent()
        .post(&server.url(path))
        .header("Content-Type", "application/json")
        .header("Authorization", &bearer(access))
        .send(body.to_string())
        .expect("HTTP request failed");
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    Reply {
        status,
        headers,
        text,
    }
}

fn phone(server: &TestServer, access: &str, code: &str) -> Reply {
    post_authed(
        server,
        "/api/weixin/phone/",
        access,
        &json!({ "code": code }),
    )
}

#[test]
fn the_phone_number_is_fetched_stored_shown_and_never_logged() {
    let (mock, server) = start_with_mock();
    let access = access_of(&server, "ok:alice");
    let reply = phone(&server, &access, "ok:alice");
    assert_eq!(reply.status, 200, "{}", reply.text);
    let number = phone_for("alice");
    assert_eq!(
        reply.json(),
        json!({"code": "success", "phone_number": number, "pure_phone_number": number, "country_code": "86"})
    );
    // WeChat was asked with the code and this user's openid.
    let bodies = mock.state.lock().unwrap().phone_bodies.clone();
    assert_eq!(
        bodies,
        vec![("ok:alice".to_string(), "o-alice".to_string())]
    );

    let data = get(&server.url("/api/weixin/data/"), Some(&bearer(&access))).json();
    assert_eq!(data["user"]["phone_number"], number);
    assert_eq!(data["user"]["country_code"], "86");
    let shown = json_lines(&server.cli(&["users", "show", "1"]));
    assert_eq!(shown[0]["pure_phone_number"], number);

    // countryCode as a string (WeChat's table) reads the same.
    let reply = phone(&server, &access, "str:alice");
    assert_eq!(reply.json()["country_code"], "86", "{}", reply.text);

    assert!(
        !server.logs().contains(&number),
        "the phone number was logged"
    );
    assert!(
        !server.logs().contains("tok-"),
        "an access token was logged"
    );
}

#[test]
fn phone_errors_map_like_logins() {
    let (_mock, server) = start_with_mock();
    let access = access_of(&server, "ok:bob");
    phone(&server, &access, "err40029:x").assert_error(400, "phone_code_invalid");
    phone(&server, &access, "nonsense").assert_error(400, "phone_code_invalid");
    let limited = phone(&server, &access, "err45011:x");
    limited.assert_error(429, "rate_limited");
    assert!(limited.header("retry-after").is_some());
    // -1 is retried (wechat.retries = 2): once busy is fine, three times is 503.
    assert_eq!(phone(&server, &access, "busy1:bob").status, 200);
    phone(&server, &access, "busy3:bob").assert_error(503, "upstream_busy");
    phone(&server, &access, "").assert_error(400, "invalid_request");
    post_authed(&server, "/api/weixin/phone/", &access, &json!({}))
        .assert_error(400, "invalid_request");
    // Authenticated like /data/.
    post_json(
        &server.url("/api/weixin/phone/"),
        &json!({"code": "ok:bob"}),
    )
    .assert_error(401, "not_authenticated");
}

#[test]
fn fifty_concurrent_phone_requests_on_a_cold_start_fetch_one_token() {
    let (mock, server) = start_with_mock();
    // A slow fetch, so that every request arrives while it is under way.
    mock.set_token_delay(300);
    let access = access_of(&server, "ok:crowd");
    let replies: Vec<Reply> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let (server, access) = (&server, &access);
                scope.spawn(move || phone(server, access, &format!("ok:crowd{i}")))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    assert_eq!(mock.token_fetches(), (1, 0));
    assert_eq!(mock.phone_calls(), 50);
}

#[test]
fn a_token_is_refreshed_before_it_expires() {
    let (mock, server) = start_with_mock();
    // 302 s: inside the 5-minute refresh window two seconds after the fetch.
    mock.set_token_expires_in(302);
    let access = access_of(&server, "ok:carol");
    assert_eq!(phone(&server, &access, "ok:carol").status, 200);
    assert_eq!(mock.token_fetches(), (1, 0));
    let started = Instant::now();
    wait_for(Duration::from_secs(15), "a refresh ahead of expiry", || {
        assert_eq!(phone(&server, &access, "ok:carol").status, 200);
        (mock.token_fetches().0 == 2).then_some(())
    });
    // Long before the first token expired (302 s), and not forced.
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(mock.token_fetches(), (2, 0));
}

#[test]
fn a_restart_does_not_refetch_the_token() {
    let (mock, mut server) = start_with_mock();
    let access = access_of(&server, "ok:dave");
    assert_eq!(phone(&server, &access, "ok:dave").status, 200);
    assert_eq!(mock.token_fetches(), (1, 0));
    assert!(server.terminate().success());
    server.restart();
    assert_eq!(phone(&server, &access, "ok:dave").status, 200);
    assert_eq!(
        mock.token_fetches(),
        (1, 0),
        "the stored token was fetched again"
    );
    // After a kill -9 too: the token was durable when the phone request answered.
    server.kill9();
    server.restart();
    assert_eq!(phone(&server, &access, "ok:dave").status, 200);
    assert_eq!(mock.token_fetches(), (1, 0));
}

#[test]
fn a_refused_token_gets_one_forced_refresh_and_one_retry() {
    let (mock, server) = start_with_mock();
    let access = access_of(&server, "ok:erin");
    assert_eq!(phone(&server, &access, "ok:erin").status, 200);
    mock.revoke_tokens();
    let reply = phone(&server, &access, "ok:erin2");
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(mock.token_fetches(), (2, 1));
    // The refused call, then the retry with the new token.
    assert_eq!(mock.state.lock().unwrap().phone_calls["ok:erin2"], 2);
    // The new token is kept: no further fetch.
    assert_eq!(phone(&server, &access, "ok:erin3").status, 200);
    assert_eq!(mock.token_fetches(), (2, 1));
    let status = json_lines(&server.cli(&["wechat", "token"]));
    assert_eq!(status[0]["forced_refreshes_last_24h"], 1);
}

#[test]
fn forced_refreshes_are_at_least_30_seconds_apart() {
    let (mock, server) = start_with_mock();
    let access = access_of(&server, "ok:frank");
    mock.revoke_tokens();
    assert_eq!(phone(&server, &access, "ok:frank").status, 200);
    assert_eq!(mock.token_fetches(), (1, 0), "a cold fetch needs no force");
    mock.revoke_tokens();
    assert_eq!(phone(&server, &access, "ok:frank").status, 200);
    assert_eq!(mock.token_fetches(), (2, 1));
    // Refused again at once: no second forced refresh within 30 s.
    mock.revoke_tokens();
    let refused = phone(&server, &access, "ok:frank");
    refused.assert_error(503, "access_token_unavailable");
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(mock.token_fetches(), (2, 1));
}

#[test]
fn login_works_while_stable_token_fails() {
    let (mock, server) = start_with_mock();
    mock.fail_stable_token(Some(40013));
    let access = access_of(&server, "ok:gina");
    phone(&server, &access, "ok:gina").assert_error(502, "wechat_config_error");
    // Login still works, and the next try of the token is a new fetch.
    let again = access_of(&server, "ok:gina2");
    mock.fail_stable_token(Some(-1));
    // A failure is held for a second (waiting requests share it), then fetched anew.
    wait_for(Duration::from_secs(10), "stable_token's -1 to show", || {
        let reply = phone(&server, &again, "ok:gina");
        (reply.status == 503).then(|| reply.assert_error(503, "upstream_busy"))
    });
    login(&server, "ok:gina3");
    mock.fail_stable_token(None);
    wait_for(
        Duration::from_secs(10),
        "the token once stable_token works",
        || (phone(&server, &again, "ok:gina").status == 200).then_some(()),
    );
}

#[test]
fn the_demo_vector_decrypts_and_tampering_is_refused() {
    let mock = MockWeChat::start();
    let server =
        TestServer::start(TestConfig::against(&mock).with_env("WXAUTH_WECHAT__APPID", DEMO_APPID));
    let access = access_of(&server, &format!("key:band.{DEMO_SESSION_KEY}"));
    let decrypt = |data: &str, iv: &str| {
        post_authed(
            &server,
            "/api/weixin/decrypt/",
            &access,
            &json!({ "encryptedData": data, "iv": iv }),
        )
    };
    let reply = decrypt(DEMO_ENCRYPTED, DEMO_IV);
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["code"], "success");
    assert_eq!(body["data"]["nickName"], "Band");
    assert_eq!(
        body["data"]["watermark"],
        json!({"timestamp": 1477314187, "appid": DEMO_APPID})
    );

    // One bit flipped in the first block.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut raw = b64.decode(DEMO_ENCRYPTED).unwrap();
    raw[5] ^= 0x80;
    decrypt(&b64.encode(&raw), DEMO_IV).assert_error(400, "decrypt_failed");
    // Padding broken: the last block changed.
    let last = raw.len() - 1;
    raw[5] ^= 0x80;
    raw[last] ^= 0x55;
    decrypt(&b64.encode(&raw), DEMO_IV).assert_error(400, "decrypt_failed");
    decrypt("not base64!", DEMO_IV).assert_error(400, "invalid_request");
    decrypt(DEMO_ENCRYPTED, "AAAA").assert_error(400, "invalid_request");
    assert!(!server.logs().contains("Band"), "decrypted data was logged");
}

#[test]
fn a_watermark_for_another_app_is_refused() {
    let (_mock, server) = start_with_mock();
    // The user belongs to wxtestapp0001; the demo data is watermarked for the demo app.
    let access = access_of(&server, &format!("key:band.{DEMO_SESSION_KEY}"));
    post_authed(
        &server,
        "/api/weixin/decrypt/",
        &access,
        &json!({ "encryptedData": DEMO_ENCRYPTED, "iv": DEMO_IV }),
    )
    .assert_error(400, "watermark_mismatch");
}

#[test]
fn the_access_token_endpoint_is_off_by_default_then_loopback_and_bearer_only() {
    let (mock, server) = start_with_mock();
    // Off: not on the API listener, and no other listener.
    get(&server.url("/api/weixin/access_token/"), None).assert_error(404, "not_found");
    assert_eq!(server.token_endpoint_addr(), None);
    drop(server);

    let (server, url, dir) = start_with_token_endpoint(&mock);
    get(&url, None).assert_error(401, "not_authenticated");
    get(&url, Some("Bearer wrong-secret")).assert_error(401, "not_authenticated");
    let reply = get(&url, Some("Bearer a-long-enough-bearer-secret"));
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    assert!(body["access_token"].as_str().unwrap().starts_with("tok-1-"));
    let expires_in = body["expires_in"].as_i64().unwrap();
    assert!((7000..=7200).contains(&expires_in), "{expires_in}");
    // The same token again: the keeper holds it.
    let again = get(&url, Some("Bearer a-long-enough-bearer-secret")).json();
    assert_eq!(again["access_token"], body["access_token"]);
    assert_eq!(mock.token_fetches(), (1, 0));
    // Still not on the API listener.
    get(&server.url("/api/weixin/access_token/"), None).assert_error(404, "not_found");
    assert!(!server.logs().contains("tok-1-"), "the token was logged");

    // A non-loopback address or a missing secret stops the start.
    let refused = run_with_config(
        dir.path(),
        VALID_CONFIG,
        &[("WXAUTH_WECHAT__TOKEN_ENDPOINT_BIND", "0.0.0.0:9470")],
        &["check-config"],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("wechat.token_endpoint_bind"));
    let refused = run_with_config(
        dir.path(),
        VALID_CONFIG,
        &[("WXAUTH_WECHAT__TOKEN_ENDPOINT_BIND", "127.0.0.1:9470")],
        &["check-config"],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("wechat.token_endpoint_secret_file"));
}

#[test]
fn token_fetches_are_counted_by_outcome() {
    let mock = MockWeChat::start();
    let server = TestServer::start(
        TestConfig::against(&mock).with_env("WXAUTH_METRICS__BIND", "127.0.0.1:0"),
    );
    let addr = server.metrics_addr().expect("the metrics listener");
    let access = access_of(&server, "ok:hank");
    assert_eq!(phone(&server, &access, "ok:hank").status, 200);
    mock.revoke_tokens();
    assert_eq!(phone(&server, &access, "ok:hank").status, 200);
    let text = get(&format!("http://{addr}/metrics"), None).text;
    assert!(
        text.contains("wxauth_wechat_token_fetches_total{outcome=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("wxauth_wechat_token_fetches_total{outcome=\"forced_ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("wxauth_wechat_api_calls_total{outcome=\"token_invalid\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("wxauth_wechat_api_calls_total{outcome=\"ok\"} 2"),
        "{text}"
    );
}

#[test]
fn wechat_token_shows_expiry_and_age_but_never_the_token() {
    let (mock, mut server) = start_with_mock();
    let access = access_of(&server, "ok:ivan");
    assert_eq!(phone(&server, &access, "ok:ivan").status, 200);
    let token = mock.state.lock().unwrap().valid_tokens[0].clone();
    let check = |out: std::process::Output| {
        assert!(!String::from_utf8_lossy(&out.stdout).contains(&token));
        let lines = json_lines(&out);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["appid"], APPID);
        assert_eq!(lines[0]["present"], true);
        let expires_in = lines[0]["expires_in_secs"].as_i64().unwrap();
        assert!((7000..=7200).contains(&expires_in), "{expires_in}");
        let age = lines[0]["age_secs"].as_i64().unwrap();
        assert!((0..=120).contains(&age), "{age}");
        assert!(lines[0]["expires_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(lines[0]["forced_refreshes_last_24h"], 0);
    };
    // Through the running server, and straight from the data directory.
    check(server.cli(&["wechat", "token"]));
    assert!(server.terminate().success());
    check(server.cli(&["wechat", "token", "--appid", APPID]));
    let other = json_lines(&server.cli(&["wechat", "token", "--appid", "wxother"]));
    assert_eq!(other[0]["present"], false);
}

#[test]
fn check_session_reports_whether_wechat_holds_the_session_key() {
    let (mock, mut server) = start_with_mock();
    login(&server, "ok:judy");
    let held = json_lines(&server.cli(&["users", "check-session", "1"]));
    assert_eq!(
        held[0],
        json!({"user_id": 1, "appid": APPID, "session_key_valid": true})
    );
    // WeChat now holds another key for this user (a login elsewhere).
    mock.state
        .lock()
        .unwrap()
        .keys_by_openid
        .insert("o-judy".into(), "AAAAAAAAAAAAAAAAAAAAAA==".into());
    let stale = json_lines(&server.cli(&["users", "check-session", "1"]));
    assert_eq!(stale[0]["session_key_valid"], false);
    assert_eq!(mock.state.lock().unwrap().checksession_calls, 2);
    let missing = server.cli(&["users", "check-session", "99"]);
    assert_eq!(missing.status.code(), Some(1));
    // Without the server: refused, not a token fetch of its own.
    assert!(server.terminate().success());
    let refused = server.cli(&["users", "check-session", "1"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("running server"));
    assert_eq!(mock.token_fetches(), (1, 0));
}
