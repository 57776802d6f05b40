//! The site's policy: what this hospital agrees to take part in.
//!
//! The policy is the `[policy]` table of `site.toml`. It is enforced
//! **locally**, before anything is fetched or trained: an offer that breaks a
//! rule is declined (`OfferResponse::Decline { reason }`) and the refusal is
//! written to the site log. [`evaluate`] is a pure function of the policy,
//! the offer and a few local facts, so every rule has its own unit test.
//!
//! Rules, in the order they are checked:
//!
//! 1. the offer is well formed ([`TaskOffer::validate`]);
//! 2. its federation is listed in `federations` and, once connected, is the
//!    federation the coordinator announced in `Welcome`;
//! 3. its deadline has not passed;
//! 4. its architecture kind is listed in `architectures` and the model has
//!    at most `max_model_params` parameters (default
//!    [`DEFAULT_MAX_MODEL_PARAMS`]);
//! 5. the local training split has at least `min_local_samples` samples;
//! 6. it asks for at most `max_epochs` epochs;
//! 7. its delta encoding's codec family is listed in `encodings`;
//! 8. with `require_clipping`, it clips the update (`clip_norm` set), and to
//!    at most `max_clip_norm` when that is set (a smaller norm is stronger);
//! 9. with `require_dp`, it adds DP noise, with a noise multiplier of at
//!    least `min_noise_multiplier` when that is set: noise the site adds
//!    itself (`privacy.dp`), or central noise the coordinator adds to the
//!    aggregate (`privacy.central_dp`, protocol version 3) unless
//!    `accept_central_dp = false`. Central DP protects the site's data from
//!    everyone who sees the aggregated model, not from the coordinator, which
//!    sees the clipped update before the noise; a site that does not trust
//!    the coordinator with that sets `accept_central_dp = false`.

use fedlink_protocol::{FederationId, OfferError, TaskOffer, ValueCodec};
use serde::{Deserialize, Serialize};

/// Architecture kinds a policy may name (`ArchSpec::kind`).
pub const ARCH_KINDS: &[&str] = &["logreg", "mlp", "cnn", "unet"];

/// Codec family names a policy may list in `encodings`.
pub const CODEC_FAMILIES: &[&str] = &["f32", "f16", "bf16", "int8", "int8-stochastic", "topk"];

/// The codec family name of a value codec, as listed in `encodings`
/// (`topk` for every top-k fraction).
pub fn codec_family(codec: ValueCodec) -> String {
    match codec {
        ValueCodec::TopK { .. } => "topk".to_owned(),
        other => other.name(),
    }
}

fn default_min_local_samples() -> usize {
    1
}

fn default_max_epochs() -> u32 {
    50
}

/// Default [`Policy::max_model_params`]: 2^26 parameters (256 MiB as f32),
/// a quarter of the protocol's ceiling (`MAX_ARCH_PARAMS`). The agent holds a
/// downloaded model about three times over (the compressed records for the
/// cache, the decoded values, the training copy) plus the optimizer state,
/// so this keeps a round well under a few GiB of memory; a site that means
/// to train larger models raises it.
pub const DEFAULT_MAX_MODEL_PARAMS: u64 = 1 << 26;

fn default_max_model_params() -> u64 {
    DEFAULT_MAX_MODEL_PARAMS
}

fn default_true() -> bool {
    true
}

fn default_encodings() -> Vec<String> {
    CODEC_FAMILIES.iter().map(|s| (*s).to_owned()).collect()
}

/// The `[policy]` table of `site.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Federations this site takes part in (required, non-empty).
    pub federations: Vec<FederationId>,
    /// Model architecture kinds it trains: `logreg`, `mlp`, `cnn`, `unet`
    /// (required, non-empty).
    pub architectures: Vec<String>,
    /// Fewest local training samples for which the site takes part
    /// (default 1). Small cohorts leak more through their updates.
    #[serde(default = "default_min_local_samples")]
    pub min_local_samples: usize,
    /// Most local epochs per round (default 50).
    #[serde(default = "default_max_epochs")]
    pub max_epochs: u32,
    /// Largest model, in parameters (default
    /// [`DEFAULT_MAX_MODEL_PARAMS`]). Offers of larger models are declined,
    /// and a model download whose manifest describes a larger model is
    /// refused before anything is allocated for it.
    #[serde(default = "default_max_model_params")]
    pub max_model_params: u64,
    /// Codec families the delta may be encoded with: `f32`, `f16`, `bf16`,
    /// `int8`, `int8-stochastic`, `topk` (default: all).
    #[serde(default = "default_encodings")]
    pub encodings: Vec<String>,
    /// Only take part in rounds that clip each update (default false).
    #[serde(default)]
    pub require_clipping: bool,
    /// With clipping, the largest clip norm accepted (smaller is stronger).
    #[serde(default)]
    pub max_clip_norm: Option<f64>,
    /// Only take part in rounds that add DP noise (default false).
    #[serde(default)]
    pub require_dp: bool,
    /// With DP, the smallest noise multiplier accepted.
    #[serde(default)]
    pub min_noise_multiplier: Option<f64>,
    /// With `require_dp`, central DP (noise the coordinator adds to the
    /// aggregate) counts (default true). `false`: only noise the site adds
    /// itself counts, for a site that does not trust the coordinator with
    /// its clipped, un-noised update.
    #[serde(default = "default_true")]
    pub accept_central_dp: bool,
}

/// A problem in the `[policy]` table, naming the field.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy.{field}: {message}")]
pub struct PolicyConfigError {
    /// The field, e.g. `encodings[1]`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl Policy {
    /// A policy accepting `federations` and `architectures` with the
    /// defaults for every other rule.
    pub fn new(federations: Vec<FederationId>, architectures: Vec<String>) -> Self {
        Self {
            federations,
            architectures,
            min_local_samples: default_min_local_samples(),
            max_epochs: default_max_epochs(),
            max_model_params: DEFAULT_MAX_MODEL_PARAMS,
            encodings: default_encodings(),
            require_clipping: false,
            max_clip_norm: None,
            require_dp: false,
            min_noise_multiplier: None,
            accept_central_dp: true,
        }
    }

    /// Check every field (names, ranges, combinations).
    pub fn validate(&self) -> Result<(), PolicyConfigError> {
        let err = |field: String, message: String| Err(PolicyConfigError { field, message });
        if self.federations.is_empty() {
            return err("federations".into(), "list at least one federation".into());
        }
        if self.architectures.is_empty() {
            return err(
                "architectures".into(),
                format!("list at least one of {ARCH_KINDS:?}"),
            );
        }
        for (i, a) in self.architectures.iter().enumerate() {
            if !ARCH_KINDS.contains(&a.as_str()) {
                return err(
                    format!("architectures[{i}]"),
                    format!("unknown architecture kind {a:?}; known: {ARCH_KINDS:?}"),
                );
            }
        }
        if self.encodings.is_empty() {
            return err(
                "encodings".into(),
                format!("list at least one of {CODEC_FAMILIES:?}"),
            );
        }
        for (i, e) in self.encodings.iter().enumerate() {
            if !CODEC_FAMILIES.contains(&e.as_str()) {
                return err(
                    format!("encodings[{i}]"),
                    format!("unknown codec {e:?}; known: {CODEC_FAMILIES:?}"),
                );
            }
        }
        if self.max_epochs == 0 || self.max_epochs > fedlink_protocol::message::MAX_EPOCHS {
            return err(
                "max_epochs".into(),
                format!(
                    "{} is not in 1..={}",
                    self.max_epochs,
                    fedlink_protocol::message::MAX_EPOCHS
                ),
            );
        }
        if self.max_model_params == 0 {
            return err("max_model_params".into(), "must be at least 1".into());
        }
        if let Some(c) = self.max_clip_norm {
            if !(c.is_finite() && c > 0.0) {
                return err("max_clip_norm".into(), format!("{c} is not finite and > 0"));
            }
            if !self.require_clipping {
                return err(
                    "max_clip_norm".into(),
                    "set require_clipping = true for a clip-norm bound to apply".into(),
                );
            }
        }
        if let Some(z) = self.min_noise_multiplier {
            if !(z.is_finite() && z >= 0.0) {
                return err(
                    "min_noise_multiplier".into(),
                    format!("{z} is not finite and ≥ 0"),
                );
            }
            if !self.require_dp {
                return err(
                    "min_noise_multiplier".into(),
                    "set require_dp = true for a noise bound to apply".into(),
                );
            }
        }
        if self.require_dp && !self.require_clipping {
            return err(
                "require_dp".into(),
                "DP noise is scaled by the clip norm: set require_clipping = true too".into(),
            );
        }
        Ok(())
    }
}

/// Local facts an offer is judged against.
#[derive(Clone, Copy, Debug)]
pub struct OfferContext<'a> {
    /// Current time, unix milliseconds.
    pub now_unix_ms: u64,
    /// The federation the coordinator announced in `Welcome` (if connected).
    pub welcomed_federation: Option<&'a FederationId>,
    /// Samples in the local training split.
    pub train_samples: usize,
}

/// Why the site declines an offer. The `Display` text is the `reason` sent
/// to the coordinator and written to the site log.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// The offer itself is malformed.
    #[error("invalid offer: {0}")]
    InvalidOffer(#[from] OfferError),
    /// The federation is not in the policy.
    #[error("federation {0} is not in this site's policy")]
    FederationNotAllowed(FederationId),
    /// The offer names another federation than the coordinator's `Welcome`.
    #[error("offer is for federation {offered}, the coordinator serves {welcomed}")]
    FederationMismatch {
        /// From `Welcome`.
        welcomed: FederationId,
        /// From the offer.
        offered: FederationId,
    },
    /// The deadline is already over.
    #[error("deadline {deadline_unix_ms} already passed (now {now_unix_ms})")]
    DeadlinePassed {
        /// Offer deadline.
        deadline_unix_ms: u64,
        /// Local clock.
        now_unix_ms: u64,
    },
    /// The architecture kind is not in the policy.
    #[error("architecture {0} is not allowed by this site's policy")]
    ArchitectureNotAllowed(String),
    /// The model is larger than the policy allows.
    #[error("model has {params} parameters, policy allows at most {max}")]
    ModelTooLarge {
        /// Parameters of the offered architecture.
        params: u64,
        /// Policy limit.
        max: u64,
    },
    /// Too few local samples.
    #[error("site has {have} training samples, policy requires at least {min}")]
    TooFewSamples {
        /// Local training samples.
        have: usize,
        /// Policy minimum.
        min: usize,
    },
    /// Too many epochs.
    #[error("offer asks for {asked} epochs, policy allows at most {max}")]
    TooManyEpochs {
        /// Offered epochs.
        asked: u32,
        /// Policy maximum.
        max: u32,
    },
    /// The delta encoding is not in the policy.
    #[error("encoding {0} is not allowed by this site's policy")]
    EncodingNotAllowed(String),
    /// The policy requires clipping and the offer does not clip.
    #[error("policy requires update clipping; the offer sets no clip_norm")]
    ClippingRequired,
    /// The clip norm is larger than the policy allows.
    #[error("offer clips at {offered}, policy requires a clip norm of at most {max}")]
    ClipNormTooLarge {
        /// Offered clip norm.
        offered: f64,
        /// Policy maximum.
        max: f64,
    },
    /// The policy requires DP noise and the offer adds none.
    #[error(
        "policy requires DP noise (require_dp); the offer adds none, neither at the site nor centrally"
    )]
    DpRequired,
    /// The offer's only noise is central and the policy does not count it.
    #[error(
        "policy requires noise added at the site (accept_central_dp = false); the offer's noise is central only"
    )]
    CentralDpNotAccepted,
    /// The noise multiplier is smaller than the policy requires.
    #[error("offer's noise multiplier {offered} is below the policy minimum {min}")]
    NoiseTooLow {
        /// Offered multiplier.
        offered: f64,
        /// Policy minimum.
        min: f64,
    },
    /// The agent cannot do what the offer asks (optimizer, data layout,
    /// busy with another round).
    #[error("{0}")]
    Unsupported(String),
}

/// Judge `offer` against `policy` (see the module docs for the rules and
/// their order). Pure: no clock, no I/O.
pub fn evaluate(policy: &Policy, offer: &TaskOffer, ctx: &OfferContext<'_>) -> Result<(), Refusal> {
    offer.validate()?;
    if !policy.federations.contains(&offer.federation_id) {
        return Err(Refusal::FederationNotAllowed(offer.federation_id.clone()));
    }
    if let Some(welcomed) = ctx.welcomed_federation
        && *welcomed != offer.federation_id
    {
        return Err(Refusal::FederationMismatch {
            welcomed: welcomed.clone(),
            offered: offer.federation_id.clone(),
        });
    }
    if offer.deadline_unix_ms <= ctx.now_unix_ms {
        return Err(Refusal::DeadlinePassed {
            deadline_unix_ms: offer.deadline_unix_ms,
            now_unix_ms: ctx.now_unix_ms,
        });
    }
    let kind = offer.arch.kind();
    if !policy.architectures.iter().any(|a| a == kind) {
        return Err(Refusal::ArchitectureNotAllowed(kind.to_owned()));
    }
    {
        // `validate` above bounded the architecture, so the spec is cheap.
        let params = offer
            .arch
            .spec()
            .map_err(|e| OfferError::Arch(e.to_string()))?
            .num_params();
        let max = policy.max_model_params;
        if params > max {
            return Err(Refusal::ModelTooLarge { params, max });
        }
    }
    if ctx.train_samples < policy.min_local_samples {
        return Err(Refusal::TooFewSamples {
            have: ctx.train_samples,
            min: policy.min_local_samples,
        });
    }
    if offer.training.epochs > policy.max_epochs {
        return Err(Refusal::TooManyEpochs {
            asked: offer.training.epochs,
            max: policy.max_epochs,
        });
    }
    let family = codec_family(offer.encoding.values());
    if !policy.encodings.contains(&family) {
        return Err(Refusal::EncodingNotAllowed(offer.encoding.name()));
    }
    if policy.require_clipping {
        let Some(clip) = offer.privacy.clip_norm else {
            return Err(Refusal::ClippingRequired);
        };
        if let Some(max) = policy.max_clip_norm
            && clip > max
        {
            return Err(Refusal::ClipNormTooLarge { offered: clip, max });
        }
    }
    if policy.require_dp {
        let site = offer.privacy.dp.map(|d| d.noise_multiplier);
        let central = offer.privacy.central_dp.map(|d| d.noise_multiplier);
        let noise = match (site, central) {
            (Some(z), _) => z,
            (None, Some(z)) if policy.accept_central_dp => z,
            (None, Some(_)) => return Err(Refusal::CentralDpNotAccepted),
            (None, None) => return Err(Refusal::DpRequired),
        };
        if let Some(min) = policy.min_noise_multiplier
            && noise < min
        {
            return Err(Refusal::NoiseTooLow {
                offered: noise,
                min,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fedlink_protocol::arch::ArchSpec;
    use fedlink_protocol::{
        CentralDp, DpNoise, Encoding, JobId, ModelHash, Optimizer, PrivacyRequirements, RoundId,
        TrainingConfig,
    };

    pub(crate) fn offer() -> TaskOffer {
        TaskOffer {
            federation_id: FederationId::new("fed").unwrap(),
            job_id: JobId::new("job").unwrap(),
            round: RoundId(1),
            base_model: ModelHash([1; 32]),
            arch: ArchSpec::LogReg {
                inputs: 4,
                classes: 2,
            },
            training: TrainingConfig {
                epochs: 2,
                batch_size: 8,
                optimizer: Optimizer::Sgd { momentum: 0.0 },
                learning_rate: 0.1,
                fedprox_mu: 0.0,
                seed: 1,
                augmentation: None,
                class_weight: Default::default(),
            },
            encoding: Encoding::default(),
            privacy: PrivacyRequirements::default(),
            deadline_unix_ms: 2_000,
            scaling: None,
        }
    }

    fn policy() -> Policy {
        Policy::new(
            vec![FederationId::new("fed").unwrap()],
            vec!["logreg".into()],
        )
    }

    fn ctx() -> OfferContext<'static> {
        OfferContext {
            now_unix_ms: 1_000,
            welcomed_federation: None,
            train_samples: 100,
        }
    }

    #[test]
    fn a_conforming_offer_is_accepted() {
        policy().validate().unwrap();
        assert_eq!(evaluate(&policy(), &offer(), &ctx()), Ok(()));
    }

    #[test]
    fn malformed_offer() {
        let mut o = offer();
        o.training.learning_rate = f64::NAN;
        assert!(matches!(
            evaluate(&policy(), &o, &ctx()),
            Err(Refusal::InvalidOffer(OfferError::OutOfRange {
                field: "learning_rate"
            }))
        ));
    }

    #[test]
    fn federation_not_in_policy() {
        let mut o = offer();
        o.federation_id = FederationId::new("other").unwrap();
        let r = evaluate(&policy(), &o, &ctx()).unwrap_err();
        assert_eq!(r, Refusal::FederationNotAllowed(o.federation_id.clone()));
        assert!(r.to_string().contains("other"));
    }

    #[test]
    fn federation_differs_from_welcome() {
        let mut p = policy();
        let other = FederationId::new("other").unwrap();
        p.federations.push(other.clone());
        let mut c = ctx();
        c.welcomed_federation = Some(&other);
        assert!(matches!(
            evaluate(&p, &offer(), &c),
            Err(Refusal::FederationMismatch { .. })
        ));
    }

    #[test]
    fn deadline_passed() {
        let mut c = ctx();
        c.now_unix_ms = 2_000;
        assert!(matches!(
            evaluate(&policy(), &offer(), &c),
            Err(Refusal::DeadlinePassed { .. })
        ));
    }

    #[test]
    fn architecture_not_allowed() {
        let mut o = offer();
        o.arch = ArchSpec::Mlp {
            inputs: 4,
            hidden: vec![3],
            classes: 2,
        };
        assert_eq!(
            evaluate(&policy(), &o, &ctx()),
            Err(Refusal::ArchitectureNotAllowed("mlp".into()))
        );
    }

    #[test]
    fn model_too_large() {
        let mut p = policy();
        p.max_model_params = 9; // logreg 4→2: 8 weights + 2 biases
        assert_eq!(
            evaluate(&p, &offer(), &ctx()),
            Err(Refusal::ModelTooLarge { params: 10, max: 9 })
        );
        p.max_model_params = 10;
        assert_eq!(evaluate(&p, &offer(), &ctx()), Ok(()));
    }

    #[test]
    fn too_few_samples() {
        let mut p = policy();
        p.min_local_samples = 101;
        assert_eq!(
            evaluate(&p, &offer(), &ctx()),
            Err(Refusal::TooFewSamples {
                have: 100,
                min: 101
            })
        );
    }

    #[test]
    fn too_many_epochs() {
        let mut p = policy();
        p.max_epochs = 1;
        assert_eq!(
            evaluate(&p, &offer(), &ctx()),
            Err(Refusal::TooManyEpochs { asked: 2, max: 1 })
        );
    }

    #[test]
    fn encoding_not_allowed() {
        let mut p = policy();
        p.encodings = vec!["f16".into(), "int8".into()];
        let r = evaluate(&p, &offer(), &ctx()).unwrap_err();
        assert!(matches!(r, Refusal::EncodingNotAllowed(ref n) if n.starts_with("f32")));
        let mut o = offer();
        o.encoding = Encoding::with_codec(ValueCodec::Int8 { stochastic: false }).unwrap();
        assert_eq!(evaluate(&p, &o, &ctx()), Ok(()));
        o.encoding = Encoding::with_codec(ValueCodec::Int8 { stochastic: true }).unwrap();
        assert!(
            evaluate(&p, &o, &ctx()).is_err(),
            "int8-stochastic is its own family"
        );
        p.encodings = vec!["topk".into()];
        o.encoding = Encoding::with_codec(ValueCodec::TopK {
            per_million: 10_000,
        })
        .unwrap();
        assert_eq!(evaluate(&p, &o, &ctx()), Ok(()));
    }

    #[test]
    fn clipping_required() {
        let mut p = policy();
        p.require_clipping = true;
        p.max_clip_norm = Some(1.0);
        p.validate().unwrap();
        let mut o = offer();
        assert_eq!(evaluate(&p, &o, &ctx()), Err(Refusal::ClippingRequired));
        o.privacy.clip_norm = Some(2.0);
        assert_eq!(
            evaluate(&p, &o, &ctx()),
            Err(Refusal::ClipNormTooLarge {
                offered: 2.0,
                max: 1.0
            })
        );
        o.privacy.clip_norm = Some(0.5);
        assert_eq!(evaluate(&p, &o, &ctx()), Ok(()));
    }

    #[test]
    fn dp_required() {
        let mut p = policy();
        p.require_clipping = true;
        p.require_dp = true;
        p.min_noise_multiplier = Some(1.0);
        p.validate().unwrap();
        let mut o = offer();
        o.privacy = PrivacyRequirements {
            clip_norm: Some(1.0),
            dp: None,
            central_dp: None,
        };
        assert_eq!(evaluate(&p, &o, &ctx()), Err(Refusal::DpRequired));
        o.privacy.dp = Some(DpNoise {
            noise_multiplier: 0.5,
        });
        assert_eq!(
            evaluate(&p, &o, &ctx()),
            Err(Refusal::NoiseTooLow {
                offered: 0.5,
                min: 1.0
            })
        );
        o.privacy.dp = Some(DpNoise {
            noise_multiplier: 1.1,
        });
        assert_eq!(evaluate(&p, &o, &ctx()), Ok(()));
    }

    /// A `require_dp` site joins a job whose noise the coordinator adds
    /// (central DP, as the coordinator's DP jobs run) when it is strong
    /// enough, and declines a job without noise with a reason that says so.
    /// Before, offers had no way to say "central DP" and such a site
    /// declined every offer.
    #[test]
    fn require_dp_accepts_central_dp_jobs() {
        let mut p = policy();
        p.require_clipping = true;
        p.require_dp = true;
        p.min_noise_multiplier = Some(1.0);
        p.validate().unwrap();
        let mut o = offer();
        o.privacy = PrivacyRequirements {
            clip_norm: Some(1.0),
            dp: None,
            central_dp: Some(CentralDp {
                noise_multiplier: 1.2,
                target_delta: Some(1e-5),
            }),
        };
        assert_eq!(evaluate(&p, &o, &ctx()), Ok(()));

        // too little central noise
        o.privacy.central_dp = Some(CentralDp {
            noise_multiplier: 0.7,
            target_delta: None,
        });
        assert_eq!(
            evaluate(&p, &o, &ctx()),
            Err(Refusal::NoiseTooLow {
                offered: 0.7,
                min: 1.0
            })
        );

        // a job without noise: declined, and the reason names the rule
        o.privacy.central_dp = None;
        let refusal = evaluate(&p, &o, &ctx()).unwrap_err();
        assert_eq!(refusal, Refusal::DpRequired);
        let reason = refusal.to_string();
        assert!(reason.contains("require_dp"), "{reason}");
        assert!(reason.contains("adds none"), "{reason}");

        // a site that only counts its own noise declines central DP
        p.accept_central_dp = false;
        o.privacy.central_dp = Some(CentralDp {
            noise_multiplier: 1.2,
            target_delta: None,
        });
        let refusal = evaluate(&p, &o, &ctx()).unwrap_err();
        assert_eq!(refusal, Refusal::CentralDpNotAccepted);
        assert!(refusal.to_string().contains("accept_central_dp = false"));
        // ... but takes noise added at the site
        o.privacy.dp = Some(DpNoise {
            noise_multiplier: 1.0,
        });
        assert_eq!(evaluate(&p, &o, &ctx()), Ok(()));
    }

    /// Without `max_model_params` in site.toml, the default bounds the model.
    #[test]
    fn max_model_params_has_a_default() {
        let p: Policy =
            toml::from_str("federations = [\"fed\"]\narchitectures = [\"mlp\"]").unwrap();
        assert_eq!(p.max_model_params, DEFAULT_MAX_MODEL_PARAMS);
        let mut o = offer();
        // 2^13 inputs x 2^13 hidden + ... > 2^26 parameters, within MAX_ARCH_PARAMS
        o.arch = ArchSpec::Mlp {
            inputs: 1 << 13,
            hidden: vec![1 << 13, 1 << 10],
            classes: 2,
        };
        assert!(o.validate().is_ok());
        assert!(matches!(
            evaluate(&p, &o, &ctx()),
            Err(Refusal::ModelTooLarge {
                max: DEFAULT_MAX_MODEL_PARAMS,
                ..
            })
        ));
    }

    #[test]
    fn policy_validation_names_the_field() {
        type Edit = Box<dyn Fn(&mut Policy)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|p| p.federations.clear()), "federations"),
            (Box::new(|p| p.architectures.clear()), "architectures"),
            (
                Box::new(|p| p.architectures.push("transformer".into())),
                "architectures[1]",
            ),
            (
                Box::new(|p| p.encodings = vec!["f32".into(), "f8".into()]),
                "encodings[1]",
            ),
            (Box::new(|p| p.encodings.clear()), "encodings"),
            (Box::new(|p| p.max_epochs = 0), "max_epochs"),
            (Box::new(|p| p.max_model_params = 0), "max_model_params"),
            (Box::new(|p| p.max_clip_norm = Some(1.0)), "max_clip_norm"),
            (
                Box::new(|p| {
                    p.require_clipping = true;
                    p.max_clip_norm = Some(-1.0);
                }),
                "max_clip_norm",
            ),
            (
                Box::new(|p| {
                    p.require_dp = true;
                }),
                "require_dp",
            ),
            (
                Box::new(|p| p.min_noise_multiplier = Some(1.0)),
                "min_noise_multiplier",
            ),
        ];
        for (edit, field) in cases {
            let mut p = policy();
            edit(&mut p);
            let e = p.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().starts_with(&format!("policy.{field}:")));
        }
    }
}
