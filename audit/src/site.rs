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
