//! Streaming payload format for models and deltas.
//!
//! A model or delta (flat f32 values in the canonical order of a
//! [`ModelSpec`]) is cut into chunks of [`Encoding::chunk_elems`] elements
//! (the last one may be shorter). Each chunk is encoded with the
//! [`ValueCodec`], optionally byte-shuffled, and zstd-compressed **on its
//! own**, so neither side ever holds more than one encoded and one decoded
//! chunk. A payload is the concatenation of its chunk records; on a QUIC
//! stream each record travels in one [`FrameKind::Chunk`](crate::FrameKind)
//! frame, in a spool file they are simply written back to back.
//!
//! # Chunk record
//!
//! ```text
//! offset size field
//! 0      1    magic 0xFC
//! 1      1    codec tag (0 f32, 1 f16, 2 bf16, 3 int8, 4 top-k)
//! 2      1    flags: bit 0 = shuffled; other bits must be 0
//! 3      1    reserved, must be 0
//! 4      8    element offset of the chunk in the model, u64 LE
//! 12     4    element count n, u32 LE
//! 16     4    raw (decompressed) body length, u32 LE
//! 20     4    compressed body length c, u32 LE
//! 24     c    zstd frame(s) of the body
//! ```
//!
//! Before allocating anything the decoder checks the header against the
//! encoding, the spec and its position: the offset must be the next
//! expected element, `n` must be the expected chunk length, the raw length
//! must be exactly what the codec produces for `n` values (and the chunk's
//! segment count), and `c` at most zstd's bound for that raw length.
//! Decompression writes into a buffer of exactly the declared raw length and
//! fails if the data would exceed it.
//!
//! # Body layout per codec (before shuffle and compression)
//!
//! Sections are byte-shuffled independently with their element size.
//!
//! | codec | sections |
//! |---|---|
//! | f32 | `n` × f32 LE |
//! | f16, bf16 | `n` × u16 LE (bit pattern) |
//! | int8 | `S` × f32 LE scales (one per segment = tensor ∩ chunk, in order), then `n` × i8 |
//! | top-k | `k` × u32 LE index gaps (first = index of the first kept value in the chunk, then differences ≥ 1), then `k` × f32 LE values |
//!
//! with `k = max(1, ⌈n·ppm/10⁶⌉)` (see [`ValueCodec::kept`]).
//!
//! Encoding is deterministic: the same values, encoding and seed always
//! give the same bytes (stochastic rounding draws from ChaCha8 seeded by
//! `seed`, stream = chunk index). A site can therefore hash the payload in a
//! first pass, sign, and re-encode while sending.

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::encoding::{Encoding, EncodingError, MAX_CHUNK_BYTES, ValueCodec};
use crate::model::{FlatModel, ModelError, ModelHash, ModelHasher, ModelSpec};

/// First byte of every chunk record.
pub const CHUNK_MAGIC: u8 = 0xFC;
/// Length of a chunk record header.
pub const CHUNK_HEADER_LEN: usize = 24;
/// Most elements in one chunk.
pub const MAX_CHUNK_ELEMS: usize = MAX_CHUNK_BYTES as usize / 4;
/// Largest raw (decompressed) chunk body: int8 with one segment per element
/// (4-byte scale + 1 byte each).
pub const MAX_CHUNK_RAW_LEN: usize = 5 * MAX_CHUNK_ELEMS;
/// Largest chunk record: header + zstd's worst case for the largest body.
/// Fits in one frame (`MAX_CHUNK_RECORD_LEN <= MAX_FRAME_LEN`).
pub const MAX_CHUNK_RECORD_LEN: usize = CHUNK_HEADER_LEN + zstd_bound(MAX_CHUNK_RAW_LEN);

const _: () = assert!(MAX_CHUNK_RECORD_LEN <= crate::frame::MAX_FRAME_LEN);

/// zstd's worst-case compressed size (`ZSTD_COMPRESSBOUND`).
pub const fn zstd_bound(n: usize) -> usize {
    let small = if n < (128 << 10) {
        ((128 << 10) - n) >> 11
    } else {
        0
    };
    n + (n >> 8) + small
}

/// blake3 hash of a payload's bytes (the concatenated chunk records).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PayloadHash(pub [u8; 32]);

impl PayloadHash {
    /// Hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl std::fmt::Debug for PayloadHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PayloadHash({})", self.to_hex())
    }
}

impl std::fmt::Display for PayloadHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Why values could not be encoded.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoding is invalid.
    #[error(transparent)]
    Encoding(#[from] EncodingError),
    /// `encode_chunk` got the wrong number of values.
    #[error("chunk at element {offset} needs {expected} values, got {actual}")]
    WrongChunkLength {
        /// Element offset of the chunk.
        offset: u64,
        /// Values the chunk needs.
        expected: u64,
        /// Values given.
        actual: u64,
    },
    /// More values were given than the spec holds.
    #[error("all {0} values were already encoded")]
    AlreadyComplete(u64),
    /// `finish` before every value was given.
    #[error("only {encoded} of {expected} values were encoded")]
    Incomplete {
        /// Values encoded.
        encoded: u64,
        /// Values the spec holds.
        expected: u64,
    },
    /// A NaN or infinite value.
    #[error("value at element {0} is not finite")]
    NonFinite(u64),
    /// A value the codec cannot represent (e.g. `|x| ≥ 65520` in f16).
    #[error("value at element {index} is out of range for {codec}")]
    OutOfRange {
        /// Element index.
        index: u64,
        /// Codec name.
        codec: &'static str,
    },
    /// zstd failed (local resource problem).
    #[error("zstd compression failed: {0}")]
    Compress(String),
}

/// Why a payload chunk record was refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The encoding is invalid.
    #[error(transparent)]
    Encoding(#[from] EncodingError),
    /// Fewer bytes than a record header.
    #[error("chunk record of {0} bytes is shorter than its {CHUNK_HEADER_LEN}-byte header")]
    Truncated(usize),
    /// First byte is not [`CHUNK_MAGIC`].
    #[error("bad chunk magic {0:#04x}")]
    BadMagic(u8),
    /// Unknown flag bits or non-zero reserved byte.
    #[error("chunk header has unknown flags {flags:#04x} / reserved byte {reserved:#04x}")]
    BadFlags {
        /// Flags byte.
        flags: u8,
        /// Reserved byte.
        reserved: u8,
    },
    /// Codec tag differs from the agreed encoding.
    #[error("chunk uses codec tag {found}, the payload's encoding says {expected}")]
    CodecMismatch {
        /// Tag of the agreed encoding.
        expected: u8,
        /// Tag in the record.
        found: u8,
    },
    /// Shuffle flag differs from the agreed encoding.
    #[error("chunk shuffle flag is {found}, the payload's encoding says {expected}")]
    ShuffleMismatch {
        /// Agreed.
        expected: bool,
        /// In the record.
        found: bool,
    },
    /// A chunk arrived after the last expected one.
    #[error("extra chunk: all {0} values were already received")]
    AlreadyComplete(u64),
    /// Chunks must arrive in order, without gaps or overlap.
    #[error("chunk starts at element {found}, expected {expected}")]
    UnexpectedOffset {
        /// Next expected element.
        expected: u64,
        /// Declared offset.
        found: u64,
    },
    /// The element count is not the expected chunk length.
    #[error("chunk declares {found} elements, expected {expected}")]
    UnexpectedCount {
        /// Expected chunk length.
        expected: u64,
        /// Declared.
        found: u64,
    },
    /// The raw body length is not what the codec produces for this chunk.
    #[error("chunk declares a raw body of {found} bytes, the codec produces {expected}")]
    RawLenMismatch {
        /// What the codec produces.
        expected: u64,
        /// Declared.
        found: u64,
    },
    /// Compressed length above zstd's bound for the raw length.
    #[error("chunk declares {compressed} compressed bytes for a {raw}-byte body (bound {bound})")]
    CompressedTooLarge {
        /// Declared compressed length.
        compressed: u64,
        /// Declared raw length.
        raw: u64,
        /// zstd's bound for `raw`.
        bound: u64,
    },
    /// The record length does not match its header.
    #[error("chunk record is {actual} bytes, its header declares {declared}")]
    RecordLength {
        /// Header + declared compressed length.
        declared: u64,
        /// Bytes given.
        actual: u64,
    },
    /// zstd refused the body (corrupt, or larger than declared).
    #[error("chunk body does not decompress within {raw} bytes: {reason}")]
    Decompress {
        /// Declared raw length.
        raw: u64,
        /// zstd's message.
        reason: String,
    },
    /// The body decompressed to fewer bytes than declared.
    #[error("chunk body decompressed to {actual} bytes, declared {declared}")]
    DecompressedSize {
        /// Declared raw length.
        declared: u64,
        /// Produced.
        actual: u64,
    },
    /// A top-k index is out of the chunk or not strictly increasing.
    #[error("top-k index invalid at position {0} of the chunk's index list")]
    BadIndex(u64),
    /// An int8 scale is negative or not finite.
    #[error("int8 scale of segment {0} is negative or not finite")]
    BadScale(u64),
    /// A decoded value is NaN or infinite.
    #[error("decoded value at element {0} is not finite")]
    NonFinite(u64),
    /// `finish` before every chunk arrived.
    #[error("payload incomplete: {received} of {expected} values received")]
    Incomplete {
        /// Values received.
        received: u64,
        /// Values expected.
        expected: u64,
    },
    /// The decoded values do not fit the spec (internal consistency).
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A parsed chunk record header (structurally valid; not yet checked
/// against a payload's position, see [`PayloadDecoder::check_header`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Codec tag ([`ValueCodec::tag`]).
    pub codec_tag: u8,
    /// Sections are byte-shuffled.
    pub shuffle: bool,
    /// Element offset of the chunk in the model.
    pub offset: u64,
    /// Elements in the chunk.
    pub count: u32,
    /// Decompressed body length.
    pub raw_len: u32,
    /// Compressed body length (what follows the header).
    pub compressed_len: u32,
}

impl ChunkHeader {
    /// Parse the fixed header; checks magic, flags and the absolute limits
    /// ([`MAX_CHUNK_ELEMS`], [`MAX_CHUNK_RAW_LEN`], zstd's bound).
    pub fn parse(b: &[u8; CHUNK_HEADER_LEN]) -> Result<Self, PayloadError> {
        if b[0] != CHUNK_MAGIC {
            return Err(PayloadError::BadMagic(b[0]));
        }
        if b[2] & !1 != 0 || b[3] != 0 {
            return Err(PayloadError::BadFlags {
                flags: b[2],
                reserved: b[3],
            });
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&b[4..12]);
        let h = Self {
            codec_tag: b[1],
            shuffle: b[2] & 1 == 1,
            offset: u64::from_le_bytes(off),
            count: u32_at(12),
            raw_len: u32_at(16),
            compressed_len: u32_at(20),
        };
        if h.count as usize > MAX_CHUNK_ELEMS {
            return Err(PayloadError::UnexpectedCount {
                expected: MAX_CHUNK_ELEMS as u64,
                found: u64::from(h.count),
            });
        }
        if h.raw_len as usize > MAX_CHUNK_RAW_LEN {
            return Err(PayloadError::RawLenMismatch {
                expected: MAX_CHUNK_RAW_LEN as u64,
                found: u64::from(h.raw_len),
            });
        }
        let bound = zstd_bound(h.raw_len as usize);
        if h.compressed_len as usize > bound {
            return Err(PayloadError::CompressedTooLarge {
                compressed: u64::from(h.compressed_len),
                raw: u64::from(h.raw_len),
                bound: bound as u64,
            });
        }
        Ok(h)
    }

    /// The 24 header bytes.
    pub fn to_bytes(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[0] = CHUNK_MAGIC;
        b[1] = self.codec_tag;
        b[2] = u8::from(self.shuffle);
        b[4..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.count.to_le_bytes());
        b[16..20].copy_from_slice(&self.raw_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.compressed_len.to_le_bytes());
        b
    }

    /// Total record length: header + compressed body.
    pub fn record_len(&self) -> usize {
        CHUNK_HEADER_LEN + self.compressed_len as usize
    }
}

/// Raw body length the codec produces for `n` values in `segments` segments.
fn raw_len(codec: ValueCodec, n: u64, segments: u64) -> u64 {
    match codec {
        ValueCodec::F32 => 4 * n,
        ValueCodec::F16 | ValueCodec::Bf16 => 2 * n,
        ValueCodec::Int8 { .. } => 4 * segments + n,
        ValueCodec::TopK { .. } => 8 * codec.kept(n),
    }
}

/// Element size of each body section, for shuffling.
fn sections(codec: ValueCodec, n: usize, segments: usize) -> [(usize, usize); 2] {
    // (type size, byte length); a zero-length section is a no-op.
    match codec {
        ValueCodec::F32 => [(4, 4 * n), (1, 0)],
        ValueCodec::F16 | ValueCodec::Bf16 => [(2, 2 * n), (1, 0)],
        ValueCodec::Int8 { .. } => [(4, 4 * segments), (1, n)],
        ValueCodec::TopK { .. } => {
            let k = codec.kept(n as u64) as usize;
            [(4, 4 * k), (4, 4 * k)]
        }
    }
}

/// Byte-plane split of `src` (elements of `ts` bytes) into `dst`, of the
/// same length (a remainder shorter than an element is written as zeros;
/// the bodies shuffled here have none).
///
/// Element size 4 (f32 values, int8 scales, top-k indices) takes a
/// blocked path the compiler vectorises (≈ 2.5× the byte-plane loop's
/// speed); the output is the same as [`shuffle_any`]'s. (The 2-byte
/// codecs split their half-words into planes as they convert them:
/// [`encode_halves`].)
fn shuffle_into(src: &[u8], ts: usize, dst: &mut [u8]) {
    match ts {
        0 | 1 => dst.copy_from_slice(src),
        4 => shuffle4(src, dst),
        _ => shuffle_any(src, ts, dst),
    }
}

/// [`shuffle_into`] for any element size, one byte plane at a time.
fn shuffle_any(src: &[u8], ts: usize, dst: &mut [u8]) {
    let n = src.len() / ts;
    for p in 0..ts {
        for (o, el) in dst[p * n..(p + 1) * n].iter_mut().zip(src.chunks_exact(ts)) {
            *o = el[p];
        }
    }
    dst[n * ts..].fill(0);
}

/// Elements handled per block by the vectorised (un)shuffles.
const SHUFFLE_BLOCK: usize = 32;

/// [`shuffle_into`] for 4-byte elements: each block of elements is read
/// as little-endian words, then split into the four planes.
fn shuffle4(src: &[u8], dst: &mut [u8]) {
    let n = src.len() / 4;
    let (els, _) = src.as_chunks::<4>();
    let (p0, rest) = dst.split_at_mut(n);
    let (p1, rest) = rest.split_at_mut(n);
    let (p2, rest) = rest.split_at_mut(n);
    let (p3, tail) = rest.split_at_mut(n);
    tail.fill(0);
    let (eb, et) = els.as_chunks::<SHUFFLE_BLOCK>();
    let (b0, t0) = p0.as_chunks_mut::<SHUFFLE_BLOCK>();
    let (b1, t1) = p1.as_chunks_mut::<SHUFFLE_BLOCK>();
    let (b2, t2) = p2.as_chunks_mut::<SHUFFLE_BLOCK>();
    let (b3, t3) = p3.as_chunks_mut::<SHUFFLE_BLOCK>();
    for ((((e, x0), x1), x2), x3) in eb.iter().zip(b0).zip(b1).zip(b2).zip(b3) {
        let mut w = [0u32; SHUFFLE_BLOCK];
        for (w, e) in w.iter_mut().zip(e) {
            *w = u32::from_le_bytes(*e);
        }
        for (j, w) in w.iter().enumerate() {
            x0[j] = *w as u8;
            x1[j] = (*w >> 8) as u8;
            x2[j] = (*w >> 16) as u8;
            x3[j] = (*w >> 24) as u8;
        }
    }
    for ((((e, x0), x1), x2), x3) in et.iter().zip(t0).zip(t1).zip(t2).zip(t3) {
        [*x0, *x1, *x2, *x3] = *e;
    }
}

/// Inverse of [`shuffle_into`]. Element size 4 takes a path the compiler
/// vectorises (≈ 2.3× the byte-plane loop's speed); the output is the
/// same as [`unshuffle_any`]'s. (The 2-byte codecs join their planes as
/// they widen them: [`decode_halves`].)
fn unshuffle_into(src: &[u8], ts: usize, dst: &mut [u8]) {
    match ts {
        0 | 1 => dst.copy_from_slice(src),
        4 => unshuffle4(src, dst),
        _ => unshuffle_any(src, ts, dst),
    }
}

/// [`unshuffle_into`] for any element size, one byte plane at a time.
fn unshuffle_any(src: &[u8], ts: usize, dst: &mut [u8]) {
    let n = src.len() / ts;
    for p in 0..ts {
        for (el, &b) in dst.chunks_exact_mut(ts).zip(&src[p * n..(p + 1) * n]) {
            el[p] = b;
        }
    }
    dst[n * ts..].fill(0);
}

/// [`unshuffle_into`] for 4-byte elements: each block of the four planes
/// is assembled into little-endian words, then written out.
fn unshuffle4(src: &[u8], dst: &mut [u8]) {
    let n = src.len() / 4;
    let (els, tail) = dst.as_chunks_mut::<4>();
    tail.fill(0);
    let (p0, rest) = src.split_at(n);
    let (p1, rest) = rest.split_at(n);
    let (p2, rest) = rest.split_at(n);
    let p3 = &rest[..n];
    let (eb, et) = els.as_chunks_mut::<SHUFFLE_BLOCK>();
    let (b0, t0) = p0.as_chunks::<SHUFFLE_BLOCK>();
    let (b1, t1) = p1.as_chunks::<SHUFFLE_BLOCK>();
    let (b2, t2) = p2.as_chunks::<SHUFFLE_BLOCK>();
    let (b3, t3) = p3.as_chunks::<SHUFFLE_BLOCK>();
    for ((((e, x0), x1), x2), x3) in eb.iter_mut().zip(b0).zip(b1).zip(b2).zip(b3) {
        let mut w = [0u32; SHUFFLE_BLOCK];
        for (j, w) in w.iter_mut().enumerate() {
            *w = u32::from(x0[j])
                | u32::from(x1[j]) << 8
                | u32::from(x2[j]) << 16
                | u32::from(x3[j]) << 24;
        }
        for (e, w) in e.iter_mut().zip(w) {
            *e = w.to_le_bytes();
        }
    }
    for ((((e, &x0), &x1), &x2), &x3) in et.iter_mut().zip(t0).zip(t1).zip(t2).zip(t3) {
        *e = [x0, x1, x2, x3];
    }
}

/// Apply (or undo) the shuffle to every section of a body, into `out`
/// (its allocation reused). `out` is resized, not cleared: from one chunk
/// to the next of the same size nothing is written twice.
fn reshuffle_into(body: &[u8], secs: [(usize, usize); 2], forward: bool, out: &mut Vec<u8>) {
    let total: usize = secs.iter().map(|&(_, len)| len).sum();
    out.resize(total, 0);
    let mut pos = 0;
    for (ts, len) in secs {
        let (s, d) = (&body[pos..pos + len], &mut out[pos..pos + len]);
        if forward {
            shuffle_into(s, ts, d);
        } else {
            unshuffle_into(s, ts, d);
        }
        pos += len;
    }
}

fn push_f32s(out: &mut Vec<u8>, values: &[f32]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fn read_f32s(raw: &[u8]) -> impl Iterator<Item = f32> + '_ {
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Values per block of the 2-byte codecs' one-pass paths ([`encode_halves`],
/// [`decode_halves`]): a block's half-words stay on the stack (2 KiB)
/// between the conversion and the byte split.
const HALF_BLOCK: usize = 1024;

/// Encode `values` (one chunk from element `offset`) with a 2-byte codec
/// (f16 or bf16) straight into `body` (exactly `2 × values.len()` bytes):
/// byte planes when `shuffle` (every value's low byte, then every high
/// byte: what [`shuffle_into`] makes of the little-endian half-words),
/// little-endian half-words otherwise. One pass over the values, block by
/// block, instead of converting the chunk into a scratch, copying it into
/// the plain body and shuffling that into a third buffer: the same bytes,
/// two passes over them and two chunk-sized buffers fewer (the encoder of
/// every f16 upload and of every f16 downlink update).
fn encode_halves(
    codec: ValueCodec,
    values: &[f32],
    offset: u64,
    shuffle: bool,
    body: &mut [u8],
) -> Result<(), EncodeError> {
    let n = values.len();
    debug_assert_eq!(body.len(), 2 * n);
    let mut block = [0u16; HALF_BLOCK];
    let blocks = values.chunks(HALF_BLOCK).enumerate();
    if shuffle {
        let (lo, hi) = body.split_at_mut(n);
        for (((b, vals), lo), hi) in blocks
            .zip(lo.chunks_mut(HALF_BLOCK))
            .zip(hi.chunks_mut(HALF_BLOCK))
        {
            let bits = to_halves(codec, vals, offset, b, &mut block)?;
            for ((l, h), w) in lo.iter_mut().zip(hi.iter_mut()).zip(bits) {
                [*l, *h] = w.to_le_bytes();
            }
        }
    } else {
        for ((b, vals), out) in blocks.zip(body.chunks_mut(2 * HALF_BLOCK)) {
            let bits = to_halves(codec, vals, offset, b, &mut block)?;
            for (p, w) in out.as_chunks_mut::<2>().0.iter_mut().zip(bits) {
                *p = w.to_le_bytes();
            }
        }
    }
    Ok(())
}

/// Block `b` of a chunk from element `offset` (`vals`, at most
/// [`HALF_BLOCK`] values) as f16 or bf16 bit patterns, in `block`.
fn to_halves<'b>(
    codec: ValueCodec,
    vals: &[f32],
    offset: u64,
    b: usize,
    block: &'b mut [u16; HALF_BLOCK],
) -> Result<&'b [u16], EncodeError> {
    let bits = &mut block[..vals.len()];
    let too_large = if codec == ValueCodec::Bf16 {
        // Round to nearest even on the bit pattern (inputs are finite, so
        // no NaN case); what `half::bf16::from_f32` does, but vectorisable.
        for (h, v) in bits.iter_mut().zip(vals) {
            let b = v.to_bits();
            *h = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
        }
        bits.iter().position(|b| b & 0x7FFF == 0x7F80)
    } else {
        let halves: &mut [f16] = bytemuck::cast_slice_mut(bits);
        halves.convert_from_f32_slice(vals);
        halves.iter().position(|v| v.is_infinite())
    };
    match too_large {
        Some(i) => Err(EncodeError::OutOfRange {
            index: offset + (b * HALF_BLOCK + i) as u64,
            codec: if codec == ValueCodec::Bf16 {
                "bf16"
            } else {
                "f16"
            },
        }),
        None => Ok(bits),
    }
}

/// The inverse of [`encode_halves`]: the 2-byte codec's `body` (byte
/// planes when `shuffle`, little-endian half-words otherwise) widened
/// straight into `values` (`body.len() / 2` of them), block by block.
/// Exact: every f16 and bf16 value is an f32.
fn decode_halves(codec: ValueCodec, body: &[u8], shuffle: bool, values: &mut [f32]) {
    let n = body.len() / 2;
    let mut block = [0u16; HALF_BLOCK];
    let blocks = values.chunks_mut(HALF_BLOCK);
    if shuffle {
        let (lo, hi) = body.split_at(n);
        for ((out, lo), hi) in blocks.zip(lo.chunks(HALF_BLOCK)).zip(hi.chunks(HALF_BLOCK)) {
            let bits = &mut block[..out.len()];
            for ((w, &l), &h) in bits.iter_mut().zip(lo).zip(hi) {
                *w = u16::from_le_bytes([l, h]);
            }
            widen(codec, bits, out);
        }
    } else {
        for (out, pairs) in blocks.zip(body.chunks(2 * HALF_BLOCK)) {
            let bits = &mut block[..out.len()];
            for (w, p) in bits.iter_mut().zip(pairs.as_chunks::<2>().0) {
                *w = u16::from_le_bytes(*p);
            }
            widen(codec, bits, out);
        }
    }
}

/// f16 or bf16 bit patterns to f32 (exact).
fn widen(codec: ValueCodec, bits: &[u16], out: &mut [f32]) {
    if codec == ValueCodec::Bf16 {
        for (v, h) in out.iter_mut().zip(bits) {
            *v = f32::from_bits(u32::from(*h) << 16);
        }
    } else {
        let halves: &[f16] = bytemuck::cast_slice(bits);
        halves.convert_to_f32_slice(out);
    }
}

/// Encode `values` (one chunk starting at element `offset`, with segment
/// lengths `segs`) into the plain (unshuffled, uncompressed) body.
fn encode_body(
    codec: ValueCodec,
    values: &[f32],
    offset: u64,
    segs: &[usize],
    rng: Option<&mut ChaCha8Rng>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    match codec {
        ValueCodec::F32 => push_f32s(out, values),
        ValueCodec::F16 | ValueCodec::Bf16 => {
            let start = out.len();
            out.resize(start + 2 * values.len(), 0);
            encode_halves(codec, values, offset, false, &mut out[start..])?;
        }
        ValueCodec::Int8 { stochastic } => {
            let mut scales = Vec::with_capacity(segs.len());
            let mut pos = 0;
            for &len in segs {
                let seg = &values[pos..pos + len];
                let max = seg.iter().fold(0f32, |m, v| m.max(v.abs()));
                scales.push(max / 127.0);
                pos += len;
            }
            push_f32s(out, &scales);
            out.reserve(values.len());
            let mut pos = 0;
            let mut rng = rng;
            for (&len, &scale) in segs.iter().zip(&scales) {
                let seg = &values[pos..pos + len];
                pos += len;
                if scale == 0.0 {
                    out.extend(std::iter::repeat_n(0u8, len));
                    continue;
                }
                match (stochastic, rng.as_deref_mut()) {
                    (true, Some(rng)) => {
                        for &v in seg {
                            let u: f32 = rng.r#gen();
                            let q = (v / scale + u).floor().clamp(-127.0, 127.0);
                            out.push(q as i8 as u8);
                        }
                    }
                    _ => {
                        for &v in seg {
                            let q = (v / scale).round().clamp(-127.0, 127.0);
                            out.push(q as i8 as u8);
                        }
                    }
                }
            }
        }
        ValueCodec::TopK { .. } => {
            let n = values.len();
            let k = codec.kept(n as u64) as usize;
            let mut idx: Vec<u32> = (0..n as u32).collect();
            if k < n {
                idx.select_nth_unstable_by(k - 1, |&a, &b| {
                    let (va, vb) = (values[a as usize].abs(), values[b as usize].abs());
                    vb.total_cmp(&va).then(a.cmp(&b))
                });
                idx.truncate(k);
            }
            idx.sort_unstable();
            let mut prev = 0u32;
            for (i, &ix) in idx.iter().enumerate() {
                let gap = if i == 0 { ix } else { ix - prev };
                out.extend_from_slice(&gap.to_le_bytes());
                prev = ix;
            }
            for &ix in &idx {
                out.extend_from_slice(&values[ix as usize].to_le_bytes());
            }
        }
    }
    Ok(())
}

/// Decode a plain body of `n` values starting at element `offset` into
/// `values` (cleared first; its allocation is reused).
fn decode_body_into(
    codec: ValueCodec,
    body: &[u8],
    n: usize,
    offset: u64,
    segs: &[usize],
    values: &mut Vec<f32>,
) -> Result<f32, PayloadError> {
    match codec {
        ValueCodec::F32 => {
            values.clear();
            values.extend(read_f32s(body));
        }
        ValueCodec::F16 | ValueCodec::Bf16 => {
            // Resized, not cleared: the conversion overwrites every value,
            // so the previous chunk's need not be zeroed first.
            values.resize(body.len() / 2, 0.0);
            decode_halves(codec, body, false, values);
        }
        ValueCodec::Int8 { .. } => {
            values.clear();
            let (sb, qb) = body.split_at(4 * segs.len());
            let out = values;
            out.reserve(n);
            let mut pos = 0;
            for (si, (scale, &len)) in read_f32s(sb).zip(segs).enumerate() {
                if !scale.is_finite() || scale < 0.0 {
                    return Err(PayloadError::BadScale(si as u64));
                }
                out.extend(
                    qb[pos..pos + len]
                        .iter()
                        .map(|&q| f32::from(q as i8) * scale),
                );
                pos += len;
            }
            return finish_decoded(out, n, offset);
        }
        ValueCodec::TopK { .. } => {
            values.clear();
            let k = codec.kept(n as u64) as usize;
            let (gb, vb) = body.split_at(4 * k);
            let out = values;
            out.resize(n, 0.0);
            let mut pos: u64 = 0;
            for (i, (gap, v)) in gb
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .zip(read_f32s(vb))
                .enumerate()
            {
                if i > 0 && gap == 0 {
                    return Err(PayloadError::BadIndex(i as u64));
                }
                pos = if i == 0 {
                    u64::from(gap)
                } else {
                    pos + u64::from(gap)
                };
                match out.get_mut(pos as usize) {
                    Some(slot) if pos < n as u64 => *slot = v,
                    _ => return Err(PayloadError::BadIndex(i as u64)),
                }
            }
            return finish_decoded(out, n, offset);
        }
    }
    finish_decoded(values, n, offset)
}

/// The checks every decoded body passes: `n` values, all finite. Returns
/// their largest `|x|`, which the same pass finds (see [`CheckedChunk`]).
fn finish_decoded(values: &[f32], n: usize, offset: u64) -> Result<f32, PayloadError> {
    if values.len() != n {
        return Err(PayloadError::DecompressedSize {
            declared: n as u64,
            actual: values.len() as u64,
        });
    }
    match crate::model::max_abs(values) {
        Some(max) => Ok(max),
        None => {
            let i = values.iter().position(|v| !v.is_finite()).unwrap_or(0);
            Err(PayloadError::NonFinite(offset + i as u64))
        }
    }
}

fn segment_lens(spec: &ModelSpec, range: &Range<u64>) -> Vec<usize> {
    spec.segments(range.start, range.end)
        .map(|(_, r)| (r.end - r.start) as usize)
        .collect()
}

fn next_range(spec: &ModelSpec, encoding: &Encoding, next: u64) -> Option<Range<u64>> {
    let total = spec.num_params();
    (next < total).then(|| next..(next + encoding.chunk_elems()).min(total))
}

/// What an encoder produced, for the signed header and the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadSummary {
    /// Total bytes of all chunk records.
    pub payload_len: u64,
    /// blake3 of all chunk records, in order.
    pub payload_hash: PayloadHash,
    /// Number of chunk records.
    pub num_chunks: u64,
}

/// Chunks of at least this many values (512 KiB of f32 input: a
/// coordinator job's default chunk; the protocol's default holds 512 Ki)
/// get [`tuned_compressor`]'s search when their encoding has one. Shorter
/// ones (a payload's last chunk, small models, small chunk settings)
/// spread each byte plane over less than one of zstd's 128 KiB blocks, and
/// there zstd's own level 1 packs them 0.5–3 % tighter (measured: 256 KiB
/// chunks of the benchmark deltas, the demo's U-Net update, one chunk of
/// 121 Ki values); from 512 KiB up the tuned search was both faster and
/// smaller on every data set measured.
const TUNED_MIN_VALUES: u64 = 128 * 1024;

/// The zstd compressor for long chunks of a payload with `encoding`, where
/// one fits better than zstd's own parameters for the level (`None`
/// elsewhere).
///
/// For the float codecs (f32, f16, bf16) at level 1, the default: zstd's
/// fast strategy with a 128-entry hash table (`hashLog` 7) and matches of
/// 7 bytes or more, instead of level 1's own 8,192 entries and 6 bytes.
/// Their bodies are byte planes of floats: the sign / exponent plane is
/// low-entropy noise in which short matches are plentiful and worth nothing
/// (each costs a sequence where Huffman-coded literals are as small), and
/// the mantissa planes are noise zstd stores raw. Fewer, longer matches
/// made 2 MiB f32 chunks 2.0 × faster to compress, 1.5 × faster to
/// decompress and 0.9 % smaller, bf16 2.4 ×, 1.6 × and 2 % smaller (512
/// KiB chunks: f32 2.2 ×, 1.5 ×, 0.8 %; bf16 2.9 ×, 2.0 ×, 3.6 %), f16 as
/// fast and as small, a 90 %-zeros delta as fast and 1–2 % smaller
/// ("Protocol" in docs/PERFORMANCE.md; `cargo bench -p fedlink-protocol
/// --bench zstd_params`). int8 and top-k bodies (small integers, index
/// gaps) keep zstd's own level 1: no faster, and top-k 1 % larger, with
/// the small table; so do other levels. Only the compressor's search
/// changes: the frames are ordinary zstd frames that every decoder reads
/// as before.
fn tuned_compressor(
    encoding: &Encoding,
) -> std::io::Result<Option<zstd::bulk::Compressor<'static>>> {
    use zstd::zstd_safe::{CParameter, Strategy};
    let float_planes = matches!(
        encoding.values(),
        ValueCodec::F32 | ValueCodec::F16 | ValueCodec::Bf16
    );
    if encoding.zstd_level() != 1 || !float_planes {
        return Ok(None);
    }
    let mut c = zstd::bulk::Compressor::new(1)?;
    c.set_parameter(CParameter::Strategy(Strategy::ZSTD_fast))?;
    c.set_parameter(CParameter::HashLog(7))?;
    c.set_parameter(CParameter::MinMatch(7))?;
    Ok(Some(c))
}

/// Encodes the chunk record of any one chunk of a payload, by its index.
///
/// A chunk's record depends only on its values, its position and the seed
/// (stochastic rounding draws from ChaCha8 seeded by the seed, stream = the
/// chunk's index), never on the chunks before it: records can be encoded in
/// any order, on several threads (one `ChunkEncoder` each), and are the
/// very bytes [`PayloadEncoder`] produces in sequence (it is built on this
/// type).
pub struct ChunkEncoder {
    spec: ModelSpec,
    encoding: Encoding,
    seed: u64,
    /// zstd at the encoding's level, its own parameters.
    compressor: zstd::bulk::Compressor<'static>,
    /// The search fitted to this encoding's bodies, for chunks of at least
    /// [`TUNED_MIN_VALUES`] values, where there is one.
    tuned: Option<zstd::bulk::Compressor<'static>>,
    /// Scratch reused from chunk to chunk (no allocation, and no fresh
    /// pages to fault in, per chunk): the plain body and the shuffled body
    /// (f32 and the 2-byte codecs write only the latter).
    body: Vec<u8>,
    shuffled: Vec<u8>,
}

impl std::fmt::Debug for ChunkEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkEncoder")
            .field("encoding", &self.encoding)
            .field("num_params", &self.spec.num_params())
            .finish_non_exhaustive()
    }
}

impl ChunkEncoder {
    /// A chunk encoder for a model with `spec`, using `encoding`; `seed`
    /// seeds stochastic rounding (ignored by the other codecs).
    pub fn new(spec: ModelSpec, encoding: Encoding, seed: u64) -> Result<Self, EncodeError> {
        let compress_err = |e: std::io::Error| EncodeError::Compress(e.to_string());
        let compressor =
            zstd::bulk::Compressor::new(encoding.zstd_level()).map_err(compress_err)?;
        let tuned = tuned_compressor(&encoding).map_err(compress_err)?;
        Ok(Self {
            spec,
            encoding,
            seed,
            compressor,
            tuned,
            body: Vec::new(),
            shuffled: Vec::new(),
        })
    }

    /// The spec being encoded.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The encoding in use.
    pub fn encoding(&self) -> &Encoding {
        &self.encoding
    }

    /// Chunks in the payload.
    pub fn num_chunks(&self) -> u64 {
        self.spec.num_params().div_ceil(self.encoding.chunk_elems())
    }

    /// Element range of chunk `index`; `None` past the last chunk.
    pub fn chunk_range(&self, index: u64) -> Option<Range<u64>> {
        let start = index.checked_mul(self.encoding.chunk_elems())?;
        next_range(&self.spec, &self.encoding, start)
    }

    /// Encode chunk `index`; `values` must be exactly its elements
    /// ([`ChunkEncoder::chunk_range`]). Returns the chunk record (header +
    /// compressed body).
    pub fn encode(&mut self, index: u64, values: &[f32]) -> Result<Vec<u8>, EncodeError> {
        let range = self
            .chunk_range(index)
            .ok_or_else(|| EncodeError::AlreadyComplete(self.spec.num_params()))?;
        self.encode_range(index, range, values)
    }

    fn encode_range(
        &mut self,
        index: u64,
        range: Range<u64>,
        values: &[f32],
    ) -> Result<Vec<u8>, EncodeError> {
        let n = range.end - range.start;
        if values.len() as u64 != n {
            return Err(EncodeError::WrongChunkLength {
                offset: range.start,
                expected: n,
                actual: values.len() as u64,
            });
        }
        if let Some(i) = crate::model::first_non_finite(values) {
            return Err(EncodeError::NonFinite(range.start + i as u64));
        }
        let codec = self.encoding.values();
        let segs = segment_lens(&self.spec, &range);
        let mut rng = match codec {
            ValueCodec::Int8 { stochastic: true } => {
                let mut r = ChaCha8Rng::seed_from_u64(self.seed);
                r.set_stream(index);
                Some(r)
            }
            _ => None,
        };
        let raw = raw_len(codec, n, segs.len() as u64) as usize;
        let body: &[u8] = if codec == ValueCodec::F32 && cfg!(target_endian = "little") {
            // Lossless f32: the values' own bytes are the plain body; split
            // them into byte planes directly, or compress them as they are
            // (no staging copy of the body either way). Little-endian
            // only: the wire's f32 are little-endian, so on a big-endian
            // machine the native bytes are not the wire's and the generic
            // path (`to_le_bytes`) is taken instead.
            let src: &[u8] = bytemuck::cast_slice(values);
            if self.encoding.shuffle() {
                self.shuffled.resize(src.len(), 0);
                shuffle_into(src, 4, &mut self.shuffled);
                &self.shuffled
            } else {
                src
            }
        } else if matches!(codec, ValueCodec::F16 | ValueCodec::Bf16) {
            // f16 / bf16: converted and split into byte planes (or laid
            // out as half-words) in one pass: `encode_halves`.
            self.shuffled.resize(raw, 0);
            encode_halves(
                codec,
                values,
                range.start,
                self.encoding.shuffle(),
                &mut self.shuffled,
            )?;
            &self.shuffled
        } else {
            let body = &mut self.body;
            body.clear();
            body.reserve(raw);
            encode_body(codec, values, range.start, &segs, rng.as_mut(), body)?;
            debug_assert_eq!(body.len(), raw);
            if self.encoding.shuffle() {
                reshuffle_into(
                    body,
                    sections(codec, values.len(), segs.len()),
                    true,
                    &mut self.shuffled,
                );
                &self.shuffled
            } else {
                &self.body
            }
        };
        let bound = zstd_bound(body.len());
        let mut record = vec![0u8; CHUNK_HEADER_LEN + bound];
        let compressor = match &mut self.tuned {
            Some(tuned) if n >= TUNED_MIN_VALUES => tuned,
            _ => &mut self.compressor,
        };
        let clen = compressor
            .compress_to_buffer(body, &mut record[CHUNK_HEADER_LEN..])
            .map_err(|e| EncodeError::Compress(e.to_string()))?;
        record.truncate(CHUNK_HEADER_LEN + clen);
        let header = ChunkHeader {
            codec_tag: codec.tag(),
            shuffle: self.encoding.shuffle(),
            offset: range.start,
            count: n as u32,
            raw_len: body.len() as u32,
            compressed_len: clen as u32,
        };
        record[..CHUNK_HEADER_LEN].copy_from_slice(&header.to_bytes());
        Ok(record)
    }
}

/// Streaming payload encoder.
///
/// Either call [`PayloadEncoder::encode_chunk`] with exactly the values of
/// [`PayloadEncoder::next_chunk`] (no copy), or [`PayloadEncoder::push`]
/// slices of any length (buffered up to one chunk). Then
/// [`PayloadEncoder::finish`] for the length and hash of the payload.
///
/// ```
/// use fedlink_protocol::{Encoding, ModelSpec, PayloadEncoder, TensorSpec, ValueCodec};
/// let spec = ModelSpec::new(vec![TensorSpec::f32("w", vec![10])])?;
/// let enc = Encoding::with_codec(ValueCodec::F16)?.with_chunk_bytes(16)?;
/// let values: Vec<f32> = (0..10).map(|i| i as f32 / 10.0).collect();
/// let mut encoder = PayloadEncoder::new(spec, enc, 7)?;
/// let mut records = Vec::new();
/// while let Some(r) = encoder.next_chunk() {
///     records.push(encoder.encode_chunk(&values[r.start as usize..r.end as usize])?);
/// }
/// let summary = encoder.finish()?;
/// assert_eq!(summary.num_chunks, 3); // 4 + 4 + 2 elements
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PayloadEncoder {
    chunks: ChunkEncoder,
    next: u64,
    chunk_index: u64,
    pending: Vec<f32>,
    hasher: blake3::Hasher,
    payload_len: u64,
}

impl std::fmt::Debug for PayloadEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadEncoder")
            .field("encoding", &self.chunks.encoding)
            .field("next", &self.next)
            .field("num_params", &self.chunks.spec.num_params())
            .finish_non_exhaustive()
    }
}

impl PayloadEncoder {
    /// An encoder for a model with `spec`, using `encoding`; `seed` seeds
    /// stochastic rounding (ignored by the other codecs).
    pub fn new(spec: ModelSpec, encoding: Encoding, seed: u64) -> Result<Self, EncodeError> {
        Ok(Self {
            chunks: ChunkEncoder::new(spec, encoding, seed)?,
            next: 0,
            chunk_index: 0,
            pending: Vec::new(),
            hasher: blake3::Hasher::new(),
            payload_len: 0,
        })
    }

    /// The spec being encoded.
    pub fn spec(&self) -> &ModelSpec {
        &self.chunks.spec
    }

    /// The encoding in use.
    pub fn encoding(&self) -> &Encoding {
        &self.chunks.encoding
    }

    /// Element range of the next chunk, `None` when every value was encoded.
    pub fn next_chunk(&self) -> Option<Range<u64>> {
        next_range(&self.chunks.spec, &self.chunks.encoding, self.next)
    }

    /// Encode the next chunk; `values` must be exactly its elements.
    /// Returns the chunk record (header + compressed body).
    pub fn encode_chunk(&mut self, values: &[f32]) -> Result<Vec<u8>, EncodeError> {
        let range = self
            .next_chunk()
            .ok_or_else(|| EncodeError::AlreadyComplete(self.chunks.spec.num_params()))?;
        let end = range.end;
        let record = self.chunks.encode_range(self.chunk_index, range, values)?;
        self.hasher.update(&record);
        self.payload_len += record.len() as u64;
        self.next = end;
        self.chunk_index += 1;
        Ok(record)
    }

    /// Feed the next values (any length); returns the chunk records that
    /// became complete. Buffers at most one chunk of values.
    pub fn push(&mut self, mut values: &[f32]) -> Result<Vec<Vec<u8>>, EncodeError> {
        let mut out = Vec::new();
        while !values.is_empty() {
            let range = self
                .next_chunk()
                .ok_or_else(|| EncodeError::AlreadyComplete(self.chunks.spec.num_params()))?;
            let need = (range.end - range.start) as usize;
            if self.pending.is_empty() && values.len() >= need {
                let (now, rest) = values.split_at(need);
                out.push(self.encode_chunk(now)?);
                values = rest;
                continue;
            }
            let take = (need - self.pending.len()).min(values.len());
            self.pending.extend_from_slice(&values[..take]);
            values = &values[take..];
            if self.pending.len() == need {
                let pending = std::mem::take(&mut self.pending);
                out.push(self.encode_chunk(&pending)?);
                self.pending = pending;
                self.pending.clear();
            }
        }
        Ok(out)
    }

    /// Values encoded so far.
    pub fn encoded(&self) -> u64 {
        self.next
    }

    /// Length and hash of the payload; fails unless every value was encoded.
    pub fn finish(self) -> Result<PayloadSummary, EncodeError> {
        if self.next != self.chunks.spec.num_params() {
            return Err(EncodeError::Incomplete {
                encoded: self.next + self.pending.len() as u64,
                expected: self.chunks.spec.num_params(),
            });
        }
        Ok(PayloadSummary {
            payload_len: self.payload_len,
            payload_hash: PayloadHash(*self.hasher.finalize().as_bytes()),
            num_chunks: self.chunk_index,
        })
    }
}

/// Encode a whole model at once (convenience for small models and tests):
/// the chunk records and the summary.
pub fn encode_payload(
    model: &FlatModel,
    encoding: Encoding,
    seed: u64,
) -> Result<(Vec<Vec<u8>>, PayloadSummary), EncodeError> {
    let mut enc = PayloadEncoder::new(model.spec().clone(), encoding, seed)?;
    let mut records = Vec::new();
    while let Some(r) = enc.next_chunk() {
        let values = model
            .values()
            .get(r.start as usize..r.end as usize)
            .ok_or_else(|| EncodeError::Incomplete {
                encoded: r.start,
                expected: model.spec().num_params(),
            })?;
        records.push(enc.encode_chunk(values)?);
    }
    Ok((records, enc.finish()?))
}

/// One decoded chunk: where it goes and its values.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedChunk {
    /// Element offset in the model.
    pub offset: u64,
    /// The values.
    pub values: Vec<f32>,
}

/// A decoded chunk that passed the decoder's checks: every value finite,
/// and their largest `|x|` found by the same pass. Only this crate's
/// decoder makes one, so a consumer (the update validator) can rely on
/// [`CheckedChunk::max_abs`] without scanning the values again.
#[derive(Clone, Copy, Debug)]
pub struct CheckedChunk<'a> {
    offset: u64,
    values: &'a [f32],
    max_abs: f32,
}

impl<'a> CheckedChunk<'a> {
    /// Element offset in the model.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The values (all finite).
    pub fn values(&self) -> &'a [f32] {
        self.values
    }

    /// The largest `|x|` of the values (0 for none); finite.
    pub fn max_abs(&self) -> f32 {
        self.max_abs
    }
}

/// What a decoder saw, once complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodedSummary {
    /// [`ModelHash`] of the decoded values (for a lossless model transfer,
    /// compare with the announced model hash); `None` from a decoder made
    /// with [`PayloadDecoder::without_model_hash`].
    pub model_hash: Option<ModelHash>,
    /// Chunk records decoded.
    pub num_chunks: u64,
    /// Bytes of chunk records decoded.
    pub payload_len: u64,
}

/// Decodes the chunk record of any one chunk of a payload, by its index:
/// the position check, decompression and decoding of
/// [`PayloadDecoder::decode_chunk_into`], for a record whose place the
/// caller knows (records decoded in any order, on several threads, one
/// `ChunkDecoder` each). It keeps no count of what was decoded and hashes
/// nothing: a caller checks completeness and integrity itself.
pub struct ChunkDecoder {
    spec: ModelSpec,
    encoding: Encoding,
    decompressor: zstd::bulk::Decompressor<'static>,
    /// Scratch reused from chunk to chunk: the decompressed body and the
    /// unshuffled body (f32 and the 2-byte codecs need only the former).
    raw: Vec<u8>,
    plain: Vec<u8>,
}

impl std::fmt::Debug for ChunkDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkDecoder")
            .field("encoding", &self.encoding)
            .field("num_params", &self.spec.num_params())
            .finish_non_exhaustive()
    }
}

impl ChunkDecoder {
    /// A chunk decoder for payloads of a model with `spec`, encoded with
    /// `encoding`.
    pub fn new(spec: ModelSpec, encoding: Encoding) -> Result<Self, PayloadError> {
        let decompressor =
            zstd::bulk::Decompressor::new().map_err(|e| PayloadError::Decompress {
                raw: 0,
                reason: e.to_string(),
            })?;
        Ok(Self {
            spec,
            encoding,
            decompressor,
            raw: Vec::new(),
            plain: Vec::new(),
        })
    }

    /// Decode `record`, which must be chunk `index` (its header is checked
    /// against that chunk's place, as [`PayloadDecoder::check_header`]
    /// does), into `values` (cleared first). Returns the chunk's element
    /// offset. On error `values` holds nothing usable.
    pub fn decode_into(
        &mut self,
        index: u64,
        record: &[u8],
        values: &mut Vec<f32>,
    ) -> Result<u64, PayloadError> {
        let range = index
            .checked_mul(self.encoding.chunk_elems())
            .and_then(|start| next_range(&self.spec, &self.encoding, start))
            .ok_or_else(|| PayloadError::AlreadyComplete(self.spec.num_params()))?;
        self.decode_range(range, record, values)
            .map(|(offset, _)| offset)
    }

    /// Check a header against the chunk at `range`; returns the compressed
    /// body length.
    fn check_header(&self, range: Range<u64>, h: &ChunkHeader) -> Result<usize, PayloadError> {
        let codec = self.encoding.values();
        if h.codec_tag != codec.tag() {
            return Err(PayloadError::CodecMismatch {
                expected: codec.tag(),
                found: h.codec_tag,
            });
        }
        if h.shuffle != self.encoding.shuffle() {
            return Err(PayloadError::ShuffleMismatch {
                expected: self.encoding.shuffle(),
                found: h.shuffle,
            });
        }
        if h.offset != range.start {
            return Err(PayloadError::UnexpectedOffset {
                expected: range.start,
                found: h.offset,
            });
        }
        let n = range.end - range.start;
        if u64::from(h.count) != n {
            return Err(PayloadError::UnexpectedCount {
                expected: n,
                found: u64::from(h.count),
            });
        }
        let segs = self.spec.segments(range.start, range.end).count() as u64;
        let raw = raw_len(codec, n, segs);
        if u64::from(h.raw_len) != raw {
            return Err(PayloadError::RawLenMismatch {
                expected: raw,
                found: u64::from(h.raw_len),
            });
        }
        // The compressed bound was checked by ChunkHeader::parse.
        Ok(h.compressed_len as usize)
    }

    /// Returns the chunk's element offset and its values' largest `|x|`.
    fn decode_range(
        &mut self,
        expected: Range<u64>,
        record: &[u8],
        values: &mut Vec<f32>,
    ) -> Result<(u64, f32), PayloadError> {
        let Some((head, body)) = record.split_first_chunk::<CHUNK_HEADER_LEN>() else {
            return Err(PayloadError::Truncated(record.len()));
        };
        let h = ChunkHeader::parse(head)?;
        let clen = self.check_header(expected, &h)?;
        if body.len() != clen {
            return Err(PayloadError::RecordLength {
                declared: h.record_len() as u64,
                actual: record.len() as u64,
            });
        }
        let raw_len = h.raw_len as usize;
        let raw = &mut self.raw;
        raw.clear();
        // Room for this chunk's declared size (bounded by `check_header`);
        // a reused buffer may be larger (an earlier chunk's size, no more),
        // and a body that decompresses to anything but `raw_len` fails below.
        raw.reserve(raw_len);
        self.decompressor
            .decompress_to_buffer(body, raw)
            .map_err(|e| PayloadError::Decompress {
                raw: raw_len as u64,
                reason: e.to_string(),
            })?;
        if raw.len() != raw_len {
            return Err(PayloadError::DecompressedSize {
                declared: raw_len as u64,
                actual: raw.len() as u64,
            });
        }
        let codec = self.encoding.values();
        let n = h.count as usize;
        if codec == ValueCodec::F32 && cfg!(target_endian = "little") {
            // Lossless f32: the plain body *is* the values' bytes, so the
            // byte planes are joined (or the body copied) straight into
            // `values` instead of into a staging buffer read back value by
            // value (one copy of every byte fewer; the coordinator decodes
            // 4 bytes per parameter per f32 upload, each site as much per
            // whole-model download). Little-endian only, as in the
            // encoder: elsewhere the generic path converts with
            // `from_le_bytes`.
            if raw_len != 4 * n {
                return Err(PayloadError::DecompressedSize {
                    declared: 4 * n as u64,
                    actual: raw_len as u64,
                });
            }
            // Resized, not cleared: every value is overwritten below.
            values.resize(n, 0.0);
            let out: &mut [u8] = bytemuck::cast_slice_mut(values.as_mut_slice());
            if h.shuffle {
                unshuffle_into(&self.raw, 4, out);
            } else {
                out.copy_from_slice(&self.raw);
            }
            let max = finish_decoded(values, n, h.offset)?;
            return Ok((h.offset, max));
        }
        if matches!(codec, ValueCodec::F16 | ValueCodec::Bf16) {
            // f16 / bf16: the byte planes (or half-words) widened straight
            // into `values`, block by block (`decode_halves`): no
            // unshuffled copy and no staging buffer of half-words.
            if raw_len != 2 * n {
                return Err(PayloadError::DecompressedSize {
                    declared: 2 * n as u64,
                    actual: raw_len as u64,
                });
            }
            // Resized, not cleared: every value is overwritten below.
            values.resize(n, 0.0);
            decode_halves(codec, &self.raw, h.shuffle, values);
            let max = finish_decoded(values, n, h.offset)?;
            return Ok((h.offset, max));
        }
        let range = h.offset..h.offset + n as u64;
        let segs = segment_lens(&self.spec, &range);
        let plain = if h.shuffle {
            reshuffle_into(
                &self.raw,
                sections(codec, n, segs.len()),
                false,
                &mut self.plain,
            );
            &self.plain
        } else {
            &self.raw
        };
        let max = decode_body_into(codec, plain, n, h.offset, &segs, values)?;
        Ok((h.offset, max))
    }
}

/// Streaming payload decoder: feed chunk records in order, from any source
/// (network frames or a spool file), get `(offset, values)` per chunk.
///
/// Each record is validated against the encoding, the spec and the expected
/// position before anything is allocated (see the module docs).
pub struct PayloadDecoder {
    chunks: ChunkDecoder,
    next: u64,
    count: u64,
    bytes: u64,
    hasher: Option<ModelHasher>,
}

impl std::fmt::Debug for PayloadDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadDecoder")
            .field("encoding", &self.chunks.encoding)
            .field("next", &self.next)
            .field("num_params", &self.chunks.spec.num_params())
            .finish_non_exhaustive()
    }
}

impl PayloadDecoder {
    /// A decoder for a payload of a model with `spec`, encoded with `encoding`.
    pub fn new(spec: ModelSpec, encoding: Encoding) -> Result<Self, PayloadError> {
        let hasher = Some(ModelHasher::new(&spec));
        Ok(Self {
            chunks: ChunkDecoder::new(spec, encoding)?,
            next: 0,
            count: 0,
            bytes: 0,
            hasher,
        })
    }

    /// Do not hash the decoded values: for a payload whose integrity is
    /// already established another way (an update's chunk records are
    /// covered by the signed payload hash, checked as they arrive), where a
    /// [`ModelHash`] of the values would be computed and thrown away — it
    /// costs one blake3 pass over 4 bytes per parameter, two to five times
    /// the payload's size. [`PayloadDecoder::finish`] then reports
    /// `model_hash: None`.
    pub fn without_model_hash(mut self) -> Self {
        self.hasher = None;
        self
    }

    /// Element range of the next expected chunk; `None` when complete.
    pub fn expected_chunk(&self) -> Option<Range<u64>> {
        next_range(&self.chunks.spec, &self.chunks.encoding, self.next)
    }

    /// Is every chunk received?
    pub fn is_complete(&self) -> bool {
        self.next == self.chunks.spec.num_params()
    }

    fn expected(&self) -> Result<Range<u64>, PayloadError> {
        self.expected_chunk()
            .ok_or_else(|| PayloadError::AlreadyComplete(self.chunks.spec.num_params()))
    }

    /// Check a header against the next expected chunk. On success returns
    /// the compressed body length, which a driver reading a stream or file
    /// can then read (bounded by [`MAX_CHUNK_RECORD_LEN`]).
    pub fn check_header(&self, h: &ChunkHeader) -> Result<usize, PayloadError> {
        self.chunks.check_header(self.expected()?, h)
    }

    /// Decode one complete chunk record (header + body).
    pub fn decode_chunk(&mut self, record: &[u8]) -> Result<DecodedChunk, PayloadError> {
        let mut values = Vec::new();
        let offset = self.decode_chunk_into(record, &mut values)?;
        Ok(DecodedChunk { offset, values })
    }

    /// [`PayloadDecoder::decode_chunk`] into `values` (cleared first), so
    /// that a caller decoding chunk after chunk reuses one buffer instead
    /// of allocating (and page-faulting in) a fresh one per chunk. Returns
    /// the chunk's element offset. On error `values` holds nothing usable.
    pub fn decode_chunk_into(
        &mut self,
        record: &[u8],
        values: &mut Vec<f32>,
    ) -> Result<u64, PayloadError> {
        self.decode_chunk_checked(record, values)
            .map(|chunk| chunk.offset())
    }

    /// [`PayloadDecoder::decode_chunk_into`], returning the decoded chunk
    /// with what the decoder's finiteness check found (its largest `|x|`),
    /// so that a validator after it need not scan the values again. The
    /// chunk borrows `values`: they cannot change while it is held.
    pub fn decode_chunk_checked<'v>(
        &mut self,
        record: &[u8],
        values: &'v mut Vec<f32>,
    ) -> Result<CheckedChunk<'v>, PayloadError> {
        let expected = self.expected()?;
        let (offset, max_abs) = self.chunks.decode_range(expected, record, values)?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(values);
        }
        self.next = offset + values.len() as u64;
        self.count += 1;
        self.bytes += record.len() as u64;
        Ok(CheckedChunk {
            offset,
            values,
            max_abs,
        })
    }

    /// Finish: fails unless every chunk arrived.
    pub fn finish(self) -> Result<DecodedSummary, PayloadError> {
        if !self.is_complete() {
            return Err(PayloadError::Incomplete {
                received: self.next,
                expected: self.chunks.spec.num_params(),
            });
        }
        Ok(DecodedSummary {
            model_hash: self.hasher.as_ref().map(ModelHasher::finalize),
            num_chunks: self.count,
            payload_len: self.bytes,
        })
    }
}

/// Decode a whole payload at once (convenience for small models and tests).
pub fn decode_payload<'a>(
    spec: ModelSpec,
    encoding: Encoding,
    records: impl IntoIterator<Item = &'a [u8]>,
) -> Result<FlatModel, PayloadError> {
    let mut dec = PayloadDecoder::new(spec.clone(), encoding)?;
    // Grows with the chunks actually decoded, not with the declared size.
    let mut values = Vec::new();
    for r in records {
        values.extend(dec.decode_chunk(r)?.values);
    }
    dec.finish()?;
    Ok(FlatModel::new(spec, values)?)
}

/// Upper bound of the payload length of a model with `spec` in `encoding`:
/// what a verifier may accept as a declared payload length.
pub fn max_payload_len(spec: &ModelSpec, encoding: &Encoding) -> u64 {
    let total = spec.num_params();
    let ce = encoding.chunk_elems();
    let tensors = spec.tensors().len() as u64;
    let codec = encoding.values();
    let per_chunk = |n: u64| {
        let raw = raw_len(codec, n, n.min(tensors));
        (CHUNK_HEADER_LEN + zstd_bound(raw as usize)) as u64
    };
    let full = total / ce;
    let rest = total % ce;
    full * per_chunk(ce) + if rest > 0 { per_chunk(rest) } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TensorSpec;

    fn spec3() -> ModelSpec {
        ModelSpec::new(vec![
            TensorSpec::f32("a", vec![5]),
            TensorSpec::f32("b", vec![0]),
            TensorSpec::f32("c", vec![3, 4]),
            TensorSpec::f32("d", vec![7]),
        ])
        .unwrap()
    }

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect()
    }

    fn enc(codec: ValueCodec, shuffle: bool) -> Encoding {
        Encoding::new(codec, shuffle, 3, 32).unwrap()
    }

    /// Long float chunks at level 1 (the protocol's 2 MiB, a job's 512 KiB)
    /// go through the tuned search: their frames are plain zstd (the stock
    /// decoder reads them), no larger than zstd's own level 1 makes of the
    /// same body (f32 and bf16 smaller), and decode to the values. A short
    /// last chunk, int8, and f32 in 256 KiB chunks keep zstd's own level 1:
    /// the same bytes.
    #[test]
    fn level_1_float_frames_are_plain_zstd_and_no_larger_than_zstds_own() {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let long = 512 * 1024;
        let n = long + 4096;
        let mut rng = ChaCha8Rng::seed_from_u64(2024);
        let normal = Normal::new(0.0f32, 1e-3).unwrap();
        let values: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        let spec = ModelSpec::new(vec![TensorSpec::f32("w", vec![n as u64])]).unwrap();
        let e = |c| Encoding::with_codec(c).unwrap();
        let job_chunk = |c| e(c).with_chunk_bytes(512 * 1024).unwrap();
        let f32_small = e(ValueCodec::F32).with_chunk_bytes(256 * 1024).unwrap();
        let own_level_1 = [e(ValueCodec::Int8 { stochastic: false }), f32_small];
        // (encoding, chunks that take the tuned search): the 4,096-value
        // last chunk never does.
        for (enc, expected_tuned) in [
            (e(ValueCodec::F32), 1),
            (e(ValueCodec::F16), 1),
            (e(ValueCodec::Bf16), 1),
            (job_chunk(ValueCodec::F32), 4),
            (job_chunk(ValueCodec::Bf16), 4),
            (own_level_1[0], 0),
            (own_level_1[1], 0),
        ] {
            assert_eq!(enc.zstd_level(), 1);
            let mut encoder = PayloadEncoder::new(spec.clone(), enc, 1).unwrap();
            let mut decoder = PayloadDecoder::new(spec.clone(), enc).unwrap();
            let mut decoded = Vec::with_capacity(n);
            let mut tuned = 0;
            while let Some(r) = encoder.next_chunk() {
                let rec = encoder
                    .encode_chunk(&values[r.start as usize..r.end as usize])
                    .unwrap();
                let head: [u8; CHUNK_HEADER_LEN] = rec[..CHUNK_HEADER_LEN].try_into().unwrap();
                let h = ChunkHeader::parse(&head).unwrap();
                let frame = &rec[CHUNK_HEADER_LEN..];
                let body = zstd::bulk::decompress(frame, h.raw_len as usize).unwrap();
                let own = zstd::bulk::compress(&body, 1).unwrap();
                if own_level_1.contains(&enc) || u64::from(h.count) < TUNED_MIN_VALUES {
                    assert!(frame == own.as_slice(), "{} n={}", enc.name(), h.count);
                } else {
                    tuned += 1;
                    // f32 and bf16 planes come out strictly smaller (the
                    // tuned search is in use); f16's as small.
                    if enc.values() != ValueCodec::F16 {
                        assert!(frame.len() < own.len(), "{}", enc.name());
                    }
                    assert!(
                        frame.len() <= own.len(),
                        "{}: {} > zstd's own {}",
                        enc.name(),
                        frame.len(),
                        own.len()
                    );
                }
                decoded.extend(decoder.decode_chunk(&rec).unwrap().values);
            }
            assert_eq!(tuned, expected_tuned, "{}", enc.name());
            assert_eq!(decoded.len(), n);
            if enc.values() == ValueCodec::F32 {
                assert_eq!(decoded, values);
            }
        }
    }

    /// The vectorised shuffles write exactly what the byte-plane loops
    /// write, for every element size in use, around every block boundary,
    /// over a destination holding other bytes (a reused buffer), and a
    /// remainder shorter than an element becomes zeros.
    #[test]
    fn fast_shuffles_equal_the_byte_plane_loops() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut byte = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        };
        for ts in [0usize, 1, 2, 3, 4, 8] {
            for n in (0..3 * SHUFFLE_BLOCK + 3).chain([4096, 131_072 + 5]) {
                for extra in [0, ts.saturating_sub(1)] {
                    let src: Vec<u8> = (0..n * ts.max(1) + extra).map(|_| byte()).collect();
                    let (mut want, mut got) = (vec![0xa5u8; src.len()], vec![0x5au8; src.len()]);
                    if ts <= 1 {
                        want.copy_from_slice(&src);
                    } else {
                        shuffle_any(&src, ts, &mut want);
                    }
                    shuffle_into(&src, ts, &mut got);
                    assert_eq!(got, want, "shuffle ts={ts} n={n} extra={extra}");
                    let (mut want, mut got) = (vec![0xa5u8; src.len()], vec![0x5au8; src.len()]);
                    if ts <= 1 {
                        want.copy_from_slice(&src);
                    } else {
                        unshuffle_any(&src, ts, &mut want);
                    }
                    unshuffle_into(&src, ts, &mut got);
                    assert_eq!(got, want, "unshuffle ts={ts} n={n} extra={extra}");
                    if ts > 1 {
                        assert!(got[n * ts..].iter().all(|&b| b == 0));
                    }
                    if extra == 0 && ts > 1 {
                        let mut back = vec![0u8; src.len()];
                        unshuffle_into(&got, ts, &mut back);
                        let mut round = vec![0u8; src.len()];
                        shuffle_into(&back, ts, &mut round);
                        assert_eq!(round, got, "round trip ts={ts} n={n}");
                    }
                }
            }
        }
        // A reused body buffer, longer or shorter than the next body.
        let secs = |n: usize| [(2usize, 2 * n), (1usize, 0usize)];
        let body: Vec<u8> = (0..200).map(|_| byte()).collect();
        let mut out = vec![7u8; 500];
        reshuffle_into(&body, secs(100), true, &mut out);
        let mut want = vec![0u8; 200];
        shuffle_any(&body, 2, &mut want);
        assert_eq!(out, want);
        let mut back = Vec::new();
        reshuffle_into(&out, secs(100), false, &mut back);
        assert_eq!(back, body);
        reshuffle_into(&body[..20], secs(10), false, &mut back);
        assert_eq!(back.len(), 20);
    }

    #[test]
    fn bound_matches_zstd() {
        for n in [
            0,
            1,
            100,
            4096,
            131_071,
            131_072,
            1 << 20,
            MAX_CHUNK_RAW_LEN,
        ] {
            assert_eq!(zstd_bound(n), zstd::zstd_safe::compress_bound(n), "n={n}");
        }
    }

    #[test]
    fn f32_roundtrip_push_in_odd_slices() {
        let spec = spec3();
        let v = values(24);
        let model = FlatModel::new(spec.clone(), v.clone()).unwrap();
        for shuffle in [false, true] {
            let e = enc(ValueCodec::F32, shuffle);
            let (records, summary) = encode_payload(&model, e, 0).unwrap();
            assert_eq!(records.len(), 3);
            assert_eq!(summary.num_chunks, 3);
            let total: usize = records.iter().map(Vec::len).sum();
            assert_eq!(summary.payload_len, total as u64);
            assert!(summary.payload_len <= max_payload_len(&spec, &e));
            let cat: Vec<u8> = records.concat();
            assert_eq!(summary.payload_hash, PayloadHash::of(&cat));
            let mut pe = PayloadEncoder::new(spec.clone(), e, 0).unwrap();
            let mut pushed = Vec::new();
            for piece in v.chunks(5) {
                pushed.extend(pe.push(piece).unwrap());
            }
            assert_eq!(pushed, records);
            assert_eq!(pe.finish().unwrap(), summary);
            let back = decode_payload(spec.clone(), e, records.iter().map(Vec::as_slice)).unwrap();
            assert_eq!(back.values(), &v[..]);
        }
    }

    #[test]
    fn int8_has_one_scale_per_segment() {
        let spec = spec3();
        let v = values(24);
        let e = enc(ValueCodec::Int8 { stochastic: false }, false);
        let model = FlatModel::new(spec.clone(), v.clone()).unwrap();
        let (records, _) = encode_payload(&model, e, 0).unwrap();
        // chunk 0 = a[0..5] + c[0..3]: 2 segments → raw = 4*2 + 8
        let h = ChunkHeader::parse(records[0].first_chunk().unwrap()).unwrap();
        assert_eq!(h.raw_len, 16);
        let back = decode_payload(spec, e, records.iter().map(Vec::as_slice)).unwrap();
        for (x, y) in v.iter().zip(back.values()) {
            assert!((x - y).abs() <= 1.0 / 127.0 * 0.5001, "{x} {y}");
        }
    }

    #[test]
    fn encoder_errors() {
        let spec = spec3();
        let e = enc(ValueCodec::F32, false);
        let mut pe = PayloadEncoder::new(spec.clone(), e, 0).unwrap();
        assert!(matches!(
            pe.encode_chunk(&[0.0; 3]),
            Err(EncodeError::WrongChunkLength { expected: 8, .. })
        ));
        let mut bad = vec![0.0; 8];
        bad[2] = f32::NAN;
        assert_eq!(pe.encode_chunk(&bad), Err(EncodeError::NonFinite(2)));
        pe.encode_chunk(&[0.0; 8]).unwrap();
        assert!(matches!(pe.finish(), Err(EncodeError::Incomplete { .. })));
        let mut pe = PayloadEncoder::new(spec.clone(), enc(ValueCodec::F16, true), 0).unwrap();
        let mut big = vec![0.0; 8];
        big[1] = 70_000.0;
        assert!(matches!(
            pe.encode_chunk(&big),
            Err(EncodeError::OutOfRange { index: 1, .. })
        ));
        let mut pe = PayloadEncoder::new(spec, e, 0).unwrap();
        pe.push(&[0.0; 24]).unwrap();
        assert_eq!(pe.push(&[0.0]), Err(EncodeError::AlreadyComplete(24)));
    }

    #[test]
    fn decoder_rejects_misplaced_and_tampered_chunks() {
        let spec = spec3();
        let e = enc(ValueCodec::F32, true);
        let model = FlatModel::new(spec.clone(), values(24)).unwrap();
        let (records, _) = encode_payload(&model, e, 0).unwrap();
        let new = || PayloadDecoder::new(spec.clone(), e).unwrap();
        // out of order
        assert!(matches!(
            new().decode_chunk(&records[1]),
            Err(PayloadError::UnexpectedOffset {
                expected: 0,
                found: 8
            })
        ));
        // wrong encoding
        let mut d = PayloadDecoder::new(spec.clone(), enc(ValueCodec::F16, true)).unwrap();
        assert!(matches!(
            d.decode_chunk(&records[0]),
            Err(PayloadError::CodecMismatch { .. })
        ));
        let mut d = PayloadDecoder::new(spec.clone(), enc(ValueCodec::F32, false)).unwrap();
        assert!(matches!(
            d.decode_chunk(&records[0]),
            Err(PayloadError::ShuffleMismatch { .. })
        ));
        // truncated / extended record
        let r = &records[0];
        assert!(matches!(
            new().decode_chunk(&r[..r.len() - 1]),
            Err(PayloadError::RecordLength { .. })
        ));
        assert!(matches!(
            new().decode_chunk(&r[..10]),
            Err(PayloadError::Truncated(10))
        ));
        // lying raw length
        let mut t = r.clone();
        t[16] ^= 4;
        assert!(matches!(
            new().decode_chunk(&t),
            Err(PayloadError::RawLenMismatch { .. })
        ));
        // lying count
        let mut t = r.clone();
        t[12] = 7;
        assert!(matches!(
            new().decode_chunk(&t),
            Err(PayloadError::UnexpectedCount { .. })
        ));
        // corrupt body
        let mut t = r.clone();
        let last = t.len() - 2;
        t[CHUNK_HEADER_LEN..last].fill(0xAA);
        assert!(new().decode_chunk(&t).is_err());
        // extra chunk, incomplete
        let mut d = new();
        for r in &records {
            d.decode_chunk(r).unwrap();
        }
        assert!(matches!(
            d.decode_chunk(&records[0]),
            Err(PayloadError::AlreadyComplete(24))
        ));
        assert_eq!(d.finish().unwrap().model_hash, Some(model.hash()));
        let mut d = new();
        d.decode_chunk(&records[0]).unwrap();
        assert!(matches!(d.finish(), Err(PayloadError::Incomplete { .. })));
    }

    #[test]
    fn decode_into_reused_buffer_matches_and_skips_the_values_hash() {
        let spec = spec3();
        let v = values(24);
        let model = FlatModel::new(spec.clone(), v).unwrap();
        let codecs = [
            ValueCodec::F32,
            ValueCodec::F16,
            ValueCodec::Bf16,
            ValueCodec::Int8 { stochastic: false },
            ValueCodec::TopK {
                per_million: 500_000,
            },
        ];
        for codec in codecs {
            for shuffle in [false, true] {
                let e = enc(codec, shuffle);
                let (records, _) = encode_payload(&model, e, 0).unwrap();
                let mut fresh = PayloadDecoder::new(spec.clone(), e).unwrap();
                let mut reused = PayloadDecoder::new(spec.clone(), e)
                    .unwrap()
                    .without_model_hash();
                // Stale, longer contents must not leak into a chunk.
                let mut buf = vec![9.0f32; 100];
                for r in &records {
                    let c = fresh.decode_chunk(r).unwrap();
                    let offset = reused.decode_chunk_into(r, &mut buf).unwrap();
                    assert_eq!(offset, c.offset, "{codec:?} shuffle={shuffle}");
                    assert_eq!(buf, c.values, "{codec:?} shuffle={shuffle}");
                }
                let hashed = fresh.finish().unwrap();
                let unhashed = reused.finish().unwrap();
                let back =
                    decode_payload(spec.clone(), e, records.iter().map(Vec::as_slice)).unwrap();
                assert_eq!(hashed.model_hash, Some(back.hash()));
                assert_eq!(unhashed.model_hash, None);
                assert_eq!(unhashed.payload_len, hashed.payload_len);
                assert_eq!(unhashed.num_chunks, hashed.num_chunks);
            }
        }
    }

    /// f16 and bf16 take one pass each way (`encode_halves`,
    /// `decode_halves`): the body holds exactly the byte planes (or the
    /// little-endian half-words) of the `half` crate's own per-value
    /// conversion, across block boundaries and a short last block, over a
    /// body buffer holding other bytes; decoding gives back exactly the
    /// widened half values; a value out of range is named by its element,
    /// in a later block too.
    #[test]
    fn two_byte_codecs_convert_and_split_in_one_pass() {
        let n = 3 * HALF_BLOCK + 7;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as f32) * 0.618_034).sin() * 10f32.powi((i % 9) as i32 - 5))
            .collect();
        for codec in [ValueCodec::F16, ValueCodec::Bf16] {
            // Each value's bit pattern and its widened value, by the
            // `half` crate's own per-value conversion.
            let (bits, widened): (Vec<u16>, Vec<f32>) = v
                .iter()
                .map(|&x| match codec {
                    ValueCodec::Bf16 => {
                        let h = half::bf16::from_f32(x);
                        (h.to_bits(), h.to_f32())
                    }
                    _ => {
                        let h = f16::from_f32(x);
                        (h.to_bits(), h.to_f32())
                    }
                })
                .unzip();
            let le: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            for shuffle in [false, true] {
                let mut want = vec![0u8; 2 * n];
                if shuffle {
                    shuffle_any(&le, 2, &mut want);
                } else {
                    want.copy_from_slice(&le);
                }
                let mut body = vec![0xa5u8; 2 * n];
                encode_halves(codec, &v, 40, shuffle, &mut body).unwrap();
                assert_eq!(body, want, "{codec:?} shuffle={shuffle}");
                let mut back = vec![7.0f32; n];
                decode_halves(codec, &body, shuffle, &mut back);
                assert_eq!(back, widened, "{codec:?} shuffle={shuffle}");

                let mut big = v.clone();
                // Rounds to infinity in both (bf16 keeps f32's exponent,
                // but f32::MAX rounds up past its largest value).
                big[HALF_BLOCK + 5] = f32::MAX;
                let mut body = vec![0u8; 2 * n];
                match encode_halves(codec, &big, 40, shuffle, &mut body) {
                    Err(EncodeError::OutOfRange { index, .. }) => {
                        assert_eq!(index, 40 + HALF_BLOCK as u64 + 5, "{codec:?}");
                    }
                    other => panic!("{codec:?}: {other:?}"),
                }
            }
        }
    }

    /// Lossless f32 takes a direct path both ways (the values' bytes split
    /// into planes, and joined straight back into the values): its records
    /// hold exactly the byte-plane loop's body of the little-endian bytes,
    /// and a decoded chunk's `max_abs` is the float loop's maximum.
    #[test]
    fn f32_direct_path_writes_the_byte_planes_and_reports_max_abs() {
        let spec = spec3();
        let v = values(24);
        let model = FlatModel::new(spec.clone(), v.clone()).unwrap();
        for shuffle in [false, true] {
            let e = enc(ValueCodec::F32, shuffle);
            let (records, _) = encode_payload(&model, e, 0).unwrap();
            let mut dec = PayloadDecoder::new(spec.clone(), e).unwrap();
            let mut buf = vec![7.0f32; 100];
            let mut at = 0usize;
            for r in &records {
                let (head, body) = r.split_first_chunk::<CHUNK_HEADER_LEN>().unwrap();
                let h = ChunkHeader::parse(head).unwrap();
                let n = h.count as usize;
                let le: Vec<u8> = v[at..at + n].iter().flat_map(|x| x.to_le_bytes()).collect();
                let mut want = vec![0u8; le.len()];
                if shuffle {
                    shuffle_any(&le, 4, &mut want);
                } else {
                    want.copy_from_slice(&le);
                }
                assert_eq!(zstd::bulk::decompress(body, 1 << 20).unwrap(), want);
                let c = dec.decode_chunk_checked(r, &mut buf).unwrap();
                assert_eq!(c.offset(), at as u64);
                assert_eq!(c.values(), &v[at..at + n]);
                let max = v[at..at + n].iter().fold(0f32, |m, x| m.max(x.abs()));
                assert_eq!(c.max_abs(), max, "shuffle={shuffle}");
                at += n;
            }
            dec.finish().unwrap();
        }
    }

    /// A lossless f32 record holding a non-finite value (the encoder never
    /// writes one; a peer may) is refused with the value's position.
    #[test]
    fn f32_record_with_a_non_finite_value_is_refused_at_its_position() {
        let spec = spec3();
        for shuffle in [false, true] {
            let e = enc(ValueCodec::F32, shuffle);
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut v = values(8);
                v[5] = bad;
                let le: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                let mut body = vec![0u8; le.len()];
                if shuffle {
                    shuffle_any(&le, 4, &mut body);
                } else {
                    body.copy_from_slice(&le);
                }
                let z = zstd::bulk::compress(&body, 3).unwrap();
                let h = ChunkHeader {
                    codec_tag: ValueCodec::F32.tag(),
                    shuffle,
                    offset: 0,
                    count: 8,
                    raw_len: body.len() as u32,
                    compressed_len: z.len() as u32,
                };
                let mut record = h.to_bytes().to_vec();
                record.extend_from_slice(&z);
                let mut dec = PayloadDecoder::new(spec.clone(), e).unwrap();
                let mut buf = Vec::new();
                assert_eq!(
                    dec.decode_chunk_checked(&record, &mut buf)
                        .map(|c| c.offset()),
                    Err(PayloadError::NonFinite(5)),
                    "{bad} shuffle={shuffle}"
                );
            }
        }
    }

    #[test]
    fn chunks_coded_by_index_in_any_order_are_the_sequential_bytes() {
        let spec = spec3();
        let v = values(24);
        let model = FlatModel::new(spec.clone(), v.clone()).unwrap();
        let codecs = [
            ValueCodec::F32,
            ValueCodec::F16,
            ValueCodec::Bf16,
            ValueCodec::Int8 { stochastic: true },
            ValueCodec::Int8 { stochastic: false },
            ValueCodec::TopK {
                per_million: 500_000,
            },
        ];
        // The encoder's scratch is reused from chunk to chunk, whatever
        // their order and sizes (the last chunk is shorter).
        for codec in codecs {
            let e = enc(codec, true);
            let (records, _) = encode_payload(&model, e, 11).unwrap();
            let mut chunks = ChunkEncoder::new(spec.clone(), e, 11).unwrap();
            assert_eq!(chunks.num_chunks(), records.len() as u64);
            let mut dec = ChunkDecoder::new(spec.clone(), e).unwrap();
            let mut seq = PayloadDecoder::new(spec.clone(), e).unwrap();
            let expected: Vec<DecodedChunk> = records
                .iter()
                .map(|r| seq.decode_chunk(r).unwrap())
                .collect();
            // Backwards, so that no chunk follows the one before it.
            let mut out = Vec::new();
            for i in (0..chunks.num_chunks()).rev() {
                let r = chunks.chunk_range(i).unwrap();
                let record = chunks
                    .encode(i, &v[r.start as usize..r.end as usize])
                    .unwrap();
                assert_eq!(record, records[i as usize], "{codec:?} chunk {i}");
                let offset = dec.decode_into(i, &record, &mut out).unwrap();
                assert_eq!(offset, expected[i as usize].offset);
                assert_eq!(out, expected[i as usize].values, "{codec:?} chunk {i}");
            }
            // A record is refused at another chunk's place, and past the end.
            let n = chunks.num_chunks();
            assert!(matches!(
                dec.decode_into(1, &records[0], &mut out),
                Err(PayloadError::UnexpectedOffset { .. })
            ));
            assert!(matches!(
                dec.decode_into(n, &records[0], &mut out),
                Err(PayloadError::AlreadyComplete(24))
            ));
            assert!(matches!(
                chunks.encode(n, &v[..1]),
                Err(EncodeError::AlreadyComplete(24))
            ));
            assert!(matches!(
                chunks.encode(0, &v[..1]),
                Err(EncodeError::WrongChunkLength { .. })
            ));
            assert_eq!(chunks.chunk_range(u64::MAX), None);
        }
    }

    #[test]
    fn reused_scratch_still_refuses_a_body_longer_than_declared() {
        // After a full chunk the decoder's scratch holds 32 bytes; the last
        // chunk declares 12 but its body decompresses to 32.
        let spec = ModelSpec::new(vec![TensorSpec::f32("w", vec![11])]).unwrap();
        let e = enc(ValueCodec::F32, false);
        let model = FlatModel::new(spec.clone(), values(11)).unwrap();
        let (records, _) = encode_payload(&model, e, 0).unwrap();
        assert_eq!(records.len(), 2);
        let body = zstd::bulk::compress(&[0u8; 32], 3).unwrap();
        let h = ChunkHeader {
            codec_tag: 0,
            shuffle: false,
            offset: 8,
            count: 3,
            raw_len: 12,
            compressed_len: body.len() as u32,
        };
        let mut rec = h.to_bytes().to_vec();
        rec.extend_from_slice(&body);
        let mut d = PayloadDecoder::new(spec, e).unwrap().without_model_hash();
        let mut buf = Vec::new();
        d.decode_chunk_into(&records[0], &mut buf).unwrap();
        assert!(d.decode_chunk_into(&rec, &mut buf).is_err());
    }

    #[test]
    fn decompression_bomb_is_bounded() {
        // A body that decompresses to more than declared is refused.
        let spec = ModelSpec::new(vec![TensorSpec::f32("w", vec![4])]).unwrap();
        let e = enc(ValueCodec::F32, false);
        let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
        let h = ChunkHeader {
            codec_tag: 0,
            shuffle: false,
            offset: 0,
            count: 4,
            raw_len: 16,
            compressed_len: bomb.len() as u32,
        };
        let mut rec = h.to_bytes().to_vec();
        rec.extend_from_slice(&bomb);
        let mut d = PayloadDecoder::new(spec, e).unwrap();
        // either refused by the compressed bound or by decompression
        assert!(d.decode_chunk(&rec).is_err());
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let spec = ModelSpec::new(vec![TensorSpec::f32("w", vec![4096])]).unwrap();
        let e = Encoding::new(ValueCodec::Bf16, false, 1, 4096 * 4).unwrap();
        let mut x = 0x1234_5678u32;
        let v: Vec<f32> = (0..4096)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let f = f32::from_bits(x);
                if f.is_finite() && f.abs() < 1e38 {
                    f
                } else {
                    i as f32 + 0.5
                }
            })
            .collect();
        let model = FlatModel::new(spec.clone(), v.clone()).unwrap();
        let (records, _) = encode_payload(&model, e, 0).unwrap();
        let back = decode_payload(spec.clone(), e, records.iter().map(Vec::as_slice)).unwrap();
        for (a, b) in v.iter().zip(back.values()) {
            assert_eq!(
                half::bf16::from_f32(*a).to_f32().to_bits(),
                b.to_bits(),
                "{a}"
            );
        }
        let mut pe = PayloadEncoder::new(spec, e, 0).unwrap();
        let mut big = vec![0.0; 4096];
        big[9] = f32::MAX;
        assert!(matches!(
            pe.encode_chunk(&big),
            Err(EncodeError::OutOfRange { index: 9, .. })
        ));
    }

    #[test]
    fn topk_keeps_largest() {
        let spec = ModelSpec::new(vec![TensorSpec::f32("w", vec![8])]).unwrap();
        let e = enc(
            ValueCodec::TopK {
                per_million: 250_000,
            },
            true,
        );
        let v = vec![0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 0.05, 1.0];
        let model = FlatModel::new(spec.clone(), v).unwrap();
        let (records, _) = encode_payload(&model, e, 0).unwrap();
        let back = decode_payload(spec, e, records.iter().map(Vec::as_slice)).unwrap();
        assert_eq!(back.values(), &[0.0, -5.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]);
    }
}
