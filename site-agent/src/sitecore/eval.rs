//! The answer to an evaluation request (protocol 6), without IO.
//!
//! After a job's last round the coordinator asks each site to evaluate the
//! final model on its validation split ([`EvalRequest`]). The decisions
//! live here; the driver ([`crate::agent`]) only obtains the model (with
//! [`super::download`]), runs [`evaluate`] on the blocking pool with a
//! [`BurnTrainer`](crate::train::BurnTrainer), appends the record and
//! sends the report:
//!
//! 1. [`check_request`]: a request for another federation is refused; the
//!    architecture it names gives the spec of the model to obtain;
//! 2. [`evaluate`]: the model obtained must be the one asked for (its hash);
//!    it is evaluated, by the trainer set up only then, on the validation samples (standardised with the
//!    request's scaling by the caller; never the training data, never
//!    augmented); a site without validation samples evaluates nothing;
//! 3. [`answer`]: the signed [`SignedEvalReport`](fedlink_protocol::SignedEvalReport)
//!    (0 examples when nothing was evaluated: the coordinator leaves the
//!    site out) and its [`SiteEvent::EvalReported`](crate::audit::SiteEvent::EvalReported)
//!    record, appended before the report leaves.
//!
//! ```text
//!  EvalRequest ─check_request(session)─▶ ModelSpec ─▶ (driver: obtain the model)
//!                                                        │
//!          evaluate(Trainer, req, model, data) ◀─────────┘
//!                  │ Option<EvalMetrics>
//!                  ▼
//!          answer(session, req, metrics, key) ─▶ SealedReport { report, reported }
//! ```

use ed25519_dalek::SigningKey;
use fedlink_protocol::arch::ArchError;
use fedlink_protocol::{EvalRequest, FederationId, FlatModel, ModelHash, ModelSpec};

use super::Session;
use super::task::{SealedReport, seal_eval_report};
use crate::data::LocalData;
use crate::train::{EvalMetrics, TrainError, Trainer};

/// Why an evaluation request is not answered.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The request names another federation than the session's.
    #[error("evaluation request for federation {asked}, this site is in {ours}")]
    OtherFederation {
        /// The request's federation.
        asked: FederationId,
        /// This site's.
        ours: FederationId,
    },
    /// The request names an architecture this agent cannot build.
    #[error("requested architecture: {0}")]
    Architecture(#[source] ArchError),
    /// The model handed in is not the one the request names.
    #[error("the model to evaluate is {got}, the request names {asked}")]
    WrongModel {
        /// The request's model.
        asked: ModelHash,
        /// The hash of the model handed in.
        got: ModelHash,
    },
    /// The evaluation itself failed.
    #[error("evaluation: {0}")]
    Train(#[from] TrainError),
}

/// Whether `req` is for this session's federation; the spec of the model
/// it asks about (to obtain it with).
pub fn check_request(session: &Session, req: &EvalRequest) -> Result<ModelSpec, EvalError> {
    if req.federation_id != session.federation_id {
        return Err(EvalError::OtherFederation {
            asked: req.federation_id.clone(),
            ours: session.federation_id.clone(),
        });
    }
    req.arch.spec().map_err(EvalError::Architecture)
}

/// The metrics of `model` (which must hash to `req.model`) on
/// `data.validation`, with the trainer `make_trainer` sets up; `None` when
/// the site has no validation samples (nothing is evaluated then, and no
/// trainer, hence no device, is set up).
pub fn evaluate<T, E>(
    make_trainer: impl FnOnce() -> Result<T, E>,
    req: &EvalRequest,
    model: &FlatModel,
    data: &LocalData,
) -> Result<Option<EvalMetrics>, E>
where
    T: Trainer,
    E: From<EvalError>,
{
    let got = model.hash();
    if got != req.model {
        return Err(EvalError::WrongModel {
            asked: req.model,
            got,
        }
        .into());
    }
    if data.validation.is_empty() {
        return Ok(None);
    }
    let trainer = make_trainer()?;
    let metrics = trainer
        .evaluate(&req.arch, model, &data.validation)
        .map_err(EvalError::from)?;
    Ok(Some(metrics))
}

/// The signed answer to `req` and the audit record to append before it is
/// sent (see [`seal_eval_report`]).
pub fn answer(
    session: &Session,
    req: &EvalRequest,
    metrics: Option<&EvalMetrics>,
    key: &SigningKey,
) -> SealedReport {
    seal_eval_report(session, req, metrics, key)
}

#[cfg(test)]
mod tests;
