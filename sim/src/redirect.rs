//! Who answers a Locate: the master's real policy, or one of the two baselines.
//!
//! - `shoal`: [`shoal_master::Policy`] itself, the code `shoal-master` runs.
//! - `origin-only`: every block from the master (what plain HTTP mirrors of one origin do).
//! - `random-holder`: a redirect to any live holder of each block, chosen at random: no
//!   locality, no load awareness. First copies come from the master, each handed out once (as
//!   in `shoal`), so the comparison isolates the choice of holder.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_master::{Policy, PolicyConfig};
use shoal_protocol::block::{BlockRange, Blocks};
use shoal_protocol::limits::MAX_ASSIGNMENTS;
use shoal_protocol::wire::{Assignment, Source};
use shoal_protocol::FileId;

/// Which redirect rule the master uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    /// The real policy.
    Shoal,
    /// Everything from the master.
    OriginOnly,
    /// Any holder, at random.
    RandomHolder,
}

impl PolicyKind {
    /// Every policy: shoal, then the two baselines.
    pub const ALL: [PolicyKind; 3] = [Self::Shoal, Self::OriginOnly, Self::RandomHolder];

    /// Its command-line name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Shoal => "shoal",
            Self::OriginOnly => "origin-only",
            Self::RandomHolder => "random-holder",
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "shoal" => Ok(Self::Shoal),
            "origin-only" => Ok(Self::OriginOnly),
            "random-holder" => Ok(Self::RandomHolder),
            other => Err(format!(
                "unknown policy {other:?}; one of shoal, origin-only, random-holder"
            )),
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The simulated file's id.
pub const FILE: FileId = FileId([0x5a; 32]);

/// The master's side of the swarm, by node index.
pub trait Redirector {
    /// A node connected and said hello from `region`.
    fn peer_up(&mut self, node: usize, region: &str);
    /// A node is gone.
    fn peer_down(&mut self, node: usize);
    /// A node holds `ranges` now.
    fn have(&mut self, node: usize, ranges: &[BlockRange]);
    /// `reporter` must not be sent to `peer` (until `until`).
    fn avoid(&mut self, reporter: usize, peer: usize, until: Option<Instant>);
    /// `node` is banned.
    fn ban(&mut self, node: usize);
    /// The master has sent `total` bytes so far (before each Locate, as the real master).
    fn master_sent(&mut self, _now: Instant, _total: u64) {}
    /// Answers a Locate.
    fn locate(
        &mut self,
        now: Instant,
        node: usize,
        need: &[BlockRange],
    ) -> (Vec<Assignment>, Duration);
}

/// Builds the redirector for `kind`.
pub fn build(
    kind: PolicyKind,
    cfg: PolicyConfig,
    peers: Vec<PeerId>,
    addrs: Vec<Multiaddr>,
    blocks: u32,
    size: u64,
    seed: u64,
) -> Box<dyn Redirector> {
    match kind {
        PolicyKind::Shoal => {
            let mut policy = Policy::new(cfg);
            policy.add_file(FILE, "sim".into(), size, Blocks::full(blocks));
            Box::new(Shoal {
                policy,
                peers,
                addrs,
            })
        }
        PolicyKind::OriginOnly => Box::new(OriginOnly { cfg, blocks }),
        PolicyKind::RandomHolder => Box::new(RandomHolder::new(cfg, peers, addrs, blocks, seed)),
    }
}

struct Shoal {
    policy: Policy,
    peers: Vec<PeerId>,
    addrs: Vec<Multiaddr>,
}

impl Redirector for Shoal {
    fn peer_up(&mut self, node: usize, region: &str) {
        self.policy
            .peer_up(self.peers[node], vec![self.addrs[node].clone()]);
        self.policy.set_region(self.peers[node], region.to_string());
    }

    fn peer_down(&mut self, node: usize) {
        self.policy.peer_down(&self.peers[node]);
    }

    fn have(&mut self, node: usize, ranges: &[BlockRange]) {
        self.policy.have(&FILE, self.peers[node], ranges);
    }

    fn avoid(&mut self, reporter: usize, peer: usize, until: Option<Instant>) {
        self.policy
            .avoid(self.peers[reporter], self.peers[peer], until);
    }

    fn ban(&mut self, node: usize) {
        self.policy.ban(self.peers[node]);
    }

    fn master_sent(&mut self, now: Instant, total: u64) {
        self.policy.master_sent(now, total);
    }

    fn locate(
        &mut self,
        now: Instant,
        node: usize,
        need: &[BlockRange],
    ) -> (Vec<Assignment>, Duration) {
        match self.policy.locate(now, self.peers[node], &FILE, need) {
            Ok(a) => (a.assignments, a.retry_after),
            Err(_) => (Vec::new(), Duration::from_millis(200)),
        }
    }
}

struct OriginOnly {
    cfg: PolicyConfig,
    blocks: u32,
}

impl Redirector for OriginOnly {
    fn peer_up(&mut self, _: usize, _: &str) {}
    fn peer_down(&mut self, _: usize) {}
    fn have(&mut self, _: usize, _: &[BlockRange]) {}
    fn avoid(&mut self, _: usize, _: usize, _: Option<Instant>) {}
    fn ban(&mut self, _: usize) {}

    fn locate(&mut self, _: Instant, _: usize, need: &[BlockRange]) -> (Vec<Assignment>, Duration) {
        let mut out = Vec::new();
        let mut budget = self.cfg.max_blocks_per_answer;
        let piece = self.cfg.max_master_piece.max(1);
        for r in need {
            let mut b = r.start;
            let end = r.end.min(self.blocks);
            while b < end && budget > 0 && out.len() < MAX_ASSIGNMENTS {
                let e = end.min(b + piece).min(b + budget);
                out.push(Assignment {
                    range: BlockRange::new(b, e),
                    source: Source::Master,
                });
                budget -= e - b;
                b = e;
            }
        }
        let retry = if out.is_empty() {
            self.cfg.retry_after
        } else {
            Duration::ZERO
        };
        (out, retry)
    }
}

struct RandomHolder {
    cfg: PolicyConfig,
    peers: Vec<PeerId>,
    addrs: Vec<Multiaddr>,
    live: Vec<bool>,
    held: Vec<Blocks>,
    /// Per block, nodes that reported it (may list nodes gone since: checked on use).
    holders: Vec<Vec<u32>>,
    handouts: HashMap<u32, (usize, Instant)>,
    avoid: Vec<HashMap<usize, Option<Instant>>>,
    banned: Vec<bool>,
    rng: ChaCha8Rng,
}

impl RandomHolder {
    fn new(
        cfg: PolicyConfig,
        peers: Vec<PeerId>,
        addrs: Vec<Multiaddr>,
        blocks: u32,
        seed: u64,
    ) -> Self {
        let n = peers.len();
        Self {
            cfg,
            peers,
            addrs,
            live: vec![false; n],
            held: vec![Blocks::new(blocks); n],
            holders: vec![Vec::new(); blocks as usize],
            handouts: HashMap::new(),
            avoid: vec![HashMap::new(); n],
            banned: vec![false; n],
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x7261_6e64),
        }
    }

    fn usable(&self, requester: usize, h: usize, b: u32, now: Instant) -> bool {
        h != requester
            && self.live[h]
            && self.held[h].contains(b)
            && !self.avoid[requester]
                .get(&h)
                .is_some_and(|u| u.is_none_or(|u| u > now))
    }

    fn pick(&mut self, requester: usize, b: u32, now: Instant) -> Option<usize> {
        let list = &self.holders[b as usize];
        if list.is_empty() {
            return None;
        }
        for _ in 0..8 {
            let h = list[self.rng.gen_range(0..list.len())] as usize;
            if self.usable(requester, h, b, now) {
                return Some(h);
            }
        }
        let ok: Vec<usize> = list
            .iter()
            .map(|h| *h as usize)
            .filter(|h| self.usable(requester, *h, b, now))
            .collect();
        if ok.is_empty() {
            None
        } else {
            Some(ok[self.rng.gen_range(0..ok.len())])
        }
    }
}

impl Redirector for RandomHolder {
    fn peer_up(&mut self, node: usize, _: &str) {
        if !self.banned[node] {
            self.live[node] = true;
        }
    }

    fn peer_down(&mut self, node: usize) {
        self.live[node] = false;
        let blocks = self.held[node].capacity();
        self.held[node] = Blocks::new(blocks);
        self.handouts.retain(|_, (to, _)| *to != node);
    }

    fn have(&mut self, node: usize, ranges: &[BlockRange]) {
        let blocks = self.held[node].capacity();
        for r in ranges {
            for b in BlockRange::new(r.start, r.end.min(blocks)).iter() {
                if self.held[node].insert(b) {
                    self.holders[b as usize].push(node as u32);
                }
                self.handouts.remove(&b);
            }
        }
        // Drop entries of nodes that no longer hold the block, now and then.
        for r in ranges {
            for b in BlockRange::new(r.start, r.end.min(blocks)).iter() {
                let list = &mut self.holders[b as usize];
                if list.len() > 64 && list.len().is_power_of_two() {
                    let held = &self.held;
                    list.retain(|h| held[*h as usize].contains(b));
                }
            }
        }
    }

    fn avoid(&mut self, reporter: usize, peer: usize, until: Option<Instant>) {
        let e = self.avoid[reporter].entry(peer).or_insert(until);
        *e = match (*e, until) {
            (None, _) | (_, None) => None,
            (Some(a), Some(b)) => Some(a.max(b)),
        };
    }

    fn ban(&mut self, node: usize) {
        self.peer_down(node);
        self.banned[node] = true;
    }

    fn locate(
        &mut self,
        now: Instant,
        node: usize,
        need: &[BlockRange],
    ) -> (Vec<Assignment>, Duration) {
        self.handouts.retain(|_, (_, d)| *d > now);
        let deadline = now + self.cfg.assignment_timeout;
        let blocks = self.held[node].capacity();
        let mut runs: Vec<(BlockRange, Option<usize>)> = Vec::new();
        let mut budget = self.cfg.max_blocks_per_answer;
        let mut master_given = 0;
        'outer: for r in need {
            for b in BlockRange::new(r.start, r.end.min(blocks)).iter() {
                if budget == 0 || runs.len() >= MAX_ASSIGNMENTS {
                    break 'outer;
                }
                if self.held[node].contains(b) {
                    continue;
                }
                let continuing = match runs.last() {
                    Some((run, Some(h)))
                        if run.end == b
                            && run.len() < self.cfg.max_peer_piece
                            && self.usable(node, *h, b, now) =>
                    {
                        Some(*h)
                    }
                    _ => None,
                };
                let source = match continuing.or_else(|| self.pick(node, b, now)) {
                    Some(h) => Some(h),
                    None if self.handouts.get(&b).is_none_or(|(to, _)| *to == node)
                        && master_given < self.cfg.max_master_piece =>
                    {
                        self.handouts.insert(b, (node, deadline));
                        master_given += 1;
                        None
                    }
                    None => continue,
                };
                budget -= 1;
                let max_len = if source.is_some() {
                    self.cfg.max_peer_piece
                } else {
                    self.cfg.max_master_piece
                };
                match runs.last_mut() {
                    Some((run, src)) if *src == source && run.end == b && run.len() < max_len => {
                        run.end = b + 1;
                    }
                    _ => runs.push((BlockRange::new(b, b + 1), source)),
                }
            }
        }
        let out: Vec<Assignment> = runs
            .into_iter()
            .map(|(range, src)| Assignment {
                range,
                source: match src {
                    None => Source::Master,
                    Some(h) => Source::Peer {
                        peer: self.peers[h],
                        addrs: vec![self.addrs[h].clone()],
                    },
                },
            })
            .collect();
        let retry = if out.is_empty() {
            self.cfg.retry_after
        } else {
            Duration::ZERO
        };
        (out, retry)
    }
}
