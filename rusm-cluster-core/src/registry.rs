//! The global registry as a sans-IO machine: names every node of the cluster can resolve to a
//! process on any node, kept alike everywhere without a coordinator or an extra round trip.
//!
//! # Model
//! Each node owns its own registrations (*claims*) and tells each peer it is linked to about
//! them on the `registry` capability of the link's control stream: the whole set when the link
//! comes up ([`Op::Sync`]), then each change ([`Op::Claim`], [`Op::Release`]). A node's view of
//! a name is the claims it holds for that name: its own, and those of the peers it is linked to
//! right now. Claims travel only from their owner, never relayed, so:
//! - a process that exits releases its names everywhere (its node sends the release);
//! - a node that goes down loses its names everywhere: each peer drops the claims it heard from
//!   it when its link goes down (within the dead-peer time);
//! - like Erlang's `global`, the registry assumes the full mesh the node's membership keeps: a
//!   node does not see the names of a node it has no link to.
//!
//! # Conflicts
//! Two processes may claim one name on the two sides of a partition (or at the same moment on
//! two linked nodes). Every claim carries a *stamp* from its owner's hybrid clock (wall-clock
//! microseconds, pushed past every stamp the node has seen, so a claim made after hearing of
//! another one stamps later). Claims are totally ordered by `(stamp, node, creation, pid)` and
//! **the least claim wins**: in practice the earliest registration keeps the name. Every node
//! applies this one rule to the claims it holds. The owner of a losing claim, on hearing of the
//! winning one, drops its own claim, tells its process ([`Output::Conflict`]) and sends the
//! release to every peer; nodes route to the winner from the moment they hold both.
//!
//! # Why this is safe under reordering and duplication
//! - The winner of a name is a pure function of the *set* of claims held, through a total
//!   order: the order in which claims arrive (from different peers, or before and after a
//!   partition heals) cannot change it, and every node that holds the same claims picks the same
//!   owner, with no extra message.
//! - A loser never comes back: a node gives up its claim only when it holds a claim that beats
//!   it, and a claim is only ever beaten by a lesser one, so the decision never flips when more
//!   claims arrive.
//! - Within one link, each update carries the number of its place in that link's stream
//!   (`seq`, from 1 for the sync). The receiver applies them strictly in that order, holds back
//!   early ones and drops repeats, so a duplicated or late frame (say, a claim repeated after
//!   its release) is never applied twice or out of order. A link that comes up again starts
//!   over with a sync, which replaces all that was held from that peer.
//!
//! A name is checked against the local view when registered ([`Registry::register`] refuses a
//! name the node already knows of), so conflicts arise only across a partition or in the short
//! window in which two nodes register the same name before hearing of each other.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::identity::NodeName;

/// The capability name registry frames travel under.
pub const CAPABILITY: &str = "registry";

/// A claim as its owner sends it: the owner node is the link's peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The global name.
    pub name: String,
    /// The owning process's id on its node.
    pub pid: u64,
    /// The owner's hybrid-clock stamp of the registration (see the module docs).
    pub stamp: u64,
}

/// One registry frame: the `seq`-th update on this link from its sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// Its place in the sender's stream of updates on this link, from 1 (the sync).
    pub seq: u64,
    /// What changed.
    pub op: Op,
}

/// What an update says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// All the sender's claims (always update 1 of a link, and only it).
    Sync(Vec<Claim>),
    /// The sender claims a name.
    Claim(Claim),
    /// The sender gives up its claim on a name.
    Release {
        /// The name.
        name: String,
        /// The process that held it.
        pid: u64,
    },
}

/// Encodes an update as a capability frame's body (MessagePack).
pub fn encode_update(update: &Update) -> bytes::Bytes {
    bytes::Bytes::from(rmp_serde::to_vec(update).expect("an update always encodes"))
}

/// Decodes a capability frame's body. Never panics on any input.
pub fn decode_update(body: &[u8]) -> Result<Update, String> {
    crate::wire::decode_msgpack(body).map_err(|e| format!("malformed update: {e}"))
}

/// A registration as the node sees it: who owns the name, and the claim's place in the
/// conflict order (fields compared in declaration order: least wins).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    /// The owner's stamp.
    pub stamp: u64,
    /// The owner node.
    pub node: NodeName,
    /// The owner node's incarnation.
    pub creation: u64,
    /// The owning process's id on its node.
    pub pid: u64,
}

/// Limits on what a peer may make the registry hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RegistryConfig {
    /// The longest name, in bytes (longer ones are refused locally and from peers).
    pub max_name_len: usize,
    /// How many names one peer may claim.
    pub max_claims_per_peer: usize,
    /// How many early updates one link may hold back while it waits for a missing one.
    pub max_held: usize,
    /// How long a link may leave a gap in its updates before it is reported broken.
    pub gap_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_name_len: 255,
            max_claims_per_peer: 1 << 20,
            max_held: 1024,
            gap_timeout: Duration::from_secs(10),
        }
    }
}

/// Why an update from a peer was refused (the link to it should then be closed; its claims
/// are dropped at once).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// An update from a peer the machine was not told is up.
    #[error("registry update from {0}, which is not a registry peer")]
    UnknownPeer(NodeName),
    /// The first update of a link was not a sync, or a later one was.
    #[error("registry update {seq} is a {kind}, out of place")]
    OutOfPlace {
        /// Its number.
        seq: u64,
        /// What it was.
        kind: &'static str,
    },
    /// A name longer than [`RegistryConfig::max_name_len`], or empty.
    #[error("global name of {0} bytes refused")]
    BadName(usize),
    /// More claims than [`RegistryConfig::max_claims_per_peer`].
    #[error("peer claims more than {0} names")]
    TooManyClaims(usize),
    /// More early updates than [`RegistryConfig::max_held`].
    #[error("peer left a gap with more than {0} updates behind it")]
    TooManyHeld(usize),
    /// A gap in the updates stayed open longer than [`RegistryConfig::gap_timeout`].
    #[error("registry update {0} never arrived")]
    GapTimeout(u64),
}

/// What the machine asks its runtime to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send `update` to `peer` (on the link's control stream, in the order output).
    Send {
        /// The peer.
        peer: NodeName,
        /// The update.
        update: Update,
    },
    /// A local process lost its name to a winning claim: tell it.
    Conflict {
        /// The name.
        name: String,
        /// The local process that held it.
        pid: u64,
        /// The claim that won.
        winner: Owner,
    },
    /// The peer broke the registry protocol: close its link.
    Close {
        /// The peer.
        peer: NodeName,
        /// Why.
        why: RegistryError,
    },
}

/// What a local registration ran into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// The name is registered (to this owner, in the node's view).
    Taken(Owner),
    /// The name is empty or longer than [`RegistryConfig::max_name_len`].
    BadName(usize),
}

struct PeerState {
    creation: u64,
    /// The number of the next update to send it.
    next_out: u64,
    /// The number of the next update to apply from it.
    next_in: u64,
    /// Early updates, by number.
    held: BTreeMap<u64, Op>,
    /// When the oldest gap opened.
    gap_since: Option<Instant>,
    /// Its claims, by name.
    claims: HashMap<String, Claim>,
}

/// The registry machine of one node. Feed it local registrations, peers going up and down,
/// updates from peers and clock ticks; it returns the updates to send and the conflicts to
/// report, and answers lookups.
pub struct Registry {
    me: NodeName,
    creation: u64,
    config: RegistryConfig,
    clock: u64,
    own: BTreeMap<String, Claim>,
    peers: BTreeMap<NodeName, PeerState>,
    /// Every claim held, per name, in conflict order (the first wins).
    names: HashMap<String, BTreeSet<Owner>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("me", &self.me)
            .field("own", &self.own.len())
            .field("peers", &self.peers.len())
            .field("names", &self.names.len())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// The registry of node `me`, incarnation `creation`.
    pub fn new(me: NodeName, creation: u64, config: RegistryConfig) -> Self {
        Registry {
            me,
            creation,
            config,
            clock: 0,
            own: BTreeMap::new(),
            peers: BTreeMap::new(),
            names: HashMap::new(),
        }
    }

    fn own_owner(&self, claim: &Claim) -> Owner {
        Owner {
            stamp: claim.stamp,
            node: self.me.clone(),
            creation: self.creation,
            pid: claim.pid,
        }
    }

    fn check_name(&self, name: &str) -> Result<(), usize> {
        if name.is_empty() || name.len() > self.config.max_name_len {
            return Err(name.len());
        }
        Ok(())
    }

    fn send_all(&mut self, op: &Op, out: &mut Vec<Output>) {
        for (peer, state) in self.peers.iter_mut() {
            out.push(Output::Send {
                peer: peer.clone(),
                update: Update {
                    seq: state.next_out,
                    op: op.clone(),
                },
            });
            state.next_out += 1;
        }
    }

    /// Registers local process `pid` as `name`, stamped from `wall_micros` (microseconds since
    /// the Unix epoch). Registering a name again for the process that holds it changes nothing.
    pub fn register(
        &mut self,
        name: &str,
        pid: u64,
        wall_micros: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), RegisterError> {
        self.check_name(name).map_err(RegisterError::BadName)?;
        if let Some(owner) = self.whereis(name) {
            if owner.node == self.me && owner.creation == self.creation && owner.pid == pid {
                return Ok(());
            }
            return Err(RegisterError::Taken(owner.clone()));
        }
        // Saturating: a peer's stamp may be anything, u64::MAX included.
        self.clock = wall_micros.max(self.clock.saturating_add(1));
        let claim = Claim {
            name: name.to_string(),
            pid,
            stamp: self.clock,
        };
        let owner = self.own_owner(&claim);
        self.names
            .entry(name.to_string())
            .or_default()
            .insert(owner);
        self.own.insert(name.to_string(), claim.clone());
        self.send_all(&Op::Claim(claim), out);
        Ok(())
    }

    /// Gives up this node's claim on `name`; the pid that held it, or `None` if this node does
    /// not hold the name.
    pub fn unregister(&mut self, name: &str, out: &mut Vec<Output>) -> Option<u64> {
        let claim = self.drop_own(name)?;
        self.send_all(
            &Op::Release {
                name: claim.name,
                pid: claim.pid,
            },
            out,
        );
        Some(claim.pid)
    }

    fn drop_own(&mut self, name: &str) -> Option<Claim> {
        let claim = self.own.remove(name)?;
        let owner = self.own_owner(&claim);
        self.forget(name, &owner);
        Some(claim)
    }

    fn forget(&mut self, name: &str, owner: &Owner) {
        if let Some(set) = self.names.get_mut(name) {
            set.remove(owner);
            if set.is_empty() {
                self.names.remove(name);
            }
        }
    }

    /// Local process `pid` exited: its names are released everywhere.
    pub fn process_exited(&mut self, pid: u64, out: &mut Vec<Output>) {
        let names: Vec<String> = self
            .own
            .values()
            .filter(|c| c.pid == pid)
            .map(|c| c.name.clone())
            .collect();
        for name in names {
            self.unregister(&name, out);
        }
    }

    /// A link to `peer` (incarnation `creation`) that uses the registry came up: it is sent all
    /// this node's claims. A peer that was up already starts over (its old link is gone).
    pub fn peer_up(&mut self, peer: &NodeName, creation: u64, out: &mut Vec<Output>) {
        self.peer_down(peer);
        self.peers.insert(
            peer.clone(),
            PeerState {
                creation,
                next_out: 2,
                next_in: 1,
                held: BTreeMap::new(),
                gap_since: None,
                claims: HashMap::new(),
            },
        );
        out.push(Output::Send {
            peer: peer.clone(),
            update: Update {
                seq: 1,
                op: Op::Sync(self.own.values().cloned().collect()),
            },
        });
    }

    /// The link to `peer` went down: the names it claimed are dropped.
    pub fn peer_down(&mut self, peer: &NodeName) {
        let Some(state) = self.peers.remove(peer) else {
            return;
        };
        for (name, claim) in state.claims {
            let owner = Owner {
                stamp: claim.stamp,
                node: peer.clone(),
                creation: state.creation,
                pid: claim.pid,
            };
            self.forget(&name, &owner);
        }
    }

    /// An update arrived from `peer` at `now`. On an error its claims are dropped (as if its
    /// link went down) and [`Output::Close`] asks for the link to be closed.
    pub fn on_update(
        &mut self,
        peer: &NodeName,
        update: Update,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        if let Err(why) = self.apply_update(peer, update, now, out) {
            self.peer_down(peer);
            out.push(Output::Close {
                peer: peer.clone(),
                why,
            });
        }
    }

    fn apply_update(
        &mut self,
        peer: &NodeName,
        update: Update,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Result<(), RegistryError> {
        let max_held = self.config.max_held;
        let state = self
            .peers
            .get_mut(peer)
            .ok_or_else(|| RegistryError::UnknownPeer(peer.clone()))?;
        if update.seq < state.next_in || state.held.contains_key(&update.seq) {
            // A repeat.
            return Ok(());
        }
        if update.seq > state.next_in {
            if state.held.len() >= max_held {
                return Err(RegistryError::TooManyHeld(max_held));
            }
            state.held.insert(update.seq, update.op);
            state.gap_since.get_or_insert(now);
            return Ok(());
        }
        let mut seq = update.seq;
        let mut op = update.op;
        loop {
            self.apply(peer, seq, op, out)?;
            let state = self.peers.get_mut(peer).expect("checked above");
            state.next_in = seq + 1;
            match state.held.remove(&state.next_in) {
                Some(next) => {
                    seq = state.next_in;
                    op = next;
                }
                None => {
                    state.gap_since = (!state.held.is_empty()).then_some(now);
                    return Ok(());
                }
            }
        }
    }

    fn apply(
        &mut self,
        peer: &NodeName,
        seq: u64,
        op: Op,
        out: &mut Vec<Output>,
    ) -> Result<(), RegistryError> {
        let kind = match &op {
            Op::Sync(_) => "sync",
            Op::Claim(_) => "claim",
            Op::Release { .. } => "release",
        };
        if (seq == 1) != matches!(op, Op::Sync(_)) {
            return Err(RegistryError::OutOfPlace { seq, kind });
        }
        match op {
            Op::Sync(claims) => {
                if claims.len() > self.config.max_claims_per_peer {
                    return Err(RegistryError::TooManyClaims(
                        self.config.max_claims_per_peer,
                    ));
                }
                for claim in claims {
                    self.add_claim(peer, claim, out)?;
                }
            }
            Op::Claim(claim) => self.add_claim(peer, claim, out)?,
            Op::Release { name, pid } => {
                let state = self.peers.get_mut(peer).expect("checked by the caller");
                if state.claims.get(&name).is_some_and(|c| c.pid == pid) {
                    let claim = state.claims.remove(&name).expect("just seen");
                    let owner = Owner {
                        stamp: claim.stamp,
                        node: peer.clone(),
                        creation: state.creation,
                        pid,
                    };
                    self.forget(&name, &owner);
                }
            }
        }
        Ok(())
    }

    fn add_claim(
        &mut self,
        peer: &NodeName,
        claim: Claim,
        out: &mut Vec<Output>,
    ) -> Result<(), RegistryError> {
        self.check_name(&claim.name)
            .map_err(RegistryError::BadName)?;
        self.clock = self.clock.max(claim.stamp);
        let max = self.config.max_claims_per_peer;
        let state = self.peers.get_mut(peer).expect("checked by the caller");
        if !state.claims.contains_key(&claim.name) && state.claims.len() >= max {
            return Err(RegistryError::TooManyClaims(max));
        }
        let owner = Owner {
            stamp: claim.stamp,
            node: peer.clone(),
            creation: state.creation,
            pid: claim.pid,
        };
        let name = claim.name.clone();
        if let Some(old) = state.claims.insert(name.clone(), claim) {
            // The peer claims the name afresh: its earlier claim is replaced.
            let old = Owner {
                stamp: old.stamp,
                pid: old.pid,
                ..owner.clone()
            };
            self.forget(&name, &old);
        }
        self.names
            .entry(name.clone())
            .or_default()
            .insert(owner.clone());
        // Does it beat a claim of ours?
        if let Some(mine) = self.own.get(&name) {
            let mine = self.own_owner(mine);
            if owner < mine {
                self.drop_own(&name);
                out.push(Output::Conflict {
                    name: name.clone(),
                    pid: mine.pid,
                    winner: owner,
                });
                self.send_all(
                    &Op::Release {
                        name,
                        pid: mine.pid,
                    },
                    out,
                );
            }
        }
        Ok(())
    }

    /// Time passed: a link whose updates have had a gap for longer than the gap timeout is
    /// reported broken ([`Output::Close`]).
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Output>) {
        let timeout = self.config.gap_timeout;
        let broken: Vec<(NodeName, u64)> = self
            .peers
            .iter()
            .filter(|(_, s)| {
                s.gap_since
                    .is_some_and(|t| now.duration_since(t) >= timeout)
            })
            .map(|(p, s)| (p.clone(), s.next_in))
            .collect();
        for (peer, missing) in broken {
            self.peer_down(&peer);
            out.push(Output::Close {
                peer,
                why: RegistryError::GapTimeout(missing),
            });
        }
    }

    /// The owner of `name` in this node's view: the least claim held.
    pub fn whereis(&self, name: &str) -> Option<&Owner> {
        self.names.get(name)?.first()
    }

    /// Whether this node holds `name` for local process `pid` and the claim wins in its view
    /// (a message sent to the name may be delivered to the process).
    pub fn owns(&self, name: &str) -> Option<u64> {
        let owner = self.whereis(name)?;
        (owner.node == self.me && owner.creation == self.creation).then_some(owner.pid)
    }

    /// Every name and its owner in this node's view, sorted by name.
    pub fn names(&self) -> Vec<(String, Owner)> {
        let mut all: Vec<(String, Owner)> = self
            .names
            .iter()
            .filter_map(|(n, set)| Some((n.clone(), set.first()?.clone())))
            .collect();
        all.sort();
        all
    }

    /// The names this node holds.
    pub fn own_names(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.own.iter().map(|(n, c)| (n.as_str(), c.pid))
    }

    /// The peers the registry exchanges with.
    pub fn peers(&self) -> impl Iterator<Item = &NodeName> + '_ {
        self.peers.keys()
    }

    /// Whether the registry exchanges with `peer`.
    pub fn has_peer(&self, peer: &NodeName) -> bool {
        self.peers.contains_key(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    /// Two registries linked to each other, with their sync exchanged.
    fn linked(a: &mut Registry, b: &mut Registry) {
        let now = Instant::now();
        let mut out = Vec::new();
        a.peer_up(&b.me.clone(), b.creation, &mut out);
        b.peer_up(&a.me.clone(), a.creation, &mut out);
        deliver(a, b, out, now);
    }

    /// Hands every `Send` output to its peer, and what that produces, until quiet.
    fn deliver(
        a: &mut Registry,
        b: &mut Registry,
        mut out: Vec<Output>,
        now: Instant,
    ) -> Vec<Output> {
        let mut other = Vec::new();
        while !out.is_empty() {
            let mut next = Vec::new();
            for o in out {
                match o {
                    Output::Send { peer, update } => {
                        let (to, from) = if peer == a.me {
                            (&mut *a, b.me.clone())
                        } else {
                            (&mut *b, a.me.clone())
                        };
                        to.on_update(&from, update, now, &mut next);
                    }
                    o => other.push(o),
                }
            }
            out = next;
        }
        other
    }

    #[test]
    fn a_registration_reaches_the_peer_and_is_released_on_exit() {
        let mut a = Registry::new(name("a"), 1, RegistryConfig::default());
        let mut b = Registry::new(name("b"), 2, RegistryConfig::default());
        linked(&mut a, &mut b);
        let mut out = Vec::new();
        a.register("db", 7, 1_000, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        deliver(&mut a, &mut b, out, Instant::now());
        let owner = b.whereis("db").unwrap();
        assert_eq!((owner.node.as_str(), owner.pid), ("a", 7));
        assert_eq!(a.owns("db"), Some(7));
        assert_eq!(b.owns("db"), None);
        // Taken, in both views.
        let mut out = Vec::new();
        assert!(
            matches!(b.register("db", 1, 2_000, &mut out), Err(RegisterError::Taken(o)) if o.pid == 7)
        );
        assert!(
            a.register("db", 7, 2_000, &mut out).is_ok(),
            "again, same pid"
        );
        assert!(out.is_empty());
        a.process_exited(7, &mut out);
        deliver(&mut a, &mut b, out, Instant::now());
        assert_eq!(b.whereis("db"), None);
        assert_eq!(a.whereis("db"), None);
    }

    #[test]
    fn a_new_peer_gets_the_names_and_a_lost_peer_takes_its_names_along() {
        let mut a = Registry::new(name("a"), 1, RegistryConfig::default());
        let mut b = Registry::new(name("b"), 2, RegistryConfig::default());
        let mut out = Vec::new();
        a.register("x", 1, 10, &mut out).unwrap();
        a.register("y", 2, 10, &mut out).unwrap();
        assert!(out.is_empty(), "no peers yet");
        linked(&mut a, &mut b);
        assert_eq!(b.names().len(), 2);
        b.peer_down(&name("a"));
        assert!(b.names().is_empty());
        assert_eq!(a.names().len(), 2);
    }

    #[test]
    fn the_earlier_claim_wins_on_both_sides_and_the_loser_is_told() {
        let mut a = Registry::new(name("a"), 1, RegistryConfig::default());
        let mut b = Registry::new(name("b"), 2, RegistryConfig::default());
        let mut out = Vec::new();
        // Registered apart (a partition), b first.
        a.register("leader", 5, 2_000, &mut out).unwrap();
        b.register("leader", 9, 1_000, &mut out).unwrap();
        assert!(out.is_empty(), "no peers yet");
        let mut up = Vec::new();
        a.peer_up(&name("b"), 2, &mut up);
        b.peer_up(&name("a"), 1, &mut up);
        let told = deliver(&mut a, &mut b, up, Instant::now());
        assert_eq!(told.len(), 1);
        let Output::Conflict {
            name: n,
            pid,
            winner,
        } = &told[0]
        else {
            panic!("{told:?}")
        };
        assert_eq!((n.as_str(), *pid), ("leader", 5));
        assert_eq!((winner.node.as_str(), winner.pid), ("b", 9));
        for r in [&a, &b] {
            let o = r.whereis("leader").unwrap();
            assert_eq!((o.node.as_str(), o.pid), ("b", 9));
            assert_eq!(r.names().len(), 1, "the loser's claim is gone everywhere");
        }
        assert_eq!(a.owns("leader"), None);
        assert_eq!(b.owns("leader"), Some(9));
    }

    #[test]
    fn updates_apply_in_their_order_whatever_order_they_arrive_in() {
        let mut b = Registry::new(name("b"), 2, RegistryConfig::default());
        let a = name("a");
        let now = Instant::now();
        let mut out = Vec::new();
        b.peer_up(&a, 1, &mut out);
        let claim = |seq, n: &str, pid| Update {
            seq,
            op: Op::Claim(Claim {
                name: n.into(),
                pid,
                stamp: 10,
            }),
        };
        let release = Update {
            seq: 3,
            op: Op::Release {
                name: "x".into(),
                pid: 1,
            },
        };
        let sync = Update {
            seq: 1,
            op: Op::Sync(vec![]),
        };
        let mut deliver = |b: &mut Registry, u: Update| b.on_update(&a, u, now, &mut out);
        // The release first, then the claim it releases, then the sync; then repeats of all.
        deliver(&mut b, release.clone());
        deliver(&mut b, claim(2, "x", 1));
        assert_eq!(b.whereis("x"), None, "waits for the sync");
        deliver(&mut b, sync);
        assert_eq!(b.whereis("x"), None, "claimed, then released");
        deliver(&mut b, claim(2, "x", 1));
        deliver(&mut b, claim(4, "y", 2));
        deliver(&mut b, claim(4, "y", 2));
        assert_eq!(b.whereis("x"), None, "a repeat is not applied again");
        assert_eq!(b.whereis("y").map(|o| o.pid), Some(2));
        assert!(
            out.iter().all(|o| matches!(o, Output::Send { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn bad_updates_close_the_link_and_drop_its_claims() {
        let cfg = RegistryConfig {
            max_held: 2,
            ..RegistryConfig::default()
        };
        let now = Instant::now();
        let a = name("a");
        let sync = |claims| Update {
            seq: 1,
            op: Op::Sync(claims),
        };
        let cases: Vec<(Vec<Update>, RegistryError)> = vec![
            (
                vec![Update {
                    seq: 1,
                    op: Op::Release {
                        name: "x".into(),
                        pid: 1,
                    },
                }],
                RegistryError::OutOfPlace {
                    seq: 1,
                    kind: "release",
                },
            ),
            (
                vec![
                    sync(vec![]),
                    Update {
                        seq: 2,
                        op: Op::Sync(vec![]),
                    },
                ],
                RegistryError::OutOfPlace {
                    seq: 2,
                    kind: "sync",
                },
            ),
            (
                vec![sync(vec![Claim {
                    name: "n".repeat(256),
                    pid: 1,
                    stamp: 1,
                }])],
                RegistryError::BadName(256),
            ),
            (
                vec![
                    Update {
                        seq: 5,
                        op: Op::Sync(vec![]),
                    },
                    Update {
                        seq: 6,
                        op: Op::Sync(vec![]),
                    },
                    Update {
                        seq: 7,
                        op: Op::Sync(vec![]),
                    },
                ],
                RegistryError::TooManyHeld(2),
            ),
        ];
        for (updates, why) in cases {
            let mut b = Registry::new(name("b"), 2, cfg);
            let mut out = Vec::new();
            b.peer_up(&a, 1, &mut out);
            out.clear();
            for u in updates {
                b.on_update(&a, u, now, &mut out);
            }
            assert_eq!(
                out,
                vec![Output::Close {
                    peer: a.clone(),
                    why
                }]
            );
            assert!(!b.has_peer(&a));
        }
        // From a peer that is not up.
        let mut b = Registry::new(name("b"), 2, cfg);
        let mut out = Vec::new();
        b.on_update(&a, sync(vec![]), now, &mut out);
        assert_eq!(
            out,
            vec![Output::Close {
                peer: a.clone(),
                why: RegistryError::UnknownPeer(a.clone())
            }]
        );
        // A gap left open.
        let mut b = Registry::new(name("b"), 2, cfg);
        let mut out = Vec::new();
        b.peer_up(&a, 1, &mut out);
        out.clear();
        b.on_update(
            &a,
            Update {
                seq: 2,
                op: Op::Release {
                    name: "x".into(),
                    pid: 1,
                },
            },
            now,
            &mut out,
        );
        b.tick(now + Duration::from_secs(9), &mut out);
        assert!(out.is_empty());
        b.tick(now + Duration::from_secs(10), &mut out);
        assert_eq!(
            out,
            vec![Output::Close {
                peer: a.clone(),
                why: RegistryError::GapTimeout(1)
            }]
        );
    }

    #[test]
    fn local_names_are_checked() {
        let mut a = Registry::new(name("a"), 1, RegistryConfig::default());
        let mut out = Vec::new();
        assert_eq!(
            a.register("", 1, 1, &mut out),
            Err(RegisterError::BadName(0))
        );
        assert_eq!(
            a.register(&"x".repeat(300), 1, 1, &mut out),
            Err(RegisterError::BadName(300))
        );
        assert_eq!(a.unregister("nope", &mut out), None);
        // Stamps never go back, even if the wall clock does.
        a.register("p", 1, 1_000, &mut out).unwrap();
        a.register("q", 1, 5, &mut out).unwrap();
        assert!(a.whereis("q").unwrap().stamp > a.whereis("p").unwrap().stamp);
    }
}
