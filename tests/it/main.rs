//! The integration tests: one crate, so that the test suite links once. Each module
//! drives the real `wxauth` binary (built by cargo for this crate) through `common`.

mod common;

mod account;
mod admin_socket;
mod config;
mod connections;
mod crash;
mod doc_links;
mod durability;
mod edges;
mod events;
mod faults;
mod files;
mod forward_auth;
mod grafana;
mod http;
mod https_front;
mod keeper;
mod keys;
mod layers;
mod limits;
mod login;
mod miniprogram_npm;
mod openapi;
mod ops;
mod postgres;
mod ratelimit;
mod request_span;
mod restore;
mod slow_clients;
mod tls;
mod token_rules;
mod tokens;
mod upgrade;
mod user_cache;
mod web_login;
mod wechat_bounds;
mod wxapi;
