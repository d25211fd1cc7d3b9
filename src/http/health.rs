//! Liveness and readiness for load balancers, containers and systemd.

use super::AppState;
use crate::actors::registry::Probe;
use actix_web::{web, HttpResponse};
use serde_json::json;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type(actix_web::http::header::ContentType::json())
        .body(r#"{"status":"ok"}"#)
}

/// Ready when a write reaches the disk and at least one mini-program is configured.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let storage = match state
        .registry
        .send(Probe)
        .timeout(super::ACTOR_TIMEOUT)
        .await
    {
        Ok(Ok(())) => state.commit.durable().await.map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match storage {
        Ok(()) if !state.apps.is_empty() => HttpResponse::Ok().json(json!({ "status": "ready" })),
        Ok(()) => not_ready("No WeChat mini-program is configured."),
        Err(cause) => {
            tracing::warn!(%cause, "readiness probe: storage is not writable");
            not_ready("Storage is not writable.")
        }
    }
}

fn not_ready(detail: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .json(json!({ "status": "unavailable", "code": "not_ready", "detail": detail }))
}
