//! A node's live report, as live attach fetches it (the `rpc` capability's
//! [`Request::Report`](crate::rpc::Request::Report)), and as `rusm attach` prints it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a node reports of itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The node's name.
    pub node: String,
    /// Its incarnation.
    pub creation: u64,
    /// Milliseconds since it started.
    pub uptime_ms: u64,
    /// Where it accepts links.
    pub listen: String,
    /// Its live processes, by id.
    pub processes: Vec<ProcessReport>,
    /// Its local names and the process id each names.
    pub local_names: BTreeMap<String, u64>,
    /// The global names it knows, and the pid (`<node.id.creation>`) each names.
    pub global_names: BTreeMap<String, String>,
    /// Its peers (hidden ones, such as attach clients, left out).
    pub peers: Vec<PeerReport>,
    /// How many hidden nodes (attach clients) are linked to it.
    pub attached: usize,
    /// Its counters ([`NodeStats`](../../rusm_cluster/struct.NodeStats.html)), by name.
    pub counters: BTreeMap<String, u64>,
    /// Refused handshakes and hellos, by reason.
    pub refusals: BTreeMap<String, u64>,
}

/// One process in a [`Report`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessReport {
    /// Its id on the node.
    pub id: u64,
    /// Its local and global names.
    pub names: Vec<String>,
    /// Messages waiting in its mailbox.
    pub mailbox: usize,
    /// Messages it received.
    pub messages_in: u64,
    /// Messages it sent.
    pub messages_out: u64,
}

/// One peer in a [`Report`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    /// Its name.
    pub name: String,
    /// Its address.
    pub addr: String,
    /// Its incarnation.
    pub creation: u64,
    /// The current round-trip estimate, in microseconds.
    pub rtt_us: Option<u64>,
    /// Messages sent to it.
    pub messages_sent: u64,
    /// Messages received from it.
    pub messages_received: u64,
    /// Message streams opened to it.
    pub streams_sent: u64,
}

impl Report {
    /// MessagePack, as it travels.
    pub fn encode(&self) -> bytes::Bytes {
        bytes::Bytes::from(rmp_serde::to_vec(self).expect("a report always encodes"))
    }

    /// Decodes a report. Never panics on any input.
    pub fn decode(body: &[u8]) -> Result<Report, String> {
        crate::wire::decode_msgpack(body).map_err(|e| format!("malformed report: {e}"))
    }
}
