//! Announces on `/shoal/publish/1`: who may publish, countersigning, and starting the pull.

use std::sync::Arc;

use libp2p::PeerId;
use shoal_protocol::{
    block::Blocks,
    manifest::check_digest_list,
    wire::{AuthorityEvent, MasterResponse},
    Manifest,
};

use crate::pull::pull;
use crate::service::EventLoop;

impl EventLoop {
    pub(crate) fn on_announce(
        &mut self,
        publisher: PeerId,
        header: shoal_protocol::manifest::PublisherHeader,
        digests: Vec<shoal_protocol::BlockDigest>,
    ) -> MasterResponse {
        let refused = |reason: String| MasterResponse::Refused { reason };
        if let Err(e) = header.verify() {
            return refused(e.to_string());
        }
        match header.body.publisher() {
            Ok(p) if p == publisher => {}
            _ => {
                return refused("the announcing peer is not the publisher the header names".into())
            }
        }
        if let Err(e) = check_digest_list(&header.body, &digests) {
            return refused(e.to_string());
        }
        let signed = match header.countersign(&self.key) {
            Ok(s) => s,
            Err(e) => return refused(e.to_string()),
        };
        let manifest = match (Manifest {
            header: signed.clone(),
            digests,
        })
        .verify(None)
        {
            Ok(m) => Arc::new(m),
            Err(e) => return refused(e.to_string()),
        };
        let id = manifest.id();
        if !self.policy.has_file(&id) {
            if let Err(e) = self.registry.save_manifest(&manifest) {
                tracing::error!(error = %e, "cannot store manifest");
                return refused("master cannot store the manifest".into());
            }
            let path = self.registry.data_path(&id);
            tracing::info!(file = %id, name = %manifest.body().name, %publisher, "file announced");
            self.register(
                manifest.clone(),
                path.clone(),
                Blocks::new(manifest.blocks()),
            );
            self.publish(AuthorityEvent::FileAnnounced {
                file: id,
                name: manifest.body().name.clone(),
                size: manifest.body().size,
            });
        }
        if !self.policy.master_complete(&id) && !self.pulling.contains_key(&id) {
            // The publisher is the first mirror; nodes may be redirected to it while the
            // master pulls its own copy.
            self.policy.holds_all(&id, publisher);
            self.pulling.insert(id, publisher);
            let control = self.swarm.behaviour().stream.new_control();
            let path = self.registry.data_path(&id);
            tokio::spawn(pull(
                control,
                publisher,
                manifest,
                path,
                self.internal_tx.clone(),
            ));
        }
        MasterResponse::Announced {
            file: id,
            header: Box::new(signed),
        }
    }
}
