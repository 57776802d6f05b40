//! One connection type for both transports.
//!
//! The coordinator and the agent speak the same protocol over QUIC or over
//! TLS 1.3 on TCP ([`crate::tcp`]); past the handshake, nothing above this
//! module needs to know which: [`Conn`] opens and accepts the same framed
//! streams, names the same verified peer, and closes the same way. What
//! differs is said here, once:
//! - QUIC sends an application close code and reason to the peer; yamux has
//!   no such frame, so over TCP the peer sees the connection end and the
//!   reason stays in this side's log (and audit log);
//! - the per-connection receive-window tuning of uploads
//!   ([`crate::open_upload_window`]) is QUIC's; over TCP yamux's per-stream
//!   windows bound what a waiting upload parks;
//! - the round-trip time is QUIC's smoothed RTT estimate, and over TCP the
//!   time the TLS handshake took (a TLS 1.3 handshake is one round trip for
//!   the server, plus the cryptography), measured once.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use fedlink_certs::Identity;
use fedlink_certs::rustls_pki_types::CertificateDer;
use quinn::{Connection, VarInt};

use crate::tcp::TcpConn;
use crate::{FramedRecv, FramedSend, TransportError};

/// Which transport a connection runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// QUIC over UDP (quinn).
    Quic,
    /// TLS 1.3 over TCP, streams multiplexed with yamux.
    Tcp,
}

impl TransportKind {
    /// `"quic"` or `"tcp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection that has completed its mutually authenticated TLS 1.3
/// handshake, over QUIC or over TCP. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Conn {
    /// A quinn connection.
    Quic(Connection),
    /// A TLS-over-TCP connection.
    Tcp(TcpConn),
}

impl From<Connection> for Conn {
    fn from(c: Connection) -> Self {
        Self::Quic(c)
    }
}

impl From<TcpConn> for Conn {
    fn from(c: TcpConn) -> Self {
        Self::Tcp(c)
    }
}

impl Conn {
    /// Which transport this is.
    pub fn kind(&self) -> TransportKind {
        match self {
            Self::Quic(_) => TransportKind::Quic,
            Self::Tcp(_) => TransportKind::Tcp,
        }
    }

    /// Open a bidirectional framed stream.
    pub async fn open_bi(&self) -> Result<(FramedSend, FramedRecv), TransportError> {
        match self {
            Self::Quic(c) => crate::open_bi(c).await,
            Self::Tcp(c) => c.open_bi().await,
        }
    }

    /// Accept a bidirectional framed stream opened by the peer.
    pub async fn accept_bi(&self) -> Result<(FramedSend, FramedRecv), TransportError> {
        match self {
            Self::Quic(c) => crate::accept_bi(c).await,
            Self::Tcp(c) => c.accept_bi().await,
        }
    }

    /// A number that identifies this connection among the live ones of
    /// this process (QUIC's stable id; TCP connections count from 2^48 so
    /// the two never meet).
    pub fn stable_id(&self) -> usize {
        match self {
            Self::Quic(c) => c.stable_id(),
            Self::Tcp(c) => {
                let id = c.stable_id() | (1 << 48);
                usize::try_from(id).unwrap_or(usize::MAX)
            }
        }
    }

    /// The peer's address (for TCP through a proxy: the proxy's).
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Self::Quic(c) => c.remote_address(),
            Self::Tcp(c) => c.remote_address(),
        }
    }

    /// The ALPN protocol negotiated in the handshake.
    pub fn negotiated_alpn(&self) -> Option<Vec<u8>> {
        match self {
            Self::Quic(c) => crate::negotiated_alpn(c),
            Self::Tcp(c) => c.negotiated_alpn(),
        }
    }

    /// The fedlink identity in the peer's (already verified) certificate.
    pub fn peer_identity(&self) -> Result<Identity, TransportError> {
        match self {
            Self::Quic(c) => crate::peer_identity(c),
            Self::Tcp(c) => c.peer_identity(),
        }
    }

    /// The peer's end-entity certificate, as presented in the handshake.
    pub fn peer_end_entity(&self) -> Option<CertificateDer<'static>> {
        match self {
            Self::Quic(c) => crate::peer_end_entity(c),
            Self::Tcp(c) => c.peer_end_entity(),
        }
    }

    /// The round-trip time estimate (see the module docs for what it is on
    /// each transport).
    pub fn rtt(&self) -> Duration {
        match self {
            Self::Quic(c) => c.rtt(),
            Self::Tcp(c) => c.handshake_time(),
        }
    }

    /// Close the connection with `code` and `reason` (sent to the peer on
    /// QUIC; see the module docs for TCP).
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        match self {
            Self::Quic(c) => c.close(code, reason),
            Self::Tcp(c) => c.close(),
        }
    }

    /// Why the connection ended, if it has: the peer's close, a timeout, a
    /// reset, or this side's close.
    pub fn close_reason(&self) -> Option<String> {
        match self {
            Self::Quic(c) => c.close_reason().map(|e| e.to_string()),
            Self::Tcp(c) => c.close_reason(),
        }
    }

    /// Wait until the connection has ended; why.
    pub async fn closed(&self) -> String {
        match self {
            Self::Quic(c) => c.closed().await.to_string(),
            Self::Tcp(c) => c.closed().await,
        }
    }

    /// Open this connection's receive window for an upload (QUIC; a no-op
    /// over TCP): see [`crate::open_upload_window`].
    pub fn open_upload_window(&self, recv: &mut FramedRecv, remaining: u64) -> crate::WindowShare {
        match self {
            Self::Quic(c) => crate::open_upload_window(c, recv, remaining),
            Self::Tcp(_) => crate::WindowShare::none(),
        }
    }

    /// Widen this connection's send window for a model download until the
    /// guard is dropped (QUIC; over TCP, yamux's windows apply): see
    /// [`crate::open_download_window`].
    pub fn open_download_window(&self) -> Option<crate::DownloadWindow> {
        match self {
            Self::Quic(c) => Some(crate::open_download_window(c)),
            Self::Tcp(_) => None,
        }
    }

    /// Put the receive window back after an upload ended early (QUIC; a
    /// no-op over TCP): see [`crate::close_upload_window`].
    pub fn close_upload_window(&self) {
        if let Self::Quic(c) = self {
            crate::close_upload_window(c);
        }
    }

    /// The QUIC connection, if this is one (statistics, tests).
    pub fn quinn(&self) -> Option<&Connection> {
        match self {
            Self::Quic(c) => Some(c),
            Self::Tcp(_) => None,
        }
    }
}
