//! Built-in HTTPS (`server.tls.cert` / `server.tls.key`): a test CA and a server
//! certificate for 127.0.0.1/localhost are made here with rcgen, and clients trust
//! only that CA.

use crate::common;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

/// A CA and a server certificate signed by it, as PEM.
struct TestPki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl TestPki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "wxauth test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate().expect("server key");
        let mut leaf =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = leaf.signed_by(&key, &issuer).expect("server certificate");

        TestPki {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes `server.crt` and `server.key` into `dir`; returns their paths.
    fn write(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let cert = dir.join("server.crt");
        let key = dir.join("server.key");
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }

    fn ca_der(&self) -> Vec<u8> {
        ureq::tls::Certificate::from_pem(self.ca_pem.as_bytes())
            .expect("CA PEM")
            .der()
            .to_vec()
    }
}

fn tls_table(cert: &Path, key: &Path) -> String {
    format!(
        "\n[server.tls]\ncert = {:?}\nkey = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    )
}

/// A TLS server against `mock`, its certificate files in their own temp dir.
fn start_https(mock: &MockWeChat, pki: &TestPki) -> (TestServer, tempfile::TempDir, String) {
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = pki.write(files.path());
    let server = TestServer::start(TestConfig::against(mock).with_toml(&tls_table(&cert, &key)));
    let https = server.base.replacen("http://", "https://", 1);
    (server, files, https)
}

/// A ureq agent that trusts only the test CA.
fn trusting_agent(pki: &TestPki) -> ureq::Agent {
    let ca = ureq::tls::Certificate::from_der(&pki.ca_der()).to_owned();
    agent_with_tls(
        ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![ca])))
            .build(),
    )
}

fn read_reply(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, String) {
    let mut response = response.expect("HTTPS request failed");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, text)
}

fn host_port(base: &str) -> String {
    base.split("://").nth(1).expect("scheme").to_string()
}

#[test]
fn https_serves_health_and_the_seed_flow_to_a_client_trusting_the_test_ca() {
    let mock = MockWeChat::start();
    let pki = TestPki::new();
    let (server, _files, https) = start_https(&mock, &pki);
    let agent = trusting_agent(&pki);

    let (status, body) = read_reply(agent.get(format!("{https}/healthz")).call());
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["status"],
        "ok"
    );

    let (status, body) = read_reply(
        agent
            .post(format!("{https}/api/weixin/login/"))
            .header("Content-Type", "application/json")
            .send(serde_json::json!({ "code": "ok:tls" }).to_string()),
    );
    assert_eq!(status, 200, "login over HTTPS: {body}");
    let login: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(login["code"], "success");
    let access = login["access"].as_str().expect("access token");

    let (status, body) = read_reply(
        agent
            .get(format!("{https}/api/weixin/data/"))
            .header("Authorization", bearer(access))
            .call(),
    );
    assert_eq!(status, 200, "data over HTTPS: {body}");
    let data: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(data["code"], "Authenticated.");
    assert_eq!(data["user"]["openid"], "o-tls");

    let listening = server
        .logs()
        .lines()
        .find(|l| l.contains("listening"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(listening.contains("tls=true"), "{listening}");
}

#[test]
fn a_client_that_does_not_trust_the_ca_fails_the_handshake() {
    let mock = MockWeChat::start();
    let pki = TestPki::new();
    let (_server, _files, https) = start_https(&mock, &pki);

    // The default agent trusts the public web roots only.
    let err = agent()
        .get(format!("{https}/healthz"))
        .call()
        .expect_err("an untrusted certificate must fail the handshake");
    let text = format!("{err} {err:?}");
    assert!(
        text.contains("UnknownIssuer") || text.to_lowercase().contains("certificate"),
        "not a certificate error: {text}"
    );

    // A client trusting another CA fails the same way.
    let other = TestPki::new();
    let err = trusting_agent(&other)
        .get(format!("{https}/healthz"))
        .call()
        .expect_err("a certificate from another CA must fail the handshake");
    assert!(
        format!("{err:?}").contains("BadSignature") || format!("{err:?}").contains("UnknownIssuer"),
        "not a certificate error: {err:?}"
    );
}

#[test]
fn plain_http_to_the_tls_port_gets_no_200() {
    let mock = MockWeChat::start();
    let pki = TestPki::new();
    let (server, _files, https) = start_https(&mock, &pki);
    let addr = host_port(&https);

    let mut stream = TcpStream::connect(&addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
        .write_all(
            format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("200"),
        "plain HTTP got an answer: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // Through an HTTP client too: never a 200.
    let plain = agent().get(server.url("/healthz")).call();
    if let Ok(response) = plain {
        assert_ne!(response.status().as_u16(), 200);
    }
}

/// A GET /healthz over a hand-made rustls connection limited to `version`.
/// Returns the negotiated version, ALPN protocol and the raw HTTP response.
fn get_with_version(
    addr: &str,
    ca_der: &[u8],
    version: &'static rustls::SupportedProtocolVersion,
) -> (rustls::ProtocolVersion, Option<Vec<u8>>, String) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .expect("add CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("protocol version")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
    let sock = TcpStream::connect(addr).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("write over TLS");
    let mut answer = Vec::new();
    match tls.read_to_end(&mut answer) {
        Ok(_) => {}
        // A peer that closes without close_notify: what was read still counts.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => panic!("read over TLS: {e}"),
    }
    let negotiated = tls.conn.protocol_version().expect("handshake done");
    let alpn = tls.conn.alpn_protocol().map(<[u8]>::to_vec);
    (
        negotiated,
        alpn,
        String::from_utf8_lossy(&answer).into_owned(),
    )
}

#[test]
fn tls_1_2_and_tls_1_3_both_work() {
    let mock = MockWeChat::start();
    let pki = TestPki::new();
    let (_server, _files, https) = start_https(&mock, &pki);
    let addr = host_port(&https);
    let ca = pki.ca_der();

    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let (negotiated, alpn, answer) = get_with_version(&addr, &ca, version);
        assert_eq!(negotiated, expected);
        assert_eq!(
            alpn.as_deref(),
            Some(&b"http/1.1"[..]),
            "ALPN for {expected:?}"
        );
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{expected:?}: {answer:?}"
        );
        assert!(
            answer.contains(r#""status":"ok""#),
            "{expected:?}: {answer:?}"
        );
    }
}

// --- configuration errors, through the real binary -------------------------------

const VALID: &str = VALID_CONFIG;

/// Runs the binary in `dir` with `toml` as its config file.
fn run(dir: &Path, toml: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    run_with_config(dir, toml, env, args)
}

/// Asserts that both `check-config` and `serve` exit 2 with one stderr line naming
/// `key` and containing `reason`.
fn assert_rejected(dir: &Path, toml: &str, key: &str, reason: &str) {
    for args in [&["check-config"][..], &["serve"][..]] {
        let out = run(dir, toml, &[], args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?} should exit 2 for {key}; stderr: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(&format!("{key}:")) && err.contains(reason),
            "the line names {key} and says {reason:?}: {err}"
        );
    }
}

#[test]
fn a_cert_without_a_key_and_a_key_without_a_cert_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = TestPki::new().write(dir.path());
    let cert_only = format!(
        "{VALID}[server.tls]\ncert = {:?}\n",
        cert.display().to_string()
    );
    assert_rejected(dir.path(), &cert_only, "server.tls.key", "required");
    let key_only = format!(
        "{VALID}[server.tls]\nkey = {:?}\n",
        key.display().to_string()
    );
    assert_rejected(dir.path(), &key_only, "server.tls.cert", "required");
}

#[test]
fn missing_or_garbage_pem_files_are_refused_with_the_key_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let (cert, key) = pki.write(dir.path());
    let config = |cert: &Path, key: &Path| format!("{VALID}{}", tls_table(cert, key));

    // The good pair checks out.
    let out = run(dir.path(), &config(&cert, &key), &[], &["check-config"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let missing = dir.path().join("nowhere.crt");
    assert_rejected(
        dir.path(),
        &config(&missing, &key),
        "server.tls.cert",
        "does not exist",
    );

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not a certificate\n").unwrap();
    assert_rejected(
        dir.path(),
        &config(&garbage, &key),
        "server.tls.cert",
        "no certificate found",
    );
    assert_rejected(
        dir.path(),
        &config(&cert, &garbage),
        "server.tls.key",
        "no private key found",
    );

    let bad_base64 = dir.path().join("bad.crt");
    std::fs::write(
        &bad_base64,
        "-----BEGIN CERTIFICATE-----\n!!!! not base64 !!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert_rejected(
        dir.path(),
        &config(&bad_base64, &key),
        "server.tls.cert",
        "not valid PEM",
    );

    // Swapped files: the certificate file holds a key, the key file a certificate.
    assert_rejected(
        dir.path(),
        &config(&key, &cert),
        "server.tls.cert",
        "no certificate found",
    );

    // A key of another pair.
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, TestPki::new().key_pem).unwrap();
    assert_rejected(
        dir.path(),
        &config(&cert, &other_key),
        "server.tls.key",
        "does not match the certificate",
    );
}

#[test]
fn the_key_may_come_from_the_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    let creds = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let (cert, _) = pki.write(dir.path());
    std::fs::write(creds.path().join("tls_key"), &pki.key_pem).unwrap();
    let toml = format!(
        "{VALID}[server.tls]\ncert = {:?}\nkey = \"tls_key\"\n",
        cert.display().to_string()
    );
    let creds_dir = creds.path().display().to_string();
    let out = run(
        dir.path(),
        &toml,
        &[("CREDENTIALS_DIRECTORY", &creds_dir)],
        &["check-config"],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the credentials directory the relative key is not found.
    let out = run(dir.path(), &toml, &[], &["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.tls.key"));
}

/// A rustls client connection to `addr` trusting the test CA, handshake done.
fn tls_client(
    addr: &str,
    pki: &TestPki,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    tls_client_offering(addr, pki, vec![b"http/1.1".to_vec()])
}

/// The same, offering `alpn`.
fn tls_client_offering(
    addr: &str,
    pki: &TestPki,
    alpn: Vec<Vec<u8>>,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(pki.ca_der()))
        .expect("add CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut sock = TcpStream::connect(addr).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).expect("handshake");
    }
    rustls::StreamOwned::new(conn, sock)
}

fn start_https_with_request_timeout(
    mock: &MockWeChat,
    pki: &TestPki,
) -> (TestServer, tempfile::TempDir, String) {
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = pki.write(files.path());
    let server = TestServer::start(
        TestConfig::against(mock)
            .with_toml(&tls_table(&cert, &key))
            .with_env("WXAUTH_SERVER__REQUEST_TIMEOUT", "2s"),
    );
    let addr = host_port(&server.base);
    (server, files, addr)
}

/// Over HTTPS as over plain HTTP: a kept-alive connection whose next head stalls is
/// closed (after the keep-alive time, 5 s, plus `server.request_timeout`).
#[test]
fn a_stalled_second_head_over_tls_is_closed() {
    let mock = MockWeChat::start();
    let pki = TestPki::new();
    let (_server, _files, addr) = start_https_with_request_timeout(&mock, &pki);
    let mut tls = tls_client(&addr, &pki);
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 12];
    tls.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    tls.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    wait_for(
        Duration::from_secs(40),
        "the server to close the stalled TLS connection",
        || match tls.read(&mut buf) {
            Ok(0) => Some(()),
            Ok(_) => None,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            // A reset, or a close without close_notify: closed too.
            Err(_) => Some(()),
        },
    );
}

/// Over HTTPS as over plain HTTP: a client that pipelines requests and reads none
/// of the answers is dropped once nothing has been read for `server.request_timeout`.
#[test]
fn a_tls_client_that_reads_no_answers_is_disconnected() {
    let mock = MockWeChat::start();
    let pki = TestPki::new();
    let (_server, _files, addr) = start_https_with_request_timeout(&mock, &pki);
    let server_addr: std::net::SocketAddr = addr.parse().unwrap();
    let mut tls = tls_client(&addr, &pki);
    let requests = b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(2000);
    tls.conn.set_buffer_limit(None);
    tls.conn.writer().write_all(&requests).unwrap();
    tls.sock.set_nonblocking(true).unwrap();
    // Send what the connection takes; never read.
    while tls.conn.wants_write() {
        match tls.conn.write_tls(&mut tls.sock) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    wait_for(
        Duration::from_secs(30),
        "the server to drop a TLS client that reads nothing",
        || crate::connections::closed_by_server(&tls.sock, server_addr).then_some(()),
    );
}

/// A ClientHello of several KB (browsers with post-quantum key shares send about 2 KB)
/// is read in as many turns as it needs: the handshake completes and is served.
#[test]
fn a_large_client_hello_completes_the_handshake() {
    let mock = MockWeChat::start();
    let pki = TestPki::new();
    let (server, _files, _https) = start_https(&mock, &pki);
    let addr = host_port(&server.base);
    let mut alpn: Vec<Vec<u8>> = (0..150)
        .map(|i| format!("x-padding-protocol-{i:04}").into_bytes())
        .collect();
    alpn.push(b"http/1.1".to_vec());
    let mut tls = tls_client_offering(&addr, &pki, alpn);
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 12];
    tls.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
}
