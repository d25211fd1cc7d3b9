//! Per-client limits beyond login: refreshes per token family and per client address,
//! phone-number requests per user, and the bounded wait for a WeChat call slot on
//! the phone endpoint.

use crate::common;

use common::*;
use serde_json::json;
use std::time::Duration;

fn refresh(server: &TestServer, token: &str, client: &str) -> Reply {
    common::collect(
        agent()
            .post(&server.url("/api/token/refresh/"))
            .header("Content-Type", "application/json")
            .header("X-Forwarded-For", client)
            .send(json!({ "refresh": token }).to_string()),
    )
}

fn assert_limited(reply: &Reply) {
    reply.assert_error(429, "rate_limited");
    let retry_after: u64 = reply
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
}

#[test]
fn refreshes_are_limited_per_token_family() {
    let mock = MockWeChat::start();
    let server = TestServer::start(
        TestConfig::against(&mock).with_env("WXAUTH_LIMITS__REFRESH_PER_FAMILY_PER_MINUTE", "3"),
    );
    let first = login(&server, "ok:fam.1");
    let mut token = first["refresh"].as_str().unwrap().to_string();
    let mut before_rotation = token.clone();
    for _ in 0..2 {
        let reply = refresh(&server, &token, "192.0.2.1");
        assert_eq!(reply.status, 200, "{}", reply.text);
        before_rotation = token;
        token = reply.json()["refresh"].as_str().unwrap().to_string();
    }
    // A retry inside the grace (the token one generation behind) counts against the
    // same family.
    let retry = refresh(&server, &before_rotation, "192.0.2.1");
    assert_eq!(retry.status, 200, "{}", retry.text);
    token = retry.json()["refresh"].as_str().unwrap().to_string();
    // The fourth of the minute, from any address.
    assert_limited(&refresh(&server, &token, "198.51.100.9"));
    // The refused refresh changed nothing: the token is still its family's current one.
    let verify = post_json(
        &server.url("/api/token/verify/"),
        &json!({ "token": token }),
    );
    assert_eq!(verify.status, 200, "{}", verify.text);
    // Another login's family has its own budget.
    let second = login(&server, "ok:fam.2");
    let reply = refresh(&server, second["refresh"].as_str().unwrap(), "192.0.2.1");
    assert_eq!(reply.status, 200, "{}", reply.text);
}

#[test]
fn refreshes_are_limited_per_client_address() {
    let mock = MockWeChat::start();
    let server = TestServer::start(
        TestConfig::against(&mock)
            .with_env("WXAUTH_SERVER__TRUSTED_PROXIES", "[\"127.0.0.1\"]")
            .with_env("WXAUTH_LIMITS__REFRESH_PER_MINUTE", "2"),
    );
    // Counted before the token is looked at: a bad token costs a try too.
    for _ in 0..2 {
        refresh(&server, "not-a-token", "192.0.2.7").assert_error(401, "token_not_valid");
    }
    assert_limited(&refresh(&server, "not-a-token", "192.0.2.7"));
    // An IPv6 client is its /64, as for logins.
    refresh(&server, "x", "2001:db8:5:6::1").assert_error(401, "token_not_valid");
    refresh(&server, "x", "2001:db8:5:6::2").assert_error(401, "token_not_valid");
    assert_limited(&refresh(&server, "x", "2001:db8:5:6:ffff::3"));
    // Other clients are not affected.
    let body = login(&server, "ok:addr");
    let reply = refresh(&server, body["refresh"].as_str().unwrap(), "192.0.2.8");
    assert_eq!(reply.status, 200, "{}", reply.text);
}

#[test]
fn phone_numbers_are_limited_per_user() {
    let mock = MockWeChat::start();
    let server = TestServer::start(
        TestConfig::against(&mock).with_env("WXAUTH_LIMITS__PHONE_PER_USER_PER_MINUTE", "2"),
    );
    let alice = login(&server, "ok:limited-alice")["access"]
        .as_str()
        .unwrap()
        .to_string();
    let bob = login(&server, "ok:limited-bob")["access"]
        .as_str()
        .unwrap()
        .to_string();
    for n in 0..2 {
        let reply = phone(&server, &alice, &format!("ok:alice{n}"));
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    assert_limited(&phone(&server, &alice, "ok:alice2"));
    assert_eq!(
        mock.phone_calls(),
        2,
        "a limited request must not reach WeChat"
    );
    let reply = phone(&server, &bob, "ok:bob");
    assert_eq!(reply.status, 200, "{}", reply.text);
}

#[test]
fn a_phone_request_waits_for_a_wechat_call_slot_only_for_the_queue_timeout() {
    let mock = MockWeChat::start();
    let server = TestServer::start(
        TestConfig::against(&mock)
            .with_env("WXAUTH_WECHAT__MAX_CONCURRENT_CALLS", "1")
            .with_env("WXAUTH_WECHAT__QUEUE_TIMEOUT", "200ms"),
    );
    let alice = login(&server, "ok:slot-alice")["access"]
        .as_str()
        .unwrap()
        .to_string();
    let bob = login(&server, "ok:slot-bob")["access"]
        .as_str()
        .unwrap()
        .to_string();
    // Alice's call holds the only slot until the mock lets it answer.
    let held = std::thread::scope(|scope| {
        let server = &server;
        let alice = &alice;
        let held = scope.spawn(move || phone(server, alice, "hold:alice"));
        wait_for(
            Duration::from_secs(10),
            "alice's call to reach WeChat",
            || (mock.phone_calls() == 1).then_some(()),
        );
        let refused = phone(server, &bob, "ok:bob");
        let answer = (
            refused.status,
            refused.header("retry-after").map(str::to_string),
        );
        mock.release_holds();
        refused.assert_error(503, "upstream_busy");
        assert_eq!(answer.1.as_deref(), Some("1"));
        held.join().unwrap()
    });
    assert_eq!(held.status, 200, "{}", held.text);
    // Bob's call was never made; with the slot free it is.
    assert_eq!(mock.phone_calls(), 1);
    let reply = phone(&server, &bob, "ok:bob");
    assert_eq!(reply.status, 200, "{}", reply.text);
}
