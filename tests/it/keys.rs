//! Published public keys (`GET /.well-known/jwks.json`) and key rotation without
//! logging anyone out (`wxauth keys list|rotate|retire`, `jwt.previous_key_files`).

use crate::common;

use common::tools;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Is this CI, where a missing tool is a failure rather than a skipped test?
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips the test loudly outside CI; fails it in CI.
fn missing_tool(test: &str, what: &str) {
    assert!(!in_ci(), "{test}: {what} (CI=true: a missing tool fails)");
    eprintln!("SKIPPED {test}: {what}");
}

/// A new signing key in a file: `wxauth keygen` for ES256 and EdDSA, OpenSSL for RS256
/// (ring cannot generate RSA keys). `None` when OpenSSL is missing.
fn key_file(dir: &Path, algorithm: &str, name: &str) -> Option<PathBuf> {
    let path = dir.join(name);
    if algorithm == "RS256" {
        let made = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .arg("-out")
            .arg(&path)
            .output()
            .is_ok_and(|o| o.status.success());
        return made.then_some(path);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_wxauth"))
        .args(["keygen", "--algorithm", algorithm])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(&path, &out.stdout).unwrap();
    Some(path)
}

fn kid_of(token: &str) -> String {
    let (header, _) = jwt_parts(token);
    header["kid"].as_str().expect("a kid").to_string()
}

/// The kids the server publishes, after checking each JWK's required members.
fn published_kids(server: &TestServer, algorithm: &str) -> BTreeSet<String> {
    let reply = get(&server.url("/.well-known/jwks.json"), None);
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    body["keys"]
        .as_array()
        .expect("a keys array")
        .iter()
        .map(|jwk| {
            assert_eq!(jwk["alg"], algorithm, "{jwk}");
            assert_eq!(jwk["use"], "sig", "{jwk}");
            let kty = match algorithm {
                "RS256" => "RSA",
                "ES256" => "EC",
                _ => "OKP",
            };
            assert_eq!(jwk["kty"], kty, "{jwk}");
            assert!(jwk.get("d").is_none(), "no private member: {jwk}");
            jwk["kid"].as_str().expect("kid").to_string()
        })
        .collect()
}

fn kids(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|k| k.to_string()).collect()
}

fn data_ok(server: &TestServer, access: &str) -> u16 {
    get(&server.url("/api/weixin/data/"), Some(&bearer(access))).status
}

fn refresh(server: &TestServer, token: &str) -> Reply {
    post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": token }),
    )
}

/// `wxauth keys …`, its JSON lines (panics unless it exited 0).
fn keys_cli(server: &TestServer, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    json_lines(&server.cli(&all))
}

/// The signing kid `wxauth keys list` shows, and every live kid.
fn listed(server: &TestServer) -> (String, BTreeSet<String>) {
    let list = keys_cli(server, &["list"]);
    let signing: Vec<&Value> = list.iter().filter(|k| k["signing"] == true).collect();
    assert_eq!(signing.len(), 1, "one signing key: {list:?}");
    assert_eq!(signing[0]["state"], "active", "{list:?}");
    let all = list
        .iter()
        .filter(|k| k["state"] != "retired")
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    (signing[0]["kid"].as_str().unwrap().to_string(), all)
}

/// The state `wxauth keys list` shows for `kid`.
fn state_of(server: &TestServer, kid: &str) -> String {
    let list = keys_cli(server, &["list"]);
    let key = list
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap_or_else(|| panic!("{kid} is not listed: {list:?}"));
    key["state"].as_str().unwrap().to_string()
}

/// The whole story for one key-pair algorithm, with the server running (online),
/// then stopped (offline):
/// tokens from before a rotation work after it and stop once their key is retired,
/// and the JWKS lists exactly the live keys at each step.
fn rotation_story(algorithm: &str) {
    let test = format!("rotation_keeps_tokens_until_retired ({algorithm})");
    let keys_dir = tempfile::tempdir().unwrap();
    let Some(first) = key_file(keys_dir.path(), algorithm, "first.pem") else {
        return missing_tool(&test, "openssl is missing");
    };
    let mock = MockWeChat::start();
    let mut server = TestServer::start(
        TestConfig::against(&mock)
            .with_env("WXAUTH_JWT__ALGORITHM", algorithm)
            .with_env("WXAUTH_JWT__SIGNING_KEY_FILE", first.to_str().unwrap()),
    );
    // Two users logged in before the rotation: one keeps using its tokens across
    // it, the other's are only tried after its key is retired.
    let kept = login(&server, "ok:keys.kept");
    let dropped = login(&server, "ok:keys.dropped");
    let k1 = kid_of(kept["access"].as_str().unwrap());
    assert_eq!(kid_of(kept["refresh"].as_str().unwrap()), k1);
    assert_eq!(published_kids(&server, algorithm), kids(&[&k1]));
    assert_eq!(listed(&server), (k1.clone(), kids(&[&k1])));

    // Online rotation: RS256 needs the key given (ring makes no RSA keys).
    let rotated = if algorithm == "RS256" {
        let second = key_file(keys_dir.path(), algorithm, "second.pem").unwrap();
        let rotated = keys_cli(&server, &["rotate", "--key-file", second.to_str().unwrap()]);
        // The key went over the admin socket: it must not reach the server's log.
        let pem = std::fs::read_to_string(&second).unwrap();
        let secret_line = pem.lines().nth(2).unwrap();
        let logs = wait_for(
            Duration::from_secs(10),
            "the admin command's log line",
            || Some(server.logs()).filter(|logs| logs.contains("admin command")),
        );
        assert!(!logs.contains(secret_line), "the private key was logged");
        rotated
    } else {
        keys_cli(&server, &["rotate"])
    };
    let k2 = rotated[0]["kid"].as_str().unwrap().to_string();
    assert_ne!(k1, k2);
    // Published first: in the JWKS at once, signing only once activated.
    assert_eq!(rotated[0]["signing"], false);
    assert_eq!(rotated[0]["state"], "published");
    assert!(rotated[0]["signs_from"].is_string(), "{:?}", rotated[0]);
    assert_eq!(published_kids(&server, algorithm), kids(&[&k1, &k2]));
    assert_eq!(listed(&server), (k1.clone(), kids(&[&k1, &k2])));
    let waiting = login(&server, "ok:keys.waiting");
    assert_eq!(kid_of(waiting["access"].as_str().unwrap()), k1);
    // The new key signs once activated (again: a no-op); the older one cannot be
    // made to sign again.
    let activated = keys_cli(&server, &["activate", &k2]);
    assert_eq!(activated[0]["kid"], k2.as_str());
    assert_eq!(activated[0]["state"], "active");
    assert_eq!(keys_cli(&server, &["activate", &k2])[0]["state"], "active");
    let refused = server.cli(&["keys", "activate", &k1]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("only a rotated-in key that waits"),
        "{refused:?}"
    );
    assert_eq!(listed(&server), (k2.clone(), kids(&[&k1, &k2])));
    assert_eq!(state_of(&server, &k1), "published");

    // New tokens carry the new kid; tokens from before keep working, by kid.
    let fresh = login(&server, "ok:keys.fresh");
    assert_eq!(kid_of(fresh["access"].as_str().unwrap()), k2);
    assert_eq!(data_ok(&server, kept["access"].as_str().unwrap()), 200);
    let renewed = refresh(&server, kept["refresh"].as_str().unwrap());
    assert_eq!(renewed.status, 200, "{}", renewed.text);
    let renewed = renewed.json();
    assert_eq!(kid_of(renewed["access"].as_str().unwrap()), k2);

    // The signing key cannot be retired; an unknown kid is an error too.
    assert!(!server.cli(&["keys", "retire", &k2]).status.success());
    assert!(!server
        .cli(&["keys", "retire", "0011223344556677"])
        .status
        .success());

    // Retiring the old key: its tokens stop at once, the new key's keep working.
    keys_cli(&server, &["retire", &k1]);
    assert_eq!(published_kids(&server, algorithm), kids(&[&k2]));
    get(
        &server.url("/api/weixin/data/"),
        Some(&bearer(dropped["access"].as_str().unwrap())),
    )
    .assert_error(401, "token_not_valid");
    refresh(&server, dropped["refresh"].as_str().unwrap()).assert_error(401, "token_not_valid");
    assert_eq!(data_ok(&server, renewed["access"].as_str().unwrap()), 200);
    assert_eq!(data_ok(&server, fresh["access"].as_str().unwrap()), 200);

    // A restart keeps all of it: the ring and the retirement are on disk.
    server.terminate();
    server.restart();
    assert_eq!(published_kids(&server, algorithm), kids(&[&k2]));
    assert_eq!(data_ok(&server, dropped["access"].as_str().unwrap()), 401);
    assert_eq!(data_ok(&server, fresh["access"].as_str().unwrap()), 200);
    assert_eq!(
        kid_of(login(&server, "ok:keys.after")["access"].as_str().unwrap()),
        k2
    );

    // Offline: the same commands on the data directory, picked up at the next start.
    server.terminate();
    let offline = if algorithm == "RS256" {
        let third = key_file(keys_dir.path(), algorithm, "third.pem").unwrap();
        keys_cli(&server, &["rotate", "--key-file", third.to_str().unwrap()])
    } else {
        keys_cli(&server, &["rotate"])
    };
    let k3 = offline[0]["kid"].as_str().unwrap().to_string();
    assert_eq!(listed(&server), (k2.clone(), kids(&[&k2, &k3])));
    assert_eq!(state_of(&server, &k3), "published");
    keys_cli(&server, &["activate", &k3]);
    assert_eq!(listed(&server), (k3.clone(), kids(&[&k2, &k3])));
    server.restart();
    assert_eq!(published_kids(&server, algorithm), kids(&[&k2, &k3]));
    assert_eq!(data_ok(&server, fresh["access"].as_str().unwrap()), 200);
    let latest = login(&server, "ok:keys.latest");
    assert_eq!(kid_of(latest["access"].as_str().unwrap()), k3);
    server.terminate();
    keys_cli(&server, &["retire", &k2]);
    assert_eq!(state_of(&server, &k2), "retired");
    server.restart();
    assert_eq!(published_kids(&server, algorithm), kids(&[&k3]));
    assert_eq!(data_ok(&server, fresh["access"].as_str().unwrap()), 401);
    assert_eq!(data_ok(&server, latest["access"].as_str().unwrap()), 200);

    let ring = server.data_dir().join("jwt_keys.json");
    let mode = std::fs::metadata(&ring).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", ring.display());
}

#[test]
fn es256_rotation_keeps_tokens_until_their_key_is_retired() {
    rotation_story("ES256");
}

#[test]
fn eddsa_rotation_keeps_tokens_until_their_key_is_retired() {
    rotation_story("EdDSA");
}

#[test]
fn rs256_rotation_keeps_tokens_until_their_key_is_retired() {
    rotation_story("RS256");
}

#[test]
fn hmac_keys_rotate_and_retire_and_are_never_published() {
    let (_mock, server) = start_with_mock();
    let before = login(&server, "ok:hmac.before");
    let other = login(&server, "ok:hmac.other");
    let h1 = kid_of(before["access"].as_str().unwrap());

    let reply = get(&server.url("/.well-known/jwks.json"), None);
    let body = reply.assert_error(404, "symmetric_key");
    assert!(
        body["detail"].as_str().unwrap().contains("symmetric"),
        "{body}"
    );

    let rotated = keys_cli(&server, &["rotate"]);
    let h2 = rotated[0]["kid"].as_str().unwrap().to_string();
    assert_ne!(h1, h2);
    assert_eq!(rotated[0]["state"], "published");
    keys_cli(&server, &["activate", &h2]);
    assert_eq!(rotated[0]["algorithm"], "HS256");
    assert_eq!(rotated[0]["published"], false);
    let ring = server.data_dir().join("jwt_keys.json");
    let mode = std::fs::metadata(&ring).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    get(&server.url("/.well-known/jwks.json"), None).assert_error(404, "symmetric_key");

    // The generated secret still verifies until retired; new tokens use the new one.
    let after = login(&server, "ok:hmac.after");
    assert_eq!(kid_of(after["access"].as_str().unwrap()), h2);
    assert_eq!(data_ok(&server, before["access"].as_str().unwrap()), 200);
    let renewed = refresh(&server, before["refresh"].as_str().unwrap());
    assert_eq!(renewed.status, 200, "{}", renewed.text);
    assert_eq!(kid_of(renewed.json()["refresh"].as_str().unwrap()), h2);
    let verify = post_json(
        &server.url("/api/token/verify/"),
        &json!({ "token": other["refresh"] }),
    );
    assert_eq!(verify.status, 200, "{}", verify.text);

    keys_cli(&server, &["retire", &h1]);
    assert_eq!(listed(&server), (h2.clone(), kids(&[&h2])));
    assert_eq!(data_ok(&server, other["access"].as_str().unwrap()), 401);
    refresh(&server, other["refresh"].as_str().unwrap()).assert_error(401, "token_not_valid");
    post_json(
        &server.url("/api/token/verify/"),
        &json!({ "token": other["refresh"] }),
    )
    .assert_error(401, "token_not_valid");
    assert_eq!(data_ok(&server, after["access"].as_str().unwrap()), 200);
}

#[test]
fn backup_and_restore_carry_the_key_ring() {
    let (_mock, server) = start_with_mock();
    let rotated = keys_cli(&server, &["rotate"]);
    let kid = rotated[0]["kid"].as_str().unwrap().to_string();
    keys_cli(&server, &["activate", &kid]);
    let backup = server.dir.path().join("backup.jsonl");
    let out = server.cli(&["backup", backup.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&backup).unwrap();
    let ring_line: Value = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["file"] == "jwt_keys.json")
        .expect("the key ring in the backup");
    assert!(ring_line["content"].as_str().unwrap().contains(&kid));

    // Restored into a new data directory, a server there signs with the rotated key
    // and accepts the tokens issued before the backup.
    let before = login(&server, "ok:ring.before");
    let mock = MockWeChat::start();
    let restored = TestServer::start(TestConfig::against(&mock));
    let mut restored = restored;
    restored.terminate();
    std::fs::remove_dir_all(restored.data_dir()).unwrap();
    let out = restored.cli(&["restore", backup.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ring = restored.data_dir().join("jwt_keys.json");
    let mode = std::fs::metadata(&ring).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    restored.restart();
    assert_eq!(listed(&restored).0, kid);
    // The user logged in after the backup does not exist there; its token's key does.
    let reply = get(
        &restored.url("/api/weixin/data/"),
        Some(&bearer(before["access"].as_str().unwrap())),
    );
    assert_eq!(reply.status, 401, "{}", reply.text);
    assert_eq!(reply.json()["code"], "user_not_found", "{}", reply.text);
}

#[test]
fn previous_key_files_verify_but_never_sign() {
    let keys_dir = tempfile::tempdir().unwrap();
    let old = key_file(keys_dir.path(), "EdDSA", "old.pem").unwrap();
    let new = key_file(keys_dir.path(), "EdDSA", "new.pem").unwrap();
    let mock = MockWeChat::start();
    let jwt = |signing: &Path, previous: &[&Path]| {
        let previous: Vec<String> = previous
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect();
        format!(
            "\n[jwt]\nalgorithm = \"EdDSA\"\nsigning_key_file = {:?}\nprevious_key_files = [{}]\n",
            signing.display().to_string(),
            previous.join(", ")
        )
    };
    let mut server = TestServer::start(TestConfig::against(&mock).with_toml(&jwt(&old, &[])));
    let old_tokens = login(&server, "ok:prev.user");
    let k_old = kid_of(old_tokens["access"].as_str().unwrap());

    // The operator's own rotation: the new key signs, the old one is kept for checking.
    let config = std::fs::read_to_string(&server.config).unwrap();
    let switched = config.replace(&jwt(&old, &[]), &jwt(&new, &[&old]));
    assert_ne!(config, switched);
    std::fs::write(&server.config, &switched).unwrap();
    server.terminate();
    server.restart();
    let new_tokens = login(&server, "ok:prev.again");
    let k_new = kid_of(new_tokens["access"].as_str().unwrap());
    assert_ne!(k_old, k_new);
    assert_eq!(published_kids(&server, "EdDSA"), kids(&[&k_old, &k_new]));
    assert_eq!(
        data_ok(&server, old_tokens["access"].as_str().unwrap()),
        200
    );
    let (signing, _) = listed(&server);
    assert_eq!(signing, k_new);

    // Dropped from the config: the old key's tokens stop.
    std::fs::write(
        &server.config,
        config.replace(&jwt(&old, &[]), &jwt(&new, &[])),
    )
    .unwrap();
    server.terminate();
    server.restart();
    assert_eq!(published_kids(&server, "EdDSA"), kids(&[&k_new]));
    assert_eq!(
        data_ok(&server, old_tokens["access"].as_str().unwrap()),
        401
    );
    assert_eq!(
        data_ok(&server, new_tokens["access"].as_str().unwrap()),
        200
    );
}

/// A server signing with a new ES256 key of its own (and its key's directory), with
/// `env` on top.
fn es256_server(env: &[(&str, &str)]) -> (tempfile::TempDir, MockWeChat, TestServer) {
    let keys_dir = tempfile::tempdir().unwrap();
    let key = key_file(keys_dir.path(), "ES256", "es.pem").unwrap();
    let mock = MockWeChat::start();
    let mut config = TestConfig::against(&mock)
        .with_env("WXAUTH_JWT__ALGORITHM", "ES256")
        .with_env("WXAUTH_JWT__SIGNING_KEY_FILE", key.to_str().unwrap());
    for (name, value) in env {
        config = config.with_env(name, value);
    }
    let server = TestServer::start(config);
    (keys_dir, mock, server)
}

#[test]
fn jwks_is_cached_for_less_than_an_access_token_lives() {
    let (_keys_dir, _mock, server) = es256_server(&[]);
    let reply = get(&server.url("/.well-known/jwks.json"), None);
    assert_eq!(reply.status, 200);
    assert!(reply
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let cache = reply.header("cache-control").expect("Cache-Control");
    let max_age: u64 = cache
        .split(',')
        .find_map(|d| d.trim().strip_prefix("max-age="))
        .expect("a max-age")
        .parse()
        .unwrap();
    // The shortest sensible rotation overlap is one access-token lifetime (5 min by
    // default): a cached key set must be refreshed within it.
    assert!(max_age > 0 && max_age <= 300, "{cache}");
    request("POST", &server.url("/.well-known/jwks.json")).assert_error(405, "method_not_allowed");
}

/// A Python with PyJWT and `cryptography`: `.ci/run`'s virtual environment, or one
/// this test makes once under target/ (`None` when it cannot).
fn pyjwt_python() -> Option<PathBuf> {
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-c", "import jwt, cryptography"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // The shared one `.ci/run` prepares (with schemathesis), when it is there.
    let shared = std::env::var_os("TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv"));
    if ready(&shared.join("bin/python")) {
        return Some(shared.join("bin/python"));
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pyjwt-venv");
    let python = venv.join("bin/python");
    if ready(&python) {
        return Some(python);
    }
    // Only the PyJWT test uses it; a venv left half-built by an interrupted run is
    // made again.
    let _ = std::fs::remove_dir_all(&venv);
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .is_ok_and(|o| o.status.success());
    if !made {
        return None;
    }
    let installed = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "pyjwt", "cryptography"])
        .output();
    match installed {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            eprintln!(
                "pip install failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Err(_) => return None,
    }
    ready(&python).then_some(python)
}

/// PyJWT, an independent implementation, fetches our JWKS with `PyJWKClient`, picks
/// the key by the token's `kid`, and verifies a fresh access token with it.
#[test]
fn pyjwt_verifies_a_fresh_token_with_the_published_keys() {
    let test = "pyjwt_verifies_a_fresh_token_with_the_published_keys";
    let Some(python) = pyjwt_python() else {
        return missing_tool(
            test,
            "no python3 venv with pyjwt and cryptography (pip install)",
        );
    };
    let script = r#"
import json, sys, jwt
url, token = sys.argv[1], sys.argv[2]
key = jwt.PyJWKClient(url, cache_keys=False).get_signing_key_from_jwt(token)
claims = jwt.decode(token, key.key, algorithms=[key.algorithm_name])
print(json.dumps({"kid": key.key_id, "alg": key.algorithm_name, "claims": claims}))
"#;
    let keys_dir = tempfile::tempdir().unwrap();
    for algorithm in ["ES256", "EdDSA", "RS256"] {
        let Some(key) = key_file(keys_dir.path(), algorithm, &format!("{algorithm}.pem")) else {
            missing_tool(test, "openssl is missing (RS256)");
            continue;
        };
        let mock = MockWeChat::start();
        let server = TestServer::start(
            TestConfig::against(&mock)
                .with_env("WXAUTH_JWT__ALGORITHM", algorithm)
                .with_env("WXAUTH_JWT__SIGNING_KEY_FILE", key.to_str().unwrap()),
        );
        // After a rotation, so that PyJWT must choose by kid among two keys.
        if algorithm != "RS256" {
            let rotated = keys_cli(&server, &["rotate"]);
            keys_cli(&server, &["activate", rotated[0]["kid"].as_str().unwrap()]);
        }
        let body = login(&server, "ok:pyjwt.user");
        let access = body["access"].as_str().unwrap();
        let out = Command::new(&python)
            .args(["-c", script, &server.url("/.well-known/jwks.json"), access])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{algorithm}: PyJWT refused the token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let verified: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(verified["kid"], kid_of(access), "{algorithm}");
        assert_eq!(verified["alg"], algorithm);
        assert_eq!(verified["claims"]["user_id"], body["user"]["id"]);
        assert_eq!(verified["claims"]["token_type"], "access");
    }
}

/// A JWKS client as a long-lived process: it fetches the key set once at start (or
/// at its first token), then reads one token a line and answers `ok KID` or
/// `error …`, with whatever caching and refetch rules its library has.
struct JwksClient {
    name: &'static str,
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl JwksClient {
    fn start(name: &'static str, mut command: Command) -> JwksClient {
        use std::process::Stdio;
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start the {name} client: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        JwksClient {
            name,
            child,
            stdin,
            stdout,
        }
    }

    /// Verifies `token`: `Ok(kid)` or the library's refusal.
    fn verify(&mut self, token: &str) -> Result<String, String> {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{token}").expect("write to the client");
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read the client");
        match line.trim().split_once(' ') {
            Some(("ok", kid)) => Ok(kid.to_string()),
            _ => Err(format!("{}: {}", self.name, line.trim())),
        }
    }
}

impl Drop for JwksClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PyJWT's `PyJWKClient` with its defaults (a 300 s cache, a refetch on an unknown
/// kid at most every 30 s), fetching the key set at once.
const PYJWT_CLIENT: &str = r#"
import sys, jwt
client = jwt.PyJWKClient(sys.argv[1])
client.get_jwk_set()
for line in sys.stdin:
    token = line.strip()
    try:
        key = client.get_signing_key_from_jwt(token)
        jwt.decode(token, key.key, algorithms=[key.algorithm_name], options={"verify_aud": False})
        print("ok", key.key_id, flush=True)
    except Exception as e:
        print("error", type(e).__name__, str(e).replace("\n", " "), flush=True)
"#;

/// jose's `createRemoteJWKSet` with its defaults (a 10 min cache, a refetch on an
/// unknown kid at most every 30 s); it fetches at its first token.
const JOSE_CLIENT: &str = r#"
import { createRemoteJWKSet, jwtVerify, decodeProtectedHeader } from "jose";
import readline from "node:readline";
const keys = createRemoteJWKSet(new URL(process.argv[2]));
const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  const token = line.trim();
  try {
    await jwtVerify(token, keys);
    console.log("ok " + decodeProtectedHeader(token).kid);
  } catch (e) {
    console.log("error " + e.code + " " + String(e.message).replace(/\n/g, " "));
  }
}
"#;

/// Publish first, sign later: real JWKS clients that fetched the key set before a
/// rotation verify every token issued after it, the new key's included. The new key
/// is published at once and signs only after `jwt.jwks_max_age` (32 s here, just
/// over both libraries' 30 s refetch cooldown); a key that signed at once would be
/// refused by both until their cooldown ran out.
#[test]
fn clients_that_fetched_the_jwks_before_a_rotation_verify_every_token_after_it() {
    let test = "clients_that_fetched_the_jwks_before_a_rotation_verify_every_token_after_it";
    let (_keys_dir, _mock, server) = es256_server(&[("WXAUTH_JWT__JWKS_MAX_AGE", "32s")]);
    let url = server.url("/.well-known/jwks.json");
    let first = login(&server, "ok:jwks.client");
    let k1 = kid_of(first["access"].as_str().unwrap());

    let mut clients = Vec::new();
    match tools::venv_python_with(&["jwt", "cryptography"]) {
        Some(python) => {
            let mut command = Command::new(python);
            command.args(["-c", PYJWT_CLIENT, &url]);
            clients.push(JwksClient::start("PyJWT PyJWKClient", command));
        }
        None => tools::skip(
            test,
            "no PyJWT in the test venv (pip install 'pyjwt[crypto]')",
        ),
    }
    if let Some(dir) = tools::npm_packages(test, "jose", &["jose@6"]) {
        let script = dir.join("jwks-client.mjs");
        std::fs::write(&script, JOSE_CLIENT).unwrap();
        let mut command = Command::new("node");
        command.arg(&script).arg(&url);
        clients.push(JwksClient::start("jose createRemoteJWKSet", command));
    }
    if clients.is_empty() {
        return;
    }
    // Each client has the key set from before the rotation.
    for client in &mut clients {
        assert_eq!(
            client.verify(first["access"].as_str().unwrap()),
            Ok(k1.clone())
        );
    }

    let rotated = keys_cli(&server, &["rotate"]);
    let k2 = rotated[0]["kid"].as_str().unwrap().to_string();
    assert_eq!(published_kids(&server, "ES256"), kids(&[&k1, &k2]));
    // Every token issued from the rotation on verifies at every client, until (and
    // after) the new key signs by itself.
    let mut n = 0;
    let mut after_switch = 0;
    wait_for(Duration::from_secs(120), "the new key to sign", || {
        n += 1;
        let pair = login(&server, &format!("ok:jwks.client{n}"));
        let access = pair["access"].as_str().unwrap();
        let kid = kid_of(access);
        for client in &mut clients {
            assert_eq!(client.verify(access), Ok(kid.clone()), "token {n}");
        }
        if kid == k2 {
            after_switch += 1;
        } else {
            assert_eq!(kid, k1);
            std::thread::sleep(Duration::from_millis(250));
        }
        (after_switch >= 3).then_some(())
    });
    assert_eq!(listed(&server).0, k2);
}
