//! Length-prefixed control frames: a `u32` big-endian length, then the frame as MessagePack.
//! The decoder is sans-IO: feed it the chunks read from the stream, take frames out.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::frame::Frame;

/// A frame or message could not be decoded. The link that sent it is closed with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A length prefix announced more than the limit allows; nothing was allocated for it.
    #[error("frame of {len} bytes is over the limit of {max}")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a valid frame or header.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// A frame, a header, ...
        what: &'static str,
        /// The decoder's complaint.
        why: String,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame ({have} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        have: usize,
        /// Bytes announced.
        want: usize,
    },
}

/// Encodes one frame with its length prefix.
pub fn encode_frame(frame: &Frame) -> Result<Bytes, WireError> {
    let mut out = BytesMut::with_capacity(64);
    out.put_u32(0);
    let mut w = (&mut out).writer();
    rmp_serde::encode::write_named(&mut w, frame).map_err(|e| WireError::Malformed {
        what: "frame",
        why: e.to_string(),
    })?;
    let len = u32::try_from(out.len() - 4).map_err(|_| WireError::FrameTooLarge {
        len: out.len() - 4,
        max: u32::MAX as usize,
    })?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out.freeze())
}

/// Turns a byte stream back into frames, refusing any frame over `max_frame_size` before
/// buffering it.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_frame_size: usize,
}

impl FrameDecoder {
    /// A decoder accepting frames up to `max_frame_size` bytes.
    pub fn new(max_frame_size: usize) -> Self {
        FrameDecoder {
            buf: BytesMut::new(),
            max_frame_size,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After an error the stream
    /// is unusable (frame boundaries are lost): close the link.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max_frame_size {
            return Err(WireError::FrameTooLarge {
                len,
                max: self.max_frame_size,
            });
        }
        if self.buf.len() < 4 + len {
            // Only what has arrived is buffered; the bound above caps it.
            return Ok(None);
        }
        self.buf.advance(4);
        let body = self.buf.split_to(len);
        super::decode_msgpack(&body)
            .map(Some)
            .map_err(|e| WireError::Malformed {
                what: "frame",
                why: e.to_string(),
            })
    }

    /// Call at end of stream: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let want = if self.buf.len() >= 4 {
            u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize + 4
        } else {
            4
        };
        Err(WireError::Truncated {
            have: self.buf.len(),
            want,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeName;
    use crate::wire::{Hello, RejectReason, PROTOCOL_VERSION};

    fn hello() -> Frame {
        Frame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            min_protocol: Some(1),
            capabilities: vec!["rpc".into()],
            name: NodeName::new("london").unwrap(),
            creation: 7,
            listen_addr: Some("127.0.0.1:4000".parse().unwrap()),
            peers: vec![],
            hidden: false,
            max_message_size: 1 << 20,
            link: 3,
            previous: Some(crate::wire::PreviousLink {
                link: 2,
                reached: 9,
            }),
        })
    }

    #[test]
    fn frames_round_trip_across_any_chunking() {
        let frames = vec![
            hello(),
            Frame::Reject(RejectReason::NameMismatch {
                claimed: "paris".into(),
                certified: vec!["mallory".into()],
            }),
            Frame::Goodbye {
                reason: "bye".into(),
                streams: 12,
            },
            Frame::Capability {
                capability: "rpc".into(),
                body: Bytes::from_static(&[0, 1, 2, 0xff]),
            },
        ];
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend_from_slice(&encode_frame(f).unwrap());
        }
        for chunk in [1, 3, 7, wire.len()] {
            let mut d = FrameDecoder::new(1 << 20);
            let mut out = Vec::new();
            for c in wire.chunks(chunk) {
                d.push(c);
                while let Some(f) = d.next_frame().unwrap() {
                    out.push(f);
                }
            }
            d.finish().unwrap();
            assert_eq!(out, frames);
        }
    }

    #[test]
    fn a_hello_from_a_node_without_capabilities_still_decodes() {
        // The hello of a node built before version ranges and capabilities existed.
        #[derive(serde::Serialize)]
        enum OldFrame {
            Hello {
                protocol: u32,
                name: String,
                creation: u64,
                listen_addr: Option<std::net::SocketAddr>,
                peers: Vec<()>,
                hidden: bool,
                max_message_size: u64,
            },
        }
        let old = OldFrame::Hello {
            protocol: PROTOCOL_VERSION,
            name: "london".into(),
            creation: 7,
            listen_addr: Some("127.0.0.1:4000".parse().unwrap()),
            peers: vec![],
            hidden: false,
            max_message_size: 1 << 20,
        };
        let body = rmp_serde::to_vec_named(&old).unwrap();
        let mut d = FrameDecoder::new(1 << 20);
        d.push(&(body.len() as u32).to_be_bytes());
        d.push(&body);
        let Some(Frame::Hello(h)) = d.next_frame().unwrap() else {
            panic!("not a hello");
        };
        assert_eq!(h.min_protocol, None);
        assert!(h.capabilities.is_empty());
        assert_eq!(h.name.as_str(), "london");
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut d = FrameDecoder::new(1024);
        d.push(&u32::MAX.to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(WireError::FrameTooLarge {
                len: u32::MAX as usize,
                max: 1024
            })
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        // A cheap deterministic fuzz: many pseudo-random byte strings, none may panic.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..5000 {
            let mut d = FrameDecoder::new(4096);
            let len = (x % 64) as usize;
            let mut bytes = Vec::with_capacity(len + 4);
            bytes.extend_from_slice(&(len as u32).to_be_bytes());
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            d.push(&bytes);
            let _ = d.next_frame();
        }
    }

    #[test]
    fn truncated_stream_is_reported() {
        let wire = encode_frame(&hello()).unwrap();
        let mut d = FrameDecoder::new(1 << 20);
        d.push(&wire[..wire.len() - 1]);
        assert_eq!(d.next_frame(), Ok(None));
        assert!(matches!(d.finish(), Err(WireError::Truncated { .. })));
    }
}
