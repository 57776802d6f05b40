//! Helpers for fedlink's end-to-end tests over loopback QUIC (quinn 0.11 +
//! the rustls configs of `fedlink-certs`). Not published.
//!
//! - [`TestServer`]: a minimal coordinator front door on `127.0.0.1:0` that
//!   does what the real coordinator must do on every connection: finish the
//!   mTLS handshake, read the peer identity, check role against ALPN, then
//!   exchange one framed `fedlink_protocol` message. Every accepted or refused
//!   connection is reported as a [`ServerEvent`].
//! - [`exchange`]: a client that connects, sends one framed message and reads
//!   the answer, reporting *where* it failed ([`ClientError`]).
//! - [`raw_client_config`]: a client config built from arbitrary material
//!   (no certificate, a foreign certificate, a wrong ALPN) that the checked
//!   `fedlink_certs::client_tls_config` deliberately refuses to build.
//!
//! Timeouts here are only safety nets: tests never sleep.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod fixture;
pub mod raw_site;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fedlink_certs::rustls_pki_types::{CertificateDer, PrivateKeyDer};
use fedlink_certs::{Identity, Kit, RevocationList};
use fedlink_protocol::{Frame, FrameError, Message};
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;

/// Safety-net timeout for any single network step in tests.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Safety-net timeout for a whole job in tests (every round of it, with
/// the agents' real training and, in the reachability tests, a transport
/// fallback): several steps, so a larger net than [`STEP_TIMEOUT`]. On a
/// loaded 2-core CI machine a job of a few rounds has taken over 10 s.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// Application close code the test server uses when the role does not match
/// the ALPN protocol.
pub const CLOSE_FORBIDDEN: u32 = 0x403;

/// Assert that the coordinator's job completed (its outcome is shown
/// otherwise).
#[track_caller]
pub fn assert_completed(out: &fedlink_coordinator::server::ServeOutcome) {
    assert!(
        matches!(
            out.outcome,
            Some(fedlink_coordinator::round::JobOutcome::Completed { .. })
        ),
        "the job did not complete: {:?}",
        out.outcome
    );
}

/// Await `fut`, failing after [`STEP_TIMEOUT`] (a hung test is a failure,
/// not a wait).
pub async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .with_context(|| format!("{what}: no result within {STEP_TIMEOUT:?}"))
}

/// Run `cmd` to its end (stdin empty, stdout and stderr captured) within
/// `limit`. A process still running at `limit` is killed, and the error
/// carries what it had printed by then (a hung command is a failure that
/// explains itself, and leaves no process behind).
pub async fn run_bounded(
    cmd: &mut tokio::process::Command,
    limit: Duration,
) -> anyhow::Result<std::process::Output> {
    use tokio::io::AsyncReadExt;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the command")?;
    let drain = |pipe: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>| {
        tokio::spawn(async move {
            let mut out = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut out).await;
            }
            out
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let status = tokio::time::timeout(limit, child.wait()).await;
    let hung = status.is_err();
    let status = match status {
        Ok(s) => s.context("waiting for the command")?,
        Err(_) => {
            let _ = child.start_kill();
            child
                .wait()
                .await
                .context("waiting for the killed command")?
        }
    };
    let stdout = stdout.await.unwrap_or_default();
    let stderr = stderr.await.unwrap_or_default();
    if hung {
        anyhow::bail!(
            "still running after {limit:?}, killed; it had printed:\n--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    }
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

/// Why reading or writing a framed message failed.
#[derive(Debug)]
pub enum StreamFailure {
    /// The connection went away (closed by the peer, refused, timed out).
    Connection(ConnectionError),
    /// Anything else (bad frame, stream reset, early end).
    Other(String),
}

impl std::fmt::Display for StreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connection(e) => write!(f, "connection lost: {e}"),
            Self::Other(e) => f.write_str(e),
        }
    }
}

fn from_read(e: quinn::ReadExactError) -> StreamFailure {
    match e {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => {
            StreamFailure::Connection(c)
        }
        other => StreamFailure::Other(other.to_string()),
    }
}

fn from_frame(e: FrameError) -> StreamFailure {
    StreamFailure::Other(format!("bad frame: {e}"))
}

/// Write one framed `fedlink_protocol` message.
pub async fn write_message(send: &mut SendStream, msg: &Message) -> Result<(), StreamFailure> {
    let frame = Frame::message(msg).map_err(from_frame)?;
    send.write_all(&frame.to_vec()).await.map_err(|e| match e {
        quinn::WriteError::ConnectionLost(c) => StreamFailure::Connection(c),
        other => StreamFailure::Other(other.to_string()),
    })
}

/// Read one framed `fedlink_protocol` message (header first, so an oversize
/// length is refused before anything is allocated).
pub async fn read_message(recv: &mut RecvStream) -> Result<Message, StreamFailure> {
    let mut header = [0u8; fedlink_protocol::FRAME_HEADER_LEN];
    recv.read_exact(&mut header).await.map_err(from_read)?;
    let header = Frame::parse_header(&header).map_err(from_frame)?;
    let mut body = vec![0u8; header.body_len()];
    recv.read_exact(&mut body).await.map_err(from_read)?;
    Frame::from_parts(header, body.into())
        .and_then(Frame::into_message)
        .map_err(from_frame)
}

/// The ALPN protocol negotiated on a connection.
pub fn negotiated_alpn(conn: &Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<HandshakeData>()
        .ok()?
        .protocol
}

/// What the test server saw on one incoming connection.
#[derive(Debug)]
pub enum ServerEvent {
    /// Handshake, identity and role/ALPN checks passed; one message was
    /// received and answered.
    Accepted {
        /// The client's identity, from its certificate.
        identity: Identity,
        /// The negotiated ALPN protocol.
        alpn: Vec<u8>,
        /// The message the client sent.
        received: Message,
    },
    /// The TLS handshake failed on the server side (the verifier's reason).
    HandshakeRefused {
        /// The accept error, as displayed.
        error: String,
    },
    /// The handshake passed but the post-handshake checks refused the peer
    /// (identity unreadable or role not allowed on the negotiated ALPN).
    Forbidden {
        /// The reason, also sent to the client in the close frame.
        error: String,
    },
    /// The exchange after acceptance failed.
    ExchangeFailed {
        /// What went wrong.
        error: String,
    },
}

/// A coordinator front door for tests, listening on `127.0.0.1:<random>`.
#[derive(Debug)]
pub struct TestServer {
    endpoint: Endpoint,
    events: mpsc::UnboundedReceiver<ServerEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Start with the coordinator's kit and a shared revocation list
    /// (`fedlink_certs::server_tls_config`). Must run inside a tokio runtime.
    pub fn start(kit: &Kit, revocations: Arc<RevocationList>) -> anyhow::Result<Self> {
        let tls = fedlink_certs::server_tls_config(kit, revocations)?;
        let quic = QuicServerConfig::try_from(tls).context("QUIC server config")?;
        let config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let endpoint = Endpoint::server(config, SocketAddr::from(([127, 0, 0, 1], 0)))
            .context("binding the test server")?;
        let (tx, events) = mpsc::unbounded_channel();
        let accept = endpoint.clone();
        let task = tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let event = match incoming.await {
                        Err(e) => ServerEvent::HandshakeRefused {
                            error: e.to_string(),
                        },
                        Ok(conn) => serve(conn).await,
                    };
                    let _ = tx.send(event);
                });
            }
        });
        Ok(Self {
            endpoint,
            events,
            task,
        })
    }

    /// The address to connect to.
    pub fn addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The next connection outcome.
    pub async fn next_event(&mut self) -> anyhow::Result<ServerEvent> {
        bounded("server event", self.events.recv())
            .await?
            .context("server stopped")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.endpoint.close(VarInt::from_u32(0), b"test over");
        self.task.abort();
    }
}

async fn serve(conn: Connection) -> ServerEvent {
    // What the coordinator must do after every handshake.
    let identity = match fedlink_certs::peer_identity_from_any(conn.peer_identity()) {
        Ok(id) => id,
        Err(e) => {
            let error = e.to_string();
            conn.close(VarInt::from_u32(CLOSE_FORBIDDEN), error.as_bytes());
            return ServerEvent::Forbidden { error };
        }
    };
    let alpn = negotiated_alpn(&conn);
    if let Err(e) = fedlink_certs::check_role_for_alpn(&identity, alpn.as_deref()) {
        let error = e.to_string();
        conn.close(VarInt::from_u32(CLOSE_FORBIDDEN), error.as_bytes());
        return ServerEvent::Forbidden { error };
    }
    let result = async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let received = read_message(&mut recv).await.map_err(|e| e.to_string())?;
        let reply = match &received {
            Message::Heartbeat(hb) => Message::Heartbeat(fedlink_protocol::Heartbeat {
                seq: hb.seq.saturating_add(1),
                now_unix_ms: hb.now_unix_ms,
            }),
            other => Message::Bye(fedlink_protocol::Bye {
                reason: format!("test server only answers Heartbeat, got {}", other.name()),
            }),
        };
        write_message(&mut send, &reply)
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        Ok::<_, String>(received)
    }
    .await;
    match result {
        Ok(received) => {
            let event = ServerEvent::Accepted {
                identity,
                alpn: alpn.unwrap_or_default(),
                received,
            };
            // Keep the connection until the client closes it.
            let _ = bounded("client close", conn.closed()).await;
            event
        }
        Err(error) => ServerEvent::ExchangeFailed { error },
    }
}

/// Where a client exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientStage {
    /// `connect()` itself (configuration or handshake).
    Connect,
    /// Opening the stream.
    Open,
    /// Writing the request.
    Write,
    /// Reading the answer: where a TLS 1.3 client learns that the server
    /// refused its certificate.
    Read,
}

/// A failed client exchange.
#[derive(Debug)]
pub struct ClientError {
    /// Where it failed.
    pub stage: ClientStage,
    /// The connection error, when the connection was closed or refused.
    pub connection: Option<ConnectionError>,
    /// The error, as displayed.
    pub message: String,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.stage, self.message)
    }
}

impl ClientError {
    fn new(stage: ClientStage, failure: StreamFailure) -> Self {
        let message = failure.to_string();
        let connection = match failure {
            StreamFailure::Connection(c) => Some(c),
            StreamFailure::Other(_) => None,
        };
        Self {
            stage,
            connection,
            message,
        }
    }

    /// The TLS alert the server sent, if the connection was closed by a
    /// handshake failure.
    pub fn tls_alert(&self) -> Option<u8> {
        match &self.connection {
            Some(ConnectionError::ConnectionClosed(close)) => {
                let code = u64::from(close.error_code);
                (0x100..0x200)
                    .contains(&code)
                    .then_some((code & 0xff) as u8)
            }
            Some(ConnectionError::TransportError(e)) => {
                let code = u64::from(e.code);
                (0x100..0x200)
                    .contains(&code)
                    .then_some((code & 0xff) as u8)
            }
            _ => None,
        }
    }

    /// The reason text the peer put in its close frame.
    pub fn peer_reason(&self) -> Option<String> {
        match &self.connection {
            Some(ConnectionError::ConnectionClosed(close)) => {
                Some(String::from_utf8_lossy(&close.reason).into_owned())
            }
            Some(ConnectionError::ApplicationClosed(close)) => {
                Some(String::from_utf8_lossy(&close.reason).into_owned())
            }
            _ => None,
        }
    }

    /// The application close code, if the peer closed at application level.
    pub fn application_code(&self) -> Option<u64> {
        match &self.connection {
            Some(ConnectionError::ApplicationClosed(close)) => Some(close.error_code.into_inner()),
            _ => None,
        }
    }
}

/// A client endpoint on `127.0.0.1:<random>`.
pub fn client_endpoint() -> anyhow::Result<Endpoint> {
    Ok(Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?)
}

/// quinn client config from a kit (`fedlink_certs::client_tls_config`).
pub fn kit_client_config(kit: &Kit, alpn: &[u8]) -> anyhow::Result<quinn::ClientConfig> {
    let tls = fedlink_certs::client_tls_config(kit, alpn)?;
    Ok(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).context("QUIC client config")?,
    )))
}

/// A client config from raw material, for rejection tests: trusts `ca`
/// (plain WebPKI server verification, ring provider, TLS 1.3), presents
/// `identity` if any, offers `alpn`.
pub fn raw_client_config(
    ca: &CertificateDer<'static>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
) -> anyhow::Result<quinn::ClientConfig> {
    let tls = raw_tls_config(ca, identity, alpn)?;
    Ok(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).context("QUIC client config")?,
    )))
}

/// The rustls config of [`raw_client_config`] (for TLS over TCP).
pub fn raw_tls_config(
    ca: &CertificateDer<'static>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    let builder = rustls::ClientConfig::builder_with_provider(fedlink_certs::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// Connect to `addr` as `server_name`, send `msg` on a new bidirectional
/// stream and read one message back. The connection is closed afterwards.
pub async fn exchange(
    endpoint: &Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    msg: &Message,
) -> anyhow::Result<Result<Message, ClientError>> {
    let connecting = endpoint.connect_with(config, addr, server_name)?;
    let conn = match bounded("connect", connecting).await? {
        Ok(c) => c,
        Err(e) => {
            return Ok(Err(ClientError::new(
                ClientStage::Connect,
                StreamFailure::Connection(e),
            )));
        }
    };
    let result = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| ClientError::new(ClientStage::Open, StreamFailure::Connection(e)))?;
        write_message(&mut send, msg)
            .await
            .map_err(|e| ClientError::new(ClientStage::Write, e))?;
        read_message(&mut recv)
            .await
            .map_err(|e| ClientError::new(ClientStage::Read, e))
    };
    let result = bounded("exchange", result).await?;
    conn.close(VarInt::from_u32(0), b"done");
    Ok(result)
}
