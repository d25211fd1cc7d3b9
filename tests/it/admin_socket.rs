//! The admin socket (`<data>/admin.sock`) under misuse:
//! a backup nobody reads never blocks logins, a stalled reader is dropped, an
//! oversized, non-UTF-8 or malformed request line gets an error status line (never
//! an echo of the input, never a silent close), and the socket is private.

use crate::common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The server-side timeout for a client that stops reading (`admin.io_timeout`).
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Names of the server's admin connection threads (15 bytes: Linux cuts the rest).
const ADMIN_CONNECTION_THREAD: &str = "wxauth-admin-co";

fn connect(server: &TestServer) -> UnixStream {
    let stream = UnixStream::connect(server.data_dir().join("admin.sock")).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Sends `request` as is and returns every line the server answers with.
fn exchange(server: &TestServer, request: &[u8]) -> Vec<String> {
    let mut stream = connect(server);
    stream.write_all(request).unwrap();
    BufReader::new(stream)
        .lines()
        .map(|l| l.expect("a UTF-8 answer line"))
        .collect()
}

/// Asserts that the answer is one error status line, and returns its message.
fn error_status(lines: &[String]) -> String {
    assert_eq!(lines.len(), 1, "expected one status line: {lines:?}");
    let status: Value = serde_json::from_str(&lines[0]).expect("a JSON status line");
    assert_eq!(status["wxauth_admin"], "error", "{status}");
    status["error"]
        .as_str()
        .expect("an error message")
        .to_string()
}

/// Logs in `n` distinct users, 8 at a time.
fn create_users(server: &TestServer, n: usize) {
    let url = server.url("/api/weixin/login/");
    std::thread::scope(|scope| {
        for t in 0..8 {
            let url = &url;
            scope.spawn(move || {
                for i in (t..n).step_by(8) {
                    let reply = post_json(url, &json!({ "code": format!("ok:user{i}.1") }));
                    assert_eq!(reply.status, 200, "{}", reply.text);
                }
            });
        }
    });
}

fn spool_files(server: &TestServer) -> Vec<String> {
    std::fs::read_dir(server.data_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.contains("spool"))
        .collect()
}

fn admin_connection_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim() == ADMIN_CONNECTION_THREAD)
                .count()
        })
        .unwrap_or(0)
}

/// Starts a backup over the socket, reads its first 64 KiB and then stops reading,
/// as a reader put to sleep with Ctrl-Z would.
fn stalled_backup(server: &TestServer) -> (UnixStream, Vec<u8>) {
    let mut stream = connect(server);
    stream.write_all(b"{\"command\":\"backup\"}\n").unwrap();
    let mut head = vec![0u8; 64 * 1024];
    stream.read_exact(&mut head).expect("the backup starts");
    (stream, head)
}

#[test]
fn a_backup_nobody_reads_does_not_block_logins() {
    let (_mock, server) = start_with_mock();
    // About 1 KB of backup per login: far more than the socket buffers hold.
    create_users(&server, 2000);

    let (mut stream, head) = stalled_backup(&server);
    let started = Instant::now();
    let reply = try_post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "ok:late.1" }),
    );
    let took = started.elapsed();
    let reply = reply.expect("the login is answered");
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(
        took < Duration::from_secs(3),
        "a login waited {took:?} behind a stalled backup"
    );

    // The reader wakes up: the backup is whole, and it was much larger than what
    // the socket could buffer while nobody read.
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    let text = String::from_utf8([head, rest].concat()).unwrap();
    assert!(
        text.len() > 1_000_000,
        "the backup ({} bytes) fits in the socket buffers: the test proves nothing",
        text.len()
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains("wxauth-backup"));
    assert!(lines[lines.len() - 2].contains("\"end\":true"));
    assert_eq!(lines[lines.len() - 1], r#"{"wxauth_admin":"ok"}"#);
    let users = lines
        .iter()
        .filter(|l| l.contains(r#""tree":"users""#))
        .count();
    assert!(users >= 2000, "{users} user entries");
    assert!(
        spool_files(&server).is_empty(),
        "{:?}",
        spool_files(&server)
    );
}

#[test]
fn a_stalled_backup_reader_is_dropped() {
    let mock = MockWeChat::start();
    let server =
        TestServer::start(TestConfig::against(&mock).with_env("WXAUTH_ADMIN__IO_TIMEOUT", "2s"));
    create_users(&server, 1000);
    let pid = server.pid();

    let (stream, _head) = stalled_backup(&server);
    assert_eq!(admin_connection_threads(pid), 1);
    // The server gives up on a reader that took nothing for `admin.io_timeout`
    // (well before its default of 30 s).
    wait_for(
        IO_TIMEOUT + Duration::from_secs(10),
        "the server to drop the stalled backup reader",
        || (admin_connection_threads(pid) == 0).then_some(()),
    );
    assert!(
        spool_files(&server).is_empty(),
        "{:?}",
        spool_files(&server)
    );
    drop(stream);
    // The socket still serves the next operator.
    let lines = exchange(&server, b"{\"command\":\"users_show\",\"id\":1}\n");
    assert_eq!(lines.last().unwrap(), r#"{"wxauth_admin":"ok"}"#);
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kb * 1024
}

#[test]
fn a_100_mb_request_line_is_refused_without_echo_or_memory_growth() {
    let (_mock, server) = start_with_mock();
    let stream = connect(&server);
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = vec![b'A'; 1 << 20];
        for _ in 0..100 {
            // The server stops reading after 64 KiB and closes: the rest fails.
            if writer.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = writer.write_all(b"\n");
    });
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .expect("an answer");
    sender.join().unwrap();

    let status: Value = serde_json::from_str(&answer).expect("a JSON status line");
    assert_eq!(status["wxauth_admin"], "error", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(error.contains("request too long"), "{error}");
    assert!(
        answer.len() < 200 && !answer.contains("AAAA"),
        "the input is echoed"
    );
    let peak = peak_rss(server.pid());
    assert!(
        peak < 200 << 20,
        "peak RSS {} MB: the line was read into memory",
        peak >> 20
    );
}

#[test]
fn invalid_utf8_gets_an_error_line() {
    let (_mock, server) = start_with_mock();
    let error = error_status(&exchange(
        &server,
        b"{\"command\":\"users_list\xff\xfe\"}\n",
    ));
    assert!(error.contains("UTF-8"), "{error}");
    // Without a newline before the client stops sending, too.
    let mut stream = connect(&server);
    stream.write_all(b"\xc3\x28").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let lines: Vec<String> = BufReader::new(stream).lines().map(Result::unwrap).collect();
    assert!(error_status(&lines).contains("UTF-8"));
}

#[test]
fn malformed_and_unknown_requests_get_an_error_line_without_echo() {
    let (_mock, server) = start_with_mock();
    let cases: [&[u8]; 8] = [
        b"{\"command\":\"drop_everything_XYZZY\"}\n",
        b"{\"command\":\"users_show\",\"id\":\"XYZZY\"}\n",
        b"{\"command\":\"users_show\"}\n",
        b"[\"XYZZY\"]\n",
        b"\"XYZZY\"\n",
        b"XYZZY\n",
        b"{\"command\":\"users_list\"\n",
        b"\n",
    ];
    for request in cases {
        let lines = exchange(&server, request);
        let error = error_status(&lines);
        assert!(
            error.starts_with("bad request"),
            "{}: {error}",
            String::from_utf8_lossy(request)
        );
        assert!(
            !lines[0].contains("XYZZY"),
            "the input is echoed: {lines:?}"
        );
    }
    // The socket still serves real requests afterwards.
    let lines = exchange(&server, b"{\"command\":\"users_list\"}\n");
    assert_eq!(lines, [r#"{"wxauth_admin":"ok"}"#]);
}

#[test]
fn the_socket_is_private_and_the_data_directory_is_0700() {
    let (_mock, server) = start_with_mock();
    let socket = std::fs::metadata(server.data_dir().join("admin.sock")).unwrap();
    let mode = socket.permissions().mode() & 0o777;
    assert_eq!(
        mode & 0o077,
        0,
        "admin.sock is {mode:o}: others may connect"
    );
    assert_eq!(mode & 0o600, 0o600, "admin.sock is {mode:o}");
    let dir = std::fs::metadata(server.data_dir()).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);
}
