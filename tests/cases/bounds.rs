//! Memory bounded against a peer that holds a trusted certificate and completes the hello, then
//! misbehaves: what it can make the node hold stays within the link budget plus a stated
//! margin, the node's other links keep delivering, and the link is closed with a typed reason
//! that is counted.
//!
//! These cases measure the process's resident memory, so they run from `tests/memory_bounds.rs`,
//! one after another in a process of their own, not in the parallel conformance matrix.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use rusm_cluster::core::transport::{Connection, SendStream, Transport};
use rusm_cluster::core::wire::{encode_header, Dest, EnvelopeHeader};
use rusm_cluster::{ClusterCa, DownReason, InboundClose, InboundConfig, Node, NodeEvent};
use rusm_testkit::start_node;

use super::*;

/// The link budget of the attacked node.
pub const BUDGET: usize = 4 << 20;
/// What resident memory may grow by beyond twice the budget (the budget plus the reserve a
/// gap-filling message may draw on): QUIC receive buffers (one 4 MiB connection window here),
/// the attacker's own send buffers (it runs in this process), allocator slack.
pub const MARGIN: usize = 48 << 20;

/// This process's resident memory in bytes (Linux), 0 where unknown.
fn rss() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Samples resident memory every 20 ms until stopped; the peak is in the returned counter.
fn watch_rss() -> (Arc<AtomicUsize>, Arc<AtomicBool>) {
    let peak = Arc::new(AtomicUsize::new(rss()));
    let stop = Arc::new(AtomicBool::new(false));
    let (p, s) = (peak.clone(), stop.clone());
    tokio::spawn(async move {
        while !s.load(Ordering::Relaxed) {
            p.fetch_max(rss(), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (peak, stop)
}

/// Resident memory peaked within twice the budget plus [`MARGIN`] above `base` (and says by
/// how much, for the record).
fn assert_grew_within_bounds<T: Transport>(peak: &AtomicUsize, base: usize) {
    let grown = peak.load(Ordering::Relaxed).saturating_sub(base);
    eprintln!(
        "{}: resident memory grew by {:.1} MiB at peak",
        T::NAME,
        grown as f64 / f64::from(1 << 20)
    );
    assert!(
        grown < 2 * BUDGET + MARGIN,
        "resident memory grew by {} MiB (budget {} MiB)",
        grown >> 20,
        BUDGET >> 20
    );
}

/// `london` with a small budget and windows, `paris` linked to it with an `inbox` on london,
/// and mallory linked by hand.
async fn attacked<T: Transport>(
    inbound: InboundConfig,
) -> (Node, Node, mpsc::UnboundedReceiver<Message>, RawPeer<T>) {
    let ca = ClusterCa::generate("test").unwrap();
    let mut config = rusm_testkit::test_config();
    config.link_budget_bytes = BUDGET;
    config.inbound = inbound;
    config.limits.max_message_size = 1 << 20;
    config.tuning.stream_receive_window = 1 << 20;
    config.tuning.connection_receive_window = 4 << 20;
    let london = start_node::<T>(&ca, "london", config).await.unwrap();
    let paris = node::<T>(&ca, "paris").await;
    paris.connect("london", london.local_addr()).await.unwrap();
    let (p, inbox) = collector(&london);
    london.register("inbox", &p).unwrap();
    let raw = linked_raw::<T>(&ca, &london).await;
    wait_until(|| london.peers().len() == 2).await;
    (london, paris, inbox, raw)
}

/// The envelope of message `seq` of the pair (process 1 → `inbox`), with `len` payload bytes
/// announced.
fn envelope(seq: u64, len: u64) -> Bytes {
    encode_header(&EnvelopeHeader {
        to: Dest::Name("inbox".into()),
        from: Some(1),
        seq,
        len,
    })
}

/// The link to mallory goes down with a reason matching `expected`, and paris's link is
/// still up and delivering.
async fn mallory_cut_off(
    london: &Node,
    paris: &Node,
    inbox: &mut mpsc::UnboundedReceiver<Message>,
    events: &mut broadcast::Receiver<NodeEvent>,
) -> InboundClose {
    let down = next_down(events).await;
    let NodeEvent::NodeDown {
        node,
        reason: DownReason::PeerMisbehaved(why),
    } = down
    else {
        panic!("expected mallory cut off for misbehaving, got {down:?}");
    };
    assert_eq!(node.as_str(), "mallory");
    assert_eq!(london.peers().len(), 1, "paris's link stays up");
    paris
        .send("london", "inbox", Bytes::from_static(b"after"))
        .await
        .unwrap();
    within(async { while recv(inbox).await.payload() != &Bytes::from_static(b"after") {} }).await;
    why
}

/// A peer withholds message 1 of a pair and sends 1,000,000 later ones (1,000 to a stream):
/// the held-back messages are charged to the link budget, the node stops reading once it is
/// spent, and the gap that never fills closes the link.
pub async fn withheld_first_message_cannot_grow_memory<T: Transport>() {
    let mut inbound = InboundConfig::default();
    inbound.gap_timeout = Duration::from_secs(3);
    inbound.stall_timeout = Duration::from_secs(600);
    let (london, paris, mut inbox, raw) = attacked::<T>(inbound).await;
    let mut events = london.subscribe();
    let base = rss();
    let (peak, stop) = watch_rss();
    let conn = raw.conn.clone();
    let flood = tokio::spawn(async move {
        let payload = [7u8; 64];
        let mut seq = 2;
        // At most 8 streams written and not yet acknowledged, so the attacker's own stack does
        // not buffer the whole flood (it runs in this process, whose memory is measured).
        let mut unacked = FuturesUnordered::new();
        while seq <= 1_000_001 {
            while unacked.len() >= 8 {
                if let Some(Err(_)) = unacked.next().await {
                    return seq - 2;
                }
            }
            let Ok(mut stream) = conn.open_uni().await else {
                break;
            };
            let mut buf = BytesMut::new();
            for _ in 0..1000 {
                buf.extend_from_slice(&envelope(seq, 64));
                buf.extend_from_slice(&payload);
                seq += 1;
            }
            if stream.write(buf.freeze()).await.is_err() || stream.finish().is_err() {
                break;
            }
            unacked.push(async move { stream.delivered().await });
        }
        seq - 2
    });
    // While mallory's pair is wedged, paris's messages on another link are delivered.
    tokio::time::sleep(Duration::from_secs(1)).await;
    paris
        .send("london", "inbox", Bytes::from_static(b"still here"))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut inbox).await.payload(),
        &Bytes::from_static(b"still here"),
        "nothing of mallory's was delivered ahead of its message 1"
    );
    let why = mallory_cut_off(&london, &paris, &mut inbox, &mut events).await;
    stop.store(true, Ordering::Relaxed);
    assert!(
        matches!(
            &why,
            InboundClose::GapTimeout {
                from: Some(1),
                waiting_for: 1,
                ..
            }
        ),
        "{why:?}"
    );
    assert_eq!(london.stats().gap_timeouts, 1);
    let sent = within(flood).await.unwrap();
    assert!(
        sent < 1_000_000,
        "flow control stopped the flood ({sent} messages written)"
    );
    assert_grew_within_bounds::<T>(&peak, base);
}

/// A peer opens 4,096 streams that each announce a maximum-size message and send half of it,
/// never finishing: each message is charged its whole length before its payload is read, the
/// node stops reading once the budget is spent, and the stall closes the link.
pub async fn unfinished_large_messages_cannot_grow_memory<T: Transport>() {
    let mut inbound = InboundConfig::default();
    inbound.gap_timeout = Duration::from_secs(600);
    inbound.stall_timeout = Duration::from_secs(2);
    let (london, paris, mut inbox, raw) = attacked::<T>(inbound).await;
    let mut events = london.subscribe();
    let max = london.config().limits.max_message_size as u64;
    let base = rss();
    let (peak, stop) = watch_rss();
    let conn = raw.conn.clone();
    let flood = tokio::spawn(async move {
        let half = Bytes::from(vec![9u8; (max / 2) as usize]);
        let mut streams = Vec::new();
        for pair in 0..4096u64 {
            let Ok(mut stream) = conn.open_uni().await else {
                break;
            };
            let header = encode_header(&EnvelopeHeader {
                to: Dest::Name("inbox".into()),
                from: Some(pair),
                seq: 1,
                len: max,
            });
            // Written in the background: a write blocks once flow control stops it.
            let half = half.clone();
            streams.push(tokio::spawn(async move {
                let _ = stream.write_all_chunks(&mut [header, half]).await;
                stream
            }));
        }
        streams.len()
    });
    let why = mallory_cut_off(&london, &paris, &mut inbox, &mut events).await;
    stop.store(true, Ordering::Relaxed);
    assert!(
        matches!(&why, InboundClose::Stalled { partial_bytes, .. } if *partial_bytes > 0),
        "{why:?}"
    );
    assert_eq!(london.stats().stalled_links, 1);
    flood.abort();
    assert_grew_within_bounds::<T>(&peak, base);
}
