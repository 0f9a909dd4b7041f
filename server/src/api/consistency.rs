//! Consistency levels and sessions: who must hold a write before it is answered, who must
//! answer a read, and how a session token keeps a client from going back in time.
//!
//! # Writes
//! 1. The session token is waited for (writes follow the client's reads too, so an observed
//!    remove or reset never misses what the client saw).
//! 2. If the failure detector already knows fewer nodes than the level needs are reachable, the
//!    write is refused with 503 before anything is applied.
//! 3. The op is applied and made durable here (this node counts towards every level).
//! 4. Above LOCAL_ONE the answer waits until enough peers acknowledge durably applying the op
//!    (their acked vector's entry for this node reaches the op's sequence), up to the level's
//!    coordination deadline; then 504 saying how many acknowledged. The write stays applied
//!    where it landed and still replicates everywhere: a 504 means "not known to be at the
//!    level yet", never "rolled back".
//!
//! # Reads
//! The session token is waited for, the key is read here (and the answer waits until what it
//! reflects is durable); above LOCAL_ONE the key's state is also fetched from peers over QUIC
//! until enough nodes answered, and the answer is the merge of their states.
//!
//! # Deadlines
//! All waiting is measured from the request's arrival. The coordination deadline leaves a
//! margin (a tenth of `timeouts.request_ms`, at least 50 ms) before the HTTP request timeout,
//! so the level's own 504 answers rather than the generic timeout. LOCAL_QUORUM, whose peers
//! are near, waits at most half the request timeout. A session token is waited for at most
//! `min(request timeout / 2, 2 s)`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use meridian_crdt::{CrdtError, Kind, NodeId, State as CrdtState, VersionVector};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::AppState;
use super::extract::ConsistencyLevel;
use crate::cluster::Electorate;

/// The longest a request waits for this node to catch up with its session token.
pub const MAX_SESSION_WAIT: Duration = Duration::from_secs(2);

/// How long a read waits for the ops its snapshot reflects to become durable here.
const DURABLE_WAIT: Duration = Duration::from_secs(1);

/// Why a request could not be served at its consistency level or within its session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsistencyError {
    /// Refused before acting: the failure detector knows too few nodes are reachable.
    #[error(
        "{level} needs {required} nodes but only {reachable} (this one included) are reachable; nothing was applied"
    )]
    Unavailable {
        level: ConsistencyLevel,
        required: usize,
        reachable: usize,
    },
    /// Peers did not acknowledge a write in time. The write is applied here and will still
    /// replicate.
    #[error(
        "{level} write: {acknowledged} of the {required} nodes needed hold it durably after {waited_ms} ms; it stays applied where it landed and will still replicate"
    )]
    WriteTimeout {
        level: ConsistencyLevel,
        required: usize,
        acknowledged: usize,
        waited_ms: u64,
    },
    /// Not enough nodes answered a read in time.
    #[error(
        "{level} read: {answered} of the {required} nodes needed answered within {waited_ms} ms"
    )]
    ReadTimeout {
        level: ConsistencyLevel,
        required: usize,
        answered: usize,
        waited_ms: u64,
    },
    /// Peers that were reachable failed to answer a read.
    #[error("{level} read: only {answered} of the {required} nodes needed could answer")]
    ReadFailed {
        level: ConsistencyLevel,
        required: usize,
        answered: usize,
    },
    /// This node has not applied everything the session token says the client saw.
    #[error(
        "this node has not yet applied everything this session has seen (behind on {behind}) after waiting {waited_ms} ms; retry, or use a node that has"
    )]
    SessionBehind { behind: String, waited_ms: u64 },
    #[error("merging states from peers: {0}")]
    Merge(#[from] CrdtError),
}

/// One request's session: the vector its token carried, and what the request itself saw or
/// wrote. The response's token holds both.
#[derive(Debug)]
pub struct SessionCtx {
    pub token: VersionVector,
    seen: Mutex<VersionVector>,
    /// Set once the request's write is queued for the applier: from then on it commits even
    /// if the client stops waiting, so a timeout must not say it was refused.
    write_queued: AtomicBool,
    /// When the request arrived: every deadline is measured from it.
    pub started: Instant,
}

impl SessionCtx {
    pub fn new(token: VersionVector, started: Instant) -> Self {
        Self {
            token,
            seen: Mutex::new(VersionVector::new()),
            write_queued: AtomicBool::new(false),
            started,
        }
    }

    pub fn queue_write(&self) {
        self.write_queued.store(true, Ordering::Release);
    }

    pub fn write_queued(&self) -> bool {
        self.write_queued.load(Ordering::Acquire)
    }

    /// Adds what this request saw or wrote.
    pub fn saw(&self, vector: &VersionVector) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .merge(vector);
    }

    /// The vector the response's token carries: the request's token joined with what it saw.
    pub fn response_vector(&self) -> VersionVector {
        let mut vector = self.token.clone();
        vector.merge(&self.seen.lock().unwrap_or_else(PoisonError::into_inner));
        vector
    }
}

/// The request's session, as the guard middleware parsed it (empty when absent).
#[derive(Clone, Debug)]
pub struct Session(pub Arc<SessionCtx>);

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<Arc<SessionCtx>>()
                .cloned()
                .unwrap_or_else(|| Arc::new(SessionCtx::new(VersionVector::new(), Instant::now()))),
        ))
    }
}

/// Origins where `have` is below `want`, as `node:have<want` pairs.
fn shortfall(have: &VersionVector, want: &VersionVector) -> String {
    want.iter()
        .filter(|&(origin, seq)| have.get(origin) < seq)
        .map(|(origin, seq)| format!("node {origin}: {} < {seq}", have.get(origin)))
        .collect::<Vec<_>>()
        .join(", ")
}

impl AppState {
    /// When coordination at `level` must give up, for a request that arrived at `started`.
    pub fn coordination_deadline(&self, level: ConsistencyLevel, started: Instant) -> Instant {
        let request = self.timeouts.request();
        let margin = (request / 10)
            .max(Duration::from_millis(50))
            .min(request / 2);
        let overall = started + request.saturating_sub(margin);
        let per_level = match level {
            ConsistencyLevel::LocalOne | ConsistencyLevel::LocalQuorum => request / 2,
            ConsistencyLevel::GlobalQuorum | ConsistencyLevel::All => request,
        };
        overall.min(started + per_level)
    }

    /// What every read and write does before it touches data: the electorate of `level`, once
    /// the session's token is satisfied. Too few reachable is a 503 at once (DESIGN §2), before
    /// any wait for the session, and is checked again after that wait, which can take seconds.
    pub async fn admit(
        &self,
        level: ConsistencyLevel,
        session: &SessionCtx,
    ) -> Result<Electorate, ConsistencyError> {
        self.check_reachable(level)?;
        self.wait_session(session).await?;
        self.check_reachable(level)
    }

    /// Waits (bounded) until this node has durably applied everything the token names.
    pub async fn wait_session(&self, session: &SessionCtx) -> Result<(), ConsistencyError> {
        if session.token.is_empty() {
            return Ok(());
        }
        let mut applied = self.storage.watch_applied();
        if applied.borrow().dominates(&session.token) {
            return Ok(());
        }
        let limit = (self.timeouts.request() / 2).min(MAX_SESSION_WAIT);
        let waited = tokio::time::timeout(
            limit,
            applied.wait_for(|applied| applied.dominates(&session.token)),
        )
        .await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ConsistencyError::SessionBehind {
                behind: shortfall(&self.storage.applied(), &session.token),
                waited_ms: limit.as_millis() as u64,
            }),
        }
    }

    /// The nodes `level` involves, or 503 when the failure detector already knows too few are
    /// reachable.
    pub fn check_reachable(&self, level: ConsistencyLevel) -> Result<Electorate, ConsistencyError> {
        let electorate = self.cluster.electorate(level);
        if electorate.required <= 1 {
            return Ok(electorate);
        }
        let reachable = self
            .cluster
            .replicator()
            .map(meridian_replication::Replicator::reachable)
            .unwrap_or_default();
        let alive = 1 + electorate
            .peers
            .iter()
            .filter(|p| reachable.contains(p))
            .count();
        if alive < electorate.required {
            return Err(ConsistencyError::Unavailable {
                level,
                required: electorate.required,
                reachable: alive,
            });
        }
        Ok(electorate)
    }

    /// Waits until enough of the electorate (this node included) durably hold this node's op
    /// `seq`, as their acknowledgements say.
    pub async fn wait_acks(
        &self,
        level: ConsistencyLevel,
        electorate: &Electorate,
        seq: u64,
        started: Instant,
    ) -> Result<(), ConsistencyError> {
        if electorate.required <= 1 {
            return Ok(());
        }
        let me = self.storage.node_id();
        let count = |acks: &std::collections::BTreeMap<NodeId, VersionVector>| {
            1 + electorate
                .peers
                .iter()
                .filter(|p| acks.get(p).is_some_and(|v| v.get(me) >= seq))
                .count()
        };
        let Some(replicator) = self.cluster.replicator() else {
            return Err(ConsistencyError::WriteTimeout {
                level,
                required: electorate.required,
                acknowledged: 1,
                waited_ms: 0,
            });
        };
        let mut acks = replicator.watch_acks();
        let deadline = self.coordination_deadline(level, started);
        let waited = tokio::time::timeout_at(
            deadline,
            acks.wait_for(|acks| count(acks) >= electorate.required),
        )
        .await;
        let reached = waited.is_ok_and(|r| r.is_ok());
        if reached {
            return Ok(());
        }
        {
            Err(ConsistencyError::WriteTimeout {
                level,
                required: electorate.required,
                acknowledged: count(&acks.borrow()),
                waited_ms: started.elapsed().as_millis() as u64,
            })
        }
    }

    /// Reads `key` here: the state, and the applied vector of the same snapshot, once what it
    /// reflects is durable (the group commit makes it so within milliseconds).
    ///
    /// A snapshot that is still not durable after [`DURABLE_WAIT`] is not served: a crash
    /// before its journal sync returns takes those writes back and the node reissues their
    /// dots for other writes, so a client, a session token or read repair (which would make
    /// peers hold them durably) must never see them.
    pub async fn read_local(
        &self,
        kind: Kind,
        key: &str,
    ) -> Result<(Option<CrdtState>, VersionVector), crate::storage::StorageError> {
        let (state, applied) = self.storage.get_with_applied(kind, key)?;
        self.wait_durable(&applied).await?;
        Ok((state, applied))
    }

    /// Waits until everything `applied` names is durable here, or refuses after
    /// [`DURABLE_WAIT`] (see [`Self::read_local`]).
    pub async fn wait_durable(
        &self,
        applied: &VersionVector,
    ) -> Result<(), crate::storage::StorageError> {
        let mut durable = self.storage.watch_applied();
        if durable.borrow().dominates(applied) {
            return Ok(());
        }
        let waited = tokio::time::timeout(
            DURABLE_WAIT,
            durable.wait_for(|vector| vector.dominates(applied)),
        )
        .await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(crate::storage::StorageError::ShuttingDown),
            Err(_) => Err(crate::storage::StorageError::NotDurable {
                waited_ms: DURABLE_WAIT.as_millis() as u64,
            }),
        }
    }

    /// Above LOCAL_ONE: fetches the key from reachable peers of the electorate until enough
    /// nodes (this one included) answered, and merges their states into `local`.
    pub async fn quorum_read(
        &self,
        level: ConsistencyLevel,
        electorate: &Electorate,
        kind: Kind,
        key: &str,
        local: (Option<CrdtState>, VersionVector),
        started: Instant,
    ) -> Result<(Option<CrdtState>, VersionVector), ConsistencyError> {
        let (mut state, mut applied) = local;
        let local_state = (state.clone(), applied.clone());
        let mut answers: Vec<(NodeId, Option<CrdtState>, VersionVector)> = Vec::new();
        let needed = electorate.required.saturating_sub(1);
        if needed == 0 {
            return Ok((state, applied));
        }
        let Some(replicator) = self.cluster.replicator_arc() else {
            return Err(ConsistencyError::ReadFailed {
                level,
                required: electorate.required,
                answered: 1,
            });
        };
        let reachable = replicator.reachable();
        let mut reads = JoinSet::new();
        for &peer in electorate.peers.iter().filter(|p| reachable.contains(p)) {
            let replicator = replicator.clone();
            let key = key.to_owned();
            reads.spawn(async move { (peer, replicator.read_state(peer, kind, &key).await) });
        }
        let deadline = self.coordination_deadline(level, started);
        let mut answered = 0;
        while answered < needed {
            match tokio::time::timeout_at(deadline, reads.join_next()).await {
                Err(_) => {
                    return Err(ConsistencyError::ReadTimeout {
                        level,
                        required: electorate.required,
                        answered: answered + 1,
                        waited_ms: started.elapsed().as_millis() as u64,
                    });
                }
                Ok(None) => {
                    return Err(ConsistencyError::ReadFailed {
                        level,
                        required: electorate.required,
                        answered: answered + 1,
                    });
                }
                Ok(Some(Ok((peer, Ok(read))))) => {
                    if let Some(theirs) = &read.state {
                        self.storage.observe_state_stamp(theirs);
                    }
                    match (&mut state, &read.state) {
                        (Some(mine), Some(theirs)) => mine.merge(theirs)?,
                        (None, Some(theirs)) => state = Some(theirs.clone()),
                        (_, None) => {}
                    }
                    applied.merge(&read.applied);
                    answers.push((peer, read.state, read.applied));
                    answered += 1;
                }
                Ok(Some(Ok((peer, Err(error))))) => {
                    tracing::debug!(%peer, %error, "quorum read from a peer failed");
                }
                Ok(Some(Err(error))) => {
                    tracing::warn!(%error, "quorum read task failed");
                }
            }
        }
        if let Some(merged) = &state {
            let (local_state, local_applied) = local_state;
            let local = Replica {
                holds_less: local_state.as_ref() != Some(merged),
                applied: &local_applied,
            };
            let peers: Vec<(NodeId, Replica<'_>)> = answers
                .iter()
                .map(|(peer, theirs, their_applied)| {
                    let holds_less = theirs.as_ref() != Some(merged);
                    (
                        *peer,
                        Replica {
                            holds_less,
                            applied: their_applied,
                        },
                    )
                })
                .collect();
            let (repair_local, repair_peers) = repair_targets(&applied, &local, &peers);
            self.read_repair(&replicator, kind, key, merged, repair_local, repair_peers);
        }
        Ok((state, applied))
    }

    /// Writes the merged state back, in the background, to the replicas [`repair_targets`]
    /// chose (this node, `local_behind`, and `behind`). Like an anti-entropy push it logs no
    /// op: the merged state holds only ops that are durable on the replicas that sent them.
    fn read_repair(
        &self,
        replicator: &Arc<meridian_replication::Replicator>,
        kind: Kind,
        key: &str,
        merged: &CrdtState,
        local_behind: bool,
        behind: Vec<NodeId>,
    ) {
        if behind.is_empty() && !local_behind {
            return;
        }
        let (replicator, storage, metrics) = (
            replicator.clone(),
            self.storage.clone(),
            self.metrics.clone(),
        );
        let (key, merged) = (key.to_owned(), merged.clone());
        tokio::spawn(async move {
            if local_behind {
                let storage_key = meridian_replication::merkle::storage_key(kind, &key);
                match storage
                    .merge_full_states(vec![(storage_key, merged.clone())])
                    .await
                {
                    Ok(changed) => metrics.record_read_repair("local", changed > 0),
                    Err(error) => tracing::warn!(%error, "local read repair failed"),
                }
            }
            for peer in behind {
                match replicator.repair_state(peer, kind, &key, &merged).await {
                    Ok(changed) => metrics.record_read_repair("peer", changed),
                    Err(error) => tracing::debug!(%peer, %error, "read repair of a peer failed"),
                }
            }
        });
    }
}

/// What a quorum read learned of one replica: whether its state lacks something of the merged
/// one, and the applied vector it answered with.
#[derive(Debug)]
struct Replica<'a> {
    holds_less: bool,
    applied: &'a VersionVector,
}

/// Which replicas a quorum read repairs with its merged state (this node first, then peers):
/// those that hold less although their applied vector already names every op the answers
/// did (`merged_applied`). Only divergence needs repair; a replica that is merely behind on
/// the WAL gets those ops from it, in milliseconds. Repairing it anyway would put ops in its
/// state that its applied vector does not name, and every session token it issues is built
/// from that vector: a client reading the repaired key there could carry a token that lets it
/// read an older state in another region (ARCHITECTURE, "Known hazards").
fn repair_targets(
    merged_applied: &VersionVector,
    local: &Replica<'_>,
    peers: &[(NodeId, Replica<'_>)],
) -> (bool, Vec<NodeId>) {
    let repairs =
        |replica: &Replica<'_>| replica.holds_less && replica.applied.dominates(merged_applied);
    let peers = peers
        .iter()
        .filter(|(_, replica)| repairs(replica))
        .map(|(peer, _)| *peer)
        .collect();
    (repairs(local), peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv(entries: &[(u64, u64)]) -> VersionVector {
        entries
            .iter()
            .filter_map(|&(node, seq)| Some((NodeId::new(node)?, seq)))
            .collect()
    }

    fn peer(id: u64) -> NodeId {
        NodeId::new(id).unwrap_or_else(|| unreachable!("node ids in these tests are non-zero"))
    }

    /// Node 1 wrote op 5; the read merged it from node 2, which holds it.
    #[test]
    fn a_replica_that_only_lags_is_left_to_the_wal() {
        let merged = vv(&[(1, 5), (2, 3)]);
        let lagging = vv(&[(1, 4), (2, 3)]);
        let holding = vv(&[(1, 5), (2, 3)]);
        let local = Replica {
            holds_less: true,
            applied: &lagging,
        };
        let peers = [
            (
                peer(2),
                Replica {
                    holds_less: false,
                    applied: &holding,
                },
            ),
            (
                peer(3),
                Replica {
                    holds_less: true,
                    applied: &lagging,
                },
            ),
        ];
        assert_eq!(repair_targets(&merged, &local, &peers), (false, vec![]));
    }

    /// A replica whose applied vector names every op of the merge and still holds less has
    /// lost something (a restored backup, a corrupted key): that is what read repair is for.
    #[test]
    fn a_replica_that_claims_every_op_yet_holds_less_is_repaired() {
        let merged = vv(&[(1, 5), (2, 3)]);
        let claims_all = vv(&[(1, 5), (2, 3)]);
        let claims_more = vv(&[(1, 7), (2, 3), (3, 1)]);
        let local = Replica {
            holds_less: true,
            applied: &claims_more,
        };
        let peers = [
            (
                peer(2),
                Replica {
                    holds_less: true,
                    applied: &claims_all,
                },
            ),
            (
                peer(3),
                Replica {
                    holds_less: false,
                    applied: &claims_all,
                },
            ),
        ];
        assert_eq!(
            repair_targets(&merged, &local, &peers),
            (true, vec![peer(2)])
        );
    }
}
