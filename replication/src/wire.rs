//! The bytes between two nodes: length-prefixed, optionally lz4-compressed postcard frames.
//!
//! # Frame
//! ```text
//! u32 big-endian payload length | payload
//! payload = encoding byte | body
//!   encoding 0: body is the postcard encoding of a [`Message`]
//!   encoding 1: body is a u32 little-endian uncompressed length, then an lz4 block of the
//!               postcard encoding (lz4_flex's size-prepended block format)
//! ```
//! Payloads and decompressed bodies are capped at [`MAX_FRAME`]: a peer announcing more is
//! refused before anything is allocated, so neither a huge length nor a decompression bomb can
//! exhaust memory. Decoding never panics, whatever the bytes (property-tested below).
//!
//! The protocol version travels in [`Hello`]; a node refuses a peer speaking another version
//! instead of guessing. Golden vectors in the tests freeze version 1.

use std::collections::BTreeMap;

use meridian_crdt::{Kind, NodeId, Stamp, VersionVector};
use serde::{Deserialize, Serialize};

/// The protocol this build speaks, announced in [`Hello`].
pub const PROTOCOL_VERSION: u16 = 1;

/// The largest payload (and decompressed body) a node accepts or sends.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// The ALPN token of the replication protocol: TLS refuses peers that do not speak it.
pub const ALPN: &[u8] = b"meridian/1";

/// The longest key a [`Message::ReadRequest`] may name; longer requests are refused unread.
pub const MAX_READ_KEY: usize = 4096;

/// Bodies shorter than this are sent uncompressed: lz4 cannot win much on a heartbeat.
const COMPRESS_MIN: usize = 512;

const ENCODING_PLAIN: u8 = 0;
const ENCODING_LZ4: u8 = 1;

/// The first message on every connection, in both directions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u16,
    /// Nodes of different clusters refuse each other even if they share a CA by mistake.
    pub cluster: String,
    /// The sender's node id; the receiver checks the TLS certificate is valid for the name it
    /// has configured for this id, so a stolen certificate cannot claim another node.
    pub node: NodeId,
}

/// Everything two nodes say to each other.
///
/// On a connection from subscriber R to publisher S: R sends `Hello`, `Subscribe`, `Ack`,
/// `Heartbeat`; S sends `Hello`, `Batch`, `Truncated`, `Heartbeat`.
///
/// Quorum reads use their own short-lived bidirectional stream on the same connection, beside
/// the WAL streams: R sends one `ReadRequest` and finishes its side; S answers with exactly one
/// `ReadReply` or `ReadFailed` and finishes. Variants are only ever appended, so the encodings
/// (and golden vectors) of the earlier ones do not change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    /// R asks S for the ops of each listed origin with sequence greater than the given one.
    /// Replaces any earlier subscription; `epoch` increases with each, so R can drop batches
    /// S sent for an older one.
    Subscribe {
        epoch: u64,
        after: BTreeMap<NodeId, u64>,
    },
    /// Ops, each in the versioned `meridian_crdt::codec` encoding, in per-origin order.
    Batch {
        epoch: u64,
        ops: Vec<Vec<u8>>,
    },
    /// R's applied vector after durably applying what it received: S's resume cursor for R.
    Ack {
        applied: VersionVector,
    },
    /// Liveness and clock input: the sender's HLC reading when it sent this (fed to the
    /// receiver's HLC), and its wall clock in Unix milliseconds (for the skew estimate: an HLC
    /// that observed a fast peer runs with that peer, so it would hide whose clock is off).
    Heartbeat {
        stamp: Stamp,
        wall_ms: u64,
    },
    /// S cannot serve `origin` from R's cursor: its WAL starts at `first_available`.
    Truncated {
        epoch: u64,
        origin: NodeId,
        first_available: u64,
    },
    /// R asks for one key's state (a quorum read). The key is at most [`MAX_READ_KEY`] bytes.
    ReadRequest {
        kind: Kind,
        key: String,
    },
    /// The key's state in the `meridian_crdt::codec` encoding (`None`: never written there),
    /// and S's applied vector in the same snapshot.
    ReadReply {
        state: Option<Vec<u8>>,
        applied: VersionVector,
    },
    /// S could not answer a `ReadRequest` (or an anti-entropy request).
    ReadFailed {
        reason: String,
    },
    // Anti-entropy. Each request travels on its own bidirectional stream, like `ReadRequest`,
    // and gets exactly one reply (or `ReadFailed`).
    /// R asks for the [`crate::merkle::FANOUT`] children hashes of each listed node at
    /// `depth` (0 = root). At most [`MAX_AE_PREFIXES`] prefixes.
    TreeRequest {
        depth: u8,
        prefixes: Vec<u32>,
    },
    /// The children hashes, `FANOUT` per requested prefix, in request order.
    TreeReply {
        hashes: Vec<[u8; 32]>,
    },
    /// R asks for the (storage key, state hash) lists of leaf buckets. At most
    /// [`MAX_AE_BUCKETS`] buckets.
    BucketRequest {
        buckets: Vec<u32>,
    },
    /// Every key of the requested buckets with its state hash; at most [`MAX_AE_ITEMS`].
    BucketReply {
        items: Vec<(Vec<u8>, [u8; 32])>,
    },
    /// R asks for the full encoded states of storage keys. At most [`MAX_AE_KEYS`].
    StatesRequest {
        keys: Vec<Vec<u8>>,
    },
    /// The states (codec encoding; `None`: absent there), in request order.
    StatesReply {
        states: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    },
    /// R pushes its states of storage keys for S to merge. At most [`MAX_AE_KEYS`].
    PushStates {
        states: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// How many of the pushed keys changed S's state.
    PushReply {
        merged: u64,
    },
    /// Anti-entropy dialogue version 2: salted short fingerprints instead of full hashes, and
    /// states fetched by leaf fingerprint (see [`crate::ae`]). Answered by [`Message::SyncReply`]
    /// (or `ReadFailed`). Nodes keep serving the version-1 requests above, so an older peer can
    /// still sync with a newer one.
    SyncRequest(AeRequest),
    SyncReply(AeReply),
}

/// The version of the anti-entropy dialogue that [`AeRequest`] carries. Version 3 adds
/// [`AeRequest::FetchBounded`] and [`AeRequest::PushBounded`]: states travel with the applied
/// vector of the node that read them, so the receiver merges only states whose ops it has
/// applied (see [`crate::ae`]).
pub const AE_DIALOGUE_VERSION: u8 = 3;

/// The oldest dialogue version a node still answers, so an older peer can sync with a newer
/// one during an upgrade.
pub const AE_DIALOGUE_MIN_VERSION: u8 = 2;

/// A request of the anti-entropy dialogue (versions 2 and 3).
///
/// Fingerprints are `fp_len`-byte keyed hashes under the requester's `salt` (fresh each round;
/// see [`crate::merkle::fingerprint_into`]); `fp_len` must be in 1..=[`crate::merkle::MAX_FINGERPRINT`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AeRequest {
    /// The full 32-byte root hash: identical replicas stop here. `version` is the dialogue
    /// version the requester speaks ([`AE_DIALOGUE_VERSION`]); another one is refused.
    Root { version: u8 },
    /// The fingerprints of the [`crate::merkle::FANOUT`] children of each listed node at
    /// `depth` (< [`crate::merkle::DEPTH`]). At most [`MAX_AE_PREFIXES`] prefixes.
    Children {
        salt: u64,
        fp_len: u8,
        depth: u8,
        prefixes: Vec<u32>,
    },
    /// The fingerprints of the leaves (`leaf(key, state hash)`) of each listed bucket. At most
    /// [`MAX_AE_BUCKETS`] buckets and [`MAX_AE_ITEMS`] leaves in all.
    Leaves {
        salt: u64,
        fp_len: u8,
        buckets: Vec<u32>,
    },
    /// The states of the keys whose leaf fingerprints are listed, per bucket: `(bucket,
    /// concatenated fingerprints)`. At most [`MAX_AE_KEYS`] fingerprints in all.
    Fetch {
        salt: u64,
        fp_len: u8,
        wanted: Vec<(u32, Vec<u8>)>,
    },
    /// Version 3: as [`AeRequest::Fetch`], answered with [`AeReply::BoundedStates`].
    FetchBounded {
        salt: u64,
        fp_len: u8,
        wanted: Vec<(u32, Vec<u8>)>,
    },
    /// Version 3: the requester's states of storage keys for the peer to merge (at most
    /// [`MAX_AE_KEYS`]), with the requester's applied vector read after them, which names
    /// every op they hold. Answered with [`AeReply::Pushed`].
    PushBounded {
        states: Vec<(Vec<u8>, Vec<u8>)>,
        applied: VersionVector,
    },
}

/// The answer to an [`AeRequest`] of the same variant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AeReply {
    Root {
        hash: [u8; 32],
    },
    /// `fp_len` bytes per child, `FANOUT` children per requested prefix, in request order.
    Children {
        fingerprints: Vec<u8>,
    },
    /// Per requested bucket, in request order: its leaves' fingerprints, concatenated.
    Leaves {
        buckets: Vec<Vec<u8>>,
    },
    /// (storage key, encoded state) of every key matching a wanted fingerprint.
    States {
        states: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// As [`AeReply::States`], with the answering node's applied vector read after the
    /// states: it names every op they hold.
    BoundedStates {
        states: Vec<(Vec<u8>, Vec<u8>)>,
        applied: VersionVector,
    },
    /// How many pushed keys changed the peer's state, and how many it left unmerged because it
    /// had not applied every op the pusher's vector names (it merges them in a later round).
    Pushed {
        merged: u64,
        deferred: u64,
    },
}

/// Most tree nodes one [`Message::TreeRequest`] may name.
pub const MAX_AE_PREFIXES: usize = 4096;
/// Most buckets one [`Message::BucketRequest`] may name.
pub const MAX_AE_BUCKETS: usize = 1024;
/// Most items one [`Message::BucketReply`] may carry.
pub const MAX_AE_ITEMS: usize = 100_000;
/// Most keys one [`Message::StatesRequest`] or [`Message::PushStates`] may carry.
pub const MAX_AE_KEYS: usize = 4096;

/// The request a quorum read sends, checked against [`MAX_READ_KEY`].
pub fn read_request(kind: Kind, key: &str) -> Result<Message, WireError> {
    if key.len() > MAX_READ_KEY {
        return Err(WireError::TooLarge(key.len()));
    }
    Ok(Message::ReadRequest {
        kind,
        key: key.to_owned(),
    })
}

/// Malformed or oversized bytes from a peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame encoding {0}")]
    UnknownEncoding(u8),
    #[error("corrupt compressed frame")]
    Decompress,
    #[error("malformed message: {0}")]
    Decode(postcard::Error),
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
}

/// Encodes `message` as a complete frame, length prefix included.
///
/// Fails only when the message itself exceeds [`MAX_FRAME`], which callers prevent by bounding
/// batches far below it.
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, WireError> {
    let body = postcard::to_stdvec(message).map_err(WireError::Decode)?;
    let mut out = Vec::with_capacity(body.len().min(MAX_FRAME) + 5);
    out.extend_from_slice(&[0; 4]);
    if body.len() >= COMPRESS_MIN {
        let compressed = lz4_flex::block::compress_prepend_size(&body);
        if compressed.len() < body.len() {
            out.push(ENCODING_LZ4);
            out.extend_from_slice(&compressed);
        } else {
            out.push(ENCODING_PLAIN);
            out.extend_from_slice(&body);
        }
    } else {
        out.push(ENCODING_PLAIN);
        out.extend_from_slice(&body);
    }
    if body.len() > MAX_FRAME || out.len() - 4 > MAX_FRAME {
        return Err(WireError::TooLarge(body.len().max(out.len() - 4)));
    }
    let len = u32::try_from(out.len() - 4).map_err(|_| WireError::TooLarge(out.len()))?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Reads a frame header: the payload length, refused when over [`MAX_FRAME`].
pub fn payload_len(header: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    if len == 0 {
        return Err(WireError::Empty);
    }
    Ok(len)
}

/// Decodes a payload (a frame without its length prefix).
pub fn decode_payload(payload: &[u8]) -> Result<Message, WireError> {
    let (&encoding, body) = payload.split_first().ok_or(WireError::Empty)?;
    match encoding {
        ENCODING_PLAIN => decode_body(body),
        ENCODING_LZ4 => {
            let (size, block) =
                lz4_flex::block::uncompressed_size(body).map_err(|_| WireError::Decompress)?;
            if size > MAX_FRAME {
                return Err(WireError::TooLarge(size));
            }
            let mut plain = vec![0; size];
            let written = lz4_flex::block::decompress_into(block, &mut plain)
                .map_err(|_| WireError::Decompress)?;
            if written != size {
                return Err(WireError::Decompress);
            }
            decode_body(&plain)
        }
        other => Err(WireError::UnknownEncoding(other)),
    }
}

fn decode_body(body: &[u8]) -> Result<Message, WireError> {
    let (message, rest) = postcard::take_from_bytes(body).map_err(WireError::Decode)?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    Ok(message)
}

/// Splits the first complete frame off `buf`: `Ok(None)` when more bytes are needed, else the
/// message and how many bytes it used. The sans-IO twin of the stream reader in `node`.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    let Some(header) = buf.get(..4) else {
        return Ok(None);
    };
    let mut h = [0; 4];
    h.copy_from_slice(header);
    let len = payload_len(h)?;
    let Some(payload) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    Ok(Some((decode_payload(payload)?, 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn hex(bytes: &[u8]) -> String {
        use std::fmt::Write;
        bytes.iter().fold(String::new(), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
    }

    #[test]
    fn golden_hello() {
        let msg = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            cluster: "prod".into(),
            node: n(3),
        });
        let frame = encode_frame(&msg).unwrap();
        // length 9 | plain | variant 0, version 1, "prod", node 3
        assert_eq!(hex(&frame), "000000090000010470726f6403");
        assert_eq!(decode_frame(&frame).unwrap(), Some((msg, frame.len())));
    }

    #[test]
    fn golden_ack_and_heartbeat() {
        let applied: VersionVector = [(n(1), 300), (n(2), 5)].into_iter().collect();
        let frame = encode_frame(&Message::Ack { applied }).unwrap();
        // length 8 | plain | variant 3, 2 entries: node 1 → 300 (varint ac 02), node 2 → 5
        assert_eq!(hex(&frame), "0000000800030201ac020205");
        let hb = Message::Heartbeat {
            stamp: Stamp::new(0x0102, n(7)),
            wall_ms: 1000,
        };
        let frame = encode_frame(&hb).unwrap();
        // length 7 | plain | variant 4, time 0x102 (varint 82 02), node 7, wall 1000 (e8 07)
        assert_eq!(hex(&frame), "000000070004820207e807");
        assert_eq!(decode_frame(&frame).unwrap(), Some((hb, frame.len())));
    }

    #[test]
    fn large_batches_are_compressed_and_round_trip() {
        let ops = vec![vec![7_u8; 4096]; 10];
        let msg = Message::Batch { epoch: 2, ops };
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(frame[4], ENCODING_LZ4);
        assert!(frame.len() < 4096);
        assert_eq!(decode_frame(&frame).unwrap(), Some((msg, frame.len())));
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocating() {
        assert_eq!(
            payload_len([0xff; 4]),
            Err(WireError::TooLarge(u32::MAX as usize))
        );
        // An lz4 body claiming 4 GiB once decompressed.
        let mut payload = vec![ENCODING_LZ4];
        payload.extend_from_slice(&u32::MAX.to_le_bytes());
        payload.extend_from_slice(&[0; 8]);
        assert_eq!(
            decode_payload(&payload),
            Err(WireError::TooLarge(u32::MAX as usize))
        );
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let frame = encode_frame(&Message::Heartbeat {
            stamp: Stamp::new(1, n(1)),
            wall_ms: 0,
        })
        .unwrap();
        for cut in 0..frame.len() {
            assert_eq!(decode_frame(&frame[..cut]).unwrap(), None);
        }
    }

    #[test]
    fn trailing_bytes_and_unknown_encodings_are_refused() {
        assert_eq!(decode_payload(&[9, 0]), Err(WireError::UnknownEncoding(9)));
        let mut frame = encode_frame(&Message::Heartbeat {
            stamp: Stamp::new(1, n(1)),
            wall_ms: 0,
        })
        .unwrap();
        frame.push(0);
        assert!(matches!(
            decode_payload(&frame[4..]),
            Err(WireError::TrailingBytes(1))
        ));
    }

    #[test]
    fn read_messages_round_trip_and_long_keys_are_refused() {
        let request = read_request(Kind::Set, "cart").unwrap();
        let frame = encode_frame(&request).unwrap();
        assert_eq!(decode_frame(&frame).unwrap(), Some((request, frame.len())));
        let reply = Message::ReadReply {
            state: Some(vec![1, 2, 3]),
            applied: [(n(1), 7)].into_iter().collect(),
        };
        let frame = encode_frame(&reply).unwrap();
        assert_eq!(decode_frame(&frame).unwrap(), Some((reply, frame.len())));
        assert!(read_request(Kind::Set, &"k".repeat(MAX_READ_KEY + 1)).is_err());
    }

    #[test]
    fn anti_entropy_messages_round_trip_and_keep_earlier_variants() {
        let msgs = [
            Message::TreeRequest {
                depth: 1,
                prefixes: vec![3, 15],
            },
            Message::TreeReply {
                hashes: vec![[7; 32]; 16],
            },
            Message::BucketRequest {
                buckets: vec![65535],
            },
            Message::BucketReply {
                items: vec![(b"\x01k".to_vec(), [1; 32])],
            },
            Message::StatesRequest {
                keys: vec![b"\x01k".to_vec()],
            },
            Message::StatesReply {
                states: vec![(b"\x01k".to_vec(), None)],
            },
            Message::PushStates {
                states: vec![(b"\x01k".to_vec(), vec![1, 2])],
            },
            Message::PushReply { merged: 1 },
        ];
        for msg in msgs {
            let frame = encode_frame(&msg).unwrap();
            assert_eq!(decode_frame(&frame).unwrap(), Some((msg, frame.len())));
        }
        // Appended variants: TreeRequest is variant 9, after ReadFailed (8).
        let frame = encode_frame(&Message::TreeRequest {
            depth: 0,
            prefixes: vec![0],
        })
        .unwrap();
        assert_eq!(hex(&frame), "000000050009000100");
    }

    #[test]
    fn golden_sync_dialogue_v2() {
        // SyncRequest is variant 17 (0x11); Root is its variant 0, dialogue version 2.
        let frame = encode_frame(&Message::SyncRequest(AeRequest::Root { version: 2 })).unwrap();
        assert_eq!(hex(&frame), "0000000400110002");
        // Children: variant 1, salt 5, 4-byte fingerprints, depth 2, prefixes [3, 300].
        let msg = Message::SyncRequest(AeRequest::Children {
            salt: 5,
            fp_len: 4,
            depth: 2,
            prefixes: vec![3, 300],
        });
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(hex(&frame), "0000000a0011010504020203ac02");
        // SyncReply is variant 18 (0x12); States is its variant 3.
        let msg = Message::SyncReply(AeReply::States {
            states: vec![(b"\x01k".to_vec(), vec![9])],
        });
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(hex(&frame), "000000090012030102016b0109");
        assert_eq!(decode_frame(&frame).unwrap(), Some((msg, frame.len())));
    }

    #[test]
    fn golden_sync_dialogue_v3() {
        let frame = encode_frame(&Message::SyncRequest(AeRequest::Root {
            version: AE_DIALOGUE_VERSION,
        }))
        .unwrap();
        assert_eq!(hex(&frame), "0000000400110003");
        // FetchBounded is AeRequest variant 4: salt 5, 4-byte fingerprints, bucket 7 → [1,2,3,4].
        let msg = Message::SyncRequest(AeRequest::FetchBounded {
            salt: 5,
            fp_len: 4,
            wanted: vec![(7, vec![1, 2, 3, 4])],
        });
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(hex(&frame), "0000000c001104050401070401020304");
        assert_eq!(decode_frame(&frame).unwrap(), Some((msg, frame.len())));
        // PushBounded is variant 5: one state, the vector {node 2: 9}.
        let node = NodeId::new(2).unwrap();
        let msg = Message::SyncRequest(AeRequest::PushBounded {
            states: vec![(b"\x01k".to_vec(), vec![9])],
            applied: [(node, 9)].into_iter().collect(),
        });
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(
            hex(&frame),
            "0000000c001105010201 6b0109010209".replace(' ', "")
        );
        assert_eq!(decode_frame(&frame).unwrap(), Some((msg, frame.len())));
        // BoundedStates is AeReply variant 4, Pushed variant 5.
        let msg = Message::SyncReply(AeReply::BoundedStates {
            states: vec![(b"\x01k".to_vec(), vec![9])],
            applied: [(node, 9)].into_iter().collect(),
        });
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(
            hex(&frame),
            "0000000c001204010201 6b0109010209".replace(' ', "")
        );
        assert_eq!(decode_frame(&frame).unwrap(), Some((msg, frame.len())));
        let msg = Message::SyncReply(AeReply::Pushed {
            merged: 3,
            deferred: 300,
        });
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(hex(&frame), "0000000600120503ac02");
        assert_eq!(decode_frame(&frame).unwrap(), Some((msg, frame.len())));
    }

    proptest! {
        #[test]
        fn sync_messages_round_trip(
            salt in any::<u64>(),
            fp_len in any::<u8>(),
            numbers in proptest::collection::vec(any::<u32>(), 0..50),
            blobs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..20),
        ) {
            let wanted: Vec<(u32, Vec<u8>)> =
                numbers.iter().copied().zip(blobs.iter().cloned()).collect();
            let msgs = [
                Message::SyncRequest(AeRequest::Leaves { salt, fp_len, buckets: numbers.clone() }),
                Message::SyncRequest(AeRequest::Fetch { salt, fp_len, wanted }),
                Message::SyncReply(AeReply::Children { fingerprints: blobs.concat() }),
                Message::SyncReply(AeReply::Leaves { buckets: blobs.clone() }),
            ];
            for msg in msgs {
                let frame = encode_frame(&msg).unwrap();
                prop_assert_eq!(decode_frame(&frame).unwrap(), Some((msg, frame.len())));
                // Any prefix of a valid body is refused, never a panic.
                for cut in 5..frame.len() {
                    let _ = decode_payload(&frame[4..cut]);
                }
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_frame(&bytes);
            let _ = decode_payload(&bytes);
            let mut lz = vec![ENCODING_LZ4];
            lz.extend_from_slice(&bytes);
            let _ = decode_payload(&lz);
        }

        #[test]
        fn messages_round_trip(
            epoch in any::<u64>(),
            ops in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..700), 0..8),
            seqs in proptest::collection::btree_map(1_u64..50, any::<u64>(), 0..6),
        ) {
            let after: BTreeMap<NodeId, u64> = seqs.iter().map(|(&k, &v)| (n(k), v)).collect();
            for msg in [Message::Batch { epoch, ops: ops.clone() }, Message::Subscribe { epoch, after }] {
                let frame = encode_frame(&msg).unwrap();
                prop_assert_eq!(decode_frame(&frame).unwrap(), Some((msg, frame.len())));
            }
        }

        #[test]
        fn flipped_bytes_never_panic(
            index in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let msg = Message::Batch { epoch: 1, ops: vec![vec![3; 900], vec![4; 10]] };
            let mut frame = encode_frame(&msg).unwrap();
            let i = index.index(frame.len() - 4) + 4;
            frame[i] = byte;
            let _ = decode_frame(&frame);
        }
    }
}
