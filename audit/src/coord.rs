//! The coordinator's audit events with their typed `details`: one
//! [`CoordEvent`] variant per event the coordinator writes, each with the
//! fields of its entry. The writer serialises the variant (untagged: its
//! fields are the entry's `details`) and names the entry by
//! [`CoordEvent::kind`]; [`reconcile`](crate::reconcile) reads the same
//! structs back from an entry's details.
//!
//! ```text
//!  coordinator ── CoordEvent ──▶ kind() ─────▶ entry.event  ("update.received")
//!                     └────────▶ details() ──▶ entry.details ({"accepted":true,…})
//!  reconcile   ◀── UpdateReceived::deserialize(&entry.details) (unknown fields ignored)
//! ```
//!
//! Identifiers, hashes and nonces are plain strings (lowercase hex for
//! hashes, nonces and signatures), exactly as the entries hold them: the
//! protocol's `ModelHash` or `PayloadHash` serialise as byte arrays, not as
//! the hex the log has always held. The details are turned into a JSON
//! object ([`CoordEvent::details`]) before they are appended, so their
//! members are written in the order `serde_json` gives an object (sorted by
//! name), as they were when the details were built with `json!`.
//!
//! Reading: every struct ignores members it does not know (a newer
//! writer's); a member a comparison does not need has a default where an
//! older writer may not have written it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::EventKind;

/// One event the coordinator writes: its `event` name is
/// [`kind`](Self::kind)'s, its `details` are the variant's fields.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum CoordEvent {
    /// `audit.tail_repaired`: a torn last line was removed on start.
    TailRepaired(TailRepaired),
    /// `coordinator.started`: the first entry of every start.
    CoordinatorStarted(CoordinatorStarted),
    /// `conn.accepted`: a connection's handshake was accepted.
    ConnAccepted(ConnAccepted),
    /// `conn.closed`: a connection ended.
    ConnClosed(ConnClosed),
    /// `conn.refused`: a connection was refused after its handshake.
    ConnRefused(ConnRefused),
    /// `conn.refused`: a summary of handshakes that failed from one source.
    HandshakesRefused(HandshakesRefused),
    /// `disk.low`: free disk space fell below the limit.
    DiskLow(DiskSpace),
    /// `disk.ok`: free disk space is back above the limit.
    DiskOk(DiskSpace),
    /// `admin.command`: an admin command, before it is carried out.
    AdminCommand(AdminCommand),
    /// `admin.refused`: an admin command refused (a revoked certificate).
    AdminRefused(AdminRefused),
    /// `site.approved`: a site added to the registry.
    SiteApproved(SiteEntry),
    /// `site.revoked`: a site removed from the registry and revoked.
    SiteRevoked(SiteRevoked),
    /// `site.rotated`: a site's certificate (and key) replaced.
    SiteRotated(SiteEntry),
    /// `site.audit_head`: a site's signed audit head, verified and recorded.
    SiteAuditHead(AuditHeadOf),
    /// `site.audit_head_rejected`: a site's audit head that did not verify.
    SiteAuditHeadRejected(AuditHeadRejected),
    /// `job.submitted`: a job accepted into the store.
    JobSubmitted(JobSubmitted),
    /// `job.paused`.
    JobPaused(JobRef),
    /// `job.resumed`.
    JobResumed(JobRef),
    /// `job.aborted`.
    JobAborted(JobRef),
    /// `job.finished`: a job's end and its outcome.
    JobFinished(JobFinished),
    /// `round.opened`.
    RoundOpened(RoundOpened),
    /// `round.discarded`: an open round dropped.
    RoundDiscarded(RoundDiscarded),
    /// `round.aggregated`: a round's inputs → its output model.
    RoundAggregated(RoundAggregated),
    /// `round.evaluated`: the sites' federated evaluation of a model.
    RoundEvaluated(RoundEvaluated),
    /// `eval.requested`: the sites asked to evaluate the final model.
    EvalRequested(EvalRequested),
    /// `eval.accepted`: a site's evaluation report counted.
    EvalAccepted(EvalReport),
    /// `eval.rejected`: a site's evaluation report refused.
    EvalRejected(EvalRejected),
    /// `offer.sent`.
    OfferSent(OfferSent),
    /// `offer.declined`: a site declined an offer (with its reason).
    OfferDeclined(OfferDeclined),
    /// `update.received`: an upload accepted or refused.
    UpdateReceived(UpdateReceived),
    /// `update.excluded`: an accepted update left out of the aggregate.
    UpdateExcluded(UpdateExcluded),
    /// `update.interrupted`: an upload cut short.
    UpdateInterrupted(UpdateInterrupted),
    /// `model.exported`.
    ModelExported(ModelExported),
}

impl CoordEvent {
    /// The entry's `event` name.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::TailRepaired(_) => EventKind::TailRepaired,
            Self::CoordinatorStarted(_) => EventKind::CoordinatorStarted,
            Self::ConnAccepted(_) => EventKind::ConnAccepted,
            Self::ConnClosed(_) => EventKind::ConnClosed,
            Self::ConnRefused(_) | Self::HandshakesRefused(_) => EventKind::ConnRefused,
            Self::DiskLow(_) => EventKind::DiskLow,
            Self::DiskOk(_) => EventKind::DiskOk,
            Self::AdminCommand(_) => EventKind::AdminCommand,
            Self::AdminRefused(_) => EventKind::AdminRefused,
            Self::SiteApproved(_) => EventKind::SiteApproved,
            Self::SiteRevoked(_) => EventKind::SiteRevoked,
            Self::SiteRotated(_) => EventKind::SiteRotated,
            Self::SiteAuditHead(_) => EventKind::SiteAuditHead,
            Self::SiteAuditHeadRejected(_) => EventKind::SiteAuditHeadRejected,
            Self::JobSubmitted(_) => EventKind::JobSubmitted,
            Self::JobPaused(_) => EventKind::JobPaused,
            Self::JobResumed(_) => EventKind::JobResumed,
            Self::JobAborted(_) => EventKind::JobAborted,
            Self::JobFinished(_) => EventKind::JobFinished,
            Self::RoundOpened(_) => EventKind::RoundOpened,
            Self::RoundDiscarded(_) => EventKind::RoundDiscarded,
            Self::RoundAggregated(_) => EventKind::RoundAggregated,
            Self::RoundEvaluated(_) => EventKind::RoundEvaluated,
            Self::EvalRequested(_) => EventKind::EvalRequested,
            Self::EvalAccepted(_) => EventKind::EvalAccepted,
            Self::EvalRejected(_) => EventKind::EvalRejected,
            Self::OfferSent(_) => EventKind::OfferSent,
            Self::OfferDeclined(_) => EventKind::OfferDeclined,
            Self::UpdateReceived(_) => EventKind::UpdateReceived,
            Self::UpdateExcluded(_) => EventKind::UpdateExcluded,
            Self::UpdateInterrupted(_) => EventKind::UpdateInterrupted,
            Self::ModelExported(_) => EventKind::ModelExported,
        }
    }

    /// The entry's `details`: the variant's fields as a JSON object.
    pub fn details(&self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(self)
    }

    /// The site an event is about, for the events that name one in their
    /// details (`site`).
    pub fn site(&self) -> Option<&str> {
        match self {
            Self::SiteApproved(e) | Self::SiteRotated(e) => Some(&e.site),
            Self::SiteRevoked(e) => Some(&e.entry.site),
            Self::SiteAuditHead(h) => Some(&h.site),
            Self::SiteAuditHeadRejected(h) => Some(&h.head.site),
            Self::EvalAccepted(r) => Some(&r.site),
            Self::EvalRejected(r) => Some(&r.report.site),
            Self::OfferSent(o) => Some(&o.site),
            Self::OfferDeclined(o) => Some(&o.site),
            Self::UpdateReceived(u) => Some(&u.site),
            Self::UpdateExcluded(u) => Some(&u.site),
            Self::UpdateInterrupted(u) => Some(&u.site),
            _ => None,
        }
    }
}

/// `audit.tail_repaired` (both writers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TailRepaired {
    /// The 1-based line that was removed.
    pub line: u64,
    /// Its length in bytes.
    pub removed_bytes: u64,
    /// blake3 of the removed bytes (hex).
    pub removed_blake3: String,
}

/// `coordinator.started`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorStarted {
    /// The coordinator's version.
    pub version: String,
    /// The federation.
    pub federation: String,
    /// The audit log's public key (64 hex digits).
    pub audit_public_key: String,
}

/// `conn.accepted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnAccepted {
    /// The peer's address (`ip:port`).
    pub peer_addr: String,
    /// The peer's certificate identity.
    pub identity: String,
    /// The ALPN the peer chose (lossy UTF-8), if any.
    pub alpn: Option<String>,
    /// The serial of the peer's certificate, if it parsed.
    pub cert_serial: Option<String>,
    /// The transport (`quic`, `tcp`).
    pub transport: String,
}

/// `conn.closed`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnClosed {
    /// The peer's certificate identity.
    pub identity: String,
    /// Why it ended.
    pub reason: String,
}

/// `conn.refused` of one connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnRefused {
    /// The peer's address.
    pub peer_addr: String,
    /// Its certificate identity, if it had one.
    pub identity: Option<String>,
    /// The ALPN it chose (lossy UTF-8), if any.
    pub alpn: Option<String>,
    /// Why it was refused.
    pub reason: String,
}

/// `conn.refused`: the handshakes that failed from one source, summed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakesRefused {
    /// The source (an address or a network).
    pub peer_addr: String,
    /// Always `handshake`.
    pub stage: String,
    /// Failed handshakes.
    pub count: u64,
    /// The most frequent reason.
    pub reason: String,
    /// Failures per reason.
    pub reasons: BTreeMap<String, u64>,
    /// When the first one happened (Unix ms).
    pub first_unix_ms: u64,
    /// When the last one happened (Unix ms).
    pub last_unix_ms: u64,
}

/// `disk.low` / `disk.ok`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpace {
    /// Free bytes now.
    pub free_bytes: u64,
    /// The limit.
    pub min_free_bytes: u64,
}

/// `admin.command`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminCommand {
    /// The command's name (`jobs.pause`, …).
    pub command: String,
    /// Its arguments, as the admin protocol serialises them.
    pub args: Value,
}

/// `admin.refused`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRefused {
    /// The peer's address.
    pub peer_addr: String,
    /// The admin's identity.
    pub identity: String,
    /// Why it was refused.
    pub reason: String,
}

/// A site's registry entry (`site.approved`, `site.rotated`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteEntry {
    /// The site.
    pub site: String,
    /// Its certificate's serial.
    pub cert_serial: String,
    /// Its certificate's fingerprint.
    pub cert_fingerprint: String,
    /// Its update public key (hex).
    pub update_public_key: String,
    /// Its cap on an update's example count, if any.
    pub max_examples: Option<u64>,
}

/// `site.revoked`: the entry removed and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRevoked {
    /// The entry.
    #[serde(flatten)]
    pub entry: SiteEntry,
    /// Why, if the admin said (`null` otherwise).
    pub reason: Option<String>,
}

/// `site.audit_head`: a head of a site's log, as the site sent it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHeadOf {
    /// The site.
    pub site: String,
    /// The head's sequence number.
    pub seq: u64,
    /// The head entry's hash (hex).
    pub hash: String,
    /// When the site signed it (Unix ms).
    pub ts_unix_ms: u64,
    /// The signature (hex).
    pub sig: String,
}

/// `site.audit_head_rejected`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHeadRejected {
    /// The head.
    #[serde(flatten)]
    pub head: AuditHeadOf,
    /// Why it was refused.
    pub reason: String,
}

/// `job.submitted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSubmitted {
    /// The job.
    pub job: String,
    /// blake3 of the job file (hex).
    pub job_toml_blake3: String,
    /// The initial model's hash, when the entry is written at start-up
    /// (a job from the configuration); absent for `jobs submit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_model: Option<String>,
}

/// An event about a job and nothing else (`job.paused`, …).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRef {
    /// The job.
    pub job: String,
}

/// `job.finished`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFinished {
    /// The job.
    pub job: String,
    /// How it ended.
    pub outcome: JobOutcome,
}

/// How a job ended (`job.finished`'s `outcome`, tagged by `result`).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum JobOutcome {
    /// Every round done.
    Completed {
        /// The final model's hash (hex).
        model: String,
    },
    /// A round failed.
    Failed {
        /// The round.
        round: u64,
        /// Why (the round machine's reason, debug-formatted).
        reason: String,
    },
    /// Aborted by an admin.
    Aborted {
        /// Rounds completed before.
        completed_rounds: u64,
    },
}

/// `round.opened`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundOpened {
    /// The job.
    pub job: String,
    /// The round.
    pub round: u64,
    /// The model it starts from (hex).
    pub base_model: String,
}

/// `round.discarded`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundDiscarded {
    /// The job.
    pub job: String,
    /// The round.
    pub round: u64,
    /// Why.
    pub reason: String,
}

/// `round.aggregated`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundAggregated {
    /// The job.
    pub job: String,
    /// The round.
    pub round: u64,
    /// The model the round started from (hex).
    #[serde(default)]
    pub base_model: String,
    /// The model it produced (hex).
    pub output_model: String,
    /// The aggregation strategy, as the aggregator serialises it.
    #[serde(default)]
    pub strategy: Value,
    /// The central DP applied, when the strategy has it.
    pub dp: Option<DpApplied>,
    /// The updates aggregated.
    pub inputs: Vec<AggregatedInput>,
}

/// The central DP of a `round.aggregated`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpApplied {
    /// Standard deviation of the noise added.
    pub noise_std: f64,
    /// The clip norm (its sensitivity).
    pub clip_norm: Option<f64>,
    /// ε spent so far, when accounted.
    pub epsilon: Option<f64>,
    /// δ of that ε.
    pub delta: Option<f64>,
}

/// One input of a `round.aggregated`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggregatedInput {
    /// The site.
    pub site: String,
    /// Its update's payload hash (hex).
    pub payload_hash: String,
    /// Its weight; `None` only in entries that lack it.
    pub num_examples: Option<u64>,
}

/// `round.evaluated`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundEvaluated {
    /// The job.
    pub job: String,
    /// The round it is kept on.
    pub round: u64,
    /// The evaluated model (hex).
    pub model: String,
    /// Rounds completed when the model was made.
    pub after_round: u64,
    /// Per site.
    pub sites: Vec<fedlink_protocol::admin::SiteEvaluation>,
    /// The example-weighted mean.
    pub weighted: fedlink_protocol::admin::WeightedMetrics,
    /// Reports left out (always written, `[]` when none).
    pub excluded: Vec<fedlink_protocol::admin::ExcludedEvaluation>,
    /// The sites were asked to evaluate the final model (written only
    /// then, as `true`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub requested: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `eval.requested`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalRequested {
    /// The job.
    pub job: String,
    /// The round the request names (the job's last).
    pub round: u64,
    /// The model to evaluate (hex).
    pub model: String,
    /// The sites asked.
    pub sites: Vec<String>,
}

/// A site's evaluation report (`eval.accepted`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The site.
    pub site: String,
    /// The job the report names.
    pub job: String,
    /// The round it names.
    pub round: u64,
    /// The model it evaluated (hex).
    pub model: String,
    /// Its validation examples.
    pub num_eval_examples: u64,
}

/// `eval.rejected`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalRejected {
    /// The report.
    #[serde(flatten)]
    pub report: EvalReport,
    /// Why it was refused.
    pub reason: String,
}

/// `offer.sent`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferSent {
    /// The job.
    pub job: String,
    /// The round.
    pub round: u64,
    /// The site.
    pub site: String,
    /// The model offered (hex).
    pub base_model: String,
}

/// `offer.declined`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferDeclined {
    /// The job.
    pub job: String,
    /// The round.
    pub round: u64,
    /// The site.
    pub site: String,
    /// The site's reason.
    pub reason: String,
}

/// `update.received`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReceived {
    /// The job its header names.
    pub job: String,
    /// The round its header names.
    pub round: u64,
    /// The site its header names.
    pub site: String,
    /// blake3 of its payload (hex).
    pub payload_hash: String,
    /// Payload bytes received (the declared length when refused before
    /// its payload).
    pub payload_bytes: u64,
    /// The weight it claims.
    pub num_examples: u64,
    /// Its nonce (hex).
    pub nonce: String,
    /// Its envelope's signature (hex).
    #[serde(default)]
    pub envelope_sig: String,
    /// Whether it was accepted.
    pub accepted: bool,
    /// Why it was refused (`None`: accepted).
    pub reason: Option<String>,
}

/// `update.excluded`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateExcluded {
    /// The job.
    pub job: String,
    /// The round.
    pub round: u64,
    /// The site.
    pub site: String,
    /// The update's payload hash (hex).
    pub payload_hash: String,
    /// Why.
    pub reason: String,
}

/// `update.interrupted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateInterrupted {
    /// The job its header names.
    pub job: String,
    /// The round its header names.
    pub round: u64,
    /// The site its header names.
    pub site: String,
    /// blake3 of its payload (hex).
    pub payload_hash: String,
    /// Its declared payload length.
    pub payload_bytes: u64,
    /// Its nonce (hex).
    pub nonce: String,
    /// Whole records received.
    pub records_received: u64,
    /// Payload bytes of those records.
    pub bytes_received: u64,
    /// Bytes of a record the cut left incomplete (dropped).
    pub partial_record_bytes_dropped: u64,
    /// What ended the upload.
    pub cause: String,
    /// Whether what arrived is kept for the site to resume.
    pub kept_for_resume: bool,
    /// Why not, if not.
    pub not_kept_because: Option<String>,
}

/// `model.exported`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelExported {
    /// The model (hex).
    pub model: String,
    /// The format (`safetensors`).
    pub format: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use fedlink_protocol::admin::{ExcludedEvaluation, SiteEvaluation, WeightedMetrics};
    use serde_json::json;

    const H1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const H2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    /// The entry bytes of `event`'s details are those of `old` (what the
    /// coordinator's `json!` built before the details were typed), its
    /// name is `kind`, and the details read back as the same event.
    #[track_caller]
    fn pins<T>(event: CoordEvent, kind: EventKind, old: Value, back: fn(&Value) -> Option<T>)
    where
        T: PartialEq + std::fmt::Debug,
        CoordEvent: From<T>,
    {
        assert_eq!(event.kind(), kind);
        let details = event.details().unwrap();
        assert_eq!(
            serde_json::to_string(&details).unwrap(),
            serde_json::to_string(&old).unwrap(),
            "{kind}"
        );
        let read = back(&details).expect("reads back");
        assert_eq!(CoordEvent::from(read), event, "{kind}");
    }

    macro_rules! from_variant {
        ($($t:ident => $v:ident),* $(,)?) => {$(
            impl From<$t> for CoordEvent {
                fn from(x: $t) -> Self {
                    Self::$v(x)
                }
            }
        )*};
    }
    // One variant per struct for the round trip (the shared structs are
    // checked through their first variant; the others below).
    from_variant!(
        TailRepaired => TailRepaired, CoordinatorStarted => CoordinatorStarted,
        ConnAccepted => ConnAccepted, ConnClosed => ConnClosed, ConnRefused => ConnRefused,
        HandshakesRefused => HandshakesRefused, DiskSpace => DiskLow,
        AdminCommand => AdminCommand, AdminRefused => AdminRefused, SiteEntry => SiteApproved,
        SiteRevoked => SiteRevoked, AuditHeadOf => SiteAuditHead,
        AuditHeadRejected => SiteAuditHeadRejected, JobSubmitted => JobSubmitted,
        JobRef => JobPaused, JobFinished => JobFinished, RoundOpened => RoundOpened,
        RoundDiscarded => RoundDiscarded, RoundAggregated => RoundAggregated,
        RoundEvaluated => RoundEvaluated, EvalRequested => EvalRequested,
        EvalReport => EvalAccepted, EvalRejected => EvalRejected, OfferSent => OfferSent,
        OfferDeclined => OfferDeclined, UpdateReceived => UpdateReceived,
        UpdateExcluded => UpdateExcluded, UpdateInterrupted => UpdateInterrupted,
        ModelExported => ModelExported,
    );

    fn de<T: serde::de::DeserializeOwned>(v: &Value) -> Option<T> {
        T::deserialize(v).ok()
    }

    fn site_entry() -> SiteEntry {
        SiteEntry {
            site: "st-mary".into(),
            cert_serial: "01ab".into(),
            cert_fingerprint: H1.into(),
            update_public_key: H2.into(),
            max_examples: None,
        }
    }

    fn site_entry_json() -> Value {
        json!({
            "site": "st-mary",
            "cert_serial": "01ab",
            "cert_fingerprint": H1,
            "update_public_key": H2,
            "max_examples": None::<u64>,
        })
    }

    fn eval_report() -> EvalReport {
        EvalReport {
            site: "a".into(),
            job: "j".into(),
            round: 4,
            model: H1.into(),
            num_eval_examples: 30,
        }
    }

    fn eval_report_json() -> Value {
        json!({
            "site": "a",
            "job": "j",
            "round": 4,
            "model": H1,
            "num_eval_examples": 30,
        })
    }

    fn head() -> AuditHeadOf {
        AuditHeadOf {
            site: "a".into(),
            seq: 12,
            hash: H1.into(),
            ts_unix_ms: 1_700_000_000_123,
            sig: "ab".repeat(64),
        }
    }

    fn head_json() -> Value {
        json!({
            "site": "a",
            "seq": 12,
            "hash": H1,
            "ts_unix_ms": 1_700_000_000_123u64,
            "sig": "ab".repeat(64),
        })
    }

    #[test]
    fn connection_and_disk_events_keep_their_bytes() {
        pins(
            CoordEvent::TailRepaired(TailRepaired {
                line: 7,
                removed_bytes: 33,
                removed_blake3: H1.into(),
            }),
            EventKind::TailRepaired,
            json!({"line": 7u64, "removed_bytes": 33u64, "removed_blake3": H1}),
            de::<TailRepaired>,
        );
        pins(
            CoordEvent::CoordinatorStarted(CoordinatorStarted {
                version: "0.1.0".into(),
                federation: "fed".into(),
                audit_public_key: H2.into(),
            }),
            EventKind::CoordinatorStarted,
            json!({"version": "0.1.0", "federation": "fed", "audit_public_key": H2}),
            de::<CoordinatorStarted>,
        );
        for (alpn, serial) in [(Some("fedlink/7"), Some("0a")), (None, None)] {
            pins(
                CoordEvent::ConnAccepted(ConnAccepted {
                    peer_addr: "127.0.0.1:4433".into(),
                    identity: "fedlink://fed/site/a".into(),
                    alpn: alpn.map(str::to_owned),
                    cert_serial: serial.map(str::to_owned),
                    transport: "quic".into(),
                }),
                EventKind::ConnAccepted,
                json!({
                    "peer_addr": "127.0.0.1:4433",
                    "identity": "fedlink://fed/site/a",
                    "alpn": alpn.map(|a| String::from_utf8_lossy(a.as_bytes())),
                    "cert_serial": serial.map(str::to_owned),
                    "transport": "quic",
                }),
                de::<ConnAccepted>,
            );
        }
        pins(
            CoordEvent::ConnClosed(ConnClosed {
                identity: "fedlink://fed/site/a".into(),
                reason: "closed \"by peer\"\n".into(),
            }),
            EventKind::ConnClosed,
            json!({"identity": "fedlink://fed/site/a", "reason": "closed \"by peer\"\n"}),
            de::<ConnClosed>,
        );
        pins(
            CoordEvent::ConnRefused(ConnRefused {
                peer_addr: "10.0.0.2:5000".into(),
                identity: None,
                alpn: Some("h3".into()),
                reason: "no".into(),
            }),
            EventKind::ConnRefused,
            json!({"peer_addr": "10.0.0.2:5000", "identity": None::<&str>, "alpn": Some("h3"),
                "reason": "no"}),
            de::<ConnRefused>,
        );
        let reasons: BTreeMap<String, u64> = [("bad cert".to_owned(), 3), ("x".to_owned(), 1)]
            .into_iter()
            .collect();
        pins(
            CoordEvent::HandshakesRefused(HandshakesRefused {
                peer_addr: "10.0.0.0/24".into(),
                stage: "handshake".into(),
                count: 4,
                reason: "bad cert".into(),
                reasons: reasons.clone(),
                first_unix_ms: 5,
                last_unix_ms: 9,
            }),
            EventKind::ConnRefused,
            json!({
                "peer_addr": "10.0.0.0/24",
                "stage": "handshake",
                "count": 4u64,
                "reason": "bad cert",
                "reasons": reasons,
                "first_unix_ms": 5u64,
                "last_unix_ms": 9u64,
            }),
            de::<HandshakesRefused>,
        );
        let disk = DiskSpace {
            free_bytes: 1 << 30,
            min_free_bytes: 1 << 31,
        };
        let disk_json = json!({"free_bytes": 1u64 << 30, "min_free_bytes": 1u64 << 31});
        pins(
            CoordEvent::DiskLow(disk.clone()),
            EventKind::DiskLow,
            disk_json.clone(),
            de::<DiskSpace>,
        );
        let ok = CoordEvent::DiskOk(disk);
        assert_eq!(ok.kind(), EventKind::DiskOk);
        assert_eq!(ok.details().unwrap(), disk_json);
    }

    #[test]
    fn admin_and_site_registry_events_keep_their_bytes() {
        let args = json!({"job": "j", "force": true});
        pins(
            CoordEvent::AdminCommand(AdminCommand {
                command: "jobs.pause".into(),
                args: args.clone(),
            }),
            EventKind::AdminCommand,
            json!({"command": "jobs.pause", "args": args}),
            de::<AdminCommand>,
        );
        pins(
            CoordEvent::AdminRefused(AdminRefused {
                peer_addr: "127.0.0.1:1".into(),
                identity: "fedlink://fed/admin/ops".into(),
                reason: "the admin certificate has been revoked".into(),
            }),
            EventKind::AdminRefused,
            json!({"peer_addr": "127.0.0.1:1", "identity": "fedlink://fed/admin/ops",
                "reason": "the admin certificate has been revoked"}),
            de::<AdminRefused>,
        );
        pins(
            CoordEvent::SiteApproved(site_entry()),
            EventKind::SiteApproved,
            site_entry_json(),
            de::<SiteEntry>,
        );
        let mut capped = site_entry();
        capped.max_examples = Some(500);
        let mut capped_json = site_entry_json();
        capped_json["max_examples"] = json!(Some(500u64));
        let rotated = CoordEvent::SiteRotated(capped);
        assert_eq!(rotated.kind(), EventKind::SiteRotated);
        assert_eq!(
            serde_json::to_string(&rotated.details().unwrap()).unwrap(),
            serde_json::to_string(&capped_json).unwrap()
        );
        for reason in [Some("key leaked".to_owned()), None] {
            let mut revoked_json = site_entry_json();
            revoked_json["reason"] = json!(reason);
            pins(
                CoordEvent::SiteRevoked(SiteRevoked {
                    entry: site_entry(),
                    reason,
                }),
                EventKind::SiteRevoked,
                revoked_json,
                de::<SiteRevoked>,
            );
        }
        pins(
            CoordEvent::SiteAuditHead(head()),
            EventKind::SiteAuditHead,
            head_json(),
            de::<AuditHeadOf>,
        );
        let mut rejected_json = head_json();
        rejected_json["reason"] = Value::String("bad signature".into());
        pins(
            CoordEvent::SiteAuditHeadRejected(AuditHeadRejected {
                head: head(),
                reason: "bad signature".into(),
            }),
            EventKind::SiteAuditHeadRejected,
            rejected_json,
            de::<AuditHeadRejected>,
        );
        pins(
            CoordEvent::ModelExported(ModelExported {
                model: H1.into(),
                format: "safetensors".into(),
            }),
            EventKind::ModelExported,
            json!({"model": H1, "format": "safetensors"}),
            de::<ModelExported>,
        );
    }

    #[test]
    fn job_events_keep_their_bytes() {
        pins(
            CoordEvent::JobSubmitted(JobSubmitted {
                job: "j".into(),
                job_toml_blake3: H1.into(),
                initial_model: None,
            }),
            EventKind::JobSubmitted,
            json!({"job": "j", "job_toml_blake3": H1}),
            de::<JobSubmitted>,
        );
        pins(
            CoordEvent::JobSubmitted(JobSubmitted {
                job: "j".into(),
                job_toml_blake3: H1.into(),
                initial_model: Some(H2.into()),
            }),
            EventKind::JobSubmitted,
            json!({"job": "j", "job_toml_blake3": H1, "initial_model": H2}),
            de::<JobSubmitted>,
        );
        for (event, kind) in [
            (
                CoordEvent::JobPaused(JobRef { job: "j".into() }),
                EventKind::JobPaused,
            ),
            (
                CoordEvent::JobResumed(JobRef { job: "j".into() }),
                EventKind::JobResumed,
            ),
            (
                CoordEvent::JobAborted(JobRef { job: "j".into() }),
                EventKind::JobAborted,
            ),
        ] {
            assert_eq!(event.kind(), kind);
            assert_eq!(
                serde_json::to_string(&event.details().unwrap()).unwrap(),
                serde_json::to_string(&json!({ "job": "j" })).unwrap()
            );
        }
        let outcomes = [
            (
                JobOutcome::Completed { model: H1.into() },
                json!({"result": "completed", "model": H1}),
            ),
            (
                JobOutcome::Failed {
                    round: 3,
                    reason: "BelowQuorum { got: 1, need: 2 }".into(),
                },
                json!({"result": "failed", "round": 3u64,
                    "reason": "BelowQuorum { got: 1, need: 2 }"}),
            ),
            (
                JobOutcome::Aborted {
                    completed_rounds: 2,
                },
                json!({"result": "aborted", "completed_rounds": 2u64}),
            ),
        ];
        for (outcome, old) in outcomes {
            pins(
                CoordEvent::JobFinished(JobFinished {
                    job: "j".into(),
                    outcome,
                }),
                EventKind::JobFinished,
                json!({"job": "j", "outcome": old}),
                de::<JobFinished>,
            );
        }
    }

    #[test]
    fn round_events_keep_their_bytes() {
        pins(
            CoordEvent::RoundOpened(RoundOpened {
                job: "j".into(),
                round: 1,
                base_model: H1.into(),
            }),
            EventKind::RoundOpened,
            json!({"job": "j", "round": 1u64, "base_model": H1}),
            de::<RoundOpened>,
        );
        pins(
            CoordEvent::RoundDiscarded(RoundDiscarded {
                job: "j".into(),
                round: 2,
                reason: "the job ended: Aborted".into(),
            }),
            EventKind::RoundDiscarded,
            json!({"job": "j", "round": 2u64, "reason": "the job ended: Aborted"}),
            de::<RoundDiscarded>,
        );
        let strategy = json!({"kind": "fedavg", "trim": 0.1, "server_lr": 1.0});
        let inputs = [("a", H1, 10u64), ("b", H2, 20)];
        for dp in [
            None,
            Some(DpApplied {
                noise_std: 0.123_456_789,
                clip_norm: Some(1.5),
                epsilon: Some(2.0),
                delta: Some(1e-5),
            }),
            Some(DpApplied {
                noise_std: 0.5,
                clip_norm: None,
                epsilon: None,
                delta: None,
            }),
        ] {
            let old = json!({
                "job": "j",
                "round": 3u64,
                "base_model": H1,
                "output_model": H2,
                "strategy": strategy,
                "dp": dp.map(|dp| json!({
                    "noise_std": dp.noise_std,
                    "clip_norm": dp.clip_norm,
                    "epsilon": dp.epsilon,
                    "delta": dp.delta,
                })),
                "inputs": inputs.iter().map(|(s, h, n)| json!({
                    "site": s,
                    "payload_hash": h,
                    "num_examples": n,
                })).collect::<Vec<_>>(),
            });
            pins(
                CoordEvent::RoundAggregated(RoundAggregated {
                    job: "j".into(),
                    round: 3,
                    base_model: H1.into(),
                    output_model: H2.into(),
                    strategy: strategy.clone(),
                    dp,
                    inputs: inputs
                        .iter()
                        .map(|(s, h, n)| AggregatedInput {
                            site: (*s).into(),
                            payload_hash: (*h).into(),
                            num_examples: Some(*n),
                        })
                        .collect(),
                }),
                EventKind::RoundAggregated,
                old,
                de::<RoundAggregated>,
            );
        }
        let sites = vec![SiteEvaluation {
            site: "a".into(),
            num_eval_examples: 40,
            loss: Some(0.25),
            accuracy: Some(0.9),
            auc: None,
            dice: None,
        }];
        let weighted = WeightedMetrics {
            sites: 1,
            num_eval_examples: 40,
            loss: Some(0.25),
            accuracy: Some(0.9),
            auc: None,
            dice: None,
        };
        for (excluded, requested) in [
            (Vec::new(), false),
            (
                vec![ExcludedEvaluation {
                    site: "b".into(),
                    reason: "loss is not finite".into(),
                }],
                true,
            ),
        ] {
            let mut old = json!({
                "job": "j",
                "round": 5u64,
                "model": H1,
                "after_round": 4u64,
                "sites": sites,
                "weighted": weighted,
                "excluded": excluded,
            });
            if requested {
                old["requested"] = Value::Bool(true);
            }
            pins(
                CoordEvent::RoundEvaluated(RoundEvaluated {
                    job: "j".into(),
                    round: 5,
                    model: H1.into(),
                    after_round: 4,
                    sites: sites.clone(),
                    weighted: weighted.clone(),
                    excluded,
                    requested,
                }),
                EventKind::RoundEvaluated,
                old,
                de::<RoundEvaluated>,
            );
        }
        pins(
            CoordEvent::EvalRequested(EvalRequested {
                job: "j".into(),
                round: 5,
                model: H1.into(),
                sites: vec!["a".into(), "b".into()],
            }),
            EventKind::EvalRequested,
            json!({"job": "j", "round": 5u64, "model": H1, "sites": ["a", "b"]}),
            de::<EvalRequested>,
        );
        pins(
            CoordEvent::EvalAccepted(eval_report()),
            EventKind::EvalAccepted,
            eval_report_json(),
            de::<EvalReport>,
        );
        let mut rejected = eval_report_json();
        rejected["reason"] = Value::from("no job is running".to_owned());
        pins(
            CoordEvent::EvalRejected(EvalRejected {
                report: eval_report(),
                reason: "no job is running".into(),
            }),
            EventKind::EvalRejected,
            rejected,
            de::<EvalRejected>,
        );
    }

    #[test]
    fn offer_and_update_events_keep_their_bytes() {
        pins(
            CoordEvent::OfferSent(OfferSent {
                job: "j".into(),
                round: 1,
                site: "a".into(),
                base_model: H1.into(),
            }),
            EventKind::OfferSent,
            json!({"job": "j", "round": 1u64, "site": "a", "base_model": H1}),
            de::<OfferSent>,
        );
        pins(
            CoordEvent::OfferDeclined(OfferDeclined {
                job: "j".into(),
                round: 1,
                site: "a".into(),
                reason: "policy: too many rounds".into(),
            }),
            EventKind::OfferDeclined,
            json!({"job": "j", "round": 1u64, "site": "a", "reason": "policy: too many rounds"}),
            de::<OfferDeclined>,
        );
        for reason in [None, Some("too late")] {
            pins(
                CoordEvent::UpdateReceived(UpdateReceived {
                    job: "j".into(),
                    round: 2,
                    site: "a".into(),
                    payload_hash: H1.into(),
                    payload_bytes: 1234,
                    num_examples: 70,
                    nonce: "00ff".repeat(8),
                    envelope_sig: "cd".repeat(64),
                    accepted: reason.is_none(),
                    reason: reason.map(str::to_owned),
                }),
                EventKind::UpdateReceived,
                json!({
                    "job": "j",
                    "round": 2u64,
                    "site": "a",
                    "payload_hash": H1,
                    "payload_bytes": 1234u64,
                    "num_examples": 70u64,
                    "nonce": "00ff".repeat(8),
                    "envelope_sig": "cd".repeat(64),
                    "accepted": reason.is_none(),
                    "reason": reason,
                }),
                de::<UpdateReceived>,
            );
        }
        pins(
            CoordEvent::UpdateExcluded(UpdateExcluded {
                job: "j".into(),
                round: 2,
                site: "a".into(),
                payload_hash: H1.into(),
                reason: "the site is no longer allowed: revoked".into(),
            }),
            EventKind::UpdateExcluded,
            json!({"job": "j", "round": 2u64, "site": "a", "payload_hash": H1,
                "reason": format!("the site is no longer allowed: {}", "revoked")}),
            de::<UpdateExcluded>,
        );
        for kept in [Ok(()), Err("the spool is full")] {
            pins(
                CoordEvent::UpdateInterrupted(UpdateInterrupted {
                    job: "j".into(),
                    round: 2,
                    site: "a".into(),
                    payload_hash: H1.into(),
                    payload_bytes: 4096,
                    nonce: "00ff".repeat(8),
                    records_received: 3,
                    bytes_received: 3000,
                    partial_record_bytes_dropped: 17,
                    cause: "connection lost".into(),
                    kept_for_resume: kept.is_ok(),
                    not_kept_because: kept.err().map(str::to_owned),
                }),
                EventKind::UpdateInterrupted,
                json!({
                    "job": "j",
                    "round": 2u64,
                    "site": "a",
                    "payload_hash": H1,
                    "payload_bytes": 4096u64,
                    "nonce": "00ff".repeat(8),
                    "records_received": 3u64,
                    "bytes_received": 3000u64,
                    "partial_record_bytes_dropped": 17u64,
                    "cause": "connection lost",
                    "kept_for_resume": kept.is_ok(),
                    "not_kept_because": kept.err(),
                }),
                de::<UpdateInterrupted>,
            );
        }
    }

    /// The exact bytes of one entry's details, written out: the members
    /// sorted by name (a JSON object's order in `serde_json` without
    /// `preserve_order`), as every coordinator entry has always had them.
    #[test]
    fn details_are_written_with_sorted_members() {
        let e = CoordEvent::OfferSent(OfferSent {
            job: "j".into(),
            round: 1,
            site: "a".into(),
            base_model: "00".into(),
        });
        assert_eq!(
            serde_json::to_string(&e.details().unwrap()).unwrap(),
            r#"{"base_model":"00","job":"j","round":1,"site":"a"}"#
        );
        assert_eq!(e.site(), Some("a"));
    }

    /// Readers take what other versions wrote: members they do not know are
    /// ignored; `round.aggregated` without `base_model` or `strategy` and
    /// inputs without `num_examples` still read.
    #[test]
    fn reading_tolerates_other_versions() {
        let newer = json!({"job": "j", "round": 1, "site": "a", "payload_hash": "h",
            "payload_bytes": 1, "num_examples": 2, "nonce": "n", "envelope_sig": "s",
            "accepted": true, "reason": null, "future_member": [1, 2]});
        assert!(UpdateReceived::deserialize(&newer).is_ok());
        let older = json!({"job": "j", "round": 1, "output_model": "m", "dp": null,
            "inputs": [{"site": "a", "payload_hash": "h"}]});
        let r = RoundAggregated::deserialize(&older).unwrap();
        assert_eq!(r.inputs[0].num_examples, None);
        assert_eq!(r.strategy, Value::Null);
        // A member of the wrong type is refused (the entry is malformed).
        let bad = json!({"job": "j", "round": "one", "output_model": "m", "inputs": []});
        assert!(RoundAggregated::deserialize(&bad).is_err());
    }
}
