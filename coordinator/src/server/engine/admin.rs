//! Admin commands that reach the engine: the job's progress for `status`,
//! and pause / resume / abort (of the running job through the round
//! machine; of a queued job directly in the store, on the engine task so a
//! job switch never races them).

use std::collections::BTreeSet;
use std::time::Instant;

use fedlink_audit::EventKind;
use fedlink_protocol::admin::{AdminErrorCode, JobProgress, SiteProgress};
use tokio::sync::oneshot;

use super::{Engine, EngineError};
use crate::round::{AdminCommand, Checkpoint, Input, JobOutcome, PhaseView};
use crate::server::Shared;
use crate::store::{Extras, Store};

/// An admin request for the engine.
#[derive(Debug)]
pub(crate) enum AdminEvent {
    /// Where the running job stands.
    Progress(oneshot::Sender<JobProgress>),
    /// Pause, resume or abort a job (running or queued).
    Job {
        id: String,
        cmd: AdminCommand,
        /// The admin's identity (the audit actor).
        actor: String,
        reply: oneshot::Sender<Result<(), (AdminErrorCode, String)>>,
    },
    /// The sites connected now (sorted), with or without a job.
    ConnectedSites(oneshot::Sender<Vec<String>>),
    /// A job was queued: a finished engine looks for its next job.
    Wake,
}

/// Handle an admin event while no job runs (the idle holder's; `connected`
/// lists the sites it holds):
/// pause / resume / abort reach queued jobs in the store; `Progress` has
/// no answer (its sender is dropped). Returns whether a queued job may
/// start now.
pub(crate) fn handle_without_job(
    shared: &Shared,
    connected: impl FnOnce() -> Vec<String>,
    event: AdminEvent,
) -> bool {
    match event {
        AdminEvent::Progress(_) => false,
        AdminEvent::ConnectedSites(reply) => {
            let _ = reply.send(connected());
            false
        }
        AdminEvent::Job {
            id,
            cmd,
            actor,
            reply,
        } => {
            let store = shared.admin.store();
            let finished = matches!(store.job(&id), Ok(Some(r)) if r.outcome.is_some());
            if !finished
                && let Err(e) = shared.audit().record(
                    &actor,
                    audit_event(cmd),
                    serde_json::json!({ "job": id }),
                )
            {
                let _ = reply.send(Err((AdminErrorCode::Internal, e.to_string())));
                return false;
            }
            let _ = reply.send(queued_job_command(store, &id, cmd));
            // An aborted job no longer blocks the queue; a resumed one may run.
            true
        }
        AdminEvent::Wake => true,
    }
}

fn audit_event(cmd: AdminCommand) -> EventKind {
    match cmd {
        AdminCommand::Pause => EventKind::JobPaused,
        AdminCommand::Resume => EventKind::JobResumed,
        AdminCommand::Abort => EventKind::JobAborted,
    }
}

/// Pause, resume or abort a job that is not running (queued).
fn queued_job_command(
    store: &Store,
    id: &str,
    cmd: AdminCommand,
) -> Result<(), (AdminErrorCode, String)> {
    let internal = |e: crate::store::StoreError| (AdminErrorCode::Internal, e.to_string());
    let rec = store
        .job(id)
        .map_err(internal)?
        .ok_or_else(|| (AdminErrorCode::NotFound, format!("no job {id}")))?;
    if rec.outcome.is_some() {
        return Err((AdminErrorCode::Refused, format!("job {id} has finished")));
    }
    let cp = match cmd {
        AdminCommand::Pause => Checkpoint::Paused(true),
        AdminCommand::Resume => Checkpoint::Paused(false),
        AdminCommand::Abort => Checkpoint::JobFinished(JobOutcome::Aborted {
            completed_rounds: rec.completed_rounds,
        }),
    };
    store.persist(id, &cp, Extras::default()).map_err(internal)
}

impl Engine {
    /// Id of the job this engine runs.
    pub(crate) fn job_id(&self) -> &str {
        self.job_id.as_str()
    }

    pub(super) fn handle_admin(
        &mut self,
        now: Instant,
        event: AdminEvent,
    ) -> Result<(), EngineError> {
        match event {
            AdminEvent::Progress(reply) => {
                let _ = reply.send(self.progress());
            }
            AdminEvent::Job {
                id,
                cmd,
                actor,
                reply,
            } => {
                let event = audit_event(cmd);
                let finished = if id == self.job_id.as_str() {
                    self.outcome.is_some()
                } else {
                    matches!(self.store.job(&id), Ok(Some(r)) if r.outcome.is_some())
                };
                // Recorded before it takes effect; not done if unrecorded.
                if !finished
                    && let Err(e) =
                        self.wire
                            .audit()
                            .record(&actor, event, serde_json::json!({ "job": id }))
                {
                    let _ = reply.send(Err((AdminErrorCode::Internal, e.to_string())));
                    return Ok(());
                }
                let r = if id == self.job_id.as_str() {
                    if self.outcome.is_some() {
                        Err((AdminErrorCode::Refused, format!("job {id} has finished")))
                    } else {
                        // Execute (and persist) the command before
                        // answering, so the answer reflects it.
                        self.runner.handle(now, Input::Admin(cmd));
                        if let Err(e) = self.drain(now) {
                            let _ = reply.send(Err((AdminErrorCode::Internal, e.to_string())));
                            return Err(e);
                        }
                        Ok(())
                    }
                } else {
                    queued_job_command(&self.store, &id, cmd)
                };
                let _ = reply.send(r);
            }
            AdminEvent::ConnectedSites(reply) => {
                let _ = reply.send(self.links.connected());
            }
            AdminEvent::Wake => {}
        }
        Ok(())
    }

    fn progress(&self) -> JobProgress {
        let (phase, round, accepted) = match self.runner.phase() {
            PhaseView::Waiting { .. } => ("waiting", None, 0),
            PhaseView::Collecting {
                round, accepted, ..
            } => ("collecting", Some(round), accepted),
            PhaseView::Aggregating { round } => ("aggregating", Some(round), 0),
            PhaseView::Finished(_) => ("finished", None, 0),
        };
        let connected: BTreeSet<String> = self.links.connected().into_iter().collect();
        let selected: BTreeSet<String> = self
            .runner
            .selected_sites()
            .into_iter()
            .map(|s| s.as_str().to_owned())
            .collect();
        let reported: BTreeSet<String> = round
            .and_then(|r| self.store.round(self.job_id.as_str(), r).ok().flatten())
            .map(|r| r.accepted.iter().map(|u| u.site.to_string()).collect())
            .unwrap_or_default();
        let mut names: BTreeSet<String> = connected.clone();
        if let Ok(m) = self.wire.manifest.read() {
            names.extend(m.site.iter().map(|s| s.name.clone()));
        }
        let sites = names
            .into_iter()
            .map(|site| {
                let state = if reported.contains(&site) {
                    "reported"
                } else if selected.contains(&site) && connected.contains(&site) {
                    "training"
                } else if selected.contains(&site) {
                    "selected, offline"
                } else if connected.contains(&site) {
                    "idle"
                } else {
                    "offline"
                };
                SiteProgress {
                    connected: connected.contains(&site),
                    site,
                    state: state.to_owned(),
                }
            })
            .collect();
        JobProgress {
            job: self.job_id.as_str().to_owned(),
            phase: phase.to_owned(),
            round,
            completed_rounds: self.runner.completed_rounds(),
            total_rounds: u64::from(self.job.rounds),
            current_model: self.runner.current_model().to_hex(),
            paused: self.runner.is_paused(),
            accepted,
            outcome: self.outcome.as_ref().map(|o| format!("{o:?}")),
            sites,
        }
    }
}
