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
