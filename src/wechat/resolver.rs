//! The HTTP agent of the WeChat clients (login's `jscode2session`, the access-token
//! keeper), and its name resolution: ureq's own resolver, remembered.
//!
//! ureq resolves the host before every call, pooled connection or not, and with a
//! timeout set it does so on a new thread each time. Under logins that was a thread
//! and a `getaddrinfo` per `jscode2session` call (docs/BENCHMARKS.md). An IP address
//! needs no lookup at all; a name is looked up (by ureq's resolver, with its
//! timeout) at most once per [`REMEMBER_FOR`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use ureq::config::{Config, ConfigBuilder};
use ureq::http::Uri;
use ureq::typestate::AgentScope;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// How long a looked-up address is used before the name is looked up again: short
/// enough to follow a DNS change within a minute.
pub const REMEMBER_FOR: Duration = Duration::from_secs(60);

/// The settings both WeChat clients share: `timeout` for a whole call, any HTTP
/// status read as an answer, and redirects never followed (the URLs carry the
/// AppSecret or the access token, which a `Location` could send anywhere).
pub fn wechat_config(timeout: Duration) -> ConfigBuilder<AgentScope> {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent(concat!("wxauth/", env!("CARGO_PKG_VERSION")))
}

/// A ureq agent with `config` that resolves through a [`CachingResolver`].
pub fn agent(config: Config) -> ureq::Agent {
    ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::default(),
        CachingResolver::default(),
    )
}

#[derive(Debug, Default)]
pub struct CachingResolver {
    lookup: DefaultResolver,
    /// "host:port" → the addresses, and when they were looked up.
    remembered: Mutex<HashMap<String, (Instant, ResolvedSocketAddrs)>>,
}

impl Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return self.lookup.resolve(uri, config, timeout);
        };
        let Some(port) = authority.port_u16().or_else(|| match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        }) else {
            return self.lookup.resolve(uri, config, timeout);
        };
        let host = authority.host();
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            let mut addrs = self.empty();
            addrs.push(SocketAddr::new(ip, port));
            return Ok(addrs);
        }
        let key = format!("{host}:{port}");
        if let Some((at, addrs)) = self.remembered().get(&key) {
            if at.elapsed() < REMEMBER_FOR {
                return Ok(addrs.clone());
            }
        }
        let addrs = self.lookup.resolve(uri, config, timeout)?;
        self.remembered()
            .insert(key, (Instant::now(), addrs.clone()));
        Ok(addrs)
    }
}

impl CachingResolver {
    fn remembered(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, ResolvedSocketAddrs)>> {
        // Never held across a lookup: a poisoned map is still sound.
        self.remembered.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(resolver: &CachingResolver, url: &str) -> Vec<SocketAddr> {
        let uri: Uri = url.parse().unwrap();
        let config = Config::default();
        resolver
            .resolve(&uri, &config, NextTimeout::default())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn ip_addresses_need_no_lookup_and_names_are_remembered() {
        let resolver = CachingResolver::default();
        assert_eq!(
            resolve(&resolver, "http://127.0.0.1:8080/sns"),
            vec!["127.0.0.1:8080".parse().unwrap()]
        );
        assert_eq!(
            resolve(&resolver, "https://[::1]/sns"),
            vec!["[::1]:443".parse().unwrap()]
        );
        assert!(resolver.remembered().is_empty(), "an address is not a name");
        let first = resolve(&resolver, "http://localhost:8080/sns");
        assert!(first
            .iter()
            .all(|a| a.port() == 8080 && a.ip().is_loopback()));
        assert_eq!(resolver.remembered().len(), 1);
        assert_eq!(resolve(&resolver, "http://localhost:8080/other"), first);
    }
}
