//! What both benches share: booting two connected nodes of one cluster on 127.0.0.1, generic over
//! the transport backend, and the checks that nothing was lost.

use std::future::Future;
use std::time::Duration;

use rusm_cluster::{ClusterCa, Coalescing, Node, NodeBuilder, NodeConfig, Transport};

/// How long any one wait in a bench may take before it is declared hung.
pub(crate) const DEADLINE: Duration = Duration::from_secs(120);

/// Node settings for benches: the defaults (with opt-in coalescing when `coalesce`), except a 60 s
/// idle timeout (instead of 5 s). A
/// current-thread runtime only runs while a bench drives it, so while criterion analyses a
/// finished benchmark nobody answers keep-alives; the longer timeout keeps a busy machine from
/// declaring the link dead in between. Keep-alives still go out every second.
fn config(coalesce: bool) -> NodeConfig {
    let mut config = NodeConfig::default();
    config.tuning.idle_timeout = Duration::from_secs(60);
    if coalesce {
        config.coalescing = Some(Coalescing::default());
    }
    config
}

/// Awaits `fut`, panicking with `what` if it takes longer than [`DEADLINE`].
pub(crate) async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: not done within {DEADLINE:?}"),
    }
}

async fn start<T: Transport>(ca: &ClusterCa, name: &str, coalesce: bool) -> Node {
    NodeBuilder::<T>::new(name)
        .identity(ca.issue(name).expect("issue a node certificate"))
        .trust(ca.trust())
        .config(config(coalesce))
        .listen(([127, 0, 0, 1], 0).into())
        .start()
        .await
        .unwrap_or_else(|e| panic!("start node {name} on {}: {e}", T::NAME))
}

/// Two nodes of a fresh cluster on backend `T` (coalescing when `coalesce`), `first` connected
/// to `second`, returned once both ends see the link.
pub(crate) async fn pair<T: Transport>(first: &str, second: &str, coalesce: bool) -> (Node, Node) {
    let ca = ClusterCa::generate("bench").expect("generate the cluster CA");
    let a = start::<T>(&ca, first, coalesce).await;
    let b = start::<T>(&ca, second, coalesce).await;
    a.connect(second, b.local_addr())
        .await
        .unwrap_or_else(|e| panic!("connect {first} to {second} on {}: {e}", T::NAME));
    within("waiting for the link on both ends", async {
        while b.peers().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    (a, b)
}

/// Shuts both nodes down (after a last look at their counters) and panics if either counted a
/// lost message, a dead letter or a failed send.
pub(crate) async fn shutdown_checked(backend: &str, nodes: [&Node; 2]) {
    for node in nodes {
        let s = node.stats();
        assert!(
            s.lost_messages == 0 && s.dead_letters == 0 && s.send_failures == 0,
            "{backend}: node {} counted losses: {s:?}",
            node.name()
        );
    }
    for node in nodes {
        node.shutdown().await;
    }
}
