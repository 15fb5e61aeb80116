//! Membership: the full mesh, as Erlang's `net_kernel` keeps it. Connecting to any one member
//! joins them all:
//! - a node reads the peers listed in the hello or welcome of each new link, and dials those it
//!   has no link to;
//! - when a link comes up, the node tells the new peer of its other members, and its other
//!   members of the new peer (`mesh` capability frames), so nodes that join through different
//!   members at the same moment still find each other;
//! - dials run in the background, a few at a time, retried with backoff while they fail for a
//!   reason that may pass (a timeout, a lost connection); a refusal (blocked, untrusted) is
//!   final until the member is announced again. Simultaneous dials between two nodes keep one
//!   link (the link table's tie-break).
//!
//! Hidden nodes (attach clients) are never announced and never dial members; a node keeps a
//! peer it [blocks](crate::Node::block) cut.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rusm_cluster_core::identity::NodeName;
use rusm_cluster_core::wire::PeerAddr;
use tokio::sync::Semaphore;
use tracing::{debug, info};

use crate::capability::Capability;
use crate::error::Error;
use crate::node::{lock, Node};

/// The capability name membership frames travel under.
pub(crate) const CAPABILITY: &str = "mesh";
/// Dials to learned members in flight at once.
const CONCURRENT_DIALS: usize = 4;
/// Tries per learned member before giving up (until it is announced again).
const ATTEMPTS: u32 = 5;
/// The first retry's delay; each next one doubles it.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Members one frame may announce.
const MAX_MEMBERS: usize = 4096;

/// The node's membership: which learned members it is dialling.
pub(crate) struct Mesh {
    dials: Arc<Semaphore>,
    pending: Mutex<HashSet<NodeName>>,
}

impl Mesh {
    pub(crate) fn new() -> Self {
        Mesh {
            dials: Arc::new(Semaphore::new(CONCURRENT_DIALS)),
            pending: Mutex::new(HashSet::new()),
        }
    }

    /// Dials, in the background, each of `members` this node has no link to.
    pub(crate) fn learn(self: &Arc<Self>, node: &Node, members: Vec<PeerAddr>) {
        if node.inner.intro.hidden {
            return;
        }
        for member in members {
            if member.name == *node.name() || !node.should_dial(&member.name) {
                continue;
            }
            if !lock(&self.pending).insert(member.name.clone()) {
                continue;
            }
            let mesh = self.clone();
            let node = node.clone();
            node.inner.runtime.clone().spawn(async move {
                mesh.dial(&node, &member.name, member.addr).await;
                lock(&mesh.pending).remove(&member.name);
            });
        }
    }

    async fn dial(&self, node: &Node, peer: &NodeName, addr: SocketAddr) {
        let Ok(_permit) = self.dials.acquire().await else {
            return;
        };
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            if !node.should_dial(peer) {
                return;
            }
            match node.connect(peer.as_str(), addr).await {
                Ok(()) => {
                    debug!(node = %node.name(), %peer, "joined a member learned from the mesh");
                    return;
                }
                Err(e @ (Error::Rejected { .. } | Error::Shutdown | Error::Config(_))) => {
                    info!(node = %node.name(), %peer, %addr, error = %e, "member refused; not retried");
                    break;
                }
                Err(e) => {
                    debug!(node = %node.name(), %peer, %addr, attempt, error = %e, "member dial failed");
                    if attempt < ATTEMPTS {
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                }
            }
        }
        node.inner
            .stats
            .mesh_dial_failures
            .fetch_add(1, Ordering::Relaxed);
    }
}

fn send(node: &Node, peer: &NodeName, members: &[PeerAddr]) {
    let Ok(body) = rmp_serde::to_vec(members) else {
        return;
    };
    let _ = node.send_capability(peer, CAPABILITY, Bytes::from(body));
}

/// The capability half of the mesh (a newtype, so the `Arc` the dial tasks need is at hand).
pub(crate) struct MeshCapability(pub(crate) Arc<Mesh>);

impl Capability for MeshCapability {
    fn name(&self) -> &str {
        CAPABILITY
    }

    fn on_link_up(&self, node: &Node, peer: &NodeName) {
        if node.inner.intro.hidden {
            return;
        }
        let others = crate::link::hello_peers(&node.inner, peer);
        let link = lock(&node.inner.links).up.get(peer).cloned();
        let Some(link) = link.filter(|l| !l.hidden) else {
            return;
        };
        // The new peer hears of our other members; they hear of it.
        send(node, peer, &others);
        let joined = [PeerAddr {
            name: peer.clone(),
            addr: link.listen_addr,
        }];
        for other in &others {
            send(node, &other.name, &joined);
        }
        // And we dial the members its hello or welcome listed.
        self.0.learn(node, link.intro_peers.clone());
    }

    fn on_frame(&self, node: &Node, _peer: &NodeName, body: Bytes) -> Result<(), String> {
        let members: Vec<PeerAddr> = rusm_cluster_core::wire::decode_msgpack(&body)
            .map_err(|e| format!("malformed member list: {e}"))?;
        if members.len() > MAX_MEMBERS {
            return Err(format!("{} members in one frame", members.len()));
        }
        self.0.learn(node, members);
        Ok(())
    }
}
