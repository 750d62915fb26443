//! Kademlia keeps the swarm going without the master: six nodes fetch a file; once every
//! block has reached some node (and every node holds some), the master is shut down for good.
//! Every node still finishes, with the exact bytes, from providers it found through Kademlia.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};
use std::time::Duration;

use anyhow::Context;
use shoal_node::{chaos::ChaosMode, FetchOptions};
use shoal_tests::start_node;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swarm_finishes_without_the_master() -> anyhow::Result<()> {
    shoal_tests::init_tracing();
    let tmp = tempfile::tempdir()?;
    let size: u64 = 4 * 1024 * 1024;
    let n = 6;
    // The nodes upload slowly, so that the master's first copies are out well before the
    // nodes have traded them all: the master goes "half way".
    let node_rate = 256 * 1024;
    // Small pieces, from the master and between peers: when the master stops, no node is
    // left with one long transfer that carries it to the end.
    let src = tmp.path().join("source.bin");
    shoal_tests::write_random_file(&src, size as usize, 31)?;
    let master = shoal_master::Master::start(
        shoal_tests::master_config(&tmp.path().join("master"), Some(4 * 1024 * 1024)).with_policy(
            shoal_master::PolicyConfig {
                max_master_piece: 2,
                lone_master_piece: 2,
                min_master_piece: 1,
                max_peer_piece: 4,
                ..Default::default()
            },
        ),
    )
    .await?;
    let bootstrap = master.addrs()[0].clone();
    let (publisher, file) =
        shoal_tests::publish(&tmp.path().join("publisher"), &bootstrap, &src).await?;
    publisher.shutdown().await;

    let mut nodes = Vec::new();
    for i in 0..n {
        let dir = tmp.path().join(format!("node{i}"));
        nodes.push((start_node(&dir, &bootstrap, Some(node_rate)).await?, dir));
    }
    let mut tasks = Vec::new();
    let mut held = Vec::new();
    for (client, dir) in &nodes {
        let h = Arc::new(AtomicU64::new(0));
        held.push(h.clone());
        let mut opts = FetchOptions::new(file, dir.join("out.bin"));
        opts.progress = Some(Arc::new(move |now, _| h.store(now, Ordering::Relaxed)));
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(180), shoal_node::fetch(&c, opts))
                .await
                .with_context(|| format!("{} did not finish within 180 s", c.peer_id()))?;
            anyhow::Ok(r?)
        }));
    }

    // Half way: every block has reached a node that told the master so, and every node holds
    // some blocks.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = master.status(file).await.context("status")?;
        let holders = held
            .iter()
            .filter(|h| h.load(Ordering::Relaxed) > 0)
            .count();
        if s.master_only_blocks == 0 && holders >= n {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "after 60 s {} blocks are still only at the master, {holders} nodes hold blocks",
            s.master_only_blocks
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While the master answers, no node answers Kademlia queries (a crowd's bootstrap
    // queries would cost it CPU its transfers need).
    for (client, _) in &nodes {
        anyhow::ensure!(
            !client.kad_server().await,
            "{} answers Kademlia queries while the master is up",
            client.peer_id()
        );
    }
    let master_sent = master.metrics().piece_bytes_sent.get();
    master.shutdown().await;
    let done: u64 = held.iter().map(|h| h.load(Ordering::Relaxed)).sum();
    let total = size * n as u64;
    println!(
        "master stopped with {done} of {total} bytes ({:.0}%) at the nodes; it sent {master_sent}",
        100.0 * done as f64 / total as f64
    );
    anyhow::ensure!(
        done * 4 <= total * 3,
        "the nodes were nearly done when the master stopped ({done} of {total} bytes): \
         the test shows nothing"
    );

    let want = std::fs::read(&src)?;
    let mut from_master = 0;
    let mut swarm_locates = 0;
    for (t, (client, dir)) in tasks.into_iter().zip(&nodes) {
        let report = t.await??;
        assert!(
            std::fs::read(dir.join("out.bin"))? == want,
            "{} has different bytes",
            client.peer_id()
        );
        from_master += report.bytes_from_master;
        swarm_locates += report.swarm_locates;
    }
    assert!(
        from_master <= master_sent,
        "the nodes got {from_master} bytes from the master, which sent only {master_sent} \
         before it stopped"
    );
    assert!(
        swarm_locates > 0,
        "no locate went through Kademlia: the master was not needed after all?"
    );
    for (client, _) in &nodes {
        anyhow::ensure!(
            client.kad_server().await,
            "{} does not answer Kademlia queries with the master gone",
            client.peer_id()
        );
    }
    println!(
        "after the master stopped: {} bytes from peers, {swarm_locates} swarm locates",
        total - done
    );
    Ok(())
}

/// A fetch STARTED while the master is down (`shoal fetch --manifest M --peer ADDR`): a new
/// node given the manifest and one holder's address starts without the master, finds the
/// holders through Kademlia and fetches the exact bytes from them. When the master comes back
/// (same data dir, same address) the node tells it what it holds, and the master redirects a
/// newcomer to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_started_while_the_master_is_down_works_from_a_manifest() -> anyhow::Result<()> {
    shoal_tests::init_tracing();
    let tmp = tempfile::tempdir()?;
    let size: usize = 2 * 1024 * 1024;
    let src = tmp.path().join("source.bin");
    shoal_tests::write_random_file(&src, size, 47)?;
    let master_dir = tmp.path().join("master");
    let master = shoal_master::Master::start(shoal_tests::master_config(&master_dir, None)).await?;
    let bootstrap = master.addrs()[0].clone();
    let (publisher, file) =
        shoal_tests::publish(&tmp.path().join("publisher"), &bootstrap, &src).await?;
    publisher.shutdown().await;
    let holders = shoal_tests::fetch_all(
        &tmp.path().join("holders"),
        &bootstrap,
        file,
        2,
        None,
        Duration::from_secs(60),
    )
    .await?;
    // The manifest as a node keeps it (the format `shoal inspect --save-manifest` writes).
    let manifest_file = tmp.path().join("file.manifest");
    std::fs::copy(
        shoal_node::provenance::manifest_path(&tmp.path().join("holders").join("node0"), &file),
        &manifest_file,
    )?;
    let holder = &holders[0].client;
    let holder_addr = holder.listen_addrs().await[0]
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(holder.peer_id()));
    let master_listen: libp2p::Multiaddr = bootstrap
        .iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect();
    master.shutdown().await;

    // Without leave to start masterless, a node refuses to start, and says why.
    let e = match shoal_tests::start_node(&tmp.path().join("refused"), &bootstrap, None).await {
        Ok(_) => anyhow::bail!("a node started with its master down"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("cannot reach the master"), "{e}");

    let dir = tmp.path().join("late");
    let late = tokio::time::timeout(
        Duration::from_secs(30),
        shoal_node::start(
            shoal_node::NodeConfig::new(&dir, bootstrap.clone())
                .with_listen(vec![shoal_tests::loopback()])
                .with_peers(vec![holder_addr])
                .with_start_without_master(true),
        ),
    )
    .await
    .context("the node did not start within 30 s")??;
    // Without the manifest, the fetch cannot start: it says what to do.
    let e = shoal_node::fetch(&late, FetchOptions::new(file, dir.join("no.bin")))
        .await
        .err()
        .context("a fetch without a manifest worked with the master down")?
        .to_string();
    assert!(e.contains("--manifest"), "{e}");

    let manifest = shoal_node::provenance::load_manifest(&manifest_file, Some(&file))?;
    let out = dir.join("out.bin");
    let report = tokio::time::timeout(
        Duration::from_secs(120),
        shoal_node::fetch(
            &late,
            FetchOptions::new(file, &out).with_manifest(Arc::new(manifest)),
        ),
    )
    .await
    .context("the masterless fetch did not finish within 120 s")??;
    assert!(
        std::fs::read(&out)? == std::fs::read(&src)?,
        "different bytes"
    );
    assert_eq!(report.bytes_from_master, 0);
    assert_eq!(report.bytes_from_peers, size as u64);
    assert!(report.swarm_locates > 0, "no locate went through Kademlia");
    anyhow::ensure!(
        late.kad_server().await,
        "a node started without the master does not answer Kademlia queries"
    );
    println!(
        "masterless fetch: {} bytes from peers in {:.1} s, {} swarm locates",
        report.bytes_from_peers, report.elapsed_s, report.swarm_locates
    );

    // The master comes back: the node greets it and says what it holds.
    let master = shoal_master::Master::start(
        shoal_tests::master_config(&master_dir, None).with_listen(vec![master_listen]),
    )
    .await?;
    anyhow::ensure!(
        master.addrs()[0] == bootstrap,
        "the master came back elsewhere"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let blocks = loop {
        let s = master.status(file).await.context("status")?;
        let mirror = s.mirrors.iter().find(|m| m.peer == late.peer_id());
        if let Some(m) = mirror.filter(|m| m.blocks == s.blocks) {
            break m.blocks;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "30 s after the master came back it does not know what the node holds: {:?}",
            s.mirrors
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("the master came back and heard the node holds all {blocks} blocks");
    // It answered the node's hello, so the node is a Kademlia client again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while late.kad_server().await {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the node still answers Kademlia queries 10 s after the master answered it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and redirects to it: the other holders leave, a newcomer fetches from the node.
    for h in &holders {
        h.client.shutdown().await;
    }
    let served_before = late.bytes_uploaded();
    let fresh = shoal_tests::fetch_all(
        &tmp.path().join("fresh"),
        &bootstrap,
        file,
        1,
        None,
        Duration::from_secs(60),
    )
    .await?;
    let got = fresh[0].report.bytes_from_peers;
    let served = late.bytes_uploaded() - served_before;
    assert!(got > 0, "the newcomer got nothing from peers");
    assert_eq!(
        served, got,
        "the newcomer's peer bytes came from someone else"
    );
    println!("a newcomer then got {got} of {size} bytes from it");
    master.shutdown().await;
    Ok(())
}

/// A peer whose hinted addresses are wrong is still found through Kademlia and used. The
/// requester takes every redirect hint for a closed port (chaos mode `wrong-hints`), and has
/// never met the holder: it joined first, and it announces no dialable address, so the
/// holder's Kademlia queries never reach it. Redirected to the holder, it fails to dial the
/// hint, looks the holder up in Kademlia and fetches the file from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_hinted_addresses_are_wrong_is_found_through_kademlia() -> anyhow::Result<()>
{
    shoal_tests::init_tracing();
    let tmp = tempfile::tempdir()?;
    let size: usize = 1024 * 1024;
    let src = tmp.path().join("source.bin");
    shoal_tests::write_random_file(&src, size, 53)?;
    let master = shoal_tests::start_master(&tmp.path().join("master"), None).await?;
    let bootstrap = master.addrs()[0].clone();
    let (publisher, file) =
        shoal_tests::publish(&tmp.path().join("publisher"), &bootstrap, &src).await?;
    publisher.shutdown().await;

    // The requester first, undialable (an unspecified address is dropped by everyone).
    let rdir = tmp.path().join("requester");
    let requester = shoal_node::start(
        shoal_node::NodeConfig::new(&rdir, bootstrap.clone())
            .with_listen(vec![shoal_tests::loopback()])
            .with_announce(vec!["/ip4/0.0.0.0/tcp/9".parse()?])
            .with_chaos(Some(ChaosMode::WrongHints)),
    )
    .await?;
    let hdir = tmp.path().join("holder");
    let holder = shoal_tests::start_node(&hdir, &bootstrap, None).await?;
    tokio::time::timeout(
        Duration::from_secs(60),
        shoal_node::fetch(&holder, FetchOptions::new(file, hdir.join("out.bin"))),
    )
    .await
    .context("the holder did not finish")??;

    let served_before = holder.bytes_uploaded();
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        shoal_node::fetch(&requester, FetchOptions::new(file, rdir.join("out.bin"))),
    )
    .await
    .context("the requester did not finish")??;
    assert!(std::fs::read(rdir.join("out.bin"))? == std::fs::read(&src)?);
    let served = holder.bytes_uploaded() - served_before;
    let (looked_up, reached) = requester.peer_lookups();
    println!(
        "requester: {} bytes from peers, {} from the master; the holder served {served}; \
         {looked_up} lookups after a failed dial, {reached} reached",
        report.bytes_from_peers, report.bytes_from_master
    );
    assert!(report.bytes_from_peers > 0, "nothing came from the holder");
    assert_eq!(
        served, report.bytes_from_peers,
        "peer bytes from someone else"
    );
    // The lookup path runs unless the requester's own provider announce (within a second of
    // the fetch starting, also through Kademlia) happened to reach the holder first. Runs
    // that fail together share one lookup; a run that still fails after it goes back to the
    // scheduler (and may be served by the master), so one reach is what this asserts.
    assert!(
        looked_up == 0 || reached >= 1,
        "{looked_up} lookups, none of which reached the holder"
    );
    master.shutdown().await;
    Ok(())
}

/// A peer that leaves is dropped from the master's routing table: the master hands out in
/// answers to `FIND_NODE` (every node's bootstrap lookup asks it) only peers still connected,
/// so new nodes are not sent to dial addresses nobody listens on. Asked with raw frames, so
/// the answer is the master's table as it stands (libp2p-kad's own lookup would dial each
/// peer and drop the dead ones itself, hiding the stale entries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_left_is_no_longer_handed_out_by_the_master() -> anyhow::Result<()> {
    use libp2p::identity::Keypair;
    use shoal_tests::raw::RawPeer;

    shoal_tests::init_tracing();
    let tmp = tempfile::tempdir()?;
    let master = shoal_tests::start_master(&tmp.path().join("master"), None).await?;
    let bootstrap = master.addrs()[0].clone();
    let asker = RawPeer::start(Keypair::generate_ed25519(), false, Some(&bootstrap)).await?;
    let leaver = RawPeer::start(Keypair::generate_ed25519(), true, Some(&bootstrap)).await?;
    let gone = leaver.peer_id();
    anyhow::ensure!(
        leaver.connections() == 1,
        "the leaving peer did not connect"
    );

    // `listed` is whether the master's answer names `gone`; waits up to 10 s for it to be so.
    let until = |listed: bool| {
        let asker = &asker;
        let master = master.peer_id();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let peers = asker.kad_find_node(master, gone).await?;
                if peers.contains(&gone) == listed {
                    return anyhow::Ok(());
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "10 s on, the master's FIND_NODE answer {} {gone}: {peers:?}",
                    if listed { "still lacks" } else { "still names" },
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // Its identify put it in the table (the master feeds every peer's listen addresses in).
    until(true).await.context("while the peer was connected")?;
    drop(leaver);
    until(false).await.context("after the peer left")?;
    Ok(())
}
