//! Who may publish to a master, within what quotas, and what a refused announce costs it
//! (nothing: no manifest, no data file, no pull); a pull cut by a master restart resumes
//! with the blocks already on disk.

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use shoal_master::{Master, PublishPolicy, PublishQuotas};
use shoal_node::NodeError;
use shoal_tests::{init_tracing, master_config, start_node, write_random_file};

/// Entries under the master's `manifests/` and `files/`.
fn stored(master_dir: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    for sub in ["manifests", "files"] {
        n += std::fs::read_dir(master_dir.join(sub))?.count();
    }
    Ok(n)
}

async fn publish_from(
    dir: &Path,
    master: &Master,
    src: &Path,
) -> anyhow::Result<(
    shoal_node::Client,
    Result<shoal_protocol::FileId, NodeError>,
)> {
    let node = start_node(dir, &master.addrs()[0], None).await?;
    let key = shoal_node::service::load_or_create_key(&dir.join("identity.key"))?;
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        shoal_node::publish(&node, &key, src),
    )
    .await
    .context("publish timed out")?;
    Ok((node, r))
}

fn refusal(r: Result<shoal_protocol::FileId, NodeError>) -> anyhow::Result<String> {
    match r {
        Err(NodeError::Refused(reason)) => Ok(reason),
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn an_untrusted_publisher_is_refused_and_costs_no_disk() -> anyhow::Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src.bin");
    write_random_file(&src, 300_000, 1)?;
    let master_dir = tmp.path().join("master");
    let master =
        Master::start(master_config(&master_dir, None).with_publishing(PublishPolicy::OwnOnly))
            .await?;
    let (node, r) = publish_from(&tmp.path().join("pub"), &master, &src).await?;
    let reason = refusal(r)?;
    let me = node.peer_id();
    assert!(
        reason.contains(&format!(
            "publisher {me} is not trusted by this master; start it with --publisher-key {me} or --open-publishing"
        )),
        "{reason}"
    );
    assert_eq!(stored(&master_dir)?, 0, "a refused announce used disk");
    assert_eq!(
        master.metrics().pulled_bytes.get(),
        0,
        "a refused announce was pulled"
    );
    assert!(master.metrics().announces_refused.get() >= 1);
    node.shutdown().await;

    // Trusted by key, the same publisher gets in.
    master.shutdown().await;
    let trusted = shoal_node::service::load_or_create_key(&tmp.path().join("pub/identity.key"))?
        .public()
        .to_peer_id();
    let master = Master::start(
        master_config(&master_dir, None)
            .with_publishing(PublishPolicy::Trusted(BTreeSet::from([trusted]))),
    )
    .await?;
    let (node, r) = publish_from(&tmp.path().join("pub"), &master, &src).await?;
    let file = r?;
    let status = master.status(file).await.context("no status")?;
    assert_eq!(status.master_blocks, status.blocks);
    node.shutdown().await;
    master.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn open_publishing_holds_each_publisher_to_its_quota() -> anyhow::Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let (a, b) = (tmp.path().join("a.bin"), tmp.path().join("b.bin"));
    write_random_file(&a, 200_000, 2)?;
    write_random_file(&b, 200_000, 3)?;
    let master_dir = tmp.path().join("master");
    let quotas = PublishQuotas {
        files: 1,
        bytes: 1 << 20,
        concurrent_pulls: 1,
        total_files: 16,
    };
    let master = Master::start(
        master_config(&master_dir, None).with_publishing(PublishPolicy::Open(quotas)),
    )
    .await?;
    let one = tmp.path().join("one");
    let (node, r) = publish_from(&one, &master, &a).await?;
    r?;
    node.shutdown().await;
    let before = stored(&master_dir)?;
    // A second file from the same key is past its quota of one file.
    let (node, r) = publish_from(&one, &master, &b).await?;
    let reason = refusal(r)?;
    assert!(reason.contains("quota"), "{reason}");
    assert_eq!(stored(&master_dir)?, before, "a refused announce used disk");
    node.shutdown().await;
    // Another publisher may.
    let (node, r) = publish_from(&tmp.path().join("two"), &master, &b).await?;
    r?;
    node.shutdown().await;
    // A file past the byte quota, from a third key.
    let big = tmp.path().join("big.bin");
    write_random_file(&big, (1 << 20) + 1, 4)?;
    let (node, r) = publish_from(&tmp.path().join("three"), &master, &big).await?;
    let reason = refusal(r)?;
    assert!(reason.contains("past its quota"), "{reason}");
    node.shutdown().await;
    master.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_announce_that_would_fill_the_disk_is_refused() -> anyhow::Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src.bin");
    write_random_file(&src, 100_000, 5)?;
    let master_dir = tmp.path().join("master");
    let master =
        Master::start(master_config(&master_dir, None).with_min_free_disk(u64::MAX / 4)).await?;
    let (node, r) = publish_from(&tmp.path().join("pub"), &master, &src).await?;
    let reason = refusal(r)?;
    assert!(reason.contains("bytes free"), "{reason}");
    assert_eq!(stored(&master_dir)?, 0, "a refused announce used disk");
    node.shutdown().await;
    master.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_pull_cut_by_a_restart_resumes_with_the_blocks_on_disk() -> anyhow::Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src.bin");
    let size = 6 * 1024 * 1024;
    write_random_file(&src, size, 6)?;
    let master_dir = tmp.path().join("master");
    let pub_dir = tmp.path().join("pub");

    // A publisher uploading at 1.5 MB/s: the master is stopped part way.
    let master = Master::start(master_config(&master_dir, None)).await?;
    let node = start_node(&pub_dir, &master.addrs()[0], Some(1_500_000)).await?;
    let key = shoal_node::service::load_or_create_key(&pub_dir.join("identity.key"))?;
    let publishing = {
        let (node, src) = (node.clone(), src.clone());
        tokio::spawn(async move { shoal_node::publish(&node, &key, &src).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while master.metrics().pulled_bytes.get() < 2 * 1024 * 1024 {
        anyhow::ensure!(Instant::now() < deadline, "the master pulled nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    master.shutdown().await;
    publishing.abort();
    node.shutdown().await;
    let data: Vec<_> = std::fs::read_dir(master_dir.join("files"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(data.len(), 1, "{data:?}");
    assert!(
        data[0].extension().is_some_and(|e| e == "data"),
        "the cut pull is not partial: {data:?}"
    );

    let file: shoal_protocol::FileId = data[0]
        .file_stem()
        .and_then(|s| s.to_str())
        .context("data file name")?
        .parse()?;

    // Restarted: the blocks on disk are re-checked and kept; when the publisher is back
    // (with its key, serving the file), only the rest is pulled.
    let master = Master::start(master_config(&master_dir, None)).await?;
    let node = start_node(&pub_dir, &master.addrs()[0], None).await?;
    shoal_node::seed(&node, file, &src).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = master.status(file).await.context("no status")?;
        if s.master_blocks == s.blocks {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the resumed pull stopped at {}/{}",
            s.master_blocks,
            s.blocks
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pulled = master.metrics().pulled_bytes.get();
    assert!(
        pulled > 0 && pulled <= (size - 2 * 1024 * 1024) as u64,
        "after the restart the master pulled {pulled} of {size} bytes"
    );
    // The whole file is checked, then marked complete.
    let complete = master_dir.join("files").join(format!("{file}.complete"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !complete.exists() {
        anyhow::ensure!(Instant::now() < deadline, "never marked complete");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = std::fs::read(master_dir.join("files").join(format!("{file}.data")))?;
    assert!(held == std::fs::read(&src)?, "the resumed copy differs");
    node.shutdown().await;
    master.shutdown().await;
    Ok(())
}
