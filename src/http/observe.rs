//! What every request leaves behind: a request id (taken from `X-Request-Id` when
//! the proxy sent a sane one), one access-log line, and its metrics. Never the
//! query string, a body, a header value, a token or a code.

use super::AppState;
use crate::metrics::route_label;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;
use tracing::Instrument;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The id for this request: the caller's `X-Request-Id` if it is 1–64 characters of
/// `[A-Za-z0-9._-]`, else a new one (a per-process prefix and a counter).
fn request_id(req: &ServiceRequest) -> String {
    if let Some(given) = req.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()) {
        let sane = (1..=64).contains(&given.len())
            && given
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if sane {
            return given.to_string();
        }
    }
    static PREFIX: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = PREFIX.get_or_init(|| crate::ids::random_hex(4));
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The observation middleware: the request id, a `request` span around everything
/// the request runs (in the handler and in the actors its messages reach, so every
/// line they log carries the id), then [`finish`]. The access line is written after
/// the span, outside it: its fields stay as they were.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let id = request_id(&req);
    let method = req.method().clone();
    let span = tracing::info_span!("request", request_id = %id);
    let response = span.in_scope(|| next.call(req)).instrument(span);
    let mut response = response.await?;
    finish(&mut response, &id, &method, started);
    Ok(response)
}

/// Records the finished request: metrics, the access-log line, the id header.
fn finish<B>(res: &mut ServiceResponse<B>, id: &str, method: &Method, started: Instant) {
    let elapsed = started.elapsed();
    let status = res.status().as_u16();
    let route = route_label(res.request().match_pattern().as_deref());
    if let Some(state) = res.request().app_data::<web::Data<AppState>>() {
        state.metrics.observe_request(route, status, elapsed);
    }
    tracing::info!(
        target: "wxauth::access",
        request_id = id,
        method = %method,
        route,
        status,
        micros = elapsed.as_micros() as u64,
        "request"
    );
    if let Ok(value) = HeaderValue::from_str(id) {
        res.headers_mut().insert(REQUEST_ID, value);
    }
}

/// GET /metrics on the metrics listener.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let text = state.metrics.render(state.reader.as_ref(), &state.commit);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text)
}
