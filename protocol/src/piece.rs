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

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::block::{BlockRange, Geometry};
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
    let mut buf = vec![0u8; manifest.body().block_size as usize];
    for block in range.iter() {
        let data = &mut buf[..geometry.block_len(block)];
        io.read_exact(data).await?;
        if !manifest.check_block(block, data) {
            return Err(ReceiveError::Corrupt { block });
        }
        sink(block, data).map_err(|source| ReceiveError::Sink { block, source })?;
    }
    Ok(())
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
        let (r, got) = receive(answer, &m, range);
        assert!(matches!(r, Err(ReceiveError::Corrupt { block: 4 })));
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
}
