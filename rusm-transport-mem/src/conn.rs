//! The handles the cluster holds: [`MemConnection`], [`MemIncoming`], [`MemSend`] and
//! [`MemRecv`]. Each is a thin poll function over the connection's [`Wire`](crate::wire), which
//! holds all state; the handles of one end share a [`SideHandle`] whose drop closes that end
//! (code 0, empty reason), as dropping the last handle of a quinn connection does.

use std::fmt;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use rusm_cluster_core::identity::PeerIdentity;
use rusm_cluster_core::rustls::pki_types::CertificateDer;
use rusm_cluster_core::transport::{self as core, TransportError};

use crate::wire::{ConnInner, CLIENT};

/// What `rtt()` reports on a link without latency.
const NOMINAL_RTT: Duration = Duration::from_micros(10);

/// One end of a connection, shared by every handle of that end; closing it implicitly when the
/// last of them goes.
pub(crate) struct SideHandle {
    pub(crate) conn: Arc<ConnInner>,
    pub(crate) side: usize,
}

impl SideHandle {
    fn with<R>(&self, f: impl FnOnce(&mut crate::wire::Wire, usize) -> R) -> R {
        let side = self.side;
        self.conn.with(|w| f(w, side))
    }
}

impl Drop for SideHandle {
    fn drop(&mut self) {
        self.with(|w, side| w.close(side, 0, String::new()));
    }
}

impl fmt::Debug for SideHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = if self.side == CLIENT {
            "client"
        } else {
            "server"
        };
        write!(f, "{:?} ({side} end)", self.conn)
    }
}

/// An accepted connection whose TLS handshake is still in progress: resolves to the
/// [`MemConnection`] once the dialler's certificate is verified, or to
/// [`TransportError::Handshake`] when it is refused (either way round).
#[derive(Debug)]
pub struct MemIncoming {
    handle: Option<Arc<SideHandle>>,
    remote: SocketAddr,
}

impl MemIncoming {
    pub(crate) fn new(handle: Arc<SideHandle>, remote: SocketAddr) -> Self {
        MemIncoming {
            handle: Some(handle),
            remote,
        }
    }
}

impl Future for MemIncoming {
    type Output = Result<MemConnection, TransportError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(handle) = this.handle.as_ref() else {
            return Poll::Ready(Err(TransportError::ConnectionLost {
                reason: "incoming connection polled after completion".into(),
            }));
        };
        let leaf = match handle.with(|w, side| w.poll_handshake(side, cx)) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        let handle = this.handle.take().expect("checked above");
        Poll::Ready(leaf.and_then(|leaf| MemConnection::new(handle, leaf, this.remote)))
    }
}

/// An in-memory connection whose peer certificate was verified by a real TLS 1.3 handshake.
#[derive(Clone, Debug)]
pub struct MemConnection {
    handle: Arc<SideHandle>,
    peer: Arc<PeerIdentity>,
    remote: SocketAddr,
}

impl MemConnection {
    pub(crate) fn new(
        handle: Arc<SideHandle>,
        leaf: CertificateDer<'static>,
        remote: SocketAddr,
    ) -> Result<Self, TransportError> {
        let peer = PeerIdentity::from_leaf(leaf).map_err(|e| TransportError::Handshake {
            reason: e.to_string(),
        })?;
        Ok(MemConnection {
            handle,
            peer: Arc::new(peer),
            remote,
        })
    }

    fn send_stream(&self, id: u64) -> MemSend {
        MemSend {
            handle: self.handle.clone(),
            id,
        }
    }

    fn recv_stream(&self, id: u64) -> MemRecv {
        MemRecv {
            handle: self.handle.clone(),
            id,
        }
    }
}

impl core::Connection for MemConnection {
    type SendStream = MemSend;
    type RecvStream = MemRecv;

    fn peer_identity(&self) -> &PeerIdentity {
        &self.peer
    }

    fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    fn rtt(&self) -> Option<Duration> {
        Some((self.handle.conn.latency() * 2).max(NOMINAL_RTT))
    }

    async fn open_bi(&self) -> Result<(MemSend, MemRecv), TransportError> {
        let id = self.handle.with(|w, side| w.open_bi(side))?;
        Ok((self.send_stream(id), self.recv_stream(id)))
    }

    async fn accept_bi(&self) -> Result<(MemSend, MemRecv), TransportError> {
        let id = poll_fn(|cx| self.handle.with(|w, side| w.poll_accept_bi(side, cx))).await?;
        Ok((self.send_stream(id), self.recv_stream(id)))
    }

    async fn open_uni(&self) -> Result<MemSend, TransportError> {
        let id = poll_fn(|cx| self.handle.with(|w, side| w.poll_open_uni(side, cx))).await?;
        Ok(self.send_stream(id))
    }

    async fn accept_uni(&self) -> Result<Option<MemRecv>, TransportError> {
        let id = poll_fn(|cx| self.handle.with(|w, side| w.poll_accept_uni(side, cx))).await?;
        Ok(id.map(|id| self.recv_stream(id)))
    }

    fn close(&self, code: u32, reason: &[u8]) {
        let reason = String::from_utf8_lossy(reason).into_owned();
        self.handle
            .with(|w, side| w.close(side, u64::from(code), reason));
    }

    async fn closed(&self) -> TransportError {
        poll_fn(|cx| self.handle.with(|w, side| w.poll_closed(side, cx))).await
    }
}

/// The writing half of an in-memory stream. Dropping it finishes the stream (unless it was
/// finished, reset or stopped), as quinn does.
#[derive(Debug)]
pub struct MemSend {
    handle: Arc<SideHandle>,
    id: u64,
}

impl core::SendStream for MemSend {
    async fn write(&mut self, data: Bytes) -> Result<(), TransportError> {
        let mut data = data;
        let id = self.id;
        poll_fn(|cx| {
            self.handle
                .with(|w, side| w.poll_write(side, id, &mut data, cx))
        })
        .await
    }

    fn finish(&mut self) -> Result<(), TransportError> {
        let id = self.id;
        self.handle.with(|w, side| w.finish(side, id))
    }

    async fn delivered(&mut self) -> Result<(), TransportError> {
        let id = self.id;
        poll_fn(|cx| self.handle.with(|w, side| w.poll_delivered(side, id, cx))).await
    }

    fn reset(&mut self, code: u32) {
        let id = self.id;
        self.handle
            .with(|w, side| w.reset(side, id, u64::from(code)));
    }
}

impl Drop for MemSend {
    fn drop(&mut self) {
        let id = self.id;
        self.handle.with(|w, side| w.drop_send(side, id));
    }
}

/// The reading half of an in-memory stream. Dropping it before the end of the stream stops the
/// stream with code 0, as quinn does.
#[derive(Debug)]
pub struct MemRecv {
    handle: Arc<SideHandle>,
    id: u64,
}

impl core::RecvStream for MemRecv {
    async fn read_chunk(&mut self) -> Result<Option<Bytes>, TransportError> {
        let id = self.id;
        poll_fn(|cx| self.handle.with(|w, side| w.poll_read(side, id, cx))).await
    }

    fn stop(&mut self, code: u32) {
        let id = self.id;
        self.handle
            .with(|w, side| w.stop(side, id, u64::from(code)));
    }
}

impl Drop for MemRecv {
    fn drop(&mut self) {
        let id = self.id;
        self.handle.with(|w, side| w.drop_recv(side, id));
    }
}
