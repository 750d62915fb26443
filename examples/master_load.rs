//! What connected nodes cost the master while nothing moves: its resident memory and CPU per
//! connected node, measured with real nodes.
//!
//! Starts the release `shoal-master` (a real process on loopback), then brings up real nodes
//! (`shoal_node::start`, each with its own key, swarm, listener and data dir) in worker
//! processes of at most `--per-worker` nodes, in steps. At each step it waits until the
//! master's `shoal_master_peers` gauge counts them all, lets them settle, and reads the
//! master's RSS and the CPU it uses over `--idle` seconds (from `/proc`, so Linux only):
//! pings, gossip heartbeats, identify, AutoNAT and the nodes' RTT reports. The workers' CPU
//! is printed too (a node's own upkeep with one connection).
//!
//! A master has 10,000 connected nodes only with `--max-connections` above about 11,000 (the
//! harness passes it). A worker needs up to about 30 descriptors per node while they join:
//! each new node's Kademlia bootstrap dials the nodes the master names (see ARCHITECTURE,
//! Known gaps), and those connections last until idle.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use libp2p::Multiaddr;
use shoal_sim::live::{open_files_limit, pid_cpu_s, pid_rss_bytes};
use shoal_tests::procs::{master_bootstrap, metric, Proc};

/// Nodes a worker starts at once (each start dials the master and waits for its answer).
const STARTS_AT_ONCE: usize = 32;

struct Args {
    steps: Vec<usize>,
    bin: PathBuf,
    idle: Duration,
    settle: Duration,
    per_worker: usize,
}

const USAGE: &str = "usage: master_load [STEPS=1000,2000,4000] [--bin-dir DIR] [--idle SECS] [--settle SECS] [--per-worker N]\n\
     Runs shoal-master from DIR (default: the directory above this binary, e.g. target/release)\n\
     and connects real nodes to it in steps (each step the total connected), then prints the\n\
     master's RSS and idle CPU per connected node (over the whole --idle span, and over its\n\
     quietest 5 s: the upkeep between the waves of nodes that joined together).\n\
     --idle SECS      how long to measure CPU at each step (default 20)\n\
     --settle SECS    how long to wait once all are connected, before measuring (default 70:\n\
                      a new node asks the master's AutoNAT three times, 20 s apart, and then\n\
                      every 5 minutes; the three first dial-backs are its joining, not upkeep)\n\
     --per-worker N   nodes per worker process (default 500)";

fn args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut steps = vec![1_000, 2_000, 4_000];
    let mut bin = None;
    let mut idle = Duration::from_secs(20);
    let mut per_worker = 500;
    let mut settle = Duration::from_secs(70);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bin-dir" => bin = Some(PathBuf::from(it.next().context("--bin-dir needs a path")?)),
            "--idle" => {
                let s: u64 = it.next().context("--idle needs seconds")?.parse()?;
                ensure!(s > 0, "--idle: at least 1 second");
                idle = Duration::from_secs(s);
            }
            "--settle" => {
                settle = Duration::from_secs(it.next().context("--settle needs seconds")?.parse()?);
            }
            "--per-worker" => {
                per_worker = it.next().context("--per-worker needs a count")?.parse()?;
                ensure!(per_worker > 0, "--per-worker: at least 1");
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            s if s.starts_with('-') => bail!("unknown option {s}\n{USAGE}"),
            s => {
                steps = s
                    .split(',')
                    .map(|n| n.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("STEPS: comma-separated node counts, not {s:?}"))?;
                ensure!(
                    steps.windows(2).all(|w| w[0] < w[1]) && steps[0] > 0,
                    "STEPS must grow: {s}"
                );
            }
        }
    }
    let bin = match bin {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("no directory above this binary")?
            .to_path_buf(),
    };
    Ok(Args {
        steps,
        bin,
        idle,
        settle,
        per_worker,
    })
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--worker") {
        let [_, _, count, bootstrap, dir] = &argv[..] else {
            bail!("--worker COUNT BOOTSTRAP DIR");
        };
        return worker(count.parse()?, bootstrap.parse()?, Path::new(dir));
    }
    let a = args()?;
    let most = *a.steps.last().context("no steps")?;
    if let Some(limit) = open_files_limit() {
        let need = 32 * a.per_worker.min(most) as u64 + 512;
        ensure!(
            limit >= need && limit >= most as u64 + 512,
            "the open-files limit is {limit}; the master needs {} and a worker {need} \
             (raise it with `ulimit -n`, or lower --per-worker)",
            most + 512
        );
    }
    let work = tempfile::Builder::new().prefix("shoal-load").tempdir()?;
    let root = work.path();
    let mdir = root.join("master");
    let mmetrics = format!("127.0.0.1:{}", free_port()?);
    // Room for every node and the master's own dials (see ConnectionCaps::for_role_with_total).
    let max_connections = most + most / 4 + 1_000;
    let mut master = Proc(
        Command::new(a.bin.join("shoal-master"))
            .arg("--data-dir")
            .arg(&mdir)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(["--metrics-addr", &mmetrics])
            .args(["--max-connections", &max_connections.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join("master.log"))?)
            .spawn()
            .context("starting shoal-master")?,
    );
    let bootstrap = master_bootstrap(&mdir)?;
    let mpid = master.0.id();

    println!(
        "| connected nodes | master RSS | RSS per node (over none) | master CPU | CPU per node | quietest 5 s, per node | a node's own CPU |"
    );
    println!("|---|---|---|---|---|---|---|");
    std::thread::sleep(Duration::from_secs(5));
    let base = measure(mpid, &[], a.idle)?;
    println!(
        "| 0 | {:.1} MiB | | {:.1} ms/s | | {:.1} ms/s in all | |",
        base.rss as f64 / (1 << 20) as f64,
        1e3 * base.master_cpu,
        1e3 * base.master_floor
    );
    let mut workers: Vec<Proc> = Vec::new();
    let mut started = 0;
    for &step in &a.steps {
        // One worker at a time, each waited for: the master then meets at most one worker's
        // joins at once (a join storm of thousands is another measurement).
        let t0 = Instant::now();
        while started < step {
            let n = (step - started).min(a.per_worker);
            let dir = root.join(format!("w{}", workers.len()));
            std::fs::create_dir_all(&dir)?;
            workers.push(Proc(
                Command::new(std::env::current_exe()?)
                    .args(["--worker", &n.to_string(), &bootstrap])
                    .arg(&dir)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.join("stderr.log"))?)
                    .spawn()
                    .context("starting a worker")?,
            ));
            started += n;
            wait_connected(&mmetrics, started, &mut master, &mut workers, root)?;
        }
        let up = t0.elapsed();
        std::thread::sleep(a.settle);
        let pids: Vec<u32> = workers.iter().map(|w| w.0.id()).collect();
        let m = measure(mpid, &pids, a.idle)?;
        let peers = metric(&mmetrics, "shoal_master_peers")? as usize;
        ensure!(
            peers >= step,
            "only {peers} of {step} nodes still connected after the measurement"
        );
        let per = |x: f64| x / step as f64;
        println!(
            "| {step} (up in {:.0} s) | {:.1} MiB | {:.1} KiB | {:.1} ms/s | {:.1} us/s | {:.1} us/s | {:.1} us/s |",
            up.as_secs_f64(),
            m.rss as f64 / (1 << 20) as f64,
            per(m.rss.saturating_sub(base.rss) as f64) / 1024.0,
            1e3 * m.master_cpu,
            1e6 * per(m.master_cpu),
            1e6 * per(m.master_floor),
            1e6 * per(m.workers_cpu),
        );
    }
    drop(workers);
    drop(master);
    Ok(())
}

/// Waits until the master counts `count` connected peers (a deadline of 40 ms a node, at
/// least 60 s), failing with its log if the master or a worker ends first.
fn wait_connected(
    metrics: &str,
    count: usize,
    master: &mut Proc,
    workers: &mut [Proc],
    root: &Path,
) -> Result<()> {
    let deadline = Duration::from_secs(60).max(Duration::from_millis(40 * count as u64));
    let t0 = Instant::now();
    loop {
        let peers = metric(metrics, "shoal_master_peers").unwrap_or(0.0) as usize;
        if peers >= count {
            return Ok(());
        }
        if let Some(status) = master.0.try_wait()? {
            bail!(
                "shoal-master exited with {status}; its log ends:\n{}",
                why(&root.join("master.log"))
            );
        }
        for (i, w) in workers.iter_mut().enumerate() {
            if let Some(status) = w.0.try_wait()? {
                let log = root.join(format!("w{i}")).join("stderr.log");
                bail!("worker {i} exited with {status}: {}", why(&log));
            }
        }
        if t0.elapsed() > deadline {
            bail!("{peers} of {count} nodes connected after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The master's RSS at the end, and the CPU the master and the workers used per second over
/// `span`; and the master's over the quietest [`SLICE`] of it.
struct Measured {
    rss: u64,
    master_cpu: f64,
    workers_cpu: f64,
    master_floor: f64,
}

/// The master's CPU is also read every `SLICE`: nodes that joined together probe AutoNAT and
/// bootstrap Kademlia together, in waves (ARCHITECTURE, Known gaps), and the quietest slice
/// is the upkeep between them.
const SLICE: Duration = Duration::from_secs(5);

fn measure(master: u32, workers: &[u32], span: Duration) -> Result<Measured> {
    let cpu = |pid: u32| pid_cpu_s(pid).with_context(|| format!("cannot read /proc/{pid}/stat"));
    let all = |pids: &[u32]| pids.iter().map(|&p| cpu(p)).sum::<Result<f64>>();
    let sleep_until = |t: Instant| std::thread::sleep(t.saturating_duration_since(Instant::now()));
    let (m0, w0) = (cpu(master)?, all(workers)?);
    let t0 = Instant::now();
    // Whole slices on fixed deadlines (sleeps overshoot), each divided by its measured length.
    let (mut prev, mut floor) = ((t0, m0), f64::INFINITY);
    for k in 1..=(span.as_millis() / SLICE.as_millis()) as u32 {
        sleep_until(t0 + SLICE * k);
        let now = (Instant::now(), cpu(master)?);
        floor = floor.min((now.1 - prev.1) / (now.0 - prev.0).as_secs_f64());
        prev = now;
    }
    sleep_until(t0 + span);
    let (t1, m1, w1) = (Instant::now(), cpu(master)?, all(workers)?);
    let s = (t1 - t0).as_secs_f64();
    let master_cpu = (m1 - m0) / s;
    Ok(Measured {
        rss: pid_rss_bytes(master).context("cannot read the master's /proc status")?,
        master_cpu,
        workers_cpu: (w1 - w0) / s,
        // A span shorter than one slice has only its mean.
        master_floor: if floor.is_finite() { floor } else { master_cpu },
    })
}

/// A worker: `count` real nodes in this process, each joined to the master, until stdin closes
/// (the harness ends, or kills it).
fn worker(count: usize, bootstrap: Multiaddr, dir: &Path) -> Result<()> {
    // RUST_LOG reaches the workers' logs (w*/stderr.log under the harness's temp dir).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse()?;
        let mut starts = futures::stream::iter(0..count)
            .map(|i| {
                let cfg = shoal_node::NodeConfig::new(dir.join(format!("n{i}")), bootstrap.clone())
                    .with_listen(vec![listen.clone()]);
                shoal_node::start(cfg)
            })
            .buffer_unordered(STARTS_AT_ONCE);
        let mut nodes = Vec::with_capacity(count);
        while let Some(n) = starts.next().await {
            nodes.push(n.context("a node could not join the master")?);
        }
        tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await??;
        drop(nodes);
        anyhow::Ok(())
    })
}

/// What a process said before it ended, from its log: the error a worker ended with (anyhow
/// prints it first, then the causes, then a backtrace), else the log's last five lines.
fn why(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    match s.find("Error:") {
        Some(from) => s[from..].lines().take(8).collect::<Vec<_>>().join("\n"),
        None => {
            let last: Vec<&str> = s.lines().rev().take(5).collect();
            last.into_iter().rev().collect::<Vec<_>>().join("\n")
        }
    }
}

/// A free loopback port for the metrics endpoint (the kernel's choice; a small race, fine
/// here: nothing else in this harness binds fixed ports).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
