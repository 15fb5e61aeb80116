//! The node's counters: every rejection, refusal and loss is counted, never silent.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        #[derive(Default, Debug)]
        pub(crate) struct Stats {
            $(pub(crate) $name: AtomicU64,)*
        }

        /// A snapshot of a node's counters, from [`Node::stats`](crate::Node::stats).
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct NodeStats {
            /// Live local processes.
            pub processes: usize,
            $($(#[$doc])* pub $name: u64,)*
        }

        impl NodeStats {
            /// Every counter by name (for reports).
            pub fn counters(&self) -> Vec<(&'static str, u64)> {
                vec![("processes", self.processes as u64), $((stringify!($name), self.$name),)*]
            }
        }

        impl Stats {
            pub(crate) fn snapshot(&self, processes: usize) -> NodeStats {
                NodeStats {
                    processes,
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Messages handed to links for remote processes.
    messages_sent,
    /// Messages received from peers and delivered to a local mailbox.
    messages_received,
    /// Messages delivered between processes of this node.
    local_messages,
    /// Messages for a name or pid that does not exist here (dropped and counted).
    dead_letters,
    /// Messages this node refused to send because they were over the size limit.
    refused_too_large,
    /// Incoming messages over this node's size limit: their streams were stopped unread.
    oversized_messages,
    /// Incoming message streams with a malformed header or a wrong length.
    malformed_messages,
    /// Incoming messages lost in transit (stream reset, link down with gaps).
    lost_messages,
    /// Messages that failed to be written to a peer, their send having returned an error (or, for
    /// a coalesced stream, its write failed while the link stayed up).
    send_failures,
    /// Control frames that could not be decoded or were over the size limit (each closed its link).
    malformed_frames,
    /// Incoming connections refused during the TLS handshake (untrusted or revoked certificate).
    rejected_handshakes,
    /// Hellos refused (name not bound to the certificate, protocol version, duplicate link, ...).
    rejected_hellos,
    /// Links that came up.
    links_up,
    /// Links that went down.
    links_down,
    /// Links closed because a peer left a gap in a pair's numbers unfilled for the gap timeout
    /// while later messages waited ([`InboundClose::GapTimeout`](crate::InboundClose)).
    gap_timeouts,
    /// Links closed because a peer kept the link budget spent on unfinished or held-back
    /// messages for the stall timeout, or flooded lost notices
    /// ([`InboundClose::Stalled`](crate::InboundClose), `TooManyLosses`).
    stalled_links,
    /// Global names a local process lost to a winning claim made elsewhere (each told with
    /// [`Notice::NameConflict`](crate::Notice::NameConflict)).
    global_name_conflicts,
    /// Dials to cluster members learned from peers (the mesh) that failed for good.
    mesh_dial_failures,
    /// Replies from peers to no pending request (late, after a timeout, or bogus); ignored.
    unexpected_replies,
    /// Messages this node sent (their send returned `Ok`) that never reached the peer, because
    /// their link failed with them in transit. Known, and counted, when the two nodes link
    /// again and compare what each sent and received over the failed link; messages in transit
    /// to a peer that restarted went with its old incarnation and are not counted here.
    lost_in_transit,
    /// Messages (and notices) still unread in a mailbox when its process ended: dropped, as in
    /// Erlang, and counted.
    unread_at_exit,
}
