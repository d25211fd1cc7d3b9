//! The token rules of `tokens::check`, through the real binary: one definition of a
//! valid token on every endpoint, exact reuse-grace times, a revoke that covers the
//! same second, claims as strict as PyJWT and RFC 7515, bounded durations.

use crate::common;

use common::*;
use serde_json::{json, Value};
use std::sync::Barrier;
use std::time::{Duration, Instant};

fn server_with(env: &[(&str, &str)]) -> (MockWeChat, TestServer) {
    let mock = MockWeChat::start();
    let mut config = TestConfig::against(&mock);
    for (k, v) in env {
        config = config.with_env(k, v);
    }
    (mock, TestServer::start(config))
}

fn refresh(server: &TestServer, token: &str) -> Reply {
    post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": token }),
    )
}

fn verify(server: &TestServer, token: &str) -> Reply {
    post_json(
        &server.url("/api/token/verify/"),
        &json!({ "token": token }),
    )
}

fn blacklist(server: &TestServer, token: &str) -> Reply {
    post_json(
        &server.url("/api/token/blacklist/"),
        &json!({ "refresh": token }),
    )
}

fn data(server: &TestServer, token: &str) -> Reply {
    get(&server.url("/api/weixin/data/"), Some(&bearer(token)))
}

/// A token-endpoint 401: `token_not_valid` with simplejwt's detail.
fn assert_refused(reply: &Reply, detail: &str) {
    let body = reply.assert_error(401, "token_not_valid");
    assert_eq!(body["detail"], detail, "{}", reply.text);
}

/// The data path's 401 for a token it refuses, with simplejwt's message.
fn assert_access_refused(reply: &Reply, message: &str) {
    let body = reply.assert_error(401, "token_not_valid");
    assert_eq!(body["messages"][0]["message"], message, "{}", reply.text);
}

fn str_of<'a>(body: &'a Value, field: &str) -> &'a str {
    body[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {body}"))
}

/// Signs `header` and `claims` as given with the server's generated HS256 key: the
/// only way to put a `crit` in a header (jsonwebtoken's `Header` has no such field).
fn sign_raw(server: &TestServer, header: &Value, claims: &Value) -> String {
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let message = format!("{}.{}", b64(header), b64(claims));
    let key = std::fs::read(server.data_dir().join("jwt_signing_key")).expect("signing key");
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &jsonwebtoken::EncodingKey::from_secret(&key),
        jsonwebtoken::Algorithm::HS256,
    )
    .expect("sign");
    format!("{message}.{signature}")
}

fn plain_header() -> Value {
    json!({ "alg": "HS256", "typ": "JWT" })
}

/// A real token's claims, changed by `edit`, re-signed with the server's key: the
/// token stays one the server issued (its refresh record exists), so a refusal comes
/// from the rule under test, not from an unknown jti.
fn resign(server: &TestServer, token: &str, edit: impl FnOnce(&mut Value)) -> String {
    let (_, mut claims) = jwt_parts(token);
    edit(&mut claims);
    sign_raw(server, &plain_header(), &claims)
}

#[test]
fn with_grace_zero_a_rotated_out_token_is_refused_at_once() {
    let (_mock, server) = server_with(&[("WXAUTH_JWT__REUSE_GRACE", "0s")]);
    let r1 = str_of(&login(&server, "ok:gus"), "refresh").to_string();
    let first = refresh(&server, &r1);
    assert_eq!(first.status, 200, "{}", first.text);
    let r2 = str_of(&first.json(), "refresh").to_string();

    // At once, within the millisecond or the second of the rotation.
    assert_refused(&refresh(&server, &r1), "Token is blacklisted");
    // A reuse: the whole family is revoked, the token that replaced r1 included.
    assert_refused(&refresh(&server, &r2), "Token is blacklisted");
}

#[test]
fn with_grace_zero_twenty_concurrent_refreshes_of_one_token_give_one_200() {
    let (_mock, server) = server_with(&[("WXAUTH_JWT__REUSE_GRACE", "0s")]);
    let r1 = str_of(&login(&server, "ok:hal"), "refresh").to_string();
    let start = Barrier::new(20);
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    refresh(&server, &r1)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<&Reply> = replies.iter().filter(|r| r.status == 200).collect();
    assert_eq!(
        winners.len(),
        1,
        "statuses: {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for reply in replies.iter().filter(|r| r.status != 200) {
        assert_refused(reply, "Token is blacklisted");
    }
    // The other 19 were reuses: the family is revoked, the winner's new token with it.
    let winner_refresh = str_of(&winners[0].json(), "refresh").to_string();
    assert_refused(&refresh(&server, &winner_refresh), "Token is blacklisted");
}

#[test]
fn a_grace_of_one_second_ends_at_one_second() {
    let (_mock, server) = server_with(&[("WXAUTH_JWT__REUSE_GRACE", "1s")]);
    let r1 = str_of(&login(&server, "ok:ida"), "refresh").to_string();
    let first = refresh(&server, &r1);
    // r1 was rotated out before this answer arrived: the times below are at least
    // what the server counts (and at most that plus one request).
    let rotated = Instant::now();
    assert_eq!(first.status, 200, "{}", first.text);

    std::thread::sleep(Duration::from_millis(300));
    let retry = refresh(&server, &r1);
    assert_eq!(
        retry.status, 200,
        "+0.3 s is inside the grace: {}",
        retry.text
    );

    std::thread::sleep(Duration::from_millis(1500).saturating_sub(rotated.elapsed()));
    assert_refused(&refresh(&server, &r1), "Token is blacklisted");
    // That was a reuse: the newest token of the family is revoked too.
    assert_refused(
        &refresh(&server, str_of(&retry.json(), "refresh")),
        "Token is blacklisted",
    );
}

#[test]
fn a_revoke_refuses_every_token_issued_before_it_even_in_the_same_second() {
    let (_mock, server) = start_with_mock();
    // A revoke bumps the user's token stamp: which second anything happens in plays
    // no part, so the checks below run at once after it.
    let body = login(&server, "ok:jo.1");
    let (access, refresh_token) = (str_of(&body, "access"), str_of(&body, "refresh"));
    let user_id = body["user"]["id"].to_string();
    // A simplejwt-shaped token (no `sub`, no `stamp`): it counts as stamp 0 until a revoke.
    let (_, claims) = jwt_parts(access);
    let legacy = sign_raw(
        &server,
        &plain_header(),
        &json!({ "token_type": "access", "exp": claims["exp"], "iat": claims["iat"],
                 "jti": "0123456789abcdef0123456789abcdef", "user_id": claims["user_id"] }),
    );
    assert_eq!(
        data(&server, &legacy).status,
        200,
        "no stamp claim = stamp 0"
    );

    let out = json_lines(&server.cli(&["tokens", "revoke", "--user", &user_id]));
    assert_eq!(out[0]["families_revoked"], 1);

    assert_access_refused(&data(&server, access), "Token is invalid");
    assert_access_refused(&data(&server, &legacy), "Token is invalid");
    assert_refused(&verify(&server, access), "Token is blacklisted");
    assert_refused(&refresh(&server, refresh_token), "Token is blacklisted");
    assert_refused(&verify(&server, refresh_token), "Token is blacklisted");
    assert_refused(&blacklist(&server, refresh_token), "Token is blacklisted");

    // A login right after gets tokens that work, carrying the new stamp.
    let again = login(&server, "ok:jo.2");
    let (_, claims) = jwt_parts(str_of(&again, "access"));
    assert_eq!(claims["stamp"], 1);
    assert_eq!(data(&server, str_of(&again, "access")).status, 200);
    let refreshed = refresh(&server, str_of(&again, "refresh"));
    assert_eq!(refreshed.status, 200, "{}", refreshed.text);
    assert_eq!(
        data(&server, str_of(&refreshed.json(), "access")).status,
        200
    );
}

#[test]
fn every_endpoint_refuses_the_tokens_of_a_disabled_user_alike() {
    let (_mock, server) = start_with_mock();
    let body = login(&server, "ok:kit");
    let (access, refresh_token) = (str_of(&body, "access"), str_of(&body, "refresh"));
    let id = body["user"]["id"].to_string();
    json_lines(&server.cli(&["users", "disable", &id]));

    data(&server, access).assert_error(401, "user_inactive");
    refresh(&server, refresh_token).assert_error(401, "no_active_account");
    // Logout asks the same check as refresh: the user's state counts there too.
    blacklist(&server, refresh_token).assert_error(401, "no_active_account");
    // Verify answers only token_not_valid (the contract), here "Token is invalid".
    assert_refused(&verify(&server, access), "Token is invalid");
    assert_refused(&verify(&server, refresh_token), "Token is invalid");

    // Nothing was revoked meanwhile: enabled again, everything works.
    json_lines(&server.cli(&["users", "enable", &id]));
    assert_eq!(data(&server, access).status, 200);
    assert_eq!(verify(&server, refresh_token).status, 200);
    let reply = blacklist(&server, refresh_token);
    assert_eq!((reply.status, reply.json()), (200, json!({})));
}

/// A real token changed in one way that PyJWT (or RFC 7515, or our `sub` rule) refuses.
#[derive(Debug, Clone, Copy)]
enum Forgery {
    IatInTheFuture,
    NbfInTheFuture,
    SubNamesAnotherUser,
    SubSpelledDifferently,
    CritHeader,
}

impl Forgery {
    fn apply(self, server: &TestServer, token: &str) -> String {
        let in_a_minute = now() + 60;
        match self {
            Forgery::IatInTheFuture => resign(server, token, |c| c["iat"] = json!(in_a_minute)),
            Forgery::NbfInTheFuture => resign(server, token, |c| c["nbf"] = json!(in_a_minute)),
            Forgery::SubNamesAnotherUser => resign(server, token, |c| c["sub"] = json!("999")),
            Forgery::SubSpelledDifferently => resign(server, token, |c| {
                c["sub"] = json!(format!("0{}", c["user_id"]));
            }),
            Forgery::CritHeader => {
                let (_, claims) = jwt_parts(token);
                let header = json!({ "alg": "HS256", "typ": "JWT", "crit": ["exp"], "exp": 1 });
                sign_raw(server, &header, &claims)
            }
        }
    }
}

#[test]
fn future_iat_or_nbf_a_crit_header_and_a_wrong_sub_are_not_valid() {
    let (_mock, server) = start_with_mock();
    let body = login(&server, "ok:lou");
    let (access, refresh_token) = (str_of(&body, "access"), str_of(&body, "refresh"));

    for forgery in [
        Forgery::IatInTheFuture,
        Forgery::NbfInTheFuture,
        Forgery::SubNamesAnotherUser,
        Forgery::SubSpelledDifferently,
        Forgery::CritHeader,
    ] {
        let forged = forgery.apply(&server, access);
        assert_access_refused(&data(&server, &forged), "Token is invalid");
        assert_refused(&verify(&server, &forged), "Token is invalid");
        let forged = forgery.apply(&server, refresh_token);
        assert_refused(&verify(&server, &forged), "Token is invalid");
        let reply = refresh(&server, &forged);
        assert_eq!(reply.status, 401, "{forgery:?}: {}", reply.text);
        assert_refused(&reply, "Token is invalid");
        assert_refused(&blacklist(&server, &forged), "Token is invalid");
    }

    // The forging is sound: re-signed as they are, or with claims PyJWT accepts
    // (a past nbf, no sub), the same tokens work.
    let sound = resign(&server, access, |c| {
        c["nbf"] = json!(now() - 5);
        c.as_object_mut().unwrap().remove("sub");
    });
    assert_eq!(data(&server, &sound).status, 200);
    let sound = resign(&server, refresh_token, |_| {});
    let reply = refresh(&server, &sound);
    assert_eq!(reply.status, 200, "{}", reply.text);
}

#[test]
fn the_leeway_is_allowed_each_way_and_no_more() {
    let (_mock, server) = server_with(&[("WXAUTH_JWT__LEEWAY", "1m")]);
    let access = str_of(&login(&server, "ok:max"), "access").to_string();
    let cases = [
        ("iat 30 s ahead", json!({ "iat": now() + 30 }), None),
        ("nbf 30 s ahead", json!({ "nbf": now() + 30 }), None),
        ("exp 30 s ago", json!({ "exp": now() - 30 }), None),
        (
            "iat 5 min ahead",
            json!({ "iat": now() + 300 }),
            Some("Token is invalid"),
        ),
        (
            "nbf 5 min ahead",
            json!({ "nbf": now() + 300 }),
            Some("Token is invalid"),
        ),
        (
            "exp 5 min ago",
            json!({ "exp": now() - 300 }),
            Some("Token is expired"),
        ),
    ];
    for (what, changes, refusal) in cases {
        let token = resign(&server, &access, |c| {
            for (k, v) in changes.as_object().unwrap() {
                c[k] = v.clone();
            }
        });
        let reply = data(&server, &token);
        match refusal {
            None => assert_eq!(reply.status, 200, "{what}: {}", reply.text),
            Some(message) => assert_access_refused(&reply, message),
        }
    }
}

#[test]
fn jwt_durations_are_bounded_and_grace_and_leeway_take_milliseconds() {
    let dir = tempfile::tempdir().unwrap();
    let check = |extra: &str| {
        let toml = format!("[wechat]\nmock = true\n[jwt]\n{extra}\n");
        run_with_config(dir.path(), &toml, &[], &["check-config"])
    };
    for (extra, key) in [
        ("access_ttl = \"11y\"", "jwt.access_ttl"),
        ("access_ttl = 9223372036854775807", "jwt.access_ttl"),
        ("refresh_ttl = \"100y\"", "jwt.refresh_ttl"),
        ("reuse_grace = \"11y\"", "jwt.reuse_grace"),
        ("leeway = \"11y\"", "jwt.leeway"),
        ("access_ttl = \"1500ms\"", "jwt.access_ttl"),
        ("reuse_grace = \"1500us\"", "jwt.reuse_grace"),
    ] {
        let out = check(extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra}: {err}");
        let named = format!("config error: {key}: ");
        assert!(
            err.contains(&named),
            "{extra}: the error is about {key}: {err}"
        );
    }
    for extra in [
        "refresh_ttl = \"10y\"\naccess_ttl = \"10y\"",
        "reuse_grace = \"500ms\"\nleeway = \"250ms\"",
        "reuse_grace = \"0s\"",
    ] {
        let out = check(extra);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{extra}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
