//! The one place where shoal values become bytes and back.
//!
//! Every encode and decode of the project goes through [`encode`] and [`decode`]. The format is
//! bincode 2 (standard config, varint integers) through its serde integration. To swap the
//! encoding (postcard is the maintained alternative), change this module; nothing else names
//! bincode.
//!
//! Allocation while decoding is bounded: bincode is told a limit on the bytes a decode may
//! claim (every primitive claims its in-memory size, every container its length times its
//! element size, *before* allocating). The limit is the smallest of a few fixed sizes that is
//! at least [`CLAIM_FACTOR`] times the message's cap, because bincode takes the limit as a
//! const generic. A hostile length prefix (a string claiming 2^40 bytes) is therefore an error,
//! not an allocation.

use serde::{de::DeserializeOwned, Serialize};

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The input is larger than the cap for this message.
    #[error("message of {len} bytes exceeds the cap of {max} bytes")]
    TooLarge {
        /// Length of the input.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The input is not a valid encoding (or claims more memory than its cap allows).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The input has bytes after a complete value.
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
}

/// Why a value could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode message: {0}")]
pub struct EncodeError(String);

/// A decode may claim at most this many times its cap in memory. Every legitimate shoal
/// message claims at most 4 bytes per wire byte (a one-byte varint decoding to a `u32`), plus
/// a constant.
pub const CLAIM_FACTOR: usize = 4;

/// Caps above this are refused outright: no shoal message is this large.
pub const MAX_DECODE_CAP: usize = 16 * 1024 * 1024;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` in the canonical shoal encoding.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| EncodeError(e.to_string()))
}

fn decode_limited<T: DeserializeOwned, const LIMIT: usize>(
    bytes: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(bytes, config().with_limit::<LIMIT>())
}

/// The claim limit used for a message capped at `max` bytes (for tests and docs).
pub fn claim_limit(max: usize) -> usize {
    const BUCKETS: [usize; 6] = [16 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20];
    let want = max.saturating_mul(CLAIM_FACTOR).saturating_add(1024);
    BUCKETS
        .into_iter()
        .find(|b| *b >= want)
        .unwrap_or(BUCKETS[BUCKETS.len() - 1])
}

/// Decodes a value from exactly `bytes`, refusing inputs over `max` bytes.
///
/// Memory claimed while decoding is limited to [`claim_limit`]`(max)`, so a length prefix that
/// promises more than the cap allows is refused before anything is allocated for it.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, DecodeError> {
    if bytes.len() > max || max > MAX_DECODE_CAP {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: max.min(MAX_DECODE_CAP),
        });
    }
    let decoded = match claim_limit(max) {
        l if l <= 16 << 10 => decode_limited::<T, { 16 << 10 }>(bytes),
        l if l <= 256 << 10 => decode_limited::<T, { 256 << 10 }>(bytes),
        l if l <= 1 << 20 => decode_limited::<T, { 1 << 20 }>(bytes),
        l if l <= 4 << 20 => decode_limited::<T, { 4 << 20 }>(bytes),
        l if l <= 16 << 20 => decode_limited::<T, { 16 << 20 }>(bytes),
        _ => decode_limited::<T, { 64 << 20 }>(bytes),
    };
    let (value, used) = decoded.map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(DecodeError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_oversized_and_trailing_input() {
        let bytes = encode(&(1u32, "abc".to_string())).unwrap();
        assert!(matches!(
            decode::<(u32, String)>(&bytes, 2),
            Err(DecodeError::TooLarge { .. })
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode::<(u32, String)>(&longer, 100),
            Err(DecodeError::Trailing(1))
        ));
        let v: (u32, String) = decode(&bytes, 100).unwrap();
        assert_eq!(v, (1, "abc".to_string()));
    }

    /// A varint length prefix (bincode's `u64` marker 253) claiming `len` elements.
    fn claiming(len: u64) -> Vec<u8> {
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes
    }

    #[test]
    fn hostile_length_prefix_is_an_error_not_an_allocation() {
        for len in [1u64 << 40, 1 << 62, u64::MAX] {
            assert!(decode::<Vec<u8>>(&claiming(len), 1024).is_err());
            // A String is decoded through a Vec<u8> allocated at the claimed length unless
            // the claim is limited: this aborted the process before the limit was set.
            assert!(decode::<String>(&claiming(len), 1024).is_err());
            assert!(
                decode::<(u32, String)>(&[[7u8].as_slice(), &claiming(len)].concat(), 64).is_err()
            );
            assert!(decode::<Vec<String>>(&claiming(len), 1024).is_err());
        }
    }

    #[test]
    fn claims_within_the_limit_still_decode() {
        // The largest legitimate string under a 64 KiB cap decodes.
        let s = "x".repeat(60_000);
        let bytes = encode(&s).unwrap();
        assert_eq!(decode::<String>(&bytes, 64 * 1024).unwrap(), s);
        // Dense u32 varints: 4 bytes claimed per wire byte.
        let v: Vec<u32> = vec![1; 60_000];
        let bytes = encode(&v).unwrap();
        assert_eq!(decode::<Vec<u32>>(&bytes, 64 * 1024).unwrap(), v);
    }

    #[test]
    fn claim_limits_grow_with_the_cap() {
        assert!(claim_limit(4096) >= 4096 * CLAIM_FACTOR);
        assert!(claim_limit(64 * 1024) <= 1 << 20);
        assert!(claim_limit(9 << 20) >= 36 << 20);
        assert!(matches!(
            decode::<u8>(&[1], MAX_DECODE_CAP + 1),
            Err(DecodeError::TooLarge { .. })
        ));
    }
}
