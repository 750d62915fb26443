//! Reports about sources and the probes they lead to: the shell around the ban rule
//! ([`crate::bans`]). A report is checked against what the master assigned before it counts;
//! only the master's own probe bans (see `bans.rs` and ARCHITECTURE.md for the rule).

use std::time::Instant;

use libp2p::PeerId;
use shoal_protocol::{
    block::BlockRange,
    wire::{AuthorityEvent, MasterResponse, Problem},
    FileId,
};

use crate::bans::{respond, screen, Charge, Ignored, ProbeOutcome, Verdict};
use crate::probe::Admit;
use crate::service::{EventLoop, Internal};

/// Most blocks one probe asks for.
const PROBE_BLOCKS: u32 = 16;

/// A probe to run.
#[derive(Debug)]
pub(crate) struct ProbeJob {
    file: FileId,
    suspect: PeerId,
    blocks: BlockRange,
}

fn problem_label(p: &Problem) -> &'static str {
    match p {
        Problem::Unreachable => "unreachable",
        Problem::Busy => "busy",
        Problem::Corrupt { .. } => "corrupt",
        Problem::Truncated { .. } => "truncated",
        Problem::NotHeld { .. } => "not_held",
    }
}

impl EventLoop {
    /// `reporter` could not get `file`'s blocks from `culprit`, for the reason `problem`.
    /// Always acknowledged; acted on only if the master assigned `culprit` to `reporter` for
    /// those blocks (see [`crate::policy::Policy::assigned`]).
    pub(crate) fn on_report(
        &mut self,
        reporter: PeerId,
        file: FileId,
        culprit: PeerId,
        problem: Problem,
    ) -> MasterResponse {
        let now = Instant::now();
        let kind = problem_label(&problem);
        let screened = screen(
            self.swarm.local_peer_id(),
            &reporter,
            &culprit,
            &problem,
            self.policy.file_blocks(&file),
        )
        .and_then(|blocks| {
            if self
                .policy
                .assigned(&reporter, &file, &culprit, &blocks, now)
            {
                Ok(blocks)
            } else {
                Err(Ignored::NotAssigned)
            }
        });
        let blocks = match screened {
            Ok(blocks) => blocks,
            Err(why) => {
                tracing::debug!(%reporter, %culprit, %file, problem = kind, reason = why.label(), "report ignored");
                self.metrics.report_ignored(why.label());
                return MasterResponse::Ack;
            }
        };
        self.metrics
            .reports_counted
            .get_or_create(&[("problem", kind)])
            .inc();
        tracing::info!(%reporter, %culprit, %file, ?problem, "report");
        // What the probe asks for: the first reported blocks.
        let probe_range = blocks.first().map_or(BlockRange::new(0, 1), |r| {
            BlockRange::new(r.start, r.end.min(r.start.saturating_add(PROBE_BLOCKS)))
        });
        let response = respond(&problem, self.swarm.is_connected(&culprit));
        // The reporter's own safety never waits for a verdict.
        self.policy
            .avoid(reporter, culprit, response.avoid.map(|d| now + d));
        if response.drop_mirror {
            self.mirror_gone(culprit);
        }
        if response.forget_claims {
            let dropped = self.policy.forget_claims(&file, &culprit, &blocks);
            tracing::info!(%culprit, %file, dropped, "claims dropped after a NotHeld refusal");
        }
        let verdict = match response.charge {
            Charge::None => Verdict::Nothing,
            Charge::Accusation => self.bans.accuse(now, reporter, culprit, probe_range),
            Charge::Lie => self.bans.lied(now, reporter, culprit, probe_range),
        };
        self.act(verdict, file);
        MasterResponse::Ack
    }

    /// `peer` is gone as far as the master can tell: out of every mirror list.
    fn mirror_gone(&mut self, peer: PeerId) {
        if self.policy.peer_down(&peer) {
            tracing::info!(%peer, "mirror unreachable for the master too; removed");
            self.publish(AuthorityEvent::MirrorRemoved { peer });
        }
    }

    /// Carries out a verdict about a report on `file`.
    fn act(&mut self, verdict: Verdict, file: FileId) {
        self.act_inner(verdict, file);
        self.metrics
            .probes_pending
            .set((self.probes.in_flight() + self.probes.queued()) as i64);
    }

    fn act_inner(&mut self, verdict: Verdict, file: FileId) {
        match verdict {
            Verdict::Nothing => {}
            Verdict::Ban(peer) => self.ban(peer),
            Verdict::Probe { suspect, blocks } => match self.probes.push(ProbeJob {
                file,
                suspect,
                blocks,
            }) {
                Admit::Start(job) => self.spawn_probe(job),
                Admit::Queued => {}
                Admit::Dropped(job) => {
                    tracing::warn!(suspect = %job.suspect, "probe queue full; probe dropped");
                    self.metrics.probes_dropped.inc();
                    self.bans.probe_dropped(&job.suspect);
                }
            },
        }
    }

    fn spawn_probe(&mut self, job: ProbeJob) {
        let manifest = self
            .shelf
            .lock()
            .expect("shelf lock")
            .files
            .get(&job.file)
            .map(|e| e.manifest.clone());
        let addrs = self.policy.addrs(&job.suspect);
        let internal = self.internal_tx.clone();
        let ProbeJob {
            suspect, blocks, ..
        } = job;
        tracing::info!(%suspect, ?blocks, "probing");
        tokio::spawn(async move {
            let outcome = match manifest {
                Some(m) => crate::probe::probe(suspect, addrs, m, blocks).await,
                None => ProbeOutcome::Inconclusive,
            };
            let _ = internal.send(Internal::Probed { suspect, outcome }).await;
        });
    }

    /// A probe of `suspect` ended with `outcome`.
    pub(crate) fn on_probed(&mut self, suspect: PeerId, outcome: ProbeOutcome) {
        self.metrics
            .probes
            .get_or_create(&[("outcome", outcome.label())])
            .inc();
        let connected = self.swarm.is_connected(&suspect);
        tracing::info!(%suspect, ?outcome, connected, "probe finished");
        if let Verdict::Ban(p) = self
            .bans
            .probe_result(Instant::now(), suspect, outcome, connected)
        {
            self.ban(p);
        }
        if let Some(next) = self.probes.finished() {
            self.spawn_probe(next);
        }
        self.metrics
            .probes_pending
            .set((self.probes.in_flight() + self.probes.queued()) as i64);
    }
}
