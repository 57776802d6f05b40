//! One task per site connection, once `accept` has admitted it: the
//! control stream (Hello/Welcome, offers, heartbeats), model downloads and
//! update uploads.
//! Uploads are streamed to a spool file while their hash is computed,
//! verified, validated (pass 1), and only then handed to the engine.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fedlink_protocol::message::{
    AuditHead, ModelManifest, OfferDecision, Reject, RejectCode, UploadResult, Welcome,
};
use fedlink_protocol::{Message, ModelUpdateFetch, SignedEnvelope, UpdateManifest};
use fedlink_transport::{FramedRecv, FramedSend, ServerConn, TransportError, close};
use tokio::sync::{mpsc, oneshot};

use super::clock::unix_ms;
use super::event::{
    CheckError, Event, PayloadCheck, ReceivedUpload, SiteConnected, UpdateReady, UploadInterrupted,
    UploadTicket,
};
use super::limits;
use super::shared::Shared;
use super::spool::SpoolWriter;
use crate::core::actions::update_received_details;
use crate::core::session::{Control, Cut as ControlCut, Session, Stream};
use crate::round::{ConnId, SiteCapabilities};
use crate::store::wire::{self, RecordReader};

pub(super) async fn serve_site(
    conn: &ServerConn,
    site: &str,
    shared: &Arc<Shared>,
) -> Result<(), TransportError> {
    let hello_timeout = shared.peer.hello_timeout;
    let (mut send, mut recv) = tokio::time::timeout(hello_timeout, conn.accept_bi())
        .await
        .map_err(|_| {
            TransportError::UnexpectedEnd("control stream in time (hello_timeout_secs)")
        })??;
    let first = tokio::time::timeout(hello_timeout, recv.message())
        .await
        .map_err(|_| TransportError::UnexpectedEnd("Hello in time (hello_timeout_secs)"))??;
    let (session, hello) = match Session::from_hello(first) {
        Ok(opened) => opened,
        Err(refused) => {
            let _ = send
                .message(&Message::Reject(refused.reject().clone()))
                .await;
            match refused.close_text() {
                Some(text) => conn.close(close::PROTOCOL, text.as_bytes()),
                None => {
                    let _ = send.finish();
                    let _ = conn.closed().await;
                }
            }
            return Ok(());
        }
    };
    let version = session.version();
    let site_id = fedlink_protocol::SiteId::new(site)
        .map_err(|e| TransportError::Stream(format!("site name: {e}")))?;
    let compatible = match crate::core::compatibility(
        &hello.capabilities.codecs,
        version,
        &shared.job_needs(),
    ) {
        Ok(()) => true,
        Err(why) => {
            tracing::warn!(site = %site, reason = %why, "site is not compatible with the running job: it is not offered its rounds");
            false
        }
    };
    let conn_id = ConnId(shared.next_conn.fetch_add(1, Ordering::Relaxed));
    // The operator's view of this site's link, for as long as this session.
    let via_proxy = hello
        .capabilities
        .features
        .iter()
        .any(|f| f == super::shared::VIA_PROXY_FEATURE);
    if let Ok(mut links) = shared.site_links.lock() {
        links.insert(
            site_id.clone(),
            super::shared::SiteLink {
                conn: conn.clone(),
                via_proxy,
            },
        );
    }
    let _link = super::shared::LinkGuard {
        shared,
        site: site_id.clone(),
        conn_id: conn.stable_id(),
    };
    let (tx, mut rx) = mpsc::channel::<Message>(limits::CONTROL_QUEUE);
    let control = tx.clone();
    // Known to the engine before the site hears Welcome: whatever the site
    // (or an admin it tells) asks next is queued behind this, so `status`
    // never misses a welcomed site. What the engine sends meanwhile waits
    // in `rx` until the writer below starts, after Welcome.
    let _ = shared
        .engine
        .send(Event::Connected(SiteConnected {
            site: site_id.clone(),
            conn_id,
            conn: conn.clone(),
            control: tx,
            capabilities: SiteCapabilities {
                compatible,
                num_examples: None,
            },
            codecs: hello.capabilities.codecs.clone(),
            protocol_version: version,
        }))
        .await;
    let welcomed = send
        .message(&Message::Welcome(Welcome {
            protocol_version: version,
            site_id: site_id.clone(),
            federation_id: shared.federation.clone(),
            heartbeat_interval_ms: shared.heartbeat.as_millis() as u64,
        }))
        .await;
    if let Err(e) = welcomed {
        disconnected(shared, &site_id, conn_id).await;
        return Err(e);
    }
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            // Offers in the encoding the site's version knows; what its
            // version lacks is not sent (`core::session`).
            let Some(m) = session.to_site(m) else {
                continue;
            };
            if send.message(&m).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
    });
    // Between messages the control stream may idle; a message that has
    // started must arrive whole (a site trickling bytes holds nothing).
    recv.set_frame_timeout(shared.peer.control_frame_timeout);
    let heads = session.heads().then_some(control);
    let result = control_loop(conn, &site_id, session, shared, &mut recv, heads).await;
    disconnected(shared, &site_id, conn_id).await;
    writer.abort();
    result
}

/// Tell the engine that `site`'s connection `conn_id` ended.
async fn disconnected(shared: &Shared, site: &fedlink_protocol::SiteId, conn_id: ConnId) {
    let _ = shared
        .engine
        .send(Event::Disconnected {
            site: site.clone(),
            conn_id,
        })
        .await;
}

async fn control_loop(
    conn: &ServerConn,
    site: &fedlink_protocol::SiteId,
    session: Session,
    shared: &Arc<Shared>,
    recv: &mut FramedRecv,
    heads: Option<mpsc::Sender<Message>>,
) -> Result<(), TransportError> {
    // Streams the site opens (model fetches, uploads) are accepted on a task
    // of their own. Reading a frame is not cancel-safe: racing the control
    // stream's read against `accept_bi` in a `select!` dropped a half-read
    // frame whenever a stream arrived mid-message, and the next read started
    // inside it ("bad frame magic").
    let acceptor = {
        let conn = conn.clone();
        let shared = shared.clone();
        let site = site.clone();
        let tasks = shared.tasks.clone();
        tasks.spawn(async move {
            loop {
                let (send, recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(site = %site, error = %e, "no more streams");
                        return;
                    }
                };
                let shared = shared.clone();
                let site = site.clone();
                let conn = conn.clone();
                shared.tasks.clone().spawn(async move {
                    if let Err(e) = handle_stream(&conn, &site, session, &shared, send, recv).await
                    {
                        tracing::warn!(site = %site, error = %e, "stream failed");
                    }
                });
            }
        })
    };
    let result = read_control(conn, site, session, shared, recv, heads).await;
    acceptor.abort();
    result
}

/// The site's control messages, in order, until the stream or the
/// connection ends.
async fn read_control(
    conn: &ServerConn,
    site_id: &fedlink_protocol::SiteId,
    session: Session,
    shared: &Arc<Shared>,
    recv: &mut FramedRecv,
    heads: Option<mpsc::Sender<Message>>,
) -> Result<(), TransportError> {
    let site = site_id.as_str();
    // A compromised site must not make the coordinator spend without bound:
    // control messages at a bounded rate (beyond it the connection is cut),
    // audit heads — each a signed, fsynced entry — at a lower one (beyond it
    // they are ignored).
    let mut budget = shared.peer.control_budget();
    let mut head_budget = shared.peer.head_budget();
    let mut heads_ignored = 0u64;
    loop {
        let Some(msg) = recv.message_or_end().await? else {
            return Ok(());
        };
        let within_budget = budget.take(Instant::now());
        let control = session.control(msg, within_budget, || head_budget.take(Instant::now()));
        match control {
            Control::OfferResponse(r) => {
                let (accepted, reason) = match r.decision {
                    OfferDecision::Accept => (true, String::new()),
                    OfferDecision::Decline { reason } => (false, reason),
                };
                let _ = shared
                    .engine
                    .send(Event::OfferResponse {
                        site: site_id.clone(),
                        round: r.round,
                        accepted,
                        reason,
                    })
                    .await;
            }
            Control::Heartbeat(h) => {
                tracing::trace!(site, seq = h.seq, "heartbeat");
            }
            // Verified (signature first) and counted by the engine, which
            // audits the verdict.
            Control::EvalReport(report) => {
                let _ = shared
                    .engine
                    .send(Event::EvalReport {
                        site: site_id.clone(),
                        report,
                    })
                    .await;
            }
            Control::IgnoreHead => {
                heads_ignored += 1;
                if heads_ignored == 1 {
                    tracing::warn!(
                        site,
                        "audit heads beyond 16 at once or one a second are ignored"
                    );
                }
            }
            Control::AuditHead(h) => {
                if let Some(answer) = site_audit_head(shared, site, &h)
                    && let Some(tx) = &heads
                {
                    // Full only while the site is not reading: it misses
                    // this answer (its head budget bounds how many it asks).
                    let _ = tx.try_send(Message::AuditHead(answer));
                }
            }
            Control::Bye(b) => {
                tracing::info!(site, reason = %b.reason, "site said bye");
                conn.close(close::NORMAL, b"bye");
                return Ok(());
            }
            Control::Cut(cut) => {
                match cut {
                    ControlCut::OverBudget => {
                        tracing::warn!(site, reason = cut.text(), "closing the connection");
                    }
                    ControlCut::Unexpected { message } => {
                        tracing::warn!(site, message, "unexpected message on the control stream");
                    }
                }
                conn.close(close::PROTOCOL, cut.text().as_bytes());
                return Ok(());
            }
        }
    }
}

/// A site sent its signed audit head: check it with the site's key from the
/// manifest and record it (`site.audit_head`), or record why it was refused
/// (`site.audit_head_rejected`; the connection stays). Returns the
/// coordinator's own signed head to answer with, once the site's is recorded.
fn site_audit_head(shared: &Shared, site: &str, h: &AuditHead) -> Option<AuditHead> {
    let decision = {
        let manifest = shared.manifest.read().ok();
        crate::core::audit_head::site_head(shared.federation.as_str(), manifest.as_deref(), site, h)
    };
    let crate::core::Effect::AppendAudit { actor, event } = decision.audit else {
        return None;
    };
    let audit = shared.audit();
    match decision.verdict {
        Ok(()) => {
            if let Err(e) = audit.record(&actor, &event) {
                tracing::error!(site, error = %e, "cannot record the site's audit head");
                return None;
            }
            audit
                .head_message()
                .map_err(
                    |e| tracing::error!(error = %e, "cannot sign the coordinator's audit head"),
                )
                .ok()
        }
        Err(reason) => {
            tracing::warn!(site, reason = %reason, "site audit head refused");
            if let Err(e) = audit.record(&actor, &event) {
                tracing::error!(site, error = %e, "cannot record a refused audit head");
            }
            None
        }
    }
}

async fn handle_stream(
    conn: &ServerConn,
    site: &fedlink_protocol::SiteId,
    session: Session,
    shared: &Arc<Shared>,
    mut send: FramedSend,
    mut recv: FramedRecv,
) -> Result<(), TransportError> {
    // A stream that never says what it is for must not hold a task and its
    // buffers for as long as the connection lives.
    let first = tokio::time::timeout(shared.peer.first_message_timeout, recv.message())
        .await
        .map_err(|_| {
            TransportError::UnexpectedEnd(
                "the stream's first message in time (stream_first_message_secs)",
            )
        })??;
    match session.stream(first) {
        Stream::FetchModel { hash, from_record } => {
            serve_model(conn, shared, hash, from_record, send).await
        }
        Stream::FetchUpdate(f) => serve_update(conn, shared, f, send).await,
        Stream::Upload { envelope, resume } => {
            let up = Upload {
                site,
                session,
                resume,
            };
            receive_upload(conn, up, shared, *envelope, send, recv).await
        }
        Stream::Refuse(reject) => {
            send.message(&Message::Reject(reject)).await?;
            send.finish()
        }
    }
}

async fn serve_model(
    conn: &ServerConn,
    shared: &Arc<Shared>,
    hash: fedlink_protocol::ModelHash,
    from_record: u64,
    send: FramedSend,
) -> Result<(), TransportError> {
    let Some(served) = shared.wire_model(&hash) else {
        let reject = Message::Reject(Reject {
            code: RejectCode::UnexpectedMessage,
            message: format!("unknown model version {hash}"),
        });
        return serve_download(conn, shared, from_record, send, || Err(reject)).await;
    };
    // With downlink updates the wire form is made when a site first asks
    // for the whole model (`served_wire`): before a download slot is
    // taken, so waiting for it holds none.
    let answer = match served.wire().await {
        Ok(wire) => Ok((
            Message::ModelManifest(Box::new(ModelManifest {
                hash: wire.hash,
                spec: wire.spec.clone(),
                encoding: wire.encoding,
                payload_len: wire.payload_len,
                num_chunks: wire.num_chunks,
            })),
            wire.path.clone(),
        )),
        Err(e) => {
            tracing::error!(model = %hash, error = %e, "cannot make the model's wire form for a download");
            // The details (paths, the store's error) stay in this log.
            Err(Message::Reject(Reject {
                code: RejectCode::Internal,
                message: format!("model version {hash} cannot be served now"),
            }))
        }
    };
    serve_download(conn, shared, from_record, send, || answer).await
}

/// Answer a [`ModelUpdateFetch`]: the update `base → hash` when it is the
/// one being served (from `from_record` on), else the whole model (every
/// record: the site's kept update records are of no use for it).
async fn serve_update(
    conn: &ServerConn,
    shared: &Arc<Shared>,
    fetch: ModelUpdateFetch,
    send: FramedSend,
) -> Result<(), TransportError> {
    let Some(update) = shared.wire_update(&fetch.base, &fetch.hash) else {
        return serve_model(conn, shared, fetch.hash, 0, send).await;
    };
    serve_download(conn, shared, fetch.from_record, send, || {
        let wire = &update.wire;
        let manifest = Message::UpdateManifest(Box::new(UpdateManifest {
            base: update.base,
            hash: wire.hash,
            spec: wire.spec.clone(),
            encoding: wire.encoding,
            payload_len: wire.payload_len,
            num_chunks: wire.num_chunks,
        }));
        Ok((manifest, wire.path.clone()))
    })
    .await
}

/// A download, model or update: within the download bounds, `answer`
/// gives the manifest and the wire file whose records follow it (from
/// `from_record` on), or the message refusing the fetch.
async fn serve_download(
    conn: &ServerConn,
    shared: &Arc<Shared>,
    from_record: u64,
    mut send: FramedSend,
    answer: impl FnOnce() -> Result<(Message, std::path::PathBuf), Message>,
) -> Result<(), TransportError> {
    // Bounded: each download holds a read buffer, a chunk and QUIC send
    // buffers; many sites fetching a new model together must not add up.
    let Ok(_permit) = shared.downloads.acquire().await else {
        return send.finish();
    };
    // On a long path the download may have its bandwidth-delay product in
    // flight (at most `max_concurrent_downloads` such windows at once);
    // on a LAN the window stays as small as before.
    let _window = conn.open_download_window();
    match answer() {
        Ok((manifest, path)) => {
            send.message(&manifest).await?;
            stream_records(&path, from_record, &mut send).await?;
        }
        Err(refusal) => send.message(&refusal).await?,
    }
    send.finish()
}

/// Stream the chunk records of a wire file (a model's or an update's), from
/// record `from_record` on (a resumed download: the site kept the records
/// before and checks the whole result's hash at the end).
async fn stream_records(
    path: &std::path::Path,
    from_record: u64,
    send: &mut FramedSend,
) -> Result<(), TransportError> {
    // Stream each record from the file in pieces handed to QUIC without a
    // copy: a download holds what QUIC buffers (bounded by the send window),
    // never a whole record. Pieces of 256 KiB come from a bounded pool and
    // go back to it once QUIC has them acknowledged (no pages freed and
    // faulted in again per piece: `super::pool`).
    const PIECE: usize = 256 << 10;
    let stream_err = |e: wire::WireError| TransportError::Stream(e.to_string());
    let mut reader = RecordReader::open(path).map_err(stream_err)?;
    let mut index = 0u64;
    loop {
        let head = tokio::task::block_in_place(|| reader.next_head()).map_err(stream_err)?;
        let Some((head, len)) = head else { break };
        index += 1;
        if index <= from_record {
            tokio::task::block_in_place(|| reader.skip_body(len.saturating_sub(head.len())))
                .map_err(stream_err)?;
            continue;
        }
        send.begin_chunk(len).await?;
        send.chunk_body(bytes::Bytes::copy_from_slice(&head))
            .await?;
        let mut left = len.saturating_sub(head.len());
        while left > 0 {
            let mut piece = super::pool::PIECES.take();
            piece.resize(left.min(PIECE), 0);
            tokio::task::block_in_place(|| reader.read_body(&mut piece)).map_err(stream_err)?;
            left -= piece.len();
            send.chunk_body(bytes::Bytes::from_owner(piece)).await?;
        }
    }
    Ok(())
}

async fn reject_upload(
    send: &mut FramedSend,
    recv: FramedRecv,
    code: RejectCode,
    message: String,
) -> Result<(), TransportError> {
    recv.stop(close::PROTOCOL);
    send.message(&Message::UploadResult(UploadResult::Reject {
        code,
        message,
    }))
    .await?;
    send.finish()
}

/// Record `update.received` for an upload refused here (while receiving);
/// best effort, as the upload is refused either way.
fn audit_upload_refused(
    shared: &Shared,
    site: &str,
    envelope: &SignedEnvelope,
    bytes: u64,
    reason: &str,
) {
    let actor = fedlink_audit::event::site_actor(shared.federation.as_str(), site);
    let event = update_received_details(envelope, bytes, Some(reason));
    if let Err(e) = shared.audit().record(&actor, &event) {
        tracing::error!(site, error = %e, "cannot record a refused upload");
    }
}

/// Puts the connection's receive window back to the idle size when an
/// upload ends, however it ends.
struct UploadWindow<'a> {
    conn: &'a ServerConn,
    _share: fedlink_transport::WindowShare,
}

impl Drop for UploadWindow<'_> {
    fn drop(&mut self) {
        self.conn.close_upload_window();
    }
}

/// Which upload a stream carries.
#[derive(Clone, Copy, Debug)]
struct Upload<'a> {
    site: &'a fedlink_protocol::SiteId,
    /// The site's negotiated session.
    session: Session,
    /// A resume of an interrupted upload (`ResumeUpload`), not a new one.
    resume: bool,
}

type InFlightKey = (fedlink_protocol::SiteId, [u8; 16]);

/// Marks an upload as being received, by (site, nonce), until dropped: a
/// resume of it waits for this attempt to end (and be kept) first.
struct InFlight<'a> {
    shared: &'a Shared,
    key: InFlightKey,
    done: tokio::sync::watch::Sender<()>,
}

impl<'a> InFlight<'a> {
    fn register(shared: &'a Shared, key: InFlightKey) -> Self {
        let (done, rx) = tokio::sync::watch::channel(());
        if let Ok(mut m) = shared.uploads_in_flight.lock() {
            m.insert(key.clone(), rx);
        }
        Self { shared, key, done }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.shared.uploads_in_flight.lock()
            && m.get(&self.key)
                .is_some_and(|rx| rx.same_channel(&self.done.subscribe()))
        {
            m.remove(&self.key);
        }
    }
}

/// Wait (at most `limit`) until no attempt of the upload `key` is being
/// received: a site that reconnects at once resumes before the coordinator
/// has seen its old connection end.
async fn wait_until_not_in_flight(shared: &Shared, key: &InFlightKey, limit: Duration) {
    let rx = shared
        .uploads_in_flight
        .lock()
        .ok()
        .and_then(|m| m.get(key).cloned());
    if let Some(mut rx) = rx {
        // Ends with an error when the attempt's sender is dropped.
        let _ = tokio::time::timeout(limit, rx.changed()).await;
    }
}

/// How receiving an upload's records ended early.
enum Cut {
    /// The upload is refused (bad records, local failure).
    Refused(RejectCode, String),
    /// The connection was lost or the site stopped sending: what arrived
    /// may be kept for a resume. The code and message are for the site, if
    /// it still listens.
    Interrupted(RejectCode, String),
}

/// Whether a receive error is the connection or stream going away (the
/// upload may resume) rather than a bad frame from the site.
fn is_interruption(e: &TransportError) -> bool {
    !matches!(
        e,
        TransportError::Frame(_) | TransportError::UnexpectedFrame { .. }
    )
}

async fn receive_upload(
    conn: &ServerConn,
    up: Upload<'_>,
    shared: &Arc<Shared>,
    envelope: SignedEnvelope,
    mut send: FramedSend,
    mut recv: FramedRecv,
) -> Result<(), TransportError> {
    let site_id = up.site;
    let site = site_id.as_str();
    // Low on disk: the spool and archive would take what the audit log
    // needs. Refused before a byte is stored (the `disk.low` entry records
    // the state once, not each refusal); the site retries later.
    if let Err(why) = shared.disk_allows_new_work() {
        return reject_upload(&mut send, recv, RejectCode::Busy, why.to_string()).await;
    }
    let key: InFlightKey = (site_id.clone(), envelope.header.nonce.0);
    if up.resume {
        wait_until_not_in_flight(shared, &key, shared.peer.upload_stall_timeout).await;
    }
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
    let event = Event::PrepareUpload {
        site: site_id.clone(),
        envelope: Box::new(envelope.clone()),
        resume: up.resume,
        reply,
    };
    let _ = shared.engine.send(event).await;
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
    let _in_flight = InFlight::register(shared, key);
    let upload_started = Instant::now();
    let UploadTicket {
        mut verifier,
        check,
        spec,
        spool_path,
        resume_from,
    } = ticket;
    let opened = match resume_from {
        None => SpoolWriter::create(spool_path.clone()),
        Some(p) => SpoolWriter::append(spool_path.clone(), p.bytes),
    };
    let mut spool = match opened {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(site, error = %e, "cannot open the spool file");
            if resume_from.is_some() {
                let _ = std::fs::remove_file(&spool_path);
            }
            return reject_upload(
                &mut send,
                recv,
                RejectCode::Internal,
                "spool unavailable".into(),
            )
            .await;
        }
    };
    let mut records = resume_from.map_or(0, |p| p.records);
    // Stream bytes read up to the last whole record: what arrived of a
    // record a cut left incomplete is the rest (reported, then dropped).
    let mut whole_frames_read = recv.bytes_read();
    // Only now, with an upload slot, may the site send more than the idle
    // connection window: a site waiting for a slot costs ≈ nothing.
    let share = conn.open_upload_window(&mut recv, verifier.remaining());
    let _window = UploadWindow {
        conn,
        _share: share,
    };
    // Receive: hash and spool every chunk record; never more than declared.
    // One record buffer for the whole upload, from a bounded pool: no
    // allocation (and no fresh pages) per record.
    let mut rec = super::pool::RECORDS.take();
    let received: Result<(), Cut> = async {
        if let Some(p) = resume_from {
            send.message(&Message::UploadProgress(p))
                .await
                .map_err(|e| {
                    Cut::Interrupted(RejectCode::Malformed, format!("sending the progress: {e}"))
                })?;
        }
        while verifier.remaining() > 0 {
            // A site that stops sending must not hold its slot (and with
            // it the uploads, and the control messages, of waiting sites).
            let stall = shared.peer.upload_stall_timeout;
            tokio::time::timeout(stall, recv.chunk_into(&mut rec))
                .await
                .map_err(|_| {
                    Cut::Interrupted(
                        RejectCode::TooLate,
                        format!(
                            "no payload record within {} s while holding an upload slot",
                            stall.as_secs()
                        ),
                    )
                })?
                .map_err(|e| {
                    let why = format!("receiving the payload: {e}");
                    if is_interruption(&e) {
                        Cut::Interrupted(RejectCode::Malformed, why)
                    } else {
                        Cut::Refused(RejectCode::Malformed, why)
                    }
                })?;
            verifier
                .update(&rec)
                .map_err(|e| Cut::Refused(crate::core::intake::verify_code(&e), e.to_string()))?;
            tokio::task::block_in_place(|| spool.write(&rec))
                .map_err(|e| Cut::Refused(RejectCode::Internal, e.to_string()))?;
            records += 1;
            whole_frames_read = recv.bytes_read();
        }
        match recv.next_frame().await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(Cut::Refused(
                RejectCode::PayloadMismatch,
                "more payload than the signed length".into(),
            )),
            Err(e) => Err(Cut::Refused(
                RejectCode::Malformed,
                format!("after the payload: {e}"),
            )),
        }
    }
    .await;
    let spool_path = spool.path().to_owned();
    let upload_ms = upload_started.elapsed().as_millis() as u64;
    match received {
        Ok(()) => {}
        Err(Cut::Refused(code, message)) => {
            drop(spool);
            let _ = std::fs::remove_file(&spool_path);
            tracing::warn!(site, ?code, reason = %message, "upload refused while receiving");
            audit_upload_refused(shared, site, &envelope, verifier.received(), &message);
            return reject_upload(&mut send, recv, code, message).await;
        }
        Err(Cut::Interrupted(code, message)) => {
            // Kept only once durable: a resume appends to exactly these
            // records.
            let durable = tokio::task::block_in_place(|| spool.sync());
            drop(spool);
            let spool_path = match durable {
                Ok(()) => Some(spool_path),
                Err(e) => {
                    tracing::error!(site, error = %e, "cannot sync an interrupted upload's spool");
                    let _ = std::fs::remove_file(&spool_path);
                    None
                }
            };
            let resumable = up.session.keeps_for_resume(spool_path.is_some());
            let partial_bytes = recv.bytes_read().saturating_sub(whole_frames_read);
            let _ = shared
                .engine
                .send(Event::UploadInterrupted(Box::new(UploadInterrupted {
                    site: site_id.clone(),
                    envelope,
                    verifier,
                    records,
                    spool_path,
                    resumable,
                    partial_bytes,
                    cause: message.clone(),
                })))
                .await;
            let message = if resumable {
                format!("{message}; the {records} records received are kept: resume the upload")
            } else {
                message
            };
            // Best effort: the site is usually gone.
            return reject_upload(&mut send, recv, code, message).await;
        }
    }
    let bytes = verifier.received();
    if let Err(e) = verifier.finish() {
        drop(spool);
        let _ = std::fs::remove_file(&spool_path);
        tracing::warn!(site, error = %e, "upload payload does not match its signed header");
        audit_upload_refused(shared, site, &envelope, bytes, &e.to_string());
        return reject_upload(
            &mut send,
            recv,
            crate::core::intake::verify_code(&e),
            e.to_string(),
        )
        .await;
    }
    let path = match tokio::task::block_in_place(|| spool.finish()) {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&spool_path);
            audit_upload_refused(shared, site, &envelope, bytes, &e.to_string());
            return reject_upload(&mut send, recv, RejectCode::Internal, e.to_string()).await;
        }
    };
    // Pass 1: decode from the spool and validate (NaN/Inf, magnitudes,
    // norm for clipping) without touching the aggregator.
    let encoding = envelope.header.encoding;
    let check_path = path.clone();
    // Where the strategy allows it (streaming mean, no clipping), the same
    // decode also folds each checked chunk into the round (tentatively: the
    // engine counts it at the ack or takes it out): one pass, not two.
    let check = tokio::task::spawn_blocking(move || match check {
        PayloadCheck::OnePass(t) => {
            crate::round_archive::check_and_fold(t, &spec, encoding, &check_path)
                .map(|t| (t.token().clone(), Some(t)))
        }
        PayloadCheck::TwoPass(validator) => {
            crate::round_archive::validate_with(validator, &spec, encoding, &check_path)
                .map(|v| (v, None))
        }
    })
    .await
    .map_err(CheckError::Task)
    .and_then(|r| r.map_err(CheckError::from));
    let (check, tentative) = match check {
        Ok((token, t)) => (Ok(token), t),
        Err(e) => (Err(e), None),
    };
    // From here until the site has its answer, shutdown waits for it.
    let _answering = shared.answers.token();
    let (reply, answer) = oneshot::channel();
    let _ = shared
        .engine
        .send(Event::UpdateReady(Box::new(UpdateReady {
            site: site_id.clone(),
            upload: ReceivedUpload {
                envelope,
                spool_path: path,
                bytes,
                upload_ms,
            },
            check,
            tentative,
            reply,
        })))
        .await;
    let result = answer.await.unwrap_or_else(|_| UploadResult::Reject {
        code: RejectCode::ShuttingDown,
        message: "shutting down".into(),
    });
    tracing::debug!(site, at = unix_ms(), ?result, "upload answered");
    send.message(&Message::UploadResult(result)).await?;
    send.finish()?;
    // The upload is over: its slot and in-flight mark go now. The answer is
    // waited for until the site has it (QUIC), so that a shutdown right
    // after this round does not close the connection over it.
    drop(_permit);
    drop(_in_flight);
    let _ = tokio::time::timeout(limits::ANSWER_GRACE, send.stopped()).await;
    Ok(())
}
