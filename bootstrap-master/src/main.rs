//! `shoal-master`: run a shoal master, or register a file with one.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

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
    ///
    /// The file is copied into the data dir (so it needs that much free space there): the
    /// master must serve exactly the bytes it signed, and a copy cannot change or vanish under
    /// it when the original is edited, moved or deleted. A running master on the same data
    /// dir picks the file up within seconds.
    Add {
        /// The file.
        file: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    // kad warns "Failed to trigger bootstrap: No known peers" whenever a listen address comes
    // up while no peer is connected, i.e. on every start of the master, which is where
    // everyone else bootstraps from; its automatic bootstrap cannot be turned off (only the
    // periodic one, which the master's behaviour does). RUST_LOG still shows it.
    shoal_net::cli::init_logging("info,libp2p=warn,libp2p_kad::behaviour=error");
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", shoal_net::cli::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Cmd::Add { file }) => {
            let reg = Registry::open(&cli.data_dir)
                .with_context(|| format!("opening data dir {}", cli.data_dir.display()))?;
            let key = reg.key()?;
            let m = reg
                .add_local(&file, &key)
                .with_context(|| format!("adding {}", file.display()))?;
            eprintln!(
                "added {} ({} bytes, {} blocks; copied into the data dir); a running master picks it up within seconds",
                m.body().name,
                m.body().size,
                m.blocks()
            );
            // A ticket needs the master's addresses: those of its last start, if any.
            let addrs: Vec<Multiaddr> =
                std::fs::read_to_string(cli.data_dir.join("bootstrap.addr"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .take(shoal_protocol::ticket::MAX_TICKET_ADDRS)
                    .collect();
            match shoal_protocol::ticket::Ticket::new(m.id(), addrs) {
                Ok(t) => eprintln!("ticket (shoal fetch TICKET --out PATH): {t}"),
                Err(_) => eprintln!(
                    "(start the master once to get a ticket: it needs the master's addresses)"
                ),
            }
            println!("{}", m.id());
        }
        None => {
            // One master per data dir: a second one would share its PeerId and overwrite its
            // bootstrap.addr.
            let _lock = shoal_net::lock_data_dir(&cli.data_dir)?;
            let cfg = MasterConfig::new(&cli.data_dir)
                .with_listen(cli.listen)
                .with_max_upload_rate(cli.max_upload_rate)
                .with_metrics_addr(cli.metrics_addr);
            let master = Master::start(cfg).await.context("starting the master")?;
            eprintln!(
                "shoal master {} is up; nodes join with one of (--bootstrap):",
                master.peer_id()
            );
            // Every address, the ones another machine can dial first.
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
