//! # RUSM cluster: distributed Erlang for Rust, over QUIC, secure by default
//!
//! A [`Node`] runs many lightweight processes (tokio tasks with a mailbox, named by a [`Pid`]).
//! Nodes connect over QUIC with mutually authenticated TLS 1.3: both ends present a certificate
//! and verify the other's against the cluster's trust anchor, and a node's name is bound to its
//! certificate, so no node can claim another's. Processes then message each other across nodes
//! as if they were local.
//!
//! ## A first node
//! ```
//! use bytes::Bytes;
//! use rusm_cluster::{Identity, Node};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // One shared identity: fine for a small, fully trusted cluster (see "Security").
//! let node = Node::builder("solo").identity(Identity::generate()?).start().await?;
//! let (tx, rx) = tokio::sync::oneshot::channel();
//! let pid = node.spawn(|mut ctx| async move {
//!     let msg = ctx.recv().await.unwrap();
//!     tx.send(msg.into_payload()).unwrap();
//! });
//! node.register("inbox", &pid)?;
//! node.send("solo", "inbox", Bytes::from_static(b"hello")).await?;
//! assert_eq!(rx.await?, "hello");
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! ## A cluster
//! See [`Node`] for two nodes with CA-issued certificates exchanging a message by name.
//! [`Node::connect`] dials a peer; [`Node::send`] reaches a registered name on any connected
//! node; [`Node::send_to`] reaches a pid; [`Node::peers`] lists links; [`Node::subscribe`] reports
//! nodes going up and down.
//!
//! Connecting to one member of a cluster joins them all (the full mesh).
//! [`Node::register_global`] makes a name every node resolves ([`Node::whereis_global`]) and
//! routes to ([`Node::send_global`]); a name taken on both sides of a partition settles on one
//! owner when it heals, and the loser is told ([`Notice::NameConflict`]).
//!
//! ## Guarantees
//! - **Per-pair order**: messages from one sender to one destination arrive in the order sent,
//!   although each travels on its own QUIC stream while the link is idle (so unrelated messages
//!   never wait on each other), and messages that queue up behind a busy link share streams
//!   ([`Coalescing`], on by default).
//! - **No silent loss**: a failed send returns the payload ([`SendError`]); every refusal, dead
//!   letter and loss in transit is counted in [`Node::stats`].
//! - **Bounded memory**: mailboxes and links have budgets; a fast sender is slowed down, not
//!   buffered without bound.
//!
//! ## Security
//! - [`ClusterCa`] issues each node its own certificate (name in the DNS SAN, unique serial); a
//!   node presenting a certificate not valid for the name it claims is refused; revoked serials
//!   ([`ClusterCa::revoke`], distributed with [`ClusterCa::trust`]) fail the handshake.
//! - [`Identity::generate`] makes one identity shared by all nodes: simpler, but **any holder of
//!   it can claim any node name**, and there is no per-node revocation.

mod capability;
mod error;
mod link;
mod mesh;
mod node;
mod pid;
mod process;
mod registry;
mod rpc;
mod stats;

pub use capability::Capability;
pub use error::{Error, SendError};
#[cfg(any(feature = "quinn", feature = "s2n"))]
pub use node::DefaultTransport;
pub use node::{
    Coalescing, DownReason, Node, NodeBuilder, NodeConfig, NodeEvent, PeerInfo, Reconnect,
};
pub use pid::Pid;
pub use process::{Message, MonitorRef, Notice, Process};
pub use rusm_cluster_core::identity::{
    ClusterCa, Identity, IdentityKind, NodeName, Serial, TrustAnchor,
};
pub use rusm_cluster_core::inbound::{InboundClose, InboundConfig};
pub use rusm_cluster_core::report::Report;
pub use rusm_cluster_core::rpc::ExitReason;
pub use rusm_cluster_core::transport::{Transport, TransportError, TransportTuning};
pub use rusm_cluster_core::wire::Limits;
pub use stats::NodeStats;

/// The protocol core (transport traits, wire format, TLS policy), for backends and tools.
pub use rusm_cluster_core as core;
/// The quinn backend (feature `quinn`, on by default).
#[cfg(feature = "quinn")]
pub use rusm_transport_quinn as quinn_transport;
/// The s2n-quic backend (feature `s2n`).
#[cfg(feature = "s2n")]
pub use rusm_transport_s2n as s2n_transport;
