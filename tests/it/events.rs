//! Events for the team's own back end, through the real binary: the outbox, the
//! Standard Webhooks signatures (checked with the `standardwebhooks` Python
//! package), order per user and at-least-once delivery across a dead receiver and
//! a `kill -9`.

use crate::common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One POST as the receiver got it.
#[derive(Debug, Clone)]
struct Delivery {
    headers: Vec<(String, String)>,
    body: String,
}

impl Delivery {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("an event body is JSON")
    }
}

/// A webhook receiver on 127.0.0.1:`port` answering 204 to every POST, until dropped
/// (then the port refuses connections).
struct Receiver {
    stop: Arc<AtomicBool>,
    /// How long it takes before it answers (ms): a slow receiver.
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    /// The first attempt of each event whose body holds this text is answered 503.
    refuse_first: Arc<Mutex<Option<String>>>,
    /// Connections accepted: a POST under way before its answer.
    arrived: Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(port: u16, got: Arc<Mutex<Vec<Delivery>>>) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the receiver");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let refuse_first = Arc::new(Mutex::new(None::<String>));
        let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let thread = {
            let arrived = arrived.clone();
            let stop = stop.clone();
            let delay_ms = delay_ms.clone();
            let refuse_first = refuse_first.clone();
            let mut refused = std::collections::HashSet::new();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            arrived.fetch_add(1, Ordering::Relaxed);
                            stream.set_nonblocking(false).unwrap();
                            let delay = Duration::from_millis(delay_ms.load(Ordering::Relaxed));
                            let refuse = |d: &Delivery| {
                                let text = refuse_first.lock().unwrap().clone();
                                text.is_some_and(|t| d.body.contains(&t))
                                    && refused
                                        .insert(d.header("webhook-id").unwrap_or("").to_string())
                            };
                            if let Some(delivery) = serve(stream, delay, refuse) {
                                got.lock().unwrap().push(delivery);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Receiver {
            stop,
            delay_ms,
            refuse_first,
            arrived,
            thread: Some(thread),
        }
    }

    /// From now on, the first attempt of each event whose body holds `text` gets
    /// a 503 (and is not counted as delivered).
    fn refuse_first_attempt_of(&self, text: &str) {
        *self.refuse_first.lock().unwrap() = Some(text.to_string());
    }

    /// How many POSTs have arrived, answered or not.
    fn arrived(&self) -> usize {
        self.arrived.load(Ordering::Relaxed)
    }

    /// From now on, each answer comes `delay` after the request was read.
    fn slow_down(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    stream: std::net::TcpStream,
    delay: Duration,
    mut refuse: impl FnMut(&Delivery) -> bool,
) -> Option<Delivery> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())?;
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    std::thread::sleep(delay);
    let delivery = Delivery {
        headers,
        body: String::from_utf8(body).ok()?,
    };
    let mut stream = stream;
    if refuse(&delivery) {
        stream
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .ok()?;
        return None;
    }
    stream
        .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
        .ok()?;
    Some(delivery)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwZm9yIHdpcmVzIHRlc3Rz";

/// Where the server keeps its data: the event tests run on each.
enum Backend {
    Sled,
    /// A database on the test cluster (URL).
    Postgres(String),
}

/// Runs `test` on sled, then on PostgreSQL (skipped, loudly, where the harness
/// has no cluster and CI is not set).
fn on_both(name: &str, test: fn(&Backend)) {
    test(&Backend::Sled);
    if let Some(pg) = common::postgres::cluster(name) {
        test(&Backend::Postgres(pg.create_database()));
    }
}

/// A server on `backend` whose events go to 127.0.0.1:`port` (`events.timeout` 2 s).
fn events_config(
    mock: &common::mock_wechat::MockWeChat,
    port: u16,
    backend: &Backend,
) -> TestConfig {
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), format!("{SECRET}\n")).unwrap();
    let (_, path) = secret.keep().unwrap();
    let config = TestConfig::against(mock).with_toml(&format!(
        "\n[events]\nwebhook_url = \"http://127.0.0.1:{port}/hooks\"\nsecret_file = {:?}\ntimeout = \"2s\"\n",
        path.display().to_string()
    ));
    match backend {
        Backend::Sled => config,
        Backend::Postgres(url) => config
            .with_env("WXAUTH_STORAGE__BACKEND", "postgres")
            .with_env("WXAUTH_STORAGE__POSTGRES_URL", url),
    }
}

fn server_with_events(
    mock: &common::mock_wechat::MockWeChat,
    port: u16,
    backend: &Backend,
) -> TestServer {
    TestServer::start(events_config(mock, port, backend))
}

fn call(server: &TestServer, method: &str, path: &str, access: &str, body: Value) -> Reply {
    let req = ureq::http::Request::builder()
        .method(method)
        .uri(server.url(path))
        .header("Authorization", bearer(access))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .expect("request");
    collect(agent().run(req))
}

/// A Python with `standardwebhooks`: `$TEST_VENV` (what `.ci/run` prepares), else
/// one this test makes under target/ (`None` when it cannot).
fn webhooks_python() -> Option<PathBuf> {
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-c", "import standardwebhooks"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let shared = std::env::var_os("TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv"));
    if ready(&shared.join("bin/python")) {
        return Some(shared.join("bin/python"));
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("webhooks-venv");
    let python = venv.join("bin/python");
    if ready(&python) {
        return Some(python);
    }
    let _ = std::fs::remove_dir_all(&venv);
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .is_ok_and(|o| o.status.success());
    let installed = made
        && Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "standardwebhooks"])
            .output()
            .is_ok_and(|o| o.status.success());
    (installed && ready(&python)).then_some(python)
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Checks every delivery's signature with the `standardwebhooks` package, and that
/// each with its body tampered with is refused. `false`: skipped (no package, not CI).
fn verify_with_standardwebhooks(test: &str, dir: &Path, deliveries: &[Delivery]) -> bool {
    let Some(python) = webhooks_python() else {
        assert!(
            !in_ci(),
            "{test}: no standardwebhooks (pip): .ci/run must install it"
        );
        eprintln!("\n!!!!!!!! SKIPPED the signature check of {test}: no python3 venv with standardwebhooks !!!!!!!!\n");
        return false;
    };
    let file = dir.join("deliveries.json");
    let records: Vec<Value> = deliveries
        .iter()
        .map(|d| {
            json!({
                "body": d.body,
                "headers": d.headers.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    std::fs::write(&file, serde_json::to_string(&records).unwrap()).unwrap();
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
hook = Webhook(sys.argv[1])
verified = refused = 0
for d in json.load(open(sys.argv[2])):
    hook.verify(d["body"], d["headers"])
    verified += 1
    try:
        hook.verify(d["body"].replace("user.", "user.x", 1), d["headers"])
    except WebhookVerificationError:
        refused += 1
print(json.dumps({"verified": verified, "tampered_refused": refused}))
"#;
    let out = Command::new(python)
        .args(["-c", script, SECRET])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = deliveries.len();
    assert_eq!(result, json!({"verified": n, "tampered_refused": n}));
    true
}

#[test]
fn every_delivery_verifies_with_standardwebhooks_and_a_tampered_body_does_not_on_sled_and_postgres()
{
    on_both(
        "every_delivery_verifies_with_standardwebhooks_and_a_tampered_body_does_not",
        every_delivery_verifies_with_standardwebhooks_and_a_tampered_body_does_not,
    );
}

fn every_delivery_verifies_with_standardwebhooks_and_a_tampered_body_does_not(backend: &Backend) {
    let test = "every_delivery_verifies_with_standardwebhooks_and_a_tampered_body_does_not";
    let mock = common::mock_wechat::MockWeChat::start();
    let port = free_port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let _receiver = Receiver::start(port, got.clone());
    let server = server_with_events(&mock, port, backend);

    let body = login(&server, "ok:ivy.1");
    let access = body["access"].as_str().unwrap().to_string();
    let id = body["user"]["id"].as_u64().unwrap();
    let patched = call(
        &server,
        "PATCH",
        "/api/weixin/user/",
        &access,
        json!({"nickname": "Ivy"}),
    );
    assert_eq!(patched.status, 200, "{}", patched.text);
    json_lines(&server.cli(&["users", "disable", &id.to_string()]));
    json_lines(&server.cli(&["users", "enable", &id.to_string()]));
    let deleted = call(
        &server,
        "DELETE",
        "/api/weixin/user/",
        &access,
        json!({"code": "ok:ivy.2"}),
    );
    assert_eq!(deleted.status, 200, "{}", deleted.text);

    let deliveries = wait_for(Duration::from_secs(60), "five deliveries", || {
        let got = got.lock().unwrap();
        (got.len() >= 5).then(|| got.clone())
    });
    let types: Vec<Value> = deliveries
        .iter()
        .map(|d| d.json()["type"].clone())
        .collect();
    assert_eq!(
        types,
        [
            "user.created",
            "user.updated",
            "user.disabled",
            "user.enabled",
            "user.deleted"
        ]
    );
    for delivery in &deliveries {
        let event = delivery.json();
        assert_eq!(event["data"]["user_id"], id, "{event}");
        assert!(event["timestamp"].as_str().is_some(), "{event}");
        assert!(delivery
            .header("webhook-id")
            .is_some_and(|h| h.starts_with("msg_")));
        assert!(delivery
            .header("webhook-signature")
            .is_some_and(|h| h.starts_with("v1,")));
    }
    assert_eq!(deliveries[1].json()["data"]["nickname"], "Ivy");
    // Delivered: the outbox is empty.
    wait_for(Duration::from_secs(30), "an empty outbox", || {
        json_lines(&server.cli(&["events", "list"]))
            .is_empty()
            .then_some(())
    });

    verify_with_standardwebhooks(test, server.dir.path(), &deliveries);
}

#[test]
fn a_receiver_down_for_30_s_gets_every_event_once_in_order_per_user_across_a_kill_9_on_sled_and_postgres(
) {
    on_both(
        "a_receiver_down_for_30_s_gets_every_event_once_in_order_per_user_across_a_kill_9",
        a_receiver_down_for_30_s_gets_every_event_once_in_order_per_user_across_a_kill_9,
    );
}

fn a_receiver_down_for_30_s_gets_every_event_once_in_order_per_user_across_a_kill_9(
    backend: &Backend,
) {
    let mock = common::mock_wechat::MockWeChat::start();
    let port = free_port();
    let down_since = Instant::now();
    let mut server = server_with_events(&mock, port, backend);

    let mut users = Vec::new();
    for name in ["jay", "kim", "lee"] {
        let body = login(&server, &format!("ok:{name}.1"));
        let access = body["access"].as_str().unwrap().to_string();
        for n in 1..=2 {
            let reply = call(
                &server,
                "PATCH",
                "/api/weixin/user/",
                &access,
                json!({"nickname": format!("{name}-{n}")}),
            );
            assert_eq!(reply.status, 200, "{}", reply.text);
        }
        users.push((name, body["user"]["id"].as_u64().unwrap()));
    }
    // Answered changes are durable, their events with them.
    server.kill9();
    server.restart();
    for (name, _) in &users {
        let access = login(&server, &format!("ok:{name}.2"))["access"]
            .as_str()
            .unwrap()
            .to_string();
        let reply = call(
            &server,
            "PATCH",
            "/api/weixin/user/",
            &access,
            json!({"nickname": format!("{name}-3")}),
        );
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let pending = json_lines(&server.cli(&["events", "list"]));
    assert_eq!(pending.len(), 12, "{pending:?}");

    // The receiver comes back after 30 s down.
    if let Some(left) = Duration::from_secs(30).checked_sub(down_since.elapsed()) {
        std::thread::sleep(left);
    }
    let got = Arc::new(Mutex::new(Vec::new()));
    let _receiver = Receiver::start(port, got.clone());
    let deliveries = wait_for(Duration::from_secs(120), "every event delivered", || {
        let got = got.lock().unwrap();
        let ids: std::collections::HashSet<_> = got
            .iter()
            .filter_map(|d| d.header("webhook-id").map(str::to_string))
            .collect();
        (ids.len() >= 12).then(|| got.clone())
    });
    for (name, id) in &users {
        let mut seen = std::collections::HashSet::new();
        let mine: Vec<Value> = deliveries
            .iter()
            .filter(|d| seen.insert(d.header("webhook-id").unwrap().to_string()))
            .map(Delivery::json)
            .filter(|e| e["data"]["user_id"] == *id)
            .collect();
        let shown: Vec<(Value, Value)> = mine
            .iter()
            .map(|e| (e["type"].clone(), e["data"]["nickname"].clone()))
            .collect();
        assert_eq!(
            shown,
            vec![
                (json!("user.created"), Value::Null),
                (json!("user.updated"), json!(format!("{name}-1"))),
                (json!("user.updated"), json!(format!("{name}-2"))),
                (json!("user.updated"), json!(format!("{name}-3"))),
            ],
            "{name}"
        );
    }
    wait_for(Duration::from_secs(30), "an empty outbox", || {
        json_lines(&server.cli(&["events", "list"]))
            .is_empty()
            .then_some(())
    });
}

#[test]
fn a_given_up_event_is_sent_again_by_events_retry_and_a_delivered_one_is_not_on_sled_and_postgres()
{
    on_both(
        "a_given_up_event_is_sent_again_by_events_retry",
        a_given_up_event_is_sent_again_by_events_retry,
    );
}

fn a_given_up_event_is_sent_again_by_events_retry(backend: &Backend) {
    let mock = common::mock_wechat::MockWeChat::start();
    let port = free_port();
    // No receiver yet, and no retrying: the first failed attempt gives the event up.
    let server = TestServer::start(
        events_config(&mock, port, backend).with_env("WXAUTH_EVENTS__RETRY_FOR", "0s"),
    );
    let user = login(&server, "ok:ned")["user"]["id"].clone();
    let given_up = wait_for(Duration::from_secs(30), "the event given up", || {
        let pending = json_lines(&server.cli(&["events", "list"]));
        (pending.len() == 1 && pending[0]["failed"] == true).then(|| pending[0].clone())
    });
    assert_eq!(given_up["type"], "user.created");
    assert_eq!(given_up["user_id"], user);

    let got = Arc::new(Mutex::new(Vec::new()));
    let _receiver = Receiver::start(port, got.clone());
    let retried = json_lines(&server.cli(&["events", "retry"]));
    assert_eq!(retried, [json!({"events_due_now": 1})]);
    let delivery = wait_for(
        Duration::from_secs(30),
        "the retried event delivered",
        || got.lock().unwrap().first().cloned(),
    );
    assert_eq!(delivery.header("webhook-id"), given_up["id"].as_str());
    assert_eq!(delivery.json()["data"]["user_id"], user);
    wait_for(Duration::from_secs(30), "an empty outbox", || {
        json_lines(&server.cli(&["events", "list"]))
            .is_empty()
            .then_some(())
    });
    // Delivered stays delivered: a second retry finds nothing to send.
    let retried = json_lines(&server.cli(&["events", "retry"]));
    assert_eq!(retried, [json!({"events_due_now": 0})]);
    assert_eq!(got.lock().unwrap().len(), 1, "sent once after the retry");
}

/// The embedded store's records have one writer once written: a retry asked for
/// while the delivery thread is sending is answered by that thread after the send,
/// and never rewrites the event being sent.
#[test]
fn a_retry_during_a_delivery_waits_for_it_and_leaves_the_event_alone_on_sled() {
    let mock = common::mock_wechat::MockWeChat::start();
    let port = free_port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let receiver = Receiver::start(port, got.clone());
    receiver.refuse_first_attempt_of("user.created");
    // Within the delivery's deadline (`events.timeout`, 2 s here).
    receiver.slow_down(Duration::from_millis(1500));
    let server = server_with_events(&mock, port, &Backend::Sled);
    login(&server, "ok:ora");
    // The first attempt is refused (the event then waits for its next attempt,
    // `next_attempt_at` set); the second is under way, answered 1.5 s after it arrived.
    wait_for(
        Duration::from_secs(30),
        "the second attempt under way",
        || (receiver.arrived() >= 2).then_some(()),
    );
    let retried = json_lines(&server.cli(&["events", "retry"]));
    assert!(
        got.lock().unwrap().len() == 1,
        "the retry is answered after the delivery under way"
    );
    assert_eq!(
        retried,
        [json!({"events_due_now": 0})],
        "nothing left to retry"
    );
    assert!(json_lines(&server.cli(&["events", "list"])).is_empty());
}

#[test]
fn with_no_webhook_url_no_event_is_stored_on_sled_and_postgres() {
    on_both(
        "with_no_webhook_url_no_event_is_stored",
        with_no_webhook_url_no_event_is_stored,
    );
}

fn with_no_webhook_url_no_event_is_stored(backend: &Backend) {
    let mock = common::mock_wechat::MockWeChat::start();
    let config = TestConfig::against(&mock);
    let server = TestServer::start(match backend {
        Backend::Sled => config,
        Backend::Postgres(url) => config
            .with_env("WXAUTH_STORAGE__BACKEND", "postgres")
            .with_env("WXAUTH_STORAGE__POSTGRES_URL", url),
    });
    let body = login(&server, "ok:max");
    let access = body["access"].as_str().unwrap();
    call(
        &server,
        "PATCH",
        "/api/weixin/user/",
        access,
        json!({"nickname": "M"}),
    );
    assert!(json_lines(&server.cli(&["events", "list"])).is_empty());
}

/// The deliveries with distinct `webhook-id`s, in the order each id first arrived.
fn first_of_each_id(deliveries: &[Delivery]) -> Vec<Delivery> {
    let mut seen = std::collections::HashSet::new();
    deliveries
        .iter()
        .filter(|d| seen.insert(d.header("webhook-id").unwrap().to_string()))
        .cloned()
        .collect()
}

/// Two nodes on one database and one receiver. The receiver is down while both
/// nodes make changes (a user's changes alternate between the nodes) and one node
/// is killed with SIGKILL; the other delivers every event once the receiver is
/// back, each event under one id (a retry keeps it), in order per user. Then both
/// nodes deliver side by side: each event exactly once. Every delivery verifies
/// with the `standardwebhooks` package.
#[test]
fn two_nodes_deliver_every_event_once_in_order_per_user_across_a_kill_9_of_one() {
    let test = "two_nodes_deliver_every_event_once_in_order_per_user_across_a_kill_9_of_one";
    let Some(pg) = common::postgres::cluster(test) else {
        return;
    };
    let backend = Backend::Postgres(pg.create_database());
    let mock = common::mock_wechat::MockWeChat::start();
    let port = free_port();
    let mut nodes = [
        server_with_events(&mock, port, &backend),
        server_with_events(&mock, port, &backend),
    ];
    let names = ["ana", "ben", "cal", "dee"];
    let change_on_both = |nodes: &[TestServer; 2], round: usize| {
        for (i, name) in names.iter().enumerate() {
            let node = &nodes[(i + round) % 2];
            let body = login(node, &format!("ok:{name}.{round}"));
            let access = body["access"].as_str().unwrap().to_string();
            for n in 0..2 {
                let node = &nodes[(i + round + n) % 2];
                let reply = call(
                    node,
                    "PATCH",
                    "/api/weixin/user/",
                    &access,
                    json!({"nickname": format!("{name}-{round}-{n}")}),
                );
                assert_eq!(reply.status, 200, "{}", reply.text);
            }
        }
    };
    // Round 0, the receiver a black hole (it accepts and never answers, so each
    // attempt holds its claim until events.timeout): 4 users created, 8 profile
    // changes.
    let black_hole = TcpListener::bind(("127.0.0.1", port)).unwrap();
    black_hole.set_nonblocking(true).unwrap();
    change_on_both(&nodes, 0);
    // Once each node holds an event mid-attempt, one of them is killed: its event
    // waits for the claim to run out, then the other node sends it.
    let Backend::Postgres(url) = &backend else {
        unreachable!()
    };
    let db = common::postgres::PgCluster::database_of(url);
    let mut held = Vec::new();
    wait_for(Duration::from_secs(30), "both nodes mid-attempt", || {
        while let Ok((stream, _)) = black_hole.accept() {
            held.push(stream);
        }
        let claimed = pg.psql(
            db,
            "SELECT count(*) FROM wxauth_outbox WHERE lease_holder IS NOT NULL \
             AND lease_until_ms > (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
        );
        (claimed == "2").then_some(())
    });
    nodes[0].kill9();
    drop((held, black_hole));
    let got = Arc::new(Mutex::new(Vec::new()));
    let receiver = Receiver::start(port, got.clone());
    let unique = |got: &Arc<Mutex<Vec<Delivery>>>, n: usize| {
        wait_for(Duration::from_secs(120), "every event delivered", || {
            let got = got.lock().unwrap();
            (first_of_each_id(&got).len() >= n).then(|| got.clone())
        })
    };
    let after_kill = unique(&got, 12);
    wait_for(Duration::from_secs(30), "an empty outbox", || {
        json_lines(&nodes[1].cli(&["events", "list"]))
            .is_empty()
            .then_some(())
    });

    // Round 1, receiver up but slow (each delivery takes 300 ms, so the other
    // node polls while one delivers), both nodes running: 8 more profile changes
    // (logins of known users make no event). The first attempt of each user's
    // first change is refused: the user's second change waits for its retry.
    receiver.slow_down(Duration::from_millis(300));
    receiver.refuse_first_attempt_of("-1-0\"");
    nodes[0].restart();
    let before = got.lock().unwrap().len();
    change_on_both(&nodes, 1);
    let all = unique(&got, 20);
    wait_for(Duration::from_secs(30), "an empty outbox", || {
        json_lines(&nodes[0].cli(&["events", "list"]))
            .is_empty()
            .then_some(())
    });
    drop(receiver);
    let all = {
        let got = got.lock().unwrap();
        assert!(got.len() >= all.len());
        got.clone()
    };
    let side_by_side = &all[before..];
    assert_eq!(
        first_of_each_id(side_by_side).len(),
        side_by_side.len(),
        "with no crash, each event is delivered once, by one node"
    );
    assert!(after_kill.len() >= 12);

    // One id per event: no event content arrived under two ids.
    let unique_events = first_of_each_id(&all);
    assert_eq!(unique_events.len(), 20, "4 created and 16 updated");
    let contents: std::collections::HashSet<String> =
        unique_events.iter().map(|d| d.body.clone()).collect();
    assert_eq!(contents.len(), 20, "an event sent under two ids");
    // In order per user.
    for name in names {
        let shown: Vec<Value> = unique_events
            .iter()
            .map(Delivery::json)
            .filter(|e| {
                e["data"]["openid"] == format!("o-{name}")
                    || e["data"]["nickname"]
                        .as_str()
                        .is_some_and(|n| n.starts_with(&format!("{name}-")))
            })
            .map(|e| e["data"]["nickname"].clone())
            .collect();
        let expected: Vec<Value> = std::iter::once(Value::Null)
            .chain(
                (0..2).flat_map(|round| (0..2).map(move |n| json!(format!("{name}-{round}-{n}")))),
            )
            .collect();
        assert_eq!(shown, expected, "{name}");
    }
    verify_with_standardwebhooks(test, nodes[1].dir.path(), &all);
}
