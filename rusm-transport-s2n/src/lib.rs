//! [`S2nTransport`]: the RUSM cluster [`Transport`] over s2n-quic 1.x with its rustls provider.
//!
//! s2n-quic keeps accepting and dialling apart (a `Server` and a `Client` endpoint, s2n-quic
//! issue #1607), so one [`S2nTransport`] holds both: the server bound to the listen address, the
//! client to port 0 of the same IP. TLS comes from the core's one policy
//! ([`rusm_cluster_core::tls`]), handed to s2n-quic through its rustls provider unchanged; this
//! crate only adapts s2n-quic's types and errors, and applies the core's [`TransportTuning`]
//! (stream credit, windows, keep-alive) on both endpoints.
//!
//! s2n-quic exposes per-connection facts through an event subscriber rather than on the
//! connection, so one subscriber per endpoint records, for each connection:
//! - the peer's certificate chain (read after the handshake to build the [`PeerIdentity`]);
//! - the reason phrase of the CONNECTION_CLOSE the peer sent;
//! - why the connection closed, which [`S2nConnection`]'s `closed()` waits for (s2n-quic has no
//!   `closed()` future of its own);
//! - the smoothed round-trip time;
//! - incoming connections that failed their handshake, which s2n-quic's server never yields:
//!   [`accept`](rusm_cluster_core::transport::Transport::accept) reports them as a failed
//!   `Incoming`, as quinn does, so the cluster can count refused peers.
//!
//! s2n-quic's `close()` takes only a code. The reason given to [`Connection::close`] reaches the
//! peer through a connection-close formatter (s2n-quic's unstable provider) that writes it into
//! the CONNECTION_CLOSE frame. Until this endpoint has completed the handshake the peer is not
//! authenticated, so no text of ours reaches it: a refused peer learns the error code (for a TLS
//! rejection, the alert, such as `CERTIFICATE_REVOKED` or `UNKNOWN_CA`) with the fixed reason
//! [`PRE_HANDSHAKE_REASON`], never s2n-quic's or rustls's own error text. Reasons longer than 512
//! bytes are cut; an application close sent before the handshake is confirmed carries no reason
//! (RFC 9000 §10.2.3).
//!
//! ```
//! use rusm_cluster_core::identity::ClusterCa;
//! use rusm_cluster_core::transport::{EndpointConfig, Transport, TransportTuning};
//! use rusm_transport_s2n::S2nTransport;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let ca = ClusterCa::generate("doc").unwrap();
//! let t = S2nTransport::bind(EndpointConfig {
//!     live_trust: None,
//!     identity: ca.issue("london").unwrap(),
//!     trust: ca.trust(),
//!     listen: "127.0.0.1:0".parse().unwrap(),
//!     tuning: TransportTuning::default(),
//! })
//! .unwrap();
//! assert_ne!(t.local_addr().unwrap().port(), 0);
//! # }
//! ```
//!
//! [`Transport`]: rusm_cluster_core::transport::Transport
//! [`Connection::close`]: rusm_cluster_core::transport::Connection::close

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use rusm_cluster_core::identity::PeerIdentity;
use rusm_cluster_core::rustls::pki_types::CertificateDer;
use rusm_cluster_core::tls;
use rusm_cluster_core::transport::{self as core, EndpointConfig, TransportError, TransportTuning};
use s2n_quic::client::Connect;
use s2n_quic::connection::error::Code;
use s2n_quic::connection::{
    BidirectionalStreamAcceptor, Error as ConnError, ReceiveStreamAcceptor,
};
use s2n_quic::provider::connection_close_formatter::{
    ConnectionClose, Context as CloseContext, Development, Formatter, Production,
};
use s2n_quic::provider::endpoint_limits::{self, ConnectionAttempt, Limiter, Outcome};
use s2n_quic::provider::event::{events, ConnectionInfo, ConnectionMeta, Subscriber};
use s2n_quic::provider::limits::Limits;
use s2n_quic::provider::tls::rustls as s2n_rustls;
use tokio::sync::{mpsc, watch};

/// The longest close reason sent. A CONNECTION_CLOSE frame cannot be split across packets, and
/// the smallest QUIC packet is 1200 bytes; longer reasons are cut at a character boundary.
const MAX_REASON: usize = 512;

/// The only reason phrase sent with a TLS (CRYPTO_ERROR) close before this endpoint completed
/// the handshake. The peer is not authenticated yet, so it learns the alert code and this, never
/// the internal error text (other transport errors before the handshake go with no reason).
pub const PRE_HANDSHAKE_REASON: &str = "handshake failed";

/// How many refused handshakes wait for `accept` before further ones go unreported.
const REFUSED_BACKLOG: usize = 64;

/// An s2n-quic server and client endpoint bound with the node's identity and trust.
pub struct S2nTransport {
    /// `None` once closed (dropping the server stops accepting).
    listener: tokio::sync::Mutex<Option<Listener>>,
    client: s2n_quic::Client,
    local_addr: SocketAddr,
    closing: watch::Sender<bool>,
    registry: Arc<Registry>,
}

/// The accepting side: s2n-quic's server, and the handshakes it refused (which s2n-quic never
/// yields; `accept` reports them as failed `Incoming`s, as quinn's do).
struct Listener {
    server: s2n_quic::Server,
    refused: mpsc::Receiver<TransportError>,
}

impl fmt::Debug for S2nTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S2nTransport")
            .field("local_addr", &self.local_addr)
            .field("client_addr", &self.client.local_addr().ok())
            .field("closing", &*self.closing.borrow())
            .finish()
    }
}

fn limits(t: &TransportTuning) -> Result<Limits, TransportError> {
    let bad = |what: &'static str| {
        move |e: s2n_quic_core::transport::parameters::ValidationError| TransportError::Setup {
            reason: format!("{what}: {e}"),
        }
    };
    let uni = u64::from(t.max_concurrent_uni_streams);
    let stream_window = u64::from(t.stream_receive_window);
    Limits::new()
        .with_max_open_remote_unidirectional_streams(uni)
        .map_err(bad("max_concurrent_uni_streams"))?
        .with_max_open_local_unidirectional_streams(uni)
        .map_err(bad("max_concurrent_uni_streams"))?
        // One control stream per link; a few spare for future protocols.
        .with_max_open_local_bidirectional_streams(8)
        .map_err(bad("bidirectional streams"))?
        .with_max_open_remote_bidirectional_streams(8)
        .map_err(bad("bidirectional streams"))?
        .with_data_window(u64::from(t.connection_receive_window))
        .map_err(bad("connection_receive_window"))?
        .with_unidirectional_data_window(stream_window)
        .map_err(bad("stream_receive_window"))?
        .with_bidirectional_local_data_window(stream_window)
        .map_err(bad("stream_receive_window"))?
        .with_bidirectional_remote_data_window(stream_window)
        .map_err(bad("stream_receive_window"))?
        .with_max_idle_timeout(t.idle_timeout)
        .map_err(bad("idle_timeout"))?
        .with_max_keep_alive_period(t.keep_alive_interval)
        .map_err(bad("keep_alive_interval"))
}

/// Handshakes an s2n server runs at once; attempts past that are dropped unanswered. s2n-quic
/// completes every TLS handshake before the node sees the connection (so the node's own bound
/// on pending handshakes cannot refuse a flood early, as it does on quinn): without this, a
/// flood of 10,000 connections made the endpoint run handshakes back to back, and an
/// established link's answers waited up to 166 ms behind them.
const MAX_INFLIGHT_HANDSHAKES: usize = 64;

/// Drops connection attempts while [`MAX_INFLIGHT_HANDSHAKES`] are in progress; otherwise
/// defers to s2n-quic's default limits.
struct HandshakeLimit {
    max: usize,
    others: endpoint_limits::Default,
}

impl Limiter for HandshakeLimit {
    fn on_connection_attempt(&mut self, info: &ConnectionAttempt) -> Outcome {
        if info.inflight_handshakes >= self.max {
            return Outcome::drop();
        }
        self.others.on_connection_attempt(info)
    }
}

impl core::Transport for S2nTransport {
    type Connection = S2nConnection;
    /// s2n-quic's server yields connections whose handshake is already done, so this future is
    /// ready at once. A handshake that failed (refused certificate, timeout) is reported too, as
    /// a ready `Err`, though s2n-quic itself never yields it.
    type Incoming = Pin<Box<dyn Future<Output = Result<S2nConnection, TransportError>> + Send>>;
    const NAME: &'static str = "s2n";

    fn bind(config: EndpointConfig) -> Result<Self, TransportError> {
        let limits = limits(&config.tuning)?;
        let live = config.trust_handle().map_err(TransportError::setup)?;
        let server_tls =
            tls::server_config_live(&config.identity, &live).map_err(TransportError::setup)?;
        let client_tls =
            tls::client_config_live(&config.identity, &live).map_err(TransportError::setup)?;

        // Each endpoint gets its own slot: the subscriber and the formatter that share it must
        // run on the same endpoint task (see `ReasonFormatter`).
        let slot = Arc::new(CloseSlot::default());
        let (refused_tx, refused) = mpsc::channel(REFUSED_BACKLOG);
        let server = s2n_quic::Server::builder()
            .with_tls(s2n_rustls::Server::from(server_tls))
            .map_err(TransportError::setup)?
            .with_io(io(config.listen, &config.tuning)?)
            .map_err(TransportError::setup)?
            .with_limits(limits)
            .map_err(TransportError::setup)?
            .with_endpoint_limits(HandshakeLimit {
                max: MAX_INFLIGHT_HANDSHAKES,
                others: endpoint_limits::Default::default(),
            })
            .map_err(TransportError::setup)?
            .with_event(Events {
                slot: slot.clone(),
                refused: Some(refused_tx),
            })
            .map_err(TransportError::setup)?
            .with_connection_close_formatter(ReasonFormatter { slot })
            .map_err(TransportError::setup)?
            .start()
            .map_err(TransportError::setup)?;
        let local_addr = server.local_addr().map_err(TransportError::setup)?;

        let slot = Arc::new(CloseSlot::default());
        let client = s2n_quic::Client::builder()
            .with_tls(s2n_rustls::Client::from(client_tls))
            .map_err(TransportError::setup)?
            .with_io(io(SocketAddr::new(config.listen.ip(), 0), &config.tuning)?)
            .map_err(TransportError::setup)?
            .with_connection_id(client_connection_ids())
            .map_err(TransportError::setup)?
            .with_limits(limits)
            .map_err(TransportError::setup)?
            .with_event(Events {
                slot: slot.clone(),
                refused: None,
            })
            .map_err(TransportError::setup)?
            .with_connection_close_formatter(ReasonFormatter { slot })
            .map_err(TransportError::setup)?
            .start()
            .map_err(TransportError::setup)?;

        Ok(S2nTransport {
            listener: tokio::sync::Mutex::new(Some(Listener { server, refused })),
            client,
            local_addr,
            closing: watch::Sender::new(false),
            registry: Arc::default(),
        })
    }

    fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.local_addr)
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<S2nConnection, TransportError> {
        if *self.closing.borrow() {
            return Err(TransportError::Connect {
                reason: "endpoint closed".into(),
            });
        }
        // The subscriber reports the close into this channel, so a dial refused before
        // `connect` returns still learns the peer's reason phrase (the error alone lacks it).
        let (closed_tx, closed_rx) = watch::channel(None);
        let mut attempt = self
            .client
            .connect(Connect::new(addr).with_server_name(server_name));
        attempt.set_application_context(Box::new(DialContext(Mutex::new(Some(closed_tx)))));
        match attempt.await {
            Ok(conn) => S2nConnection::new(conn, &self.registry),
            Err(e) => Err(closed_or(&closed_rx, e)),
        }
    }

    async fn accept(&self) -> Option<Self::Incoming> {
        let mut listener = self.listener.lock().await;
        let mut closing = self.closing.subscribe();
        let mut closing = pin!(closing.wait_for(|closed| *closed));
        let result = std::future::poll_fn(|cx| {
            let Some(l) = listener.as_mut() else {
                return Poll::Ready(None);
            };
            if closing.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            if let Poll::Ready(Some(refused)) = l.refused.poll_recv(cx) {
                return Poll::Ready(Some(Err(refused)));
            }
            l.server.poll_accept(cx).map(|conn| conn.map(Ok))
        })
        .await;
        let Some(result) = result else {
            // Closed (or the endpoint stopped): stop accepting for good.
            *listener = None;
            return None;
        };
        let result = result.and_then(|conn| S2nConnection::new(conn, &self.registry));
        Some(Box::pin(std::future::ready(result)))
    }

    fn close(&self) {
        self.closing.send_replace(true);
        // An `accept` in progress holds the lock; it sees `closing` and drops the server itself.
        if let Ok(mut listener) = self.listener.try_lock() {
            *listener = None;
        }
        self.registry.close_all();
    }
}

/// The connections of one transport, so that closing the transport closes them all. Weak: a
/// connection the cluster dropped is not kept alive here.
#[derive(Default)]
struct Registry {
    closed: AtomicBool,
    conns: Mutex<Vec<Weak<ConnInner>>>,
}

impl Registry {
    fn add(&self, conn: &Arc<ConnInner>) -> Result<(), TransportError> {
        let mut conns = lock(&self.conns);
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::ClosedLocally);
        }
        // Forget dropped connections now and then, so the list stays about as long as the live
        // set (amortised O(1) per connection).
        if conns.len() >= 64 && conns.len().is_power_of_two() {
            conns.retain(|c| c.strong_count() > 0);
        }
        conns.push(Arc::downgrade(conn));
        Ok(())
    }

    fn close_all(&self) {
        let conns = {
            let mut conns = lock(&self.conns);
            self.closed.store(true, Ordering::Release);
            std::mem::take(&mut *conns)
        };
        for conn in conns.iter().filter_map(Weak::upgrade) {
            conn.close(core::close_code::NORMAL, b"endpoint closed");
        }
    }
}

/// The client's connection IDs: s2n-quic's default format, without rotating the handshake's
/// connection ID.
///
/// With rotation on, an s2n-quic client switches to the listener's next connection ID as soon as
/// a NEW_CONNECTION_ID frame arrives, even before the handshake is done, and from then on drops
/// every long-header packet still carrying the handshake's ID as `InvalidSourceConnectionId`.
/// quinn issues new IDs in its first 1-RTT packets and sends its CONNECTION_CLOSE in Handshake
/// packets, so a dialler refused by a quinn listener (untrusted or revoked certificate) often
/// never saw why: it learnt of the refusal only from a stateless reset a second later. Without
/// rotation the handshake's ID stays valid (it is retired when the connection ends), which costs
/// only the unlinkability of handshake and later packets to an on-path observer, who sees the
/// same addresses anyway.
fn client_connection_ids() -> s2n_quic::provider::connection_id::default::Format {
    let builder = s2n_quic::provider::connection_id::default::Format::builder();
    match builder
        .with_handshake_connection_id_rotation(false)
        .and_then(|b| b.build())
    {
        Ok(format) => format,
        Err(never) => match never {},
    }
}

/// The UDP socket of one endpoint, with the buffer sizes of the tuning.
fn io(
    addr: SocketAddr,
    tuning: &TransportTuning,
) -> Result<s2n_quic::provider::io::tokio::Provider, TransportError> {
    let mut b = s2n_quic::provider::io::tokio::Builder::default()
        .with_receive_address(addr)
        .map_err(TransportError::setup)?;
    if let Some(n) = tuning.socket_buffer_bytes {
        b = b
            .with_recv_buffer_size(n)
            .map_err(TransportError::setup)?
            .with_send_buffer_size(n)
            .map_err(TransportError::setup)?;
    }
    b.build().map_err(TransportError::setup)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An s2n-quic connection whose peer certificate was verified.
#[derive(Clone)]
pub struct S2nConnection {
    inner: Arc<ConnInner>,
}

struct ConnInner {
    handle: s2n_quic::connection::Handle,
    bidi: tokio::sync::Mutex<BidirectionalStreamAcceptor>,
    uni: tokio::sync::Mutex<ReceiveStreamAcceptor>,
    peer: PeerIdentity,
    remote: SocketAddr,
    shared: Arc<Shared>,
    closed: watch::Receiver<Option<TransportError>>,
}

impl ConnInner {
    fn close(&self, code: u32, reason: &[u8]) {
        let mut end = reason.len().min(MAX_REASON);
        // Cut at a UTF-8 character boundary (continuation bytes are 0b10xx_xxxx).
        while end < reason.len() && end > 0 && reason[end] & 0xc0 == 0x80 {
            end -= 1;
        }
        *lock(&self.shared.local_close) = Some(LocalClose {
            code: u64::from(code),
            reason: reason[..end].into(),
        });
        self.handle.close(code.into());
    }
}

impl fmt::Debug for S2nConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S2nConnection")
            .field("id", &self.inner.handle.id())
            .field("peer", &self.inner.peer.dns_names)
            .field("remote", &self.inner.remote)
            .finish()
    }
}

impl S2nConnection {
    fn new(
        mut conn: s2n_quic::Connection,
        registry: &Registry,
    ) -> Result<S2nConnection, TransportError> {
        let (chain, shared, closed) = conn
            .query_event_context(|ctx: &ConnContext| {
                (
                    ctx.peer_chain.clone(),
                    ctx.shared.clone(),
                    ctx.closed.subscribe(),
                )
            })
            .map_err(|e| TransportError::ConnectionLost {
                reason: format!("connection state unavailable: {e}"),
            })?;
        let leaf = chain
            .and_then(|chain| chain.into_iter().next())
            .ok_or_else(|| TransportError::Handshake {
                reason: "peer presented no certificate".into(),
            })?;
        let peer = PeerIdentity::from_leaf(CertificateDer::from(leaf)).map_err(|e| {
            TransportError::Handshake {
                reason: e.to_string(),
            }
        })?;
        // The connection may already be closed (a dialler refused just after its side of the
        // handshake): report that close, with the peer's reason.
        let remote = conn.remote_addr().map_err(|e| closed_or(&closed, e))?;
        // s2n-quic sends keep-alives only when asked, at the Limits' max_keep_alive_period.
        conn.keep_alive(true).map_err(|e| closed_or(&closed, e))?;
        let (handle, acceptor) = conn.split();
        let (bidi, uni) = acceptor.split();
        let inner = Arc::new(ConnInner {
            handle,
            bidi: tokio::sync::Mutex::new(bidi),
            uni: tokio::sync::Mutex::new(uni),
            peer,
            remote,
            shared,
            closed,
        });
        if let Err(e) = registry.add(&inner) {
            inner.close(core::close_code::NORMAL, b"endpoint closed");
            return Err(e);
        }
        Ok(S2nConnection { inner })
    }

    /// The classified error for a failed operation: why the connection closed when the event
    /// subscriber already knows (it has the peer's reason phrase), else `e` alone.
    fn err(&self, e: ConnError) -> TransportError {
        closed_or(&self.inner.closed, e)
    }

    /// After an acceptor said the connection is over: the recorded close, classified.
    fn ended(&self, e: Option<ConnError>) -> TransportError {
        match (self.inner.closed.borrow().clone(), e) {
            (Some(why), _) => why,
            (None, Some(e)) => conn_err(e),
            (None, None) => TransportError::ConnectionLost {
                reason: "connection closed".into(),
            },
        }
    }
}

fn closed_or(closed: &watch::Receiver<Option<TransportError>>, e: ConnError) -> TransportError {
    closed.borrow().clone().unwrap_or_else(|| conn_err(e))
}

/// Whether a close is what the trait calls graceful (`accept_uni` then reports `Ok(None)`), as
/// quinn's backend decides it: a local close, or a peer's application close with code NORMAL.
fn is_graceful(e: &TransportError) -> bool {
    match e {
        TransportError::ClosedLocally => true,
        TransportError::ClosedByPeer { code, .. } => *code == u64::from(core::close_code::NORMAL),
        _ => false,
    }
}

/// TLS alerts travel as CRYPTO_ERROR codes 0x100–0x1ff.
fn is_crypto(code: Code) -> bool {
    (0x100..=0x1ff).contains(&code.as_u64())
}

/// Classifies s2n-quic's connection errors. `peer_reason` is the reason phrase of the
/// CONNECTION_CLOSE the peer sent, which s2n-quic keeps out of its error (only the event
/// subscriber sees it).
fn classify(e: ConnError, peer_reason: Option<&[u8]>) -> TransportError {
    let peer_reason = peer_reason
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .unwrap_or_default();
    match e {
        ConnError::Application {
            error, initiator, ..
        } if initiator.is_remote() => TransportError::ClosedByPeer {
            code: error.into(),
            reason: peer_reason,
        },
        ConnError::Application { .. } => TransportError::ClosedLocally,
        // s2n-quic closes with NO_ERROR when the peer dropped its connection; quinn sends an
        // application close with code 0 in that case, so both read the same.
        ConnError::Closed { initiator, .. } if initiator.is_remote() => {
            TransportError::ClosedByPeer {
                code: u64::from(core::close_code::NORMAL),
                reason: peer_reason,
            }
        }
        ConnError::Closed { .. } | ConnError::EndpointClosing { .. } => {
            TransportError::ClosedLocally
        }
        ConnError::Transport {
            code,
            reason,
            initiator,
            ..
        } if is_crypto(code) => TransportError::Handshake {
            reason: if initiator.is_remote() {
                match peer_reason.is_empty() {
                    true => format!("rejected by peer: {code}"),
                    false => format!("rejected by peer: {code}: {peer_reason}"),
                }
            } else if reason.is_empty() {
                code.to_string()
            } else {
                format!("{reason} ({code})")
            },
        },
        ConnError::IdleTimerExpired { .. } | ConnError::MaxHandshakeDurationExceeded { .. } => {
            TransportError::TimedOut
        }
        ConnError::Transport {
            code, initiator, ..
        } if initiator.is_remote() && !peer_reason.is_empty() => TransportError::ConnectionLost {
            reason: format!("closed by peer with {code}: {peer_reason}"),
        },
        other => TransportError::ConnectionLost {
            reason: other.to_string(),
        },
    }
}

/// Classifies s2n-quic's connection errors when no reason phrase is known.
fn conn_err(e: ConnError) -> TransportError {
    classify(e, None)
}

fn send_err(
    e: s2n_quic::stream::Error,
    closed: &watch::Receiver<Option<TransportError>>,
) -> TransportError {
    use s2n_quic::stream::Error as E;
    match e {
        // s2n-quic reports the peer's STOP_SENDING as a reset of our sending side.
        E::StreamReset { error, .. } => TransportError::StreamStopped { code: error.into() },
        E::ConnectionError { error, .. } => closed_or(closed, error),
        other => TransportError::ConnectionLost {
            reason: other.to_string(),
        },
    }
}

fn recv_err(
    e: s2n_quic::stream::Error,
    closed: &watch::Receiver<Option<TransportError>>,
) -> TransportError {
    use s2n_quic::stream::Error as E;
    match e {
        E::StreamReset { error, .. } => TransportError::StreamReset { code: error.into() },
        E::ConnectionError { error, .. } => closed_or(closed, error),
        other => TransportError::ConnectionLost {
            reason: other.to_string(),
        },
    }
}

impl core::Connection for S2nConnection {
    type SendStream = S2nSend;
    type RecvStream = S2nRecv;

    fn peer_identity(&self) -> &PeerIdentity {
        &self.inner.peer
    }

    fn remote_addr(&self) -> SocketAddr {
        // Live, in case the peer migrated; the handshake's address once the connection is gone.
        self.inner.handle.remote_addr().unwrap_or(self.inner.remote)
    }

    fn rtt(&self) -> Option<Duration> {
        match self.inner.shared.rtt_nanos.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    async fn open_bi(&self) -> Result<(S2nSend, S2nRecv), TransportError> {
        let mut handle = self.inner.handle.clone();
        let stream = handle
            .open_bidirectional_stream()
            .await
            .map_err(|e| self.err(e))?;
        let (recv, send) = stream.split();
        Ok((self.send(send), self.recv(recv)))
    }

    async fn accept_bi(&self) -> Result<(S2nSend, S2nRecv), TransportError> {
        let accepted = self
            .inner
            .bidi
            .lock()
            .await
            .accept_bidirectional_stream()
            .await;
        match accepted {
            Ok(Some(stream)) => {
                let (recv, send) = stream.split();
                Ok((self.send(send), self.recv(recv)))
            }
            Ok(None) => Err(self.ended(None)),
            Err(e) => Err(self.ended(Some(e))),
        }
    }

    async fn open_uni(&self) -> Result<S2nSend, TransportError> {
        let mut handle = self.inner.handle.clone();
        let stream = handle.open_send_stream().await.map_err(|e| self.err(e))?;
        Ok(self.send(stream))
    }

    async fn accept_uni(&self) -> Result<Option<S2nRecv>, TransportError> {
        let accepted = self.inner.uni.lock().await.accept_receive_stream().await;
        let why = match accepted {
            Ok(Some(stream)) => return Ok(Some(self.recv(stream))),
            // s2n-quic says "no more streams" after a close without error, an application
            // close during the handshake and an idle timeout alike; decide as quinn's backend.
            Ok(None) => self.ended(None),
            Err(e) => self.ended(Some(e)),
        };
        if is_graceful(&why) {
            Ok(None)
        } else {
            Err(why)
        }
    }

    fn close(&self, code: u32, reason: &[u8]) {
        self.inner.close(code, reason);
    }

    async fn closed(&self) -> TransportError {
        let mut closed = self.inner.closed.clone();
        let why = match closed.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or(TransportError::ClosedLocally),
            // The endpoint dropped the connection without reporting a close.
            Err(_) => TransportError::ConnectionLost {
                reason: "endpoint stopped".into(),
            },
        };
        why
    }
}

impl S2nConnection {
    fn send(&self, stream: s2n_quic::stream::SendStream) -> S2nSend {
        S2nSend {
            stream,
            closed: self.inner.closed.clone(),
            stopped: None,
        }
    }

    fn recv(&self, stream: s2n_quic::stream::ReceiveStream) -> S2nRecv {
        S2nRecv {
            stream,
            closed: self.inner.closed.clone(),
        }
    }
}

/// The writing half of an s2n-quic stream.
#[derive(Debug)]
pub struct S2nSend {
    stream: s2n_quic::stream::SendStream,
    closed: watch::Receiver<Option<TransportError>>,
    /// The peer's stop, once seen: s2n-quic forgets a stopped stream, and would answer later
    /// calls with "invalid stream" instead.
    stopped: Option<TransportError>,
}

impl S2nSend {
    fn fail(&mut self, e: s2n_quic::stream::Error) -> TransportError {
        if let Some(stopped) = &self.stopped {
            return stopped.clone();
        }
        let e = send_err(e, &self.closed);
        if matches!(e, TransportError::StreamStopped { .. }) {
            self.stopped = Some(e.clone());
        }
        e
    }
}

impl core::SendStream for S2nSend {
    async fn write(&mut self, data: Bytes) -> Result<(), TransportError> {
        match self.stream.send(data).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn write_all_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), TransportError> {
        match self.stream.send_vectored(chunks).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn finish(&mut self) -> Result<(), TransportError> {
        self.stream.finish().map_err(|e| self.fail(e))
    }

    async fn delivered(&mut self) -> Result<(), TransportError> {
        // `close` is finish (already done) plus waiting for the peer's acknowledgement.
        match self.stream.close().await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn reset(&mut self, code: u32) {
        let _ = self.stream.reset(code.into());
    }
}

/// The reading half of an s2n-quic stream.
#[derive(Debug)]
pub struct S2nRecv {
    stream: s2n_quic::stream::ReceiveStream,
    closed: watch::Receiver<Option<TransportError>>,
}

impl core::RecvStream for S2nRecv {
    async fn read_chunk(&mut self) -> Result<Option<Bytes>, TransportError> {
        self.stream
            .receive()
            .await
            .map_err(|e| recv_err(e, &self.closed))
    }

    fn stop(&mut self, code: u32) {
        let _ = self.stream.stop_sending(code.into());
    }
}

// --- Event subscriber: what s2n-quic tells only its subscribers -------------------------------

/// What the application side writes or reads without the connection's lock.
#[derive(Default)]
struct Shared {
    /// The code and reason of `close()`, taken by the subscriber when the close happens.
    local_close: Mutex<Option<LocalClose>>,
    /// The smoothed RTT of the active path, in nanoseconds (0 = not measured yet).
    rtt_nanos: AtomicU64,
}

struct LocalClose {
    code: u64,
    reason: Box<[u8]>,
}

/// The per-connection context of [`Events`]. Queried once after the handshake; mutated only by
/// the endpoint task.
struct ConnContext {
    peer_chain: Option<Vec<Vec<u8>>>,
    peer_reason: Option<Vec<u8>>,
    handshake_complete: bool,
    shared: Arc<Shared>,
    /// Dropped with the context, so `closed()` cannot wait forever on a connection the endpoint
    /// forgot.
    closed: watch::Sender<Option<TransportError>>,
}

/// Passed with a dial to [`Events::create_connection_context`]: the sender of the new
/// connection's close channel, created by `connect` so it can read a refusal's reason.
struct DialContext(Mutex<Option<watch::Sender<Option<TransportError>>>>);

/// The event subscriber of one endpoint.
struct Events {
    slot: Arc<CloseSlot>,
    /// The server's: where connections that closed before their handshake completed go.
    refused: Option<mpsc::Sender<TransportError>>,
}

impl Subscriber for Events {
    type ConnectionContext = ConnContext;

    fn create_connection_context(
        &mut self,
        _meta: &ConnectionMeta,
        info: &ConnectionInfo,
    ) -> ConnContext {
        let dialled = info
            .application
            .and_then(|app| app.downcast_ref::<DialContext>())
            .and_then(|dial| lock(&dial.0).take());
        ConnContext {
            peer_chain: None,
            peer_reason: None,
            handshake_complete: false,
            shared: Arc::default(),
            closed: dialled.unwrap_or_else(|| watch::Sender::new(None)),
        }
    }

    fn on_tls_exporter_ready(
        &mut self,
        ctx: &mut ConnContext,
        _meta: &ConnectionMeta,
        event: &events::TlsExporterReady,
    ) {
        // #[doc(hidden)] in s2n-quic ("unstable usage"): the reason for the exact version pin.
        ctx.peer_chain = event.session.peer_cert_chain_der().ok();
    }

    fn on_handshake_status_updated(
        &mut self,
        ctx: &mut ConnContext,
        _meta: &ConnectionMeta,
        event: &events::HandshakeStatusUpdated,
    ) {
        if let events::HandshakeStatus::Complete { .. }
        | events::HandshakeStatus::Confirmed { .. } = event.status
        {
            ctx.handshake_complete = true;
        }
    }

    fn on_connection_close_frame_received(
        &mut self,
        ctx: &mut ConnContext,
        _meta: &ConnectionMeta,
        event: &events::ConnectionCloseFrameReceived,
    ) {
        // The first CONNECTION_CLOSE is the one that closes the connection.
        if ctx.peer_reason.is_none() {
            let reason = event.frame.reason.unwrap_or_default();
            ctx.peer_reason = Some(reason[..reason.len().min(MAX_REASON)].to_vec());
        }
    }

    fn on_recovery_metrics(
        &mut self,
        ctx: &mut ConnContext,
        _meta: &ConnectionMeta,
        event: &events::RecoveryMetrics,
    ) {
        if event.path.is_active {
            let nanos = u64::try_from(event.smoothed_rtt.as_nanos()).unwrap_or(u64::MAX);
            ctx.shared.rtt_nanos.store(nanos, Ordering::Relaxed);
        }
    }

    fn on_connection_closed(
        &mut self,
        ctx: &mut ConnContext,
        meta: &ConnectionMeta,
        event: &events::ConnectionClosed,
    ) {
        let error = event.error;
        // Hand our reason, and whether the peer is authenticated, to the formatter, which
        // s2n-quic calls next for this same close.
        let ours = match error {
            ConnError::Application {
                error, initiator, ..
            } if initiator.is_local() => lock(&ctx.shared.local_close)
                .take()
                .filter(|c| c.code == u64::from(error)),
            _ => None,
        };
        self.slot.set(Closing {
            authenticated: ctx.handshake_complete,
            local: ours,
        });
        let why = classify(error, ctx.peer_reason.as_deref());
        tracing::debug!(connection = meta.id, %error, classified = %why, "s2n connection closed");
        if let (false, Some(refused)) = (ctx.handshake_complete, &self.refused) {
            // Never yielded by s2n-quic's accept; a full backlog drops the report, not the
            // endpoint's progress.
            let _ = refused.try_send(why.clone());
        }
        ctx.closed.send_replace(Some(why));
    }
}

// --- Close reasons out: the connection-close formatter -----------------------------------------

/// What the formatter needs to know of the close being formatted, which s2n-quic does not tell
/// it.
#[derive(Default)]
struct Closing {
    /// Whether this endpoint had completed the handshake (so the peer is authenticated). `false`
    /// (the default, also when nothing was recorded) means only generic reasons go out.
    authenticated: bool,
    /// The code and reason of our own application close, if this is one.
    local: Option<LocalClose>,
}

/// The close being formatted, handed from [`Events::on_connection_closed`] to
/// [`ReasonFormatter`]. Two generations are kept (the current close and the one before).
#[derive(Default)]
struct CloseSlot(Mutex<[Closing; 2]>);

impl CloseSlot {
    fn set(&self, close: Closing) {
        let mut slots = lock(&self.0);
        slots.swap(0, 1);
        slots[0] = close;
    }

    /// Whether the close being formatted is on a connection whose handshake completed here.
    fn authenticated(&self) -> bool {
        lock(&self.0)[0].authenticated
    }
}

/// Writes the reason given to [`Connection::close`](core::Connection::close) into the
/// application CONNECTION_CLOSE frame, which s2n-quic's own `close(code)` leaves empty.
///
/// Before this endpoint completed the handshake the peer is unauthenticated, and nothing but
/// codes and generic text goes out: s2n-quic formats every close twice, for Initial/Handshake
/// packets and for 1-RTT packets (which a server can already send to a client whose certificate
/// it is about to refuse), and both are generic then. A transport error keeps its code (a TLS
/// alert stays that alert, where s2n-quic's `Production` would say only HANDSHAKE_FAILURE, so a
/// refused peer still learns "revoked" or "unknown CA") but its reason is replaced by
/// [`PRE_HANDSHAKE_REASON`] (TLS) or dropped (others); an application close carries no reason
/// (RFC 9000 §10.2.3). After the handshake, transport errors pass through with s2n-quic's reason.
///
/// The formatter sees only the peer's address and the code, so the reason comes through a slot
/// shared with this endpoint's [`Events`]: s2n-quic 0.91's `ConnectionImpl::close` publishes
/// `on_connection_closed` (which fills the slot from the connection's context) and then, in the
/// same call on the endpoint task, formats the frame, encodes it into an owned packet and drops
/// it. Every formatter call goes through that function.
struct ReasonFormatter {
    slot: Arc<CloseSlot>,
}

/// How many distinct close reasons are kept for the whole process (each at most 512 bytes, so
/// at most 512 KiB). Past that, closes still carry their code but no reason text; the cluster
/// also sends its reasons in control frames, so nothing depends on this text alone.
const MAX_INTERNED_REASONS: usize = 1024;

/// Returns a `'static` copy of `reason`, made once per distinct text and kept for the life of
/// the process. The formatter must hand out a borrow that outlives its own call, and this keeps
/// that safe without depending on s2n-quic's internal call order.
fn intern(reason: &[u8]) -> Option<&'static [u8]> {
    static INTERNED: Mutex<Option<std::collections::HashSet<&'static [u8]>>> = Mutex::new(None);
    let mut table = lock(&INTERNED);
    let table = table.get_or_insert_with(Default::default);
    if let Some(&known) = table.get(reason) {
        return Some(known);
    }
    if table.len() >= MAX_INTERNED_REASONS {
        return None;
    }
    let leaked: &'static [u8] = Box::leak(reason.to_vec().into_boxed_slice());
    table.insert(leaked);
    Some(leaked)
}

/// The close frame for a transport error before the handshake completed: its code (a TLS alert
/// stays that alert) and frame type, with a fixed reason for TLS errors and none for others.
fn generic_transport_close(error: s2n_quic_core::transport::Error) -> ConnectionClose<'static> {
    let reason = if is_crypto(error.code) {
        PRE_HANDSHAKE_REASON
    } else {
        ""
    };
    error.with_reason(reason).into()
}

impl Formatter for ReasonFormatter {
    fn format_transport_error(
        &self,
        context: &CloseContext,
        error: s2n_quic_core::transport::Error,
    ) -> ConnectionClose<'_> {
        if !self.slot.authenticated() {
            return generic_transport_close(error);
        }
        Development.format_transport_error(context, error)
    }

    fn format_application_error(
        &self,
        context: &CloseContext,
        error: s2n_quic::application::Error,
    ) -> ConnectionClose<'_> {
        let ours = {
            let slots = lock(&self.slot.0);
            slots[0]
                .local
                .as_ref()
                .filter(|c| slots[0].authenticated && c.code == u64::from(error))
                .map(|c| c.reason.clone())
        };
        let Some(reason) = ours.and_then(|r| intern(&r)) else {
            return Production.format_application_error(context, error);
        };
        ConnectionClose {
            error_code: error.into(),
            frame_type: None,
            reason: Some(reason),
        }
    }

    fn format_early_transport_error(
        &self,
        context: &CloseContext,
        error: s2n_quic_core::transport::Error,
    ) -> ConnectionClose<'_> {
        // Initial and Handshake packets are only sent while the handshake is under way (or just
        // completed); the same rule as for 1-RTT applies.
        self.format_transport_error(context, error)
    }

    fn format_early_application_error(
        &self,
        context: &CloseContext,
        error: s2n_quic::application::Error,
    ) -> ConnectionClose<'_> {
        Production.format_early_application_error(context, error)
    }
}
