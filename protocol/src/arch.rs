//! Model architectures known to fedlink: their exact tensor layout and a
//! deterministic, seeded initialisation.
//!
//! An [`ArchSpec`] names an architecture and its sizes. It travels in job
//! files (TOML) and in protocol messages, so it is untrusted input:
//! [`ArchSpec::validate`] bounds every size before anything is computed.
//!
//! [`ArchSpec::spec`] gives the [`ModelSpec`] that the site agent's burn
//! module has, path for path and shape for shape (burn conventions: `Linear`
//! weights are `[in, out]`, `Conv2d` weights `[out, in, kh, kw]`,
//! `ConvTranspose2d` weights `[in, out, kh, kw]`, `GroupNorm` has `gamma` and
//! `beta`). [`ArchSpec::init`] draws the first global model from a seed, so
//! the coordinator can create it without burn.
//!
//! This module is pure: no burn, no IO.
//!
//! # Serialisation
//!
//! Human-readable formats (TOML, JSON) use an internally tagged form:
//!
//! ```toml
//! [arch]
//! kind = "mlp"
//! inputs = 30
//! hidden = [16, 8]
//! classes = 2
//! ```
//!
//! Binary formats (bincode) cannot read internally tagged enums (they need
//! `deserialize_any`), so there the same enum is encoded externally tagged
//! (variant index, then fields). The choice follows
//! [`serde::Serializer::is_human_readable`].

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::{FlatModel, ModelError, ModelSpec, TensorSpec};

/// Largest number of input features of a tabular model.
pub const MAX_INPUTS: u32 = 1 << 20;
/// Largest number of classes.
pub const MAX_CLASSES: u32 = 10_000;
/// Most hidden layers of an MLP.
pub const MAX_HIDDEN_LAYERS: usize = 16;
/// Widest hidden layer of an MLP.
pub const MAX_HIDDEN_WIDTH: u32 = 1 << 16;
/// Most input channels of an image model.
pub const MAX_IN_CHANNELS: u32 = 64;
/// Longest image side, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 4096;
/// Most base channels of a U-Net.
pub const MAX_BASE_CHANNELS: u32 = 256;
/// Fewest down-sampling levels of a U-Net.
pub const MIN_UNET_DEPTH: u32 = 1;
/// Most down-sampling levels of a U-Net (input sides must be multiples of
/// `2^depth`).
pub const MAX_UNET_DEPTH: u32 = 6;
/// Depth of a U-Net whose spec does not say (the original fixed 2-level
/// U-Net; its binary encoding is unchanged).
pub const DEFAULT_UNET_DEPTH: u32 = 2;
/// Most parameters a built-in architecture may have: 2^28 (1 GiB of f32,
/// the size of a large vision transformer). It bounds every allocation a
/// job description can cause; each site also has its own, lower limit
/// (the agent's `max_model_params`, 2^26 by default).
pub const MAX_ARCH_PARAMS: u64 = 1 << 28;

/// Channels of the two convolution stages of [`ArchSpec::Cnn`].
pub const CNN_CHANNELS: [u32; 2] = [16, 32];
/// Kernel size of every 3×3 convolution.
const K3: u64 = 3;
/// Groups of every `GroupNorm` in the U-Net (divides every channel count,
/// see [`unet_norm_groups`]).
const UNET_MAX_GROUPS: u32 = 4;

/// A model architecture and its sizes.
///
/// Every classifier outputs `classes` logits (softmax cross-entropy); a
/// binary task uses `classes = 2`.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ArchSpec {
    /// Multinomial logistic regression: one linear layer on `inputs` features.
    LogReg {
        /// Number of input features.
        inputs: u32,
        /// Number of classes (≥ 2).
        classes: u32,
    },
    /// Multilayer perceptron with ReLU between layers.
    Mlp {
        /// Number of input features.
        inputs: u32,
        /// Width of each hidden layer, input side first (at least one).
        hidden: Vec<u32>,
        /// Number of classes (≥ 2).
        classes: u32,
    },
    /// Small CNN for image classification: two stages of 3×3 convolution
    /// (16 and 32 channels, padding 1) + ReLU + 2×2 max-pool, then one linear
    /// layer on the flattened `32 × height/4 × width/4` features.
    Cnn {
        /// Image channels (1 = grayscale, 3 = RGB).
        in_channels: u32,
        /// Image height in pixels (multiple of 4).
        height: u32,
        /// Image width in pixels (multiple of 4).
        width: u32,
        /// Number of classes (≥ 2).
        classes: u32,
    },
    /// 2D U-Net for semantic segmentation with `depth` down-sampling levels
    /// (2×2 max-pool): level `i` (1-based) has `c · 2^(i-1)` channels and the
    /// bottleneck `c · 2^depth`, with `c = base_channels`; each block is
    /// (3×3 conv → GroupNorm → ReLU) × 2; up-sampling by 2×2 transposed
    /// convolution, concatenated with the encoder's skip connection; a 1×1
    /// convolution head with `classes` channels. Input height and width must
    /// be multiples of `2^depth`.
    ///
    /// Tensor paths: `enc1..enc{depth}`, `bottleneck`, `up{depth}..up1`,
    /// `dec{depth}..dec1`, `head` (so a depth-2 U-Net has the paths it had
    /// before `depth` existed).
    UNet {
        /// Image channels.
        in_channels: u32,
        /// Channels of the first level.
        base_channels: u32,
        /// Down-sampling levels ([`MIN_UNET_DEPTH`]..=[`MAX_UNET_DEPTH`];
        /// [`DEFAULT_UNET_DEPTH`] when a job file leaves it out).
        depth: u32,
        /// Number of segmentation classes, background included (≥ 2).
        classes: u32,
    },
}

/// Why an architecture was refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchError {
    /// A size is outside its allowed range.
    #[error("{field} = {value} is out of range (allowed {min}..={max})")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// Value given.
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// A size must be a multiple of some number.
    #[error("{field} = {value} must be a multiple of {multiple_of}")]
    NotMultiple {
        /// Which field.
        field: &'static str,
        /// Value given.
        value: u64,
        /// Required divisor.
        multiple_of: u64,
    },
    /// The architecture has more than [`MAX_ARCH_PARAMS`] parameters.
    #[error("architecture has {params} parameters, more than the limit of {MAX_ARCH_PARAMS}")]
    TooManyParams {
        /// Parameter count (saturated at `u64::MAX`).
        params: u64,
    },
    /// The derived model spec is invalid.
    #[error("invalid model spec: {0}")]
    Model(#[from] ModelError),
}

/// How a parameter tensor is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    /// Uniform on `[-bound, bound)`.
    Uniform { bound: f32 },
    /// All zeros (biases, norm shifts).
    Zeros,
    /// All ones (norm scales).
    Ones,
}

/// A parameter tensor: where it is, its shape, how it starts.
#[derive(Clone, Debug)]
struct ParamDef {
    path: String,
    shape: Vec<u64>,
    init: Init,
}

/// Gain of a layer followed by a ReLU (He/Kaiming, `sqrt(2)`): the uniform
/// bound is `sqrt(6 / fan_in)`.
fn he_bound(fan_in: u64) -> f32 {
    (6.0 / fan_in.max(1) as f64).sqrt() as f32
}

/// burn's default (`KaimingUniform { gain: 1/sqrt(3) }`): the uniform bound
/// is `1 / sqrt(fan_in)`. Used for output layers (logits).
fn output_bound(fan_in: u64) -> f32 {
    (1.0 / (fan_in.max(1) as f64).sqrt()) as f32
}

/// Number of `GroupNorm` groups for a U-Net block with `channels` channels:
/// `gcd(channels, 4)`.
pub fn unet_norm_groups(channels: u32) -> u32 {
    let (mut a, mut b) = (channels, UNET_MAX_GROUPS);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

fn range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), ArchError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ArchError::OutOfRange {
            field,
            value,
            min,
            max,
        })
    }
}

fn multiple(field: &'static str, value: u64, multiple_of: u64) -> Result<(), ArchError> {
    if value.is_multiple_of(multiple_of) {
        Ok(())
    } else {
        Err(ArchError::NotMultiple {
            field,
            value,
            multiple_of,
        })
    }
}

/// Builder of parameter lists, burn naming.
#[derive(Default)]
struct Params(Vec<ParamDef>);

impl Params {
    fn push(&mut self, path: String, shape: Vec<u64>, init: Init) {
        self.0.push(ParamDef { path, shape, init });
    }

    /// burn `Linear` (`[in, out]` weight and `[out]` bias).
    fn linear(&mut self, name: &str, d_in: u64, d_out: u64, relu_follows: bool) {
        let bound = if relu_follows {
            he_bound(d_in)
        } else {
            output_bound(d_in)
        };
        self.push(
            format!("{name}.weight"),
            vec![d_in, d_out],
            Init::Uniform { bound },
        );
        self.push(format!("{name}.bias"), vec![d_out], Init::Zeros);
    }

    /// burn `Conv2d` (`[out, in, k, k]` weight and `[out]` bias).
    fn conv(&mut self, name: &str, c_in: u64, c_out: u64, k: u64, relu_follows: bool) {
        let fan_in = c_in * k * k;
        let bound = if relu_follows {
            he_bound(fan_in)
        } else {
            output_bound(fan_in)
        };
        self.push(
            format!("{name}.weight"),
            vec![c_out, c_in, k, k],
            Init::Uniform { bound },
        );
        self.push(format!("{name}.bias"), vec![c_out], Init::Zeros);
    }

    /// burn `ConvTranspose2d` (`[in, out, k, k]` weight, `[out]` bias; burn
    /// takes `fan_in = out · k · k`).
    fn conv_transpose(&mut self, name: &str, c_in: u64, c_out: u64, k: u64) {
        self.push(
            format!("{name}.weight"),
            vec![c_in, c_out, k, k],
            Init::Uniform {
                bound: output_bound(c_out * k * k),
            },
        );
        self.push(format!("{name}.bias"), vec![c_out], Init::Zeros);
    }

    /// burn `GroupNorm` with affine parameters.
    fn group_norm(&mut self, name: &str, channels: u64) {
        self.push(format!("{name}.gamma"), vec![channels], Init::Ones);
        self.push(format!("{name}.beta"), vec![channels], Init::Zeros);
    }

    /// U-Net block: (conv3×3 → GroupNorm → ReLU) × 2.
    fn double_conv(&mut self, name: &str, c_in: u64, c_out: u64) {
        self.conv(&format!("{name}.conv1"), c_in, c_out, K3, true);
        self.group_norm(&format!("{name}.norm1"), c_out);
        self.conv(&format!("{name}.conv2"), c_out, c_out, K3, true);
        self.group_norm(&format!("{name}.norm2"), c_out);
    }
}

impl ArchSpec {
    /// Whether only protocol version 5
    /// ([`TRAINING_V5_VERSION`](crate::message::TRAINING_V5_VERSION)) and
    /// later decode this architecture: a U-Net of depth other than
    /// [`DEFAULT_UNET_DEPTH`] travels as the `unet_deep` encoding, which
    /// older builds do not know.
    pub fn needs_training_v5(&self) -> bool {
        matches!(self, Self::UNet { depth, .. } if *depth != DEFAULT_UNET_DEPTH)
    }

    /// Short name of the architecture kind (`logreg`, `mlp`, `cnn`, `unet`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::LogReg { .. } => "logreg",
            Self::Mlp { .. } => "mlp",
            Self::Cnn { .. } => "cnn",
            Self::UNet { .. } => "unet",
        }
    }

    /// Number of classes the model predicts.
    pub fn classes(&self) -> u32 {
        match self {
            Self::LogReg { classes, .. }
            | Self::Mlp { classes, .. }
            | Self::Cnn { classes, .. }
            | Self::UNet { classes, .. } => *classes,
        }
    }

    /// Check every size against its bounds, then the total parameter count
    /// against [`MAX_ARCH_PARAMS`]. Cheap: nothing is allocated in
    /// proportion to the sizes.
    pub fn validate(&self) -> Result<(), ArchError> {
        self.check_fields()?;
        let params = self.num_params();
        if params > MAX_ARCH_PARAMS {
            return Err(ArchError::TooManyParams { params });
        }
        Ok(())
    }

    fn check_fields(&self) -> Result<(), ArchError> {
        let classes = u64::from(self.classes());
        range("classes", classes, 2, u64::from(MAX_CLASSES))?;
        match self {
            Self::LogReg { inputs, .. } => range("inputs", (*inputs).into(), 1, MAX_INPUTS.into()),
            Self::Mlp { inputs, hidden, .. } => {
                range("inputs", (*inputs).into(), 1, MAX_INPUTS.into())?;
                range(
                    "hidden layers",
                    hidden.len() as u64,
                    1,
                    MAX_HIDDEN_LAYERS as u64,
                )?;
                for h in hidden {
                    range("hidden width", (*h).into(), 1, MAX_HIDDEN_WIDTH.into())?;
                }
                Ok(())
            }
            Self::Cnn {
                in_channels,
                height,
                width,
                ..
            } => {
                range(
                    "in_channels",
                    (*in_channels).into(),
                    1,
                    MAX_IN_CHANNELS.into(),
                )?;
                range("height", (*height).into(), 4, MAX_IMAGE_SIDE.into())?;
                range("width", (*width).into(), 4, MAX_IMAGE_SIDE.into())?;
                multiple("height", (*height).into(), 4)?;
                multiple("width", (*width).into(), 4)
            }
            Self::UNet {
                in_channels,
                base_channels,
                depth,
                classes,
            } => {
                range(
                    "in_channels",
                    (*in_channels).into(),
                    1,
                    MAX_IN_CHANNELS.into(),
                )?;
                range(
                    "base_channels",
                    (*base_channels).into(),
                    1,
                    MAX_BASE_CHANNELS.into(),
                )?;
                range(
                    "depth",
                    (*depth).into(),
                    MIN_UNET_DEPTH.into(),
                    MAX_UNET_DEPTH.into(),
                )?;
                range("classes", (*classes).into(), 2, 256)
            }
        }
    }

    /// Parameter count, saturating (call after the field checks: with them
    /// every intermediate product fits comfortably in `u64`).
    fn num_params(&self) -> u64 {
        self.params()
            .0
            .iter()
            .map(|p| p.shape.iter().fold(1u64, |acc, &d| acc.saturating_mul(d)))
            .fold(0u64, u64::saturating_add)
    }

    /// Parameter list in burn's naming, unsorted. Only called after
    /// [`Self::check_fields`], so sizes are bounded.
    fn params(&self) -> Params {
        let mut p = Params::default();
        match self {
            Self::LogReg { inputs, classes } => {
                p.linear("linear", (*inputs).into(), (*classes).into(), false);
            }
            Self::Mlp {
                inputs,
                hidden,
                classes,
            } => {
                let mut d_in = u64::from(*inputs);
                for (i, h) in hidden.iter().enumerate() {
                    p.linear(&format!("hidden.{i}"), d_in, (*h).into(), true);
                    d_in = (*h).into();
                }
                p.linear("output", d_in, (*classes).into(), false);
            }
            Self::Cnn {
                in_channels,
                height,
                width,
                classes,
            } => {
                let [c1, c2] = CNN_CHANNELS.map(u64::from);
                p.conv("conv1", (*in_channels).into(), c1, K3, true);
                p.conv("conv2", c1, c2, K3, true);
                let flat = c2 * u64::from(*height / 4) * u64::from(*width / 4);
                p.linear("fc", flat, (*classes).into(), false);
            }
            Self::UNet {
                in_channels,
                base_channels,
                depth,
                classes,
            } => {
                // Level i (1-based) has c·2^(i-1) channels; the bottleneck c·2^depth.
                let width = |level: u32| u64::from(*base_channels) << level;
                let mut c_in = u64::from(*in_channels);
                for i in 1..=*depth {
                    p.double_conv(&format!("enc{i}"), c_in, width(i - 1));
                    c_in = width(i - 1);
                }
                p.double_conv("bottleneck", c_in, width(*depth));
                for i in (1..=*depth).rev() {
                    p.conv_transpose(&format!("up{i}"), width(i), width(i - 1), 2);
                    p.double_conv(&format!("dec{i}"), 2 * width(i - 1), width(i - 1));
                }
                p.conv("head", width(0), (*classes).into(), 1, false);
            }
        }
        p
    }

    /// Validated parameter definitions in canonical (spec) order.
    fn sorted_params(&self) -> Result<(ModelSpec, Vec<ParamDef>), ArchError> {
        self.validate()?;
        let mut defs = self.params().0;
        defs.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        let spec = ModelSpec::new(
            defs.iter()
                .map(|d| TensorSpec::f32(d.path.clone(), d.shape.clone()))
                .collect(),
        )?;
        Ok((spec, defs))
    }

    /// The exact tensors (paths and shapes) of this architecture's burn
    /// module, in canonical order. Validates first.
    pub fn spec(&self) -> Result<ModelSpec, ArchError> {
        self.sorted_params().map(|(spec, _)| spec)
    }

    /// A deterministic initial model drawn from `seed` (ChaCha8).
    ///
    /// Weights: uniform on `[-b, b)`, with `b = sqrt(6 / fan_in)` (He) for
    /// layers followed by a ReLU and `b = 1 / sqrt(fan_in)` (burn's default)
    /// for output layers and transposed convolutions. Biases and norm shifts
    /// are zeros, norm scales ones. Tensors are drawn in canonical order from
    /// one stream, so the same `(arch, seed)` gives bit-identical models on
    /// every platform.
    pub fn init(&self, seed: u64) -> Result<FlatModel, ArchError> {
        let (spec, defs) = self.sorted_params()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut values = Vec::with_capacity(usize::try_from(spec.num_params()).unwrap_or(0));
        for (i, def) in defs.iter().enumerate() {
            let n = spec.range(i).map_or(0, |r| r.len());
            match def.init {
                Init::Uniform { bound } => {
                    values.extend((0..n).map(|_| rng.gen_range(-bound..bound)));
                }
                Init::Zeros => values.extend(std::iter::repeat_n(0.0, n)),
                Init::Ones => values.extend(std::iter::repeat_n(1.0, n)),
            }
        }
        Ok(FlatModel::new(spec, values)?)
    }
}

// --- serde: internally tagged when human-readable, externally tagged otherwise.

/// Binary (externally tagged) mirror of [`ArchSpec`]. Variants are only
/// ever appended: index 3 is the U-Net as it was before `depth` existed (a
/// depth-2 U-Net is still written this way, byte for byte), index 4 a U-Net
/// of any depth.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Repr {
    #[serde(rename = "logreg")]
    LogReg { inputs: u32, classes: u32 },
    Mlp {
        inputs: u32,
        hidden: Vec<u32>,
        classes: u32,
    },
    Cnn {
        in_channels: u32,
        height: u32,
        width: u32,
        classes: u32,
    },
    #[serde(rename = "unet")]
    UNet {
        in_channels: u32,
        base_channels: u32,
        classes: u32,
    },
    #[serde(rename = "unet_deep")]
    UNetDeep {
        in_channels: u32,
        base_channels: u32,
        depth: u32,
        classes: u32,
    },
}

fn default_unet_depth() -> u32 {
    DEFAULT_UNET_DEPTH
}

/// Human-readable mirror, internally tagged by `kind`; a U-Net's `depth`
/// defaults to [`DEFAULT_UNET_DEPTH`].
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum TaggedRepr {
    #[serde(rename = "logreg")]
    LogReg { inputs: u32, classes: u32 },
    Mlp {
        inputs: u32,
        hidden: Vec<u32>,
        classes: u32,
    },
    Cnn {
        in_channels: u32,
        height: u32,
        width: u32,
        classes: u32,
    },
    #[serde(rename = "unet")]
    UNet {
        in_channels: u32,
        base_channels: u32,
        #[serde(default = "default_unet_depth")]
        depth: u32,
        classes: u32,
    },
}

impl From<ArchSpec> for Repr {
    fn from(a: ArchSpec) -> Self {
        match a {
            ArchSpec::LogReg { inputs, classes } => Self::LogReg { inputs, classes },
            ArchSpec::Mlp {
                inputs,
                hidden,
                classes,
            } => Self::Mlp {
                inputs,
                hidden,
                classes,
            },
            ArchSpec::Cnn {
                in_channels,
                height,
                width,
                classes,
            } => Self::Cnn {
                in_channels,
                height,
                width,
                classes,
            },
            ArchSpec::UNet {
                in_channels,
                base_channels,
                depth: DEFAULT_UNET_DEPTH,
                classes,
            } => Self::UNet {
                in_channels,
                base_channels,
                classes,
            },
            ArchSpec::UNet {
                in_channels,
                base_channels,
                depth,
                classes,
            } => Self::UNetDeep {
                in_channels,
                base_channels,
                depth,
                classes,
            },
        }
    }
}

impl From<Repr> for ArchSpec {
    fn from(a: Repr) -> Self {
        match a {
            Repr::LogReg { inputs, classes } => Self::LogReg { inputs, classes },
            Repr::Mlp {
                inputs,
                hidden,
                classes,
            } => Self::Mlp {
                inputs,
                hidden,
                classes,
            },
            Repr::Cnn {
                in_channels,
                height,
                width,
                classes,
            } => Self::Cnn {
                in_channels,
                height,
                width,
                classes,
            },
            Repr::UNet {
                in_channels,
                base_channels,
                classes,
            } => Self::UNet {
                in_channels,
                base_channels,
                depth: DEFAULT_UNET_DEPTH,
                classes,
            },
            Repr::UNetDeep {
                in_channels,
                base_channels,
                depth,
                classes,
            } => Self::UNet {
                in_channels,
                base_channels,
                depth,
                classes,
            },
        }
    }
}

macro_rules! convert {
    ($from:ident => $to:ident) => {
        impl From<$from> for $to {
            fn from(a: $from) -> Self {
                match a {
                    $from::LogReg { inputs, classes } => Self::LogReg { inputs, classes },
                    $from::Mlp {
                        inputs,
                        hidden,
                        classes,
                    } => Self::Mlp {
                        inputs,
                        hidden,
                        classes,
                    },
                    $from::Cnn {
                        in_channels,
                        height,
                        width,
                        classes,
                    } => Self::Cnn {
                        in_channels,
                        height,
                        width,
                        classes,
                    },
                    $from::UNet {
                        in_channels,
                        base_channels,
                        depth,
                        classes,
                    } => Self::UNet {
                        in_channels,
                        base_channels,
                        depth,
                        classes,
                    },
                }
            }
        }
    };
}
convert!(ArchSpec => TaggedRepr);
convert!(TaggedRepr => ArchSpec);

impl Serialize for ArchSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            TaggedRepr::from(self.clone()).serialize(s)
        } else {
            Repr::from(self.clone()).serialize(s)
        }
    }
}

/// Deserialisation checks only the shape of the data; call
/// [`ArchSpec::validate`] (or [`ArchSpec::spec`]) before using the sizes.
impl<'de> Deserialize<'de> for ArchSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            TaggedRepr::deserialize(d).map(Self::from)
        } else {
            Repr::deserialize(d).map(Self::from)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_small() -> Vec<ArchSpec> {
        vec![
            ArchSpec::LogReg {
                inputs: 30,
                classes: 2,
            },
            ArchSpec::Mlp {
                inputs: 30,
                hidden: vec![16, 8],
                classes: 2,
            },
            ArchSpec::Cnn {
                in_channels: 1,
                height: 16,
                width: 12,
                classes: 3,
            },
            ArchSpec::UNet {
                in_channels: 1,
                base_channels: 8,
                depth: 2,
                classes: 2,
            },
        ]
    }

    fn shape_of(spec: &ModelSpec, path: &str) -> Vec<u64> {
        let i = spec.index_of(path).unwrap();
        spec.tensors()[i].shape.clone()
    }

    #[test]
    fn logreg_and_mlp_specs_follow_burn_layout() {
        let spec = all_small()[0].spec().unwrap();
        assert_eq!(spec.tensors().len(), 2);
        assert_eq!(shape_of(&spec, "linear.weight"), vec![30, 2]);
        assert_eq!(shape_of(&spec, "linear.bias"), vec![2]);
        assert_eq!(spec.num_params(), 62);

        let spec = all_small()[1].spec().unwrap();
        let paths: Vec<_> = spec.tensors().iter().map(|t| t.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "hidden.0.bias",
                "hidden.0.weight",
                "hidden.1.bias",
                "hidden.1.weight",
                "output.bias",
                "output.weight"
            ]
        );
        assert_eq!(shape_of(&spec, "hidden.1.weight"), vec![16, 8]);
        assert_eq!(shape_of(&spec, "output.weight"), vec![8, 2]);
        assert_eq!(spec.num_params(), 30 * 16 + 16 + 16 * 8 + 8 + 8 * 2 + 2);
    }

    #[test]
    fn cnn_and_unet_specs() {
        let spec = all_small()[2].spec().unwrap();
        assert_eq!(shape_of(&spec, "conv1.weight"), vec![16, 1, 3, 3]);
        assert_eq!(shape_of(&spec, "conv2.weight"), vec![32, 16, 3, 3]);
        // 16×12 image → 4×3 after two pools, 32 channels.
        assert_eq!(shape_of(&spec, "fc.weight"), vec![32 * 4 * 3, 3]);

        let spec = all_small()[3].spec().unwrap();
        assert_eq!(shape_of(&spec, "enc1.conv1.weight"), vec![8, 1, 3, 3]);
        assert_eq!(
            shape_of(&spec, "bottleneck.conv2.weight"),
            vec![32, 32, 3, 3]
        );
        assert_eq!(shape_of(&spec, "up2.weight"), vec![32, 16, 2, 2]);
        assert_eq!(shape_of(&spec, "dec2.conv1.weight"), vec![16, 32, 3, 3]);
        assert_eq!(shape_of(&spec, "dec1.norm2.gamma"), vec![8]);
        assert_eq!(shape_of(&spec, "head.weight"), vec![2, 8, 1, 1]);
        assert_eq!(spec.tensors().len(), 5 * 8 + 2 * 2 + 2);
        assert_eq!(unet_norm_groups(8), 4);
        assert_eq!(unet_norm_groups(6), 2);
        assert_eq!(unet_norm_groups(3), 1);
    }

    #[test]
    fn init_is_deterministic_and_follows_the_rules() {
        for arch in all_small() {
            let a = arch.init(7).unwrap();
            let b = arch.init(7).unwrap();
            let c = arch.init(8).unwrap();
            assert_eq!(a.hash(), b.hash(), "{arch:?}");
            assert_ne!(a.hash(), c.hash(), "{arch:?}");
            assert_eq!(a.spec(), &arch.spec().unwrap());
            for (i, t) in a.spec().tensors().iter().enumerate() {
                let v = a.tensor(i).unwrap();
                if t.path.ends_with(".bias") || t.path.ends_with(".beta") {
                    assert!(v.iter().all(|&x| x == 0.0), "{}", t.path);
                } else if t.path.ends_with(".gamma") {
                    assert!(v.iter().all(|&x| x == 1.0), "{}", t.path);
                } else {
                    assert!(v.iter().any(|&x| x != 0.0), "{}", t.path);
                }
            }
        }
        // Bounds: MLP first layer is He (sqrt(6/30)), output is 1/sqrt(8).
        let m = all_small()[1].init(1).unwrap();
        let he = (6.0f32 / 30.0).sqrt();
        let w0 = m.tensor_by_path("hidden.0.weight").unwrap();
        assert!(w0.iter().all(|x| x.abs() < he));
        assert!(w0.iter().any(|x| x.abs() > he * 0.9));
        let out = m.tensor_by_path("output.weight").unwrap();
        assert!(out.iter().all(|x| x.abs() < 1.0 / 8f32.sqrt()));
    }

    #[test]
    fn init_is_stable_across_versions() {
        // Pin the first values so an accidental change of RNG or order shows.
        let m = ArchSpec::LogReg {
            inputs: 2,
            classes: 2,
        }
        .init(0)
        .unwrap();
        let again = ArchSpec::LogReg {
            inputs: 2,
            classes: 2,
        }
        .init(0)
        .unwrap();
        assert_eq!(m.values(), again.values());
        assert_eq!(&m.values()[..2], &[0.0, 0.0]); // linear.bias comes first
        assert!(m.values()[2..].iter().all(|x| x.abs() < 1.0 / 2f32.sqrt()));
    }

    #[test]
    fn validate_refuses_absurd_sizes() {
        let bad = [
            ArchSpec::LogReg {
                inputs: 0,
                classes: 2,
            },
            ArchSpec::LogReg {
                inputs: 3,
                classes: 1,
            },
            ArchSpec::LogReg {
                inputs: u32::MAX,
                classes: 2,
            },
            ArchSpec::Mlp {
                inputs: 3,
                hidden: vec![],
                classes: 2,
            },
            ArchSpec::Mlp {
                inputs: 3,
                hidden: vec![4; 17],
                classes: 2,
            },
            ArchSpec::Cnn {
                in_channels: 1,
                height: 30,
                width: 32,
                classes: 2,
            },
            ArchSpec::Cnn {
                in_channels: 1,
                height: 0,
                width: 32,
                classes: 2,
            },
            ArchSpec::UNet {
                in_channels: 1,
                base_channels: 0,
                depth: 2,
                classes: 2,
            },
            ArchSpec::UNet {
                in_channels: 1,
                base_channels: 8,
                depth: 0,
                classes: 2,
            },
            ArchSpec::UNet {
                in_channels: 1,
                base_channels: 8,
                depth: MAX_UNET_DEPTH + 1,
                classes: 2,
            },
        ];
        for arch in bad {
            assert!(arch.validate().is_err(), "{arch:?}");
            assert!(arch.spec().is_err(), "{arch:?}");
            assert!(arch.init(0).is_err(), "{arch:?}");
        }
        // Every field within bounds, but the product is too large.
        let huge = ArchSpec::Mlp {
            inputs: MAX_INPUTS,
            hidden: vec![MAX_HIDDEN_WIDTH; MAX_HIDDEN_LAYERS],
            classes: MAX_CLASSES,
        };
        assert!(matches!(
            huge.validate(),
            Err(ArchError::TooManyParams { .. })
        ));
        let big_cnn = ArchSpec::Cnn {
            in_channels: 64,
            height: 4096,
            width: 4096,
            classes: 10_000,
        };
        assert!(matches!(
            big_cnn.validate(),
            Err(ArchError::TooManyParams { .. })
        ));
        let unet = ArchSpec::UNet {
            in_channels: 64,
            base_channels: 256,
            depth: 2,
            classes: 256,
        };
        assert!(unet.validate().is_ok(), "largest 2-level U-Net fits");
        let deepest = ArchSpec::UNet {
            in_channels: 64,
            base_channels: 256,
            depth: MAX_UNET_DEPTH,
            classes: 256,
        };
        assert!(matches!(
            deepest.validate(),
            Err(ArchError::TooManyParams { .. })
        ));
    }

    #[test]
    fn deep_unet_spec_generalises_the_two_level_paths() {
        let deep = ArchSpec::UNet {
            in_channels: 1,
            base_channels: 4,
            depth: 3,
            classes: 2,
        };
        let spec = deep.spec().unwrap();
        assert_eq!(shape_of(&spec, "enc1.conv1.weight"), vec![4, 1, 3, 3]);
        assert_eq!(shape_of(&spec, "enc3.conv2.weight"), vec![16, 16, 3, 3]);
        assert_eq!(
            shape_of(&spec, "bottleneck.conv1.weight"),
            vec![32, 16, 3, 3]
        );
        assert_eq!(shape_of(&spec, "up3.weight"), vec![32, 16, 2, 2]);
        assert_eq!(shape_of(&spec, "dec3.conv1.weight"), vec![16, 32, 3, 3]);
        assert_eq!(shape_of(&spec, "up1.weight"), vec![8, 4, 2, 2]);
        assert_eq!(shape_of(&spec, "head.weight"), vec![2, 4, 1, 1]);
        // 3 encoder + 1 bottleneck + 3 decoder blocks of 8 tensors, 3 ups, head.
        assert_eq!(spec.tensors().len(), 7 * 8 + 3 * 2 + 2);
        // depth 2 keeps exactly the paths and shapes of the fixed 2-level U-Net.
        let two = all_small()[3].spec().unwrap();
        let paths: Vec<_> = two.tensors().iter().map(|t| t.path.as_str()).collect();
        assert!(paths.contains(&"enc2.norm2.beta") && paths.contains(&"up2.bias"));
        assert!(!paths.iter().any(|p| p.starts_with("enc3")));
    }

    #[test]
    fn demo_unet_has_more_than_ten_million_parameters() {
        // The configuration of the `nuclei` demo task (docs/PERFORMANCE.md).
        let demo = ArchSpec::UNet {
            in_channels: 1,
            base_channels: 20,
            depth: 5,
            classes: 2,
        };
        assert_eq!(demo.spec().unwrap().num_params(), 12_155_322);
    }

    #[test]
    fn two_level_unet_keeps_its_binary_encoding() {
        let cfg = bincode::config::standard();
        // Variant index 3, then in_channels, base_channels, classes: the
        // encoding from before `depth` existed.
        let bytes = bincode::serde::encode_to_vec(&all_small()[3], cfg).unwrap();
        assert_eq!(bytes, [3, 1, 8, 2]);
        let deep = ArchSpec::UNet {
            in_channels: 1,
            base_channels: 8,
            depth: 4,
            classes: 2,
        };
        let bytes = bincode::serde::encode_to_vec(&deep, cfg).unwrap();
        assert_eq!(bytes, [4, 1, 8, 4, 2]);
        let (back, _): (ArchSpec, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back, deep);
    }

    #[test]
    fn binary_serde_round_trip() {
        let cfg = bincode::config::standard();
        for arch in all_small() {
            let bytes = bincode::serde::encode_to_vec(&arch, cfg).unwrap();
            let (back, n): (ArchSpec, usize) =
                bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            assert_eq!(back, arch);
            assert_eq!(n, bytes.len());
        }
        let garbage = [9u8, 1, 2];
        assert!(bincode::serde::decode_from_slice::<ArchSpec, _>(&garbage, cfg).is_err());
    }
}
