//! Which send path the tests' nodes take: the default (a link writes each message on a stream of
//! its own while idle and coalesces what queues up behind a busy one), or one stream per message
//! always (coalescing off). The conformance matrix runs every case both ways.

use std::future::Future;

use rusm_cluster::core::transport::Transport;
use rusm_cluster::{NodeBuilder, NodeConfig};

tokio::task_local! {
    static PER_STREAM: bool;
}

/// Runs `test` with coalescing off in every configuration [`test_config`] and [`builder`] make
/// in its task, so each message goes on a stream of its own.
pub async fn per_stream<F: Future>(test: F) -> F::Output {
    PER_STREAM.scope(true, test).await
}

/// `true` inside [`per_stream`].
pub fn is_per_stream() -> bool {
    PER_STREAM.try_with(|p| *p).unwrap_or(false)
}

/// The configuration the tests start nodes with: [`NodeConfig::default`], with coalescing off
/// inside [`per_stream`].
pub fn test_config() -> NodeConfig {
    let mut config = NodeConfig::default();
    if is_per_stream() {
        config.coalescing = None;
    }
    config
}

/// [`NodeBuilder::new`] with [`test_config`].
pub fn builder<T: Transport>(name: impl Into<String>) -> NodeBuilder<T> {
    NodeBuilder::<T>::new(name).config(test_config())
}
