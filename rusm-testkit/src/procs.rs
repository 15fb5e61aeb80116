//! Processes the tests and benches spawn: a collector, an echo, counting receivers; and waiting
//! on what they saw.

use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusm_cluster::{Message, Node, NodeEvent, Pid};
use tokio::sync::{broadcast, mpsc, Notify};

use crate::wait::within;

/// Spawns a process on `node` that forwards everything it receives to the returned channel.
pub fn collector(node: &Node) -> (Pid, mpsc::UnboundedReceiver<Message>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let pid = node.spawn(|mut ctx| async move {
        while let Some(m) = ctx.recv().await {
            if tx.send(m).is_err() {
                break;
            }
        }
    });
    (pid, rx)
}

/// The next message from a [`collector`], or a panic after 10 s.
pub async fn recv(rx: &mut mpsc::UnboundedReceiver<Message>) -> Message {
    within(rx.recv()).await.expect("collector ended")
}

/// The next node-down event (others are skipped), or a panic after 10 s.
pub async fn next_down(events: &mut broadcast::Receiver<NodeEvent>) -> NodeEvent {
    within(async {
        loop {
            match events.recv().await.unwrap() {
                e @ NodeEvent::NodeDown { .. } => return e,
                _ => continue,
            }
        }
    })
    .await
}

/// Spawns on `node` a process that sends every message back to its sender, payload unchanged
/// (a message without a sender is dropped). It ends when a reply cannot be sent.
pub fn echo(node: &Node) -> Pid {
    node.spawn(|mut ctx| async move {
        while let Some(msg) = ctx.recv().await {
            let Some(from) = msg.from().cloned() else {
                continue;
            };
            if ctx.send_to(&from, msg.into_payload()).await.is_err() {
                break;
            }
        }
    })
}

/// What counting receivers saw: messages and payload bytes, and a count one can
/// [`wait_for`](Self::wait_for). Counts only grow, so one tally serves batch after batch.
#[derive(Debug, Default)]
pub struct Tally {
    messages: AtomicU64,
    bytes: AtomicU64,
    target: AtomicU64,
    reached: Notify,
}

impl Tally {
    /// A new tally at zero, to share between receivers and the waiter.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Counts one message of `bytes` payload bytes, waking a [`wait_for`](Self::wait_for)
    /// whose count it reaches.
    pub fn count(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        // SeqCst (here and in `wait_for`): a target stored while the last messages are being
        // counted is seen either by the counter (which then notifies) or by the waiter.
        let n = self.messages.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.target.load(Ordering::SeqCst) {
            self.reached.notify_one();
        }
    }

    /// Messages counted so far.
    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::SeqCst)
    }

    /// Payload bytes counted so far (complete once [`messages`](Self::messages) is).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// Waits until at least `target` messages (in all, since the tally began) are counted, for
    /// at most `limit`.
    pub async fn wait_for(&self, target: u64, limit: Duration) -> Result<(), Shortfall> {
        self.target.store(target, Ordering::SeqCst);
        let reached = async {
            loop {
                let mut notified = pin!(self.reached.notified());
                notified.as_mut().enable();
                if self.messages.load(Ordering::SeqCst) >= target {
                    break;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, reached)
            .await
            .map_err(|_| Shortfall {
                target,
                counted: self.messages(),
                waited: limit,
            })
    }
}

/// A [`Tally::wait_for`] that ran out of time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("only {counted} of {target} messages arrived within {waited:?}")]
pub struct Shortfall {
    /// The count waited for.
    pub target: u64,
    /// The count when the wait gave up.
    pub counted: u64,
    /// How long it was waited.
    pub waited: Duration,
}

/// Spawns on `node` a process that counts every message it receives (and its payload bytes) in
/// `tally`, dropping the message first so it frees its share of the link budget at once.
pub fn counting_receiver(node: &Node, tally: Arc<Tally>) -> Pid {
    node.spawn(|mut ctx| async move {
        while let Some(msg) = ctx.recv().await {
            let len = msg.payload().len() as u64;
            drop(msg);
            tally.count(len);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tally_wakes_its_waiter_and_reports_a_shortfall() {
        let tally = Tally::new();
        let counter = tally.clone();
        let counting = tokio::spawn(async move {
            for _ in 0..1000 {
                counter.count(3);
                tokio::task::yield_now().await;
            }
        });
        tally.wait_for(1000, crate::BENCH_DEADLINE).await.unwrap();
        counting.await.unwrap();
        assert_eq!((tally.messages(), tally.bytes()), (1000, 3000));
        // A target already reached returns at once; one never reached is a shortfall.
        tally.wait_for(500, crate::BENCH_DEADLINE).await.unwrap();
        let short = tally.wait_for(1001, Duration::from_millis(20)).await;
        assert_eq!(
            short,
            Err(Shortfall {
                target: 1001,
                counted: 1000,
                waited: Duration::from_millis(20)
            })
        );
    }
}
