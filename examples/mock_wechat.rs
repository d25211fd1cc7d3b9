//! A fast stand-in for WeChat's `sns/jscode2session`, for the benchmark suite
//! (`bench/run.sh`): it lets wxauth's real HTTP client (ureq) run at full speed
//! on loopback, so that a login benchmark includes the client's cost.
//!
//! ```text
//! cargo run --release --example mock_wechat -- [BIND] [APPID] [SECRET] [WORKERS]
//! ```
//!
//! Defaults: `127.0.0.1:0` (a free port), `wxbench`, `benchsecret`, 1 worker.
//! It prints `listening address=HOST:PORT` on stderr once it accepts connections.
//!
//! It answers like WeChat: HTTP 200 whatever happened, labelled `text/plain`.
//! A code `name.anything` gives the openid `o-name` (so a fixed set of names with
//! changing suffixes are returning users, and unique names are new users); a code
//! without `name.` is errcode 40029; a wrong appid or secret is errcode 40013.
//! Codes are not single-use (the benchmark never replays one anyway).

use actix_web::{web, App, HttpResponse, HttpServer};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Deserialize)]
struct Jscode2Session {
    appid: String,
    secret: String,
    js_code: String,
    grant_type: String,
}

struct Credentials {
    appid: String,
    secret: String,
}

/// WeChat's way of answering: 200, text/plain, the JSON in the body.
fn wechat_reply(body: serde_json::Value) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain")
        .body(body.to_string())
}

async fn jscode2session(
    query: web::Query<Jscode2Session>,
    creds: web::Data<Arc<Credentials>>,
) -> HttpResponse {
    if query.appid != creds.appid
        || query.secret != creds.secret
        || query.grant_type != "authorization_code"
    {
        return wechat_reply(serde_json::json!({
            "errcode": 40013,
            "errmsg": "invalid appid, rid: bench"
        }));
    }
    match query.js_code.split_once('.') {
        Some((name, _)) if !name.is_empty() => wechat_reply(serde_json::json!({
            "openid": format!("o-{name}"),
            "session_key": "YmVuY2hzZXNzaW9ua2V5AA==",
        })),
        _ => wechat_reply(serde_json::json!({
            "errcode": 40029,
            "errmsg": "invalid code, rid: bench"
        })),
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let bind = args.next().unwrap_or_else(|| "127.0.0.1:0".into());
    let creds = Arc::new(Credentials {
        appid: args.next().unwrap_or_else(|| "wxbench".into()),
        secret: args.next().unwrap_or_else(|| "benchsecret".into()),
    });
    let workers: usize = match args.next() {
        Some(w) => w
            .parse()
            .map_err(|_| std::io::Error::other(format!("WORKERS must be a number, not {w:?}")))?,
        None => 1,
    };
    let addr: std::net::SocketAddr = bind
        .parse()
        .map_err(|_| std::io::Error::other(format!("{bind:?} is not an address")))?;
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::other(
            "the mock WeChat server only binds loopback addresses",
        ));
    }

    actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(creds.clone()))
                .route("/sns/jscode2session", web::get().to(jscode2session))
        })
        .workers(workers)
        // The client pools keep-alive connections; do not close them under it.
        .keep_alive(std::time::Duration::from_secs(75))
        .backlog(1024)
        .bind(addr)?;
        for addr in server.addrs() {
            eprintln!("listening address={addr}");
        }
        server.run().await
    })
}
