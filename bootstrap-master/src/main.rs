//! `shoal-master`: run a shoal master, or register a file with one.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use libp2p::{Multiaddr, PeerId};
use shoal_master::{
    parse_publisher_keys, registry::Registry, Master, MasterConfig, PublishPolicy, PublishQuotas,
};
use shoal_protocol::{
    behaviour::{ConnectionCaps, Role},
    relay::RelayLimits,
};

/// The master of a shoal swarm: holds the original files, redirects piece requests to peers
/// that already hold them, and is the address nodes join with.
#[derive(Parser, Debug)]
#[command(version)]
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
    /// Accept files announced by this publisher (its PeerId); repeat for several. Without
    /// this, --publisher-keys-file or --open-publishing, only `shoal-master add` publishes.
    #[arg(long, value_name = "PEER_ID")]
    publisher_key: Vec<PeerId>,
    /// Accept files announced by the publishers listed in FILE (one PeerId a line, `#`
    /// comments).
    #[arg(long, value_name = "FILE")]
    publisher_keys_file: Option<PathBuf>,
    /// Accept files from any publisher, within the per-publisher quotas below.
    #[arg(long, conflicts_with_all = ["publisher_key", "publisher_keys_file"])]
    open_publishing: bool,
    /// With --open-publishing: files one publisher may have here.
    #[arg(long, value_name = "N", default_value_t = PublishQuotas::default().files)]
    max_files_per_publisher: u32,
    /// With --open-publishing: bytes one publisher may have here, all files together.
    #[arg(long, value_name = "BYTES", default_value_t = PublishQuotas::default().bytes)]
    max_bytes_per_publisher: u64,
    /// With --open-publishing: pulls from one publisher at once.
    #[arg(long, value_name = "N", default_value_t = PublishQuotas::default().concurrent_pulls)]
    max_pulls_per_publisher: u32,
    /// With --open-publishing: files all open publishers together may have here.
    #[arg(long, value_name = "N", default_value_t = PublishQuotas::default().total_files)]
    max_open_files: u32,
    /// Pulls from publishers at once, all publishers together.
    #[arg(long, value_name = "N", default_value_t = 16)]
    max_pulls: u32,
    /// Refuse an announce that would leave less than this free on the data dir's disk.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 30)]
    min_free_disk: u64,
    /// Connections in all (incoming ones included). Incoming ones may take all but a fifth
    /// of them, at most 904, kept for the master's own dials (4,096 of the default 5,000).
    #[arg(long, value_name = "N", default_value_t = ConnectionCaps::for_role(Role::Master).established_total)]
    max_connections: u32,
    /// Connections with any one peer.
    #[arg(long, value_name = "N", default_value_t = ConnectionCaps::for_role(Role::Master).per_peer)]
    max_connections_per_peer: u32,
    /// Incoming connections still in their handshake.
    #[arg(long, value_name = "N", default_value_t = ConnectionCaps::for_role(Role::Master).pending_incoming)]
    max_pending_incoming: u32,
    /// One copy of each block enters each region (nodes' --region labels): a node whose
    /// region holds no copy of a block is sent to another region or to the master only if no
    /// other copy is already on its way into its region, and the master sends each block at
    /// most once per region (instead of once in all). Keeps traffic inside regions at the
    /// cost of master upload (up to one copy of a file per region). Nodes without a region
    /// label are not affected.
    #[arg(long)]
    region_budget: bool,
    /// Refuse new connections while the process uses more than this fraction of memory.
    #[arg(long, value_name = "FRACTION", default_value_t = ConnectionCaps::for_role(Role::Master).max_memory_fraction)]
    max_memory_fraction: f64,
    /// Run no relay for nodes behind NAT (they can then fetch but not serve).
    #[arg(long)]
    no_relay: bool,
    /// Bytes one relayed connection (circuit) may carry, both directions together, before
    /// the relay closes it. Relayed bytes cost the master twice (in and out): this and
    /// --relay-max-circuits keep the relay from becoming a second master. The default is two
    /// of the largest pieces at the default block size.
    #[arg(long, value_name = "BYTES", default_value_t = RelayLimits::default().max_circuit_bytes, value_parser = clap::value_parser!(u64).range(1..))]
    relay_circuit_bytes: u64,
    /// Seconds one circuit may last.
    #[arg(long, value_name = "SECS", default_value_t = RelayLimits::default().max_circuit_duration.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    relay_circuit_secs: u64,
    /// Circuits open at once, all nodes together.
    #[arg(long, value_name = "N", default_value_t = RelayLimits::default().max_circuits)]
    relay_max_circuits: usize,
    /// Circuits one node is an end of at once.
    #[arg(long, value_name = "N", default_value_t = RelayLimits::default().max_circuits_per_peer)]
    relay_max_circuits_per_peer: usize,
    /// Nodes listening through the relay at once (reservations).
    #[arg(long, value_name = "N", default_value_t = RelayLimits::default().max_reservations)]
    relay_max_reservations: usize,
}

impl Cli {
    fn relay(&self) -> RelayLimits {
        RelayLimits {
            enabled: !self.no_relay,
            max_circuit_bytes: self.relay_circuit_bytes,
            max_circuit_duration: std::time::Duration::from_secs(self.relay_circuit_secs),
            max_circuits: self.relay_max_circuits,
            max_circuits_per_peer: self.relay_max_circuits_per_peer,
            max_reservations: self.relay_max_reservations,
            ..RelayLimits::default()
        }
    }

    fn publishing(&self) -> anyhow::Result<PublishPolicy> {
        if self.open_publishing {
            return Ok(PublishPolicy::Open(PublishQuotas {
                files: self.max_files_per_publisher,
                bytes: self.max_bytes_per_publisher,
                concurrent_pulls: self.max_pulls_per_publisher,
                total_files: self.max_open_files,
            }));
        }
        let mut keys: BTreeSet<PeerId> = self.publisher_key.iter().copied().collect();
        if let Some(path) = &self.publisher_keys_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            keys.extend(
                parse_publisher_keys(&text).with_context(|| format!("in {}", path.display()))?,
            );
        }
        Ok(if keys.is_empty() {
            PublishPolicy::OwnOnly
        } else {
            PublishPolicy::Trusted(keys)
        })
    }

    fn connection_caps(&self) -> anyhow::Result<ConnectionCaps> {
        anyhow::ensure!(
            self.max_memory_fraction > 0.0 && self.max_memory_fraction <= 1.0,
            "--max-memory-fraction must be in (0, 1]"
        );
        Ok(ConnectionCaps {
            per_peer: self.max_connections_per_peer,
            pending_incoming: self.max_pending_incoming,
            max_memory_fraction: self.max_memory_fraction,
            ..ConnectionCaps::for_role_with_total(Role::Master, self.max_connections)
        })
    }
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
        /// Block size in bytes: a power of two from 4096 to 16 MiB. Each block is checked on
        /// its own, so larger blocks mean fewer digests, requests and streams (less CPU per
        /// byte in a large crowd) but a coarser schedule: a node can pass a block on only once
        /// it holds all of it. Default: 64 KiB, doubled until the file has at most 65,536
        /// blocks.
        #[arg(long, value_name = "BYTES", value_parser = block_size)]
        block_size: Option<u32>,
    },
}

/// A `--block-size`: checked before anything is read or allocated.
fn block_size(s: &str) -> Result<u32, String> {
    use shoal_protocol::limits::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if !n.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&n) {
        return Err(format!(
            "{n} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        ));
    }
    Ok(n)
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
        Some(Cmd::Add { file, block_size }) => {
            let reg = Registry::open(&cli.data_dir)
                .with_context(|| format!("opening data dir {}", cli.data_dir.display()))?;
            let key = reg.key()?;
            let m = reg
                .add_local_in_blocks(&file, &key, block_size)
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
            let publishing = cli.publishing()?;
            let cfg = MasterConfig::new(&cli.data_dir)
                .with_listen(cli.listen.clone())
                .with_max_upload_rate(cli.max_upload_rate)
                .with_metrics_addr(cli.metrics_addr)
                .with_publishing(publishing.clone())
                .with_min_free_disk(cli.min_free_disk)
                .with_max_pulls(cli.max_pulls)
                .with_region_budget(cli.region_budget)
                .with_relay(cli.relay())
                .with_connection_caps(cli.connection_caps()?);
            let mut master = Master::start(cfg).await.context("starting the master")?;
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
            match &publishing {
                PublishPolicy::OwnOnly => eprintln!(
                    "publishing: only `shoal-master add` (trust publishers with --publisher-key, or --open-publishing)"
                ),
                PublishPolicy::Trusted(keys) => {
                    eprintln!("publishing: {} trusted publisher key(s)", keys.len())
                }
                PublishPolicy::Open(q) => eprintln!("publishing: open, quotas {q:?}"),
            }
            let crashed = tokio::select! {
                _ = shutdown_signal() => None,
                r = master.wait() => Some(r),
            };
            match crashed {
                None => {
                    eprintln!("shutting down");
                    master.shutdown().await;
                }
                Some(Err(e)) => {
                    // As a panic in the main thread would: exit code 101.
                    eprintln!("fatal: {e}; exiting");
                    std::process::exit(shoal_net::task::PANIC_EXIT_CODE);
                }
                Some(Ok(())) => anyhow::bail!("the master's event loop ended on its own"),
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
