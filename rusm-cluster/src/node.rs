//! The node: its name and endpoint, its processes and local names, its links to peers, its
//! events and counters. [`Node`] carries no transport type: the transport is chosen on the
//! [`NodeBuilder`] and erased behind the link driver.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusm_cluster_core::identity::{Identity, IdentityKind, NodeName, TrustAnchor};
use rusm_cluster_core::inbound::{InboundClose, InboundConfig};
use rusm_cluster_core::link::LocalIntro;
use rusm_cluster_core::registry::RegisterError;
use rusm_cluster_core::report::{PeerReport, ProcessReport, Report};
use rusm_cluster_core::router::{RouteError, Router};
use rusm_cluster_core::rpc::{ExitReason, Failure, Reply, Request};
use rusm_cluster_core::transport::{EndpointConfig, Transport, TransportTuning};
use rusm_cluster_core::wire::{Dest, Frame, Limits, RejectReason};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::capability::Capability;
use crate::error::{Error, SendError};
use crate::link::{self, Dialled, LinkHandle};
use crate::mesh::{Mesh, MeshCapability};
use crate::pid::Pid;
use crate::process::{Mail, Mailbox, Message, Process, ReplyTo};
use crate::registry::GlobalRegistry;
use crate::rpc::{Factory, Rpc};
use crate::stats::{NodeStats, Stats};

/// The backend `Node::builder` uses, chosen by cargo feature: quinn when the `quinn` feature
/// is on (the default), else s2n-quic with the `s2n` feature.
#[cfg(feature = "quinn")]
pub type DefaultTransport = rusm_transport_quinn::QuinnTransport;
/// The backend `Node::builder` uses, chosen by cargo feature: quinn when the `quinn` feature
/// is on (the default), else s2n-quic with the `s2n` feature.
#[cfg(all(feature = "s2n", not(feature = "quinn")))]
pub type DefaultTransport = rusm_transport_s2n::S2nTransport;

/// Settings of a node. The defaults suit a LAN cluster.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NodeConfig {
    /// Size limits on input from the network (message, frame and header sizes).
    pub limits: Limits,
    /// QUIC stream credit, windows and keep-alive.
    pub tuning: TransportTuning,
    /// Messages a local sender may queue in one process's mailbox before it waits.
    pub mailbox_capacity: usize,
    /// Bytes one peer may make this node hold — messages waiting in mailboxes, held back behind
    /// a gap in their pair's numbers, or half received — before its link stops reading (QUIC
    /// flow control then slows the sender). Each message is charged its declared length plus
    /// 128 bytes of bookkeeping *before* its payload is read; a message that fills its pair's
    /// gap may draw on a reserve of as much again, so out-of-order messages can never wedge the
    /// one that frees them. Bounds memory under a flood. Default 16 MiB.
    pub link_budget_bytes: usize,
    /// How long dialling plus the hello exchange may take.
    pub handshake_timeout: Duration,
    /// Incoming connections that may be in their handshake (TLS, then the hello) at once.
    /// Beyond it, new connections are refused at once (counted in `rejected_handshakes`, reason
    /// "flood: too many handshakes in progress"), so a flood of connections that never say hello
    /// holds at most this many for at most `handshake_timeout`; established links are not
    /// affected. Default 64.
    pub max_pending_handshakes: usize,
    /// How long a peer may leave a gap in a pair's numbers, or keep the link budget spent on
    /// unfinished messages, before its link is closed with [`DownReason::PeerMisbehaved`].
    pub inbound: InboundConfig,
    /// Coalescing of the messages that queue up behind a busy link into shared streams (on by
    /// default; an idle link still writes each message on a stream of its own). `None` puts every
    /// message on a stream of its own. See [`Coalescing`].
    pub coalescing: Option<Coalescing>,
    /// How long [`Node::spawn_remote`] and [`Node::attach_report`] wait for the peer's answer.
    /// Default 5 s.
    pub request_timeout: Duration,
    /// Reconnecting to a peer whose link was lost (timed out, or the connection failed; not
    /// after a goodbye, a block or a protocol violation). `None` turns it off. Default on.
    pub reconnect: Option<Reconnect>,
}

/// How a node reconnects to a peer whose link was lost: it dials the peer's listen address
/// after `first_backoff`, doubling the wait after each failure up to `max_backoff`, until a
/// link is up (its own or the peer's), the peer refuses, or `give_up_after` has passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reconnect {
    /// The wait before the first dial. Default 50 ms.
    pub first_backoff: Duration,
    /// The longest wait between dials. Default 2 s.
    pub max_backoff: Duration,
    /// How long to keep trying. Default 60 s.
    pub give_up_after: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            give_up_after: Duration::from_secs(60),
        }
    }
}

/// Coalescing, on by default: a message sent to an idle link goes on a QUIC stream of its own,
/// written at once from the sender's task; messages that queue up behind a busy link share
/// streams. One writer per link carries what queued up while it wrote the previous stream on one
/// stream together, up to `max_stream_bytes`, each message with its own header and number.
///
/// "Idle" means the link has had nothing to write for `direct_after_idle` (5 µs): a
/// request/response exchange goes direct and pays no task hop, a stream of sends coalesces. A
/// message of 64 KiB or more never joins a batch: it goes on a stream of its own, so small
/// messages queued after it do not wait for it to cross. Per-pair order holds either way.
///
/// The trade: on a busy link, a small message can wait behind other small messages queued before
/// it (at most one stream's worth, 256 KiB), and a lost packet delays the rest of its stream's
/// messages until it is resent; with one stream per message they would queue in the QUIC stack
/// instead, which under load is far slower (see the README's coalescing section for both
/// measured). Set [`NodeConfig::coalescing`] to `None` for one stream per message always.
///
/// A send returns once the message is queued (a message written directly returns once
/// written); a queued one waits while `max_queued_bytes` are queued, which is the
/// backpressure, and the writer keeps at most 4 written streams unacknowledged by the peer.
/// Messages still queued when a link fails were accepted, so they count as sent, and as
/// [`NodeStats::lost_in_transit`](crate::NodeStats) at once; those of a stream being written
/// when it failed are settled when the peer relinks, like messages in flight on streams of
/// their own. A receiver reads coalesced streams whatever its own setting.
///
/// ```
/// use rusm_cluster::{Coalescing, NodeConfig};
///
/// let mut config = NodeConfig::default();
/// assert_eq!(config.coalescing, Some(Coalescing::default()));
/// // Smaller streams: less waiting behind a lost packet, more streams under load.
/// let mut smaller = Coalescing::default();
/// smaller.max_stream_bytes = 64 << 10;
/// config.coalescing = Some(smaller);
/// // Or one stream per message always:
/// config.coalescing = None;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Coalescing {
    /// A stream is finished, and the next one begun, once it carries this many bytes.
    /// Default 256 KiB.
    pub max_stream_bytes: usize,
    /// Bytes of messages one link may hold queued before senders wait. Default 4 MiB.
    pub max_queued_bytes: usize,
    /// A message sent when the link has had nothing to write for this long (nothing queued,
    /// nothing being written) is written directly by its sender (no task hop); one sent sooner
    /// queues for the writer. Default 5 µs: a request/response exchange goes direct (even one
    /// whose round trip takes 15 µs, as on one thread over loopback), while a stream of sends,
    /// each following the last within a µs or two, coalesces. `None` always queues.
    pub direct_after_idle: Option<Duration>,
}

impl Default for Coalescing {
    fn default() -> Self {
        Coalescing {
            max_stream_bytes: 256 << 10,
            max_queued_bytes: 4 << 20,
            direct_after_idle: Some(Duration::from_micros(5)),
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            limits: Limits::default(),
            tuning: TransportTuning::default(),
            mailbox_capacity: 1024,
            link_budget_bytes: 16 << 20,
            handshake_timeout: Duration::from_secs(5),
            max_pending_handshakes: 64,
            inbound: InboundConfig::default(),
            coalescing: Some(Coalescing::default()),
            request_timeout: Duration::from_secs(5),
            reconnect: Some(Reconnect::default()),
        }
    }
}

/// Something that happened to the node's links.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeEvent {
    /// A link to `node` is up (both ends authenticated and exchanged hellos).
    NodeUp {
        /// The peer.
        node: NodeName,
        /// Its address.
        addr: SocketAddr,
    },
    /// The link to `node` went down.
    NodeDown {
        /// The peer.
        node: NodeName,
        /// Why.
        reason: DownReason,
    },
}

/// Why a link went down.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DownReason {
    /// The peer said goodbye (it shut down, or closed the link on purpose).
    Goodbye(String),
    /// The peer stopped answering keep-alives.
    TimedOut,
    /// The connection was lost or closed.
    ConnectionLost(String),
    /// The peer broke the protocol (malformed or oversized control frame); we closed the link.
    ProtocolViolation(String),
    /// This node shut down.
    Shutdown,
    /// This node no longer trusts the peer's certificate ([`Node::set_trust`]: revoked, or
    /// from a CA no longer trusted); we closed the link.
    TrustRevoked(String),
    /// The peer restarted: a new incarnation of it linked, and its link replaced this stale
    /// one (sends still in flight on it failed).
    PeerRestarted,
    /// The peer sent a frame of a capability the link does not use (it, or this node, did not
    /// announce it); we closed the link.
    CapabilityRefused(RouteError),
    /// The peer made this node hold more than it may (a gap never filled, the link budget
    /// spent on its unfinished messages, a flood of lost notices); we closed the link.
    PeerMisbehaved(InboundClose),
}

impl fmt::Display for DownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DownReason::Goodbye(r) => write!(f, "peer said goodbye: {r}"),
            DownReason::TimedOut => f.write_str("peer timed out"),
            DownReason::ConnectionLost(r) => write!(f, "connection lost: {r}"),
            DownReason::ProtocolViolation(r) => write!(f, "protocol violation: {r}"),
            DownReason::Shutdown => f.write_str("this node shut down"),
            DownReason::TrustRevoked(why) => write!(f, "peer no longer trusted: {why}"),
            DownReason::PeerRestarted => {
                f.write_str("the peer restarted (a new incarnation linked)")
            }
            DownReason::PeerMisbehaved(why) => write!(f, "peer misbehaved: {why}"),
            DownReason::CapabilityRefused(why) => write!(f, "protocol violation: {why}"),
        }
    }
}

/// A connected peer, as [`Node::peers`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerInfo {
    /// Its node name.
    pub name: NodeName,
    /// Its address.
    pub addr: SocketAddr,
    /// Its incarnation.
    pub creation: u64,
    /// The current round-trip estimate.
    pub rtt: Option<Duration>,
    /// Messages sent to it on this link.
    pub messages_sent: u64,
    /// Message streams opened to it on this link (one per message, unless coalescing).
    pub streams_sent: u64,
    /// Messages received from it on this link.
    pub messages_received: u64,
    /// The capabilities the link uses (both ends announced them).
    pub capabilities: Vec<String>,
    /// The peer is hidden (an attach client): it never joins the mesh.
    pub hidden: bool,
    /// (Sender, destination) pairs from this peer whose order this node keeps state for: the
    /// pairs of the peer's live processes (an exited process's pairs are forgotten).
    pub pairs_in: usize,
}

/// Type-erased transport operations (the node is not generic; the driver is).
pub(crate) trait Dialer: Send + Sync {
    fn dial(
        &self,
        node: Node,
        peer: NodeName,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Result<Dialled, Error>> + Send>>;
    /// Closes the endpoint, waits for it to drain, and lets go of it, so its address is free.
    fn shutdown(&self) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The node's hold on its endpoint, given up at shutdown (the accept loop holds the other
/// reference, and lets go once the endpoint is closed).
struct TypedDialer<T: Transport>(Mutex<Option<Arc<T>>>);

impl<T: Transport> Dialer for TypedDialer<T> {
    fn dial(
        &self,
        node: Node,
        peer: NodeName,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Result<Dialled, Error>> + Send>> {
        match lock(&self.0).clone() {
            Some(transport) => Box::pin(link::dial(node, transport, peer, addr)),
            None => Box::pin(std::future::ready(Err(Error::Shutdown))),
        }
    }
    fn shutdown(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let transport = lock(&self.0).take();
        Box::pin(async move {
            let Some(transport) = transport else { return };
            transport.close();
            transport.wait_idle().await;
            let addr = transport.local_addr().ok();
            drop(transport);
            // The stacks let go of their socket from their own tasks, a moment after the last
            // handle goes: wait (up to 3 s) until the address can be bound again, so a node
            // restarted on it at once succeeds.
            let Some(addr) = addr else { return };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while std::net::UdpSocket::bind(addr).is_err() && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    }
}

/// How one go at [`Node::connect`] ended.
enum Attempt {
    Done(Result<(), Error>),
    /// Another task of this node is dialling the peer.
    OtherDial,
}

pub(crate) struct ProcessSlot {
    pub(crate) mailbox: Mailbox,
    pub(crate) task: Option<JoinHandle<()>>,
}

#[derive(Default)]
pub(crate) struct Links {
    pub(crate) up: HashMap<NodeName, Arc<LinkHandle>, foldhash::fast::RandomState>,
    pub(crate) dialling: HashSet<NodeName>,
    /// Peers this node keeps cut off ([`Node::block`]).
    pub(crate) blocked: HashSet<NodeName>,
    pub(crate) shut_down: bool,
    /// The last link to each peer that went down, kept until the next link to that peer settles
    /// what was in transit on it (see [`EndedLink`](rusm_cluster_core::link::EndedLink)).
    pub(crate) ended:
        HashMap<NodeName, rusm_cluster_core::link::EndedLink, foldhash::fast::RandomState>,
}

pub(crate) struct NodeInner {
    pub(crate) name: NodeName,
    pub(crate) creation: u64,
    pub(crate) identity: Identity,
    pub(crate) config: NodeConfig,
    pub(crate) local_addr: SocketAddr,
    pub(crate) next_pid: AtomicU64,
    pub(crate) processes: RwLock<HashMap<u64, ProcessSlot, foldhash::fast::RandomState>>,
    pub(crate) names: RwLock<HashMap<String, u64>>,
    pub(crate) links: Mutex<Links>,
    pub(crate) events: broadcast::Sender<NodeEvent>,
    pub(crate) stats: Stats,
    pub(crate) dialer: Box<dyn Dialer>,
    /// The runtime the node's own tasks (links, processes, dials) run on.
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) next_link_id: AtomicU64,
    /// The node's capabilities, by name.
    pub(crate) router: Router<Arc<dyn Capability>>,
    /// Woken whenever a link comes up or goes down, a dial ends, or the node shuts down.
    pub(crate) links_changed: tokio::sync::Notify,
    /// What the node says of itself in hellos and welcomes.
    pub(crate) intro: LocalIntro,
    /// The global registry (also in the router, as the `registry` capability).
    pub(crate) registry: Arc<GlobalRegistry>,
    /// Requests, factories and monitors (also in the router, as the `rpc` capability).
    pub(crate) rpc: Arc<Rpc>,
    /// When the node started.
    pub(crate) started: std::time::Instant,
    /// Refused handshakes and hellos, by reason.
    pub(crate) refusals: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Whom the node trusts, changeable while it runs ([`Node::set_trust`]).
    pub(crate) trust: Arc<rusm_cluster_core::tls::LiveTrust>,
    /// Places for incoming connections in their handshake ([`NodeConfig::max_pending_handshakes`]).
    pub(crate) handshakes: Arc<tokio::sync::Semaphore>,
}

impl NodeInner {
    /// Counts an incoming connection refused before or in its TLS handshake, under `reason`.
    pub(crate) fn refused_handshake(&self, reason: &str) {
        self.stats
            .rejected_handshakes
            .fetch_add(1, Ordering::Relaxed);
        self.count_refusal(reason);
    }

    /// Counts a hello refused (or never sent), under `reason`.
    pub(crate) fn refused_hello(&self, reason: &str) {
        self.stats.rejected_hellos.fetch_add(1, Ordering::Relaxed);
        self.count_refusal(reason);
    }

    fn count_refusal(&self, reason: &str) {
        *lock(&self.refusals).entry(reason.to_string()).or_insert(0) += 1;
    }
}

/// A running node. Cheap to clone (all clones are the same node).
///
/// ```
/// use bytes::Bytes;
/// use rusm_cluster::{ClusterCa, Node};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let ca = ClusterCa::generate("demo")?;
/// let london = Node::builder("london").identity(ca.issue("london")?).trust(ca.trust())
///     .listen("127.0.0.1:0".parse()?).start().await?;
/// let paris = Node::builder("paris").identity(ca.issue("paris")?).trust(ca.trust())
///     .listen("127.0.0.1:0".parse()?).start().await?;
///
/// let (tx, rx) = tokio::sync::oneshot::channel();
/// let greeter = london.spawn(|mut ctx| async move {
///     let msg = ctx.recv().await.unwrap();
///     tx.send(msg.into_payload()).unwrap();
/// });
/// london.register("greeter", &greeter)?;
///
/// paris.connect("london", london.local_addr()).await?;
/// paris.send("london", "greeter", Bytes::from_static(b"hi")).await?;
/// assert_eq!(rx.await?, Bytes::from_static(b"hi"));
/// assert_eq!(paris.peers()[0].name.as_str(), "london");
/// # paris.shutdown().await; london.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<NodeInner>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.inner.name)
            .field("creation", &self.inner.creation)
            .field("addr", &self.inner.local_addr)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Node`]. Generic over the transport while it is being built; the node it starts
/// is not.
pub struct NodeBuilder<T> {
    name: String,
    identity: Option<Identity>,
    trust: Option<TrustAnchor>,
    listen: SocketAddr,
    config: NodeConfig,
    capabilities: Vec<Arc<dyn Capability>>,
    hidden: bool,
    runtime: Option<tokio::runtime::Handle>,
    _transport: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for NodeBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("name", &self.name)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

#[cfg(any(feature = "quinn", feature = "s2n"))]
impl Node {
    /// Starts building a node called `name` on the default backend ([`DefaultTransport`]);
    /// `.transport::<T>()` picks another.
    pub fn builder(name: impl Into<String>) -> NodeBuilder<DefaultTransport> {
        NodeBuilder::new(name)
    }
}

impl<T: Transport> NodeBuilder<T> {
    /// Starts building a node called `name` on transport `T`.
    pub fn new(name: impl Into<String>) -> Self {
        NodeBuilder {
            name: name.into(),
            identity: None,
            trust: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            config: NodeConfig::default(),
            capabilities: Vec::new(),
            hidden: false,
            runtime: None,
            _transport: PhantomData,
        }
    }

    /// Uses another transport backend.
    pub fn transport<U: Transport>(self) -> NodeBuilder<U> {
        NodeBuilder {
            name: self.name,
            identity: self.identity,
            trust: self.trust,
            listen: self.listen,
            config: self.config,
            capabilities: self.capabilities,
            hidden: self.hidden,
            runtime: self.runtime,
            _transport: PhantomData,
        }
    }

    /// The node's certificate and key: from [`ClusterCa::issue`](crate::ClusterCa::issue) for
    /// this node's name, or a shared [`Identity::generate`].
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Whom to trust (the cluster CA and its CRL). Not needed with a shared identity.
    pub fn trust(mut self, trust: TrustAnchor) -> Self {
        self.trust = Some(trust);
        self
    }

    /// The UDP address to listen on (default `127.0.0.1:0`, a free port on loopback).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Replaces the whole configuration.
    pub fn config(mut self, config: NodeConfig) -> Self {
        self.config = config;
        self
    }

    /// Adds a [`Capability`]: a protocol on the control stream of every link whose peer has
    /// it too. Two capabilities of one name are refused by [`start`](Self::start).
    pub fn capability(mut self, capability: impl Capability) -> Self {
        self.capabilities.push(Arc::new(capability));
        self
    }

    /// Makes the node *hidden*, as an operator's attach client is: its peers link to it when
    /// it connects, but it never joins the mesh (no member is told of it, and it dials no
    /// member it hears of) and it takes no part in the global registry (it neither sees nor
    /// registers global names). Default: not hidden.
    pub fn hidden(mut self, hidden: bool) -> Self {
        self.hidden = hidden;
        self
    }

    /// Runs the node on `runtime` instead of the one that calls [`start`](Self::start): its
    /// endpoint, links, processes and dials all run there, whichever runtime later calls
    /// [`Node::spawn`] or [`Node::connect`] (sends run on the sender's task, as always).
    ///
    /// A node's processes, its link readers and its QUIC stack wake one another for every
    /// message. On a multi-thread runtime those wake-ups often cross to another worker thread,
    /// which costs a round trip far more than the work itself; a node on a current-thread runtime
    /// of its own keeps them on one thread. For the lowest latency, give each node such a runtime
    /// (see the README's performance section for the measured difference).
    ///
    /// The runtime must be driven (a current-thread runtime by a thread blocking on it) for as
    /// long as the node lives: shut the node down before the runtime, since a runtime that stops
    /// drops the node's tasks without their teardown.
    ///
    /// ```
    /// # #[cfg(feature = "quinn")]
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use rusm_cluster::{Identity, Node};
    ///
    /// // A current-thread runtime on a thread of its own, for the node.
    /// let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    /// let handle = rt.handle().clone();
    /// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    /// let thread = std::thread::spawn(move || rt.block_on(async { let _ = stopped.await; }));
    ///
    /// let app = tokio::runtime::Runtime::new()?;
    /// app.block_on(async {
    ///     let node = Node::builder("london")
    ///         .identity(Identity::generate()?)
    ///         .runtime(handle)
    ///         .start()
    ///         .await?;
    ///     // ... use `node` from here, as usual ...
    ///     node.shutdown().await;
    ///     Ok::<_, rusm_cluster::Error>(())
    /// })?;
    /// let _ = stop.send(());
    /// thread.join().expect("the node's thread");
    /// # Ok(())
    /// # }
    /// # #[cfg(not(feature = "quinn"))]
    /// # fn main() {}
    /// ```
    pub fn runtime(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// Sets the largest message payload this node accepts (and announces to peers).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.config.limits.max_message_size = bytes;
        self
    }

    /// Binds the endpoint and starts accepting links. Must run inside a tokio runtime; the node
    /// runs on that runtime, or on the one given to [`runtime`](Self::runtime).
    pub async fn start(mut self) -> Result<Node, Error> {
        match self.runtime.take() {
            Some(runtime) => run_on(&runtime, self.start_here())
                .await
                .unwrap_or_else(|e| Err(Error::Config(format!("the node's runtime: {e}")))),
            None => self.start_here().await,
        }
    }

    async fn start_here(self) -> Result<Node, Error> {
        let name = NodeName::new(&self.name)?;
        let identity = self
            .identity
            .ok_or_else(|| Error::Config("no identity: call .identity(..)".into()))?;
        let shared = match identity.kind() {
            IdentityKind::Node(cert_name) if cert_name != &name => {
                return Err(Error::Config(format!(
                    "the identity is issued for node {cert_name:?}, not {name:?}"
                )))
            }
            IdentityKind::Node(_) => false,
            _ => true,
        };
        let trust = match (self.trust, identity.shared_trust()) {
            (Some(t), _) => t,
            (None, Some(t)) => t,
            (None, None) => {
                return Err(Error::Config(
                    "no trust anchor: call .trust(ca.trust())".into(),
                ))
            }
        };
        let creation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        let registry = Arc::new(GlobalRegistry::new(name.clone(), creation));
        let rpc = Rpc::new();
        let mut router: Router<Arc<dyn Capability>> = Router::new();
        router.register(rusm_cluster_core::rpc::CAPABILITY, rpc.clone());
        if !self.hidden {
            router.register(rusm_cluster_core::registry::CAPABILITY, registry.clone());
            router.register(
                crate::mesh::CAPABILITY,
                Arc::new(MeshCapability(Arc::new(Mesh::new()))),
            );
        }
        for capability in self.capabilities {
            let name = capability.name().to_string();
            if !router.register(&name, capability) {
                return Err(Error::Config(format!(
                    "capability {name:?} added twice (\"registry\", \"mesh\" and \"rpc\" are the node's own)"
                )));
            }
        }
        let pending_handshakes = self.config.max_pending_handshakes.max(1);
        let live_trust =
            rusm_cluster_core::tls::LiveTrust::new(&trust).map_err(|e| Error::Tls(Arc::new(e)))?;
        let transport = Arc::new(T::bind(EndpointConfig {
            live_trust: Some(live_trust.clone()),
            identity: identity.clone(),
            trust,
            listen: self.listen,
            tuning: self.config.tuning.clone(),
        })?);
        let local_addr = transport.local_addr()?;
        let (events, _) = broadcast::channel(256);
        let intro = LocalIntro {
            name: name.clone(),
            creation,
            listen_addr: Some(local_addr),
            capabilities: router.names(),
            max_message_size: self.config.limits.max_message_size as u64,
            shared_identity: shared,
            hidden: self.hidden,
        };
        let node = Node {
            inner: Arc::new(NodeInner {
                name,
                creation,
                identity,
                config: self.config,
                local_addr,
                next_pid: AtomicU64::new(1),
                processes: RwLock::new(HashMap::default()),
                names: RwLock::new(HashMap::new()),
                links: Mutex::new(Links::default()),
                events,
                stats: Stats::default(),
                dialer: Box::new(TypedDialer(Mutex::new(Some(transport.clone())))),
                next_link_id: AtomicU64::new(1),
                router,
                links_changed: tokio::sync::Notify::new(),
                intro,
                registry,
                rpc,
                started: std::time::Instant::now(),
                trust: live_trust,
                handshakes: Arc::new(tokio::sync::Semaphore::new(pending_handshakes)),
                refusals: Mutex::new(Default::default()),
                runtime: tokio::runtime::Handle::current(),
            }),
        };
        node.inner
            .runtime
            .spawn(link::accept_loop(Arc::downgrade(&node.inner), transport));
        tracing::info!(node = %node.inner.name, addr = %local_addr, backend = T::NAME, "node started");
        Ok(node)
    }
}

/// A dial in progress to `peer` (in `Links::dialling`); dropping it ends the mark and wakes
/// those waiting for that dial to end.
struct DiallingMark<'a> {
    inner: &'a NodeInner,
    peer: &'a NodeName,
}

impl Drop for DiallingMark<'_> {
    fn drop(&mut self) {
        lock(&self.inner.links).dialling.remove(self.peer);
        self.inner.links_changed.notify_waiters();
    }
}

/// Runs `fut` as a task on `runtime` and waits for it, as if it ran in the caller: dropping the
/// wait aborts the task, and a panic in it resumes in the caller. `Err` when the runtime
/// dropped the task (it shut down).
async fn run_on<F>(
    runtime: &tokio::runtime::Handle,
    fut: F,
) -> Result<F::Output, tokio::task::JoinError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
    impl<T> Drop for AbortOnDrop<T> {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = AbortOnDrop(runtime.spawn(fut));
    match (&mut task.0).await {
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        other => other,
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
pub(crate) fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

impl Node {
    /// This node's name.
    pub fn name(&self) -> &NodeName {
        &self.inner.name
    }

    /// This node's incarnation (a new value each start).
    pub fn creation(&self) -> u64 {
        self.inner.creation
    }

    /// The address this node accepts links on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// Spawns a process running `f(ctx)` and returns its pid. The process ends when the future
    /// returns (its names are then unregistered) or when the node shuts down.
    pub fn spawn<F, Fut>(&self, f: F) -> Pid
    where
        F: FnOnce(Process) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let id = self.inner.next_pid.fetch_add(1, Ordering::Relaxed);
        let pid = Pid {
            node: self.inner.name.clone(),
            id,
            creation: self.inner.creation,
        };
        let (mailbox, rx) = Mailbox::new(self.inner.config.mailbox_capacity);
        let fut = f(Process::new(pid.clone(), self.clone(), rx));
        // Insert before the task can run, so it can be sent to at once.
        write(&self.inner.processes).insert(
            id,
            ProcessSlot {
                mailbox,
                task: None,
            },
        );
        let guard = ExitGuard {
            node: Arc::downgrade(&self.inner),
            id,
            reason: ExitReason::Killed,
        };
        let task = self.inner.runtime.spawn(async move {
            use futures_util::FutureExt;
            // The whole guard moves in (not just the field assigned), so it drops with the task.
            let mut guard = guard;
            guard.reason = match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
                Ok(()) => ExitReason::Normal,
                Err(panic) => ExitReason::Panicked(panic_message(&*panic)),
            };
        });
        if let Some(slot) = write(&self.inner.processes).get_mut(&id) {
            slot.task = Some(task);
        }
        pid
    }

    /// Whether `pid` is a live local process.
    pub fn is_alive(&self, pid: &Pid) -> bool {
        pid.node == self.inner.name
            && pid.creation == self.inner.creation
            && read(&self.inner.processes)
                .get(&pid.id)
                .is_some_and(|s| !s.mailbox.is_closed())
    }

    /// Registers `pid` (a local process) under `name`, so others can send to it by name.
    pub fn register(&self, name: &str, pid: &Pid) -> Result<(), Error> {
        if !self.is_alive(pid) {
            return Err(Error::NoProcess { pid: pid.clone() });
        }
        let mut names = write(&self.inner.names);
        if let Some(&owner) = names.get(name) {
            if owner != pid.id {
                return Err(Error::NameTaken {
                    name: name.to_string(),
                    pid: self.local_pid(owner),
                });
            }
        }
        names.insert(name.to_string(), pid.id);
        Ok(())
    }

    /// Removes a registered name; returns the pid it named.
    pub fn unregister(&self, name: &str) -> Option<Pid> {
        let id = write(&self.inner.names).remove(name)?;
        Some(self.local_pid(id))
    }

    /// The local process registered as `name`.
    pub fn whereis(&self, name: &str) -> Option<Pid> {
        let id = *read(&self.inner.names).get(name)?;
        Some(self.local_pid(id))
    }

    /// The locally registered names.
    pub fn registered(&self) -> Vec<String> {
        read(&self.inner.names).keys().cloned().collect()
    }

    /// Registers local process `pid` under the global `name`: every node of the cluster learns
    /// it (those linked now at once, those that link later when they do), and
    /// [`send_global`](Self::send_global) on any of them reaches the process. The name is
    /// released everywhere when the process exits, when [`unregister_global`] is called, or
    /// (on the other nodes) when this node goes down.
    ///
    /// If two processes take one name on two sides of a partition (or on two nodes at the same
    /// moment), every node settles on the same owner when they meet, without an extra round
    /// trip: the earliest registration wins (by its owner's hybrid clock; see
    /// [`core::registry`](crate::core::registry) for the rule and why it is safe). The loser
    /// gets a [`Notice::NameConflict`](crate::Notice::NameConflict) message and messages to the
    /// name stop reaching it.
    ///
    /// Errors: [`Error::NameTaken`] with the current owner, [`Error::NoProcess`] when `pid` is
    /// not a live process of this node, [`Error::BadName`], [`Error::Config`] on a
    /// [hidden](NodeBuilder::hidden) node.
    ///
    /// [`unregister_global`]: Self::unregister_global
    ///
    /// ```
    /// use bytes::Bytes;
    /// use rusm_cluster::{ClusterCa, Node};
    ///
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let ca = ClusterCa::generate("demo")?;
    /// let start = |name: &'static str| {
    ///     let (id, trust) = (ca.issue(name).unwrap(), ca.trust());
    ///     async move { Node::builder(name).identity(id).trust(trust).start().await }
    /// };
    /// let (london, paris, rome) = (start("london").await?, start("paris").await?, start("rome").await?);
    /// paris.connect("london", london.local_addr()).await?;
    /// rome.connect("london", london.local_addr()).await?;   // rome meets paris through london
    ///
    /// let (tx, rx) = tokio::sync::oneshot::channel();
    /// let db = london.spawn(|mut ctx| async move {
    ///     tx.send(ctx.recv().await.unwrap().into_payload()).unwrap();
    /// });
    /// london.register_global("db", &db).await?;
    /// while rome.whereis_global("db").is_none() {
    ///     tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    /// }
    /// assert_eq!(rome.whereis_global("db"), Some(db));
    /// rome.send_global("db", Bytes::from_static(b"query")).await?;
    /// assert_eq!(rx.await?, "query");
    /// # for n in [rome, paris, london] { n.shutdown().await; }
    /// # Ok(()) }
    /// ```
    pub async fn register_global(&self, name: &str, pid: &Pid) -> Result<(), Error> {
        if self.inner.intro.hidden {
            return Err(Error::Config(
                "a hidden node takes no part in the global registry".into(),
            ));
        }
        if !self.is_alive(pid) {
            return Err(Error::NoProcess { pid: pid.clone() });
        }
        match self.inner.registry.register(self, name, pid.id) {
            Ok(()) => {}
            Err(RegisterError::Taken(owner)) => {
                return Err(Error::NameTaken {
                    name: name.to_string(),
                    pid: Pid::of_owner(&owner),
                })
            }
            Err(RegisterError::BadName(len)) => {
                let max = rusm_cluster_core::registry::RegistryConfig::default().max_name_len;
                return Err(Error::BadName { len, max });
            }
        }
        // The process may have exited meanwhile, its exit releasing its names before this one
        // was taken: release it here then.
        if !self.is_alive(pid) {
            let id = pid.id;
            self.inner
                .registry
                .run(self, None, |r, out| r.process_exited(id, out));
            return Err(Error::NoProcess { pid: pid.clone() });
        }
        Ok(())
    }

    /// Releases global name `name`, held by a process of this node, everywhere; returns that
    /// process.
    ///
    /// Errors: [`Error::NotOwner`] when a process of another node holds it,
    /// [`Error::NameNotRegistered`] when nobody does.
    pub async fn unregister_global(&self, name: &str) -> Result<Pid, Error> {
        let (released, owner) = self
            .inner
            .registry
            .run(self, None, |r, out| {
                let released = r.unregister(name, out);
                (released, r.whereis(name).cloned())
            })
            .0;
        if let Some(id) = released {
            return Ok(self.local_pid(id));
        }
        match owner {
            Some(owner) => Err(Error::NotOwner {
                name: name.to_string(),
                owner: Pid::of_owner(&owner),
            }),
            None => Err(Error::NameNotRegistered {
                name: name.to_string(),
            }),
        }
    }

    /// The process that holds global name `name`, as this node sees it.
    pub fn whereis_global(&self, name: &str) -> Option<Pid> {
        self.inner
            .registry
            .read(|r| r.whereis(name).map(Pid::of_owner))
    }

    /// Every global name this node knows of, with its owner, sorted by name.
    pub fn registered_global(&self) -> Vec<(String, Pid)> {
        self.inner.registry.read(|r| {
            r.names()
                .into_iter()
                .map(|(name, o)| (name, Pid::of_owner(&o)))
                .collect()
        })
    }

    fn local_pid(&self, id: u64) -> Pid {
        Pid {
            node: self.inner.name.clone(),
            id,
            creation: self.inner.creation,
        }
    }

    /// Connects to node `name` listening at `addr`: mutual TLS, then the hello exchange on the
    /// control stream. Returns once the link is up (at once if it already is).
    ///
    /// Errors: [`Error::Rejected`] when either side refuses the other (untrusted or revoked
    /// certificate, a certificate not valid for `name`, protocol mismatch),
    /// [`Error::Timeout`], [`Error::Transport`].
    pub async fn connect(&self, name: &str, addr: SocketAddr) -> Result<(), Error> {
        let peer = NodeName::new(name)?;
        // The dial runs on the node's runtime (its QUIC connection's tasks start where it is
        // dialled); dropping this call stops it, as if it ran here.
        let node = self.clone();
        run_on(&self.inner.runtime, async move {
            node.connect_here(peer, addr).await
        })
        .await
        // The node's runtime is gone.
        .unwrap_or(Err(Error::Shutdown))
    }

    async fn connect_here(&self, peer: NodeName, addr: SocketAddr) -> Result<(), Error> {
        if peer == self.inner.name {
            return Err(Error::Config("a node cannot connect to itself".into()));
        }
        let deadline = tokio::time::Instant::now() + self.inner.config.handshake_timeout;
        loop {
            match self.try_connect(&peer, addr).await {
                Attempt::Done(result) => return result,
                // Another task of this node was dialling it: once that dial ends, its link is up,
                // or this call dials itself (so it reports its own refusal, not a timeout).
                Attempt::OtherDial => {
                    if tokio::time::timeout_at(deadline, self.wait_dial_end(&peer))
                        .await
                        .is_err()
                    {
                        return Err(Error::Timeout {
                            what: format!("waiting for the link to {peer}"),
                        });
                    }
                }
            }
        }
    }

    /// Waits until no task of this node is dialling `peer` (or the link is up, or the node
    /// shuts down).
    async fn wait_dial_end(&self, peer: &NodeName) {
        self.wait_links(|links| {
            (links.up.contains_key(peer) || links.shut_down || !links.dialling.contains(peer))
                .then_some(())
        })
        .await
    }

    /// Looks at the node's links each time they change until `check` gives an answer.
    async fn wait_links<R>(&self, mut check: impl FnMut(&Links) -> Option<R>) -> R {
        loop {
            let changed = self.inner.links_changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a change right after the look still wakes us.
            changed.as_mut().enable();
            if let Some(answer) = check(&lock(&self.inner.links)) {
                return answer;
            }
            changed.await;
        }
    }

    /// One go at [`connect`](Self::connect): done, or another task is dialling the peer.
    async fn try_connect(&self, peer: &NodeName, addr: SocketAddr) -> Attempt {
        let peer = peer.clone();
        let someone_else_dials = {
            let mut links = lock(&self.inner.links);
            if links.shut_down {
                return Attempt::Done(Err(Error::Shutdown));
            }
            if links.up.contains_key(&peer) {
                return Attempt::Done(Ok(()));
            }
            if links.blocked.contains(&peer) {
                return Attempt::Done(Err(Error::Rejected {
                    node: peer,
                    reason: RejectReason::Blocked,
                }));
            }
            !links.dialling.insert(peer.clone())
        };
        if someone_else_dials {
            return Attempt::OtherDial;
        }
        // The mark goes with the dial, even one dropped half-way (a cancelled connect).
        let dialling = DiallingMark {
            inner: &self.inner,
            peer: &peer,
        };
        let res = tokio::time::timeout(
            self.inner.config.handshake_timeout,
            self.inner.dialer.dial(self.clone(), peer.clone(), addr),
        )
        .await;
        drop(dialling);
        Attempt::Done(match res {
            Ok(Ok(Dialled::Up)) => Ok(()),
            // The peer's own dial to us won the tie-break: that link is (or is about to be) up.
            Ok(Ok(Dialled::PeerDialWins)) => self.wait_for_link(&peer).await,
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Timeout {
                what: format!("connecting to {peer} at {addr}"),
            }),
        })
    }

    /// Waits for a link to `peer` that another dial (ours or the peer's) is bringing up.
    async fn wait_for_link(&self, peer: &NodeName) -> Result<(), Error> {
        let wait = self.wait_links(|links| {
            if links.up.contains_key(peer) {
                Some(Ok(()))
            } else if links.shut_down {
                Some(Err(Error::Shutdown))
            } else {
                None
            }
        });
        tokio::time::timeout(self.inner.config.handshake_timeout, wait)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("waiting for the link to {peer}"),
            })?
    }

    /// Sends `payload` to the process registered as `name` on node `node` (this node or a
    /// peer). Per-pair order holds: messages from one sender to one destination arrive in the
    /// order sent.
    ///
    /// Returns once the message is handed to the link (like Erlang's `!`, not a delivery
    /// receipt); it waits while the link's queue is full, which is the backpressure. A remote
    /// name that is not registered is counted as a dead letter on the receiving node.
    ///
    /// Errors (with the payload handed back): [`Error::NotConnected`],
    /// [`Error::NameNotRegistered`] (local names), [`Error::MessageTooLarge`].
    ///
    /// # Cancel safety
    /// Cancel safe: if the future is dropped before it returns, the message was not sent.
    pub async fn send(&self, node: &str, name: &str, payload: Bytes) -> Result<(), SendError> {
        self.send_from(None, node, name, payload).await
    }

    /// Sends `payload` to the process that holds global name `name`, wherever it lives (see
    /// [`register_global`](Self::register_global)). Per-pair order holds as for
    /// [`send`](Self::send). The owner's node delivers it only while its claim still wins: a
    /// message that reaches a node whose process lost the name (or exited) in the meantime is
    /// counted there as a dead letter, never given to the loser.
    ///
    /// Errors (with the payload handed back): [`Error::NameNotRegistered`] when no node this one
    /// knows holds the name, and those of [`send`](Self::send).
    pub async fn send_global(&self, name: &str, payload: Bytes) -> Result<(), SendError> {
        self.send_global_from(None, name, payload).await
    }

    pub(crate) async fn send_global_from(
        &self,
        from: Option<&Pid>,
        name: &str,
        payload: Bytes,
    ) -> Result<(), SendError> {
        let Some(owner) = self.whereis_global(name) else {
            return Err(SendError::new(
                Error::NameNotRegistered {
                    name: name.to_string(),
                },
                payload,
            ));
        };
        if owner.node == self.inner.name {
            return self.send_local(from, &owner, payload).await;
        }
        self.send_remote(from, &owner.node, Dest::Global(name.to_string()), payload)
            .await
    }

    /// Sends `payload` to `pid`, local or remote. See [`Node::send`].
    pub async fn send_to(&self, pid: &Pid, payload: Bytes) -> Result<(), SendError> {
        self.send_to_from(None, pid, payload).await
    }

    pub(crate) async fn send_from(
        &self,
        from: Option<&Pid>,
        node: &str,
        name: &str,
        payload: Bytes,
    ) -> Result<(), SendError> {
        if node == self.inner.name.as_str() {
            let Some(pid) = self.whereis(name) else {
                self.inner
                    .stats
                    .dead_letters
                    .fetch_add(1, Ordering::Relaxed);
                return Err(SendError::new(
                    Error::NameNotRegistered {
                        name: name.to_string(),
                    },
                    payload,
                ));
            };
            return self.send_local(from, &pid, payload).await;
        }
        let node = match NodeName::new(node) {
            Ok(n) => n,
            Err(e) => return Err(SendError::new(e.into(), payload)),
        };
        self.send_remote(from, &node, Dest::Name(name.to_string()), payload)
            .await
    }

    pub(crate) async fn send_to_from(
        &self,
        from: Option<&Pid>,
        pid: &Pid,
        payload: Bytes,
    ) -> Result<(), SendError> {
        if pid.node == self.inner.name {
            return self.send_local(from, pid, payload).await;
        }
        let to = Dest::Pid {
            id: pid.id,
            creation: pid.creation,
        };
        self.send_remote(from, &pid.node, to, payload).await
    }

    /// The mailbox of local process `pid`, if it lives (and is of this incarnation).
    fn mailbox_of(&self, pid: &Pid) -> Option<Mailbox> {
        if pid.creation != self.inner.creation {
            return None;
        }
        read(&self.inner.processes)
            .get(&pid.id)
            .map(|s| s.mailbox.clone())
    }

    async fn send_local(
        &self,
        from: Option<&Pid>,
        pid: &Pid,
        payload: Bytes,
    ) -> Result<(), SendError> {
        let mailbox = self.mailbox_of(pid);
        let no_process = || Error::NoProcess { pid: pid.clone() };
        let Some(mailbox) = mailbox else {
            self.inner
                .stats
                .dead_letters
                .fetch_add(1, Ordering::Relaxed);
            return Err(SendError::new(no_process(), payload));
        };
        match mailbox.send_local(from.cloned(), payload).await {
            Ok(()) => {
                self.inner
                    .stats
                    .local_messages
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(payload) => {
                self.inner
                    .stats
                    .dead_letters
                    .fetch_add(1, Ordering::Relaxed);
                Err(SendError::new(no_process(), payload))
            }
        }
    }

    async fn send_remote(
        &self,
        from: Option<&Pid>,
        node: &NodeName,
        to: Dest,
        payload: Bytes,
    ) -> Result<(), SendError> {
        let link = lock(&self.inner.links).up.get(node).cloned();
        let Some(link) = link else {
            return Err(SendError::new(
                Error::NotConnected { node: node.clone() },
                payload,
            ));
        };
        if let Dest::Pid { id, creation } = to {
            if creation != link.peer_creation() {
                let pid = Pid {
                    node: node.clone(),
                    id,
                    creation,
                };
                let current = link.peer_creation();
                return Err(SendError::new(Error::StalePid { pid, current }, payload));
            }
        }
        let max = link
            .peer_max_message
            .min(self.inner.config.limits.max_message_size);
        if payload.len() > max {
            self.inner
                .stats
                .refused_too_large
                .fetch_add(1, Ordering::Relaxed);
            let size = payload.len();
            return Err(SendError::new(
                Error::MessageTooLarge { size, max },
                payload,
            ));
        }
        link.send(from.map(|p| p.id), to, payload).await
    }

    /// Sends a frame of `capability` to `peer` on the link's control stream (see
    /// [`Capability`]). Frames to one peer arrive in the order sent.
    ///
    /// Errors: [`Error::NotConnected`] when no link to `peer` is up;
    /// [`Error::CapabilityNotNegotiated`] when the link does not use `capability`.
    pub fn send_frame(&self, peer: &str, capability: &str, body: Bytes) -> Result<(), Error> {
        self.send_capability(&NodeName::new(peer)?, capability, body)
    }

    /// [`send_frame`](Self::send_frame) to a peer named already: the one path by which the
    /// node's own capabilities (registry, mesh, rpc) and users' send their frames.
    pub(crate) fn send_capability(
        &self,
        peer: &NodeName,
        capability: &str,
        body: Bytes,
    ) -> Result<(), Error> {
        let link = lock(&self.inner.links).up.get(peer).cloned();
        let Some(link) = link else {
            return Err(Error::NotConnected { node: peer.clone() });
        };
        if !link.capabilities.allows(capability) {
            return Err(Error::CapabilityNotNegotiated {
                node: link.peer.clone(),
                capability: capability.to_string(),
            });
        }
        link.send_frame(Frame::Capability {
            capability: capability.to_string(),
            body,
        })
    }

    /// The peers with a link up. Hidden nodes (attach clients) are not peers: see
    /// [`attached`](Self::attached).
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.links_where(false)
    }

    /// The hidden nodes (attach clients) linked to this node.
    pub fn attached(&self) -> Vec<PeerInfo> {
        self.links_where(true)
    }

    fn links_where(&self, hidden: bool) -> Vec<PeerInfo> {
        let links = lock(&self.inner.links);
        let mut peers: Vec<PeerInfo> = links
            .up
            .values()
            .filter(|l| l.hidden == hidden)
            .map(|l| l.info())
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        peers
    }

    /// Registers factory `name`: [`spawn_remote`](Self::spawn_remote) on any node may then
    /// start a process here running `body(ctx, args)`. Factories are the allow-list of remote
    /// spawn: nothing else can be spawned from afar, and no closure crosses the wire. A later
    /// registration of the same name replaces the earlier one.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use rusm_cluster::{ClusterCa, Node};
    ///
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let ca = ClusterCa::generate("demo")?;
    /// let london = Node::builder("london").identity(ca.issue("london")?).trust(ca.trust()).start().await?;
    /// let paris = Node::builder("paris").identity(ca.issue("paris")?).trust(ca.trust()).start().await?;
    /// london.register_factory("echo", |mut ctx, greeting: Bytes| async move {
    ///     while let Some(mut msg) = ctx.recv().await {
    ///         let _ = msg.reply(greeting.clone());
    ///     }
    /// });
    /// paris.connect("london", london.local_addr()).await?;
    /// let pid = paris.spawn_remote("london", "echo", Bytes::from_static(b"hi")).await?;
    /// assert_eq!(pid.node().as_str(), "london");
    /// let reply = paris.call(&pid, Bytes::new(), std::time::Duration::from_secs(1)).await?;
    /// assert_eq!(reply, "hi");
    /// # paris.shutdown().await; london.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn register_factory<F, Fut>(&self, name: &str, body: F)
    where
        F: Fn(Process, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.add_factory(name, None, body);
    }

    /// Registers factory `name` like [`register_factory`](Self::register_factory), with a
    /// check of the arguments first: its `Err(reason)` refuses the spawn, and the caller gets
    /// [`Error::SpawnRefused`] with the reason.
    pub fn register_factory_checked<C, F, Fut>(&self, name: &str, check: C, body: F)
    where
        C: Fn(&Bytes) -> Result<(), String> + Send + Sync + 'static,
        F: Fn(Process, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.add_factory(name, Some(Box::new(check)), body);
    }

    fn add_factory<F, Fut>(&self, name: &str, check: Option<crate::rpc::Check>, body: F)
    where
        F: Fn(Process, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let factory = Factory {
            check,
            body: Box::new(move |ctx, args| Box::pin(body(ctx, args))),
        };
        write(&self.inner.rpc.factories).insert(name.to_string(), Arc::new(factory));
    }

    /// Spawns a process on node `node` from the factory it registered as `factory`, with
    /// `args`; returns its pid (on this node too, when `node` is this node's name).
    ///
    /// Errors: [`Error::UnknownFactory`], [`Error::SpawnRefused`] (the factory's check),
    /// [`Error::NotConnected`], [`Error::LinkLost`] (the link went down before the answer),
    /// [`Error::Timeout`] ([`NodeConfig::request_timeout`]).
    pub async fn spawn_remote(&self, node: &str, factory: &str, args: Bytes) -> Result<Pid, Error> {
        let peer = NodeName::new(node)?;
        if peer == self.inner.name {
            return crate::rpc::spawn_local(self, factory, args)
                .map_err(|f| crate::rpc::failure(&peer, f, None));
        }
        let request = Request::Spawn {
            factory: factory.to_string(),
            args,
        };
        let timeout = self.inner.config.request_timeout;
        match crate::rpc::request(self, &peer, request, timeout).await? {
            Reply::Spawned(id) => {
                let creation = lock(&self.inner.links)
                    .up
                    .get(&peer)
                    .map(|l| l.peer_creation());
                match creation {
                    Some(creation) => Ok(Pid {
                        node: peer,
                        id,
                        creation,
                    }),
                    None => Err(Error::LinkLost { node: peer }),
                }
            }
            Reply::Failed(f) => Err(crate::rpc::failure(&peer, f, None)),
            other => Err(Error::NotServed {
                node: peer,
                why: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// Calls `pid` (local or remote) with `payload` and waits up to `timeout` for its reply
    /// ([`Message::reply`](crate::Message::reply)). Every call ends: with the reply,
    /// [`Error::NoReply`] when the process drops the call unanswered, [`Error::NoProcess`],
    /// [`Error::LinkLost`] at once when the link to its node goes down, or
    /// [`Error::Timeout`]. A call travels on the link's control stream, so its payload is
    /// limited to the control frame size (`Limits::max_frame_size` less 1 KiB,
    /// [`Error::MessageTooLarge`]).
    pub async fn call(&self, pid: &Pid, payload: Bytes, timeout: Duration) -> Result<Bytes, Error> {
        self.call_from(None, pid, payload, timeout).await
    }

    pub(crate) async fn call_from(
        &self,
        from: Option<&Pid>,
        pid: &Pid,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        if pid.node == self.inner.name {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let reply = ReplyTo::Local(Some(tx));
            if let Err(mut reply) = self.deliver_call(pid, from.cloned(), payload, reply) {
                reply.answer(Err(Failure::NoProcess));
            }
            return match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(Ok(bytes))) => Ok(bytes),
                Ok(Ok(Err(f))) => Err(crate::rpc::failure(&pid.node, f, Some(pid))),
                Ok(Err(_)) => Err(Error::NoReply {
                    node: pid.node.clone(),
                }),
                Err(_) => Err(Error::Timeout {
                    what: format!("waiting for {pid} to reply"),
                }),
            };
        }
        let max = self.inner.config.limits.max_frame_size.saturating_sub(1024);
        if payload.len() > max {
            return Err(Error::MessageTooLarge {
                size: payload.len(),
                max,
            });
        }
        let request = Request::Call {
            to: pid.id,
            creation: pid.creation,
            from: from.map(|p| p.id),
            payload,
        };
        match crate::rpc::request(self, &pid.node, request, timeout).await? {
            Reply::Called(bytes) => Ok(bytes),
            Reply::Failed(f) => Err(crate::rpc::failure(&pid.node, f, Some(pid))),
            other => Err(Error::NotServed {
                node: pid.node.clone(),
                why: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// Puts a call in local process `pid`'s mailbox; the reply handle back if there is no such
    /// process.
    pub(crate) fn deliver_call(
        &self,
        pid: &Pid,
        from: Option<Pid>,
        payload: Bytes,
        reply: ReplyTo,
    ) -> Result<(), ReplyTo> {
        let mailbox = self.mailbox_of(pid);
        let Some(mailbox) = mailbox else {
            return Err(reply);
        };
        match mailbox.push(Mail::One(Message::call(from, payload, reply))) {
            Ok(()) => Ok(()),
            Err(Mail::One(mut msg)) => Err(msg
                .take_reply()
                .expect("a call message carries its reply handle")),
            Err(Mail::Many(_)) => unreachable!("one message was pushed"),
        }
    }

    /// Kills local process `pid`: its task is stopped where it waits, its monitors get
    /// [`ExitReason::Killed`]. `false` if it is not a live process of this node.
    pub fn kill(&self, pid: &Pid) -> bool {
        if pid.node != self.inner.name || pid.creation != self.inner.creation {
            return false;
        }
        let task = read(&self.inner.processes)
            .get(&pid.id)
            .and_then(|s| s.task.as_ref().map(|t| t.abort_handle()));
        match task {
            Some(task) => {
                task.abort();
                true
            }
            None => false,
        }
    }

    /// This node's live report: processes, names, peers, counters (what live attach shows).
    pub fn report(&self) -> Report {
        let inner = &self.inner;
        let mut names: HashMap<u64, Vec<String>> = HashMap::new();
        let local_names: std::collections::BTreeMap<String, u64> = read(&inner.names)
            .iter()
            .map(|(n, id)| (n.clone(), *id))
            .collect();
        for (n, id) in &local_names {
            names.entry(*id).or_default().push(n.clone());
        }
        let global = self.registered_global();
        for (n, pid) in &global {
            if pid.node == inner.name {
                names.entry(pid.id).or_default().push(format!("global:{n}"));
            }
        }
        let mut processes: Vec<ProcessReport> = read(&inner.processes)
            .iter()
            .map(|(id, slot)| {
                let (mailbox, messages_in, messages_out) = slot.mailbox.counts();
                ProcessReport {
                    id: *id,
                    names: names.remove(id).unwrap_or_default(),
                    mailbox,
                    messages_in,
                    messages_out,
                }
            })
            .collect();
        processes.sort_by_key(|p| p.id);
        let peers = self
            .peers()
            .into_iter()
            .map(|p| PeerReport {
                name: p.name.to_string(),
                addr: p.addr.to_string(),
                creation: p.creation,
                rtt_us: p.rtt.map(|d| d.as_micros() as u64),
                messages_sent: p.messages_sent,
                messages_received: p.messages_received,
                streams_sent: p.streams_sent,
            })
            .collect();
        Report {
            node: inner.name.to_string(),
            creation: inner.creation,
            uptime_ms: inner.started.elapsed().as_millis() as u64,
            listen: inner.local_addr.to_string(),
            processes,
            local_names,
            global_names: global
                .into_iter()
                .map(|(n, p)| (n, p.to_string()))
                .collect(),
            peers,
            attached: self.attached().len(),
            counters: self
                .stats()
                .counters()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            refusals: lock(&inner.refusals).clone(),
        }
    }

    /// Fetches the live report of node `peer` (see [`report`](Self::report)) over the link:
    /// what `rusm attach` does, from a [hidden](NodeBuilder::hidden) node.
    ///
    /// Errors: [`Error::NotConnected`], [`Error::LinkLost`], [`Error::Timeout`].
    pub async fn attach_report(&self, peer: &str) -> Result<Report, Error> {
        let peer = NodeName::new(peer)?;
        crate::rpc::report(self, &peer, self.inner.config.request_timeout).await
    }

    /// Subscribes to node up/down events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.inner.events.subscribe()
    }

    /// A snapshot of the node's counters.
    pub fn stats(&self) -> NodeStats {
        let processes = read(&self.inner.processes).len();
        self.inner.stats.snapshot(processes)
    }

    /// Keeps `peer` cut off, like Erlang's `disconnect_node` with the peer kept out: closes its
    /// link (with a goodbye), refuses its hellos ([`RejectReason::Blocked`]) and dials it no
    /// more, whether asked to ([`connect`](Self::connect) fails with `Rejected { reason:
    /// Blocked }`) or told of it by the mesh, until [`unblock`](Self::unblock). Two groups of
    /// nodes that block each other form a partition.
    ///
    /// Errors: [`Error::Identity`] when `peer` is not a valid node name.
    pub async fn block(&self, peer: &str) -> Result<(), Error> {
        let peer = NodeName::new(peer)?;
        let link = {
            let mut links = lock(&self.inner.links);
            links.blocked.insert(peer.clone());
            links.up.get(&peer).cloned()
        };
        if let Some(link) = link {
            link.goodbye("blocked").await;
        }
        Ok(())
    }

    /// Lets `peer` link again (see [`block`](Self::block)). No link is made by itself: connect
    /// to it, or let the mesh do so when a member announces it.
    pub fn unblock(&self, peer: &str) {
        if let Ok(peer) = NodeName::new(peer) {
            lock(&self.inner.links).blocked.remove(&peer);
        }
    }

    /// The peers this node keeps cut off.
    pub fn blocked(&self) -> Vec<NodeName> {
        let mut blocked: Vec<NodeName> = lock(&self.inner.links).blocked.iter().cloned().collect();
        blocked.sort();
        blocked
    }

    /// Whether the mesh should dial `peer`: not linked, not being dialled, not blocked, and the
    /// node is running.
    pub(crate) fn should_dial(&self, peer: &NodeName) -> bool {
        let links = lock(&self.inner.links);
        !links.shut_down
            && !links.up.contains_key(peer)
            && !links.dialling.contains(peer)
            && !links.blocked.contains(peer)
    }

    /// Changes whom this node trusts while it runs (for example a CA's new CRL, from
    /// [`ClusterCa::trust`](crate::ClusterCa::trust) after a revocation): every handshake from
    /// now on is checked against `trust`, and every established link whose peer's certificate
    /// no longer passes (revoked, or from a CA no longer trusted) is closed with
    /// [`DownReason::TrustRevoked`]; such a peer's reconnects are refused in the handshake.
    /// Returns the peers whose links were closed.
    ///
    /// Errors: [`Error::Tls`] when `trust` holds no usable root (the old trust stays in force).
    ///
    /// ```
    /// # use rusm_cluster::{ClusterCa, Node};
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut ca = ClusterCa::generate("demo")?;
    /// let paris_id = ca.issue("paris")?;
    /// let london = Node::builder("london").identity(ca.issue("london")?).trust(ca.trust()).start().await?;
    /// let paris = Node::builder("paris").identity(paris_id.clone()).trust(ca.trust()).start().await?;
    /// paris.connect("london", london.local_addr()).await?;
    /// ca.revoke(paris_id.serial());
    /// let closed = london.set_trust(ca.trust())?;
    /// assert_eq!(closed[0].as_str(), "paris");
    /// # paris.shutdown().await; london.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn set_trust(&self, trust: TrustAnchor) -> Result<Vec<NodeName>, Error> {
        self.inner
            .trust
            .set(&trust)
            .map_err(|e| Error::Tls(Arc::new(e)))?;
        let links: Vec<Arc<LinkHandle>> = lock(&self.inner.links).up.values().cloned().collect();
        let mut closed = Vec::new();
        for link in links {
            if let Err(why) = self.inner.trust.check_peer(link.peer_leaf()) {
                tracing::warn!(node = %self.inner.name, peer = %link.peer, %why, "peer no longer trusted; closing its link");
                link.close_with(DownReason::TrustRevoked(why));
                closed.push(link.peer.clone());
            }
        }
        closed.sort();
        Ok(closed)
    }

    /// Closes `peer`'s link with a goodbye; no error if there is none.
    pub async fn disconnect(&self, peer: &str) {
        let link = NodeName::new(peer)
            .ok()
            .and_then(|p| lock(&self.inner.links).up.get(&p).cloned());
        if let Some(link) = link {
            link.goodbye("disconnected").await;
        }
    }

    /// Says goodbye to every peer, closes the endpoint, and stops every process.
    pub async fn shutdown(&self) {
        let links: Vec<Arc<LinkHandle>> = {
            let mut links = lock(&self.inner.links);
            links.shut_down = true;
            links.up.values().cloned().collect()
        };
        self.inner.links_changed.notify_waiters();
        // Every peer at once: one slow peer does not hold up the goodbyes to the others.
        futures_util::future::join_all(links.iter().map(|l| l.goodbye("node shutting down"))).await;
        // Let go of the links: each holds its connection, which holds the endpoint.
        drop(links);
        self.inner.dialer.shutdown().await;
        let tasks: Vec<JoinHandle<()>> = write(&self.inner.processes)
            .drain()
            .filter_map(|(_, s)| s.task)
            .collect();
        for t in tasks {
            t.abort();
        }
        write(&self.inner.names).clear();
        tracing::info!(node = %self.inner.name, "node shut down");
    }
}

/// The message of a panic payload, when it is a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic".to_string()
    }
}

/// Removes a process and its names when its task ends (normally, by panic, or by abort), and
/// tells its monitors why.
struct ExitGuard {
    node: std::sync::Weak<NodeInner>,
    id: u64,
    /// Killed unless the task finished (an aborted task never sets it).
    reason: ExitReason,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if let Some(node) = self.node.upgrade() {
            write(&node.processes).remove(&self.id);
            write(&node.names).retain(|_, id| *id != self.id);
            // Its global names are released everywhere, and its monitors fire.
            let id = self.id;
            let handle = Node {
                inner: node.clone(),
            };
            node.registry
                .run(&handle, None, |r, out| r.process_exited(id, out));
            crate::rpc::process_exited(&handle, id, &self.reason);
            // Its pairs end here: peers forget their order state for them.
            let links: Vec<Arc<LinkHandle>> = lock(&node.links).up.values().cloned().collect();
            for link in links {
                link.retire(self.id);
            }
        }
    }
}
