//! The user's own account through the real binary: sessions, log out everywhere,
//! the export, the profile, and deletion (a matching fresh code, the cooling-off
//! period, erasure), with the operator's `wxauth users export|delete`.

use crate::common;

use common::backend::{on_both, Backend};
use common::mock_wechat::{phone_for, MockWeChat};
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// A mock WeChat and a server on `backend` with `users.deletion_delay = delay`.
fn start(backend: &Backend, delay: &str) -> (MockWeChat, TestServer) {
    let mock = MockWeChat::start();
    let config =
        TestConfig::against(&mock).with_toml(&format!("\n[users]\ndeletion_delay = {delay:?}\n"));
    (mock, TestServer::start(backend.configure(config)))
}

/// Any method, with an access token and a JSON body.
fn call(server: &TestServer, method: &str, path: &str, access: &str, body: Option<Value>) -> Reply {
    let req = ureq::http::Request::builder()
        .method(method)
        .uri(server.url(path))
        .header("Authorization", bearer(access))
        .header("Content-Type", "application/json")
        .body(body.map(|b| b.to_string()).unwrap_or_default())
        .expect("request");
    collect(agent().run(req))
}

fn tokens(body: &Value) -> (String, String) {
    (
        body["access"].as_str().unwrap().to_string(),
        body["refresh"].as_str().unwrap().to_string(),
    )
}

fn family_of(token: &str) -> String {
    jwt_parts(token).1["fam"].as_str().expect("fam").to_string()
}

fn refresh(server: &TestServer, refresh: &str) -> Reply {
    post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": refresh }),
    )
}

fn sessions(server: &TestServer, access: &str) -> Vec<Value> {
    let reply = call(server, "GET", "/api/weixin/sessions/", access, None);
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()["sessions"].as_array().unwrap().clone()
}

fn show(server: &TestServer, id: u64) -> Value {
    json_lines(&server.cli(&["users", "show", &id.to_string()])).remove(0)
}

fn sessions_are_listed_ended_one_by_one_and_all_at_once(backend: &Backend) {
    let (_mock, server) = start(backend, "0s");
    let (_, a_refresh) = tokens(&login(&server, "ok:alice.1"));
    let (b_access, b_refresh) = tokens(&login(&server, "ok:alice.2"));
    let (c_access, c_refresh) = tokens(&login(&server, "ok:alice.3"));
    let (bob_access, bob_refresh) = tokens(&login(&server, "ok:bob"));
    // The access token names its login's family, as the refresh token does.
    assert_eq!(family_of(&c_access), family_of(&c_refresh));

    let listed = sessions(&server, &c_access);
    assert_eq!(listed.len(), 3, "{listed:?}");
    let current: Vec<_> = listed.iter().filter(|s| s["current"] == true).collect();
    assert_eq!(current.len(), 1, "{listed:?}");
    assert_eq!(current[0]["id"], family_of(&c_refresh));
    for session in &listed {
        for field in ["created_at", "last_refreshed_at", "expires_at"] {
            assert!(
                session[field].as_str().is_some_and(|t| t.ends_with('Z')),
                "{session}"
            );
        }
    }

    // Ending one: its refresh token is refused, the others still refresh.
    let a_family = family_of(&a_refresh);
    let path = format!("/api/weixin/sessions/{a_family}/");
    let ended = call(&server, "DELETE", &path, &c_access, None);
    assert_eq!(ended.status, 200, "{}", ended.text);
    assert_eq!(refresh(&server, &a_refresh).status, 401);
    assert_eq!(sessions(&server, &b_access).len(), 2);
    call(&server, "DELETE", &path, &c_access, None).assert_error(404, "session_not_found");
    call(
        &server,
        "DELETE",
        "/api/weixin/sessions/nonsense/",
        &c_access,
        None,
    )
    .assert_error(404, "session_not_found");
    // Another user's session is not this user's to end.
    let bobs = format!("/api/weixin/sessions/{}/", family_of(&bob_refresh));
    call(&server, "DELETE", &bobs, &c_access, None).assert_error(404, "session_not_found");
    get(&server.url("/api/weixin/sessions/"), None).assert_error(401, "not_authenticated");
    call(&server, "PUT", "/api/weixin/sessions/", &c_access, None)
        .assert_error(405, "method_not_allowed");

    // Everywhere, this one included; bob is untouched.
    let all = call(
        &server,
        "POST",
        "/api/weixin/sessions/logout-all/",
        &b_access,
        None,
    );
    assert_eq!(all.status, 200, "{}", all.text);
    assert_eq!(all.json()["sessions_ended"], 2);
    assert_eq!(refresh(&server, &b_refresh).status, 401);
    assert_eq!(refresh(&server, &c_refresh).status, 401);
    assert!(sessions(&server, &c_access).is_empty());
    assert_eq!(sessions(&server, &bob_access).len(), 1);
    assert_eq!(refresh(&server, &bob_refresh).status, 200);

    // The operator sees the same families.
    let id = jwt_parts(&c_access).1["user_id"].as_u64().unwrap();
    let families = json_lines(&server.cli(&["users", "sessions", &id.to_string()]));
    assert_eq!(families.len(), 3);
    assert!(
        families.iter().all(|f| f["revoked"] == true),
        "{families:?}"
    );
}

fn the_profile_is_validated_stored_shown_and_exported_without_secrets(backend: &Backend) {
    let (_mock, server) = start(backend, "0s");
    let body = login(&server, "ok:carol");
    let (access, _) = tokens(&body);
    let id = body["user"]["id"].as_u64().unwrap();
    let avatar = "https://thirdwx.qlogo.cn/mmopen/vi_32/abc/132";
    let patched = call(
        &server,
        "PATCH",
        "/api/weixin/user/",
        &access,
        Some(json!({ "nickname": "小明 🐼", "avatar_url": avatar })),
    );
    assert_eq!(patched.status, 200, "{}", patched.text);
    assert_eq!(patched.json()["user"]["nickname"], "小明 🐼");
    let data = get(&server.url("/api/weixin/data/"), Some(&bearer(&access))).json();
    assert_eq!(data["user"]["nickname"], "小明 🐼");
    assert_eq!(data["user"]["avatar_url"], avatar);
    // One field alone leaves the other.
    let one = call(
        &server,
        "PATCH",
        "/api/weixin/user/",
        &access,
        Some(json!({ "nickname": "C" })),
    );
    assert_eq!(one.json()["user"]["avatar_url"], avatar);

    for bad in [
        json!({}),
        json!({ "nickname": "" }),
        json!({ "nickname": "字".repeat(33) }),
        json!({ "nickname": "a\u{7}b" }),
        json!({ "nickname": 5 }),
        json!({ "avatar_url": "http://thirdwx.qlogo.cn/a" }),
        json!({ "avatar_url": format!("https://a.cn/{}", "x".repeat(1100)) }),
        json!({ "avatar_url": "https://a.cn/x y" }),
    ] {
        call(
            &server,
            "PATCH",
            "/api/weixin/user/",
            &access,
            Some(bad.clone()),
        )
        .assert_error(400, "invalid_request");
    }
    assert_eq!(show(&server, id)["nickname"], "C");

    let phone = call(
        &server,
        "POST",
        "/api/weixin/phone/",
        &access,
        Some(json!({"code": "ok:carol"})),
    );
    assert_eq!(phone.status, 200, "{}", phone.text);
    let export = call(&server, "GET", "/api/weixin/user/export/", &access, None);
    assert_eq!(export.status, 200, "{}", export.text);
    let export = export.json();
    assert_eq!(export["user"]["id"], id);
    assert_eq!(export["user"]["openid"], "o-carol");
    assert_eq!(export["user"]["phone_number"], phone_for("carol"));
    assert_eq!(export["user"]["nickname"], "C");
    assert_eq!(export["user"]["avatar_url"], avatar);
    assert_eq!(export["sessions"].as_array().unwrap().len(), 1);
    let text = export.to_string();
    assert!(!text.contains("session_key"), "{text}");
    // The operator's export is the same document.
    let cli = json_lines(&server.cli(&["users", "export", &id.to_string()])).remove(0);
    assert_eq!(cli["user"], export["user"]);
    assert_eq!(cli["sessions"], export["sessions"]);
    get(&server.url("/api/weixin/user/export/"), None).assert_error(401, "not_authenticated");
}

/// No personal field left in what the operator sees.
fn assert_erased(user: &Value) {
    for field in [
        "openid",
        "unionid",
        "phone_number",
        "pure_phone_number",
        "country_code",
        "nickname",
        "avatar_url",
    ] {
        assert!(user[field].is_null(), "{field} left: {user}");
    }
    assert!(user["erased_at"].as_str().is_some(), "{user}");
}

fn deletion_needs_a_fresh_code_of_the_same_user_and_erases_at_once(backend: &Backend) {
    let (_mock, server) = start(backend, "0s");
    let body = login(&server, "ok:dave.1");
    let (access, refresh_token) = tokens(&body);
    let id = body["user"]["id"].as_u64().unwrap();
    let erin = login(&server, "ok:erin")["user"]["id"].as_u64().unwrap();
    call(
        &server,
        "PATCH",
        "/api/weixin/user/",
        &access,
        Some(json!({"nickname": "Dave"})),
    );
    call(
        &server,
        "POST",
        "/api/weixin/phone/",
        &access,
        Some(json!({"code": "ok:dave"})),
    );

    let delete = |code: Option<&str>| {
        let body = code.map(|c| json!({ "code": c })).unwrap_or(json!({}));
        call(&server, "DELETE", "/api/weixin/user/", &access, Some(body))
    };
    // A stolen access token alone deletes nothing: another user's code, no code, a
    // code WeChat refuses.
    delete(Some("ok:erin.2")).assert_error(403, "code_mismatch");
    delete(None).assert_error(400, "invalid_request");
    delete(Some("err40029:x")).assert_error(401, "code_invalid");
    assert_eq!(show(&server, id)["openid"], "o-dave");

    let deleted = delete(Some("ok:dave.2"));
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert_eq!(deleted.json()["code"], "deleted");
    get(&server.url("/api/weixin/data/"), Some(&bearer(&access)))
        .assert_error(401, "user_not_found");
    assert_eq!(refresh(&server, &refresh_token).status, 401);

    assert_erased(&show(&server, id));
    let export = json_lines(&server.cli(&["users", "export", &id.to_string()])).remove(0);
    assert_erased(&export["user"]);
    assert_eq!(export["sessions"], json!([]));
    assert!(json_lines(&server.cli(&["users", "sessions", &id.to_string()])).is_empty());

    // The same WeChat user comes back as a new user; the id is never reused.
    let again = login(&server, "ok:dave.3");
    assert_eq!(again["user"]["created"], true);
    let new_id = again["user"]["id"].as_u64().unwrap();
    assert!(new_id > erin && new_id != id, "{again}");
    assert_eq!(show(&server, erin)["openid"], "o-erin");
    // Deleting an erased account again: no such user.
    let out = server.cli(&["users", "delete", &id.to_string(), "--now"]);
    assert!(!out.status.success());
}

fn a_login_within_the_cooling_off_period_cancels_the_deletion(backend: &Backend) {
    let (_mock, server) = start(backend, "7d");
    let body = login(&server, "ok:fay.1");
    let (access, _) = tokens(&body);
    let id = body["user"]["id"].as_u64().unwrap();
    let scheduled = call(
        &server,
        "DELETE",
        "/api/weixin/user/",
        &access,
        Some(json!({"code": "ok:fay.2"})),
    );
    assert_eq!(scheduled.status, 202, "{}", scheduled.text);
    assert_eq!(scheduled.json()["code"], "deletion_scheduled");
    let due = scheduled.json()["deletion_scheduled_at"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(show(&server, id)["deletion_scheduled_at"], due.as_str());
    // Marked, not erased: the account still works.
    assert_eq!(
        get(&server.url("/api/weixin/data/"), Some(&bearer(&access))).status,
        200
    );

    let back = login(&server, "ok:fay.3");
    assert_eq!(back["user"]["id"], id);
    assert_eq!(back["user"]["deletion_cancelled"], true);
    assert!(show(&server, id)["deletion_scheduled_at"].is_null());
    // An ordinary login says nothing of it.
    assert!(login(&server, "ok:fay.4")["user"]
        .get("deletion_cancelled")
        .is_none());

    // The operator: marked by default, erased with --now.
    let marked = json_lines(&server.cli(&["users", "delete", &id.to_string()])).remove(0);
    assert!(marked["deletion_scheduled_at"].is_string(), "{marked}");
    let erased = json_lines(&server.cli(&["users", "delete", &id.to_string(), "--now"])).remove(0);
    assert!(erased["erased_at"].is_string(), "{erased}");
    assert_erased(&show(&server, id));
}

fn a_due_deletion_is_erased_by_the_sweep_even_across_a_kill_9(backend: &Backend) {
    let (_mock, mut server) = start(backend, "3s");
    let body = login(&server, "ok:gus.1");
    let (access, _) = tokens(&body);
    let id = body["user"]["id"].as_u64().unwrap();
    let scheduled = call(
        &server,
        "DELETE",
        "/api/weixin/user/",
        &access,
        Some(json!({"code": "ok:gus.2"})),
    );
    assert_eq!(scheduled.status, 202, "{}", scheduled.text);
    // The mark is durable: a kill -9 right after the answer loses nothing.
    server.kill9();
    server.restart();
    wait_for(
        Duration::from_secs(60),
        "the sweep to erase the account",
        || show(&server, id)["erased_at"].as_str().map(str::to_string),
    );
    assert_erased(&show(&server, id));
    assert_eq!(login(&server, "ok:gus.3")["user"]["created"], true);
}

#[test]
fn sessions_are_listed_ended_one_by_one_and_all_at_once_on_sled_and_postgres() {
    on_both(
        "sessions_are_listed_ended_one_by_one_and_all_at_once",
        sessions_are_listed_ended_one_by_one_and_all_at_once,
    );
}

#[test]
fn the_profile_is_validated_stored_shown_and_exported_without_secrets_on_sled_and_postgres() {
    on_both(
        "the_profile_is_validated_stored_shown_and_exported_without_secrets",
        the_profile_is_validated_stored_shown_and_exported_without_secrets,
    );
}

#[test]
fn deletion_needs_a_fresh_code_of_the_same_user_and_erases_at_once_on_sled_and_postgres() {
    on_both(
        "deletion_needs_a_fresh_code_of_the_same_user_and_erases_at_once",
        deletion_needs_a_fresh_code_of_the_same_user_and_erases_at_once,
    );
}

#[test]
fn a_login_within_the_cooling_off_period_cancels_the_deletion_on_sled_and_postgres() {
    on_both(
        "a_login_within_the_cooling_off_period_cancels_the_deletion",
        a_login_within_the_cooling_off_period_cancels_the_deletion,
    );
}

#[test]
fn a_due_deletion_is_erased_by_the_sweep_even_across_a_kill_9_on_sled_and_postgres() {
    on_both(
        "a_due_deletion_is_erased_by_the_sweep_even_across_a_kill_9",
        a_due_deletion_is_erased_by_the_sweep_even_across_a_kill_9,
    );
}

/// A user `wechat.link_by_unionid` found from a second app has an openid key of
/// each app: the erasure removes every one (none is left naming the erased id in
/// a backup), and each app's next login of the WeChat user creates a new user.
fn an_erasure_removes_the_openid_keys_of_every_linked_app(backend: &Backend) {
    let mock = MockWeChat::start();
    let config = TestConfig::against(&mock)
        .with_env("WXAUTH_WECHAT__LINK_BY_UNIONID", "true")
        .with_toml(
            "\n[users]\ndeletion_delay = \"0s\"\n[[wechat.apps]]\nappid = \"wxsecondapp02\"\nsecret = \"second-secret\"\n",
        );
    let config = match backend {
        Backend::Sled => config,
        Backend::Postgres(url) => config
            .with_env("WXAUTH_STORAGE__BACKEND", "postgres")
            .with_env("WXAUTH_STORAGE__POSTGRES_URL", url),
    };
    let server = TestServer::start(config);
    let first = login(&server, "union:nan.U77");
    let id = first["user"]["id"].as_u64().unwrap();
    let second = post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "union:nan-b.U77", "appid": "wxsecondapp02" }),
    );
    assert_eq!(second.status, 200, "{}", second.text);
    assert_eq!(second.json()["user"]["id"], id, "one user over both apps");

    let (access, _) = tokens(&first);
    let deleted = call(
        &server,
        "DELETE",
        "/api/weixin/user/",
        &access,
        Some(json!({"code": "ok:nan.2"})),
    );
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert_erased(&show(&server, id));

    let backup = server.dir.path().join("after-erasure.jsonl");
    let out = server.cli(&["backup", backup.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let erased = hex::encode(id.to_be_bytes());
    let left: Vec<Value> = std::fs::read_to_string(&backup)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|entry| {
            matches!(
                entry["tree"].as_str(),
                Some("users_by_openid" | "users_by_unionid")
            ) && entry["value_hex"] == erased.as_str()
        })
        .collect();
    assert_eq!(left, Vec::<Value>::new(), "keys naming the erased user");

    let again = post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "ok:nan-b.2", "appid": "wxsecondapp02" }),
    );
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json()["user"]["created"], true);
    assert_ne!(again.json()["user"]["id"], id);
}

#[test]
fn an_erasure_removes_the_openid_keys_of_every_linked_app_on_sled_and_postgres() {
    on_both(
        "an_erasure_removes_the_openid_keys_of_every_linked_app",
        an_erasure_removes_the_openid_keys_of_every_linked_app,
    );
}
