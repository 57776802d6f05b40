//! The two operations a round needs from a training backend, behind a
//! trait: evaluate the global model on the site's validation samples, and
//! train locally from it.
//!
//! [`BurnTrainer`] is the production implementation (burn, on the resolved
//! device); it calls [`super::evaluate`] and [`super::train_local`] and
//! nothing else. The agent's round logic ([`crate::sitecore::task`]) is
//! written against [`Trainer`], so its tests use a small deterministic
//! implementation and need neither burn nor a network.

use burn::prelude::Device;
use fedlink_protocol::FlatModel;
use fedlink_protocol::arch::ArchSpec;

use super::{EvalMetrics, TrainConfig, TrainError, TrainReport};
use crate::data::Samples;

/// Evaluate and train a model of an architecture on local samples.
pub trait Trainer {
    /// Metrics of `model` on `data` (the site's validation samples).
    fn evaluate(
        &self,
        arch: &ArchSpec,
        model: &FlatModel,
        data: &Samples,
    ) -> Result<EvalMetrics, TrainError>;

    /// Train from `global` on `data` with `cfg`; the local weights (same
    /// layout as `global`) and what the training did.
    fn train_local(
        &self,
        arch: &ArchSpec,
        global: &FlatModel,
        data: &Samples,
        cfg: &TrainConfig,
    ) -> Result<(FlatModel, TrainReport), TrainError>;
}

/// A borrowed trainer trains and evaluates as the trainer does (a caller
/// that hands a trainer over, such as [`crate::sitecore::eval::evaluate`],
/// can keep its own).
impl<T: Trainer + ?Sized> Trainer for &T {
    fn evaluate(
        &self,
        arch: &ArchSpec,
        model: &FlatModel,
        data: &Samples,
    ) -> Result<EvalMetrics, TrainError> {
        (**self).evaluate(arch, model, data)
    }

    fn train_local(
        &self,
        arch: &ArchSpec,
        global: &FlatModel,
        data: &Samples,
        cfg: &TrainConfig,
    ) -> Result<(FlatModel, TrainReport), TrainError> {
        (**self).train_local(arch, global, data, cfg)
    }
}

/// The production [`Trainer`]: burn on one device.
#[derive(Clone, Debug)]
pub struct BurnTrainer {
    device: Device,
}

impl BurnTrainer {
    /// Train and evaluate on `device` (plain; training adds autodiff).
    pub fn new(device: Device) -> Self {
        Self { device }
    }

    /// The device used.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

impl Trainer for BurnTrainer {
    fn evaluate(
        &self,
        arch: &ArchSpec,
        model: &FlatModel,
        data: &Samples,
    ) -> Result<EvalMetrics, TrainError> {
        super::evaluate(arch, model, data, &self.device)
    }

    fn train_local(
        &self,
        arch: &ArchSpec,
        global: &FlatModel,
        data: &Samples,
        cfg: &TrainConfig,
    ) -> Result<(FlatModel, TrainReport), TrainError> {
        super::train_local(arch, global, data, cfg, &self.device)
    }
}
