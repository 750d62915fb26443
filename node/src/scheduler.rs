//! The node's download scheduler: a pure state machine, told the time, doing no I/O.
//!
//! It knows which blocks the node holds and which are in flight, queues the master's
//! assignments, decides when to ask the master again, starts transfers up to a cap, and turns
//! finished and failed transfers into Have reports and problem reports. The shell
//! ([`crate::fetch`]) carries out the [`Action`]s it returns from [`Scheduler::poll`].
//!
//! It also owns the receive side's judgement of a transfer: its deadlines ([`TransferClock`],
//! told the time like the rest) and what the way it ended means ([`Ending::failure`]): only
//! bytes that fail their digest are `Corrupt`; a stream that ends after `Ok` is `Truncated`;
//! resets, refused connections and passed deadlines are `Unreachable`. A peer that died looks
//! exactly like the last two, and is reported as such, never as a liar.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use shoal_protocol::block::{BlockRange, Blocks};
use shoal_protocol::limits::{MAX_ASSIGNMENTS, MAX_PIECE_BLOCKS, MAX_RANGES_PER_MESSAGE};
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
    /// Deadlines of each transfer.
    pub deadlines: TransferDeadlines,
    /// Blocks verified in the middle of a transfer ([`Scheduler::on_progress`]) are told to
    /// the master at most this often, so that others may fetch them from this node before its
    /// whole piece is in; blocks of a transfer that ended as `end_have_interval` says.
    pub have_interval: Duration,
    /// The blocks of a transfer from a peer that ended are told at most this long after the
    /// last Have, together with whatever else is due by then (at once when no Have went out
    /// that recently, or the file is complete); those of a master transfer at once. The next
    /// Locate waits for that Have (the master frees the holder's slot when it hears it). In a
    /// crowd a node ends a short
    /// piece every few tens of milliseconds, and a Have each was about one request to the
    /// master per piece, half of a piece's streams.
    pub end_have_interval: Duration,
}

/// Receive-side deadlines of one transfer: it is abandoned when no byte arrived for `stall`,
/// or when it is not done within `base + bytes / min_rate` (a source that drips just enough
/// to dodge the stall check). Defaults: 10 s, 20 s and 64 KiB/s (a full piece of 256 blocks of
/// 64 KiB has 276 s; a source throttled by its own upload cap, shared by its slots, may be
/// slow without being at fault, hence the low rate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferDeadlines {
    /// Longest wait for the next byte (from opening the stream on).
    pub stall: Duration,
    /// Fixed part of the overall deadline.
    pub base: Duration,
    /// Slowest acceptable average rate, bytes per second.
    pub min_rate: u64,
}

impl Default for TransferDeadlines {
    fn default() -> Self {
        Self {
            stall: Duration::from_secs(10),
            base: Duration::from_secs(20),
            min_rate: 64 * 1024,
        }
    }
}

impl TransferDeadlines {
    /// The overall deadline of a transfer of `bytes`.
    pub fn overall(&self, bytes: u64) -> Duration {
        self.base + Duration::from_secs_f64(bytes as f64 / self.min_rate.max(1) as f64)
    }
}

/// Which deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// No byte for [`TransferDeadlines::stall`].
    Stalled,
    /// Not done within [`TransferDeadlines::overall`].
    TooSlow,
}

/// The deadlines of one running transfer, told the time.
#[derive(Clone, Debug)]
pub struct TransferClock {
    last_progress: Instant,
    stall: Duration,
    overall: Instant,
}

impl TransferClock {
    /// A transfer of `bytes` starting at `now`.
    pub fn start(now: Instant, bytes: u64, d: &TransferDeadlines) -> Self {
        Self {
            last_progress: now,
            stall: d.stall,
            overall: now + d.overall(bytes),
        }
    }

    /// Bytes arrived at `now`.
    pub fn progress(&mut self, now: Instant) {
        self.last_progress = self.last_progress.max(now);
    }

    /// Which deadline has passed at `now`, if any.
    pub fn expired(&self, now: Instant) -> Option<Expiry> {
        if now >= self.overall {
            Some(Expiry::TooSlow)
        } else if now >= self.last_progress + self.stall {
            Some(Expiry::Stalled)
        } else {
            None
        }
    }

    /// When [`TransferClock::expired`] may next say yes, without progress.
    pub fn next_check(&self) -> Instant {
        self.overall.min(self.last_progress + self.stall)
    }
}

/// How a transfer stopped before its last block, as the shell saw it: facts, not judgement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The stream could not be opened, was reset or failed, or ended before the response.
    Broken,
    /// The source refused.
    Refused(RefuseReason),
    /// The source answered `Ok`, then the stream ended (cleanly) before the last block.
    EndedAfterOk,
    /// This block failed its digest.
    BadDigest {
        /// The block.
        block: u32,
    },
    /// A deadline passed.
    Expired(Expiry),
    /// Storing a verified block failed here.
    Local,
}

impl Ending {
    /// What it means, for a transfer of `range` of which `delivered` blocks (from its start)
    /// were verified and stored.
    pub fn failure(&self, range: BlockRange, delivered: u32) -> Failure {
        match self {
            Self::Broken | Self::Expired(_) => Failure::Unreachable,
            Self::Refused(r) => Failure::Refused(*r),
            Self::EndedAfterOk => Failure::Truncated {
                block: range.start.saturating_add(delivered).min(range.end),
            },
            Self::BadDigest { block } => Failure::Corrupt { block: *block },
            Self::Local => Failure::Local,
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_transfers: 8,
            locate_backoff: Duration::from_millis(250),
            max_locate_backoff: Duration::from_secs(5),
            deadlines: TransferDeadlines::default(),
            have_interval: Duration::from_millis(250),
            end_have_interval: Duration::from_millis(50),
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
    /// When `unreported` is due to be told (`None`: at once).
    have_due: Option<Instant>,
    /// When the last Have was told.
    last_have: Option<Instant>,
    /// Per transfer, its blocks already verified and taken into `have` by `on_progress`.
    progressed: HashMap<TransferId, u32>,
    reports: VecDeque<(PeerId, Problem)>,
    retries: u64,
    locate_failures: u32,
    /// Master transfers refused or dropped in a row (its upload slots are full): the next
    /// Locate waits a back-off that grows with it, instead of asking the full master again
    /// at once.
    master_refusals: u32,
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
            have_due: None,
            unreported,
            last_have: None,
            progressed: HashMap::new(),
            reports: VecDeque::new(),
            retries: 0,
            locate_failures: 0,
            master_refusals: 0,
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
        if !self.unreported.is_empty() && self.have_due.is_none_or(|t| now >= t) {
            let ranges: Vec<BlockRange> = self
                .unreported
                .drain(..self.unreported.len().min(MAX_RANGES_PER_MESSAGE))
                .collect();
            if self.unreported.is_empty() {
                self.have_due = None;
            }
            self.last_have = Some(now);
            return Some(Action::Have(ranges));
        }
        while self.transfers.len() < self.cfg.max_transfers {
            let Some(a) = self.queue.pop_front() else {
                break;
            };
            // Only the blocks still needed, as the first contiguous run of them, at most one
            // piece long and within the file; the rest of the assignment stays queued.
            let blocks = self.have.capacity();
            let wanted =
                |b: u32| b < blocks && !self.have.contains(b) && !self.in_flight.contains(b);
            let Some(start) = a.range.iter().find(|b| wanted(*b)) else {
                continue;
            };
            let cap = start.saturating_add(MAX_PIECE_BLOCKS).min(a.range.end);
            let end = (start..cap).find(|b| !wanted(*b)).unwrap_or(cap);
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
            // Everything missing is on its way: nothing to ask, and no time to wake up at
            // (a transfer that fails frees its blocks and allows a Locate again).
            self.next_locate = None;
        }
        None
    }

    /// When [`Scheduler::poll`] may next have something to do without any other event.
    pub fn poll_timeout(&self) -> Option<Instant> {
        // Only when a Locate could then go out: a time that passes while the transfers are
        // full, or assignments are queued, would wake the caller for nothing, over and over.
        let may_locate = !self.locating
            && self.transfers.len() < self.cfg.max_transfers
            && self.queue.is_empty();
        let locate = if may_locate { self.next_locate } else { None };
        let have = if self.unreported.is_empty() {
            None
        } else {
            self.have_due
        };
        match (locate, have) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The first `delivered` blocks of transfer `id` are verified and stored, while the rest
    /// is still coming: they are held from now on and told to the master within
    /// `have_interval` of the last Have (so a node serves the first blocks of a long piece
    /// long before its last block is in, and the master hears of it at a bounded rate).
    pub fn on_progress(&mut self, now: Instant, id: TransferId, delivered: u32) {
        let Some(t) = self.transfers.get(&id) else {
            return;
        };
        let done = self.progressed.get(&id).copied().unwrap_or(0);
        let delivered = delivered.min(t.range.len());
        if delivered <= done {
            return;
        }
        let got = BlockRange::new(t.range.start + done, t.range.start + delivered);
        self.progressed.insert(id, delivered);
        for b in got.iter() {
            self.in_flight.remove(b);
            self.have.insert(b);
        }
        self.tell_have(now, Some(got), self.cfg.have_interval);
    }

    /// Queues `got` (if any) for a Have, and makes whatever is queued due at most `interval`
    /// after the last Have (at once if none was told that recently), or sooner if it already
    /// was.
    fn tell_have(&mut self, now: Instant, got: Option<BlockRange>, interval: Duration) {
        let due_now = !self.unreported.is_empty() && self.have_due.is_none();
        self.unreported.extend(got);
        if due_now || self.unreported.is_empty() {
            return;
        }
        let due = self.last_have.map_or(now, |t| (t + interval).max(now));
        self.have_due = Some(self.have_due.map_or(due, |d| d.min(due)));
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
            // A Locate is only sent with an empty queue, so this bounds the queue too.
            self.queue
                .extend(assignments.into_iter().take(MAX_ASSIGNMENTS));
        }
    }

    /// The Locate request failed (master unreachable or refused).
    pub fn on_locate_failed(&mut self, now: Instant) {
        self.locating = false;
        self.next_locate = Some(now + self.backoff(self.locate_failures));
        self.locate_failures += 1;
    }

    /// `locate_backoff` doubled `failures` times, at most `max_locate_backoff`.
    fn backoff(&self, failures: u32) -> Duration {
        self.cfg
            .locate_backoff
            .saturating_mul(1 << failures.min(16))
            .min(self.cfg.max_locate_backoff)
    }

    /// A transfer ended at `now`. `delivered` blocks from the start of its range were verified
    /// and stored; `failure` says why it stopped early, if it did.
    pub fn on_transfer_end(
        &mut self,
        now: Instant,
        id: TransferId,
        delivered: u32,
        failure: Option<Failure>,
    ) {
        let Some(t) = self.transfers.remove(&id) else {
            return;
        };
        let done = self.progressed.remove(&id).unwrap_or(0);
        let delivered = delivered.max(done);
        let got = BlockRange::new(t.range.start, (t.range.start + delivered).min(t.range.end));
        for b in t.range.iter() {
            self.in_flight.remove(b);
        }
        for b in got.iter() {
            self.have.insert(b);
        }
        // Only what `on_progress` did not take in yet is new.
        let new = BlockRange::new(got.start.saturating_add(done).min(got.end), got.end);
        if !got.is_empty() {
            let interval = match t.source {
                // A master piece is told at once: the master hands this node its next first
                // copies only once it hears that the last ones arrived. So is the last piece:
                // there is nothing left to gather it with.
                Source::Master => Duration::ZERO,
                Source::Peer { .. } if self.have.is_full() => Duration::ZERO,
                Source::Peer { .. } => self.cfg.end_have_interval,
            };
            // Also when `on_progress` took in every block already: what it queued is then due
            // within this interval, not its own longer one.
            self.tell_have(now, (!new.is_empty()).then_some(new), interval);
            // Once the master hears of these, it may have more to give (it hands a requester
            // new first copies only when its last ones arrived, and a holder it was waiting
            // for has a slot free): ask again as soon as it has heard (`poll` tells the Have
            // before it asks), rather than at the end of an old wait.
            self.next_locate = self.have_due.filter(|t| *t > now);
        }
        let Some(peer) = t.peer() else {
            // From the master: a refusal or a dropped stream means its slots are full. Asking
            // it again at once only loads it more (in a crowd, every node would spin on it):
            // wait a growing back-off; by then the blocks may have holders to redirect to.
            match failure {
                None => self.master_refusals = 0,
                Some(Failure::Unreachable | Failure::Refused(RefuseReason::Busy)) => {
                    self.retries += 1;
                    self.queue.retain(|a| a.source != t.source);
                    self.next_locate = Some(now + self.backoff(self.master_refusals));
                    self.master_refusals = self.master_refusals.saturating_add(1);
                }
                Some(_) => {
                    self.retries += 1;
                    self.queue.retain(|a| a.source != t.source);
                    self.next_locate = None;
                }
            }
            return;
        };
        let Some(failure) = failure else { return };
        self.retries += 1;
        // Whatever was not delivered is needed again; ask the master at once.
        self.queue.retain(|a| a.source != t.source);
        self.next_locate = None;
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

/// Most providers [`plan_rarest_first`] weighs (the rest are ignored).
pub const MAX_PLAN_PROVIDERS: usize = 64;

/// Assignments for the blocks of `need` from the peers of `holdings` (each with the blocks it
/// says it holds), made by the node itself while the master is unreachable: rarest first (the
/// blocks the fewest peers hold come first in the answer, so they are fetched before their few
/// holders go), each run of blocks to its least-loaded holder, pieces of at most `max_piece`
/// blocks, at most [`MAX_ASSIGNMENTS`] of them. Blocks no peer holds are left out.
pub fn plan_rarest_first(
    need: &[BlockRange],
    holdings: &[(PeerId, Blocks)],
    max_piece: u32,
) -> Vec<Assignment> {
    let holdings = &holdings[..holdings.len().min(MAX_PLAN_PROVIDERS)];
    let max_piece = max_piece.clamp(1, MAX_PIECE_BLOCKS);
    let holders = |b: u32| -> u64 {
        holdings
            .iter()
            .enumerate()
            .filter(|(_, (_, h))| h.contains(b))
            .fold(0u64, |m, (i, _)| m | (1 << i))
    };
    // Runs of needed blocks with the same holders, at most one piece long.
    let mut segments: Vec<(BlockRange, u64)> = Vec::new();
    for r in need {
        let mut b = r.start;
        while b < r.end {
            let mask = holders(b);
            let mut end = b + 1;
            while end < r.end && end - b < max_piece && holders(end) == mask {
                end += 1;
            }
            if mask != 0 {
                segments.push((BlockRange::new(b, end), mask));
            }
            b = end;
        }
    }
    segments.sort_by_key(|(r, mask)| (mask.count_ones(), r.start));
    let mut load = vec![0u64; holdings.len()];
    segments
        .into_iter()
        .take(MAX_ASSIGNMENTS)
        .filter_map(|(range, mask)| {
            let i = (0..holdings.len())
                .filter(|i| mask & (1 << i) != 0)
                .min_by_key(|i| (load[*i], *i))?;
            load[i] += u64::from(range.len());
            Some(Assignment {
                range,
                source: Source::Peer {
                    peer: holdings[i].0,
                    addrs: Vec::new(),
                },
            })
        })
        .collect()
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

    fn holding(n: u32, ranges: &[(u32, u32)]) -> Blocks {
        let mut b = Blocks::new(n);
        for (s, e) in ranges {
            b.insert_range(BlockRange::new(*s, *e));
        }
        b
    }

    fn peer_of(a: &Assignment) -> PeerId {
        match &a.source {
            Source::Peer { peer, .. } => *peer,
            Source::Master => panic!("a swarm plan never names the master"),
        }
    }

    #[test]
    fn a_swarm_plan_is_rarest_first_spread_and_skips_what_nobody_holds() {
        let (a, b, c) = (peer(), peer(), peer());
        // Blocks 0..8 held by all three, 8..12 by b only, 12..16 by nobody.
        let holdings = vec![
            (a, holding(16, &[(0, 8)])),
            (b, holding(16, &[(0, 12)])),
            (c, holding(16, &[(0, 8)])),
        ];
        let plan = plan_rarest_first(&[BlockRange::new(0, 16)], &holdings, 2);
        // The rare run comes first, from its only holder.
        assert_eq!(plan[0].range, BlockRange::new(8, 10));
        assert_eq!(peer_of(&plan[0]), b);
        assert_eq!(plan[1].range, BlockRange::new(10, 12));
        // Every needed block that someone holds, once, in pieces of at most 2.
        let mut covered = Blocks::new(16);
        for p in &plan {
            assert!(p.range.len() <= 2);
            assert!(holdings
                .iter()
                .any(|(q, h)| *q == peer_of(p) && h.contains_range(p.range)));
            assert_eq!(covered.insert_range(p.range), p.range.len(), "{p:?} twice");
        }
        assert_eq!(covered.count(), 12);
        assert!(!covered.contains(12));
        // The common blocks are spread: b already has 4 blocks, so a and c get more of them.
        let load = |q: PeerId| -> u32 {
            plan.iter()
                .filter(|p| peer_of(p) == q)
                .map(|p| p.range.len())
                .sum()
        };
        assert_eq!(load(a) + load(b) + load(c), 12);
        assert!(
            load(a) >= 2 && load(c) >= 2,
            "{} {} {}",
            load(a),
            load(b),
            load(c)
        );
        assert!(load(b) <= 6);
    }

    #[test]
    fn a_swarm_plan_only_covers_what_is_needed_and_is_capped() {
        let a = peer();
        let n = 4 * MAX_ASSIGNMENTS as u32;
        let holdings = vec![(a, holding(n, &[(0, n)]))];
        let plan = plan_rarest_first(&[BlockRange::new(3, 5)], &holdings, MAX_PIECE_BLOCKS);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].range, BlockRange::new(3, 5));
        // Every other block needed: one assignment each, capped.
        let need: Vec<BlockRange> = (0..n)
            .step_by(2)
            .map(|b| BlockRange::new(b, b + 1))
            .collect();
        assert_eq!(
            plan_rarest_first(&need, &holdings, 8).len(),
            MAX_ASSIGNMENTS
        );
        assert!(plan_rarest_first(&need, &[], 8).is_empty());
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
        s.on_transfer_end(now, 0, 4, None);
        assert_eq!(
            drain(&mut s, now),
            vec![Action::Have(vec![BlockRange::new(0, 4)])]
        );
        // The last piece is told at once, even from a peer right after a Have.
        s.on_transfer_end(now, 1, 6, None);
        assert_eq!(
            drain(&mut s, now),
            vec![Action::Have(vec![BlockRange::new(4, 10)])]
        );
        assert!(s.is_complete());
        assert!(s.is_idle());
    }

    fn from_peer(p: PeerId, range: BlockRange) -> Assignment {
        assign(
            range,
            Source::Peer {
                peer: p,
                addrs: vec![],
            },
        )
    }

    #[test]
    fn blocks_verified_mid_transfer_are_held_and_told_at_a_bounded_rate() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Scheduler::new(Blocks::new(8), SchedulerConfig::default());
        drain(&mut s, now);
        s.on_assignments(now, vec![from_peer(peer(), BlockRange::new(0, 8))], ms(0));
        assert_eq!(drain(&mut s, now).len(), 1);
        // The first blocks of a piece are told at once: others may fetch them from here now.
        s.on_progress(now, 0, 2);
        assert!(s.have().contains_range(BlockRange::new(0, 2)));
        assert_eq!(
            drain(&mut s, now),
            vec![Action::Have(vec![BlockRange::new(0, 2)])]
        );
        // More, soon after: held at once, told only when the interval since the last Have
        // has passed.
        s.on_progress(now + ms(10), 0, 4);
        s.on_progress(now + ms(20), 0, 3); // stale counts change nothing
        assert!(s.have().contains_range(BlockRange::new(0, 4)));
        assert!(drain(&mut s, now + ms(10)).is_empty());
        assert_eq!(s.poll_timeout(), Some(now + ms(250)));
        assert!(drain(&mut s, now + ms(249)).is_empty());
        assert_eq!(
            drain(&mut s, now + ms(250)),
            vec![Action::Have(vec![BlockRange::new(2, 4)])]
        );
        // The end of the file's last piece is told at once, with what was queued before it,
        // and only what was not told yet.
        s.on_progress(now + ms(260), 0, 5);
        s.on_transfer_end(now + ms(270), 0, 8, None);
        assert_eq!(
            drain(&mut s, now + ms(270)),
            vec![Action::Have(vec![
                BlockRange::new(4, 5),
                BlockRange::new(5, 8)
            ])]
        );
        assert!(s.is_complete() && s.is_idle());
    }

    /// A scheduler of `blocks` blocks, after its first poll, given `assignments` at `now`.
    fn given(blocks: u32, now: Instant, assignments: Vec<Assignment>) -> Scheduler {
        let mut s = Scheduler::new(Blocks::new(blocks), SchedulerConfig::default());
        drain(&mut s, now);
        s.on_assignments(now, assignments, Duration::ZERO);
        s
    }

    #[test]
    fn ended_peer_pieces_are_told_together_and_master_pieces_at_once() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let (a, b) = (peer(), peer());
        let mut s = given(
            8,
            now,
            vec![
                from_peer(a, BlockRange::new(0, 2)),
                from_peer(b, BlockRange::new(2, 4)),
                from_peer(a, BlockRange::new(4, 6)),
                assign(BlockRange::new(6, 8), Source::Master),
            ],
        );
        assert_eq!(drain(&mut s, now).len(), 4);
        // The first piece to end, with no Have told before: at once.
        s.on_transfer_end(now + ms(5), 0, 2, None);
        assert_eq!(
            drain(&mut s, now + ms(5)),
            vec![Action::Have(vec![BlockRange::new(0, 2)])]
        );
        // Two more soon after: gathered into one Have, 50 ms after the last.
        s.on_transfer_end(now + ms(10), 1, 2, None);
        s.on_transfer_end(now + ms(30), 2, 2, None);
        assert!(drain(&mut s, now + ms(30)).is_empty());
        assert_eq!(s.poll_timeout(), Some(now + ms(55)));
        assert!(drain(&mut s, now + ms(54)).is_empty());
        assert_eq!(
            drain(&mut s, now + ms(55)),
            vec![Action::Have(vec![
                BlockRange::new(2, 4),
                BlockRange::new(4, 6)
            ])]
        );
        // A master piece right after: at once, however recent the last Have.
        s.on_transfer_end(now + ms(56), 3, 2, None);
        assert_eq!(
            drain(&mut s, now + ms(56)),
            vec![Action::Have(vec![BlockRange::new(6, 8)])]
        );
        assert!(s.is_idle());
    }

    #[test]
    fn a_locate_after_a_peer_piece_waits_for_its_have() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let (a, b, c) = (peer(), peer(), peer());
        let mut s = given(
            8,
            now,
            vec![
                from_peer(a, BlockRange::new(0, 2)),
                from_peer(b, BlockRange::new(2, 4)),
            ],
        );
        let need = || Action::Locate {
            need: vec![BlockRange::new(4, 8)],
        };
        assert_eq!(drain(&mut s, now).last(), Some(&need()));
        // Nothing to give now; ask again in a second.
        s.on_assignments(now, vec![], ms(1000));
        // A piece ends with no Have told before: its Have at once, then the Locate.
        s.on_transfer_end(now + ms(5), 0, 2, None);
        assert_eq!(
            drain(&mut s, now + ms(5)),
            vec![Action::Have(vec![BlockRange::new(0, 2)]), need()]
        );
        s.on_assignments(now + ms(5), vec![], ms(1000));
        // The next one's Have is gathered for 50 ms after the last, and the Locate follows it
        // (not the old second's wait, and not before the master has heard).
        s.on_transfer_end(now + ms(20), 1, 2, None);
        assert!(drain(&mut s, now + ms(20)).is_empty());
        assert!(!s.is_idle());
        assert_eq!(s.poll_timeout(), Some(now + ms(55)));
        assert_eq!(
            drain(&mut s, now + ms(55)),
            vec![Action::Have(vec![BlockRange::new(2, 4)]), need()]
        );
        // The last piece, from a peer right after a Have: at once (nothing left to gather).
        s.on_assignments(
            now + ms(55),
            vec![from_peer(c, BlockRange::new(4, 8))],
            ms(0),
        );
        assert_eq!(drain(&mut s, now + ms(55)).len(), 1);
        s.on_transfer_end(now + ms(60), 2, 4, None);
        assert_eq!(
            drain(&mut s, now + ms(60)),
            vec![Action::Have(vec![BlockRange::new(4, 8)])]
        );
        assert!(s.is_complete() && s.is_idle());
    }

    #[test]
    fn a_piece_whose_blocks_were_all_taken_in_by_progress_is_told_within_the_end_interval() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut s = given(
            8,
            now,
            vec![
                from_peer(peer(), BlockRange::new(0, 2)),
                from_peer(peer(), BlockRange::new(2, 4)),
            ],
        );
        // Two transfers and a Locate for the rest, answered with nothing for a second.
        assert_eq!(drain(&mut s, now).len(), 3);
        s.on_assignments(now, vec![], ms(1000));
        s.on_progress(now, 0, 1);
        // The first Have, at once.
        assert_eq!(drain(&mut s, now).len(), 1);
        // The piece's last block comes in as progress (due with the 250 ms interval), then
        // the piece ends: due within 50 ms of the last Have, and the Locate after it.
        s.on_progress(now + ms(10), 0, 2);
        assert_eq!(s.poll_timeout(), Some(now + ms(250)));
        s.on_transfer_end(now + ms(12), 0, 2, None);
        assert_eq!(s.poll_timeout(), Some(now + ms(50)));
        let actions = drain(&mut s, now + ms(50));
        assert_eq!(actions[0], Action::Have(vec![BlockRange::new(1, 2)]));
        assert!(matches!(actions[1], Action::Locate { .. }));
    }

    #[test]
    fn no_wake_up_is_due_while_no_locate_can_go() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let cfg = SchedulerConfig {
            max_transfers: 2,
            ..SchedulerConfig::default()
        };
        let mut s = Scheduler::new(Blocks::new(16), cfg);
        drain(&mut s, now);
        let p = peer();
        s.on_assignments(
            now,
            (0..4)
                .map(|i| from_peer(p, BlockRange::new(2 * i, 2 * i + 2)))
                .collect(),
            ms(0),
        );
        assert_eq!(drain(&mut s, now).len(), 2);
        s.on_transfer_end(now + ms(1), 0, 2, None);
        // Its Have, and the next transfer.
        assert_eq!(drain(&mut s, now + ms(1)).len(), 2);
        // A piece ends while assignments are still queued: its Have waits 50 ms, and then,
        // with the transfers full again, nothing is due until something happens.
        s.on_transfer_end(now + ms(2), 1, 2, None);
        assert_eq!(drain(&mut s, now + ms(2)).len(), 1); // the last queued transfer
        assert_eq!(s.poll_timeout(), Some(now + ms(51)));
        assert_eq!(drain(&mut s, now + ms(51)).len(), 1); // the Have
        assert_eq!(s.transfers(), 2);
        assert_eq!(s.poll_timeout(), None);
        // Near the end: a piece ends while every missing block is in flight. Once its Have
        // is told there is nothing to ask for, and nothing is due either.
        s.on_assignments(
            now + ms(52),
            vec![from_peer(p, BlockRange::new(8, 16))],
            ms(0),
        );
        s.on_transfer_end(now + ms(60), 2, 2, None);
        assert_eq!(drain(&mut s, now + ms(60)).len(), 1); // the last queued transfer
        s.on_transfer_end(now + ms(70), 3, 2, None);
        assert!(drain(&mut s, now + ms(70)).is_empty());
        assert_eq!(s.poll_timeout(), Some(now + ms(101)));
        assert_eq!(drain(&mut s, now + ms(101)).len(), 1); // the Have, and no Locate
        assert_eq!(s.transfers(), 1);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn blocks_verified_before_a_transfer_failed_are_kept() {
        let now = Instant::now();
        let p = peer();
        let mut s = Scheduler::new(Blocks::new(8), SchedulerConfig::default());
        drain(&mut s, now);
        s.on_assignments(
            now,
            vec![from_peer(p, BlockRange::new(0, 8))],
            Duration::ZERO,
        );
        drain(&mut s, now);
        s.on_progress(now, 0, 3);
        drain(&mut s, now);
        // The shell saw fewer blocks than it said before (it cannot, but a count is no
        // reason to drop verified blocks): all three stay held, and only the rest is
        // asked for again.
        s.on_transfer_end(now, 0, 1, Some(Failure::Unreachable));
        assert!(s.have().contains_range(BlockRange::new(0, 3)));
        let actions = drain(&mut s, now);
        assert_eq!(
            actions,
            vec![
                Action::Report {
                    peer: p,
                    problem: Problem::Unreachable
                },
                Action::Locate {
                    need: vec![BlockRange::new(3, 8)]
                }
            ]
        );
        // A progress report for a transfer that ended is ignored.
        s.on_progress(now, 0, 8);
        assert!(!s.have().contains(3));
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
        s.on_transfer_end(now, 0, 3, Some(Failure::Unreachable));
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
        s.on_transfer_end(now, 0, 1, Some(Failure::Corrupt { block: 3 }));
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
        s.on_transfer_end(now, 0, 0, Some(Failure::Refused(RefuseReason::Busy)));
        s.on_transfer_end(now, 1, 0, Some(Failure::Unreachable));
        // The busy peer is reported; the master is not, and is given a moment before the
        // blocks are asked for again.
        assert_eq!(
            drain(&mut s, now),
            vec![Action::Report {
                peer: busy,
                problem: Problem::Busy
            }]
        );
        assert_eq!(
            drain(&mut s, now + Duration::from_millis(250)),
            vec![Action::Locate {
                need: vec![BlockRange::new(0, 8)]
            }]
        );
    }

    #[test]
    fn blocks_arriving_end_a_wait_for_the_master() {
        let now = Instant::now();
        let mut s = Scheduler::new(Blocks::new(8), SchedulerConfig::default());
        drain(&mut s, now);
        s.on_assignments(
            now,
            vec![assign(BlockRange::new(0, 4), Source::Master)],
            Duration::ZERO,
        );
        assert!(matches!(s.poll(now), Some(Action::Start(_))));
        // The rest: nothing now, wait 200 ms.
        assert!(matches!(s.poll(now), Some(Action::Locate { .. })));
        s.on_assignments(now, vec![], Duration::from_millis(200));
        assert_eq!(s.poll(now), None);
        // The transfer delivers: the master may have more for us once it hears of it.
        let later = now + Duration::from_millis(50);
        s.on_transfer_end(later, 0, 4, None);
        assert_eq!(
            drain(&mut s, later),
            vec![
                Action::Have(vec![BlockRange::new(0, 4)]),
                Action::Locate {
                    need: vec![BlockRange::new(4, 8)]
                },
            ]
        );
    }

    #[test]
    fn a_full_master_is_asked_again_after_a_growing_back_off() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Blocks::new(8), SchedulerConfig::default());
        let mut now = t0;
        let mut waits = Vec::new();
        for i in 0..5 {
            assert!(matches!(s.poll(now), Some(Action::Locate { .. })));
            s.on_assignments(
                now,
                vec![assign(BlockRange::new(0, 8), Source::Master)],
                Duration::ZERO,
            );
            assert!(matches!(s.poll(now), Some(Action::Start(t)) if t.id == i));
            // The master dropped the stream (full) or refused it: no report, no new Locate yet.
            let failure = if i % 2 == 0 {
                Failure::Unreachable
            } else {
                Failure::Refused(RefuseReason::Busy)
            };
            s.on_transfer_end(now, i, 0, Some(failure));
            assert_eq!(s.poll(now), None);
            let next = s.poll_timeout().expect("a retry is planned");
            waits.push((next - now).as_millis());
            now = next;
        }
        assert_eq!(waits, vec![250, 500, 1000, 2000, 4000]);
        assert_eq!(s.retries(), 5);
        // A master transfer that delivers starts the back-off over.
        assert!(matches!(s.poll(now), Some(Action::Locate { .. })));
        s.on_assignments(
            now,
            vec![
                assign(BlockRange::new(0, 4), Source::Master),
                assign(BlockRange::new(4, 8), Source::Master),
            ],
            Duration::ZERO,
        );
        assert!(matches!(s.poll(now), Some(Action::Start(t)) if t.id == 5));
        assert!(matches!(s.poll(now), Some(Action::Start(t)) if t.id == 6));
        s.on_transfer_end(now, 5, 4, None);
        s.on_transfer_end(now, 6, 0, Some(Failure::Unreachable));
        assert_eq!(
            drain(&mut s, now),
            vec![Action::Have(vec![BlockRange::new(0, 4)])]
        );
        assert_eq!(s.poll_timeout(), Some(now + Duration::from_millis(250)));
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
        s.on_transfer_end(now, 0, 2, None);
        let actions = drain(&mut s, now);
        assert_eq!(
            actions
                .iter()
                .filter(|a| matches!(a, Action::Start(_)))
                .count(),
            1
        );
    }

    /// Runs one peer transfer of `range` that ends as `ending` after `delivered` blocks and
    /// returns what the scheduler reports about the peer.
    fn report_for(range: BlockRange, delivered: u32, ending: Ending) -> Option<Problem> {
        let now = Instant::now();
        let mut s = Scheduler::new(Blocks::new(16), SchedulerConfig::default());
        drain(&mut s, now);
        let p = peer();
        let source = Source::Peer {
            peer: p,
            addrs: vec![],
        };
        s.on_assignments(now, vec![assign(range, source)], Duration::ZERO);
        assert!(matches!(s.poll(now), Some(Action::Start(_))));
        s.on_transfer_end(now, 0, delivered, Some(ending.failure(range, delivered)));
        drain(&mut s, now).into_iter().find_map(|a| match a {
            Action::Report { peer, problem } if peer == p => Some(problem),
            _ => None,
        })
    }

    #[test]
    fn each_ending_maps_to_what_it_proves() {
        let r = BlockRange::new(4, 12);
        // Only a digest failure is corruption.
        assert_eq!(
            report_for(r, 2, Ending::BadDigest { block: 6 }),
            Some(Problem::Corrupt {
                blocks: vec![BlockRange::new(6, 7)]
            })
        );
        // A stream cut after Ok is truncation of the rest, not corruption.
        assert_eq!(
            report_for(r, 3, Ending::EndedAfterOk),
            Some(Problem::Truncated {
                blocks: vec![BlockRange::new(7, 12)]
            })
        );
        // Resets, failures before the response and passed deadlines: unreachable.
        for e in [
            Ending::Broken,
            Ending::Expired(Expiry::Stalled),
            Ending::Expired(Expiry::TooSlow),
        ] {
            assert_eq!(
                report_for(r, 1, e.clone()),
                Some(Problem::Unreachable),
                "{e:?}"
            );
        }
        assert_eq!(
            report_for(r, 0, Ending::Refused(RefuseReason::NotHeld)),
            Some(Problem::NotHeld { blocks: vec![r] })
        );
        assert_eq!(
            report_for(r, 0, Ending::Refused(RefuseReason::Busy)),
            Some(Problem::Busy)
        );
        // Our own disk failing, or being refused for a reason that is ours, blames nobody.
        assert_eq!(report_for(r, 5, Ending::Local), None);
        assert_eq!(
            report_for(r, 0, Ending::Refused(RefuseReason::BadRange)),
            None
        );
    }

    #[test]
    fn a_source_that_stalls_after_ok_expires_at_the_stall_deadline() {
        let d = TransferDeadlines::default();
        let t0 = Instant::now();
        // 64 blocks of 64 KiB: overall deadline 20 s + 4 MiB / 64 KiB/s = 84 s.
        let bytes = 64 * 64 * 1024;
        assert_eq!(d.overall(bytes), Duration::from_secs(84));
        let mut c = TransferClock::start(t0, bytes, &d);
        // The Ok frame arrived after 1 s, then nothing.
        c.progress(t0 + Duration::from_secs(1));
        assert_eq!(c.expired(t0 + Duration::from_millis(10_999)), None);
        assert_eq!(c.next_check(), t0 + Duration::from_secs(11));
        assert_eq!(
            c.expired(t0 + Duration::from_secs(11)),
            Some(Expiry::Stalled)
        );
        let failure = Ending::Expired(Expiry::Stalled).failure(BlockRange::new(0, 64), 0);
        assert_eq!(failure, Failure::Unreachable);
    }

    #[test]
    fn a_source_that_drips_expires_at_the_overall_deadline() {
        let d = TransferDeadlines::default();
        let t0 = Instant::now();
        let bytes = 64 * 64 * 1024;
        let mut c = TransferClock::start(t0, bytes, &d);
        // A byte every 9 s dodges the stall check...
        let mut t = t0;
        while t < t0 + Duration::from_secs(80) {
            t += Duration::from_secs(9);
            assert_eq!(c.expired(t), None, "at {:?}", t - t0);
            c.progress(t);
        }
        // ...but not the overall deadline.
        assert_eq!(c.next_check(), t0 + Duration::from_secs(84));
        assert_eq!(
            c.expired(t0 + Duration::from_secs(84)),
            Some(Expiry::TooSlow)
        );
        // Progress reported late (out of order) never moves the clock back.
        c.progress(t0);
        assert_eq!(c.next_check(), t0 + Duration::from_secs(84));
    }

    #[test]
    fn transfers_are_at_most_one_piece_and_within_the_file() {
        let now = Instant::now();
        let mut s = Scheduler::new(Blocks::new(600), SchedulerConfig::default());
        drain(&mut s, now);
        s.on_assignments(
            now,
            vec![assign(BlockRange::new(0, 10_000), Source::Master)],
            Duration::ZERO,
        );
        let ranges: Vec<BlockRange> = drain(&mut s, now)
            .into_iter()
            .filter_map(|a| match a {
                Action::Start(t) => Some(t.range),
                _ => None,
            })
            .collect();
        assert_eq!(
            ranges,
            vec![
                BlockRange::new(0, 256),
                BlockRange::new(256, 512),
                BlockRange::new(512, 600)
            ]
        );
    }
}
