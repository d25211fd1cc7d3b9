//! WeChat calls are bounded (one deadline per login, a bounded wait for a call slot,
//! no call for a client that left), redirects are never followed, and what WeChat
//! sends is checked before anything is stored.

use crate::common;

use common::*;
use serde_json::json;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// A login with its own client, patient enough to see a server that takes far too long.
fn timed_login(server: &TestServer, code: &str) -> (Reply, Duration) {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(90)))
            .build(),
    );
    let started = Instant::now();
    let mut response = agent
        .post(&server.url("/api/weixin/login/"))
        .header("Content-Type", "application/json")
        .send(json!({ "code": code }).to_string())
        .expect("login request");
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    let reply = Reply {
        status,
        headers,
        text,
    };
    (reply, started.elapsed())
}

/// A 200, or a 503 `upstream_busy` with `Retry-After`: the two answers of a busy server.
fn assert_answered_or_busy(reply: &Reply) {
    if reply.status != 200 {
        reply.assert_error(503, "upstream_busy");
        assert!(
            reply.header("retry-after").is_some(),
            "503 without Retry-After"
        );
    }
}

fn occurrences(server: &TestServer, marker: &str) -> usize {
    server.logs().matches(marker).count()
}

#[test]
fn an_ordinary_login_is_answered_within_its_deadline_while_150_slow_logins_run() {
    let mock = MockWeChat::start();
    // The default deadline (5 s), slots (16) and wait for a slot (1 s).
    let server =
        TestServer::start(TestConfig::against(&mock).with_env("WXAUTH_WECHAT__TIMEOUT", "5s"));
    let deadline = Duration::from_secs(5);
    let margin = Duration::from_secs(3);

    let (batch, (ordinary, took)) = std::thread::scope(|s| {
        let server = &server;
        let batch: Vec<_> = (0..150)
            .map(|i| s.spawn(move || timed_login(server, &format!("slow3000:batch{i}"))))
            .collect();
        // Sent once the slow calls have taken every slot.
        wait_for(
            Duration::from_secs(20),
            "the slow calls to reach WeChat",
            || {
                let calls: usize = (0..150)
                    .map(|i| mock.calls(&format!("slow3000:batch{i}")))
                    .sum();
                (calls >= 16).then_some(())
            },
        );
        // ...and the rest of the batch waits for one.
        wait_for(
            Duration::from_secs(20),
            "the rest of the batch to wait for a call slot",
            || {
                (occurrences(server, "login waits for a WeChat call slot") >= 150 - 16)
                    .then_some(())
            },
        );
        let ordinary = timed_login(server, "ok:ordinary");
        let batch: Vec<_> = batch.into_iter().map(|h| h.join().unwrap()).collect();
        (batch, ordinary)
    });

    assert_answered_or_busy(&ordinary);
    assert!(
        took < deadline + margin,
        "the ordinary login took {took:?}, past its deadline {deadline:?} (+{margin:?})"
    );
    for (reply, took) in &batch {
        assert_answered_or_busy(reply);
        assert!(took < &(deadline + margin), "a slow login took {took:?}");
    }
    let served = batch.iter().filter(|(r, _)| r.status == 200).count();
    assert!(served >= 1, "no slow login got a call slot");
    // A refused login never reached WeChat: its code is unspent.
    let refused_calls: usize = (0..150)
        .filter(|i| batch[*i].0.status == 503)
        .map(|i| mock.calls(&format!("slow3000:batch{i}")))
        .sum();
    assert_eq!(
        refused_calls, 0,
        "a login refused with 503 was sent to WeChat"
    );
}

#[test]
fn the_wait_for_a_call_slot_counts_against_the_login_deadline() {
    let mock = MockWeChat::start();
    // A 4 s deadline, the default 16 slots, and a wait for a slot that may use it all.
    let server = TestServer::start(
        TestConfig::against(&mock)
            .with_env("WXAUTH_WECHAT__TIMEOUT", "4s")
            .with_env("WXAUTH_WECHAT__QUEUE_TIMEOUT", "4s"),
    );
    let deadline = Duration::from_secs(4);
    std::thread::scope(|s| {
        let server = &server;
        let holders: Vec<_> = (0..16)
            .map(|i| s.spawn(move || timed_login(server, &format!("slow3500:holder{i}"))))
            .collect();
        wait_for(Duration::from_secs(20), "every slot to be taken", || {
            let calls: usize = (0..16)
                .map(|i| mock.calls(&format!("slow3500:holder{i}")))
                .sum();
            (calls == 16).then_some(())
        });
        // Waits about 3.5 s for a slot; its call gets only what is left of the 4 s
        // (with a fresh 4 s it would take about 7.5 s).
        let (reply, took) = timed_login(server, "slow4000:late");
        reply.assert_error(504, "upstream_timeout");
        assert_eq!(mock.calls("slow4000:late"), 1, "called with the time left");
        assert!(
            took < deadline + Duration::from_millis(2500),
            "took {took:?}: the call had a fresh timeout after the wait"
        );
        for holder in holders {
            let (reply, _) = holder.join().unwrap();
            assert_eq!(reply.status, 200, "{}", reply.text);
        }
    });
}

/// Sends a login on a raw connection and returns it open, the answer unread.
fn send_login_raw(server: &TestServer, code: &str) -> TcpStream {
    let mut stream =
        TcpStream::connect(server.base.trim_start_matches("http://")).expect("connect");
    let body = json!({ "code": code }).to_string();
    write!(
        stream,
        "POST /api/weixin/login/ HTTP/1.1\r\nHost: wxauth\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send login");
    stream
}

#[test]
fn a_client_that_leaves_while_queued_causes_no_wechat_call_and_its_code_stays_unspent() {
    let mock = MockWeChat::start();
    let server = TestServer::start(
        TestConfig::against(&mock)
            .with_env("WXAUTH_WECHAT__MAX_CONCURRENT_CALLS", "1")
            .with_env("WXAUTH_WECHAT__QUEUE_TIMEOUT", "20s")
            .with_env("WXAUTH_WECHAT__TIMEOUT", "30s"),
    );
    let waits = "login waits for a WeChat call slot";
    let left = "left while it waited for a WeChat call slot";

    std::thread::scope(|s| {
        // The only call slot, held until released.
        let holder = s.spawn(|| timed_login(&server, "hold:amy"));
        wait_for(Duration::from_secs(10), "the held call", || {
            (mock.calls("hold:amy") == 1).then_some(())
        });

        let gone = send_login_raw(&server, "ok:gone");
        wait_for(Duration::from_secs(10), "the login to queue", || {
            (occurrences(&server, waits) == 1).then_some(())
        });
        gone.shutdown(Shutdown::Both).expect("disconnect");
        drop(gone);
        wait_for(
            Duration::from_secs(10),
            "the server to see it leave",
            || (occurrences(&server, left) == 1).then_some(()),
        );

        mock.release_holds();
        let (reply, _) = holder.join().unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text);
    });

    // The slot is free again, and the code of the client that left was never sent.
    login(&server, "ok:after");
    assert_eq!(mock.calls("ok:gone"), 0, "a call for a client that left");
    let body = login(&server, "ok:gone");
    assert_eq!(body["user"]["created"], true, "the code was still unspent");
}

#[test]
fn a_redirect_from_wechat_is_502_and_never_followed() {
    let mock = MockWeChat::start();
    // Would log the user in with the query the redirect carries.
    let elsewhere = MockWeChat::start();
    mock.redirect_to(&elsewhere.base_url());
    let server = TestServer::start(TestConfig::against(&mock));

    for (code, status) in [("redirect302:rita", "302"), ("redirect307:ross", "307")] {
        let reply = post_json(&server.url("/api/weixin/login/"), &json!({ "code": code }));
        reply.assert_error(502, "upstream_error");
        assert_eq!(mock.calls(code), 1, "one call, no retry");
        let logs = server.logs();
        assert!(
            logs.lines()
                .any(|l| l.contains("jscode2session failed") && l.contains(status)),
            "no log line names the status {status}:\n{logs}"
        );
    }
    assert_eq!(elsewhere.requests(), 0, "the redirect was followed");
    let logs = server.logs();
    assert!(
        !logs.contains(&elsewhere.base_url()) && !logs.contains("/sns/jscode2session"),
        "the Location reached the log:\n{logs}"
    );
    assert!(!logs.contains(SECRET), "the secret reached the log");
    assert!(
        json_lines(&server.cli(&["users", "list"])).is_empty(),
        "a user was created"
    );
}

#[test]
fn ids_and_keys_that_are_not_wechat_shaped_are_502_and_nothing_is_stored() {
    let (mock, server) = start_with_mock();
    for code in [
        "badopenid:nul",
        "badopenid:esc",
        "badopenid:rlo",
        "badopenid:long",
        "badunionid:una",
        "badkey:kay",
    ] {
        let reply = post_json(&server.url("/api/weixin/login/"), &json!({ "code": code }));
        reply.assert_error(502, "upstream_error");
        assert_eq!(mock.calls(code), 1, "{code}: one call");
    }
    let logs = server.logs();
    assert!(
        !logs.contains("not base64!"),
        "a session key reached the log"
    );
    assert!(
        !logs.contains(&"o".repeat(1024)),
        "the long openid reached the log"
    );
    assert!(
        json_lines(&server.cli(&["users", "list"])).is_empty(),
        "a user was created"
    );
    // WeChat-shaped answers (the mock's ordinary ones) still pass, and are user 1.
    let body = login(&server, "union:uma.oUnion-Id_28charsAAAAAAAAAAA");
    assert_eq!(body["user"]["id"], 1);
    assert_eq!(body["user"]["created"], true);
}

#[test]
fn an_unparsable_answer_is_502_and_the_log_names_only_the_error_kind() {
    let (mock, server) = start_with_mock();
    let reply = post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "garbage:gil" }),
    );
    reply.assert_error(502, "upstream_error");
    assert_eq!(mock.calls("garbage:gil"), 1);
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("jscode2session failed"))
        .unwrap_or_else(|| panic!("no failure line:\n{logs}"));
    assert!(
        line.contains("transport error: HTTP protocol"),
        "the line does not name the kind: {line}"
    );
    // ureq's own text (which may quote the URL or what the server sent) stays out.
    assert!(
        !line.contains("parse") && !line.contains("NOT-HTTP"),
        "ureq's error text reached the log: {line}"
    );
    assert!(!logs.contains(SECRET), "the secret reached the log");
}
