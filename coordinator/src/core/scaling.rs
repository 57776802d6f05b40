//! Federated feature standardisation, coordinator side: the latest feature
//! statistics each site reported with an accepted update, and the scaling
//! pooled from them that later offers carry (see docs/ARCHITECTURE.md,
//! "Federated feature standardisation").
//!
//! Pure: the engine folds in a round's accepted reports when it aggregates
//! the round (`FederatedScaling::with_round`) and persists the result with
//! the round ([`PersistedState`]).

use std::collections::BTreeMap;

use fedlink_aggregation::round::ServerState;
use fedlink_protocol::{FeatureScaling, FeatureStats};
use serde::{Deserialize, Serialize};

/// What the engine persists in `Extras.optimizer_state` when a round
/// completes (JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PersistedState {
    /// The aggregation strategy's server state (optimizer moments, …).
    pub server: ServerState,
    /// The federation's feature scaling, and what it was pooled from.
    pub scaling: FederatedScaling,
}

/// One site's report of a round, as the engine collected it from an
/// accepted update.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The site.
    pub site: fedlink_protocol::SiteId,
    /// Training examples of the update (its aggregation weight).
    pub num_examples: u64,
    /// The signed statistics (already checked by `verify_update`).
    pub stats: FeatureStats,
}

/// The latest statistics per site and the scaling pooled from them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FederatedScaling {
    /// Latest accepted report of each site whose features match the
    /// federation's.
    sites: BTreeMap<String, FeatureStats>,
    /// Pooled from `sites`; `None` until a site reported.
    scaling: Option<FeatureScaling>,
}

impl FederatedScaling {
    /// The scaling offers carry (`None`: sites use local statistics).
    pub(crate) fn scaling(&self) -> Option<&FeatureScaling> {
        self.scaling.as_ref()
    }

    /// Sites whose statistics the scaling is pooled from.
    pub(crate) fn sites(&self) -> impl Iterator<Item = &str> {
        self.sites.keys().map(String::as_str)
    }

    /// The state after folding in a round's accepted reports: each report
    /// replaces its site's earlier one, and the scaling is pooled again
    /// from every site's latest report.
    ///
    /// Reports are ignored, with a warning, when their sample count differs
    /// from the update's `num_examples` (a site must not weigh more in the
    /// statistics than in the model), when they fail validation, or when
    /// they name other features than the federation's (those of the current
    /// scaling; with none yet, the feature list reported by most sites, ties
    /// broken by total count, then by name). A site whose report is
    /// ignored loses its earlier one too: it no longer describes its data.
    pub(crate) fn with_round(&self, reports: &[Report]) -> Self {
        let mut next = self.clone();
        let mut usable = Vec::new();
        for r in reports {
            let why = if r.stats.count != r.num_examples {
                Some(format!(
                    "sample count {} differs from the update's {} examples",
                    r.stats.count, r.num_examples
                ))
            } else {
                r.stats.validate().err().map(|e| e.to_string())
            };
            match why {
                Some(why) => {
                    tracing::warn!(site = %r.site, reason = %why, "ignoring feature statistics");
                    next.sites.remove(r.site.as_str());
                }
                None => usable.push(r),
            }
        }
        let reference = match &self.scaling {
            Some(s) => Some(s.features.clone()),
            None => majority_features(usable.iter().map(|r| &r.stats)),
        };
        for r in usable {
            if reference.as_ref() == Some(&r.stats.features) {
                next.sites.insert(r.site.to_string(), r.stats.clone());
            } else {
                tracing::warn!(
                    site = %r.site,
                    features = r.stats.features.len(),
                    "ignoring feature statistics: they name other features than the federation's"
                );
                next.sites.remove(r.site.as_str());
            }
        }
        if next.sites.is_empty() {
            // Nothing usable reported yet: keep what offers carried.
            return next;
        }
        match FeatureScaling::pooled(next.sites.values()) {
            Ok(s) => next.scaling = Some(s),
            Err(e) => {
                // Each report is valid and they share features: only the
                // pooled result's bounds can fail. Keep the previous one.
                tracing::warn!(error = %e, "pooled feature scaling is invalid; keeping the previous one");
            }
        }
        next
    }
}

/// The feature list most reports name (ties: larger total count, then the
/// smaller list in lexicographic order).
fn majority_features<'a>(stats: impl Iterator<Item = &'a FeatureStats>) -> Option<Vec<String>> {
    let mut groups: BTreeMap<&[String], (usize, u64)> = BTreeMap::new();
    for s in stats {
        let g = groups.entry(&s.features).or_default();
        g.0 += 1;
        g.1 = g.1.saturating_add(s.count);
    }
    let mut best: Option<(&[String], (usize, u64))> = None;
    for (features, score) in groups {
        // Iteration is in increasing lexicographic order: only a strictly
        // better score replaces the current best.
        if best.is_none_or(|(_, b)| score > b) {
            best = Some((features, score));
        }
    }
    best.map(|(f, _)| f.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(features: &[&str], values: &[&[f64]]) -> FeatureStats {
        let n = features.len();
        let mut sum = vec![0.0; n];
        let mut sum_sq = vec![0.0; n];
        for row in values {
            for j in 0..n {
                sum[j] += row[j];
                sum_sq[j] += row[j] * row[j];
            }
        }
        FeatureStats {
            features: features.iter().map(|s| (*s).to_owned()).collect(),
            count: values.len() as u64,
            sum,
            sum_sq,
        }
    }

    fn report(site: &str, stats: FeatureStats) -> Report {
        Report {
            site: fedlink_protocol::SiteId::new(site).expect("a test site id"),
            num_examples: stats.count,
            stats,
        }
    }

    #[test]
    fn pools_the_latest_report_of_every_site() {
        let a = stats(&["x", "y"], &[&[1.0, 10.0], &[3.0, 14.0]]);
        let b = stats(&["x", "y"], &[&[5.0, 20.0]]);
        let s0 = FederatedScaling::default();
        assert!(s0.scaling().is_none());
        let s1 = s0.with_round(&[report("a", a.clone()), report("b", b.clone())]);
        let want = FeatureScaling::pooled([&a, &b]).unwrap();
        assert_eq!(s1.scaling(), Some(&want));
        assert_eq!(want.mean, vec![3.0, 44.0 / 3.0]);
        // A round with only site b (whose data grew) keeps a's report.
        let b2 = stats(&["x", "y"], &[&[5.0, 20.0], &[7.0, 30.0]]);
        let s2 = s1.with_round(&[report("b", b2.clone())]);
        assert_eq!(
            s2.scaling(),
            Some(&FeatureScaling::pooled([&a, &b2]).unwrap())
        );
        assert_eq!(s2.sites().collect::<Vec<_>>(), vec!["a", "b"]);
        // A round without reports changes nothing.
        assert_eq!(s2.with_round(&[]), s2);
        // The state survives JSON (the engine persists it).
        let p = PersistedState {
            server: ServerState::default(),
            scaling: s2.clone(),
        };
        let back: PersistedState =
            serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn ignores_mismatched_inconsistent_and_invalid_reports() {
        let a = stats(&["x", "y"], &[&[1.0, 10.0], &[3.0, 14.0]]);
        let b = stats(&["x", "y"], &[&[5.0, 20.0]]);
        let other = stats(&["x", "z"], &[&[100.0, 1.0]]);
        // The majority's features win the first round.
        let s = FederatedScaling::default().with_round(&[
            report("a", a.clone()),
            report("b", b.clone()),
            report("c", other.clone()),
        ]);
        assert_eq!(
            s.scaling(),
            Some(&FeatureScaling::pooled([&a, &b]).unwrap())
        );
        assert_eq!(s.sites().collect::<Vec<_>>(), vec!["a", "b"]);
        // Later: other features, a count that is not the update's weight,
        // and out-of-bounds values are ignored, and drop the site's
        // earlier report.
        let mut heavy = report("a", a.clone());
        heavy.stats.count = 1_000_000;
        let mut bad = report("b", b.clone());
        bad.stats.sum[0] = f64::INFINITY;
        let s2 = s.with_round(&[report("b", other), heavy]);
        assert!(s2.sites().next().is_none());
        assert_eq!(
            s2.scaling(),
            s.scaling(),
            "nothing usable: keep the scaling"
        );
        let s3 = s.with_round(&[bad]);
        assert_eq!(s3.sites().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(s3.scaling(), Some(&FeatureScaling::pooled([&a]).unwrap()));
    }

    #[test]
    fn majority_breaks_ties_by_count_then_name() {
        let small = stats(&["b"], &[&[1.0]]);
        let big = stats(&["c"], &[&[1.0], &[2.0]]);
        let same = stats(&["a"], &[&[1.0], &[2.0]]);
        assert_eq!(
            majority_features([&small, &big].into_iter()),
            Some(vec!["c".to_owned()])
        );
        assert_eq!(
            majority_features([&big, &same].into_iter()),
            Some(vec!["a".to_owned()])
        );
        assert_eq!(majority_features(std::iter::empty()), None);
    }
}
