//! The one place where shoal values become bytes and back.
//!
//! Every encode and decode of the project goes through [`encode`] and [`decode`]. The format is
//! bincode 2 (standard config, varint integers) through its serde integration. To swap the
//! encoding (postcard is the maintained alternative), change these two functions; nothing else
//! names bincode.

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
    /// The input is not a valid encoding.
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

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` in the canonical shoal encoding.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| EncodeError(e.to_string()))
}

/// Decodes a value from exactly `bytes`, refusing inputs over `max` bytes.
///
/// Allocation during decoding is bounded by `max`: bincode refuses to read more than the
/// input holds, so a hostile length prefix cannot make it allocate past the input size.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
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

    #[test]
    fn hostile_length_prefix_is_an_error_not_an_allocation() {
        // A Vec<u8> claiming u64::MAX elements with no payload behind it.
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Vec<u8>>(&bytes, 1024).is_err());
    }
}
