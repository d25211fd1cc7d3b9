//! GET /openapi.json: the OpenAPI 3.1 document of this API.
//!
//! `docs/openapi.yaml` is the source people edit; `docs/openapi.json` is the same
//! document as JSON (`docs/openapi-json.sh` writes it, and tests/it/openapi.rs fails
//! when the two differ), built in, so the binary carries no YAML parser. The served
//! copy describes this server: the login's `appid` lists the configured
//! mini-programs (any other is a 400 `unknown_app`). It is made once, on first use.

use super::AppState;
use actix_web::http::header::ContentType;
use actix_web::{web, HttpResponse};
use serde_json::Value;
use std::sync::OnceLock;

const DOCUMENT: &str = include_str!("../../docs/openapi.json");

pub async fn document(state: web::Data<AppState>) -> HttpResponse {
    // One AppState per process: its apps never change.
    static SERVED: OnceLock<String> = OnceLock::new();
    let body = SERVED.get_or_init(|| for_apps(&state.apps));
    HttpResponse::Ok()
        .content_type(ContentType::json())
        .body(body.as_str())
}

/// The built-in document with `appid` limited to `apps` (and, in JSON, null).
fn for_apps(apps: &[String]) -> String {
    let Ok(mut document) = serde_json::from_str::<Value>(DOCUMENT) else {
        return DOCUMENT.to_string();
    };
    let known = apps.iter().cloned().map(Value::String);
    let json_enum = known.clone().chain([Value::Null]).collect();
    for (schema, allowed) in [
        ("LoginRequest", Value::Array(json_enum)),
        ("LoginForm", Value::Array(known.collect())),
    ] {
        let pointer = format!("/components/schemas/{schema}/properties/appid");
        if let Some(Value::Object(appid)) = document.pointer_mut(&pointer) {
            appid.insert("enum".into(), allowed);
        }
    }
    document.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_document_lists_the_configured_appids() {
        let served: Value = serde_json::from_str(&for_apps(&["wxa".into(), "wxb".into()]))
            .expect("the built-in document is JSON");
        let schemas = &served["components"]["schemas"];
        assert_eq!(
            schemas["LoginRequest"]["properties"]["appid"]["enum"],
            serde_json::json!(["wxa", "wxb", null])
        );
        assert_eq!(
            schemas["LoginForm"]["properties"]["appid"]["enum"],
            serde_json::json!(["wxa", "wxb"])
        );
    }
}
