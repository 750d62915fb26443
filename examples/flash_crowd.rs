//! The flash-crowd benchmark: one `shoal-master` and N `shoal fetch` processes (the release
//! binaries, real processes on loopback), all started at once on one file, with the master's
//! upload capped at 8 MiB/s and each node's at 4 MiB/s.
//!
//! Prints each node's completion time over the Kumar-Ross lower bound
//! (`max(F/u_s, N F/(u_s + N u))`, downloads unlimited), p50/p90/max of those, the origin
//! egress over F, and how long uploads sat idle: every 250 ms each node's uploaded-bytes
//! counter is read, and an interval counts as idle for a node that held at least one block
//! and did not upload while some other node was still downloading. That over-counts idleness
//! a little (the others may already hold what the idle node has), never under-counts it.
//!
//! `--lead MS` starts the first node MS ms before the others (from its spawn, so its own
//! start-up eats into the lead; all times count from its start), as on a busy machine where
//! processes start unevenly. `--keep` keeps the work dir: each node's `stderr.log` and
//! `report.json`, the master's `master.log`, `progress.csv` (every node's held and uploaded
//! bytes at each sample) and N+1 copies of the file.
//!
//! With `--idle SECS` it then lets the finished swarm seed for SECS more seconds and prints
//! the CPU it used meanwhile (from `/proc/<pid>/stat`, so on Linux only): what a swarm costs
//! while nothing moves (pings, gossip heartbeats, timers). All to all, that grows with the
//! square of the crowd, and it is spent during the crowd too.
//!
//! `bench/flash-crowd.sh [N] [MIB]` builds the release binaries and runs this.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_tests::procs::{master_bootstrap, metric, metrics, sha256_file, wait_for_file, Proc};

const MIB: u64 = 1 << 20;
const MASTER_RATE: u64 = 8 * MIB;
const NODE_RATE: u64 = 4 * MIB;
const SAMPLE: Duration = Duration::from_millis(250);

struct Args {
    nodes: usize,
    mib: u64,
    bin: PathBuf,
    limit: Duration,
    idle: Option<Duration>,
    block_size: Option<String>,
    keep: bool,
    lead: Duration,
}

fn args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut pos = Vec::new();
    let mut bin = None;
    let mut limit = Duration::from_secs(600);
    let mut idle = None;
    let mut block_size = None;
    let mut keep = false;
    let mut lead = Duration::ZERO;
    let secs = |v: Option<String>, flag: &str| -> Result<Duration> {
        Ok(Duration::from_secs(
            v.with_context(|| format!("{flag} needs seconds"))?
                .parse()
                .with_context(|| format!("{flag}: seconds"))?,
        ))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bin-dir" => bin = Some(PathBuf::from(it.next().context("--bin-dir needs a path")?)),
            "--limit" => limit = secs(it.next(), "--limit")?,
            "--idle" => {
                let span = secs(it.next(), "--idle")?;
                if span.is_zero() {
                    bail!("--idle: at least 1 second");
                }
                idle = Some(span);
            }
            "--keep" => keep = true,
            "--lead" => {
                let ms: u64 = it
                    .next()
                    .context("--lead needs milliseconds")?
                    .parse()
                    .context("--lead: milliseconds")?;
                lead = Duration::from_millis(ms);
            }
            "--block-size" => {
                block_size = Some(it.next().context("--block-size needs a number of bytes")?)
            }
            "-h" | "--help" => {
                println!(
                    "usage: flash_crowd [N=12] [MIB=64] [--bin-dir DIR] [--limit SECS] [--idle SECS]\n\
                     [--block-size BYTES] [--keep] [--lead MS]\n\
                     Runs a master (upload 8 MiB/s) and N fetch processes (upload 4 MiB/s each) \
                     from DIR (default: the directory above this binary, e.g. target/release).\n\
                     --limit SECS  give up when the crowd is not done by then (default 600)\n\
                     --idle SECS   then measure the finished swarm's CPU while it seeds for SECS\n\
                     --block-size BYTES  the file's block size (default: shoal-master add's)\n\
                     --keep        keep the work dir (logs, reports, progress.csv, and N+1 copies of the file) and say where\n\
                     --lead MS     start the first node MS ms before the others (times count from it)"
                );
                std::process::exit(0);
            }
            _ => pos.push(a),
        }
    }
    let nodes = pos
        .first()
        .map_or(Ok(12), |s| s.parse())
        .context("N: a node count")?;
    let mib = pos
        .get(1)
        .map_or(Ok(64), |s| s.parse())
        .context("MIB: a file size in MiB")?;
    if nodes == 0 || mib == 0 {
        bail!("N and MIB must be at least 1");
    }
    let bin = match bin {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("cannot find the target dir; pass --bin-dir")?
            .to_path_buf(),
    };
    for b in ["shoal", "shoal-master"] {
        if !bin.join(b).exists() {
            bail!(
                "{} is missing: build with `cargo build --release -p shoal-node -p shoal-master`",
                bin.join(b).display()
            );
        }
    }
    Ok(Args {
        nodes,
        mib,
        bin,
        limit,
        idle,
        block_size,
        keep,
        lead,
    })
}

/// A loopback port nobody listens on now (the kernel's choice; a small race, fine here).
/// A free loopback port below the kernel's ephemeral range (32768 and up by default): a port
/// from `bind(0)` is free only until it is released, and in a crowd of nodes another node's
/// `/tcp/0` listener or outgoing connection took it first often enough to end runs with
/// "serving metrics at ...: Address already in use".
fn free_port() -> Result<u16> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = 20_000 + (std::process::id() % 4_000) as u16;
    loop {
        let port = start + NEXT.fetch_add(1, Ordering::Relaxed);
        if port >= 32_768 {
            bail!("no free loopback port below 32768");
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Node {
    proc: Proc,
    metrics: String,
    out: PathBuf,
    report: PathBuf,
    finished: Option<f64>,
    uploaded: f64,
    idle_s: f64,
}

fn main() -> Result<()> {
    let a = args()?;
    let mut work = tempfile::Builder::new().prefix("shoal-crowd").tempdir()?;
    work.disable_cleanup(a.keep);
    let root = work.path();
    if a.keep {
        eprintln!("work dir (kept): {}", root.display());
    }
    let size = a.mib * MIB;
    let src = root.join("file.bin");
    shoal_tests::write_random_file(&src, size as usize, 7)?;

    // The master, with the file added before it starts (no rescan wait).
    let mdir = root.join("master");
    let mut add = Command::new(a.bin.join("shoal-master"));
    add.args(["add"]).arg(&src);
    if let Some(bs) = &a.block_size {
        add.args(["--block-size", bs]);
    }
    let added = add
        .arg("--data-dir")
        .arg(&mdir)
        .output()
        .context("running shoal-master add")?;
    if !added.status.success() {
        bail!(
            "shoal-master add failed: {}",
            String::from_utf8_lossy(&added.stderr)
        );
    }
    let id = String::from_utf8(added.stdout)?
        .lines()
        .last()
        .context("shoal-master add printed no file id")?
        .trim()
        .to_string();
    let mmetrics = format!("127.0.0.1:{}", free_port()?);
    let master = Proc(
        Command::new(a.bin.join("shoal-master"))
            .arg("--data-dir")
            .arg(&mdir)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(["--max-upload-rate", &MASTER_RATE.to_string()])
            .args(["--metrics-addr", &mmetrics])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join("master.log"))?)
            .spawn()
            .context("starting shoal-master")?,
    );
    let bootstrap = master_bootstrap(&mdir)?;

    // The crowd, all at once (the first one `--lead` earlier).
    let t0 = Instant::now();
    let mut nodes = Vec::new();
    for i in 0..a.nodes {
        let dir = root.join(format!("node{i}"));
        std::fs::create_dir_all(&dir)?;
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let out = dir.join("out.bin");
        let report = dir.join("report.json");
        let child = Command::new(a.bin.join("shoal"))
            .args(["fetch", &id, "--bootstrap", &bootstrap])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .arg("--data-dir")
            .arg(&dir)
            .arg("--out")
            .arg(&out)
            .arg("--report")
            .arg(&report)
            .args(["--max-upload-rate", &NODE_RATE.to_string()])
            .args(["--metrics-addr", &metrics])
            .args(["--seed-time", "3600", "--progress", "none"])
            .stdout(Stdio::null())
            // Kept so that a fetch that exits early can say why.
            .stderr(std::fs::File::create(dir.join("stderr.log"))?)
            .spawn()
            .context("starting shoal fetch")?;
        nodes.push(Node {
            proc: Proc(child),
            metrics,
            out,
            report,
            finished: None,
            uploaded: 0.0,
            idle_s: 0.0,
        });
        if i == 0 && !a.lead.is_zero() {
            std::thread::sleep(a.lead);
        }
    }

    // Watch: completion (the output is renamed into place once verified) and uploads. Each
    // sample goes to progress.csv (seconds since the start, node, held and uploaded bytes).
    let mut trace = std::io::BufWriter::new(std::fs::File::create(root.join("progress.csv"))?);
    writeln!(trace, "t_s,node,held_bytes,uploaded_bytes")?;
    let mut last = Instant::now();
    while nodes.iter().any(|n| n.finished.is_none()) {
        if t0.elapsed() > a.limit {
            bail!(
                "{} of {} nodes unfinished after {:?}",
                nodes.iter().filter(|n| n.finished.is_none()).count(),
                a.nodes,
                a.limit
            );
        }
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        for n in &mut nodes {
            if n.finished.is_none() && n.out.exists() {
                n.finished = Some(now.duration_since(t0).as_secs_f64());
            }
            if let Some(status) = n.proc.0.try_wait()? {
                if n.finished.is_none() {
                    let log = n.out.with_file_name("stderr.log");
                    let said = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = said.lines().rev().take(5).collect();
                    bail!(
                        "a fetch exited early with {status}; the end of its stderr:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
        if now.duration_since(last) < SAMPLE {
            continue;
        }
        let dt = now.duration_since(last).as_secs_f64();
        last = now;
        let downloading = nodes.iter().filter(|n| n.finished.is_none()).count();
        let t = now.duration_since(t0).as_secs_f64();
        for (i, n) in nodes.iter_mut().enumerate() {
            // A node that is not up yet (no metrics) counts as neither idle nor busy.
            // One scrape a node a sample: the scrapes cost the nodes CPU in the crowd.
            let Ok(page) = metrics(&n.metrics) else {
                continue;
            };
            let Ok(up) = page.get("shoal_node_piece_bytes_uploaded_total") else {
                continue;
            };
            let held = page.get("shoal_node_download_held_bytes").unwrap_or(0.0);
            writeln!(trace, "{t:.3},{i},{held},{up}")?;
            let others = downloading - usize::from(n.finished.is_none());
            if up <= n.uploaded && held > 0.0 && others > 0 {
                n.idle_s += dt;
            }
            n.uploaded = n.uploaded.max(up);
        }
    }

    trace.flush()?;

    // The finished swarm, seeding: nothing moves, so what it spends is its upkeep.
    // A failed reading is told, and the crowd's own results are still printed.
    let idle_cpu = a.idle.and_then(|span| {
        // Past the last Haves and transfer ends.
        std::thread::sleep(Duration::from_secs(2));
        let measured = swarm_cpu(&master, &nodes).and_then(|before| {
            std::thread::sleep(span);
            Ok((before, swarm_cpu(&master, &nodes)?))
        });
        match measured {
            Ok((before, after)) => Some((
                (after.0 - before.0) / span.as_secs_f64(),
                (after.1 - before.1) / span.as_secs_f64(),
                span,
            )),
            Err(e) => {
                eprintln!("--idle: {e:#}");
                None
            }
        }
    });
    let egress = metric(&mmetrics, "shoal_master_piece_bytes_sent_total")?;
    let want = sha256_file(&src)?;
    for (i, n) in nodes.iter().enumerate() {
        if sha256_file(&n.out)? != want {
            bail!("node {i}: output differs from the source");
        }
        wait_for_file(&n.report, Duration::from_secs(5))?;
    }
    drop(master);

    let f = size as f64;
    let n = a.nodes as f64;
    let bound = (f / MASTER_RATE as f64).max(n * f / (MASTER_RATE as f64 + n * NODE_RATE as f64));
    let mut over: Vec<f64> = nodes
        .iter()
        .map(|x| x.finished.unwrap_or(f64::NAN) / bound)
        .collect();
    over.sort_by(f64::total_cmp);
    let slowest = nodes
        .iter()
        .max_by(|x, y| {
            x.finished
                .unwrap_or(0.0)
                .total_cmp(&y.finished.unwrap_or(0.0))
        })
        .context("no nodes")?;
    let mut idle: Vec<f64> = nodes.iter().map(|x| x.idle_s).collect();
    idle.sort_by(f64::total_cmp);
    println!(
        "flash crowd: {} nodes, {} MiB in blocks of {}, master upload {} MiB/s, node upload {} MiB/s",
        a.nodes,
        a.mib,
        a.block_size.as_deref().unwrap_or("the default size"),
        MASTER_RATE / MIB,
        NODE_RATE / MIB
    );
    println!("lower bound       {bound:.2} s");
    println!(
        "completion/bound  p50 {:.3}  p90 {:.3}  max {:.3}",
        quantile(&over, 0.5),
        quantile(&over, 0.9),
        quantile(&over, 1.0)
    );
    println!("origin egress     {:.3} F", egress / f);
    println!(
        "upload idle       slowest node {:.1} s, median node {:.1} s (while it held blocks and others downloaded)",
        slowest.idle_s,
        quantile(&idle, 0.5)
    );
    if let Some((master_cpu, nodes_cpu, span)) = idle_cpu {
        println!(
            "idle swarm CPU    nodes {:.1} ms/s each, master {:.1} ms/s (seeding, over {} s)",
            1e3 * nodes_cpu / n,
            1e3 * master_cpu,
            span.as_secs()
        );
    }
    Ok(())
}

/// CPU seconds the master and all the nodes have used so far (user + system).
fn swarm_cpu(master: &Proc, nodes: &[Node]) -> Result<(f64, f64)> {
    let mut all = 0.0;
    for n in nodes {
        all += process_cpu(n.proc.0.id())?;
    }
    Ok((process_cpu(master.0.id())?, all))
}

/// CPU seconds process `pid` has used (user + system), from `/proc/<pid>/stat`.
fn process_cpu(pid: u32) -> Result<f64> {
    shoal_sim::live::pid_cpu_s(pid)
        .with_context(|| format!("cannot read /proc/{pid}/stat (--idle needs Linux)"))
}
