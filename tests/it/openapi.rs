//! docs/openapi.yaml: served as GET /openapi.json, covering every route, and tested
//! against the real server (the binary on the built-in WeChat mock) by schemathesis
//! with its default checks.
//!
//! schemathesis and PyYAML come from a Python virtual environment: `$TEST_VENV`,
//! else `target/venv` (`.ci/run` makes it). Outside CI without it, the tests that need
//! it skip with a loud message; under `CI=true` a missing tool fails them.

use crate::common;

use common::tools;
use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Examples per operation and phase; the whole run stays well under three minutes.
const MAX_EXAMPLES: &str = "100";
/// Fixed so that CI is reproducible; `TEST_SCHEMATHESIS_SEED` explores others.
const DEFAULT_SEED: &str = "20261128";

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn built_in_document() -> Value {
    let text = std::fs::read_to_string(repo_file("docs/openapi.json")).expect("docs/openapi.json");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

/// The virtual environment with schemathesis, or `None` (loudly) outside CI.
fn venv() -> Option<PathBuf> {
    let dir = std::env::var_os("TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_file("target/venv"));
    if dir.join("bin/schemathesis").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "no schemathesis in {} and CI=true: .ci/run must install it",
        dir.display()
    );
    eprintln!(
        "\n!!!!!!!! SKIPPED: no schemathesis in {}: the OpenAPI document was not tested \
         against the server. Run .ci/run, or: python3 -m venv target/venv && \
         target/venv/bin/pip install schemathesis pyjwt\n",
        dir.display()
    );
    None
}

fn mock_server() -> TestServer {
    TestServer::start(TestConfig {
        toml: r#"
[server]
bind = "127.0.0.1:0"
workers = 2

[wechat]
mock = true

[limits]
login_per_minute = 0

[metrics]
bind = "127.0.0.1:0"

[web_login]
enabled = true
"#
        .into(),
        env: Vec::new(),
    })
}

#[test]
fn the_served_document_is_the_built_in_one_with_this_servers_appids() {
    let server = mock_server();
    for path in ["/openapi.json", "/openapi.json/"] {
        let reply = get(&server.url(path), None);
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert!(reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")));
        let mut served = reply.json();
        let appids = &mut served["components"]["schemas"];
        assert_eq!(
            appids["LoginRequest"]["properties"]["appid"]["enum"],
            serde_json::json!(["wx_mock", null])
        );
        assert_eq!(
            appids["LoginForm"]["properties"]["appid"]["enum"],
            serde_json::json!(["wx_mock"])
        );
        for schema in ["LoginRequest", "LoginForm"] {
            appids[schema]["properties"]["appid"]
                .as_object_mut()
                .unwrap()
                .remove("enum");
        }
        assert_eq!(served, built_in_document());
    }
}

/// A schemathesis finding: the built-in mock made the openid `mock-openid-<name>`
/// whatever the name, so a valid code such as `C0$Eea..` (or a name over 52
/// characters) failed its own openid check: 502 `upstream_error` for a valid request.
#[test]
fn the_built_in_mock_logs_in_any_printable_name() {
    let server = mock_server();
    let long = format!("{}.1", "n".repeat(120));
    for code in ["C0$Eea..", "a b.1", "~!@#.x", long.as_str(), "alice.2"] {
        let reply = post_json(
            &server.url("/api/weixin/login/"),
            &serde_json::json!({ "code": code }),
        );
        assert_eq!(reply.status, 200, "{code:?}: {}", reply.text);
        let access = reply.json()["access"].as_str().unwrap().to_string();
        let me = get(&server.url("/api/weixin/data/"), Some(&bearer(&access))).json();
        let openid = me["user"]["openid"].as_str().unwrap().to_string();
        assert!(
            openid.starts_with("mock-openid-") && openid.len() <= 64,
            "{openid}"
        );
    }
    // The same name is the same user; a readable name keeps its readable openid.
    let again = login(&server, "C0$Eea.other");
    assert_eq!(again["user"]["created"], false);
    let alice = login(&server, "alice.3");
    let me = get(
        &server.url("/api/weixin/data/"),
        Some(&bearer(alice["access"].as_str().unwrap())),
    );
    assert_eq!(me.json()["user"]["openid"], "mock-openid-alice");
}

/// Every route the server counts in its metrics (that is, every route it serves) has
/// a path in the document, and the document names no route it does not serve.
#[test]
fn the_document_covers_every_route() {
    let document = built_in_document();
    assert_eq!(document["openapi"], "3.1.0");
    let documented: BTreeSet<&str> = document["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut served: BTreeSet<&str> = wxauth::metrics::ROUTES
        .iter()
        .copied()
        .filter(|r| *r != "other")
        .collect();
    // Served on the metrics listener, not counted under a route label.
    served.extend(["/metrics"]);
    assert_eq!(documented, served);
    let schemes = &document["components"]["securitySchemes"]["bearerAuth"];
    assert_eq!(schemes["scheme"], "bearer");
}

/// What the venv's python prints as JSON running `script` with `args`.
fn python_json(venv: &Path, script: &str, args: &[std::ffi::OsString]) -> Value {
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", script])
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

#[test]
fn docs_openapi_json_is_docs_openapi_yaml() {
    let Some(venv) = venv() else {
        return;
    };
    let from_yaml = python_json(
        &venv,
        "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1], encoding='utf-8'))))",
        &[repo_file("docs/openapi.yaml").into_os_string()],
    );
    assert!(
        from_yaml == built_in_document(),
        "docs/openapi.json is not docs/openapi.yaml: run docs/openapi-json.sh"
    );
}

/// `schemathesis run` with its default checks, over every operation, on the served
/// document. Fails on any finding; prints the command and its counts.
#[test]
fn schemathesis_finds_nothing_against_the_real_server() {
    let Some(venv) = venv() else {
        return;
    };
    let server = mock_server();
    let metrics_addr = server.metrics_addr().expect("the metrics listener");
    let document = server.dir.path().join("openapi.json");
    std::fs::write(&document, get(&server.url("/openapi.json"), None).text).unwrap();
    // A token for the operations behind bearerAuth, from a real login on the mock.
    let access = login(&server, "alice.schemathesis")["access"]
        .as_str()
        .unwrap()
        .to_string();
    let seed = std::env::var("TEST_SCHEMATHESIS_SEED").unwrap_or(DEFAULT_SEED.into());

    let mut api = vec!["--exclude-path".to_string(), "/metrics".to_string()];
    // The JWKS route is another branch's; until it is merged this server has no such
    // path at all (a generic 404 `not_found`, and 404 for every method).
    let jwks = get(&server.url("/.well-known/jwks.json"), None);
    if jwks.status == 404 && jwks.json()["code"] == "not_found" {
        eprintln!(
            "\n!!!!!!!! NOT TESTED: GET /.well-known/jwks.json is not served by this build\n"
        );
        api.extend(["--exclude-path".into(), "/.well-known/jwks.json".into()]);
    }
    api.extend(["-H".into(), format!("Authorization: Bearer {access}")]);
    let runs = [
        (server.base.clone(), api),
        (
            format!("http://{metrics_addr}"),
            // No link leads to or from /metrics: the stateful phase has nothing to run.
            vec![
                "--include-path".into(),
                "/metrics".into(),
                "--phases".into(),
                "examples,coverage,fuzzing".into(),
            ],
        ),
    ];
    // A getPhoneNumber code or encrypted data can be schema-valid and still refused
    // by WeChat or by the session key: those are 400 by the contract
    // (`phone_code_invalid`, `decrypt_failed`), not a schema-valid request wrongly
    // refused. So are a deletion code of another user (403 `code_mismatch`, or 401
    // when WeChat refuses it) and a session id that names no live session (404).
    std::fs::write(
        server.dir.path().join("schemathesis.toml"),
        r#"
[[operations]]
include-path = "/api/weixin/phone/"
checks.positive_data_acceptance.expected-statuses = ["2XX", 400, 401, 429, "5XX"]

[[operations]]
include-path = "/api/weixin/decrypt/"
checks.positive_data_acceptance.expected-statuses = ["2XX", 400, 401]

# Web login: a schema-valid ticket is most likely one never issued (410), and the
# bearer these runs send is an access token, not a poll secret (200 `expired`).
[[operations]]
include-path-regex = "^/api/weixin/web-login/\\{ticket\\}/(scan|confirm|deny)$"
checks.positive_data_acceptance.expected-statuses = ["2XX", 401, 409, 410]

# A ticket this process never issued (or forgot in a restart) has no poll secret to
# check: it answers `expired` to any bearer, by design (docs/API.md#web-login).
[[operations]]
include-path = "/api/weixin/web-login/{ticket}/"
checks.ignored_auth.enabled = false

[[operations]]
include-path = "/api/weixin/user/"
checks.positive_data_acceptance.expected-statuses = ["2XX", 400, 401, 403, 429, "5XX"]

[[operations]]
include-path = "/api/weixin/sessions/{id}/"
checks.positive_data_acceptance.expected-statuses = ["2XX", 401, 404]
"#,
    )
    .unwrap();
    for (base, filters) in runs {
        let mut cmd = Command::new(venv.join("bin/schemathesis"));
        cmd.arg("run")
            .arg(&document)
            .args(["--url", &base])
            .args(["--max-examples", MAX_EXAMPLES])
            .args(["--seed", &seed])
            .args(&filters)
            .current_dir(server.dir.path())
            .env("NO_COLOR", "1");
        let shown = format!("{cmd:?}").replace(&access, "<access token>");
        let out = cmd.output().expect("run schemathesis");
        let stdout = String::from_utf8_lossy(&out.stdout).replace(&access, "<access token>");
        let summary: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains("generated") || l.contains("Selected:") || l.contains("Tested:"))
            .map(str::trim)
            .collect();
        eprintln!("{shown}\n  {}", summary.join("\n  "));
        assert!(
            out.status.success(),
            "schemathesis found problems ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            summary.iter().any(|l| l.contains("generated")),
            "schemathesis ran no test case:\n{stdout}"
        );
    }
    // The server is still up and serving after all of it.
    assert_eq!(get(&server.url("/healthz"), None).status, 200);
}

/// Drives a client generated by openapi-python-client through a login, the data
/// endpoint, refreshes and verifies, in JSON and as forms, and prints `ok`.
const GENERATED_CLIENT_RUN: &str = r#"
import sys
sys.path.insert(0, sys.argv[1])
import importlib, pkgutil
import wxauth_client.api
from wxauth_client import AuthenticatedClient, Client
from wxauth_client.api.login import data, login
from wxauth_client.api.tokens import refresh, verify
from wxauth_client.models import (
    DataResponse, Empty, Error, LoginForm, LoginRequest, LoginResponse,
    RefreshForm, RefreshRequest, RefreshResponse, VerifyForm, VerifyRequest,
)

# Every generated module imports.
for group in pkgutil.iter_modules(wxauth_client.api.__path__):
    package = importlib.import_module(f"wxauth_client.api.{group.name}")
    for operation in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"wxauth_client.api.{group.name}.{operation.name}")

url = sys.argv[2]
sent = []
def record(request):
    sent.append(request.headers.get("content-type"))
hooks = {"event_hooks": {"request": [record]}}
client = Client(base_url=url, raise_on_unexpected_status=True, httpx_args=hooks)

pair = login.sync(client=client, body=LoginRequest(code="alice.generated"))
assert isinstance(pair, LoginResponse), pair
form_pair = login.sync(client=client, body=LoginForm(code="bob.generated"))
assert isinstance(form_pair, LoginResponse), form_pair

authed = AuthenticatedClient(base_url=url, token=pair.access, raise_on_unexpected_status=True)
me = data.sync(client=authed)
assert isinstance(me, DataResponse), me
assert me.user.id == pair.user.id and me.user.openid == "mock-openid-alice", me

renewed = refresh.sync(client=client, body=RefreshRequest(refresh=pair.refresh))
assert isinstance(renewed, RefreshResponse), renewed
renewed_form = refresh.sync(client=client, body=RefreshForm(refresh=form_pair.refresh))
assert isinstance(renewed_form, RefreshResponse), renewed_form

for body in [VerifyRequest(token=renewed.access), VerifyForm(token=renewed_form.refresh)]:
    answer = verify.sync(client=client, body=body)
    assert isinstance(answer, Empty), answer
# The refresh token rotated out above is refused, with the contract's error.
refused = verify.sync_detailed(client=client, body=VerifyRequest(token=pair.refresh))
assert refused.status_code == 401 and isinstance(refused.parsed, Error), refused
assert refused.parsed.code == "token_not_valid", refused.parsed

assert "application/json" in sent and "application/x-www-form-urlencoded" in sent, sent
print("ok")
"#;

/// A Python client generated from the served document by openapi-python-client
/// (with docs/openapi-python-client.yaml) imports, and runs login → data → refresh →
/// verify against the real server, with JSON and with form bodies.
#[test]
fn a_generated_python_client_runs_against_the_server() {
    let test = "a_generated_python_client_runs_against_the_server";
    let Some(generator) = tools::venv_binary("openapi-python-client") else {
        return tools::skip(
            test,
            "no openapi-python-client in the test venv (pip install openapi-python-client)",
        );
    };
    let server = mock_server();
    let work = tempfile::tempdir().unwrap();
    let document = work.path().join("openapi.json");
    std::fs::write(&document, get(&server.url("/openapi.json"), None).text).unwrap();
    // The generator's hooks (ruff) come from the same venv.
    let bin = generator.parent().unwrap().to_path_buf();
    let path = std::env::join_paths(
        std::iter::once(bin).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let out = Command::new(&generator)
        .args([
            "generate",
            "--meta",
            "none",
            "--output-path",
            "wxauth_client",
        ])
        .arg("--path")
        .arg(&document)
        .arg("--config")
        .arg(repo_file("docs/openapi-python-client.yaml"))
        .current_dir(work.path())
        .env("PATH", &path)
        .output()
        .expect("run openapi-python-client");
    let said = tools::output_text(&out);
    assert!(out.status.success(), "the generator failed:\n{said}");
    // Every schema became a type: nothing was dropped.
    assert!(
        !said.contains("removal of"),
        "the generator dropped schemas:\n{said}"
    );
    assert!(!said.contains("failed"), "a generator hook failed:\n{said}");

    let python = generator.parent().unwrap().join("python");
    let out = Command::new(python)
        .args(["-c", GENERATED_CLIENT_RUN])
        .arg(work.path())
        .arg(&server.base)
        .output()
        .expect("run the generated client");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "the generated client failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where the server refuses a body, the document does too: each body below is
/// refused by the real server (4xx) and is invalid against its request schema, for
/// JSON and form alike (checked by `jsonschema_rs`, which schemathesis brings).
#[test]
fn bodies_the_server_refuses_are_invalid_in_the_document() {
    let Some(venv) = venv() else {
        return;
    };
    let server = mock_server();
    let access = login(&server, "alice.strict")["access"]
        .as_str()
        .unwrap()
        .to_string();
    let iv = "AAAAAAAAAAAAAAAAAAAAAA==";
    let cases = [
        (
            "/api/weixin/decrypt/",
            "Decrypt",
            serde_json::json!({"iv": "", "encryptedData": ""}),
        ),
        (
            "/api/weixin/decrypt/",
            "Decrypt",
            serde_json::json!({"iv": iv, "encryptedData": ""}),
        ),
        (
            "/api/weixin/decrypt/",
            "Decrypt",
            serde_json::json!({"iv": "", "encryptedData": iv}),
        ),
        (
            "/api/weixin/decrypt/",
            "Decrypt",
            serde_json::json!({"iv": "AAAAAAAAAAAAAAAA", "encryptedData": iv}),
        ),
        (
            "/api/weixin/decrypt/",
            "Decrypt",
            serde_json::json!({"iv": iv, "encryptedData": "not base64!"}),
        ),
        (
            "/api/token/refresh/",
            "Refresh",
            serde_json::json!({"refresh": ""}),
        ),
        (
            "/api/token/verify/",
            "Verify",
            serde_json::json!({"token": ""}),
        ),
        (
            "/api/token/blacklist/",
            "Logout",
            serde_json::json!({"refresh": ""}),
        ),
    ];
    let mut checks = Vec::new();
    for (path, schema, body) in &cases {
        let reply = collect(
            agent()
                .post(&server.url(path))
                .header("Authorization", &format!("Bearer {access}"))
                .header("Content-Type", "application/json")
                .send(body.to_string()),
        );
        assert!(
            (400..500).contains(&reply.status),
            "{path} {body}: {} {}",
            reply.status,
            reply.text
        );
        for suffix in ["Request", "Form"] {
            checks.push(serde_json::json!([format!("{schema}{suffix}"), body]));
        }
    }
    let script = r#"
import json, sys, jsonschema_rs
document = json.load(open(sys.argv[1]))
valid = []
for name, body in json.loads(sys.argv[2]):
    schema = document["components"]["schemas"][name]
    if jsonschema_rs.Draft202012Validator(schema).is_valid(body):
        valid.append([name, body])
print(json.dumps(valid))
"#;
    let valid = python_json(
        &venv,
        script,
        &[
            repo_file("docs/openapi.json").into_os_string(),
            Value::Array(checks).to_string().into(),
        ],
    );
    assert_eq!(
        valid,
        serde_json::json!([]),
        "schema-valid bodies the server refuses"
    );
}
