//! Taking a stored job up again — at start-up, when the first submitted
//! job starts, and at a job switch — and creating the configured job at
//! start-up.
//!
//! ```text
//!  the store's recovery (job, re-opened round and its discarded updates,
//!  the model's spec, optimizer/scaling and replay state bytes or none)
//!     │                               ──▶ recover ──▶ Recovered {
//!     │                                                 effects: round.discarded (if a round was re-opened),
//!     │                                                 outcome: Resumed { strategy, state, replay } | RecoveryError }
//!  the driver executes: appends the effects (even when the outcome is an
//!  error: the store has set the round's updates aside already), then
//!  builds the engine from `Resumed` or stops with the error.
//!
//!  a new configured job (its file's bytes, its initial model's hash)
//!     │                               ──▶ configured_job_created ──▶ [job.submitted, store the model, store the job]
//!  a submitted job (`jobs submit`, its entry from `admin::job_submitted`)
//!     │                               ──▶ submitted_job_created ──▶ [job.submitted, store the model, store the job, queue it]
//! ```
//!
//! Which wire files of the model stay served and which are pruned, and
//! whether the last round's downlink update is served again (by the job's
//! downlink encoding), are [`super::served`]'s decisions.

use fedlink_aggregation::StrategyConfig;
use fedlink_audit::{CoordEvent, coord};
use fedlink_protocol::{FederationId, JobId, ModelHash, ModelSpec, ReplayGuard, RoundId};

use super::Effect;
use super::jobs;
use super::scaling::PersistedState;
use crate::job::Job;

/// A round that was in flight when the coordinator stopped, re-opened by
/// the store's recovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reopened {
    /// The round.
    pub round: RoundId,
    /// How many of its accepted updates were set aside (their sites are
    /// asked again).
    pub discarded: usize,
}

/// What the store holds of a job being taken up again.
#[derive(Clone, Copy, Debug)]
pub struct Stored<'a> {
    /// The coordinator's own audit identity (the actor of its events).
    pub actor: &'a str,
    /// The federation.
    pub federation: &'a FederationId,
    /// The job's definition.
    pub job: &'a Job,
    /// The round the store re-opened, if one was in flight.
    pub reopened: Option<Reopened>,
    /// The spec of the job's current model.
    pub model: &'a ModelSpec,
    /// The optimizer and feature-scaling state of the last completed
    /// round (JSON), if one completed.
    pub optimizer_state: Option<&'a [u8]>,
    /// The replay guard's state (JSON), if the job received an update.
    pub replay_state: Option<&'a [u8]>,
}

/// Why a stored job cannot be taken up again.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The job's aggregation strategy is not valid.
    #[error(transparent)]
    Strategy(#[from] fedlink_aggregation::ConfigError),
    /// The job's strategy does not fit its model.
    #[error(transparent)]
    DoesNotFit(fedlink_aggregation::AggregationError),
    /// A state kept in the store does not decode (`what`: "stored
    /// optimizer state", "stored replay state").
    #[error("{what}: {source}")]
    StoredState {
        /// Which state.
        what: &'static str,
        /// Why it does not decode.
        source: serde_json::Error,
    },
    /// The job's id is not a valid job id (checked when its re-opened
    /// round is lifted in the replay guard).
    #[error(transparent)]
    JobId(fedlink_protocol::IdError),
}

/// The state the job's engine is built from.
#[derive(Clone, Debug)]
pub struct Resumed {
    /// The job's aggregation strategy.
    pub strategy: StrategyConfig,
    /// The optimizer and feature-scaling state (the default when no round
    /// has completed).
    pub state: PersistedState,
    /// The replay guard: the envelopes seen so far stay replays; the
    /// re-opened round's commitments are lifted, so its sites report
    /// again with fresh nonces.
    pub replay: ReplayGuard,
}

/// What [`recover`] decided.
#[derive(Debug)]
pub struct Recovered {
    /// To execute first, whatever the outcome: the re-opened round's
    /// `round.discarded` entry (the store has set its updates aside
    /// already, so it is on record even when the job then cannot start).
    pub effects: Vec<Effect>,
    /// The state to build the engine from, or why the job cannot start.
    pub outcome: Result<Resumed, RecoveryError>,
}

/// Take a stored job up again: a re-opened round is audited
/// (`round.discarded`, with how many updates were set aside); then the
/// job's strategy is built and must fit its model; the stored optimizer
/// state is decoded (none: the default), then the replay state (none: an
/// empty guard), either refused when it does not decode; the re-opened
/// round's commitments are lifted in the replay guard.
pub fn recover(stored: Stored<'_>) -> Recovered {
    let effects = stored
        .reopened
        .map(|r| Effect::AppendAudit {
            actor: stored.actor.to_owned(),
            event: CoordEvent::RoundDiscarded(coord::RoundDiscarded {
                job: stored.job.id.clone(),
                round: r.round.0,
                reason: format!(
                    "the coordinator restarted during the round; its {} accepted update(s) \
                     are discarded and the round is re-opened",
                    r.discarded
                ),
            }),
        })
        .into_iter()
        .collect();
    Recovered {
        effects,
        outcome: resumed(&stored),
    }
}

fn resumed(stored: &Stored<'_>) -> Result<Resumed, RecoveryError> {
    let job = stored.job;
    let strategy = jobs::strategy_config(job)?;
    jobs::check_fits(&strategy, job, stored.model).map_err(RecoveryError::DoesNotFit)?;
    let state = decode_or_default(stored.optimizer_state, "stored optimizer state")?;
    let mut replay: ReplayGuard = decode_or_default(stored.replay_state, "stored replay state")?;
    if let Some(r) = stored.reopened {
        let id = JobId::new(&job.id).map_err(RecoveryError::JobId)?;
        replay.reopen_round(stored.federation, &id, r.round);
    }
    Ok(Resumed {
        strategy,
        state,
        replay,
    })
}

/// `bytes` decoded as JSON, or the default when there are none.
fn decode_or_default<T: serde::de::DeserializeOwned + Default>(
    bytes: Option<&[u8]>,
    what: &'static str,
) -> Result<T, RecoveryError> {
    bytes.map_or_else(
        || Ok(T::default()),
        |b| serde_json::from_slice(b).map_err(|source| RecoveryError::StoredState { what, source }),
    )
}

/// One step of creating a job — the configured job at start-up
/// ([`configured_job_created`]) or a submitted one
/// ([`submitted_job_created`]) — in the order [`job_created`] gives them.
#[derive(Clone, Debug, PartialEq)]
pub enum Create {
    /// Append this audit entry (`job.submitted`).
    Audit(Box<Effect>),
    /// Store the job's initial model.
    PutModel,
    /// Store the job, with the initial model as its current model.
    CreateJob,
    /// Append the job to the queue of jobs waiting to run.
    Enqueue,
}

/// Whether a created job runs now or waits in the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// It runs now (the configured job at start-up).
    Runs,
    /// It waits in the queue (a submitted job).
    Queued,
}

/// Create a job: its `job.submitted` `entry` first, then its model, then
/// the job; then, if it waits, its place in the queue.
pub fn job_created(entry: Effect, then: Then) -> Vec<Create> {
    let mut steps = vec![
        Create::Audit(Box::new(entry)),
        Create::PutModel,
        Create::CreateJob,
    ];
    if then == Then::Queued {
        steps.push(Create::Enqueue);
    }
    steps
}

/// Create the configured job `job` at start-up (its file's bytes `toml`,
/// its initial model's hash `initial`): its `job.submitted` entry by the
/// coordinator (`actor`) first — the job, the file's blake3 and the
/// initial model's hash —, then its model, then the job ([`job_created`]).
pub fn configured_job_created(
    actor: &str,
    job: &str,
    toml: &[u8],
    initial: &ModelHash,
) -> Vec<Create> {
    job_created(
        Effect::AppendAudit {
            actor: actor.to_owned(),
            event: CoordEvent::JobSubmitted(coord::JobSubmitted {
                job: job.to_owned(),
                job_toml_blake3: blake3::hash(toml).to_hex().to_string(),
                initial_model: Some(initial.to_hex()),
            }),
        },
        Then::Runs,
    )
}

/// Create a submitted job whose `job.submitted` entry is `entry`
/// ([`super::admin::job_submitted`]): the same steps as the configured
/// job's ([`job_created`]), then the job queued.
pub fn submitted_job_created(entry: Effect) -> Vec<Create> {
    job_created(entry, Then::Queued)
}

#[cfg(test)]
mod tests {
    use fedlink_protocol::{
        Encoding, PROTOCOL_VERSION, PayloadHash, SiteId, UpdateHeader, UpdateNonce, ValueCodec,
    };

    use super::*;
    use fedlink_audit::EventKind;

    const ACTOR: &str = "fedlink://fed/coordinator";

    fn job(strategy: &str, inputs: u32) -> Job {
        Job::from_toml(&format!(
            "id = \"j\"\nrounds = 3\nseed = 5\n\
             arch = {{ kind = \"logreg\", inputs = {inputs}, classes = 2 }}\n\
             init = {{ seed = 1 }}\n[round]\ndeadline_secs = 30\n[strategy]\n{strategy}\n"
        ))
        .unwrap()
    }

    fn fed() -> FederationId {
        FederationId::new("fed").unwrap()
    }

    /// A replay guard in which site `a` has an update accepted in rounds
    /// 1 and 2 of job `j`, as JSON.
    fn replay_bytes() -> Vec<u8> {
        let mut g = ReplayGuard::new();
        for round in [1, 2] {
            g.commit_header(&UpdateHeader {
                protocol_version: PROTOCOL_VERSION,
                federation_id: fed(),
                site_id: SiteId::new("a").unwrap(),
                job_id: JobId::new("j").unwrap(),
                round: RoundId(round),
                base_model: ModelHash([0; 32]),
                num_examples: 10,
                encoding: Encoding::with_codec(ValueCodec::F32).unwrap(),
                payload_len: 16,
                payload_hash: PayloadHash([0; 32]),
                nonce: UpdateNonce([round as u8; 16]),
                metrics: None,
                feature_stats: None,
            });
        }
        serde_json::to_vec(&g).unwrap()
    }

    fn committed(g: &ReplayGuard, round: u64) -> bool {
        g.is_committed(
            &fed(),
            &JobId::new("j").unwrap(),
            RoundId(round),
            &SiteId::new("a").unwrap(),
        )
    }

    fn stored<'a>(
        job: &'a Job,
        fed: &'a FederationId,
        spec: &'a ModelSpec,
        reopened: Option<Reopened>,
        optimizer_state: Option<&'a [u8]>,
        replay_state: Option<&'a [u8]>,
    ) -> Stored<'a> {
        Stored {
            actor: ACTOR,
            federation: fed,
            job,
            reopened,
            model: spec,
            optimizer_state,
            replay_state,
        }
    }

    #[test]
    fn a_fresh_job_starts_from_defaults_with_nothing_to_record() {
        let job = job("name = \"fedavg\"", 4);
        let spec = job.arch.spec().unwrap();
        let fed = fed();
        let r = recover(stored(&job, &fed, &spec, None, None, None));
        assert!(r.effects.is_empty());
        let resumed = r.outcome.unwrap();
        assert_eq!(resumed.strategy, jobs::strategy_config(&job).unwrap());
        assert_eq!(resumed.state, PersistedState::default());
        assert_eq!(resumed.replay, ReplayGuard::new());
    }

    #[test]
    fn a_job_resumed_between_rounds_keeps_its_stored_state() {
        let job = job("name = \"fedavg\"", 4);
        let spec = job.arch.spec().unwrap();
        let fed = fed();
        let state = PersistedState::default();
        let state_bytes = serde_json::to_vec(&state).unwrap();
        let replay = replay_bytes();
        let r = recover(stored(
            &job,
            &fed,
            &spec,
            None,
            Some(&state_bytes),
            Some(&replay),
        ));
        assert!(r.effects.is_empty());
        let resumed = r.outcome.unwrap();
        assert_eq!(resumed.state, state);
        // Every commitment stays: no round is re-opened.
        assert_eq!(
            resumed.replay,
            serde_json::from_slice::<ReplayGuard>(&replay).unwrap()
        );
        assert!(committed(&resumed.replay, 1) && committed(&resumed.replay, 2));
    }

    /// The `round.discarded` entry of a re-opened round, byte for byte as
    /// the driver wrote it before the decision moved here.
    #[test]
    fn a_round_in_flight_is_recorded_discarded_and_lifted_in_the_replay_guard() {
        let job = job("name = \"fedavg\"", 4);
        let spec = job.arch.spec().unwrap();
        let fed = fed();
        let replay = replay_bytes();
        let reopened = Some(Reopened {
            round: RoundId(2),
            discarded: 3,
        });
        let r = recover(stored(&job, &fed, &spec, reopened, None, Some(&replay)));
        let [Effect::AppendAudit { actor, event }] = r.effects.as_slice() else {
            panic!("one audit entry: {:?}", r.effects);
        };
        assert_eq!(actor, ACTOR);
        assert_eq!(event.kind(), EventKind::RoundDiscarded);
        assert_eq!(
            serde_json::to_string(&event.details().unwrap()).unwrap(),
            "{\"job\":\"j\",\"reason\":\"the coordinator restarted during the round; its 3 \
             accepted update(s) are discarded and the round is re-opened\",\"round\":2}"
        );
        assert!(Effect::audited_first(&r.effects));
        let resumed = r.outcome.unwrap();
        // Round 2 is reported again; round 1's commitment stays.
        assert!(committed(&resumed.replay, 1));
        assert!(!committed(&resumed.replay, 2));
        // Its envelopes stay replays: the guard still knows the entry.
        assert_eq!(resumed.replay.len(), 2);
    }

    #[test]
    fn corrupt_stored_state_is_refused_and_names_which() {
        let job = job("name = \"fedavg\"", 4);
        let spec = job.arch.spec().unwrap();
        let fed = fed();
        let good = replay_bytes();
        let reopened = Some(Reopened {
            round: RoundId(2),
            discarded: 0,
        });
        for (optimizer, replay, want) in [
            (Some(&b"{"[..]), None, "stored optimizer state"),
            (
                Some(&b"null"[..]),
                Some(&good[..]),
                "stored optimizer state",
            ),
            (None, Some(&b"{}"[..]), "stored replay state"),
            // The optimizer state is checked first.
            (Some(&b"x"[..]), Some(&b"x"[..]), "stored optimizer state"),
        ] {
            let r = recover(stored(&job, &fed, &spec, reopened, optimizer, replay));
            // The discard is on record even though the job cannot start.
            assert_eq!(r.effects.len(), 1);
            match r.outcome {
                Err(RecoveryError::StoredState { what, source }) => {
                    assert_eq!(what, want);
                    let err = RecoveryError::StoredState { what, source };
                    assert!(err.to_string().starts_with(&format!("{want}: ")), "{err}");
                }
                other => panic!("{want}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_strategy_that_is_invalid_or_does_not_fit_is_refused_before_the_state() {
        let fed = fed();
        // No such strategy (a configured job's file is not checked for it
        // before it is stored).
        let unknown = job("name = \"no-such-strategy\"", 4);
        let spec = unknown.arch.spec().unwrap();
        let r = recover(stored(&unknown, &fed, &spec, None, Some(b"x"), None));
        let want = jobs::strategy_config(&unknown).unwrap_err().to_string();
        match r.outcome {
            Err(e @ RecoveryError::Strategy(_)) => assert_eq!(e.to_string(), want),
            other => panic!("{other:?}"),
        }
        // Too big for its memory budget.
        let big = job(
            "name = \"fedmedian\"\n[strategy.params]\nmemory_budget_bytes = 1000",
            1000,
        );
        let spec = big.arch.spec().unwrap();
        let r = recover(stored(&big, &fed, &spec, None, Some(b"x"), None));
        let why = jobs::check_fits(&jobs::strategy_config(&big).unwrap(), &big, &spec)
            .unwrap_err()
            .to_string();
        match r.outcome {
            Err(e @ RecoveryError::DoesNotFit(_)) => assert_eq!(e.to_string(), why),
            other => panic!("{other:?}"),
        }
    }

    /// The configured job's `job.submitted` entry, byte for byte as the
    /// driver wrote it before the decision moved here, comes first.
    #[test]
    fn a_configured_job_is_recorded_then_its_model_then_the_job_stored() {
        let toml = b"id = \"j\"\n";
        let steps = configured_job_created(ACTOR, "j", toml, &ModelHash([0xab; 32]));
        let [Create::Audit(entry), Create::PutModel, Create::CreateJob] = steps.as_slice() else {
            panic!("{steps:?}");
        };
        let Effect::AppendAudit { actor, event } = &**entry else {
            panic!("{entry:?}");
        };
        assert_eq!(
            (actor.as_str(), event.kind()),
            (ACTOR, EventKind::JobSubmitted)
        );
        assert_eq!(
            serde_json::to_string(&event.details().unwrap()).unwrap(),
            format!(
                "{{\"initial_model\":\"{}\",\"job\":\"j\",\"job_toml_blake3\":\"{}\"}}",
                "ab".repeat(32),
                blake3::hash(toml).to_hex()
            )
        );
    }

    /// A submitted job is created in the configured job's order, its own
    /// entry first, and queued last.
    #[test]
    fn a_submitted_job_is_created_in_the_same_order_then_queued() {
        let entry = Effect::AppendAudit {
            actor: ACTOR.to_owned(),
            event: CoordEvent::JobSubmitted(coord::JobSubmitted {
                job: "j".to_owned(),
                job_toml_blake3: "00".repeat(32),
                initial_model: None,
            }),
        };
        let steps = submitted_job_created(entry.clone());
        assert_eq!(
            steps,
            vec![
                Create::Audit(Box::new(entry)),
                Create::PutModel,
                Create::CreateJob,
                Create::Enqueue,
            ]
        );
        let configured = configured_job_created(ACTOR, "j", b"", &ModelHash([1; 32]));
        assert_eq!(steps[1..3], configured[1..]);
        assert!(!configured.contains(&Create::Enqueue));
    }
}
