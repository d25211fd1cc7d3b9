//! The command line.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "wxauth",
    version,
    about = "Login backend for WeChat mini-programs: one binary, one config file."
)]
pub struct Cli {
    /// The config file (default: ./config.toml when it exists).
    #[arg(
        long,
        global = true,
        env = "WXAUTH_CONFIG",
        value_name = "FILE",
        value_parser = clap::builder::TypedValueParser::map(clap::builder::OsStringValueParser::new(), PathBuf::from)
    )]
    config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// The config file named by `--config` or `WXAUTH_CONFIG`. Empty is unset, like
    /// every empty `WXAUTH_` variable.
    pub fn config_file(&self) -> Option<&std::path::Path> {
        self.config
            .as_deref()
            .filter(|path| !path.as_os_str().is_empty())
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Check the configuration and exit: 0 when valid, 2 with one line naming the key when not.
    CheckConfig,
    /// Inspect, disable and enable users (JSON lines on stdout).
    #[command(subcommand)]
    Users(UsersCommand),
    /// Revoke tokens.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// WeChat's side: the access token this server holds.
    #[command(subcommand)]
    Wechat(WechatCommand),
    /// The events waiting for `events.webhook_url` (JSON lines on stdout).
    #[command(subcommand)]
    Events(EventsCommand),
    /// List, rotate, activate and retire the signing keys (JSON lines on stdout). Works with the
    /// server running (it applies the change at once) and without.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Write a consistent JSON-lines snapshot of the whole database (users, token
    /// records, counters) and the generated signing key to a new FILE (mode 0600).
    /// Works with the server running.
    Backup { file: PathBuf },
    /// Restore a backup into an empty data directory (the server must be stopped).
    Restore { file: PathBuf },
    /// Print a new signing key for `jwt.signing_key_file`.
    Keygen {
        #[arg(long, value_enum, default_value_t = KeyAlgorithm::Hs256)]
        algorithm: KeyAlgorithm,
    },
    /// Probe the configured address's /healthz: exit 0 when it answers 200.
    Healthcheck,
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Every user, one JSON object per line.
    List,
    /// One user.
    Show { id: u64 },
    /// The user's sessions (one per login: created, last rotated, expiry), one
    /// JSON object per line.
    Sessions { id: u64 },
    /// Everything wxauth holds on the user, as one JSON object (never the session key).
    Export { id: u64 },
    /// Delete the account: marked for `users.deletion_delay` (a login cancels it),
    /// then its personal data erased; at once with `--now` or a delay of 0.
    Delete {
        id: u64,
        /// Erase now, whatever `users.deletion_delay` says.
        #[arg(long)]
        now: bool,
    },
    /// Refuse the user's logins, refreshes and access tokens from now on.
    Disable { id: u64 },
    /// Undo `disable`.
    Enable { id: u64 },
    /// Ask WeChat whether it still holds the user's stored session key (needs the
    /// running server: it holds the access token).
    CheckSession { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Every event not delivered yet: attempts, next attempt, given up or not.
    List,
    /// Send every waiting or given-up event again now.
    Retry,
}

#[derive(Debug, Subcommand)]
pub enum WechatCommand {
    /// The stored access token's expiry and age, per app; never the token itself.
    Token {
        /// Only this app (default: every app with a stored token).
        #[arg(long)]
        appid: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Revoke every token issued to a user so far (they log in again).
    Revoke {
        #[arg(long)]
        user: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Every key, newest first, with its state: `active` (signs), `published`
    /// (verifies; a new key signs from `signs_from`), `retired`.
    List,
    /// Add a new signing key: published at once, signing once `jwt.jwks_max_age` has
    /// passed. Tokens signed with older keys keep working until they expire or their
    /// key is retired.
    Rotate {
        /// Sign with this key (PEM private key, or HMAC secret) instead of a generated
        /// one. Required for RS256: ring cannot generate RSA keys.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
    },
    /// Stop the key KID verifying: tokens it signed stop working at once.
    Retire { kid: String },
    /// Make the rotated-in key KID sign now, before `jwt.jwks_max_age` has passed.
    Activate { kid: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KeyAlgorithm {
    /// 256 random bits as hex (also right for HS384 and HS512).
    #[value(name = "HS256")]
    Hs256,
    /// A P-256 private key, PKCS#8 PEM.
    #[value(name = "ES256")]
    Es256,
    /// An Ed25519 private key, PKCS#8 PEM.
    #[value(name = "EdDSA")]
    EdDsa,
}

/// A new signing key in the form `jwt.signing_key_file` reads (generated in
/// [`crate::tokens::keys`], where rotation makes them too).
pub fn generate_key(algorithm: KeyAlgorithm) -> String {
    use crate::tokens::keys;
    match algorithm {
        KeyAlgorithm::Hs256 => format!("{}\n", crate::ids::random_hex(32)),
        KeyAlgorithm::Es256 => keys::generate_es256_pem(),
        KeyAlgorithm::EdDsa => keys::generate_ed25519_pem(),
    }
}

/// GET /healthz on the configured address (a wildcard bind is probed on loopback).
pub fn healthcheck(cfg: &crate::config::Config) -> Result<(), String> {
    let mut addr = cfg.server.bind;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let https = cfg.server.tls.cert.is_some();
    let url = format!("{}://{addr}/healthz", if https { "https" } else { "http" });
    // The probe checks liveness, not the certificate: it talks to its own process.
    let tls = ureq::tls::TlsConfig::builder()
        .disable_verification(true)
        .build();
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(5)))
            .http_status_as_error(false)
            .tls_config(tls)
            .build(),
    );
    match agent.get(&url).call() {
        Ok(response) if response.status() == 200 => Ok(()),
        Ok(response) => Err(format!("{url} answered {}", response.status())),
        Err(e) => Err(format!("{url}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem_text: &str) -> Vec<u8> {
        let parsed = pem::parse(pem_text).unwrap();
        assert_eq!(parsed.tag(), "PRIVATE KEY");
        parsed.contents().to_vec()
    }

    #[test]
    fn an_eddsa_key_is_pkcs8_v1_per_rfc_8410() {
        let first = der(&generate_key(KeyAlgorithm::EdDsa));
        let second = der(&generate_key(KeyAlgorithm::EdDsa));
        assert_eq!(first.len(), 48);
        assert_eq!(
            hex::encode(&first[..16]),
            "302e020100300506032b657004220420"
        );
        assert_ne!(first[16..], second[16..], "a fresh seed each time");
        ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&first).unwrap();
    }

    #[test]
    fn es256_and_hs256_keys_have_their_forms() {
        let es = der(&generate_key(KeyAlgorithm::Es256));
        let rng = ring::rand::SystemRandom::new();
        ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &es,
            &rng,
        )
        .unwrap();
        let hs = generate_key(KeyAlgorithm::Hs256);
        assert_eq!(hs.trim_end().len(), 64);
        assert!(hs.trim_end().bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
