//! Length-prefixed frames for QUIC streams (sans-IO).
//!
//! Every frame is an 8-byte header followed by `len` body bytes:
//!
//! ```text
//! offset size field
//! 0      2    magic  b"FL"
//! 2      1    frame format version (FRAME_VERSION = 1)
//! 3      1    kind   (1 = message, 2 = payload chunk record)
//! 4      4    len    body length, u32 big-endian, <= MAX_FRAME_LEN
//! 8      len  body
//! ```
//!
//! A driver that owns a stream reads [`FRAME_HEADER_LEN`] bytes, calls
//! [`Frame::parse_header`] (which refuses an oversize length before anything
//! is allocated), then reads exactly `len` bytes. A driver that receives
//! arbitrary byte slices uses [`FrameDecoder`] instead: push bytes, pop
//! complete frames.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codec::{Codec, DecodeError};
use crate::message::Message;

/// Magic bytes that start every frame.
pub const FRAME_MAGIC: [u8; 2] = *b"FL";
/// Version of the frame format. A different version is refused.
pub const FRAME_VERSION: u8 = 1;
/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 8;
/// Largest frame body, in bytes (8 MiB). Large enough for any payload chunk
/// record (see [`crate::payload::MAX_CHUNK_RECORD_LEN`]).
pub const MAX_FRAME_LEN: usize = 8 * 1024 * 1024;

/// What a frame carries.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// A [`Message`], bincode-encoded.
    Message,
    /// One payload chunk record (model or delta values), see
    /// [`crate::payload`].
    Chunk,
}

impl FrameKind {
    /// Wire byte.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Message => 1,
            Self::Chunk => 2,
        }
    }

    /// From the wire byte.
    pub fn from_byte(b: u8) -> Result<Self, FrameError> {
        match b {
            1 => Ok(Self::Message),
            2 => Ok(Self::Chunk),
            other => Err(FrameError::UnknownKind(other)),
        }
    }
}

/// Why a frame was refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header does not start with [`FRAME_MAGIC`].
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 2]),
    /// The header carries a frame format version this build does not speak.
    #[error("unsupported frame version {0} (this build speaks {FRAME_VERSION})")]
    UnsupportedVersion(u8),
    /// Unknown frame kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The declared (or requested) body length is above the limit.
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared length.
        len: u64,
        /// The limit in force.
        max: usize,
    },
    /// A message frame was expected but another kind arrived (or the reverse).
    #[error("expected a {expected:?} frame, got {found:?}")]
    UnexpectedKind {
        /// Kind expected.
        expected: FrameKind,
        /// Kind received.
        found: FrameKind,
    },
    /// The body of a message frame is not a valid message.
    #[error("bad message in frame: {0}")]
    Message(#[from] DecodeError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({0} bytes buffered)")]
    TruncatedStream(usize),
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the body is.
    pub kind: FrameKind,
    /// Body length in bytes (≤ [`MAX_FRAME_LEN`]).
    pub len: u32,
}

impl FrameHeader {
    /// A header for a body of `len` bytes; refuses bodies over the limit.
    pub fn new(kind: FrameKind, len: usize) -> Result<Self, FrameError> {
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: MAX_FRAME_LEN,
            });
        }
        Ok(Self {
            kind,
            len: len as u32,
        })
    }

    /// Parse and validate a header (magic, version, kind, length limit).
    pub fn parse(bytes: &[u8; FRAME_HEADER_LEN]) -> Result<Self, FrameError> {
        Self::parse_with_max(bytes, MAX_FRAME_LEN)
    }

    fn parse_with_max(bytes: &[u8; FRAME_HEADER_LEN], max: usize) -> Result<Self, FrameError> {
        let magic = [bytes[0], bytes[1]];
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if bytes[2] != FRAME_VERSION {
            return Err(FrameError::UnsupportedVersion(bytes[2]));
        }
        let kind = FrameKind::from_byte(bytes[3])?;
        let len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if len as usize > max {
            return Err(FrameError::TooLarge {
                len: u64::from(len),
                max,
            });
        }
        Ok(Self { kind, len })
    }

    /// The 8 header bytes.
    pub fn to_bytes(&self) -> [u8; FRAME_HEADER_LEN] {
        let l = self.len.to_be_bytes();
        [
            FRAME_MAGIC[0],
            FRAME_MAGIC[1],
            FRAME_VERSION,
            self.kind.to_byte(),
            l[0],
            l[1],
            l[2],
            l[3],
        ]
    }

    /// Body length as `usize`.
    pub fn body_len(&self) -> usize {
        self.len as usize
    }
}

/// One complete frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What the body is.
    pub kind: FrameKind,
    /// The body (≤ [`MAX_FRAME_LEN`] bytes).
    pub body: Bytes,
}

impl Frame {
    /// Length of a frame header: what a driver reads first.
    pub const fn header_len() -> usize {
        FRAME_HEADER_LEN
    }

    /// Validate a header read off a stream; on success the header says how
    /// many body bytes to read next ([`FrameHeader::body_len`]).
    pub fn parse_header(header: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, FrameError> {
        FrameHeader::parse(header)
    }

    /// Body length declared by a header (validated, see [`Frame::parse_header`]).
    pub fn parse_len(header: &[u8; FRAME_HEADER_LEN]) -> Result<usize, FrameError> {
        Ok(FrameHeader::parse(header)?.body_len())
    }

    /// A frame carrying a message.
    pub fn message(msg: &Message) -> Result<Self, FrameError> {
        let body = msg.to_vec();
        FrameHeader::new(FrameKind::Message, body.len())?;
        Ok(Self {
            kind: FrameKind::Message,
            body: body.into(),
        })
    }

    /// A frame carrying one payload chunk record.
    pub fn chunk(record: impl Into<Bytes>) -> Result<Self, FrameError> {
        let body = record.into();
        FrameHeader::new(FrameKind::Chunk, body.len())?;
        Ok(Self {
            kind: FrameKind::Chunk,
            body,
        })
    }

    /// Assemble a frame from a validated header and its body.
    pub fn from_parts(header: FrameHeader, body: Bytes) -> Result<Self, FrameError> {
        if body.len() != header.body_len() {
            return Err(FrameError::TruncatedStream(body.len()));
        }
        Ok(Self {
            kind: header.kind,
            body,
        })
    }

    /// The header of this frame.
    pub fn header(&self) -> FrameHeader {
        FrameHeader {
            kind: self.kind,
            // Bodies are bounded by MAX_FRAME_LEN at construction.
            len: self.body.len() as u32,
        }
    }

    /// Append header and body to `out`.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_slice(&self.header().to_bytes());
        out.put_slice(&self.body);
    }

    /// Header and body as one vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(FRAME_HEADER_LEN + self.body.len());
        self.encode(&mut v);
        v
    }

    /// Decode the body of a message frame.
    pub fn into_message(self) -> Result<Message, FrameError> {
        if self.kind != FrameKind::Message {
            return Err(FrameError::UnexpectedKind {
                expected: FrameKind::Message,
                found: self.kind,
            });
        }
        Ok(Message::decode_exact(&self.body)?)
    }

    /// The body of a chunk frame (a payload chunk record).
    pub fn into_chunk(self) -> Result<Bytes, FrameError> {
        if self.kind != FrameKind::Chunk {
            return Err(FrameError::UnexpectedKind {
                expected: FrameKind::Chunk,
                found: self.kind,
            });
        }
        Ok(self.body)
    }
}

/// Write one frame (header + body) to `out`.
pub fn encode_frame(kind: FrameKind, body: &[u8], out: &mut impl BufMut) -> Result<(), FrameError> {
    let h = FrameHeader::new(kind, body.len())?;
    out.put_slice(&h.to_bytes());
    out.put_slice(body);
    Ok(())
}

/// Write a message as one frame to `out`.
pub fn encode_message_frame(msg: &Message, out: &mut impl BufMut) -> Result<(), FrameError> {
    encode_frame(FrameKind::Message, &msg.to_vec(), out)
}

/// Incremental frame decoder: push bytes as they arrive, pop complete frames.
///
/// The decoder validates every header against the limit before it waits for
/// the body, and never reserves memory on the strength of a declared length:
/// it buffers what was pushed, nothing more. Call
/// [`FrameDecoder::pop`] until it returns `Ok(None)` after each push. After
/// an error the decoder is poisoned and returns the same error again: the
/// stream must be dropped.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_len: usize,
    error: Option<FrameError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder with the protocol limit [`MAX_FRAME_LEN`].
    pub fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            max_len: MAX_FRAME_LEN,
            error: None,
        }
    }

    /// A decoder with a smaller body limit (clamped to [`MAX_FRAME_LEN`]),
    /// e.g. for a control stream that only carries small messages.
    pub fn with_max_len(max_len: usize) -> Self {
        Self {
            max_len: max_len.min(MAX_FRAME_LEN),
            ..Self::new()
        }
    }

    /// Append received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn pop(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let Some(head) = self.buf.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let mut hb = [0u8; FRAME_HEADER_LEN];
        hb.copy_from_slice(head);
        let header = match FrameHeader::parse_with_max(&hb, self.max_len) {
            Ok(h) => h,
            Err(e) => {
                self.error = Some(e.clone());
                return Err(e);
            }
        };
        let total = FRAME_HEADER_LEN + header.body_len();
        if self.buf.len() < total {
            // Nothing is reserved on the strength of a header alone: the
            // buffer only grows with bytes actually received.
            return Ok(None);
        }
        self.buf.advance(FRAME_HEADER_LEN);
        let body = self.buf.split_to(header.body_len()).freeze();
        Ok(Some(Frame {
            kind: header.kind,
            body,
        }))
    }

    /// Signal the end of the stream: an error if a partial frame is buffered.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::TruncatedStream(self.buf.len()))
        }
    }
}

impl Codec for FrameHeader {
    fn encode(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.to_bytes());
    }

    fn decode(buf: &mut impl Buf) -> Result<Self, DecodeError> {
        if buf.remaining() < FRAME_HEADER_LEN {
            return Err(DecodeError::Truncated);
        }
        let mut hb = [0u8; FRAME_HEADER_LEN];
        buf.copy_to_slice(&mut hb);
        Self::parse(&hb).map_err(|e| DecodeError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Heartbeat;

    fn hb(seq: u64) -> Message {
        Message::Heartbeat(Heartbeat {
            seq,
            now_unix_ms: 1_700_000_000_000 + seq,
        })
    }

    #[test]
    fn frames_roundtrip_byte_by_byte() {
        let mut wire = Vec::new();
        for i in 0..3 {
            encode_message_frame(&hb(i), &mut wire).unwrap();
        }
        encode_frame(FrameKind::Chunk, &[1, 2, 3], &mut wire).unwrap();
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        for b in &wire {
            dec.push(std::slice::from_ref(b));
            while let Some(f) = dec.pop().unwrap() {
                out.push(f);
            }
        }
        dec.finish().unwrap();
        assert_eq!(out.len(), 4);
        for (i, f) in out[..3].iter().enumerate() {
            assert_eq!(f.clone().into_message().unwrap(), hb(i as u64));
        }
        assert_eq!(out[3].clone().into_chunk().unwrap().as_ref(), &[1, 2, 3]);
        assert!(matches!(
            out[3].clone().into_message(),
            Err(FrameError::UnexpectedKind { .. })
        ));
    }

    #[test]
    fn oversize_prefix_is_refused_before_allocating() {
        let mut h = FrameHeader::new(FrameKind::Chunk, 0).unwrap().to_bytes();
        h[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Frame::parse_len(&h),
            Err(FrameError::TooLarge { .. })
        ));
        let mut dec = FrameDecoder::new();
        dec.push(&h);
        assert!(matches!(dec.pop(), Err(FrameError::TooLarge { .. })));
        assert!(dec.buf.capacity() < 1024);
        // poisoned
        assert!(dec.pop().is_err());
        // A valid header announcing the largest body reserves nothing either.
        let mut dec = FrameDecoder::new();
        dec.push(
            &FrameHeader::new(FrameKind::Chunk, MAX_FRAME_LEN)
                .unwrap()
                .to_bytes(),
        );
        assert_eq!(dec.pop(), Ok(None));
        assert!(dec.buf.capacity() < 1024);
        let mut small = FrameDecoder::with_max_len(16);
        encode_frame(FrameKind::Chunk, &[0; 17], &mut Vec::new()).unwrap();
        let mut w = Vec::new();
        encode_frame(FrameKind::Chunk, &[0; 17], &mut w).unwrap();
        small.push(&w);
        assert!(matches!(small.pop(), Err(FrameError::TooLarge { .. })));
        assert!(matches!(
            FrameHeader::new(FrameKind::Chunk, MAX_FRAME_LEN + 1),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_headers() {
        let good = FrameHeader::new(FrameKind::Message, 4).unwrap().to_bytes();
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            FrameHeader::parse(&b),
            Err(FrameError::BadMagic(_))
        ));
        let mut b = good;
        b[2] = 2;
        assert_eq!(
            FrameHeader::parse(&b),
            Err(FrameError::UnsupportedVersion(2))
        );
        let mut b = good;
        b[3] = 9;
        assert_eq!(FrameHeader::parse(&b), Err(FrameError::UnknownKind(9)));
        let mut dec = FrameDecoder::new();
        dec.push(&good[..5]);
        assert_eq!(dec.pop(), Ok(None));
        assert_eq!(dec.finish(), Err(FrameError::TruncatedStream(5)));
        assert_eq!(
            FrameHeader::decode_exact(&good).unwrap(),
            FrameHeader::parse(&good).unwrap()
        );
    }
}
