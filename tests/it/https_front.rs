//! The HTTPS front configurations of examples/proxy/https/, run by the real proxies
//! (nginx, Caddy) in front of the server: the API and the public keys answer through
//! TLS, and nothing else of the server is exposed.

use crate::common;

use common::proxy::{self, Kind, Proxy};
use common::*;
use serde_json::json;

/// A client that takes the proxy's certificate as it comes: the test makes it on the
/// spot (nginx) or Caddy's own local CA does.
fn tls_agent() -> ureq::Agent {
    agent_with_tls(
        ureq::tls::TlsConfig::builder()
            .disable_verification(true)
            .build(),
    )
}

fn https_get(url: &str, authorization: Option<&str>) -> Reply {
    let mut req = tls_agent().get(url);
    if let Some(auth) = authorization {
        req = req.header("Authorization", auth);
    }
    collect(req.call())
}

fn the_api_and_nothing_else_is_exposed(kind: Kind) {
    let test = format!("the HTTPS front with {kind:?}: the API and nothing else is exposed");
    let Some(binary) = kind.binary(&test) else {
        return;
    };
    let (_mock, server) = start_with_mock();
    let files = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
        .expect("a self-signed certificate");
    let (cert, key) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();

    let port = proxy::free_port();
    let file = match kind {
        Kind::Nginx => "https/nginx.conf",
        _ => "https/Caddyfile",
    };
    let replacements = vec![
        (
            "127.0.0.1:8000",
            server.base.trim_start_matches("http://").to_string(),
        ),
        ("listen 443 ssl;", format!("listen 127.0.0.1:{port} ssl;")),
        (
            "/etc/letsencrypt/live/auth.example.com/fullchain.pem",
            cert.display().to_string(),
        ),
        (
            "/etc/letsencrypt/live/auth.example.com/privkey.pem",
            key.display().to_string(),
        ),
        ("auth.example.com {", format!("https://127.0.0.1:{port} {{")),
    ];
    let base = format!("https://127.0.0.1:{port}");
    let probe = format!("{base}/api/weixin/data/");
    // Ready once wxauth's 401 comes through (Caddy listens before its local CA has
    // issued the certificate: until then the handshake fails).
    let _proxy = Proxy::start(kind, &binary, file, port, &replacements, || {
        tls_agent()
            .get(&probe)
            .call()
            .is_ok_and(|r| r.status() == 401)
    });

    // The API, through TLS.
    let reply = collect(
        tls_agent()
            .post(&format!("{base}/api/weixin/login/"))
            .header("Content-Type", "application/json")
            .send(json!({ "code": "ok:alice" }).to_string()),
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    let access = reply.json()["access"].as_str().unwrap().to_string();
    let reply = https_get(&format!("{base}/api/weixin/data/"), Some(&bearer(&access)));
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["code"], "Authenticated.");
    assert!(reply.header("x-request-id").is_some(), "wxauth answered");
    // The public keys, for back ends elsewhere (this server's HMAC key has none: its
    // own 404 says so).
    let reply = https_get(&format!("{base}/.well-known/jwks.json"), None);
    assert_eq!(reply.status, 404, "{}", reply.text);
    assert_eq!(reply.json()["code"], "symmetric_key");

    // Nothing else: the server's other routes are for local checks only.
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        let reply = https_get(&format!("{base}{path}"), None);
        assert!(
            reply.header("x-request-id").is_none(),
            "{path} reached wxauth through the proxy: {} {}",
            reply.status,
            reply.text
        );
    }
}

#[test]
fn the_https_front_with_nginx_exposes_the_api_and_nothing_else() {
    the_api_and_nothing_else_is_exposed(Kind::Nginx);
}

#[test]
fn the_https_front_with_caddy_exposes_the_api_and_nothing_else() {
    the_api_and_nothing_else_is_exposed(Kind::Caddy);
}

#[test]
fn the_https_front_with_the_current_caddy_exposes_the_api_and_nothing_else() {
    the_api_and_nothing_else_is_exposed(Kind::CaddyCurrent);
}
