//! A node's life: shutdown frees what the node held, so it can come back on the same address.

use bytes::Bytes;
use rusm_cluster::ClusterCa;

use super::*;

pub async fn a_node_restarts_on_its_old_address<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let london = node::<T>(&ca, "london").await;
    let paris = node::<T>(&ca, "paris").await;
    let addr = london.local_addr();
    paris.connect("london", addr).await.unwrap();
    let mut events = paris.subscribe();
    london.shutdown().await;
    next_down(&mut events).await;
    // The old handle is still alive; the address must be free all the same.
    let again = within(
        rusm_testkit::issued::<T>(&ca, "london")
            .listen(addr)
            .start(),
    )
    .await
    .expect("shutdown freed the address");
    assert_eq!(again.local_addr(), addr);
    assert_ne!(again.creation(), london.creation());
    let (p, mut inbox) = collector(&again);
    again.register("inbox", &p).unwrap();
    paris.connect("london", addr).await.unwrap();
    paris
        .send("london", "inbox", Bytes::from_static(b"welcome back"))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut inbox).await.payload(),
        &Bytes::from_static(b"welcome back")
    );
    drop(london);
}

pub async fn exited_processes_leave_no_pair_state<T: Transport>() {
    let (_ca, london, paris) = pair::<T>().await;
    let (p, mut inbox) = collector(&london);
    london.register("inbox", &p).unwrap();
    let pairs_in = |node: &rusm_cluster::Node| node.peers()[0].pairs_in;
    // A process that lives on keeps its pair.
    let (stay_tx, stay_rx) = tokio::sync::oneshot::channel::<()>();
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
    paris.spawn(move |ctx| async move {
        ctx.send("london", "inbox", Bytes::from_static(b"alive"))
            .await
            .unwrap();
        let _ = sent_tx.send(());
        let _ = stay_rx.await;
    });
    within(sent_rx).await.unwrap();
    recv(&mut inbox).await;
    wait_until(|| pairs_in(&london) == 1).await;
    // 300 short-lived processes, three messages each, then gone: their pairs are forgotten on
    // both sides, and every message arrived.
    for i in 0..300u32 {
        paris.spawn(move |ctx| async move {
            for j in 0..3u32 {
                let body = Bytes::from((i * 3 + j).to_be_bytes().to_vec());
                ctx.send("london", "inbox", body).await.unwrap();
            }
        });
    }
    for _ in 0..900 {
        recv(&mut inbox).await;
    }
    wait_until(|| pairs_in(&london) == 1).await;
    drop(stay_tx);
    wait_until(|| pairs_in(&london) == 0).await;
    assert_eq!(london.stats().lost_messages, 0);
}

/// A send dropped mid-write resets its stream: the receiver counts the message lost (once, with
/// its sender's lost notice), never malformed, and the pair's next message is not held back.
pub async fn a_cancelled_send_is_lost_not_malformed<T: Transport>() {
    let ca = ClusterCa::generate("test").unwrap();
    let mut config = rusm_testkit::test_config();
    config.link_budget_bytes = 1 << 20;
    let london = rusm_testkit::start_node::<T>(&ca, "london", config)
        .await
        .unwrap();
    let paris = node::<T>(&ca, "paris").await;
    paris.connect("london", london.local_addr()).await.unwrap();
    // A process that reads nothing until told to, so the link budget stays spent.
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (tx, mut inbox) = mpsc::unbounded_channel();
    let slow = london.spawn(move |mut ctx| async move {
        let _ = go_rx.await;
        while let Some(m) = ctx.recv().await {
            if tx.send(m).is_err() {
                break;
            }
        }
    });
    london.register("slow", &slow).unwrap();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    paris.spawn(move |ctx| async move {
        ctx.send("london", "slow", Bytes::from(vec![1u8; 900 << 10]))
            .await
            .unwrap();
        // The receiver cannot take this one while its budget is spent: on a stack that holds
        // writes to flow control (quinn) the write stalls, and the send is dropped half-way. A
        // stack that buffers the whole write (s2n, mem) finishes the send instead.
        let big = ctx.send("london", "slow", Bytes::from(vec![2u8; 6 << 20]));
        let cancelled = tokio::time::timeout(Duration::from_millis(500), big)
            .await
            .is_err();
        ctx.send("london", "slow", Bytes::from_static(b"after"))
            .await
            .unwrap();
        let _ = done_tx.send(cancelled);
    });
    let cancelled = within(done_rx).await.unwrap();
    go_tx.send(()).unwrap();
    assert_eq!(recv(&mut inbox).await.payload().len(), 900 << 10);
    if !cancelled {
        // Not cancelled after all: it must arrive whole, in order.
        assert_eq!(recv(&mut inbox).await.payload().len(), 6 << 20);
    }
    assert_eq!(
        recv(&mut inbox).await.payload(),
        &Bytes::from_static(b"after"),
        "the pair's next message is not held back"
    );
    let lost = u64::from(cancelled);
    wait_until(|| london.stats().lost_messages == lost).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = london.stats();
    assert_eq!(stats.malformed_messages, 0, "{stats:?}");
    assert_eq!(stats.lost_messages, lost, "counted once: {stats:?}");
}

/// A node given a runtime (`NodeBuilder::runtime`) runs there: its processes (even those
/// spawned from another runtime) and its dials, while the caller stays on its own runtime.
pub async fn a_node_runs_on_the_runtime_it_is_given<T: Transport>() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("london-runtime".into())
        .spawn(move || {
            rt.block_on(async {
                let _ = stopped.await;
            })
        })
        .unwrap();

    let ca = ClusterCa::generate("test").unwrap();
    let london = within(
        rusm_testkit::issued::<T>(&ca, "london")
            .runtime(handle)
            .start(),
    )
    .await
    .unwrap();
    // Spawned from the test's runtime, it runs on london's: it answers with its thread's name.
    let where_am_i = london.spawn(|mut ctx| async move {
        while ctx.recv().await.is_some() {
            let here = std::thread::current().name().unwrap_or("").to_owned();
            let _ = ctx.send("paris", "inbox", Bytes::from(here)).await;
        }
    });
    london.register("where", &where_am_i).unwrap();
    let paris = node::<T>(&ca, "paris").await;
    let (inbox_pid, mut inbox) = collector(&paris);
    paris.register("inbox", &inbox_pid).unwrap();
    // london dials, from the test's runtime; the link runs on london's.
    within(london.connect("paris", paris.local_addr()))
        .await
        .unwrap();
    paris
        .send("london", "where", Bytes::from_static(b"?"))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut inbox).await.payload(),
        &Bytes::from_static(b"london-runtime")
    );
    assert_ne!(
        std::thread::current().name(),
        Some("london-runtime"),
        "the test itself runs elsewhere"
    );
    london.shutdown().await;
    paris.shutdown().await;
    stop.send(()).unwrap();
    thread.join().unwrap();
}
