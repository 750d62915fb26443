//! Carrying out bans: the ban list on disk, disconnection, the authority event, and probes
//! the ban book asks for.

use std::path::PathBuf;

use libp2p::PeerId;
use shoal_protocol::{wire::AuthorityEvent, FileId};

use crate::bans::{ProbeOutcome, Verdict};
use crate::service::{EventLoop, Internal};

impl EventLoop {
    pub(crate) fn bans_path(&self) -> PathBuf {
        self.registry.dir().join("bans")
    }

    /// Loads the ban list kept in the data dir (one PeerId a line; bad lines are skipped).
    pub(crate) fn load_bans(&mut self) {
        let Ok(text) = std::fs::read_to_string(self.bans_path()) else {
            return;
        };
        for line in text.lines() {
            match line.trim().parse::<PeerId>() {
                Ok(p) => {
                    self.bans.ban(p);
                    self.policy.ban(p);
                }
                Err(_) if line.trim().is_empty() => {}
                Err(e) => tracing::warn!(line, error = %e, "skipping a bad line of the ban list"),
            }
        }
    }

    /// Bans `peer` swarm-wide: out of every list, disconnected, refused from now on (the ban
    /// list is persisted), and announced on the authority topic.
    pub(crate) fn ban(&mut self, peer: PeerId) {
        tracing::warn!(%peer, "banning peer swarm-wide");
        self.bans.ban(peer);
        self.policy.ban(peer);
        self.metrics.bans.inc();
        let mut list: Vec<String> = self.bans.banned().map(|p| p.to_string()).collect();
        list.sort();
        let text: String = list.iter().map(|p| format!("{p}\n")).collect();
        if let Err(e) = crate::registry::write_atomic(&self.bans_path(), text.as_bytes()) {
            tracing::error!(error = %e, "cannot persist the ban list");
        }
        let _ = self.swarm.disconnect_peer_id(peer);
        self.publish(AuthorityEvent::PeerBanned { peer });
    }

    pub(crate) fn act(&mut self, verdict: Verdict, file: FileId) {
        match verdict {
            Verdict::Nothing => {}
            Verdict::Ban(peer) => self.ban(peer),
            Verdict::Probe { suspect, blocks } => {
                let manifest = self
                    .shelf
                    .lock()
                    .expect("shelf lock")
                    .files
                    .get(&file)
                    .map(|e| e.manifest.clone());
                let addrs = self.policy.addrs(&suspect);
                let internal = self.internal_tx.clone();
                tokio::spawn(async move {
                    let outcome = match manifest {
                        Some(m) => crate::probe::probe(suspect, addrs, m, blocks).await,
                        None => ProbeOutcome::Inconclusive,
                    };
                    let _ = internal.send(Internal::Probed { suspect, outcome }).await;
                });
            }
        }
    }
}
