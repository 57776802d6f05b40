//! The site log: an append-only JSON Lines record of what the agent
//! received, trained, sent and refused.
//!
//! One JSON object per line, written and `fsync`ed before [`SiteLog::append`]
//! returns:
//!
//! ```json
//! {"seq":7,"ts_unix_ms":1718000000000,"event":"sent","details":{"job_id":"j","round":3,...}}
//! ```
//!
//! * `seq` counts from 1 and continues across restarts (the last line of an
//!   existing file is read on open);
//! * `event` is one of the [`Event`] names (`connected`, `disconnected`,
//!   `offer_received`, `offer_declined`, `offer_accepted`, `model_cached`,
//!   `model_fetched`, `trained`, `sent`, `upload_result`, `cancelled`,
//!   `task_failed`, `agent_started`, `agent_stopped`);
//! * `details` holds identifiers, hashes, counts and aggregate metrics
//!   only: never data. The dataset appears as its fingerprint.
//!
//! The file is opened in append mode, created with mode 0600, never
//! truncated. Every write goes through this module so that hash chaining
//! and signatures can be added here later without touching callers.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest line read back when resuming the sequence number.
const MAX_LINE: u64 = 1 << 20;

/// Why the site log could not be written or read.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SiteLogError {
    /// File system error.
    #[error("site log {path}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An existing line is not a site-log entry.
    #[error("site log {path}: line {line} is not a site-log entry: {message}")]
    Corrupt {
        /// The log file.
        path: PathBuf,
        /// 1-based line number (0: the last line).
        line: u64,
        /// What is wrong.
        message: String,
    },
}

/// One line of the site log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Sequence number, from 1, gap-free.
    pub seq: u64,
    /// Wall-clock time of the entry, unix milliseconds.
    pub ts_unix_ms: u64,
    /// Event name.
    pub event: String,
    /// Event fields (identifiers, hashes, counts, aggregate metrics).
    pub details: serde_json::Value,
}

/// What happened (the `event` and `details` of an entry).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", content = "details", rename_all = "snake_case")]
pub enum Event {
    /// The agent started.
    AgentStarted {
        /// Agent version.
        agent_version: String,
        /// Site identity (from the kit).
        identity: String,
        /// Dataset kind.
        dataset_kind: String,
        /// Dataset fingerprint.
        dataset_fingerprint: String,
        /// Training samples.
        train_samples: usize,
        /// Validation samples.
        validation_samples: usize,
        /// Device name.
        device: String,
    },
    /// The agent stopped.
    AgentStopped {
        /// Why.
        reason: String,
    },
    /// Connected and welcomed by the coordinator.
    Connected {
        /// Coordinator address.
        coordinator: String,
        /// Site id the coordinator knows us by.
        site_id: String,
        /// Federation.
        federation_id: String,
        /// Negotiated protocol version.
        protocol_version: u16,
    },
    /// A connection ended or an attempt failed.
    Disconnected {
        /// Why.
        reason: String,
        /// Delay before the next attempt, milliseconds (none on shutdown).
        retry_in_ms: Option<u64>,
    },
    /// An offer arrived.
    OfferReceived {
        /// Job.
        job_id: String,
        /// Round.
        round: u64,
        /// Global model hash.
        base_model: String,
        /// Architecture kind.
        arch: String,
        /// Epochs asked for.
        epochs: u32,
        /// Delta encoding.
        encoding: String,
        /// Clip norm, if any.
        clip_norm: Option<f64>,
        /// DP noise multiplier, if any.
        noise_multiplier: Option<f64>,
    },
    /// The offer was declined.
    OfferDeclined {
        /// Job.
        job_id: String,
        /// Round.
        round: u64,
        /// Why (also sent to the coordinator).
        reason: String,
    },
    /// The offer was accepted.
    OfferAccepted {
        /// Job.
        job_id: String,
        /// Round.
        round: u64,
    },
    /// The global model was found in the local cache.
    ModelCached {
        /// Model hash (verified on load).
        model_hash: String,
    },
    /// The global model was downloaded and verified.
    ModelFetched {
        /// Model hash.
        model_hash: String,
        /// Payload bytes received.
        bytes: u64,
        /// Parameters.
        params: u64,
    },
    /// Local training finished.
    Trained {
        /// Job.
        job_id: String,
        /// Round.
        round: u64,
        /// Dataset fingerprint.
        dataset_fingerprint: String,
        /// Epochs run.
        epochs: usize,
        /// Training samples.
        samples: usize,
        /// Training time, milliseconds.
        duration_ms: u64,
        /// Mean training loss of each epoch.
        epoch_loss: Vec<f64>,
        /// Metrics of the global model on the validation split (sent).
        global_eval: Option<MetricsSummary>,
        /// L2 norm of the delta before clipping.
        delta_norm: f64,
        /// Whether the delta was clipped.
        clipped: bool,
        /// Whether DP noise was added.
        dp_noise: bool,
        /// How the features were standardised: `federated` (the offer's
        /// scaling), `local` (local statistics) or `none` (not tabular).
        feature_scaling: String,
    },
    /// The signed delta was uploaded.
    Sent {
        /// Job.
        job_id: String,
        /// Round.
        round: u64,
        /// blake3 of the payload.
        payload_hash: String,
        /// Payload bytes.
        bytes: u64,
        /// Examples claimed (aggregation weight).
        num_examples: u64,
        /// Encoding.
        encoding: String,
        /// Whether the header carried the feature statistics (count, Σx,
        /// Σx² per column of the training split).
        feature_stats: bool,
    },
    /// What the coordinator said about the upload.
    UploadResult {
        /// Job.
        job_id: String,
        /// Round.
        round: u64,
        /// `ack` or `reject`.
        outcome: String,
        /// For an ack: whether the update will be aggregated.
        accepted: Option<bool>,
        /// For a reject: code and message.
        reason: Option<String>,
    },
    /// The coordinator cancelled a round.
    Cancelled {
        /// Job.
        job_id: String,
        /// Round.
        round: u64,
        /// Coordinator's reason.
        reason: String,
        /// Whether work in progress was dropped.
        dropped_work: bool,
    },
    /// Work on an accepted round failed locally or on the network.
    TaskFailed {
        /// Job.
        job_id: String,
        /// Round.
        round: u64,
        /// What failed.
        error: String,
    },
}

/// Aggregate metrics as logged (never per-sample values).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsSummary {
    /// Samples evaluated.
    pub n: u64,
    /// Mean loss.
    pub loss: Option<f64>,
    /// Accuracy.
    pub accuracy: Option<f64>,
    /// ROC AUC.
    pub auc: Option<f64>,
    /// Dice.
    pub dice: Option<f64>,
}

impl From<&fedlink_protocol::EvalMetrics> for MetricsSummary {
    fn from(m: &fedlink_protocol::EvalMetrics) -> Self {
        Self {
            n: m.num_eval_examples,
            loss: m.loss,
            accuracy: m.accuracy,
            auc: m.auc,
            dice: m.dice,
        }
    }
}

impl Event {
    /// The entry's `event` name and `details`.
    fn split(&self) -> (String, serde_json::Value) {
        // `Event` is plain data: serialising it to a JSON value cannot fail
        // except for non-finite floats, which serde_json writes as null.
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut m)) => {
                let name = match m.remove("event") {
                    Some(serde_json::Value::String(s)) => s,
                    _ => String::from("unknown"),
                };
                let details = m.remove("details").unwrap_or(serde_json::Value::Null);
                (name, details)
            }
            Ok(_) | Err(_) => (String::from("unknown"), serde_json::Value::Null),
        }
    }

    /// The `event` name of this event.
    pub fn name(&self) -> String {
        self.split().0
    }
}

/// The append-only site log file.
#[derive(Debug)]
pub struct SiteLog {
    path: PathBuf,
    file: File,
    next_seq: u64,
}

impl SiteLog {
    /// Open (or create, mode 0600) the log at `path` and continue its
    /// sequence. The parent directory must exist.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, SiteLogError> {
        let path = path.into();
        let io = |source| SiteLogError::Io {
            path: path.clone(),
            source,
        };
        let mut opts = OpenOptions::new();
        opts.read(true).append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(&path).map_err(io)?;
        let last = last_seq(&mut file).map_err(|e| match e {
            LastSeq::Io(source) => io(source),
            LastSeq::Corrupt(message) => SiteLogError::Corrupt {
                path: path.clone(),
                line: 0,
                message,
            },
        })?;
        Ok(Self {
            path,
            file,
            next_seq: last + 1,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one entry and fsync; returns it.
    pub fn append(&mut self, ts_unix_ms: u64, event: &Event) -> Result<LogEntry, SiteLogError> {
        let (name, details) = event.split();
        let entry = LogEntry {
            seq: self.next_seq,
            ts_unix_ms,
            event: name,
            details,
        };
        let mut line = serde_json::to_vec(&entry).map_err(|e| SiteLogError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let io = |source| SiteLogError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&line).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.next_seq += 1;
        Ok(entry)
    }
}

enum LastSeq {
    Io(std::io::Error),
    Corrupt(String),
}

/// The `seq` of the last line (0 for an empty file).
fn last_seq(file: &mut File) -> Result<u64, LastSeq> {
    let len = file.metadata().map_err(LastSeq::Io)?.len();
    if len == 0 {
        return Ok(0);
    }
    let start = len.saturating_sub(MAX_LINE);
    file.seek(SeekFrom::Start(start)).map_err(LastSeq::Io)?;
    let mut tail = Vec::new();
    file.take(MAX_LINE)
        .read_to_end(&mut tail)
        .map_err(LastSeq::Io)?;
    if tail.last() != Some(&b'\n') {
        return Err(LastSeq::Corrupt(
            "the last line is incomplete (crash during a write?); move the file aside".into(),
        ));
    }
    let body = &tail[..tail.len() - 1];
    let line = match body.iter().rposition(|&b| b == b'\n') {
        Some(i) => &body[i + 1..],
        None if start == 0 => body,
        None => return Err(LastSeq::Corrupt("the last line is too long".into())),
    };
    let entry: LogEntry =
        serde_json::from_slice(line).map_err(|e| LastSeq::Corrupt(e.to_string()))?;
    Ok(entry.seq)
}

/// Read every entry of a site log (for tools and tests), checking that
/// sequence numbers count up from 1 without gaps.
pub fn read_log(path: impl AsRef<Path>) -> Result<Vec<LogEntry>, SiteLogError> {
    let path = path.as_ref();
    let io = |source| SiteLogError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        let lineno = i as u64 + 1;
        let corrupt = |message: String| SiteLogError::Corrupt {
            path: path.to_path_buf(),
            line: lineno,
            message,
        };
        let entry: LogEntry = serde_json::from_str(&line).map_err(|e| corrupt(e.to_string()))?;
        if entry.seq != lineno {
            return Err(corrupt(format!(
                "seq {} where {lineno} was expected",
                entry.seq
            )));
        }
        out.push(entry);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stopped(r: &str) -> Event {
        Event::AgentStopped { reason: r.into() }
    }

    #[test]
    fn appends_lines_and_continues_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        {
            let mut log = SiteLog::open(&path).unwrap();
            let e = log.append(5, &stopped("a")).unwrap();
            assert_eq!(e.seq, 1);
            assert_eq!(e.event, "agent_stopped");
            assert_eq!(e.details["reason"], "a");
            log.append(
                6,
                &Event::OfferAccepted {
                    job_id: "j".into(),
                    round: 2,
                },
            )
            .unwrap();
        }
        let mut log = SiteLog::open(&path).unwrap();
        assert_eq!(log.append(7, &stopped("b")).unwrap().seq, 3);
        let all = read_log(&path).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[1].event, "offer_accepted");
        assert_eq!(all[1].details["round"], 2);
        assert_eq!(all[2].ts_unix_ms, 7);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().all(|l| l.starts_with("{\"seq\":")));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        }
    }

    #[test]
    fn refuses_a_torn_or_foreign_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        std::fs::write(&path, "{\"seq\":1,\"ts_unix_ms\":1,\"event\":\"x\"").unwrap();
        assert!(matches!(
            SiteLog::open(&path),
            Err(SiteLogError::Corrupt { .. })
        ));
        std::fs::write(&path, "hello\n").unwrap();
        assert!(matches!(
            SiteLog::open(&path),
            Err(SiteLogError::Corrupt { .. })
        ));
    }

    #[test]
    fn read_log_checks_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        std::fs::write(
            &path,
            "{\"seq\":1,\"ts_unix_ms\":1,\"event\":\"x\",\"details\":null}\n\
             {\"seq\":3,\"ts_unix_ms\":1,\"event\":\"x\",\"details\":null}\n",
        )
        .unwrap();
        let e = read_log(&path).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
