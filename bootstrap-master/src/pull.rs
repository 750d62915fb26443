//! Pulling an announced file from its publisher into the master's data directory.

use std::{path::PathBuf, sync::Arc, time::Duration};

use libp2p::PeerId;
use shoal_protocol::{
    block::BlockRange, limits::PIECE_PROTOCOL, piece::receive_blocks, VerifiedManifest,
};
use tokio::sync::mpsc;

use crate::service::Internal;

/// Pulls every block of a just-announced file from its publisher, writing each verified
/// block at its offset in `path`.
pub(crate) async fn pull(
    mut control: libp2p_stream::Control,
    publisher: PeerId,
    manifest: Arc<VerifiedManifest>,
    path: PathBuf,
    internal: mpsc::Sender<Internal>,
) {
    let file = manifest.id();
    let result = async {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| e.to_string())?;
        out.set_len(manifest.body().size)
            .map_err(|e| e.to_string())?;
        let geometry = manifest.geometry();
        let total = manifest.blocks();
        let mut start = 0;
        while start < total {
            let range = BlockRange::new(start, (start + 256).min(total));
            let mut attempts = 0;
            loop {
                let r = async {
                    let mut s = control
                        .open_stream(publisher, PIECE_PROTOCOL)
                        .await
                        .map_err(|e| e.to_string())?;
                    receive_blocks(&mut s, &manifest, range, |b, data| {
                        std::os::unix::fs::FileExt::write_all_at(&out, data, geometry.offset(b))
                    })
                    .await
                    .map_err(|e| e.to_string())
                }
                .await;
                match r {
                    Ok(()) => break,
                    Err(e) if attempts < 5 => {
                        attempts += 1;
                        tracing::debug!(file = %file, error = %e, attempts, "pull retry");
                        tokio::time::sleep(Duration::from_millis(200 * attempts)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            out.sync_data().map_err(|e| e.to_string())?;
            let _ = internal.send(Internal::Pulled { file, range }).await;
            start = range.end;
        }
        Ok(())
    }
    .await;
    let _ = internal.send(Internal::PullFinished { file, result }).await;
}
