//! The admin client: connect with an admin kit, send one request per
//! stream, read the answer.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use fedlink_certs::{ALPN_ADMIN, Kit};
use fedlink_protocol::admin::{AdminErrorCode, AdminRequest, AdminResponse};
use fedlink_transport::{Conn, FramedRecv, TransportError, TransportKind};

/// Exit code: the coordinator refused the command (refused, not found,
/// invalid).
pub const EXIT_REFUSED: u8 = 3;
/// Exit code: the coordinator could not be reached (network, TLS).
pub const EXIT_UNREACHABLE: u8 = 4;
/// Exit code: anything else.
pub const EXIT_OTHER: u8 = 1;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an answer may take (the engine may be aggregating).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a command did not succeed, with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not reach the coordinator or the TLS handshake failed.
    #[error("cannot reach the coordinator: {0}")]
    Unreachable(String),
    /// The coordinator answered with an error.
    #[error("{code:?}: {message}")]
    Coordinator {
        /// Category.
        code: AdminErrorCode,
        /// What is wrong.
        message: String,
    },
    /// Anything else (local files, protocol violations).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl ClientError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Unreachable(_) => EXIT_UNREACHABLE,
            Self::Coordinator {
                code: AdminErrorCode::Internal,
                ..
            } => EXIT_OTHER,
            Self::Coordinator { .. } => EXIT_REFUSED,
            Self::Other(_) => EXIT_OTHER,
        }
    }
}

fn transport(e: TransportError) -> ClientError {
    ClientError::Unreachable(e.to_string())
}

/// A connection to a coordinator's admin API (QUIC, or TLS over TCP to the
/// coordinator's TCP listener on the same port number).
pub struct AdminClient {
    conn: Conn,
    endpoint: Option<quinn::Endpoint>,
}

impl AdminClient {
    /// Connect with the admin kit in `kit_dir` to `coordinator` (`host:port`),
    /// or to the address in the kit, over `transport`.
    pub async fn connect(
        kit_dir: &Path,
        coordinator: Option<&str>,
        transport: TransportKind,
    ) -> Result<Self, ClientError> {
        let kit = Kit::load(kit_dir)
            .map_err(|e| anyhow::anyhow!("admin kit {}: {e}", kit_dir.display()))?;
        let target = coordinator
            .unwrap_or_else(|| kit.coordinator_addr())
            .to_owned();
        let addr: SocketAddr = tokio::net::lookup_host(&target)
            .await
            .map_err(|e| ClientError::Unreachable(format!("resolving {target}: {e}")))?
            .next()
            .ok_or_else(|| ClientError::Unreachable(format!("{target} has no address")))?;
        let tls = fedlink_certs::client_tls_config(&kit, ALPN_ADMIN)
            .map_err(|e| anyhow::anyhow!("TLS configuration: {e}"))?;
        tracing::debug!(%addr, transport = transport.as_str(), "connecting");
        let dialed = fedlink_transport::dial(
            transport,
            addr,
            tls,
            kit.coordinator_server_name(),
            Duration::from_secs(30),
            fedlink_transport::Congestion::default(),
            CONNECT_TIMEOUT,
        )
        .await
        .map_err(|e| ClientError::Unreachable(format!("{target} ({}): {e}", transport.as_str())))?;
        tracing::debug!(%addr, "connected");
        Ok(Self {
            conn: dialed.conn,
            endpoint: dialed.endpoint,
        })
    }

    /// Send `req`; return the answer (an error answer becomes
    /// [`ClientError::Coordinator`]) and the stream, on which an export's
    /// values follow.
    pub async fn request_stream(
        &self,
        req: &AdminRequest,
    ) -> Result<(AdminResponse, FramedRecv), ClientError> {
        let body = req.to_json().map_err(|e| anyhow::anyhow!("{e}"))?;
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(transport)?;
        tracing::debug!(command = req.command(), "stream open");
        send.chunk(body).await.map_err(transport)?;
        send.finish().map_err(transport)?;
        tracing::debug!(
            command = req.command(),
            "request sent; waiting for the answer"
        );
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, recv.chunk())
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {ANSWER_TIMEOUT:?}"))?
            .map_err(transport)?;
        tracing::debug!(
            command = req.command(),
            bytes = answer.len(),
            "answer received"
        );
        match AdminResponse::from_json(&answer).map_err(|e| anyhow::anyhow!("{e}"))? {
            AdminResponse::Error { code, message } => {
                Err(ClientError::Coordinator { code, message })
            }
            other => Ok((other, recv)),
        }
    }

    /// Send `req` and return the answer.
    pub async fn request(&self, req: &AdminRequest) -> Result<AdminResponse, ClientError> {
        Ok(self.request_stream(req).await?.0)
    }

    /// Wait until the connection is closed (by either side); why it was.
    pub async fn closed(&self) -> String {
        self.conn.closed().await
    }

    /// Close the connection cleanly.
    pub async fn close(self) {
        self.conn.close(fedlink_transport::close::NORMAL, b"done");
        match &self.endpoint {
            Some(e) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), e.wait_idle()).await;
            }
            None => {
                let _ = tokio::time::timeout(Duration::from_secs(1), self.conn.closed()).await;
            }
        }
    }
}
