//! What the driver does for the round machine's actions, decided without
//! sockets, files or the clock: which audit events are appended (with
//! which details and which actor), which messages go to which sites, which
//! round records are written and in what order — as [`Effect`]s the driver
//! executes in order, stopping at the first audit append that fails.
//!
//! | action | effects |
//! |---|---|
//! | `Persist` | [`checkpoint_plan`]: what the checkpoint's transaction carries (optimizer state, replay state) and what follows it (a round opened: [`round_opened`], `round.opened`) |
//! | `SendOffer` | [`send_offers`] (a round's offers, in a row): every `offer.sent` in one group commit, then the offers |
//! | `CancelTask` | [`cancel_task`]: the `Cancel` |
//! | `Disconnect` | [`close_reason`] of the close the site table emits |
//! | `AckUpdate` | after the driver's fold and archive, [`accept_upload`]: `update.received` (accepted), the round's record, the acknowledgement; [`fold_failed`] if the fold failed |
//! | `Aggregate` | after the driver's aggregation, [`round_end::plan`](super::round_end::plan)'s steps; among them, after `round.json`, [`round_aggregated`]: `round.aggregated`, the new model's hash and the audit head to the sites whose updates made it |
//! | `RejectUpdate` | [`reject_pending`]: `update.received` (refused), the round's record, the spool dropped, the site answered |
//! | (before `Aggregate`'s aggregation) | [`exclude_withdrawn`]: the accepted updates of sites no longer allowed taken out, each `update.excluded`; too few left fail the round |
//! | (not the round machine's) | [`upload_interrupted`]: `update.interrupted`; [`offer_declined`]: `offer.declined`; [`eval_reported`]: `eval.accepted` / `eval.rejected` ([`eval_rejected`], also while no job runs: [`idle`](super::idle)) |
//! | `JobFinished` | [`job_finished`]: `round.discarded` (a round open), `job.finished`, the final model's hash, the audit head, then the final evaluation asked for ([`evaluation_finished`] once answered) or the end of the job ([`job_over`]) |
//!
//! The rest of the driver's work stays there: folding and aggregating
//! (the numbers), the round archive's files, checkpoints with their
//! replay and optimizer state, and the status file.
//!
//! The pending upload an effect is about ([`Effect::DiscardSpool`],
//! [`Effect::AnswerUpload`]) is the driver's: it holds the spool file and
//! the connection's reply channel.
//!
//! Each function is given the facts its decision needs ([`JobFacts`], an
//! upload's [`UploadFacts`], the connected sites) and the time as an
//! argument; nothing here reads the clock.

use std::time::Instant;

use fedlink_aggregation::{Clipping, StrategyConfig};
use fedlink_audit::CoordEvent;
use fedlink_audit::coord;
use fedlink_protocol::admin::FederatedEvaluation;
use fedlink_protocol::arch::ArchSpec;
use fedlink_protocol::envelope::SignedEnvelope;
use fedlink_protocol::evaluation::{EvalReport, EvalRequest, ExpectedEval};
use fedlink_protocol::message::{
    Bye, Cancel, CentralDp, PrivacyRequirements, RejectCode, RoundOutcome, TaskOffer,
    TrainingConfig, UploadResult,
};
use fedlink_protocol::{
    EvalMetrics, FeatureScaling, FederationId, JobId, Message, ModelHash, PayloadHash, RoundId,
    SiteId,
};

use super::evaluation::{self, RequestedEvaluation};
use super::registry::NotAllowed;
use super::{CloseReason, Effect};
use crate::job::Job;
use crate::round::{Action, Checkpoint, DisconnectReason, JobOutcome, JobRunner, Offer};
use crate::round_archive::RoundInput;
use crate::store::{RejectedUpdate, UpdateDetail};

/// Who and what the running job is, for the audit events and messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobFacts {
    /// The federation.
    pub federation: FederationId,
    /// The running job.
    pub job: JobId,
    /// The coordinator's own audit identity (the actor of its events).
    pub actor: String,
}

impl JobFacts {
    /// An event of the coordinator's own.
    fn own(&self, event: CoordEvent) -> Effect {
        Effect::AppendAudit {
            actor: self.actor.clone(),
            event,
        }
    }

    /// The audit identity of `site`.
    pub fn site_actor(&self, site: &str) -> String {
        fedlink_audit::event::site_actor(self.federation.as_str(), site)
    }
}

/// A monotonic instant paired with the wall-clock time it was read at:
/// turns deadlines into the Unix milliseconds sites see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixClock {
    base: Instant,
    base_unix_ms: u64,
}

impl UnixClock {
    /// `base` was `base_unix_ms` on the wall clock.
    pub fn new(base: Instant, base_unix_ms: u64) -> Self {
        Self { base, base_unix_ms }
    }

    /// `at` in Unix milliseconds.
    pub fn unix_ms(&self, at: Instant) -> u64 {
        if at >= self.base {
            self.base_unix_ms
                .saturating_add(at.duration_since(self.base).as_millis() as u64)
        } else {
            self.base_unix_ms
                .saturating_sub(self.base.duration_since(at).as_millis() as u64)
        }
    }
}

/// The terms every offer of a job carries (all but the round, its model,
/// its training seed and its deadline).
#[derive(Clone, Debug, PartialEq)]
pub struct OfferTerms {
    /// An offer with the job's terms; round, model, seed and deadline are
    /// set per offer.
    template: TaskOffer,
    /// The job's seed (each round's training seed is derived from it).
    job_seed: u64,
}

/// Why a job's offer terms cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("job encoding: {0}")]
pub struct TermsError(String);

impl OfferTerms {
    /// The terms of `job`'s offers: its training, encoding and privacy
    /// as the aggregator (`strategy`) applies them, and the federated
    /// feature `scaling` as of the last completed round.
    pub fn of(
        job: &Job,
        facts: &JobFacts,
        strategy: &StrategyConfig,
        scaling: Option<FeatureScaling>,
    ) -> Result<Self, TermsError> {
        let t = &job.training;
        let encoding = job
            .encoding
            .to_protocol()
            .map_err(|e| TermsError(e.to_string()))?;
        let template = TaskOffer {
            federation_id: facts.federation.clone(),
            job_id: facts.job.clone(),
            round: RoundId(0),
            base_model: ModelHash([0; 32]),
            arch: job.arch.clone(),
            training: TrainingConfig {
                epochs: t.epochs,
                batch_size: t.batch_size,
                optimizer: t.optimizer_to_protocol(),
                learning_rate: t.learning_rate,
                fedprox_mu: t.fedprox_mu,
                seed: job.seed,
                augmentation: t.augmentation.map(|a| a.to_protocol()),
                class_weight: t.class_weight.to_protocol(),
            },
            encoding,
            privacy: offer_privacy(strategy, &job.privacy),
            deadline_unix_ms: 0,
            scaling,
        };
        Ok(Self {
            template,
            job_seed: job.seed,
        })
    }

    /// The offer of `offer`'s round, due at `deadline_unix_ms`.
    pub fn offer(&self, offer: &Offer, deadline_unix_ms: u64) -> TaskOffer {
        let mut o = self.template.clone();
        o.round = offer.round;
        o.base_model = offer.model;
        o.training.seed = round_seed(self.job_seed, offer.round);
        o.deadline_unix_ms = deadline_unix_ms;
        o
    }
}

/// The training seed of `round`: the job's seed mixed with the round, so
/// that every round trains with its own seed.
pub fn round_seed(job_seed: u64, round: RoundId) -> u64 {
    job_seed ^ round.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The privacy terms of an offer, as the aggregator applies them: sites clip
/// to the strategy's fixed clip norm (else the job's `privacy.clip_norm`),
/// and the strategy's central DP noise is announced as `central_dp` — added
/// once by the coordinator, never asked of the sites as well (`dp`, which
/// would add the noise twice). Without a clip norm in the offer the sites
/// are not told of central DP (it would not validate: the norm is its
/// sensitivity); the strategy only enables noise with one.
pub fn offer_privacy(strategy: &StrategyConfig, job: &crate::job::Privacy) -> PrivacyRequirements {
    let clip_norm = match strategy.clipping {
        Some(Clipping::Fixed { clip_norm }) => Some(clip_norm),
        _ => job.clip_norm,
    };
    let central_dp = strategy
        .dp
        .as_ref()
        .filter(|dp| dp.noise_multiplier > 0.0 && clip_norm.is_some())
        .map(|dp| CentralDp {
            noise_multiplier: dp.noise_multiplier,
            target_delta: job.target_delta,
        });
    PrivacyRequirements {
        clip_norm,
        dp: None,
        central_dp,
    }
}

/// What committing one of the round machine's checkpoints (`Persist`)
/// takes besides the checkpoint — in the same store transaction — and
/// what follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointPlan {
    /// Commit the server optimizer state and the feature scaling with it
    /// (a round completed: the next rounds start from them).
    pub optimizer_state: bool,
    /// Commit the replay guard with it, once the accepted update of this
    /// (site, round) is committed in the guard: the round is used up for
    /// the site, durably with the acceptance itself.
    pub commit_replay: Option<(SiteId, RoundId)>,
    /// The round to open once it is committed (its accumulator, its server
    /// state before, its noise seed, `round.opened`).
    pub opens_round: Option<RoundId>,
    /// The status file may wait (an accepted update: it is rewritten at
    /// most every so often) rather than be written at once.
    pub status_may_wait: bool,
}

/// The plan of committing `checkpoint` (see [`CheckpointPlan`]).
pub fn checkpoint_plan(checkpoint: &Checkpoint) -> CheckpointPlan {
    CheckpointPlan {
        optimizer_state: matches!(checkpoint, Checkpoint::RoundCompleted { .. }),
        commit_replay: match checkpoint {
            Checkpoint::UpdateAccepted(acc) => Some((acc.site.clone(), acc.round)),
            _ => None,
        },
        opens_round: match checkpoint {
            Checkpoint::RoundStarted { round, .. } => Some(*round),
            _ => None,
        },
        status_may_wait: matches!(checkpoint, Checkpoint::UpdateAccepted(_)),
    }
}

/// A round opened on `base_model` (the `RoundStarted` checkpoint
/// committed; the driver has written the server state before it,
/// `state-before.json`, drawn its noise seed and opened its accumulator):
/// on record (`round.opened`) before anything of the round happens — its
/// offers follow.
pub fn round_opened(facts: &JobFacts, round: RoundId, base_model: ModelHash) -> Vec<Effect> {
    vec![facts.own(CoordEvent::RoundOpened(coord::RoundOpened {
        job: facts.job.as_str().to_owned(),
        round: round.0,
        base_model: base_model.to_hex(),
    }))]
}

/// A round's offers come in a row: `first`, and every `SendOffer` the
/// round machine queued right after it — one decision for the driver
/// ([`send_offers`]). Returns them and the action that ended the row
/// (polled, not executed yet), if any.
pub fn offers_in_a_row(
    runner: &mut JobRunner,
    first: (SiteId, Offer),
) -> (Vec<(SiteId, Offer)>, Option<Action>) {
    let mut offers = vec![first];
    loop {
        match runner.poll_action() {
            Some(Action::SendOffer { site, offer }) => offers.push((site, offer)),
            other => return (offers, other),
        }
    }
}

/// `SendOffer`: `offer.sent` on record, then the offer to `site` (its
/// deadline in the sites' Unix milliseconds by `clock`). One offer of
/// [`send_offers`].
pub fn send_offer(
    facts: &JobFacts,
    terms: &OfferTerms,
    clock: &UnixClock,
    site: &SiteId,
    offer: &Offer,
) -> Vec<Effect> {
    send_offers(facts, terms, clock, &[(site.clone(), offer.clone())])
}

/// A round's offers (the round machine emits its `SendOffer`s in a row):
/// every offer's `offer.sent` on record, in one group commit (one fsync:
/// [`Effect::AppendAuditBatch`]; a single offer's is a plain
/// [`Effect::AppendAudit`]), then the offers, in the same order, each
/// with its deadline in the sites' Unix milliseconds by `clock`. No offer
/// leaves before every entry is on record.
pub fn send_offers(
    facts: &JobFacts,
    terms: &OfferTerms,
    clock: &UnixClock,
    offers: &[(SiteId, Offer)],
) -> Vec<Effect> {
    let mut entries: Vec<CoordEvent> = offers
        .iter()
        .map(|(site, offer)| {
            CoordEvent::OfferSent(coord::OfferSent {
                job: facts.job.as_str().to_owned(),
                round: offer.round.0,
                site: site.as_str().to_owned(),
                base_model: offer.model.to_hex(),
            })
        })
        .collect();
    let mut effects = Vec::with_capacity(offers.len() + 1);
    match entries.len() {
        0 => {}
        1 => {
            if let Some(event) = entries.pop() {
                effects.push(facts.own(event));
            }
        }
        _ => effects.push(Effect::AppendAuditBatch {
            actor: facts.actor.clone(),
            entries,
        }),
    }
    effects.extend(offers.iter().map(|(site, offer)| {
        let message = terms.offer(offer, clock.unix_ms(offer.deadline));
        Effect::Send {
            site: site.clone(),
            message: Message::TaskOfferV6(Box::new(message)),
        }
    }));
    effects
}

/// `CancelTask`: tell `site` to stop working on `round` (it closed).
pub fn cancel_task(facts: &JobFacts, site: &SiteId, round: RoundId) -> Vec<Effect> {
    vec![Effect::Send {
        site: site.clone(),
        message: Message::Cancel(Cancel {
            job_id: facts.job.clone(),
            round,
            reason: "the round closed".into(),
        }),
    }]
}

/// `Disconnect`: why the connection is closed (the site table closes it
/// only if it is still the site's current one).
pub fn close_reason(reason: &DisconnectReason) -> CloseReason {
    match reason {
        DisconnectReason::NotAllowed => CloseReason::NotAllowed,
        DisconnectReason::Replaced => CloseReason::Replaced,
    }
}

/// What the audit log and the round's record say of one upload: the
/// facts of its signed header, and the payload bytes received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadFacts {
    /// The job its header names.
    pub job: String,
    /// The round its header names.
    pub round: RoundId,
    /// The site its header names.
    pub site: String,
    /// blake3 of its payload (hex).
    pub payload_hash: String,
    /// Payload bytes received (the declared length when it was refused
    /// before its payload).
    pub bytes: u64,
    /// The weight it claims.
    pub num_examples: u64,
    /// Its nonce (hex).
    pub nonce: String,
    /// Its envelope's signature (hex).
    pub envelope_sig: String,
}

impl UploadFacts {
    /// The facts of `envelope`, `bytes` received.
    pub fn of(envelope: &SignedEnvelope, bytes: u64) -> Self {
        let h = &envelope.header;
        Self {
            job: h.job_id.as_str().to_owned(),
            round: h.round,
            site: h.site_id.as_str().to_owned(),
            payload_hash: h.payload_hash.to_hex(),
            bytes,
            num_examples: h.num_examples,
            nonce: hex::encode(h.nonce.0),
            envelope_sig: hex::encode(envelope.signature.to_bytes()),
        }
    }

    /// Its `update.received` entry (`reason` None: accepted).
    pub fn details(&self, reason: Option<&str>) -> CoordEvent {
        CoordEvent::UpdateReceived(coord::UpdateReceived {
            job: self.job.clone(),
            round: self.round.0,
            site: self.site.clone(),
            payload_hash: self.payload_hash.clone(),
            payload_bytes: self.bytes,
            num_examples: self.num_examples,
            nonce: self.nonce.clone(),
            envelope_sig: self.envelope_sig.clone(),
            accepted: reason.is_none(),
            reason: reason.map(str::to_owned),
        })
    }
}

/// An `update.received` audit entry (`reason` None: accepted). `bytes`:
/// payload bytes received (the declared length when the upload was
/// refused before its payload).
pub fn update_received_details(
    envelope: &SignedEnvelope,
    bytes: u64,
    reason: Option<&str>,
) -> CoordEvent {
    UploadFacts::of(envelope, bytes).details(reason)
}

/// An upload of `site` refused for `reason` at `at_unix_ms`: on record
/// (`update.received`, not accepted, by the site), then kept in its
/// round's record of refused updates. The site is answered by the caller's
/// path (before its payload: with the refused ticket; see
/// [`reject_pending`] for one received whole).
pub fn refuse_upload(
    facts: &JobFacts,
    site: &SiteId,
    upload: &UploadFacts,
    reason: &str,
    at_unix_ms: u64,
) -> Vec<Effect> {
    vec![
        Effect::AppendAudit {
            actor: facts.site_actor(site.as_str()),
            event: upload.details(Some(reason)),
        },
        Effect::RecordRejected {
            round: upload.round,
            rejected: RejectedUpdate {
                site: site.as_str().to_owned(),
                payload_hash: upload.payload_hash.clone(),
                reason: reason.to_owned(),
                bytes: upload.bytes,
                at_unix_ms,
            },
        },
    ]
}

/// An upload received whole and refused (`RejectUpdate`, a superseded or
/// an undecided upload): [`refuse_upload`], then its spool dropped and the
/// site answered with `code` and the reason.
pub fn reject_pending(
    facts: &JobFacts,
    site: &SiteId,
    upload: &UploadFacts,
    reason: &str,
    code: RejectCode,
    at_unix_ms: u64,
) -> Vec<Effect> {
    let mut effects = refuse_upload(facts, site, upload, reason, at_unix_ms);
    effects.push(Effect::DiscardSpool {
        site: site.clone(),
        round: upload.round,
    });
    effects.push(Effect::AnswerUpload {
        site: site.clone(),
        round: upload.round,
        result: UploadResult::Reject {
            code,
            message: reason.to_owned(),
        },
    });
    effects
}

/// An acknowledged update that could not be folded (`why`): refused on
/// record and answered as an internal error. Its spool is kept: it is the
/// evidence of what the round machine counted.
pub fn fold_failed(
    facts: &JobFacts,
    site: &SiteId,
    upload: &UploadFacts,
    why: &str,
    at_unix_ms: u64,
) -> Vec<Effect> {
    let message = format!("the coordinator could not fold the update: {why}");
    let mut effects = refuse_upload(facts, site, upload, &message, at_unix_ms);
    effects.push(Effect::AnswerUpload {
        site: site.clone(),
        round: upload.round,
        result: UploadResult::Reject {
            code: RejectCode::Internal,
            message,
        },
    });
    effects
}

/// An acknowledged update, folded into the round and archived by the
/// driver (pass 2: the numbers and the files stay there): its acceptance
/// on record (`update.received`, accepted, by its site), its details kept
/// on the round's record (`fedlink rounds show`), then the site's
/// acknowledgement of `payload_hash`.
pub fn accept_upload(
    facts: &JobFacts,
    site: &SiteId,
    upload: &UploadFacts,
    payload_hash: PayloadHash,
    upload_ms: u64,
    metrics: Option<EvalMetrics>,
    at_unix_ms: u64,
) -> Vec<Effect> {
    vec![
        Effect::AppendAudit {
            actor: facts.site_actor(site.as_str()),
            event: upload.details(None),
        },
        Effect::RecordAccepted {
            round: upload.round,
            detail: UpdateDetail {
                site: site.as_str().to_owned(),
                payload_hash: upload.payload_hash.clone(),
                bytes: upload.bytes,
                upload_ms,
                metrics,
                at_unix_ms,
            },
        },
        Effect::AnswerUpload {
            site: site.clone(),
            round: upload.round,
            result: UploadResult::Ack {
                payload_hash,
                accepted: true,
            },
        },
    ]
}

/// The accepted updates of a round taken out before it is aggregated
/// ([`exclude_withdrawn`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Exclusion {
    /// The inputs taken out, by index into the round's inputs, highest
    /// first (remove them in this order), each with why its site is no
    /// longer allowed.
    pub excluded: Vec<(usize, NotAllowed)>,
    /// One `update.excluded` entry each, in the same order; the driver
    /// executes them before it aggregates what is left.
    pub effects: Vec<Effect>,
    /// Fewer inputs than the quorum are left: `(left, quorum)` — the round
    /// fails.
    pub below_quorum: Option<(usize, usize)>,
}

/// Before a round is aggregated: every accepted update whose site is no
/// longer allowed (revoked or removed after its update was accepted;
/// `not_allowed` says why, `None`: allowed) is taken out of the round,
/// each on record (`update.excluded`, with the reason), and fewer inputs
/// left than `quorum` fail the round. Nothing excluded: no effects. The
/// driver folds the rest again (the accumulator cannot subtract); the
/// excluded updates' files stay in the archive as evidence, but
/// `round.json` does not list them.
pub fn exclude_withdrawn(
    facts: &JobFacts,
    round: RoundId,
    inputs: &[RoundInput],
    quorum: usize,
    not_allowed: impl Fn(&str) -> Option<NotAllowed>,
) -> Exclusion {
    let mut excluded = Vec::new();
    let mut effects = Vec::new();
    for (i, input) in inputs.iter().enumerate().rev() {
        let Some(why) = not_allowed(&input.site) else {
            continue;
        };
        effects.push(facts.own(CoordEvent::UpdateExcluded(coord::UpdateExcluded {
            job: facts.job.as_str().to_owned(),
            round: round.0,
            site: input.site.clone(),
            payload_hash: input.payload_hash.clone(),
            reason: format!("the site is no longer allowed: {why}"),
        })));
        excluded.push((i, why));
    }
    let left = inputs.len() - excluded.len();
    let below_quorum = (!excluded.is_empty() && left < quorum).then_some((left, quorum));
    Exclusion {
        excluded,
        effects,
        below_quorum,
    }
}

/// What arrived of an upload before its connection was lost (or its site
/// stalled), for its `update.interrupted` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interruption {
    /// Whole records received (in the spool).
    pub records: u64,
    /// Payload bytes of those records.
    pub bytes: u64,
    /// Bytes of a record the cut left incomplete (dropped: the site sends
    /// that record again).
    pub partial_bytes: u64,
    /// What ended the upload.
    pub cause: String,
}

/// An upload cut short: on record (`update.interrupted`, by its site) with
/// what arrived, and whether it is kept for the site to resume
/// (`kept`: `Ok`) or why not. Keeping or dropping the received records
/// ([`super::resume::Partials::keep`]) is the driver's, before this.
pub fn upload_interrupted(
    facts: &JobFacts,
    site: &SiteId,
    envelope: &SignedEnvelope,
    what: &Interruption,
    kept: Result<(), &str>,
) -> Vec<Effect> {
    let h = &envelope.header;
    vec![Effect::AppendAudit {
        actor: facts.site_actor(site.as_str()),
        event: CoordEvent::UpdateInterrupted(coord::UpdateInterrupted {
            job: h.job_id.as_str().to_owned(),
            round: h.round.0,
            site: h.site_id.as_str().to_owned(),
            payload_hash: h.payload_hash.to_hex(),
            payload_bytes: h.payload_len,
            nonce: hex::encode(h.nonce.0),
            records_received: what.records,
            bytes_received: what.bytes,
            partial_record_bytes_dropped: what.partial_bytes,
            cause: what.cause.clone(),
            kept_for_resume: kept.is_ok(),
            not_kept_because: kept.err().map(str::to_owned),
        }),
    }]
}

/// A declined offer of `round`, kept in the round's record by the driver
/// (once per selected site and round; `reason` already cut to its
/// length): on record (`offer.declined`, by the coordinator, with the
/// site's reason).
pub fn offer_declined(
    facts: &JobFacts,
    site: &SiteId,
    round: RoundId,
    reason: &str,
) -> Vec<Effect> {
    vec![facts.own(CoordEvent::OfferDeclined(coord::OfferDeclined {
        job: facts.job.as_str().to_owned(),
        round: round.0,
        site: site.as_str().to_owned(),
        reason: reason.to_owned(),
    }))]
}

/// A site's signed evaluation report, counted (`verdict` Ok) or refused
/// (the refusal): on record either way, by the site — `eval.accepted`, or
/// `eval.rejected` with the reason.
pub fn eval_reported(
    facts: &JobFacts,
    site: &SiteId,
    report: &EvalReport,
    verdict: Result<(), &evaluation::EvalRefusal>,
) -> Vec<Effect> {
    match verdict {
        Ok(()) => vec![Effect::AppendAudit {
            actor: facts.site_actor(site.as_str()),
            event: CoordEvent::EvalAccepted(eval_report_details(site, report)),
        }],
        Err(why) => vec![eval_rejected(
            &facts.federation,
            site,
            report,
            &why.to_string(),
        )],
    }
}

/// `site`'s evaluation report refused for `reason`: `eval.rejected` by the
/// site (a running job's refusal, and the refusal while no job runs).
pub fn eval_rejected(
    federation: &FederationId,
    site: &SiteId,
    report: &EvalReport,
    reason: &str,
) -> Effect {
    Effect::AppendAudit {
        actor: fedlink_audit::event::site_actor(federation.as_str(), site.as_str()),
        event: CoordEvent::EvalRejected(coord::EvalRejected {
            report: eval_report_details(site, report),
            reason: reason.to_owned(),
        }),
    }
}

/// What the audit log says of `site`'s evaluation report (the details of
/// `eval.accepted`, and of `eval.rejected` with the reason).
pub fn eval_report_details(site: &SiteId, report: &EvalReport) -> coord::EvalReport {
    coord::EvalReport {
        site: site.as_str().to_owned(),
        job: report.job_id.as_str().to_owned(),
        round: report.round.0,
        model: report.model.to_hex(),
        num_eval_examples: report.metrics.num_eval_examples,
    }
}

/// The central DP the aggregation applied to a round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpApplied {
    /// Standard deviation of the noise added.
    pub noise_std: f64,
    /// The clip norm (its sensitivity).
    pub clip_norm: Option<f64>,
    /// (ε, δ) spent so far, when accounted.
    pub privacy: Option<(f64, f64)>,
}

/// A round aggregated into `output` (its `round.json` written by the
/// driver): on record (`round.aggregated`: the strategy, the DP applied
/// when the strategy has central DP, the inputs → the output), then the
/// sites whose updates made it are told which model it is, then they get
/// the coordinator's audit head over that entry. The driver publishes the
/// model after these.
pub fn round_aggregated(
    facts: &JobFacts,
    round: RoundId,
    (base_model, output): (ModelHash, ModelHash),
    strategy: serde_json::Value,
    dp: Option<DpApplied>,
    inputs: &[RoundInput],
) -> Vec<Effect> {
    let mut effects = vec![
        facts.own(CoordEvent::RoundAggregated(coord::RoundAggregated {
            job: facts.job.as_str().to_owned(),
            round: round.0,
            base_model: base_model.to_hex(),
            output_model: output.to_hex(),
            strategy,
            dp: dp.map(|dp| coord::DpApplied {
                noise_std: dp.noise_std,
                clip_norm: dp.clip_norm,
                epsilon: dp.privacy.map(|p| p.0),
                delta: dp.privacy.map(|p| p.1),
            }),
            inputs: inputs
                .iter()
                .map(|i| coord::AggregatedInput {
                    site: i.site.clone(),
                    payload_hash: i.payload_hash.clone(),
                    num_examples: Some(i.num_examples),
                })
                .collect(),
        })),
    ];
    let produced = Message::RoundOutcome(RoundOutcome {
        job_id: facts.job.clone(),
        round,
        model: output,
        job_completed: false,
    });
    // The inputs are the round's accepted updates, each from a site id
    // the round machine holds, so none fails the check (the archive keeps
    // them as plain names: its verification checks them itself).
    let sites: Vec<SiteId> = inputs
        .iter()
        .filter_map(|i| SiteId::new(i.site.as_str()).ok())
        .collect();
    effects.extend(sites.iter().map(|site| Effect::Send {
        site: site.clone(),
        message: produced.clone(),
    }));
    effects.push(Effect::PushHead { sites });
    effects
}

/// A `job.finished` entry's outcome.
pub fn outcome_details(outcome: &JobOutcome) -> coord::JobOutcome {
    match outcome {
        JobOutcome::Completed { model } => coord::JobOutcome::Completed {
            model: model.to_hex(),
        },
        JobOutcome::Failed { round, reason } => coord::JobOutcome::Failed {
            round: round.0,
            reason: format!("{reason:?}"),
        },
        JobOutcome::Aborted { completed_rounds } => coord::JobOutcome::Aborted {
            completed_rounds: *completed_rounds,
        },
    }
}

/// A connected site: its name and the protocol version negotiated with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connected {
    /// The site.
    pub site: SiteId,
    /// Its protocol version (`None`: not known).
    pub protocol_version: Option<u16>,
}

/// What the final model's evaluation needs of the job.
#[derive(Clone, Debug, PartialEq)]
pub struct FinalEvaluation {
    /// The job's rounds.
    pub rounds: u64,
    /// Its `[evaluation] every_rounds`.
    pub every_rounds: u32,
    /// The model's architecture.
    pub arch: ArchSpec,
    /// The feature scaling the job's offers carried last.
    pub scaling: Option<FeatureScaling>,
    /// When the sites' reports are due.
    pub deadline: Instant,
}

/// The state of the driver a job's end depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct Finishing {
    /// How the job ended.
    pub outcome: JobOutcome,
    /// The round open when it ended (its record is discarded), if any.
    pub open_round: Option<RoundId>,
    /// Rounds the job completed.
    pub completed_rounds: u64,
    /// The sites connected now, in order.
    pub sites: Vec<Connected>,
    /// Whether a job is queued behind this one (its sites stay for it).
    pub next_queued: bool,
    /// The final model's evaluation, as the job asks for it.
    pub evaluation: FinalEvaluation,
}

/// What `JobFinished` does.
#[derive(Clone, Debug)]
pub struct JobEnd {
    /// The effects, in order.
    pub effects: Vec<Effect>,
    /// The final model's evaluation the sites were asked for: the job ends
    /// ([`evaluation_finished`]) when it is done. `None`: the effects end
    /// the job ([`Effect::Finish`]).
    pub requested: Option<RequestedEvaluation>,
    /// Connected sites not asked to evaluate the final model: their
    /// protocol version has no evaluation requests.
    pub not_asked: Vec<Connected>,
}

/// `JobFinished`: the open round's discard and the job's end on record
/// (`round.discarded`, `job.finished`), the final model's hash to every
/// connected site when the job completed, the coordinator's audit head
/// (over `job.finished`) to every connected site; then, when the job
/// completed and its `[evaluation]` asks for the final model, the sites
/// that can are asked to evaluate it (`eval.requested`, then the
/// requests) — else the job ends at once ([`job_over`]).
pub fn job_finished(facts: &JobFacts, now_done: Finishing) -> JobEnd {
    let Finishing {
        outcome,
        open_round,
        completed_rounds,
        sites,
        next_queued,
        evaluation: eval,
    } = now_done;
    let mut effects = Vec::new();
    if let Some(round) = open_round {
        let reason = match &outcome {
            JobOutcome::Failed { reason, .. } => format!("the job failed: {reason:?}"),
            other => format!("the job ended: {other:?}"),
        };
        effects.push(facts.own(CoordEvent::RoundDiscarded(coord::RoundDiscarded {
            job: facts.job.as_str().to_owned(),
            round: round.0,
            reason,
        })));
    }
    effects.push(facts.own(CoordEvent::JobFinished(coord::JobFinished {
        job: facts.job.as_str().to_owned(),
        outcome: outcome_details(&outcome),
    })));
    let all: Vec<SiteId> = sites.iter().map(|c| c.site.clone()).collect();
    if let JobOutcome::Completed { model } = &outcome {
        let fin = Message::RoundOutcome(RoundOutcome {
            job_id: facts.job.clone(),
            round: RoundId(completed_rounds),
            model: *model,
            job_completed: true,
        });
        effects.extend(all.iter().map(|site| Effect::Send {
            site: site.clone(),
            message: fin.clone(),
        }));
    }
    effects.push(Effect::PushHead { sites: all.clone() });
    let mut not_asked = Vec::new();
    if let JobOutcome::Completed { model } = &outcome
        && evaluation::is_due(eval.rounds, eval.every_rounds, eval.rounds)
    {
        let (asked, old): (Vec<Connected>, Vec<Connected>) = sites.into_iter().partition(|c| {
            c.protocol_version
                .is_some_and(fedlink_protocol::supports_federated_eval)
        });
        not_asked = old;
        if !asked.is_empty() {
            let asked: Vec<SiteId> = asked.into_iter().map(|c| c.site).collect();
            let round = RoundId(eval.rounds);
            effects.push(facts.own(CoordEvent::EvalRequested(coord::EvalRequested {
                job: facts.job.as_str().to_owned(),
                round: eval.rounds,
                model: model.to_hex(),
                sites: asked.iter().map(|s| s.as_str().to_owned()).collect(),
            })));
            let request = Message::EvalRequest(Box::new(EvalRequest {
                federation_id: facts.federation.clone(),
                job_id: facts.job.clone(),
                round,
                model: *model,
                arch: eval.arch,
                scaling: eval.scaling,
            }));
            effects.extend(asked.iter().map(|site| Effect::Send {
                site: site.clone(),
                message: request.clone(),
            }));
            let expected = ExpectedEval {
                federation_id: facts.federation.clone(),
                job_id: facts.job.clone(),
                round,
                model: *model,
            };
            return JobEnd {
                effects,
                requested: Some(RequestedEvaluation::new(
                    expected,
                    asked.into_iter().map(String::from),
                    eval.deadline,
                )),
                not_asked,
            };
        }
    }
    effects.extend(job_over(&all, next_queued, outcome));
    JobEnd {
        effects,
        requested: None,
        not_asked,
    }
}

/// The end of a job: unless a job is queued behind it (its sites stay
/// for that one, as after an empty start), every connected site is told
/// the job is over (`Bye`); then the driver records the outcome.
pub fn job_over(sites: &[SiteId], next_queued: bool, outcome: JobOutcome) -> Vec<Effect> {
    let mut effects = Vec::new();
    if !next_queued {
        effects.extend(sites.iter().map(|site| Effect::Send {
            site: site.clone(),
            message: Message::Bye(Bye {
                reason: "job finished".into(),
            }),
        }));
    }
    effects.push(Effect::Finish(outcome));
    effects
}

/// A federated evaluation on record (`round.evaluated`, by the
/// coordinator): the model, the round it followed, the sites and weighted
/// metrics that counted and the reports left out (and why). `round`: the
/// round it is kept on; `requested`: the final model's evaluation the
/// sites were asked for (its entry says so; a round's own evaluation,
/// from its updates' headers, has no such field).
pub fn round_evaluated(
    facts: &JobFacts,
    round: RoundId,
    evaluation: &FederatedEvaluation,
    requested: bool,
) -> Effect {
    facts.own(CoordEvent::RoundEvaluated(coord::RoundEvaluated {
        job: facts.job.as_str().to_owned(),
        round: round.0,
        model: evaluation.model.clone(),
        after_round: evaluation.after_round,
        sites: evaluation.sites.clone(),
        weighted: evaluation.weighted.clone(),
        excluded: evaluation.excluded.clone(),
        requested,
    }))
}

/// The final model's evaluation, done (every asked site answered, or the
/// deadline passed): on record (`round.evaluated`, requested), kept on the
/// job's last round, then the job ends ([`job_over`]).
pub fn evaluation_finished(
    facts: &JobFacts,
    evaluation: FederatedEvaluation,
    outcome: JobOutcome,
    sites: &[SiteId],
    next_queued: bool,
) -> Vec<Effect> {
    let round = RoundId(evaluation.after_round);
    let mut effects = vec![
        round_evaluated(facts, round, &evaluation, true),
        Effect::RecordFinalEvaluation { round, evaluation },
    ];
    effects.extend(job_over(sites, next_queued, outcome));
    effects
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeSet;
    use std::time::Duration;

    use fedlink_protocol::FEDERATED_EVAL_VERSION;

    use super::*;
    use fedlink_audit::EventKind;

    fn sid(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }
    use crate::round::FailReason;

    fn facts() -> JobFacts {
        JobFacts {
            federation: FederationId::new("fed").unwrap(),
            job: JobId::new("j1").unwrap(),
            actor: "fedlink://fed/coordinator".into(),
        }
    }

    fn job() -> Job {
        Job::from_toml(
            "id = \"j1\"\nrounds = 3\nseed = 11\narch = { kind = \"logreg\", inputs = 4, classes = 2 }\n\
             init = { seed = 1 }\n[round]\ndeadline_secs = 60\n[strategy]\nname = \"fedavg\"\n",
        )
        .unwrap()
    }

    fn model(n: u8) -> ModelHash {
        ModelHash([n; 32])
    }

    fn kinds(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .map(|e| match e {
                Effect::AppendAudit { event, .. } => format!("audit {}", event.kind()),
                Effect::AppendAuditBatch { entries, .. } => {
                    let kinds: Vec<&str> = entries.iter().map(|e| e.kind().as_str()).collect();
                    format!("audit batch {}", kinds.join(","))
                }
                Effect::Send { site, message } => {
                    let m = match message {
                        Message::TaskOfferV6(_) => "offer",
                        Message::Cancel(_) => "cancel",
                        Message::RoundOutcome(_) => "outcome",
                        Message::EvalRequest(_) => "eval",
                        Message::Bye(_) => "bye",
                        _ => "other",
                    };
                    format!("send {m} {site}")
                }
                Effect::PushHead { sites } => format!(
                    "head {}",
                    sites
                        .iter()
                        .map(SiteId::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                Effect::RecordRejected { .. } => "record rejected".into(),
                Effect::RecordAccepted { .. } => "record accepted".into(),
                Effect::DiscardSpool { .. } => "discard".into(),
                Effect::AnswerUpload { .. } => "answer".into(),
                Effect::RecordFinalEvaluation { .. } => "record final".into(),
                Effect::Finish(_) => "finish".into(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// An audit append's actor, event name and details (as written).
    fn audit(e: &Effect) -> (&str, EventKind, serde_json::Value) {
        match e {
            Effect::AppendAudit { actor, event } => {
                (actor.as_str(), event.kind(), event.details().unwrap())
            }
            other => panic!("not an audit append: {other:?}"),
        }
    }

    #[test]
    fn an_offer_is_on_record_before_it_is_sent_and_carries_the_round() {
        let start = Instant::now();
        let clock = UnixClock::new(start, 1_000_000);
        let terms = OfferTerms::of(&job(), &facts(), &StrategyConfig::default(), None).unwrap();
        let offer = Offer {
            round: RoundId(2),
            attempt: 1,
            model: model(7),
            deadline: start + Duration::from_secs(60),
        };
        let e = send_offer(&facts(), &terms, &clock, &sid("site-a"), &offer);
        assert_eq!(kinds(&e), ["audit offer.sent", "send offer site-a"]);
        let (actor, _, details) = audit(&e[0]);
        assert_eq!(actor, facts().actor);
        assert_eq!(
            details,
            serde_json::json!({
                "job": "j1", "round": 2, "site": "site-a", "base_model": model(7).to_hex(),
            })
        );
        let Effect::Send {
            message: Message::TaskOfferV6(o),
            ..
        } = &e[1]
        else {
            panic!("{:?}", e[1]);
        };
        assert_eq!(
            (o.job_id.as_str(), o.round, o.base_model),
            ("j1", RoundId(2), model(7))
        );
        assert_eq!(o.deadline_unix_ms, 1_060_000);
        assert_eq!(o.training.seed, round_seed(11, RoundId(2)));
        // Each round trains with its own seed.
        let other = terms.offer(
            &Offer {
                round: RoundId(3),
                ..offer
            },
            0,
        );
        assert_ne!(other.training.seed, o.training.seed);
        assert_eq!(other.arch, o.arch);
    }

    #[test]
    fn a_checkpoint_carries_what_its_recovery_needs() {
        use crate::round::AcceptedUpdate;
        let started = Checkpoint::RoundStarted {
            round: RoundId(4),
            attempt: 1,
            base_model: model(1),
            selected: vec![sid("site-a")],
        };
        let accepted = AcceptedUpdate {
            site: sid("site-a"),
            round: RoundId(4),
            payload_hash: model(2),
            num_examples: 10,
            bytes: 100,
            received_unix_ms: 0,
        };
        let completed = Checkpoint::RoundCompleted {
            round: RoundId(4),
            model: model(3),
            updates: vec![accepted.clone()],
            metrics: Default::default(),
        };
        let plain = CheckpointPlan {
            optimizer_state: false,
            commit_replay: None,
            opens_round: None,
            status_may_wait: false,
        };
        assert_eq!(
            checkpoint_plan(&started),
            CheckpointPlan {
                opens_round: Some(RoundId(4)),
                ..plain.clone()
            }
        );
        assert_eq!(
            checkpoint_plan(&Checkpoint::UpdateAccepted(accepted)),
            CheckpointPlan {
                commit_replay: Some((sid("site-a"), RoundId(4))),
                status_may_wait: true,
                ..plain.clone()
            }
        );
        assert_eq!(
            checkpoint_plan(&completed),
            CheckpointPlan {
                optimizer_state: true,
                ..plain.clone()
            }
        );
        for cp in [
            Checkpoint::Paused(true),
            Checkpoint::JobFinished(JobOutcome::Aborted {
                completed_rounds: 1,
            }),
        ] {
            assert_eq!(checkpoint_plan(&cp), plain);
        }
    }

    #[test]
    fn an_opened_round_is_on_record_with_its_base_model() {
        let e = round_opened(&facts(), RoundId(5), model(4));
        assert_eq!(kinds(&e), ["audit round.opened"]);
        let (actor, _, d) = audit(&e[0]);
        assert_eq!(actor, facts().actor);
        assert_eq!(
            d,
            serde_json::json!({"job": "j1", "round": 5, "base_model": model(4).to_hex()})
        );
    }

    #[test]
    fn the_unix_clock_maps_instants_on_both_sides_of_its_base() {
        let base = Instant::now() + Duration::from_secs(10);
        let clock = UnixClock::new(base, 5_000);
        assert_eq!(clock.unix_ms(base), 5_000);
        assert_eq!(clock.unix_ms(base + Duration::from_millis(250)), 5_250);
        assert_eq!(clock.unix_ms(base - Duration::from_secs(2)), 3_000);
        assert_eq!(clock.unix_ms(base - Duration::from_secs(9)), 0);
    }

    /// A round's offers: every `offer.sent` in one batch (one fsync), in
    /// the offers' order, before the first offer leaves; each offer
    /// carries its own site's round, model and deadline.
    #[test]
    fn a_rounds_offers_are_on_record_in_one_batch_before_any_is_sent() {
        let start = Instant::now();
        let clock = UnixClock::new(start, 1_000_000);
        let terms = OfferTerms::of(&job(), &facts(), &StrategyConfig::default(), None).unwrap();
        let offer = |secs| Offer {
            round: RoundId(2),
            attempt: 1,
            model: model(7),
            deadline: start + Duration::from_secs(secs),
        };
        let offers = [
            (sid("site-a"), offer(60)),
            (sid("site-b"), offer(61)),
            (sid("site-c"), offer(62)),
        ];
        let e = send_offers(&facts(), &terms, &clock, &offers);
        assert_eq!(
            kinds(&e),
            [
                "audit batch offer.sent,offer.sent,offer.sent",
                "send offer site-a",
                "send offer site-b",
                "send offer site-c"
            ]
        );
        let Effect::AppendAuditBatch { actor, entries } = &e[0] else {
            panic!("{:?}", e[0]);
        };
        assert_eq!(actor, &facts().actor);
        for ((site, _), event) in offers.iter().zip(entries) {
            assert_eq!(event.kind(), EventKind::OfferSent);
            assert_eq!(
                event.details().unwrap(),
                serde_json::json!({
                    "job": "j1", "round": 2, "site": site, "base_model": model(7).to_hex(),
                })
            );
        }
        for (i, deadline) in [(1, 1_060_000), (3, 1_062_000)] {
            let Effect::Send {
                message: Message::TaskOfferV6(o),
                ..
            } = &e[i]
            else {
                panic!("{:?}", e[i]);
            };
            assert_eq!(o.deadline_unix_ms, deadline);
        }
        // One offer: one plain append, as `send_offer` gives it.
        let one = send_offers(&facts(), &terms, &clock, &offers[..1]);
        assert_eq!(
            one,
            send_offer(&facts(), &terms, &clock, &sid("site-a"), &offer(60))
        );
        assert!(send_offers(&facts(), &terms, &clock, &[]).is_empty());
    }

    /// The offers the round machine queues in a row are one decision; the
    /// action after them is handed back, not lost.
    #[test]
    fn a_rounds_offers_are_taken_in_a_row_and_the_next_action_kept() {
        use crate::job::Selection;
        use crate::round::{ConnId, Input, RoundConfig, SiteCapabilities};
        // Every round takes the three sites, at once.
        let mut j = job();
        j.selection = Selection::exactly(3, 0);
        let cfg = RoundConfig::from_job(&j);
        let mut runner = JobRunner::new(cfg, model(1));
        let now = Instant::now();
        for (i, site) in ["site-a", "site-b", "site-c"].into_iter().enumerate() {
            runner.handle(
                now,
                Input::SiteConnected {
                    site: sid(site),
                    conn: ConnId(i as u64),
                    capabilities: SiteCapabilities::compatible(),
                },
            );
        }
        // An admin's pause, handled before the driver polls: its checkpoint
        // is queued after the round's offers.
        runner.handle(now, Input::Admin(crate::round::AdminCommand::Pause));
        let mut first = None;
        while let Some(action) = runner.poll_action() {
            if let Action::SendOffer { site, offer } = action {
                first = Some((site, offer));
                break;
            }
        }
        let first = first.expect("the round's first offer");
        let (offers, next) = offers_in_a_row(&mut runner, first);
        let sites: BTreeSet<&str> = offers.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(sites, BTreeSet::from(["site-a", "site-b", "site-c"]));
        assert!(offers.iter().all(|(_, o)| o.round == RoundId(1)));
        assert!(
            matches!(next, Some(Action::Persist(Checkpoint::Paused(true)))),
            "{next:?}"
        );
    }

    #[test]
    fn a_cancel_names_the_job_and_round_and_a_disconnect_its_reason() {
        let e = cancel_task(&facts(), &sid("site-b"), RoundId(4));
        assert_eq!(
            e,
            [Effect::Send {
                site: sid("site-b"),
                message: Message::Cancel(Cancel {
                    job_id: JobId::new("j1").unwrap(),
                    round: RoundId(4),
                    reason: "the round closed".into(),
                }),
            }]
        );
        assert_eq!(
            close_reason(&DisconnectReason::NotAllowed),
            CloseReason::NotAllowed
        );
        assert_eq!(
            close_reason(&DisconnectReason::Replaced),
            CloseReason::Replaced
        );
    }

    fn upload() -> UploadFacts {
        UploadFacts {
            job: "j1".into(),
            round: RoundId(3),
            site: "site-a".into(),
            payload_hash: "ab".repeat(32),
            bytes: 4096,
            num_examples: 50,
            nonce: "01".repeat(16),
            envelope_sig: "02".repeat(64),
        }
    }

    #[test]
    fn a_refused_upload_is_audited_by_its_site_then_recorded_then_answered_once() {
        let f = facts();
        let e = reject_pending(
            &f,
            &sid("site-a"),
            &upload(),
            "too late",
            RejectCode::TooLate,
            77,
        );
        assert_eq!(
            kinds(&e),
            [
                "audit update.received",
                "record rejected",
                "discard",
                "answer"
            ]
        );
        assert!(Effect::audited_first(&e));
        let (actor, _, details) = audit(&e[0]);
        assert_eq!(actor, f.site_actor("site-a"));
        assert_eq!(details["accepted"], false);
        assert_eq!(details["reason"], "too late");
        assert_eq!(
            (&details["job"], &details["round"], &details["site"]),
            (&"j1".into(), &3.into(), &"site-a".into())
        );
        assert_eq!(details["payload_bytes"], 4096);
        assert_eq!(
            e[1],
            Effect::RecordRejected {
                round: RoundId(3),
                rejected: RejectedUpdate {
                    site: "site-a".into(),
                    payload_hash: "ab".repeat(32),
                    reason: "too late".into(),
                    bytes: 4096,
                    at_unix_ms: 77,
                },
            }
        );
        assert_eq!(
            e[3],
            Effect::AnswerUpload {
                site: sid("site-a"),
                round: RoundId(3),
                result: UploadResult::Reject {
                    code: RejectCode::TooLate,
                    message: "too late".into(),
                },
            }
        );
        // Accepted: on record first, then the round's record, then the ack.
        let hash = PayloadHash([0xab; 32]);
        let e = accept_upload(&f, &sid("site-a"), &upload(), hash, 12, None, 78);
        assert_eq!(
            kinds(&e),
            ["audit update.received", "record accepted", "answer"]
        );
        assert!(Effect::audited_first(&e));
        assert_eq!(audit(&e[0]).2["accepted"], true);
        assert_eq!(audit(&e[0]).2["reason"], serde_json::Value::Null);
        assert_eq!(
            e[2],
            Effect::AnswerUpload {
                site: sid("site-a"),
                round: RoundId(3),
                result: UploadResult::Ack {
                    payload_hash: hash,
                    accepted: true
                },
            }
        );
        // Refused before its payload: the ticket answers, nothing to drop.
        let e = refuse_upload(&f, &sid("site-a"), &upload(), "bad signature", 1);
        assert_eq!(kinds(&e), ["audit update.received", "record rejected"]);
        // An acknowledged update that could not be folded keeps its spool.
        let e = fold_failed(&f, &sid("site-a"), &upload(), "spool vanished", 1);
        assert_eq!(
            kinds(&e),
            ["audit update.received", "record rejected", "answer"]
        );
        let Effect::AnswerUpload {
            result: UploadResult::Reject { code, message },
            ..
        } = &e[2]
        else {
            panic!("{:?}", e[2]);
        };
        assert_eq!(*code, RejectCode::Internal);
        assert_eq!(
            message,
            "the coordinator could not fold the update: spool vanished"
        );
        assert_eq!(audit(&e[0]).2["reason"], message.as_str());
    }

    #[test]
    fn an_aggregated_round_is_on_record_before_its_sites_are_told_the_model() {
        let input = |site: &str, n| RoundInput {
            site: site.into(),
            payload_hash: "cd".repeat(32),
            num_examples: n,
            payload_file: format!("{site}.payload"),
            envelope_file: format!("{site}.envelope.json"),
        };
        let inputs = [input("site-a", 10), input("site-c", 30)];
        let dp = DpApplied {
            noise_std: 0.5,
            clip_norm: Some(1.0),
            privacy: Some((2.0, 1e-5)),
        };
        let e = round_aggregated(
            &facts(),
            RoundId(2),
            (model(1), model(2)),
            serde_json::json!({"name": "fedavg"}),
            Some(dp),
            &inputs,
        );
        assert_eq!(
            kinds(&e),
            [
                "audit round.aggregated",
                "send outcome site-a",
                "send outcome site-c",
                "head site-a,site-c"
            ]
        );
        nothing_sent_twice(&e);
        let (actor, _, d) = audit(&e[0]);
        assert_eq!(actor, facts().actor);
        assert_eq!((&d["job"], &d["round"]), (&"j1".into(), &2.into()));
        assert_eq!(d["base_model"], model(1).to_hex());
        assert_eq!(d["output_model"], model(2).to_hex());
        assert_eq!(d["dp"]["epsilon"], 2.0);
        assert_eq!(d["inputs"][1]["num_examples"], 30);
        assert_eq!(
            d["inputs"][1].get("payload_file"),
            None,
            "file names stay in round.json"
        );
        let Effect::Send {
            message: Message::RoundOutcome(o),
            ..
        } = &e[1]
        else {
            panic!()
        };
        assert_eq!(
            (o.round, o.model, o.job_completed),
            (RoundId(2), model(2), false)
        );
        // Without central DP the entry says so.
        let e = round_aggregated(
            &facts(),
            RoundId(2),
            (model(1), model(2)),
            serde_json::Value::Null,
            None,
            &inputs,
        );
        assert_eq!(audit(&e[0]).2["dp"], serde_json::Value::Null);
    }

    /// Updates of sites no longer allowed are taken out, each on record
    /// with its reason, highest index first; too few left fail the round;
    /// nothing to take out decides nothing, whatever the quorum.
    #[test]
    fn withdrawn_sites_updates_are_excluded_on_record_and_can_fail_the_quorum() {
        let input = |site: &str| RoundInput {
            site: site.into(),
            payload_hash: format!("{site}-hash"),
            num_examples: 10,
            payload_file: String::new(),
            envelope_file: String::new(),
        };
        let inputs = [input("site-a"), input("site-b"), input("site-c")];
        let revoked = |s: &str| (s != "site-b").then(|| NotAllowed::NotRegistered(s.into()));
        let x = exclude_withdrawn(&facts(), RoundId(4), &inputs, 1, revoked);
        assert_eq!(
            x.excluded,
            [
                (2, NotAllowed::NotRegistered("site-c".into())),
                (0, NotAllowed::NotRegistered("site-a".into()))
            ]
        );
        assert_eq!(x.below_quorum, None);
        assert_eq!(
            kinds(&x.effects),
            ["audit update.excluded", "audit update.excluded"]
        );
        let (actor, _, d) = audit(&x.effects[0]);
        assert_eq!(actor, facts().actor);
        assert_eq!(
            d,
            serde_json::json!({
                "job": "j1", "round": 4, "site": "site-c", "payload_hash": "site-c-hash",
                "reason": "the site is no longer allowed: site-c is not a registered site (removed or revoked)",
            })
        );
        // Two needed, one left: the round fails.
        let x = exclude_withdrawn(&facts(), RoundId(4), &inputs, 2, revoked);
        assert_eq!(x.below_quorum, Some((1, 2)));
        // All allowed: nothing, even below the quorum.
        let x = exclude_withdrawn(&facts(), RoundId(4), &inputs[..1], 2, |_| None);
        assert_eq!(
            x,
            Exclusion {
                excluded: vec![],
                effects: vec![],
                below_quorum: None
            }
        );
    }

    /// An interrupted upload is on record by its site with what arrived,
    /// kept for a resume or not (and why); the declared length is the
    /// header's.
    #[test]
    fn an_interrupted_upload_is_on_record_by_its_site_kept_or_not() {
        use fedlink_protocol::{
            Encoding, PROTOCOL_VERSION, SiteId, UpdateHeader, UpdateNonce, ValueCodec, sign_update,
        };
        let header = UpdateHeader {
            protocol_version: PROTOCOL_VERSION,
            federation_id: facts().federation,
            site_id: SiteId::new("site-a").unwrap(),
            job_id: facts().job,
            round: RoundId(3),
            base_model: model(1),
            num_examples: 10,
            encoding: Encoding::with_codec(ValueCodec::F32).unwrap(),
            payload_len: 4096,
            payload_hash: PayloadHash([0xab; 32]),
            nonce: UpdateNonce([1; 16]),
            metrics: None,
            feature_stats: None,
        };
        let env = sign_update(&ed25519_dalek::SigningKey::from_bytes(&[7; 32]), header);
        let what = Interruption {
            records: 2,
            bytes: 1024,
            partial_bytes: 100,
            cause: "connection lost".into(),
        };
        let e = upload_interrupted(&facts(), &sid("site-a"), &env, &what, Ok(()));
        assert_eq!(kinds(&e), ["audit update.interrupted"]);
        let (actor, _, d) = audit(&e[0]);
        assert_eq!(actor, facts().site_actor("site-a"));
        assert_eq!(
            d,
            serde_json::json!({
                "job": "j1", "round": 3, "site": "site-a",
                "payload_hash": "ab".repeat(32), "payload_bytes": 4096,
                "nonce": "01".repeat(16), "records_received": 2, "bytes_received": 1024,
                "partial_record_bytes_dropped": 100, "cause": "connection lost",
                "kept_for_resume": true, "not_kept_because": null,
            })
        );
        let e = upload_interrupted(
            &facts(),
            &sid("site-a"),
            &env,
            &what,
            Err("the round closed"),
        );
        let (_, _, d) = audit(&e[0]);
        assert_eq!(d["kept_for_resume"], false);
        assert_eq!(d["not_kept_because"], "the round closed");
    }

    #[test]
    fn a_declined_offer_and_an_evaluation_report_are_on_record() {
        let e = offer_declined(&facts(), &sid("site-b"), RoundId(2), "busy");
        assert_eq!(kinds(&e), ["audit offer.declined"]);
        let (actor, _, d) = audit(&e[0]);
        assert_eq!(actor, facts().actor);
        assert_eq!(
            d,
            serde_json::json!({"job": "j1", "round": 2, "site": "site-b", "reason": "busy"})
        );
        let report = EvalReport {
            protocol_version: fedlink_protocol::PROTOCOL_VERSION,
            federation_id: facts().federation,
            site_id: SiteId::new("site-b").unwrap(),
            job_id: facts().job,
            round: RoundId(3),
            model: model(9),
            metrics: EvalMetrics {
                num_eval_examples: 40,
                ..EvalMetrics::default()
            },
        };
        let e = eval_reported(&facts(), &sid("site-b"), &report, Ok(()));
        let (actor, kind, d) = audit(&e[0]);
        assert_eq!(
            (actor, kind),
            (
                facts().site_actor("site-b").as_str(),
                EventKind::EvalAccepted
            )
        );
        assert_eq!(
            d,
            serde_json::json!({
                "site": "site-b", "job": "j1", "round": 3, "model": model(9).to_hex(),
                "num_eval_examples": 40,
            })
        );
        let refused = evaluation::EvalRefusal::NotAsked;
        let e = eval_reported(&facts(), &sid("site-b"), &report, Err(&refused));
        let (_, kind, d) = audit(&e[0]);
        assert_eq!(kind, EventKind::EvalRejected);
        assert_eq!(d["reason"], refused.to_string());
    }

    fn sites(versions: &[(&str, u16)]) -> Vec<Connected> {
        versions
            .iter()
            .map(|(s, v)| Connected {
                site: sid(s),
                protocol_version: Some(*v),
            })
            .collect()
    }

    fn finishing(outcome: JobOutcome, every_rounds: u32, deadline: Instant) -> Finishing {
        Finishing {
            outcome,
            open_round: None,
            completed_rounds: 3,
            sites: sites(&[
                ("site-a", FEDERATED_EVAL_VERSION),
                ("site-b", FEDERATED_EVAL_VERSION - 1),
                ("site-c", FEDERATED_EVAL_VERSION),
            ]),
            next_queued: false,
            evaluation: FinalEvaluation {
                rounds: 3,
                every_rounds,
                arch: job().arch,
                scaling: None,
                deadline,
            },
        }
    }

    /// No site is sent the same kind of message twice.
    fn nothing_sent_twice(effects: &[Effect]) {
        let sends: Vec<String> = kinds(effects)
            .into_iter()
            .filter(|k| k.starts_with("send"))
            .collect();
        let unique: BTreeSet<&String> = sends.iter().collect();
        assert_eq!(unique.len(), sends.len(), "{sends:?}");
    }

    #[test]
    fn a_failed_job_discards_its_open_round_then_ends_with_bye() {
        let deadline = Instant::now();
        let reason = FailReason::NoQuorum {
            accepted: 1,
            quorum: 2,
            attempts: 2,
        };
        let mut f = finishing(
            JobOutcome::Failed {
                round: RoundId(2),
                reason: reason.clone(),
            },
            1,
            deadline,
        );
        f.open_round = Some(RoundId(2));
        let end = job_finished(&facts(), f);
        assert!(end.requested.is_none());
        assert!(end.not_asked.is_empty());
        assert_eq!(
            kinds(&end.effects),
            [
                "audit round.discarded",
                "audit job.finished",
                "head site-a,site-b,site-c",
                "send bye site-a",
                "send bye site-b",
                "send bye site-c",
                "finish",
            ]
        );
        assert!(Effect::audited_first(&end.effects));
        nothing_sent_twice(&end.effects);
        let (_, _, d) = audit(&end.effects[0]);
        assert_eq!(d["round"], 2);
        assert_eq!(d["job"], "j1");
        assert_eq!(d["reason"], format!("the job failed: {reason:?}"));
        let (_, _, d) = audit(&end.effects[1]);
        assert_eq!(d["outcome"]["result"], "failed");
    }

    #[test]
    fn a_completed_job_tells_its_model_then_asks_the_sites_that_can_to_evaluate_it() {
        let deadline = Instant::now() + Duration::from_secs(60);
        let done = JobOutcome::Completed { model: model(9) };
        let end = job_finished(&facts(), finishing(done.clone(), 1, deadline));
        assert_eq!(
            kinds(&end.effects),
            [
                "audit job.finished",
                "send outcome site-a",
                "send outcome site-b",
                "send outcome site-c",
                "head site-a,site-b,site-c",
                "audit eval.requested",
                "send eval site-a",
                "send eval site-c",
            ]
        );
        nothing_sent_twice(&end.effects);
        let Effect::Send {
            message: Message::RoundOutcome(o),
            ..
        } = &end.effects[1]
        else {
            panic!()
        };
        assert_eq!(
            (o.round, o.model, o.job_completed),
            (RoundId(3), model(9), true)
        );
        let (_, _, d) = audit(&end.effects[5]);
        assert_eq!(d["sites"], serde_json::json!(["site-a", "site-c"]));
        assert_eq!(d["round"], 3);
        assert_eq!(
            end.not_asked,
            sites(&[("site-b", FEDERATED_EVAL_VERSION - 1)])
        );
        let req = end.requested.expect("the final evaluation is requested");
        assert_eq!(req.deadline(), deadline);
        assert_eq!(
            (req.expected().round, req.expected().model),
            (RoundId(3), model(9))
        );
        // The job ends when the evaluation is done.
        let ev = req.finish();
        let all = [sid("site-a"), sid("site-c")];
        let e = evaluation_finished(&facts(), ev.clone(), done.clone(), &all, true);
        assert_eq!(
            kinds(&e),
            ["audit round.evaluated", "record final", "finish"],
            "a job queued behind keeps the sites: no bye"
        );
        assert!(Effect::audited_first(&e));
        assert_eq!(audit(&e[0]).2["requested"], true);
        // A round's own evaluation (from its updates' headers) is on record
        // the same way, without `requested`.
        let per_round = round_evaluated(&facts(), RoundId(3), &ev, false);
        let (_, kind, d) = audit(&per_round);
        assert_eq!(kind, EventKind::RoundEvaluated);
        assert_eq!(d.get("requested"), None);
        let mut with = audit(&e[0]).2.clone();
        with.as_object_mut().unwrap().remove("requested");
        assert_eq!(d, with);
        assert_eq!(
            e[1],
            Effect::RecordFinalEvaluation {
                round: RoundId(3),
                evaluation: ev
            }
        );
        assert_eq!(e[2], Effect::Finish(done));
    }

    #[test]
    fn a_completed_job_without_evaluation_or_capable_sites_ends_at_once() {
        let done = JobOutcome::Completed { model: model(9) };
        let now = Instant::now();
        // `every_rounds = 0`: never evaluated.
        let mut f = finishing(done.clone(), 0, now);
        f.next_queued = true;
        let end = job_finished(&facts(), f);
        assert!(end.requested.is_none());
        assert_eq!(
            kinds(&end.effects).last().map(String::as_str),
            Some("finish")
        );
        assert!(
            !kinds(&end.effects)
                .iter()
                .any(|k| k.starts_with("send bye"))
        );
        // Due, but no connected site can evaluate.
        let mut f = finishing(done, 1, now);
        f.sites = sites(&[("site-b", FEDERATED_EVAL_VERSION - 1)]);
        let end = job_finished(&facts(), f);
        assert!(end.requested.is_none());
        assert_eq!(end.not_asked.len(), 1);
        assert_eq!(
            kinds(&end.effects),
            [
                "audit job.finished",
                "send outcome site-b",
                "head site-b",
                "send bye site-b",
                "finish"
            ]
        );
        // An aborted job with no site connected: on record, then over.
        let end = job_finished(
            &facts(),
            Finishing {
                sites: Vec::new(),
                ..finishing(
                    JobOutcome::Aborted {
                        completed_rounds: 1,
                    },
                    1,
                    now,
                )
            },
        );
        assert_eq!(
            kinds(&end.effects),
            ["audit job.finished", "head ", "finish"]
        );
    }
}
