//! docs/grafana/wxauth.json cannot drift from the code: every metric the dashboard
//! queries, and every label value it selects exactly, is in a real /metrics scrape
//! taken after a few logins, a refresh and a forward-auth check.

use crate::common;

use common::tools;
use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Series Prometheus makes itself for every scrape target; never exported by wxauth.
const PROMETHEUS_OWN: [&str; 1] = ["up"];

/// A metric selector in a PromQL expression: the name and its label matchers
/// (`label`, operator, value).
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

/// Words that are PromQL, not metric names, when not followed by `(`.
const KEYWORDS: [&str; 5] = ["and", "or", "unless", "bool", "offset"];
/// Modifiers followed by a parenthesised list of labels.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric selectors of a PromQL expression (enough PromQL for a dashboard:
/// functions, aggregations with `by`, matchers, ranges, numbers, arithmetic).
fn selectors(expr: &str) -> Vec<Selector> {
    let chars: Vec<char> = expr.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    let skip_spaces = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i = end_of_string(&chars, i);
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_spaces(i);
            if LABEL_LISTS.contains(&word.as_str()) {
                if chars.get(next) == Some(&'(') {
                    i = next;
                    while i < chars.len() && chars[i] != ')' {
                        i += 1;
                    }
                    i += 1;
                }
            } else if chars.get(next) == Some(&'(')
                || KEYWORDS.contains(&word.as_str())
                || followed_by_grouping(&chars[next..])
            {
                // A function, or an aggregation (`sum by (…) (…)`): arguments come next.
            } else {
                let mut selector = Selector {
                    name: word,
                    matchers: Vec::new(),
                };
                if chars.get(next) == Some(&'{') {
                    i = read_matchers(&chars, next + 1, &mut selector.matchers);
                }
                found.push(selector);
            }
        } else {
            i += 1;
        }
    }
    found
}

/// Whether `rest` starts with `by` or `without` and a parenthesis.
fn followed_by_grouping(rest: &[char]) -> bool {
    let rest: String = rest.iter().collect();
    ["by", "without"].iter().any(|w| {
        rest.strip_prefix(w)
            .is_some_and(|after| after.trim_start().starts_with('('))
    })
}

/// The index just past the string literal that starts at `start`.
fn end_of_string(chars: &[char], start: usize) -> usize {
    let mut i = start + 1;
    while i < chars.len() && chars[i] != '"' {
        if chars[i] == '\\' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// Reads `label op "value", …}` from `i`; returns the index past the `}`.
fn read_matchers(chars: &[char], mut i: usize, out: &mut Vec<(String, String, String)>) -> usize {
    loop {
        while i < chars.len() && (chars[i].is_whitespace() || chars[i] == ',') {
            i += 1;
        }
        if i >= chars.len() || chars[i] == '}' {
            return i + 1;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let label: String = chars[start..i].iter().collect();
        let op_start = i;
        while i < chars.len() && "=!~".contains(chars[i]) {
            i += 1;
        }
        let op: String = chars[op_start..i].iter().collect();
        assert_eq!(chars.get(i), Some(&'"'), "a quoted matcher value");
        let end = end_of_string(chars, i);
        let value: String = chars[i + 1..end - 1].iter().collect();
        out.push((label, op, value));
        i = end;
    }
}

/// Every panel of the dashboard, those inside collapsed rows included.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    let mut found = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = panels.pop() {
        if let Some(inner) = panel["panels"].as_array() {
            panels.extend(inner);
        }
        found.push(panel);
    }
    found
}

/// Every PromQL expression of the dashboard: panel targets and variable queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries = Vec::new();
    for panel in all_panels(dashboard) {
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(
            !targets.is_empty(),
            "panel {:?} queries nothing",
            panel["title"]
        );
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL target");
            queries.push(expr.to_string());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] == "query" {
            // label_values(METRIC, LABEL): the metric is what must exist.
            let query = variable["query"]["query"].as_str().unwrap();
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.split(',').next())
                .expect("a label_values(metric, label) variable");
            queries.push(inner.trim().to_string());
        }
    }
    queries
}

/// Sample names of a Prometheus text scrape, each with the label sets it has.
fn scrape_series(text: &str) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let mut series: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        if line[name_end..].starts_with('{') {
            let chars: Vec<char> = line[name_end + 1..].chars().collect();
            let mut matchers = Vec::new();
            read_matchers(&chars, 0, &mut matchers);
            labels.extend(matchers.into_iter().map(|(l, _, v)| (l, v)));
        }
        series.entry(name).or_default().push(labels);
    }
    series
}

#[test]
fn the_promql_reader_finds_names_and_matchers() {
    let found = selectors(
        r#"clamp_min(sum by (route, le) (rate(a_total{route="/x/",status=~"5.."}[$__rate_interval])) - sum(delta(b[5m])), 1e-9) / on (x) c"#,
    );
    let names: Vec<&str> = found.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a_total", "b", "c"]);
    assert_eq!(
        found[0].matchers,
        [
            ("route".into(), "=".into(), "/x/".into()),
            ("status".into(), "=~".into(), "5..".into())
        ]
    );
}

#[test]
fn every_metric_the_dashboard_queries_is_in_a_real_scrape() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana/wxauth.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard")).unwrap();
    assert_eq!(dashboard["uid"], "wxauth");

    let (_mock, server, metrics_addr) = start_with_metrics();
    // New users, a returning one, a refused code, a refresh, a logout, and the
    // authenticated reads.
    let first = login(&server, "ok:ann.1");
    login(&server, "ok:ben.1");
    login(&server, "ok:ann.2");
    post_json(
        &server.url("/api/weixin/login/"),
        &json!({ "code": "err40029:x" }),
    )
    .assert_error(401, "code_invalid");
    let refreshed = post_json(
        &server.url("/api/token/refresh/"),
        &json!({ "refresh": first["refresh"] }),
    );
    assert_eq!(refreshed.status, 200, "{}", refreshed.text);
    let logout = post_json(
        &server.url("/api/token/blacklist/"),
        &json!({ "refresh": refreshed.json()["refresh"] }),
    );
    assert_eq!(logout.status, 200, "{}", logout.text);
    let access = bearer(first["access"].as_str().unwrap());
    assert_eq!(
        get(&server.url("/api/weixin/data/"), Some(&access)).status,
        200
    );
    assert_eq!(
        get(&server.url("/api/auth/check"), Some(&access)).status,
        200
    );

    let scrape = get(&format!("http://{metrics_addr}/metrics"), None);
    assert_eq!(scrape.status, 200);
    let series = scrape_series(&scrape.text);

    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 10, "{queries:?}");
    let mut checked = BTreeSet::new();
    for expr in &queries {
        let found = selectors(expr);
        assert!(!found.is_empty(), "no metric in {expr}");
        for selector in found {
            if PROMETHEUS_OWN.contains(&selector.name.as_str()) {
                continue;
            }
            let Some(samples) = series.get(&selector.name) else {
                panic!(
                    "the dashboard queries {} ({expr}), which /metrics does not have:\n{}",
                    selector.name, scrape.text
                );
            };
            checked.insert(selector.name.clone());
            for (label, op, value) in &selector.matchers {
                if value.contains('$') {
                    continue; // a dashboard variable
                }
                // An exact value, or alternatives of exact values, must each exist.
                let literal = |v: &str| !v.chars().any(|c| ".*+?[](){}^$\\".contains(c));
                let wanted: Vec<&str> = match op.as_str() {
                    "=" => vec![value.as_str()],
                    "=~" if value.split('|').all(literal) => value.split('|').collect(),
                    _ => continue,
                };
                for want in wanted {
                    assert!(
                        samples
                            .iter()
                            .any(|s| s.get(label).map(String::as_str) == Some(want)),
                        "the dashboard selects {}{{{label}=\"{want}\"}} ({expr}), \
                         which the scrape does not have",
                        selector.name
                    );
                }
            }
        }
    }
    // The board covers what the issue asks for.
    for name in [
        "wxauth_http_requests_total",
        "wxauth_http_request_duration_seconds_bucket",
        "wxauth_wechat_calls_total",
        "wxauth_wechat_call_duration_seconds_bucket",
        "wxauth_users",
        "wxauth_tokens_issued_total",
        "wxauth_refresh_reuse_detected_total",
        "wxauth_storage_flushes_total",
        "wxauth_storage_size_bytes",
        "wxauth_storage_healthy",
    ] {
        assert!(checked.contains(name), "the dashboard does not show {name}");
    }
}

/// A server with its metrics listener, after a few requests that all succeed.
fn healthy_server_scrape() -> (MockWeChat, TestServer, String) {
    let (mock, server, metrics_addr) = start_with_metrics();
    let pair = login(&server, "ok:healthy.1");
    let access = bearer(pair["access"].as_str().unwrap());
    assert_eq!(
        get(&server.url("/api/weixin/data/"), Some(&access)).status,
        200
    );
    assert_eq!(get(&server.url("/healthz"), None).status, 200);
    let scrape = get(&format!("http://{metrics_addr}/metrics"), None);
    assert_eq!(scrape.status, 200);
    (mock, server, scrape.text)
}

fn promtool(test: &str) -> Option<std::path::PathBuf> {
    let found = tools::find_binary("promtool", &[Path::new("/usr/bin/promtool")]);
    if found.is_none() {
        tools::skip(
            test,
            "promtool is not installed (apt-get install prometheus)",
        );
    }
    found
}

/// `promtool check metrics` (Prometheus' own linter: names, types, units, help)
/// passes a real scrape with nothing to say.
#[test]
fn promtool_accepts_a_real_scrape() {
    let Some(promtool) = promtool("promtool_accepts_a_real_scrape") else {
        return;
    };
    let (_mock, _server, text) = healthy_server_scrape();
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let said = tools::output_text(&out);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics ({}): {said}",
        out.status
    );
}

/// The board's stat panels answer a number, not "no data", on a server where
/// nothing failed: each panel's query is evaluated by Prometheus' own engine
/// (`promtool test rules`) over ten minutes of series shaped like a real scrape.
#[test]
fn the_health_stats_show_a_number_on_a_healthy_server() {
    let Some(promtool) = promtool("the_health_stats_show_a_number_on_a_healthy_server") else {
        return;
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana/wxauth.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard")).unwrap();
    let (_mock, _server, text) = healthy_server_scrape();

    // Every sample of the scrape as an input series with `instance` and `job` (what
    // Prometheus adds), growing by its scraped value each minute.
    let mut series = String::from(
        "      - series: 'up{instance=\"127.0.0.1:9464\",job=\"wxauth\"}'\n        values: '1x10'\n",
    );
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name_and_labels, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap();
        let target = r#"instance="127.0.0.1:9464",job="wxauth""#;
        let labelled = match name_and_labels.split_once('{') {
            Some((name, labels)) => format!("{name}{{{target},{labels}"),
            None => format!("{name_and_labels}{{{target}}}"),
        };
        series.push_str(&format!(
            "      - series: '{labelled}'\n        values: '{value}+{value}x10'\n"
        ));
    }
    let mut stats = Vec::new();
    for panel in all_panels(&dashboard) {
        if panel["type"] == "stat" {
            let expr = panel["targets"][0]["expr"].as_str().unwrap();
            let expr = expr
                .replace("$instance", ".*")
                .replace("$__rate_interval", "2m");
            stats.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    assert!(
        stats
            .iter()
            .any(|(title, _)| title.starts_with("5xx share")),
        "{stats:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    for (title, expr) in &stats {
        // No expected samples: promtool then prints what the query answered.
        let tests = format!(
            "rule_files: []\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{series}    promql_expr_test:\n      - expr: '{}'\n        eval_time: 10m\n        exp_samples: []\n",
            expr.replace('\'', "''")
        );
        let file = dir.path().join("stat.yml");
        std::fs::write(&file, &tests).unwrap();
        let out = std::process::Command::new(&promtool)
            .args(["test", "rules"])
            .arg(&file)
            .output()
            .expect("run promtool");
        let said = tools::output_text(&out);
        // Expecting nothing fails exactly when the query answers something.
        assert!(
            !out.status.success() && said.contains("got:"),
            "the stat panel {title:?} shows no data on a healthy server ({expr}):\n{said}"
        );
        if title.starts_with("5xx share") {
            assert!(said.contains("got: {} 0E+00"), "{title:?} is not 0: {said}");
        }
    }
}
