//! End to end: the built `rusm` binary, run in a fresh temporary directory. `rusm ca` makes a
//! CA, issues, lists and revokes; bad input fails with one line on stderr; `rusm node`
//! processes on 127.0.0.1 link, refuse a revoked node, and exit 0 on SIGTERM.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RUSM: &str = env!("CARGO_BIN_EXE_rusm");

/// A directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "rusm-cli-test-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn command(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(RUSM);
    cmd.args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null());
    cmd
}

fn run(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().expect("run rusm")
}

/// Runs `rusm ARGS`, expecting success; its stdout.
fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rusm {args:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// Checks a failure's stderr: one line `rusm: ...`, no panic, no backtrace hint.
fn assert_one_line_error(args: &[&str], status: ExitStatus, stderr: &str) {
    assert!(!status.success(), "rusm {args:?} succeeded");
    assert_eq!(status.code(), Some(1), "rusm {args:?}: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "rusm {args:?} panicked: {stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "rusm {args:?}: not one line: {stderr:?}"
    );
    assert!(stderr.starts_with("rusm: "), "rusm {args:?}: {stderr:?}");
}

/// Runs `rusm ARGS`, expecting a one-line failure; that line.
fn fails(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_one_line_error(args, out.status, &stderr);
    stderr.trim_end().to_string()
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port()
}

/// A `rusm node` process, its stdout read line by line and its stderr collected.
struct NodeProc {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl NodeProc {
    fn spawn(dir: &Path, args: &[&str]) -> NodeProc {
        let mut child = command(dir, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rusm node");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        NodeProc {
            child,
            lines,
            stdout: Vec::new(),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for a stdout line containing `needle`; the line.
    fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.stdout.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.stdout.push(line),
                Err(_) => panic!(
                    "no line with {needle:?} within {timeout:?}; stdout {:?}, stderr:\n{}",
                    self.stdout,
                    self.stderr()
                ),
            }
        }
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit; its status.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads take the last output.
                std::thread::sleep(Duration::from_millis(50));
                while let Ok(line) = self.lines.try_recv() {
                    self.stdout.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {timeout:?}; stdout {:?}, stderr:\n{}",
                self.stdout,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The row of `name` in a `rusm ca list` table, split in columns.
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row for {name} in:\n{table}"))
}

#[test]
fn ca_init_issue_list_revoke_and_bad_input() {
    let tmp = TempDir::new("ca");
    let dir = tmp.0.as_path();

    let out = ok(dir, &["ca", "init", "--dir", "certs", "--cluster", "test"]);
    assert!(out.contains("created"), "{out}");
    let again = fails(dir, &["ca", "init", "--dir", "certs"]);
    assert!(again.contains("already holds a CA"), "{again}");

    ok(dir, &["ca", "issue", "london", "--dir", "certs"]);
    ok(dir, &["ca", "issue", "paris", "--dir", "certs"]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "london.key", "paris.key"] {
            let mode = std::fs::metadata(dir.join("certs").join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }
    let twice = fails(dir, &["ca", "issue", "london", "--dir", "certs"]);
    assert!(twice.contains("already has a certificate"), "{twice}");

    let table = ok(dir, &["ca", "list", "--dir", "certs"]);
    assert_eq!(
        table
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["NAME", "SERIAL", "REVOKED"]
    );
    let london = row(&table, "london");
    let paris = row(&table, "paris");
    assert_eq!(london[2], "no", "{table}");
    assert_eq!(paris[2], "no", "{table}");
    assert!(london[1].chars().all(|c| c.is_ascii_hexdigit()), "{table}");
    assert_ne!(london[1], paris[1], "{table}");

    let revoked = ok(dir, &["ca", "revoke", "paris", "--dir", "certs"]);
    assert!(revoked.contains(paris[1]), "{revoked}");
    let table = ok(dir, &["ca", "list", "--dir", "certs"]);
    assert_eq!(row(&table, "paris")[2], "yes", "{table}");
    assert_eq!(row(&table, "london")[2], "no", "{table}");
    let crl = std::fs::read_to_string(dir.join("certs/crl.pem")).unwrap();
    assert!(crl.contains("BEGIN X509 CRL"));

    // Bad input: each a one-line error and exit 1.
    let missing = fails(dir, &["ca", "list", "--dir", "nowhere"]);
    assert!(missing.contains("nowhere"), "{missing}");
    fails(dir, &["ca", "issue", "rome", "--dir", "nowhere"]);
    let unknown = fails(dir, &["ca", "revoke", "nobody", "--dir", "certs"]);
    assert!(unknown.contains("nobody"), "{unknown}");
    fails(dir, &["ca", "issue", "London", "--dir", "certs"]);
    fails(dir, &["ca", "issue", "ca", "--dir", "certs"]);
    std::fs::create_dir(dir.join("empty")).unwrap();
    let no_ca = fails(dir, &["ca", "list", "--dir", "empty"]);
    assert!(no_ca.contains("no CA"), "{no_ca}");

    std::fs::create_dir(dir.join("bad")).unwrap();
    for file in ["ca.pem", "ca.key", "crl.pem", "london.pem", "london.key"] {
        std::fs::copy(dir.join("certs").join(file), dir.join("bad").join(file)).unwrap();
    }
    std::fs::write(dir.join("bad/ca.pem"), "not a certificate\n").unwrap();
    let malformed = fails(dir, &["ca", "list", "--dir", "bad"]);
    assert!(malformed.contains("ca.pem"), "{malformed}");
    fails(dir, &["ca", "issue", "rome", "--dir", "bad"]);
    fails(dir, &["ca", "revoke", "london", "--dir", "bad"]);
    std::fs::write(
        dir.join("bad/ca.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    fails(dir, &["ca", "issue", "rome", "--dir", "bad"]);

    // `rusm node` refuses bad settings the same way, before it starts.
    for certs in ["nowhere", "bad", "empty"] {
        let args = [
            "node",
            "--name",
            "london",
            "--listen",
            "127.0.0.1:0",
            "--certs",
            certs,
        ];
        fails(dir, &args);
    }
    fails(
        dir,
        &["node", "--listen", "127.0.0.1:0", "--certs", "certs"],
    );
    fails(
        dir,
        &[
            "node",
            "--name",
            "london",
            "--listen",
            "127.0.0.1:0",
            "--certs",
            "certs",
            "--connect",
            "paris",
        ],
    );
    std::fs::write(dir.join("typo.toml"), "name = \"london\"\nlisen = \"x\"\n").unwrap();
    let typo = fails(dir, &["node", "--config", "typo.toml"]);
    assert!(typo.contains("typo.toml:2:1"), "{typo}");
}

#[test]
fn nodes_link_refuse_a_revoked_one_and_stop_on_sigterm() {
    let tmp = TempDir::new("node");
    let dir = tmp.0.as_path();
    ok(dir, &["ca", "init", "--dir", "certs"]);
    for name in ["london", "paris"] {
        ok(dir, &["ca", "issue", name, "--dir", "certs"]);
    }
    ok(dir, &["ca", "revoke", "paris", "--dir", "certs"]);
    ok(dir, &["ca", "issue", "rome", "--dir", "certs"]);

    let london_addr = format!("127.0.0.1:{}", free_port());
    let mut london = NodeProc::spawn(
        dir,
        &[
            "node",
            "--name",
            "london",
            "--listen",
            &london_addr,
            "--certs",
            "certs",
        ],
    );
    let line = london.wait_line("listening on", Duration::from_secs(10));
    assert_eq!(line, format!("node london listening on {london_addr}"));

    // rome from a config file, run from elsewhere: its certs path is the file's directory's.
    let rome_addr = format!("127.0.0.1:{}", free_port());
    let config = dir.join("rome.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"rome\"\nlisten = \"{rome_addr}\"\ncerts = \"certs\"\nconnect = [\"london@{london_addr}\"]\n"
        ),
    )
    .unwrap();
    let mut rome = NodeProc::spawn(
        &std::env::temp_dir(),
        &["node", "--config", config.to_str().unwrap()],
    );
    let line = rome.wait_line("listening on", Duration::from_secs(10));
    assert_eq!(line, format!("node rome listening on {rome_addr}"));
    let line = rome.wait_line("linked to", Duration::from_secs(10));
    assert_eq!(line, format!("node rome linked to london at {london_addr}"));

    // The revoked paris is refused: one clear line, exit 1.
    let mut paris = NodeProc::spawn(
        dir,
        &[
            "node",
            "--name",
            "paris",
            "--listen",
            "127.0.0.1:0",
            "--certs",
            "certs",
            "--connect",
            &format!("london@{london_addr}"),
        ],
    );
    let status = paris.wait_exit(Duration::from_secs(15));
    let stderr = paris.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("rusm: cannot link to london") && last.contains("Revoked"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    rome.sigterm();
    london.sigterm();
    for (name, node) in [("rome", &mut rome), ("london", &mut london)] {
        let status = node.wait_exit(Duration::from_secs(5));
        assert!(status.success(), "{name}: {status}; {}", node.stderr());
        let last = node.stdout.last().cloned().unwrap_or_default();
        assert_eq!(last, format!("node {name} shut down (SIGTERM)"));
        assert!(!node.stderr().contains("panicked"), "{}", node.stderr());
    }
}

/// SIGTERM to each node; each must exit 0 within 5 s.
fn stop_all(nodes: &mut [&mut NodeProc]) {
    for node in nodes.iter() {
        node.sigterm();
    }
    for node in nodes.iter_mut() {
        let status = node.wait_exit(Duration::from_secs(5));
        assert!(status.success(), "{status}: {}", node.stderr());
    }
}

/// A CA in `dir/certs` with an identity for each of `names`.
fn certs(dir: &Path, names: &[&str]) {
    ok(dir, &["ca", "init", "--dir", "certs"]);
    for name in names {
        ok(dir, &["ca", "issue", name, "--dir", "certs"]);
    }
}

/// `rusm node NAME` on a free port of 127.0.0.1 (linked to `connect` first, if given), once it
/// listens (and linked); the process and its address.
fn start(dir: &Path, name: &str, connect: Option<&str>) -> (NodeProc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "node", "--name", name, "--listen", &addr, "--certs", "certs",
    ];
    if let Some(peer) = connect {
        args.extend(["--connect", peer]);
    }
    let mut node = NodeProc::spawn(dir, &args);
    node.wait_line("listening on", Duration::from_secs(10));
    if connect.is_some() {
        node.wait_line("linked to", Duration::from_secs(10));
    }
    (node, addr)
}

#[test]
fn attach_reports_a_running_node_and_refuses_strangers() {
    let tmp = TempDir::new("attach");
    let dir = tmp.0.as_path();
    certs(dir, &["london", "rome", "ops"]);
    let (mut london, london_addr) = start(dir, "london", None);
    let (mut rome, rome_addr) = start(dir, "rome", Some(&format!("london@{london_addr}")));

    // JSON for scripts.
    let target = format!("london@{london_addr}");
    let json = ok(dir, &["attach", &target, "--certs", "certs", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&json).expect("one JSON report");
    assert_eq!(report["node"], "london");
    assert_eq!(report["listen"], london_addr.as_str());
    let peers = report["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{json}");
    assert_eq!(peers[0]["name"], "rome");
    assert_eq!(peers[0]["addr"], rome_addr.as_str());
    assert_eq!(
        report["attached"], 1,
        "the attach client itself, and not as a peer"
    );
    assert!(
        report["counters"]["links_up"].as_u64().unwrap() >= 2,
        "{json}"
    );
    assert!(report["uptime_ms"].as_u64().is_some());

    // Tables for people.
    let table = ok(dir, &["attach", &target, "--certs", "certs", "--as", "ops"]);
    assert!(table.starts_with("node london (creation "), "{table}");
    for section in ["PROCESSES", "NAMES", "PEERS", "COUNTERS"] {
        assert!(table.contains(section), "{section} missing: {table}");
    }
    assert!(table.lines().any(|l| l.starts_with("rome ")), "{table}");

    // Strangers: a certificate from another CA, no such identity, no node name.
    ok(dir, &["ca", "init", "--dir", "other"]);
    ok(dir, &["ca", "issue", "ops", "--dir", "other"]);
    std::fs::copy(dir.join("certs/ca.pem"), dir.join("other/ca.pem")).unwrap();
    std::fs::copy(dir.join("certs/crl.pem"), dir.join("other/crl.pem")).unwrap();
    let refused = fails(dir, &["attach", &target, "--certs", "other"]);
    assert!(
        refused.contains("cannot attach to london") && refused.contains("rejected"),
        "{refused}"
    );
    let unknown = fails(
        dir,
        &["attach", &target, "--certs", "certs", "--as", "nobody"],
    );
    assert!(unknown.contains("nobody"), "{unknown}");
    let nameless = fails(dir, &["attach", &london_addr, "--certs", "certs"]);
    assert!(
        nameless.contains("NAME@ADDR") || nameless.contains("PEER@ADDR"),
        "{nameless}"
    );

    stop_all(&mut [&mut rome, &mut london]);
}

/// kill -9 a node and start it again on the same address at once: its peer, still holding the
/// dead link, takes the new incarnation's link within a second.
#[test]
fn a_node_killed_and_restarted_is_relinked_within_a_second() {
    let tmp = TempDir::new("restart");
    let dir = tmp.0.as_path();
    certs(dir, &["london", "rome", "ops"]);
    let (mut london, london_addr) = start(dir, "london", None);
    let rome_addr = format!("127.0.0.1:{}", free_port());
    let connect = format!("london@{london_addr}");
    let rome_args = [
        "node",
        "--name",
        "rome",
        "--listen",
        &rome_addr,
        "--certs",
        "certs",
        "--connect",
        &connect,
    ];
    let mut rome = NodeProc::spawn(dir, &rome_args);
    rome.wait_line("linked to", Duration::from_secs(10));
    let target = format!("london@{london_addr}");
    let report = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&ok(dir, &["attach", &target, "--certs", "certs", "--json"])).unwrap()
    };
    let before = report(dir)["peers"][0]["creation"].as_u64().unwrap();

    // kill -9: no goodbye; london still holds the dead link.
    let status = Command::new("kill")
        .arg("-KILL")
        .arg(rome.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    rome.wait_exit(Duration::from_secs(5));
    let mut rome = NodeProc::spawn(dir, &rome_args);
    rome.wait_line("listening on", Duration::from_secs(10));
    let listening = Instant::now();
    rome.wait_line("linked to", Duration::from_secs(10));
    let linked = listening.elapsed();
    let after = report(dir);
    let peers = after["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{after}");
    assert_eq!(peers[0]["name"], "rome");
    assert_ne!(
        peers[0]["creation"].as_u64().unwrap(),
        before,
        "the new incarnation"
    );
    println!("restarted rome linked to london {linked:?} after it listened");
    assert!(linked < Duration::from_secs(1), "relinked after {linked:?}");

    stop_all(&mut [&mut rome, &mut london]);
}

/// SIGHUP makes a running node read its CA and CRL again: a peer revoked meanwhile loses its
/// link at once, and a broken CRL file leaves the trust as it was.
#[test]
fn sighup_reloads_the_crl_and_cuts_a_revoked_peer() {
    let tmp = TempDir::new("sighup");
    let dir = tmp.0.as_path();
    certs(dir, &["london", "rome"]);
    let (mut london, london_addr) = start(dir, "london", None);
    let (mut rome, _) = start(dir, "rome", Some(&format!("london@{london_addr}")));
    let hup = |node: &NodeProc| {
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(node.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    };
    // Nothing revoked yet: reloaded, nothing closed.
    hup(&london);
    let line = london.wait_line("reloaded its trust", Duration::from_secs(5));
    assert!(!line.contains("closed"), "{line}");
    // A broken CRL: the old trust stays.
    let crl = dir.join("certs/crl.pem");
    let good = std::fs::read(&crl).unwrap();
    std::fs::write(&crl, b"not a crl").unwrap();
    hup(&london);
    london.wait_line("kept its trust", Duration::from_secs(5));
    std::fs::write(&crl, good).unwrap();
    // Revoke rome, reload: its link closes at once.
    ok(dir, &["ca", "revoke", "rome", "--dir", "certs"]);
    hup(&london);
    let line = london.wait_line("closed the links", Duration::from_secs(5));
    assert!(
        line.ends_with("closed the links to rome (no longer trusted)"),
        "{line}"
    );

    stop_all(&mut [&mut rome, &mut london]);
}

/// `rusm bench-flood` runs end to end: a child `rusm node`, a flood past its 64 handshake
/// places, the refusals counted, the established probe link answering throughout.
#[test]
fn bench_flood_measures_a_bounded_flood() {
    let tmp = TempDir::new("flood");
    let out = ok(
        tmp.0.as_path(),
        &[
            "bench-flood",
            "--connections",
            "100",
            "--concurrency",
            "100",
        ],
    );
    assert!(out.contains("connections that finished TLS: 64;"), "{out}");
    assert!(
        out.contains("refusal flood: too many handshakes in progress   36"),
        "{out}"
    );
    assert!(out.contains(", 0 failed"), "{out}");
}
