//! [`Plain`]: the round machine's values printed from their typed fields
//! in the layout of their derived `Debug` form, with rounds as plain
//! numbers (`round: 3`, not `round: RoundId(3)`) and site ids as plain
//! strings (`site: "a"`, not `site: SiteId("a")`). The status file's
//! `phase`, the `job finished` log lines and `core::sim`'s trace print
//! them so, as they read before rounds and site ids were typed.

use std::fmt;

use fedlink_protocol::{RoundId, SiteId};

use super::{AcceptedUpdate, Action, Checkpoint, JobOutcome, Offer, PhaseView};

/// `value` printed with plain rounds and site ids (see the module docs);
/// `Display` and `Debug` print the same.
#[derive(Clone, Copy)]
pub struct Plain<'a, T>(pub &'a T);

fn round(r: &RoundId) -> &u64 {
    &r.0
}

fn site(s: &SiteId) -> &str {
    s.as_str()
}

impl fmt::Debug for Plain<'_, JobOutcome> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            JobOutcome::Completed { model } => {
                f.debug_struct("Completed").field("model", model).finish()
            }
            JobOutcome::Failed { round: r, reason } => f
                .debug_struct("Failed")
                .field("round", round(r))
                .field("reason", reason)
                .finish(),
            JobOutcome::Aborted { completed_rounds } => f
                .debug_struct("Aborted")
                .field("completed_rounds", completed_rounds)
                .finish(),
        }
    }
}

impl fmt::Debug for Plain<'_, PhaseView> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            PhaseView::Waiting { next_round } => f
                .debug_struct("Waiting")
                .field("next_round", round(next_round))
                .finish(),
            PhaseView::Collecting {
                round: r,
                attempt,
                deadline,
                accepted,
                pending,
            } => f
                .debug_struct("Collecting")
                .field("round", round(r))
                .field("attempt", attempt)
                .field("deadline", deadline)
                .field("accepted", accepted)
                .field("pending", pending)
                .finish(),
            PhaseView::Aggregating { round: r } => f
                .debug_struct("Aggregating")
                .field("round", round(r))
                .finish(),
            PhaseView::Finished(outcome) => {
                f.debug_tuple("Finished").field(&Plain(outcome)).finish()
            }
        }
    }
}

impl fmt::Debug for Plain<'_, AcceptedUpdate> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let u = self.0;
        f.debug_struct("AcceptedUpdate")
            .field("site", &site(&u.site))
            .field("round", round(&u.round))
            .field("payload_hash", &u.payload_hash)
            .field("num_examples", &u.num_examples)
            .field("bytes", &u.bytes)
            .field("received_unix_ms", &u.received_unix_ms)
            .finish()
    }
}

/// A list of accepted updates, each [`Plain`].
struct Updates<'a>(&'a [AcceptedUpdate]);

impl fmt::Debug for Updates<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter().map(Plain)).finish()
    }
}

/// A list of site ids, each a plain string.
struct Sites<'a>(&'a [SiteId]);

impl fmt::Debug for Sites<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter().map(site)).finish()
    }
}

impl fmt::Debug for Plain<'_, Checkpoint> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Checkpoint::RoundStarted {
                round: r,
                attempt,
                base_model,
                selected,
            } => f
                .debug_struct("RoundStarted")
                .field("round", round(r))
                .field("attempt", attempt)
                .field("base_model", base_model)
                .field("selected", &Sites(selected))
                .finish(),
            Checkpoint::UpdateAccepted(u) => {
                f.debug_tuple("UpdateAccepted").field(&Plain(u)).finish()
            }
            Checkpoint::RoundCompleted {
                round: r,
                model,
                updates,
                metrics,
            } => f
                .debug_struct("RoundCompleted")
                .field("round", round(r))
                .field("model", model)
                .field("updates", &Updates(updates))
                .field("metrics", metrics)
                .finish(),
            Checkpoint::Paused(paused) => f.debug_tuple("Paused").field(paused).finish(),
            Checkpoint::JobFinished(outcome) => {
                f.debug_tuple("JobFinished").field(&Plain(outcome)).finish()
            }
        }
    }
}

impl fmt::Debug for Plain<'_, Offer> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        f.debug_struct("Offer")
            .field("round", round(&o.round))
            .field("attempt", &o.attempt)
            .field("model", &o.model)
            .field("deadline", &o.deadline)
            .finish()
    }
}

impl fmt::Debug for Plain<'_, Action> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Action::Persist(cp) => f.debug_tuple("Persist").field(&Plain(cp)).finish(),
            Action::SendOffer { site: s, offer } => f
                .debug_struct("SendOffer")
                .field("site", &site(s))
                .field("offer", &Plain(offer))
                .finish(),
            Action::SendModel {
                site: s,
                round: r,
                model,
            } => f
                .debug_struct("SendModel")
                .field("site", &site(s))
                .field("round", round(r))
                .field("model", model)
                .finish(),
            Action::AckUpdate { site: s, round: r } => f
                .debug_struct("AckUpdate")
                .field("site", &site(s))
                .field("round", round(r))
                .finish(),
            Action::RejectUpdate {
                site: s,
                round: r,
                reason,
            } => f
                .debug_struct("RejectUpdate")
                .field("site", &site(s))
                .field("round", round(r))
                .field("reason", reason)
                .finish(),
            Action::CancelTask { site: s, round: r } => f
                .debug_struct("CancelTask")
                .field("site", &site(s))
                .field("round", round(r))
                .finish(),
            Action::Aggregate {
                round: r,
                base_model,
                updates,
            } => f
                .debug_struct("Aggregate")
                .field("round", round(r))
                .field("base_model", base_model)
                .field("updates", &Updates(updates))
                .finish(),
            Action::Evaluate { round: r, model } => f
                .debug_struct("Evaluate")
                .field("round", round(r))
                .field("model", model)
                .finish(),
            Action::Disconnect {
                site: s,
                conn,
                reason,
            } => f
                .debug_struct("Disconnect")
                .field("site", &site(s))
                .field("conn", conn)
                .field("reason", reason)
                .finish(),
            Action::JobFinished(outcome) => {
                f.debug_tuple("JobFinished").field(&Plain(outcome)).finish()
            }
        }
    }
}

impl<'a, T> fmt::Display for Plain<'a, T>
where
    Self: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::collections::BTreeMap;
    use std::time::Instant;

    use fedlink_protocol::ModelHash;

    use super::*;
    use crate::round::{ConnId, DisconnectReason, RejectReason};

    /// The derived `Debug` form of `value` with the typed ids of `rounds`
    /// and `sites` written plain: what [`Plain`] must print.
    fn derived_plain(value: &impl fmt::Debug, rounds: &[u64], sites: &[&str]) -> String {
        let mut text = format!("{value:?}");
        for r in rounds {
            text = text.replace(&format!("RoundId({r})"), &r.to_string());
        }
        for s in sites {
            text = text.replace(&format!("SiteId(\"{s}\")"), &format!("\"{s}\""));
        }
        text
    }

    fn update(site_id: &str, r: u64) -> AcceptedUpdate {
        AcceptedUpdate {
            site: SiteId::new(site_id).unwrap(),
            round: RoundId(r),
            payload_hash: ModelHash([r as u8; 32]),
            num_examples: 10 + r,
            bytes: 100,
            received_unix_ms: 1_700_000_000_000,
        }
    }

    /// Every checkpoint and action reads as its derived `Debug` form with
    /// the rounds and site ids plain, field for field.
    #[test]
    fn plain_is_the_derived_debug_with_plain_ids() {
        let (a, b) = (SiteId::new("site-a").unwrap(), SiteId::new("b").unwrap());
        let model = ModelHash([7; 32]);
        let outcome = JobOutcome::Failed {
            round: RoundId(4),
            reason: super::super::FailReason::Aggregation("x".into()),
        };
        let checkpoints = [
            Checkpoint::RoundStarted {
                round: RoundId(3),
                attempt: 2,
                base_model: model,
                selected: vec![a.clone(), b.clone()],
            },
            Checkpoint::UpdateAccepted(update("site-a", 3)),
            Checkpoint::RoundCompleted {
                round: RoundId(3),
                model,
                updates: vec![update("site-a", 3), update("b", 3)],
                metrics: BTreeMap::from([("loss".to_owned(), 0.5)]),
            },
            Checkpoint::Paused(true),
            Checkpoint::JobFinished(outcome.clone()),
        ];
        for cp in &checkpoints {
            let want = derived_plain(cp, &[3, 4], &["site-a", "b"]);
            assert_eq!(Plain(cp).to_string(), want);
            let action = Action::Persist(cp.clone());
            assert_eq!(
                Plain(&action).to_string(),
                derived_plain(&action, &[3, 4], &["site-a", "b"])
            );
        }
        let actions = [
            Action::SendOffer {
                site: a.clone(),
                offer: Offer {
                    round: RoundId(3),
                    attempt: 1,
                    model,
                    deadline: Instant::now(),
                },
            },
            Action::SendModel {
                site: a.clone(),
                round: RoundId(3),
                model,
            },
            Action::AckUpdate {
                site: b.clone(),
                round: RoundId(3),
            },
            Action::RejectUpdate {
                site: b.clone(),
                round: RoundId(3),
                reason: RejectReason::Invalid("bad".into()),
            },
            Action::CancelTask {
                site: a.clone(),
                round: RoundId(3),
            },
            Action::Aggregate {
                round: RoundId(3),
                base_model: model,
                updates: vec![update("b", 3)],
            },
            Action::Evaluate {
                round: RoundId(3),
                model,
            },
            Action::Disconnect {
                site: a.clone(),
                conn: ConnId(9),
                reason: DisconnectReason::Replaced,
            },
            Action::JobFinished(outcome),
        ];
        for action in &actions {
            assert_eq!(
                Plain(action).to_string(),
                derived_plain(action, &[3, 4], &["site-a", "b"])
            );
        }
    }
}
