//! Vivaldi network coordinates (Dabek, Cox, Kaashoek, Morris, SIGCOMM 2004): a position per
//! node such that the distance between two positions estimates their round-trip time, so the
//! master can estimate the RTT between two nodes that never pinged each other.
//!
//! Pure: no clock, no I/O, no global randomness. Samples come in as `(who, other, rtt)`; the
//! only randomness (a direction to push apart two nodes at the same spot) comes from a
//! counter-seeded generator inside [`Coordinates`], so the same samples in the same order give
//! the same coordinates. The table is capped ([`Coordinates::new`]) and entries are removed
//! by their owner (the master drops a peer's coordinate when it disconnects).
//!
//! The model is the paper's "height vector": a point in a small Euclidean space plus a height
//! (the access link every path to the node crosses), distance `|x_a - x_b| + h_a + h_b`, with
//! the adaptive timestep (`c_c`) and the error-weighted update (`c_e`). Constants follow
//! the paper and Serf's implementation.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

/// Dimensions of the Euclidean part (the height comes on top).
pub const DIMENSIONS: usize = 4;

/// Largest round-trip time a sample may claim; longer ones are not taken.
pub const MAX_RTT: Duration = Duration::from_secs(10);

/// Error of a node that has no sample yet (relative: 1.0 is "100% off").
const INITIAL_ERROR: f64 = 1.0;
/// Error never grows beyond this (a run of bad samples cannot make a node ignore good ones).
const MAX_ERROR: f64 = 1.5;
/// Weight of a new sample in a node's error estimate.
const CE: f64 = 0.25;
/// Timestep: the fraction of the way a confident node moves towards where a sample puts it.
const CC: f64 = 0.25;
/// Smallest height, in milliseconds (every path has some access link).
const MIN_HEIGHT_MS: f64 = 0.01;
/// Below this, two points coincide.
const ZERO: f64 = 1e-9;

/// One node's position. Distances are in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Coordinate {
    vec: [f64; DIMENSIONS],
    height: f64,
    error: f64,
    samples: u32,
}

impl Default for Coordinate {
    fn default() -> Self {
        Self {
            vec: [0.0; DIMENSIONS],
            height: MIN_HEIGHT_MS,
            error: INITIAL_ERROR,
            samples: 0,
        }
    }
}

impl Coordinate {
    /// The estimated round-trip time to `other`, in milliseconds.
    pub fn distance_ms(&self, other: &Coordinate) -> f64 {
        norm(&sub(&self.vec, &other.vec)) + self.height + other.height
    }

    /// How far off this node's estimates are, as a fraction (its own running estimate).
    pub fn error(&self) -> f64 {
        self.error
    }

    /// Samples taken into account so far (saturating).
    pub fn samples(&self) -> u32 {
        self.samples
    }

    /// Moves this node after measuring `rtt_ms` to `other` (the paper's update).
    fn observe(&mut self, other: &Coordinate, rtt_ms: f64, nudge: &mut Nudge) {
        let rtt_ms = rtt_ms.max(ZERO);
        let dist = self.distance_ms(other);
        let wrongness = (dist - rtt_ms).abs() / rtt_ms;
        let weight = self.error / (self.error + other.error).max(ZERO);
        self.error = (CE * weight * wrongness + self.error * (1.0 - CE * weight)).min(MAX_ERROR);
        let force = CC * weight * (rtt_ms - dist);
        // Push along the line between the two points (a random line if they coincide); the
        // height takes its share of the force, as in the height-vector model.
        let diff = sub(&self.vec, &other.vec);
        let mag = norm(&diff);
        let unit = if mag > ZERO {
            diff.map(|d| d / mag)
        } else {
            nudge.unit()
        };
        for (x, u) in self.vec.iter_mut().zip(unit) {
            *x += u * force;
        }
        if mag > ZERO {
            self.height =
                ((self.height + other.height) * force / mag + self.height).max(MIN_HEIGHT_MS);
        }
        self.samples = self.samples.saturating_add(1);
    }
}

/// The coordinates of every node the master measured, keyed by `K`.
#[derive(Clone, Debug)]
pub struct Coordinates<K> {
    table: HashMap<K, Coordinate>,
    cap: usize,
    nudge: Nudge,
}

/// Why a sample was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    /// Zero, or longer than [`MAX_RTT`].
    #[error("round-trip time out of range")]
    OutOfRange,
    /// A node's RTT to itself says nothing.
    #[error("sample about itself")]
    ToSelf,
    /// The table holds its cap of nodes.
    #[error("coordinate table full")]
    Full,
}

impl<K: Copy + Eq + Hash> Coordinates<K> {
    /// An empty table holding at most `cap` nodes.
    pub fn new(cap: usize) -> Self {
        Self {
            table: HashMap::new(),
            cap,
            nudge: Nudge(0),
        }
    }

    /// `who` measured `rtt` to `other`: moves `who` (only: a sample is `who`'s claim, and
    /// moves nobody else). A node not yet in the table starts at the origin.
    pub fn observe(&mut self, who: K, other: K, rtt: Duration) -> Result<(), SampleError> {
        if who == other {
            return Err(SampleError::ToSelf);
        }
        if rtt.is_zero() || rtt > MAX_RTT {
            return Err(SampleError::OutOfRange);
        }
        let missing = usize::from(!self.table.contains_key(&who))
            + usize::from(!self.table.contains_key(&other));
        if self.table.len() + missing > self.cap {
            return Err(SampleError::Full);
        }
        let there = self.table.entry(other).or_default().clone();
        let me = self.table.entry(who).or_default();
        me.observe(&there, rtt.as_secs_f64() * 1e3, &mut self.nudge);
        Ok(())
    }

    /// The estimated RTT between `a` and `b`, once both have been placed by a sample.
    pub fn estimate(&self, a: &K, b: &K) -> Option<Duration> {
        if a == b {
            return Some(Duration::ZERO);
        }
        let (ca, cb) = (self.placed(a)?, self.placed(b)?);
        Some(Duration::from_secs_f64(ca.distance_ms(cb) / 1e3))
    }

    /// `k`'s coordinate, if a sample placed it.
    pub fn placed(&self, k: &K) -> Option<&Coordinate> {
        self.table.get(k).filter(|c| c.samples > 0)
    }

    /// Whether `k` is in the table (placed or not).
    pub fn contains(&self, k: &K) -> bool {
        self.table.contains_key(k)
    }

    /// Forgets `k`.
    pub fn remove(&mut self, k: &K) {
        self.table.remove(k);
    }

    /// Nodes in the table.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// A deterministic source of directions (splitmix64 over a counter).
#[derive(Clone, Debug)]
struct Nudge(u64);

impl Nudge {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A unit vector in a direction drawn uniformly enough for pushing points apart.
    fn unit(&mut self) -> [f64; DIMENSIONS] {
        loop {
            let v =
                [(); DIMENSIONS].map(|_| (self.next() >> 11) as f64 / (1u64 << 53) as f64 - 0.5);
            let n = norm(&v);
            if n > ZERO {
                return v.map(|x| x / n);
            }
        }
    }
}

fn sub(a: &[f64; DIMENSIONS], b: &[f64; DIMENSIONS]) -> [f64; DIMENSIONS] {
    std::array::from_fn(|i| a[i] - b[i])
}

fn norm(v: &[f64; DIMENSIONS]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator for the tests' matrices and sampling order.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Round-trip times (ms) of `n` nodes: points on a plane of `span` ms, in `clusters`
    /// groups (continents) if more than one, plus an access-link height of 1-10 ms each.
    fn matrix(n: usize, clusters: usize, rng: &mut Rng) -> Vec<Vec<f64>> {
        let centres: Vec<(f64, f64)> = (0..clusters)
            .map(|_| (rng.unit() * 150.0, rng.unit() * 150.0))
            .collect();
        let nodes: Vec<(f64, f64, f64)> = (0..n)
            .map(|i| {
                let (cx, cy) = centres[i % clusters];
                let spread = if clusters > 1 { 20.0 } else { 150.0 };
                (
                    cx + rng.unit() * spread,
                    cy + rng.unit() * spread,
                    1.0 + rng.unit() * 9.0,
                )
            })
            .collect();
        (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        let (a, b) = (nodes[i], nodes[j]);
                        if i == j {
                            0.0
                        } else {
                            ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt() + a.2 + b.2
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Each round, every node measures one other node at random (with `jitter`, a fraction).
    fn run(rtt: &[Vec<f64>], rounds: usize, jitter: f64, rng: &mut Rng) -> Coordinates<usize> {
        let n = rtt.len();
        let mut c = Coordinates::new(n);
        for _ in 0..rounds {
            for (i, row) in rtt.iter().enumerate() {
                let j = (i + 1 + rng.below(n - 1)) % n;
                let noisy = row[j] * (1.0 + jitter * (rng.unit() * 2.0 - 1.0));
                c.observe(i, j, Duration::from_secs_f64(noisy / 1e3))
                    .expect("in range");
            }
        }
        c
    }

    fn median_relative_error(c: &Coordinates<usize>, rtt: &[Vec<f64>]) -> f64 {
        let mut errors = Vec::new();
        for (i, row) in rtt.iter().enumerate() {
            for (j, actual) in row.iter().enumerate().skip(i + 1) {
                let est = c.estimate(&i, &j).expect("placed").as_secs_f64() * 1e3;
                errors.push((est - actual).abs() / actual);
            }
        }
        errors.sort_by(f64::total_cmp);
        errors[errors.len() / 2]
    }

    #[test]
    fn coordinates_converge_on_a_synthetic_rtt_matrix() {
        for (seed, clusters, jitter) in [(7, 1, 0.0), (11, 4, 0.0), (13, 4, 0.1)] {
            let mut rng = Rng(seed);
            let rtt = matrix(40, clusters, &mut rng);
            let c = run(&rtt, 200, jitter, &mut rng);
            let err = median_relative_error(&c, &rtt);
            assert!(
                err < 0.20,
                "seed {seed}, {clusters} clusters, jitter {jitter}: median relative error {err:.3}"
            );
        }
    }

    #[test]
    fn unconverged_coordinates_are_far_off() {
        // The convergence test can fail: after a handful of samples the estimates are poor.
        let mut rng = Rng(7);
        let rtt = matrix(40, 4, &mut rng);
        let c = run(&rtt, 1, 0.0, &mut rng);
        let placed = (0..40).filter(|i| c.placed(i).is_some()).count();
        assert_eq!(placed, 40);
        assert!(median_relative_error(&c, &rtt) > 0.20);
    }

    #[test]
    fn the_same_samples_give_the_same_coordinates() {
        let rtt = matrix(20, 2, &mut Rng(3));
        let a = run(&rtt, 30, 0.1, &mut Rng(5));
        let b = run(&rtt, 30, 0.1, &mut Rng(5));
        for i in 0..20 {
            assert_eq!(a.placed(&i), b.placed(&i));
        }
    }

    #[test]
    fn a_sample_moves_only_who_measured() {
        let mut c = Coordinates::new(8);
        c.observe(1, 2, Duration::from_millis(10)).unwrap();
        c.observe(2, 3, Duration::from_millis(10)).unwrap();
        let before = c.placed(&2).cloned();
        c.observe(1, 2, Duration::from_millis(50)).unwrap();
        assert_eq!(c.placed(&2).cloned(), before);
        // Two nodes at the same spot are pushed apart along some direction.
        let est = c.estimate(&1, &2).unwrap();
        assert!(est > Duration::from_millis(1), "{est:?}");
    }

    #[test]
    fn bad_samples_are_refused_and_the_table_is_capped() {
        let mut c = Coordinates::new(3);
        assert_eq!(
            c.observe(1, 1, Duration::from_millis(1)),
            Err(SampleError::ToSelf)
        );
        assert_eq!(
            c.observe(1, 2, Duration::ZERO),
            Err(SampleError::OutOfRange)
        );
        assert_eq!(
            c.observe(1, 2, MAX_RTT + Duration::from_nanos(1)),
            Err(SampleError::OutOfRange)
        );
        assert!(c.is_empty());
        c.observe(1, 2, Duration::from_millis(5)).unwrap();
        c.observe(3, 2, Duration::from_millis(5)).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(
            c.observe(4, 2, Duration::from_millis(5)),
            Err(SampleError::Full)
        );
        c.remove(&3);
        c.observe(4, 2, Duration::from_millis(5)).unwrap();
        assert_eq!(c.len(), 3);
        // Not placed until it took a sample itself: 2 was only measured.
        assert!(c.placed(&2).is_none());
        assert!(c.estimate(&1, &2).is_none());
        assert!(c.estimate(&1, &4).is_some());
    }
}
