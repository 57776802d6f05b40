//! The audit vocabulary shared by both writers (the coordinator and the
//! site agent) and by [`reconcile`](crate::reconcile): every event name an
//! entry's `event` field may hold, and the actor identities.
//!
//! Writers name events only through [`EventKind`] (never a string literal),
//! so a typo is a compile error and the list below is the complete
//! vocabulary. Readers (`audit show`, `verify`, `reconcile`) take any name:
//! [`EventKind::from_name`] answers `None` for a name this version does not
//! know (a log written by a newer writer), and such entries are still shown,
//! verified and — where the comparison does not need them — skipped.

use std::fmt;

/// Every event type written to a fedlink audit log, by either writer.
///
/// `as_str` is the dotted name stored in the entry (`update.sent`); the
/// names are part of the log format and never change.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    // --- both writers
    /// A torn last line (a crash during a write) was removed on start.
    TailRepaired,
    // --- the coordinator
    /// The coordinator started (first entry of every start).
    CoordinatorStarted,
    /// A site connection was accepted.
    ConnAccepted,
    /// A site connection closed.
    ConnClosed,
    /// A connection or handshake was refused (or a summary of refusals).
    ConnRefused,
    /// Free disk space fell below the limit.
    DiskLow,
    /// Free disk space is back above the limit.
    DiskOk,
    /// An admin command was carried out.
    AdminCommand,
    /// An admin command was refused.
    AdminRefused,
    /// A site was approved.
    SiteApproved,
    /// A site was revoked.
    SiteRevoked,
    /// A site's update key was rotated.
    SiteRotated,
    /// The coordinator recorded a site's signed audit head.
    SiteAuditHead,
    /// A site's audit head did not verify and was refused.
    SiteAuditHeadRejected,
    /// A job was submitted.
    JobSubmitted,
    /// A job was paused.
    JobPaused,
    /// A job was resumed.
    JobResumed,
    /// A job was aborted.
    JobAborted,
    /// A job finished.
    JobFinished,
    /// A round was opened.
    RoundOpened,
    /// An open round was discarded.
    RoundDiscarded,
    /// A round's updates were aggregated into a new model.
    RoundAggregated,
    /// The sites' federated evaluation of a round's base model was recorded
    /// (per site, example-weighted mean, reports left out with the reason).
    RoundEvaluated,
    /// The sites were asked to evaluate the job's final model.
    EvalRequested,
    /// A site's signed evaluation report was counted.
    EvalAccepted,
    /// A site's evaluation report was refused (with the reason).
    EvalRejected,
    /// An offer was sent to a site.
    OfferSent,
    /// An update arrived (accepted or refused).
    UpdateReceived,
    /// An accepted update was left out of the aggregate.
    UpdateExcluded,
    /// An upload's connection was lost part way; what arrived is kept for
    /// the site to resume (or dropped, as the entry says).
    UpdateInterrupted,
    /// A model was exported.
    ModelExported,
    // --- the site agent
    /// The agent started.
    AgentStarted,
    /// The agent stopped.
    AgentStopped,
    /// The agent connected and was welcomed.
    ConnEstablished,
    /// The agent's connection ended or an attempt failed.
    ConnLost,
    /// An offer arrived at the site.
    OfferReceived,
    /// The site accepted an offer.
    OfferAccepted,
    /// The site declined an offer (also recorded by the coordinator).
    OfferDeclined,
    /// A round was cancelled (seen by the site).
    RoundCancelled,
    /// Work on a round failed at the site.
    RoundFailed,
    /// The site obtained the global model.
    ModelReceived,
    /// Local training completed.
    TrainCompleted,
    /// The site sent an update.
    UpdateSent,
    /// The coordinator's answer to an update.
    UpdateResult,
    /// The site resumed an interrupted upload (same signed envelope) from
    /// the record the coordinator holds.
    UpdateResumed,
    /// The site recorded the coordinator's signed audit head.
    CoordinatorAuditHead,
    /// The coordinator told the site which model a round (or the job) produced.
    RoundOutcome,
    /// The site evaluated a model it was asked about and sent the signed
    /// metrics (recorded before they are sent).
    EvalReported,
    /// The site refused a model or downlink update it received (decode
    /// error, hash mismatch) and fetched the whole model instead.
    ModelRefused,
}

impl EventKind {
    /// Every kind, in declaration order.
    pub const ALL: &'static [Self] = &[
        Self::TailRepaired,
        Self::CoordinatorStarted,
        Self::ConnAccepted,
        Self::ConnClosed,
        Self::ConnRefused,
        Self::DiskLow,
        Self::DiskOk,
        Self::AdminCommand,
        Self::AdminRefused,
        Self::SiteApproved,
        Self::SiteRevoked,
        Self::SiteRotated,
        Self::SiteAuditHead,
        Self::SiteAuditHeadRejected,
        Self::JobSubmitted,
        Self::JobPaused,
        Self::JobResumed,
        Self::JobAborted,
        Self::JobFinished,
        Self::RoundOpened,
        Self::RoundDiscarded,
        Self::RoundAggregated,
        Self::RoundEvaluated,
        Self::EvalRequested,
        Self::EvalAccepted,
        Self::EvalRejected,
        Self::OfferSent,
        Self::UpdateReceived,
        Self::UpdateExcluded,
        Self::UpdateInterrupted,
        Self::ModelExported,
        Self::AgentStarted,
        Self::AgentStopped,
        Self::ConnEstablished,
        Self::ConnLost,
        Self::OfferReceived,
        Self::OfferAccepted,
        Self::OfferDeclined,
        Self::RoundCancelled,
        Self::RoundFailed,
        Self::ModelReceived,
        Self::TrainCompleted,
        Self::UpdateSent,
        Self::UpdateResult,
        Self::UpdateResumed,
        Self::CoordinatorAuditHead,
        Self::RoundOutcome,
        Self::EvalReported,
        Self::ModelRefused,
    ];

    /// The name stored in an entry's `event` field.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TailRepaired => "audit.tail_repaired",
            Self::CoordinatorStarted => "coordinator.started",
            Self::ConnAccepted => "conn.accepted",
            Self::ConnClosed => "conn.closed",
            Self::ConnRefused => "conn.refused",
            Self::DiskLow => "disk.low",
            Self::DiskOk => "disk.ok",
            Self::AdminCommand => "admin.command",
            Self::AdminRefused => "admin.refused",
            Self::SiteApproved => "site.approved",
            Self::SiteRevoked => "site.revoked",
            Self::SiteRotated => "site.rotated",
            Self::SiteAuditHead => "site.audit_head",
            Self::SiteAuditHeadRejected => "site.audit_head_rejected",
            Self::JobSubmitted => "job.submitted",
            Self::JobPaused => "job.paused",
            Self::JobResumed => "job.resumed",
            Self::JobAborted => "job.aborted",
            Self::JobFinished => "job.finished",
            Self::RoundOpened => "round.opened",
            Self::RoundDiscarded => "round.discarded",
            Self::RoundAggregated => "round.aggregated",
            Self::RoundEvaluated => "round.evaluated",
            Self::EvalRequested => "eval.requested",
            Self::EvalAccepted => "eval.accepted",
            Self::EvalRejected => "eval.rejected",
            Self::EvalReported => "eval.reported",
            Self::OfferSent => "offer.sent",
            Self::UpdateReceived => "update.received",
            Self::UpdateExcluded => "update.excluded",
            Self::UpdateInterrupted => "update.interrupted",
            Self::ModelExported => "model.exported",
            Self::AgentStarted => "agent.started",
            Self::AgentStopped => "agent.stopped",
            Self::ConnEstablished => "conn.established",
            Self::ConnLost => "conn.lost",
            Self::OfferReceived => "offer.received",
            Self::OfferAccepted => "offer.accepted",
            Self::OfferDeclined => "offer.declined",
            Self::RoundCancelled => "round.cancelled",
            Self::RoundFailed => "round.failed",
            Self::ModelReceived => "model.received",
            Self::TrainCompleted => "train.completed",
            Self::UpdateSent => "update.sent",
            Self::UpdateResult => "update.result",
            Self::UpdateResumed => "update.resumed",
            Self::CoordinatorAuditHead => "coordinator.audit_head",
            Self::RoundOutcome => "round.outcome",
            Self::ModelRefused => "model.refused",
        }
    }

    /// The kind named `name`, or `None` for a name this version does not
    /// know (for reading only: a newer writer's log stays readable).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scheme of fedlink certificate identities (`fedlink://<federation>/<role>/<name>`).
pub const IDENTITY_SCHEME: &str = "fedlink://";

/// The actor of entries no certificate identity caused.
pub const SYSTEM_ACTOR: &str = "system";

/// The actor of an entry a site caused: `fedlink://<federation>/site/<site>`
/// (the identity in the site's certificate).
pub fn site_actor(federation: &str, site: &str) -> String {
    format!("{IDENTITY_SCHEME}{federation}/site/{site}")
}

/// The site name of a site actor (`fedlink://<federation>/site/<name>`), or
/// `None` for any other actor.
pub fn site_of_actor(actor: &str) -> Option<&str> {
    let rest = actor.strip_prefix(IDENTITY_SCHEME)?;
    let (_, name) = rest.split_once("/site/")?;
    Some(name)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        let mut seen = std::collections::BTreeSet::new();
        for &k in EventKind::ALL {
            assert!(seen.insert(k.as_str()), "duplicate name {k}");
            assert_eq!(EventKind::from_name(k.as_str()), Some(k));
            assert_eq!(k.to_string(), k.as_str());
        }
        assert_eq!(seen.len(), EventKind::ALL.len());
        assert_eq!(EventKind::from_name("future.event"), None);
    }

    #[test]
    fn site_actors_round_trip() {
        let a = site_actor("fed", "st-marys");
        assert_eq!(a, "fedlink://fed/site/st-marys");
        assert_eq!(site_of_actor(&a), Some("st-marys"));
        assert_eq!(site_of_actor("fedlink://fed/coordinator/c"), None);
        assert_eq!(site_of_actor("system"), None);
    }
}
