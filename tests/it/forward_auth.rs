//! GET /api/auth/check: forward-auth, on its own and behind real proxies (nginx,
//! Caddy, Traefik) running the configurations under examples/proxy/, in front of an
//! upstream that echoes the headers it got.

use crate::common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::proxy::{self, Kind, Proxy};

const REALM: &str = r#"Bearer realm="api""#;

#[test]
fn a_valid_access_token_answers_200_with_the_user_in_headers() {
    let (_mock, server) = start_with_mock();
    let plain = login(&server, "ok:alice");
    let union = login(&server, "union:bob.u-bob-1");

    for path in ["/api/auth/check", "/api/auth/check/"] {
        let reply = get(
            &server.url(path),
            Some(&bearer(plain["access"].as_str().unwrap())),
        );
        assert_eq!(reply.status, 200, "{path}: {}", reply.text);
        assert_eq!(
            reply.header("x-auth-user-id"),
            Some(plain["user"]["id"].to_string().as_str())
        );
        assert_eq!(reply.header("x-auth-openid"), Some("o-alice"));
        assert_eq!(reply.header("x-auth-unionid"), None, "alice has none");
        assert_eq!(reply.text, "", "no body: the proxy drops it");
    }

    let reply = get(
        &server.url("/api/auth/check"),
        Some(&bearer(union["access"].as_str().unwrap())),
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.header("x-auth-user-id"),
        Some(union["user"]["id"].to_string().as_str())
    );
    assert_eq!(reply.header("x-auth-openid"), Some("o-bob"));
    assert_eq!(reply.header("x-auth-unionid"), Some("u-bob-1"));
}

#[test]
fn anything_else_is_the_401_of_the_data_endpoint_never_a_5xx() {
    let (_mock, server) = start_with_mock();
    let pair = login(&server, "ok:carol");
    let access = pair["access"].as_str().unwrap();
    let refresh = pair["refresh"].as_str().unwrap();
    let expired = forge(
        &server.data_dir(),
        jsonwebtoken::Algorithm::HS256,
        &json!({"token_type": "access", "exp": now() - 10, "iat": now() - 100,
                "jti": "0".repeat(32), "user_id": pair["user"]["id"]}),
    );
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "not_authenticated"),
        (Some("Basic abc".into()), "not_authenticated"),
        (Some("Bearer".into()), "bad_authorization_header"),
        (
            Some(format!("Bearer {access} extra")),
            "bad_authorization_header",
        ),
        (Some("Bearer not.a.jwt".into()), "token_not_valid"),
        (Some(bearer(refresh)), "token_not_valid"),
        (Some(bearer(&expired)), "token_not_valid"),
        (Some(bearer(&format!("{access}x"))), "token_not_valid"),
    ];
    for (authorization, code) in cases {
        for path in ["/api/auth/check", "/api/weixin/data/"] {
            let reply = get(&server.url(path), authorization.as_deref());
            let body = reply.assert_error(401, code);
            assert_eq!(reply.header("www-authenticate"), Some(REALM), "{path}");
            assert_eq!(reply.header("x-auth-user-id"), None, "{path}");
            if code == "token_not_valid" {
                assert!(body["messages"].is_array(), "{path}: {body}");
            }
        }
    }
    // The same answers, word for word, as /api/weixin/data/ for a user that is gone
    // from the check's point of view: disabled, then revoked.
    let user_id = pair["user"]["id"].to_string();
    json_lines(&server.cli(&["users", "disable", &user_id]));
    let reply = get(&server.url("/api/auth/check"), Some(&bearer(access)));
    reply.assert_error(401, "user_inactive");
    json_lines(&server.cli(&["users", "enable", &user_id]));
    assert_eq!(
        get(&server.url("/api/auth/check"), Some(&bearer(access))).status,
        200
    );
    json_lines(&server.cli(&["tokens", "revoke", "--user", &user_id]));
    let reply = get(&server.url("/api/auth/check"), Some(&bearer(access)));
    reply.assert_error(401, "token_not_valid");

    // Only GET: the proxy's subrequest is a GET.
    let reply = request("POST", &server.url("/api/auth/check"));
    reply.assert_error(405, "method_not_allowed");
    assert_eq!(reply.header("allow"), Some("GET"));
}

// ---- behind real proxies --------------------------------------------------

/// An upstream that answers every request with the headers it got, as JSON
/// (`{"method", "path", "headers": {lowercased name: [values]}}`), and counts them.
struct EchoUpstream {
    port: u16,
    requests: Arc<AtomicUsize>,
}

impl EchoUpstream {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counter = counter.clone();
                std::thread::spawn(move || echo(stream, &counter));
            }
        });
        EchoUpstream { port, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn echo(stream: TcpStream, requests: &AtomicUsize) {
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = serde_json::Map::new();
    let mut body_len = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_string());
            if name == "content-length" {
                body_len = value.parse().unwrap_or(0);
            }
            let values = headers.entry(name).or_insert_with(|| json!([]));
            values.as_array_mut().unwrap().push(Value::String(value));
        }
    }
    let mut body = vec![0; body_len];
    let _ = reader.read_exact(&mut body);
    requests.fetch_add(1, Ordering::SeqCst);
    let answer = json!({"method": method, "path": path, "headers": headers}).to_string();
    let _ = writer.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
            answer.len()
        )
        .as_bytes(),
    );
}

/// GET (or POST with a body) through the proxy with extra headers.
fn through(
    url: &str,
    method: &str,
    authorization: Option<&str>,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    if let Some(auth) = authorization {
        req = req.header("Authorization", auth);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let response = if method == "POST" {
        agent().run(
            req.header("Content-Type", "application/json")
                .body(r#"{"hello":"upstream"}"#.to_string())
                .unwrap(),
        )
    } else {
        agent().run(req.body(()).unwrap())
    };
    common::collect(Ok(response.expect("request through the proxy")))
}

/// The values of header `name` the upstream received.
fn seen(reply: &Reply, name: &str) -> Vec<String> {
    let echoed = reply.json();
    echoed["headers"][name]
        .as_array()
        .map(|values| {
            values
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The whole story behind one proxy running its examples/proxy/ file: only verified
/// identities reach the upstream, whatever the client sends.
fn only_verified_identities_reach_the_upstream(kind: Kind) {
    let test = format!("behind {kind:?}: only verified identities reach the upstream");
    let Some(binary) = kind.binary(&test) else {
        return;
    };
    let (_mock, server) = start_with_mock();
    let upstream = EchoUpstream::start();
    let port = proxy::free_port();
    let file = match kind {
        Kind::Nginx => "forward-auth/nginx.conf",
        Kind::Caddy | Kind::CaddyCurrent => "forward-auth/Caddyfile",
        Kind::Traefik => "forward-auth/traefik.yml",
    };
    let addresses = vec![
        (
            "127.0.0.1:8000",
            server.base.trim_start_matches("http://").to_string(),
        ),
        ("127.0.0.1:3000", format!("127.0.0.1:{}", upstream.port)),
        ("listen 443 ssl;", format!("listen 127.0.0.1:{port};")),
        ("api.example.com {", format!("http://127.0.0.1:{port} {{")),
        ("Host(`api.example.com`)", "Host(`127.0.0.1`)".to_string()),
    ];
    // Ready once a request without a token gets wxauth's 401 through it (Traefik
    // listens before its file provider has loaded the routes).
    let probe = format!("http://127.0.0.1:{port}/orders/ready");
    let proxy = Proxy::start(kind, &binary, file, port, &addresses, || {
        get(&probe, None).status == 401
    });
    let url = proxy.url("http", "/orders/42?x=1");

    let alice = login(&server, "ok:alice");
    let bob = login(&server, "union:bob.u-bob-1");
    let alice_access = bearer(alice["access"].as_str().unwrap());
    let alice_id = alice["user"]["id"].to_string();
    let forged = [
        ("X-Auth-User-Id", "999"),
        ("x-auth-openid", "o-mallory"),
        ("X-Auth-Unionid", "u-mallory"),
        ("X_Auth_User_Id", "998"),
        ("x_auth_openid", "o-mallory-2"),
        ("X_Auth_Unionid", "u-mallory-2"),
    ];
    let forged_names = [
        "x-auth-user-id",
        "x-auth-openid",
        "x-auth-unionid",
        "x_auth_user_id",
        "x_auth_openid",
        "x_auth_unionid",
    ];

    // No token: 401 from the proxy, with wxauth's challenge; the upstream never sees it.
    let reply = through(&url, "GET", None, &[]);
    assert_eq!(reply.status, 401, "{}", reply.text);
    assert_eq!(reply.header("www-authenticate"), Some(REALM));
    assert_eq!(upstream.requests(), 0);

    // A client-supplied identity, with no token or a bad one, never reaches it.
    let bad = format!("{}x", alice["access"].as_str().unwrap());
    for authorization in [None, Some(bearer(&bad)), Some("Bearer".to_string())] {
        for method in ["GET", "POST"] {
            let reply = through(&url, method, authorization.as_deref(), &forged);
            assert_eq!(
                reply.status, 401,
                "{method} {authorization:?}: {}",
                reply.text
            );
        }
    }
    assert_eq!(
        upstream.requests(),
        0,
        "a refused request reached the upstream"
    );

    // A valid token: the upstream sees the token's user, and only that, whatever the
    // client claimed under any spelling; no unionid header for a user without one.
    for method in ["GET", "POST"] {
        let reply = through(&url, method, Some(&alice_access), &forged);
        assert_eq!(reply.status, 200, "{method}: {}", reply.text);
        assert_eq!(reply.json()["method"], method);
        let expected = [alice_id.as_str(), "o-alice"];
        for name in forged_names {
            let want: Vec<String> = match name {
                "x-auth-user-id" => vec![expected[0].to_string()],
                "x-auth-openid" => vec![expected[1].to_string()],
                _ => Vec::new(),
            };
            assert_eq!(seen(&reply, name), want, "{method}: {name}: {}", reply.text);
        }
        assert_eq!(seen(&reply, "authorization"), vec![alice_access.clone()]);
    }
    let reply = through(
        &url,
        "GET",
        Some(&bearer(bob["access"].as_str().unwrap())),
        &forged,
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        seen(&reply, "x-auth-user-id"),
        vec![bob["user"]["id"].to_string()]
    );
    assert_eq!(seen(&reply, "x-auth-openid"), vec!["o-bob".to_string()]);
    assert_eq!(seen(&reply, "x-auth-unionid"), vec!["u-bob-1".to_string()]);
    assert_eq!(seen(&reply, "x_auth_unionid"), Vec::<String>::new());
    let reached = upstream.requests();
    assert_eq!(reached, 3);

    // A revoked user: 401, and the upstream is not reached.
    json_lines(&server.cli(&["tokens", "revoke", "--user", &alice_id]));
    let reply = through(&url, "GET", Some(&alice_access), &forged);
    assert_eq!(reply.status, 401, "{}", reply.text);
    assert_eq!(reply.header("www-authenticate"), Some(REALM));
    assert_eq!(upstream.requests(), reached);
}

#[test]
fn behind_nginx_only_verified_identities_reach_the_upstream() {
    only_verified_identities_reach_the_upstream(Kind::Nginx);
}

#[test]
fn behind_caddy_only_verified_identities_reach_the_upstream() {
    only_verified_identities_reach_the_upstream(Kind::Caddy);
}

#[test]
fn behind_the_current_caddy_only_verified_identities_reach_the_upstream() {
    only_verified_identities_reach_the_upstream(Kind::CaddyCurrent);
}

#[test]
fn behind_traefik_only_verified_identities_reach_the_upstream() {
    only_verified_identities_reach_the_upstream(Kind::Traefik);
}
