//! The HTTP surface: paths with and without the slash, JSON for every error,
//! body limits and content types, health and readiness.

use crate::common;

use common::*;
use serde_json::json;

#[test]
fn every_path_works_with_and_without_its_trailing_slash() {
    let (_mock, server) = start_with_mock();
    let body = login(&server, "ok:slash");
    for path in ["/api/weixin/login", "/api/weixin/login/"] {
        let reply = post_json(
            &server.url(path),
            &json!({ "code": format!("ok:slash.{path}") }),
        );
        assert_eq!(reply.status, 200, "{path}: {}", reply.text);
    }
    let access = body["access"].as_str().unwrap();
    for path in ["/api/weixin/data", "/api/weixin/data/"] {
        assert_eq!(
            get(&server.url(path), Some(&bearer(access))).status,
            200,
            "{path}"
        );
    }
    for path in ["/api/token/verify", "/api/token/verify/"] {
        assert_eq!(
            post_json(&server.url(path), &json!({ "token": access })).status,
            200,
            "{path}"
        );
    }
    for path in [
        "/api/token/refresh",
        "/api/token/refresh/",
        "/api/token/blacklist",
        "/api/token/blacklist/",
    ] {
        post_json(&server.url(path), &json!({ "refresh": "x" }))
            .assert_error(401, "token_not_valid");
    }
    for path in ["/healthz", "/healthz/", "/readyz", "/readyz/"] {
        assert_eq!(get(&server.url(path), None).status, 200, "{path}");
    }
}

#[test]
fn health_and_readiness() {
    let (_mock, server) = start_with_mock();
    let reply = get(&server.url("/healthz"), None);
    assert_eq!(
        (reply.status, reply.json()),
        (200, json!({ "status": "ok" }))
    );
    let reply = get(&server.url("/readyz"), None);
    assert_eq!(
        (reply.status, reply.json()["status"].clone()),
        (200, json!("ready"))
    );
}

#[test]
fn unknown_paths_and_methods_are_json_errors() {
    let (_mock, server) = start_with_mock();
    get(&server.url("/nope"), None).assert_error(404, "not_found");
    get(&server.url("/api/weixin/login/extra"), None).assert_error(404, "not_found");
    let reply = get(&server.url("/api/weixin/login/"), None);
    reply.assert_error(405, "method_not_allowed");
    assert_eq!(reply.header("allow"), Some("POST"));
    request("DELETE", &server.url("/api/weixin/data/")).assert_error(405, "method_not_allowed");
    request("PUT", &server.url("/api/token/refresh")).assert_error(405, "method_not_allowed");
    post_json(&server.url("/healthz"), &json!({})).assert_error(405, "method_not_allowed");
}

#[test]
fn bodies_over_16_kib_are_413_and_other_types_415() {
    let (mock, server) = start_with_mock();
    let url = server.url("/api/weixin/login/");
    let big = json!({ "code": "ok:big", "pad": "x".repeat(16 * 1024) });
    post_json(&url, &big).assert_error(413, "payload_too_large");
    for ct in [
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
    ] {
        post_raw(&url, Some(ct), r#"{"code":"ok:typed"}"#)
            .assert_error(415, "unsupported_media_type");
    }
    post_raw(&url, None, r#"{"code":"ok:typed"}"#).assert_error(415, "unsupported_media_type");
    // JSON with a charset parameter is still JSON.
    let reply = post_raw(
        &url,
        Some("application/json; charset=utf-8"),
        r#"{"code":"ok:typed"}"#,
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(mock.calls("ok:big"), 0);
    // A refused body loses nothing: the server still serves.
    assert_eq!(get(&server.url("/healthz"), None).status, 200);
}
