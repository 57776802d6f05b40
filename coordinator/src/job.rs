//! Job definitions: one TOML file describes one federated training job.
//!
//! A job file is untrusted configuration: it is parsed with
//! `deny_unknown_fields` everywhere (a typo is an error, not a silently
//! ignored key) and then [`Job::validate`]d; every error names the field
//! that is wrong.
//!
//! ```toml
//! id = "bc-logreg"                       # [A-Za-z0-9._:-], 1..=128 bytes
//! name = "Breast cancer, logistic regression"
//! rounds = 20
//! seed = 7                               # site-selection seed
//! arch = { kind = "logreg", inputs = 30, classes = 2 }
//! init = { seed = 42 }                   # or { file = "initial.safetensors" }
//!
//! [strategy]
//! name = "fedavg"
//! max_examples_per_site = 1000000        # most num_examples one update may claim
//! [strategy.params]                      # strings, numbers or booleans
//! server_lr = 1.0
//!
//! [selection]
//! fraction = 1.0                         # of the connected, compatible sites
//! min_sites = 2                          # a round starts with at least this many
//! max_sites = 10
//! gather_secs = 10                       # first round: wait for more sites
//!
//! [round]
//! deadline_secs = 300
//! quorum = 2                             # accepted updates needed to close
//! extension_secs = 120                   # one extension if quorum is missing (0: none)
//! max_attempts = 2                       # offer waves per round before the job fails
//!
//! [training]                             # pushed to the sites
//! epochs = 1
//! batch_size = 32
//! optimizer = "sgd"                      # sgd | adam | adamw (adamw: older agents decline it)
//! learning_rate = 0.05
//! # momentum = 0.9                       # sgd only: heavy-ball momentum in [0, 1) (default 0)
//! # weight_decay = 0.1                   # adamw only: decoupled weight decay in [0, 10] (default 0)
//! fedprox_mu = 0.0
//! class_weight = "none"                  # none | balanced; balanced needs protocol v6 sites
//!
//! [training.augmentation]                # unet jobs only; needs protocol v5 sites
//! flips = true                           # random horizontal/vertical flips
//! rotate90 = true                        # random multiples of 90°
//! intensity_jitter = { scale = 0.1, shift = 0.1 }   # x·U(1±scale) + U(±shift), each ≤ 0.5
//!
//! [encoding]                             # how sites encode their delta
//! codec = "f16"                          # f32 | f16 | bf16 | int8 | topk
//! shuffle = true
//! zstd_level = 1
//! downlink = "update"                    # update | model (default: update for f16/bf16/int8)
//!
//! [privacy]
//! clip_norm = 5.0
//! noise_multiplier = 0.0
//!
//! [evaluation]
//! every_rounds = 1
//! split = "test"
//! ```
//!
//! Only `id`, `rounds`, `arch`, `init`, `strategy.name` and
//! `round.deadline_secs` are required; every other section has defaults
//! (see each type).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedlink_protocol::arch::ArchSpec;
use serde::{Deserialize, Serialize};

/// Longest job file accepted, in bytes (a job file is a few hundred bytes).
pub const MAX_JOB_FILE_BYTES: u64 = 1 << 20;
/// Longest identifier (job id, site id), in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Most rounds a job may ask for.
pub const MAX_ROUNDS: u32 = 1_000_000;
/// Most sites one round may select.
pub const MAX_SITES_PER_ROUND: u32 = 100_000;
/// Longest round deadline (and extension): 7 days.
pub const MAX_DEADLINE_SECS: u64 = 7 * 24 * 3600;
/// Most offer waves per round.
pub const MAX_ATTEMPTS: u32 = 100;
/// Most strategy parameters.
pub const MAX_STRATEGY_PARAMS: usize = 64;
/// Default of `strategy.max_examples_per_site`: a million. An update's
/// `num_examples` is its weight in FedAvg and only the site vouches for it;
/// the aggregation crate's own bound (2^30) would let one lying site
/// outweigh a thousand honest sites of a million examples each. A million
/// is above the training set of any one hospital this network is built for
/// (tabular or imaging cohorts of thousands to hundreds of thousands) and
/// bounds what a lie can buy; a job with larger sites raises it, and
/// `max_examples` in `sites.toml` bounds each site tighter.
pub const DEFAULT_MAX_EXAMPLES_PER_SITE: u64 = 1_000_000;

/// Why a job file was refused.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The file could not be read.
    #[error("cannot read job file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_JOB_FILE_BYTES`].
    #[error("job file {path} is {len} bytes, more than the limit of {MAX_JOB_FILE_BYTES}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// Not valid TOML, an unknown key, a missing key or a wrong type. The
    /// message names the key and the position.
    #[error("job file is malformed: {0}")]
    Parse(#[from] toml::de::Error),
    /// The file parses but a value is out of range or inconsistent.
    #[error("job field `{field}`: {reason}")]
    Invalid {
        /// Dotted path of the offending field, e.g. `round.quorum`.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> JobError {
    JobError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Check an identifier: 1..=[`MAX_ID_LEN`] bytes of `[A-Za-z0-9._:-]`, so it
/// is safe in file names, database keys and logs.
pub fn validate_id(field: &str, id: &str) -> Result<(), JobError> {
    if id.is_empty() {
        return Err(invalid(field, "is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid(
            field,
            format!("is {} bytes long, more than {MAX_ID_LEN}", id.len()),
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
    {
        return Err(invalid(
            field,
            format!("{id:?} contains a character outside [A-Za-z0-9._:-]"),
        ));
    }
    Ok(())
}

/// A federated training job, as written in its TOML file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Job identifier (`[A-Za-z0-9._:-]`, 1..=128 bytes); the key of the job
    /// in the store.
    pub id: String,
    /// Human-readable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Number of rounds to run (1..=[`MAX_ROUNDS`]).
    pub rounds: u32,
    /// Seed of the site selection: the selection of round `r`, attempt `a`
    /// is a pure function of (`seed`, `r`, `a`, the eligible site ids).
    #[serde(default)]
    pub seed: u64,
    /// Model architecture.
    pub arch: ArchSpec,
    /// Where the initial global model comes from.
    pub init: InitSource,
    /// Aggregation strategy.
    pub strategy: StrategySection,
    /// Which sites take part in a round.
    #[serde(default)]
    pub selection: Selection,
    /// Deadlines and quorum of a round.
    pub round: RoundPolicy,
    /// Local training configuration pushed to the sites.
    #[serde(default)]
    pub training: TrainingConfig,
    /// How sites encode their update.
    #[serde(default)]
    pub encoding: DeltaEncoding,
    /// Update clipping and differential privacy.
    #[serde(default)]
    pub privacy: Privacy,
    /// Evaluation schedule.
    #[serde(default)]
    pub evaluation: Evaluation,
}

/// The initial global model: drawn from a seed by [`ArchSpec::init`], or
/// read from a file (relative paths are relative to the job file; for a job
/// submitted over the admin API, relative to `init_dir`, which it must stay in).
///
/// TOML: `init = { seed = 42 }` or `init = { file = "initial.safetensors" }`.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawInit", into = "RawInit")]
pub enum InitSource {
    /// Seeded initialisation of the architecture.
    Seed(u64),
    /// Weights read from a file.
    File(PathBuf),
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<PathBuf>,
}

/// Why a job's `init` table names no single source of the initial model.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// Both `seed` and `file` are given.
    #[error("init: give either `seed` or `file`, not both")]
    Both,
    /// Neither `seed` nor `file` is given.
    #[error("init: give `seed = <u64>` or `file = \"<path>\"`")]
    Neither,
}

impl TryFrom<RawInit> for InitSource {
    type Error = InitError;
    fn try_from(r: RawInit) -> Result<Self, InitError> {
        match (r.seed, r.file) {
            (Some(s), None) => Ok(Self::Seed(s)),
            (None, Some(f)) => Ok(Self::File(f)),
            (Some(_), Some(_)) => Err(InitError::Both),
            (None, None) => Err(InitError::Neither),
        }
    }
}

impl From<InitSource> for RawInit {
    fn from(i: InitSource) -> Self {
        match i {
            InitSource::Seed(s) => Self {
                seed: Some(s),
                file: None,
            },
            InitSource::File(f) => Self {
                seed: None,
                file: Some(f),
            },
        }
    }
}

/// A strategy hyperparameter: the aggregation crate's own type, so a job
/// file and `fedlink aggregate --set` read values the same way.
pub use fedlink_aggregation::ParamValue;

/// `[strategy]`: the aggregation strategy by name and its parameters. The
/// coordinator hands both to the aggregation crate, which checks the name
/// and the parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategySection {
    /// Strategy name, e.g. `fedavg`, `fedadam`, `trimmed-mean`.
    pub name: String,
    /// The most training examples (`num_examples`, the FedAvg weight) one
    /// site's update may claim; an update claiming more is rejected. It is
    /// the strategy parameter `max_num_examples`, which a job may set
    /// instead (both set and different: the job is refused). Default
    /// [`DEFAULT_MAX_EXAMPLES_PER_SITE`]; see [`Job::max_examples_per_site`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_examples_per_site: Option<u64>,
    /// Hyperparameters (`[strategy.params]`), sorted by key.
    #[serde(default)]
    pub params: BTreeMap<String, ParamValue>,
}

impl StrategySection {
    /// The strategy `name` without parameters and with the default
    /// [`Self::max_examples_per_site`] (set the fields to add them).
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            max_examples_per_site: None,
            params: BTreeMap::new(),
        }
    }

    /// Parameters as `key=value` strings, sorted by key (the form the
    /// aggregation crate's `StrategyConfig` parses).
    pub fn params_as_strings(&self) -> Vec<(String, String)> {
        self.params
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect()
    }
}

/// `[selection]`: how many sites a round selects among the connected,
/// compatible ones: `clamp(ceil(fraction × eligible), min_sites, max_sites)`,
/// and a round starts only once at least `min_sites` are eligible.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// Fraction of eligible sites to select, in (0, 1]. Default 1.
    #[serde(default = "one_f64")]
    pub fraction: f64,
    /// Fewest sites a round starts with. Default: `round.quorum`.
    #[serde(default)]
    pub min_sites: Option<u32>,
    /// Most sites a round selects. Default [`MAX_SITES_PER_ROUND`].
    #[serde(default)]
    pub max_sites: Option<u32>,
    /// Seconds the first round waits, once `min_sites` sites are
    /// connected, for more sites to connect. Default 10.
    #[serde(default = "default_gather")]
    pub gather_secs: u64,
    /// If set, only these site ids may take part in the job; other sites
    /// are disconnected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
}

impl Selection {
    /// Every round takes exactly `n` sites (all of them), the first one
    /// waiting at most `gather_secs` for them once they are connected.
    pub fn exactly(n: u32, gather_secs: u64) -> Self {
        Self {
            min_sites: Some(n),
            max_sites: Some(n),
            gather_secs,
            ..Self::default()
        }
    }
}

impl Default for Selection {
    fn default() -> Self {
        Self {
            fraction: 1.0,
            min_sites: None,
            max_sites: None,
            gather_secs: default_gather(),
            allow: None,
        }
    }
}

fn default_gather() -> u64 {
    10
}

fn one_f64() -> f64 {
    1.0
}

/// `[round]`: deadline and quorum of a round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundPolicy {
    /// Seconds from the offers to the deadline.
    pub deadline_secs: u64,
    /// Accepted updates needed to close the round. Default 1.
    #[serde(default = "one_u32")]
    pub quorum: u32,
    /// If the deadline passes without quorum while selected sites are still
    /// working, the deadline is extended once by this many seconds
    /// (0: no extension). Default 0.
    #[serde(default)]
    pub extension_secs: u64,
    /// Offer waves per round: when a wave ends without quorum, a new wave
    /// offers the round to more sites, until this many waves have run; then
    /// the job fails. Default 1.
    #[serde(default = "one_u32")]
    pub max_attempts: u32,
}

fn one_u32() -> u32 {
    1
}

impl RoundPolicy {
    /// A round with a `deadline_secs` deadline and the file's defaults
    /// otherwise: quorum 1, no extension, one offer wave.
    pub fn with_deadline(deadline_secs: u64) -> Self {
        Self {
            deadline_secs,
            quorum: one_u32(),
            extension_secs: 0,
            max_attempts: one_u32(),
        }
    }
}

/// Local optimiser used by the sites.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalOptimizer {
    /// Plain SGD.
    Sgd,
    /// Adam.
    Adam,
    /// Adam with decoupled weight decay (`weight_decay`).
    AdamW,
}

/// Largest `[training] weight_decay`.
pub const MAX_WEIGHT_DECAY: f64 = 10.0;

/// `[training]`: the local training configuration pushed to every site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Local epochs per round (1..=1000). Default 1.
    #[serde(default = "one_u32")]
    pub epochs: u32,
    /// Mini-batch size (1..=65536). Default 32.
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    /// Local optimiser. Default SGD.
    #[serde(default = "default_optimizer")]
    pub optimizer: LocalOptimizer,
    /// Local learning rate (finite, > 0). Default 0.01.
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// SGD momentum μ in `[0, 1)` (PyTorch's heavy-ball convention, no
    /// dampening). Only with `optimizer = "sgd"`; absent means 0 (plain
    /// SGD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    /// Decoupled weight decay λ in `[0, MAX_WEIGHT_DECAY]`, with
    /// `learning_rate · λ < 1`: each local step shrinks every parameter by
    /// `1 − learning_rate · λ` before the Adam step. Only with
    /// `optimizer = "adamw"`; absent means 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// FedProx proximal term μ (finite, ≥ 0; 0 = plain FedAvg). Default 0.
    #[serde(default)]
    pub fedprox_mu: f64,
    /// `[training.augmentation]`: seeded data augmentation at the sites
    /// (U-Net jobs only). Default none. A job with augmentation is offered
    /// only to sites that negotiated protocol version 5 or later.
    #[serde(default)]
    pub augmentation: Option<AugmentationConfig>,
    /// Class weighting of the sites' loss: `"none"` (default) or
    /// `"balanced"` (each site weighs class `c` by `n / (K · n_c)` of its
    /// own labels). A job with `"balanced"` is offered only to sites that
    /// negotiated protocol version 6 or later.
    #[serde(default)]
    pub class_weight: ClassWeightConfig,
}

/// `[training] class_weight`.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassWeightConfig {
    /// Plain mean cross-entropy.
    #[default]
    None,
    /// Balanced from each site's own labels.
    Balanced,
}

impl ClassWeightConfig {
    /// The wire form.
    pub fn to_protocol(self) -> fedlink_protocol::ClassWeight {
        match self {
            Self::None => fedlink_protocol::ClassWeight::None,
            Self::Balanced => fedlink_protocol::ClassWeight::Balanced,
        }
    }
}

/// `[training.augmentation]`: what each site does to its training batches
/// (see `fedlink_protocol::Augmentation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentationConfig {
    /// Random horizontal and vertical flips. Default false.
    #[serde(default)]
    pub flips: bool,
    /// Random rotations by multiples of 90°. Default false.
    #[serde(default)]
    pub rotate90: bool,
    /// Random intensity change of the image (not the mask). Default none.
    #[serde(default)]
    pub intensity_jitter: Option<IntensityJitterConfig>,
}

/// `intensity_jitter = { scale, shift }`: the image becomes
/// `x · U(1 − scale, 1 + scale) + U(−shift, shift)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntensityJitterConfig {
    /// Multiplicative half-range, `0..=0.5`. Default 0.
    #[serde(default)]
    pub scale: f64,
    /// Additive half-range, `0..=0.5`. Default 0.
    #[serde(default)]
    pub shift: f64,
}

impl AugmentationConfig {
    /// The wire form.
    pub fn to_protocol(&self) -> fedlink_protocol::Augmentation {
        fedlink_protocol::Augmentation {
            flips: self.flips,
            rotate90: self.rotate90,
            intensity_jitter: self
                .intensity_jitter
                .map(|j| fedlink_protocol::IntensityJitter {
                    scale: j.scale,
                    shift: j.shift,
                }),
        }
    }
}

fn default_batch() -> u32 {
    32
}
fn default_optimizer() -> LocalOptimizer {
    LocalOptimizer::Sgd
}
fn default_lr() -> f64 {
    0.01
}

impl TrainingConfig {
    /// The optimizer as offered on the wire: SGD with `momentum` (0 when
    /// absent), Adam, or AdamW with `weight_decay` (0 when absent); Adam's
    /// and AdamW's β = (0.9, 0.999), ε = 1e-8. An agent older than AdamW
    /// support declines an AdamW offer (`Refusal::Unsupported`).
    pub fn optimizer_to_protocol(&self) -> fedlink_protocol::Optimizer {
        match self.optimizer {
            LocalOptimizer::Sgd => fedlink_protocol::Optimizer::Sgd {
                momentum: self.momentum.unwrap_or(0.0),
            },
            LocalOptimizer::Adam => fedlink_protocol::Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
            },
            LocalOptimizer::AdamW => fedlink_protocol::Optimizer::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
                weight_decay: self.weight_decay.unwrap_or(0.0),
            },
        }
    }
}

impl TrainingConfig {
    /// Plain SGD at `learning_rate`, `epochs` local epochs of batches of
    /// `batch_size`, and the file's defaults otherwise.
    pub fn sgd(epochs: u32, batch_size: u32, learning_rate: f64) -> Self {
        Self {
            epochs,
            batch_size,
            optimizer: LocalOptimizer::Sgd,
            learning_rate,
            ..Self::default()
        }
    }
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: default_batch(),
            optimizer: default_optimizer(),
            learning_rate: default_lr(),
            momentum: None,
            weight_decay: None,
            fedprox_mu: 0.0,
            augmentation: None,
            class_weight: ClassWeightConfig::None,
        }
    }
}

/// Value codec of the delta (see `fedlink_protocol::encoding::ValueCodec`).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecKind {
    /// Lossless f32.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit symmetric quantisation (see `int8_stochastic`).
    Int8,
    /// Top-k sparsification (see `topk_fraction`).
    Topk,
}

/// `[encoding] downlink`: what a site that holds the previous global model
/// downloads when a round has published the next one.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DownlinkKind {
    /// The round's global update (new − old), encoded with the job's
    /// encoding (`codec`, `shuffle`, `zstd_level`, `chunk_bytes`). The
    /// coordinator publishes `old + decoded update`, so with a lossy codec
    /// the global model carries that codec's rounding (docs/PROTOCOL.md,
    /// "Downlink updates"); sites hold the same model, bit for bit, and
    /// check its hash. Sites of protocol < 7, sites without the previous
    /// model and every `codec = "topk"` job get the whole model. The
    /// default for `f16`, `bf16` and `int8` jobs.
    Update,
    /// Always the whole model, lossless (as before protocol 7). The
    /// default for `f32` and `topk` jobs.
    Model,
}

/// `[encoding]`: how sites encode the delta they upload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaEncoding {
    /// Value codec. Default `f32`.
    #[serde(default = "default_codec")]
    pub codec: CodecKind,
    /// Byte-plane shuffle before compression. Default true.
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// zstd level (1..=19). Default 1.
    #[serde(default = "one_i32")]
    pub zstd_level: i32,
    /// Fraction of values kept by top-k, in (0, 0.5]; required for
    /// `codec = "topk"`, refused otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topk_fraction: Option<f64>,
    /// Stochastic rounding for `int8`. Default false; refused for other
    /// codecs when true.
    #[serde(default)]
    pub int8_stochastic: bool,
    /// Chunk size in bytes of f32 input (multiple of 4, 16..=4 MiB).
    /// Default 512 KiB: the coordinator decodes each upload chunk by chunk
    /// (validation and fold), so the chunk sets its memory per upload in
    /// flight; 512 KiB compresses as well as 2 MiB (docs/PERFORMANCE.md).
    #[serde(default = "default_chunk")]
    pub chunk_bytes: u32,
    /// What sites download ([`DownlinkKind`]). Default: `update` for the
    /// lossy codecs that carry it (`f16`, `bf16`, `int8`); `model` for
    /// `f32` (a lossless update is hardly smaller than the model: allowed
    /// when asked) and for `topk` (it would drop most of each global update
    /// for good: `update` is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downlink: Option<DownlinkKind>,
}

fn default_codec() -> CodecKind {
    CodecKind::F32
}
fn yes() -> bool {
    true
}
fn one_i32() -> i32 {
    1
}
fn default_chunk() -> u32 {
    512 * 1024
}

impl Default for DeltaEncoding {
    fn default() -> Self {
        Self {
            codec: default_codec(),
            shuffle: true,
            zstd_level: 1,
            topk_fraction: None,
            int8_stochastic: false,
            chunk_bytes: default_chunk(),
            downlink: None,
        }
    }
}

impl DeltaEncoding {
    /// The wire encoding sites must use (checked against the protocol's
    /// bounds).
    pub fn to_protocol(
        &self,
    ) -> Result<fedlink_protocol::Encoding, fedlink_protocol::EncodingError> {
        use fedlink_protocol::ValueCodec;
        let values = match self.codec {
            CodecKind::F32 => ValueCodec::F32,
            CodecKind::F16 => ValueCodec::F16,
            CodecKind::Bf16 => ValueCodec::Bf16,
            CodecKind::Int8 => ValueCodec::Int8 {
                stochastic: self.int8_stochastic,
            },
            CodecKind::Topk => ValueCodec::TopK {
                per_million: self.topk_per_million().unwrap_or(0),
            },
        };
        fedlink_protocol::Encoding::new(values, self.shuffle, self.zstd_level, self.chunk_bytes)
    }

    /// The encoding of the downlink update, `None` when sites download the
    /// whole model (`downlink = "model"`, the `f32` and `topk` default).
    pub fn downlink_encoding(&self) -> Option<fedlink_protocol::Encoding> {
        let enc = self.to_protocol().ok()?;
        let carries = fedlink_protocol::downlink::codec_carries_updates(enc.values());
        match self.downlink {
            Some(DownlinkKind::Model) => None,
            Some(DownlinkKind::Update) => carries.then_some(enc),
            // A lossless f32 update compresses hardly better than the model
            // (31.3 vs 33.5 MB at 10M) and costs the coordinator an extra
            // encode and decode per round: whole models unless asked.
            None => (carries && !enc.values().is_lossless()).then_some(enc),
        }
    }

    /// Top-k fraction in parts per million (what the wire encoding carries),
    /// for `codec = "topk"`.
    pub fn topk_per_million(&self) -> Option<u32> {
        self.topk_fraction
            .map(|f| ((f * 1_000_000.0).round() as u32).max(1))
    }
}

/// `[privacy]`: clipping of every update and central Gaussian noise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    /// Clip each update to this L2 norm (finite, > 0). Default: no clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_norm: Option<f64>,
    /// Gaussian noise standard deviation as a multiple of `clip_norm`
    /// (finite, ≥ 0; > 0 requires `clip_norm`). Default 0.
    #[serde(default)]
    pub noise_multiplier: f64,
    /// Target δ for the privacy accountant, in (0, 1). Only meaningful with
    /// noise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_delta: Option<f64>,
}

/// `[evaluation]`: when the global model is evaluated, and on which split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    /// Record the sites' federated evaluation of the initial model and of
    /// the global model after every N completed rounds and after the last
    /// (0: never). Default 1. The sites report the metrics of a round's
    /// base model with their updates; the last round's model, which no
    /// round follows, they are asked for after it (protocol ≥ 6); see
    /// [`crate::core::evaluation`].
    #[serde(default = "one_u32")]
    pub every_rounds: u32,
    /// Name of the held-out split the sites evaluate on. Default: none (the
    /// site agent's default split). Validated but not sent to the sites
    /// yet: they evaluate on their validation split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
}

impl Default for Evaluation {
    fn default() -> Self {
        Self {
            every_rounds: 1,
            split: None,
        }
    }
}

fn finite_pos(field: &str, x: f64) -> Result<(), JobError> {
    if x.is_finite() && x > 0.0 {
        Ok(())
    } else {
        Err(invalid(field, format!("must be finite and > 0, got {x}")))
    }
}

fn finite_nonneg(field: &str, x: f64) -> Result<(), JobError> {
    if x.is_finite() && x >= 0.0 {
        Ok(())
    } else {
        Err(invalid(field, format!("must be finite and >= 0, got {x}")))
    }
}

fn in_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    x: T,
    lo: T,
    hi: T,
) -> Result<(), JobError> {
    if x >= lo && x <= hi {
        Ok(())
    } else {
        Err(invalid(field, format!("{x} is outside {lo}..={hi}")))
    }
}

impl Job {
    /// A job with the fields a job file must give, and what a file that
    /// leaves out the others gets: seed 0, the default selection, training,
    /// encoding, privacy and evaluation. Set the public fields to change
    /// them, then [`Job::validate`] it (or write it with [`Job::to_toml`]
    /// and read it back with [`Job::from_toml`], which validates).
    pub fn new(
        id: impl Into<String>,
        rounds: u32,
        arch: ArchSpec,
        init: InitSource,
        strategy: StrategySection,
        round: RoundPolicy,
    ) -> Self {
        Self {
            id: id.into(),
            name: None,
            rounds,
            seed: 0,
            arch,
            init,
            strategy,
            selection: Selection::default(),
            round,
            training: TrainingConfig::default(),
            encoding: DeltaEncoding::default(),
            privacy: Privacy::default(),
            evaluation: Evaluation::default(),
        }
    }

    /// Parse and validate a job from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, JobError> {
        let job: Self = toml::from_str(text)?;
        job.validate()?;
        Ok(job)
    }

    /// Read, parse and validate a job file (at most [`MAX_JOB_FILE_BYTES`]).
    /// A relative `init.file` is resolved against the job file's directory.
    pub fn from_file(path: &Path) -> Result<Self, JobError> {
        let io = |source| JobError::Io {
            path: path.to_owned(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_JOB_FILE_BYTES {
            return Err(JobError::TooLarge {
                path: path.to_owned(),
                len,
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let mut job = Self::from_toml(&text)?;
        if let InitSource::File(f) = &mut job.init
            && f.is_relative()
            && let Some(dir) = path.parent()
        {
            *f = dir.join(&*f);
        }
        Ok(job)
    }

    /// The job as TOML text (what the store keeps).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// Effective fewest sites per round (`selection.min_sites`, default
    /// `round.quorum`).
    pub fn min_sites(&self) -> u32 {
        self.selection.min_sites.unwrap_or(self.round.quorum)
    }

    /// Effective most sites per round.
    pub fn max_sites(&self) -> u32 {
        self.selection.max_sites.unwrap_or(MAX_SITES_PER_ROUND)
    }

    /// The most examples one site's update may claim:
    /// `strategy.max_examples_per_site`, else the strategy parameter
    /// `max_num_examples` (if it is a number), else
    /// [`DEFAULT_MAX_EXAMPLES_PER_SITE`]. [`Self::validate`] refuses a job
    /// where both are set and differ.
    pub fn max_examples_per_site(&self) -> u64 {
        self.strategy
            .max_examples_per_site
            .or_else(|| {
                self.strategy
                    .params
                    .get("max_num_examples")
                    .and_then(|v| v.to_string().parse().ok())
            })
            .unwrap_or(DEFAULT_MAX_EXAMPLES_PER_SITE)
    }

    /// The oldest negotiated protocol version a site must speak to be
    /// offered this job's rounds (see
    /// `fedlink_protocol::TaskOffer::min_protocol_version`): 6 for class
    /// weighting, 5 for a U-Net of depth other than 2 or for augmentation.
    pub fn min_protocol_version(&self) -> u16 {
        let aug = self.training.augmentation.map(|a| a.to_protocol());
        fedlink_protocol::min_protocol_version(&self.arch, aug.as_ref()).max(
            fedlink_protocol::class_weight_min_version(self.training.class_weight.to_protocol()),
        )
    }

    /// Round deadline.
    pub fn deadline(&self) -> Duration {
        Duration::from_secs(self.round.deadline_secs)
    }

    /// Check every value; the error names the field.
    pub fn validate(&self) -> Result<(), JobError> {
        validate_id("id", &self.id)?;
        if let Some(n) = &self.name
            && (n.len() > 1024 || n.chars().any(char::is_control))
        {
            return Err(invalid(
                "name",
                "must be at most 1024 bytes without control characters",
            ));
        }
        in_range("rounds", self.rounds, 1, MAX_ROUNDS)?;
        self.arch
            .validate()
            .map_err(|e| invalid("arch", e.to_string()))?;
        if let InitSource::File(f) = &self.init
            && f.as_os_str().is_empty()
        {
            return Err(invalid("init.file", "is empty"));
        }

        // strategy
        let s = &self.strategy;
        if s.name.is_empty()
            || s.name.len() > 64
            || !s
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        {
            return Err(invalid(
                "strategy.name",
                format!("{:?} must be 1..=64 characters of [A-Za-z0-9_-]", s.name),
            ));
        }
        if s.params.len() > MAX_STRATEGY_PARAMS {
            return Err(invalid(
                "strategy.params",
                format!(
                    "{} entries, more than {MAX_STRATEGY_PARAMS}",
                    s.params.len()
                ),
            ));
        }
        for (k, v) in &s.params {
            let field = format!("strategy.params.{k}");
            if k.is_empty()
                || k.len() > 64
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                return Err(invalid(
                    field,
                    "key must be 1..=64 characters of [A-Za-z0-9_.-]",
                ));
            }
            match v {
                ParamValue::Float(x) if !x.is_finite() => {
                    return Err(invalid(field, "must be finite"));
                }
                ParamValue::Str(t) if t.len() > 256 || t.chars().any(char::is_control) => {
                    return Err(invalid(
                        field,
                        "must be at most 256 bytes without control characters",
                    ));
                }
                _ => {}
            }
        }
        if let Some(n) = s.max_examples_per_site {
            if n == 0 {
                return Err(invalid(
                    "strategy.max_examples_per_site",
                    "must be > 0 (0 would refuse every update)",
                ));
            }
            if let Some(v) = s.params.get("max_num_examples")
                && v.to_string() != n.to_string()
            {
                return Err(invalid(
                    "strategy.max_examples_per_site",
                    format!(
                        "is {n} but strategy.params.max_num_examples is {v}: they are the same \
                         limit, set only one of them"
                    ),
                ));
            }
        }

        // round policy
        let r = &self.round;
        in_range("round.deadline_secs", r.deadline_secs, 1, MAX_DEADLINE_SECS)?;
        in_range(
            "round.extension_secs",
            r.extension_secs,
            0,
            MAX_DEADLINE_SECS,
        )?;
        in_range("round.quorum", r.quorum, 1, MAX_SITES_PER_ROUND)?;
        in_range("round.max_attempts", r.max_attempts, 1, MAX_ATTEMPTS)?;

        // selection
        let sel = &self.selection;
        if !(sel.fraction.is_finite() && sel.fraction > 0.0 && sel.fraction <= 1.0) {
            return Err(invalid(
                "selection.fraction",
                format!("must be in (0, 1], got {}", sel.fraction),
            ));
        }
        in_range(
            "selection.max_sites",
            self.max_sites(),
            1,
            MAX_SITES_PER_ROUND,
        )?;
        in_range("selection.min_sites", self.min_sites(), 1, self.max_sites())?;
        if r.quorum > self.min_sites() {
            return Err(invalid(
                "round.quorum",
                format!(
                    "{} is more than selection.min_sites = {}: a round could never close",
                    r.quorum,
                    self.min_sites()
                ),
            ));
        }
        if let Some(allow) = &sel.allow {
            if allow.is_empty() {
                return Err(invalid(
                    "selection.allow",
                    "is empty: no site could take part",
                ));
            }
            if allow.len() > MAX_SITES_PER_ROUND as usize {
                return Err(invalid("selection.allow", "too many entries"));
            }
            for (i, site) in allow.iter().enumerate() {
                validate_id(&format!("selection.allow[{i}]"), site)?;
            }
        }

        // training
        let t = &self.training;
        in_range("training.epochs", t.epochs, 1, 1000)?;
        in_range("training.batch_size", t.batch_size, 1, 65_536)?;
        finite_pos("training.learning_rate", t.learning_rate)?;
        if let Some(m) = t.momentum {
            if t.optimizer != LocalOptimizer::Sgd {
                return Err(invalid(
                    "training.momentum",
                    format!("applies to optimizer = \"sgd\" only, not {:?}", t.optimizer),
                ));
            }
            if !(m.is_finite() && (0.0..1.0).contains(&m)) {
                return Err(invalid(
                    "training.momentum",
                    format!("{m} is outside [0, 1)"),
                ));
            }
        }
        if let Some(wd) = t.weight_decay {
            if t.optimizer != LocalOptimizer::AdamW {
                return Err(invalid(
                    "training.weight_decay",
                    format!(
                        "applies to optimizer = \"adamw\" only, not {:?} (the wire carries no weight decay for it)",
                        t.optimizer
                    ),
                ));
            }
            if !(wd.is_finite() && (0.0..=MAX_WEIGHT_DECAY).contains(&wd)) {
                return Err(invalid(
                    "training.weight_decay",
                    format!("{wd} is outside 0..={MAX_WEIGHT_DECAY}"),
                ));
            }
            if t.learning_rate * wd >= 1.0 {
                return Err(invalid(
                    "training.weight_decay",
                    format!(
                        "learning_rate × weight_decay = {} must be below 1 (each step scales the weights by 1 − their product)",
                        t.learning_rate * wd
                    ),
                ));
            }
        }
        finite_nonneg("training.fedprox_mu", t.fedprox_mu)?;
        if let Some(a) = &t.augmentation {
            if !matches!(self.arch, ArchSpec::UNet { .. }) {
                return Err(invalid(
                    "training.augmentation",
                    format!(
                        "is implemented for the unet arch only, not {}",
                        self.arch.kind()
                    ),
                ));
            }
            if let Some(j) = a.intensity_jitter {
                let max = fedlink_protocol::MAX_INTENSITY_JITTER;
                for (field, x) in [
                    ("training.augmentation.intensity_jitter.scale", j.scale),
                    ("training.augmentation.intensity_jitter.shift", j.shift),
                ] {
                    if !(x.is_finite() && (0.0..=max).contains(&x)) {
                        return Err(invalid(field, format!("{x} is outside 0..={max}")));
                    }
                }
            }
        }

        // encoding
        let e = &self.encoding;
        in_range("encoding.zstd_level", e.zstd_level, 1, 19)?;
        if !e.chunk_bytes.is_multiple_of(4) {
            return Err(invalid("encoding.chunk_bytes", "must be a multiple of 4"));
        }
        in_range("encoding.chunk_bytes", e.chunk_bytes, 16, 4 * 1024 * 1024)?;
        match (e.codec, e.topk_fraction) {
            (CodecKind::Topk, None) => {
                return Err(invalid(
                    "encoding.topk_fraction",
                    "is required with codec = \"topk\"",
                ));
            }
            (CodecKind::Topk, Some(f)) => {
                if !(f.is_finite() && f > 0.0 && f <= 0.5) {
                    return Err(invalid(
                        "encoding.topk_fraction",
                        format!("must be in (0, 0.5], got {f}"),
                    ));
                }
            }
            (_, Some(_)) => {
                return Err(invalid(
                    "encoding.topk_fraction",
                    "is only valid with codec = \"topk\"",
                ));
            }
            (_, None) => {}
        }
        if e.int8_stochastic && e.codec != CodecKind::Int8 {
            return Err(invalid(
                "encoding.int8_stochastic",
                "is only valid with codec = \"int8\"",
            ));
        }
        if e.downlink == Some(DownlinkKind::Update) && e.codec == CodecKind::Topk {
            return Err(invalid(
                "encoding.downlink",
                "\"update\" is not valid with codec = \"topk\" (it would drop most of every global update); use \"model\"",
            ));
        }
        e.to_protocol()
            .map_err(|err| invalid("encoding", err.to_string()))?;

        // privacy
        let p = &self.privacy;
        if let Some(c) = p.clip_norm {
            finite_pos("privacy.clip_norm", c)?;
        }
        finite_nonneg("privacy.noise_multiplier", p.noise_multiplier)?;
        if p.noise_multiplier > 0.0 && p.clip_norm.is_none() {
            return Err(invalid(
                "privacy.noise_multiplier",
                "noise needs privacy.clip_norm (the sensitivity)",
            ));
        }
        if let Some(d) = p.target_delta
            && !(d.is_finite() && d > 0.0 && d < 1.0)
        {
            return Err(invalid(
                "privacy.target_delta",
                format!("must be in (0, 1), got {d}"),
            ));
        }

        // evaluation
        if let Some(split) = &self.evaluation.split {
            validate_id("evaluation.split", split)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../examples/jobs/breast-cancer-logreg.toml");

    const MINIMAL: &str = r#"
id = "j1"
rounds = 3
arch = { kind = "logreg", inputs = 4, classes = 2 }
init = { seed = 1 }
[strategy]
name = "fedavg"
[round]
deadline_secs = 60
"#;

    fn field_of(err: JobError) -> String {
        match err {
            JobError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn example_job_parses() {
        let job = Job::from_toml(EXAMPLE).unwrap();
        assert_eq!(job.id, "breast-cancer-logreg");
        assert_eq!(
            job.arch,
            ArchSpec::LogReg {
                inputs: 30,
                classes: 2
            }
        );
        assert_eq!(job.init, InitSource::Seed(42));
        assert_eq!(job.strategy.name, "fedavg");
        assert_eq!(job.round.quorum, 2);
        assert_eq!(job.evaluation.split.as_deref(), Some("test"));
        assert_eq!(job.training.optimizer, LocalOptimizer::Sgd);
        let enc = job.encoding.to_protocol().unwrap();
        assert_eq!(enc.values(), fedlink_protocol::ValueCodec::F16);
        assert!(enc.shuffle());
        // Round-trips through TOML unchanged.
        let again = Job::from_toml(&job.to_toml().unwrap()).unwrap();
        assert_eq!(again, job);
    }

    /// `Job::new` with the fields a file must give is the job a file with
    /// only those fields parses to, and it round-trips through TOML.
    #[test]
    fn a_new_job_is_the_minimal_files_job() {
        let job = Job::new(
            "j1",
            3,
            ArchSpec::LogReg {
                inputs: 4,
                classes: 2,
            },
            InitSource::Seed(1),
            StrategySection::named("fedavg"),
            RoundPolicy::with_deadline(60),
        );
        assert_eq!(job, Job::from_toml(MINIMAL).unwrap());
        assert_eq!(Job::from_toml(&job.to_toml().unwrap()).unwrap(), job);
    }

    #[test]
    fn example_job_file_loads_from_disk() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/jobs/breast-cancer-logreg.toml");
        let job = Job::from_file(&path).unwrap();
        assert_eq!(job.rounds, 20);
    }

    #[test]
    fn minimal_job_gets_defaults() {
        let job = Job::from_toml(MINIMAL).unwrap();
        assert_eq!(job.min_sites(), 1);
        assert_eq!(job.max_sites(), MAX_SITES_PER_ROUND);
        assert_eq!(job.selection.fraction, 1.0);
        assert_eq!(job.round.max_attempts, 1);
        assert_eq!(job.training, TrainingConfig::default());
        assert_eq!(job.encoding, DeltaEncoding::default());
        assert_eq!(job.evaluation.every_rounds, 1);
        assert_eq!(job.deadline(), Duration::from_secs(60));
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let text = MINIMAL.replace("[round]", "[round]\ndeadlin_secs = 3");
        let err = Job::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("deadlin_secs"), "{err}");
        let text = format!("colour = 1\n{MINIMAL}");
        let err = Job::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn init_needs_exactly_one_source() {
        let both = MINIMAL.replace("init = { seed = 1 }", "init = { seed = 1, file = \"x\" }");
        assert!(
            Job::from_toml(&both)
                .unwrap_err()
                .to_string()
                .contains("not both")
        );
        let none = MINIMAL.replace("init = { seed = 1 }", "init = {}");
        assert!(
            Job::from_toml(&none)
                .unwrap_err()
                .to_string()
                .contains(&InitError::Neither.to_string())
        );
        let raw = |seed, file: Option<&str>| RawInit {
            seed,
            file: file.map(PathBuf::from),
        };
        assert_eq!(
            InitSource::try_from(raw(Some(1), Some("x"))),
            Err(InitError::Both)
        );
        assert_eq!(
            InitSource::try_from(raw(None, None)),
            Err(InitError::Neither)
        );
        assert_eq!(
            InitSource::try_from(raw(Some(1), None)),
            Ok(InitSource::Seed(1))
        );
        let file = MINIMAL.replace("init = { seed = 1 }", "init = { file = \"w.safetensors\" }");
        assert_eq!(
            Job::from_toml(&file).unwrap().init,
            InitSource::File("w.safetensors".into())
        );
    }

    #[test]
    fn adamw_weight_decay_and_sgd_momentum_reach_the_wire() {
        use fedlink_protocol::Optimizer;
        let with = |training: &str| {
            Job::from_toml(&format!("{MINIMAL}[training]\n{training}\n"))
                .map(|j| j.training.optimizer_to_protocol())
        };
        assert_eq!(
            with("optimizer = \"adamw\"\nlearning_rate = 0.003\nweight_decay = 0.1").unwrap(),
            Optimizer::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
                weight_decay: 0.1
            }
        );
        // absent weight decay is 0: AdamW is then Adam
        assert!(matches!(
            with("optimizer = \"adamw\"").unwrap(),
            Optimizer::AdamW { weight_decay, .. } if weight_decay == 0.0
        ));
        assert_eq!(
            with("optimizer = \"sgd\"\nmomentum = 0.9").unwrap(),
            Optimizer::Sgd { momentum: 0.9 }
        );
        assert_eq!(with("").unwrap(), Optimizer::Sgd { momentum: 0.0 });
        assert!(matches!(
            with("optimizer = \"adam\"").unwrap(),
            Optimizer::Adam { .. }
        ));
        // the job round-trips through its serialized form (the stored job)
        let job = Job::from_toml(&format!(
            "{MINIMAL}[training]\noptimizer = \"adamw\"\nweight_decay = 0.5\n"
        ))
        .unwrap();
        let back: TrainingConfig =
            toml::from_str(&toml::to_string(&job.training).unwrap()).unwrap();
        assert_eq!(back, job.training);
    }

    #[test]
    fn weight_decay_and_momentum_are_checked_and_named() {
        let err = |training: &str| {
            let e = Job::from_toml(&format!("{MINIMAL}[training]\n{training}\n")).unwrap_err();
            let msg = e.to_string();
            (field_of(e), msg)
        };
        for (training, field, says) in [
            (
                "optimizer = \"adamw\"\nweight_decay = -0.1",
                "training.weight_decay",
                "outside",
            ),
            (
                "optimizer = \"adamw\"\nweight_decay = nan",
                "training.weight_decay",
                "outside",
            ),
            (
                "optimizer = \"adamw\"\nweight_decay = inf",
                "training.weight_decay",
                "outside",
            ),
            (
                "optimizer = \"adamw\"\nweight_decay = 15.0",
                "training.weight_decay",
                "outside",
            ),
            (
                "optimizer = \"adamw\"\nlearning_rate = 2.0\nweight_decay = 0.5",
                "training.weight_decay",
                "below 1",
            ),
            (
                "optimizer = \"adam\"\nweight_decay = 0.1",
                "training.weight_decay",
                "adamw",
            ),
            ("weight_decay = 0.1", "training.weight_decay", "adamw"),
            (
                "optimizer = \"sgd\"\nmomentum = 1.0",
                "training.momentum",
                "outside",
            ),
            (
                "optimizer = \"sgd\"\nmomentum = -0.5",
                "training.momentum",
                "outside",
            ),
            (
                "optimizer = \"adamw\"\nmomentum = 0.9",
                "training.momentum",
                "sgd",
            ),
            (
                "optimizer = \"adam\"\nmomentum = 0.9",
                "training.momentum",
                "sgd",
            ),
        ] {
            let (f, msg) = err(training);
            assert_eq!(f, field, "{training}: {msg}");
            assert!(msg.contains(says), "{training}: {msg}");
        }
        let e = Job::from_toml(&format!("{MINIMAL}[training]\noptimizer = \"lamb\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lamb"), "{e}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("id = \"j1\"", "id = \"j 1\"", "id"),
            ("rounds = 3", "rounds = 0", "rounds"),
            (
                "deadline_secs = 60",
                "deadline_secs = 0",
                "round.deadline_secs",
            ),
            (
                "deadline_secs = 60",
                "deadline_secs = 60\nquorum = 3\n[selection]\nmin_sites = 2",
                "round.quorum",
            ),
            (
                "name = \"fedavg\"",
                "name = \"fedavg\"\n[strategy.params]\nlr = nan",
                "strategy.params.lr",
            ),
            ("name = \"fedavg\"", "name = \"fed avg\"", "strategy.name"),
            (
                "deadline_secs = 60",
                "deadline_secs = 60\n[encoding]\ncodec = \"topk\"",
                "encoding.topk_fraction",
            ),
            (
                "deadline_secs = 60",
                "deadline_secs = 60\n[encoding]\nint8_stochastic = true",
                "encoding.int8_stochastic",
            ),
            (
                "deadline_secs = 60",
                "deadline_secs = 60\n[encoding]\ncodec = \"topk\"\ntopk_fraction = 0.01\ndownlink = \"update\"",
                "encoding.downlink",
            ),
            (
                "deadline_secs = 60",
                "deadline_secs = 60\n[privacy]\nnoise_multiplier = 1.0",
                "privacy.noise_multiplier",
            ),
            (
                "deadline_secs = 60",
                "deadline_secs = 60\n[training]\nlearning_rate = -1.0",
                "training.learning_rate",
            ),
            (
                "deadline_secs = 60",
                "deadline_secs = 60\n[selection]\nfraction = 1.5",
                "selection.fraction",
            ),
            (
                "deadline_secs = 60",
                "deadline_secs = 60\n[selection]\nallow = [\"ok\", \"b/ad\"]",
                "selection.allow[1]",
            ),
            ("inputs = 4", "inputs = 0", "arch"),
        ];
        for (from, to, field) in cases {
            let text = MINIMAL.replace(from, to);
            assert_ne!(text, MINIMAL, "{from}");
            assert_eq!(field_of(Job::from_toml(&text).unwrap_err()), field, "{to}");
        }
    }

    #[test]
    fn downlink_defaults_to_the_update_for_the_lossy_codecs_that_carry_it() {
        // f32 (the default codec): whole models unless asked.
        let job = Job::from_toml(MINIMAL).unwrap();
        assert_eq!(job.encoding.downlink, None);
        assert_eq!(job.encoding.downlink_encoding(), None);
        let with = |extra: &str| {
            Job::from_toml(&MINIMAL.replace(
                "deadline_secs = 60",
                &format!("deadline_secs = 60\n[encoding]\n{extra}"),
            ))
            .unwrap()
        };
        let f16 = with("codec = \"f16\"\ndownlink = \"update\"");
        assert_eq!(
            f16.encoding.downlink_encoding().unwrap().values(),
            fedlink_protocol::ValueCodec::F16
        );
        assert_eq!(
            with("downlink = \"model\"").encoding.downlink_encoding(),
            None
        );
        for codec in ["f16", "bf16", "int8"] {
            let job = with(&format!("codec = \"{codec}\""));
            assert_eq!(
                job.encoding.downlink_encoding(),
                Some(job.encoding.to_protocol().unwrap()),
                "{codec}"
            );
        }
        let f32_asked = with("downlink = \"update\"");
        assert_eq!(
            f32_asked.encoding.downlink_encoding(),
            Some(f32_asked.encoding.to_protocol().unwrap())
        );
        let topk = with("codec = \"topk\"\ntopk_fraction = 0.01");
        assert_eq!(topk.encoding.downlink_encoding(), None);
        // Written back and read again unchanged.
        assert_eq!(Job::from_toml(&f16.to_toml().unwrap()).unwrap(), f16);
    }

    #[test]
    fn augmentation_is_parsed_bounded_and_needs_version_5() {
        let unet = MINIMAL.replace(
            "arch = { kind = \"logreg\", inputs = 4, classes = 2 }",
            "arch = { kind = \"unet\", in_channels = 1, base_channels = 4, classes = 2 }",
        );
        let job = Job::from_toml(&unet).unwrap();
        assert_eq!(job.training.augmentation, None);
        assert_eq!(job.min_protocol_version(), 1, "depth 2, no augmentation");
        let deep = unet.replace("base_channels = 4,", "base_channels = 4, depth = 3,");
        assert_eq!(Job::from_toml(&deep).unwrap().min_protocol_version(), 5);

        let aug = format!(
            "{unet}[training.augmentation]\nflips = true\nrotate90 = true\n\
             intensity_jitter = {{ scale = 0.2, shift = 0.1 }}\n"
        );
        let job = Job::from_toml(&aug).unwrap();
        let a = job.training.augmentation.unwrap().to_protocol();
        assert!(a.flips && a.rotate90);
        assert_eq!(
            a.intensity_jitter,
            Some(fedlink_protocol::IntensityJitter {
                scale: 0.2,
                shift: 0.1
            })
        );
        assert_eq!(job.min_protocol_version(), 5);

        for (from, to, field) in [
            (
                "scale = 0.2",
                "scale = 0.7",
                "training.augmentation.intensity_jitter.scale",
            ),
            (
                "shift = 0.1",
                "shift = -0.1",
                "training.augmentation.intensity_jitter.shift",
            ),
            (
                "shift = 0.1",
                "shift = nan",
                "training.augmentation.intensity_jitter.shift",
            ),
        ] {
            let bad = aug.replace(from, to);
            assert_eq!(field_of(Job::from_toml(&bad).unwrap_err()), field, "{to}");
        }
        // a typo is an error, not ignored
        assert!(Job::from_toml(&aug.replace("rotate90", "rotate")).is_err());
        // augmentation on a tabular model is refused
        let tab = format!("{MINIMAL}[training.augmentation]\nflips = true\n");
        assert_eq!(
            field_of(Job::from_toml(&tab).unwrap_err()),
            "training.augmentation"
        );
    }

    #[test]
    fn strategy_params_keep_their_types() {
        let text = MINIMAL.replace(
            "name = \"fedavg\"",
            "name = \"trimmed-mean\"\n[strategy.params]\nbeta = 0.1\nk = 2\nmode = \"x\"\non = true",
        );
        let job = Job::from_toml(&text).unwrap();
        assert_eq!(job.strategy.params["beta"], ParamValue::Float(0.1));
        assert_eq!(job.strategy.params["k"], ParamValue::Int(2));
        assert_eq!(job.strategy.params["on"], ParamValue::Bool(true));
        assert_eq!(
            job.strategy.params_as_strings(),
            vec![
                ("beta".into(), "0.1".into()),
                ("k".into(), "2".into()),
                ("mode".into(), "x".into()),
                ("on".into(), "true".into())
            ]
        );
    }

    #[test]
    fn max_examples_per_site_defaults_far_below_the_aggregators_bound() {
        let job = Job::from_toml(MINIMAL).unwrap();
        assert_eq!(job.strategy.max_examples_per_site, None);
        assert_eq!(job.max_examples_per_site(), DEFAULT_MAX_EXAMPLES_PER_SITE);
        const {
            assert!(
                DEFAULT_MAX_EXAMPLES_PER_SITE
                    < fedlink_aggregation::validate::DEFAULT_MAX_NUM_EXAMPLES
            )
        };
        // Not written back when unset: stored jobs round-trip unchanged.
        assert!(!job.to_toml().unwrap().contains("max_examples_per_site"));

        let set = MINIMAL.replace(
            "name = \"fedavg\"",
            "name = \"fedavg\"\nmax_examples_per_site = 2000",
        );
        let job = Job::from_toml(&set).unwrap();
        assert_eq!(job.max_examples_per_site(), 2000);
        assert_eq!(Job::from_toml(&job.to_toml().unwrap()).unwrap(), job);

        // The strategy parameter alone still works…
        let param = MINIMAL.replace(
            "name = \"fedavg\"",
            "name = \"fedavg\"\n[strategy.params]\nmax_num_examples = 300",
        );
        assert_eq!(Job::from_toml(&param).unwrap().max_examples_per_site(), 300);
        // …and both, when they agree.
        let both = set.replace(
            "max_examples_per_site = 2000",
            "max_examples_per_site = 2000\n[strategy.params]\nmax_num_examples = 2000",
        );
        assert_eq!(Job::from_toml(&both).unwrap().max_examples_per_site(), 2000);
    }

    #[test]
    fn max_examples_per_site_conflicting_or_zero_is_refused() {
        let both = MINIMAL.replace(
            "name = \"fedavg\"",
            "name = \"fedavg\"\nmax_examples_per_site = 2000\n[strategy.params]\nmax_num_examples = 5000",
        );
        let err = Job::from_toml(&both).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("2000") && text.contains("5000") && text.contains("max_num_examples"),
            "{text}"
        );
        assert_eq!(field_of(err), "strategy.max_examples_per_site");
        let zero = MINIMAL.replace(
            "name = \"fedavg\"",
            "name = \"fedavg\"\nmax_examples_per_site = 0",
        );
        assert_eq!(
            field_of(Job::from_toml(&zero).unwrap_err()),
            "strategy.max_examples_per_site"
        );
        let negative = MINIMAL.replace(
            "name = \"fedavg\"",
            "name = \"fedavg\"\nmax_examples_per_site = -1",
        );
        assert!(Job::from_toml(&negative).is_err());
    }

    #[test]
    fn relative_init_file_resolves_against_job_dir() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        let text = MINIMAL.replace("init = { seed = 1 }", "init = { file = \"w.safetensors\" }");
        std::fs::write(&path, text).unwrap();
        let job = Job::from_file(&path).unwrap();
        assert_eq!(job.init, InitSource::File(dir.path().join("w.safetensors")));
    }
}
