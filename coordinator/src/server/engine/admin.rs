//! Admin commands that reach the engine: the job's progress for `status`,
//! and pause / resume / abort (of the running job through the round
//! machine; of a queued job directly in the store, on the engine task so a
//! job switch never races them).

use std::collections::BTreeSet;
use std::time::Instant;

use fedlink_protocol::SiteId;
use fedlink_protocol::admin::{AdminErrorCode, JobProgress, SiteProgress};
use tokio::sync::oneshot;

use super::{Engine, EngineError, effects};
use crate::core::Effect;
use crate::core::admin::{self as core_admin, StoredJob, Target};
use crate::round::{AdminCommand, Input, PhaseView};
use crate::server::Shared;
use crate::store::Store;

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
    ConnectedSites(oneshot::Sender<Vec<SiteId>>),
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
    connected: impl FnOnce() -> Vec<SiteId>,
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
            let target = match stored_target(store, &id) {
                Ok(t) => t,
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return false;
                }
            };
            let (effects, answer) = core_admin::job_command(&id, cmd, &actor, target);
            // No job runs: nothing to apply to a round machine.
            match execute(shared, store, effects, |_| Ok(())) {
                Ok(Ok(())) => {
                    let _ = reply.send(answer.map_err(|r| (r.code, r.message)));
                    // An aborted job no longer blocks the queue; a resumed
                    // one may run.
                    true
                }
                Ok(Err(e)) => {
                    let _ = reply.send(Err(e));
                    false
                }
                Err(e) => {
                    let _ = reply.send(Err((AdminErrorCode::Internal, e.to_string())));
                    false
                }
            }
        }
        AdminEvent::Wake => true,
    }
}

/// What the store says about job `id` (not the running one).
fn stored_target(store: &Store, id: &str) -> Result<Target, (AdminErrorCode, String)> {
    let rec = store
        .job(id)
        .map_err(|e| (AdminErrorCode::Internal, e.to_string()))?;
    Ok(Target::Stored(rec.map(|r| StoredJob {
        finished: r.outcome.is_some(),
        completed_rounds: r.completed_rounds,
    })))
}

/// Why an admin command's effects stopped.
enum Stopped {
    /// An audit append or a store write failed: nothing after it ran; the
    /// admin is told.
    Refused((AdminErrorCode, String)),
    /// Handing the input to the running job's round machine failed
    /// (fatal for the engine).
    Fatal(EngineError),
}

/// Execute the effects of an admin command in order, with the one
/// executor ([`effects::execute`]). An audit append or a store write that
/// fails stops there (`Ok(Err(..))`: nothing after it runs, the admin is
/// told); `apply` hands an input to the running job's round machine (its
/// error is fatal for the engine).
fn execute(
    shared: &Shared,
    store: &Store,
    effects: Vec<Effect>,
    mut apply: impl FnMut(Input) -> Result<(), EngineError>,
) -> Result<Result<(), (AdminErrorCode, String)>, EngineError> {
    let done = effects::execute(
        shared.audit(),
        store,
        effects,
        |e| Stopped::Refused((AdminErrorCode::Internal, e.cause())),
        |effect| match effect {
            Effect::Apply(input) => apply(input).map_err(Stopped::Fatal),
            other => {
                tracing::error!(?other, "not an admin effect; ignored");
                Ok(())
            }
        },
    );
    match done {
        Ok(()) => Ok(Ok(())),
        Err(Stopped::Refused(answer)) => Ok(Err(answer)),
        Err(Stopped::Fatal(e)) => Err(e),
    }
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
                let target = if id == self.job_id.as_str() {
                    Target::Running {
                        finished: self.outcome.is_some(),
                    }
                } else {
                    match stored_target(&self.store, &id) {
                        Ok(t) => t,
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            return Ok(());
                        }
                    }
                };
                // Recorded before it takes effect; not done if unrecorded.
                // A command on the running job is executed (and persisted)
                // before the answer, so the answer reflects it.
                let (effects, answer) = core_admin::job_command(&id, cmd, &actor, target);
                let (wire, store) = (self.wire.clone(), self.store.clone());
                let done = execute(&wire, &store, effects, |input| {
                    self.runner.handle(now, input);
                    self.drain(now)
                });
                let r = match done {
                    Ok(Ok(())) => answer.map_err(|r| (r.code, r.message)),
                    Ok(Err(e)) => Err(e),
                    Err(e) => {
                        let _ = reply.send(Err((AdminErrorCode::Internal, e.to_string())));
                        return Err(e);
                    }
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
        let connected: BTreeSet<String> = self
            .links
            .connected()
            .into_iter()
            .map(String::from)
            .collect();
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
            .filter_map(|site| {
                // Names of identities and registry entries, validated when
                // made; a subset of what `SiteId` allows.
                let id = SiteId::new(site.as_str())
                    .inspect_err(|e| tracing::error!(error = %e, "site name in the progress"))
                    .ok()?;
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
                Some(SiteProgress {
                    connected: connected.contains(&site),
                    site: id,
                    state: state.to_owned(),
                })
            })
            .collect();
        JobProgress {
            job: self.job_id.clone(),
            phase: phase.to_owned(),
            round,
            completed_rounds: self.runner.completed_rounds(),
            total_rounds: u64::from(self.job.rounds),
            current_model: self.runner.current_model(),
            paused: self.runner.is_paused(),
            accepted,
            outcome: self.outcome.as_ref().map(|o| format!("{o:?}")),
            sites,
            evaluation: self.latest_evaluation.clone(),
        }
    }
}
