//! Request/reply, remote spawn, monitors and live attach: every call ends (reply, no reply,
//! no process, timeout, link lost), factories are the only things spawned from afar, monitors
//! fire once into the watcher's mailbox, and an attach client reads a node's report without
//! joining anyone's peer list.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rusm_cluster::core::transport::Transport;
use rusm_cluster::{ClusterCa, Error, ExitReason, Message, MonitorRef, Node, Notice, Pid};
use tokio::sync::mpsc;

use super::faults::CutPath;
use super::{collector, node, pair, recv, start_node, wait_until, within};

const SECOND: Duration = Duration::from_secs(1);

/// A process that answers each call with its payload reversed.
fn reverser(node: &Node) -> Pid {
    node.spawn(|mut ctx| async move {
        while let Some(mut msg) = ctx.recv().await {
            let mut b = msg.payload().to_vec();
            b.reverse();
            let _ = msg.reply(Bytes::from(b));
        }
    })
}

/// A process that keeps every call it gets and never answers.
fn hoarder(node: &Node) -> Pid {
    node.spawn(|mut ctx| async move {
        let mut kept: Vec<Message> = Vec::new();
        while let Some(msg) = ctx.recv().await {
            kept.push(msg);
        }
    })
}

pub async fn call_gets_the_reply_or_a_typed_error<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    let rev = reverser(&london);
    for from in [&paris, &london] {
        let reply = from
            .call(&rev, Bytes::from_static(b"abc"), SECOND)
            .await
            .unwrap();
        assert_eq!(reply, "cba", "from {}", from.name());
    }
    // From a process: the callee sees the caller.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let who = london.spawn(|mut ctx| async move {
        while let Some(mut msg) = ctx.recv().await {
            let _ = tx.send(msg.from().cloned());
            let _ = msg.reply(Bytes::from_static(b"seen"));
        }
    });
    let caller = paris.spawn(move |ctx| async move {
        assert_eq!(ctx.call(&who, Bytes::new(), SECOND).await.unwrap(), "seen");
    });
    assert_eq!(within(rx.recv()).await.unwrap(), Some(caller));

    // A process that never answers: a timeout, at the deadline.
    let hoard = hoarder(&london);
    let started = Instant::now();
    let err = paris
        .call(&hoard, Bytes::new(), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // A process that drops the call unanswered: NoReply at once, not a timeout.
    let dropper = london.spawn(|mut ctx| async move { while ctx.recv().await.is_some() {} });
    let err = paris
        .call(&dropper, Bytes::new(), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NoReply { node } if node.as_str() == "london"),
        "{err}"
    );

    // No such process (exited), remote and local.
    let gone = london.spawn(|_ctx| async {});
    wait_until(|| !london.is_alive(&gone)).await;
    for from in [&paris, &london] {
        match from.call(&gone, Bytes::new(), SECOND).await {
            Err(Error::NoProcess { pid }) => assert_eq!(pid, gone),
            r => panic!("expected NoProcess, got {r:?}"),
        }
    }
    // A message that is not a call cannot be answered.
    let (inbox, mut at_inbox) = collector(&london);
    paris
        .send_to(&inbox, Bytes::from_static(b"plain"))
        .await
        .unwrap();
    let mut plain = recv(&mut at_inbox).await;
    assert!(!plain.is_call());
    assert!(matches!(plain.reply(Bytes::new()), Err(Error::NotACall)));
    // Too large for a control frame.
    let big = Bytes::from(vec![0u8; 2 << 20]);
    assert!(matches!(
        paris.call(&rev, big, SECOND).await,
        Err(Error::MessageTooLarge { .. })
    ));
    assert_eq!(paris.stats().unexpected_replies, 0);
}

pub async fn spawn_remote_runs_only_registered_factories<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    london.register_factory("rev", |mut ctx, prefix: Bytes| async move {
        while let Some(mut msg) = ctx.recv().await {
            let mut b = prefix.to_vec();
            b.extend(msg.payload().iter().rev());
            let _ = msg.reply(Bytes::from(b));
        }
    });
    london.register_factory_checked(
        "bounded",
        |args: &Bytes| {
            if args.len() > 4 {
                Err(format!("{} bytes of arguments, 4 at most", args.len()))
            } else {
                Ok(())
            }
        },
        |_ctx, _args| async {},
    );
    let pid = paris
        .spawn_remote("london", "rev", Bytes::from_static(b">"))
        .await
        .unwrap();
    assert_eq!(pid.node().as_str(), "london");
    assert_eq!(pid.creation(), london.creation());
    assert!(london.is_alive(&pid));
    assert_eq!(
        paris
            .call(&pid, Bytes::from_static(b"ab"), SECOND)
            .await
            .unwrap(),
        ">ba"
    );
    // On this node too, by its own name.
    let here = london
        .spawn_remote("london", "rev", Bytes::new())
        .await
        .unwrap();
    assert!(london.is_alive(&here));

    match paris.spawn_remote("london", "shell", Bytes::new()).await {
        Err(Error::UnknownFactory { node, factory }) => {
            assert_eq!((node.as_str(), factory.as_str()), ("london", "shell"))
        }
        r => panic!("expected UnknownFactory, got {r:?}"),
    }
    match paris
        .spawn_remote("london", "bounded", Bytes::from_static(b"12345"))
        .await
    {
        Err(Error::SpawnRefused { node, reason }) => {
            assert_eq!(node.as_str(), "london");
            assert_eq!(reason, "5 bytes of arguments, 4 at most");
        }
        r => panic!("expected SpawnRefused, got {r:?}"),
    }
    assert!(paris
        .spawn_remote("london", "bounded", Bytes::from_static(b"1234"))
        .await
        .is_ok());
    assert!(matches!(
        paris.spawn_remote("rome", "rev", Bytes::new()).await,
        Err(Error::NotConnected { .. })
    ));
}

/// Waits for the next notice in `rx` (skipping nothing: the next message must be one).
async fn notice(rx: &mut mpsc::UnboundedReceiver<Message>) -> Notice {
    let msg = recv(rx).await;
    msg.notice()
        .cloned()
        .unwrap_or_else(|| panic!("not a notice: {msg:?}"))
}

/// A watcher process that sets the monitors asked through the returned sender and forwards
/// everything it receives.
fn watcher(
    node: &Node,
) -> (
    mpsc::UnboundedSender<Pid>,
    mpsc::UnboundedReceiver<MonitorRef>,
    mpsc::UnboundedReceiver<Message>,
) {
    let (want, mut wants) = mpsc::unbounded_channel::<Pid>();
    let (refs_tx, refs) = mpsc::unbounded_channel();
    let (seen_tx, seen) = mpsc::unbounded_channel();
    node.spawn(|mut ctx| async move {
        loop {
            tokio::select! {
                pid = wants.recv() => match pid {
                    Some(pid) => { let _ = refs_tx.send(ctx.monitor(&pid)); }
                    None => break,
                },
                msg = ctx.recv() => match msg {
                    Some(m) => { let _ = seen_tx.send(m); }
                    None => break,
                },
            }
        }
    });
    (want, refs, seen)
}

pub async fn monitors_fire_once_with_the_exit_reason<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    let (watch, mut refs, mut seen) = watcher(&paris);
    // A remote process that returns when told, one that panics, one that is killed.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let normal = london.spawn(|ctx| async move {
        let _ctx = ctx;
        let _ = stop_rx.await;
    });
    let (boom_tx, boom_rx) = tokio::sync::oneshot::channel::<()>();
    let panics = london.spawn(|ctx| async move {
        let _ctx = ctx;
        let _ = boom_rx.await;
        panic!("boom");
    });
    let killed = london.spawn(|mut ctx| async move { while ctx.recv().await.is_some() {} });
    let local = paris.spawn(|mut ctx| async move { while ctx.recv().await.is_some() {} });
    let mut monitors = Vec::new();
    for pid in [&normal, &panics, &killed, &local] {
        watch.send(pid.clone()).unwrap();
        monitors.push(within(refs.recv()).await.unwrap());
    }
    // Let the remote monitors reach london before the exits.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop_tx.send(()).unwrap();
    let expect = |m, pid: &Pid, reason| Notice::Down {
        monitor: m,
        pid: pid.clone(),
        reason,
    };
    assert_eq!(
        notice(&mut seen).await,
        expect(monitors[0], &normal, ExitReason::Normal)
    );
    boom_tx.send(()).unwrap();
    assert_eq!(
        notice(&mut seen).await,
        expect(monitors[1], &panics, ExitReason::Panicked("boom".into()))
    );
    assert!(london.kill(&killed));
    assert_eq!(
        notice(&mut seen).await,
        expect(monitors[2], &killed, ExitReason::Killed)
    );
    assert!(paris.kill(&local));
    assert_eq!(
        notice(&mut seen).await,
        expect(monitors[3], &local, ExitReason::Killed)
    );
    // A dead pid: NoProcess at once, remote and local.
    for pid in [&normal, &local] {
        watch.send(pid.clone()).unwrap();
        let m = within(refs.recv()).await.unwrap();
        assert_eq!(
            notice(&mut seen).await,
            expect(m, pid, ExitReason::NoProcess)
        );
    }
    // Once each: nothing more arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(seen.try_recv().is_err(), "a monitor fired twice");
}

pub async fn demonitor_and_node_monitors<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    let target = london.spawn(|mut ctx| async move { while ctx.recv().await.is_some() {} });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let t = target.clone();
    paris.spawn(move |mut ctx| async move {
        let m = ctx.monitor(&t);
        let n = ctx.monitor_node("london").unwrap();
        let _ = go_rx.await;
        // Cancelled before the target exits: no notice from it.
        assert!(ctx.demonitor(m));
        assert!(!ctx.demonitor(m), "cancelled twice");
        let _ = tx.send(("set", n));
        while let Some(msg) = ctx.recv().await {
            if let Some(notice) = msg.notice() {
                let _ = tx.send((
                    match notice {
                        Notice::NodeDown { .. } => "node down",
                        Notice::Down { .. } => "down",
                        _ => "other",
                    },
                    n,
                ));
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    go_tx.send(()).unwrap();
    assert_eq!(within(rx.recv()).await.unwrap().0, "set");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(london.kill(&target));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_err(), "a cancelled monitor fired");
    london.shutdown().await;
    assert_eq!(within(rx.recv()).await.unwrap().0, "node down");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_err(), "a node monitor fired twice");
}

/// A node lost mid-request (its cable cut): the pending call and spawn fail with LinkLost when
/// it is declared down, and monitors of its processes fire with NoConnection.
pub async fn requests_and_monitors_fail_when_the_node_is_lost<T: CutPath>() {
    let ca = ClusterCa::generate("rpc").unwrap();
    let mut config = rusm_testkit::test_config();
    config.tuning.idle_timeout = Duration::from_millis(1500);
    config.tuning.keep_alive_interval = Duration::from_millis(300);
    config.request_timeout = Duration::from_secs(30);
    let start = |name: &'static str| start_node::<T>(&ca, name, config.clone());
    let london = start("london").await.unwrap();
    let paris = start("paris").await.unwrap();
    let path = T::path(paris.local_addr(), london.local_addr()).await;
    paris.connect("london", path.dial).await.unwrap();
    london.register_factory("idle", |_ctx, _args| async {});
    let hoard = hoarder(&london);
    let (watch, mut refs, mut seen) = watcher(&paris);
    watch.send(hoard.clone()).unwrap();
    let m = within(refs.recv()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    path.cut();
    let started = Instant::now();
    let call = paris.call(&hoard, Bytes::from_static(b"?"), Duration::from_secs(30));
    let spawn = paris.spawn_remote("london", "idle", Bytes::new());
    let (call, spawn) = within(async { tokio::join!(call, spawn) }).await;
    assert!(
        matches!(&call, Err(Error::LinkLost { node }) if node.as_str() == "london"),
        "{call:?}"
    );
    assert!(matches!(&spawn, Err(Error::LinkLost { .. })), "{spawn:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        notice(&mut seen).await,
        Notice::Down {
            monitor: m,
            pid: hoard,
            reason: ExitReason::NoConnection
        }
    );
    paris.shutdown().await;
    london.shutdown().await;
}

pub async fn attach_reads_the_report_without_joining<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let london = node::<T>(&ca, "london").await;
    let paris = node::<T>(&ca, "paris").await;
    paris.connect("london", london.local_addr()).await.unwrap();
    let (db, mut at_db) = collector(&london);
    london.register("db", &db).unwrap();
    london.register_global("db-global", &db).await.unwrap();
    for _ in 0..3 {
        paris
            .send("london", "db", Bytes::from_static(b"x"))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        // Taken out and dropped: the mailbox is empty again.
        recv(&mut at_db).await;
    }
    let ops = rusm_testkit::issued::<T>(&ca, "ops")
        .hidden(true)
        .start()
        .await
        .unwrap();
    ops.connect("london", london.local_addr()).await.unwrap();
    let report = ops.attach_report("london").await.unwrap();
    assert_eq!(report.node, "london");
    assert_eq!(report.creation, london.creation());
    assert_eq!(report.listen, london.local_addr().to_string());
    let p = report
        .processes
        .iter()
        .find(|p| p.id == db.id())
        .expect("db listed");
    assert_eq!(p.names, ["db", "global:db-global"]);
    assert_eq!((p.mailbox, p.messages_in), (0, 3));
    assert_eq!(report.local_names.get("db"), Some(&db.id()));
    assert_eq!(report.global_names.get("db-global"), Some(&db.to_string()));
    assert_eq!(report.peers.len(), 1);
    assert_eq!(report.peers[0].name, "paris");
    assert_eq!(report.peers[0].messages_received, 3);
    assert_eq!(report.attached, 1);
    assert_eq!(report.counters.get("messages_received"), Some(&3));
    // The attacher is in nobody's peer list, and joined no one else.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in [&london, &paris] {
        assert!(
            n.peers().iter().all(|p| p.name.as_str() != "ops"),
            "{}",
            n.name()
        );
    }
    assert_eq!(london.attached().len(), 1);
    assert_eq!(ops.peers().len(), 1);
    // An attacher whose certificate the cluster does not trust is refused, and counted.
    let rogue = ClusterCa::generate("test").unwrap();
    let intruder = rusm_testkit::builder::<T>("ops2")
        .identity(rogue.issue("ops2").unwrap())
        .trust(ca.trust())
        .hidden(true)
        .start()
        .await
        .unwrap();
    assert!(matches!(
        intruder.connect("london", london.local_addr()).await,
        Err(Error::Rejected { .. })
    ));
    wait_until(|| london.report().refusals.values().sum::<u64>() >= 1).await;
    assert!(london.attached().len() == 1);
    for n in [&intruder, &ops, &paris, &london] {
        n.shutdown().await;
    }
}
