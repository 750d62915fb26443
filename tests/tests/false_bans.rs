//! False bans: three colluding false accusers are downloading from an honest node when it is
//! killed; they accuse it of corruption (before and after its death), its probe cannot reach
//! it, and it is still not banned: it comes back with its key, is accepted, and serves.

use std::time::Duration;

use anyhow::Context;
use shoal_node::{chaos::ChaosMode, FetchOptions};
use shoal_tests::{start_chaos_node, start_node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_colluding_accusers_cannot_ban_a_killed_honest_node() -> anyhow::Result<()> {
    shoal_tests::init_tracing();
    let tmp = tempfile::tempdir()?;
    let size = 8 * 1024 * 1024;
    let shoal_tests::Published {
        master,
        bootstrap,
        file,
        src,
    } = shoal_tests::published(tmp.path(), size, 23, Some(4 * 1024 * 1024)).await?;
    let want = std::fs::read(&src)?;

    // The honest node gets the whole file first, then serves it slowly (1 MiB/s), so that
    // the accusers' transfers from it are sure to be under way when it dies.
    let honest_dir = tmp.path().join("honest");
    let honest = start_node(&honest_dir, &bootstrap, Some(1024 * 1024)).await?;
    let honest_id = honest.peer_id();
    let out = honest_dir.join("out.bin");
    tokio::time::timeout(
        Duration::from_secs(60),
        shoal_node::fetch(&honest, FetchOptions::new(file, &out)),
    )
    .await
    .context("the honest node did not finish its first fetch")??;
    anyhow::ensure!(std::fs::read(&out)? == want, "honest node: wrong bytes");

    // Three colluders: every peer they are sent to, they report as corrupt, whether the
    // transfer worked or not. The master redirects them all to the honest node (it holds
    // every block), so each has transfers from it in flight.
    let mut liars = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let dir = tmp.path().join(format!("liar{i}"));
        let c = start_chaos_node(&dir, &bootstrap, ChaosMode::FalseAccuse).await?;
        let (cc, out) = (c.clone(), dir.join("out.bin"));
        tasks.push((
            tokio::spawn(
                async move { shoal_node::fetch(&cc, FetchOptions::new(file, &out)).await },
            ),
            dir,
        ));
        liars.push(c);
    }
    // Kill the honest node once it is serving them (a 4 MiB piece at 1 MiB/s takes 4 s,
    // so no transfer from it has completed yet).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while honest.bytes_uploaded() < 256 * 1024 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the colluders never fetched from the honest node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    honest.kill();
    drop(honest);

    for (task, dir) in tasks {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .context("a colluder did not finish")???;
        anyhow::ensure!(
            std::fs::read(dir.join("out.bin"))? == want,
            "colluder: wrong bytes"
        );
    }
    // The accusations reached the master (whether each matched an assignment depends on
    // whether it arrived before the master saw the death).
    let m = master.metrics();
    let reports = m.reports_counted_for("corrupt") + m.reports_ignored_for("not_assigned");
    anyhow::ensure!(
        reports >= 3,
        "only {reports} accusations reached the master"
    );

    // Back with its key (same data dir): accepted, it fetches (refused if it were banned)
    // and holds the file again.
    let honest = start_node(&honest_dir, &bootstrap, None).await?;
    anyhow::ensure!(honest.peer_id() == honest_id, "restart changed the key");
    tokio::time::timeout(
        Duration::from_secs(60),
        shoal_node::fetch(&honest, FetchOptions::new(file, &out)),
    )
    .await
    .context("the restarted honest node did not finish")??;
    anyhow::ensure!(std::fs::read(&out)? == want, "restarted node: wrong bytes");

    // Every probe has ended, and nobody is banned: not the honest node, not the liars
    // (lying about others is not serving bad data).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while master.metrics().probes_pending.get() > 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "probes still pending after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = master.status(file).await.context("status")?;
    assert!(
        !status.banned.contains(&honest_id),
        "the honest node was banned"
    );
    assert_eq!(status.banned_total, 0, "banned: {:?}", status.banned);
    assert_eq!(master.metrics().bans.get(), 0);
    // Its last `Have` may still be on its way: the master lists it as a live mirror of
    // every block within a bounded wait.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = master.status(file).await.context("status")?;
        let me = status.mirrors.iter().find(|m| m.peer == honest_id);
        if me.is_some_and(|m| m.live && m.blocks == status.blocks) {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the restarted honest node is not a live mirror of every block: {me:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(liars);
    Ok(())
}
