//! Control messages between site agents and the coordinator.
//!
//! Every message is one [`Message`] in one
//! [`FrameKind::Message`](crate::frame::FrameKind::Message) frame. [`Message`] is `#[non_exhaustive]`: new
//! variants are only ever appended, so an older peer fails to decode an
//! unknown variant with a typed error instead of misreading it, and the
//! version negotiated in [`Hello`]/[`Welcome`] tells each side what the
//! other understands.
//!
//! # Conversation (one QUIC connection, site → coordinator)
//!
//! ```text
//! site                                   coordinator
//!  | Hello{versions, agent, caps}  -->   |
//!  |  <-- Welcome{version, site id, federation, heartbeat} | Reject{code}
//!  |  <-- TaskOffer{job, round, base model, arch, training, encoding, ...}
//!  | OfferResponse{accept|decline} -->   |
//!  | ModelFetch{hash} -->  (skipped when the model is cached)
//!  |  <-- ModelManifest{hash, spec, encoding, len} + chunk frames
//!  | DeltaUpload{signed envelope} + chunk frames -->
//!  |  <-- UploadResult{Ack | Reject}
//!  | AuditHead{site's signed head} -->   |   (version >= 2, control stream)
//!  |  <-- AuditHead{coordinator's signed head}
//!  | Heartbeat <-> Heartbeat (any time) ; Bye (either side)
//! ```
//!
//! [`AuditHead`] exists from protocol version [`AUDIT_HEAD_VERSION`] on: a
//! peer sends it only when the negotiated version is at least that
//! ([`supports_audit_head`]); an older peer never sees it.
//!
//! From version [`CENTRAL_DP_VERSION`] on, offers travel as
//! [`Message::TaskOfferV3`], which also carries
//! [`PrivacyRequirements::central_dp`] (the noise the coordinator adds to the
//! aggregate). [`Message::task_offer`] picks the variant the negotiated
//! version has; the version-1/2 [`Message::TaskOffer`] encoding has no room
//! for `central_dp` and leaves it out.
//!
//! From version [`TRAINING_V5_VERSION`] on, offers travel as
//! [`Message::TaskOfferV5`], which also carries
//! [`TrainingConfig::augmentation`]; an offer whose architecture is a U-Net
//! of depth other than 2 (the `unet_deep` arch encoding) or that asks for
//! augmentation needs that version ([`TaskOffer::min_protocol_version`]),
//! and the coordinator does not offer it to a site that negotiated less.
//!
//! From version [`CLASS_WEIGHT_VERSION`] on, offers travel as
//! [`Message::TaskOfferV6`], which also carries
//! [`TrainingConfig::class_weight`]; an offer that asks for class weighting
//! needs that version and is not offered to a site that negotiated less.
//!
//! Free-text fields (`message`, `reason`, `agent_version`) are bounded only
//! by the frame limit; receivers should truncate them before logging.

use serde::{Deserialize, Serialize};

use crate::arch::ArchSpec;
use crate::codec::serde_codec;
use crate::encoding::{Encoding, ValueCodec};
use crate::envelope::SignedEnvelope;
use crate::evaluation::{EvalRequest, SignedEvalReport};
use crate::ids::{FederationId, JobId, RoundId, SiteId};
use crate::model::{ModelHash, ModelSpec};
use crate::payload::PayloadHash;
use crate::scaling::{FeatureScaling, ScalingError};

/// Newest protocol version this build speaks.
///
/// Version history: 1 — the original conversation; 2 — adds
/// [`Message::AuditHead`]; 3 — adds [`Message::TaskOfferV3`] (offers that
/// say whether DP noise is added centrally); 4 — adds
/// [`Message::RoundOutcome`] (the model a site's update went into); 5 — adds
/// [`Message::TaskOfferV5`] (offers with [`TrainingConfig::augmentation`])
/// and the U-Net of any depth (the `unet_deep` arch encoding); 6 — adds
/// resumable transfers ([`Message::ResumeUpload`],
/// [`Message::UploadProgress`], [`Message::ModelFetchFrom`]),
/// [`Message::EvalRequest`] and [`Message::EvalReport`] (federated
/// evaluation of a given model, [`crate::evaluation`]) and
/// [`Message::TaskOfferV6`] (offers with [`TrainingConfig::class_weight`]);
/// 7 — adds downlink updates ([`Message::ModelUpdateFetch`],
/// [`Message::UpdateManifest`], [`crate::downlink`]).
pub const PROTOCOL_VERSION: u16 = 7;
/// First protocol version that has [`Message::AuditHead`].
pub const AUDIT_HEAD_VERSION: u16 = 2;
/// First protocol version that has [`Message::TaskOfferV3`].
pub const CENTRAL_DP_VERSION: u16 = 3;
/// First protocol version that has [`Message::RoundOutcome`].
pub const ROUND_OUTCOME_VERSION: u16 = 4;
/// First protocol version that has [`Message::TaskOfferV5`] (data
/// augmentation in the offer) and decodes a U-Net of depth other than 2.
pub const TRAINING_V5_VERSION: u16 = 5;
/// First version with resumable transfers: [`Message::ResumeUpload`],
/// [`Message::UploadProgress`] and [`Message::ModelFetchFrom`].
pub const RESUME_VERSION: u16 = 6;
/// First protocol version that has [`Message::TaskOfferV6`] (class
/// weighting of the site's loss in the offer).
pub const CLASS_WEIGHT_VERSION: u16 = 6;
/// First protocol version with downlink updates: [`Message::ModelUpdateFetch`]
/// and its answer [`Message::UpdateManifest`].
pub const DOWNLINK_VERSION: u16 = 7;
/// Largest multiplicative or additive intensity jitter an offer may ask for.
pub const MAX_INTENSITY_JITTER: f64 = 0.5;
/// Oldest protocol version this build speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Most epochs a task may ask for.
pub const MAX_EPOCHS: u32 = 10_000;
/// Largest batch size a task may ask for.
pub const MAX_BATCH_SIZE: u32 = 1 << 20;

/// An inclusive range of protocol versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u16,
    /// Newest version spoken.
    pub max: u16,
}

impl VersionRange {
    /// What this build speaks.
    pub const SUPPORTED: Self = Self {
        min: MIN_PROTOCOL_VERSION,
        max: PROTOCOL_VERSION,
    };

    /// Does the range contain `v`?
    pub fn contains(&self, v: u16) -> bool {
        self.min <= v && v <= self.max
    }

    /// The highest version both ranges contain, if any.
    pub fn negotiate(&self, peer: &Self) -> Option<u16> {
        let hi = self.max.min(peer.max);
        let lo = self.min.max(peer.min);
        (lo <= hi).then_some(hi)
    }
}

/// [`Capabilities::features`] name a site sends when its connection goes
/// through an HTTP proxy (informational: the operator's view shows it).
pub const FEATURE_VIA_PROXY: &str = "via-http-proxy";

/// What a site agent can do.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Capabilities {
    /// Value codecs the agent can encode deltas with. For `Int8` and `TopK`
    /// the parameters carry no meaning here: listing one variant means the
    /// whole family (any rounding mode, any fraction) is supported.
    pub codecs: Vec<ValueCodec>,
    /// Largest chunk (bytes of f32 input) the agent accepts.
    pub max_chunk_bytes: u32,
    /// Named optional features (forward compatibility; unknown names are
    /// ignored).
    pub features: Vec<String>,
}

impl Default for Capabilities {
    /// Every codec of this build, the largest chunk size, no features.
    fn default() -> Self {
        Self {
            codecs: vec![
                ValueCodec::F32,
                ValueCodec::F16,
                ValueCodec::Bf16,
                ValueCodec::Int8 { stochastic: false },
                ValueCodec::Int8 { stochastic: true },
                ValueCodec::TopK { per_million: 1 },
            ],
            max_chunk_bytes: crate::encoding::MAX_CHUNK_BYTES,
            features: Vec::new(),
        }
    }
}

/// First message of a connection, site → coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol versions the site speaks.
    pub versions: VersionRange,
    /// Agent software version (free text, e.g. `fedlink-agent 0.1.0`).
    pub agent_version: String,
    /// What the agent supports.
    pub capabilities: Capabilities,
}

/// The coordinator accepts a site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Negotiated protocol version (used by both sides from now on).
    pub protocol_version: u16,
    /// The site's identity as the coordinator sees it (from its
    /// certificate): what the site must put in its signed headers.
    pub site_id: SiteId,
    /// The federation the coordinator serves.
    pub federation_id: FederationId,
    /// How often the site should send a [`Heartbeat`], in milliseconds.
    pub heartbeat_interval_ms: u64,
}

/// Why a request or an upload was refused.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectCode {
    /// No common protocol version.
    UnsupportedVersion,
    /// The site is not registered (or was revoked).
    UnknownSite,
    /// The site may not do this.
    NotAuthorized,
    /// The message names another federation.
    WrongFederation,
    /// The message was not expected now (e.g. an upload with no open round).
    UnexpectedMessage,
    /// A message or payload could not be decoded.
    Malformed,
    /// The update signature does not verify with the site's key.
    BadSignature,
    /// The update names another job, round or base model.
    ContextMismatch,
    /// The update was already received (nonce or round replayed).
    Replay,
    /// The payload's length or hash differs from the signed header.
    PayloadMismatch,
    /// The deadline passed.
    TooLate,
    /// The coordinator is overloaded; retry later.
    Busy,
    /// The coordinator is shutting down.
    ShuttingDown,
    /// Something went wrong on the coordinator.
    Internal,
}

impl RejectCode {
    /// Every code, in declaration order (for tests and tools that must
    /// cover them all; a unit test fails to compile when a new code is not
    /// listed here).
    pub const ALL: [Self; 14] = [
        Self::UnsupportedVersion,
        Self::UnknownSite,
        Self::NotAuthorized,
        Self::WrongFederation,
        Self::UnexpectedMessage,
        Self::Malformed,
        Self::BadSignature,
        Self::ContextMismatch,
        Self::Replay,
        Self::PayloadMismatch,
        Self::TooLate,
        Self::Busy,
        Self::ShuttingDown,
        Self::Internal,
    ];
}

/// The coordinator refuses a [`Hello`] (then closes the connection).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// Machine-readable reason.
    pub code: RejectCode,
    /// Human-readable detail.
    pub message: String,
}

/// Optimiser a site trains with.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Optimizer {
    /// Stochastic gradient descent with momentum (0 = plain SGD).
    Sgd {
        /// Momentum factor in `[0, 1)`.
        momentum: f64,
    },
    /// Adam.
    Adam {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Numerical stabiliser.
        epsilon: f64,
    },
    /// Adam with decoupled weight decay.
    AdamW {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Numerical stabiliser.
        epsilon: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
}

/// Local training hyperparameters of a round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingConfig {
    /// Passes over the local data (1..=[`MAX_EPOCHS`]).
    pub epochs: u32,
    /// Mini-batch size (1..=[`MAX_BATCH_SIZE`]).
    pub batch_size: u32,
    /// Optimiser.
    pub optimizer: Optimizer,
    /// Learning rate (finite, > 0).
    pub learning_rate: f64,
    /// FedProx proximal term μ (0 = plain FedAvg local training).
    pub fedprox_mu: f64,
    /// Seed of the local data shuffling and dropout.
    pub seed: u64,
    /// Data augmentation the site applies to its training batches (image
    /// and segmentation tasks). Carried only by [`Message::TaskOfferV5`]
    /// (protocol version >= [`TRAINING_V5_VERSION`]); older offer
    /// encodings leave it out and decode it as `None`.
    pub augmentation: Option<Augmentation>,
    /// Class weighting of the site's loss. Carried only by
    /// [`Message::TaskOfferV6`] (protocol version >=
    /// [`CLASS_WEIGHT_VERSION`]); older offer encodings leave it out and
    /// decode it as [`ClassWeight::None`].
    pub class_weight: ClassWeight,
}

/// How a site weighs the classes in its training loss.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClassWeight {
    /// Every sample counts once (plain mean cross-entropy).
    #[default]
    None,
    /// Each site weighs class `c` by `n / (K · n_c)` from its *own*
    /// training labels (`n` samples, `K` classes, `n_c` of class `c`), so
    /// both classes of an imbalanced outcome count equally; no label
    /// counts leave the site.
    Balanced,
}

/// Seeded data augmentation of training batches. Geometric transforms apply
/// to the image and its mask alike; intensity jitter to the image only.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Augmentation {
    /// Random horizontal and vertical flips (each with probability ½).
    pub flips: bool,
    /// Random rotation by a multiple of 90° (square inputs).
    pub rotate90: bool,
    /// Random intensity change of the image, `None` for none.
    pub intensity_jitter: Option<IntensityJitter>,
}

/// Intensity jitter: each training image `x` becomes `x · a + b` with `a`
/// uniform in `[1 − scale, 1 + scale]` and `b` uniform in `[−shift, shift]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntensityJitter {
    /// Multiplicative half-range, in `[0, MAX_INTENSITY_JITTER]`.
    pub scale: f64,
    /// Additive half-range (in units of the standardised image), in
    /// `[0, MAX_INTENSITY_JITTER]`.
    pub shift: f64,
}

impl Augmentation {
    /// Check the bounds; the error names the field out of range.
    pub fn validate(&self) -> Result<(), OfferError> {
        if let Some(j) = self.intensity_jitter {
            let ok = |x: f64| x.is_finite() && (0.0..=MAX_INTENSITY_JITTER).contains(&x);
            if !ok(j.scale) {
                return Err(OfferError::OutOfRange {
                    field: "augmentation.intensity_jitter.scale",
                });
            }
            if !ok(j.shift) {
                return Err(OfferError::OutOfRange {
                    field: "augmentation.intensity_jitter.shift",
                });
            }
        }
        Ok(())
    }
}

/// Differential-privacy noise a site must add to its clipped update.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpNoise {
    /// Gaussian noise standard deviation as a multiple of the clip norm.
    pub noise_multiplier: f64,
}

/// Central differential privacy: Gaussian noise the coordinator adds once to
/// the aggregate of the sites' clipped updates. The site adds nothing for
/// it; it protects the site's data from everyone who sees the aggregated
/// model (other sites, model users), not from the coordinator, which sees
/// the clipped update before the noise.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CentralDp {
    /// Noise standard deviation as a multiple of the clip norm (the
    /// sensitivity of the sum), finite and > 0.
    pub noise_multiplier: f64,
    /// δ the coordinator's privacy accountant reports ε at, in (0, 1);
    /// `None` when the job sets none.
    pub target_delta: Option<f64>,
}

/// Clipping and DP requirements of a round.
#[derive(Clone, Copy, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct PrivacyRequirements {
    /// Clip the update to this L2 norm (finite, > 0) before encoding.
    pub clip_norm: Option<f64>,
    /// Add Gaussian noise after clipping, at the site (local DP; requires
    /// `clip_norm`).
    pub dp: Option<DpNoise>,
    /// Noise the coordinator adds to the aggregate (central DP; requires
    /// `clip_norm`). Carried only by [`Message::TaskOfferV3`] (protocol
    /// version >= [`CENTRAL_DP_VERSION`]); an older offer encoding leaves
    /// it out and decodes as `None`.
    #[serde(default)]
    pub central_dp: Option<CentralDp>,
}

/// Why a [`TaskOffer`] is not acceptable as sent.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// A training or privacy field is out of range.
    #[error("task offer field {field} is out of range")]
    OutOfRange {
        /// The field.
        field: &'static str,
    },
    /// DP noise without a clip norm.
    #[error("task offer asks for DP noise without a clip norm")]
    DpWithoutClip,
    /// The architecture is invalid.
    #[error("task offer architecture is invalid: {0}")]
    Arch(String),
    /// The feature scaling is malformed or out of bounds.
    #[error("task offer feature scaling is invalid: {0}")]
    Scaling(ScalingError),
}

/// The coordinator offers a site one round of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskOffer {
    /// Federation.
    pub federation_id: FederationId,
    /// Job.
    pub job_id: JobId,
    /// Round.
    pub round: RoundId,
    /// The global model to start from (fetch it unless cached).
    pub base_model: ModelHash,
    /// Model architecture.
    pub arch: ArchSpec,
    /// Local training hyperparameters.
    pub training: TrainingConfig,
    /// Encoding the delta must be uploaded with.
    pub encoding: Encoding,
    /// Clipping / DP requirements.
    pub privacy: PrivacyRequirements,
    /// Upload deadline, unix milliseconds.
    pub deadline_unix_ms: u64,
    /// Federated standardisation of tabular features (pooled from the
    /// sites' reported statistics) to apply instead of local statistics;
    /// `None` until the federation has statistics, and for non-tabular jobs.
    pub scaling: Option<FeatureScaling>,
}

impl TaskOffer {
    /// The oldest negotiated protocol version a site must speak to be sent
    /// this offer: [`CLASS_WEIGHT_VERSION`] for class weighting,
    /// [`TRAINING_V5_VERSION`] for augmentation or an architecture only that
    /// version decodes, else [`MIN_PROTOCOL_VERSION`].
    /// (Central DP needs no gate: an older site simply is not told.)
    pub fn min_protocol_version(&self) -> u16 {
        min_protocol_version(&self.arch, self.training.augmentation.as_ref())
            .max(class_weight_min_version(self.training.class_weight))
    }

    /// Check the numeric fields, the feature scaling and the architecture.
    pub fn validate(&self) -> Result<(), OfferError> {
        let t = &self.training;
        let bad = |field| Err(OfferError::OutOfRange { field });
        if !(1..=MAX_EPOCHS).contains(&t.epochs) {
            return bad("epochs");
        }
        if !(1..=MAX_BATCH_SIZE).contains(&t.batch_size) {
            return bad("batch_size");
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return bad("learning_rate");
        }
        if !(t.fedprox_mu.is_finite() && t.fedprox_mu >= 0.0) {
            return bad("fedprox_mu");
        }
        let unit = |x: f64| x.is_finite() && (0.0..1.0).contains(&x);
        let ok = match t.optimizer {
            Optimizer::Sgd { momentum } => unit(momentum),
            Optimizer::Adam {
                beta1,
                beta2,
                epsilon,
            } => unit(beta1) && unit(beta2) && epsilon.is_finite() && epsilon > 0.0,
            Optimizer::AdamW {
                beta1,
                beta2,
                epsilon,
                weight_decay,
            } => {
                unit(beta1)
                    && unit(beta2)
                    && epsilon.is_finite()
                    && epsilon > 0.0
                    && weight_decay.is_finite()
                    && weight_decay >= 0.0
            }
        };
        if !ok {
            return bad("optimizer");
        }
        if let Some(c) = self.privacy.clip_norm
            && !(c.is_finite() && c > 0.0)
        {
            return bad("clip_norm");
        }
        if let Some(dp) = self.privacy.dp {
            if self.privacy.clip_norm.is_none() {
                return Err(OfferError::DpWithoutClip);
            }
            if !(dp.noise_multiplier.is_finite() && dp.noise_multiplier >= 0.0) {
                return bad("noise_multiplier");
            }
        }
        if let Some(dp) = self.privacy.central_dp {
            if self.privacy.clip_norm.is_none() {
                return Err(OfferError::DpWithoutClip);
            }
            if !(dp.noise_multiplier.is_finite() && dp.noise_multiplier > 0.0) {
                return bad("central_dp.noise_multiplier");
            }
            if let Some(d) = dp.target_delta
                && !(d.is_finite() && d > 0.0 && d < 1.0)
            {
                return bad("central_dp.target_delta");
            }
        }
        if let Some(a) = &t.augmentation {
            a.validate()?;
        }
        if let Some(s) = &self.scaling {
            s.validate().map_err(OfferError::Scaling)?;
        }
        self.arch
            .validate()
            .map_err(|e| OfferError::Arch(e.to_string()))
    }
}

/// The site's answer to a [`TaskOffer`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OfferDecision {
    /// The site will train and upload.
    Accept,
    /// The site will not take part in this round.
    Decline {
        /// Why (free text).
        reason: String,
    },
}

/// Site → coordinator: answer to an offer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferResponse {
    /// Job of the offer.
    pub job_id: JobId,
    /// Round of the offer.
    pub round: RoundId,
    /// Accept or decline.
    pub decision: OfferDecision,
}

/// Site → coordinator: send me this model (skipped when cached).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFetch {
    /// The model version wanted.
    pub hash: ModelHash,
}

/// Site → coordinator, protocol version >= [`RESUME_VERSION`]: the rest of
/// a model download that a lost connection cut short. The coordinator
/// answers with the whole [`ModelManifest`], then the chunk records from
/// `from_record` on (the site kept the ones before).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFetchFrom {
    /// The model version wanted.
    pub hash: ModelHash,
    /// Index of the first chunk record to send (0 = all of them).
    pub from_record: u64,
}

/// Coordinator → site, protocol version >= [`RESUME_VERSION`], the answer
/// to [`Message::ResumeUpload`]: how much of the signed payload the
/// coordinator holds durably (whole chunk records, fsynced). The site sends
/// the records after these, and nothing else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadProgress {
    /// Whole chunk records held.
    pub records: u64,
    /// Their bytes (the site checks them against its own records).
    pub bytes: u64,
}

/// Coordinator → site: a model follows as `num_chunks` chunk frames.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// The model version; the decoded values must hash to it.
    pub hash: ModelHash,
    /// Tensor layout.
    pub spec: ModelSpec,
    /// Payload encoding (normally lossless f32).
    pub encoding: Encoding,
    /// Total bytes of the chunk records.
    pub payload_len: u64,
    /// Number of chunk records.
    pub num_chunks: u64,
}

/// Site → coordinator, protocol version >= [`DOWNLINK_VERSION`]: send me
/// model `hash`; I hold model `base` (hash-checked in my cache). The
/// coordinator answers with an [`UpdateManifest`] and the chunk records of
/// the encoded update `base → hash` when it has that update, else with the
/// whole model ([`ModelManifest`] and *all* its chunk records, whatever
/// `from_record` says).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelUpdateFetch {
    /// The model version wanted.
    pub hash: ModelHash,
    /// The model version the site holds.
    pub base: ModelHash,
    /// Index of the first update chunk record to send (0 = all of them): a
    /// site resuming an update download kept the records before it.
    pub from_record: u64,
}

/// Coordinator → site, protocol version >= [`DOWNLINK_VERSION`], answer to
/// [`Message::ModelUpdateFetch`]: the global update `base → hash` follows as
/// `num_chunks` chunk records (from the asked `from_record` on), encoded with
/// `encoding` (the job's codec, possibly lossy). `base` plus the decoded
/// update ([`crate::downlink::apply_update`]) hashes to `hash`; the site
/// checks that before it uses the result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateManifest {
    /// The model the update applies to.
    pub base: ModelHash,
    /// The model the update produces.
    pub hash: ModelHash,
    /// Tensor layout (of both models and of the update).
    pub spec: ModelSpec,
    /// Payload encoding of the update.
    pub encoding: Encoding,
    /// Total bytes of the chunk records.
    pub payload_len: u64,
    /// Number of chunk records.
    pub num_chunks: u64,
}

/// Site → coordinator: a signed delta follows as chunk frames of
/// `envelope.header.payload_len` bytes in all.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeltaUpload {
    /// Signed header (context, metrics, payload length and hash).
    pub envelope: SignedEnvelope,
}

/// Coordinator → site: what happened to an upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadResult {
    /// Received and verified.
    Ack {
        /// Hash of the payload received.
        payload_hash: PayloadHash,
        /// Whether the update will be aggregated (`false`: e.g. the round
        /// closed meanwhile or the update was filtered as an outlier).
        accepted: bool,
    },
    /// Refused.
    Reject {
        /// Machine-readable reason.
        code: RejectCode,
        /// Human-readable detail.
        message: String,
    },
}

/// Liveness, either direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Sender's counter.
    pub seq: u64,
    /// Sender's clock, unix milliseconds.
    pub now_unix_ms: u64,
}

/// Orderly goodbye, either direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bye {
    /// Why (free text).
    pub reason: String,
}

/// Coordinator → site: stop working on a round (it closed, or the job was
/// aborted or paused). An update for it would be refused as late.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    /// Job.
    pub job_id: JobId,
    /// Round to abandon.
    pub round: RoundId,
    /// Why (free text).
    pub reason: String,
}

/// Coordinator → site (protocol version >= [`ROUND_OUTCOME_VERSION`]), on
/// the control stream, once the coordinator has recorded the aggregation of
/// a round the site's update went into (`round.aggregated`), and to every
/// connected site when a job completes: the model the round produced. The
/// site records it in its own audit log, so the result of its contribution
/// — and the job's final model — is in its hands, not only in the
/// coordinator's log; `fedlink audit reconcile` checks the two agree. It is
/// followed by the coordinator's [`Message::AuditHead`], which covers the
/// entry that recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundOutcome {
    /// Job.
    pub job_id: JobId,
    /// The round aggregated (for the job's end: its last completed round).
    pub round: RoundId,
    /// The global model the round produced.
    pub model: ModelHash,
    /// Whether this is the job's final model (the job completed).
    pub job_completed: bool,
}

/// Either direction (protocol version >= [`AUDIT_HEAD_VERSION`]): the
/// sender's current signed audit-log head, the same values as a
/// `fedlink_audit::SignedHead`. The receiver records it in its own audit log,
/// so that a later truncation of the sender's log below this head is
/// detectable; a site sends one after each upload result, the coordinator
/// answers each with its own. The signature is checked by the auditor with
/// the sender's audit key, not necessarily by the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AuditHead {
    /// Sequence number of the last entry of the sender's log (0: empty log).
    pub seq: u64,
    /// blake3 hash of that entry's line (all zero for an empty log).
    pub hash: [u8; 32],
    /// When the head was signed, unix milliseconds.
    pub ts_unix_ms: u64,
    /// ed25519 signature over the head (domain-separated, see `fedlink-audit`).
    #[serde(with = "sig64")]
    pub sig: [u8; 64],
}

/// The oldest negotiated protocol version a site must speak to be offered
/// a job with `arch` and `augmentation` (see
/// [`TaskOffer::min_protocol_version`]).
pub fn min_protocol_version(arch: &ArchSpec, augmentation: Option<&Augmentation>) -> u16 {
    if augmentation.is_some() || arch.needs_training_v5() {
        TRAINING_V5_VERSION
    } else {
        MIN_PROTOCOL_VERSION
    }
}

/// The oldest negotiated protocol version a site must speak to be offered
/// a job whose sites weigh classes by `w`: [`CLASS_WEIGHT_VERSION`] unless
/// `w` is [`ClassWeight::None`].
pub fn class_weight_min_version(w: ClassWeight) -> u16 {
    match w {
        ClassWeight::None => MIN_PROTOCOL_VERSION,
        _ => CLASS_WEIGHT_VERSION,
    }
}

/// Does a connection at negotiated protocol `version` carry
/// [`Message::RoundOutcome`]?
pub fn supports_round_outcome(version: u16) -> bool {
    version >= ROUND_OUTCOME_VERSION
}

/// Does a connection at negotiated protocol `version` carry
/// [`Message::ModelUpdateFetch`] and [`Message::UpdateManifest`]?
pub fn supports_downlink_updates(version: u16) -> bool {
    version >= DOWNLINK_VERSION
}

/// Does a connection at negotiated protocol `version` carry
/// [`Message::AuditHead`]?
pub fn supports_audit_head(version: u16) -> bool {
    version >= AUDIT_HEAD_VERSION
}

/// serde for `[u8; 64]` (serde's own array impls stop at 32): a fixed tuple
/// of 64 bytes, i.e. 64 raw bytes in bincode, no length prefix.
mod sig64 {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::ser::SerializeTuple;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(64)?;
        for b in v {
            t.serialize_element(b)?;
        }
        t.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = [u8; 64];
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("64 bytes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<[u8; 64], A::Error> {
                let mut out = [0u8; 64];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| Error::invalid_length(i, &self))?;
                }
                Ok(out)
            }
        }
        d.deserialize_tuple(64, V)
    }
}

/// Every control message. Variants are only ever appended.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Site → coordinator, first message.
    Hello(Hello),
    /// Coordinator → site, answer to `Hello`.
    Welcome(Welcome),
    /// Coordinator → site, refusal of `Hello`.
    Reject(Reject),
    /// Coordinator → site, protocol versions below [`CENTRAL_DP_VERSION`]:
    /// the offer without [`PrivacyRequirements::central_dp`] (left out when
    /// encoding, `None` when decoding). Build offers with
    /// [`Message::task_offer`].
    #[serde(with = "offer_v1")]
    TaskOffer(Box<TaskOffer>),
    /// Site → coordinator.
    OfferResponse(OfferResponse),
    /// Site → coordinator.
    ModelFetch(ModelFetch),
    /// Coordinator → site, followed by chunk frames.
    ModelManifest(Box<ModelManifest>),
    /// Site → coordinator, followed by chunk frames.
    DeltaUpload(Box<DeltaUpload>),
    /// Coordinator → site.
    UploadResult(UploadResult),
    /// Either direction.
    Heartbeat(Heartbeat),
    /// Either direction.
    Bye(Bye),
    /// Coordinator → site.
    Cancel(Cancel),
    /// Either direction, on the control stream, only when the negotiated
    /// version is at least [`AUDIT_HEAD_VERSION`].
    AuditHead(AuditHead),
    /// Coordinator → site, protocol versions [`CENTRAL_DP_VERSION`] up to
    /// below [`TRAINING_V5_VERSION`]: the offer without
    /// [`TrainingConfig::augmentation`] (left out when encoding, `None`
    /// when decoding).
    #[serde(with = "offer_v3")]
    TaskOfferV3(Box<TaskOffer>),
    /// Coordinator → site, protocol version >= [`ROUND_OUTCOME_VERSION`].
    RoundOutcome(RoundOutcome),
    /// Coordinator → site, protocol versions [`TRAINING_V5_VERSION`] up to
    /// below [`CLASS_WEIGHT_VERSION`]: the offer without
    /// [`TrainingConfig::class_weight`] (left out when encoding,
    /// [`ClassWeight::None`] when decoding).
    #[serde(with = "offer_v5")]
    TaskOfferV5(Box<TaskOffer>),
    /// Site → coordinator, protocol version >= [`RESUME_VERSION`]: the same
    /// signed envelope as an upload that a lost connection cut short. The
    /// coordinator answers [`Message::UploadProgress`] (or an
    /// [`UploadResult::Reject`]), then reads the remaining chunk frames.
    ResumeUpload(Box<DeltaUpload>),
    /// Coordinator → site, answer to [`Message::ResumeUpload`].
    UploadProgress(UploadProgress),
    /// Site → coordinator, protocol version >= [`RESUME_VERSION`]: resume a
    /// model download.
    ModelFetchFrom(ModelFetchFrom),
    /// Coordinator → site, on the control stream, protocol version >=
    /// [`crate::evaluation::FEDERATED_EVAL_VERSION`]: evaluate a model on the
    /// validation split.
    EvalRequest(Box<EvalRequest>),
    /// Site → coordinator, on the control stream, protocol version >=
    /// [`crate::evaluation::FEDERATED_EVAL_VERSION`]: the signed answer to an
    /// `EvalRequest`.
    EvalReport(Box<SignedEvalReport>),
    /// Coordinator → site, protocol version >= [`CLASS_WEIGHT_VERSION`]:
    /// the offer with every field.
    TaskOfferV6(Box<TaskOffer>),
    /// Site → coordinator, protocol version >= [`DOWNLINK_VERSION`]: a model
    /// as an update of one the site holds (or the whole model).
    ModelUpdateFetch(ModelUpdateFetch),
    /// Coordinator → site, protocol version >= [`DOWNLINK_VERSION`], answer
    /// to [`Message::ModelUpdateFetch`], followed by chunk frames.
    UpdateManifest(Box<UpdateManifest>),
}

impl Message {
    /// Variant name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello(_) => "Hello",
            Self::Welcome(_) => "Welcome",
            Self::Reject(_) => "Reject",
            Self::TaskOffer(_) => "TaskOffer",
            Self::OfferResponse(_) => "OfferResponse",
            Self::ModelFetch(_) => "ModelFetch",
            Self::ModelManifest(_) => "ModelManifest",
            Self::DeltaUpload(_) => "DeltaUpload",
            Self::UploadResult(_) => "UploadResult",
            Self::Heartbeat(_) => "Heartbeat",
            Self::Bye(_) => "Bye",
            Self::Cancel(_) => "Cancel",
            Self::AuditHead(_) => "AuditHead",
            Self::TaskOfferV3(_) => "TaskOfferV3",
            Self::RoundOutcome(_) => "RoundOutcome",
            Self::TaskOfferV5(_) => "TaskOfferV5",
            Self::ResumeUpload(_) => "ResumeUpload",
            Self::UploadProgress(_) => "UploadProgress",
            Self::ModelFetchFrom(_) => "ModelFetchFrom",
            Self::EvalRequest(_) => "EvalRequest",
            Self::EvalReport(_) => "EvalReport",
            Self::TaskOfferV6(_) => "TaskOfferV6",
            Self::ModelUpdateFetch(_) => "ModelUpdateFetch",
            Self::UpdateManifest(_) => "UpdateManifest",
        }
    }

    /// `offer` in the variant a connection at negotiated protocol `version`
    /// has: [`Message::TaskOfferV6`] from [`CLASS_WEIGHT_VERSION`] on,
    /// [`Message::TaskOfferV5`] from [`TRAINING_V5_VERSION`] on (which
    /// cannot carry `training.class_weight`),
    /// [`Message::TaskOfferV3`] from [`CENTRAL_DP_VERSION`] on (which cannot
    /// carry `training.augmentation`), else [`Message::TaskOffer`] (nor
    /// `privacy.central_dp`). Whether the offer may go to such a site at all
    /// is [`TaskOffer::min_protocol_version`]'s question, not this one's.
    pub fn task_offer(offer: TaskOffer, version: u16) -> Self {
        if version >= CLASS_WEIGHT_VERSION {
            Self::TaskOfferV6(Box::new(offer))
        } else if version >= TRAINING_V5_VERSION {
            Self::TaskOfferV5(Box::new(offer))
        } else if version >= CENTRAL_DP_VERSION {
            Self::TaskOfferV3(Box::new(offer))
        } else {
            Self::TaskOffer(Box::new(offer))
        }
    }

    /// The offer of a [`Message::TaskOffer`], [`Message::TaskOfferV3`],
    /// [`Message::TaskOfferV5`] or [`Message::TaskOfferV6`].
    pub fn as_task_offer(&self) -> Option<&TaskOffer> {
        match self {
            Self::TaskOffer(o)
            | Self::TaskOfferV3(o)
            | Self::TaskOfferV5(o)
            | Self::TaskOfferV6(o) => Some(o),
            _ => None,
        }
    }
}

/// [`TrainingConfig`] as versions 1–4 encode it: without `augmentation`.
#[derive(Serialize, Deserialize)]
struct TrainingConfigV1 {
    epochs: u32,
    batch_size: u32,
    optimizer: Optimizer,
    learning_rate: f64,
    fedprox_mu: f64,
    seed: u64,
}

impl From<TrainingConfig> for TrainingConfigV1 {
    fn from(t: TrainingConfig) -> Self {
        Self {
            epochs: t.epochs,
            batch_size: t.batch_size,
            optimizer: t.optimizer,
            learning_rate: t.learning_rate,
            fedprox_mu: t.fedprox_mu,
            seed: t.seed,
        }
    }
}

impl From<TrainingConfigV1> for TrainingConfig {
    fn from(t: TrainingConfigV1) -> Self {
        Self {
            epochs: t.epochs,
            batch_size: t.batch_size,
            optimizer: t.optimizer,
            learning_rate: t.learning_rate,
            fedprox_mu: t.fedprox_mu,
            seed: t.seed,
            augmentation: None,
            class_weight: ClassWeight::None,
        }
    }
}

/// [`TrainingConfig`] as version 5 encodes it: without `class_weight`.
#[derive(Serialize, Deserialize)]
struct TrainingConfigV5 {
    epochs: u32,
    batch_size: u32,
    optimizer: Optimizer,
    learning_rate: f64,
    fedprox_mu: f64,
    seed: u64,
    augmentation: Option<Augmentation>,
}

impl From<TrainingConfig> for TrainingConfigV5 {
    fn from(t: TrainingConfig) -> Self {
        Self {
            epochs: t.epochs,
            batch_size: t.batch_size,
            optimizer: t.optimizer,
            learning_rate: t.learning_rate,
            fedprox_mu: t.fedprox_mu,
            seed: t.seed,
            augmentation: t.augmentation,
        }
    }
}

impl From<TrainingConfigV5> for TrainingConfig {
    fn from(t: TrainingConfigV5) -> Self {
        Self {
            epochs: t.epochs,
            batch_size: t.batch_size,
            optimizer: t.optimizer,
            learning_rate: t.learning_rate,
            fedprox_mu: t.fedprox_mu,
            seed: t.seed,
            augmentation: t.augmentation,
            class_weight: ClassWeight::None,
        }
    }
}

/// The version-5 encoding of [`Message::TaskOfferV5`]: every field of
/// [`TaskOffer`] in declaration order, `training` without `class_weight`.
mod offer_v5 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{PrivacyRequirements, TaskOffer, TrainingConfigV5};
    use crate::arch::ArchSpec;
    use crate::encoding::Encoding;
    use crate::ids::{FederationId, JobId, RoundId};
    use crate::model::ModelHash;
    use crate::scaling::FeatureScaling;

    #[derive(Serialize, Deserialize)]
    struct OfferV5 {
        federation_id: FederationId,
        job_id: JobId,
        round: RoundId,
        base_model: ModelHash,
        arch: ArchSpec,
        training: TrainingConfigV5,
        encoding: Encoding,
        privacy: PrivacyRequirements,
        deadline_unix_ms: u64,
        scaling: Option<FeatureScaling>,
    }

    pub(super) fn serialize<S: Serializer>(o: &TaskOffer, s: S) -> Result<S::Ok, S::Error> {
        OfferV5 {
            federation_id: o.federation_id.clone(),
            job_id: o.job_id.clone(),
            round: o.round,
            base_model: o.base_model,
            arch: o.arch.clone(),
            training: o.training.into(),
            encoding: o.encoding,
            privacy: o.privacy,
            deadline_unix_ms: o.deadline_unix_ms,
            scaling: o.scaling.clone(),
        }
        .serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Box<TaskOffer>, D::Error> {
        let o = OfferV5::deserialize(d)?;
        Ok(Box::new(TaskOffer {
            federation_id: o.federation_id,
            job_id: o.job_id,
            round: o.round,
            base_model: o.base_model,
            arch: o.arch,
            training: o.training.into(),
            encoding: o.encoding,
            privacy: o.privacy,
            deadline_unix_ms: o.deadline_unix_ms,
            scaling: o.scaling,
        }))
    }
}

/// The version-3/4 encoding of [`Message::TaskOfferV3`]: every field of
/// [`TaskOffer`] in declaration order, `training` without `augmentation`.
mod offer_v3 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{PrivacyRequirements, TaskOffer, TrainingConfigV1};
    use crate::arch::ArchSpec;
    use crate::encoding::Encoding;
    use crate::ids::{FederationId, JobId, RoundId};
    use crate::model::ModelHash;
    use crate::scaling::FeatureScaling;

    #[derive(Serialize, Deserialize)]
    struct OfferV3 {
        federation_id: FederationId,
        job_id: JobId,
        round: RoundId,
        base_model: ModelHash,
        arch: ArchSpec,
        training: TrainingConfigV1,
        encoding: Encoding,
        privacy: PrivacyRequirements,
        deadline_unix_ms: u64,
        scaling: Option<FeatureScaling>,
    }

    pub(super) fn serialize<S: Serializer>(o: &TaskOffer, s: S) -> Result<S::Ok, S::Error> {
        OfferV3 {
            federation_id: o.federation_id.clone(),
            job_id: o.job_id.clone(),
            round: o.round,
            base_model: o.base_model,
            arch: o.arch.clone(),
            training: o.training.into(),
            encoding: o.encoding,
            privacy: o.privacy,
            deadline_unix_ms: o.deadline_unix_ms,
            scaling: o.scaling.clone(),
        }
        .serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Box<TaskOffer>, D::Error> {
        let o = OfferV3::deserialize(d)?;
        Ok(Box::new(TaskOffer {
            federation_id: o.federation_id,
            job_id: o.job_id,
            round: o.round,
            base_model: o.base_model,
            arch: o.arch,
            training: o.training.into(),
            encoding: o.encoding,
            privacy: o.privacy,
            deadline_unix_ms: o.deadline_unix_ms,
            scaling: o.scaling,
        }))
    }
}

/// The version-1/2 encoding of [`Message::TaskOffer`]: every field of
/// [`TaskOffer`] in declaration order, `privacy` without `central_dp`,
/// `training` without `augmentation`.
mod offer_v1 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{DpNoise, PrivacyRequirements, TaskOffer, TrainingConfigV1};
    use crate::arch::ArchSpec;
    use crate::encoding::Encoding;
    use crate::ids::{FederationId, JobId, RoundId};
    use crate::model::ModelHash;
    use crate::scaling::FeatureScaling;

    #[derive(Serialize, Deserialize)]
    struct PrivacyV1 {
        clip_norm: Option<f64>,
        dp: Option<DpNoise>,
    }

    #[derive(Serialize, Deserialize)]
    struct OfferV1 {
        federation_id: FederationId,
        job_id: JobId,
        round: RoundId,
        base_model: ModelHash,
        arch: ArchSpec,
        training: TrainingConfigV1,
        encoding: Encoding,
        privacy: PrivacyV1,
        deadline_unix_ms: u64,
        scaling: Option<FeatureScaling>,
    }

    pub(super) fn serialize<S: Serializer>(o: &TaskOffer, s: S) -> Result<S::Ok, S::Error> {
        OfferV1 {
            federation_id: o.federation_id.clone(),
            job_id: o.job_id.clone(),
            round: o.round,
            base_model: o.base_model,
            arch: o.arch.clone(),
            training: o.training.into(),
            encoding: o.encoding,
            privacy: PrivacyV1 {
                clip_norm: o.privacy.clip_norm,
                dp: o.privacy.dp,
            },
            deadline_unix_ms: o.deadline_unix_ms,
            scaling: o.scaling.clone(),
        }
        .serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Box<TaskOffer>, D::Error> {
        let o = OfferV1::deserialize(d)?;
        Ok(Box::new(TaskOffer {
            federation_id: o.federation_id,
            job_id: o.job_id,
            round: o.round,
            base_model: o.base_model,
            arch: o.arch,
            training: o.training.into(),
            encoding: o.encoding,
            privacy: PrivacyRequirements {
                clip_norm: o.privacy.clip_norm,
                dp: o.privacy.dp,
                central_dp: None,
            },
            deadline_unix_ms: o.deadline_unix_ms,
            scaling: o.scaling,
        }))
    }
}

serde_codec!(Message);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Codec, DecodeError};

    #[test]
    fn every_reject_code_is_in_all_once_in_declaration_order() {
        for (i, code) in RejectCode::ALL.iter().enumerate() {
            // No wildcard: a new code makes this match fail to compile
            // until it is placed here and in `ALL`.
            let at = match code {
                RejectCode::UnsupportedVersion => 0,
                RejectCode::UnknownSite => 1,
                RejectCode::NotAuthorized => 2,
                RejectCode::WrongFederation => 3,
                RejectCode::UnexpectedMessage => 4,
                RejectCode::Malformed => 5,
                RejectCode::BadSignature => 6,
                RejectCode::ContextMismatch => 7,
                RejectCode::Replay => 8,
                RejectCode::PayloadMismatch => 9,
                RejectCode::TooLate => 10,
                RejectCode::Busy => 11,
                RejectCode::ShuttingDown => 12,
                RejectCode::Internal => 13,
            };
            assert_eq!(at, i, "{code:?}");
        }
    }

    #[test]
    fn negotiate() {
        let a = VersionRange { min: 1, max: 3 };
        assert_eq!(a.negotiate(&VersionRange { min: 2, max: 5 }), Some(3));
        assert_eq!(a.negotiate(&VersionRange { min: 4, max: 5 }), None);
        assert_eq!(
            VersionRange::SUPPORTED.negotiate(&VersionRange::SUPPORTED),
            Some(PROTOCOL_VERSION)
        );
        // a version-1 peer is still spoken to, without AuditHead
        let old = VersionRange { min: 1, max: 1 };
        assert_eq!(VersionRange::SUPPORTED.negotiate(&old), Some(1));
        assert!(!supports_audit_head(1));
        assert!(supports_audit_head(PROTOCOL_VERSION));
    }

    #[test]
    fn round_outcome_is_new_in_version_4_and_round_trips() {
        assert!(!supports_round_outcome(3));
        assert!(supports_round_outcome(PROTOCOL_VERSION));
        // a version-3 peer (the previous build) is still spoken to
        let v3 = VersionRange { min: 1, max: 3 };
        assert_eq!(VersionRange::SUPPORTED.negotiate(&v3), Some(3));
        let m = Message::RoundOutcome(RoundOutcome {
            job_id: JobId::new("job-1").unwrap(),
            round: RoundId(7),
            model: ModelHash([9; 32]),
            job_completed: true,
        });
        let bytes = m.to_vec();
        // appended after every older variant: old indices are unchanged
        assert_eq!(bytes[0], 14);
        assert_eq!(Message::decode_exact(&bytes).unwrap(), m);
        assert_eq!(m.name(), "RoundOutcome");
    }

    #[test]
    fn audit_head_layout() {
        let h = AuditHead {
            seq: 5,
            hash: [7; 32],
            ts_unix_ms: 1,
            sig: core::array::from_fn(|i| i as u8),
        };
        let bytes = Message::AuditHead(h).to_vec();
        // variant index 12, varint seq, 32 hash bytes, varint ts, 64 sig bytes
        assert_eq!(bytes.len(), 1 + 1 + 32 + 1 + 64);
        assert_eq!(bytes[0], 12);
        assert_eq!(&bytes[35..], &h.sig[..]);
        assert_eq!(
            Message::decode_exact(&bytes).unwrap(),
            Message::AuditHead(h)
        );
        assert_eq!(
            Message::decode_exact(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn downlink_messages_round_trip_at_the_end_of_the_enum_and_are_gated() {
        let fetch = Message::ModelUpdateFetch(ModelUpdateFetch {
            hash: ModelHash([1; 32]),
            base: ModelHash([2; 32]),
            from_record: 3,
        });
        let bytes = fetch.to_vec();
        // appended after every older variant: old indices are unchanged
        assert_eq!(bytes[0], 22);
        assert_eq!(Message::decode_exact(&bytes).unwrap(), fetch);
        assert_eq!(fetch.name(), "ModelUpdateFetch");
        let spec = ModelSpec::new(vec![crate::model::TensorSpec::f32("w", vec![4])]).unwrap();
        let manifest = Message::UpdateManifest(Box::new(UpdateManifest {
            base: ModelHash([2; 32]),
            hash: ModelHash([1; 32]),
            spec,
            encoding: Encoding::with_codec(ValueCodec::F16).unwrap(),
            payload_len: 10,
            num_chunks: 1,
        }));
        let bytes = manifest.to_vec();
        assert_eq!(bytes[0], 23);
        assert_eq!(Message::decode_exact(&bytes).unwrap(), manifest);
        assert_eq!(manifest.name(), "UpdateManifest");
        // Gating: a version-6 peer never sees them.
        assert!(!supports_downlink_updates(RESUME_VERSION));
        assert!(supports_downlink_updates(DOWNLINK_VERSION));
        assert!(supports_downlink_updates(PROTOCOL_VERSION));
        let v6 = VersionRange { min: 1, max: 6 };
        assert_eq!(VersionRange::SUPPORTED.negotiate(&v6), Some(6));
    }

    #[test]
    fn unknown_variant_is_an_error() {
        // variant index 200 (varint 0xC8 needs the 0xFB u16 marker? no: < 251 is one byte)
        assert!(matches!(
            Message::decode_exact(&[200]),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(Message::decode_exact(&[]), Err(DecodeError::Truncated));
    }

    /// A version-2 build's `TaskOffer` bytes (the committed fuzz seed) still
    /// decode, and re-encode byte for byte: the variant-3 layout is unchanged.
    #[test]
    fn version_2_offer_layout_is_unchanged() {
        let v2 = include_bytes!("../../fuzz/corpus/message/seed-2-TaskOffer");
        let msg = Message::decode_exact(v2).unwrap();
        let Message::TaskOffer(o) = &msg else {
            panic!("{}", msg.name())
        };
        assert_eq!(o.privacy.central_dp, None);
        assert_eq!(o.privacy.clip_norm, Some(1.0));
        assert_eq!(msg.to_vec(), v2.to_vec());
    }

    #[test]
    fn central_dp_travels_only_from_version_3() {
        let v2 = include_bytes!("../../fuzz/corpus/message/seed-2-TaskOffer");
        let Message::TaskOffer(mut o) = Message::decode_exact(v2).unwrap() else {
            panic!("not an offer")
        };
        let central = CentralDp {
            noise_multiplier: 1.1,
            target_delta: Some(1e-5),
        };
        o.privacy.central_dp = Some(central);
        assert!(o.validate().is_ok());

        let new = Message::task_offer((*o).clone(), CENTRAL_DP_VERSION);
        assert_eq!(new.name(), "TaskOfferV3");
        let back = Message::decode_exact(&new.to_vec()).unwrap();
        assert_eq!(
            back.as_task_offer().unwrap().privacy.central_dp,
            Some(central)
        );
        assert_eq!(back, new);

        // an older peer gets the old encoding, without central DP
        let old = Message::task_offer((*o).clone(), 2);
        assert_eq!(old.to_vec(), v2.to_vec());
        let back = Message::decode_exact(&old.to_vec()).unwrap();
        assert_eq!(back.as_task_offer().unwrap().privacy.central_dp, None);

        // central DP needs the clip norm (the sensitivity) and real noise
        let mut bad = (*o).clone();
        bad.privacy.clip_norm = None;
        bad.privacy.dp = None;
        assert_eq!(bad.validate(), Err(OfferError::DpWithoutClip));
        let mut bad = (*o).clone();
        bad.privacy.central_dp = Some(CentralDp {
            noise_multiplier: 0.0,
            target_delta: None,
        });
        assert!(bad.validate().is_err());
    }

    /// A version-5 offer: a depth-5 U-Net with augmentation.
    fn v5_offer() -> TaskOffer {
        let v2 = include_bytes!("../../fuzz/corpus/message/seed-2-TaskOffer");
        let Message::TaskOffer(mut o) = Message::decode_exact(v2).unwrap() else {
            panic!("not an offer")
        };
        o.arch = ArchSpec::UNet {
            in_channels: 1,
            base_channels: 4,
            depth: 5,
            classes: 2,
        };
        o.scaling = None;
        o.training.augmentation = Some(Augmentation {
            flips: true,
            rotate90: false,
            intensity_jitter: Some(IntensityJitter {
                scale: 0.1,
                shift: 0.05,
            }),
        });
        *o
    }

    #[test]
    fn class_weight_travels_only_from_version_6() {
        let mut o = v5_offer();
        o.training.class_weight = ClassWeight::Balanced;
        assert!(o.validate().is_ok());
        assert_eq!(o.min_protocol_version(), CLASS_WEIGHT_VERSION);
        assert_eq!(
            class_weight_min_version(ClassWeight::None),
            MIN_PROTOCOL_VERSION
        );

        let new = Message::task_offer(o.clone(), CLASS_WEIGHT_VERSION);
        assert_eq!(new.name(), "TaskOfferV6");
        let bytes = new.to_vec();
        // appended after every older variant
        assert_eq!(bytes[0], 21);
        let back = Message::decode_exact(&bytes).unwrap();
        assert_eq!(back.as_task_offer(), Some(&o));

        // a version-5 peer gets TaskOfferV5 without class weighting, the
        // rest of the offer unchanged
        let old = Message::task_offer(o.clone(), TRAINING_V5_VERSION);
        assert_eq!(old.name(), "TaskOfferV5");
        let back = Message::decode_exact(&old.to_vec()).unwrap();
        let mut want = o.clone();
        want.training.class_weight = ClassWeight::None;
        assert_eq!(back.as_task_offer(), Some(&want));
        // The version-5 layout is the version-6 one without the class
        // weight (one byte, the variant index, right after
        // `training.augmentation`): the v5 bytes are what they were.
        let v5 = old.to_vec();
        let v6 = Message::task_offer(want.clone(), CLASS_WEIGHT_VERSION).to_vec();
        assert_eq!((v5[0], v6[0]), (15, 21));
        assert_eq!(v6.len(), v5.len() + 1);
        let at = (1..v5.len()).find(|&i| v5[i] != v6[i]).unwrap_or(v5.len());
        assert!(
            (1..=at).any(|i| v6[i] == 0 && v5[1..i] == v6[1..i] && v5[i..] == v6[i + 1..]),
            "v5 is v6 minus one byte"
        );
        // and older peers never see it either
        for version in [2, CENTRAL_DP_VERSION, ROUND_OUTCOME_VERSION] {
            let back =
                Message::decode_exact(&Message::task_offer(o.clone(), version).to_vec()).unwrap();
            assert_eq!(
                back.as_task_offer().unwrap().training.class_weight,
                ClassWeight::None
            );
        }
    }

    #[test]
    fn augmentation_travels_only_from_version_5() {
        let o = v5_offer();
        assert!(o.validate().is_ok());
        assert_eq!(o.min_protocol_version(), TRAINING_V5_VERSION);

        let new = Message::task_offer(o.clone(), TRAINING_V5_VERSION);
        assert_eq!(new.name(), "TaskOfferV5");
        let bytes = new.to_vec();
        // appended after every older variant
        assert_eq!(bytes[0], 15);
        let back = Message::decode_exact(&bytes).unwrap();
        assert_eq!(back.as_task_offer(), Some(&o));

        // a version-4 peer gets TaskOfferV3, without augmentation; the rest
        // of the offer is unchanged
        let old = Message::task_offer(o.clone(), ROUND_OUTCOME_VERSION);
        assert_eq!(old.name(), "TaskOfferV3");
        let back = Message::decode_exact(&old.to_vec()).unwrap();
        let mut want = o.clone();
        want.training.augmentation = None;
        assert_eq!(back.as_task_offer(), Some(&want));
        // and the version-3/4 layout is the one TaskOffer without
        // augmentation had: the same bytes whatever augmentation says
        assert_eq!(
            Message::task_offer(want.clone(), ROUND_OUTCOME_VERSION).to_vec(),
            old.to_vec()
        );
        // the version-2 seed still re-encodes byte for byte at version 4
        // after the round trip through the new TrainingConfig
        let v2 = include_bytes!("../../fuzz/corpus/message/seed-2-TaskOffer");
        let seed = Message::decode_exact(v2).unwrap();
        let seed = seed.as_task_offer().unwrap().clone();
        assert_eq!(seed.training.augmentation, None);
        assert_eq!(seed.min_protocol_version(), MIN_PROTOCOL_VERSION);
        assert_eq!(Message::task_offer(seed, 2).to_vec(), v2.to_vec());
    }

    #[test]
    fn deep_unet_needs_version_5_depth_2_does_not() {
        let mut o = v5_offer();
        o.training.augmentation = None;
        assert_eq!(o.min_protocol_version(), TRAINING_V5_VERSION);
        o.arch = ArchSpec::UNet {
            in_channels: 1,
            base_channels: 4,
            depth: 2,
            classes: 2,
        };
        assert_eq!(o.min_protocol_version(), MIN_PROTOCOL_VERSION);
        o.training.augmentation = v5_offer().training.augmentation;
        assert_eq!(o.min_protocol_version(), TRAINING_V5_VERSION);
    }

    #[test]
    fn augmentation_bounds_are_checked_naming_the_field() {
        for (scale, shift, field) in [
            (0.6, 0.0, "augmentation.intensity_jitter.scale"),
            (-0.1, 0.0, "augmentation.intensity_jitter.scale"),
            (f64::NAN, 0.0, "augmentation.intensity_jitter.scale"),
            (0.1, 0.51, "augmentation.intensity_jitter.shift"),
        ] {
            let mut o = v5_offer();
            o.training.augmentation = Some(Augmentation {
                flips: false,
                rotate90: true,
                intensity_jitter: Some(IntensityJitter { scale, shift }),
            });
            assert_eq!(o.validate(), Err(OfferError::OutOfRange { field }));
        }
    }

    #[test]
    fn bad_ids_in_messages_are_refused() {
        let w = Message::Welcome(Welcome {
            protocol_version: 1,
            site_id: SiteId::new("site-a").unwrap(),
            federation_id: FederationId::new("fed").unwrap(),
            heartbeat_interval_ms: 1000,
        });
        let mut bytes = w.to_vec();
        // "site-a" → "site a"
        let pos = bytes.windows(6).position(|w| w == b"site-a").unwrap();
        bytes[pos + 4] = b' ';
        assert!(matches!(
            Message::decode_exact(&bytes),
            Err(DecodeError::Malformed(_))
        ));
    }
}
