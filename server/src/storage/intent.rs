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
                // Concurrent adds in several regions can take a set past the limit, each
                // within it where it was made: an update that does not grow the set must
                // still go through, or the set could not be brought back under the limit.
                if size > max_set_elements && size > s.len() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_crdt::{Crdt, OrSet};

    fn node(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn elements(values: &[u32]) -> Vec<CanonicalJson> {
        values
            .iter()
            .map(|v| CanonicalJson::parse(&v.to_string()).unwrap())
            .collect()
    }

    /// Applies `intent` to `set` on node 1 with a limit of 3 elements.
    fn update(set: &OrSet, intent: &Intent) -> Result<OrSet, WriteError> {
        let state = State::Set(set.clone());
        let dot = Dot::new(node(1), 100);
        match intent.delta(&state, node(1), dot, Stamp::new(1, node(1)), 3)? {
            State::Set(delta) => {
                let mut next = set.clone();
                next.merge(&delta);
                Ok(next)
            }
            other => panic!("a set intent made {other:?}"),
        }
    }

    /// Two regions each add three elements while the other's are in flight: each add is
    /// within a limit of 3, the merged set holds 6.
    fn over_the_limit() -> OrSet {
        let mut here = OrSet::default();
        here.merge(&here.update(node(1), elements(&[1, 2, 3]), &[]));
        let mut there = OrSet::default();
        there.merge(&there.update(node(2), elements(&[4, 5, 6]), &[]));
        here.merge(&there);
        here
    }

    #[test]
    fn a_set_past_its_limit_takes_updates_that_do_not_grow_it() {
        let set = over_the_limit();
        assert_eq!(set.len(), 6);
        let remove = Intent::UpdateSet {
            add: Vec::new(),
            remove: elements(&[1]),
        };
        assert_eq!(update(&set, &remove).unwrap().len(), 5);
        let present = Intent::UpdateSet {
            add: elements(&[2]),
            remove: Vec::new(),
        };
        assert_eq!(update(&set, &present).unwrap().len(), 6);
        let swap = Intent::UpdateSet {
            add: elements(&[7]),
            remove: elements(&[1]),
        };
        assert_eq!(update(&set, &swap).unwrap().len(), 6);
    }

    #[test]
    fn a_set_past_its_limit_refuses_updates_that_grow_it() {
        let set = over_the_limit();
        let grow = Intent::UpdateSet {
            add: elements(&[7]),
            remove: Vec::new(),
        };
        assert!(matches!(
            update(&set, &grow),
            Err(WriteError::TooManyElements { size: 7, limit: 3 })
        ));
        let within = update(
            &OrSet::default(),
            &Intent::UpdateSet {
                add: elements(&[1, 2, 3, 4]),
                remove: Vec::new(),
            },
        );
        assert!(matches!(
            within,
            Err(WriteError::TooManyElements { size: 4, limit: 3 })
        ));
    }
}
