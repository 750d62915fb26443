//! A run's results: `summary.json`, `nodes.csv` and the text summary.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::engine::{Outcome, Role};
use crate::scenario::Scenario;

/// The summary of one run (`summary.json`). In the virtual engine every field but `wall_s`
/// depends only on the scenario, the policy and the seed.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// `virtual` or `live`.
    pub engine: String,
    /// `shoal`, `origin-only` or `random-holder`.
    pub policy: String,
    /// The random seed.
    pub seed: u64,
    /// Nodes in all.
    pub nodes: usize,
    /// Nodes following the protocol.
    pub honest_nodes: usize,
    /// Honest nodes that got the whole file.
    pub completed: usize,
    /// Every honest node completed and no block from a corrupting source was accepted.
    pub all_verified: bool,
    /// File size, bytes.
    pub file_bytes: u64,
    /// Bytes the master sent.
    pub origin_bytes: u64,
    /// `origin_bytes / file_bytes`: copies of the file the origin sent.
    pub origin_egress_ratio: f64,
    /// Blocks the master delivered more than once (second and later deliveries).
    pub origin_resent_blocks: u64,
    /// Bytes sent between nodes.
    pub peer_bytes: u64,
    /// Kumar-Ross: `max(F/u_s, F/d_min, N F/(u_s + sum u_i))` with this run's capacities.
    pub lower_bound_s: f64,
    /// Median completion time (finish minus arrival) of honest nodes that completed.
    pub completion_p50_s: f64,
    /// 99th percentile.
    pub completion_p99_s: f64,
    /// Slowest.
    pub completion_max_s: f64,
    /// p50 over the bound.
    pub p50_over_bound: f64,
    /// p99 over the bound.
    pub p99_over_bound: f64,
    /// Slowest over the bound.
    pub max_over_bound: f64,
    /// Share of peer bytes sent inside a region.
    pub intra_region_share: f64,
    /// Nodes banned.
    pub banned: usize,
    /// Honest nodes banned (should be 0).
    pub honest_banned: usize,
    /// Misbehaving nodes (by scenario).
    pub misbehaving: usize,
    /// Transfers that ended early, all nodes.
    pub retries: u64,
    /// Virtual time at the end, seconds.
    pub virtual_s: f64,
    /// Whether the run hit the scenario's time limit.
    pub hit_limit: bool,
    /// Events processed.
    pub events: u64,
    /// Wall-clock time of the run, seconds (the one field that differs between runs).
    pub wall_s: f64,
    /// Live engine: the share of this machine's cores the run kept busy (process CPU time
    /// over wall time and cores). At [`CPU_BOUND`] or more the run was short of CPU, and its
    /// times are this machine's as much as the scenario's. `null` in the virtual engine.
    pub cpu_busy: Option<f64>,
}

/// A live run that kept this share of the cores busy was CPU-bound.
pub const CPU_BOUND: f64 = 0.85;

fn round(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1e4).round() / 1e4
    } else {
        x
    }
}

/// The `p`-quantile (0..=1) by nearest rank of sorted `v`; NaN when empty.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Completion times of honest nodes that completed, sorted.
pub fn completions(o: &Outcome) -> Vec<f64> {
    let mut c: Vec<f64> = o
        .nodes
        .iter()
        .filter(|n| n.role == Role::Honest)
        .filter_map(|n| n.finish_s.map(|f| f - n.start_s))
        .collect();
    c.sort_by(f64::total_cmp);
    c
}

/// The lower bound for the capacities this run drew.
pub fn run_bound(sc: &Scenario, o: &Outcome) -> f64 {
    let ups: Vec<f64> = o.nodes.iter().map(|n| n.upload).collect();
    let downs: Vec<f64> = o.nodes.iter().map(|n| n.download).collect();
    crate::bound::kumar_ross(sc.file.size.0 as f64, sc.master.upload.0, &ups, &downs)
}

impl Summary {
    /// Summarises a run.
    pub fn new(
        sc: &Scenario,
        o: &Outcome,
        engine: &str,
        policy: &str,
        seed: u64,
        wall_s: f64,
    ) -> Self {
        let c = completions(o);
        let bound = run_bound(sc, o);
        let honest = o.nodes.iter().filter(|n| n.role == Role::Honest).count();
        let f = sc.file.size.0;
        let (p50, p99, max) = (quantile(&c, 0.5), quantile(&c, 0.99), quantile(&c, 1.0));
        Self {
            scenario: sc.name.clone(),
            engine: engine.into(),
            policy: policy.into(),
            seed,
            nodes: o.nodes.len(),
            honest_nodes: honest,
            completed: c.len(),
            all_verified: c.len() == honest && o.nodes.iter().all(|n| n.bad_blocks == 0),
            file_bytes: f,
            origin_bytes: o.origin_bytes,
            origin_egress_ratio: round(o.origin_bytes as f64 / f as f64),
            origin_resent_blocks: o.origin_resent_blocks,
            peer_bytes: o.peer_bytes,
            lower_bound_s: round(bound),
            completion_p50_s: round(p50),
            completion_p99_s: round(p99),
            completion_max_s: round(max),
            p50_over_bound: round(p50 / bound),
            p99_over_bound: round(p99 / bound),
            max_over_bound: round(max / bound),
            intra_region_share: round(if o.peer_bytes == 0 {
                0.0
            } else {
                o.peer_bytes_intra as f64 / o.peer_bytes as f64
            }),
            banned: o.nodes.iter().filter(|n| n.banned).count(),
            honest_banned: o
                .nodes
                .iter()
                .filter(|n| n.banned && n.role == Role::Honest)
                .count(),
            misbehaving: o.nodes.len() - honest,
            retries: o.nodes.iter().map(|n| n.retries).sum(),
            virtual_s: round(o.virtual_s),
            hit_limit: o.hit_limit,
            events: o.events,
            wall_s: round(wall_s),
            cpu_busy: None,
        }
    }

    /// Records the share of the cores a live run kept busy.
    pub fn with_cpu_busy(mut self, busy: Option<f64>) -> Self {
        self.cpu_busy = busy.map(round);
        self
    }

    /// Whether the run was short of CPU (see [`Summary::cpu_busy`]).
    pub fn cpu_bound(&self) -> bool {
        self.cpu_busy.is_some_and(|b| b >= CPU_BOUND)
    }

    /// This run's row under [`ROW_HEADER`].
    pub fn row(&self) -> String {
        format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            self.policy,
            self.nodes,
            self.completed,
            self.lower_bound_s,
            self.completion_p50_s,
            self.completion_p99_s,
            self.completion_max_s,
            self.p50_over_bound,
            self.p99_over_bound,
            self.max_over_bound,
            self.origin_egress_ratio,
            self.intra_region_share,
            self.banned,
            self.honest_banned,
            self.wall_s
        )
    }

    /// The one-screen text summary.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "scenario {}  engine {}  policy {}  seed {}",
            self.scenario, self.engine, self.policy, self.seed
        );
        let _ = writeln!(
            s,
            "nodes {} ({} honest, {} misbehaving)   completed {}/{}   all verified: {}",
            self.nodes,
            self.honest_nodes,
            self.misbehaving,
            self.completed,
            self.honest_nodes,
            if self.all_verified { "yes" } else { "NO" }
        );
        let _ = writeln!(
            s,
            "lower bound (Kumar-Ross)   {:>10.2} s",
            self.lower_bound_s
        );
        for (name, v, r) in [
            ("completion p50", self.completion_p50_s, self.p50_over_bound),
            ("completion p99", self.completion_p99_s, self.p99_over_bound),
            ("completion max", self.completion_max_s, self.max_over_bound),
        ] {
            let _ = writeln!(s, "{name:<26} {v:>10.2} s   {r:>6.3} x bound");
        }
        let _ = writeln!(
            s,
            "origin egress              {:>10.3} x F   ({} bytes, {} blocks sent again)",
            self.origin_egress_ratio, self.origin_bytes, self.origin_resent_blocks
        );
        let _ = writeln!(
            s,
            "peer bytes                 {:>10}   intra-region share {:.1}%",
            self.peer_bytes,
            self.intra_region_share * 100.0
        );
        let _ = writeln!(
            s,
            "banned                     {:>10}   honest banned {}",
            self.banned, self.honest_banned
        );
        let _ = writeln!(
            s,
            "retries {}   virtual {:.1} s{}   events {}   wall {:.2} s",
            self.retries,
            self.virtual_s,
            if self.hit_limit {
                " (time limit hit)"
            } else {
                ""
            },
            self.events,
            self.wall_s
        );
        if let Some(busy) = self.cpu_busy {
            let _ = writeln!(
                s,
                "cpu busy                   {:>9.0}% of the cores",
                busy * 100.0
            );
            if self.cpu_bound() {
                let _ = writeln!(
                    s,
                    "WARNING: the live engine was short of CPU: its times are this machine's as \
                     much as the scenario's (fewer nodes, or slower links, give times to trust)"
                );
            }
        }
        s
    }
}

/// The columns of one run in `policies.csv` and `sweep.csv` (after the sweep's key and value).
pub const ROW_HEADER: &str = "policy,nodes,completed,lower_bound_s,completion_p50_s,\
     completion_p99_s,completion_max_s,p50_over_bound,p99_over_bound,max_over_bound,\
     origin_egress_ratio,intra_region_share,banned,honest_banned,wall_s";

/// A run beside its baselines (same scenario, engine and seed), one line per policy: times
/// over the lower bound, origin egress, the share of peer bytes kept in a region.
pub fn beside(runs: &[&Summary]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<15} {:>10} {:>10} {:>10} {:>14} {:>13}",
        "policy", "p50/bound", "p99/bound", "max/bound", "origin egress", "intra-region"
    );
    for r in runs {
        let _ = writeln!(
            s,
            "{:<15} {:>10.3} {:>10.3} {:>10.3} {:>12.3} F {:>12.1}%",
            r.policy,
            r.p50_over_bound,
            r.p99_over_bound,
            r.max_over_bound,
            r.origin_egress_ratio,
            r.intra_region_share * 100.0
        );
    }
    s
}

/// How far `b` is from `a`, relative to `a`: `|b - a| / |a|` (infinite when `a` is 0 and `b`
/// is not).
pub fn relative_difference(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (b - a).abs() / a.abs()
    }
}

/// The agreement of two runs of one scenario (`compare`): p50 completion and origin egress of
/// each, and the live run's difference relative to the virtual one.
pub fn agreement(virt: &Summary, live: &Summary) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "scenario {}  policy {}  seed {}  nodes {}",
        virt.scenario, virt.policy, virt.seed, virt.nodes
    );
    let _ = writeln!(
        s,
        "{:<22} {:>12} {:>12} {:>11}",
        "", virt.engine, live.engine, "difference"
    );
    for (name, a, b, unit) in [
        (
            "completion p50",
            virt.completion_p50_s,
            live.completion_p50_s,
            "s",
        ),
        (
            "origin egress",
            virt.origin_egress_ratio,
            live.origin_egress_ratio,
            "F",
        ),
        (
            "completion max",
            virt.completion_max_s,
            live.completion_max_s,
            "s",
        ),
    ] {
        let _ = writeln!(
            s,
            "{name:<22} {a:>10.3} {unit} {b:>10.3} {unit} {:>10.1}%",
            relative_difference(a, b) * 100.0
        );
    }
    let _ = writeln!(
        s,
        "{:<22} {:>12} {:>12}",
        "completed",
        format!("{}/{}", virt.completed, virt.honest_nodes),
        format!("{}/{}", live.completed, live.honest_nodes)
    );
    let _ = writeln!(
        s,
        "{:<22} {:>12} {:>12}",
        "all verified", virt.all_verified, live.all_verified
    );
    let _ = writeln!(
        s,
        "{:<22} {:>10.2} s {:>10.2} s",
        "wall", virt.wall_s, live.wall_s
    );
    if live.cpu_bound() {
        let _ = writeln!(
            s,
            "the live run was short of CPU ({:.0}% of the cores busy): where the engines differ, \
             this machine may be why",
            live.cpu_busy.unwrap_or(0.0) * 100.0
        );
    }
    s
}

/// `nodes.csv`: one row per node.
pub fn nodes_csv(o: &Outcome) -> String {
    let mut s = String::from(
        "node,region,role,upload_bytes_per_s,download_bytes_per_s,start_s,finish_s,completion_s,\
         bytes_from_master,bytes_from_peers,bytes_uploaded,retries,banned\n",
    );
    for (i, n) in o.nodes.iter().enumerate() {
        let (finish, completion) = match n.finish_s {
            Some(f) => (format!("{f:.6}"), format!("{:.6}", f - n.start_s)),
            None => (String::new(), String::new()),
        };
        let _ = writeln!(
            s,
            "{i},{},{},{:.0},{:.0},{:.6},{finish},{completion},{},{},{},{},{}",
            csv_field(&n.region),
            n.role.name(),
            n.upload,
            n.download,
            n.start_s,
            n.from_master,
            n.from_peers,
            n.uploaded,
            n.retries,
            n.banned
        );
    }
    s
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Writes `summary.json` and `nodes.csv` into `dir`.
pub fn write(dir: &Path, summary: &Summary, o: &Outcome) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(summary).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("summary.json"), json + "\n")?;
    std::fs::write(dir.join("nodes.csv"), nodes_csv(o))?;
    Ok(())
}
