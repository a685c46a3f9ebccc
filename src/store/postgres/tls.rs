//! Where a PostgreSQL store connects, and how: the URL's libpq TLS parameters (`sslmode`,
//! `sslrootcert`), which the client crate does not parse, read here and turned into a rustls
//! connector (ring, as the gRPC listener and the AWS client use).
//!
//! - `sslmode=verify-full` (recommended): TLS, the server's certificate chains to a trusted
//!   root and names the host in the URL.
//! - `sslmode=verify-ca`: TLS, the chain is checked but not the name.
//! - `sslmode=disable`, or no `sslmode`: no TLS (for a socket on the same host or loopback).
//! - `require`, `prefer` and `allow` are refused: the first does not check who answers, the
//!   others fall back to plaintext.
//!
//! The trusted roots are `sslrootcert=PATH` (PEM), or the system's (`sslrootcert=system`, the
//! default).

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// How the connection is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protection {
    /// No TLS.
    Plain,
    /// TLS, with the server's certificate checked against `roots`, and its name unless
    /// `check_name` is false.
    Tls {
        /// A PEM file of trusted roots, or `None` for the system's.
        roots: Option<String>,
        /// verify-full (true) or verify-ca (false).
        check_name: bool,
    },
}

/// A URL split into what the client crate parses and how to protect the connection.
pub fn split(url: &str) -> Result<(String, Protection), String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut mode = None;
    let mut roots = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", value)) => mode = Some(value.to_string()),
            Some(("sslrootcert", value)) => roots = Some(percent_decode(value)?),
            _ => rest.push(pair),
        }
    }
    let protection = match mode.as_deref() {
        None | Some("disable") => Protection::Plain,
        Some(full @ ("verify-full" | "verify-ca")) => Protection::Tls {
            roots: roots.filter(|r| r != "system"),
            check_name: full == "verify-full",
        },
        Some(other) => {
            return Err(format!(
                "store.url: sslmode={other} is not supported: use verify-full (or verify-ca) \
                 with sslrootcert=PATH or system, or disable for a local connection"
            ));
        }
    };
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, protection))
}

/// Decodes `%XX` escapes (a root certificate's path may hold some).
fn percent_decode(value: &str) -> Result<String, String> {
    let bad = || "store.url: a malformed %-escape in sslrootcert".to_string();
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// Where to connect and with which TLS connector: every connection of a store (its writer, its
/// pool, its feed, a migration) is made from one.
#[derive(Clone)]
pub struct Target {
    /// The connection settings, `ssl_mode` included.
    pub config: tokio_postgres::Config,
    /// The TLS connector (unused when `ssl_mode` is `Disable`).
    pub tls: MakeRustlsConnect,
}

impl Target {
    /// The target of `config` protected as `protection` says (reading the roots' file).
    pub fn new(
        mut config: tokio_postgres::Config,
        protection: &Protection,
    ) -> Result<Self, StoreError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?;
        let client = match protection {
            Protection::Plain => {
                config.ssl_mode(SslMode::Disable);
                builder
                    .with_root_certificates(RootCertStore::empty())
                    .with_no_client_auth()
            }
            Protection::Tls { roots, check_name } => {
                config.ssl_mode(SslMode::Require);
                let roots = Arc::new(trusted_roots(roots.as_deref())?);
                let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(tls_error)?;
                if *check_name {
                    builder.with_webpki_verifier(verifier)
                } else {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
                }
                .with_no_client_auth()
            }
        };
        Ok(Self {
            config,
            tls: MakeRustlsConnect::new(client),
        })
    }

    /// A target without TLS (tests, local sockets).
    pub fn plain(config: tokio_postgres::Config) -> Result<Self, StoreError> {
        Self::new(config, &Protection::Plain)
    }

    /// A blocking client connected to it (a store's writer, migrations, restores); a failure
    /// to connect is UNAVAILABLE.
    pub fn connect_blocking(&self) -> Result<postgres::Client, StoreError> {
        postgres::Config::from(self.config.clone())
            .connect(self.tls.clone())
            .map_err(super::unavailable)
    }
}

fn tls_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(format!("TLS to PostgreSQL: {e}"))
}

/// The roots in the PEM file `path`, or the system's.
fn trusted_roots(path: Option<&str>) -> Result<RootCertStore, StoreError> {
    let mut store = RootCertStore::empty();
    match path {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| tls_error(format!("sslrootcert {path}: {e}")))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(tls_error(format!(
                    "sslrootcert {path}: no certificate in it"
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(tls_error(
                    "no system root certificates found: name them with sslrootcert=PATH",
                ));
            }
        }
    }
    Ok(store)
}

/// verify-ca: the certificate chains to a trusted root; the name it carries is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
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

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_the_url() {
        let (url, p) = split(
            "postgres://b@db.internal/byokd?sslmode=verify-full&sslrootcert=/etc/ca%20s/root.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(url, "postgres://b@db.internal/byokd?application_name=x");
        assert_eq!(
            p,
            Protection::Tls {
                roots: Some("/etc/ca s/root.pem".into()),
                check_name: true
            }
        );
        let (url, p) = split("postgres://b@db/x?sslmode=verify-ca&sslrootcert=system").unwrap();
        assert_eq!(url, "postgres://b@db/x");
        assert_eq!(
            p,
            Protection::Tls {
                roots: None,
                check_name: false
            }
        );
        assert_eq!(split("postgres://b@db/x").unwrap().1, Protection::Plain);
        assert_eq!(
            split("postgres://b@db/x?sslmode=disable").unwrap().1,
            Protection::Plain
        );
        for refused in ["require", "prefer", "allow", "verify"] {
            let e = split(&format!("postgres://b@db/x?sslmode={refused}")).unwrap_err();
            assert!(e.contains(refused) && e.contains("verify-full"), "{e}");
        }
        assert!(split("postgres://b@db/x?sslmode=verify-full&sslrootcert=%zz").is_err());
    }
}
