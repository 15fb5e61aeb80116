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
    Frame, Hello, PeerAddr, RejectReason, Welcome, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
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
