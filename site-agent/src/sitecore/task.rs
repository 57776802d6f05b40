//! The round's work, without IO: train → delta → clip/noise → audit record
//! → signed envelope.
//!
//! The driver ([`crate::agent`]) obtains the global model (cache or
//! download), runs [`train_round`] on the blocking pool with a
//! [`BurnTrainer`](crate::train::BurnTrainer), and then calls, in order:
//!
//! 1. [`make_update`]: `delta = local − global`, its L2 norm, clipping to
//!    the offer's `clip_norm` and, when the offer asks for local DP,
//!    Gaussian noise from the source passed in (the OS-seeded
//!    [`NoiseRng`] in production, a seeded one in tests);
//! 2. [`train_completed`]: the audit record of the training, appended
//!    before anything leaves;
//! 3. `encode_payload` (protocol) with the offer's encoding, then
//!    [`seal_update`]: the signed [`SignedEnvelope`] and its
//!    [`SiteEvent::UpdateSent`] record, appended before the first byte of
//!    the upload is sent.
//!
//! An evaluation request's answer is sealed the same way:
//! [`seal_eval_report`] gives the signed report and its
//! [`SiteEvent::EvalReported`] record ([`super::eval`] decides the rest of
//! that request).
//!
//! The coordinator's answer to the upload becomes the
//! [`SiteEvent::UpdateResult`] record through [`upload_answered`], which
//! also refuses an acknowledgement of another payload.
//!
//! Nothing here reads the clock, draws randomness of its own, or touches a
//! socket or file; the functions are tested with a deterministic
//! [`Trainer`] and no burn.
//!
//! ```text
//!  global ─┐                      ┌─ Trained { global_eval, local, report }
//!  data ───┼─ train_round(Trainer)┘          │
//!  cfg ────┘                                 ▼
//!            make_update(privacy, global, local, noise) ─▶ Update { delta, norms, clipped, dp_noise }
//!                                            │                 │
//!                      train_completed(..) ◀─┘                 ▼ encode_payload (protocol)
//!                                                   seal_update(..) ─▶ Sealed { envelope, sent }
//! ```

use ed25519_dalek::SigningKey;
use fedlink_aggregation::AggregationError;
use fedlink_aggregation::dp::NoiseRng;
use fedlink_protocol::arch::ArchSpec;
use fedlink_protocol::{
    EvalReport, EvalRequest, FeatureStats, FlatModel, ModelError, PayloadHash, PayloadSummary,
    PrivacyRequirements, RejectCode, SignedEnvelope, SignedEvalReport, TaskOffer, UpdateHeader,
    UpdateNonce, UploadResult, sign_eval_report, sign_update,
};

use super::Session;
use crate::audit::{SiteEvent, site};
use crate::data::LocalData;
use crate::train::{EvalMetrics, TrainConfig, TrainError, TrainReport, Trainer};

/// What local training produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Trained {
    /// The global model on the site's validation samples (`None` when the
    /// site has no validation samples).
    pub global_eval: Option<EvalMetrics>,
    /// The locally trained weights.
    pub local: FlatModel,
    /// What the training did.
    pub report: TrainReport,
}

/// Evaluate `global` on `data.validation` (skipped when it is empty), then
/// train from `global` on `data.train`.
pub fn train_round<T: Trainer + ?Sized>(
    trainer: &T,
    arch: &ArchSpec,
    global: &FlatModel,
    data: &LocalData,
    cfg: &TrainConfig,
) -> Result<Trained, TrainError> {
    let global_eval = if data.validation.is_empty() {
        None
    } else {
        Some(trainer.evaluate(arch, global, &data.validation)?)
    };
    let (local, report) = trainer.train_local(arch, global, &data.train, cfg)?;
    Ok(Trained {
        global_eval,
        local,
        report,
    })
}

/// Why an update could not be computed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The trained model's layout is not the global model's.
    #[error("trained model layout differs from the global model")]
    LayoutMismatch,
    /// The delta does not fit the model layout (cannot happen once the
    /// layouts match; kept typed rather than assumed).
    #[error("delta: {0}")]
    Delta(#[source] ModelError),
    /// The DP noise source could not be seeded.
    #[error("noise source: {0}")]
    Noise(#[source] AggregationError),
}

/// The update a round sends, before encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    /// `local − global`, clipped and noised as the offer asks.
    pub delta: FlatModel,
    /// ‖local − global‖₂ before clipping (the audit record's `delta_norm`).
    pub norm: f64,
    /// ‖Δ‖₂ after clipping, before noise.
    pub clipped_norm: f64,
    /// Whether clipping scaled the delta.
    pub clipped: bool,
    /// Whether DP noise was added (`privacy.dp` with a positive multiplier
    /// and a clip norm).
    pub dp_noise: bool,
}

/// L2 norm of `v`, accumulated in f64.
pub fn l2_norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// Scale `delta` by `min(1, clip / ‖delta‖₂)`; returns whether it was
/// scaled.
pub fn clip_l2(delta: &mut [f32], clip: f64) -> bool {
    let norm = l2_norm(delta);
    if !(norm > clip && clip > 0.0) {
        return false;
    }
    let scale = clip / norm;
    for v in delta {
        *v = (f64::from(*v) * scale) as f32;
    }
    true
}

/// `delta = local − global`, then the offer's clipping (`privacy.clip_norm`)
/// and local DP noise (`privacy.dp`, standard deviation `z · C`, only with a
/// clip norm). `noise` is called only when noise is to be added.
pub fn make_update(
    privacy: &PrivacyRequirements,
    global: &FlatModel,
    local: &FlatModel,
    noise: impl FnOnce() -> Result<NoiseRng, AggregationError>,
) -> Result<Update, UpdateError> {
    if local.spec() != global.spec() {
        return Err(UpdateError::LayoutMismatch);
    }
    let mut delta: Vec<f32> = local
        .values()
        .iter()
        .zip(global.values())
        .map(|(l, g)| l - g)
        .collect();
    let norm = l2_norm(&delta);
    let clipped = privacy.clip_norm.is_some_and(|c| clip_l2(&mut delta, c));
    let clipped_norm = if clipped { l2_norm(&delta) } else { norm };
    let mut dp_noise = false;
    if let (Some(dp), Some(c)) = (privacy.dp, privacy.clip_norm) {
        let mut rng = noise().map_err(UpdateError::Noise)?;
        rng.add_gaussian(&mut delta, dp.noise_multiplier * c);
        dp_noise = dp.noise_multiplier > 0.0;
    }
    let delta = FlatModel::new(global.spec().clone(), delta).map_err(UpdateError::Delta)?;
    Ok(Update {
        delta,
        norm,
        clipped_norm,
        clipped,
        dp_noise,
    })
}

/// Metrics as they go into the signed header (non-finite values left out).
pub fn eval_to_protocol(m: &EvalMetrics) -> fedlink_protocol::EvalMetrics {
    let finite = |v: f64| v.is_finite().then_some(v);
    fedlink_protocol::EvalMetrics {
        num_eval_examples: m.n as u64,
        loss: finite(m.loss),
        accuracy: finite(m.accuracy),
        auc: m.auc.and_then(finite),
        dice: m.dice.and_then(finite),
        extra: Vec::new(),
    }
}

/// The audit record of a finished training: appended before the update is
/// encoded and sent. `global_eval` is the metrics as they go into the header
/// ([`eval_to_protocol`]); `feature_scaling` is `"none"`, `"federated"` or
/// `"local"`.
pub fn train_completed(
    offer: &TaskOffer,
    dataset_fingerprint: String,
    report: &TrainReport,
    global_eval: Option<&fedlink_protocol::EvalMetrics>,
    update: &Update,
    feature_scaling: &str,
) -> SiteEvent {
    SiteEvent::TrainCompleted(site::TrainCompleted {
        job: offer.job_id.clone(),
        round: offer.round,
        base_model: offer.base_model.to_hex(),
        dataset_fingerprint,
        num_examples: report.samples as u64,
        metrics: serde_json::json!({
            "epochs": report.epoch_loss.len(),
            "epoch_loss": report.epoch_loss,
            "duration_ms": u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX),
            "global_eval": global_eval.map(|m| serde_json::json!({
                "n": m.num_eval_examples,
                "loss": m.loss,
                "accuracy": m.accuracy,
                "auc": m.auc,
                "dice": m.dice,
            })),
            "delta_norm": update.norm,
        }),
        clipped: update.clipped,
        dp_noise: update.dp_noise,
        feature_scaling: feature_scaling.to_owned(),
    })
}

/// What the signed header claims besides the payload and the offer.
#[derive(Clone, Debug, PartialEq)]
pub struct Claims {
    /// Training examples (the aggregation weight).
    pub num_examples: u64,
    /// The global model's metrics on the validation samples.
    pub metrics: Option<fedlink_protocol::EvalMetrics>,
    /// The training split's feature statistics (CSV data).
    pub feature_stats: Option<FeatureStats>,
    /// The header's nonce (fresh from the OS in production).
    pub nonce: UpdateNonce,
}

/// A signed update and the audit record to append before sending it.
#[derive(Clone, Debug)]
pub struct Sealed {
    /// The signed header.
    pub envelope: SignedEnvelope,
    /// [`SiteEvent::UpdateSent`] for `envelope`.
    pub sent: SiteEvent,
}

/// Sign the header of the encoded update (`summary` from `encode_payload`
/// with `offer.encoding`) for `offer` in `session`, and build its
/// [`SiteEvent::UpdateSent`] record.
pub fn seal_update(
    session: &Session,
    offer: &TaskOffer,
    summary: &PayloadSummary,
    claims: Claims,
    key: &SigningKey,
) -> Sealed {
    let header = UpdateHeader {
        protocol_version: session.protocol_version,
        federation_id: session.federation_id.clone(),
        site_id: session.site_id.clone(),
        job_id: offer.job_id.clone(),
        round: offer.round,
        base_model: offer.base_model,
        num_examples: claims.num_examples,
        encoding: offer.encoding,
        payload_len: summary.payload_len,
        payload_hash: summary.payload_hash,
        nonce: claims.nonce,
        metrics: claims.metrics,
        feature_stats: claims.feature_stats,
    };
    let envelope = sign_update(key, header);
    let sent = update_sent(&envelope);
    Sealed { envelope, sent }
}

/// The [`SiteEvent::UpdateSent`] record of `envelope`: every value from its
/// signed header.
pub fn update_sent(envelope: &SignedEnvelope) -> SiteEvent {
    let h = &envelope.header;
    SiteEvent::UpdateSent(site::UpdateSent {
        job: h.job_id.clone(),
        round: h.round,
        payload_hash: h.payload_hash.to_hex(),
        payload_bytes: h.payload_len,
        num_examples: h.num_examples,
        nonce: hex::encode(h.nonce.0),
        base_model: h.base_model.to_hex(),
        encoding: h.encoding.name(),
        feature_stats: h.feature_stats.is_some(),
    })
}

/// A signed evaluation report and the audit record to append before it
/// leaves.
#[derive(Clone, Debug)]
pub struct SealedReport {
    /// The signed report.
    pub report: SignedEvalReport,
    /// [`SiteEvent::EvalReported`] for `report`.
    pub reported: SiteEvent,
}

/// Sign the answer to `req`: the metrics of the requested model on the
/// site's validation samples (`None`: the site has none, reported as 0
/// examples), and build its [`SiteEvent::EvalReported`] record from the
/// report itself.
pub fn seal_eval_report(
    session: &Session,
    req: &EvalRequest,
    metrics: Option<&EvalMetrics>,
    key: &SigningKey,
) -> SealedReport {
    let metrics = metrics.map(eval_to_protocol).unwrap_or_default();
    let report = sign_eval_report(
        key,
        EvalReport {
            protocol_version: session.protocol_version,
            federation_id: session.federation_id.clone(),
            site_id: session.site_id.clone(),
            job_id: req.job_id.clone(),
            round: req.round,
            model: req.model,
            metrics,
        },
    );
    let r = &report.report;
    let reported = SiteEvent::EvalReported(site::EvalReported {
        job: r.job_id.clone(),
        round: r.round,
        model: r.model.to_hex(),
        num_eval_examples: r.metrics.num_eval_examples,
        loss: r.metrics.loss,
        accuracy: r.metrics.accuracy,
        auc: r.metrics.auc,
        dice: r.metrics.dice,
    });
    SealedReport { report, reported }
}

/// Longest free text from the coordinator that is logged.
pub const MAX_LOGGED_TEXT: usize = 512;

/// `s` cut to [`MAX_LOGGED_TEXT`] bytes on a char boundary, `…` appended
/// when cut.
pub fn truncate(s: &str) -> String {
    if s.len() <= MAX_LOGGED_TEXT {
        return s.to_owned();
    }
    let mut end = MAX_LOGGED_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A rejection code as logged.
pub fn reject_code(code: RejectCode) -> String {
    format!("{code:?}")
}

/// The coordinator acknowledged a payload other than the one sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("acknowledged payload {acknowledged}, sent {sent}")]
pub struct WrongAck {
    /// The payload hash in the acknowledgement.
    pub acknowledged: PayloadHash,
    /// The payload hash of the signed header sent.
    pub sent: PayloadHash,
}

/// The [`SiteEvent::UpdateResult`] record of the coordinator's answer to
/// the upload of `envelope`; an acknowledgement of another payload is a
/// [`WrongAck`] (nothing is recorded).
pub fn upload_answered(
    envelope: &SignedEnvelope,
    result: &UploadResult,
) -> Result<SiteEvent, WrongAck> {
    let h = &envelope.header;
    let (outcome, accepted, reason) = match result {
        UploadResult::Ack {
            payload_hash,
            accepted,
        } => {
            if *payload_hash != h.payload_hash {
                return Err(WrongAck {
                    acknowledged: *payload_hash,
                    sent: h.payload_hash,
                });
            }
            ("ack", *accepted, None)
        }
        UploadResult::Reject { code, message } => (
            "reject",
            false,
            Some(format!("{}: {}", reject_code(*code), truncate(message))),
        ),
    };
    Ok(SiteEvent::UpdateResult(site::UpdateResult {
        job: h.job_id.clone(),
        round: h.round,
        payload_hash: h.payload_hash.to_hex(),
        nonce: hex::encode(h.nonce.0),
        outcome: outcome.to_owned(),
        accepted,
        reason,
    }))
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod sim;
