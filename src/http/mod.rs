//! The HTTP surface: routes, shared state, and the JSON-only error policy.
//! Handlers are thin: they parse, send one message per step, and shape the answer.

mod access_token;
mod account;
mod auth;
mod body;
pub mod connection;
mod data;
pub mod deadline;
mod decrypt;
pub mod error;
mod forward_auth;
mod health;
mod jwks;
mod login;
mod observe;
mod openapi;
mod phone;
mod ratelimit;
mod token;
mod web_login;

pub use access_token::EndpointSecret;
pub use body::MAX_BODY_BYTES;
pub use ratelimit::{canonical_ip, LoginLimiter};
pub use web_login::WebLoginState;
#[doc(hidden)]
pub use {auth::fuzz_bearer, body::fuzz_decode};

use crate::actors::{
    access_token::AccessTokenKeeper, issuer::TokenIssuer, registry::UserRegistry,
    wechat::WeChatClient,
};
use crate::http::error::{status_error_body, ApiError};
use crate::metrics::Metrics;
use crate::storage::{GroupCommit, ReadStore};
use crate::tokens::JwtKeys;
use actix::Addr;
use actix_web::body::EitherBody;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{self, ErrorHandlerResponse, ErrorHandlers};
use actix_web::{web, App, HttpRequest, HttpResponse};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long a handler waits for an owner actor (registry, issuer) to answer,
/// commit included. Past it the request gets a 503 instead of waiting without bound:
/// `addr.send(msg).timeout(ACTOR_TIMEOUT)`.
pub const ACTOR_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a handler may reach: actor addresses, and the shared read-only parts.
pub struct AppState {
    pub wechat: WeChatClient,
    pub registry: Addr<UserRegistry>,
    pub issuer: Addr<TokenIssuer>,
    /// WeChat's access token, and the calls that need it (phone number).
    pub keeper: AccessTokenKeeper,
    pub keys: Arc<JwtKeys>,
    pub reader: Arc<dyn ReadStore>,
    /// The user registry's cache of decoded users, for the token check.
    pub users: Arc<crate::users::cache::UserCache>,
    /// The token check's reads (the users cache, the store's user and family reads,
    /// awaited, never blocking a worker).
    pub reads: crate::tokens::check::Reads,
    pub commit: GroupCommit,
    /// Configured appids; the first is the default.
    pub apps: Vec<String>,
    pub limiter: Option<LoginLimiter>,
    /// Refreshes per client address (`limits.refresh_per_minute`).
    pub refresh_limiter: Option<LoginLimiter>,
    /// Phone-number requests per user (`limits.phone_per_user_per_minute`).
    pub phone_limiter: Option<crate::ratelimit::KeyedLimiter<crate::users::UserId>>,
    pub trusted_proxies: Vec<IpAddr>,
    pub metrics: Arc<Metrics>,
    /// `None` unless `web_login.enabled`: its routes then answer 404.
    pub web_login: Option<WebLoginState>,
    /// `/readyz`'s last verdict, shared for a second.
    pub readiness: health::Readiness,
}

impl AppState {
    fn resolve_app<'a>(&'a self, requested: Option<&'a str>) -> Result<&'a str, ApiError> {
        match requested {
            None => self
                .apps
                .first()
                .map(String::as_str)
                .ok_or_else(|| ApiError::Internal("no app configured".into())),
            Some(appid) if self.apps.iter().any(|a| a == appid) => Ok(appid),
            Some(appid) => Err(ApiError::UnknownApp(appid.chars().take(64).collect())),
        }
    }

    fn limit_login(&self, req: &HttpRequest) -> Result<(), ApiError> {
        self.limit_address(self.limiter.as_ref(), req)
    }

    fn limit_refresh(&self, req: &HttpRequest) -> Result<(), ApiError> {
        self.limit_address(self.refresh_limiter.as_ref(), req)
    }

    fn limit_address(
        &self,
        limiter: Option<&LoginLimiter>,
        req: &HttpRequest,
    ) -> Result<(), ApiError> {
        let Some(limiter) = limiter else {
            return Ok(());
        };
        match client_ip(req, &self.trusted_proxies) {
            Some(ip) => limiter.check(ip),
            None => Ok(()),
        }
    }
}

/// The client's address: the socket peer, or, when the peer is a trusted proxy,
/// the right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
/// Entries left of that were written by the client and are never believed.
/// IPv4-mapped IPv6 addresses come back as IPv4 (`trusted` holds them so too).
pub fn client_ip(req: &HttpRequest, trusted: &[IpAddr]) -> Option<IpAddr> {
    let peer = canonical_ip(req.peer_addr()?.ip());
    if !trusted.contains(&peer) {
        return Some(peer);
    }
    let forwarded = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for entry in forwarded.iter().rev() {
        match entry.parse::<IpAddr>().map(canonical_ip) {
            Ok(ip) if trusted.contains(&ip) => continue,
            Ok(ip) => return Some(ip),
            Err(_) => return Some(peer),
        }
    }
    Some(peer)
}

/// Each path is served with and without its trailing slash; any other method on
/// a known path is a JSON 405.
pub fn routes(cfg: &mut web::ServiceConfig) {
    endpoint(cfg, "/api/weixin/login/", "POST", login::login);
    endpoint(cfg, "/api/weixin/data/", "GET", data::data);
    endpoint(cfg, "/api/weixin/phone/", "POST", phone::phone);
    endpoint(cfg, "/api/weixin/decrypt/", "POST", decrypt::decrypt);
    endpoint(cfg, "/api/token/refresh/", "POST", token::refresh);
    endpoint(cfg, "/api/token/verify/", "POST", token::verify);
    endpoint(cfg, "/api/token/blacklist/", "POST", token::blacklist);
    endpoint(cfg, "/api/auth/check", "GET", forward_auth::check);
    endpoint(cfg, "/api/weixin/sessions/", "GET", account::sessions);
    // Before `{id}`: its pattern would match `logout-all` too.
    endpoint(
        cfg,
        "/api/weixin/sessions/logout-all/",
        "POST",
        account::logout_all,
    );
    endpoint(
        cfg,
        "/api/weixin/sessions/{id}/",
        "DELETE",
        account::end_session,
    );
    endpoint(cfg, "/api/weixin/user/export/", "GET", account::export_user);
    for path in ["/api/weixin/user", "/api/weixin/user/"] {
        cfg.service(
            web::resource(path)
                .route(web::patch().to(account::update_user))
                .route(web::delete().to(account::delete_user))
                .default_service(web::to(|| async {
                    Err::<HttpResponse, _>(ApiError::MethodNotAllowed {
                        allow: "PATCH, DELETE",
                    })
                })),
        );
    }
    endpoint(cfg, "/openapi.json", "GET", openapi::document);
    endpoint(cfg, "/healthz", "GET", health::healthz);
    endpoint(cfg, "/readyz", "GET", health::readyz);
    endpoint(cfg, "/.well-known/jwks.json", "GET", jwks::jwks);
    endpoint(cfg, "/api/weixin/web-login/", "POST", web_login::create);
    endpoint(
        cfg,
        "/api/weixin/web-login/{ticket}/",
        "GET",
        web_login::poll,
    );
    endpoint(
        cfg,
        "/api/weixin/web-login/{ticket}/scan",
        "POST",
        web_login::scan,
    );
    endpoint(
        cfg,
        "/api/weixin/web-login/{ticket}/confirm",
        "POST",
        web_login::confirm,
    );
    endpoint(
        cfg,
        "/api/weixin/web-login/{ticket}/deny",
        "POST",
        web_login::deny,
    );
    endpoint(cfg, "/web-login/", "GET", web_login::page);
    endpoint(cfg, "/web-login/page.js", "GET", web_login::page_js);
    endpoint(cfg, "/web-login/page.css", "GET", web_login::page_css);
    endpoint(cfg, "/web-login/wxauth-web.js", "GET", web_login::client_js);
    cfg.default_service(web::to(not_found));
}

/// One path in both slash forms, one method, and a 405 naming it for the others.
/// Two static resources rather than one with two patterns: actix-router matches a
/// multi-pattern resource with regexes, on every request.
fn endpoint<F, Args>(cfg: &mut web::ServiceConfig, path: &str, allow: &'static str, handler: F)
where
    F: actix_web::Handler<Args> + Clone,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    let method = actix_web::http::Method::from_bytes(allow.as_bytes()).expect("a valid method");
    let bare = path.trim_end_matches('/');
    for path in [bare.to_string(), format!("{bare}/")] {
        cfg.service(
            web::resource(path)
                .route(web::method(method.clone()).to(handler.clone()))
                .default_service(web::to(move || async move {
                    Err::<HttpResponse, _>(ApiError::MethodNotAllowed { allow })
                })),
        );
    }
}

/// What one listener serves: its routes over the shared state.
#[derive(Clone)]
pub struct AppParts {
    pub state: web::Data<AppState>,
    pub routes: fn(&mut web::ServiceConfig),
    /// The access-token endpoint's bearer secret, for its routes.
    pub secret: Option<web::Data<EndpointSecret>>,
    /// `server.request_timeout`: the deadline of each request's body.
    pub request_timeout: Duration,
    /// Whether each request gets an id, a span, an access line and its metrics (the
    /// API listener; not the metrics or access-token listener).
    pub observe: bool,
}

/// The app of every listener: `parts.routes`, the body's deadline around the
/// extractors that read it, every error as the contract's JSON, `no-store`, and
/// (`parts.observe`) outermost, so that it sees the final status, the observation.
pub fn app(
    parts: &AppParts,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let request_timeout = parts.request_timeout;
    let secret = parts.secret.clone();
    App::new()
        .app_data(parts.state.clone())
        .configure(move |config| {
            if let Some(secret) = secret {
                config.app_data(secret);
            }
        })
        // Innermost: the body's deadline, around the extractors that read it.
        .wrap_fn(move |req, srv| deadline::guard(req, srv, request_timeout))
        .wrap(json_errors())
        .wrap(middleware::DefaultHeaders::new().add(("Cache-Control", "no-store")))
        // Outermost: sees the final status, after errors became JSON.
        .wrap(middleware::Condition::new(
            parts.observe,
            middleware::from_fn(observe::observe),
        ))
        .configure(parts.routes)
}

/// The metrics listener's only route (`metrics.bind`).
pub fn metrics_routes(cfg: &mut web::ServiceConfig) {
    endpoint(cfg, "/metrics", "GET", observe::metrics);
    cfg.default_service(web::to(not_found));
}

/// The access-token listener's only route (`wechat.token_endpoint_bind`).
pub fn access_token_routes(cfg: &mut web::ServiceConfig) {
    endpoint(
        cfg,
        "/api/weixin/access_token/",
        "GET",
        access_token::access_token,
    );
    cfg.default_service(web::to(not_found));
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

/// The safety net: any error response that is not already JSON (one actix-web made
/// itself) is replaced by the contract's JSON for its status.
pub fn json_errors<B: 'static>() -> ErrorHandlers<B> {
    ErrorHandlers::new().default_handler(|res: ServiceResponse<B>| {
        let is_json = res
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        if is_json {
            return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
        }
        let status = res.status();
        let (req, _) = res.into_parts();
        let response = HttpResponse::build(status).json(status_error_body(status));
        Ok(ErrorHandlerResponse::Response(
            ServiceResponse::new(req, response).map_body(|_, b| EitherBody::right(b)),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn client_of(peer: &str, forwarded: Option<&str>, trusted: &[IpAddr]) -> Option<IpAddr> {
        let mut req = TestRequest::default().peer_addr(peer.parse().unwrap());
        if let Some(forwarded) = forwarded {
            req = req.insert_header(("X-Forwarded-For", forwarded));
        }
        client_ip(&req.to_http_request(), trusted)
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4_from_the_socket_and_from_a_proxy() {
        let trusted = [ip("127.0.0.1")];
        // A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d.
        assert_eq!(
            client_of("[::ffff:192.0.2.1]:4000", None, &trusted),
            Some(ip("192.0.2.1"))
        );
        // ...and the trusted proxy is recognised in that form too.
        assert_eq!(
            client_of(
                "[::ffff:127.0.0.1]:4000",
                Some("::ffff:192.0.2.9"),
                &trusted
            ),
            Some(ip("192.0.2.9"))
        );
        // A mapped trusted proxy inside the chain is skipped like the plain one.
        assert_eq!(
            client_of(
                "127.0.0.1:4000",
                Some("198.51.100.7, ::ffff:127.0.0.1"),
                &trusted
            ),
            Some(ip("198.51.100.7"))
        );
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_of("192.0.2.50:4000", Some("198.51.100.7"), &trusted),
            Some(ip("192.0.2.50"))
        );
    }
}
