//! The soak: three nodes in a full mesh, senders on each sending to receivers on the others for
//! a fixed time, with processes exiting at random on both sides and one link's cable cut midway.
//! At the end every message is accounted for, from the test's own records and the nodes'
//! counters: each delivered exactly once and in order per pair, or counted as failed with a
//! reason; `sent = delivered + dead letters + lost in transit`, with nothing left over.
//!
//! CI runs it for a few seconds per transport (`soak_every_message_is_accounted_for`);
//! `cargo test --release -- --ignored soak_long` runs it for five minutes per transport.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use rusm_cluster::{ClusterCa, DownReason, Error, Node, NodeEvent, NodeStats, Pid};
use rusm_testkit::expect_within;

use super::*;

/// Receiving processes per node.
const RECEIVERS: usize = 4;
/// Sending processes per node (each replaced by a new one when it exits).
const SENDERS: usize = 4;

/// One test-side record of a receiving process's mailbox, shared with the test.
#[derive(Default)]
struct Ledger {
    /// Messages the receivers read.
    read: AtomicU64,
    /// Messages that arrived twice, or out of order within their pair.
    violations: AtomicU64,
    first_violation: Mutex<Option<String>>,
}

/// What the senders saw, shared with the test.
#[derive(Default)]
struct Outcomes {
    ok: AtomicU64,
    not_connected: AtomicU64,
    other_errors: AtomicU64,
    first_other: Mutex<Option<String>>,
}

/// A small deterministic generator (xorshift), so a failing run can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The receivers of every node: `slots[node][i]`, replaced when one exits.
type Directory = Arc<Mutex<Vec<Vec<Pid>>>>;

fn spawn_receiver(node: &Node, ledger: Arc<Ledger>) -> Pid {
    node.spawn(move |mut ctx| async move {
        // The last number seen from each sender: a pair's messages must arrive in order, once.
        let mut last: HashMap<u64, u64> = HashMap::new();
        while let Some(msg) = ctx.recv().await {
            let p = msg.payload();
            let sender = u64::from_le_bytes(p[0..8].try_into().unwrap());
            let seq = u64::from_le_bytes(p[8..16].try_into().unwrap());
            ledger.read.fetch_add(1, Ordering::Relaxed);
            let prev = last.insert(sender, seq);
            if prev.is_some_and(|prev| prev >= seq) {
                ledger.violations.fetch_add(1, Ordering::Relaxed);
                ledger
                    .first_violation
                    .lock()
                    .unwrap()
                    .get_or_insert(format!("sender {sender}: {seq} after {prev:?}"));
            }
        }
    })
}

/// What every sender shares.
#[derive(Clone)]
struct Senders {
    dir: Directory,
    out: Arc<Outcomes>,
    stop: Arc<AtomicBool>,
}

/// A sender (number `id`, on node `me`) sends `count` messages to receivers on other nodes
/// picked at random, then exits.
fn spawn_sender(node: &Node, me: usize, id: u64, count: u64, seed: u64, shared: Senders) {
    let Senders { dir, out, stop } = shared;
    node.spawn(move |ctx| async move {
        let mut rng = Rng(seed | 1);
        for seq in 0..count {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let to = {
                let dir = dir.lock().unwrap();
                let mut n = rng.below(dir.len() - 1);
                if n >= me {
                    n += 1;
                }
                dir[n][rng.below(RECEIVERS)].clone()
            };
            let mut buf = BytesMut::with_capacity(64);
            buf.put_u64_le(id);
            buf.put_u64_le(seq);
            buf.put_bytes(0, 48);
            match ctx.send_to(&to, buf.freeze()).await {
                Ok(()) => out.ok.fetch_add(1, Ordering::Relaxed),
                Err(e) => match e.error {
                    // The link is down (cut, or being replaced): the sender is told, with the
                    // payload back. Back off a little, as a real sender would.
                    Error::NotConnected { .. } => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        out.not_connected.fetch_add(1, Ordering::Relaxed)
                    }
                    other => {
                        out.first_other
                            .lock()
                            .unwrap()
                            .get_or_insert(other.to_string());
                        out.other_errors.fetch_add(1, Ordering::Relaxed)
                    }
                },
            };
        }
    });
}

fn total(nodes: &[Node]) -> NodeStats {
    let mut t = NodeStats::default();
    for s in nodes.iter().map(|n| n.stats()) {
        t.messages_sent += s.messages_sent;
        t.messages_received += s.messages_received;
        t.dead_letters += s.dead_letters;
        t.lost_in_transit += s.lost_in_transit;
        t.unread_at_exit += s.unread_at_exit;
        t.send_failures += s.send_failures;
        t.lost_messages += s.lost_messages;
        t.local_messages += s.local_messages;
        t.links_down += s.links_down;
    }
    t
}

/// Runs the soak for `run` on transport `T`.
pub async fn soak<T: CutPath>(run: Duration) {
    let ca = ClusterCa::generate("soak").unwrap();
    let config = quick_reconnecting();
    let mut nodes = Vec::new();
    for name in ["n0", "n1", "n2"] {
        nodes.push(start_node::<T>(&ca, name, config.clone()).await.unwrap());
    }
    // n2 reaches n1 over a path whose cable the test cuts; both reach n0 directly. n2's link to
    // n1 comes up first, so the mesh finds it there and dials no other.
    let path = T::path(nodes[2].local_addr(), nodes[1].local_addr()).await;
    nodes[2].connect("n1", path.dial).await.unwrap();
    nodes[1].connect("n0", nodes[0].local_addr()).await.unwrap();
    nodes[2].connect("n0", nodes[0].local_addr()).await.unwrap();
    wait_until(|| nodes.iter().all(|n| n.peers().len() == 2)).await;

    let ledger = Arc::new(Ledger::default());
    let out = Arc::new(Outcomes::default());
    let stop = Arc::new(AtomicBool::new(false));
    let dir: Directory = Arc::new(Mutex::new(
        nodes
            .iter()
            .map(|n| {
                (0..RECEIVERS)
                    .map(|_| spawn_receiver(n, ledger.clone()))
                    .collect()
            })
            .collect(),
    ));
    let senders = Senders {
        dir: dir.clone(),
        out: out.clone(),
        stop: stop.clone(),
    };
    let mut rng = Rng(0x5eed_50a4);
    let mut next_sender = 0u64;
    let started = Instant::now();
    let mut kills = 0u64;
    let mut events = nodes[1].subscribe();
    let mut cut: Option<Instant> = None;
    let mut detected: Option<Duration> = None;
    let cut_at = run / 3;
    let live = |node: &Node| node.stats().processes;

    // Keep SENDERS senders alive per node; every 100 ms or so one receiver is killed (its
    // mailbox dropped unread, messages on their way to it dead letters) and replaced.
    while started.elapsed() < run {
        for (i, node) in nodes.iter().enumerate() {
            // Receivers, plus this node's senders.
            while live(node) < RECEIVERS + SENDERS {
                next_sender += 1;
                let count = 500 + rng.below(5_000) as u64;
                spawn_sender(node, i, next_sender, count, rng.next(), senders.clone());
            }
        }
        if rng.below(5) == 0 {
            let n = rng.below(nodes.len());
            let slot = rng.below(RECEIVERS);
            let victim = dir.lock().unwrap()[n][slot].clone();
            if nodes[n].kill(&victim) {
                kills += 1;
            }
            let fresh = spawn_receiver(&nodes[n], ledger.clone());
            dir.lock().unwrap()[n][slot] = fresh;
        }
        if cut.is_none() && started.elapsed() >= cut_at {
            path.cut();
            cut = Some(Instant::now());
        }
        if let (Some(at), None) = (cut, detected) {
            while let Ok(e) = events.try_recv() {
                if let NodeEvent::NodeDown { node, reason } = e {
                    if node.as_str() == "n2" {
                        assert_eq!(reason, DownReason::TimedOut, "the cut link times out");
                        detected = Some(at.elapsed());
                        path.restore();
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let detected = detected.expect("the cut link was declared down during the run");
    // Senders finish their current send and exit; then every link is back up (the cut one
    // reconnected by itself), which settles what was in transit on the failed link.
    expect_within("senders to exit", Duration::from_secs(30), async {
        while nodes.iter().any(|n| live(n) > RECEIVERS) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    expect_within(
        "the mesh to be whole again",
        Duration::from_secs(30),
        async {
            while !nodes.iter().all(|n| n.peers().len() == 2) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    // Everything sent has landed somewhere (a mailbox, a dead letter, or counted lost), and
    // the receivers have read their mailboxes.
    let settled = expect_within("the messages to settle", Duration::from_secs(30), async {
        loop {
            let t = total(&nodes);
            let landed = t.messages_received + t.dead_letters + t.lost_in_transit;
            let read = ledger.read.load(Ordering::Relaxed);
            if landed == t.messages_sent && read + t.unread_at_exit == t.messages_received {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Nothing moves afterwards.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = total(&nodes);
    let read = ledger.read.load(Ordering::Relaxed);
    let ok = out.ok.load(Ordering::Relaxed);
    let not_connected = out.not_connected.load(Ordering::Relaxed);
    let other = out.other_errors.load(Ordering::Relaxed);
    eprintln!(
        "soak on {}: {:.0} s, {} sent ok ({:.0}/s), {} refused (not connected), {} other errors; \
         read {}, unread at exit {}, dead letters {}, lost in transit {} (receivers saw {} gaps); \
         {} receivers killed, {} senders started; cut detected after {:?}; links down {}",
        T::NAME,
        run.as_secs_f64(),
        ok,
        ok as f64 / started.elapsed().as_secs_f64(),
        not_connected,
        other,
        read,
        t.unread_at_exit,
        t.dead_letters,
        t.lost_in_transit,
        t.lost_messages,
        kills,
        next_sender,
        detected,
        t.links_down,
    );
    assert_eq!(t, settled, "counters moved after settling");
    assert_eq!(
        ledger.violations.load(Ordering::Relaxed),
        0,
        "a message arrived twice or out of order: {:?}",
        ledger.first_violation.lock().unwrap()
    );
    assert_eq!(
        other,
        0,
        "sends failed for another reason than a lost link: {:?}",
        out.first_other.lock().unwrap()
    );
    // Every send the test saw succeed, the nodes counted as sent, and nothing else.
    assert_eq!(t.messages_sent, ok, "sends that returned Ok");
    assert_eq!(t.local_messages, 0, "all traffic crossed links");
    // sent = delivered + dead letters + lost in transit.
    assert_eq!(
        t.messages_sent,
        t.messages_received + t.dead_letters + t.lost_in_transit
    );
    // delivered = read by the receivers + dropped unread when a receiver was killed.
    assert_eq!(t.messages_received, read + t.unread_at_exit);
    // The run did what it claims: processes exited with mail on their way. (Whether the cut
    // finds messages in flight depends on timing, so losses in transit are not asserted here;
    // `messages_lost_in_transit_are_counted_on_relink` counts them exactly.)
    assert!(kills > 0 && t.dead_letters + t.unread_at_exit > 0);
    for n in &nodes {
        n.shutdown().await;
    }
}

/// The CI soak: a few seconds per transport.
pub async fn soak_every_message_is_accounted_for<T: CutPath>() {
    soak::<T>(Duration::from_secs(15)).await
}
