//! `rusm bench`: cross-node throughput and round trip between two nodes on loopback, in this
//! process, next to raw baselines measured in the same run: the bare QUIC stack (through the same
//! backend, TLS policy, stream limits, socket buffers and runtime) doing one uni-stream per
//! message, with no actors, no ordering and no mailboxes.
//! - `raw`: the naive receiver, reading one stream after another (the reference baseline);
//! - `raw_concurrent`: a receiver reading every stream concurrently, as our link does.
//!
//! Our figures are printed as ratios of them. Every sent message is counted at the receiver; a
//! run that loses one fails.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rusm_cluster::core::transport::{Connection, RecvStream, SendStream, Transport};
use rusm_cluster::quinn_transport::QuinnTransport;
use rusm_cluster::s2n_transport::S2nTransport;
use rusm_cluster::{ClusterCa, Coalescing, Node, NodeConfig};
use rusm_testkit::{Latencies, Rank, Tally, BENCH_DEADLINE};
use serde::Serialize;

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
}

/// Options of `rusm bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Backend(s) to measure.
    #[arg(long, value_enum, default_value = "both")]
    backend: BackendChoice,
    /// Receiving processes on the other node (messages go round-robin).
    #[arg(long, short = 'k', default_value_t = 1)]
    receivers: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
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
    /// Print one JSON array (an object per backend) instead of the table.
    #[arg(long)]
    json: bool,
    /// Turn on opt-in coalescing (queued messages to the peer share streams) for our runs; the
    /// raw baselines are unchanged.
    #[arg(long)]
    coalesce: bool,
}

/// One backend's medians.
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
    p50_us: f64,
    p99_us: f64,
    raw_p50_us: f64,
    raw_p99_us: f64,
    p50_ratio: f64,
    udp_rcvbuf_errors: u64,
    peak_rss_mib: f64,
}

/// Runs the benchmark and prints the table (or JSON).
pub(crate) async fn run(args: BenchArgs) -> Result<()> {
    ensure!(args.repeat >= 1, "--repeat must be at least 1");
    ensure!(args.receivers >= 1, "--receivers must be at least 1");
    if args.only_cluster_throughput || args.only_cluster_rtt {
        if matches!(args.backend, BackendChoice::Quinn | BackendChoice::Both) {
            cluster_only::<QuinnTransport>(&args).await?;
        }
        if matches!(args.backend, BackendChoice::S2n | BackendChoice::Both) {
            cluster_only::<S2nTransport>(&args).await?;
        }
        return Ok(());
    }
    let mut rows = Vec::new();
    if matches!(args.backend, BackendChoice::Quinn | BackendChoice::Both) {
        rows.push(bench_backend::<QuinnTransport>(&args).await?);
    }
    if matches!(args.backend, BackendChoice::S2n | BackendChoice::Both) {
        rows.push(bench_backend::<S2nTransport>(&args).await?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<7} {:>10} {:>10} {:>6} {:>10} {:>6}  {:>7} {:>7} {:>7} {:>6}  {:>6}",
        "backend",
        "msgs/s",
        "raw",
        "ratio",
        "raw conc",
        "ratio",
        "p50 us",
        "p99 us",
        "raw p50",
        "ratio",
        "rcvbuf"
    );
    for r in &rows {
        println!(
            "{:<7} {:>10.0} {:>10.0} {:>6.2} {:>10.0} {:>6.2}  {:>7.1} {:>7.1} {:>7.1} {:>6.2}  {:>6}",
            r.backend,
            r.msgs_per_sec,
            r.raw_msgs_per_sec,
            r.throughput_ratio,
            r.raw_concurrent_msgs_per_sec,
            r.concurrent_ratio,
            r.p50_us,
            r.p99_us,
            r.raw_p50_us,
            r.p50_ratio,
            r.udp_rcvbuf_errors,
        );
    }
    println!(
        "{} B payloads, {} receiver(s), {:?} runtime, coalescing {}, medians of {} run(s); every \
         message counted ({} sent, {} received in the last run); rcvbuf = UDP receive-buffer \
         drops seen by the kernel during the runs; peak RSS {:.0} MiB",
        args.size,
        args.receivers,
        args.runtime,
        if args.coalesce { "on" } else { "off" },
        args.repeat,
        rows.last().map_or(0, |r| r.sent),
        rows.last().map_or(0, |r| r.received),
        rows.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max),
    );
    Ok(())
}

/// `--only-cluster-throughput` / `--only-cluster-rtt`: our throughput or round trips alone, one
/// line per run (for profiling).
async fn cluster_only<T: Transport>(args: &BenchArgs) -> Result<()> {
    let ca = ClusterCa::generate("bench")?;
    for _ in 0..args.repeat {
        if args.only_cluster_rtt {
            let (p50, p99) = cluster_rtt::<T>(&ca, args).await?;
            println!("{}: p50 {p50:.1} us, p99 {p99:.1} us", T::NAME);
        } else {
            let (sent, received, rate) = cluster_throughput::<T>(&ca, args).await?;
            println!(
                "{}: {rate:.0} msgs/s ({sent} sent, {received} received)",
                T::NAME
            );
        }
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// (p50, p99) of round-trip `samples` in µs, at the rank below (as this command always has).
fn p50_p99(samples: Vec<Duration>) -> (f64, f64) {
    let l = Latencies::of(samples, Rank::Below);
    (l.p50_us, l.p99_us)
}

async fn bench_backend<T: Transport>(args: &BenchArgs) -> Result<Row> {
    let ca = ClusterCa::generate("bench")?;
    let drops_before = udp_rcvbuf_errors();
    let (mut ours, mut raws, mut p50s, mut p99s, mut raw_p50s, mut raw_p99s) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut raw_concs = vec![];
    let mut last = (0, 0);
    for _ in 0..args.repeat {
        let raw = raw_throughput::<T>(&ca, args, false).await?;
        raw_concs.push(raw_throughput::<T>(&ca, args, true).await?);
        let (sent, received, rate) = cluster_throughput::<T>(&ca, args).await?;
        let (raw50, raw99) = raw_rtt::<T>(&ca, args).await?;
        let (p50, p99) = cluster_rtt::<T>(&ca, args).await?;
        ours.push(rate);
        raws.push(raw);
        p50s.push(p50);
        p99s.push(p99);
        raw_p50s.push(raw50);
        raw_p99s.push(raw99);
        last = (sent, received);
    }
    let (msgs, raw, p50, raw_p50) = (median(ours), median(raws), median(p50s), median(raw_p50s));
    let raw_conc = median(raw_concs);
    Ok(Row {
        backend: T::NAME,
        runtime: args.runtime,
        size: args.size,
        receivers: args.receivers,
        coalescing: args.coalesce,
        runs: args.repeat,
        sent: last.0,
        received: last.1,
        msgs_per_sec: msgs,
        raw_msgs_per_sec: raw,
        throughput_ratio: msgs / raw,
        raw_concurrent_msgs_per_sec: raw_conc,
        concurrent_ratio: msgs / raw_conc,
        p50_us: p50,
        p99_us: median(p99s),
        raw_p50_us: raw_p50,
        raw_p99_us: median(raw_p99s),
        p50_ratio: p50 / raw_p50,
        udp_rcvbuf_errors: udp_rcvbuf_errors().saturating_sub(drops_before),
        peak_rss_mib: peak_rss_mib(),
    })
}

/// `sender` connected to `receiver`, once both ends see the link.
async fn nodes<T: Transport>(ca: &ClusterCa, args: &BenchArgs) -> Result<(Node, Node)> {
    let mut config = NodeConfig::default();
    if args.coalesce {
        config.coalescing = Some(Coalescing::default());
    }
    Ok(rusm_testkit::linked_pair::<T>(ca, "sender", "receiver", config, BENCH_DEADLINE).await?)
}

/// Sends for `--duration` (or `--messages`), then waits until the receivers counted every one.
/// Returns (sent, received, messages/s from the first send to the last receive).
async fn cluster_throughput<T: Transport>(
    ca: &ClusterCa,
    args: &BenchArgs,
) -> Result<(u64, u64, f64)> {
    let (a, b) = nodes::<T>(ca, args).await?;
    let received = Tally::new();
    let pids: Vec<_> = (0..args.receivers)
        .map(|_| rusm_testkit::counting_receiver(&b, received.clone()))
        .collect();
    let payload = Bytes::from(vec![0xab; args.size]);
    let start = Instant::now();
    let mut sent = 0u64;
    while keep_sending(args, sent, start) {
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
fn keep_sending(args: &BenchArgs, sent: u64, start: Instant) -> bool {
    match args.messages {
        Some(n) => sent < n,
        None => {
            !sent.is_multiple_of(256) || start.elapsed() < Duration::from_secs_f64(args.duration)
        }
    }
}

/// Ping-pong between a process on each node. Returns (p50, p99) in µs.
async fn cluster_rtt<T: Transport>(ca: &ClusterCa, args: &BenchArgs) -> Result<(f64, f64)> {
    let (a, b) = nodes::<T>(ca, args).await?;
    let echo = rusm_testkit::echo(&b);
    let n = args.round_trips.max(10);
    let ping = Bytes::from(vec![0xcd; args.size]);
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
    Ok((server, client, dialled?, accepted?))
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

/// The raw stack: one sender writing one uni-stream per message in sequence; the receiver reads
/// one stream after another (naive) or all of them concurrently. Returns messages/s.
async fn raw_throughput<T: Transport>(
    ca: &ClusterCa,
    args: &BenchArgs,
    concurrent: bool,
) -> Result<f64> {
    let (server, client, out, inc) = raw_pair::<T>(ca).await?;
    let received = Tally::new();
    let counter = received.clone();
    let reader = tokio::spawn(async move {
        if !concurrent {
            while let Ok(Some(s)) = inc.accept_uni().await {
                let n = read_to_end(s).await;
                counter.count(n as u64);
            }
            return;
        }
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
    });
    let payload = Bytes::from(vec![0xab; args.size]);
    let start = Instant::now();
    let mut sent = 0u64;
    while keep_sending(args, sent, start) {
        raw_send(&out, &payload).await?;
        sent += 1;
    }
    received.wait_for(sent, BENCH_DEADLINE).await?;
    let rate = sent as f64 / start.elapsed().as_secs_f64();
    out.close(0, b"done");
    reader.abort();
    client.close();
    server.close();
    Ok(rate)
}

/// Raw ping-pong: a uni-stream each way per round trip. Returns (p50, p99) in µs.
async fn raw_rtt<T: Transport>(ca: &ClusterCa, args: &BenchArgs) -> Result<(f64, f64)> {
    let (server, client, out, inc) = raw_pair::<T>(ca).await?;
    let echo = tokio::spawn(async move {
        while let Ok(Some(s)) = inc.accept_uni().await {
            let n = read_to_end(s).await;
            if raw_send(&inc, &Bytes::from(vec![0xcd; n])).await.is_err() {
                break;
            }
        }
    });
    let ping = Bytes::from(vec![0xcd; args.size]);
    let n = args.round_trips.max(10);
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
    echo.abort();
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
