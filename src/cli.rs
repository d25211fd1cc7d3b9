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
    #[arg(long, global = true, env = "WXAUTH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
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
    /// Refuse the user's logins, refreshes and access tokens from now on.
    Disable { id: u64 },
    /// Undo `disable`.
    Enable { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Revoke every token issued to a user so far (they log in again).
    Revoke {
        #[arg(long)]
        user: u64,
    },
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

/// A new signing key in the form `jwt.signing_key_file` reads.
pub fn generate_key(algorithm: KeyAlgorithm) -> String {
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = match algorithm {
        KeyAlgorithm::Hs256 => return format!("{}\n", crate::random_hex(32)),
        KeyAlgorithm::Es256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng),
        KeyAlgorithm::EdDsa => Ed25519KeyPair::generate_pkcs8(&rng),
    }
    .expect("the OS random number generator failed");
    pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()))
}

/// GET /healthz on the configured address (a wildcard bind is probed on loopback).
pub fn healthcheck(cfg: &crate::config::Config) -> Result<(), String> {
    let mut addr = cfg.bind_addr();
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
