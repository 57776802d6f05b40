//! Federated feature standardisation of tabular data.
//!
//! Sites standardise their features (`(x − mean) / std`) before training.
//! With statistics computed locally, non-IID sites would feed the same
//! global model differently scaled inputs; instead:
//!
//! ```text
//!  site                                   coordinator
//!  UpdateHeader.feature_stats ─────────▶  FeatureScaling::pooled(stats of
//!  (count, Σx, Σx² of the raw local         the sites) = exact pooled mean
//!   training split, signed)                 and std
//!  standardise with the offered  ◀──────  TaskOffer.scaling (later rounds)
//!  scaling (local statistics while
//!  no scaling is offered)
//! ```
//!
//! [`FeatureStats`] are the sufficient statistics a site reports in its
//! signed update header; [`FeatureScaling`] is what the coordinator offers.
//! Both are attacker-controlled on receipt: [`FeatureStats::validate`] and
//! [`FeatureScaling::validate`] bound every length and value.

use serde::{Deserialize, Serialize};

/// Most features a scaling or a statistics report may have (the CSV
/// loader's column limit).
pub const MAX_FEATURES: usize = 1 << 16;
/// Longest feature name, bytes.
pub const MAX_FEATURE_NAME_LEN: usize = 1024;
/// Largest feature magnitude (raw units) the statistics may imply: a mean
/// or a standard deviation beyond this is refused.
pub const MAX_FEATURE_ABS: f64 = 1e15;
/// Largest sample count of one report.
pub const MAX_STATS_COUNT: u64 = 1 << 40;
/// Smallest standard deviation an offer may carry.
pub const MIN_STD: f64 = 1e-12;
/// A pooled standard deviation at or below this fraction of the feature's
/// root mean square is treated as a constant column (`std = 1`): below it,
/// the difference `E[x²] − E[x]²` is f64 rounding noise.
pub const CONSTANT_REL_STD: f64 = 1e-6;

/// Why a [`FeatureStats`] or [`FeatureScaling`] is not acceptable.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScalingError {
    /// No features.
    #[error("no features")]
    Empty,
    /// More features than [`MAX_FEATURES`].
    #[error("{0} features, more than the limit of {MAX_FEATURES}")]
    TooManyFeatures(usize),
    /// A feature name is longer than [`MAX_FEATURE_NAME_LEN`].
    #[error("feature name {index} is longer than {MAX_FEATURE_NAME_LEN} bytes")]
    NameTooLong {
        /// Position of the feature.
        index: usize,
    },
    /// A vector does not have one entry per feature.
    #[error("{what} has {found} entries for {expected} features")]
    LengthMismatch {
        /// Which vector.
        what: &'static str,
        /// Number of features.
        expected: usize,
        /// Entries found.
        found: usize,
    },
    /// The sample count is 0 or above [`MAX_STATS_COUNT`].
    #[error("sample count {0} is not within 1..={MAX_STATS_COUNT}")]
    BadCount(u64),
    /// A value is not finite or out of its bounds.
    #[error("{what} of feature {index} is not finite or out of range")]
    BadValue {
        /// Which value (`mean`, `std`, `sum`, `sum_sq`).
        what: &'static str,
        /// Position of the feature.
        index: usize,
    },
    /// Reports to pool name different features.
    #[error("feature statistics name different features")]
    FeatureMismatch,
}

/// Standardisation a site must apply to its features: `(x − mean) / std`,
/// feature by feature, in this order. Sent in
/// [`TaskOffer::scaling`](crate::message::TaskOffer::scaling).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeatureScaling {
    /// Feature (column) names, in model input order.
    pub features: Vec<String>,
    /// Mean of each feature, raw units.
    pub mean: Vec<f64>,
    /// Standard deviation of each feature, raw units (> 0).
    pub std: Vec<f64>,
}

/// A site's sufficient statistics of its raw training features, sent (and
/// signed) in [`UpdateHeader::feature_stats`](crate::envelope::UpdateHeader::feature_stats).
///
/// Reveals per-feature first and second moments of the site's training
/// split, nothing per sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeatureStats {
    /// Feature (column) names, in model input order.
    pub features: Vec<String>,
    /// Training rows summed over.
    pub count: u64,
    /// Σx per feature, raw units.
    pub sum: Vec<f64>,
    /// Σx² per feature, raw units.
    pub sum_sq: Vec<f64>,
}

fn check_names(features: &[String]) -> Result<(), ScalingError> {
    if features.is_empty() {
        return Err(ScalingError::Empty);
    }
    if features.len() > MAX_FEATURES {
        return Err(ScalingError::TooManyFeatures(features.len()));
    }
    if let Some(index) = features.iter().position(|f| f.len() > MAX_FEATURE_NAME_LEN) {
        return Err(ScalingError::NameTooLong { index });
    }
    Ok(())
}

fn check_len(what: &'static str, expected: usize, found: usize) -> Result<(), ScalingError> {
    if expected == found {
        Ok(())
    } else {
        Err(ScalingError::LengthMismatch {
            what,
            expected,
            found,
        })
    }
}

fn bad(what: &'static str, index: usize) -> ScalingError {
    ScalingError::BadValue { what, index }
}

fn put_f64s(out: &mut Vec<u8>, v: &[f64]) {
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    for x in v {
        out.extend_from_slice(&x.to_bits().to_le_bytes());
    }
}

impl FeatureScaling {
    /// Check lengths, names and values: every mean finite with
    /// `|mean| ≤ MAX_FEATURE_ABS`, every std finite within
    /// `MIN_STD..=MAX_FEATURE_ABS`.
    pub fn validate(&self) -> Result<(), ScalingError> {
        check_names(&self.features)?;
        let n = self.features.len();
        check_len("mean", n, self.mean.len())?;
        check_len("std", n, self.std.len())?;
        for (i, (m, s)) in self.mean.iter().zip(&self.std).enumerate() {
            if !(m.is_finite() && m.abs() <= MAX_FEATURE_ABS) {
                return Err(bad("mean", i));
            }
            if !(s.is_finite() && (MIN_STD..=MAX_FEATURE_ABS).contains(s)) {
                return Err(bad("std", i));
            }
        }
        Ok(())
    }

    /// The exact pooled standardisation of several reports over the same
    /// features: `mean = Σsum / Σcount`, `std = sqrt(Σsum_sq / Σcount −
    /// mean²)` (population standard deviation, like a site's local
    /// statistics). A constant column (std at or below
    /// [`CONSTANT_REL_STD`] × its root mean square, or below [`MIN_STD`])
    /// gets `std = 1`. Every report is validated first.
    pub fn pooled<'a>(
        reports: impl IntoIterator<Item = &'a FeatureStats>,
    ) -> Result<Self, ScalingError> {
        let mut reports = reports.into_iter();
        let first = reports.next().ok_or(ScalingError::Empty)?;
        first.validate()?;
        let n = first.features.len();
        let mut count = first.count as f64;
        let mut sum = first.sum.clone();
        let mut sum_sq = first.sum_sq.clone();
        for r in reports {
            r.validate()?;
            if r.features != first.features {
                return Err(ScalingError::FeatureMismatch);
            }
            count += r.count as f64;
            for (acc, v) in sum.iter_mut().zip(&r.sum) {
                *acc += v;
            }
            for (acc, v) in sum_sq.iter_mut().zip(&r.sum_sq) {
                *acc += v;
            }
        }
        let mut mean = Vec::with_capacity(n);
        let mut std = Vec::with_capacity(n);
        for (s, q) in sum.iter().zip(&sum_sq) {
            let m = s / count;
            let ms = q / count;
            let sd = (ms - m * m).max(0.0).sqrt();
            let rms = ms.sqrt();
            let constant = sd < MIN_STD || sd <= CONSTANT_REL_STD * rms;
            mean.push(m);
            std.push(if constant { 1.0 } else { sd });
        }
        let scaling = Self {
            features: first.features.clone(),
            mean,
            std,
        };
        scaling.validate()?;
        Ok(scaling)
    }
}

impl FeatureStats {
    /// Check lengths, names and bounds: `count` within
    /// `1..=MAX_STATS_COUNT`; per feature, finite sums with `|sum| ≤
    /// count · MAX_FEATURE_ABS`, `0 ≤ sum_sq ≤ count · MAX_FEATURE_ABS²` and
    /// `sum² ≤ count · sum_sq` (a non-negative variance, up to rounding).
    pub fn validate(&self) -> Result<(), ScalingError> {
        check_names(&self.features)?;
        let n = self.features.len();
        check_len("sum", n, self.sum.len())?;
        check_len("sum_sq", n, self.sum_sq.len())?;
        if !(1..=MAX_STATS_COUNT).contains(&self.count) {
            return Err(ScalingError::BadCount(self.count));
        }
        let c = self.count as f64;
        for (i, (s, q)) in self.sum.iter().zip(&self.sum_sq).enumerate() {
            if !(s.is_finite() && s.abs() <= c * MAX_FEATURE_ABS) {
                return Err(bad("sum", i));
            }
            if !(q.is_finite() && *q >= 0.0 && *q <= c * MAX_FEATURE_ABS * MAX_FEATURE_ABS) {
                return Err(bad("sum_sq", i));
            }
            if s * s > c * q * (1.0 + 1e-9) {
                return Err(bad("sum_sq", i));
            }
        }
        Ok(())
    }

    /// Canonical signed form (see [`UpdateHeader::signed_bytes`]):
    /// `u64 count`, then `u32 n` + `n × str` names, `u32 n` + `n × f64`
    /// sums, `u32 n` + `n × f64` sums of squares (each list carries its own
    /// length, so no two different reports share an encoding).
    ///
    /// [`UpdateHeader::signed_bytes`]: crate::envelope::UpdateHeader::signed_bytes
    pub(crate) fn canonical_bytes(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&(self.features.len() as u32).to_le_bytes());
        for f in &self.features {
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(f.as_bytes());
        }
        put_f64s(out, &self.sum);
        put_f64s(out, &self.sum_sq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(count: u64, sum: Vec<f64>, sum_sq: Vec<f64>) -> FeatureStats {
        FeatureStats {
            features: vec!["a".into(), "b".into()],
            count,
            sum,
            sum_sq,
        }
    }

    #[test]
    fn pooled_is_the_exact_pooled_mean_and_std() {
        // Site 1: a = {1, 2, 3}, b = {10, 10, 10}; site 2: a = {5}, b = {10}.
        let s1 = stats(3, vec![6.0, 30.0], vec![14.0, 300.0]);
        let s2 = stats(1, vec![5.0, 10.0], vec![25.0, 100.0]);
        let p = FeatureScaling::pooled([&s1, &s2]).unwrap();
        assert_eq!(p.features, vec!["a", "b"]);
        assert_eq!(p.mean, vec![11.0 / 4.0, 10.0]);
        let var: f64 = [1.0, 2.0, 3.0, 5.0]
            .iter()
            .map(|x: &f64| (x - 2.75).powi(2))
            .sum::<f64>()
            / 4.0;
        assert!((p.std[0] - var.sqrt()).abs() < 1e-12);
        assert_eq!(p.std[1], 1.0, "constant column gets std 1");
        // Large constant values: rounding noise is not a spread.
        let big = FeatureStats {
            features: vec!["x".into()],
            count: 7,
            sum: vec![7.0 * 1234.567],
            sum_sq: vec![7.0 * 1234.567 * 1234.567],
        };
        assert_eq!(FeatureScaling::pooled([&big]).unwrap().std, vec![1.0]);
    }

    #[test]
    fn bad_reports_are_refused() {
        let ok = stats(3, vec![6.0, 30.0], vec![14.0, 300.0]);
        ok.validate().unwrap();
        let cases = [
            stats(0, vec![6.0, 30.0], vec![14.0, 300.0]),
            stats(MAX_STATS_COUNT + 1, vec![6.0, 30.0], vec![14.0, 300.0]),
            stats(3, vec![6.0], vec![14.0, 300.0]),
            stats(3, vec![f64::NAN, 30.0], vec![14.0, 300.0]),
            stats(3, vec![6.0, 30.0], vec![14.0, f64::INFINITY]),
            stats(3, vec![6.0, 30.0], vec![-1.0, 300.0]),
            stats(3, vec![1e17, 30.0], vec![1e34, 300.0]),
            // negative variance: Σx² < (Σx)² / n
            stats(3, vec![6.0, 30.0], vec![11.0, 300.0]),
        ];
        for (i, c) in cases.iter().enumerate() {
            assert!(c.validate().is_err(), "case {i}");
            assert!(FeatureScaling::pooled([&ok, c]).is_err(), "case {i}");
        }
        let other = FeatureStats {
            features: vec!["a".into(), "c".into()],
            ..ok.clone()
        };
        assert_eq!(
            FeatureScaling::pooled([&ok, &other]),
            Err(ScalingError::FeatureMismatch)
        );
        assert_eq!(FeatureScaling::pooled([]), Err(ScalingError::Empty));
        let long = FeatureStats {
            features: vec!["x".repeat(MAX_FEATURE_NAME_LEN + 1), "b".into()],
            ..ok
        };
        assert_eq!(long.validate(), Err(ScalingError::NameTooLong { index: 0 }));
    }

    #[test]
    fn bad_scalings_are_refused() {
        let ok = FeatureScaling {
            features: vec!["a".into()],
            mean: vec![1.0],
            std: vec![2.0],
        };
        ok.validate().unwrap();
        for (mean, std) in [
            (vec![1.0], vec![0.0]),
            (vec![1.0], vec![-1.0]),
            (vec![f64::NAN], vec![1.0]),
            (vec![1.0], vec![f64::INFINITY]),
            (vec![1e16], vec![1.0]),
            (vec![1.0, 2.0], vec![1.0]),
            (vec![1.0], vec![]),
        ] {
            let s = FeatureScaling {
                mean,
                std,
                ..ok.clone()
            };
            assert!(s.validate().is_err(), "{s:?}");
        }
        let empty = FeatureScaling {
            features: vec![],
            mean: vec![],
            std: vec![],
        };
        assert_eq!(empty.validate(), Err(ScalingError::Empty));
    }

    #[test]
    fn canonical_bytes_carry_each_length() {
        let a = stats(3, vec![6.0, 30.0], vec![14.0, 300.0]);
        let mut b = a.clone();
        b.sum = vec![6.0, 30.0, 14.0];
        b.sum_sq = vec![300.0];
        let (mut x, mut y) = (Vec::new(), Vec::new());
        a.canonical_bytes(&mut x);
        b.canonical_bytes(&mut y);
        assert_ne!(x, y);
    }
}
