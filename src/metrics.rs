//! Prometheus metrics. Counters and histograms are plain atomics, so recording on
//! the request path takes no lock; they are rendered as text by the separate
//! `metrics.bind` listener, which a reverse proxy in front of the API never exposes.

use crate::storage::{GroupCommit, ReadStore};
pub use crate::wechat::errors::Outcome;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The routes requests are counted under (trailing slash folded); the last is the rest.
pub const ROUTES: [&str; 24] = [
    "/api/weixin/login/",
    "/api/weixin/data/",
    "/api/weixin/phone/",
    "/api/weixin/decrypt/",
    "/api/token/refresh/",
    "/api/token/verify/",
    "/api/token/blacklist/",
    "/api/auth/check",
    "/openapi.json",
    "/healthz",
    "/readyz",
    "/api/weixin/sessions/",
    "/api/weixin/sessions/logout-all/",
    "/api/weixin/sessions/{id}/",
    "/api/weixin/user/",
    "/api/weixin/user/export/",
    "/.well-known/jwks.json",
    "/api/weixin/web-login/",
    "/api/weixin/web-login/{ticket}/",
    "/api/weixin/web-login/{ticket}/scan",
    "/api/weixin/web-login/{ticket}/confirm",
    "/api/weixin/web-login/{ticket}/deny",
    "/web-login/",
    "other",
];

/// Outcomes of one HTTP call to WeChat (or the mock), as labels.
pub const WECHAT_OUTCOMES: &[Outcome] = Outcome::ALL.split_at(13).0;

/// Outcomes of one access-token fetch (`cgi-bin/stable_token`), as labels.
pub const TOKEN_FETCH_OUTCOMES: [Outcome; 12] = [
    Outcome::Ok,
    Outcome::ForcedOk,
    Outcome::ForcedRefused,
    Outcome::Busy,
    Outcome::RateLimited,
    Outcome::ConfigError,
    Outcome::Timeout,
    Outcome::HttpError,
    Outcome::Malformed,
    Outcome::UnknownErrcode,
    Outcome::ConnectError,
    Outcome::Unavailable,
];

/// Outcomes of one call to a WeChat API that takes the access token, as labels.
pub const WECHAT_API_OUTCOMES: [Outcome; 13] = [
    Outcome::Ok,
    Outcome::TokenInvalid,
    Outcome::CodeInvalid,
    Outcome::ForcedRefused,
    Outcome::Busy,
    Outcome::RateLimited,
    Outcome::ConfigError,
    Outcome::Timeout,
    Outcome::HttpError,
    Outcome::Malformed,
    Outcome::UnknownErrcode,
    Outcome::ConnectError,
    Outcome::Unavailable,
];

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// HTTP status codes 100..=599 each get a counter per route.
const STATUSES: usize = 500;

struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.buckets[slot].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braced} {sum}");
        let _ = writeln!(out, "{name}_count{braced} {cumulative}");
    }
}

pub struct Metrics {
    requests: Vec<Vec<AtomicU64>>,
    latency: Vec<Histogram>,
    wechat_calls: OutcomeCounts,
    wechat_latency: Histogram,
    access_issued: AtomicU64,
    refresh_issued: AtomicU64,
    reuse_detected: AtomicU64,
    events_pending: AtomicU64,
    event_delivery_failures: AtomicU64,
    token_fetches: OutcomeCounts,
    wechat_api_calls: OutcomeCounts,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: ROUTES
                .iter()
                .map(|_| (0..STATUSES).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            latency: ROUTES.iter().map(|_| Histogram::new()).collect(),
            wechat_calls: OutcomeCounts::default(),
            wechat_latency: Histogram::new(),
            access_issued: AtomicU64::new(0),
            refresh_issued: AtomicU64::new(0),
            reuse_detected: AtomicU64::new(0),
            events_pending: AtomicU64::new(0),
            event_delivery_failures: AtomicU64::new(0),
            token_fetches: OutcomeCounts::default(),
            wechat_api_calls: OutcomeCounts::default(),
        }
    }
}

/// The label a matched route pattern is counted under.
pub fn route_label(pattern: Option<&str>) -> &'static str {
    let Some(pattern) = pattern else {
        return "other";
    };
    let bare = pattern.trim_end_matches('/');
    ROUTES
        .iter()
        .find(|r| r.trim_end_matches('/') == bare)
        .copied()
        .unwrap_or("other")
}

impl Metrics {
    pub fn observe_request(&self, route: &str, status: u16, elapsed: Duration) {
        let r = ROUTES
            .iter()
            .position(|x| *x == route)
            .unwrap_or(ROUTES.len() - 1);
        let s = usize::from(status).clamp(100, 599) - 100;
        self.requests[r][s].fetch_add(1, Relaxed);
        self.latency[r].observe(elapsed);
    }

    pub fn observe_wechat(&self, outcome: Outcome, elapsed: Duration) {
        self.wechat_calls.add(outcome);
        self.wechat_latency.observe(elapsed);
    }

    /// One access-token fetch by the keeper.
    pub fn observe_token_fetch(&self, outcome: Outcome) {
        self.token_fetches.add(outcome);
    }

    /// One call to a token-authenticated WeChat API (phone number, checksession).
    pub fn observe_wechat_api(&self, outcome: Outcome) {
        self.wechat_api_calls.add(outcome);
    }

    pub fn tokens_issued(&self, access: u64, refresh: u64) {
        self.access_issued.fetch_add(access, Relaxed);
        self.refresh_issued.fetch_add(refresh, Relaxed);
    }

    pub fn reuse_detected(&self) {
        self.reuse_detected.fetch_add(1, Relaxed);
    }

    /// The events waiting for delivery (not given up), as the last round saw them.
    pub fn set_events_pending(&self, n: u64) {
        self.events_pending.store(n, Relaxed);
    }

    pub fn event_delivery_failed(&self) {
        self.event_delivery_failures.fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, store: &dyn ReadStore, commit: &GroupCommit) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let o = &mut out;
        header(
            o,
            "wxauth_http_requests_total",
            "counter",
            "HTTP requests by route and status.",
        );
        for (r, route) in ROUTES.iter().enumerate() {
            for (s, count) in self.requests[r].iter().enumerate() {
                let n = count.load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        o,
                        "wxauth_http_requests_total{{route=\"{route}\",status=\"{}\"}} {n}",
                        s + 100
                    );
                }
            }
        }
        let name = "wxauth_http_request_duration_seconds";
        header(o, name, "histogram", "HTTP request latency by route.");
        for (r, route) in ROUTES.iter().enumerate() {
            self.latency[r].render(o, name, &format!("route=\"{route}\""));
        }
        counter_by_outcome(
            o,
            "wxauth_wechat_calls_total",
            "Calls to WeChat's jscode2session by outcome.",
            WECHAT_OUTCOMES,
            &self.wechat_calls,
        );
        let name = "wxauth_wechat_call_duration_seconds";
        header(
            o,
            name,
            "histogram",
            "Latency of calls to WeChat's jscode2session.",
        );
        self.wechat_latency.render(o, name, "");
        counter_by_outcome(
            o,
            "wxauth_wechat_token_fetches_total",
            "Access-token fetches (cgi-bin/stable_token) by outcome.",
            &TOKEN_FETCH_OUTCOMES,
            &self.token_fetches,
        );
        counter_by_outcome(
            o,
            "wxauth_wechat_api_calls_total",
            "Calls to WeChat APIs that take the access token (phone number, checksession) by outcome.",
            &WECHAT_API_OUTCOMES,
            &self.wechat_api_calls,
        );
        header(
            o,
            "wxauth_tokens_issued_total",
            "counter",
            "Tokens signed, by type.",
        );
        let _ = writeln!(
            o,
            "wxauth_tokens_issued_total{{type=\"access\"}} {}",
            self.access_issued.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "wxauth_tokens_issued_total{{type=\"refresh\"}} {}",
            self.refresh_issued.load(Relaxed)
        );
        header(
            o,
            "wxauth_refresh_reuse_detected_total",
            "counter",
            "Rotated-out refresh tokens presented after the grace period (families revoked).",
        );
        let _ = writeln!(
            o,
            "wxauth_refresh_reuse_detected_total {}",
            self.reuse_detected.load(Relaxed)
        );
        header(
            o,
            "wxauth_events_pending",
            "gauge",
            "Events in the outbox waiting for delivery (given-up ones not counted).",
        );
        let _ = writeln!(
            o,
            "wxauth_events_pending {}",
            self.events_pending.load(Relaxed)
        );
        header(
            o,
            "wxauth_event_delivery_failures_total",
            "counter",
            "Event deliveries that failed (no answer, or not 2xx).",
        );
        let _ = writeln!(
            o,
            "wxauth_event_delivery_failures_total {}",
            self.event_delivery_failures.load(Relaxed)
        );
        header(
            o,
            "wxauth_users",
            "gauge",
            "Users ever created (ids are never reused).",
        );
        let users = crate::users::count(store).unwrap_or(0);
        let _ = writeln!(o, "wxauth_users {users}");
        header(
            o,
            "wxauth_storage_size_bytes",
            "gauge",
            "Size of the sled data directory on disk.",
        );
        let size = store.size_on_disk().unwrap_or(0);
        let _ = writeln!(o, "wxauth_storage_size_bytes {size}");
        header(
            o,
            "wxauth_storage_flushes_total",
            "counter",
            "Group-commit fsyncs (compare with writes to see the grouping).",
        );
        let _ = writeln!(o, "wxauth_storage_flushes_total {}", commit.flush_count());
        header(
            o,
            "wxauth_storage_healthy",
            "gauge",
            "1 while the last flush succeeded.",
        );
        let _ = writeln!(
            o,
            "wxauth_storage_healthy {}",
            u8::from(commit.is_healthy())
        );
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One counter per [`Outcome`]: whatever the outcome, it is counted as itself.
struct OutcomeCounts([AtomicU64; Outcome::ALL.len()]);

impl Default for OutcomeCounts {
    fn default() -> Self {
        OutcomeCounts(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl OutcomeCounts {
    fn add(&self, outcome: Outcome) {
        self.0[outcome.index()].fetch_add(1, Relaxed);
    }
}

/// A counter with one series per `outcome` label: each of `listed` always, and any
/// other outcome once it has happened.
fn counter_by_outcome(
    out: &mut String,
    name: &str,
    help: &str,
    listed: &[Outcome],
    counts: &OutcomeCounts,
) {
    header(out, name, "counter", help);
    let others = Outcome::ALL.into_iter().filter(|o| !listed.contains(o));
    for outcome in listed.iter().copied().chain(others) {
        let n = counts.0[outcome.index()].load(Relaxed);
        if n > 0 || listed.contains(&outcome) {
            let _ = writeln!(out, "{name}{{outcome=\"{}\"}} {n}", outcome.label());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_a_counter_does_not_list_is_counted_as_itself() {
        let counts = OutcomeCounts::default();
        counts.add(Outcome::Ok);
        counts.add(Outcome::Unavailable);
        counts.add(Outcome::CodeUsed);
        let mut text = String::new();
        counter_by_outcome(&mut text, "x_total", "x", &TOKEN_FETCH_OUTCOMES, &counts);
        assert!(text.contains("x_total{outcome=\"ok\"} 1"), "{text}");
        assert!(
            text.contains("x_total{outcome=\"unavailable\"} 1"),
            "{text}"
        );
        assert!(text.contains("x_total{outcome=\"code_used\"} 1"), "{text}");
        assert!(
            text.contains("x_total{outcome=\"connect_error\"} 0"),
            "{text}"
        );
        assert!(
            !text.contains("code_invalid"),
            "an unlisted outcome that never happened: {text}"
        );
    }

    #[test]
    fn routes_fold_the_trailing_slash_and_unknown_is_other() {
        assert_eq!(route_label(Some("/api/weixin/login")), "/api/weixin/login/");
        assert_eq!(route_label(Some("/healthz/")), "/healthz");
        assert_eq!(route_label(None), "other");
        assert_eq!(route_label(Some("/x")), "other");
        assert_eq!(
            route_label(Some("/.well-known/jwks.json")),
            "/.well-known/jwks.json"
        );
    }

    #[test]
    fn histograms_are_cumulative() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(30));
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }
}
