//! `storage.postgres_url`: a libpq-style URL, parsed once (in src/config/) into the
//! client's settings and how TLS is checked.
//!
//! tokio-postgres knows `sslmode` `disable`, `prefer` and `require` only, and no
//! `sslrootcert`; managed PostgreSQL documents `verify-full` with a CA file. So the two
//! parameters are taken out of the URL here and turned into a [`TlsCheck`], and the
//! rest is handed to tokio-postgres. The meanings are libpq's:
//!
//! | sslmode | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (the default) | if the server offers it | no |
//! | `require` | always | no; with `sslrootcert`, the chain (as libpq's verify-ca) |
//! | `verify-ca` | always | the chain, against `sslrootcert` |
//! | `verify-full` | always | the chain and the host name, against `sslrootcert` |
//!
//! `sslrootcert` is a PEM file of CA certificates (a relative path is looked up in
//! `$CREDENTIALS_DIRECTORY` first), or `system` for the Mozilla roots that WeChat's
//! HTTPS client trusts too.

use std::path::PathBuf;

/// Where the server's certificate must lead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// `sslrootcert=system`: the Mozilla roots (webpki-roots).
    System,
}

/// How the server's certificate is checked when the connection uses TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsCheck {
    /// Encrypted, the certificate not checked (`prefer`, `require`): as libpq.
    None,
    /// The chain leads to one of these roots; the name is not checked (`verify-ca`).
    Chain(RootCerts),
    /// The chain and the host name (`verify-full`).
    Full(RootCerts),
}

/// A parsed `storage.postgres_url`. Its `Debug` never shows the password.
#[derive(Clone)]
pub struct PostgresUrl {
    pub client: tokio_postgres::Config,
    pub tls: TlsCheck,
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresUrl")
            .field("hosts", &self.client.get_hosts())
            .field("dbname", &self.client.get_dbname())
            .field("user", &self.client.get_user())
            .field("password", &"[redacted]")
            .field("ssl_mode", &self.client.get_ssl_mode())
            .field("tls", &self.tls)
            .finish()
    }
}

impl PostgresUrl {
    /// The rustls client config for [`tls`](Self::tls), ring provider only. Reads the
    /// `sslrootcert` file (already resolved by src/config/); errors name the file.
    pub fn tls_config(&self) -> Result<rustls::ClientConfig, String> {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::client::WebPkiServerVerifier;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("cannot set up TLS: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = match &self.tls {
            TlsCheck::None => Arc::new(NoCheck(provider)),
            TlsCheck::Chain(roots) | TlsCheck::Full(roots) => {
                let roots = Arc::new(root_store(roots)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| format!("cannot use sslrootcert: {e}"))?;
                match &self.tls {
                    TlsCheck::Full(_) => webpki,
                    _ => Arc::new(ChainOnly(webpki)),
                }
            }
        };
        Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth())
    }
}

fn root_store(roots: &RootCerts) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut store = rustls::RootCertStore::empty();
    match roots {
        RootCerts::System => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        RootCerts::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "sslrootcert {}: no usable CA certificate in it",
                    path.display()
                ));
            }
        }
    }
    Ok(store)
}

/// `prefer` and `require` without roots: encrypted, the peer not authenticated (as
/// libpq). The handshake's signatures are still checked, with ring.
#[derive(Debug)]
struct NoCheck(Arc<rustls::crypto::CryptoProvider>);

/// `verify-ca`: the chain must lead to a root; the host name is not compared.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Parses a `postgres://` or `postgresql://` URL. The error never repeats the URL
/// (it holds the password); it names what is wrong.
pub fn parse(text: &str) -> Result<PostgresUrl, String> {
    let text = text.trim();
    if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
        return Err(
            "must be a URL like postgres://user:password@host:5432/dbname?sslmode=verify-full"
                .into(),
        );
    }
    let (base, query) = match text.split_once('?') {
        Some((base, query)) => (base, query),
        None => (text, ""),
    };
    let mut sslmode = None;
    let mut rootcert = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| format!("the value of {key} is not UTF-8"))?
            .into_owned();
        match key {
            "sslmode" => sslmode = Some(decoded),
            "sslrootcert" => rootcert = Some(decoded),
            "sslcert" | "sslkey" | "sslcrl" | "sslpassword" => {
                return Err(format!("{key} is not supported (client certificates)"))
            }
            _ => kept.push(pair),
        }
    }
    let roots = rootcert.map(|value| match value.as_str() {
        "system" => RootCerts::System,
        path => RootCerts::File(PathBuf::from(path)),
    });
    use tokio_postgres::config::SslMode;
    let (mode, tls) =
        match (sslmode.as_deref().unwrap_or("prefer"), roots) {
            ("disable", _) => (SslMode::Disable, TlsCheck::None),
            ("allow" | "prefer", _) => (SslMode::Prefer, TlsCheck::None),
            ("require", None) => (SslMode::Require, TlsCheck::None),
            ("require" | "verify-ca", Some(roots)) => (SslMode::Require, TlsCheck::Chain(roots)),
            ("verify-full", Some(roots)) => (SslMode::Require, TlsCheck::Full(roots)),
            ("verify-ca" | "verify-full", None) => {
                return Err(
                    "sslmode=verify-ca and verify-full need sslrootcert (a CA file, or \"system\")"
                        .into(),
                )
            }
            _ => return Err(
                "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full"
                    .into(),
            ),
        };
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut client: tokio_postgres::Config = rest
        .parse()
        // tokio-postgres's message names the bad part, never the password.
        .map_err(|e: tokio_postgres::Error| format!("not a usable PostgreSQL URL: {e}"))?;
    if client.get_hosts().is_empty() {
        return Err("names no host".into());
    }
    if client.get_dbname().is_none() {
        return Err("names no database (postgres://user@host/DBNAME)".into());
    }
    client.ssl_mode(mode);
    if client.get_application_name().is_none() {
        client.application_name("wxauth");
    }
    Ok(PostgresUrl { client, tls })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::SslMode;

    #[test]
    fn sslmodes_are_libpqs() {
        let url = |q: &str| parse(&format!("postgres://u:p@db.example:5432/wx{q}"));
        let prefer = url("").unwrap();
        assert_eq!(prefer.client.get_ssl_mode(), SslMode::Prefer);
        assert_eq!(prefer.tls, TlsCheck::None);
        let require = url("?sslmode=require").unwrap();
        assert_eq!(require.client.get_ssl_mode(), SslMode::Require);
        assert_eq!(require.tls, TlsCheck::None);
        let full =
            url("?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3").unwrap();
        assert_eq!(full.client.get_ssl_mode(), SslMode::Require);
        assert_eq!(
            full.tls,
            TlsCheck::Full(RootCerts::File(PathBuf::from("/etc/ca.pem")))
        );
        assert_eq!(
            full.client.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        let ca = url("?sslmode=require&sslrootcert=system").unwrap();
        assert_eq!(ca.tls, TlsCheck::Chain(RootCerts::System));
        assert_eq!(
            url("?sslmode=disable").unwrap().client.get_ssl_mode(),
            SslMode::Disable
        );
        assert!(url("?sslmode=verify-full").is_err(), "no roots");
        assert!(url("?sslmode=bogus").is_err());
        assert!(url("?sslcert=/x").is_err());
    }

    #[test]
    fn errors_never_repeat_the_password() {
        for bad in [
            "host=db password=hunter2",
            "postgres://u:hunter2@db",
            "postgres://u:hunter2@db/wx?sslmode=hunter2",
            "postgres://u:hunter2@db/wx?bogus=1",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(!err.contains("hunter2"), "{err}");
        }
        let debug = format!("{:?}", parse("postgres://u:hunter2@db/wx").unwrap());
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
