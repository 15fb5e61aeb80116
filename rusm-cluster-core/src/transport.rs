//! The transport boundary: what a QUIC backend gives the cluster, and nothing about actors.
//!
//! A backend implements [`Transport`] (an endpoint that dials and accepts, bound with the node's
//! [`Identity`] and [`TrustAnchor`]) and [`Connection`] (the verified [`PeerIdentity`], one
//! bidirectional control stream, uni-streams for messages, close). Everything that can be written
//! once — framing, limits, the hello — lives in the core, not in the backends.
//!
//! Rules every backend honours (checked by the conformance suite):
//! - streams are independent: reading one never waits on another;
//! - the TLS policy is [`crate::tls`]'s, unchanged;
//! - the peer identity is taken from the handshake, never from the source address;
//! - `connect()` succeeding is not authentication: with TLS 1.3 a client learns of its rejection
//!   only afterwards, so the link is up only after the control-stream hello exchange.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

use crate::identity::{Identity, PeerIdentity, TrustAnchor};

/// A transport failure, classified the same way for every backend. The backend's own error is
/// kept as text in `reason` (backend error types never leak into the cluster's API).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportError {
    /// The endpoint could not be created (address in use, bad TLS configuration, ...).
    #[error("endpoint setup failed: {reason}")]
    Setup {
        /// What went wrong.
        reason: String,
    },
    /// Dialling failed before a connection existed (invalid address or server name, endpoint
    /// closed).
    #[error("connect failed: {reason}")]
    Connect {
        /// What went wrong.
        reason: String,
    },
    /// The TLS handshake was refused by one side: untrusted or revoked certificate, wrong server
    /// name, ALPN mismatch. With TLS 1.3 the dialler may see this only on its first stream
    /// operation after `connect()` returned.
    #[error("TLS handshake rejected: {reason}")]
    Handshake {
        /// The TLS alert or verifier error, as the backend reports it.
        reason: String,
    },
    /// The peer closed the connection on purpose (application close with a code and reason).
    #[error("closed by peer (code {code}): {reason}")]
    ClosedByPeer {
        /// The application close code.
        code: u64,
        /// The reason the peer gave.
        reason: String,
    },
    /// This side closed the connection or endpoint.
    #[error("closed locally")]
    ClosedLocally,
    /// The peer stopped answering (idle timeout: keep-alives went unanswered).
    #[error("peer timed out")]
    TimedOut,
    /// The connection was lost for another reason (reset, protocol violation, ...).
    #[error("connection lost: {reason}")]
    ConnectionLost {
        /// What the backend said.
        reason: String,
    },
    /// The receiver stopped this stream (`STOP_SENDING`), typically because a message was over
    /// its size limit.
    #[error("stream stopped by peer (code {code})")]
    StreamStopped {
        /// The application error code.
        code: u64,
    },
    /// The sender reset this stream before finishing it.
    #[error("stream reset by peer (code {code})")]
    StreamReset {
        /// The application error code.
        code: u64,
    },
}

impl TransportError {
    /// A [`TransportError::Setup`] from whatever a backend's builder reported.
    pub fn setup(reason: impl std::fmt::Display) -> Self {
        TransportError::Setup {
            reason: reason.to_string(),
        }
    }

    /// Whether this error means the whole connection is gone (as opposed to one stream).
    pub fn is_connection_error(&self) -> bool {
        !matches!(
            self,
            TransportError::StreamStopped { .. } | TransportError::StreamReset { .. }
        )
    }
}

/// Stream error codes the cluster uses (on `STOP_SENDING` / `RESET_STREAM`).
pub mod stream_code {
    /// The message was over the receiver's size limit.
    pub const TOO_LARGE: u32 = 1;
    /// The message header was malformed.
    pub const MALFORMED: u32 = 2;
    /// The sender gave up on the message.
    pub const CANCELLED: u32 = 3;
}

/// Connection close codes the cluster uses.
pub mod close_code {
    /// A normal close (shutdown, goodbye).
    pub const NORMAL: u32 = 0;
    /// The hello was refused (see the reason).
    pub const REJECTED: u32 = 1;
    /// The peer broke the protocol (malformed or oversized frame).
    pub const PROTOCOL: u32 = 2;
    /// A second link to the same peer was closed in favour of the first.
    pub const DUPLICATE: u32 = 3;
}

/// Tuning shared by every backend. The defaults are measured, not guessed (see the README's
/// performance section): stream credit far above QUIC's default of 100, and keep-alives on.
#[derive(Clone, Debug)]
pub struct TransportTuning {
    /// How many uni-streams (messages) the peer may have open towards us at once. Default
    /// 1,000: enough for a stream per message at full speed (10,000 measured no faster), and
    /// quinn keeps a pooled receive state, with the buffers it last grew, for every stream that
    /// was ever open at once (at 10,000, a long coalesced flood held ~150 MiB more).
    pub max_concurrent_uni_streams: u32,
    /// Flow-control window of one stream, in bytes.
    pub stream_receive_window: u32,
    /// Flow-control window of a whole connection, in bytes.
    pub connection_receive_window: u32,
    /// A peer silent for this long is declared gone.
    pub idle_timeout: Duration,
    /// How often to send a keep-alive when otherwise idle (well below `idle_timeout`).
    pub keep_alive_interval: Duration,
    /// UDP socket send and receive buffer size asked of the kernel (which caps it at
    /// `net.core.rmem_max` / `wmem_max`). The Linux default of ~208 KiB drops packets on
    /// loopback under load; `None` keeps the system default.
    pub socket_buffer_bytes: Option<usize>,
}

impl Default for TransportTuning {
    fn default() -> Self {
        TransportTuning {
            max_concurrent_uni_streams: 1_000,
            stream_receive_window: 4 << 20,
            connection_receive_window: 16 << 20,
            idle_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(1),
            socket_buffer_bytes: Some(4 << 20),
        }
    }
}

/// Everything a backend needs to bind an endpoint.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// This node's certificate and key.
    pub identity: Identity,
    /// Whom to trust (roots and CRLs).
    pub trust: TrustAnchor,
    /// When given, the endpoint verifies peers against this live trust instead of `trust`, so
    /// its owner can change whom it trusts while it runs (new handshakes use the change).
    pub live_trust: Option<std::sync::Arc<crate::tls::LiveTrust>>,
    /// The UDP address to bind (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Stream credit, windows, keep-alive.
    pub tuning: TransportTuning,
}

impl EndpointConfig {
    /// The trust the endpoint's TLS configs verify against: the live one when given, else a
    /// fixed one made from `trust`.
    pub fn trust_handle(
        &self,
    ) -> Result<std::sync::Arc<crate::tls::LiveTrust>, crate::tls::TlsError> {
        match &self.live_trust {
            Some(live) => Ok(live.clone()),
            None => crate::tls::LiveTrust::new(&self.trust),
        }
    }
}

/// A QUIC endpoint that dials and accepts mutually authenticated connections.
pub trait Transport: Sized + Send + Sync + 'static {
    /// A connection made by this transport.
    type Connection: Connection;
    /// An accepted connection whose handshake is still in progress.
    type Incoming: Future<Output = Result<Self::Connection, TransportError>> + Send + 'static;

    /// A short name of the backend (`"quinn"`, `"s2n"`), for logs and benchmarks.
    const NAME: &'static str;

    /// Binds an endpoint. Must be called inside a tokio runtime.
    fn bind(config: EndpointConfig) -> Result<Self, TransportError>;

    /// The address actually bound (with the real port when port 0 was asked).
    fn local_addr(&self) -> Result<SocketAddr, TransportError>;

    /// Dials `addr`, expecting its certificate to be valid for `server_name`.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the attempt; nothing else is affected.
    fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> impl Future<Output = Result<Self::Connection, TransportError>> + Send;

    /// Waits for the next incoming connection; `None` once the endpoint is closed. The returned
    /// [`Transport::Incoming`] finishes the handshake, so a slow handshake never delays others.
    ///
    /// # Cancel safety
    /// Cancel safe: a connection not yet returned stays queued for the next call.
    fn accept(&self) -> impl Future<Output = Option<Self::Incoming>> + Send;

    /// Closes the endpoint and every connection on it.
    fn close(&self);

    /// After [`close`](Self::close): waits until the closed connections are drained, so that
    /// dropping the transport then frees its address at once (a node restarted on the same
    /// port can bind it). Backends that free the address on `close` need not wait.
    fn wait_idle(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// One authenticated connection to a peer.
pub trait Connection: Clone + Send + Sync + 'static {
    /// Our side of a stream we write.
    type SendStream: SendStream;
    /// Our side of a stream we read.
    type RecvStream: RecvStream;

    /// The peer as its verified certificate names it.
    fn peer_identity(&self) -> &PeerIdentity;

    /// The peer's UDP address.
    fn remote_addr(&self) -> SocketAddr;

    /// The current round-trip estimate, if the backend knows one.
    fn rtt(&self) -> Option<Duration>;

    /// Opens the bidirectional control stream (the dialler does this once).
    fn open_bi(
        &self,
    ) -> impl Future<Output = Result<(Self::SendStream, Self::RecvStream), TransportError>> + Send;

    /// Accepts the bidirectional control stream (the listener does this once).
    fn accept_bi(
        &self,
    ) -> impl Future<Output = Result<(Self::SendStream, Self::RecvStream), TransportError>> + Send;

    /// Opens a uni-stream for one message. Waits for stream credit when the peer's limit is
    /// reached (this is the first layer of backpressure).
    fn open_uni(&self) -> impl Future<Output = Result<Self::SendStream, TransportError>> + Send;

    /// Accepts the next uni-stream; `Ok(None)` when the connection was closed gracefully.
    ///
    /// # Cancel safety
    /// Cancel safe.
    fn accept_uni(
        &self,
    ) -> impl Future<Output = Result<Option<Self::RecvStream>, TransportError>> + Send;

    /// Closes the connection with an application code and a reason the peer can read.
    fn close(&self, code: u32, reason: &[u8]);

    /// Resolves when the connection is closed, with why.
    fn closed(&self) -> impl Future<Output = TransportError> + Send;

    /// The link on this connection is up (its hello accepted): the peer may now open as many
    /// uni-streams as the tuning allows. A backend whose per-connection memory grows with that
    /// credit (quinn sets aside state for every stream the peer may open) grants only a little
    /// until then, so a connection that never says hello costs little. Code that uses a
    /// transport without links (a benchmark, a tool) calls it on both ends right after the
    /// handshake, or quinn keeps the peer at 32 streams. The default does nothing.
    fn grant_stream_credit(&self) {}
}

/// The writing half of a stream.
pub trait SendStream: Send + 'static {
    /// Writes all of `data` (waiting for flow-control credit).
    ///
    /// # Cancel safety
    /// Not cancel safe: part of `data` may have been written.
    fn write(&mut self, data: Bytes) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Writes all chunks in order; backends may send them in one go.
    fn write_all_chunks(
        &mut self,
        chunks: &mut [Bytes],
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        async move {
            for c in chunks.iter_mut() {
                let data = std::mem::take(c);
                self.write(data).await?;
            }
            Ok(())
        }
    }

    /// Marks the end of the stream (the peer reads end-of-stream after the data).
    fn finish(&mut self) -> Result<(), TransportError>;

    /// Waits until the peer has acknowledged everything written, end of stream included (call
    /// after [`finish`](Self::finish)); an error if the peer stopped the stream or the
    /// connection failed first. Writes complete once the stack has buffered the data, so a
    /// writer that opens stream after stream uses this to bound what it has in flight.
    fn delivered(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Abandons the stream: the peer sees a reset with `code`.
    fn reset(&mut self, code: u32);

    /// Asks the stack to send this stream's data before that of streams with a lower priority
    /// (0 by default). A hint: a backend without priorities ignores it.
    fn set_priority(&mut self, priority: i32) {
        let _ = priority;
    }
}

/// The reading half of a stream.
pub trait RecvStream: Send + 'static {
    /// The next chunk of data, `Ok(None)` at end of stream. Chunk boundaries mean nothing: they
    /// are never message boundaries.
    ///
    /// # Cancel safety
    /// Cancel safe: no data is lost when the future is dropped before completion.
    fn read_chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, TransportError>> + Send;

    /// Tells the sender to stop (`STOP_SENDING` with `code`); we read no more of this stream.
    fn stop(&mut self, code: u32);
}
