//! Control-stream frames: the link handshake (`Hello`, `Welcome`, `Reject`), the link's own
//! `Lost` and `Goodbye`, and `Capability` frames, which carry the protocols built on links
//! (registry gossip, request/reply, monitors, attach) without the link knowing them: each is
//! announced in the hello, negotiated per link, and routed by name (see [`crate::router`]).
//! Frames are encoded as MessagePack maps, so a field added later (`#[serde(default)]`) is
//! ignored by an older decoder.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::identity::NodeName;

/// The newest version of the link protocol this build speaks. Nodes announce the range they
/// speak and use the newest common one; a peer with no common version is refused with
/// [`RejectReason::UnsupportedProtocol`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The oldest version of the link protocol this build still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// A known peer and where it listens (carried in hellos, so nodes can learn of each other).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddr {
    /// The peer's node name.
    pub name: NodeName,
    /// Where it accepts connections.
    pub addr: SocketAddr,
}

/// The first frame, sent by the dialler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The newest protocol version the dialler speaks ([`PROTOCOL_VERSION`]).
    pub protocol: u32,
    /// The oldest protocol version the dialler speaks; absent means `protocol` alone.
    #[serde(default)]
    pub min_protocol: Option<u32>,
    /// The capabilities the dialler offers (see [`crate::router`]).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The dialler's node name; must match its certificate (unless identities are shared).
    pub name: NodeName,
    /// The dialler's incarnation: a new value each time the node starts.
    pub creation: u64,
    /// Where the dialler accepts connections, if it does.
    pub listen_addr: Option<SocketAddr>,
    /// Peers the dialler is connected to.
    pub peers: Vec<PeerAddr>,
    /// A hidden node (an attach client) never joins the mesh.
    pub hidden: bool,
    /// The largest message payload the dialler accepts.
    pub max_message_size: u64,
    /// This link's id, chosen by the dialler (0: none). Both ends remember it when the link
    /// goes down, to settle its messages in transit on the next link (see [`PreviousLink`]).
    #[serde(default)]
    pub link: u64,
    /// What the dialler received over its previous link to the listener, if it had one.
    #[serde(default)]
    pub previous: Option<PreviousLink>,
}

/// What a node received over its previous link to a peer, told on the next link between them
/// so the peer can count what it sent over that link and never arrived (messages in transit
/// when the link failed) instead of losing them silently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousLink {
    /// The id of that link (from its hello).
    pub link: u64,
    /// Messages from the peer that reached this node over that link: delivered to a mailbox
    /// or counted as dead letters.
    pub reached: u64,
}

/// The listener's answer to an accepted [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version the link speaks: the newest both sides speak.
    pub protocol: u32,
    /// The capabilities the listener offers (see [`crate::router`]).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The listener's node name.
    pub name: NodeName,
    /// The listener's incarnation.
    pub creation: u64,
    /// Where the listener accepts connections.
    pub listen_addr: Option<SocketAddr>,
    /// Peers the listener is connected to.
    pub peers: Vec<PeerAddr>,
    /// The largest message payload the listener accepts.
    pub max_message_size: u64,
    /// What the listener received over its previous link to the dialler, if it had one.
    #[serde(default)]
    pub previous: Option<PreviousLink>,
}

/// Why a hello was refused, or a link closed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RejectReason {
    /// The peers speak no common protocol version.
    UnsupportedProtocol {
        /// The newest version the refusing side speaks.
        ours: u32,
        /// The newest version the other side announced.
        theirs: u32,
    },
    /// The name in the hello is not the one in the certificate: an impostor, or a node
    /// configured with another node's certificate.
    NameMismatch {
        /// The name claimed in the hello.
        claimed: String,
        /// The names the certificate is valid for.
        certified: Vec<String>,
    },
    /// The dialler claims the listener's own name.
    SameName,
    /// A link between these two nodes already exists (or wins a simultaneous-dial tie-break).
    DuplicateLink,
    /// One side uses a shared identity and the other a CA-issued one.
    IdentityModeMismatch,
    /// The listener is shutting down.
    ShuttingDown,
    /// The listener keeps the dialler cut off (an operator or a test blocked it, as with
    /// Erlang's `disconnect_node`).
    Blocked,
    /// The listener is linked to a later incarnation of the dialler's name: the dialler is a
    /// stale incarnation (it restarted elsewhere since).
    StaleIncarnation,
    /// The first frame was not a hello, or could not be decoded.
    BadHandshake(String),
    /// The TLS handshake was refused (untrusted, revoked or wrong-name certificate, ALPN): the
    /// TLS alert or verifier error. Never sent in a reject frame; TLS says it.
    Tls(String),
    /// Refused with a reason known only as text (the refusing side closed the connection
    /// without a reject frame this side could read).
    Other(String),
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::UnsupportedProtocol { ours, theirs } => write!(
                f,
                "unsupported protocol version {theirs} (this node speaks up to {ours})"
            ),
            RejectReason::NameMismatch { claimed, certified } => write!(
                f,
                "node name {claimed:?} does not match the certificate (valid for {certified:?})"
            ),
            RejectReason::SameName => f.write_str("peer claims this node's own name"),
            RejectReason::DuplicateLink => f.write_str("a link between these nodes already exists"),
            RejectReason::IdentityModeMismatch => {
                f.write_str("one side uses a shared identity, the other a CA-issued one")
            }
            RejectReason::ShuttingDown => f.write_str("node is shutting down"),
            RejectReason::Blocked => f.write_str("the node keeps this peer cut off"),
            RejectReason::StaleIncarnation => {
                f.write_str("a later incarnation of this node is linked already")
            }
            RejectReason::BadHandshake(why) => write!(f, "bad handshake: {why}"),
            RejectReason::Tls(why) => write!(f, "TLS handshake refused: {why}"),
            RejectReason::Other(why) => f.write_str(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_texts_map_back_to_their_reasons() {
        for r in [
            RejectReason::Blocked,
            RejectReason::ShuttingDown,
            RejectReason::DuplicateLink,
        ] {
            assert_eq!(RejectReason::from_close_text(&r.to_string()), r);
        }
        assert_eq!(
            RejectReason::from_close_text("no hello in time"),
            RejectReason::Other("no hello in time".into())
        );
    }
}

impl RejectReason {
    /// The reason a refusing side's close text names, when the reject frame itself was not read
    /// (the close overtook it): the reasons without fields are recognised by their words, so a
    /// refusal reads the same whichever arrived first; anything else is [`RejectReason::Other`].
    pub fn from_close_text(text: &str) -> RejectReason {
        [
            RejectReason::SameName,
            RejectReason::DuplicateLink,
            RejectReason::IdentityModeMismatch,
            RejectReason::ShuttingDown,
            RejectReason::Blocked,
            RejectReason::StaleIncarnation,
        ]
        .into_iter()
        .find(|r| r.to_string() == text)
        .unwrap_or_else(|| RejectReason::Other(text.to_string()))
    }
}

/// A frame on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Frame {
    /// The dialler introduces itself.
    Hello(Hello),
    /// The listener accepts.
    Welcome(Welcome),
    /// The listener refuses; the connection closes after this frame.
    Reject(RejectReason),
    /// A message the sender numbered but never finished writing (its send was cancelled or its
    /// stream failed before the header went out): the receiver stops waiting for it, so the
    /// pair's later messages are not held back for ever.
    Lost {
        /// The sending process (as in the envelope).
        from: Option<u64>,
        /// The destination (as in the envelope).
        to: crate::wire::Dest,
        /// The lost message's number.
        seq: u64,
    },
    /// Process `from` of the sender exited (process ids are never reused): its pairs end at
    /// these numbers. The receiver forgets each pair's state once it has delivered (or given
    /// up) every number up to the last, so the state of pairs does not grow with the number of
    /// processes that ever sent.
    Retire {
        /// The exited process.
        from: u64,
        /// Each destination it sent to, with the last number it sent there.
        pairs: Vec<(crate::wire::Dest, u64)>,
    },
    /// A frame of a capability built on links (registry gossip, request/reply, ...). Only sent
    /// on a link where both sides announced the capability; the body is the capability's own.
    Capability {
        /// The capability's name, as announced in the hello.
        capability: String,
        /// The capability's frame.
        body: bytes::Bytes,
    },
    /// The sender is closing the link on purpose (shutdown). The receiver reads the streams
    /// still in flight, then closes the connection.
    Goodbye {
        /// Why, in words.
        reason: String,
        /// How many message streams the sender opened on this link in all, so the receiver
        /// knows when it has read the last one.
        streams: u64,
    },
}

impl Frame {
    /// A short name of the frame kind, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Welcome(_) => "welcome",
            Frame::Reject(_) => "reject",
            Frame::Lost { .. } => "lost",
            Frame::Retire { .. } => "retire",
            Frame::Capability { .. } => "capability",
            Frame::Goodbye { .. } => "goodbye",
        }
    }
}
