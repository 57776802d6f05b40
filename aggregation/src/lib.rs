//! fedlink aggregation engine: pure math over named f32 tensors.
//!
//! What it does:
//! * **Streaming, exact, order-independent weighted FedAvg** ([`fedavg`]):
//!   each update is folded into a fixed-point accumulator as it arrives and
//!   then dropped; memory is `O(model)` whatever the number of sites, and
//!   the result is bit-identical for every arrival order.
//! * **Two-pass validation** ([`validate`]): an [`UpdateValidator`] checks an
//!   update chunk by chunk (NaN/Inf, bounds, `num_examples`, completeness) and
//!   computes its L2 norm; only its [`ValidatedUpdate`] token opens a fold, so
//!   a rejected update never touches the accumulator.
//! * **Server optimizers** FedAvgM, FedAdagrad, FedAdam, FedYogi
//!   ([`optimizer`]), **robust rules** median, trimmed mean, Krum,
//!   Multi-Krum, Bulyan under a memory budget ([`robust`]), **clipping and
//!   central DP** ([`dp`]) with an RDP **privacy accountant**
//!   ([`accountant`]) — Flower 1.x semantics, see `docs/aggregation.md`.
//! * **Configuration** from a name and `key=value` pairs ([`config`]) and
//!   **safetensors** conversion ([`safetensors_io`]).
//!
//! What it does not do: no IO (files, sockets), no async, no clock, no burn.
//! The coordinator moves bytes and persists [`ServerState`]; this crate only
//! computes.
//!
//! ```text
//!   site delta chunks (offset, &[f32]) in canonical order
//!        │ pass 1                          │ pass 2 (same chunks)
//!        ▼                                 ▼
//!   UpdateValidator ──token──► RoundAggregator::begin ──► Sink::chunk … finish
//!   (finite, bounds,                 │  mean:   i64 fixed-point accumulator (2 × model)
//!    num_examples, ‖Δ‖₂)             │  robust: buffered updates (budget-checked)
//!                                    ▼
//!                RoundAggregator::finish(&mut ServerState, &mut NoiseRng)
//!                  mean → (DP noise, adaptive clip) → server optimizer
//!                  robust → median | trimmed mean | Krum | Bulyan
//!                                    ▼
//!                RoundOutcome { update }  ──►  x_new = x + update
//! ```
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use fedlink_aggregation::{NoiseRng, RoundAggregator, ServerState, StrategyConfig};
//! use fedlink_protocol::{FlatModel, ModelSpec, TensorSpec};
//!
//! let spec = Arc::new(ModelSpec::new(vec![
//!     TensorSpec::f32("fc.weight", vec![2, 2]),
//!     TensorSpec::f32("fc.bias", vec![2]),
//! ])?);
//! let config = StrategyConfig::from_key_values("fedadam", &["eta=0.05", "clip_norm=10"])?;
//! let mut state = ServerState::default();
//! let mut rng = NoiseRng::from_os_rng()?;
//! let mut round = RoundAggregator::new(&config, spec.clone(), 2, &state)?;
//!
//! // Streaming: validate chunk by chunk, then fold the same chunks.
//! let delta = [0.1f32, -0.2, 0.3, 0.0, 0.5, -0.5]; // canonical order: fc.bias, fc.weight
//! let mut v = round.validator("hospital-a", 120);
//! v.feed(0, &delta[..4])?;
//! v.feed(4, &delta[4..])?;
//! let token = v.finish()?;
//! let mut sink = round.begin(&token)?;
//! sink.chunk(0, &delta[..4]);
//! sink.chunk(4, &delta[4..]);
//! sink.finish();
//!
//! // Or a whole in-memory delta.
//! let other = FlatModel::new((*spec).clone(), vec![0.3, 0.0, 0.1, 0.2, -0.1, 0.4])?;
//! round.fold("hospital-b", &other, 80)?;
//!
//! let outcome = round.finish(&mut state, &mut rng)?;
//! let mut global = FlatModel::zeros((*spec).clone());
//! outcome.apply_to(&mut global)?;
//! assert_eq!(outcome.numbers.num_updates, 2);
//! assert_eq!(state.round, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod accountant;
pub mod config;
pub mod dp;
pub mod error;
pub mod fedavg;
pub mod optimizer;
pub mod robust;
pub mod round;
pub mod safetensors_io;
pub mod tentative;
pub mod validate;

pub use config::{Aggregation, ParamValue, StrategyConfig, StrategyTable};
pub use dp::{AdaptiveClipping, CentralDp, Clipping, NoiseRng};
pub use error::{AggregationError, ConfigError, Error, SafetensorsError, UpdateError};
pub use fedavg::{Averaged, FedAvgAccumulator, FedAvgOptions, Fold};
pub use optimizer::{OptimizerState, ServerOptimizer};
pub use robust::RobustRule;
pub use round::{RoundAggregator, RoundNumbers, RoundOutcome, ServerState, Sink, would_fit};
pub use tentative::{Removal, Tentative, TentativeFold};
pub use validate::{UpdateValidator, ValidatedUpdate, ValidationPolicy, Weighting};
