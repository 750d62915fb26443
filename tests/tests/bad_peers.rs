//! Bad peers: corrupting nodes are banned swarm-wide, a false accuser bans nobody, and every
//! honest node still ends with the exact bytes.

use std::time::Duration;

use anyhow::Context;
use shoal_node::{chaos::ChaosMode, FetchOptions};
use shoal_tests::{start_chaos_node, start_node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupting_nodes_are_banned_and_honest_nodes_are_not() -> anyhow::Result<()> {
    shoal_tests::init_tracing();
    let tmp = tempfile::tempdir()?;
    let size = 24 * 1024 * 1024;
    // The master's upload is capped so that peers have a reason to exist; the publisher
    // has left, so only the master and the nodes hold the file.
    let shoal_tests::Published {
        master,
        bootstrap,
        file,
        src,
    } = shoal_tests::published(tmp.path(), size, 13, Some(8 * 1024 * 1024)).await?;
    let sent_before = master.metrics().piece_bytes_sent.get();

    let bad_modes = [
        ChaosMode::Corrupt,
        ChaosMode::CorruptSome,
        ChaosMode::CorruptExceptMaster,
        ChaosMode::Truncate,
    ];
    let mut bad = Vec::new();
    let mut all = Vec::new();
    for (i, mode) in bad_modes.iter().enumerate() {
        let c = start_chaos_node(&tmp.path().join(format!("bad{i}")), &bootstrap, *mode).await?;
        bad.push(c.peer_id());
        all.push((c, tmp.path().join(format!("bad{i}")), false));
    }
    let liar =
        start_chaos_node(&tmp.path().join("liar"), &bootstrap, ChaosMode::FalseAccuse).await?;
    all.push((liar, tmp.path().join("liar"), false));
    for i in 0..12 {
        let dir = tmp.path().join(format!("honest{i}"));
        all.push((start_node(&dir, &bootstrap, None).await?, dir, true));
    }
    let mut tasks = Vec::new();
    for (i, (client, dir, honest)) in all.iter().enumerate() {
        if *honest && !all[i - 1].2 {
            // The corrupters start first, and honest nodes only once every corrupter holds
            // blocks: then honest nodes are sure to be sent to each of them, so each one's
            // misbehaviour is seen (a corrupter nobody fetches from cannot be caught).
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let status = master.status(file).await.context("status")?;
                // Corrupters also fetch from one another, so some may be banned already.
                let exposed = |p: &libp2p::PeerId| {
                    status.banned.contains(p)
                        || status.mirrors.iter().any(|m| m.peer == *p && m.blocks > 0)
                };
                if bad.iter().all(exposed) {
                    break;
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "some corrupter holds no blocks after 60 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let (c, out) = (client.clone(), dir.join("out.bin"));
        let task =
            tokio::spawn(async move { shoal_node::fetch(&c, FetchOptions::new(file, &out)).await });
        tasks.push((task, dir.clone(), *honest, client.peer_id()));
    }
    let want = std::fs::read(&src)?;
    let mut honest_peers = Vec::new();
    for (task, dir, honest, peer) in tasks {
        if !honest {
            // Bad nodes may be cut off before they finish; they only need to have served.
            continue;
        }
        honest_peers.push(peer);
        tokio::time::timeout(Duration::from_secs(180), task)
            .await
            .with_context(|| format!("honest node {peer} did not finish"))???;
        assert!(
            std::fs::read(dir.join("out.bin"))? == want,
            "honest node {peer} wrote wrong bytes"
        );
    }
    // Probes may still be finishing: give the verdicts a bounded moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = master.status(file).await.context("status")?;
        let missing: Vec<_> = bad.iter().filter(|p| !status.banned.contains(p)).collect();
        for p in &honest_peers {
            assert!(!status.banned.contains(p), "honest node {p} was banned");
        }
        if missing.is_empty() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "corrupting nodes not banned: {missing:?}; banned: {:?}",
            status.banned
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = master.status(file).await.context("status")?;
    assert!(
        !status.banned.contains(&all[4].0.peer_id()),
        "the false accuser itself is not a corrupter"
    );
    assert_eq!(master.metrics().bans.get(), 4);
    let egress = (master.metrics().piece_bytes_sent.get() - sent_before) as f64 / size as f64;
    assert!(egress <= 2.0, "master sent {egress:.2}x the file size");
    // Honest nodes heard the bans on the authority topic.
    let heard = all
        .iter()
        .filter(|(c, _, honest)| *honest && bad.iter().all(|b| c.is_banned(b)))
        .count();
    assert!(heard > 0, "no honest node heard the bans");
    drop(all);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalling_and_lying_nodes_slow_nobody_for_long() -> anyhow::Result<()> {
    shoal_tests::init_tracing();
    let tmp = tempfile::tempdir()?;
    // The master's upload is capped so that peers have a reason to exist; the publisher
    // has left, so only the master and the nodes hold the file.
    let shoal_tests::Published {
        // Kept alive for the whole test: dropping the handle stops the master.
        master: _master,
        bootstrap,
        file,
        src,
    } = shoal_tests::published(tmp.path(), 16 * 1024 * 1024, 17, Some(8 * 1024 * 1024)).await?;

    let mut nodes = Vec::new();
    for (i, mode) in [ChaosMode::Stall, ChaosMode::LieHave].iter().enumerate() {
        let dir = tmp.path().join(format!("bad{i}"));
        nodes.push((start_chaos_node(&dir, &bootstrap, *mode).await?, dir, false));
    }
    for i in 0..6 {
        let dir = tmp.path().join(format!("honest{i}"));
        nodes.push((start_node(&dir, &bootstrap, None).await?, dir, true));
    }
    let mut tasks = Vec::new();
    for (client, dir, honest) in &nodes {
        if *honest && !tasks.is_empty() && !tasks.last().is_some_and(|t: &(_, _, bool, _)| t.2) {
            // The bad nodes start first, so that they hold blocks others are sent to fetch.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let (c, out) = (client.clone(), dir.join("out.bin"));
        let task =
            tokio::spawn(async move { shoal_node::fetch(&c, FetchOptions::new(file, &out)).await });
        tasks.push((task, dir.clone(), *honest, client.peer_id()));
    }
    let want = std::fs::read(&src)?;
    for (task, dir, honest, peer) in tasks {
        if !honest {
            task.abort();
            continue;
        }
        // Without bad peers this takes about 2 s at the master's 8 MiB/s; a stalled transfer
        // is abandoned after 10 s, and each node avoids a bad peer after one failure.
        let report = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .with_context(|| format!("honest node {peer} was held up for over 60 s"))???;
        assert!(
            std::fs::read(dir.join("out.bin"))? == want,
            "honest node {peer} wrote wrong bytes"
        );
        assert!(
            report.elapsed_s < 45.0,
            "honest node {peer} took {:.1} s",
            report.elapsed_s
        );
    }
    drop(nodes);
    Ok(())
}
