//! GET /api/auth/check: forward-auth, on its own and behind a real nginx
//! (`auth_request`) in front of an upstream that echoes the headers it got.

use crate::common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

// ---- behind nginx ----------------------------------------------------------

/// The nginx binary, or `None` (with a loud message) outside CI when it is missing.
/// Under `CI=true` a missing nginx fails the test: `.ci/run` installs it.
fn nginx_binary() -> Option<PathBuf> {
    let found = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "nginx is not installed, and CI=true: .ci/run must install it (apt-get install nginx)"
        );
        eprintln!(
            "\n!!!!!!!! SKIPPED: nginx is not installed; the forward-auth test behind a \
             real nginx did not run. Install it (apt-get install nginx) or run .ci/run.\n"
        );
    }
    found
}

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

/// nginx as the test user (one process, no daemon) on a loopback port, with its own
/// config and temp files in a temporary directory.
struct Nginx {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Nginx {
    fn start(binary: &Path, conf: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = conf
            .replace("{port}", &port.to_string())
            .replace("{dir}", &dir.path().display().to_string());
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let error_log = dir.path().join("error.log");
        let mut child = Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(&error_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nginx");
        wait_for(Duration::from_secs(20), "nginx to listen", || {
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
                panic!(
                    "nginx exited ({status}): {stderr}\n{}",
                    std::fs::read_to_string(&error_log).unwrap_or_default()
                );
            }
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Nginx { child, port, dir }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // `master_process off`: one process, nothing left behind by a kill.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "nginx error log:\n{}",
                std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
            );
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server block of docs/OPERATIONS.md's nginx snippet, on loopback ports, wrapped
/// in what a stand-alone nginx needs to run unprivileged from a temporary directory.
fn nginx_conf(wxauth: &str, upstream_port: u16) -> String {
    format!(
        r#"
master_process off;
daemon off;
worker_processes 1;
pid {{dir}}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {{dir}}/client_body;
    proxy_temp_path {{dir}}/proxy;
    fastcgi_temp_path {{dir}}/fastcgi;
    uwsgi_temp_path {{dir}}/uwsgi;
    scgi_temp_path {{dir}}/scgi;

    server {{
        listen 127.0.0.1:{{port}};

        location = /_wxauth_check {{
            internal;
            proxy_pass {wxauth}/api/auth/check;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
        }}

        location / {{
            auth_request /_wxauth_check;
            auth_request_set $wxauth_user_id $upstream_http_x_auth_user_id;
            auth_request_set $wxauth_openid $upstream_http_x_auth_openid;
            auth_request_set $wxauth_unionid $upstream_http_x_auth_unionid;
            # Set from the check, replacing whatever the client sent under these names;
            # an empty value (no unionid) sends no header at all.
            proxy_set_header X-Auth-User-Id $wxauth_user_id;
            proxy_set_header X-Auth-Openid $wxauth_openid;
            proxy_set_header X-Auth-Unionid $wxauth_unionid;
            proxy_pass http://127.0.0.1:{upstream_port};
        }}
    }}
}}
"#
    )
}

/// GET (or POST with a body) through nginx with extra headers.
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
    common::collect(Ok(response.expect("request through nginx")))
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

#[test]
fn behind_nginx_only_verified_identities_reach_the_upstream() {
    let Some(binary) = nginx_binary() else {
        return;
    };
    let (_mock, server) = start_with_mock();
    let upstream = EchoUpstream::start();
    let nginx = Nginx::start(&binary, &nginx_conf(&server.base, upstream.port));
    let url = nginx.url("/orders/42?x=1");

    let alice = login(&server, "ok:alice");
    let bob = login(&server, "union:bob.u-bob-1");
    let alice_access = bearer(alice["access"].as_str().unwrap());
    let alice_id = alice["user"]["id"].to_string();
    let forged = [
        ("X-Auth-User-Id", "999"),
        ("x-auth-openid", "o-mallory"),
        ("X-Auth-Unionid", "u-mallory"),
    ];

    // No token: 401 from nginx, with wxauth's challenge; the upstream never sees it.
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
    // client claimed; no unionid header for a user without one.
    for method in ["GET", "POST"] {
        let reply = through(&url, method, Some(&alice_access), &forged);
        assert_eq!(reply.status, 200, "{method}: {}", reply.text);
        assert_eq!(reply.json()["method"], method);
        assert_eq!(seen(&reply, "x-auth-user-id"), vec![alice_id.clone()]);
        assert_eq!(seen(&reply, "x-auth-openid"), vec!["o-alice".to_string()]);
        assert_eq!(seen(&reply, "x-auth-unionid"), Vec::<String>::new());
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
    assert_eq!(seen(&reply, "x-auth-unionid"), vec!["u-bob-1".to_string()]);
    let reached = upstream.requests();
    assert_eq!(reached, 3);

    // A revoked user: 401, and the upstream is not reached.
    json_lines(&server.cli(&["tokens", "revoke", "--user", &alice_id]));
    let reply = through(&url, "GET", Some(&alice_access), &forged);
    assert_eq!(reply.status, 401, "{}", reply.text);
    assert_eq!(reply.header("www-authenticate"), Some(REALM));
    assert_eq!(upstream.requests(), reached);
}
