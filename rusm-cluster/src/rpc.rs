//! Request/reply on a node: calls to processes, remote spawn, monitors and attach reports, on
//! the core's [`Requests`] machine behind the `rpc` capability of every link.
//!
//! Every request ends exactly once: with its reply, with [`Error::LinkLost`] when its link goes
//! down first, or with [`Error::Timeout`] at its deadline (a timer task walks the machine's
//! deadlines). Monitors are kept in tables of their own, not on the event broadcast: each fires
//! once, into the watcher's mailbox, and the tables are updated under one lock with the set of
//! peers the capability was told are up, so a monitor set while its link goes down still fires.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusm_cluster_core::identity::NodeName;
use rusm_cluster_core::report::Report;
use rusm_cluster_core::rpc::{
    self, Ended, ExitReason, Failure, Reply, Request, Requests, RpcFrame, CAPABILITY,
};
use tokio::sync::{oneshot, Notify};
use tracing::debug;

use crate::capability::Capability;
use crate::error::Error;
use crate::node::{lock, read, Node};
use crate::pid::Pid;
use crate::process::{Mail, Message, MonitorRef, Notice, Process, ReplyTo};

type Waiter = oneshot::Sender<Result<Reply, Ended>>;
type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
/// A factory's check of its arguments.
pub(crate) type Check = Box<dyn Fn(&Bytes) -> Result<(), String> + Send + Sync>;

/// A factory registered with [`Node::register_factory`]: an optional check of the arguments,
/// and the process body.
pub(crate) struct Factory {
    pub(crate) check: Option<Check>,
    pub(crate) body: Box<dyn Fn(Process, Bytes) -> BoxFuture + Send + Sync>,
}

/// Who watches a local process.
enum Watcher {
    Local { mref: u64, watcher: u64 },
    Remote { peer: NodeName, mref: u64 },
}

#[derive(Default)]
struct State {
    /// The peers whose link uses the capability and is up (as told by on_link_up/down).
    up: HashSet<NodeName>,
    requests: Requests<Waiter>,
    next_ref: u64,
    /// Monitors of local processes set by local watchers: mref -> (watcher, target).
    local: HashMap<u64, (u64, u64)>,
    /// Monitors of remote processes set by local watchers: mref -> (watcher, target).
    remote: HashMap<u64, (u64, Pid)>,
    /// Who watches each local process.
    watchers: HashMap<u64, Vec<Watcher>>,
    /// Node monitors: mref -> (watcher, node).
    nodes: HashMap<u64, (u64, NodeName)>,
}

/// The node's request/reply and monitor state.
pub(crate) struct Rpc {
    state: Mutex<State>,
    /// Wakes the timer when a request with an earlier deadline starts.
    wake: Arc<Notify>,
    pub(crate) factories: std::sync::RwLock<HashMap<String, Arc<Factory>>>,
}

impl Rpc {
    pub(crate) fn new() -> Arc<Rpc> {
        let rpc = Arc::new(Rpc {
            state: Mutex::new(State {
                next_ref: 1,
                ..State::default()
            }),
            wake: Arc::new(Notify::new()),
            factories: std::sync::RwLock::new(HashMap::new()),
        });
        tokio::spawn(timer(Arc::downgrade(&rpc), rpc.wake.clone()));
        rpc
    }
}

/// Ends requests at their deadline; stops when the node is gone.
async fn timer(rpc: Weak<Rpc>, wake: Arc<Notify>) {
    loop {
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let next = {
            let Some(rpc) = rpc.upgrade() else { return };
            let mut state = lock(&rpc.state);
            for (_, waiter) in state.requests.handle_timeout(Instant::now()) {
                let _ = waiter.send(Err(Ended::TimedOut));
            }
            state.requests.poll_timeout()
        };
        // Look again now and then even when idle, to notice the node is gone.
        let until = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            () = tokio::time::sleep_until(until.into()) => {}
            () = woken => {}
        }
    }
}

/// Sends an rpc frame to `peer`; `false` when no link to it is up.
pub(crate) fn send_rpc(node: &Node, peer: &NodeName, frame: &RpcFrame) -> bool {
    node.send_capability(peer, CAPABILITY, rpc::encode(frame))
        .is_ok()
}

fn deliver_notice(node: &Node, watcher: u64, notice: Notice) {
    let mailbox = read(&node.inner.processes)
        .get(&watcher)
        .map(|s| s.mailbox.clone());
    if let Some(mailbox) = mailbox {
        let _ = mailbox.push(Mail::One(Message::notice_of(notice)));
    }
}

/// Sends `request` to `peer` and waits until it ends.
pub(crate) async fn request(
    node: &Node,
    peer: &NodeName,
    request: Request,
    timeout: Duration,
) -> Result<Reply, Error> {
    let rpc = &node.inner.rpc;
    let (tx, rx) = oneshot::channel();
    {
        let mut state = lock(&rpc.state);
        if !state.up.contains(peer) {
            return Err(Error::NotConnected { node: peer.clone() });
        }
        let id = state
            .requests
            .start(peer.clone(), Instant::now(), timeout, tx);
        // Sent under the lock: a reply cannot overtake the request's entry.
        if !send_rpc(node, peer, &RpcFrame::Request { id, request }) {
            state.requests.cancel(id);
            return Err(Error::NotConnected { node: peer.clone() });
        }
    }
    rpc.wake.notify_one();
    match rx.await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(Ended::TimedOut)) => Err(Error::Timeout {
            what: format!("waiting for {peer} to answer"),
        }),
        Ok(Err(Ended::LinkDown)) | Err(_) => Err(Error::LinkLost { node: peer.clone() }),
    }
}

/// Maps a remote failure to the caller's error.
pub(crate) fn failure(peer: &NodeName, f: Failure, pid: Option<&Pid>) -> Error {
    match f {
        Failure::NoProcess => match pid {
            Some(pid) => Error::NoProcess { pid: pid.clone() },
            None => Error::NotServed {
                node: peer.clone(),
                why: "no such process".into(),
            },
        },
        Failure::NoReply => Error::NoReply { node: peer.clone() },
        Failure::UnknownFactory(factory) => Error::UnknownFactory {
            node: peer.clone(),
            factory,
        },
        Failure::Refused(reason) => Error::SpawnRefused {
            node: peer.clone(),
            reason,
        },
        Failure::NotServed(why) => Error::NotServed {
            node: peer.clone(),
            why,
        },
        other => Error::NotServed {
            node: peer.clone(),
            why: other.to_string(),
        },
    }
}

/// Spawns a process from factory `name` with `args` on this node.
pub(crate) fn spawn_local(node: &Node, name: &str, args: Bytes) -> Result<Pid, Failure> {
    let factory = read(&node.inner.rpc.factories).get(name).cloned();
    let Some(factory) = factory else {
        return Err(Failure::UnknownFactory(name.to_string()));
    };
    if let Some(check) = &factory.check {
        check(&args).map_err(Failure::Refused)?;
    }
    Ok(node.spawn(move |ctx| (factory.body)(ctx, args)))
}

/// Answers a request from `peer`.
fn serve(node: &Node, peer: &NodeName, id: u64, request: Request) {
    let reply = match request {
        Request::Call {
            to,
            creation,
            from,
            payload,
        } => {
            let pid = Pid {
                node: node.name().clone(),
                id: to,
                creation,
            };
            let from = from.map(|id| Pid {
                node: peer.clone(),
                id,
                creation: peer_creation(node, peer),
            });
            let reply = ReplyTo::Remote {
                node: Some(node.clone()),
                peer: peer.clone(),
                id,
            };
            match node.deliver_call(&pid, from, payload, reply) {
                // The process answers (or its drop of the call does).
                Ok(()) => return,
                Err(mut reply) => {
                    reply.answer(Err(Failure::NoProcess));
                    return;
                }
            }
        }
        Request::Spawn { factory, args } => match spawn_local(node, &factory, args) {
            Ok(pid) => Reply::Spawned(pid.id),
            Err(f) => Reply::Failed(f),
        },
        Request::Report => Reply::Report(node.report().encode()),
        _ => Reply::Failed(Failure::NotServed("unknown request".into())),
    };
    send_rpc(node, peer, &RpcFrame::Reply { id, reply });
}

fn peer_creation(node: &Node, peer: &NodeName) -> u64 {
    lock(&node.inner.links)
        .up
        .get(peer)
        .map_or(0, |l| l.peer_creation())
}

/// Process `watcher` watches `target`.
pub(crate) fn monitor(node: &Node, watcher: u64, target: &Pid) -> MonitorRef {
    let rpc = &node.inner.rpc;
    let mut state = lock(&rpc.state);
    let mref = state.next_ref;
    state.next_ref += 1;
    let monitor = MonitorRef(mref);
    let down = |reason| Notice::Down {
        monitor,
        pid: target.clone(),
        reason,
    };
    if target.node == *node.name() {
        // Looked at under the lock the exit takes too, so the exit cannot slip between.
        if !node.is_alive(target) {
            drop(state);
            deliver_notice(node, watcher, down(ExitReason::NoProcess));
            return monitor;
        }
        state.local.insert(mref, (watcher, target.id));
        state
            .watchers
            .entry(target.id)
            .or_default()
            .push(Watcher::Local { mref, watcher });
        return monitor;
    }
    let frame = RpcFrame::Monitor {
        mref,
        target: target.id,
        creation: target.creation,
    };
    if !state.up.contains(&target.node) || !send_rpc(node, &target.node, &frame) {
        drop(state);
        deliver_notice(node, watcher, down(ExitReason::NoConnection));
        return monitor;
    }
    state.remote.insert(mref, (watcher, target.clone()));
    monitor
}

/// Process `watcher` watches node `peer`.
pub(crate) fn monitor_node(node: &Node, watcher: u64, peer: NodeName) -> MonitorRef {
    let mut state = lock(&node.inner.rpc.state);
    let mref = state.next_ref;
    state.next_ref += 1;
    let monitor = MonitorRef(mref);
    // Only links that use the capability report their end to it.
    if !state.up.contains(&peer) {
        drop(state);
        deliver_notice(
            node,
            watcher,
            Notice::NodeDown {
                monitor,
                node: peer,
            },
        );
        return monitor;
    }
    state.nodes.insert(mref, (watcher, peer));
    monitor
}

/// Cancels a monitor; `false` if it had fired or was cancelled already.
pub(crate) fn demonitor(node: &Node, monitor: MonitorRef) -> bool {
    let mref = monitor.0;
    let mut state = lock(&node.inner.rpc.state);
    if let Some((_, target)) = state.local.remove(&mref) {
        if let Some(list) = state.watchers.get_mut(&target) {
            list.retain(|w| !matches!(w, Watcher::Local { mref: m, .. } if *m == mref));
        }
        return true;
    }
    if let Some((_, target)) = state.remote.remove(&mref) {
        send_rpc(node, &target.node, &RpcFrame::Demonitor { mref });
        return true;
    }
    state.nodes.remove(&mref).is_some()
}

/// Local process `id` exited with `reason`: its watchers are told, and its own monitors go.
pub(crate) fn process_exited(node: &Node, id: u64, reason: &ExitReason) {
    let mut state = lock(&node.inner.rpc.state);
    let pid = Pid {
        node: node.name().clone(),
        id,
        creation: node.creation(),
    };
    let mut notices = Vec::new();
    for w in state.watchers.remove(&id).unwrap_or_default() {
        match w {
            Watcher::Local { mref, watcher } => {
                state.local.remove(&mref);
                notices.push((
                    watcher,
                    Notice::Down {
                        monitor: MonitorRef(mref),
                        pid: pid.clone(),
                        reason: reason.clone(),
                    },
                ));
            }
            Watcher::Remote { peer, mref } => {
                let reason = reason.clone();
                send_rpc(node, &peer, &RpcFrame::Down { mref, reason });
            }
        }
    }
    // What it watched itself.
    let own_local: Vec<u64> = state
        .local
        .iter()
        .filter(|(_, (w, _))| *w == id)
        .map(|(m, _)| *m)
        .collect();
    for mref in own_local {
        if let Some((_, target)) = state.local.remove(&mref) {
            if let Some(list) = state.watchers.get_mut(&target) {
                list.retain(|w| !matches!(w, Watcher::Local { mref: m, .. } if *m == mref));
            }
        }
    }
    let own_remote: Vec<u64> = state
        .remote
        .iter()
        .filter(|(_, (w, _))| *w == id)
        .map(|(m, _)| *m)
        .collect();
    for mref in own_remote {
        if let Some((_, target)) = state.remote.remove(&mref) {
            send_rpc(node, &target.node, &RpcFrame::Demonitor { mref });
        }
    }
    state.nodes.retain(|_, (w, _)| *w != id);
    drop(state);
    for (watcher, notice) in notices {
        deliver_notice(node, watcher, notice);
    }
}

impl Capability for Rpc {
    fn name(&self) -> &str {
        CAPABILITY
    }

    fn on_link_up(&self, _node: &Node, peer: &NodeName) {
        lock(&self.state).up.insert(peer.clone());
    }

    fn on_link_down(&self, node: &Node, peer: &NodeName) {
        let mut notices = Vec::new();
        {
            let mut state = lock(&self.state);
            state.up.remove(peer);
            for (_, waiter) in state.requests.on_link_down(peer) {
                let _ = waiter.send(Err(Ended::LinkDown));
            }
            let lost: Vec<u64> = state
                .remote
                .iter()
                .filter(|(_, (_, t))| t.node == *peer)
                .map(|(m, _)| *m)
                .collect();
            for mref in lost {
                if let Some((watcher, pid)) = state.remote.remove(&mref) {
                    notices.push((
                        watcher,
                        Notice::Down {
                            monitor: MonitorRef(mref),
                            pid,
                            reason: ExitReason::NoConnection,
                        },
                    ));
                }
            }
            let nodes: Vec<u64> = state
                .nodes
                .iter()
                .filter(|(_, (_, n))| n == peer)
                .map(|(m, _)| *m)
                .collect();
            for mref in nodes {
                if let Some((watcher, node)) = state.nodes.remove(&mref) {
                    notices.push((
                        watcher,
                        Notice::NodeDown {
                            monitor: MonitorRef(mref),
                            node,
                        },
                    ));
                }
            }
            for list in state.watchers.values_mut() {
                list.retain(|w| !matches!(w, Watcher::Remote { peer: p, .. } if p == peer));
            }
            state.watchers.retain(|_, l| !l.is_empty());
        }
        for (watcher, notice) in notices {
            deliver_notice(node, watcher, notice);
        }
    }

    fn on_frame(&self, node: &Node, peer: &NodeName, body: Bytes) -> Result<(), String> {
        match rpc::decode(&body)? {
            RpcFrame::Request { id, request } => serve(node, peer, id, request),
            RpcFrame::Reply { id, reply } => {
                let waiter = lock(&self.state).requests.on_reply(peer, id);
                match waiter {
                    Some(w) => {
                        let _ = w.send(Ok(reply));
                    }
                    None => {
                        node.inner
                            .stats
                            .unexpected_replies
                            .fetch_add(1, Ordering::Relaxed);
                        debug!(node = %node.name(), %peer, id, "reply to no pending request");
                    }
                }
            }
            RpcFrame::Monitor {
                mref,
                target,
                creation,
            } => {
                let pid = Pid {
                    node: node.name().clone(),
                    id: target,
                    creation,
                };
                let mut state = lock(&self.state);
                if node.is_alive(&pid) {
                    state
                        .watchers
                        .entry(target)
                        .or_default()
                        .push(Watcher::Remote {
                            peer: peer.clone(),
                            mref,
                        });
                } else {
                    let reason = ExitReason::NoProcess;
                    send_rpc(node, peer, &RpcFrame::Down { mref, reason });
                }
            }
            RpcFrame::Demonitor { mref } => {
                let mut state = lock(&self.state);
                for list in state.watchers.values_mut() {
                    list.retain(
                        |w| !matches!(w, Watcher::Remote { peer: p, mref: m } if p == peer && *m == mref),
                    );
                }
                state.watchers.retain(|_, l| !l.is_empty());
            }
            RpcFrame::Down { mref, reason } => {
                let watched = {
                    let mut state = lock(&self.state);
                    match state.remote.get(&mref) {
                        Some((_, pid)) if pid.node == *peer => state.remote.remove(&mref),
                        _ => None,
                    }
                };
                if let Some((watcher, pid)) = watched {
                    let notice = Notice::Down {
                        monitor: MonitorRef(mref),
                        pid,
                        reason,
                    };
                    deliver_notice(node, watcher, notice);
                }
            }
            _ => return Err("unknown rpc frame".into()),
        }
        Ok(())
    }
}

/// Fetches `peer`'s report.
pub(crate) async fn report(
    node: &Node,
    peer: &NodeName,
    timeout: Duration,
) -> Result<Report, Error> {
    match request(node, peer, Request::Report, timeout).await? {
        Reply::Report(body) => Report::decode(&body).map_err(|why| Error::NotServed {
            node: peer.clone(),
            why,
        }),
        Reply::Failed(f) => Err(failure(peer, f, None)),
        other => Err(Error::NotServed {
            node: peer.clone(),
            why: format!("unexpected answer {other:?}"),
        }),
    }
}
