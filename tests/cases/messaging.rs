//! Messaging between nodes: by name, by pid, order, errors, node down, shutdown.

use std::time::Duration;

use bytes::Bytes;
use rusm_cluster::core::transport::Transport;
use rusm_cluster::{ClusterCa, DownReason, Error, Identity, NodeEvent};

use super::*;

pub async fn send_by_name<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    let (greeter, mut inbox) = collector(&london);
    london.register("greeter", &greeter).unwrap();
    assert_eq!(london.whereis("greeter"), Some(greeter.clone()));

    paris
        .send("london", "greeter", Bytes::from_static(b"hi"))
        .await
        .unwrap();
    let msg = recv(&mut inbox).await;
    assert_eq!(msg.payload(), &Bytes::from_static(b"hi"));
    assert!(msg.from().is_none(), "sent from outside a process");

    // Both ends remember each other.
    let peers = paris.peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].name.as_str(), "london");
    assert_eq!(peers[0].addr, london.local_addr());
    assert_eq!(london.peers()[0].name.as_str(), "paris");
    assert_eq!(london.peers()[0].creation, paris.creation());
    wait_until(|| london.stats().messages_received == 1).await;
    assert_eq!(paris.stats().messages_sent, 1);
}

pub async fn send_to_pid_and_reply<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    // An echo process on london answers whoever wrote to it.
    let echo = london.spawn(|mut ctx| async move {
        while let Some(m) = ctx.recv().await {
            let from = m.from().cloned().expect("sender pid");
            ctx.send_to(&from, m.into_payload()).await.unwrap();
        }
    });
    assert_eq!(
        echo.to_string(),
        format!("<london.{}.{}>", echo.id(), london.creation())
    );
    let (tx, rx) = tokio::sync::oneshot::channel();
    let echo2 = echo.clone();
    let asker = paris.spawn(|mut ctx| async move {
        ctx.send_to(&echo2, Bytes::from_static(b"ping"))
            .await
            .unwrap();
        let reply = ctx.recv().await.unwrap();
        tx.send((reply.from().cloned(), reply.into_payload()))
            .unwrap();
    });
    let (from, payload) = within(rx).await.unwrap();
    assert_eq!(payload, Bytes::from_static(b"ping"));
    assert_eq!(from, Some(echo));
    assert_eq!(asker.node().as_str(), "paris");

    // Local pids work with the same call.
    let (local, mut inbox) = collector(&paris);
    paris
        .send_to(&local, Bytes::from_static(b"here"))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut inbox).await.payload(),
        &Bytes::from_static(b"here")
    );
}

pub async fn per_pair_order_survives_10k_messages<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    let (sink, mut inbox) = collector(&london);
    const N: u32 = 10_000;
    // Two senders to the same destination: each pair must keep its own order.
    let mut senders = Vec::new();
    for tag in [1u8, 2u8] {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let sink = sink.clone();
        paris.spawn(move |ctx| async move {
            for i in 0..N {
                let mut b = Vec::with_capacity(5);
                b.push(tag);
                b.extend_from_slice(&i.to_be_bytes());
                ctx.send_to(&sink, Bytes::from(b)).await.unwrap();
            }
            done_tx.send(()).unwrap();
        });
        senders.push(done_rx);
    }
    for s in senders {
        within(s).await.unwrap();
    }
    let mut next = [0u32; 3];
    for _ in 0..2 * N {
        let m = recv(&mut inbox).await;
        let p = m.payload();
        let tag = p[0] as usize;
        let i = u32::from_be_bytes([p[1], p[2], p[3], p[4]]);
        assert_eq!(i, next[tag], "sender {tag}: message {i} out of order");
        next[tag] += 1;
    }
    assert_eq!(next, [0, N, N]);
    assert_eq!(london.stats().lost_messages, 0);
}

pub async fn send_errors_are_typed<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    let payload = Bytes::from_static(b"keep me");

    let err = paris.send("tokyo", "x", payload.clone()).await.unwrap_err();
    assert!(matches!(&err.error, Error::NotConnected { node } if node.as_str() == "tokyo"));
    assert_eq!(err.payload, payload, "the payload is handed back");

    let err = paris
        .send("paris", "nobody", payload.clone())
        .await
        .unwrap_err();
    assert!(matches!(&err.error, Error::NameNotRegistered { name } if name == "nobody"));

    let short = paris.spawn(|_| async {});
    wait_until(|| !paris.is_alive(&short)).await;
    let err = paris.send_to(&short, payload.clone()).await.unwrap_err();
    assert!(matches!(&err.error, Error::NoProcess { .. }));
    assert!(matches!(
        paris.register("late", &short),
        Err(Error::NoProcess { .. })
    ));

    let (a, _ia) = collector(&london);
    let (b, _ib) = collector(&london);
    london.register("taken", &a).unwrap();
    assert!(matches!(
        london.register("taken", &b),
        Err(Error::NameTaken { pid, .. }) if pid == a
    ));
    assert_eq!(london.unregister("taken"), Some(a));
    london.register("taken", &b).unwrap();

    assert!(matches!(
        paris
            .send("NOT A NAME", "x", payload.clone())
            .await
            .unwrap_err()
            .error,
        Error::Identity(_)
    ));
}

pub async fn remote_unknown_name_is_a_counted_dead_letter<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    // Like Erlang's `!`, a send to a remote name is asynchronous: the receiver counts it.
    paris
        .send("london", "nobody", Bytes::from_static(b"lost"))
        .await
        .unwrap();
    wait_until(|| london.stats().dead_letters == 1).await;
    // A pid from an earlier incarnation of london is recognisably stale: refused by the sender
    // with a typed error and the payload back.
    let (old_pid, _inbox) = collector(&london);
    london.shutdown().await;
    let london2 = rusm_testkit::builder::<T>("london")
        .identity(_ca.issue("london").unwrap())
        .trust(_ca.trust())
        .start()
        .await
        .unwrap();
    assert_ne!(london2.creation(), old_pid.creation());
    wait_until(|| paris.peers().is_empty()).await;
    paris.connect("london", london2.local_addr()).await.unwrap();
    // Same name, same number: only the creation tells them apart.
    let (new_pid, mut inbox) = collector(&london2);
    assert_eq!(new_pid.id(), old_pid.id());
    let err = paris
        .send_to(&old_pid, Bytes::from_static(b"stale"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err.error, Error::StalePid { pid, current } if pid == &old_pid && *current == london2.creation()),
        "{err}"
    );
    assert_eq!(err.payload, Bytes::from_static(b"stale"));
    paris
        .send_to(&new_pid, Bytes::from_static(b"fresh"))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut inbox).await.payload(),
        &Bytes::from_static(b"fresh")
    );
    assert_eq!(london2.stats().dead_letters, 0);
}

pub async fn peer_shutdown_raises_node_down_and_sends_fail<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    let mut events = london.subscribe();
    paris.shutdown().await;
    match next_down(&mut events).await {
        NodeEvent::NodeDown { node, reason } => {
            assert_eq!(node.as_str(), "paris");
            assert!(
                matches!(reason, DownReason::Goodbye(_)),
                "a clean shutdown says goodbye, got {reason:?}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(london.peers().is_empty());
    let err = london
        .send("paris", "x", Bytes::from_static(b"?"))
        .await
        .unwrap_err();
    assert!(matches!(err.error, Error::NotConnected { .. }));
    // And the shut-down node refuses to link again.
    assert!(matches!(
        paris.connect("london", london.local_addr()).await,
        Err(Error::Shutdown)
    ));
}

pub async fn goodbye_delivers_every_message_in_flight<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    let (sink, mut inbox) = collector(&london);
    london.register("sink", &sink).unwrap();
    const N: usize = 2_000;
    for i in 0..N {
        paris
            .send("london", "sink", Bytes::from(vec![(i % 251) as u8; 100]))
            .await
            .unwrap();
    }
    // Shut down at once: the goodbye must not overtake the messages still in flight.
    paris.shutdown().await;
    for _ in 0..N {
        recv(&mut inbox).await;
    }
    let s = london.stats();
    assert_eq!(s.messages_received, N as u64);
    assert_eq!(s.lost_messages, 0);
}

pub async fn simultaneous_dials_keep_one_link<T: Transport>() {
    let ca = ClusterCa::generate("race").unwrap();
    for round in 0..5 {
        let a = node::<T>(&ca, "alpha").await;
        let b = node::<T>(&ca, "beta").await;
        let (ra, rb) = tokio::join!(
            a.connect("beta", b.local_addr()),
            b.connect("alpha", a.local_addr())
        );
        ra.unwrap_or_else(|e| panic!("round {round}: alpha: {e}"));
        rb.unwrap_or_else(|e| panic!("round {round}: beta: {e}"));
        wait_until(|| a.peers().len() == 1 && b.peers().len() == 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(a.peers().len(), 1);
        assert_eq!(b.peers().len(), 1);
        let (p, mut inbox) = collector(&b);
        b.register("x", &p).unwrap();
        a.send("beta", "x", Bytes::from_static(b"one link"))
            .await
            .unwrap();
        recv(&mut inbox).await;
        a.shutdown().await;
        b.shutdown().await;
    }
}

pub async fn shared_identity_cluster_works<T: Transport>() {
    let id = Identity::generate().unwrap();
    let a = rusm_testkit::builder::<T>("a")
        .identity(id.clone())
        .start()
        .await
        .unwrap();
    let b = rusm_testkit::builder::<T>("b")
        .identity(id)
        .start()
        .await
        .unwrap();
    b.connect("a", a.local_addr()).await.unwrap();
    let (p, mut inbox) = collector(&a);
    a.register("in", &p).unwrap();
    b.send("a", "in", Bytes::from_static(b"shared"))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut inbox).await.payload(),
        &Bytes::from_static(b"shared")
    );
    // A node with a CA-issued identity does not mix with shared-identity nodes.
    let ca = ClusterCa::generate("other").unwrap();
    let c = node::<T>(&ca, "c").await;
    assert!(c.connect("a", a.local_addr()).await.is_err());
}

pub async fn large_and_small_messages_flow_together<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    let (big_sink, mut big_inbox) = collector(&london);
    let (small_sink, mut small_inbox) = collector(&london);
    let big = Bytes::from(vec![7u8; 4 << 20]);
    // The big one and the small ones go to different processes: different pairs, so the small
    // ones never wait for the big one to be reassembled.
    paris.send_to(&big_sink, big.clone()).await.unwrap();
    for i in 0..1000u32 {
        paris
            .send_to(&small_sink, Bytes::copy_from_slice(&i.to_be_bytes()))
            .await
            .unwrap();
    }
    for i in 0..1000u32 {
        assert_eq!(recv(&mut small_inbox).await.payload()[..], i.to_be_bytes());
    }
    let got = recv(&mut big_inbox).await;
    assert_eq!(got.payload().len(), big.len());
    assert!(got.payload().iter().all(|&b| b == 7));
}

/// Many large messages in a row, far more than the connection's flow-control window (16 MiB)
/// and the link's budget (16 MiB): all arrive, in order, and the link stays up. (A stack that
/// spreads its sending over every open stream, as s2n does, once filled the window with parts
/// of messages the receiver had no budget to take yet, none of them complete: the link stalled
/// and was cut as misbehaving.)
pub async fn a_stream_of_large_messages_past_the_window_arrives<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    let (sink, mut inbox) = collector(&london);
    const N: u32 = 1_000;
    const LEN: usize = 64 << 10;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let to = sink.clone();
    paris.spawn(move |ctx| async move {
        for i in 0..N {
            let mut b = vec![(i % 251) as u8; LEN];
            b[..4].copy_from_slice(&i.to_be_bytes());
            ctx.send_to(&to, Bytes::from(b)).await.unwrap();
        }
        done_tx.send(()).unwrap();
    });
    for i in 0..N {
        let m = expect_within_test(recv(&mut inbox)).await;
        let p = m.payload();
        assert_eq!(p.len(), LEN);
        assert_eq!(p[..4], i.to_be_bytes(), "message {i} out of order");
        assert_eq!(p[LEN - 1], (i % 251) as u8);
    }
    expect_within_test(done_rx).await.unwrap();
    assert_eq!(london.peers().len(), 1, "the link stayed up");
    let s = london.stats();
    assert_eq!((s.stalled_links, s.lost_messages), (0, 0));
    assert_eq!(paris.stats().send_failures, 0);
}

/// Awaits `f` for at most 60 s (a long transfer in a debug build).
async fn expect_within_test<F: std::future::Future>(f: F) -> F::Output {
    rusm_testkit::expect_within("the transfer", std::time::Duration::from_secs(60), f).await
}
