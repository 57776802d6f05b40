//! One task per site connection: mTLS identity checks, the control stream
//! (Hello/Welcome, offers, heartbeats), model downloads and update uploads.
//! Uploads are streamed to a spool file while their hash is computed,
//! verified, validated (pass 1), and only then handed to the engine.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fedlink_certs::{Role, check_role_for_alpn};
use fedlink_protocol::message::{
    ModelManifest, OfferDecision, Reject, RejectCode, UploadResult, Welcome,
};
use fedlink_protocol::{Message, SignedEnvelope, VersionRange};
use fedlink_transport::{
    FramedRecv, FramedSend, TransportError, accept_bi, close, negotiated_alpn, peer_end_entity,
    peer_identity,
};
use quinn::Connection;
use tokio::sync::{mpsc, oneshot};

use super::Shared;
use super::engine::{Event, UpdateReady, UploadTicket, payload_verify_code, unix_ms};
use super::spool::{self, SpoolWriter};
use super::wire::RecordReader;
use crate::round::{ConnId, SiteCapabilities};

/// How long a new connection may take to open its control stream and say
/// Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Handle one incoming connection to the end.
pub(crate) async fn handle_incoming(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let remote = incoming.remote_address();
    // Revocations and manifest changes must be in force for THIS handshake.
    shared.reload_if_changed();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // TLS refusals (unknown CA, expired, revoked, wrong role) land
            // here with the verifier's reason.
            tracing::warn!(%remote, error = %e, "handshake failed");
            return;
        }
    };
    let identity = match peer_identity(&conn) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "peer has no fedlink identity");
            conn.close(close::FORBIDDEN, e.to_string().as_bytes());
            return;
        }
    };
    let alpn = negotiated_alpn(&conn);
    if let Err(e) = check_role_for_alpn(&identity, alpn.as_deref()) {
        tracing::warn!(%remote, %identity, error = %e, "role does not match the protocol");
        conn.close(close::FORBIDDEN, e.to_string().as_bytes());
        return;
    }
    if identity.role() != Role::Site {
        tracing::warn!(%remote, %identity, "admin connections are not served on this endpoint yet");
        conn.close(
            close::FORBIDDEN,
            b"the admin API is not available on this coordinator yet",
        );
        return;
    }
    let checked = peer_end_entity(&conn)
        .ok_or_else(|| "no peer certificate".to_owned())
        .and_then(|ee| {
            let manifest = shared
                .manifest
                .read()
                .map_err(|_| "manifest lock poisoned".to_owned())?;
            manifest
                .check_peer(&ee)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
    if let Err(e) = checked {
        tracing::warn!(%remote, %identity, error = %e, "site refused");
        conn.close(close::FORBIDDEN, e.as_bytes());
        return;
    }
    let site = identity.name().to_owned();
    if let Err(e) = serve_site(&conn, &site, &shared).await {
        tracing::info!(site = %site, error = %e, "connection ended");
    }
}

async fn serve_site(
    conn: &Connection,
    site: &str,
    shared: &Arc<Shared>,
) -> Result<(), TransportError> {
    let (mut send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, accept_bi(conn))
        .await
        .map_err(|_| TransportError::UnexpectedEnd("control stream within 10 s"))??;
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, recv.message())
        .await
        .map_err(|_| TransportError::UnexpectedEnd("Hello within 10 s"))??
    {
        Message::Hello(h) => h,
        other => {
            let _ = send
                .message(&Message::Reject(Reject {
                    code: RejectCode::UnexpectedMessage,
                    message: format!("expected Hello, got {}", other.name()),
                }))
                .await;
            conn.close(close::PROTOCOL, b"expected Hello");
            return Ok(());
        }
    };
    let Some(version) = VersionRange::SUPPORTED.negotiate(&hello.versions) else {
        let _ = send
            .message(&Message::Reject(Reject {
                code: RejectCode::UnsupportedVersion,
                message: format!(
                    "no common protocol version: coordinator speaks {:?}, site {:?}",
                    VersionRange::SUPPORTED,
                    hello.versions
                ),
            }))
            .await;
        let _ = send.finish();
        let _ = conn.closed().await;
        return Ok(());
    };
    let site_id = fedlink_protocol::SiteId::new(site)
        .map_err(|e| TransportError::Stream(format!("site name: {e}")))?;
    send.message(&Message::Welcome(Welcome {
        protocol_version: version,
        site_id,
        federation_id: shared.federation.clone(),
        heartbeat_interval_ms: shared.heartbeat.as_millis() as u64,
    }))
    .await?;
    let compatible = shared.job_encoding.is_none_or(|enc| {
        hello
            .capabilities
            .codecs
            .iter()
            .any(|c| same_family(*c, enc.values()))
    });
    let conn_id = ConnId(shared.next_conn.fetch_add(1, Ordering::Relaxed));
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let _ = shared.engine.send(Event::Connected {
        site: site.to_owned(),
        conn_id,
        conn: conn.clone(),
        control: tx,
        capabilities: SiteCapabilities {
            compatible,
            num_examples: None,
        },
    });
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if send.message(&m).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
    });
    let result = control_loop(conn, site, shared, &mut recv).await;
    let _ = shared.engine.send(Event::Disconnected {
        site: site.to_owned(),
        conn_id,
    });
    writer.abort();
    result
}

fn same_family(a: fedlink_protocol::ValueCodec, b: fedlink_protocol::ValueCodec) -> bool {
    std::mem::discriminant(&a) == std::mem::discriminant(&b)
}

async fn control_loop(
    conn: &Connection,
    site: &str,
    shared: &Arc<Shared>,
    recv: &mut FramedRecv,
) -> Result<(), TransportError> {
    loop {
        tokio::select! {
            msg = recv.message_or_end() => match msg? {
                Some(Message::OfferResponse(r)) => {
                    let (accepted, reason) = match r.decision {
                        OfferDecision::Accept => (true, String::new()),
                        OfferDecision::Decline { reason } => (false, reason),
                    };
                    let _ = shared.engine.send(Event::OfferResponse {
                        site: site.to_owned(),
                        round: r.round.0,
                        accepted,
                        reason,
                    });
                }
                Some(Message::Heartbeat(h)) => {
                    tracing::trace!(site, seq = h.seq, "heartbeat");
                }
                Some(Message::Bye(b)) => {
                    tracing::info!(site, reason = %b.reason, "site said bye");
                    conn.close(close::NORMAL, b"bye");
                    return Ok(());
                }
                None => return Ok(()),
                Some(other) => {
                    tracing::warn!(site, message = other.name(), "unexpected message on the control stream");
                    conn.close(close::PROTOCOL, b"unexpected message on the control stream");
                    return Ok(());
                }
            },
            stream = accept_bi(conn) => {
                let (send, recv) = stream?;
                let shared = shared.clone();
                let site = site.to_owned();
                tokio::spawn(async move {
                    if let Err(e) = handle_stream(&site, &shared, send, recv).await {
                        tracing::warn!(site = %site, error = %e, "stream failed");
                    }
                });
            }
        }
    }
}

async fn handle_stream(
    site: &str,
    shared: &Arc<Shared>,
    mut send: FramedSend,
    mut recv: FramedRecv,
) -> Result<(), TransportError> {
    match recv.message().await? {
        Message::ModelFetch(f) => serve_model(shared, f.hash, send).await,
        Message::DeltaUpload(u) => receive_upload(site, shared, u.envelope, send, recv).await,
        other => {
            send.message(&Message::Reject(Reject {
                code: RejectCode::UnexpectedMessage,
                message: format!(
                    "a new stream must start with ModelFetch or DeltaUpload, not {}",
                    other.name()
                ),
            }))
            .await?;
            send.finish()
        }
    }
}

async fn serve_model(
    shared: &Arc<Shared>,
    hash: fedlink_protocol::ModelHash,
    mut send: FramedSend,
) -> Result<(), TransportError> {
    // Bounded: each download holds a read buffer, a chunk and QUIC send
    // buffers; many sites fetching a new model together must not add up.
    let Ok(_permit) = shared.downloads.acquire().await else {
        return send.finish();
    };
    let wire = shared.wire_model(&hash);
    let Some(wire) = wire else {
        send.message(&Message::Reject(Reject {
            code: RejectCode::UnexpectedMessage,
            message: format!("unknown model version {hash}"),
        }))
        .await?;
        return send.finish();
    };
    send.message(&Message::ModelManifest(Box::new(ModelManifest {
        hash: wire.hash,
        spec: wire.spec.clone(),
        encoding: wire.encoding,
        payload_len: wire.payload_len,
        num_chunks: wire.num_chunks,
    })))
    .await?;
    let mut reader = RecordReader::open(&wire.path).map_err(TransportError::Stream)?;
    loop {
        let rec =
            tokio::task::block_in_place(|| reader.next_record()).map_err(TransportError::Stream)?;
        let Some(rec) = rec else { break };
        send.chunk(rec).await?;
    }
    send.finish()
}

async fn reject_upload(
    send: &mut FramedSend,
    recv: FramedRecv,
    code: RejectCode,
    message: String,
) -> Result<(), TransportError> {
    let _ = recv.into_inner().stop(close::PROTOCOL);
    send.message(&Message::UploadResult(UploadResult::Reject {
        code,
        message,
    }))
    .await?;
    send.finish()
}

async fn receive_upload(
    site: &str,
    shared: &Arc<Shared>,
    envelope: SignedEnvelope,
    mut send: FramedSend,
    mut recv: FramedRecv,
) -> Result<(), TransportError> {
    let Ok(_permit) = shared.uploads.acquire().await else {
        return reject_upload(
            &mut send,
            recv,
            RejectCode::ShuttingDown,
            "shutting down".into(),
        )
        .await;
    };
    let (reply, answer) = oneshot::channel();
    let _ = shared.engine.send(Event::PrepareUpload {
        site: site.to_owned(),
        envelope: Box::new(envelope.clone()),
        reply,
    });
    let ticket = match answer.await {
        Ok(Ok(t)) => t,
        Ok(Err((code, message))) => return reject_upload(&mut send, recv, code, message).await,
        Err(_) => {
            return reject_upload(
                &mut send,
                recv,
                RejectCode::ShuttingDown,
                "shutting down".into(),
            )
            .await;
        }
    };
    let UploadTicket {
        mut verifier,
        mut validator,
        spec,
        spool_path,
    } = ticket;
    let mut spool = match SpoolWriter::create(spool_path) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(site, error = %e, "cannot create a spool file");
            return reject_upload(
                &mut send,
                recv,
                RejectCode::Internal,
                "spool unavailable".into(),
            )
            .await;
        }
    };
    // Receive: hash and spool every chunk record; never more than declared.
    let received: Result<(), (RejectCode, String)> = async {
        while verifier.remaining() > 0 {
            let rec = recv
                .chunk()
                .await
                .map_err(|e| (RejectCode::Malformed, format!("receiving the payload: {e}")))?;
            verifier
                .update(&rec)
                .map_err(|e| (payload_verify_code(&e), e.to_string()))?;
            tokio::task::block_in_place(|| spool.write(&rec))
                .map_err(|e| (RejectCode::Internal, e.to_string()))?;
        }
        match recv.next_frame().await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err((
                RejectCode::PayloadMismatch,
                "more payload than the signed length".into(),
            )),
            Err(e) => Err((RejectCode::Malformed, format!("after the payload: {e}"))),
        }
    }
    .await;
    let spool_path = spool.path().to_owned();
    if let Err((code, message)) = received {
        drop(spool);
        let _ = std::fs::remove_file(&spool_path);
        tracing::warn!(site, ?code, reason = %message, "upload refused while receiving");
        return reject_upload(&mut send, recv, code, message).await;
    }
    let bytes = verifier.received();
    if let Err(e) = verifier.finish() {
        drop(spool);
        let _ = std::fs::remove_file(&spool_path);
        tracing::warn!(site, error = %e, "upload payload does not match its signed header");
        return reject_upload(&mut send, recv, payload_verify_code(&e), e.to_string()).await;
    }
    let path = match tokio::task::block_in_place(|| spool.finish()) {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&spool_path);
            return reject_upload(&mut send, recv, RejectCode::Internal, e.to_string()).await;
        }
    };
    // Pass 1: decode from the spool and validate (NaN/Inf, magnitudes,
    // norm for clipping) without touching the aggregator.
    let encoding = envelope.header.encoding;
    let check_path = path.clone();
    let check = tokio::task::spawn_blocking(move || {
        let r = spool::for_each_chunk(&check_path, &spec, encoding, |offset, values| {
            validator.feed(offset, values).map_err(|e| e.to_string())
        });
        match r {
            Ok(Ok(())) => validator.finish().map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .unwrap_or_else(|e| Err(format!("validation task failed: {e}")));
    let (reply, answer) = oneshot::channel();
    let _ = shared.engine.send(Event::UpdateReady(Box::new(UpdateReady {
        site: site.to_owned(),
        envelope,
        spool_path: path,
        bytes,
        check,
        reply,
    })));
    let result = answer.await.unwrap_or_else(|_| UploadResult::Reject {
        code: RejectCode::ShuttingDown,
        message: "shutting down".into(),
    });
    tracing::debug!(site, at = unix_ms(), ?result, "upload answered");
    send.message(&Message::UploadResult(result)).await?;
    send.finish()
}
