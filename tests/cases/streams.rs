//! The wire shape: one stream per message, read concurrently, so nothing waits on an unrelated
//! message.

use std::time::Instant;

use bytes::Bytes;
use rusm_cluster::core::transport::{Connection, SendStream, Transport};
use rusm_cluster::core::wire::{encode_header, Dest, EnvelopeHeader};

use super::*;

/// A 4 MiB message whose stream is left half-written does not delay 1,000 small messages sent
/// after it: no head-of-line blocking. (No timing involved: the big message cannot complete
/// until the small ones have all been delivered.)
pub async fn half_sent_large_message_does_not_block_small_ones<T: Transport>() {
    let (ca, london, _paris) = pair::<T>().await;
    let (big_sink, mut big_inbox) = collector(&london);
    let (small_sink, mut small_inbox) = collector(&london);
    london.register("big", &big_sink).unwrap();
    london.register("small", &small_sink).unwrap();
    let raw = linked_raw::<T>(&ca, &london).await;

    let big_len = 4 << 20;
    let mut big = raw.conn.open_uni().await.unwrap();
    let header = encode_header(&EnvelopeHeader {
        to: Dest::Name("big".into()),
        from: None,
        seq: 1,
        len: big_len as u64,
    });
    big.write(header).await.unwrap();
    big.write(Bytes::from(vec![9u8; big_len / 2]))
        .await
        .unwrap();

    for i in 0..1000u64 {
        let mut s = raw.conn.open_uni().await.unwrap();
        let payload = Bytes::copy_from_slice(&i.to_be_bytes());
        let header = encode_header(&EnvelopeHeader {
            to: Dest::Name("small".into()),
            from: Some(7),
            seq: i + 1,
            len: 8,
        });
        s.write_all_chunks(&mut [header, payload]).await.unwrap();
        s.finish().unwrap();
    }
    for i in 0..1000u64 {
        assert_eq!(recv(&mut small_inbox).await.payload()[..], i.to_be_bytes());
    }
    assert!(
        big_inbox.try_recv().is_err(),
        "the big message is still in flight"
    );

    big.write(Bytes::from(vec![9u8; big_len / 2]))
        .await
        .unwrap();
    big.finish().unwrap();
    let got = recv(&mut big_inbox).await;
    assert_eq!(got.payload().len(), big_len);
    assert!(got.payload().iter().all(|&b| b == 9));
}

/// What arrived in [`small_messages_overtake_a_large_one`], and when.
#[derive(Debug)]
enum Arrival {
    Big(Bytes, Instant),
    Small(Bytes),
}

/// Through the node API, small messages sent while a large one is still on the wire arrive
/// before it completes: nothing on the way (the sender, the streams, the receiver's reader)
/// makes them wait behind it. The large message's stream is open before the first small one is
/// sent, and its 32 MiB take far longer to cross a QUIC connection than 200 small messages, so
/// with head-of-line blocking anywhere it would arrive first (the arrival order is recorded on
/// one channel fed by both receiving processes). The case needs a transport whose bandwidth is
/// finite: if the large message arrives before the last small one is even sent, it fails as
/// inconclusive instead of passing.
pub async fn small_messages_overtake_a_large_one<T: Transport>() {
    overtaking::<T>(false).await
}

/// The same with coalescing on at the sender, set to queue every message (no direct write when
/// idle): a large message still goes on a stream of its own, not into the queue, so small ones
/// queued after it do not wait for it.
pub async fn small_messages_overtake_a_large_one_when_coalescing<T: Transport>() {
    overtaking::<T>(true).await
}

async fn overtaking<T: Transport>(coalescing: bool) {
    const BIG: usize = 32 << 20;
    const SMALL: u32 = 200;
    let ca = ClusterCa::generate("test").unwrap();
    let start = |name: &'static str| {
        let mut config = rusm_testkit::test_config();
        if coalescing && name == "paris" {
            let mut c = rusm_cluster::Coalescing::default();
            c.direct_after_idle = None;
            config.coalescing = Some(c);
        }
        config.limits.max_message_size = BIG;
        config.link_budget_bytes = 2 * BIG;
        rusm_testkit::issued::<T>(&ca, name).config(config).start()
    };
    let london = start("london").await.unwrap();
    let paris = start("paris").await.unwrap();
    paris.connect("london", london.local_addr()).await.unwrap();

    // Two processes (two pairs, so per-pair order does not tie them), one arrival log.
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let sink = || {
        let arrived = arrived.clone();
        london.spawn(move |mut ctx| async move {
            while let Some(m) = ctx.recv().await {
                let payload = m.into_payload();
                let arrival = match payload.len() {
                    BIG => Arrival::Big(payload, Instant::now()),
                    _ => Arrival::Small(payload),
                };
                if arrived.send(arrival).is_err() {
                    break;
                }
            }
        })
    };
    let big_sink = sink();
    let small_sink = sink();

    let streams_before = paris.peers()[0].streams_sent;
    let big = Bytes::from(vec![7u8; BIG]);
    let sending_big = {
        let (paris, big) = (paris.clone(), big.clone());
        tokio::spawn(async move {
            paris
                .send_to(&big_sink, big)
                .await
                .map_err(|e| e.to_string())
        })
    };
    // The big message's stream is open (and its writing begun) before any small one is sent.
    // (Its send may return before it is on the wire: s2n-quic takes the whole payload at once.)
    let big_stream_open = || paris.peers()[0].streams_sent == streams_before + 1;
    wait_until(|| big_stream_open() || sending_big.is_finished()).await;
    if !big_stream_open() {
        panic!("the large message was not sent: {:?}", sending_big.await);
    }
    for i in 0..SMALL {
        paris
            .send_to(&small_sink, Bytes::copy_from_slice(&i.to_be_bytes()))
            .await
            .unwrap();
    }
    let all_sent = Instant::now();
    for i in 0..SMALL {
        match within(arrivals.recv()).await.unwrap() {
            Arrival::Small(payload) => assert_eq!(payload[..], i.to_be_bytes()),
            Arrival::Big(_, at) if at < all_sent => panic!(
                "inconclusive: the {BIG}-byte message arrived {:?} before the last small one was \
                 sent (small message {i} of {SMALL} came after it); this case needs a transport \
                 on which a large message takes time to cross",
                all_sent - at
            ),
            Arrival::Big(..) => panic!(
                "the {BIG}-byte message completed before small message {i} of {SMALL}, all sent \
                 while it was on the wire: head-of-line blocking"
            ),
        }
    }
    match within(arrivals.recv()).await.unwrap() {
        Arrival::Big(payload, _) => {
            assert_eq!(payload.len(), BIG);
            assert!(payload == big, "large payload corrupted");
        }
        other => panic!("expected the large message, got {other:?}"),
    }
    within(sending_big).await.unwrap().unwrap();
    paris.shutdown().await;
    london.shutdown().await;
}

/// A sender that numbered a message but never finished writing it (its send was cancelled)
/// says so on the control stream; the receiver stops waiting for it, so the pair goes on.
pub async fn lost_notice_releases_the_pair<T: Transport>() {
    use rusm_cluster::core::wire::{encode_frame, Frame};
    let (ca, london, _paris) = pair::<T>().await;
    let (p, mut inbox) = collector(&london);
    london.register("inbox", &p).unwrap();
    let mut raw = linked_raw::<T>(&ca, &london).await;
    let send = |seq: u64, body: &'static [u8]| {
        let conn = raw.conn.clone();
        async move {
            let mut s = conn.open_uni().await.unwrap();
            let header = encode_header(&EnvelopeHeader {
                to: Dest::Name("inbox".into()),
                from: Some(3),
                seq,
                len: body.len() as u64,
            });
            s.write_all_chunks(&mut [header, Bytes::from_static(body)])
                .await
                .unwrap();
            s.finish().unwrap();
        }
    };
    // Message 2 arrives; message 1 never will.
    send(2, b"second").await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(inbox.try_recv().is_err(), "2 waits for 1");
    let lost = Frame::Lost {
        from: Some(3),
        to: Dest::Name("inbox".into()),
        seq: 1,
    };
    raw.send.write(encode_frame(&lost).unwrap()).await.unwrap();
    assert_eq!(
        recv(&mut inbox).await.payload(),
        &Bytes::from_static(b"second")
    );
    send(3, b"third").await;
    assert_eq!(
        recv(&mut inbox).await.payload(),
        &Bytes::from_static(b"third")
    );
    wait_until(|| london.stats().lost_messages == 1).await;
}

/// `delivered` (what the coalescing writer bounds its in-flight streams with) resolves once the
/// peer has everything, and fails when the peer stops the stream instead.
pub async fn delivered_waits_for_the_peer<T: Transport>() {
    use rusm_cluster::core::transport::{stream_code, RecvStream, TransportError};
    let ca = ClusterCa::generate("test").unwrap();
    let server: T = raw_endpoint(ca.issue("server").unwrap(), &ca);
    let client: T = raw_endpoint(ca.issue("client").unwrap(), &ca);
    let addr = server.local_addr().unwrap();
    let (dialled, accepted) = tokio::join!(client.connect(addr, "server"), async {
        server.accept().await.unwrap().await
    });
    let (out, inc) = (dialled.unwrap(), accepted.unwrap());

    let data = Bytes::from(vec![7u8; 300_000]);
    let mut s = out.open_uni().await.unwrap();
    s.write(data.clone()).await.unwrap();
    s.finish().unwrap();
    let mut r = within(inc.accept_uni()).await.unwrap().unwrap();
    let mut got = 0;
    while let Some(chunk) = within(r.read_chunk()).await.unwrap() {
        got += chunk.len();
    }
    assert_eq!(got, data.len());
    within(s.delivered()).await.unwrap();

    let mut s = out.open_uni().await.unwrap();
    s.write(Bytes::from_static(b"unwanted")).await.unwrap();
    let mut r = within(inc.accept_uni()).await.unwrap().unwrap();
    r.stop(stream_code::TOO_LARGE);
    // Once the sender has seen the stop (its writes fail), delivery is refused for good.
    let refused = within(async {
        loop {
            match s.write(Bytes::from_static(b"more")).await {
                Ok(()) => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
                Err(e) => return e,
            }
        }
    })
    .await;
    assert!(
        matches!(refused, TransportError::StreamStopped { .. }),
        "{refused:?}"
    );
    let _ = s.finish();
    assert_eq!(
        within(s.delivered()).await,
        Err(TransportError::StreamStopped {
            code: u64::from(stream_code::TOO_LARGE)
        })
    );
}
