//! The one place where weights cross between burn modules and the protocol's
//! [`FlatModel`].
//!
//! ```text
//!   FlatModel (protocol, canonical order)          burn module (Net)
//!   ───────────────────────────────────  load  ──▶ ModuleSnapshot::apply
//!                                        ◀── save  ModuleSnapshot::collect
//! ```
//!
//! Both directions go through burn's `store` feature (`ModuleSnapshot`),
//! matching tensors by path (enum variant names skipped). Every path and
//! shape is checked against [`ArchSpec::spec`]: a model whose spec differs
//! from the architecture, a tensor burn does not know, a parameter left
//! unloaded or a dtype other than f32 is a typed [`WeightsError`], never a
//! silently half-loaded module.
//!
//! The FedProx anchor ([`ProximalAnchor`]) lives here too, since it turns
//! the global [`FlatModel`] into tensors.

use std::collections::HashMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::store::{ModuleSnapshot, bridge};
use burn::tensor::DType as BurnDType;
use fedlink_protocol::arch::{ArchError, ArchSpec};
use fedlink_protocol::{FlatModel, ModelError, ModelSpec};

use crate::train::model::Net;

/// Why weights could not move between a module and a [`FlatModel`].
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The architecture itself is invalid.
    #[error("invalid architecture: {0}")]
    Arch(#[from] ArchError),
    /// The model's tensors are not those of the architecture.
    #[error("model does not match architecture {arch}: {detail}")]
    SpecMismatch {
        /// Architecture kind.
        arch: &'static str,
        /// First difference found.
        detail: String,
    },
    /// This agent has no module for the architecture (newer than the agent).
    #[error("architecture {0:?} is not supported by this agent version")]
    Unsupported(&'static str),
    /// burn reported problems while loading (missing, unused or failed
    /// tensors).
    #[error(
        "loading weights into the module failed: missing {missing:?}, unused {unused:?}, errors {errors:?}"
    )]
    Apply {
        /// Module parameters that received no value.
        missing: Vec<String>,
        /// Provided tensors no parameter took.
        unused: Vec<String>,
        /// Per-tensor errors (shape, dtype, load).
        errors: Vec<String>,
    },
    /// A module tensor could not be read back or is not f32.
    #[error("reading tensor {path:?} from the module failed: {message}")]
    Read {
        /// Tensor path.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The collected values do not form a valid model.
    #[error("collected weights do not form a model: {0}")]
    Model(#[from] ModelError),
}

/// Check that `model` has exactly the tensors of `arch` (paths and shapes).
pub fn check_compatible(arch: &ArchSpec, model: &FlatModel) -> Result<ModelSpec, WeightsError> {
    let spec = arch.spec()?;
    if &spec != model.spec() {
        let detail = first_difference(&spec, model.spec());
        return Err(WeightsError::SpecMismatch {
            arch: arch.kind(),
            detail,
        });
    }
    Ok(spec)
}

fn first_difference(want: &ModelSpec, got: &ModelSpec) -> String {
    for t in want.tensors() {
        match got.index_of(&t.path) {
            None => return format!("tensor {:?} is missing", t.path),
            Some(i) => {
                let g = &got.tensors()[i];
                if g.shape != t.shape || g.dtype != t.dtype {
                    return format!(
                        "tensor {:?} has shape {:?}, expected {:?}",
                        t.path, g.shape, t.shape
                    );
                }
            }
        }
    }
    for g in got.tensors() {
        if want.index_of(&g.path).is_none() {
            return format!("unexpected tensor {:?}", g.path);
        }
    }
    "specs differ".to_owned()
}

fn dims(shape: &[u64]) -> Vec<usize> {
    shape.iter().map(|&d| d as usize).collect()
}

/// Build the module for `arch` on `device` and load `model` into it.
///
/// On an autodiff device the parameters are trainable; on a plain device
/// the module is ready for inference.
pub fn load(arch: &ArchSpec, model: &FlatModel, device: &Device) -> Result<Net, WeightsError> {
    let spec = check_compatible(arch, model)?;
    let mut net = Net::new(arch, device).ok_or_else(|| WeightsError::Unsupported(arch.kind()))?;
    let mut tensors = Vec::with_capacity(spec.tensors().len());
    for (i, t) in spec.tensors().iter().enumerate() {
        let values = model.tensor(i).ok_or_else(|| WeightsError::SpecMismatch {
            arch: arch.kind(),
            detail: format!("no values for tensor {:?}", t.path),
        })?;
        let data = TensorData::new(values.to_vec(), dims(&t.shape));
        tensors.push(bridge::from_data(data, t.path.clone(), None));
    }
    let result = net.apply(tensors, None, None, true);
    let complete = result.applied.len() == spec.tensors().len();
    if !result.is_success() || !result.missing.is_empty() || !result.unused.is_empty() || !complete
    {
        return Err(WeightsError::Apply {
            missing: result.missing.into_iter().map(|(p, _)| p).collect(),
            unused: result.unused,
            errors: result.errors.iter().map(ToString::to_string).collect(),
        });
    }
    Ok(net)
}

/// Read every parameter of `net` back into a [`FlatModel`] with the spec of
/// `arch`. Bit-exact: values are copied, never converted.
pub fn save(arch: &ArchSpec, net: &Net) -> Result<FlatModel, WeightsError> {
    let spec = arch.spec()?;
    let mut values = vec![0.0f32; spec.num_params() as usize];
    let mut seen = vec![false; spec.tensors().len()];
    for snapshot in net.collect(None, None, true) {
        let path = snapshot.name.clone();
        let index = spec
            .index_of(&path)
            .ok_or_else(|| WeightsError::SpecMismatch {
                arch: arch.kind(),
                detail: format!("module has unexpected tensor {path:?}"),
            })?;
        let expected = &spec.tensors()[index].shape;
        let shape: Vec<u64> = snapshot.shape.iter().map(|&d| d as u64).collect();
        if &shape != expected {
            return Err(WeightsError::SpecMismatch {
                arch: arch.kind(),
                detail: format!(
                    "module tensor {path:?} has shape {shape:?}, expected {expected:?}"
                ),
            });
        }
        if snapshot.dtype != BurnDType::F32 {
            return Err(WeightsError::Read {
                path,
                message: format!("dtype {:?}, expected f32", snapshot.dtype),
            });
        }
        let data = bridge::to_data(&snapshot).map_err(|e| WeightsError::Read {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let slice = data.as_slice::<f32>().map_err(|e| WeightsError::Read {
            path: path.clone(),
            message: format!("{e:?}"),
        })?;
        let range = spec.range(index).ok_or_else(|| WeightsError::Read {
            path: path.clone(),
            message: "no range in spec".to_owned(),
        })?;
        let dst = values.get_mut(range).ok_or_else(|| WeightsError::Read {
            path: path.clone(),
            message: "range outside the model".to_owned(),
        })?;
        if dst.len() != slice.len() {
            return Err(WeightsError::Read {
                path,
                message: format!("{} values, expected {}", slice.len(), dst.len()),
            });
        }
        dst.copy_from_slice(slice);
        seen[index] = true;
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(WeightsError::SpecMismatch {
            arch: arch.kind(),
            detail: format!("module lacks tensor {:?}", spec.tensors()[i].path),
        });
    }
    Ok(FlatModel::new(spec, values)?)
}

/// The global model as constant tensors, for the FedProx proximal term
/// `||w − w_global||²`.
#[derive(Debug)]
pub struct ProximalAnchor {
    tensors: HashMap<String, Tensor<1>>,
}

impl ProximalAnchor {
    /// Upload `global` (already checked against `arch`) to `device` as
    /// constants (no gradient).
    pub fn new(arch: &ArchSpec, global: &FlatModel, device: &Device) -> Result<Self, WeightsError> {
        let spec = check_compatible(arch, global)?;
        let mut tensors = HashMap::with_capacity(spec.tensors().len());
        for (i, t) in spec.tensors().iter().enumerate() {
            let values = global.tensor(i).ok_or_else(|| WeightsError::SpecMismatch {
                arch: arch.kind(),
                detail: format!("no values for tensor {:?}", t.path),
            })?;
            let data = TensorData::new(values.to_vec(), [values.len()]);
            tensors.insert(t.path.clone(), Tensor::<1>::from_data(data, device));
        }
        Ok(Self { tensors })
    }

    /// `Σ ||w − w_global||²` over every parameter of `net`, as a one-element
    /// tensor that carries gradients back to `net`.
    pub fn squared_distance(&self, net: &Net) -> Result<Tensor<1>, WeightsError> {
        let mut visitor = ProxVisitor {
            anchor: self,
            path: Vec::new(),
            sum: None,
            error: None,
            visited: 0,
        };
        net.visit(&mut visitor);
        if let Some(e) = visitor.error {
            return Err(e);
        }
        if visitor.visited != self.tensors.len() {
            return Err(WeightsError::SpecMismatch {
                arch: "proximal anchor",
                detail: format!(
                    "module has {} parameters, anchor has {}",
                    visitor.visited,
                    self.tensors.len()
                ),
            });
        }
        visitor.sum.ok_or_else(|| WeightsError::SpecMismatch {
            arch: "proximal anchor",
            detail: "module has no parameters".to_owned(),
        })
    }
}

struct ProxVisitor<'a> {
    anchor: &'a ProximalAnchor,
    path: Vec<String>,
    sum: Option<Tensor<1>>,
    error: Option<WeightsError>,
    visited: usize,
}

impl ModuleVisitor for ProxVisitor<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.path.push(name.to_owned());
        }
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.path.pop();
        }
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path.join(".");
        let Some(anchor) = self.anchor.tensors.get(&path) else {
            if self.error.is_none() {
                self.error = Some(WeightsError::SpecMismatch {
                    arch: "proximal anchor",
                    detail: format!("no anchor for parameter {path:?}"),
                });
            }
            return;
        };
        let w: Tensor<1> = param.val().flatten(0, D - 1);
        let diff = w - anchor.clone();
        let sq = diff.clone().mul(diff).sum();
        self.sum = Some(match self.sum.take() {
            Some(acc) => acc + sq,
            None => sq,
        });
        self.visited += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archs() -> Vec<ArchSpec> {
        vec![
            ArchSpec::LogReg {
                inputs: 5,
                classes: 2,
            },
            ArchSpec::Mlp {
                inputs: 5,
                hidden: vec![7, 3],
                classes: 4,
            },
            ArchSpec::Cnn {
                in_channels: 3,
                height: 8,
                width: 12,
                classes: 3,
            },
            ArchSpec::UNet {
                in_channels: 1,
                base_channels: 4,
                depth: 2,
                classes: 2,
            },
            ArchSpec::UNet {
                in_channels: 2,
                base_channels: 4,
                depth: 4,
                classes: 3,
            },
        ]
    }

    #[test]
    fn burn_modules_have_exactly_the_arch_spec() {
        let device = Device::flex();
        for arch in archs() {
            let net = Net::new(&arch, &device).unwrap();
            let mut got: Vec<(String, Vec<u64>)> = net
                .collect(None, None, true)
                .into_iter()
                .map(|t| (t.name.clone(), t.shape.iter().map(|&d| d as u64).collect()))
                .collect();
            got.sort();
            let spec = arch.spec().unwrap();
            let want: Vec<(String, Vec<u64>)> = spec
                .tensors()
                .iter()
                .map(|t| (t.path.clone(), t.shape.clone()))
                .collect();
            assert_eq!(got, want, "{arch:?}");
        }
    }

    #[test]
    fn flat_to_module_to_flat_is_bit_identical() {
        for device in [Device::flex(), Device::flex().autodiff()] {
            for arch in archs() {
                let flat = arch.init(42).unwrap();
                let net = load(&arch, &flat, &device).unwrap();
                let back = save(&arch, &net).unwrap();
                assert_eq!(back.hash(), flat.hash(), "{arch:?}");
                assert_eq!(back.values(), flat.values());
            }
        }
    }

    #[test]
    fn wrong_model_is_refused() {
        let device = Device::flex();
        let arch = &archs()[0];
        let other = archs()[1].init(1).unwrap();
        assert!(matches!(
            load(arch, &other, &device),
            Err(WeightsError::SpecMismatch { .. })
        ));
        let bad_arch = ArchSpec::LogReg {
            inputs: 0,
            classes: 2,
        };
        assert!(matches!(
            load(&bad_arch, &other, &device),
            Err(WeightsError::Arch(_))
        ));
    }

    #[test]
    fn proximal_distance_matches_hand_computation() {
        let device = Device::flex();
        let arch = &archs()[1];
        let global = arch.init(1).unwrap();
        let local = arch.init(2).unwrap();
        let anchor = ProximalAnchor::new(arch, &global, &device).unwrap();
        let net = load(arch, &local, &device).unwrap();
        let got: f32 = anchor.squared_distance(&net).unwrap().into_scalar();
        let want: f64 = global
            .values()
            .iter()
            .zip(local.values())
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        assert!(
            (f64::from(got) - want).abs() < 1e-3 * want.max(1.0),
            "{got} vs {want}"
        );
        let same = load(arch, &global, &device).unwrap();
        let zero: f32 = anchor.squared_distance(&same).unwrap().into_scalar();
        assert_eq!(zero, 0.0);
    }
}
