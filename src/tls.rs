//! Built-in HTTPS: a rustls server config (ring provider, TLS 1.2 and 1.3) from the
//! PEM files named by `server.tls.cert` and `server.tls.key`.

use crate::config::{resolve_credential_path, ConfigError};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

const CERT_KEY: &str = "server.tls.cert";
const KEY_KEY: &str = "server.tls.key";

/// Loads the certificate chain (leaf first) and its private key and checks that they
/// belong together. A relative path is looked up in systemd's `$CREDENTIALS_DIRECTORY`
/// first, like the other secret files. ALPN offers `http/1.1` only (the server speaks
/// HTTP/1.1).
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, ConfigError> {
    let cert_path = resolve_credential_path(cert);
    let key_path = resolve_credential_path(key);

    let chain = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(CERT_KEY, "certificate", &cert_path, e))?;
    if chain.is_empty() {
        return Err(ConfigError::new(
            CERT_KEY,
            format!("no certificate found in {}", cert_path.display()),
        ));
    }
    let private_key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| pem_error(KEY_KEY, "private key", &key_path, e))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Parse the key on its own first, so that an unusable key is blamed on the key.
    provider
        .key_provider
        .load_private_key(private_key.clone_key())
        .map_err(|e| {
            ConfigError::new(
                KEY_KEY,
                format!(
                    "unusable private key in {} ({e}); expected an RSA, ECDSA or Ed25519 key in PEM",
                    key_path.display()
                ),
            )
        })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ConfigError::new("server.tls", format!("cannot set up TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                ConfigError::new(
                    KEY_KEY,
                    format!(
                        "the key in {} does not match the certificate in {}",
                        key_path.display(),
                        cert_path.display()
                    ),
                )
            }
            other => ConfigError::new(
                CERT_KEY,
                format!("unusable certificate in {} ({other})", cert_path.display()),
            ),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn pem_error(key: &str, what: &str, path: &Path, err: pem::Error) -> ConfigError {
    let path = path.display();
    // Never echo file contents: the key file holds the private key.
    let reason = match err {
        pem::Error::NoItemsFound => format!("no {what} found in {path}"),
        pem::Error::Io(e) => format!("cannot read {path}: {e}"),
        pem::Error::MissingSectionEnd { .. } => {
            format!("{path} is not valid PEM: a section has no END line")
        }
        pem::Error::IllegalSectionStart { .. } => {
            format!("{path} is not valid PEM: a malformed BEGIN line")
        }
        pem::Error::Base64Decode(_) => format!("{path} is not valid PEM: bad base64"),
        _ => format!("{path} is not valid PEM"),
    };
    ConfigError::new(key, reason)
}
