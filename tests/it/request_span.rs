//! One request id from the handler to the actors: every line a request causes
//! carries the id of its access line.

use crate::common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn events(server: &TestServer) -> Vec<Value> {
    server
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn find<'a>(events: &'a [Value], message: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["message"] == message)
}

#[test]
fn a_logins_lines_in_handler_and_actors_carry_its_request_id() {
    let mock = MockWeChat::start();
    let server =
        TestServer::start(TestConfig::against(&mock).with_env("WXAUTH_LOG__FORMAT", "json"));
    let login_url = server.url("/api/weixin/login/");

    // Refused by WeChat: the line is written in a WeChat worker thread.
    let refused = post_json(&login_url, &json!({ "code": "err40029:span" }));
    assert_eq!(refused.status, 401, "{}", refused.text);
    let refused_id = refused.header("x-request-id").expect("an id").to_string();
    // A new user: written in the handler after the registry and issuer answered.
    let created = post_json(&login_url, &json!({ "code": "ok:span.1" }));
    assert_eq!(created.status, 200, "{}", created.text);
    let created_id = created.header("x-request-id").expect("an id").to_string();
    assert_ne!(refused_id, created_id);

    let events = wait_for(Duration::from_secs(10), "both log lines", || {
        let events = events(&server);
        (find(&events, "login refused by WeChat").is_some() && find(&events, "new user").is_some())
            .then_some(events)
    });
    let refusal = find(&events, "login refused by WeChat").unwrap();
    assert_eq!(
        refusal["span"]["request_id"],
        refused_id.as_str(),
        "{refusal}"
    );
    let new_user = find(&events, "new user").unwrap();
    assert_eq!(
        new_user["span"]["request_id"],
        created_id.as_str(),
        "{new_user}"
    );

    // The access lines keep their own fields, outside the span.
    for (id, status) in [(&refused_id, 401), (&created_id, 200)] {
        let access = events
            .iter()
            .find(|e| e["message"] == "request" && e["request_id"] == id.as_str())
            .expect("an access line for each request");
        assert_eq!(access["status"], status);
        assert!(access.get("span").is_none(), "{access}");
    }
}
