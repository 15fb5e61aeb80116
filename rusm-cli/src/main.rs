//! `rusm`: the RUSM cluster operator command.
//!
//! - `rusm demo`: boots three nodes on loopback in one process and shows, step by step,
//!   authentication, the mesh, cross-node messaging by local and global name, per-pair order,
//!   remote spawn and a call, a monitor firing on a kill, an attach report and a rejected
//!   impostor. Exits 0 only if every step did what it says.
//! - `rusm bench`: cross-node throughput and round trip on both backends, each next to raw
//!   QUIC baselines measured in the same run (one stream per message, the same delivering into
//!   mailboxes, one buffered stream), counting every message (`--json` for machines; lists of
//!   payload sizes and receiver counts, or `--matrix`).
//! - `rusm plot --input BENCH.json [--input ...] --output CHART.svg`: a grouped bar chart (SVG)
//!   of `rusm bench --json` output.
//! - `rusm bench-mesh`: how fast nodes joining through one member form the full mesh and agree
//!   on their global names.
//! - `rusm bench-flood`: a `rusm node`'s resident memory under a flood of connections that
//!   never say hello.
//! - `rusm ca init|issue|revoke|list --dir DIR`: the cluster's certificate authority in a
//!   directory: create it, issue a node its certificate and key, revoke one, list them.
//! - `rusm node --name NAME --listen ADDR --certs DIR [--connect PEER@ADDR ...]
//!   [--config FILE.toml]`: runs one node until Ctrl-C or SIGTERM, then shuts it down cleanly.
//! - `rusm attach NAME@ADDR --certs DIR [--watch] [--json]`: a live look inside a running node,
//!   as a hidden node holding an identity the cluster trusts (`rusm ca issue ops`).

mod attach;
mod bench;
mod ca;
mod demo;
mod flood_bench;
mod mesh_bench;
mod node_cmd;
mod plot;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rusm",
    version,
    about = "RUSM cluster: distributed Erlang for Rust over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot three nodes on loopback and show what the cluster does, step by step.
    Demo,
    /// Measure cross-node throughput and round trip against a raw QUIC baseline, per backend.
    Bench(bench::BenchArgs),
    /// Draw `rusm bench --json` output as an SVG grouped bar chart (msgs/s per backend, ours
    /// against the raw baselines).
    Plot(plot::PlotArgs),
    /// Measure how fast nodes joining through one member form a full mesh and agree on their
    /// global names.
    BenchMesh(mesh_bench::MeshArgs),
    /// Measure what a flood of connections that never say hello costs a `rusm node` (resident
    /// memory, refusals, the answers of an established link meanwhile).
    BenchFlood(flood_bench::FloodArgs),
    /// Manage the cluster's certificate authority in a directory: init, issue, revoke, list.
    Ca(ca::CaArgs),
    /// Run one node until Ctrl-C or SIGTERM, then shut it down cleanly (peers see it go at
    /// once).
    Node(node_cmd::NodeArgs),
    /// Look inside a running node: processes, names, peers, counters (tables, --watch, --json).
    Attach(attach::AttachArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A running node logs what it does by default; the one-shot commands only errors.
    let default_level = match cli.command {
        Command::Node(_) => "info",
        _ => "error",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut builder = match &cli.command {
        Command::Bench(args) if args.runtime != bench::RuntimeMode::MultiThread => {
            tokio::runtime::Builder::new_current_thread()
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if let Command::Bench(args) = &cli.command {
        bench::SPIN_US.store(args.spin_us, std::sync::atomic::Ordering::Relaxed);
        bench::spin_before_park(&mut builder);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rusm: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo => demo::run().await,
            Command::Bench(args) => bench::run(args).await,
            Command::Plot(args) => plot::run(&args),
            Command::BenchMesh(args) => mesh_bench::run(args).await,
            Command::BenchFlood(args) => flood_bench::run(args).await,
            Command::Ca(args) => ca::run(args),
            Command::Node(args) => node_cmd::run(args).await,
            Command::Attach(args) => attach::run(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rusm: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
