//! Proptest strategies for Meridian's CRDTs: random operation histories on a small simulated
//! cluster, and the states, deltas and ops those histories produce.
//!
//! Values are never assembled field by field. Every state comes from *playing* a [`History`]:
//! replicas generate deltas from their own current state, apply them, and ship them to every
//! other replica over a network that delivers in any order and may deliver twice; now and then
//! two replicas run anti-entropy (a whole-state merge). So every generated value satisfies the
//! invariants real replicas keep (unique dots, contiguous per-origin sequences, HLC stamps that
//! exceed everything their writer had seen), and any two values from one history can be
//! meaningfully merged.
//!
//! ```
//! use meridian_crdt::arbitrary::{self, Shape};
//! use meridian_crdt::OrSet;
//! use proptest::strategy::{Strategy, ValueTree};
//! use proptest::test_runner::TestRunner;
//!
//! let mut runner = TestRunner::deterministic();
//! let history = arbitrary::history::<OrSet>(Shape::default())
//!     .new_tree(&mut runner)
//!     .unwrap()
//!     .current();
//! let mut played = history.play::<OrSet>();
//! played.flush(&[]);
//! assert!(played.replicas.iter().all(|r| *r == played.replicas[0]));
//! ```

use std::fmt::Debug;
use std::ops::RangeInclusive;

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Value, json};

use crate::{CanonicalJson, Crdt, Dot, GCounter, LwwRegister, NodeId, Op, OrSet, PnCounter};
use crate::{Stamp, State};

/// The most replicas a simulated cluster has.
pub const MAX_REPLICAS: usize = NODE_IDS.len();

/// Node ids of replicas `0, 1, 2, ...`: deliberately not in index order, with multi-byte
/// varints and the extremes, so neither tie-breaking nor the encoding can lean on small ids.
const NODE_IDS: [u64; 8] = [7, 1, 300, 2, 65_537, u64::MAX, 42, 1 << 40];

/// HLC time at which simulated clusters start: mid-2025 in NTP64.
pub const START_TIME: u64 = 0x684C_0000_0000_0000;

/// The largest clock skew between a replica's physical clock and the simulation's wall clock.
pub const MAX_SKEW: u64 = 3;

/// The node id of replica `index` in a simulated cluster.
///
/// # Panics
/// When `index >= MAX_REPLICAS`.
pub fn replica_node(index: usize) -> NodeId {
    let Some(node) = NodeId::new(NODE_IDS[index]) else {
        unreachable!("node ids are non-zero")
    };
    node
}

/// What a replica knows of itself: its node id, the last sequence of its log, and its HLC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    pub node: NodeId,
    /// The sequence of the last op this replica logged; its next op gets `seq + 1`.
    pub seq: u64,
    /// The HLC: the highest time this replica has stamped or observed.
    pub time: u64,
}

impl Clock {
    pub const fn new(node: NodeId) -> Self {
        Self {
            node,
            seq: 0,
            time: 0,
        }
    }

    /// The dot of the next op in this replica's log.
    pub fn next_dot(&mut self) -> Dot {
        self.seq += 1;
        Dot::new(self.node, self.seq)
    }

    /// Absorbs a time received from another replica, as an HLC does on every message.
    pub fn observe(&mut self, time: u64) {
        self.time = self.time.max(time);
    }

    /// A new stamp: the physical reading, unless that would not exceed everything seen.
    pub fn tick(&mut self, physical: u64) -> Stamp {
        self.time = physical.max(self.time.saturating_add(1));
        Stamp::new(self.time, self.node)
    }
}

/// A CRDT the simulator can drive: how to draw a random action and turn it into a delta.
pub trait Simulate: Crdt + 'static {
    /// One client request against this type.
    type Action: Clone + Debug + 'static;

    /// Realistic random actions.
    fn action() -> BoxedStrategy<Self::Action>;

    /// The delta `action` generates at a replica in state `self`, run by `node`, where the op
    /// will be logged at `dot` with HLC stamp `stamp`.
    #[must_use]
    fn generate(&self, node: NodeId, dot: Dot, stamp: Stamp, action: &Self::Action) -> Self;

    /// Wraps the value in the [`State`] enum.
    fn into_state(self) -> State;
}

/// A request to a PN-Counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CounterAction {
    /// Adds the amount; negative subtracts.
    Increment(i64),
    /// Observed reset (the delete).
    Reset,
}

/// A request to a G-Counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GCounterAction {
    Increment(u64),
    Reset,
}

/// A request to an OR-Set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetAction {
    Add(Vec<CanonicalJson>),
    Remove(Vec<CanonicalJson>),
    /// One request that removes some elements and adds others.
    Update {
        add: Vec<CanonicalJson>,
        remove: Vec<CanonicalJson>,
    },
    /// Removes every observed element (the delete).
    Clear,
}

/// A request to a register: a write, or a delete (`None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterAction {
    pub value: Option<CanonicalJson>,
}

/// PN-Counter requests: mostly small amounts of either sign, now and then a large one, and
/// (when `resets`) an occasional reset.
pub fn counter_action(resets: bool) -> BoxedStrategy<CounterAction> {
    let amount = prop_oneof![
        8 => -100i64..=100,
        1 => any::<i32>().prop_map(i64::from),
    ];
    let increment = amount.prop_map(CounterAction::Increment);
    if resets {
        prop_oneof![8 => increment, 1 => Just(CounterAction::Reset)].boxed()
    } else {
        increment.boxed()
    }
}

/// G-Counter requests, like [`counter_action`] but never negative.
pub fn g_counter_action(resets: bool) -> BoxedStrategy<GCounterAction> {
    let amount = prop_oneof![8 => 0u64..=100, 1 => any::<u32>().prop_map(u64::from)];
    let increment = amount.prop_map(GCounterAction::Increment);
    if resets {
        prop_oneof![8 => increment, 1 => Just(GCounterAction::Reset)].boxed()
    } else {
        increment.boxed()
    }
}

/// OR-Set requests over a small pool of elements, so adds and removes keep meeting.
pub fn set_action() -> BoxedStrategy<SetAction> {
    prop_oneof![
        5 => vec(element(), 1..=3).prop_map(SetAction::Add),
        4 => vec(element(), 1..=2).prop_map(SetAction::Remove),
        2 => (vec(element(), 0..=2), vec(element(), 0..=2))
            .prop_map(|(add, remove)| SetAction::Update { add, remove }),
        1 => Just(SetAction::Clear),
    ]
    .boxed()
}

/// Register requests: writes of small or arbitrary JSON, and deletes.
pub fn register_action() -> BoxedStrategy<RegisterAction> {
    prop_oneof![
        4 => element().prop_map(Some),
        2 => json().prop_map(Some),
        1 => Just(None),
    ]
    .prop_map(|value| RegisterAction { value })
    .boxed()
}

/// A small pool of JSON values (numbers, strings, an object, an array), for set elements and
/// register values that must collide often.
pub fn element() -> BoxedStrategy<CanonicalJson> {
    prop_oneof![
        4 => (0u8..5).prop_map(|n| json!(n)),
        2 => prop::sample::select(&["milk", "eggs", "tea"][..]).prop_map(|s| json!(s)),
        1 => Just(json!({"sku": 7, "qty": [2, null]})),
        1 => Just(json!([true, "two", 3.5])),
    ]
    .prop_map(CanonicalJson::from)
    .boxed()
}

/// Arbitrary JSON documents: every scalar kind (floats of any magnitude, unicode strings) and
/// nested arrays and objects.
pub fn json() -> BoxedStrategy<CanonicalJson> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        "\\PC{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map("\\PC{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .prop_map(CanonicalJson::from)
    .boxed()
}

/// Keys as clients name them.
pub fn key() -> BoxedStrategy<String> {
    prop_oneof![3 => "[a-z][a-z0-9:/_-]{0,23}", 1 => "\\PC{0,8}"].boxed()
}

impl Simulate for PnCounter {
    type Action = CounterAction;

    fn action() -> BoxedStrategy<CounterAction> {
        counter_action(true)
    }

    fn generate(&self, node: NodeId, _dot: Dot, _stamp: Stamp, action: &CounterAction) -> Self {
        match *action {
            // An increment that would overflow is refused; the request then changes nothing.
            CounterAction::Increment(by) => self.increment(node, by).unwrap_or_default(),
            CounterAction::Reset => self.reset(),
        }
    }

    fn into_state(self) -> State {
        State::Counter(self)
    }
}

impl Simulate for GCounter {
    type Action = GCounterAction;

    fn action() -> BoxedStrategy<GCounterAction> {
        g_counter_action(true)
    }

    fn generate(&self, node: NodeId, _dot: Dot, _stamp: Stamp, action: &GCounterAction) -> Self {
        match *action {
            GCounterAction::Increment(by) => self.increment(node, by).unwrap_or_default(),
            GCounterAction::Reset => self.reset(),
        }
    }

    fn into_state(self) -> State {
        State::GCounter(self)
    }
}

impl Simulate for OrSet {
    type Action = SetAction;

    fn action() -> BoxedStrategy<SetAction> {
        set_action()
    }

    fn generate(&self, node: NodeId, _dot: Dot, _stamp: Stamp, action: &SetAction) -> Self {
        match action {
            SetAction::Add(elements) => self.add(node, elements.iter().cloned()),
            SetAction::Remove(elements) => self.remove(elements),
            SetAction::Update { add, remove } => self.update(node, add.iter().cloned(), remove),
            SetAction::Clear => self.clear(),
        }
    }

    fn into_state(self) -> State {
        State::Set(self)
    }
}

impl Simulate for LwwRegister {
    type Action = RegisterAction;

    fn action() -> BoxedStrategy<RegisterAction> {
        register_action()
    }

    fn generate(&self, _node: NodeId, dot: Dot, stamp: Stamp, action: &RegisterAction) -> Self {
        self.write(stamp, dot, action.value.clone())
    }

    fn into_state(self) -> State {
        State::Register(self)
    }
}

/// One event of a [`History`].
#[derive(Clone, Debug)]
pub enum Event<A> {
    /// `replica` serves a request: it generates the delta from its own current state, applies
    /// it, and sends it to every other replica.
    Act { replica: usize, action: A },
    /// The network delivers one in-flight delta (chosen by `message`); with `duplicate`, a
    /// copy stays in flight to be delivered again later.
    Deliver { message: Index, duplicate: bool },
    /// `to` merges `from`'s whole state (anti-entropy).
    Sync { from: usize, to: usize },
}

/// The shape of generated histories.
#[derive(Clone, Debug)]
pub struct Shape {
    /// How many replicas; clamped to `1..=MAX_REPLICAS`.
    pub replicas: RangeInclusive<usize>,
    /// How many events.
    pub events: RangeInclusive<usize>,
    /// Whether whole-state merges happen, besides delta delivery.
    pub syncs: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            replicas: 1..=4,
            events: 0..=32,
            syncs: true,
        }
    }
}

/// A random run of a cluster: each replica's clock skew, and what happens, in order.
#[derive(Clone, Debug)]
pub struct History<A> {
    /// Per replica: how far its physical clock runs ahead of the wall clock.
    pub skews: Vec<u64>,
    pub events: Vec<Event<A>>,
}

/// Histories of `T`'s own actions.
pub fn history<T: Simulate>(shape: Shape) -> BoxedStrategy<History<T::Action>> {
    history_with(shape, T::action())
}

/// Histories whose requests are drawn from `action`, e.g. counters without resets.
pub fn history_with<A: Clone + Debug + 'static>(
    shape: Shape,
    action: BoxedStrategy<A>,
) -> BoxedStrategy<History<A>> {
    let Shape {
        replicas,
        events,
        syncs,
    } = shape;
    let low = (*replicas.start()).clamp(1, MAX_REPLICAS);
    let high = (*replicas.end()).clamp(low, MAX_REPLICAS);
    (low..=high)
        .prop_flat_map(move |n| {
            let act =
                (0..n, action.clone()).prop_map(|(replica, action)| Event::Act { replica, action });
            let deliver = (any::<Index>(), prop::bool::weighted(0.2))
                .prop_map(|(message, duplicate)| Event::Deliver { message, duplicate });
            let event = if syncs {
                let sync = (0..n, 0..n).prop_map(|(from, to)| Event::Sync { from, to });
                prop_oneof![4 => act, 4 => deliver, 1 => sync].boxed()
            } else {
                prop_oneof![act, deliver].boxed()
            };
            (vec(0..=MAX_SKEW, n), vec(event, events.clone()))
        })
        .prop_map(|(skews, events)| History { skews, events })
        .boxed()
}

/// What happened to replicas while a history played, for models that replay it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `replica` made operation `op` (an index into [`Played::ops`]) and applied its delta.
    Made { replica: usize, op: usize },
    /// `to` applied the delta of operation `op`, made elsewhere.
    Received { to: usize, op: usize },
    /// `to` merged `from`'s whole state.
    Synced { from: usize, to: usize },
}

/// One operation a replica made.
#[derive(Clone, Debug)]
pub struct Generated<T: Simulate> {
    pub replica: usize,
    pub dot: Dot,
    pub stamp: Stamp,
    pub action: T::Action,
    pub delta: T,
}

impl<T: Simulate> Generated<T> {
    /// The op as the WAL logs it under `key`.
    pub fn to_op(&self, key: &str) -> Op {
        Op {
            dot: self.dot,
            stamp: self.stamp,
            key: key.to_owned(),
            delta: self.delta.clone().into_state(),
        }
    }
}

/// A history after it played.
#[derive(Clone, Debug)]
pub struct Played<T: Simulate> {
    /// Every replica's current state.
    pub replicas: Vec<T>,
    pub clocks: Vec<Clock>,
    /// Every operation, in the order the replicas made them.
    pub ops: Vec<Generated<T>>,
    /// The bottom state, then every state some replica reached, in order.
    pub states: Vec<T>,
    /// Deltas sent but not delivered yet: `(recipient, index into ops)`.
    pub in_flight: Vec<(usize, usize)>,
    pub log: Vec<Step>,
}

impl<A: Clone + Debug + 'static> History<A> {
    pub fn replicas(&self) -> usize {
        self.skews.len()
    }

    /// Plays the history on a fresh cluster of `T`. Deltas still in flight at the end stay
    /// in [`Played::in_flight`]; see [`Played::flush`].
    pub fn play<T: Simulate<Action = A>>(&self) -> Played<T> {
        let n = self.replicas();
        let mut played = Played {
            replicas: vec![T::default(); n],
            clocks: (0..n).map(|i| Clock::new(replica_node(i))).collect(),
            ops: Vec::new(),
            states: vec![T::default()],
            in_flight: Vec::new(),
            log: Vec::new(),
        };
        let mut wall = START_TIME;
        for event in &self.events {
            wall += 1;
            match event {
                Event::Act { replica, action } => {
                    played.act(*replica, wall + self.skews[*replica], action.clone());
                }
                Event::Deliver { message, duplicate } => {
                    if !played.in_flight.is_empty() {
                        played.deliver(message.index(played.in_flight.len()), *duplicate);
                    }
                }
                Event::Sync { from, to } => played.sync(*from, *to),
            }
        }
        played
    }
}

impl<T: Simulate> Played<T> {
    /// `replica` serves `action` at physical time `physical`.
    pub fn act(&mut self, replica: usize, physical: u64, action: T::Action) {
        let clock = &mut self.clocks[replica];
        let dot = clock.next_dot();
        let stamp = clock.tick(physical);
        let state = &mut self.replicas[replica];
        let delta = state.generate(clock.node, dot, stamp, &action);
        state.apply(&delta);
        self.states.push(state.clone());
        let op = self.ops.len();
        self.ops.push(Generated {
            replica,
            dot,
            stamp,
            action,
            delta,
        });
        self.log.push(Step::Made { replica, op });
        self.in_flight.extend(
            (0..self.replicas.len())
                .filter(|&to| to != replica)
                .map(|to| (to, op)),
        );
    }

    /// Delivers in-flight message number `slot`, keeping a copy in flight if `duplicate`.
    pub fn deliver(&mut self, slot: usize, duplicate: bool) {
        let (to, op) = if duplicate {
            self.in_flight[slot]
        } else {
            self.in_flight.swap_remove(slot)
        };
        let generated = &self.ops[op];
        self.clocks[to].observe(generated.stamp.time);
        self.replicas[to].apply(&generated.delta);
        self.states.push(self.replicas[to].clone());
        self.log.push(Step::Received { to, op });
    }

    /// `to` merges `from`'s whole state and absorbs its clock.
    pub fn sync(&mut self, from: usize, to: usize) {
        if from == to {
            return;
        }
        let theirs = self.replicas[from].clone();
        self.replicas[to].merge(&theirs);
        let time = self.clocks[from].time;
        self.clocks[to].observe(time);
        self.states.push(self.replicas[to].clone());
        self.log.push(Step::Synced { from, to });
    }

    /// Delivers everything still in flight, choosing each next message with `picks` (cycled;
    /// the most recently queued one when `picks` is empty).
    pub fn flush(&mut self, picks: &[Index]) {
        let mut turn = 0;
        while !self.in_flight.is_empty() {
            let len = self.in_flight.len();
            let slot = if picks.is_empty() {
                len - 1
            } else {
                picks[turn % picks.len()].index(len)
            };
            self.deliver(slot, false);
            turn += 1;
        }
    }

    /// The join of every delta ever generated: what every replica holds once all arrived.
    pub fn joined(&self) -> T {
        let mut all = T::default();
        for generated in &self.ops {
            all.merge(&generated.delta);
        }
        all
    }
}

/// `count` states of `T` from one history: replica states at any point, and deltas, so that
/// merging them is meaningful (they agree on what every dot means).
pub fn states_of<T: Simulate>(count: usize) -> BoxedStrategy<Vec<T>> {
    (history::<T>(Shape::default()), vec(any::<Index>(), count))
        .prop_map(|(history, picks)| {
            let played = history.play::<T>();
            let pool: Vec<&T> = played
                .states
                .iter()
                .chain(played.ops.iter().map(|g| &g.delta))
                .collect();
            picks
                .iter()
                .map(|pick| (*pick.get(&pool)).clone())
                .collect()
        })
        .boxed()
}

/// One reachable state (or delta) of `T`.
pub fn state_of<T: Simulate>() -> BoxedStrategy<T> {
    states_of::<T>(1)
        .prop_filter_map("one state", |states| states.into_iter().next())
        .boxed()
}

pub fn lww_register() -> BoxedStrategy<LwwRegister> {
    state_of::<LwwRegister>()
}

pub fn pn_counter() -> BoxedStrategy<PnCounter> {
    state_of::<PnCounter>()
}

pub fn g_counter() -> BoxedStrategy<GCounter> {
    state_of::<GCounter>()
}

pub fn or_set() -> BoxedStrategy<OrSet> {
    state_of::<OrSet>()
}

/// `count` states of one (random) kind from one history.
pub fn states_of_one_kind(count: usize) -> BoxedStrategy<Vec<State>> {
    fn wrap<T: Simulate>(states: Vec<T>) -> Vec<State> {
        states.into_iter().map(Simulate::into_state).collect()
    }
    prop_oneof![
        states_of::<LwwRegister>(count).prop_map(wrap),
        states_of::<PnCounter>(count).prop_map(wrap),
        states_of::<GCounter>(count).prop_map(wrap),
        states_of::<OrSet>(count).prop_map(wrap),
    ]
    .boxed()
}

/// One reachable state of any kind.
pub fn state() -> BoxedStrategy<State> {
    prop_oneof![
        lww_register().prop_map(State::Register),
        pn_counter().prop_map(State::Counter),
        g_counter().prop_map(State::GCounter),
        or_set().prop_map(State::Set),
    ]
    .boxed()
}

/// One op of `T` as a replica of a random history logged it.
pub fn op_of<T: Simulate>() -> BoxedStrategy<Op> {
    let shape = Shape {
        events: 1..=24,
        ..Shape::default()
    };
    (history::<T>(shape), key(), any::<Index>())
        .prop_filter_map("a history with an op", |(history, key, pick)| {
            let played = history.play::<T>();
            (!played.ops.is_empty()).then(|| pick.get(&played.ops).to_op(&key))
        })
        .boxed()
}

/// One op of any kind.
pub fn op() -> BoxedStrategy<Op> {
    prop_oneof![
        op_of::<LwwRegister>(),
        op_of::<PnCounter>(),
        op_of::<GCounter>(),
        op_of::<OrSet>()
    ]
    .boxed()
}
