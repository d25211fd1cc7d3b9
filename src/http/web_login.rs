//! Web login (`web_login.enabled`): a browser logs in as the user who scans its
//! mini-program code and confirms on the phone. The rules are in docs/API.md,
//! "Web login"; the tickets in `crate::web_login`; the page in `assets/web-login/`.
//!
//! - `POST /api/weixin/web-login/`: a ticket, its poll secret and the code
//!   (`wxa/getwxacodeunlimit` through the access-token keeper);
//! - `GET /api/weixin/web-login/{ticket}/?wait=N`: the poll (the poll secret as
//!   bearer), a long poll that holds no thread;
//! - `POST /api/weixin/web-login/{ticket}/scan|confirm|deny`: the mini-program,
//!   with its access token;
//! - `GET /web-login/`: the page (and its script, style and `clients/web`).

use super::{auth::Authenticated, AppState};
use crate::actors::access_token::GetWxaCode;
use crate::actors::registry::{SessionOutcome, StartSession};
use crate::http::error::{ApiError, AuthError};
use crate::web_login::{self, Status, WebLoginError, WebLogins, WebTokens};
use actix_web::{http::header, web, HttpRequest, HttpResponse};
use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// What the web login handlers share (present only when `web_login.enabled`).
pub struct WebLoginState {
    pub tickets: Arc<WebLogins>,
    pub config: crate::config::WebLoginConfig,
    /// Tickets per client address per minute (`limits.login_per_minute`), a
    /// budget of its own beside login's.
    pub limiter: Option<super::LoginLimiter>,
}

fn web_state(state: &AppState) -> Result<&WebLoginState, ApiError> {
    state.web_login.as_ref().ok_or(ApiError::NotFound)
}

fn ticket_of(path: &str) -> Result<&str, ApiError> {
    if web_login::is_ticket(path) {
        Ok(path)
    } else {
        Err(ApiError::InvalidRequest(
            "The ticket must be 32 lowercase hex characters.".into(),
        ))
    }
}

pub async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let web = web_state(&state)?;
    if let (Some(limiter), Some(ip)) =
        (&web.limiter, super::client_ip(&req, &state.trusted_proxies))
    {
        limiter.check(ip)?;
    }
    let appid = state.resolve_app(None)?.to_string();
    let issued = web.tickets.create()?;
    let cfg = &web.config;
    // The keeper bounds its own work.
    let code = state
        .keeper
        .wxa_code(GetWxaCode {
            appid,
            scene: issued.ticket.clone(),
            page: cfg.page.clone(),
            env_version: cfg.env_version.clone(),
            check_path: cfg.check_path,
            width: cfg.width,
        })
        .await;
    let code = match code {
        Ok(code) => code,
        Err(e) => {
            web.tickets.forget(&issued.ticket);
            return Err(e.into());
        }
    };
    let qr = format!(
        "data:{};base64,{}",
        code.content_type,
        base64::engine::general_purpose::STANDARD.encode(&code.bytes)
    );
    Ok(HttpResponse::Ok().json(json!({
        "ticket": issued.ticket,
        "poll_secret": issued.poll_secret,
        "qr": qr,
        "expires_in": issued.expires_in,
    })))
}

#[derive(Deserialize)]
pub struct PollQuery {
    wait: Option<String>,
}

pub async fn poll(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<PollQuery>,
) -> Result<HttpResponse, ApiError> {
    let web = web_state(&state)?;
    let ticket = ticket_of(&path)?;
    let wait = match query.wait.as_deref() {
        None => 0,
        Some(text) => match text.parse::<u64>() {
            Ok(secs) if secs <= web_login::MAX_WAIT_SECS => secs,
            _ => {
                return Err(ApiError::InvalidRequest(format!(
                    "`wait` must be a whole number of seconds from 0 to {}.",
                    web_login::MAX_WAIT_SECS
                )))
            }
        },
    };
    let secret = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(WebLoginError::PollSecret)?;
    let status = web
        .tickets
        .poll(ticket, secret.trim(), Duration::from_secs(wait))
        .await?;
    let body = match status {
        Status::Confirmed(tokens) => json!({
            "status": "confirmed",
            "access": tokens.access,
            "refresh": tokens.refresh,
            "access_expires_in": tokens.access_expires_in,
            "refresh_expires_in": tokens.refresh_expires_in,
            "user": { "id": tokens.user_id },
        }),
        other => json!({ "status": other.name() }),
    };
    Ok(HttpResponse::Ok().json(body))
}

pub async fn scan(
    Authenticated(user): Authenticated,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let web = web_state(&state)?;
    web.tickets.scan(ticket_of(&path)?, user.id)?;
    Ok(HttpResponse::Ok().json(json!({ "status": "scanned" })))
}

pub async fn deny(
    Authenticated(user): Authenticated,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let web = web_state(&state)?;
    web.tickets.deny(ticket_of(&path)?, user.id)?;
    Ok(HttpResponse::Ok().json(json!({ "status": "denied" })))
}

/// The confirm: the ticket is held, the user's new family written (durable)
/// and its pair signed, then the pair waits in the ticket for the browser.
pub async fn confirm(
    Authenticated(user): Authenticated,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let web = web_state(&state)?;
    let ticket = ticket_of(&path)?;
    web.tickets.begin_confirm(ticket, user.id)?;
    let started = state
        .registry
        .send(StartSession {
            user_id: user.id,
            keys: state.keys.clone(),
            span: tracing::Span::current(),
        })
        .timeout(super::ACTOR_TIMEOUT)
        .await;
    let (user, pair) = match started {
        Ok(Ok(SessionOutcome::Started { user, pair })) => (user, pair),
        other => {
            web.tickets.abort_confirm(ticket, user.id);
            return Err(match other {
                Ok(Ok(SessionOutcome::Disabled)) => ApiError::UserDisabled,
                Ok(Ok(SessionOutcome::Missing)) => AuthError::UserNotFound.into(),
                Ok(Err(e)) => e.into(),
                Err(e) => e.into(),
                Ok(Ok(SessionOutcome::Started { .. })) => unreachable!("matched above"),
            });
        }
    };
    state.metrics.tokens_issued(1, 1);
    web.tickets.finish_confirm(
        ticket,
        WebTokens {
            user_id: user.id,
            access_expires_in: pair.access.claims.exp - pair.access.claims.iat,
            refresh_expires_in: pair.refresh.claims.exp - pair.refresh.claims.iat,
            access: pair.access.token,
            refresh: pair.refresh.token,
        },
    )?;
    Ok(HttpResponse::Ok().json(json!({ "status": "confirmed" })))
}

// ---- the page ----

const PAGE_HTML: &str = include_str!("../../assets/web-login/index.html");
const PAGE_JS: &str = include_str!("../../assets/web-login/page.js");
const PAGE_CSS: &str = include_str!("../../assets/web-login/page.css");
const CLIENT_JS: &str = include_str!("../../clients/web/index.js");

/// The page's policy: its own script and style, the code as a data: image, its
/// own API; framed only by the configured embedder (else by no one).
fn content_security_policy(embedder: Option<&str>) -> String {
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src data:; \
         connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors {}",
        embedder.unwrap_or("'none'")
    )
}

fn asset(state: &AppState, content_type: &str, body: String) -> Result<HttpResponse, ApiError> {
    let web = web_state(state)?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            content_security_policy(web.config.embedder_origin.as_deref()),
        ))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .body(body))
}

pub async fn page(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let web = web_state(&state)?;
    // The origin is validated at start (scheme, host, port characters only): safe
    // inside an attribute.
    let origin = web.config.embedder_origin.as_deref().unwrap_or("");
    let html = PAGE_HTML.replace("{{EMBEDDER_ORIGIN}}", origin);
    asset(&state, "text/html; charset=utf-8", html)
}

pub async fn page_js(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    asset(&state, "text/javascript; charset=utf-8", PAGE_JS.into())
}

pub async fn page_css(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    asset(&state, "text/css; charset=utf-8", PAGE_CSS.into())
}

pub async fn client_js(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    asset(&state, "text/javascript; charset=utf-8", CLIENT_JS.into())
}
