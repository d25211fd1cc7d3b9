//! Test harness: the real `wxauth` binary on a random loopback port, a mock WeChat
//! server that answers like WeChat does, and a small HTTP client.
#![allow(dead_code)]

pub mod backend;
pub mod mock_wechat;
pub mod postgres;
pub mod proxy;
pub mod tools;

use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use mock_wechat::MockWeChat;

pub const APPID: &str = "wxtestapp0001";
pub const SECRET: &str = "s3cr3t-app-secret-never-logged";

/// Polls `check` until it yields a value or `deadline` passes.
pub fn wait_for<T>(deadline: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A config for a test server: everything on loopback, data in a temp dir.
pub struct TestConfig {
    pub toml: String,
    pub env: Vec<(String, String)>,
}

impl TestConfig {
    /// Real HTTP client against `mock`, one app, no rate limits, no metrics listener.
    pub fn against(mock: &MockWeChat) -> Self {
        TestConfig {
            toml: format!(
                r#"
[server]
bind = "127.0.0.1:0"
workers = 2

[wechat]
appid = "{APPID}"
secret = "{SECRET}"
api_base = "{}"
timeout = "2s"
retries = 2

[limits]
login_per_minute = 0
refresh_per_minute = 0
refresh_per_family_per_minute = 0
phone_per_user_per_minute = 0

[metrics]
bind = ""
"#,
                mock.base_url()
            ),
            env: Vec::new(),
        }
    }

    /// Adds TOML after the base config (later tables must not repeat earlier ones:
    /// use `env` to override a key of a table the base already has).
    pub fn with_toml(mut self, extra: &str) -> Self {
        self.toml.push_str(extra);
        self
    }

    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    pub base: String,
    /// The listeners' addresses, as the server wrote them to `server.announce_file`.
    announced: Value,
    starts: usize,
    /// The wxauth binary this server (and its `cli`) runs.
    bin: PathBuf,
}

impl TestServer {
    pub fn start(config: TestConfig) -> Self {
        Self::start_with(config, Path::new(env!("CARGO_BIN_EXE_wxauth")), |_| {})
    }

    /// Like [`start`](Self::start), running `bin` (another release's binary, say),
    /// after `prepare` has filled the data directory (its path, not yet created).
    pub fn start_with(config: TestConfig, bin: &Path, prepare: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("config.toml");
        let data = dir.path().join("data");
        let toml = format!(
            "{}\n[storage]\npath = {:?}\n",
            config.toml,
            data.display().to_string()
        );
        std::fs::write(&config_path, toml).expect("write config");
        let mut server = TestServer {
            dir,
            config: config_path,
            env: config.env,
            child: None,
            base: String::new(),
            announced: Value::Null,
            starts: 0,
            bin: bin.to_path_buf(),
        };
        prepare(&server.data_dir());
        server.spawn();
        server
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("server-{n}.log"))
    }

    fn announce_path(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("announce-{n}.json"))
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = self.log_path(self.starts);
        let announce = self.announce_path(self.starts);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("serve")
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .env("WXAUTH_LOG__LEVEL", "debug")
            .env("WXAUTH_SERVER__ANNOUNCE_FILE", &announce)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let this_release = self.bin == Path::new(env!("CARGO_BIN_EXE_wxauth"));
        let mut child = cmd.spawn().expect("spawn wxauth");
        let announced = wait_for(Duration::from_secs(20), "the server to listen", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "wxauth exited during start-up ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if this_release {
                // Written atomically: once it exists, it is whole.
                let text = std::fs::read_to_string(&announce).ok()?;
                Some(serde_json::from_str::<Value>(&text).expect("the announce file is JSON"))
            } else {
                // Another release's binary may predate `server.announce_file`: its
                // text log line gives the API address.
                let text = std::fs::read_to_string(&log).ok()?;
                let line = text.lines().find(|l| l.contains("listening"))?;
                let addr = line.split("address=").nth(1)?.split_whitespace().next()?;
                Some(serde_json::json!({ "api": addr }))
            }
        });
        let api = announced["api"].as_str().expect("the API address");
        self.base = format!("http://{api}");
        self.announced = announced;
        self.child = Some(child);
    }

    /// The file the latest start announced its listeners in.
    pub fn announce_file(&self) -> PathBuf {
        self.announce_path(self.starts)
    }

    /// The metrics listener's address (`None` when it is off).
    pub fn metrics_addr(&self) -> Option<String> {
        self.announced["metrics"].as_str().map(str::to_string)
    }

    /// The access-token listener's address (`None` when it is off).
    pub fn token_endpoint_addr(&self) -> Option<String> {
        self.announced["access_token"].as_str().map(str::to_string)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill -9");
        child.wait().expect("reap");
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(ok.success());
        wait_for(
            Duration::from_secs(40),
            "the server to exit after SIGTERM",
            || child.try_wait().expect("try_wait"),
        )
    }

    /// Starts the binary again on the same config and data directory (new port).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server first");
        self.spawn();
    }

    /// Everything every run of this server has logged.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A response as the tests see it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?} (status {})",
                self.text, self.status
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// Asserts an error reply: status, JSON `code`, and a non-empty `detail`.
    pub fn assert_error(&self, status: u16, code: &str) -> Value {
        let body = self.json();
        assert_eq!(
            (self.status, body["code"].as_str()),
            (status, Some(code)),
            "unexpected reply: {}",
            self.text
        );
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "no detail: {}",
            self.text
        );
        assert!(
            self.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "error is not labelled JSON: {:?}",
            self.headers
        );
        body
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    )
}

/// The test agent with `tls` for HTTPS.
pub fn agent_with_tls(tls: ureq::tls::TlsConfig) -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .tls_config(tls)
            .build(),
    )
}

/// A ureq result as the tests see it (any status is an answer).
pub fn collect(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut response = result.expect("HTTP request failed");
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                v.to_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    Reply {
        status,
        headers,
        text,
    }
}

/// POST with an explicit content type (or none) and a raw body.
pub fn post_raw(url: &str, content_type: Option<&str>, body: &str) -> Reply {
    let mut req = agent().post(url);
    if let Some(ct) = content_type {
        req = req.header("Content-Type", ct);
    }
    collect(req.send(body))
}

pub fn post_json(url: &str, body: &Value) -> Reply {
    post_raw(url, Some("application/json"), &body.to_string())
}

pub fn get(url: &str, authorization: Option<&str>) -> Reply {
    let mut req = agent().get(url);
    if let Some(auth) = authorization {
        req = req.header("Authorization", auth);
    }
    collect(req.call())
}

pub fn request(method: &str, url: &str) -> Reply {
    let req = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .body(())
        .expect("request");
    collect(agent().run(req))
}

/// Logs in with `code` and returns the 200 body (panics otherwise).
pub fn login(server: &TestServer, code: &str) -> Value {
    let reply = post_json(
        &server.url("/api/weixin/login/"),
        &serde_json::json!({ "code": code }),
    );
    assert_eq!(reply.status, 200, "login failed: {}", reply.text);
    reply.json()
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The decoded header and claims of a JWT (no signature check).
pub fn jwt_parts(token: &str) -> (Value, Value) {
    use base64::Engine;
    let mut parts = token.split('.');
    let mut decode = || {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts.next().expect("jwt part"))
            .expect("base64url");
        serde_json::from_slice::<Value>(&raw).expect("jwt json")
    };
    let header = decode();
    let claims = decode();
    (header, claims)
}

/// Signs arbitrary claims with the server's generated HMAC key (to forge expired,
/// wrongly typed or wrongly addressed tokens).
pub fn forge(data_dir: &Path, alg: jsonwebtoken::Algorithm, claims: &Value) -> String {
    let key = std::fs::read(data_dir.join("jwt_signing_key")).expect("signing key file");
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(&key),
    )
    .expect("sign")
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Like [`post_json`], but a failed connection is `None` instead of a panic
/// (for requests racing a killed server).
pub fn try_post_json(url: &str, body: &Value) -> Option<Reply> {
    let mut response = agent()
        .post(url)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .ok()?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().ok()?;
    Some(Reply {
        status,
        headers: HashMap::new(),
        text,
    })
}

impl TestServer {
    /// Runs `wxauth --config <this server's config> ARGS…` (the admin CLI).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run wxauth")
    }

    /// The value of `field=` on the first log line containing `marker`.
    pub fn log_field(&self, marker: &str, field: &str) -> Option<String> {
        let logs = self.logs();
        let line = logs.lines().find(|l| l.contains(marker))?;
        let value = line
            .split(&format!("{field}="))
            .nth(1)?
            .split_whitespace()
            .next()?;
        Some(value.trim_matches('"').to_string())
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Waits for the server to exit on its own (a crash) and returns its status.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let status = wait_for(deadline, "the server to exit", || {
            child.try_wait().expect("try_wait")
        });
        self.child = None;
        status
    }
}

/// stdout of a CLI run as JSON lines (panics unless it exited 0).
pub fn json_lines(out: &std::process::Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "wxauth failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// A minimal valid config (a real-client app, loopback, random port).
pub const VALID_CONFIG: &str = r#"
[server]
bind = "127.0.0.1:0"
[wechat]
appid = "wxabc123"
secret = "shh"
"#;

/// Runs `wxauth --config DIR/config.toml ARGS…` in `dir`, with `toml` as that file
/// (for start-up and `check-config` behaviour, where no server needs to come up).
pub fn run_with_config(
    dir: &Path,
    toml: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> std::process::Output {
    let path = dir.join("config.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wxauth"));
    cmd.arg("--config")
        .arg(&path)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("CREDENTIALS_DIRECTORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// A mock WeChat and a server using it with its metrics listener on, and that
/// listener's address.
pub fn start_with_metrics() -> (MockWeChat, TestServer, String) {
    let mock = MockWeChat::start();
    let server = TestServer::start(
        TestConfig::against(&mock).with_env("WXAUTH_METRICS__BIND", "127.0.0.1:0"),
    );
    let metrics_addr = server.metrics_addr().expect("the metrics listener");
    (mock, server, metrics_addr)
}

/// A mock WeChat and a server using it with the default test config.
pub fn start_with_mock() -> (MockWeChat, TestServer) {
    let mock = MockWeChat::start();
    let server = TestServer::start(TestConfig::against(&mock));
    (mock, server)
}

/// `POST /api/weixin/phone/` with a getPhoneNumber code, as the user of `access`.
pub fn phone(server: &TestServer, access: &str, code: &str) -> Reply {
    collect(
        agent()
            .post(&server.url("/api/weixin/phone/"))
            .header("Content-Type", "application/json")
            .header("Authorization", &bearer(access))
            .send(serde_json::json!({ "code": code }).to_string()),
    )
}

/// Whether the tests run as root (CI does): some need to act as another user.
pub fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The bearer secret of [`start_with_token_endpoint`]'s access-token listener.
pub const TOKEN_ENDPOINT_SECRET: &str = "a-long-enough-bearer-secret";

/// A server against `mock` with the access-token endpoint on its own loopback
/// listener: the server, the endpoint's URL, and the directory holding the secret file.
pub fn start_with_token_endpoint(mock: &MockWeChat) -> (TestServer, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("token-endpoint-secret");
    std::fs::write(&secret_file, format!("{TOKEN_ENDPOINT_SECRET}\n")).expect("secret file");
    let server = TestServer::start(
        TestConfig::against(mock)
            .with_env("WXAUTH_WECHAT__TOKEN_ENDPOINT_BIND", "127.0.0.1:0")
            .with_env(
                "WXAUTH_WECHAT__TOKEN_ENDPOINT_SECRET_FILE",
                secret_file.to_str().expect("a UTF-8 path"),
            ),
    );
    let addr = server
        .token_endpoint_addr()
        .expect("the access-token listener");
    let url = format!("http://{addr}/api/weixin/access_token/");
    (server, url, dir)
}
