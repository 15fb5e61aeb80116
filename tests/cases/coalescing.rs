//! Coalescing (on by default; forced on here, whatever the arm): queued messages to one peer share streams, order and count are kept, a
//! goodbye flushes the queue; and any receiver splits a stream of several messages, within its
//! memory budget.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rusm_cluster::core::transport::{Connection, SendStream, Transport};
use rusm_cluster::core::wire::{encode_header_into, Dest, EnvelopeHeader};
use rusm_cluster::{ClusterCa, Coalescing, Node};

use super::*;

/// Starts node `name` with coalescing on.
async fn coalescing_node<T: Transport>(ca: &ClusterCa, name: &str) -> Node {
    let mut config = rusm_testkit::test_config();
    config.coalescing = Some(Coalescing::default());
    rusm_testkit::issued::<T>(ca, name)
        .config(config)
        .start()
        .await
        .unwrap()
}

/// `london` (default settings) and `paris` (coalescing), `paris` connected to `london`.
async fn coalescing_pair<T: Transport>() -> (Node, Node) {
    let ca = ClusterCa::generate("test").unwrap();
    let london = node::<T>(&ca, "london").await;
    let paris = coalescing_node::<T>(&ca, "paris").await;
    paris.connect("london", london.local_addr()).await.unwrap();
    (london, paris)
}

/// A numbered payload: `n` in its first 8 bytes, padded to `len`.
fn numbered(n: u64, len: usize) -> Bytes {
    let mut b = vec![0u8; len.max(8)];
    b[..8].copy_from_slice(&n.to_be_bytes());
    Bytes::from(b)
}

fn number(m: &rusm_cluster::Message) -> u64 {
    u64::from_be_bytes(m.payload()[..8].try_into().unwrap())
}

/// Two processes each send 10,000 messages (every 500th a large one) as fast as the queue
/// takes them: every message arrives once, in order per pair, on far fewer streams.
pub async fn coalescing_keeps_order_and_loses_nothing<T: Transport>() {
    let (london, paris) = coalescing_pair::<T>().await;
    let (sink, mut inbox) = collector(&london);
    const N: u64 = 10_000;
    for _ in 0..2 {
        let sink = sink.clone();
        paris.spawn(move |ctx| async move {
            for i in 0..N {
                let len = if i % 500 == 499 { 100_000 } else { 64 };
                ctx.send_to(&sink, numbered(i, len)).await.unwrap();
            }
        });
    }
    let mut next = std::collections::HashMap::new();
    for _ in 0..2 * N {
        let m = recv(&mut inbox).await;
        let from = m.from().cloned().expect("sent from a process");
        let want = next.entry(from).or_insert(0u64);
        let n = number(&m);
        assert_eq!(n, *want, "per-pair order");
        let len = if n % 500 == 499 { 100_000 } else { 64 };
        assert_eq!(m.payload().len(), len);
        *want += 1;
    }
    assert!(next.values().all(|&n| n == N));
    wait_until(|| paris.peers()[0].messages_sent == 2 * N).await;
    let streams = paris.peers()[0].streams_sent;
    assert!(
        streams < N,
        "{} messages went on {streams} streams: nothing was coalesced",
        2 * N
    );
    let stats = london.stats();
    assert_eq!(stats.messages_received, 2 * N);
    assert_eq!(stats.lost_messages + stats.malformed_messages, 0);
    assert_eq!(paris.stats().send_failures, 0);
}

/// Sends return once queued; shutting down right after still delivers every queued message
/// (the goodbye waits for the queue to drain).
pub async fn coalesced_goodbye_flushes_the_queue<T: Transport>() {
    let (london, paris) = coalescing_pair::<T>().await;
    let (sink, mut inbox) = collector(&london);
    london.register("sink", &sink).unwrap();
    const N: u64 = 5_000;
    for i in 0..N {
        paris.send("london", "sink", numbered(i, 64)).await.unwrap();
    }
    let streams = paris.peers()[0].streams_sent;
    within(paris.shutdown()).await;
    for i in 0..N {
        assert_eq!(number(&recv(&mut inbox).await), i);
    }
    assert_eq!(paris.stats().send_failures, 0);
    assert_eq!(paris.stats().messages_sent, N);
    assert_eq!(paris.stats().lost_in_transit, 0);
    assert!(
        streams < N / 2,
        "{N} messages went on {streams} streams by the goodbye: little was queued"
    );
}

/// Several messages on one stream, from any peer: each is delivered, and one cut short at the
/// end of the stream is counted as malformed without costing the others.
pub async fn several_messages_on_one_stream_are_split<T: Transport>() {
    let (ca, london, _paris) = pair::<T>().await;
    let (p, mut inbox) = collector(&london);
    london.register("inbox", &p).unwrap();
    let raw = linked_raw::<T>(&ca, &london).await;
    let mut data = BytesMut::new();
    for seq in 1..=4u64 {
        let body = numbered(seq, 10 + seq as usize * 1000);
        encode_header_into(
            &EnvelopeHeader {
                to: Dest::Name("inbox".into()),
                from: Some(1),
                seq,
                len: body.len() as u64,
            },
            &mut data,
        );
        data.extend_from_slice(&body);
    }
    // The fourth message's last bytes never come.
    data.truncate(data.len() - 100);
    let mut s = raw.conn.open_uni().await.unwrap();
    s.write(data.freeze()).await.unwrap();
    s.finish().unwrap();
    for seq in 1..=3 {
        let m = recv(&mut inbox).await;
        assert_eq!(number(&m), seq);
        assert_eq!(m.payload().len(), 10 + seq as usize * 1000);
    }
    wait_until(|| london.stats().malformed_messages == 1).await;
    assert_eq!(london.stats().messages_received, 3);
    assert!(inbox.try_recv().is_err());
}

/// One stream that never ends, to a process that does not read: the receiving node holds no
/// more than its link budget, QUIC flow control stalls the writer, and once the process reads,
/// everything arrives in order.
pub async fn an_endless_stream_stays_within_the_link_budget<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let mut config = rusm_testkit::test_config();
    config.link_budget_bytes = 1 << 20;
    let london = rusm_testkit::issued::<T>(&ca, "london")
        .config(config)
        .start()
        .await
        .unwrap();
    let (go, gate) = tokio::sync::oneshot::channel::<()>();
    let (tx, mut inbox) = tokio::sync::mpsc::unbounded_channel();
    let slow = london.spawn(|mut ctx| async move {
        let _ = gate.await;
        while let Some(m) = ctx.recv().await {
            if tx.send(m).is_err() {
                break;
            }
        }
    });
    london.register("slow", &slow).unwrap();
    let raw = linked_raw::<T>(&ca, &london).await;

    const MESSAGES: u64 = 8_000;
    const SIZE: usize = 4096;
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let written = written.clone();
        let conn = raw.conn.clone();
        tokio::spawn(async move {
            let mut s = conn.open_uni().await.unwrap();
            for seq in 1..=MESSAGES {
                let mut data = BytesMut::new();
                let body = numbered(seq, SIZE);
                encode_header_into(
                    &EnvelopeHeader {
                        to: Dest::Name("slow".into()),
                        from: Some(1),
                        seq,
                        len: SIZE as u64,
                    },
                    &mut data,
                );
                data.extend_from_slice(&body);
                s.write(data.freeze()).await.unwrap();
                written.fetch_add(1, Ordering::Relaxed);
            }
            s.finish().unwrap();
        })
    };
    // Wait until the writer stalls (nothing more written for 300 ms).
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let now = written.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let held = london.stats().messages_received;
    assert!(
        held as usize * SIZE <= 1 << 20,
        "{held} messages of {SIZE} bytes delivered past a budget of 1 MiB"
    );
    assert!(
        last < MESSAGES,
        "the writer was never slowed down ({last} of {MESSAGES} written)"
    );
    go.send(()).unwrap();
    for seq in 1..=MESSAGES {
        let m = within(inbox.recv()).await.unwrap();
        assert_eq!(number(&m), seq);
    }
    within(writer).await.unwrap();
    assert_eq!(london.stats().malformed_messages, 0);
}
