//! Capabilities on the control stream: announced in the hello, negotiated per link, frames
//! routed to the capability, and a frame the link did not negotiate closes only that link.

use bytes::Bytes;
use rusm_cluster::core::router::RouteError;
use rusm_cluster::core::transport::SendStream;
use rusm_cluster::core::wire::{encode_frame, Frame};
use rusm_cluster::{Capability, ClusterCa, DownReason, Error, Node, NodeName};

use super::*;

/// What an `Echo` capability saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    Up(String),
    Down(String),
    Frame(String, Bytes),
}

/// Reports everything it sees on a channel.
struct Echo(mpsc::UnboundedSender<Seen>);

impl Capability for Echo {
    fn name(&self) -> &str {
        "echo"
    }
    fn on_link_up(&self, _node: &Node, peer: &NodeName) {
        let _ = self.0.send(Seen::Up(peer.to_string()));
    }
    fn on_link_down(&self, _node: &Node, peer: &NodeName) {
        let _ = self.0.send(Seen::Down(peer.to_string()));
    }
    fn on_frame(&self, _node: &Node, peer: &NodeName, body: Bytes) -> Result<(), String> {
        if body.as_ref() == b"refuse me" {
            return Err("the echo protocol has no such frame".into());
        }
        let _ = self.0.send(Seen::Frame(peer.to_string(), body));
        Ok(())
    }
}

async fn echo_node<T: Transport>(
    ca: &ClusterCa,
    name: &str,
) -> (Node, mpsc::UnboundedReceiver<Seen>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let node = rusm_testkit::issued::<T>(ca, name)
        .capability(Echo(tx))
        .start()
        .await
        .unwrap();
    (node, rx)
}

async fn seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    within(rx.recv()).await.expect("capability dropped")
}

pub async fn capability_frames_reach_only_links_that_negotiated_them<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let (london, mut at_london) = echo_node::<T>(&ca, "london").await;
    let (paris, mut at_paris) = echo_node::<T>(&ca, "paris").await;
    let rome = node::<T>(&ca, "rome").await;
    paris.connect("london", london.local_addr()).await.unwrap();
    rome.connect("london", london.local_addr()).await.unwrap();
    wait_until(|| london.peers().len() == 2).await;
    // Both ends with the capability are told of the link; rome, without it, is not.
    assert_eq!(seen(&mut at_london).await, Seen::Up("paris".into()));
    assert_eq!(seen(&mut at_paris).await, Seen::Up("london".into()));
    let peers = london.peers();
    assert_eq!(peers[0].name.as_str(), "paris");
    assert_eq!(peers[0].capabilities, ["echo", "mesh", "registry", "rpc"]);
    assert_eq!(peers[1].name.as_str(), "rome");
    // Rome has the node's own capabilities only.
    assert_eq!(peers[1].capabilities, ["mesh", "registry", "rpc"]);

    // Frames of the capability travel in order, both ways.
    for i in 0..3u8 {
        paris
            .send_frame("london", "echo", Bytes::from(vec![i]))
            .unwrap();
    }
    for i in 0..3u8 {
        assert_eq!(
            seen(&mut at_london).await,
            Seen::Frame("paris".into(), Bytes::from(vec![i]))
        );
    }
    london
        .send_frame("paris", "echo", Bytes::from_static(b"back"))
        .unwrap();
    assert_eq!(
        seen(&mut at_paris).await,
        Seen::Frame("london".into(), Bytes::from_static(b"back"))
    );

    // Rome never announced it: nothing is sent, and the link to rome stays up.
    match london.send_frame("rome", "echo", Bytes::from_static(b"no")) {
        Err(Error::CapabilityNotNegotiated { node, capability }) => {
            assert_eq!(node.as_str(), "rome");
            assert_eq!(capability, "echo");
        }
        other => panic!("expected CapabilityNotNegotiated, got {other:?}"),
    }
    assert!(matches!(
        london.send_frame("nowhere", "echo", Bytes::new()),
        Err(Error::NotConnected { .. })
    ));

    // Paris goes: the capability hears of it.
    paris.shutdown().await;
    assert_eq!(seen(&mut at_london).await, Seen::Down("paris".into()));
    // Capabilities hear of a link's end while it is still listed (so a new link to the same
    // peer is announced after it); it leaves the table right after.
    wait_until(|| london.peers().len() == 1).await;
}

pub async fn unannounced_capability_frame_closes_only_that_link<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let (london, mut at_london) = echo_node::<T>(&ca, "london").await;
    let (paris, _at_paris) = echo_node::<T>(&ca, "paris").await;
    paris.connect("london", london.local_addr()).await.unwrap();
    assert_eq!(seen(&mut at_london).await, Seen::Up("paris".into()));
    let mut events = london.subscribe();
    // Mallory's hello announces no capability; it sends an echo frame all the same.
    let mut raw = linked_raw::<T>(&ca, &london).await;
    let frame = Frame::Capability {
        capability: "echo".into(),
        body: Bytes::from_static(b"sneaky"),
    };
    raw.send.write(encode_frame(&frame).unwrap()).await.unwrap();
    let reason = raw.closed_reason().await;
    assert!(reason.contains("did not announce"), "{reason}");
    let down = next_down(&mut events).await;
    assert_eq!(
        down,
        NodeEvent::NodeDown {
            node: "mallory".try_into().unwrap(),
            reason: DownReason::CapabilityRefused(RouteError::NotAnnounced("echo".into())),
        }
    );
    assert_eq!(london.stats().malformed_frames, 1);
    // The frame never reached the capability, and paris's link is undisturbed.
    paris
        .send_frame("london", "echo", Bytes::from_static(b"fine"))
        .unwrap();
    assert_eq!(
        seen(&mut at_london).await,
        Seen::Frame("paris".into(), Bytes::from_static(b"fine"))
    );
}

pub async fn a_frame_the_capability_refuses_closes_only_that_link<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let (london, mut at_london) = echo_node::<T>(&ca, "london").await;
    let (paris, _at_paris) = echo_node::<T>(&ca, "paris").await;
    let (rome, _at_rome) = echo_node::<T>(&ca, "rome").await;
    paris.connect("london", london.local_addr()).await.unwrap();
    rome.connect("london", london.local_addr()).await.unwrap();
    wait_until(|| london.peers().len() == 2).await;
    let mut events = london.subscribe();
    paris
        .send_frame("london", "echo", Bytes::from_static(b"refuse me"))
        .unwrap();
    let NodeEvent::NodeDown { node, reason } = next_down(&mut events).await else {
        unreachable!()
    };
    assert_eq!(node.as_str(), "paris");
    assert_eq!(
        reason,
        DownReason::ProtocolViolation("echo: the echo protocol has no such frame".into())
    );
    assert_eq!(london.stats().malformed_frames, 1);
    // Rome's link carries on.
    rome.send_frame("london", "echo", Bytes::from_static(b"still here"))
        .unwrap();
    loop {
        if seen(&mut at_london).await
            == Seen::Frame("rome".into(), Bytes::from_static(b"still here"))
        {
            break;
        }
    }
    assert!(london.peers().iter().any(|p| p.name.as_str() == "rome"));
}
