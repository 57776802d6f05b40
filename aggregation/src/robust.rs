//! Byzantine-robust aggregators with Flower's semantics (checked against
//! `flwr.server.strategy.aggregate` of flwr 1.42.0).
//!
//! They need every update of the round at once, so they run on a buffer of
//! `K × num_params` f32 values whose size is checked against a memory budget
//! *before* anything is allocated ([`required_bytes`], [`would_fit`]).
//!
//! All of them commute with translation, so running them on deltas gives
//! Flower's result on weights minus the global model:
//! `median(x + Δ_i) = x + median(Δ_i)`, Krum distances `‖w_i − w_j‖ = ‖Δ_i − Δ_j‖`.
//!
//! ```text
//! median:        out[j] = median_i Δ_i[j]   (mean of the two middle values if K is even)
//! trimmed mean:  c = ⌊β·K⌋;  out[j] = mean of the sorted Δ_·[j] without c lowest and c highest
//! Krum:          d_ij = ‖Δ_i − Δ_j‖²;  s_i = sum of the m = max(1, K − f − 2) smallest d_ij (j ≠ i)
//!                Krum: Δ_argmin s;  Multi-Krum: num_examples-weighted mean of the to_keep lowest s
//! Bulyan:        needs K ≥ 4f + 3; θ = K − 2f, β = θ − 2f;
//!                select θ updates by repeated Krum on the remaining set,
//!                then per coordinate the mean of the β values closest to the selection's median
//! ```
//!
//! Unweighted, like Flower (except Multi-Krum's final weighted mean). Means
//! and distances are computed in f64. Coordinates are processed in parallel
//! blocks; every reduction has a fixed order, so results are deterministic.

use rayon::prelude::*;

use crate::error::AggregationError;

/// Coordinates per parallel work item.
const COLS: usize = 8192;

/// A robust aggregation rule.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RobustRule {
    /// Coordinate-wise median (Flower `FedMedian`).
    Median,
    /// Coordinate-wise trimmed mean (Flower `FedTrimmedAvg`); `beta` ∈ [0, 0.5)
    /// is the fraction cut from each side.
    TrimmedMean {
        /// Fraction cut from each side.
        beta: f64,
    },
    /// Krum (`to_keep = 0`) or Multi-Krum (`to_keep > 0`), Flower `Krum`.
    Krum {
        /// Assumed number of malicious sites `f`.
        num_malicious: usize,
        /// Multi-Krum: number of updates averaged; 0 = Krum.
        to_keep: usize,
    },
    /// Bulyan with Krum as the selection rule (Flower `Bulyan`).
    Bulyan {
        /// Assumed number of malicious sites `f`.
        num_malicious: usize,
    },
}

impl RobustRule {
    /// Name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Median => "fedmedian",
            Self::TrimmedMean { .. } => "fedtrimmedavg",
            Self::Krum { .. } => "krum",
            Self::Bulyan { .. } => "bulyan",
        }
    }

    /// Fewest updates the rule accepts.
    pub fn min_updates(&self) -> usize {
        match *self {
            Self::Median | Self::TrimmedMean { .. } => 1,
            Self::Krum { to_keep, .. } => to_keep.max(1),
            Self::Bulyan { num_malicious } => 4 * num_malicious + 3,
        }
    }
}

/// Bytes a rule needs for `num_sites` updates of `num_params` values: the
/// buffered updates, the output, and for Krum/Bulyan the per-block distance
/// matrices. `None` on overflow.
pub fn required_bytes(rule: &RobustRule, num_sites: usize, num_params: u64) -> Option<u64> {
    let k = num_sites as u64;
    let updates = k.checked_add(1)?.checked_mul(num_params)?.checked_mul(4)?;
    let extra = match rule {
        RobustRule::Krum { .. } | RobustRule::Bulyan { .. } => {
            let blocks = num_params / COLS as u64 + 1;
            k.checked_mul(k)?.checked_mul(8)?.checked_mul(blocks + 1)?
        }
        _ => 0,
    };
    updates.checked_add(extra)
}

/// Check up front that a round of `num_sites` fits in `budget_bytes`.
pub fn would_fit(
    rule: &RobustRule,
    num_sites: usize,
    num_params: u64,
    budget_bytes: u64,
) -> Result<(), AggregationError> {
    let needed = required_bytes(rule, num_sites, num_params).unwrap_or(u64::MAX);
    if needed > budget_bytes {
        return Err(AggregationError::MemoryBudgetExceeded {
            strategy: rule.name(),
            num_sites,
            num_params,
            needed_bytes: needed,
            budget_bytes,
        });
    }
    Ok(())
}

/// Apply `rule` to `updates` (each `n` values) with `weights` (num_examples).
pub fn aggregate(
    rule: &RobustRule,
    updates: &[Vec<f32>],
    weights: &[u64],
) -> Result<Vec<f32>, AggregationError> {
    let k = updates.len();
    if k == 0 {
        return Err(AggregationError::NoUpdates);
    }
    if k < rule.min_updates() {
        return Err(AggregationError::NotEnoughUpdates {
            strategy: rule.name(),
            needed: rule.min_updates(),
            got: k,
        });
    }
    let refs: Vec<&[f32]> = updates.iter().map(Vec::as_slice).collect();
    Ok(match *rule {
        RobustRule::Median => median(&refs),
        RobustRule::TrimmedMean { beta } => trimmed_mean(&refs, beta),
        RobustRule::Krum {
            num_malicious,
            to_keep,
        } => {
            let d = distance_matrix(&refs);
            let all: Vec<usize> = (0..k).collect();
            let scores = krum_scores(&d, &all, num_malicious);
            if to_keep > 0 {
                let mut order: Vec<usize> = (0..k).collect();
                order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
                let keep: Vec<usize> = order.into_iter().take(to_keep).collect();
                weighted_mean(&refs, weights, &keep)
            } else {
                refs[argmin(&scores)].to_vec()
            }
        }
        RobustRule::Bulyan { num_malicious } => bulyan(&refs, num_malicious),
    })
}

fn argmin(s: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in s.iter().enumerate() {
        if *v < s[best] {
            best = i;
        }
    }
    best
}

/// Run `f(column_values, scratch) -> value` for every coordinate, in parallel.
fn per_coordinate<F>(updates: &[&[f32]], f: F) -> Vec<f32>
where
    F: Fn(&mut [f32]) -> f32 + Sync,
{
    let n = updates.first().map_or(0, |u| u.len());
    let mut out = vec![0f32; n];
    out.par_chunks_mut(COLS).enumerate().for_each(|(b, o)| {
        let start = b * COLS;
        let mut col = vec![0f32; updates.len()];
        for (j, dst) in o.iter_mut().enumerate() {
            for (c, u) in col.iter_mut().zip(updates) {
                *c = u[start + j];
            }
            *dst = f(&mut col);
        }
    });
    out
}

fn median_of(col: &mut [f32]) -> f32 {
    let k = col.len();
    let mid = k / 2;
    let (lo, m, _) = col.select_nth_unstable_by(mid, f32::total_cmp);
    let m = *m;
    if k % 2 == 1 {
        m
    } else {
        let below = lo.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        ((f64::from(below) + f64::from(m)) / 2.0) as f32
    }
}

/// Coordinate-wise median.
pub fn median(updates: &[&[f32]]) -> Vec<f32> {
    per_coordinate(updates, median_of)
}

/// Coordinate-wise trimmed mean cutting `⌊beta·K⌋` values from each side.
pub fn trimmed_mean(updates: &[&[f32]], beta: f64) -> Vec<f32> {
    let k = updates.len();
    let cut = ((beta * k as f64).floor() as usize).min(k.saturating_sub(1) / 2);
    per_coordinate(updates, |col| {
        col.sort_unstable_by(f32::total_cmp);
        let kept = &col[cut..k - cut];
        (kept.iter().map(|&v| f64::from(v)).sum::<f64>() / kept.len() as f64) as f32
    })
}

/// Pairwise squared L2 distances (f64), K×K row-major. Deterministic: per-block
/// partial matrices are summed in block order.
pub fn distance_matrix(updates: &[&[f32]]) -> Vec<f64> {
    let k = updates.len();
    let n = updates.first().map_or(0, |u| u.len());
    let blocks: Vec<Vec<f64>> = (0..n.div_ceil(COLS))
        .into_par_iter()
        .map(|b| {
            let (s, e) = (b * COLS, ((b + 1) * COLS).min(n));
            let mut d = vec![0f64; k * k];
            for i in 0..k {
                for j in i + 1..k {
                    let (a, c) = (&updates[i][s..e], &updates[j][s..e]);
                    let mut lanes = [0f64; 8];
                    let mut ia = a.chunks_exact(8);
                    let mut ic = c.chunks_exact(8);
                    for (x, y) in (&mut ia).zip(&mut ic) {
                        for l in 0..8 {
                            let t = f64::from(x[l] - y[l]);
                            lanes[l] += t * t;
                        }
                    }
                    for (x, y) in ia.remainder().iter().zip(ic.remainder()) {
                        let t = f64::from(x - y);
                        lanes[0] += t * t;
                    }
                    let sum: f64 = lanes.iter().sum();
                    d[i * k + j] = sum;
                    d[j * k + i] = sum;
                }
            }
            d
        })
        .collect();
    let mut d = vec![0f64; k * k];
    for b in blocks {
        for (x, y) in d.iter_mut().zip(b) {
            *x += y;
        }
    }
    d
}

/// Krum scores of the updates in `set` (indices into the full matrix `d`).
fn krum_scores(d: &[f64], set: &[usize], num_malicious: usize) -> Vec<f64> {
    let k_all = (d.len() as f64).sqrt() as usize;
    let n = set.len();
    let m = n.saturating_sub(num_malicious + 2).max(1).min(n - 1);
    set.iter()
        .map(|&i| {
            let mut ds: Vec<f64> = set
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| d[i * k_all + j])
                .collect();
            ds.sort_by(f64::total_cmp);
            ds.iter().take(m).sum()
        })
        .collect()
}

fn weighted_mean(updates: &[&[f32]], weights: &[u64], keep: &[usize]) -> Vec<f32> {
    let total: f64 = keep.iter().map(|&i| weights[i] as f64).sum();
    let n = updates.first().map_or(0, |u| u.len());
    let mut out = vec![0f32; n];
    out.par_chunks_mut(COLS).enumerate().for_each(|(b, o)| {
        let s = b * COLS;
        for (j, dst) in o.iter_mut().enumerate() {
            let mut acc = 0f64;
            for &i in keep {
                acc += weights[i] as f64 * f64::from(updates[i][s + j]);
            }
            *dst = (acc / total) as f32;
        }
    });
    out
}

fn bulyan(updates: &[&[f32]], f: usize) -> Vec<f32> {
    let k = updates.len();
    let d = distance_matrix(updates);
    let theta = k - 2 * f;
    let beta = theta - 2 * f;
    let mut remaining: Vec<usize> = (0..k).collect();
    let mut selected = Vec::with_capacity(theta);
    for _ in 0..theta {
        let scores = krum_scores(&d, &remaining, f);
        let best = argmin(&scores);
        selected.push(remaining.remove(best));
    }
    let sel: Vec<&[f32]> = selected.iter().map(|&i| updates[i]).collect();
    per_coordinate(&sel, |col| {
        let med = f64::from(median_of(col));
        col.sort_unstable_by(|a, b| {
            (f64::from(*a) - med)
                .abs()
                .total_cmp(&(f64::from(*b) - med).abs())
        });
        (col[..beta].iter().map(|&v| f64::from(v)).sum::<f64>() / beta as f64) as f32
    })
}
