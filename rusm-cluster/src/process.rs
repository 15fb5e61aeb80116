//! Processes: tokio tasks with a mailbox. A [`Process`] is the context a spawned process runs
//! with; [`Message`] is what it receives.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

use crate::error::SendError;
use crate::node::Node;
use crate::pid::Pid;

/// A received message.
///
/// Holding it keeps its share of the mailbox's (or the link's) capacity: drop it, or take its
/// payload with [`Message::into_payload`], to let the next one in.
#[derive(Debug)]
pub struct Message {
    from: Option<Pid>,
    payload: Bytes,
    _credit: Option<Credit>,
}

impl Message {
    pub(crate) fn new(from: Option<Pid>, payload: Bytes, credit: Option<Credit>) -> Self {
        Message {
            from,
            payload,
            _credit: credit,
        }
    }

    /// The sending process, when the message was sent from one.
    pub fn from(&self) -> Option<&Pid> {
        self.from.as_ref()
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Takes the payload (and releases the capacity the message held).
    pub fn into_payload(self) -> Bytes {
        self.payload
    }
}

/// The sending side of a process's mailbox. Local senders wait for capacity (`capacity`
/// messages); remote messages arrive already charged to their link's budget.
#[derive(Clone, Debug)]
pub(crate) struct Mailbox {
    tx: mpsc::UnboundedSender<Message>,
    capacity: Arc<Semaphore>,
}

impl Mailbox {
    pub(crate) fn new(capacity: usize) -> (Mailbox, mpsc::UnboundedReceiver<Message>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Mailbox {
                tx,
                capacity: Arc::new(Semaphore::new(capacity.max(1))),
            },
            rx,
        )
    }

    /// Delivers a local message, waiting while the mailbox is full. Gives the payload back if
    /// the process has exited.
    pub(crate) async fn send_local(&self, from: Option<Pid>, payload: Bytes) -> Result<(), Bytes> {
        let Ok(permit) = self.capacity.clone().acquire_owned().await else {
            return Err(payload);
        };
        self.tx
            .send(Message::new(from, payload, Some(Credit::Mailbox(permit))))
            .map_err(|e| e.0.payload)
    }

    /// Delivers a message already charged to a link's budget.
    pub(crate) fn push(&self, msg: Message) -> Result<(), Message> {
        self.tx.send(msg).map_err(|e| e.0)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The context a process runs with: its pid, its mailbox, and the node it lives on.
///
/// ```
/// # use rusm_cluster::{Node, Identity};
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let id = Identity::generate()?;
/// # let node = Node::builder("doc").identity(id).start().await?;
/// let echo = node.spawn(|mut ctx| async move {
///     while let Some(msg) = ctx.recv().await {
///         if let Some(from) = msg.from().cloned() {
///             let _ = ctx.send_to(&from, msg.into_payload()).await;
///         }
///     }
/// });
/// # let _ = echo; node.shutdown().await; Ok(()) }
/// ```
#[derive(Debug)]
pub struct Process {
    pid: Pid,
    node: Node,
    rx: mpsc::UnboundedReceiver<Message>,
}

impl Process {
    pub(crate) fn new(pid: Pid, node: Node, rx: mpsc::UnboundedReceiver<Message>) -> Self {
        Process { pid, node, rx }
    }

    /// This process's pid.
    pub fn pid(&self) -> &Pid {
        &self.pid
    }

    /// The node this process runs on.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The next message; `None` once the node has shut down.
    ///
    /// # Cancel safety
    /// Cancel safe: a message not returned stays in the mailbox.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }

    /// How many messages wait in the mailbox.
    pub fn mailbox_len(&self) -> usize {
        self.rx.len()
    }

    /// Sends `payload` to the process registered as `name` on node `node`, from this process
    /// (the receiver sees this pid in [`Message::from`]). See [`Node::send`].
    pub async fn send(&self, node: &str, name: &str, payload: Bytes) -> Result<(), SendError> {
        self.node
            .send_from(Some(&self.pid), node, name, payload)
            .await
    }

    /// Sends `payload` to `pid`, local or remote, from this process. See [`Node::send_to`].
    pub async fn send_to(&self, pid: &Pid, payload: Bytes) -> Result<(), SendError> {
        self.node.send_to_from(Some(&self.pid), pid, payload).await
    }
}

/// What a message holds until it is dropped, so the space it takes is given back then: a slot of
/// its mailbox (local sends) or bytes of its link's budget (remote ones).
#[derive(Debug)]
pub(crate) enum Credit {
    Mailbox(#[allow(dead_code)] OwnedSemaphorePermit),
    Link(#[allow(dead_code)] LinkCredit),
}

/// Bytes of received messages one link may have waiting in mailboxes. One task (the link's
/// reader) takes from it; any number of receiving processes give back, with two atomic
/// operations and no lock.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
    /// The reader waits for space.
    waiting: AtomicBool,
    freed: Notify,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit: limit.max(1),
            used: AtomicUsize::new(0),
            waiting: AtomicBool::new(false),
            freed: Notify::new(),
        })
    }

    /// Takes `amount` bytes (at most the whole budget), waiting while they are not free. Only
    /// one task may take from a budget.
    pub(crate) async fn take(self: &Arc<Self>, amount: usize) -> LinkCredit {
        let amount = amount.min(self.limit);
        loop {
            if self.used.load(Ordering::SeqCst) + amount <= self.limit {
                self.used.fetch_add(amount, Ordering::SeqCst);
                return LinkCredit {
                    budget: self.clone(),
                    amount,
                };
            }
            let freed = self.freed.notified();
            // Flag, then look again: a giver subtracts, then looks at the flag, so one of the
            // two sees the other.
            self.waiting.store(true, Ordering::SeqCst);
            if self.used.load(Ordering::SeqCst) + amount > self.limit {
                freed.await;
            }
            self.waiting.store(false, Ordering::SeqCst);
        }
    }

    /// Bytes taken and not yet given back.
    #[cfg(test)]
    fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }
}

/// Bytes of a link's budget held by one message.
#[derive(Debug)]
pub(crate) struct LinkCredit {
    budget: Arc<Budget>,
    amount: usize,
}

impl Drop for LinkCredit {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.amount, Ordering::SeqCst);
        if self.budget.waiting.load(Ordering::SeqCst) {
            self.budget.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn budget_waits_for_space_and_never_overdraws() {
        let budget = Budget::new(1000);
        let a = budget.take(600).await;
        let b = budget.take(400).await;
        assert_eq!(budget.used(), 1000);
        // Over the whole budget: clamped, and waits for everything.
        let taker = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.take(5000).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!taker.is_finished(), "no space yet");
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!taker.is_finished(), "600 free, 1000 needed");
        drop(b);
        let c = tokio::time::timeout(Duration::from_secs(5), taker)
            .await
            .expect("woken once the space is free")
            .unwrap();
        assert_eq!(budget.used(), 1000);
        drop(c);
        assert_eq!(budget.used(), 0);
        // Givers on other threads racing the taker: no wake-up is lost.
        let race = async {
            let mut credits = Vec::new();
            for _ in 0..20_000 {
                credits.push(budget.take(100).await);
                if credits.len() == 10 {
                    let batch = std::mem::take(&mut credits);
                    tokio::spawn(async move { drop(batch) });
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), race)
            .await
            .expect("a wake-up was lost");
    }
}
