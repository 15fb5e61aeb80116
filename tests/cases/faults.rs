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
use rusm_cluster::{ClusterCa, DownReason, Error, Node, NodeConfig, NodeEvent};
use rusm_transport_mem::{MemNetwork, MemTransport};
use rusm_transport_quinn::QuinnTransport;
use rusm_transport_s2n::S2nTransport;
use tokio::net::UdpSocket;

use super::*;

/// A network path from a dialler to a listener that a test can cut.
pub struct Path {
    /// The address the dialler dials to reach the listener over this path.
    pub dial: SocketAddr,
    cut: Box<dyn Fn(bool) + Send + Sync>,
}

impl Path {
    /// Cuts the path: from now on nothing crosses it, either way.
    pub fn cut(&self) {
        (self.cut)(true)
    }

    /// Restores the path.
    pub fn restore(&self) {
        (self.cut)(false)
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
            cut: Box::new(move |cut| {
                if cut {
                    MemNetwork::cut(dialler, listener)
                } else {
                    MemNetwork::restore(dialler, listener)
                }
            }),
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
        cut: Box::new(move |on| cut.store(on, Ordering::Relaxed)),
    }
}

fn quick_liveness() -> NodeConfig {
    let mut c = rusm_testkit::test_config();
    c.tuning.idle_timeout = Duration::from_millis(1500);
    c.tuning.keep_alive_interval = Duration::from_millis(300);
    // These cases watch a link stay down; reconnecting has cases of its own.
    c.reconnect = None;
    c
}

/// A silent peer declared down within 1.5 s, and lost links redialled with backoff.
pub fn quick_reconnecting() -> NodeConfig {
    let mut c = quick_liveness();
    c.reconnect = Some(rusm_cluster::Reconnect::default());
    c
}

/// `london` and `paris` started on `T` with `config`, paris linked to london over a path the
/// case can cut; returns (london, paris, path).
async fn pair_over_path<T: CutPath>(config: NodeConfig) -> (Node, Node, Path) {
    let ca = ClusterCa::generate("faults").unwrap();
    let london = start_node::<T>(&ca, "london", config.clone())
        .await
        .unwrap();
    let paris = start_node::<T>(&ca, "paris", config).await.unwrap();
    let path = T::path(paris.local_addr(), london.local_addr()).await;
    paris.connect("london", path.dial).await.unwrap();
    (london, paris, path)
}

pub async fn silent_peer_is_declared_down<T: CutPath>() {
    let (london, paris, path) = pair_over_path::<T>(quick_liveness()).await;
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

/// A lost link (cable cut) comes back by itself once the path is restored: the peers reconnect
/// with backoff, and messages flow again.
pub async fn a_lost_link_reconnects_by_itself<T: CutPath>() {
    let (london, paris, path) = pair_over_path::<T>(quick_reconnecting()).await;
    let (p, mut inbox) = collector(&london);
    london.register("inbox", &p).unwrap();
    let mut events = paris.subscribe();
    path.cut();
    match next_down(&mut events).await {
        NodeEvent::NodeDown { reason, .. } => assert_eq!(reason, DownReason::TimedOut),
        other => panic!("{other:?}"),
    }
    path.restore();
    let restored = Instant::now();
    wait_until(|| paris.peers().len() == 1 && london.peers().len() == 1).await;
    assert!(
        restored.elapsed() < Duration::from_secs(5),
        "{:?}",
        restored.elapsed()
    );
    assert_eq!(
        paris.peers()[0].creation,
        london.creation(),
        "the same incarnation"
    );
    paris
        .send("london", "inbox", Bytes::from_static(b"again"))
        .await
        .unwrap();
    assert_eq!(recv(&mut inbox).await.payload().as_ref(), b"again");
    paris.shutdown().await;
    london.shutdown().await;
}

/// A node that restarts while its peer still holds the old link (the old incarnation vanished
/// without a word): the new incarnation's hello replaces the stale link at once, pids of the
/// old incarnation get a typed error, and names follow the new one.
pub async fn a_restarted_peer_replaces_its_stale_link<T: CutPath>() {
    let ca = ClusterCa::generate("faults").unwrap();
    let start = |name: &'static str| start_node::<T>(&ca, name, quick_liveness());
    let old = start("london").await.unwrap();
    let paris = start("paris").await.unwrap();
    let path = T::path(paris.local_addr(), old.local_addr()).await;
    paris.connect("london", path.dial).await.unwrap();
    let (old_pid, _old_inbox) = collector(&old);
    paris
        .send_to(&old_pid, Bytes::from_static(b"hi"))
        .await
        .unwrap();
    // The old incarnation vanishes without a goodbye: paris still holds its link.
    path.cut();
    let mut events = paris.subscribe();
    let new = start("london").await.unwrap();
    assert_ne!(new.creation(), old.creation());
    let (svc, mut at_svc) = collector(&new);
    new.register_global("svc", &svc).await.unwrap();
    let dialled = Instant::now();
    new.connect("paris", paris.local_addr()).await.unwrap();
    wait_until(|| paris.peers().iter().any(|p| p.creation == new.creation())).await;
    let took = dialled.elapsed();
    assert!(took < Duration::from_secs(1), "relinked after {took:?}");
    match next_down(&mut events).await {
        NodeEvent::NodeDown { node, reason } => {
            assert_eq!(node.as_str(), "london");
            assert_eq!(reason, DownReason::PeerRestarted);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(paris.peers().len(), 1);
    // A pid of the old incarnation: a typed error, the payload back.
    let err = paris
        .send_to(&old_pid, Bytes::from_static(b"stale"))
        .await
        .unwrap_err();
    match &err.error {
        Error::StalePid { pid, current } => {
            assert_eq!(pid, &old_pid);
            assert_eq!(*current, new.creation());
        }
        other => panic!("expected StalePid, got {other}"),
    }
    assert_eq!(err.payload, Bytes::from_static(b"stale"));
    // Names follow the new incarnation.
    wait_until(|| paris.whereis_global("svc") == Some(svc.clone())).await;
    paris
        .send_global("svc", Bytes::from_static(b"new"))
        .await
        .unwrap();
    assert_eq!(recv(&mut at_svc).await.payload().as_ref(), b"new");
    // The old incarnation, once it sees its link gone, cannot take it back.
    wait_until(|| old.peers().is_empty()).await;
    path.restore();
    match old.connect("paris", paris.local_addr()).await {
        Err(Error::Rejected { reason, .. }) => {
            assert_eq!(
                reason,
                rusm_cluster::core::wire::RejectReason::StaleIncarnation
            )
        }
        r => panic!("expected Rejected(StaleIncarnation), got {r:?}"),
    }
    assert_eq!(paris.peers()[0].creation, new.creation());
    for n in [&paris, &new, &old] {
        n.shutdown().await;
    }
}

/// Messages sent on a link whose cable is cut (their sends return `Ok`: the stack or the link's
/// queue holds them) never arrive. Those never written are counted lost at once; for the rest,
/// once the path is back and the link is relinked, the two nodes compare what they sent and
/// received over the failed link. In the end the sender counts exactly the messages sent after
/// the cut in `lost_in_transit`: nothing is counted twice, and nothing delivered is counted lost.
pub async fn messages_lost_in_transit_are_counted_on_relink<T: CutPath>() {
    let (london, paris, path) = pair_over_path::<T>(quick_reconnecting()).await;
    let (p, mut inbox) = collector(&london);
    // Before the cut: every message arrives.
    for i in 0..100u32 {
        paris
            .send_to(&p, Bytes::copy_from_slice(&i.to_be_bytes()))
            .await
            .unwrap();
    }
    for _ in 0..100 {
        recv(&mut inbox).await;
    }
    let mut events = paris.subscribe();
    path.cut();
    // After the cut: what the link still accepts is sent `Ok`, and cannot arrive. 8 MiB of
    // messages: more than a coalescing link writes unacknowledged (4 streams) plus its queue
    // (4 MiB), so part of what is accepted is never written; senders then wait for queue space
    // until the link is declared down.
    let mut ok = 0u64;
    for i in 100..8292u32 {
        let mut payload = vec![0u8; 1024];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        if paris.send_to(&p, Bytes::from(payload)).await.is_ok() {
            ok += 1;
        }
    }
    assert!(
        ok > 0,
        "no send after the cut returned Ok: nothing to count"
    );
    match next_down(&mut events).await {
        NodeEvent::NodeDown { reason, .. } => assert_eq!(reason, DownReason::TimedOut),
        other => panic!("{other:?}"),
    }
    // Messages queued and never written are known lost at once; what was written is known
    // only once the two nodes compare notes on the next link.
    let known_at_once = paris.stats().lost_in_transit;
    if rusm_testkit::is_per_stream() {
        assert_eq!(known_at_once, 0, "a stream per message: nothing was queued");
    } else {
        assert!(
            known_at_once > 0 && known_at_once < ok,
            "coalescing: {known_at_once} of {ok} never written"
        );
    }
    assert_eq!(paris.stats().messages_sent, 100 + ok);
    path.restore();
    wait_until(|| paris.peers().len() == 1 && london.peers().len() == 1).await;
    wait_until(|| paris.stats().lost_in_transit > known_at_once).await;
    assert_eq!(paris.stats().lost_in_transit, ok);
    assert_eq!(london.stats().lost_in_transit, 0);
    assert_eq!(london.stats().messages_received, 100);
    assert!(
        inbox.try_recv().is_err(),
        "a message sent after the cut arrived"
    );
    paris.shutdown().await;
    london.shutdown().await;
}
