//! The admin commands that change a job's state (pause, resume, abort),
//! for the running job and for queued ones alike, as effects in the order
//! the driver executes them: the audit append first, then the change —
//! and nothing if the append fails. A command on a job that has finished
//! changes nothing and is not recorded.

use fedlink_audit::EventKind;
use fedlink_protocol::admin::AdminErrorCode;

use super::Effect;
use crate::round::{AdminCommand, Checkpoint, Input, JobOutcome};

/// The job a command names, as the driver finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The job that runs now; `finished`: its round machine has ended it.
    Running {
        /// Whether it has finished.
        finished: bool,
    },
    /// A job in the store that does not run now (queued), if there is one
    /// by that id.
    Stored(Option<StoredJob>),
}

/// What the store says about a job that does not run now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredJob {
    /// Whether it has finished.
    pub finished: bool,
    /// Rounds it completed.
    pub completed_rounds: u64,
}

/// Why an admin command was refused: the code the admin is sent and what
/// is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AdminRefusal {
    /// Sent to the admin.
    pub code: AdminErrorCode,
    /// What is wrong.
    pub message: String,
}

/// The audit event of a command.
pub fn audit_event(cmd: AdminCommand) -> EventKind {
    match cmd {
        AdminCommand::Pause => EventKind::JobPaused,
        AdminCommand::Resume => EventKind::JobResumed,
        AdminCommand::Abort => EventKind::JobAborted,
    }
}

/// What `cmd` on job `id` by `actor` does: the effects to execute in
/// order ([`Effect::AppendAudit`] first), and the answer for the admin
/// once they have all succeeded.
pub fn job_command(
    id: &str,
    cmd: AdminCommand,
    actor: &str,
    target: Target,
) -> (Vec<Effect>, Result<(), AdminRefusal>) {
    let finished = || {
        Err(AdminRefusal {
            code: AdminErrorCode::Refused,
            message: format!("job {id} has finished"),
        })
    };
    let audit = Effect::AppendAudit {
        actor: actor.to_owned(),
        kind: audit_event(cmd),
        details: serde_json::json!({ "job": id }),
    };
    match target {
        Target::Running { finished: true }
        | Target::Stored(Some(StoredJob { finished: true, .. })) => (Vec::new(), finished()),
        Target::Running { finished: false } => {
            (vec![audit, Effect::Apply(Input::Admin(cmd))], Ok(()))
        }
        // The attempt is on record even if no such job exists.
        Target::Stored(None) => (
            vec![audit],
            Err(AdminRefusal {
                code: AdminErrorCode::NotFound,
                message: format!("no job {id}"),
            }),
        ),
        Target::Stored(Some(StoredJob {
            completed_rounds, ..
        })) => {
            let checkpoint = match cmd {
                AdminCommand::Pause => Checkpoint::Paused(true),
                AdminCommand::Resume => Checkpoint::Paused(false),
                AdminCommand::Abort => {
                    Checkpoint::JobFinished(JobOutcome::Aborted { completed_rounds })
                }
            };
            (
                vec![
                    audit,
                    Effect::Persist {
                        job: id.to_owned(),
                        checkpoint,
                    },
                ],
                Ok(()),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_is_audited_first_and_finished_jobs_are_left_alone() {
        let queued = Target::Stored(Some(StoredJob {
            finished: false,
            completed_rounds: 2,
        }));
        for cmd in [
            AdminCommand::Pause,
            AdminCommand::Resume,
            AdminCommand::Abort,
        ] {
            let (e, r) = job_command("j", cmd, "admin", Target::Running { finished: false });
            assert_eq!(r, Ok(()));
            assert!(Effect::audited_first(&e), "{e:?}");
            assert_eq!(e.last(), Some(&Effect::Apply(Input::Admin(cmd))));
            let (e, r) = job_command("j", cmd, "admin", queued);
            assert_eq!(r, Ok(()));
            assert!(Effect::audited_first(&e), "{e:?}");
            assert!(matches!(e.last(), Some(Effect::Persist { job, .. }) if job == "j"));
            for done in [
                Target::Running { finished: true },
                Target::Stored(Some(StoredJob {
                    finished: true,
                    completed_rounds: 1,
                })),
            ] {
                let (e, r) = job_command("j", cmd, "admin", done);
                assert!(e.is_empty(), "{e:?}");
                assert_eq!(r.unwrap_err().code, AdminErrorCode::Refused);
            }
        }
        let (e, _) = job_command("j", AdminCommand::Abort, "admin", queued);
        assert_eq!(
            e[1],
            Effect::Persist {
                job: "j".into(),
                checkpoint: Checkpoint::JobFinished(JobOutcome::Aborted {
                    completed_rounds: 2
                })
            }
        );
        assert_eq!(
            e[0],
            Effect::AppendAudit {
                actor: "admin".into(),
                kind: EventKind::JobAborted,
                details: serde_json::json!({ "job": "j" }),
            }
        );
    }

    #[test]
    fn an_unknown_job_is_refused_with_the_attempt_on_record() {
        let (e, r) = job_command("nope", AdminCommand::Pause, "admin", Target::Stored(None));
        assert!(matches!(e.as_slice(), [Effect::AppendAudit { .. }]));
        let err = r.unwrap_err();
        assert_eq!(err.code, AdminErrorCode::NotFound);
        assert_eq!(err.message, "no job nope");
    }
}
