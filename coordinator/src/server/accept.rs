//! Accepting connections: QUIC and TCP attempts admitted to their handshake
//! (handshake slots, per-source rates, the open connections' caps), the
//! identity and registry checks after it (`core::admission`), the refused
//! handshakes' records, and the hand-off of an admitted connection to the
//! site session (`site_session`) or the admin API (`admin_api`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use fedlink_audit::{CoordEvent, coord};
use fedlink_certs::{Identity, Role};
use fedlink_transport::tcp::TcpIncoming;
use fedlink_transport::{ServerConn, TransportError, close};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::shared::Shared;
use crate::config::CoordinatorConfig;
use crate::core::admission;
use crate::core::limits::SourceRates;
use crate::core::refusals::peer_text;
use crate::core::registry::NotAllowed;

/// A connection attempt admitted to its handshake, holding one of the
/// handshake slots until the handshake ends.
pub(crate) struct Admitted {
    incoming: quinn::Incoming,
    _slot: OwnedSemaphorePermit,
}

/// Decide on a new connection attempt before any cryptography: a source
/// whose address QUIC has not validated yet is sent a Retry (a spoofed
/// source never answers it, so floods from forged addresses cost one
/// stateless packet each); a validated one is refused at once beyond its
/// address's handshake rate (`rates`) or when `handshakes` are all in use,
/// and otherwise gets a handshake slot. Refusals are counted with the
/// failed handshakes, not recorded one by one.
pub(crate) fn admit(
    incoming: quinn::Incoming,
    handshakes: &Arc<Semaphore>,
    rates: &mut SourceRates<IpAddr>,
    shared: &Shared,
) -> Option<Admitted> {
    if !incoming.remote_address_validated() && incoming.may_retry() {
        if let Err(e) = incoming.retry() {
            e.into_incoming().ignore();
        }
        return None;
    }
    let remote = incoming.remote_address();
    match handshake_slot(remote, handshakes, rates, shared) {
        Some(slot) => Some(Admitted {
            incoming,
            _slot: slot,
        }),
        None => {
            incoming.refuse();
            None
        }
    }
}

/// The admission decision both transports share: `remote` within its
/// address's handshake rate (`rates`) and a free handshake slot, or a
/// refusal counted with the failed handshakes (with its reason).
fn handshake_slot(
    remote: std::net::SocketAddr,
    handshakes: &Arc<Semaphore>,
    rates: &mut SourceRates<IpAddr>,
    shared: &Shared,
) -> Option<OwnedSemaphorePermit> {
    if !rates.allow(remote.ip(), Instant::now()) {
        tracing::debug!(%remote, "too many handshakes from this address; refused");
        shared.note_refused(
            remote,
            "too many handshakes from this address (handshakes_per_source_per_sec)",
        );
        return None;
    }
    match handshakes.clone().try_acquire_owned() {
        Ok(slot) => Some(slot),
        Err(_) => {
            tracing::debug!(%remote, "too many handshakes in progress; refused");
            shared.note_refused(remote, "too many handshakes in progress");
            None
        }
    }
}

/// [`admit`] for a TLS-over-TCP connection: TCP's own handshake has
/// validated the source address, so there is no retry; the same per-source
/// rate and the same handshake slots apply. A refused connection is dropped
/// (closed) before any cryptography.
pub(crate) fn admit_tcp(
    incoming: &TcpIncoming,
    handshakes: &Arc<Semaphore>,
    rates: &mut SourceRates<IpAddr>,
    shared: &Shared,
) -> Option<OwnedSemaphorePermit> {
    handshake_slot(incoming.remote_address(), handshakes, rates, shared)
}

/// Handle one incoming connection to the end.
pub(crate) async fn handle_incoming(admitted: Admitted, shared: Arc<Shared>) {
    let Admitted { incoming, _slot } = admitted;
    let remote = incoming.remote_address();
    // Revocations and manifest changes must be in force for THIS handshake.
    shared.reload_if_changed();
    let conn = match incoming.await {
        // Every close from here on records its reason first (see
        // `ServerConn`): `conn.closed` below reads it.
        Ok(c) => ServerConn::new(c),
        Err(e) => {
            // TLS refusals (unknown CA, expired, revoked, wrong role) land
            // here with the verifier's reason. Anyone can cause them: they
            // are counted per source and recorded in bulk, and the text
            // (which may come from the peer) is made safe first.
            handshake_failed(&shared, remote, &format!("handshake failed: {e}"));
            return;
        }
    };
    drop(_slot);
    serve_conn(conn, remote, shared).await;
}

/// Handle one incoming TLS-over-TCP connection to the end: the handshake
/// (bounded by its timeout, holding a handshake slot), then exactly what a
/// QUIC connection gets.
pub(crate) async fn handle_incoming_tcp(
    incoming: TcpIncoming,
    slot: OwnedSemaphorePermit,
    shared: Arc<Shared>,
) {
    let remote = incoming.remote_address();
    shared.reload_if_changed();
    let conn = match incoming.handshake().await {
        Ok(c) => ServerConn::new(c),
        Err(e) => {
            // Keyed by source already: no address in the reason, so that
            // one source's failures of one kind count as one reason.
            let detail = match e {
                TransportError::TcpConnection(d) => d,
                other => other.to_string(),
            };
            let why = format!("handshake failed (TLS over TCP): {detail}");
            handshake_failed(&shared, remote, &why);
            return;
        }
    };
    drop(slot);
    serve_conn(conn, remote, shared).await;
}

/// A failed handshake (either transport): logged and counted with its
/// source's failures (recorded in bulk); `why`, which may come from the
/// peer, is made safe first.
fn handshake_failed(shared: &Shared, remote: std::net::SocketAddr, why: &str) {
    let why = peer_text(why);
    tracing::warn!(%remote, reason = %why, "handshake failed");
    shared.note_refused(remote, &why);
}

/// The fedlink identity of `conn`'s certificate, or why it has none. The
/// transport reads it from the certificate only, so its one error is the
/// certificate's (`TransportError::Identity`); were it ever another, its
/// text is kept as the transport wrote it.
fn peer_identity(conn: &ServerConn) -> Result<Identity, admission::NoIdentity> {
    conn.peer_identity().map_err(no_identity)
}

fn no_identity(e: TransportError) -> admission::NoIdentity {
    match e {
        TransportError::Identity(e) => admission::NoIdentity::Certificate(e),
        other => admission::NoIdentity::Transport(other.to_string()),
    }
}

/// A connection past its handshake, over either transport: identity and
/// role checks, admission, audit, then the site or admin session.
async fn serve_conn(conn: ServerConn, remote: std::net::SocketAddr, shared: Arc<Shared>) {
    // The order of the checks, their texts and entries: `core::admission`.
    let disk = shared.disk_allows_new_work();
    let alpn = conn.negotiated_alpn();
    let peer_addr = remote.to_string();
    let facts = admission::Facts {
        peer_addr: &peer_addr,
        transport: conn.kind().as_str(),
        alpn: alpn.as_deref(),
        identity: peer_identity(&conn),
        cert_serial: conn
            .peer_end_entity()
            .and_then(|ee| fedlink_certs::CertInfo::from_der(&ee).ok())
            .map(|c| c.serial.to_string()),
        disk,
        coordinator: shared.audit().actor(),
    };
    // Counted until the connection ends.
    let mut slot = None;
    let admitted = admission::admit(
        facts,
        |_| {
            let ee = conn
                .peer_end_entity()
                .ok_or(NotAllowed::NoPeerCertificate)?;
            let manifest = shared
                .manifest
                .read()
                .map_err(|_| NotAllowed::ManifestLock)?;
            manifest.check_peer(&ee)?;
            Ok(())
        },
        |identity| {
            slot = Some(shared.connections.admit(&identity.to_string())?);
            Ok(())
        },
    );
    let identity = match admitted {
        Ok(admission::Accepted { identity, audit }) => {
            let crate::core::Effect::AppendAudit { actor, event } = audit else {
                return;
            };
            if let Err(e) = shared.audit().record(&actor, &event) {
                // Nothing runs unaudited: refuse the connection.
                tracing::error!(%remote, %identity, error = %e, "cannot record the connection; refusing it");
                conn.close(close::SHUTDOWN, admission::AUDIT_UNWRITABLE.as_bytes());
                return;
            }
            identity
        }
        Err(refusal) => {
            refuse(&conn, &shared, remote, refusal);
            return;
        }
    };
    let _slot = slot;
    let reason = if identity.role() == Role::Admin {
        super::admin_api::serve_admin(&conn, &identity, remote, &shared).await
    } else {
        let site = identity.name().to_owned();
        match super::site_session::serve_site(&conn, &site, &shared).await {
            Ok(()) => conn.end_reason("closed"),
            Err(e) => {
                tracing::info!(site = %site, error = %e, "connection ended");
                conn.end_reason(e)
            }
        }
    };
    // The peer's own close reason is in there: make it safe.
    let reason = peer_text(&reason);
    let closed = shared.audit().record(
        &identity.to_string(),
        &CoordEvent::ConnClosed(coord::ConnClosed {
            identity: identity.to_string(),
            reason: reason.to_string(),
        }),
    );
    if let Err(e) = closed {
        tracing::error!(%remote, %identity, error = %e, "cannot record the end of a connection");
    }
}

/// Refuse a connection after the handshake as [`admission::admit`]
/// decided: log, audit or count, close.
fn refuse(
    conn: &ServerConn,
    shared: &Shared,
    remote: std::net::SocketAddr,
    refusal: admission::Refusal,
) {
    let code = match refusal.close_as() {
        admission::CloseAs::Shutdown => close::SHUTDOWN,
        admission::CloseAs::Forbidden => close::FORBIDDEN,
    };
    let text = refusal.text();
    match refusal {
        // Low on disk: no audit entry per connection (the `disk.low`
        // entry records the state once).
        admission::Refusal::LowOnDisk(why) => {
            tracing::warn!(%remote, reason = %why, "connection closed: low on disk space");
        }
        // Recorded (best effort: it is refused either way).
        admission::Refusal::Refused(rec) => {
            let admission::Recorded {
                identity, audit, ..
            } = *rec;
            tracing::warn!(%remote, identity = ?identity.map(|i| i.to_string()), reason = text.as_str(), "connection refused");
            if let crate::core::Effect::AppendAudit { actor, event } = audit
                && let Err(e) = shared.audit().record(&actor, &event)
            {
                tracing::error!(%remote, error = %e, "cannot record a refused connection");
            }
        }
        // Beyond the caps: counted with the failed handshakes of its
        // source, not recorded one by one.
        admission::Refusal::OverCaps { identity, why } => {
            tracing::warn!(%remote, %identity, reason = %why, "connection refused");
            shared.note_refused(remote, &text);
        }
    }
    conn.close(code, text.as_bytes());
}

/// Source addresses whose handshake rate is tracked, at most (a few
/// hundred kilobytes).
const MAX_RATE_SOURCES: usize = 8192;

/// Start the acceptor task: it admits the QUIC and TCP connection attempts
/// to their handshakes (handshake slots, per-source rates) and owns the
/// connection tasks. Returns the task, which ends once the endpoint is
/// closed and its connection tasks have ended, and the notifier that stops
/// the TCP accepts.
pub(super) fn spawn_acceptor(
    cfg: &CoordinatorConfig,
    endpoint: &quinn::Endpoint,
    tcp: Option<fedlink_transport::tcp::TcpServer>,
    shared: &Arc<Shared>,
) -> (tokio::task::JoinHandle<()>, Arc<tokio::sync::Notify>) {
    let accept_shared = shared.clone();
    let accept_endpoint = endpoint.clone();
    let handshakes = Arc::new(Semaphore::new(cfg.max_handshakes_in_flight));
    let mut rates = SourceRates::new(
        cfg.handshake_burst_per_source,
        cfg.handshakes_per_source_per_sec,
        MAX_RATE_SOURCES,
    );
    // Connection tasks are owned here, so that shutdown can wait for them:
    // each records `conn.closed` as it ends, and a clean shutdown leaves an
    // audit log with every connection's end in it.
    let tcp_stop = Arc::new(tokio::sync::Notify::new());
    let stop_tcp = tcp_stop.clone();
    let acceptor = tokio::spawn(async move {
        let mut tcp = tcp;
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                incoming = accept_endpoint.accept() => match incoming {
                    Some(incoming) => {
                        if let Some(permit) = admit(incoming, &handshakes, &mut rates, &accept_shared) {
                            tasks.spawn(handle_incoming(permit, accept_shared.clone()));
                        }
                    }
                    // The endpoint is closed: shutting down.
                    None => break,
                },
                accepted = accept_tcp(tcp.as_ref()) => match accepted {
                    Ok(incoming) => {
                        if let Some(slot) = admit_tcp(&incoming, &handshakes, &mut rates, &accept_shared) {
                            tasks.spawn(handle_incoming_tcp(incoming, slot, accept_shared.clone()));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "accepting a TCP connection"),
                },
                _ = tcp_stop.notified() => tcp = None,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    });
    (acceptor, stop_tcp)
}
/// The next TCP connection of the listener, if there is one (pending forever
/// otherwise, so that a `select!` arm without a listener never fires).
async fn accept_tcp(
    tcp: Option<&fedlink_transport::tcp::TcpServer>,
) -> Result<TcpIncoming, TransportError> {
    match tcp {
        Some(t) => t.accept().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlink_certs::IdentityError;

    /// The refusal's text is what it was when the driver passed the
    /// transport's error as a string: `NoIdentity` reads as
    /// `TransportError::Identity` does.
    #[test]
    fn no_identity_reads_as_the_transports_error() {
        for e in [
            IdentityError::NoIdentity,
            IdentityError::NoPeerCertificate,
            IdentityError::MultipleIdentities(2),
            IdentityError::UnexpectedPeerIdentityType,
            IdentityError::BadCertificate("truncated".into()),
        ] {
            let before = TransportError::Identity(e.clone()).to_string();
            let why = admission::Refused::NoIdentity(no_identity(TransportError::Identity(e)));
            assert_eq!(why.to_string(), format!("no fedlink identity: {before}"));
        }
        // Any other transport error keeps its own text.
        let other = TransportError::Config("no certificate chain".into());
        let before = other.to_string();
        let why = admission::Refused::NoIdentity(no_identity(other));
        assert_eq!(why.to_string(), format!("no fedlink identity: {before}"));
        assert_eq!(
            admission::NoIdentity::Certificate(IdentityError::NoIdentity).to_string(),
            "peer identity: certificate carries no fedlink:// identity URI"
        );
    }
}
