//! The agent's sans-IO core: what to do with each control message.
//!
//! [`SiteCore`] decides, without sockets or clocks, how to answer offers and
//! cancels, which round is being worked on, and when heartbeats are due.
//! [`Backoff`] computes reconnection delays from a caller-supplied jitter
//! sample. The tokio/quinn driver ([`crate::agent`]) moves the bytes, runs
//! the work and feeds the results back.
//!
//! # How to drive it
//!
//! 1. After `Welcome`, call [`SiteCore::on_welcome`] with the current
//!    `Instant`.
//! 2. For each `TaskOffer` call [`SiteCore::on_offer`]; append its
//!    `received` and `decided` records (`offer.received`, then
//!    `offer.accepted` or `offer.declined`), then send the response; if it
//!    names an [`Abort`], append its `round.cancelled` record, then drop
//!    that round's work; start the work in `start` (if any).
//! 3. For each `Cancel` call [`SiteCore::on_cancel`]; append its
//!    `round.cancelled` record, then drop the work it names (if any).
//! 4. When the work for a round ends (uploaded, rejected or failed), call
//!    [`SiteCore::on_task_finished`].
//! 5. Sleep until [`SiteCore::next_heartbeat`], then send what
//!    [`SiteCore::poll_heartbeat`] returns.
//! 6. When the connection ends, call [`SiteCore::on_disconnect`] (and drop
//!    the work in progress).
//!
//! Time passed in must never go backwards.
//!
//! The work on an accepted round (train → delta → clip/noise → audit
//! record → signed envelope) is in [`task`], also without IO; obtaining
//! the round's global model (cache, downlink update, whole model, resumed
//! download) in [`download`]; the upload of the signed update (fresh or
//! resumed, signed again after a `Replay` refusal) in [`upload`]; the
//! answer to an evaluation request (federation check, the model asked for
//! by hash, evaluated on the validation split, signed report and its
//! record) in [`eval`].

pub mod download;
pub mod eval;
pub mod task;
pub mod upload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fedlink_protocol::{
    Cancel, ClassWeight, FederationId, Heartbeat, JobId, ModelHash, OfferDecision, OfferResponse,
    Optimizer, RoundId, SiteId, TaskOffer, TrainingConfig, VersionRange, Welcome,
};

use crate::audit::{SiteEvent, site};
use crate::data::SiteData;
use crate::policy::{self, OfferContext, Policy, Refusal};
use crate::train::{self, ClassWeighting, OptimizerKind, TrainConfig};

/// Shortest heartbeat interval honoured (a coordinator asking for less gets
/// this).
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// Longest heartbeat interval honoured.
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);

/// A round of a job.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TaskKey {
    /// Job.
    pub job_id: JobId,
    /// Round.
    pub round: RoundId,
}

impl std::fmt::Display for TaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job {} round {}", self.job_id, self.round)
    }
}

/// What the coordinator told us in `Welcome`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// Our site id, as the coordinator knows it (goes into signed headers).
    pub site_id: SiteId,
    /// The coordinator's federation.
    pub federation_id: FederationId,
    /// Negotiated protocol version.
    pub protocol_version: u16,
    /// Heartbeat interval (clamped to [`MIN_HEARTBEAT`]..=[`MAX_HEARTBEAT`]).
    pub heartbeat_interval: Duration,
}

/// An accepted round to work on.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// The offer.
    pub offer: TaskOffer,
    /// Local training hyperparameters derived from it.
    pub train: TrainConfig,
}

impl Assignment {
    /// The round.
    pub fn key(&self) -> TaskKey {
        TaskKey {
            job_id: self.offer.job_id.clone(),
            round: self.offer.round,
        }
    }
}

/// What to do about an offer, in this order: append `received`, append
/// `decided`, send `response`, append `abort`'s record and drop its work,
/// start `start`.
#[derive(Clone, Debug, PartialEq)]
pub struct OfferOutcome {
    /// The `offer.received` record (the offer's terms, for the auditor):
    /// appended first.
    pub received: SiteEvent,
    /// The `offer.accepted` or `offer.declined` record of `response`:
    /// appended before `response` is sent.
    pub decided: SiteEvent,
    /// Send this now (before any work).
    pub response: OfferResponse,
    /// The refusal behind a decline, for the site log.
    pub refusal: Option<Refusal>,
    /// The work on an older round of the job that this offer supersedes.
    pub abort: Option<Abort>,
    /// Start this work (`None` on decline, or when the offer repeats the
    /// round already in progress).
    pub start: Option<Assignment>,
}

/// Drop the work on a round, after appending the record that says so.
#[derive(Clone, Debug, PartialEq)]
pub struct Abort {
    /// The round whose work goes.
    pub key: TaskKey,
    /// Its `round.cancelled` record (`dropped_work: true`): appended before
    /// the work is dropped.
    pub cancelled: SiteEvent,
}

/// What to do about a `Cancel`: append `cancelled`, then drop the work on
/// `drop` (if any).
#[derive(Clone, Debug, PartialEq)]
pub struct CancelOutcome {
    /// The `round.cancelled` record; `dropped_work` says whether `drop` is
    /// set.
    pub cancelled: SiteEvent,
    /// The round in progress, when it is the one cancelled.
    pub drop: Option<TaskKey>,
}

/// A protocol violation by the coordinator.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// `Welcome` names a version we do not speak.
    #[error("coordinator chose protocol version {0}, this agent speaks {min}..={max}", min = VersionRange::SUPPORTED.min, max = VersionRange::SUPPORTED.max)]
    UnsupportedVersion(u16),
}

#[derive(Clone, Debug)]
struct Active {
    key: TaskKey,
    base_model: ModelHash,
}

/// The sans-IO decision core of one agent (see the module docs).
#[derive(Debug)]
pub struct SiteCore {
    policy: Policy,
    data: Arc<SiteData>,
    session: Option<Session>,
    active: Option<Active>,
    heartbeat_seq: u64,
    next_heartbeat: Option<Instant>,
}

impl SiteCore {
    /// A core enforcing `policy` for a site holding `data`.
    pub fn new(policy: Policy, data: Arc<SiteData>) -> Self {
        Self {
            policy,
            data,
            session: None,
            active: None,
            heartbeat_seq: 0,
            next_heartbeat: None,
        }
    }

    /// The current session, if welcomed.
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// The round being worked on.
    pub fn active(&self) -> Option<&TaskKey> {
        self.active.as_ref().map(|a| &a.key)
    }

    /// The coordinator welcomed us.
    pub fn on_welcome(&mut self, now: Instant, welcome: &Welcome) -> Result<&Session, CoreError> {
        if !VersionRange::SUPPORTED.contains(welcome.protocol_version) {
            return Err(CoreError::UnsupportedVersion(welcome.protocol_version));
        }
        let interval = Duration::from_millis(welcome.heartbeat_interval_ms)
            .clamp(MIN_HEARTBEAT, MAX_HEARTBEAT);
        self.next_heartbeat = Some(now + interval);
        Ok(self.session.insert(Session {
            site_id: welcome.site_id.clone(),
            federation_id: welcome.federation_id.clone(),
            protocol_version: welcome.protocol_version,
            heartbeat_interval: interval,
        }))
    }

    /// Decide about an offer (`now_unix_ms`: wall clock, for the deadline).
    pub fn on_offer(&mut self, now_unix_ms: u64, offer: &TaskOffer) -> OfferOutcome {
        let key = TaskKey {
            job_id: offer.job_id.clone(),
            round: offer.round,
        };
        let accept = || OfferOutcome {
            received: offer_received(offer),
            decided: SiteEvent::OfferAccepted(site::OfferAccepted {
                job: offer.job_id.clone(),
                round: offer.round,
            }),
            response: OfferResponse {
                job_id: offer.job_id.clone(),
                round: offer.round,
                decision: OfferDecision::Accept,
            },
            refusal: None,
            abort: None,
            start: None,
        };
        let decline = |refusal: Refusal| {
            let reason = refusal.to_string();
            OfferOutcome {
                received: offer_received(offer),
                decided: SiteEvent::OfferDeclined(site::OfferDeclined {
                    job: offer.job_id.clone(),
                    round: offer.round,
                    reason: reason.clone(),
                }),
                response: OfferResponse {
                    job_id: offer.job_id.clone(),
                    round: offer.round,
                    decision: OfferDecision::Decline { reason },
                },
                refusal: Some(refusal),
                abort: None,
                start: None,
            }
        };
        let mut abort = None;
        if let Some(active) = &self.active {
            if active.key == key && active.base_model == offer.base_model {
                // A repeated offer (e.g. after the coordinator restarted its
                // connection handling): keep working.
                return accept();
            }
            if active.key.job_id == key.job_id && active.key.round < key.round {
                // The job moved on: the older round is over.
                abort = Some(Abort {
                    key: active.key.clone(),
                    cancelled: SiteEvent::RoundCancelled(site::RoundCancelled {
                        job: active.key.job_id.clone(),
                        round: active.key.round,
                        reason: format!("superseded by round {}", offer.round),
                        dropped_work: true,
                    }),
                });
            } else {
                return decline(Refusal::Unsupported(format!(
                    "busy with {} of this site",
                    active.key
                )));
            }
        }
        let ctx = OfferContext {
            now_unix_ms,
            welcomed_federation: self.session.as_ref().map(|s| &s.federation_id),
            train_samples: self.data.local().train.len(),
        };
        let stream = self
            .session
            .as_ref()
            .map(|s| train::augment::site_stream(s.site_id.as_str()));
        let checked = policy::evaluate(&self.policy, offer, &ctx)
            .and_then(|()| train_config(&offer.training))
            .and_then(|mut train| {
                train.augment_stream = stream;
                train::check_data(&offer.arch, &self.data.local().train)
                    .map_err(|e| Refusal::Unsupported(format!("local data: {e}")))?;
                self.data
                    .check_scaling(offer.scaling.as_ref())
                    .map_err(|e| Refusal::Unsupported(format!("feature scaling: {e}")))?;
                Ok(train)
            });
        match checked {
            Err(refusal) => decline(refusal),
            Ok(train) => {
                if abort.is_some() {
                    self.active = None;
                }
                self.active = Some(Active {
                    key,
                    base_model: offer.base_model,
                });
                OfferOutcome {
                    abort,
                    start: Some(Assignment {
                        offer: offer.clone(),
                        train,
                    }),
                    ..accept()
                }
            }
        }
    }

    /// The coordinator cancelled a round: its record, and the work to drop
    /// when it is the round in progress.
    pub fn on_cancel(&mut self, cancel: &Cancel) -> CancelOutcome {
        let drop = self
            .active
            .take_if(|a| a.key.job_id == cancel.job_id && a.key.round == cancel.round)
            .map(|a| a.key);
        CancelOutcome {
            cancelled: SiteEvent::RoundCancelled(site::RoundCancelled {
                job: cancel.job_id.clone(),
                round: cancel.round,
                reason: task::truncate(&cancel.reason),
                dropped_work: drop.is_some(),
            }),
            drop,
        }
    }

    /// The work for `key` ended.
    pub fn on_task_finished(&mut self, key: &TaskKey) {
        if self.active.as_ref().is_some_and(|a| a.key == *key) {
            self.active = None;
        }
    }

    /// The connection ended: no session, no work in progress.
    pub fn on_disconnect(&mut self) {
        self.session = None;
        self.active = None;
        self.next_heartbeat = None;
    }

    /// When the next heartbeat is due (`None` when not connected).
    pub fn next_heartbeat(&self) -> Option<Instant> {
        self.next_heartbeat
    }

    /// The heartbeat to send now, if one is due.
    pub fn poll_heartbeat(&mut self, now: Instant, now_unix_ms: u64) -> Option<Heartbeat> {
        let due = self.next_heartbeat?;
        let interval = self.session.as_ref()?.heartbeat_interval;
        if now < due {
            return None;
        }
        // Skip missed beats instead of bursting them.
        let mut next = due + interval;
        if next <= now {
            next = now + interval;
        }
        self.next_heartbeat = Some(next);
        self.heartbeat_seq += 1;
        Some(Heartbeat {
            seq: self.heartbeat_seq,
            now_unix_ms,
        })
    }
}

/// The `offer.received` record of `offer`: the terms an auditor needs to
/// reproduce the training (the base model, architecture, epochs, encoding,
/// privacy, augmentation, class weighting, optimizer, learning rate).
pub fn offer_received(offer: &TaskOffer) -> SiteEvent {
    SiteEvent::OfferReceived(site::OfferReceived {
        job: offer.job_id.clone(),
        round: offer.round,
        base_model: offer.base_model.to_hex(),
        arch: offer.arch.kind().to_owned(),
        epochs: offer.training.epochs,
        encoding: offer.encoding.name(),
        clip_norm: offer.privacy.clip_norm,
        noise_multiplier: offer.privacy.dp.map(|d| d.noise_multiplier),
        central_noise_multiplier: offer.privacy.central_dp.map(|d| d.noise_multiplier),
        augmentation: offer.training.augmentation,
        class_weight: match offer.training.class_weight {
            ClassWeight::None => None,
            other => Some(format!("{other:?}").to_lowercase()),
        },
        optimizer: Some(offer.training.optimizer),
        learning_rate: Some(offer.training.learning_rate),
    })
}

/// Map an offer's training configuration to this agent's trainer, or say
/// why it cannot be honoured.
///
/// This agent trains with SGD (plain, or with momentum μ in `[0, 1)`,
/// PyTorch's convention without dampening), Adam, or AdamW (decoupled
/// weight decay), Adam and AdamW with β = (0.9, 0.999) and burn's ε = 1e-5
/// (a numerical stabiliser; the offered ε is not used). Other optimizers,
/// and other betas, are declined rather than silently replaced; so is a
/// weight decay outside `[0, 10]` (by [`TrainConfig::validate`]).
pub fn train_config(t: &TrainingConfig) -> Result<TrainConfig, Refusal> {
    let betas = |name: &str, beta1: f64, beta2: f64| {
        if beta1 == 0.9 && beta2 == 0.999 {
            Ok(())
        } else {
            Err(Refusal::Unsupported(format!(
                "{name} with betas ({beta1}, {beta2}): this agent supports (0.9, 0.999) only"
            )))
        }
    };
    let optimizer = match t.optimizer {
        Optimizer::Sgd { momentum: 0.0 } => OptimizerKind::Sgd,
        Optimizer::Sgd { momentum } => OptimizerKind::SgdMomentum { momentum },
        Optimizer::Adam { beta1, beta2, .. } => {
            betas("Adam", beta1, beta2)?;
            OptimizerKind::Adam
        }
        Optimizer::AdamW {
            beta1,
            beta2,
            weight_decay,
            ..
        } => {
            betas("AdamW", beta1, beta2)?;
            OptimizerKind::AdamW { weight_decay }
        }
        other => {
            return Err(Refusal::Unsupported(format!(
                "optimizer {other:?} is not supported by this agent"
            )));
        }
    };
    let cfg = TrainConfig {
        epochs: t.epochs as usize,
        batch_size: t.batch_size as usize,
        optimizer,
        learning_rate: t.learning_rate,
        fedprox_mu: t.fedprox_mu,
        seed: t.seed,
        augmentation: t.augmentation,
        augment_stream: None,
        class_weighting: match t.class_weight {
            ClassWeight::None => None,
            ClassWeight::Balanced => Some(ClassWeighting::Balanced),
            other => {
                return Err(Refusal::Unsupported(format!(
                    "class weighting {other:?} is not supported by this agent"
                )));
            }
        },
    };
    cfg.validate()
        .map_err(|e| Refusal::Unsupported(e.to_string()))?;
    Ok(cfg)
}

/// The reconnection backoff (exponential, "equal jitter"); it lives in the
/// protocol crate so that every client of a coordinator — this agent, the
/// benchmark's simulated sites — reconnects the same way.
pub use fedlink_protocol::backoff::Backoff;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tabular::{TabularConfig, load_tabular};
    use crate::data::{Fingerprint, LocalData, SampleShape, Samples, Targets};
    use crate::policy::tests::offer;
    use fedlink_protocol::message::Augmentation;
    use fedlink_protocol::{CentralDp, DpNoise, FeatureScaling, PrivacyRequirements};

    /// The agent's core stays sans-IO: no code in its files names the async
    /// runtime, the transport, the filesystem, the clock, an OS random
    /// source or burn (training is reached through `train::Trainer`).
    #[test]
    fn the_core_names_no_runtime_no_socket_no_file_no_clock_and_no_burn() {
        const SOURCES: &[(&str, &str)] = &[
            ("sitecore.rs", include_str!("sitecore.rs")),
            ("sitecore/task.rs", include_str!("sitecore/task.rs")),
            ("sitecore/download.rs", include_str!("sitecore/download.rs")),
            ("sitecore/eval.rs", include_str!("sitecore/eval.rs")),
            ("sitecore/upload.rs", include_str!("sitecore/upload.rs")),
        ];
        // Built from pieces, so that this list does not trip itself.
        let banned = [
            ["tok", "io"].concat(),
            ["qui", "nn"].concat(),
            ["std", "::fs"].concat(),
            ["std", "::net"].concat(),
            ["std", "::thread"].concat(),
            ["Instant", "::now"].concat(),
            ["SystemTime", "::now"].concat(),
            ["fedlink_", "transport"].concat(),
            ["Os", "Rng"].concat(),
            ["from_os", "_rng"].concat(),
            ["bu", "rn::"].concat(),
        ];
        // Code only, up to its unit tests.
        for (file, text) in SOURCES {
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            assert!(code.lines().count() > 100, "{file} read");
            for (n, line) in code.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for word in &banned {
                    assert!(
                        !line.contains(word.as_str()),
                        "{file}:{} names {word}",
                        n + 1
                    );
                }
            }
        }
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/sitecore");
        let mut on_disk: Vec<String> = std::path::Path::new(dir)
            .read_dir()
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".rs"))
            .collect();
        on_disk.sort();
        assert_eq!(
            on_disk,
            ["download.rs", "eval.rs", "task.rs", "upload.rs"],
            "every file of the core is checked"
        );
    }

    #[test]
    fn the_offered_class_weight_reaches_the_trainer() {
        let mut t = TrainingConfig {
            epochs: 1,
            batch_size: 8,
            optimizer: Optimizer::Sgd { momentum: 0.0 },
            learning_rate: 0.1,
            fedprox_mu: 0.0,
            seed: 1,
            augmentation: None,
            class_weight: ClassWeight::None,
        };
        assert_eq!(train_config(&t).unwrap().class_weighting, None);
        t.class_weight = ClassWeight::Balanced;
        assert_eq!(
            train_config(&t).unwrap().class_weighting,
            Some(ClassWeighting::Balanced)
        );
    }

    fn data(n: usize) -> Arc<SiteData> {
        let x: Vec<f32> = (0..n * 4).map(|i| (i % 7) as f32).collect();
        let y: Vec<u32> = (0..n).map(|i| (i % 2) as u32).collect();
        let s = Samples::new(SampleShape::Features(4), x, Targets::Classes(y)).unwrap();
        Arc::new(
            LocalData {
                train: s.clone(),
                validation: s.subset(&[0, 1]),
                fingerprint: Fingerprint("fp".into()),
            }
            .into(),
        )
    }

    fn scaling(names: &[&str]) -> FeatureScaling {
        FeatureScaling {
            features: names.iter().map(|s| (*s).to_owned()).collect(),
            mean: vec![0.5; names.len()],
            std: vec![2.0; names.len()],
        }
    }

    fn core() -> SiteCore {
        SiteCore::new(
            Policy::new(
                vec![FederationId::new("fed").unwrap()],
                vec!["logreg".into()],
            ),
            data(10),
        )
    }

    fn welcome(ms: u64) -> Welcome {
        Welcome {
            protocol_version: 1,
            site_id: SiteId::new("site-0").unwrap(),
            federation_id: FederationId::new("fed").unwrap(),
            heartbeat_interval_ms: ms,
        }
    }

    #[test]
    fn accepts_a_good_offer_and_starts_work() {
        let mut c = core();
        c.on_welcome(Instant::now(), &welcome(1000)).unwrap();
        let out = c.on_offer(1_000, &offer());
        assert_eq!(out.response.decision, OfferDecision::Accept);
        let a = out.start.unwrap();
        assert_eq!(a.train.epochs, 2);
        assert_eq!(a.train.batch_size, 8);
        assert_eq!(a.train.optimizer, OptimizerKind::Sgd);
        assert_eq!(c.active(), Some(&a.key()));
    }

    #[test]
    fn declines_with_the_policy_reason() {
        let mut c = core();
        let mut o = offer();
        o.training.epochs = 1000;
        let out = c.on_offer(1_000, &o);
        let OfferDecision::Decline { reason } = &out.response.decision else {
            panic!("declined expected")
        };
        assert!(reason.contains("1000 epochs"), "{reason}");
        assert!(matches!(out.refusal, Some(Refusal::TooManyEpochs { .. })));
        assert!(out.start.is_none());
        assert!(c.active().is_none());
    }

    #[test]
    fn declines_data_that_does_not_fit_the_model() {
        let mut c = core();
        let mut o = offer();
        o.arch = fedlink_protocol::arch::ArchSpec::LogReg {
            inputs: 5,
            classes: 2,
        };
        let out = c.on_offer(1_000, &o);
        let OfferDecision::Decline { reason } = &out.response.decision else {
            panic!("declined expected")
        };
        assert!(reason.contains("4 features"), "{reason}");
    }

    #[test]
    fn maps_the_offered_optimizer_and_declines_what_it_cannot_honour() {
        let declined = |optimizer| {
            let mut o = offer();
            o.training.optimizer = optimizer;
            let out = core().on_offer(1_000, &o);
            assert!(out.start.is_none());
            match out.refusal {
                Some(Refusal::Unsupported(m)) => m,
                other => panic!("{optimizer:?}: expected Unsupported, got {other:?}"),
            }
        };
        let trained = |optimizer| {
            let mut o = offer();
            o.training.optimizer = optimizer;
            let out = core().on_offer(1_000, &o);
            assert_eq!(out.response.decision, OfferDecision::Accept);
            out.start.unwrap().train.optimizer
        };
        assert_eq!(
            trained(Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
            }),
            OptimizerKind::Adam
        );
        assert_eq!(
            trained(Optimizer::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
                weight_decay: 0.1,
            }),
            OptimizerKind::AdamW { weight_decay: 0.1 }
        );
        assert_eq!(
            trained(Optimizer::Sgd { momentum: 0.9 }),
            OptimizerKind::SgdMomentum { momentum: 0.9 }
        );
        assert_eq!(
            trained(Optimizer::Sgd { momentum: 0.0 }),
            OptimizerKind::Sgd
        );
        let m = declined(Optimizer::AdamW {
            beta1: 0.8,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.1,
        });
        assert!(m.contains("AdamW with betas (0.8, 0.999)"), "{m}");
        let m = declined(Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.99,
            epsilon: 1e-8,
        });
        assert!(m.contains("Adam with betas (0.9, 0.99)"), "{m}");
        let m = declined(Optimizer::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 50.0,
        });
        assert!(m.contains("weight_decay = 50"), "{m}");
    }

    #[test]
    fn an_adamw_job_reaches_the_trainer_and_changes_the_weights() {
        let mut o = offer();
        o.training.optimizer = Optimizer::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.5,
        };
        o.training.learning_rate = 0.01;
        let a = core().on_offer(1_000, &o).start.unwrap();
        assert_eq!(
            a.train.optimizer,
            OptimizerKind::AdamW { weight_decay: 0.5 }
        );
        // the same offer with Adam: only the decay differs, and it shrinks
        // the trained weights
        o.training.optimizer = Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
        };
        let b = core().on_offer(1_000, &o).start.unwrap();
        let x: Vec<f32> = (0..40).map(|i| (i % 7) as f32 - 3.0).collect();
        let y: Vec<u32> = (0..10).map(|i| (i % 2) as u32).collect();
        let samples = Samples::new(SampleShape::Features(4), x, Targets::Classes(y)).unwrap();
        let global = o.arch.init(3).unwrap();
        let device = burn::prelude::Device::flex();
        let (w, _) = train::train_local(&o.arch, &global, &samples, &a.train, &device).unwrap();
        let (p, _) = train::train_local(&o.arch, &global, &samples, &b.train, &device).unwrap();
        let norm = |m: &fedlink_protocol::FlatModel| {
            m.values()
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
        };
        assert!(norm(&w) < norm(&p), "{} vs {}", norm(&w), norm(&p));
    }

    #[test]
    fn repeated_offer_keeps_working_and_other_jobs_wait() {
        let mut c = core();
        assert!(c.on_offer(1_000, &offer()).start.is_some());
        let again = c.on_offer(1_000, &offer());
        assert_eq!(again.response.decision, OfferDecision::Accept);
        assert!(again.start.is_none(), "no second start for the same round");
        let mut other = offer();
        other.job_id = JobId::new("other").unwrap();
        let busy = c.on_offer(1_000, &other);
        assert!(matches!(busy.refusal, Some(Refusal::Unsupported(ref m)) if m.contains("busy")));
        let mut next = offer();
        next.round = RoundId(2);
        let moved = c.on_offer(1_000, &next);
        assert_eq!(moved.abort.unwrap().key.round, RoundId(1));
        assert_eq!(moved.start.unwrap().offer.round, RoundId(2));
    }

    /// The records an offer produces carry its typed ids and describe the
    /// answer that follows them; a superseded round's `round.cancelled`
    /// names the round whose work is dropped.
    #[test]
    fn an_offer_returns_its_records_with_its_ids() {
        let mut c = core();
        c.on_welcome(Instant::now(), &welcome(1000)).unwrap();
        let o = offer();
        let out = c.on_offer(1_000, &o);
        assert_eq!(out.received, offer_received(&o));
        assert!(matches!(
            &out.received,
            SiteEvent::OfferReceived(site::OfferReceived { job, round, base_model, .. })
                if *job == o.job_id && *round == o.round && *base_model == o.base_model.to_hex()
        ));
        assert_eq!(
            out.decided,
            SiteEvent::OfferAccepted(site::OfferAccepted {
                job: o.job_id.clone(),
                round: o.round,
            })
        );
        assert_eq!(out.response.decision, OfferDecision::Accept);
        assert!(out.abort.is_none());

        // A repeat of the round in progress is accepted again, on record.
        let again = c.on_offer(1_000, &o);
        assert_eq!(again.decided, out.decided);
        assert!(again.start.is_none());

        // The next round supersedes it: its cancellation is on record,
        // with the older round's ids, and the newer round is accepted.
        let mut next = o.clone();
        next.round = RoundId(2);
        let moved = c.on_offer(1_000, &next);
        let abort = moved.abort.unwrap();
        assert_eq!(abort.key, a_key(&o));
        assert_eq!(
            abort.cancelled,
            SiteEvent::RoundCancelled(site::RoundCancelled {
                job: o.job_id.clone(),
                round: RoundId(1),
                reason: "superseded by round 2".into(),
                dropped_work: true,
            })
        );
        assert!(matches!(
            moved.decided,
            SiteEvent::OfferAccepted(site::OfferAccepted {
                round: RoundId(2),
                ..
            })
        ));

        // A decline records the reason it sends.
        let mut busy = o.clone();
        busy.job_id = JobId::new("other").unwrap();
        let out = c.on_offer(1_000, &busy);
        let OfferDecision::Decline { reason } = &out.response.decision else {
            panic!("declined expected")
        };
        assert_eq!(
            out.decided,
            SiteEvent::OfferDeclined(site::OfferDeclined {
                job: busy.job_id.clone(),
                round: busy.round,
                reason: reason.clone(),
            })
        );
        assert!(out.abort.is_none() && out.start.is_none());
    }

    fn a_key(o: &TaskOffer) -> TaskKey {
        TaskKey {
            job_id: o.job_id.clone(),
            round: o.round,
        }
    }

    /// The records the core returns are the entries the driver wrote
    /// before (session 13): the same event names and the same JSON
    /// details, byte for byte.
    #[test]
    fn offer_and_cancel_records_write_the_json_the_driver_wrote() {
        let mut c = core();
        c.on_welcome(Instant::now(), &welcome(1000)).unwrap();
        let o = offer();
        let out = c.on_offer(1_000, &o);
        let mut next = o.clone();
        next.round = RoundId(2);
        let moved = c.on_offer(1_000, &next);
        let mut busy = o.clone();
        busy.job_id = JobId::new("other").unwrap();
        let declined = c.on_offer(1_000, &busy);
        let cancel = c.on_cancel(&Cancel {
            job_id: next.job_id.clone(),
            round: RoundId(2),
            reason: "operator\nabort".into(),
        });
        // Every optional term of the offer, as the auditor reads it.
        let mut rich = offer();
        rich.privacy = PrivacyRequirements {
            clip_norm: Some(1.5),
            dp: Some(DpNoise {
                noise_multiplier: 0.7,
            }),
            central_dp: Some(CentralDp {
                noise_multiplier: 0.2,
                target_delta: Some(1e-5),
            }),
        };
        rich.training.augmentation = Some(Augmentation {
            flips: true,
            rotate90: false,
            intensity_jitter: None,
        });
        rich.training.class_weight = ClassWeight::Balanced;
        rich.training.optimizer = Optimizer::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.1,
        };
        let rich = offer_received(&rich);
        let json = |e: &SiteEvent| {
            let (name, details) = e.split();
            format!("{name} {}", serde_json::to_string(&details).unwrap())
        };
        let got: Vec<String> = [
            &out.received,
            &out.decided,
            &moved.abort.unwrap().cancelled,
            &declined.decided,
            &cancel.cancelled,
            &rich,
        ]
        .into_iter()
        .map(json)
        .collect();
        let hash = "01".repeat(32);
        assert_eq!(
            got,
            [
                format!(
                    r#"offer.received {{"arch":"logreg","base_model":"{hash}","clip_norm":null,"encoding":"f32+shuffle/zstd1","epochs":2,"job":"job","learning_rate":0.1,"noise_multiplier":null,"optimizer":{{"Sgd":{{"momentum":0.0}}}},"round":1}}"#
                ),
                r#"offer.accepted {"job":"job","round":1}"#.to_owned(),
                r#"round.cancelled {"dropped_work":true,"job":"job","reason":"superseded by round 2","round":1}"#.to_owned(),
                r#"offer.declined {"job":"other","reason":"busy with job job round 2 of this site","round":1}"#.to_owned(),
                r#"round.cancelled {"dropped_work":true,"job":"job","reason":"operator\nabort","round":2}"#.to_owned(),
                format!(
                    r#"offer.received {{"arch":"logreg","augmentation":{{"flips":true,"intensity_jitter":null,"rotate90":false}},"base_model":"{hash}","central_noise_multiplier":0.2,"class_weight":"balanced","clip_norm":1.5,"encoding":"f32+shuffle/zstd1","epochs":2,"job":"job","learning_rate":0.1,"noise_multiplier":0.7,"optimizer":{{"AdamW":{{"beta1":0.9,"beta2":0.999,"epsilon":1e-8,"weight_decay":0.1}}}},"round":1}}"#
                ),
            ]
        );
    }

    #[test]
    fn offered_scaling_must_name_the_local_columns() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("d.csv");
        let mut text = String::from("a,b,c,d,y\n");
        for i in 0..10 {
            text.push_str(&format!("{i},{},{},1,{}\n", i * 2, i % 3, i % 2));
        }
        std::fs::write(&csv, text).unwrap();
        let mut cfg = TabularConfig::new(csv, "y");
        cfg.validation_fraction = 0.0;
        let tabular = Arc::new(SiteData::from(load_tabular(&cfg).unwrap()));
        let policy = Policy::new(
            vec![FederationId::new("fed").unwrap()],
            vec!["logreg".into()],
        );

        let mut o = offer();
        o.scaling = Some(scaling(&["a", "b", "c", "d"]));
        let mut c = SiteCore::new(policy.clone(), tabular.clone());
        let out = c.on_offer(1_000, &o);
        assert_eq!(out.response.decision, OfferDecision::Accept);
        assert_eq!(out.start.unwrap().offer.scaling, o.scaling);

        for wrong in [&["a", "b", "d", "c"][..], &["a", "b", "c", "e"]] {
            o.scaling = Some(scaling(wrong));
            let out = SiteCore::new(policy.clone(), tabular.clone()).on_offer(1_000, &o);
            let OfferDecision::Decline { reason } = &out.response.decision else {
                panic!("a scaling of other columns must be declined")
            };
            assert!(reason.contains("feature scaling"), "{reason}");
            assert!(reason.contains(r#"["a", "b", "c", "d"]"#), "{reason}");
            assert!(out.start.is_none());
        }

        // Image-like data cannot honour a scaling at all.
        o.scaling = Some(scaling(&["a", "b", "c", "d"]));
        let OfferDecision::Decline { reason } = core().on_offer(1_000, &o).response.decision else {
            panic!("declined expected")
        };
        assert!(reason.contains("not tabular"), "{reason}");
        // An invalid scaling is an invalid offer.
        o.scaling = Some(FeatureScaling {
            std: vec![0.0; 4],
            ..scaling(&["a", "b", "c", "d"])
        });
        assert!(matches!(
            SiteCore::new(policy, tabular).on_offer(1_000, &o).refusal,
            Some(Refusal::InvalidOffer(_))
        ));
    }

    #[test]
    fn cancel_and_finish_free_the_site() {
        let mut c = core();
        let o = offer();
        c.on_offer(1_000, &o);
        let cancel = Cancel {
            job_id: o.job_id.clone(),
            round: RoundId(9),
            reason: "x".into(),
        };
        // Another round: on record, no work dropped.
        let other = c.on_cancel(&cancel);
        assert_eq!(
            other.cancelled,
            SiteEvent::RoundCancelled(site::RoundCancelled {
                job: o.job_id.clone(),
                round: RoundId(9),
                reason: "x".into(),
                dropped_work: false,
            })
        );
        assert!(other.drop.is_none());
        assert_eq!(c.active(), Some(&a_key(&o)));
        // The round in progress: its work goes, after its record.
        let hit = c.on_cancel(&Cancel {
            round: o.round,
            ..cancel
        });
        assert_eq!(hit.drop, Some(a_key(&o)));
        assert!(matches!(
            hit.cancelled,
            SiteEvent::RoundCancelled(site::RoundCancelled {
                dropped_work: true,
                round: RoundId(1),
                ..
            })
        ));
        assert!(c.active().is_none());
        c.on_offer(1_000, &o);
        c.on_task_finished(&TaskKey {
            job_id: o.job_id.clone(),
            round: o.round,
        });
        assert!(c.active().is_none());
        c.on_offer(1_000, &o);
        c.on_disconnect();
        assert!(c.active().is_none());
        assert!(c.session().is_none());
    }

    #[test]
    fn heartbeats_follow_the_interval() {
        let mut c = core();
        let t0 = Instant::now();
        assert!(c.poll_heartbeat(t0, 0).is_none(), "not connected");
        c.on_welcome(t0, &welcome(1000)).unwrap();
        assert_eq!(c.next_heartbeat(), Some(t0 + Duration::from_secs(1)));
        assert!(
            c.poll_heartbeat(t0 + Duration::from_millis(999), 0)
                .is_none()
        );
        let hb = c.poll_heartbeat(t0 + Duration::from_secs(1), 42).unwrap();
        assert_eq!((hb.seq, hb.now_unix_ms), (1, 42));
        // Missed beats are skipped, not burst.
        let hb = c.poll_heartbeat(t0 + Duration::from_secs(10), 0).unwrap();
        assert_eq!(hb.seq, 2);
        assert_eq!(c.next_heartbeat(), Some(t0 + Duration::from_secs(11)));
        assert!(c.poll_heartbeat(t0 + Duration::from_secs(10), 0).is_none());
        // Absurd intervals are clamped.
        c.on_welcome(t0, &welcome(0)).unwrap();
        assert_eq!(c.session().unwrap().heartbeat_interval, MIN_HEARTBEAT);
        let mut w = welcome(1000);
        w.protocol_version = 99;
        assert_eq!(
            c.on_welcome(t0, &w).unwrap_err(),
            CoreError::UnsupportedVersion(99)
        );
    }
}
