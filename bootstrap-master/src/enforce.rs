//! Carrying out bans: the ban list on disk, disconnection, the authority event. (Probes and
//! the verdicts that lead here live in `report.rs`.)

use std::path::PathBuf;

use libp2p::PeerId;
use shoal_protocol::wire::AuthorityEvent;

use crate::service::EventLoop;

impl EventLoop {
    pub(crate) fn bans_path(&self) -> PathBuf {
        self.registry.dir().join("bans")
    }

    /// Loads the ban list kept in the data dir (one PeerId a line; bad lines are skipped).
    pub(crate) fn load_bans(&mut self) {
        let bytes = match std::fs::read(self.bans_path()) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the ban list; starting without it");
                return;
            }
        };
        // Line by line, lossily: a damaged line costs that line, not the whole list.
        let text = String::from_utf8_lossy(&bytes);
        for line in text.lines() {
            match line.trim().parse::<PeerId>() {
                // The master never bans itself, whatever the file says.
                Ok(p) if p == *self.swarm.local_peer_id() => {}
                Ok(p) => {
                    self.bans.ban(p);
                    self.policy.ban(p);
                    self.shelf.lock().expect("shelf lock").banned.insert(p);
                }
                Err(_) if line.trim().is_empty() => {}
                Err(e) => tracing::warn!(line, error = %e, "skipping a bad line of the ban list"),
            }
        }
    }

    /// Bans `peer` swarm-wide: out of every list, disconnected, refused from now on (the ban
    /// list is persisted), and announced on the authority topic.
    pub(crate) fn ban(&mut self, peer: PeerId) {
        if peer == *self.swarm.local_peer_id() {
            tracing::error!("refusing to ban the master itself");
            return;
        }
        tracing::warn!(%peer, "banning peer swarm-wide");
        self.bans.ban(peer);
        self.policy.ban(peer);
        // The piece server refuses it from now on.
        self.shelf.lock().expect("shelf lock").banned.insert(peer);
        self.metrics.bans.inc();
        let mut list: Vec<String> = self.bans.banned().map(|p| p.to_string()).collect();
        list.sort();
        let text: String = list.iter().map(|p| format!("{p}\n")).collect();
        // Written off the loop (coalesced with any earlier write not yet done).
        self.writer.write(self.bans_path(), text.into_bytes());
        let _ = self.swarm.disconnect_peer_id(peer);
        self.publish(AuthorityEvent::PeerBanned { peer });
    }
}
