//! The one codec trait of the protocol, and the (swappable) serde backend
//! behind it.
//!
//! Every type that crosses the wire implements [`Codec`]. Structured
//! messages are serialised with bincode 2 (serde, standard config, varint
//! integers) **always with a byte limit** ([`MAX_MESSAGE_LEN`]); this is an
//! implementation detail hidden behind [`Codec`], so the backend can be
//! swapped without touching callers. Tensor payloads never go through serde:
//! they travel as raw chunk records (see [`crate::payload`]).

use bytes::{Buf, BufMut};
use serde::{Serialize, de::DeserializeOwned};

use crate::frame::MAX_FRAME_LEN;

/// Largest serialised message, in bytes: a message must fit in one frame.
pub const MAX_MESSAGE_LEN: usize = MAX_FRAME_LEN;

/// Encode to and decode from bytes.
///
/// `decode` consumes exactly the bytes of one value from the front of `buf`
/// and leaves the rest. It never panics on malformed input and never
/// allocates more than the declared, bounded sizes allow.
pub trait Codec: Sized {
    /// Append the encoding of `self` to `buf`.
    fn encode(&self, buf: &mut impl BufMut);

    /// Decode one value from the front of `buf`.
    fn decode(buf: &mut impl Buf) -> Result<Self, DecodeError>;

    /// Encoding as a new vector.
    fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decode a value that must occupy all of `bytes` (no trailing bytes).
    fn decode_exact(mut bytes: &[u8]) -> Result<Self, DecodeError> {
        let v = Self::decode(&mut bytes)?;
        if bytes.is_empty() {
            Ok(v)
        } else {
            Err(DecodeError::TrailingBytes(bytes.len()))
        }
    }
}

/// Why bytes could not be decoded into a protocol value.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended before the value was complete.
    #[error("input truncated: the value needs more bytes than were given")]
    Truncated,
    /// The value was complete but bytes were left over.
    #[error("{0} trailing bytes after the value")]
    TrailingBytes(usize),
    /// The value would need more than [`MAX_MESSAGE_LEN`] bytes.
    #[error("value exceeds the limit of {MAX_MESSAGE_LEN} bytes")]
    TooLarge,
    /// The bytes are not a valid encoding (unknown variant, bad UTF-8, a
    /// field out of its allowed range, …).
    #[error("malformed value: {0}")]
    Malformed(String),
}

/// The bincode configuration of every message: standard (little-endian,
/// varint), limited to [`MAX_MESSAGE_LEN`].
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_LEN>()
}

fn map_decode_err(e: bincode::error::DecodeError) -> DecodeError {
    use bincode::error::DecodeError as E;
    match e {
        E::UnexpectedEnd { .. } => DecodeError::Truncated,
        E::LimitExceeded => DecodeError::TooLarge,
        E::Io { inner, .. } if inner.kind() == std::io::ErrorKind::UnexpectedEof => {
            DecodeError::Truncated
        }
        other => DecodeError::Malformed(other.to_string()),
    }
}

/// Serialise a serde value with the protocol's bincode configuration.
///
/// # Panics
///
/// Never for protocol types: bincode's serde serialiser only fails on
/// sequences of unknown length or on custom `Serialize` errors, and no
/// protocol type produces either (covered by the round-trip property tests).
pub(crate) fn serde_encode<T: Serialize>(value: &T, buf: &mut impl BufMut) {
    let bytes = match bincode::serde::encode_to_vec(value, config()) {
        Ok(b) => b,
        Err(e) => unreachable!("protocol types always serialise: {e}"),
    };
    buf.put_slice(&bytes);
}

/// Deserialise a serde value from the front of `buf`, bounded by
/// [`MAX_MESSAGE_LEN`], consuming exactly the bytes it used.
pub(crate) fn serde_decode<T: DeserializeOwned>(buf: &mut impl Buf) -> Result<T, DecodeError> {
    if buf.chunk().len() == buf.remaining() {
        // Contiguous: decode in place.
        let (v, used) =
            bincode::serde::decode_from_slice(buf.chunk(), config()).map_err(map_decode_err)?;
        buf.advance(used);
        Ok(v)
    } else {
        let mut reader = buf.reader();
        bincode::serde::decode_from_std_read(&mut reader, config()).map_err(map_decode_err)
    }
}

/// Implements [`Codec`] through serde for the listed types.
macro_rules! serde_codec {
    ($($t:ty),* $(,)?) => {
        $(
            impl $crate::codec::Codec for $t {
                fn encode(&self, buf: &mut impl ::bytes::BufMut) {
                    $crate::codec::serde_encode(self, buf)
                }
                fn decode(buf: &mut impl ::bytes::Buf) -> Result<Self, $crate::codec::DecodeError> {
                    $crate::codec::serde_decode(buf)
                }
            }
        )*
    };
}
pub(crate) use serde_codec;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct T {
        a: u32,
        s: String,
    }
    serde_codec!(T);

    #[test]
    fn roundtrip_and_trailing() {
        let t = T {
            a: 7,
            s: "x".into(),
        };
        let mut bytes = t.to_vec();
        assert_eq!(T::decode_exact(&bytes).unwrap(), t);
        bytes.push(0);
        assert_eq!(T::decode_exact(&bytes), Err(DecodeError::TrailingBytes(1)));
        assert_eq!(
            T::decode_exact(&bytes[..bytes.len() - 2]),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn non_contiguous_buf_decodes() {
        let t = T {
            a: 300,
            s: "hello".into(),
        };
        let bytes = t.to_vec();
        let (a, b) = bytes.split_at(3);
        let mut chain = a.chain(b);
        assert_eq!(T::decode(&mut chain).unwrap(), t);
        assert_eq!(chain.remaining(), 0);
    }

    #[test]
    fn huge_declared_string_is_refused() {
        // varint 0xFD + u64 length: a 2^40-byte string
        let mut bytes = vec![0x07, 0xFD];
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            T::decode_exact(&bytes),
            Err(DecodeError::TooLarge | DecodeError::Truncated)
        ));
    }
}
