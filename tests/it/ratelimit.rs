//! The login rate limit holds against address tricks: IPv6 clients are counted per
//! network (`limits.ipv6_prefix`, default /64), and an IPv4-mapped IPv6 address is
//! its IPv4 address, also when a trusted proxy reports it in X-Forwarded-For.

use crate::common;

use common::*;

/// A server behind a "proxy" on 127.0.0.1 (the tests), two logins per client a minute.
fn limited_server(extra_env: &[(&str, &str)]) -> (MockWeChat, TestServer) {
    let mock = MockWeChat::start();
    let mut config = TestConfig::against(&mock)
        .with_env("WXAUTH_SERVER__TRUSTED_PROXIES", "[\"127.0.0.1\"]")
        .with_env("WXAUTH_LIMITS__LOGIN_PER_MINUTE", "2");
    for (key, value) in extra_env {
        config = config.with_env(key, value);
    }
    let server = TestServer::start(config);
    (mock, server)
}

/// A login attempt forwarded for `client`. The empty code is refused (400) after
/// the limit is counted, so no WeChat call is made.
fn attempt(server: &TestServer, client: &str) -> Reply {
    common::collect(
        agent()
            .post(&server.url("/api/weixin/login/"))
            .header("Content-Type", "application/json")
            .header("X-Forwarded-For", client)
            .send(r#"{"code": ""}"#),
    )
}

fn assert_counted(reply: &Reply) {
    reply.assert_error(400, "invalid_request");
}

fn assert_limited(reply: &Reply) {
    reply.assert_error(429, "rate_limited");
    assert!(reply.header("retry-after").is_some(), "{:?}", reply.headers);
}

#[test]
fn two_addresses_of_one_ipv6_64_share_a_budget() {
    let (_mock, server) = limited_server(&[]);
    assert_counted(&attempt(&server, "2001:db8:5:6::1"));
    assert_counted(&attempt(&server, "2001:db8:5:6:ffff:ffff:ffff:fffe"));
    assert_limited(&attempt(&server, "2001:db8:5:6::2"));
    // The neighbouring /64 is another client.
    assert_counted(&attempt(&server, "2001:db8:5:7::1"));
}

#[test]
fn an_ipv4_mapped_address_shares_the_budget_of_its_ipv4_address() {
    let (_mock, server) = limited_server(&[]);
    assert_counted(&attempt(&server, "::ffff:192.0.2.1"));
    assert_counted(&attempt(&server, "192.0.2.1"));
    assert_limited(&attempt(&server, "::ffff:192.0.2.1"));
    assert_limited(&attempt(&server, "192.0.2.1"));
    assert_counted(&attempt(&server, "192.0.2.2"));
}

#[test]
fn the_ipv6_prefix_is_configurable() {
    let (_mock, server) = limited_server(&[("WXAUTH_LIMITS__IPV6_PREFIX", "128")]);
    assert_counted(&attempt(&server, "2001:db8:5:6::1"));
    assert_counted(&attempt(&server, "2001:db8:5:6::1"));
    assert_counted(&attempt(&server, "2001:db8:5:6::2"));
    assert_limited(&attempt(&server, "2001:db8:5:6::1"));
}

#[test]
fn an_ipv6_prefix_outside_1_to_128_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["0", "129"] {
        let out = run_with_config(
            dir.path(),
            &format!("{VALID_CONFIG}[limits]\nipv6_prefix = {bad}\n"),
            &[],
            &["check-config"],
        );
        assert_eq!(out.status.code(), Some(2), "ipv6_prefix = {bad} accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("limits.ipv6_prefix"),
            "the error does not name the key: {stderr}"
        );
    }
}
