//! Unit tests of the in-memory transport: the handshake and its refusals, stream semantics,
//! flow control, close, faults, and the address registry.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use rusm_cluster_core::identity::{ClusterCa, Identity};
use rusm_cluster_core::transport::{
    Connection, EndpointConfig, RecvStream, SendStream, Transport, TransportError, TransportTuning,
};

use crate::{MemConnection, MemNetwork, MemTransport};

fn bind_at(id: Identity, ca: &ClusterCa, listen: &str, tuning: TransportTuning) -> MemTransport {
    MemTransport::bind(EndpointConfig {
        live_trust: None,
        identity: id,
        trust: ca.trust(),
        listen: listen.parse().unwrap(),
        tuning,
    })
    .unwrap()
}

fn endpoint(ca: &ClusterCa, name: &str, tuning: TransportTuning) -> MemTransport {
    bind_at(ca.issue(name).unwrap(), ca, "127.0.0.1:0", tuning)
}

fn addr(t: &MemTransport) -> SocketAddr {
    t.local_addr().unwrap()
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("timed out after 10 s")
}

/// Whether `f` is still pending after `ms` milliseconds.
async fn still_pending<F: std::future::Future>(f: F, ms: u64) -> bool {
    tokio::time::timeout(Duration::from_millis(ms), f)
        .await
        .is_err()
}

/// Dials `server` from `client` by `name`; both ends' results.
async fn dial(
    client: &MemTransport,
    server: &MemTransport,
    name: &str,
) -> (
    Result<MemConnection, TransportError>,
    Result<MemConnection, TransportError>,
) {
    within(async {
        tokio::join!(client.connect(addr(server), name), async {
            server.accept().await.unwrap().await
        })
    })
    .await
}

/// A connected pair with `tuning` on both ends: (client end, server end, endpoints).
async fn pair(
    tuning: TransportTuning,
) -> (MemConnection, MemConnection, MemTransport, MemTransport) {
    let ca = ClusterCa::generate("t").unwrap();
    let server = endpoint(&ca, "server", tuning.clone());
    let client = endpoint(&ca, "client", tuning);
    let (c, s) = dial(&client, &server, "server").await;
    (c.unwrap(), s.unwrap(), client, server)
}

/// The dialler's view of a refused handshake: from `connect`, or from its first stream
/// operation (TLS 1.3 lets the client finish before the server judged its certificate).
async fn dialler_error(conn: Result<MemConnection, TransportError>) -> TransportError {
    let conn = match conn {
        Err(e) => return e,
        Ok(c) => c,
    };
    let (mut send, mut recv) = match conn.open_bi().await {
        Err(e) => return e,
        Ok(s) => s,
    };
    if let Err(e) = send.write(Bytes::from_static(b"hello")).await {
        return e;
    }
    match within(recv.read_chunk()).await {
        Err(e) => e,
        Ok(x) => panic!("a refused connection read {x:?}"),
    }
}

fn handshake_reason(e: &TransportError) -> &str {
    match e {
        TransportError::Handshake { reason } => reason,
        other => panic!("expected a handshake refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_verifies_both_names_and_carries_a_stream() {
    let (c, s, client, server) = pair(TransportTuning::default()).await;
    assert_eq!(c.peer_identity().dns_names, vec!["server".to_string()]);
    assert_eq!(s.peer_identity().dns_names, vec!["client".to_string()]);
    assert_eq!(c.remote_addr(), addr(&server));
    assert_eq!(s.remote_addr(), addr(&client));
    assert!(c.rtt().is_some());

    let (mut cs, mut cr) = c.open_bi().await.unwrap();
    cs.write(Bytes::from_static(b"hello")).await.unwrap();
    let (mut ss, mut sr) = within(s.accept_bi()).await.unwrap();
    assert_eq!(sr.read_chunk().await.unwrap().unwrap(), "hello");
    ss.write(Bytes::from_static(b"welcome")).await.unwrap();
    assert_eq!(cr.read_chunk().await.unwrap().unwrap(), "welcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_ca_is_refused_on_both_sides() {
    let ca = ClusterCa::generate("prod").unwrap();
    let rogue_ca = ClusterCa::generate("prod").unwrap();
    let london = endpoint(&ca, "london", TransportTuning::default());
    // A certificate from another CA (of the same name), trusting the real one.
    let rogue = bind_at(
        rogue_ca.issue("paris").unwrap(),
        &ca,
        "127.0.0.1:0",
        TransportTuning::default(),
    );

    // The listener refuses the dialler's certificate.
    let (dialled, accepted) = dial(&rogue, &london, "london").await;
    let listener_err = accepted.unwrap_err();
    assert!(
        handshake_reason(&listener_err).contains("DECRYPT_ERROR"),
        "{listener_err:?}"
    );
    let dialler_err = dialler_error(dialled).await;
    let reason = handshake_reason(&dialler_err);
    assert!(
        reason.contains("DECRYPT_ERROR") && reason.contains("error 51"),
        "{reason}"
    );

    // The dialler refuses the listener's certificate.
    let (dialled, accepted) = dial(&london, &rogue, "paris").await;
    assert!(handshake_reason(&dialled.unwrap_err()).contains("DECRYPT_ERROR"));
    assert!(matches!(
        accepted.unwrap_err(),
        TransportError::Handshake { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_misnamed_certificates_are_refused() {
    let mut ca = ClusterCa::generate("prod").unwrap();
    let paris_id = ca.issue("paris").unwrap();
    ca.revoke(paris_id.serial());
    let london = endpoint(&ca, "london", TransportTuning::default());
    let paris = bind_at(paris_id, &ca, "127.0.0.1:0", TransportTuning::default());

    let (dialled, accepted) = dial(&paris, &london, "london").await;
    assert!(handshake_reason(&accepted.unwrap_err()).contains("CERTIFICATE_REVOKED"));
    let e = dialler_error(dialled).await;
    assert!(
        handshake_reason(&e).contains("CERTIFICATE_REVOKED"),
        "{e:?}"
    );

    let (dialled, accepted) = dial(&london, &paris, "paris").await;
    assert!(handshake_reason(&dialled.unwrap_err()).contains("CERTIFICATE_REVOKED"));
    assert!(accepted.is_err());

    // A certificate not valid for the name dialled.
    let berlin = endpoint(&ca, "berlin", TransportTuning::default());
    let (dialled, accepted) = dial(&berlin, &london, "tokyo").await;
    assert!(handshake_reason(&dialled.unwrap_err()).contains("BAD_CERTIFICATE"));
    assert!(accepted.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_makes_a_writer_wait_for_the_reader() {
    let tuning = TransportTuning {
        stream_receive_window: 1000,
        connection_receive_window: 1500,
        ..TransportTuning::default()
    };
    let (c, s, _client, _server) = pair(tuning).await;

    // Per stream: 3000 bytes do not fit a 1000-byte window until the reader reads.
    let mut w = c.open_uni().await.unwrap();
    let data = Bytes::from(vec![1u8; 3000]);
    let writer = tokio::spawn(async move {
        w.write(data).await.unwrap();
        w.finish().unwrap();
        w.delivered().await.unwrap();
        w
    });
    let mut r = within(s.accept_uni()).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!writer.is_finished(), "the writer waits for credit");
    let first = r.read_chunk().await.unwrap().unwrap();
    assert_eq!(first.len(), 1000, "exactly one window crossed");
    let mut got = first.len();
    while let Some(chunk) = within(r.read_chunk()).await.unwrap() {
        got += chunk.len();
    }
    assert_eq!(got, 3000);
    within(writer).await.unwrap();

    // Per connection: two streams share 1500 bytes of credit.
    let mut a = c.open_uni().await.unwrap();
    let mut b = c.open_uni().await.unwrap();
    a.write(Bytes::from(vec![2u8; 1000])).await.unwrap();
    assert!(
        still_pending(b.write(Bytes::from(vec![3u8; 1000])), 50).await,
        "the connection window is spent"
    );
    let mut ra = within(s.accept_uni()).await.unwrap().unwrap();
    let mut rb = within(s.accept_uni()).await.unwrap().unwrap();
    assert_eq!(ra.read_chunk().await.unwrap().unwrap().len(), 1000);
    // b wrote 500 bytes before it was cancelled (writes are not cancel safe); credit is back.
    assert_eq!(rb.read_chunk().await.unwrap().unwrap().len(), 500);
    within(b.write(Bytes::from(vec![3u8; 500]))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_uni_waits_for_stream_credit() {
    let tuning = TransportTuning {
        max_concurrent_uni_streams: 2,
        ..TransportTuning::default()
    };
    let (c, s, _client, _server) = pair(tuning).await;
    let mut one = c.open_uni().await.unwrap();
    let _two = c.open_uni().await.unwrap();
    assert!(still_pending(c.open_uni(), 50).await, "two streams open");
    one.write(Bytes::from_static(b"x")).await.unwrap();
    one.finish().unwrap();
    let mut r = within(s.accept_uni()).await.unwrap().unwrap();
    assert!(
        still_pending(c.open_uni(), 20).await,
        "not read to the end yet"
    );
    while within(r.read_chunk()).await.unwrap().is_some() {}
    within(c.open_uni()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_reset_carry_their_codes() {
    let (c, s, _client, _server) = pair(TransportTuning::default()).await;

    let mut w = c.open_uni().await.unwrap();
    w.write(Bytes::from_static(b"unwanted")).await.unwrap();
    let mut r = within(s.accept_uni()).await.unwrap().unwrap();
    r.stop(7);
    let e = within(async {
        loop {
            if let Err(e) = w.write(Bytes::from_static(b"more")).await {
                return e;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(e, TransportError::StreamStopped { code: 7 });
    w.finish().unwrap();
    assert_eq!(
        within(w.delivered()).await,
        Err(TransportError::StreamStopped { code: 7 })
    );

    let mut w = c.open_uni().await.unwrap();
    w.write(Bytes::from_static(b"half a message"))
        .await
        .unwrap();
    w.reset(9);
    let mut r = within(s.accept_uni()).await.unwrap().unwrap();
    assert_eq!(
        within(r.read_chunk()).await,
        Err(TransportError::StreamReset { code: 9 })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_waits_until_the_reader_read_the_end() {
    let (c, s, _client, _server) = pair(TransportTuning::default()).await;
    let mut w = c.open_uni().await.unwrap();
    w.write(Bytes::from_static(b"data")).await.unwrap();
    w.finish().unwrap();
    assert!(still_pending(w.delivered(), 30).await, "nothing read yet");
    let mut r = within(s.accept_uni()).await.unwrap().unwrap();
    assert_eq!(r.read_chunk().await.unwrap().unwrap(), "data");
    assert!(still_pending(w.delivered(), 30).await, "end not read yet");
    assert_eq!(r.read_chunk().await.unwrap(), None);
    within(w.delivered()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_chunk_is_cancel_safe() {
    let (c, s, _client, _server) = pair(TransportTuning::default()).await;
    let mut w = c.open_uni().await.unwrap();
    w.write(Bytes::from_static(b"first")).await.unwrap();
    let mut r = within(s.accept_uni()).await.unwrap().unwrap();
    assert_eq!(r.read_chunk().await.unwrap().unwrap(), "first");
    // Cancelled while waiting: nothing is lost.
    assert!(still_pending(r.read_chunk(), 20).await);
    w.write(Bytes::from_static(b"second")).await.unwrap();
    assert_eq!(r.read_chunk().await.unwrap().unwrap(), "second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_gives_the_peer_code_and_reason() {
    let (c, s, _client, _server) = pair(TransportTuning::default()).await;
    let (mut cs, _cr) = c.open_bi().await.unwrap();
    cs.write(Bytes::from_static(b"x")).await.unwrap();
    let (_ss, mut sr) = within(s.accept_bi()).await.unwrap();
    s.close(42, b"go away");
    assert_eq!(
        within(c.closed()).await,
        TransportError::ClosedByPeer {
            code: 42,
            reason: "go away".into()
        }
    );
    assert_eq!(within(s.closed()).await, TransportError::ClosedLocally);
    assert!(matches!(
        cs.write(Bytes::from_static(b"y")).await,
        Err(TransportError::ClosedByPeer { code: 42, .. })
    ));
    assert_eq!(
        sr.read_chunk().await,
        Err(TransportError::ClosedLocally),
        "unread data is gone with the connection"
    );
    // A graceful close (code 0) is "no more streams" for accept_uni.
    let (c, s, _client, _server) = pair(TransportTuning::default()).await;
    c.close(0, b"bye");
    assert!(within(s.accept_uni()).await.unwrap().is_none());
    assert!(within(c.accept_uni()).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_closes_the_connection() {
    let (c, s, _client, _server) = pair(TransportTuning::default()).await;
    drop(c);
    assert_eq!(
        within(s.closed()).await,
        TransportError::ClosedByPeer {
            code: 0,
            reason: String::new()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_longer_than_the_idle_timeout_times_both_ends_out() {
    let tuning = TransportTuning {
        idle_timeout: Duration::from_millis(300),
        ..TransportTuning::default()
    };
    let (c, s, client, server) = pair(tuning).await;
    let (a, b) = (addr(&client), addr(&server));

    // A short cut: what was sent meanwhile arrives once the link is mended.
    MemNetwork::cut(a, b);
    let mut w = c.open_uni().await.unwrap();
    w.write(Bytes::from_static(b"during the cut"))
        .await
        .unwrap();
    w.finish().unwrap();
    assert!(
        still_pending(s.accept_uni(), 100).await,
        "nothing crosses a cut"
    );
    MemNetwork::restore(a, b);
    let mut r = within(s.accept_uni()).await.unwrap().unwrap();
    assert_eq!(r.read_chunk().await.unwrap().unwrap(), "during the cut");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(still_pending(c.closed(), 1).await, "a mended link lives on");

    // A long one: both ends time out.
    let start = std::time::Instant::now();
    MemNetwork::cut(b, a);
    assert_eq!(within(c.closed()).await, TransportError::TimedOut);
    assert_eq!(within(s.closed()).await, TransportError::TimedOut);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "{took:?}"
    );
    MemNetwork::restore(a, b);
    assert!(matches!(c.open_uni().await, Err(TransportError::TimedOut)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_delays_handshake_and_data() {
    let ca = ClusterCa::generate("t").unwrap();
    let server = endpoint(&ca, "server", TransportTuning::default());
    let client = endpoint(&ca, "client", TransportTuning::default());
    let latency = Duration::from_millis(40);
    MemNetwork::set_latency(addr(&client), addr(&server), latency);
    let start = std::time::Instant::now();
    let (c, s) = dial(&client, &server, "server").await;
    let (c, s) = (c.unwrap(), s.unwrap());
    // The client hears the server's flight after a round trip.
    assert!(start.elapsed() >= 2 * latency, "{:?}", start.elapsed());
    assert_eq!(c.rtt(), Some(2 * latency));

    let mut w = c.open_uni().await.unwrap();
    let sent = std::time::Instant::now();
    w.write(Bytes::from_static(b"late")).await.unwrap();
    let mut r = within(s.accept_uni()).await.unwrap().unwrap();
    assert_eq!(r.read_chunk().await.unwrap().unwrap(), "late");
    assert!(sent.elapsed() >= latency, "{:?}", sent.elapsed());
    MemNetwork::set_latency(addr(&client), addr(&server), Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_is_bound_once_and_free_again_after_close() {
    let ca = ClusterCa::generate("t").unwrap();
    let at = "10.9.8.7:4433";
    let first = bind_at(ca.issue("a").unwrap(), &ca, at, TransportTuning::default());
    assert_eq!(addr(&first), at.parse().unwrap());
    let clash = MemTransport::bind(EndpointConfig {
        live_trust: None,
        identity: ca.issue("b").unwrap(),
        trust: ca.trust(),
        listen: at.parse().unwrap(),
        tuning: TransportTuning::default(),
    });
    assert!(matches!(clash, Err(TransportError::Setup { .. })));

    // A connection to the first endpoint sees it close.
    let client = endpoint(&ca, "c", TransportTuning::default());
    let (c, s) = dial(&client, &first, "a").await;
    let (c, s) = (c.unwrap(), s.unwrap());
    first.close();
    assert!(first.accept().await.is_none());
    assert_eq!(
        within(c.closed()).await,
        TransportError::ClosedByPeer {
            code: 0,
            reason: "endpoint closed".into()
        }
    );
    assert_eq!(within(s.closed()).await, TransportError::ClosedLocally);
    assert!(matches!(
        first.connect(addr(&client), "c").await,
        Err(TransportError::Connect { .. })
    ));

    // Restarted on the same address.
    let again = bind_at(ca.issue("a").unwrap(), &ca, at, TransportTuning::default());
    let (c, s) = dial(&client, &again, "a").await;
    c.unwrap();
    s.unwrap();
    drop(again);
    assert!(
        !MemNetwork::is_bound(at.parse().unwrap()),
        "dropping unbinds too"
    );
    let _third = bind_at(ca.issue("a").unwrap(), &ca, at, TransportTuning::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_to_nowhere_times_out() {
    let ca = ClusterCa::generate("t").unwrap();
    let tuning = TransportTuning {
        idle_timeout: Duration::from_millis(200),
        ..TransportTuning::default()
    };
    let client = endpoint(&ca, "c", tuning);
    let nowhere: SocketAddr = "10.9.8.6:1".parse().unwrap();
    assert_eq!(
        within(client.connect(nowhere, "x")).await.unwrap_err(),
        TransportError::TimedOut
    );
    assert!(matches!(
        client.connect(nowhere, "not a name!").await,
        Err(TransportError::Connect { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_cross_without_copies() {
    let (c, s, _client, _server) = pair(TransportTuning::default()).await;
    let data = Bytes::from(vec![5u8; 4096]);
    let mut w = c.open_uni().await.unwrap();
    w.write(data.clone()).await.unwrap();
    let mut r = within(s.accept_uni()).await.unwrap().unwrap();
    let got = r.read_chunk().await.unwrap().unwrap();
    assert_eq!(got.as_ptr(), data.as_ptr(), "the writer's buffer itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_takes_time_and_small_ones_overtake_it() {
    let (c, s, client, server) = pair(TransportTuning::default()).await;
    // 1 MiB at 10 MiB/s: about 100 ms on the wire.
    MemNetwork::set_rate(addr(&client), addr(&server), Some(10 << 20));
    let start = std::time::Instant::now();
    let mut big = c.open_uni().await.unwrap();
    big.write(Bytes::from(vec![1u8; 1 << 20])).await.unwrap();
    big.finish().unwrap();
    let mut small = c.open_uni().await.unwrap();
    small.write(Bytes::from_static(b"small")).await.unwrap();
    small.finish().unwrap();

    let mut big_r = within(s.accept_uni()).await.unwrap().unwrap();
    let mut small_r = within(s.accept_uni()).await.unwrap().unwrap();
    assert_eq!(
        within(small_r.read_chunk()).await.unwrap().unwrap(),
        "small"
    );
    assert!(
        start.elapsed() < Duration::from_millis(50),
        "the small one waited {:?}",
        start.elapsed()
    );
    let mut got = 0;
    while let Some(chunk) = within(big_r.read_chunk()).await.unwrap() {
        assert!(chunk.len() <= 64 << 10, "sent in slices");
        got += chunk.len();
    }
    assert_eq!(got, 1 << 20);
    assert!(
        start.elapsed() >= Duration::from_millis(90),
        "1 MiB crossed a 10 MiB/s link in {:?}",
        start.elapsed()
    );
    MemNetwork::set_rate(addr(&client), addr(&server), None);
    let t = std::time::Instant::now();
    let mut w = c.open_uni().await.unwrap();
    w.write(Bytes::from(vec![2u8; 4 << 20])).await.unwrap();
    w.finish().unwrap();
    let mut r = within(s.accept_uni()).await.unwrap().unwrap();
    assert_eq!(r.read_chunk().await.unwrap().unwrap().len(), 4 << 20);
    assert!(t.elapsed() < Duration::from_millis(50), "no limit: at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_drops_unsent_data_and_gives_its_credit_back() {
    let tuning = TransportTuning {
        connection_receive_window: 1 << 20,
        ..TransportTuning::default()
    };
    let (c, s, client, server) = pair(tuning).await;
    // Slow enough that most of the first stream is still waiting for the link when it is reset.
    MemNetwork::set_rate(addr(&client), addr(&server), Some(1 << 20));
    let mut w = c.open_uni().await.unwrap();
    w.write(Bytes::from(vec![1u8; 1 << 20])).await.unwrap();
    assert!(
        still_pending(
            c.open_uni().await.unwrap().write(Bytes::from_static(b"x")),
            20
        )
        .await,
        "the connection window is spent"
    );
    w.reset(5);
    let mut r = within(s.accept_uni()).await.unwrap().unwrap();
    assert_eq!(
        within(async {
            loop {
                match r.read_chunk().await {
                    Ok(Some(_)) => continue,
                    other => return other,
                }
            }
        })
        .await,
        Err(TransportError::StreamReset { code: 5 })
    );
    // The connection credit is back, though most of the megabyte never crossed: without it,
    // not one more byte could be written. (Credit is granted again in half-window steps.)
    MemNetwork::set_rate(addr(&client), addr(&server), None);
    let mut w = c.open_uni().await.unwrap();
    within(w.write(Bytes::from(vec![2u8; 512 << 10])))
        .await
        .unwrap();
}
