//! Local training and evaluation with burn.
//!
//! ```text
//!  global FlatModel ──weights::load──▶ Net (autodiff device)
//!                                        │  epochs × shuffled mini-batches:
//!                                        │  loss = CE(data) + μ/2·||w − w_global||²
//!                                        ▼  SGD (± momentum), Adam or AdamW step
//!  local FlatModel  ◀──weights::save── Net            + TrainReport
//! ```
//!
//! * **Loss**: softmax cross-entropy, per sample for classifiers, per pixel
//!   for the U-Net.
//! * **FedProx**: with `fedprox_mu > 0` the proximal term
//!   `μ/2 · Σ ||w − w_global||²` over every parameter is added to each
//!   mini-batch loss (Li et al., 2020). The reported epoch loss is the data
//!   term only, so runs with different μ compare.
//! * **Optimizer state does not carry over between rounds, on purpose.**
//!   Every [`train_local`] call builds a fresh module from the global model
//!   and a fresh optimizer (Adam moments and step count start at zero). The
//!   global weights move between rounds (they average every site), so the
//!   moments of this site's previous trajectory describe a different point;
//!   FedAvg and FedProx as published restart the local optimizer each round,
//!   and a stateless site survives restarts without drift.
//! * **Class weighting** (optional, [`TrainConfig::class_weighting`]):
//!   `balanced` weighs each target's cross-entropy by `n / (K · n_c)` of
//!   its class, from the site's own training labels; the reported epoch
//!   loss is this weighted loss. Evaluation is never weighted.
//! * **Augmentation** (optional, [`TrainConfig::augmentation`]): flips,
//!   90° rotations and intensity jitter of each training sample as its
//!   mini-batch is built, seeded per epoch ([`augment`]); masks move with
//!   their images. Evaluation data is never augmented.
//! * **Determinism**: shuffling uses ChaCha8 seeded with
//!   [`TrainConfig::seed`], augmentation a ChaCha8 stream keyed by the seed,
//!   [`TrainConfig::augment_stream`] and the epoch; the initial weights come
//!   from the global model; no dropout. On the CPU (`flex`) backend the same inputs give the same
//!   weights, bit for bit (tested).
//! * **The [`Trainer`] trait** ([`trainer`]) is how the rest of the agent
//!   reaches this module: [`BurnTrainer`] holds the resolved device and
//!   calls [`evaluate`] and [`train_local`].

pub mod augment;
pub mod model;
pub mod trainer;

pub use trainer::{BurnTrainer, Trainer};

use std::time::{Duration, Instant};

use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use fedlink_protocol::arch::{ArchError, ArchSpec, MAX_UNET_DEPTH};
use fedlink_protocol::{Augmentation, FlatModel};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{SampleShape, Samples, Targets};
use crate::metrics::{DiceCounts, roc_auc};
use crate::weights::{self, ProximalAnchor, WeightsError};
use augment::Augmenter;
use model::{Input, Net, Output};

/// Largest number of epochs per round.
pub const MAX_EPOCHS: usize = 10_000;
/// Largest mini-batch.
pub const MAX_BATCH_SIZE: usize = 1 << 16;
/// Most f32 values a single evaluation batch holds.
const EVAL_BATCH_VALUES: usize = 1 << 22;

/// Largest decoupled weight decay ([`OptimizerKind::AdamW`]).
pub const MAX_WEIGHT_DECAY: f64 = 10.0;

/// Which optimizer runs the local steps.
///
/// Serialized in lowercase: `"sgd"`, `"adam"` (as before), and the
/// variants with a parameter as tables, `{ adamw = { weight_decay = 0.1 } }`
/// and `{ sgdmomentum = { momentum = 0.9 } }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Plain stochastic gradient descent (no momentum, no weight decay).
    #[default]
    Sgd,
    /// SGD with heavy-ball momentum, PyTorch's convention: velocity
    /// `v ← μ·v + g` (no dampening, not Nesterov), step `w ← w − lr·v`;
    /// the velocity starts at zero each round.
    SgdMomentum {
        /// Momentum factor μ in `[0, 1)`.
        momentum: f64,
    },
    /// Adam (β = 0.9, 0.999; ε = 1e-5), fresh each round.
    Adam,
    /// AdamW (Loshchilov & Hutter): Adam (β = 0.9, 0.999; ε = 1e-5) with
    /// decoupled weight decay. Each step first shrinks every parameter
    /// (weights and biases alike) by the factor `1 − lr · weight_decay`,
    /// then takes the Adam step computed from the gradient of the loss
    /// alone. Fresh each round.
    AdamW {
        /// Decoupled weight decay λ in `[0, MAX_WEIGHT_DECAY]`; 0 is Adam.
        weight_decay: f64,
    },
}

impl OptimizerKind {
    /// A short label: `sgd`, `sgd(momentum 0.9)`, `adam`,
    /// `adamw(weight_decay 0.1)`.
    pub fn label(&self) -> String {
        match self {
            Self::Sgd => "sgd".to_owned(),
            Self::SgdMomentum { momentum } => format!("sgd(momentum {momentum})"),
            Self::Adam => "adam".to_owned(),
            Self::AdamW { weight_decay } => format!("adamw(weight_decay {weight_decay})"),
        }
    }
}

/// How the loss weighs the classes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassWeighting {
    /// Every sample (pixel) counts once: plain mean cross-entropy.
    #[default]
    None,
    /// "Balanced" weights from this site's own training labels: class `c`
    /// weighs `n / (K · n_c)` (`n` targets, `K` classes the model has,
    /// `n_c` targets of class `c`; a class absent locally weighs 1), so
    /// each class contributes equally to the loss and the weights average
    /// to 1 over the local data. Computed locally: no label counts leave
    /// the site.
    Balanced,
}

/// The per-class loss weights of `weighting` on `data`'s targets, `None`
/// when every weight is 1.
pub fn class_weights(
    weighting: ClassWeighting,
    data: &Samples,
    classes: usize,
) -> Option<Vec<f32>> {
    match weighting {
        ClassWeighting::None => None,
        ClassWeighting::Balanced => {
            let mut counts = vec![0u64; classes];
            let mut count = |c: usize| {
                if let Some(n) = counts.get_mut(c) {
                    *n += 1;
                }
            };
            match data.targets() {
                Targets::Classes(y) => y.iter().for_each(|&c| count(c as usize)),
                Targets::Masks(m) => m.iter().for_each(|&c| count(usize::from(c))),
            }
            let n: u64 = counts.iter().sum();
            let k = classes.max(1) as f64;
            Some(
                counts
                    .iter()
                    .map(|&nc| {
                        if nc == 0 {
                            1.0
                        } else {
                            (n as f64 / (k * nc as f64)) as f32
                        }
                    })
                    .collect(),
            )
        }
    }
}

/// Hyperparameters of one round of local training.
#[derive(Config, Debug, PartialEq)]
pub struct TrainConfig {
    /// Passes over the local training data.
    #[config(default = 1)]
    pub epochs: usize,
    /// Mini-batch size (the last batch of an epoch may be smaller).
    #[config(default = 32)]
    pub batch_size: usize,
    /// Optimizer.
    #[config(default = "OptimizerKind::Sgd")]
    pub optimizer: OptimizerKind,
    /// Step size.
    #[config(default = 0.05)]
    pub learning_rate: f64,
    /// FedProx μ; 0 is plain FedAvg local training.
    #[config(default = 0.0)]
    pub fedprox_mu: f64,
    /// Seed of the mini-batch shuffling (and of the augmentation).
    #[config(default = 0)]
    pub seed: u64,
    /// Augmentation of the training samples (image data only); none by
    /// default.
    pub augmentation: Option<Augmentation>,
    /// This site's augmentation stream ([`augment::site_stream`] of its
    /// id), so that sites given the same seed augment differently; `None`
    /// is stream 0.
    pub augment_stream: Option<u64>,
    /// Class weighting of the loss; `None` (the default) is
    /// [`ClassWeighting::None`].
    pub class_weighting: Option<ClassWeighting>,
}

impl TrainConfig {
    /// Check every field: a config may come from the coordinator.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        if !(1..=MAX_EPOCHS).contains(&self.epochs) {
            return bad(format!("epochs = {} not in 1..={MAX_EPOCHS}", self.epochs));
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return bad(format!(
                "batch_size = {} not in 1..={MAX_BATCH_SIZE}",
                self.batch_size
            ));
        }
        if !(self.learning_rate.is_finite()
            && self.learning_rate > 0.0
            && self.learning_rate <= 10.0)
        {
            return bad(format!(
                "learning_rate = {} not in (0, 10]",
                self.learning_rate
            ));
        }
        if !(self.fedprox_mu.is_finite() && (0.0..=1000.0).contains(&self.fedprox_mu)) {
            return bad(format!("fedprox_mu = {} not in [0, 1000]", self.fedprox_mu));
        }
        match self.optimizer {
            OptimizerKind::Sgd | OptimizerKind::Adam => {}
            OptimizerKind::SgdMomentum { momentum } => {
                if !(momentum.is_finite() && (0.0..1.0).contains(&momentum)) {
                    return bad(format!("momentum = {momentum} not in [0, 1)"));
                }
            }
            OptimizerKind::AdamW { weight_decay } => {
                if !(weight_decay.is_finite() && (0.0..=MAX_WEIGHT_DECAY).contains(&weight_decay)) {
                    return bad(format!(
                        "weight_decay = {weight_decay} not in [0, {MAX_WEIGHT_DECAY}]"
                    ));
                }
                if self.learning_rate * weight_decay >= 1.0 {
                    return bad(format!(
                        "learning_rate × weight_decay = {} must be below 1 (each step scales the weights by 1 − their product)",
                        self.learning_rate * weight_decay
                    ));
                }
            }
        }
        if let Some(a) = &self.augmentation {
            a.validate()
                .map_err(|e| TrainError::Config(e.to_string()))?;
        }
        Ok(())
    }
}

/// What a round of local training did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Mean data loss (cross-entropy, without the proximal term) of each
    /// epoch, averaged over the samples seen during that epoch.
    pub epoch_loss: Vec<f64>,
    /// Training samples (the weight of this site in FedAvg).
    pub samples: usize,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Wall-clock time of the round.
    pub duration: Duration,
}

/// Metrics of a model on a dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Mean cross-entropy (per sample, or per pixel for segmentation).
    pub loss: f64,
    /// Accuracy (per sample, or pixel accuracy for segmentation).
    pub accuracy: f64,
    /// ROC AUC of class 1 for binary classifiers with both classes present.
    pub auc: Option<f64>,
    /// Dice of the foreground (mean over classes ≥ 1 present) for
    /// segmentation.
    pub dice: Option<f64>,
    /// Samples evaluated (images for segmentation).
    pub n: usize,
}

/// Why training or evaluation failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The architecture is invalid.
    #[error("invalid architecture: {0}")]
    Arch(#[from] ArchError),
    /// Weights could not be loaded into or read from the module.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The training configuration is invalid.
    #[error("invalid training configuration: {0}")]
    Config(String),
    /// The data does not fit the architecture.
    #[error("data does not fit architecture {arch}: {detail}")]
    DataMismatch {
        /// Architecture kind.
        arch: &'static str,
        /// What differs.
        detail: String,
    },
    /// The backend returned something unexpected (a dtype or shape).
    #[error("backend error: {0}")]
    Backend(String),
}

/// Check that `data` has the input layout and label range of `arch`.
pub fn check_data(arch: &ArchSpec, data: &Samples) -> Result<(), TrainError> {
    arch.validate()?;
    let mismatch = |detail: String| {
        Err(TrainError::DataMismatch {
            arch: arch.kind(),
            detail,
        })
    };
    if data.is_empty() {
        return mismatch("no samples".to_owned());
    }
    let shape = data.shape();
    match (arch, shape, data.targets()) {
        (
            ArchSpec::LogReg { inputs, .. } | ArchSpec::Mlp { inputs, .. },
            SampleShape::Features(f),
            Targets::Classes(_),
        ) => {
            if f != *inputs as usize {
                return mismatch(format!("{f} features, the model takes {inputs}"));
            }
        }
        (
            ArchSpec::Cnn {
                in_channels,
                height,
                width,
                ..
            },
            SampleShape::Image {
                channels: c,
                height: h,
                width: w,
            },
            Targets::Classes(_),
        ) => {
            if (c, h, w) != (*in_channels as usize, *height as usize, *width as usize) {
                return mismatch(format!(
                    "images are {c}×{h}×{w}, the model takes {in_channels}×{height}×{width}"
                ));
            }
        }
        (
            ArchSpec::UNet {
                in_channels, depth, ..
            },
            SampleShape::Image {
                channels: c,
                height: h,
                width: w,
            },
            Targets::Masks(_),
        ) => {
            if c != *in_channels as usize {
                return mismatch(format!("{c} channels, the model takes {in_channels}"));
            }
            // `depth` is validated (≤ MAX_UNET_DEPTH) before this is called.
            let side = 1usize << (*depth).min(MAX_UNET_DEPTH);
            if h % side != 0 || w % side != 0 || h == 0 || w == 0 {
                return mismatch(format!(
                    "tiles are {h}×{w}; a U-Net of depth {depth} needs sides that are multiples of {side}"
                ));
            }
        }
        _ => return mismatch(format!("sample layout {shape:?} with these targets")),
    }
    let seen = data.num_classes_seen();
    if seen > arch.classes() {
        return mismatch(format!(
            "labels go up to {}, the model has {} classes",
            seen - 1,
            arch.classes()
        ));
    }
    Ok(())
}

/// A mini-batch on the device: inputs, one-hot targets, and how many
/// targets (samples or pixels) it holds.
struct Batch {
    input: Input,
    one_hot: OneHot,
    targets: usize,
}

enum OneHot {
    Classes(Tensor<2>),
    Pixels(Tensor<4>),
}

fn make_batch(
    data: &Samples,
    idx: &[usize],
    classes: usize,
    device: &Device,
    augment: Option<&mut Augmenter>,
    weights: Option<&[f32]>,
) -> Batch {
    // The one-hot target of class `c` holds its loss weight (1 unweighted),
    // so the cross-entropy below is the weighted one.
    let hot = |c: usize| weights.and_then(|w| w.get(c).copied()).unwrap_or(1.0);
    let per = data.shape().len();
    let x = data.features();
    let mut xb = Vec::with_capacity(idx.len() * per);
    for &i in idx {
        xb.extend_from_slice(&x[i * per..(i + 1) * per]);
    }
    let b = idx.len();
    // The masks of the batch, gathered so that augmentation moves them with
    // their images (a copy only when augmenting).
    let mut masks: Option<Vec<u8>> = None;
    if let (
        Some(aug),
        SampleShape::Image {
            channels,
            height,
            width,
        },
    ) = (augment, data.shape())
    {
        let px = height * width;
        let mut mb = match data.targets() {
            Targets::Masks(m) => {
                let mut mb = Vec::with_capacity(b * px);
                for &i in idx {
                    mb.extend_from_slice(&m[i * px..(i + 1) * px]);
                }
                Some(mb)
            }
            Targets::Classes(_) => None,
        };
        for row in 0..b {
            let mask = mb.as_mut().map(|m| &mut m[row * px..(row + 1) * px]);
            aug.apply(
                &mut xb[row * per..(row + 1) * per],
                mask,
                channels,
                height,
                width,
            );
        }
        masks = mb;
    }
    let input = match data.shape() {
        SampleShape::Features(f) => {
            Input::Flat(Tensor::from_data(TensorData::new(xb, [b, f]), device))
        }
        SampleShape::Image {
            channels,
            height,
            width,
        } => Input::Image(Tensor::from_data(
            TensorData::new(xb, [b, channels, height, width]),
            device,
        )),
    };
    let (one_hot, targets) = match (data.targets(), data.shape()) {
        (Targets::Classes(y), _) => {
            let mut oh = vec![0f32; b * classes];
            for (row, &i) in idx.iter().enumerate() {
                oh[row * classes + y[i] as usize] = hot(y[i] as usize);
            }
            (
                OneHot::Classes(Tensor::from_data(TensorData::new(oh, [b, classes]), device)),
                b,
            )
        }
        (Targets::Masks(m), SampleShape::Image { height, width, .. }) => {
            let px = height * width;
            let mut oh = vec![0f32; b * classes * px];
            for (row, &i) in idx.iter().enumerate() {
                let mask = match &masks {
                    Some(mb) => &mb[row * px..(row + 1) * px],
                    None => &m[i * px..(i + 1) * px],
                };
                for (p, &c) in mask.iter().enumerate() {
                    oh[(row * classes + c as usize) * px + p] = hot(usize::from(c));
                }
            }
            (
                OneHot::Pixels(Tensor::from_data(
                    TensorData::new(oh, [b, classes, height, width]),
                    device,
                )),
                b * px,
            )
        }
        // `check_data` rules this out; an empty one-hot gives zero loss.
        (Targets::Masks(_), SampleShape::Features(_)) => {
            (OneHot::Classes(Tensor::zeros([b, classes], device)), b)
        }
    };
    Batch {
        input,
        one_hot,
        targets,
    }
}

/// Mean cross-entropy of a batch, a one-element tensor.
fn cross_entropy(net: &Net, batch: Batch) -> Result<Tensor<1>, TrainError> {
    let n = batch.targets.max(1) as f64;
    let out = net.forward(batch.input);
    match (out, batch.one_hot) {
        (Some(Output::Classes(logits)), OneHot::Classes(oh)) => {
            Ok((log_softmax(logits, 1) * oh).sum().div_scalar(n).neg())
        }
        (Some(Output::Pixels(logits)), OneHot::Pixels(oh)) => {
            Ok((log_softmax(logits, 1) * oh).sum().div_scalar(n).neg())
        }
        _ => Err(TrainError::Backend(
            "model output does not match the targets".to_owned(),
        )),
    }
}

fn scalar(t: Tensor<1>) -> Result<f64, TrainError> {
    let data = t.into_data();
    let v = data
        .try_to_vec::<f32>()
        .map_err(|e| TrainError::Backend(format!("{e:?}")))?;
    v.first()
        .map(|&x| f64::from(x))
        .ok_or_else(|| TrainError::Backend("empty scalar".to_owned()))
}

/// Train `global` on the local `data` and return the local weights.
///
/// `device` may be plain or autodiff; training runs on its autodiff form.
pub fn train_local(
    arch: &ArchSpec,
    global: &FlatModel,
    data: &Samples,
    cfg: &TrainConfig,
    device: &Device,
) -> Result<(FlatModel, TrainReport), TrainError> {
    let start = Instant::now();
    cfg.validate()?;
    check_data(arch, data)?;
    weights::check_compatible(arch, global)?;
    let device = device.clone().autodiff();
    let classes = arch.classes() as usize;
    let mut net = weights::load(arch, global, &device)?;
    let anchor = if cfg.fedprox_mu > 0.0 {
        Some(ProximalAnchor::new(arch, global, &device)?)
    } else {
        None
    };
    let mut optim = match cfg.optimizer {
        OptimizerKind::Sgd => SgdConfig::new().init(),
        OptimizerKind::SgdMomentum { momentum } => SgdConfig::new()
            .with_momentum(Some(
                MomentumConfig::new()
                    .with_momentum(momentum)
                    .with_dampening(0.0)
                    .with_nesterov(false),
            ))
            .init(),
        OptimizerKind::Adam => AdamConfig::new().init(),
        OptimizerKind::AdamW { weight_decay } => AdamWConfig::new()
            .with_weight_decay(weight_decay as f32)
            .init(),
    };
    let weights = class_weights(cfg.class_weighting.unwrap_or_default(), data, classes);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let mut epoch_loss = Vec::with_capacity(cfg.epochs);
    let mut steps = 0;
    for epoch in 0..cfg.epochs {
        order.shuffle(&mut rng);
        let mut augmenter = cfg
            .augmentation
            .map(|a| Augmenter::new(a, cfg.seed, cfg.augment_stream.unwrap_or(0), epoch as u64));
        let mut total: Option<Tensor<1>> = None;
        for chunk in order.chunks(cfg.batch_size) {
            let batch = make_batch(
                data,
                chunk,
                classes,
                &device,
                augmenter.as_mut(),
                weights.as_deref(),
            );
            let loss = cross_entropy(&net, batch)?;
            let seen = loss.clone().detach().mul_scalar(chunk.len() as f64);
            total = Some(match total {
                Some(t) => t + seen,
                None => seen,
            });
            let objective = match &anchor {
                Some(a) => loss + a.squared_distance(&net)?.mul_scalar(cfg.fedprox_mu / 2.0),
                None => loss,
            };
            let grads = GradientsParams::from_grads(objective.backward(), &net);
            net = optim.step(cfg.learning_rate, net, grads);
            steps += 1;
        }
        let sum = match total {
            Some(t) => scalar(t)?,
            None => 0.0,
        };
        epoch_loss.push(sum / data.len() as f64);
    }
    let local = weights::save(arch, &net)?;
    Ok((
        local,
        TrainReport {
            epoch_loss,
            samples: data.len(),
            steps,
            duration: start.elapsed(),
        },
    ))
}

/// Evaluate `model` on `data`: loss, accuracy, and AUC (binary) or Dice
/// (segmentation).
pub fn evaluate(
    arch: &ArchSpec,
    model: &FlatModel,
    data: &Samples,
    device: &Device,
) -> Result<EvalMetrics, TrainError> {
    check_data(arch, data)?;
    let net = weights::load(arch, model, device)?.valid();
    let classes = arch.classes() as usize;
    let per = data.shape().len() * classes.max(1);
    let batch = (EVAL_BATCH_VALUES / per.max(1)).clamp(1, 1024);
    let idx: Vec<usize> = (0..data.len()).collect();

    let mut loss_sum = 0f64;
    let mut hits = 0u64;
    let mut count = 0u64;
    let mut scores = Vec::new();
    let mut positive = Vec::new();
    let mut dice = vec![DiceCounts::default(); classes];
    for chunk in idx.chunks(batch) {
        let b = make_batch(data, chunk, classes, device, None, None);
        let probs = match net.forward(b.input) {
            Some(Output::Classes(l)) => softmax(l, 1).into_data(),
            Some(Output::Pixels(l)) => softmax(l, 1).into_data(),
            None => {
                return Err(TrainError::Backend(
                    "model does not accept this input".to_owned(),
                ));
            }
        };
        let p = probs
            .try_to_vec::<f32>()
            .map_err(|e| TrainError::Backend(format!("{e:?}")))?;
        match (data.targets(), data.shape()) {
            (Targets::Classes(y), _) => {
                for (row, &i) in chunk.iter().enumerate() {
                    let pr = &p[row * classes..(row + 1) * classes];
                    let truth = y[i] as usize;
                    loss_sum -= f64::from(pr[truth].max(1e-12)).ln();
                    hits += u64::from(argmax(pr) == truth);
                    count += 1;
                    if classes == 2 {
                        scores.push(pr[1]);
                        positive.push(truth == 1);
                    }
                }
            }
            (Targets::Masks(m), SampleShape::Image { height, width, .. }) => {
                let px = height * width;
                let mut pred = vec![0u8; px];
                for (row, &i) in chunk.iter().enumerate() {
                    let truth = &m[i * px..(i + 1) * px];
                    let base = row * classes * px;
                    for (q, pr) in pred.iter_mut().enumerate() {
                        let mut best = 0;
                        for c in 1..classes {
                            if p[base + c * px + q] > p[base + best * px + q] {
                                best = c;
                            }
                        }
                        *pr = best as u8;
                        let t = truth[q] as usize;
                        loss_sum -= f64::from(p[base + t * px + q].max(1e-12)).ln();
                        hits += u64::from(best == t);
                        count += 1;
                    }
                    for (c, d) in dice.iter_mut().enumerate().skip(1) {
                        d.add(&pred, truth, c as u8);
                    }
                }
            }
            (Targets::Masks(_), SampleShape::Features(_)) => {}
        }
    }
    let count_f = count.max(1) as f64;
    let seg = matches!(data.targets(), Targets::Masks(_));
    let dice = if seg {
        let ds: Vec<f64> = dice.iter().skip(1).filter_map(DiceCounts::dice).collect();
        (!ds.is_empty()).then(|| ds.iter().sum::<f64>() / ds.len() as f64)
    } else {
        None
    };
    Ok(EvalMetrics {
        loss: loss_sum / count_f,
        accuracy: hits as f64 / count_f,
        auc: if classes == 2 && !seg {
            roc_auc(&scores, &positive)
        } else {
            None
        },
        dice,
        n: data.len(),
    })
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests;
