//! Ping-pong round trips and their percentiles.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rusm_cluster::{Node, Pid, SendError};

/// Which sample a [`percentile`] picks: the sample at rank `(n - 1) * p`, rounded or truncated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rank {
    /// The nearest rank (rounded): what the criterion `rtt` bench prints.
    Nearest,
    /// The rank below (truncated): what `rusm bench` reports (kept so its figures stay
    /// comparable from run to run).
    Below,
}

/// The `p`-th quantile (`p` in 0..=1) of `sorted` (ascending), picking the sample by `rank`.
/// Panics if `sorted` is empty.
pub fn percentile(sorted: &[Duration], p: f64, rank: Rank) -> Duration {
    let at = (sorted.len() - 1) as f64 * p;
    let at = match rank {
        Rank::Nearest => at.round(),
        Rank::Below => at,
    };
    sorted[at as usize]
}

/// `d` in microseconds.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A summary of latency samples, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Latencies {
    /// How many samples.
    pub count: usize,
    /// The median ([`percentile`] 0.5).
    pub p50_us: f64,
    /// The 99th percentile.
    pub p99_us: f64,
    /// The fastest sample.
    pub min_us: f64,
    /// The arithmetic mean.
    pub mean_us: f64,
    /// The slowest sample.
    pub max_us: f64,
}

impl Latencies {
    /// Sorts `samples` and summarises them, picking percentiles by `rank`. Panics if `samples`
    /// is empty.
    pub fn of(mut samples: Vec<Duration>, rank: Rank) -> Self {
        samples.sort_unstable();
        Latencies {
            count: samples.len(),
            p50_us: micros(percentile(&samples, 0.50, rank)),
            p99_us: micros(percentile(&samples, 0.99, rank)),
            min_us: micros(samples[0]),
            mean_us: micros(samples.iter().sum::<Duration>()) / samples.len() as f64,
            max_us: micros(samples[samples.len() - 1]),
        }
    }
}

/// What [`round_trips`] measured.
#[derive(Clone, Debug, Default)]
pub struct RoundTrips {
    /// From the first ping to the last reply.
    pub total: Duration,
    /// Each round trip's time, in order (empty unless recording was asked for).
    pub samples: Vec<Duration>,
}

/// Why [`round_trips`] did not finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PingError {
    /// A ping could not be sent.
    #[error("ping to {echo}: {source}")]
    Send {
        /// The echo process pinged.
        echo: Pid,
        /// Why.
        source: SendError,
    },
    /// The pinging node shut down while the process waited for a reply.
    #[error("the pinging node shut down while waiting for a reply")]
    NodeDown,
    /// A reply's payload was not the ping's.
    #[error("wrong echo: sent {sent} bytes, got {got} bytes back that differ")]
    WrongEcho {
        /// The ping's size.
        sent: usize,
        /// The reply's size.
        got: usize,
    },
    /// The round trips took longer than the limit.
    #[error("waiting for the round trips: not done within {0:?}")]
    Timeout(Duration),
    /// The pinging process ended without a result (it panicked, or its node shut down).
    #[error("the pinging process ended without a result")]
    Gone,
}

/// Runs `n` ping-pong round trips from a fresh process on `node` to the [`echo`](crate::echo)
/// process `echo`: send `ping`, wait for the reply, check it is `ping`. Times the whole run and,
/// if `record`, each round trip (from the send until the reply is received, before it is
/// checked). Fails if a ping cannot be sent, a reply is wrong, or the run takes over `limit`.
pub async fn round_trips(
    node: &Node,
    echo: &Pid,
    ping: Bytes,
    n: u64,
    record: bool,
    limit: Duration,
) -> Result<RoundTrips, PingError> {
    let echo = echo.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    node.spawn(move |mut ctx| async move {
        let run = async {
            let mut samples = Vec::with_capacity(if record { n as usize } else { 0 });
            let start = Instant::now();
            for _ in 0..n {
                let t = record.then(Instant::now);
                if let Err(source) = ctx.send_to(&echo, ping.clone()).await {
                    return Err(PingError::Send { echo, source });
                }
                let Some(reply) = ctx.recv().await else {
                    return Err(PingError::NodeDown);
                };
                if let Some(t) = t {
                    samples.push(t.elapsed());
                }
                if reply.payload() != &ping {
                    return Err(PingError::WrongEcho {
                        sent: ping.len(),
                        got: reply.payload().len(),
                    });
                }
            }
            Ok(RoundTrips {
                total: start.elapsed(),
                samples,
            })
        };
        let _ = tx.send(run.await);
    });
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(out)) => out,
        Ok(Err(_)) => Err(PingError::Gone),
        Err(_) => Err(PingError::Timeout(limit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn percentile_picks_the_nearest_rank_or_the_one_below() {
        let sorted: Vec<Duration> = (1..=5000).map(us).collect();
        // Rank (n - 1) * 0.5 = 2499.5: rounded up, or truncated down.
        assert_eq!(percentile(&sorted, 0.5, Rank::Nearest), us(2501));
        assert_eq!(percentile(&sorted, 0.5, Rank::Below), us(2500));
        assert_eq!(percentile(&sorted, 0.99, Rank::Nearest), us(4950));
        assert_eq!(percentile(&sorted, 0.0, Rank::Below), us(1));
        assert_eq!(percentile(&sorted, 1.0, Rank::Below), us(5000));
    }

    #[test]
    fn latencies_sort_and_summarise() {
        let l = Latencies::of(vec![us(30), us(10), us(20), us(40)], Rank::Nearest);
        assert_eq!(l.count, 4);
        assert_eq!((l.min_us, l.max_us, l.mean_us), (10.0, 40.0, 25.0));
        // Rank 1.5 rounds to 2 (30 µs); rank 2.97 to 3 (40 µs).
        assert_eq!((l.p50_us, l.p99_us), (30.0, 40.0));
        let l = Latencies::of(vec![us(30), us(10), us(20), us(40)], Rank::Below);
        assert_eq!((l.p50_us, l.p99_us), (20.0, 30.0));
    }
}
