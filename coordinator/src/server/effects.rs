//! The one executor of the core's [`Effect`]s, shared by the engine (the
//! running job's actions) and the admin path (pause / resume / abort, with
//! or without a running job).
//!
//! The effects every driver executes the same way are executed here, in
//! order: audit appends (one entry, or a batch under one fsync) and a
//! queued job's checkpoint. The first of them that fails stops the run —
//! nothing after it is done — and the caller's `fail` maps the failure
//! ([`Unexecuted`]) to its own error: fatal for the engine, an answer for
//! an admin. Every other effect is handed to the caller's `other`, in its
//! turn.

use fedlink_audit::{CoordEvent, EventKind};

use crate::core::Effect;
use crate::server::audit::{AuditError, Auditor};
use crate::store::{Extras, Store, StoreError};

/// An effect that could not be executed; nothing after it was.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unexecuted {
    /// An audit append failed (`during`: what it recorded).
    #[error("{source} (while recording {during})")]
    Audit {
        during: String,
        #[source]
        source: AuditError,
    },
    /// A queued job's checkpoint could not be committed to the store.
    #[error("persisting a checkpoint of job {job}: {source}")]
    Persist {
        job: String,
        #[source]
        source: StoreError,
    },
}

impl Unexecuted {
    /// The cause alone, as an admin is told it.
    pub(crate) fn cause(&self) -> String {
        match self {
            Self::Audit { source, .. } => source.to_string(),
            Self::Persist { source, .. } => source.to_string(),
        }
    }
}

/// Execute `effects` in order: the audit appends and the queued jobs'
/// checkpoints here, every other effect by `other`. The first failure
/// stops the run: an append or a checkpoint that fails is mapped by
/// `fail`, an error of `other` is returned as it is.
pub(crate) fn execute<E>(
    audit: &Auditor,
    store: &Store,
    effects: impl IntoIterator<Item = Effect>,
    fail: impl Fn(Unexecuted) -> E,
    mut other: impl FnMut(Effect) -> Result<(), E>,
) -> Result<(), E> {
    for effect in effects {
        match effect {
            Effect::AppendAudit { actor, event } => {
                audit.record(&actor, &event).map_err(|source| {
                    fail(Unexecuted::Audit {
                        during: during(audit.actor(), &actor, event.kind()),
                        source,
                    })
                })?
            }
            Effect::AppendAuditBatch { actor, entries } => {
                audit.record_batch(&actor, &entries).map_err(|source| {
                    let mut kinds: Vec<EventKind> = entries.iter().map(CoordEvent::kind).collect();
                    kinds.dedup();
                    let during = match kinds.as_slice() {
                        [kind] => during(audit.actor(), &actor, *kind),
                        _ => {
                            let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                            format!("{} by {actor}; nothing was done", kinds.join(", "))
                        }
                    };
                    fail(Unexecuted::Audit { during, source })
                })?
            }
            Effect::Persist { job, checkpoint } => store
                .persist(&job, &checkpoint, Extras::default())
                .map_err(|source| fail(Unexecuted::Persist { job, source }))?,
            other_effect => other(other_effect)?,
        }
    }
    Ok(())
}

/// What an entry of `kind` by `actor` recorded, for the error that says it
/// could not be: the coordinator's own events were not acted on; a site's
/// are about one of its uploads or evaluation reports.
fn during(own: &str, actor: &str, kind: EventKind) -> String {
    if actor == own {
        return format!("{kind}; nothing was done");
    }
    let Some(site) = fedlink_audit::event::site_of_actor(actor) else {
        return format!("{kind} by {actor}; nothing was done");
    };
    match kind {
        EventKind::UpdateInterrupted => format!("an interrupted upload of {site}"),
        EventKind::EvalAccepted | EventKind::EvalRejected => {
            format!("an evaluation report of {site}")
        }
        _ => format!("an update of {site}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use fedlink_audit::coord;
    use fedlink_protocol::message::Bye;
    use fedlink_protocol::{Message, SiteId};

    use super::*;

    fn send(site: &str) -> Effect {
        Effect::Send {
            site: SiteId::new(site).unwrap(),
            message: Message::Bye(Bye {
                reason: "test".into(),
            }),
        }
    }

    /// Execute `effects`, the sites of the sends that ran alongside.
    fn run<E>(
        audit: &Auditor,
        store: &Store,
        effects: Vec<Effect>,
        fail: impl Fn(Unexecuted) -> E,
    ) -> (Result<(), E>, Vec<SiteId>) {
        let mut sent = Vec::new();
        let r = execute(audit, store, effects, fail, |e| {
            if let Effect::Send { site, .. } = e {
                sent.push(site);
            }
            Ok(())
        });
        (r, sent)
    }

    /// The one rule of every executor: the first append (or checkpoint)
    /// that fails stops the run — nothing after it is executed — and the
    /// caller's mapping says why; what came before it stays done.
    #[test]
    fn nothing_after_a_failed_append_or_checkpoint_is_executed() {
        let dir = tempfile::tempdir().unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let audit =
            Auditor::open(dir.path(), key, "fedlink://fed/coordinator".into(), 1 << 20).unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let own = audit.actor().to_owned();
        let offer = |site: &str| {
            CoordEvent::OfferSent(coord::OfferSent {
                job: "j1".into(),
                round: 1,
                site: site.into(),
                base_model: "00".into(),
            })
        };
        let effects = vec![
            send("a"),
            Effect::AppendAuditBatch {
                actor: own.clone(),
                entries: vec![offer("a"), offer("b")],
            },
            send("b"),
            // An actor the log refuses: the append fails, nothing is written.
            Effect::AppendAudit {
                actor: String::new(),
                event: CoordEvent::RoundOpened(coord::RoundOpened {
                    job: "j1".into(),
                    round: 2,
                    base_model: "00".into(),
                }),
            },
            send("c"),
        ];
        let (r, sent) = run(&audit, &store, effects, |e| e.to_string());
        assert_eq!(sent, [SiteId::new("a").unwrap(), SiteId::new("b").unwrap()]);
        let err = r.unwrap_err();
        assert!(err.contains("while recording round.opened by ;"), "{err}");
        // The batch is on record (two entries, one after the other), the
        // refused entry is not.
        assert_eq!(audit.signed_head().unwrap().seq, 1);
        // A queued job's checkpoint the store refuses (no such job) stops
        // the run the same way, after its append.
        let effects = vec![
            Effect::AppendAudit {
                actor: own,
                event: CoordEvent::JobPaused(coord::JobRef {
                    job: "queued".into(),
                }),
            },
            Effect::Persist {
                job: "queued".into(),
                checkpoint: crate::round::Checkpoint::Paused(true),
            },
            send("d"),
        ];
        let (r, sent) = run(&audit, &store, effects, |e| e);
        assert!(
            matches!(&r, Err(Unexecuted::Persist { job, .. }) if job == "queued"),
            "{r:?}"
        );
        assert!(sent.is_empty());
        assert_eq!(audit.signed_head().unwrap().seq, 2);
    }

    /// The failure names what was being recorded, as the engine's error
    /// messages did before they had one executor.
    #[test]
    fn a_failed_append_names_what_it_recorded() {
        let own = "fedlink://fed/coordinator";
        let site = fedlink_audit::event::site_actor("fed", "st-mary");
        assert_eq!(
            during(own, own, EventKind::RoundOpened),
            "round.opened; nothing was done"
        );
        assert_eq!(
            during(own, &site, EventKind::UpdateReceived),
            "an update of st-mary"
        );
        assert_eq!(
            during(own, &site, EventKind::UpdateInterrupted),
            "an interrupted upload of st-mary"
        );
        assert_eq!(
            during(own, &site, EventKind::EvalRejected),
            "an evaluation report of st-mary"
        );
        assert_eq!(
            during(own, "fedlink://fed/admin/ops", EventKind::JobPaused),
            "job.paused by fedlink://fed/admin/ops; nothing was done"
        );
    }
}
