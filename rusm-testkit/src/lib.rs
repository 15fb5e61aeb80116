//! Helpers shared by the conformance tests (`tests/cases`), the criterion benches (`benches/`)
//! and the `rusm bench` command, written once and generic over the transport backend
//! (`T: Transport`). Not published: it exists for this workspace's own tests and tools.
//!
//! - Waiting: [`within`] and [`wait_until`] (a test's 10 s), [`expect_within`] and [`poll`] for
//!   any other limit ([`BENCH_DEADLINE`] for benches).
//! - Send path: [`per_stream`] runs a test with coalescing off in every [`test_config`] and
//!   [`builder`] it makes.
//! - Nodes: [`issued`] (a builder with a certificate), [`start_node`] and [`node`], [`linked_pair`] (or [`link`] for two started nodes) and
//!   the tests' [`pair`], a bare endpoint with [`bind_endpoint`] / [`raw_endpoint`].
//! - Processes: [`collector`] with [`recv`], [`next_down`], an [`echo`] process, and counting
//!   receivers ([`counting_receiver`]) that add to a [`Tally`] one can wait on.
//! - Latency: [`round_trips`] of ping-pong against an echo, [`percentile`] and the
//!   [`Latencies`] summary (p50 / p99, min, mean, max).

mod latency;
mod mode;
mod nodes;
mod procs;
mod wait;

pub use latency::{micros, percentile, round_trips, Latencies, PingError, Rank, RoundTrips};
pub use mode::{builder, is_per_stream, per_stream, test_config};
pub use nodes::{
    bind_endpoint, issued, link, linked_pair, node, pair, raw_endpoint, start_node, PairError,
};
pub use procs::{collector, counting_receiver, echo, next_down, recv, Shortfall, Tally};
pub use wait::{
    expect_within, poll, wait_until, within, BENCH_DEADLINE, POLL_INTERVAL, TEST_TIMEOUT,
};
