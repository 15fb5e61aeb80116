//! `rusm attach NAME@ADDR --certs DIR`: a live look inside a running node. Starts a *hidden*
//! node (it never joins the mesh and is in no node's peer list) with an identity issued for it
//! (`rusm ca issue ops`), links to the node over mutual TLS like any member — so only holders
//! of a certificate the cluster trusts can attach — and asks it for its report over the link:
//! processes, names, peers, counters. `--watch` refreshes every second with message rates;
//! `--json` prints the report for scripts.
//!
//! The node's name is needed with its address: TLS checks the node's certificate against it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use rusm_cluster::{Identity, Node, Report};

use crate::ca::flat;
use crate::node_cmd::{load_trust, parse_peer};

/// Options of `rusm attach`.
#[derive(clap::Args, Debug)]
pub(crate) struct AttachArgs {
    /// The node to attach to, as NAME@ADDR (e.g. london@127.0.0.1:4100).
    target: String,
    /// The directory with ca.pem, crl.pem and the attaching identity.
    #[arg(long)]
    certs: PathBuf,
    /// The identity to attach as (its NAME.pem and NAME.key in --certs).
    #[arg(long = "as", default_value = "ops")]
    identity: String,
    /// Refresh every --interval seconds, with message rates, until Ctrl-C.
    #[arg(long)]
    watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Print the report as JSON (once, or one object per line with --watch).
    #[arg(long)]
    json: bool,
}

/// Runs `rusm attach`.
pub(crate) async fn run(args: AttachArgs) -> Result<()> {
    let (name, addr) = parse_peer(&args.target).map_err(|e| {
        anyhow!("{e:#} (give the node's name with its address: TLS checks its certificate against the name)")
    })?;
    let identity = Identity::load(&args.certs, &args.identity).map_err(|e| {
        flat(
            format!(
                "no usable identity {:?} in {} (issue one with `rusm ca issue {} --dir {}`)",
                args.identity,
                args.certs.display(),
                args.identity,
                args.certs.display()
            ),
            e,
        )
    })?;
    let trust = load_trust(&args.certs)?;
    let listen: SocketAddr = if addr.ip().is_loopback() {
        "127.0.0.1:0".parse()?
    } else {
        SocketAddr::new(
            if addr.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            },
            0,
        )
    };
    let client = Node::builder(args.identity.as_str())
        .identity(identity)
        .trust(trust)
        .listen(listen)
        .hidden(true)
        .start()
        .await
        .map_err(|e| flat("cannot start the attach client", e))?;
    let result = attach(&client, &name, addr, &args).await;
    client.shutdown().await;
    result
}

async fn attach(client: &Node, name: &str, addr: SocketAddr, args: &AttachArgs) -> Result<()> {
    client
        .connect(name, addr)
        .await
        .map_err(|e| flat(format!("cannot attach to {name} at {addr}"), e))?;
    let fetch = || async {
        client
            .attach_report(name)
            .await
            .map_err(|e| flat(format!("{name} did not report"), e))
    };
    if !args.watch {
        let report = fetch().await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", render(&report, None));
        }
        return Ok(());
    }
    let interval = Duration::from_secs_f64(args.interval.max(0.1));
    let mut last: Option<(Report, Instant)> = None;
    loop {
        let report = fetch().await?;
        let now = Instant::now();
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            let rates = last
                .as_ref()
                .map(|(prev, at)| Rates::between(prev, &report, now.duration_since(*at)));
            // Clear the screen and go home, then the table.
            print!("\x1b[2J\x1b[H{}", render(&report, rates.as_ref()));
        }
        last = Some((report, now));
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Messages a second since the previous report: the node's, and each peer's.
pub(crate) struct Rates {
    sent: f64,
    received: f64,
    peers: BTreeMap<String, (f64, f64)>,
}

impl Rates {
    fn between(prev: &Report, now: &Report, dt: Duration) -> Rates {
        let secs = dt.as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
        let counter = |r: &Report, k: &str| r.counters.get(k).copied().unwrap_or(0);
        let peers = now
            .peers
            .iter()
            .map(|p| {
                let before = prev.peers.iter().find(|q| q.name == p.name);
                let (s, r) = before.map_or((p.messages_sent, p.messages_received), |q| {
                    (q.messages_sent, q.messages_received)
                });
                (
                    p.name.clone(),
                    (rate(s, p.messages_sent), rate(r, p.messages_received)),
                )
            })
            .collect();
        Rates {
            sent: rate(
                counter(prev, "messages_sent"),
                counter(now, "messages_sent"),
            ),
            received: rate(
                counter(prev, "messages_received"),
                counter(now, "messages_received"),
            ),
            peers,
        }
    }
}

/// The report as plain-text tables.
pub(crate) fn render(r: &Report, rates: Option<&Rates>) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let up = Duration::from_millis(r.uptime_ms);
    let _ = writeln!(
        o,
        "node {} (creation {}) on {}, up {}s, {} process(es), {} peer(s), {} attached",
        r.node,
        r.creation,
        r.listen,
        up.as_secs(),
        r.processes.len(),
        r.peers.len(),
        r.attached
    );
    if let Some(rates) = rates {
        let _ = writeln!(
            o,
            "messages/s: {:.0} sent, {:.0} received",
            rates.sent, rates.received
        );
    }
    let _ = writeln!(o, "\nPROCESSES");
    let _ = writeln!(
        o,
        "{:>8}  {:>7}  {:>10}  {:>10}  names",
        "id", "mailbox", "in", "out"
    );
    for p in &r.processes {
        let _ = writeln!(
            o,
            "{:>8}  {:>7}  {:>10}  {:>10}  {}",
            p.id,
            p.mailbox,
            p.messages_in,
            p.messages_out,
            p.names.join(", ")
        );
    }
    let _ = writeln!(o, "\nNAMES");
    for (n, id) in &r.local_names {
        let _ = writeln!(o, "  local   {n:<24} {id}");
    }
    for (n, pid) in &r.global_names {
        let _ = writeln!(o, "  global  {n:<24} {pid}");
    }
    let _ = writeln!(o, "\nPEERS");
    let _ = writeln!(
        o,
        "{:<16} {:<22} {:>8}  {:>10}  {:>10}  {:>10}{}",
        "name",
        "address",
        "rtt us",
        "sent",
        "received",
        "streams",
        if rates.is_some() {
            "    sent/s    recv/s"
        } else {
            ""
        }
    );
    for p in &r.peers {
        let rtt = p.rtt_us.map_or("-".to_string(), |us| us.to_string());
        let rate = rates
            .and_then(|r| r.peers.get(&p.name))
            .map_or(String::new(), |(s, v)| format!("  {s:>8.0}  {v:>8.0}"));
        let _ = writeln!(
            o,
            "{:<16} {:<22} {:>8}  {:>10}  {:>10}  {:>10}{rate}",
            p.name, p.addr, rtt, p.messages_sent, p.messages_received, p.streams_sent
        );
    }
    let _ = writeln!(o, "\nCOUNTERS");
    for (k, v) in &r.counters {
        let _ = writeln!(o, "  {k:<24} {v}");
    }
    if !r.refusals.is_empty() {
        let _ = writeln!(o, "\nREFUSALS");
        for (k, v) in &r.refusals {
            let _ = writeln!(o, "  {k:<32} {v}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusm_cluster::core::report::{PeerReport, ProcessReport};

    #[test]
    fn the_table_shows_what_the_report_holds() {
        let mut r = Report {
            node: "london".into(),
            creation: 7,
            uptime_ms: 61_000,
            listen: "127.0.0.1:4100".into(),
            attached: 1,
            ..Report::default()
        };
        r.processes.push(ProcessReport {
            id: 3,
            names: vec!["db".into()],
            mailbox: 2,
            messages_in: 40,
            messages_out: 5,
        });
        r.peers.push(PeerReport {
            name: "paris".into(),
            addr: "127.0.0.1:4101".into(),
            rtt_us: Some(180),
            messages_sent: 10,
            messages_received: 40,
            ..PeerReport::default()
        });
        r.counters.insert("dead_letters".into(), 0);
        let text = render(&r, None);
        assert!(text.starts_with("node london (creation 7) on 127.0.0.1:4100, up 61s"));
        assert!(
            text.contains("       3        2          40           5  db"),
            "{text}"
        );
        assert!(text.contains("paris"), "{text}");
        assert!(text.contains("dead_letters"), "{text}");
        let mut later = r.clone();
        later.peers[0].messages_received = 140;
        let rates = Rates::between(&r, &later, Duration::from_secs(2));
        assert_eq!(rates.peers["paris"], (0.0, 50.0));
        assert!(render(&later, Some(&rates)).contains("sent/s"));
    }
}
