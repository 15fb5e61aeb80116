//! Starting nodes, linked pairs of them, and bare endpoints of a backend.

use std::time::Duration;

use rusm_cluster::core::transport::{EndpointConfig, Transport, TransportError, TransportTuning};
use rusm_cluster::{ClusterCa, Error, Identity, Node, NodeBuilder, NodeConfig};

use crate::wait::{poll, TEST_TIMEOUT};

/// Starts node `name` on backend `T` with a certificate from `ca`, trusting `ca`, with `config`,
/// listening on a free port of 127.0.0.1.
pub async fn start_node<T: Transport>(
    ca: &ClusterCa,
    name: &str,
    config: NodeConfig,
) -> Result<Node, Error> {
    NodeBuilder::<T>::new(name)
        .identity(ca.issue(name)?)
        .trust(ca.trust())
        .config(config)
        .start()
        .await
}

/// A [`builder`](crate::builder) for node `name` with a certificate from `ca`, trusting `ca`;
/// panics if `ca` cannot issue it.
pub fn issued<T: Transport>(ca: &ClusterCa, name: &str) -> NodeBuilder<T> {
    crate::builder::<T>(name)
        .identity(ca.issue(name).unwrap())
        .trust(ca.trust())
}

/// Starts node `name` with a certificate from `ca` and the default configuration; panics if it
/// cannot.
pub async fn node<T: Transport>(ca: &ClusterCa, name: &str) -> Node {
    start_node::<T>(ca, name, crate::test_config())
        .await
        .unwrap()
}

/// Two nodes of one cluster on backend `T`, `paris` connected to `london`, returned as
/// `(ca, london, paris)` once london sees the link (london is started first; a test failure
/// after [`TEST_TIMEOUT`], 10 s).
pub async fn pair<T: Transport>() -> (ClusterCa, Node, Node) {
    let ca = ClusterCa::generate("test").unwrap();
    let (paris, london) =
        linked_pair::<T>(&ca, "paris", "london", crate::test_config(), TEST_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    (ca, london, paris)
}

/// Why [`linked_pair`] could not link two nodes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PairError {
    /// A node did not start.
    #[error("start node {node} on {backend}: {source}")]
    Start {
        /// The node's name.
        node: String,
        /// The backend ([`Transport::NAME`]).
        backend: &'static str,
        /// Why.
        source: Error,
    },
    /// The dialling node could not connect.
    #[error("connect {from} to {to} on {backend}: {source}")]
    Connect {
        /// The dialling node.
        from: String,
        /// The node dialled.
        to: String,
        /// The backend ([`Transport::NAME`]).
        backend: &'static str,
        /// Why.
        source: Error,
    },
    /// The dialled node did not see the link in time.
    #[error("waiting for the link on both ends: not done within {waited:?}")]
    NotLinked {
        /// How long it was waited for.
        waited: Duration,
    },
}

/// Starts nodes `listener` and then `dialler` of `ca`'s cluster on backend `T`, both with
/// `config`, connects `dialler` to `listener`, and returns `(dialler, listener)` once both ends
/// see the link; the listener's side is waited for at most `limit`.
pub async fn linked_pair<T: Transport>(
    ca: &ClusterCa,
    dialler: &str,
    listener: &str,
    config: NodeConfig,
    limit: Duration,
) -> Result<(Node, Node), PairError> {
    let start = |name: &str| {
        let config = config.clone();
        let name = name.to_owned();
        async move {
            start_node::<T>(ca, &name, config)
                .await
                .map_err(|source| PairError::Start {
                    node: name,
                    backend: T::NAME,
                    source,
                })
        }
    };
    let b = start(listener).await?;
    let a = start(dialler).await?;
    link::<T>(&a, &b, limit).await?;
    Ok((a, b))
}

/// Connects `dialler` to `listener` (nodes on backend `T`) and returns once both ends see the
/// link; the listener's side is waited for at most `limit`.
pub async fn link<T: Transport>(
    dialler: &Node,
    listener: &Node,
    limit: Duration,
) -> Result<(), PairError> {
    dialler
        .connect(listener.name().as_str(), listener.local_addr())
        .await
        .map_err(|source| PairError::Connect {
            from: dialler.name().to_string(),
            to: listener.name().to_string(),
            backend: T::NAME,
            source,
        })?;
    tokio::time::timeout(limit, poll(|| !listener.peers().is_empty()))
        .await
        .map_err(|_| PairError::NotLinked { waited: limit })
}

/// Binds a bare endpoint of backend `T` with identity `id`, trusting `ca`, on a free port of
/// 127.0.0.1 (default tuning): a raw QUIC peer, below the node layer.
pub fn bind_endpoint<T: Transport>(id: Identity, ca: &ClusterCa) -> Result<T, TransportError> {
    T::bind(EndpointConfig {
        live_trust: None,
        identity: id,
        trust: ca.trust(),
        listen: ([127, 0, 0, 1], 0).into(),
        tuning: TransportTuning::default(),
    })
}

/// A bare endpoint of backend `T` with identity `id`, for playing a hostile or broken peer;
/// panics if it cannot bind.
pub fn raw_endpoint<T: Transport>(id: Identity, ca: &ClusterCa) -> T {
    bind_endpoint(id, ca).unwrap()
}
