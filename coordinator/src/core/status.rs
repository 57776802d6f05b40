//! The admin's view of the running job, decided: the `status` document's
//! job part ([`progress`]: the phase, the round, each site's state) and
//! which job a pause / resume / abort names ([`target`]: the running one
//! or one in the store), over data the driver reads.
//!
//! The driver (`crate::server::engine`'s admin part) reads the round
//! machine's phase, its connected sites, the manifest's site names and
//! the round's record, and hands [`target`]'s answer to
//! [`super::admin::job_command`].
//!
//! ```text
//!  site state:  in the round's record (accepted) ─▶ reported
//!               selected and connected ─────────▶ training
//!               selected, not connected ────────▶ selected, offline
//!               connected ──────────────────────▶ idle
//!               registered only ────────────────▶ offline
//! ```

use std::collections::BTreeSet;

use fedlink_protocol::admin::{FederatedEvaluation, JobProgress, SiteProgress};
use fedlink_protocol::{JobId, ModelHash, RoundId, SiteId};

use super::admin::{StoredJob, Target};
use crate::round::PhaseView;

/// What the driver knows of the running job when `status` asks.
#[derive(Clone, Debug)]
pub struct JobFacts {
    /// The job.
    pub job: JobId,
    /// Where its round machine stands.
    pub phase: PhaseView,
    /// The sites connected now.
    pub connected: Vec<SiteId>,
    /// The sites selected for the round that runs.
    pub selected: Vec<SiteId>,
    /// The site names in the manifest (empty when it cannot be read).
    pub registered: Vec<String>,
    /// Rounds completed.
    pub completed_rounds: u64,
    /// Rounds the job asks for.
    pub total_rounds: u64,
    /// The current global model.
    pub current_model: ModelHash,
    /// Paused by an admin.
    pub paused: bool,
    /// How the job ended, if it has (its `Debug` text).
    pub outcome: Option<String>,
    /// The latest federated evaluation.
    pub evaluation: Option<FederatedEvaluation>,
}

/// The running job's progress. `reported` gives the sites whose updates
/// round `r`'s record holds (asked only while a round collects or
/// aggregates; `None` when there is no record or it cannot be read).
pub fn progress(
    facts: JobFacts,
    reported: impl FnOnce(RoundId) -> Option<Vec<String>>,
) -> JobProgress {
    let (phase, round, accepted) = match facts.phase {
        PhaseView::Waiting { .. } => ("waiting", None, 0),
        PhaseView::Collecting {
            round, accepted, ..
        } => ("collecting", Some(round), accepted),
        PhaseView::Aggregating { round } => ("aggregating", Some(round), 0),
        PhaseView::Finished(_) => ("finished", None, 0),
    };
    let connected: BTreeSet<String> = facts.connected.into_iter().map(String::from).collect();
    let selected: BTreeSet<String> = facts
        .selected
        .into_iter()
        .map(|s| s.as_str().to_owned())
        .collect();
    let reported: BTreeSet<String> = round
        .and_then(reported)
        .map(|sites| sites.into_iter().collect())
        .unwrap_or_default();
    let mut names: BTreeSet<String> = connected.clone();
    names.extend(facts.registered);
    let sites = names
        .into_iter()
        .filter_map(|site| {
            // Names of identities and registry entries, validated when
            // made; a subset of what `SiteId` allows.
            let id = SiteId::new(site.as_str())
                .inspect_err(|e| tracing::error!(error = %e, "site name in the progress"))
                .ok()?;
            let state = site_state(
                reported.contains(&site),
                selected.contains(&site),
                connected.contains(&site),
            );
            Some(SiteProgress {
                connected: connected.contains(&site),
                site: id,
                state: state.to_owned(),
            })
        })
        .collect();
    JobProgress {
        job: facts.job,
        phase: phase.to_owned(),
        round,
        completed_rounds: facts.completed_rounds,
        total_rounds: facts.total_rounds,
        current_model: facts.current_model,
        paused: facts.paused,
        accepted,
        outcome: facts.outcome,
        sites,
        evaluation: facts.evaluation,
    }
}

/// A site's state in the progress (the module's picture).
fn site_state(reported: bool, selected: bool, connected: bool) -> &'static str {
    if reported {
        "reported"
    } else if selected && connected {
        "training"
    } else if selected {
        "selected, offline"
    } else if connected {
        "idle"
    } else {
        "offline"
    }
}

/// The job an admin's pause / resume / abort of `id` reaches: the running
/// one (`running`: its id and whether its round machine has ended it;
/// `None` while no job runs) or what the store says of `id` (`stored`,
/// read only then).
pub fn target<E>(
    id: &str,
    running: Option<(&str, bool)>,
    stored: impl FnOnce() -> Result<Option<StoredJob>, E>,
) -> Result<Target, E> {
    match running {
        Some((job, finished)) if job == id => Ok(Target::Running { finished }),
        _ => stored().map(Target::Stored),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round::JobOutcome;

    fn site(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }

    fn facts(phase: PhaseView) -> JobFacts {
        JobFacts {
            job: JobId::new("job-1").unwrap(),
            phase,
            connected: vec![site("a"), site("b"), site("d")],
            selected: vec![site("a"), site("b"), site("c")],
            registered: vec!["a".into(), "b".into(), "c".into(), "e".into()],
            completed_rounds: 2,
            total_rounds: 5,
            current_model: ModelHash([3; 32]),
            paused: false,
            outcome: None,
            evaluation: None,
        }
    }

    fn states(p: &JobProgress) -> Vec<(String, String, bool)> {
        p.sites
            .iter()
            .map(|s| (s.site.to_string(), s.state.clone(), s.connected))
            .collect()
    }

    #[test]
    fn a_collecting_round_names_each_sites_state() {
        let mut asked = None;
        let f = facts(PhaseView::Collecting {
            round: RoundId(3),
            attempt: 1,
            deadline: std::time::Instant::now(),
            accepted: 1,
            pending: 2,
        });
        let p = progress(f, |r| {
            asked = Some(r);
            Some(vec!["a".into()])
        });
        assert_eq!(asked, Some(RoundId(3)));
        assert_eq!(p.phase, "collecting");
        assert_eq!(p.round, Some(RoundId(3)));
        assert_eq!(p.accepted, 1);
        assert_eq!(
            states(&p),
            [
                ("a".into(), "reported".into(), true),
                ("b".into(), "training".into(), true),
                ("c".into(), "selected, offline".into(), false),
                ("d".into(), "idle".into(), true),
                ("e".into(), "offline".into(), false),
            ]
        );
        assert_eq!(p.completed_rounds, 2);
        assert_eq!(p.total_rounds, 5);
        assert_eq!(p.job.as_str(), "job-1");
    }

    #[test]
    fn without_a_round_no_record_is_read() {
        for (phase, name) in [
            (
                PhaseView::Waiting {
                    next_round: RoundId(3),
                },
                "waiting",
            ),
            (
                PhaseView::Finished(JobOutcome::Completed {
                    model: ModelHash([3; 32]),
                }),
                "finished",
            ),
        ] {
            let p = progress(facts(phase), |_| panic!("no round: no record"));
            assert_eq!(p.phase, name);
            assert_eq!(p.round, None);
            assert_eq!(p.accepted, 0);
            assert!(p.sites.iter().all(|s| s.state != "reported"));
        }
    }

    #[test]
    fn an_aggregating_round_without_a_record_reports_no_site() {
        let p = progress(facts(PhaseView::Aggregating { round: RoundId(4) }), |_| {
            None
        });
        assert_eq!(p.phase, "aggregating");
        assert_eq!(p.round, Some(RoundId(4)));
        assert_eq!(states(&p)[0], ("a".into(), "training".into(), true));
    }

    #[test]
    fn a_command_reaches_the_running_job_or_the_store() {
        let never = || -> Result<Option<StoredJob>, ()> { panic!("the running job") };
        assert_eq!(
            target("j", Some(("j", true)), never),
            Ok(Target::Running { finished: true })
        );
        let queued = StoredJob {
            finished: false,
            completed_rounds: 0,
        };
        assert_eq!(
            target("q", Some(("j", false)), || Ok::<_, ()>(Some(queued))),
            Ok(Target::Stored(Some(queued)))
        );
        assert_eq!(
            target("q", None, || Ok::<_, ()>(None)),
            Ok(Target::Stored(None))
        );
        assert_eq!(target("q", None, || Err("store")), Err("store"));
    }
}
