//! The master's probe of a suspect: fetch the reported blocks from it under a throw-away
//! identity, so the suspect cannot tell the probe from any other node's request, and check
//! them against the manifest.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use libp2p::{identity::Keypair, noise, swarm::dial_opts::DialOpts, tcp, yamux, Multiaddr, PeerId};
use shoal_protocol::{
    limits::PIECE_PROTOCOL,
    piece::{receive_blocks, ReceiveError},
    BlockRange, VerifiedManifest,
};

use crate::bans::ProbeOutcome;

/// How long a probe may take before it counts as inconclusive.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Probes `suspect` at `addrs` for `blocks` of the manifest's file.
pub async fn probe(
    suspect: PeerId,
    addrs: Vec<Multiaddr>,
    manifest: Arc<VerifiedManifest>,
    blocks: BlockRange,
) -> ProbeOutcome {
    let blocks = BlockRange::new(blocks.start, blocks.end.min(manifest.blocks()));
    if blocks.is_empty() || addrs.is_empty() {
        return ProbeOutcome::Inconclusive;
    }
    let swarm = libp2p::SwarmBuilder::with_existing_identity(Keypair::generate_ed25519())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .and_then(|b| {
            b.with_quic()
                .with_behaviour(|_| libp2p_stream::Behaviour::new())
                .map_err(|e| noise::Error::Io(std::io::Error::other(e.to_string())))
        });
    let mut swarm = match swarm {
        Ok(b) => b
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(5)))
            .build(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot build a probe swarm");
            return ProbeOutcome::Inconclusive;
        }
    };
    // The stream behaviour knows no addresses of its own: dial with the known ones, and the
    // stream opens once the connection is up.
    if let Err(e) = swarm.dial(DialOpts::peer_id(suspect).addresses(addrs).build()) {
        tracing::debug!(%suspect, error = %e, "probe dial failed");
        return ProbeOutcome::Inconclusive;
    }
    let mut control = swarm.behaviour().new_control();
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let result = tokio::time::timeout(PROBE_TIMEOUT, async {
        let mut stream = control
            .open_stream(suspect, PIECE_PROTOCOL)
            .await
            .map_err(|e| ReceiveError::Io(std::io::Error::other(e.to_string())))?;
        receive_blocks(&mut stream, &manifest, blocks, |_, _| Ok(())).await
    })
    .await;
    driver.abort();
    match result {
        Ok(Ok(())) => ProbeOutcome::Honest,
        Ok(Err(ReceiveError::Corrupt { .. })) => ProbeOutcome::Corrupt,
        // It said Ok and then sent too few bytes: a truncated answer is bad data.
        Ok(Err(ReceiveError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ProbeOutcome::Corrupt
        }
        Ok(Err(e)) => {
            tracing::debug!(%suspect, error = %e, "probe inconclusive");
            ProbeOutcome::Inconclusive
        }
        Err(_) => ProbeOutcome::Inconclusive,
    }
}
