//! Length-prefixed frames: a little-endian `u32` length, then that many bytes of
//! [`crate::codec`] encoding. The length is checked against the caller's cap before anything
//! is allocated for the frame, and the decode that follows is bounded by the same cap.
//!
//! Used by the request-response codecs ([`crate::wire`]) and the control frames of piece
//! streams ([`crate::piece`]).

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{de::DeserializeOwned, Serialize};

pub(crate) fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Writes one frame holding `value`, refusing values over `max` bytes.
pub async fn write_frame<W, T>(io: &mut W, value: &T, max: usize) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let bytes = crate::codec::encode(value).map_err(invalid)?;
    if bytes.len() > max {
        return Err(invalid(format!(
            "refusing to send a {} byte frame (cap {max})",
            bytes.len()
        )));
    }
    let len = u32::try_from(bytes.len()).map_err(invalid)?;
    io.write_all(&len.to_le_bytes()).await?;
    io.write_all(&bytes).await?;
    io.flush().await
}

/// Reads one frame, refusing frames over `max` bytes before allocating for them.
pub async fn read_frame<R, T>(io: &mut R, max: usize) -> io::Result<T>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(invalid(format!("frame of {len} bytes exceeds cap {max}")));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    crate::codec::decode(&buf, max).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_PIECE_FRAME;
    use crate::wire::PieceRequest;
    use futures::io::Cursor;

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let mut c = Cursor::new(bytes);
        let r = futures::executor::block_on(read_frame::<_, PieceRequest>(&mut c, MAX_PIECE_FRAME));
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn frames_round_trip() {
        let mut out = Vec::new();
        futures::executor::block_on(write_frame(&mut out, &(7u32, "x".to_string()), 64)).unwrap();
        let mut c = Cursor::new(out);
        let back: (u32, String) = futures::executor::block_on(read_frame(&mut c, 64)).unwrap();
        assert_eq!(back, (7, "x".to_string()));
    }
}
