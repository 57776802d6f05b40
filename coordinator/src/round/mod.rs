//! The round state machine of one job, sans-IO.
//!
//! [`JobRunner`] decides *what* happens in a federated job — which sites a
//! round selects, when a round closes, which updates count, when the job
//! ends — and nothing else. It never reads the clock, never touches a socket
//! or a file, and does not aggregate: it is driven by [`Input`]s and answers
//! with [`Action`]s, in the style of `quinn-proto`'s `Connection`. A driver
//! (the quinn server) moves bytes, runs timers, verifies and aggregates
//! updates, and persists checkpoints.
//!
//! ```text
//!            Input (site events, timer, aggregation result, admin)
//!   driver ─────────────────────────────────────────────▶ JobRunner
//!     ▲                                                      │
//!     └────────── Action (persist, offer, ack/reject, ───────┘
//!                 aggregate, cancel, disconnect, finished)
//! ```
//!
//! # How to call it
//!
//! 1. Build it with [`JobRunner::new`] (fresh job) or [`JobRunner::resume`]
//!    (after a restart, from [`crate::store::Store::recover`]), then drain
//!    [`JobRunner::poll_action`] once: a resumed job may have something to say.
//! 2. For every event, call [`JobRunner::handle`]`(now, input)`, then call
//!    [`JobRunner::poll_action`] until it returns `None`, executing each
//!    action **in order** — in particular, a [`Action::Persist`] must be
//!    durably committed before the actions after it are executed (that is
//!    what makes a crash safe: e.g. `Persist(UpdateAccepted)` comes before
//!    `AckUpdate`, `Persist(RoundCompleted)` before the next round's offers).
//! 3. After draining, (re)arm one timer at [`JobRunner::poll_timeout`]; when
//!    it fires, call `handle(now, Input::Timeout)`. `None` means no timer.
//!    Firing early or late is harmless: deadlines are compared with `now`.
//!
//! `now` must only move forward. The runner remembers the latest `now` it
//! saw and treats an earlier one as equal to it (it never panics on a clock
//! that goes backwards, but deadlines then fire late). Use a monotonic
//! clock (`Instant::now()` in the driver) — never call it in this module.
//!
//! # Round policy
//!
//! - **Start.** Round `r = completed + 1` starts as soon as the job is not
//!   paused and at least `min_sites` connected, compatible sites are known
//!   (the first round a runner starts — at job start or after a restart —
//!   waits `gather` longer so that sites connecting together are all
//!   eligible).
//!   It selects `k = clamp(ceil(fraction × eligible), min_sites, max_sites)`
//!   of them with [`select_sites`] (seeded: a pure function of the job seed,
//!   the round, the attempt and the eligible ids), persists
//!   [`Checkpoint::RoundStarted`] and sends each an offer with the deadline.
//! - **Collect.** A site that accepts is told to fetch the model; its update
//!   is accepted once per round ([`RejectReason::Duplicate`] after that), only
//!   from selected sites, only for the open round and the current model.
//! - **Close.** The round closes when `quorum` updates are accepted and
//!   either every selected site has reported (or declined) or the deadline
//!   has passed. Sites still training get [`Action::CancelTask`]; later
//!   uploads get [`RejectReason::RoundClosed`].
//! - **Deadline without quorum.** If selected sites are still working and
//!   `extension > 0`, the deadline is extended once (per wave). Otherwise a new *wave*
//!   (attempt) offers the round to eligible sites not yet asked, with a new
//!   deadline; updates already accepted are kept (they were trained on the
//!   same model) and sites of earlier waves may still report. After
//!   `max_attempts` waves without quorum the job fails
//!   ([`FailReason::NoQuorum`]). If every selected site has answered before
//!   the deadline and fresh sites are available, the next wave starts at
//!   once.
//! - **Dropouts and reconnects.** A disconnected site stays selected until
//!   the round closes; if it reconnects before it has reported, it gets its
//!   offer again (and must retrain). A stale disconnect (an older connection
//!   of a site that has reconnected) is ignored; a second connection of a
//!   site replaces the first ([`Action::Disconnect`] of the old one).
//! - **Aggregate.** On close the runner emits [`Action::Aggregate`] with the
//!   accepted updates and waits for [`Input::AggregationDone`]; then it
//!   persists [`Checkpoint::RoundCompleted`], asks for an evaluation every
//!   `evaluate_every` rounds, and starts the next round or finishes the job.
//! - **Admin.** `Pause` stops new rounds from starting (a round in flight
//!   runs to completion); `Resume` lifts it; `Abort` cancels the round in
//!   flight and finishes the job as aborted.
//!
//! Updates: the driver verifies signature, envelope and content (the
//! aggregation crate's validator, first pass) and reports the verdict in
//! [`UpdateReceived`]; it may ask [`JobRunner::check_upload`] before
//! receiving the payload at all. It folds an update into the round's
//! accumulator only when the runner answers [`Action::AckUpdate`]: an update
//! the runner rejects (duplicate, late, unknown site) is never counted.

pub mod sim;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use fedlink_protocol::ModelHash;
use serde::{Deserialize, Serialize};

use crate::job::Job;

/// A site identity, as derived by the driver from the site's TLS client
/// certificate: the protocol crate's validated id, re-exported here so the
/// round machine's users name one type.
pub use fedlink_protocol::SiteId;

/// A round number within a job, from 1: the protocol crate's `RoundId`,
/// re-exported here like [`SiteId`]. It serialises as the plain number, so
/// checkpoints and records keep their bytes.
pub use fedlink_protocol::RoundId;

/// The driver's id of one connection of a site. A site that reconnects gets
/// a new id, so a late disconnect of the old connection can be told apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnId(pub u64);

/// What a site told the driver about itself when it connected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteCapabilities {
    /// Whether the site can train this job (architecture, encoding and
    /// protocol version checked by the driver). Incompatible sites are
    /// never selected.
    pub compatible: bool,
    /// Training examples the site announced, if any (informational).
    pub num_examples: Option<u64>,
}

impl SiteCapabilities {
    /// A compatible site that did not announce its example count.
    pub fn compatible() -> Self {
        Self {
            compatible: true,
            num_examples: None,
        }
    }
}

/// Configuration of the round machine, derived from a [`Job`].
#[derive(Clone, Debug, PartialEq)]
pub struct RoundConfig {
    /// Rounds to run.
    pub rounds: u64,
    /// Selection seed.
    pub seed: u64,
    /// Fraction of eligible sites selected per round, in (0, 1].
    pub fraction: f64,
    /// Fewest eligible sites a round starts with (≥ 1).
    pub min_sites: u32,
    /// How long the first round of a runner waits, once `min_sites` are
    /// eligible, for more sites to connect (zero: start at once).
    pub gather: Duration,
    /// Most sites selected per round (≥ 1).
    pub max_sites: u32,
    /// Accepted updates needed to close a round (≥ 1).
    pub quorum: u32,
    /// Time from the offers to the deadline.
    pub deadline: Duration,
    /// One extension of the deadline when quorum is missing (zero: none).
    pub extension: Duration,
    /// Offer waves per round before the job fails (≥ 1).
    pub max_attempts: u32,
    /// Ask for an evaluation every N completed rounds (0: never).
    pub evaluate_every: u32,
    /// If set, only these sites may take part.
    pub allow: Option<BTreeSet<SiteId>>,
}

impl RoundConfig {
    /// The round configuration of a (validated) job.
    pub fn from_job(job: &Job) -> Self {
        Self {
            rounds: u64::from(job.rounds),
            seed: job.seed,
            fraction: job.selection.fraction,
            min_sites: job.min_sites(),
            gather: Duration::from_secs(job.selection.gather_secs),
            max_sites: job.max_sites(),
            quorum: job.round.quorum,
            deadline: job.deadline(),
            extension: Duration::from_secs(job.round.extension_secs),
            max_attempts: job.round.max_attempts,
            evaluate_every: job.evaluation.every_rounds,
            allow: job
                .selection
                .allow
                .as_ref()
                // Job validation checks every entry with the same rule as
                // `SiteId::new`, so none is dropped here.
                .map(|a| {
                    a.iter()
                        .filter_map(|s| SiteId::new(s.as_str()).ok())
                        .collect()
                }),
        }
    }

    /// Make the configuration self-consistent (the job validation already
    /// guarantees this; the runner does not trust it blindly).
    fn sanitized(mut self) -> Self {
        self.rounds = self.rounds.max(1);
        self.quorum = self.quorum.max(1);
        self.max_sites = self.max_sites.max(1);
        self.min_sites = self.min_sites.clamp(1, self.max_sites);
        self.max_attempts = self.max_attempts.max(1);
        if !(self.fraction.is_finite() && self.fraction > 0.0) {
            self.fraction = 1.0;
        }
        self.fraction = self.fraction.min(1.0);
        self
    }

    /// How many of `eligible` sites a round selects:
    /// `clamp(ceil(fraction × eligible), min_sites, max_sites)`, at most
    /// `eligible`.
    pub fn target(&self, eligible: usize) -> usize {
        let want = (self.fraction * eligible as f64).ceil() as usize;
        want.clamp(self.min_sites as usize, self.max_sites as usize)
            .min(eligible)
    }
}

/// Deterministic seeded selection of `k` sites among `eligible`.
///
/// The round seed is derived from (`seed`, `round`, `attempt`); every site
/// gets the score blake3(round seed ‖ site id) and the `k` lowest scores win
/// (a uniformly random subset that does not depend on the order of
/// `eligible` nor on connection order). The result is sorted by site id.
pub fn select_sites(
    seed: u64,
    round: RoundId,
    attempt: u32,
    eligible: &[SiteId],
    k: usize,
) -> Vec<SiteId> {
    let mut h = blake3::Hasher::new_derive_key("fedlink 2025 coordinator round selection v1");
    h.update(&seed.to_le_bytes());
    h.update(&round.0.to_le_bytes());
    h.update(&attempt.to_le_bytes());
    let round_seed = *h.finalize().as_bytes();
    let mut scored: Vec<([u8; 32], &SiteId)> = eligible
        .iter()
        .map(|s| {
            let mut h = blake3::Hasher::new_keyed(&round_seed);
            h.update(s.as_str().as_bytes());
            (*h.finalize().as_bytes(), s)
        })
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    let mut out: Vec<SiteId> = scored.into_iter().take(k).map(|(_, s)| s.clone()).collect();
    out.sort();
    out
}

/// The driver's verdict on an update it received (signature, envelope,
/// shape, norms, finiteness: everything the runner does not look at).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The update passed every check.
    Valid,
    /// The update failed a check; the reason goes back to the site.
    Invalid(String),
}

/// An update that arrived completely at the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateReceived {
    /// Sender (from its certificate).
    pub site: SiteId,
    /// Round the update claims.
    pub round: RoundId,
    /// Model version the update was trained on (from the signed header).
    pub base_model: ModelHash,
    /// blake3 of the payload as received.
    pub payload_hash: ModelHash,
    /// Training examples the site claims.
    pub num_examples: u64,
    /// Payload size in bytes.
    pub bytes: u64,
    /// Wall-clock arrival time, Unix milliseconds (recorded only; the runner
    /// never uses it for decisions).
    pub received_unix_ms: u64,
    /// The driver's verdict.
    pub verdict: Verdict,
}

/// An admin command.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminCommand {
    /// Start no new round until resumed.
    Pause,
    /// Lift a pause.
    Resume,
    /// Cancel the round in flight and end the job.
    Abort,
}

/// Everything that can happen to a job.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A site completed the handshake (mTLS verified by the driver).
    SiteConnected {
        /// The site.
        site: SiteId,
        /// Its new connection.
        conn: ConnId,
        /// What it can do.
        capabilities: SiteCapabilities,
    },
    /// A connection of a site closed.
    SiteDisconnected {
        /// The site.
        site: SiteId,
        /// The connection that closed.
        conn: ConnId,
    },
    /// A site accepted an offer.
    OfferAccepted {
        /// The site.
        site: SiteId,
        /// The offered round.
        round: RoundId,
    },
    /// A site declined an offer.
    OfferDeclined {
        /// The site.
        site: SiteId,
        /// The offered round.
        round: RoundId,
        /// The site's reason (informational).
        reason: String,
    },
    /// An update arrived completely and was checked by the driver.
    UpdateReceived(UpdateReceived),
    /// The driver finished aggregating a round and stored the new model.
    AggregationDone {
        /// The round.
        round: RoundId,
        /// The new global model version (already stored durably).
        model: ModelHash,
        /// Metrics of the aggregation (e.g. update norms).
        metrics: BTreeMap<String, f64>,
    },
    /// Aggregation of a round failed; the job fails.
    AggregationFailed {
        /// The round.
        round: RoundId,
        /// Why.
        reason: String,
    },
    /// The timer armed at [`JobRunner::poll_timeout`] fired.
    Timeout,
    /// An admin command.
    Admin(AdminCommand),
}

/// Metadata of an accepted update (what the store records).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedUpdate {
    /// Sender.
    pub site: SiteId,
    /// Round.
    pub round: RoundId,
    /// blake3 of the payload.
    pub payload_hash: ModelHash,
    /// Claimed training examples.
    pub num_examples: u64,
    /// Payload size in bytes.
    pub bytes: u64,
    /// Arrival, Unix milliseconds.
    pub received_unix_ms: u64,
}

/// Why an update was refused by the runner (the driver's own refusals are
/// [`RejectReason::Invalid`]).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The site already reported in this round.
    Duplicate,
    /// The round is closed (the site was too late).
    RoundClosed,
    /// The round has not started (a future round).
    WrongRound,
    /// The site was not selected for this round, or declined it.
    NotSelected,
    /// The sender never connected to this job.
    UnknownSite,
    /// The update was trained on another model than the round's.
    StaleModel,
    /// The job is finished.
    JobNotRunning,
    /// The driver's checks failed.
    Invalid(String),
}

/// Why a connection is closed by the runner.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The site is not in the job's allow list.
    NotAllowed,
    /// The site connected again; this is the older connection.
    Replaced,
}

/// Why a job failed.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailReason {
    /// No quorum after every offer wave.
    NoQuorum {
        /// Updates accepted.
        accepted: u32,
        /// Updates needed.
        quorum: u32,
        /// Waves run.
        attempts: u32,
    },
    /// The aggregation failed.
    Aggregation(String),
}

/// How a job ended.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobOutcome {
    /// Every round completed; the final model.
    Completed {
        /// Final global model.
        model: ModelHash,
    },
    /// A round failed.
    Failed {
        /// The round.
        round: RoundId,
        /// Why.
        reason: FailReason,
    },
    /// An admin aborted the job.
    Aborted {
        /// Rounds completed before the abort.
        completed_rounds: u64,
    },
}

impl std::fmt::Display for FailReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoQuorum {
                accepted,
                quorum,
                attempts,
            } => write!(
                f,
                "no quorum: {accepted} of {quorum} updates after {attempts} offer wave(s)"
            ),
            Self::Aggregation(why) => write!(f, "aggregation failed: {why}"),
        }
    }
}

impl std::fmt::Display for JobOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Completed { model } => write!(f, "completed: model {model}"),
            Self::Failed { round, reason } => write!(f, "failed in round {round}: {reason}"),
            Self::Aborted { completed_rounds } => {
                write!(f, "aborted after {completed_rounds} completed round(s)")
            }
        }
    }
}

/// A state change the driver must make durable before executing the
/// actions that follow it (see [`crate::store::Store::persist`]).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Checkpoint {
    /// A round started (`attempt == 1`) or a new offer wave of it began.
    RoundStarted {
        /// Round.
        round: RoundId,
        /// Wave, from 1.
        attempt: u32,
        /// Model the round trains on.
        base_model: ModelHash,
        /// Sites offered the round in this wave.
        selected: Vec<SiteId>,
    },
    /// An update was accepted.
    UpdateAccepted(AcceptedUpdate),
    /// A round completed with a new global model.
    RoundCompleted {
        /// Round.
        round: RoundId,
        /// The new global model.
        model: ModelHash,
        /// The updates that went into it.
        updates: Vec<AcceptedUpdate>,
        /// Aggregation metrics.
        metrics: BTreeMap<String, f64>,
    },
    /// The job was paused (`true`) or resumed (`false`).
    Paused(bool),
    /// The job ended.
    JobFinished(JobOutcome),
}

/// An offer of a round to a site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// Round.
    pub round: RoundId,
    /// Wave.
    pub attempt: u32,
    /// Model to train on.
    pub model: ModelHash,
    /// When the update is due.
    pub deadline: Instant,
}

/// What the driver must do. Execute in the order polled.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Commit this checkpoint durably before executing later actions.
    Persist(Checkpoint),
    /// Offer a round to a site.
    SendOffer {
        /// Recipient.
        site: SiteId,
        /// The offer.
        offer: Offer,
    },
    /// The site accepted: let it fetch the model.
    SendModel {
        /// Recipient.
        site: SiteId,
        /// Round.
        round: RoundId,
        /// Model version to send.
        model: ModelHash,
    },
    /// The update counts: fold it into the round's accumulator, then
    /// acknowledge it to the site.
    AckUpdate {
        /// Sender.
        site: SiteId,
        /// Round.
        round: RoundId,
    },
    /// The update does not count: drop it and tell the site why.
    RejectUpdate {
        /// Sender.
        site: SiteId,
        /// Round the update claimed.
        round: RoundId,
        /// Why.
        reason: RejectReason,
    },
    /// Tell a site to stop working on a round (closed or aborted).
    CancelTask {
        /// Recipient.
        site: SiteId,
        /// Round.
        round: RoundId,
    },
    /// Aggregate the round: apply the strategy to `base_model` and the
    /// acknowledged updates, store the new model, then report
    /// [`Input::AggregationDone`] (or [`Input::AggregationFailed`]).
    Aggregate {
        /// Round.
        round: RoundId,
        /// Model the updates were trained on.
        base_model: ModelHash,
        /// The accepted updates (each site at most once).
        updates: Vec<AcceptedUpdate>,
    },
    /// Evaluate this global model (on the job's evaluation split).
    Evaluate {
        /// Round that produced it.
        round: RoundId,
        /// Model.
        model: ModelHash,
    },
    /// Close this connection.
    Disconnect {
        /// Site.
        site: SiteId,
        /// Connection to close.
        conn: ConnId,
        /// Why.
        reason: DisconnectReason,
    },
    /// The job ended (after its `Persist(JobFinished)`).
    JobFinished(JobOutcome),
}

/// The durable state a runner resumes from (see
/// [`crate::store::Store::recover`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Rounds completed.
    pub completed_rounds: u64,
    /// Global model after the last completed round (the initial model if
    /// none).
    pub model: ModelHash,
    /// Whether the job is paused.
    pub paused: bool,
    /// The outcome, if the job has ended.
    pub outcome: Option<JobOutcome>,
}

/// Read-only view of where a job stands.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PhaseView {
    /// Waiting for enough sites (or for a resume) to start `next_round`.
    Waiting {
        /// The round to start.
        next_round: RoundId,
    },
    /// Collecting updates.
    Collecting {
        /// Round.
        round: RoundId,
        /// Wave.
        attempt: u32,
        /// Current deadline.
        deadline: Instant,
        /// Updates accepted so far.
        accepted: u32,
        /// Selected sites that have not answered yet.
        pending: u32,
    },
    /// Waiting for the aggregation result.
    Aggregating {
        /// Round.
        round: RoundId,
    },
    /// The job ended.
    Finished(JobOutcome),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Offered,
    Training,
    Declined,
    Reported,
}

impl Status {
    fn is_pending(self) -> bool {
        matches!(self, Self::Offered | Self::Training)
    }
}

#[derive(Clone, Debug)]
struct Collecting {
    round: RoundId,
    attempt: u32,
    deadline: Instant,
    extended: bool,
    participants: BTreeMap<SiteId, Status>,
    accepted: Vec<AcceptedUpdate>,
}

impl Collecting {
    fn pending(&self) -> usize {
        self.participants
            .values()
            .filter(|s| s.is_pending())
            .count()
    }
}

#[derive(Clone, Debug)]
enum Phase {
    Idle,
    Collecting(Collecting),
    Aggregating {
        round: RoundId,
        updates: Vec<AcceptedUpdate>,
    },
    Finished(JobOutcome),
}

#[derive(Clone, Debug)]
struct SiteEntry {
    conn: Option<ConnId>,
    capabilities: SiteCapabilities,
}

/// The sans-IO core of one job. See the [module docs](self) for the calling
/// convention and the round policy.
#[derive(Debug)]
pub struct JobRunner {
    cfg: RoundConfig,
    model: ModelHash,
    completed: u64,
    paused: bool,
    sites: BTreeMap<SiteId, SiteEntry>,
    phase: Phase,
    actions: VecDeque<Action>,
    now: Option<Instant>,
    /// When the first round starts (gather window), once armed.
    start_at: Option<Instant>,
    /// Whether this runner has started a round yet.
    started_any: bool,
}

impl JobRunner {
    /// A fresh job whose first round trains `initial_model`.
    pub fn new(cfg: RoundConfig, initial_model: ModelHash) -> Self {
        Self::resume(
            cfg,
            Snapshot {
                completed_rounds: 0,
                model: initial_model,
                paused: false,
                outcome: None,
            },
        )
    }

    /// A job resumed from durable state. The round that was in flight (if
    /// any) is started afresh, as round `completed_rounds + 1`, once sites
    /// connect. If every round had completed but the end was not recorded,
    /// the job finishes now (poll the actions).
    pub fn resume(cfg: RoundConfig, snapshot: Snapshot) -> Self {
        let cfg = cfg.sanitized();
        let mut me = Self {
            model: snapshot.model,
            completed: snapshot.completed_rounds,
            paused: snapshot.paused,
            sites: BTreeMap::new(),
            phase: Phase::Idle,
            actions: VecDeque::new(),
            now: None,
            start_at: None,
            started_any: false,
            cfg,
        };
        match snapshot.outcome {
            Some(o) => me.phase = Phase::Finished(o),
            None if me.completed >= me.cfg.rounds => {
                me.finish(JobOutcome::Completed { model: me.model });
            }
            None => {}
        }
        me
    }

    /// The configuration in use.
    pub fn config(&self) -> &RoundConfig {
        &self.cfg
    }

    /// The current global model (the base of the round in flight).
    pub fn current_model(&self) -> ModelHash {
        self.model
    }

    /// Rounds completed.
    pub fn completed_rounds(&self) -> u64 {
        self.completed
    }

    /// Whether new rounds are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Whether the job has ended.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished(_))
    }

    /// Where the job stands.
    pub fn phase(&self) -> PhaseView {
        match &self.phase {
            Phase::Idle => PhaseView::Waiting {
                next_round: RoundId(self.completed + 1),
            },
            Phase::Collecting(c) => PhaseView::Collecting {
                round: c.round,
                attempt: c.attempt,
                deadline: c.deadline,
                accepted: c.accepted.len() as u32,
                pending: c.pending() as u32,
            },
            Phase::Aggregating { round, .. } => PhaseView::Aggregating { round: *round },
            Phase::Finished(o) => PhaseView::Finished(o.clone()),
        }
    }

    /// Sites selected in the round in flight, sorted.
    pub fn selected_sites(&self) -> Vec<SiteId> {
        match &self.phase {
            Phase::Collecting(c) => c.participants.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Sites currently connected, sorted.
    pub fn connected_sites(&self) -> Vec<SiteId> {
        self.sites
            .iter()
            .filter(|(_, e)| e.conn.is_some())
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Next action to execute, in order; `None` when there is nothing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to call `handle(now, Input::Timeout)` next; `None`: no timer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Collecting(c) => Some(c.deadline),
            Phase::Idle => self.start_at,
            _ => None,
        }
    }

    /// Would an upload from `site` for `round` be accepted now (before its
    /// verdict)? The driver may call this before receiving a payload to
    /// refuse duplicates and late uploads cheaply. Pure.
    pub fn check_upload(&self, site: &SiteId, round: RoundId) -> Result<(), RejectReason> {
        if matches!(self.phase, Phase::Finished(_)) {
            return Err(RejectReason::JobNotRunning);
        }
        if !self.sites.contains_key(site) {
            return Err(RejectReason::UnknownSite);
        }
        match &self.phase {
            Phase::Collecting(c) if c.round == round => match c.participants.get(site) {
                Some(s) if s.is_pending() => Ok(()),
                Some(Status::Reported) => Err(RejectReason::Duplicate),
                Some(Status::Declined) | None => Err(RejectReason::NotSelected),
                Some(_) => Err(RejectReason::NotSelected),
            },
            Phase::Collecting(c) if round < c.round => Err(RejectReason::RoundClosed),
            Phase::Aggregating { round: r, .. } if round <= *r => Err(RejectReason::RoundClosed),
            Phase::Idle if round.0 <= self.completed => Err(RejectReason::RoundClosed),
            _ => Err(RejectReason::WrongRound),
        }
    }

    /// Process one input at time `now` (which must not go backwards).
    /// Afterwards drain [`Self::poll_action`] and re-arm
    /// [`Self::poll_timeout`].
    pub fn handle(&mut self, now: Instant, input: Input) {
        let now = match self.now {
            Some(prev) if now < prev => prev,
            _ => now,
        };
        self.now = Some(now);
        // Deadlines that have passed are processed before the input, so an
        // upload arriving after the deadline of a round that reached quorum
        // is late.
        self.check_collecting(now);
        match input {
            Input::SiteConnected {
                site,
                conn,
                capabilities,
            } => self.on_connected(site, conn, capabilities),
            Input::SiteDisconnected { site, conn } => {
                if let Some(e) = self.sites.get_mut(&site)
                    && e.conn == Some(conn)
                {
                    e.conn = None;
                }
            }
            Input::OfferAccepted { site, round } => self.on_offer_accepted(site, round),
            Input::OfferDeclined {
                site,
                round,
                reason,
            } => {
                if let Phase::Collecting(c) = &mut self.phase
                    && c.round == round
                    && let Some(s) = c.participants.get_mut(&site)
                    && s.is_pending()
                {
                    tracing::debug!(%site, round = round.0, %reason, "offer declined");
                    *s = Status::Declined;
                }
            }
            Input::UpdateReceived(u) => self.on_update(u),
            Input::AggregationDone {
                round,
                model,
                metrics,
            } => self.on_aggregated(round, model, metrics),
            Input::AggregationFailed { round, reason } => {
                if matches!(self.phase, Phase::Aggregating { round: r, .. } if r == round) {
                    self.finish(JobOutcome::Failed {
                        round,
                        reason: FailReason::Aggregation(reason),
                    });
                }
            }
            Input::Timeout => {}
            Input::Admin(cmd) => self.on_admin(cmd),
        }
        self.check_collecting(now);
        self.maybe_start_round(now);
    }

    fn on_connected(&mut self, site: SiteId, conn: ConnId, capabilities: SiteCapabilities) {
        if let Some(allow) = &self.cfg.allow
            && !allow.contains(&site)
        {
            self.actions.push_back(Action::Disconnect {
                site,
                conn,
                reason: DisconnectReason::NotAllowed,
            });
            return;
        }
        let entry = self.sites.entry(site.clone()).or_insert_with(|| SiteEntry {
            conn: None,
            capabilities: capabilities.clone(),
        });
        if let Some(old) = entry.conn
            && old != conn
        {
            self.actions.push_back(Action::Disconnect {
                site: site.clone(),
                conn: old,
                reason: DisconnectReason::Replaced,
            });
        }
        entry.conn = Some(conn);
        entry.capabilities = capabilities;
        // A selected site that reconnects before reporting gets its offer
        // again (whatever it was doing died with its connection).
        if let Phase::Collecting(c) = &mut self.phase
            && let Some(s) = c.participants.get_mut(&site)
            && s.is_pending()
        {
            *s = Status::Offered;
            self.actions.push_back(Action::SendOffer {
                site,
                offer: Offer {
                    round: c.round,
                    attempt: c.attempt,
                    model: self.model,
                    deadline: c.deadline,
                },
            });
        }
    }

    fn on_offer_accepted(&mut self, site: SiteId, round: RoundId) {
        let closed = round <= self.completed_or_closing();
        match &mut self.phase {
            Phase::Collecting(c) if c.round == round => {
                if let Some(s) = c.participants.get_mut(&site)
                    && *s == Status::Offered
                {
                    *s = Status::Training;
                    self.actions.push_back(Action::SendModel {
                        site,
                        round,
                        model: self.model,
                    });
                }
            }
            _ if closed => {
                self.actions.push_back(Action::CancelTask { site, round });
            }
            _ => {}
        }
    }

    /// The highest round that is closed (completed, or being aggregated).
    fn completed_or_closing(&self) -> RoundId {
        match &self.phase {
            Phase::Aggregating { round, .. } => *round,
            Phase::Collecting(c) => RoundId(c.round.0 - 1),
            _ => RoundId(self.completed),
        }
    }

    fn on_update(&mut self, u: UpdateReceived) {
        let reject = |reason| Action::RejectUpdate {
            site: u.site.clone(),
            round: u.round,
            reason,
        };
        if let Err(reason) = self.check_upload(&u.site, u.round) {
            self.actions.push_back(reject(reason));
            return;
        }
        if u.base_model != self.model {
            self.actions.push_back(reject(RejectReason::StaleModel));
            return;
        }
        let Phase::Collecting(c) = &mut self.phase else {
            return; // unreachable: check_upload only passes while collecting
        };
        let Some(status) = c.participants.get_mut(&u.site) else {
            return; // unreachable: check_upload found it
        };
        // One report per site per round, valid or not.
        *status = Status::Reported;
        match u.verdict {
            Verdict::Invalid(why) => {
                self.actions.push_back(reject(RejectReason::Invalid(why)));
            }
            Verdict::Valid => {
                let acc = AcceptedUpdate {
                    site: u.site.clone(),
                    round: u.round,
                    payload_hash: u.payload_hash,
                    num_examples: u.num_examples,
                    bytes: u.bytes,
                    received_unix_ms: u.received_unix_ms,
                };
                c.accepted.push(acc.clone());
                self.actions
                    .push_back(Action::Persist(Checkpoint::UpdateAccepted(acc)));
                self.actions.push_back(Action::AckUpdate {
                    site: u.site,
                    round: u.round,
                });
            }
        }
    }

    fn on_aggregated(&mut self, round: RoundId, model: ModelHash, metrics: BTreeMap<String, f64>) {
        if !matches!(self.phase, Phase::Aggregating { round: r, .. } if r == round) {
            tracing::warn!(
                round = round.0,
                "aggregation result for a round not being aggregated: ignored"
            );
            return;
        }
        let Phase::Aggregating { updates, .. } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return;
        };
        self.completed = round.0;
        self.model = model;
        self.actions
            .push_back(Action::Persist(Checkpoint::RoundCompleted {
                round,
                model,
                updates,
                metrics,
            }));
        if crate::core::evaluation::is_due(round.0, self.cfg.evaluate_every, self.cfg.rounds) {
            self.actions.push_back(Action::Evaluate { round, model });
        }
        if round.0 >= self.cfg.rounds {
            self.finish(JobOutcome::Completed { model });
        }
    }

    fn on_admin(&mut self, cmd: AdminCommand) {
        if self.is_finished() {
            return;
        }
        match cmd {
            AdminCommand::Pause if !self.paused => {
                self.paused = true;
                self.actions
                    .push_back(Action::Persist(Checkpoint::Paused(true)));
            }
            AdminCommand::Resume if self.paused => {
                self.paused = false;
                self.actions
                    .push_back(Action::Persist(Checkpoint::Paused(false)));
            }
            AdminCommand::Abort => {
                self.cancel_pending();
                self.finish(JobOutcome::Aborted {
                    completed_rounds: self.completed,
                });
            }
            _ => {}
        }
    }

    fn finish(&mut self, outcome: JobOutcome) {
        self.phase = Phase::Finished(outcome.clone());
        self.actions
            .push_back(Action::Persist(Checkpoint::JobFinished(outcome.clone())));
        self.actions.push_back(Action::JobFinished(outcome));
    }

    /// Connected, compatible sites, sorted.
    fn eligible(&self) -> Vec<SiteId> {
        self.sites
            .iter()
            .filter(|(_, e)| e.conn.is_some() && e.capabilities.compatible)
            .map(|(s, _)| s.clone())
            .collect()
    }

    fn maybe_start_round(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Idle) || self.paused {
            self.start_at = None;
            return;
        }
        let eligible = self.eligible();
        if eligible.len() < self.cfg.min_sites as usize {
            self.start_at = None;
            return;
        }
        if !self.started_any && !self.cfg.gather.is_zero() {
            match self.start_at {
                None => {
                    self.start_at = Some(now + self.cfg.gather);
                    return;
                }
                Some(t) if now < t => return,
                Some(_) => {}
            }
        }
        self.start_at = None;
        self.started_any = true;
        let round = RoundId(self.completed + 1);
        let k = self.cfg.target(eligible.len());
        let chosen = select_sites(self.cfg.seed, round, 1, &eligible, k);
        let deadline = now + self.cfg.deadline;
        self.phase = Phase::Collecting(Collecting {
            round,
            attempt: 1,
            deadline,
            extended: false,
            participants: chosen
                .iter()
                .map(|s| (s.clone(), Status::Offered))
                .collect(),
            accepted: Vec::new(),
        });
        self.offer_wave(round, 1, deadline, chosen);
    }

    fn offer_wave(&mut self, round: RoundId, attempt: u32, deadline: Instant, chosen: Vec<SiteId>) {
        self.actions
            .push_back(Action::Persist(Checkpoint::RoundStarted {
                round,
                attempt,
                base_model: self.model,
                selected: chosen.clone(),
            }));
        for site in chosen {
            self.actions.push_back(Action::SendOffer {
                site,
                offer: Offer {
                    round,
                    attempt,
                    model: self.model,
                    deadline,
                },
            });
        }
    }

    /// Eligible sites not yet part of the round in flight.
    fn fresh(&self, c: &Collecting) -> Vec<SiteId> {
        self.eligible()
            .into_iter()
            .filter(|s| !c.participants.contains_key(s))
            .collect()
    }

    fn check_collecting(&mut self, now: Instant) {
        let Phase::Collecting(c) = &self.phase else {
            return;
        };
        let accepted = c.accepted.len();
        let pending = c.pending();
        let quorum = self.cfg.quorum as usize;
        let passed = now >= c.deadline;
        if accepted >= quorum && (pending == 0 || passed) {
            self.close_round();
            return;
        }
        if !passed {
            if pending == 0 && !self.fresh(c).is_empty() {
                if c.attempt < self.cfg.max_attempts {
                    self.new_wave(now);
                } else {
                    self.fail_no_quorum();
                }
            }
            return;
        }
        // Deadline passed without quorum.
        if !c.extended && !self.cfg.extension.is_zero() && pending > 0 {
            let ext = self.cfg.extension;
            if let Phase::Collecting(c) = &mut self.phase {
                c.deadline += ext;
                c.extended = true;
            }
            return;
        }
        if c.attempt < self.cfg.max_attempts {
            self.new_wave(now);
        } else {
            self.fail_no_quorum();
        }
    }

    fn fail_no_quorum(&mut self) {
        let Phase::Collecting(c) = &self.phase else {
            return;
        };
        let round = c.round;
        let reason = FailReason::NoQuorum {
            accepted: c.accepted.len() as u32,
            quorum: self.cfg.quorum,
            attempts: c.attempt,
        };
        self.cancel_pending();
        self.finish(JobOutcome::Failed { round, reason });
    }

    fn cancel_pending(&mut self) {
        let Phase::Collecting(c) = &self.phase else {
            return;
        };
        let round = c.round;
        let pending: Vec<SiteId> = c
            .participants
            .iter()
            .filter(|(_, s)| s.is_pending())
            .map(|(site, _)| site.clone())
            .collect();
        for site in pending {
            self.actions.push_back(Action::CancelTask { site, round });
        }
    }

    fn new_wave(&mut self, now: Instant) {
        let Phase::Collecting(c) = &self.phase else {
            return;
        };
        let fresh = self.fresh(c);
        let busy = c.accepted.len() + c.pending();
        let total_eligible = self.eligible().len();
        let target = self.cfg.target(total_eligible);
        let need = (self.cfg.quorum as usize).saturating_sub(c.accepted.len());
        let room = (self.cfg.max_sites as usize).saturating_sub(busy);
        let want = target.saturating_sub(busy).max(need).min(room);
        let (round, attempt) = (c.round, c.attempt + 1);
        let chosen = select_sites(self.cfg.seed, round, attempt, &fresh, want);
        let deadline = now + self.cfg.deadline;
        if let Phase::Collecting(c) = &mut self.phase {
            c.attempt = attempt;
            c.deadline = deadline;
            c.extended = false;
            for s in &chosen {
                c.participants.insert(s.clone(), Status::Offered);
            }
        }
        tracing::info!(
            round = round.0,
            attempt,
            added = chosen.len(),
            "new offer wave"
        );
        self.offer_wave(round, attempt, deadline, chosen);
    }

    fn close_round(&mut self) {
        self.cancel_pending();
        let Phase::Collecting(c) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        let round = c.round;
        self.actions.push_back(Action::Aggregate {
            round,
            base_model: self.model,
            updates: c.accepted.clone(),
        });
        self.phase = Phase::Aggregating {
            round,
            updates: c.accepted,
        };
    }
}
