//! The engine: one task that owns the job's round machine, the store, the
//! round's aggregator and the replay guard, and executes the machine's
//! actions in order. Connection tasks talk to it with [`Event`]s.
//!
//! Heavy work stays off the engine where it can: connection tasks receive,
//! hash, spool and validate uploads (pass 1) on their own; the engine only
//! folds an accepted update (pass 2, reading the spool chunk by chunk) and
//! aggregates, both inside `block_in_place`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::VerifyingKey;
use fedlink_aggregation::dp::NoiseRng;
use fedlink_aggregation::round::{RoundAggregator, ServerState};
use fedlink_aggregation::validate::{UpdateValidator, ValidatedUpdate};
use fedlink_aggregation::{StrategyConfig, would_fit};
use fedlink_protocol::envelope::{ExpectedUpdate, PayloadVerifier, SignedEnvelope, verify_update};
use fedlink_protocol::message::{
    Cancel, Optimizer, PrivacyRequirements, RejectCode, TaskOffer, TrainingConfig, UploadResult,
};
use fedlink_protocol::{
    EvalMetrics, FederationId, FlatModel, JobId, Message, ModelHash, ReplayGuard, RoundId, SiteId,
    VerifyError,
};
use quinn::Connection;
use tokio::sync::{mpsc, oneshot};

use super::scaling::{FederatedScaling, PersistedState, Report};
use super::spool;
use super::status::{RoundStatus, Status, StatusWriter};
use crate::job::{Job, LocalOptimizer};
use crate::round::{
    Action, ConnId, DisconnectReason, Input, JobOutcome, JobRunner, RejectReason, SiteCapabilities,
    UpdateReceived, Verdict,
};
use crate::store::{Extras, Store};

/// Something a connection task tells the engine.
#[derive(Debug)]
pub(crate) enum Event {
    /// A site completed Hello/Welcome.
    Connected {
        site: String,
        conn_id: ConnId,
        conn: Connection,
        control: mpsc::UnboundedSender<Message>,
        capabilities: SiteCapabilities,
    },
    /// A site's connection ended.
    Disconnected { site: String, conn_id: ConnId },
    /// A site answered an offer.
    OfferResponse {
        site: String,
        round: u64,
        accepted: bool,
        reason: String,
    },
    /// A site wants to upload: verify the signed envelope first.
    PrepareUpload {
        site: String,
        envelope: Box<SignedEnvelope>,
        reply: oneshot::Sender<Result<UploadTicket, (RejectCode, String)>>,
    },
    /// An upload arrived completely and went through pass 1.
    UpdateReady(Box<UpdateReady>),
    /// The site manifest changed: the update keys to use from now on.
    Keys(BTreeMap<SiteId, VerifyingKey>),
    /// The manifest or the revocation list changed: re-check every open
    /// connection.
    RecheckPeers,
}

/// What a connection task needs to receive one upload.
#[derive(Debug)]
pub(crate) struct UploadTicket {
    pub(crate) verifier: PayloadVerifier,
    pub(crate) validator: UpdateValidator,
    pub(crate) spec: fedlink_protocol::ModelSpec,
    pub(crate) spool_path: PathBuf,
}

/// The result of receiving and checking an upload.
#[derive(Debug)]
pub(crate) struct UpdateReady {
    pub(crate) site: String,
    pub(crate) envelope: SignedEnvelope,
    pub(crate) spool_path: PathBuf,
    pub(crate) bytes: u64,
    /// Pass 1: the validated token, or why the update is invalid.
    pub(crate) check: Result<ValidatedUpdate, String>,
    pub(crate) reply: oneshot::Sender<UploadResult>,
}

#[derive(Debug)]
struct SiteConn {
    conn_id: ConnId,
    conn: Connection,
    control: mpsc::UnboundedSender<Message>,
}

#[derive(Debug)]
struct Pending {
    envelope: SignedEnvelope,
    spool_path: PathBuf,
    token: Option<ValidatedUpdate>,
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
    pub(crate) noise: NoiseRng,
    /// Where new model versions are published in wire form.
    pub(crate) wire: Arc<super::Shared>,
    pub(crate) models_dir: PathBuf,
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
    aggregator: Option<(u64, RoundAggregator)>,
    federation: FederationId,
    keys: BTreeMap<SiteId, VerifyingKey>,
    replay: ReplayGuard,
    sites: HashMap<String, SiteConn>,
    pending: HashMap<(String, u64), Pending>,
    round_metrics: BTreeMap<u64, Vec<(String, EvalMetrics)>>,
    /// Feature statistics of the round's accepted updates.
    round_stats: BTreeMap<u64, Vec<Report>>,
    status: StatusWriter,
    noise: NoiseRng,
    wire: Arc<super::Shared>,
    models_dir: PathBuf,
    /// Monotonic instant paired with a wall-clock time, to turn deadlines
    /// into the Unix milliseconds sites see.
    clock_base: (Instant, u64),
    outcome: Option<JobOutcome>,
}

/// Unix milliseconds now (wall clock; only for messages and records).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Engine {
    pub(crate) fn new(parts: EngineParts, now: Instant) -> Result<Self, String> {
        let job_id = JobId::new(&parts.job.id).map_err(|e| format!("job id: {e}"))?;
        Ok(Self {
            job_id,
            runner: parts.runner,
            store: parts.store,
            strategy: parts.strategy,
            server_state: parts.server_state,
            scaling: parts.scaling,
            global_hash: parts.global.hash(),
            global_spec: parts.global.into_parts().0,
            aggregator: None,
            federation: parts.federation,
            keys: parts.keys,
            replay: parts.replay,
            sites: HashMap::new(),
            pending: HashMap::new(),
            round_metrics: BTreeMap::new(),
            round_stats: BTreeMap::new(),
            status: parts.status,
            noise: parts.noise,
            wire: parts.wire,
            models_dir: parts.models_dir,
            clock_base: (now, unix_ms()),
            outcome: None,
            job: parts.job,
        })
    }

    /// How the job ended, once it has.
    pub(crate) fn outcome(&self) -> Option<&JobOutcome> {
        self.outcome.as_ref()
    }

    /// When the round machine wants to be woken.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.runner.poll_timeout()
    }

    /// Replace the update keys (manifest reloaded).
    pub(crate) fn set_keys(&mut self, keys: BTreeMap<SiteId, VerifyingKey>) {
        self.keys = keys;
    }

    fn to_unix_ms(&self, at: Instant) -> u64 {
        let (base, base_ms) = self.clock_base;
        if at >= base {
            base_ms.saturating_add(at.duration_since(base).as_millis() as u64)
        } else {
            base_ms.saturating_sub(base.duration_since(at).as_millis() as u64)
        }
    }

    /// Drain actions after construction (a resumed job may act at once).
    pub(crate) fn start(&mut self, now: Instant) -> Result<(), EngineError> {
        self.drain(now)?;
        self.write_status();
        Ok(())
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) -> Result<(), EngineError> {
        self.runner.handle(now, Input::Timeout);
        self.drain(now)
    }

    pub(crate) fn handle_event(&mut self, now: Instant, event: Event) -> Result<(), EngineError> {
        match event {
            Event::Connected {
                site,
                conn_id,
                conn,
                control,
                capabilities,
            } => {
                tracing::info!(site = %site, conn = conn_id.0, "site connected");
                if let Some(old) = self.sites.insert(
                    site.clone(),
                    SiteConn {
                        conn_id,
                        conn,
                        control,
                    },
                ) {
                    old.conn.close(
                        fedlink_transport::close::REPLACED,
                        b"a newer connection of this site replaced this one",
                    );
                }
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
                if self.sites.get(&site).is_some_and(|s| s.conn_id == conn_id) {
                    self.sites.remove(&site);
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
                    tracing::info!(site = %site, round, reason = %reason, "offer declined");
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
                reply,
            } => {
                let answer = self.prepare_upload(&site, &envelope);
                if let Err((code, why)) = &answer {
                    tracing::warn!(site = %site, ?code, reason = %why, "upload refused before payload");
                }
                let _ = reply.send(answer);
            }
            Event::UpdateReady(ready) => self.update_ready(now, *ready),
            Event::Keys(keys) => self.set_keys(keys),
            Event::RecheckPeers => self.recheck_peers(now),
        }
        self.drain(now)
    }

    fn recheck_peers(&mut self, now: Instant) {
        let refused: Vec<(String, ConnId, String)> = self
            .sites
            .iter()
            .filter_map(|(site, c)| {
                self.wire
                    .check_open_peer(&c.conn)
                    .err()
                    .map(|why| (site.clone(), c.conn_id, why))
            })
            .collect();
        for (site, conn_id, why) in refused {
            tracing::warn!(site = %site, reason = %why, "closing the connection of a site that is no longer allowed");
            if let Some(c) = self.sites.remove(&site) {
                c.conn
                    .close(fedlink_transport::close::FORBIDDEN, why.as_bytes());
            }
            self.runner.handle(
                now,
                Input::SiteDisconnected {
                    site,
                    conn: conn_id,
                },
            );
        }
    }

    fn prepare_upload(
        &mut self,
        site: &str,
        envelope: &SignedEnvelope,
    ) -> Result<UploadTicket, (RejectCode, String)> {
        let h = &envelope.header;
        if let Err(reason) = self.runner.check_upload(site, h.round.0) {
            return Err((reject_code(&reason), reason_text(&reason)));
        }
        let Some((round, agg)) = self.aggregator.as_ref() else {
            return Err((RejectCode::UnexpectedMessage, "no round is open".into()));
        };
        let authenticated =
            SiteId::new(site).map_err(|e| (RejectCode::UnknownSite, e.to_string()))?;
        let expected = ExpectedUpdate {
            federation_id: self.federation.clone(),
            job_id: self.job_id.clone(),
            round: RoundId(*round),
            base_model: self.runner.current_model(),
            encoding: self.job.encoding.to_protocol().ok(),
            max_payload_len: fedlink_protocol::payload::max_payload_len(
                &self.global_spec,
                &h.encoding,
            ),
        };
        let verifier = verify_update(
            envelope,
            &authenticated,
            &self.keys,
            &expected,
            &mut self.replay,
        )
        .map_err(|e| (verify_code(&e), e.to_string()))?;
        let spool_dir = self.store.dir().join("spool");
        std::fs::create_dir_all(&spool_dir)
            .map_err(|e| (RejectCode::Internal, format!("spool directory: {e}")))?;
        let spool_path = spool_dir.join(format!(
            "{}-r{}-{}.part",
            site,
            round,
            hex::encode(h.nonce.0)
        ));
        Ok(UploadTicket {
            verifier,
            validator: agg.validator(site, h.num_examples),
            spec: self.global_spec.clone(),
            spool_path,
        })
    }

    fn update_ready(&mut self, now: Instant, ready: UpdateReady) {
        let UpdateReady {
            site,
            envelope,
            spool_path,
            bytes,
            check,
            reply,
        } = ready;
        let h = &envelope.header;
        let round = h.round.0;
        let verdict = match &check {
            Ok(_) => Verdict::Valid,
            Err(why) => Verdict::Invalid(why.clone()),
        };
        let received = UpdateReceived {
            site: site.clone(),
            round,
            base_model: h.base_model,
            payload_hash: ModelHash(h.payload_hash.0),
            num_examples: h.num_examples,
            bytes,
            received_unix_ms: unix_ms(),
            verdict,
        };
        if let Some(old) = self.pending.insert(
            (site.clone(), round),
            Pending {
                envelope: envelope.clone(),
                spool_path,
                token: check.ok(),
                reply,
            },
        ) {
            // A second upload of the same site and round raced the first:
            // refuse the older one; the runner decides about the newer.
            let _ = std::fs::remove_file(&old.spool_path);
            let _ = old.reply.send(UploadResult::Reject {
                code: RejectCode::Replay,
                message: "superseded by another upload of this site for this round".into(),
            });
        }
        self.runner.handle(now, Input::UpdateReceived(received));
    }

    /// Execute every pending action, in order.
    fn drain(&mut self, now: Instant) -> Result<(), EngineError> {
        while let Some(action) = self.runner.poll_action() {
            self.execute(now, action)?;
        }
        // An upload the runner neither acknowledged nor rejected (it cannot
        // happen with the current machine) must not hang its site.
        for ((site, round), p) in self.pending.drain() {
            tracing::warn!(site = %site, round, "upload left undecided; refusing it");
            let _ = std::fs::remove_file(&p.spool_path);
            let _ = p.reply.send(UploadResult::Reject {
                code: RejectCode::Internal,
                message: "the coordinator did not decide on this upload".into(),
            });
        }
        Ok(())
    }

    fn execute(&mut self, now: Instant, action: Action) -> Result<(), EngineError> {
        match action {
            Action::Persist(cp) => {
                let optimizer = match &cp {
                    crate::round::Checkpoint::RoundCompleted { .. } => Some(
                        serde_json::to_vec(&PersistedState {
                            server: self.server_state.clone(),
                            scaling: self.scaling.clone(),
                        })
                        .map_err(|e| EngineError::Fatal(format!("server state: {e}")))?,
                    ),
                    _ => None,
                };
                let replay = match &cp {
                    crate::round::Checkpoint::UpdateAccepted(_) => Some(
                        serde_json::to_vec(&self.replay)
                            .map_err(|e| EngineError::Fatal(format!("replay state: {e}")))?,
                    ),
                    _ => None,
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
                    .map_err(|e| EngineError::Fatal(format!("persisting a checkpoint: {e}")))?;
                if let crate::round::Checkpoint::RoundStarted { round, .. } = &cp {
                    self.open_round(*round)?;
                }
                self.write_status();
            }
            Action::SendOffer { site, offer } => {
                let msg = Message::TaskOffer(Box::new(self.task_offer(
                    offer.round,
                    offer.model,
                    offer.deadline,
                )?));
                self.send(&site, msg);
            }
            Action::SendModel { site, round, model } => {
                tracing::debug!(site = %site, round, model = %model, "site may fetch the model");
            }
            Action::AckUpdate { site, round } => self.ack(&site, round),
            Action::RejectUpdate {
                site,
                round,
                reason,
            } => {
                tracing::warn!(site = %site, round, reason = %reason_text(&reason), "update rejected");
                if let Some(p) = self.pending.remove(&(site.clone(), round)) {
                    let _ = std::fs::remove_file(&p.spool_path);
                    let _ = p.reply.send(UploadResult::Reject {
                        code: reject_code(&reason),
                        message: reason_text(&reason),
                    });
                }
            }
            Action::CancelTask { site, round } => {
                let msg = Message::Cancel(Cancel {
                    job_id: self.job_id.clone(),
                    round: RoundId(round),
                    reason: "the round closed".into(),
                });
                self.send(&site, msg);
            }
            Action::Aggregate {
                round,
                base_model,
                updates,
            } => {
                let result = tokio::task::block_in_place(|| self.aggregate(round, base_model));
                let input = match result {
                    Ok((model, metrics)) => {
                        tracing::info!(round, model = %model, updates = updates.len(), "round aggregated");
                        Input::AggregationDone {
                            round,
                            model,
                            metrics,
                        }
                    }
                    Err(reason) => {
                        tracing::error!(round, reason = %reason, "aggregation failed");
                        Input::AggregationFailed { round, reason }
                    }
                };
                self.runner.handle(now, input);
            }
            Action::Evaluate { round, model } => {
                tracing::info!(round, model = %model, "global model ready for evaluation");
            }
            Action::Disconnect { site, conn, reason } => {
                if let Some(s) = self.sites.get(&site)
                    && s.conn_id == conn
                {
                    let (code, text): (_, &[u8]) = match reason {
                        DisconnectReason::NotAllowed => (
                            fedlink_transport::close::FORBIDDEN,
                            b"this site is not allowed in the job",
                        ),
                        _ => (
                            fedlink_transport::close::REPLACED,
                            b"replaced by a newer connection",
                        ),
                    };
                    s.conn.close(code, text);
                    self.sites.remove(&site);
                }
            }
            Action::JobFinished(outcome) => {
                tracing::info!(?outcome, "job finished");
                for s in self.sites.values() {
                    let _ = s.control.send(Message::Bye(fedlink_protocol::Bye {
                        reason: "job finished".into(),
                    }));
                }
                self.outcome = Some(outcome);
                self.write_status();
            }
        }
        Ok(())
    }

    fn send(&self, site: &str, msg: Message) {
        match self.sites.get(site) {
            Some(s) => {
                if s.control.send(msg).is_err() {
                    tracing::debug!(site, "site's control stream is gone");
                }
            }
            None => tracing::debug!(site, "site not connected; message dropped"),
        }
    }

    fn open_round(&mut self, round: u64) -> Result<(), EngineError> {
        if self.aggregator.as_ref().is_some_and(|(r, _)| *r == round) {
            return Ok(());
        }
        let max_sites = self.job.max_sites() as usize;
        let agg = RoundAggregator::new(
            &self.strategy,
            Arc::new(self.global_spec.clone()),
            max_sites,
            &self.server_state,
        )
        .map_err(|e| EngineError::Fatal(format!("cannot open round {round}: {e}")))?;
        self.aggregator = Some((round, agg));
        self.round_metrics.remove(&round);
        self.round_stats.remove(&round);
        self.replay
            .prune_before(&self.federation, &self.job_id, RoundId(round));
        Ok(())
    }

    fn ack(&mut self, site: &str, round: u64) {
        let Some(p) = self.pending.remove(&(site.to_owned(), round)) else {
            tracing::warn!(site, round, "ack for an upload that is not pending");
            return;
        };
        let folded = tokio::task::block_in_place(|| self.fold(&p));
        match folded {
            Ok(()) => {
                let h = &p.envelope.header;
                if let Some(m) = &h.metrics {
                    self.round_metrics
                        .entry(round)
                        .or_default()
                        .push((site.to_owned(), m.clone()));
                }
                if let Some(stats) = &h.feature_stats {
                    self.round_stats.entry(round).or_default().push(Report {
                        site: site.to_owned(),
                        num_examples: h.num_examples,
                        stats: stats.clone(),
                    });
                }
                let archived = archive(&self.store, &self.job_id, round, site, &p);
                if let Err(e) = archived {
                    tracing::error!(site, round, error = %e, "archiving the accepted update failed");
                }
                let _ = p.reply.send(UploadResult::Ack {
                    payload_hash: p.envelope.header.payload_hash,
                    accepted: true,
                });
            }
            Err(e) => {
                // The runner already counted it: this only happens if the
                // spool vanished or the aggregator refused a token. Fail
                // loudly; the round result would be wrong otherwise.
                tracing::error!(site, round, error = %e, "folding an accepted update failed");
                let _ = p.reply.send(UploadResult::Reject {
                    code: RejectCode::Internal,
                    message: format!("the coordinator could not fold the update: {e}"),
                });
            }
        }
    }

    fn fold(&mut self, p: &Pending) -> Result<(), String> {
        let token = p.token.as_ref().ok_or("update has no validation token")?;
        let Some((_, agg)) = self.aggregator.as_mut() else {
            return Err("no aggregator for the round".into());
        };
        let spec = agg.spec().clone();
        let encoding = p.envelope.header.encoding;
        let mut sink = agg.begin(token).map_err(|e| e.to_string())?;
        let r = spool::for_each_chunk(&p.spool_path, &spec, encoding, |offset, values| {
            sink.chunk(offset, values);
            Ok(())
        });
        sink.finish();
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e.to_string()),
        }
    }

    fn aggregate(
        &mut self,
        round: u64,
        base_model: ModelHash,
    ) -> Result<(ModelHash, BTreeMap<String, f64>), String> {
        let Some((r, agg)) = self.aggregator.take() else {
            return Err(format!("no aggregator for round {round}"));
        };
        if r != round {
            return Err(format!("aggregator is for round {r}, not {round}"));
        }
        if self.global_hash != base_model {
            return Err("the base model is not the current global model".into());
        }
        let mut state = self.server_state.clone();
        let outcome = agg
            .finish(&mut state, &mut self.noise)
            .map_err(|e| e.to_string())?;
        if *outcome.update.spec() != self.global_spec {
            return Err("the aggregate does not have the model's spec".into());
        }
        // The accumulator is gone; only now read the base model back (its
        // hash is verified) and apply the update in place.
        let mut next = self
            .store
            .load_model(&base_model)
            .map_err(|e| e.to_string())?;
        outcome.apply_to(&mut next).map_err(|e| e.to_string())?;
        drop(outcome.update);
        let hash = self.store.put_model(&next).map_err(|e| e.to_string())?;
        // Publish the wire form before the round machine hears of the new
        // model: its next offers name it, and sites fetch it at once.
        let wire = super::wire::ensure(&self.models_dir, &next)?;
        self.wire.publish_wire(wire);
        drop(next);
        self.global_hash = hash;
        let mut metrics = BTreeMap::new();
        metrics.insert("num_updates".into(), outcome.num_updates as f64);
        metrics.insert("total_examples".into(), outcome.total_examples as f64);
        metrics.insert("num_clipped".into(), outcome.num_clipped as f64);
        if let Some(c) = outcome.clip_norm {
            metrics.insert("clip_norm".into(), c);
        }
        if outcome.noise_std > 0.0 {
            metrics.insert("noise_std".into(), outcome.noise_std);
        }
        if let Some((eps, delta)) = outcome.privacy {
            metrics.insert("dp_epsilon".into(), eps);
            metrics.insert("dp_delta".into(), delta);
        }
        // Federated evaluation of the round's base model on the sites'
        // local validation splits, weighted by their sizes.
        if let Some(ms) = self.round_metrics.remove(&round) {
            for (name, pick) in [
                (
                    "site_eval_loss",
                    (|m: &EvalMetrics| m.loss) as fn(&EvalMetrics) -> Option<f64>,
                ),
                ("site_eval_accuracy", |m: &EvalMetrics| m.accuracy),
                ("site_eval_auc", |m: &EvalMetrics| m.auc),
                ("site_eval_dice", |m: &EvalMetrics| m.dice),
            ] {
                let (mut s, mut n) = (0.0, 0.0);
                for (_, m) in &ms {
                    if let Some(v) = pick(m)
                        && v.is_finite()
                    {
                        s += v * m.num_eval_examples as f64;
                        n += m.num_eval_examples as f64;
                    }
                }
                if n > 0.0 {
                    metrics.insert(name.into(), s / n);
                }
            }
        }
        // The sites' feature statistics of this round update the scaling
        // that the next rounds' offers carry (persisted with the round).
        let reports = self.round_stats.remove(&round).unwrap_or_default();
        let scaling = self.scaling.with_round(&reports);
        if scaling.scaling() != self.scaling.scaling()
            && let Some(s) = scaling.scaling()
        {
            tracing::info!(
                round,
                features = s.features.len(),
                sites = scaling.sites().count(),
                "federated feature scaling updated"
            );
        }
        self.scaling = scaling;
        self.server_state = state;
        Ok((hash, metrics))
    }

    fn task_offer(
        &self,
        round: u64,
        model: ModelHash,
        deadline: Instant,
    ) -> Result<TaskOffer, EngineError> {
        let t = &self.job.training;
        let optimizer = match t.optimizer {
            LocalOptimizer::Adam => Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
            },
            _ => Optimizer::Sgd { momentum: 0.0 },
        };
        let encoding = self
            .job
            .encoding
            .to_protocol()
            .map_err(|e| EngineError::Fatal(format!("job encoding: {e}")))?;
        let p = &self.job.privacy;
        Ok(TaskOffer {
            federation_id: self.federation.clone(),
            job_id: self.job_id.clone(),
            round: RoundId(round),
            base_model: model,
            arch: self.job.arch.clone(),
            training: TrainingConfig {
                epochs: t.epochs,
                batch_size: t.batch_size,
                optimizer,
                learning_rate: t.learning_rate,
                fedprox_mu: t.fedprox_mu,
                seed: self.job.seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            },
            encoding,
            // Sites clip locally too; the job's noise multiplier is central
            // DP, added once by the coordinator's aggregator — never asked
            // of the sites as well (that would add the noise twice).
            privacy: PrivacyRequirements {
                clip_norm: p.clip_norm,
                dp: None,
            },
            deadline_unix_ms: self.to_unix_ms(deadline),
            scaling: self.scaling.scaling().cloned(),
        })
    }

    fn write_status(&self) {
        let phase = format!("{:?}", self.runner.phase());
        let rounds = match self.store.rounds(self.job_id.as_str()) {
            Ok(rs) => rs
                .into_iter()
                .map(|r| RoundStatus {
                    round: r.round,
                    state: format!("{:?}", r.state),
                    model: r.model.map(|m| m.to_hex()),
                    updates: r
                        .accepted
                        .iter()
                        .map(|u| (u.site.clone(), u.bytes, u.num_examples))
                        .collect(),
                    metrics: r.metrics.clone(),
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading rounds for the status file");
                Vec::new()
            }
        };
        let status = Status {
            job: self.job_id.as_str().to_owned(),
            phase,
            completed_rounds: self.runner.completed_rounds(),
            total_rounds: u64::from(self.job.rounds),
            current_model: self.runner.current_model().to_hex(),
            connected_sites: {
                let mut s: Vec<String> = self.sites.keys().cloned().collect();
                s.sort();
                s
            },
            finished: self.outcome.as_ref().map(|o| format!("{o:?}")),
            completed: matches!(self.outcome, Some(JobOutcome::Completed { .. })),
            rounds,
            scaling: self.scaling.scaling().cloned(),
            updated_unix_ms: unix_ms(),
        };
        if let Err(e) = self.status.write(&status) {
            tracing::warn!(error = %e, "writing the status file");
        }
    }

    /// Drop every connection (shutdown).
    pub(crate) fn close_all(&mut self) {
        for s in self.sites.values() {
            s.conn.close(
                fedlink_transport::close::SHUTDOWN,
                b"coordinator shutting down",
            );
        }
        self.sites.clear();
    }
}

/// Check that a strategy fits the job before starting.
pub(crate) fn check_fits(
    strategy: &StrategyConfig,
    job: &Job,
    spec: &fedlink_protocol::ModelSpec,
) -> Result<(), String> {
    would_fit(strategy, job.max_sites() as usize, spec).map_err(|e| e.to_string())
}

fn archive(store: &Store, job: &JobId, round: u64, site: &str, p: &Pending) -> std::io::Result<()> {
    let dir = store
        .dir()
        .join("updates")
        .join(job.as_str())
        .join(format!("round-{round:06}"));
    std::fs::create_dir_all(&dir)?;
    // The nonce makes every upload's name unique: a site re-sending the
    // same bytes after a crash keeps both signed envelopes.
    let base = format!(
        "{site}-{}-{}",
        p.envelope.header.payload_hash.to_hex(),
        hex::encode(p.envelope.header.nonce.0)
    );
    let envelope = serde_json::to_vec_pretty(&p.envelope).map_err(std::io::Error::other)?;
    std::fs::write(dir.join(format!("{base}.envelope.json")), envelope)?;
    std::fs::rename(&p.spool_path, dir.join(format!("{base}.payload")))?;
    Ok(())
}

/// A fatal engine error: the coordinator stops (and recovers on restart).
#[derive(Debug, thiserror::Error)]
pub(crate) enum EngineError {
    #[error("{0}")]
    Fatal(String),
}

fn reason_text(r: &RejectReason) -> String {
    match r {
        RejectReason::Duplicate => "this site already reported in this round".into(),
        RejectReason::RoundClosed => "the round is closed".into(),
        RejectReason::WrongRound => "no such round is open".into(),
        RejectReason::NotSelected => "this site was not selected for the round".into(),
        RejectReason::UnknownSite => "unknown site".into(),
        RejectReason::StaleModel => "the update was trained on another model".into(),
        RejectReason::JobNotRunning => "the job is not running".into(),
        RejectReason::Invalid(why) => format!("invalid update: {why}"),
    }
}

fn reject_code(r: &RejectReason) -> RejectCode {
    match r {
        RejectReason::Duplicate => RejectCode::Replay,
        RejectReason::RoundClosed => RejectCode::TooLate,
        RejectReason::WrongRound | RejectReason::StaleModel => RejectCode::ContextMismatch,
        RejectReason::NotSelected => RejectCode::NotAuthorized,
        RejectReason::UnknownSite => RejectCode::UnknownSite,
        RejectReason::JobNotRunning => RejectCode::UnexpectedMessage,
        _ => RejectCode::Malformed,
    }
}

fn verify_code(e: &VerifyError) -> RejectCode {
    match e {
        VerifyError::UnsupportedVersion(_) => RejectCode::UnsupportedVersion,
        VerifyError::IdentityMismatch { .. } | VerifyError::UnknownSite(_) => {
            RejectCode::UnknownSite
        }
        VerifyError::BadSignature => RejectCode::BadSignature,
        VerifyError::FederationMismatch { .. } => RejectCode::WrongFederation,
        VerifyError::NonceReplayed(_)
        | VerifyError::RoundReplayed { .. }
        | VerifyError::TooManyAttempts(_) => RejectCode::Replay,
        VerifyError::PayloadLengthMismatch { .. }
        | VerifyError::PayloadHashMismatch
        | VerifyError::PayloadTooLarge { .. } => RejectCode::PayloadMismatch,
        VerifyError::BadFeatureStats(_) => RejectCode::Malformed,
        _ => RejectCode::ContextMismatch,
    }
}

/// Map a payload-verification failure to its reject code (used by the
/// connection task after streaming).
pub(crate) fn payload_verify_code(e: &VerifyError) -> RejectCode {
    verify_code(e)
}
