//! The end of an aggregated round, decided without files, threads or the
//! clock: what the driver does once the round's accumulator has become the
//! new model, and in which order.
//!
//! The driver aggregates (the numbers), computes the new model and its
//! hash, then asks [`plan`] with the typed facts of the aggregation
//! ([`Aggregated`]), the round's evaluation reports ([`EvaluationFacts`])
//! and the update archive's retention ([`Retention`]). It executes the
//! returned [`Step`]s in order; the one rule an auditor relies on is in
//! their order, and a unit test below checks it:
//!
//! ```text
//!  StoreModel ─▶ SyncSpool ─▶ WriteRoundFile ─▶ Record(round.aggregated, outcome, head)
//!      ─▶ SetRoundTimes ─▶ Publish ─▶ [AuditEvaluation ─▶ RecordEvaluation]
//!      ─▶ NextState ─▶ [Prune(rounds)]
//! ```
//!
//! *Neither `round.json` nor the `round.aggregated` entry may be missing
//! for a published model; the model is published only after both.* The
//! spool directory's fsync (the group commit of the round's archived
//! updates) comes before `round.json`, whose own directory fsync commits
//! the round directory they entered.
//!
//! A federated evaluation of the round's base model is due by the job's
//! `[evaluation] every_rounds` ([`evaluation::is_due`]); only the reports
//! of sites whose update counted in the round (its inputs after the
//! exclusion of withdrawn sites) are evaluated. Retention (`update_retention
//! = N`) removes the archived rounds older than the newest `N` completed.
//!
//! What the driver keeps: the files (the model store, the spool and round
//! directories, `round.json`'s bytes), the accumulator's memory, the
//! model's wire form (encoded on a second thread while the model is stored
//! and recorded), publishing it, the feature scaling's arithmetic and the
//! log lines.

use std::collections::BTreeMap;

use fedlink_aggregation::RoundNumbers;
use fedlink_protocol::admin::FederatedEvaluation;
use fedlink_protocol::{EvalMetrics, ModelHash, RoundId, SiteId};

use super::Effect;
use super::actions::{self, DpApplied, JobFacts};
use super::evaluation;
use super::scaling::{FederatedScaling, Report};
use crate::config::UpdateRetention;
use crate::round_archive::RoundInput;

/// The typed facts of a finished aggregation.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregated<'a> {
    /// The round.
    pub round: RoundId,
    /// The model the round started from.
    pub base_model: ModelHash,
    /// The new model.
    pub output_model: ModelHash,
    /// The strategy as `round.json` records it (for `round.aggregated`).
    pub strategy: serde_json::Value,
    /// The central DP applied (`None`: the strategy has none).
    pub dp: Option<DpApplied>,
    /// The round's inputs in fold order (withdrawn sites already taken
    /// out): what `round.json` lists.
    pub inputs: &'a [RoundInput],
    /// The aggregation's numbers ([`fedlink_aggregation::RoundOutcome`]'s).
    pub numbers: RoundNumbers,
}

/// The job's evaluation settings and the evaluation metrics in the round's
/// accepted updates' headers.
#[derive(Clone, Debug, PartialEq)]
pub struct EvaluationFacts {
    /// `[evaluation] every_rounds` (0: never).
    pub every_rounds: u32,
    /// The job's number of rounds.
    pub rounds: u64,
    /// Each accepted update's metrics (`None`: its header carried none), in
    /// acceptance order.
    pub reports: Vec<(SiteId, Option<EvalMetrics>)>,
}

/// How much of the update archive is kept, and which rounds it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// The coordinator's `update_retention`.
    pub keep: UpdateRetention,
    /// The rounds the job's archive holds now (any order).
    pub archived: Vec<RoundId>,
}

/// One thing the driver does at a round's end; [`plan`] gives them in the
/// order they must be done.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Store the new model in the model store (a failure fails the round).
    StoreModel {
        /// The model.
        model: ModelHash,
    },
    /// Fsync the spool directory: the archived updates left it (their
    /// group commit; a failure is fatal).
    SyncSpool,
    /// Write the round's replay record, `round.json`, atomically in its
    /// round directory (a failure is fatal).
    WriteRoundFile {
        /// The round.
        round: RoundId,
    },
    /// The round on record: `round.aggregated`, then the sites whose
    /// updates made it are told the new model, then they get the audit
    /// head ([`actions::round_aggregated`]).
    Record(Vec<Effect>),
    /// Keep when the round opened and closed in its record (best effort).
    SetRoundTimes {
        /// The round.
        round: RoundId,
    },
    /// Publish the new model (its wire form and the downlink update): from
    /// here sites may fetch it, and it is the global model.
    Publish {
        /// The model.
        model: ModelHash,
    },
    /// The federated evaluation of the round's base model, on record
    /// (`round.evaluated`, the effects) before it is kept.
    AuditEvaluation {
        /// The evaluation.
        evaluation: FederatedEvaluation,
        /// Its audit append.
        effects: Vec<Effect>,
    },
    /// Keep the evaluation in the round's record and the status (best
    /// effort).
    RecordEvaluation {
        /// The round it is kept on.
        round: RoundId,
        /// The evaluation.
        evaluation: FederatedEvaluation,
    },
    /// The round's server state and the feature scaling after its sites'
    /// statistics become the job's (the next rounds' offers carry the
    /// scaling; both are persisted with the round).
    NextState {
        /// The scaling after this round's reports
        /// (`FederatedScaling::with_round`).
        scaling: FederatedScaling,
    },
    /// Remove these archived rounds (retention), oldest first.
    Prune {
        /// The rounds.
        rounds: Vec<RoundId>,
    },
}

/// What [`plan`] decided.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundEnd {
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The round's metrics (the round machine keeps them with the round).
    pub metrics: BTreeMap<String, f64>,
}

/// The round's end, in order (see the module's docs): the model stored,
/// the spool's fsync, `round.json`, `round.aggregated` with the outcome to
/// the round's sites and the audit head, the round's times, the model
/// published, the round's federated evaluation when it is due (on record
/// before it is kept), the next state (the server state, and `scaling`
/// after the round's feature statistics `stats`), the archive's pruning.
pub fn plan(
    facts: &JobFacts,
    agg: Aggregated<'_>,
    eval: EvaluationFacts,
    (scaling, stats): (&FederatedScaling, &[Report]),
    retention: &Retention,
) -> RoundEnd {
    let Aggregated {
        round,
        base_model,
        output_model,
        strategy,
        dp,
        inputs,
        numbers,
    } = agg;
    let mut metrics = round_metrics(&numbers);
    let mut steps = vec![
        Step::StoreModel {
            model: output_model,
        },
        Step::SyncSpool,
        Step::WriteRoundFile { round },
        Step::Record(actions::round_aggregated(
            facts,
            round,
            (base_model, output_model),
            strategy,
            dp,
            inputs,
        )),
        Step::SetRoundTimes { round },
        Step::Publish {
            model: output_model,
        },
    ];
    if let Some(evaluation) = evaluation_due(round, base_model, &eval, inputs) {
        let w = &evaluation.weighted;
        for (name, v) in [
            ("site_eval_loss", w.loss),
            ("site_eval_accuracy", w.accuracy),
            ("site_eval_auc", w.auc),
            ("site_eval_dice", w.dice),
        ] {
            if let Some(v) = v {
                metrics.insert(name.into(), v);
            }
        }
        let effects = vec![actions::round_evaluated(facts, round, &evaluation, false)];
        steps.push(Step::AuditEvaluation {
            evaluation: evaluation.clone(),
            effects,
        });
        steps.push(Step::RecordEvaluation { round, evaluation });
    }
    steps.push(Step::NextState {
        scaling: scaling.with_round(stats),
    });
    let rounds = pruned(round, retention);
    if !rounds.is_empty() {
        steps.push(Step::Prune { rounds });
    }
    RoundEnd { steps, metrics }
}

/// The round's metrics from its numbers: updates, examples, clipped; the
/// clip norm when one was applied; the noise when any was added; (ε, δ)
/// when accounted.
fn round_metrics(n: &RoundNumbers) -> BTreeMap<String, f64> {
    let mut metrics = BTreeMap::new();
    metrics.insert("num_updates".into(), n.num_updates as f64);
    metrics.insert("total_examples".into(), n.total_examples as f64);
    metrics.insert("num_clipped".into(), n.num_clipped as f64);
    if let Some(c) = n.clip_norm {
        metrics.insert("clip_norm".into(), c);
    }
    if n.noise_std > 0.0 {
        metrics.insert("noise_std".into(), n.noise_std);
    }
    if let Some((eps, delta)) = n.privacy {
        metrics.insert("dp_epsilon".into(), eps);
        metrics.insert("dp_delta".into(), delta);
    }
    metrics
}

/// Round `round`'s federated evaluation of its base model (the model made
/// by the round before it), when the job asks for that model: from the
/// reports of the sites whose update counted in the round (in `inputs`),
/// in the order they came.
fn evaluation_due(
    round: RoundId,
    base_model: ModelHash,
    eval: &EvaluationFacts,
    inputs: &[RoundInput],
) -> Option<FederatedEvaluation> {
    let after = round.0.saturating_sub(1);
    if !evaluation::is_due(after, eval.every_rounds, eval.rounds) {
        return None;
    }
    let reports: Vec<(String, Option<EvalMetrics>)> = eval
        .reports
        .iter()
        .filter(|(site, _)| inputs.iter().any(|i| i.site == site.as_str()))
        .map(|(site, m)| (site.as_str().to_owned(), m.clone()))
        .collect();
    Some(evaluation::federated_evaluation(
        after,
        Some(round),
        base_model,
        &reports,
    ))
}

/// The archived rounds retention removes once `completed` has completed:
/// with `update_retention = N`, every round up to `completed − N`, oldest
/// first; none while fewer than `N` rounds completed, none when the whole
/// job is kept.
pub fn pruned(completed: RoundId, retention: &Retention) -> Vec<RoundId> {
    let UpdateRetention::Rounds(keep) = retention.keep else {
        return Vec::new();
    };
    let Some(last_dropped) = completed.0.checked_sub(u64::from(keep)) else {
        return Vec::new();
    };
    let mut rounds: Vec<RoundId> = retention
        .archived
        .iter()
        .copied()
        .filter(|r| r.0 <= last_dropped)
        .collect();
    rounds.sort_unstable_by_key(|r| r.0);
    rounds.dedup();
    rounds
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use fedlink_audit::EventKind;
    use fedlink_protocol::{FederationId, JobId, Message};

    use super::*;

    fn facts() -> JobFacts {
        JobFacts {
            federation: FederationId::new("fed").unwrap(),
            job: JobId::new("j1").unwrap(),
            actor: "fedlink://fed/coordinator".into(),
        }
    }

    fn input(site: &str) -> RoundInput {
        RoundInput {
            site: site.into(),
            payload_hash: "ab".repeat(32),
            num_examples: 10,
            payload_file: format!("{site}.payload"),
            envelope_file: format!("{site}.envelope"),
        }
    }

    fn sid(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }

    static NO_STATS: std::sync::LazyLock<FederatedScaling> =
        std::sync::LazyLock::new(FederatedScaling::default);

    /// No feature statistics so far, none this round.
    fn no_scaling() -> (&'static FederatedScaling, &'static [Report]) {
        (&NO_STATS, &[])
    }

    fn metrics(n: u64, acc: f64) -> Option<EvalMetrics> {
        Some(EvalMetrics {
            num_eval_examples: n,
            accuracy: Some(acc),
            ..Default::default()
        })
    }

    fn agg(round: u64, inputs: &[RoundInput]) -> Aggregated<'_> {
        Aggregated {
            round: RoundId(round),
            base_model: ModelHash([1; 32]),
            output_model: ModelHash([2; 32]),
            strategy: serde_json::json!({"name": "fedavg"}),
            dp: None,
            inputs,
            numbers: RoundNumbers {
                num_updates: inputs.len(),
                total_examples: 10 * inputs.len() as u128,
                ..Default::default()
            },
        }
    }

    fn no_eval() -> EvaluationFacts {
        EvaluationFacts {
            every_rounds: 0,
            rounds: 5,
            reports: vec![],
        }
    }

    fn keep_job() -> Retention {
        Retention {
            keep: UpdateRetention::Job,
            archived: vec![RoundId(1), RoundId(2)],
        }
    }

    /// The steps by name; the `Record` step's effects by kind.
    fn names(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| match s {
                Step::StoreModel { .. } => "store model".into(),
                Step::SyncSpool => "fsync spool".into(),
                Step::WriteRoundFile { .. } => "round.json".into(),
                Step::Record(effects) | Step::AuditEvaluation { effects, .. } => effects
                    .iter()
                    .map(|e| match e {
                        Effect::AppendAudit { event, .. } => format!("audit {}", event.kind()),
                        Effect::Send {
                            site,
                            message: Message::RoundOutcome(o),
                        } => format!("outcome r{} to {site}", o.round.0),
                        Effect::PushHead { sites } => format!("head to {}", sites.len()),
                        other => format!("{other:?}"),
                    })
                    .collect::<Vec<_>>()
                    .join(" + "),
                Step::SetRoundTimes { .. } => "round times".into(),
                Step::Publish { .. } => "publish".into(),
                Step::RecordEvaluation { .. } => "record evaluation".into(),
                Step::NextState { .. } => "next state".into(),
                Step::Prune { rounds } => {
                    format!("prune {:?}", rounds.iter().map(|r| r.0).collect::<Vec<_>>())
                }
            })
            .collect()
    }

    #[test]
    fn the_model_is_published_only_after_round_json_and_its_audit_entry() {
        let inputs = [input("a"), input("b")];
        let end = plan(
            &facts(),
            agg(3, &inputs),
            no_eval(),
            no_scaling(),
            &keep_job(),
        );
        assert_eq!(
            names(&end.steps),
            [
                "store model",
                "fsync spool",
                "round.json",
                "audit round.aggregated + outcome r3 to a + outcome r3 to b + head to 2",
                "round times",
                "publish",
                "next state",
            ]
        );
        let at = |f: &dyn Fn(&Step) -> bool| end.steps.iter().position(f).unwrap();
        let publish = at(&|s| matches!(s, Step::Publish { .. }));
        let round_json = at(&|s| matches!(s, Step::WriteRoundFile { .. }));
        let audited = at(&|s| {
            matches!(s, Step::Record(e) if matches!(e.first(),
                Some(Effect::AppendAudit { event, .. }) if event.kind() == EventKind::RoundAggregated))
        });
        let stored = at(&|s| matches!(s, Step::StoreModel { .. }));
        let synced = at(&|s| matches!(s, Step::SyncSpool));
        assert!(stored < synced && synced < round_json && round_json < audited);
        assert!(audited < publish);
        // The entry names the model that is stored and published.
        let Step::Record(effects) = &end.steps[audited] else {
            unreachable!()
        };
        let Effect::AppendAudit { event, .. } = &effects[0] else {
            unreachable!()
        };
        let details = event.details().unwrap();
        assert_eq!(details["output_model"], ModelHash([2; 32]).to_hex());
        assert_eq!(details["round"], 3);
        assert!(end.steps.iter().all(|s| match s {
            Step::StoreModel { model } | Step::Publish { model } => *model == ModelHash([2; 32]),
            Step::WriteRoundFile { round } | Step::SetRoundTimes { round } => *round == RoundId(3),
            _ => true,
        }));
    }

    #[test]
    fn a_due_evaluation_is_on_record_before_it_is_kept_and_after_the_publish() {
        let inputs = [input("a"), input("b")];
        let eval = EvaluationFacts {
            every_rounds: 1,
            rounds: 5,
            reports: vec![(sid("b"), metrics(3, 0.5)), (sid("a"), metrics(1, 1.0))],
        };
        let end = plan(&facts(), agg(3, &inputs), eval, no_scaling(), &keep_job());
        let names = names(&end.steps);
        assert_eq!(
            names[5..],
            [
                "publish",
                "audit round.evaluated",
                "record evaluation",
                "next state"
            ]
        );
        let Step::RecordEvaluation { round, evaluation } = &end.steps[7] else {
            unreachable!()
        };
        // Round 3's updates evaluated round 3's base model, made by round 2.
        assert_eq!(*round, RoundId(3));
        assert_eq!(evaluation.after_round, 2);
        assert_eq!(evaluation.reported_in_round, Some(3));
        assert_eq!(evaluation.model, ModelHash([1; 32]).to_hex());
        assert_eq!(evaluation.weighted.accuracy, Some(0.625));
        assert_eq!(end.metrics.get("site_eval_accuracy"), Some(&0.625));
        let Step::AuditEvaluation {
            evaluation: audited,
            effects,
        } = &end.steps[6]
        else {
            unreachable!()
        };
        assert_eq!(audited, evaluation);
        let Effect::AppendAudit { event, .. } = &effects[0] else {
            unreachable!()
        };
        let details = event.details().unwrap();
        assert_eq!(details["after_round"], 2);
        assert!(details.get("requested").is_none());
    }

    #[test]
    fn no_evaluation_when_not_due() {
        let inputs = [input("a")];
        // every 2 rounds of 5: the model after round 3 (round 4's base) is
        // not evaluated; after round 4 (round 5's base) it is.
        let eval = |reports| EvaluationFacts {
            every_rounds: 2,
            rounds: 5,
            reports,
        };
        let r4 = plan(
            &facts(),
            agg(4, &inputs),
            eval(vec![(sid("a"), metrics(1, 1.0))]),
            no_scaling(),
            &keep_job(),
        );
        assert!(!r4.steps.iter().any(|s| matches!(
            s,
            Step::AuditEvaluation { .. } | Step::RecordEvaluation { .. }
        )));
        assert!(!r4.metrics.contains_key("site_eval_accuracy"));
        let r5 = plan(
            &facts(),
            agg(5, &inputs),
            eval(vec![(sid("a"), metrics(1, 1.0))]),
            no_scaling(),
            &keep_job(),
        );
        assert!(
            r5.steps
                .iter()
                .any(|s| matches!(s, Step::RecordEvaluation { .. }))
        );
        // every_rounds = 0: never.
        let never = plan(
            &facts(),
            agg(5, &inputs),
            no_eval(),
            no_scaling(),
            &keep_job(),
        );
        assert!(
            !never
                .steps
                .iter()
                .any(|s| matches!(s, Step::RecordEvaluation { .. }))
        );
    }

    #[test]
    fn only_the_reports_of_sites_whose_update_counted_are_evaluated() {
        // "x" was excluded (withdrawn) and "y" never counted: their reports
        // are left out entirely (not even listed as excluded); "c" counted
        // but reported nothing: listed as left out.
        let inputs = [input("a"), input("c")];
        let eval = EvaluationFacts {
            every_rounds: 1,
            rounds: 5,
            reports: vec![
                (sid("x"), metrics(100, 0.0)),
                (sid("a"), metrics(2, 0.75)),
                (sid("y"), metrics(100, 0.0)),
                (sid("c"), None),
            ],
        };
        let end = plan(&facts(), agg(2, &inputs), eval, no_scaling(), &keep_job());
        let Some(Step::RecordEvaluation { evaluation, .. }) = end
            .steps
            .iter()
            .find(|s| matches!(s, Step::RecordEvaluation { .. }))
        else {
            panic!("evaluation due every round");
        };
        let sites: Vec<&str> = evaluation.sites.iter().map(|s| s.site.as_str()).collect();
        assert_eq!(sites, ["a"]);
        let left_out: Vec<&str> = evaluation
            .excluded
            .iter()
            .map(|x| x.site.as_str())
            .collect();
        assert_eq!(left_out, ["c"]);
        assert_eq!(evaluation.weighted.accuracy, Some(0.75));
        assert_eq!(evaluation.weighted.num_eval_examples, 2);
    }

    #[test]
    fn the_metrics_map_names_what_the_round_applied() {
        let inputs = [input("a"), input("b")];
        let plain = plan(
            &facts(),
            agg(1, &inputs),
            no_eval(),
            no_scaling(),
            &keep_job(),
        );
        assert_eq!(
            plain.metrics,
            BTreeMap::from([
                ("num_updates".to_owned(), 2.0),
                ("total_examples".to_owned(), 20.0),
                ("num_clipped".to_owned(), 0.0),
            ])
        );
        let mut dp = agg(1, &inputs);
        dp.numbers = RoundNumbers {
            num_updates: 2,
            total_examples: 20,
            num_clipped: 1,
            clip_norm: Some(1.5),
            noise_std: 0.25,
            privacy: Some((2.0, 1e-5)),
        };
        let dp = plan(&facts(), dp, no_eval(), no_scaling(), &keep_job());
        assert_eq!(
            dp.metrics,
            BTreeMap::from([
                ("num_updates".to_owned(), 2.0),
                ("total_examples".to_owned(), 20.0),
                ("num_clipped".to_owned(), 1.0),
                ("clip_norm".to_owned(), 1.5),
                ("noise_std".to_owned(), 0.25),
                ("dp_epsilon".to_owned(), 2.0),
                ("dp_delta".to_owned(), 1e-5),
            ])
        );
        // A clip norm without noise: no `noise_std` entry.
        let mut clip = agg(1, &inputs);
        clip.numbers.clip_norm = Some(1.0);
        let clip = plan(&facts(), clip, no_eval(), no_scaling(), &keep_job());
        assert!(clip.metrics.contains_key("clip_norm") && !clip.metrics.contains_key("noise_std"));
    }

    #[test]
    fn retention_prunes_the_rounds_older_than_the_newest_n() {
        let archived: Vec<RoundId> = [5, 1, 3, 2, 4].map(RoundId).to_vec();
        let keep = |n| Retention {
            keep: UpdateRetention::Rounds(n),
            archived: archived.clone(),
        };
        let ids = |rs: Vec<RoundId>| rs.into_iter().map(|r| r.0).collect::<Vec<_>>();
        // Keep 2 after round 5: rounds 4 and 5 stay.
        assert_eq!(ids(pruned(RoundId(5), &keep(2))), [1, 2, 3]);
        // Fewer rounds completed than kept: none.
        assert_eq!(ids(pruned(RoundId(2), &keep(3))), Vec::<u64>::new());
        // Exactly N completed: round 0 would go (none archived).
        assert_eq!(ids(pruned(RoundId(3), &keep(3))), Vec::<u64>::new());
        // The whole job kept: none.
        let job = Retention {
            keep: UpdateRetention::Job,
            archived: archived.clone(),
        };
        assert!(pruned(RoundId(5), &job).is_empty());
        // The plan ends with the prune, after the next state.
        let inputs = [input("a")];
        let end = plan(&facts(), agg(5, &inputs), no_eval(), no_scaling(), &keep(2));
        assert_eq!(
            names(&end.steps)[5..],
            ["publish", "next state", "prune [1, 2, 3]"]
        );
        let none = plan(&facts(), agg(5, &inputs), no_eval(), no_scaling(), &keep(9));
        assert_eq!(
            names(&none.steps).last().map(String::as_str),
            Some("next state")
        );
    }

    #[test]
    fn the_next_state_carries_the_scaling_after_the_rounds_statistics() {
        let stats = fedlink_protocol::FeatureStats {
            features: vec!["x".into()],
            count: 2,
            sum: vec![4.0],
            sum_sq: vec![10.0],
        };
        let reports = [Report {
            site: sid("a"),
            num_examples: 2,
            stats,
        }];
        let before = FederatedScaling::default();
        let inputs = [input("a")];
        let end = plan(
            &facts(),
            agg(1, &inputs),
            no_eval(),
            (&before, &reports),
            &keep_job(),
        );
        let Some(Step::NextState { scaling }) = end
            .steps
            .iter()
            .find(|s| matches!(s, Step::NextState { .. }))
        else {
            panic!("no next state");
        };
        assert_eq!(*scaling, before.with_round(&reports));
        assert_eq!(scaling.sites().collect::<Vec<_>>(), ["a"]);
        assert!(scaling.scaling().is_some() && before.scaling().is_none());
    }
}
