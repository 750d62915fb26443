//! Helpers for cross-crate tests and examples: in-process clusters on loopback TCP.

pub mod raw;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use libp2p::Multiaddr;
use shoal_master::{Master, MasterConfig, PolicyConfig, PublishPolicy, PublishQuotas};
use shoal_node::{Client, FetchOptions, FetchReport, NodeConfig};
use shoal_protocol::FileId;

pub mod netns;
pub mod procs;

/// Loopback listen address with an OS-chosen port.
pub fn loopback() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")
}

/// Writes `size` bytes of deterministic pseudo-random data to `path`.
pub fn write_random_file(path: &Path, size: usize, seed: u64) -> std::io::Result<()> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; size];
    rng.fill_bytes(&mut data);
    std::fs::write(path, data)
}

/// The configuration [`start_master`] uses: loopback, the upload cap, and open publishing
/// (tests publish from fresh keys) with the default quotas. Tests that need another
/// publishing policy change it and call [`Master::start`].
pub fn master_config(dir: &Path, upload_rate: Option<u64>) -> MasterConfig {
    MasterConfig::new(dir)
        .with_listen(vec![loopback()])
        .with_max_upload_rate(upload_rate)
        .with_policy(PolicyConfig::default())
        .with_publishing(PublishPolicy::Open(PublishQuotas::default()))
        .with_min_free_disk(0)
}

/// Starts a master listening on loopback in `dir` (see [`master_config`]).
pub async fn start_master(dir: &Path, upload_rate: Option<u64>) -> anyhow::Result<Master> {
    Master::start(master_config(dir, upload_rate))
        .await
        .context("starting master")
}

/// Starts a node on loopback with its data in `dir`.
pub async fn start_node(
    dir: &Path,
    bootstrap: &Multiaddr,
    upload_rate: Option<u64>,
) -> anyhow::Result<Client> {
    let cfg = NodeConfig::new(dir, bootstrap.clone())
        .with_listen(vec![loopback()])
        .with_max_upload_rate(upload_rate);
    shoal_node::start(cfg).await.context("starting node")
}

/// Starts a node that misbehaves on purpose.
pub async fn start_chaos_node(
    dir: &Path,
    bootstrap: &Multiaddr,
    mode: shoal_node::chaos::ChaosMode,
) -> anyhow::Result<Client> {
    let cfg = NodeConfig::new(dir, bootstrap.clone())
        .with_listen(vec![loopback()])
        .with_chaos(Some(mode));
    shoal_node::start(cfg).await.context("starting chaos node")
}

/// Publishes `path` from a fresh publisher node; returns the file id once the master holds it.
pub async fn publish(
    dir: &Path,
    bootstrap: &Multiaddr,
    path: &Path,
) -> anyhow::Result<(Client, FileId)> {
    let node = start_node(dir, bootstrap, None).await?;
    let key = shoal_node::service::load_or_create_key(&dir.join("identity.key"))?;
    let id = tokio::time::timeout(
        Duration::from_secs(120),
        shoal_node::publish(&node, &key, path),
    )
    .await
    .context("publish timed out")??;
    Ok((node, id))
}

/// Sets up tracing for a test, honouring `RUST_LOG` (idempotent).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A master (upload capped at `master_rate`) holding a freshly published file of `size`
/// random bytes (from `seed`) at `src`; the publisher has left, so only the master holds it.
pub struct Published {
    /// The master.
    pub master: Master,
    /// Its address.
    pub bootstrap: Multiaddr,
    /// The file.
    pub file: FileId,
    /// The source copy.
    pub src: PathBuf,
}

/// Starts a master under `root` that trusts one publisher key, and publishes a random file to
/// it from that publisher (see [`Published`]).
pub async fn published(
    root: &Path,
    size: usize,
    seed: u64,
    master_rate: Option<u64>,
) -> anyhow::Result<Published> {
    published_with(root, size, seed, master_rate, |cfg| cfg).await
}

/// [`published`], with the master's configuration changed by `tune` first.
pub async fn published_with(
    root: &Path,
    size: usize,
    seed: u64,
    master_rate: Option<u64>,
    tune: impl FnOnce(MasterConfig) -> MasterConfig,
) -> anyhow::Result<Published> {
    let src = root.join("source.bin");
    write_random_file(&src, size, seed)?;
    // The publisher's key exists first, and the master trusts that key only (as an operator
    // would set it up): announces from any other key are refused.
    let publisher_dir = root.join("publisher");
    let key = shoal_node::service::load_or_create_key(&publisher_dir.join("identity.key"))?;
    let master = Master::start(tune(
        master_config(&root.join("master"), master_rate).with_publishing(PublishPolicy::Trusted(
            std::collections::BTreeSet::from([key.public().to_peer_id()]),
        )),
    ))
    .await
    .context("starting master")?;
    let bootstrap = master.addrs()[0].clone();
    let (publisher, file) = publish(&publisher_dir, &bootstrap, &src).await?;
    publisher.shutdown().await;
    Ok(Published {
        master,
        bootstrap,
        file,
        src,
    })
}

/// One fetched node's outcome.
pub struct Fetched {
    /// The node, still running (it keeps serving).
    pub client: Client,
    /// Where the file went.
    pub out: PathBuf,
    /// The fetch report.
    pub report: FetchReport,
}

/// Starts `n` nodes under `root` and has them all fetch `file` at once; each must finish
/// within `limit`.
pub async fn fetch_all(
    root: &Path,
    bootstrap: &Multiaddr,
    file: FileId,
    n: usize,
    upload_rate: Option<u64>,
    limit: Duration,
) -> anyhow::Result<Vec<Fetched>> {
    let mut clients = Vec::new();
    for i in 0..n {
        let dir = root.join(format!("node{i}"));
        clients.push((start_node(&dir, bootstrap, upload_rate).await?, dir));
    }
    let mut tasks = Vec::new();
    for (client, dir) in clients {
        tasks.push(tokio::spawn(async move {
            let out = dir.join("out.bin");
            let report = tokio::time::timeout(
                limit,
                shoal_node::fetch(&client, FetchOptions::new(file, &out)),
            )
            .await
            .with_context(|| {
                format!("node {} did not finish within {limit:?}", client.peer_id())
            })??;
            anyhow::Ok(Fetched {
                client,
                out,
                report,
            })
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// Median and maximum of `xs`.
pub fn median_max(mut xs: Vec<f64>) -> (f64, f64) {
    xs.sort_by(|a, b| a.total_cmp(b));
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    (xs[xs.len() / 2], xs[xs.len() - 1])
}
