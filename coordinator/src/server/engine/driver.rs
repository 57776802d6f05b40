//! The driver proper: the engine task's loop ([`run_engine`]: events,
//! timers, shutdown) and the executor of the round machine's actions and
//! the core's effects (send, persist, audit, fold, aggregate: each handed to
//! the engine's own code). Everything it decides with is in the core; this
//! file only moves events in and effects out.

use std::future::Future;
use std::time::Instant;

use fedlink_protocol::{Message, SiteId};
use tokio::sync::mpsc;

use super::{Engine, EngineError, Held};
use crate::core::Effect;
use crate::core::actions::{self, Connected, FinalEvaluation, Finishing, OfferTerms};
use crate::core::intake::reason_text;
use crate::core::jobs::{self, AfterFinish};
use crate::core::scaling::PersistedState;
use crate::round::{Action, Input};
use crate::server::clock::unix_ms;
use crate::server::effects;
use crate::server::event::Event;
use crate::server::shared::Shared;
use crate::store::Extras;

impl Engine {
    /// When the round machine wants to be woken.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        [
            self.runner.poll_timeout(),
            self.status_due(),
            self.requested.as_ref().map(|(r, _)| r.deadline()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Handle an event or a timeout (`handle`) with the engine's event
    /// queue `rx` lent to it, then the event a round's end took from the
    /// queue and did not handle, if any (see
    /// [`Self::take_queued_uploads`]): events are handled in the order they
    /// came.
    pub(crate) fn with_inbox(
        &mut self,
        rx: &mut mpsc::Receiver<Event>,
        handle: impl FnOnce(&mut Self) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let (_, stand_in) = mpsc::channel(1);
        self.inbox = Some(std::mem::replace(rx, stand_in));
        let mut result = handle(self);
        while result.is_ok() {
            let Some(event) = self.stashed.take() else {
                break;
            };
            result = self.handle_event(Instant::now(), event);
        }
        if let Some(inbox) = self.inbox.take() {
            *rx = inbox;
        }
        result
    }

    /// Drain actions after construction (a resumed job may act at once).
    pub(crate) fn start(&mut self, now: Instant) -> Result<(), EngineError> {
        self.drain(now)?;
        self.write_status();
        Ok(())
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) -> Result<(), EngineError> {
        if self.status_due().is_some_and(|t| t <= now) {
            self.write_status();
        }
        // The timer may have been the status file's: the round machine
        // hears of time only when one of its own deadlines has passed.
        if self.runner.poll_timeout().is_some_and(|t| t <= now) {
            self.runner.handle(now, Input::Timeout);
        }
        self.finish_requested(now)?;
        self.drain(now)
    }

    pub(crate) fn handle_event(&mut self, now: Instant, event: Event) -> Result<(), EngineError> {
        match event {
            Event::Connected(c) => {
                tracing::info!(site = %c.site, conn = c.conn_id.0, "site connected");
                let (site, conn_id, capabilities) = self.links.connect(c);
                self.runner.handle(
                    now,
                    Input::SiteConnected {
                        site,
                        conn: conn_id,
                        capabilities,
                    },
                );
            }
            Event::Disconnected { site, conn_id } => {
                tracing::info!(site = %site, conn = conn_id.0, "site disconnected");
                if self.links.disconnect(&site, conn_id)
                    && let Some((req, _)) = self.requested.as_mut()
                {
                    req.handle_disconnect(site.as_str());
                    self.finish_requested(now)?;
                }
                self.runner.handle(
                    now,
                    Input::SiteDisconnected {
                        site,
                        conn: conn_id,
                    },
                );
            }
            Event::OfferResponse {
                site,
                round,
                accepted,
                reason,
            } => {
                let input = if accepted {
                    Input::OfferAccepted { site, round }
                } else {
                    tracing::info!(site = %site, round = round.0, reason = %reason, "offer declined");
                    self.note_declined(&site, round, &reason)?;
                    Input::OfferDeclined {
                        site,
                        round,
                        reason,
                    }
                };
                self.runner.handle(now, input);
            }
            Event::PrepareUpload {
                site,
                envelope,
                resume,
                reply,
            } => {
                let answer = if resume {
                    self.prepare_resume(&site, &envelope)
                } else {
                    self.prepare_upload(&site, &envelope)
                };
                if let Err((code, why)) = &answer {
                    if resume {
                        tracing::warn!(site = %site, ?code, reason = %why, "upload resume refused");
                    } else {
                        tracing::warn!(site = %site, ?code, reason = %why, "upload refused before payload");
                    }
                    let h = &envelope.header;
                    self.note_rejected(&site, &envelope, h.payload_len, why)?;
                }
                let _ = reply.send(answer);
            }
            Event::UploadInterrupted(it) => self.upload_interrupted(*it)?,
            Event::UpdateReady(ready) => self.update_ready(now, *ready)?,
            Event::EvalReport { site, report } => self.eval_report(now, &site, &report)?,
            Event::Keys(keys) => self.set_keys(keys),
            Event::RecheckPeers => self.recheck_peers(now),
            Event::Admin(ev) => self.handle_admin(now, ev)?,
        }
        self.drain(now)
    }

    pub(super) fn recheck_peers(&mut self, now: Instant) {
        for (site, conn) in self.links.recheck(&self.wire) {
            self.runner
                .handle(now, Input::SiteDisconnected { site, conn });
        }
    }

    /// Execute every pending action, in order.
    pub(super) fn drain(&mut self, now: Instant) -> Result<(), EngineError> {
        let mut next = self.runner.poll_action();
        while let Some(action) = next.take() {
            // A round's offers come in a row: their `offer.sent` entries are
            // one group commit (one fsync), then the offers go out.
            if let Action::SendOffer { site, offer } = action {
                let offers;
                (offers, next) = actions::offers_in_a_row(&mut self.runner, (site, offer));
                self.send_offers(offers)?;
                continue;
            }
            self.execute(now, action)?;
            next = self.runner.poll_action();
        }
        // Kept partial uploads that can no longer be resumed (their round
        // closed, their site was dropped from it) give back their disk.
        if !self.partials.is_empty() {
            let open_round = self.aggregator.as_ref().map(|(r, _)| *r);
            for spool in self.partials.prune(&self.runner, open_round) {
                let _ = std::fs::remove_file(spool);
            }
        }
        // An upload the runner neither acknowledged nor rejected (it cannot
        // happen with the current machine) must not hang its site.
        if !self.uploads.is_empty() {
            for refused in self.uploads.undecided(&self.facts, unix_ms()) {
                tracing::warn!(site = %refused.site, round = refused.round.0, "upload left undecided; refusing it");
                self.refused(refused)?;
            }
        }
        Ok(())
    }

    pub(super) fn execute(&mut self, now: Instant, action: Action) -> Result<(), EngineError> {
        match action {
            Action::Persist(cp) => {
                let plan = actions::checkpoint_plan(&cp);
                let optimizer = if plan.optimizer_state {
                    Some(
                        serde_json::to_vec(&PersistedState {
                            server: self.server_state.clone(),
                            scaling: self.scaling.clone(),
                        })
                        .map_err(|source| EngineError::Serialize {
                            what: "server state",
                            source,
                        })?,
                    )
                } else {
                    None
                };
                let replay = match &plan.commit_replay {
                    Some(key) => {
                        let (site, round) = key;
                        if let Some(p) = self.uploads.get(site, *round) {
                            self.replay.commit_header(&p.upload.envelope.header);
                        }
                        Some(serde_json::to_vec(&self.replay).map_err(|source| {
                            EngineError::Serialize {
                                what: "replay state",
                                source,
                            }
                        })?)
                    }
                    None => None,
                };
                let scope = self.job_id.as_str().to_owned();
                self.store
                    .persist(
                        self.job_id.as_str(),
                        &cp,
                        Extras {
                            optimizer_state: optimizer.as_deref(),
                            replay_state: replay.as_deref().map(|r| (scope.as_str(), r)),
                        },
                    )
                    .map_err(EngineError::Checkpoint)?;
                if let Some(round) = plan.opens_round {
                    self.open_round(round)?;
                }
                if plan.status_may_wait {
                    self.write_status_soon(now);
                } else {
                    self.write_status();
                }
            }
            Action::SendOffer { site, offer } => self.send_offers(vec![(site, offer)])?,
            Action::SendModel { site, round, model } => {
                tracing::debug!(site = %site, round = round.0, model = %model, "site may fetch the model");
            }
            Action::AckUpdate { site, round } => {
                let acked = self.uploads.acked(&site, round);
                match acked {
                    Some(acked) => self.ack(acked)?,
                    None => tracing::warn!(
                        site = site.as_str(),
                        round = round.0,
                        "ack for an upload that is not pending"
                    ),
                }
            }
            Action::RejectUpdate {
                site,
                round,
                reason,
            } => {
                tracing::warn!(site = %site, round = round.0, reason = %reason_text(&reason), "update rejected");
                let refused = self
                    .uploads
                    .rejected(&self.facts, &site, round, &reason, unix_ms());
                if let Some(refused) = refused {
                    self.refused(refused)?;
                }
            }
            Action::CancelTask { site, round } => {
                self.run_effects(actions::cancel_task(&self.facts, &site, round), None)?;
            }
            Action::Aggregate {
                round,
                base_model,
                updates,
            } => {
                self.take_queued_uploads(now, round)?;
                let result = tokio::task::block_in_place(|| self.aggregate(round, base_model))?;
                let input = match result {
                    Ok((model, metrics)) => {
                        tracing::info!(round = round.0, model = %model, updates = updates.len(), "round aggregated");
                        Input::AggregationDone {
                            round,
                            model,
                            metrics,
                        }
                    }
                    Err(why) => {
                        let reason = why.to_string();
                        tracing::error!(round = round.0, reason = %reason, "aggregation failed");
                        Input::AggregationFailed { round, reason }
                    }
                };
                self.runner.handle(now, input);
            }
            Action::Evaluate { round, model } => {
                tracing::info!(round = round.0, model = %model, "global model ready for evaluation");
            }
            Action::Disconnect { site, conn, reason } => {
                self.links
                    .close(&site, conn, actions::close_reason(&reason));
            }
            Action::JobFinished(outcome) => {
                tracing::info!(outcome = ?outcome, "job finished");
                let sites = self
                    .links
                    .connected()
                    .into_iter()
                    .map(|site| Connected {
                        protocol_version: self.links.protocol_version(&site),
                        site,
                    })
                    .collect();
                let end = actions::job_finished(
                    &self.facts,
                    Finishing {
                        outcome: outcome.clone(),
                        open_round: self.round_log.take().map(|l| l.round),
                        completed_rounds: self.runner.completed_rounds(),
                        sites,
                        next_queued: self.wire.admin.next_queued().is_some(),
                        evaluation: FinalEvaluation {
                            rounds: u64::from(self.job.rounds),
                            every_rounds: self.job.evaluation.every_rounds,
                            arch: self.job.arch.clone(),
                            scaling: self.scaling.scaling().cloned(),
                            deadline: now + self.job.deadline(),
                        },
                    },
                );
                for c in &end.not_asked {
                    tracing::info!(
                        site = %c.site,
                        protocol_version = ?c.protocol_version,
                        "not asked to evaluate the final model: its protocol version has no evaluation requests"
                    );
                }
                let asked = end
                    .effects
                    .iter()
                    .filter(|e| {
                        matches!(
                            e,
                            Effect::Send {
                                message: Message::EvalRequest(_),
                                ..
                            }
                        )
                    })
                    .count();
                self.run_effects(end.effects, None)?;
                // A completed job's final model: the sites were asked to
                // evaluate it, and the job ends when they have answered.
                if let Some(req) = end.requested {
                    tracing::info!(
                        sites = asked,
                        model = %req.expected().model,
                        "sites asked to evaluate the final model"
                    );
                    self.requested = Some((req, outcome));
                    self.write_status();
                }
            }
        }
        Ok(())
    }

    /// Execute the core's effects for the running job in order (see
    /// [`actions`]) with the one executor ([`effects::execute`]); an audit
    /// append that fails stops there (fatal: nothing after it is done).
    /// `pending`: the upload that [`Effect::DiscardSpool`] and
    /// [`Effect::AnswerUpload`] are about.
    pub(super) fn run_effects(
        &mut self,
        effects: Vec<Effect>,
        mut pending: Option<Held>,
    ) -> Result<(), EngineError> {
        let (wire, store) = (self.wire.clone(), self.store.clone());
        effects::execute(wire.audit(), &store, effects, EngineError::from, |e| {
            self.run_effect(e, &mut pending);
            Ok(())
        })
    }

    /// Execute one effect of the running job's that is not an audit append
    /// (those are [`effects::execute`]'s): each is best effort.
    pub(super) fn run_effect(&mut self, effect: Effect, pending: &mut Option<Held>) {
        match effect {
            Effect::Send { site, message } => self.send(&site, message),
            Effect::PushHead { sites } => self.push_head(&sites),
            Effect::RecordRejected { round, rejected } => {
                let site = rejected.site.clone();
                if let Err(e) = self
                    .store
                    .record_rejected(self.job_id.as_str(), round, rejected)
                {
                    tracing::debug!(site, error = %e, "the refused update's round has no record");
                }
            }
            Effect::RecordAccepted { round, detail } => {
                let site = detail.site.clone();
                if let Err(e) = self
                    .store
                    .record_update_detail(self.job_id.as_str(), round, detail)
                {
                    tracing::warn!(site, round = round.0, error = %e, "recording the update's details");
                }
            }
            Effect::DiscardSpool { .. } => {
                if let Some(p) = pending {
                    let _ = std::fs::remove_file(&p.upload.spool_path);
                }
            }
            Effect::RetractFold { site, .. } => {
                if let Some(p) = pending {
                    self.retract(&site, p);
                }
            }
            Effect::AnswerUpload { result, .. } => {
                if let Some(p) = pending.take() {
                    let _ = p.reply.send(result);
                }
            }
            Effect::RecordFinalEvaluation { round, evaluation } => {
                if let Err(e) = self.store.record_final_evaluation(
                    self.job_id.as_str(),
                    round,
                    evaluation.clone(),
                ) {
                    tracing::warn!(round = round.0, error = %e, "recording the final model's evaluation");
                }
                // The status file keeps completed rounds as they were
                // shown: this one gains its final evaluation.
                if let Some(shown) = self.status_final.iter_mut().find(|r| r.round == round.0) {
                    shown.final_evaluation = Some(evaluation.clone());
                }
                self.latest_evaluation = Some(evaluation);
            }
            Effect::Finish(outcome) => {
                // The serve loop sees the outcome and moves on.
                self.outcome = Some(outcome);
                self.write_status();
            }
            other => tracing::error!(?other, "not an effect of the round's actions; ignored"),
        }
    }

    /// Send the coordinator's signed audit head (as of now) to `sites` that
    /// are connected (a site whose protocol has no audit heads is skipped by
    /// its connection's writer). The site records it; best effort: a site
    /// not connected now gets a later head with its next exchange.
    pub(super) fn push_head(&self, sites: &[SiteId]) {
        match self.wire.audit().head_message() {
            Ok(head) => {
                for site in sites {
                    self.send(site, Message::AuditHead(head));
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot sign the coordinator's audit head"),
        }
    }

    /// A round's offers (the round machine emits them in a row), as the
    /// core orders them ([`actions::send_offers`]): every `offer.sent` in
    /// one group commit (one fsync), then the offers.
    pub(super) fn send_offers(
        &mut self,
        offers: Vec<(SiteId, crate::round::Offer)>,
    ) -> Result<(), EngineError> {
        let terms = OfferTerms::of(
            &self.job,
            &self.facts,
            &self.strategy,
            self.scaling.scaling().cloned(),
        )?;
        let effects = actions::send_offers(&self.facts, &terms, &self.clock, &offers);
        self.run_effects(effects, None)
    }

    /// Queue `msg` on `site`'s control stream (see [`Links::send`]).
    pub(super) fn send(&self, site: &SiteId, msg: Message) {
        self.links.send(site, msg);
    }

    /// Drop every connection (shutdown).
    pub(crate) fn close_all(&mut self) {
        self.links.close_all();
    }
}

/// Run `engine` until shutdown (`Ok(None)`), until its job has finished
/// and `exit_after_job` is set with no job queued (`Ok(None)`), or until
/// its job has finished and a queued job should start (`Ok(Some(id))`).
pub(crate) async fn run_engine<F: Future<Output = ()>>(
    engine: &mut Engine,
    rx: &mut mpsc::Receiver<Event>,
    exit_after_job: bool,
    shared: &Shared,
    mut shutdown: std::pin::Pin<&mut F>,
) -> Result<Option<String>, EngineError> {
    engine.with_inbox(rx, |e| e.start(Instant::now()))?;
    // The deadline last fired: a machine that answers a timeout with the
    // same deadline again is not woken in a loop.
    let mut fired: Option<Instant> = None;
    loop {
        if engine.outcome().is_some() {
            match jobs::after_finish(shared.admin.next_queued(), exit_after_job) {
                AfterFinish::Switch(next) => return Ok(Some(next)),
                AfterFinish::Exit => return Ok(None),
                AfterFinish::Stay => {}
            }
        }
        let timer = engine.poll_timeout().filter(|t| Some(*t) != fired);
        tokio::select! {
            () = &mut shutdown => return Ok(None),
            ev = rx.recv() => {
                let Some(ev) = ev else { return Ok(None) };
                engine.with_inbox(rx, |e| e.handle_event(Instant::now(), ev))?;
            }
            () = sleep_until(timer) => {
                fired = timer;
                engine.with_inbox(rx, |e| e.handle_timeout(Instant::now()))?;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}
