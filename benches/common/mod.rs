//! What both benches share: booting two connected nodes of one cluster on 127.0.0.1 (through the
//! workspace's testkit), generic over the transport backend, with bench settings, and the checks
//! that nothing was lost.

use std::time::Duration;

use rusm_cluster::{ClusterCa, Node, NodeConfig, Transport};

/// How long any one wait in a bench may take before it is declared hung (120 s).
pub(crate) const DEADLINE: Duration = rusm_testkit::BENCH_DEADLINE;

/// Node settings for benches: the defaults (with coalescing off when `per_stream`: every message
/// on a stream of its own), except a 60 s idle timeout (instead of 5 s). A
/// current-thread runtime only runs while a bench drives it, so while criterion analyses a
/// finished benchmark nobody answers keep-alives; the longer timeout keeps a busy machine from
/// declaring the link dead in between. Keep-alives still go out every second.
fn config(per_stream: bool) -> NodeConfig {
    let mut config = NodeConfig::default();
    config.tuning.idle_timeout = Duration::from_secs(60);
    if per_stream {
        config.coalescing = None;
    }
    config
}

/// Two nodes of a fresh cluster on backend `T` (coalescing off when `per_stream`), `first`
/// connected to `second`, returned once both ends see the link.
pub(crate) async fn pair<T: Transport>(
    first: &str,
    second: &str,
    per_stream: bool,
) -> (Node, Node) {
    let ca = ClusterCa::generate("bench").expect("generate the cluster CA");
    rusm_testkit::linked_pair::<T>(&ca, first, second, config(per_stream), DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
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
