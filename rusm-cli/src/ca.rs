//! `rusm ca`: the cluster's certificate authority, kept in one directory.
//!
//! The directory holds what [`ClusterCa::save`] writes (`ca.pem`, `ca.key` with mode 0600,
//! `crl.pem`) and, for each node issued there, what [`Identity::save`](rusm_cluster::Identity)
//! writes under the node's name (`NAME.pem`, and `NAME.key` with mode 0600). Nothing else is
//! kept: `list` and `revoke` read each node's serial from its certificate, and the revoked
//! serials from `crl.pem`. So a node's certificate must stay in the directory for `revoke NAME`
//! to find it; its key may be moved out to the node.
//!
//! Every failure is one line (`rusm: ...` on stderr, exit 1).

use std::fmt::Display;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use rusm_cluster::core::identity::PeerIdentity;
use rusm_cluster::{ClusterCa, NodeName, Serial, TrustAnchor};

/// Stems of the CA's own files: a node by one of these names would overwrite them.
const RESERVED: [&str; 2] = ["ca", "crl"];

/// `rusm ca`: its subcommand.
#[derive(Args, Debug)]
pub(crate) struct CaArgs {
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: CaCommand,
}

/// The `rusm ca` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum CaCommand {
    /// Create a cluster CA in DIR: ca.pem (the certificate every node trusts), ca.key (its
    /// private key, mode 0600: keep it off the nodes) and crl.pem (the revocation list).
    /// Refuses if DIR already holds a CA.
    Init {
        /// The CA's directory (created if missing).
        #[command(flatten)]
        dir: DirArg,
        /// The cluster's name, written into the CA certificate and every node certificate.
        #[arg(long, value_name = "NAME", default_value = "rusm")]
        cluster: String,
    },
    /// Issue node NAME a key and a certificate (its DNS name is NAME), saved as DIR/NAME.pem and
    /// DIR/NAME.key (mode 0600). Refuses if NAME holds a certificate that is not revoked.
    Issue {
        /// The node's name: a-z, 0-9, '-' and '.', as in a DNS name.
        name: String,
        /// The CA's directory.
        #[command(flatten)]
        dir: DirArg,
    },
    /// Revoke node NAME's certificate (read from DIR/NAME.pem) and rewrite DIR/crl.pem. Nodes
    /// refuse the certificate once they run with the new crl.pem.
    Revoke {
        /// The node's name.
        name: String,
        /// The CA's directory.
        #[command(flatten)]
        dir: DirArg,
    },
    /// List the node certificates in DIR: name, serial (hex), revoked.
    List {
        /// The CA's directory.
        #[command(flatten)]
        dir: DirArg,
    },
}

/// The `--dir` every `rusm ca` subcommand takes.
#[derive(Args, Debug)]
pub(crate) struct DirArg {
    /// The CA's directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: PathBuf,
}

/// Runs `rusm ca ...`.
pub(crate) fn run(args: CaArgs) -> Result<()> {
    match args.command {
        CaCommand::Init { dir, cluster } => init(&dir.dir, &cluster),
        CaCommand::Issue { name, dir } => issue(&dir.dir, &name),
        CaCommand::Revoke { name, dir } => revoke(&dir.dir, &name),
        CaCommand::List { dir } => list(&dir.dir),
    }
}

/// An error made of `context` and `cause` on one line: the cause's own `Display` only (the
/// library's errors repeat their source in it, so chaining it would say things twice), with any
/// line breaks folded.
pub(crate) fn flat(context: impl Display, cause: impl Display) -> anyhow::Error {
    let cause = cause.to_string();
    anyhow!(
        "{context}: {}",
        cause.split_whitespace().collect::<Vec<_>>().join(" ")
    )
}

fn init(dir: &Path, cluster: &str) -> Result<()> {
    if cluster.trim().is_empty() {
        bail!("the cluster name must not be empty");
    }
    for file in ["ca.pem", "ca.key"] {
        if dir.join(file).exists() {
            bail!(
                "{} already holds a CA ({file} exists); refusing to overwrite it",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| flat(format!("cannot create {}", dir.display()), e))?;
    // Claim ca.key atomically (owner-only from the start), so two `init`s racing on one
    // directory cannot both write a CA: the second finds the file and stops.
    let key_path = dir.join("ca.key");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(&key_path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
            "{} already holds a CA (ca.key exists); refusing to overwrite it",
            dir.display()
        ),
        Err(e) => return Err(flat(key_path.display(), e)),
    }
    let made = ClusterCa::generate(cluster)
        .map_err(|e| flat("cannot generate the CA", e))
        .and_then(|ca| {
            ca.save(dir)
                .map_err(|e| flat(format!("cannot save the CA in {}", dir.display()), e))
        });
    if let Err(e) = made {
        let _ = std::fs::remove_file(&key_path);
        return Err(e);
    }
    println!(
        "created the {cluster:?} cluster CA in {}: ca.pem (for every node), ca.key (secret, mode 0600), crl.pem (no revocations)",
        dir.display()
    );
    Ok(())
}

fn issue(dir: &Path, name: &str) -> Result<()> {
    let name = node_name(name)?;
    let ca = load_ca(dir)?;
    let mut replaces = None;
    if cert_path(dir, &name).exists() {
        let old = read_cert(dir, &name)?;
        if !ca.revoked().contains(&old.serial) {
            bail!(
                "{name} already has a certificate in {} (serial {}, not revoked): revoke it first to issue a new one",
                dir.display(),
                old.serial
            );
        }
        replaces = Some(old.serial);
    }
    let identity = ca
        .issue(name.as_str())
        .map_err(|e| flat(format!("cannot issue {name}"), e))?;
    identity
        .save(dir, name.as_str())
        .map_err(|e| flat(format!("cannot save {name}'s certificate and key"), e))?;
    let replaced = replaces
        .map(|s| format!(" (replaces revoked serial {s})"))
        .unwrap_or_default();
    println!(
        "issued {name}, serial {}{replaced}: {} (certificate), {} (private key, mode 0600)",
        identity.serial(),
        cert_path(dir, &name).display(),
        dir.join(format!("{name}.key")).display()
    );
    Ok(())
}

fn revoke(dir: &Path, name: &str) -> Result<()> {
    let name = node_name(name)?;
    let mut ca = load_ca(dir)?;
    let path = cert_path(dir, &name);
    if !path.exists() {
        bail!(
            "no certificate for {name} in {} ({} does not exist)",
            dir.display(),
            path.display()
        );
    }
    let cert = read_cert(dir, &name)?;
    if ca.revoked().contains(&cert.serial) {
        println!("{name} (serial {}) was already revoked", cert.serial);
        return Ok(());
    }
    ca.revoke(&cert.serial);
    let crl = ca
        .crl_pem()
        .map_err(|e| flat("cannot sign the new revocation list", e))?;
    // Only crl.pem changes: rewrite it alone, through a rename, so an interrupted revoke leaves
    // the old list (and never touches ca.key).
    let crl_path = dir.join("crl.pem");
    let tmp = dir.join(".crl.pem.tmp");
    std::fs::write(&tmp, crl)
        .and_then(|()| std::fs::rename(&tmp, &crl_path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            flat(format!("cannot write {}", crl_path.display()), e)
        })?;
    println!(
        "revoked {name} (serial {}); {} now lists {} revoked serial(s): nodes refuse it once they run with it",
        cert.serial,
        crl_path.display(),
        ca.revoked().len()
    );
    Ok(())
}

/// One row of `rusm ca list`.
struct Row {
    name: String,
    serial: String,
    revoked: &'static str,
}

fn list(dir: &Path) -> Result<()> {
    let ca = load_ca(dir)?;
    let revoked = ca.revoked();
    let entries =
        std::fs::read_dir(dir).map_err(|e| flat(format!("cannot read {}", dir.display()), e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| flat(format!("cannot read {}", dir.display()), e))?;
        let file = entry.file_name();
        let Some(stem) = file.to_str().and_then(|f| f.strip_suffix(".pem")) else {
            continue;
        };
        if RESERVED.contains(&stem) {
            continue;
        }
        if let Ok(name) = NodeName::new(stem) {
            names.push(name);
        }
    }
    names.sort();
    let mut rows = Vec::new();
    let mut listed: Vec<Serial> = Vec::new();
    for name in names {
        match read_cert(dir, &name) {
            Ok(cert) => {
                let is_revoked = revoked.contains(&cert.serial);
                rows.push(Row {
                    name: name.to_string(),
                    serial: cert.serial.to_string(),
                    revoked: if is_revoked { "yes" } else { "no" },
                });
                listed.push(cert.serial);
            }
            Err(e) => {
                eprintln!("rusm: warning: {e:#}");
                rows.push(Row {
                    name: name.to_string(),
                    serial: "(unreadable)".into(),
                    revoked: "?",
                });
            }
        }
    }
    // Revoked serials whose certificate is no longer here (re-issued, or removed).
    for serial in revoked.iter().filter(|s| !listed.contains(s)) {
        rows.push(Row {
            name: "-".into(),
            serial: serial.to_string(),
            revoked: "yes",
        });
    }
    if rows.is_empty() {
        println!(
            "no node certificates in {} (issue one with `rusm ca issue NAME --dir {}`)",
            dir.display(),
            dir.display()
        );
        return Ok(());
    }
    let name_w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    let serial_w = rows
        .iter()
        .map(|r| r.serial.len())
        .max()
        .unwrap_or(0)
        .max(6);
    println!("{:name_w$}  {:serial_w$}  REVOKED", "NAME", "SERIAL");
    for row in rows {
        println!(
            "{:name_w$}  {:serial_w$}  {}",
            row.name, row.serial, row.revoked
        );
    }
    Ok(())
}

/// Validates a node name given on the command line, refusing the CA's own file stems.
fn node_name(name: &str) -> Result<NodeName> {
    let name = NodeName::new(name).map_err(|e| flat("bad node name", e))?;
    if RESERVED.contains(&name.as_str()) {
        bail!(
            "{name:?} cannot be a node name here: {name}.pem is one of the CA's own files in the directory"
        );
    }
    Ok(name)
}

fn cert_path(dir: &Path, name: &NodeName) -> PathBuf {
    dir.join(format!("{name}.pem"))
}

/// Reads the leaf certificate of `DIR/NAME.pem` (no key needed), checking it is NAME's.
fn read_cert(dir: &Path, name: &NodeName) -> Result<PeerIdentity> {
    let path = cert_path(dir, name);
    let text = std::fs::read_to_string(&path).map_err(|e| flat(path.display(), e))?;
    // `TrustAnchor::from_pem` reads every CERTIFICATE block; the first is the node's leaf.
    let leaf = TrustAnchor::from_pem(&text)
        .map_err(|e| flat(format!("{}: not a PEM certificate", path.display()), e))?
        .roots()[0]
        .clone();
    let cert = PeerIdentity::from_leaf(leaf)
        .map_err(|e| flat(format!("{}: not a valid certificate", path.display()), e))?;
    if !cert.is_bound_to(name) {
        bail!(
            "{} is a certificate for {:?}, not {name}",
            path.display(),
            cert.dns_names
        );
    }
    Ok(cert)
}

/// Loads the CA in `dir`, with errors that say which file is missing or malformed.
fn load_ca(dir: &Path) -> Result<ClusterCa> {
    if !dir.exists() {
        bail!(
            "{}: no such directory (create a CA with `rusm ca init --dir {}`)",
            dir.display(),
            dir.display()
        );
    }
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let ca_pem = dir.join("ca.pem");
    if !ca_pem.exists() {
        bail!(
            "no CA in {} (no ca.pem; create one with `rusm ca init --dir {}`)",
            dir.display(),
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&ca_pem).map_err(|e| flat(ca_pem.display(), e))?;
    TrustAnchor::from_pem(&text)
        .map_err(|e| flat(format!("{}: not a PEM certificate", ca_pem.display()), e))?;
    ClusterCa::load(dir).map_err(|e| flat(format!("cannot load the CA in {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_folds_lines() {
        let e = flat("ctx", "line one\nline two\n");
        assert_eq!(e.to_string(), "ctx: line one line two");
    }

    #[test]
    fn reserved_and_invalid_names_are_refused() {
        assert!(node_name("london").is_ok());
        assert!(node_name("ca").is_err());
        assert!(node_name("crl").is_err());
        assert!(node_name("London").is_err());
    }
}
