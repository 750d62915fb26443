//! `shoal-sim`: run a scenario, sweep a key, or compare engines.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use shoal_sim::plot;
use shoal_sim::report::Summary;
use shoal_sim::{PolicyKind, Scenario};

#[derive(Parser)]
#[command(
    name = "shoal-sim",
    about = "swarm simulations of shoal, with the lower bound beside every result"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Engine {
    /// Discrete events in virtual time.
    Virtual,
    /// The real master and node services in one process, on loopback, in real time (the
    /// shoal policy only).
    Live,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs one scenario and writes summary.json, nodes.csv and plots into --out.
    Run {
        /// The scenario file (TOML).
        scenario: PathBuf,
        /// Which engine.
        #[arg(long, value_enum, default_value = "virtual")]
        engine: Engine,
        /// shoal, origin-only or random-holder.
        #[arg(long, default_value = "shoal")]
        policy: PolicyKind,
        /// Where to write the results.
        #[arg(long)]
        out: PathBuf,
        /// The random seed (default: the scenario's).
        #[arg(long)]
        seed: Option<u64>,
        /// Also runs the other two policies on the same scenario and seed (the baselines,
        /// virtual engine only) and puts them beside the result: their lines in the plots and
        /// the text summary, policies.csv (one row per policy), and each one's own files
        /// under DIR/origin-only/ and DIR/random-holder/.
        #[arg(long)]
        baselines: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Runs a scenario once per value of a key (and per policy) and writes sweep.csv and plots.
    Sweep {
        /// The scenario file (TOML).
        scenario: PathBuf,
        /// `key=v1,v2,...`: any scenario key, dotted (`master.upload`, `group.0.count`,
        /// `chaos.corrupt`), or `nodes` for the total node count.
        #[arg(long)]
        vary: String,
        /// Policies, comma-separated.
        #[arg(long, default_value = "shoal", value_delimiter = ',')]
        policy: Vec<PolicyKind>,
        /// Where to write the results.
        #[arg(long)]
        out: PathBuf,
        /// The random seed (default: the scenario's).
        #[arg(long)]
        seed: Option<u64>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Runs a scenario in both engines and prints how far they differ on p50 completion and
    /// origin egress. The live engine runs the real master, so only `--policy shoal`.
    Compare {
        /// The scenario file (TOML).
        scenario: PathBuf,
        /// Only shoal: the live engine runs the real master (the baselines are virtual-only).
        #[arg(long, default_value = "shoal")]
        policy: PolicyKind,
        /// Where to write both runs' results (virtual/ and live/).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The random seed (default: the scenario's).
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn progress_bar(quiet: bool, total: usize) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} nodes done  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Runs one scenario in the virtual engine.
fn run_virtual(
    sc: &Scenario,
    policy: PolicyKind,
    seed: u64,
    quiet: bool,
) -> Result<(Summary, shoal_sim::Outcome)> {
    let pb = progress_bar(quiet, sc.nodes());
    let started = Instant::now();
    let outcome = shoal_sim::run(sc, policy, seed, &mut |p| {
        pb.set_length(p.honest as u64);
        pb.set_position(p.done as u64);
        pb.set_message(format!("virtual {:.1} s", p.virtual_s));
        if std::env::var_os("SHOAL_SIM_TRACE").is_some() {
            eprintln!(
                "{} / {} done, virtual {:.3} s",
                p.done, p.honest, p.virtual_s
            );
        }
    })?;
    pb.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    let summary = Summary::new(sc, &outcome, "virtual", policy.name(), seed, wall);
    Ok((summary, outcome))
}

/// The live engine runs the real master: its policy is shoal, the baselines exist only in the
/// virtual engine.
fn check_live_policy(policy: PolicyKind) -> Result<()> {
    if policy != PolicyKind::Shoal {
        bail!(
            "the live engine runs the real master, whose policy is shoal; --policy {} is \
             virtual-only (use --engine virtual)",
            policy.name()
        );
    }
    Ok(())
}

/// Runs one scenario in the live engine (the real master: `shoal` policy only).
fn run_live(
    sc: &Scenario,
    policy: PolicyKind,
    seed: u64,
    quiet: bool,
) -> Result<(Summary, shoal_sim::Outcome)> {
    check_live_policy(policy)?;
    let pb = progress_bar(quiet, sc.nodes());
    let started = Instant::now();
    let cpu_before = shoal_sim::live::process_cpu_s();
    let outcome = shoal_sim::live::run(sc, seed, None, &mut |p| {
        pb.set_length(p.honest as u64);
        pb.set_position(p.done as u64);
        pb.set_message(format!("live {:.1} s", p.virtual_s));
    })?;
    pb.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    let busy = cpu_before
        .zip(shoal_sim::live::process_cpu_s())
        .map(|(before, after)| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (after - before) / (wall * cores as f64).max(1e-9)
        });
    let summary = Summary::new(sc, &outcome, "live", policy.name(), seed, wall).with_cpu_busy(busy);
    Ok((summary, outcome))
}

/// Runs `sc` in both engines, writes each run into `out/virtual` and `out/live`, and prints
/// how far they differ.
fn compare(path: &Path, policy: PolicyKind, out: Option<PathBuf>, seed: Option<u64>) -> Result<()> {
    let sc = Scenario::load(path)?;
    let seed = seed.unwrap_or(sc.seed);
    check_live_policy(policy)?;
    let (v, vo) = run_virtual(&sc, policy, seed, false)?;
    let (l, lo) = run_live(&sc, policy, seed, false)?;
    if let Some(out) = &out {
        write_all(&out.join("virtual"), &sc, &[(&v, &vo)])?;
        write_all(&out.join("live"), &sc, &[(&l, &lo)])?;
    }
    print!("{}", shoal_sim::report::agreement(&v, &l));
    if let Some(out) = out {
        println!(
            "wrote {} and {}",
            out.join("virtual").display(),
            out.join("live").display()
        );
    }
    Ok(())
}

/// Writes the first run's files into `dir`; the plots of completion and master egress carry
/// every run given (the first and its baselines).
fn write_all(dir: &Path, sc: &Scenario, runs: &[(&Summary, &shoal_sim::Outcome)]) -> Result<()> {
    let Some(&(summary, outcome)) = runs.first() else {
        return Ok(());
    };
    shoal_sim::report::write(dir, summary, outcome)
        .with_context(|| format!("writing results into {}", dir.display()))?;
    let label = |s: &Summary| format!("{} ({})", s.policy, s.engine);
    let times: Vec<(String, Vec<f64>)> = runs
        .iter()
        .map(|(s, o)| (label(s), shoal_sim::report::completions(o)))
        .collect();
    plot::completion_cdf(
        &dir.join("completion_cdf"),
        &format!("{}: completion times, {} nodes", sc.name, summary.nodes),
        &times,
        summary.lower_bound_s,
    )?;
    let egress: Vec<(String, Vec<f64>)> = runs
        .iter()
        .map(|(s, o)| (label(s), o.master_egress.clone()))
        .collect();
    plot::master_egress(
        &dir.join("master_egress"),
        &format!(
            "{}: master egress ({:.3} x F in all)",
            sc.name, summary.origin_egress_ratio
        ),
        &egress,
        sc.master.upload.0,
    )?;
    let f = sc.file.size.0 as f64;
    let copies: Vec<f64> = outcome
        .nodes
        .iter()
        .map(|n| n.uploaded as f64 / f)
        .collect();
    plot::upload_distribution(
        &dir.join("upload_distribution"),
        &format!("{}: upload per node", sc.name),
        &copies,
    )?;
    Ok(())
}

fn sweep(
    path: &Path,
    vary: &str,
    policies: &[PolicyKind],
    out: &Path,
    seed: Option<u64>,
    quiet: bool,
) -> Result<()> {
    let (key, values) = vary.split_once('=').context("--vary wants key=v1,v2,...")?;
    let values: Vec<String> = values
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    if values.is_empty() {
        bail!("--vary {key}= lists no values");
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    std::fs::create_dir_all(out)?;
    let mut csv = format!("key,value,{}\n", shoal_sim::report::ROW_HEADER);
    let mut p50: Vec<(String, Vec<f64>)> = Vec::new();
    let mut maxes: Vec<(String, Vec<f64>)> = Vec::new();
    let mut egress: Vec<(String, Vec<f64>)> = Vec::new();
    for policy in policies {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut c = Vec::new();
        for v in &values {
            let sc = Scenario::parse_varied(&text, &path.display().to_string(), key, v)?;
            let seed = seed.unwrap_or(sc.seed);
            let (s, outcome) = run_virtual(&sc, *policy, seed, quiet)?;
            let dir = out.join(format!("{}-{}", policy.name(), sanitize(v)));
            write_all(&dir, &sc, &[(&s, &outcome)])?;
            if !quiet {
                eprintln!(
                    "{key}={v} {policy}: p50 {:.3}x, max {:.3}x bound, origin {:.3} F, wall {:.1} s",
                    s.p50_over_bound, s.max_over_bound, s.origin_egress_ratio, s.wall_s
                );
            }
            csv.push_str(&format!("{key},{},{}\n", csv_quote(v), s.row()));
            a.push(s.p50_over_bound);
            b.push(s.max_over_bound);
            c.push(s.origin_egress_ratio);
        }
        p50.push((format!("{policy} p50"), a));
        maxes.push((format!("{policy} max"), b));
        egress.push((policy.name().to_string(), c));
    }
    std::fs::write(out.join("sweep.csv"), csv)?;
    let mut completion = p50;
    completion.extend(maxes);
    plot::against_key(
        &out.join("sweep_completion"),
        "completion over the lower bound",
        key,
        "completion / lower bound",
        &values,
        &completion,
        Some(1.0),
    )?;
    plot::against_key(
        &out.join("sweep_origin_egress"),
        "origin egress",
        key,
        "copies of the file sent by the master",
        &values,
        &egress,
        Some(1.0),
    )?;
    println!("wrote {}", out.join("sweep.csv").display());
    Ok(())
}

fn sanitize(v: &str) -> String {
    v.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn csv_quote(v: &str) -> String {
    if v.contains([',', '"']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The live engine's master and nodes log through tracing (RUST_LOG).
    // A peer closing its end first (the peer budget does that) is no warning.
    shoal_net::cli::init_logging("warn,yamux::connection=error");
    match cli.cmd {
        Cmd::Run {
            scenario,
            engine,
            policy,
            out,
            seed,
            baselines,
            quiet,
        } => {
            let sc = Scenario::load(&scenario)?;
            let seed = seed.unwrap_or(sc.seed);
            if baselines && engine == Engine::Live {
                bail!(
                    "--baselines runs in the virtual engine only (the live engine runs the \
                     real master, whose policy is shoal); `compare` sets the two engines side \
                     by side"
                );
            }
            let (summary, outcome) = match engine {
                Engine::Virtual => run_virtual(&sc, policy, seed, quiet)?,
                Engine::Live => run_live(&sc, policy, seed, quiet)?,
            };
            let mut others = Vec::new();
            if baselines {
                for other in PolicyKind::ALL.into_iter().filter(|p| *p != policy) {
                    let (s, o) = run_virtual(&sc, other, seed, quiet)?;
                    write_all(&out.join(other.name()), &sc, &[(&s, &o)])?;
                    others.push((s, o));
                }
            }
            let mut runs = vec![(&summary, &outcome)];
            runs.extend(others.iter().map(|(s, o)| (s, o)));
            write_all(&out, &sc, &runs)?;
            print!("{}", summary.text());
            if baselines {
                let rows: Vec<&Summary> = runs.iter().map(|(s, _)| *s).collect();
                let csv: String = std::iter::once(shoal_sim::report::ROW_HEADER.to_string())
                    .chain(rows.iter().map(|s| s.row()))
                    .map(|l| l + "\n")
                    .collect();
                std::fs::write(out.join("policies.csv"), csv)?;
                print!("\n{}", shoal_sim::report::beside(&rows));
            }
            println!("wrote {}", out.display());
        }
        Cmd::Sweep {
            scenario,
            vary,
            policy,
            out,
            seed,
            quiet,
        } => sweep(&scenario, &vary, &policy, &out, seed, quiet)?,
        Cmd::Compare {
            scenario,
            policy,
            out,
            seed,
        } => compare(&scenario, policy, out, seed)?,
    }
    Ok(())
}
