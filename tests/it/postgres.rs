//! `storage.backend = "postgres"` against a real PostgreSQL (common::postgres): the
//! schema's migrations, TLS to the database, and the storage operations' rules when
//! two nodes (two stores, each with its own pool) race on one database.

use crate::common::postgres::{cluster, PgCluster};
use std::sync::{Arc, Barrier};
use wxauth::config::{StorageBackend, StorageConfig};
use wxauth::secret::SessionKey;
use wxauth::storage::model::{
    AuthStore, FamilyId, LoginRequest, LoginResult, RotateOutcome, RotateRequest,
    StartFamilyRequest, StartFamilyResult,
};
use wxauth::storage::postgres::PgStore;
use wxauth::wechat::Session;

fn storage_config(url: &str) -> StorageConfig {
    StorageConfig {
        backend: StorageBackend::Postgres,
        postgres: Some(wxauth::postgres_url::parse(url).expect("a test URL")),
        ..StorageConfig::default()
    }
}

fn open(url: &str) -> PgStore {
    PgStore::open(&storage_config(url)).expect("open the PostgreSQL store")
}

/// Runs futures to completion on a runtime of the test's own (the store's futures
/// run on the store's runtime; this one only waits).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn login_request(openid: &str) -> LoginRequest {
    LoginRequest {
        appid: "wxapp".into(),
        session: Session {
            openid: openid.into(),
            unionid: None,
            session_key: SessionKey::new("c2Vzc2lvbmtleQ=="),
        },
        link_by_unionid: false,
        family: FamilyId::random(),
        family_exp: now_ms() / 1000 + 86_400,
        now_ms: now_ms(),
    }
}

#[test]
fn two_nodes_starting_at_once_migrate_once() {
    let Some(pg) = cluster("two_nodes_starting_at_once_migrate_once") else {
        return;
    };
    let url = pg.create_database();
    let barrier = Arc::new(Barrier::new(4));
    let nodes: Vec<_> = (0..4)
        .map(|_| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                PgStore::open(&storage_config(&url)).map(|_| ())
            })
        })
        .collect();
    for node in nodes {
        node.join().unwrap().expect("every node starts");
    }
    let db = PgCluster::database_of(&url);
    let applied = pg.psql(
        db,
        "SELECT string_agg(version::text, ',' ORDER BY version) FROM wxauth_schema_migrations",
    );
    let expected: Vec<String> = (1..=wxauth::storage::postgres::latest_schema())
        .map(|v| v.to_string())
        .collect();
    assert_eq!(applied, expected.join(","), "each migration recorded once");
}

#[test]
fn a_database_newer_than_the_binary_is_refused_with_a_reason() {
    let Some(pg) = cluster("a_database_newer_than_the_binary_is_refused_with_a_reason") else {
        return;
    };
    let url = pg.create_database();
    drop(open(&url));
    let db = PgCluster::database_of(&url);
    pg.psql(
        db,
        "INSERT INTO wxauth_schema_migrations (version, name) VALUES (999, 'from the future')",
    );
    let err = PgStore::open(&storage_config(&url))
        .err()
        .expect("a newer schema is refused");
    let text = wxauth::cause::cause_chain(&err);
    assert!(
        text.contains("version 999") && text.contains("newer than this wxauth"),
        "{text}"
    );
}

/// The wxauth connections the server sees, and whether each uses TLS.
fn wxauth_connections_tls(pg: &PgCluster, db: &str) -> Vec<bool> {
    pg.psql(
        "postgres",
        &format!(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'wxauth' AND a.datname = '{db}'"
        ),
    )
    .lines()
    .map(|l| l == "t")
    .collect()
}

#[test]
fn tls_require_and_verify_full_connect_and_a_wrong_ca_is_refused() {
    let Some(pg) = cluster("tls_require_and_verify_full_connect_and_a_wrong_ca_is_refused") else {
        return;
    };
    let db_url = pg.create_database();
    let db = PgCluster::database_of(&db_url).to_string();
    let ca = pg.ca_file().display().to_string();
    for params in [
        "sslmode=require".to_string(),
        format!("sslmode=verify-ca&sslrootcert={ca}"),
        format!("sslmode=verify-full&sslrootcert={ca}"),
    ] {
        let store = open(&pg.url(&db, &params));
        store.wait(store.probe()).expect(&params);
        let tls = wxauth_connections_tls(pg, &db);
        assert!(
            !tls.is_empty() && tls.iter().all(|&t| t),
            "{params}: {tls:?}"
        );
        drop(store);
    }
    // verify-full checks the name: "localhost" is in the certificate too.
    let by_name = format!(
        "postgres://postgres@localhost:{}/{db}?sslmode=verify-full&sslrootcert={ca}",
        pg.port
    );
    let store = open(&by_name);
    store.wait(store.probe()).expect("verify-full by name");
    drop(store);
    // The Mozilla roots do not lead to the test CA: refused, and the error says why.
    let err = PgStore::open(&storage_config(
        &pg.url(&db, "sslmode=verify-full&sslrootcert=system"),
    ))
    .err()
    .expect("an unknown CA is refused");
    let text = wxauth::cause::cause_chain(&err);
    assert!(
        text.to_lowercase().contains("certificate") || text.contains("UnknownIssuer"),
        "{text}"
    );
}

#[test]
fn sixty_four_concurrent_first_logins_of_one_openid_on_two_nodes_make_one_user() {
    let Some(pg) =
        cluster("sixty_four_concurrent_first_logins_of_one_openid_on_two_nodes_make_one_user")
    else {
        return;
    };
    let url = pg.create_database();
    let nodes = [open(&url), open(&url)];
    let results = block_on(futures_util::future::join_all(
        (0..64).map(|i| nodes[i % 2].login(login_request("o_race"))),
    ));
    let mut ids = std::collections::BTreeSet::new();
    let mut created = 0;
    for result in results {
        match result.expect("every login succeeds") {
            LoginResult::LoggedIn {
                user,
                created: c,
                family,
                ..
            } => {
                ids.insert(user.id);
                created += usize::from(c);
                assert_eq!(family.generation, 1);
            }
            LoginResult::Disabled => panic!("not disabled"),
        }
    }
    assert_eq!(ids.len(), 1, "one user: {ids:?}");
    assert_eq!(created, 1, "created once");
    let db = PgCluster::database_of(&url);
    assert_eq!(pg.psql(db, "SELECT count(*) FROM wxauth_users"), "1");
    assert_eq!(pg.psql(db, "SELECT count(*) FROM wxauth_families"), "64");
}

fn logged_in(result: LoginResult) -> (wxauth::users::User, wxauth::storage::model::FamilyRecord) {
    match result {
        LoginResult::LoggedIn { user, family, .. } => (user, family),
        LoginResult::Disabled => panic!("disabled"),
    }
}

#[test]
fn one_of_twenty_concurrent_rotations_on_two_nodes_wins_and_the_rest_follow_the_grace_rule() {
    let Some(pg) = cluster(
        "one_of_twenty_concurrent_rotations_on_two_nodes_wins_and_the_rest_follow_the_grace_rule",
    ) else {
        return;
    };
    let url = pg.create_database();
    let nodes = [open(&url), open(&url)];
    for grace_ms in [0, 60_000] {
        let (user, family) =
            logged_in(block_on(nodes[0].login(login_request("o_rotate"))).unwrap());
        let request = RotateRequest {
            user_id: user.id,
            family: family.id,
            presented: 1,
            now_ms: now_ms(),
            grace_ms,
            exp: family.exp + 10,
        };
        let outcomes: Vec<RotateOutcome> = block_on(futures_util::future::join_all(
            (0..20).map(|i| nodes[i % 2].rotate(request)),
        ))
        .into_iter()
        .map(|r| r.expect("every rotation answers"))
        .collect();
        let rotated = outcomes
            .iter()
            .filter(|o| **o == RotateOutcome::Rotated { generation: 2 })
            .count();
        assert_eq!(rotated, 1, "grace {grace_ms}: {outcomes:?}");
        // Without the grace the others are reuses: the first to see one revokes the
        // family, the later ones find it revoked. With it, each is a retry.
        let others: &[RotateOutcome] = if grace_ms == 0 {
            &[RotateOutcome::Reused, RotateOutcome::Revoked]
        } else {
            &[RotateOutcome::Retry { generation: 2 }]
        };
        assert!(
            outcomes
                .iter()
                .all(|o| *o == RotateOutcome::Rotated { generation: 2 } || others.contains(o)),
            "grace {grace_ms}: {outcomes:?}"
        );
        let stored = block_on(nodes[1].family(user.id, family.id))
            .unwrap()
            .expect("the family");
        assert_eq!(stored.generation, 2);
        assert_eq!(
            stored.exp,
            family.exp + 10,
            "the expiry follows the rotation"
        );
        assert_eq!(stored.is_revoked(), grace_ms == 0, "a reuse revokes");
    }
}

#[test]
fn the_other_rotation_answers_and_the_user_operations() {
    let Some(pg) = cluster("the_other_rotation_answers_and_the_user_operations") else {
        return;
    };
    let url = pg.create_database();
    let store = open(&url);
    let (user, family) = logged_in(block_on(store.login(login_request("o_ops"))).unwrap());
    let rotate = |presented, now_ms| {
        block_on(store.rotate(RotateRequest {
            user_id: user.id,
            family: family.id,
            presented,
            now_ms,
            grace_ms: 1_000,
            exp: family.exp,
        }))
        .unwrap()
    };
    let t = now_ms();
    assert_eq!(rotate(3, t), RotateOutcome::Ahead);
    assert_eq!(rotate(1, t), RotateOutcome::Rotated { generation: 2 });
    assert_eq!(rotate(1, t + 1_000), RotateOutcome::Retry { generation: 2 });
    assert_eq!(
        rotate(1, t + 1_001),
        RotateOutcome::Reused,
        "after the grace"
    );
    assert_eq!(rotate(2, t + 1_002), RotateOutcome::Revoked);
    let missing = block_on(store.rotate(RotateRequest {
        user_id: user.id,
        family: FamilyId::random(),
        presented: 1,
        now_ms: t,
        grace_ms: 0,
        exp: 0,
    }))
    .unwrap();
    assert_eq!(missing, RotateOutcome::Missing);

    // Logout revokes once; the user's families are listed in family-id order.
    let (_, second) = logged_in(block_on(store.login(login_request("o_ops"))).unwrap());
    assert!(block_on(store.revoke_family(user.id, second.id, t)).unwrap());
    assert!(!block_on(store.revoke_family(user.id, second.id, t)).unwrap());
    let families = block_on(store.families(user.id)).unwrap();
    let mut ids: Vec<FamilyId> = vec![family.id, second.id];
    ids.sort();
    assert_eq!(families.iter().map(|f| f.id).collect::<Vec<_>>(), ids);

    // Revoke bumps the stamp; a disabled user cannot log in and nothing is written.
    let revoked = block_on(store.revoke_tokens(user.id)).unwrap().unwrap();
    assert_eq!(revoked.token_stamp, user.token_stamp + 1);
    assert!(
        block_on(store.set_disabled(user.id, true))
            .unwrap()
            .unwrap()
            .disabled
    );
    assert!(matches!(
        block_on(store.login(login_request("o_ops"))).unwrap(),
        LoginResult::Disabled
    ));
    assert_eq!(block_on(store.families(user.id)).unwrap().len(), 2);
    assert!(block_on(store.set_disabled(9_999_999, true))
        .unwrap()
        .is_none());

    // The purge deletes expired families only.
    let cutoff = family.exp.max(second.exp) + 1;
    let purged = block_on(store.purge_expired(cutoff, None, 1_000)).unwrap();
    assert_eq!(purged.deleted, 2);
    assert!(purged.next.is_none());
    assert!(block_on(store.families(user.id)).unwrap().is_empty());

    // The access-token record round-trips.
    block_on(store.put_access_token("wxapp", b"{\"token\":1}".to_vec())).unwrap();
    block_on(store.put_access_token("wxapp", b"{\"token\":2}".to_vec())).unwrap();
    assert_eq!(
        block_on(store.access_token("wxapp")).unwrap().as_deref(),
        Some(b"{\"token\":2}".as_slice())
    );
}

// ---- Nodes: the real binary, two processes on one database ----

use crate::common::{bearer, get, post_json, wait_for, MockWeChat, Reply, TestConfig, TestServer};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// The HMAC key every node of a test signs with (keys in the database come later:
/// until then nodes share a key file).
fn shared_key_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("signing.key");
    std::fs::write(
        &path,
        "a-test-signing-key-shared-by-every-node-0123456789abcdef",
    )
    .unwrap();
    path
}

/// A wxauth node on the database `url`. `jwt` is the `[jwt]` table's body.
fn node(mock: &MockWeChat, url: &str, key_file: &Path, jwt: &str) -> TestServer {
    TestServer::start(
        TestConfig::against(mock)
            .with_toml(&format!(
                "\n[jwt]\nsigning_key_file = {:?}\n{jwt}\n",
                key_file.display().to_string()
            ))
            .with_env("WXAUTH_STORAGE__BACKEND", "postgres")
            .with_env("WXAUTH_STORAGE__POSTGRES_URL", url),
    )
}

/// Two nodes on one fresh database, and the mock WeChat they share.
fn two_nodes(
    pg: &PgCluster,
    jwt: &str,
) -> (MockWeChat, tempfile::TempDir, [TestServer; 2], String) {
    let url = pg.create_database();
    let mock = MockWeChat::start();
    let keys = tempfile::tempdir().unwrap();
    let key_file = shared_key_file(keys.path());
    let a = node(&mock, &url, &key_file, jwt);
    let b = node(&mock, &url, &key_file, jwt);
    (mock, keys, [a, b], url)
}

#[test]
fn sixty_four_concurrent_first_logins_over_two_nodes_make_one_user() {
    let Some(pg) = cluster("sixty_four_concurrent_first_logins_over_two_nodes_make_one_user")
    else {
        return;
    };
    let (_mock, _keys, nodes, url) = two_nodes(pg, "");
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let url = nodes[i % 2].url("/api/weixin/login/");
                s.spawn(move || post_json(&url, &json!({ "code": format!("ok:jill.{i}") })))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let bodies: Vec<Value> = replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{}", r.text);
            r.json()
        })
        .collect();
    let first = &bodies[0]["user"]["id"];
    assert!(bodies.iter().all(|b| &b["user"]["id"] == first), "one user");
    let created = bodies
        .iter()
        .filter(|b| b["user"]["created"] == true)
        .count();
    assert_eq!(created, 1, "exactly one login created the user");
    let db = PgCluster::database_of(&url);
    assert_eq!(pg.psql(db, "SELECT count(*) FROM wxauth_users"), "1");
    // A token from either node works on the other.
    let access = bodies[0]["access"].as_str().unwrap();
    for node in &nodes {
        let data = get(&node.url("/api/weixin/data/"), Some(&bearer(access)));
        assert_eq!(data.status, 200, "{}", data.text);
    }
}

#[test]
fn twenty_concurrent_refreshes_of_one_token_over_two_nodes_with_grace_0_give_one_200() {
    let Some(pg) = cluster(
        "twenty_concurrent_refreshes_of_one_token_over_two_nodes_with_grace_0_give_one_200",
    ) else {
        return;
    };
    let (_mock, _keys, nodes, _url) = two_nodes(pg, "reuse_grace = \"0s\"");
    let login = crate::common::login(&nodes[0], "ok:rita");
    let refresh = login["refresh"].as_str().unwrap().to_string();
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let url = nodes[i % 2].url("/api/token/refresh/");
                let refresh = refresh.clone();
                s.spawn(move || post_json(&url, &json!({ "refresh": refresh })))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(
        ok,
        1,
        "exactly one 200: {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for reply in replies.iter().filter(|r| r.status != 200) {
        reply.assert_error(401, "token_not_valid");
    }
}

#[test]
fn a_disable_through_the_cli_refuses_the_users_token_on_every_node_within_a_second() {
    let Some(pg) =
        cluster("a_disable_through_the_cli_refuses_the_users_token_on_every_node_within_a_second")
    else {
        return;
    };
    let (_mock, _keys, nodes, _url) = two_nodes(pg, "");
    let login = crate::common::login(&nodes[0], "ok:sam");
    let id = login["user"]["id"].as_u64().unwrap().to_string();
    let access = bearer(login["access"].as_str().unwrap());
    // Both nodes have the user cached now.
    for node in &nodes {
        let data = get(&node.url("/api/weixin/data/"), Some(&access));
        assert_eq!(data.status, 200, "{}", data.text);
    }
    // The CLI works on the database directly (no node needed).
    let out = nodes[0].cli(&["users", "disable", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for node in &nodes {
        wait_for(
            Duration::from_secs(1),
            "the disable to reach the node",
            || {
                let data = get(&node.url("/api/weixin/data/"), Some(&access));
                (data.status == 401).then_some(data)
            },
        )
        .assert_error(401, "user_inactive");
    }
    // And back.
    let out = nodes[1].cli(&["users", "enable", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for node in &nodes {
        wait_for(
            Duration::from_secs(1),
            "the enable to reach the node",
            || {
                let data = get(&node.url("/api/weixin/data/"), Some(&access));
                (data.status == 200).then_some(())
            },
        );
    }
}

/// A node that signs with the database's generated key (no key file configured).
/// A node on `url` whose rotated keys sign at once (`jwt.jwks_max_age = 0s`): here
/// the point is that every node follows the database's key ring; publishing before
/// signing is tested in `keys`.
fn node_with_database_keys(mock: &MockWeChat, url: &str) -> TestServer {
    TestServer::start(
        TestConfig::against(mock)
            .with_env("WXAUTH_STORAGE__BACKEND", "postgres")
            .with_env("WXAUTH_STORAGE__POSTGRES_URL", url)
            .with_env("WXAUTH_JWT__JWKS_MAX_AGE", "0s"),
    )
}

fn two_nodes_with_database_keys(mock: &MockWeChat, url: &str) -> [TestServer; 2] {
    [
        node_with_database_keys(mock, url),
        node_with_database_keys(mock, url),
    ]
}

fn kid_of(token: &str) -> String {
    crate::common::jwt_parts(token).0["kid"]
        .as_str()
        .expect("a kid")
        .to_string()
}

#[test]
fn nodes_share_the_generated_key_and_keys_rotate_and_retire_reach_every_node() {
    let Some(pg) =
        cluster("nodes_share_the_generated_key_and_keys_rotate_and_retire_reach_every_node")
    else {
        return;
    };
    let url = pg.create_database();
    let mock = MockWeChat::start();
    let nodes = two_nodes_with_database_keys(&mock, &url);
    let first = crate::common::login(&nodes[0], "ok:kim.0");
    let old_access = first["access"].as_str().unwrap().to_string();
    let old_kid = kid_of(&old_access);
    let second = crate::common::login(&nodes[1], "ok:kim.1");
    assert_eq!(
        kid_of(second["access"].as_str().unwrap()),
        old_kid,
        "one key"
    );
    for node in &nodes {
        let data = get(&node.url("/api/weixin/data/"), Some(&bearer(&old_access)));
        assert_eq!(data.status, 200, "{}", data.text);
    }

    let out = nodes[0].cli(&["keys", "rotate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: Value = serde_json::from_slice(
        out.stdout
            .split(|&b| b == b'\n')
            .find(|line| line.starts_with(b"{") && !line.windows(12).any(|w| w == b"wxauth_admin"))
            .expect("the new key"),
    )
    .unwrap();
    let new_kid = made["kid"].as_str().expect("its kid").to_string();
    assert_ne!(new_kid, old_kid);
    // A rotated key is published first and signs after `jwt.jwks_max_age`; activate it
    // now (through the other node's CLI: the ring is the database's).
    let out = nodes[1].cli(&["keys", "activate", &new_kid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let codes = std::sync::atomic::AtomicUsize::new(2);
    for node in &nodes {
        wait_for(
            Duration::from_secs(5),
            "the node to sign with the new key",
            || {
                let n = codes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let login = crate::common::login(node, &format!("ok:kim.{n}"));
                (kid_of(login["access"].as_str().unwrap()) == new_kid).then_some(())
            },
        );
        let data = get(&node.url("/api/weixin/data/"), Some(&bearer(&old_access)));
        assert_eq!(
            data.status, 200,
            "the old key still verifies: {}",
            data.text
        );
    }

    let out = nodes[1].cli(&["keys", "retire", &old_kid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for node in &nodes {
        wait_for(
            Duration::from_secs(5),
            "the retirement to reach the node",
            || {
                let data = get(&node.url("/api/weixin/data/"), Some(&bearer(&old_access)));
                (data.status == 401).then_some(())
            },
        );
    }
}

/// Runs the CLI with `config`, the environment `env` on top.
fn cli_with(config: &Path, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wxauth"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("run wxauth");
    assert!(
        out.status.success(),
        "wxauth {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn refresh(node: &TestServer, token: &str) -> Value {
    let reply = post_json(
        &node.url("/api/token/refresh/"),
        &json!({ "refresh": token }),
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()
}

#[test]
fn backup_and_restore_move_a_team_from_sled_to_postgres_and_back_with_tokens_valid() {
    let Some(pg) =
        cluster("backup_and_restore_move_a_team_from_sled_to_postgres_and_back_with_tokens_valid")
    else {
        return;
    };
    let mock = MockWeChat::start();
    // One sled node: a login and a rotation.
    let mut sled = TestServer::start(TestConfig::against(&mock));
    let login = crate::common::login(&sled, "ok:lee");
    let id = login["user"]["id"].clone();
    let access = bearer(login["access"].as_str().unwrap());
    let refreshed = refresh(&sled, login["refresh"].as_str().unwrap());
    let backup = sled.dir.path().join("from-sled.jsonl");
    let out = sled.cli(&["backup", backup.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sled.terminate();

    // Into PostgreSQL, before its nodes start; then two nodes.
    let url = pg.create_database();
    let to_pg = [
        ("WXAUTH_STORAGE__BACKEND", "postgres"),
        ("WXAUTH_STORAGE__POSTGRES_URL", url.as_str()),
    ];
    cli_with(&sled.config, &to_pg, &["restore", backup.to_str().unwrap()]);
    let nodes = two_nodes_with_database_keys(&mock, &url);
    for node in &nodes {
        let data = get(&node.url("/api/weixin/data/"), Some(&access));
        assert_eq!(
            data.status, 200,
            "the sled node's access token: {}",
            data.text
        );
        assert_eq!(data.json()["user"]["id"], id);
    }
    let on_pg = refresh(&nodes[1], refreshed["refresh"].as_str().unwrap());
    let next = crate::common::login(&nodes[0], "ok:nia");
    assert_eq!(
        next["user"]["id"].as_u64().unwrap(),
        id.as_u64().unwrap() + 1,
        "ids go on after the restored ones"
    );

    // And back: a backup of the database restores into a new sled directory.
    let back = sled.dir.path().join("from-postgres.jsonl");
    let out = nodes[0].cli(&["backup", back.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(nodes);
    std::fs::remove_dir_all(sled.data_dir()).unwrap();
    cli_with(&sled.config, &[], &["restore", back.to_str().unwrap()]);
    sled.restart();
    let data = get(&sled.url("/api/weixin/data/"), Some(&access));
    assert_eq!(data.status, 200, "{}", data.text);
    refresh(&sled, on_pg["refresh"].as_str().unwrap());
    let data = get(
        &sled.url("/api/weixin/data/"),
        Some(&bearer(next["access"].as_str().unwrap())),
    );
    assert_eq!(data.status, 200, "a user made on PostgreSQL: {}", data.text);
}

/// What the load of the outage test saw: every answer, and what must hold after.
#[derive(Default)]
struct OutageLoad {
    /// Answers other than 200, 503 and 429 (must stay empty), as `what: status body`.
    unexpected: Vec<String>,
    /// Ids of the users whose login was answered 200.
    logged_in: Vec<u64>,
    /// 503s of logins and refreshes (each must be `service_unavailable` with
    /// `Retry-After`), and the 200s.
    refused: Vec<Reply>,
    answered: usize,
    /// Each chain's last refresh token answered 200, and whether a 503 of a request
    /// presenting it left unknown whether its rotation committed.
    chains: Vec<(String, bool)>,
}

/// How many of the users `ids` are in the database at `url` with a session.
fn users_with_a_session(pg: &PgCluster, url: &str, ids: &[u64]) -> String {
    let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
    pg.psql(
        PgCluster::database_of(url),
        &format!(
            "SELECT count(DISTINCT u.id) FROM wxauth_users u JOIN wxauth_families f \
             ON f.user_id = u.id WHERE u.id IN ({})",
            ids.join(",")
        ),
    )
}

/// Sets its flag when dropped, a panic's unwinding included.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One client of the outage test on `node` until `stop`: logs in, then refreshes
/// its token over and over (a 503 is tried again with the same token; every 16
/// rotations, a new login).
fn outage_client(
    node: &TestServer,
    client: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> OutageLoad {
    use std::sync::atomic::Ordering::SeqCst;
    let mut seen = OutageLoad::default();
    let mut n = 0;
    while !stop.load(SeqCst) {
        n += 1;
        let login = post_json(
            &node.url("/api/weixin/login/"),
            &json!({ "code": format!("ok:load{client}x{n}.c") }),
        );
        seen.note("login", &login);
        if login.status != 200 {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let body = login.json();
        seen.logged_in.push(body["user"]["id"].as_u64().unwrap());
        let mut token = body["refresh"].as_str().unwrap().to_string();
        let mut unknown = false;
        let mut rotations = 0;
        while rotations < 16 && !stop.load(SeqCst) {
            let reply = post_json(
                &node.url("/api/token/refresh/"),
                &json!({ "refresh": token }),
            );
            match reply.status {
                200 => {
                    seen.note("refresh", &reply);
                    token = reply.json()["refresh"].as_str().unwrap().to_string();
                    unknown = false;
                    rotations += 1;
                }
                503 => {
                    seen.note("refresh", &reply);
                    unknown = true;
                    std::thread::sleep(Duration::from_millis(50));
                }
                // The answer was lost, perhaps after the commit: with no grace the
                // same token is then a reuse (the rule, not a loss). The chain ends.
                401 if unknown => break,
                _ => {
                    seen.note("refresh", &reply);
                    break;
                }
            }
        }
        seen.chains.push((token, unknown));
    }
    seen
}

impl OutageLoad {
    fn note(&mut self, what: &str, reply: &Reply) {
        match reply.status {
            200 => self.answered += 1,
            503 => self.refused.push(Reply {
                status: reply.status,
                headers: reply.headers.clone(),
                text: reply.text.clone(),
            }),
            429 => {}
            _ => self
                .unexpected
                .push(format!("{what}: {} {}", reply.status, reply.text)),
        }
    }
}

#[test]
fn stopping_the_database_for_5_s_under_load_gives_503s_loses_nothing_and_cached_users_are_served_within_the_bound(
) {
    let Some(pg) = crate::common::postgres::private_cluster(
        "stopping_the_database_for_5_s_under_load_gives_503s_loses_nothing_and_cached_users_are_served_within_the_bound",
    ) else {
        return;
    };
    // Cached users are served for 2 s after a node loses its notification
    // connection (storage.postgres_stale_for), shorter than the outage, so that both
    // sides of the bound are seen.
    let bound = Duration::from_secs(2);
    let url = pg.create_database();
    let mock = MockWeChat::start();
    let start_node = || {
        TestServer::start(
            TestConfig::against(&mock)
                .with_env("WXAUTH_STORAGE__BACKEND", "postgres")
                .with_env("WXAUTH_STORAGE__POSTGRES_URL", &url)
                .with_env("WXAUTH_STORAGE__POSTGRES_STALE_FOR", "2s")
                .with_env("WXAUTH_JWT__REUSE_GRACE", "0s"),
        )
    };
    let nodes = [start_node(), start_node()];
    // Users cached on both nodes before the outage.
    let cached: Vec<String> = (0..4)
        .map(|i| {
            let login = crate::common::login(&nodes[i % 2], &format!("ok:cached{i}.c"));
            bearer(login["access"].as_str().unwrap())
        })
        .collect();
    for node in &nodes {
        for access in &cached {
            let data = get(&node.url("/api/weixin/data/"), Some(access));
            assert_eq!(data.status, 200, "{}", data.text);
        }
        assert_eq!(get(&node.url("/readyz"), None).status, 200);
    }

    let stop = std::sync::atomic::AtomicBool::new(false);
    let loads: Vec<OutageLoad> = std::thread::scope(|s| {
        // A failed assertion below stops the clients too (the scope waits for them).
        let _stop_clients = StopOnDrop(&stop);
        let clients: Vec<_> = (0..6)
            .map(|c| {
                let (node, stop) = (&nodes[c % 2], &stop);
                s.spawn(move || outage_client(node, c, stop))
            })
            .collect();
        wait_for(Duration::from_secs(30), "the load to get going", || {
            (mock.requests() >= 20).then_some(())
        });

        // Cached now (a reconnect of a node's channel under load empties its cache).
        for node in &nodes {
            for access in &cached {
                let data = get(&node.url("/api/weixin/data/"), Some(access));
                assert_eq!(data.status, 200, "{}", data.text);
            }
        }
        let stopping = std::time::Instant::now();
        pg.stop_server();
        let stopped = std::time::Instant::now();
        // Within the bound, the cached users' data requests are answered from the
        // cache: a request answered before `stopping + bound` was checked before the
        // node's bound ended (it starts when the node notices, after `stopping`).
        let mut served_within_bound = 0;
        let mut past_bound = None;
        while past_bound.is_none() {
            for node in &nodes {
                for access in &cached {
                    let sent = std::time::Instant::now();
                    let data = get(&node.url("/api/weixin/data/"), Some(access));
                    let received = std::time::Instant::now();
                    assert!(
                        data.status == 200 || data.status == 503,
                        "data path while down: {} {}",
                        data.status,
                        data.text
                    );
                    if received < stopping + bound {
                        assert_eq!(data.status, 200, "within the bound: {}", data.text);
                        served_within_bound += 1;
                    }
                    if data.status == 503 {
                        data.assert_error(503, "service_unavailable");
                        assert!(data.header("retry-after").is_some());
                        // Past the bound a cached user is read from the database.
                        past_bound = Some(sent - stopped);
                    }
                }
            }
            assert!(
                stopped.elapsed() < Duration::from_secs(30),
                "the data path still answers from the cache 30 s into the outage"
            );
        }
        assert!(
            served_within_bound > 0,
            "no data request answered within the bound"
        );
        for node in &nodes {
            wait_for(Duration::from_secs(5), "/readyz to turn unready", || {
                (get(&node.url("/readyz"), None).status == 503).then_some(())
            });
        }
        // Down for 5 s in all.
        while stopped.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        pg.start_server();
        let back = std::time::Instant::now();
        for (i, node) in nodes.iter().enumerate() {
            wait_for(
                Duration::from_secs(5),
                "logins to work again within 5 s of the database's return",
                || {
                    let reply = post_json(
                        &node.url("/api/weixin/login/"),
                        &json!({ "code": format!("ok:back{i}x{}.c", back.elapsed().as_nanos()) }),
                    );
                    assert!(
                        reply.status == 200 || reply.status == 503,
                        "{} {}",
                        reply.status,
                        reply.text
                    );
                    (reply.status == 200).then_some(())
                },
            );
            for access in &cached {
                wait_for(
                    Duration::from_secs(5),
                    "cached users to be served again",
                    || {
                        (get(&node.url("/api/weixin/data/"), Some(access)).status == 200)
                            .then_some(())
                    },
                );
            }
        }
        // More answers after the return, then the load stops.
        let after = mock.requests();
        wait_for(Duration::from_secs(30), "the load to go on", || {
            (mock.requests() >= after + 20).then_some(())
        });
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        eprintln!("cached users served past the bound from {past_bound:?} after the stop");
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });

    let mut load = OutageLoad::default();
    for l in loads {
        load.unexpected.extend(l.unexpected);
        load.logged_in.extend(l.logged_in);
        load.refused.extend(l.refused);
        load.answered += l.answered;
        load.chains.extend(l.chains);
    }
    assert!(
        load.unexpected.is_empty(),
        "only 200, 503 and 429: {:?}",
        load.unexpected
    );
    assert!(!load.refused.is_empty(), "503s while the database was down");
    for reply in &load.refused {
        reply.assert_error(503, "service_unavailable");
        assert!(
            reply.header("retry-after").is_some(),
            "Retry-After on a 503"
        );
    }
    // Every login answered 200 is in the database, with its session.
    assert_eq!(
        users_with_a_session(&pg, &url, &load.logged_in),
        load.logged_in.len().to_string(),
        "every answered login is there"
    );
    // Every rotation answered 200 holds: each chain's last token works (and so did
    // each one before it, which the next rotation presented), and once it is
    // rotated out it is refused.
    let mut checked = 0;
    for (i, (token, unknown)) in load.chains.iter().enumerate() {
        if *unknown {
            continue;
        }
        let node = &nodes[i % 2];
        let reply = post_json(
            &node.url("/api/token/refresh/"),
            &json!({ "refresh": token }),
        );
        assert_eq!(
            reply.status, 200,
            "the last rotation answered holds: {}",
            reply.text
        );
        let again = post_json(
            &node.url("/api/token/refresh/"),
            &json!({ "refresh": token }),
        );
        again.assert_error(401, "token_not_valid");
        checked += 1;
    }
    assert!(checked > 0);
    eprintln!(
        "outage under load: {} answered, {} 503s, {} logins checked in the database, {} chains checked",
        load.answered,
        load.refused.len(),
        load.logged_in.len(),
        checked
    );
    for node in &nodes {
        // /readyz shares one probe a second: the verdict from the outage may stand that long.
        wait_for(Duration::from_secs(5), "/readyz to be 200 again", || {
            (get(&node.url("/readyz"), None).status == 200).then_some(())
        });
    }
}

#[test]
fn kill_9_of_one_node_under_login_load_loses_no_answered_login_and_the_other_serves_on() {
    let Some(pg) = cluster(
        "kill_9_of_one_node_under_login_load_loses_no_answered_login_and_the_other_serves_on",
    ) else {
        return;
    };
    let url = pg.create_database();
    let mock = MockWeChat::start();
    let mut victim = node_with_database_keys(&mock, &url);
    let survivor = node_with_database_keys(&mock, &url);
    let answered = std::sync::Mutex::new(Vec::<u64>::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let victim_url = victim.url("/api/weixin/login/");
    let survivor_url = survivor.url("/api/weixin/login/");
    std::thread::scope(|s| {
        for worker in 0..4 {
            let (answered, stop, victim_url) = (&answered, &stop, &victim_url);
            s.spawn(move || {
                for i in 0..2_000 {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let code = format!("ok:victim{worker}x{i}.c");
                    match crate::common::try_post_json(victim_url, &json!({ "code": code })) {
                        Some(reply) if reply.status == 200 => {
                            let id = reply.json()["user"]["id"].as_u64().unwrap();
                            answered.lock().unwrap().push(id);
                        }
                        Some(_) => {}
                        None => return,
                    }
                }
            });
        }
        let (answered, stop) = (&answered, &stop);
        let survivor_url = &survivor_url;
        let survivor_logins = s.spawn(move || {
            let mut ok = 0;
            for i in 0..2_000 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) && ok > 20 {
                    return ok;
                }
                let reply = post_json(
                    survivor_url,
                    &json!({ "code": format!("ok:survivor{i}.c") }),
                );
                assert_eq!(
                    reply.status, 200,
                    "the other node serves on: {}",
                    reply.text
                );
                ok += 1;
            }
            ok
        });
        wait_for(
            Duration::from_secs(30),
            "logins answered by the victim",
            || (answered.lock().unwrap().len() >= 40).then_some(()),
        );
        victim.kill9();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(survivor_logins.join().unwrap() > 20);
    });
    let answered = answered.into_inner().unwrap();
    assert_eq!(
        users_with_a_session(pg, &url, &answered),
        answered.len().to_string(),
        "every login the killed node answered is in the database, with its session"
    );
}

#[test]
fn fifty_concurrent_phone_requests_over_two_cold_nodes_make_one_stable_token_call() {
    let Some(pg) =
        cluster("fifty_concurrent_phone_requests_over_two_cold_nodes_make_one_stable_token_call")
    else {
        return;
    };
    let url = pg.create_database();
    let mock = MockWeChat::start();
    // A slow fetch, so that every request arrives while the first is under way.
    mock.set_token_delay(300);
    let nodes = two_nodes_with_database_keys(&mock, &url);
    let access = bearer(
        crate::common::login(&nodes[0], "ok:pat.0")["access"]
            .as_str()
            .unwrap(),
    );
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let (url, access) = (nodes[i % 2].url("/api/weixin/phone/"), access.clone());
                s.spawn(move || {
                    crate::common::collect(
                        crate::common::agent()
                            .post(&url)
                            .header("Authorization", &access)
                            .header("Content-Type", "application/json")
                            .send(json!({ "code": format!("ok:pat.{i}") }).to_string()),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    assert_eq!(
        mock.token_fetches(),
        (1, 0),
        "one stable_token call for both nodes"
    );
}

#[test]
fn a_token_wechat_refuses_on_two_nodes_at_once_is_force_refreshed_once() {
    let Some(pg) = cluster("a_token_wechat_refuses_on_two_nodes_at_once_is_force_refreshed_once")
    else {
        return;
    };
    let url = pg.create_database();
    let mock = MockWeChat::start();
    let nodes = two_nodes_with_database_keys(&mock, &url);
    let login = crate::common::login(&nodes[0], "ok:quin.0");
    let access = login["access"].as_str().unwrap().to_string();
    // Both nodes hold the stored token.
    for (i, node) in nodes.iter().enumerate() {
        let reply = crate::common::phone(node, &access, &format!("ok:quin.{i}"));
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    assert_eq!(mock.token_fetches(), (1, 0));
    // WeChat stops taking it (as if another holder had rotated it); a slow forced
    // fetch, so that every request meets the refusal while it is under way.
    mock.revoke_tokens();
    mock.set_token_delay(300);
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let (node, access) = (&nodes[i % 2], &access);
                s.spawn(move || crate::common::phone(node, access, &format!("ok:quin.{i}")))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    assert_eq!(
        mock.token_fetches(),
        (2, 1),
        "one forced stable_token call for both nodes"
    );
}

/// A web login's session: the family starts at generation 1 with the user's current
/// token stamp, in the database every node reads; a missing, disabled or erased user
/// gets none.
#[test]
fn a_started_family_records_the_users_stamp_and_a_refused_user_gets_none() {
    let Some(pg) = cluster("a_started_family_records_the_users_stamp") else {
        return;
    };
    let url = pg.create_database();
    let (store, other_node) = (open(&url), open(&url));
    let start = |user_id| StartFamilyRequest {
        user_id,
        family: FamilyId::random(),
        family_exp: now_ms() / 1000 + 86_400,
        now_ms: now_ms(),
    };
    assert!(matches!(
        block_on(store.start_family(start(999_999))).unwrap(),
        StartFamilyResult::Missing
    ));
    let (user, _) = logged_in(block_on(store.login(login_request("o_web"))).unwrap());
    let revoked = block_on(store.revoke_tokens(user.id)).unwrap().unwrap();
    assert_eq!(revoked.token_stamp, user.token_stamp + 1);
    let StartFamilyResult::Started { user: read, family } =
        block_on(store.start_family(start(user.id))).unwrap()
    else {
        panic!("an enabled user starts a family");
    };
    assert_eq!(read.id, user.id);
    assert_eq!(read.token_stamp, revoked.token_stamp);
    assert_eq!((family.generation, family.stamp), (1, revoked.token_stamp));
    // Committed: the other node rotates it.
    let rotated = block_on(other_node.rotate(RotateRequest {
        user_id: user.id,
        family: family.id,
        presented: 1,
        now_ms: now_ms(),
        grace_ms: 1_000,
        exp: family.exp,
    }))
    .unwrap();
    assert_eq!(rotated, RotateOutcome::Rotated { generation: 2 });

    block_on(store.set_disabled(user.id, true))
        .unwrap()
        .unwrap();
    assert!(matches!(
        block_on(store.start_family(start(user.id))).unwrap(),
        StartFamilyResult::Disabled
    ));
    let (erased, _) = logged_in(block_on(store.login(login_request("o_erased"))).unwrap());
    let t = now_ms() / 1000;
    block_on(store.delete_user(erased.id, t, t, false))
        .unwrap()
        .unwrap();
    assert!(matches!(
        block_on(store.start_family(start(erased.id))).unwrap(),
        StartFamilyResult::Disabled
    ));
}

/// The reads a token check makes on PostgreSQL (a user missing from the users cache,
/// a refresh token's user) are awaited, not waited for: with one HTTP worker, while
/// a data request's user read and a refresh's user read both wait for a lock in the
/// database, the worker still answers `/healthz` and the issuer still ends another
/// user's sessions; the two waiting requests are answered once the lock is gone.
#[test]
fn reads_waiting_on_the_database_block_neither_the_http_worker_nor_the_issuer() {
    let Some(pg) =
        cluster("reads_waiting_on_the_database_block_neither_the_http_worker_nor_the_issuer")
    else {
        return;
    };
    let url = pg.create_database();
    let db = PgCluster::database_of(&url).to_string();
    let mock = MockWeChat::start();
    let node = TestServer::start(
        TestConfig::against(&mock)
            .with_env("WXAUTH_STORAGE__BACKEND", "postgres")
            .with_env("WXAUTH_STORAGE__POSTGRES_URL", &url)
            .with_env("WXAUTH_STORAGE__POSTGRES_STATEMENT_TIMEOUT", "30s")
            .with_env("WXAUTH_STORAGE__POSTGRES_POOL_SIZE", "32")
            .with_env("WXAUTH_SERVER__WORKERS", "1"),
    );
    // A login leaves its user out of the node's cache (the next read fetches it);
    // a data request puts it in.
    let cached = crate::common::login(&node, "ok:yara");
    let cached_access = bearer(cached["access"].as_str().unwrap());
    assert_eq!(
        get(&node.url("/api/weixin/data/"), Some(&cached_access)).status,
        200
    );
    let reader = crate::common::login(&node, "ok:zoe");
    let refresher = crate::common::login(&node, "ok:xena");

    // Hold the users table: every read of it waits.
    let mut holder = std::process::Command::new(pg.program("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &url])
        .env("PGSSLMODE", "disable")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run psql");
    let mut sql = holder.stdin.take().unwrap();
    use std::io::Write;
    writeln!(
        sql,
        "BEGIN; LOCK TABLE wxauth_users IN ACCESS EXCLUSIVE MODE;"
    )
    .unwrap();
    sql.flush().unwrap();
    wait_for(Duration::from_secs(10), "the lock on wxauth_users", || {
        let held = pg.psql(
            &db,
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
             WHERE c.relname = 'wxauth_users' AND l.mode = 'AccessExclusiveLock' AND l.granted",
        );
        (held == "1").then_some(())
    });
    let waiting_user_reads = || {
        pg.psql(
            &db,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE 'SELECT % FROM wxauth_users WHERE id = $1'",
        )
    };

    std::thread::scope(|s| {
        let data = s.spawn(|| {
            get(
                &node.url("/api/weixin/data/"),
                Some(&bearer(reader["access"].as_str().unwrap())),
            )
        });
        let refreshed = s.spawn(|| {
            post_json(
                &node.url("/api/token/refresh/"),
                &json!({ "refresh": refresher["refresh"] }),
            )
        });
        wait_for(Duration::from_secs(10), "both user reads to wait", || {
            (waiting_user_reads() == "2").then_some(())
        });
        assert_eq!(get(&node.url("/healthz"), None).status, 200);
        let ended = crate::common::collect(
            crate::common::agent()
                .post(node.url("/api/weixin/sessions/logout-all/"))
                .header("Authorization", &cached_access)
                .send(""),
        );
        assert_eq!(ended.status, 200, "{}", ended.text);
        assert_eq!(
            waiting_user_reads(),
            "2",
            "both reads were still waiting while the worker and the issuer answered"
        );

        writeln!(sql, "ROLLBACK;").unwrap();
        drop(sql);
        let data = data.join().unwrap();
        assert_eq!(data.status, 200, "{}", data.text);
        let refreshed = refreshed.join().unwrap();
        assert_eq!(refreshed.status, 200, "{}", refreshed.text);
    });
    holder.wait().unwrap();
}

/// A user marked for deletion stays marked across a backup of each backend restored
/// into the other: the restored store's sweep erases the user when the mark is due.
#[test]
fn a_deletion_mark_survives_backup_and_restore_from_sled_to_postgres_and_back() {
    let test = "a_deletion_mark_survives_backup_and_restore_from_sled_to_postgres_and_back";
    let Some(pg) = cluster(test) else {
        return;
    };
    let mock = MockWeChat::start();
    let mut sled = TestServer::start(
        TestConfig::against(&mock).with_toml("\n[users]\ndeletion_delay = \"4s\"\n"),
    );
    let marked = crate::common::login(&sled, "ok:ola.1");
    let id = marked["user"]["id"].as_u64().unwrap();
    let kept = crate::common::login(&sled, "ok:pat")["user"]["id"]
        .as_u64()
        .unwrap();
    let req = ureq::http::Request::builder()
        .method("DELETE")
        .uri(sled.url("/api/weixin/user/"))
        .header("Authorization", bearer(marked["access"].as_str().unwrap()))
        .header("Content-Type", "application/json")
        .body(json!({"code": "ok:ola.2"}).to_string())
        .unwrap();
    let scheduled = crate::common::collect(crate::common::agent().run(req));
    assert_eq!(scheduled.status, 202, "{}", scheduled.text);
    let from_sled = sled.dir.path().join("marked-from-sled.jsonl");
    cli_with(&sled.config, &[], &["backup", from_sled.to_str().unwrap()]);
    sled.terminate();

    // Into PostgreSQL and straight back out, with no node running there.
    let url = pg.create_database();
    let to_pg = [
        ("WXAUTH_STORAGE__BACKEND", "postgres"),
        ("WXAUTH_STORAGE__POSTGRES_URL", url.as_str()),
    ];
    cli_with(
        &sled.config,
        &to_pg,
        &["restore", from_sled.to_str().unwrap()],
    );
    let shown = cli_with(&sled.config, &to_pg, &["users", "show", &id.to_string()]);
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert!(shown["deletion_scheduled_at"].is_string(), "{shown}");
    assert!(shown["erased_at"].is_null(), "{shown}");
    let db = PgCluster::database_of(&url);
    assert_eq!(
        pg.psql(db, "SELECT count(*) FROM wxauth_kv WHERE tree = 'meta' AND key >= 'deletion_due'::bytea AND key < 'deletion_duf'::bytea"),
        "0",
        "the mark lives in the user's row"
    );
    let from_pg = sled.dir.path().join("marked-from-postgres.jsonl");
    cli_with(&sled.config, &to_pg, &["backup", from_pg.to_str().unwrap()]);

    // Into a new sled directory: its sweep finds the mark and erases the user.
    std::fs::remove_dir_all(sled.data_dir()).unwrap();
    cli_with(&sled.config, &[], &["restore", from_pg.to_str().unwrap()]);
    sled.restart();
    let show = |id: u64| -> Value {
        crate::common::json_lines(&sled.cli(&["users", "show", &id.to_string()])).remove(0)
    };
    wait_for(
        Duration::from_secs(60),
        "the sweep to erase the marked user",
        || show(id)["erased_at"].as_str().map(str::to_string),
    );
    assert!(show(id)["openid"].is_null());
    assert_eq!(show(kept)["openid"], "o-pat", "only the marked user");

    // And the sled backup's mark reaches a database's sweep too.
    sled.terminate();
    let url = pg.create_database();
    cli_with(
        &sled.config,
        &[
            ("WXAUTH_STORAGE__BACKEND", "postgres"),
            ("WXAUTH_STORAGE__POSTGRES_URL", url.as_str()),
        ],
        &["restore", from_sled.to_str().unwrap()],
    );
    let node = node_with_database_keys(&mock, &url);
    wait_for(
        Duration::from_secs(60),
        "the database's sweep to erase the marked user",
        || {
            crate::common::json_lines(&node.cli(&["users", "show", &id.to_string()])).remove(0)
                ["erased_at"]
                .as_str()
                .map(str::to_string)
        },
    );
}
