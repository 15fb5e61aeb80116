//! Bringing a link up: dialling and accepting (mutual TLS, then the hello exchange on the
//! control stream), with the checks and the duplicate-link tie-break of
//! [`rusm_cluster_core::link`], and the typed errors a refused side sees.

use super::*;

/// How reading one frame during the handshake ended.
pub(super) enum FrameRead {
    Frame(Frame),
    Wire(WireError),
    Transport(TransportError),
    Eof,
}

pub(super) async fn read_frame<R: RecvStream>(recv: &mut R, dec: &mut FrameDecoder) -> FrameRead {
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
pub(super) fn linking_error(peer: &NodeName, e: TransportError) -> Error {
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

pub(super) fn hello_peers(inner: &NodeInner) -> Vec<PeerAddr> {
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
pub(super) fn dial_failed(peer: &NodeName, e: TransportError) -> Result<Dialled, Error> {
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
/// Accepts connections until the endpoint closes; each handshake runs in its own task.
pub(crate) async fn accept_loop<T: Transport>(node: Weak<NodeInner>, transport: Arc<T>) {
    while let Some(incoming) = transport.accept().await {
        let Some(inner) = node.upgrade() else { break };
        tokio::spawn(accept_one::<T>(Node { inner }, incoming));
    }
}

pub(super) async fn accept_one<T: Transport>(node: Node, incoming: T::Incoming) {
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
pub(super) async fn refuse<C: Connection>(
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
