//! The link driver, generic over the transport: a pump between a [`Connection`] and the core's
//! sans-IO machines. Dialling and accepting are in [`handshake`]; then one task per link runs
//! two loops side by side:
//! - the **reader** accepts uni-streams and reads them concurrently, restores per-pair order,
//!   and delivers into mailboxes within the link's memory budget;
//! - the **control** loop reads and writes control frames (lost notices and goodbye now; gossip
//!   and RPC later).
//!
//! Sending needs no task: the sending process opens its message's uni-stream and writes it
//! itself (so QUIC's stream credit and flow control slow a fast sender down directly, and no
//! message crosses a task boundary on the way out). With [`Coalescing`] on, senders queue
//! instead and a third loop, the **writer**, carries what queued up on shared streams.
//!
//! Whichever loop ends first (connection lost, protocol violation, goodbye) ends the link; the
//! teardown releases held-back messages, counts what was lost, and raises `NodeDown`.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rusm_cluster_core::identity::NodeName;
use rusm_cluster_core::inbound::{Counted, Inbound, InboundClose, InboundMessage};
use rusm_cluster_core::link::{admit, DialAnswer, EndedLink, LinkTable, PeerIntro};
use rusm_cluster_core::outbound::Numbering;
use rusm_cluster_core::router::LinkCapabilities;
use rusm_cluster_core::tls;
use rusm_cluster_core::transport::{
    close_code, stream_code, Connection, RecvStream, SendStream, Transport, TransportError,
};
use rusm_cluster_core::wire::{
    encode_frame, encode_header_into, encoded_header_len, Dest, EnvelopeHeader, Frame,
    FrameDecoder, Limits, MessageAssembler, PeerAddr, PreviousLink, ReadError, ReadMessage,
    RejectReason, WireError,
};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tracing::{debug, info, warn};

use crate::error::{Error, SendError};
use crate::node::{lock, Coalescing, DownReason, Node, NodeEvent, NodeInner, PeerInfo};
use crate::pid::Pid;
use crate::process::{Budget, Credit, LinkCredit, Mail, Mailbox, Message};

mod handshake;
mod outbox;
mod reader;
mod send;

pub(crate) use handshake::{accept_loop, dial, hello_peers, Dialled};
use outbox::*;
use reader::*;
use send::*;

/// Payloads up to this size are copied behind their header into one chunk; larger ones are
/// written without a copy.
const COALESCE_MAX: usize = 4 << 10;
/// Message streams read at once per link.
const MAX_READS: usize = 4096;
/// Coalesced streams a link may have written and not yet seen acknowledged.
const MAX_UNACKED_STREAMS: usize = 4;
/// Lost and retire notices read from the control stream and not yet taken by the reader.
const NOTICE_QUEUE: usize = 1024;

/// What the control loop passes to the reader: frames about the pairs the reader orders.
pub(super) enum Notice {
    /// A numbered message will never arrive whole.
    Lost(Option<u64>, Dest, u64),
    /// The sending process exited: its pairs end at these numbers.
    Retire(u64, Vec<(Dest, u64)>),
}
/// How long a closing side waits for the peer to drain after a goodbye or reject.
const DRAIN: Duration = Duration::from_secs(2);

/// The node's side of one link: what senders need, without the transport type.
pub(crate) struct LinkHandle {
    id: u64,
    /// The id both ends know the link by (chosen by the dialler, sent in its hello).
    wire_id: u64,
    pub(crate) peer: NodeName,
    addr: SocketAddr,
    peer_creation: u64,
    pub(crate) peer_max_message: usize,
    sender: Box<dyn LinkSender>,
    /// The capabilities both ends announced.
    pub(crate) capabilities: LinkCapabilities,
    /// The peer is hidden (an attach client): it never joins the mesh.
    pub(crate) hidden: bool,
    /// Pairs from the peer whose order the reader keeps state for.
    pairs_in: AtomicUsize,
    /// The members the peer listed in its hello or welcome (the mesh dials them).
    pub(crate) intro_peers: Vec<PeerAddr>,
    /// The certificate the peer presented (checked again when the node's trust changes).
    peer_leaf: rusm_cluster_core::rustls::pki_types::CertificateDer<'static>,
    /// Where the peer accepts links (what the mesh tells others): the address its hello or
    /// welcome gave, with the connection's IP when that address is unspecified, or the
    /// connection's address when it gave none. Not always the connection's own address: a
    /// backend may dial from another socket than the one it listens on.
    pub(crate) listen_addr: SocketAddr,
    /// Present when the link coalesces.
    outbox: Option<Outbox>,
    /// Bytes of large messages written and not yet acknowledged by the peer (see
    /// [`InFlight`]).
    in_flight: InFlight,
    control: mpsc::UnboundedSender<Frame>,
    /// Pair numbers of a link that does not coalesce (a coalescing one keeps them in its
    /// outbox, under the lock it takes anyway).
    seqs: Mutex<Numbering>,
    streams: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    /// Messages from the peer that found no process here (counted as dead letters).
    dead: AtomicU64,
    node: Weak<NodeInner>,
    in_progress: AtomicUsize,
    closing: AtomicBool,
    idle: Notify,
    finished: Notify,
    is_finished: AtomicBool,
    /// Set by [`LinkHandle::close_with`]: the control loop ends the link with this reason.
    abort: Mutex<Option<DownReason>>,
    aborted: Notify,
}

impl LinkHandle {
    pub(crate) fn info(&self) -> PeerInfo {
        PeerInfo {
            name: self.peer.clone(),
            addr: self.addr,
            creation: self.peer_creation,
            rtt: self.sender.rtt(),
            messages_sent: self.sent.load(Ordering::Relaxed),
            streams_sent: self.streams.load(Ordering::Relaxed),
            messages_received: self.received.load(Ordering::Relaxed),
            capabilities: self.capabilities.common().to_vec(),
            hidden: self.hidden,
            pairs_in: self.pairs_in.load(Ordering::Relaxed),
        }
    }

    /// The peer's incarnation.
    pub(crate) fn peer_creation(&self) -> u64 {
        self.peer_creation
    }

    /// Ends the link with `reason` (the first reason given wins); the teardown runs as for any
    /// other end.
    pub(crate) fn close_with(&self, reason: DownReason) {
        lock(&self.abort).get_or_insert(reason);
        self.aborted.notify_one();
    }

    /// The certificate the peer presented in the handshake.
    pub(crate) fn peer_leaf(
        &self,
    ) -> &rusm_cluster_core::rustls::pki_types::CertificateDer<'static> {
        &self.peer_leaf
    }

    /// Waits (up to `limit`) until the link's teardown has run.
    pub(crate) async fn wait_finished(&self, limit: Duration) {
        let finished = self.finished.notified();
        tokio::pin!(finished);
        finished.as_mut().enable();
        if self.is_finished.load(Ordering::Acquire) {
            return;
        }
        let _ = tokio::time::timeout(limit, finished).await;
    }

    /// Queues a control frame for the peer; `NotConnected` once the link is down.
    pub(crate) fn send_frame(&self, frame: Frame) -> Result<(), Error> {
        self.control.send(frame).map_err(|_| Error::NotConnected {
            node: self.peer.clone(),
        })
    }

    /// Sends one message on its own stream (see [`send_message`]), or queues it when the link
    /// coalesces (see [`enqueue`]).
    ///
    /// # Cancel safety
    /// Cancel safe: a send dropped before its stream opened (or before it was queued) sends
    /// nothing; one dropped mid-write is reported lost to the peer, so the pair's later messages
    /// are not held back.
    pub(crate) async fn send(
        &self,
        from: Option<u64>,
        to: Dest,
        payload: Bytes,
    ) -> Result<(), SendError> {
        match &self.outbox {
            Some(outbox) => enqueue(self, outbox, from, to, payload).await,
            None => self.sender.send(self, from, to, payload).await,
        }
    }

    /// `n` sends (or queued messages) are over; wakes a waiting goodbye once none are left.
    fn end_sends(&self, n: usize) {
        if n > 0
            && self.in_progress.fetch_sub(n, Ordering::SeqCst) == n
            && self.closing.load(Ordering::SeqCst)
        {
            self.idle.notify_waiters();
        }
    }

    /// The link is down: ends what is still queued and wakes senders waiting for queue space,
    /// which then fail with `NotConnected`. The queued messages were accepted (their sends
    /// returned `Ok`), so they count as sent. Those never handed to the transport are lost in
    /// transit, known at once; the batch being written, which may have partly arrived, counts
    /// as sent over this link, and the next link to the same peer settles what of it is lost.
    fn fail_queue(&self, inner: &NodeInner) {
        let Some(outbox) = &self.outbox else { return };
        let (batches, writing) = {
            let mut state = lock(&outbox.state);
            state.down = true;
            (
                std::mem::take(&mut state.batches),
                std::mem::take(&mut state.writing),
            )
        };
        outbox.space.close();
        let unwritten = batches.iter().map(|b| b.messages).sum::<usize>();
        if writing > 0 {
            self.count_sent(inner, writing);
        }
        if unwritten > 0 {
            let n = unwritten as u64;
            inner.stats.messages_sent.fetch_add(n, Ordering::Relaxed);
            inner.stats.lost_in_transit.fetch_add(n, Ordering::Relaxed);
            warn!(node = %inner.name, peer = %self.peer, messages = unwritten, "queued messages never written went down with the link (counted lost in transit)");
        }
        self.end_sends(writing + unwritten);
    }

    /// Counts `n` messages as sent over this link (and by the node).
    fn count_sent(&self, inner: &NodeInner, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        inner
            .stats
            .messages_sent
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    fn begin_send(&self) -> Option<ActiveSend<'_>> {
        // Count first, then look: with goodbye doing the opposite (flag, then count), one of the
        // two always sees the other.
        self.in_progress.fetch_add(1, Ordering::SeqCst);
        let active = ActiveSend(self);
        (!self.closing.load(Ordering::SeqCst)).then_some(active)
    }

    fn next_seq(&self, from: Option<u64>, to: Dest) -> (u64, Dest) {
        lock(&self.seqs).next(from, to)
    }

    /// Local process `from` exited: forgets its pairs and tells the peer where they ended, so
    /// the peer forgets them too.
    pub(crate) fn retire(&self, from: u64) {
        let pairs = match &self.outbox {
            Some(outbox) => lock(&outbox.state).seqs.retire(from),
            None => lock(&self.seqs).retire(from),
        };
        if !pairs.is_empty() {
            let _ = self.control.send(Frame::Retire { from, pairs });
        }
    }

    /// Waits (at most [`DRAIN`]) until no send is in progress; call once `closing` is set.
    async fn sends_done(&self) {
        let drained = async {
            loop {
                let idle = self.idle.notified();
                if self.in_progress.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(DRAIN, drained).await;
    }

    /// Closes the link on purpose: sends in progress finish first, then a goodbye tells the
    /// peer how many streams to expect, and the peer closes once it has read them all.
    pub(crate) async fn goodbye(&self, reason: &str) {
        // Flag first, then count (see `begin_send`); the flag also tells the teardown that this
        // side closed on purpose.
        self.closing.store(true, Ordering::SeqCst);
        let finished = self.finished.notified();
        if self.is_finished.load(Ordering::Acquire) {
            return;
        }
        self.sends_done().await;
        let streams = self.streams.load(Ordering::SeqCst);
        let _ = self.control.send(Frame::Goodbye {
            reason: reason.to_string(),
            streams,
        });
        if tokio::time::timeout(DRAIN, finished).await.is_err() {
            // The peer did not close in time: close from here.
            self.sender.close(close_code::NORMAL, reason);
            let _ = tokio::time::timeout(Duration::from_secs(1), self.finished.notified()).await;
        }
    }
}

/// The bound on a link's large messages in flight. A message stream is only read once the
/// receiver's link budget can take the whole message, and until then its data waits in the
/// stack, counted against the connection's flow-control window. A sender with many large
/// messages written at once could fill that window with parts of messages the receiver has no
/// budget for yet, while the ones it admitted wait for data that can no longer come: a stack that
/// spreads its sending over every open stream (s2n) did, and the link stalled. So a message that
/// many streams' worth of could fill the window (`window / stream credit` bytes or more) takes
/// its size from this allowance, half the smaller of the window and the budget, until the peer
/// has acknowledged it: whatever is in flight, the receiver can admit all of it.
pub(super) struct InFlight {
    /// Messages at least this large are counted.
    pub(super) from_bytes: usize,
    pub(super) allowance: Arc<Semaphore>,
    pub(super) max: usize,
}

impl InFlight {
    fn new(config: &crate::NodeConfig) -> Self {
        let window = config.tuning.connection_receive_window as usize;
        let max = (window.min(config.link_budget_bytes) / 2)
            .clamp(1, u32::MAX as usize)
            .min(Semaphore::MAX_PERMITS);
        let streams = config.tuning.max_concurrent_uni_streams.max(1) as usize;
        InFlight {
            from_bytes: (window / streams).max(1),
            allowance: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

/// A new link's id, unique between any two nodes with overwhelming odds: a hash of the dialler's
/// name, incarnation and its count of links.
fn new_link_id(inner: &NodeInner) -> u64 {
    use std::hash::BuildHasher;
    let n = inner.next_link_id.fetch_add(1, Ordering::Relaxed);
    foldhash::quality::FixedState::with_seed(inner.creation)
        .hash_one((inner.name.as_str(), n))
        .max(1)
}

/// What this node remembers of an ended link, to settle it with the peer (see [`EndedLink`]).
fn ended_link(link: &LinkHandle) -> EndedLink {
    EndedLink {
        link: link.wire_id,
        sent: link.sent.load(Ordering::SeqCst),
        reached: link.received.load(Ordering::SeqCst) + link.dead.load(Ordering::SeqCst),
    }
}

/// What this node received over its last link to `peer`, for its next hello to it.
fn previous_link(inner: &NodeInner, peer: &NodeName) -> Option<PreviousLink> {
    lock(&inner.links).ended.get(peer).map(EndedLink::report)
}

/// Settles the last link to the new link's peer, if there was one: what this node sent over it
/// and the peer never received is counted lost in transit. Gives back what this node tells the
/// peer of that link (for the welcome).
fn settle_previous(
    inner: &NodeInner,
    links: &mut crate::node::Links,
    intro: &PeerIntro,
) -> Option<PreviousLink> {
    let ended = links.ended.remove(&intro.name)?;
    match ended.lost(intro.previous.as_ref()) {
        Some(0) => {}
        Some(lost) => {
            inner
                .stats
                .lost_in_transit
                .fetch_add(lost, Ordering::Relaxed);
            warn!(node = %inner.name, peer = %intro.name, messages = lost, "messages lost in transit when the last link failed");
        }
        None => {
            debug!(node = %inner.name, peer = %intro.name, "the peer has no memory of the last link (it restarted): what was in transit went with it");
        }
    }
    Some(ended.report())
}

/// Registers a new link; also gives what this node tells the peer of the previous link.
fn register<C: Connection>(
    node: &Node,
    links: &mut crate::node::Links,
    conn: &C,
    intro: &PeerIntro,
    wire_id: u64,
) -> (
    Arc<LinkHandle>,
    mpsc::UnboundedReceiver<Frame>,
    Option<PreviousLink>,
) {
    let previous = settle_previous(&node.inner, links, intro);
    conn.grant_stream_credit();
    let (control, control_rx) = mpsc::unbounded_channel();
    let peer = &intro.name;
    let link = Arc::new(LinkHandle {
        id: node.inner.next_link_id.fetch_add(1, Ordering::Relaxed),
        wire_id,
        peer: peer.clone(),
        addr: conn.remote_addr(),
        peer_creation: intro.creation,
        peer_max_message: usize::try_from(intro.max_message_size).unwrap_or(usize::MAX),
        capabilities: LinkCapabilities::negotiate(
            &node.inner.intro.capabilities,
            &intro.capabilities,
        ),
        hidden: intro.hidden,
        pairs_in: AtomicUsize::new(0),
        intro_peers: intro.peers.clone(),
        peer_leaf: conn.peer_identity().leaf.clone(),
        listen_addr: match intro.listen_addr {
            Some(a) if a.ip().is_unspecified() => {
                SocketAddr::new(conn.remote_addr().ip(), a.port())
            }
            Some(a) => a,
            None => conn.remote_addr(),
        },
        sender: Box::new(TypedSender(conn.clone())),
        outbox: node.inner.config.coalescing.map(Outbox::new),
        in_flight: InFlight::new(&node.inner.config),
        control,
        seqs: Mutex::new(Numbering::new()),
        streams: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        dead: AtomicU64::new(0),
        node: Arc::downgrade(&node.inner),
        in_progress: AtomicUsize::new(0),
        closing: AtomicBool::new(false),
        idle: Notify::new(),
        finished: Notify::new(),
        is_finished: AtomicBool::new(false),
        abort: Mutex::new(None),
        aborted: Notify::new(),
    });
    links.up.insert(peer.clone(), link.clone());
    node.inner.links_changed.notify_waiters();
    (link, control_rx, previous)
}

/// The link is up: counted, logged, told to subscribers and to the capabilities it uses.
fn announce_up(node: &Node, link: &LinkHandle) {
    let inner = &node.inner;
    inner.stats.links_up.fetch_add(1, Ordering::Relaxed);
    info!(node = %inner.name, peer = %link.peer, addr = %link.addr, capabilities = ?link.capabilities.common(), "link up");
    let _ = inner.events.send(NodeEvent::NodeUp {
        node: link.peer.clone(),
        addr: link.addr,
    });
    for capability in inner.router.on_link(&link.capabilities) {
        capability.on_link_up(node, &link.peer);
    }
}

fn down_from(e: TransportError) -> DownReason {
    match e {
        TransportError::TimedOut => DownReason::TimedOut,
        TransportError::ClosedByPeer { reason, code } if code == u64::from(close_code::NORMAL) => {
            DownReason::Goodbye(reason)
        }
        TransportError::ClosedLocally => DownReason::Shutdown,
        other => DownReason::ConnectionLost(other.to_string()),
    }
}

/// Runs a link until it goes down, then tears it down.
async fn run_link<C: Connection>(
    node: Node,
    link: Arc<LinkHandle>,
    conn: C,
    mut ctl_send: C::SendStream,
    mut ctl_recv: C::RecvStream,
    mut dec: FrameDecoder,
    control_rx: mpsc::UnboundedReceiver<Frame>,
) {
    let inner = &node.inner;
    let (goodbye_tx, goodbye_rx) = watch::channel(None);
    // Bounded: a peer flooding lost notices waits on its own control stream.
    let (lost_tx, lost_rx) = mpsc::channel(NOTICE_QUEUE);
    let budget = Budget::new(inner.config.link_budget_bytes);
    let mut reader = Reader {
        machine: Inbound::new(inner.config.inbound),
        reserve_ceiling: budget.limit().saturating_mul(2),
        budget,
        limits: inner.config.limits,
        got: Vec::new(),
        counted: Counted::default(),
    };
    let reason = {
        let reader = read_loop(&node, &link, &conn, &mut reader, goodbye_rx, lost_rx);
        let control = control_loop(
            &node,
            &link,
            &mut ctl_send,
            &mut ctl_recv,
            &mut dec,
            control_rx,
            &goodbye_tx,
            &lost_tx,
        );
        let writer = async {
            match &link.outbox {
                Some(outbox) => write_loop(&node, &conn, &link, outbox).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = reader => r,
            r = control => r,
            () = writer => unreachable!("the writer never returns"),
        }
    };
    // Teardown.
    let reason = if link.closing.load(Ordering::SeqCst) {
        DownReason::Shutdown
    } else {
        reason
    };
    let code = match &reason {
        DownReason::ProtocolViolation(_)
        | DownReason::CapabilityRefused(_)
        | DownReason::PeerMisbehaved(_) => close_code::PROTOCOL,
        DownReason::TrustRevoked(_) => close_code::REJECTED,
        _ => close_code::NORMAL,
    };
    conn.close(code, reason.to_string().as_bytes());
    link.fail_queue(inner);
    // Sends in progress fail now (the connection is closed) and new ones are refused; once they
    // are over, what this link sent is final.
    link.closing.store(true, Ordering::SeqCst);
    link.sends_done().await;
    // Release what was held back for predecessors that will never come: delivered before the
    // link leaves the table, so what it reports of this link to the peer's next one is final,
    // and before the capabilities' node-down notices.
    let mut released = Vec::new();
    let missing = reader.machine.on_link_down(&mut released).lost;
    inner
        .stats
        .lost_messages
        .fetch_add(missing, Ordering::Relaxed);
    if let DownReason::PeerMisbehaved(why) = &reason {
        match why {
            InboundClose::GapTimeout { .. } => &inner.stats.gap_timeouts,
            _ => &inner.stats.stalled_links,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
    let mut route = Route::default();
    for msg in released {
        deliver(&node, &link, &mut route, msg).await;
    }
    route.flush(inner, &link);
    let ended = ended_link(&link);
    // The capabilities hear of the end while the link is still listed, so a new link to the
    // same peer (admitted only once this one is gone) is always announced to them after it.
    for capability in inner.router.on_link(&link.capabilities) {
        capability.on_link_down(&node, &link.peer);
    }
    {
        let mut links = lock(&inner.links);
        if links.up.get(&link.peer).is_some_and(|l| l.id == link.id) {
            links.up.remove(&link.peer);
            if !link.hidden {
                links.ended.insert(link.peer.clone(), ended);
            }
            inner.links_changed.notify_waiters();
        }
    }
    inner.stats.links_down.fetch_add(1, Ordering::Relaxed);
    info!(node = %inner.name, peer = %link.peer, %reason, "link down");
    let lost = matches!(reason, DownReason::TimedOut | DownReason::ConnectionLost(_));
    let _ = inner.events.send(NodeEvent::NodeDown {
        node: link.peer.clone(),
        reason,
    });
    link.is_finished.store(true, Ordering::Release);
    link.finished.notify_waiters();
    if lost && !link.hidden {
        reconnect(&node, link.peer.clone(), link.listen_addr);
    }
}

/// Dials a peer whose link was lost, with backoff (see [`crate::Reconnect`]), until a link to
/// it is up, it refuses, or the configured time has passed.
fn reconnect(node: &Node, peer: NodeName, addr: SocketAddr) {
    let Some(cfg) = node.inner.config.reconnect else {
        return;
    };
    if node.inner.intro.hidden {
        return;
    }
    let weak = Arc::downgrade(&node.inner);
    node.inner.runtime.spawn(async move {
        let give_up = Instant::now() + cfg.give_up_after;
        let mut delay = cfg.first_backoff;
        while Instant::now() < give_up {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(cfg.max_backoff);
            let Some(inner) = weak.upgrade() else { return };
            let node = Node { inner };
            if !node.should_dial(&peer) {
                // Linked again (by either side), blocked, or shutting down.
                return;
            }
            match node.connect(peer.as_str(), addr).await {
                Ok(()) => {
                    info!(node = %node.name(), %peer, %addr, "reconnected");
                    return;
                }
                Err(e @ (Error::Rejected { .. } | Error::Shutdown | Error::Config(_))) => {
                    info!(node = %node.name(), %peer, error = %e, "reconnect refused; giving up");
                    return;
                }
                Err(e) => {
                    debug!(node = %node.name(), %peer, error = %e, "reconnect failed; retrying")
                }
            }
        }
    });
}

#[allow(clippy::too_many_arguments)]
async fn control_loop<S: SendStream, R: RecvStream>(
    node: &Node,
    link: &LinkHandle,
    send: &mut S,
    recv: &mut R,
    dec: &mut FrameDecoder,
    mut frames: mpsc::UnboundedReceiver<Frame>,
    goodbye: &watch::Sender<Option<(String, u64)>>,
    lost: &mpsc::Sender<Notice>,
) -> DownReason {
    // Frames that arrived with the hello or welcome, in the same read, are handled first: no
    // later read may come to push them out.
    if let Err(reason) = handle_frames(node, link, dec, goodbye, lost).await {
        return reason;
    }
    let mut frames_open = true;
    loop {
        tokio::select! {
            () = link.aborted.notified() => {
                if let Some(reason) = lock(&link.abort).take() {
                    return reason;
                }
            }
            frame = frames.recv(), if frames_open => match frame {
                Some(frame) => {
                    let bytes = match encode_frame(&frame) {
                        Ok(b) => b,
                        Err(e) => return DownReason::ProtocolViolation(e.to_string()),
                    };
                    if let Err(e) = send.write(bytes).await {
                        return down_from(e);
                    }
                }
                None => frames_open = false,
            },
            chunk = recv.read_chunk() => match chunk {
                Ok(Some(chunk)) => {
                    dec.push(&chunk);
                    if let Err(reason) = handle_frames(node, link, dec, goodbye, lost).await {
                        return reason;
                    }
                }
                Ok(None) => {
                    if goodbye.borrow().is_some() {
                        // Let the reader finish the streams still in flight.
                        std::future::pending::<()>().await;
                    }
                    return DownReason::ConnectionLost("control stream closed by peer".into());
                }
                Err(e) => return down_from(e),
            },
        }
    }
}

/// Handles every whole frame in `dec`; the reason to close the link, if one breaks the protocol.
async fn handle_frames(
    node: &Node,
    link: &LinkHandle,
    dec: &mut FrameDecoder,
    goodbye: &watch::Sender<Option<(String, u64)>>,
    lost: &mpsc::Sender<Notice>,
) -> Result<(), DownReason> {
    let stats = &node.inner.stats;
    let violation = |why: String| {
        stats.malformed_frames.fetch_add(1, Ordering::Relaxed);
        DownReason::ProtocolViolation(why)
    };
    loop {
        match dec.next_frame() {
            Ok(Some(Frame::Goodbye { reason, streams })) => {
                let _ = goodbye.send(Some((reason, streams)));
            }
            Ok(Some(Frame::Lost { from, to, seq })) => {
                let _ = lost.send(Notice::Lost(from, to, seq)).await;
            }
            Ok(Some(Frame::Retire { from, pairs })) => {
                let _ = lost.send(Notice::Retire(from, pairs)).await;
            }
            Ok(Some(Frame::Capability { capability, body })) => {
                match node.inner.router.route(&link.capabilities, &capability) {
                    Ok(handler) => {
                        if let Err(why) = handler.on_frame(node, &link.peer, body) {
                            return Err(violation(format!("{capability}: {why}")));
                        }
                    }
                    Err(e) => {
                        stats.malformed_frames.fetch_add(1, Ordering::Relaxed);
                        return Err(DownReason::CapabilityRefused(e));
                    }
                }
            }
            Ok(Some(other)) => return Err(violation(format!("unexpected {} frame", other.kind()))),
            Ok(None) => return Ok(()),
            Err(e) => return Err(violation(e.to_string())),
        }
    }
}
