//! The engine: one task that owns the job's round machine, the store, the
//! round's aggregator and the replay guard, and executes the machine's
//! actions in order. Connection tasks talk to it with [`Event`]s.
//!
//! Heavy work stays off the engine where it can: connection tasks receive,
//! hash, spool and validate uploads (pass 1) on their own; the engine only
//! folds an accepted update (pass 2, reading the spool chunk by chunk) and
//! aggregates, both inside `block_in_place`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::clock::unix_ms;

use ed25519_dalek::VerifyingKey;
use fedlink_aggregation::round::{RoundAggregator, ServerState};
use fedlink_aggregation::validate::ValidatedUpdate;
use fedlink_aggregation::{StrategyConfig, Tentative};
use fedlink_protocol::admin::FederatedEvaluation;
use fedlink_protocol::envelope::{PayloadVerifier, SignedEnvelope, UpdateHeader};
use fedlink_protocol::message::{RejectCode, UploadProgress, UploadResult};
use fedlink_protocol::{
    Encoding, EvalMetrics, FederationId, FlatModel, JobId, ModelHash, ReplayGuard, RoundId, SiteId,
};
use tokio::sync::{mpsc, oneshot};

use super::effects;
use super::event::{
    Event, PayloadCheck, ReceivedUpload, UpdateReady, UploadInterrupted, UploadTicket,
};
use super::links::Links;
use super::served_wire::ServedWire;
use super::status::{RoundStatus, StatusWriter};
use crate::config::UpdateRetention;
use crate::core::actions::{self, JobFacts, UnixClock};
use crate::core::intake;
use crate::core::resume::Partials;
use crate::core::round_end::{self, Aggregated, EvaluationFacts, Retention, Step};
use crate::core::scaling::{FederatedScaling, Report};
use crate::core::uploads::{self, Arrival, Cut, Fold, PassOne, Refused, Uploads};
use crate::core::{JobNeeds, evaluation};
use crate::job::Job;
use crate::round::{Input, JobOutcome, JobRunner};
use crate::round_archive::{self, RoundInput};
use crate::store::{Store, wire};

pub(crate) mod admin;
pub(super) mod driver;
mod round_files;

/// Why an engine cannot start on its job.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    /// The job's id is not a valid id.
    #[error("job id: {0}")]
    JobId(#[source] fedlink_protocol::IdError),
    /// The strategy does not survive its JSON round trip (`round.json`).
    #[error("strategy: {0}")]
    Strategy(#[source] serde_json::Error),
    /// The job's evaluations could not be read from the store.
    #[error("reading the job's evaluations: {0}")]
    Evaluations(#[source] crate::store::StoreError),
}

/// Why a round could not be aggregated; the text is the round's failure
/// reason (the round machine records it, `round.discarded` in the audit
/// log).
#[derive(Debug, thiserror::Error)]
enum AggregationFailure {
    /// No round's accumulator is open.
    #[error("no aggregator for round {0}")]
    NoAggregator(RoundId),
    /// The open accumulator is another round's.
    #[error("aggregator is for round {open}, not {round}")]
    WrongRound { open: RoundId, round: RoundId },
    /// The round's base model is no longer the global model.
    #[error("the base model is not the current global model")]
    BaseModelMoved,
    /// The round's replay record (inputs, seed) is missing.
    #[error("no replay record for round {0}")]
    NoReplayRecord(RoundId),
    /// Too few accepted updates are left once sites no longer allowed are
    /// taken out.
    #[error(
        "{left} accepted update(s) left after excluding sites that are no longer allowed; \
         the quorum is {quorum}"
    )]
    BelowQuorum { left: usize, quorum: usize },
    /// Folding the remaining archived updates again failed.
    #[error("folding the round again without excluded sites: {0}")]
    Refold(#[source] round_archive::PayloadError),
    /// The strategy, clipping, noise or server optimizer failed.
    #[error(transparent)]
    Strategy(#[from] fedlink_aggregation::Error),
    /// The aggregate's spec is not the global model's.
    #[error("the aggregate does not have the model's spec")]
    SpecMismatch,
    /// Reading the base model or storing the new one failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The new model's wire form could not be written.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
}

/// Why an acknowledged update could not be folded into the round (pass 2);
/// the site is told "the coordinator could not fold the update: …".
#[derive(Debug, thiserror::Error)]
enum FoldError {
    /// The update reached the fold without pass 1's token (the runner
    /// acknowledged an update that was invalid).
    #[error("update has no validation token")]
    NoToken,
    /// No round's accumulator is open.
    #[error("no aggregator for the round")]
    NoAggregator,
    /// Reading, decoding or folding the spooled payload failed.
    #[error(transparent)]
    Payload(#[from] round_archive::PayloadError),
}

/// The driver's handle on an upload the round machine has not decided on
/// yet (what the core's [`Uploads`] keeps for it).
#[derive(Debug)]
struct Held {
    upload: ReceivedUpload,
    /// Pass 1's token (`None`: invalid, or its site is no longer allowed).
    token: Option<ValidatedUpdate>,
    /// Folded already (one pass), uncounted: the ack counts it, a refusal
    /// takes it out.
    tentative: Option<Tentative>,
    reply: oneshot::Sender<UploadResult>,
}

/// Everything the engine needs at start.
pub(crate) struct EngineParts {
    pub(crate) job: Job,
    pub(crate) runner: JobRunner,
    pub(crate) store: Arc<Store>,
    pub(crate) strategy: StrategyConfig,
    pub(crate) server_state: ServerState,
    /// Feature statistics and scaling as of the last completed round.
    pub(crate) scaling: FederatedScaling,
    pub(crate) global: FlatModel,
    pub(crate) federation: FederationId,
    pub(crate) keys: BTreeMap<SiteId, VerifyingKey>,
    pub(crate) replay: ReplayGuard,
    pub(crate) status: StatusWriter,
    /// How much of the update archive to keep.
    pub(crate) retention: UpdateRetention,
    /// Where new model versions are published in wire form.
    pub(crate) wire: Arc<super::shared::Shared>,
    pub(crate) models_dir: PathBuf,
}

#[derive(Debug)]
struct RoundLog {
    round: RoundId,
    /// blake3 of `state-before.json`, written when the round opened.
    state_before_blake3: String,
    seed: [u8; 32],
    opened_unix_ms: u64,
    inputs: Vec<RoundInput>,
    /// The payload encoding of each input (same order), to fold them again
    /// from the archive if an input has to be taken out.
    encodings: Vec<Encoding>,
}

pub(crate) struct Engine {
    job: Job,
    job_id: JobId,
    runner: JobRunner,
    store: Arc<Store>,
    strategy: StrategyConfig,
    server_state: ServerState,
    scaling: FederatedScaling,
    /// Spec and version of the current global model. The values are not
    /// kept in memory during a round (the accumulator is what grows with
    /// the model): `aggregate` reads the stored model when it needs it.
    global_spec: fedlink_protocol::ModelSpec,
    global_hash: ModelHash,
    aggregator: Option<(RoundId, RoundAggregator)>,
    federation: FederationId,
    keys: BTreeMap<SiteId, VerifyingKey>,
    replay: ReplayGuard,
    /// The connected sites (held across jobs: see [`super::links`]).
    links: Links,
    /// Uploads received whole, waiting for the round machine's decision.
    uploads: Uploads<Held>,
    /// Uploads cut short, kept for their sites to resume.
    partials: Partials<PathBuf>,
    /// The evaluation metrics in the round's accepted updates' headers
    /// (`None`: the header carried none), in acceptance order.
    round_metrics: BTreeMap<RoundId, Vec<(SiteId, Option<EvalMetrics>)>>,
    /// Feature statistics of the round's accepted updates.
    round_stats: BTreeMap<RoundId, Vec<Report>>,
    status: StatusWriter,
    /// Rounds shown in the status file that can no longer change
    /// (completed or discarded), the newest [`round_files::STATUS_ROUNDS`] of them, and
    /// the first round number not among them: each status write reads
    /// only the rounds from there on from the store, not the whole job.
    status_final: std::collections::VecDeque<RoundStatus>,
    status_next: RoundId,
    /// When the status file was last written, and whether it is behind
    /// (an accepted update since): accepted updates rewrite it at most
    /// every [`round_files::STATUS_INTERVAL`]; everything else at once.
    status_written: Option<Instant>,
    status_behind: bool,
    retention: UpdateRetention,
    /// The open round's replay record: the server state before it (the
    /// exact JSON bytes its computation uses), its noise seed, when it
    /// opened, and its inputs in fold order.
    round_log: Option<RoundLog>,
    wire: Arc<super::shared::Shared>,
    models_dir: PathBuf,
    /// Monotonic instant paired with a wall-clock time, to turn deadlines
    /// into the Unix milliseconds sites see.
    clock: UnixClock,
    /// The job, its federation and the coordinator's audit identity, for
    /// the core's decisions ([`actions`]).
    facts: JobFacts,
    outcome: Option<JobOutcome>,
    /// The job's newest federated evaluation (for the status).
    latest_evaluation: Option<FederatedEvaluation>,
    /// The final model's evaluation the sites were asked for, and the
    /// job's outcome, held back until it is done.
    requested: Option<(evaluation::RequestedEvaluation, JobOutcome)>,
    /// The engine's event queue, lent by [`Self::with_inbox`] while an
    /// event or a timeout is handled: a round's end takes the uploads
    /// received whole that wait at its front ([`Self::take_queued_uploads`]).
    inbox: Option<mpsc::Receiver<Event>>,
    /// The event after them, taken from the queue to find where they end:
    /// handled next, as if it had not been taken.
    stashed: Option<Event>,
}

impl Engine {
    pub(crate) fn new(parts: EngineParts, now: Instant) -> Result<Self, StartError> {
        let job_id = JobId::new(&parts.job.id).map_err(StartError::JobId)?;
        // Compute with the strategy exactly as `round.json` records it.
        let (_, strategy) =
            round_archive::json_roundtrip(&parts.strategy).map_err(StartError::Strategy)?;
        // A resumed job: its newest evaluation so far.
        let latest_evaluation = parts
            .store
            .latest_evaluation(job_id.as_str())
            .map_err(StartError::Evaluations)?;
        let facts = JobFacts {
            federation: parts.federation.clone(),
            job: job_id.clone(),
            actor: parts.wire.audit().actor().to_owned(),
        };
        Ok(Self {
            facts,
            latest_evaluation,
            requested: None,
            inbox: None,
            stashed: None,
            job_id,
            runner: parts.runner,
            store: parts.store,
            strategy,
            server_state: parts.server_state,
            scaling: parts.scaling,
            global_hash: parts.global.hash(),
            global_spec: parts.global.into_parts().0,
            aggregator: None,
            federation: parts.federation,
            keys: parts.keys,
            replay: parts.replay,
            links: Links::default(),
            uploads: Uploads::new(),
            partials: Partials::new(),
            round_metrics: BTreeMap::new(),
            round_stats: BTreeMap::new(),
            status: parts.status,
            status_final: std::collections::VecDeque::new(),
            status_next: RoundId(0),
            status_written: None,
            status_behind: false,
            retention: parts.retention,
            round_log: None,
            wire: parts.wire,
            models_dir: parts.models_dir,
            clock: UnixClock::new(now, unix_ms()),
            outcome: None,
            job: parts.job,
        })
    }

    /// How the job ended, once it has.
    pub(crate) fn outcome(&self) -> Option<&JobOutcome> {
        self.outcome.as_ref()
    }

    /// Replace the update keys (manifest reloaded).
    pub(crate) fn set_keys(&mut self, keys: BTreeMap<SiteId, VerifyingKey>) {
        self.keys = keys;
    }

    /// Before round `round`'s end closes the gate of one-pass folds: the
    /// uploads received whole that already wait at the front of the
    /// engine's queue (an upload whose fold finished just as the round
    /// closed) are decided now, through [`Uploads`] like any other — the
    /// round machine refuses them as late, and a one-pass fold is taken
    /// out exactly (one decode of its spool) while the gate is still open.
    /// Without this, such a fold is left uncounted and the round's end
    /// folds every counted update again from the archive
    /// ([`Self::exclude_withdrawn`], still the fallback for folds that
    /// finish while the gate closes). The first other event stops the
    /// sweep; it is kept and handled next ([`Self::with_inbox`]), so no
    /// event overtakes another.
    fn take_queued_uploads(&mut self, now: Instant, round: RoundId) -> Result<(), EngineError> {
        if self.stashed.is_some() {
            return Ok(());
        }
        let Some(inbox) = self.inbox.as_mut() else {
            return Ok(());
        };
        let (ready, next) = take_front(inbox, |e| matches!(e, Event::UpdateReady(_)));
        self.stashed = next;
        let taken = ready.len();
        if taken == 0 {
            return Ok(());
        }
        for event in ready {
            if let Event::UpdateReady(ready) = event {
                self.update_ready(now, *ready)?;
            }
        }
        tracing::info!(
            round = round.0,
            uploads = taken,
            "uploads waiting in the engine's queue decided before the round's end"
        );
        // The round machine's answers to them (the round is closed): each
        // refusal, its one-pass fold taken out, executed now.
        while let Some(action) = self.runner.poll_action() {
            self.execute(now, action)?;
        }
        Ok(())
    }

    /// The connected sites, for the next job to take over (a job switch:
    /// this engine keeps none once it has).
    pub(crate) fn links_mut(&mut self) -> &mut Links {
        &mut self.links
    }

    /// Take over the connected sites at the start of this engine's job
    /// (after an empty start or a job switch alike): each is told to the
    /// round machine, its compatibility decided against the job's
    /// encoding and protocol version, in the order the sites connected.
    pub(crate) fn adopt(&mut self, links: Links, now: Instant) -> Result<(), EngineError> {
        self.links = links;
        for input in self.links.hand_over(&JobNeeds::of(&self.job)) {
            self.runner.handle(now, input);
            self.drain(now)?;
        }
        Ok(())
    }

    fn prepare_upload(
        &mut self,
        site_id: &SiteId,
        envelope: &SignedEnvelope,
    ) -> Result<UploadTicket, (RejectCode, String)> {
        let site = site_id.as_str();
        let h = &envelope.header;
        let (runner, expected, replay) = self.intake();
        let verifier = intake::verify_header(runner, &expected, replay, site_id, envelope)
            .map_err(|r| (r.code, r.reason))?;
        let Some((round, agg)) = self.aggregator.as_ref() else {
            return Err((RejectCode::UnexpectedMessage, "no round is open".into()));
        };
        // The nonce is durable before a payload byte is read: after a
        // restart the same signed envelope is still a replay, whether its
        // first attempt was accepted, refused or cut off.
        let state = serde_json::to_vec(&self.replay)
            .map_err(|e| (RejectCode::Internal, format!("replay state: {e}")))?;
        self.store
            .put_replay_state(self.job_id.as_str(), &state)
            .map_err(|e| {
                (
                    RejectCode::Internal,
                    format!("persisting the replay state: {e}"),
                )
            })?;
        self.check_claim(site, h)?;
        intake::check_header_numbers(h).map_err(|e| (RejectCode::Malformed, e.to_string()))?;
        let spool_dir = self.store.dir().join("spool");
        fedlink_certs::private::create_dir_all(&spool_dir)
            .map_err(|e| (RejectCode::Internal, format!("spool directory: {e}")))?;
        let spool_path = spool_dir.join(format!(
            "{}-r{}-{}.part",
            site,
            round,
            hex::encode(h.nonce.0)
        ));
        Ok(UploadTicket {
            verifier,
            check: PayloadCheck::for_round(agg, site, h.num_examples),
            spec: self.global_spec.clone(),
            spool_path,
            resume_from: None,
        })
    }

    /// A site resumes an upload: the kept partial upload of its (site,
    /// round), the envelope checked again against the job as it is now and
    /// against the partial's. Whatever the answer, the partial is used up:
    /// continued by this upload, or dropped with it.
    fn prepare_resume(
        &mut self,
        site: &SiteId,
        envelope: &SignedEnvelope,
    ) -> Result<UploadTicket, (RejectCode, String)> {
        let h = &envelope.header;
        // The connection's identity, checked against the header below.
        let Some(kept) = self.partials.take(site, h.round) else {
            return Err((
                RejectCode::Replay,
                format!(
                    "upload cannot be resumed: no interrupted upload of site {site} for round {}                      is kept (the round may have closed, or the coordinator restarted);                      sign the update again with a new nonce",
                    h.round.0
                ),
            ));
        };
        let spool_path = kept.spool.clone();
        let records = kept.records;
        let result = self.resume_ticket(site, envelope, kept.verifier, records, spool_path);
        if result.is_err() {
            let _ = std::fs::remove_file(&kept.spool);
        }
        result
    }

    fn resume_ticket(
        &mut self,
        site: &SiteId,
        envelope: &SignedEnvelope,
        partial: PayloadVerifier,
        records: u64,
        spool_path: PathBuf,
    ) -> Result<UploadTicket, (RejectCode, String)> {
        let h = &envelope.header;
        let (runner, expected, replay) = self.intake();
        let verifier = intake::verify_resume(runner, &expected, replay, site, envelope, partial)
            .map_err(|r| (r.code, r.reason))?;
        let Some((_, agg)) = self.aggregator.as_ref() else {
            return Err((RejectCode::UnexpectedMessage, "no round is open".into()));
        };
        self.check_claim(site.as_str(), h)?;
        Ok(UploadTicket {
            resume_from: Some(UploadProgress {
                records,
                bytes: verifier.received(),
            }),
            verifier,
            check: PayloadCheck::for_round(agg, site.as_str(), h.num_examples),
            spec: self.global_spec.clone(),
            spool_path,
        })
    }

    /// What an upload's signed header is checked against in the running
    /// job (for a new upload and a resumed one alike): the round machine,
    /// the job's expectations, and the replay guard (a new upload records
    /// its nonce there).
    fn intake(&mut self) -> (&JobRunner, intake::Expected<'_>, &mut ReplayGuard) {
        let expected = intake::Expected {
            federation: &self.federation,
            job: &self.job_id,
            open_round: self.aggregator.as_ref().map(|(r, _)| *r),
            encoding: self.job.encoding.to_protocol().ok(),
            spec: &self.global_spec,
            keys: &self.keys,
        };
        (&self.runner, expected, &mut self.replay)
    }

    /// The claimed weight is bounded before a payload byte is read: by the
    /// site's declared size and by the job's per-site cap. Rejected, not
    /// clamped: the signature covers the claimed number.
    fn check_claim(&self, site: &str, h: &UpdateHeader) -> Result<(), (RejectCode, String)> {
        let declared = self
            .wire
            .site_max_examples(site)
            .map_err(|e| (RejectCode::Internal, e.to_string()))?;
        intake::check_num_examples(
            site,
            h.num_examples,
            self.strategy.max_num_examples,
            declared,
        )
        .map_err(|e| (RejectCode::NotAuthorized, e.to_string()))
    }

    /// An upload was cut short: keep it for a resume if its site may still
    /// send the rest, and record `update.interrupted` either way.
    fn upload_interrupted(&mut self, it: UploadInterrupted) -> Result<(), EngineError> {
        let UploadInterrupted {
            site,
            envelope,
            verifier,
            records,
            spool_path,
            resumable,
            partial_bytes,
            cause,
        } = it;
        let bytes = verifier.received();
        let open_round = self.aggregator.as_ref().map(|(r, _)| *r);
        // The connection's identity, checked against the header before
        // the first payload byte.
        let site_id = envelope.header.site_id.clone();
        let cut = Cut {
            verifier,
            records,
            spool: spool_path,
            resumable,
            what: actions::Interruption {
                records,
                bytes,
                partial_bytes,
                cause: cause.clone(),
            },
        };
        let outcome = uploads::interrupted(
            &mut self.partials,
            &self.runner,
            open_round,
            &self.facts,
            &site_id,
            &envelope,
            cut,
        );
        for spool in outcome.discard {
            let _ = std::fs::remove_file(spool);
        }
        tracing::info!(
            site = %site,
            records,
            bytes,
            kept_for_resume = outcome.not_kept.is_none(),
            cause = %cause,
            "upload interrupted"
        );
        self.run_effects(outcome.effects, None)
    }

    fn update_ready(&mut self, now: Instant, ready: UpdateReady) -> Result<(), EngineError> {
        let UpdateReady {
            site,
            upload,
            check,
            tentative,
            reply,
        } = ready;
        let arrival = Arrival::of(&upload.envelope, upload.bytes, upload.upload_ms);
        let pass = match &check {
            Ok(_) => PassOne::Valid {
                folded: tentative.as_ref().is_some_and(Tentative::is_folded),
            },
            Err(why) => PassOne::Invalid(why.to_string()),
        };
        // The site may have been revoked (or removed) while its upload was
        // being received and validated: the core refuses its update then,
        // whatever its signature says.
        let allowed = self.wire.site_allowed(site.as_str());
        let token = if allowed.is_ok() { check.ok() } else { None };
        let held = Held {
            upload,
            token,
            tentative,
            reply,
        };
        let arrived = self
            .uploads
            .arrived(&self.facts, arrival, pass, allowed, held, unix_ms());
        if let Some(old) = arrived.superseded {
            // A second upload of the same site and round raced the first:
            // the older is refused; the runner decides about the newer.
            self.refused(old)?;
        }
        self.runner
            .handle(now, Input::UpdateReceived(arrived.input));
        Ok(())
    }

    /// Execute the core's refusal of an upload received whole that the
    /// round machine will not count (refused by it, superseded by a newer
    /// upload, or left undecided): on record, in the round's record, its
    /// one-pass fold taken out, its spool dropped, its site answered.
    fn refused(&mut self, refused: Refused<Held>) -> Result<(), EngineError> {
        let Refused {
            upload, effects, ..
        } = refused;
        self.run_effects(effects, Some(upload))
    }

    /// A site's signed evaluation report: counted or refused, audited
    /// either way (`eval.accepted` / `eval.rejected` with the reason).
    fn eval_report(
        &mut self,
        now: Instant,
        site_id: &SiteId,
        signed: &fedlink_protocol::SignedEvalReport,
    ) -> Result<(), EngineError> {
        let site = site_id.as_str();
        let r = &signed.report;
        let verdict = match self.requested.as_mut() {
            Some((req, _)) => req.handle_report(site, signed, &self.keys),
            None => Err(evaluation::EvalRefusal::NotRequested),
        };
        match &verdict {
            Ok(()) => tracing::info!(site, model = %r.model, "evaluation report accepted"),
            Err(why) => tracing::warn!(site, reason = %why, "evaluation report refused"),
        }
        let effects = actions::eval_reported(&self.facts, site_id, r, verdict.as_ref().map(|_| ()));
        self.run_effects(effects, None)?;
        self.finish_requested(now)
    }

    /// The requested evaluation, once done: recorded on the last round,
    /// audited (`round.evaluated`), then the job ends.
    fn finish_requested(&mut self, now: Instant) -> Result<(), EngineError> {
        if !self.requested.as_ref().is_some_and(|(r, _)| r.is_done(now)) {
            return Ok(());
        }
        let Some((req, outcome)) = self.requested.take() else {
            return Ok(());
        };
        let ev = req.finish();
        tracing::info!(
            model = %ev.model,
            sites = ev.weighted.sites,
            loss = ?ev.weighted.loss,
            accuracy = ?ev.weighted.accuracy,
            auc = ?ev.weighted.auc,
            dice = ?ev.weighted.dice,
            "federated evaluation of the final model"
        );
        let effects = actions::evaluation_finished(
            &self.facts,
            ev,
            outcome,
            &self.links.connected(),
            self.wire.admin.next_queued().is_some(),
        );
        self.run_effects(effects, None)
    }

    fn open_round(&mut self, round: RoundId) -> Result<(), EngineError> {
        if self.aggregator.as_ref().is_some_and(|(r, _)| *r == round) {
            return Ok(());
        }
        let max_sites = self.job.max_sites() as usize;
        // The round computes with the server state parsed back from the
        // bytes `state-before.json` will hold, and with noise from a fresh
        // per-round seed: `fedlink audit replay` recomputes it bit for bit.
        // The file is written now, not when the round completes: its bytes
        // (model-sized for adaptive optimizers) are not held for the round.
        let (state_before, state) =
            round_archive::json_roundtrip(&self.server_state).map_err(|source| {
                EngineError::Serialize {
                    what: "server state",
                    source,
                }
            })?;
        let dir = round_archive::round_dir(self.store.dir(), self.job_id.as_str(), round.0);
        let fatal = |e: RecordError| EngineError::RoundRecord {
            round,
            what: "writing the server state",
            source: e,
        };
        fedlink_certs::private::create_dir_all(&dir).map_err(|e| fatal(e.into()))?;
        round_archive::write_atomic(&dir, round_archive::STATE_BEFORE_FILE, &state_before)
            .map_err(|e| fatal(e.into()))?;
        let state_before_blake3 = blake3::hash(&state_before).to_hex().to_string();
        drop(state_before);
        let mut seed = [0u8; 32];
        rand::RngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut seed)
            .map_err(EngineError::Randomness)?;
        let agg =
            round_archive::open_aggregator(&self.strategy, &self.global_spec, max_sites, &state)
                .map_err(|source| EngineError::OpenRound { round, source })?;
        let effects = actions::round_opened(&self.facts, round, self.global_hash);
        self.run_effects(effects, None)?;
        self.server_state = state;
        let opened_unix_ms = unix_ms();
        self.round_log = Some(RoundLog {
            round,
            state_before_blake3,
            seed,
            opened_unix_ms,
            inputs: Vec::new(),
            encodings: Vec::new(),
        });
        if let Err(e) =
            self.store
                .set_round_times(self.job_id.as_str(), round, Some(opened_unix_ms), None)
        {
            tracing::warn!(round = round.0, error = %e, "recording the round's opening time");
        }
        self.aggregator = Some((round, agg));
        self.round_metrics.remove(&round);
        self.round_stats.remove(&round);
        self.replay
            .prune_before(&self.federation, &self.job_id, round);
        Ok(())
    }

    /// Fold an acknowledged update as the core says ([`Fold`]), archive it
    /// and execute its acceptance; or its refusal if it cannot be folded.
    fn ack(&mut self, acked: uploads::Acked<Held>) -> Result<(), EngineError> {
        let uploads::Acked {
            upload: p,
            arrival,
            fold,
        } = acked;
        let (site, round) = (arrival.site.as_str(), arrival.round.0);
        let folded = match fold {
            Fold::Refuse(why) => Err(why.to_owned()),
            fold => tokio::task::block_in_place(|| self.fold(&p, &fold)).map_err(|e| e.to_string()),
        };
        match folded {
            Ok(()) => {
                let h = &p.upload.envelope.header;
                self.round_metrics
                    .entry(arrival.round)
                    .or_default()
                    .push((arrival.site.clone(), h.metrics.clone()));
                if let Some(stats) = &h.feature_stats {
                    self.round_stats
                        .entry(arrival.round)
                        .or_default()
                        .push(Report {
                            site: arrival.site.clone(),
                            num_examples: h.num_examples,
                            stats: stats.clone(),
                        });
                }
                // The archive is what `fedlink audit replay` recomputes the
                // round from: without it the round is not auditable.
                let (payload_file, envelope_file) =
                    archive(&self.store, &self.job_id, arrival.round, &arrival.site, &p).map_err(
                        |source| EngineError::ArchiveUpdate {
                            site: arrival.site.clone(),
                            round: arrival.round,
                            source,
                        },
                    )?;
                if let Some(log) = self.round_log.as_mut().filter(|l| l.round == arrival.round) {
                    log.inputs.push(RoundInput {
                        site: site.to_owned(),
                        payload_hash: h.payload_hash.to_hex(),
                        num_examples: h.num_examples,
                        payload_file,
                        envelope_file,
                    });
                    log.encodings.push(h.encoding);
                }
                let effects = uploads::accepted(&self.facts, &arrival, unix_ms());
                self.run_effects(effects, Some(p))?;
            }
            Err(why) => {
                // The runner already counted it: this only happens if the
                // spool vanished or the aggregator refused a token. Fail
                // loudly; the round result would be wrong otherwise.
                tracing::error!(site, round, error = %why, "folding an accepted update failed");
                let effects = uploads::fold_failed(&self.facts, &arrival, &why, unix_ms());
                self.run_effects(effects, Some(p))?;
            }
        }
        Ok(())
    }

    /// Take an uncounted one-pass fold out of the round (the rare path:
    /// its spool is decoded again). If that fails it stays uncounted, and
    /// the round's end rebuilds the accumulator from the counted updates.
    fn retract(&mut self, site: &SiteId, p: &mut Held) {
        let Some(t) = p.tentative.take() else {
            return;
        };
        if !t.is_folded() {
            return;
        }
        let encoding = p.upload.envelope.header.encoding;
        let path = &p.upload.spool_path;
        let spec = &self.global_spec;
        let gone = tokio::task::block_in_place(|| {
            round_archive::remove_payload(t.retract(), spec, encoding, path)
        });
        if !gone {
            tracing::warn!(
                site = %site,
                "a refused update's fold could not be taken out; the round will be folded again from its counted updates"
            );
        }
    }

    /// Fold an acknowledged update: count its one-pass fold, or decode its
    /// spool again with pass 1's token (pass 2).
    fn fold(&mut self, p: &Held, fold: &Fold) -> Result<(), FoldError> {
        let token = p.token.as_ref().ok_or(FoldError::NoToken)?;
        let Some((_, agg)) = self.aggregator.as_mut() else {
            return Err(FoldError::NoAggregator);
        };
        if *fold == Fold::Count
            && let Some(t) = p.tentative.as_ref().filter(|t| t.is_folded())
        {
            return agg.count(t).map_err(|e| FoldError::Payload(e.into()));
        }
        Ok(round_archive::fold_payload(
            agg,
            token,
            p.upload.envelope.header.encoding,
            &p.upload.spool_path,
        )?)
    }

    /// Aggregate a round. The outer error is fatal (the audit trail or the
    /// replay archive could not be written); the inner one fails the round.
    #[allow(clippy::type_complexity)]
    fn aggregate(
        &mut self,
        round: RoundId,
        base_model: ModelHash,
    ) -> Result<Result<(ModelHash, BTreeMap<String, f64>), AggregationFailure>, EngineError> {
        let Some((r, agg)) = self.aggregator.take() else {
            return Ok(Err(AggregationFailure::NoAggregator(round)));
        };
        if r != round {
            return Ok(Err(AggregationFailure::WrongRound { open: r, round }));
        }
        if self.global_hash != base_model {
            return Ok(Err(AggregationFailure::BaseModelMoved));
        }
        let Some(mut log) = self.round_log.take().filter(|l| l.round == round) else {
            return Ok(Err(AggregationFailure::NoReplayRecord(round)));
        };
        let agg = match self.exclude_withdrawn(round, agg, &mut log) {
            Ok(Ok(agg)) => agg,
            Ok(Err(why)) => {
                self.round_log = Some(log);
                return Ok(Err(why));
            }
            Err(e) => return Err(e),
        };
        match self.aggregate_inner(round, base_model, agg, &log) {
            Ok(Ok(done)) => Ok(Ok(done)),
            other => {
                // Keep the record: `round.discarded` names the round.
                self.round_log = Some(log);
                other
            }
        }
    }

    /// Take out of the round every accepted update whose site is no longer
    /// allowed, as the core decides ([`actions::exclude_withdrawn`]: each
    /// audited, `update.excluded`; fewer inputs than the quorum fail the
    /// round): each is dropped from the round's inputs, and the round's
    /// accumulator is folded again from the archived payloads of the others
    /// (the accumulator cannot subtract). Its archived files stay in the
    /// round directory as evidence; `round.json` does not list them, so
    /// `fedlink audit replay` recomputes the round without them.
    fn exclude_withdrawn(
        &mut self,
        round: RoundId,
        agg: RoundAggregator,
        log: &mut RoundLog,
    ) -> Result<Result<RoundAggregator, AggregationFailure>, EngineError> {
        let wire = self.wire.clone();
        let exclusion = actions::exclude_withdrawn(
            &self.facts,
            round,
            &log.inputs,
            self.job.round.quorum as usize,
            |site| wire.site_allowed(site).err(),
        );
        // The round's end closes the gate of one-pass folds; any left
        // neither counted nor taken out (an upload folded while the gate
        // closed — those already queued were decided before,
        // `take_queued_uploads` —, a refusal whose spool could not be read
        // again) makes the round fold its counted updates again from the
        // archive.
        let uncounted = tokio::task::block_in_place(|| agg.close_tentative());
        if exclusion.excluded.is_empty() && uncounted == 0 {
            return Ok(Ok(agg));
        }
        if uncounted > 0 {
            tracing::info!(
                round = round.0,
                uncounted,
                "one-pass folds neither counted nor taken out at the round's end: folding the counted updates again"
            );
        }
        drop(agg);
        for (i, why) in &exclusion.excluded {
            let input = log.inputs.remove(*i);
            log.encodings.remove(*i);
            tracing::warn!(site = %input.site, round = round.0, reason = %why, "accepted update excluded from the round");
        }
        self.run_effects(exclusion.effects, None)?;
        if let Some((left, quorum)) = exclusion.below_quorum {
            return Ok(Err(AggregationFailure::BelowQuorum { left, quorum }));
        }
        let dir = round_archive::round_dir(self.store.dir(), self.job_id.as_str(), round.0);
        let inputs: Vec<_> = log
            .inputs
            .iter()
            .zip(&log.encodings)
            .map(|(i, e)| {
                (
                    i.site.clone(),
                    i.num_examples,
                    *e,
                    dir.join(&i.payload_file),
                )
            })
            .collect();
        let max_sites = self.job.max_sites() as usize;
        let rebuilt = tokio::task::block_in_place(|| {
            let mut agg = round_archive::open_aggregator(
                &self.strategy,
                &self.global_spec,
                max_sites,
                &self.server_state,
            )?;
            for (site, num_examples, encoding, path) in &inputs {
                let token =
                    round_archive::validate_payload(&agg, site, *num_examples, *encoding, path)?;
                round_archive::fold_payload(&mut agg, &token, *encoding, path)?;
            }
            Ok::<_, round_archive::PayloadError>(agg)
        });
        Ok(rebuilt.map_err(AggregationFailure::Refold))
    }

    #[allow(clippy::type_complexity)]
    fn aggregate_inner(
        &mut self,
        round: RoundId,
        base_model: ModelHash,
        agg: RoundAggregator,
        log: &RoundLog,
    ) -> Result<Result<(ModelHash, BTreeMap<String, f64>), AggregationFailure>, EngineError> {
        let started = Instant::now();
        let mut state = self.server_state.clone();
        let outcome = match round_archive::finish_round(agg, &mut state, log.seed) {
            Ok(o) => o,
            Err(e) => return Ok(Err(e.into())),
        };
        if *outcome.update.spec() != self.global_spec {
            return Ok(Err(AggregationFailure::SpecMismatch));
        }
        // The accumulator is gone; only now read the base model back (its
        // hash is verified) and apply the update.
        let downlink = self.job.encoding.downlink_encoding();
        let (next, update_wire, loaded) = match downlink {
            // With downlink updates, the published model is the base plus
            // the *decoded* encoded update, which sites compute too (bit for
            // bit); the encoded update is written for them to download.
            Some(encoding) => {
                let mut next = match self.store.load_model(&base_model) {
                    Ok(m) => m,
                    Err(e) => return Ok(Err(e.into())),
                };
                let loaded = Instant::now();
                let written = wire::write_update(
                    &self.models_dir,
                    base_model,
                    &mut next,
                    &outcome.update,
                    encoding,
                    round_archive::downlink_seed(log.seed),
                );
                drop(outcome.update);
                match written {
                    Ok(u) => (next, Some(u), loaded),
                    Err(e) => return Ok(Err(e.into())),
                }
            }
            // Whole models: the base is read into the update itself
            // (`u + x`, the same bits as `x + u`), so the round's end holds
            // one model-sized buffer here, not two.
            None => {
                let mut next = outcome.update;
                if let Err(e) = self.store.add_model_to(&base_model, &mut next) {
                    return Ok(Err(e.into()));
                }
                (next, None, Instant::now())
            }
        };
        let updated = Instant::now();
        let next_hash = match &update_wire {
            Some(u) => u.wire.hash,
            None => next.hash(),
        };
        // What happens now, in which order, is the core's decision.
        let strategy =
            serde_json::to_value(&self.strategy).map_err(|e| EngineError::RoundRecord {
                round,
                what: "strategy",
                source: e.into(),
            })?;
        let end = round_end::plan(
            &self.facts,
            Aggregated {
                round,
                base_model,
                output_model: next_hash,
                strategy,
                dp: self.strategy.dp.as_ref().map(|_| actions::DpApplied {
                    noise_std: outcome.numbers.noise_std,
                    clip_norm: outcome.numbers.clip_norm,
                    privacy: outcome.numbers.privacy,
                }),
                inputs: &log.inputs,
                numbers: outcome.numbers,
            },
            EvaluationFacts {
                every_rounds: self.job.evaluation.every_rounds,
                rounds: u64::from(self.job.rounds),
                reports: self.round_metrics.remove(&round).unwrap_or_default(),
            },
            (
                &self.scaling,
                &self.round_stats.remove(&round).unwrap_or_default(),
            ),
            &Retention {
                keep: self.retention,
                archived: self.archived_rounds(),
            },
        );
        let mut steps = end.steps.into_iter();
        // Whole models: the model's wire form (lossless: what every site
        // downloads) is encoded on a second thread while this one executes
        // the steps before the publish (the model stored, `round.json`, its
        // audit entry); it is published only after them. Downlink updates:
        // sites holding the base fetch the update, and the wire form is made
        // from the stored model when a site first asks for the whole model
        // (`served_wire`), off the round's critical path.
        let models_dir = self.models_dir.clone();
        let (recorded, wire, wire_ms) = std::thread::scope(|s| {
            let wire = downlink.is_none().then(|| {
                s.spawn(|| {
                    let t = Instant::now();
                    (wire::ensure_as(&models_dir, &next, next_hash), t.elapsed())
                })
            });
            let t = Instant::now();
            let mut recorded = Ok(Ok(()));
            for step in steps.by_ref() {
                if matches!(step, Step::Publish { .. }) {
                    break;
                }
                recorded =
                    self.record_step(round, step, (base_model, next_hash, &next), log, downlink);
                if !matches!(recorded, Ok(Ok(()))) {
                    break;
                }
            }
            let record_ms = t.elapsed();
            let (wire, wire_ms) = match wire {
                Some(w) => {
                    let (w, ms) = w
                        .join()
                        .unwrap_or((Err(wire::WireError::Thread), Duration::ZERO));
                    (w.map(ServedWire::made), ms)
                }
                None => (
                    Ok(ServedWire::on_demand(
                        &models_dir,
                        self.store.model_path(&next_hash),
                        next_hash,
                    )),
                    Duration::ZERO,
                ),
            };
            (recorded, wire, (wire_ms, record_ms))
        });
        let (wire_ms, record_ms) = wire_ms;
        let recorded_at = Instant::now();
        if let Err(e) = recorded? {
            return Ok(Err(e));
        }
        let hash = next_hash;
        // Publish the wire form before the round machine hears of the new
        // model: its next offers name it, and sites fetch it at once.
        let wire = match wire {
            Ok(w) => w,
            Err(e) => return Ok(Err(e.into())),
        };
        let (_, unserved) = self.wire.publish_wire(wire);
        if let Some(path) = unserved {
            // Freeing a model's file (and its page cache) takes a while at
            // 10M parameters: off the round's path. Best effort, logged.
            std::thread::spawn(move || wire::remove_model_file(&path));
        }
        let keep = update_wire.as_ref().map(|u| u.wire.path.clone());
        self.wire.publish_update(update_wire);
        wire::prune_updates(&self.models_dir, keep.as_deref());
        drop(next);
        let ms = |d: Duration| d.as_millis() as u64;
        tracing::info!(
            round = round.0,
            model = %hash,
            aggregate_ms = ms(loaded - started),
            update_ms = ms(updated - loaded),
            store_ms = ms(recorded_at - updated),
            wire_ms = ms(wire_ms),
            record_ms = ms(record_ms),
            publish_ms = ms(recorded_at.elapsed()),
            "round's model published"
        );
        self.global_hash = hash;
        let mut state = Some(state);
        for step in steps {
            match step {
                Step::AuditEvaluation {
                    evaluation: ev,
                    effects,
                } => {
                    for x in &ev.excluded {
                        tracing::warn!(round = round.0, site = %x.site, reason = %x.reason, "evaluation report left out");
                    }
                    let w = &ev.weighted;
                    tracing::info!(
                        round = round.0,
                        model = %base_model,
                        sites = w.sites,
                        examples = w.num_eval_examples,
                        loss = ?w.loss,
                        accuracy = ?w.accuracy,
                        auc = ?w.auc,
                        dice = ?w.dice,
                        "federated evaluation"
                    );
                    // Audited with what counted and what was left out (and why).
                    self.run_effects(effects, None)?;
                }
                Step::RecordEvaluation {
                    round: on,
                    evaluation,
                } => {
                    self.latest_evaluation = Some(evaluation.clone());
                    if let Err(e) =
                        self.store
                            .record_evaluation(self.job_id.as_str(), on, evaluation)
                    {
                        tracing::warn!(round = round.0, error = %e, "recording the federated evaluation");
                    }
                }
                Step::NextState { scaling } => {
                    if scaling.scaling() != self.scaling.scaling()
                        && let Some(s) = scaling.scaling()
                    {
                        tracing::info!(
                            round = round.0,
                            features = s.features.len(),
                            sites = scaling.sites().count(),
                            "federated feature scaling updated"
                        );
                    }
                    self.scaling = scaling;
                    if let Some(state) = state.take() {
                        self.server_state = state;
                    }
                }
                Step::Prune { rounds } => self.prune_archive(&rounds),
                other => tracing::error!(?other, "not a step after the publish; ignored"),
            }
        }
        Ok(Ok((hash, end.metrics)))
    }
}

/// Archive an accepted update; returns the payload and envelope file names.
fn archive(
    store: &Store,
    job: &JobId,
    round: RoundId,
    site: &SiteId,
    p: &Held,
) -> std::io::Result<(String, String)> {
    let dir = round_archive::round_dir(store.dir(), job.as_str(), round.0);
    fedlink_certs::private::create_dir_all(&dir)?;
    // The nonce makes every upload's name unique: a site re-sending the
    // same bytes after a crash keeps both signed envelopes.
    let base = format!(
        "{site}-{}-{}",
        p.upload.envelope.header.payload_hash.to_hex(),
        hex::encode(p.upload.envelope.header.nonce.0)
    );
    let envelope = serde_json::to_vec_pretty(&p.upload.envelope).map_err(std::io::Error::other)?;
    // The archive must let `fedlink audit replay` re-check the signature:
    // the JSON has to give back exactly the signed bytes (floats included).
    let back: SignedEnvelope = serde_json::from_slice(&envelope).map_err(std::io::Error::other)?;
    if back.header.signed_bytes() != p.upload.envelope.header.signed_bytes()
        || back.signature != p.upload.envelope.signature
    {
        return Err(std::io::Error::other(
            "the archived envelope does not reproduce the signed bytes",
        ));
    }
    let envelope_file = format!("{base}.envelope.json");
    let payload_file = format!("{base}.payload");
    // The envelope whole (temporary file, fsync, rename); the spooled
    // payload (fsynced when it was spooled) moved into place. The directory
    // fsyncs are one group commit per round (`aggregate_inner`, before
    // `round.json` names these files): until the round completes, a crash
    // re-opens it and discards its accepted updates anyway.
    fedlink_durable::replace_defer_dir_sync(
        &dir.join(&envelope_file),
        &envelope,
        fedlink_durable::Mode::Private,
    )?;
    fedlink_durable::install_defer_dir_sync(&p.upload.spool_path, &dir.join(&payload_file))?;
    Ok((payload_file, envelope_file))
}

/// The events at the front of `inbox` that `wanted` selects, in order, up
/// to the first other event, which is returned too (taken from the queue:
/// the caller handles it next); what follows it stays queued.
fn take_front<T>(
    inbox: &mut mpsc::Receiver<T>,
    wanted: impl Fn(&T) -> bool,
) -> (Vec<T>, Option<T>) {
    let mut taken = Vec::new();
    while let Ok(event) = inbox.try_recv() {
        if !wanted(&event) {
            return (taken, Some(event));
        }
        taken.push(event);
    }
    (taken, None)
}

/// A fatal engine error: the coordinator stops (and recovers on restart).
#[derive(Debug, thiserror::Error)]
pub(crate) enum EngineError {
    /// State the engine persists (the server optimizer's, the replay
    /// guard's) could not be serialized.
    #[error("{what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A round's replay record (its archive directory, `state-before.json`,
    /// `round.json`) could not be written: the round would not be
    /// auditable, so it does not go on.
    #[error("round {round}: {what}: {source}")]
    RoundRecord {
        round: RoundId,
        what: &'static str,
        #[source]
        source: RecordError,
    },
    /// An accepted update could not be archived (`fedlink audit replay`
    /// recomputes the round from the archive).
    #[error("archiving the accepted update of {site} in round {round}: {source}")]
    ArchiveUpdate {
        site: SiteId,
        round: RoundId,
        #[source]
        source: std::io::Error,
    },
    /// The operating system gave no randomness for a round's noise seed.
    #[error("no randomness for the round's noise seed: {0}")]
    Randomness(#[source] rand::Error),
    /// The round's aggregator could not be opened with the job's strategy.
    #[error("cannot open round {round}: {source}")]
    OpenRound {
        round: RoundId,
        #[source]
        source: fedlink_aggregation::AggregationError,
    },
    /// The job's task offer cannot be built.
    #[error(transparent)]
    OfferTerms(#[from] actions::TermsError),
    /// An audit entry could not be written (`during`: what it recorded).
    #[error("{source} (while recording {during})")]
    Audit {
        during: String,
        #[source]
        source: super::audit::AuditError,
    },
    /// A checkpoint could not be persisted in the store.
    #[error("persisting a checkpoint: {0}")]
    Checkpoint(#[source] crate::store::StoreError),
}

impl From<effects::Unexecuted> for EngineError {
    fn from(e: effects::Unexecuted) -> Self {
        match e {
            effects::Unexecuted::Audit { during, source } => Self::Audit { during, source },
            effects::Unexecuted::Persist { source, .. } => Self::Checkpoint(source),
        }
    }
}

/// The failure under [`EngineError::RoundRecord`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Archive(#[from] round_archive::ArchiveError),
    #[error(transparent)]
    Durable(#[from] fedlink_durable::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::actions::offer_privacy;
    use fedlink_protocol::message::{CentralDp, PrivacyRequirements};

    fn job(extra: &str) -> Job {
        let text = format!(
            "id = \"j1\"\nrounds = 3\narch = {{ kind = \"logreg\", inputs = 4, classes = 2 }}\n\
             init = {{ seed = 1 }}\n[round]\ndeadline_secs = 60\n{extra}"
        );
        match Job::from_toml(&text) {
            Ok(j) => j,
            Err(e) => panic!("{e}"),
        }
    }

    fn privacy_of(job: &Job) -> PrivacyRequirements {
        let strategy = match crate::core::jobs::strategy_config(job) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        offer_privacy(&strategy, &job.privacy)
    }

    /// The engine's fatal errors name the round and the step, and keep
    /// their cause as the error's source (for the log's chain).
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_round_end_takes_only_the_uploads_at_the_queues_front() {
        // 1, 3: uploads received whole; 2: any other event. The sweep takes
        // the uploads ahead of the first other event and that event (to be
        // handled next); nothing behind it overtakes it.
        let (tx, mut rx) = mpsc::channel(8);
        for e in [1, 3, 2, 3, 1] {
            tx.try_send(e).unwrap();
        }
        let upload = |e: &i32| e % 2 == 1;
        assert_eq!(take_front(&mut rx, upload), (vec![1, 3], Some(2)));
        assert_eq!(take_front(&mut rx, upload), (vec![3, 1], None));
        assert_eq!(take_front(&mut rx, upload), (vec![], None));
        tx.try_send(2).unwrap();
        assert_eq!(take_front(&mut rx, upload), (vec![], Some(2)));
        drop(tx);
        assert_eq!(take_front(&mut rx, upload), (vec![], None));
    }

    #[test]
    fn fatal_errors_name_round_step_and_cause() {
        use std::error::Error as _;
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full");
        let e = EngineError::RoundRecord {
            round: RoundId(3),
            what: "writing round.json",
            source: io.into(),
        };
        assert_eq!(e.to_string(), "round 3: writing round.json: disk full");
        assert!(e.source().is_some());
        let e = EngineError::ArchiveUpdate {
            site: SiteId::new("st-mary").expect("a site id"),
            round: RoundId(2),
            source: std::io::Error::other("no space"),
        };
        assert_eq!(
            e.to_string(),
            "archiving the accepted update of st-mary in round 2: no space"
        );
    }

    /// A job with central DP says so in its offers: the clip norm, the
    /// noise multiplier and δ, added by the coordinator (`central_dp`), not
    /// asked of the sites (`dp`). Before, `central_dp` did not exist and the
    /// offer said `dp: None` only, so a `require_dp` site declined it.
    #[test]
    fn dp_job_offers_say_central_dp() {
        let j = job("[strategy]\nname = \"fedavg\"\n\
             [privacy]\nclip_norm = 2.0\nnoise_multiplier = 1.3\ntarget_delta = 1e-5");
        let p = privacy_of(&j);
        assert_eq!(p.clip_norm, Some(2.0));
        assert_eq!(p.dp, None, "the noise is added once, centrally");
        assert_eq!(
            p.central_dp,
            Some(CentralDp {
                noise_multiplier: 1.3,
                target_delta: Some(1e-5),
            })
        );
    }

    #[test]
    fn offers_follow_the_strategy_parameters() {
        // `[strategy.params]` override `[privacy]`: the offer tells what the
        // aggregator applies.
        let j = job(
            "[strategy]\nname = \"fedavg\"\n[strategy.params]\nclip_norm = 0.5\n\
             noise_multiplier = 0.8\nnum_sampled_sites = 1\n[privacy]\nclip_norm = 2.0\nnoise_multiplier = 1.3",
        );
        let p = privacy_of(&j);
        assert_eq!(p.clip_norm, Some(0.5));
        assert_eq!(p.central_dp.map(|d| d.noise_multiplier), Some(0.8));
    }

    #[test]
    fn clip_only_and_plain_jobs_offer_no_dp() {
        let p = privacy_of(&job(
            "[strategy]\nname = \"fedavg\"\n[privacy]\nclip_norm = 1.0",
        ));
        assert_eq!(p.clip_norm, Some(1.0));
        assert_eq!((p.dp, p.central_dp), (None, None));
        let p = privacy_of(&job("[strategy]\nname = \"fedavg\""));
        assert_eq!(p, PrivacyRequirements::default());
    }

    fn max_num_examples(extra: &str) -> u64 {
        match crate::core::jobs::strategy_config(&job(extra)) {
            Ok(s) => s.max_num_examples,
            Err(e) => panic!("{e}"),
        }
    }

    /// The job's per-site cap reaches the aggregator: by default a million,
    /// not the aggregation crate's 2^30.
    #[test]
    fn the_job_cap_on_examples_is_the_strategys_limit() {
        use crate::job::DEFAULT_MAX_EXAMPLES_PER_SITE;
        assert_eq!(
            max_num_examples("[strategy]\nname = \"fedavg\""),
            DEFAULT_MAX_EXAMPLES_PER_SITE
        );
        assert_eq!(
            max_num_examples("[strategy]\nname = \"fedavg\"\nmax_examples_per_site = 500"),
            500
        );
        assert_eq!(
            max_num_examples(
                "[strategy]\nname = \"fedavg\"\n[strategy.params]\nmax_num_examples = 70"
            ),
            70
        );
        assert_eq!(
            max_num_examples(
                "[strategy]\nname = \"fedtrimmedavg\"\nmax_examples_per_site = 9\n\
                 [strategy.params]\nbeta = 0.1\nmax_num_examples = 9"
            ),
            9
        );
    }
}
