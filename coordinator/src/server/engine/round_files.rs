//! The round end's files and the status file, written by the engine: a
//! round's archive directory (inputs, accepted updates, round file), its
//! pruning, the declined/rejected notes and `status.json`. File I/O only;
//! what to write is decided by the core (`core::round_end`, `core::actions`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fedlink_protocol::envelope::SignedEnvelope;
use fedlink_protocol::{Encoding, FlatModel, ModelHash, RoundId, SiteId};

use super::{AggregationFailure, Engine, EngineError, RecordError, RoundLog};
use crate::core::actions::{self, UploadFacts};
use crate::core::round_end::Step;
use crate::round::JobOutcome;
use crate::round_archive::{self, RoundFile};
use crate::server::clock::unix_ms;
use crate::server::status::{RoundStatus, Status};

/// Rounds listed in `status.json`, at most: the newest. The whole history
/// is in the store (`fedlink rounds list`).
pub(super) const STATUS_ROUNDS: usize = 100;

/// Accepted updates rewrite the status file at most this often (with 100
/// sites it was rewritten 100 times a round, each time with every listed
/// round: the cost grew with the square of the number of sites).
pub(super) const STATUS_INTERVAL: Duration = Duration::from_millis(500);

impl Engine {
    /// When the status file must be brought up to date, if it is behind.
    pub(super) fn status_due(&self) -> Option<Instant> {
        if !self.status_behind {
            return None;
        }
        Some(
            self.status_written
                .map_or_else(Instant::now, |t| t + STATUS_INTERVAL),
        )
    }

    /// The job's update archive: each `round-N` directory with its round.
    pub(super) fn archive_dirs(&self) -> Vec<(RoundId, PathBuf)> {
        let job_dir = self.store.dir().join("updates").join(self.job_id.as_str());
        let Ok(entries) = std::fs::read_dir(&job_dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let r = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("round-"))
                    .and_then(|n| n.parse::<u64>().ok())?;
                Some((RoundId(r), e.path()))
            })
            .collect()
    }

    /// The rounds the job's update archive holds.
    pub(super) fn archived_rounds(&self) -> Vec<RoundId> {
        self.archive_dirs().into_iter().map(|(r, _)| r).collect()
    }

    /// Remove the round archives retention gives up
    /// ([`round_end::pruned`]). Best effort, logged.
    pub(super) fn prune_archive(&self, rounds: &[RoundId]) {
        for (r, dir) in self.archive_dirs() {
            if !rounds.contains(&r) {
                continue;
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(round = r.0, "update archive pruned (update_retention)"),
                Err(err) => {
                    tracing::warn!(round = r.0, error = %err, "pruning the update archive")
                }
            }
        }
    }

    /// Write the round's replay record, `round.json` (its directory made
    /// first), for `output`: the round's inputs, seed and downlink
    /// encoding. Fatal if it cannot be written.
    pub(super) fn write_round_file(
        &self,
        round: RoundId,
        (base_model, output): (ModelHash, ModelHash),
        log: &RoundLog,
        downlink: Option<Encoding>,
    ) -> Result<(), EngineError> {
        let fatal = |what: &'static str, e: RecordError| EngineError::RoundRecord {
            round,
            what,
            source: e,
        };
        let dir = round_archive::round_dir(self.store.dir(), self.job_id.as_str(), round.0);
        fedlink_certs::private::create_dir_all(&dir)
            .map_err(|e| fatal("archive directory", e.into()))?;
        let file = RoundFile {
            format: round_archive::ROUND_FORMAT,
            job: self.job_id.as_str().to_owned(),
            round: round.0,
            base_model: base_model.to_hex(),
            output_model: output.to_hex(),
            strategy: self.strategy.clone(),
            max_sites: self.job.max_sites() as usize,
            state_before: round_archive::STATE_BEFORE_FILE.into(),
            state_before_blake3: log.state_before_blake3.clone(),
            dp_seed: hex::encode(log.seed),
            inputs: log.inputs.clone(),
            downlink,
        };
        let mut json =
            serde_json::to_vec_pretty(&file).map_err(|e| fatal("round.json", e.into()))?;
        json.push(b'\n');
        round_archive::write_atomic(&dir, round_archive::ROUND_FILE, &json)
            .map_err(|e| fatal("writing round.json", e.into()))
    }

    /// Execute one of the round end's steps before the model is published
    /// (see [`round_end::plan`]): the model stored, the spool's fsync (the
    /// group commit of the archived updates, see [`archive`]; the round
    /// directory they entered is committed by `round.json`'s own directory
    /// fsync), `round.json`, `round.aggregated` and its messages, the
    /// round's times. The outer error is fatal; the inner one fails the
    /// round.
    pub(super) fn record_step(
        &mut self,
        round: RoundId,
        step: Step,
        (base_model, output, next): (ModelHash, ModelHash, &FlatModel),
        log: &RoundLog,
        downlink: Option<Encoding>,
    ) -> Result<Result<(), AggregationFailure>, EngineError> {
        match step {
            Step::StoreModel { model } => {
                if let Err(e) = self.store.put_model_hashed(next, model) {
                    return Ok(Err(e.into()));
                }
            }
            Step::SyncSpool => {
                fedlink_durable::sync_dir(&self.store.dir().join("spool")).map_err(|e| {
                    EngineError::RoundRecord {
                        round,
                        what: "archiving the round's updates",
                        source: e.into(),
                    }
                })?
            }
            Step::WriteRoundFile { .. } => {
                self.write_round_file(round, (base_model, output), log, downlink)?;
            }
            Step::Record(effects) => self.run_effects(effects, None)?,
            Step::SetRoundTimes { .. } => {
                if let Err(e) = self.store.set_round_times(
                    self.job_id.as_str(),
                    round,
                    Some(log.opened_unix_ms),
                    Some(unix_ms()),
                ) {
                    tracing::warn!(round = round.0, error = %e, "recording the round's closing time");
                }
            }
            other => tracing::error!(?other, "not a step before the publish; ignored"),
        }
        Ok(Ok(()))
    }

    /// Keep a declined offer, with the site's reason, in the round's record
    /// (`fedlink rounds show`) and the audit log (`offer.declined`): once
    /// per selected site and round, the reason cut to
    /// [`MAX_DECLINE_REASON_LEN`](crate::store::MAX_DECLINE_REASON_LEN) bytes.
    pub(super) fn note_declined(
        &mut self,
        site: &SiteId,
        round: RoundId,
        reason: &str,
    ) -> Result<(), EngineError> {
        let declined = crate::store::DeclinedOffer::new(site.as_str(), reason, unix_ms());
        match self
            .store
            .record_declined(self.job_id.as_str(), round, declined.clone())
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(
                    site = site.as_str(),
                    round = round.0,
                    "decline of a round the site was not offered, or again"
                );
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(site = site.as_str(), round = round.0, error = %e, "recording a declined offer");
                return Ok(());
            }
        }
        let effects = actions::offer_declined(&self.facts, site, round, &declined.reason);
        self.run_effects(effects, None)
    }

    /// Audit an upload refused before its payload and keep it in the
    /// round's record (the site is answered with the refused ticket).
    pub(super) fn note_rejected(
        &mut self,
        site: &SiteId,
        envelope: &SignedEnvelope,
        bytes: u64,
        reason: &str,
    ) -> Result<(), EngineError> {
        let upload = UploadFacts::of(envelope, bytes);
        let effects = actions::refuse_upload(&self.facts, site, &upload, reason, unix_ms());
        self.run_effects(effects, None)
    }

    /// Write the status file now, or mark it behind if it was written less
    /// than [`STATUS_INTERVAL`] ago (the engine's timer catches up).
    pub(super) fn write_status_soon(&mut self, now: Instant) {
        match self.status_written {
            Some(t) if now < t + STATUS_INTERVAL => self.status_behind = true,
            _ => self.write_status(),
        }
    }

    pub(super) fn write_status(&mut self) {
        self.status_written = Some(Instant::now());
        self.status_behind = false;
        let phase = format!("{:?}", self.runner.phase());
        let show = |r: &crate::store::RoundRecord| RoundStatus {
            round: r.round,
            state: format!("{:?}", r.state),
            model: r.model.map(|m| m.to_hex()),
            updates: r
                .accepted
                .iter()
                .map(|u| (String::from(u.site.clone()), u.bytes, u.num_examples))
                .collect(),
            metrics: r.metrics.clone(),
            evaluation: r.evaluation.clone(),
            final_evaluation: r.final_evaluation.clone(),
        };
        let mut open = Vec::new();
        match self
            .store
            .rounds_from(self.job_id.as_str(), self.status_next)
        {
            Ok(rs) => {
                for r in rs {
                    let done = !matches!(r.state, crate::store::RoundState::Open);
                    if done && open.is_empty() {
                        // Final and contiguous with the ones kept: it will
                        // not be read again.
                        self.status_final.push_back(show(&r));
                        if self.status_final.len() > STATUS_ROUNDS {
                            self.status_final.pop_front();
                        }
                        self.status_next = RoundId(r.round.saturating_add(1));
                    } else {
                        open.push(show(&r));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading rounds for the status file"),
        }
        let mut rounds: Vec<RoundStatus> = self.status_final.iter().cloned().collect();
        rounds.extend(open);
        let excess = rounds.len().saturating_sub(STATUS_ROUNDS);
        rounds.drain(..excess);
        let status = Status {
            job: self.job_id.as_str().to_owned(),
            phase,
            completed_rounds: self.runner.completed_rounds(),
            total_rounds: u64::from(self.job.rounds),
            current_model: self.runner.current_model().to_hex(),
            connected_sites: self
                .links
                .connected()
                .into_iter()
                .map(String::from)
                .collect(),
            finished: self.outcome.as_ref().map(ToString::to_string),
            completed: matches!(self.outcome, Some(JobOutcome::Completed { .. })),
            rounds,
            scaling: self.scaling.scaling().cloned(),
            evaluation: self.latest_evaluation.clone(),
            updated_unix_ms: unix_ms(),
        };
        if let Err(e) = self.status.write(&status) {
            tracing::warn!(error = %e, "writing the status file");
        }
    }
}
