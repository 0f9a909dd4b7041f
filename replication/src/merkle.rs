//! The anti-entropy Merkle tree: (kind + key → hash of the canonical encoded state).
//!
//! # Shape
//! Keys are spread over [`BUCKETS`] (2^16) leaf buckets by the top 16 bits of
//! `blake3(storage key)`. A bucket's hash is the XOR, over its keys, of
//! `blake3(storage key ‖ state hash)`, where the state hash is `blake3(codec::encode_state)`:
//! because the encoding is canonical, two replicas holding equal states hold equal hashes. XOR
//! makes a bucket updatable in O(1) from the old and the new state hash of one key, so the
//! write path pays one blake3 of the new state bytes, two tiny blake3s and two XORs per key.
//!
//! Interior nodes (fanout 16, [`DEPTH`] = 4 levels above the buckets) are derived on demand:
//! a node's hash is zero when all its children are zero (an empty subtree), else
//! `blake3(children hashes)`. Deriving the root reads all 65 536 bucket hashes (2 MiB of
//! blake3, about a millisecond), which a sync round does a handful of times.
//!
//! A per-bucket index (bucket → key → state hash) lets a differing bucket list its keys.
//! Everything lives in memory and is rebuilt at start-up from the states table.

use std::collections::BTreeMap;

use meridian_crdt::Kind;

/// A blake3 digest.
pub type Hash = [u8; 32];

/// Bits of `blake3(key)` choosing a key's bucket.
pub const BUCKET_BITS: u32 = 16;
/// Number of leaf buckets.
pub const BUCKETS: usize = 1 << BUCKET_BITS;
/// Bits per tree level: each interior node has 16 children.
pub const FANOUT_BITS: u32 = 4;
/// Children per interior node.
pub const FANOUT: usize = 1 << FANOUT_BITS;
/// Levels from the root (depth 0) to the buckets (depth `DEPTH`).
pub const DEPTH: u8 = (BUCKET_BITS / FANOUT_BITS) as u8;

const ZERO: Hash = [0; 32];

/// The storage key of (kind, key): the kind's tag, then the key's bytes. The server's states
/// table uses exactly this layout.
pub fn storage_key(kind: Kind, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + key.len());
    out.push(kind.tag());
    out.extend_from_slice(key.as_bytes());
    out
}

/// Splits a storage key back into kind and key; `None` for bytes no writer produces.
pub fn split_storage_key(bytes: &[u8]) -> Option<(Kind, &str)> {
    let (&tag, rest) = bytes.split_first()?;
    Some((Kind::from_tag(tag)?, std::str::from_utf8(rest).ok()?))
}

/// The hash of one encoded state.
pub fn state_hash(encoded: &[u8]) -> Hash {
    *blake3::hash(encoded).as_bytes()
}

/// The bucket a storage key belongs to.
pub fn bucket_of(key: &[u8]) -> u32 {
    let h = blake3::hash(key);
    let b = h.as_bytes();
    u32::from(u16::from_be_bytes([b[0], b[1]]))
}

/// A key's contribution to its bucket's hash: what anti-entropy fingerprints per key.
pub fn leaf(key: &[u8], state: &Hash) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(key);
    hasher.update(state);
    *hasher.finalize().as_bytes()
}

fn xor(into: &mut Hash, other: &Hash) {
    for (a, b) in into.iter_mut().zip(other) {
        *a ^= b;
    }
}

/// The tree and its per-bucket key index. Not synchronised: owners wrap it in a lock.
#[derive(Clone)]
pub struct MerkleTree {
    buckets: Vec<Hash>,
    keys: Vec<BTreeMap<Vec<u8>, Hash>>,
    len: usize,
}

impl std::fmt::Debug for MerkleTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MerkleTree")
            .field("keys", &self.len)
            .finish_non_exhaustive()
    }
}

impl Default for MerkleTree {
    fn default() -> Self {
        Self::new()
    }
}

impl MerkleTree {
    pub fn new() -> Self {
        Self {
            buckets: vec![ZERO; BUCKETS],
            keys: vec![BTreeMap::new(); BUCKETS],
            len: 0,
        }
    }

    /// Records that `key` now holds a state hashing to `state`. Returns false when unchanged.
    pub fn insert(&mut self, key: &[u8], state: Hash) -> bool {
        self.insert_in(bucket_of(key), key, state)
    }

    /// [`Self::insert`] with the bucket already computed (outside any lock).
    pub fn insert_in(&mut self, bucket: u32, key: &[u8], state: Hash) -> bool {
        let index = bucket as usize % BUCKETS;
        let (Some(hash), Some(keys)) = (self.buckets.get_mut(index), self.keys.get_mut(index))
        else {
            return false;
        };
        let old = keys.insert(key.to_vec(), state);
        match old {
            Some(old) if old == state => return false,
            Some(old) => xor(hash, &leaf(key, &old)),
            None => self.len += 1,
        }
        xor(hash, &leaf(key, &state));
        true
    }

    /// Forgets `key` (its state was garbage-collected to nothing). Returns false when absent.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        let index = bucket_of(key) as usize;
        let (Some(hash), Some(keys)) = (self.buckets.get_mut(index), self.keys.get_mut(index))
        else {
            return false;
        };
        match keys.remove(key) {
            Some(old) => {
                xor(hash, &leaf(key, &old));
                self.len -= 1;
                true
            }
            None => false,
        }
    }

    /// The state hash recorded for `key`.
    pub fn get(&self, key: &[u8]) -> Option<Hash> {
        let index = bucket_of(key) as usize;
        self.keys.get(index)?.get(key).copied()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Buckets holding at least one key.
    pub fn nonempty_buckets(&self) -> usize {
        self.keys.iter().filter(|k| !k.is_empty()).count()
    }

    /// The hash of node `prefix` at `depth` (0 = root, [`DEPTH`] = a bucket); zero when empty
    /// or out of range.
    pub fn node(&self, depth: u8, prefix: u32) -> Hash {
        if depth >= DEPTH {
            return self.buckets.get(prefix as usize).copied().unwrap_or(ZERO);
        }
        let children = self.children(depth, prefix);
        combine(&children)
    }

    /// The [`FANOUT`] children hashes of node `prefix` at `depth` (< [`DEPTH`]).
    pub fn children(&self, depth: u8, prefix: u32) -> [Hash; FANOUT] {
        let mut out = [ZERO; FANOUT];
        if depth >= DEPTH || !valid_prefix(depth, prefix) {
            return out;
        }
        for (c, slot) in out.iter_mut().enumerate() {
            *slot = self.node(depth + 1, (prefix << FANOUT_BITS) | c as u32);
        }
        out
    }

    /// The root hash.
    pub fn root(&self) -> Hash {
        self.node(0, 0)
    }

    /// The keys of `bucket` with their state hashes, in key order.
    pub fn bucket(&self, bucket: u32) -> impl Iterator<Item = (&[u8], &Hash)> {
        self.keys
            .get(bucket as usize)
            .into_iter()
            .flat_map(|m| m.iter().map(|(k, h)| (k.as_slice(), h)))
    }

    /// Number of keys in `bucket`.
    pub fn bucket_len(&self, bucket: u32) -> usize {
        self.keys.get(bucket as usize).map_or(0, BTreeMap::len)
    }
}

/// An interior node's hash from its children: zero for an empty subtree, so both sides agree
/// on emptiness without hashing.
pub fn combine(children: &[Hash]) -> Hash {
    if children.iter().all(|c| *c == ZERO) {
        return ZERO;
    }
    let mut hasher = blake3::Hasher::new();
    for child in children {
        hasher.update(child);
    }
    *hasher.finalize().as_bytes()
}

/// The longest fingerprint anti-entropy may ask for.
pub const MAX_FINGERPRINT: usize = 32;

/// A `len`-byte fingerprint of `hash` under `salt`, appended to `out`.
///
/// Anti-entropy compares short fingerprints instead of 32-byte hashes. A keyed hash rather
/// than a plain truncation, because the requester picks a fresh salt every round: two
/// different hashes that collide on their fingerprints hide a difference for that one round
/// only, and the full root hash (compared unshortened) stays unequal until a later round
/// finds it. `len` is clamped to 1..=[`MAX_FINGERPRINT`].
pub fn fingerprint_into(salt: u64, hash: &Hash, len: usize, out: &mut Vec<u8>) {
    let mut key = [0_u8; 32];
    key[..8].copy_from_slice(&salt.to_le_bytes());
    let digest = blake3::keyed_hash(&key, hash);
    out.extend_from_slice(&digest.as_bytes()[..len.clamp(1, MAX_FINGERPRINT)]);
}

/// The children hashes of each `(depth, prefix)`, concatenated: what a
/// [`crate::wire::Message::TreeReply`] carries. Invalid prefixes give zero hashes.
pub fn children_of(tree: &MerkleTree, depth: u8, prefixes: &[u32]) -> Vec<Hash> {
    let mut out = Vec::with_capacity(prefixes.len().min(crate::wire::MAX_AE_PREFIXES) * FANOUT);
    for &prefix in prefixes {
        out.extend_from_slice(&tree.children(depth, prefix));
    }
    out
}

/// The (key, state hash) items of `buckets`, refused beyond `max_items`.
pub fn items_of(
    tree: &MerkleTree,
    buckets: &[u32],
    max_items: usize,
) -> Result<Vec<(Vec<u8>, Hash)>, crate::StoreError> {
    let total: usize = buckets.iter().map(|&b| tree.bucket_len(b)).sum();
    if total > max_items {
        return Err(crate::StoreError::Unavailable(format!(
            "{total} keys in {} buckets exceed the {max_items}-item limit",
            buckets.len()
        )));
    }
    let mut out = Vec::with_capacity(total);
    for &b in buckets {
        out.extend(tree.bucket(b).map(|(k, h)| (k.to_vec(), *h)));
    }
    Ok(out)
}

/// Whether `prefix` names a node at `depth`.
pub fn valid_prefix(depth: u8, prefix: u32) -> bool {
    depth <= DEPTH && u64::from(prefix) < (1_u64 << (u32::from(depth) * FANOUT_BITS))
}

/// Hex of a hash, for display.
pub fn hex(hash: &Hash) -> String {
    use std::fmt::Write;
    hash.iter().fold(String::with_capacity(64), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_contents_give_equal_roots_whatever_the_order() {
        let mut a = MerkleTree::new();
        let mut b = MerkleTree::new();
        for i in 0..1000_u32 {
            a.insert(format!("k{i}").as_bytes(), state_hash(&i.to_be_bytes()));
        }
        for i in (0..1000_u32).rev() {
            b.insert(format!("k{i}").as_bytes(), state_hash(&[0]));
            b.insert(format!("k{i}").as_bytes(), state_hash(&i.to_be_bytes()));
        }
        assert_eq!(a.root(), b.root());
        assert_eq!(a.len(), 1000);
        b.insert(b"k7", state_hash(b"other"));
        assert_ne!(a.root(), b.root());
        let bucket = bucket_of(b"k7");
        assert_ne!(a.node(DEPTH, bucket), b.node(DEPTH, bucket));
        assert_eq!(MerkleTree::new().root(), ZERO);
    }

    #[test]
    fn children_hash_to_their_parent() {
        let mut t = MerkleTree::new();
        t.insert(b"x", state_hash(b"1"));
        let kids = t.children(0, 0);
        assert_eq!(kids.iter().filter(|k| **k != ZERO).count(), 1);
        assert!(t.children(1, 16).iter().all(|k| *k == ZERO), "out of range");
        assert!(valid_prefix(4, 65535) && !valid_prefix(4, 65536));
    }

    #[test]
    fn removing_a_key_restores_the_previous_hashes() {
        let mut t = MerkleTree::new();
        t.insert(b"a", state_hash(b"1"));
        let before = t.root();
        t.insert(b"b", state_hash(b"2"));
        assert!(t.remove(b"b"));
        assert!(!t.remove(b"b"));
        assert_eq!(t.root(), before);
        assert_eq!(t.len(), 1);
        assert!(t.remove(b"a"));
        assert_eq!(t.root(), ZERO);
    }

    #[test]
    fn fingerprints_depend_on_the_salt() {
        let h = state_hash(b"x");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        fingerprint_into(1, &h, 4, &mut a);
        fingerprint_into(2, &h, 4, &mut b);
        assert_eq!(a.len(), 4);
        assert_ne!(a, b);
        fingerprint_into(1, &h, 0, &mut a);
        assert_eq!(a.len(), 5, "clamped to at least one byte");
    }
}
