//! The site agent's audit events with their typed `details`: one
//! [`SiteEvent`] variant per event the agent writes, each wrapping a struct
//! of the same name with the fields of its entry (the coordinator's are
//! [`CoordEvent`](crate::CoordEvent), shaped the same way). The agent
//! serialises the variant (untagged: its fields are the entry's `details`)
//! and names the entry by [`SiteEvent::kind`]; [`reconcile`](crate::reconcile)
//! reads the same structs back ([`SiteEvent::read`], or a struct's own
//! `Deserialize`). The agent's `audit` module documents each event and
//! writes them.
//!
//! ```text
//!  agent     ── SiteEvent ──▶ kind() ──▶ entry.event   ("update.sent")
//!                   └──────▶ split() ──▶ entry.details ({"base_model":…,…})
//!  reconcile ◀── UpdateSent::deserialize(&entry.details) (unknown members ignored)
//! ```
//!
//! The details go through a `serde_json::Value` object, so their members
//! are written sorted by name, as they always were. Identifiers are the
//! protocol's typed ids (`JobId`, `RoundId`, `SiteId`, `FederationId`),
//! which write the same JSON string or number the raw types did; hashes,
//! nonces and signatures are lowercase hex strings.
//!
//! Reading: every struct ignores members it does not know (a newer
//! writer's); members added after an event was first written (the later
//! protocol versions' offer terms, the transport of `conn.established`,
//! the resumed or update-based download of `model.received`, …) default
//! when an older writer left them out. A member of the wrong type, or one
//! every version writes that is missing, does not read.

use fedlink_protocol::{AuditHead, FederationId, JobId, RoundId, SiteId};
use serde::{Deserialize, Serialize};

use crate::event::EventKind;

/// `audit.tail_repaired` is the same event for both writers.
pub use crate::coord::TailRepaired;

/// Who caused an event: the entry's `actor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The site itself (its own actions and observations).
    Site,
    /// The coordinator (something it sent).
    Coordinator,
}

/// One event the site writes: its `event` name is [`kind`](Self::kind)'s,
/// its `details` are the variant's fields (see the agent's `audit` module
/// for the table of events).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize)]
// Serialised untagged: the fields are the entry's `details`; the
// `event` name is [`SiteEvent::kind`]'s.
#[serde(untagged)]
pub enum SiteEvent {
    /// `agent.started`: the agent started.
    AgentStarted(AgentStarted),
    /// `agent.stopped`: the agent stopped.
    AgentStopped(AgentStopped),
    /// `audit.tail_repaired`: a torn last line was removed on start.
    TailRepaired(TailRepaired),
    /// `conn.established`: connected and welcomed by the coordinator.
    ConnEstablished(ConnEstablished),
    /// `conn.lost`: a connection ended or an attempt failed.
    ConnLost(ConnLost),
    /// `offer.received`: an offer arrived.
    OfferReceived(OfferReceived),
    /// `offer.accepted`: the offer was accepted (before the answer is sent).
    OfferAccepted(OfferAccepted),
    /// `offer.declined`: the offer was declined (before the answer is sent).
    OfferDeclined(OfferDeclined),
    /// `round.cancelled`: the coordinator cancelled a round, or a newer offer superseded it.
    RoundCancelled(RoundCancelled),
    /// `round.failed`: work on an accepted round failed.
    RoundFailed(RoundFailed),
    /// `model.received`: the global model was obtained and its hash checked.
    ModelReceived(ModelReceived),
    /// `model.refused`: a model, or the update to one, was refused.
    ModelRefused(ModelRefused),
    /// `train.completed`: local training finished.
    TrainCompleted(TrainCompleted),
    /// `update.sent`: the signed update, before its first byte is uploaded.
    UpdateSent(UpdateSent),
    /// `update.resumed`: an upload cut short was resumed on a new connection.
    UpdateResumed(UpdateResumed),
    /// `update.result`: what the coordinator answered to an upload.
    UpdateResult(UpdateResult),
    /// `round.outcome`: the model a round or the job produced, as announced.
    RoundOutcome(RoundOutcome),
    /// `eval.reported`: the metrics of a model the coordinator asked about.
    EvalReported(EvalReported),
    /// `coordinator.audit_head`: a signed head of the coordinator's log.
    CoordinatorAuditHead(CoordinatorAuditHead),
}

impl SiteEvent {
    /// Who caused the event.
    pub fn cause(&self) -> Cause {
        match self {
            Self::OfferReceived(_)
            | Self::ModelReceived(_)
            | Self::ModelRefused(_)
            | Self::UpdateResult(_)
            | Self::CoordinatorAuditHead(_)
            | Self::RoundOutcome(_)
            // a Cancel, or a newer offer that superseded the round
            | Self::RoundCancelled(_) => Cause::Coordinator,
            _ => Cause::Site,
        }
    }

    /// The event's kind (its `event` name).
    pub fn kind(&self) -> EventKind {
        match self {
            Self::AgentStarted(_) => EventKind::AgentStarted,
            Self::AgentStopped(_) => EventKind::AgentStopped,
            Self::TailRepaired(_) => EventKind::TailRepaired,
            Self::ConnEstablished(_) => EventKind::ConnEstablished,
            Self::ConnLost(_) => EventKind::ConnLost,
            Self::OfferReceived(_) => EventKind::OfferReceived,
            Self::OfferAccepted(_) => EventKind::OfferAccepted,
            Self::OfferDeclined(_) => EventKind::OfferDeclined,
            Self::RoundCancelled(_) => EventKind::RoundCancelled,
            Self::RoundFailed(_) => EventKind::RoundFailed,
            Self::ModelReceived(_) => EventKind::ModelReceived,
            Self::ModelRefused(_) => EventKind::ModelRefused,
            Self::TrainCompleted(_) => EventKind::TrainCompleted,
            Self::UpdateSent(_) => EventKind::UpdateSent,
            Self::UpdateResult(_) => EventKind::UpdateResult,
            Self::UpdateResumed(_) => EventKind::UpdateResumed,
            Self::RoundOutcome(_) => EventKind::RoundOutcome,
            Self::EvalReported(_) => EventKind::EvalReported,
            Self::CoordinatorAuditHead(_) => EventKind::CoordinatorAuditHead,
        }
    }

    /// The entry's `event` type and `details` object.
    pub fn split(&self) -> (String, serde_json::Value) {
        // Plain data: serialising cannot fail (non-finite floats become null).
        let details = match serde_json::to_value(self) {
            Ok(d @ serde_json::Value::Object(_)) => d,
            _ => serde_json::Value::Object(serde_json::Map::new()),
        };
        (self.kind().as_str().to_owned(), details)
    }

    /// An entry's `details` read back as the event its `event` name
    /// (`kind`) is: `None` when the site does not write that kind, an
    /// error when the details do not read as its struct (a member missing
    /// or of the wrong type). Members the struct does not know (a newer
    /// writer's) are ignored.
    pub fn read(
        kind: EventKind,
        details: &serde_json::Value,
    ) -> Option<Result<Self, serde_json::Error>> {
        fn de<'a, T: Deserialize<'a>>(
            details: &'a serde_json::Value,
            variant: fn(T) -> SiteEvent,
        ) -> Result<SiteEvent, serde_json::Error> {
            T::deserialize(details).map(variant)
        }
        Some(match kind {
            EventKind::AgentStarted => de(details, Self::AgentStarted),
            EventKind::AgentStopped => de(details, Self::AgentStopped),
            EventKind::TailRepaired => de(details, Self::TailRepaired),
            EventKind::ConnEstablished => de(details, Self::ConnEstablished),
            EventKind::ConnLost => de(details, Self::ConnLost),
            EventKind::OfferReceived => de(details, Self::OfferReceived),
            EventKind::OfferAccepted => de(details, Self::OfferAccepted),
            EventKind::OfferDeclined => de(details, Self::OfferDeclined),
            EventKind::RoundCancelled => de(details, Self::RoundCancelled),
            EventKind::RoundFailed => de(details, Self::RoundFailed),
            EventKind::ModelReceived => de(details, Self::ModelReceived),
            EventKind::ModelRefused => de(details, Self::ModelRefused),
            EventKind::TrainCompleted => de(details, Self::TrainCompleted),
            EventKind::UpdateSent => de(details, Self::UpdateSent),
            EventKind::UpdateResumed => de(details, Self::UpdateResumed),
            EventKind::UpdateResult => de(details, Self::UpdateResult),
            EventKind::RoundOutcome => de(details, Self::RoundOutcome),
            EventKind::EvalReported => de(details, Self::EvalReported),
            EventKind::CoordinatorAuditHead => de(details, Self::CoordinatorAuditHead),
            _ => return None,
        })
    }

    /// The coordinator's head as an event.
    pub fn coordinator_head(h: &AuditHead) -> Self {
        Self::CoordinatorAuditHead(CoordinatorAuditHead {
            seq: h.seq,
            hash: hex::encode(h.hash),
            ts_unix_ms: h.ts_unix_ms,
            sig: hex::encode(h.sig),
        })
    }
}

/// `agent.started`: the agent started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentStarted {
    /// Agent version.
    pub version: String,
    /// Site name (from the kit).
    pub site: String,
    /// blake3 of the effective configuration (canonical JSON of
    /// `SiteConfig`, paths resolved).
    pub config_blake3: String,
    /// Site identity URI.
    pub identity: String,
    /// Dataset kind.
    pub dataset_kind: String,
    /// Dataset fingerprint.
    pub dataset_fingerprint: String,
    /// Training samples.
    pub train_samples: usize,
    /// Validation samples.
    pub validation_samples: usize,
    /// Device name.
    pub device: String,
}

/// `agent.stopped`: the agent stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentStopped {
    /// Why.
    pub reason: String,
}

/// `conn.established`: connected and welcomed by the coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnEstablished {
    /// Coordinator address.
    pub coordinator: String,
    /// Site id the coordinator knows us by.
    pub site_id: SiteId,
    /// Federation.
    pub federation: FederationId,
    /// Negotiated protocol version.
    pub protocol_version: u16,
    /// `quic` or `tcp` (TLS 1.3 over TCP).
    #[serde(default)]
    pub transport: String,
    /// The HTTP proxy (`host:port`) the TCP connection goes through.
    #[serde(default)]
    pub proxy: Option<String>,
    /// Why this transport (configured, raced, remembered fallback).
    #[serde(default)]
    pub transport_reason: String,
}

/// `conn.lost`: a connection ended or an attempt failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnLost {
    /// Why.
    pub reason: String,
    /// Delay before the next attempt, milliseconds.
    pub retry_in_ms: Option<u64>,
}

/// `offer.received`: an offer arrived.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OfferReceived {
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
    /// Global model hash.
    pub base_model: String,
    /// Architecture kind.
    pub arch: String,
    /// Epochs asked for.
    pub epochs: u32,
    /// Delta encoding.
    pub encoding: String,
    /// Clip norm, if any.
    pub clip_norm: Option<f64>,
    /// DP noise multiplier the site adds, if any.
    pub noise_multiplier: Option<f64>,
    /// Noise multiplier of the central DP the coordinator adds to the
    /// aggregate, if any (protocol version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub central_noise_multiplier: Option<f64>,
    /// Data augmentation the training applies, if any (protocol
    /// version 5): what the auditor needs to reproduce the training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augmentation: Option<fedlink_protocol::message::Augmentation>,
    /// Class weighting of the loss, when not none (protocol version 6):
    /// `"balanced"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_weight: Option<String>,
    /// The offered optimizer as on the wire (e.g. `{"AdamW": {"beta1":
    /// 0.9, "beta2": 0.999, "epsilon": 1e-8, "weight_decay": 0.1}}`):
    /// with the learning rate, what the auditor needs to reproduce the
    /// training. Absent in entries written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<fedlink_protocol::Optimizer>,
    /// The offered local learning rate (absent in older entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
}

/// `offer.accepted`: the offer was accepted (recorded before the acceptance is sent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OfferAccepted {
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
}

/// `offer.declined`: the offer was declined (recorded before the answer is sent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OfferDeclined {
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
    /// The policy's reason (also sent to the coordinator).
    pub reason: String,
}

/// `round.cancelled`: the coordinator cancelled a round, or a newer offer superseded it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundCancelled {
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
    /// Why.
    pub reason: String,
    /// Whether work in progress was dropped.
    pub dropped_work: bool,
}

/// `round.failed`: work on an accepted round failed locally or on the network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundFailed {
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
    /// What failed.
    pub error: String,
}

/// `model.received`: the global model was obtained and its hash checked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelReceived {
    /// Model hash.
    pub model: String,
    /// Payload bytes received (or of the cache file).
    pub bytes: u64,
    /// Whether it came from the local cache.
    pub from_cache: bool,
    /// The download resumed one a lost connection cut short: the index
    /// of the first record fetched again (the ones before were kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_record: Option<u64>,
    /// Received as the global update of this base model (hex), applied
    /// to the cached base and hash-checked (protocol >= 7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_update_of: Option<String>,
}

/// `model.refused`: a model (or the update to one) was refused: it did not decode, or the result
/// did not hash to the announced model. The whole model is fetched instead.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRefused {
    /// Model hash asked for.
    pub model: String,
    /// The base model of a refused update (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_update_of: Option<String>,
    /// Why.
    pub error: String,
}

/// `train.completed`: local training finished.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainCompleted {
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
    /// Global model trained from.
    pub base_model: String,
    /// Dataset fingerprint (blake3 over the data as loaded).
    pub dataset_fingerprint: String,
    /// Training examples (the aggregation weight claimed).
    pub num_examples: u64,
    /// Aggregate metrics: `epochs`, `epoch_loss`, `duration_ms`,
    /// `global_eval` (the global model on the validation split, as sent),
    /// `delta_norm`.
    pub metrics: serde_json::Value,
    /// Whether the delta was clipped.
    pub clipped: bool,
    /// Whether DP noise was added.
    pub dp_noise: bool,
    /// `federated`, `local` or `none`.
    #[serde(default)]
    pub feature_scaling: String,
}

/// `update.sent`: the signed update is about to be uploaded (recorded before the first byte goes
/// out).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateSent {
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
    /// blake3 of the payload.
    pub payload_hash: String,
    /// Payload bytes.
    pub payload_bytes: u64,
    /// Examples claimed.
    pub num_examples: u64,
    /// The signed header's nonce (hex).
    pub nonce: String,
    /// Global model the delta is relative to.
    pub base_model: String,
    /// Encoding.
    pub encoding: String,
    /// Whether the header carried the feature statistics (false when
    /// absent: entries written before federated feature scaling).
    #[serde(default)]
    pub feature_stats: bool,
}

/// `update.resumed`: an upload cut short by a lost connection was resumed on a new one: the same
/// signed envelope, the records from `from_record` on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateResumed {
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
    /// blake3 of the whole payload (unchanged).
    pub payload_hash: String,
    /// The upload's nonce (hex, unchanged).
    pub nonce: String,
    /// Records the coordinator held (not sent again).
    pub from_record: u64,
    /// Their bytes.
    pub bytes_held: u64,
    /// Bytes sent again on this connection.
    pub bytes_sent: u64,
}

/// `update.result`: what the coordinator answered to an upload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateResult {
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
    /// blake3 of the payload sent.
    pub payload_hash: String,
    /// The upload's nonce (hex).
    pub nonce: String,
    /// `ack` or `reject`.
    pub outcome: String,
    /// Whether the update will be aggregated (false for a reject).
    pub accepted: bool,
    /// For a reject: code and message.
    pub reason: Option<String>,
}

/// `round.outcome`: the model a round this site contributed to produced, or the job's final model,
/// as the coordinator announced it (protocol >= 4). `fedlink audit reconcile` checks it against the
/// coordinator's `round.aggregated` / `job.finished`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundOutcome {
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
    /// The global model it produced (hex).
    pub model: String,
    /// Whether this is the job's final model.
    pub job_completed: bool,
}

/// `eval.reported`: the site evaluated a model the coordinator asked about (protocol >= 6), on its
/// validation split, and is about to send the signed metrics: only these aggregates leave the site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReported {
    /// Job.
    pub job: JobId,
    /// Rounds completed when the model was made.
    pub round: RoundId,
    /// The evaluated model (hex).
    pub model: String,
    /// Validation examples evaluated.
    pub num_eval_examples: u64,
    /// Mean loss.
    pub loss: Option<f64>,
    /// Accuracy.
    pub accuracy: Option<f64>,
    /// ROC AUC.
    pub auc: Option<f64>,
    /// Dice coefficient.
    pub dice: Option<f64>,
}

/// `coordinator.audit_head`: a signed head of the coordinator's audit log (recorded as received;
/// `fedlink audit reconcile` verifies it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorAuditHead {
    /// Sequence number of the coordinator's newest entry.
    pub seq: u64,
    /// Hash of that entry (hex).
    pub hash: String,
    /// When the coordinator signed the head.
    pub ts_unix_ms: u64,
    /// ed25519 signature (128 hex).
    pub sig: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use fedlink_protocol::Optimizer;
    use fedlink_protocol::message::Augmentation;

    const H1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const H2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn job() -> JobId {
        JobId::new("job-7").unwrap()
    }

    /// One event of every variant (both sides of each optional member
    /// where the variant has one), its `event` name and its details bytes
    /// as the agent has always written them: the members sorted by name
    /// (a `serde_json` object), `None` as `null` unless the member is left
    /// out when absent.
    fn every_event() -> Vec<(SiteEvent, &'static str, String)> {
        let round = RoundId(12);
        vec![
            (
                SiteEvent::AgentStarted(AgentStarted {
                    version: "0.1.0".into(),
                    site: "st-mary".into(),
                    config_blake3: H1.into(),
                    identity: "fedlink://fed/site/st-mary".into(),
                    dataset_kind: "tabular".into(),
                    dataset_fingerprint: H2.into(),
                    train_samples: 100,
                    validation_samples: 20,
                    device: "cpu".into(),
                }),
                "agent.started",
                pin(
                    r#"{"config_blake3":"{H1}","dataset_fingerprint":"{H2}","dataset_kind":"tabular","device":"cpu","identity":"fedlink://fed/site/st-mary","site":"st-mary","train_samples":100,"validation_samples":20,"version":"0.1.0"}"#,
                ),
            ),
            (
                SiteEvent::AgentStopped(AgentStopped {
                    reason: "signal".into(),
                }),
                "agent.stopped",
                pin(r#"{"reason":"signal"}"#),
            ),
            (
                SiteEvent::TailRepaired(TailRepaired {
                    line: 7,
                    removed_bytes: 33,
                    removed_blake3: H1.into(),
                }),
                "audit.tail_repaired",
                pin(r#"{"line":7,"removed_blake3":"{H1}","removed_bytes":33}"#),
            ),
            (
                SiteEvent::ConnEstablished(ConnEstablished {
                    coordinator: "coord.example:7443".into(),
                    site_id: SiteId::new("st-mary").unwrap(),
                    federation: FederationId::new("fed").unwrap(),
                    protocol_version: 7,
                    transport: "tcp".into(),
                    proxy: Some("proxy:3128".into()),
                    transport_reason: "configured".into(),
                }),
                "conn.established",
                pin(
                    r#"{"coordinator":"coord.example:7443","federation":"fed","protocol_version":7,"proxy":"proxy:3128","site_id":"st-mary","transport":"tcp","transport_reason":"configured"}"#,
                ),
            ),
            (
                SiteEvent::ConnEstablished(ConnEstablished {
                    coordinator: "coord.example:7443".into(),
                    site_id: SiteId::new("st-mary").unwrap(),
                    federation: FederationId::new("fed").unwrap(),
                    protocol_version: 7,
                    transport: "quic".into(),
                    proxy: None,
                    transport_reason: "raced".into(),
                }),
                "conn.established",
                pin(
                    r#"{"coordinator":"coord.example:7443","federation":"fed","protocol_version":7,"proxy":null,"site_id":"st-mary","transport":"quic","transport_reason":"raced"}"#,
                ),
            ),
            (
                SiteEvent::ConnLost(ConnLost {
                    reason: "timed out".into(),
                    retry_in_ms: Some(1500),
                }),
                "conn.lost",
                pin(r#"{"reason":"timed out","retry_in_ms":1500}"#),
            ),
            (
                SiteEvent::ConnLost(ConnLost {
                    reason: "shutdown".into(),
                    retry_in_ms: None,
                }),
                "conn.lost",
                pin(r#"{"reason":"shutdown","retry_in_ms":null}"#),
            ),
            (
                SiteEvent::OfferReceived(OfferReceived {
                    job: job(),
                    round,
                    base_model: H1.into(),
                    arch: "mlp".into(),
                    epochs: 2,
                    encoding: "f32".into(),
                    clip_norm: None,
                    noise_multiplier: None,
                    central_noise_multiplier: None,
                    augmentation: None,
                    class_weight: None,
                    optimizer: None,
                    learning_rate: None,
                }),
                "offer.received",
                pin(
                    r#"{"arch":"mlp","base_model":"{H1}","clip_norm":null,"encoding":"f32","epochs":2,"job":"job-7","noise_multiplier":null,"round":12}"#,
                ),
            ),
            (
                SiteEvent::OfferReceived(OfferReceived {
                    job: job(),
                    round,
                    base_model: H1.into(),
                    arch: "unet".into(),
                    epochs: 1,
                    encoding: "f16".into(),
                    clip_norm: Some(1.5),
                    noise_multiplier: Some(0.8),
                    central_noise_multiplier: Some(0.25),
                    augmentation: Some(Augmentation {
                        flips: true,
                        rotate90: false,
                        intensity_jitter: Some(fedlink_protocol::message::IntensityJitter {
                            scale: 0.1,
                            shift: 0.05,
                        }),
                    }),
                    class_weight: Some("balanced".into()),
                    optimizer: Some(Optimizer::AdamW {
                        beta1: 0.9,
                        beta2: 0.999,
                        epsilon: 1e-8,
                        weight_decay: 0.1,
                    }),
                    learning_rate: Some(0.003),
                }),
                "offer.received",
                pin(
                    r#"{"arch":"unet","augmentation":{"flips":true,"intensity_jitter":{"scale":0.1,"shift":0.05},"rotate90":false},"base_model":"{H1}","central_noise_multiplier":0.25,"class_weight":"balanced","clip_norm":1.5,"encoding":"f16","epochs":1,"job":"job-7","learning_rate":0.003,"noise_multiplier":0.8,"optimizer":{"AdamW":{"beta1":0.9,"beta2":0.999,"epsilon":1e-8,"weight_decay":0.1}},"round":12}"#,
                ),
            ),
            (
                SiteEvent::OfferAccepted(OfferAccepted { job: job(), round }),
                "offer.accepted",
                pin(r#"{"job":"job-7","round":12}"#),
            ),
            (
                SiteEvent::OfferDeclined(OfferDeclined {
                    job: job(),
                    round,
                    reason: "policy: epochs".into(),
                }),
                "offer.declined",
                pin(r#"{"job":"job-7","reason":"policy: epochs","round":12}"#),
            ),
            (
                SiteEvent::RoundCancelled(RoundCancelled {
                    job: job(),
                    round,
                    reason: "superseded".into(),
                    dropped_work: true,
                }),
                "round.cancelled",
                pin(r#"{"dropped_work":true,"job":"job-7","reason":"superseded","round":12}"#),
            ),
            (
                SiteEvent::RoundFailed(RoundFailed {
                    job: job(),
                    round,
                    error: "training diverged".into(),
                }),
                "round.failed",
                pin(r#"{"error":"training diverged","job":"job-7","round":12}"#),
            ),
            (
                SiteEvent::ModelReceived(ModelReceived {
                    model: H1.into(),
                    bytes: 4096,
                    from_cache: false,
                    resumed_from_record: None,
                    as_update_of: None,
                }),
                "model.received",
                pin(r#"{"bytes":4096,"from_cache":false,"model":"{H1}"}"#),
            ),
            (
                SiteEvent::ModelReceived(ModelReceived {
                    model: H1.into(),
                    bytes: 4096,
                    from_cache: false,
                    resumed_from_record: Some(3),
                    as_update_of: Some(H2.into()),
                }),
                "model.received",
                pin(
                    r#"{"as_update_of":"{H2}","bytes":4096,"from_cache":false,"model":"{H1}","resumed_from_record":3}"#,
                ),
            ),
            (
                SiteEvent::ModelRefused(ModelRefused {
                    model: H1.into(),
                    as_update_of: None,
                    error: "hash mismatch".into(),
                }),
                "model.refused",
                pin(r#"{"error":"hash mismatch","model":"{H1}"}"#),
            ),
            (
                SiteEvent::ModelRefused(ModelRefused {
                    model: H1.into(),
                    as_update_of: Some(H2.into()),
                    error: "does not decode".into(),
                }),
                "model.refused",
                pin(r#"{"as_update_of":"{H2}","error":"does not decode","model":"{H1}"}"#),
            ),
            (
                SiteEvent::TrainCompleted(TrainCompleted {
                    job: job(),
                    round,
                    base_model: H1.into(),
                    dataset_fingerprint: H2.into(),
                    num_examples: 100,
                    metrics: serde_json::json!({"epochs": 2, "epoch_loss": [0.7, 0.5],
                        "duration_ms": 120, "global_eval": null, "delta_norm": 1.25}),
                    clipped: true,
                    dp_noise: false,
                    feature_scaling: "federated".into(),
                }),
                "train.completed",
                pin(
                    r#"{"base_model":"{H1}","clipped":true,"dataset_fingerprint":"{H2}","dp_noise":false,"feature_scaling":"federated","job":"job-7","metrics":{"delta_norm":1.25,"duration_ms":120,"epoch_loss":[0.7,0.5],"epochs":2,"global_eval":null},"num_examples":100,"round":12}"#,
                ),
            ),
            (
                SiteEvent::UpdateSent(UpdateSent {
                    job: job(),
                    round,
                    payload_hash: H1.into(),
                    payload_bytes: 4096,
                    num_examples: 100,
                    nonce: "00ff".repeat(8),
                    base_model: H2.into(),
                    encoding: "f32".into(),
                    feature_stats: true,
                }),
                "update.sent",
                pin(
                    r#"{"base_model":"{H2}","encoding":"f32","feature_stats":true,"job":"job-7","nonce":"00ff00ff00ff00ff00ff00ff00ff00ff","num_examples":100,"payload_bytes":4096,"payload_hash":"{H1}","round":12}"#,
                ),
            ),
            (
                SiteEvent::UpdateResumed(UpdateResumed {
                    job: job(),
                    round,
                    payload_hash: H1.into(),
                    nonce: "00ff".repeat(8),
                    from_record: 3,
                    bytes_held: 3000,
                    bytes_sent: 1096,
                }),
                "update.resumed",
                pin(
                    r#"{"bytes_held":3000,"bytes_sent":1096,"from_record":3,"job":"job-7","nonce":"00ff00ff00ff00ff00ff00ff00ff00ff","payload_hash":"{H1}","round":12}"#,
                ),
            ),
            (
                SiteEvent::UpdateResult(UpdateResult {
                    job: job(),
                    round,
                    payload_hash: H1.into(),
                    nonce: "00ff".repeat(8),
                    outcome: "ack".into(),
                    accepted: true,
                    reason: None,
                }),
                "update.result",
                pin(
                    r#"{"accepted":true,"job":"job-7","nonce":"00ff00ff00ff00ff00ff00ff00ff00ff","outcome":"ack","payload_hash":"{H1}","reason":null,"round":12}"#,
                ),
            ),
            (
                SiteEvent::UpdateResult(UpdateResult {
                    job: job(),
                    round,
                    payload_hash: H1.into(),
                    nonce: "00ff".repeat(8),
                    outcome: "reject".into(),
                    accepted: false,
                    reason: Some("late: round closed".into()),
                }),
                "update.result",
                pin(
                    r#"{"accepted":false,"job":"job-7","nonce":"00ff00ff00ff00ff00ff00ff00ff00ff","outcome":"reject","payload_hash":"{H1}","reason":"late: round closed","round":12}"#,
                ),
            ),
            (
                SiteEvent::RoundOutcome(RoundOutcome {
                    job: job(),
                    round,
                    model: H2.into(),
                    job_completed: true,
                }),
                "round.outcome",
                pin(r#"{"job":"job-7","job_completed":true,"model":"{H2}","round":12}"#),
            ),
            (
                SiteEvent::EvalReported(EvalReported {
                    job: job(),
                    round,
                    model: H2.into(),
                    num_eval_examples: 20,
                    loss: Some(0.25),
                    accuracy: Some(0.9),
                    auc: None,
                    dice: None,
                }),
                "eval.reported",
                pin(
                    r#"{"accuracy":0.9,"auc":null,"dice":null,"job":"job-7","loss":0.25,"model":"{H2}","num_eval_examples":20,"round":12}"#,
                ),
            ),
            (
                SiteEvent::coordinator_head(&AuditHead {
                    seq: 3,
                    hash: [1; 32],
                    ts_unix_ms: 1_700_000_000_123,
                    sig: [2; 64],
                }),
                "coordinator.audit_head",
                pin(
                    r#"{"hash":"{HEAD_HASH}","seq":3,"sig":"{HEAD_SIG}","ts_unix_ms":1700000000123}"#,
                ),
            ),
        ]
    }

    /// `bytes` with the placeholders for the long hex values filled in.
    fn pin(bytes: &str) -> String {
        bytes
            .replace("{H1}", H1)
            .replace("{H2}", H2)
            .replace("{HEAD_HASH}", &"01".repeat(32))
            .replace("{HEAD_SIG}", &"02".repeat(64))
    }

    /// Every variant's `event` name and details bytes are what the agent
    /// wrote before the events were typed structs.
    #[test]
    fn every_event_keeps_its_name_and_bytes() {
        for (event, name, bytes) in every_event() {
            let (kind, details) = event.split();
            assert_eq!(kind, name);
            assert_eq!(serde_json::to_string(&details).unwrap(), bytes, "{name}");
            let back = SiteEvent::read(event.kind(), &details).expect("a site event");
            assert_eq!(back.expect("reads back"), event, "{name}");
        }
    }

    /// Readers take what other versions wrote: members they do not know
    /// are ignored, members added after the event was first written may be
    /// missing, a member of the wrong type is refused, and an event the
    /// site does not write is not read as one.
    #[test]
    fn reading_tolerates_other_versions() {
        use serde_json::json;
        let read = |kind, d: serde_json::Value| SiteEvent::read(kind, &d).expect("a site event");
        let newer = json!({"job": "j", "round": 1, "payload_hash": "h", "payload_bytes": 1,
            "num_examples": 2, "nonce": "n", "base_model": "b", "encoding": "f32",
            "feature_stats": false, "future_member": [1, 2]});
        assert!(matches!(
            read(EventKind::UpdateSent, newer),
            Ok(SiteEvent::UpdateSent(_))
        ));
        // offer.received before protocol 3 (no central DP, augmentation,
        // class weight, optimizer or learning rate).
        let old_offer = json!({"job": "j", "round": 1, "base_model": "b", "arch": "mlp",
            "epochs": 1, "encoding": "f32", "clip_norm": null, "noise_multiplier": null});
        let Ok(SiteEvent::OfferReceived(o)) = read(EventKind::OfferReceived, old_offer) else {
            panic!("an old offer.received reads");
        };
        assert_eq!(
            (o.optimizer, o.learning_rate, o.augmentation),
            (None, None, None)
        );
        // conn.established before the TCP fallback (no transport members).
        let old_conn = json!({"coordinator": "c:1", "site_id": "a", "federation": "f",
            "protocol_version": 2});
        let Ok(SiteEvent::ConnEstablished(c)) = read(EventKind::ConnEstablished, old_conn) else {
            panic!("an old conn.established reads");
        };
        assert_eq!((c.transport.as_str(), c.proxy), ("", None));
        let old_model = json!({"model": "m", "bytes": 3, "from_cache": true});
        assert!(read(EventKind::ModelReceived, old_model).is_ok());
        // Wrong types and missing members are refused.
        let bad_round = json!({"job": "j", "round": "one", "model": "m", "job_completed": true});
        assert!(read(EventKind::RoundOutcome, bad_round).is_err());
        let no_model = json!({"job": "j", "round": 1, "job_completed": true});
        assert!(read(EventKind::RoundOutcome, no_model).is_err());
        let bad_job = json!({"job": "not a job id", "round": 1});
        assert!(read(EventKind::OfferAccepted, bad_job).is_err());
        // The coordinator's events are not the site's.
        assert!(SiteEvent::read(EventKind::RoundAggregated, &json!({})).is_none());
    }
}
