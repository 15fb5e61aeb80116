//! The link driver, generic over the transport: dialling and accepting (mutual TLS, then the
//! hello exchange), then one task per link that runs two loops side by side:
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

use std::collections::{HashMap, VecDeque};
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
use rusm_cluster_core::link::{check_hello, check_welcome, own_dial_wins};
use rusm_cluster_core::router::LinkCapabilities;
use rusm_cluster_core::tls;
use rusm_cluster_core::transport::{
    close_code, stream_code, Connection, RecvStream, SendStream, Transport, TransportError,
};
use rusm_cluster_core::wire::{
    encode_frame, encode_header_into, encoded_header_len, Dest, EnvelopeHeader, Frame,
    FrameDecoder, Hello, Limits, MessageAssembler, PeerAddr, ReadError, ReadMessage, RejectReason,
    Welcome, WireError, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tracing::{debug, info, warn};

use crate::error::{Error, SendError};
use crate::node::{lock, Coalescing, DownReason, Node, NodeEvent, NodeInner, PeerInfo};
use crate::pid::Pid;
use crate::process::{Budget, Credit, LinkCredit, Mail, Mailbox, Message};

/// Payloads up to this size are copied behind their header into one chunk; larger ones are
/// written without a copy.
const COALESCE_MAX: usize = 4 << 10;
/// Message streams read at once per link.
const MAX_READS: usize = 4096;
/// Coalesced streams a link may have written and not yet seen acknowledged.
const MAX_UNACKED_STREAMS: usize = 4;
/// Lost notices read from the control stream and not yet taken by the reader.
const LOST_QUEUE: usize = 1024;
/// How long a closing side waits for the peer to drain after a goodbye or reject.
const DRAIN: Duration = Duration::from_secs(2);

/// The typed half of a link's sending side, erased so the handle is not generic.
trait LinkSender: Send + Sync {
    fn send<'a>(
        &'a self,
        link: &'a LinkHandle,
        from: Option<u64>,
        to: Dest,
        payload: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<(), SendError>> + Send + 'a>>;
    fn rtt(&self) -> Option<Duration>;
    fn close(&self, code: u32, reason: &str);
}

struct TypedSender<C: Connection>(C);

impl<C: Connection> LinkSender for TypedSender<C> {
    fn send<'a>(
        &'a self,
        link: &'a LinkHandle,
        from: Option<u64>,
        to: Dest,
        payload: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<(), SendError>> + Send + 'a>> {
        Box::pin(send_message(&self.0, link, from, to, payload))
    }
    fn rtt(&self) -> Option<Duration> {
        self.0.rtt()
    }
    fn close(&self, code: u32, reason: &str) {
        self.0.close(code, reason.as_bytes());
    }
}

/// Writes one message on a stream of its own, from the sender's task.
async fn send_message<C: Connection>(
    conn: &C,
    link: &LinkHandle,
    from: Option<u64>,
    to: Dest,
    payload: Bytes,
) -> Result<(), SendError> {
    let Some(_active) = link.begin_send() else {
        let node = link.peer.clone();
        return Err(SendError::new(Error::NotConnected { node }, payload));
    };
    let stream = match conn.open_uni().await {
        Ok(s) => s,
        Err(e) => {
            let error = if e.is_connection_error() {
                Error::NotConnected {
                    node: link.peer.clone(),
                }
            } else {
                Error::Transport(e)
            };
            return Err(SendError::new(error, payload));
        }
    };
    link.streams.fetch_add(1, Ordering::Relaxed);
    // Numbered only once the stream exists, so a send cancelled while waiting for stream credit
    // leaves no gap; from here on, the guard reports the number lost unless the write finishes.
    let (seq, to) = link.next_seq(from, to);
    let header = EnvelopeHeader {
        to,
        from,
        seq,
        len: payload.len() as u64,
    };
    let mut buf =
        BytesMut::with_capacity(encoded_header_len(&header) + payload.len().min(COALESCE_MAX));
    encode_header_into(&header, &mut buf);
    let mut lost = LostGuard {
        link,
        notice: Some(header),
        stream,
    };
    let stream = &mut lost.stream;
    let write = if payload.len() <= COALESCE_MAX {
        // A small message goes out as one contiguous chunk: one STREAM frame, one chunk for the
        // receiver to take, instead of two of each; copying a few hundred bytes is cheaper.
        buf.extend_from_slice(&payload);
        stream.write(buf.freeze()).await
    } else {
        // A large payload is written as it is, never copied.
        stream
            .write_all_chunks(&mut [buf.freeze(), payload.clone()])
            .await
    };
    let written = write.and_then(|()| stream.finish());
    match written {
        Ok(()) => {
            lost.notice = None;
            link.sent.fetch_add(1, Ordering::Relaxed);
            if let Some(node) = link.node.upgrade() {
                node.stats.messages_sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }
        Err(e) => {
            if let Some(node) = link.node.upgrade() {
                node.stats.send_failures.fetch_add(1, Ordering::Relaxed);
            }
            let error = match e {
                TransportError::StreamStopped { code }
                    if code == u64::from(stream_code::TOO_LARGE) =>
                {
                    Error::MessageTooLarge {
                        size: payload.len(),
                        max: link.peer_max_message,
                    }
                }
                e if e.is_connection_error() => Error::NotConnected {
                    node: link.peer.clone(),
                },
                e => Error::Transport(e),
            };
            Err(SendError::new(error, payload))
        }
    }
}

/// Unless disarmed, resets the message's stream with [`stream_code::CANCELLED`] (so the peer
/// drops what arrived of it instead of reading a truncated message) and tells the peer the
/// numbered message will never arrive whole.
struct LostGuard<'a, S: SendStream> {
    link: &'a LinkHandle,
    notice: Option<EnvelopeHeader>,
    stream: S,
}

impl<S: SendStream> Drop for LostGuard<'_, S> {
    fn drop(&mut self) {
        if let Some(h) = self.notice.take() {
            self.stream.reset(stream_code::CANCELLED);
            let _ = self.link.control.send(Frame::Lost {
                from: h.from,
                to: h.to,
                seq: h.seq,
            });
        }
    }
}

/// Counts a send in progress (so a goodbye waits for it); refused once the link is closing.
struct ActiveSend<'a>(&'a LinkHandle);

impl Drop for ActiveSend<'_> {
    fn drop(&mut self) {
        self.0.end_sends(1);
    }
}

/// The queue of a coalescing link (see [`Coalescing`]): senders append envelopes, the writer
/// takes whole batches, each becoming one stream.
struct Outbox {
    config: Coalescing,
    state: Mutex<OutboxState>,
    /// Wakes the writer.
    ready: Notify,
    /// Bytes that may still be queued; senders wait here when the queue is full.
    space: Semaphore,
}

#[derive(Default)]
struct OutboxState {
    /// Batches waiting for the writer, oldest first; the last one still takes messages.
    batches: VecDeque<Batch>,
    /// Messages in the batch the writer is writing.
    writing: usize,
    seqs: SeqMap,
    /// The link is down: nothing more is queued.
    down: bool,
}

/// Envelopes bound for one stream: small ones copied back to back into `tail`, large payloads
/// kept as they are between.
#[derive(Default)]
struct Batch {
    chunks: Vec<Bytes>,
    tail: BytesMut,
    bytes: usize,
    /// Queue space the batch holds, given back once it is written.
    charged: usize,
    messages: usize,
}

impl Batch {
    fn into_chunks(mut self) -> Vec<Bytes> {
        if !self.tail.is_empty() {
            self.chunks.push(self.tail.freeze());
        }
        self.chunks
    }
}

impl Outbox {
    fn new(config: Coalescing) -> Self {
        let max = config
            .max_queued_bytes
            .clamp(1, u32::MAX as usize)
            .min(Semaphore::MAX_PERMITS);
        Outbox {
            config: Coalescing {
                max_queued_bytes: max,
                ..config
            },
            state: Mutex::new(OutboxState::default()),
            ready: Notify::new(),
            space: Semaphore::new(max),
        }
    }
}

/// Queues one message on a coalescing link; the writer sends it.
async fn enqueue(
    link: &LinkHandle,
    outbox: &Outbox,
    from: Option<u64>,
    to: Dest,
    payload: Bytes,
) -> Result<(), SendError> {
    let not_connected = |payload| {
        let node = link.peer.clone();
        Err(SendError::new(Error::NotConnected { node }, payload))
    };
    let Some(active) = link.begin_send() else {
        return not_connected(payload);
    };
    let charge = (payload.len() + 64).min(outbox.config.max_queued_bytes);
    // Waiting for space is cancel safe: nothing is queued or numbered until it is granted.
    let Ok(permit) = outbox.space.acquire_many(charge as u32).await else {
        return not_connected(payload);
    };
    {
        let mut state = lock(&outbox.state);
        if state.down {
            return not_connected(payload);
        }
        // Numbered under the queue's lock, so numbers follow queue order.
        let (seq, to) = next_seq_in(&mut state.seqs, from, to);
        let header = EnvelopeHeader {
            to,
            from,
            seq,
            len: payload.len() as u64,
        };
        let open = state
            .batches
            .back()
            .is_some_and(|b| b.bytes < outbox.config.max_stream_bytes);
        if !open {
            state.batches.push_back(Batch::default());
        }
        let batch = state.batches.back_mut().expect("a batch was just ensured");
        let size = encoded_header_len(&header) + payload.len();
        encode_header_into(&header, &mut batch.tail);
        if payload.len() <= COALESCE_MAX {
            batch.tail.extend_from_slice(&payload);
        } else {
            let head = batch.tail.split().freeze();
            batch.chunks.push(head);
            batch.chunks.push(payload);
        }
        batch.bytes += size;
        batch.charged += charge;
        batch.messages += 1;
    }
    // The space is given back by the writer; the send stays counted in progress until the
    // writer is done with it, so a goodbye waits for the queue to drain.
    permit.forget();
    std::mem::forget(active);
    outbox.ready.notify_one();
    Ok(())
}

/// The writer of a coalescing link: takes each batch in turn and writes it on a stream of its
/// own. Never returns: the reader notices a lost connection and ends the link.
async fn write_loop<C: Connection>(node: &Node, conn: &C, link: &LinkHandle, outbox: &Outbox) {
    let stats = &node.inner.stats;
    // Written streams the peer has not yet acknowledged: the stack buffers what a write hands
    // it, so without this bound a fast writer would pile up stream after stream in there.
    let mut unacked = FuturesUnordered::new();
    let mut priority = i32::MAX;
    let acked = |r: Option<Result<(), TransportError>>| {
        if let Some(Err(e)) = r {
            warn!(node = %node.inner.name, peer = %link.peer, error = %e, "coalesced stream not delivered");
        }
    };
    loop {
        while let Some(r) = unacked.next().now_or_never() {
            acked(r);
            if unacked.is_empty() {
                break;
            }
        }
        while unacked.len() >= MAX_UNACKED_STREAMS {
            acked(unacked.next().await);
        }
        let batch = loop {
            let ready = outbox.ready.notified();
            {
                let mut state = lock(&outbox.state);
                if let Some(batch) = state.batches.pop_front() {
                    state.writing = batch.messages;
                    break batch;
                }
            }
            ready.await;
        };
        let (messages, charged) = (batch.messages, batch.charged);
        let chunks = batch.into_chunks();
        let written = match conn.open_uni().await {
            Ok(mut stream) => {
                link.streams.fetch_add(1, Ordering::Relaxed);
                // Each stream ranks below the one before, so the stack sends them one after
                // another rather than interleaved, and the peer reads them nearly in order
                // instead of holding thousands of early messages back.
                priority = priority.checked_sub(1).unwrap_or(i32::MAX);
                stream.set_priority(priority);
                let mut out = chunks.clone();
                let written = stream
                    .write_all_chunks(&mut out)
                    .await
                    .and_then(|()| stream.finish());
                if written.is_ok() {
                    unacked.push(async move { stream.delivered().await });
                }
                written
            }
            Err(e) => Err(e),
        };
        outbox.space.add_permits(charged);
        lock(&outbox.state).writing = 0;
        match written {
            Ok(()) => {
                link.sent.fetch_add(messages as u64, Ordering::Relaxed);
                stats
                    .messages_sent
                    .fetch_add(messages as u64, Ordering::Relaxed);
                link.end_sends(messages);
            }
            Err(e) => {
                stats
                    .send_failures
                    .fetch_add(messages as u64, Ordering::Relaxed);
                warn!(node = %node.inner.name, peer = %link.peer, error = %e, messages, "coalesced stream failed");
                // Tell the peer which numbers will not come, so their pairs do not wait.
                for header in batch_headers(chunks) {
                    let _ = link.control.send(Frame::Lost {
                        from: header.from,
                        to: header.to,
                        seq: header.seq,
                    });
                }
                link.end_sends(messages);
                if e.is_connection_error() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// The headers of the envelopes in a batch (read back only when the batch failed).
fn batch_headers(chunks: Vec<Bytes>) -> Vec<EnvelopeHeader> {
    let mut asm = MessageAssembler::new(Limits {
        max_message_size: usize::MAX,
        max_frame_size: 0,
        max_header_size: usize::MAX,
    });
    let mut out = Vec::new();
    for chunk in chunks {
        if asm.push(chunk, &mut out).is_err() {
            break;
        }
    }
    out.into_iter().map(|m| m.header).collect()
}

/// The last number given to each (sender, destination) pair on a link.
type SeqMap = HashMap<(Option<u64>, Dest), u64, foldhash::fast::RandomState>;

/// Numbers the next message of a pair.
fn next_seq_in(seqs: &mut SeqMap, from: Option<u64>, to: Dest) -> (u64, Dest) {
    let key = (from, to);
    if let Some(s) = seqs.get_mut(&key) {
        *s += 1;
        return (*s, key.1);
    }
    // The pair's first message: the only time the destination is copied.
    seqs.insert(key.clone(), 1);
    (1, key.1)
}

/// The node's side of one link: what senders need, without the transport type.
pub(crate) struct LinkHandle {
    id: u64,
    pub(crate) peer: NodeName,
    addr: SocketAddr,
    peer_creation: u64,
    pub(crate) peer_max_message: usize,
    sender: Box<dyn LinkSender>,
    /// The capabilities both ends announced.
    pub(crate) capabilities: LinkCapabilities,
    /// The peer is hidden (an attach client): it never joins the mesh.
    pub(crate) hidden: bool,
    /// Present when the link coalesces.
    outbox: Option<Outbox>,
    control: mpsc::UnboundedSender<Frame>,
    /// Pair numbers of a link that does not coalesce (a coalescing one keeps them in its
    /// outbox, under the lock it takes anyway).
    seqs: Mutex<SeqMap>,
    streams: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    node: Weak<NodeInner>,
    in_progress: AtomicUsize,
    closing: AtomicBool,
    idle: Notify,
    finished: Notify,
    is_finished: AtomicBool,
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
        }
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

    /// The link is down: fails what is still queued (counted in `send_failures`) and wakes
    /// senders waiting for queue space, which then fail with `NotConnected`.
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
        let failed = writing + batches.iter().map(|b| b.messages).sum::<usize>();
        if failed > 0 {
            inner
                .stats
                .send_failures
                .fetch_add(failed as u64, Ordering::Relaxed);
            warn!(node = %inner.name, peer = %self.peer, messages = failed, "queued messages lost with the link");
            self.end_sends(failed);
        }
    }

    fn begin_send(&self) -> Option<ActiveSend<'_>> {
        // Count first, then look: with goodbye doing the opposite (flag, then count), one of the
        // two always sees the other.
        self.in_progress.fetch_add(1, Ordering::SeqCst);
        let active = ActiveSend(self);
        (!self.closing.load(Ordering::SeqCst)).then_some(active)
    }

    fn next_seq(&self, from: Option<u64>, to: Dest) -> (u64, Dest) {
        next_seq_in(&mut lock(&self.seqs), from, to)
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

/// How reading one frame during the handshake ended.
enum FrameRead {
    Frame(Frame),
    Wire(WireError),
    Transport(TransportError),
    Eof,
}

async fn read_frame<R: RecvStream>(recv: &mut R, dec: &mut FrameDecoder) -> FrameRead {
    loop {
        match dec.next_frame() {
            Ok(Some(f)) => return FrameRead::Frame(f),
            Ok(None) => {}
            Err(e) => return FrameRead::Wire(e),
        }
        match recv.read_chunk().await {
            Ok(Some(chunk)) => dec.push(&chunk),
            Ok(None) => return FrameRead::Eof,
            Err(e) => return FrameRead::Transport(e),
        }
    }
}

/// Maps a transport failure while linking to the error a user sees: refusals by either side
/// become [`Error::Rejected`] with the refusing side's words.
fn linking_error(peer: &NodeName, e: TransportError) -> Error {
    match e {
        TransportError::Handshake { reason } => Error::Rejected {
            node: peer.clone(),
            reason: RejectReason::Tls(reason),
        },
        TransportError::ClosedByPeer { code, reason }
            if code == u64::from(close_code::REJECTED) =>
        {
            Error::Rejected {
                node: peer.clone(),
                reason: RejectReason::Other(reason),
            }
        }
        other => Error::Transport(other),
    }
}

fn hello_peers(inner: &NodeInner) -> Vec<PeerAddr> {
    let links = lock(&inner.links);
    links
        .up
        .values()
        .map(|l| PeerAddr {
            name: l.peer.clone(),
            addr: l.addr,
        })
        .collect()
}

/// How a dial that did not fail ended.
pub(crate) enum Dialled {
    /// A link to the peer is up (ours, or one that came up meanwhile).
    Up,
    /// The peer refused our dial because its own dial to us wins the tie-break: that link is
    /// (or is about to be) up.
    PeerDialWins,
}

/// A dial refused as a duplicate link is not an error (see [`Dialled::PeerDialWins`]).
fn dial_failed(peer: &NodeName, e: TransportError) -> Result<Dialled, Error> {
    match e {
        TransportError::ClosedByPeer { code, .. } if code == u64::from(close_code::DUPLICATE) => {
            Ok(Dialled::PeerDialWins)
        }
        e => Err(linking_error(peer, e)),
    }
}

/// Dials `peer` at `addr` and brings the link up.
pub(crate) async fn dial<T: Transport>(
    node: Node,
    transport: Arc<T>,
    peer: NodeName,
    addr: SocketAddr,
) -> Result<Dialled, Error> {
    let inner = &node.inner;
    let server_name = tls::server_name_for(&inner.identity, &peer);
    let conn = transport
        .connect(addr, server_name)
        .await
        .map_err(|e| linking_error(&peer, e))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| linking_error(&peer, e))?;
    let hello = Frame::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        min_protocol: Some(MIN_PROTOCOL_VERSION),
        capabilities: inner.router.names(),
        name: inner.name.clone(),
        creation: inner.creation,
        listen_addr: Some(inner.local_addr),
        peers: hello_peers(inner),
        hidden: false,
        max_message_size: inner.config.limits.max_message_size as u64,
    });
    let bytes = encode_frame(&hello).map_err(|e| Error::Config(e.to_string()))?;
    send.write(bytes)
        .await
        .map_err(|e| linking_error(&peer, e))?;
    let mut dec = FrameDecoder::new(inner.config.limits.max_frame_size);
    let reject = |conn: &T::Connection, reason: RejectReason| {
        inner.stats.rejected_hellos.fetch_add(1, Ordering::Relaxed);
        conn.close(close_code::REJECTED, reason.to_string().as_bytes());
        Error::Rejected {
            node: peer.clone(),
            reason,
        }
    };
    let welcome = match read_frame(&mut recv, &mut dec).await {
        FrameRead::Frame(Frame::Welcome(w)) => w,
        FrameRead::Frame(Frame::Reject(RejectReason::DuplicateLink)) => {
            conn.close(close_code::DUPLICATE, b"duplicate link");
            return Ok(Dialled::PeerDialWins);
        }
        FrameRead::Frame(Frame::Reject(reason)) => {
            conn.close(close_code::REJECTED, b"rejected");
            return Err(Error::Rejected {
                node: peer.clone(),
                reason,
            });
        }
        FrameRead::Frame(other) => {
            let why = format!("expected welcome, got {}", other.kind());
            return Err(reject(&conn, RejectReason::BadHandshake(why)));
        }
        FrameRead::Wire(e) => {
            inner.stats.malformed_frames.fetch_add(1, Ordering::Relaxed);
            return Err(reject(&conn, RejectReason::BadHandshake(e.to_string())));
        }
        FrameRead::Transport(e) => return dial_failed(&peer, e),
        // The listener closed the stream; its close says why.
        FrameRead::Eof => return dial_failed(&peer, conn.closed().await),
    };
    if let Err(reason) = check_welcome(
        &welcome,
        conn.peer_identity(),
        &peer,
        &inner.name,
        inner.shared_identity,
    ) {
        return Err(reject(&conn, reason));
    }
    let registered = {
        let mut links = lock(&inner.links);
        if links.shut_down {
            None
        } else if links.up.contains_key(&peer) {
            // The peer's dial to us came up meanwhile; keep that one.
            conn.close(close_code::DUPLICATE, b"duplicate link");
            return Ok(Dialled::Up);
        } else {
            Some(register(
                &node,
                &mut links,
                &conn,
                Intro {
                    name: &welcome.name,
                    creation: welcome.creation,
                    max_message: welcome.max_message_size,
                    capabilities: &welcome.capabilities,
                    hidden: false,
                },
            ))
        }
    };
    let Some((link, rx)) = registered else {
        conn.close(close_code::NORMAL, b"shutting down");
        return Err(Error::Shutdown);
    };
    announce_up(&node, &link);
    tokio::spawn(run_link(node.clone(), link, conn, send, recv, dec, rx));
    Ok(Dialled::Up)
}

/// Creates the handle of a new link and records it as up (the caller holds the links lock).
/// What a peer said of itself in its hello or welcome.
struct Intro<'a> {
    name: &'a NodeName,
    creation: u64,
    max_message: u64,
    capabilities: &'a [String],
    hidden: bool,
}

fn register<C: Connection>(
    node: &Node,
    links: &mut crate::node::Links,
    conn: &C,
    intro: Intro<'_>,
) -> (Arc<LinkHandle>, mpsc::UnboundedReceiver<Frame>) {
    let (control, control_rx) = mpsc::unbounded_channel();
    let peer = intro.name;
    let link = Arc::new(LinkHandle {
        id: node.inner.next_link_id.fetch_add(1, Ordering::Relaxed),
        peer: peer.clone(),
        addr: conn.remote_addr(),
        peer_creation: intro.creation,
        peer_max_message: usize::try_from(intro.max_message).unwrap_or(usize::MAX),
        capabilities: LinkCapabilities::negotiate(&node.inner.router.names(), intro.capabilities),
        hidden: intro.hidden,
        sender: Box::new(TypedSender(conn.clone())),
        outbox: node.inner.config.coalescing.map(Outbox::new),
        control,
        seqs: Mutex::new(HashMap::default()),
        streams: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        node: Arc::downgrade(&node.inner),
        in_progress: AtomicUsize::new(0),
        closing: AtomicBool::new(false),
        idle: Notify::new(),
        finished: Notify::new(),
        is_finished: AtomicBool::new(false),
    });
    links.up.insert(peer.clone(), link.clone());
    node.inner.links_changed.notify_waiters();
    (link, control_rx)
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

/// Accepts connections until the endpoint closes; each handshake runs in its own task.
pub(crate) async fn accept_loop<T: Transport>(node: Weak<NodeInner>, transport: Arc<T>) {
    while let Some(incoming) = transport.accept().await {
        let Some(inner) = node.upgrade() else { break };
        tokio::spawn(accept_one::<T>(Node { inner }, incoming));
    }
}

async fn accept_one<T: Transport>(node: Node, incoming: T::Incoming) {
    let inner = &node.inner;
    let timeout = inner.config.handshake_timeout;
    let conn = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            inner
                .stats
                .rejected_handshakes
                .fetch_add(1, Ordering::Relaxed);
            warn!(node = %inner.name, error = %e, "incoming connection refused in the TLS handshake");
            return;
        }
        Err(_) => {
            inner
                .stats
                .rejected_handshakes
                .fetch_add(1, Ordering::Relaxed);
            warn!(node = %inner.name, "incoming TLS handshake timed out");
            return;
        }
    };
    let (mut send, mut recv) = match tokio::time::timeout(timeout, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            debug!(node = %inner.name, error = %e, "connection closed before its hello");
            return;
        }
        Err(_) => {
            inner.stats.rejected_hellos.fetch_add(1, Ordering::Relaxed);
            conn.close(close_code::REJECTED, b"no hello in time");
            return;
        }
    };
    let mut dec = FrameDecoder::new(inner.config.limits.max_frame_size);
    let first = match tokio::time::timeout(timeout, read_frame(&mut recv, &mut dec)).await {
        Ok(f) => f,
        Err(_) => FrameRead::Wire(WireError::Malformed {
            what: "hello",
            why: "none arrived in time".into(),
        }),
    };
    let hello = match first {
        FrameRead::Frame(Frame::Hello(h)) => h,
        FrameRead::Frame(other) => {
            let why = format!("expected hello, got {}", other.kind());
            return refuse(inner, &conn, &mut send, RejectReason::BadHandshake(why)).await;
        }
        FrameRead::Wire(e) => {
            inner.stats.malformed_frames.fetch_add(1, Ordering::Relaxed);
            return refuse(
                inner,
                &conn,
                &mut send,
                RejectReason::BadHandshake(e.to_string()),
            )
            .await;
        }
        FrameRead::Transport(_) | FrameRead::Eof => return,
    };
    let version = match check_hello(
        &hello,
        conn.peer_identity(),
        &inner.name,
        inner.shared_identity,
    ) {
        Ok(version) => version,
        Err(reason) => {
            warn!(node = %inner.name, claimed = %hello.name, %reason, "hello refused");
            return refuse(inner, &conn, &mut send, reason).await;
        }
    };
    let registered = {
        let mut links = lock(&inner.links);
        if links.shut_down {
            Err(RejectReason::ShuttingDown)
        } else if links.up.contains_key(&hello.name)
            || (links.dialling.contains(&hello.name) && own_dial_wins(&inner.name, &hello.name))
        {
            Err(RejectReason::DuplicateLink)
        } else {
            Ok(register(
                &node,
                &mut links,
                &conn,
                Intro {
                    name: &hello.name,
                    creation: hello.creation,
                    max_message: hello.max_message_size,
                    capabilities: &hello.capabilities,
                    hidden: hello.hidden,
                },
            ))
        }
    };
    let (link, rx) = match registered {
        Ok(r) => r,
        Err(reason) => return refuse(inner, &conn, &mut send, reason).await,
    };
    let welcome = Frame::Welcome(Welcome {
        protocol: version,
        capabilities: inner.router.names(),
        name: inner.name.clone(),
        creation: inner.creation,
        listen_addr: Some(inner.local_addr),
        peers: hello_peers(inner),
        max_message_size: inner.config.limits.max_message_size as u64,
    });
    let sent = match encode_frame(&welcome) {
        Ok(bytes) => send.write(bytes).await,
        Err(e) => Err(TransportError::ConnectionLost {
            reason: e.to_string(),
        }),
    };
    announce_up(&node, &link);
    if let Err(e) = sent {
        // The dialler vanished mid-handshake: the link comes down at once, with NodeDown.
        debug!(node = %inner.name, error = %e, "welcome not delivered");
    }
    run_link(node.clone(), link, conn, send, recv, dec, rx).await;
}

/// Sends a reject frame, then closes the connection with the same reason once the dialler has
/// had a moment to read it (closing at once could discard the frame).
async fn refuse<C: Connection>(
    inner: &NodeInner,
    conn: &C,
    send: &mut C::SendStream,
    reason: RejectReason,
) {
    inner.stats.rejected_hellos.fetch_add(1, Ordering::Relaxed);
    if let Ok(bytes) = encode_frame(&Frame::Reject(reason.clone())) {
        if send.write(bytes).await.is_ok() {
            let _ = send.finish();
            let _ = tokio::time::timeout(DRAIN, conn.closed()).await;
        }
    }
    let code = match reason {
        RejectReason::DuplicateLink => close_code::DUPLICATE,
        _ => close_code::REJECTED,
    };
    conn.close(code, reason.to_string().as_bytes());
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
    let (lost_tx, lost_rx) = mpsc::channel(LOST_QUEUE);
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
        _ => close_code::NORMAL,
    };
    conn.close(code, reason.to_string().as_bytes());
    link.fail_queue(inner);
    {
        let mut links = lock(&inner.links);
        if links.up.get(&link.peer).is_some_and(|l| l.id == link.id) {
            links.up.remove(&link.peer);
            inner.links_changed.notify_waiters();
        }
    }
    // Release what was held back for predecessors that will never come.
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
    for capability in inner.router.on_link(&link.capabilities) {
        capability.on_link_down(&node, &link.peer);
    }
    inner.stats.links_down.fetch_add(1, Ordering::Relaxed);
    info!(node = %inner.name, peer = %link.peer, %reason, "link down");
    let _ = inner.events.send(NodeEvent::NodeDown {
        node: link.peer.clone(),
        reason,
    });
    link.is_finished.store(true, Ordering::Release);
    link.finished.notify_waiters();
}

/// Payload bytes one stream is read for before the link delivers them and turns to other
/// streams: a stream of coalesced messages is read in turns, like any other.
const READ_TURN: usize = 1 << 20;

/// One message stream being read, with the credit of the message it is in the middle of.
struct Reading<R> {
    stream: R,
    asm: MessageAssembler,
    /// The credit granted to the message being received, and what it was charged.
    credit: Option<(LinkCredit, usize)>,
    /// While parked: the credit its next message needs, and the ceiling it may fill up to.
    wants: (usize, usize),
}

/// A message read whole, with the bytes of the link budget it holds until its receiver drops
/// it.
struct Incoming {
    msg: ReadMessage,
    credit: Option<LinkCredit>,
    charge: usize,
}

impl InboundMessage for Incoming {
    fn header(&self) -> &EnvelopeHeader {
        &self.msg.header
    }
    fn charge(&self) -> usize {
        self.charge
    }
}

/// Where a stream stands after the reader took what it held.
enum Step<R> {
    /// Read to its end, or failed (already accounted for).
    Ended,
    /// Waits for more data.
    Wait(Reading<R>),
    /// A message header waits for credit the link budget does not have.
    Parked(Reading<R>),
}

/// The link's reader: the [`Inbound`] machine, the budget it charges, and the counters its
/// inputs moved.
struct Reader {
    machine: Inbound<Incoming>,
    budget: Arc<Budget>,
    /// How far above the budget a message that fills its pair's gap may still be granted.
    reserve_ceiling: usize,
    limits: Limits,
    got: Vec<ReadMessage>,
    counted: Counted,
}

impl Reader {
    fn count(&mut self, c: Counted) {
        self.counted.lost += c.lost;
        self.counted.oversized += c.oversized;
        self.counted.malformed += c.malformed;
    }

    /// Takes what `rd` holds without waiting (`first` is a chunk already read from it): grants
    /// each message its credit before its payload, and hands whole messages to the machine,
    /// which pushes what may be delivered onto `out`.
    fn advance<R: RecvStream>(
        &mut self,
        mut rd: Reading<R>,
        first: Option<Result<Option<Bytes>, TransportError>>,
        now: Instant,
        out: &mut Vec<Incoming>,
    ) -> Step<R> {
        let mut next = first;
        let mut taken = 0;
        loop {
            let pushed = if rd.asm.is_awaiting_credit() {
                let header = rd.asm.header().expect("credit is awaited after a header");
                let (cost, fills_gap) = self.machine.assess(header);
                let ceiling = if fills_gap {
                    self.reserve_ceiling
                } else {
                    self.budget.limit()
                };
                let Some(credit) = self.budget.try_take_within(cost, ceiling) else {
                    rd.wants = (cost, ceiling);
                    return Step::Parked(rd);
                };
                self.machine.on_credit(cost);
                rd.credit = Some((credit, cost));
                rd.asm.grant();
                rd.asm.resume(&mut self.got)
            } else {
                if taken >= READ_TURN {
                    return Step::Wait(rd);
                }
                // Dropping a pending `read_chunk` loses nothing (it is cancel safe).
                let chunk = match next.take() {
                    Some(r) => r,
                    None => match rd.stream.read_chunk().now_or_never() {
                        Some(r) => r,
                        None => return Step::Wait(rd),
                    },
                };
                match chunk {
                    Ok(Some(chunk)) => {
                        taken += chunk.len();
                        rd.asm.push_gated(chunk, &mut self.got)
                    }
                    Ok(None) => {
                        let end =
                            std::mem::replace(&mut rd.asm, MessageAssembler::new(self.limits))
                                .finish();
                        return match end {
                            Ok(()) => {
                                self.machine.on_stream_closed();
                                Step::Ended
                            }
                            Err(e) => self.fail(rd, e, now, out),
                        };
                    }
                    Err(e) => {
                        let e = rd.asm.failed(e);
                        return self.fail(rd, e, now, out);
                    }
                }
            };
            match pushed {
                Ok(_) => self.collect(&mut rd, now, out),
                Err(e) => {
                    if let Some(code) = e.stop_code() {
                        rd.stream.stop(code);
                    }
                    self.collect(&mut rd, now, out);
                    return self.fail(rd, e, now, out);
                }
            }
        }
    }

    /// Hands the message the stream completed (at most one per push: each needs its own
    /// credit) to the machine, with its credit.
    fn collect<R>(&mut self, rd: &mut Reading<R>, now: Instant, out: &mut Vec<Incoming>) {
        let mut got = std::mem::take(&mut self.got);
        for msg in got.drain(..) {
            let (credit, charge) = match rd.credit.take() {
                Some((credit, charge)) => (Some(credit), charge),
                None => (None, 0),
            };
            self.machine.on_uncredit(charge);
            let c = self.machine.on_message(
                now,
                Incoming {
                    msg,
                    credit,
                    charge,
                },
                out,
            );
            self.count(c);
        }
        self.got = got;
    }

    /// A stream ended badly: gives back the credit of its unfinished message and stops waiting
    /// for that message.
    fn fail<R>(
        &mut self,
        mut rd: Reading<R>,
        e: ReadError,
        now: Instant,
        out: &mut Vec<Incoming>,
    ) -> Step<R> {
        if let Some((credit, charge)) = rd.credit.take() {
            drop(credit);
            self.machine.on_uncredit(charge);
        }
        let c = self.machine.on_read_error(now, &e, out);
        self.count(c);
        self.machine.on_stream_closed();
        debug!(error = %e, "message refused");
        Step::Ended
    }
}

/// What a parked stream holds uncharged: the rest of a chunk, and its own keeping.
fn parked_size<R>(rd: &Reading<R>) -> usize {
    rd.asm.stashed_len() + 256
}

/// Waits for the next chunk of a stream.
async fn next_chunk<R: RecvStream>(
    mut rd: Reading<R>,
) -> (Reading<R>, Result<Option<Bytes>, TransportError>) {
    let r = rd.stream.read_chunk().await;
    (rd, r)
}

async fn read_loop<C: Connection>(
    node: &Node,
    link: &LinkHandle,
    conn: &C,
    reader: &mut Reader,
    mut goodbye: watch::Receiver<Option<(String, u64)>>,
    mut lost: mpsc::Receiver<(Option<u64>, Dest, u64)>,
) -> DownReason {
    let inner = &node.inner;
    let stats = &inner.stats;
    let mut inflight = FuturesUnordered::new();
    // Streams whose next message waits for credit, oldest first, and the bytes they hold
    // uncharged (the rest of the chunk that carried the header). While under a quarter of the
    // budget, new streams are still accepted: the one that fills a gap may be among them, and
    // may draw on the reserve.
    let mut parked: VecDeque<Reading<C::RecvStream>> = VecDeque::new();
    let mut parked_bytes = 0;
    let parked_max = reader.budget.limit() / 4;
    let mut goodbye_open = true;
    let mut out = Vec::new();
    let mut route = Route::default();
    loop {
        if let Some(reason) = reader.machine.goodbye_done() {
            return DownReason::Goodbye(reason.to_string());
        }
        if let Some(why) = reader.machine.closed() {
            return DownReason::PeerMisbehaved(why.clone());
        }
        let deadline = reader.machine.poll_timeout();
        // What the oldest parked stream waits for.
        let wants = parked.front().map_or((0, 0), |rd| rd.wants);
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let step = tokio::select! {
            Some((rd, chunk)) = inflight.next(), if !inflight.is_empty() => {
                reader.advance(rd, Some(chunk), Instant::now(), &mut out)
            }
            r = conn.accept_uni(), if parked_bytes < parked_max
                && inflight.len() + parked.len() < MAX_READS => match r {
                Ok(Some(stream)) => {
                    reader.machine.on_stream_accepted();
                    let rd = Reading {
                        stream,
                        asm: MessageAssembler::new(reader.limits),
                        credit: None,
                        wants: (0, 0),
                    };
                    reader.advance(rd, None, Instant::now(), &mut out)
                }
                // Closed gracefully: the close itself says why.
                Ok(None) => return down_from(conn.closed().await),
                Err(e) => return down_from(e),
            },
            changed = goodbye.changed(), if goodbye_open => {
                goodbye_open = changed.is_ok();
                if let Some((reason, streams)) = goodbye.borrow().clone() {
                    reader.machine.on_goodbye(reason, streams);
                }
                continue;
            }
            Some((from, to, seq)) = lost.recv() => {
                // The sender never finished this message: stop waiting for it (counted once,
                // and only if it had not arrived after all).
                let c = reader.machine.on_lost_notice(Instant::now(), from, to, seq, &mut out);
                reader.count(c);
                Step::Ended
            }
            () = reader.budget.freed(wants.0, wants.1), if !parked.is_empty() => {
                // Some of the budget came back: parked streams go on, oldest first.
                let now = Instant::now();
                while let Some(rd) = parked.pop_front() {
                    parked_bytes -= parked_size(&rd);
                    match reader.advance(rd, None, now, &mut out) {
                        Step::Parked(rd) => {
                            parked_bytes += parked_size(&rd);
                            parked.push_front(rd);
                            break;
                        }
                        Step::Wait(rd) => inflight.push(next_chunk(rd)),
                        Step::Ended => {}
                    }
                }
                Step::Ended
            }
            () = timer, if deadline.is_some() => {
                if let Some(why) = reader.machine.handle_timeout(Instant::now()) {
                    return DownReason::PeerMisbehaved(why.clone());
                }
                continue;
            }
        };
        match step {
            Step::Ended => {}
            Step::Wait(rd) => inflight.push(next_chunk(rd)),
            Step::Parked(rd) => {
                parked_bytes += parked_size(&rd);
                parked.push_back(rd);
            }
        }
        if !parked.is_empty() || reader.machine.poll_timeout().is_some() {
            reader
                .machine
                .on_budget(Instant::now(), !parked.is_empty(), reader.budget.used());
        }
        let c = std::mem::take(&mut reader.counted);
        if c != Counted::default() {
            stats.lost_messages.fetch_add(c.lost, Ordering::Relaxed);
            stats
                .oversized_messages
                .fetch_add(c.oversized, Ordering::Relaxed);
            stats
                .malformed_messages
                .fetch_add(c.malformed, Ordering::Relaxed);
        }
        for msg in out.drain(..) {
            deliver(node, link, &mut route, msg).await;
        }
        route.flush(inner, link);
    }
}

/// The reader's memory of where its last message went, and the messages for that process not
/// yet handed over: consecutive messages to one process (the common case) skip the lookups,
/// and reach its mailbox together, in one channel operation and one wake-up. A process id is
/// never reused, and a closed mailbox is looked up afresh, so the memory is never stale.
#[derive(Default)]
struct Route {
    last: Option<(u64, Mailbox)>,
    pending: Vec<Message>,
}

impl Route {
    /// Points the route at the process `to` names, handing over what is pending for another
    /// one first; `false` if no such process lives here.
    fn aim(&mut self, inner: &NodeInner, link: &LinkHandle, to: &Dest) -> bool {
        let id = match to {
            Dest::Pid { id, creation } if *creation == inner.creation => *id,
            Dest::Pid { .. } => return false,
            Dest::Name(name) => {
                let names = inner.names.read().unwrap_or_else(|p| p.into_inner());
                match names.get(name) {
                    Some(id) => *id,
                    None => return false,
                }
            }
        };
        if self
            .last
            .as_ref()
            .is_some_and(|(last, m)| *last == id && !m.is_closed())
        {
            return true;
        }
        self.flush(inner, link);
        let mailbox = inner
            .processes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|slot| slot.mailbox.clone());
        match mailbox {
            Some(mailbox) => {
                self.last = Some((id, mailbox));
                true
            }
            None => false,
        }
    }

    /// Hands the pending messages to their mailbox.
    fn flush(&mut self, inner: &NodeInner, link: &LinkHandle) {
        let n = self.pending.len() as u64;
        let Some((_, mailbox)) = self.last.as_ref().filter(|_| n > 0) else {
            return;
        };
        let mail = if n == 1 {
            Mail::One(self.pending.remove(0))
        } else {
            Mail::Many(std::mem::take(&mut self.pending))
        };
        if mailbox.push(mail).is_err() {
            // The process exited with these on their way.
            inner.stats.dead_letters.fetch_add(n, Ordering::Relaxed);
            return;
        }
        inner
            .stats
            .messages_received
            .fetch_add(n, Ordering::Relaxed);
        link.received.fetch_add(n, Ordering::Relaxed);
    }
}

/// Readies a message for its local destination; the message reaches the mailbox at the
/// route's next flush, still holding its credit of the link budget.
async fn deliver(node: &Node, link: &LinkHandle, route: &mut Route, incoming: Incoming) {
    let inner = &node.inner;
    let Incoming { msg, credit, .. } = incoming;
    if !route.aim(inner, link, &msg.header.to) {
        inner.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
        debug!(node = %inner.name, peer = %link.peer, to = ?msg.header.to, "dead letter");
        return;
    }
    // One unit of the task's cooperative budget per message, so a link that always has input
    // still yields to the runtime now and then (its QUIC driver among others). Without it, a
    // busy reader kept the driver from running and accepted many streams half-received, whose
    // pairs' later messages then waited in the reorder buffer (measured: 25,632 of 436k
    // streams read in two goes and 356k messages held back, against 626 and 8k with it).
    tokio::task::consume_budget().await;
    let from = msg.header.from.map(|id| Pid {
        node: link.peer.clone(),
        id,
        creation: link.peer_creation,
    });
    route
        .pending
        .push(Message::new(from, msg.payload, credit.map(Credit::Link)));
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
    lost: &mpsc::Sender<(Option<u64>, Dest, u64)>,
) -> DownReason {
    let stats = &node.inner.stats;
    let violation = |why: String| {
        stats.malformed_frames.fetch_add(1, Ordering::Relaxed);
        DownReason::ProtocolViolation(why)
    };
    let mut frames_open = true;
    loop {
        tokio::select! {
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
                    loop {
                        match dec.next_frame() {
                            Ok(Some(Frame::Goodbye { reason, streams })) => {
                                let _ = goodbye.send(Some((reason, streams)));
                            }
                            Ok(Some(Frame::Lost { from, to, seq })) => {
                                let _ = lost.send((from, to, seq)).await;
                            }
                            Ok(Some(Frame::Capability { capability, body })) => {
                                match node.inner.router.route(&link.capabilities, &capability) {
                                    Ok(handler) => handler.on_frame(node, &link.peer, body),
                                    Err(e) => {
                                        stats.malformed_frames.fetch_add(1, Ordering::Relaxed);
                                        return DownReason::CapabilityRefused(e);
                                    }
                                }
                            }
                            Ok(Some(other)) => {
                                return violation(format!("unexpected {} frame", other.kind()));
                            }
                            Ok(None) => break,
                            Err(e) => return violation(e.to_string()),
                        }
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
