//! Serving without a job: the coordinator was started empty (no `job` in
//! its config and nothing unfinished in the store) and waits for
//! `fedlink jobs submit`.
//!
//! Sites still connect: they complete Hello/Welcome, heartbeat, and are
//! held here, idle (no offers, no models, uploads refused). The admin API
//! works as usual (`status` says that no job is running). When the first
//! job is submitted, the serve loop builds its engine and hands every held
//! connection over to it (`Engine::adopt`, through [`Idle::links_mut`]),
//! in the order the sites connected, so the job starts at once with the
//! sites already connected. A job switch hands the sites over the same
//! way (`Engine::links_mut`).

use std::future::Future;

use fedlink_audit::CoordEvent;
use fedlink_protocol::message::{RejectCode, UploadResult};
use tokio::sync::mpsc;

use super::ServeError;
use super::engine::{Event, update_received_details};
use super::links::Links;
use super::shared::Shared;
use crate::core::actions::eval_report_details;

/// Why uploads and downloads are refused while no job runs.
const NO_JOB: &str = "no job is running";

/// The site connections held while no job runs.
#[derive(Debug, Default)]
pub(crate) struct Idle {
    links: Links,
}

impl Idle {
    /// Sites connected now, sorted.
    pub(crate) fn connected(&self) -> Vec<fedlink_protocol::SiteId> {
        self.links.connected()
    }

    /// Handle one event; `Some(job)` when a submitted job should start.
    fn handle(&mut self, shared: &Shared, event: Event) -> Option<String> {
        match event {
            Event::Connected {
                site,
                conn_id,
                conn,
                control,
                capabilities,
                codecs,
                protocol_version,
            } => {
                tracing::info!(site = %site, conn = conn_id.0, "site connected; no job is running, it waits");
                self.links.connect(
                    &site,
                    conn_id,
                    conn,
                    control,
                    capabilities,
                    (codecs, protocol_version),
                );
            }
            Event::Disconnected { site, conn_id } => {
                if self.links.disconnect(&site, conn_id) {
                    tracing::info!(site = %site, conn = conn_id.0, "site disconnected");
                }
            }
            Event::OfferResponse { site, round, .. } => {
                tracing::debug!(site = %site, round = round.0, "offer response without a job; ignored");
            }
            Event::EvalReport { site, report } => {
                // Audited like a refusal by a running job.
                let actor =
                    fedlink_audit::event::site_actor(shared.federation.as_str(), site.as_str());
                let event = CoordEvent::EvalRejected(fedlink_audit::coord::EvalRejected {
                    report: eval_report_details(&site, &report.report),
                    reason: NO_JOB.to_owned(),
                });
                tracing::warn!(site = %site, "evaluation report refused: no job is running");
                if let Err(e) = shared.audit().record(&actor, &event) {
                    tracing::error!(error = %e, "recording a refused evaluation report");
                }
            }
            Event::PrepareUpload {
                site,
                envelope,
                reply,
                ..
            } => {
                tracing::warn!(site = %site, "upload refused: no job is running");
                let actor =
                    fedlink_audit::event::site_actor(shared.federation.as_str(), site.as_str());
                let event =
                    update_received_details(&envelope, envelope.header.payload_len, Some(NO_JOB));
                let answer = match shared.audit().record(&actor, &event) {
                    Ok(()) => (RejectCode::UnexpectedMessage, NO_JOB.to_owned()),
                    Err(e) => (
                        RejectCode::Internal,
                        format!("the coordinator cannot write its audit log: {e}"),
                    ),
                };
                let _ = reply.send(Err(answer));
            }
            Event::UploadInterrupted(it) => {
                // Its job ended while it was being received: nothing to
                // resume into.
                if let Some(path) = &it.spool_path
                    && let Err(e) = std::fs::remove_file(path)
                {
                    tracing::debug!(error = %e, "removing a spool file");
                }
            }
            Event::UpdateReady(ready) => {
                // Only a ticket from a running job leads here; none exists.
                if let Err(e) = std::fs::remove_file(&ready.upload.spool_path) {
                    tracing::debug!(error = %e, "removing a spool file");
                }
                let _ = ready.reply.send(UploadResult::Reject {
                    code: RejectCode::UnexpectedMessage,
                    message: NO_JOB.into(),
                });
            }
            // The engine of the next job reads the manifest when it is built.
            Event::Keys(_) => {}
            Event::RecheckPeers => self.recheck_peers(shared),
            Event::Admin(ev) => {
                if super::engine::admin::handle_without_job(shared, || self.connected(), ev) {
                    return shared.admin.next_queued();
                }
            }
        }
        None
    }

    /// Close held connections that are no longer allowed (revoked,
    /// removed or superseded certificates).
    fn recheck_peers(&mut self, shared: &Shared) {
        self.links.recheck(shared);
    }

    /// Close every held connection (shutdown).
    pub(crate) fn close_all(&mut self) {
        self.links.close_all();
    }

    /// The held connections, for the engine of the job that starts now
    /// to take over (see `Engine::adopt`).
    pub(crate) fn links_mut(&mut self) -> &mut Links {
        &mut self.links
    }
}

/// Serve without a job until one is submitted (`Ok(Some(id))`) or until
/// shutdown (`Ok(None)`).
pub(crate) async fn run_idle<F: Future<Output = ()>>(
    idle: &mut Idle,
    rx: &mut mpsc::Receiver<Event>,
    shared: &Shared,
    mut shutdown: std::pin::Pin<&mut F>,
) -> Result<Option<String>, ServeError> {
    tracing::info!(
        "no job: serving the admin API and holding site connections until a job is submitted"
    );
    if let Some(next) = shared.admin.next_queued() {
        return Ok(Some(next));
    }
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(None),
            ev = rx.recv() => {
                let Some(ev) = ev else { return Ok(None) };
                if let Some(next) = idle.handle(shared, ev) {
                    return Ok(Some(next));
                }
            }
        }
    }
}
