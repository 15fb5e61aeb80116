//! `rusm bench-flood`: what a flood of connections that never say hello costs a node. Starts a
//! `rusm node` in a child process (so its memory is its own), links a hidden probe to it, then
//! opens `--connections` QUIC connections with a certificate the cluster trusts that finish TLS
//! and never send a hello, `--concurrency` at a time, and keeps them. Prints the node's resident
//! memory before, at peak and after the flood, how many connections were refused, and the
//! slowest answer the probe got over its established link during the flood. With `--untrusted`
//! the connections present a certificate from another CA instead, so each is refused in its TLS
//! handshake.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rusm_cluster::core::transport::{EndpointConfig, Transport, TransportTuning};
use rusm_cluster::quinn_transport::QuinnTransport;
use rusm_cluster::{ClusterCa, Node};

/// Options of `rusm bench-flood`.
#[derive(clap::Args, Debug)]
pub(crate) struct FloodArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Present a certificate the cluster does not trust (another CA's): every handshake is
    /// refused, and the flood measures what refusing costs.
    #[arg(long)]
    untrusted: bool,
    /// The flooded node's QUIC stack (the flood itself comes from quinn).
    #[arg(long, value_enum, default_value = "quinn")]
    backend: crate::node_cmd::Backend,
}

/// Resident memory of process `pid` (current, peak), in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub(crate) async fn run(args: FloodArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("rusm-bench-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = flood(&args, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn flood(args: &FloodArgs, dir: &std::path::Path) -> Result<()> {
    let ca = ClusterCa::generate("bench")?;
    ca.save(dir)?;
    ca.issue("london")?.save(dir, "london")?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["node", "--name", "london", "--listen", &addr.to_string()])
        .args(["--backend", args.backend.name()])
        .arg("--certs")
        .arg(dir)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the target node")?;
    let pid = child.id();
    let outcome = async {
        // Wait for the node to listen.
        let started = Instant::now();
        loop {
            let probe = std::net::UdpSocket::bind(addr);
            if probe.is_err() {
                break;
            }
            drop(probe);
            if started.elapsed() > Duration::from_secs(10) {
                bail!("the target node did not start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let probe = Node::builder("probe")
            .identity(ca.issue("probe")?)
            .trust(ca.trust())
            .hidden(true)
            .start()
            .await?;
        probe.connect("london", addr).await?;
        probe.attach_report("london").await?;
        let (before, _) = rss_mib(pid);

        // The probe asks for a report every 20 ms over its established link.
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let prober = {
            let probe = probe.clone();
            tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                let mut failed = 0u32;
                loop {
                    let t = Instant::now();
                    if probe.attach_report("london").await.is_err() {
                        failed += 1;
                    }
                    slowest = slowest.max(t.elapsed());
                    tokio::select! {
                        _ = &mut stop_rx => return (slowest, failed),
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
            })
        };

        let identity = if args.untrusted {
            ClusterCa::generate("mallory")?.issue("flood")?
        } else {
            ca.issue("flood")?
        };
        let flooder = QuinnTransport::bind(EndpointConfig {
            live_trust: None,
            identity,
            trust: ca.trust(),
            listen: "127.0.0.1:0".parse()?,
            tuning: TransportTuning::default(),
        })?;
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
        let t0 = Instant::now();
        let attempts = (0..args.connections).map(|_| {
            let sem = sem.clone();
            let flooder = &flooder;
            async move {
                let _permit = sem.acquire().await;
                tokio::time::timeout(Duration::from_secs(5), flooder.connect(addr, "london"))
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
        });
        let held: Vec<_> = futures_util::future::join_all(attempts).await;
        let flood_time = t0.elapsed();
        let established = held.iter().filter(|c| c.is_some()).count();
        let (_, peak) = rss_mib(pid);
        // Past the hello timeout, the node has let every one of them go.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let (after, peak_after) = rss_mib(pid);
        let _ = stop_tx.send(());
        let (slowest, failed) = prober.await?;
        let report = probe.attach_report("london").await?;
        drop(held);
        flooder.close();
        probe.shutdown().await;
        println!(
            "flood of {} {} connections ({} at a time) against a rusm node ({}), in {:.1} s",
            args.connections,
            if args.untrusted {
                "untrusted-certificate"
            } else {
                "no-hello"
            },
            args.concurrency,
            args.backend.name(),
            flood_time.as_secs_f64()
        );
        println!(
            "  connections that finished TLS: {established}; refused or failed: {}",
            args.connections - established
        );
        println!(
            "  target resident memory: {before:.1} MiB before, {:.1} MiB peak, {after:.1} MiB 6 s after",
            peak.max(peak_after)
        );
        println!(
            "  probe over its established link: slowest answer {:.1} ms, {failed} failed",
            slowest.as_secs_f64() * 1e3
        );
        for (reason, n) in &report.refusals {
            println!("  refusal {reason:<40} {n}");
        }
        anyhow::Ok(())
    }
    .await;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let _ = child.wait();
    outcome
}
