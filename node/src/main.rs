//! `shoal`: publish, fetch, seed and inspect files on a shoal swarm.

use std::{
    io::IsTerminal,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use libp2p::Multiaddr;
use shoal_node::{
    progress::{human_bytes, progress_line, resume_line, FetchProgress},
    FetchOptions, NodeConfig,
};
use shoal_protocol::{
    behaviour::{ConnectionCaps, Role},
    ticket::Ticket,
    FileId,
};

/// A shoal node: fetches files from a swarm (the master redirects it to peers that already
/// hold each piece), verifies every block against the publisher's signed digests, and serves
/// what it holds to others.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// The master's address, ending in /p2p/<PeerId> (the master prints it and writes it to
    /// bootstrap.addr). Not needed with a ticket.
    #[arg(long, env = "SHOAL_BOOTSTRAP")]
    bootstrap: Option<Multiaddr>,
    /// Data directory: this node's identity key and download journals.
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = "shoal-data")]
    data_dir: PathBuf,
    /// Address to listen on for other nodes; repeat for several.
    #[arg(long, default_values = ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"])]
    listen: Vec<Multiaddr>,
    /// Cap on this node's piece upload, in bytes per second.
    #[arg(long, value_name = "BYTES_PER_S")]
    max_upload_rate: Option<u64>,
    /// Another peer to join the swarm through, besides the master (an address ending in
    /// /p2p/<PeerId>, e.g. a node that holds the file); repeat for several. Kademlia
    /// bootstraps from these too, so with the master down a fetch given --manifest can still
    /// find the file's holders.
    #[arg(long = "peer", value_name = "ADDR")]
    peers: Vec<Multiaddr>,
    /// Tell other peers (and the master, which hints it) to dial this node at ADDR instead of
    /// the addresses it listens on: a port forward, a public address in front of it. Repeat
    /// for several.
    #[arg(long, value_name = "ADDR")]
    announce: Vec<Multiaddr>,
    /// When to listen through the master's relay, so that peers can reach this node behind a
    /// NAT: auto (when the master's AutoNAT check finds it unreachable), always, never.
    /// Peers that reach it through the relay try a direct connection by hole punching.
    #[arg(long, value_enum, default_value_t = shoal_node::RelayMode::Auto)]
    relay: shoal_node::RelayMode,
    /// Region label; the master prefers redirecting to nodes of the same region.
    #[arg(long, default_value = "")]
    region: String,
    /// Most connections open at once, incoming and outgoing; more are refused.
    #[arg(long, value_name = "N", default_value_t = node_caps().established_total)]
    max_connections: u32,
    /// Peers kept connected: with more, the connections to the least recently used idle ones
    /// (no piece stream, none for 10 s; never the master) are closed. Each connection is a
    /// file descriptor, and a node in a large crowd meets most of it.
    #[arg(long, value_name = "N", default_value_t = shoal_node::peers::DEFAULT_MAX_PEERS)]
    max_peers: usize,
    /// Most connections with any one peer.
    #[arg(long, value_name = "N", default_value_t = node_caps().per_peer)]
    max_connections_per_peer: u32,
    /// Most incoming connections still in their handshake; more are refused.
    #[arg(long, value_name = "N", default_value_t = node_caps().pending_incoming)]
    max_pending_incoming: u32,
    /// Misbehave on purpose, for tests: corrupt, corrupt-some, corrupt-except-master,
    /// truncate, wrong-block, stall, lie-have, false-accuse, wrong-hints.
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
    /// Download a file, verifying every block; serve it to others meanwhile and for 60 s after.
    ///
    /// After the download, `shoal fetch` keeps running and serving the file to other nodes
    /// for --seed-time seconds (default 60; Ctrl-C stops it early, `--seed-time 0` exits at
    /// once), so that nodes still fetching find peers instead of the master. The file is
    /// written to OUT.part and renamed to OUT once every block verified (and, with
    /// --check-whole-file, the whole-file SHA-256); --report is written then and again at exit (with the bytes served while
    /// seeding).
    Fetch {
        /// The file: a ticket (shoal:<file id>@<master address>, as printed by publish or
        /// `shoal-master add`; then --bootstrap is not needed) or a file id. May be left out
        /// with --manifest.
        #[arg(value_name = "TICKET|FILE_ID", required_unless_present = "manifest")]
        file_id: Option<Target>,
        /// The file's manifest (as saved by `shoal inspect --save-manifest`, or found in a
        /// node's DATA_DIR/manifests/): the master is then not asked for it, and the fetch
        /// starts even while the master is down, finding the holders through Kademlia (give
        /// one with --peer). Checked before use: signatures, id, digest list, and that the
        /// master of --bootstrap countersigned it.
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// Where to write the file. Restarting with the same --out and --data-dir resumes.
        #[arg(long)]
        out: PathBuf,
        /// Seconds to keep serving after the download completes (0: exit at once).
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        seed_time: u64,
        /// How to show progress.
        #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
        progress: ProgressMode,
        /// Serve Prometheus metrics at http://HOST:PORT/metrics (bytes in by source, bytes
        /// out, blocks verified, download progress).
        #[arg(long, value_name = "HOST:PORT")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Write a JSON summary of the fetch here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Transfers in flight at once.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
        /// Also hash the whole file and compare it with the manifest's SHA-256 before
        /// renaming it to OUT. Every block is verified against the signed digest list anyway;
        /// this re-checks the publisher's header for consistency, at the cost of a second
        /// SHA-256 pass over the file.
        #[arg(long)]
        check_whole_file: bool,
        /// Write whole blocks to the disk with O_DIRECT, past the page cache, and read them
        /// back that way to serve them; the file's space is reserved first (a disk too small
        /// fails at once). For a lone fast fetch to a local disk: it saves copying every byte
        /// into the page cache, about a third of the fetch's CPU here. In a crowd, where a node
        /// serves what it fetched, it made nodes finish later. File systems that refuse
        /// O_DIRECT get the page cache anyway.
        #[arg(long)]
        direct_io: bool,
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
        /// The file: a ticket or a file id.
        #[arg(value_name = "TICKET|FILE_ID")]
        file_id: Target,
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
    /// Print this node's PeerId (creating its key in the data dir if needed): what a master's
    /// --publisher-key needs to trust this node's `shoal publish`.
    Id {
        /// Data directory holding the identity key.
        #[arg(long, env = "SHOAL_DATA_DIR", default_value = "shoal-data")]
        data_dir: PathBuf,
    },
    /// List the files the master holds: id, size, blocks the master holds, mirrors, name.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Show what the master knows of a file.
    Status {
        /// The file: a ticket or a file id.
        #[arg(value_name = "TICKET|FILE_ID")]
        file_id: Target,
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

/// How `shoal fetch` shows progress.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ProgressMode {
    /// A bar when stderr is a terminal, else a progress line on stderr every 5 s.
    Auto,
    /// JSON lines on stdout, one a second and one at the end.
    Json,
    /// Nothing.
    None,
}

/// What a command is about: a file id, or a ticket (a file id and the master's addresses).
#[derive(Clone, Debug)]
enum Target {
    Id(FileId),
    Ticket(Ticket),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim_start().starts_with(shoal_protocol::ticket::SCHEME) {
            s.parse()
                .map(Target::Ticket)
                .map_err(|e| format!("not a ticket: {e}"))
        } else {
            s.parse()
                .map(Target::Id)
                .map_err(|e: shoal_protocol::manifest::ParseFileIdError| e.to_string())
        }
    }
}

impl Target {
    fn file(&self) -> FileId {
        match self {
            Target::Id(f) => *f,
            Target::Ticket(t) => t.file,
        }
    }

    fn masters(&self) -> &[Multiaddr] {
        match self {
            Target::Id(_) => &[],
            Target::Ticket(t) => &t.masters,
        }
    }
}

/// Joins the swarm at --bootstrap, or else at the ticket's addresses, in order. Read-only
/// commands (`identity: false`) use a throw-away key and leave no files behind.
async fn join(
    c: &Common,
    identity: bool,
    ticket_masters: &[Multiaddr],
) -> anyhow::Result<shoal_node::Client> {
    join_with(c, identity, ticket_masters, false).await
}

/// [`join`], starting without the master when `without_master` and it does not answer.
async fn join_with(
    c: &Common,
    identity: bool,
    ticket_masters: &[Multiaddr],
    without_master: bool,
) -> anyhow::Result<shoal_node::Client> {
    let candidates = match &c.bootstrap {
        Some(b) => vec![b.clone()],
        None => ticket_masters.to_vec(),
    };
    let mut last = anyhow::anyhow!(
        "no master address: pass --bootstrap ADDR (the master prints its addresses when it \
         starts) or a ticket (shoal:...) instead of a file id"
    );
    let caps = ConnectionCaps {
        per_peer: c.max_connections_per_peer.max(1),
        pending_incoming: c.max_pending_incoming.max(1),
        ..ConnectionCaps::for_role_with_total(Role::Node, c.max_connections.max(1))
    };
    for (i, bootstrap) in candidates.iter().enumerate() {
        let cfg = NodeConfig::new(&c.data_dir, bootstrap.clone())
            .with_listen(c.listen.clone())
            .with_max_upload_rate(c.max_upload_rate)
            .with_region(c.region.clone())
            .with_connection_caps(caps.clone())
            .with_max_peers(c.max_peers)
            .with_peers(c.peers.clone())
            .with_announce(c.announce.clone())
            .with_relay(c.relay)
            // Only the last candidate: the others are tried first.
            .with_start_without_master(without_master && i + 1 == candidates.len())
            // A node whose event loop died must not linger: exit 101.
            .with_exit_on_panic(true)
            .with_ephemeral_identity(!identity);
        #[cfg(feature = "chaos")]
        let cfg = cfg.with_chaos(c.chaos);
        match shoal_node::start(cfg).await {
            Ok(client) => return Ok(client),
            Err(e) if i + 1 < candidates.len() => {
                eprintln!("{e}; trying the ticket's next address");
            }
            Err(e) => last = e.into(),
        }
    }
    Err(last)
}

/// One process per data dir: a second one fails at once, naming the first.
fn lock(c: &Common) -> anyhow::Result<shoal_net::DataDirLock> {
    Ok(shoal_net::lock_data_dir(&c.data_dir)?)
}

#[tokio::main]
async fn main() -> ExitCode {
    // A peer closing its end first (the peer budget does that) is no warning.
    shoal_net::cli::init_logging("warn,yamux::connection=error");
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", shoal_net::cli::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Publish { file, common } => {
            // The file first: a missing one fails before joining anything.
            let meta = std::fs::metadata(&file)
                .with_context(|| format!("cannot publish {}", file.display()))?;
            anyhow::ensure!(
                meta.is_file(),
                "cannot publish {}: not a regular file",
                file.display()
            );
            std::fs::File::open(&file)
                .with_context(|| format!("cannot publish {}", file.display()))?;
            let _lock = lock(&common)?;
            let client = join(&common, true, &[]).await?;
            let key =
                shoal_node::service::load_or_create_key(&common.data_dir.join("identity.key"))?;
            eprintln!("publishing {} as {}", file.display(), client.peer_id());
            let id = shoal_node::publish(&client, &key, &file)
                .await
                .with_context(|| format!("publishing {}", file.display()))?;
            eprintln!("the master holds every block");
            client.shutdown().await;
            if let Some(t) = common
                .bootstrap
                .as_ref()
                .and_then(|b| Ticket::new(id, vec![b.clone()]).ok())
            {
                eprintln!("ticket (shoal fetch TICKET --out PATH): {t}");
            }
            println!("{id}");
        }
        Cmd::Fetch {
            file_id,
            manifest,
            out,
            seed_time,
            progress,
            metrics_addr,
            report,
            parallel,
            check_whole_file,
            direct_io,
            common,
        } => {
            let _lock = lock(&common)?;
            // The manifest first: a bad one fails before joining anything.
            let manifest = match &manifest {
                Some(p) => Some(Arc::new(
                    shoal_node::provenance::load_manifest(
                        p,
                        file_id.as_ref().map(Target::file).as_ref(),
                    )
                    .with_context(|| format!("reading the manifest {}", p.display()))?,
                )),
                None => None,
            };
            let masters = file_id.as_ref().map_or(&[][..], Target::masters);
            let client = join_with(&common, true, masters, manifest.is_some())
                .await
                .with_context(|| {
                    if manifest.is_some() {
                        String::from("joining the swarm")
                    } else {
                        String::from(
                            "joining the swarm (with the master down, a fetch needs the file's \
                             manifest, --manifest FILE, and a holder to start from, --peer ADDR)",
                        )
                    }
                })?;
            let file_id = match (&file_id, &manifest) {
                (Some(t), _) => t.file(),
                (None, Some(m)) => m.id(),
                (None, None) => anyhow::bail!("a file id, a ticket or --manifest is needed"),
            };
            let live = Arc::new(FetchProgress::default());
            if let Some(a) = metrics_addr {
                let bound =
                    shoal_node::metrics::NodeMetrics::new(client.clone(), Some(live.clone()))
                        .spawn_server(a)
                        .await
                        .with_context(|| format!("serving metrics at {a}"))?;
                eprintln!("metrics at http://{bound}/metrics");
            }
            let mut opts = FetchOptions::new(file_id, &out);
            opts.manifest = manifest;
            opts.scheduler.max_transfers = parallel.max(1);
            opts.check_whole_file = check_whole_file;
            opts.direct_io = direct_io;
            opts.live = Some(live.clone());
            let display = ProgressDisplay::start(progress, live);
            let result = tokio::select! {
                r = shoal_node::fetch(&client, opts) => r,
                code = shutdown_signal() => {
                    display.finish();
                    client.shutdown().await;
                    eprintln!("interrupted; run the same command again to resume");
                    return Ok(ExitCode::from(code));
                }
            };
            display.finish();
            let mut summary = result.with_context(|| format!("fetching {file_id}"))?;
            eprintln!(
                "fetched {} in {:.1} s: {} from the master, {} from peers{}",
                out.display(),
                summary.elapsed_s,
                human_bytes(summary.bytes_from_master),
                human_bytes(summary.bytes_from_peers),
                if summary.blocks_resumed > 0 {
                    format!(
                        " ({} of {} blocks were already verified)",
                        summary.blocks_resumed, summary.blocks
                    )
                } else {
                    String::new()
                }
            );
            let write_report = |summary: &shoal_node::FetchReport| -> anyhow::Result<()> {
                if let Some(path) = &report {
                    shoal_net::write_atomic(path, &serde_json::to_vec_pretty(summary)?)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                Ok(())
            };
            write_report(&summary)?;
            let uploaded_at_done = client.bytes_uploaded();
            let mut code = ExitCode::SUCCESS;
            if seed_time > 0 {
                eprintln!("done; seeding for {seed_time} s (Ctrl-C to stop)");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(seed_time)) => {}
                    c = shutdown_signal() => {
                        // The download is complete: stopping the seeding is the expected way
                        // to end, except that a SIGTERM still says so.
                        if c != 130 { code = ExitCode::from(c) }
                    }
                }
            }
            // The report's upload count includes what was served while seeding.
            summary.bytes_uploaded += client.bytes_uploaded() - uploaded_at_done;
            client.shutdown().await;
            write_report(&summary)?;
            return Ok(code);
        }
        Cmd::Seed {
            path,
            file_id,
            common,
        } => {
            let _lock = lock(&common)?;
            let client = join(&common, true, &[]).await?;
            shoal_node::seed(&client, file_id, &path)
                .await
                .with_context(|| format!("seeding {}", path.display()))?;
            eprintln!("seeding {} (Ctrl-C to stop)", path.display());
            let _ = shutdown_signal().await;
            client.shutdown().await;
        }
        Cmd::Inspect {
            file_id,
            save_manifest,
            common,
        } => {
            let client = join(&common, false, file_id.masters()).await?;
            let file_id = file_id.file();
            let m = shoal_node::fetch::get_manifest(&client, file_id).await;
            client.shutdown().await;
            let m = m.with_context(|| format!("getting the manifest of {file_id}"))?;
            print!("{}", shoal_node::provenance::describe(&m));
            if let Some(p) = save_manifest {
                shoal_node::provenance::save_manifest(&m, &p)?;
                eprintln!("manifest saved to {}", p.display());
            }
        }
        Cmd::Ls { json, common } => {
            let client = join(&common, false, &[]).await?;
            let r = client
                .master_request(shoal_protocol::wire::MasterRequest::List)
                .await;
            client.shutdown().await;
            let (files, total) = match r? {
                shoal_protocol::wire::MasterResponse::Files { files, total } => (files, total),
                shoal_protocol::wire::MasterResponse::Refused { reason } => {
                    anyhow::bail!("the master refused: {reason}")
                }
                _ => anyhow::bail!("unexpected answer from the master (an older version?)"),
            };
            if json {
                let v = serde_json::json!({
                    "total": total,
                    "files": files.iter().map(|f| serde_json::json!({
                        "file": f.file.to_string(), "name": f.name, "size": f.size,
                        "blocks": f.blocks, "master_blocks": f.master_blocks, "mirrors": f.mirrors,
                    })).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for f in &files {
                    println!(
                        "{}  {:>10}  master {}/{}  mirrors {}  {}",
                        f.file,
                        human_bytes(f.size),
                        f.master_blocks,
                        f.blocks,
                        f.mirrors,
                        f.name
                    );
                }
                if (files.len() as u32) < total {
                    println!(
                        "... {} more (the master lists at most {})",
                        total - files.len() as u32,
                        files.len()
                    );
                }
                if total == 0 {
                    eprintln!("the master holds no files");
                }
            }
        }
        Cmd::Id { data_dir } => {
            let key = shoal_node::service::load_or_create_key(&data_dir.join("identity.key"))?;
            println!("{}", key.public().to_peer_id());
        }
        Cmd::Verify { path, manifest } => {
            let m = shoal_node::provenance::load_manifest(&manifest, None)
                .with_context(|| format!("reading {}", manifest.display()))?;
            print!("{}", shoal_node::provenance::describe(&m));
            if let Some(why) = shoal_node::provenance::wrong_size(&m, &path)
                .with_context(|| format!("reading {}", path.display()))?
            {
                println!("{}: {why}", path.display());
                return Ok(ExitCode::from(1));
            }
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
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Status {
            file_id,
            json,
            common,
        } => {
            let client = join(&common, false, file_id.masters()).await?;
            let file_id = file_id.file();
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
                    "relayed_bytes": s.relayed_bytes,
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
                println!(
                    "piece bytes sent by the master: {} ({})",
                    s.bytes_from_master,
                    human_bytes(s.bytes_from_master)
                );
                println!(
                    "piece bytes served by peers:    {} ({})",
                    s.bytes_from_peers,
                    human_bytes(s.bytes_from_peers)
                );
                println!(
                    "bytes the master relayed for nodes behind NAT (all files): {} ({})",
                    s.relayed_bytes,
                    human_bytes(s.relayed_bytes)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Shows a fetch's progress: a bar on a terminal, periodic lines without one, or JSON lines.
/// Rates count bytes fetched in this run only, never blocks a resume already held.
struct ProgressDisplay {
    task: tokio::task::JoinHandle<()>,
    bar: Option<indicatif::ProgressBar>,
    json: Option<(Arc<FetchProgress>, Instant)>,
}

impl ProgressDisplay {
    fn start(mode: ProgressMode, live: Arc<FetchProgress>) -> Self {
        let bar = (mode == ProgressMode::Auto && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        let started = Instant::now();
        let json = (mode == ProgressMode::Json).then(|| (live.clone(), started));
        let task = tokio::spawn({
            let bar = bar.clone();
            async move {
                let every = match mode {
                    ProgressMode::Json => Duration::from_secs(1),
                    _ => Duration::from_secs(5),
                };
                let mut announced = false;
                let mut last = (Instant::now(), 0u64);
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let s = live.snapshot();
                    if !s.started || mode == ProgressMode::None {
                        continue;
                    }
                    if !announced {
                        announced = true;
                        last = (Instant::now(), 0);
                        if let Some(line) = resume_line(&s) {
                            match &bar {
                                Some(b) => b.println(line),
                                None => eprintln!("{line}"),
                            }
                        }
                        if let Some(b) = &bar {
                            // This run's bytes only, so the rate and the eta stay honest.
                            b.set_length(s.total_bytes - s.bytes_resumed);
                            if s.bytes_resumed > 0 {
                                b.set_message(format!(
                                    "(+{} resumed)",
                                    human_bytes(s.bytes_resumed)
                                ));
                            }
                        }
                    }
                    if let Some(b) = &bar {
                        b.set_position(s.fetched());
                        continue;
                    }
                    let dt = last.0.elapsed();
                    if dt < every {
                        continue;
                    }
                    let rate = (s.fetched() - last.1) as f64 / dt.as_secs_f64();
                    last = (Instant::now(), s.fetched());
                    if mode == ProgressMode::Json {
                        println!("{}", json_line("progress", &s, started, rate));
                    } else {
                        eprintln!("{}", progress_line(&s, rate));
                    }
                }
            }
        });
        Self { task, bar, json }
    }

    fn finish(self) {
        self.task.abort();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if let Some((live, started)) = &self.json {
            let s = live.snapshot();
            let rate = s.fetched() as f64 / started.elapsed().as_secs_f64().max(1e-3);
            println!("{}", json_line("end", &s, *started, rate));
        }
    }
}

fn json_line(
    event: &str,
    s: &shoal_node::progress::Snapshot,
    started: Instant,
    rate: f64,
) -> serde_json::Value {
    let mut v = serde_json::to_value(s).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("event".into(), event.into());
        o.insert("held_bytes".into(), s.held().into());
        o.insert(
            "elapsed_s".into(),
            ((started.elapsed().as_secs_f64() * 10.0).round() / 10.0).into(),
        );
        o.insert("rate_bytes_per_s".into(), (rate.max(0.0) as u64).into());
    }
    v
}

/// Waits for Ctrl-C or SIGTERM; returns the exit code a shell expects for it (130 or 143).
async fn shutdown_signal() -> u8 {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return 130;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => 130,
        _ = term.recv() => 143,
    }
}
