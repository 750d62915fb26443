//! Announces on `/shoal/publish/1`: who may publish ([`PublishGate`], pure), and the shell
//! that checks, stores and countersigns an announce and starts the pull.
//!
//! Order of the checks is the order of their cost: trust (a map look-up on the connection's
//! authenticated PeerId), the header's signature, quotas, all on the loop; then, on the
//! blocking pool, the digest list (hashing up to 8 MiB), free disk and the manifest write. A
//! refused announce touches no disk and starts no pull.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
};

use libp2p::{request_response::ResponseChannel, PeerId};
use shoal_protocol::{
    block::Blocks,
    manifest::{check_digest_list, SignedHeader},
    wire::{AuthorityEvent, MasterResponse, PublishRequest},
    BlockDigest, FileId, Manifest, VerifiedManifest,
};

use crate::config::{PublishPolicy, PublishQuotas};
use crate::registry::{available_space, Registry};
use crate::service::{EventLoop, Internal};

/// Why an announce was refused by the publishing policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// The publisher is not trusted and publishing is not open.
    #[error(
        "publisher {0} is not trusted by this master; start it with --publisher-key {0} \
         or --open-publishing"
    )]
    NotTrusted(PeerId),
    /// The publisher has its quota of files.
    #[error("publisher {publisher} has {max} files on this master, its quota")]
    Files {
        /// Who.
        publisher: PeerId,
        /// The quota.
        max: u32,
    },
    /// The file would take the publisher past its byte quota.
    #[error(
        "publisher {publisher} would hold {would} bytes on this master, past its quota of {max}"
    )]
    Bytes {
        /// Who.
        publisher: PeerId,
        /// With this file.
        would: u64,
        /// The quota.
        max: u64,
    },
    /// The publisher has its quota of pulls running.
    #[error("publisher {publisher} has {max} pulls running, its quota; announce again later")]
    Pulls {
        /// Who.
        publisher: PeerId,
        /// The quota.
        max: u32,
    },
    /// Open publishers together have filled their share of the master.
    #[error("this master holds {0} files from open publishers, its limit")]
    TotalFiles(u32),
    /// The master runs its limit of pulls, from all publishers together.
    #[error("this master is pulling {0} files, its limit; announce again later")]
    AllPulls(u32),
}

#[derive(Default, Clone, Copy, Debug)]
struct Held {
    files: u32,
    bytes: u64,
}

/// Who may publish, and what each publisher holds and pulls: the pure part of announcing.
/// Its tables hold only publishers with files on the master or pulls running, so they are
/// bounded by the files the master holds.
#[derive(Debug)]
pub(crate) struct PublishGate {
    policy: PublishPolicy,
    own: PeerId,
    held: HashMap<PeerId, Held>,
    open_files: u32,
    pulls: HashMap<PeerId, u32>,
    /// Pulls running in all, and their cap.
    total_pulls: u32,
    max_pulls: u32,
}

impl PublishGate {
    /// A gate applying `policy`, with at most `max_pulls` pulls at once; `own` (the master's
    /// key) always passes.
    pub(crate) fn new(policy: PublishPolicy, own: PeerId, max_pulls: u32) -> Self {
        Self {
            policy,
            own,
            held: HashMap::new(),
            open_files: 0,
            pulls: HashMap::new(),
            total_pulls: 0,
            max_pulls: max_pulls.max(1),
        }
    }

    fn quotas(&self, publisher: &PeerId) -> Option<&PublishQuotas> {
        match &self.policy {
            PublishPolicy::Open(q) if *publisher != self.own => Some(q),
            _ => None,
        }
    }

    /// Whether `publisher` may publish at all.
    pub(crate) fn trusted(&self, publisher: &PeerId) -> Result<(), Refusal> {
        let ok = *publisher == self.own
            || match &self.policy {
                PublishPolicy::OwnOnly => false,
                PublishPolicy::Trusted(keys) => keys.contains(publisher),
                PublishPolicy::Open(_) => true,
            };
        if ok {
            Ok(())
        } else {
            Err(Refusal::NotTrusted(*publisher))
        }
    }

    /// Whether `publisher` may add a new file of `size` bytes (and pull it).
    pub(crate) fn admit_new(&self, publisher: &PeerId, size: u64) -> Result<(), Refusal> {
        self.trusted(publisher)?;
        let Some(q) = self.quotas(publisher) else {
            return self.admit_pull(publisher);
        };
        let held = self.held.get(publisher).copied().unwrap_or_default();
        if held.files >= q.files {
            return Err(Refusal::Files {
                publisher: *publisher,
                max: q.files,
            });
        }
        let would = held.bytes.saturating_add(size);
        if would > q.bytes {
            return Err(Refusal::Bytes {
                publisher: *publisher,
                would,
                max: q.bytes,
            });
        }
        if self.open_files >= q.total_files {
            return Err(Refusal::TotalFiles(q.total_files));
        }
        self.admit_pull(publisher)
    }

    /// Whether a pull from `publisher` may start now.
    pub(crate) fn admit_pull(&self, publisher: &PeerId) -> Result<(), Refusal> {
        self.trusted(publisher)?;
        if self.total_pulls >= self.max_pulls {
            return Err(Refusal::AllPulls(self.max_pulls));
        }
        match self.quotas(publisher) {
            Some(q) if self.pulls.get(publisher).copied().unwrap_or(0) >= q.concurrent_pulls => {
                Err(Refusal::Pulls {
                    publisher: *publisher,
                    max: q.concurrent_pulls,
                })
            }
            _ => Ok(()),
        }
    }

    /// Counts a file of `publisher` the master now holds (or is storing).
    pub(crate) fn add_file(&mut self, publisher: PeerId, size: u64) {
        if publisher == self.own {
            return;
        }
        let h = self.held.entry(publisher).or_default();
        h.files = h.files.saturating_add(1);
        h.bytes = h.bytes.saturating_add(size);
        self.open_files = self.open_files.saturating_add(1);
    }

    /// Undoes [`PublishGate::add_file`] (the file could not be stored).
    pub(crate) fn remove_file(&mut self, publisher: PeerId, size: u64) {
        if let Some(h) = self.held.get_mut(&publisher) {
            h.files = h.files.saturating_sub(1);
            h.bytes = h.bytes.saturating_sub(size);
            self.open_files = self.open_files.saturating_sub(1);
            if h.files == 0 {
                self.held.remove(&publisher);
            }
        }
    }

    /// A pull from `publisher` started.
    pub(crate) fn pull_started(&mut self, publisher: PeerId) {
        *self.pulls.entry(publisher).or_default() += 1;
        self.total_pulls = self.total_pulls.saturating_add(1);
    }

    /// A pull from `publisher` ended.
    pub(crate) fn pull_ended(&mut self, publisher: PeerId) {
        if let Some(n) = self.pulls.get_mut(&publisher) {
            self.total_pulls = self.total_pulls.saturating_sub(1);
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pulls.remove(&publisher);
            }
        }
    }

    /// Publishers the gate keeps state for (for tests and bounds).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.held.len() + self.pulls.len()
    }
}

/// An announce being checked and stored off the loop.
pub(crate) struct Storing {
    pub(crate) publisher: PeerId,
    pub(crate) id: FileId,
    pub(crate) size: u64,
    pub(crate) signed: Box<SignedHeader>,
    pub(crate) channel: ResponseChannel<MasterResponse>,
}

fn refused(reason: impl ToString) -> MasterResponse {
    MasterResponse::Refused {
        reason: reason.to_string(),
    }
}

/// The expensive half of an announce (blocking: run on the blocking pool): the digest list
/// against the header (hashing up to 8 MiB), the manifest, free space, the manifest write.
fn verify_and_store(
    registry: &Registry,
    signed: SignedHeader,
    digests: Vec<BlockDigest>,
    reserved: u64,
    min_free: u64,
) -> Result<Arc<VerifiedManifest>, String> {
    check_digest_list(&signed.body, &digests).map_err(|e| e.to_string())?;
    let manifest = Manifest {
        header: signed,
        digests,
    }
    .verify(None)
    .map_err(|e| e.to_string())?;
    let size = manifest.body().size;
    let need = size.saturating_add(reserved).saturating_add(min_free);
    let free = available_space(registry.dir()).map_err(|e| e.to_string())?;
    if free < need {
        return Err(format!(
            "this master has {free} bytes free, needs {need} to take a file of {size} bytes"
        ));
    }
    registry.save_manifest(&manifest).map_err(|e| {
        tracing::error!(error = %e, "cannot store manifest");
        "master cannot store the manifest".to_string()
    })?;
    Ok(Arc::new(manifest))
}

impl EventLoop {
    /// An announce from `publisher`. The loop checks only what is cheap (trust, signatures,
    /// quotas) and answers at once when refused or already known; the digest list, free
    /// space and the manifest write run on the blocking pool and the answer follows in
    /// [`EventLoop::on_stored`].
    pub(crate) fn on_announce(
        &mut self,
        publisher: PeerId,
        request: PublishRequest,
        channel: ResponseChannel<MasterResponse>,
    ) {
        match self.check_announce(publisher, request) {
            Ok(Checked::Known(response)) => self.respond_publish(publisher, channel, response),
            Ok(Checked::New {
                id,
                signed,
                digests,
            }) => {
                let size = signed.body.size;
                self.storing.insert(id, size);
                self.gate.add_file(publisher, size);
                let reserved = self.reserved_bytes().saturating_sub(size);
                let registry = self.registry.clone();
                let min_free = self.cfg.min_free_disk;
                let internal = self.internal_tx.clone();
                let header = (*signed).clone();
                let storing = Storing {
                    publisher,
                    id,
                    size,
                    signed,
                    channel,
                };
                tokio::spawn(async move {
                    let result = tokio::task::spawn_blocking(move || {
                        verify_and_store(&registry, header, digests, reserved, min_free)
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("manifest writer failed: {e}")));
                    let _ = internal
                        .send(Internal::Stored(Box::new(storing), result))
                        .await;
                });
            }
            Err(response) => {
                self.metrics.announces_refused.inc();
                self.respond_publish(publisher, channel, response)
            }
        }
    }

    fn respond_publish(
        &mut self,
        peer: PeerId,
        channel: ResponseChannel<MasterResponse>,
        response: MasterResponse,
    ) {
        if self
            .swarm
            .behaviour_mut()
            .publish
            .send_response(channel, response)
            .is_err()
        {
            tracing::debug!(%peer, "publish response dropped: peer gone");
        }
    }

    /// Bytes promised to files being stored or pulled (not yet on disk).
    fn reserved_bytes(&self) -> u64 {
        let shelf = self.shelf.lock().expect("shelf lock");
        let pulling = self
            .pulling
            .keys()
            .filter_map(|id| shelf.files.get(id))
            .map(|e| e.manifest.body().size);
        pulling
            .chain(self.storing.values().copied())
            .fold(0u64, u64::saturating_add)
    }

    fn check_announce(
        &mut self,
        publisher: PeerId,
        request: PublishRequest,
    ) -> Result<Checked, MasterResponse> {
        if self.policy.is_banned(&publisher) {
            return Err(refused("banned"));
        }
        self.gate.trusted(&publisher).map_err(refused)?;
        let PublishRequest { header, digests } = request;
        header.verify().map_err(refused)?;
        match header.body.publisher() {
            Ok(p) if p == publisher => {}
            _ => {
                return Err(refused(
                    "the announcing peer is not the publisher the header names",
                ))
            }
        }
        let signed = header.countersign(&self.key).map_err(refused)?;
        let id = signed.id().map_err(refused)?;
        if self.storing.contains_key(&id) {
            return Err(refused(
                "this file is being stored; announce again in a moment",
            ));
        }
        if self.policy.has_file(&id) {
            // Known (the same signed header, so the same digests): a re-announce resumes a
            // pull that stopped.
            if !self.policy.master_complete(&id) && !self.pulling.contains_key(&id) {
                self.gate.admit_pull(&publisher).map_err(refused)?;
                let stored = self
                    .shelf
                    .lock()
                    .expect("shelf lock")
                    .files
                    .get(&id)
                    .map(|e| (e.manifest.clone(), e.have.clone()));
                if let Some((manifest, have)) = stored {
                    self.start_pull(publisher, manifest, have);
                }
            }
            return Ok(Checked::Known(MasterResponse::Announced {
                file: id,
                header: Box::new(signed),
            }));
        }
        self.gate
            .admit_new(&publisher, signed.body.size)
            .map_err(refused)?;
        Ok(Checked::New {
            id,
            signed: Box::new(signed),
            digests,
        })
    }

    /// An announce was checked and stored (or not): register the file, answer, pull.
    pub(crate) fn on_stored(&mut self, s: Storing, result: Result<Arc<VerifiedManifest>, String>) {
        self.storing.remove(&s.id);
        let manifest = match result {
            Ok(m) => m,
            Err(reason) => {
                tracing::warn!(file = %s.id, publisher = %s.publisher, %reason, "announce refused");
                self.gate.remove_file(s.publisher, s.size);
                self.metrics.announces_refused.inc();
                self.respond_publish(s.publisher, s.channel, refused(reason));
                return;
            }
        };
        let id = s.id;
        let path: PathBuf = self.registry.data_path(&id);
        tracing::info!(file = %id, name = %manifest.body().name, publisher = %s.publisher, "file announced");
        if !self.policy.has_file(&id) {
            self.register(manifest.clone(), path, Blocks::new(manifest.blocks()));
            self.publish(AuthorityEvent::FileAnnounced {
                file: id,
                name: manifest.body().name.clone(),
                size: manifest.body().size,
            });
        }
        if !self.policy.master_complete(&id) && !self.pulling.contains_key(&id) {
            let have = self
                .shelf
                .lock()
                .expect("shelf lock")
                .files
                .get(&id)
                .map(|e| e.have.clone())
                .unwrap_or_else(|| Blocks::new(manifest.blocks()));
            self.start_pull(s.publisher, manifest, have);
        }
        self.respond_publish(
            s.publisher,
            s.channel,
            MasterResponse::Announced {
                file: id,
                header: s.signed,
            },
        );
    }

    /// Files known to the master or being stored: a rescan skips these names.
    pub(crate) fn known_files(&self) -> HashSet<FileId> {
        let shelf = self.shelf.lock().expect("shelf lock");
        shelf
            .files
            .keys()
            .chain(self.storing.keys())
            .copied()
            .collect()
    }
}

enum Checked {
    Known(MasterResponse),
    New {
        id: FileId,
        signed: Box<SignedHeader>,
        digests: Vec<BlockDigest>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn own_only_refuses_everyone_else_and_names_the_flag() {
        let own = peer();
        let other = peer();
        let g = PublishGate::new(PublishPolicy::OwnOnly, own, 16);
        assert!(g.admit_new(&own, u64::MAX).is_ok());
        let e = g.admit_new(&other, 1).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(&other.to_string()), "{text}");
        assert!(text.contains(&format!("--publisher-key {other}")), "{text}");
        assert!(text.contains("--open-publishing"), "{text}");
    }

    #[test]
    fn trusted_keys_pass_without_quotas() {
        let own = peer();
        let trusted = peer();
        let g = PublishGate::new(PublishPolicy::Trusted(BTreeSet::from([trusted])), own, 16);
        assert!(g.admit_new(&trusted, u64::MAX).is_ok());
        assert!(g.admit_new(&peer(), 1).is_err());
        assert!(matches!(g.trusted(&peer()), Err(Refusal::NotTrusted(_))));
    }

    #[test]
    fn open_publishing_applies_each_quota() {
        let own = peer();
        let q = PublishQuotas {
            files: 2,
            bytes: 1_000,
            concurrent_pulls: 1,
            total_files: 3,
        };
        let mut g = PublishGate::new(PublishPolicy::Open(q), own, 16);
        let a = peer();
        assert!(g.admit_new(&a, 600).is_ok());
        g.add_file(a, 600);
        assert!(matches!(g.admit_new(&a, 500), Err(Refusal::Bytes { .. })));
        g.pull_started(a);
        assert!(matches!(g.admit_new(&a, 100), Err(Refusal::Pulls { .. })));
        assert!(matches!(g.admit_pull(&a), Err(Refusal::Pulls { .. })));
        g.pull_ended(a);
        assert!(g.admit_new(&a, 100).is_ok());
        g.add_file(a, 100);
        assert!(matches!(g.admit_new(&a, 1), Err(Refusal::Files { .. })));
        // The total across publishers.
        let b = peer();
        g.add_file(b, 1);
        assert!(matches!(
            g.admit_new(&peer(), 1),
            Err(Refusal::TotalFiles(3))
        ));
        // The master's own key is never held to quotas.
        assert!(g.admit_new(&own, u64::MAX).is_ok());
        // A file that could not be stored gives its quota back, and the tables shrink.
        g.remove_file(b, 1);
        g.remove_file(a, 100);
        g.remove_file(a, 600);
        assert_eq!(g.tracked(), 0);
        assert!(g.admit_new(&peer(), 1).is_ok());
    }

    #[test]
    fn quotas_never_overflow() {
        let own = peer();
        let mut g = PublishGate::new(PublishPolicy::Open(PublishQuotas::default()), own, 16);
        let a = peer();
        g.add_file(a, u64::MAX);
        g.add_file(a, u64::MAX);
        assert!(matches!(
            g.admit_new(&a, u64::MAX),
            Err(Refusal::Bytes { .. })
        ));
    }

    #[test]
    fn pulls_are_capped_in_all_whoever_publishes() {
        let own = peer();
        let (a, b) = (peer(), peer());
        let mut g = PublishGate::new(PublishPolicy::Trusted(BTreeSet::from([a, b])), own, 2);
        g.pull_started(a);
        assert!(g.admit_pull(&b).is_ok());
        g.pull_started(b);
        assert_eq!(g.admit_pull(&b), Err(Refusal::AllPulls(2)));
        assert_eq!(g.admit_new(&a, 1), Err(Refusal::AllPulls(2)));
        g.pull_ended(a);
        assert!(g.admit_new(&a, 1).is_ok());
        // A pull that was never counted does not free a slot.
        g.pull_ended(peer());
        assert_eq!(g.total_pulls, 1);
    }
}
