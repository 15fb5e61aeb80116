//! A deterministic, seeded simulation of the global registry ([`Registry`]) on 50 nodes.
//!
//! # What is simulated
//! - **Nodes.** Each node runs one registry machine (`n0` … `n49`) and has live processes (pids
//!   come from one counter and are never reused). A node may crash: every link it has goes down
//!   (its peers are told `peer_down` at once), its machine, processes and names are gone, and
//!   frames to or from it are lost. It may later restart as a new incarnation (a fresh machine
//!   with a new `creation` and new processes), alone until the next heal. It may also restart
//!   so fast that its peers meet the new incarnation before noticing the old one is gone: each
//!   of its links is replaced by a new one, `peer_up` with no `peer_down` before it.
//! - **Links.** Every pair of nodes has a link, up or down. Each time a link comes up it gets a
//!   new *session*: both ends are told `peer_up` at the same instant and their syncs go out. A
//!   frame carries the session it was sent on, and a frame whose session has ended is dropped on
//!   arrival, as the runtime tears the old link down with everything in flight on it.
//! - **The network.** Virtual time: a base [`Instant`] plus a virtual offset, which is also every
//!   node's wall clock (skewed by up to ±5 ms per node, to exercise the hybrid clock). Each
//!   frame gets its own random latency (50 µs – 3 ms), so frames on one link overtake each other,
//!   and one frame in twenty is delivered twice, at two different times. Frames wait in a queue
//!   ordered by delivery time.
//! - **Actions.** Random, from a seeded RNG, between which virtual time passes (mostly up to
//!   1.5 ms, now and then up to 20 s, past the gap timeout) and the frames that fall due are
//!   delivered: register a name from a small pool (30 names, so they are contended) by a live
//!   process; a race (several nodes register one free name at the same instant); unregister; a
//!   process exits; a process is spawned; a partition (the live nodes split into two random
//!   groups; every link across goes down); one link goes down, or comes up, alone (so the mesh
//!   is not always a set of fully linked groups); a heal (every down link between live nodes
//!   comes up); a crash; a restart; a fast restart; a pause long enough for every frame in
//!   flight to land; and ticks.
//!
//! # What is checked
//! After every step, on every machine that took an input: its own names are exactly those the
//! simulation expects (a registration that succeeded, not since released, exited or lost to a
//! conflict), each of them wins in its own node's view, its peers are the links that are up, and
//! every owner in its view is a claim that was really made, by the node itself or by the live
//! incarnation of a node it is linked to. A new registration stamps later than every claim its
//! node has seen. Every [`Output::Conflict`] must concern a name the node holds, for the process
//! holding it, and name a winner that was really registered and is less than the loser;
//! [`Output::Close`] must never happen (the network here is honest). After each pause, whatever
//! the links: no two linked nodes hold the same name, and each view is, per name, the least
//! claim held by the node or a node linked to it. At the end everything restarts and heals, the
//! queue drains, and: (1) every live node has the same view; (2) every name belongs to a live
//! process of a live incarnation that owns it; (3) exactly one claim is held per name and it is
//! the owner in the view; (4) every process told of a conflict no longer holds the name, unless
//! it registered it again later; (5) no view holds a name of a dead process or of a crashed
//! incarnation.
//!
//! The seeds' figures (frames, conflicts, convergence time after the final heal) and the cost of
//! one registration in a full mesh of 5 and of 50 nodes are printed; run with `--nocapture` to
//! see them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rusm_cluster_core::identity::NodeName;
use rusm_cluster_core::registry::{
    Claim, Op, Output, Owner, RegisterError, Registry, RegistryConfig, Update,
};

/// The index of node `n{i}`.
fn node_index(name: &NodeName) -> usize {
    name.as_str()[1..].parse().expect("named n{i}")
}

/// A node's view: every name and its owner, sorted by name (as [`Registry::names`] returns
/// it).
type View = Vec<(String, Owner)>;

/// The shape of one run.
#[derive(Clone, Copy, Debug)]
struct Params {
    /// How many nodes.
    nodes: usize,
    /// How many distinct global names the processes contend for.
    names: usize,
    /// How many random actions before the final heal.
    steps: usize,
    /// The chance that a frame is delivered twice.
    dup: f64,
}

/// The quick run: every seed of the CI test.
const QUICK: Params = Params {
    nodes: 50,
    names: 30,
    steps: 300,
    dup: 0.05,
};

/// The long run (ignored by default).
const LONG: Params = Params {
    nodes: 50,
    names: 30,
    steps: 1500,
    dup: 0.05,
};

/// The nodes' wall clock at virtual time zero, in microseconds since the Unix epoch.
const WALL_EPOCH_MICROS: u64 = 1_750_000_000_000_000;

/// The least and greatest latency of a frame, in microseconds.
const LATENCY_MICROS: (u64, u64) = (50, 3_000);

/// A frame in flight.
struct Frame {
    from: usize,
    to: usize,
    session: u64,
    update: Update,
}

/// The link between two nodes.
#[derive(Clone, Copy, Default)]
struct Link {
    up: bool,
    /// The session it is in (or was last in); sessions are never reused.
    session: u64,
}

/// One node of the simulation.
struct Node {
    name: NodeName,
    /// The machine of the live incarnation; `None` while crashed.
    reg: Option<Registry>,
    /// The incarnation (live or last).
    creation: u64,
    /// The live processes.
    procs: BTreeSet<u64>,
    /// The names the machine should hold, with their claims: mirrors `own_names`.
    held: BTreeMap<String, Owner>,
    /// The node's wall-clock error, in microseconds.
    skew_micros: i64,
    /// The stamp of its incarnation's latest registration.
    last_stamp: u64,
}

/// A process that was told it lost a name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Lost {
    node: usize,
    creation: u64,
    pid: u64,
    name: String,
    winner: Owner,
    /// When, in the order of registrations and conflicts.
    event: u64,
}

/// Counts of what happened in one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Stats {
    steps: u64,
    registered: u64,
    taken: u64,
    unregistered: u64,
    exits: u64,
    partitions: u64,
    heals: u64,
    crashes: u64,
    restarts: u64,
    pauses: u64,
    races: u64,
    flaps: u64,
    connects: u64,
    reboots: u64,
    /// Frames the machines asked to send.
    sent: u64,
    /// Second copies put in flight.
    duplicated: u64,
    /// Frames handed to a machine.
    delivered: u64,
    /// Frames dropped because their link session had ended.
    stale: u64,
    conflicts: u64,
}

/// What a run ends with.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// The view every live node agrees on.
    view: View,
    stats: Stats,
    lost: Vec<Lost>,
    /// From the final heal to the last change of any node's view.
    settle: Duration,
    /// From the final heal to the last frame applied.
    quiet: Duration,
}

struct Sim {
    seed: u64,
    p: Params,
    rng: Xoshiro256PlusPlus,
    base: Instant,
    now: Duration,
    nodes: Vec<Node>,
    /// By `a * nodes + b`, `a < b`.
    links: Vec<Link>,
    next_session: u64,
    /// Frames in flight by (delivery time, order sent).
    queue: BTreeMap<(Duration, u64), Frame>,
    next_order: u64,
    next_pid: u64,
    next_creation: u64,
    pool: Vec<String>,
    /// Every claim ever made, with its name, by (stamp, creation): creations are never
    /// reused and an incarnation's stamps only grow, so that pair names one claim.
    made: BTreeMap<(u64, u64), (String, Owner)>,
    /// Orders registrations and conflicts.
    event: u64,
    /// The last registration of a name by a process: (node, creation, pid, name) -> event.
    registrations: BTreeMap<(usize, u64, u64, String), u64>,
    lost: Vec<Lost>,
    stats: Stats,
    /// The nodes whose machine took an input since the last check.
    dirty: Vec<bool>,
    /// In the final phase: each live node's view and when it last changed.
    watch: Option<Vec<(View, Duration)>>,
    last_applied: Duration,
}

impl Sim {
    fn new(seed: u64, p: Params) -> Sim {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut nodes = Vec::with_capacity(p.nodes);
        for i in 0..p.nodes {
            let name = NodeName::new(format!("n{i}")).expect("a valid node name");
            let skew_micros = rng.random_range(-5_000..=5_000);
            nodes.push(Node {
                name,
                reg: None,
                creation: 0,
                procs: BTreeSet::new(),
                held: BTreeMap::new(),
                skew_micros,
                last_stamp: 0,
            });
        }
        let mut sim = Sim {
            seed,
            p,
            rng,
            base: Instant::now(),
            now: Duration::ZERO,
            nodes,
            links: vec![Link::default(); p.nodes * p.nodes],
            next_session: 1,
            queue: BTreeMap::new(),
            next_order: 0,
            next_pid: 1,
            next_creation: 1,
            pool: (0..p.names).map(|i| format!("svc.{i}")).collect(),
            made: BTreeMap::new(),
            event: 0,
            registrations: BTreeMap::new(),
            lost: Vec::new(),
            stats: Stats::default(),
            dirty: vec![true; p.nodes],
            watch: None,
            last_applied: Duration::ZERO,
        };
        for i in 0..p.nodes {
            sim.start(i);
        }
        sim.heal();
        sim
    }

    // ----- bookkeeping -----

    fn link(&self, a: usize, b: usize) -> Link {
        let (a, b) = (a.min(b), a.max(b));
        self.links[a * self.p.nodes + b]
    }

    fn link_mut(&mut self, a: usize, b: usize) -> &mut Link {
        let (a, b) = (a.min(b), a.max(b));
        &mut self.links[a * self.p.nodes + b]
    }

    /// Whether `owner`'s claim on `name` was made by a registration.
    fn was_made(&self, name: &str, owner: &Owner) -> bool {
        self.made
            .get(&(owner.stamp, owner.creation))
            .is_some_and(|(n, o)| n == name && o == owner)
    }

    fn alive(&self, i: usize) -> bool {
        self.nodes[i].reg.is_some()
    }

    fn live(&self) -> Vec<usize> {
        (0..self.p.nodes).filter(|&i| self.alive(i)).collect()
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            return None;
        }
        Some(items[self.rng.random_range(0..items.len())])
    }

    fn wall_micros(&self, i: usize) -> u64 {
        let micros = WALL_EPOCH_MICROS + self.now.as_micros() as u64;
        micros.saturating_add_signed(self.nodes[i].skew_micros)
    }

    /// Node `i`'s machine, to give it an input (it is checked after the step).
    fn reg(&mut self, i: usize) -> &mut Registry {
        let seed = self.seed;
        self.dirty[i] = true;
        self.nodes[i]
            .reg
            .as_mut()
            .unwrap_or_else(|| panic!("seed {seed}: n{i} is down"))
    }

    /// Starts a new incarnation of node `i`, with a few processes and no links.
    fn start(&mut self, i: usize) {
        let creation = self.next_creation;
        self.next_creation += 1;
        self.dirty[i] = true;
        let node = &mut self.nodes[i];
        node.creation = creation;
        node.reg = Some(Registry::new(
            node.name.clone(),
            creation,
            RegistryConfig::default(),
        ));
        node.held.clear();
        node.procs.clear();
        node.last_stamp = 0;
        let procs = self.rng.random_range(2..=6);
        for _ in 0..procs {
            self.spawn(i);
        }
    }

    fn spawn(&mut self, i: usize) {
        let pid = self.next_pid;
        self.next_pid += 1;
        self.nodes[i].procs.insert(pid);
    }

    fn send(&mut self, from: usize, to: usize, update: Update) {
        let link = self.link(from, to);
        assert!(
            link.up,
            "seed {}: n{from} sent {update:?} to n{to}, which is not linked to it",
            self.seed
        );
        self.stats.sent += 1;
        let copies = if self.rng.random_bool(self.p.dup) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let latency = self.rng.random_range(LATENCY_MICROS.0..=LATENCY_MICROS.1);
            let at = self.now + Duration::from_micros(latency);
            self.queue.insert(
                (at, self.next_order),
                Frame {
                    from,
                    to,
                    session: link.session,
                    update: update.clone(),
                },
            );
            self.next_order += 1;
        }
    }

    /// Acts on what node `i`'s machine output.
    fn handle(&mut self, i: usize, out: Vec<Output>) {
        let seed = self.seed;
        for o in out {
            match o {
                Output::Send { peer, update } => {
                    let to = node_index(&peer);
                    self.send(i, to, update);
                }
                Output::Conflict { name, pid, winner } => {
                    self.stats.conflicts += 1;
                    assert!(
                        self.was_made(&name, &winner),
                        "seed {seed}: n{i} lost {name:?} to {winner:?}, a claim never made"
                    );
                    let node = &mut self.nodes[i];
                    let mine = node.held.remove(&name).unwrap_or_else(|| {
                        panic!("seed {seed}: n{i} reported losing {name:?} (pid {pid}), which it does not hold")
                    });
                    assert_eq!(
                        mine.pid, pid,
                        "seed {seed}: n{i} reported the wrong process losing {name:?}"
                    );
                    assert!(
                        winner < mine,
                        "seed {seed}: n{i} gave up {name:?} {mine:?} to a greater claim {winner:?}"
                    );
                    assert_ne!(
                        winner.node, node.name,
                        "seed {seed}: n{i} lost {name:?} to itself"
                    );
                    self.event += 1;
                    self.lost.push(Lost {
                        node: i,
                        creation: node.creation,
                        pid,
                        name,
                        winner,
                        event: self.event,
                    });
                }
                Output::Close { peer, why } => {
                    panic!(
                        "seed {seed}: n{i} closed its link to {peer} ({why}) on an honest network"
                    )
                }
            }
        }
    }

    /// Delivers one frame that fell due at `at`.
    fn deliver(&mut self, at: Duration, frame: Frame) {
        self.now = at;
        let link = self.link(frame.from, frame.to);
        if !link.up || link.session != frame.session {
            self.stats.stale += 1;
            return;
        }
        let from = self.nodes[frame.from].name.clone();
        let when = self.base + at;
        let mut out = Vec::new();
        let reg = self.reg(frame.to);
        reg.on_update(&from, frame.update, when, &mut out);
        self.stats.delivered += 1;
        self.last_applied = at;
        self.handle(frame.to, out);
        if let Some(watch) = &mut self.watch {
            let view = self.nodes[frame.to]
                .reg
                .as_ref()
                .expect("just delivered to")
                .names();
            if view != watch[frame.to].0 {
                watch[frame.to] = (view, at);
            }
        }
    }

    /// Lets `by` pass: delivers the frames that fall due, then (after a long pause, and every
    /// tenth step: ticks cost a walk of all links) every machine ticks.
    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > until {
                break;
            }
            let ((at, _), frame) = entry.remove_entry();
            self.deliver(at, frame);
        }
        self.now = until;
        if by < Duration::from_millis(100) && !self.stats.steps.is_multiple_of(10) {
            return;
        }
        let when = self.base + until;
        for i in self.live() {
            // A tick changes nothing but a link it closes (which fails the run): no check.
            let mut out = Vec::new();
            let reg = self.nodes[i].reg.as_mut().expect("live");
            reg.tick(when, &mut out);
            self.handle(i, out);
        }
    }

    /// Delivers every frame in flight, and those they cause, until none is left.
    fn drain(&mut self) {
        while let Some(((at, _), frame)) = self.queue.pop_first() {
            self.deliver(at, frame);
        }
    }

    // ----- actions -----

    /// A random live process of a random live node.
    fn pick_process(&mut self) -> Option<(usize, u64)> {
        let live: Vec<usize> = self
            .live()
            .into_iter()
            .filter(|&i| !self.nodes[i].procs.is_empty())
            .collect();
        let i = self.pick(&live)?;
        let procs: Vec<u64> = self.nodes[i].procs.iter().copied().collect();
        Some((i, self.pick(&procs).expect("not empty")))
    }

    fn pick_name(&mut self) -> String {
        self.pool[self.rng.random_range(0..self.pool.len())].clone()
    }

    fn register(&mut self) {
        if let Some((i, pid)) = self.pick_process() {
            let name = self.pick_name();
            self.register_as(i, pid, name);
        }
    }

    /// A name no live node holds (if any) registered by processes of several nodes at the
    /// same instant, before any of them can hear of the others.
    fn race(&mut self) {
        let free: Vec<usize> = (0..self.pool.len())
            .filter(|&k| {
                !self
                    .nodes
                    .iter()
                    .any(|n| n.held.contains_key(&self.pool[k]))
            })
            .collect();
        let name = match self.pick(&free) {
            Some(k) => self.pool[k].clone(),
            None => self.pick_name(),
        };
        for _ in 0..self.rng.random_range(2..=4) {
            if let Some((i, pid)) = self.pick_process() {
                self.register_as(i, pid, name.clone());
            }
        }
        self.stats.races += 1;
    }

    fn register_as(&mut self, i: usize, pid: u64, name: String) {
        let seed = self.seed;
        let wall = self.wall_micros(i);
        let again = self.nodes[i].held.get(&name).is_some_and(|o| o.pid == pid);
        let mut out = Vec::new();
        let reg = self.reg(i);
        let before = reg.whereis(&name).cloned();
        let seen = reg.names().iter().map(|(_, o)| o.stamp).max().unwrap_or(0);
        match reg.register(&name, pid, wall, &mut out) {
            Ok(()) if again => {
                assert!(
                    out.is_empty(),
                    "seed {seed}: registering {name:?} again sent {out:?}"
                );
                assert_eq!(reg.whereis(&name).cloned(), before);
            }
            Ok(()) => {
                assert!(
                    before.is_none(),
                    "seed {seed}: n{i} registered {name:?} while its view had {before:?}"
                );
                let owner = reg.whereis(&name).cloned().expect("just registered");
                assert_eq!(
                    (owner.node.as_str(), owner.creation, owner.pid),
                    (self.nodes[i].name.as_str(), self.nodes[i].creation, pid),
                    "seed {seed}: n{i} registered {name:?}"
                );
                assert!(
                    owner.stamp >= wall
                        && owner.stamp > self.nodes[i].last_stamp
                        && owner.stamp > seen,
                    "seed {seed}: n{i} stamped {name:?} {} (wall {wall}, its previous {}, greatest seen {seen})",
                    owner.stamp,
                    self.nodes[i].last_stamp
                );
                self.nodes[i].last_stamp = owner.stamp;
                self.stats.registered += 1;
                self.event += 1;
                let creation = self.nodes[i].creation;
                self.registrations
                    .insert((i, creation, pid, name.clone()), self.event);
                let fresh = self
                    .made
                    .insert((owner.stamp, owner.creation), (name.clone(), owner.clone()))
                    .is_none();
                assert!(fresh, "seed {seed}: n{i} made the claim {owner:?} twice");
                self.nodes[i].held.insert(name, owner);
                self.handle(i, out);
            }
            Err(RegisterError::Taken(owner)) => {
                assert_eq!(
                    Some(&owner),
                    before.as_ref(),
                    "seed {seed}: n{i} refused {name:?} for an owner not in its view"
                );
                assert!(out.is_empty());
                self.stats.taken += 1;
            }
            Err(e) => panic!("seed {seed}: n{i} refused {name:?}: {e:?}"),
        }
    }

    fn unregister(&mut self) {
        let Some(i) = self.pick(&self.live()) else {
            return;
        };
        // Mostly a name the node holds; sometimes any name of the pool.
        let held: Vec<&String> = self.nodes[i].held.keys().collect();
        let name = if !held.is_empty() && self.rng.random_bool(0.8) {
            let k = self.rng.random_range(0..held.len());
            held[k].clone()
        } else {
            self.pool[self.rng.random_range(0..self.pool.len())].clone()
        };
        let expect = self.nodes[i].held.remove(&name).map(|o| o.pid);
        let mut out = Vec::new();
        let got = self.reg(i).unregister(&name, &mut out);
        assert_eq!(
            got, expect,
            "seed {}: n{i} unregistering {name:?}",
            self.seed
        );
        if got.is_some() {
            self.stats.unregistered += 1;
        }
        self.handle(i, out);
    }

    fn exit(&mut self) {
        let live: Vec<usize> = self
            .live()
            .into_iter()
            .filter(|&i| !self.nodes[i].procs.is_empty())
            .collect();
        let Some(i) = self.pick(&live) else { return };
        let procs: Vec<u64> = self.nodes[i].procs.iter().copied().collect();
        let pid = self.pick(&procs).expect("not empty");
        self.nodes[i].procs.remove(&pid);
        self.nodes[i].held.retain(|_, o| o.pid != pid);
        let mut out = Vec::new();
        self.reg(i).process_exited(pid, &mut out);
        self.stats.exits += 1;
        self.handle(i, out);
    }

    fn spawn_one(&mut self) {
        if let Some(i) = self.pick(&self.live()) {
            self.spawn(i);
        }
    }

    /// Takes the link between `a` and `b` down; both ends are told.
    fn cut(&mut self, a: usize, b: usize) {
        let link = self.link_mut(a, b);
        if !link.up {
            return;
        }
        link.up = false;
        let (na, nb) = (self.nodes[a].name.clone(), self.nodes[b].name.clone());
        self.reg(a).peer_down(&nb);
        self.reg(b).peer_down(&na);
    }

    fn partition(&mut self) {
        let live = self.live();
        let bias = self.rng.random_range(0.1..0.9);
        let side: Vec<bool> = (0..self.p.nodes)
            .map(|_| self.rng.random_bool(bias))
            .collect();
        for (k, &a) in live.iter().enumerate() {
            for &b in &live[k + 1..] {
                if side[a] != side[b] {
                    self.cut(a, b);
                }
            }
        }
        self.stats.partitions += 1;
    }

    /// Brings the link between `a` and `b` up in a new session (whether it was up or not):
    /// both ends are told at the same instant, and their syncs go out.
    fn join(&mut self, a: usize, b: usize) {
        let session = self.next_session;
        self.next_session += 1;
        *self.link_mut(a, b) = Link { up: true, session };
        let (na, ca) = (self.nodes[a].name.clone(), self.nodes[a].creation);
        let (nb, cb) = (self.nodes[b].name.clone(), self.nodes[b].creation);
        let mut out_a = Vec::new();
        let mut out_b = Vec::new();
        self.reg(a).peer_up(&nb, cb, &mut out_a);
        self.reg(b).peer_up(&na, ca, &mut out_b);
        self.handle(a, out_a);
        self.handle(b, out_b);
    }

    /// Every down link between live nodes comes up in a new session.
    fn heal(&mut self) {
        let live = self.live();
        for (k, &a) in live.iter().enumerate() {
            for &b in &live[k + 1..] {
                if !self.link(a, b).up {
                    self.join(a, b);
                }
            }
        }
        self.stats.heals += 1;
    }

    /// One link goes down (the mesh is then no longer a set of fully linked groups).
    fn flap(&mut self) {
        let live = self.live();
        let (Some(a), Some(b)) = (self.pick(&live), self.pick(&live)) else {
            return;
        };
        if a != b && self.link(a, b).up {
            self.cut(a, b);
            self.stats.flaps += 1;
        }
    }

    /// One down link between live nodes comes up.
    fn connect(&mut self) {
        let live = self.live();
        let (Some(a), Some(b)) = (self.pick(&live), self.pick(&live)) else {
            return;
        };
        if a != b && !self.link(a, b).up {
            self.join(a, b);
            self.stats.connects += 1;
        }
    }

    /// A node crashes and restarts so fast that its peers meet the new incarnation before they
    /// notice the old one is gone: each of its links is replaced by a new one (`peer_up` with
    /// no `peer_down` before it), and what is still in flight on the old ones is lost.
    fn reboot(&mut self) {
        let Some(i) = self.pick(&self.live()) else {
            return;
        };
        let linked: Vec<usize> = (0..self.p.nodes)
            .filter(|&j| j != i && self.link(i, j).up)
            .collect();
        self.start(i);
        for j in linked {
            self.join(i, j);
        }
        self.stats.reboots += 1;
    }

    fn crash(&mut self) {
        let live = self.live();
        if live.len() <= 2 {
            return;
        }
        let i = self.pick(&live).expect("not empty");
        for j in live {
            if j != i {
                self.cut(i, j);
            }
        }
        let node = &mut self.nodes[i];
        node.reg = None;
        node.procs.clear();
        node.held.clear();
        self.stats.crashes += 1;
    }

    fn restart(&mut self) {
        let down: Vec<usize> = (0..self.p.nodes).filter(|&i| !self.alive(i)).collect();
        if let Some(i) = self.pick(&down) {
            self.start(i);
            self.stats.restarts += 1;
        }
    }

    /// Lets every frame in flight land, then checks every view against the claims held.
    fn pause(&mut self) {
        self.drain();
        self.advance(Duration::from_millis(1));
        self.stats.pauses += 1;
        self.check_quiet();
    }

    fn step(&mut self) {
        match self.rng.random_range(0..1000) {
            0..330 => self.register(),
            330..430 => self.unregister(),
            430..510 => self.exit(),
            510..600 => self.spawn_one(),
            600..620 => self.partition(),
            620..650 => self.heal(),
            650..660 => self.crash(),
            660..672 => self.restart(),
            672..680 => self.pause(),
            680..720 => self.race(),
            720..735 => self.flap(),
            735..745 => self.connect(),
            745..752 => self.reboot(),
            _ => {}
        }
        self.stats.steps += 1;
        let by = if self.rng.random_bool(0.01) {
            // Long enough that any gap left open would time out.
            Duration::from_secs(self.rng.random_range(1..=20))
        } else {
            Duration::from_micros(self.rng.random_range(0..=1_500))
        };
        self.advance(by);
        self.check_step();
    }

    // ----- checks -----

    /// What must hold after every step, frames in flight or not, on every node that took an
    /// input in the step (the others are as they were when last checked).
    fn check_step(&mut self) {
        let seed = self.seed;
        for i in self.live() {
            if !std::mem::take(&mut self.dirty[i]) {
                continue;
            }
            let node = &self.nodes[i];
            let reg = node.reg.as_ref().expect("live");
            let own: BTreeMap<&str, u64> = reg.own_names().collect();
            let expect: BTreeMap<&str, u64> =
                node.held.iter().map(|(n, o)| (n.as_str(), o.pid)).collect();
            assert_eq!(own, expect, "seed {seed}: n{i}'s own names");
            for (name, owner) in &node.held {
                assert_eq!(
                    reg.whereis(name),
                    Some(owner),
                    "seed {seed}: n{i} holds {name:?} but its view routes elsewhere"
                );
                assert_eq!(reg.owns(name), Some(owner.pid));
            }
            let linked = (0..self.p.nodes)
                .filter(|&j| j != i && self.link(i, j).up)
                .count();
            assert_eq!(
                reg.peers().count(),
                linked,
                "seed {seed}: n{i}'s registry peers"
            );
            for peer in reg.peers() {
                assert!(
                    self.link(i, node_index(peer)).up,
                    "seed {seed}: n{i}'s registry exchanges with {peer}, not linked to it"
                );
            }
            for (name, owner) in reg.names() {
                assert!(
                    self.was_made(&name, &owner),
                    "seed {seed}: n{i} sees {name:?} at {owner:?}, a claim never made"
                );
                let j = node_index(&owner.node);
                if j == i {
                    assert!(
                        node.held.get(&name) == Some(&owner),
                        "seed {seed}: n{i} routes {name:?} to a claim of its own it gave up: {owner:?}"
                    );
                } else {
                    assert!(
                        self.link(i, j).up && self.nodes[j].creation == owner.creation,
                        "seed {seed}: n{i} sees {name:?} at {owner:?}, not a linked live incarnation"
                    );
                }
            }
        }
    }

    /// With nothing in flight, whatever the links: no two linked nodes hold the same name, and
    /// each node's view is, per name, the least claim held by it or by a node it is linked to.
    fn check_quiet(&self) {
        let seed = self.seed;
        assert!(self.queue.is_empty());
        let live = self.live();
        for &i in &live {
            let mut expect: BTreeMap<&str, &Owner> = BTreeMap::new();
            for &j in &live {
                if j != i && !self.link(i, j).up {
                    continue;
                }
                for (name, owner) in &self.nodes[j].held {
                    if j > i && self.link(i, j).up {
                        assert!(
                            !self.nodes[i].held.contains_key(name),
                            "seed {seed}: linked n{i} and n{j} both still hold {name:?} with nothing in flight"
                        );
                    }
                    let least = expect.entry(name).or_insert(owner);
                    if owner < *least {
                        *least = owner;
                    }
                }
            }
            let expect: View = expect
                .into_iter()
                .map(|(n, o)| (n.to_string(), o.clone()))
                .collect();
            let view = self.nodes[i].reg.as_ref().expect("live").names();
            assert_eq!(
                view, expect,
                "seed {seed}: n{i}'s view with nothing in flight"
            );
        }
    }

    /// Restarts every crashed node, heals everything, drains the network and checks the end
    /// state.
    fn finish(mut self) -> Outcome {
        let seed = self.seed;
        let down: Vec<usize> = (0..self.p.nodes).filter(|&i| !self.alive(i)).collect();
        for i in down {
            self.start(i);
            self.stats.restarts += 1;
        }
        let heal_at = self.now;
        self.heal();
        self.watch = Some(
            self.nodes
                .iter()
                .map(|n| (n.reg.as_ref().expect("all up").names(), heal_at))
                .collect(),
        );
        self.last_applied = heal_at;
        self.drain();
        let settled = self
            .watch
            .take()
            .expect("set above")
            .iter()
            .map(|(_, t)| *t)
            .max()
            .expect("nodes");
        let settle = settled - heal_at;
        let quiet = self.last_applied - heal_at;
        self.advance(Duration::from_millis(1));
        self.check_step();

        // (5) No view holds a name of a dead process or of a crashed incarnation.
        for (i, node) in self.nodes.iter().enumerate() {
            let reg = node.reg.as_ref().expect("all up");
            assert_eq!(reg.peers().count(), self.p.nodes - 1, "seed {seed}: n{i}");
            for (name, owner) in reg.names() {
                let j = node_index(&owner.node);
                assert!(
                    self.nodes[j].creation == owner.creation
                        && self.nodes[j].procs.contains(&owner.pid),
                    "seed {seed}: n{i} sees {name:?} at {owner:?}, which is dead"
                );
            }
        }
        // (1) Every live node has the same view.
        let view = self.nodes[0].reg.as_ref().expect("up").names();
        for (i, node) in self.nodes.iter().enumerate() {
            assert_eq!(
                node.reg.as_ref().expect("up").names(),
                view,
                "seed {seed}: n{i}'s view differs from n0's after the final heal"
            );
        }
        // (2) Every name belongs to a live process of a live incarnation that owns it.
        for (name, owner) in &view {
            let j = node_index(&owner.node);
            let node = &self.nodes[j];
            assert_eq!(node.creation, owner.creation, "seed {seed}: {name:?}");
            assert!(
                node.procs.contains(&owner.pid),
                "seed {seed}: {name:?} at dead {owner:?}"
            );
            let reg = node.reg.as_ref().expect("up");
            assert_eq!(
                reg.owns(name),
                Some(owner.pid),
                "seed {seed}: {name:?}'s owner n{j} does not own it"
            );
            assert!(
                reg.own_names()
                    .any(|(n, pid)| n == name && pid == owner.pid),
                "seed {seed}: {name:?}'s owner n{j} does not hold it"
            );
        }
        // (3) Exactly one claim is held per name, and it is the owner everywhere.
        let mut held: BTreeMap<&str, Vec<&Owner>> = BTreeMap::new();
        for node in &self.nodes {
            let reg = node.reg.as_ref().expect("up");
            for (name, pid) in reg.own_names() {
                let owner = &node.held[name];
                assert_eq!(owner.pid, pid);
                held.entry(name).or_default().push(owner);
            }
        }
        let least: View = held
            .iter()
            .map(|(n, claims)| {
                let min = (*claims.iter().min().expect("at least one")).clone();
                (n.to_string(), min)
            })
            .collect();
        assert_eq!(
            view, least,
            "seed {seed}: the view is not the least claim held per name"
        );
        for (name, claims) in &held {
            assert_eq!(
                claims.len(),
                1,
                "seed {seed}: {name:?} is still held more than once after the final heal: {claims:?}"
            );
        }
        // (4) A process told of a conflict no longer holds the name, unless it registered it
        // again after.
        for lost in &self.lost {
            let node = &self.nodes[lost.node];
            if node.creation != lost.creation {
                continue;
            }
            let holds = node
                .reg
                .as_ref()
                .expect("up")
                .own_names()
                .any(|(n, pid)| n == lost.name && pid == lost.pid);
            if holds {
                let again = self
                    .registrations
                    .get(&(lost.node, lost.creation, lost.pid, lost.name.clone()))
                    .copied()
                    .unwrap_or(0);
                assert!(
                    again > lost.event,
                    "seed {seed}: pid {} on n{} still holds {:?}, lost to {:?}",
                    lost.pid,
                    lost.node,
                    lost.name,
                    lost.winner
                );
            }
        }
        Outcome {
            view,
            stats: self.stats,
            lost: self.lost,
            settle,
            quiet,
        }
    }
}

/// Runs seed `seed`: the random steps, then the final heal and its checks.
fn run(seed: u64, p: Params) -> Outcome {
    let mut sim = Sim::new(seed, p);
    sim.drain();
    for _ in 0..p.steps {
        sim.step();
    }
    sim.finish()
}

/// Runs `seeds` and prints what they did.
fn run_seeds(seeds: std::ops::Range<u64>, p: Params) {
    let started = Instant::now();
    let mut total = Stats::default();
    let mut settle = Vec::new();
    let mut quiet = Vec::new();
    let mut names = 0;
    for seed in seeds.clone() {
        let o = run(seed, p);
        let s = &o.stats;
        for (t, x) in [
            (&mut total.registered, s.registered),
            (&mut total.taken, s.taken),
            (&mut total.conflicts, s.conflicts),
            (&mut total.partitions, s.partitions),
            (&mut total.heals, s.heals),
            (&mut total.crashes, s.crashes),
            (&mut total.pauses, s.pauses),
            (&mut total.races, s.races),
            (&mut total.flaps, s.flaps),
            (&mut total.connects, s.connects),
            (&mut total.reboots, s.reboots),
            (&mut total.sent, s.sent),
            (&mut total.duplicated, s.duplicated),
            (&mut total.delivered, s.delivered),
            (&mut total.stale, s.stale),
        ] {
            *t += x;
        }
        names += o.view.len();
        settle.push(o.settle);
        quiet.push(o.quiet);
    }
    let n = seeds.end - seeds.start;
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len() as u32;
    let max = |v: &[Duration]| *v.iter().max().expect("seeds");
    println!(
        "registry sim: seeds {seeds:?} x {} steps on {} nodes in {:.2?}",
        p.steps,
        p.nodes,
        started.elapsed()
    );
    println!(
        "  {} registrations ({} refused as taken, {} races), {} conflicts; {} partitions, {} heals, {} links cut, {} links joined, {} crashes, {} fast restarts, {} pauses",
        total.registered,
        total.taken,
        total.races,
        total.conflicts,
        total.partitions,
        total.heals,
        total.flaps,
        total.connects,
        total.crashes,
        total.reboots,
        total.pauses
    );
    println!(
        "  frames: {} sent, {} duplicated, {} delivered, {} dropped with their link; {:.1} names at the end per seed",
        total.sent,
        total.duplicated,
        total.delivered,
        total.stale,
        names as f64 / n as f64
    );
    println!(
        "  after the final heal (virtual time): views settle in {:.2?} mean, {:.2?} max; the last frame lands at {:.2?} mean, {:.2?} max",
        mean(&settle),
        max(&settle),
        mean(&quiet),
        max(&quiet)
    );
    assert!(
        total.conflicts > 0,
        "the seeds raised no conflict: the simulation tests little"
    );
    assert!(total.stale > 0 && total.duplicated > 0);
}

#[test]
fn fifty_nodes_converge_under_partitions_crashes_reordering_and_repeats() {
    run_seeds(0..40, QUICK);
}

#[test]
#[ignore = "long: run with --ignored (best with --release)"]
fn fifty_nodes_converge_over_a_thousand_seeds() {
    run_seeds(0..1000, LONG);
}

#[test]
fn a_seed_runs_the_same_twice() {
    let a = run(7, QUICK);
    let b = run(7, QUICK);
    assert!(!a.view.is_empty());
    assert_eq!(a, b, "seed 7 ran differently the second time");
}

/// A Claim or Release update, as `rmp_serde::to_vec` encodes it (as `encode_update` puts it on
/// the wire), takes at most this many bytes besides its name's, for any name of up to 255 bytes
/// and any numbers: array(2) 1 + seq 9 + map(1) 1 + "Claim" 6 + array(3) 1 + str8 header 2 +
/// pid 9 + stamp 9 (a Release: "Release" 8 + array(2) 1 + str8 header 2 + pid 9, so 31).
const FRAME_OVERHEAD: usize = 38;
/// The same with field names (`to_vec_named`): "seq" 4, "op" 3, "name" 5, "pid" 4 and
/// "stamp" 6 more.
const FRAME_OVERHEAD_NAMED: usize = FRAME_OVERHEAD + 22;

#[test]
fn the_frame_bound_is_the_worst_case() {
    let worst = Update {
        seq: u64::MAX,
        op: Op::Claim(Claim {
            name: "x".repeat(255),
            pid: u64::MAX,
            stamp: u64::MAX,
        }),
    };
    let len = |named| {
        if named {
            rmp_serde::to_vec_named(&worst).expect("encodes").len()
        } else {
            rmp_serde::to_vec(&worst).expect("encodes").len()
        }
    };
    assert_eq!(len(false), FRAME_OVERHEAD + 255);
    assert_eq!(len(true), FRAME_OVERHEAD_NAMED + 255);
}

/// `n` machines, fully linked with their syncs delivered.
fn mesh(n: usize) -> Vec<Registry> {
    let names: Vec<NodeName> = (0..n)
        .map(|i| NodeName::new(format!("n{i}")).expect("valid"))
        .collect();
    let mut regs: Vec<Registry> = names
        .iter()
        .enumerate()
        .map(|(i, name)| Registry::new(name.clone(), i as u64 + 1, RegistryConfig::default()))
        .collect();
    let mut out = Vec::new();
    for (a, reg) in regs.iter_mut().enumerate() {
        for (b, peer) in names.iter().enumerate() {
            if a != b {
                let mut o = Vec::new();
                reg.peer_up(peer, b as u64 + 1, &mut o);
                out.extend(o.into_iter().map(|o| (a, o)));
            }
        }
    }
    let frames = deliver_all(&mut regs, &names, out);
    assert_eq!(frames, n * (n - 1), "one sync per direction");
    regs
}

/// Hands every `Send` to its peer (in order) until quiet; the frames delivered.
fn deliver_all(regs: &mut [Registry], names: &[NodeName], mut out: Vec<(usize, Output)>) -> usize {
    let now = Instant::now();
    let mut frames = 0;
    while !out.is_empty() {
        let mut next = Vec::new();
        for (from, o) in out {
            let Output::Send { peer, update } = o else {
                panic!("{o:?}")
            };
            let to = names.iter().position(|n| *n == peer).expect("a node");
            let mut o = Vec::new();
            regs[to].on_update(&names[from], update, now, &mut o);
            next.extend(o.into_iter().map(|o| (to, o)));
            frames += 1;
        }
        out = next;
    }
    frames
}

/// (frames, bytes, bytes with field names) of `out`, which must be one update to each other
/// node of an `n`-node mesh, of the kind `kind`.
fn cost(n: usize, out: &[Output], kind: fn(&Op) -> bool) -> (usize, usize, usize) {
    let mut peers = BTreeSet::new();
    let (mut bytes, mut named) = (0, 0);
    for o in out {
        let Output::Send { peer, update } = o else {
            panic!("{o:?}")
        };
        assert!(kind(&update.op), "{update:?}");
        assert!(peers.insert(peer.clone()), "{peer} sent twice");
        let b = rmp_serde::to_vec(update).expect("encodes").len();
        let bn = rmp_serde::to_vec_named(update).expect("encodes").len();
        let name_len = match &update.op {
            Op::Claim(c) => c.name.len(),
            Op::Release { name, .. } => name.len(),
            Op::Sync(_) => unreachable!(),
        };
        assert!(
            b <= FRAME_OVERHEAD + name_len,
            "{b} bytes for {update:?} (name {name_len} bytes)"
        );
        assert!(
            bn <= FRAME_OVERHEAD_NAMED + name_len,
            "{bn} bytes named for {update:?} (name {name_len} bytes)"
        );
        bytes += b;
        named += bn;
    }
    assert_eq!(out.len(), n - 1, "one frame per peer");
    assert_eq!(peers.len(), n - 1);
    (out.len(), bytes, named)
}

#[test]
fn one_registration_costs_one_frame_per_peer() {
    let wall = WALL_EPOCH_MICROS + 3_600_000_000;
    for n in [5, 50] {
        let names: Vec<NodeName> = (0..n)
            .map(|i| NodeName::new(format!("n{i}")).expect("valid"))
            .collect();
        let mut regs = mesh(n);
        for (name, pid) in [("orders.primary", 42_u64), (&*"x".repeat(255), 1 << 40)] {
            let mut out = Vec::new();
            regs[0].register(name, pid, wall, &mut out).expect("free");
            let (frames, bytes, named) = cost(n, &out, |op| matches!(op, Op::Claim(_)));
            println!(
                "N={n}: registering a {}-byte name costs {frames} frames, {bytes} bytes ({} per frame; {named} bytes, {} per frame, with field names)",
                name.len(),
                bytes / frames,
                named / frames
            );
            let out = out.into_iter().map(|o| (0, o)).collect();
            assert_eq!(deliver_all(&mut regs, &names, out), n - 1);
            for r in &regs {
                let owner = r.whereis(name).expect("known everywhere");
                assert_eq!((owner.node.as_str(), owner.pid), ("n0", pid));
            }
            let mut out = Vec::new();
            assert_eq!(regs[0].unregister(name, &mut out), Some(pid));
            let (frames, bytes, _) = cost(n, &out, |op| matches!(op, Op::Release { .. }));
            println!(
                "N={n}: unregistering it costs {frames} frames, {bytes} bytes ({} per frame)",
                bytes / frames
            );
            let out = out.into_iter().map(|o| (0, o)).collect();
            assert_eq!(deliver_all(&mut regs, &names, out), n - 1);
            assert!(regs.iter().all(|r| r.whereis(name).is_none()));
        }
    }
}
