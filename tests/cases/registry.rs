//! The global registry and the mesh: nodes that join through one member link to all, global
//! names resolve and route from every node, follow their process and node, and a name taken on
//! both sides of a partition settles on one owner when it heals, the loser told.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rusm_cluster::core::transport::Transport;
use rusm_cluster::core::wire::RejectReason;
use rusm_cluster::{ClusterCa, Error, Node, Notice, Pid};

use super::{collector, node, recv, wait_until, within};

/// `n` nodes named `n0..`, each connected only to `n0`; returns once every node sees all the
/// others (the mesh did the rest), and how long that took from the first connect.
pub async fn cluster_through_one<T: Transport>(ca: &ClusterCa, n: usize) -> (Vec<Node>, Duration) {
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(node::<T>(ca, &format!("n{i}")).await);
    }
    let started = Instant::now();
    let first = nodes[0].local_addr();
    let joins = nodes[1..].iter().map(|node| node.connect("n0", first));
    for r in futures_util::future::join_all(joins).await {
        r.unwrap();
    }
    wait_until(|| nodes.iter().all(|node| node.peers().len() == n - 1)).await;
    (nodes, started.elapsed())
}

async fn shutdown_all(nodes: &[Node]) {
    futures_util::future::join_all(nodes.iter().map(|n| n.shutdown())).await;
}

/// Every node of `nodes` resolves `name` to `pid` (or to nothing).
async fn all_see(nodes: &[Node], name: &str, pid: Option<&Pid>) {
    wait_until(|| nodes.iter().all(|n| n.whereis_global(name).as_ref() == pid)).await;
}

pub async fn five_nodes_joined_through_one_form_a_full_mesh<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let (nodes, _) = cluster_through_one::<T>(&ca, 5).await;
    for node in &nodes {
        let peers = node.peers();
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        let others: Vec<String> = (0..5)
            .map(|i| format!("n{i}"))
            .filter(|n| n != node.name().as_str())
            .collect();
        assert_eq!(names, others, "{}", node.name());
        for p in &peers {
            assert_eq!(
                p.capabilities,
                ["mesh", "registry", "rpc"],
                "{}",
                node.name()
            );
        }
        assert_eq!(node.stats().mesh_dial_failures, 0);
    }
    // Simultaneous dials between joiners kept one link per pair: 10 links in all.
    let links: u64 = nodes.iter().map(|n| n.peers().len() as u64).sum();
    assert_eq!(links, 2 * 10);
    shutdown_all(&nodes).await;
}

pub async fn global_names_register_route_and_unregister<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let (nodes, _) = cluster_through_one::<T>(&ca, 3).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let (db, mut at_db) = collector(b);
    b.register_global("db", &db).await.unwrap();
    all_see(&nodes, "db", Some(&db)).await;
    assert_eq!(a.registered_global(), [("db".to_string(), db.clone())]);

    // Routed to the owner from every node, per-pair order kept (from a process, and not).
    let sender = c.spawn(|ctx| async move {
        for i in 0..200u32 {
            ctx.send_global("db", Bytes::from(i.to_be_bytes().to_vec()))
                .await
                .unwrap();
        }
    });
    for i in 0..200u32 {
        let m = recv(&mut at_db).await;
        assert_eq!(m.payload().as_ref(), i.to_be_bytes(), "message {i}");
        assert_eq!(m.from().map(|p| p.node().as_str()), Some("n2"));
        assert_eq!(m.from().map(Pid::id), Some(sender.id()));
    }
    a.send_global("db", Bytes::from_static(b"from a"))
        .await
        .unwrap();
    b.send_global("db", Bytes::from_static(b"from b"))
        .await
        .unwrap();
    let mut got = vec![
        recv(&mut at_db).await.into_payload(),
        recv(&mut at_db).await.into_payload(),
    ];
    got.sort();
    assert_eq!(
        got,
        [Bytes::from_static(b"from a"), Bytes::from_static(b"from b")]
    );

    // Taken, from any node; only the owner's node may release it.
    let (other, _) = collector(c);
    match c.register_global("db", &other).await {
        Err(Error::NameTaken { name, pid }) => assert_eq!((name.as_str(), pid), ("db", db.clone())),
        r => panic!("expected NameTaken, got {r:?}"),
    }
    match a.unregister_global("db").await {
        Err(Error::NotOwner { name, owner }) => {
            assert_eq!((name.as_str(), owner), ("db", db.clone()))
        }
        r => panic!("expected NotOwner, got {r:?}"),
    }
    assert!(matches!(
        c.register_global("", &other).await,
        Err(Error::BadName { len: 0, max: 255 })
    ));

    assert_eq!(b.unregister_global("db").await.unwrap(), db);
    all_see(&nodes, "db", None).await;
    let err = a
        .send_global("db", Bytes::from_static(b"kept"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err.error, Error::NameNotRegistered { name } if name == "db"),
        "{err}"
    );
    assert_eq!(
        err.payload,
        Bytes::from_static(b"kept"),
        "the payload comes back"
    );
    assert!(matches!(
        b.unregister_global("db").await,
        Err(Error::NameNotRegistered { .. })
    ));
    // Free again: another process takes it.
    c.register_global("db", &other).await.unwrap();
    all_see(&nodes, "db", Some(&other)).await;
    shutdown_all(&nodes).await;
}

pub async fn a_global_name_goes_when_its_process_exits<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let (nodes, _) = cluster_through_one::<T>(&ca, 3).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = nodes[1].spawn(|ctx| async move {
        let _ctx = ctx;
        let _ = stopped.await;
    });
    nodes[1].register_global("worker", &worker).await.unwrap();
    nodes[1].register_global("worker-2", &worker).await.unwrap();
    all_see(&nodes, "worker", Some(&worker)).await;
    all_see(&nodes, "worker-2", Some(&worker)).await;
    stop.send(()).unwrap();
    all_see(&nodes, "worker", None).await;
    all_see(&nodes, "worker-2", None).await;
    // A dead process cannot take a name.
    assert!(matches!(
        nodes[1].register_global("worker", &worker).await,
        Err(Error::NoProcess { .. })
    ));
    shutdown_all(&nodes).await;
}

pub async fn a_global_name_goes_with_its_node<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let (nodes, _) = cluster_through_one::<T>(&ca, 3).await;
    let (pid, _rx) = collector(&nodes[2]);
    nodes[2].register_global("svc", &pid).await.unwrap();
    all_see(&nodes, "svc", Some(&pid)).await;
    nodes[2].shutdown().await;
    all_see(&nodes[..2], "svc", None).await;
    let err = nodes[0]
        .send_global("svc", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(
        matches!(err.error, Error::NameNotRegistered { .. }),
        "{err}"
    );
    shutdown_all(&nodes[..2]).await;
}

pub async fn a_blocked_peer_stays_cut<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let (nodes, _) = cluster_through_one::<T>(&ca, 3).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    a.block("n1").await.unwrap();
    wait_until(|| a.peers().len() == 1 && b.peers().len() == 1).await;
    assert_eq!(a.blocked(), ["n1"]);
    // Neither side's dial gets through, whichever dials.
    for (from, to) in [(a, b), (b, a)] {
        match from.connect(to.name().as_str(), to.local_addr()).await {
            Err(Error::Rejected { reason, .. }) => assert_eq!(reason, RejectReason::Blocked),
            r => panic!("expected Rejected(Blocked), got {r:?}"),
        }
    }
    // The mesh does not bring it back either, even when n2 re-announces everyone.
    nodes[2].disconnect("n0").await;
    nodes[2].connect("n0", a.local_addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.peers().iter().all(|p| p.name.as_str() != "n1"));
    a.unblock("n1");
    b.connect("n0", a.local_addr()).await.unwrap();
    wait_until(|| a.peers().len() == 2).await;
    shutdown_all(&nodes).await;
}

pub async fn a_partition_heals_to_one_owner_and_the_loser_is_told<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let (nodes, _) = cluster_through_one::<T>(&ca, 4).await;
    // Partition {n0, n1} | {n2, n3}.
    for left in &nodes[..2] {
        for right in &nodes[2..] {
            left.block(right.name().as_str()).await.unwrap();
        }
    }
    wait_until(|| nodes.iter().all(|n| n.peers().len() == 1)).await;

    // Each side takes "leader"; the left side first, so its claim is the earlier.
    let (left, mut at_left) = collector(&nodes[0]);
    nodes[0].register_global("leader", &left).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (right, mut at_right) = collector(&nodes[3]);
    nodes[3].register_global("leader", &right).await.unwrap();
    all_see(&nodes[..2], "leader", Some(&left)).await;
    all_see(&nodes[2..], "leader", Some(&right)).await;
    nodes[2]
        .send_global("leader", Bytes::from_static(b"right side"))
        .await
        .unwrap();
    assert_eq!(recv(&mut at_right).await.payload().as_ref(), b"right side");

    // Heal: lift the blocks and make one link; the mesh makes the others.
    for left in &nodes[..2] {
        for right in &nodes[2..] {
            left.unblock(right.name().as_str());
        }
    }
    nodes[1].connect("n2", nodes[2].local_addr()).await.unwrap();
    wait_until(|| nodes.iter().all(|n| n.peers().len() == 3)).await;

    // One owner everywhere: the earlier claim.
    all_see(&nodes, "leader", Some(&left)).await;
    for n in &nodes {
        assert_eq!(
            n.registered_global(),
            [("leader".to_string(), left.clone())],
            "{}",
            n.name()
        );
    }
    // The loser is told, once, in its mailbox.
    let notice = recv(&mut at_right).await;
    assert_eq!(
        notice.notice(),
        Some(&Notice::NameConflict {
            name: "leader".into(),
            winner: left.clone(),
        })
    );
    assert!(notice.payload().is_empty() && notice.from().is_none());
    assert_eq!(nodes[3].stats().global_name_conflicts, 1);
    assert_eq!(nodes[0].stats().global_name_conflicts, 0);
    // Every node routes to the winner; the loser gets nothing more.
    for n in &nodes {
        n.send_global("leader", Bytes::from(n.name().to_string()))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(recv(&mut at_left).await.into_payload());
    }
    got.sort();
    assert_eq!(
        got,
        ["n0", "n1", "n2", "n3"].map(|n| Bytes::from(n.as_bytes()))
    );
    assert!(
        within(async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            at_right.try_recv().is_err()
        })
        .await,
        "the loser received a message after losing the name"
    );
    shutdown_all(&nodes).await;
}

pub async fn a_hidden_node_never_joins_the_mesh_or_the_registry<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let (nodes, _) = cluster_through_one::<T>(&ca, 3).await;
    let (pid, _rx) = collector(&nodes[1]);
    nodes[1].register_global("svc", &pid).await.unwrap();
    all_see(&nodes, "svc", Some(&pid)).await;
    let ops = rusm_testkit::issued::<T>(&ca, "ops")
        .hidden(true)
        .start()
        .await
        .unwrap();
    ops.connect("n0", nodes[0].local_addr()).await.unwrap();
    wait_until(|| nodes[0].attached().len() == 1).await;
    let seen = nodes[0].attached().remove(0);
    assert_eq!(seen.name.as_str(), "ops");
    assert!(seen.hidden);
    // Request/reply only (for attach): no mesh, no registry.
    assert_eq!(seen.capabilities, ["rpc"]);
    assert_eq!(nodes[0].peers().len(), 2, "a hidden node is not a peer");
    // A node joining later is not told of it either.
    let late = node::<T>(&ca, "n3").await;
    late.connect("n0", nodes[0].local_addr()).await.unwrap();
    wait_until(|| late.peers().len() == 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in nodes[1..].iter().chain([&late]) {
        assert!(
            n.peers().iter().all(|p| p.name.as_str() != "ops"),
            "{} linked to the hidden node",
            n.name()
        );
    }
    assert_eq!(ops.peers().len(), 1, "the hidden node dialled members");
    // No registry traffic: it sees no global names and cannot register one.
    assert_eq!(ops.whereis_global("svc"), None);
    let (mine, _) = collector(&ops);
    assert!(matches!(
        ops.register_global("ops-name", &mine).await,
        Err(Error::Config(_))
    ));
    // It still reaches processes by node and name.
    let (inbox, mut at_inbox) = collector(&nodes[0]);
    nodes[0].register("inbox", &inbox).unwrap();
    ops.send("n0", "inbox", Bytes::from_static(b"report"))
        .await
        .unwrap();
    assert_eq!(recv(&mut at_inbox).await.payload().as_ref(), b"report");
    ops.shutdown().await;
    late.shutdown().await;
    shutdown_all(&nodes).await;
}

/// The names each node holds before it joins reach every node (they travel in the sync that
/// follows each hello and welcome at once, often in the same read).
pub async fn names_registered_before_joining_reach_every_node<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let mut nodes = Vec::new();
    let mut pids = Vec::new();
    for i in 0..5 {
        let n = node::<T>(&ca, &format!("n{i}")).await;
        let (pid, rx) = collector(&n);
        n.register_global(&format!("svc-{i}"), &pid).await.unwrap();
        pids.push((pid, rx));
        nodes.push(n);
    }
    let first = nodes[0].local_addr();
    for r in futures_util::future::join_all(nodes[1..].iter().map(|n| n.connect("n0", first))).await
    {
        r.unwrap();
    }
    for (i, (pid, _)) in pids.iter().enumerate() {
        all_see(&nodes, &format!("svc-{i}"), Some(pid)).await;
    }
    // And route: every node to every name.
    for n in &nodes {
        for i in 0..5 {
            n.send_global(&format!("svc-{i}"), Bytes::from(n.name().to_string()))
                .await
                .unwrap();
        }
    }
    for (_, rx) in &mut pids {
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(recv(rx).await.into_payload());
        }
        got.sort();
        assert_eq!(
            got,
            ["n0", "n1", "n2", "n3", "n4"].map(|n| Bytes::from(n.as_bytes()))
        );
    }
    shutdown_all(&nodes).await;
}
