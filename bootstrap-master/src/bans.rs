//! The ban rule: when reports turn into a swarm-wide ban. Pure: no I/O, no clock (every call
//! that depends on time takes `now`).
//!
//! Threat model and rule (see ARCHITECTURE.md for the full discussion). The shell hands this
//! book only reports it has checked: the master assigned that suspect to that reporter for
//! those blocks of a known file within the assignment window, and the suspect is not the
//! master. Only the master's own probe bans:
//! - An **accusation** (`Corrupt`, or `Truncated` by a peer still connected to the master)
//!   records the reporter and, unless a probe is already running, starts a **probe**: the
//!   master fetches the reported blocks from the suspect under a throw-away identity, so the
//!   suspect cannot tell the probe from any other node's request, and checks them against
//!   the manifest.
//! - A **lie about holdings** (`NotHeld` for blocks the suspect was assigned for, which the
//!   shell has already taken off its claims) is a strike; `lie_strikes` strikes within
//!   `lie_window` start a probe of the refused blocks.
//! - Probe outcomes: bytes that fail their digest **ban**. Good bytes **acquit**: the
//!   accusations are dropped and every accuser's credibility halves. A probe cut off after
//!   `Ok`, or answered `NotHeld` for blocks the suspect was assigned for, **bans only if the
//!   suspect stayed connected to the master** from the report to the result: a peer that
//!   died looks exactly like a cut-off, a live one that cuts off the master's probe (or
//!   denies holding what it claimed) is lying. Anything else (unknown file, no address,
//!   dial failure, busy, stall, timeout) is **no evidence**: nothing happens, and the next
//!   accusation probes again.
//! - There is no "enough accusations ban without a probe" fallback: reporters are PeerIds
//!   and PeerIds are free, so a count of them is no evidence. A connected peer that stalls
//!   or refuses probes as `Busy` looks the same as an honest peer whose upload slots are
//!   held by colluders, so that is no evidence either.
//! - Once acquitted, a suspect is probed again only on accusations weighing at least
//!   `reprobe_weight`; a liar's weight halves with each acquittal of someone it accused.
//!
//! Every table is bounded: cases (`max_cases`, least recently active evicted first, never
//! one with a probe running), accusers per case (`max_accusers`), credibility entries
//! (`max_credibility_entries`, the most credible evicted first, as it matters least); cases
//! and credibility entries expire after `case_ttl` / `credibility_ttl` without activity.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use shoal_protocol::block::{normalize, BlockRange};
use shoal_protocol::limits::{MAX_PIECE_BLOCKS, MAX_RANGES_PER_MESSAGE};
use shoal_protocol::wire::Problem;

/// Why a report is ignored before the assignment check (or by it: `NotAssigned`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// It is about the master itself.
    Master,
    /// It is about the reporter itself.
    Reporter,
    /// The file is unknown.
    UnknownFile,
    /// It names no block of the file (for a problem about blocks).
    NoBlocks,
    /// It names more blocks than one piece holds.
    TooManyBlocks,
    /// The master did not assign that culprit to that reporter for those blocks.
    NotAssigned,
}

impl Ignored {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Master => "master",
            Self::Reporter => "self",
            Self::UnknownFile => "unknown_file",
            Self::NoBlocks => "no_blocks",
            Self::TooManyBlocks => "too_many_blocks",
            Self::NotAssigned => "not_assigned",
        }
    }
}

/// First look at a report from `reporter` about `culprit` to the master `master`, for a file
/// of `file_blocks` blocks (`None`: unknown): the reported blocks, clamped to the file, merged
/// and capped to one piece (empty for `Unreachable` and `Busy`), or why it is ignored. The
/// caller then checks the assignment ([`crate::policy::Policy::assigned`]).
pub fn screen(
    master: &PeerId,
    reporter: &PeerId,
    culprit: &PeerId,
    problem: &Problem,
    file_blocks: Option<u32>,
) -> Result<Vec<BlockRange>, Ignored> {
    if culprit == master {
        // The master serves bytes it verified itself; nobody gets it to doubt them.
        return Err(Ignored::Master);
    }
    if culprit == reporter {
        return Err(Ignored::Reporter);
    }
    let file_blocks = file_blocks.ok_or(Ignored::UnknownFile)?;
    match problem {
        Problem::Corrupt { blocks }
        | Problem::Truncated { blocks }
        | Problem::NotHeld { blocks } => {
            let blocks = normalize(blocks, file_blocks, MAX_RANGES_PER_MESSAGE);
            let total: u64 = blocks.iter().map(|r| u64::from(r.len())).sum();
            if total == 0 {
                Err(Ignored::NoBlocks)
            } else if total > u64::from(MAX_PIECE_BLOCKS) {
                Err(Ignored::TooManyBlocks)
            } else {
                Ok(blocks)
            }
        }
        Problem::Unreachable | Problem::Busy => Ok(Vec::new()),
    }
}

/// How long a reporter is not sent back to a peer that was unreachable, cut it off or
/// denied holding blocks.
pub const AVOID_FAILED: Duration = Duration::from_secs(30);

/// How long a reporter is not sent back to a busy peer.
pub const AVOID_BUSY: Duration = Duration::from_secs(2);

/// What a report costs its suspect in the book.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charge {
    /// Nothing: it is no evidence of lying.
    None,
    /// An accusation: [`BanBook::accuse`].
    Accusation,
    /// A lie about holdings: [`BanBook::lied`].
    Lie,
}

/// What the master does about a checked report (the master assigned the suspect to the
/// reporter for those blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// The reporter is not sent to the suspect again for this long (`None`: for good).
    pub avoid: Option<Duration>,
    /// The suspect is gone: drop it from every mirror list.
    pub drop_mirror: bool,
    /// Take the reported blocks off the suspect's claims.
    pub forget_claims: bool,
    /// What to record.
    pub charge: Charge,
}

/// The rule for a checked report of `problem`; `connected` says whether the suspect is
/// connected to the master now. Only `Corrupt` accuses; a cut-off accuses only a suspect the
/// master still sees (a dead one looks exactly like it and is just dropped); `NotHeld` costs
/// the claims at once and is a strike; `Unreachable` and `Busy` only keep the reporter away.
pub fn respond(problem: &Problem, connected: bool) -> Response {
    let r = |avoid, drop_mirror, forget_claims, charge| Response {
        avoid,
        drop_mirror,
        forget_claims,
        charge,
    };
    match problem {
        Problem::Busy => r(Some(AVOID_BUSY), false, false, Charge::None),
        Problem::Unreachable => r(Some(AVOID_FAILED), !connected, false, Charge::None),
        Problem::Truncated { .. } if connected => {
            r(Some(AVOID_FAILED), false, false, Charge::Accusation)
        }
        Problem::Truncated { .. } => r(Some(AVOID_FAILED), true, false, Charge::None),
        Problem::Corrupt { .. } => r(None, false, false, Charge::Accusation),
        Problem::NotHeld { .. } => r(Some(AVOID_FAILED), false, true, Charge::Lie),
    }
}

/// Tunables of the ban rule.
#[derive(Clone, Debug)]
pub struct BanConfig {
    /// Credibility a reporter keeps after each acquittal of someone it accused (factor).
    pub false_accusation_factor: f64,
    /// Below this credibility a reporter's accusations are recorded with no weight.
    pub min_credibility: f64,
    /// Accusation weight that reopens the case of an acquitted suspect (a new probe).
    pub reprobe_weight: f64,
    /// Lies about holdings within `lie_window` that start a probe.
    pub lie_strikes: usize,
    /// Window over which lies about holdings add up.
    pub lie_window: Duration,
    /// A case with no activity for this long is forgotten.
    pub case_ttl: Duration,
    /// Most open cases.
    pub max_cases: usize,
    /// Most accusers recorded per case.
    pub max_accusers: usize,
    /// A lowered credibility with no activity for this long is forgotten.
    pub credibility_ttl: Duration,
    /// Most reporters with a lowered credibility remembered.
    pub max_credibility_entries: usize,
}

impl Default for BanConfig {
    fn default() -> Self {
        Self {
            false_accusation_factor: 0.5,
            min_credibility: 0.1,
            reprobe_weight: 3.0,
            lie_strikes: 3,
            lie_window: Duration::from_secs(600),
            case_ttl: Duration::from_secs(600),
            max_cases: 4096,
            max_accusers: 64,
            credibility_ttl: Duration::from_secs(3600),
            max_credibility_entries: 4096,
        }
    }
}

/// What the master must do after a report or a probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing more.
    Nothing,
    /// Probe `suspect` for `blocks`.
    Probe {
        /// The suspect.
        suspect: PeerId,
        /// The blocks reported.
        blocks: BlockRange,
    },
    /// Ban `suspect` swarm-wide.
    Ban(PeerId),
}

/// How a probe went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The suspect served bytes that fail their digest (corrupt or another block's).
    Corrupt,
    /// The suspect served the right bytes.
    Honest,
    /// The suspect answered `Ok`, then the stream ended or was reset before every block
    /// arrived: evidence only if the suspect is still connected to the master.
    CutOff,
    /// The suspect refused with `NotHeld` blocks it was assigned for: evidence only if the
    /// suspect is still connected to the master.
    NotHeld,
    /// No evidence either way (unknown file, no address, dial failure, busy, timeout).
    Inconclusive,
}

impl ProbeOutcome {
    /// A short label, for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Corrupt => "corrupt",
            Self::Honest => "honest",
            Self::CutOff => "cut_off",
            Self::NotHeld => "not_held",
            Self::Inconclusive => "inconclusive",
        }
    }
}

#[derive(Debug)]
struct Case {
    accusers: HashSet<PeerId>,
    /// When the recent lies about holdings were reported (at most `lie_strikes`).
    lies: VecDeque<Instant>,
    probing: bool,
    acquitted: bool,
    /// The suspect disconnected from the master since the running probe started.
    gone: bool,
    last: Instant,
}

impl Case {
    fn new(now: Instant) -> Self {
        Self {
            accusers: HashSet::new(),
            lies: VecDeque::new(),
            probing: false,
            acquitted: false,
            gone: false,
            last: now,
        }
    }

    fn start_probe(&mut self, suspect: PeerId, blocks: BlockRange) -> Verdict {
        self.probing = true;
        self.gone = false;
        self.acquitted = false;
        Verdict::Probe { suspect, blocks }
    }
}

/// Accusations, credibility and bans.
#[derive(Debug)]
pub struct BanBook {
    cfg: BanConfig,
    cases: HashMap<PeerId, Case>,
    /// Lowered credibilities, with when they last changed.
    credibility: HashMap<PeerId, (f64, Instant)>,
    banned: HashSet<PeerId>,
}

impl Default for BanBook {
    fn default() -> Self {
        Self::new(BanConfig::default())
    }
}

impl BanBook {
    /// An empty book.
    pub fn new(cfg: BanConfig) -> Self {
        Self {
            cfg,
            cases: HashMap::new(),
            credibility: HashMap::new(),
            banned: HashSet::new(),
        }
    }

    /// Whether `peer` is banned.
    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned.contains(peer)
    }

    /// Every banned peer.
    pub fn banned(&self) -> impl Iterator<Item = &PeerId> {
        self.banned.iter()
    }

    /// Records a ban decided elsewhere (or loaded from disk).
    pub fn ban(&mut self, peer: PeerId) {
        self.cases.remove(&peer);
        self.banned.insert(peer);
    }

    /// A reporter's current credibility (1.0 to start).
    pub fn credibility(&self, reporter: &PeerId) -> f64 {
        self.credibility.get(reporter).map_or(1.0, |c| c.0)
    }

    /// Number of open cases.
    pub fn cases(&self) -> usize {
        self.cases.len()
    }

    /// Number of remembered credibility entries.
    pub fn credibility_entries(&self) -> usize {
        self.credibility.len()
    }

    fn weight(&self, accusers: &HashSet<PeerId>) -> f64 {
        accusers
            .iter()
            .map(|r| self.credibility(r))
            .filter(|c| *c >= self.cfg.min_credibility)
            .sum()
    }

    /// The case of `suspect`, opened if need be. At the cap, the least recently active case
    /// without a running probe makes room; `None` if every case has one.
    fn case_mut(&mut self, now: Instant, suspect: PeerId) -> Option<&mut Case> {
        if !self.cases.contains_key(&suspect) && self.cases.len() >= self.cfg.max_cases {
            let victim = self
                .cases
                .iter()
                .filter(|(_, c)| !c.probing)
                .min_by_key(|(_, c)| c.last)
                .map(|(p, _)| *p)?;
            self.cases.remove(&victim);
        }
        let case = self.cases.entry(suspect).or_insert_with(|| Case::new(now));
        case.last = now;
        Some(case)
    }

    fn record_accuser(&mut self, now: Instant, reporter: PeerId, suspect: PeerId) -> bool {
        if reporter == suspect || self.banned.contains(&suspect) || self.banned.contains(&reporter)
        {
            return false;
        }
        let max = self.cfg.max_accusers;
        let Some(case) = self.case_mut(now, suspect) else {
            return false;
        };
        if case.accusers.len() < max {
            case.accusers.insert(reporter);
        }
        true
    }

    /// `reporter`, which was assigned `suspect` for `blocks`, says the suspect served bytes
    /// that failed their digest, or cut its stream off while still connected to the master.
    pub fn accuse(
        &mut self,
        now: Instant,
        reporter: PeerId,
        suspect: PeerId,
        blocks: BlockRange,
    ) -> Verdict {
        if !self.record_accuser(now, reporter, suspect) {
            return Verdict::Nothing;
        }
        let Some(case) = self.cases.get(&suspect) else {
            return Verdict::Nothing;
        };
        if case.probing {
            return Verdict::Nothing;
        }
        // Acquitted suspects get probed again only on fresh, weighty evidence.
        if case.acquitted && self.weight(&case.accusers) < self.cfg.reprobe_weight {
            return Verdict::Nothing;
        }
        match self.cases.get_mut(&suspect) {
            Some(case) => case.start_probe(suspect, blocks),
            None => Verdict::Nothing,
        }
    }

    /// `reporter`, which was assigned `suspect` for `blocks`, says the suspect refused them
    /// as not held. The shell has already taken the blocks off the suspect's claims; enough
    /// such lies within the window start a probe of the refused blocks.
    pub fn lied(
        &mut self,
        now: Instant,
        reporter: PeerId,
        suspect: PeerId,
        blocks: BlockRange,
    ) -> Verdict {
        if !self.record_accuser(now, reporter, suspect) {
            return Verdict::Nothing;
        }
        let (strikes, window) = (self.cfg.lie_strikes.max(1), self.cfg.lie_window);
        let Some(case) = self.cases.get_mut(&suspect) else {
            return Verdict::Nothing;
        };
        while case
            .lies
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            case.lies.pop_front();
        }
        case.lies.push_back(now);
        while case.lies.len() > strikes {
            case.lies.pop_front();
        }
        if case.probing || case.lies.len() < strikes {
            return Verdict::Nothing;
        }
        case.lies.clear();
        case.start_probe(suspect, blocks)
    }

    /// `peer` disconnected from the master: a probe of it running now can no longer tell a
    /// lie from a death.
    pub fn peer_gone(&mut self, peer: &PeerId) {
        if let Some(case) = self.cases.get_mut(peer) {
            case.gone = true;
        }
    }

    /// The probe of `suspect` could not even start (the probe queue was full): no evidence.
    pub fn probe_dropped(&mut self, suspect: &PeerId) {
        if let Some(case) = self.cases.get_mut(suspect) {
            case.probing = false;
        }
    }

    /// The probe of `suspect` ended with `outcome`; `connected` says whether the suspect is
    /// connected to the master now.
    pub fn probe_result(
        &mut self,
        now: Instant,
        suspect: PeerId,
        outcome: ProbeOutcome,
        connected: bool,
    ) -> Verdict {
        let Some(case) = self.cases.get_mut(&suspect) else {
            // Bad bytes are evidence whatever became of the case; nothing else is without it
            // (whether the suspect left meanwhile is not known).
            if outcome == ProbeOutcome::Corrupt && !self.banned.contains(&suspect) {
                self.ban(suspect);
                return Verdict::Ban(suspect);
            }
            return Verdict::Nothing;
        };
        case.probing = false;
        case.last = now;
        let stayed = connected && !case.gone;
        match outcome {
            ProbeOutcome::Corrupt => {
                self.ban(suspect);
                Verdict::Ban(suspect)
            }
            ProbeOutcome::CutOff | ProbeOutcome::NotHeld if stayed => {
                self.ban(suspect);
                Verdict::Ban(suspect)
            }
            ProbeOutcome::CutOff | ProbeOutcome::NotHeld | ProbeOutcome::Inconclusive => {
                Verdict::Nothing
            }
            ProbeOutcome::Honest => {
                let accusers: Vec<PeerId> = case.accusers.drain().collect();
                case.acquitted = true;
                case.lies.clear();
                for r in accusers {
                    let c = self.credibility(&r) * self.cfg.false_accusation_factor;
                    self.set_credibility(now, r, c);
                }
                Verdict::Nothing
            }
        }
    }

    fn set_credibility(&mut self, now: Instant, reporter: PeerId, c: f64) {
        if !self.credibility.contains_key(&reporter)
            && self.credibility.len() >= self.cfg.max_credibility_entries
        {
            // The most credible entry is the one that matters least.
            if let Some(victim) = self
                .credibility
                .iter()
                .max_by(|a, b| a.1 .0.total_cmp(&b.1 .0))
                .map(|(p, _)| *p)
            {
                self.credibility.remove(&victim);
            }
        }
        self.credibility.insert(reporter, (c, now));
    }

    /// Forgets cases and credibility entries that saw no activity for their time to live.
    pub fn expire(&mut self, now: Instant) {
        let (case_ttl, cred_ttl) = (self.cfg.case_ttl, self.cfg.credibility_ttl);
        self.cases
            .retain(|_, c| now.saturating_duration_since(c.last) < case_ttl);
        self.credibility
            .retain(|_, c| now.saturating_duration_since(c.1) < cred_ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    fn r(b: u32) -> BlockRange {
        BlockRange::new(b, b + 1)
    }

    fn probe(suspect: PeerId, b: u32) -> Verdict {
        Verdict::Probe {
            suspect,
            blocks: r(b),
        }
    }

    #[test]
    fn reports_about_the_master_oneself_unknown_files_or_no_blocks_are_ignored() {
        let (master, a, b) = (peer(), peer(), peer());
        let corrupt = |blocks: Vec<BlockRange>| Problem::Corrupt { blocks };
        let p = corrupt(vec![r(0)]);
        assert_eq!(
            screen(&master, &a, &master, &p, Some(8)),
            Err(Ignored::Master)
        );
        assert_eq!(
            screen(&master, &a, &master, &Problem::Unreachable, Some(8)),
            Err(Ignored::Master)
        );
        assert_eq!(screen(&master, &a, &a, &p, Some(8)), Err(Ignored::Reporter));
        assert_eq!(screen(&master, &a, &b, &p, None), Err(Ignored::UnknownFile));
        assert_eq!(
            screen(&master, &a, &b, &corrupt(vec![]), Some(8)),
            Err(Ignored::NoBlocks)
        );
        assert_eq!(
            screen(
                &master,
                &a,
                &b,
                &corrupt(vec![BlockRange::new(8, 20)]),
                Some(8)
            ),
            Err(Ignored::NoBlocks)
        );
        assert_eq!(
            screen(
                &master,
                &a,
                &b,
                &corrupt(vec![BlockRange::new(0, 300)]),
                Some(1000)
            ),
            Err(Ignored::TooManyBlocks)
        );
        // 4,096 copies of one range merge into one.
        let flood = corrupt(vec![BlockRange::new(2, 4); 4096]);
        assert_eq!(
            screen(&master, &a, &b, &flood, Some(8)),
            Ok(vec![BlockRange::new(2, 4)])
        );
        assert_eq!(
            screen(&master, &a, &b, &Problem::Busy, Some(8)),
            Ok(Vec::new())
        );
    }

    #[test]
    fn only_corrupt_data_and_cut_offs_by_live_peers_accuse() {
        let blocks = vec![r(0)];
        let corrupt = Problem::Corrupt {
            blocks: blocks.clone(),
        };
        let truncated = Problem::Truncated {
            blocks: blocks.clone(),
        };
        let not_held = Problem::NotHeld { blocks };
        for connected in [true, false] {
            let c = respond(&corrupt, connected);
            assert_eq!((c.avoid, c.charge), (None, Charge::Accusation));
            for p in [Problem::Unreachable, Problem::Busy] {
                assert_eq!(respond(&p, connected).charge, Charge::None, "{p:?}");
                assert!(respond(&p, connected).avoid.is_some());
            }
            let n = respond(&not_held, connected);
            assert_eq!((n.forget_claims, n.charge), (true, Charge::Lie));
        }
        // A cut-off by a peer the master still sees: the probe decides.
        let t = respond(&truncated, true);
        assert_eq!((t.charge, t.drop_mirror), (Charge::Accusation, false));
        // By a peer the master no longer sees: it is gone, no accusation.
        let t = respond(&truncated, false);
        assert_eq!((t.charge, t.drop_mirror), (Charge::None, true));
        assert!(respond(&Problem::Unreachable, false).drop_mirror);
        assert!(!respond(&Problem::Unreachable, true).drop_mirror);
    }

    #[test]
    fn one_false_accuser_cannot_ban_and_loses_weight() {
        let mut book = BanBook::default();
        let now = Instant::now();
        let (liar, honest) = (peer(), peer());
        for round in 0..5 {
            let v = book.accuse(now, liar, honest, r(round));
            if round == 0 {
                assert_eq!(v, probe(honest, 0));
                assert_eq!(
                    book.probe_result(now, honest, ProbeOutcome::Honest, true),
                    Verdict::Nothing
                );
            } else {
                assert_eq!(v, Verdict::Nothing, "round {round}");
            }
        }
        assert!(!book.is_banned(&honest));
        assert_eq!(book.credibility(&liar), 0.5);
    }

    #[test]
    fn a_probe_that_gets_bad_bytes_bans() {
        let mut book = BanBook::default();
        let now = Instant::now();
        let (reporter, bad) = (peer(), peer());
        assert_eq!(book.accuse(now, reporter, bad, r(3)), probe(bad, 3));
        // More reports while the probe runs change nothing.
        assert_eq!(book.accuse(now, peer(), bad, r(4)), Verdict::Nothing);
        assert_eq!(
            book.probe_result(now, bad, ProbeOutcome::Corrupt, true),
            Verdict::Ban(bad)
        );
        assert!(book.is_banned(&bad));
        assert_eq!(book.accuse(now, peer(), bad, r(1)), Verdict::Nothing);
    }

    #[test]
    fn three_colluding_accusers_and_an_inconclusive_probe_ban_nobody() {
        let mut book = BanBook::default();
        let now = Instant::now();
        let victim = peer();
        let liars: Vec<PeerId> = (0..3).map(|_| peer()).collect();
        // Round after round of accusations whose probes cannot decide (the victim is dead,
        // has no address, the file is unknown...): each accusation probes again, none bans.
        for round in 0..4 {
            assert_eq!(
                book.accuse(now, liars[0], victim, r(round)),
                probe(victim, round)
            );
            assert_eq!(
                book.accuse(now, liars[1], victim, r(round)),
                Verdict::Nothing
            );
            assert_eq!(
                book.accuse(now, liars[2], victim, r(round)),
                Verdict::Nothing
            );
            assert_eq!(
                book.probe_result(now, victim, ProbeOutcome::Inconclusive, true),
                Verdict::Nothing
            );
        }
        assert!(!book.is_banned(&victim));
    }

    #[test]
    fn a_cut_off_or_a_denial_bans_only_a_peer_that_stayed_connected() {
        let now = Instant::now();
        for outcome in [ProbeOutcome::CutOff, ProbeOutcome::NotHeld] {
            // Still connected and never left: a lie.
            let mut book = BanBook::default();
            let s = peer();
            assert_eq!(book.accuse(now, peer(), s, r(0)), probe(s, 0));
            assert_eq!(book.probe_result(now, s, outcome, true), Verdict::Ban(s));

            // Not connected when the result comes: it died, no evidence.
            let mut book = BanBook::default();
            let s = peer();
            assert_eq!(book.accuse(now, peer(), s, r(0)), probe(s, 0));
            assert_eq!(book.probe_result(now, s, outcome, false), Verdict::Nothing);
            assert!(!book.is_banned(&s));

            // Died during the probe and came back with its key before the result: no
            // evidence either.
            let mut book = BanBook::default();
            let s = peer();
            assert_eq!(book.accuse(now, peer(), s, r(0)), probe(s, 0));
            book.peer_gone(&s);
            assert_eq!(book.probe_result(now, s, outcome, true), Verdict::Nothing);
            assert!(!book.is_banned(&s));
            // A disconnect before a later probe does not count against that probe.
            assert_eq!(book.accuse(now, peer(), s, r(1)), probe(s, 1));
            assert_eq!(book.probe_result(now, s, outcome, true), Verdict::Ban(s));
        }
    }

    #[test]
    fn colluding_liars_cannot_ban_a_peer_that_passes_its_probe() {
        let mut book = BanBook::default();
        let now = Instant::now();
        let honest = peer();
        let liars: Vec<PeerId> = (0..3).map(|_| peer()).collect();
        assert_eq!(book.accuse(now, liars[0], honest, r(0)), probe(honest, 0));
        // The others pile on while the probe runs: still no ban.
        assert_eq!(book.accuse(now, liars[1], honest, r(0)), Verdict::Nothing);
        assert_eq!(book.accuse(now, liars[2], honest, r(0)), Verdict::Nothing);
        assert_eq!(
            book.probe_result(now, honest, ProbeOutcome::Honest, true),
            Verdict::Nothing
        );
        assert!(!book.is_banned(&honest));
        // After the acquittal their halved weight (3 x 0.5) is not enough to reopen the case.
        for l in &liars {
            assert_eq!(book.accuse(now, *l, honest, r(1)), Verdict::Nothing);
        }
        // Fresh accusers at full weight reopen it once the weight reaches 3 (1.5 + 1 + 1),
        // and the probe decides again.
        let fresh: Vec<PeerId> = (0..2).map(|_| peer()).collect();
        assert_eq!(book.accuse(now, fresh[0], honest, r(2)), Verdict::Nothing);
        assert_eq!(book.accuse(now, fresh[1], honest, r(2)), probe(honest, 2));
    }

    #[test]
    fn nobody_can_accuse_itself_or_be_accused_by_the_banned() {
        let mut book = BanBook::default();
        let now = Instant::now();
        let (a, b) = (peer(), peer());
        assert_eq!(book.accuse(now, a, a, r(0)), Verdict::Nothing);
        book.ban(b);
        assert_eq!(book.accuse(now, b, a, r(0)), Verdict::Nothing);
        assert_eq!(book.lied(now, b, a, r(0)), Verdict::Nothing);
        assert_eq!(book.cases(), 0);
    }

    #[test]
    fn repeated_lies_about_holdings_start_a_probe_that_bans_on_a_denial() {
        let mut book = BanBook::default();
        let now = Instant::now();
        let (liar, a, b) = (peer(), peer(), peer());
        assert_eq!(book.lied(now, a, liar, r(0)), Verdict::Nothing);
        // The same reporter may strike again (it was assigned other blocks the liar claimed).
        assert_eq!(
            book.lied(now + Duration::from_secs(1), a, liar, r(5)),
            Verdict::Nothing
        );
        assert_eq!(
            book.lied(now + Duration::from_secs(2), b, liar, r(9)),
            probe(liar, 9)
        );
        // It refuses the master's probe of blocks it was assigned for, still connected.
        assert_eq!(
            book.probe_result(now, liar, ProbeOutcome::NotHeld, true),
            Verdict::Ban(liar)
        );
    }

    #[test]
    fn lies_spread_wider_than_the_window_do_not_add_up() {
        let mut book = BanBook::default();
        let t0 = Instant::now();
        let s = peer();
        let w = BanConfig::default().lie_window;
        for i in 0..6u32 {
            let at = t0 + w * i;
            assert_eq!(book.lied(at, peer(), s, r(i)), Verdict::Nothing, "lie {i}");
        }
    }

    #[test]
    fn a_peer_that_serves_its_probe_after_lie_reports_is_acquitted() {
        let mut book = BanBook::default();
        let now = Instant::now();
        let s = peer();
        let liars: Vec<PeerId> = (0..3).map(|_| peer()).collect();
        let mut v = Verdict::Nothing;
        for l in &liars {
            v = book.lied(now, *l, s, r(7));
        }
        assert_eq!(v, probe(s, 7));
        assert_eq!(
            book.probe_result(now, s, ProbeOutcome::Honest, true),
            Verdict::Nothing
        );
        assert!(!book.is_banned(&s));
        for l in &liars {
            assert_eq!(book.credibility(l), 0.5);
        }
    }

    #[test]
    fn a_dropped_probe_is_no_evidence_and_the_next_accusation_probes_again() {
        let mut book = BanBook::default();
        let now = Instant::now();
        let s = peer();
        assert_eq!(book.accuse(now, peer(), s, r(0)), probe(s, 0));
        book.probe_dropped(&s);
        assert!(!book.is_banned(&s));
        assert_eq!(book.accuse(now, peer(), s, r(1)), probe(s, 1));
    }

    #[test]
    fn cases_and_credibility_are_bounded_and_expire() {
        let cfg = BanConfig {
            max_cases: 4,
            max_credibility_entries: 3,
            max_accusers: 2,
            ..BanConfig::default()
        };
        let ttl = cfg.case_ttl;
        let mut book = BanBook::new(cfg);
        let t0 = Instant::now();
        // A probe is running for the first suspect: it is never evicted.
        let first = peer();
        assert_eq!(book.accuse(t0, peer(), first, r(0)), probe(first, 0));
        for i in 1..20u32 {
            let s = peer();
            let at = t0 + Duration::from_millis(u64::from(i));
            assert_eq!(book.accuse(at, peer(), s, r(0)), probe(s, 0));
            book.probe_dropped(&s);
            assert!(book.cases() <= 4);
        }
        assert_eq!(
            book.probe_result(t0, first, ProbeOutcome::Corrupt, true),
            Verdict::Ban(first)
        );
        // Accusers per case are capped: a flood of accusers weighs at most 2.
        let s = peer();
        assert_eq!(book.accuse(t0, peer(), s, r(0)), probe(s, 0));
        for _ in 0..10 {
            book.accuse(t0, peer(), s, r(0));
        }
        // Acquitting them lowers at most 2 credibilities (capped at 3 entries anyway).
        book.probe_result(t0, s, ProbeOutcome::Honest, true);
        assert!(book.credibility_entries() <= 2);
        for _ in 0..5 {
            let s = peer();
            let liar = peer();
            book.accuse(t0, liar, s, r(0));
            book.probe_result(t0, s, ProbeOutcome::Honest, true);
            assert!(book.credibility_entries() <= 3);
        }
        // Everything expires after its time to live without activity.
        let s = peer();
        assert_eq!(book.accuse(t0, peer(), s, r(0)), probe(s, 0));
        book.expire(t0 + ttl + Duration::from_secs(1));
        assert_eq!(book.cases(), 0);
        // A probe that outlived its case still bans on bad bytes, and only on them.
        assert_eq!(
            book.probe_result(t0, s, ProbeOutcome::CutOff, true),
            Verdict::Nothing
        );
        assert_eq!(
            book.probe_result(t0, s, ProbeOutcome::Corrupt, true),
            Verdict::Ban(s)
        );
        book.expire(t0 + BanConfig::default().credibility_ttl + Duration::from_secs(1));
        assert_eq!(book.credibility_entries(), 0);
    }
}
