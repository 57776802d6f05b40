//! How model and delta values are encoded on the wire.
//!
//! An [`Encoding`] is chosen by the coordinator (it travels in
//! [`TaskOffer`](crate::message::TaskOffer) and
//! [`ModelManifest`](crate::message::ModelManifest)) and repeated in the
//! signed header of every upload. It has four parts:
//!
//! - [`ValueCodec`]: how each f32 becomes bytes (f32, f16, bf16, int8, top-k);
//! - `shuffle`: byte-plane split of each section before compression (like
//!   blosc's shuffle): all first bytes, then all second bytes, …;
//! - `zstd_level`: zstd level of every chunk (1–3 is the useful range);
//! - `chunk_bytes`: how many bytes of f32 *input* make one chunk
//!   (element-aligned; the last chunk may be shorter).
//!
//! # Error bounds of the lossy codecs
//!
//! Let `x` be an input value and `y` the decoded value.
//!
//! | codec | bound |
//! |---|---|
//! | `F32` | exact (`y == x`, bit for bit) |
//! | `F16` | round to nearest even: `|y − x| ≤ 2⁻¹¹·|x|` for `|x| ≥ 2⁻¹⁴`, `≤ 2⁻²⁵` below; `|x| ≥ 65520` is refused |
//! | `Bf16` | round to nearest even: `|y − x| ≤ 2⁻⁸·|x|` (normal range) |
//! | `Int8` | one scale `s = max|x| / 127` per *segment* (a tensor ∩ a chunk); nearest: `|y − x| ≤ s/2`; stochastic: `|y − x| < s` and unbiased |
//! | `TopK` | per chunk, the `k = max(1, ⌈n·ppm/10⁶⌉)` largest-magnitude values are kept exactly, all others become 0 (so `|y − x| ≤` the smallest kept magnitude of that chunk) |
//!
//! Non-finite inputs (NaN, ±∞) are refused by the encoder, and non-finite
//! decoded values are refused by the decoder.

use serde::{Deserialize, Serialize};

/// Smallest chunk size, in bytes of f32 input (4 elements). Real transfers
/// use 1–4 MiB; tiny chunks exist so tests can exercise chunking cheaply.
pub const MIN_CHUNK_BYTES: u32 = 16;
/// Largest chunk size, in bytes of f32 input (4 MiB = 1 Mi elements).
pub const MAX_CHUNK_BYTES: u32 = 4 * 1024 * 1024;
/// Default chunk size: 2 MiB of f32 input (512 Ki elements).
pub const DEFAULT_CHUNK_BYTES: u32 = 2 * 1024 * 1024;
/// Lowest accepted zstd level.
pub const MIN_ZSTD_LEVEL: i32 = 1;
/// Highest accepted zstd level (higher levels cost much and gain nothing on
/// float deltas).
pub const MAX_ZSTD_LEVEL: i32 = 19;
/// Default zstd level.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Largest top-k fraction, in parts per million (50 %): above that, sending
/// indices costs more than sending every value.
pub const MAX_TOPK_PER_MILLION: u32 = 500_000;

/// How each f32 value is represented before compression.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ValueCodec {
    /// IEEE binary32, lossless.
    F32,
    /// IEEE binary16 (round to nearest even).
    F16,
    /// bfloat16 (round to nearest even).
    Bf16,
    /// 8-bit symmetric quantisation with one f32 scale per segment
    /// (tensor ∩ chunk).
    Int8 {
        /// Stochastic rounding (unbiased) instead of round-to-nearest. The
        /// encoder draws from ChaCha8 seeded by the caller's seed and the
        /// chunk index, so encoding stays deterministic.
        stochastic: bool,
    },
    /// Top-k sparsification per chunk: the largest-magnitude values of each
    /// chunk are sent as (index gap, f32 value) pairs.
    TopK {
        /// Fraction kept, in parts per million (10 000 = 1 %), 1 to
        /// [`MAX_TOPK_PER_MILLION`].
        per_million: u32,
    },
}

impl ValueCodec {
    /// Tag byte in chunk records and signed headers.
    pub fn tag(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Bf16 => 2,
            Self::Int8 { .. } => 3,
            Self::TopK { .. } => 4,
        }
    }

    /// Is decoding exact?
    pub fn is_lossless(self) -> bool {
        matches!(self, Self::F32)
    }

    /// Values kept by top-k in a chunk of `n` elements (`n` for other codecs).
    pub fn kept(self, n: u64) -> u64 {
        match self {
            Self::TopK { per_million } => {
                if n == 0 {
                    0
                } else {
                    let k = (n.saturating_mul(u64::from(per_million))).div_ceil(1_000_000);
                    k.clamp(1, n)
                }
            }
            _ => n,
        }
    }

    /// Short human name, e.g. `int8-stochastic`, `topk-1%`.
    pub fn name(self) -> String {
        match self {
            Self::F32 => "f32".into(),
            Self::F16 => "f16".into(),
            Self::Bf16 => "bf16".into(),
            Self::Int8 { stochastic: false } => "int8".into(),
            Self::Int8 { stochastic: true } => "int8-stochastic".into(),
            Self::TopK { per_million } => {
                format!("topk-{}%", f64::from(per_million) / 10_000.0)
            }
        }
    }
}

/// Why an encoding was refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodingError {
    /// `chunk_bytes` out of range or not a multiple of 4.
    #[error(
        "chunk size {0} bytes is invalid: must be a multiple of 4 in {MIN_CHUNK_BYTES}..={MAX_CHUNK_BYTES}"
    )]
    ChunkSize(u32),
    /// zstd level out of range.
    #[error("zstd level {0} is outside {MIN_ZSTD_LEVEL}..={MAX_ZSTD_LEVEL}")]
    ZstdLevel(i32),
    /// Top-k fraction out of range.
    #[error("top-k fraction {0} ppm is outside 1..={MAX_TOPK_PER_MILLION}")]
    TopKFraction(u32),
}

/// A complete wire encoding: value codec, shuffle, zstd level, chunk size.
/// Always valid (checked on construction and on deserialisation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawEncoding")]
pub struct Encoding {
    values: ValueCodec,
    shuffle: bool,
    zstd_level: i32,
    chunk_bytes: u32,
}

#[derive(Deserialize)]
struct RawEncoding {
    values: ValueCodec,
    shuffle: bool,
    zstd_level: i32,
    chunk_bytes: u32,
}

impl TryFrom<RawEncoding> for Encoding {
    type Error = EncodingError;
    fn try_from(r: RawEncoding) -> Result<Self, EncodingError> {
        Self::new(r.values, r.shuffle, r.zstd_level, r.chunk_bytes)
    }
}

impl Default for Encoding {
    /// Lossless f32, shuffled, zstd 1, 2 MiB chunks.
    fn default() -> Self {
        Self {
            values: ValueCodec::F32,
            shuffle: true,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
        }
    }
}

impl Encoding {
    /// Validate and build.
    pub fn new(
        values: ValueCodec,
        shuffle: bool,
        zstd_level: i32,
        chunk_bytes: u32,
    ) -> Result<Self, EncodingError> {
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_bytes)
            || !chunk_bytes.is_multiple_of(4)
        {
            return Err(EncodingError::ChunkSize(chunk_bytes));
        }
        if !(MIN_ZSTD_LEVEL..=MAX_ZSTD_LEVEL).contains(&zstd_level) {
            return Err(EncodingError::ZstdLevel(zstd_level));
        }
        if let ValueCodec::TopK { per_million } = values
            && !(1..=MAX_TOPK_PER_MILLION).contains(&per_million)
        {
            return Err(EncodingError::TopKFraction(per_million));
        }
        Ok(Self {
            values,
            shuffle,
            zstd_level,
            chunk_bytes,
        })
    }

    /// `values` with the defaults for the rest (shuffle on, zstd level
    /// [`DEFAULT_ZSTD_LEVEL`], [`DEFAULT_CHUNK_BYTES`] chunks).
    pub fn with_codec(values: ValueCodec) -> Result<Self, EncodingError> {
        Self::new(values, true, DEFAULT_ZSTD_LEVEL, DEFAULT_CHUNK_BYTES)
    }

    /// Same encoding with another shuffle setting.
    #[must_use]
    pub fn shuffled(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// Same encoding with another zstd level.
    pub fn with_zstd_level(self, level: i32) -> Result<Self, EncodingError> {
        Self::new(self.values, self.shuffle, level, self.chunk_bytes)
    }

    /// Same encoding with another chunk size.
    pub fn with_chunk_bytes(self, chunk_bytes: u32) -> Result<Self, EncodingError> {
        Self::new(self.values, self.shuffle, self.zstd_level, chunk_bytes)
    }

    /// The value codec.
    pub fn values(&self) -> ValueCodec {
        self.values
    }

    /// Whether sections are byte-shuffled before compression.
    pub fn shuffle(&self) -> bool {
        self.shuffle
    }

    /// zstd level.
    pub fn zstd_level(&self) -> i32 {
        self.zstd_level
    }

    /// Chunk size in bytes of f32 input.
    pub fn chunk_bytes(&self) -> u32 {
        self.chunk_bytes
    }

    /// Chunk size in elements.
    pub fn chunk_elems(&self) -> u64 {
        u64::from(self.chunk_bytes / 4)
    }

    /// Short human name, e.g. `f16+shuffle/zstd1`.
    pub fn name(&self) -> String {
        format!(
            "{}{}/zstd{}",
            self.values.name(),
            if self.shuffle { "+shuffle" } else { "" },
            self.zstd_level
        )
    }

    /// Canonical bytes (part of the signed update header): `u8` codec tag,
    /// codec parameter (`u8` stochastic for int8, `u32` ppm for top-k,
    /// nothing otherwise), `u8` shuffle, `i32` zstd level, `u32` chunk bytes;
    /// little-endian.
    pub fn canonical_bytes(&self, out: &mut Vec<u8>) {
        out.push(self.values.tag());
        match self.values {
            ValueCodec::Int8 { stochastic } => out.push(u8::from(stochastic)),
            ValueCodec::TopK { per_million } => out.extend_from_slice(&per_million.to_le_bytes()),
            ValueCodec::F32 | ValueCodec::F16 | ValueCodec::Bf16 => {}
        }
        out.push(u8::from(self.shuffle));
        out.extend_from_slice(&self.zstd_level.to_le_bytes());
        out.extend_from_slice(&self.chunk_bytes.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(Encoding::with_codec(ValueCodec::F16).is_ok());
        assert_eq!(
            Encoding::new(ValueCodec::F32, false, 0, 1024),
            Err(EncodingError::ZstdLevel(0))
        );
        assert_eq!(
            Encoding::new(ValueCodec::F32, false, 1, 1022),
            Err(EncodingError::ChunkSize(1022))
        );
        assert_eq!(
            Encoding::new(ValueCodec::F32, false, 1, MAX_CHUNK_BYTES + 4),
            Err(EncodingError::ChunkSize(MAX_CHUNK_BYTES + 4))
        );
        assert_eq!(
            Encoding::with_codec(ValueCodec::TopK { per_million: 0 }),
            Err(EncodingError::TopKFraction(0))
        );
        // deserialisation validates too
        let bad = RawEncodingJson {
            values: ValueCodec::F32,
            shuffle: false,
            zstd_level: 99,
            chunk_bytes: 1024,
        };
        let json = serde_json::to_string(&bad).unwrap();
        assert!(serde_json::from_str::<Encoding>(&json).is_err());
    }

    #[derive(Serialize)]
    struct RawEncodingJson {
        values: ValueCodec,
        shuffle: bool,
        zstd_level: i32,
        chunk_bytes: u32,
    }

    #[test]
    fn topk_kept() {
        let c = ValueCodec::TopK {
            per_million: 10_000,
        };
        assert_eq!(c.kept(0), 0);
        assert_eq!(c.kept(1), 1);
        assert_eq!(c.kept(100), 1);
        assert_eq!(c.kept(101), 2);
        assert_eq!(c.kept(1 << 20), 10_486);
        assert_eq!(ValueCodec::F16.kept(7), 7);
        assert_eq!(c.name(), "topk-1%");
    }
}
