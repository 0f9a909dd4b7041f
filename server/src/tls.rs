//! TLS for the HTTP API, and what the node reports about the certificates it has loaded.
//!
//! The acceptor's certificate sits behind a resolver whose key can be swapped at run time
//! ([`HttpTls::reload`], on SIGHUP): connections already up keep their session, new handshakes
//! get the new certificate, and the listener never closes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("TLS: {0}")]
    Config(String),
}

/// A loaded certificate, as `/v1/cluster` shows it: enough to tell which one is in use.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq, Eq)]
pub struct CertInfo {
    /// Hex SHA-256 of the leaf certificate's DER.
    pub fingerprint_sha256: String,
    pub subject: String,
    /// RFC 2822.
    pub not_after: String,
    /// Unix milliseconds when this node loaded it.
    pub loaded_at_ms: u64,
}

impl CertInfo {
    pub fn of(leaf: &CertificateDer<'_>) -> Self {
        use std::fmt::Write as _;
        let fingerprint =
            Sha256::digest(leaf.as_ref())
                .iter()
                .fold(String::with_capacity(64), |mut s, b| {
                    let _ = write!(s, "{b:02x}");
                    s
                });
        let (subject, not_after) = match x509_parser::parse_x509_certificate(leaf.as_ref()) {
            Ok((_, cert)) => (
                cert.subject().to_string(),
                cert.validity().not_after.to_rfc2822().unwrap_or_default(),
            ),
            Err(_) => (String::new(), String::new()),
        };
        Self {
            fingerprint_sha256: fingerprint,
            subject,
            not_after,
            loaded_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a PEM certificate chain (leaf first).
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            detail: format!("bad certificate PEM: {e}"),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            detail: "no certificate in the file".into(),
        });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        detail: format!("no usable private key: {e}"),
    })
}

/// Loads and checks a certificate and its key: the key must match the certificate.
fn certified_key(cert: &Path, key: &Path) -> Result<(CertifiedKey, CertInfo), TlsError> {
    let chain = read_chain(cert)?;
    let key_der = read_key(key)?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key_der, &provider).map_err(|e| {
        TlsError::Config(format!(
            "{} and {} do not form a usable identity: {e}",
            cert.display(),
            key.display()
        ))
    })?;
    let info = CertInfo::of(&certified.cert[0]);
    Ok((certified, info))
}

#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The HTTP API's TLS: an acceptor and the files its certificate is reloaded from.
pub struct HttpTls {
    cert: PathBuf,
    key: PathBuf,
    resolver: Arc<Resolver>,
    acceptor: tokio_rustls::TlsAcceptor,
    info: RwLock<CertInfo>,
}

impl HttpTls {
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Self, TlsError> {
        let (certified, info) = certified_key(&cert, &key)?;
        let resolver = Arc::new(Resolver(RwLock::new(Arc::new(certified))));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            cert,
            key,
            resolver,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            info: RwLock::new(info),
        })
    }

    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// Re-reads the certificate and key; on error the current ones stay in use.
    pub fn reload(&self) -> Result<CertInfo, TlsError> {
        let (certified, info) = certified_key(&self.cert, &self.key)?;
        *self
            .resolver
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(certified);
        self.info
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clone_from(&info);
        Ok(info)
    }

    pub fn info(&self) -> CertInfo {
        self.info
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl std::fmt::Debug for HttpTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}
