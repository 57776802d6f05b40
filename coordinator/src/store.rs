//! Embedded, crash-safe persistence of the coordinator (no external server).
//!
//! A data directory holds one [redb](https://docs.rs/redb/2) database and
//! one content-addressed file per global model version:
//!
//! ```text
//! <dir>/                      mode 0700
//!   fedlink.redb              jobs, rounds, sites, optimizer + replay state
//!   models/<blake3-hex>.bin   every global model version, immutable
//!   models/<blake3-hex>.wire  the served versions encoded for download (`wire`)
//!   models/<base>-<hash>.update  the latest round's global update (`wire`)
//!   models/.tmp-*             a model being written (removed at open)
//! ```
//!
//! The `.wire` and `.update` files (written, described, found again after a
//! restart, read back record by record, pruned) are the store's module
//! `wire`.
//!
//! Tables (values are JSON, so the records stay readable and evolvable):
//!
//! | table | key | value |
//! |---|---|---|
//! | `jobs` | job id | [`JobRecord`]: the job TOML, progress, pause flag, outcome |
//! | `rounds` | (job id, round) | [`RoundRecord`]: state, selected sites, accepted updates |
//! | `sites` | site id | [`SiteRecord`]: the site registry |
//! | `models` | model hex | [`ModelRecord`]: which job and round produced it |
//! | `optimizer` | job id | opaque server-optimizer state (aggregation's serde bytes) |
//! | `replay` | scope | opaque replay-guard state (protocol's bytes) |
//!
//! # Durability and crash semantics
//!
//! Every [`Store::persist`] is one redb write transaction, committed with
//! redb's default durability (fsync before `commit` returns). The driver
//! persists each [`Checkpoint`] *before* executing the actions that follow
//! it (see [`crate::round`]). A model file is written to a temporary file in
//! `models/`, fsynced, renamed to its final name and the directory fsynced,
//! *before* the driver reports the aggregation; [`Checkpoint::RoundCompleted`]
//! is refused unless that file exists. Hence after `kill -9` at any moment:
//!
//! - every completed round's model is on disk and its hash checks out
//!   ([`Store::load_model`] recomputes it);
//! - [`Store::recover`] resumes the job after its last completed round. The
//!   round that was in flight is *re-opened*: its accepted updates are moved
//!   to the record's `discarded` list and re-requested, because the
//!   streaming aggregation accumulator lives in memory only (persisting it
//!   would cost a model-sized write per update). Nothing accepted before the
//!   crash is counted in the re-run, and within one run the store refuses a
//!   second accepted update from the same site (`Inconsistent`), so no
//!   update is ever counted twice;
//! - a torn model write leaves only a `.tmp-*` file, removed at the next
//!   open; a model file changed on disk is detected by its hash.
//!
//! Only one process may open a data directory at a time (redb locks the
//! database file).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use fedlink_protocol::{FlatModel, ModelHash, ModelHasher, ModelSpec};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::job::{Job, JobError};
use crate::round::{AcceptedUpdate, Checkpoint, JobOutcome, RoundId, SiteId, Snapshot};

const JOBS: TableDefinition<'_, &str, &str> = TableDefinition::new("jobs");
const ROUNDS: TableDefinition<'_, (&str, u64), &str> = TableDefinition::new("rounds");
const SITES: TableDefinition<'_, &str, &str> = TableDefinition::new("sites");
const MODELS: TableDefinition<'_, &str, &str> = TableDefinition::new("models");
const OPTIMIZER: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("optimizer");
const REPLAY: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("replay");

/// Name of the database file in the data directory.
pub const DB_FILE: &str = "fedlink.redb";
/// Memory redb may use to cache the database's pages. Its default (1 GiB)
/// let the coordinator's memory grow with the job's history (the database
/// grows by about 1 KB per site and round); what a round reads and writes
/// is a few records.
const STORE_CACHE_BYTES: usize = 16 << 20;
/// Name of the model directory in the data directory.
pub const MODELS_DIR: &str = "models";
/// Magic bytes at the start of a model file.
pub const MODEL_MAGIC: &[u8; 8] = b"FLMODEL1";
/// Largest model spec header accepted in a model file.
pub const MAX_SPEC_BYTES: u32 = 16 << 20;
const LEGACY_TMP_PREFIX: &str = ".tmp-";

/// Why a store operation failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file-system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The database failed (including "already open by another process").
    #[error("database: {0}")]
    Db(#[source] Box<redb::Error>),
    /// A stored record does not decode.
    #[error("corrupt record in table {table} at {key}: {reason}")]
    CorruptRecord {
        /// Table.
        table: &'static str,
        /// Key.
        key: String,
        /// Decoder message.
        reason: String,
    },
    /// A job with this id already exists (jobs are never overwritten).
    #[error("job {0:?} already exists")]
    JobExists(String),
    /// No job with this id.
    #[error("no job {0:?}")]
    UnknownJob(String),
    /// The stored job file no longer parses.
    #[error("stored job: {0}")]
    Job(#[from] JobError),
    /// A model file that should exist does not.
    #[error("model {0} is not in the store")]
    ModelMissing(ModelHash),
    /// A model file is malformed or its content does not match its hash.
    #[error("model file {path} is corrupt: {reason}")]
    ModelCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint does not follow from the stored state (a driver bug or
    /// a replayed checkpoint); nothing was written.
    #[error("inconsistent checkpoint for job {job:?}: {reason}")]
    Inconsistent {
        /// Job.
        job: String,
        /// What does not fit.
        reason: String,
    },
}

fn dberr<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

fn durable_err(e: fedlink_durable::Error) -> StoreError {
    StoreError::Io {
        op: e.op,
        path: e.path,
        source: e.source,
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + use<> {
    let path = path.to_owned();
    move |source| StoreError::Io { op, path, source }
}

/// Stored state of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id.
    pub id: String,
    /// The job definition, as TOML.
    pub job_toml: String,
    /// Model version the job started from.
    pub initial_model: ModelHash,
    /// Model after the last completed round.
    pub current_model: ModelHash,
    /// Rounds completed.
    pub completed_rounds: u64,
    /// Paused by an admin.
    pub paused: bool,
    /// Round started and not completed, if any.
    pub round_in_flight: Option<u64>,
    /// Outcome, once finished.
    pub outcome: Option<JobOutcome>,
}

/// State of a round record.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoundState {
    /// Collecting or aggregating.
    Open,
    /// Completed: `model` is set.
    Completed,
    /// Interrupted (crash, abort or failure); its updates did not count.
    Discarded,
}

/// Stored state of one round of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round number.
    pub round: u64,
    /// State.
    pub state: RoundState,
    /// Offer waves so far in the current run.
    pub attempts: u32,
    /// Model the round trains on.
    pub base_model: ModelHash,
    /// Sites offered the round (all waves) in the current run.
    pub selected: Vec<SiteId>,
    /// Updates accepted in the current run.
    pub accepted: Vec<AcceptedUpdate>,
    /// Updates accepted by earlier, interrupted runs of this round (never
    /// aggregated).
    pub discarded: Vec<AcceptedUpdate>,
    /// How many times the round was re-opened after an interruption.
    pub restarts: u32,
    /// Resulting model, once completed.
    pub model: Option<ModelHash>,
    /// Aggregation metrics, once completed.
    pub metrics: BTreeMap<String, f64>,
    /// When the round opened (latest run), Unix milliseconds.
    #[serde(default)]
    pub opened_unix_ms: Option<u64>,
    /// When it was aggregated, Unix milliseconds.
    #[serde(default)]
    pub closed_unix_ms: Option<u64>,
    /// Uploads refused in this round (all runs), with their reasons.
    #[serde(default)]
    pub rejected: Vec<RejectedUpdate>,
    /// Per accepted update (all runs): size, upload time, the site's
    /// reported metrics.
    #[serde(default)]
    pub update_details: Vec<UpdateDetail>,
    /// Offers the selected sites declined (all runs, one per site), with
    /// the reason each site gave.
    #[serde(default)]
    pub declined: Vec<DeclinedOffer>,
    /// The sites' federated evaluation of this round's base model (the
    /// metrics in the accepted updates' signed headers), when the job's
    /// `[evaluation] every_rounds` asks for that model; set at aggregation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<fedlink_protocol::admin::FederatedEvaluation>,
    /// The sites' evaluation of this round's model, the job's final one,
    /// which they were asked for after the round (signed `EvalReport`s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_evaluation: Option<fedlink_protocol::admin::FederatedEvaluation>,
}

/// An offer a site declined.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclinedOffer {
    /// The site.
    pub site: String,
    /// Its reason (site-supplied text, at most [`MAX_DECLINE_REASON_LEN`]
    /// bytes).
    pub reason: String,
    /// When, Unix milliseconds.
    pub at_unix_ms: u64,
}

impl DeclinedOffer {
    /// A declined offer, `reason` cut to [`MAX_DECLINE_REASON_LEN`] bytes.
    pub fn new(site: &str, reason: &str, at_unix_ms: u64) -> Self {
        let mut end = reason.len().min(MAX_DECLINE_REASON_LEN);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        Self {
            site: site.to_owned(),
            reason: reason[..end].to_owned(),
            at_unix_ms,
        }
    }
}

/// Longest decline reason kept (bytes; longer ones are cut at a character
/// boundary). The reason is the site's free text.
pub const MAX_DECLINE_REASON_LEN: usize = 512;

/// An upload the coordinator refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedUpdate {
    /// Sender.
    pub site: String,
    /// blake3 of the payload it announced (hex).
    pub payload_hash: String,
    /// Why it was refused.
    pub reason: String,
    /// Payload bytes received (declared length if refused before the payload).
    pub bytes: u64,
    /// When, Unix milliseconds.
    pub at_unix_ms: u64,
}

/// Details of an accepted update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateDetail {
    /// Sender.
    pub site: String,
    /// blake3 of the payload (hex).
    pub payload_hash: String,
    /// Payload bytes.
    pub bytes: u64,
    /// How long receiving the payload took, milliseconds.
    pub upload_ms: u64,
    /// Evaluation metrics the site signed in its envelope.
    pub metrics: Option<fedlink_protocol::EvalMetrics>,
    /// When it was accepted, Unix milliseconds.
    pub at_unix_ms: u64,
}

/// Most rejected uploads kept per round record (the audit log has all).
pub const MAX_REJECTED_PER_ROUND: usize = 1024;

/// A site in the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    /// Site id.
    pub id: SiteId,
    /// First connection, Unix milliseconds.
    pub first_seen_unix_ms: u64,
    /// Latest connection, Unix milliseconds.
    pub last_seen_unix_ms: u64,
    /// Examples the site announced last.
    pub num_examples: Option<u64>,
    /// Updates of this site that went into a completed round.
    pub updates_aggregated: u64,
}

/// Index entry of a stored model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Job that produced it.
    pub job: String,
    /// Round that produced it (0: initial model).
    pub round: u64,
}

/// When a write transaction of the store reaches the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sync {
    /// fsynced before `commit` returns (redb's `Durability::Immediate`).
    Now,
    /// Committed without an fsync (`Durability::None`): durable with the
    /// next fsynced transaction, which every checkpoint is. For annotations
    /// of a round that a later checkpoint of the same round follows.
    WithNextCheckpoint,
}

/// Opaque state committed in the same transaction as a checkpoint.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras<'a> {
    /// Server-optimizer state after this checkpoint (usually with
    /// `RoundCompleted`).
    pub optimizer_state: Option<&'a [u8]>,
    /// Replay-guard state (scope, bytes), usually with `UpdateAccepted`.
    pub replay_state: Option<(&'a str, &'a [u8])>,
}

/// What [`Store::recover`] found.
#[derive(Debug)]
pub struct Recovery {
    /// The job definition.
    pub job: Job,
    /// State to resume the round machine from
    /// ([`crate::round::JobRunner::resume`]).
    pub snapshot: Snapshot,
    /// The current global model, loaded and verified.
    pub model: FlatModel,
    /// Server-optimizer state after the last completed round.
    pub optimizer_state: Option<Vec<u8>>,
    /// The round that was in flight and is re-opened, if any.
    pub reopened_round: Option<RoundId>,
    /// Updates of the re-opened round that were accepted before the crash
    /// and will not count (their sites are asked again).
    pub discarded_updates: Vec<AcceptedUpdate>,
}

/// The coordinator's data directory.
#[derive(Debug)]
pub struct Store {
    db: Database,
    dir: PathBuf,
    models: PathBuf,
}

fn decode<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    key: &dyn std::fmt::Display,
    s: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::CorruptRecord {
        table,
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::CorruptRecord {
        table: "-",
        key: "-".into(),
        reason: format!("cannot encode: {e}"),
    })
}

fn create_dir_private(path: &Path) -> Result<(), StoreError> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(path).map_err(io("create directory", path))
}

impl Store {
    /// Open (or create) the data directory `dir`: create it (mode 0700) and
    /// `models/`, remove leftover temporary model files, open the database
    /// and make sure every table exists.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        create_dir_private(dir)?;
        let models = dir.join(MODELS_DIR);
        create_dir_private(&models)?;
        for entry in fs::read_dir(&models).map_err(io("list", &models))? {
            let entry = entry.map_err(io("list", &models))?;
            // `.tmp-*`: torn model writes of versions before fedlink-durable.
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(LEGACY_TMP_PREFIX)
            {
                let p = entry.path();
                tracing::warn!(path = %p.display(), "removing torn model write");
                fs::remove_file(&p).map_err(io("remove", &p))?;
            }
        }
        for p in fedlink_durable::remove_leftovers(&models).map_err(durable_err)? {
            tracing::warn!(path = %p.display(), "removed torn model write");
        }
        // Mode 0600 like everything in the data directory: redb creates its
        // file with the process umask, so create it first.
        let db_path = dir.join(DB_FILE);
        fedlink_certs::private::file_options()
            .create(true)
            .truncate(false)
            .open(&db_path)
            .map_err(io("create", &db_path))?;
        let db = redb::Builder::new()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(&db_path)
            .map_err(dberr)?;
        let txn = db.begin_write().map_err(dberr)?;
        {
            txn.open_table(JOBS).map_err(dberr)?;
            txn.open_table(ROUNDS).map_err(dberr)?;
            txn.open_table(SITES).map_err(dberr)?;
            txn.open_table(MODELS).map_err(dberr)?;
            txn.open_table(OPTIMIZER).map_err(dberr)?;
            txn.open_table(REPLAY).map_err(dberr)?;
        }
        txn.commit().map_err(dberr)?;
        Ok(Self {
            db,
            dir: dir.to_owned(),
            models,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the file of model `hash`.
    pub fn model_path(&self, hash: &ModelHash) -> PathBuf {
        self.models.join(format!("{}.bin", hash.to_hex()))
    }

    /// Whether the file of model `hash` exists (not verified).
    pub fn has_model(&self, hash: &ModelHash) -> bool {
        self.model_path(hash).is_file()
    }

    /// Write a model durably under its hash and return the hash. Idempotent:
    /// an existing, intact file is kept; a corrupt one is replaced.
    pub fn put_model(&self, model: &FlatModel) -> Result<ModelHash, StoreError> {
        self.put_model_hashed(model, model.hash())
    }

    /// [`Self::put_model`] for a model whose hash the caller has just
    /// computed (`hash` must be `model.hash()`; checked in debug builds):
    /// the round's end knows it already, and 40 MB of hashing at 10M
    /// parameters is then not done twice on its critical path.
    pub fn put_model_hashed(
        &self,
        model: &FlatModel,
        hash: ModelHash,
    ) -> Result<ModelHash, StoreError> {
        debug_assert_eq!(hash, model.hash(), "put_model_hashed: wrong hash");
        let path = self.model_path(&hash);
        if path.exists() {
            match self.load_model(&hash) {
                Ok(_) => return Ok(hash),
                Err(StoreError::ModelCorrupt { reason, .. }) => {
                    tracing::warn!(path = %path.display(), %reason, "replacing corrupt model file");
                }
                Err(e) => return Err(e),
            }
        }
        let write = |w: &mut dyn Write| -> std::io::Result<()> {
            let spec = serde_json::to_vec(model.spec()).map_err(std::io::Error::other)?;
            let spec_len = u32::try_from(spec.len())
                .ok()
                .filter(|l| *l <= MAX_SPEC_BYTES)
                .ok_or_else(|| std::io::Error::other("model spec too large"))?;
            w.write_all(MODEL_MAGIC)?;
            w.write_all(&spec_len.to_le_bytes())?;
            w.write_all(&spec)?;
            if cfg!(target_endian = "little") {
                // The values' own bytes are the file's.
                w.write_all(bytemuck::cast_slice(model.values()))?;
            } else {
                let mut buf = Vec::with_capacity(64 * 1024);
                for chunk in model.values().chunks(16 * 1024) {
                    buf.clear();
                    for v in chunk {
                        buf.extend_from_slice(&v.to_le_bytes());
                    }
                    w.write_all(&buf)?;
                }
            }
            Ok(())
        };
        fedlink_durable::replace_with(&path, fedlink_durable::Mode::Private, write)
            .map_err(durable_err)?;
        Ok(hash)
    }

    /// Read model `hash` back and verify its content hash.
    pub fn load_model(&self, hash: &ModelHash) -> Result<FlatModel, StoreError> {
        read_model_file(&self.model_path(hash), hash)
    }

    /// `update ← model hash + update` ([`add_model_file`]): the base model
    /// read back, verified and added without a buffer of its size.
    pub fn add_model_to(&self, hash: &ModelHash, update: &mut FlatModel) -> Result<(), StoreError> {
        add_model_file(&self.model_path(hash), hash, update)
    }

    /// Register a new job, starting from `initial_model` (which must already
    /// be stored with [`Self::put_model`]). Refuses an existing id.
    pub fn create_job(&self, job: &Job, initial_model: ModelHash) -> Result<JobRecord, StoreError> {
        job.validate()?;
        if !self.has_model(&initial_model) {
            return Err(StoreError::ModelMissing(initial_model));
        }
        let job_toml = job.to_toml().map_err(|e| StoreError::CorruptRecord {
            table: "jobs",
            key: job.id.clone(),
            reason: e.to_string(),
        })?;
        let rec = JobRecord {
            id: job.id.clone(),
            job_toml,
            initial_model,
            current_model: initial_model,
            completed_rounds: 0,
            paused: false,
            round_in_flight: None,
            outcome: None,
        };
        let txn = self.db.begin_write().map_err(dberr)?;
        {
            let mut jobs = txn.open_table(JOBS).map_err(dberr)?;
            if jobs.get(job.id.as_str()).map_err(dberr)?.is_some() {
                return Err(StoreError::JobExists(job.id.clone()));
            }
            jobs.insert(job.id.as_str(), encode(&rec)?.as_str())
                .map_err(dberr)?;
            let mut models = txn.open_table(MODELS).map_err(dberr)?;
            let hex = initial_model.to_hex();
            if models.get(hex.as_str()).map_err(dberr)?.is_none() {
                let m = ModelRecord {
                    job: job.id.clone(),
                    round: 0,
                };
                models
                    .insert(hex.as_str(), encode(&m)?.as_str())
                    .map_err(dberr)?;
            }
        }
        txn.commit().map_err(dberr)?;
        Ok(rec)
    }

    /// The stored state of a job.
    pub fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let jobs = txn.open_table(JOBS).map_err(dberr)?;
        jobs.get(id)
            .map_err(dberr)?
            .map(|v| decode("jobs", &id, v.value()))
            .transpose()
    }

    /// Every job, sorted by id.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let jobs = txn.open_table(JOBS).map_err(dberr)?;
        let mut out = Vec::new();
        for item in jobs.iter().map_err(dberr)? {
            let (k, v) = item.map_err(dberr)?;
            out.push(decode("jobs", &k.value(), v.value())?);
        }
        Ok(out)
    }

    /// One round of a job.
    pub fn round(&self, job: &str, round: RoundId) -> Result<Option<RoundRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let rounds = txn.open_table(ROUNDS).map_err(dberr)?;
        rounds
            .get((job, round.0))
            .map_err(dberr)?
            .map(|v| decode("rounds", &format!("{job}/{round}"), v.value()))
            .transpose()
    }

    /// Every round of a job, in order.
    pub fn rounds(&self, job: &str) -> Result<Vec<RoundRecord>, StoreError> {
        self.rounds_from(job, RoundId(0))
    }

    /// The rounds of a job numbered `from` or later, in order.
    pub fn rounds_from(&self, job: &str, from: RoundId) -> Result<Vec<RoundRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let rounds = txn.open_table(ROUNDS).map_err(dberr)?;
        let mut out = Vec::new();
        for item in rounds
            .range((job, from.0)..=(job, u64::MAX))
            .map_err(dberr)?
        {
            let (k, v) = item.map_err(dberr)?;
            let (j, r) = k.value();
            out.push(decode("rounds", &format!("{j}/{r}"), v.value())?);
        }
        Ok(out)
    }

    /// Record a site connection in the registry (`now_unix_ms` is the
    /// wall-clock time of the connection).
    pub fn record_site_seen(
        &self,
        id: &SiteId,
        now_unix_ms: u64,
        num_examples: Option<u64>,
    ) -> Result<SiteRecord, StoreError> {
        let site = id.as_str();
        let txn = self.db.begin_write().map_err(dberr)?;
        let rec = {
            let mut sites = txn.open_table(SITES).map_err(dberr)?;
            let existing: Option<SiteRecord> = sites
                .get(site)
                .map_err(dberr)?
                .map(|v| decode("sites", &site, v.value()))
                .transpose()?;
            let rec = match existing {
                Some(mut r) => {
                    r.last_seen_unix_ms = r.last_seen_unix_ms.max(now_unix_ms);
                    r.num_examples = num_examples.or(r.num_examples);
                    r
                }
                None => SiteRecord {
                    id: id.clone(),
                    first_seen_unix_ms: now_unix_ms,
                    last_seen_unix_ms: now_unix_ms,
                    num_examples,
                    updates_aggregated: 0,
                },
            };
            sites.insert(site, encode(&rec)?.as_str()).map_err(dberr)?;
            rec
        };
        txn.commit().map_err(dberr)?;
        Ok(rec)
    }

    /// A site of the registry.
    pub fn site(&self, site: &str) -> Result<Option<SiteRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let sites = txn.open_table(SITES).map_err(dberr)?;
        sites
            .get(site)
            .map_err(dberr)?
            .map(|v| decode("sites", &site, v.value()))
            .transpose()
    }

    /// The whole site registry, sorted by id.
    pub fn sites(&self) -> Result<Vec<SiteRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let sites = txn.open_table(SITES).map_err(dberr)?;
        let mut out = Vec::new();
        for item in sites.iter().map_err(dberr)? {
            let (k, v) = item.map_err(dberr)?;
            out.push(decode("sites", &k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Which job and round produced a model.
    pub fn model_record(&self, hash: &ModelHash) -> Result<Option<ModelRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let models = txn.open_table(MODELS).map_err(dberr)?;
        let hex = hash.to_hex();
        models
            .get(hex.as_str())
            .map_err(dberr)?
            .map(|v| decode("models", &hex, v.value()))
            .transpose()
    }

    /// Server-optimizer state of a job.
    pub fn optimizer_state(&self, job: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let t = txn.open_table(OPTIMIZER).map_err(dberr)?;
        Ok(t.get(job).map_err(dberr)?.map(|v| v.value().to_vec()))
    }

    /// Replay-guard state of a scope.
    pub fn replay_state(&self, scope: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let t = txn.open_table(REPLAY).map_err(dberr)?;
        Ok(t.get(scope).map_err(dberr)?.map(|v| v.value().to_vec()))
    }

    /// Store the replay-guard state of a scope on its own.
    pub fn put_replay_state(&self, scope: &str, state: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(dberr)?;
        txn.open_table(REPLAY)
            .map_err(dberr)?
            .insert(scope, state)
            .map_err(dberr)?;
        txn.commit().map_err(dberr)
    }

    /// Change the record of round `round` of `job` with `f` (one write
    /// transaction, fsynced before it returns). Returns `Ok(false)` if there
    /// is no such round.
    fn annotate_round(
        &self,
        job: &str,
        round: RoundId,
        f: impl FnOnce(&mut RoundRecord),
    ) -> Result<bool, StoreError> {
        self.annotate_round_with(job, round, Sync::Now, f)
    }

    /// [`annotate_round`](Self::annotate_round), with `sync` saying whether
    /// the transaction is fsynced now or rides on the next fsynced one.
    fn annotate_round_with(
        &self,
        job: &str,
        round: RoundId,
        sync: Sync,
        f: impl FnOnce(&mut RoundRecord),
    ) -> Result<bool, StoreError> {
        let mut txn = self.db.begin_write().map_err(dberr)?;
        if sync == Sync::WithNextCheckpoint {
            txn.set_durability(redb::Durability::None);
        }
        {
            let mut rounds = txn.open_table(ROUNDS).map_err(dberr)?;
            let mut rec: RoundRecord = match rounds.get((job, round.0)).map_err(dberr)? {
                Some(v) => decode("rounds", &format!("{job}/{round}"), v.value())?,
                None => return Ok(false),
            };
            f(&mut rec);
            rounds
                .insert((job, round.0), encode(&rec)?.as_str())
                .map_err(dberr)?;
        }
        txn.commit().map_err(dberr)?;
        Ok(true)
    }

    /// Keep a refused upload in its round's record (at most
    /// [`MAX_REJECTED_PER_ROUND`]; the audit log keeps every one).
    /// Returns `Ok(false)` if the round has no record.
    pub fn record_rejected(
        &self,
        job: &str,
        round: RoundId,
        rejected: RejectedUpdate,
    ) -> Result<bool, StoreError> {
        self.annotate_round(job, round, |r| {
            if r.rejected.len() < MAX_REJECTED_PER_ROUND {
                r.rejected.push(rejected);
            }
        })
    }

    /// Keep a declined offer in its round's record: once per site and round,
    /// and only for a site the round selected (so a site cannot grow the
    /// record, or the audit log, by declining over and over). Returns
    /// whether it was kept.
    pub fn record_declined(
        &self,
        job: &str,
        round: RoundId,
        declined: DeclinedOffer,
    ) -> Result<bool, StoreError> {
        let mut kept = false;
        self.annotate_round(job, round, |r| {
            if r.selected.iter().any(|s| s.as_str() == declined.site)
                && !r.declined.iter().any(|d| d.site == declined.site)
            {
                r.declined.push(declined);
                kept = true;
            }
        })?;
        Ok(kept)
    }

    /// Keep the details of an accepted update in its round's record.
    ///
    /// Not fsynced on its own (group commit): it becomes durable with the
    /// next checkpoint ([`persist`](Self::persist)), at the latest the
    /// round's `RoundCompleted`, so a completed round always has the
    /// details of its updates. A crash before that re-opens the round and
    /// discards its accepted updates anyway (see the module docs); only the
    /// detail of such a discarded update can be lost.
    pub fn record_update_detail(
        &self,
        job: &str,
        round: RoundId,
        detail: UpdateDetail,
    ) -> Result<bool, StoreError> {
        self.annotate_round_with(job, round, Sync::WithNextCheckpoint, |r| {
            r.update_details.push(detail)
        })
    }

    /// Keep the federated evaluation of a round's base model in its record
    /// (replacing an earlier one). Returns `Ok(false)` if the round has no
    /// record.
    pub fn record_evaluation(
        &self,
        job: &str,
        round: RoundId,
        evaluation: fedlink_protocol::admin::FederatedEvaluation,
    ) -> Result<bool, StoreError> {
        self.annotate_round(job, round, |r| r.evaluation = Some(evaluation))
    }

    /// Keep the evaluation of a round's model that the sites were asked for
    /// (the job's final model) in its record. Returns `Ok(false)` if the
    /// round has no record.
    pub fn record_final_evaluation(
        &self,
        job: &str,
        round: RoundId,
        evaluation: fedlink_protocol::admin::FederatedEvaluation,
    ) -> Result<bool, StoreError> {
        self.annotate_round(job, round, |r| r.final_evaluation = Some(evaluation))
    }

    /// The newest federated evaluation of `job`'s models (a final model's
    /// first, then the one carried by the newest round's updates).
    pub fn latest_evaluation(
        &self,
        job: &str,
    ) -> Result<Option<fedlink_protocol::admin::FederatedEvaluation>, StoreError> {
        Ok(self
            .rounds(job)?
            .into_iter()
            .rev()
            .find_map(|r| r.final_evaluation.or(r.evaluation)))
    }

    /// Set when a round opened and closed (`None` leaves a time unchanged).
    ///
    /// Not fsynced on its own, like
    /// [`record_update_detail`](Self::record_update_detail): the times become
    /// durable with the next checkpoint (the opening time with the round's
    /// first accepted update or its end, the closing time with
    /// `RoundCompleted`, which the driver persists after it).
    pub fn set_round_times(
        &self,
        job: &str,
        round: RoundId,
        opened_unix_ms: Option<u64>,
        closed_unix_ms: Option<u64>,
    ) -> Result<bool, StoreError> {
        self.annotate_round_with(job, round, Sync::WithNextCheckpoint, |r| {
            if opened_unix_ms.is_some() {
                r.opened_unix_ms = opened_unix_ms;
            }
            if closed_unix_ms.is_some() {
                r.closed_unix_ms = closed_unix_ms;
            }
        })
    }

    /// Make a checkpoint of job `job_id` durable, with `extras` in the same
    /// transaction. Refuses (writing nothing) a checkpoint that does not
    /// follow from the stored state.
    pub fn persist(
        &self,
        job_id: &str,
        checkpoint: &Checkpoint,
        extras: Extras<'_>,
    ) -> Result<(), StoreError> {
        let inconsistent = |reason: String| StoreError::Inconsistent {
            job: job_id.to_owned(),
            reason,
        };
        let txn = self.db.begin_write().map_err(dberr)?;
        {
            let mut jobs = txn.open_table(JOBS).map_err(dberr)?;
            let mut rounds = txn.open_table(ROUNDS).map_err(dberr)?;
            let mut job: JobRecord = match jobs.get(job_id).map_err(dberr)? {
                Some(v) => decode("jobs", &job_id, v.value())?,
                None => return Err(StoreError::UnknownJob(job_id.to_owned())),
            };
            if job.outcome.is_some() {
                return Err(inconsistent("the job has already finished".into()));
            }
            let get_round = |rounds: &redb::Table<'_, (&str, u64), &str>,
                             r: u64|
             -> Result<Option<RoundRecord>, StoreError> {
                rounds
                    .get((job_id, r))
                    .map_err(dberr)?
                    .map(|v| decode("rounds", &format!("{job_id}/{r}"), v.value()))
                    .transpose()
            };
            match checkpoint {
                Checkpoint::RoundStarted {
                    round,
                    attempt,
                    base_model,
                    selected,
                } => {
                    // The records keep the plain number.
                    let round = &round.0;
                    if *round != job.completed_rounds + 1 {
                        return Err(inconsistent(format!(
                            "round {round} started after {} completed rounds",
                            job.completed_rounds
                        )));
                    }
                    if *base_model != job.current_model {
                        return Err(inconsistent(format!(
                            "round {round} starts from {base_model}, the current model is {}",
                            job.current_model
                        )));
                    }
                    let old = get_round(&rounds, *round)?;
                    let rec = match old {
                        Some(mut rec) if rec.state == RoundState::Open && *attempt > 1 => {
                            rec.attempts = *attempt;
                            rec.selected.extend(selected.iter().cloned());
                            rec
                        }
                        old => {
                            let (mut discarded, restarts, rejected, update_details, declined) =
                                match old {
                                    Some(o) => {
                                        let mut d = o.discarded;
                                        d.extend(o.accepted);
                                        (
                                            d,
                                            o.restarts + 1,
                                            o.rejected,
                                            o.update_details,
                                            o.declined,
                                        )
                                    }
                                    None => (Vec::new(), 0, Vec::new(), Vec::new(), Vec::new()),
                                };
                            discarded.sort_by(|a, b| a.site.cmp(&b.site));
                            RoundRecord {
                                round: *round,
                                state: RoundState::Open,
                                attempts: *attempt,
                                base_model: *base_model,
                                selected: selected.clone(),
                                accepted: Vec::new(),
                                discarded,
                                restarts,
                                model: None,
                                metrics: BTreeMap::new(),
                                opened_unix_ms: None,
                                closed_unix_ms: None,
                                rejected,
                                update_details,
                                declined,
                                evaluation: None,
                                final_evaluation: None,
                            }
                        }
                    };
                    rounds
                        .insert((job_id, *round), encode(&rec)?.as_str())
                        .map_err(dberr)?;
                    job.round_in_flight = Some(*round);
                }
                Checkpoint::UpdateAccepted(u) => {
                    let mut rec = match get_round(&rounds, u.round.0)? {
                        Some(r) if r.state == RoundState::Open => r,
                        _ => {
                            return Err(inconsistent(format!(
                                "update for round {} which is not open",
                                u.round
                            )));
                        }
                    };
                    if rec.accepted.iter().any(|a| a.site == u.site) {
                        return Err(inconsistent(format!(
                            "second update of site {} in round {}",
                            u.site, u.round
                        )));
                    }
                    rec.accepted.push(u.clone());
                    rounds
                        .insert((job_id, u.round.0), encode(&rec)?.as_str())
                        .map_err(dberr)?;
                }
                Checkpoint::RoundCompleted {
                    round,
                    model,
                    updates,
                    metrics,
                } => {
                    let round = &round.0;
                    if *round != job.completed_rounds + 1 {
                        return Err(inconsistent(format!(
                            "round {round} completed after {} completed rounds",
                            job.completed_rounds
                        )));
                    }
                    if !self.has_model(model) {
                        return Err(StoreError::ModelMissing(*model));
                    }
                    let mut rec = match get_round(&rounds, *round)? {
                        Some(r) if r.state == RoundState::Open => r,
                        _ => return Err(inconsistent(format!("round {round} is not open"))),
                    };
                    let mut seen = std::collections::BTreeSet::new();
                    if !updates.iter().all(|u| seen.insert(u.site.as_str())) {
                        return Err(inconsistent(format!(
                            "round {round} aggregates a site twice"
                        )));
                    }
                    rec.state = RoundState::Completed;
                    rec.accepted = updates.clone();
                    rec.model = Some(*model);
                    rec.metrics = metrics.clone();
                    rounds
                        .insert((job_id, *round), encode(&rec)?.as_str())
                        .map_err(dberr)?;
                    job.completed_rounds = *round;
                    job.current_model = *model;
                    job.round_in_flight = None;
                    let mut models = txn.open_table(MODELS).map_err(dberr)?;
                    let hex = model.to_hex();
                    let m = ModelRecord {
                        job: job_id.to_owned(),
                        round: *round,
                    };
                    models
                        .insert(hex.as_str(), encode(&m)?.as_str())
                        .map_err(dberr)?;
                    let mut sites = txn.open_table(SITES).map_err(dberr)?;
                    for u in updates {
                        let mut s: SiteRecord = match sites.get(u.site.as_str()).map_err(dberr)? {
                            Some(v) => decode("sites", &u.site, v.value())?,
                            None => SiteRecord {
                                id: u.site.clone(),
                                first_seen_unix_ms: u.received_unix_ms,
                                last_seen_unix_ms: u.received_unix_ms,
                                num_examples: None,
                                updates_aggregated: 0,
                            },
                        };
                        s.updates_aggregated += 1;
                        sites
                            .insert(u.site.as_str(), encode(&s)?.as_str())
                            .map_err(dberr)?;
                    }
                }
                Checkpoint::Paused(p) => job.paused = *p,
                Checkpoint::JobFinished(outcome) => {
                    if let Some(r) = job.round_in_flight.take()
                        && let Some(mut rec) = get_round(&rounds, r)?
                        && rec.state == RoundState::Open
                    {
                        rec.state = RoundState::Discarded;
                        rounds
                            .insert((job_id, r), encode(&rec)?.as_str())
                            .map_err(dberr)?;
                    }
                    job.outcome = Some(outcome.clone());
                }
            }
            jobs.insert(job_id, encode(&job)?.as_str()).map_err(dberr)?;
            if let Some(state) = extras.optimizer_state {
                txn.open_table(OPTIMIZER)
                    .map_err(dberr)?
                    .insert(job_id, state)
                    .map_err(dberr)?;
            }
            if let Some((scope, state)) = extras.replay_state {
                txn.open_table(REPLAY)
                    .map_err(dberr)?
                    .insert(scope, state)
                    .map_err(dberr)?;
            }
        }
        txn.commit().map_err(dberr)
    }

    /// Rebuild the state of job `job_id` after a restart: parse its
    /// definition, load and verify its current model, and re-open the round
    /// that was in flight (durably: its accepted updates move to
    /// `discarded`, the round record stays `Open` until the runner starts it
    /// again). Feed [`Recovery::snapshot`] to
    /// [`crate::round::JobRunner::resume`].
    pub fn recover(&self, job_id: &str) -> Result<Recovery, StoreError> {
        let rec = self
            .job(job_id)?
            .ok_or_else(|| StoreError::UnknownJob(job_id.to_owned()))?;
        let job = Job::from_toml(&rec.job_toml)?;
        let model = self.load_model(&rec.current_model)?;
        let optimizer_state = self.optimizer_state(job_id)?;
        let mut reopened_round = None;
        let mut discarded_updates = Vec::new();
        if rec.outcome.is_none()
            && let Some(r) = rec.round_in_flight
        {
            let txn = self.db.begin_write().map_err(dberr)?;
            {
                let mut rounds = txn.open_table(ROUNDS).map_err(dberr)?;
                let found: Option<RoundRecord> = rounds
                    .get((job_id, r))
                    .map_err(dberr)?
                    .map(|v| decode("rounds", &format!("{job_id}/{r}"), v.value()))
                    .transpose()?;
                if let Some(mut round) = found
                    && round.state == RoundState::Open
                {
                    discarded_updates = std::mem::take(&mut round.accepted);
                    round.discarded.extend(discarded_updates.iter().cloned());
                    round.selected.clear();
                    rounds
                        .insert((job_id, r), encode(&round)?.as_str())
                        .map_err(dberr)?;
                    reopened_round = Some(RoundId(r));
                }
            }
            txn.commit().map_err(dberr)?;
        }
        Ok(Recovery {
            snapshot: Snapshot {
                completed_rounds: rec.completed_rounds,
                model: rec.current_model,
                paused: rec.paused,
                outcome: rec.outcome,
            },
            job,
            model,
            optimizer_state,
            reopened_round,
            discarded_updates,
        })
    }
}

/// Read the header of a model file (magic, spec length, spec) from `r`,
/// positioned at its start, and check that the file's length `file_len`
/// is exactly the header plus the spec's values. Returns the spec and the
/// number of value bytes that follow; the error says what is wrong.
pub(crate) fn read_model_header(
    r: &mut impl Read,
    file_len: u64,
) -> Result<(ModelSpec, u64), ModelHeaderError> {
    use ModelHeaderError as E;
    let mut head = [0u8; 12];
    r.read_exact(&mut head).map_err(E::ShortHeader)?;
    if &head[..8] != MODEL_MAGIC {
        return Err(E::BadMagic);
    }
    let spec_len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if spec_len > MAX_SPEC_BYTES || u64::from(spec_len) + 12 > file_len {
        return Err(E::SpecLength(spec_len));
    }
    let mut spec = vec![0u8; spec_len as usize];
    r.read_exact(&mut spec).map_err(E::ShortSpec)?;
    let spec: ModelSpec = serde_json::from_slice(&spec).map_err(E::BadSpec)?;
    let n = spec.num_params();
    let values_len = n.checked_mul(4);
    if values_len.and_then(|b| b.checked_add(12 + u64::from(spec_len))) != Some(file_len) {
        return Err(E::Length {
            file_len,
            values: n,
        });
    }
    Ok((spec, values_len.unwrap_or(0)))
}

/// What is wrong with a model file's header ([`read_model_header`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ModelHeaderError {
    /// The file ends (or reading fails) inside the 12-byte header.
    #[error("short header: {0}")]
    ShortHeader(#[source] std::io::Error),
    /// The file does not start with the model magic.
    #[error("bad magic")]
    BadMagic,
    /// The spec length is over the limit or past the file's end.
    #[error("spec length {0} out of range")]
    SpecLength(u32),
    /// The file ends (or reading fails) inside the spec.
    #[error("short spec: {0}")]
    ShortSpec(#[source] std::io::Error),
    /// The spec is not a model spec's JSON.
    #[error("bad spec: {0}")]
    BadSpec(#[source] serde_json::Error),
    /// The file's length is not the header plus the spec's values.
    #[error("file is {file_len} bytes, spec declares {values} values")]
    Length {
        /// The file's length.
        file_len: u64,
        /// The number of values the spec declares.
        values: u64,
    },
}

/// Values per read of [`read_model_file`] (1 MiB, the reader's buffer:
/// reads this large bypass it).
const MODEL_READ_PIECE: usize = 256 * 1024;

/// A model file opened for reading: past its header, its spec known.
struct ModelFile {
    path: PathBuf,
    reader: BufReader<File>,
    spec: ModelSpec,
    num_values: usize,
}

impl ModelFile {
    /// Open model `hash`'s file at `path` and read its header.
    fn open(path: &Path, hash: &ModelHash) -> Result<Self, StoreError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::ModelMissing(*hash));
            }
            Err(e) => return Err(io("open", path)(e)),
        };
        let len = file.metadata().map_err(io("stat", path))?.len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let (spec, _) =
            read_model_header(&mut reader, len).map_err(|e| corrupt(path, e.to_string()))?;
        let num_values = usize::try_from(spec.num_params())
            .map_err(|_| corrupt(path, "model too large".into()))?;
        Ok(Self {
            path: path.to_owned(),
            reader,
            spec,
            num_values,
        })
    }

    /// Read the next `piece.len()` values into `piece` (the file is
    /// little-endian).
    fn read_values(&mut self, piece: &mut [f32]) -> Result<(), StoreError> {
        self.reader
            .read_exact(bytemuck::cast_slice_mut(piece))
            .map_err(|e| corrupt(&self.path, format!("short values: {e}")))?;
        if cfg!(target_endian = "big") {
            for v in piece.iter_mut() {
                *v = f32::from_bits(u32::from_le(v.to_bits()));
            }
        }
        Ok(())
    }

    /// The error unless the values read hash to `hash`.
    fn verify(&self, hasher: ModelHasher, hash: &ModelHash) -> Result<(), StoreError> {
        let actual = hasher.finalize();
        if actual != *hash {
            return Err(corrupt(
                &self.path,
                format!("content hash is {actual}, expected {hash}"),
            ));
        }
        Ok(())
    }
}

fn corrupt(path: &Path, reason: String) -> StoreError {
    StoreError::ModelCorrupt {
        path: path.to_owned(),
        reason,
    }
}

/// Read a model file written by [`Store::put_model`] (without opening the
/// database, e.g. while a coordinator holds it) and verify that its content
/// hash is `hash`.
pub fn read_model_file(path: &Path, hash: &ModelHash) -> Result<FlatModel, StoreError> {
    let mut file = ModelFile::open(path, hash)?;
    let mut hasher = ModelHasher::new(&file.spec);
    // The values straight into their buffer (its size is the file's, checked
    // by the header), in 1 MiB pieces hashed as they arrive: no staging copy
    // and no per-value conversion (the file is little-endian). A zeroed
    // allocation, so that each page is faulted in once, by the read.
    let mut values = vec![0f32; file.num_values];
    for piece in values.chunks_mut(MODEL_READ_PIECE) {
        file.read_values(piece)?;
        hasher.update(piece);
    }
    file.verify(hasher, hash)?;
    let spec = file.spec.clone();
    FlatModel::new(spec, values).map_err(|e| corrupt(path, e.to_string()))
}

/// `update ← base + update`, with `base` model `hash`'s file at `path`
/// read piece by piece through one 1 MiB buffer and its hash verified: the
/// round's end's `x + u` without a second model-sized buffer (the base is
/// never whole in memory). Bit for bit what adding `update` to the loaded
/// base gives (`a + b == b + a` in IEEE 754). On an error `update` is
/// partly summed and must be discarded.
pub fn add_model_file(
    path: &Path,
    hash: &ModelHash,
    update: &mut FlatModel,
) -> Result<(), StoreError> {
    let mut file = ModelFile::open(path, hash)?;
    if file.spec != *update.spec() {
        return Err(corrupt(path, "its spec is not the update's".to_string()));
    }
    let mut hasher = ModelHasher::new(&file.spec);
    let mut base = vec![0f32; MODEL_READ_PIECE.min(file.num_values)];
    for sum in update.values_mut().chunks_mut(MODEL_READ_PIECE) {
        let piece = base.get_mut(..sum.len()).unwrap_or_default();
        file.read_values(piece)?;
        hasher.update(piece);
        for (u, &x) in sum.iter_mut().zip(piece.iter()) {
            *u += x;
        }
    }
    file.verify(hasher, hash)
}

pub(crate) mod wire;

#[cfg(test)]
mod tests;
