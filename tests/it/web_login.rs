//! Web login through the real binary: a browser's ticket, the mini-program's scan,
//! confirm and deny, the long poll, and every refusal (docs/API.md, "Web login").
//! The tests that reach the storage (the confirm's new family, its refresh and log out,
//! a disabled user) run on each backend, sled and PostgreSQL.

use crate::common::backend::{on_both, Backend};
use crate::common::*;
use base64::Engine;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const ENABLED: &str = "\n[web_login]\nenabled = true\npage = \"pages/web-login/index\"\nenv_version = \"trial\"\ncheck_path = false\nwidth = 300\n";

fn start(extra: &str) -> (MockWeChat, TestServer) {
    start_on(&Backend::Sled, extra)
}

fn start_on(backend: &Backend, extra: &str) -> (MockWeChat, TestServer) {
    let mock = MockWeChat::start();
    let config = TestConfig::against(&mock).with_toml(extra);
    let server = TestServer::start(backend.configure(config));
    (mock, server)
}

fn create(server: &TestServer) -> Reply {
    post_raw(&server.url("/api/weixin/web-login/"), None, "")
}

/// A new ticket: (ticket, poll secret, the whole answer).
fn ticket(server: &TestServer) -> (String, String, Value) {
    let reply = create(server);
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    (
        body["ticket"].as_str().unwrap().to_string(),
        body["poll_secret"].as_str().unwrap().to_string(),
        body,
    )
}

fn poll(server: &TestServer, ticket: &str, secret: &str, wait: u64) -> Reply {
    get(
        &server.url(&format!("/api/weixin/web-login/{ticket}/?wait={wait}")),
        Some(&bearer(secret)),
    )
}

fn status(server: &TestServer, ticket: &str, secret: &str) -> String {
    let reply = poll(server, ticket, secret, 0);
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()["status"].as_str().unwrap().to_string()
}

/// The mini-program's call (`scan`, `confirm`, `deny`) with an access token.
fn phone(server: &TestServer, ticket: &str, action: &str, access: &str) -> Reply {
    collect(
        agent()
            .post(&server.url(&format!("/api/weixin/web-login/{ticket}/{action}")))
            .header("Authorization", &bearer(access))
            .send_empty(),
    )
}

fn access_of(login: &Value) -> String {
    login["access"].as_str().unwrap().to_string()
}

#[test]
fn a_scan_and_a_confirm_log_the_browser_in_as_a_new_session_of_the_same_user() {
    on_both(
        "a_scan_and_a_confirm_log_the_browser_in_as_a_new_session_of_the_same_user",
        scan_and_confirm,
    );
}

fn scan_and_confirm(backend: &Backend) {
    let (mock, server) = start_on(backend, ENABLED);
    let phone_login = login(&server, "ok:alice");
    let user_id = phone_login["user"]["id"].as_u64().unwrap();
    let access = access_of(&phone_login);

    let (ticket, secret, body) = ticket(&server);
    assert_eq!(ticket.len(), 32, "{body}");
    assert_ne!(secret, ticket);
    assert_eq!(body["expires_in"], 120);
    // The code is WeChat's bytes, base64 in a data URL, never re-encoded.
    let qr = body["qr"].as_str().unwrap();
    let encoded = qr.strip_prefix("data:image/jpeg;base64,").expect(qr);
    let image = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    let expected = format!(
        "scene={ticket};page=pages/web-login/index;env_version=trial;check_path=false;width=300"
    );
    assert!(image.starts_with(&[0xff, 0xd8, 0xff, 0xe0]));
    assert_eq!(&image[4..image.len() - 5], expected.as_bytes());
    // The poll secret is never in what WeChat (and so the code) is given.
    let asked = mock.wxacode_bodies();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0]["scene"], ticket.as_str());
    assert!(!asked[0].to_string().contains(&secret));

    assert_eq!(status(&server, &ticket, &secret), "pending");
    // A long poll answers when the state changes.
    let waiting = {
        let (url, secret) = (
            server.url(&format!("/api/weixin/web-login/{ticket}/?wait=25")),
            secret.clone(),
        );
        std::thread::spawn(move || get(&url, Some(&bearer(&secret))))
    };
    let scanned = phone(&server, &ticket, "scan", &access);
    assert_eq!(
        (scanned.status, scanned.json()),
        (200, json!({"status": "scanned"}))
    );
    let woken = waiting.join().unwrap();
    assert_eq!(woken.json(), json!({"status": "scanned"}));
    // Scanning again (the same user) changes nothing.
    assert_eq!(phone(&server, &ticket, "scan", &access).status, 200);

    let confirmed = phone(&server, &ticket, "confirm", &access);
    assert_eq!(
        (confirmed.status, confirmed.json()),
        (200, json!({"status": "confirmed"}))
    );
    // Confirmed at most once.
    phone(&server, &ticket, "confirm", &access).assert_error(409, "ticket_closed");
    phone(&server, &ticket, "deny", &access).assert_error(409, "ticket_closed");

    // The tokens go once, to the holder of the poll secret.
    poll(&server, &ticket, "not-the-secret", 0).assert_error(401, "poll_secret_invalid");
    let answer = poll(&server, &ticket, &secret, 25).json();
    assert_eq!(answer["status"], "confirmed");
    assert_eq!(answer["user"]["id"], user_id);
    assert_eq!(answer["access_expires_in"], 300);
    let web_access = answer["access"].as_str().unwrap();
    let web_refresh = answer["refresh"].as_str().unwrap();
    for _ in 0..2 {
        assert_eq!(
            poll(&server, &ticket, &secret, 0).json(),
            json!({"status": "expired"})
        );
    }

    // The web session is the same user, a new family of its own.
    let data = get(&server.url("/api/weixin/data/"), Some(&bearer(web_access)));
    assert_eq!(data.status, 200, "{}", data.text);
    assert_eq!(data.json()["user"]["id"], user_id);
    let (_, web_claims) = jwt_parts(web_refresh);
    let (_, phone_claims) = jwt_parts(phone_login["refresh"].as_str().unwrap());
    assert_ne!(web_claims["fam"], phone_claims["fam"]);
    let sessions = json_lines(&server.cli(&["users", "sessions", &user_id.to_string()]));
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    // ...among the user's sessions as the phone sees them, beside the phone's own.
    let listed = get(&server.url("/api/weixin/sessions/"), Some(&bearer(&access)));
    assert_eq!(listed.status, 200, "{}", listed.text);
    let listed = listed.json()["sessions"].as_array().unwrap().clone();
    let ids: Vec<&str> = listed.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2, "{listed:?}");
    assert!(
        ids.contains(&web_claims["fam"].as_str().unwrap()),
        "{listed:?}"
    );
    assert!(
        ids.contains(&phone_claims["fam"].as_str().unwrap()),
        "{listed:?}"
    );

    // Durable before it was handed out: a kill -9 and a restart keep the session.
    let mut server = server;
    server.kill9();
    server.restart();
    let rotated = post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": web_refresh }),
    );
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    let web_refresh = rotated.json()["refresh"].as_str().unwrap().to_string();
    let web_refresh = web_refresh.as_str();

    // Logging the web session out leaves the phone logged in.
    let out = post_json(
        &server.url("/api/token/blacklist/"),
        &json!({ "refresh": web_refresh }),
    );
    assert_eq!(out.status, 200, "{}", out.text);
    let refreshed = post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": phone_login["refresh"] }),
    );
    assert_eq!(refreshed.status, 200, "{}", refreshed.text);

    // Tickets, poll secrets and tokens never reach the logs.
    let logs = server.logs();
    for secret_text in [ticket.as_str(), secret.as_str(), web_access, web_refresh] {
        assert!(!logs.contains(secret_text), "a secret in the logs");
    }
}

#[test]
fn a_deny_settles_the_ticket_and_every_refusal_is_clear() {
    on_both(
        "a_deny_settles_the_ticket_and_every_refusal_is_clear",
        deny_and_refusals,
    );
}

fn deny_and_refusals(backend: &Backend) {
    let (_mock, server) = start_on(backend, ENABLED);
    let alice = access_of(&login(&server, "ok:alice2"));
    let bob = access_of(&login(&server, "ok:bob2"));
    let (ticket, secret, _) = ticket(&server);

    // The poll: the secret as bearer, a well-formed ticket, a bounded wait.
    let url = server.url(&format!("/api/weixin/web-login/{ticket}/"));
    get(&url, None).assert_error(401, "poll_secret_invalid");
    get(&url, Some("Basic abc")).assert_error(401, "poll_secret_invalid");
    poll(&server, &ticket, &secret, 26).assert_error(400, "invalid_request");
    get(&format!("{url}?wait=soon"), Some(&bearer(&secret))).assert_error(400, "invalid_request");
    poll(&server, "NOT-A-TICKET", &secret, 0).assert_error(400, "invalid_request");
    // A ticket never issued (or forgotten by a restart) is expired, whatever the secret.
    let unknown = "0123456789abcdef0123456789abcdef";
    assert_eq!(status(&server, unknown, "x"), "expired");
    phone(&server, unknown, "scan", &alice).assert_error(410, "ticket_expired");
    phone(&server, unknown, "confirm", &alice).assert_error(410, "ticket_expired");

    // The mini-program's calls need its access token.
    let no_token = post_raw(
        &server.url(&format!("/api/weixin/web-login/{ticket}/scan")),
        None,
        "",
    );
    no_token.assert_error(401, "not_authenticated");
    phone(&server, &ticket, "scan", "junk").assert_error(401, "token_not_valid");

    // Nothing happens: a long poll answers when its wait is over.
    assert_eq!(
        poll(&server, &ticket, &secret, 1).json(),
        json!({"status": "pending"})
    );

    // Scanned by alice: the ticket is hers.
    assert_eq!(phone(&server, &ticket, "scan", &alice).status, 200);
    phone(&server, &ticket, "scan", &bob).assert_error(409, "ticket_taken");
    phone(&server, &ticket, "confirm", &bob).assert_error(409, "ticket_taken");
    phone(&server, &ticket, "deny", &bob).assert_error(409, "ticket_taken");

    let denied = phone(&server, &ticket, "deny", &alice);
    assert_eq!(
        (denied.status, denied.json()),
        (200, json!({"status": "denied"}))
    );
    for _ in 0..2 {
        assert_eq!(status(&server, &ticket, &secret), "denied");
        phone(&server, &ticket, "confirm", &alice).assert_error(409, "ticket_closed");
        phone(&server, &ticket, "deny", &alice).assert_error(409, "ticket_closed");
    }
    // A long poll on a settled ticket answers at once.
    assert_eq!(
        poll(&server, &ticket, &secret, 25).json()["status"],
        "denied"
    );

    // A confirm straight from pending (no scan) works too.
    let (ticket, secret, _) = self::ticket(&server);
    assert_eq!(phone(&server, &ticket, "confirm", &bob).status, 200);
    assert_eq!(status(&server, &ticket, &secret), "confirmed");
}

#[test]
fn a_ticket_expires_after_its_ttl_and_a_long_poll_says_so() {
    let (_mock, server) = start(&format!("{ENABLED}ticket_ttl = \"10s\"\n"));
    let access = access_of(&login(&server, "ok:carol"));
    let (ticket, secret, body) = ticket(&server);
    assert_eq!(body["expires_in"], 10);
    assert_eq!(phone(&server, &ticket, "scan", &access).status, 200);
    // Waits past the expiry (10 s) and answers then, not after the 25 s asked.
    let started = std::time::Instant::now();
    let answer = poll(&server, &ticket, &secret, 25);
    assert_eq!(answer.json(), json!({"status": "expired"}));
    assert!(started.elapsed() < Duration::from_secs(25));
    for _ in 0..2 {
        assert_eq!(status(&server, &ticket, &secret), "expired");
        phone(&server, &ticket, "confirm", &access).assert_error(410, "ticket_expired");
    }
}

#[test]
fn a_disabled_user_cannot_confirm() {
    on_both("a_disabled_user_cannot_confirm", disabled_user);
}

fn disabled_user(backend: &Backend) {
    let (_mock, server) = start_on(backend, ENABLED);
    let dave = login(&server, "ok:dave");
    let id = dave["user"]["id"].to_string();
    let (ticket, secret, _) = ticket(&server);
    assert_eq!(
        phone(&server, &ticket, "scan", &access_of(&dave)).status,
        200
    );
    json_lines(&server.cli(&["users", "disable", &id]));
    phone(&server, &ticket, "confirm", &access_of(&dave)).assert_error(401, "user_inactive");
    assert_eq!(status(&server, &ticket, &secret), "scanned");
    let sessions = json_lines(&server.cli(&["users", "sessions", &id]));
    assert_eq!(sessions.len(), 1, "no family for the web: {sessions:?}");
}

#[test]
fn open_tickets_are_capped_and_a_restart_forgets_them() {
    on_both(
        "open_tickets_are_capped_and_a_restart_forgets_them",
        capped_and_forgotten,
    );
}

fn capped_and_forgotten(backend: &Backend) {
    let (_mock, mut server) = start_on(backend, &format!("{ENABLED}max_tickets = 2\n"));
    let (first, secret, _) = ticket(&server);
    ticket(&server);
    let full = create(&server);
    full.assert_error(503, "too_many_tickets");
    assert!(full.header("retry-after").is_some());

    server.terminate();
    server.restart();
    assert_eq!(status(&server, &first, &secret), "expired");
    // ...and the cap counts this process's tickets only.
    ticket(&server);
}

#[test]
fn wechat_errors_of_the_code_are_mapped_and_leave_no_ticket() {
    let (mock, server) = start(&format!("{ENABLED}max_tickets = 1\n"));
    mock.fail_wxacode(Some(45009));
    let limited = create(&server);
    limited.assert_error(429, "rate_limited");
    assert!(limited.header("retry-after").is_some());
    mock.fail_wxacode(Some(41030));
    create(&server).assert_error(502, "wechat_config_error");
    assert!(server
        .logs()
        .contains("getwxacodeunlimit refused the configured page"));
    mock.fail_wxacode(Some(-1));
    create(&server).assert_error(503, "upstream_busy");
    mock.fail_wxacode(Some(99999));
    create(&server).assert_error(502, "upstream_error");
    mock.fail_wxacode(None);
    // The cap is 1: the failed attempts left no ticket behind.
    ticket(&server);
    create(&server).assert_error(503, "too_many_tickets");
}

#[test]
fn a_forced_token_refresh_gets_the_code() {
    let (mock, server) = start(ENABLED);
    ticket(&server);
    mock.revoke_tokens();
    let (_, forced) = mock.token_fetches();
    ticket(&server);
    assert_eq!(mock.token_fetches().1, forced + 1);
}

#[test]
fn waiting_polls_hold_no_worker() {
    // One worker: a poll that held it would stop every other request.
    let mock = MockWeChat::start();
    let server = TestServer::start(
        TestConfig::against(&mock)
            .with_toml(ENABLED)
            .with_env("WXAUTH_SERVER__WORKERS", "1"),
    );
    let access = access_of(&login(&server, "ok:erin"));
    let (ticket, secret, _) = ticket(&server);
    let answered = Arc::new(AtomicUsize::new(0));
    let pollers: Vec<_> = (0..8)
        .map(|_| {
            let url = server.url(&format!("/api/weixin/web-login/{ticket}/?wait=25"));
            let (secret, answered) = (secret.clone(), answered.clone());
            std::thread::spawn(move || {
                let reply = get(&url, Some(&bearer(&secret)));
                answered.fetch_add(1, Ordering::SeqCst);
                reply.json()["status"].as_str().unwrap().to_string()
            })
        })
        .collect();
    // While they wait, the one worker still answers.
    for _ in 0..3 {
        assert_eq!(get(&server.url("/healthz"), None).status, 200);
    }
    assert_eq!(status(&server, &ticket, &secret), "pending");
    assert_eq!(answered.load(Ordering::SeqCst), 0, "a poll answered early");
    assert_eq!(phone(&server, &ticket, "scan", &access).status, 200);
    for poller in pollers {
        assert_eq!(poller.join().unwrap(), "scanned");
    }
}

#[test]
fn off_by_default() {
    let (_mock, server) = start_with_mock();
    create(&server).assert_error(404, "not_found");
    get(&server.url("/web-login/"), None).assert_error(404, "not_found");
}

#[test]
fn the_page_is_self_contained_under_a_strict_policy() {
    let (_mock, server) = start(&format!(
        "{ENABLED}embedder_origin = \"https://admin.example.com\"\n"
    ));
    for path in ["/web-login/", "/web-login"] {
        let page = get(&server.url(path), None);
        assert_eq!(page.status, 200);
        assert!(page
            .header("content-type")
            .unwrap()
            .starts_with("text/html"));
        let csp = page.header("content-security-policy").unwrap();
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(
            csp.contains("frame-ancestors https://admin.example.com"),
            "{csp}"
        );
        assert!(!page.text.contains("<script>"), "no inline script");
        assert!(page.text.contains(r#"content="https://admin.example.com""#));
    }
    for (path, kind) in [
        ("/web-login/page.js", "text/javascript"),
        ("/web-login/wxauth-web.js", "text/javascript"),
        ("/web-login/page.css", "text/css"),
    ] {
        let asset = get(&server.url(path), None);
        assert_eq!(asset.status, 200, "{path}");
        assert!(
            asset.header("content-type").unwrap().starts_with(kind),
            "{path}"
        );
        // No external asset: nothing is fetched from another origin.
        assert!(
            !asset.text.contains("http://") && !asset.text.contains("https://"),
            "{path}"
        );
    }
}

#[test]
fn the_built_in_mock_draws_the_ticket_as_a_png() {
    let toml = format!(
        "[server]\nbind = \"127.0.0.1:0\"\n[wechat]\nmock = true\n[metrics]\nbind = \"\"\n{ENABLED}"
    );
    let mut config = TestConfig::against(&MockWeChat::start());
    config.toml = toml;
    let server = TestServer::start(config);
    let (_, _, body) = ticket(&server);
    let qr = body["qr"].as_str().unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(qr.strip_prefix("data:image/png;base64,").expect(qr))
        .unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
}
