//! The access-token check on GET /api/weixin/data/, and simplejwt's token endpoints.

use crate::common;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

fn server_with(env: &[(&str, &str)]) -> (MockWeChat, TestServer) {
    let mock = MockWeChat::start();
    let mut config = TestConfig::against(&mock);
    for (k, v) in env {
        config = config.with_env(k, v);
    }
    let server = TestServer::start(config);
    (mock, server)
}

fn claims_for(user_id: u64, token_type: &str, exp: i64) -> Value {
    json!({
        "token_type": token_type, "exp": exp, "iat": now() - 10,
        "jti": "0123456789abcdef0123456789abcdef", "user_id": user_id, "sub": user_id.to_string(),
    })
}

/// Asserts simplejwt's 401 for an access token it refuses.
fn assert_token_not_valid(reply: &Reply, message: &str) {
    let body = reply.assert_error(401, "token_not_valid");
    assert_eq!(body["detail"], "Given token not valid for any token type");
    assert_eq!(
        body["messages"],
        json!([{ "token_class": "AccessToken", "token_type": "access", "message": message }])
    );
    assert_eq!(
        reply.header("www-authenticate"),
        Some(r#"Bearer realm="api""#)
    );
}

#[test]
fn data_refuses_like_simplejwt() {
    let (_mock, server) = server_with(&[]);
    let body = login(&server, "ok:alice");
    let user_id = body["user"]["id"].as_u64().unwrap();
    let refresh = body["refresh"].as_str().unwrap();
    let url = server.url("/api/weixin/data/");
    let data = server.data_dir();

    for header in [
        None,
        Some("Token abc"),
        Some("bearer abc"),
        Some("Basic dXNlcjpwYXNz"),
        Some(""),
    ] {
        let reply = get(&url, header);
        let body = reply.assert_error(401, "not_authenticated");
        assert_eq!(
            body["detail"],
            "Authentication credentials were not provided."
        );
        assert_eq!(
            reply.header("www-authenticate"),
            Some(r#"Bearer realm="api""#)
        );
    }
    for header in ["Bearer", "Bearer a b", "Bearer  a  b  c"] {
        let reply = get(&url, Some(header));
        let body = reply.assert_error(401, "bad_authorization_header");
        assert_eq!(
            body["detail"],
            "Authorization header must contain two space-delimited values"
        );
        assert_eq!(
            reply.header("www-authenticate"),
            Some(r#"Bearer realm="api""#)
        );
    }

    let future = now() + 300;
    let cases = [
        ("garbage", "not-a-jwt".to_string(), "Token is invalid"),
        (
            "expired",
            forge(
                &data,
                Algorithm::HS256,
                &claims_for(user_id, "access", now() - 5),
            ),
            "Token is expired",
        ),
        (
            "refresh as access",
            refresh.to_string(),
            "Token has wrong type",
        ),
        (
            "HS512 with our key",
            forge(
                &data,
                Algorithm::HS512,
                &claims_for(user_id, "access", future),
            ),
            "Token is invalid",
        ),
        (
            "alg none",
            alg_none(&claims_for(user_id, "access", future)),
            "Token is invalid",
        ),
        (
            "another key",
            forge_with_key(
                b"0123456789abcdef0123456789abcdef0123",
                &claims_for(user_id, "access", future),
            ),
            "Token is invalid",
        ),
        (
            "unexpected audience",
            forge(
                &data,
                Algorithm::HS256,
                &json!({
            "token_type": "access", "exp": future, "iat": now(), "jti": "0".repeat(32),
            "user_id": user_id, "sub": user_id.to_string(), "aud": "someone-else" }),
            ),
            "Token is invalid",
        ),
        (
            "user_id not an integer",
            forge(
                &data,
                Algorithm::HS256,
                &json!({
            "token_type": "access", "exp": future, "iat": now(), "jti": "0".repeat(32),
            "user_id": "1", "sub": "1" }),
            ),
            "Token is invalid",
        ),
    ];
    for (what, token, message) in cases {
        let reply = get(&url, Some(&bearer(&token)));
        assert_eq!(reply.status, 401, "{what}: {}", reply.text);
        assert_token_not_valid(&reply, message);
    }

    let ghost = forge(&data, Algorithm::HS256, &claims_for(9999, "access", future));
    let reply = get(&url, Some(&bearer(&ghost)));
    let body = reply.assert_error(401, "user_not_found");
    assert_eq!(body["detail"], "User not found");
    assert_eq!(
        reply.header("www-authenticate"),
        Some(r#"Bearer realm="api""#)
    );

    // A token we forged with every claim right is accepted: the forging is sound.
    let good = forge(
        &data,
        Algorithm::HS256,
        &claims_for(user_id, "access", future),
    );
    assert_eq!(get(&url, Some(&bearer(&good))).status, 200);
}

fn alg_none(claims: &Value) -> String {
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.",
        b64(&json!({ "alg": "none", "typ": "JWT" })),
        b64(claims)
    )
}

fn forge_with_key(key: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )
    .unwrap()
}

#[test]
fn issuer_and_audience_are_issued_and_required() {
    let (_mock, server) = server_with(&[
        ("WXAUTH_JWT__ISSUER", "https://auth.example"),
        ("WXAUTH_JWT__AUDIENCE", "miniapp"),
    ]);
    let body = login(&server, "ok:ian");
    let access = body["access"].as_str().unwrap();
    let (_, claims) = jwt_parts(access);
    assert_eq!(
        (claims["iss"].as_str(), claims["aud"].as_str()),
        (Some("https://auth.example"), Some("miniapp"))
    );
    let url = server.url("/api/weixin/data/");
    assert_eq!(get(&url, Some(&bearer(access))).status, 200);
    let user_id = body["user"]["id"].as_u64().unwrap();
    let without = forge(
        &server.data_dir(),
        Algorithm::HS256,
        &claims_for(user_id, "access", now() + 60),
    );
    assert_token_not_valid(&get(&url, Some(&bearer(&without))), "Token is invalid");
}

fn refresh(server: &TestServer, token: &str) -> Reply {
    post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": token }),
    )
}

/// simplejwt's token-endpoint 401: `{"detail": D, "code": "token_not_valid"}`.
fn assert_refused(reply: &Reply, detail: &str) {
    let body = reply.assert_error(401, "token_not_valid");
    assert_eq!(body["detail"], detail, "{}", reply.text);
}

#[test]
fn refresh_rotates_and_a_replayed_token_after_the_grace_revokes_the_family() {
    let (_mock, server) = server_with(&[("WXAUTH_JWT__REUSE_GRACE", "0s")]);
    let body = login(&server, "ok:bea");
    let r1 = body["refresh"].as_str().unwrap().to_string();

    let first = refresh(&server, &r1);
    assert_eq!(first.status, 200, "{}", first.text);
    let first = first.json();
    let r2 = first["refresh"].as_str().unwrap().to_string();
    assert_ne!(r1, r2, "the refresh token rotates");
    let (_, claims) = jwt_parts(first["access"].as_str().unwrap());
    assert_eq!(claims["token_type"], "access");
    assert_eq!(
        get(
            &server.url("/api/weixin/data/"),
            Some(&bearer(first["access"].as_str().unwrap()))
        )
        .status,
        200
    );

    // r1 is now rotated out; with the grace off (0 s), presenting it again at once is
    // theft (no wait: grace times are exact milliseconds, not whole seconds).
    assert_refused(&refresh(&server, &r1), "Token is blacklisted");
    // ...and the whole family is revoked, including the token that replaced it.
    assert_refused(&refresh(&server, &r2), "Token is blacklisted");
    // Another login is another family, unaffected.
    let other = login(&server, "ok:bea.2");
    assert_eq!(
        refresh(&server, other["refresh"].as_str().unwrap()).status,
        200
    );
}

#[test]
fn within_the_grace_period_a_retried_refresh_gets_a_fresh_pair() {
    let (_mock, server) = server_with(&[("WXAUTH_JWT__REUSE_GRACE", "1h")]);
    let body = login(&server, "ok:cal");
    let r1 = body["refresh"].as_str().unwrap().to_string();
    let lost = refresh(&server, &r1).json(); // the answer a flaky network lost
    let retry = refresh(&server, &r1);
    assert_eq!(retry.status, 200, "{}", retry.text);
    let r3 = retry.json()["refresh"].as_str().unwrap().to_string();
    let r2 = lost["refresh"].as_str().unwrap();
    assert!(r3 != r1 && r3 != r2);
    // The newest token is the family's current one and keeps rotating.
    assert_eq!(refresh(&server, &r3).status, 200);
}

#[test]
fn refresh_refuses_what_simplejwt_refuses() {
    let (_mock, server) = server_with(&[]);
    let body = login(&server, "ok:dan");
    let user_id = body["user"]["id"].as_u64().unwrap();
    let data = server.data_dir();
    assert_refused(&refresh(&server, "nonsense"), "Token is invalid");
    assert_refused(
        &refresh(&server, body["access"].as_str().unwrap()),
        "Token has wrong type",
    );
    let expired = forge(
        &data,
        Algorithm::HS256,
        &claims_for(user_id, "refresh", now() - 1),
    );
    assert_refused(&refresh(&server, &expired), "Token is expired");
    // Well signed, but never issued by us: no record of it.
    let unknown = forge(
        &data,
        Algorithm::HS256,
        &claims_for(user_id, "refresh", now() + 60),
    );
    assert_refused(&refresh(&server, &unknown), "Token is invalid");
    let reply = post_json(&server.url("/api/token/refresh/"), &json!({}));
    reply.assert_error(400, "invalid_request");
    assert_eq!(reply.header("www-authenticate"), None);
    let reply = refresh(&server, "nonsense");
    assert_eq!(
        reply.header("www-authenticate"),
        Some(r#"Bearer realm="api""#)
    );
}

#[test]
fn verify_accepts_valid_tokens_and_refuses_the_rest() {
    let (_mock, server) = server_with(&[]);
    let body = login(&server, "ok:eve");
    let url = server.url("/api/token/verify/");
    for token in [
        body["access"].as_str().unwrap(),
        body["refresh"].as_str().unwrap(),
    ] {
        let reply = post_json(&url, &json!({ "token": token }));
        assert_eq!((reply.status, reply.json()), (200, json!({})));
    }
    assert_refused(
        &post_json(&url, &json!({ "token": "x.y.z" })),
        "Token is invalid",
    );
    post_json(&url, &json!({ "refresh": "wrong field" })).assert_error(400, "invalid_request");
    // A rotated-out refresh token does not verify.
    let old = body["refresh"].as_str().unwrap();
    assert_eq!(refresh(&server, old).status, 200);
    assert_refused(
        &post_json(&url, &json!({ "token": old })),
        "Token is blacklisted",
    );
}

#[test]
fn blacklist_logs_out_the_family() {
    let (_mock, server) = server_with(&[]);
    let body = login(&server, "ok:fay");
    let r1 = body["refresh"].as_str().unwrap();
    let url = server.url("/api/token/blacklist/");
    let reply = post_json(&url, &json!({ "refresh": r1 }));
    assert_eq!((reply.status, reply.json()), (200, json!({})));
    assert_refused(&refresh(&server, r1), "Token is blacklisted");
    assert_refused(
        &post_json(&url, &json!({ "refresh": r1 })),
        "Token is blacklisted",
    );
    assert_refused(
        &post_json(&url, &json!({ "refresh": body["access"] })),
        "Token has wrong type",
    );
    post_json(&url, &json!({})).assert_error(400, "invalid_request");
}

#[test]
fn with_rotation_off_refresh_returns_only_an_access_token() {
    let (_mock, server) = server_with(&[("WXAUTH_JWT__ROTATE_REFRESH", "false")]);
    let body = login(&server, "ok:gil");
    let r1 = body["refresh"].as_str().unwrap();
    for _ in 0..2 {
        let reply = refresh(&server, r1);
        assert_eq!(reply.status, 200, "{}", reply.text);
        let body = reply.json();
        assert!(body["access"].is_string());
        assert!(body.get("refresh").is_none(), "{body}");
    }
}

#[test]
fn a_disabled_user_cannot_log_in_refresh_or_use_its_tokens() {
    let (_mock, mut server) = server_with(&[]);
    let body = login(&server, "ok:hana");
    let user_id = body["user"]["id"].as_u64().unwrap();
    assert!(server.terminate().success());

    // Disable the user in the data directory while the server is down (the admin
    // CLI is not there yet), through the same storage code the server uses.
    {
        use wxauth::storage::sled::SledStore;
        use wxauth::storage::{Store, Tree, WriteBatch};
        let store = SledStore::open(&server.data_dir(), 8 << 20).unwrap();
        let mut user = wxauth::users::load(&store, user_id).unwrap().expect("user");
        user.disabled = true;
        let mut batch = WriteBatch::default();
        batch.put(
            Tree::Users,
            wxauth::users::id_key(user_id),
            wxauth::users::encode(&user),
        );
        store.apply(batch).unwrap();
        store.flush().unwrap();
    }
    server.restart();

    let reply = get(
        &server.url("/api/weixin/data/"),
        Some(&bearer(body["access"].as_str().unwrap())),
    );
    let err = reply.assert_error(401, "user_inactive");
    assert_eq!(err["detail"], "User is inactive");
    let reply = refresh(&server, body["refresh"].as_str().unwrap());
    let err = reply.assert_error(401, "no_active_account");
    assert_eq!(
        err["detail"],
        "No active account found for the given token."
    );
    post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "ok:hana.2" }),
    )
    .assert_error(403, "user_disabled");
}
