//! A node's life: shutdown frees what the node held, so it can come back on the same address.

use bytes::Bytes;
use rusm_cluster::{ClusterCa, NodeBuilder};

use super::*;

pub async fn a_node_restarts_on_its_old_address<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let london = node::<T>(&ca, "london").await;
    let paris = node::<T>(&ca, "paris").await;
    let addr = london.local_addr();
    paris.connect("london", addr).await.unwrap();
    let mut events = paris.subscribe();
    london.shutdown().await;
    next_down(&mut events).await;
    // The old handle is still alive; the address must be free all the same.
    let again = within(
        NodeBuilder::<T>::new("london")
            .identity(ca.issue("london").unwrap())
            .trust(ca.trust())
            .listen(addr)
            .start(),
    )
    .await
    .expect("shutdown freed the address");
    assert_eq!(again.local_addr(), addr);
    assert_ne!(again.creation(), london.creation());
    let (p, mut inbox) = collector(&again);
    again.register("inbox", &p).unwrap();
    paris.connect("london", addr).await.unwrap();
    paris
        .send("london", "inbox", Bytes::from_static(b"welcome back"))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut inbox).await.payload(),
        &Bytes::from_static(b"welcome back")
    );
    drop(london);
}

pub async fn exited_processes_leave_no_pair_state<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    let (p, mut inbox) = collector(&london);
    london.register("inbox", &p).unwrap();
    let pairs_in = |node: &rusm_cluster::Node| node.peers()[0].pairs_in;
    // A process that lives on keeps its pair.
    let (stay_tx, stay_rx) = tokio::sync::oneshot::channel::<()>();
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
    paris.spawn(move |ctx| async move {
        ctx.send("london", "inbox", Bytes::from_static(b"alive"))
            .await
            .unwrap();
        let _ = sent_tx.send(());
        let _ = stay_rx.await;
    });
    within(sent_rx).await.unwrap();
    recv(&mut inbox).await;
    wait_until(|| pairs_in(&london) == 1).await;
    // 300 short-lived processes, three messages each, then gone: their pairs are forgotten on
    // both sides, and every message arrived.
    for i in 0..300u32 {
        paris.spawn(move |ctx| async move {
            for j in 0..3u32 {
                let body = Bytes::from((i * 3 + j).to_be_bytes().to_vec());
                ctx.send("london", "inbox", body).await.unwrap();
            }
        });
    }
    for _ in 0..900 {
        recv(&mut inbox).await;
    }
    wait_until(|| pairs_in(&london) == 1).await;
    drop(stay_tx);
    wait_until(|| pairs_in(&london) == 0).await;
    assert_eq!(london.stats().lost_messages, 0);
}
