//! Processes: tokio tasks with a mailbox. A [`Process`] is the context a spawned process runs
//! with; [`Message`] is what it receives.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

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
    _credit: Option<OwnedSemaphorePermit>,
}

impl Message {
    pub(crate) fn new(
        from: Option<Pid>,
        payload: Bytes,
        credit: Option<OwnedSemaphorePermit>,
    ) -> Self {
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
            .send(Message::new(from, payload, Some(permit)))
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
