//! Network faults: a peer that goes silent without closing is declared down by keep-alives.
//!
//! Each backend says how a test cuts the network path between two nodes ([`CutPath`]): the QUIC
//! backends through a UDP relay whose cable is cut (datagrams are dropped), the in-memory one
//! with `MemNetwork::cut`, which holds everything back the same way.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusm_cluster::core::transport::Transport;
use rusm_cluster::{ClusterCa, DownReason, Error, NodeBuilder, NodeConfig, NodeEvent};
use rusm_transport_mem::{MemNetwork, MemTransport};
use rusm_transport_quinn::QuinnTransport;
use rusm_transport_s2n::S2nTransport;
use tokio::net::UdpSocket;

use super::*;

/// A network path from a dialler to a listener that a test can cut.
pub struct Path {
    /// The address the dialler dials to reach the listener over this path.
    pub dial: SocketAddr,
    cut: Box<dyn Fn() + Send + Sync>,
}

impl Path {
    /// Cuts the path: from now on nothing crosses it, either way.
    pub fn cut(&self) {
        (self.cut)()
    }
}

/// How a backend's test cuts the path between two nodes.
pub trait CutPath: Transport {
    /// A cuttable path from the node bound at `dialler` to the node bound at `listener`.
    fn path(dialler: SocketAddr, listener: SocketAddr) -> impl Future<Output = Path> + Send;
}

impl CutPath for QuinnTransport {
    fn path(_dialler: SocketAddr, listener: SocketAddr) -> impl Future<Output = Path> + Send {
        relay(listener)
    }
}

impl CutPath for S2nTransport {
    fn path(_dialler: SocketAddr, listener: SocketAddr) -> impl Future<Output = Path> + Send {
        relay(listener)
    }
}

impl CutPath for MemTransport {
    async fn path(dialler: SocketAddr, listener: SocketAddr) -> Path {
        Path {
            dial: listener,
            cut: Box::new(move || MemNetwork::cut(dialler, listener)),
        }
    }
}

/// A UDP relay between one client and `server`, whose cable can be cut.
async fn relay(server: SocketAddr) -> Path {
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = sock.local_addr().unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let cut2 = cut.clone();
    tokio::spawn(async move {
        let mut client: Option<SocketAddr> = None;
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            if cut2.load(Ordering::Relaxed) {
                continue;
            }
            let to = if from == server {
                match client {
                    Some(c) => c,
                    None => continue,
                }
            } else {
                client = Some(from);
                server
            };
            let _ = sock.send_to(&buf[..n], to).await;
        }
    });
    Path {
        dial: addr,
        cut: Box::new(move || cut.store(true, Ordering::Relaxed)),
    }
}

fn quick_liveness() -> NodeConfig {
    let mut c = NodeConfig::default();
    c.tuning.idle_timeout = Duration::from_millis(1500);
    c.tuning.keep_alive_interval = Duration::from_millis(300);
    c
}

pub async fn silent_peer_is_declared_down<T: CutPath>() {
    let ca = ClusterCa::generate("faults").unwrap();
    let start = |name: &'static str| {
        NodeBuilder::<T>::new(name)
            .identity(ca.issue(name).unwrap())
            .trust(ca.trust())
            .config(quick_liveness())
            .start()
    };
    let london = start("london").await.unwrap();
    let paris = start("paris").await.unwrap();
    let path = T::path(paris.local_addr(), london.local_addr()).await;
    paris.connect("london", path.dial).await.unwrap();
    let (p, mut inbox) = collector(&london);
    london.register("inbox", &p).unwrap();
    paris
        .send("london", "inbox", Bytes::from_static(b"before"))
        .await
        .unwrap();
    recv(&mut inbox).await;
    // Each side holds a global name the other sees.
    london.register_global("london-svc", &p).await.unwrap();
    let (q, _at_q) = collector(&paris);
    paris.register_global("paris-svc", &q).await.unwrap();
    wait_until(|| {
        london.whereis_global("paris-svc") == Some(q.clone())
            && paris.whereis_global("london-svc") == Some(p.clone())
    })
    .await;
    // Idle for longer than the idle timeout: keep-alives hold the link up.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(london.peers().len(), 1, "keep-alives keep an idle link up");

    let mut events = london.subscribe();
    let cut_at = Instant::now();
    path.cut();
    match next_down(&mut events).await {
        NodeEvent::NodeDown { node, reason } => {
            assert_eq!(node.as_str(), "paris");
            assert_eq!(reason, DownReason::TimedOut);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        cut_at.elapsed() < Duration::from_secs(8),
        "declared down after {:?}",
        cut_at.elapsed()
    );
    // The lost node's names went with it, on both sides of the cut.
    assert_eq!(london.whereis_global("paris-svc"), None);
    assert_eq!(london.whereis_global("london-svc"), Some(p.clone()));
    wait_until(|| paris.peers().is_empty()).await;
    assert_eq!(paris.whereis_global("london-svc"), None);
    assert!(matches!(
        paris
            .send("london", "inbox", Bytes::from_static(b"after"))
            .await
            .unwrap_err()
            .error,
        Error::NotConnected { .. }
    ));
}
