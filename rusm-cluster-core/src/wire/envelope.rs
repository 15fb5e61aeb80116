//! The message envelope: a uni-stream carries one or more messages back to back (one, unless the
//! sender coalesces), each laid out as a `u16` big-endian header length, the [`EnvelopeHeader`]
//! in a small fixed binary layout, then the payload bytes as they are (the payload is never
//! serialized, and a large one is not copied when it arrives in one chunk).
//!
//! Header layout (all integers big-endian): a flags byte (bit 0: `from` present, bit 1: the
//! destination is a name; other bits must be 0), `seq: u64`, `len: u64`, then `from: u64` if
//! present, then the destination: `id: u64, creation: u64` for a pid, or the name's UTF-8 bytes to
//! the end of the header. This is the hot path, so it is written by hand rather than through
//! MessagePack (which the control frames use); it is bounded by `max_header_size` like any input.
//!
//! The header names the destination, the sending process, the message's number in its
//! (sender, destination) pair — which lets the receiver restore per-pair order although messages
//! travel on separate streams — and the payload length, so an oversized message is refused
//! from its first bytes, the next envelope of a coalesced stream is found without scanning, and a
//! truncated one is recognised.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::codec::WireError;
use super::Limits;
use crate::transport::{stream_code, RecvStream, TransportError};

/// Where a message goes on the receiving node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Dest {
    /// A process by its id and its node's incarnation.
    Pid {
        /// The process id on the receiving node.
        id: u64,
        /// The receiving node's `creation` the pid was minted under.
        creation: u64,
    },
    /// A locally registered name on the receiving node.
    Name(String),
    /// A global name the receiving node owns (see [`crate::registry`]); delivered only while
    /// the receiver's claim on it wins, so a message never reaches a process that lost it.
    Global(String),
}

/// The header of one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeHeader {
    /// The destination on the receiving node.
    pub to: Dest,
    /// The sending process's id on the sending node (`None` when sent from outside a process).
    pub from: Option<u64>,
    /// The message's number within its (from, to) pair on this link, starting at 1.
    pub seq: u64,
    /// The payload length in bytes.
    pub len: u64,
}

const FLAG_FROM: u8 = 1;
const FLAG_NAME: u8 = 2;
/// With `FLAG_NAME`: the name is a global one.
const FLAG_GLOBAL: u8 = 4;

/// Encodes the length-prefixed header (the payload follows it on the stream).
pub fn encode_header(header: &EnvelopeHeader) -> Bytes {
    let mut out = BytesMut::with_capacity(encoded_header_len(header));
    encode_header_into(header, &mut out);
    out.freeze()
}

/// The length of `header` once encoded, its length prefix included.
pub fn encoded_header_len(header: &EnvelopeHeader) -> usize {
    let dest = match &header.to {
        Dest::Name(n) | Dest::Global(n) => n.len(),
        Dest::Pid { .. } => 16,
    };
    2 + 1 + 16 + if header.from.is_some() { 8 } else { 0 } + dest
}

/// Appends the length-prefixed header to `out` (the payload follows it on the stream).
pub fn encode_header_into(header: &EnvelopeHeader, out: &mut BytesMut) {
    let start = out.len();
    out.reserve(encoded_header_len(header));
    out.put_u16(0);
    let mut flags = 0;
    if header.from.is_some() {
        flags |= FLAG_FROM;
    }
    match header.to {
        Dest::Name(_) => flags |= FLAG_NAME,
        Dest::Global(_) => flags |= FLAG_NAME | FLAG_GLOBAL,
        Dest::Pid { .. } => {}
    }
    out.put_u8(flags);
    out.put_u64(header.seq);
    out.put_u64(header.len);
    if let Some(from) = header.from {
        out.put_u64(from);
    }
    match &header.to {
        Dest::Pid { id, creation } => {
            out.put_u64(*id);
            out.put_u64(*creation);
        }
        Dest::Name(n) | Dest::Global(n) => out.put_slice(n.as_bytes()),
    }
    // A name long enough to overflow the u16 prefix is refused by every receiver (their
    // `max_header_size` is far below it); saturate rather than wrap.
    let len = u16::try_from(out.len() - start - 2).unwrap_or(u16::MAX);
    out[start..start + 2].copy_from_slice(&len.to_be_bytes());
}

/// Decodes a header (without its length prefix). Never panics on any input.
pub fn decode_header(mut b: &[u8]) -> Result<EnvelopeHeader, String> {
    use bytes::Buf;
    let need = |b: &[u8], n: usize| {
        if b.len() < n {
            Err(format!(
                "header ends early ({} bytes left, {n} needed)",
                b.len()
            ))
        } else {
            Ok(())
        }
    };
    need(b, 17)?;
    let flags = b.get_u8();
    if flags & !(FLAG_FROM | FLAG_NAME | FLAG_GLOBAL) != 0
        || flags & (FLAG_NAME | FLAG_GLOBAL) == FLAG_GLOBAL
    {
        return Err(format!("unknown header flags {flags:#04x}"));
    }
    let seq = b.get_u64();
    let len = b.get_u64();
    let from = if flags & FLAG_FROM != 0 {
        need(b, 8)?;
        Some(b.get_u64())
    } else {
        None
    };
    let to = if flags & FLAG_NAME != 0 {
        let name = std::str::from_utf8(b).map_err(|e| format!("name is not UTF-8: {e}"))?;
        if flags & FLAG_GLOBAL != 0 {
            Dest::Global(name.to_string())
        } else {
            Dest::Name(name.to_string())
        }
    } else {
        need(b, 16)?;
        let id = b.get_u64();
        let creation = b.get_u64();
        if !b.is_empty() {
            return Err(format!("{} stray bytes after the header", b.len()));
        }
        Dest::Pid { id, creation }
    };
    Ok(EnvelopeHeader { to, from, seq, len })
}

/// A message read whole from its stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadMessage {
    /// Its header.
    pub header: EnvelopeHeader,
    /// Its payload (`header.len` bytes).
    pub payload: Bytes,
}

/// A message stream that could not be read whole. When `header` is known, the receiver knows
/// which message of which pair was lost and does not wait for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The payload is over the limit; the stream was stopped after the header, unbuffered.
    #[error("message of {} bytes is over the limit of {max}", header.len)]
    TooLarge {
        /// The refused message's header.
        header: EnvelopeHeader,
        /// The limit.
        max: usize,
    },
    /// A header is wrong, or the stream ended inside a message (or before any); the stream was
    /// stopped.
    #[error("malformed message: {error}")]
    Malformed {
        /// The header, if it decoded.
        header: Option<EnvelopeHeader>,
        /// What is wrong.
        error: WireError,
    },
    /// The stream failed (reset by the sender, connection lost).
    #[error("message stream failed: {error}")]
    Transport {
        /// The header, if it had arrived.
        header: Option<EnvelopeHeader>,
        /// The transport error.
        error: TransportError,
    },
}

impl ReadError {
    /// The header of the lost message, if it had arrived.
    pub fn header(&self) -> Option<&EnvelopeHeader> {
        match self {
            ReadError::TooLarge { header, .. } => Some(header),
            ReadError::Malformed { header, .. } | ReadError::Transport { header, .. } => {
                header.as_ref()
            }
        }
    }
}

impl ReadError {
    /// The code to stop the stream with after this error (`None` when the stream already
    /// failed on its own).
    pub fn stop_code(&self) -> Option<u32> {
        match self {
            ReadError::TooLarge { .. } => Some(stream_code::TOO_LARGE),
            ReadError::Malformed { .. } => Some(stream_code::MALFORMED),
            ReadError::Transport { .. } => None,
        }
    }
}

/// Payloads up to this size are copied out of the received chunk, so a message waiting in a
/// mailbox holds its own few bytes rather than the transport's whole receive buffer (which would
/// make a link's memory budget a fiction); larger ones that arrive within one chunk are slices of
/// it.
pub const COPY_MAX: usize = 4 << 10;

/// Splits a stream into its messages, sans-IO, enforcing `limits` before buffering: a header
/// over `max_header_size` or a payload over `max_message_size` is refused from the header alone.
/// A payload over [`COPY_MAX`] that arrives within one chunk is a slice of that chunk (no copy).
///
/// A stream carries one or more messages; one that ends inside a message, or before any, is
/// malformed.
#[derive(Debug)]
pub struct MessageAssembler {
    limits: Limits,
    /// Header bytes received before the header was complete.
    pending: BytesMut,
    /// The header of the message being read.
    header: Option<EnvelopeHeader>,
    want: usize,
    have: usize,
    single: Option<Bytes>,
    multi: Option<BytesMut>,
    /// Messages completed on this stream.
    done: u64,
    /// What is left of a chunk after a header, kept while the caller finds credit for the
    /// message (see [`push_gated`](Self::push_gated)).
    stash: Option<(Bytes, usize)>,
    /// A header was read and its payload waits for [`grant`](Self::grant).
    awaiting: bool,
}

/// How far [`MessageAssembler::push_gated`] got with a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The whole chunk was taken.
    Consumed,
    /// A message header was read (see [`MessageAssembler::header`]) and the rest of the chunk
    /// is kept until the caller grants the message its memory with
    /// [`MessageAssembler::grant`] and calls [`MessageAssembler::resume`].
    NeedCredit,
}

impl MessageAssembler {
    /// An assembler for one stream.
    pub fn new(limits: Limits) -> Self {
        MessageAssembler {
            limits,
            pending: BytesMut::new(),
            header: None,
            want: 0,
            have: 0,
            single: None,
            multi: None,
            done: 0,
            stash: None,
            awaiting: false,
        }
    }

    /// The header of the message being read, once it has arrived.
    pub fn header(&self) -> Option<&EnvelopeHeader> {
        self.header.as_ref()
    }

    /// Feeds the next chunk of the stream, pushing every message it completes onto `out`. After
    /// an error, stop the stream with [`ReadError::stop_code`] (or use
    /// [`push_from`](Self::push_from), which does) and drop the assembler (the messages already
    /// pushed are whole and good).
    pub fn push(&mut self, chunk: Bytes, out: &mut Vec<ReadMessage>) -> Result<(), ReadError> {
        self.push_inner(chunk, 0, out, false).map(|_| ())
    }

    /// [`push`](Self::push) that stops after each message header, before any of its payload is
    /// taken, so the caller can charge the message's declared length to a memory budget first
    /// (and stop reading the stream while the budget is spent): on [`Pushed::NeedCredit`] the
    /// rest of the chunk is kept, and [`grant`](Self::grant) then [`resume`](Self::resume) go
    /// on. At most one message completes per call, so a caller can hand each message the credit
    /// granted for it.
    pub fn push_gated(
        &mut self,
        chunk: Bytes,
        out: &mut Vec<ReadMessage>,
    ) -> Result<Pushed, ReadError> {
        debug_assert!(
            !self.awaiting,
            "push_gated while a message waits for credit"
        );
        self.push_inner(chunk, 0, out, true)
    }

    /// The message whose header [`push_gated`](Self::push_gated) stopped at may now be read.
    pub fn grant(&mut self) {
        self.awaiting = false;
    }

    /// Bytes of a chunk kept while a message waits for credit.
    pub fn stashed_len(&self) -> usize {
        self.stash
            .as_ref()
            .map_or(0, |(chunk, pos)| chunk.len() - pos)
    }

    /// Whether a header was read and its message waits for [`grant`](Self::grant).
    pub fn is_awaiting_credit(&self) -> bool {
        self.awaiting
    }

    /// Goes on with the chunk [`push_gated`](Self::push_gated) kept, after a
    /// [`grant`](Self::grant).
    pub fn resume(&mut self, out: &mut Vec<ReadMessage>) -> Result<Pushed, ReadError> {
        debug_assert!(!self.awaiting, "resume before grant");
        // With nothing kept, an empty chunk still completes a message with no payload.
        let (chunk, pos) = self.stash.take().unwrap_or_default();
        self.push_inner(chunk, pos, out, true)
    }

    fn push_inner(
        &mut self,
        chunk: Bytes,
        start: usize,
        out: &mut Vec<ReadMessage>,
        gated: bool,
    ) -> Result<Pushed, ReadError> {
        // Walked by offset: the chunk is only sliced (a reference count) for a large payload,
        // and kept whole, with the offset, while a message waits for credit.
        let mut pos = start;
        loop {
            if self.header.is_none() {
                if pos == chunk.len() {
                    return Ok(Pushed::Consumed);
                }
                let Some(used) = self.take_header(&chunk[pos..])? else {
                    return Ok(Pushed::Consumed);
                };
                pos += used;
                if gated {
                    self.awaiting = true;
                    if pos < chunk.len() {
                        self.stash = Some((chunk, pos));
                    }
                    return Ok(Pushed::NeedCredit);
                }
            }
            // In a message: take its payload from the chunk.
            let take = (self.want - self.have).min(chunk.len() - pos);
            self.add_payload(&chunk, pos, take);
            pos += take;
            if self.have == self.want {
                out.push(self.complete());
            } else {
                return Ok(Pushed::Consumed);
            }
        }
    }

    /// [`push`](Self::push) for a chunk read from `stream`: a refused chunk also stops the
    /// stream, with the code the refusal calls for.
    pub fn push_from<R: RecvStream>(
        &mut self,
        stream: &mut R,
        chunk: Bytes,
        out: &mut Vec<ReadMessage>,
    ) -> Result<(), ReadError> {
        self.push(chunk, out).inspect_err(|e| {
            if let Some(code) = e.stop_code() {
                stream.stop(code);
            }
        })
    }

    /// Reads a header from the front of `data` (after what `pending` holds): how many bytes of
    /// `data` it took once the header is complete, `None` when `data` ended first (and went
    /// into `pending`).
    fn take_header(&mut self, data: &[u8]) -> Result<Option<usize>, ReadError> {
        if self.pending.is_empty() && data.len() >= 2 {
            let hlen = u16::from_be_bytes([data[0], data[1]]) as usize;
            self.check_header_len(hlen)?;
            if data.len() < 2 + hlen {
                self.pending.extend_from_slice(data);
                return Ok(None);
            }
            self.start_message(&data[2..2 + hlen])?;
            return Ok(Some(2 + hlen));
        }
        // The header straddles chunks: gather exactly its bytes, no more.
        let mut used = 0;
        if self.pending.len() < 2 {
            used = (2 - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..used]);
            if self.pending.len() < 2 {
                return Ok(None);
            }
        }
        let hlen = u16::from_be_bytes([self.pending[0], self.pending[1]]) as usize;
        self.check_header_len(hlen)?;
        let n = (2 + hlen - self.pending.len()).min(data.len() - used);
        self.pending.extend_from_slice(&data[used..used + n]);
        used += n;
        if self.pending.len() < 2 + hlen {
            return Ok(None);
        }
        let head = std::mem::take(&mut self.pending);
        self.start_message(&head[2..2 + hlen])?;
        Ok(Some(used))
    }

    /// Decodes a message's header and checks its length against the limit.
    fn start_message(&mut self, raw: &[u8]) -> Result<(), ReadError> {
        let header = decode_header(raw).map_err(|why| ReadError::Malformed {
            header: None,
            error: WireError::Malformed {
                what: "message header",
                why,
            },
        })?;
        if header.len > self.limits.max_message_size as u64 {
            return Err(ReadError::TooLarge {
                header,
                max: self.limits.max_message_size,
            });
        }
        self.want = header.len as usize;
        self.have = 0;
        self.header = Some(header);
        Ok(())
    }

    fn check_header_len(&self, hlen: usize) -> Result<(), ReadError> {
        if hlen > self.limits.max_header_size {
            return Err(ReadError::Malformed {
                header: None,
                error: WireError::FrameTooLarge {
                    len: hlen,
                    max: self.limits.max_header_size,
                },
            });
        }
        Ok(())
    }

    /// Adds `chunk[pos..pos + take]` to the payload being read.
    fn add_payload(&mut self, chunk: &Bytes, pos: usize, take: usize) {
        if take == 0 {
            return;
        }
        self.have += take;
        let part = &chunk[pos..pos + take];
        if let Some(m) = self.multi.as_mut() {
            m.extend_from_slice(part);
        } else if self.want <= COPY_MAX && take == self.want {
            // A small payload whole in this chunk: its own exact copy.
            self.single = Some(Bytes::copy_from_slice(part));
        } else if self.want <= COPY_MAX || self.single.is_some() {
            let mut m = BytesMut::with_capacity(self.want);
            if let Some(first) = self.single.take() {
                m.extend_from_slice(&first);
            }
            m.extend_from_slice(part);
            self.multi = Some(m);
        } else {
            self.single = Some(chunk.slice(pos..pos + take));
        }
    }

    fn complete(&mut self) -> ReadMessage {
        let header = self
            .header
            .take()
            .expect("a message in progress has a header");
        let payload = match (self.multi.take(), self.single.take()) {
            (Some(m), _) => m.freeze(),
            (None, Some(b)) => b,
            (None, None) => Bytes::new(),
        };
        self.done += 1;
        ReadMessage { header, payload }
    }

    /// The stream ended: `Ok` when it ended between messages after at least one, else why it
    /// is incomplete.
    pub fn finish(self) -> Result<(), ReadError> {
        if let Some(header) = self.header {
            return Err(ReadError::Malformed {
                header: Some(header),
                error: WireError::Truncated {
                    have: self.have,
                    want: self.want,
                },
            });
        }
        if !self.pending.is_empty() || self.done == 0 {
            return Err(ReadError::Malformed {
                header: None,
                error: WireError::Truncated {
                    have: self.pending.len(),
                    want: 2,
                },
            });
        }
        Ok(())
    }

    /// A failure of the stream itself, with the header of the message in progress if it had
    /// arrived.
    pub fn failed(&self, error: TransportError) -> ReadError {
        ReadError::Transport {
            header: self.header.clone(),
            error,
        }
    }
}

/// Reads a whole uni-stream into `out` (see [`MessageAssembler`]), stopping the stream when the
/// input is refused. The messages pushed before an error are whole and good. Buffers the whole
/// stream: a reader facing untrusted peers takes it chunk by chunk, within a memory budget.
pub async fn read_messages_into<R: RecvStream>(
    stream: &mut R,
    mut asm: MessageAssembler,
    out: &mut Vec<ReadMessage>,
) -> Result<(), ReadError> {
    loop {
        match stream.read_chunk().await {
            Ok(Some(chunk)) => asm.push_from(stream, chunk, out)?,
            Ok(None) => return asm.finish(),
            Err(e) => return Err(asm.failed(e)),
        }
    }
}

/// Reads a uni-stream that carries exactly one message, enforcing `limits` before buffering: a
/// header over `max_header_size` or a payload over `max_message_size` stops the stream at once,
/// and a second message is refused as malformed.
pub async fn read_message<R: RecvStream>(
    stream: &mut R,
    limits: &Limits,
) -> Result<ReadMessage, ReadError> {
    let mut out = Vec::with_capacity(1);
    read_messages_into(stream, MessageAssembler::new(*limits), &mut out).await?;
    let mut messages = out.into_iter();
    match (messages.next(), messages.next()) {
        (Some(m), None) => Ok(m),
        (first, _) => Err(ReadError::Malformed {
            header: first.map(|m| m.header),
            error: WireError::Malformed {
                what: "message stream",
                why: "more than one message on a stream read as one".into(),
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A stream made of fixed chunks, for testing the reader without a network.
    struct Chunks {
        chunks: VecDeque<Result<Bytes, TransportError>>,
        stopped: Option<u32>,
    }
    impl Chunks {
        fn new(data: &[u8], size: usize) -> Self {
            Chunks {
                chunks: data
                    .chunks(size.max(1))
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect(),
                stopped: None,
            }
        }
    }
    impl RecvStream for Chunks {
        async fn read_chunk(&mut self) -> Result<Option<Bytes>, TransportError> {
            self.chunks.pop_front().transpose()
        }
        fn stop(&mut self, code: u32) {
            self.stopped = Some(code);
        }
    }

    fn header(len: u64) -> EnvelopeHeader {
        EnvelopeHeader {
            to: Dest::Name("greeter".into()),
            from: Some(3),
            seq: 9,
            len,
        }
    }

    fn wire(h: &EnvelopeHeader, payload: &[u8]) -> Vec<u8> {
        let mut v = encode_header(h).to_vec();
        assert_eq!(v.len(), encoded_header_len(h));
        v.extend_from_slice(payload);
        v
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn gated_push_stops_at_each_header_until_granted() {
        // Three messages (the second with no payload) in every chunking: each header is seen
        // before any of its payload is taken, and one message completes per grant.
        let mut data = wire(&header(3), b"abc");
        data.extend(wire(&header(0), b""));
        data.extend(wire(&header(5), b"hello"));
        for size in 1..=data.len() {
            let mut asm = MessageAssembler::new(Limits::default());
            let mut out = Vec::new();
            let mut headers = Vec::new();
            for chunk in data.chunks(size) {
                let mut step = asm.push_gated(Bytes::copy_from_slice(chunk), &mut out);
                while let Ok(Pushed::NeedCredit) = step {
                    assert!(asm.is_awaiting_credit());
                    let h = asm.header().unwrap().clone();
                    // Nothing of this message's payload was taken before the grant.
                    assert_eq!(out.len(), headers.len());
                    headers.push(h.len);
                    asm.grant();
                    step = asm.resume(&mut out);
                }
                step.unwrap();
            }
            asm.finish().unwrap();
            assert_eq!(headers, [3, 0, 5], "chunk size {size}");
            let payloads: Vec<&[u8]> = out.iter().map(|m| &m.payload[..]).collect();
            assert_eq!(payloads, [&b"abc"[..], b"", b"hello"], "chunk size {size}");
        }
    }

    #[test]
    fn headers_round_trip_and_garbage_never_panics() {
        for h in [
            header(5),
            EnvelopeHeader {
                to: Dest::Pid {
                    id: u64::MAX,
                    creation: 7,
                },
                from: None,
                seq: 1,
                len: 0,
            },
            EnvelopeHeader {
                to: Dest::Global("db".into()),
                from: Some(3),
                seq: 9,
                len: 4,
            },
        ] {
            let wire = encode_header(&h);
            assert_eq!(
                u16::from_be_bytes([wire[0], wire[1]]) as usize,
                wire.len() - 2
            );
            assert_eq!(decode_header(&wire[2..]), Ok(h));
        }
        assert!(decode_header(&[0x80; 40]).is_err(), "unknown flags");
        let mut global_alone = [0u8; 40];
        global_alone[0] = FLAG_GLOBAL;
        assert!(
            decode_header(&global_alone).is_err(),
            "global without a name"
        );
        assert!(decode_header(&[0; 50]).is_err(), "stray bytes after a pid");
        let mut x: u64 = 0x2545f4914f6cdd1d;
        for n in 0..4000 {
            let bytes: Vec<u8> = (0..n % 60)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode_header(&bytes);
        }
    }

    #[test]
    fn messages_round_trip_at_any_chunking() {
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let data = wire(&header(1000), &payload);
        for size in [1, 2, 5, 64, 4096] {
            let mut s = Chunks::new(&data, size);
            let m = block_on(read_message(&mut s, &Limits::default())).unwrap();
            assert_eq!(m.header, header(1000));
            assert_eq!(&m.payload[..], &payload[..]);
        }
    }

    #[test]
    fn oversized_message_is_stopped_after_the_header() {
        let limits = Limits {
            max_message_size: 100,
            ..Limits::default()
        };
        let data = wire(&header(101), &[0; 101]);
        let mut s = Chunks::new(&data, 8);
        let err = block_on(read_message(&mut s, &limits)).unwrap_err();
        assert!(matches!(err, ReadError::TooLarge { max: 100, .. }));
        assert_eq!(err.header().unwrap().seq, 9);
        assert_eq!(s.stopped, Some(stream_code::TOO_LARGE));
        assert!(!s.chunks.is_empty(), "the payload must not have been read");
    }

    #[test]
    fn lying_lengths_are_refused() {
        // A payload longer than announced: its tail is read as the next header, and refused.
        let long = wire(&header(3), b"abcdef");
        let mut s = Chunks::new(&long, 64);
        assert!(matches!(
            block_on(read_message(&mut s, &Limits::default())),
            Err(ReadError::Malformed { header: None, .. })
        ));
        let short = wire(&header(10), b"abc");
        let mut s = Chunks::new(&short, 2);
        let err = block_on(read_message(&mut s, &Limits::default())).unwrap_err();
        assert!(matches!(
            err,
            ReadError::Malformed {
                error: WireError::Truncated { have: 3, want: 10 },
                ..
            }
        ));
        assert_eq!(
            err.header().unwrap().seq,
            9,
            "the truncated message is named"
        );
        let mut s = Chunks::new(&[0xff, 0xff, 1, 2, 3], 64);
        assert!(matches!(
            block_on(read_message(&mut s, &Limits::default())),
            Err(ReadError::Malformed { header: None, .. })
        ));
        let mut s = Chunks::new(&[0, 3, 0xc1, 0xc1, 0xc1], 64);
        assert!(matches!(
            block_on(read_message(&mut s, &Limits::default())),
            Err(ReadError::Malformed { header: None, .. })
        ));
        let mut s = Chunks::new(&[], 64);
        assert!(
            matches!(
                block_on(read_message(&mut s, &Limits::default())),
                Err(ReadError::Malformed {
                    error: WireError::Truncated { have: 0, want: 2 },
                    ..
                })
            ),
            "an empty stream carries no message"
        );
    }

    fn numbered(seq: u64, len: usize) -> (EnvelopeHeader, Vec<u8>) {
        let h = EnvelopeHeader {
            to: if seq.is_multiple_of(2) {
                Dest::Name("greeter".into())
            } else {
                Dest::Pid {
                    id: seq,
                    creation: 1,
                }
            },
            from: (!seq.is_multiple_of(3)).then_some(seq),
            seq,
            len: len as u64,
        };
        (h, (0..len).map(|i| (i as u64 + seq) as u8).collect())
    }

    #[test]
    fn coalesced_messages_split_at_any_chunking() {
        let mut data = BytesMut::new();
        let mut expected = Vec::new();
        for (seq, len) in [(1, 5), (2, 0), (3, 700), (4, 1), (5, 64)] {
            let (h, p) = numbered(seq, len);
            encode_header_into(&h, &mut data);
            data.extend_from_slice(&p);
            expected.push(ReadMessage {
                header: h,
                payload: Bytes::from(p),
            });
        }
        for size in [1, 2, 3, 7, 64, 100_000] {
            let mut s = Chunks::new(&data, size);
            let mut out = Vec::new();
            let asm = MessageAssembler::new(Limits::default());
            block_on(read_messages_into(&mut s, asm, &mut out)).unwrap();
            assert_eq!(out, expected, "chunk size {size}");
        }
        // Cut inside the last message: the first four are whole, the fifth is named as lost.
        let cut = &data[..data.len() - 10];
        let mut s = Chunks::new(cut, 9);
        let mut out = Vec::new();
        let asm = MessageAssembler::new(Limits::default());
        let err = block_on(read_messages_into(&mut s, asm, &mut out)).unwrap_err();
        assert_eq!(out, expected[..4]);
        assert_eq!(err.header().map(|h| h.seq), Some(5));
    }

    #[test]
    fn an_oversized_message_inside_a_coalesced_stream_stops_it() {
        let limits = Limits {
            max_message_size: 100,
            ..Limits::default()
        };
        let mut data = BytesMut::new();
        for (seq, len) in [(1, 10), (2, 101), (3, 10)] {
            let (h, p) = numbered(seq, len);
            encode_header_into(&h, &mut data);
            data.extend_from_slice(&p);
        }
        let mut s = Chunks::new(&data, 16);
        let mut out = Vec::new();
        let err = block_on(read_messages_into(
            &mut s,
            MessageAssembler::new(limits),
            &mut out,
        ))
        .unwrap_err();
        assert_eq!(out.len(), 1);
        assert!(matches!(err, ReadError::TooLarge { max: 100, .. }));
        assert_eq!(err.header().unwrap().seq, 2);
        assert_eq!(s.stopped, Some(stream_code::TOO_LARGE));
    }
}
