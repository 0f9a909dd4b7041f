//! The memtable: states and ops applied since the last fold, in memory, layered over redb.
//!
//! The applier publishes each group's new states, encoded ops and applied vector into the
//! *active* layer. A checkpoint freezes it (it becomes the *frozen* layer, and a fresh active
//! one starts) and the fold thread writes the frozen layer into redb in one durable commit.
//! The layer then stays as the *last folded* one until the next fold replaces it: its states
//! are what redb holds for those keys, already decoded. A reader looks in active, then
//! frozen, then last folded, then redb.
//!
//! # Why the last folded layer stays
//! Without it, every fold sent the next write of each key written since the last one back
//! to redb, to decode the whole state: for a large set, an allocation per element, for every
//! such set, every second. A key written in every interval is now never decoded again. The
//! cost is one more interval's states in memory, most of them sharing structure with the
//! newer ones.
//!
//! # Why reads stay consistent
//! Every read holds the active layer's read lock from start to end. The applier needs the
//! write lock to publish, and a layer is frozen only under it too, so while a reader holds it
//! no newer state of any key can appear and no layer can be frozen. The reader takes its
//! snapshots of the frozen layer, then of the last folded one, *before* it opens its redb
//! transaction: a fold commits to redb before its layer stops being the frozen one (becoming
//! the last folded one in the same step), and the layer it replaces there was committed
//! earlier still, so what the reader does not find in its snapshots is in the redb snapshot it
//! opens afterwards. The applied vector read under the same lock therefore
//! covers every op the returned state reflects.
//!
//! # A shared snapshot of the states table
//! Opening a redb read transaction and its table for every read cost as much as the lookup
//! itself, and redb only changes when a fold commits. So readers share one open `states`
//! table, tagged with how many folds had completed before its transaction began. The fold
//! count is raised *before* a folded layer leaves memory, so a reader that no longer finds a
//! layer in memory also sees a count that demands a snapshot taken after that layer's commit;
//! an older shared snapshot is then replaced. Each fold also lets go of the shared snapshot, so
//! an idle node does not pin old pages in redb.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

use meridian_crdt::{Kind, NodeId, State, VersionVector, codec};
use redb::{Database, ReadOnlyTable, ReadableDatabase};

use super::tables::{STATES, WAL, split_state_key, state_key};
use super::{StorageError, corrupt};

/// An op as the journal and the WAL hold it: `codec::encode_op` bytes.
pub(crate) type EncodedOp = Arc<[u8]>;

/// States and ops of one span of time between folds.
#[derive(Debug, Default)]
pub(crate) struct Layer {
    /// Storage key → the key's state after every op of this layer and those below it.
    pub(crate) states: HashMap<Vec<u8>, Arc<State>>,
    /// (origin, seq) → op, for shipping to peers until the fold moves them into the WAL table.
    pub(crate) wal: BTreeMap<(u64, u64), EncodedOp>,
    /// Every op in this layer and below it.
    pub(crate) applied: VersionVector,
}

/// The redb `states` table as some snapshot holds it.
pub(crate) type StatesTable = ReadOnlyTable<&'static [u8], &'static [u8]>;

#[derive(Debug, Default)]
pub(crate) struct Memtable {
    active: RwLock<Layer>,
    frozen: RwLock<Option<Arc<Layer>>>,
    /// The layer the last fold committed; see "Why the last folded layer stays".
    folded_last: RwLock<Option<Arc<Layer>>>,
    /// Folds whose layer has left the frozen slot (or is leaving it): each one's commit came
    /// before.
    folds: AtomicU64,
    /// The shared snapshot of the states table and the fold count read before it was opened.
    shared_states: Mutex<Option<(u64, Arc<StatesTable>)>>,
}

/// A consistent view for one read: the active layer (locked), the frozen layer, and a redb
/// snapshot covering every fold before them, taken on first use (most hot keys are found in
/// memory).
pub(crate) struct View<'m> {
    active: RwLockReadGuard<'m, Layer>,
    frozen: Option<Arc<Layer>>,
    folded_last: Option<Arc<Layer>>,
    /// Folds completed when `frozen` was taken: the least a redb snapshot must cover.
    folds: u64,
    memtable: &'m Memtable,
    db: &'m Database,
    states: std::cell::OnceCell<Arc<StatesTable>>,
}

impl Memtable {
    pub(crate) fn new(applied: VersionVector) -> Self {
        Self {
            active: RwLock::new(Layer {
                applied,
                ..Layer::default()
            }),
            ..Self::default()
        }
    }

    /// Opens a consistent view; see the module docs.
    pub(crate) fn view<'m>(&'m self, db: &'m Database) -> View<'m> {
        let active = self.active.read().unwrap_or_else(PoisonError::into_inner);
        // Frozen before last folded: a fold completing in between makes its layer the last
        // folded one before it stops being the frozen one, so no layer is missed.
        let frozen = self.frozen();
        let folded_last = self.folded_last();
        View {
            active,
            frozen,
            folded_last,
            folds: self.folds.load(Ordering::SeqCst),
            memtable: self,
            db,
            states: std::cell::OnceCell::new(),
        }
    }

    /// A snapshot of the states table that covers at least `folds` folds: the shared one, or
    /// a new one that replaces it.
    pub(crate) fn states_table(
        &self,
        db: &Database,
        folds: u64,
    ) -> Result<Arc<StatesTable>, StorageError> {
        let mut shared = self
            .shared_states
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((covered, table)) = shared.as_ref() {
            if *covered >= folds {
                return Ok(table.clone());
            }
        }
        let covered = self.folds.load(Ordering::SeqCst);
        let table = Arc::new(db.begin_read()?.open_table(STATES)?);
        *shared = Some((covered, table.clone()));
        Ok(table)
    }

    /// Folds completed so far; see [`Memtable::states_table`].
    pub(crate) fn folds(&self) -> u64 {
        self.folds.load(Ordering::SeqCst)
    }

    pub(crate) fn frozen(&self) -> Option<Arc<Layer>> {
        self.frozen
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn folded_last(&self) -> Option<Arc<Layer>> {
        self.folded_last
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The applied vector of the last fold: its ops are in redb and in the Merkle tree. Empty
    /// until the first fold.
    pub(crate) fn folded_applied(&self) -> VersionVector {
        self.folded_last()
            .map(|layer| layer.applied.clone())
            .unwrap_or_default()
    }

    /// The state of `key` in memory (active, then frozen, then last folded), if a layer has
    /// it. For the applier, the layers' only writer, so nothing can change between this and
    /// its publish.
    pub(crate) fn lookup(&self, key: &[u8]) -> Option<Arc<State>> {
        let active = self.active.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = active.states.get(key) {
            return Some(state.clone());
        }
        drop(active);
        if let Some(state) = self.frozen().and_then(|f| f.states.get(key).cloned()) {
            return Some(state);
        }
        self.folded_last().and_then(|f| f.states.get(key).cloned())
    }

    /// Whether `key` was written (or purged) since the last fold that committed it.
    pub(crate) fn written_since_fold(&self, key: &[u8]) -> bool {
        let active = self.active.read().unwrap_or_else(PoisonError::into_inner);
        active.states.contains_key(key) || self.frozen().is_some_and(|f| f.states.contains_key(key))
    }

    /// Publishes a group: its new states, its ops, and the applied vector after it.
    pub(crate) fn publish(
        &self,
        states: impl IntoIterator<Item = (Vec<u8>, Arc<State>)>,
        ops: impl IntoIterator<Item = ((u64, u64), EncodedOp)>,
        applied: &VersionVector,
    ) {
        let mut active = self.active.write().unwrap_or_else(PoisonError::into_inner);
        active.states.extend(states);
        active.wal.extend(ops);
        active.applied.clone_from(applied);
    }

    /// Freezes the active layer for folding; `None` if the last frozen one is not folded yet.
    pub(crate) fn freeze(&self) -> Option<Arc<Layer>> {
        let mut active = self.active.write().unwrap_or_else(PoisonError::into_inner);
        let mut frozen = self.frozen.write().unwrap_or_else(PoisonError::into_inner);
        if frozen.is_some() {
            return None;
        }
        let applied = active.applied.clone();
        // Sized for as many keys as the layer it follows: a layer fills up over a second of
        // writes, and growing from empty rehashed it a dozen times while the applier waited.
        let states = HashMap::with_capacity(active.states.len());
        let layer = Arc::new(std::mem::replace(
            &mut *active,
            Layer {
                states,
                wal: BTreeMap::new(),
                applied,
            },
        ));
        *frozen = Some(layer.clone());
        Some(layer)
    }

    /// Makes the frozen layer the last folded one once the fold has committed it to redb.
    pub(crate) fn folded(&self) {
        // Counted before the layer goes: see "A shared snapshot" in the module docs.
        self.folds.fetch_add(1, Ordering::SeqCst);
        // An open snapshot keeps redb from reusing the pages later commits free; let the
        // next reader open a fresh one rather than pin this one until someone reads.
        *self
            .shared_states
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        // Moved under the frozen layer's lock: a reader that finds no frozen layer finds it
        // as the last folded one (see `Memtable::view`).
        let replaced = {
            let mut frozen = self.frozen.write().unwrap_or_else(PoisonError::into_inner);
            let mut folded_last = self
                .folded_last
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            std::mem::replace(&mut *folded_last, frozen.take())
        };
        // Freed here, with no lock held: a layer of large sets takes a while to free.
        drop(replaced);
    }

    /// Drops active ops every peer has acknowledged; the fold skips frozen ones and deletes
    /// folded ones. Returns how many were dropped here.
    pub(crate) fn truncate(&self, below: &VersionVector) -> u64 {
        let mut active = self.active.write().unwrap_or_else(PoisonError::into_inner);
        let before = active.wal.len();
        active
            .wal
            .retain(|&(origin, seq), _| NodeId::new(origin).is_none_or(|o| seq > below.get(o)));
        (before - active.wal.len()) as u64
    }

    /// Ops held in memory, across both layers.
    pub(crate) fn wal_len(&self) -> u64 {
        let active = self.active.read().unwrap_or_else(PoisonError::into_inner);
        let frozen = self.frozen().map_or(0, |f| f.wal.len());
        (active.wal.len() + frozen) as u64
    }
}

impl View<'_> {
    /// The states table of a redb snapshot that covers this view's folds (see the module
    /// docs), shared with other readers.
    fn states(&self) -> Result<&StatesTable, StorageError> {
        if let Some(table) = self.states.get() {
            return Ok(table);
        }
        let table = self.memtable.states_table(self.db, self.folds)?;
        Ok(self.states.get_or_init(|| table))
    }

    /// The applied vector of this view: it covers every op any state read from it reflects.
    pub(crate) fn applied(&self) -> &VersionVector {
        &self.active.applied
    }

    /// The state under a storage key; `None` if the key was never written (or its state was
    /// garbage collected).
    pub(crate) fn state(&self, key: &[u8]) -> Result<Option<Arc<State>>, StorageError> {
        if let Some(state) = self.memory(key) {
            return Ok((!state.is_bottom()).then(|| state.clone()));
        }
        let Some(bytes) = self.states()?.get(key)? else {
            return Ok(None);
        };
        let state = codec::decode_state(bytes.value()).map_err(|e| corrupt(describe(key), e))?;
        Ok(Some(Arc::new(state)))
    }

    /// The newest state of `key` held in memory, bottom for a collected key.
    fn memory(&self, key: &[u8]) -> Option<&Arc<State>> {
        self.active
            .states
            .get(key)
            .or_else(|| self.frozen.as_ref().and_then(|f| f.states.get(key)))
            .or_else(|| self.folded_last.as_ref().and_then(|f| f.states.get(key)))
    }

    /// The encoded state under a storage key, as anti-entropy ships it.
    pub(crate) fn encoded_state(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(state) = self.memory(key) {
            return Ok((!state.is_bottom()).then(|| codec::encode_state(state)));
        }
        Ok(self.states()?.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Encoded ops of `origin` with sequences in `from..=to`, from every layer, in order. A
    /// sequence present in two places (a fold in progress) is the same op in both.
    pub(crate) fn wal_range(
        &self,
        origin: NodeId,
        from: u64,
        to: u64,
        max_ops: usize,
    ) -> Result<BTreeMap<u64, EncodedOp>, StorageError> {
        let mut out = BTreeMap::new();
        if from > to {
            return Ok(out);
        }
        let o = origin.get();
        // Opened now, after the frozen snapshot: see the module docs.
        let table = self.db.begin_read()?.open_table(WAL)?;
        for entry in table.range((o, from)..=(o, to))?.take(max_ops) {
            let (key, value) = entry?;
            out.insert(key.value().1, Arc::from(value.value()));
        }
        for layer in self.frozen.as_deref().into_iter().chain([&*self.active]) {
            for (&(_, seq), op) in layer.wal.range((o, from)..=(o, to)).take(max_ops) {
                out.insert(seq, op.clone());
            }
        }
        Ok(out)
    }

    /// Up to `limit` keys of `kind` starting with `prefix` and sorting after `after`, merged
    /// across the layers and redb; see `Storage::list` for the scan budget.
    pub(crate) fn list(
        &self,
        kind: Kind,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        visible: impl Fn(&State) -> bool,
    ) -> Result<super::Page, StorageError> {
        let start = match after {
            Some(after) if after.as_bytes() >= prefix.as_bytes() => {
                let mut k = state_key(kind, after);
                k.push(0);
                k
            }
            _ => state_key(kind, prefix),
        };
        let in_range = |k: &[u8]| {
            k >= start.as_slice()
                && split_state_key(k)
                    .is_some_and(|(k_kind, user)| k_kind == kind && user.starts_with(prefix))
        };
        // Newest first: the active layer shadows the frozen one, which shadows redb.
        let mut memory: BTreeMap<&[u8], &Arc<State>> = BTreeMap::new();
        for layer in [Some(&*self.active), self.frozen.as_deref()]
            .into_iter()
            .flatten()
        {
            for (k, state) in &layer.states {
                if in_range(k) {
                    memory.entry(k.as_slice()).or_insert(state);
                }
            }
        }
        let mut memory = memory.into_iter().peekable();
        let mut disk = self.states()?.range(start.as_slice()..)?.peekable();

        let scan_budget = limit.saturating_mul(4).max(limit);
        let mut out = Vec::new();
        let mut last_scanned: Option<String> = None;
        let mut scanned = 0usize;
        loop {
            // The next disk entry still in range, decoded only if it wins the merge.
            let disk_key = match disk.peek() {
                Some(Ok((k, _))) if in_range(k.value()) => Some(k.value().to_vec()),
                Some(Ok(_)) | None => None,
                Some(Err(_)) => {
                    if let Some(Err(e)) = disk.next() {
                        return Err(e.into());
                    }
                    None
                }
            };
            let memory_key = memory.peek().map(|(k, _)| k.to_vec());
            let take_disk = match (&memory_key, &disk_key) {
                (None, None) => return Ok((out, None)),
                (Some(m), Some(d)) => d < m,
                (None, Some(_)) => true,
                (Some(_), None) => false,
            };
            let (key, state) = if take_disk {
                let Some(Ok((k, value))) = disk.next() else {
                    return Ok((out, None));
                };
                let key = k.value().to_vec();
                let state =
                    codec::decode_state(value.value()).map_err(|e| corrupt(describe(&key), e))?;
                (key, Arc::new(state))
            } else {
                if disk_key.is_some() && disk_key == memory_key {
                    // Shadowed by the newer state in memory.
                    disk.next();
                }
                let Some((k, state)) = memory.next() else {
                    return Ok((out, None));
                };
                (k.to_vec(), state.clone())
            };
            if out.len() == limit || scanned == scan_budget {
                return Ok((out, last_scanned));
            }
            scanned += 1;
            let user_key = split_state_key(&key)
                .map(|(_, k)| k.to_owned())
                .ok_or_else(|| corrupt("state key", "unparseable"))?;
            last_scanned = Some(user_key.clone());
            if !state.is_bottom() && visible(&state) {
                out.push((user_key, Arc::unwrap_or_clone(state)));
            }
        }
    }
}

fn describe(key: &[u8]) -> String {
    split_state_key(key).map_or_else(
        || "state key".to_owned(),
        |(kind, key)| format!("{kind}/{key}"),
    )
}
