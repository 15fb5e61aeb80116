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
mod messaging;
mod mixed;
mod security;
mod streams;

pub use capabilities::*;
pub use coalescing::*;
pub use faults::*;
pub use hostile::*;
pub use messaging::*;
pub use mixed::*;
pub use security::*;
pub use streams::*;

use std::future::Future;
use std::time::Duration;

use rusm_cluster::core::transport::{EndpointConfig, Transport, TransportTuning};
use rusm_cluster::{ClusterCa, Identity, Message, Node, NodeBuilder, NodeEvent, Pid};
use tokio::sync::{broadcast, mpsc};

/// Starts node `name` with a certificate from `ca`.
pub async fn node<T: Transport>(ca: &ClusterCa, name: &str) -> Node {
    NodeBuilder::<T>::new(name)
        .identity(ca.issue(name).unwrap())
        .trust(ca.trust())
        .start()
        .await
        .unwrap()
}

/// Two nodes of one cluster, `paris` connected to `london`.
pub async fn pair<T: Transport>() -> (ClusterCa, Node, Node) {
    let ca = ClusterCa::generate("test").unwrap();
    let london = node::<T>(&ca, "london").await;
    let paris = node::<T>(&ca, "paris").await;
    paris.connect("london", london.local_addr()).await.unwrap();
    wait_until(|| london.peers().len() == 1).await;
    (ca, london, paris)
}

/// Spawns a process that forwards everything it receives to the returned channel.
pub fn collector(node: &Node) -> (Pid, mpsc::UnboundedReceiver<Message>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let pid = node.spawn(|mut ctx| async move {
        while let Some(m) = ctx.recv().await {
            if tx.send(m).is_err() {
                break;
            }
        }
    });
    (pid, rx)
}

/// The next message, or a panic after 10 s.
pub async fn recv(rx: &mut mpsc::UnboundedReceiver<Message>) -> Message {
    within(rx.recv()).await.expect("collector ended")
}

/// Awaits `f`, failing the test after 10 s.
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("timed out after 10 s")
}

/// Polls `cond` until it holds, failing after 10 s.
pub async fn wait_until(mut cond: impl FnMut() -> bool) {
    within(async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// The next node-down event.
pub async fn next_down(events: &mut broadcast::Receiver<NodeEvent>) -> NodeEvent {
    within(async {
        loop {
            match events.recv().await.unwrap() {
                e @ NodeEvent::NodeDown { .. } => return e,
                _ => continue,
            }
        }
    })
    .await
}

/// A bare endpoint of backend `T` with identity `id`, for playing a hostile or broken peer.
pub fn raw_endpoint<T: Transport>(id: Identity, ca: &ClusterCa) -> T {
    T::bind(EndpointConfig {
        identity: id,
        trust: ca.trust(),
        listen: "127.0.0.1:0".parse().unwrap(),
        tuning: TransportTuning::default(),
    })
    .unwrap()
}
