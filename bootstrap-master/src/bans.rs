//! The ban rule: when reports of corrupt data turn into a swarm-wide ban. Pure: no I/O.
//!
//! Threat model and rule (see ARCHITECTURE.md for the full discussion):
//! - Every `Corrupt` report makes the reporter avoid the suspect at once (its own safety never
//!   waits for a verdict) and records the accusation, weighted by the reporter's credibility.
//! - The first accusation of a suspect starts a **probe**: the master fetches the reported
//!   blocks from the suspect under a throw-away identity, so the suspect cannot tell the probe
//!   from any other node's request, and checks them against the manifest.
//! - A probe that gets bad bytes (corrupt, wrong or truncated) bans the suspect.
//! - A probe that gets good bytes acquits the suspect: its accusations are dropped and every
//!   accuser's credibility halves. A liar thus loses its weight after a few failed accusations.
//! - A probe that cannot tell (the suspect refused, stalled or is unreachable) leaves the
//!   accusations standing; the suspect is banned once the accusations weigh at least
//!   `ban_weight` (3 independent full-credibility reporters by default).
//! - Accusations alone never ban while a probe is pending or after an acquittal.

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;
use shoal_protocol::block::BlockRange;

/// Tunables of the ban rule.
#[derive(Clone, Debug)]
pub struct BanConfig {
    /// Accusation weight that bans when probes cannot decide.
    pub ban_weight: f64,
    /// Credibility a reporter keeps after each acquittal of someone it accused (factor).
    pub false_accusation_factor: f64,
    /// Below this credibility a reporter's accusations are recorded with no weight.
    pub min_credibility: f64,
}

impl Default for BanConfig {
    fn default() -> Self {
        Self {
            ban_weight: 3.0,
            false_accusation_factor: 0.5,
            min_credibility: 0.1,
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
        /// The blocks reported bad.
        blocks: BlockRange,
    },
    /// Ban `suspect` swarm-wide.
    Ban(PeerId),
}

/// How a probe went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The suspect served bad bytes.
    Corrupt,
    /// The suspect served the right bytes.
    Honest,
    /// No answer either way.
    Inconclusive,
}

#[derive(Debug, Default)]
struct Case {
    accusers: HashSet<PeerId>,
    probing: bool,
    acquitted: bool,
}

/// Accusations, credibility and bans.
#[derive(Debug, Default)]
pub struct BanBook {
    cfg: BanConfig,
    cases: HashMap<PeerId, Case>,
    credibility: HashMap<PeerId, f64>,
    banned: HashSet<PeerId>,
}

impl BanBook {
    /// An empty book.
    pub fn new(cfg: BanConfig) -> Self {
        Self {
            cfg,
            ..Self::default()
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
        self.credibility.get(reporter).copied().unwrap_or(1.0)
    }

    fn weight(&self, case: &Case) -> f64 {
        case.accusers
            .iter()
            .map(|r| self.credibility(r))
            .filter(|c| *c >= self.cfg.min_credibility)
            .sum()
    }

    /// `reporter` says `suspect` served bad `blocks`.
    pub fn report(&mut self, reporter: PeerId, suspect: PeerId, blocks: BlockRange) -> Verdict {
        if reporter == suspect || self.banned.contains(&suspect) || self.banned.contains(&reporter)
        {
            return Verdict::Nothing;
        }
        let case = self.cases.entry(suspect).or_default();
        case.accusers.insert(reporter);
        if case.probing {
            return Verdict::Nothing;
        }
        if case.acquitted {
            // Acquitted suspects get probed again only on fresh, weighty evidence.
            let case = &self.cases[&suspect];
            if self.weight(case) < self.cfg.ban_weight {
                return Verdict::Nothing;
            }
        }
        let case = self.cases.entry(suspect).or_default();
        case.probing = true;
        case.acquitted = false;
        Verdict::Probe { suspect, blocks }
    }

    /// The probe of `suspect` ended.
    pub fn probe_result(&mut self, suspect: PeerId, outcome: ProbeOutcome) -> Verdict {
        let Some(case) = self.cases.get_mut(&suspect) else {
            return Verdict::Nothing;
        };
        case.probing = false;
        match outcome {
            ProbeOutcome::Corrupt => {
                self.ban(suspect);
                Verdict::Ban(suspect)
            }
            ProbeOutcome::Honest => {
                let accusers: Vec<PeerId> = case.accusers.drain().collect();
                case.acquitted = true;
                for r in accusers {
                    let c = self.credibility(&r) * self.cfg.false_accusation_factor;
                    self.credibility.insert(r, c);
                }
                Verdict::Nothing
            }
            ProbeOutcome::Inconclusive => {
                let case = &self.cases[&suspect];
                if self.weight(case) >= self.cfg.ban_weight {
                    self.ban(suspect);
                    Verdict::Ban(suspect)
                } else {
                    Verdict::Nothing
                }
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

    fn r(b: u32) -> BlockRange {
        BlockRange::new(b, b + 1)
    }

    #[test]
    fn one_false_accuser_cannot_ban_and_loses_weight() {
        let mut book = BanBook::new(BanConfig::default());
        let (liar, honest) = (peer(), peer());
        for round in 0..5 {
            let v = book.report(liar, honest, r(round));
            if round == 0 {
                assert_eq!(
                    v,
                    Verdict::Probe {
                        suspect: honest,
                        blocks: r(0)
                    }
                );
                assert_eq!(
                    book.probe_result(honest, ProbeOutcome::Honest),
                    Verdict::Nothing
                );
            } else {
                assert_eq!(v, Verdict::Nothing, "round {round}");
            }
        }
        assert!(!book.is_banned(&honest));
        assert!(book.credibility(&liar) < 1.0);
    }

    #[test]
    fn a_failed_probe_bans() {
        let mut book = BanBook::new(BanConfig::default());
        let (reporter, bad) = (peer(), peer());
        assert!(matches!(
            book.report(reporter, bad, r(3)),
            Verdict::Probe { .. }
        ));
        // More reports while the probe runs change nothing.
        assert_eq!(book.report(peer(), bad, r(4)), Verdict::Nothing);
        assert_eq!(
            book.probe_result(bad, ProbeOutcome::Corrupt),
            Verdict::Ban(bad)
        );
        assert!(book.is_banned(&bad));
        assert_eq!(book.report(peer(), bad, r(1)), Verdict::Nothing);
    }

    #[test]
    fn three_independent_reports_ban_when_the_probe_cannot_tell() {
        let mut book = BanBook::new(BanConfig::default());
        let bad = peer();
        assert!(matches!(
            book.report(peer(), bad, r(0)),
            Verdict::Probe { .. }
        ));
        assert_eq!(
            book.probe_result(bad, ProbeOutcome::Inconclusive),
            Verdict::Nothing
        );
        assert!(matches!(
            book.report(peer(), bad, r(0)),
            Verdict::Probe { .. }
        ));
        assert_eq!(
            book.probe_result(bad, ProbeOutcome::Inconclusive),
            Verdict::Nothing
        );
        assert!(matches!(
            book.report(peer(), bad, r(0)),
            Verdict::Probe { .. }
        ));
        assert_eq!(
            book.probe_result(bad, ProbeOutcome::Inconclusive),
            Verdict::Ban(bad)
        );
    }

    #[test]
    fn colluding_liars_cannot_ban_a_peer_that_passes_its_probe() {
        let mut book = BanBook::new(BanConfig::default());
        let honest = peer();
        let liars: Vec<PeerId> = (0..3).map(|_| peer()).collect();
        assert!(matches!(
            book.report(liars[0], honest, r(0)),
            Verdict::Probe { .. }
        ));
        // The others pile on while the probe runs: still no ban.
        assert_eq!(book.report(liars[1], honest, r(0)), Verdict::Nothing);
        assert_eq!(book.report(liars[2], honest, r(0)), Verdict::Nothing);
        assert_eq!(
            book.probe_result(honest, ProbeOutcome::Honest),
            Verdict::Nothing
        );
        assert!(!book.is_banned(&honest));
        // After the acquittal their halved weight (3 x 0.5) is not enough to reopen the case.
        for l in &liars {
            assert_eq!(book.report(*l, honest, r(1)), Verdict::Nothing);
        }
    }

    #[test]
    fn nobody_can_accuse_itself_or_be_accused_by_the_banned() {
        let mut book = BanBook::new(BanConfig::default());
        let (a, b) = (peer(), peer());
        assert_eq!(book.report(a, a, r(0)), Verdict::Nothing);
        book.ban(b);
        assert_eq!(book.report(b, a, r(0)), Verdict::Nothing);
    }
}
