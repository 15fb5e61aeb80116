//! Control frames: arbitrary bytes, in chunks whose sizes the input picks, through a
//! `FrameDecoder` with a small or the default limit. Never a panic; nothing buffered beyond one
//! frame under the limit; every frame decoded encodes and decodes back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rusm_cluster_core::wire::{encode_frame, FrameDecoder, WireError};

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, data)) = data.split_first() else {
        return;
    };
    let limit = if knobs & 0x80 != 0 { 1 << 20 } else { 64 };
    let chunk = usize::from(knobs & 0x7f) + 1;
    let mut d = FrameDecoder::new(limit);
    for part in data.chunks(chunk) {
        d.push(part);
        loop {
            match d.next_frame() {
                Ok(Some(frame)) => {
                    let wire = encode_frame(&frame).expect("a decoded frame encodes");
                    let mut again = FrameDecoder::new(usize::MAX);
                    again.push(&wire);
                    assert_eq!(again.next_frame(), Ok(Some(frame)));
                }
                Ok(None) => break,
                Err(WireError::FrameTooLarge { len, max }) => {
                    assert!(len > max && max == limit);
                    return;
                }
                Err(_) => return,
            }
        }
        if let Err(WireError::Truncated { have, .. }) = d.finish() {
            assert!(
                have < limit + 4,
                "{have} bytes buffered under a {limit}-byte limit"
            );
        }
    }
    let _ = d.finish();
});
