//! Request/reply between nodes, sans-IO: the frames of the `rpc` capability (calls to a
//! process, remote spawn, monitors, attach reports) and the [`Requests`] machine that gives
//! every request an id, keeps it pending with a deadline, and ends it exactly once: with its
//! reply, with an error when its link goes down, or with a timeout. Never silence.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::identity::NodeName;

/// The capability name these frames travel under.
pub const CAPABILITY: &str = "rpc";

/// A frame of the `rpc` capability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RpcFrame {
    /// A request; the peer answers with a [`RpcFrame::Reply`] of the same id.
    Request {
        /// The requester's id for it.
        id: u64,
        /// What is asked.
        request: Request,
    },
    /// The answer to request `id`.
    Reply {
        /// The request's id.
        id: u64,
        /// The answer.
        reply: Reply,
    },
    /// Watch process `target` of the receiver (for monitor `mref` of the sender); the receiver
    /// answers once with [`RpcFrame::Down`] when it exits (at once if it is not alive).
    Monitor {
        /// The sender's monitor reference.
        mref: u64,
        /// The watched process's id on the receiver.
        target: u64,
        /// The receiver incarnation the pid belongs to.
        creation: u64,
    },
    /// Stop watching for monitor `mref`.
    Demonitor {
        /// The sender's monitor reference.
        mref: u64,
    },
    /// The process watched by monitor `mref` exited.
    Down {
        /// The monitor reference (the watcher's).
        mref: u64,
        /// Why it exited.
        reason: ExitReason,
    },
}

/// What a request asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// Deliver `payload` to process `to` as a call; its reply is the answer.
    Call {
        /// The process id on the receiver.
        to: u64,
        /// The receiver incarnation the pid belongs to.
        creation: u64,
        /// The calling process, if any.
        from: Option<u64>,
        /// The request's payload.
        payload: Bytes,
    },
    /// Spawn a process from factory `factory` with `args`.
    Spawn {
        /// The factory's registered name.
        factory: String,
        /// Its arguments.
        args: Bytes,
    },
    /// A report of the node's state (live attach).
    Report,
}

/// The answer to a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Reply {
    /// The called process's reply.
    Called(Bytes),
    /// The spawned process's id on the answering node.
    Spawned(u64),
    /// The node's report, MessagePack-encoded ([`crate::report::Report`]).
    Report(Bytes),
    /// The request failed on the answering node.
    Failed(Failure),
}

/// Why a request failed on the answering node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// No such process (it exited, or the pid is from an earlier incarnation).
    #[error("no such process")]
    NoProcess,
    /// The process dropped the call without replying (or exited first).
    #[error("the process did not reply")]
    NoReply,
    /// No factory is registered under that name (only registered factories can be spawned).
    #[error("no factory is registered as {0:?}")]
    UnknownFactory(String),
    /// The factory refused the arguments.
    #[error("the factory refused: {0}")]
    Refused(String),
    /// The answering node does not serve this request (a hidden node, or one shutting down).
    #[error("not served here: {0}")]
    NotServed(String),
}

/// Why a process exited, as a monitor reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ExitReason {
    /// Its function returned.
    Normal,
    /// It panicked (with the panic message, when it was a string).
    Panicked(String),
    /// It was killed ([`Node::kill`](../../rusm_cluster/struct.Node.html#method.kill)), or its
    /// node shut down.
    Killed,
    /// It was not alive when the monitor was set (or its pid is from an earlier incarnation).
    NoProcess,
    /// The link to its node went down: it may still run, but it can no longer be watched.
    NoConnection,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Normal => f.write_str("normal"),
            ExitReason::Panicked(why) => write!(f, "panicked: {why}"),
            ExitReason::Killed => f.write_str("killed"),
            ExitReason::NoProcess => f.write_str("no such process"),
            ExitReason::NoConnection => f.write_str("its node is unreachable"),
        }
    }
}

/// Encodes a frame as a capability frame's body (MessagePack).
pub fn encode(frame: &RpcFrame) -> Bytes {
    Bytes::from(rmp_serde::to_vec(frame).expect("an rpc frame always encodes"))
}

/// Decodes a capability frame's body. Never panics on any input.
pub fn decode(body: &[u8]) -> Result<RpcFrame, String> {
    crate::wire::decode_msgpack(body).map_err(|e| format!("malformed rpc frame: {e}"))
}

/// How a pending request ended, when it did not end with its reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Its deadline passed.
    TimedOut,
    /// The link it went out on went down first.
    LinkDown,
}

struct Pending<W> {
    peer: NodeName,
    deadline: Instant,
    waiter: W,
}

/// The requests a node has sent and not yet seen end, each with the runtime's waiter `W` (what
/// it completes when the request ends).
pub struct Requests<W> {
    next_id: u64,
    pending: BTreeMap<u64, Pending<W>>,
    deadlines: BTreeSet<(Instant, u64)>,
}

impl<W> Default for Requests<W> {
    fn default() -> Self {
        Requests {
            next_id: 1,
            pending: BTreeMap::new(),
            deadlines: BTreeSet::new(),
        }
    }
}

impl<W> std::fmt::Debug for Requests<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requests")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<W> Requests<W> {
    /// No requests.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a request to `peer` at `now`, ending at the latest after `timeout`; its id.
    pub fn start(&mut self, peer: NodeName, now: Instant, timeout: Duration, waiter: W) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let deadline = now + timeout;
        self.deadlines.insert((deadline, id));
        self.pending.insert(
            id,
            Pending {
                peer,
                deadline,
                waiter,
            },
        );
        id
    }

    fn take(&mut self, id: u64) -> Option<Pending<W>> {
        let p = self.pending.remove(&id)?;
        self.deadlines.remove(&(p.deadline, id));
        Some(p)
    }

    /// A reply to `id` arrived from `peer`: the waiter to complete, or `None` when no such
    /// request is pending from that peer (it ended already, or the peer answers what it was
    /// never asked: ignore it).
    pub fn on_reply(&mut self, peer: &NodeName, id: u64) -> Option<W> {
        if self.pending.get(&id)?.peer != *peer {
            return None;
        }
        self.take(id).map(|p| p.waiter)
    }

    /// The request was abandoned by its runtime (its caller went away).
    pub fn cancel(&mut self, id: u64) -> Option<W> {
        self.take(id).map(|p| p.waiter)
    }

    /// The link to `peer` went down: every request pending on it ends now.
    pub fn on_link_down(&mut self, peer: &NodeName) -> Vec<(u64, W)> {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.peer == *peer)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.take(id).map(|p| (id, p.waiter)))
            .collect()
    }

    /// When the next deadline falls.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Time passed: the requests whose deadline is at or before `now` end.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<(u64, W)> {
        let mut ended = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            if let Some(p) = self.take(id) {
                ended.push((id, p.waiter));
            }
        }
        ended
    }

    /// How many requests are pending.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether none is pending.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    #[test]
    fn every_request_ends_exactly_once() {
        let mut r = Requests::new();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let a = r.start(name("a"), t0, s, "replied");
        let b = r.start(name("b"), t0, 2 * s, "link down");
        let c = r.start(name("a"), t0, 3 * s, "timed out");
        let d = r.start(name("b"), t0, 10 * s, "cancelled");
        assert_eq!(r.len(), 4);
        assert_eq!(r.poll_timeout(), Some(t0 + s));
        // A reply from the wrong peer, or to an unknown id, ends nothing.
        assert_eq!(r.on_reply(&name("b"), a), None);
        assert_eq!(r.on_reply(&name("a"), 99), None);
        assert_eq!(r.on_reply(&name("a"), a), Some("replied"));
        assert_eq!(r.on_reply(&name("a"), a), None, "a repeat ends nothing");
        assert_eq!(r.poll_timeout(), Some(t0 + 2 * s));
        assert_eq!(r.cancel(d), Some("cancelled"));
        assert_eq!(r.on_link_down(&name("b")), vec![(b, "link down")]);
        assert!(r.handle_timeout(t0 + 2 * s).is_empty());
        assert_eq!(r.handle_timeout(t0 + 3 * s), vec![(c, "timed out")]);
        assert!(r.is_empty());
        assert_eq!(r.poll_timeout(), None);
    }

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let frames = [
            RpcFrame::Request {
                id: 1,
                request: Request::Call {
                    to: 5,
                    creation: 9,
                    from: Some(2),
                    payload: Bytes::from_static(b"x"),
                },
            },
            RpcFrame::Reply {
                id: 1,
                reply: Reply::Failed(Failure::UnknownFactory("w".into())),
            },
            RpcFrame::Down {
                mref: 3,
                reason: ExitReason::Panicked("boom".into()),
            },
        ];
        for f in frames {
            assert_eq!(decode(&encode(&f)), Ok(f));
        }
        assert!(decode(b"\xc1garbage").is_err());
        assert!(decode(b"").is_err());
    }
}
