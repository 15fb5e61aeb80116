//! The protocol core of RUSM cluster, with no QUIC stack and no tasks of its own.
//!
//! - [`transport`]: the [`Transport`](transport::Transport) / [`Connection`](transport::Connection)
//!   traits a QUIC backend implements, and the typed [`TransportError`](transport::TransportError).
//! - [`wire`]: control frames, the message envelope, the length-prefixed codec and its limits.
//! - [`identity`]: node names, identities, the cluster CA, trust anchors, peer identities.
//! - [`tls`]: the one rustls policy (TLS 1.3, ALPN, mutual authentication, CRLs).
//! - [`link`]: the handshake checks and the duplicate-link tie-break (sans-IO).
//! - [`inbound`]: the receiving half of a link — order, losses, goodbye drain, memory bounds
//!   and the typed reasons to close (sans-IO).
//! - [`router`]: capabilities negotiated per link and the one router of their control frames
//!   (sans-IO).
//! - [`outbound`]: per-pair numbering of the messages a link sends (sans-IO).
//! - [`registry`]: the global registry: claims, conflicts and their gossip (sans-IO).
//! - [`rpc`]: request/reply frames (calls, remote spawn, monitors, attach) and the pending
//!   request table with deadlines (sans-IO).
//! - [`report`]: a node's live report, as live attach fetches it.
//! - [`order`]: per-pair message ordering over independent streams (sans-IO).

pub mod identity;
pub mod inbound;
pub mod link;
pub mod order;
pub mod outbound;
pub mod registry;
pub mod report;
pub mod router;
pub mod rpc;
pub mod tls;
pub mod transport;
pub mod wire;

pub use rustls;
