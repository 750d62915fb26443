//! Churn: master + 16 nodes fetch a 64 MiB file with rate-limited uploads; a third of the
//! nodes are killed (no goodbye, connections just drop) at random moments mid-transfer. No
//! killed node is banned for having died: one of them comes back with its key (same data
//! dir), resumes, and serves.

use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{seq::SliceRandom, Rng, SeedableRng};
use shoal_node::FetchOptions;
use shoal_tests::start_node;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_finish_and_dead_mirrors_leave_within_five_seconds() -> anyhow::Result<()> {
    shoal_tests::init_tracing();
    let tmp = tempfile::tempdir()?;
    // The master's upload is capped so that peers have a reason to exist; the publisher
    // has left, so only the master and the nodes hold the file.
    let shoal_tests::Published {
        master,
        bootstrap,
        file,
        src,
    } = shoal_tests::published(tmp.path(), 64 * 1024 * 1024, 11, Some(8 * 1024 * 1024)).await?;

    let mut nodes = Vec::new();
    for i in 0..16 {
        let dir = tmp.path().join(format!("node{i}"));
        let client = start_node(&dir, &bootstrap, Some(4 * 1024 * 1024)).await?;
        let out = dir.join("out.bin");
        let c = client.clone();
        let task =
            tokio::spawn(async move { shoal_node::fetch(&c, FetchOptions::new(file, &out)).await });
        nodes.push((client, dir, task));
    }

    // A third of the nodes die at random moments in the first seconds of the transfer.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.shuffle(&mut rng);
    let victims: Vec<usize> = order[..5].to_vec();
    let mut moments: Vec<u64> = victims.iter().map(|_| rng.gen_range(500..6000)).collect();
    moments.sort();
    let started = Instant::now();
    for (victim, at) in victims.iter().zip(&moments) {
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            started + Duration::from_millis(*at),
        ))
        .await;
        let (client, _, task) = &nodes[*victim];
        let dead = client.peer_id();
        task.abort();
        client.kill();
        // Within 5 s the master no longer lists it as a mirror, so no assignment names it.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = master.status(file).await.context("master lost the file")?;
            if !status.mirrors.iter().any(|m| m.peer == dead) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "dead node {dead} still a mirror 5 s after its kill"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The first victim comes back with its key (same data dir) and resumes its fetch: the
    // master accepts it (a banned peer is refused at once) and it serves others again.
    let back_dir = nodes[victims[0]].1.clone();
    let back_id = nodes[victims[0]].0.peer_id();
    let back = start_node(&back_dir, &bootstrap, None).await?;
    anyhow::ensure!(back.peer_id() == back_id, "the restart changed the key");
    let back_task = {
        let (c, out) = (back.clone(), back_dir.join("out.bin"));
        tokio::spawn(async move { shoal_node::fetch(&c, FetchOptions::new(file, &out)).await })
    };

    let want = std::fs::read(&src)?;
    // Dropping a node's last Client stops it: keep the survivors running to the end.
    let mut keep = Vec::new();
    for (i, (client, dir, task)) in nodes.into_iter().enumerate() {
        if victims.contains(&i) {
            continue;
        }
        let report = tokio::time::timeout(Duration::from_secs(180), task)
            .await
            .with_context(|| format!("survivor {} did not finish", client.peer_id()))???;
        assert!(
            std::fs::read(dir.join("out.bin"))? == want,
            "survivor {i} has wrong bytes"
        );
        assert!(report.blocks > 0);
        keep.push(client);
    }
    tokio::time::timeout(Duration::from_secs(180), back_task)
        .await
        .context("the restarted node did not finish")???;
    anyhow::ensure!(
        std::fs::read(back_dir.join("out.bin"))? == want,
        "the restarted node has wrong bytes"
    );
    // Its last `Have` may still be on its way: within a bounded wait the master lists the
    // 11 survivors and the restarted node as live mirrors of every block.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = master.status(file).await.context("status")?;
        let full = status
            .mirrors
            .iter()
            .filter(|m| m.live && m.blocks == status.blocks)
            .count();
        if full == 12 && status.mirrors.iter().any(|m| m.peer == back_id) {
            break status;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "mirrors after 10 s: {:?}",
            status.mirrors
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for m in &status.mirrors {
        assert!(m.live, "status lists a mirror that is not live: {}", m.peer);
    }
    assert_eq!(status.mirrors.len(), 12, "mirrors: {:?}", status.mirrors);
    // Nobody was banned: a peer that dies is not a peer that lies.
    assert_eq!(status.banned_total, 0, "banned: {:?}", status.banned);
    assert_eq!(master.metrics().bans.get(), 0);

    // It serves: with every other node gone, a newcomer gets its peer bytes from it alone.
    for c in keep {
        c.shutdown().await;
    }
    let uploaded = back.bytes_uploaded();
    let dir = tmp.path().join("newcomer");
    let newcomer = start_node(&dir, &bootstrap, None).await?;
    let report = tokio::time::timeout(
        Duration::from_secs(120),
        shoal_node::fetch(&newcomer, FetchOptions::new(file, dir.join("out.bin"))),
    )
    .await
    .context("the newcomer did not finish")??;
    anyhow::ensure!(
        std::fs::read(dir.join("out.bin"))? == want,
        "the newcomer has wrong bytes"
    );
    assert!(
        report.bytes_from_peers > 0,
        "the newcomer got nothing from peers"
    );
    assert!(
        back.bytes_uploaded() > uploaded,
        "the restarted node served nothing"
    );
    Ok(())
}
