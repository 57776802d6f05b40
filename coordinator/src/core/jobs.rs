//! Which job runs: at start-up, and when the running job has finished;
//! and a job's aggregation strategy.
//!
//! ```text
//!  start-up: the config's job (new / stored, finished?), the store's jobs
//!     │                                   ──▶ start_up ──▶ Create | Run | Empty | Exit | NoJob
//!  a job has finished: the next queued job (queue::next_job), --exit-after-job
//!     │                                   ──▶ after_finish ──▶ Switch | Exit | Stay
//!  the driver executes: creates the config's job (its `job.submitted` entry
//!  first), builds the engine, hands the held sites over (Sites::hand_over,
//!  after an empty start and a job switch alike), or stops.
//! ```
//!
//! Whether the sites are told `Bye` when a job ends is decided with the
//! job's end ([`super::actions::job_finished`]: only when no job is queued
//! behind it); the connections themselves are never closed by a job
//! switch.

use fedlink_aggregation::StrategyConfig;

use crate::job::Job;
use crate::round::JobOutcome;

/// Build the aggregation strategy of a job: its `[strategy]` section, plus
/// the `[privacy]` clip norm and noise multiplier unless the strategy
/// parameters set them, and [`Job::max_examples_per_site`] as
/// `max_num_examples`.
pub fn strategy_config(job: &Job) -> Result<StrategyConfig, fedlink_aggregation::ConfigError> {
    let mut params = job.strategy.params_as_strings();
    let has = |k: &str, p: &[(String, String)]| p.iter().any(|(n, _)| n == k);
    if let Some(c) = job.privacy.clip_norm
        && !has("clip_norm", &params)
        && !has("adaptive_clipping", &params)
    {
        params.push(("clip_norm".into(), c.to_string()));
    }
    if job.privacy.noise_multiplier > 0.0 && !has("noise_multiplier", &params) {
        params.push((
            "noise_multiplier".into(),
            job.privacy.noise_multiplier.to_string(),
        ));
        if !has("num_sampled_sites", &params) {
            params.push(("num_sampled_sites".into(), job.min_sites().to_string()));
        }
    }
    // The job's per-site cap on `num_examples` is the strategy's
    // `max_num_examples` (the job refuses both set and different).
    if !has("max_num_examples", &params) {
        params.push((
            "max_num_examples".into(),
            job.max_examples_per_site().to_string(),
        ));
    }
    StrategyConfig::from_params(&job.strategy.name, params)
}

/// Whether the strategy's aggregation of the job's most sites fits the
/// model `spec` in memory (refused before anything is allocated).
pub fn check_fits(
    strategy: &StrategyConfig,
    job: &Job,
    spec: &fedlink_protocol::ModelSpec,
) -> Result<(), fedlink_aggregation::AggregationError> {
    fedlink_aggregation::would_fit(strategy, job.max_sites() as usize, spec)
}

/// The job file of the coordinator's configuration, as the store knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigJob {
    /// No job file is configured.
    None,
    /// A job the store does not have yet.
    New(String),
    /// A job the store has; `outcome`: how it ended, if it has.
    Stored {
        /// Its id.
        id: String,
        /// Its outcome.
        outcome: Option<JobOutcome>,
    },
}

/// A job the store has: its id and whether it has finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredJob {
    /// Its id.
    pub id: String,
    /// Whether it has finished.
    pub finished: bool,
}

/// What the coordinator does at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartUp {
    /// Create the configured job in the store (its `job.submitted` entry
    /// first), then run it.
    Create(String),
    /// Run this job (recovered from the store).
    Run(String),
    /// Run no job: hold the sites until one is submitted.
    Empty,
    /// Stop at once (`--exit-after-job`): the configured job has finished
    /// with this outcome; it is not run again.
    Exit(JobOutcome),
    /// Stop with an error (`--exit-after-job`): there is no job to run.
    NoJob,
}

/// Which job runs at start-up: the configured job (created if new; if it
/// has finished, it is not run again — with `exit_after_job` the
/// coordinator stops with its outcome, else it goes on as without one),
/// else the most recent unfinished job of the store (`stored`, oldest
/// first), else none (empty; with `exit_after_job`, an error).
pub fn start_up(config: ConfigJob, stored: &[StoredJob], exit_after_job: bool) -> StartUp {
    let latest_unfinished = || {
        stored
            .iter()
            .rev()
            .find(|j| !j.finished)
            .map(|j| j.id.clone())
    };
    let chosen = match config {
        ConfigJob::New(id) => return StartUp::Create(id),
        ConfigJob::Stored { id, outcome: None } => Some(id),
        ConfigJob::Stored {
            outcome: Some(outcome),
            ..
        } if exit_after_job => return StartUp::Exit(outcome),
        ConfigJob::Stored { .. } | ConfigJob::None => latest_unfinished(),
    };
    match chosen {
        Some(id) => StartUp::Run(id),
        None if exit_after_job => StartUp::NoJob,
        None => StartUp::Empty,
    }
}

/// What the coordinator does once the running job has finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterFinish {
    /// Start this queued job; the held sites are handed over to it.
    Switch(String),
    /// Stop (`--exit-after-job`, no job queued).
    Exit,
    /// Keep serving the finished job (its sites stay connected) until a
    /// job is submitted.
    Stay,
}

/// What follows a finished job: the next queued job
/// ([`super::queue::next_job`]) starts, else the coordinator stops if
/// `exit_after_job`, else it stays.
pub fn after_finish(next_queued: Option<String>, exit_after_job: bool) -> AfterFinish {
    match next_queued {
        Some(id) => AfterFinish::Switch(id),
        None if exit_after_job => AfterFinish::Exit,
        None => AfterFinish::Stay,
    }
}

/// How `jobs list` / `jobs show` describe a job: `finished` once it has an
/// outcome; the running job is `running` or `paused`; a job in the queue
/// `queued` or `queued, paused`; any other `idle`. `queued` is asked only
/// for a job that has not finished and does not run (it reads the queue
/// file).
pub fn job_state(
    finished: bool,
    running: bool,
    queued: impl FnOnce() -> bool,
    paused: bool,
) -> &'static str {
    match (finished, running, paused) {
        (true, ..) => "finished",
        (false, true, false) => "running",
        (false, true, true) => "paused",
        (false, false, _) => match (queued(), paused) {
            (true, false) => "queued",
            (true, true) => "queued, paused",
            (false, _) => "idle",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(jobs: &[(&str, bool)]) -> Vec<StoredJob> {
        jobs.iter()
            .map(|(id, finished)| StoredJob {
                id: (*id).to_owned(),
                finished: *finished,
            })
            .collect()
    }

    #[test]
    fn start_up_runs_the_configured_job_else_the_latest_unfinished_else_none() {
        let done = JobOutcome::Aborted {
            completed_rounds: 1,
        };
        let jobs = stored(&[("a", false), ("b", false), ("c", true)]);
        for exit in [false, true] {
            assert_eq!(
                start_up(ConfigJob::New("n".into()), &jobs, exit),
                StartUp::Create("n".into())
            );
            assert_eq!(
                start_up(
                    ConfigJob::Stored {
                        id: "a".into(),
                        outcome: None
                    },
                    &jobs,
                    exit
                ),
                StartUp::Run("a".into()),
                "the configured job, not the latest"
            );
            assert_eq!(
                start_up(ConfigJob::None, &jobs, exit),
                StartUp::Run("b".into()),
                "the most recent unfinished"
            );
        }
        // The configured job has finished: not run again.
        let finished = ConfigJob::Stored {
            id: "c".into(),
            outcome: Some(done.clone()),
        };
        assert_eq!(
            start_up(finished.clone(), &jobs, true),
            StartUp::Exit(done.clone())
        );
        assert_eq!(
            start_up(finished.clone(), &jobs, false),
            StartUp::Run("b".into())
        );
        let all_done = stored(&[("a", true), ("c", true)]);
        assert_eq!(start_up(finished, &all_done, false), StartUp::Empty);
        assert_eq!(start_up(ConfigJob::None, &all_done, false), StartUp::Empty);
        assert_eq!(start_up(ConfigJob::None, &[], false), StartUp::Empty);
        assert_eq!(start_up(ConfigJob::None, &all_done, true), StartUp::NoJob);
    }

    #[test]
    fn a_finished_job_hands_over_to_the_next_queued_else_stops_or_stays() {
        for exit in [false, true] {
            assert_eq!(
                after_finish(Some("j".into()), exit),
                AfterFinish::Switch("j".into()),
                "a queued job starts even with --exit-after-job"
            );
        }
        assert_eq!(after_finish(None, true), AfterFinish::Exit);
        assert_eq!(after_finish(None, false), AfterFinish::Stay);
    }

    #[test]
    fn a_job_is_described_by_its_outcome_then_whether_it_runs_then_the_queue() {
        let cases = [
            ((true, true, true, true), "finished"),
            ((true, false, false, false), "finished"),
            ((false, true, true, false), "running"),
            ((false, true, false, true), "paused"),
            ((false, false, true, false), "queued"),
            ((false, false, true, true), "queued, paused"),
            ((false, false, false, true), "idle"),
            ((false, false, false, false), "idle"),
        ];
        for ((finished, running, queued, paused), want) in cases {
            let mut asked = false;
            let state = job_state(
                finished,
                running,
                || {
                    asked = true;
                    queued
                },
                paused,
            );
            assert_eq!(state, want);
            assert_eq!(
                asked,
                !finished && !running,
                "the queue read only when needed"
            );
        }
    }
}
