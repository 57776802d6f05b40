//! Admin commands that reach the engine: the job's progress for `status`,
//! and pause / resume / abort (of the running job through the round
//! machine; of a queued job directly in the store, on the engine task so a
//! job switch never races them). The progress document and which job a
//! command reaches are `core::status`'s; the commands' effects are
//! `core::admin`'s.

use std::time::Instant;

use fedlink_protocol::SiteId;
use fedlink_protocol::admin::{AdminErrorCode, JobProgress};

use super::{Engine, EngineError};
use crate::core::Effect;
use crate::core::admin::{self as core_admin, StoredJob};
use crate::core::status;
use crate::round::Input;
use crate::server::effects;
use crate::server::event::{AdminEvent, JobCommand};
use crate::server::shared::Shared;
use crate::store::Store;

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
        AdminEvent::Job(command) => {
            // No job runs: nothing to apply to a round machine. Executed:
            // an aborted job no longer blocks the queue; a resumed one may
            // run.
            let store = shared.admin.store();
            job_command(shared, store, None, command, |_| Ok(())).unwrap_or(false)
        }
        AdminEvent::Wake => true,
    }
}

/// Run an admin's job command: which job it reaches (`running`: the
/// running job's id and whether it has finished; `None` without a job),
/// recorded before it takes effect and not done if unrecorded, its
/// effects executed in order ([`execute`]; `apply` hands an input to the
/// running job's round machine), then the admin answered — so the answer
/// reflects a command on the running job. `Ok(true)`: its effects were
/// executed; an error of `apply` is fatal for the engine (the admin is
/// told first).
fn job_command(
    shared: &Shared,
    store: &Store,
    running: Option<(&str, bool)>,
    command: JobCommand,
    apply: impl FnMut(Input) -> Result<(), EngineError>,
) -> Result<bool, EngineError> {
    let JobCommand {
        id,
        cmd,
        actor,
        reply,
    } = command;
    let target = match status::target(&id, running, || stored_job(store, &id)) {
        Ok(t) => t,
        Err(e) => {
            let _ = reply.send(Err(e));
            return Ok(false);
        }
    };
    let (effects, answer) = core_admin::job_command(&id, cmd, &actor, target);
    match execute(shared, store, effects, apply) {
        Ok(Ok(())) => {
            let _ = reply.send(answer.map_err(|r| (r.code, r.message)));
            Ok(true)
        }
        Ok(Err(e)) => {
            let _ = reply.send(Err(e));
            Ok(false)
        }
        Err(e) => {
            let _ = reply.send(Err((AdminErrorCode::Internal, e.to_string())));
            Err(e)
        }
    }
}

/// What the store says about job `id` (not the running one).
fn stored_job(store: &Store, id: &str) -> Result<Option<StoredJob>, (AdminErrorCode, String)> {
    let rec = store
        .job(id)
        .map_err(|e| (AdminErrorCode::Internal, e.to_string()))?;
    Ok(rec.map(|r| StoredJob {
        finished: r.outcome.is_some(),
        completed_rounds: r.completed_rounds,
    }))
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
            AdminEvent::Job(command) => {
                let (wire, store) = (self.wire.clone(), self.store.clone());
                let job_id = self.job_id.clone();
                let running = (job_id.as_str(), self.outcome.is_some());
                job_command(&wire, &store, Some(running), command, |input| {
                    self.runner.handle(now, input);
                    self.drain(now)
                })?;
            }
            AdminEvent::ConnectedSites(reply) => {
                let _ = reply.send(self.links.connected());
            }
            AdminEvent::Wake => {}
        }
        Ok(())
    }

    fn progress(&self) -> JobProgress {
        let registered = self
            .wire
            .manifest
            .read()
            .map(|m| m.site.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default();
        let facts = status::JobFacts {
            job: self.job_id.clone(),
            phase: self.runner.phase(),
            connected: self.links.connected(),
            selected: self.runner.selected_sites(),
            registered,
            completed_rounds: self.runner.completed_rounds(),
            total_rounds: u64::from(self.job.rounds),
            current_model: self.runner.current_model(),
            paused: self.runner.is_paused(),
            outcome: self.outcome.as_ref().map(|o| format!("{o:?}")),
            evaluation: self.latest_evaluation.clone(),
        };
        status::progress(facts, |r| {
            let rec = self.store.round(self.job_id.as_str(), r).ok().flatten()?;
            Some(rec.accepted.iter().map(|u| u.site.to_string()).collect())
        })
    }
}
