//! First pass over an update: validation and statistics.
//!
//! An [`UpdateValidator`] is fed an update chunk by chunk, in canonical order
//! (element offset + values), exactly as it arrives from the network or from a
//! spool file. It checks every value (finite, within bounds), the claimed
//! `num_examples`, that the chunks are contiguous and cover the whole model,
//! and it computes the update's L2 norm. [`UpdateValidator::finish`] returns a
//! [`ValidatedUpdate`] token: the only way into an accumulator. Nothing is
//! written anywhere during validation, so a rejected update cannot touch a
//! round's state.
//!
//! The L2 norm is computed in f64 with eight partial sums indexed by the
//! *absolute* element index, so it is bit-identical whatever the chunking.

use std::sync::Arc;

use fedlink_protocol::payload::CheckedChunk;
use fedlink_protocol::{ModelSpec, TensorSpec};

use crate::error::UpdateError;

/// Accumulator terms must stay below this many grid units (2^50); see
/// [`crate::fedavg`] for why this bound makes the exact sum overflow-free.
pub const TERM_LIMIT: f64 = (1u64 << 50) as f64;

/// How updates are weighted in a weighted mean.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// Weight each update by its `num_examples` (FedAvg, McMahan et al. 2017).
    #[default]
    NumExamples,
    /// Every update has weight 1 (needed for DP-FedAvg's sensitivity bound).
    Uniform,
}

/// Limits and per-round parameters a validator checks against. Built by the
/// aggregator that will receive the update (see
/// [`crate::FedAvgAccumulator::validator`] and
/// the round aggregator).
#[derive(Clone, Debug, PartialEq)]
pub struct ValidationPolicy {
    /// Largest accepted `num_examples`.
    pub max_num_examples: u64,
    /// Largest accepted `|value|` (before clipping); `f32::MAX` disables the
    /// check (finiteness is always checked).
    pub max_abs_value: f32,
    /// Weighting applied when folding.
    pub weighting: Weighting,
    /// L2 clipping norm of this round, if any.
    pub clip_norm: Option<f32>,
    /// Fractional bits of the exact fixed-point accumulator the update will be
    /// folded into; `None` for strategies that keep updates as f32.
    pub frac_bits: Option<u32>,
}

impl Default for ValidationPolicy {
    fn default() -> Self {
        Self {
            max_num_examples: DEFAULT_MAX_NUM_EXAMPLES,
            max_abs_value: f32::MAX,
            weighting: Weighting::NumExamples,
            clip_norm: None,
            frac_bits: None,
        }
    }
}

/// Default for [`ValidationPolicy::max_num_examples`]: 2^30 (about a billion).
pub const DEFAULT_MAX_NUM_EXAMPLES: u64 = 1 << 30;

/// Proof that an update passed validation, with its statistics. Only a
/// validator can create one; accumulators accept nothing else.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedUpdate {
    pub(crate) site: String,
    pub(crate) num_examples: u64,
    pub(crate) weight: f64,
    pub(crate) l2_norm: f64,
    pub(crate) clip_scale: f64,
    pub(crate) max_abs: f32,
    pub(crate) aggregator_id: u64,
    pub(crate) num_params: u64,
}

impl ValidatedUpdate {
    /// Site that sent the update.
    pub fn site(&self) -> &str {
        &self.site
    }
    /// Claimed number of training examples.
    pub fn num_examples(&self) -> u64 {
        self.num_examples
    }
    /// Weight of the update in a weighted mean (`num_examples`, or 1).
    pub fn weight(&self) -> f64 {
        self.weight
    }
    /// L2 norm of the update before clipping.
    pub fn l2_norm(&self) -> f64 {
        self.l2_norm
    }
    /// Factor applied when folding: `min(1, clip_norm / l2_norm)`.
    pub fn clip_scale(&self) -> f64 {
        self.clip_scale
    }
    /// Whether clipping shrinks this update (`l2_norm > clip_norm`).
    pub fn was_clipped(&self) -> bool {
        self.clip_scale < 1.0
    }
    /// Largest `|value|` before clipping.
    pub fn max_abs(&self) -> f32 {
        self.max_abs
    }
}

/// Map a flat element index to (tensor path, index within the tensor).
pub fn locate(spec: &ModelSpec, flat: u64) -> (String, u64) {
    let n = spec.tensors().len();
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if spec.range(mid).is_some_and(|r| r.end as u64 <= flat) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let idx = lo;
    match (spec.tensors().get(idx), spec.range(idx)) {
        (Some(t), Some(r)) => (t.path.clone(), flat - r.start as u64),
        _ => ("<end>".to_owned(), 0),
    }
}

/// Compare a declared tensor list with the model's spec; the error names the
/// first unknown, missing, mistyped or misshaped tensor.
pub fn check_tensors(
    site: &str,
    expected: &ModelSpec,
    declared: &[TensorSpec],
) -> Result<(), UpdateError> {
    for t in declared {
        let Some(i) = expected.index_of(&t.path) else {
            return Err(UpdateError::UnknownTensor {
                site: site.to_owned(),
                tensor: t.path.clone(),
            });
        };
        let e = &expected.tensors()[i];
        if e.dtype != t.dtype {
            return Err(UpdateError::WrongDType {
                site: site.to_owned(),
                tensor: t.path.clone(),
                actual: format!("{:?}", t.dtype),
            });
        }
        if e.shape != t.shape {
            return Err(UpdateError::ShapeMismatch {
                site: site.to_owned(),
                tensor: t.path.clone(),
                expected: e.shape.clone(),
                actual: t.shape.clone(),
            });
        }
    }
    for e in expected.tensors() {
        if !declared.iter().any(|t| t.path == e.path) {
            return Err(UpdateError::MissingTensor {
                site: site.to_owned(),
                tensor: e.path.clone(),
            });
        }
    }
    Ok(())
}

/// Streaming validator of one update. Feed chunks with [`Self::feed`] in
/// canonical order, then call [`Self::finish`].
#[derive(Debug)]
pub struct UpdateValidator {
    spec: Arc<ModelSpec>,
    site: String,
    num_examples: u64,
    policy: ValidationPolicy,
    aggregator_id: u64,
    next: u64,
    lanes: [f64; 8],
    max_abs: f32,
    max_at: u64,
}

impl UpdateValidator {
    /// Start validating an update of `site` claiming `num_examples`. The
    /// `num_examples` check happens in [`Self::finish`] so that all errors
    /// come out of one place. `aggregator_id` ties the token to the
    /// aggregator that built the policy (0 = any).
    pub(crate) fn with_id(
        spec: Arc<ModelSpec>,
        site: impl Into<String>,
        num_examples: u64,
        policy: ValidationPolicy,
        aggregator_id: u64,
    ) -> Self {
        Self {
            spec,
            site: site.into(),
            num_examples,
            policy,
            aggregator_id,
            next: 0,
            lanes: [0.0; 8],
            max_abs: 0.0,
            max_at: 0,
        }
    }

    /// Site being validated.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// Values validated so far.
    pub fn received(&self) -> u64 {
        self.next
    }

    /// Feed the next chunk: `values` start at flat element `offset`, which
    /// must equal the end of the previous chunk.
    pub fn feed(&mut self, offset: u64, values: &[f32]) -> Result<(), UpdateError> {
        self.feed_with(offset, values, None)
    }

    /// [`Self::feed`] for a chunk the payload decoder checked: it found
    /// every value finite and their largest `|x|` in its own pass, so the
    /// values are not scanned a second time for them (the other checks
    /// are the same).
    pub fn feed_checked(&mut self, chunk: CheckedChunk<'_>) -> Result<(), UpdateError> {
        self.feed_with(chunk.offset(), chunk.values(), Some(chunk.max_abs()))
    }

    /// `known_max`: the values' largest `|x|`, all of them finite, when the
    /// decoder already established it ([`CheckedChunk`] only).
    fn feed_with(
        &mut self,
        offset: u64,
        values: &[f32],
        known_max: Option<f32>,
    ) -> Result<(), UpdateError> {
        let num_params = self.spec.num_params();
        if offset != self.next {
            return Err(UpdateError::ChunkOutOfOrder {
                site: self.site.clone(),
                tensor: locate(&self.spec, offset).0,
                offset,
                expected: self.next,
            });
        }
        let len = values.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > num_params) {
            return Err(UpdateError::ChunkPastEnd {
                site: self.site.clone(),
                offset,
                len,
                num_params,
            });
        }
        // One fast pass for finiteness and max |x|, then the sum of squares
        // by absolute lane.
        let Some(chunk_max) = known_max.or_else(|| fedlink_protocol::model::max_abs(values)) else {
            let pos = values.iter().position(|v| !v.is_finite()).unwrap_or(0);
            let (tensor, index) = locate(&self.spec, offset + pos as u64);
            return Err(UpdateError::NonFinite {
                site: self.site.clone(),
                tensor,
                index,
                value: values.get(pos).copied().unwrap_or(f32::NAN),
            });
        };
        if chunk_max > self.policy.max_abs_value {
            let pos = values
                .iter()
                .position(|v| v.abs() > self.policy.max_abs_value)
                .unwrap_or(0);
            let (tensor, index) = locate(&self.spec, offset + pos as u64);
            let value = values.get(pos).copied().unwrap_or(0.0);
            return Err(UpdateError::MagnitudeTooLarge {
                site: self.site.clone(),
                tensor,
                index,
                value,
                weighted: f64::from(value.abs()),
                limit: f64::from(self.policy.max_abs_value),
            });
        }
        if chunk_max > self.max_abs {
            let pos = values
                .iter()
                .position(|v| v.abs() == chunk_max)
                .unwrap_or(0);
            self.max_abs = chunk_max;
            self.max_at = offset + pos as u64;
        }
        self.add_squares(offset, values);
        self.next = offset + len;
        Ok(())
    }

    fn add_squares(&mut self, offset: u64, values: &[f32]) {
        let head = ((8 - (offset % 8)) % 8) as usize;
        let head = head.min(values.len());
        let (pre, rest) = values.split_at(head);
        for (i, &v) in pre.iter().enumerate() {
            let lane = ((offset + i as u64) % 8) as usize;
            self.lanes[lane] += f64::from(v) * f64::from(v);
        }
        let mut lanes = self.lanes;
        let mut it = rest.chunks_exact(8);
        for c in &mut it {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l += f64::from(v) * f64::from(v);
            }
        }
        for (l, &v) in lanes.iter_mut().zip(it.remainder()) {
            *l += f64::from(v) * f64::from(v);
        }
        self.lanes = lanes;
    }

    /// Finish: check completeness and `num_examples`, apply the clipping rule
    /// and the accumulator's magnitude bound, and return the token.
    pub fn finish(self) -> Result<ValidatedUpdate, UpdateError> {
        let num_params = self.spec.num_params();
        if self.next != num_params {
            return Err(UpdateError::Incomplete {
                tensor: locate(&self.spec, self.next).0,
                site: self.site,
                received: self.next,
                expected: num_params,
            });
        }
        if self.num_examples == 0 {
            return Err(UpdateError::ZeroExamples { site: self.site });
        }
        if self.num_examples > self.policy.max_num_examples {
            return Err(UpdateError::TooManyExamples {
                site: self.site,
                num_examples: self.num_examples,
                limit: self.policy.max_num_examples,
            });
        }
        let l2_norm = self.lanes.iter().sum::<f64>().sqrt();
        let clip_scale = match self.policy.clip_norm {
            Some(c) if l2_norm > f64::from(c) => f64::from(c) / l2_norm,
            _ => 1.0,
        };
        let weight = match self.policy.weighting {
            Weighting::NumExamples => self.num_examples as f64,
            Weighting::Uniform => 1.0,
        };
        if let Some(k) = self.policy.frac_bits {
            let weighted = weight * clip_scale * f64::from(self.max_abs) * f64::from(k).exp2();
            if weighted > TERM_LIMIT {
                let (tensor, index) = locate(&self.spec, self.max_at);
                return Err(UpdateError::MagnitudeTooLarge {
                    site: self.site,
                    tensor,
                    index,
                    value: (f64::from(self.max_abs) * clip_scale) as f32,
                    weighted,
                    limit: TERM_LIMIT,
                });
            }
        }
        Ok(ValidatedUpdate {
            site: self.site,
            num_examples: self.num_examples,
            weight,
            l2_norm,
            clip_scale,
            max_abs: self.max_abs,
            aggregator_id: self.aggregator_id,
            num_params,
        })
    }
}
