//! Memory bounded against a misbehaving peer, on every transport of the matrix. These cases
//! measure the process's resident memory, so they live in a test binary of their own and take
//! turns (a lock), with nothing else running in the process while they measure.

#![allow(dead_code, unused_imports, unreachable_pub)]

mod cases;

use cases::bounds::*;

/// One case at a time.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

macro_rules! bounded {
    ($backend:ident => $transport:ty) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn withheld_first_message() {
                let _turn = TURN.lock().await;
                withheld_first_message_cannot_grow_memory::<$transport>().await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unfinished_large_messages() {
                let _turn = TURN.lock().await;
                unfinished_large_messages_cannot_grow_memory::<$transport>().await
            }
        }
    };
}

bounded!(quinn => rusm_transport_quinn::QuinnTransport);
bounded!(s2n => rusm_transport_s2n::S2nTransport);
bounded!(mem => rusm_transport_mem::MemTransport);
