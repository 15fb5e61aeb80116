//! Cross-node throughput: one node sends to K receiving processes on a second node, both nodes in
//! this process on 127.0.0.1, on a tokio multi-thread runtime (default worker count), once per
//! transport backend (quinn, s2n-quic).
//!
//! - Group `cluster_fanout`: 64-byte messages sent round-robin by pid to K = 1 and K = 8
//!   receivers (`quinn/k1`, `quinn/k8`, `s2n/k1`, `s2n/k8`). Throughput is in messages
//!   (`Throughput::Elements`): criterion's `thrpt` is messages per second.
//! - Group `message_size`: K = 1, payloads of 64 B, 1 KiB and 64 KiB (`quinn/64B`, ...,
//!   `s2n/64KiB`). Throughput is in payload bytes (`Throughput::Bytes`): `thrpt` is payload
//!   bytes per second (time per iteration is still the time per message).
//! - The two groups above run with the default settings, where a busy link coalesces queued
//!   messages into shared streams. Group `per_stream_fanout`: as `cluster_fanout` with coalescing
//!   off on both nodes (`NodeConfig::coalescing = None`: every message on a stream of its own),
//!   measured on its own.
//!
//! One criterion iteration is one message. Each sample sends its whole batch (`iters` messages)
//! from a task of the sending node and stops the clock when the receivers have counted every one
//! of them; a batch with a missing or extra message (or payload byte) panics, as does a batch
//! not delivered within 120 s. The two nodes of a backend are booted once, the first time one of
//! its benchmarks runs, and shared by both groups; at the end their counters must show no loss,
//! dead letter or failed send.
//!
//! Run: `cargo bench --bench cluster_fanout` (all), `cargo bench --bench cluster_fanout -- s2n`
//! (one backend), `cargo bench --bench cluster_fanout -- cluster_fanout/quinn/k8` (one case);
//! add `--quick` or `--measurement-time 1` for a faster, rougher run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use rusm_cluster::{Node, Pid, Transport};
use rusm_testkit::{counting_receiver, Tally};
use rusm_transport_quinn::QuinnTransport;
use rusm_transport_s2n::S2nTransport;
use tokio::runtime::Runtime;

mod common;

/// Receiving processes spawned on the second node (K = 1 uses the first of them).
const MAX_K: usize = 8;

/// Two connected nodes of one backend and `MAX_K` counting receivers on the second.
struct Cluster {
    backend: &'static str,
    sender: Node,
    receiver: Node,
    pids: Arc<[Pid]>,
    /// What the receivers have counted (messages and payload bytes, in all).
    tally: Arc<Tally>,
    sent: u64,
    sent_bytes: u64,
}

type Boot = fn(&'static str, &Runtime) -> Cluster;

const BACKENDS: [(&str, Boot); 2] = [
    ("quinn", boot::<QuinnTransport, false>),
    ("s2n", boot::<S2nTransport, false>),
];

const PER_STREAM_BACKENDS: [(&str, Boot); 2] = [
    ("quinn", boot::<QuinnTransport, true>),
    ("s2n", boot::<S2nTransport, true>),
];

fn boot<T: Transport, const PER_STREAM: bool>(backend: &'static str, rt: &Runtime) -> Cluster {
    rt.block_on(async {
        let (sender, receiver) = common::pair::<T>("sender", "receiver", PER_STREAM).await;
        let tally = Tally::new();
        let pids: Arc<[Pid]> = (0..MAX_K)
            .map(|_| counting_receiver(&receiver, tally.clone()))
            .collect();
        Cluster {
            backend,
            sender,
            receiver,
            pids,
            tally,
            sent: 0,
            sent_bytes: 0,
        }
    })
}

impl Cluster {
    /// Sends `iters` copies of `payload` round-robin to the first `k` receivers and returns the
    /// time from the first send until the last message was counted.
    fn batch(&mut self, rt: &Runtime, k: usize, payload: &Bytes, iters: u64) -> Duration {
        let sender = self.sender.clone();
        let pids = self.pids.clone();
        let tally = self.tally.clone();
        let payload = payload.clone();
        let (messages_before, bytes_before) = (self.sent, self.sent_bytes);
        let target = messages_before + iters;
        let target_bytes = bytes_before + iters * payload.len() as u64;
        let backend = self.backend;
        // The batch runs as a task on the runtime's workers, not on the thread blocked here.
        let elapsed = rt.block_on(async move {
            let task = tokio::spawn(async move {
                assert_eq!(
                    tally.messages(),
                    messages_before,
                    "{backend}: receivers counted messages that were never sent"
                );
                let start = Instant::now();
                let mut next = 0;
                for _ in 0..iters {
                    if let Err(e) = sender.send_to(&pids[next], payload.clone()).await {
                        panic!("{backend}: send to {}: {e}", pids[next]);
                    }
                    next += 1;
                    if next == k {
                        next = 0;
                    }
                }
                if let Err(short) = tally.wait_for(target, common::DEADLINE).await {
                    panic!(
                        "{backend}: lost messages: {target} sent in all, receivers counted {} \
                         after waiting {:?}",
                        short.counted, short.waited
                    );
                }
                let elapsed = start.elapsed();
                let got = tally.messages();
                assert_eq!(
                    got, target,
                    "{backend}: sent {target} messages, counted {got}"
                );
                let got_bytes = tally.bytes();
                assert_eq!(
                    got_bytes, target_bytes,
                    "{backend}: sent {target_bytes} payload bytes, counted {got_bytes}"
                );
                elapsed
            });
            task.await
                .unwrap_or_else(|e| panic!("{backend}: batch failed: {e}"))
        });
        self.sent = target;
        self.sent_bytes = target_bytes;
        elapsed
    }

    fn finish(self, rt: &Runtime) {
        let s = self.receiver.stats();
        assert_eq!(
            s.messages_received, self.sent,
            "{}: the receiving node's counters disagree",
            self.backend
        );
        println!(
            "{}: {} messages ({} payload bytes) sent and every one counted at the receivers",
            self.backend, self.sent, self.sent_bytes
        );
        rt.block_on(common::shutdown_checked(
            self.backend,
            [&self.sender, &self.receiver],
        ));
    }
}

fn size_label(size: usize) -> String {
    match size {
        s if s >= 1024 && s.is_multiple_of(1024) => format!("{}KiB", s / 1024),
        s => format!("{s}B"),
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    // One cluster per backend, booted when its first benchmark runs (a filter may skip them all).
    let mut clusters: Vec<(&'static str, Boot, Option<Cluster>)> = BACKENDS
        .iter()
        .map(|&(name, boot)| (name, boot, None))
        .collect();

    let small = Bytes::from(vec![0xab; 64]);
    let mut group = c.benchmark_group("cluster_fanout");
    group.throughput(Throughput::Elements(1));
    for (backend, boot, cluster) in &mut clusters {
        for k in [1, MAX_K] {
            group.bench_function(BenchmarkId::new(*backend, format!("k{k}")), |b| {
                let cluster = cluster.get_or_insert_with(|| boot(backend, &rt));
                b.iter_custom(|iters| cluster.batch(&rt, k, &small, iters));
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("message_size");
    for (backend, boot, cluster) in &mut clusters {
        for size in [64, 1024, 64 * 1024] {
            let payload = Bytes::from(vec![0xab; size]);
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(BenchmarkId::new(*backend, size_label(size)), |b| {
                let cluster = cluster.get_or_insert_with(|| boot(backend, &rt));
                b.iter_custom(|iters| cluster.batch(&rt, 1, &payload, iters));
            });
        }
    }
    group.finish();

    for cluster in clusters.into_iter().filter_map(|(_, _, cluster)| cluster) {
        cluster.finish(&rt);
    }

    let mut group = c.benchmark_group("per_stream_fanout");
    group.throughput(Throughput::Elements(1));
    for (backend, boot) in PER_STREAM_BACKENDS {
        let mut cluster = None;
        for k in [1, MAX_K] {
            group.bench_function(BenchmarkId::new(backend, format!("k{k}")), |b| {
                let cluster = cluster.get_or_insert_with(|| boot(backend, &rt));
                b.iter_custom(|iters| cluster.batch(&rt, k, &small, iters));
            });
        }
        if let Some(cluster) = cluster {
            cluster.finish(&rt);
        }
    }
    group.finish();
}

fn main() {
    // Modest defaults so the whole suite runs in a few minutes; command-line options
    // (`--measurement-time`, `--sample-size`, `--quick`, a filter) override them.
    let mut c = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    benches(&mut c);
    c.final_summary();
}
