//! The same protocol over TLS 1.3 on TCP, for networks that block UDP.
//!
//! One TCP connection per site carries one TLS 1.3 session (tokio-rustls,
//! with the very same rustls configs as QUIC: federation CA only, mutual
//! authentication, role checks, ALPNs) and, inside it, [yamux] streams: the
//! same bidirectional streams QUIC gives, carrying the same frames, read
//! with the same [`FramedRecv`] and written with the same [`FramedSend`].
//!
//! ```text
//!  FramedSend/FramedRecv ─▶ yamux stream ─▶ yamux connection ─▶ TLS 1.3 (rustls) ─▶ TCP
//! ```
//!
//! Why yamux rather than one TCP connection per stream type or a
//! hand-written multiplexer: it is maintained (libp2p uses it), has
//! per-stream flow control (a 256 KiB window per stream, auto-tuned up to a
//! connection cap set here), and keeps one TLS handshake and one
//! certificate check per site.
//!
//! Differences from QUIC, by design or not yet done:
//! - the per-connection receive-window helpers
//!   ([`crate::open_upload_window`]) are QUIC-only: on TCP, yamux's
//!   per-stream window (256 KiB to start) bounds what an upload parks, and
//!   [`MAX_CONNECTION_WINDOW`] bounds a connection;
//! - yamux carries no application close or reset codes: a closed
//!   connection reads as "connection lost" with the local reason only;
//! - a TLS 1.3 client whose certificate the server refuses still sees its
//!   handshake succeed; the refusal shows on its first stream read (as on
//!   QUIC);
//! - a client that offers no ALPN is refused after the handshake (rustls
//!   over TCP, unlike QUIC, lets such a handshake complete);
//! - a local close ([`TcpConn::close`], or the last handle dropped) ends
//!   this side's streams at once, as on QUIC (yamux itself wakes none of
//!   them), and gives the close at most `CLOSE_GRACE` (10 s) to leave.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use fedlink_certs::Identity;
use fedlink_certs::rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Notify, mpsc, oneshot, watch};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt as _, TokioAsyncReadCompatExt as _};

use crate::{FramedRecv, FramedSend, RecvInner, SendInner, TransportError};

type Stream = Compat<yamux::Stream>;
/// The reading half of a yamux stream.
pub(crate) type RecvHalf = tokio::io::ReadHalf<Stream>;
/// The writing half of a yamux stream.
pub(crate) type SendHalf = tokio::io::WriteHalf<Stream>;

/// Most streams open at once on one connection (as on QUIC).
pub const MAX_STREAMS: usize = 16;
/// Most bytes all streams of one connection may have been granted to
/// receive: yamux's minimum for [`MAX_STREAMS`] streams (256 KiB each).
pub const MAX_CONNECTION_WINDOW: usize = MAX_STREAMS * 256 * 1024;
/// Default time a TLS handshake may take on the server.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn stream_err(e: std::io::Error) -> TransportError {
    TransportError::TcpConnection(e.to_string())
}

/// Send the end of a yamux stream after what was written before it.
pub(crate) fn finish(mut half: SendHalf) -> Result<(), TransportError> {
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|e| TransportError::Config(format!("finishing a TCP stream: {e}")))?;
    rt.spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = half.shutdown().await;
    });
    Ok(())
}

fn yamux_config() -> yamux::Config {
    let mut cfg = yamux::Config::default();
    // Streams first: yamux asserts the window covers 256 KiB per stream.
    cfg.set_max_num_streams(MAX_STREAMS);
    cfg.set_max_connection_receive_window(Some(MAX_CONNECTION_WINDOW));
    cfg
}

#[derive(Debug)]
enum Cmd {
    Open(oneshot::Sender<Result<yamux::Stream, String>>),
}

/// A TLS-over-TCP connection (either end), cheap to clone.
#[derive(Debug, Clone)]
pub struct TcpConn(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    id: u64,
    remote: SocketAddr,
    peer_certs: Option<Vec<CertificateDer<'static>>>,
    alpn: Option<Vec<u8>>,
    /// How long the TLS handshake took (this side's view).
    handshake: Duration,
    cmds: mpsc::Sender<Cmd>,
    /// Asks the connection's task to close (not through `cmds`, whose
    /// queue may be full of stream openings).
    close_asked: Arc<Notify>,
    inbound: Mutex<mpsc::Receiver<yamux::Stream>>,
    /// Why the connection ended, once it has.
    closed: watch::Receiver<Option<String>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn split(s: yamux::Stream, closed: &watch::Receiver<Option<String>>) -> (FramedSend, FramedRecv) {
    let (r, w) = tokio::io::split(s.compat());
    (
        FramedSend::with(SendInner::Tcp(Some(w), Closed(closed.clone()))),
        FramedRecv::with(RecvInner::Tcp(r, Closed(closed.clone()))),
    )
}

/// How long a failed stream operation waits for its connection's reason.
const EXPLAIN_WAIT: Duration = Duration::from_secs(1);

/// A stream's view of why its connection ended (a TLS alert, a reset), to
/// name in the error of a stream operation that failed because of it.
#[derive(Debug, Clone)]
pub(crate) struct Closed(watch::Receiver<Option<String>>);

impl Closed {
    /// Wait until the connection has ended; why.
    pub(crate) async fn ended(&self) -> String {
        let mut rx = self.0.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            // The connection's task is gone without a word.
            Err(_) => "closed".into(),
        }
    }

    /// The error for a failed stream operation: the connection's end
    /// reason when it has ended (waiting briefly: the stream may learn of
    /// the end before the connection's task has recorded why), else `e`.
    pub(crate) async fn explain(&self, e: std::io::Error) -> TransportError {
        let mut rx = self.0.clone();
        match tokio::time::timeout(EXPLAIN_WAIT, rx.wait_for(Option::is_some)).await {
            Ok(Ok(why)) => TransportError::TcpConnection(why.clone().unwrap_or_default()),
            _ => stream_err(e),
        }
    }

    /// The error for a stream that ended where `what` was required: the
    /// connection's end reason if it ends (waiting briefly), else a plain
    /// unexpected end.
    pub(crate) async fn explain_end(&self, what: &'static str) -> TransportError {
        let mut rx = self.0.clone();
        match tokio::time::timeout(EXPLAIN_WAIT, rx.wait_for(Option::is_some)).await {
            Ok(Ok(why)) => TransportError::TcpConnection(format!(
                "stream ended before the expected {what}: {}",
                why.clone().unwrap_or_default()
            )),
            _ => TransportError::UnexpectedEnd(what),
        }
    }
}

impl TcpConn {
    fn start<T>(
        tls: T,
        mode: yamux::Mode,
        remote: SocketAddr,
        certs: Option<Vec<CertificateDer<'static>>>,
        alpn: Option<Vec<u8>>,
        handshake: Duration,
    ) -> Self
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let conn = yamux::Connection::new(tls.compat(), yamux_config(), mode);
        let (cmd_tx, cmd_rx) = mpsc::channel(MAX_STREAMS);
        let (in_tx, in_rx) = mpsc::channel(MAX_STREAMS);
        let (closed_tx, closed_rx) = watch::channel(None);
        let close_asked = Arc::new(Notify::new());
        let asked = close_asked.clone();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(conn = id, %remote, ?mode, "TLS over TCP: connection up");
        tokio::spawn(async move {
            let mut conn = conn;
            let why = match drive(&mut conn, cmd_rx, &asked, in_tx).await {
                Driven::Ended(why) => why,
                Driven::CloseAsked => {
                    tracing::debug!(conn = id, "TLS over TCP: closing");
                    // The streams end now: yamux wakes none of them on a
                    // local close, and the close below may never finish
                    // (a peer that reads nothing).
                    let _ = closed_tx.send(Some(CLOSED_HERE.into()));
                    close(&mut conn).await
                }
            };
            tracing::debug!(conn = id, reason = %why, "TLS over TCP: connection ended");
            let _ = closed_tx.send(Some(why));
        });
        Self(Arc::new(Shared {
            id,
            remote,
            peer_certs: certs,
            alpn,
            handshake,
            cmds: cmd_tx,
            close_asked,
            inbound: Mutex::new(in_rx),
            closed: closed_rx,
        }))
    }

    /// The error for an operation on a connection that has ended: its
    /// reason (the connection's task records it as it ends, which may be
    /// a moment after the operation saw the end).
    async fn lost(&self) -> TransportError {
        let mut rx = self.0.closed.clone();
        let why = match tokio::time::timeout(EXPLAIN_WAIT, rx.wait_for(Option::is_some)).await {
            Ok(Ok(why)) => why.clone().unwrap_or_default(),
            _ => "closed".into(),
        };
        TransportError::TcpConnection(why)
    }

    /// Open a bidirectional framed stream.
    pub async fn open_bi(&self) -> Result<(FramedSend, FramedRecv), TransportError> {
        let (tx, rx) = oneshot::channel();
        if self.0.cmds.send(Cmd::Open(tx)).await.is_err() {
            return Err(self.lost().await);
        }
        // The connection's end ends the wait too. A request that entered
        // the queue just as the connection's task ended (after the task's
        // receiver was dropped and drained: tokio's bounded `send` reserves
        // its slot first and pushes after) stays queued, with its reply
        // sender, for as long as this handle lives, so `rx` alone would
        // never resolve. Seen in the stress loop: a CLI whose TLS refusal
        // arrived right after its handshake waited for its stream forever.
        let closed = Closed(self.0.closed.clone());
        let opened = tokio::select! {
            biased;
            r = rx => r,
            _ = closed.ended() => return Err(self.lost().await),
        };
        match opened {
            Ok(Ok(s)) => Ok(split(s, &self.0.closed)),
            Ok(Err(e)) => Err(TransportError::TcpConnection(e)),
            Err(_) => Err(self.lost().await),
        }
    }

    /// Accept a bidirectional framed stream opened by the peer.
    pub async fn accept_bi(&self) -> Result<(FramedSend, FramedRecv), TransportError> {
        let next = self.0.inbound.lock().await.recv().await;
        match next {
            Some(s) => Ok(split(s, &self.0.closed)),
            None => Err(self.lost().await),
        }
    }

    /// A number that identifies this connection in this process.
    pub fn stable_id(&self) -> u64 {
        self.0.id
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.0.remote
    }

    /// The ALPN protocol negotiated in the handshake.
    pub fn negotiated_alpn(&self) -> Option<Vec<u8>> {
        self.0.alpn.clone()
    }

    /// The fedlink identity in the peer's (already verified) certificate.
    pub fn peer_identity(&self) -> Result<Identity, TransportError> {
        let chain = self
            .0
            .peer_certs
            .as_deref()
            .ok_or(fedlink_certs::IdentityError::NoPeerCertificate)?;
        Ok(fedlink_certs::peer_identity(chain)?)
    }

    /// The peer's end-entity certificate.
    pub fn peer_end_entity(&self) -> Option<CertificateDer<'static>> {
        self.0.peer_certs.as_ref()?.first().cloned()
    }

    /// How long the TLS handshake took, seen from this side: about one
    /// round trip plus the cryptography (the TCP connection, and a proxy's
    /// tunnel, are already up when it starts).
    pub fn handshake_time(&self) -> Duration {
        self.0.handshake
    }

    /// Why the connection ended, if it has.
    pub fn close_reason(&self) -> Option<String> {
        self.0.closed.borrow().clone()
    }

    /// Close the connection (streams end, the TLS session is closed).
    pub fn close(&self) {
        self.0.close_asked.notify_one();
    }

    /// Wait until the connection has ended; why.
    pub async fn closed(&self) -> String {
        let mut rx = self.0.closed.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "closed".into(),
        }
    }
}

/// Why [`drive`] returned.
enum Driven {
    /// The connection ended (the peer closed it, an error): why.
    Ended(String),
    /// This side asked to close it ([`TcpConn::close`], or every handle
    /// dropped).
    CloseAsked,
}

/// A connection's end reason when this side closed it.
const CLOSED_HERE: &str = "closed by this side";

/// How long a local close may take to deliver what was queued and the
/// close itself: a peer that reads nothing must not keep the connection's
/// task (and its socket) forever.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Run a yamux connection until it ends or this side asks to close it:
/// open streams on request, hand inbound ones over (refusing those beyond
/// [`MAX_STREAMS`] waiting). Streams still being opened when it returns
/// fail (their senders are dropped).
async fn drive<T>(
    conn: &mut yamux::Connection<T>,
    mut cmds: mpsc::Receiver<Cmd>,
    close_asked: &Notify,
    inbound: mpsc::Sender<yamux::Stream>,
) -> Driven
where
    T: futures_util::AsyncRead + futures_util::AsyncWrite + Unpin,
{
    let mut opening: std::collections::VecDeque<oneshot::Sender<Result<yamux::Stream, String>>> =
        std::collections::VecDeque::new();
    let mut close = std::pin::pin!(close_asked.notified());
    std::future::poll_fn(|cx| {
        if close.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Driven::CloseAsked);
        }
        loop {
            match cmds.poll_recv(cx) {
                Poll::Ready(Some(Cmd::Open(tx))) => opening.push_back(tx),
                // Every handle dropped.
                Poll::Ready(None) => return Poll::Ready(Driven::CloseAsked),
                Poll::Pending => break,
            }
        }
        while !opening.is_empty() {
            match conn.poll_new_outbound(cx) {
                Poll::Ready(Ok(s)) => {
                    if let Some(tx) = opening.pop_front() {
                        let _ = tx.send(Ok(s));
                    }
                }
                Poll::Ready(Err(e)) => {
                    for tx in opening.drain(..) {
                        let _ = tx.send(Err(e.to_string()));
                    }
                    return Poll::Ready(Driven::Ended(format!("opening a stream: {e}")));
                }
                Poll::Pending => break,
            }
        }
        loop {
            match conn.poll_next_inbound(cx) {
                // A full queue drops (and so resets) the stream.
                Poll::Ready(Some(Ok(s))) => {
                    let _ = inbound.try_send(s);
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Driven::Ended(e.to_string())),
                Poll::Ready(None) => {
                    return Poll::Ready(Driven::Ended("closed by the peer".to_string()));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

/// Close a yamux connection (what its streams queued, then the close and
/// the TLS session's end), within [`CLOSE_GRACE`]: its end reason.
async fn close<T>(conn: &mut yamux::Connection<T>) -> String
where
    T: futures_util::AsyncRead + futures_util::AsyncWrite + Unpin,
{
    match tokio::time::timeout(CLOSE_GRACE, std::future::poll_fn(|cx| conn.poll_close(cx))).await {
        Ok(Ok(())) => CLOSED_HERE.to_string(),
        Ok(Err(e)) => format!("closing: {e}"),
        Err(_) => format!("{CLOSED_HERE} (the peer took nothing for {CLOSE_GRACE:?})"),
    }
}

/// Connect to `addr` over TCP and run the TLS 1.3 handshake with `tls` (from
/// [`fedlink_certs::client_tls_config`]) for `server_name`, within
/// `timeout`.
pub async fn connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    server_name: &str,
    timeout: Duration,
) -> Result<TcpConn, TransportError> {
    let started = std::time::Instant::now();
    tracing::debug!(%addr, "TLS over TCP: connecting");
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            TransportError::TcpConnection(format!(
                "TCP to {addr}: no connection within {timeout:?}"
            ))
        })?
        .map_err(|e| TransportError::TcpConnection(format!("TCP to {addr}: {e}")))?;
    let left = timeout.saturating_sub(started.elapsed());
    connect_over(tcp, addr, tls, server_name, left).await
}

/// Run the TLS 1.3 handshake with `tls` for `server_name` over an already
/// connected TCP stream (directly to the coordinator at `addr`, or a tunnel
/// through an HTTP proxy whose address is `addr`), within `timeout`. TLS
/// runs end to end: whatever carries the stream sees only ciphertext.
pub async fn connect_over(
    tcp: TcpStream,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    server_name: &str,
    timeout: Duration,
) -> Result<TcpConn, TransportError> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| TransportError::Config(format!("server name {server_name:?}: {e}")))?;
    let started = std::time::Instant::now();
    let _ = tcp.set_nodelay(true);
    let tls = tokio::time::timeout(timeout, TlsConnector::from(tls).connect(name, tcp))
        .await
        .map_err(|_| {
            TransportError::TcpConnection(format!(
                "TLS over TCP to {addr}: no handshake within {timeout:?}"
            ))
        })?
        .map_err(|e| TransportError::TcpConnection(format!("TLS over TCP to {addr}: {e}")))?;
    tracing::debug!(%addr, elapsed = ?started.elapsed(), "TLS over TCP: handshake done");
    let (_, session) = tls.get_ref();
    let certs = session.peer_certificates().map(<[_]>::to_vec);
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    if alpn.is_none() {
        return Err(TransportError::TcpConnection(format!(
            "TLS over TCP to {addr}: the server agreed no application protocol (ALPN)"
        )));
    }
    Ok(TcpConn::start(
        tls,
        yamux::Mode::Client,
        addr,
        certs,
        alpn,
        started.elapsed(),
    ))
}

/// The coordinator's TCP listener: TLS 1.3 with the server config of
/// [`fedlink_certs::server_tls_config`].
#[derive(Debug)]
pub struct TcpServer {
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
}

impl TcpServer {
    /// Bind `addr` (the same port number as the QUIC endpoint, or another).
    pub async fn bind(addr: SocketAddr, tls: rustls::ServerConfig) -> Result<Self, TransportError> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            tls: Arc::new(tls),
            handshake_timeout: HANDSHAKE_TIMEOUT,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.listener.local_addr()?)
    }

    /// The next incoming TCP connection (its handshake not yet run: run it
    /// in the connection's own task with [`TcpIncoming::handshake`]).
    pub async fn accept(&self) -> Result<TcpIncoming, TransportError> {
        let (stream, remote) = self.listener.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok(TcpIncoming {
            stream,
            remote,
            tls: self.tls.clone(),
            timeout: self.handshake_timeout,
        })
    }
}

/// An accepted TCP connection before its TLS handshake.
#[derive(Debug)]
pub struct TcpIncoming {
    stream: TcpStream,
    remote: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    timeout: Duration,
}

impl TcpIncoming {
    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.remote
    }

    /// Run the TLS 1.3 handshake (client certificate verified against the
    /// federation CA and the revocation list by the server config) within
    /// the handshake timeout; refuse a client that agreed no ALPN.
    pub async fn handshake(self) -> Result<TcpConn, TransportError> {
        let remote = self.remote;
        let started = std::time::Instant::now();
        let tls = tokio::time::timeout(
            self.timeout,
            TlsAcceptor::from(self.tls).accept(self.stream),
        )
        .await
        .map_err(|_| {
            TransportError::TcpConnection(format!("no TLS handshake within {:?}", self.timeout))
        })?
        .map_err(|e| TransportError::TcpConnection(format!("TLS handshake: {e}")))?;
        let (_, session) = tls.get_ref();
        let certs = session.peer_certificates().map(<[_]>::to_vec);
        let Some(alpn) = session.alpn_protocol().map(<[u8]>::to_vec) else {
            return Err(TransportError::TcpConnection(
                "the client offered no fedlink application protocol (ALPN)".into(),
            ));
        };
        Ok(TcpConn::start(
            tls,
            yamux::Mode::Server,
            remote,
            certs,
            Some(alpn),
            started.elapsed(),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Generous: only a hang guard, never waited for when the code is right.
    const HANG_GUARD: Duration = Duration::from_secs(30);

    /// A connection over an in-memory pipe whose far end never reads (a
    /// peer that stopped reading, a full TCP send buffer): `peer` must be
    /// kept alive by the caller.
    fn stalled_conn() -> (TcpConn, tokio::io::DuplexStream) {
        let (ours, peer) = tokio::io::duplex(256);
        let conn = TcpConn::start(
            ours,
            yamux::Mode::Client,
            SocketAddr::from(([127, 0, 0, 1], 9)),
            None,
            Some(b"fedlink".to_vec()),
            Duration::ZERO,
        );
        (conn, peer)
    }

    /// A local close ends the connection's streams at once, even when the
    /// close itself cannot be delivered (the peer reads nothing, so the
    /// queued frames and the GoAway never leave): a read waiting on a stream
    /// gets the connection's end, not a wait without end (yamux wakes no
    /// stream on a local close, and the close's flush never finished).
    #[tokio::test]
    async fn a_local_close_ends_the_streams_even_when_the_peer_reads_nothing() {
        let (conn, _peer) = stalled_conn();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        // More than the pipe holds: the connection cannot flush it.
        send.chunk(vec![7u8; 4096]).await.unwrap();
        conn.close();
        let read = tokio::time::timeout(HANG_GUARD, recv.message())
            .await
            .expect("a read on a closed connection hung");
        let err = read.expect_err("a message read on a closed connection");
        assert!(err.to_string().contains("closed by this side"), "{err}");
        assert_eq!(
            conn.close_reason().as_deref(),
            Some("closed by this side"),
            "the reason is set when the close begins"
        );
        // Nothing more opens on it.
        let open = tokio::time::timeout(HANG_GUARD, conn.open_bi())
            .await
            .expect("open_bi on a closed connection hung");
        assert!(open.is_err());
    }

    /// A close asked while the command queue is full of stream openings
    /// (queued before the connection's task ran) is not lost.
    #[tokio::test]
    async fn a_close_behind_a_full_command_queue_is_not_lost() {
        let (conn, _peer) = stalled_conn();
        let mut opened = Vec::new();
        // The test runtime has one thread: the connection's task has not
        // run yet, so these fill its queue.
        for _ in 0..MAX_STREAMS {
            let (tx, rx) = oneshot::channel();
            conn.0.cmds.try_send(Cmd::Open(tx)).unwrap();
            opened.push(rx);
        }
        conn.close();
        let why = tokio::time::timeout(HANG_GUARD, conn.closed())
            .await
            .expect("the close was lost");
        assert!(why.starts_with("closed by this side"), "{why}");
    }
}
