//! Federated evaluation bookkeeping: which global models are evaluated, which
//! site reports count, and their example-weighted mean.
//!
//! Each site evaluates the global model it is offered on its own validation
//! split (never its training data, never augmented) before it trains, and
//! signs the metrics into its update header; the header's signature is
//! checked before the payload is read ([`super::intake`]). Round `r`'s
//! updates therefore evaluate round `r`'s *base* model, the model made by
//! round `r − 1` (round 1: the initial model). [`federated_evaluation`]
//! turns a round's reports into one [`FederatedEvaluation`] of that model;
//! the job's `[evaluation] every_rounds` says for which models
//! ([`is_due`]). The job's final model has no round after it: the driver
//! asks the sites (protocol ≥ 6, `EvalRequest`) and
//! [`RequestedEvaluation`] collects their signed `EvalReport`s — verified,
//! once per asked site, until all answered or left or its deadline — into
//! the same [`FederatedEvaluation`].
//!
//! ```text
//!  accepted updates of round r ── (site, header metrics) ──▶ check ──▶ per site
//!                                                             │         │
//!                                        excluded (reason) ◀──┘         ▼
//!                                                 Σ nᵢ·mᵢ / Σ nᵢ (weighted mean)
//! ```
//!
//! Untrusted input: a report with no examples, more than
//! [`MAX_EVAL_EXAMPLES`], a metric that is not finite or out of its range is
//! left out with its reason, never used, never a panic.
//!
//! ```
//! use fedlink_coordinator::core::evaluation::{federated_evaluation, is_due};
//! use fedlink_protocol::{EvalMetrics, ModelHash, RoundId};
//!
//! let m = |n, acc| EvalMetrics { num_eval_examples: n, accuracy: Some(acc), ..Default::default() };
//! let ev = federated_evaluation(1, Some(RoundId(2)), ModelHash([0; 32]), &[("a".into(), Some(m(1, 1.0))), ("b".into(), Some(m(3, 0.5)))]);
//! assert_eq!(ev.weighted.accuracy, Some(0.625));
//! assert!(is_due(4, 2, 10) && !is_due(5, 2, 10) && is_due(10, 3, 10));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeSet;
use std::time::Instant;

use fedlink_protocol::admin::{
    ExcludedEvaluation, FederatedEvaluation, SiteEvaluation, WeightedMetrics,
};
use fedlink_protocol::envelope::KeyDirectory;
use fedlink_protocol::evaluation::{ExpectedEval, SignedEvalReport, verify_eval_report};
use fedlink_protocol::{EvalMetrics, ModelHash, RoundId, SiteId};

/// Most validation examples one site may claim (a larger claim would let
/// one site dominate the weighted mean).
pub const MAX_EVAL_EXAMPLES: u64 = 1 << 32;

/// Is the global model made by `after_round` completed rounds evaluated,
/// with `[evaluation] every_rounds = every` in a job of `rounds` rounds?
/// Never when `every` is 0; else the initial model (0), every `every`-th
/// round's model, and the last round's.
pub fn is_due(after_round: u64, every: u32, rounds: u64) -> bool {
    let every = u64::from(every);
    every > 0 && (after_round.is_multiple_of(every) || after_round == rounds)
}

/// Why a site's report does not count.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The header carried no metrics.
    #[error("no evaluation metrics reported")]
    Missing,
    /// The site already reported for this model.
    #[error("a second report for the same model")]
    Duplicate,
    /// Zero examples, or more than [`MAX_EVAL_EXAMPLES`].
    #[error("num_eval_examples = {0} is outside 1..={MAX_EVAL_EXAMPLES}")]
    Examples(u64),
    /// A metric that is NaN or infinite.
    #[error("{0} is not finite")]
    NotFinite(&'static str),
    /// A metric outside its range.
    #[error("{name} = {value} is outside {range}")]
    OutOfRange {
        /// Metric name.
        name: &'static str,
        /// Its value.
        value: f64,
        /// The allowed range.
        range: &'static str,
    },
}

/// Why a site's answer to a requested evaluation does not count
/// ([`RequestedEvaluation::handle_report`]); the text is the `reason` of
/// its `eval.rejected` audit entry.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EvalRefusal {
    /// No evaluation is being asked for (the driver's answer when nothing
    /// was requested).
    #[error("no evaluation is being asked for")]
    NotRequested,
    /// The site already answered this request.
    #[error("a second report for the same model")]
    Second,
    /// The site was not among those asked.
    #[error("this site was not asked to evaluate the model")]
    NotAsked,
    /// The connection's identity is not a valid site id.
    #[error(transparent)]
    SiteName(#[from] fedlink_protocol::IdError),
    /// The signed report does not verify, or answers another request.
    #[error(transparent)]
    Verify(#[from] fedlink_protocol::evaluation::EvalReportError),
    /// Verified, but its metrics are unusable: the site's answer, left out.
    #[error(transparent)]
    Unusable(#[from] ReportError),
}

/// Check one site's metrics: examples in `1..=MAX_EVAL_EXAMPLES`, every
/// metric finite, loss ≥ 0, accuracy / AUC / Dice in `[0, 1]`.
pub fn check_report(m: &EvalMetrics) -> Result<(), ReportError> {
    if !(1..=MAX_EVAL_EXAMPLES).contains(&m.num_eval_examples) {
        return Err(ReportError::Examples(m.num_eval_examples));
    }
    let unit = (0.0, 1.0, "[0, 1]");
    for (name, v, (lo, hi, range)) in [
        ("loss", m.loss, (0.0, f64::MAX, "[0, ∞)")),
        ("accuracy", m.accuracy, unit),
        ("auc", m.auc, unit),
        ("dice", m.dice, unit),
    ] {
        let Some(value) = v else { continue };
        if !value.is_finite() {
            return Err(ReportError::NotFinite(name));
        }
        if !(lo..=hi).contains(&value) {
            return Err(ReportError::OutOfRange { name, value, range });
        }
    }
    Ok(())
}

/// The federated evaluation of `model` (made by `after_round` completed
/// rounds) from the reports of round `reported_in_round`'s accepted
/// updates (`None`: answers to an evaluation request), `(site, metrics)` in
/// the order they came. Reports that fail
/// [`check_report`], and a site's second report, are listed in `excluded`
/// and count nowhere. Sites come out sorted by name.
pub fn federated_evaluation(
    after_round: u64,
    reported_in_round: Option<RoundId>,
    model: ModelHash,
    reports: &[(String, Option<EvalMetrics>)],
) -> FederatedEvaluation {
    let mut sites: Vec<SiteEvaluation> = Vec::new();
    let mut excluded = Vec::new();
    for (site, m) in reports {
        let verdict = match m {
            None => Err(ReportError::Missing),
            Some(_) if sites.iter().any(|s| &s.site == site) => Err(ReportError::Duplicate),
            Some(m) => check_report(m).map(|()| m),
        };
        match verdict {
            Ok(m) => sites.push(SiteEvaluation {
                site: site.clone(),
                num_eval_examples: m.num_eval_examples,
                loss: m.loss,
                accuracy: m.accuracy,
                auc: m.auc,
                dice: m.dice,
            }),
            Err(e) => excluded.push(ExcludedEvaluation {
                site: site.clone(),
                reason: e.to_string(),
            }),
        }
    }
    sites.sort_by(|a, b| a.site.cmp(&b.site));
    let weighted = weighted_mean(&sites);
    FederatedEvaluation {
        model: model.to_hex(),
        after_round,
        reported_in_round: reported_in_round.map(|r| r.0),
        sites,
        weighted,
        excluded,
    }
}

/// `Σ nᵢ·mᵢ / Σ nᵢ` per metric over the sites that report it (checked
/// reports: finite, bounded); `None` where no site reports the metric or
/// the sum overflows.
pub fn weighted_mean(sites: &[SiteEvaluation]) -> WeightedMetrics {
    let mean = |pick: fn(&SiteEvaluation) -> Option<f64>| {
        let (mut sum, mut n) = (0.0_f64, 0.0_f64);
        for s in sites {
            if let Some(v) = pick(s) {
                sum += v * s.num_eval_examples as f64;
                n += s.num_eval_examples as f64;
            }
        }
        let m = sum / n;
        (n > 0.0 && m.is_finite()).then_some(m)
    };
    WeightedMetrics {
        sites: u32::try_from(sites.len()).unwrap_or(u32::MAX),
        num_eval_examples: sites
            .iter()
            .fold(0u64, |a, s| a.saturating_add(s.num_eval_examples)),
        loss: mean(|s| s.loss),
        accuracy: mean(|s| s.accuracy),
        auc: mean(|s| s.auc),
        dice: mean(|s| s.dice),
    }
}

/// An evaluation the coordinator asked for (the final model of a job: no
/// round follows it, so no update header can carry its metrics): which
/// sites were asked, their verified reports, and until when it waits.
///
/// Call [`handle_report`](Self::handle_report) for each `EvalReport` (in
/// arrival order), [`handle_disconnect`](Self::handle_disconnect) when an
/// asked site's connection ends, and [`finish`](Self::finish) once
/// [`is_done`](Self::is_done) at `now` (every asked site answered or left,
/// or the deadline passed); `now` only moves forward.
#[derive(Clone, Debug)]
pub struct RequestedEvaluation {
    expected: ExpectedEval,
    waiting: BTreeSet<String>,
    reports: Vec<(String, Option<EvalMetrics>)>,
    refused: Vec<ExcludedEvaluation>,
    deadline: Instant,
}

impl RequestedEvaluation {
    /// Asked `sites` to evaluate `expected.model`; wait until `deadline`.
    pub fn new(
        expected: ExpectedEval,
        sites: impl IntoIterator<Item = String>,
        deadline: Instant,
    ) -> Self {
        Self {
            expected,
            waiting: sites.into_iter().collect(),
            reports: Vec::new(),
            refused: Vec::new(),
            deadline,
        }
    }

    /// What was asked.
    pub fn expected(&self) -> &ExpectedEval {
        &self.expected
    }

    /// When it stops waiting.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// A report from `site` (its TLS identity): refused unless the site was
    /// asked and has not answered yet, the signature verifies with the
    /// site's update key and the report answers the request; a verified
    /// report whose metrics are unusable ([`check_report`]) counts as the
    /// site's answer and is left out with the reason. `Err` is the reason
    /// the report does not count.
    pub fn handle_report(
        &mut self,
        site: &str,
        signed: &SignedEvalReport,
        keys: &impl KeyDirectory,
    ) -> Result<(), EvalRefusal> {
        if !self.waiting.contains(site) {
            return Err(
                if self.reports.iter().any(|(s, _)| s == site)
                    || self.refused.iter().any(|x| x.site == site)
                {
                    EvalRefusal::Second
                } else {
                    EvalRefusal::NotAsked
                },
            );
        }
        let authenticated = SiteId::new(site)?;
        let metrics = verify_eval_report(signed, &authenticated, keys, &self.expected)?;
        self.waiting.remove(site);
        match check_report(metrics) {
            Ok(()) => {
                self.reports.push((site.to_owned(), Some(metrics.clone())));
                Ok(())
            }
            Err(e) => {
                self.refused.push(ExcludedEvaluation {
                    site: site.to_owned(),
                    reason: e.to_string(),
                });
                Err(e.into())
            }
        }
    }

    /// An asked site's connection ended: it will not answer.
    pub fn handle_disconnect(&mut self, site: &str) {
        if self.waiting.remove(site) {
            self.refused.push(ExcludedEvaluation {
                site: site.to_owned(),
                reason: "disconnected before reporting".into(),
            });
        }
    }

    /// Every asked site answered or left, or the deadline passed.
    pub fn is_done(&self, now: Instant) -> bool {
        self.waiting.is_empty() || now >= self.deadline
    }

    /// The evaluation of the model made by `after_round` completed rounds:
    /// the counted reports and their weighted mean; refused reports and
    /// sites that did not answer are listed with the reason.
    pub fn finish(self) -> FederatedEvaluation {
        let mut ev = federated_evaluation(
            self.expected.round.0,
            None,
            self.expected.model,
            &self.reports,
        );
        ev.excluded.extend(self.refused);
        ev.excluded
            .extend(self.waiting.into_iter().map(|site| ExcludedEvaluation {
                site,
                reason: "no report before the deadline".into(),
            }));
        ev
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlink_protocol::evaluation::EvalReportError;

    fn m(n: u64, loss: f64, acc: f64) -> Option<EvalMetrics> {
        Some(EvalMetrics {
            num_eval_examples: n,
            loss: Some(loss),
            accuracy: Some(acc),
            ..Default::default()
        })
    }

    #[test]
    fn due_every_n_rounds_and_the_last_and_the_initial_model() {
        let due: Vec<u64> = (0..=10).filter(|&r| is_due(r, 3, 10)).collect();
        assert_eq!(due, vec![0, 3, 6, 9, 10]);
        let all: Vec<u64> = (0..=4).filter(|&r| is_due(r, 1, 4)).collect();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
        assert!((0..=10).all(|r| !is_due(r, 0, 10)));
        // every > rounds: the initial and the final model.
        let sparse: Vec<u64> = (0..=5).filter(|&r| is_due(r, 100, 5)).collect();
        assert_eq!(sparse, vec![0, 5]);
    }

    #[test]
    fn weighted_mean_is_exact() {
        // Dyadic values: the f64 arithmetic is exact.
        let reports = vec![
            ("b".to_owned(), m(1, 0.5, 1.0)),
            ("a".to_owned(), m(3, 0.25, 0.5)),
            (
                "c".to_owned(),
                Some(EvalMetrics {
                    num_eval_examples: 4,
                    auc: Some(0.75),
                    ..Default::default()
                }),
            ),
        ];
        let ev = federated_evaluation(2, Some(RoundId(3)), ModelHash([7; 32]), &reports);
        assert_eq!(ev.after_round, 2);
        assert_eq!(ev.reported_in_round, Some(3));
        assert_eq!(ev.model, ModelHash([7; 32]).to_hex());
        let names: Vec<&str> = ev.sites.iter().map(|s| s.site.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(ev.weighted.sites, 3);
        assert_eq!(ev.weighted.num_eval_examples, 8);
        // (1·0.5 + 3·0.25) / 4 and (1·1 + 3·0.5) / 4: c reports neither.
        assert_eq!(ev.weighted.loss, Some(0.3125));
        assert_eq!(ev.weighted.accuracy, Some(0.625));
        // Only c reports an AUC.
        assert_eq!(ev.weighted.auc, Some(0.75));
        assert_eq!(ev.weighted.dice, None);
        assert!(ev.excluded.is_empty());
    }

    #[test]
    fn bad_reports_are_excluded_with_their_reason() {
        let bad = |f: fn(&mut EvalMetrics)| {
            let mut x = EvalMetrics {
                num_eval_examples: 10,
                loss: Some(0.5),
                accuracy: Some(0.5),
                auc: Some(0.5),
                dice: Some(0.5),
                extra: vec![],
            };
            f(&mut x);
            Some(x)
        };
        let reports = vec![
            ("good".to_owned(), m(2, 1.0, 0.5)),
            ("none".to_owned(), None),
            ("zero".to_owned(), bad(|x| x.num_eval_examples = 0)),
            (
                "huge".to_owned(),
                bad(|x| x.num_eval_examples = MAX_EVAL_EXAMPLES + 1),
            ),
            ("nan".to_owned(), bad(|x| x.loss = Some(f64::NAN))),
            ("inf".to_owned(), bad(|x| x.auc = Some(f64::INFINITY))),
            ("neg".to_owned(), bad(|x| x.loss = Some(-1.0))),
            ("acc".to_owned(), bad(|x| x.accuracy = Some(1.5))),
            ("dice".to_owned(), bad(|x| x.dice = Some(-0.1))),
            ("good".to_owned(), m(1000, 0.0, 0.0)),
        ];
        let ev = federated_evaluation(0, Some(RoundId(1)), ModelHash([0; 32]), &reports);
        assert_eq!(ev.sites.len(), 1);
        assert_eq!(ev.weighted.accuracy, Some(0.5));
        assert_eq!(ev.weighted.loss, Some(1.0));
        let reasons: Vec<(&str, &str)> = ev
            .excluded
            .iter()
            .map(|e| (e.site.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("none", "no evaluation metrics reported"),
                ("zero", "num_eval_examples = 0 is outside 1..=4294967296"),
                (
                    "huge",
                    "num_eval_examples = 4294967297 is outside 1..=4294967296"
                ),
                ("nan", "loss is not finite"),
                ("inf", "auc is not finite"),
                ("neg", "loss = -1 is outside [0, ∞)"),
                ("acc", "accuracy = 1.5 is outside [0, 1]"),
                ("dice", "dice = -0.1 is outside [0, 1]"),
                ("good", "a second report for the same model"),
            ]
        );
    }

    fn requested() -> (RequestedEvaluation, ed25519_dalek::SigningKey, Instant) {
        let now = Instant::now();
        let expected = ExpectedEval {
            federation_id: fedlink_protocol::FederationId::new("fed").unwrap(),
            job_id: fedlink_protocol::JobId::new("j").unwrap(),
            round: RoundId(3),
            model: ModelHash([5; 32]),
        };
        let sites = ["a", "b", "c", "d"].map(String::from);
        let ev =
            RequestedEvaluation::new(expected, sites, now + std::time::Duration::from_secs(60));
        (ev, ed25519_dalek::SigningKey::from_bytes(&[9; 32]), now)
    }

    fn signed(
        key: &ed25519_dalek::SigningKey,
        site: &str,
        model: ModelHash,
        metrics: Option<EvalMetrics>,
    ) -> SignedEvalReport {
        fedlink_protocol::sign_eval_report(
            key,
            fedlink_protocol::EvalReport {
                protocol_version: fedlink_protocol::PROTOCOL_VERSION,
                federation_id: fedlink_protocol::FederationId::new("fed").unwrap(),
                site_id: SiteId::new(site).unwrap(),
                job_id: fedlink_protocol::JobId::new("j").unwrap(),
                round: RoundId(3),
                model,
                metrics: metrics.unwrap_or_default(),
            },
        )
    }

    #[test]
    fn a_requested_evaluation_counts_verified_answers_once() {
        let (mut ev, key, now) = requested();
        let keys: std::collections::BTreeMap<SiteId, _> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|s| (SiteId::new(*s).unwrap(), key.verifying_key()))
            .collect();
        let good = ModelHash([5; 32]);
        assert!(!ev.is_done(now));
        assert_eq!(
            ev.handle_report("a", &signed(&key, "a", good, m(3, 0.25, 0.5)), &keys),
            Ok(())
        );
        // Again: not counted twice.
        assert_eq!(
            ev.handle_report("a", &signed(&key, "a", good, m(3, 0.25, 0.5)), &keys),
            Err(EvalRefusal::Second)
        );
        // Not asked.
        assert_eq!(
            ev.handle_report("e", &signed(&key, "e", good, m(1, 0.0, 1.0)), &keys),
            Err(EvalRefusal::NotAsked)
        );
        assert_eq!(
            EvalRefusal::NotAsked.to_string(),
            "this site was not asked to evaluate the model"
        );
        // Another model: refused, the site may still answer properly.
        let wrong = ev.handle_report(
            "b",
            &signed(&key, "b", ModelHash([6; 32]), m(1, 0.0, 1.0)),
            &keys,
        );
        assert!(wrong.as_ref().is_err_and(|e| matches!(
            e,
            EvalRefusal::Verify(EvalReportError::ContextMismatch { field: "model", .. })
        )));
        assert!(wrong.is_err_and(|e| e.to_string().starts_with("report is for model 0606")));
        // Signed for site b, sent on c's connection.
        let err = ev
            .handle_report("c", &signed(&key, "b", good, m(1, 0.0, 1.0)), &keys)
            .unwrap_err();
        assert!(
            matches!(
                err,
                EvalRefusal::Verify(EvalReportError::IdentityMismatch { .. })
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("authenticated as c"), "{err}");
        assert_eq!(
            ev.handle_report("b", &signed(&key, "b", good, m(1, 0.5, 1.0)), &keys),
            Ok(())
        );
        // Verified but unusable: the site's answer, left out.
        assert_eq!(
            ev.handle_report("c", &signed(&key, "c", good, m(0, 0.5, 1.0)), &keys),
            Err(EvalRefusal::Unusable(ReportError::Examples(0)))
        );
        assert_eq!(
            EvalRefusal::from(ReportError::Examples(0)).to_string(),
            "num_eval_examples = 0 is outside 1..=4294967296"
        );
        assert!(!ev.is_done(now));
        ev.handle_disconnect("d");
        assert!(ev.is_done(now));
        let fin = ev.finish();
        assert_eq!((fin.after_round, fin.reported_in_round), (3, None));
        assert_eq!(fin.model, good.to_hex());
        assert_eq!(fin.weighted.accuracy, Some(0.625));
        assert_eq!(fin.weighted.loss, Some(0.3125));
        let excluded: Vec<(&str, &str)> = fin
            .excluded
            .iter()
            .map(|x| (x.site.as_str(), x.reason.as_str()))
            .collect();
        assert_eq!(
            excluded,
            [
                ("c", "num_eval_examples = 0 is outside 1..=4294967296"),
                ("d", "disconnected before reporting"),
            ]
        );
    }

    #[test]
    fn a_requested_evaluation_stops_waiting_at_its_deadline() {
        let (mut ev, key, now) = requested();
        let keys =
            std::collections::BTreeMap::from([(SiteId::new("a").unwrap(), key.verifying_key())]);
        assert_eq!(
            ev.handle_report(
                "a",
                &signed(&key, "a", ModelHash([5; 32]), m(2, 1.0, 0.5)),
                &keys
            ),
            Ok(())
        );
        assert!(!ev.is_done(ev.deadline() - std::time::Duration::from_millis(1)));
        assert!(ev.is_done(ev.deadline()));
        assert!(now < ev.deadline());
        let fin = ev.finish();
        assert_eq!(fin.sites.len(), 1);
        let late: Vec<&str> = fin.excluded.iter().map(|x| x.site.as_str()).collect();
        assert_eq!(late, ["b", "c", "d"]);
        assert!(
            fin.excluded
                .iter()
                .all(|x| x.reason == "no report before the deadline")
        );
    }

    #[test]
    fn no_reports_give_no_means() {
        let ev = federated_evaluation(0, Some(RoundId(1)), ModelHash([0; 32]), &[]);
        assert_eq!(ev.weighted, WeightedMetrics::default());
    }

    #[test]
    fn an_overflowing_sum_gives_no_mean_rather_than_infinity() {
        let reports = vec![
            ("a".to_owned(), m(MAX_EVAL_EXAMPLES, f64::MAX, 1.0)),
            ("b".to_owned(), m(1, 0.0, 0.0)),
        ];
        let ev = federated_evaluation(0, Some(RoundId(1)), ModelHash([0; 32]), &reports);
        assert_eq!(ev.weighted.loss, None);
        assert!(ev.weighted.accuracy.is_some_and(|a| a > 0.99));
    }
}
