//! The token check's cache of decoded users: every write of the user
//! registry shows from the very next request, however warm the cache is.

use crate::common;

use common::mock_wechat::phone_for;
use common::*;
use serde_json::json;
use std::time::Duration;

/// Data requests enough to have the user cached (the first one fills the cache).
fn warm(server: &TestServer, access: &str) {
    for _ in 0..5 {
        let reply = get(&server.url("/api/weixin/data/"), Some(&bearer(access)));
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
}

fn data(server: &TestServer, access: &str) -> Reply {
    get(&server.url("/api/weixin/data/"), Some(&bearer(access)))
}

#[test]
fn disable_enable_and_revoke_through_the_cli_take_effect_at_the_next_request() {
    let (_mock, server) = start_with_mock();
    let body = login(&server, "ok:ann.1");
    let id = body["user"]["id"].to_string();
    let access = body["access"].as_str().unwrap();
    warm(&server, access);

    let out = json_lines(&server.cli(&["users", "disable", &id]));
    assert_eq!(out[0]["disabled"], true);
    data(&server, access).assert_error(401, "user_inactive");
    // verify reads the same cache (and, like simplejwt, calls the token invalid).
    post_json(
        &server.url("/api/token/verify/"),
        &json!({ "token": access }),
    )
    .assert_error(401, "token_not_valid");

    let out = json_lines(&server.cli(&["users", "enable", &id]));
    assert_eq!(out[0]["disabled"], false);
    assert_eq!(data(&server, access).status, 200);
    warm(&server, access);

    let out = json_lines(&server.cli(&["tokens", "revoke", "--user", &id]));
    assert_eq!(out[0]["families_revoked"], 1);
    data(&server, access).assert_error(401, "token_not_valid");
    post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": body["refresh"] }),
    )
    .assert_error(401, "token_not_valid");

    // A token issued after the revoke carries the new stamp: accepted, and cached.
    let again = login(&server, "ok:ann.2");
    let fresh = again["access"].as_str().unwrap();
    warm(&server, fresh);
    data(&server, access).assert_error(401, "token_not_valid");
}

#[test]
fn a_phone_number_and_a_new_login_show_at_the_next_request() {
    let (_mock, server) = start_with_mock();
    let body = login(&server, "ok:bea.1");
    let access = body["access"].as_str().unwrap();
    warm(&server, access);
    assert!(data(&server, access).json()["user"]
        .get("phone_number")
        .is_none());

    let mut response = agent()
        .post(&server.url("/api/weixin/phone/"))
        .header("Content-Type", "application/json")
        .header("Authorization", &bearer(access))
        .send(json!({ "code": "ok:bea" }).to_string())
        .expect("HTTP request failed");
    assert_eq!(response.status().as_u16(), 200);
    let _ = response.body_mut().read_to_string();
    assert_eq!(
        data(&server, access).json()["user"]["phone_number"],
        phone_for("bea")
    );

    // A login records its time (whole seconds): wait for the next one.
    let before = data(&server, access).json()["user"]["last_login_at"].clone();
    let started = now();
    wait_for(Duration::from_secs(3), "the next second", || {
        (now() > started).then_some(())
    });
    login(&server, "ok:bea.2");
    let after = data(&server, access).json()["user"]["last_login_at"].clone();
    assert_ne!(before, after, "the cached user still shows the old login");
}
