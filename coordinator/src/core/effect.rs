//! What the core asks its driver to do ([`Effect`]) and why it closes a
//! connection ([`CloseReason`]): the vocabulary every part of the core
//! speaks, in a module of its own so that the parts (`sites`, …) and the
//! core's root, which re-exports them, do not import each other.

use crate::round::ConnId;

/// Why the core closes a connection.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer connection of the same site replaced it.
    Replaced,
    /// The site is not allowed in the job that runs (its `allow` list).
    NotAllowed,
    /// The peer is no longer allowed at all (revoked, removed or
    /// superseded certificate): the reason names which.
    Forbidden(String),
    /// The coordinator is shutting down.
    Shutdown,
}

impl CloseReason {
    /// The text sent to the peer with the close.
    pub fn text(&self) -> &str {
        match self {
            Self::Replaced => "a newer connection of this site replaced this one",
            Self::NotAllowed => "this site is not allowed in the job",
            Self::Forbidden(why) => why,
            Self::Shutdown => "coordinator shutting down",
        }
    }
}

/// Something the driver must do, in the order the core emits it. An
/// effect that changes state ([`Effect::changes_state`]) follows the
/// [`Effect::AppendAudit`] (or [`Effect::AppendAuditBatch`]) that records
/// it; if an append fails, the
/// driver executes nothing after it.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Close connection `conn` (the driver ends its tasks; the site may
    /// reconnect).
    Close {
        /// The connection.
        conn: ConnId,
        /// Why.
        reason: CloseReason,
    },
    /// Append an event to the coordinator's audit log, durably (the
    /// driver names the entry by [`CoordEvent::kind`] and serialises its
    /// details).
    ///
    /// [`CoordEvent::kind`]: fedlink_audit::CoordEvent::kind
    AppendAudit {
        /// Who did it (an identity URI).
        actor: String,
        /// What, with its typed details.
        event: fedlink_audit::CoordEvent,
    },
    /// Append several events of one actor to the audit log, durably with
    /// one fsync (a group commit): all of them are on record before any
    /// effect after it, or none is executed.
    AppendAuditBatch {
        /// Who did them (an identity URI).
        actor: String,
        /// What, each with its typed details, in order.
        entries: Vec<fedlink_audit::CoordEvent>,
    },
    /// Commit a checkpoint of a job that does not run now (queued) to the
    /// store.
    Persist {
        /// The job.
        job: String,
        /// The checkpoint.
        checkpoint: crate::round::Checkpoint,
    },
    /// Hand an input to the running job's round machine (and execute its
    /// actions).
    Apply(crate::round::Input),
    /// Queue a message on a connected site's control stream (dropped if
    /// the site is not connected).
    Send {
        /// The site.
        site: fedlink_protocol::SiteId,
        /// The message.
        message: fedlink_protocol::Message,
    },
    /// Send the coordinator's signed audit head, as of the appends before
    /// it, to those of `sites` that are connected.
    PushHead {
        /// The sites.
        sites: Vec<fedlink_protocol::SiteId>,
    },
    /// Keep a refused upload in its round's record (best effort: a round
    /// with no record keeps none).
    RecordRejected {
        /// The round.
        round: fedlink_protocol::RoundId,
        /// The refused upload.
        rejected: crate::store::RejectedUpdate,
    },
    /// Keep an accepted update's details in its round's record (best
    /// effort).
    RecordAccepted {
        /// The round.
        round: fedlink_protocol::RoundId,
        /// The accepted update.
        detail: crate::store::UpdateDetail,
    },
    /// Delete the spooled payload of the pending upload of `site` in
    /// `round` (refused: it is not archived).
    DiscardSpool {
        /// The site.
        site: fedlink_protocol::SiteId,
        /// The round.
        round: fedlink_protocol::RoundId,
    },
    /// Take the uncounted one-pass fold of the pending upload of `site` in
    /// `round` out of the round's accumulator (exactly: its spool is
    /// decoded again); if that fails it stays uncounted, and the round's
    /// end folds the round again from its counted updates.
    RetractFold {
        /// The site.
        site: fedlink_protocol::SiteId,
        /// The round.
        round: fedlink_protocol::RoundId,
    },
    /// Answer the pending upload of `site` in `round`.
    AnswerUpload {
        /// The site.
        site: fedlink_protocol::SiteId,
        /// The round.
        round: fedlink_protocol::RoundId,
        /// The answer.
        result: fedlink_protocol::message::UploadResult,
    },
    /// Keep the final model's federated evaluation on the job's round
    /// `round` (its last).
    RecordFinalEvaluation {
        /// The round.
        round: fedlink_protocol::RoundId,
        /// The evaluation.
        evaluation: fedlink_protocol::admin::FederatedEvaluation,
    },
    /// The job is over: the driver records its outcome (and its serve loop
    /// moves on to the next job).
    Finish(crate::round::JobOutcome),
    /// Write the site manifest (`sites.toml`) atomically, as given.
    SaveManifest(fedlink_certs::SiteManifest),
    /// Write the revocation list (`revoked.toml`) atomically, as given.
    SaveRevocations(fedlink_certs::RevokedFile),
    /// Re-read the site manifest and the revocation list now: every open
    /// connection they no longer allow is cut (sites through
    /// [`Sites::revoke_where`](super::Sites::revoke_where), admins by the driver).
    ReloadRegistry,
}

impl Effect {
    /// Whether executing it changes durable or job state (it must follow
    /// its audit append).
    pub fn changes_state(&self) -> bool {
        matches!(
            self,
            Self::Persist { .. }
                | Self::Apply(_)
                | Self::RecordRejected { .. }
                | Self::RecordAccepted { .. }
                | Self::DiscardSpool { .. }
                | Self::RetractFold { .. }
                | Self::RecordFinalEvaluation { .. }
                | Self::Finish(_)
                | Self::SaveManifest(_)
                | Self::SaveRevocations(_)
                | Self::ReloadRegistry
        )
    }

    /// Whether it appends at least one event to the audit log.
    pub fn appends_audit(&self) -> bool {
        match self {
            Self::AppendAudit { .. } => true,
            Self::AppendAuditBatch { entries, .. } => !entries.is_empty(),
            _ => false,
        }
    }

    /// Whether `effects` keep the core's rule: every effect that changes
    /// state follows an audit append (the first such effect has one
    /// before it).
    pub fn audited_first(effects: &[Self]) -> bool {
        effects
            .iter()
            .position(Self::changes_state)
            .is_none_or(|i| effects[..i].iter().any(Self::appends_audit))
    }
}
