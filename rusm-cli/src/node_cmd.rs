//! `rusm node`: runs one cluster node until Ctrl-C (SIGINT) or SIGTERM, then shuts it down
//! cleanly (a goodbye to every peer, so they see it down at once) and exits 0.
//!
//! The node's identity is `CERTS/NAME.pem` and `CERTS/NAME.key` (from `rusm ca issue`); it
//! trusts `CERTS/ca.pem` and refuses what `CERTS/crl.pem` revokes. Settings come from flags
//! and, optionally, a TOML file (`--config`); a flag overrides the file.
//!
//! Standard output carries a few lines meant for people and scripts:
//! `node NAME listening on ADDR`, `node NAME linked to PEER at ADDR` (one per `--connect`)
//! and `node NAME shut down (SIGTERM)`. Logs (`RUST_LOG`, default `info`: links up and down,
//! refused handshakes) go to stderr.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use rusm_cluster::core::transport::Transport;
use rusm_cluster::quinn_transport::QuinnTransport;
use rusm_cluster::s2n_transport::S2nTransport;
use rusm_cluster::{Error, Identity, Node, NodeBuilder, TrustAnchor};
use serde::Deserialize;
use tracing::Instrument;

use crate::ca::flat;

/// How long `--connect` keeps retrying a peer that does not answer, by default.
const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;

/// `rusm node`'s flags.
#[derive(Args, Debug, Default)]
#[command(after_help = "\
Start-up links: each --connect is made, in order, before the node settles. A peer that cannot be \
reached yet (no answer, network error) is retried with backoff for --connect-timeout seconds \
(each try waits up to 5 s for an answer, so a silent peer fails after at least 5 s); a peer that refuses the link (untrusted or revoked certificate, wrong name) fails at once. If any \
start-up link fails, the node shuts down and `rusm node` exits 1 with the reason on one line: a \
misconfigured node stops instead of running cut off from its cluster. Links made later by the \
mesh, and peers going down after start, are only logged (stderr; RUST_LOG, default info).

The config file (TOML) has the same settings, all optional:
    name = \"london\"
    listen = \"127.0.0.1:4100\"
    certs = \"certs\"              # relative to the file's own directory
    connect = [\"paris@127.0.0.1:4101\"]
    connect_timeout = 10         # seconds
    backend = \"quinn\"            # or \"s2n\"
A flag given on the command line overrides the file's setting; any --connect replaces the \
file's whole connect list.")]
pub(crate) struct NodeArgs {
    /// The node's name; its certificate and key are CERTS/NAME.pem and CERTS/NAME.key.
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,
    /// The UDP address to listen on, for example 127.0.0.1:4100 (port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<SocketAddr>,
    /// The directory with ca.pem, crl.pem, NAME.pem and NAME.key (see `rusm ca`).
    #[arg(long, value_name = "DIR")]
    pub(crate) certs: Option<PathBuf>,
    /// A peer to link to at start, as PEER@ADDR (for example london@127.0.0.1:4100); repeat
    /// for several. The node must link to each, or it stops with an error (see below).
    #[arg(long = "connect", value_name = "PEER@ADDR")]
    pub(crate) connect: Vec<String>,
    /// How many seconds to keep retrying a start-up peer that does not answer [default: 10].
    #[arg(long, value_name = "SECS")]
    pub(crate) connect_timeout: Option<u64>,
    /// A TOML file with the same settings (see below); flags override it.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The QUIC stack: quinn or s2n [default: quinn]. Nodes on different stacks link to each
    /// other.
    #[arg(long, value_enum)]
    pub(crate) backend: Option<Backend>,
}

/// The QUIC stack a `rusm node` runs on.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Backend {
    /// quinn (the default).
    #[default]
    Quinn,
    /// s2n-quic.
    S2n,
}

impl Backend {
    /// The name `--backend` takes.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Backend::Quinn => "quinn",
            Backend::S2n => "s2n",
        }
    }
}

/// The settings a `--config` file may hold; every one optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// The node's name.
    name: Option<String>,
    /// The address to listen on.
    listen: Option<String>,
    /// The certificate directory, relative to the file's directory.
    certs: Option<PathBuf>,
    /// Start-up peers, as `PEER@ADDR`.
    connect: Option<Vec<String>>,
    /// Seconds to keep retrying a start-up peer that does not answer.
    connect_timeout: Option<u64>,
    /// The QUIC stack, `quinn` or `s2n`.
    backend: Option<Backend>,
}

/// The node's settings once flags and file are merged and checked.
#[derive(Debug, PartialEq)]
struct Settings {
    name: String,
    listen: SocketAddr,
    certs: PathBuf,
    connect: Vec<(String, SocketAddr)>,
    connect_timeout: Duration,
    backend: Backend,
}

impl Settings {
    /// Reads the config file, if any, and merges it under the flags.
    fn resolve(args: NodeArgs) -> Result<Settings> {
        let (file, base) = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| flat(path.display(), e))?;
                let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
                (parse_file(path, &text)?, base)
            }
            None => (FileConfig::default(), PathBuf::new()),
        };
        Settings::merge(args, file, &base)
    }

    /// Flags over file; file paths are taken relative to `base` (the file's directory).
    fn merge(args: NodeArgs, file: FileConfig, base: &Path) -> Result<Settings> {
        let name = args.name.or(file.name).ok_or_else(|| {
            anyhow!("no node name: give --name NAME (or name = \"...\" in the --config file)")
        })?;
        let listen = match (args.listen, file.listen) {
            (Some(addr), _) => addr,
            (None, Some(text)) => text
                .parse()
                .map_err(|e| flat(format!("bad listen address {text:?} in the config file"), e))?,
            (None, None) => bail!(
                "no listen address: give --listen ADDR (or listen = \"...\" in the --config file)"
            ),
        };
        let certs = match (args.certs, file.certs) {
            (Some(dir), _) => dir,
            (None, Some(dir)) => base.join(dir),
            (None, None) => {
                bail!("no certificate directory: give --certs DIR (or certs = \"...\" in the --config file)")
            }
        };
        let connect = if args.connect.is_empty() {
            file.connect.unwrap_or_default()
        } else {
            args.connect
        };
        let connect = connect
            .iter()
            .map(|peer| parse_peer(peer))
            .collect::<Result<Vec<_>>>()?;
        let connect_timeout = Duration::from_secs(
            args.connect_timeout
                .or(file.connect_timeout)
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT_SECS),
        );
        Ok(Settings {
            name,
            listen,
            certs,
            connect,
            connect_timeout,
            backend: args.backend.or(file.backend).unwrap_or_default(),
        })
    }
}

/// Parses a config file, reporting an error as `FILE:LINE:COLUMN: message` on one line.
fn parse_file(path: &Path, text: &str) -> Result<FileConfig> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let at = e
            .span()
            .map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(":{line}:{column}")
            })
            .unwrap_or_default();
        flat(format!("{}{at}", path.display()), e.message())
    })
}

/// Parses `PEER@ADDR`.
pub(crate) fn parse_peer(text: &str) -> Result<(String, SocketAddr)> {
    let (name, addr) = text.split_once('@').ok_or_else(|| {
        anyhow!("bad peer {text:?}: expected PEER@ADDR, as in london@127.0.0.1:4100")
    })?;
    let addr = addr
        .parse()
        .map_err(|e| flat(format!("bad peer {text:?}: address {addr:?}"), e))?;
    rusm_cluster::NodeName::new(name).map_err(|e| flat(format!("bad peer {text:?}"), e))?;
    Ok((name.to_string(), addr))
}

/// Loads the node's trust: `ca.pem` and `crl.pem` from `certs`; both must be there.
pub(crate) fn load_trust(certs: &Path) -> Result<TrustAnchor> {
    let read = |file: &str| {
        let path = certs.join(file);
        std::fs::read_to_string(&path)
            .map(|text| (path.clone(), text))
            .map_err(|e| flat(path.display(), e))
    };
    let (ca_path, ca) = read("ca.pem")?;
    let (crl_path, crl) = read("crl.pem")?;
    let trust = TrustAnchor::from_pem(&ca)
        .map_err(|e| flat(format!("{}: not a PEM certificate", ca_path.display()), e))?
        .with_crl_pem(&crl)
        .map_err(|e| {
            flat(
                format!("{}: not a PEM revocation list", crl_path.display()),
                e,
            )
        })?;
    if trust.crls().is_empty() {
        // An empty or mangled crl.pem would otherwise quietly turn revocation off.
        bail!(
            "{}: no X509 CRL block (rewrite it with `rusm ca revoke`, or copy the CA's crl.pem)",
            crl_path.display()
        );
    }
    Ok(trust)
}

/// Runs `rusm node ...` until a stop signal.
pub(crate) async fn run(args: NodeArgs) -> Result<()> {
    let settings = Settings::resolve(args)?;
    // Handlers first: a signal that arrives while the node starts is kept, not fatal.
    let stop = StopSignals::new()?;
    let identity = Identity::load(&settings.certs, &settings.name).map_err(|e| {
        flat(
            format!(
                "no usable identity for {} in {}",
                settings.name,
                settings.certs.display()
            ),
            e,
        )
    })?;
    let trust = load_trust(&settings.certs)?;
    let span = tracing::info_span!("node", name = %settings.name);
    run_node(settings, identity, trust, stop)
        .instrument(span)
        .await
}

/// Starts node `name` on backend `T`.
async fn start<T: Transport>(
    name: &str,
    identity: Identity,
    trust: TrustAnchor,
    listen: SocketAddr,
) -> Result<Node, Error> {
    NodeBuilder::<T>::new(name)
        .identity(identity)
        .trust(trust)
        .listen(listen)
        .start()
        .await
}

async fn run_node(
    settings: Settings,
    identity: Identity,
    trust: TrustAnchor,
    mut stop: StopSignals,
) -> Result<()> {
    let name = &settings.name;
    let started = match settings.backend {
        Backend::Quinn => start::<QuinnTransport>(name, identity, trust, settings.listen).await,
        Backend::S2n => start::<S2nTransport>(name, identity, trust, settings.listen).await,
    };
    let node = started.map_err(|e| {
        flat(
            format!("cannot start node {name} on {}", settings.listen),
            e,
        )
    })?;
    println!("node {name} listening on {}", node.local_addr());

    for (peer, addr) in &settings.connect {
        let linked = tokio::select! {
            linked = connect(&node, peer, *addr, settings.connect_timeout) => linked,
            signal = stop.recv() => {
                node.shutdown().await;
                println!("node {name} shut down ({signal})");
                return Ok(());
            }
        };
        if let Err(e) = linked {
            node.shutdown().await;
            return Err(e);
        }
        println!("node {name} linked to {peer} at {addr}");
    }

    let signal = loop {
        match stop.next().await {
            Signal::Stop(signal) => break signal,
            Signal::Reload => reload_trust(&node, &settings.certs),
        }
    };
    tracing::info!(signal, "stopping: saying goodbye to every peer");
    tokio::select! {
        () = node.shutdown() => {}
        again = stop.recv() => bail!("{again} during shutdown: stopped before every peer was told"),
    }
    println!("node {name} shut down ({signal})");
    Ok(())
}

/// SIGHUP: reads `ca.pem` and `crl.pem` again and gives the node the trust they hold; links to
/// peers no longer trusted (a revoked certificate) close at once. A file that cannot be read
/// leaves the trust as it was, and says why.
fn reload_trust(node: &Node, certs: &Path) {
    let name = node.name();
    match load_trust(certs).and_then(|t| node.set_trust(t).map_err(|e| flat("refused", e))) {
        Ok(closed) if closed.is_empty() => {
            println!("node {name} reloaded its trust from {}", certs.display())
        }
        Ok(closed) => {
            let closed: Vec<String> = closed.iter().map(|n| n.to_string()).collect();
            println!(
                "node {name} reloaded its trust from {}; closed the links to {} (no longer trusted)",
                certs.display(),
                closed.join(", ")
            )
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "trust not reloaded; the old trust stays");
            println!("node {name} kept its trust: {e:#}");
        }
    }
}

/// Links to `peer` at `addr`, retrying with backoff while it does not answer or the network
/// fails, for up to `patience`; a refusal fails at once.
async fn connect(node: &Node, peer: &str, addr: SocketAddr, patience: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut delay = Duration::from_millis(100);
    loop {
        match node.connect(peer, addr).await {
            Ok(()) => return Ok(()),
            Err(e @ (Error::Timeout { .. } | Error::Transport(_)))
                if tokio::time::Instant::now() + delay < deadline =>
            {
                tracing::warn!(%peer, %addr, error = %e, "cannot link yet, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(flat(format!("cannot link to {peer} at {addr}"), e)),
        }
    }
}

/// A signal the node acts on.
enum Signal {
    /// Stop, after the named signal.
    Stop(&'static str),
    /// SIGHUP: reload the trust.
    Reload,
}

/// The signals that stop the node: SIGINT (Ctrl-C) and SIGTERM on unix, Ctrl-C elsewhere.
/// Created before the node starts, so a signal that arrives early is held until read.
struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    /// SIGHUP: reload the trust (not a stop).
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> Result<StopSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listen = |kind| signal(kind).map_err(|e| flat("cannot listen for signals", e));
            Ok(StopSignals {
                interrupt: listen(SignalKind::interrupt())?,
                terminate: listen(SignalKind::terminate())?,
                hangup: listen(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    /// Waits for the next stop signal; its name. (A SIGHUP meanwhile is not acted on.)
    async fn recv(&mut self) -> &'static str {
        loop {
            if let Signal::Stop(signal) = self.next().await {
                return signal;
            }
        }
    }

    /// Waits for the next signal: a stop, or (on unix) SIGHUP.
    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => Signal::Stop("SIGINT"),
                _ = self.terminate.recv() => Signal::Stop("SIGTERM"),
                _ = self.hangup.recv() => Signal::Reload,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Stop("Ctrl-C")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<FileConfig> {
        parse_file(Path::new("node.toml"), text)
    }

    #[test]
    fn flags_override_the_file() {
        let f = file(
            "name = \"london\"\nlisten = \"127.0.0.1:4100\"\ncerts = \"certs\"\n\
             connect = [\"paris@127.0.0.1:4101\"]\nconnect_timeout = 3\nbackend = \"s2n\"\n",
        )
        .unwrap();
        let from_file = Settings::merge(NodeArgs::default(), f, Path::new("/etc/rusm")).unwrap();
        assert_eq!(
            from_file,
            Settings {
                name: "london".into(),
                listen: "127.0.0.1:4100".parse().unwrap(),
                certs: "/etc/rusm/certs".into(),
                connect: vec![("paris".into(), "127.0.0.1:4101".parse().unwrap())],
                connect_timeout: Duration::from_secs(3),
                backend: Backend::S2n,
            }
        );
        let f = file("name = \"london\"\nlisten = \"127.0.0.1:4100\"\ncerts = \"certs\"\nconnect = [\"paris@127.0.0.1:4101\"]\n").unwrap();
        let args = NodeArgs {
            listen: Some("127.0.0.1:5000".parse().unwrap()),
            certs: Some("here".into()),
            connect: vec!["rome@127.0.0.1:5001".into()],
            ..NodeArgs::default()
        };
        let merged = Settings::merge(args, f, Path::new("/etc/rusm")).unwrap();
        assert_eq!(merged.name, "london");
        assert_eq!(merged.listen, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(merged.certs, PathBuf::from("here"));
        assert_eq!(
            merged.connect,
            vec![("rome".into(), "127.0.0.1:5001".parse().unwrap())]
        );
        assert_eq!(merged.connect_timeout, Duration::from_secs(10));
    }

    #[test]
    fn bad_settings_are_one_line_errors() {
        let e = file("name = \"x\"\nlisen = \"127.0.0.1:1\"\n").unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with("node.toml:2:1: unknown field `lisen`"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
        let missing = Settings::merge(NodeArgs::default(), FileConfig::default(), Path::new(""));
        assert!(format!("{:#}", missing.unwrap_err()).contains("no node name"));
        for bad in [
            "london",
            "london@nowhere",
            "London@127.0.0.1:1",
            "@127.0.0.1:1",
        ] {
            let e = parse_peer(bad).unwrap_err();
            assert!(!format!("{e:#}").contains('\n'), "{bad}");
        }
        assert!(parse_peer("london@127.0.0.1:4100").is_ok());
    }
}
