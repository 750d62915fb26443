//! The swarm a scenario and a seed give: each node's group, region, capacities, role and
//! arrival time, drawn once here so that both engines run the very same swarm.
//!
//! The draws come from one seeded ChaCha generator in a fixed order (per node in group
//! order: key, upload, download; then the misbehaving nodes; then the arrivals). The generator
//! is handed back afterwards: the virtual engine keeps drawing from it (churn).

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::engine::Role;
use crate::scenario::{ArrivalMode, ChaosMode, Scenario};

/// One node as drawn.
#[derive(Clone, Debug)]
pub struct DrawnNode {
    /// Its group (index into the scenario's groups).
    pub group: usize,
    /// Its region (index into [`Swarm::regions`]).
    pub region: usize,
    /// Secret bytes of its ed25519 key.
    pub key: [u8; 32],
    /// Upload capacity, bytes/s.
    pub upload: f64,
    /// Download capacity, bytes/s.
    pub download: f64,
    /// How it behaves.
    pub role: Role,
}

/// A drawn swarm.
#[derive(Debug)]
pub struct Swarm {
    /// Region names; the master's is first.
    pub regions: Vec<String>,
    /// The nodes, in group order.
    pub nodes: Vec<DrawnNode>,
    /// Arrivals as (node, seconds), in the order they were drawn (ties keep this order).
    pub arrivals: Vec<(usize, f64)>,
}

impl Swarm {
    /// Draws the swarm of `sc` with `seed`; returns it and the generator, for later draws.
    pub fn draw(sc: &Scenario, seed: u64) -> (Self, ChaCha8Rng) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut regions: Vec<String> = vec![sc.master.region.clone()];
        for g in &sc.groups {
            if !regions.contains(&g.region) {
                regions.push(g.region.clone());
            }
        }
        let n = sc.nodes();
        let mut nodes = Vec::with_capacity(n);
        for (gi, g) in sc.groups.iter().enumerate() {
            let region = regions.iter().position(|r| *r == g.region).unwrap_or(0);
            for _ in 0..g.count {
                let key: [u8; 32] = rng.gen();
                let upload = g.upload.draw(&mut rng);
                let download = g.download.draw(&mut rng);
                nodes.push(DrawnNode {
                    group: gi,
                    region,
                    key,
                    upload,
                    download,
                    role: match g.chaos {
                        None => Role::Honest,
                        Some(ChaosMode::Corrupt) => Role::Corrupt,
                        Some(ChaosMode::LieHave) => Role::LieHave,
                        Some(ChaosMode::Stall) => Role::Stall,
                        Some(ChaosMode::FalseAccuse) => Role::FalseAccuse,
                    },
                });
            }
        }
        // Misbehaving nodes: a random choice among the others, by share.
        let mut order: Vec<usize> = (0..n).filter(|i| nodes[*i].role == Role::Honest).collect();
        order.shuffle(&mut rng);
        let mut next = 0;
        for (share, role) in [
            (sc.chaos.corrupt, Role::Corrupt),
            (sc.chaos.lie_have, Role::LieHave),
            (sc.chaos.stall, Role::Stall),
            (sc.chaos.false_accuse, Role::FalseAccuse),
        ] {
            let k = (share * n as f64).round() as usize;
            for &i in order.iter().skip(next).take(k) {
                nodes[i].role = role;
            }
            next += k;
        }
        // Arrivals, per group from its start time.
        let mut arrivals = Vec::with_capacity(n);
        for (gi, g) in sc.groups.iter().enumerate() {
            let mut members: Vec<usize> = (0..n).filter(|i| nodes[*i].group == gi).collect();
            match sc.arrivals.mode {
                ArrivalMode::Flash => arrivals.extend(members.into_iter().map(|i| (i, g.start_s))),
                ArrivalMode::Poisson => {
                    members.shuffle(&mut rng);
                    // The crowd's rate, shared by the groups in proportion to their size.
                    let rate = sc.arrivals.rate * g.count as f64 / n as f64;
                    let mut t = g.start_s;
                    for i in members {
                        arrivals.push((i, t));
                        t += exp(&mut rng, rate);
                    }
                }
            }
        }
        (
            Self {
                regions,
                nodes,
                arrivals,
            },
            rng,
        )
    }
}

/// An exponential draw with `rate` per second.
pub fn exp(rng: &mut impl Rng, rate: f64) -> f64 {
    let u: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    -u.ln() / rate
}
