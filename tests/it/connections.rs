//! Every listener's connections are bounded (docs/ARCHITECTURE.md, "Deadlines and
//! bounds"): a client that reads none of its answers is dropped after
//! `server.request_timeout`, one address holds at most `server.max_connections_per_ip`
//! API connections (trusted proxies exempt), a connection past
//! `server.max_connection_lifetime` is closed after its next answer, and stalled
//! connections to the metrics listener cannot take the API's descriptors.

use crate::common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Far more than the server needs: the machine running the tests may be busy.
const MARGIN: Duration = Duration::from_secs(20);

fn server_with(env: &[(&str, &str)]) -> (MockWeChat, TestServer) {
    let mock = MockWeChat::start();
    let mut config = TestConfig::against(&mock).with_env(
        "WXAUTH_SERVER__REQUEST_TIMEOUT",
        &format!("{}s", REQUEST_TIMEOUT.as_secs()),
    );
    for (key, value) in env {
        config = config.with_env(key, value);
    }
    let server = TestServer::start(config);
    (mock, server)
}

fn api_addr(server: &TestServer) -> SocketAddr {
    server
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("the API address")
}

/// True once the server has closed or reset `client`'s connection, as the kernel
/// sees it (without reading: reading is what some of these clients must not do).
/// Our end is in CLOSE_WAIT after the server's FIN, and gone from the table after
/// its reset.
pub(crate) fn closed_by_server(client: &TcpStream, server: SocketAddr) -> bool {
    let local = client.local_addr().expect("local address").port();
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port = |field: &str| {
        field
            .rsplit(':')
            .next()
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())
    };
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() > 3
            && port(fields[1]) == Some(local)
            && port(fields[2]) == Some(server.port())
        {
            return fields[3] == "08";
        }
    }
    true
}

/// A connection to `server` from `source` (another loopback address: 127.0.0.2 is
/// another client as far as the server can tell).
fn connect_from(source: &str, server: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let source: SocketAddr = format!("{source}:0").parse().unwrap();
    socket
        .bind(&source.into())
        .expect("bind the client address");
    socket.connect(&server.into()).expect("connect");
    socket.into()
}

/// GET /healthz on a fresh connection from `source`: the status line.
fn healthz_from(source: &str, server: SocketAddr) -> String {
    let mut stream = connect_from(source, server);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.lines().next().unwrap_or_default().to_string()
}

/// Sends as much of `data` as the connection takes without blocking.
fn send_what_fits(stream: &mut TcpStream, data: &[u8]) -> usize {
    stream.set_nonblocking(true).unwrap();
    let mut sent = 0;
    while sent < data.len() {
        match stream.write(&data[sent..]) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    sent
}

/// 2,000 pipelined GET /openapi.json (about 17 MB of answers, more than the kernel
/// buffers hold), none read: the server's writes block, and once nothing has been
/// read for `server.request_timeout` the connection is dropped.
#[test]
fn a_client_that_reads_no_answers_is_disconnected() {
    let (_mock, server) = server_with(&[]);
    let addr = api_addr(&server);
    let mut stream = TcpStream::connect(addr).expect("connect");
    let request = b"GET /openapi.json HTTP/1.1\r\nHost: test\r\n\r\n".repeat(2000);
    let sent = send_what_fits(&mut stream, &request);
    assert!(sent > 0, "nothing could be sent");
    wait_for(
        REQUEST_TIMEOUT + MARGIN,
        "the server to drop a client that reads nothing",
        || closed_by_server(&stream, addr).then_some(()),
    );
    assert_eq!(healthz_from("127.0.0.1", addr), "HTTP/1.1 200 OK");
}

/// Connections that each hold a request head open, from one address.
fn stalled_heads(source: &str, addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut stream = connect_from(source, addr);
            stream.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
            stream
        })
        .collect()
}

/// Completes a head from [`stalled_heads`] and reads the whole answer.
fn finish_head(mut stream: &TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"Host: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

#[test]
fn one_address_holds_at_most_max_connections_per_ip() {
    let (_mock, server) = server_with(&[
        ("WXAUTH_SERVER__MAX_CONNECTIONS_PER_IP", "4"),
        // Long enough that only the limit can close them while the test looks.
        ("WXAUTH_SERVER__REQUEST_TIMEOUT", "60s"),
    ]);
    let addr = api_addr(&server);
    let connections = stalled_heads("127.0.0.1", addr, 10);
    let open = wait_for(
        MARGIN,
        "the server to close the connections past the per-address limit",
        || {
            let open: Vec<&TcpStream> = connections
                .iter()
                .filter(|c| !closed_by_server(c, addr))
                .collect();
            (open.len() == 4).then_some(open)
        },
    );
    // Another address is served meanwhile.
    assert_eq!(healthz_from("127.0.0.2", addr), "HTTP/1.1 200 OK");
    // The four admitted connections are served.
    for stream in open {
        let answer = finish_head(stream);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    }
    // Slots come back when connections close.
    drop(connections);
    wait_for(MARGIN, "a slot for 127.0.0.1 again", || {
        (healthz_from("127.0.0.1", addr) == "HTTP/1.1 200 OK").then_some(())
    });
}

#[test]
fn a_trusted_proxy_is_not_held_to_the_per_address_limit() {
    let (_mock, server) = server_with(&[
        ("WXAUTH_SERVER__MAX_CONNECTIONS_PER_IP", "2"),
        ("WXAUTH_SERVER__TRUSTED_PROXIES", "[\"127.0.0.1\"]"),
    ]);
    let addr = api_addr(&server);
    let connections = stalled_heads("127.0.0.1", addr, 6);
    for stream in &connections {
        let answer = finish_head(stream);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "a trusted proxy's connection was refused: {answer:?}"
        );
    }
}

/// Where the head in `data` ends, and the whole answer's length (head and
/// `Content-Length` body), once the head is complete.
fn answer_length(data: &[u8]) -> Option<(usize, usize)> {
    let end = data.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    Some((end, end + length))
}

/// Whether `data` holds a whole answer.
fn answer_complete(data: &[u8]) -> bool {
    answer_length(data).is_some_and(|(_, whole)| data.len() >= whole)
}

/// Reads one answer from a kept-alive connection; returns its head, lower-cased.
fn read_answer(stream: &mut TcpStream) -> Option<String> {
    let mut data = Vec::new();
    let mut byte = [0u8; 1];
    let (end, whole) = loop {
        match stream.read(&mut byte) {
            Ok(1) => data.push(byte[0]),
            _ => return None,
        }
        if let Some(lengths) = answer_length(&data) {
            break lengths;
        }
    };
    let mut body = vec![0u8; whole - end];
    stream.read_exact(&mut body).ok()?;
    Some(String::from_utf8_lossy(&data[..end]).to_ascii_lowercase())
}

#[test]
fn a_connection_past_its_lifetime_is_closed_after_its_next_answer() {
    let (_mock, server) = server_with(&[("WXAUTH_SERVER__MAX_CONNECTION_LIFETIME", "1s")]);
    let addr = api_addr(&server);
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answers = 0;
    wait_for(MARGIN, "an answer that closes the connection", || {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            .expect("the connection is still open");
        let head = read_answer(&mut stream).expect("an answer");
        assert!(head.starts_with("http/1.1 200"), "{head}");
        answers += 1;
        head.contains("connection: close").then_some(())
    });
    assert!(
        answers > 1,
        "the first answer already closed the connection"
    );
    let mut rest = Vec::new();
    assert_eq!(stream.read_to_end(&mut rest).ok(), Some(0), "still open");
}

/// Stalled connections to the metrics listener wait in its backlog past its own
/// small cap and are closed by its deadlines: under a 128-descriptor limit, 150 of
/// them leave the API serving.
#[test]
fn stalled_metrics_connections_leave_the_api_its_descriptors() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "prlimit (util-linux) is required in CI"
        );
        eprintln!("SKIPPED: prlimit (util-linux) is not installed");
        return;
    }
    let (_mock, server) = server_with(&[("WXAUTH_METRICS__BIND", "127.0.0.1:0")]);
    let addr = api_addr(&server);
    let metrics: SocketAddr = server
        .metrics_addr()
        .expect("the metrics listener")
        .parse()
        .expect("the metrics address");
    let limited = Command::new("prlimit")
        .arg(format!("--pid={}", server.pid()))
        .arg("--nofile=128:128")
        .status()
        .expect("prlimit");
    assert!(limited.success(), "prlimit failed");
    // For two seconds, each connection the listener takes asks once, reads the
    // answer, then stalls in its next head (a kept-alive connection that no
    // first-head deadline covers). The others wait in the listen backlog.
    let mut stalled: Vec<(TcpStream, Vec<u8>, bool)> = (0..150)
        .map(|_| {
            let mut stream = TcpStream::connect(metrics).expect("connect to metrics");
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
                .expect("send to metrics");
            stream.set_nonblocking(true).unwrap();
            (stream, Vec::new(), false)
        })
        .collect();
    let attack = std::time::Instant::now();
    let mut buf = [0u8; 16384];
    while attack.elapsed() < Duration::from_secs(2) {
        for (stream, received, stalling) in stalled.iter_mut().filter(|c| !c.2) {
            if let Ok(n) = stream.read(&mut buf) {
                received.extend_from_slice(&buf[..n]);
            }
            if answer_complete(received) {
                *stalling = stream.write_all(b"GET /met").is_ok();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The listener accepts what it will; then the API must still answer at once.
    for _ in 0..5 {
        assert_eq!(healthz_from("127.0.0.1", addr), "HTTP/1.1 200 OK");
    }
    login(&server, "ok:metrics-siege");
    drop(stalled);
}
