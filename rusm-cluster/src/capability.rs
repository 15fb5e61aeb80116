//! Capabilities: protocols on the control stream of every link (see [`Capability`]).

use bytes::Bytes;
use rusm_cluster_core::identity::NodeName;

use crate::node::Node;

/// Capabilities: protocols that ride on the control stream of every link — the global
/// registry, request/reply, monitors and attach are built this way. A capability has a name,
/// which the node announces in its hello and welcome; a link uses the capabilities both of its
/// ends announced (see [`rusm_cluster_core::router`]), so a node with a new capability still
/// links with an older one. The node routes each capability frame that arrives to its
/// capability, and tells the capability when a link that uses it goes up or down. A frame for a
/// capability the link does not use closes that link with
/// [`DownReason::CapabilityRefused`](crate::DownReason::CapabilityRefused).
///
/// ```
/// use bytes::Bytes;
/// use rusm_cluster::{Capability, ClusterCa, Node, NodeName};
/// use tokio::sync::mpsc;
///
/// /// Hands every frame of capability "echo" to a channel.
/// struct Echo(mpsc::UnboundedSender<(String, Bytes)>);
///
/// impl Capability for Echo {
///     fn name(&self) -> &str {
///         "echo"
///     }
///     fn on_frame(&self, _node: &Node, peer: &NodeName, body: Bytes) -> Result<(), String> {
///         let _ = self.0.send((peer.to_string(), body));
///         Ok(())
///     }
/// }
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let ca = ClusterCa::generate("demo")?;
/// let (tx, mut rx) = mpsc::unbounded_channel();
/// let london = Node::builder("london").identity(ca.issue("london")?).trust(ca.trust())
///     .capability(Echo(tx)).start().await?;
/// let (unused, _) = mpsc::unbounded_channel();
/// let paris = Node::builder("paris").identity(ca.issue("paris")?).trust(ca.trust())
///     .capability(Echo(unused)).start().await?;
/// paris.connect("london", london.local_addr()).await?;
/// paris.send_frame("london", "echo", Bytes::from_static(b"ping"))?;
/// assert_eq!(rx.recv().await, Some(("paris".to_string(), Bytes::from_static(b"ping"))));
/// # paris.shutdown().await; london.shutdown().await;
/// # Ok(()) }
/// ```
pub trait Capability: Send + Sync + 'static {
    /// The name announced in hellos; frames of this name are routed here.
    fn name(&self) -> &str;

    /// A link to `peer` that uses this capability came up.
    fn on_link_up(&self, node: &Node, peer: &NodeName) {
        let _ = (node, peer);
    }

    /// The link to `peer` that used this capability went down. Always heard before a new link
    /// to the same peer is announced with [`Capability::on_link_up`].
    fn on_link_down(&self, node: &Node, peer: &NodeName) {
        let _ = (node, peer);
    }

    /// A frame of this capability arrived from `peer`. Runs on the link's control task, in
    /// the order the frames were sent: hand long work to a task of your own. An error (a frame
    /// that breaks the capability's protocol) closes the link with
    /// [`DownReason::ProtocolViolation`](crate::DownReason::ProtocolViolation) naming the
    /// capability and the error, counted in `malformed_frames`.
    fn on_frame(&self, node: &Node, peer: &NodeName, body: Bytes) -> Result<(), String>;
}
