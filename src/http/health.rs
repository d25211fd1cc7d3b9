//! Liveness and readiness for load balancers, containers and systemd.

use super::AppState;
use crate::actors::{issuer, registry};
use actix_web::{web, HttpResponse};
use serde_json::json;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type(actix_web::http::header::ContentType::json())
        .body(r#"{"status":"ok"}"#)
}

/// Ready when every owner actor answers through its mailbox (each within
/// `ACTOR_TIMEOUT`), a write reaches the disk, and a mini-program is configured.
/// A crashed or stuck actor makes the server unready instead of failing logins
/// behind a green probe.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let (registry, issuer) = futures_util::future::join(
        state
            .registry
            .send(registry::Probe)
            .timeout(super::ACTOR_TIMEOUT),
        state
            .issuer
            .send(issuer::Probe)
            .timeout(super::ACTOR_TIMEOUT),
    )
    .await;
    if let Err(cause) = issuer {
        tracing::warn!(%cause, "readiness probe: the token issuer does not answer");
        return not_ready("The token issuer does not answer.");
    }
    // A WeChat call is bounded by its login's deadline: a running pool is enough.
    if !state.wechat.running() {
        tracing::warn!("readiness probe: the WeChat workers have stopped");
        return not_ready("The WeChat client is not running.");
    }
    let storage = match registry {
        Ok(Ok(())) => state
            .commit
            .durable()
            .await
            .map_err(|e| crate::error::cause_chain(&e)),
        Ok(Err(e)) => Err(crate::error::cause_chain(&e)),
        Err(cause) => {
            tracing::warn!(%cause, "readiness probe: the user registry does not answer");
            return not_ready("The user registry does not answer.");
        }
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
