//! Message streams: arbitrary bytes, in chunks whose sizes the input picks, through a
//! `MessageAssembler` with small limits, by `push` or by the credit-gated `push_gated`. Never a
//! panic; every message completed is whole and within the limits; a refusal names a length over
//! them.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rusm_cluster_core::wire::{Limits, MessageAssembler, Pushed, ReadError, WireError};

fuzz_target!(|data: &[u8]| {
    let [a, b, c, data @ ..] = data else {
        return;
    };
    let limits = Limits {
        max_message_size: usize::from(*a) * 16,
        max_frame_size: 1 << 20,
        max_header_size: usize::from(*b & 0x7f),
    };
    let gated = b & 0x80 != 0;
    let chunk = usize::from(*c) + 1;
    let mut asm = MessageAssembler::new(limits);
    let mut out = Vec::new();
    for part in data.chunks(chunk) {
        let part = Bytes::copy_from_slice(part);
        let r = if gated {
            let mut step = asm.push_gated(part, &mut out);
            while let Ok(Pushed::NeedCredit) = step {
                let h = asm.header().expect("a header before credit");
                assert!(h.len <= limits.max_message_size as u64);
                asm.grant();
                step = asm.resume(&mut out);
            }
            step.map(|_| ())
        } else {
            asm.push(part, &mut out)
        };
        for m in &out {
            assert_eq!(m.payload.len() as u64, m.header.len);
            assert!(m.payload.len() <= limits.max_message_size);
        }
        out.clear();
        match r {
            Ok(()) => {}
            Err(ReadError::TooLarge { header, max }) => {
                assert!(max == limits.max_message_size && header.len > max as u64);
                return;
            }
            Err(ReadError::Malformed {
                error: WireError::FrameTooLarge { len, max },
                ..
            }) => {
                assert!(max == limits.max_header_size && len > max);
                return;
            }
            Err(_) => return,
        }
    }
    let _ = asm.finish();
});
