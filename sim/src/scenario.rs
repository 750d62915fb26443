//! Scenario files: what swarm to simulate, in TOML.
//!
//! Sizes are strings with a unit (`"650MiB"`, `"64KiB"`, `"1GB"`), rates are strings with a
//! unit per second (`"8MiB/s"`, `"100Mbit/s"`, `"1Gbit/s"`), latencies are one-way
//! milliseconds. Unknown keys are errors, and every error names the key, the line and what is
//! allowed (the `toml` crate adds the line and column to the messages built here).
//!
//! ```toml
//! name = "flash-12"
//! seed = 1
//! [file]
//! size = "64MiB"
//! block = "64KiB"
//! [master]
//! upload = "8MiB/s"
//! [[group]]
//! count = 12
//! upload = "4MiB/s"
//! download = "1Gbit/s"
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer};

/// Why a scenario cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or a key or value is not allowed (with line and column).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, where, and what is allowed.
        message: String,
    },
    /// The values parse but do not make a swarm.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// A `--vary key=value` could not be applied.
    #[error("--vary {key}: {message}")]
    Vary {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// A size in bytes, written with a unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Size(pub u64);

/// A rate in bytes per second, written with a unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate(pub f64);

const SIZE_UNITS: &str = "B, KiB, MiB, GiB, KB, MB, GB (e.g. \"650MiB\")";
const RATE_UNITS: &str =
    "B/s, KiB/s, MiB/s, GiB/s, KB/s, MB/s, GB/s, kbit/s, Mbit/s, Gbit/s (e.g. \"8MiB/s\")";

fn split_number(s: &str) -> Option<(f64, &str)> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    let number: String = s[..end].chars().filter(|c| *c != '_').collect();
    let value: f64 = number.parse().ok()?;
    Some((value, s[end..].trim()))
}

fn size_factor(unit: &str) -> Option<f64> {
    Some(match unit {
        "B" | "" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return None,
    })
}

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad size {s:?}; a number and one of {SIZE_UNITS}");
        let (v, unit) = split_number(s).ok_or_else(bad)?;
        let f = size_factor(unit).ok_or_else(bad)?;
        let bytes = v * f;
        if !(bytes.is_finite() && (1.0..1e15).contains(&bytes)) {
            return Err(format!("size {s:?} out of range (1 B to 1 PB)"));
        }
        Ok(Size(bytes.round() as u64))
    }
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad rate {s:?}; a number and one of {RATE_UNITS}");
        let (v, unit) = split_number(s).ok_or_else(bad)?;
        let unit = unit.strip_suffix("/s").ok_or_else(bad)?;
        let f = match unit {
            "kbit" | "Kbit" => 1e3 / 8.0,
            "Mbit" => 1e6 / 8.0,
            "Gbit" => 1e9 / 8.0,
            other => size_factor(other)
                .filter(|_| !other.is_empty())
                .ok_or_else(bad)?,
        };
        let r = v * f;
        if !(r.is_finite() && r > 0.0 && r < 1e13) {
            return Err(format!("rate {s:?} out of range (above 0, below 10 TB/s)"));
        }
        Ok(Rate(r))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A capacity: one rate for every node of a group, or drawn per node.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(
    untagged,
    expecting = "a rate such as \"4MiB/s\", { min = .., max = .. } or a list of rates"
)]
pub enum Capacity {
    /// The same for every node.
    Fixed(Rate),
    /// Uniform between two rates.
    Uniform {
        /// Lowest.
        min: Rate,
        /// Highest.
        max: Rate,
    },
    /// One of these, with equal chance.
    Choice(Vec<Rate>),
}

impl Capacity {
    /// The lowest rate a node can get.
    pub fn min(&self) -> f64 {
        match self {
            Self::Fixed(r) => r.0,
            Self::Uniform { min, max } => min.0.min(max.0),
            Self::Choice(v) => v.iter().map(|r| r.0).fold(f64::INFINITY, f64::min),
        }
    }

    /// Draws one node's rate.
    pub fn draw(&self, rng: &mut impl rand::Rng) -> f64 {
        match self {
            Self::Fixed(r) => r.0,
            Self::Uniform { min, max } => {
                let (a, b) = (min.0.min(max.0), min.0.max(max.0));
                if a == b {
                    a
                } else {
                    rng.gen_range(a..b)
                }
            }
            Self::Choice(v) => v[rng.gen_range(0..v.len())].0,
        }
    }
}

/// The file every node fetches.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Its size.
    pub size: Size,
    /// Its block size (the unit of verification and of the master's bookkeeping).
    #[serde(default = "default_block")]
    pub block: Size,
}

fn default_block() -> Size {
    Size(64 * 1024)
}

/// The master.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterSpec {
    /// Its upload capacity.
    pub upload: Rate,
    /// Its region.
    #[serde(default)]
    pub region: String,
    /// Concurrent piece uploads (over that: the stream is dropped).
    #[serde(default = "default_master_slots")]
    pub upload_slots: usize,
    /// Whether the policy is told `upload`, as `shoal-master --max-upload-rate` tells it
    /// (default). `false`: a master without the flag whose link is the limit; the policy
    /// then goes by what the master sent lately.
    #[serde(default = "default_rate_known")]
    pub rate_known: bool,
}

fn default_rate_known() -> bool {
    true
}

fn default_master_slots() -> usize {
    64
}

/// A group of alike nodes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// How many.
    pub count: usize,
    /// Their region.
    #[serde(default)]
    pub region: String,
    /// Upload capacity of each.
    pub upload: Capacity,
    /// Download capacity of each.
    pub download: Capacity,
    /// Concurrent piece uploads per node (over that: `Busy`).
    #[serde(default = "default_node_slots")]
    pub upload_slots: usize,
    /// When the group starts arriving, seconds (flash: all then; poisson: from then on).
    #[serde(default)]
    pub start_s: f64,
    /// Every node of the group misbehaves this way (besides the `[chaos]` shares).
    pub chaos: Option<ChaosMode>,
}

/// A misbehaviour, as the node's `--chaos` modes name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChaosMode {
    /// Serves a flipped byte in every block.
    Corrupt,
    /// Claims every block, holds none.
    LieHave,
    /// Accepts piece requests and sends nothing.
    Stall,
    /// Reports every peer it downloaded from as corrupt.
    FalseAccuse,
}

fn default_node_slots() -> usize {
    16
}

/// One-way latencies, in milliseconds.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySpec {
    /// Inside a region.
    #[serde(default = "default_intra_ms")]
    pub intra_ms: f64,
    /// Between regions not listed in `between`.
    #[serde(default = "default_inter_ms")]
    pub inter_ms: f64,
    /// Per pair of regions, `"a-b" = ms` (either order).
    #[serde(default)]
    pub between: BTreeMap<String, f64>,
}

fn default_intra_ms() -> f64 {
    1.0
}

fn default_inter_ms() -> f64 {
    40.0
}

impl Default for LatencySpec {
    fn default() -> Self {
        Self {
            intra_ms: default_intra_ms(),
            inter_ms: default_inter_ms(),
            between: BTreeMap::new(),
        }
    }
}

impl LatencySpec {
    /// One-way latency between two regions, in seconds.
    pub fn between(&self, a: &str, b: &str) -> f64 {
        if a == b {
            return self.intra_ms / 1000.0;
        }
        let ms = self
            .between
            .get(&format!("{a}-{b}"))
            .or_else(|| self.between.get(&format!("{b}-{a}")))
            .copied()
            .unwrap_or(self.inter_ms);
        ms / 1000.0
    }
}

/// When nodes arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ArrivalMode {
    /// All at time 0 (a flash crowd).
    #[default]
    Flash,
    /// A Poisson process of `rate` nodes per second.
    Poisson,
}

/// Arrivals.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ArrivalSpec {
    /// `flash` or `poisson`.
    #[serde(default)]
    pub mode: ArrivalMode,
    /// Nodes per second, for `poisson`.
    #[serde(default)]
    pub rate: f64,
}

/// Churn: nodes leaving and coming back.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChurnSpec {
    /// Per online node, leaves per second (0: no churn).
    #[serde(default)]
    pub leave_rate: f64,
    /// Per offline node, returns per second (0: gone for good).
    #[serde(default)]
    pub rejoin_rate: f64,
    /// Share of leaves that are crashes (no goodbye) rather than clean leaves.
    #[serde(default = "default_crash_fraction")]
    pub crash_fraction: f64,
    /// How long the master takes to notice a crash (its pings failing), seconds.
    #[serde(default = "default_crash_detect")]
    pub crash_detect_s: f64,
}

fn default_crash_fraction() -> f64 {
    0.5
}

fn default_crash_detect() -> f64 {
    20.0
}

impl Default for ChurnSpec {
    fn default() -> Self {
        Self {
            leave_rate: 0.0,
            rejoin_rate: 0.0,
            crash_fraction: default_crash_fraction(),
            crash_detect_s: default_crash_detect(),
        }
    }
}

/// Shares of misbehaving nodes, by chaos mode (the node's `--chaos` modes).
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ChaosSpec {
    /// Serve a flipped byte in every block.
    #[serde(default)]
    pub corrupt: f64,
    /// Claim every block while holding none.
    #[serde(default)]
    pub lie_have: f64,
    /// Accept piece requests and send nothing.
    #[serde(default)]
    pub stall: f64,
    /// Report every peer downloaded from as corrupt.
    #[serde(default)]
    pub false_accuse: f64,
}

/// Overrides of the master policy's tunables (defaults: `PolicyConfig::default()`).
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Largest master piece, blocks.
    pub max_master_piece: Option<u32>,
    /// Largest master piece for a requester with a large share (a lone fetch), blocks.
    pub lone_master_piece: Option<u32>,
    /// Smallest master piece, blocks.
    pub min_master_piece: Option<u32>,
    /// Most master pieces per answer.
    pub max_master_pieces: Option<u32>,
    /// Master load at which its piece halves, blocks.
    pub master_load_half: Option<u32>,
    /// Largest redirected piece, blocks.
    pub max_peer_piece: Option<u32>,
    /// Most blocks per answer.
    pub max_blocks_per_answer: Option<u32>,
    /// How long an unconfirmed assignment counts, seconds.
    pub assignment_timeout_s: Option<f64>,
    /// Wait after an empty answer, seconds.
    pub retry_after_s: Option<f64>,
    /// Empty answers per second the master paces its waiting requesters to.
    pub waiting_polls_per_s: Option<u32>,
    /// One copy of each block enters each region (`shoal-master --region-budget`).
    pub region_budget: Option<bool>,
    /// One copy of a block enters a region at a time (default on; `false` to compare).
    pub one_entry_per_region: Option<bool>,
    /// Each requester walks the file from its own block (default on; `false`: from block 0).
    pub spread_start: Option<bool>,
}

impl PolicySpec {
    /// The policy config these overrides give.
    pub fn config(&self) -> shoal_master::PolicyConfig {
        let mut c = shoal_master::PolicyConfig::default();
        let set = |dst: &mut u32, v: Option<u32>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        set(&mut c.max_master_piece, self.max_master_piece);
        set(&mut c.lone_master_piece, self.lone_master_piece);
        set(&mut c.min_master_piece, self.min_master_piece);
        set(&mut c.max_master_pieces, self.max_master_pieces);
        set(&mut c.master_load_half, self.master_load_half);
        set(&mut c.max_peer_piece, self.max_peer_piece);
        set(&mut c.max_blocks_per_answer, self.max_blocks_per_answer);
        set(&mut c.waiting_polls_per_s, self.waiting_polls_per_s);
        if let Some(s) = self.assignment_timeout_s {
            c.assignment_timeout = std::time::Duration::from_secs_f64(s);
        }
        if let Some(s) = self.retry_after_s {
            c.retry_after = std::time::Duration::from_secs_f64(s);
        }
        if let Some(on) = self.region_budget {
            c.region_budget = on;
        }
        if let Some(on) = self.one_entry_per_region {
            c.one_entry_per_region = on;
        }
        if let Some(on) = self.spread_start {
            c.spread_start = on;
        }
        c
    }
}

/// Node-side tunables.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Transfers in flight per node (the scheduler's `max_transfers`).
    #[serde(default = "default_transfers")]
    pub max_transfers: usize,
    /// Seconds a node keeps serving after it completes (absent: until the end).
    pub seed_s: Option<f64>,
    /// A transfer with no progress for this long is abandoned (the node's watchdog), seconds.
    #[serde(default = "default_watchdog")]
    pub watchdog_s: f64,
}

fn default_transfers() -> usize {
    8
}

fn default_watchdog() -> f64 {
    10.0
}

impl Default for NodeSpec {
    fn default() -> Self {
        Self {
            max_transfers: default_transfers(),
            seed_s: None,
            watchdog_s: default_watchdog(),
        }
    }
}

/// A whole scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name (used in outputs).
    #[serde(default)]
    pub name: String,
    /// The random seed (`--seed` overrides it).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Stop the simulation at this virtual time, seconds (default: 20 times the lower bound
    /// plus 10 minutes).
    pub limit_s: Option<f64>,
    /// The file.
    pub file: FileSpec,
    /// The master.
    pub master: MasterSpec,
    /// The nodes.
    #[serde(rename = "group")]
    pub groups: Vec<GroupSpec>,
    /// Latencies.
    #[serde(default)]
    pub latency: LatencySpec,
    /// Arrivals.
    #[serde(default)]
    pub arrivals: ArrivalSpec,
    /// Churn.
    #[serde(default)]
    pub churn: ChurnSpec,
    /// Misbehaving nodes.
    #[serde(default)]
    pub chaos: ChaosSpec,
    /// Policy overrides.
    #[serde(default)]
    pub policy: PolicySpec,
    /// Node tunables.
    #[serde(default)]
    pub node: NodeSpec,
}

fn default_seed() -> u64 {
    1
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks scenario text; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, ScenarioError> {
        let mut sc: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        if sc.name.is_empty() {
            sc.name = Path::new(path)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        sc.check().map_err(|message| ScenarioError::Invalid {
            path: path.into(),
            message,
        })?;
        Ok(sc)
    }

    /// Parses `text`, sets dotted `key` to `value` (a TOML value, or a bare string), and
    /// checks the result. `nodes` is a shorthand for the total node count (groups scaled).
    pub fn parse_varied(
        text: &str,
        path: &str,
        key: &str,
        value: &str,
    ) -> Result<Self, ScenarioError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        set_key(&mut table, key, value).map_err(|message| ScenarioError::Vary {
            key: key.into(),
            message,
        })?;
        let text = toml::to_string(&table).map_err(|e| ScenarioError::Vary {
            key: key.into(),
            message: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    fn check(&self) -> Result<(), String> {
        let f = &self.file;
        if f.block.0 > f.size.0 {
            return Err(format!(
                "file.block ({} B) is larger than file.size ({} B)",
                f.block.0, f.size.0
            ));
        }
        let blocks = f.size.0.div_ceil(f.block.0);
        if blocks > shoal_protocol::limits::MAX_BLOCKS {
            return Err(format!(
                "file has {blocks} blocks; at most {} allowed (raise file.block)",
                shoal_protocol::limits::MAX_BLOCKS
            ));
        }
        if self.groups.is_empty() {
            return Err("no [[group]] of nodes; at least one is needed".into());
        }
        let n: usize = self.groups.iter().map(|g| g.count).sum();
        if n == 0 || n > 1_000_000 {
            return Err(format!("{n} nodes in all; 1 to 1,000,000 allowed"));
        }
        for (i, g) in self.groups.iter().enumerate() {
            if !(g.start_s.is_finite() && g.start_s >= 0.0) {
                return Err(format!("group[{i}].start_s must be >= 0"));
            }
            if g.upload_slots == 0 {
                return Err(format!("group[{i}].upload_slots must be at least 1"));
            }
            if let Capacity::Choice(v) = &g.upload {
                if v.is_empty() {
                    return Err(format!("group[{i}].upload: an empty list of rates"));
                }
            }
            if let Capacity::Choice(v) = &g.download {
                if v.is_empty() {
                    return Err(format!("group[{i}].download: an empty list of rates"));
                }
            }
        }
        if self.master.upload_slots == 0 {
            return Err("master.upload_slots must be at least 1".into());
        }
        let lat = &self.latency;
        for (k, v) in [("intra_ms", lat.intra_ms), ("inter_ms", lat.inter_ms)]
            .into_iter()
            .chain(lat.between.iter().map(|(k, v)| (k.as_str(), *v)))
        {
            if !(v.is_finite() && (0.0..=10_000.0).contains(&v)) {
                return Err(format!("latency.{k} = {v}: 0 to 10000 ms allowed"));
            }
        }
        if self.arrivals.mode == ArrivalMode::Poisson
            && !(self.arrivals.rate.is_finite() && self.arrivals.rate > 0.0)
        {
            return Err("arrivals.mode = \"poisson\" needs arrivals.rate > 0 (nodes/s)".into());
        }
        let c = &self.churn;
        for (k, v) in [
            ("leave_rate", c.leave_rate),
            ("rejoin_rate", c.rejoin_rate),
            ("crash_detect_s", c.crash_detect_s),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("churn.{k} = {v}: must be >= 0"));
            }
        }
        if !(0.0..=1.0).contains(&c.crash_fraction) {
            return Err(format!(
                "churn.crash_fraction = {}: 0 to 1 allowed",
                c.crash_fraction
            ));
        }
        let ch = &self.chaos;
        let shares = [
            ("corrupt", ch.corrupt),
            ("lie_have", ch.lie_have),
            ("stall", ch.stall),
            ("false_accuse", ch.false_accuse),
        ];
        for (k, v) in shares {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("chaos.{k} = {v}: a share from 0 to 1"));
            }
        }
        if shares.iter().map(|s| s.1).sum::<f64>() > 1.0 {
            return Err("chaos shares add up to more than 1".into());
        }
        if self.node.max_transfers == 0 {
            return Err("node.max_transfers must be at least 1".into());
        }
        if !(self.node.watchdog_s.is_finite() && self.node.watchdog_s > 0.0) {
            return Err("node.watchdog_s must be > 0".into());
        }
        if let Some(s) = self.node.seed_s {
            if !(s.is_finite() && s >= 0.0) {
                return Err("node.seed_s must be >= 0".into());
            }
        }
        if let Some(l) = self.limit_s {
            if !(l.is_finite() && l > 0.0) {
                return Err("limit_s must be > 0".into());
            }
        }
        let p = self.policy.config();
        if p.min_master_piece == 0
            || p.max_master_piece < p.min_master_piece
            || p.max_peer_piece == 0
            || p.max_blocks_per_answer == 0
            || p.max_master_pieces == 0
            || p.master_load_half == 0
            || p.waiting_polls_per_s == 0
        {
            return Err(
                "policy: pieces, answers, master_load_half and waiting_polls_per_s must be \
                        >= 1, and max_master_piece >= min_master_piece"
                    .into(),
            );
        }
        Ok(())
    }

    /// Total node count.
    pub fn nodes(&self) -> usize {
        self.groups.iter().map(|g| g.count).sum()
    }

    /// Block count of the file.
    pub fn blocks(&self) -> u32 {
        self.file.size.0.div_ceil(self.file.block.0) as u32
    }
}

fn set_key(table: &mut toml::Table, key: &str, value: &str) -> Result<(), String> {
    let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    if key == "nodes" {
        let total: i64 = match parsed {
            toml::Value::Integer(i) if i > 0 => i,
            _ => return Err(format!("nodes = {value}: a positive integer")),
        };
        let groups = table
            .get_mut("group")
            .and_then(|g| g.as_array_mut())
            .ok_or("the scenario has no [[group]]")?;
        let counts: Vec<i64> = groups
            .iter()
            .map(|g| g.get("count").and_then(|c| c.as_integer()).unwrap_or(0))
            .collect();
        let sum: i64 = counts.iter().sum::<i64>().max(1);
        let mut given = 0;
        let last = groups.len() - 1;
        for (i, g) in groups.iter_mut().enumerate() {
            let c = if i == last {
                total - given
            } else {
                counts[i] * total / sum
            };
            given += c;
            if let Some(t) = g.as_table_mut() {
                t.insert("count".into(), toml::Value::Integer(c.max(0)));
            }
        }
        return Ok(());
    }
    let parts: Vec<&str> = key.split('.').collect();
    let (last, path) = parts.split_last().ok_or("an empty key")?;
    let mut cur: &mut toml::Table = table;
    for part in path {
        // Missing tables are made, so `chaos.corrupt` works on a scenario without [chaos].
        let next = cur
            .entry((*part).to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match next {
            toml::Value::Table(t) => t,
            toml::Value::Array(a) => {
                // `group.0.count`: an index into an array of tables.
                return set_in_array(a, &parts, part, value);
            }
            _ => return Err(format!("{part:?} is not a table")),
        };
    }
    cur.insert((*last).to_string(), parsed);
    Ok(())
}

fn set_in_array(
    a: &mut [toml::Value],
    parts: &[&str],
    at: &str,
    value: &str,
) -> Result<(), String> {
    let pos = parts.iter().position(|p| *p == at).unwrap_or(0);
    let rest = &parts[pos + 1..];
    let (idx, rest) = rest
        .split_first()
        .ok_or_else(|| format!("{at:?} is an array: give an index, e.g. {at}.0.count"))?;
    let idx: usize = idx
        .parse()
        .map_err(|_| format!("{idx:?} is not an index into {at:?}"))?;
    let len = a.len();
    let t = a
        .get_mut(idx)
        .and_then(|v| v.as_table_mut())
        .ok_or_else(|| format!("{at}.{idx}: out of range ({len} entries)"))?;
    if rest.is_empty() {
        return Err(format!("{at}.{idx}: name a key inside it"));
    }
    set_key(t, &rest.join("."), value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
name = "t"
[file]
size = "4MiB"
block = "64KiB"
[master]
upload = "8MiB/s"
[[group]]
count = 3
upload = "4MiB/s"
download = { min = "10MiB/s", max = "20MiB/s" }
"#;

    #[test]
    fn units_parse() {
        assert_eq!("650MiB".parse::<Size>().unwrap().0, 650 << 20);
        assert_eq!("1_000 KB".parse::<Size>().unwrap().0, 1_000_000);
        assert_eq!("100Mbit/s".parse::<Rate>().unwrap().0, 12.5e6);
        assert_eq!("8MiB/s".parse::<Rate>().unwrap().0, 8.0 * 1048576.0);
        assert!("8MiB".parse::<Rate>().is_err());
        assert!("8 parsecs".parse::<Size>().is_err());
    }

    #[test]
    fn a_good_scenario_parses() {
        let s = Scenario::parse(OK, "t.toml").unwrap();
        assert_eq!(s.nodes(), 3);
        assert_eq!(s.blocks(), 64);
        assert!(matches!(s.groups[0].download, Capacity::Uniform { .. }));
    }

    #[test]
    fn errors_name_the_key_the_line_and_what_is_allowed() {
        let bad = OK.replace("upload = \"8MiB/s\"", "upload = \"8 furlongs\"");
        let e = Scenario::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(e.contains("line 7"), "{e}");
        assert!(e.contains("Mbit/s"), "{e}");
        let bad = OK.replace("[master]", "[master]\nuplod = \"1MiB/s\"");
        let e = Scenario::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(e.contains("uplod") && e.contains("upload"), "{e}");
        let bad = format!("{OK}\n[arrivals]\nmode = \"sometimes\"\n");
        let e = Scenario::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(e.contains("flash") && e.contains("poisson"), "{e}");
        let bad = format!("{OK}\n[chaos]\ncorrupt = 1.5\n");
        let e = Scenario::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(e.contains("chaos.corrupt"), "{e}");
    }

    #[test]
    fn vary_sets_any_key_and_nodes_scales_groups() {
        let s = Scenario::parse_varied(OK, "t.toml", "nodes", "10").unwrap();
        assert_eq!(s.nodes(), 10);
        let s = Scenario::parse_varied(OK, "t.toml", "master.upload", "2MiB/s").unwrap();
        assert_eq!(s.master.upload.0, 2.0 * 1048576.0);
        let s = Scenario::parse_varied(OK, "t.toml", "group.0.count", "7").unwrap();
        assert_eq!(s.nodes(), 7);
        let s = Scenario::parse_varied(OK, "t.toml", "chaos.corrupt", "0.25").unwrap();
        assert_eq!(s.chaos.corrupt, 0.25);
        assert!(Scenario::parse_varied(OK, "t.toml", "nope.x", "1").is_err());
    }
}
