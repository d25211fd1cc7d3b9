//! POST /api/weixin/login/ through the real binary against a mock WeChat.

use crate::common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn login_issues_simplejwt_shaped_tokens_and_data_shows_the_user() {
    let (mock, server) = start_with_mock();
    let body = login(&server, "ok:alice");
    assert_eq!(body["code"], "success");
    assert_eq!(body["access_expires_in"], 300);
    assert_eq!(body["refresh_expires_in"], 86400);
    assert_eq!(body["user"]["created"], true);
    let id = body["user"]["id"].as_u64().expect("integer id");

    let access = body["access"].as_str().unwrap();
    let (header, claims) = jwt_parts(access);
    assert_eq!(header["alg"], "HS256");
    assert!(header["kid"].as_str().is_some_and(|k| !k.is_empty()));
    assert_eq!(claims["token_type"], "access");
    assert_eq!(claims["user_id"], id);
    assert_eq!(claims["sub"], id.to_string());
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        300
    );
    let jti = claims["jti"].as_str().unwrap();
    assert!(
        jti.len() == 32 && jti.bytes().all(|b| b.is_ascii_hexdigit()),
        "jti {jti}"
    );
    let (_, refresh_claims) = jwt_parts(body["refresh"].as_str().unwrap());
    assert_eq!(refresh_claims["token_type"], "refresh");
    assert_ne!(refresh_claims["jti"], claims["jti"]);

    let data = get(&server.url("/api/weixin/data/"), Some(&bearer(access)));
    assert_eq!(data.status, 200, "{}", data.text);
    let data = data.json();
    assert_eq!(data["code"], "Authenticated.");
    assert_eq!(data["user"]["id"], id);
    assert_eq!(data["user"]["openid"], "o-alice");
    for field in ["created_at", "last_login_at"] {
        let ts = data["user"][field].as_str().unwrap();
        assert!(
            ts.len() >= 20 && ts.contains('T') && ts.ends_with('Z'),
            "{field}: {ts}"
        );
    }
    // The server called WeChat with our credentials and the code.
    let creds = mock.state.lock().unwrap().credentials.clone();
    assert_eq!(
        creds,
        vec![(
            APPID.to_string(),
            SECRET.to_string(),
            "authorization_code".to_string()
        )]
    );
}

#[test]
fn the_same_openid_is_the_same_user_and_new_openids_get_new_ids() {
    let (_mock, server) = start_with_mock();
    let first = login(&server, "ok:bob.1");
    let again = login(&server, "ok:bob.2");
    let other = login(&server, "ok:carol.1");
    assert_eq!(first["user"]["id"], again["user"]["id"]);
    assert_eq!(again["user"]["created"], false);
    assert_ne!(first["user"]["id"], other["user"]["id"]);
    assert_eq!(other["user"]["created"], true);
}

#[test]
fn a_code_goes_to_wechat_percent_encoded() {
    let (mock, server) = start_with_mock();
    // Characters that would break a query string if pasted raw.
    let code = "ok:a&b=c+d%2F#/?x y";
    let body = login(&server, code);
    assert_eq!(
        mock.calls(code),
        1,
        "the mock must see the code exactly as sent"
    );
    let data = get(
        &server.url("/api/weixin/data/"),
        Some(&bearer(body["access"].as_str().unwrap())),
    )
    .json();
    assert_eq!(
        data["user"]["openid"],
        common::mock_wechat::openid_for("a&b=c+d%2F#/?x y")
    );
}

#[test]
fn malformed_login_requests_are_400_invalid_request() {
    let (mock, server) = start_with_mock();
    let url = server.url("/api/weixin/login/");
    let long = "ok:".to_string() + &"x".repeat(126);
    let cases: Vec<(&str, Option<&str>, String)> = vec![
        ("not JSON", Some("application/json"), "{nope".into()),
        ("a JSON array", Some("application/json"), "[]".into()),
        ("code missing", Some("application/json"), "{}".into()),
        (
            "code null",
            Some("application/json"),
            r#"{"code":null}"#.into(),
        ),
        (
            "code a number",
            Some("application/json"),
            r#"{"code":123}"#.into(),
        ),
        (
            "code empty",
            Some("application/json"),
            r#"{"code":""}"#.into(),
        ),
        (
            "code 129 chars",
            Some("application/json"),
            json!({ "code": long }).to_string(),
        ),
        (
            "code with a tab",
            Some("application/json"),
            r#"{"code":"ok:a\tb"}"#.into(),
        ),
        (
            "code not ASCII",
            Some("application/json"),
            r#"{"code":"ok:你好"}"#.into(),
        ),
        (
            "code with a control char",
            Some("application/json"),
            r#"{"code":"ok:a\u0001"}"#.into(),
        ),
        (
            "appid a number",
            Some("application/json"),
            r#"{"code":"ok:x","appid":5}"#.into(),
        ),
        (
            "empty form",
            Some("application/x-www-form-urlencoded"),
            "".into(),
        ),
        ("no content type, no body", None, "".into()),
    ];
    for (what, ct, body) in cases {
        let reply = post_raw(&url, ct, &body);
        assert_eq!(reply.status, 400, "{what}: {}", reply.text);
        reply.assert_error(400, "invalid_request");
    }
    let ok128 = "ok:".to_string() + &"y".repeat(125);
    assert_eq!(
        post_json(&url, &json!({ "code": ok128 })).status,
        200,
        "128 characters are allowed"
    );
    // Nothing malformed reached WeChat: only the one valid login did.
    assert_eq!(mock.state.lock().unwrap().credentials.len(), 1);
}

#[test]
fn a_form_body_works_like_json() {
    let (_mock, server) = start_with_mock();
    let reply = post_raw(
        &server.url("/api/weixin/login"),
        Some("application/x-www-form-urlencoded"),
        "code=ok%3Aform",
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["code"], "success");
}

#[test]
fn wechat_answers_map_to_the_contract_table() {
    let (_mock, server) = start_with_mock();
    let url = server.url("/api/weixin/login/");
    let cases = [
        ("err40029:x", 401, "code_invalid"),
        ("err40163:x", 401, "code_used"),
        ("err40226:x", 403, "user_blocked"),
        ("err45011:x", 429, "rate_limited"),
        ("err40013:x", 502, "wechat_config_error"),
        ("err40125:x", 502, "wechat_config_error"),
        ("err41002:x", 502, "wechat_config_error"),
        ("err41004:x", 502, "wechat_config_error"),
        ("err99999:x", 502, "upstream_error"),
        ("http500:x", 502, "upstream_error"),
        ("html:x", 502, "upstream_error"),
        ("nosession:x", 502, "upstream_error"),
        ("garbage-without-prefix", 401, "code_invalid"),
    ];
    for (code, status, expected) in cases {
        let reply = post_json(&url, &json!({ "code": code }));
        reply.assert_error(status, expected);
        if status == 429 {
            assert!(
                reply.header("retry-after").is_some(),
                "429 without Retry-After"
            );
        }
    }
    let logs = server.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("ERROR") && l.contains("errcode=40125")),
        "a WeChat config error is logged at ERROR:\n{logs}"
    );
}

#[test]
fn a_spent_code_is_code_used() {
    let (mock, server) = start_with_mock();
    login(&server, "ok:dora");
    let reply = post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "ok:dora" }),
    );
    reply.assert_error(401, "code_used");
    assert_eq!(mock.calls("ok:dora"), 2);
}

#[test]
fn busy_is_retried_then_503_with_retry_after() {
    let (mock, server) = start_with_mock();
    // retries = 2: two busy answers, then success on the third call.
    let body = login(&server, "busy2:erin");
    assert_eq!(body["code"], "success");
    assert_eq!(mock.calls("busy2:erin"), 3);

    let reply = post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "busy9:fred" }),
    );
    reply.assert_error(503, "upstream_busy");
    assert!(reply.header("retry-after").is_some());
    assert_eq!(
        mock.calls("busy9:fred"),
        3,
        "one call plus wechat.retries retries"
    );
}

#[test]
fn a_slow_wechat_is_504_and_never_retried() {
    let mock = MockWeChat::start();
    let server =
        TestServer::start(TestConfig::against(&mock).with_env("WXAUTH_WECHAT__TIMEOUT", "300ms"));
    let started = Instant::now();
    let reply = post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "slow3000:gus" }),
    );
    reply.assert_error(504, "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "the timeout did not cut the call short"
    );
    // The code may have been spent: it must not be sent again. Once the exchange
    // has given up (it logs so, after its last call), the count is final.
    wait_for(Duration::from_secs(10), "the exchange to give up", || {
        server
            .logs()
            .contains("jscode2session failed")
            .then_some(())
    });
    wait_for(Duration::from_secs(10), "the call to reach WeChat", || {
        (mock.calls("slow3000:gus") > 0).then_some(())
    });
    assert_eq!(mock.calls("slow3000:gus"), 1);
}

#[test]
fn wechat_unreachable_is_502_upstream_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mock = MockWeChat::start();
    let server = TestServer::start(TestConfig::against(&mock).with_env(
        "WXAUTH_WECHAT__API_BASE",
        &format!("http://127.0.0.1:{port}"),
    ));
    let reply = post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "ok:hal" }),
    );
    reply.assert_error(502, "upstream_error");
}

#[test]
fn a_double_tap_shares_one_wechat_call_and_one_answer() {
    let (mock, server) = start_with_mock();
    let url = server.url("/api/weixin/login/");
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| post_json(&url, &json!({ "code": "slow400:ivy" }))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let ids: Vec<_> = replies
        .iter()
        .map(|r| r.json()["user"]["id"].clone())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "one user: {ids:?}");
    assert_eq!(
        mock.calls("slow400:ivy"),
        1,
        "one WeChat call for concurrent submissions"
    );
}

#[test]
fn sixty_four_parallel_logins_of_one_new_openid_make_one_user() {
    let (_mock, server) = start_with_mock();
    let url = server.url("/api/weixin/login/");
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let url = url.clone();
                s.spawn(move || post_json(&url, &json!({ "code": format!("ok:jack.{i}") })))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let bodies: Vec<_> = replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{}", r.text);
            r.json()
        })
        .collect();
    let first = &bodies[0]["user"]["id"];
    assert!(
        bodies.iter().all(|b| &b["user"]["id"] == first),
        "all logins are one user"
    );
    let created = bodies
        .iter()
        .filter(|b| b["user"]["created"] == true)
        .count();
    assert_eq!(created, 1, "exactly one login created the user");
    // And the next new user gets the next id: no id was burnt by the race.
    let next = login(&server, "ok:kate");
    assert_eq!(
        next["user"]["id"].as_u64().unwrap(),
        first.as_u64().unwrap() + 1
    );
}

/// Adds a second mini-program, `wxsecondapp02`, to the config.
fn with_second_app(config: TestConfig) -> TestConfig {
    config.with_toml(
        r#"
[[wechat.apps]]
appid = "wxsecondapp02"
secret = "second-secret"
"#,
    )
}

#[test]
fn appid_picks_one_of_several_apps_and_unknown_is_400() {
    let mock = MockWeChat::start();
    let server = TestServer::start(with_second_app(TestConfig::against(&mock)));
    let url = server.url("/api/weixin/login/");
    let a = login(&server, "ok:lee.1");
    let b = post_json(
        &url,
        &json!({ "code": "ok:lee.2", "appid": "wxsecondapp02" }),
    );
    assert_eq!(b.status, 200, "{}", b.text);
    // Same openid, different app: a different user.
    assert_ne!(a["user"]["id"], b.json()["user"]["id"]);
    let creds = mock.state.lock().unwrap().credentials.clone();
    assert_eq!(creds[0].0, APPID);
    assert_eq!(
        (creds[1].0.as_str(), creds[1].1.as_str()),
        ("wxsecondapp02", "second-secret")
    );

    let reply = post_json(
        &url,
        &json!({ "code": "ok:lee.3", "appid": "wxnotconfigured" }),
    );
    reply.assert_error(400, "unknown_app");
    assert_eq!(
        mock.calls("ok:lee.3"),
        0,
        "an unknown app never reaches WeChat"
    );
}

#[test]
fn unionid_links_users_across_apps_when_configured() {
    let mock = MockWeChat::start();
    let config = TestConfig::against(&mock).with_env("WXAUTH_WECHAT__LINK_BY_UNIONID", "true");
    let server = TestServer::start(with_second_app(config));
    let url = server.url("/api/weixin/login/");
    let a = login(&server, "union:mia.U123");
    let b = post_json(
        &url,
        &json!({ "code": "union:mia-other-openid.U123", "appid": "wxsecondapp02" }),
    );
    assert_eq!(b.status, 200, "{}", b.text);
    assert_eq!(
        a["user"]["id"],
        b.json()["user"]["id"],
        "one unionid, one user"
    );

    // Not configured: the same two logins are two users (so the above is the
    // setting's doing, not a default).
    let server = TestServer::start(with_second_app(TestConfig::against(&mock)));
    let a = login(&server, "union:mia.U456");
    let b = post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "union:mia-other-openid.U456", "appid": "wxsecondapp02" }),
    );
    assert_eq!(b.status, 200, "{}", b.text);
    assert_ne!(
        a["user"]["id"],
        b.json()["user"]["id"],
        "not linked by default"
    );
}

#[test]
fn the_login_rate_limit_is_per_client_with_retry_after() {
    let mock = MockWeChat::start();
    let server = TestServer::start(
        TestConfig::against(&mock).with_env("WXAUTH_LIMITS__LOGIN_PER_MINUTE", "3"),
    );
    let url = server.url("/api/weixin/login/");
    for i in 0..3 {
        assert_eq!(
            post_json(&url, &json!({ "code": format!("ok:ned.{i}") })).status,
            200
        );
    }
    // A forged X-Forwarded-For from an untrusted peer changes nothing.
    let reply = collect_with_xff(&url, "203.0.113.9");
    reply.assert_error(429, "rate_limited");
    let retry: u64 = reply
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(
        mock.calls("ok:ned.9"),
        0,
        "a limited login never reaches WeChat"
    );
}

fn collect_with_xff(url: &str, xff: &str) -> Reply {
    let mut response = agent()
        .post(url)
        .header("Content-Type", "application/json")
        .header("X-Forwarded-For", xff)
        .send(r#"{"code":"ok:ned.9"}"#)
        .unwrap();
    Reply {
        status: response.status().as_u16(),
        headers: response
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap().to_string()))
            .collect(),
        text: response.body_mut().read_to_string().unwrap(),
    }
}
