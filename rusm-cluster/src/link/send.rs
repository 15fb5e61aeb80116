//! The default send path: each message on a uni-stream of its own, written from the sender's
//! task (so QUIC's stream credit and flow control slow a fast sender down directly, and no
//! message crosses a task boundary on the way out). A send dropped mid-way resets its stream
//! and reports its number lost.

use super::*;

/// The typed half of a link's sending side, erased so the handle is not generic.
pub(super) trait LinkSender: Send + Sync {
    fn send<'a>(
        &'a self,
        link: &'a LinkHandle,
        from: Option<u64>,
        to: Dest,
        payload: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<(), SendError>> + Send + 'a>>;
    /// Writes one message already numbered (by a coalescing link's queue) on a stream of its
    /// own; the caller counts it in progress.
    fn send_numbered<'a>(
        &'a self,
        link: &'a LinkHandle,
        header: EnvelopeHeader,
        payload: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<(), SendError>> + Send + 'a>>;
    fn rtt(&self) -> Option<Duration>;
    fn close(&self, code: u32, reason: &str);
}

pub(super) struct TypedSender<C: Connection>(pub(super) C);

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
    fn send_numbered<'a>(
        &'a self,
        link: &'a LinkHandle,
        header: EnvelopeHeader,
        payload: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<(), SendError>> + Send + 'a>> {
        Box::pin(send_numbered(&self.0, link, header, payload))
    }
    fn rtt(&self) -> Option<Duration> {
        self.0.rtt()
    }
    fn close(&self, code: u32, reason: &str) {
        self.0.close(code, reason.as_bytes());
    }
}

/// Writes one message on a stream of its own, from the sender's task.
pub(super) async fn send_message<C: Connection>(
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
    // A large message waits for its share of the in-flight allowance first (cancel safe:
    // nothing is numbered or opened yet).
    let allowance = match large_allowance(link, payload.len()).await {
        Ok(a) => a,
        Err(()) => {
            let node = link.peer.clone();
            return Err(SendError::new(Error::NotConnected { node }, payload));
        }
    };
    let stream = match open_stream(conn, link).await {
        Ok(s) => s,
        Err(error) => return Err(SendError::new(error, payload)),
    };
    // Numbered only once the stream exists, so a send cancelled while waiting for stream credit
    // leaves no gap; from here on, the guard reports the number lost unless the write finishes.
    let (seq, to) = link.next_seq(from, to);
    let header = EnvelopeHeader {
        to,
        from,
        seq,
        len: payload.len() as u64,
    };
    write_message(link, stream, header, payload, allowance).await
}

/// The share of the link's in-flight allowance a message of `len` bytes needs, if it is large
/// enough to need one (see [`InFlight`]).
async fn large_allowance(
    link: &LinkHandle,
    len: usize,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, ()> {
    let f = &link.in_flight;
    if len < f.from_bytes {
        return Ok(None);
    }
    let n = len.clamp(1, f.max) as u32;
    f.allowance
        .clone()
        .acquire_many_owned(n)
        .await
        .map(Some)
        .map_err(|_| ())
}

/// Opens a message's stream; the error a sender sees if it cannot.
async fn open_stream<C: Connection>(conn: &C, link: &LinkHandle) -> Result<C::SendStream, Error> {
    match conn.open_uni().await {
        Ok(s) => {
            link.streams.fetch_add(1, Ordering::Relaxed);
            Ok(s)
        }
        Err(e) if e.is_connection_error() => Err(Error::NotConnected {
            node: link.peer.clone(),
        }),
        Err(e) => Err(Error::Transport(e)),
    }
}

/// Writes one message numbered before its stream opened (a coalescing link writing directly
/// while its queue is empty): if the stream never opens, or the send is dropped meanwhile, the
/// peer is told the number is lost, as for a write that fails.
pub(super) async fn send_numbered<C: Connection>(
    conn: &C,
    link: &LinkHandle,
    header: EnvelopeHeader,
    payload: Bytes,
) -> Result<(), SendError> {
    let mut unopened = LostGuard::<C::SendStream> {
        link,
        notice: Some(header.clone()),
        stream: None,
    };
    let failed = |error| {
        if let Some(node) = link.node.upgrade() {
            node.stats.send_failures.fetch_add(1, Ordering::Relaxed);
        }
        Err(SendError::new(error, payload.clone()))
    };
    let Ok(allowance) = large_allowance(link, payload.len()).await else {
        let node = link.peer.clone();
        return failed(Error::NotConnected { node });
    };
    let stream = match open_stream(conn, link).await {
        Ok(s) => s,
        Err(error) => return failed(error),
    };
    unopened.notice = None;
    write_message(link, stream, header, payload, allowance).await
}

/// Writes a numbered message on its open stream, counting the outcome.
async fn write_message<S: SendStream>(
    link: &LinkHandle,
    stream: S,
    header: EnvelopeHeader,
    payload: Bytes,
    allowance: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<(), SendError> {
    let mut buf =
        BytesMut::with_capacity(encoded_header_len(&header) + payload.len().min(COALESCE_MAX));
    encode_header_into(&header, &mut buf);
    let mut lost = LostGuard {
        link,
        notice: Some(header),
        stream: Some(stream),
    };
    let stream = lost.stream.as_mut().expect("the stream was just put there");
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
            if let (Some(allowance), Some(mut stream), Some(node)) =
                (allowance, lost.stream.take(), link.node.upgrade())
            {
                // Given back once the peer has the whole message (or the link failed); waited
                // for on the node's runtime, whatever the sender's.
                node.runtime.spawn(async move {
                    let _ = stream.delivered().await;
                    drop(allowance);
                });
            }
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

/// Unless disarmed, resets the message's stream, if it has one, with
/// [`stream_code::CANCELLED`] (so the peer drops what arrived of it instead of reading a
/// truncated message) and tells the peer the numbered message will never arrive whole.
pub(super) struct LostGuard<'a, S: SendStream> {
    pub(super) link: &'a LinkHandle,
    pub(super) notice: Option<EnvelopeHeader>,
    pub(super) stream: Option<S>,
}

impl<S: SendStream> Drop for LostGuard<'_, S> {
    fn drop(&mut self) {
        if let Some(h) = self.notice.take() {
            if let Some(stream) = &mut self.stream {
                stream.reset(stream_code::CANCELLED);
            }
            let _ = self.link.control.send(Frame::Lost {
                from: h.from,
                to: h.to,
                seq: h.seq,
            });
        }
    }
}

/// Counts a send in progress (so a goodbye waits for it); refused once the link is closing.
pub(super) struct ActiveSend<'a>(pub(super) &'a LinkHandle);

impl Drop for ActiveSend<'_> {
    fn drop(&mut self) {
        self.0.end_sends(1);
    }
}
