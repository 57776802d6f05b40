//! Streaming, order-independent weighted FedAvg on an exact fixed-point grid.
//!
//! # Why fixed point
//! Floating-point addition is not associative: summing the same f32 deltas in
//! another order gives another model, hence another model hash. Here each
//! weighted value is first mapped, deterministically and on its own, to an
//! integer on the grid `2^-frac_bits`:
//!
//! ```text
//! term_i[j] = round_half_even( w_i · s_i · 2^k · x_i[j] )     (in f64, then to i64)
//! acc[j]    = Σ_i term_i[j]                                     (i64, wrapping)
//! avg[j]    = f32( f64(acc[j]) / (Σ_i w_i · 2^k) )
//! ```
//!
//! `w_i` is `num_examples` (or 1), `s_i` the clip scale, `k = frac_bits`.
//! Each term depends only on its own update, and integer addition is
//! associative and commutative, so `acc` — and the averaged delta — are
//! bit-identical for every arrival order.
//!
//! # Bounds
//! * Validation refuses an update unless `|term| ≤ 2^50` for all its values
//!   ([`UpdateError::MagnitudeTooLarge`](crate::UpdateError::MagnitudeTooLarge)),
//!   i.e. `w · s · max|x| ≤ 2^(50-k)`. With the default `k = 24` that is
//!   `num_examples · |x| ≤ 2^26 ≈ 6.7e7`.
//! * At most [`MAX_FOLDS`] = 8191 updates per accumulator, so
//!   `|Σ term| < 8191 · 2^50 < 2^63`: the true sum always fits in an i64 (the
//!   additions wrap, which is exact modulo 2^64 and therefore exact here).
//! * Error: each term is within `2^-(k+1)` of the exact product, so the
//!   average is within `K · 2^-(k+1) / Σw ≤ 2^-(k+1)` (≈ 3e-8 for k = 24) of
//!   the exact weighted mean of the (clipped) f32 inputs, before the final
//!   rounding to f32.
//!
//! # Memory
//! The accumulator is `8 × num_params` bytes (two f32 models), kept in
//! 2 MiB blocks; [`FedAvgAccumulator::finish`] frees each block as soon as it
//! is converted, so finishing adds nothing to the peak. Updates are never
//! retained: memory does not depend on the number of sites.
//!
//! # Speed
//! Folding is parallel over 2 MiB blocks with rayon. Rounding uses the
//! "add 1.5·2^52" trick, which is exact for `|v| < 2^51` and vectorises on
//! plain SSE2.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use fedlink_protocol::{FlatModel, ModelSpec};
use rayon::prelude::*;

use crate::error::{AggregationError, Error};
use crate::tentative::{Shared, Tentative, TentativeFold};
use crate::validate::{
    UpdateValidator, ValidatedUpdate, ValidationPolicy, Weighting, check_tensors,
};

/// Most updates one accumulator folds (keeps `Σ|term| < 2^63`).
pub const MAX_FOLDS: usize = 8191;
/// Default number of fractional bits of the grid.
pub const DEFAULT_FRAC_BITS: u32 = 24;
/// Largest accepted `frac_bits`.
pub const MAX_FRAC_BITS: u32 = 48;
/// Elements per accumulator block (2 MiB of i64).
pub(crate) const BLOCK: usize = 1 << 18;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52

/// Round to nearest (ties to even) for |v| < 2^51 by the magic-constant trick.
#[inline(always)]
fn to_grid(v: f64) -> i64 {
    ((v + MAGIC).to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64)
}

/// Take `x · c` out of `acc`: the exact inverse of [`fold_slice`] (the same
/// integers, subtracted; wrapping, so exact whatever the values).
#[inline]
fn unfold_slice(acc: &mut [i64], x: &[f32], c: f64) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a = a.wrapping_sub(to_grid(f64::from(v) * c));
    }
}

/// Fold `x · c` into `acc`. Validation guarantees `|x · c| ≤ 2^50`, where the
/// rounding trick is exact. If a caller breaks the contract and feeds other
/// values on the second pass, the result is wrong but nothing panics: the
/// additions wrap.
#[inline]
fn fold_slice(acc: &mut [i64], x: &[f32], c: f64) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a = a.wrapping_add(to_grid(f64::from(v) * c));
    }
}

/// Options of a [`FedAvgAccumulator`].
#[derive(Clone, Debug, PartialEq)]
pub struct FedAvgOptions {
    /// Weighting of updates.
    pub weighting: Weighting,
    /// Fractional bits of the fixed-point grid (≤ [`MAX_FRAC_BITS`]).
    pub frac_bits: u32,
    /// Largest accepted `num_examples`.
    pub max_num_examples: u64,
    /// Largest accepted `|value|` before clipping (`f32::MAX`: no bound).
    pub max_abs_value: f32,
    /// Per-update L2 clipping norm.
    pub clip_norm: Option<f32>,
}

impl Default for FedAvgOptions {
    fn default() -> Self {
        Self {
            weighting: Weighting::NumExamples,
            frac_bits: DEFAULT_FRAC_BITS,
            max_num_examples: crate::validate::DEFAULT_MAX_NUM_EXAMPLES,
            max_abs_value: f32::MAX,
            clip_norm: None,
        }
    }
}

/// The result of a weighted average.
#[derive(Clone, Debug, PartialEq)]
pub struct Averaged {
    /// The weighted mean of the (clipped) deltas.
    pub delta: FlatModel,
    /// Number of updates averaged.
    pub num_updates: usize,
    /// Sum of the weights (`Σ num_examples`, or the count when uniform).
    pub total_weight: u128,
    /// Sum of `num_examples` of the updates.
    pub total_examples: u128,
}

/// Streaming weighted FedAvg accumulator (see the [module docs](self)).
#[derive(Debug)]
pub struct FedAvgAccumulator {
    id: u64,
    spec: Arc<ModelSpec>,
    opts: FedAvgOptions,
    /// The blocks, shared with tentative folds (see [`crate::tentative`]).
    shared: Arc<Shared>,
    total_weight: u128,
    total_examples: u128,
    count: usize,
    poisoned: Option<AggregationError>,
}

impl FedAvgAccumulator {
    /// A zeroed accumulator for models with this spec. `frac_bits` above
    /// [`MAX_FRAC_BITS`] is lowered to it.
    pub fn new(spec: Arc<ModelSpec>, mut opts: FedAvgOptions) -> Self {
        opts.frac_bits = opts.frac_bits.min(MAX_FRAC_BITS);
        let n = spec.num_params() as usize;
        let blocks = (0..n.div_ceil(BLOCK))
            .map(|b| Mutex::new(Block::Fresh(BLOCK.min(n - b * BLOCK))))
            .collect();
        let id = next_id();
        Self {
            id,
            shared: Arc::new(Shared::new(id, n as u64, blocks)),
            spec,
            opts,
            total_weight: 0,
            total_examples: 0,
            count: 0,
            poisoned: None,
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The model spec.
    pub fn spec(&self) -> &Arc<ModelSpec> {
        &self.spec
    }

    /// The options.
    pub fn options(&self) -> &FedAvgOptions {
        &self.opts
    }

    /// Number of updates folded so far.
    pub fn num_folded(&self) -> usize {
        self.count
    }

    /// The policy validators of this accumulator apply.
    pub fn policy(&self) -> ValidationPolicy {
        ValidationPolicy {
            max_num_examples: self.opts.max_num_examples,
            max_abs_value: self.opts.max_abs_value,
            weighting: self.opts.weighting,
            clip_norm: self.opts.clip_norm,
            frac_bits: Some(self.opts.frac_bits),
        }
    }

    /// Start validating an update of `site` (first pass).
    pub fn validator(&self, site: impl Into<String>, num_examples: u64) -> UpdateValidator {
        UpdateValidator::with_id(
            self.spec.clone(),
            site,
            num_examples,
            self.policy(),
            self.id,
        )
    }

    /// Whether an update of `token` may be folded or counted here: its own
    /// accumulator, the model's size, and room for one more update.
    fn admit(&self, token: &ValidatedUpdate) -> Result<(), AggregationError> {
        if token.aggregator_id != self.id || token.num_params != self.spec.num_params() {
            return Err(AggregationError::ForeignToken {
                site: token.site.clone(),
            });
        }
        if self.count >= MAX_FOLDS {
            return Err(AggregationError::CapacityExceeded {
                capacity: MAX_FOLDS,
            });
        }
        Ok(())
    }

    /// Start folding a validated update (second pass). Fails only if the token
    /// belongs to another accumulator or the capacity ([`MAX_FOLDS`]) is
    /// used up; in both cases nothing is touched.
    pub fn begin(&mut self, token: &ValidatedUpdate) -> Result<Fold<'_>, AggregationError> {
        self.admit(token)?;
        let c = token.weight * token.clip_scale * f64::from(self.opts.frac_bits).exp2();
        Ok(Fold {
            acc: self,
            token: token.clone(),
            c,
            folded: 0,
            done: false,
        })
    }

    /// Validate and fold a whole in-memory delta (both passes).
    pub fn fold(
        &mut self,
        site: &str,
        delta: &FlatModel,
        num_examples: u64,
    ) -> Result<ValidatedUpdate, Error> {
        check_tensors(site, &self.spec, delta.spec().tensors())?;
        let mut v = self.validator(site, num_examples);
        v.feed(0, delta.values())?;
        let token = v.finish()?;
        let mut f = self.begin(&token)?;
        f.chunk(0, delta.values());
        f.finish();
        Ok(token)
    }

    /// Start an update's one-pass check and tentative fold (see
    /// [`crate::tentative`]); only without clipping, where the update's
    /// fold does not depend on its whole L2 norm (`None` with clipping).
    pub fn tentative(&self, site: impl Into<String>, num_examples: u64) -> Option<TentativeFold> {
        if self.opts.clip_norm.is_some() {
            return None;
        }
        let validator = self.validator(site, num_examples);
        let weight = match self.opts.weighting {
            Weighting::NumExamples => num_examples as f64,
            Weighting::Uniform => 1.0,
        };
        let c = weight * f64::from(self.opts.frac_bits).exp2();
        Some(TentativeFold::new(self.shared.clone(), validator, c))
    }

    /// Count a tentatively folded update (its values are already in the
    /// blocks): what an ack does instead of a second pass. Fails, touching
    /// nothing, on a foreign or unfolded one, a closed gate or a full round.
    pub fn count(&mut self, t: &Tentative) -> Result<(), AggregationError> {
        let token = t.token();
        self.admit(token)?;
        t.count(self.id)?;
        self.count += 1;
        self.total_weight += token.weight as u128;
        self.total_examples += u128::from(token.num_examples);
        Ok(())
    }

    /// Close the gate of tentative folds (waiting for those in progress);
    /// returns how many contributions are neither counted nor removed.
    pub fn close_tentative(&self) -> usize {
        self.shared.close().uncounted
    }

    fn add_chunk(&mut self, offset: u64, values: &[f32], c: f64) -> u64 {
        add_chunk(
            &self.shared.blocks,
            self.spec.num_params(),
            offset,
            values,
            c,
            false,
        )
    }

    /// Finish the round: the weighted mean. Frees each accumulator block as
    /// soon as it is converted. Closes the tentative folds' gate first
    /// (waiting for folds in progress) and refuses to finish while any
    /// tentative contribution is neither counted nor removed.
    pub fn finish(mut self) -> Result<Averaged, AggregationError> {
        if let Some(e) = self.poisoned.take() {
            return Err(e);
        }
        let left = self.shared.close();
        if left.uncounted > 0 {
            return Err(AggregationError::Uncounted {
                uncounted: left.uncounted,
            });
        }
        if self.count == 0 {
            return Err(AggregationError::NoUpdates);
        }
        let denom = self.total_weight as f64 * f64::from(self.opts.frac_bits).exp2();
        let n = self.spec.num_params() as usize;
        // Zeroed allocation: pages are only committed as they are written, while
        // accumulator blocks are freed, so the peak stays at the accumulator size.
        let mut out = vec![0f32; n];
        self.shared
            .blocks
            .par_iter()
            .zip(out.par_chunks_mut(BLOCK))
            .for_each(|(blk, o)| {
                let blk = std::mem::replace(
                    &mut *blk.lock().unwrap_or_else(PoisonError::into_inner),
                    Block::Gone,
                );
                // A block no update reached is zeros, as `out` already is.
                if let Block::Live(blk) = blk {
                    for (d, &a) in o.iter_mut().zip(&blk) {
                        *d = (a as f64 / denom) as f32;
                    }
                }
            });
        let spec = self.spec.as_ref().clone();
        let delta = FlatModel::new(spec, out).map_err(|_| AggregationError::SpecMismatch)?;
        Ok(Averaged {
            delta,
            num_updates: self.count,
            total_weight: self.total_weight,
            total_examples: self.total_examples,
        })
    }
}

impl Drop for FedAvgAccumulator {
    /// The blocks go with the accumulator, even while an upload's tentative
    /// fold or retraction still holds the shared part: a block gone here
    /// takes no later fold (it writes nothing).
    fn drop(&mut self) {
        for blk in &self.shared.blocks {
            drop(std::mem::replace(
                &mut *blk.lock().unwrap_or_else(PoisonError::into_inner),
                Block::Gone,
            ));
        }
    }
}

/// One block of the accumulator (`BLOCK` values, the last one shorter).
///
/// A block's memory is taken at its first fold and written with zeros
/// there, not allocated zeroed up front: a fold reads each value before
/// writing it, and a page first mapped for that read (the shared zero
/// page) faults a second time at the write — written zeros fault once
/// per page (a 10M-parameter accumulator is 20,000 pages; the second
/// faults were ≈ 3.5 % of a 10M × 8 coordinator profile). Taken at the
/// first fold, not when the round opens: the accumulator is not resident
/// while the round's downloads are (the 32-site peak is at 3 × the model).
#[derive(Debug)]
pub(crate) enum Block {
    /// Not folded into yet: zeros, this many.
    Fresh(usize),
    /// Folded into.
    Live(Vec<i64>),
    /// Converted by `finish`, or dropped with the accumulator: later folds
    /// write nothing.
    Gone,
}

impl Block {
    /// The block's values to fold into; `None` once gone.
    fn live(&mut self) -> Option<&mut Vec<i64>> {
        if let Self::Fresh(len) = *self {
            // `vec![0; len]` is the zeroed allocation this avoids (above).
            #[allow(
                clippy::slow_vector_initialization,
                reason = "written zeros on purpose: see `Block`"
            )]
            let mut v = Vec::with_capacity(len);
            v.resize(len, 0i64);
            *self = Self::Live(v);
        }
        match self {
            Self::Live(v) => Some(v),
            Self::Fresh(_) | Self::Gone => None,
        }
    }
}

/// Fold (or, with `subtract`, take out) `values · c` at flat element
/// `offset` into the blocks of an `n`-element accumulator; returns the
/// elements touched. Locks each block it writes (a chunk is one or two
/// blocks: no per-element atomics).
pub(crate) fn add_chunk(
    blocks: &[Mutex<Block>],
    n: u64,
    offset: u64,
    values: &[f32],
    c: f64,
    subtract: bool,
) -> u64 {
    {
        let Some(start) = usize::try_from(offset).ok().filter(|&s| (s as u64) < n) else {
            return 0;
        };
        let end = start.saturating_add(values.len()).min(n as usize);
        if end <= start {
            return 0;
        }
        let (b0, b1) = (start / BLOCK, (end - 1) / BLOCK);
        let fold_block = |bi: usize, blk: &Mutex<Block>| {
            let mut guard = blk.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(blk) = guard.live() else {
                return;
            };
            let bstart = bi * BLOCK;
            let lo = start.max(bstart);
            let hi = end.min(bstart + blk.len());
            if lo < hi {
                let (acc, x) = (
                    &mut blk[lo - bstart..hi - bstart],
                    &values[lo - start..hi - start],
                );
                if subtract {
                    unfold_slice(acc, x, c);
                } else {
                    fold_slice(acc, x, c);
                }
            }
        };
        let Some(blocks) = blocks.get(b0..=b1) else {
            return 0;
        };
        if b1 > b0 {
            blocks
                .par_iter()
                .enumerate()
                .for_each(|(i, blk)| fold_block(b0 + i, blk));
        } else {
            blocks
                .iter()
                .enumerate()
                .for_each(|(i, blk)| fold_block(b0 + i, blk));
        }
        (end - start) as u64
    }
}

/// An update being folded (second pass). Feed the same chunks as the
/// validator saw, then call [`Fold::finish`]. Chunk folding cannot fail.
///
/// If the fold is dropped without `finish`, or the chunks did not cover the
/// model exactly once, the accumulator is *poisoned*: its
/// [`finish`](FedAvgAccumulator::finish) returns
/// [`AggregationError::Poisoned`]. (Values that differ from the validated
/// ones cannot be detected; they give a wrong sum, never a panic.)
#[derive(Debug)]
pub struct Fold<'a> {
    acc: &'a mut FedAvgAccumulator,
    token: ValidatedUpdate,
    c: f64,
    folded: u64,
    done: bool,
}

impl Fold<'_> {
    /// Fold the chunk of values starting at flat element `offset`.
    pub fn chunk(&mut self, offset: u64, values: &[f32]) {
        self.folded += self.acc.add_chunk(offset, values, self.c);
    }

    /// Complete the fold: count the update's weight.
    pub fn finish(mut self) {
        self.done = true;
        self.complete();
    }

    fn complete(&mut self) {
        let expected = self.acc.spec.num_params();
        if !self.done || self.folded != expected {
            if self.acc.poisoned.is_none() {
                self.acc.poisoned = Some(AggregationError::Poisoned {
                    site: self.token.site.clone(),
                    folded: self.folded,
                    expected,
                });
            }
            return;
        }
        self.acc.count += 1;
        self.acc.total_weight += self.token.weight as u128;
        self.acc.total_examples += u128::from(self.token.num_examples);
    }
}

impl Drop for Fold<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.complete();
        }
    }
}
