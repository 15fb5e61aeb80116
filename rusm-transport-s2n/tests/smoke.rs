//! Two s2n endpoints on 127.0.0.1 talk to each other: identity, streams, limits, refusals and
//! close reasons, end to end over real UDP sockets.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rusm_cluster_core::identity::{ClusterCa, Identity};
use rusm_cluster_core::transport::{
    Connection, EndpointConfig, RecvStream, SendStream, Transport, TransportError, TransportTuning,
};
use rusm_transport_s2n::{S2nConnection, S2nRecv, S2nTransport, PRE_HANDSHAKE_REASON};

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("timed out")
}

fn endpoint(identity: Identity, ca: &ClusterCa) -> S2nTransport {
    S2nTransport::bind(EndpointConfig {
        live_trust: None,
        identity,
        trust: ca.trust(),
        listen: "127.0.0.1:0".parse().unwrap(),
        tuning: TransportTuning::default(),
    })
    .unwrap()
}

struct Pair {
    london: S2nTransport,
    _paris: S2nTransport,
    /// paris's side of the link (the dialler).
    dialled: S2nConnection,
    /// london's side of the link (the listener).
    accepted: S2nConnection,
}

async fn pair() -> Pair {
    let ca = ClusterCa::generate("smoke").unwrap();
    let london = endpoint(ca.issue("london").unwrap(), &ca);
    let paris = endpoint(ca.issue("paris").unwrap(), &ca);
    let addr = london.local_addr().unwrap();
    let (dialled, accepted) = within(async {
        tokio::join!(paris.connect(addr, "london"), async {
            london.accept().await.unwrap().await
        })
    })
    .await;
    Pair {
        london,
        _paris: paris,
        dialled: dialled.unwrap(),
        accepted: accepted.unwrap(),
    }
}

async fn read_to_end(r: &mut S2nRecv) -> Result<Bytes, TransportError> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = r.read_chunk().await? {
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_see_the_certified_name() {
    let p = pair().await;
    assert_eq!(p.dialled.peer_identity().dns_names, ["london"]);
    assert_eq!(p.accepted.peer_identity().dns_names, ["paris"]);
    assert_eq!(
        p.dialled.remote_addr(),
        p.london.local_addr().unwrap(),
        "the dialler talks to the listener's address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_stream_carries_bytes_both_ways() {
    let p = pair().await;
    let (mut send, mut recv) = p.dialled.open_bi().await.unwrap();
    send.write(Bytes::from_static(b"hello")).await.unwrap();
    send.finish().unwrap();
    let (mut l_send, mut l_recv) = within(p.accepted.accept_bi()).await.unwrap();
    assert_eq!(
        &within(read_to_end(&mut l_recv)).await.unwrap()[..],
        b"hello"
    );
    let mut chunks = [Bytes::from_static(b"wel"), Bytes::from_static(b"come")];
    l_send.write_all_chunks(&mut chunks).await.unwrap();
    l_send.finish().unwrap();
    assert_eq!(
        &within(read_to_end(&mut recv)).await.unwrap()[..],
        b"welcome"
    );
    assert!(p.dialled.rtt().is_some(), "an RTT was measured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_uni_streams_arrive_intact() {
    const N: u32 = 1000;
    let p = pair().await;
    let sender = p.dialled.clone();
    let send_all = tokio::spawn(async move {
        for i in 0..N {
            let mut s = sender.open_uni().await.unwrap();
            let mut msg = i.to_be_bytes().to_vec();
            msg.extend_from_slice(b" small payload");
            s.write(Bytes::from(msg)).await.unwrap();
            s.finish().unwrap();
        }
    });
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..N {
        let mut r = within(p.accepted.accept_uni()).await.unwrap().unwrap();
        readers.spawn(async move { read_to_end(&mut r).await.unwrap() });
    }
    let mut seen = HashSet::new();
    while let Some(msg) = within(readers.join_next()).await {
        let msg = msg.unwrap();
        assert_eq!(&msg[4..], b" small payload");
        seen.insert(u32::from_be_bytes(msg[..4].try_into().unwrap()));
    }
    send_all.await.unwrap();
    assert_eq!(seen.len(), N as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_mib_message_arrives_intact() {
    let p = pair().await;
    let big: Bytes = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect::<Vec<_>>()
        .into();
    let sender = p.dialled.clone();
    let sent = big.clone();
    let writer = tokio::spawn(async move {
        let mut s = sender.open_uni().await.unwrap();
        s.write(sent).await.unwrap();
        s.finish().unwrap();
    });
    let mut r = within(p.accepted.accept_uni()).await.unwrap().unwrap();
    let got = within(read_to_end(&mut r)).await.unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), big.len());
    assert!(got == big, "payload corrupted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_reason_reaches_the_peer() {
    let p = pair().await;
    // Some traffic first, so the handshake is confirmed on both sides.
    let (mut send, _recv) = p.dialled.open_bi().await.unwrap();
    send.write(Bytes::from_static(b"x")).await.unwrap();
    let _ = within(p.accepted.accept_bi()).await.unwrap();

    p.dialled.close(7, b"bye");
    assert_eq!(
        within(p.accepted.closed()).await,
        TransportError::ClosedByPeer {
            code: 7,
            reason: "bye".into()
        }
    );
    assert_eq!(
        within(p.dialled.closed()).await,
        TransportError::ClosedLocally
    );
    // An error close is not graceful: accept_uni says why.
    assert!(matches!(
        within(p.accepted.accept_uni()).await,
        Err(TransportError::ClosedByPeer { code: 7, .. })
    ));
    assert!(matches!(
        p.dialled.open_uni().await,
        Err(TransportError::ClosedLocally)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_close_ends_accept_uni() {
    let p = pair().await;
    let (mut send, _recv) = p.dialled.open_bi().await.unwrap();
    send.write(Bytes::from_static(b"x")).await.unwrap();
    let _ = within(p.accepted.accept_bi()).await.unwrap();
    p.accepted.close(0, b"shutting down");
    assert!(matches!(within(p.dialled.accept_uni()).await, Ok(None)));
    assert_eq!(
        within(p.dialled.closed()).await,
        TransportError::ClosedByPeer {
            code: 0,
            reason: "shutting down".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_reset_reach_the_other_side() {
    let p = pair().await;
    // The receiver stops a stream: the sender's next writes fail with StreamStopped.
    let mut s = p.dialled.open_uni().await.unwrap();
    s.write(Bytes::from_static(b"too large")).await.unwrap();
    let mut r = within(p.accepted.accept_uni()).await.unwrap().unwrap();
    r.stop(1);
    let stopped = within(async {
        loop {
            match s.write(Bytes::from_static(b"more")).await {
                Ok(()) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => return e,
            }
        }
    })
    .await;
    assert_eq!(stopped, TransportError::StreamStopped { code: 1 });

    // The sender resets a stream: the receiver's read fails with StreamReset.
    let mut s = p.dialled.open_uni().await.unwrap();
    s.write(Bytes::from_static(b"partial")).await.unwrap();
    let mut r = within(p.accepted.accept_uni()).await.unwrap().unwrap();
    s.reset(3);
    assert_eq!(
        within(read_to_end(&mut r)).await,
        Err(TransportError::StreamReset { code: 3 })
    );
    // The connection itself is unharmed.
    let mut s = p.dialled.open_uni().await.unwrap();
    s.write(Bytes::from_static(b"fine")).await.unwrap();
    s.finish().unwrap();
    let mut r = within(p.accepted.accept_uni()).await.unwrap().unwrap();
    assert_eq!(&within(read_to_end(&mut r)).await.unwrap()[..], b"fine");
}

/// Dials `listener` from `dialler`, expecting to be refused; returns what each side learnt.
async fn refused(
    listener: &S2nTransport,
    dialler: &S2nTransport,
) -> (TransportError, TransportError) {
    let addr = listener.local_addr().unwrap();
    // The listener reports the refused handshake as a failed incoming connection.
    let accepting = async {
        match listener.accept().await.unwrap().await {
            Err(e) => e,
            Ok(conn) => panic!("a refused peer was accepted: {conn:?}"),
        }
    };
    let dialling = async {
        // With TLS 1.3 the dialler may complete its side first and learn of the refusal after.
        match dialler.connect(addr, "london").await {
            Err(e) => e,
            Ok(conn) => {
                let (mut send, mut recv) = match conn.open_bi().await {
                    Ok(s) => s,
                    Err(e) => return e,
                };
                let _ = send.write(Bytes::from_static(b"hello?")).await;
                match recv.read_chunk().await {
                    Err(e) => e,
                    Ok(got) => panic!("a refused peer could read: {got:?}"),
                }
            }
        }
    };
    within(async { tokio::join!(accepting, dialling) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_from_another_ca_is_refused() {
    let ca = ClusterCa::generate("smoke").unwrap();
    let rogue_ca = ClusterCa::generate("smoke").unwrap();
    let london = endpoint(ca.issue("london").unwrap(), &ca);
    // A certificate from another CA, while trusting the real one.
    let rogue = endpoint(rogue_ca.issue("paris").unwrap(), &ca);
    let (at_listener, at_dialler) = refused(&london, &rogue).await;
    assert!(
        matches!(at_listener, TransportError::Handshake { .. }),
        "{at_listener:?}"
    );
    // The listener's alert travels back (s2n-quic's `Production` formatter would say only
    // HANDSHAKE_FAILURE), but the peer is not authenticated: no internal error text with it
    // (rustls/s2n-quic would say "invalid certificate"), only the generic reason. (The rogue CA
    // has the real one's name, so the issuer is found and its signature fails: DECRYPT_ERROR.)
    assert_eq!(
        at_dialler,
        TransportError::Handshake {
            reason: format!("rejected by peer: DECRYPT_ERROR: {PRE_HANDSHAKE_REASON}")
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_learns_why() {
    let mut ca = ClusterCa::generate("smoke").unwrap();
    let paris = ca.issue("paris").unwrap();
    ca.revoke(paris.serial());
    let london = endpoint(ca.issue("london").unwrap(), &ca);
    let paris = endpoint(paris, &ca);
    let (at_listener, e) = refused(&london, &paris).await;
    assert!(
        matches!(&at_listener, TransportError::Handshake { reason } if reason.contains("REVOKED")),
        "{at_listener:?}"
    );
    // The alert says why; nothing else of the listener's goes to an unauthenticated peer.
    assert_eq!(
        e,
        TransportError::Handshake {
            reason: format!("rejected by peer: CERTIFICATE_REVOKED: {PRE_HANDSHAKE_REASON}")
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_with_the_wrong_name_is_refused() {
    let ca = ClusterCa::generate("smoke").unwrap();
    let london = endpoint(ca.issue("london").unwrap(), &ca);
    let paris = endpoint(ca.issue("paris").unwrap(), &ca);
    let (dialled, accepted) = within(async {
        tokio::join!(
            paris.connect(london.local_addr().unwrap(), "berlin"),
            async { london.accept().await.unwrap().await }
        )
    })
    .await;
    let e = dialled.unwrap_err();
    assert!(matches!(e, TransportError::Handshake { .. }), "{e:?}");
    // The dialler refused before completing its handshake: the listener learns the alert and
    // the generic reason only, not the dialler's internal error text.
    assert_eq!(
        accepted.unwrap_err(),
        TransportError::Handshake {
            reason: format!("rejected by peer: BAD_CERTIFICATE: {PRE_HANDSHAKE_REASON}")
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_endpoint_closes_its_connections() {
    let p = pair().await;
    p.london.close();
    assert!(within(p.london.accept()).await.is_none());
    assert_eq!(
        within(p.dialled.closed()).await,
        TransportError::ClosedByPeer {
            code: 0,
            reason: "endpoint closed".into()
        }
    );
    assert_eq!(
        within(p.accepted.closed()).await,
        TransportError::ClosedLocally
    );
    assert!(matches!(
        p.london.connect(p.dialled.remote_addr(), "paris").await,
        Err(TransportError::Connect { .. })
    ));
}

/// A UDP relay between a dialler and a listener whose cable can be pulled.
struct Relay {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

async fn relay(to: std::net::SocketAddr) -> Relay {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::net::UdpSocket;
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let cut = Arc::new(AtomicBool::new(false));
    let addr = front.local_addr().unwrap();
    let (dialler_tx, mut dialler_rx) = tokio::sync::watch::channel(None);
    {
        let (front, back, cut) = (front.clone(), back.clone(), cut.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                dialler_tx.send_replace(Some(from));
                if !cut.load(Ordering::Relaxed) {
                    let _ = back.send_to(&buf[..n], to).await;
                }
            }
        });
    }
    {
        let cut = cut.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, _)) = back.recv_from(&mut buf).await {
                let dialler = *dialler_rx.borrow_and_update();
                if let (Some(dialler), false) = (dialler, cut.load(Ordering::Relaxed)) {
                    let _ = front.send_to(&buf[..n], dialler).await;
                }
            }
        });
    }
    Relay { addr, cut }
}

fn quick_tuning() -> TransportTuning {
    TransportTuning {
        idle_timeout: Duration::from_millis(1500),
        keep_alive_interval: Duration::from_millis(250),
        ..TransportTuning::default()
    }
}

async fn relayed_pair() -> (
    Relay,
    S2nTransport,
    S2nTransport,
    S2nConnection,
    S2nConnection,
) {
    let ca = ClusterCa::generate("smoke").unwrap();
    let bind = |name: &str| {
        S2nTransport::bind(EndpointConfig {
            live_trust: None,
            identity: ca.issue(name).unwrap(),
            trust: ca.trust(),
            listen: "127.0.0.1:0".parse().unwrap(),
            tuning: quick_tuning(),
        })
        .unwrap()
    };
    let (london, paris) = (bind("london"), bind("paris"));
    let relay = relay(london.local_addr().unwrap()).await;
    let (dialled, accepted) = within(async {
        tokio::join!(paris.connect(relay.addr, "london"), async {
            london.accept().await.unwrap().await
        })
    })
    .await;
    (relay, london, paris, dialled.unwrap(), accepted.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_hold_an_idle_link_open() {
    let (_relay, _london, _paris, dialled, accepted) = relayed_pair().await;
    // Idle for twice the idle timeout: only keep-alives cross.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut s = dialled.open_uni().await.unwrap();
    s.write(Bytes::from_static(b"still there")).await.unwrap();
    s.finish().unwrap();
    let mut r = within(accepted.accept_uni()).await.unwrap().unwrap();
    assert_eq!(
        &within(read_to_end(&mut r)).await.unwrap()[..],
        b"still there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_peer_times_out() {
    let (relay, _london, _paris, dialled, accepted) = relayed_pair().await;
    relay.cut.store(true, std::sync::atomic::Ordering::Relaxed);
    let started = std::time::Instant::now();
    assert_eq!(within(accepted.closed()).await, TransportError::TimedOut);
    assert_eq!(within(dialled.closed()).await, TransportError::TimedOut);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Not a graceful end: accepting says why.
    assert_eq!(
        within(accepted.accept_uni()).await.err(),
        Some(TransportError::TimedOut)
    );
}
