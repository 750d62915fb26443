//! Quickstart: a master and 12 nodes in one process on loopback. A publisher announces a
//! generated 64 MiB file, all 12 nodes fetch it at once, and a table shows how the load was
//! shared. Needs nothing else running.
//!
//! Run: `cargo run --release -p shoal-examples --example quickstart`

use std::time::{Duration, Instant};

use anyhow::Context;
use shoal_tests::{fetch_all, median_max, publish, start_master, write_random_file};

const NODES: usize = 12;
const SIZE: usize = 64 * 1024 * 1024;
/// The master's upload cap: a modest origin, as in a flash crowd.
const MASTER_RATE: u64 = 50 * 1024 * 1024;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let tmp = tempfile_dir()?;
    let src = tmp.join("source.bin");
    println!("generating a {} MiB file", SIZE >> 20);
    write_random_file(&src, SIZE, 42)?;

    let master = start_master(&tmp.join("master"), Some(MASTER_RATE)).await?;
    let bootstrap = master.addrs()[0].clone();
    println!("master {} listening at {bootstrap}", master.peer_id());
    let (publisher, file) = publish(&tmp.join("publisher"), &bootstrap, &src).await?;
    publisher.shutdown().await;
    println!("published {file}");
    let before = master.metrics().piece_bytes_sent.get();

    println!(
        "{NODES} nodes fetching at once (master upload capped at {} MiB/s)",
        MASTER_RATE >> 20
    );
    let started = Instant::now();
    let fetched = fetch_all(
        &tmp,
        &bootstrap,
        file,
        NODES,
        None,
        Duration::from_secs(600),
    )
    .await?;
    let wall = started.elapsed().as_secs_f64();

    let want = std::fs::read(&src)?;
    let mut verified = 0;
    for f in &fetched {
        if std::fs::read(&f.out)? == want {
            verified += 1;
        }
    }
    let master_bytes = master.metrics().piece_bytes_sent.get() - before;
    let from_peers: u64 = fetched.iter().map(|f| f.report.bytes_from_peers).sum();
    let from_master: u64 = fetched.iter().map(|f| f.report.bytes_from_master).sum();
    let (median, slowest) = median_max(fetched.iter().map(|f| f.report.elapsed_s).collect());
    // Fluid lower bound (Kumar & Ross): the master must send one copy, and all N copies must
    // cross the swarm's total upload. Node uploads are uncapped here, so the first term rules.
    let t_min = SIZE as f64 / MASTER_RATE as f64;

    println!();
    println!("| measure                          | value |");
    println!("|----------------------------------|-------|");
    println!(
        "| nodes done                       | {}/{NODES} |",
        fetched.len()
    );
    println!(
        "| all verified (exact bytes)       | {} |",
        if verified == NODES { "yes" } else { "NO" }
    );
    println!(
        "| origin egress ratio              | {:.3} |",
        master_bytes as f64 / SIZE as f64
    );
    println!(
        "| share of bytes served by peers   | {:.1}% |",
        100.0 * from_peers as f64 / (from_peers + from_master).max(1) as f64
    );
    println!("| median completion                | {median:.2} s |");
    println!("| slowest completion               | {slowest:.2} s |");
    println!("| all done (wall)                  | {wall:.2} s |");
    println!("| fluid lower bound T_min          | {t_min:.2} s |");
    println!(
        "| redirects issued by the master   | {} |",
        master.metrics().redirects.get()
    );
    for f in fetched {
        f.client.shutdown().await;
    }
    master.shutdown().await;
    std::fs::remove_dir_all(&tmp).with_context(|| format!("cleaning {}", tmp.display()))?;
    anyhow::ensure!(verified == NODES, "some nodes ended with wrong bytes");
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("shoal-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
