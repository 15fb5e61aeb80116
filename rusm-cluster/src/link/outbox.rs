//! Coalescing ([`Coalescing`], on by default): senders queue envelopes on the link, and one writer per
//! link carries what queued up on shared streams, with at most a few streams unacknowledged.
//! A message sent while nothing is queued or being written goes out at once from the sender's
//! task, on a stream of its own (as on the default path): an idle link pays no task hop, and
//! coalescing starts only once messages queue up behind it. A large message (at least
//! [`ALONE_FROM`] bytes) always goes on a stream of its own, so the small ones queued after it
//! never wait for it to cross.

use super::*;

/// Messages at least this large never join a batch: each goes on a stream of its own from its
/// sender's task (numbered in queue order all the same), so the stack carries them beside the
/// batches instead of the writer carrying them in front of everything queued after them.
pub(super) const ALONE_FROM: usize = 64 << 10;

/// The queue of a coalescing link (see [`Coalescing`]): senders append envelopes, the writer
/// takes whole batches, each becoming one stream.
pub(super) struct Outbox {
    pub(super) config: Coalescing,
    pub(super) state: Mutex<OutboxState>,
    /// Wakes the writer.
    pub(super) ready: Notify,
    /// Bytes that may still be queued; senders wait here when the queue is full.
    pub(super) space: Semaphore,
}

#[derive(Default)]
pub(super) struct OutboxState {
    /// Batches waiting for the writer, oldest first; the last one still takes messages.
    pub(super) batches: VecDeque<Batch>,
    /// Messages in the batch the writer is writing.
    pub(super) writing: usize,
    /// Messages senders are writing themselves, the queue having been empty.
    pub(super) direct: usize,
    /// When the link last had nothing left to write (the writer done with its last batch, or a
    /// direct write over); `None` until it has written anything.
    pub(super) idle_since: Option<std::time::Instant>,
    pub(super) seqs: Numbering,
    /// The link is down: nothing more is queued.
    pub(super) down: bool,
}

/// Envelopes bound for one stream: small ones copied back to back into `tail`, large payloads
/// kept as they are between.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) chunks: Vec<Bytes>,
    pub(super) tail: BytesMut,
    pub(super) bytes: usize,
    /// Queue space the batch holds, given back once it is written.
    pub(super) charged: usize,
    pub(super) messages: usize,
}

impl Batch {
    pub(super) fn into_chunks(mut self) -> Vec<Bytes> {
        if !self.tail.is_empty() {
            self.chunks.push(self.tail.freeze());
        }
        self.chunks
    }
}

impl Outbox {
    pub(super) fn new(config: Coalescing) -> Self {
        let max = config
            .max_queued_bytes
            .clamp(1, u32::MAX as usize)
            .min(Semaphore::MAX_PERMITS);
        Outbox {
            config: Coalescing {
                max_queued_bytes: max,
                ..config
            },
            state: Mutex::new(OutboxState::default()),
            ready: Notify::new(),
            space: Semaphore::new(max),
        }
    }
}

/// Queues one message on a coalescing link; the writer sends it.
pub(super) async fn enqueue(
    link: &LinkHandle,
    outbox: &Outbox,
    from: Option<u64>,
    to: Dest,
    payload: Bytes,
) -> Result<(), SendError> {
    let not_connected = |payload| {
        let node = link.peer.clone();
        Err(SendError::new(Error::NotConnected { node }, payload))
    };
    let Some(active) = link.begin_send() else {
        return not_connected(payload);
    };
    let charge = (payload.len() + 64).min(outbox.config.max_queued_bytes);
    // Waiting for space is cancel safe: nothing is queued or numbered until it is granted.
    let Ok(permit) = outbox.space.acquire_many(charge as u32).await else {
        return not_connected(payload);
    };
    let alone = payload.len() >= ALONE_FROM;
    let direct = {
        let mut state = lock(&outbox.state);
        if state.down {
            return not_connected(payload);
        }
        // Numbered under the queue's lock, so numbers follow queue order.
        let (seq, to) = state.seqs.next(from, to);
        let header = EnvelopeHeader {
            to,
            from,
            seq,
            len: payload.len() as u64,
        };
        // Direct only when nothing is queued or being written, and the link has been idle for a
        // while (read the clock only then: a busy link never does).
        let idle = state.batches.is_empty()
            && state.writing == 0
            && state.direct == 0
            && outbox
                .config
                .direct_after_idle
                .is_some_and(|gap| state.idle_since.is_none_or(|t| t.elapsed() >= gap));
        if alone {
            Some((header, false))
        } else if idle {
            state.direct += 1;
            Some((header, true))
        } else {
            queue(outbox, &mut state, header, &payload, charge);
            None
        }
    };
    if let Some((header, idle)) = direct {
        // Written from here, holding no queue space.
        drop(permit);
        let _writing = idle.then(|| Direct(outbox));
        return link.sender.send_numbered(link, header, payload).await;
    }
    // The space is given back by the writer; the send stays counted in progress until the
    // writer is done with it, so a goodbye waits for the queue to drain.
    permit.forget();
    std::mem::forget(active);
    outbox.ready.notify_one();
    Ok(())
}

/// A sender writing a message itself; the next message queues until it is done.
struct Direct<'a>(&'a Outbox);

impl Drop for Direct<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.direct -= 1;
        state.idle_since = Some(std::time::Instant::now());
    }
}

/// Appends a numbered message to the last batch (or a new one), under the queue's lock.
fn queue(
    outbox: &Outbox,
    state: &mut OutboxState,
    header: EnvelopeHeader,
    payload: &Bytes,
    charge: usize,
) {
    let open = state
        .batches
        .back()
        .is_some_and(|b| b.bytes < outbox.config.max_stream_bytes);
    if !open {
        state.batches.push_back(Batch::default());
    }
    let batch = state.batches.back_mut().expect("a batch was just ensured");
    let size = encoded_header_len(&header) + payload.len();
    encode_header_into(&header, &mut batch.tail);
    if payload.len() <= COALESCE_MAX {
        batch.tail.extend_from_slice(payload);
    } else {
        let head = batch.tail.split().freeze();
        batch.chunks.push(head);
        batch.chunks.push(payload.clone());
    }
    batch.bytes += size;
    batch.charged += charge;
    batch.messages += 1;
}

/// The writer of a coalescing link: takes each batch in turn and writes it on a stream of its
/// own. Never returns: the reader notices a lost connection and ends the link.
pub(super) async fn write_loop<C: Connection>(
    node: &Node,
    conn: &C,
    link: &LinkHandle,
    outbox: &Outbox,
) {
    let stats = &node.inner.stats;
    // Written streams the peer has not yet acknowledged: the stack buffers what a write hands
    // it, so without this bound a fast writer would pile up stream after stream in there.
    let mut unacked = FuturesUnordered::new();
    let mut priority = i32::MAX;
    let acked = |r: Option<Result<(), TransportError>>| {
        if let Some(Err(e)) = r {
            warn!(node = %node.inner.name, peer = %link.peer, error = %e, "coalesced stream not delivered");
        }
    };
    loop {
        while let Some(r) = unacked.next().now_or_never() {
            acked(r);
            if unacked.is_empty() {
                break;
            }
        }
        while unacked.len() >= MAX_UNACKED_STREAMS {
            acked(unacked.next().await);
        }
        let batch = loop {
            let ready = outbox.ready.notified();
            {
                let mut state = lock(&outbox.state);
                if let Some(batch) = state.batches.pop_front() {
                    state.writing = batch.messages;
                    break batch;
                }
            }
            ready.await;
        };
        let (messages, charged) = (batch.messages, batch.charged);
        let chunks = batch.into_chunks();
        let written = match conn.open_uni().await {
            Ok(mut stream) => {
                link.streams.fetch_add(1, Ordering::Relaxed);
                // Each stream ranks below the one before, so the stack sends them one after
                // another rather than interleaved, and the peer reads them nearly in order
                // instead of holding thousands of early messages back.
                priority = priority.checked_sub(1).unwrap_or(i32::MAX);
                stream.set_priority(priority);
                let mut out = chunks.clone();
                let written = stream
                    .write_all_chunks(&mut out)
                    .await
                    .and_then(|()| stream.finish());
                if written.is_ok() {
                    unacked.push(async move { stream.delivered().await });
                }
                written
            }
            Err(e) => Err(e),
        };
        outbox.space.add_permits(charged);
        {
            let mut state = lock(&outbox.state);
            state.writing = 0;
            if state.batches.is_empty() {
                state.idle_since = Some(std::time::Instant::now());
            }
        }
        match written {
            Ok(()) => {
                link.count_sent(&node.inner, messages);
                link.end_sends(messages);
            }
            Err(e) if e.is_connection_error() => {
                // Accepted with `Ok` and now in no one's hands, like messages in flight on a
                // stream: counted sent, and lost in transit once the peer relinks.
                link.count_sent(&node.inner, messages);
                warn!(node = %node.inner.name, peer = %link.peer, error = %e, messages, "coalesced stream went down with the link");
                link.end_sends(messages);
                std::future::pending::<()>().await;
            }
            Err(e) => {
                stats
                    .send_failures
                    .fetch_add(messages as u64, Ordering::Relaxed);
                warn!(node = %node.inner.name, peer = %link.peer, error = %e, messages, "coalesced stream failed");
                // Tell the peer which numbers will not come, so their pairs do not wait.
                for header in batch_headers(chunks) {
                    let _ = link.control.send(Frame::Lost {
                        from: header.from,
                        to: header.to,
                        seq: header.seq,
                    });
                }
                link.end_sends(messages);
            }
        }
    }
}

/// The headers of the envelopes in a batch (read back only when the batch failed).
pub(super) fn batch_headers(chunks: Vec<Bytes>) -> Vec<EnvelopeHeader> {
    let mut asm = MessageAssembler::new(Limits {
        max_message_size: usize::MAX,
        max_frame_size: 0,
        max_header_size: usize::MAX,
    });
    let mut out = Vec::new();
    for chunk in chunks {
        if asm.push(chunk, &mut out).is_err() {
            break;
        }
    }
    out.into_iter().map(|m| m.header).collect()
}
