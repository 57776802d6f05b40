//! Server optimizers applied to the averaged delta (Reddi et al. 2021,
//! "Adaptive Federated Optimization"; Hsu et al. 2019 for FedAvgM), with the
//! hyperparameter names, defaults and update rules of Flower 1.x's legacy
//! strategies in `flwr.server.strategy` (checked against flwr 1.42.0).
//!
//! # Deltas versus weights
//! Flower's strategies receive client *weights*; fedlink sites send *deltas*
//! `Δ_i = local_i − global`. With `x` the current global model:
//!
//! ```text
//! Flower: aggregated = Σ n_i w_i / Σ n_i = x + Σ n_i Δ_i / Σ n_i = x + Δ
//! Flower FedOpt:  delta_t = aggregated − current_weights = Δ
//! Flower FedAvgM: pseudo_gradient = initial_parameters − aggregated = −Δ
//! ```
//!
//! so every rule below takes the averaged delta `Δ` and returns the *server
//! update* `u` with `x_new = x + u`.
//!
//! # Rules (t = server round, 1-based; m, v start at 0)
//! ```text
//! FedAvg:     u = Δ
//! FedAvgM:    g = −Δ;  if μ > 0 { mom = (t > 1 ? μ·mom + g : g); g = mom }
//!             u = −η_s · g                              (η_s = server_learning_rate)
//! FedAdagrad: m = Δ  (β1 = 0);  v = v + Δ²
//!             u = η · m / (√v + τ)
//! FedAdam:    m = β1·m + (1−β1)·Δ;  v = β2·v + (1−β2)·Δ²
//!             η_t = η · √(1 − β2^(t+1)) / (1 − β1^(t+1))   (Flower's exponent t+1)
//!             u = η_t · m / (√v + τ)
//! FedYogi:    m = β1·m + (1−β1)·Δ;  v = v − (1−β2)·Δ²·sign(v − Δ²)
//!             u = η · m / (√v + τ)
//! ```
//!
//! `eta_l` (the client learning rate) is accepted and stored for parity with
//! Flower but, as in Flower, unused by the server rule. State (`m`, `v`, the
//! momentum, the round counter) lives in [`OptimizerState`], which is serde
//! serialisable so a coordinator can persist it between rounds.

use serde::{Deserialize, Serialize};

use crate::error::AggregationError;

/// A server optimizer and its hyperparameters.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServerOptimizer {
    /// Plain FedAvg: the update is the averaged delta.
    None,
    /// FedAvg with server momentum (Flower `FedAvgM`).
    FedAvgM {
        /// Server learning rate (default 1.0).
        server_learning_rate: f64,
        /// Server momentum (default 0.0).
        server_momentum: f64,
    },
    /// FedAdagrad (Flower defaults: eta 0.1, eta_l 0.1, tau 1e-9).
    FedAdagrad {
        /// Server learning rate.
        eta: f64,
        /// Client learning rate (unused by the server rule).
        eta_l: f64,
        /// Adaptivity.
        tau: f64,
    },
    /// FedAdam (Flower defaults: eta 0.1, eta_l 0.1, beta_1 0.9, beta_2 0.99, tau 1e-9).
    FedAdam {
        /// Server learning rate.
        eta: f64,
        /// Client learning rate (unused by the server rule).
        eta_l: f64,
        /// First-moment decay.
        beta_1: f64,
        /// Second-moment decay.
        beta_2: f64,
        /// Adaptivity.
        tau: f64,
    },
    /// FedYogi (Flower defaults: eta 0.01, eta_l 0.0316, beta_1 0.9, beta_2 0.99, tau 1e-3).
    FedYogi {
        /// Server learning rate.
        eta: f64,
        /// Client learning rate (unused by the server rule).
        eta_l: f64,
        /// First-moment decay.
        beta_1: f64,
        /// Second-moment decay.
        beta_2: f64,
        /// Adaptivity.
        tau: f64,
    },
}

/// Persistent state of a server optimizer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    /// Server rounds applied so far.
    pub round: u64,
    /// FedAvgM momentum vector.
    pub momentum: Option<Vec<f32>>,
    /// First moment (FedOpt).
    pub m: Option<Vec<f32>>,
    /// Second moment (FedOpt).
    pub v: Option<Vec<f32>>,
}

fn check_len(v: &Option<Vec<f32>>, n: usize) -> Result<(), AggregationError> {
    match v {
        Some(v) if v.len() != n => Err(AggregationError::StateMismatch {
            expected: n as u64,
            actual: v.len() as u64,
        }),
        _ => Ok(()),
    }
}

impl ServerOptimizer {
    /// Turn the averaged delta into the server update, in place, advancing
    /// `state` by one round. The state is left untouched on error.
    pub fn apply(
        &self,
        state: &mut OptimizerState,
        delta: &mut [f32],
    ) -> Result<(), AggregationError> {
        let n = delta.len();
        check_len(&state.momentum, n)?;
        check_len(&state.m, n)?;
        check_len(&state.v, n)?;
        let t = state.round + 1;
        match *self {
            Self::None => {}
            Self::FedAvgM {
                server_learning_rate: lr,
                server_momentum: mu,
            } => {
                if mu != 0.0 || lr != 1.0 {
                    if mu > 0.0 {
                        let mom = state.momentum.get_or_insert_with(|| vec![0.0; n]);
                        let first = t == 1;
                        for (d, m) in delta.iter_mut().zip(mom.iter_mut()) {
                            let g = -f64::from(*d);
                            let new = if first { g } else { mu * f64::from(*m) + g };
                            *m = new as f32;
                            *d = (-lr * f64::from(*m)) as f32;
                        }
                    } else {
                        for d in delta.iter_mut() {
                            *d = (-lr * -f64::from(*d)) as f32;
                        }
                    }
                }
            }
            Self::FedAdagrad { eta, tau, .. } => {
                let m = state.m.get_or_insert_with(|| vec![0.0; n]);
                let v = state.v.get_or_insert_with(|| vec![0.0; n]);
                for ((d, m), v) in delta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()) {
                    let x = f64::from(*d);
                    *m = x as f32;
                    *v = (f64::from(*v) + x * x) as f32;
                    *d = (eta * f64::from(*m) / (f64::from(*v).sqrt() + tau)) as f32;
                }
            }
            Self::FedAdam {
                eta,
                beta_1,
                beta_2,
                tau,
                ..
            } => {
                let tf = t as f64 + 1.0;
                let eta_norm = eta * (1.0 - beta_2.powf(tf)).sqrt() / (1.0 - beta_1.powf(tf));
                let m = state.m.get_or_insert_with(|| vec![0.0; n]);
                let v = state.v.get_or_insert_with(|| vec![0.0; n]);
                for ((d, m), v) in delta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()) {
                    let x = f64::from(*d);
                    *m = (beta_1 * f64::from(*m) + (1.0 - beta_1) * x) as f32;
                    *v = (beta_2 * f64::from(*v) + (1.0 - beta_2) * x * x) as f32;
                    *d = (eta_norm * f64::from(*m) / (f64::from(*v).sqrt() + tau)) as f32;
                }
            }
            Self::FedYogi {
                eta,
                beta_1,
                beta_2,
                tau,
                ..
            } => {
                let m = state.m.get_or_insert_with(|| vec![0.0; n]);
                let v = state.v.get_or_insert_with(|| vec![0.0; n]);
                for ((d, m), v) in delta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()) {
                    let x = f64::from(*d);
                    let x2 = x * x;
                    let vv = f64::from(*v);
                    let sign = if vv > x2 {
                        1.0
                    } else if vv < x2 {
                        -1.0
                    } else {
                        0.0
                    };
                    *m = (beta_1 * f64::from(*m) + (1.0 - beta_1) * x) as f32;
                    *v = (vv - (1.0 - beta_2) * x2 * sign) as f32;
                    *d = (eta * f64::from(*m) / (f64::from(*v).sqrt() + tau)) as f32;
                }
            }
        }
        state.round = t;
        Ok(())
    }
}
