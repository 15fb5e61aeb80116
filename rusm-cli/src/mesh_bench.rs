//! `rusm bench-mesh`: how fast a cluster forms and agrees on its global names. Each run starts
//! `--nodes` nodes on loopback in this process; each registers one global name, then every node
//! but the first connects to the first only, at once. The run's time is from those connects
//! until every node sees every other as a peer (the mesh made the rest of the links) and
//! resolves every node's global name. Also prints what one registration costs on the wire.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use rusm_cluster::core::registry::{encode_update, Claim, Op, Update, CAPABILITY};
use rusm_cluster::core::transport::Transport;
use rusm_cluster::core::wire::{encode_frame, Frame};
use rusm_cluster::quinn_transport::QuinnTransport;
use rusm_cluster::s2n_transport::S2nTransport;
use rusm_cluster::{ClusterCa, Node};
use rusm_testkit::{node, BENCH_DEADLINE};
use serde::Serialize;

use crate::bench::BackendChoice;

/// Options of `rusm bench-mesh`.
#[derive(clap::Args, Debug)]
pub(crate) struct MeshArgs {
    /// Backend(s) to measure.
    #[arg(long, value_enum, default_value = "quinn")]
    backend: BackendChoice,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Runs per backend; the table shows the median, min and max.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Debug)]
struct Row {
    backend: &'static str,
    nodes: usize,
    runs: usize,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    /// Control frames one registration sends (one per peer).
    frames_per_registration: usize,
    /// Bytes of each such frame on the control stream (length prefix included; QUIC and TLS
    /// overhead not included).
    bytes_per_frame: usize,
}

pub(crate) async fn run(args: MeshArgs) -> Result<()> {
    ensure!(args.nodes >= 2, "--nodes must be at least 2");
    ensure!(args.repeat >= 1, "--repeat must be at least 1");
    let mut rows = Vec::new();
    if matches!(args.backend, BackendChoice::Quinn | BackendChoice::Both) {
        rows.push(backend::<QuinnTransport>(&args).await?);
    }
    if matches!(args.backend, BackendChoice::S2n | BackendChoice::Both) {
        rows.push(backend::<S2nTransport>(&args).await?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<7} {:>5} {:>10} {:>8} {:>8}   {:>16}",
        "backend", "nodes", "median ms", "min ms", "max ms", "one registration"
    );
    for r in &rows {
        println!(
            "{:<7} {:>5} {:>10.1} {:>8.1} {:>8.1}   {:>3} frames x {} B",
            r.backend,
            r.nodes,
            r.median_ms,
            r.min_ms,
            r.max_ms,
            r.frames_per_registration,
            r.bytes_per_frame
        );
    }
    println!(
        "time from every node connecting to the first until each sees all {} peers and all {} \
         global names; {} run(s) each",
        args.nodes - 1,
        args.nodes,
        args.repeat
    );
    Ok(())
}

async fn backend<T: Transport>(args: &MeshArgs) -> Result<Row> {
    let mut times = Vec::new();
    for _ in 0..args.repeat {
        times.push(one_run::<T>(args.nodes).await?.as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    // A registration of a typical name, as one peer receives it.
    let update = Update {
        seq: 42,
        op: Op::Claim(Claim {
            name: "svc-0".into(),
            pid: 7,
            stamp: 1_796_400_000_000_000,
        }),
    };
    let frame = Frame::Capability {
        capability: CAPABILITY.into(),
        body: encode_update(&update),
    };
    Ok(Row {
        backend: T::NAME,
        nodes: args.nodes,
        runs: args.repeat,
        median_ms: times[times.len() / 2],
        min_ms: times[0],
        max_ms: times[times.len() - 1],
        frames_per_registration: args.nodes - 1,
        bytes_per_frame: encode_frame(&frame)?.len(),
    })
}

async fn one_run<T: Transport>(n: usize) -> Result<Duration> {
    let ca = ClusterCa::generate("bench")?;
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..n {
        let node = node::<T>(&ca, &format!("n{i}")).await;
        let pid = node.spawn(|mut ctx| async move { while ctx.recv().await.is_some() {} });
        node.register_global(&format!("svc-{i}"), &pid).await?;
        nodes.push(node);
    }
    let first = nodes[0].local_addr();
    let started = Instant::now();
    let joins = nodes[1..].iter().map(|node| node.connect("n0", first));
    let formed = async {
        for r in futures_util::future::join_all(joins).await {
            r?;
        }
        while !nodes
            .iter()
            .all(|node| node.peers().len() == n - 1 && node.registered_global().len() == n)
        {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        anyhow::Ok(started.elapsed())
    };
    let Ok(took) = tokio::time::timeout(BENCH_DEADLINE, formed).await else {
        let seen: Vec<String> = nodes
            .iter()
            .map(|n| {
                format!(
                    "{}: {} peers, {} names",
                    n.name(),
                    n.peers().len(),
                    n.registered_global().len()
                )
            })
            .collect();
        anyhow::bail!("the cluster did not form within {BENCH_DEADLINE:?}: {seen:?}");
    };
    let took = took?;
    // Check that the names resolve to the right owners, then stop.
    for node in &nodes {
        for i in 0..n {
            let owner = node.whereis_global(&format!("svc-{i}"));
            ensure!(
                owner.as_ref().map(|p| p.node().as_str()) == Some(&format!("n{i}")),
                "{} resolves svc-{i} to {owner:?}",
                node.name()
            );
        }
    }
    futures_util::future::join_all(nodes.iter().map(|n| n.shutdown())).await;
    Ok(took)
}
