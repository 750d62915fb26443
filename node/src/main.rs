//! `shoal`: publish, fetch, seed and inspect files on a shoal swarm.

use std::{io::IsTerminal, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use shoal_node::{fetch::ProgressFn, FetchOptions, NodeConfig};
use shoal_protocol::{
    behaviour::{ConnectionCaps, Role},
    FileId,
};

/// A shoal node: fetches files from a swarm (the master redirects it to peers that already
/// hold each piece), verifies every block against the publisher's signed digests, and serves
/// what it holds to others.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// The master's address, ending in /p2p/<PeerId> (see the master's bootstrap.addr).
    #[arg(long, env = "SHOAL_BOOTSTRAP")]
    bootstrap: Multiaddr,
    /// Data directory: this node's identity key and download journals.
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = "shoal-data")]
    data_dir: PathBuf,
    /// Address to listen on for other nodes; repeat for several.
    #[arg(long, default_values = ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"])]
    listen: Vec<Multiaddr>,
    /// Cap on this node's piece upload, in bytes per second.
    #[arg(long, value_name = "BYTES_PER_S")]
    max_upload_rate: Option<u64>,
    /// Region label; the master prefers redirecting to nodes of the same region.
    #[arg(long, default_value = "")]
    region: String,
    /// Most connections open at once, incoming and outgoing; more are refused.
    #[arg(long, value_name = "N", default_value_t = node_caps().established_total)]
    max_connections: u32,
    /// Most connections with any one peer.
    #[arg(long, value_name = "N", default_value_t = node_caps().per_peer)]
    max_connections_per_peer: u32,
    /// Most incoming connections still in their handshake; more are refused.
    #[arg(long, value_name = "N", default_value_t = node_caps().pending_incoming)]
    max_pending_incoming: u32,
    /// Misbehave on purpose, for tests: corrupt, corrupt-some, corrupt-except-master,
    /// truncate, wrong-block, stall, lie-have, false-accuse.
    #[cfg(feature = "chaos")]
    #[arg(long, value_name = "MODE")]
    chaos: Option<shoal_node::chaos::ChaosMode>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Sign and announce a local file; waits until the master holds it; prints the file id.
    Publish {
        /// The file.
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Download a file, verifying every block; serve it to others meanwhile and after.
    Fetch {
        /// The file id (as printed by publish or `shoal-master add`).
        file_id: FileId,
        /// Where to write the file. Restarting with the same --out and --data-dir resumes.
        #[arg(long)]
        out: PathBuf,
        /// Seconds to keep serving after the download completes (0: exit at once).
        #[arg(long, default_value_t = 60)]
        seed_time: u64,
        /// Write a JSON summary of the fetch here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Transfers in flight at once.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Serve a complete local copy of a file, after checking every block of it.
    Seed {
        /// The local copy.
        path: PathBuf,
        /// The file id.
        #[arg(long)]
        file_id: FileId,
        #[command(flatten)]
        common: Common,
    },
    /// Show who published a file and which master countersigned it (signatures checked).
    Inspect {
        /// The file id.
        file_id: FileId,
        /// Also save the manifest here, for `shoal verify`.
        #[arg(long)]
        save_manifest: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Check a local copy block by block against a saved manifest (offline); names bad blocks.
    /// `shoal fetch` keeps manifests in DATA_DIR/manifests/.
    Verify {
        /// The local copy.
        path: PathBuf,
        /// The manifest file.
        #[arg(long)]
        manifest: PathBuf,
    },
    /// Show what the master knows of a file.
    Status {
        /// The file id.
        file_id: FileId,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
}

fn node_caps() -> ConnectionCaps {
    ConnectionCaps::for_role(Role::Node)
}

async fn join(c: &Common) -> anyhow::Result<shoal_node::Client> {
    let defaults = node_caps();
    let caps = ConnectionCaps {
        per_peer: c.max_connections_per_peer.max(1),
        pending_incoming: c.max_pending_incoming.max(1),
        established_incoming: defaults.established_incoming.min(c.max_connections.max(1)),
        established_total: c.max_connections.max(1),
        ..defaults
    };
    let cfg = NodeConfig::new(&c.data_dir, c.bootstrap.clone())
        .with_listen(c.listen.clone())
        .with_max_upload_rate(c.max_upload_rate)
        .with_region(c.region.clone())
        .with_connection_caps(caps)
        // A node whose event loop died must not linger: exit 101.
        .with_exit_on_panic(true);
    #[cfg(feature = "chaos")]
    let cfg = cfg.with_chaos(c.chaos);
    shoal_node::start(cfg)
        .await
        .with_context(|| format!("joining the swarm at {}", c.bootstrap))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::Publish { file, common } => {
            let client = join(&common).await?;
            let key =
                shoal_node::service::load_or_create_key(&common.data_dir.join("identity.key"))?;
            eprintln!("publishing {} as {}", file.display(), client.peer_id());
            let id = shoal_node::publish(&client, &key, &file)
                .await
                .with_context(|| format!("publishing {}", file.display()))?;
            eprintln!("the master holds every block");
            client.shutdown().await;
            println!("{id}");
        }
        Cmd::Fetch {
            file_id,
            out,
            seed_time,
            report,
            parallel,
            common,
        } => {
            let client = join(&common).await?;
            let mut opts = FetchOptions::new(file_id, &out);
            opts.scheduler.max_transfers = parallel.max(1);
            let bar = std::io::stderr().is_terminal().then(|| {
                let b = indicatif::ProgressBar::new(0);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b
            });
            if let Some(b) = bar.clone() {
                let p: ProgressFn = Arc::new(move |done, total| {
                    b.set_length(total);
                    b.set_position(done);
                });
                opts.progress = Some(p);
            }
            let result = tokio::select! {
                r = shoal_node::fetch(&client, opts) => r,
                _ = shutdown_signal() => {
                    client.shutdown().await;
                    anyhow::bail!("interrupted; run the same command again to resume");
                }
            };
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            let summary = result.with_context(|| format!("fetching {file_id}"))?;
            eprintln!(
                "fetched {} in {:.1}s: {} bytes from the master, {} from peers",
                out.display(),
                summary.elapsed_s,
                summary.bytes_from_master,
                summary.bytes_from_peers
            );
            if let Some(path) = report {
                std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if seed_time > 0 {
                eprintln!("seeding for {seed_time}s (Ctrl-C to stop)");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(seed_time)) => {}
                    _ = shutdown_signal() => {}
                }
            }
            client.shutdown().await;
        }
        Cmd::Seed {
            path,
            file_id,
            common,
        } => {
            let client = join(&common).await?;
            shoal_node::seed(&client, file_id, &path)
                .await
                .with_context(|| format!("seeding {}", path.display()))?;
            eprintln!("seeding {} (Ctrl-C to stop)", path.display());
            shutdown_signal().await;
            client.shutdown().await;
        }
        Cmd::Inspect {
            file_id,
            save_manifest,
            common,
        } => {
            let client = join(&common).await?;
            let m = shoal_node::fetch::get_manifest(&client, file_id).await;
            client.shutdown().await;
            let m = m.with_context(|| format!("getting the manifest of {file_id}"))?;
            print!("{}", shoal_node::provenance::describe(&m));
            if let Some(p) = save_manifest {
                shoal_node::provenance::save_manifest(&m, &p)?;
                eprintln!("manifest saved to {}", p.display());
            }
        }
        Cmd::Verify { path, manifest } => {
            let m = shoal_node::provenance::load_manifest(&manifest, None)
                .with_context(|| format!("reading {}", manifest.display()))?;
            print!("{}", shoal_node::provenance::describe(&m));
            let bad = shoal_node::provenance::verify_copy(&m, &path)
                .with_context(|| format!("reading {}", path.display()))?;
            if bad.is_empty() {
                println!("{}: all {} blocks verified", path.display(), m.blocks());
            } else {
                let shown: Vec<String> = bad.iter().take(32).map(u32::to_string).collect();
                println!(
                    "{}: {} of {} blocks fail their digest: {}{}",
                    path.display(),
                    bad.len(),
                    m.blocks(),
                    shown.join(", "),
                    if bad.len() > 32 { ", ..." } else { "" }
                );
                std::process::exit(1);
            }
        }
        Cmd::Status {
            file_id,
            json,
            common,
        } => {
            let client = join(&common).await?;
            let s = shoal_node::status(&client, file_id).await?;
            client.shutdown().await;
            if json {
                let v = serde_json::json!({
                    "file": s.file.to_string(),
                    "name": s.name,
                    "size": s.size,
                    "blocks": s.blocks,
                    "master_blocks": s.master_blocks,
                    "mirrors": s.mirrors.iter().map(|m| serde_json::json!({
                        "peer": m.peer.to_string(), "region": m.region, "blocks": m.blocks, "live": m.live,
                    })).collect::<Vec<_>>(),
                    "master_only_blocks": s.master_only_blocks,
                    "bytes_from_master": s.bytes_from_master,
                    "bytes_from_peers": s.bytes_from_peers,
                    "banned": s.banned.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{} ({} bytes, {} blocks; master holds {})",
                    s.name, s.size, s.blocks, s.master_blocks
                );
                println!("mirrors: {}", s.mirrors.len());
                for m in &s.mirrors {
                    println!(
                        "  {} region={:?} blocks={} live={}",
                        m.peer, m.region, m.blocks, m.live
                    );
                }
                println!("blocks only the master holds: {}", s.master_only_blocks);
                println!("piece bytes sent by the master: {}", s.bytes_from_master);
            }
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
