//! Waiting with a limit: a test's [`within`] / [`wait_until`], and [`expect_within`] / [`poll`]
//! for other limits.

use std::future::Future;
use std::time::Duration;

/// How long a test waits for any one thing ([`within`], [`wait_until`], [`recv`](crate::recv),
/// [`next_down`](crate::next_down), [`pair`](crate::pair)) before it fails.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long any one wait in a benchmark (a criterion bench or `rusm bench`) may take before it
/// is declared hung.
pub const BENCH_DEADLINE: Duration = Duration::from_secs(120);

/// How often [`poll`] (and so [`wait_until`]) checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Awaits `f`, failing the test (a panic) after [`TEST_TIMEOUT`] (10 s).
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("timed out after 10 s")
}

/// Awaits `fut`, panicking with `what` if it takes longer than `limit`.
pub async fn expect_within<F: Future>(what: &str, limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: not done within {limit:?}"),
    }
}

/// Checks `cond` every [`POLL_INTERVAL`] (5 ms) and returns once it holds; it never gives up, so
/// wrap it in a limit ([`within`], [`expect_within`], `tokio::time::timeout`).
pub async fn poll(mut cond: impl FnMut() -> bool) {
    while !cond() {
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `cond` (every 5 ms) until it holds, failing the test after [`TEST_TIMEOUT`] (10 s).
pub async fn wait_until(cond: impl FnMut() -> bool) {
    within(poll(cond)).await
}
