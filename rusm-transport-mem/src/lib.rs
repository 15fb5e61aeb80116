//! [`MemTransport`]: the RUSM cluster [`Transport`] in memory, with no sockets, for tests and
//! simulations that hold the cluster to the same conformance cases as the QUIC backends.
//!
//! Endpoints bind in one process-global in-memory network (a registry keyed by
//! [`SocketAddr`]): port 0 gets a fresh fake port, an address in use is refused with
//! [`TransportError::Setup`], and [`close`](Transport::close) frees the address at once, so a
//! node restarted on the same address can bind it again.
//!
//! **Security is real.** Every connection runs an actual rustls TLS 1.3 handshake between a
//! `rustls::ClientConnection` and a `rustls::ServerConnection` built by the core's one policy
//! ([`rusm_cluster_core::tls`]: ALPN, CRLs, server-name check, client authentication), their
//! records carried through the in-memory link like any other traffic. An untrusted, revoked or
//! wrongly named certificate fails as on QUIC: the dialler gets [`TransportError::Handshake`]
//! from `connect()` or from its first stream operation (in TLS 1.3 the client finishes before
//! the server has judged its certificate), and the listener's [`MemIncoming`] resolves to
//! `Err(Handshake)`. The reason names the TLS alert both ways QUIC backends do (for example
//! `TLS alert CERTIFICATE_REVOKED (error 44)`). The [`PeerIdentity`](rusm_cluster_core::identity::PeerIdentity) is read from the peer's
//! verified leaf certificate. After the handshake, stream data is passed as it is (not
//! encrypted): it never leaves the process.
//!
//! **Streams behave as QUIC's do where the cluster relies on it**: one bidirectional stream for
//! control, uni-streams for messages; a limit on concurrently open uni-streams
//! (`tuning.max_concurrent_uni_streams`, `open_uni` waits for credit); flow-control windows per
//! stream and per connection (`stream_receive_window`, `connection_receive_window`: a writer
//! waits while the reader has not consumed, credit returns as it reads); `finish`, `reset`
//! (the reader sees [`TransportError::StreamReset`]), `stop` (the writer sees
//! [`TransportError::StreamStopped`], also from `delivered`), and `delivered`, which resolves once
//! the reader has read everything, end of stream included. Chunks are the writer's
//! [`bytes::Bytes`], passed on without copies (sliced, never copied, where credit ends and into
//! 64 KiB pieces on a link with a rate); `read_chunk` is cancel safe. `close(code, reason)` gives the peer [`TransportError::ClosedByPeer`] with both. Closing
//! the endpoint closes its connections with code 0 and reason `endpoint closed`, as quinn does.
//!
//! **A link has a rate**: stream data crosses at [`MemNetwork::DEFAULT_RATE`] (512 MiB/s each
//! way) unless set otherwise, shared fairly by the streams with data waiting (round-robin, in
//! 64 KiB slices), so a large message takes time to cross and never holds a small one behind it,
//! as on QUIC. A small message on an idle link crosses at once.
//!
//! **Faults for tests**: [`MemNetwork`] cuts and restores the link between two addresses and
//! sets its one-way latency and its rate. While a link is cut nothing crosses either way; a cut
//! that outlasts the idle timeout times out both ends with [`TransportError::TimedOut`], as
//! unanswered QUIC keep-alives do. See [`MemNetwork`] for the exact rules.
//!
//! What is not emulated: packet loss, duplication and reordering (a link is lossless); keep-alive
//! traffic (a link that is not cut never times out, whatever `keep_alive_interval` says); stream
//! priorities (a hint, ignored); a limit on bidirectional streams; socket buffers
//! (`socket_buffer_bytes` is ignored). A dial to an address where nothing is bound goes
//! unanswered and times out after the idle timeout, as on QUIC.
//!
//! ```
//! use rusm_cluster_core::identity::ClusterCa;
//! use rusm_cluster_core::transport::{
//!     Connection, EndpointConfig, RecvStream, SendStream, Transport, TransportTuning,
//! };
//! use rusm_transport_mem::MemTransport;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let ca = ClusterCa::generate("doc").unwrap();
//! let bind = |name: &str| {
//!     MemTransport::bind(EndpointConfig {
//!         live_trust: None,
//!         identity: ca.issue(name).unwrap(),
//!         trust: ca.trust(),
//!         listen: "127.0.0.1:0".parse().unwrap(),
//!         tuning: TransportTuning::default(),
//!     })
//!     .unwrap()
//! };
//! let (london, paris) = (bind("london"), bind("paris"));
//! let (dialled, accepted) = tokio::join!(
//!     paris.connect(london.local_addr().unwrap(), "london"),
//!     async { london.accept().await.unwrap().await },
//! );
//! let (dialled, accepted) = (dialled.unwrap(), accepted.unwrap());
//! assert_eq!(accepted.peer_identity().dns_names, ["paris"]);
//!
//! let mut s = dialled.open_uni().await.unwrap();
//! s.write("hello".into()).await.unwrap();
//! s.finish().unwrap();
//! let mut r = accepted.accept_uni().await.unwrap().unwrap();
//! assert_eq!(r.read_chunk().await.unwrap().unwrap(), "hello");
//! assert_eq!(r.read_chunk().await.unwrap(), None);
//! s.delivered().await.unwrap();
//! # }
//! ```

mod conn;
mod network;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Poll, Waker};

use rusm_cluster_core::rustls;
use rusm_cluster_core::tls;
use rusm_cluster_core::transport::{EndpointConfig, Transport, TransportError, TransportTuning};

pub use conn::{MemConnection, MemIncoming, MemRecv, MemSend};
pub use network::MemNetwork;

use conn::SideHandle;
use wire::{ConnInner, CLIENT, SERVER};

/// An endpoint of the in-memory network, bound with the node's identity and trust.
pub struct MemTransport {
    ep: Arc<Endpoint>,
}

impl fmt::Debug for MemTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemTransport")
            .field("addr", &self.ep.addr)
            .field("closed", &self.ep.lock().closed)
            .finish()
    }
}

/// What the network registry points at: an endpoint's address, TLS configurations, tuning, and
/// its accept queue and connections.
pub(crate) struct Endpoint {
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    tuning: TransportTuning,
    state: Mutex<EndpointState>,
}

#[derive(Default)]
struct EndpointState {
    closed: bool,
    incoming: VecDeque<MemIncoming>,
    acceptors: Vec<Waker>,
    /// Every connection with an end here (and which end), to close them with the endpoint.
    conns: Vec<(Weak<ConnInner>, usize)>,
}

impl Endpoint {
    fn lock(&self) -> MutexGuard<'_, EndpointState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl EndpointState {
    fn track(&mut self, conn: &Arc<ConnInner>, side: usize) {
        if self.conns.len() >= 64 && self.conns.len().is_power_of_two() {
            self.conns.retain(|(c, _)| c.strong_count() > 0);
        }
        self.conns.push((Arc::downgrade(conn), side));
    }
}

/// The client's first flight reached `addr`: if an open endpoint is bound there, queue the
/// connection for its `accept` and return its TLS configuration and tuning.
pub(crate) fn arrive(
    conn: &Arc<ConnInner>,
    addr: SocketAddr,
    from: SocketAddr,
) -> Option<(Arc<rustls::ServerConfig>, TransportTuning)> {
    let ep = network::lookup(addr)?;
    let mut st = ep.lock();
    if st.closed {
        return None;
    }
    st.track(conn, SERVER);
    let handle = Arc::new(SideHandle {
        conn: conn.clone(),
        side: SERVER,
    });
    st.incoming.push_back(MemIncoming::new(handle, from));
    for w in st.acceptors.drain(..) {
        w.wake();
    }
    Some((ep.server.clone(), ep.tuning.clone()))
}

impl Transport for MemTransport {
    type Connection = MemConnection;
    type Incoming = MemIncoming;
    const NAME: &'static str = "mem";

    fn bind(config: EndpointConfig) -> Result<Self, TransportError> {
        let live = config.trust_handle().map_err(TransportError::setup)?;
        let server =
            tls::server_config_live(&config.identity, &live).map_err(TransportError::setup)?;
        let client =
            tls::client_config_live(&config.identity, &live).map_err(TransportError::setup)?;
        let ep = network::bind(config.listen, |addr| {
            Arc::new(Endpoint {
                addr,
                client: Arc::new(client),
                server: Arc::new(server),
                tuning: config.tuning,
                state: Mutex::default(),
            })
        })?;
        Ok(MemTransport { ep })
    }

    fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.ep.addr)
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<MemConnection, TransportError> {
        let connect_err = |reason: String| TransportError::Connect { reason };
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| connect_err(format!("invalid server name {server_name:?}: {e}")))?;
        let tls = rustls::ClientConnection::new(self.ep.client.clone(), name)
            .map_err(|e| connect_err(e.to_string()))?;
        let link = network::link(self.ep.addr, addr);
        let conn = ConnInner::dial(self.ep.addr, addr, tls, &self.ep.tuning, link);
        {
            let mut st = self.ep.lock();
            if st.closed {
                return Err(connect_err("endpoint closed".into()));
            }
            st.track(&conn, CLIENT);
        }
        // Dropping this (a cancelled dial) closes the client end.
        let handle = Arc::new(SideHandle {
            conn: conn.clone(),
            side: CLIENT,
        });
        tokio::spawn(wire::drive(conn.clone()));
        conn.with(|w| w.start());
        let leaf = poll_fn(|cx| conn.with(|w| w.poll_handshake(CLIENT, cx))).await?;
        MemConnection::new(handle, leaf, addr)
    }

    async fn accept(&self) -> Option<MemIncoming> {
        poll_fn(|cx| {
            let mut st = self.ep.lock();
            if let Some(incoming) = st.incoming.pop_front() {
                return Poll::Ready(Some(incoming));
            }
            if st.closed {
                return Poll::Ready(None);
            }
            if !st.acceptors.iter().any(|w| w.will_wake(cx.waker())) {
                st.acceptors.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    fn close(&self) {
        let (incoming, conns, acceptors) = {
            let mut st = self.ep.lock();
            if st.closed {
                return;
            }
            st.closed = true;
            (
                std::mem::take(&mut st.incoming),
                std::mem::take(&mut st.conns),
                std::mem::take(&mut st.acceptors),
            )
        };
        network::unbind(self.ep.addr, &self.ep);
        for w in acceptors {
            w.wake();
        }
        for (conn, side) in conns {
            if let Some(conn) = conn.upgrade() {
                conn.with(|w| w.close(side, 0, "endpoint closed".into()));
            }
        }
        // Handshakes nobody accepted: already closed above, dropped outside every lock.
        drop(incoming);
    }
}

impl Drop for MemTransport {
    /// Frees the address and refuses handshakes not yet accepted; connections already made go
    /// on (as quinn's do).
    fn drop(&mut self) {
        let incoming = {
            let mut st = self.ep.lock();
            st.closed = true;
            std::mem::take(&mut st.incoming)
        };
        network::unbind(self.ep.addr, &self.ep);
        // Dropped here, outside every lock (each closes its connection's end).
        drop(incoming);
    }
}
