//! One in-memory connection: the state of both its ends, and the two one-way pipes between them.
//!
//! Everything one end tells the other — TLS records, stream data, end of stream, resets, stops,
//! flow-control credit, "read to the end" acknowledgements, the close — is an [`Event`] pushed
//! onto the pipe of its direction, stamped with the time it may arrive (now + the link's one-way
//! latency). [`Wire::pump`] delivers events in order, each pipe on its own: at once, by the
//! handle whose operation sent them, when the link is open and has no latency; otherwise by the
//! connection's [`drive`] task once they are due and the link is not cut. The driver also times
//! the connection out when its link stays cut (or its listener never answers) for longer than the
//! idle timeout.
//!
//! Both ends live under one mutex, so an event is never seen half-applied, and every handle
//! operation is a poll function that only changes state when it completes (or registers its
//! waker and changes nothing), which makes reads, accepts and opens cancel safe.
//!
//! The model is QUIC's, reduced to what the cluster relies on:
//! - stream ids as in RFC 9000 (initiator bit, direction bit, sequence);
//! - flow control by absolute limits, per stream and per connection, granted again by the
//!   reader as it consumes (when half a window has been consumed, as quinn does) and applied
//!   with `max`, so credit never goes backwards;
//! - a limit on concurrently open uni-streams, granted again one by one as streams end;
//! - a peer stream becomes visible to `accept` with the first event on it;
//! - `STOP_SENDING` is answered by an automatic reset; dropping a send stream finishes it, and
//!   dropping a receive stream not read to the end stops it with code 0 (as quinn does).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use rusm_cluster_core::rustls;
use rusm_cluster_core::rustls::pki_types::CertificateDer;
use rusm_cluster_core::transport::{TransportError, TransportTuning};
use rustls::AlertDescription;
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
    /// The sender abandoned its half of `id`.
    Reset { id: u64, code: u64 },
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

fn lost(reason: &str) -> TransportError {
    TransportError::ConnectionLost {
        reason: reason.to_string(),
    }
}

/// `CertificateRevoked` → `CERTIFICATE_REVOKED`, the RFC 8446 spelling.
fn alert_name(alert: AlertDescription) -> String {
    let debug = format!("{alert:?}");
    let mut out = String::with_capacity(debug.len() + 4);
    let mut prev_lower = false;
    for c in debug.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            out.push('_');
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Words a TLS failure the way both QUIC backends can be recognised by: the alert's name (as
/// s2n-quic prints it) and number (as quinn does), then rustls's own words.
fn handshake_error(e: &rustls::Error) -> TransportError {
    let reason = match e {
        rustls::Error::AlertReceived(alert) => format!(
            "rejected by peer: TLS alert {} (error {})",
            alert_name(*alert),
            u8::from(*alert)
        ),
        other => {
            // The alert rustls sends for it (its mapping for certificate errors).
            let alert = match other {
                rustls::Error::InvalidCertificate(c) => AlertDescription::from(c.clone()),
                rustls::Error::PeerMisbehaved(_) => AlertDescription::IllegalParameter,
                rustls::Error::NoApplicationProtocol => AlertDescription::NoApplicationProtocol,
                _ => AlertDescription::HandshakeFailure,
            };
            format!(
                "TLS alert {} (error {}): {other}",
                alert_name(alert),
                u8::from(alert)
            )
        }
    };
    TransportError::Handshake { reason }
}

/// Both ends of one connection and the pipes between them.
pub(crate) struct Wire {
    me: Weak<ConnInner>,
    addrs: [SocketAddr; 2],
    link: Arc<LinkCtl>,
    sides: [Side; 2],
    /// `pipes[from]`: events on their way from `from` to its peer, oldest first.
    pipes: [VecDeque<(Instant, Event)>; 2],
    /// Stream halves by (stream id, sending end).
    halves: HashMap<(u64, usize), Half>,
    started: Instant,
    /// Since when the client's first flight has been going nowhere (no listener).
    silent_since: Option<Instant>,
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
                halves: HashMap::new(),
                started: Instant::now(),
                silent_since: None,
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
            let state = *link.borrow_and_update();
            let mut w = conn.lock();
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
            let due = if state.cut { None } else { w.next_due() };
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

    fn send(&mut self, from: usize, event: Event) {
        let latency = self.link.latency();
        // With no latency the stamp only has to be in the past: the pipe is delivered in order,
        // so an event never overtakes one sent before it.
        let at = if latency.is_zero() {
            self.started
        } else {
            Instant::now() + latency
        };
        self.pipes[from].push_back((at, event));
    }

    /// Delivers what is due, then tears the connection down if both ends are over. Returns
    /// whether the driver must look (events wait, or the connection ended).
    fn settle(&mut self) -> bool {
        if !self.pipes[CLIENT].is_empty() || !self.pipes[SERVER].is_empty() {
            let state = self.link.state();
            self.pump_in(&state);
        }
        if self.over() {
            if !self.torn_down {
                self.teardown();
            }
            return true;
        }
        !self.pipes[CLIENT].is_empty() || !self.pipes[SERVER].is_empty()
    }

    /// Delivers every due event of both pipes, in order, unless the link is cut.
    fn pump_in(&mut self, state: &LinkState) {
        if state.cut {
            return;
        }
        let mut now = Instant::now();
        loop {
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

    fn next_due(&self) -> Option<Instant> {
        let a = self.pipes[CLIENT].front().map(|(at, _)| *at);
        let b = self.pipes[SERVER].front().map(|(at, _)| *at);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
        let cut = state.cut.then(|| state.cut_since.max(self.started) + idle);
        let silent = self.silent_since.map(|s| s + idle);
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
        for s in &mut self.sides {
            s.tls = None;
            s.incoming_uni.clear();
            s.incoming_bi.clear();
        }
    }

    // ----- Handshake -----

    /// Sends the client's first flight.
    pub(crate) fn start(&mut self) {
        let mut out = Vec::new();
        if let Some(tls) = self.sides[CLIENT].tls.as_mut() {
            while tls.wants_write() {
                if tls.write_tls(&mut out).is_err() {
                    break;
                }
            }
        }
        self.send(CLIENT, Event::Tls(out));
    }

    /// The client's first flight reached the server address: find the listener, and create the
    /// server end with its TLS configuration. `false` if nobody listens there.
    fn arrive(&mut self) -> bool {
        let Some(me) = self.me.upgrade() else {
            return false;
        };
        let Some((config, tuning)) = crate::arrive(&me, self.addrs[SERVER], self.addrs[CLIENT])
        else {
            self.silent_since.get_or_insert_with(Instant::now);
            return false;
        };
        let limits = Limits::from(&tuning);
        let client = &mut self.sides[CLIENT];
        client.conn_max = limits.conn_window;
        client.uni_max = limits.max_uni;
        let (client_conn, client_uni) = (client.limits.conn_window, client.limits.max_uni);
        match rustls::ServerConnection::new(config) {
            Ok(tls) => {
                let mut server = Side::new(limits, Some(tls.into()), true);
                server.conn_max = client_conn;
                server.uni_max = client_uni;
                self.sides[SERVER] = server;
                true
            }
            Err(e) => {
                self.sides[SERVER] = Side::new(limits, None, true);
                self.fail(SERVER, handshake_error(&e));
                false
            }
        }
    }

    /// TLS records reached `side`: feed them to its rustls connection, send what it answers, and
    /// note the end of its handshake or its failure.
    fn on_tls(&mut self, side: usize, bytes: Vec<u8>) {
        if side == SERVER && !self.sides[SERVER].exists && !self.arrive() {
            return;
        }
        let s = &mut self.sides[side];
        if s.error.is_some() {
            return;
        }
        let Some(tls) = s.tls.as_mut() else {
            return;
        };
        let mut input = &bytes[..];
        let mut failed = None;
        while !input.is_empty() {
            match tls.read_tls(&mut input) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    failed = Some(TransportError::Handshake {
                        reason: format!("TLS records refused: {e}"),
                    });
                    break;
                }
            }
            if let Err(e) = tls.process_new_packets() {
                failed = Some(handshake_error(&e));
                break;
            }
        }
        let mut out = Vec::new();
        while tls.wants_write() {
            if tls.write_tls(&mut out).is_err() {
                break;
            }
        }
        let finished = !tls.is_handshaking();
        let leaf = tls
            .peer_certificates()
            .and_then(|chain| chain.first())
            .cloned();
        if !out.is_empty() {
            self.send(side, Event::Tls(out));
        }
        let s = &mut self.sides[side];
        match failed {
            Some(error) => {
                tracing::debug!(side, %error, "in-memory TLS handshake failed");
                self.fail(side, error);
            }
            None if finished && !s.handshaken => {
                s.handshaken = true;
                s.peer_leaf = leaf;
                s.handshake_waiters.wake();
            }
            None => {}
        }
    }

    /// Waits until `side`'s handshake finished; its peer's leaf certificate.
    pub(crate) fn poll_handshake(
        &mut self,
        side: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Result<CertificateDer<'static>, TransportError>> {
        let s = &mut self.sides[side];
        if let Some(e) = &s.error {
            return Poll::Ready(Err(e.clone()));
        }
        if s.handshaken {
            return Poll::Ready(
                s.peer_leaf
                    .clone()
                    .ok_or_else(|| TransportError::Handshake {
                        reason: "peer presented no certificate".into(),
                    }),
            );
        }
        s.handshake_waiters.register(cx.waker());
        Poll::Pending
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

    // ----- Opening and accepting streams -----

    /// Opens a uni-stream once the peer's stream limit allows; its id.
    pub(crate) fn poll_open_uni(
        &mut self,
        side: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Result<u64, TransportError>> {
        self.check(side)?;
        let window = self.sides[peer_of(side)].limits.stream_window;
        let s = &mut self.sides[side];
        if s.uni_opened >= s.uni_max {
            s.open_uni_waiters.register(cx.waker());
            return Poll::Pending;
        }
        let id = (s.uni_opened << 2) | 0b10 | side as u64;
        s.uni_opened += 1;
        self.halves.insert((id, side), Half::new(true, window));
        Poll::Ready(Ok(id))
    }

    /// Opens a bidirectional stream; its id.
    pub(crate) fn open_bi(&mut self, side: usize) -> Result<u64, TransportError> {
        self.check(side)?;
        let peer_window = self.sides[peer_of(side)].limits.stream_window;
        let own_window = self.sides[side].limits.stream_window;
        let s = &mut self.sides[side];
        let id = (s.bi_opened << 2) | side as u64;
        s.bi_opened += 1;
        self.halves
            .insert((id, side), Half::new(false, peer_window));
        self.halves
            .insert((id, peer_of(side)), Half::new(false, own_window));
        Ok(id)
    }

    /// The next uni-stream the peer opened; `None` when the connection closed gracefully.
    pub(crate) fn poll_accept_uni(
        &mut self,
        side: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<u64>, TransportError>> {
        let s = &mut self.sides[side];
        match &s.error {
            // A graceful close is "no more streams", as the QUIC backends report it.
            Some(TransportError::ClosedByPeer { code: 0, .. })
            | Some(TransportError::ClosedLocally) => return Poll::Ready(Ok(None)),
            Some(e) => return Poll::Ready(Err(e.clone())),
            None => {}
        }
        match s.incoming_uni.pop_front() {
            Some(id) => Poll::Ready(Ok(Some(id))),
            None => {
                s.accept_uni_waiters.register(cx.waker());
                Poll::Pending
            }
        }
    }

    /// The next bidirectional stream the peer opened.
    pub(crate) fn poll_accept_bi(
        &mut self,
        side: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Result<u64, TransportError>> {
        self.check(side)?;
        let s = &mut self.sides[side];
        match s.incoming_bi.pop_front() {
            Some(id) => Poll::Ready(Ok(id)),
            None => {
                s.accept_bi_waiters.register(cx.waker());
                Poll::Pending
            }
        }
    }

    // ----- Sending -----

    /// Writes as much of `data` as credit allows; ready once all of it is written.
    pub(crate) fn poll_write(
        &mut self,
        side: usize,
        id: u64,
        data: &mut Bytes,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), TransportError>> {
        self.check(side)?;
        while !data.is_empty() {
            let s = &mut self.sides[side];
            let Some(h) = self.halves.get_mut(&(id, side)) else {
                return Poll::Ready(Err(lost("unknown stream")));
            };
            if let Some(code) = h.stopped {
                return Poll::Ready(Err(TransportError::StreamStopped { code }));
            }
            if h.fin || h.reset {
                return Poll::Ready(Err(lost("write on a finished or reset stream")));
            }
            let stream_credit = h.max - h.written;
            let conn_credit = s.conn_max - s.conn_sent;
            let credit = stream_credit.min(conn_credit);
            if credit == 0 {
                h.send_waker = Some(cx.waker().clone());
                if conn_credit == 0 {
                    s.conn_credit_waiters.insert(id, cx.waker().clone());
                }
                return Poll::Pending;
            }
            let n = usize::try_from(credit)
                .unwrap_or(usize::MAX)
                .min(data.len());
            let chunk = if n == data.len() {
                std::mem::take(data)
            } else {
                data.split_to(n)
            };
            h.written += n as u64;
            s.conn_sent += n as u64;
            s.conn_credit_waiters.remove(&id);
            self.send(side, Event::Data { id, chunk });
        }
        Poll::Ready(Ok(()))
    }

    /// Ends the stream: the reader gets end of stream after the data.
    pub(crate) fn finish(&mut self, side: usize, id: u64) -> Result<(), TransportError> {
        self.check(side)?;
        let Some(h) = self.halves.get_mut(&(id, side)) else {
            return Err(lost("unknown stream"));
        };
        if h.stopped.is_some() {
            // Harmless, as on quinn: `delivered` tells of the stop.
            return Ok(());
        }
        if h.fin || h.reset {
            return Err(lost("stream already finished or reset"));
        }
        h.fin = true;
        self.send(side, Event::Fin { id });
        Ok(())
    }

    /// Abandons the stream with `code`.
    pub(crate) fn reset(&mut self, side: usize, id: u64, code: u64) {
        if self.check(side).is_err() {
            return;
        }
        let Some(h) = self.halves.get_mut(&(id, side)) else {
            return;
        };
        if h.reset || h.acked || h.stopped.is_some() {
            return;
        }
        h.reset = true;
        self.send(side, Event::Reset { id, code });
    }

    /// Waits until the reader has read everything, end of stream included.
    pub(crate) fn poll_delivered(
        &mut self,
        side: usize,
        id: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), TransportError>> {
        let Some(h) = self.halves.get_mut(&(id, side)) else {
            self.check(side)?;
            return Poll::Ready(Err(lost("unknown stream")));
        };
        if h.acked {
            return Poll::Ready(Ok(()));
        }
        if let Some(code) = h.stopped {
            return Poll::Ready(Err(TransportError::StreamStopped { code }));
        }
        if h.reset {
            return Poll::Ready(Err(lost("stream was reset")));
        }
        h.send_waker = Some(cx.waker().clone());
        self.check(side)?;
        Poll::Pending
    }

    /// The send stream's handle is gone: finish it if nothing else ended it (as quinn does).
    pub(crate) fn drop_send(&mut self, side: usize, id: u64) {
        let Some(h) = self.halves.get_mut(&(id, side)) else {
            return;
        };
        h.send_dropped = true;
        h.send_waker = None;
        self.sides[side].conn_credit_waiters.remove(&id);
        if self.sides[side].error.is_none() && h.stopped.is_none() && !h.fin && !h.reset {
            h.fin = true;
            self.send(side, Event::Fin { id });
        }
        self.maybe_remove((id, side));
    }

    // ----- Receiving -----

    /// The next chunk of the peer's half of stream `id`, `None` at its end.
    pub(crate) fn poll_read(
        &mut self,
        side: usize,
        id: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, TransportError>> {
        self.check(side)?;
        let key = (id, peer_of(side));
        let Some(h) = self.halves.get_mut(&key) else {
            return Poll::Ready(Err(lost("unknown stream")));
        };
        if let Some(code) = h.reset_received {
            return Poll::Ready(Err(TransportError::StreamReset { code }));
        }
        if h.stopped_here {
            return Poll::Ready(Err(lost("read on a stopped stream")));
        }
        if let Some(chunk) = h.queue.pop_front() {
            self.consumed(side, key, chunk.len() as u64);
            return Poll::Ready(Ok(Some(chunk)));
        }
        if h.fin_received {
            if !h.done {
                self.send(side, Event::Acked { id });
                self.stream_done(side, key);
            }
            return Poll::Ready(Ok(None));
        }
        h.recv_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Asks the sender to stop; unread data is discarded.
    pub(crate) fn stop(&mut self, side: usize, id: u64, code: u64) {
        if self.check(side).is_err() {
            return;
        }
        let key = (id, peer_of(side));
        let Some(h) = self.halves.get_mut(&key) else {
            return;
        };
        if h.done || h.stopped_here {
            return;
        }
        h.stopped_here = true;
        h.recv_waker = None;
        let fin = h.fin_received;
        self.discard(side, key);
        self.send(side, Event::Stop { id, code });
        if fin {
            self.stream_done(side, key);
        }
    }

    /// The receive stream's handle is gone: stop it with code 0 unless it was read to the end
    /// (as quinn does).
    pub(crate) fn drop_recv(&mut self, side: usize, id: u64) {
        let key = (id, peer_of(side));
        let Some(h) = self.halves.get_mut(&key) else {
            return;
        };
        h.recv_dropped = true;
        h.recv_waker = None;
        if !h.done && !h.stopped_here {
            self.stop(side, id, 0);
        }
        self.maybe_remove(key);
    }

    /// `n` bytes of `key` were consumed by `side`: grant credit again when half a window was.
    fn consumed(&mut self, side: usize, key: (u64, usize), n: u64) {
        let window = self.sides[side].limits.stream_window;
        if let Some(h) = self.halves.get_mut(&key) {
            h.read += n;
            let max = h.read + window;
            if !h.fin_received && max - h.max_adv >= (window / 2).max(1) {
                h.max_adv = max;
                self.send(side, Event::MaxStreamData { id: key.0, max });
            }
        }
        self.consumed_conn(side, n);
    }

    fn consumed_conn(&mut self, side: usize, n: u64) {
        if n == 0 {
            return;
        }
        let s = &mut self.sides[side];
        s.conn_read += n;
        let max = s.conn_read + s.limits.conn_window;
        if max - s.conn_max_adv >= (s.limits.conn_window / 2).max(1) {
            s.conn_max_adv = max;
            self.send(side, Event::MaxData { max });
        }
    }

    /// Drops what `key` holds unread, giving its connection credit back.
    fn discard(&mut self, side: usize, key: (u64, usize)) {
        let Some(h) = self.halves.get_mut(&key) else {
            return;
        };
        let n: u64 = h.queue.drain(..).map(|c| c.len() as u64).sum();
        h.read += n;
        self.consumed_conn(side, n);
    }

    /// The stream is over for its receiver `side`: its uni-stream credit goes back to the peer.
    fn stream_done(&mut self, side: usize, key: (u64, usize)) {
        let Some(h) = self.halves.get_mut(&key) else {
            return;
        };
        if h.done {
            return;
        }
        h.done = true;
        let uni = h.uni;
        self.discard(side, key);
        if uni {
            let s = &mut self.sides[side];
            s.uni_max_adv += 1;
            let max = s.uni_max_adv;
            self.send(side, Event::MaxUniStreams { max });
        }
        self.maybe_remove(key);
    }

    fn maybe_remove(&mut self, key: (u64, usize)) {
        if self
            .halves
            .get(&key)
            .is_some_and(|h| h.done && h.send_dropped && h.recv_dropped)
        {
            self.halves.remove(&key);
        }
    }

    /// Makes a peer stream visible to `accept` on its first event.
    fn reveal(&mut self, side: usize, key: (u64, usize)) {
        let Some(h) = self.halves.get_mut(&key) else {
            return;
        };
        if h.visible {
            return;
        }
        h.visible = true;
        let s = &mut self.sides[side];
        if h.uni {
            s.incoming_uni.push_back(key.0);
            s.accept_uni_waiters.wake();
        } else {
            s.incoming_bi.push_back(key.0);
            s.accept_bi_waiters.wake();
        }
    }

    // ----- Delivery -----

    /// Applies `event` at its receiving end `side`.
    fn deliver(&mut self, side: usize, event: Event) {
        if let Event::Tls(bytes) = event {
            return self.on_tls(side, bytes);
        }
        if !self.sides[side].exists || self.sides[side].error.is_some() {
            return;
        }
        let peer = peer_of(side);
        match event {
            Event::Tls(_) => {}
            Event::Data { id, chunk } => {
                let key = (id, peer);
                self.reveal(side, key);
                match self.halves.get_mut(&key) {
                    Some(h) if !h.done && !h.stopped_here => {
                        h.queue.push_back(chunk);
                        wake(&mut h.recv_waker);
                    }
                    // Stopped or gone: dropped, its connection credit given back.
                    _ => self.consumed_conn(side, chunk.len() as u64),
                }
            }
            Event::Fin { id } => {
                let key = (id, peer);
                self.reveal(side, key);
                let Some(h) = self.halves.get_mut(&key) else {
                    return;
                };
                h.fin_received = true;
                wake(&mut h.recv_waker);
                if h.stopped_here {
                    self.stream_done(side, key);
                }
            }
            Event::Reset { id, code } => {
                let key = (id, peer);
                self.reveal(side, key);
                let Some(h) = self.halves.get_mut(&key) else {
                    return;
                };
                if h.done {
                    return;
                }
                if !h.stopped_here {
                    h.reset_received = Some(code);
                }
                wake(&mut h.recv_waker);
                self.stream_done(side, key);
            }
            Event::Stop { id, code } => {
                let Some(h) = self.halves.get_mut(&(id, side)) else {
                    return;
                };
                if h.stopped.is_some() {
                    return;
                }
                h.stopped = Some(code);
                wake(&mut h.send_waker);
                // STOP_SENDING is answered with RESET_STREAM (RFC 9000 §3.5).
                if !h.reset && !h.acked {
                    h.reset = true;
                    self.send(side, Event::Reset { id, code });
                }
            }
            Event::MaxStreamData { id, max } => {
                if let Some(h) = self.halves.get_mut(&(id, side)) {
                    if max > h.max {
                        h.max = max;
                        wake(&mut h.send_waker);
                    }
                }
            }
            Event::MaxData { max } => {
                let s = &mut self.sides[side];
                if max > s.conn_max {
                    s.conn_max = max;
                    for (_, w) in s.conn_credit_waiters.drain() {
                        w.wake();
                    }
                }
            }
            Event::MaxUniStreams { max } => {
                let s = &mut self.sides[side];
                if max > s.uni_max {
                    s.uni_max = max;
                    s.open_uni_waiters.wake();
                }
            }
            Event::Acked { id } => {
                let key = (id, side);
                if let Some(h) = self.halves.get_mut(&key) {
                    h.acked = true;
                    wake(&mut h.send_waker);
                }
                self.maybe_remove(key);
            }
            Event::Close { code, reason } => {
                self.fail(side, TransportError::ClosedByPeer { code, reason });
            }
        }
    }
}
