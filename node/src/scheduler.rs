//! The node's download scheduler: a pure state machine, told the time, doing no I/O.
//!
//! It knows which blocks the node holds and which are in flight, queues the master's
//! assignments, decides when to ask the master again, starts transfers up to a cap, and turns
//! finished and failed transfers into Have reports and problem reports. The shell
//! ([`crate::fetch`]) carries out the [`Action`]s it returns from [`Scheduler::poll`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use shoal_protocol::block::{BlockRange, Blocks};
use shoal_protocol::limits::MAX_RANGES_PER_MESSAGE;
use shoal_protocol::wire::{Assignment, Problem, RefuseReason, Source};

/// Tunables of the scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Transfers in flight at once.
    pub max_transfers: usize,
    /// Wait before asking the master again after its request failed; doubles with each
    /// further failure up to `max_locate_backoff` (the master may be restarting).
    pub locate_backoff: Duration,
    /// Cap of the locate back-off.
    pub max_locate_backoff: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_transfers: 8,
            locate_backoff: Duration::from_millis(250),
            max_locate_backoff: Duration::from_secs(5),
        }
    }
}

/// Identifies a transfer.
pub type TransferId = u64;

/// A transfer to start: fetch `range` from `source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// Its id, to report back with.
    pub id: TransferId,
    /// The blocks.
    pub range: BlockRange,
    /// Where from.
    pub source: Source,
}

impl Transfer {
    /// The source peer, or `None` for the master.
    pub fn peer(&self) -> Option<PeerId> {
        match &self.source {
            Source::Master => None,
            Source::Peer { peer, .. } => Some(*peer),
        }
    }

    /// The hinted addresses of the source peer.
    pub fn hint(&self) -> &[Multiaddr] {
        match &self.source {
            Source::Master => &[],
            Source::Peer { addrs, .. } => addrs,
        }
    }
}

/// Why a transfer ended early.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Could not connect, refused, stalled, reset, short read.
    Unreachable,
    /// The server refused.
    Refused(RefuseReason),
    /// A block failed its digest.
    Corrupt {
        /// The bad block.
        block: u32,
    },
    /// The source said `Ok`, then the stream ended before this block.
    Truncated {
        /// The first block not delivered.
        block: u32,
    },
    /// A local problem (disk), not the source's fault.
    Local,
}

/// What the shell should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask the master where to get these blocks.
    Locate {
        /// Blocks needed and not in flight.
        need: Vec<BlockRange>,
    },
    /// Start this transfer.
    Start(Transfer),
    /// Tell the master these blocks are now held.
    Have(Vec<BlockRange>),
    /// Tell the master about a bad source.
    Report {
        /// The source.
        peer: PeerId,
        /// What it did.
        problem: Problem,
    },
}

/// The download state of one file.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    have: Blocks,
    in_flight: Blocks,
    queue: VecDeque<Assignment>,
    transfers: HashMap<TransferId, Transfer>,
    next_id: TransferId,
    locating: bool,
    next_locate: Option<Instant>,
    unreported: Vec<BlockRange>,
    reports: VecDeque<(PeerId, Problem)>,
    retries: u64,
    locate_failures: u32,
}

impl Scheduler {
    /// A scheduler for a file of which `have` is already held.
    pub fn new(have: Blocks, cfg: SchedulerConfig) -> Self {
        let in_flight = Blocks::new(have.capacity());
        // Whatever was held before (a resume) is announced first.
        let unreported = have.ranges();
        Self {
            cfg,
            have,
            in_flight,
            queue: VecDeque::new(),
            transfers: HashMap::new(),
            next_id: 0,
            locating: false,
            next_locate: None,
            unreported,
            reports: VecDeque::new(),
            retries: 0,
            locate_failures: 0,
        }
    }

    /// Whether every block is held.
    pub fn is_complete(&self) -> bool {
        self.have.is_full()
    }

    /// Whether nothing is in flight or waiting to be said.
    pub fn is_idle(&self) -> bool {
        self.transfers.is_empty() && self.unreported.is_empty() && self.reports.is_empty()
    }

    /// Blocks held.
    pub fn have(&self) -> &Blocks {
        &self.have
    }

    /// Transfers that ended early, so far.
    pub fn retries(&self) -> u64 {
        self.retries
    }

    /// Transfers in flight.
    pub fn transfers(&self) -> usize {
        self.transfers.len()
    }

    fn needed(&self) -> Vec<BlockRange> {
        let mut need = shoal_protocol::block::runs(0..self.have.capacity(), |b| {
            !self.have.contains(b) && !self.in_flight.contains(b)
        });
        need.truncate(MAX_RANGES_PER_MESSAGE);
        need
    }

    /// The next action at time `now`, if any. Call until it returns `None`.
    pub fn poll(&mut self, now: Instant) -> Option<Action> {
        if let Some((peer, problem)) = self.reports.pop_front() {
            return Some(Action::Report { peer, problem });
        }
        if !self.unreported.is_empty() {
            let ranges: Vec<BlockRange> = self
                .unreported
                .drain(..self.unreported.len().min(MAX_RANGES_PER_MESSAGE))
                .collect();
            return Some(Action::Have(ranges));
        }
        while self.transfers.len() < self.cfg.max_transfers {
            let Some(a) = self.queue.pop_front() else {
                break;
            };
            // Only the blocks still needed, as the first contiguous run of them; the rest of
            // the assignment stays queued.
            let wanted = |b: u32| !self.have.contains(b) && !self.in_flight.contains(b);
            let Some(start) = a.range.iter().find(|b| wanted(*b)) else {
                continue;
            };
            let end = (start..a.range.end)
                .find(|b| !wanted(*b))
                .unwrap_or(a.range.end);
            if end < a.range.end {
                self.queue.push_front(Assignment {
                    range: BlockRange::new(end, a.range.end),
                    source: a.source.clone(),
                });
            }
            let range = BlockRange::new(start, end);
            for b in range.iter() {
                self.in_flight.insert(b);
            }
            let id = self.next_id;
            self.next_id += 1;
            let t = Transfer {
                id,
                range,
                source: a.source,
            };
            self.transfers.insert(id, t.clone());
            return Some(Action::Start(t));
        }
        let want_more = self.transfers.len() < self.cfg.max_transfers && self.queue.is_empty();
        if want_more && !self.locating && self.next_locate.is_none_or(|t| now >= t) {
            let need = self.needed();
            if !need.is_empty() {
                self.locating = true;
                return Some(Action::Locate { need });
            }
        }
        None
    }

    /// When [`Scheduler::poll`] may next have something to do without any other event.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.locating {
            None
        } else {
            self.next_locate
        }
    }

    /// The master answered a Locate.
    pub fn on_assignments(
        &mut self,
        now: Instant,
        assignments: Vec<Assignment>,
        retry_after: Duration,
    ) {
        self.locating = false;
        self.locate_failures = 0;
        if assignments.is_empty() {
            self.next_locate = Some(now + retry_after.max(Duration::from_millis(10)));
        } else {
            self.next_locate = None;
            self.queue.extend(assignments);
        }
    }

    /// The Locate request failed (master unreachable or refused).
    pub fn on_locate_failed(&mut self, now: Instant) {
        self.locating = false;
        let backoff = self
            .cfg
            .locate_backoff
            .saturating_mul(1 << self.locate_failures.min(16))
            .min(self.cfg.max_locate_backoff);
        self.locate_failures += 1;
        self.next_locate = Some(now + backoff);
    }

    /// A transfer ended. `delivered` blocks from the start of its range were verified and
    /// stored; `failure` says why it stopped early, if it did.
    pub fn on_transfer_end(&mut self, id: TransferId, delivered: u32, failure: Option<Failure>) {
        let Some(t) = self.transfers.remove(&id) else {
            return;
        };
        let got = BlockRange::new(t.range.start, (t.range.start + delivered).min(t.range.end));
        for b in t.range.iter() {
            self.in_flight.remove(b);
        }
        for b in got.iter() {
            self.have.insert(b);
        }
        if !got.is_empty() {
            self.unreported.push(got);
        }
        let Some(failure) = failure else { return };
        self.retries += 1;
        // Whatever was not delivered is needed again; ask the master at once.
        self.queue.retain(|a| a.source != t.source);
        self.next_locate = None;
        if let Some(peer) = t.peer() {
            let problem = match failure {
                Failure::Corrupt { block } => Some(Problem::Corrupt {
                    blocks: vec![BlockRange::new(block, block + 1)],
                }),
                Failure::Truncated { block } => Some(Problem::Truncated {
                    blocks: vec![BlockRange::new(block, t.range.end)],
                }),
                Failure::Refused(RefuseReason::NotHeld) => Some(Problem::NotHeld {
                    blocks: vec![t.range],
                }),
                Failure::Unreachable | Failure::Refused(RefuseReason::UnknownFile) => {
                    Some(Problem::Unreachable)
                }
                Failure::Refused(RefuseReason::Busy) => Some(Problem::Busy),
                Failure::Refused(_) | Failure::Local => None,
            };
            if let Some(problem) = problem {
                self.reports.push_back((peer, problem));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    fn drain(s: &mut Scheduler, now: Instant) -> Vec<Action> {
        std::iter::from_fn(|| s.poll(now)).collect()
    }

    fn assign(range: BlockRange, source: Source) -> Assignment {
        Assignment { range, source }
    }

    #[test]
    fn asks_the_master_then_runs_transfers_and_reports_have() {
        let now = Instant::now();
        let mut s = Scheduler::new(Blocks::new(10), SchedulerConfig::default());
        assert_eq!(
            drain(&mut s, now),
            vec![Action::Locate {
                need: vec![BlockRange::new(0, 10)]
            }]
        );
        // While a Locate is outstanding, nothing else happens.
        assert!(drain(&mut s, now).is_empty());
        let p = peer();
        s.on_assignments(
            now,
            vec![
                assign(BlockRange::new(0, 4), Source::Master),
                assign(
                    BlockRange::new(4, 10),
                    Source::Peer {
                        peer: p,
                        addrs: vec![],
                    },
                ),
            ],
            Duration::ZERO,
        );
        let actions = drain(&mut s, now);
        assert!(
            matches!(&actions[0], Action::Start(t) if t.range == BlockRange::new(0, 4) && t.source == Source::Master)
        );
        assert!(
            matches!(&actions[1], Action::Start(t) if t.range == BlockRange::new(4, 10) && t.peer() == Some(p))
        );
        // With everything in flight there is nothing to ask for.
        assert_eq!(actions.len(), 2);
        s.on_transfer_end(0, 4, None);
        assert_eq!(
            drain(&mut s, now),
            vec![Action::Have(vec![BlockRange::new(0, 4)])]
        );
        s.on_transfer_end(1, 6, None);
        assert_eq!(
            drain(&mut s, now),
            vec![Action::Have(vec![BlockRange::new(4, 10)])]
        );
        assert!(s.is_complete());
        assert!(s.is_idle());
    }

    #[test]
    fn an_empty_answer_waits_retry_after_in_virtual_time() {
        let now = Instant::now();
        let mut s = Scheduler::new(Blocks::new(4), SchedulerConfig::default());
        drain(&mut s, now);
        s.on_assignments(now, vec![], Duration::from_millis(200));
        assert!(drain(&mut s, now).is_empty());
        assert_eq!(s.poll_timeout(), Some(now + Duration::from_millis(200)));
        assert!(drain(&mut s, now + Duration::from_millis(199)).is_empty());
        assert!(matches!(
            s.poll(now + Duration::from_millis(200)),
            Some(Action::Locate { .. })
        ));
    }

    #[test]
    fn a_failed_peer_transfer_is_reported_and_its_rest_needed_again() {
        let now = Instant::now();
        let mut s = Scheduler::new(Blocks::new(8), SchedulerConfig::default());
        drain(&mut s, now);
        let p = peer();
        s.on_assignments(
            now,
            vec![assign(
                BlockRange::new(0, 8),
                Source::Peer {
                    peer: p,
                    addrs: vec![],
                },
            )],
            Duration::ZERO,
        );
        drain(&mut s, now);
        s.on_transfer_end(0, 3, Some(Failure::Unreachable));
        let actions = drain(&mut s, now);
        assert_eq!(
            actions[0],
            Action::Report {
                peer: p,
                problem: Problem::Unreachable
            }
        );
        assert_eq!(actions[1], Action::Have(vec![BlockRange::new(0, 3)]));
        assert_eq!(
            actions[2],
            Action::Locate {
                need: vec![BlockRange::new(3, 8)]
            }
        );
        assert_eq!(s.retries(), 1);
    }

    #[test]
    fn corrupt_blocks_are_reported_by_index() {
        let now = Instant::now();
        let mut s = Scheduler::new(Blocks::new(8), SchedulerConfig::default());
        drain(&mut s, now);
        let p = peer();
        s.on_assignments(
            now,
            vec![assign(
                BlockRange::new(2, 6),
                Source::Peer {
                    peer: p,
                    addrs: vec![],
                },
            )],
            Duration::ZERO,
        );
        drain(&mut s, now);
        s.on_transfer_end(0, 1, Some(Failure::Corrupt { block: 3 }));
        assert_eq!(
            s.poll(now),
            Some(Action::Report {
                peer: p,
                problem: Problem::Corrupt {
                    blocks: vec![BlockRange::new(3, 4)]
                }
            })
        );
        assert!(!s.have().contains(3));
    }

    #[test]
    fn a_busy_peer_is_reported_as_busy_and_master_failures_never_are() {
        let now = Instant::now();
        let mut s = Scheduler::new(Blocks::new(8), SchedulerConfig::default());
        drain(&mut s, now);
        let busy = peer();
        s.on_assignments(
            now,
            vec![
                assign(
                    BlockRange::new(0, 4),
                    Source::Peer {
                        peer: busy,
                        addrs: vec![],
                    },
                ),
                assign(BlockRange::new(4, 8), Source::Master),
            ],
            Duration::ZERO,
        );
        drain(&mut s, now);
        s.on_transfer_end(0, 0, Some(Failure::Refused(RefuseReason::Busy)));
        s.on_transfer_end(1, 0, Some(Failure::Unreachable));
        assert_eq!(
            drain(&mut s, now),
            vec![
                Action::Report {
                    peer: busy,
                    problem: Problem::Busy
                },
                Action::Locate {
                    need: vec![BlockRange::new(0, 8)]
                },
            ]
        );
    }

    #[test]
    fn resumed_blocks_are_announced_and_never_asked_for() {
        let now = Instant::now();
        let mut have = Blocks::new(6);
        have.insert_range(BlockRange::new(0, 3));
        let mut s = Scheduler::new(have, SchedulerConfig::default());
        assert_eq!(
            drain(&mut s, now),
            vec![
                Action::Have(vec![BlockRange::new(0, 3)]),
                Action::Locate {
                    need: vec![BlockRange::new(3, 6)]
                },
            ]
        );
        // An assignment overlapping held blocks only starts the missing part.
        s.on_assignments(
            now,
            vec![assign(BlockRange::new(0, 6), Source::Master)],
            Duration::ZERO,
        );
        assert!(matches!(s.poll(now), Some(Action::Start(t)) if t.range == BlockRange::new(3, 6)));
    }

    #[test]
    fn an_absent_master_is_retried_with_growing_back_off() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Blocks::new(4), SchedulerConfig::default());
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..6 {
            assert!(matches!(s.poll(now), Some(Action::Locate { .. })));
            s.on_locate_failed(now);
            let next = s.poll_timeout().unwrap();
            waits.push(next - now);
            assert!(s.poll(next - Duration::from_millis(1)).is_none());
            now = next;
        }
        let ms: Vec<u128> = waits.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![250, 500, 1000, 2000, 4000, 5000]);
        // Once the master answers, the back-off starts over.
        assert!(matches!(s.poll(now), Some(Action::Locate { .. })));
        s.on_assignments(now, vec![], Duration::from_millis(100));
        assert!(matches!(
            s.poll(now + Duration::from_millis(100)),
            Some(Action::Locate { .. })
        ));
        s.on_locate_failed(now);
        assert_eq!(s.poll_timeout(), Some(now + Duration::from_millis(250)));
    }

    #[test]
    fn transfers_are_capped() {
        let now = Instant::now();
        let cfg = SchedulerConfig {
            max_transfers: 2,
            ..SchedulerConfig::default()
        };
        let mut s = Scheduler::new(Blocks::new(10), cfg);
        drain(&mut s, now);
        s.on_assignments(
            now,
            (0..5)
                .map(|i| assign(BlockRange::new(i * 2, i * 2 + 2), Source::Master))
                .collect(),
            Duration::ZERO,
        );
        assert_eq!(drain(&mut s, now).len(), 2);
        s.on_transfer_end(0, 2, None);
        let actions = drain(&mut s, now);
        assert_eq!(
            actions
                .iter()
                .filter(|a| matches!(a, Action::Start(_)))
                .count(),
            1
        );
    }
}
