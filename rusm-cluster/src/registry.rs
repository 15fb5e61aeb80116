//! The global registry on a node: the core's [`Registry`] machine behind the `registry`
//! capability of every (non-hidden) link. See [`rusm_cluster_core::registry`] for the model and
//! the conflict rule, and [`Node::register_global`] for the API.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusm_cluster_core::identity::NodeName;
use rusm_cluster_core::registry::{
    decode_update, encode_update, Output, Owner, Registry, RegistryConfig, Update, CAPABILITY,
};
use tracing::warn;

use crate::capability::Capability;
use crate::node::{lock, read, DownReason, Node};
use crate::pid::Pid;
use crate::process::{Mail, Message, Notice};

/// The node's registry: the machine, under one lock. Its outputs are carried out under that
/// lock too, so each link's updates enter its control queue in the order they were numbered.
pub(crate) struct GlobalRegistry {
    machine: Mutex<Registry>,
}

/// Microseconds since the Unix epoch (the registry's stamps start from them).
fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl GlobalRegistry {
    pub(crate) fn new(me: NodeName, creation: u64) -> Self {
        GlobalRegistry {
            machine: Mutex::new(Registry::new(me, creation, RegistryConfig::default())),
        }
    }

    /// Reads the machine.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&Registry) -> R) -> R {
        f(&lock(&self.machine))
    }

    /// Runs `f` on the machine and carries out what it asks. A registry error of `current`
    /// (the peer whose frame is being handled) is returned, to close its link from its own
    /// control loop; other peers' links are closed from here.
    pub(crate) fn run<R>(
        &self,
        node: &Node,
        current: Option<&NodeName>,
        f: impl FnOnce(&mut Registry, &mut Vec<Output>) -> R,
    ) -> (R, Option<String>) {
        let mut machine = lock(&self.machine);
        let mut out = Vec::new();
        let r = f(&mut machine, &mut out);
        let mut refused = None;
        for o in out {
            match o {
                Output::Send { peer, update } => send(node, &peer, &update),
                Output::Conflict { name, pid, winner } => conflict(node, name, pid, winner),
                Output::Close { peer, why } => {
                    warn!(node = %node.name(), %peer, error = %why, "registry protocol broken; closing the link");
                    if current == Some(&peer) {
                        refused = Some(why.to_string());
                    } else if let Some(link) = lock(&node.inner.links).up.get(&peer) {
                        link.close_with(DownReason::ProtocolViolation(format!(
                            "{CAPABILITY}: {why}"
                        )));
                    }
                }
            }
        }
        (r, refused)
    }

    /// Registers `pid` as `name` (stamped now).
    pub(crate) fn register(
        &self,
        node: &Node,
        name: &str,
        pid: u64,
    ) -> Result<(), rusm_cluster_core::registry::RegisterError> {
        self.run(node, None, |m, out| {
            m.register(name, pid, wall_micros(), out)
        })
        .0
    }
}

fn send(node: &Node, peer: &NodeName, update: &Update) {
    // No link: the machine hears of its end from the teardown.
    let _ = node.send_capability(peer, CAPABILITY, encode_update(update));
}

/// Tells local process `pid` it lost `name`.
fn conflict(node: &Node, name: String, pid: u64, winner: Owner) {
    let inner = &node.inner;
    inner
        .stats
        .global_name_conflicts
        .fetch_add(1, Ordering::Relaxed);
    let winner = Pid::of_owner(&winner);
    warn!(node = %inner.name, %name, loser = pid, %winner, "global name lost to a claim made elsewhere");
    let mailbox = read(&inner.processes).get(&pid).map(|s| s.mailbox.clone());
    if let Some(mailbox) = mailbox {
        let notice = Message::notice_of(Notice::NameConflict { name, winner });
        let _ = mailbox.push(Mail::One(notice));
    }
}

impl Capability for GlobalRegistry {
    fn name(&self) -> &str {
        CAPABILITY
    }

    fn on_link_up(&self, node: &Node, peer: &NodeName) {
        let link = lock(&node.inner.links).up.get(peer).cloned();
        // Hidden peers (attach clients) get no registry traffic.
        let Some(link) = link.filter(|l| !l.hidden) else {
            return;
        };
        let creation = link.peer_creation();
        self.run(node, None, |m, out| m.peer_up(peer, creation, out));
    }

    fn on_link_down(&self, node: &Node, peer: &NodeName) {
        self.run(node, None, |m, _| m.peer_down(peer));
    }

    fn on_frame(&self, node: &Node, peer: &NodeName, body: Bytes) -> Result<(), String> {
        let update = decode_update(&body)?;
        let now = Instant::now();
        let ((), refused) = self.run(node, Some(peer), |m, out| {
            m.on_update(peer, update, now, out);
            m.tick(now, out);
        });
        match refused {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}
