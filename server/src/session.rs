//! Session tokens: the version vector a client has seen or written, authenticated by the
//! cluster's secret, so any node can tell whether it may answer that client without going back
//! in time.
//!
//! # Format (version 1)
//! ```text
//! token = base64url-nopad( 0x01 || postcard(VersionVector) || tag )
//! tag   = HMAC-SHA256(secret, "meridian-session" || u32be(len(cluster)) || cluster
//!                              || 0x01 || postcard(VersionVector))[..16]
//! ```
//! The secret is the bytes of the `[session] secret_file` (surrounding whitespace trimmed) that
//! `meridian cluster init` writes for the whole cluster; the cluster name is bound into the tag
//! so a token of another cluster sharing a secret by mistake is refused too. A node without a
//! `[session]` section draws an ephemeral random secret at start: its tokens are valid only
//! until it restarts.
//!
//! Decoding never trusts the token further than needed: its length is capped before anything
//! else ([`MAX_TOKEN_LEN`]), the tag is checked (in constant time) before the body is parsed,
//! and the vector may hold at most [`MAX_ENTRIES`] origins.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use meridian_crdt::VersionVector;
use sha2::Sha256;

/// The format this build writes and reads.
pub const TOKEN_VERSION: u8 = 1;
/// The longest token (as text) a node looks at.
pub const MAX_TOKEN_LEN: usize = 4096;
/// The most origins a token's vector may name.
pub const MAX_ENTRIES: usize = 1024;
/// Bytes of the truncated HMAC-SHA256 tag.
pub const TAG_LEN: usize = 16;

const DOMAIN: &[u8] = b"meridian-session";

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("the session token is {0} bytes; the limit is {MAX_TOKEN_LEN}")]
    TooLong(usize),
    #[error("the session token is not base64url text")]
    NotBase64,
    #[error("the session token is truncated")]
    Truncated,
    #[error("session token format {0} is not known to this node")]
    UnknownVersion(u8),
    #[error("the session token was not issued by this cluster (or was altered)")]
    BadTag,
    #[error("the session token's body is malformed")]
    Malformed,
    #[error("the session token names {0} nodes; the limit is {MAX_ENTRIES}")]
    TooManyEntries(usize),
}

/// Why the session secret could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    #[error("cannot read the session secret {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the session secret {0} is empty")]
    Empty(String),
}

/// The key that signs and checks tokens, bound to one cluster name.
#[derive(Clone)]
pub struct SessionKeys {
    /// HMAC already keyed and fed the domain and cluster name: cloning it per token skips
    /// the key schedule, which otherwise costs more than the rest of a token.
    keyed: Hmac<Sha256>,
    cluster: String,
    /// The last token issued: reads of a quiet node carry the same vector again and again.
    last: std::sync::Arc<std::sync::Mutex<Option<(VersionVector, String)>>>,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl SessionKeys {
    pub fn new(secret: &[u8], cluster: &str) -> Self {
        // HMAC takes keys of any length; this cannot fail.
        let mut keyed = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        keyed.update(DOMAIN);
        keyed.update(&(cluster.len() as u32).to_be_bytes());
        keyed.update(cluster.as_bytes());
        Self {
            keyed,
            cluster: cluster.to_owned(),
            last: std::sync::Arc::default(),
        }
    }

    /// A random secret for this process only (a node without `[session]`).
    pub fn ephemeral(cluster: &str) -> Self {
        let secret: [u8; 32] = rand::random();
        Self::new(&secret, cluster)
    }

    /// The secret file's bytes, surrounding whitespace trimmed.
    pub fn load(path: &Path, cluster: &str) -> Result<Self, SecretError> {
        let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let secret = bytes.trim_ascii();
        if secret.is_empty() {
            return Err(SecretError::Empty(path.display().to_string()));
        }
        Ok(Self::new(secret, cluster))
    }

    fn mac(&self, signed: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(signed);
        mac
    }

    /// The token for `vector`.
    pub fn encode(&self, vector: &VersionVector) -> String {
        if let Ok(last) = self.last.lock() {
            if let Some((_, token)) = last.as_ref().filter(|(v, _)| v == vector) {
                return token.clone();
            }
        }
        let token = self.sign(vector);
        if let Ok(mut last) = self.last.lock() {
            *last = Some((vector.clone(), token.clone()));
        }
        token
    }

    fn sign(&self, vector: &VersionVector) -> String {
        let mut bytes = vec![TOKEN_VERSION];
        // Serialising a version vector into a Vec cannot fail.
        if let Ok(body) = postcard::to_extend(vector, Vec::new()) {
            bytes.extend_from_slice(&body);
        }
        let tag = self.mac(&bytes).finalize().into_bytes();
        bytes.extend_from_slice(&tag[..TAG_LEN]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The vector inside `token`, once its length, format, tag and size check out.
    pub fn decode(&self, token: &str) -> Result<VersionVector, TokenError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong(token.len()));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::NotBase64)?;
        if bytes.len() < 1 + TAG_LEN {
            return Err(TokenError::Truncated);
        }
        let (signed, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        let version = signed[0];
        if version != TOKEN_VERSION {
            return Err(TokenError::UnknownVersion(version));
        }
        self.mac(signed)
            .verify_truncated_left(tag)
            .map_err(|_| TokenError::BadTag)?;
        let (vector, rest): (VersionVector, _) =
            postcard::take_from_bytes(&signed[1..]).map_err(|_| TokenError::Malformed)?;
        if !rest.is_empty() {
            return Err(TokenError::Malformed);
        }
        if vector.len() > MAX_ENTRIES {
            return Err(TokenError::TooManyEntries(vector.len()));
        }
        Ok(vector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_crdt::NodeId;
    use proptest::prelude::*;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn keys() -> SessionKeys {
        SessionKeys::new(b"0123456789abcdef", "prod")
    }

    fn vector() -> VersionVector {
        [(n(1), 42), (n(2), 7), (n(3), 1_000_000)]
            .into_iter()
            .collect()
    }

    #[test]
    fn round_trip_and_compact() {
        let token = keys().encode(&vector());
        assert_eq!(keys().decode(&token).unwrap(), vector());
        assert!(token.len() < 64, "{token}");
        let empty = keys().encode(&VersionVector::new());
        assert_eq!(keys().decode(&empty).unwrap(), VersionVector::new());
    }

    #[test]
    fn forged_tags_and_altered_bodies_are_refused() {
        let token = keys().encode(&vector());
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(
            keys().decode(&URL_SAFE_NO_PAD.encode(&bytes)),
            Err(TokenError::BadTag)
        );
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        bytes[2] ^= 0x40;
        assert_eq!(
            keys().decode(&URL_SAFE_NO_PAD.encode(&bytes)),
            Err(TokenError::BadTag)
        );
        let other_secret = SessionKeys::new(b"another secret", "prod");
        assert_eq!(other_secret.decode(&token), Err(TokenError::BadTag));
    }

    #[test]
    fn tokens_of_another_cluster_are_refused() {
        let token = SessionKeys::new(b"0123456789abcdef", "staging").encode(&vector());
        assert_eq!(keys().decode(&token), Err(TokenError::BadTag));
    }

    #[test]
    fn truncated_tokens_are_refused() {
        let token = keys().encode(&vector());
        for cut in 0..token.len() {
            assert!(keys().decode(&token[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(keys().decode(""), Err(TokenError::Truncated));
        assert_eq!(keys().decode("not base64!"), Err(TokenError::NotBase64));
    }

    #[test]
    fn oversized_tokens_and_vectors_are_refused() {
        let long = "A".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            keys().decode(&long),
            Err(TokenError::TooLong(MAX_TOKEN_LEN + 1))
        );
        // A genuine token, but naming more origins than allowed.
        let big: VersionVector = (1..=(MAX_ENTRIES as u64 + 1)).map(|i| (n(i), 1)).collect();
        let token = keys().encode(&big);
        assert!(matches!(
            keys().decode(&token),
            Err(TokenError::TooLong(_) | TokenError::TooManyEntries(_))
        ));
    }

    #[test]
    fn unknown_versions_are_refused() {
        let token = keys().encode(&vector());
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        bytes[0] = 2;
        assert_eq!(
            keys().decode(&URL_SAFE_NO_PAD.encode(&bytes)),
            Err(TokenError::UnknownVersion(2))
        );
    }

    #[test]
    fn secrets_load_trimmed_and_empty_ones_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.secret");
        std::fs::write(&path, "0123456789abcdef\n").unwrap();
        let loaded = SessionKeys::load(&path, "prod").unwrap();
        assert_eq!(loaded.decode(&keys().encode(&vector())).unwrap(), vector());
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(
            SessionKeys::load(&path, "prod"),
            Err(SecretError::Empty(_))
        ));
    }

    proptest! {
        #[test]
        fn random_text_never_panics(text in ".{0,200}") {
            let _ = keys().decode(&text);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = keys().decode(&URL_SAFE_NO_PAD.encode(&bytes));
            // Also with a valid tag over random bodies: the parser itself must not panic.
            let mut signed = vec![TOKEN_VERSION];
            signed.extend_from_slice(&bytes);
            let tag = keys().mac(&signed).finalize().into_bytes();
            signed.extend_from_slice(&tag[..TAG_LEN]);
            let _ = keys().decode(&URL_SAFE_NO_PAD.encode(&signed));
        }

        #[test]
        fn vectors_round_trip(entries in proptest::collection::btree_map(1_u64..5000, any::<u64>(), 0..40)) {
            let vector: VersionVector = entries.into_iter().map(|(k, v)| (n(k), v)).collect();
            prop_assert_eq!(keys().decode(&keys().encode(&vector)).unwrap(), vector);
        }
    }
}
