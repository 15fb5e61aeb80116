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
    /// Boxed: notices are rare, and messages stay small.
    notice: Option<Box<Notice>>,
    _credit: Option<Credit>,
}

/// A notice the node itself puts in a process's mailbox (see [`Message::notice`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// The process lost global name `name` to a claim made elsewhere (two sides of a partition
    /// registered it, or two nodes at the same moment): the name now belongs to `winner`, and
    /// messages sent to the name no longer reach this process. See
    /// [`Node::register_global`](crate::Node::register_global).
    NameConflict {
        /// The name lost.
        name: String,
        /// The process that holds it now.
        winner: Pid,
    },
}

impl Message {
    pub(crate) fn new(from: Option<Pid>, payload: Bytes, credit: Option<Credit>) -> Self {
        Message {
            from,
            payload,
            notice: None,
            _credit: credit,
        }
    }

    pub(crate) fn notice_of(notice: Notice) -> Self {
        Message {
            from: None,
            payload: Bytes::new(),
            notice: Some(Box::new(notice)),
            _credit: None,
        }
    }

    /// The node's notice, when this is one rather than a message from a sender (its payload is
    /// then empty and [`from`](Self::from) is `None`).
    ///
    /// ```
    /// # use rusm_cluster::{Message, Notice};
    /// fn handle(msg: Message) {
    ///     match msg.notice() {
    ///         Some(Notice::NameConflict { name, winner }) => {
    ///             eprintln!("lost {name} to {winner}");
    ///         }
    ///         Some(_) => {}
    ///         None => { /* an ordinary message */ }
    ///     }
    /// }
    /// ```
    pub fn notice(&self) -> Option<&Notice> {
        self.notice.as_deref()
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

/// What travels through a mailbox's channel: one message (a local send, a lone remote one), or
/// several a link delivers together (one channel operation and one wake-up for all of them).
#[derive(Debug)]
pub(crate) enum Mail {
    One(Message),
    /// Never empty.
    Many(Vec<Message>),
}

/// What the two ends of a mailbox share.
#[derive(Debug)]
struct Shared {
    /// Free places for local senders.
    capacity: Arc<Semaphore>,
    /// Messages in the channel (batches counted by their size).
    queued: AtomicUsize,
}

/// The sending side of a process's mailbox. Local senders wait for capacity (`capacity`
/// messages); remote messages arrive already charged to their link's budget.
#[derive(Clone, Debug)]
pub(crate) struct Mailbox {
    tx: mpsc::UnboundedSender<Mail>,
    shared: Arc<Shared>,
}

/// The receiving side of a process's mailbox.
#[derive(Debug)]
pub(crate) struct Inbox {
    rx: mpsc::UnboundedReceiver<Mail>,
    /// The rest of the batch being read.
    batch: std::vec::IntoIter<Message>,
    shared: Arc<Shared>,
}

impl Mailbox {
    pub(crate) fn new(capacity: usize) -> (Mailbox, Inbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            capacity: Arc::new(Semaphore::new(capacity.max(1))),
            queued: AtomicUsize::new(0),
        });
        let inbox = Inbox {
            rx,
            batch: Vec::new().into_iter(),
            shared: shared.clone(),
        };
        (Mailbox { tx, shared }, inbox)
    }

    /// Delivers a local message, waiting while the mailbox is full. Gives the payload back if
    /// the process has exited.
    pub(crate) async fn send_local(&self, from: Option<Pid>, payload: Bytes) -> Result<(), Bytes> {
        let Ok(permit) = self.shared.capacity.clone().acquire_owned().await else {
            return Err(payload);
        };
        let msg = Message::new(from, payload, Some(Credit::Mailbox(permit)));
        match self.push(Mail::One(msg)) {
            Ok(()) => Ok(()),
            Err(Mail::One(m)) => Err(m.payload),
            Err(Mail::Many(_)) => unreachable!("one message was sent"),
        }
    }

    /// Delivers messages already charged to a link's budget; gives them back if the process has
    /// exited.
    pub(crate) fn push(&self, mail: Mail) -> Result<(), Mail> {
        let n = mail.len();
        self.shared.queued.fetch_add(n, Ordering::Relaxed);
        self.tx.send(mail).map_err(|e| {
            self.shared.queued.fetch_sub(n, Ordering::Relaxed);
            e.0
        })
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Mail {
    /// How many messages.
    pub(crate) fn len(&self) -> usize {
        match self {
            Mail::One(_) => 1,
            Mail::Many(v) => v.len(),
        }
    }
}

impl Inbox {
    async fn recv(&mut self) -> Option<Message> {
        if let Some(m) = self.batch.next() {
            return Some(m);
        }
        let mail = self.rx.recv().await?;
        Some(self.open(mail))
    }

    fn try_recv(&mut self) -> Option<Message> {
        if let Some(m) = self.batch.next() {
            return Some(m);
        }
        let mail = self.rx.try_recv().ok()?;
        Some(self.open(mail))
    }

    fn open(&mut self, mail: Mail) -> Message {
        self.shared.queued.fetch_sub(mail.len(), Ordering::Relaxed);
        match mail {
            Mail::One(m) => m,
            Mail::Many(v) => {
                self.batch = v.into_iter();
                self.batch.next().expect("a batch is never empty")
            }
        }
    }

    fn len(&self) -> usize {
        self.batch.len() + self.shared.queued.load(Ordering::Relaxed)
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
    inbox: Inbox,
}

impl Process {
    pub(crate) fn new(pid: Pid, node: Node, inbox: Inbox) -> Self {
        Process { pid, node, inbox }
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
        self.inbox.recv().await
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.inbox.try_recv()
    }

    /// How many messages wait in the mailbox.
    pub fn mailbox_len(&self) -> usize {
        self.inbox.len()
    }

    /// Sends `payload` to the process registered as `name` on node `node`, from this process
    /// (the receiver sees this pid in [`Message::from`]). See [`Node::send`].
    pub async fn send(&self, node: &str, name: &str, payload: Bytes) -> Result<(), SendError> {
        self.node
            .send_from(Some(&self.pid), node, name, payload)
            .await
    }

    /// Sends `payload` to the holder of global name `name`, from this process. See
    /// [`Node::send_global`].
    pub async fn send_global(&self, name: &str, payload: Bytes) -> Result<(), SendError> {
        self.node
            .send_global_from(Some(&self.pid), name, payload)
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

/// Bytes one link may make this node hold: messages waiting in mailboxes, held back behind a
/// gap, or half received. One task (the link's reader) takes from it; any number of receiving
/// processes give back, with two atomic operations and no lock.
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

    /// The budget's size.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Takes `amount` bytes (at most the whole budget), waiting while they are not free. Only
    /// one task may take from a budget.
    #[cfg(test)]
    pub(crate) async fn take(self: &Arc<Self>, amount: usize) -> LinkCredit {
        loop {
            if let Some(credit) = self.try_take(amount) {
                return credit;
            }
            self.freed(amount, self.limit).await;
        }
    }

    /// Waits until `amount` bytes (at most the whole budget) fit under `ceiling`. Only one task
    /// may wait on a budget.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is taken.
    pub(crate) async fn freed(&self, amount: usize, ceiling: usize) {
        let amount = amount.min(self.limit);
        loop {
            let freed = self.freed.notified();
            // Flag, then look again: a giver subtracts, then looks at the flag, so one of the
            // two sees the other.
            self.waiting.store(true, Ordering::SeqCst);
            if self.used.load(Ordering::SeqCst) + amount <= ceiling {
                break;
            }
            freed.await;
        }
        self.waiting.store(false, Ordering::SeqCst);
    }

    /// Takes `amount` bytes (at most the whole budget) if they are free now.
    #[cfg(test)]
    pub(crate) fn try_take(self: &Arc<Self>, amount: usize) -> Option<LinkCredit> {
        self.try_take_within(amount, self.limit)
    }

    /// Takes `amount` bytes (at most the whole budget) if that keeps what is in use within
    /// `ceiling`, which may lie above the budget: the reserve a message that fills a gap may
    /// draw on.
    pub(crate) fn try_take_within(
        self: &Arc<Self>,
        amount: usize,
        ceiling: usize,
    ) -> Option<LinkCredit> {
        let amount = amount.min(self.limit);
        if self.used.load(Ordering::SeqCst) + amount > ceiling {
            return None;
        }
        self.used.fetch_add(amount, Ordering::SeqCst);
        Some(LinkCredit {
            budget: self.clone(),
            amount,
        })
    }

    /// Bytes taken and not yet given back.
    pub(crate) fn used(&self) -> usize {
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

    fn msg(n: u8) -> Message {
        Message::new(None, Bytes::from(vec![n]), None)
    }

    #[tokio::test]
    async fn batches_and_single_messages_come_out_in_order_and_are_counted() {
        let (mailbox, mut inbox) = Mailbox::new(8);
        mailbox.push(Mail::One(msg(1))).unwrap();
        mailbox
            .push(Mail::Many(vec![msg(2), msg(3), msg(4)]))
            .unwrap();
        mailbox
            .send_local(None, Bytes::from(vec![5]))
            .await
            .unwrap();
        assert_eq!(inbox.len(), 5);
        let mut got = Vec::new();
        while let Some(m) = inbox.try_recv() {
            got.push(m.payload()[0]);
            assert_eq!(inbox.len(), 5 - got.len());
        }
        assert_eq!(got, [1, 2, 3, 4, 5]);
        mailbox.push(Mail::Many(vec![msg(6), msg(7)])).unwrap();
        assert_eq!(inbox.recv().await.unwrap().payload()[0], 6);
        drop(inbox);
        // The process is gone: what is pushed comes back, and is not counted as waiting.
        assert!(matches!(mailbox.push(Mail::One(msg(8))), Err(Mail::One(_))));
        assert!(mailbox.is_closed());
        assert_eq!(
            mailbox.send_local(None, Bytes::from(vec![9])).await,
            Err(Bytes::from(vec![9]))
        );
    }

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
        // A message that fills a gap may draw on a reserve above the budget, and no further.
        let full = budget.try_take(1000).unwrap();
        assert!(budget.try_take(1).is_none());
        let over = budget.try_take_within(700, 2000).unwrap();
        assert_eq!(budget.used(), 1700);
        assert!(budget.try_take_within(400, 2000).is_none());
        drop((full, over));
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
