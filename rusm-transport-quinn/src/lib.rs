//! [`QuinnTransport`]: the RUSM cluster [`Transport`](rusm_cluster_core::transport::Transport) over quinn 0.11.
//!
//! One UDP socket both dials and accepts. TLS comes from the core's one policy
//! ([`rusm_cluster_core::tls`]); this crate only adapts quinn's types and errors, and applies the
//! core's [`TransportTuning`] (stream credit, windows, keep-alive) on both the server and the
//! client side, since quinn's limits govern what the *peer* may open.
//!
//! ```
//! use rusm_cluster_core::identity::ClusterCa;
//! use rusm_cluster_core::transport::{EndpointConfig, Transport, TransportTuning};
//! use rusm_transport_quinn::QuinnTransport;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let ca = ClusterCa::generate("doc").unwrap();
//! let t = QuinnTransport::bind(EndpointConfig {
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

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, VarInt};
use rusm_cluster_core::identity::PeerIdentity;
use rusm_cluster_core::rustls::pki_types::CertificateDer;
use rusm_cluster_core::tls;
use rusm_cluster_core::transport::{self as core, EndpointConfig, TransportError, TransportTuning};

/// A quinn endpoint bound with the node's identity and trust.
#[derive(Debug)]
pub struct QuinnTransport {
    endpoint: quinn::Endpoint,
    /// The uni-stream credit a peer gets once its link is up.
    uni_streams: u32,
}

/// Uni-streams a peer may open before its link is up (see
/// [`Connection::grant_stream_credit`](core::Connection::grant_stream_credit)). quinn sets aside
/// state for every stream a peer may open, when the connection is made: at the 10,000 we tuned
/// then (1,000 since) that was ~0.45 MiB per connection, which a flood of connections that never
/// say hello (or whose certificate is refused) turned into hundreds of MiB.
const HANDSHAKE_UNI_STREAMS: u32 = 32;

fn transport_config(t: &TransportTuning) -> Result<Arc<quinn::TransportConfig>, TransportError> {
    let mut c = quinn::TransportConfig::default();
    c.max_concurrent_uni_streams(VarInt::from_u32(
        HANDSHAKE_UNI_STREAMS.min(t.max_concurrent_uni_streams),
    ));
    // One control stream per link; a few spare for future protocols.
    c.max_concurrent_bidi_streams(VarInt::from_u32(8));
    c.stream_receive_window(VarInt::from_u32(t.stream_receive_window));
    c.receive_window(VarInt::from_u32(t.connection_receive_window));
    c.send_window(u64::from(t.connection_receive_window));
    c.keep_alive_interval(Some(t.keep_alive_interval));
    let idle = quinn::IdleTimeout::try_from(t.idle_timeout).map_err(|e| TransportError::Setup {
        reason: format!("idle timeout {:?}: {e}", t.idle_timeout),
    })?;
    c.max_idle_timeout(Some(idle));
    Ok(Arc::new(c))
}

/// Binds the UDP socket with the buffer sizes of the tuning (the kernel caps them at
/// `net.core.rmem_max` / `wmem_max`).
fn udp_socket(addr: SocketAddr, tuning: &TransportTuning) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Some(n) = tuning.socket_buffer_bytes {
        // Best effort: a smaller buffer than asked is not an error.
        let _ = socket.set_recv_buffer_size(n);
        let _ = socket.set_send_buffer_size(n);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

impl core::Transport for QuinnTransport {
    type Connection = QuinnConnection;
    type Incoming = Pin<Box<dyn Future<Output = Result<QuinnConnection, TransportError>> + Send>>;
    const NAME: &'static str = "quinn";

    fn bind(config: EndpointConfig) -> Result<Self, TransportError> {
        let transport = transport_config(&config.tuning)?;
        let live = config.trust_handle().map_err(TransportError::setup)?;
        let server_tls =
            tls::server_config_live(&config.identity, &live).map_err(TransportError::setup)?;
        let client_tls =
            tls::client_config_live(&config.identity, &live).map_err(TransportError::setup)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server_tls).map_err(TransportError::setup)?,
        ));
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client_tls).map_err(TransportError::setup)?,
        ));
        client.transport_config(transport);
        let socket = udp_socket(config.listen, &config.tuning).map_err(TransportError::setup)?;
        let runtime = quinn::default_runtime().ok_or_else(|| TransportError::Setup {
            reason: "no async runtime found (call inside tokio)".into(),
        })?;
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )
        .map_err(TransportError::setup)?;
        endpoint.set_default_client_config(client);
        Ok(QuinnTransport {
            endpoint,
            uni_streams: config.tuning.max_concurrent_uni_streams,
        })
    }

    fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint.local_addr().map_err(TransportError::setup)
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<QuinnConnection, TransportError> {
        let connecting =
            self.endpoint
                .connect(addr, server_name)
                .map_err(|e| TransportError::Connect {
                    reason: e.to_string(),
                })?;
        let conn = connecting.await.map_err(conn_err)?;
        QuinnConnection::new(conn, self.uni_streams)
    }

    async fn accept(&self) -> Option<Self::Incoming> {
        let incoming = self.endpoint.accept().await?;
        let uni_streams = self.uni_streams;
        Some(Box::pin(async move {
            let conn = incoming.into_future().await.map_err(conn_err)?;
            QuinnConnection::new(conn, uni_streams)
        }))
    }

    async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }

    fn close(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"endpoint closed");
    }
}

/// A quinn connection whose peer certificate was verified.
#[derive(Clone, Debug)]
pub struct QuinnConnection {
    conn: quinn::Connection,
    peer: Arc<PeerIdentity>,
    uni_streams: u32,
}

impl QuinnConnection {
    fn new(conn: quinn::Connection, uni_streams: u32) -> Result<Self, TransportError> {
        let leaf = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.into_iter().next())
            .ok_or_else(|| TransportError::Handshake {
                reason: "peer presented no certificate".into(),
            })?;
        let peer = PeerIdentity::from_leaf(leaf).map_err(|e| TransportError::Handshake {
            reason: e.to_string(),
        })?;
        Ok(QuinnConnection {
            conn,
            peer: Arc::new(peer),
            uni_streams,
        })
    }
}

/// Classifies quinn's connection errors. TLS alerts travel as CRYPTO_ERROR codes 0x100–0x1ff.
fn conn_err(e: ConnectionError) -> TransportError {
    let is_crypto = |code: u64| (0x100..=0x1ff).contains(&code);
    match e {
        ConnectionError::TransportError(t) if is_crypto(u64::from(t.code)) => {
            TransportError::Handshake {
                reason: t.to_string(),
            }
        }
        ConnectionError::ConnectionClosed(c) if is_crypto(u64::from(c.error_code)) => {
            TransportError::Handshake {
                reason: format!("rejected by peer: {c}"),
            }
        }
        ConnectionError::ApplicationClosed(a) => TransportError::ClosedByPeer {
            code: a.error_code.into_inner(),
            reason: String::from_utf8_lossy(&a.reason).into_owned(),
        },
        ConnectionError::TimedOut => TransportError::TimedOut,
        ConnectionError::LocallyClosed => TransportError::ClosedLocally,
        other => TransportError::ConnectionLost {
            reason: other.to_string(),
        },
    }
}

fn write_err(e: quinn::WriteError) -> TransportError {
    match e {
        quinn::WriteError::Stopped(code) => TransportError::StreamStopped {
            code: code.into_inner(),
        },
        quinn::WriteError::ConnectionLost(c) => conn_err(c),
        other => TransportError::ConnectionLost {
            reason: other.to_string(),
        },
    }
}

fn read_err(e: quinn::ReadError) -> TransportError {
    match e {
        quinn::ReadError::Reset(code) => TransportError::StreamReset {
            code: code.into_inner(),
        },
        quinn::ReadError::ConnectionLost(c) => conn_err(c),
        other => TransportError::ConnectionLost {
            reason: other.to_string(),
        },
    }
}

impl core::Connection for QuinnConnection {
    type SendStream = QuinnSend;
    type RecvStream = QuinnRecv;

    fn peer_identity(&self) -> &PeerIdentity {
        &self.peer
    }

    fn remote_addr(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    fn rtt(&self) -> Option<Duration> {
        Some(self.conn.rtt())
    }

    async fn open_bi(&self) -> Result<(QuinnSend, QuinnRecv), TransportError> {
        let (s, r) = self.conn.open_bi().await.map_err(conn_err)?;
        Ok((QuinnSend(s), QuinnRecv(r)))
    }

    async fn accept_bi(&self) -> Result<(QuinnSend, QuinnRecv), TransportError> {
        let (s, r) = self.conn.accept_bi().await.map_err(conn_err)?;
        Ok((QuinnSend(s), QuinnRecv(r)))
    }

    async fn open_uni(&self) -> Result<QuinnSend, TransportError> {
        self.conn.open_uni().await.map(QuinnSend).map_err(conn_err)
    }

    async fn accept_uni(&self) -> Result<Option<QuinnRecv>, TransportError> {
        match self.conn.accept_uni().await {
            Ok(r) => Ok(Some(QuinnRecv(r))),
            // A graceful close is "no more streams", as s2n-quic reports it.
            Err(ConnectionError::ApplicationClosed(a))
                if a.error_code.into_inner() == u64::from(core::close_code::NORMAL) =>
            {
                Ok(None)
            }
            Err(ConnectionError::LocallyClosed) => Ok(None),
            Err(e) => Err(conn_err(e)),
        }
    }

    fn close(&self, code: u32, reason: &[u8]) {
        self.conn.close(VarInt::from_u32(code), reason);
    }

    async fn closed(&self) -> TransportError {
        conn_err(self.conn.closed().await)
    }

    fn grant_stream_credit(&self) {
        self.conn
            .set_max_concurrent_uni_streams(VarInt::from_u32(self.uni_streams));
    }
}

/// The writing half of a quinn stream.
#[derive(Debug)]
pub struct QuinnSend(quinn::SendStream);

impl core::SendStream for QuinnSend {
    async fn write(&mut self, data: Bytes) -> Result<(), TransportError> {
        self.0.write_chunk(data).await.map_err(write_err)
    }

    async fn write_all_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), TransportError> {
        self.0.write_all_chunks(chunks).await.map_err(write_err)
    }

    fn finish(&mut self) -> Result<(), TransportError> {
        self.0.finish().map_err(|e| TransportError::ConnectionLost {
            reason: e.to_string(),
        })
    }

    async fn delivered(&mut self) -> Result<(), TransportError> {
        match self.0.stopped().await {
            // Finished, and every byte acknowledged.
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(TransportError::StreamStopped {
                code: code.into_inner(),
            }),
            Err(quinn::StoppedError::ConnectionLost(c)) => Err(conn_err(c)),
            Err(other) => Err(TransportError::ConnectionLost {
                reason: other.to_string(),
            }),
        }
    }

    fn reset(&mut self, code: u32) {
        let _ = self.0.reset(VarInt::from_u32(code));
    }

    fn set_priority(&mut self, priority: i32) {
        let _ = self.0.set_priority(priority);
    }
}

/// The reading half of a quinn stream.
#[derive(Debug)]
pub struct QuinnRecv(quinn::RecvStream);

impl core::RecvStream for QuinnRecv {
    async fn read_chunk(&mut self) -> Result<Option<Bytes>, TransportError> {
        match self.0.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => Ok(Some(chunk.bytes)),
            Ok(None) => Ok(None),
            Err(e) => Err(read_err(e)),
        }
    }

    fn stop(&mut self, code: u32) {
        let _ = self.0.stop(VarInt::from_u32(code));
    }
}
