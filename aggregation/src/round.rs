//! One round of aggregation, whatever the strategy: [`RoundAggregator`].
//!
//! ```text
//!  chunks ──► UpdateValidator ──► ValidatedUpdate ──► RoundAggregator::begin ──► Sink::chunk … finish
//!  (pass 1: checks, L2 norm)        (token)              (pass 2: fold / buffer; cannot fail)
//!                                                            │
//!  RoundAggregator::finish(state, rng) ◄─────────────────────┘
//!     mean:   exact weighted mean → (DP noise) → server optimizer
//!     robust: median / trimmed mean / Krum / Bulyan over the buffered updates
//!  ──► RoundOutcome { update: x_new − x, … }   (and the new ServerState)
//! ```

use std::sync::Arc;

use fedlink_protocol::{FlatModel, ModelSpec};
use serde::{Deserialize, Serialize};

use crate::accountant::RdpAccountant;
use crate::config::{Aggregation, StrategyConfig};
use crate::dp::{self, Clipping, NoiseRng};
use crate::error::{AggregationError, Error};
use crate::fedavg::{FedAvgAccumulator, FedAvgOptions, Fold};
use crate::optimizer::OptimizerState;
use crate::robust::{self, RobustRule};
use crate::tentative::{Tentative, TentativeFold};
use crate::validate::{UpdateValidator, ValidatedUpdate, ValidationPolicy, check_tensors};

/// State carried from round to round (serde: persist it with the job).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerState {
    /// Rounds completed.
    pub round: u64,
    /// Server optimizer state.
    pub optimizer: OptimizerState,
    /// Current clip norm under adaptive clipping (`None` before round 1).
    pub clip_norm: Option<f64>,
    /// Privacy spent (central DP only).
    pub accountant: Option<RdpAccountant>,
}

/// What a round produced.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundOutcome {
    /// The server update `u`: the new global model is `x + u`.
    pub update: FlatModel,
    /// The round's numbers (its metrics and `round.json`'s).
    pub numbers: RoundNumbers,
}

/// The numbers of an aggregated round, without its model: what the
/// round's metrics, its audit entry and `round.json` report (the
/// coordinator's core takes them alone, so a simulated round needs no
/// model).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoundNumbers {
    /// Updates aggregated.
    pub num_updates: usize,
    /// Sum of their `num_examples`.
    pub total_examples: u128,
    /// Updates that clipping shrank.
    pub num_clipped: usize,
    /// Clip norm used this round, if any.
    pub clip_norm: Option<f64>,
    /// Standard deviation of the DP noise added to the average (0 if none).
    pub noise_std: f64,
    /// ε spent so far at `delta`, if DP is on: `(epsilon, delta)`.
    pub privacy: Option<(f64, f64)>,
}

impl RoundOutcome {
    /// Apply the update to the global model: `x ← x + u`.
    pub fn apply_to(&self, global: &mut FlatModel) -> Result<(), AggregationError> {
        if global.spec() != self.update.spec() {
            return Err(AggregationError::SpecMismatch);
        }
        for (x, u) in global.values_mut().iter_mut().zip(self.update.values()) {
            *x += *u;
        }
        Ok(())
    }
}

/// δ at which [`RoundNumbers::privacy`] reports ε: 1e-5.
pub const REPORT_DELTA: f64 = 1e-5;

#[derive(Debug)]
struct Buffer {
    rule: RobustRule,
    updates: Vec<Vec<f32>>,
    weights: Vec<u64>,
    capacity: usize,
    poisoned: Option<AggregationError>,
}

#[derive(Debug)]
enum Inner {
    Mean(FedAvgAccumulator),
    Robust(Buffer),
}

/// Aggregates one round. Create it with the number of sites expected
/// (robust strategies reserve memory for that many), validate each update
/// with [`Self::validator`], fold it with [`Self::begin`], then
/// [`Self::finish`].
#[derive(Debug)]
pub struct RoundAggregator {
    config: StrategyConfig,
    spec: Arc<ModelSpec>,
    policy: ValidationPolicy,
    id: u64,
    clip_norm: Option<f64>,
    num_clipped: usize,
    num_unclipped: usize,
    inner: Inner,
}

/// Check up front whether a robust round of `num_sites` fits the budget
/// (always Ok for streaming strategies).
pub fn would_fit(
    config: &StrategyConfig,
    num_sites: usize,
    spec: &ModelSpec,
) -> Result<(), AggregationError> {
    match &config.aggregation {
        Aggregation::Mean(_) => Ok(()),
        Aggregation::Robust(rule) => robust::would_fit(
            rule,
            num_sites,
            spec.num_params(),
            config.memory_budget_bytes,
        ),
    }
}

impl RoundAggregator {
    /// Start a round for at most `max_sites` updates. Robust strategies refuse
    /// a round that would exceed the memory budget here, before allocating.
    pub fn new(
        config: &StrategyConfig,
        spec: Arc<ModelSpec>,
        max_sites: usize,
        state: &ServerState,
    ) -> Result<Self, AggregationError> {
        let clip_norm = config
            .clipping
            .as_ref()
            .map(|c| state.clip_norm.unwrap_or_else(|| c.initial_norm()));
        let clip_f32 = clip_norm.map(|c| c as f32);
        let (inner, id, frac_bits) = match &config.aggregation {
            Aggregation::Mean(_) => {
                let acc = FedAvgAccumulator::new(
                    spec.clone(),
                    FedAvgOptions {
                        weighting: config.weighting,
                        frac_bits: config.frac_bits,
                        max_num_examples: config.max_num_examples,
                        max_abs_value: config.max_abs_value,
                        clip_norm: clip_f32,
                    },
                );
                let id = acc.id();
                (Inner::Mean(acc), id, Some(config.frac_bits))
            }
            Aggregation::Robust(rule) => {
                robust::would_fit(
                    rule,
                    max_sites,
                    spec.num_params(),
                    config.memory_budget_bytes,
                )?;
                (
                    Inner::Robust(Buffer {
                        rule: *rule,
                        updates: Vec::with_capacity(max_sites),
                        weights: Vec::with_capacity(max_sites),
                        capacity: max_sites,
                        poisoned: None,
                    }),
                    crate::fedavg::next_id(),
                    None,
                )
            }
        };
        Ok(Self {
            policy: ValidationPolicy {
                max_num_examples: config.max_num_examples,
                max_abs_value: config.max_abs_value,
                weighting: config.weighting,
                clip_norm: clip_f32,
                frac_bits,
            },
            config: config.clone(),
            spec,
            id,
            clip_norm,
            num_clipped: 0,
            num_unclipped: 0,
            inner,
        })
    }

    /// The model spec.
    pub fn spec(&self) -> &Arc<ModelSpec> {
        &self.spec
    }

    /// The clip norm of this round.
    pub fn clip_norm(&self) -> Option<f64> {
        self.clip_norm
    }

    /// Updates folded so far.
    pub fn num_folded(&self) -> usize {
        match &self.inner {
            Inner::Mean(a) => a.num_folded(),
            Inner::Robust(b) => b.updates.len(),
        }
    }

    /// First pass: a validator for an update of `site`.
    pub fn validator(&self, site: impl Into<String>, num_examples: u64) -> UpdateValidator {
        UpdateValidator::with_id(
            self.spec.clone(),
            site,
            num_examples,
            self.policy.clone(),
            self.id,
        )
    }

    /// One pass instead of two (see [`crate::tentative`]): check and fold
    /// each chunk of an update of `site` at once. `None` where an update's
    /// fold needs the whole update first: clipping (the clip scale depends
    /// on its L2 norm) and robust strategies (they buffer each update);
    /// those take [`Self::validator`] and [`Self::begin`].
    pub fn tentative(&self, site: impl Into<String>, num_examples: u64) -> Option<TentativeFold> {
        match &self.inner {
            Inner::Mean(acc) if self.policy.clip_norm.is_none() => {
                acc.tentative(site, num_examples)
            }
            _ => None,
        }
    }

    /// Count an update checked and folded by [`Self::tentative`] (instead
    /// of [`Self::begin`]'s second pass). Fails, touching nothing, on one
    /// of another round, one the gate refused, or a full round.
    pub fn count(&mut self, t: &Tentative) -> Result<(), AggregationError> {
        let Inner::Mean(acc) = &mut self.inner else {
            return Err(AggregationError::ForeignToken {
                site: t.token().site().to_owned(),
            });
        };
        acc.count(t)?;
        self.num_unclipped += 1;
        Ok(())
    }

    /// Close the gate of tentative folds (waiting for those in progress)
    /// and say how many contributions are neither counted nor removed: if
    /// any, [`Self::finish`] would refuse; rebuild the round from its
    /// counted updates instead. 0 for strategies without tentative folds.
    pub fn close_tentative(&self) -> usize {
        match &self.inner {
            Inner::Mean(acc) => acc.close_tentative(),
            Inner::Robust(_) => 0,
        }
    }

    /// Second pass: start folding a validated update. Fails (touching
    /// nothing) only on a foreign token or when the round is full.
    pub fn begin(&mut self, token: &ValidatedUpdate) -> Result<Sink<'_>, AggregationError> {
        if token.aggregator_id != self.id {
            return Err(AggregationError::ForeignToken {
                site: token.site.clone(),
            });
        }
        let clipped = token.was_clipped();
        let inner = match &mut self.inner {
            Inner::Mean(acc) => SinkInner::Mean(acc.begin(token)?),
            Inner::Robust(buf) => {
                if buf.updates.len() >= buf.capacity {
                    return Err(AggregationError::CapacityExceeded {
                        capacity: buf.capacity,
                    });
                }
                SinkInner::Robust {
                    values: vec![0f32; self.spec.num_params() as usize],
                    buf,
                    scale: token.clip_scale,
                    weight: token.num_examples,
                    site: token.site.clone(),
                    folded: 0,
                }
            }
        };
        if clipped {
            self.num_clipped += 1;
        } else {
            self.num_unclipped += 1;
        }
        Ok(Sink { inner })
    }

    /// Validate and fold a whole in-memory delta.
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
        let mut sink = self.begin(&token)?;
        sink.chunk(0, delta.values());
        sink.finish();
        Ok(token)
    }

    /// Finish the round: aggregate, add DP noise, adapt the clip norm, apply
    /// the server optimizer; advances `state` only on success.
    pub fn finish(
        self,
        state: &mut ServerState,
        rng: &mut NoiseRng,
    ) -> Result<RoundOutcome, Error> {
        let mut next = state.clone();
        let (mut values, num_updates, total_examples) = match self.inner {
            Inner::Mean(acc) => {
                let avg = acc.finish()?;
                let n = avg.num_updates;
                let te = avg.total_examples;
                (avg.delta.into_parts().1, n, te)
            }
            Inner::Robust(buf) => {
                if let Some(e) = buf.poisoned {
                    return Err(e.into());
                }
                let te = buf.weights.iter().map(|&w| u128::from(w)).sum();
                let n = buf.updates.len();
                (
                    robust::aggregate(&buf.rule, &buf.updates, &buf.weights)?,
                    n,
                    te,
                )
            }
        };
        let mut noise_std = 0.0;
        let mut privacy = None;
        let sigma_b = match &self.config.clipping {
            Some(Clipping::Adaptive(a)) => dp::count_stddev(a, self.config.dp.as_ref()),
            _ => 0.0,
        };
        if let (Some(cdp), Some(c)) = (&self.config.dp, self.clip_norm) {
            let m = cdp.num_sampled_sites.max(1) as f64;
            // Fixed denominator m: Σ clipped / m = mean · K / m.
            let scale = num_updates as f64 / m;
            for v in values.iter_mut() {
                *v = (f64::from(*v) * scale) as f32;
            }
            let z =
                dp::update_noise_multiplier(cdp.noise_multiplier, sigma_b).unwrap_or(f64::INFINITY);
            noise_std = z * c / m;
            rng.add_gaussian(&mut values, noise_std);
            let acc = next.accountant.get_or_insert_with(RdpAccountant::new);
            acc.compose(cdp.sampling_rate, cdp.noise_multiplier, 1);
            privacy = Some((acc.epsilon(REPORT_DELTA), REPORT_DELTA));
        }
        if let (Some(Clipping::Adaptive(a)), Some(c)) = (&self.config.clipping, self.clip_norm) {
            next.clip_norm = Some(dp::next_clip_norm(
                a,
                c,
                self.num_unclipped,
                num_updates,
                sigma_b,
                rng,
            ));
        }
        if let Aggregation::Mean(opt) = &self.config.aggregation {
            opt.apply(&mut next.optimizer, &mut values)?;
        }
        next.round += 1;
        let spec = Arc::unwrap_or_clone(self.spec);
        let update = FlatModel::new(spec, values).map_err(|_| AggregationError::SpecMismatch)?;
        *state = next;
        Ok(RoundOutcome {
            update,
            numbers: RoundNumbers {
                num_updates,
                total_examples,
                num_clipped: self.num_clipped,
                clip_norm: self.clip_norm,
                noise_std,
                privacy,
            },
        })
    }
}

#[derive(Debug)]
enum SinkInner<'a> {
    Mean(Fold<'a>),
    Robust {
        buf: &'a mut Buffer,
        values: Vec<f32>,
        scale: f64,
        weight: u64,
        site: String,
        folded: u64,
    },
}

/// Second pass of one update: feed the validated chunks again, then
/// [`Sink::finish`]. Dropping a mean-strategy sink unfinished poisons the
/// round; a robust one simply discards the update.
#[derive(Debug)]
pub struct Sink<'a> {
    inner: SinkInner<'a>,
}

impl Sink<'_> {
    /// Fold the chunk starting at flat element `offset`.
    pub fn chunk(&mut self, offset: u64, chunk: &[f32]) {
        match &mut self.inner {
            SinkInner::Mean(f) => f.chunk(offset, chunk),
            SinkInner::Robust {
                values,
                scale,
                folded,
                ..
            } => {
                let n = values.len();
                let Some(start) = usize::try_from(offset).ok().filter(|&s| s < n) else {
                    return;
                };
                let end = start.saturating_add(chunk.len()).min(n);
                for (d, &x) in values[start..end].iter_mut().zip(chunk) {
                    *d = if *scale < 1.0 {
                        (f64::from(x) * *scale) as f32
                    } else {
                        x
                    };
                }
                *folded += (end - start) as u64;
            }
        }
    }

    /// Complete the update.
    pub fn finish(self) {
        match self.inner {
            SinkInner::Mean(f) => f.finish(),
            SinkInner::Robust {
                buf,
                values,
                weight,
                site,
                folded,
                ..
            } => {
                let expected = values.len() as u64;
                if folded != expected {
                    if buf.poisoned.is_none() {
                        buf.poisoned = Some(AggregationError::Poisoned {
                            site,
                            folded,
                            expected,
                        });
                    }
                    return;
                }
                buf.updates.push(values);
                buf.weights.push(weight);
            }
        }
    }
}
