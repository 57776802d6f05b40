//! The admin API's own state, held in [`super::shared::Shared`]: the store,
//! the CA certificate and the registry files, the job queue file
//! (`queue.json`), the current job and the open admin connections; plus the
//! admin answers' error helpers. Depends on nothing else in `server/`, so
//! that `shared` can hold it while the admin API (`admin`) uses `shared`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use fedlink_certs::rustls_pki_types::CertificateDer;
use fedlink_protocol::JobId;
use fedlink_protocol::admin::{AdminErrorCode, JobInfo};
use fedlink_transport::ServerConn;

use crate::job::Job;
use crate::store::{JobRecord, Store};

/// File in the data directory with the ids of submitted jobs, in order.
pub(crate) const QUEUE_FILE: &str = "queue.json";

pub(super) type Fail = (AdminErrorCode, String);

pub(super) fn invalid(e: impl std::fmt::Display) -> Fail {
    (AdminErrorCode::Invalid, e.to_string())
}

pub(super) fn internal(e: impl std::fmt::Display) -> Fail {
    (AdminErrorCode::Internal, e.to_string())
}

pub(super) fn refused(msg: impl Into<String>) -> Fail {
    (AdminErrorCode::Refused, msg.into())
}

pub(super) fn not_found(msg: impl Into<String>) -> Fail {
    (AdminErrorCode::NotFound, msg.into())
}

/// What the admin API needs besides the connection tasks' state (`Shared`).
pub(crate) struct AdminState {
    pub(super) store: Arc<Store>,
    pub(super) ca_cert: CertificateDer<'static>,
    pub(super) revoked_path: PathBuf,
    pub(super) queue_path: PathBuf,
    pub(super) started: Instant,
    /// The job the engine runs (set by the serve loop).
    pub(super) current_job: RwLock<Option<String>>,
    /// Serialises registry edits (read-modify-write of the TOML files).
    pub(super) registry: tokio::sync::Mutex<()>,
    /// Open admin connections (by quinn's stable id), so that a revocation
    /// cuts them at once.
    pub(super) conns: Mutex<HashMap<usize, OpenAdmin>>,
    /// Where submitted jobs may read initial-model files (`init_dir`).
    pub(super) init_dir: Option<PathBuf>,
}

/// An open admin connection (its handle records why the coordinator cut
/// it, before it is cut: `conn.closed` reads it).
pub(super) struct OpenAdmin {
    pub(super) conn: ServerConn,
}

/// Keeps an admin connection in [`AdminState::conns`] while it is served.
pub(super) struct Registered<'a> {
    pub(super) state: &'a AdminState,
    pub(super) id: usize,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.state.conns.lock() {
            m.remove(&self.id);
        }
    }
}

impl AdminState {
    pub(crate) fn new(
        store: Arc<Store>,
        ca_cert: CertificateDer<'static>,
        revoked_path: PathBuf,
        init_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            init_dir,
            queue_path: store.dir().join(QUEUE_FILE),
            store,
            ca_cert,
            revoked_path,
            started: Instant::now(),
            current_job: RwLock::new(None),
            registry: tokio::sync::Mutex::new(()),
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// Record which job the engine runs now.
    pub(crate) fn set_current_job(&self, id: &str) {
        if let Ok(mut c) = self.current_job.write() {
            *c = Some(id.to_owned());
        }
    }

    /// The store.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub(super) fn current_job(&self) -> Option<String> {
        self.current_job.read().ok().and_then(|c| c.clone())
    }

    /// Submitted job ids, in order (a missing file: none).
    pub(super) fn queue(&self) -> Result<Vec<String>, QueueError> {
        read_queue(&self.queue_path)
    }

    /// The first submitted job that has not finished and is not the current
    /// one: the job to run next.
    pub(crate) fn next_queued(&self) -> Option<String> {
        let current = self.current_job();
        let queue = match self.queue() {
            Ok(q) => q,
            Err(e) => {
                // No job switch is taken on a queue that cannot be read
                // (an admin's `status` and `jobs list` say why).
                tracing::error!(error = %e, "reading the job queue; no queued job is started");
                return None;
            }
        };
        crate::core::queue::next_job(
            &queue,
            current.as_deref(),
            |id| matches!(self.store.job(id), Ok(Some(r)) if r.outcome.is_none()),
        )
        .map(str::to_owned)
    }

    /// The jobs waiting behind the current one; a queue file that cannot
    /// be read is an error naming it, not an empty queue.
    pub(super) fn queued_jobs(&self) -> Result<Vec<JobId>, Fail> {
        let current = self.current_job();
        let queue = self.queue().map_err(queue_unreadable)?;
        crate::core::queue::queued(
            &queue,
            current.as_deref(),
            |id| matches!(self.store.job(id), Ok(Some(r)) if r.outcome.is_none()),
        )
        .into_iter()
        .map(job_id)
        .collect()
    }

    pub(super) fn job_info(&self, rec: &JobRecord, with_toml: bool) -> Result<JobInfo, Fail> {
        let total_rounds = Job::from_toml(&rec.job_toml)
            .map(|j| u64::from(j.rounds))
            .unwrap_or(0);
        let current = self.current_job();
        let mut unreadable = None;
        let state = crate::core::jobs::job_state(
            rec.outcome.is_some(),
            current.as_deref() == Some(rec.id.as_str()),
            || match self.queue() {
                Ok(queue) => queue.contains(&rec.id),
                Err(e) => {
                    unreadable = Some(e);
                    false
                }
            },
            rec.paused,
        );
        if let Some(e) = unreadable {
            return Err(queue_unreadable(e));
        }
        Ok(JobInfo {
            id: job_id(&rec.id)?,
            state: state.to_owned(),
            completed_rounds: rec.completed_rounds,
            total_rounds,
            initial_model: rec.initial_model,
            current_model: rec.current_model,
            paused: rec.paused,
            outcome: rec.outcome.as_ref().map(ToString::to_string),
            job_toml: with_toml.then(|| rec.job_toml.clone()),
        })
    }
}

/// Largest `queue.json` read (job ids are short; thousands fit).
const MAX_QUEUE_FILE: u64 = 1 << 20;

/// Why the queue of submitted jobs (`queue.json`) cannot be read or
/// written.
#[derive(Debug, thiserror::Error)]
pub(super) enum QueueError {
    /// Reading or writing the file failed (or it is over its size limit).
    #[error(transparent)]
    File(#[from] crate::round_archive::ArchiveError),
    /// The file is not a JSON list of job ids.
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The list could not be serialized.
    #[error(transparent)]
    Serialize(serde_json::Error),
    /// The configured path names no file in a directory.
    #[error("{}: not a file path", .0.display())]
    NotAFilePath(PathBuf),
}

/// What an admin is told when the queue file cannot be read (its error
/// names the file).
pub(super) fn queue_unreadable(e: QueueError) -> Fail {
    internal(format!("reading the job queue: {e}"))
}

pub(super) fn read_queue(path: &Path) -> Result<Vec<String>, QueueError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let bytes = crate::round_archive::read_bounded(path, MAX_QUEUE_FILE)?;
    serde_json::from_slice(&bytes).map_err(|source| QueueError::Parse {
        path: path.to_owned(),
        source,
    })
}

pub(super) fn append_queue(path: &Path, id: &str) -> Result<(), QueueError> {
    let mut q = read_queue(path)?;
    if !q.iter().any(|x| x == id) {
        q.push(id.to_owned());
    }
    let json = serde_json::to_vec_pretty(&q).map_err(QueueError::Serialize)?;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(QueueError::NotAFilePath(path.to_owned()));
    };
    Ok(crate::round_archive::write_atomic(dir, name, &json)?)
}

/// A job id from the store or the queue as the typed id the admin API
/// answers with. Job ids were validated when their job was submitted or
/// configured, so a refusal means a store written by something else: an
/// internal error, not a panic.
pub(super) fn job_id(id: &str) -> Result<JobId, Fail> {
    JobId::new(id).map_err(|e| internal(format!("stored job id: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_queue_file_is_appended_once_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.json");
        assert!(read_queue(&path).unwrap().is_empty());
        append_queue(&path, "a").unwrap();
        append_queue(&path, "b").unwrap();
        append_queue(&path, "a").unwrap();
        assert_eq!(read_queue(&path).unwrap(), ["a", "b"]);
        std::fs::write(&path, b"{not json").unwrap();
        let err = read_queue(&path).unwrap_err();
        assert!(matches!(err, QueueError::Parse { .. }), "{err:?}");
        assert!(err.to_string().contains("queue.json"), "{err}");
        assert!(matches!(
            append_queue(&path, "c").unwrap_err(),
            QueueError::Parse { .. }
        ));
    }
}
