//! Piece serving: inbound `/shoal/piece/1` streams answered from the master's files, within
//! upload slots and an optional rate limit.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::AsyncWriteExt;
use libp2p::PeerId;
use shoal_protocol::{
    block::Blocks,
    limits::MAX_PIECE_FRAME,
    piece::{read_frame, refuse, send_blocks},
    rate::RateLimiter,
    wire::{PieceRequest, RefuseReason},
    FileId, VerifiedManifest,
};

use crate::metrics::Metrics;
use crate::service::{EventLoop, Internal};

/// Files the master can serve, shared with the piece tasks.
#[derive(Default)]
pub(crate) struct Shelf {
    pub(crate) files: HashMap<FileId, ShelfEntry>,
}

pub(crate) struct ShelfEntry {
    pub(crate) manifest: Arc<VerifiedManifest>,
    pub(crate) path: PathBuf,
    pub(crate) have: Blocks,
}

impl EventLoop {
    pub(crate) async fn on_piece_stream(&mut self, peer: PeerId, stream: libp2p::Stream) {
        if self.policy.is_banned(&peer) {
            return;
        }
        // All upload slots busy: drop the stream (the node asks again and is sent elsewhere)
        // rather than wait here, which would stall the whole event loop.
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "upload slots full; piece stream dropped");
            return;
        };
        let shelf = self.shelf.clone();
        let limiter = self.limiter.clone();
        let metrics = self.metrics.clone();
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match serve_piece(stream, &shelf, limiter, &metrics).await {
                Ok(Some((file, bytes))) => {
                    let _ = internal.try_send(Internal::Served { file, bytes });
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(%peer, error = %e, "piece stream ended"),
            }
        });
    }
}

/// Serves one piece stream from the master's files.
async fn serve_piece(
    mut stream: libp2p::Stream,
    shelf: &Mutex<Shelf>,
    limiter: Option<Arc<Mutex<RateLimiter>>>,
    metrics: &Metrics,
) -> std::io::Result<Option<(FileId, u64)>> {
    let req: PieceRequest = tokio::time::timeout(
        Duration::from_secs(10),
        read_frame(&mut stream, MAX_PIECE_FRAME),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let found = {
        let shelf = shelf.lock().expect("shelf lock");
        match shelf.files.get(&req.file) {
            None => Err(RefuseReason::UnknownFile),
            Some(e) if !e.have.contains_range(req.range) || req.range.is_empty() => {
                Err(RefuseReason::NotHeld)
            }
            Some(e) => Ok((e.manifest.geometry(), e.path.clone())),
        }
    };
    let (geometry, path) = match found {
        Ok(x) => x,
        Err(reason) => {
            refuse(&mut stream, reason).await?;
            return Ok(None);
        }
    };
    let file = std::fs::File::open(&path)?;
    let sent = send_blocks(
        &mut stream,
        geometry,
        req.range,
        |block, buf| std::os::unix::fs::FileExt::read_exact_at(&file, buf, geometry.offset(block)),
        |n| {
            metrics.piece_bytes_sent.inc_by(n as u64);
            let wait = limiter
                .as_ref()
                .map(|l| l.lock().expect("limiter lock").reserve(Instant::now(), n));
            async move {
                if let Some(w) = wait.filter(|w| !w.is_zero()) {
                    tokio::time::sleep(w).await;
                }
            }
        },
    )
    .await?;
    stream.close().await?;
    Ok(Some((req.file, sent)))
}
