//! Pulling an announced file from its publisher into the master's data directory.
//!
//! A pull asks for the blocks the master does not hold yet (after a restart, the blocks of a
//! partial `.data` that pass their digests are kept), one piece at a time. Every piece has
//! deadlines: opening the stream, no verified block for [`PullLimits::stall_timeout`], and
//! the whole piece within `open_timeout + bytes / min_rate`. Blocks are verified as they
//! arrive, gathered in a buffer of at most [`PULL_BUFFER`] bytes (or one block) and written
//! and synced on the blocking pool, never on the async threads. At the end the whole file is
//! checked against the manifest's SHA-256 before it is marked complete.

use std::{
    fs,
    os::unix::fs::FileExt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::{AsyncRead, AsyncWrite};
use libp2p::PeerId;
use shoal_protocol::{
    block::{BlockRange, Blocks},
    limits::{MAX_PIECE_BLOCKS, PIECE_PROTOCOL},
    piece::{receive_blocks, ReceiveError},
    VerifiedManifest,
};
use tokio::{sync::mpsc, task::AbortHandle, time::Instant};

use crate::config::PullLimits;
use crate::metrics::Metrics;
use crate::registry::{whole_file_matches, Registry};
use crate::service::{EventLoop, Internal};

/// Most bytes of one piece a pull buffers before writing them.
pub(crate) const PULL_BUFFER: u64 = 4 * 1024 * 1024;

/// Why a pull stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PullError {
    /// The piece stream could not be opened in time.
    #[error("cannot open a piece stream: {0}")]
    Open(String),
    /// No verified block for the stall timeout.
    #[error("no progress for {0:?}")]
    Stalled(Duration),
    /// The piece did not arrive at the minimum rate.
    #[error("piece of {bytes} bytes not received within {within:?}")]
    TooSlow {
        /// The piece's size.
        bytes: u64,
        /// The deadline it had.
        within: Duration,
    },
    /// The transfer failed (refusal, cut-off, bad data).
    #[error("{0}")]
    Receive(#[from] ReceiveError),
    /// Local disk.
    #[error("local file: {0}")]
    Disk(String),
    /// Every block passed its digest but the whole file does not match its SHA-256.
    #[error("the whole file does not match the manifest's SHA-256")]
    WholeFile,
}

impl PullError {
    /// Whether trying the same piece again may help.
    fn is_retryable(&self) -> bool {
        !matches!(
            self,
            PullError::Disk(_)
                | PullError::WholeFile
                | PullError::Receive(ReceiveError::Corrupt { .. } | ReceiveError::BadRange(_))
        )
    }
}

/// A running pull; dropping it aborts the task (so a master that stops, or whose loop
/// panics, leaves no pull writing behind it).
pub(crate) struct PullTask {
    pub(crate) publisher: PeerId,
    abort: AbortHandle,
}

impl Drop for PullTask {
    fn drop(&mut self) {
        self.abort.abort();
    }
}

/// Blocks per piece for `block_size`: a piece never buffers more than [`PULL_BUFFER`] (but
/// always at least one block) nor asks for more than [`MAX_PIECE_BLOCKS`].
pub(crate) fn blocks_per_piece(block_size: u32) -> u32 {
    let n = PULL_BUFFER / u64::from(block_size.max(1));
    (n.min(u64::from(MAX_PIECE_BLOCKS)) as u32).max(1)
}

/// The pieces a pull still needs: the blocks not in `have`, cut at `per_piece` blocks.
pub(crate) fn missing_pieces(have: &Blocks, per_piece: u32) -> Vec<BlockRange> {
    let per_piece = per_piece.max(1);
    let mut out = Vec::new();
    for r in have.missing() {
        let mut start = r.start;
        while start < r.end {
            let end = start.saturating_add(per_piece).min(r.end);
            out.push(BlockRange::new(start, end));
            start = end;
        }
    }
    out
}

/// How long a piece of `bytes` may take in all.
pub(crate) fn piece_deadline(limits: &PullLimits, bytes: u64) -> Duration {
    let at_min_rate = Duration::from_secs_f64(bytes as f64 / limits.min_rate.max(1) as f64);
    limits.open_timeout.saturating_add(at_min_rate)
}

/// Receives `range` over `io` into a buffer, within the deadlines of `limits` (the clock
/// starts at `started`, before the stream was opened).
pub(crate) async fn receive_piece<S>(
    io: &mut S,
    manifest: &VerifiedManifest,
    range: BlockRange,
    limits: &PullLimits,
    started: Instant,
) -> Result<Vec<u8>, PullError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let bytes = manifest.geometry().range_bytes(range);
    let within = piece_deadline(limits, bytes);
    let deadline = started + within;
    let progress = AtomicU64::new(0);
    let mut buf = Vec::with_capacity(bytes.min(PULL_BUFFER) as usize);
    let result = {
        let recv = receive_blocks(io, manifest, range, |_, data| {
            buf.extend_from_slice(data);
            progress.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        tokio::pin!(recv);
        let mut tick =
            tokio::time::interval((limits.stall_timeout / 4).max(Duration::from_millis(10)));
        let mut seen = 0;
        let mut last_progress = Instant::now();
        loop {
            tokio::select! {
                r = &mut recv => break r.map_err(PullError::from),
                _ = tokio::time::sleep_until(deadline) => break Err(PullError::TooSlow { bytes, within }),
                _ = tick.tick() => {
                    let now = Instant::now();
                    let p = progress.load(Ordering::Relaxed);
                    if p != seen {
                        seen = p;
                        last_progress = now;
                    } else if now.duration_since(last_progress) >= limits.stall_timeout {
                        break Err(PullError::Stalled(limits.stall_timeout));
                    }
                }
            }
        }
    };
    result.map(|()| buf)
}

/// Pulls the blocks of `manifest` not in `have` from `publisher`, then checks the whole file
/// and marks it complete.
#[allow(clippy::too_many_arguments)]
async fn pull(
    mut control: libp2p_stream::Control,
    publisher: PeerId,
    manifest: Arc<VerifiedManifest>,
    registry: Registry,
    have: Blocks,
    limits: PullLimits,
    metrics: Metrics,
    internal: mpsc::Sender<Internal>,
) {
    let file = manifest.id();
    let path = registry.data_path(&file);
    let result = async {
        let out = {
            let (path, size) = (path.clone(), manifest.body().size);
            blocking(move || {
                let f = fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)?;
                if f.metadata()?.len() != size {
                    f.set_len(size)?;
                }
                Ok(Arc::new(f))
            })
            .await?
        };
        let geometry = manifest.geometry();
        for range in missing_pieces(&have, blocks_per_piece(manifest.body().block_size)) {
            let mut attempt = 0;
            let data = loop {
                let started = Instant::now();
                let r = async {
                    let mut s = tokio::time::timeout(
                        limits.open_timeout,
                        control.open_stream(publisher, PIECE_PROTOCOL),
                    )
                    .await
                    .map_err(|_| PullError::Open("timed out".into()))?
                    .map_err(|e| PullError::Open(e.to_string()))?;
                    receive_piece(&mut s, &manifest, range, &limits, started).await
                }
                .await;
                match r {
                    Ok(data) => break data,
                    Err(e) if e.is_retryable() && attempt + 1 < limits.attempts => {
                        attempt += 1;
                        tracing::debug!(file = %file, error = %e, attempt, "pull retry");
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            let len = data.len() as u64;
            let (out, offset) = (out.clone(), geometry.offset(range.start));
            blocking(move || {
                out.write_all_at(&data, offset)?;
                out.sync_data()
            })
            .await?;
            metrics.pulled_bytes.inc_by(len);
            let _ = internal.send(Internal::Pulled { file, range }).await;
        }
        let (m, reg) = (manifest.clone(), registry.clone());
        let verdict = tokio::task::spawn_blocking(move || {
            if !whole_file_matches(&m, &reg.data_path(&m.id()))? {
                return Ok(false);
            }
            reg.mark_complete(&m.id()).map(|()| true)
        })
        .await
        .map_err(|e| PullError::Disk(e.to_string()))?
        .map_err(|e| PullError::Disk(e.to_string()))?;
        if verdict {
            Ok(())
        } else {
            Err(PullError::WholeFile)
        }
    }
    .await;
    let _ = internal
        .send(Internal::PullFinished {
            file,
            publisher,
            result,
        })
        .await;
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, PullError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PullError::Disk(e.to_string()))?
        .map_err(|e| PullError::Disk(e.to_string()))
}

impl EventLoop {
    /// Starts pulling the blocks of `manifest` not in `have` from `publisher`, which counts
    /// as a mirror of the whole file meanwhile.
    pub(crate) fn start_pull(
        &mut self,
        publisher: PeerId,
        manifest: Arc<VerifiedManifest>,
        have: Blocks,
    ) {
        let id = manifest.id();
        if self.pulling.contains_key(&id) {
            return;
        }
        self.awaiting.remove(&id);
        self.policy.holds_all(&id, publisher);
        self.gate.pull_started(publisher);
        tracing::info!(file = %id, %publisher, missing = have.capacity() - have.count(), "pulling");
        let handle = tokio::spawn(pull(
            self.swarm.behaviour().stream.new_control(),
            publisher,
            manifest,
            self.registry.clone(),
            have,
            self.cfg.pull,
            self.metrics.clone(),
            self.internal_tx.clone(),
        ));
        self.pulling.insert(
            id,
            PullTask {
                publisher,
                abort: handle.abort_handle(),
            },
        );
    }

    /// Resumes the pulls of incomplete files published by `peer`, which just connected.
    pub(crate) fn resume_pulls_from(&mut self, peer: PeerId) {
        let ids: Vec<_> = self
            .awaiting
            .iter()
            .filter(|(_, p)| **p == peer)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if self.gate.admit_pull(&peer).is_err() {
                break;
            }
            let stored = self
                .shelf
                .lock()
                .expect("shelf lock")
                .files
                .get(&id)
                .map(|e| (e.manifest.clone(), e.have.clone()));
            if let Some((manifest, have)) = stored {
                self.start_pull(peer, manifest, have);
            }
        }
    }

    /// A pull ended: complete, or waiting for its publisher to come back.
    pub(crate) fn on_pull_finished(
        &mut self,
        file: shoal_protocol::FileId,
        publisher: PeerId,
        result: Result<(), PullError>,
    ) {
        if let Some(task) = self.pulling.remove(&file) {
            self.gate.pull_ended(task.publisher);
        }
        match result {
            Ok(()) => tracing::info!(file = %file, "master holds the whole file"),
            Err(e @ PullError::WholeFile) => {
                // Every block matches its digest but not the header's whole-file hash: the
                // publisher signed an inconsistent header. Pulling again cannot fix that; the
                // file is never marked complete.
                tracing::error!(file = %file, %publisher, error = %e, "published file is inconsistent; not marked complete");
            }
            Err(e) => {
                tracing::warn!(file = %file, %publisher, error = %e, "pull from publisher stopped; resumes when it announces or reconnects");
                self.awaiting.insert(file, publisher);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    use libp2p::identity::Keypair;
    use shoal_protocol::{manifest::ManifestBuilder, piece::send_blocks};

    fn manifest(data: &[u8], block_size: u32) -> VerifiedManifest {
        let key = Keypair::generate_ed25519();
        let mut b = ManifestBuilder::new(block_size);
        b.update(data);
        let (body, digests) = b.finish(
            "f".into(),
            key.public().encode_protobuf(),
            key.public().to_peer_id(),
            0,
        );
        let header = body.sign(&key).unwrap().countersign(&key).unwrap();
        shoal_protocol::Manifest { header, digests }
            .verify(None)
            .unwrap()
    }

    /// A server that answers with `answer` and then, if `stall`, never sends another byte.
    struct Peer {
        answer: Vec<u8>,
        at: usize,
        per_read: usize,
    }

    impl AsyncRead for Peer {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            if self.at >= self.answer.len() {
                return Poll::Pending; // stalls: never ends, never fails
            }
            let n = buf
                .len()
                .min(self.per_read)
                .min(self.answer.len() - self.at);
            buf[..n].copy_from_slice(&self.answer[self.at..self.at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for Peer {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn served(data: &[u8], m: &VerifiedManifest, range: BlockRange) -> Vec<u8> {
        let g = m.geometry();
        let mut out = Vec::new();
        futures::executor::block_on(send_blocks(
            &mut out,
            g,
            range,
            |b, buf| {
                let o = g.offset(b) as usize;
                buf.copy_from_slice(&data[o..o + buf.len()]);
                Ok(())
            },
            |_| async {},
        ))
        .unwrap();
        out
    }

    #[test]
    fn pieces_cover_exactly_the_missing_blocks() {
        let mut have = Blocks::new(1000);
        have.insert_range(BlockRange::new(10, 20));
        have.insert_range(BlockRange::new(500, 1000));
        let pieces = missing_pieces(&have, 256);
        assert_eq!(
            pieces,
            vec![
                BlockRange::new(0, 10),
                BlockRange::new(20, 276),
                BlockRange::new(276, 500)
            ]
        );
        assert!(missing_pieces(&Blocks::full(7), 3).is_empty());
        assert_eq!(blocks_per_piece(64 * 1024), 64);
        assert_eq!(blocks_per_piece(4 * 1024), MAX_PIECE_BLOCKS);
        assert_eq!(blocks_per_piece(16 * 1024 * 1024), 1);
    }

    #[test]
    fn deadline_grows_with_size_at_the_minimum_rate() {
        let l = PullLimits {
            open_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            min_rate: 1024,
            attempts: 1,
        };
        assert_eq!(piece_deadline(&l, 0), Duration::from_secs(10));
        assert_eq!(piece_deadline(&l, 10 * 1024), Duration::from_secs(20));
    }

    fn limits() -> PullLimits {
        PullLimits {
            open_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            min_rate: 1024,
            attempts: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_honest_piece_arrives_whole() {
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
        let m = manifest(&data, 4096);
        let range = BlockRange::new(2, 6);
        let mut peer = Peer {
            answer: served(&data, &m, range),
            at: 0,
            per_read: 1000,
        };
        let got = receive_piece(&mut peer, &m, range, &limits(), Instant::now())
            .await
            .unwrap();
        assert_eq!(got, data[2 * 4096..6 * 4096]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stalls_after_the_response_frame_is_left_after_the_stall_timeout() {
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
        let m = manifest(&data, 4096);
        let range = BlockRange::new(0, 9);
        let mut answer = served(&data, &m, range);
        answer.truncate(answer.len() - 5 * 4096); // frame and some blocks, then nothing
        let mut peer = Peer {
            answer,
            at: 0,
            per_read: 4096,
        };
        let start = Instant::now();
        let mut l = limits();
        l.min_rate = 1; // the rate deadline is far away: the stall timeout must fire
        let r = receive_piece(&mut peer, &m, range, &l, start).await;
        assert!(matches!(r, Err(PullError::Stalled(_))), "{r:?}");
        let waited = start.elapsed();
        assert!(
            waited >= l.stall_timeout && waited <= l.stall_timeout + l.stall_timeout / 2,
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_is_cut_at_the_minimum_rate() {
        let data: Vec<u8> = (0..400_000u32).map(|i| (i % 253) as u8).collect();
        let m = manifest(&data, 4096);
        let range = BlockRange::new(0, 90);
        let answer = served(&data, &m, range);
        // One read (at most a block) every 12 s: progress never stalls 30 s, but 90 blocks
        // at 1 KiB/s minimum may take only 10 s + 360 s.
        struct Trickle {
            inner: Peer,
            next: Option<Pin<Box<tokio::time::Sleep>>>,
        }
        impl AsyncRead for Trickle {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut [u8],
            ) -> Poll<std::io::Result<usize>> {
                let this = &mut *self;
                if let Some(s) = this.next.as_mut() {
                    if s.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                this.next = Some(Box::pin(tokio::time::sleep(Duration::from_secs(12))));
                Pin::new(&mut this.inner).poll_read(cx, buf)
            }
        }
        impl AsyncWrite for Trickle {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                b: &[u8],
            ) -> Poll<std::io::Result<usize>> {
                Poll::Ready(Ok(b.len()))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        use std::future::Future;
        let mut peer = Trickle {
            inner: Peer {
                answer,
                at: 0,
                per_read: 4096,
            },
            next: None,
        };
        let start = Instant::now();
        let r = receive_piece(&mut peer, &m, range, &limits(), start).await;
        assert!(matches!(r, Err(PullError::TooSlow { .. })), "{r:?}");
        assert_eq!(start.elapsed(), piece_deadline(&limits(), 90 * 4096));
    }
}
