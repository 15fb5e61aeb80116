//! `rusm bench`: cross-node throughput and round trip between two nodes on loopback, in this
//! process. Every sent message is counted at the receiver; a run that loses one fails.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use rusm_cluster::{ClusterCa, Node};

/// Options of `rusm bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Messages to send in the throughput run.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Receiving processes on the other node (messages go round-robin).
    #[arg(long, default_value_t = 1)]
    receivers: usize,
    /// Ping-pong round trips to time.
    #[arg(long, default_value_t = 5_000)]
    round_trips: usize,
}

async fn start(ca: &ClusterCa, name: &str) -> Result<Node> {
    Ok(Node::builder(name)
        .identity(ca.issue(name)?)
        .trust(ca.trust())
        .start()
        .await?)
}

/// Runs the benchmark and prints a small table.
pub(crate) async fn run(args: BenchArgs) -> Result<()> {
    let ca = ClusterCa::generate("bench")?;
    let a = start(&ca, "sender").await?;
    let b = start(&ca, "receiver").await?;
    a.connect("receiver", b.local_addr()).await?;

    // Throughput: one sender, K receivers.
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let k = args.receivers.max(1);
    let mut pids = Vec::with_capacity(k);
    for _ in 0..k {
        let received = received.clone();
        let done = done.clone();
        let total = args.messages;
        pids.push(b.spawn(|mut ctx| async move {
            while ctx.recv().await.is_some() {
                if received.fetch_add(1, Ordering::Relaxed) + 1 == total {
                    done.notify_one();
                }
            }
        }));
    }
    let payload = Bytes::from(vec![0xab; args.size]);
    let finished = done.notified();
    let start = Instant::now();
    for i in 0..args.messages {
        let to = &pids[(i % k as u64) as usize];
        a.send_to(to, payload.clone()).await?;
    }
    tokio::time::timeout(Duration::from_secs(120), finished)
        .await
        .context("not every message arrived within 120 s")?;
    let elapsed = start.elapsed();
    let got = received.load(Ordering::Relaxed);
    ensure!(
        got == args.messages,
        "sent {} but received {got}",
        args.messages
    );
    let rate = args.messages as f64 / elapsed.as_secs_f64();

    // Round trip: ping-pong between a process on each node.
    let echo = b.spawn(|mut ctx| async move {
        while let Some(m) = ctx.recv().await {
            if let Some(from) = m.from().cloned() {
                let _ = ctx.send_to(&from, m.into_payload()).await;
            }
        }
    });
    let n = args.round_trips.max(1);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ping = payload.clone();
    a.spawn(move |mut ctx| async move {
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            if ctx.send_to(&echo, ping.clone()).await.is_err() || ctx.recv().await.is_none() {
                break;
            }
            samples.push(t.elapsed());
        }
        let _ = tx.send(samples);
    });
    let mut samples = tokio::time::timeout(Duration::from_secs(120), rx)
        .await
        .context("round trips did not finish within 120 s")??;
    ensure!(
        samples.len() == n,
        "only {} of {n} round trips completed",
        samples.len()
    );
    samples.sort();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;

    println!("backend   size  receivers  messages   msgs/s      p50 rtt   p99 rtt");
    println!(
        "{:<9} {:<5} {:<10} {:<10} {:<11.0} {:<9} {:<9}",
        "quinn",
        args.size,
        k,
        args.messages,
        rate,
        format!("{:.1}us", pct(0.50)),
        format!("{:.1}us", pct(0.99)),
    );
    println!(
        "(tokio multi-thread runtime, both nodes in this process on 127.0.0.1; every message counted: {got}/{})",
        args.messages
    );
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}
