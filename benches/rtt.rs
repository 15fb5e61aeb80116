//! Cross-node round trip: a process on node A sends a 64-byte message to an echo process on
//! node B and waits for the reply, both nodes in this process on 127.0.0.1. Group `rtt`, one
//! benchmark per transport backend and tokio runtime flavour: `quinn/current_thread`,
//! `quinn/multi_thread`, `s2n/current_thread`, `s2n/multi_thread`.
//!
//! One criterion iteration is one round trip (criterion's time per iteration is the mean round
//! trip). Both runtime flavours are measured because on a multi-thread runtime a round trip
//! often has to wake an idle worker on another core, which costs tens of microseconds on a
//! small machine; the current-thread runtime runs both nodes, their QUIC endpoints and both
//! processes on one thread.
//!
//! After each benchmark, a separate run of 5,000 round trips on the same (warm) nodes records
//! every round trip and prints its p50 / p99 (and min, mean, max) in microseconds to stdout,
//! since criterion reports means and medians of batches, not tail latency.
//!
//! The nodes of each backend and flavour are booted once (the first time the benchmark runs)
//! and shut down after its percentile run; their counters must show no loss, dead letter or
//! failed send. A reply that does not arrive within 120 s panics.
//!
//! Run: `cargo bench --bench rtt` (all), `cargo bench --bench rtt -- s2n` (one backend),
//! `cargo bench --bench rtt -- multi_thread` (one flavour); add `--quick` or
//! `--measurement-time 1` for a faster, rougher run.

use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion};
use rusm_cluster::{Node, Pid, Transport};
use rusm_testkit::{Latencies, Rank};
use rusm_transport_quinn::QuinnTransport;
use rusm_transport_s2n::S2nTransport;
use tokio::runtime::Runtime;

mod common;

/// Payload size of a ping.
const SIZE: usize = 64;
/// Round trips recorded one by one for the percentiles.
const RECORDED: usize = 5_000;

/// A pinging node and an echo node of one backend, on one runtime.
struct Pair {
    backend: &'static str,
    a: Node,
    b: Node,
    echo: Pid,
    round_trips: u64,
}

type Boot = fn(&'static str, &Runtime) -> Pair;

const BACKENDS: [(&str, Boot); 2] = [
    ("quinn", boot::<QuinnTransport>),
    ("s2n", boot::<S2nTransport>),
];

fn boot<T: Transport>(backend: &'static str, rt: &Runtime) -> Pair {
    rt.block_on(async {
        let (a, b) = common::pair::<T>("ping", "echo", false).await;
        let echo = rusm_testkit::echo(&b);
        Pair {
            backend,
            a,
            b,
            echo,
            round_trips: 0,
        }
    })
}

impl Pair {
    /// Runs `n` round trips from a fresh process on node A. Returns their total time and, if
    /// `record`, each one's.
    fn round_trips(&mut self, rt: &Runtime, n: u64, record: bool) -> (Duration, Vec<Duration>) {
        let backend = self.backend;
        let ping = Bytes::from(vec![0xab; SIZE]);
        let out = rt.block_on(rusm_testkit::round_trips(
            &self.a,
            &self.echo,
            ping,
            n,
            record,
            common::DEADLINE,
        ));
        self.round_trips += n;
        let out = out.unwrap_or_else(|e| panic!("{backend}: {e}"));
        (out.total, out.samples)
    }

    fn finish(self, rt: &Runtime) {
        let s = self.b.stats();
        assert_eq!(
            s.messages_received, self.round_trips,
            "{}: the echo node's counters disagree",
            self.backend
        );
        rt.block_on(common::shutdown_checked(self.backend, [&self.a, &self.b]));
    }
}

/// Prints p50 / p99 of `samples` (and min, mean, max), in microseconds.
fn print_percentiles(id: &str, samples: Vec<Duration>) {
    let l = Latencies::of(samples, Rank::Nearest);
    println!(
        "rtt/{id}: {} round trips: p50 {:.1} µs, p99 {:.1} µs (min {:.1}, mean {:.1}, max {:.1})",
        l.count, l.p50_us, l.p99_us, l.min_us, l.mean_us, l.max_us,
    );
}

fn benches(c: &mut Criterion) {
    let current_thread = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build the current-thread runtime");
    let multi_thread = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build the multi-thread runtime");
    let flavours = [
        ("current_thread", &current_thread),
        ("multi_thread", &multi_thread),
    ];

    let mut group = c.benchmark_group("rtt");
    for (backend, boot) in BACKENDS {
        for (flavour, rt) in flavours {
            let mut pair: Option<Pair> = None;
            group.bench_function(BenchmarkId::new(backend, flavour), |b| {
                let pair = pair.get_or_insert_with(|| boot(backend, rt));
                b.iter_custom(|iters| pair.round_trips(rt, iters, false).0);
            });
            // Skipped by a filter if the benchmark did not run (no nodes were booted).
            if let Some(mut pair) = pair {
                let (_, samples) = pair.round_trips(rt, RECORDED as u64, true);
                print_percentiles(&format!("{backend}/{flavour}"), samples);
                pair.finish(rt);
            }
        }
    }
    group.finish();
}

fn main() {
    // Modest defaults so the whole suite runs in a few minutes; command-line options
    // (`--measurement-time`, `--sample-size`, `--quick`, a filter) override them.
    let mut c = Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    benches(&mut c);
    c.final_summary();
}
