//! Registry gossip: arbitrary bytes through `decode_update`; what decodes round-trips, and is
//! fed, with a few updates cut from the rest of the input, to a `Registry` with small limits
//! that also registers names locally. Never a panic (a peer's stamps included), and the view
//! stays within the limits.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rusm_cluster_core::identity::NodeName;
use rusm_cluster_core::registry::{decode_update, encode_update, Output, Registry, RegistryConfig};

fuzz_target!(|data: &[u8]| {
    let mut config = RegistryConfig::default();
    config.max_name_len = 16;
    config.max_claims_per_peer = 8;
    config.max_held = 8;
    let me = NodeName::new("me").expect("a valid name");
    let peer = NodeName::new("peer").expect("a valid name");
    let mut reg = Registry::new(me.clone(), 1, config);
    let mut out = Vec::new();
    let t0 = Instant::now();
    reg.peer_up(&peer, 7, &mut out);
    // The input is several bodies, each after a one-byte length.
    let mut rest = data;
    let mut step = 0u64;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (body, tail) = tail.split_at(len);
        rest = tail;
        step += 1;
        let Ok(update) = decode_update(body) else {
            continue;
        };
        assert_eq!(decode_update(&encode_update(&update)), Ok(update.clone()));
        let now = t0 + Duration::from_secs(step);
        reg.on_update(&peer, update, now, &mut out);
        let _ = reg.register("local", step, step, &mut out);
        reg.tick(now, &mut out);
        if out.iter().any(|o| matches!(o, Output::Close { .. })) {
            reg.peer_up(&peer, 7, &mut out);
        }
        out.clear();
        for (name, owner) in reg.names() {
            assert!(!name.is_empty() && name.len() <= config.max_name_len);
            assert!(owner.node == me || owner.node == peer);
        }
    }
});
