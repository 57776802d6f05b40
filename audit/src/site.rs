//! The site agent's audit events with their typed `details`: one
//! [`SiteEvent`] variant per event the agent writes (the coordinator's are
//! [`CoordEvent`](crate::CoordEvent)). Serialised untagged: the variant's
//! fields are the entry's `details`, its name is [`SiteEvent::kind`]'s.
//! The agent's `audit` module documents each event and writes them.

use fedlink_protocol::{AuditHead, FederationId, JobId, RoundId, SiteId};
use serde::Serialize;

use crate::event::EventKind;

/// Who caused an event: the entry's `actor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The site itself (its own actions and observations).
    Site,
    /// The coordinator (something it sent).
    Coordinator,
}

/// One site event: its `event` type and `details` (see the agent's `audit` module for the table of events).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize)]
// Serialised untagged: the fields are the entry's `details`; the
// `event` name is [`SiteEvent::kind`]'s.
#[serde(untagged)]
pub enum SiteEvent {
    /// The agent started.
    AgentStarted {
        /// Agent version.
        version: String,
        /// Site name (from the kit).
        site: String,
        /// blake3 of the effective configuration (canonical JSON of
        /// `SiteConfig`, paths resolved).
        config_blake3: String,
        /// Site identity URI.
        identity: String,
        /// Dataset kind.
        dataset_kind: String,
        /// Dataset fingerprint.
        dataset_fingerprint: String,
        /// Training samples.
        train_samples: usize,
        /// Validation samples.
        validation_samples: usize,
        /// Device name.
        device: String,
    },
    /// The agent stopped.
    AgentStopped {
        /// Why.
        reason: String,
    },
    /// A torn last line (a crash during a write) was removed on start.
    TailRepaired {
        /// 1-based line number of the removed partial line.
        line: u64,
        /// Bytes removed.
        removed_bytes: u64,
        /// blake3 of the removed bytes.
        removed_blake3: String,
    },
    /// Connected and welcomed by the coordinator.
    ConnEstablished {
        /// Coordinator address.
        coordinator: String,
        /// Site id the coordinator knows us by.
        site_id: SiteId,
        /// Federation.
        federation: FederationId,
        /// Negotiated protocol version.
        protocol_version: u16,
        /// `quic` or `tcp` (TLS 1.3 over TCP).
        transport: String,
        /// The HTTP proxy (`host:port`) the TCP connection goes through.
        proxy: Option<String>,
        /// Why this transport (configured, raced, remembered fallback).
        transport_reason: String,
    },
    /// A connection ended or an attempt failed.
    ConnLost {
        /// Why.
        reason: String,
        /// Delay before the next attempt, milliseconds.
        retry_in_ms: Option<u64>,
    },
    /// An offer arrived.
    OfferReceived {
        /// Job.
        job: JobId,
        /// Round.
        round: RoundId,
        /// Global model hash.
        base_model: String,
        /// Architecture kind.
        arch: String,
        /// Epochs asked for.
        epochs: u32,
        /// Delta encoding.
        encoding: String,
        /// Clip norm, if any.
        clip_norm: Option<f64>,
        /// DP noise multiplier the site adds, if any.
        noise_multiplier: Option<f64>,
        /// Noise multiplier of the central DP the coordinator adds to the
        /// aggregate, if any (protocol version 3).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        central_noise_multiplier: Option<f64>,
        /// Data augmentation the training applies, if any (protocol
        /// version 5): what the auditor needs to reproduce the training.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        augmentation: Option<fedlink_protocol::message::Augmentation>,
        /// Class weighting of the loss, when not none (protocol version 6):
        /// `"balanced"`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        class_weight: Option<String>,
        /// The offered optimizer as on the wire (e.g. `{"AdamW": {"beta1":
        /// 0.9, "beta2": 0.999, "epsilon": 1e-8, "weight_decay": 0.1}}`):
        /// with the learning rate, what the auditor needs to reproduce the
        /// training. Absent in entries written before it was recorded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        optimizer: Option<fedlink_protocol::Optimizer>,
        /// The offered local learning rate (absent in older entries).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        learning_rate: Option<f64>,
    },
    /// The offer was accepted (recorded before the acceptance is sent).
    OfferAccepted {
        /// Job.
        job: JobId,
        /// Round.
        round: RoundId,
    },
    /// The offer was declined (recorded before the answer is sent).
    OfferDeclined {
        /// Job.
        job: JobId,
        /// Round.
        round: RoundId,
        /// The policy's reason (also sent to the coordinator).
        reason: String,
    },
    /// The coordinator cancelled a round, or a newer offer superseded it.
    RoundCancelled {
        /// Job.
        job: JobId,
        /// Round.
        round: RoundId,
        /// Why.
        reason: String,
        /// Whether work in progress was dropped.
        dropped_work: bool,
    },
    /// Work on an accepted round failed locally or on the network.
    RoundFailed {
        /// Job.
        job: JobId,
        /// Round.
        round: RoundId,
        /// What failed.
        error: String,
    },
    /// The global model was obtained and its hash checked.
    ModelReceived {
        /// Model hash.
        model: String,
        /// Payload bytes received (or of the cache file).
        bytes: u64,
        /// Whether it came from the local cache.
        from_cache: bool,
        /// The download resumed one a lost connection cut short: the index
        /// of the first record fetched again (the ones before were kept).
        #[serde(skip_serializing_if = "Option::is_none")]
        resumed_from_record: Option<u64>,
        /// Received as the global update of this base model (hex), applied
        /// to the cached base and hash-checked (protocol >= 7).
        #[serde(skip_serializing_if = "Option::is_none")]
        as_update_of: Option<String>,
    },
    /// A model (or the update to one) was refused: it did not decode, or
    /// the result did not hash to the announced model. The whole model is
    /// fetched instead.
    ModelRefused {
        /// Model hash asked for.
        model: String,
        /// The base model of a refused update (hex).
        #[serde(skip_serializing_if = "Option::is_none")]
        as_update_of: Option<String>,
        /// Why.
        error: String,
    },
    /// Local training finished.
    TrainCompleted {
        /// Job.
        job: JobId,
        /// Round.
        round: RoundId,
        /// Global model trained from.
        base_model: String,
        /// Dataset fingerprint (blake3 over the data as loaded).
        dataset_fingerprint: String,
        /// Training examples (the aggregation weight claimed).
        num_examples: u64,
        /// Aggregate metrics: `epochs`, `epoch_loss`, `duration_ms`,
        /// `global_eval` (the global model on the validation split, as sent),
        /// `delta_norm`.
        metrics: serde_json::Value,
        /// Whether the delta was clipped.
        clipped: bool,
        /// Whether DP noise was added.
        dp_noise: bool,
        /// `federated`, `local` or `none`.
        feature_scaling: String,
    },
    /// The signed update is about to be uploaded (recorded before the first
    /// byte goes out).
    UpdateSent {
        /// Job.
        job: JobId,
        /// Round.
        round: RoundId,
        /// blake3 of the payload.
        payload_hash: String,
        /// Payload bytes.
        payload_bytes: u64,
        /// Examples claimed.
        num_examples: u64,
        /// The signed header's nonce (hex).
        nonce: String,
        /// Global model the delta is relative to.
        base_model: String,
        /// Encoding.
        encoding: String,
        /// Whether the header carried the feature statistics.
        feature_stats: bool,
    },
    /// An upload cut short by a lost connection was resumed on a new one:
    /// the same signed envelope, the records from `from_record` on.
    UpdateResumed {
        /// Job.
        job: JobId,
        /// Round.
        round: RoundId,
        /// blake3 of the whole payload (unchanged).
        payload_hash: String,
        /// The upload's nonce (hex, unchanged).
        nonce: String,
        /// Records the coordinator held (not sent again).
        from_record: u64,
        /// Their bytes.
        bytes_held: u64,
        /// Bytes sent again on this connection.
        bytes_sent: u64,
    },
    /// What the coordinator answered to an upload.
    UpdateResult {
        /// Job.
        job: JobId,
        /// Round.
        round: RoundId,
        /// blake3 of the payload sent.
        payload_hash: String,
        /// The upload's nonce (hex).
        nonce: String,
        /// `ack` or `reject`.
        outcome: String,
        /// Whether the update will be aggregated (false for a reject).
        accepted: bool,
        /// For a reject: code and message.
        reason: Option<String>,
    },
    /// The model a round this site contributed to produced, or the job's
    /// final model, as the coordinator announced it (protocol >= 4).
    /// `fedlink audit reconcile` checks it against the coordinator's
    /// `round.aggregated` / `job.finished`.
    RoundOutcome {
        /// Job.
        job: JobId,
        /// Round.
        round: RoundId,
        /// The global model it produced (hex).
        model: String,
        /// Whether this is the job's final model.
        job_completed: bool,
    },
    /// The site evaluated a model the coordinator asked about (protocol >=
    /// 6), on its validation split, and is about to send the signed
    /// metrics: only these aggregates leave the site.
    EvalReported {
        /// Job.
        job: JobId,
        /// Rounds completed when the model was made.
        round: RoundId,
        /// The evaluated model (hex).
        model: String,
        /// Validation examples evaluated.
        num_eval_examples: u64,
        /// Mean loss.
        loss: Option<f64>,
        /// Accuracy.
        accuracy: Option<f64>,
        /// ROC AUC.
        auc: Option<f64>,
        /// Dice coefficient.
        dice: Option<f64>,
    },
    /// A signed head of the coordinator's audit log (recorded as received;
    /// `fedlink audit reconcile` verifies it).
    CoordinatorAuditHead {
        /// Sequence number of the coordinator's newest entry.
        seq: u64,
        /// Hash of that entry (hex).
        hash: String,
        /// When the coordinator signed the head.
        ts_unix_ms: u64,
        /// ed25519 signature (128 hex).
        sig: String,
    },
}

impl SiteEvent {
    /// Who caused the event.
    pub fn cause(&self) -> Cause {
        match self {
            Self::OfferReceived { .. }
            | Self::ModelReceived { .. }
            | Self::ModelRefused { .. }
            | Self::UpdateResult { .. }
            | Self::CoordinatorAuditHead { .. }
            | Self::RoundOutcome { .. }
            // a Cancel, or a newer offer that superseded the round
            | Self::RoundCancelled { .. } => Cause::Coordinator,
            _ => Cause::Site,
        }
    }

    /// The event's kind (its `event` name).
    pub fn kind(&self) -> EventKind {
        match self {
            Self::AgentStarted { .. } => EventKind::AgentStarted,
            Self::AgentStopped { .. } => EventKind::AgentStopped,
            Self::TailRepaired { .. } => EventKind::TailRepaired,
            Self::ConnEstablished { .. } => EventKind::ConnEstablished,
            Self::ConnLost { .. } => EventKind::ConnLost,
            Self::OfferReceived { .. } => EventKind::OfferReceived,
            Self::OfferAccepted { .. } => EventKind::OfferAccepted,
            Self::OfferDeclined { .. } => EventKind::OfferDeclined,
            Self::RoundCancelled { .. } => EventKind::RoundCancelled,
            Self::RoundFailed { .. } => EventKind::RoundFailed,
            Self::ModelReceived { .. } => EventKind::ModelReceived,
            Self::ModelRefused { .. } => EventKind::ModelRefused,
            Self::TrainCompleted { .. } => EventKind::TrainCompleted,
            Self::UpdateSent { .. } => EventKind::UpdateSent,
            Self::UpdateResult { .. } => EventKind::UpdateResult,
            Self::UpdateResumed { .. } => EventKind::UpdateResumed,
            Self::RoundOutcome { .. } => EventKind::RoundOutcome,
            Self::EvalReported { .. } => EventKind::EvalReported,
            Self::CoordinatorAuditHead { .. } => EventKind::CoordinatorAuditHead,
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

    /// The coordinator's head as an event.
    pub fn coordinator_head(h: &AuditHead) -> Self {
        Self::CoordinatorAuditHead {
            seq: h.seq,
            hash: hex::encode(h.hash),
            ts_unix_ms: h.ts_unix_ms,
            sig: hex::encode(h.sig),
        }
    }
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
                SiteEvent::AgentStarted {
                    version: "0.1.0".into(),
                    site: "st-mary".into(),
                    config_blake3: H1.into(),
                    identity: "fedlink://fed/site/st-mary".into(),
                    dataset_kind: "tabular".into(),
                    dataset_fingerprint: H2.into(),
                    train_samples: 100,
                    validation_samples: 20,
                    device: "cpu".into(),
                },
                "agent.started",
                pin(
                    r#"{"config_blake3":"{H1}","dataset_fingerprint":"{H2}","dataset_kind":"tabular","device":"cpu","identity":"fedlink://fed/site/st-mary","site":"st-mary","train_samples":100,"validation_samples":20,"version":"0.1.0"}"#,
                ),
            ),
            (
                SiteEvent::AgentStopped {
                    reason: "signal".into(),
                },
                "agent.stopped",
                pin(r#"{"reason":"signal"}"#),
            ),
            (
                SiteEvent::TailRepaired {
                    line: 7,
                    removed_bytes: 33,
                    removed_blake3: H1.into(),
                },
                "audit.tail_repaired",
                pin(r#"{"line":7,"removed_blake3":"{H1}","removed_bytes":33}"#),
            ),
            (
                SiteEvent::ConnEstablished {
                    coordinator: "coord.example:7443".into(),
                    site_id: SiteId::new("st-mary").unwrap(),
                    federation: FederationId::new("fed").unwrap(),
                    protocol_version: 7,
                    transport: "tcp".into(),
                    proxy: Some("proxy:3128".into()),
                    transport_reason: "configured".into(),
                },
                "conn.established",
                pin(
                    r#"{"coordinator":"coord.example:7443","federation":"fed","protocol_version":7,"proxy":"proxy:3128","site_id":"st-mary","transport":"tcp","transport_reason":"configured"}"#,
                ),
            ),
            (
                SiteEvent::ConnEstablished {
                    coordinator: "coord.example:7443".into(),
                    site_id: SiteId::new("st-mary").unwrap(),
                    federation: FederationId::new("fed").unwrap(),
                    protocol_version: 7,
                    transport: "quic".into(),
                    proxy: None,
                    transport_reason: "raced".into(),
                },
                "conn.established",
                pin(
                    r#"{"coordinator":"coord.example:7443","federation":"fed","protocol_version":7,"proxy":null,"site_id":"st-mary","transport":"quic","transport_reason":"raced"}"#,
                ),
            ),
            (
                SiteEvent::ConnLost {
                    reason: "timed out".into(),
                    retry_in_ms: Some(1500),
                },
                "conn.lost",
                pin(r#"{"reason":"timed out","retry_in_ms":1500}"#),
            ),
            (
                SiteEvent::ConnLost {
                    reason: "shutdown".into(),
                    retry_in_ms: None,
                },
                "conn.lost",
                pin(r#"{"reason":"shutdown","retry_in_ms":null}"#),
            ),
            (
                SiteEvent::OfferReceived {
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
                },
                "offer.received",
                pin(
                    r#"{"arch":"mlp","base_model":"{H1}","clip_norm":null,"encoding":"f32","epochs":2,"job":"job-7","noise_multiplier":null,"round":12}"#,
                ),
            ),
            (
                SiteEvent::OfferReceived {
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
                },
                "offer.received",
                pin(
                    r#"{"arch":"unet","augmentation":{"flips":true,"intensity_jitter":{"scale":0.1,"shift":0.05},"rotate90":false},"base_model":"{H1}","central_noise_multiplier":0.25,"class_weight":"balanced","clip_norm":1.5,"encoding":"f16","epochs":1,"job":"job-7","learning_rate":0.003,"noise_multiplier":0.8,"optimizer":{"AdamW":{"beta1":0.9,"beta2":0.999,"epsilon":1e-8,"weight_decay":0.1}},"round":12}"#,
                ),
            ),
            (
                SiteEvent::OfferAccepted { job: job(), round },
                "offer.accepted",
                pin(r#"{"job":"job-7","round":12}"#),
            ),
            (
                SiteEvent::OfferDeclined {
                    job: job(),
                    round,
                    reason: "policy: epochs".into(),
                },
                "offer.declined",
                pin(r#"{"job":"job-7","reason":"policy: epochs","round":12}"#),
            ),
            (
                SiteEvent::RoundCancelled {
                    job: job(),
                    round,
                    reason: "superseded".into(),
                    dropped_work: true,
                },
                "round.cancelled",
                pin(r#"{"dropped_work":true,"job":"job-7","reason":"superseded","round":12}"#),
            ),
            (
                SiteEvent::RoundFailed {
                    job: job(),
                    round,
                    error: "training diverged".into(),
                },
                "round.failed",
                pin(r#"{"error":"training diverged","job":"job-7","round":12}"#),
            ),
            (
                SiteEvent::ModelReceived {
                    model: H1.into(),
                    bytes: 4096,
                    from_cache: false,
                    resumed_from_record: None,
                    as_update_of: None,
                },
                "model.received",
                pin(r#"{"bytes":4096,"from_cache":false,"model":"{H1}"}"#),
            ),
            (
                SiteEvent::ModelReceived {
                    model: H1.into(),
                    bytes: 4096,
                    from_cache: false,
                    resumed_from_record: Some(3),
                    as_update_of: Some(H2.into()),
                },
                "model.received",
                pin(
                    r#"{"as_update_of":"{H2}","bytes":4096,"from_cache":false,"model":"{H1}","resumed_from_record":3}"#,
                ),
            ),
            (
                SiteEvent::ModelRefused {
                    model: H1.into(),
                    as_update_of: None,
                    error: "hash mismatch".into(),
                },
                "model.refused",
                pin(r#"{"error":"hash mismatch","model":"{H1}"}"#),
            ),
            (
                SiteEvent::ModelRefused {
                    model: H1.into(),
                    as_update_of: Some(H2.into()),
                    error: "does not decode".into(),
                },
                "model.refused",
                pin(r#"{"as_update_of":"{H2}","error":"does not decode","model":"{H1}"}"#),
            ),
            (
                SiteEvent::TrainCompleted {
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
                },
                "train.completed",
                pin(
                    r#"{"base_model":"{H1}","clipped":true,"dataset_fingerprint":"{H2}","dp_noise":false,"feature_scaling":"federated","job":"job-7","metrics":{"delta_norm":1.25,"duration_ms":120,"epoch_loss":[0.7,0.5],"epochs":2,"global_eval":null},"num_examples":100,"round":12}"#,
                ),
            ),
            (
                SiteEvent::UpdateSent {
                    job: job(),
                    round,
                    payload_hash: H1.into(),
                    payload_bytes: 4096,
                    num_examples: 100,
                    nonce: "00ff".repeat(8),
                    base_model: H2.into(),
                    encoding: "f32".into(),
                    feature_stats: true,
                },
                "update.sent",
                pin(
                    r#"{"base_model":"{H2}","encoding":"f32","feature_stats":true,"job":"job-7","nonce":"00ff00ff00ff00ff00ff00ff00ff00ff","num_examples":100,"payload_bytes":4096,"payload_hash":"{H1}","round":12}"#,
                ),
            ),
            (
                SiteEvent::UpdateResumed {
                    job: job(),
                    round,
                    payload_hash: H1.into(),
                    nonce: "00ff".repeat(8),
                    from_record: 3,
                    bytes_held: 3000,
                    bytes_sent: 1096,
                },
                "update.resumed",
                pin(
                    r#"{"bytes_held":3000,"bytes_sent":1096,"from_record":3,"job":"job-7","nonce":"00ff00ff00ff00ff00ff00ff00ff00ff","payload_hash":"{H1}","round":12}"#,
                ),
            ),
            (
                SiteEvent::UpdateResult {
                    job: job(),
                    round,
                    payload_hash: H1.into(),
                    nonce: "00ff".repeat(8),
                    outcome: "ack".into(),
                    accepted: true,
                    reason: None,
                },
                "update.result",
                pin(
                    r#"{"accepted":true,"job":"job-7","nonce":"00ff00ff00ff00ff00ff00ff00ff00ff","outcome":"ack","payload_hash":"{H1}","reason":null,"round":12}"#,
                ),
            ),
            (
                SiteEvent::UpdateResult {
                    job: job(),
                    round,
                    payload_hash: H1.into(),
                    nonce: "00ff".repeat(8),
                    outcome: "reject".into(),
                    accepted: false,
                    reason: Some("late: round closed".into()),
                },
                "update.result",
                pin(
                    r#"{"accepted":false,"job":"job-7","nonce":"00ff00ff00ff00ff00ff00ff00ff00ff","outcome":"reject","payload_hash":"{H1}","reason":"late: round closed","round":12}"#,
                ),
            ),
            (
                SiteEvent::RoundOutcome {
                    job: job(),
                    round,
                    model: H2.into(),
                    job_completed: true,
                },
                "round.outcome",
                pin(r#"{"job":"job-7","job_completed":true,"model":"{H2}","round":12}"#),
            ),
            (
                SiteEvent::EvalReported {
                    job: job(),
                    round,
                    model: H2.into(),
                    num_eval_examples: 20,
                    loss: Some(0.25),
                    accuracy: Some(0.9),
                    auc: None,
                    dice: None,
                },
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
        }
    }
}
