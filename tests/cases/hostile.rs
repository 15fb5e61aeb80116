//! Broken and hostile peers: malformed and oversized input closes only the offending link (or
//! stream), is counted, and everything else goes on.

use bytes::Bytes;
use rusm_cluster::core::transport::{
    close_code, stream_code, Connection, RecvStream, SendStream, Transport, TransportError,
};
use rusm_cluster::core::wire::{
    encode_frame, encode_header, Dest, EnvelopeHeader, Frame, FrameDecoder, Hello, PROTOCOL_VERSION,
};
use rusm_cluster::{ClusterCa, Error, Node};

use super::*;

/// A peer driven by hand over the bare transport, speaking the wire protocol directly.
pub struct RawPeer<T: Transport> {
    _endpoint: T,
    pub conn: T::Connection,
    pub send: <T::Connection as Connection>::SendStream,
    pub recv: <T::Connection as Connection>::RecvStream,
}

impl<T: Transport> RawPeer<T> {
    /// Connects to `target` with a certificate for `cert_name`.
    pub async fn dial(ca: &ClusterCa, cert_name: &str, target: &Node) -> Self {
        let endpoint: T = raw_endpoint(ca.issue(cert_name).unwrap(), ca);
        let conn = endpoint
            .connect(target.local_addr(), target.name().as_str())
            .await
            .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        RawPeer {
            _endpoint: endpoint,
            conn,
            send,
            recv,
        }
    }

    /// Sends a hello claiming `name` with protocol `version`; returns the answer frame.
    pub async fn hello(&mut self, name: &str, version: u32) -> Option<Frame> {
        let hello = Frame::Hello(Hello {
            protocol: version,
            min_protocol: None,
            capabilities: vec![],
            name: name.try_into().unwrap(),
            creation: 1,
            listen_addr: None,
            peers: vec![],
            hidden: false,
            max_message_size: 1 << 20,
            link: 0,
            previous: None,
        });
        self.send
            .write(encode_frame(&hello).unwrap())
            .await
            .unwrap();
        let mut dec = FrameDecoder::new(1 << 20);
        within(async {
            loop {
                if let Some(f) = dec.next_frame().unwrap() {
                    return Some(f);
                }
                match self.recv.read_chunk().await {
                    Ok(Some(c)) => dec.push(&c),
                    _ => return None,
                }
            }
        })
        .await
    }

    /// Waits for the node to close the connection; returns its reason.
    pub async fn closed_reason(&self) -> String {
        match within(self.conn.closed()).await {
            TransportError::ClosedByPeer { reason, .. } => reason,
            other => other.to_string(),
        }
    }
}

pub async fn linked_raw<T: Transport>(ca: &ClusterCa, london: &Node) -> RawPeer<T> {
    let mut raw = RawPeer::<T>::dial(ca, "mallory", london).await;
    let answer = raw.hello("mallory", PROTOCOL_VERSION).await;
    assert!(matches!(answer, Some(Frame::Welcome(_))), "{answer:?}");
    raw
}

pub async fn malformed_control_frame_closes_only_that_link<T: Transport>() {
    let (ca, london, paris) = pair::<T>().await;
    let (p, mut inbox) = collector(&london);
    london.register("inbox", &p).unwrap();
    let mut raw = linked_raw::<T>(&ca, &london).await;
    wait_until(|| london.peers().len() == 2).await;
    // A well-framed length with garbage inside.
    let mut garbage = 5u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xc1, 0xc1, 0xc1, 0xc1, 0xc1]);
    raw.send.write(Bytes::from(garbage)).await.unwrap();
    let reason = raw.closed_reason().await;
    assert!(reason.contains("protocol violation"), "{reason}");
    wait_until(|| london.peers().len() == 1).await;
    assert_eq!(london.stats().malformed_frames, 1);
    // The node and its other link go on.
    paris
        .send("london", "inbox", Bytes::from_static(b"still here"))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut inbox).await.payload(),
        &Bytes::from_static(b"still here")
    );
}

pub async fn oversized_control_frame_closes_only_that_link<T: Transport>() {
    let (ca, london, paris) = pair::<T>().await;
    let (p, mut inbox) = collector(&london);
    london.register("inbox", &p).unwrap();
    let mut raw = linked_raw::<T>(&ca, &london).await;
    // Announce a 4 GiB frame: refused from the length alone, nothing buffered.
    raw.send
        .write(Bytes::copy_from_slice(&u32::MAX.to_be_bytes()))
        .await
        .unwrap();
    let reason = raw.closed_reason().await;
    assert!(reason.contains("over the limit"), "{reason}");
    assert_eq!(london.stats().malformed_frames, 1);
    // A hello-sized garbage first frame from a fresh peer is refused the same way.
    let mut raw2 = RawPeer::<T>::dial(&ca, "mallory", &london).await;
    raw2.send
        .write(Bytes::copy_from_slice(&u32::MAX.to_be_bytes()))
        .await
        .unwrap();
    let _ = raw2.closed_reason().await;
    assert_eq!(london.stats().malformed_frames, 2);
    paris
        .send("london", "inbox", Bytes::from_static(b"fine"))
        .await
        .unwrap();
    recv(&mut inbox).await;
    assert_eq!(london.peers().len(), 1);
}

pub async fn message_over_max_size_is_refused_by_sender<T: Transport>() {
    let ca = ClusterCa::generate("prod").unwrap();
    let london = rusm_testkit::issued::<T>(&ca, "london")
        .max_message_size(1024)
        .start()
        .await
        .unwrap();
    let paris = node::<T>(&ca, "paris").await;
    paris.connect("london", london.local_addr()).await.unwrap();
    let (p, mut inbox) = collector(&london);
    london.register("inbox", &p).unwrap();
    // paris learned london's limit in the welcome and refuses before sending.
    let big = Bytes::from(vec![1u8; 2048]);
    let err = paris
        .send("london", "inbox", big.clone())
        .await
        .unwrap_err();
    assert!(matches!(
        err.error,
        Error::MessageTooLarge {
            size: 2048,
            max: 1024
        }
    ));
    assert_eq!(err.into_payload(), big);
    assert_eq!(paris.stats().refused_too_large, 1);
    let ok = Bytes::from(vec![2u8; 1024]);
    paris.send("london", "inbox", ok.clone()).await.unwrap();
    assert_eq!(recv(&mut inbox).await.payload(), &ok);
}

pub async fn oversized_stream_is_stopped_by_receiver<T: Transport>() {
    let (ca, london, _paris) = pair::<T>().await;
    let (p, mut inbox) = collector(&london);
    london.register("inbox", &p).unwrap();
    let raw = linked_raw::<T>(&ca, &london).await;
    // A stream whose header announces 1 GiB: stopped after the header, never buffered.
    let mut s = raw.conn.open_uni().await.unwrap();
    let header = encode_header(&EnvelopeHeader {
        to: Dest::Name("inbox".into()),
        from: None,
        seq: 1,
        len: 1 << 30,
    });
    s.write(header).await.unwrap();
    let chunk = Bytes::from(vec![0u8; 64 << 10]);
    let stopped = within(async {
        loop {
            match s.write(chunk.clone()).await {
                Ok(()) => continue,
                Err(e) => return e,
            }
        }
    })
    .await;
    assert_eq!(
        stopped,
        TransportError::StreamStopped {
            code: u64::from(stream_code::TOO_LARGE)
        }
    );
    wait_until(|| london.stats().oversized_messages == 1).await;
    // The link is still up, and the next message of the same pair is not held behind the gap.
    let mut s = raw.conn.open_uni().await.unwrap();
    let payload = Bytes::from_static(b"after");
    let header = encode_header(&EnvelopeHeader {
        to: Dest::Name("inbox".into()),
        from: None,
        seq: 2,
        len: payload.len() as u64,
    });
    s.write_all_chunks(&mut [header, payload.clone()])
        .await
        .unwrap();
    s.finish().unwrap();
    assert_eq!(recv(&mut inbox).await.payload(), &payload);
    assert_eq!(london.peers().len(), 2);
    let _ = close_code::NORMAL;
}

/// A flood of connections that finish TLS and never say hello holds at most
/// `max_pending_handshakes` places, each for at most the handshake timeout; the rest are refused
/// at once and counted, an established link keeps delivering, and a real node links once the
/// flood is gone.
pub async fn a_connection_flood_holds_a_bounded_number_of_places<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let mut config = rusm_testkit::test_config();
    config.max_pending_handshakes = 4;
    config.handshake_timeout = std::time::Duration::from_secs(2);
    let london = rusm_testkit::start_node::<T>(&ca, "london", config)
        .await
        .unwrap();
    let paris = node::<T>(&ca, "paris").await;
    paris.connect("london", london.local_addr()).await.unwrap();
    let (inbox, mut at_inbox) = collector(&london);
    london.register("inbox", &inbox).unwrap();

    // 12 clients with trusted certificates that finish TLS and never send a hello.
    let addr = london.local_addr();
    let flood: Vec<_> = (0..12)
        .map(|i| {
            let id = ca.issue(&format!("flood{i}")).unwrap();
            let ca = &ca;
            async move {
                let endpoint: T = raw_endpoint(id, ca);
                let conn = tokio::time::timeout(
                    std::time::Duration::from_secs(3),
                    endpoint.connect(addr, "london"),
                )
                .await;
                (endpoint, conn)
            }
        })
        .collect();
    let held = futures_util::future::join_all(flood).await;
    // The established link delivers all along.
    paris
        .send("london", "inbox", Bytes::from_static(b"during the flood"))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut at_inbox).await.payload().as_ref(),
        b"during the flood"
    );
    let refused = || {
        london
            .report()
            .refusals
            .get("flood: too many handshakes in progress")
            .copied()
            .unwrap_or(0)
    };
    let counted = refused();
    assert!(counted >= 1, "{:?}", london.report().refusals);
    // Counted as refused handshakes too (read after: that counter moves first).
    assert!(london.stats().rejected_handshakes >= counted);
    // The ones admitted are dropped at the hello timeout; then a real node links.
    wait_until(|| {
        london
            .report()
            .refusals
            .get("hello: none in time")
            .copied()
            .unwrap_or(0)
            >= 1
    })
    .await;
    let rome = node::<T>(&ca, "rome").await;
    within(async {
        loop {
            if rome.connect("london", addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(london.peers().iter().any(|p| p.name.as_str() == "rome"));
    drop(held);
}
