//! The live engine: the real master ([`Master::start`]) and node services
//! ([`shoal_node::start`], [`shoal_node::fetch`]) in one process and one tokio runtime, on
//! loopback TCP, in real time.
//!
//! It runs the swarm [`Swarm::draw`] gives the virtual engine (same capacities, roles and
//! arrivals): the master holds a file of random bytes from the seed, cut into the scenario's
//! blocks, with its upload capped at the scenario's rate; each node starts at its arrival time
//! with its region, upload cap and upload slots, fetches, checks its copy against the source,
//! and seeds for `node.seed_s` (or until the run ends). Churn stops a node (a crash aborts its
//! tasks, a clean leave says goodbye) and restarts it on the same data directory, where it
//! resumes. Misbehaving nodes run the node's own `--chaos` modes, which exist only when the
//! simulator is built with its `chaos` feature.
//!
//! Every connection between two of its nodes is two of the process's file descriptors, so
//! each node keeps at most its share of the descriptor limit connected
//! ([`max_peers_per_node`], the node's peer budget of [`shoal_node::peers`]).
//!
//! What it does not do (see ARCHITECTURE.md): no latency between regions is added (loopback
//! is all one region), download capacities are not enforced, and a crashed node's sockets
//! close at once, so the master notices a crash sooner than `churn.crash_detect_s`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use shoal_master::{Master, MasterConfig};
use shoal_node::progress::FetchProgress;
use shoal_node::scheduler::{SchedulerConfig, TransferDeadlines};
use shoal_node::{Client, FetchOptions, NodeConfig, RelayMode};
use shoal_protocol::FileId;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::draw::{exp, DrawnNode, Swarm};
use crate::engine::{NodeRecord, Outcome, Progress, Role};
use crate::scenario::Scenario;

/// Node start-ups at once: the master accepts 64 pending connections (its connection caps);
/// a flash crowd larger than that queues here, and the wait counts in its completion time.
const STARTS_AT_ONCE: usize = 32;

/// Why a live run could not run.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// Local I/O: the temporary directory, the source file, a copy's hash.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The master could not take the file or start.
    #[error("master: {0}")]
    Master(String),
    /// The scenario needs something the live engine cannot do.
    #[error("{0}")]
    Unsupported(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LiveError {
    let what = what.into();
    move |source| LiveError::Io { what, source }
}

/// Runs `sc` live with the master's real policy; `progress` is called about once a second.
/// `scratch` holds the data directories (the master's and one per node); `None`: a temporary
/// directory, removed afterwards.
pub fn run(
    sc: &Scenario,
    seed: u64,
    scratch: Option<&Path>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Outcome, LiveError> {
    let (swarm, _) = Swarm::draw(sc, seed);
    if !cfg!(feature = "chaos") && swarm.nodes.iter().any(|n| n.role != Role::Honest) {
        return Err(LiveError::Unsupported(
            "the scenario has misbehaving nodes, which the live engine runs with the node's \
             test-only --chaos modes: build shoal-sim with `--features chaos`"
                .into(),
        ));
    }
    let temp;
    let root = match scratch {
        Some(p) => p.to_path_buf(),
        None => {
            temp = tempfile::tempdir().map_err(io("creating a temporary directory"))?;
            temp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
    // Every node writes a copy: refuse before filling the disk.
    let need = sc.file.size.0.saturating_mul(swarm.nodes.len() as u64 + 2);
    let free = shoal_master::registry::available_space(&root)
        .map_err(|e| LiveError::Master(e.to_string()))?;
    if need > free {
        return Err(LiveError::Unsupported(format!(
            "the live engine writes one copy of the file per node: {} MiB, but {} has {} MiB \
             free",
            need >> 20,
            root.display(),
            free >> 20
        )));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io("starting the tokio runtime"))?;
    rt.block_on(run_swarm(sc, seed, &root, swarm, progress))
}

/// What every node task shares.
struct Ctx {
    bootstrap: Multiaddr,
    file: FileId,
    source_sha256: [u8; 32],
    t0: Instant,
    sc: Scenario,
    regions: Vec<String>,
    seed: u64,
    starting: Semaphore,
    /// Honest nodes that completed or will never complete.
    settled: AtomicUsize,
    /// Honest nodes that completed.
    done: AtomicUsize,
    /// Peers each node keeps connected ([`max_peers_per_node`]).
    max_peers: usize,
}

impl Ctx {
    fn secs(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
}

async fn run_swarm(
    sc: &Scenario,
    seed: u64,
    root: &Path,
    swarm: Swarm,
    progress: &mut dyn FnMut(Progress),
) -> Result<Outcome, LiveError> {
    let src = root.join("source.bin");
    let source_sha256 = write_source(&src, sc.file.size.0, seed)?;
    let (master, file) = start_master(sc, &root.join("master"), &src).await?;
    let honest = swarm
        .nodes
        .iter()
        .filter(|n| n.role == Role::Honest)
        .count();
    let ctx = Arc::new(Ctx {
        bootstrap: master.addrs()[0].clone(),
        file,
        source_sha256,
        t0: Instant::now(),
        sc: sc.clone(),
        regions: swarm.regions.clone(),
        seed,
        starting: Semaphore::new(STARTS_AT_ONCE),
        max_peers: max_peers_per_node(swarm.nodes.len(), open_files_limit()),
        settled: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
    });
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = Vec::with_capacity(swarm.nodes.len());
    let mut arrive = vec![0.0; swarm.nodes.len()];
    for &(i, t) in &swarm.arrivals {
        arrive[i] = t;
    }
    for (i, d) in swarm.nodes.iter().enumerate() {
        let dir = root.join(format!("node{i}"));
        tasks.push(tokio::spawn(node_life(
            ctx.clone(),
            i,
            d.clone(),
            arrive[i],
            dir,
            stop.clone(),
        )));
    }
    let limit = Duration::from_secs_f64(
        sc.limit_s
            .unwrap_or(crate::bound::lower_bound(sc) * 20.0 + 600.0),
    );
    let mut egress = Vec::new();
    let mut last_sent = 0u64;
    let mut tick =
        tokio::time::interval_at(ctx.t0 + Duration::from_secs(1), Duration::from_secs(1));
    let mut hit_limit = false;
    let mut end_s;
    loop {
        let settled = ctx.settled.load(Ordering::Acquire) >= honest;
        end_s = ctx.secs();
        if settled {
            break;
        }
        if ctx.t0.elapsed() >= limit {
            hit_limit = true;
            break;
        }
        tokio::select! {
            _ = tick.tick() => {
                let sent = master.metrics().piece_bytes_sent.get();
                egress.push(sent.saturating_sub(last_sent) as f64);
                last_sent = sent;
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        progress(Progress {
            done: ctx.done.load(Ordering::Acquire),
            honest,
            virtual_s: ctx.secs(),
        });
    }
    // The last, partial second.
    let sent = master.metrics().piece_bytes_sent.get();
    egress.push(sent.saturating_sub(last_sent) as f64);
    progress(Progress {
        done: ctx.done.load(Ordering::Acquire),
        honest,
        virtual_s: end_s,
    });
    let _ = stop_tx.send(true);
    let mut lives = Vec::with_capacity(tasks.len());
    for t in tasks {
        lives.push(
            t.await
                .map_err(|e| LiveError::Master(format!("a node task failed: {e}")))?,
        );
    }
    let origin_bytes = master.metrics().piece_bytes_sent.get();
    master.shutdown().await;
    let banned = read_bans(&root.join("master").join("bans"));
    Ok(outcome(
        sc,
        &swarm,
        lives,
        &banned,
        egress,
        origin_bytes,
        end_s,
        hit_limit,
    ))
}

/// Writes `size` random bytes from `seed` to `path`; returns their SHA-256.
fn write_source(path: &Path, size: u64, seed: u64) -> Result<[u8; 32], LiveError> {
    use std::io::Write;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_f11e);
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).map_err(io(format!("creating {}", path.display())))?,
    );
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        h.update(&buf[..n]);
        f.write_all(&buf[..n])
            .map_err(io(format!("writing {}", path.display())))?;
        left -= n as u64;
    }
    f.flush()
        .map_err(io(format!("writing {}", path.display())))?;
    Ok(h.finalize().into())
}

/// Descriptors kept for everything but the connections between nodes: data files, the
/// runtime, listeners, the master's connections.
const FD_RESERVE: u64 = 2_048;

/// The fewest peers a node is held to, whatever the descriptor limit: its transfers and
/// upload slots must fit (and in-use peers are never let go, so this is a soft floor).
const MIN_PEERS: usize = 16;

/// Peers each of `nodes` nodes keeps connected, so that the process stays within its limit of
/// `open_files` descriptors: every connection between two of its nodes is two of them, one at
/// each end, and each end counts it in its own budget.
fn max_peers_per_node(nodes: usize, open_files: Option<u64>) -> usize {
    let limit = open_files.unwrap_or(1_024);
    let per = limit.saturating_sub(FD_RESERVE) / (2 * (nodes as u64 + 1));
    usize::try_from(per)
        .unwrap_or(usize::MAX)
        .clamp(MIN_PEERS, shoal_node::peers::DEFAULT_MAX_PEERS)
}

/// The process's soft limit on open files (Linux: `/proc/self/limits`); `None` elsewhere or
/// when unlimited.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU seconds this process has used so far, all its threads, live or ended (Linux:
/// `/proc/self/stat`, in the kernel's fixed 100 ticks per second); `None` elsewhere.
pub fn process_cpu_s() -> Option<f64> {
    stat_cpu_s("/proc/self/stat")
}

/// CPU seconds process `pid` has used so far, as [`process_cpu_s`]; `None` when it is gone
/// (or not on Linux).
pub fn pid_cpu_s(pid: u32) -> Option<f64> {
    stat_cpu_s(&format!("/proc/{pid}/stat"))
}

/// Resident memory of process `pid` now, in bytes (`VmRSS` in `/proc/<pid>/status`); `None`
/// when it is gone (or not on Linux).
pub fn pid_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// User plus system CPU seconds from the `stat` file at `path`.
fn stat_cpu_s(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on: utime and
    // stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / 100.0)
}

fn loopback() -> Multiaddr {
    Multiaddr::empty()
        .with(libp2p::multiaddr::Protocol::Ip4([127, 0, 0, 1].into()))
        .with(libp2p::multiaddr::Protocol::Tcp(0))
}

/// Adds the file to a fresh master's data directory in the scenario's blocks, then starts
/// the master on loopback with the scenario's upload cap, slots and policy.
async fn start_master(
    sc: &Scenario,
    dir: &Path,
    src: &Path,
) -> Result<(Master, FileId), LiveError> {
    let m = |e: &dyn std::fmt::Display| LiveError::Master(e.to_string());
    let registry = shoal_master::registry::Registry::open(dir).map_err(|e| m(&e))?;
    let key = registry.key().map_err(|e| m(&e))?;
    let block = u32::try_from(sc.file.block.0)
        .map_err(|_| m(&format!("block size {} too large", sc.file.block.0)))?;
    let manifest = registry
        .add_local_in_blocks(src, &key, Some(block))
        .map_err(|e| m(&e))?;
    let mut cfg = MasterConfig::new(dir)
        .with_listen(vec![loopback()])
        .with_max_upload_rate(Some(sc.master.upload.0 as u64))
        .with_policy(sc.policy.config())
        .with_min_free_disk(0);
    cfg.upload_slots = sc.master.upload_slots;
    let master = Master::start(cfg).await.map_err(|e| m(&e))?;
    Ok((master, manifest.id()))
}

/// What one node did, over all its sessions.
#[derive(Default)]
struct Life {
    peer: Option<PeerId>,
    finish_s: Option<f64>,
    from_master: u64,
    from_peers: u64,
    uploaded: u64,
    retries: u64,
    bad_blocks: u64,
}

/// How a node session ended.
enum Leaving {
    /// Churn: it leaves now (crash or clean) and may come back.
    Churn,
    /// Done seeding: a clean leave for good.
    SeedEnd,
    /// The run ended.
    Stop,
    /// It cannot go on (start or fetch failed).
    Failed,
}

fn node_config(ctx: &Ctx, d: &DrawnNode, dir: &Path) -> NodeConfig {
    let g = &ctx.sc.groups[d.group];
    let cfg = NodeConfig::new(dir, ctx.bootstrap.clone())
        .with_listen(vec![loopback()])
        .with_max_upload_rate(Some(d.upload as u64))
        .with_upload_slots(g.upload_slots)
        .with_max_peers(ctx.max_peers)
        // The scenario's nodes are all reachable (no NAT here). Left to AutoNAT, a crowd on
        // busy cores saw the master's dial-backs time out, took itself for private and moved
        // to the master's relay: in a 100-node run every node did, about 20 s in.
        .with_relay(RelayMode::Never)
        .with_region(ctx.regions[d.region].clone());
    with_role(cfg, d.role)
}

#[cfg(feature = "chaos")]
fn with_role(cfg: NodeConfig, role: Role) -> NodeConfig {
    use shoal_node::chaos::ChaosMode;
    cfg.with_chaos(match role {
        Role::Honest => None,
        Role::Corrupt => Some(ChaosMode::Corrupt),
        Role::LieHave => Some(ChaosMode::LieHave),
        Role::Stall => Some(ChaosMode::Stall),
        Role::FalseAccuse => Some(ChaosMode::FalseAccuse),
    })
}

#[cfg(not(feature = "chaos"))]
fn with_role(cfg: NodeConfig, _role: Role) -> NodeConfig {
    // `run` refused misbehaving nodes without the feature.
    cfg
}

async fn wait_stop(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sleeps until `at` seconds into the run; `None`: forever.
async fn until(ctx: &Ctx, at: Option<f64>) {
    match at {
        Some(s) => tokio::time::sleep_until(ctx.t0 + Duration::from_secs_f64(s.max(0.0))).await,
        None => std::future::pending().await,
    }
}

/// One node from its arrival to the end of the run.
async fn node_life(
    ctx: Arc<Ctx>,
    i: usize,
    d: DrawnNode,
    arrive_s: f64,
    dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> Life {
    let mut life = Life::default();
    let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed ^ (0xc4u64 << 56) ^ i as u64);
    let churn = ctx.sc.churn.clone();
    let honest = d.role == Role::Honest;
    let settle = |ctx: &Ctx| {
        if honest {
            ctx.settled.fetch_add(1, Ordering::AcqRel);
        }
    };
    tokio::select! {
        _ = until(&ctx, Some(arrive_s)) => {}
        _ = wait_stop(&mut stop) => return life,
    }
    loop {
        let client = {
            let Ok(_permit) = ctx.starting.acquire().await else {
                return life;
            };
            match shoal_node::start(node_config(&ctx, &d, &dir)).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(node = i, error = %e, "node could not start");
                    if life.finish_s.is_none() {
                        settle(&ctx);
                    }
                    return life;
                }
            }
        };
        life.peer = Some(client.peer_id());
        let leave_at =
            (churn.leave_rate > 0.0).then(|| ctx.secs() + exp(&mut rng, churn.leave_rate));
        let leaving = session(&ctx, &client, &mut life, leave_at, &mut stop).await;
        life.uploaded += client.bytes_uploaded();
        match leaving {
            Leaving::Churn => {
                if rng.gen_bool(churn.crash_fraction.clamp(0.0, 1.0)) {
                    client.kill();
                } else {
                    client.shutdown().await;
                }
                if churn.rejoin_rate <= 0.0 {
                    if life.finish_s.is_none() {
                        settle(&ctx);
                    }
                    return life;
                }
                let back = ctx.secs() + exp(&mut rng, churn.rejoin_rate);
                tokio::select! {
                    _ = until(&ctx, Some(back)) => {}
                    _ = wait_stop(&mut stop) => return life,
                }
            }
            Leaving::SeedEnd | Leaving::Stop => {
                client.shutdown().await;
                return life;
            }
            Leaving::Failed => {
                client.shutdown().await;
                if life.finish_s.is_none() {
                    settle(&ctx);
                }
                return life;
            }
        }
    }
}

/// One session of a node: fetch (unless done before), then seed.
async fn session(
    ctx: &Ctx,
    client: &Client,
    life: &mut Life,
    leave_at: Option<f64>,
    stop: &mut watch::Receiver<bool>,
) -> Leaving {
    let out = client.data_dir().join("out.bin");
    if life.finish_s.is_none() {
        let live = Arc::new(FetchProgress::default());
        let mut opts = FetchOptions::new(ctx.file, &out);
        opts.scheduler = SchedulerConfig {
            max_transfers: ctx.sc.node.max_transfers,
            deadlines: TransferDeadlines {
                stall: Duration::from_secs_f64(ctx.sc.node.watchdog_s),
                ..TransferDeadlines::default()
            },
            ..SchedulerConfig::default()
        };
        opts.live = Some(live.clone());
        let ended = tokio::select! {
            r = shoal_node::fetch(client, opts) => Some(r),
            _ = until(ctx, leave_at) => None,
            _ = wait_stop(stop) => return Leaving::Stop,
        };
        let got = live.snapshot();
        life.from_master += got.bytes_from_master;
        life.from_peers += got.bytes_from_peers;
        match ended {
            None => return Leaving::Churn,
            Some(Err(e)) => {
                tracing::warn!(peer = %client.peer_id(), error = %e, "fetch failed");
                return Leaving::Failed;
            }
            Some(Ok(report)) => {
                life.finish_s = Some(ctx.secs());
                tracing::debug!(node = %client.peer_id(), at_s = ctx.secs(), from_master = got.bytes_from_master, "fetched");
                life.retries += report.retries;
                if !copy_matches(&out, ctx.source_sha256).await {
                    life.bad_blocks += 1;
                }
                if client.chaos().is_none() {
                    ctx.done.fetch_add(1, Ordering::AcqRel);
                    ctx.settled.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
    }
    let seed_end = ctx
        .sc
        .node
        .seed_s
        .and_then(|s| life.finish_s.map(|f| f + s));
    tokio::select! {
        _ = until(ctx, leave_at) => Leaving::Churn,
        _ = until(ctx, seed_end) => Leaving::SeedEnd,
        _ = wait_stop(stop) => Leaving::Stop,
    }
}

/// Whether the copy at `out` has the source's SHA-256 (hashed off the runtime's threads).
async fn copy_matches(out: &Path, want: [u8; 32]) -> bool {
    let out = out.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || -> std::io::Result<[u8; 32]> {
        let mut f = std::fs::File::open(&out)?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(h.finalize().into())
    })
    .await;
    matches!(hashed, Ok(Ok(got)) if got == want)
}

/// The master's ban list (one PeerId a line); empty when there is none.
fn read_bans(path: &Path) -> Vec<PeerId> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[allow(clippy::too_many_arguments)] // the parts of one run's result
fn outcome(
    sc: &Scenario,
    swarm: &Swarm,
    lives: Vec<Life>,
    banned: &[PeerId],
    master_egress: Vec<f64>,
    origin_bytes: u64,
    end_s: f64,
    hit_limit: bool,
) -> Outcome {
    let mut arrive = vec![0.0; swarm.nodes.len()];
    for &(i, t) in &swarm.arrivals {
        arrive[i] = t;
    }
    let index: HashMap<PeerId, usize> = lives
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.peer.map(|p| (p, i)))
        .collect();
    let mut is_banned = vec![false; swarm.nodes.len()];
    for p in banned {
        if let Some(&i) = index.get(p) {
            is_banned[i] = true;
        }
    }
    let nodes: Vec<NodeRecord> = swarm
        .nodes
        .iter()
        .zip(lives)
        .enumerate()
        .map(|(i, (d, l))| NodeRecord {
            region: swarm.regions[d.region].clone(),
            role: d.role,
            upload: d.upload,
            download: d.download,
            start_s: arrive[i],
            finish_s: l.finish_s,
            from_master: l.from_master,
            from_peers: l.from_peers,
            uploaded: l.uploaded,
            retries: l.retries,
            banned: is_banned[i],
            bad_blocks: l.bad_blocks,
        })
        .collect();
    let peer_bytes = nodes.iter().map(|n| n.uploaded).sum();
    // Every block left the master at least once (nobody else had it): whatever it sent
    // beyond one copy was sent again.
    let f = sc.file.size.0;
    let resent = origin_bytes
        .saturating_sub(f)
        .div_ceil(sc.file.block.0.max(1));
    Outcome {
        nodes,
        master_egress,
        origin_bytes,
        peer_bytes_intra: 0,
        peer_bytes,
        virtual_s: end_s,
        events: 0,
        hit_limit,
        origin_resent_blocks: resent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_budget_shares_the_descriptor_limit_out() {
        // 200 nodes under this sandbox's 20,000: 44 each, 200 * 44 * 2 < 20,000 - reserve.
        assert_eq!(max_peers_per_node(200, Some(20_000)), 44);
        // Small swarms keep the node's default; tiny limits keep the floor.
        assert_eq!(
            max_peers_per_node(30, Some(20_000)),
            shoal_node::peers::DEFAULT_MAX_PEERS
        );
        assert_eq!(max_peers_per_node(200, Some(1_024)), MIN_PEERS);
        assert_eq!(max_peers_per_node(200, None), MIN_PEERS);
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }

    #[test]
    fn the_resident_memory_counts_touched_pages() {
        let me = std::process::id();
        let before = pid_rss_bytes(me).expect("/proc/self/status on Linux");
        // 64 MiB, every page written, so resident whatever the allocator does.
        let buf = std::hint::black_box(vec![1u8; 64 << 20]);
        let after = pid_rss_bytes(me).expect("/proc/self/status on Linux");
        assert!(
            after >= before + (32 << 20),
            "64 MiB touched, RSS {before} -> {after} bytes"
        );
        drop(buf);
        assert_eq!(pid_rss_bytes(u32::MAX), None);
    }

    #[test]
    fn the_process_cpu_time_counts_work_done() {
        let before = process_cpu_s().expect("/proc/self/stat on Linux");
        // Work until the count moves by 5 ticks (at most 20 s of wall time).
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while process_cpu_s().unwrap_or(before) < before + 0.05 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "20 s of busy work did not move the CPU time from {before} s"
            );
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        assert!(process_cpu_s().unwrap_or(0.0) >= before + 0.05);
    }
}
