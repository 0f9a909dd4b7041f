//! The journal: an append-only log of op batches, the unit of durability.
//!
//! A redb commit that fsyncs costs over a millisecond here, almost all of it in making the
//! B-tree durable (a non-durable commit of the same batch takes ~50 µs). Appending the batch's
//! ops to this file and calling `fdatasync` costs a fraction of that, so writes are durable
//! once their batch is in the journal; redb absorbs them with non-durable commits and is made
//! durable by a periodic checkpoint, after which older journal segments are deleted.
//!
//! # Format
//! Segments `journal-{n:020}.log`, replayed in order. Each record is
//! `[u32 LE payload length][u32 LE CRC-32 of (segment number LE ‖ payload)][payload]`, the
//! payload a sequence of `[u32 LE length][codec-encoded Op]`. A record whose length or checksum
//! does not match ends its segment: it is a torn write from a crash (its fsync never returned,
//! so none of its writes were acknowledged), or what follows the last record.
//!
//! # Recycling
//! `fdatasync` on a file that grows must also persist the new size; overwriting space the
//! file already has does not, and costs about half as much here. So segments are written in
//! place over pre-allocated space: the first one is zero-filled to [`SEGMENT_BYTES`], and a
//! pruned segment is renamed to be the next one, as PostgreSQL recycles WAL segments. The old
//! records a recycled file still holds carry their old segment number in their checksum, so
//! they never pass as records of the new one.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use meridian_crdt::{Op, codec};

/// Refuse records larger than this on replay: no writer produces them, so they are corrupt.
const MAX_RECORD: usize = 1 << 30;

/// Space given to a fresh segment up front, so appends overwrite instead of growing the file.
pub(crate) const SEGMENT_BYTES: u64 = 16 << 20;

const SPARE: &str = "journal-spare.log";

#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    segment: u64,
    file: BufWriter<File>,
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("journal-{segment:020}.log"))
}

fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_prefix("journal-")
            .and_then(|n| n.strip_suffix(".log"))
        {
            if let Ok(n) = n.parse() {
                found.push(n);
            }
        }
    }
    found.sort_unstable();
    Ok(found)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn checksum(segment: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&segment.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Encodes one batch of ops as a journal record; the checksum is filled in by
/// [`Journal::append`], which knows the segment.
pub(crate) fn encode_record<O: AsRef<[u8]>>(ops: &[O]) -> Vec<u8> {
    let payload_len: usize = ops.iter().map(|op| 4 + op.as_ref().len()).sum();
    let mut record = Vec::with_capacity(8 + payload_len);
    record.extend_from_slice(&(payload_len as u32).to_le_bytes());
    record.extend_from_slice(&[0; 4]);
    for op in ops {
        let op = op.as_ref();
        record.extend_from_slice(&(op.len() as u32).to_le_bytes());
        record.extend_from_slice(op);
    }
    record
}

/// Ops of a record payload; `None` if the payload is not what `encode_record` writes.
fn decode_payload(mut payload: &[u8]) -> Option<Vec<Op>> {
    let mut ops = Vec::new();
    while !payload.is_empty() {
        let len = u32::from_le_bytes(payload.get(..4)?.try_into().ok()?) as usize;
        let bytes = payload.get(4..4 + len)?;
        ops.push(codec::decode_op(bytes).ok()?);
        payload = &payload[4 + len..];
    }
    Some(ops)
}

/// What replay found.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    pub(crate) ops: Vec<Op>,
    /// Segments that end in an invalid record rather than zeros: a write torn by a crash, or
    /// the old records of a recycled file.
    pub(crate) torn_segments: u64,
}

impl Journal {
    /// Reads every segment in `dir` for replay. The caller applies the ops, checkpoints, and
    /// then calls [`Journal::start`], which deletes the replayed segments.
    pub(crate) fn replay(dir: &Path) -> io::Result<Replay> {
        std::fs::create_dir_all(dir)?;
        let mut replay = Replay::default();
        for segment in segments(dir)? {
            let mut bytes = Vec::new();
            File::open(segment_path(dir, segment))?.read_to_end(&mut bytes)?;
            let mut at = 0usize;
            while at < bytes.len() {
                let record = (|| {
                    let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
                    let crc = u32::from_le_bytes(bytes.get(at + 4..at + 8)?.try_into().ok()?);
                    if len > MAX_RECORD {
                        return None;
                    }
                    let payload = bytes.get(at + 8..at + 8 + len)?;
                    (len > 0 && checksum(segment, payload) == crc).then_some((len, payload))
                })();
                let Some((len, payload)) = record else {
                    // Zeros or old records of a recycled file are the normal end of a
                    // segment; anything else was torn by a crash.
                    let rest = &bytes[at..];
                    if rest.get(..4).is_some_and(|l| l != [0; 4]) {
                        replay.torn_segments += 1;
                    }
                    break;
                };
                match decode_payload(payload) {
                    Some(ops) => replay.ops.extend(ops),
                    None => {
                        // The checksum matched but the ops do not decode: written by a newer
                        // format. Refuse to guess; stopping here would lose acknowledged data.
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("journal segment {segment}: undecodable record at byte {at}"),
                        ));
                    }
                }
                at += 8 + len;
            }
        }
        Ok(replay)
    }

    /// Opens a fresh segment after every existing one, and recycles or deletes the existing
    /// ones: call it only once their contents are durable elsewhere (replayed and
    /// checkpointed).
    pub(crate) fn start(dir: &Path) -> io::Result<Self> {
        let existing = segments(dir)?;
        let segment = existing.last().map_or(1, |last| last + 1);
        let journal = Self::create(dir, segment)?;
        journal.prune_before(segment)?;
        Ok(journal)
    }

    /// Opens segment `segment` over the spare file if there is one, else over a new zero-filled
    /// file, positioned at its start.
    fn create(dir: &Path, segment: u64) -> io::Result<Self> {
        let path = segment_path(dir, segment);
        let spare = dir.join(SPARE);
        if spare.exists() {
            std::fs::rename(&spare, &path)?;
        } else {
            let mut file = OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&path)?;
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..SEGMENT_BYTES / (1 << 20) {
                file.write_all(&zeros)?;
            }
            file.sync_all()?;
        }
        sync_dir(dir)?;
        let file = OpenOptions::new().write(true).open(&path)?;
        Ok(Self {
            dir: dir.to_owned(),
            segment,
            file: BufWriter::with_capacity(1 << 20, file),
        })
    }

    pub(crate) fn append(&mut self, record: &[u8]) -> io::Result<()> {
        if record.len() < 8 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a journal record",
            ));
        }
        let crc = checksum(self.segment, &record[8..]);
        self.file.write_all(&record[..4])?;
        self.file.write_all(&crc.to_le_bytes())?;
        self.file.write_all(&record[8..])
    }

    /// Makes everything appended so far durable.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_data()
    }

    /// Continues in a new segment; returns the new segment's number. Records before it may be
    /// dropped with [`Journal::prune_before`] once a checkpoint covers them.
    pub(crate) fn rotate(&mut self) -> io::Result<u64> {
        self.sync()?;
        let next = Self::create(&self.dir, self.segment + 1)?;
        *self = next;
        Ok(self.segment)
    }

    /// Drops segments before `segment`: the newest becomes the spare (if none is waiting), the
    /// rest are deleted.
    pub(crate) fn prune_before(&self, segment: u64) -> io::Result<()> {
        let mut old: Vec<u64> = segments(&self.dir)?
            .into_iter()
            .filter(|&s| s < segment)
            .collect();
        let spare = self.dir.join(SPARE);
        if let Some(newest) = old.pop() {
            if spare.exists() {
                std::fs::remove_file(segment_path(&self.dir, newest))?;
            } else {
                std::fs::rename(segment_path(&self.dir, newest), &spare)?;
            }
        }
        for s in old {
            std::fs::remove_file(segment_path(&self.dir, s))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_crdt::{Dot, NodeId, Stamp, State};

    fn op(seq: u64) -> Op {
        let node = NodeId::new(1).unwrap();
        Op {
            dot: Dot::new(node, seq),
            stamp: Stamp::new(seq, node),
            key: format!("k{seq}"),
            delta: State::bottom(meridian_crdt::Kind::Counter),
        }
    }

    #[test]
    fn records_replay_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::start(dir.path()).unwrap();
        journal
            .append(&encode_record(&[
                codec::encode_op(&op(1)),
                codec::encode_op(&op(2)),
            ]))
            .unwrap();
        journal.rotate().unwrap();
        journal
            .append(&encode_record(&[codec::encode_op(&op(3))]))
            .unwrap();
        journal.sync().unwrap();
        let replay = Journal::replay(dir.path()).unwrap();
        assert_eq!(replay.ops, vec![op(1), op(2), op(3)]);
        assert_eq!(replay.torn_segments, 0);
    }

    #[test]
    fn a_torn_tail_stops_replay_without_losing_earlier_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::start(dir.path()).unwrap();
        journal
            .append(&encode_record(&[codec::encode_op(&op(1))]))
            .unwrap();
        let second = encode_record(&[codec::encode_op(&op(2))]);
        journal.append(&second[..second.len() - 3]).unwrap();
        journal.sync().unwrap();
        let replay = Journal::replay(dir.path()).unwrap();
        assert_eq!(replay.ops, vec![op(1)]);
        assert_eq!(replay.torn_segments, 1);
    }

    #[test]
    fn a_flipped_bit_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::start(dir.path()).unwrap();
        journal
            .append(&encode_record(&[codec::encode_op(&op(1))]))
            .unwrap();
        journal.sync().unwrap();
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[12] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(Journal::replay(dir.path()).unwrap().ops.is_empty());
    }

    #[test]
    fn recycled_segments_never_replay_their_old_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::start(dir.path()).unwrap();
        let first: Vec<Op> = (1..=50).map(op).collect();
        for o in &first {
            journal
                .append(&encode_record(&[codec::encode_op(o)]))
                .unwrap();
        }
        let second = journal.rotate().unwrap();
        journal.prune_before(second).unwrap();
        assert!(
            dir.path().join(SPARE).exists(),
            "the pruned segment waits as the spare"
        );
        // The spare (full of segment 1's records) becomes segment 3; one new record goes in.
        let third = journal.rotate().unwrap();
        journal
            .append(&encode_record(&[codec::encode_op(&op(51))]))
            .unwrap();
        journal.sync().unwrap();
        let replay = Journal::replay(dir.path()).unwrap();
        assert_eq!(
            replay.ops,
            vec![op(51)],
            "only segment {third}'s own record replays"
        );
        let size = std::fs::metadata(segment_path(dir.path(), third))
            .unwrap()
            .len();
        assert!(size >= SEGMENT_BYTES, "a recycled segment keeps its space");
    }

    #[test]
    fn start_recycles_replayed_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::start(dir.path()).unwrap();
        journal
            .append(&encode_record(&[codec::encode_op(&op(1))]))
            .unwrap();
        let next = journal.rotate().unwrap();
        journal.prune_before(next).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![next]);
        drop(journal);
        let journal = Journal::start(dir.path()).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![next + 1]);
        drop(journal);
    }
}
