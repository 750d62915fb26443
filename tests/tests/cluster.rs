//! In-process cluster: a master, a publisher and 10 nodes on loopback TCP.

use std::time::Duration;

use shoal_tests::{fetch_all, publish, start_master, write_random_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_nodes_get_exact_bytes_mostly_from_peers() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("source.bin");
    let size = 16 * 1024 * 1024;
    write_random_file(&src, size, 7)?;
    // The master's upload is capped so that peers have a reason to exist.
    let master = start_master(&tmp.path().join("master"), Some(8 * 1024 * 1024)).await?;
    let bootstrap = master.addrs()[0].clone();
    let (publisher, file) = publish(&tmp.path().join("publisher"), &bootstrap, &src).await?;
    // The publisher leaves: from now on only the master and the nodes hold the file.
    publisher.shutdown().await;
    let sent_before = master.metrics().piece_bytes_sent.get();

    let fetched = fetch_all(
        tmp.path(),
        &bootstrap,
        file,
        10,
        None,
        Duration::from_secs(120),
    )
    .await?;

    let want = std::fs::read(&src)?;
    for f in &fetched {
        assert!(
            std::fs::read(&f.out)? == want,
            "{} has different bytes",
            f.report.peer_id
        );
    }
    let master_bytes = master.metrics().piece_bytes_sent.get() - sent_before;
    let from_peers: u64 = fetched.iter().map(|f| f.report.bytes_from_peers).sum();
    let from_master: u64 = fetched.iter().map(|f| f.report.bytes_from_master).sum();
    assert_eq!(
        from_master, master_bytes,
        "nodes and master disagree on master bytes"
    );
    let ratio = master_bytes as f64 / size as f64;
    assert!(ratio <= 1.5, "master sent {ratio:.2}x the file size");
    assert!(
        from_peers * 2 >= from_peers + from_master,
        "only {from_peers} of {} piece bytes came from peers",
        from_peers + from_master
    );
    let redirects = master.metrics().redirects.get();
    assert!(redirects > 0, "the master never redirected anyone");
    println!(
        "origin egress ratio {ratio:.3}, peer share {:.2}",
        from_peers as f64 / (from_peers + from_master) as f64
    );
    Ok(())
}
