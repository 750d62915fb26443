//! `shoal-master`: run a shoal master, or register a file with one.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use shoal_master::{registry::Registry, Master, MasterConfig};

/// The master of a shoal swarm: holds the original files, redirects piece requests to peers
/// that already hold them, and is the address nodes join with.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Data directory: identity key (the PeerId survives restarts), manifests, files.
    #[arg(
        long,
        global = true,
        default_value = "shoal-master-data",
        env = "SHOAL_MASTER_DATA"
    )]
    data_dir: PathBuf,
    /// Address to listen on; repeat for several.
    #[arg(long, default_values = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"])]
    listen: Vec<Multiaddr>,
    /// Cap on the master's piece upload, in bytes per second.
    #[arg(long, value_name = "BYTES_PER_S")]
    max_upload_rate: Option<u64>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Register a local file (the operator's way to publish). Prints its file id.
    Add {
        /// The file.
        file: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libp2p=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Add { file }) => {
            let reg = Registry::open(&cli.data_dir)
                .with_context(|| format!("opening data dir {}", cli.data_dir.display()))?;
            let key = reg.key()?;
            let m = reg
                .add_local(&file, &key)
                .with_context(|| format!("adding {}", file.display()))?;
            eprintln!(
                "added {} ({} bytes, {} blocks); a running master picks it up within seconds",
                m.body().name,
                m.body().size,
                m.blocks()
            );
            println!("{}", m.id());
        }
        None => {
            let cfg = MasterConfig::new(&cli.data_dir)
                .with_listen(cli.listen)
                .with_max_upload_rate(cli.max_upload_rate)
                .with_metrics_addr(cli.metrics_addr);
            let master = Master::start(cfg).await.context("starting the master")?;
            eprintln!("shoal master {} is up; nodes join with:", master.peer_id());
            for a in master.addrs() {
                println!("{a}");
            }
            eprintln!(
                "(also written to {})",
                cli.data_dir.join("bootstrap.addr").display()
            );
            if let Some(m) = master.metrics_addr() {
                eprintln!("metrics at http://{m}/metrics");
            }
            tokio::select! {
                _ = shutdown_signal() => {
                    eprintln!("shutting down");
                    master.shutdown().await;
                }
            }
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
