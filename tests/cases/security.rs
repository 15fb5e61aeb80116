//! Authentication: untrusted, revoked and impostor peers are refused, with clear reasons.

use rusm_cluster::core::transport::Transport;
use rusm_cluster::core::wire::{Frame, RejectReason, PROTOCOL_VERSION};
use rusm_cluster::{ClusterCa, Error, NodeBuilder};

use super::*;

pub async fn untrusted_ca_is_rejected<T: Transport>() {
    let ca = ClusterCa::generate("prod").unwrap();
    let rogue_ca = ClusterCa::generate("prod").unwrap(); // same name, different key
    let london = node::<T>(&ca, "london").await;
    // A node with a certificate from another CA, trusting the real one.
    let rogue = NodeBuilder::<T>::new("paris")
        .identity(rogue_ca.issue("paris").unwrap())
        .trust(ca.trust())
        .start()
        .await
        .unwrap();
    let err = rogue
        .connect("london", london.local_addr())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Rejected { .. }), "got {err:?}");
    wait_until(|| london.stats().rejected_handshakes == 1).await;
    assert!(london.peers().is_empty());
    assert!(rogue.peers().is_empty());

    // The other way round: london refuses to link to a listener it does not trust.
    let err = london
        .connect("paris", rogue.local_addr())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Rejected { .. }), "got {err:?}");
    assert!(london.peers().is_empty());
}

pub async fn revoked_certificate_is_rejected<T: Transport>() {
    let mut ca = ClusterCa::generate("prod").unwrap();
    let paris_id = ca.issue("paris").unwrap();
    let berlin_id = ca.issue("berlin").unwrap();
    ca.revoke(paris_id.serial());
    // london starts with the CRL that revokes paris.
    let london = node::<T>(&ca, "london").await;
    let paris = NodeBuilder::<T>::new("paris")
        .identity(paris_id)
        .trust(ca.trust())
        .start()
        .await
        .unwrap();
    let err = paris
        .connect("london", london.local_addr())
        .await
        .unwrap_err();
    match &err {
        Error::Rejected { reason, .. } => {
            assert!(
                reason.to_lowercase().contains("revoked") || reason.contains("certificate"),
                "{reason}"
            )
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    wait_until(|| london.stats().rejected_handshakes == 1).await;
    // london will not dial the revoked node either.
    assert!(matches!(
        london.connect("paris", paris.local_addr()).await,
        Err(Error::Rejected { .. })
    ));
    // A sibling certificate from the same CA is unaffected.
    let berlin = NodeBuilder::<T>::new("berlin")
        .identity(berlin_id)
        .trust(ca.trust())
        .start()
        .await
        .unwrap();
    berlin.connect("london", london.local_addr()).await.unwrap();
    assert!(london.peers().iter().all(|p| p.name.as_str() != "paris"));
}

pub async fn impostor_name_is_rejected<T: Transport>() {
    let ca = ClusterCa::generate("prod").unwrap();
    let london = node::<T>(&ca, "london").await;
    // The builder refuses a certificate issued for another name outright...
    let err = NodeBuilder::<T>::new("paris")
        .identity(ca.issue("mallory").unwrap())
        .trust(ca.trust())
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    // ...so mallory crafts the hello by hand: a valid certificate for "mallory", claiming "paris".
    let mut raw = RawPeer::<T>::dial(&ca, "mallory", &london).await;
    let answer = raw.hello("paris", PROTOCOL_VERSION).await;
    assert_eq!(
        answer,
        Some(Frame::Reject(RejectReason::NameMismatch {
            claimed: "paris".into(),
            certified: vec!["mallory".into()],
        }))
    );
    assert!(raw
        .closed_reason()
        .await
        .contains("does not match the certificate"));
    assert_eq!(london.stats().rejected_hellos, 1);
    assert!(london.peers().is_empty());
}

pub async fn wrong_node_at_address_is_rejected<T: Transport>() {
    let ca = ClusterCa::generate("prod").unwrap();
    let london = node::<T>(&ca, "london").await;
    let paris = node::<T>(&ca, "paris").await;
    // paris believes berlin listens at london's address: TLS checks london's certificate against
    // the name dialled, so paris does not end up linked to the wrong node.
    let err = paris
        .connect("berlin", london.local_addr())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Rejected { .. }), "{err:?}");
    assert!(paris.peers().is_empty());
}

pub async fn unknown_protocol_version_is_rejected<T: Transport>() {
    let ca = ClusterCa::generate("prod").unwrap();
    let london = node::<T>(&ca, "london").await;
    let mut raw = RawPeer::<T>::dial(&ca, "future", &london).await;
    let answer = raw.hello("future", PROTOCOL_VERSION + 98).await;
    assert_eq!(
        answer,
        Some(Frame::Reject(RejectReason::UnsupportedProtocol {
            ours: PROTOCOL_VERSION,
            theirs: PROTOCOL_VERSION + 98,
        }))
    );
    assert!(raw
        .closed_reason()
        .await
        .contains("unsupported protocol version"));
    assert!(london.peers().is_empty());
}
