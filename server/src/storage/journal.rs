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
//!
//! # Owner
//! The journal may live apart from the database (`storage.journal_dir`). `journal.id` in its
//! directory names the node and a random id that the database records too: a node refuses a
//! journal of another database, and refuses to start without its own (see
//! `Storage::claim_journal`), since the journal holds acknowledged writes not yet folded.
//!
//! # Direct, synchronous writes
//! Where the file system allows it, segments are opened `O_DIRECT | O_DSYNC` and a sync is one
//! `pwrite` of the unwritten tail, rounded out to whole [`BLOCK`]s: the bytes go from this
//! buffer to the device and the call returns once they are durable. Buffered writes plus
//! `fdatasync` dirty the page cache and then walk it back out (`writepages`, waiting on each
//! folio), which cost more CPU per sync than the write itself on these machines. The last,
//! partly filled block is kept in memory and rewritten, with the records that follow it, by
//! the next sync; its prefix is unchanged, so a torn rewrite leaves the earlier records intact.
//! Zero padding after the last record reads as the end of the segment, as on a fresh one.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use meridian_crdt::{Op, codec};

/// Refuse records larger than this on replay: no writer produces them, so they are corrupt.
const MAX_RECORD: usize = 1 << 30;

/// Space given to a fresh segment up front, so appends overwrite instead of growing the file.
pub(crate) const SEGMENT_BYTES: u64 = 16 << 20;

const SPARE: &str = "journal-spare.log";
/// Names the database a journal directory belongs to (see [`Owner`]).
const OWNER: &str = "journal.id";

/// Whose journal a directory holds: the node and the random id its database recorded when it
/// first took the directory. Kept as text, for an operator who looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) node: u64,
    pub(crate) id: u128,
}

impl Owner {
    fn to_text(self) -> String {
        format!(
            "meridian journal\nnode {}\nid {:032x}\n",
            self.node, self.id
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        if lines.next()? != "meridian journal" {
            return None;
        }
        let node = lines.next()?.strip_prefix("node ")?.parse().ok()?;
        let id = u128::from_str_radix(lines.next()?.strip_prefix("id ")?, 16).ok()?;
        Some(Self { node, id })
    }
}

/// The owner recorded in the journal directory `dir`: `None` when it has none (a new
/// directory, or one from before journals named their owner).
pub(crate) fn owner(dir: &Path) -> io::Result<Option<Owner>> {
    match std::fs::read_to_string(dir.join(OWNER)) {
        Ok(text) => Owner::parse(&text).map(Some).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a journal owner file", dir.join(OWNER).display()),
            )
        }),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// Whether `dir` holds any journal segment (a missing directory holds none).
pub(crate) fn has_segments(dir: &Path) -> io::Result<bool> {
    match segments(dir) {
        Ok(found) => Ok(!found.is_empty()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// Records `owner` in the journal directory `dir` (created if needed), durably.
pub(crate) fn set_owner(dir: &Path, owner: Owner) -> io::Result<()> {
    create_dir_durably(dir)?;
    let partial = dir.join(format!("{OWNER}.partial"));
    let mut file = File::create(&partial)?;
    file.write_all(owner.to_text().as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&partial, dir.join(OWNER))?;
    sync_dir(dir)
}

/// Unit and alignment of direct writes: the page size, a multiple of every device's logical
/// block size.
const BLOCK: usize = 4096;

#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    segment: u64,
    file: File,
    /// Opened `O_DIRECT | O_DSYNC`; otherwise buffered, made durable by `fdatasync`.
    direct: bool,
    /// Bytes from `tail_offset` on that the next sync writes: the durable prefix of the last
    /// partly written block (direct mode only), then everything appended since.
    tail: Vec<u8>,
    tail_offset: u64,
    /// How much of `tail` is already durable (the rewritten block's old part).
    durable_prefix: usize,
    /// Block-aligned staging for direct writes, reused across syncs.
    staging: AlignedBuffer,
}

/// A heap buffer whose usable part starts on a [`BLOCK`] boundary, as `O_DIRECT` requires.
#[derive(Debug, Default)]
struct AlignedBuffer {
    raw: Vec<u8>,
}

impl AlignedBuffer {
    /// `bytes` followed by zeros up to `len` (a multiple of [`BLOCK`]), block-aligned. Only the
    /// padding is zeroed: the bytes are written over whatever the last sync left.
    fn padded(&mut self, bytes: &[u8], len: usize) -> &[u8] {
        if self.raw.len() < len + BLOCK {
            self.raw = vec![0; (len + BLOCK).next_power_of_two()];
        }
        let start = self.raw.as_ptr().align_offset(BLOCK);
        let slice = &mut self.raw[start..start + len];
        let (data, padding) = slice.split_at_mut(bytes.len());
        data.copy_from_slice(bytes);
        padding.fill(0);
        slice
    }
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

/// Creates `path` as a segment-sized file of zeros, durably (its directory entry aside).
fn zero_filled(path: &Path) -> io::Result<()> {
    let mut file = OpenOptions::new().create_new(true).write(true).open(path)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..SEGMENT_BYTES / (1 << 20) {
        file.write_all(&zeros)?;
    }
    file.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents, and makes each new entry durable in its parent: the
/// journal and the database hold acknowledged writes, and on some file systems a power cut can
/// forget a directory whose parent was never synced, with everything in it.
pub(crate) fn create_dir_durably(dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    std::fs::create_dir_all(dir)?;
    for created in missing.into_iter().rev() {
        // A relative path's first component lives in the current directory.
        let parent = created
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        sync_dir(parent)?;
    }
    Ok(())
}

fn checksum(segment: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&segment.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Payload size at which [`encode_records`] starts a new record: far below [`MAX_RECORD`]
/// (and the `u32` length), however many large writes one group commit drains.
pub(crate) const RECORD_PAYLOAD_TARGET: usize = 64 << 20;

/// Encodes a group's ops as journal records of about `target` bytes of payload or less (an
/// op larger than that gets a record of its own). Ops keep their order, so a crash that tears
/// a later record leaves a prefix of the group: none of it was acknowledged yet.
pub(crate) fn encode_records<O: AsRef<[u8]>>(ops: &[O], target: usize) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    let mut start = 0;
    let mut payload = 0;
    for (index, op) in ops.iter().enumerate() {
        let size = 4 + op.as_ref().len();
        if index > start && payload + size > target {
            records.push(encode_record(&ops[start..index]));
            start = index;
            payload = 0;
        }
        payload += size;
    }
    if start < ops.len() {
        records.push(encode_record(&ops[start..]));
    }
    records
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

/// The length-prefixed items of a record payload; `None` if the payload is not what
/// `encode_record` writes.
fn split_payload(mut payload: &[u8]) -> Option<Vec<&[u8]>> {
    let mut items = Vec::new();
    while !payload.is_empty() {
        let len = u32::from_le_bytes(payload.get(..4)?.try_into().ok()?) as usize;
        items.push(payload.get(4..4 + len)?);
        payload = &payload[4 + len..];
    }
    Some(items)
}

/// Ops of a record payload; `None` if the payload is not what `encode_record` writes.
fn decode_payload(payload: &[u8]) -> Option<Vec<Op>> {
    split_payload(payload)?
        .into_iter()
        .map(|bytes| codec::decode_op(bytes).ok())
        .collect()
}

/// Hands the payload of every valid record in `dir`, segment by segment and in order, to
/// `each` (with its segment and offset); returns how many segments end in a torn record.
fn walk_records(
    dir: &Path,
    mut each: impl FnMut(u64, usize, &[u8]) -> io::Result<()>,
) -> io::Result<u64> {
    let mut torn_segments = 0;
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
                    torn_segments += 1;
                }
                break;
            };
            each(segment, at, payload)?;
            at += 8 + len;
        }
    }
    Ok(torn_segments)
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
        let mut ops = Vec::new();
        let torn_segments = walk_records(dir, |segment, at, payload| {
            let decoded = decode_payload(payload).ok_or_else(|| {
                // The checksum matched but the ops do not decode: written by a newer format.
                // Refuse to guess; stopping here would lose acknowledged data.
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("journal segment {segment}: undecodable record at byte {at}"),
                )
            })?;
            ops.extend(decoded);
            Ok(())
        })?;
        Ok(Replay { ops, torn_segments })
    }

    /// Opens a fresh segment after every existing one, and recycles or deletes the existing
    /// ones: call it only once their contents are durable elsewhere (replayed and
    /// checkpointed).
    pub(crate) fn start(dir: &Path) -> io::Result<Self> {
        Self::start_with(dir, true)
    }

    /// [`Journal::start`], with direct writes only if `direct` and the file system allows.
    fn start_with(dir: &Path, direct: bool) -> io::Result<Self> {
        let existing = segments(dir)?;
        let segment = existing.last().map_or(1, |last| last + 1);
        let journal = Self::create(dir, segment, direct)?;
        journal.prune_before(segment)?;
        // The first rotation takes the spare; without one it would zero-fill a whole segment
        // in the applier, stalling every write for tens of milliseconds a second after a fresh
        // start. Made here, before the node serves, it costs no request anything.
        // A spare cut short by a crash while it was being filled is filled again.
        let spare = dir.join(SPARE);
        let whole = std::fs::metadata(&spare).is_ok_and(|m| m.len() >= SEGMENT_BYTES);
        if !whole {
            match std::fs::remove_file(&spare) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
            zero_filled(&spare)?;
            sync_dir(dir)?;
        }
        Ok(journal)
    }

    /// Opens segment `segment` over the spare file if there is one, else over a new zero-filled
    /// file, positioned at its start.
    fn create(dir: &Path, segment: u64, direct: bool) -> io::Result<Self> {
        let path = segment_path(dir, segment);
        let spare = dir.join(SPARE);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() >= SEGMENT_BYTES) {
            // Left by an earlier rotation to this segment that failed after taking the spare
            // (at the directory sync or the open): no record of this segment is in it yet, and
            // its old records fail this segment's checksum. Refusing it would fail every later
            // rotation too, and the unfolded layer would grow without end.
        } else if spare.exists() {
            std::fs::rename(&spare, &path)?;
        } else {
            match std::fs::remove_file(&path) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
            zero_filled(&path)?;
        }
        sync_dir(dir)?;
        let flags = if direct {
            libc::O_DIRECT | libc::O_DSYNC
        } else {
            0
        };
        let (file, direct) = match OpenOptions::new()
            .write(true)
            .custom_flags(flags)
            .open(&path)
        {
            Ok(file) => (file, direct),
            // tmpfs and some network file systems refuse O_DIRECT.
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                (OpenOptions::new().write(true).open(&path)?, false)
            }
            Err(error) => return Err(error),
        };
        Ok(Self {
            dir: dir.to_owned(),
            segment,
            file,
            direct,
            tail: Vec::with_capacity(1 << 16),
            tail_offset: 0,
            durable_prefix: 0,
            staging: AlignedBuffer::default(),
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
        self.tail.extend_from_slice(&record[..4]);
        self.tail.extend_from_slice(&crc.to_le_bytes());
        self.tail.extend_from_slice(&record[8..]);
        Ok(())
    }

    /// Makes everything appended so far durable.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if injected::sync_fails(&self.dir) {
            return Err(io::Error::other("injected sync failure"));
        }
        if !self.direct {
            self.file.write_all_at(&self.tail, self.tail_offset)?;
            self.tail_offset += self.tail.len() as u64;
            self.tail.clear();
            return self.file.sync_data();
        }
        if self.tail.len() == self.durable_prefix {
            return Ok(());
        }
        let padded = self.tail.len().div_ceil(BLOCK) * BLOCK;
        let staging = self.staging.padded(&self.tail, padded);
        if let Err(error) = self.file.write_all_at(staging, self.tail_offset) {
            // Some file systems accept O_DIRECT at open and refuse the writes. Nothing of
            // this tail was written: go on buffered, from the same offset.
            if error.raw_os_error() != Some(libc::EINVAL) {
                return Err(error);
            }
            tracing::warn!(%error, "direct journal writes refused; using buffered writes and fdatasync");
            self.file = OpenOptions::new()
                .write(true)
                .open(segment_path(&self.dir, self.segment))?;
            self.direct = false;
            self.durable_prefix = 0;
            return self.sync();
        }
        let whole_blocks = self.tail.len() / BLOCK * BLOCK;
        self.tail.drain(..whole_blocks);
        self.tail_offset += whole_blocks as u64;
        self.durable_prefix = self.tail.len();
        Ok(())
    }

    /// Continues in a new segment; returns the new segment's number. Records before it may be
    /// dropped with [`Journal::prune_before`] once a checkpoint covers them.
    pub(crate) fn rotate(&mut self) -> io::Result<u64> {
        self.sync()?;
        let next = Self::create(&self.dir, self.segment + 1, self.direct)?;
        *self = next;
        Ok(self.segment)
    }

    /// [`prune_before`] in this journal's directory.
    pub(crate) fn prune_before(&self, segment: u64) -> io::Result<()> {
        prune_before(&self.dir, segment)
    }
}

/// The journal with nothing in front of it: the durable ceiling `meridian bench-baseline
/// --durable` measures. A group's payloads become one record and a sync is the write path's
/// own (one `O_DIRECT | O_DSYNC` write where the file system allows), so a server that
/// answers only after [`BareJournal::sync`] pays exactly what durability costs a node, and
/// nothing of the CRDTs, the memtable or the fold. Segments are recycled as checkpoints do, so
/// the file never grows.
#[derive(Debug)]
pub struct BareJournal {
    journal: Journal,
    /// Bytes appended to the current segment.
    written: u64,
}

impl BareJournal {
    /// Starts a journal in `dir` (created if missing), recycling any segments already there.
    pub fn start(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            journal: Journal::start(dir)?,
            written: 0,
        })
    }

    /// Appends `payloads` as one record, durable after the next [`BareJournal::sync`].
    pub fn append<P: AsRef<[u8]>>(&mut self, payloads: &[P]) -> io::Result<()> {
        let record = encode_record(payloads);
        self.written += record.len() as u64;
        self.journal.append(&record)
    }

    /// Makes every append so far durable. Past half a segment it continues in the next one
    /// and recycles the last (its payloads are then gone: nothing replays a bare journal).
    pub fn sync(&mut self) -> io::Result<()> {
        self.journal.sync()?;
        if self.written >= SEGMENT_BYTES / 2 {
            let segment = self.journal.rotate()?;
            self.journal.prune_before(segment)?;
            self.written = 0;
        }
        Ok(())
    }

    /// Every payload the segments in `dir` hold, in order: what was synced since the last
    /// recycling.
    pub fn payloads(dir: &Path) -> io::Result<Vec<Vec<u8>>> {
        let mut payloads = Vec::new();
        walk_records(dir, |segment, at, payload| {
            let items = split_payload(payload).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("journal segment {segment}: malformed record at byte {at}"),
                )
            })?;
            payloads.extend(items.into_iter().map(<[u8]>::to_vec));
            Ok(())
        })?;
        Ok(payloads)
    }
}

/// Drops the segments of the journal in `dir` before `segment`: the newest becomes the spare
/// (if none is waiting), the rest are deleted. Safe beside a [`Journal`] writing to a later
/// segment: both touch the spare only by renaming it, so at worst a rotation misses a spare
/// and zero-fills a new segment, or a pruned segment is deleted rather than kept.
pub(crate) fn prune_before(dir: &Path, segment: u64) -> io::Result<()> {
    let mut old: Vec<u64> = segments(dir)?
        .into_iter()
        .filter(|&s| s < segment)
        .collect();
    let spare = dir.join(SPARE);
    if let Some(newest) = old.pop() {
        if spare.exists() {
            std::fs::remove_file(segment_path(dir, newest))?;
        } else {
            std::fs::rename(segment_path(dir, newest), &spare)?;
        }
    }
    for s in old {
        std::fs::remove_file(segment_path(dir, s))?;
    }
    Ok(())
}

/// Sync failures on demand, for tests of what a node does after one: a disk cannot be made to
/// fail an fsync from outside.
#[cfg(test)]
pub(crate) mod injected {
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, PoisonError};

    /// Journal directories whose next sync fails. Keyed by directory, so tests running side by
    /// side in one process do not fail each other's syncs.
    static FAIL_NEXT_SYNC: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    /// Makes the next sync of the journal in `dir` fail.
    pub(crate) fn fail_next_sync(dir: &Path) {
        FAIL_NEXT_SYNC
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(dir.to_owned());
    }

    pub(super) fn sync_fails(dir: &Path) -> bool {
        let mut dirs = FAIL_NEXT_SYNC
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let before = dirs.len();
        dirs.retain(|d| d != dir);
        dirs.len() != before
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

    /// Appends op `seq` alone in a record.
    fn append_op(journal: &mut Journal, seq: u64) {
        journal
            .append(&encode_record(&[codec::encode_op(&op(seq))]))
            .unwrap();
    }

    #[test]
    fn a_bare_journal_keeps_each_group_in_order_and_recycles_full_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = BareJournal::start(dir.path()).unwrap();
        journal.append(&[b"first".as_slice(), b"second"]).unwrap();
        journal.append(&[b"third"]).unwrap();
        journal.sync().unwrap();
        journal.append(&[Vec::<u8>::new()]).unwrap();
        journal.sync().unwrap();
        let expected: Vec<Vec<u8>> = vec![
            b"first".to_vec(),
            b"second".to_vec(),
            b"third".to_vec(),
            Vec::new(),
        ];
        assert_eq!(BareJournal::payloads(dir.path()).unwrap(), expected);

        // Half a segment of payloads later the journal has moved on, and the segment it left
        // became the spare instead of a file that grows.
        let big = vec![7u8; 1 << 20];
        for _ in 0..SEGMENT_BYTES / 2 / (1 << 20) {
            journal.append(&[&big]).unwrap();
            journal.sync().unwrap();
        }
        journal.append(&[b"after"]).unwrap();
        journal.sync().unwrap();
        assert_eq!(
            BareJournal::payloads(dir.path()).unwrap(),
            vec![b"after".to_vec()]
        );
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
        assert!(dir.path().join(SPARE).exists());
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
        append_op(&mut journal, 3);
        journal.sync().unwrap();
        let replay = Journal::replay(dir.path()).unwrap();
        assert_eq!(replay.ops, vec![op(1), op(2), op(3)]);
        assert_eq!(replay.torn_segments, 0);
    }

    #[test]
    fn a_torn_tail_stops_replay_without_losing_earlier_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::start(dir.path()).unwrap();
        append_op(&mut journal, 1);
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
        append_op(&mut journal, 1);
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
        append_op(&mut journal, 51);
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

    fn op_with_key_len(seq: u64, key_len: usize) -> Op {
        Op {
            key: "k".repeat(key_len.max(1)),
            ..op(seq)
        }
    }

    proptest::proptest! {
        /// The owner file reads back as written, for any node and id; other text does not
        /// pass as one.
        #[test]
        fn an_owner_file_reads_back_as_written(node: u64, id: u128, junk in "\\PC{0,40}") {
            let owner = Owner { node, id };
            proptest::prop_assert_eq!(Owner::parse(&owner.to_text()), Some(owner));
            proptest::prop_assert_eq!(Owner::parse(&junk), None);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(12))]

        /// Records of any size, synced at any points (so direct mode rewrites partly filled
        /// blocks, and records straddle blocks), replay exactly, in both write modes.
        #[test]
        fn any_appends_and_syncs_replay_exactly(
            batches in proptest::collection::vec(
                (proptest::collection::vec(1usize..3000, 1..4), proptest::bool::ANY),
                1..40,
            ),
            direct in proptest::bool::ANY,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut journal = Journal::start_with(dir.path(), direct).unwrap();
            let mut expected = Vec::new();
            for (key_lens, sync) in &batches {
                let first = expected.len() as u64 + 1;
                let ops: Vec<Op> = (first..)
                    .zip(key_lens)
                    .map(|(seq, &len)| op_with_key_len(seq, len))
                    .collect();
                expected.extend(ops.iter().cloned());
                let encoded: Vec<Vec<u8>> = ops.iter().map(codec::encode_op).collect();
                journal.append(&encode_record(&encoded)).unwrap();
                if *sync {
                    journal.sync().unwrap();
                }
            }
            journal.sync().unwrap();
            let replay = Journal::replay(dir.path()).unwrap();
            proptest::prop_assert_eq!(replay.ops, expected);
            proptest::prop_assert_eq!(replay.torn_segments, 0);
        }
    }

    /// A sync after a larger one writes zeros, not the larger one's leftovers, after its last
    /// record: replay must read the end of the segment there, not a torn record.
    #[test]
    fn a_journal_directory_is_created_with_its_missing_parents() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("log-device/meridian/journal");
        let owner = Owner { node: 3, id: 42 };
        set_owner(&dir, owner).unwrap();
        assert_eq!(super::owner(&dir).unwrap(), Some(owner));
        // Again over an existing directory: nothing to create, nothing refused.
        set_owner(&dir, owner).unwrap();
    }

    #[test]
    fn padding_after_a_smaller_sync_is_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::start(dir.path()).unwrap();
        let big = op_with_key_len(1, 3 * BLOCK);
        journal
            .append(&encode_record(&[codec::encode_op(&big)]))
            .unwrap();
        journal.sync().unwrap();
        append_op(&mut journal, 2);
        journal.sync().unwrap();
        let replay = Journal::replay(dir.path()).unwrap();
        assert_eq!(replay.ops, vec![big, op(2)]);
        assert_eq!(replay.torn_segments, 0);
        let bytes = std::fs::read(segment_path(dir.path(), 1)).unwrap();
        let end = journal.tail_offset as usize + journal.tail.len();
        assert!(
            bytes[end..end.div_ceil(BLOCK) * BLOCK]
                .iter()
                .all(|&b| b == 0)
        );
    }

    #[test]
    fn a_large_group_is_cut_into_records_that_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::start(dir.path()).unwrap();
        let ops: Vec<Op> = (1..=40).map(|seq| op_with_key_len(seq, 1000)).collect();
        let encoded: Vec<Vec<u8>> = ops.iter().map(codec::encode_op).collect();
        let records = encode_records(&encoded, 4500);
        assert!(records.len() > 1, "40 ops of ~1 KB in one 4.5 KB record");
        for record in &records {
            let payload = u32::from_le_bytes(record[..4].try_into().unwrap()) as usize;
            assert!(payload <= 4500, "a record of {payload} bytes");
            journal.append(record).unwrap();
        }
        // An op above the target still gets a record.
        let big = op_with_key_len(41, 9000);
        let big_records = encode_records(&[codec::encode_op(&big)], 4500);
        assert_eq!(big_records.len(), 1);
        journal.append(&big_records[0]).unwrap();
        journal.sync().unwrap();
        let mut expected = ops;
        expected.push(big);
        assert_eq!(Journal::replay(dir.path()).unwrap().ops, expected);
        assert!(encode_records::<Vec<u8>>(&[], 4500).is_empty());
    }

    #[test]
    fn a_rotation_that_failed_after_taking_the_spare_does_not_block_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::start(dir.path()).unwrap();
        append_op(&mut journal, 1);
        journal.sync().unwrap();
        // What a rotation to segment 2 leaves when the directory sync or the open fails after
        // it renamed the spare: segment 2 on disk, no spare, the journal still on segment 1.
        let spare = dir.path().join(SPARE);
        std::fs::rename(&spare, segment_path(dir.path(), 2)).unwrap();
        assert_eq!(journal.rotate().unwrap(), 2);
        append_op(&mut journal, 2);
        // And a rotation cut short while zero-filling: a short segment 3, no spare.
        std::fs::write(segment_path(dir.path(), 3), [0u8; 100]).unwrap();
        assert!(!spare.exists());
        assert_eq!(journal.rotate().unwrap(), 3);
        assert_eq!(
            std::fs::metadata(segment_path(dir.path(), 3))
                .unwrap()
                .len(),
            SEGMENT_BYTES
        );
        append_op(&mut journal, 3);
        journal.sync().unwrap();
        assert_eq!(
            Journal::replay(dir.path()).unwrap().ops,
            vec![op(1), op(2), op(3)]
        );
    }

    #[test]
    fn direct_writes_are_used_where_the_file_system_allows_them() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::start(dir.path()).unwrap();
        let tmpfs = std::process::Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(dir.path())
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("tmpfs"));
        if !tmpfs {
            assert!(journal.direct, "ext4 and xfs take O_DIRECT");
        }
    }

    #[test]
    fn a_fresh_journal_has_a_spare_so_its_first_rotation_fills_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::start(dir.path()).unwrap();
        assert!(dir.path().join(SPARE).exists(), "start makes the spare");
        let spare = std::fs::metadata(dir.path().join(SPARE)).unwrap();
        assert_eq!(spare.len(), SEGMENT_BYTES);
        let next = journal.rotate().unwrap();
        assert!(
            !dir.path().join(SPARE).exists(),
            "the first rotation takes the spare rather than filling a new file"
        );
        let segment = std::fs::metadata(segment_path(dir.path(), next)).unwrap();
        assert_eq!(segment.len(), SEGMENT_BYTES);
        // A restart over a journal that already has its spare makes no second one.
        drop(journal);
        let replay = Journal::replay(dir.path()).unwrap();
        assert!(replay.ops.is_empty());
        let journal = Journal::start(dir.path()).unwrap();
        assert!(dir.path().join(SPARE).exists());
        assert_eq!(segments(dir.path()).unwrap(), vec![next + 1]);
        // A spare cut short (a crash while it was filled) is filled again at start.
        OpenOptions::new()
            .write(true)
            .open(dir.path().join(SPARE))
            .unwrap()
            .set_len(4096)
            .unwrap();
        drop(journal);
        let journal = Journal::start(dir.path()).unwrap();
        let refilled = std::fs::metadata(dir.path().join(SPARE)).unwrap();
        assert_eq!(refilled.len(), SEGMENT_BYTES);
        drop(journal);
    }

    #[test]
    fn start_recycles_replayed_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::start(dir.path()).unwrap();
        append_op(&mut journal, 1);
        let next = journal.rotate().unwrap();
        journal.prune_before(next).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![next]);
        drop(journal);
        let journal = Journal::start(dir.path()).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![next + 1]);
        drop(journal);
    }
}
