//! burn modules for every [`ArchSpec`]: logistic regression, MLP, small CNN,
//! U-Net of configurable width and depth. Parameter paths and shapes equal [`ArchSpec::spec`] exactly
//! (checked by a test), so [`crate::weights`] can move values in and out by
//! path.
//!
//! The modules are built with burn's own initialisers and then always
//! overwritten from a [`fedlink_protocol::FlatModel`]: the initial values of
//! a federation come from [`ArchSpec::init`], not from burn.

use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;
use fedlink_protocol::arch::{
    ArchSpec, CNN_CHANNELS, MAX_UNET_DEPTH, MIN_UNET_DEPTH, unet_norm_groups,
};

/// Multinomial logistic regression.
#[derive(Module, Debug)]
pub struct LogReg {
    linear: Linear,
}

/// Multilayer perceptron, ReLU between layers.
#[derive(Module, Debug)]
pub struct Mlp {
    hidden: Vec<Linear>,
    output: Linear,
}

/// Two conv stages and a linear classifier on the flattened features.
#[derive(Module, Debug)]
pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    fc: Linear,
}

/// (3×3 conv → GroupNorm → ReLU) × 2.
#[derive(Module, Debug)]
pub struct DoubleConv {
    conv1: Conv2d,
    norm1: GroupNorm,
    conv2: Conv2d,
    norm2: GroupNorm,
}

/// U-Net of 1 to [`MAX_UNET_DEPTH`] levels. Level `i` is `enc{i}`, `up{i}`,
/// `dec{i}` (the field names are the tensor paths of [`ArchSpec::spec`]);
/// levels deeper than the architecture's `depth` are `None` and hold no
/// parameters. burn names `Vec` elements `enc.0`, so fixed fields keep the
/// paths of the original 2-level U-Net.
#[derive(Module, Debug)]
pub struct UNet {
    enc1: DoubleConv,
    enc2: Option<DoubleConv>,
    enc3: Option<DoubleConv>,
    enc4: Option<DoubleConv>,
    enc5: Option<DoubleConv>,
    enc6: Option<DoubleConv>,
    bottleneck: DoubleConv,
    up1: ConvTranspose2d,
    up2: Option<ConvTranspose2d>,
    up3: Option<ConvTranspose2d>,
    up4: Option<ConvTranspose2d>,
    up5: Option<ConvTranspose2d>,
    up6: Option<ConvTranspose2d>,
    dec1: DoubleConv,
    dec2: Option<DoubleConv>,
    dec3: Option<DoubleConv>,
    dec4: Option<DoubleConv>,
    dec5: Option<DoubleConv>,
    dec6: Option<DoubleConv>,
    head: Conv2d,
    pool: MaxPool2d,
}

impl UNet {
    fn new(in_channels: usize, c: usize, depth: usize, classes: usize, device: &Device) -> Self {
        let width = |level: usize| c << level;
        let up = |level: usize| {
            (level <= depth).then(|| {
                ConvTranspose2dConfig::new([width(level), width(level - 1)], [2, 2])
                    .with_stride([2, 2])
                    .init(device)
            })
        };
        let enc = |level: usize| {
            (level <= depth).then(|| DoubleConv::new(width(level - 2), width(level - 1), device))
        };
        let dec = |level: usize| {
            (level <= depth)
                .then(|| DoubleConv::new(2 * width(level - 1), width(level - 1), device))
        };
        Self {
            enc1: DoubleConv::new(in_channels, c, device),
            enc2: enc(2),
            enc3: enc(3),
            enc4: enc(4),
            enc5: enc(5),
            enc6: enc(6),
            bottleneck: DoubleConv::new(width(depth - 1), width(depth), device),
            up1: ConvTranspose2dConfig::new([width(1), width(0)], [2, 2])
                .with_stride([2, 2])
                .init(device),
            up2: up(2),
            up3: up(3),
            up4: up(4),
            up5: up(5),
            up6: up(6),
            dec1: DoubleConv::new(2 * c, c, device),
            dec2: dec(2),
            dec3: dec(3),
            dec4: dec(4),
            dec5: dec(5),
            dec6: dec(6),
            head: Conv2dConfig::new([c, classes], [1, 1]).init(device),
            pool: pool2(),
        }
    }

    /// The levels that exist, shallowest first: (encoder, up, decoder).
    fn levels(&self) -> Vec<(&DoubleConv, &ConvTranspose2d, &DoubleConv)> {
        let mut levels = vec![(&self.enc1, &self.up1, &self.dec1)];
        let deeper = [
            (&self.enc2, &self.up2, &self.dec2),
            (&self.enc3, &self.up3, &self.dec3),
            (&self.enc4, &self.up4, &self.dec4),
            (&self.enc5, &self.up5, &self.dec5),
            (&self.enc6, &self.up6, &self.dec6),
        ];
        for (e, u, d) in deeper {
            match (e, u, d) {
                (Some(e), Some(u), Some(d)) => levels.push((e, u, d)),
                _ => break,
            }
        }
        levels
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let levels = self.levels();
        let mut skips = Vec::with_capacity(levels.len());
        let mut x = x;
        for (i, (enc, _, _)) in levels.iter().enumerate() {
            if i > 0 {
                x = self.pool.forward(x);
            }
            x = enc.forward(x);
            skips.push(x.clone());
        }
        x = self.bottleneck.forward(self.pool.forward(x));
        for ((_, up, dec), skip) in levels.iter().zip(skips).rev() {
            x = dec.forward(Tensor::cat(vec![up.forward(x), skip], 1));
        }
        self.head.forward(x)
    }
}

/// Any of the architectures. Snapshot paths skip the variant name
/// (`skip_enum_variants = true` in [`crate::weights`]).
// One `Net` exists per round; the size difference between variants is irrelevant.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Net {
    /// See [`ArchSpec::LogReg`].
    LogReg(LogReg),
    /// See [`ArchSpec::Mlp`].
    Mlp(Mlp),
    /// See [`ArchSpec::Cnn`].
    Cnn(Cnn),
    /// See [`ArchSpec::UNet`].
    UNet(UNet),
}

/// A batch of inputs in the layout the architecture expects.
#[derive(Debug, Clone)]
pub enum Input {
    /// `[batch, features]`.
    Flat(Tensor<2>),
    /// `[batch, channels, height, width]`.
    Image(Tensor<4>),
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub enum Output {
    /// Class logits `[batch, classes]`.
    Classes(Tensor<2>),
    /// Per-pixel class logits `[batch, classes, height, width]`.
    Pixels(Tensor<4>),
}

fn usize_of(v: u32) -> usize {
    v as usize
}

fn conv3(c_in: usize, c_out: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

fn pool2() -> MaxPool2d {
    MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init()
}

impl DoubleConv {
    fn new(c_in: usize, c_out: usize, device: &Device) -> Self {
        let groups = unet_norm_groups(c_out as u32) as usize;
        Self {
            conv1: conv3(c_in, c_out, device),
            norm1: GroupNormConfig::new(groups, c_out).init(device),
            conv2: conv3(c_out, c_out, device),
            norm2: GroupNormConfig::new(groups, c_out).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = relu(self.norm1.forward(self.conv1.forward(x)));
        relu(self.norm2.forward(self.conv2.forward(x)))
    }
}

impl Net {
    /// A module with this architecture on `device`, or `None` for an
    /// architecture this agent does not implement. The caller validates
    /// `arch` first (sizes are trusted here) and then loads real weights.
    pub fn new(arch: &ArchSpec, device: &Device) -> Option<Self> {
        Some(match arch {
            ArchSpec::LogReg { inputs, classes } => Self::LogReg(LogReg {
                linear: LinearConfig::new(usize_of(*inputs), usize_of(*classes)).init(device),
            }),
            ArchSpec::Mlp {
                inputs,
                hidden,
                classes,
            } => {
                let mut layers = Vec::with_capacity(hidden.len());
                let mut d_in = usize_of(*inputs);
                for h in hidden {
                    layers.push(LinearConfig::new(d_in, usize_of(*h)).init(device));
                    d_in = usize_of(*h);
                }
                Self::Mlp(Mlp {
                    hidden: layers,
                    output: LinearConfig::new(d_in, usize_of(*classes)).init(device),
                })
            }
            ArchSpec::Cnn {
                in_channels,
                height,
                width,
                classes,
            } => {
                let [c1, c2] = CNN_CHANNELS.map(usize_of);
                let flat = c2 * usize_of(*height / 4) * usize_of(*width / 4);
                Self::Cnn(Cnn {
                    conv1: conv3(usize_of(*in_channels), c1, device),
                    conv2: conv3(c1, c2, device),
                    pool: pool2(),
                    fc: LinearConfig::new(flat, usize_of(*classes)).init(device),
                })
            }
            ArchSpec::UNet {
                in_channels,
                base_channels,
                depth,
                classes,
            } => {
                if !(MIN_UNET_DEPTH..=MAX_UNET_DEPTH).contains(depth) {
                    return None;
                }
                Self::UNet(UNet::new(
                    usize_of(*in_channels),
                    usize_of(*base_channels),
                    usize_of(*depth),
                    usize_of(*classes),
                    device,
                ))
            }
            _ => return None,
        })
    }

    /// Forward pass. `None` when the input layout does not suit the
    /// architecture (flat features to a CNN, for instance); the training
    /// loop checks compatibility beforehand, so this is a defensive answer.
    pub fn forward(&self, input: Input) -> Option<Output> {
        match (self, input) {
            (Self::LogReg(m), Input::Flat(x)) => Some(Output::Classes(m.linear.forward(x))),
            (Self::Mlp(m), Input::Flat(mut x)) => {
                for layer in &m.hidden {
                    x = relu(layer.forward(x));
                }
                Some(Output::Classes(m.output.forward(x)))
            }
            (Self::Cnn(m), Input::Image(x)) => {
                let x = m.pool.forward(relu(m.conv1.forward(x)));
                let x = m.pool.forward(relu(m.conv2.forward(x)));
                let x: Tensor<2> = x.flatten(1, 3);
                Some(Output::Classes(m.fc.forward(x)))
            }
            (Self::UNet(m), Input::Image(x)) => Some(Output::Pixels(m.forward(x))),
            _ => None,
        }
    }
}
