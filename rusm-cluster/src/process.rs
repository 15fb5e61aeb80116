//! Processes: tokio tasks with a mailbox. A [`Process`] is the context a spawned process runs
//! with; [`Message`] is what it receives.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rusm_cluster_core::identity::NodeName;
use rusm_cluster_core::rpc::{ExitReason, Failure, Reply, RpcFrame};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, SendError};
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
    /// Boxed: notices and calls are rarer than plain messages, which stay small.
    extra: Option<Box<Extra>>,
    _credit: Option<Credit>,
}

/// What a message may carry besides its payload.
#[derive(Debug)]
enum Extra {
    Notice(Notice),
    Call(ReplyTo),
}

/// A watch set with [`Process::monitor`] or [`Process::monitor_node`]; identifies the
/// [`Notice::Down`] / [`Notice::NodeDown`] it fires, and cancels it with
/// [`Process::demonitor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MonitorRef(pub(crate) u64);

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
    /// A process this one monitors ([`Process::monitor`]) exited, or can no longer be watched
    /// because the link to its node went down. Sent once per monitor.
    Down {
        /// The monitor.
        monitor: MonitorRef,
        /// The watched process.
        pid: Pid,
        /// Why.
        reason: ExitReason,
    },
    /// The link to a node this process monitors ([`Process::monitor_node`]) went down (or was
    /// not up when the monitor was set). Sent once per monitor.
    NodeDown {
        /// The monitor.
        monitor: MonitorRef,
        /// The node.
        node: NodeName,
    },
}

/// Where the reply to a call goes: the local caller, or a peer's pending request. Dropped
/// without an answer, it answers [`Failure::NoReply`], so a call never waits for nothing.
#[derive(Debug)]
pub(crate) enum ReplyTo {
    Local(Option<oneshot::Sender<Result<Bytes, Failure>>>),
    Remote {
        node: Option<Node>,
        peer: NodeName,
        id: u64,
    },
}

impl ReplyTo {
    /// Answers the call (once; later answers do nothing); `false` if the caller is gone.
    pub(crate) fn answer(&mut self, result: Result<Bytes, Failure>) -> bool {
        match self {
            ReplyTo::Local(tx) => tx.take().is_some_and(|tx| tx.send(result).is_ok()),
            ReplyTo::Remote { node, peer, id } => match node.take() {
                Some(node) => {
                    let reply = match result {
                        Ok(b) => Reply::Called(b),
                        Err(f) => Reply::Failed(f),
                    };
                    crate::rpc::send_rpc(&node, peer, &RpcFrame::Reply { id: *id, reply })
                }
                None => false,
            },
        }
    }
}

impl Drop for ReplyTo {
    fn drop(&mut self) {
        self.answer(Err(Failure::NoReply));
    }
}

impl Message {
    pub(crate) fn new(from: Option<Pid>, payload: Bytes, credit: Option<Credit>) -> Self {
        Message {
            from,
            payload,
            extra: None,
            _credit: credit,
        }
    }

    pub(crate) fn notice_of(notice: Notice) -> Self {
        Message {
            from: None,
            payload: Bytes::new(),
            extra: Some(Box::new(Extra::Notice(notice))),
            _credit: None,
        }
    }

    pub(crate) fn call(from: Option<Pid>, payload: Bytes, reply: ReplyTo) -> Self {
        Message {
            from,
            payload,
            extra: Some(Box::new(Extra::Call(reply))),
            _credit: None,
        }
    }

    /// Whether this message is a call ([`Node::call`](crate::Node::call)) still waiting for
    /// its [`reply`](Self::reply).
    pub fn is_call(&self) -> bool {
        matches!(self.extra.as_deref(), Some(Extra::Call(r)) if match r {
            ReplyTo::Local(tx) => tx.is_some(),
            ReplyTo::Remote { node, .. } => node.is_some(),
        })
    }

    /// Answers this call ([`Node::call`](crate::Node::call)) with `payload`. A call dropped
    /// without a reply answers the caller with [`Error::NoReply`] at once.
    ///
    /// Errors: [`Error::NotACall`] when the message is not a call, or was answered already;
    /// [`Error::CallerGone`] when the caller stopped waiting (it timed out, or its node or the
    /// link to it went down).
    ///
    /// ```
    /// # use bytes::Bytes;
    /// # use rusm_cluster::{Identity, Node};
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let node = Node::builder("solo").identity(Identity::generate()?).start().await?;
    /// let doubler = node.spawn(|mut ctx| async move {
    ///     while let Some(mut msg) = ctx.recv().await {
    ///         let n = msg.payload()[0];
    ///         let _ = msg.reply(Bytes::from(vec![n * 2]));
    ///     }
    /// });
    /// let answer = node.call(&doubler, Bytes::from(vec![21]), std::time::Duration::from_secs(1)).await?;
    /// assert_eq!(answer[0], 42);
    /// # node.shutdown().await; Ok(()) }
    /// ```
    pub fn reply(&mut self, payload: Bytes) -> Result<(), Error> {
        let Some(Extra::Call(reply)) = self.extra.as_deref_mut() else {
            return Err(Error::NotACall);
        };
        let open = match reply {
            ReplyTo::Local(tx) => tx.is_some(),
            ReplyTo::Remote { node, .. } => node.is_some(),
        };
        if !open {
            return Err(Error::NotACall);
        }
        if reply.answer(Ok(payload)) {
            Ok(())
        } else {
            Err(Error::CallerGone)
        }
    }

    /// Takes the call's reply handle out (to answer it with a failure instead).
    pub(crate) fn take_reply(&mut self) -> Option<ReplyTo> {
        match self.extra.take().map(|b| *b) {
            Some(Extra::Call(r)) => Some(r),
            other => {
                self.extra = other.map(Box::new);
                None
            }
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
        match self.extra.as_deref() {
            Some(Extra::Notice(n)) => Some(n),
            _ => None,
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
    /// Messages delivered to the process, in all.
    received: AtomicU64,
    /// Messages the process sent, in all.
    sent: AtomicU64,
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
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
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
        match self.tx.send(mail) {
            Ok(()) => {
                self.shared.received.fetch_add(n as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.shared.queued.fetch_sub(n, Ordering::Relaxed);
                Err(e.0)
            }
        }
    }

    /// Messages waiting, delivered in all, and sent in all by the process.
    pub(crate) fn counts(&self) -> (usize, u64, u64) {
        (
            self.shared.queued.load(Ordering::Relaxed),
            self.shared.received.load(Ordering::Relaxed),
            self.shared.sent.load(Ordering::Relaxed),
        )
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

    /// Closes the mailbox (later deliveries fail, as dead letters) and drops what is unread,
    /// giving how many messages that was.
    fn discard(&mut self) -> u64 {
        self.rx.close();
        let mut n = std::mem::take(&mut self.batch).len();
        while let Ok(mail) = self.rx.try_recv() {
            self.shared.queued.fetch_sub(mail.len(), Ordering::Relaxed);
            n += mail.len();
        }
        n as u64
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

impl Drop for Process {
    /// A process that ends with messages unread drops them, as in Erlang, but counts them
    /// ([`NodeStats::unread_at_exit`](crate::NodeStats)).
    fn drop(&mut self) {
        let unread = self.inbox.discard();
        if unread > 0 {
            self.node
                .inner
                .stats
                .unread_at_exit
                .fetch_add(unread, Ordering::Relaxed);
        }
    }
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

    /// Counts a message this process sent.
    fn sent<T, E>(&self, r: Result<T, E>) -> Result<T, E> {
        if r.is_ok() {
            self.inbox.shared.sent.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Sends `payload` to the process registered as `name` on node `node`, from this process
    /// (the receiver sees this pid in [`Message::from`]). See [`Node::send`].
    pub async fn send(&self, node: &str, name: &str, payload: Bytes) -> Result<(), SendError> {
        let r = self
            .node
            .send_from(Some(&self.pid), node, name, payload)
            .await;
        self.sent(r)
    }

    /// Sends `payload` to the holder of global name `name`, from this process. See
    /// [`Node::send_global`].
    pub async fn send_global(&self, name: &str, payload: Bytes) -> Result<(), SendError> {
        let r = self
            .node
            .send_global_from(Some(&self.pid), name, payload)
            .await;
        self.sent(r)
    }

    /// Sends `payload` to `pid`, local or remote, from this process. See [`Node::send_to`].
    pub async fn send_to(&self, pid: &Pid, payload: Bytes) -> Result<(), SendError> {
        let r = self.node.send_to_from(Some(&self.pid), pid, payload).await;
        self.sent(r)
    }

    /// Calls `pid` (local or remote) from this process and waits for its reply. See
    /// [`Node::call`].
    pub async fn call(&self, pid: &Pid, payload: Bytes, timeout: Duration) -> Result<Bytes, Error> {
        let r = self
            .node
            .call_from(Some(&self.pid), pid, payload, timeout)
            .await;
        self.sent(r)
    }

    /// Watches `pid`, local or remote: when it exits, this process gets one
    /// [`Notice::Down`] with the reason, and also (with [`ExitReason::NoConnection`]) if the
    /// link to its node goes down first; at once (with [`ExitReason::NoProcess`] or
    /// `NoConnection`) if it is not alive or its node is not linked. Monitors are not
    /// broadcast events: each fires once, into this mailbox.
    ///
    /// ```
    /// # use rusm_cluster::{ExitReason, Identity, Node, Notice};
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let node = Node::builder("solo").identity(Identity::generate()?).start().await?;
    /// let worker = node.spawn(|_ctx| async move {});
    /// let (tx, rx) = tokio::sync::oneshot::channel();
    /// node.spawn(move |mut ctx| async move {
    ///     let monitor = ctx.monitor(&worker);
    ///     let msg = ctx.recv().await.unwrap();
    ///     if let Some(Notice::Down { monitor: m, reason, .. }) = msg.notice() {
    ///         assert_eq!(*m, monitor);
    ///         let _ = tx.send(reason.clone());
    ///     }
    /// });
    /// // The worker returned at once: normal exit, or gone before the monitor was set.
    /// let reason = rx.await?;
    /// assert!(matches!(reason, ExitReason::Normal | ExitReason::NoProcess));
    /// # node.shutdown().await; Ok(()) }
    /// ```
    pub fn monitor(&self, pid: &Pid) -> MonitorRef {
        crate::rpc::monitor(&self.node, self.pid.id, pid)
    }

    /// Watches node `node`: this process gets one [`Notice::NodeDown`] when the link to it
    /// goes down (at once if it is not up).
    pub fn monitor_node(&self, node: &str) -> Result<MonitorRef, Error> {
        let node_name = NodeName::new(node)?;
        Ok(crate::rpc::monitor_node(&self.node, self.pid.id, node_name))
    }

    /// Cancels a monitor: no notice comes from it after this returns (one already in the
    /// mailbox stays there). `false` if it had fired or was cancelled already.
    pub fn demonitor(&self, monitor: MonitorRef) -> bool {
        crate::rpc::demonitor(&self.node, monitor)
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
