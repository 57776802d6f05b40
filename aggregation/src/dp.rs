//! Clipping and central differential privacy (DP-FedAvg).
//!
//! * Fixed clipping: each update is scaled by `min(1, C / ‖Δ_i‖₂)`.
//! * Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning
//!   with Adaptive Clipping"): after each round,
//!   `b̄ = (Σ_i 1[‖Δ_i‖ ≤ C] + N(0, σ_b²)) / K` and `C ← C · exp(−η_C (b̄ − γ))`,
//!   with γ the target quantile of *unclipped* updates. (Flower 1.42's
//!   `DifferentialPrivacyServerSideAdaptiveClipping` counts *clipped*
//!   updates in the same formula, which moves C the wrong way; fedlink follows
//!   the paper.) With noise on, the noise multiplier of the update is raised
//!   to `z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)` so that the pair (count, update)
//!   has total noise multiplier z (paper §3, same as Flower).
//! * Central DP: Gaussian noise of standard deviation `z · C / m` is added to
//!   the average, `m` = number of sampled sites (Flower's `compute_stdv`).
//!   The average is uniform and uses the fixed denominator `m`
//!   (`Σ clipped Δ_i / m`, McMahan et al. 2018) so that one site changes it
//!   by at most `C / m`; with no dropouts this equals Flower's mean.
//!
//! Noise comes from ChaCha20 seeded by the operating system's CSPRNG
//! ([`NoiseRng::from_os_rng`]); [`NoiseRng::with_fixed_seed_for_tests`] exists
//! for reproducible tests and must not be used in production.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::error::AggregationError;

/// Source of DP noise: ChaCha20 seeded from the OS CSPRNG.
#[derive(Debug)]
pub struct NoiseRng {
    rng: ChaCha20Rng,
}

impl NoiseRng {
    /// Seed ChaCha20 from `OsRng`.
    pub fn from_os_rng() -> Result<Self, AggregationError> {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut seed)
            .map_err(|e| AggregationError::Rng(e.to_string()))?;
        Ok(Self {
            rng: ChaCha20Rng::from_seed(seed),
        })
    }

    /// ChaCha20 from a 32-byte seed. The coordinator draws a fresh seed
    /// from the OS for every round and records it in the round's archive so
    /// that the round can be recomputed bit for bit (`fedlink audit
    /// replay`); whoever holds the seed can subtract the noise, so keep it
    /// as confidential as the raw updates it protects.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            rng: ChaCha20Rng::from_seed(seed),
        }
    }

    /// A fixed seed, for reproducible tests only: noise from a known seed
    /// gives no privacy.
    pub fn with_fixed_seed_for_tests(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    /// One N(0, 1) sample.
    pub fn standard_normal(&mut self) -> f64 {
        StandardNormal.sample(&mut self.rng)
    }

    /// Add N(0, std²) noise to every value.
    pub fn add_gaussian(&mut self, values: &mut [f32], std: f64) {
        if std <= 0.0 {
            return;
        }
        for v in values {
            let z: f64 = StandardNormal.sample(&mut self.rng);
            *v = (f64::from(*v) + std * z) as f32;
        }
    }
}

/// Parameters of adaptive clipping (names and defaults of Flower's
/// server-side adaptive clipping).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveClipping {
    /// Clip norm of the first round (default 0.1).
    pub initial_clipping_norm: f64,
    /// Target fraction γ of unclipped updates (default 0.5).
    pub target_clipped_quantile: f64,
    /// Learning rate η_C of the geometric update (default 0.2).
    pub clip_norm_lr: f64,
    /// Standard deviation σ_b of the noise on the unclipped count; `None`:
    /// `m / 20` when DP noise is on, 0 otherwise.
    pub clipped_count_stddev: Option<f64>,
}

impl Default for AdaptiveClipping {
    fn default() -> Self {
        Self {
            initial_clipping_norm: 0.1,
            target_clipped_quantile: 0.5,
            clip_norm_lr: 0.2,
            clipped_count_stddev: None,
        }
    }
}

/// How updates are clipped.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Clipping {
    /// A fixed L2 norm.
    Fixed {
        /// The clip norm C.
        clip_norm: f64,
    },
    /// Norm adapted every round.
    Adaptive(AdaptiveClipping),
}

impl Clipping {
    /// The clip norm of the first round.
    pub fn initial_norm(&self) -> f64 {
        match self {
            Self::Fixed { clip_norm } => *clip_norm,
            Self::Adaptive(a) => a.initial_clipping_norm,
        }
    }
}

/// Central DP-FedAvg parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CentralDp {
    /// Noise multiplier z.
    pub noise_multiplier: f64,
    /// Sites sampled per round, m.
    pub num_sampled_sites: usize,
    /// Probability q that a given site is sampled in a round, for the
    /// accountant (1.0 = every site every round).
    pub sampling_rate: f64,
}

/// `σ_b` for adaptive clipping: the configured value, or `m / 20` with noise.
pub fn count_stddev(adaptive: &AdaptiveClipping, dp: Option<&CentralDp>) -> f64 {
    match (adaptive.clipped_count_stddev, dp) {
        (Some(s), _) => s,
        (None, Some(dp)) if dp.noise_multiplier > 0.0 => dp.num_sampled_sites as f64 / 20.0,
        _ => 0.0,
    }
}

/// Noise multiplier for the update when part of the budget goes to the
/// count: `(z⁻² − (2σ_b)⁻²)^(−1/2)`; `None` if `z ≥ 2σ_b` (impossible split).
pub fn update_noise_multiplier(z: f64, sigma_b: f64) -> Option<f64> {
    if z <= 0.0 {
        return Some(0.0);
    }
    if sigma_b <= 0.0 {
        return Some(z);
    }
    if z >= 2.0 * sigma_b {
        return None;
    }
    Some((z.powi(-2) - (2.0 * sigma_b).powi(-2)).powf(-0.5))
}

/// Geometric clip-norm update: returns the next clip norm.
pub fn next_clip_norm(
    adaptive: &AdaptiveClipping,
    clip_norm: f64,
    unclipped: usize,
    num_updates: usize,
    sigma_b: f64,
    rng: &mut NoiseRng,
) -> f64 {
    if num_updates == 0 {
        return clip_norm;
    }
    let noised = unclipped as f64 + sigma_b * rng.standard_normal();
    let frac = noised / num_updates as f64;
    clip_norm * (-adaptive.clip_norm_lr * (frac - adaptive.target_clipped_quantile)).exp()
}
