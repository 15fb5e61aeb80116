//! The cluster's errors: one enum for every fallible call, and [`SendError`], which hands the
//! unsent payload back.

use bytes::Bytes;
use rusm_cluster_core::identity::{IdentityError, NodeName};
use rusm_cluster_core::tls::TlsError;
use rusm_cluster_core::transport::TransportError;
use rusm_cluster_core::wire::RejectReason;

use crate::pid::Pid;

/// What went wrong in a cluster call.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No link to that node is up. Call [`Node::connect`](crate::Node::connect) first; the node
    /// may also have gone down (watch [`NodeEvent::NodeDown`](crate::NodeEvent::NodeDown)).
    #[error("not connected to node {node}")]
    NotConnected {
        /// The node asked for.
        node: NodeName,
    },
    /// No process is registered under that name on this node.
    #[error("no process is registered as {name:?}")]
    NameNotRegistered {
        /// The name asked for.
        name: String,
    },
    /// The name is already registered (to another live process).
    #[error("name {name:?} is already registered to {pid}")]
    NameTaken {
        /// The name.
        name: String,
        /// Its current owner.
        pid: Pid,
    },
    /// The pid belongs to an earlier incarnation of its node (the node restarted since): the
    /// process is gone.
    #[error("{pid} is from an earlier incarnation of its node (now {current})")]
    StalePid {
        /// The pid asked for.
        pid: Pid,
        /// The node's current incarnation.
        current: u64,
    },
    /// The global name is held by a process on another node (only its owner's node may
    /// unregister it).
    #[error("global name {name:?} belongs to {owner}, on another node")]
    NotOwner {
        /// The name.
        name: String,
        /// Its owner.
        owner: Pid,
    },
    /// A global name that is empty or over the registry's length limit.
    #[error("global name of {len} bytes refused (1 to {max} bytes)")]
    BadName {
        /// The name's length.
        len: usize,
        /// The longest name allowed.
        max: usize,
    },
    /// The process does not exist (it exited, or the pid is from an earlier incarnation of its
    /// node).
    #[error("no such process {pid}")]
    NoProcess {
        /// The pid asked for.
        pid: Pid,
    },
    /// The payload is over the receiving node's `max_message_size`.
    #[error("message of {size} bytes is over the limit of {max} bytes")]
    MessageTooLarge {
        /// The payload's size.
        size: usize,
        /// The limit the receiver announced.
        max: usize,
    },
    /// The peer refused us, or we refused it: untrusted or revoked certificate, name not bound
    /// to the certificate, wrong protocol version, wrong node at that address.
    #[error("link to {node} rejected: {reason}")]
    Rejected {
        /// The node dialled.
        node: NodeName,
        /// Why: the refusing side's reject frame, or the TLS alert
        /// ([`RejectReason::Tls`](crate::core::wire::RejectReason::Tls)).
        reason: RejectReason,
    },
    /// A capability frame for a peer whose link does not use that capability (the peer, or
    /// this node, did not announce it).
    #[error("the link to {node} does not use capability {capability:?}")]
    CapabilityNotNegotiated {
        /// The peer.
        node: NodeName,
        /// The capability.
        capability: String,
    },
    /// The link to `node` went down while a request to it was pending (a call, a remote spawn,
    /// a report): it may or may not have been carried out.
    #[error("the link to {node} went down before it answered")]
    LinkLost {
        /// The peer asked.
        node: NodeName,
    },
    /// The called process dropped the call without replying (or exited first).
    #[error("the called process on {node} did not reply")]
    NoReply {
        /// The node the process lives on.
        node: NodeName,
    },
    /// No factory of that name is registered on the node (only registered factories can be
    /// spawned remotely).
    #[error("node {node} has no factory {factory:?}")]
    UnknownFactory {
        /// The node asked.
        node: NodeName,
        /// The factory asked for.
        factory: String,
    },
    /// The factory refused the arguments.
    #[error("the factory on {node} refused: {reason}")]
    SpawnRefused {
        /// The node asked.
        node: NodeName,
        /// The factory's reason.
        reason: String,
    },
    /// The node does not serve that request.
    #[error("node {node} did not serve the request: {why}")]
    NotServed {
        /// The node asked.
        node: NodeName,
        /// Why.
        why: String,
    },
    /// [`Message::reply`](crate::Message::reply) on a message that is not a call, or was
    /// answered already.
    #[error("the message is not a call waiting for a reply")]
    NotACall,
    /// The caller stopped waiting for the reply (it timed out, or it or its link went down).
    #[error("the caller is no longer waiting for the reply")]
    CallerGone,
    /// The transport failed (connection lost, endpoint could not bind, ...).
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// Something took longer than its configured timeout.
    #[error("timed out: {what}")]
    Timeout {
        /// What did not finish.
        what: String,
    },
    /// A name, certificate or key is invalid.
    #[error("identity: {0}")]
    Identity(#[from] std::sync::Arc<IdentityError>),
    /// The TLS configuration could not be built from the identity and trust given.
    #[error("TLS: {0}")]
    Tls(std::sync::Arc<TlsError>),
    /// The node's configuration is inconsistent (for example an identity issued for another
    /// node name, or no trust anchor).
    #[error("configuration: {0}")]
    Config(String),
    /// The node is shutting down.
    #[error("node is shut down")]
    Shutdown,
}

impl From<IdentityError> for Error {
    fn from(e: IdentityError) -> Self {
        Error::Identity(std::sync::Arc::new(e))
    }
}

/// A send that failed, with the payload handed back so nothing is lost silently. It displays
/// as its [`error`](Self::error) and has that error's source, so an error report does not say
/// the same thing twice.
#[derive(Debug, Clone)]
pub struct SendError {
    /// Why the message was not sent.
    pub error: Error,
    /// The message that was not sent.
    pub payload: Bytes,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl SendError {
    pub(crate) fn new(error: Error, payload: Bytes) -> Self {
        SendError { error, payload }
    }

    /// The payload that was not sent.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }
}

impl From<SendError> for Error {
    fn from(e: SendError) -> Self {
        e.error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn a_send_error_says_why_once() {
        let node = NodeName::new("london").unwrap();
        let e = SendError::new(
            Error::Transport(TransportError::TimedOut),
            Bytes::from_static(b"hi"),
        );
        assert_eq!(e.to_string(), "transport: peer timed out");
        // The chain goes on below the error, not back to it.
        let source = e.source().expect("the transport error").to_string();
        assert_eq!(source, "peer timed out");
        let e = SendError::new(Error::NotConnected { node }, Bytes::new());
        assert!(e.source().is_none());
        assert_eq!(e.to_string(), "not connected to node london");
    }
}
