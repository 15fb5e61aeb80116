//! Message headers: arbitrary bytes through `decode_header`. Never a panic; whatever decodes
//! encodes back to exactly the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rusm_cluster_core::wire::{decode_header, encode_header, encoded_header_len};

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = decode_header(data) {
        let wire = encode_header(&header);
        assert_eq!(wire.len(), encoded_header_len(&header));
        assert_eq!(&wire[2..], data);
    }
});
