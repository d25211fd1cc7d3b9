//! Slow clients cannot hold the server: a request whose body never finishes is
//! answered (408 `request_timeout`) and closed once `server.request_timeout` has
//! passed, and `/healthz` keeps answering meanwhile.

use crate::common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Far more than the server needs: the machine running the tests may be busy.
const MARGIN: Duration = Duration::from_secs(15);

fn server_with_request_timeout() -> (MockWeChat, TestServer) {
    let mock = MockWeChat::start();
    let config = TestConfig::against(&mock)
        .with_env(
            "WXAUTH_SERVER__REQUEST_TIMEOUT",
            &format!("{}s", REQUEST_TIMEOUT.as_secs()),
        )
        // Every client here, the /healthz poller included, is 127.0.0.1: the
        // per-address limit is tests/it/connections.rs's subject, not this file's.
        .with_env("WXAUTH_SERVER__MAX_CONNECTIONS_PER_IP", "100000");
    let server = TestServer::start(config);
    (mock, server)
}

fn address(server: &TestServer) -> String {
    server.base.trim_start_matches("http://").to_string()
}

/// One client connection and everything the server sent on it.
struct Stalled {
    stream: TcpStream,
    received: Vec<u8>,
    closed: bool,
}

impl Stalled {
    /// Sends `head` and `partial` body bytes, then nothing more.
    fn open(addr: &str, head: &str, partial: &[u8]) -> Stalled {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.write_all(head.as_bytes()).expect("send head");
        stream.write_all(partial).expect("send part of the body");
        stream.set_nonblocking(true).expect("nonblocking");
        Stalled {
            stream,
            received: Vec::new(),
            closed: false,
        }
    }

    /// Reads what has arrived; true once the server has closed the connection.
    fn poll_closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        while !self.closed {
            match self.stream.read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => self.received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // A reset is a close too.
                Err(_) => self.closed = true,
            }
        }
        self.closed
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }
}

/// GET /healthz in a loop until stopped; returns (answers, failures, slowest).
fn poll_healthz(url: String, stop: Arc<AtomicBool>) -> (usize, Vec<String>, Duration) {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build(),
    );
    let (mut answers, mut failures, mut slowest) = (0, Vec::new(), Duration::ZERO);
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match agent.get(&url).call() {
            Ok(reply) if reply.status() == 200 => answers += 1,
            Ok(reply) => failures.push(format!("status {}", reply.status())),
            Err(e) => failures.push(e.to_string()),
        }
        slowest = slowest.max(started.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    (answers, failures, slowest)
}

fn wait_until_all_closed(connections: &mut [Stalled], within: Duration) -> Duration {
    let started = Instant::now();
    wait_for(
        within,
        "the server to close every stalled connection",
        || {
            let mut open = 0;
            for connection in connections.iter_mut() {
                if !connection.poll_closed() {
                    open += 1;
                }
            }
            (open == 0).then_some(())
        },
    );
    started.elapsed()
}

#[test]
fn stalled_request_bodies_are_closed_within_the_deadline_while_healthz_answers() {
    let (_mock, server) = server_with_request_timeout();
    let addr = address(&server);
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (url, stop) = (server.url("/healthz"), stop.clone());
        std::thread::spawn(move || poll_healthz(url, stop))
    };

    // Endpoints that read the body (the token and login endpoints), and one that
    // never reads it (POST /healthz is a 405): none may hold its connection.
    let targets = [
        "/api/token/verify/",
        "/api/weixin/login/",
        "/api/token/refresh/",
        "/healthz",
    ];
    let opened = Instant::now();
    let mut connections: Vec<Stalled> = (0..300)
        .map(|i| {
            let path = targets[i % targets.len()];
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            );
            Stalled::open(&addr, &head, b"{\"token\": \"")
        })
        .collect();
    let took = wait_until_all_closed(&mut connections, REQUEST_TIMEOUT + MARGIN);
    let since_first = opened.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (answers, failures, slowest) = poller.join().expect("healthz poller");

    assert!(
        failures.is_empty(),
        "/healthz failed while slow clients were connected: {failures:?}"
    );
    assert!(answers > 0, "/healthz was never answered");
    eprintln!(
        "300 stalled connections closed {took:.1?} after they were opened ({since_first:.1?} since the first); \
         /healthz answered {answers} times, slowest {slowest:.2?}"
    );

    // A body-reading endpoint answers the contract's JSON 408, and says it closes.
    let verify = connections[0].text();
    assert!(
        verify.starts_with("HTTP/1.1 408"),
        "expected a 408 for a stalled body, got {verify:?}"
    );
    assert!(
        verify.to_ascii_lowercase().contains("connection: close"),
        "the 408 does not announce the close: {verify:?}"
    );
    let body = verify.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("the 408 body is not JSON ({e}): {verify:?}"));
    assert_eq!(json["code"], "request_timeout", "{verify}");

    // The server still serves complete requests normally.
    let reply = post_json(
        &server.url("/api/token/verify/"),
        &serde_json::json!({"token": "x"}),
    );
    reply.assert_error(401, "token_not_valid");
}

#[test]
fn stalled_request_heads_are_closed_within_the_deadline() {
    let (_mock, server) = server_with_request_timeout();
    let addr = address(&server);
    let mut connections: Vec<Stalled> = (0..50)
        .map(|_| {
            Stalled::open(
                &addr,
                &format!("POST /api/token/verify/ HTTP/1.1\r\nHost: {addr}\r\n"),
                b"",
            )
        })
        .collect();
    wait_until_all_closed(&mut connections, REQUEST_TIMEOUT + MARGIN);
    assert_eq!(get(&server.url("/healthz"), None).status, 200);
}

/// actix-http times the head of a connection's first request only: the server must
/// also close a kept-alive connection whose next head stalls (after the keep-alive
/// time, 5 s, plus the request timeout).
#[test]
fn a_stalled_second_head_on_a_kept_alive_connection_is_closed() {
    let (_mock, server) = server_with_request_timeout();
    let addr = address(&server);
    let mut stream = TcpStream::connect(&addr).expect("connect");
    stream
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .unwrap();
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    stream.write_all(b"GET /heal").unwrap();
    stream.set_nonblocking(true).unwrap();
    let mut connection = Stalled {
        stream,
        received: Vec::new(),
        closed: false,
    };
    wait_until_all_closed(
        std::slice::from_mut(&mut connection),
        REQUEST_TIMEOUT + MARGIN,
    );
}
