//! Liveness and readiness for load balancers, containers and systemd.

use super::AppState;
use crate::actors::{issuer, registry};
use actix_web::{web, HttpResponse};
use serde_json::json;
use std::time::{Duration, Instant};

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type(actix_web::http::header::ContentType::json())
        .body(r#"{"status":"ok"}"#)
}

/// How long one readiness verdict is served: the probe (a write and an fsync) runs at
/// most this often, however often `/readyz` is asked, on a listener anyone can reach.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The last verdict and when it was made. The lock is held through a probe, so
/// requests that arrive meanwhile wait for it and share its verdict.
#[derive(Default)]
pub struct Readiness(tokio::sync::Mutex<Option<(Instant, Result<(), &'static str>)>>);

/// Ready when every owner actor answers through its mailbox (each within
/// `ACTOR_TIMEOUT`), a write reaches the disk, and a mini-program is configured.
/// A crashed or stuck actor makes the server unready instead of failing logins
/// behind a green probe. Probed at most once a second ([`PROBE_INTERVAL`]).
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let verdict = {
        let mut last = state.readiness.0.lock().await;
        match *last {
            Some((at, verdict)) if at.elapsed() < PROBE_INTERVAL => verdict,
            _ => {
                let verdict = probe(&state).await;
                *last = Some((Instant::now(), verdict));
                verdict
            }
        }
    };
    match verdict {
        Ok(()) => HttpResponse::Ok().json(json!({ "status": "ready" })),
        Err(detail) => not_ready(detail),
    }
}

/// One readiness probe: `Err` carries the answer's detail.
async fn probe(state: &AppState) -> Result<(), &'static str> {
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
        return Err("The token issuer does not answer.");
    }
    // A WeChat call is bounded by its login's deadline: a running pool is enough.
    if !state.wechat.running() {
        tracing::warn!("readiness probe: the WeChat workers have stopped");
        return Err("The WeChat client is not running.");
    }
    let storage = match registry {
        Ok(Ok(())) => state
            .commit
            .durable()
            .await
            .map_err(|e| crate::cause::cause_chain(&e)),
        Ok(Err(e)) => Err(crate::cause::cause_chain(&e)),
        Err(cause) => {
            tracing::warn!(%cause, "readiness probe: the user registry does not answer");
            return Err("The user registry does not answer.");
        }
    };
    match storage {
        Ok(()) if !state.apps.is_empty() => Ok(()),
        Ok(()) => Err("No WeChat mini-program is configured."),
        Err(cause) => {
            tracing::warn!(%cause, "readiness probe: storage is not writable");
            Err("Storage is not writable.")
        }
    }
}

fn not_ready(detail: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .json(json!({ "status": "unavailable", "code": "not_ready", "detail": detail }))
}
