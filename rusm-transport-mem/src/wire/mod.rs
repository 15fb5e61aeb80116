//! One in-memory connection: the state of both its ends, and the two one-way pipes between them.
//!
//! Everything one end tells the other — TLS records, stream data, end of stream, resets, stops,
//! flow-control credit, "read to the end" acknowledgements, the close — is an [`Event`] pushed
//! onto the pipe of its direction, stamped with the time it may arrive (now + the link's one-way
//! latency). [`Wire::pump_in`] delivers events in order, each pipe on its own: at once, by the
//! handle whose operation sent them, when the link is open and has no latency; otherwise by the
//! connection's [`drive`] task once they are due and the link is not cut. The driver also times
//! the connection out when its link stays cut (or its listener never answers) for longer than the
//! idle timeout.
//!
//! Both ends live under one mutex, so an event is never seen half-applied, and every handle
//! operation is a poll function that only changes state when it completes (or registers its
//! waker and changes nothing), which makes reads, accepts and opens cancel safe.
//!
//! The model is QUIC's, reduced to what the cluster relies on: the TLS handshake is in
//! [`handshake`], streams, flow control and stream credit in [`streams`]; this file holds the
//! state of both ends, the pipes, the driver, and how a connection ends.

mod handshake;
mod pace;
mod streams;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use rusm_cluster_core::rustls;
use rusm_cluster_core::rustls::pki_types::CertificateDer;
use rusm_cluster_core::transport::{TransportError, TransportTuning};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::network::{LinkCtl, LinkState};

/// The dialling end.
pub(crate) const CLIENT: usize = 0;
/// The listening end.
pub(crate) const SERVER: usize = 1;

/// The other end.
pub(crate) fn peer_of(side: usize) -> usize {
    1 - side
}

/// What one end sends the other.
#[derive(Debug)]
enum Event {
    /// TLS records (handshake, tickets, alerts).
    Tls(Vec<u8>),
    /// Data on stream `id` (the sender's half).
    Data { id: u64, chunk: Bytes },
    /// End of stream `id` (the sender's half).
    Fin { id: u64 },
    /// The sender abandoned its half of `id`, after `final_size` bytes in all.
    Reset { id: u64, code: u64, final_size: u64 },
    /// The receiver asks the sender of `id` to stop.
    Stop { id: u64, code: u64 },
    /// The receiver of `id` lets its sender write up to `max` bytes in all.
    MaxStreamData { id: u64, max: u64 },
    /// The receiver lets the sender write up to `max` bytes in all on the connection.
    MaxData { max: u64 },
    /// The receiver lets the sender open up to `max` uni-streams in all.
    MaxUniStreams { max: u64 },
    /// The receiver of `id` has read everything, end of stream included.
    Acked { id: u64 },
    /// Application close.
    Close { code: u64, reason: String },
}

/// Wakers of one kind of waiter (deduplicated, all woken at once).
#[derive(Default)]
struct Wakers(Vec<Waker>);

impl Wakers {
    fn register(&mut self, waker: &Waker) {
        if !self.0.iter().any(|w| w.will_wake(waker)) {
            self.0.push(waker.clone());
        }
    }

    fn wake(&mut self) {
        for w in self.0.drain(..) {
            w.wake();
        }
    }
}

fn wake(slot: &mut Option<Waker>) {
    if let Some(w) = slot.take() {
        w.wake();
    }
}

/// One end's own limits, from its tuning (what it grants its peer).
#[derive(Clone, Copy)]
struct Limits {
    stream_window: u64,
    conn_window: u64,
    max_uni: u64,
    idle: Duration,
}

impl From<&TransportTuning> for Limits {
    fn from(t: &TransportTuning) -> Self {
        Limits {
            stream_window: u64::from(t.stream_receive_window).max(1),
            conn_window: u64::from(t.connection_receive_window).max(1),
            max_uni: u64::from(t.max_concurrent_uni_streams),
            idle: t.idle_timeout,
        }
    }
}

/// One end of the connection.
struct Side {
    /// The server end exists once the client's first flight reached a listener.
    exists: bool,
    limits: Limits,
    tls: Option<rustls::Connection>,
    handshaken: bool,
    peer_leaf: Option<CertificateDer<'static>>,
    /// Why this end's connection is over, once it is.
    error: Option<TransportError>,
    // Sending: what the peer allows.
    conn_sent: u64,
    conn_max: u64,
    uni_opened: u64,
    uni_max: u64,
    bi_opened: u64,
    // Receiving: what we allowed and what arrived.
    conn_read: u64,
    conn_max_adv: u64,
    uni_max_adv: u64,
    incoming_uni: VecDeque<u64>,
    incoming_bi: VecDeque<u64>,
    // Waiters.
    handshake_waiters: Wakers,
    closed_waiters: Wakers,
    accept_uni_waiters: Wakers,
    accept_bi_waiters: Wakers,
    open_uni_waiters: Wakers,
    /// Writers waiting for connection credit, by stream.
    conn_credit_waiters: HashMap<u64, Waker>,
}

impl Side {
    fn new(limits: Limits, tls: Option<rustls::Connection>, exists: bool) -> Side {
        Side {
            exists,
            limits,
            tls,
            handshaken: false,
            peer_leaf: None,
            error: None,
            conn_sent: 0,
            conn_max: 0,
            uni_opened: 0,
            uni_max: 0,
            bi_opened: 0,
            conn_read: 0,
            conn_max_adv: limits.conn_window,
            uni_max_adv: limits.max_uni,
            incoming_uni: VecDeque::new(),
            incoming_bi: VecDeque::new(),
            handshake_waiters: Wakers::default(),
            closed_waiters: Wakers::default(),
            accept_uni_waiters: Wakers::default(),
            accept_bi_waiters: Wakers::default(),
            open_uni_waiters: Wakers::default(),
            conn_credit_waiters: HashMap::new(),
        }
    }
}

/// One direction of one stream: the sender's view and the receiver's view side by side.
struct Half {
    uni: bool,
    // The sending end.
    written: u64,
    max: u64,
    fin: bool,
    reset: bool,
    stopped: Option<u64>,
    acked: bool,
    send_waker: Option<Waker>,
    send_dropped: bool,
    // The receiving end.
    visible: bool,
    queue: VecDeque<Bytes>,
    /// Bytes that arrived (read, queued or discarded).
    arrived: u64,
    read: u64,
    fin_received: bool,
    reset_received: Option<u64>,
    stopped_here: bool,
    /// Final size known and everything consumed or discarded: the stream is over for its
    /// receiver (and its uni-stream credit was granted again).
    done: bool,
    max_adv: u64,
    recv_waker: Option<Waker>,
    recv_dropped: bool,
}

impl Half {
    fn new(uni: bool, window: u64) -> Half {
        Half {
            uni,
            written: 0,
            max: window,
            fin: false,
            reset: false,
            stopped: None,
            acked: false,
            send_waker: None,
            send_dropped: false,
            visible: false,
            queue: VecDeque::new(),
            arrived: 0,
            read: 0,
            fin_received: false,
            reset_received: None,
            stopped_here: false,
            done: false,
            max_adv: window,
            recv_waker: None,
            recv_dropped: false,
        }
    }
}

/// `t + d`, or a time in the far future when that does not fit (an idle timeout or a latency of
/// `Duration::MAX` means "never").
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(30 * 365 * 86_400))
}

fn lost(reason: &str) -> TransportError {
    TransportError::ConnectionLost {
        reason: reason.to_string(),
    }
}

/// Both ends of one connection and the pipes between them.
pub(crate) struct Wire {
    me: Weak<ConnInner>,
    addrs: [SocketAddr; 2],
    link: Arc<LinkCtl>,
    sides: [Side; 2],
    /// `pipes[from]`: events on their way from `from` to its peer, oldest first.
    pipes: [VecDeque<(Instant, Event)>; 2],
    /// `pacers[from]`: stream events waiting for the link's rate to let them go.
    pacers: [pace::Pacer; 2],
    /// Stream halves by (stream id, sending end).
    halves: HashMap<(u64, usize), Half>,
    started: Instant,
    /// Since when the client's first flight has been going nowhere (no listener).
    silent_since: Option<Instant>,
    /// Something changed when the driver must wake (a new deadline): tell it.
    retime: bool,
    torn_down: bool,
}

/// A connection: its [`Wire`], the driver's doorbell, its link.
pub(crate) struct ConnInner {
    wire: Mutex<Wire>,
    driver: Notify,
    link: Arc<LinkCtl>,
}

impl std::fmt::Debug for ConnInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = self.lock();
        f.debug_struct("MemConn")
            .field("client", &w.addrs[CLIENT])
            .field("server", &w.addrs[SERVER])
            .finish_non_exhaustive()
    }
}

impl ConnInner {
    /// A new connection dialled from `local` to `remote` with the client end's TLS and tuning.
    pub(crate) fn dial(
        local: SocketAddr,
        remote: SocketAddr,
        tls: rustls::ClientConnection,
        tuning: &TransportTuning,
        link: Arc<LinkCtl>,
    ) -> Arc<ConnInner> {
        let limits = Limits::from(tuning);
        Arc::new_cyclic(|me| ConnInner {
            wire: Mutex::new(Wire {
                me: me.clone(),
                addrs: [local, remote],
                link: link.clone(),
                sides: [
                    Side::new(limits, Some(tls.into()), true),
                    Side::new(limits, None, false),
                ],
                pipes: [VecDeque::new(), VecDeque::new()],
                pacers: Default::default(),
                halves: HashMap::new(),
                started: Instant::now(),
                silent_since: None,
                retime: false,
                torn_down: false,
            }),
            driver: Notify::new(),
            link,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Wire> {
        self.wire.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the wire, then delivers what is due and tells the driver if anything waits.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Wire) -> R) -> R {
        let mut w = self.lock();
        let r = f(&mut w);
        let kick = w.settle();
        drop(w);
        if kick {
            self.driver.notify_one();
        }
        r
    }

    /// The link's one-way latency now.
    pub(crate) fn latency(&self) -> Duration {
        self.link.latency()
    }
}

/// The connection's driver: delivers events that were delayed (latency) or held (cut), and times
/// the connection out. Ends once both ends are closed.
pub(crate) async fn drive(conn: Arc<ConnInner>) {
    let mut link = conn.link.subscribe();
    loop {
        let wake_at = {
            // The link's state is read under the wire's lock, never before it: a state read
            // earlier may be stale by the time the lock is taken (a cut made meanwhile, and
            // traffic sent after it that `settle` rightly held back), and pumping with it would
            // let that traffic cross the cut.
            let mut w = conn.lock();
            let state = *link.borrow_and_update();
            let now = Instant::now();
            w.pump_in(&state);
            let idle = w.idle_deadline(&state);
            if idle.is_some_and(|d| now >= d) {
                w.time_out();
            }
            if w.over() {
                w.teardown();
                return;
            }
            let due = if state.cut { None } else { w.next_due(now) };
            match (due, w.idle_deadline(&state)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        tokio::select! {
            () = conn.driver.notified() => {}
            changed = link.changed() => {
                if changed.is_err() {
                    // The link outlives its connections; never seen, but do not spin.
                    conn.driver.notified().await;
                }
            }
            () = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

impl Wire {
    // ----- Pipes -----

    /// Sends `event` from `from`: stream data through the link's pacer when the link has a rate
    /// (and a stream's later events behind its data waiting there), everything else straight
    /// onto the pipe.
    fn send(&mut self, from: usize, event: Event) {
        let state = self.link.state();
        let stream = match &event {
            Event::Data { id, .. } => Some((*id, true)),
            Event::Fin { id } | Event::Reset { id, .. } => Some((*id, false)),
            _ => None,
        };
        if let Some((id, data)) = stream {
            if (data && state.rate.is_some()) || self.pacers[from].holds(id) {
                self.pacers[from].push(id, event);
                return;
            }
        }
        // With no latency the stamp only has to be in the past: the pipe is delivered in order,
        // so an event never overtakes one sent before it.
        let start = if state.latency.is_zero() {
            self.started
        } else {
            Instant::now()
        };
        self.emit(from, event, start, state.latency);
    }

    /// Puts `event` on the pipe, leaving at `start` and arriving `latency` later.
    fn emit(&mut self, from: usize, event: Event, start: Instant, latency: Duration) {
        self.pipes[from].push_back((later(start, latency), event));
    }

    /// Delivers what is due, then tears the connection down if both ends are over. Returns
    /// whether the driver must look (events wait, a deadline changed, or the connection ended).
    fn settle(&mut self) -> bool {
        if self.in_flight() {
            let state = self.link.state();
            self.pump_in(&state);
        }
        if self.over() {
            if !self.torn_down {
                self.teardown();
            }
            return true;
        }
        std::mem::take(&mut self.retime) || self.in_flight()
    }

    /// Whether anything is on its way (on a pipe or waiting for the link's rate).
    fn in_flight(&self) -> bool {
        !self.pipes[CLIENT].is_empty()
            || !self.pipes[SERVER].is_empty()
            || !self.pacers[CLIENT].is_empty()
            || !self.pacers[SERVER].is_empty()
    }

    /// Sends what the link's rate allows and delivers every due event of both pipes, in order,
    /// unless the link is cut.
    fn pump_in(&mut self, state: &LinkState) {
        if state.cut {
            return;
        }
        let mut now = Instant::now();
        loop {
            self.transmit(state, now);
            let mut moved = false;
            for from in [CLIENT, SERVER] {
                while self.pipes[from].front().is_some_and(|(at, _)| *at <= now) {
                    if let Some((_, event)) = self.pipes[from].pop_front() {
                        self.deliver(peer_of(from), event);
                        moved = true;
                    }
                }
            }
            if !moved {
                break;
            }
            now = Instant::now();
        }
    }

    /// When the next event is due or the next slice may leave.
    fn next_due(&self, now: Instant) -> Option<Instant> {
        [
            self.pipes[CLIENT].front().map(|(at, _)| *at),
            self.pipes[SERVER].front().map(|(at, _)| *at),
            self.pacers[CLIENT].next_at(now),
            self.pacers[SERVER].next_at(now),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ----- Life and death -----

    fn over(&self) -> bool {
        self.sides[CLIENT].error.is_some()
            && (!self.sides[SERVER].exists || self.sides[SERVER].error.is_some())
    }

    fn idle_timeout(&self) -> Duration {
        let c = self.sides[CLIENT].limits.idle;
        if self.sides[SERVER].exists {
            c.min(self.sides[SERVER].limits.idle)
        } else {
            c
        }
    }

    /// When the connection times out if nothing changes: a cut outlasting the idle timeout, or
    /// a first flight nobody answers.
    fn idle_deadline(&self, state: &LinkState) -> Option<Instant> {
        if self.over() {
            return None;
        }
        let idle = self.idle_timeout();
        let cut = state
            .cut
            .then(|| later(state.cut_since.max(self.started), idle));
        let silent = self.silent_since.map(|s| later(s, idle));
        match (cut, silent) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn time_out(&mut self) {
        for side in [CLIENT, SERVER] {
            if self.sides[side].exists {
                self.fail(side, TransportError::TimedOut);
            }
        }
    }

    /// Ends `side`'s connection with `error` (if it was not over already), waking everyone who
    /// waits on it.
    fn fail(&mut self, side: usize, error: TransportError) {
        let s = &mut self.sides[side];
        if s.error.is_some() {
            return;
        }
        tracing::trace!(side, %error, "in-memory connection end closed");
        s.error = Some(error);
        // What it still had to send is dropped with it (its close is not paced).
        self.pacers[side].clear();
        let s = &mut self.sides[side];
        s.handshake_waiters.wake();
        s.closed_waiters.wake();
        s.accept_uni_waiters.wake();
        s.accept_bi_waiters.wake();
        s.open_uni_waiters.wake();
        for (_, w) in s.conn_credit_waiters.drain() {
            w.wake();
        }
        for ((_, sender), h) in self.halves.iter_mut() {
            if *sender == side {
                wake(&mut h.send_waker);
            } else {
                wake(&mut h.recv_waker);
            }
        }
    }

    /// Both ends are over: drop every buffer (errors stay, for the handles still around).
    fn teardown(&mut self) {
        self.torn_down = true;
        self.halves.clear();
        self.pipes = [VecDeque::new(), VecDeque::new()];
        self.pacers = Default::default();
        for s in &mut self.sides {
            s.tls = None;
            s.incoming_uni.clear();
            s.incoming_bi.clear();
        }
    }

    // ----- Connection -----

    /// Closes `side` on purpose: it sees `ClosedLocally`, its peer `ClosedByPeer`.
    pub(crate) fn close(&mut self, side: usize, code: u64, reason: String) {
        let s = &self.sides[side];
        if !s.exists || s.error.is_some() {
            return;
        }
        self.fail(side, TransportError::ClosedLocally);
        self.send(side, Event::Close { code, reason });
    }

    /// Waits until `side` is closed; why.
    pub(crate) fn poll_closed(
        &mut self,
        side: usize,
        cx: &mut Context<'_>,
    ) -> Poll<TransportError> {
        let s = &mut self.sides[side];
        match &s.error {
            Some(e) => Poll::Ready(e.clone()),
            None => {
                s.closed_waiters.register(cx.waker());
                Poll::Pending
            }
        }
    }

    /// The error `side` reports, if over.
    fn check(&self, side: usize) -> Result<(), TransportError> {
        match &self.sides[side].error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    // ----- Delivery -----

    /// Applies `event` at its receiving end `side`.
    fn deliver(&mut self, side: usize, event: Event) {
        match event {
            Event::Tls(bytes) => self.on_tls(side, bytes),
            // An end that is over (or not yet there) takes nothing more.
            _ if !self.sides[side].exists || self.sides[side].error.is_some() => {}
            Event::Close { code, reason } => {
                self.fail(side, TransportError::ClosedByPeer { code, reason })
            }
            event => self.on_stream_event(side, event),
        }
    }
}
