//! Mixed clusters: nodes on different backends are one cluster (same QUIC v1, TLS 1.3 policy and
//! ALPN), in both dialling directions.

use bytes::Bytes;
use rusm_cluster::core::transport::Transport;
use rusm_cluster::ClusterCa;

use super::*;

/// A node on backend `A` dials a node on backend `B`; both send by name and by pid, in order.
pub async fn mixed_cluster<A: Transport, B: Transport>() {
    let ca = ClusterCa::generate("mixed").unwrap();
    let a = rusm_testkit::issued::<A>(&ca, "alpha")
        .start()
        .await
        .unwrap();
    let b = rusm_testkit::issued::<B>(&ca, "beta")
        .start()
        .await
        .unwrap();
    a.connect("beta", b.local_addr()).await.unwrap();
    wait_until(|| b.peers().len() == 1).await;

    let (pa, mut ia) = collector(&a);
    let (pb, mut ib) = collector(&b);
    a.register("in", &pa).unwrap();
    b.register("in", &pb).unwrap();
    for i in 0..500u32 {
        a.send("beta", "in", Bytes::copy_from_slice(&i.to_be_bytes()))
            .await
            .unwrap();
        b.send_to(&pa, Bytes::copy_from_slice(&i.to_be_bytes()))
            .await
            .unwrap();
    }
    for i in 0..500u32 {
        assert_eq!(recv(&mut ib).await.payload()[..], i.to_be_bytes());
        assert_eq!(recv(&mut ia).await.payload()[..], i.to_be_bytes());
    }
    // A big one crosses too.
    let big = Bytes::from(vec![5u8; 3 << 20]);
    a.send("beta", "in", big.clone()).await.unwrap();
    assert_eq!(recv(&mut ib).await.into_payload(), big);

    // And an impostor on the other backend is refused all the same.
    let rogue = ClusterCa::generate("mixed").unwrap();
    let c = rusm_testkit::builder::<B>("gamma")
        .identity(rogue.issue("gamma").unwrap())
        .trust(ca.trust())
        .start()
        .await
        .unwrap();
    let err = c.connect("alpha", a.local_addr()).await.unwrap_err();
    // Refused by TLS for its untrusted issuer (named like the real CA, so its signature is what
    // fails), whichever backend words the refusal.
    assert_tls_refusal(&err, "alpha", DECRYPT_ERROR);
    wait_until(|| a.stats().rejected_handshakes == 1).await;
    assert_eq!(a.peers().len(), 1);
    c.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}

/// Four nodes alternating between backends `A` and `B`, each joining through the first: one
/// mesh across both stacks, and a global name on each resolved and routed from every node.
pub async fn mixed_mesh_with_global_names<A: Transport, B: Transport>() {
    let ca = ClusterCa::generate("mixed").unwrap();
    let mut nodes = Vec::new();
    for i in 0..4 {
        let name = format!("m{i}");
        let (id, trust) = (ca.issue(&name).unwrap(), ca.trust());
        let node = if i % 2 == 0 {
            rusm_testkit::builder::<A>(name)
                .identity(id)
                .trust(trust)
                .start()
                .await
        } else {
            rusm_testkit::builder::<B>(name)
                .identity(id)
                .trust(trust)
                .start()
                .await
        };
        nodes.push(node.unwrap());
    }
    let mut inboxes = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let (pid, rx) = collector(n);
        n.register_global(&format!("svc-{i}"), &pid).await.unwrap();
        inboxes.push(rx);
    }
    let first = nodes[0].local_addr();
    for n in &nodes[1..] {
        n.connect("m0", first).await.unwrap();
    }
    wait_until(|| {
        nodes
            .iter()
            .all(|n| n.peers().len() == 3 && n.registered_global().len() == 4)
    })
    .await;
    for n in &nodes {
        for i in 0..4 {
            n.send_global(&format!("svc-{i}"), Bytes::from(n.name().to_string()))
                .await
                .unwrap();
        }
    }
    for rx in &mut inboxes {
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(recv(rx).await.into_payload());
        }
        got.sort();
        assert_eq!(
            got,
            ["m0", "m1", "m2", "m3"].map(|n| Bytes::from(n.as_bytes()))
        );
    }
    futures_util::future::join_all(nodes.iter().map(|n| n.shutdown())).await;
}

/// A node on backend `A` whose certificate the listener on backend `B` refuses (revoked, or
/// from another CA) gets `Rejected` with the TLS reason, promptly, every time.
pub async fn mixed_refusals_read_the_same<A: Transport, B: Transport>() {
    let mut ca = ClusterCa::generate("mixed").unwrap();
    let listener = rusm_testkit::issued::<B>(&ca, "beta")
        .start()
        .await
        .unwrap();
    let revoked_id = ca.issue("gamma").unwrap();
    ca.revoke(revoked_id.serial());
    listener.set_trust(ca.trust()).unwrap();
    let rogue = ClusterCa::generate("mixed").unwrap();
    for (name, id, alert) in [
        ("gamma", revoked_id, CERTIFICATE_REVOKED),
        ("delta", rogue.issue("delta").unwrap(), DECRYPT_ERROR),
    ] {
        let dialler = rusm_testkit::builder::<A>(name)
            .identity(id)
            .trust(ca.trust())
            .start()
            .await
            .unwrap();
        for attempt in 0..3 {
            let started = std::time::Instant::now();
            let err = dialler
                .connect("beta", listener.local_addr())
                .await
                .unwrap_err();
            assert_tls_refusal(&err, "beta", alert);
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "{name} attempt {attempt}: refused after {:?}",
                started.elapsed()
            );
        }
        dialler.shutdown().await;
    }
    listener.shutdown().await;
}
