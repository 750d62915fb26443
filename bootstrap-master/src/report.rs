//! Reports from nodes about peers that failed them: avoidance for the reporter, evidence for
//! the ban book, mirror removal when the master cannot reach the peer either.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use shoal_protocol::{
    block::BlockRange,
    wire::{AuthorityEvent, Problem},
    FileId,
};

use crate::service::EventLoop;

impl EventLoop {
    /// `reporter` says `culprit` failed it with `problem` while fetching `file`.
    pub(crate) fn on_report(
        &mut self,
        reporter: PeerId,
        file: FileId,
        culprit: PeerId,
        problem: Problem,
    ) {
        let peer = reporter;
        // Bad data: never again for this reporter. A dead or stalling peer: for a
        // while. A busy one: for a moment.
        let until = match problem {
            Problem::Corrupt { .. } => None,
            Problem::Unreachable | Problem::Truncated { .. } | Problem::NotHeld { .. } => {
                Some(Instant::now() + Duration::from_secs(30))
            }
            Problem::Busy => Some(Instant::now() + Duration::from_secs(2)),
        };
        self.policy.avoid(peer, culprit, until);
        if let Problem::Corrupt { blocks } = &problem {
            let first = blocks.first().map_or(BlockRange::new(0, 1), |r| {
                BlockRange::new(r.start, r.end.min(r.start.saturating_add(16)))
            });
            let verdict = self.bans.report(peer, culprit, first);
            self.act(verdict, file);
        }
        if matches!(problem, Problem::Unreachable) && !self.swarm.is_connected(&culprit) {
            // The master cannot see it either: it is gone from every mirror list.
            if self.policy.peer_down(&culprit) {
                tracing::info!(%culprit, "mirror unreachable for the master too; removed");
                self.publish(AuthorityEvent::MirrorRemoved { peer: culprit });
            }
        }
    }
}
