//! Mutual TLS for the mesh: both sides present a certificate from the cluster CA.
//!
//! The server side requires a client certificate chaining to the CA (rustls's
//! `WebPkiClientVerifier`); the client side verifies the server against the same CA under the
//! name configured for that peer. Which node a client certificate belongs to is checked after
//! the handshake, against the node id the client claims in its `Hello`
//! ([`certificate_matches`]), so a node's certificate cannot be used to speak as another node.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::ReplicationError;
use crate::config::{ReplicationConfig, TlsMaterial};
use crate::wire::{ALPN, MAX_FRAME};

struct Identity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// Labels the secrets derived from the node's private key, so each is used for one thing.
const RESET_KEY_LABEL: &[u8] = b"meridian replication: QUIC stateless reset key v1";
const CID_KEY_LABEL: &[u8] = b"meridian replication: QUIC connection id key v1";

/// The endpoint's configuration, with keys derived from the node's private key rather than
/// drawn at random, so they survive a restart: the stateless-reset key, and the key that marks
/// the connection ids it issues as its own. A node that crashed and came back then recognises
/// its peers' packets for the old connections and answers them with a reset they accept, and
/// they redial at once instead of waiting out the idle timeout. Both stay as secret as the
/// private key (whoever had the reset key could close the node's connections).
pub(crate) fn endpoint_config(
    material: &TlsMaterial,
) -> Result<quinn::EndpointConfig, ReplicationError> {
    let key = PrivateKeyDer::from_pem_slice(&material.key_pem)
        .map_err(|e| tls_err("node key")(e.to_string()))?;
    let master = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.secret_der());
    let reset = ring::hmac::sign(&master, RESET_KEY_LABEL);
    let cid = ring::hmac::sign(&master, CID_KEY_LABEL);
    let mut cid_key = [0_u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(config)
}

fn tls_err(what: &str) -> impl FnOnce(String) -> ReplicationError + '_ {
    move |e| ReplicationError::Tls(format!("{what}: {e}"))
}

fn load(material: &TlsMaterial) -> Result<Identity, ReplicationError> {
    let mut roots = RootCertStore::empty();
    let mut cas = 0;
    for cert in CertificateDer::pem_slice_iter(&material.ca_pem) {
        let cert = cert.map_err(|e| tls_err("CA certificate")(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| tls_err("CA certificate")(e.to_string()))?;
        cas += 1;
    }
    if cas == 0 {
        return Err(ReplicationError::Tls(
            "no CA certificate in the CA PEM".into(),
        ));
    }
    let chain = CertificateDer::pem_slice_iter(&material.cert_chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err("node certificate")(e.to_string()))?;
    if chain.is_empty() {
        return Err(ReplicationError::Tls(
            "no certificate in the node certificate PEM".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&material.key_pem)
        .map_err(|e| tls_err("node key")(e.to_string()))?;
    Ok(Identity {
        roots: Arc::new(roots),
        chain,
        key,
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport settings shared by both directions.
///
/// The idle timeout matches the failure detector, so a silent peer's connection is torn down
/// and redialled. The stream receive window comfortably exceeds the publisher's in-flight window
/// plus one maximal frame: QUIC flow control then never stalls a batch the window allowed.
fn transport(config: &ReplicationConfig) -> Result<quinn::TransportConfig, ReplicationError> {
    let window_bytes = config.window_bytes;
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(config.peer_timeout + config.heartbeat_interval)
        .map_err(|e| ReplicationError::Config(format!("peer_timeout: {e}")))?;
    t.max_idle_timeout(Some(idle));
    t.initial_rtt(config.initial_rtt);
    let stream_window = (window_bytes as u64).saturating_mul(2) + 2 * MAX_FRAME as u64;
    let stream_window = quinn::VarInt::from_u64(stream_window)
        .map_err(|e| ReplicationError::Config(format!("window_bytes: {e}")))?;
    t.stream_receive_window(stream_window);
    t.send_window(u64::from(stream_window).saturating_mul(2));
    // The control stream plus short-lived quorum-read streams.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(68));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(4));
    Ok(t)
}

pub(crate) fn server_config(
    material: &TlsMaterial,
    config: &ReplicationConfig,
) -> Result<quinn::ServerConfig, ReplicationError> {
    let id = load(material)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider())
        .build()
        .map_err(|e| tls_err("client verifier")(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("server config")(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain, id.key)
        .map_err(|e| tls_err("node certificate or key")(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic =
        QuicServerConfig::try_from(tls).map_err(|e| tls_err("QUIC server")(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(transport(config)?));
    Ok(server)
}

pub(crate) fn client_config(
    material: &TlsMaterial,
    config: &ReplicationConfig,
) -> Result<quinn::ClientConfig, ReplicationError> {
    let id = load(material)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("client config")(e.to_string()))?
        .with_root_certificates(id.roots)
        .with_client_auth_cert(id.chain, id.key)
        .map_err(|e| tls_err("node certificate or key")(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic =
        QuicClientConfig::try_from(tls).map_err(|e| tls_err("QUIC client")(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(transport(config)?));
    Ok(client)
}

/// True when the certificate the peer presented on `connection` (already verified against
/// the CA during the handshake) is valid for `name`.
pub(crate) fn certificate_matches(connection: &quinn::Connection, name: &str) -> bool {
    let Some(identity) = connection.peer_identity() else {
        return false;
    };
    let Ok(chain) = identity.downcast::<Vec<CertificateDer<'static>>>() else {
        return false;
    };
    let Some(leaf) = chain.first() else {
        return false;
    };
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    ParsedCertificate::try_from(leaf)
        .and_then(|parsed| rustls::client::verify_server_name(&parsed, &server_name))
        .is_ok()
}
