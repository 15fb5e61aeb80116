//! Behaviour cases, each written once and generic over the transport. Each reads as a user's
//! story: boot nodes on 127.0.0.1, do what a user does, check what a user would check.

#![allow(unreachable_pub)]

// Run from tests/memory_bounds.rs, alone in their process (they measure resident memory).
#[allow(dead_code)]
pub mod bounds;
mod capabilities;
mod coalescing;
mod faults;
mod hostile;
mod lifecycle;
mod messaging;
mod mixed;
mod registry;
mod rpc;
mod security;
mod soak;
mod streams;

pub use capabilities::*;
pub use coalescing::*;
pub use faults::*;
pub use hostile::*;
pub use lifecycle::*;
pub use messaging::*;
pub use mixed::*;
pub use registry::*;
pub use rpc::*;
pub use security::*;
pub use soak::*;
pub use streams::*;

use std::time::Duration;

use rusm_cluster::core::transport::Transport;
use rusm_cluster::{ClusterCa, Message, NodeEvent};
use tokio::sync::{broadcast, mpsc};

// The helpers live in the workspace's testkit, shared with the benches and `rusm bench`.
pub use rusm_testkit::{
    collector, next_down, node, pair, raw_endpoint, recv, start_node, wait_until, within,
};
