//! `rusm bench`: cross-node throughput and round trip between two nodes on loopback, in this
//! process, next to raw baselines measured in the same run: the bare QUIC stack (through the same
//! backend, TLS policy, stream limits, socket buffers and runtime) doing one uni-stream per
//! message, with no actors, no ordering and no mailboxes.
//! - `raw`: the naive receiver, reading one stream after another (the reference baseline);
//! - `raw_concurrent`: a receiver reading every stream concurrently, as our link does.
//! - `raw_delivering`: as `raw_concurrent`, but the receiver reads each payload whole and hands
//!   it to a bounded mailbox (a tokio channel, one per receiver, round-robin) that another task
//!   drains and counts: the least an actor runtime must do per message.
//! - `raw_one_stream`: every message length-prefixed on ONE uni-stream, written in batches of
//!   [`ONE_STREAM_BATCH`] bytes, parsed and counted by the receiver: the stack's ceiling.
//!
//! Our figures are printed as ratios of them. Every sent message is counted at the receiver; a
//! run that loses one fails. A failed (or stuck: see [`run_limit`]) measurement does not stop
//! the others: its figures are `NaN` in the table and `null` in the JSON, the row lists why in
//! `failures`, and the command exits with an error after printing everything.
//!
//! `--size` and `--receivers` take lists (`--size 64,1024,65536 --receivers 1,8`, or
//! `--matrix` for exactly that): one row per backend, size and receiver count.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use rusm_cluster::core::transport::{Connection, RecvStream, SendStream, Transport};
use rusm_cluster::quinn_transport::QuinnTransport;
use rusm_cluster::s2n_transport::S2nTransport;
use rusm_cluster::{ClusterCa, Node, NodeConfig};
use rusm_testkit::{Latencies, Rank, Tally, BENCH_DEADLINE};
use serde::Serialize;
use tokio::sync::mpsc;

/// Capacity of each mailbox of the `raw_delivering` baseline, in messages.
pub(crate) const MAILBOX_CAPACITY: usize = 1024;

/// The `raw_one_stream` sender writes once this many bytes of length-prefixed messages are
/// buffered (and at the end).
pub(crate) const ONE_STREAM_BATCH: usize = 64 << 10;

/// `--matrix`: these payload sizes ...
const MATRIX_SIZES: [usize; 3] = [64, 1024, 65536];
/// ... times these receiver counts.
const MATRIX_RECEIVERS: [usize; 2] = [1, 8];

/// Which backend(s) to measure.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackendChoice {
    /// quinn only.
    Quinn,
    /// s2n-quic only.
    S2n,
    /// Both, one after the other, in this process.
    Both,
}

/// The tokio runtime the nodes run on.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RuntimeMode {
    /// Both nodes on one thread: round trips without cross-core wake-ups.
    CurrentThread,
    /// A multi-thread runtime with one worker per core.
    MultiThread,
    /// Each node on a current-thread runtime of its own thread (`NodeBuilder::runtime`), as two
    /// one-core machines would run them; the raw baselines run both ends on the main thread.
    PerNode,
}

/// Options of `rusm bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Backend(s) to measure.
    #[arg(long, value_enum, default_value = "both")]
    backend: BackendChoice,
    /// Receiving processes on the other node (messages go round-robin); a comma-separated list
    /// gives a row per count.
    #[arg(long, short = 'k', value_delimiter = ',', default_value = "1")]
    receivers: Vec<usize>,
    /// Payload size in bytes; a comma-separated list gives a row per size.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    size: Vec<usize>,
    /// Shorthand for `--size 64,1024,65536 --receivers 1,8`.
    #[arg(long, conflicts_with_all = ["size", "receivers"])]
    matrix: bool,
    /// Seconds of sending in each throughput run.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Send exactly this many messages instead of sending for `--duration`.
    #[arg(long)]
    messages: Option<u64>,
    /// Ping-pong round trips to time in each run.
    #[arg(long, default_value_t = 5_000)]
    round_trips: usize,
    /// Runs per backend; the table shows medians.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Runtime mode.
    #[arg(long, value_enum, default_value = "multi-thread")]
    pub(crate) runtime: RuntimeMode,
    /// Skip the raw baselines and round trips (for profiling our own path).
    #[arg(long, hide = true)]
    only_cluster_throughput: bool,
    /// Only our round trips, one line per run (for profiling).
    #[arg(long, hide = true)]
    only_cluster_rtt: bool,
    /// Only our round trips while another process floods the same link, one line per run: the
    /// latency a small request pays under load (compare with and without `--per-stream`).
    #[arg(long, hide = true)]
    rtt_under_load: bool,
    /// Experiment: each runtime thread spins this many µs before it parks (so a wake-up that
    /// comes soon finds it running).
    #[arg(long, hide = true, default_value_t = 0)]
    pub(crate) spin_us: u64,
    /// Print one JSON array (an object per backend, size and receiver count) instead of the
    /// table.
    #[arg(long)]
    json: bool,
    /// Settings of our nodes.
    #[command(flatten)]
    nodes: NodeSettings,
}

/// How `rusm bench` configures our nodes (the raw baselines are unaffected).
#[derive(clap::Args, Clone, Copy, Debug)]
struct NodeSettings {
    /// Turn coalescing off for our runs, so every message goes on a stream of its own (by
    /// default a busy link coalesces queued messages into shared streams); the raw baselines are
    /// unchanged.
    #[arg(long)]
    per_stream: bool,
    /// Experiment: `Coalescing::direct_after_idle` in µs for our runs (default: the library's).
    #[arg(long, hide = true)]
    direct_after_idle_us: Option<u64>,
    /// Experiment: `TransportTuning::connection_receive_window` in MiB for our nodes.
    #[arg(long, hide = true)]
    window_mib: Option<u32>,
    /// Experiment: `TransportTuning::max_concurrent_uni_streams` for our nodes.
    #[arg(long, hide = true)]
    uni_streams: Option<u32>,
}

impl NodeSettings {
    /// The defaults with these settings applied.
    fn config(&self) -> NodeConfig {
        let mut config = NodeConfig::default();
        if self.per_stream {
            config.coalescing = None;
        }
        if let (Some(c), Some(us)) = (config.coalescing.as_mut(), self.direct_after_idle_us) {
            c.direct_after_idle = Some(Duration::from_micros(us));
        }
        if let Some(n) = self.uni_streams {
            config.tuning.max_concurrent_uni_streams = n;
        }
        if let Some(mib) = self.window_mib {
            config.tuning.connection_receive_window = mib << 20;
        }
        config
    }
}

/// One measured configuration: what every run function needs, taken from [`BenchArgs`] with one
/// payload size and one receiver count.
#[derive(Clone, Copy, Debug)]
struct Case {
    size: usize,
    receivers: usize,
    duration: f64,
    messages: Option<u64>,
    round_trips: usize,
    nodes: NodeSettings,
    runtime: RuntimeMode,
}

impl BenchArgs {
    /// Every (size, receivers) case asked for, sizes outermost.
    fn cases(&self) -> Vec<Case> {
        let (sizes, receivers) = if self.matrix {
            (MATRIX_SIZES.to_vec(), MATRIX_RECEIVERS.to_vec())
        } else {
            (self.size.clone(), self.receivers.clone())
        };
        let mut cases = Vec::new();
        for &size in &sizes {
            for &k in &receivers {
                cases.push(Case {
                    size,
                    receivers: k,
                    duration: self.duration,
                    messages: self.messages,
                    round_trips: self.round_trips,
                    nodes: self.nodes,
                    runtime: self.runtime,
                });
            }
        }
        cases
    }
}

/// One backend's medians for one case.
#[derive(Serialize, Debug)]
struct Row {
    backend: &'static str,
    runtime: RuntimeMode,
    size: usize,
    receivers: usize,
    coalescing: bool,
    runs: usize,
    sent: u64,
    received: u64,
    msgs_per_sec: f64,
    raw_msgs_per_sec: f64,
    throughput_ratio: f64,
    raw_concurrent_msgs_per_sec: f64,
    concurrent_ratio: f64,
    raw_delivering_msgs_per_sec: f64,
    delivering_ratio: f64,
    raw_one_stream_msgs_per_sec: f64,
    one_stream_ratio: f64,
    p50_us: f64,
    p99_us: f64,
    raw_p50_us: f64,
    raw_p99_us: f64,
    p50_ratio: f64,
    udp_rcvbuf_errors: u64,
    peak_rss_mib: f64,
    /// The measurements that failed or got stuck, and why (empty when all went through).
    failures: Vec<String>,
}

/// Runs the benchmark and prints the table (or JSON).
pub(crate) async fn run(args: BenchArgs) -> Result<()> {
    ensure!(args.repeat >= 1, "--repeat must be at least 1");
    let cases = args.cases();
    ensure!(!cases.is_empty(), "no --size or --receivers given");
    ensure!(
        cases.iter().all(|c| c.receivers >= 1),
        "--receivers must be at least 1"
    );
    ensure!(
        cases.iter().all(|c| c.size <= u32::MAX as usize),
        "--size must fit in 32 bits"
    );
    let quinn = matches!(args.backend, BackendChoice::Quinn | BackendChoice::Both);
    let s2n = matches!(args.backend, BackendChoice::S2n | BackendChoice::Both);
    if args.only_cluster_throughput || args.only_cluster_rtt || args.rtt_under_load {
        for case in &cases {
            if quinn {
                cluster_only::<QuinnTransport>(&args, case).await?;
            }
            if s2n {
                cluster_only::<S2nTransport>(&args, case).await?;
            }
        }
        return Ok(());
    }
    let mut rows = Vec::new();
    for case in &cases {
        if quinn {
            rows.push(bench_backend::<QuinnTransport>(&args, case).await?);
        }
        if s2n {
            rows.push(bench_backend::<S2nTransport>(&args, case).await?);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&args, &cases, &rows);
    }
    let failures: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.failures
                .iter()
                .map(move |f| format!("{} {} B K={}: {f}", r.backend, r.size, r.receivers))
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "{} measurement(s) failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        ))
    }
}

/// The human-readable table: one line per row, then what was measured.
fn print_table(args: &BenchArgs, cases: &[Case], rows: &[Row]) {
    println!(
        "{:<7} {:>6} {:>3} {:>10} {:>10} {:>6} {:>10} {:>6} {:>10} {:>6} {:>10} {:>6}  \
         {:>7} {:>7} {:>7} {:>6}  {:>6}",
        "backend",
        "size",
        "K",
        "msgs/s",
        "raw",
        "ratio",
        "raw conc",
        "ratio",
        "raw dlv",
        "ratio",
        "1 stream",
        "ratio",
        "p50 us",
        "p99 us",
        "raw p50",
        "ratio",
        "rcvbuf"
    );
    for r in rows {
        println!(
            "{:<7} {:>6} {:>3} {:>10.0} {:>10.0} {:>6.2} {:>10.0} {:>6.2} {:>10.0} {:>6.2} \
             {:>10.0} {:>6.2}  {:>7.1} {:>7.1} {:>7.1} {:>6.2}  {:>6}",
            r.backend,
            r.size,
            r.receivers,
            r.msgs_per_sec,
            r.raw_msgs_per_sec,
            r.throughput_ratio,
            r.raw_concurrent_msgs_per_sec,
            r.concurrent_ratio,
            r.raw_delivering_msgs_per_sec,
            r.delivering_ratio,
            r.raw_one_stream_msgs_per_sec,
            r.one_stream_ratio,
            r.p50_us,
            r.p99_us,
            r.raw_p50_us,
            r.p50_ratio,
            r.udp_rcvbuf_errors,
        );
    }
    // The last row whose own throughput run went through.
    let last_run = rows.iter().rev().find(|r| r.sent > 0);
    let list = |f: fn(&Case) -> usize| {
        let mut v: Vec<usize> = cases.iter().map(f).collect();
        v.sort_unstable();
        v.dedup();
        v.iter().map(usize::to_string).collect::<Vec<_>>().join("/")
    };
    println!(
        "{} B payloads, {} receiver(s), {:?} runtime, coalescing {}, medians of {} run(s); every \
         message counted ({} sent, {} received in our last run); raw = one stream per message, \
         read one after another; raw conc = read concurrently; raw dlv = read concurrently, \
         whole, into bounded mailboxes ({MAILBOX_CAPACITY}) drained by other tasks; 1 stream = \
         all messages length-prefixed on one stream; ratio = ours / the baseline before it; \
         rcvbuf = UDP receive-buffer drops seen by the kernel during the runs; peak RSS {:.0} MiB",
        list(|c| c.size),
        list(|c| c.receivers),
        args.runtime,
        if args.nodes.per_stream {
            "off (--per-stream)"
        } else {
            "on when busy (the default)"
        },
        args.repeat,
        last_run.map_or(0, |r| r.sent),
        last_run.map_or(0, |r| r.received),
        rows.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max),
    );
}

/// `--only-cluster-throughput` / `--only-cluster-rtt`: our throughput or round trips alone, one
/// line per run (for profiling).
async fn cluster_only<T: Transport>(args: &BenchArgs, case: &Case) -> Result<()> {
    let ca = ClusterCa::generate("bench")?;
    for _ in 0..args.repeat {
        if args.rtt_under_load {
            let (p50, p99, rate) = cluster_rtt_under_load::<T>(&ca, case).await?;
            println!(
                "{}: under load p50 {p50:.1} us, p99 {p99:.1} us, flood {rate:.0} msgs/s",
                T::NAME
            );
        } else if args.only_cluster_rtt {
            let (p50, p99) = cluster_rtt::<T>(&ca, case).await?;
            println!("{}: p50 {p50:.1} us, p99 {p99:.1} us", T::NAME);
        } else {
            let (sent, received, rate) = cluster_throughput::<T>(&ca, case).await?;
            println!(
                "{}: {rate:.0} msgs/s ({sent} sent, {received} received)",
                T::NAME
            );
        }
    }
    Ok(())
}

/// The median of `v`; `NaN` when every run of that measurement failed.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// (p50, p99) of round-trip `samples` in µs, at the rank below (as this command always has).
fn p50_p99(samples: Vec<Duration>) -> (f64, f64) {
    let l = Latencies::of(samples, Rank::Below);
    (l.p50_us, l.p99_us)
}

/// One backend, one case: `--repeat` rounds, each running every baseline and ours one after
/// the other (so a slow patch of a noisy machine hits all alike), then the medians.
async fn bench_backend<T: Transport>(args: &BenchArgs, case: &Case) -> Result<Row> {
    let ca = ClusterCa::generate("bench")?;
    let drops_before = udp_rcvbuf_errors();
    let (mut ours, mut raws, mut p50s, mut p99s, mut raw_p50s, mut raw_p99s) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut raw_concs, mut raw_dlvs, mut raw_ones) = (vec![], vec![], vec![]);
    let mut last = (0, 0);
    let mut failures = Vec::new();
    let limit = run_limit(case);
    for _ in 0..args.repeat {
        let f = &mut failures;
        let naive = raw_throughput::<T>(&ca, case, RawReceiver::Naive);
        raws.extend(measured::<T, _>(f, case, "raw", limit, naive).await);
        let conc = raw_throughput::<T>(&ca, case, RawReceiver::Concurrent);
        raw_concs.extend(measured::<T, _>(f, case, "raw_concurrent", limit, conc).await);
        let dlv = raw_throughput::<T>(&ca, case, RawReceiver::Delivering);
        raw_dlvs.extend(measured::<T, _>(f, case, "raw_delivering", limit, dlv).await);
        let one = raw_one_stream::<T>(&ca, case);
        raw_ones.extend(measured::<T, _>(f, case, "raw_one_stream", limit, one).await);
        let cluster = cluster_throughput::<T>(&ca, case);
        if let Some((sent, received, rate)) =
            measured::<T, _>(f, case, "ours", limit, cluster).await
        {
            ours.push(rate);
            last = (sent, received);
        }
        let rtt = raw_rtt::<T>(&ca, case);
        if let Some((raw50, raw99)) = measured::<T, _>(f, case, "raw_rtt", limit, rtt).await {
            raw_p50s.push(raw50);
            raw_p99s.push(raw99);
        }
        let rtt = cluster_rtt::<T>(&ca, case);
        if let Some((p50, p99)) = measured::<T, _>(f, case, "ours_rtt", limit, rtt).await {
            p50s.push(p50);
            p99s.push(p99);
        }
    }
    let (msgs, raw, p50, raw_p50) = (median(ours), median(raws), median(p50s), median(raw_p50s));
    let (raw_conc, raw_dlv, raw_one) = (median(raw_concs), median(raw_dlvs), median(raw_ones));
    Ok(Row {
        backend: T::NAME,
        runtime: args.runtime,
        size: case.size,
        receivers: case.receivers,
        coalescing: !case.nodes.per_stream,
        runs: args.repeat,
        sent: last.0,
        received: last.1,
        msgs_per_sec: msgs,
        raw_msgs_per_sec: raw,
        throughput_ratio: msgs / raw,
        raw_concurrent_msgs_per_sec: raw_conc,
        concurrent_ratio: msgs / raw_conc,
        raw_delivering_msgs_per_sec: raw_dlv,
        delivering_ratio: msgs / raw_dlv,
        raw_one_stream_msgs_per_sec: raw_one,
        one_stream_ratio: msgs / raw_one,
        p50_us: p50,
        p99_us: median(p99s),
        raw_p50_us: raw_p50,
        raw_p99_us: median(raw_p99s),
        p50_ratio: p50 / raw_p50,
        udp_rcvbuf_errors: udp_rcvbuf_errors().saturating_sub(drops_before),
        peak_rss_mib: peak_rss_mib(),
        failures,
    })
}

/// How long one measurement may take before it counts as stuck: with `--duration`, five times
/// the sending time plus 20 s to drain; with `--messages`, no limit beyond the runs' own.
/// (A receiver that reads streams one after another can deadlock for good on large messages:
/// the connection's flow-control credit goes to later streams it does not read yet, and the
/// sender then waits for stream credit forever.)
fn run_limit(case: &Case) -> Option<Duration> {
    match case.messages {
        Some(_) => None,
        None => Some(Duration::from_secs_f64(case.duration * 5.0 + 20.0)),
    }
}

/// Runs one measurement within `limit`: its result, or `None` with the reason added to
/// `failures` (the measurement's tasks, connections and nodes are dropped with the future).
async fn measured<T: Transport, X>(
    failures: &mut Vec<String>,
    case: &Case,
    what: &str,
    limit: Option<Duration>,
    run: impl Future<Output = Result<X>>,
) -> Option<X> {
    tracing::debug!(backend = T::NAME, ?case, "bench: {what}");
    let result = match limit {
        Some(limit) => match tokio::time::timeout(limit, run).await {
            Ok(result) => result,
            Err(_) => Err(anyhow!("no result after {limit:?}, given up")),
        },
        None => run.await,
    };
    match result {
        Ok(x) => Some(x),
        Err(e) => {
            tracing::warn!(backend = T::NAME, ?case, "bench: {what} failed: {e:#}");
            failures.push(format!("{what}: {e:#}"));
            None
        }
    }
}

/// A spawned task aborted when this is dropped (so a measurement given up on leaves none
/// behind).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `sender` connected to `receiver`, once both ends see the link.
async fn nodes<T: Transport>(ca: &ClusterCa, case: &Case) -> Result<(Node, Node)> {
    let config = case.nodes.config();
    if case.runtime == RuntimeMode::PerNode {
        return per_node_pair::<T>(ca, config).await;
    }
    Ok(rusm_testkit::linked_pair::<T>(ca, "sender", "receiver", config, BENCH_DEADLINE).await?)
}

/// `--runtime per-node`: the receiver runs on a current-thread runtime of its own thread, the
/// sender on the main thread's.
async fn per_node_pair<T: Transport>(ca: &ClusterCa, config: NodeConfig) -> Result<(Node, Node)> {
    let receiver = rusm_cluster::NodeBuilder::<T>::new("receiver")
        .identity(ca.issue("receiver")?)
        .trust(ca.trust())
        .config(config.clone())
        .runtime(node_thread())
        .start()
        .await?;
    let sender = rusm_testkit::start_node::<T>(ca, "sender", config).await?;
    rusm_testkit::link::<T>(&sender, &receiver, BENCH_DEADLINE).await?;
    Ok((sender, receiver))
}

/// `--spin-us`, for runtimes the bench builds itself.
pub(crate) static SPIN_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `--spin-us`: every thread of the runtime `builder` makes busy-waits that long before it
/// parks.
pub(crate) fn spin_before_park(builder: &mut tokio::runtime::Builder) {
    let spin = Duration::from_micros(SPIN_US.load(std::sync::atomic::Ordering::Relaxed));
    if !spin.is_zero() {
        builder.on_thread_park(move || {
            let start = Instant::now();
            while start.elapsed() < spin {
                std::hint::spin_loop();
            }
        });
    }
}

/// The runtime of the second node in `--runtime per-node`: current-thread, on a thread of its
/// own that lives as long as the process.
fn node_thread() -> tokio::runtime::Handle {
    static HANDLE: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let mut builder = tokio::runtime::Builder::new_current_thread();
            spin_before_park(&mut builder);
            let rt = builder
                .enable_all()
                .build()
                .expect("a current-thread runtime");
            let handle = rt.handle().clone();
            std::thread::Builder::new()
                .name("rusm-bench-node".into())
                .spawn(move || rt.block_on(std::future::pending::<()>()))
                .expect("the node's thread");
            handle
        })
        .clone()
}

/// Round trips between two processes while a task floods a third process over the same link
/// with messages of `--size` bytes; returns (p50, p99) in µs and the flood's messages/s.
async fn cluster_rtt_under_load<T: Transport>(
    ca: &ClusterCa,
    case: &Case,
) -> Result<(f64, f64, f64)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (a, b) = nodes::<T>(ca, case).await?;
    let received = Tally::new();
    let sink = rusm_testkit::counting_receiver(&b, received.clone());
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flood = {
        let (a, stop) = (a.clone(), stop.clone());
        let payload = Bytes::from(vec![0xab; case.size]);
        tokio::spawn(async move {
            let start = Instant::now();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if a.send_to(&sink, payload.clone()).await.is_err() {
                    break;
                }
                sent += 1;
            }
            (sent, start.elapsed())
        })
    };
    // Let the flood fill the pipes before timing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let echo = rusm_testkit::echo(&b);
    let n = case.round_trips.max(10);
    let ping = Bytes::from(vec![0xcd; 64]);
    let samples = rusm_testkit::round_trips(&a, &echo, ping, n as u64, true, BENCH_DEADLINE)
        .await?
        .samples;
    stop.store(true, Ordering::Relaxed);
    let (sent, took) = flood.await?;
    received.wait_for(sent, BENCH_DEADLINE).await?;
    a.shutdown().await;
    b.shutdown().await;
    let (p50, p99) = p50_p99(samples);
    Ok((p50, p99, sent as f64 / took.as_secs_f64()))
}

/// Sends for `--duration` (or `--messages`), then waits until the receivers counted every one.
/// Returns (sent, received, messages/s from the first send to the last receive).
async fn cluster_throughput<T: Transport>(ca: &ClusterCa, case: &Case) -> Result<(u64, u64, f64)> {
    let (a, b) = nodes::<T>(ca, case).await?;
    let received = Tally::new();
    let pids: Vec<_> = (0..case.receivers)
        .map(|_| rusm_testkit::counting_receiver(&b, received.clone()))
        .collect();
    let payload = Bytes::from(vec![0xab; case.size]);
    let start = Instant::now();
    let mut sent = 0u64;
    while keep_sending(case, sent, start) {
        let to = &pids[(sent % pids.len() as u64) as usize];
        a.send_to(to, payload.clone()).await?;
        sent += 1;
    }
    received.wait_for(sent, BENCH_DEADLINE).await?;
    let elapsed = start.elapsed();
    let got = received.messages();
    a.shutdown().await;
    b.shutdown().await;
    ensure!(got == sent, "sent {sent} but received {got}");
    Ok((sent, got, sent as f64 / elapsed.as_secs_f64()))
}

/// Whether a throughput run goes on: until `--messages` are sent, or for `--duration` (the clock
/// is read every 256 messages).
fn keep_sending(case: &Case, sent: u64, start: Instant) -> bool {
    match case.messages {
        Some(n) => sent < n,
        None => {
            !sent.is_multiple_of(256) || start.elapsed() < Duration::from_secs_f64(case.duration)
        }
    }
}

/// Ping-pong between a process on each node. Returns (p50, p99) in µs.
async fn cluster_rtt<T: Transport>(ca: &ClusterCa, case: &Case) -> Result<(f64, f64)> {
    let (a, b) = nodes::<T>(ca, case).await?;
    let echo = rusm_testkit::echo(&b);
    let n = case.round_trips.max(10);
    let ping = Bytes::from(vec![0xcd; case.size]);
    let samples = rusm_testkit::round_trips(&a, &echo, ping, n as u64, true, BENCH_DEADLINE)
        .await?
        .samples;
    a.shutdown().await;
    b.shutdown().await;
    ensure!(
        samples.len() == n,
        "only {} of {n} round trips completed",
        samples.len()
    );
    Ok(p50_p99(samples))
}

// ---- the raw baseline: the bare stack through the same backend, TLS and limits -------------

async fn raw_pair<T: Transport>(ca: &ClusterCa) -> Result<(T, T, T::Connection, T::Connection)> {
    let bind = |name: &str| -> Result<T> { Ok(rusm_testkit::bind_endpoint(ca.issue(name)?, ca)?) };
    let server = bind("raw-server")?;
    let client = bind("raw-client")?;
    let addr = server.local_addr()?;
    let (dialled, accepted) = tokio::join!(client.connect(addr, "raw-server"), async {
        match server.accept().await {
            Some(incoming) => incoming.await.map_err(anyhow::Error::from),
            None => bail!("server endpoint closed"),
        }
    });
    let (dialled, accepted) = (dialled?, accepted?);
    // A link grants the peer its full stream credit once the hello is accepted; the raw path
    // has no hello, so it grants it at once (else quinn keeps it at the pre-hello minimum).
    dialled.grant_stream_credit();
    accepted.grant_stream_credit();
    Ok((server, client, dialled, accepted))
}

async fn read_to_end<R: RecvStream>(mut s: R) -> usize {
    let mut n = 0;
    while let Ok(Some(chunk)) = s.read_chunk().await {
        n += chunk.len();
    }
    n
}

async fn raw_send<C: Connection>(conn: &C, payload: &Bytes) -> Result<()> {
    let mut s = conn.open_uni().await?;
    s.write(payload.clone()).await?;
    s.finish()?;
    Ok(())
}

/// Reads a stream to its end and returns its data in one piece (without a copy when the stack
/// gave it in one chunk, as it does for small messages).
async fn read_whole<R: RecvStream>(mut s: R) -> Bytes {
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    while let Ok(Some(chunk)) = s.read_chunk().await {
        if first.is_none() && joined.is_empty() {
            first = Some(chunk);
            continue;
        }
        if let Some(f) = first.take() {
            joined.extend_from_slice(&f);
        }
        joined.extend_from_slice(&chunk);
    }
    first.unwrap_or_else(|| joined.freeze())
}

/// How the receiver of a one-stream-per-message raw baseline treats its streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RawReceiver {
    /// One stream after another, counting bytes (`raw`).
    Naive,
    /// Every stream concurrently, counting bytes (`raw_concurrent`).
    Concurrent,
    /// Every stream concurrently, each read whole and sent into a bounded mailbox that another
    /// task drains and counts (`raw_delivering`).
    Delivering,
}

/// The raw stack: one sender writing one uni-stream per message in sequence; the receiver as
/// `receiver` says. Returns messages/s from the first send to the last count.
async fn raw_throughput<T: Transport>(
    ca: &ClusterCa,
    case: &Case,
    receiver: RawReceiver,
) -> Result<f64> {
    let (server, client, out, inc) = raw_pair::<T>(ca).await?;
    let received = Tally::new();
    let counter = received.clone();
    // `Delivering`: one bounded mailbox per receiver, each drained by a task of its own.
    let mut mailboxes = Vec::new();
    let mut consumers = Vec::new();
    if receiver == RawReceiver::Delivering {
        for _ in 0..case.receivers {
            let (tx, mut rx) = mpsc::channel::<Bytes>(MAILBOX_CAPACITY);
            let counter = counter.clone();
            mailboxes.push(tx);
            consumers.push(AbortOnDrop(tokio::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    let len = msg.len() as u64;
                    drop(msg);
                    counter.count(len);
                }
            })));
        }
    }
    let reader = AbortOnDrop(tokio::spawn(async move {
        match receiver {
            RawReceiver::Naive => {
                while let Ok(Some(s)) = inc.accept_uni().await {
                    let n = read_to_end(s).await;
                    counter.count(n as u64);
                }
            }
            RawReceiver::Concurrent => {
                let mut reads = FuturesUnordered::new();
                loop {
                    tokio::select! {
                        Some(n) = reads.next(), if !reads.is_empty() => {
                            counter.count(n as u64);
                        }
                        s = inc.accept_uni() => match s {
                            Ok(Some(s)) => reads.push(read_to_end(s)),
                            _ => break,
                        },
                    }
                }
            }
            RawReceiver::Delivering => {
                let mut reads = FuturesUnordered::new();
                let mut next = 0usize;
                loop {
                    tokio::select! {
                        Some(msg) = reads.next(), if !reads.is_empty() => {
                            // Round-robin, as the sender of our runs addresses its receivers.
                            let mailbox: &mpsc::Sender<Bytes> = &mailboxes[next % mailboxes.len()];
                            next = next.wrapping_add(1);
                            if mailbox.send(msg).await.is_err() {
                                break;
                            }
                        }
                        s = inc.accept_uni() => match s {
                            Ok(Some(s)) => reads.push(read_whole(s)),
                            _ => break,
                        },
                    }
                }
            }
        }
    }));
    let payload = Bytes::from(vec![0xab; case.size]);
    let start = Instant::now();
    let mut sent = 0u64;
    while keep_sending(case, sent, start) {
        raw_send(&out, &payload).await?;
        sent += 1;
    }
    received.wait_for(sent, BENCH_DEADLINE).await?;
    let rate = sent as f64 / start.elapsed().as_secs_f64();
    out.close(0, b"done");
    drop((reader, consumers));
    client.close();
    server.close();
    Ok(rate)
}

/// Splits a byte stream of messages, each prefixed with its length (u32, big-endian), into the
/// messages, whatever the chunk boundaries. Whole messages inside a chunk are not copied.
#[derive(Default, Debug)]
struct LengthPrefixed {
    /// The start of a message split across chunks.
    pending: BytesMut,
}

impl LengthPrefixed {
    /// Feeds the next chunk; calls `message` with each message it completes, in order.
    fn feed(&mut self, mut chunk: Bytes, mut message: impl FnMut(Bytes)) {
        if !self.pending.is_empty() {
            if self.pending.len() < 4 {
                let take = (4 - self.pending.len()).min(chunk.len());
                self.pending.extend_from_slice(&chunk.split_to(take));
                if self.pending.len() < 4 {
                    return;
                }
            }
            let whole = 4 + frame_len(&self.pending);
            let take = (whole - self.pending.len()).min(chunk.len());
            self.pending.extend_from_slice(&chunk.split_to(take));
            if self.pending.len() < whole {
                return;
            }
            self.pending.advance(4);
            message(self.pending.split().freeze());
        }
        while chunk.len() >= 4 && chunk.len() >= 4 + frame_len(&chunk) {
            let len = frame_len(&chunk);
            chunk.advance(4);
            message(chunk.split_to(len));
        }
        self.pending.extend_from_slice(&chunk);
    }
}

/// The length in a message's 4-byte prefix at the start of `buf` (at least 4 bytes long).
fn frame_len(buf: &[u8]) -> usize {
    u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

/// The stack's ceiling: every message length-prefixed on one uni-stream, written in batches of
/// [`ONE_STREAM_BATCH`] bytes (a payload that size or larger is written as is, after its
/// prefix, without a copy); the receiver splits and counts them. Returns messages/s from the
/// first send to the last count.
async fn raw_one_stream<T: Transport>(ca: &ClusterCa, case: &Case) -> Result<f64> {
    let (server, client, out, inc) = raw_pair::<T>(ca).await?;
    let received = Tally::new();
    let counter = received.clone();
    let reader = AbortOnDrop(tokio::spawn(async move {
        let Ok(Some(mut s)) = inc.accept_uni().await else {
            return;
        };
        let mut frames = LengthPrefixed::default();
        while let Ok(Some(chunk)) = s.read_chunk().await {
            frames.feed(chunk, |msg| counter.count(msg.len() as u64));
        }
    }));
    let payload = Bytes::from(vec![0xab; case.size]);
    let large = payload.len() >= ONE_STREAM_BATCH;
    let start = Instant::now();
    let mut s = out.open_uni().await?;
    let mut buf = BytesMut::with_capacity(ONE_STREAM_BATCH + 4 + payload.len());
    let mut sent = 0u64;
    while keep_sending(case, sent, start) {
        buf.put_u32(payload.len() as u32);
        if large {
            s.write_all_chunks(&mut [buf.split().freeze(), payload.clone()])
                .await?;
        } else {
            buf.extend_from_slice(&payload);
            if buf.len() >= ONE_STREAM_BATCH {
                s.write(buf.split().freeze()).await?;
                buf.reserve(ONE_STREAM_BATCH + 4 + payload.len());
            }
        }
        sent += 1;
    }
    if !buf.is_empty() {
        s.write(buf.split().freeze()).await?;
    }
    s.finish()?;
    received.wait_for(sent, BENCH_DEADLINE).await?;
    let rate = sent as f64 / start.elapsed().as_secs_f64();
    out.close(0, b"done");
    drop(reader);
    client.close();
    server.close();
    Ok(rate)
}

/// Raw ping-pong: a uni-stream each way per round trip. Returns (p50, p99) in µs.
async fn raw_rtt<T: Transport>(ca: &ClusterCa, case: &Case) -> Result<(f64, f64)> {
    let (server, client, out, inc) = raw_pair::<T>(ca).await?;
    let echo = AbortOnDrop(tokio::spawn(async move {
        while let Ok(Some(s)) = inc.accept_uni().await {
            let n = read_to_end(s).await;
            if raw_send(&inc, &Bytes::from(vec![0xcd; n])).await.is_err() {
                break;
            }
        }
    }));
    let ping = Bytes::from(vec![0xcd; case.size]);
    let n = case.round_trips.max(10);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        raw_send(&out, &ping).await?;
        let Ok(Some(s)) = out.accept_uni().await else {
            bail!("raw echo stopped");
        };
        read_to_end(s).await;
        samples.push(t.elapsed());
    }
    out.close(0, b"done");
    drop(echo);
    client.close();
    server.close();
    Ok(p50_p99(samples))
}

/// The kernel's count of UDP packets dropped for a full receive buffer (all sockets).
fn udp_rcvbuf_errors() -> u64 {
    let Ok(snmp) = std::fs::read_to_string("/proc/net/snmp") else {
        return 0;
    };
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// This process's peak resident memory in MiB (VmHWM), 0 where unknown.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(messages: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            out.extend_from_slice(&(m.len() as u32).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    #[test]
    fn length_prefixed_messages_survive_any_chunking() {
        let messages: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; i as usize * 7]).collect();
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        let stream = framed(&refs);
        for chunk_size in [1, 2, 3, 4, 5, 7, 64, 1000, stream.len()] {
            let mut frames = LengthPrefixed::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(chunk_size) {
                frames.feed(Bytes::copy_from_slice(chunk), |m| got.push(m.to_vec()));
            }
            assert_eq!(got, messages, "chunks of {chunk_size}");
            assert!(frames.pending.is_empty());
        }
    }

    #[test]
    fn lists_and_the_matrix_make_one_case_per_size_and_receiver_count() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let cases = |argv: &[&str]| -> Vec<(usize, usize)> {
            let cli =
                Cli::try_parse_from(std::iter::once("bench").chain(argv.iter().copied())).unwrap();
            cli.bench
                .cases()
                .iter()
                .map(|c| (c.size, c.receivers))
                .collect()
        };
        assert_eq!(cases(&[]), [(64, 1)]);
        assert_eq!(
            cases(&["--size", "64,1024", "-k", "1,8"]),
            [(64, 1), (64, 8), (1024, 1), (1024, 8)]
        );
        assert_eq!(cases(&["--matrix"]).len(), 6);
        assert!(Cli::try_parse_from(["bench", "--matrix", "--size", "64"]).is_err());
    }
}
