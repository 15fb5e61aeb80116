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
                reason: RejectReason::from_close_text(&reason),
            }
        }
        other => Error::Transport(other),
    }
}

/// The members a hello, a welcome or the mesh announces to `peer`: the peers linked now, hidden
/// ones and `peer` itself left out.
pub(crate) fn hello_peers(inner: &NodeInner, peer: &NodeName) -> Vec<PeerAddr> {
    let links = lock(&inner.links);
    links
        .up
        .values()
        .filter(|l| !l.hidden && l.peer != *peer)
        .map(|l| PeerAddr {
            name: l.peer.clone(),
            addr: l.listen_addr,
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
    let wire_id = new_link_id(inner);
    let hello = inner.intro.hello(
        hello_peers(inner, &peer),
        wire_id,
        previous_link(inner, &peer),
    );
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
    let answer = match read_frame(&mut recv, &mut dec).await {
        FrameRead::Frame(frame) => inner.intro.on_answer(frame, &peer, conn.peer_identity()),
        FrameRead::Wire(e) => {
            inner.stats.malformed_frames.fetch_add(1, Ordering::Relaxed);
            return Err(reject(&conn, RejectReason::BadHandshake(e.to_string())));
        }
        FrameRead::Transport(e) => return dial_failed(&peer, e),
        // The listener closed the stream; its close says why.
        FrameRead::Eof => return dial_failed(&peer, conn.closed().await),
    };
    let welcomed = match answer {
        DialAnswer::Up(peer) => peer,
        DialAnswer::PeerDialWins => {
            conn.close(close_code::DUPLICATE, b"duplicate link");
            return Ok(Dialled::PeerDialWins);
        }
        DialAnswer::Refused(reason) => {
            conn.close(close_code::REJECTED, b"rejected");
            return Err(Error::Rejected {
                node: peer.clone(),
                reason,
            });
        }
        DialAnswer::Invalid(reason) => return Err(reject(&conn, reason)),
    };
    let registered = {
        let mut links = lock(&inner.links);
        if links.shut_down {
            None
        } else if links.up.contains_key(&peer) {
            // The peer's dial to us came up meanwhile; keep that one.
            conn.close(close_code::DUPLICATE, b"duplicate link");
            return Ok(Dialled::Up);
        } else {
            Some(register(&node, &mut links, &conn, &welcomed, wire_id))
        }
    };
    let Some((link, rx, _)) = registered else {
        conn.close(close_code::NORMAL, b"shutting down");
        return Err(Error::Shutdown);
    };
    announce_up(&node, &link);
    node.inner
        .runtime
        .spawn(run_link(node.clone(), link, conn, send, recv, dec, rx));
    Ok(Dialled::Up)
}

/// Creates the handle of a new link and records it as up (the caller holds the links lock).
/// Accepts connections until the endpoint closes; each handshake runs in its own task.
pub(crate) async fn accept_loop<T: Transport>(node: Weak<NodeInner>, transport: Arc<T>) {
    while let Some(incoming) = transport.accept().await {
        let Some(inner) = node.upgrade() else { break };
        // Bounded: a flood of connections that never finish their hello holds a fixed number
        // of places; past that, new ones are refused at once (dropping one refuses it).
        let Ok(place) = inner.handshakes.clone().try_acquire_owned() else {
            inner.refused_handshake("flood: too many handshakes in progress");
            debug!(node = %inner.name, "incoming connection refused: too many handshakes in progress");
            drop(incoming);
            continue;
        };
        inner
            .runtime
            .clone()
            .spawn(accept_one::<T>(Node { inner }, incoming, place));
    }
}

pub(super) async fn accept_one<T: Transport>(
    node: Node,
    incoming: T::Incoming,
    place: tokio::sync::OwnedSemaphorePermit,
) {
    let inner = &node.inner;
    let timeout = inner.config.handshake_timeout;
    let conn = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            inner.refused_handshake(tls_refusal_key(&e.to_string()));
            warn!(node = %inner.name, error = %e, "incoming connection refused in the TLS handshake");
            return;
        }
        Err(_) => {
            inner.refused_handshake("tls: timed out");
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
            inner.refused_hello("hello: none in time");
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
    let intro = &inner.intro;
    let hello = match first {
        FrameRead::Frame(frame) => intro.on_hello(frame, conn.peer_identity()),
        FrameRead::Wire(e) => {
            inner.stats.malformed_frames.fetch_add(1, Ordering::Relaxed);
            Err(RejectReason::BadHandshake(e.to_string()))
        }
        FrameRead::Transport(_) | FrameRead::Eof => return,
    };
    // Checked against the link table and registered under one lock, so two dials between the
    // same nodes cannot both be kept. A hello from a new incarnation of a linked peer (it
    // restarted) replaces the stale link: that one is torn down first (its capabilities hear of
    // its end before the new link is announced), then the table is checked again.
    let mut replaced = false;
    let registered = loop {
        let attempt = hello.clone().and_then(|hello| {
            let mut links = lock(&inner.links);
            let linked = links.up.get(&hello.name).cloned();
            let creation = linked.as_ref().map(|l| l.peer_creation());
            let table = LinkTable {
                linked: linked.is_some(),
                dialling: links.dialling.contains(&hello.name),
                shutting_down: links.shut_down,
                blocked: links.blocked.contains(&hello.name),
                replaceable: !replaced && creation.is_some_and(|c| c < hello.creation),
                superseded: creation.is_some_and(|c| c > hello.creation),
            };
            admit(&intro.name, &hello.name, table)?;
            // Admitted while linked: the link up is a stale incarnation's, to replace.
            if let Some(stale) = linked {
                return Ok(Err(stale));
            }
            let registered = register(&node, &mut links, &conn, &hello, hello.link);
            Ok(Ok((hello, registered)))
        });
        match attempt {
            Ok(Err(stale)) => {
                info!(node = %inner.name, peer = %stale.peer, "peer restarted; replacing its stale link");
                stale.close_with(DownReason::PeerRestarted);
                stale.wait_finished(DRAIN).await;
                replaced = true;
            }
            Ok(Ok(r)) => break Ok(r),
            Err(e) => break Err(e),
        }
    };
    let (hello, (link, rx, previous)) = match registered {
        Ok(r) => r,
        Err(reason) => {
            warn!(node = %inner.name, %reason, "hello refused");
            return refuse(inner, &conn, &mut send, reason).await;
        }
    };
    let welcome = intro.welcome(&hello, hello_peers(inner, &hello.name), previous);
    let sent = match encode_frame(&welcome) {
        Ok(bytes) => send.write(bytes).await,
        Err(e) => Err(TransportError::ConnectionLost {
            reason: e.to_string(),
        }),
    };
    // The handshake is over: its place is free for the next.
    drop(place);
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
    inner.refused_hello(hello_refusal_key(&reason));
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

/// The key a refused TLS handshake is counted under in the node's report.
fn tls_refusal_key(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.contains("revoked") {
        "tls: revoked certificate"
    } else if e.contains("unknownissuer")
        || e.contains("unknown issuer")
        || e.contains("badsignature")
        || e.contains("decrypt")
        || e.contains("unknown ca")
    {
        "tls: untrusted certificate"
    } else if e.contains("certificate") {
        "tls: bad certificate"
    } else if e.contains("alpn") || e.contains("application protocol") {
        "tls: no common protocol"
    } else {
        "tls: other"
    }
}

/// The key a refused hello is counted under in the node's report.
fn hello_refusal_key(reason: &RejectReason) -> &'static str {
    match reason {
        RejectReason::UnsupportedProtocol { .. } => "hello: unsupported protocol",
        RejectReason::NameMismatch { .. } => "hello: name not in certificate",
        RejectReason::SameName => "hello: same name",
        RejectReason::DuplicateLink => "hello: duplicate link",
        RejectReason::IdentityModeMismatch => "hello: identity mode mismatch",
        RejectReason::ShuttingDown => "hello: shutting down",
        RejectReason::Blocked => "hello: blocked",
        RejectReason::StaleIncarnation => "hello: stale incarnation",
        RejectReason::BadHandshake(_) => "hello: bad handshake",
        _ => "hello: other",
    }
}
