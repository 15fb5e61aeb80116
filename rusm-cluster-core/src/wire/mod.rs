//! The wire protocol: control frames on the long-lived control stream, and message envelopes on
//! uni-streams (one per stream, or several when the sender coalesces). Every length read from the network is bounded by [`Limits`] before anything is
//! allocated, and decoding never panics.

mod codec;
mod envelope;
mod frame;

pub use codec::{encode_frame, FrameDecoder, WireError};
pub use envelope::{
    decode_header, encode_header, encode_header_into, encoded_header_len, read_message,
    read_messages_into, Dest, EnvelopeHeader, MessageAssembler, Pushed, ReadError, ReadMessage,
    COPY_MAX,
};
pub use frame::{
    Frame, Hello, PeerAddr, PreviousLink, RejectReason, Welcome, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

/// Size limits enforced on input from the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest message payload accepted (and sent), in bytes. Default 8 MiB.
    pub max_message_size: usize,
    /// The largest control frame accepted, in bytes. Default 1 MiB.
    pub max_frame_size: usize,
    /// The largest message header accepted, in bytes. Default 4 KiB.
    pub max_header_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 8 << 20,
            max_frame_size: 1 << 20,
            max_header_size: 4 << 10,
        }
    }
}

/// How deep MessagePack values from the network may nest. The protocol's own types nest a few
/// levels; the decoder's default (1024) lets a 1 KiB frame recurse deep enough to overflow a
/// task's stack in debug builds, which would abort the process, not just close the link.
pub const MAX_MSGPACK_DEPTH: usize = 32;

/// Decodes a MessagePack value from the network, nesting at most [`MAX_MSGPACK_DEPTH`] deep.
/// Never panics on any input.
pub fn decode_msgpack<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_MSGPACK_DEPTH);
    T::deserialize(&mut de)
}
