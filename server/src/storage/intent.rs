//! What a client asked to do to one key, before it becomes a delta.

use meridian_crdt::{CanonicalJson, Dot, NodeId, Stamp, State};

use super::WriteError;

/// A local write, validated by the API layer, turned into a delta by the writer against the
/// key's current state (generate, then apply).
#[derive(Clone, Debug)]
pub enum Intent {
    PutRegister(CanonicalJson),
    DeleteRegister,
    Increment(i64),
    IncrementG(u64),
    /// Observed-reset of a PN- or G-Counter.
    ResetCounter,
    UpdateSet {
        add: Vec<CanonicalJson>,
        remove: Vec<CanonicalJson>,
    },
    ClearSet,
}

impl Intent {
    /// The delta this intent makes from `state`. The API only pairs an intent with keys of its
    /// own kind; on a mismatch the delta is empty, which changes nothing.
    pub(crate) fn delta(
        &self,
        state: &State,
        node: NodeId,
        dot: Dot,
        stamp: Stamp,
        max_set_elements: usize,
    ) -> Result<State, WriteError> {
        let delta = match (self, state) {
            (Self::PutRegister(value), State::Register(r)) => {
                State::Register(r.write(stamp, dot, Some(value.clone())))
            }
            (Self::DeleteRegister, State::Register(r)) => {
                State::Register(r.write(stamp, dot, None))
            }
            (Self::Increment(by), State::Counter(c)) => State::Counter(
                c.increment(node, *by)
                    .map_err(|_| WriteError::CounterOverflow)?,
            ),
            (Self::IncrementG(by), State::GCounter(c)) => State::GCounter(
                c.increment(node, *by)
                    .map_err(|_| WriteError::CounterOverflow)?,
            ),
            (Self::ResetCounter, State::Counter(c)) => State::Counter(c.reset()),
            (Self::ResetCounter, State::GCounter(c)) => State::GCounter(c.reset()),
            (Self::UpdateSet { add, remove }, State::Set(s)) => {
                let size = projected_size(s, add, remove);
                if size > max_set_elements {
                    return Err(WriteError::TooManyElements {
                        size,
                        limit: max_set_elements,
                    });
                }
                State::Set(s.update(node, add.iter().cloned(), remove))
            }
            (Self::ClearSet, State::Set(s)) => State::Set(s.clear()),
            _ => State::bottom(state.kind()),
        };
        Ok(delta)
    }
}

/// The set's size after the update, computed without building it: adds win over removes.
fn projected_size(
    set: &meridian_crdt::OrSet,
    add: &[CanonicalJson],
    remove: &[CanonicalJson],
) -> usize {
    let added: std::collections::BTreeSet<&CanonicalJson> = add.iter().collect();
    let new = added.iter().filter(|e| !set.contains(e)).count();
    let removed: std::collections::BTreeSet<&CanonicalJson> = remove
        .iter()
        .filter(|e| set.contains(e) && !added.contains(e))
        .collect();
    set.len() + new - removed.len()
}
