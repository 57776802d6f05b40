//! `status.json` in the data directory: a small, atomically replaced
//! snapshot of where the job stands, for operators, scripts and the demo.
//! It is informational; the store is the source of truth.

use std::collections::BTreeMap;
use std::path::PathBuf;

use fedlink_protocol::FeatureScaling;
use fedlink_protocol::admin::FederatedEvaluation;
use serde::{Deserialize, Serialize};

/// File name of the status snapshot in the data directory.
pub const STATUS_FILE: &str = "status.json";

/// One round as shown in the status file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundStatus {
    /// Round number.
    pub round: u64,
    /// Open, Completed or Discarded.
    pub state: String,
    /// New global model (hex), once completed.
    pub model: Option<String>,
    /// Accepted updates: (site, payload bytes, num_examples).
    pub updates: Vec<(String, u64, u64)>,
    /// Aggregation and federated-evaluation metrics.
    pub metrics: BTreeMap<String, f64>,
    /// The sites' federated evaluation of the round's base model (per site
    /// and example-weighted), when the job asks for that model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<FederatedEvaluation>,
    /// The sites' evaluation of the round's model, the job's final one,
    /// which they were asked for after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_evaluation: Option<FederatedEvaluation>,
}

/// The status snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Job id.
    pub job: String,
    /// The round machine's phase (debug form).
    pub phase: String,
    /// Rounds completed.
    pub completed_rounds: u64,
    /// Rounds in the job.
    pub total_rounds: u64,
    /// Current global model (hex).
    pub current_model: String,
    /// Sites connected now.
    pub connected_sites: Vec<String>,
    /// How the job ended (debug form), if it has.
    pub finished: Option<String>,
    /// Whether it ended by completing every round.
    pub completed: bool,
    /// Every round so far.
    pub rounds: Vec<RoundStatus>,
    /// The federated feature standardisation that offers carry now (pooled
    /// from the sites' reported statistics; `None` before any report, or
    /// for non-tabular data): what the sites standardise their features
    /// with, so also what a held-out test set must be standardised with.
    #[serde(default)]
    pub scaling: Option<FeatureScaling>,
    /// The job's newest federated evaluation (per site and
    /// example-weighted), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<FederatedEvaluation>,
    /// When this snapshot was written (Unix ms).
    pub updated_unix_ms: u64,
}

/// Writes [`Status`] atomically for readers (temporary file + rename), not
/// fsynced (`fedlink_durable::replace_atomic_only`): it is rewritten several
/// times a round, records nothing the store does not hold, and the
/// coordinator writes it again as it starts; after a power cut it may be
/// stale or empty until then. (Its two fsyncs were on the path from a
/// round's last upload to the next offer.)
#[derive(Debug)]
pub(crate) struct StatusWriter {
    path: PathBuf,
}

impl StatusWriter {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub(crate) fn write(&self, status: &Status) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
        fedlink_durable::replace_atomic_only(&self.path, &json, fedlink_durable::Mode::Private)?;
        Ok(())
    }
}
