//! `rusm demo`: three nodes, a few processes, plain words. Every step checks what it claims and the
//! demo fails (exit 1) on the first step that does not hold.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use rusm_cluster::{ClusterCa, DownReason, Error, ExitReason, Node, NodeEvent, Notice};

fn step(n: u32, text: &str) {
    println!("\n{n}. {text}");
}

fn ok(text: impl AsRef<str>) {
    println!("   ok: {}", text.as_ref());
}

async fn start(ca: &ClusterCa, name: &str) -> Result<Node> {
    let node = Node::builder(name)
        .identity(ca.issue(name)?)
        .trust(ca.trust())
        .listen("127.0.0.1:0".parse()?)
        .start()
        .await
        .with_context(|| format!("starting {name}"))?;
    ok(format!(
        "{name} listens on {} (creation {})",
        node.local_addr(),
        node.creation()
    ));
    Ok(node)
}

/// Runs the demo.
pub(crate) async fn run() -> Result<()> {
    println!("RUSM cluster demo: three nodes on 127.0.0.1.");

    step(1, "A cluster CA issues each node its own certificate (its name is the certificate's DNS name).");
    let ca = ClusterCa::generate("demo")?;
    let london = start(&ca, "london").await?;
    let paris = start(&ca, "paris").await?;
    let berlin = start(&ca, "berlin").await?;

    step(
        2,
        "paris, then berlin, connect to london only: mutual TLS 1.3, then a hello on the control stream.",
    );
    paris.connect("london", london.local_addr()).await?;
    berlin.connect("london", london.local_addr()).await?;
    wait_for(|| london.peers().len() == 2).await?;
    let names: Vec<String> = london.peers().iter().map(|p| p.name.to_string()).collect();
    ensure!(names == ["berlin", "paris"], "london sees {names:?}");
    ok(format!(
        "london is linked to {names:?}; each side verified the other's certificate"
    ));
    wait_for(|| berlin.peers().len() == 2 && paris.peers().len() == 2).await?;
    ok("berlin and paris linked by themselves: london named each to the other (the full mesh)");

    step(3, "london spawns a greeter process and registers it as \"greeter\"; paris sends to it by name.");
    let greeter = london.spawn(|mut ctx| async move {
        while let Some(msg) = ctx.recv().await {
            let Some(from) = msg.from().cloned() else {
                continue;
            };
            let reply = format!(
                "hello {}, greeter {} got {:?}",
                from.node(),
                ctx.pid(),
                String::from_utf8_lossy(msg.payload())
            );
            let _ = ctx.send_to(&from, Bytes::from(reply)).await;
        }
    });
    london.register("greeter", &greeter)?;
    ok(format!("greeter is {greeter}"));
    let reply = ask(&paris, To::Named("london", "greeter"), b"bonjour").await?;
    ensure!(
        reply.starts_with("hello paris"),
        "unexpected reply {reply:?}"
    );
    ok(format!("paris got the reply: {reply:?}"));

    step(
        4,
        "paris registers a process under the global name \"db\"; berlin finds it and sends to it by that name.",
    );
    let db = paris.spawn(|mut ctx| async move {
        while let Some(msg) = ctx.recv().await {
            let Some(from) = msg.from().cloned() else {
                continue;
            };
            let reply = format!(
                "db on {} stored {:?}",
                ctx.node().name(),
                String::from_utf8_lossy(msg.payload())
            );
            let _ = ctx.send_to(&from, Bytes::from(reply)).await;
        }
    });
    paris.register_global("db", &db).await?;
    wait_for(|| berlin.whereis_global("db").is_some() && london.whereis_global("db").is_some())
        .await?;
    ensure!(
        berlin.whereis_global("db") == Some(db.clone()),
        "berlin resolves db to {:?}",
        berlin.whereis_global("db")
    );
    ok(format!("every node resolves \"db\" to {db}"));
    let reply = ask(&berlin, To::Global("db"), b"k=v").await?;
    ok(format!("berlin got: {reply:?}"));
    let other = london.spawn(|mut ctx| async move { while ctx.recv().await.is_some() {} });
    match london.register_global("db", &other).await {
        Err(Error::NameTaken { pid, .. }) => ok(format!(
            "london cannot take \"db\" too: it belongs to {pid}"
        )),
        other => bail!("a second registration of db: {other:?}"),
    }

    step(5, "berlin sends 1,000 numbered messages to one process on paris (each on its own QUIC stream).");
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let counter = paris.spawn(|mut ctx| async move {
        let mut expected = 0u32;
        while expected < 1000 {
            let Some(msg) = ctx.recv().await else { break };
            let n = u32::from_be_bytes(msg.payload()[..4].try_into().unwrap_or([0xff; 4]));
            if n != expected {
                break;
            }
            expected += 1;
        }
        let _ = done_tx.send(expected);
    });
    for i in 0..1000u32 {
        berlin
            .send_to(&counter, Bytes::copy_from_slice(&i.to_be_bytes()))
            .await?;
    }
    let in_order = tokio::time::timeout(Duration::from_secs(10), done_rx)
        .await
        .context("the counter did not finish within 10 s")??;
    ensure!(
        in_order == 1000,
        "only {in_order} messages arrived in order"
    );
    ok("all 1,000 arrived, in the order sent");

    step(
        6,
        "london offers a \"counter\" factory; paris spawns one on london and calls it.",
    );
    london.register_factory("counter", |mut ctx, start: Bytes| async move {
        let mut n = u64::from_be_bytes(start[..].try_into().unwrap_or([0; 8]));
        while let Some(mut msg) = ctx.recv().await {
            n += 1;
            let _ = msg.reply(Bytes::copy_from_slice(&n.to_be_bytes()));
        }
    });
    let counter = paris
        .spawn_remote(
            "london",
            "counter",
            Bytes::copy_from_slice(&41u64.to_be_bytes()),
        )
        .await?;
    ensure!(
        counter.node().as_str() == "london",
        "spawned on {}",
        counter.node()
    );
    ok(format!(
        "paris spawned {counter} on london (only registered factories can be)"
    ));
    let reply = paris
        .call(&counter, Bytes::new(), Duration::from_secs(5))
        .await?;
    let n = u64::from_be_bytes(reply[..].try_into().context("a reply of 8 bytes")?);
    ensure!(n == 42, "the counter answered {n}");
    ok(format!("paris called it and got {n}"));
    match paris.spawn_remote("london", "shell", Bytes::new()).await {
        Err(e @ Error::UnknownFactory { .. }) => {
            ok(format!("an unregistered factory is refused: {e}"))
        }
        other => bail!("spawning an unknown factory: {other:?}"),
    }

    step(
        7,
        "a paris process monitors the counter; london kills it; the monitor fires once.",
    );
    let (down_tx, down_rx) = tokio::sync::oneshot::channel();
    let (set_tx, set_rx) = tokio::sync::oneshot::channel();
    let watched = counter.clone();
    paris.spawn(move |mut ctx| async move {
        let _monitor = ctx.monitor(&watched);
        let _ = set_tx.send(());
        while let Some(msg) = ctx.recv().await {
            if let Some(Notice::Down { pid, reason, .. }) = msg.notice() {
                let _ = down_tx.send((pid.clone(), reason.clone()));
                break;
            }
        }
    });
    set_rx.await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    ensure!(london.kill(&counter), "the counter was not alive");
    let (pid, reason) = tokio::time::timeout(Duration::from_secs(5), down_rx)
        .await
        .context("no down notice within 5 s")??;
    ensure!(
        pid == counter && reason == ExitReason::Killed,
        "down: {pid} {reason}"
    );
    ok(format!(
        "the watcher got Down {{ pid: {pid}, reason: {reason} }}"
    ));

    step(
        8,
        "An operator attaches to london with a certificate issued for \"ops\" (a hidden node: in nobody's peer list).",
    );
    let ops = Node::builder("ops")
        .identity(ca.issue("ops")?)
        .trust(ca.trust())
        .hidden(true)
        .start()
        .await?;
    ops.connect("london", london.local_addr()).await?;
    let report = ops.attach_report("london").await?;
    for line in crate::attach::render(&report, None).lines().take(16) {
        println!("   | {line}");
    }
    ensure!(
        london.peers().iter().all(|p| p.name.as_str() != "ops")
            && paris.peers().iter().all(|p| p.name.as_str() != "ops"),
        "the attach client shows up as a peer"
    );
    ok(format!(
        "the report lists {} processes and {} peers; ops is in nobody's peer list",
        report.processes.len(),
        report.peers.len()
    ));
    ops.shutdown().await;

    step(
        9,
        "An impostor holding a certificate from another CA tries to join as \"paris\".",
    );
    let rogue_ca = ClusterCa::generate("rogue")?;
    let impostor = Node::builder("paris")
        .identity(rogue_ca.issue("paris")?)
        .trust(ca.trust())
        .start()
        .await?;
    match impostor.connect("london", london.local_addr()).await {
        Err(Error::Rejected { reason, .. }) => ok(format!("rejected: {reason}")),
        Ok(()) => bail!("the impostor was let in"),
        Err(other) => bail!("the impostor failed for another reason: {other}"),
    }
    wait_for(|| london.stats().rejected_handshakes == 1).await?;
    ensure!(london.peers().len() == 2, "london's links changed");
    ok("london counted one refused handshake and kept its two real links");

    step(
        10,
        "berlin shuts down; london is told at once, and berlin's global names go with it.",
    );
    let log = berlin.spawn(|mut ctx| async move { while ctx.recv().await.is_some() {} });
    berlin.register_global("berlin-log", &log).await?;
    wait_for(|| london.whereis_global("berlin-log").is_some()).await?;
    let mut events = london.subscribe();
    berlin.shutdown().await;
    let down = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(NodeEvent::NodeDown { node, reason }) = events.recv().await {
                return (node, reason);
            }
        }
    })
    .await
    .context("no node-down event within 5 s")?;
    ensure!(down.0.as_str() == "berlin", "down event for {}", down.0);
    ensure!(
        matches!(down.1, DownReason::Goodbye(_)),
        "reason {}",
        down.1
    );
    ok(format!("node down: berlin ({})", down.1));
    match london.send("berlin", "x", Bytes::from_static(b"?")).await {
        Err(e) if matches!(e.error, Error::NotConnected { .. }) => {
            ok(format!("a later send fails cleanly: {e}"))
        }
        other => bail!("send to a down node: {other:?}"),
    }
    wait_for(|| london.whereis_global("berlin-log").is_none()).await?;
    let names: Vec<String> = london
        .registered_global()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    ensure!(names == ["db"], "london still knows {names:?}");
    ok(format!("london's global names now: {names:?}"));

    impostor.shutdown().await;
    paris.shutdown().await;
    london.shutdown().await;
    println!("\nAll steps did what they said.");
    Ok(())
}

/// Where [`ask`] sends.
enum To {
    /// A locally registered name on a node.
    Named(&'static str, &'static str),
    /// A global name.
    Global(&'static str),
}

/// Spawns a process on `from` that sends `payload` to `to` and waits for one reply; the reply.
async fn ask(from: &Node, to: To, payload: &'static [u8]) -> Result<String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    from.spawn(|mut ctx| async move {
        let payload = Bytes::from_static(payload);
        let sent = match to {
            To::Named(node, name) => ctx.send(node, name, payload).await,
            To::Global(name) => ctx.send_global(name, payload).await,
        };
        let reply = match sent {
            Ok(()) => ctx.recv().await.map(|m| m.into_payload()),
            Err(_) => None,
        };
        let _ = tx.send(reply);
    });
    let reply = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .context("no reply within 5 s")??
        .context("the send failed, or no reply came")?;
    Ok(String::from_utf8_lossy(&reply).to_string())
}

async fn wait_for(mut cond: impl FnMut() -> bool) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .context("condition not reached within 5 s")
}
