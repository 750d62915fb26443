//! Framing of shoal streams, and the two halves of a piece transfer.
//!
//! A frame is a little-endian `u32` length and that many bytes of [`crate::codec`] encoding.
//! A piece stream is: the client's [`PieceRequest`] frame, the server's [`PieceResponse`]
//! frame, then on `Ok` the raw bytes of each block of the range, in order. The client knows
//! every block's length from the manifest, so blocks need no framing, and it checks each block
//! against its digest as soon as it has it: a bad block is caught before the next one is read.
//!
//! Everything here is generic over `futures` I/O traits: the caller owns the stream. Frames
//! themselves are [`crate::frame`]'s.

use std::{future::Future, io};

use futures::{
    stream::FuturesOrdered, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt,
    StreamExt,
};

use crate::block::{AlignedBuf, BlockRange, Geometry};
pub use crate::frame::{read_frame, write_frame};
use crate::limits::MAX_PIECE_FRAME;
use crate::manifest::VerifiedManifest;
use crate::wire::{PieceRequest, PieceResponse, RefuseReason};

/// Why a piece could not be received.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The stream failed or ended early (a short read is an `UnexpectedEof`).
    #[error("stream failed: {0}")]
    Io(#[from] io::Error),
    /// The server refused the request.
    #[error("server refused: {0:?}")]
    Refused(RefuseReason),
    /// A block failed its digest; the blocks before it were delivered.
    #[error("block {block} failed its digest")]
    Corrupt {
        /// The first bad block.
        block: u32,
    },
    /// The range is not within the file.
    #[error("range {0:?} is outside the file")]
    BadRange(BlockRange),
    /// The sink refused a verified block (a local write error).
    #[error("could not store block {block}: {source}")]
    Sink {
        /// The block.
        block: u32,
        /// The local error.
        source: io::Error,
    },
}

/// Client half: requests `range` of the manifest's file and hands each verified block to
/// `sink`, in order. Returns after the last block; on error, the blocks already handed to
/// `sink` are good and the rest were not delivered.
pub async fn receive_blocks<S, F>(
    io: &mut S,
    manifest: &VerifiedManifest,
    range: BlockRange,
    mut sink: F,
) -> Result<(), ReceiveError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(u32, &[u8]) -> io::Result<()>,
{
    receive_blocks_overlapped(
        io,
        manifest,
        range,
        1,
        |block, buf, len| futures::future::ready(sink(block, &buf[..len]).map(|()| buf)),
        |_, _| {},
    )
    .await
}

/// As [`receive_blocks`], with the storing of blocks overlapping the reading of the next
/// ones. `store(block, buf, len)` starts storing verified block `block` (the first `len`
/// bytes of `buf`) and returns a future of the buffer, given back for reuse; the future should
/// make progress without being polled (a blocking-pool task started before it returns: a
/// disk write). It uses `depth` buffers: while the next block is read into one, up to
/// `depth - 1` blocks are being stored (`depth` while it waits for a buffer back).
/// `stored(block, len)` is called in block order as each one's store succeeded. On error,
/// exactly the blocks `stored` was called for are delivered; a block stored after an earlier
/// one failed is not counted. A bad block is reported as such even when a store before it
/// failed (the peer's fault is not hidden by a local one).
pub async fn receive_blocks_overlapped<S, W, Fut, D>(
    io: &mut S,
    manifest: &VerifiedManifest,
    range: BlockRange,
    depth: usize,
    mut store: W,
    mut stored: D,
) -> Result<(), ReceiveError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    W: FnMut(u32, AlignedBuf, usize) -> Fut,
    Fut: Future<Output = io::Result<AlignedBuf>>,
    D: FnMut(u32, usize),
{
    if range.is_empty() || range.end > manifest.blocks() {
        return Err(ReceiveError::BadRange(range));
    }
    let req = PieceRequest {
        file: manifest.id(),
        range,
    };
    write_frame(io, &req, MAX_PIECE_FRAME).await?;
    match read_frame::<_, PieceResponse>(io, MAX_PIECE_FRAME).await? {
        PieceResponse::Ok => {}
        PieceResponse::Refused(r) => return Err(ReceiveError::Refused(r)),
    }
    let geometry = manifest.geometry();
    let block_size = manifest.body().block_size as usize;
    let depth = depth.max(1);
    let mut storing = FuturesOrdered::new();
    let mut spare: Option<AlignedBuf> = None;
    let mut made = 0usize;
    // The outcome of the oldest store: its buffer back, or the error that ends the transfer.
    let mut done = |(block, len, r): (u32, usize, io::Result<AlignedBuf>)| match r {
        Ok(buf) => {
            stored(block, len);
            Ok(buf)
        }
        Err(source) => Err(ReceiveError::Sink { block, source }),
    };
    let mut failure = None;
    for block in range.iter() {
        let buf = match spare.take() {
            Some(b) => b,
            None if made < depth => {
                made += 1;
                // Aligned, so that a store may write whole blocks with O_DIRECT without a copy.
                AlignedBuf::zeroed(block_size)
            }
            // A failed store ends the transfer at once: the blocks after it do not count.
            None => match storing.next().await {
                Some(r) => done(r)?,
                None => AlignedBuf::zeroed(block_size),
            },
        };
        let mut buf = buf;
        let len = geometry.block_len(block);
        if let Err(e) = io.read_exact(&mut buf[..len]).await {
            failure = Some(e.into());
            break;
        }
        if !manifest.check_block(block, &buf[..len]) {
            failure = Some(ReceiveError::Corrupt { block });
            break;
        }
        let fut = store(block, buf, len);
        storing.push_back(async move { (block, len, fut.await) });
        // Keep at most `depth` buffers: reuse one that is back already.
        if let Some(Some(r)) = storing.next().now_or_never() {
            spare = Some(done(r)?);
        }
    }
    // Every store started finishes, in order, before the outcome is known. A failed store
    // comes before the read failure that stopped the loop: it ends the count and is the one
    // reported, unless the peer sent a bad block.
    while let Some(r) = storing.next().await {
        if let Err(e) = done(r) {
            return Err(match failure {
                Some(corrupt @ ReceiveError::Corrupt { .. }) => corrupt,
                _ => e,
            });
        }
    }
    failure.map_or(Ok(()), Err)
}

/// Server half, after the request frame was read and accepted: writes the `Ok` frame and then
/// each block of `range`, read by `read` into a buffer of the block's length. `pace` is awaited
/// before each block with its length (rate limiting).
pub async fn send_blocks<W, R, P, Fut>(
    io: &mut W,
    geometry: Geometry,
    range: BlockRange,
    mut read: R,
    mut pace: P,
) -> io::Result<u64>
where
    W: AsyncWrite + Unpin,
    R: FnMut(u32, &mut [u8]) -> io::Result<()>,
    P: FnMut(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    write_frame(io, &PieceResponse::Ok, MAX_PIECE_FRAME).await?;
    let mut buf = vec![0u8; geometry.block_size as usize];
    let mut sent = 0u64;
    for block in range.iter() {
        let data = &mut buf[..geometry.block_len(block)];
        read(block, data)?;
        pace(data.len()).await;
        io.write_all(data).await?;
        sent += data.len() as u64;
    }
    io.flush().await?;
    Ok(sent)
}

/// Server half for a refusal: writes the refusal frame.
pub async fn refuse<W: AsyncWrite + Unpin>(io: &mut W, reason: RefuseReason) -> io::Result<()> {
    write_frame(io, &PieceResponse::Refused(reason), MAX_PIECE_FRAME).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::manifest_for;
    use futures::io::Cursor;
    use libp2p::identity::Keypair;

    /// An in-memory duplex: what the client writes, and what the server answers.
    struct Duplex {
        read: Cursor<Vec<u8>>,
        written: Vec<u8>,
    }

    impl AsyncRead for Duplex {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::pin::Pin::new(&mut self.read).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Duplex {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.written.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn served(data: &[u8], m: &VerifiedManifest, range: BlockRange) -> Vec<u8> {
        let mut out = Vec::new();
        let g = m.geometry();
        futures::executor::block_on(send_blocks(
            &mut out,
            g,
            range,
            |b, buf| {
                let off = g.offset(b) as usize;
                buf.copy_from_slice(&data[off..off + buf.len()]);
                Ok(())
            },
            |_| async {},
        ))
        .unwrap();
        out
    }

    fn receive(
        answer: Vec<u8>,
        m: &VerifiedManifest,
        range: BlockRange,
    ) -> (Result<(), ReceiveError>, Vec<u32>) {
        let mut io = Duplex {
            read: Cursor::new(answer),
            written: Vec::new(),
        };
        let mut got = Vec::new();
        let r = futures::executor::block_on(receive_blocks(&mut io, m, range, |b, _| {
            got.push(b);
            Ok(())
        }));
        (r, got)
    }

    fn setup() -> (Vec<u8>, VerifiedManifest) {
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        let m = manifest_for(
            &data,
            4096,
            &Keypair::generate_ed25519(),
            &Keypair::generate_ed25519(),
        );
        (data, m.verify(None).unwrap())
    }

    #[test]
    fn honest_bytes_are_delivered() {
        let (data, m) = setup();
        let range = BlockRange::new(7, 10);
        let (r, got) = receive(served(&data, &m, range), &m, range);
        r.unwrap();
        assert_eq!(got, vec![7, 8, 9]);
    }

    #[test]
    fn a_flipped_byte_stops_at_the_bad_block() {
        let (data, m) = setup();
        let range = BlockRange::new(2, 6);
        let mut answer = served(&data, &m, range);
        let len = answer.len();
        answer[len - 4096 - 10] ^= 0xff; // inside block 4
        let (r, got) = receive(answer.clone(), &m, range);
        assert!(matches!(r, Err(ReceiveError::Corrupt { block: 4 })));
        assert_eq!(got, vec![2, 3]);
        // A failed store before it does not hide the bad block; the count stops there.
        let (r, got, _) = receive_overlapped(answer.clone(), &m, range, 4, 50, Some(3));
        assert!(
            matches!(r, Err(ReceiveError::Corrupt { block: 4 })),
            "{r:?}"
        );
        assert_eq!(got, vec![2]);
        // With slow stores under way, they finish before the bad block is reported.
        let (r, got, _) = receive_overlapped(answer, &m, range, 4, 50, None);
        assert!(
            matches!(r, Err(ReceiveError::Corrupt { block: 4 })),
            "{r:?}"
        );
        assert_eq!(got, vec![2, 3]);
    }

    #[test]
    fn truncation_is_an_io_error() {
        let (data, m) = setup();
        let range = BlockRange::new(0, 3);
        let mut answer = served(&data, &m, range);
        answer.truncate(answer.len() - 1);
        let (r, got) = receive(answer, &m, range);
        assert!(matches!(r, Err(ReceiveError::Io(_))));
        assert_eq!(got, vec![0, 1]);
    }

    #[test]
    fn the_wrong_block_is_corrupt() {
        let (data, m) = setup();
        let answer = served(&data, &m, BlockRange::new(1, 2));
        let (r, _) = receive(answer, &m, BlockRange::new(0, 1));
        assert!(matches!(r, Err(ReceiveError::Corrupt { block: 0 })));
    }

    /// A store that finishes after being polled `polls` times (waking itself each time), as a
    /// disk write that takes a while; `fail` makes block `fail`'s store fail.
    struct Slow {
        polls: u32,
        fail: bool,
        buf: Option<AlignedBuf>,
    }

    impl Future for Slow {
        type Output = io::Result<AlignedBuf>;
        fn poll(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Self::Output> {
            if self.polls > 0 {
                self.polls -= 1;
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            if self.fail {
                return std::task::Poll::Ready(Err(io::Error::other("disk full")));
            }
            std::task::Poll::Ready(Ok(self.buf.take().expect("polled once more")))
        }
    }

    /// Receives `range` with `depth` stores at once, each taking `polls` polls, block `fail`'s
    /// failing; returns the outcome, the blocks counted as stored, and the largest number of
    /// stores that were started and not yet counted at any time.
    fn receive_overlapped(
        answer: Vec<u8>,
        m: &VerifiedManifest,
        range: BlockRange,
        depth: usize,
        polls: u32,
        fail: Option<u32>,
    ) -> (Result<(), ReceiveError>, Vec<u32>, usize) {
        let mut io = Duplex {
            read: Cursor::new(answer),
            written: Vec::new(),
        };
        let started = std::cell::Cell::new(0usize);
        let most = std::cell::Cell::new(0usize);
        let mut got = Vec::new();
        let r = futures::executor::block_on(receive_blocks_overlapped(
            &mut io,
            m,
            range,
            depth,
            |block, buf, len| {
                assert_eq!(len, m.geometry().block_len(block));
                assert!(
                    m.check_block(block, &buf[..len]),
                    "only verified blocks are stored"
                );
                started.set(started.get() + 1);
                Slow {
                    polls,
                    fail: fail == Some(block),
                    buf: Some(buf),
                }
            },
            |block, _| {
                most.set(most.get().max(started.get() - got.len()));
                got.push(block);
            },
        ));
        (r, got, most.get())
    }

    #[test]
    fn stores_overlap_the_next_reads_up_to_the_depth() {
        let (data, m) = setup();
        let range = BlockRange::new(0, 9);
        for depth in [1, 2, 4] {
            let (r, got, most) =
                receive_overlapped(served(&data, &m, range), &m, range, depth, 5, None);
            r.unwrap();
            assert_eq!(got, (0..9).collect::<Vec<_>>(), "in order, depth {depth}");
            // The slow stores were waited for only once `depth` of them were under way.
            assert_eq!(most, depth, "stores at once with depth {depth}");
        }
    }

    #[test]
    fn a_failed_store_ends_the_transfer_and_later_blocks_do_not_count() {
        let (data, m) = setup();
        let range = BlockRange::new(0, 6);
        let (r, got, _) = receive_overlapped(served(&data, &m, range), &m, range, 4, 3, Some(2));
        assert!(
            matches!(r, Err(ReceiveError::Sink { block: 2, .. })),
            "{r:?}"
        );
        // Blocks 3 and 4 were stored too, but after the failure: not delivered.
        assert_eq!(got, vec![0, 1]);
    }
}
