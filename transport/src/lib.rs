//! fedlink transport: the thin async layer between the pure
//! [`fedlink_protocol`] and QUIC.
//!
//! It does three things and nothing else:
//! - builds quinn endpoints from the rustls configs of [`fedlink_certs`]
//!   (mutual TLS 1.3, federation CA only — there is no plaintext mode);
//! - reads and writes protocol [`Frame`]s on QUIC streams, refusing an
//!   oversize length prefix *before* allocating the body;
//! - tells who is on the other end of a connection ([`peer_identity`],
//!   [`negotiated_alpn`]), and why this side closed it ([`ServerConn`]).
//!
//! It does not decide anything: what a message means, whether an update
//! counts, when a round closes — that lives in the coordinator's and the
//! agent's sans-IO cores.
//!
//! ```text
//!  Message / chunk record ──encode──▶ Frame ──▶ FramedSend ──▶ quinn SendStream
//!  quinn RecvStream ──▶ FramedRecv (header, bounded body) ──▶ Frame ──▶ Message / chunk
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedlink_certs::Identity;
use fedlink_protocol::{FRAME_HEADER_LEN, Frame, FrameError, FrameHeader, FrameKind, Message};
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};

mod closing;
mod conn;
pub mod tcp;
pub use closing::{CloseReason, ServerConn};
pub use conn::{Conn, TransportKind};

/// Application close codes fedlink uses on QUIC connections.
pub mod close {
    use quinn::VarInt;

    /// Normal end (bye, shutdown).
    pub const NORMAL: VarInt = VarInt::from_u32(0);
    /// The peer broke the protocol (bad frame, unexpected message).
    pub const PROTOCOL: VarInt = VarInt::from_u32(0x400);
    /// The identity is not allowed here (wrong role for the ALPN, unknown or
    /// revoked site).
    pub const FORBIDDEN: VarInt = VarInt::from_u32(0x403);
    /// A newer connection of the same site replaced this one.
    pub const REPLACED: VarInt = VarInt::from_u32(0x409);
    /// The coordinator is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0x503);
}

/// Why a transport operation failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The connection is gone (closed by the peer, refused by TLS, timed out).
    #[error("connection lost: {0}")]
    Connection(#[from] ConnectionError),
    /// The peer sent bytes that are not a valid frame or message.
    #[error("peer sent a bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// The stream ended where a message was required.
    #[error("stream ended before the expected {0}")]
    UnexpectedEnd(&'static str),
    /// A message arrived where a chunk was expected, or the reverse.
    #[error("unexpected frame: expected {expected}, got {got}")]
    UnexpectedFrame {
        /// What was expected.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// Any other stream error (reset by the peer, stopped, 0-RTT refused).
    #[error("stream error: {0}")]
    Stream(String),
    /// Local configuration error (TLS config unusable by QUIC, bind failed).
    #[error("transport configuration: {0}")]
    Config(String),
    /// The peer's certificate carries no valid fedlink identity.
    #[error("peer identity: {0}")]
    Identity(#[from] fedlink_certs::IdentityError),
    /// Local I/O error (binding a socket).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS-over-TCP connection is gone (refused by TLS, closed, reset).
    #[error("connection lost (TLS over TCP): {0}")]
    TcpConnection(String),
    /// A frame that had started did not arrive whole in time (a peer
    /// trickling bytes to hold the stream).
    #[error("a frame did not arrive whole within {0:?} of its first byte")]
    SlowFrame(Duration),
}

impl TransportError {
    /// Whether the error means the connection is closed (as opposed to one
    /// stream going wrong).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, Self::Connection(_) | Self::TcpConnection(_))
    }
}

fn read_err(e: quinn::ReadError) -> TransportError {
    match e {
        quinn::ReadError::ConnectionLost(c) => TransportError::Connection(c),
        other => TransportError::Stream(other.to_string()),
    }
}

fn write_err(e: quinn::WriteError) -> TransportError {
    match e {
        quinn::WriteError::ConnectionLost(c) => TransportError::Connection(c),
        other => TransportError::Stream(other.to_string()),
    }
}

/// A connection receive window to set once a stream has been read up to a
/// given byte count (see [`FramedRecv::set_window_at`]).
struct WindowTrigger {
    conn: Connection,
    at: u64,
    window: VarInt,
}

impl std::fmt::Debug for WindowTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowTrigger")
            .field("at", &self.at)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// First step of a frame body read, bytes.
const FIRST_BODY_STEP: usize = 64 * 1024;

/// How many more bytes of a `declared`-byte frame body to make room for,
/// `filled` being already read: 64 KiB first, then as much again as has
/// arrived (so at most twice what the peer really sent is ever allocated),
/// never past `declared`.
fn next_read_len(filled: usize, declared: usize) -> usize {
    FIRST_BODY_STEP
        .max(filled)
        .min(declared.saturating_sub(filled))
}

/// The receiving half of a stream, QUIC or TCP.
#[derive(Debug)]
enum RecvInner {
    Quic(RecvStream),
    Tcp(tcp::RecvHalf, tcp::Closed),
}

impl RecvInner {
    /// Read into `buf` (never empty): `Ok(None)` at the end of the stream.
    async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, TransportError> {
        match self {
            Self::Quic(r) => r.read(buf).await.map_err(read_err),
            Self::Tcp(r, closed) => {
                use tokio::io::AsyncReadExt;
                // A yamux stream is not always woken when its connection
                // dies (a failed close): the connection's end ends the read.
                // Data already readable is read first.
                let read = tokio::select! {
                    biased;
                    read = r.read(buf) => read,
                    why = closed.ended() => return Err(TransportError::TcpConnection(why)),
                };
                match read {
                    Ok(0) if !buf.is_empty() => Ok(None),
                    Ok(n) => Ok(Some(n)),
                    Err(e) => Err(closed.explain(e).await),
                }
            }
        }
    }
}

/// The sending half of a stream, QUIC or TCP.
#[derive(Debug)]
enum SendInner {
    Quic(SendStream),
    /// `None` once finished.
    Tcp(Option<tcp::SendHalf>, tcp::Closed),
}

impl SendInner {
    async fn write_all(&mut self, buf: &[u8]) -> Result<(), TransportError> {
        match self {
            Self::Quic(s) => s.write_all(buf).await.map_err(write_err),
            Self::Tcp(s, closed) => {
                use tokio::io::AsyncWriteExt;
                let s = s
                    .as_mut()
                    .ok_or(TransportError::Stream("write on a finished stream".into()))?;
                let written = tokio::select! {
                    biased;
                    w = s.write_all(buf) => w,
                    why = closed.ended() => return Err(TransportError::TcpConnection(why)),
                };
                match written {
                    Ok(()) => Ok(()),
                    Err(e) => Err(closed.explain(e).await),
                }
            }
        }
    }

    async fn write_chunk(&mut self, piece: Bytes) -> Result<(), TransportError> {
        match self {
            Self::Quic(s) => s.write_chunk(piece).await.map_err(write_err),
            Self::Tcp(..) => self.write_all(&piece).await,
        }
    }
}

/// The receiving half of a framed stream (QUIC, or a multiplexed stream of
/// a TLS-over-TCP connection: see [`tcp`]).
#[derive(Debug)]
pub struct FramedRecv {
    inner: RecvInner,
    bytes_read: u64,
    trigger: Option<WindowTrigger>,
    frame_timeout: Option<Duration>,
}

impl FramedRecv {
    /// Wrap a quinn receive stream.
    pub fn new(inner: RecvStream) -> Self {
        Self::with(RecvInner::Quic(inner))
    }

    fn with(inner: RecvInner) -> Self {
        Self {
            inner,
            bytes_read: 0,
            trigger: None,
            frame_timeout: None,
        }
    }

    /// From now on, a frame must arrive whole within `timeout` of its first
    /// byte (the wait *for* a first byte is not bounded: a control stream
    /// idles between messages). A peer that trickles a frame a byte at a
    /// time to hold the stream gets [`TransportError::SlowFrame`].
    pub fn set_frame_timeout(&mut self, timeout: Duration) {
        self.frame_timeout = Some(timeout);
    }

    /// Bytes read so far (frame headers included).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Set `conn`'s connection-level receive window to `window` as soon as
    /// this stream has been read up to `at` bytes (at once if it already
    /// has). Reads stop exactly at `at`, so no more than that has been
    /// consumed when the window changes. Replaces an earlier trigger.
    pub fn set_window_at(&mut self, conn: &Connection, at: u64, window: VarInt) {
        self.trigger = Some(WindowTrigger {
            conn: conn.clone(),
            at,
            window,
        });
        self.fire_trigger();
    }

    fn fire_trigger(&mut self) {
        if let Some(t) = self.trigger.take_if(|t| self.bytes_read >= t.at) {
            t.conn.set_receive_window(t.window);
        }
    }

    /// Fill `buf` completely. `Ok(false)` if the stream ended before the
    /// first byte (a clean end at a frame boundary), an error if it ended
    /// later.
    async fn read_full(&mut self, buf: &mut [u8]) -> Result<bool, TransportError> {
        let mut filled = 0;
        while filled < buf.len() {
            let mut end = buf.len();
            if let Some(t) = &self.trigger {
                // Stop at the trigger point so the window changes exactly there.
                let to_trigger = t.at.saturating_sub(self.bytes_read);
                end = end.min(filled.saturating_add(usize::try_from(to_trigger).unwrap_or(end)));
            }
            let slice = buf.get_mut(filled..end).unwrap_or_default();
            match self.inner.read(slice).await? {
                Some(n) => {
                    filled += n;
                    self.bytes_read = self.bytes_read.saturating_add(n as u64);
                    self.fire_trigger();
                }
                None if filled == 0 => return Ok(false),
                None => return Err(TransportError::Truncated),
            }
        }
        Ok(true)
    }

    /// The next frame, or `None` if the peer finished the stream cleanly at a
    /// frame boundary. The header is checked (magic, version, kind, length ≤
    /// [`fedlink_protocol::MAX_FRAME_LEN`]) before the body is allocated.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, TransportError> {
        let mut body = Vec::new();
        let Some(header) = self.next_frame_into(&mut body).await? else {
            return Ok(None);
        };
        Ok(Some(Frame::from_parts(header, Bytes::from(body))?))
    }

    /// Like [`FramedRecv::next_frame`], with the body read into `body`
    /// (cleared first; its capacity is reused, so a caller that keeps one
    /// buffer for many frames allocates nothing per frame). Returns the
    /// frame's header, or `None` at a clean end of stream.
    pub async fn next_frame_into(
        &mut self,
        body: &mut Vec<u8>,
    ) -> Result<Option<FrameHeader>, TransportError> {
        let mut header = [0u8; FRAME_HEADER_LEN];
        let Some(timeout) = self.frame_timeout else {
            if !self.read_full(&mut header).await? {
                return Ok(None);
            }
            return self.frame_after(&header, body).await.map(Some);
        };
        // The first byte may take as long as it takes; the rest of the frame
        // must follow within the timeout.
        if !self.read_full(&mut header[..1]).await? {
            return Ok(None);
        }
        let whole = async {
            if !self.read_full(&mut header[1..]).await? {
                return Err(TransportError::Truncated);
            }
            self.frame_after(&header, body).await
        };
        tokio::time::timeout(timeout, whole)
            .await
            .map_err(|_| TransportError::SlowFrame(timeout))?
            .map(Some)
    }

    /// Read the body of the frame whose header is `header` into `body`;
    /// returns the checked header.
    async fn frame_after(
        &mut self,
        header: &[u8; FRAME_HEADER_LEN],
        body: &mut Vec<u8>,
    ) -> Result<FrameHeader, TransportError> {
        let header = Frame::parse_header(header)?;
        // The declared length is the peer's word: memory grows with the
        // bytes that actually arrive (doubling from 64 KiB), so a header
        // announcing 8 MiB followed by silence costs 64 KiB (or the
        // capacity `body` already had), not 8 MiB. Bytes `body` already
        // holds (a reused buffer's previous frame) are read over as they
        // are, not zeroed first: a stream of 2 MiB records reused one
        // buffer and still cleared 2 MiB per record.
        let len = header.body_len();
        body.truncate(len);
        let mut filled = 0;
        while filled < len {
            if filled == body.len() {
                body.resize(filled + next_read_len(filled, len), 0);
            }
            let end = body.len();
            let got = self
                .read_full(body.get_mut(filled..end).unwrap_or_default())
                .await?;
            if !got {
                return Err(TransportError::Truncated);
            }
            filled = end;
        }
        Ok(header)
    }

    /// The error for a stream that ended where `what` was required: over
    /// TCP, when the connection itself ended (a TLS alert, a reset), its
    /// reason — a yamux stream ends quietly when its connection dies.
    async fn unexpected_end(&self, what: &'static str) -> TransportError {
        match &self.inner {
            RecvInner::Tcp(_, closed) => closed.explain_end(what).await,
            RecvInner::Quic(_) => TransportError::UnexpectedEnd(what),
        }
    }

    /// The next frame, which must be a message.
    pub async fn message(&mut self) -> Result<Message, TransportError> {
        match self.next_frame().await? {
            Some(frame) if frame.kind == FrameKind::Message => Ok(frame.into_message()?),
            Some(_) => Err(TransportError::UnexpectedFrame {
                expected: "message",
                got: "chunk",
            }),
            None => Err(self.unexpected_end("message").await),
        }
    }

    /// The next message, or `None` at a clean end of stream.
    pub async fn message_or_end(&mut self) -> Result<Option<Message>, TransportError> {
        match self.next_frame().await? {
            Some(frame) if frame.kind == FrameKind::Message => Ok(Some(frame.into_message()?)),
            Some(_) => Err(TransportError::UnexpectedFrame {
                expected: "message",
                got: "chunk",
            }),
            None => Ok(None),
        }
    }

    /// The next frame, which must be a payload chunk record.
    pub async fn chunk(&mut self) -> Result<Bytes, TransportError> {
        match self.next_frame().await? {
            Some(frame) if frame.kind == FrameKind::Chunk => Ok(frame.into_chunk()?),
            Some(_) => Err(TransportError::UnexpectedFrame {
                expected: "chunk",
                got: "message",
            }),
            None => Err(self.unexpected_end("chunk").await),
        }
    }

    /// Like [`FramedRecv::chunk`], with the record read into `record`
    /// (cleared first, its capacity reused: see
    /// [`FramedRecv::next_frame_into`]).
    pub async fn chunk_into(&mut self, record: &mut Vec<u8>) -> Result<(), TransportError> {
        match self.next_frame_into(record).await? {
            Some(h) if h.kind == FrameKind::Chunk => Ok(()),
            Some(_) => Err(TransportError::UnexpectedFrame {
                expected: "chunk",
                got: "message",
            }),
            None => Err(self.unexpected_end("chunk").await),
        }
    }

    /// Tell the peer to stop sending on this stream (QUIC: `STOP_SENDING`
    /// with `code`; TCP: the stream is dropped, which resets it — yamux
    /// carries no codes).
    pub fn stop(self, code: VarInt) {
        if let RecvInner::Quic(mut r) = self.inner {
            let _ = r.stop(code);
        }
    }
}

/// The sending half of a framed stream (QUIC, or a multiplexed stream of a
/// TLS-over-TCP connection: see [`tcp`]).
#[derive(Debug)]
pub struct FramedSend {
    inner: SendInner,
    bytes_written: u64,
    /// Body bytes still owed by a chunk frame begun with
    /// [`FramedSend::begin_chunk`].
    body_left: usize,
}

impl FramedSend {
    /// Wrap a quinn send stream.
    pub fn new(inner: SendStream) -> Self {
        Self::with(SendInner::Quic(inner))
    }

    fn with(inner: SendInner) -> Self {
        Self {
            inner,
            bytes_written: 0,
            body_left: 0,
        }
    }

    /// Bytes written so far (frame headers included).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    fn check_no_open_chunk(&self) -> Result<(), TransportError> {
        if self.body_left == 0 {
            Ok(())
        } else {
            Err(TransportError::Stream(format!(
                "a chunk frame still owes {} body bytes",
                self.body_left
            )))
        }
    }

    async fn frame(&mut self, frame: &Frame) -> Result<(), TransportError> {
        self.check_no_open_chunk()?;
        let header = frame.header().to_bytes();
        self.inner.write_all(&header).await?;
        self.inner.write_all(&frame.body).await?;
        self.bytes_written = self
            .bytes_written
            .saturating_add((header.len() + frame.body.len()) as u64);
        Ok(())
    }

    /// Send one message.
    pub async fn message(&mut self, msg: &Message) -> Result<(), TransportError> {
        self.frame(&Frame::message(msg)?).await
    }

    /// Send one payload chunk record.
    pub async fn chunk(&mut self, record: impl Into<Bytes>) -> Result<(), TransportError> {
        self.frame(&Frame::chunk(record)?).await
    }

    /// Begin a payload chunk record of `len` bytes whose body is then
    /// written in pieces with [`FramedSend::chunk_body`], so a large record
    /// never has to be held whole (the peer sees the same frame as from
    /// [`FramedSend::chunk`]). Until all `len` bytes are written, any other
    /// frame and [`FramedSend::finish`] are refused.
    pub async fn begin_chunk(&mut self, len: usize) -> Result<(), TransportError> {
        self.check_no_open_chunk()?;
        let header = FrameHeader::new(FrameKind::Chunk, len)?.to_bytes();
        self.inner.write_all(&header).await?;
        self.bytes_written = self.bytes_written.saturating_add(header.len() as u64);
        self.body_left = len;
        Ok(())
    }

    /// Write the next piece of the body of the chunk record begun with
    /// [`FramedSend::begin_chunk`]; refuses more bytes than it declared.
    /// The piece is handed to QUIC without a copy and freed once the peer
    /// has acknowledged it.
    pub async fn chunk_body(&mut self, piece: Bytes) -> Result<(), TransportError> {
        let len = piece.len();
        if len > self.body_left {
            return Err(TransportError::Stream(format!(
                "{len} body bytes written where the chunk frame has {} left",
                self.body_left
            )));
        }
        self.inner.write_chunk(piece).await?;
        self.body_left -= len;
        self.bytes_written = self.bytes_written.saturating_add(len as u64);
        Ok(())
    }

    /// Finish the stream (the peer sees a clean end after the last frame).
    /// On TCP the end is sent by a task of its own, after everything
    /// written before it.
    pub fn finish(&mut self) -> Result<(), TransportError> {
        self.check_no_open_chunk()?;
        match &mut self.inner {
            SendInner::Quic(s) => s
                .finish()
                .map_err(|e| TransportError::Stream(e.to_string())),
            SendInner::Tcp(s, _) => match s.take() {
                Some(half) => tcp::finish(half),
                None => Ok(()),
            },
        }
    }

    /// End the stream even inside a chunk frame begun with
    /// [`FramedSend::begin_chunk`]: everything written is delivered, then
    /// the peer's read ends in the middle of the frame — what a sender cut
    /// off mid-record leaves behind (for tools and tests that simulate it).
    pub fn finish_cut(&mut self) -> Result<(), TransportError> {
        self.body_left = 0;
        self.finish()
    }

    /// Abandon the stream: the peer sees a reset, never a clean end (QUIC:
    /// `RESET_STREAM` with `code`; TCP: the yamux stream is reset, without
    /// a code).
    pub fn reset(self, code: VarInt) {
        if let SendInner::Quic(mut s) = self.inner {
            let _ = s.reset(code);
        }
    }

    /// After [`FramedSend::finish`]: wait until the peer has read the end of
    /// the stream or stopped it (QUIC), or until the end has been handed to
    /// the connection (TCP).
    pub async fn stopped(self) {
        if let SendInner::Quic(s) = self.inner {
            let _ = s.stopped().await;
        }
    }
}

/// Open a bidirectional framed stream.
pub async fn open_bi(conn: &Connection) -> Result<(FramedSend, FramedRecv), TransportError> {
    let (send, recv) = conn.open_bi().await?;
    Ok((FramedSend::new(send), FramedRecv::new(recv)))
}

/// Accept a bidirectional framed stream.
pub async fn accept_bi(conn: &Connection) -> Result<(FramedSend, FramedRecv), TransportError> {
    let (send, recv) = conn.accept_bi().await?;
    Ok((FramedSend::new(send), FramedRecv::new(recv)))
}

/// QUIC congestion controller of the data a side sends (the coordinator's
/// downloads, a site's uploads).
///
/// `Cubic` (quinn's default, loss-based) is the conservative choice; on a
/// lossy long-distance link its throughput falls with loss as any
/// loss-based controller's does (≈ MSS/RTT·1.2/√p: about 0.5 MB/s at 40 ms
/// RTT and 0.5 % loss). `Bbr` models the path's bandwidth and RTT instead of
/// backing off on every loss; quinn marks its BBR experimental — see
/// docs/PERFORMANCE.md for what it did here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default.
    #[default]
    Cubic,
    /// BBR (quinn's experimental implementation, after Google's quiche).
    Bbr,
}

/// [`transport_config`] with the congestion controller `cc`.
pub fn transport_config_with(
    idle_timeout: Duration,
    cc: Congestion,
) -> Result<quinn::TransportConfig, TransportError> {
    let mut t = transport_config(idle_timeout)?;
    if cc == Congestion::Bbr {
        t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    Ok(t)
}

/// QUIC transport settings shared by both ends: keep-alives well inside the
/// idle timeout so a quiet but healthy connection stays up, and a dead peer
/// is noticed within `idle_timeout`.
pub fn transport_config(idle_timeout: Duration) -> Result<quinn::TransportConfig, TransportError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(idle_timeout)
        .map_err(|e| TransportError::Config(format!("idle timeout: {e}")))?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(Some(idle_timeout / 3));
    // Sites open a few streams each (control, model fetch, upload).
    t.max_concurrent_bidi_streams(VarInt::from_u32(16));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    Ok(t)
}

/// Smallest window an upload being read is given, bytes (what a LAN or
/// loopback connection gets: ≈ 25 MB/s per upload at 20 ms RTT).
pub const SERVER_STREAM_WINDOW: u32 = 512 * 1024;

/// Largest window an upload being read is given, bytes, and the
/// coordinator's per-stream receive window (the connection window, set per
/// upload, is what actually limits). What an upload gets beyond
/// [`SERVER_STREAM_WINDOW`] comes from the window budget ([`WindowShare`]).
pub const MAX_UPLOAD_WINDOW: u32 = 8 * 1024 * 1024;

/// Largest send window a model download is given, bytes (see
/// [`download_window`]); beyond [`SERVER_SEND_WINDOW`] it comes from the
/// window budget ([`WindowShare`]).
pub const MAX_DOWNLOAD_WINDOW: u64 = 4 * 1024 * 1024;

/// The rate a window is sized for, bytes per second: a hospital's gigabit
/// link.
pub const WINDOW_TARGET_RATE: u64 = 125_000_000;

/// Credit beyond the LAN floors ([`SERVER_STREAM_WINDOW`] per upload,
/// [`SERVER_SEND_WINDOW`] per download) that the transfers of this process
/// share when several run at once, bytes: many sites at once share this,
/// so the coordinator's memory stays within its budget whatever the number
/// of sites.
pub const WINDOW_BUDGET: u64 = 2 * 1024 * 1024;

/// Credit beyond its LAN floor that a transfer may take when it starts
/// while no other transfer holds or asked for any, bytes: a lone upload on
/// a long lossy path needs some four times the path's bandwidth-delay
/// product to keep the link busy while a loss is repaired (a 16 MB upload
/// at RTT 40 ms, 0.5 % loss, 200 Mbit/s: 68 % of the link with a 3 MiB
/// window, 74 % with 4 MiB, 79 % with 5 MiB; docs/PERFORMANCE.md). Transfers
/// that start while it runs get only what is left of [`WINDOW_BUDGET`], so
/// the extra credit of the whole process is never above this.
pub const LONE_TRANSFER_BUDGET: u64 = 6 * 1024 * 1024;

/// The process's window budget: credit taken beyond the floors, and how
/// many transfers hold a share.
#[derive(Debug, Default)]
pub struct WindowBudget {
    state: std::sync::Mutex<BudgetState>,
}

#[derive(Debug, Default)]
struct BudgetState {
    in_use: u64,
    holders: u64,
}

/// The budget of this process's transfers.
static WINDOW_BUDGET_IN_USE: WindowBudget = WindowBudget {
    state: std::sync::Mutex::new(BudgetState {
        in_use: 0,
        holders: 0,
    }),
};

impl WindowBudget {
    /// Take up to `wanted` bytes: up to [`LONE_TRANSFER_BUDGET`] if no other
    /// transfer holds a share, else what is left of [`WINDOW_BUDGET`].
    pub fn take(&'static self, wanted: u64) -> WindowShare {
        if wanted == 0 {
            return WindowShare::none();
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let limit = if st.holders == 0 {
            LONE_TRANSFER_BUDGET
        } else {
            WINDOW_BUDGET
        };
        let got = wanted.min(limit.saturating_sub(st.in_use));
        st.in_use = st.in_use.saturating_add(got);
        st.holders = st.holders.saturating_add(1);
        WindowShare {
            bytes: got,
            from: Some(self),
        }
    }

    /// Credit held by all shares now, bytes.
    pub fn in_use(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).in_use
    }

    fn give_back(&self, bytes: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.in_use = st.in_use.saturating_sub(bytes);
        st.holders = st.holders.saturating_sub(1);
    }
}

/// A share of the window budget held by one transfer; given back when
/// dropped.
#[derive(Debug)]
#[must_use = "the share is given back when dropped"]
pub struct WindowShare {
    bytes: u64,
    from: Option<&'static WindowBudget>,
}

impl WindowShare {
    /// Take up to `wanted` bytes from this process's budget (see
    /// [`WindowBudget::take`]).
    pub fn take(wanted: u64) -> Self {
        WINDOW_BUDGET_IN_USE.take(wanted)
    }

    /// No share (a transfer that needs none: TCP, or a LAN path).
    pub fn none() -> Self {
        Self {
            bytes: 0,
            from: None,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for WindowShare {
    fn drop(&mut self) {
        if let Some(budget) = self.from {
            budget.give_back(self.bytes);
        }
    }
}

/// A flow-control window for a transfer over a path of round-trip time
/// `rtt`: twice the bandwidth-delay product at [`WINDOW_TARGET_RATE`] (the
/// second half keeps the pipe full while losses are recovered), within
/// `[min, max]`. On a LAN this is `min`; at 40 ms it is 10 MB before the cap.
pub fn bdp_window(rtt: Duration, min: u64, max: u64) -> u64 {
    let bdp = u128::from(WINDOW_TARGET_RATE).saturating_mul(rtt.as_micros()) / 1_000_000;
    let w = u64::try_from(bdp.saturating_mul(2)).unwrap_or(u64::MAX);
    w.clamp(min, max.max(min))
}

/// The receive window an upload on `conn` is read with: [`bdp_window`]
/// between [`SERVER_STREAM_WINDOW`] and [`MAX_UPLOAD_WINDOW`].
pub fn upload_window(conn: &Connection) -> u32 {
    let w = bdp_window(
        conn.rtt(),
        u64::from(SERVER_STREAM_WINDOW),
        u64::from(MAX_UPLOAD_WINDOW),
    );
    u32::try_from(w).unwrap_or(MAX_UPLOAD_WINDOW)
}

/// The send window a model download on `conn` is written with:
/// [`bdp_window`] between [`SERVER_SEND_WINDOW`] and [`MAX_DOWNLOAD_WINDOW`].
pub fn download_window(conn: &Connection) -> u64 {
    bdp_window(conn.rtt(), SERVER_SEND_WINDOW, MAX_DOWNLOAD_WINDOW)
}

/// Widen `conn`'s send window for a model download ([`download_window`],
/// as far as the window budget allows: [`WindowShare`]) until the returned guard is dropped;
/// then it is [`SERVER_SEND_WINDOW`] again (data already queued stays
/// queued).
pub fn open_download_window(conn: &Connection) -> DownloadWindow {
    let share = WindowShare::take(download_window(conn).saturating_sub(SERVER_SEND_WINDOW));
    conn.set_send_window(SERVER_SEND_WINDOW.saturating_add(share.bytes()));
    DownloadWindow {
        conn: conn.clone(),
        _share: share,
    }
}

/// Puts a connection's send window back, and its share of the budget,
/// when dropped (see [`open_download_window`]).
#[derive(Debug)]
pub struct DownloadWindow {
    conn: Connection,
    _share: WindowShare,
}

impl Drop for DownloadWindow {
    fn drop(&mut self) {
        self.conn.set_send_window(SERVER_SEND_WINDOW);
    }
}

/// Connection-level receive window of the coordinator's endpoint while none
/// of the connection's uploads is being read, bytes. A site's upload that
/// waits for an upload slot parks at most this much in the QUIC stack, so a
/// waiting site costs the coordinator this, not a stream window; control
/// messages (a few hundred bytes each) flow within it.
pub const SERVER_IDLE_RECEIVE_WINDOW: u32 = 16 * 1024;

/// Send window of the coordinator's endpoint (unacknowledged plus unsent
/// stream data per connection), bytes: bounds what a model download buffers
/// in the QUIC stack (≈ 50 MB/s per download at 20 ms RTT); a download on a
/// longer path gets more ([`open_download_window`]).
pub const SERVER_SEND_WINDOW: u64 = 1024 * 1024;

/// Open `conn`'s receive window for the upload on `recv`, of which
/// `remaining` bytes (frames included) are still to be read, by the
/// upload's window ([`upload_window`]: twice the path's bandwidth-delay
/// product, from 512 KiB on a LAN to 8 MiB), and close it again on its own
/// as the upload is read: once only that window's worth is left, the window goes back to [`SERVER_IDLE_RECEIVE_WINDOW`], and the
/// credit already granted covers the rest. After the upload has been read,
/// the site again has no more than the idle window of credit, so its next
/// upload parks no more than that while it waits for a slot.
///
/// A connection's window is shared by all its streams: call this for one
/// upload at a time per connection, and [`close_upload_window`] when the
/// upload ends early.
pub fn open_upload_window(conn: &Connection, recv: &mut FramedRecv, remaining: u64) -> WindowShare {
    // Never more than the upload still needs: credit the upload leaves
    // unused would let the site's next upload park more than the idle
    // window while it waits for a slot. Beyond the floor, only what the
    // budget has left.
    let wanted = upload_window(conn).min(u32::try_from(remaining).unwrap_or(u32::MAX));
    let floor = wanted.min(SERVER_STREAM_WINDOW);
    let share = WindowShare::take(u64::from(wanted - floor));
    let window = floor.saturating_add(u32::try_from(share.bytes()).unwrap_or(0));
    let open = SERVER_IDLE_RECEIVE_WINDOW.saturating_add(window);
    conn.set_receive_window(VarInt::from_u32(open));
    let at = recv
        .bytes_read()
        .saturating_add(remaining.saturating_sub(u64::from(window)));
    recv.set_window_at(conn, at, VarInt::from_u32(SERVER_IDLE_RECEIVE_WINDOW));
    share
}

/// Put `conn`'s receive window back to [`SERVER_IDLE_RECEIVE_WINDOW`] (an
/// upload ended before it was read to the end). Credit already granted
/// stays granted.
pub fn close_upload_window(conn: &Connection) {
    conn.set_receive_window(VarInt::from_u32(SERVER_IDLE_RECEIVE_WINDOW));
}

/// Default idle timeout of fedlink connections.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A server endpoint bound to `addr` with a rustls server config from
/// [`fedlink_certs::server_tls_config`].
pub fn server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    idle_timeout: Duration,
) -> Result<Endpoint, TransportError> {
    server_endpoint_with(addr, tls, idle_timeout, Congestion::default())
}

/// [`server_endpoint`] with the congestion controller `cc`.
pub fn server_endpoint_with(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    idle_timeout: Duration,
    cc: Congestion,
) -> Result<Endpoint, TransportError> {
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| TransportError::Config(format!("server TLS config unusable by QUIC: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = transport_config_with(idle_timeout, cc)?;
    // What a site may send ahead of the coordinator reading it: the idle
    // connection window bounds what an upload waiting for a slot parks in
    // the QUIC stack; `open_upload_window` widens it while an upload is
    // read. Memory per connected site thus stays small and flat.
    t.stream_receive_window(VarInt::from_u32(MAX_UPLOAD_WINDOW));
    t.receive_window(VarInt::from_u32(SERVER_IDLE_RECEIVE_WINDOW));
    t.send_window(SERVER_SEND_WINDOW);
    cfg.transport_config(Arc::new(t));
    Ok(Endpoint::server(cfg, addr)?)
}

/// A client endpoint (ephemeral local port, same address family as `remote`)
/// whose default config uses `tls` from [`fedlink_certs::client_tls_config`].
pub fn client_endpoint(
    remote: SocketAddr,
    tls: rustls::ClientConfig,
    idle_timeout: Duration,
) -> Result<Endpoint, TransportError> {
    client_endpoint_with(remote, tls, idle_timeout, Congestion::default())
}

/// A client connection and what keeps it alive: the QUIC endpoint (its
/// socket; dropping it ends the connection), none for TLS over TCP.
#[derive(Debug)]
pub struct Dialed {
    /// The connection.
    pub conn: Conn,
    /// The QUIC endpoint, to keep while the connection is used (and to
    /// `wait_idle` on after closing it).
    pub endpoint: Option<Endpoint>,
}

/// Connect to `addr` over `kind` with `tls`, naming the server
/// `server_name`, within `timeout`: QUIC from a fresh client endpoint
/// (idle timeout `idle`, congestion controller `cc`), or TLS 1.3 over TCP
/// to the same port number. One place for the tools that pick a transport
/// (the admin CLI, the benchmark, the test sites); the agent's transport
/// selection (QUIC first, TCP fallback, proxies) is its own.
pub async fn dial(
    kind: TransportKind,
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    server_name: &str,
    idle: Duration,
    cc: Congestion,
    timeout: Duration,
) -> Result<Dialed, TransportError> {
    match kind {
        TransportKind::Quic => {
            let endpoint = client_endpoint_with(addr, tls, idle, cc)?;
            let connecting = endpoint
                .connect(addr, server_name)
                .map_err(|e| TransportError::Config(format!("connecting to {addr}: {e}")))?;
            let conn = tokio::time::timeout(timeout, connecting)
                .await
                .map_err(|_| TransportError::Connection(ConnectionError::TimedOut))??;
            Ok(Dialed {
                conn: Conn::from(conn),
                endpoint: Some(endpoint),
            })
        }
        TransportKind::Tcp => {
            let conn = tcp::connect(addr, Arc::new(tls), server_name, timeout).await?;
            Ok(Dialed {
                conn: Conn::from(conn),
                endpoint: None,
            })
        }
    }
}

/// [`client_endpoint`] with the congestion controller `cc`.
pub fn client_endpoint_with(
    remote: SocketAddr,
    tls: rustls::ClientConfig,
    idle_timeout: Duration,
    cc: Congestion,
) -> Result<Endpoint, TransportError> {
    let bind: SocketAddr = if remote.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Config(format!("client TLS config unusable by QUIC: {e}")))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = transport_config_with(idle_timeout, cc)?;
    // A model download may have up to the coordinator's largest send
    // window in flight (a long path); quinn's default (1.25 MB) would cap
    // it below that.
    t.stream_receive_window(VarInt::from_u32(
        u32::try_from(MAX_DOWNLOAD_WINDOW).unwrap_or(u32::MAX),
    ));
    cfg.transport_config(Arc::new(t));
    let mut endpoint = Endpoint::client(bind)?;
    endpoint.set_default_client_config(cfg);
    Ok(endpoint)
}

/// The ALPN protocol negotiated on a connection.
pub fn negotiated_alpn(conn: &Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<HandshakeData>()
        .ok()?
        .protocol
}

/// The fedlink identity in the peer's (already verified) certificate.
pub fn peer_identity(conn: &Connection) -> Result<Identity, TransportError> {
    Ok(fedlink_certs::peer_identity_from_any(conn.peer_identity())?)
}

/// The peer's end-entity certificate, as presented in the handshake.
pub fn peer_end_entity(
    conn: &Connection,
) -> Option<fedlink_certs::rustls_pki_types::CertificateDer<'static>> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<fedlink_certs::rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    chain.first().cloned()
}

#[cfg(test)]
mod window_tests {
    use super::*;

    /// Windows follow the path: the floor on a LAN (memory per transfer as
    /// before), twice the bandwidth-delay product at a gigabit in between,
    /// the cap on long paths.
    #[test]
    fn windows_are_sized_to_the_path_within_bounds() {
        let (min, max) = (512 * 1024, 4 * 1024 * 1024);
        assert_eq!(bdp_window(Duration::from_micros(100), min, max), min);
        assert_eq!(bdp_window(Duration::ZERO, min, max), min);
        // 10 ms at 125 MB/s: 1.25 MB, twice that.
        assert_eq!(bdp_window(Duration::from_millis(10), min, max), 2_500_000);
        assert_eq!(bdp_window(Duration::from_millis(40), min, max), max);
        assert_eq!(bdp_window(Duration::from_secs(3600), min, max), max);
        // A cap below the floor gives the floor.
        assert_eq!(bdp_window(Duration::from_millis(40), min, 1), min);
        const { assert!(MAX_UPLOAD_WINDOW >= SERVER_STREAM_WINDOW) };
        const { assert!(MAX_DOWNLOAD_WINDOW >= SERVER_SEND_WINDOW) };
    }

    /// The budget is shared: a share takes what is left, at most what it
    /// asks for, and gives it back when dropped.
    #[test]
    fn window_shares_never_exceed_the_budget() {
        let a = WindowShare::take(WINDOW_BUDGET);
        let b = WindowShare::take(1);
        assert!(a.bytes() + b.bytes() <= LONE_TRANSFER_BUDGET);
        let before = a.bytes();
        drop(a);
        let c = WindowShare::take(before);
        assert!(c.bytes() + b.bytes() <= LONE_TRANSFER_BUDGET);
        assert_eq!(WindowShare::none().bytes(), 0);
    }

    fn budget() -> &'static WindowBudget {
        Box::leak(Box::default())
    }

    /// A lone transfer may take the lone budget; one that starts beside it
    /// gets only what is left of the shared budget (nothing, here), and
    /// once the lone one ends a new one may take the lone budget again.
    #[test]
    fn a_lone_transfer_takes_more_and_the_next_ones_share_what_is_left() {
        let b = budget();
        let lone = b.take(8 * 1024 * 1024);
        assert_eq!(lone.bytes(), LONE_TRANSFER_BUDGET);
        let beside = b.take(1024 * 1024);
        assert_eq!(
            beside.bytes(),
            0,
            "the lone share is above the shared budget"
        );
        assert_eq!(b.in_use(), LONE_TRANSFER_BUDGET);
        drop(lone);
        // `beside` still holds a (zero) share: a newcomer is not alone.
        let next = b.take(8 * 1024 * 1024);
        assert_eq!(next.bytes(), WINDOW_BUDGET);
        drop((beside, next));
        assert_eq!(b.in_use(), 0);
        assert_eq!(b.take(8 * 1024 * 1024).bytes(), LONE_TRANSFER_BUDGET);
    }

    /// Many transfers at once never hold more than the lone budget, and
    /// never more than the shared budget once a second one holds a share.
    #[test]
    fn many_transfers_stay_within_the_budgets() {
        let b = budget();
        let first = b.take(1024 * 1024);
        assert_eq!(first.bytes(), 1024 * 1024);
        let rest: Vec<_> = (0..32).map(|_| b.take(4 * 1024 * 1024)).collect();
        let total: u64 = first.bytes() + rest.iter().map(WindowShare::bytes).sum::<u64>();
        assert_eq!(total, WINDOW_BUDGET);
        assert!(b.in_use() <= LONE_TRANSFER_BUDGET);
        // Asking for nothing takes nothing and does not count as a holder.
        assert_eq!(b.take(0).bytes(), 0);
        drop((first, rest));
        assert_eq!(b.in_use(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 15 (8): the body of a frame is not allocated at its declared
    /// length up front. Walk the reads of a maximal frame: the first
    /// allocation is 64 KiB whatever the header says, each later one at most
    /// doubles what has really arrived, and the last one ends exactly at the
    /// declared length.
    #[test]
    fn a_frame_body_grows_with_what_arrives() {
        let declared = fedlink_protocol::MAX_FRAME_LEN;
        assert_eq!(next_read_len(0, declared), FIRST_BODY_STEP);
        let mut filled = 0;
        let mut steps = 0;
        while filled < declared {
            let step = next_read_len(filled, declared);
            assert!(step > 0);
            // Room after this step: at most twice what was read, or 64 KiB.
            assert!(filled + step <= (2 * filled).max(FIRST_BODY_STEP));
            filled += step;
            steps += 1;
        }
        assert_eq!(filled, declared);
        assert!(steps <= 12, "{steps} steps");
        assert_eq!(next_read_len(0, 100), 100);
        assert_eq!(next_read_len(0, 0), 0);
    }
}
