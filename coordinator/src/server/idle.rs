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

use tokio::sync::mpsc;

use super::audit::AuditError;
use super::event::Event;
use super::links::Links;
use super::shared::Shared;
use crate::core::Effect;
use crate::core::idle::{self, IdleEffect};

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
            Event::Connected(c) => {
                tracing::info!(site = %c.site, conn = c.conn_id.0, "site connected; no job is running, it waits");
                self.links.connect(c);
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
                tracing::warn!(site = %site, "evaluation report refused: no job is running");
                let effects = idle::eval_report(&shared.federation, &site, &report.report);
                if let Err(e) = run(shared, effects, |_| {}) {
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
                let mut reply = Some(reply);
                let mut answer = |effect: IdleEffect| {
                    if let (IdleEffect::RefuseUpload { code, message }, Some(reply)) =
                        (effect, reply.take())
                    {
                        let _ = reply.send(Err((code, message)));
                    }
                };
                let effects = idle::upload(&shared.federation, &site, &envelope);
                if let Err(e) = run(shared, effects, &mut answer) {
                    answer(idle::unrecorded(&e.to_string()));
                }
            }
            Event::UploadInterrupted(it) => {
                let _ = run(shared, idle::interrupted(), |effect| {
                    if effect == IdleEffect::RemoveSpool
                        && let Some(path) = &it.spool_path
                    {
                        remove_spool(path);
                    }
                });
            }
            Event::UpdateReady(ready) => {
                let (spool, mut reply) = (ready.upload.spool_path, Some(ready.reply));
                let _ = run(shared, idle::ready(), |effect| match effect {
                    IdleEffect::RemoveSpool => remove_spool(&spool),
                    IdleEffect::AnswerUpload(result) => {
                        if let Some(reply) = reply.take() {
                            let _ = reply.send(result);
                        }
                    }
                    _ => {}
                });
            }
            // The engine of the next job reads the manifest when it is built.
            Event::Keys(_) => {}
            Event::RecheckPeers => self.recheck_peers(shared),
            Event::Admin(ev) => {
                let may_start =
                    super::engine::admin::handle_without_job(shared, || self.connected(), ev);
                if idle::admin_done(may_start).contains(&IdleEffect::StartNextQueued) {
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

/// Execute `effects` in order: the audit appends here (the first that
/// fails stops the run and is returned), every other effect by `other`.
fn run(
    shared: &Shared,
    effects: Vec<IdleEffect>,
    mut other: impl FnMut(IdleEffect),
) -> Result<(), AuditError> {
    for effect in effects {
        match effect {
            IdleEffect::Audit(Effect::AppendAudit { actor, event }) => {
                shared.audit().record(&actor, &event)?
            }
            other_effect => other(other_effect),
        }
    }
    Ok(())
}

/// Remove a spool file the idle state was handed (nothing to resume into).
fn remove_spool(path: &std::path::Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::debug!(error = %e, "removing a spool file");
    }
}

/// Serve without a job until one is submitted (`Some(id)`) or until
/// shutdown (`None`).
pub(crate) async fn run_idle<F: Future<Output = ()>>(
    idle: &mut Idle,
    rx: &mut mpsc::Receiver<Event>,
    shared: &Shared,
    mut shutdown: std::pin::Pin<&mut F>,
) -> Option<String> {
    tracing::info!(
        "no job: serving the admin API and holding site connections until a job is submitted"
    );
    if let Some(next) = shared.admin.next_queued() {
        return Some(next);
    }
    loop {
        tokio::select! {
            () = &mut shutdown => return None,
            ev = rx.recv() => {
                let ev = ev?;
                if let Some(next) = idle.handle(shared, ev) {
                    return Some(next);
                }
            }
        }
    }
}
