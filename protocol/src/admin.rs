//! The admin API: what the `fedlink` CLI asks a running coordinator and what
//! it answers (pure types and JSON coding; no IO).
//!
//! ```text
//!  fedlink CLI ──QUIC/mTLS, ALPN fedlink-admin/1, admin certificate──▶ coordinator
//!    one bidirectional stream per command:
//!      CLI → chunk frame: AdminRequest (JSON), then FIN
//!      CLI ← chunk frame: AdminResponse (JSON)
//!            [ModelsExport only: then the model's values, f32 little-endian,
//!             in stored order, as chunk frames of ≤ EXPORT_CHUNK_BYTES; FIN]
//! ```
//!
//! The documents travel as the bodies of ordinary length-prefixed chunk
//! frames ([`crate::frame`]), so one document is at most
//! [`crate::MAX_FRAME_LEN`] bytes. The version of this API is the ALPN
//! protocol (`fedlink-admin/1`): an incompatible change takes a new ALPN.
//! Errors come back as [`AdminResponse::Error`] with a typed
//! [`AdminErrorCode`].
//!
//! ```
//! use fedlink_protocol::admin::{AdminRequest, AdminResponse};
//! let req = AdminRequest::SitesShow { name: "st-mary".into() };
//! let bytes = req.to_json()?;
//! assert_eq!(AdminRequest::from_json(&bytes)?, req);
//! assert_eq!(req.command(), "sites.show");
//! let resp = AdminResponse::error(fedlink_protocol::admin::AdminErrorCode::NotFound, "no such site");
//! assert!(AdminResponse::from_json(&resp.to_json()?)?.is_error());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use serde::{Deserialize, Serialize};

use crate::frame::MAX_FRAME_LEN;
use crate::ids::{FederationId, JobId, RoundId, SiteId};
use crate::model::{ModelHash, ModelSpec};
use crate::payload::PayloadHash;

/// Largest chunk of model bytes in an export stream (4 MiB).
pub const EXPORT_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Why an admin document could not be encoded or decoded.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AdminCodecError {
    /// The document is larger than one frame.
    #[error("admin document of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not valid JSON for the expected type.
    #[error("malformed admin document: {0}")]
    Json(String),
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, AdminCodecError> {
    let bytes = serde_json::to_vec(v).map_err(|e| AdminCodecError::Json(e.to_string()))?;
    if bytes.len() > MAX_FRAME_LEN {
        return Err(AdminCodecError::TooLarge {
            len: bytes.len(),
            max: MAX_FRAME_LEN,
        });
    }
    Ok(bytes)
}

fn from_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, AdminCodecError> {
    if bytes.len() > MAX_FRAME_LEN {
        return Err(AdminCodecError::TooLarge {
            len: bytes.len(),
            max: MAX_FRAME_LEN,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| AdminCodecError::Json(e.to_string()))
}

/// Output format of a model export.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// safetensors with PyTorch tensor names and layouts.
    Safetensors,
}

/// One admin command.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", content = "args", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Federation, version, uptime, current job and round, queued jobs.
    Status,
    /// Every registered site.
    SitesList,
    /// One site.
    SitesShow {
        /// Site name.
        name: String,
    },
    /// Register a site whose certificate the federation CA issued.
    SitesApprove {
        /// The site's TLS certificate (PEM).
        cert_pem: String,
        /// Its ed25519 update public key: SPKI PEM or 64 hex digits.
        update_key: String,
        /// The most training examples its updates may claim (`max_examples`
        /// in `sites.toml`); none: only the job's limit applies.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_examples: Option<u64>,
    },
    /// Revoke a site: its certificate and update key are refused from now on.
    SitesRevoke {
        /// Site name.
        name: String,
        /// Why (recorded).
        reason: Option<String>,
    },
    /// Replace a site's certificate (and optionally its update key).
    SitesRotate {
        /// Site name.
        name: String,
        /// The new TLS certificate (PEM), same identity.
        cert_pem: String,
        /// A new update public key, if it changes.
        update_key: Option<String>,
    },
    /// Queue a job (TOML job file text).
    JobsSubmit {
        /// The job file.
        job_toml: String,
    },
    /// Every job.
    JobsList,
    /// One job.
    JobsShow {
        /// Job id.
        id: String,
    },
    /// Start no new round of a job until resumed.
    JobsPause {
        /// Job id.
        id: String,
    },
    /// Lift a pause.
    JobsResume {
        /// Job id.
        id: String,
    },
    /// End a job (the round in flight is cancelled).
    JobsAbort {
        /// Job id.
        id: String,
    },
    /// The rounds of a job.
    RoundsList {
        /// Job id.
        job: String,
    },
    /// One round of a job.
    RoundsShow {
        /// Job id.
        job: String,
        /// Round number.
        round: RoundId,
    },
    /// Every stored model version.
    ModelsList,
    /// One model version, optionally with its provenance chain.
    ModelsShow {
        /// Model hash (hex).
        hash: String,
        /// Include the rounds back to the initial model.
        provenance: bool,
    },
    /// Stream a model version for export.
    ModelsExport {
        /// Model hash (hex).
        hash: String,
        /// Output format.
        format: ExportFormat,
    },
}

impl AdminRequest {
    /// Encode as a JSON document (at most one frame).
    pub fn to_json(&self) -> Result<Vec<u8>, AdminCodecError> {
        to_json(self)
    }

    /// Decode a JSON document.
    pub fn from_json(bytes: &[u8]) -> Result<Self, AdminCodecError> {
        from_json(bytes)
    }

    /// Dotted command name as the CLI spells it (`sites.approve`), for logs
    /// and the audit log.
    pub fn command(&self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::SitesList => "sites.list",
            Self::SitesShow { .. } => "sites.show",
            Self::SitesApprove { .. } => "sites.approve",
            Self::SitesRevoke { .. } => "sites.revoke",
            Self::SitesRotate { .. } => "sites.rotate",
            Self::JobsSubmit { .. } => "jobs.submit",
            Self::JobsList => "jobs.list",
            Self::JobsShow { .. } => "jobs.show",
            Self::JobsPause { .. } => "jobs.pause",
            Self::JobsResume { .. } => "jobs.resume",
            Self::JobsAbort { .. } => "jobs.abort",
            Self::RoundsList { .. } => "rounds.list",
            Self::RoundsShow { .. } => "rounds.show",
            Self::ModelsList => "models.list",
            Self::ModelsShow { .. } => "models.show",
            Self::ModelsExport { .. } => "models.export",
        }
    }

    /// The command's arguments as a JSON object (`{}` for none).
    pub fn args(&self) -> serde_json::Value {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut m)) => m
                .remove("args")
                .filter(serde_json::Value::is_object)
                .unwrap_or_else(|| serde_json::Value::Object(serde_json::Map::new())),
            _ => serde_json::Value::Object(serde_json::Map::new()),
        }
    }
}

/// The admin documents carry model and payload hashes as the 64 lower-case
/// hex digits they were written as before they were typed (the protocol
/// messages carry them as byte arrays).
mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::model::ModelHash;
    use crate::payload::PayloadHash;

    pub(super) trait Hex: Sized {
        fn to_hex(&self) -> String;
        fn from_hex(s: &str) -> Option<Self>;
    }

    impl Hex for ModelHash {
        fn to_hex(&self) -> String {
            Self::to_hex(self)
        }
        fn from_hex(s: &str) -> Option<Self> {
            Self::from_hex(s)
        }
    }

    impl Hex for PayloadHash {
        fn to_hex(&self) -> String {
            Self::to_hex(self)
        }
        fn from_hex(s: &str) -> Option<Self> {
            Self::from_hex(s)
        }
    }

    pub(super) fn serialize<H: Hex, S: Serializer>(h: &H, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&h.to_hex())
    }

    pub(super) fn deserialize<'de, H: Hex, D: Deserializer<'de>>(d: D) -> Result<H, D::Error> {
        let s = String::deserialize(d)?;
        H::from_hex(&s).ok_or_else(|| D::Error::custom("not a hash (64 hex digits)"))
    }
}

/// Category of a refused or failed command.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminErrorCode {
    /// Not allowed in the current state (already registered, revoked key, …).
    Refused,
    /// No such site, job, round or model.
    NotFound,
    /// The request is malformed or its input invalid (bad certificate, bad job file).
    Invalid,
    /// The coordinator failed.
    Internal,
}

/// How a connected site reaches the coordinator (operator view).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkInfo {
    /// Site name.
    pub site: SiteId,
    /// `quic` or `tcp` (TLS 1.3 over TCP).
    pub transport: String,
    /// The site says its TCP connection goes through an HTTP proxy.
    pub via_proxy: bool,
    /// Round-trip time, milliseconds: QUIC's smoothed estimate; over TCP,
    /// the TLS handshake's duration.
    pub rtt_ms: f64,
    /// The peer address the coordinator sees (a proxy's or NAT's, maybe).
    pub remote: String,
}

impl LinkInfo {
    /// `quic`, `tcp` or `tcp+proxy`.
    pub fn route(&self) -> String {
        if self.via_proxy {
            format!("{}+proxy", self.transport)
        } else {
            self.transport.clone()
        }
    }
}

/// A registered site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteInfo {
    /// Site name.
    pub name: SiteId,
    /// Identity URI.
    pub identity: String,
    /// Serial of the current certificate (hex).
    pub cert_serial: String,
    /// SHA-256 fingerprint of the current certificate (hex).
    pub cert_fingerprint: String,
    /// ed25519 update public key (hex).
    pub update_public_key: String,
    /// When it was approved (RFC 3339).
    pub added_at: String,
    /// When its certificate was last replaced (RFC 3339).
    pub renewed_at: Option<String>,
    /// The most training examples its updates may claim, if declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_examples: Option<u64>,
    /// Connected to the running job now.
    pub connected: bool,
    /// Last connection, Unix ms (from the store).
    pub last_seen_unix_ms: Option<u64>,
    /// Its updates that went into completed rounds.
    pub updates_aggregated: Option<u64>,
    /// Its connection now, if connected (absent from older coordinators).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkInfo>,
}

/// One site in the current round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteProgress {
    /// Site name.
    pub site: SiteId,
    /// `offline`, `idle`, `training` (selected, no update yet) or `reported`.
    pub state: String,
    /// Connected now.
    pub connected: bool,
}

/// Where the running job stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobProgress {
    /// Job id.
    pub job: JobId,
    /// `waiting`, `collecting`, `aggregating` or `finished`.
    pub phase: String,
    /// Round in flight.
    pub round: Option<RoundId>,
    /// Rounds completed.
    pub completed_rounds: u64,
    /// Rounds in the job.
    pub total_rounds: u64,
    /// Current global model (hex in JSON).
    #[serde(with = "hex_hash")]
    pub current_model: ModelHash,
    /// Paused by an admin.
    pub paused: bool,
    /// Updates accepted in the round in flight.
    pub accepted: u32,
    /// How the job ended, if it has.
    pub outcome: Option<String>,
    /// Every registered or connected site.
    pub sites: Vec<SiteProgress>,
    /// The job's latest federated evaluation, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<FederatedEvaluation>,
}

/// One site's metrics of a global model on its own validation split (what
/// the site reported, signed, in its update header).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteEvaluation {
    /// Site name.
    pub site: String,
    /// Validation examples the site evaluated (the site's weight).
    pub num_eval_examples: u64,
    /// Mean loss.
    pub loss: Option<f64>,
    /// Accuracy.
    pub accuracy: Option<f64>,
    /// ROC AUC.
    pub auc: Option<f64>,
    /// Dice coefficient (segmentation).
    pub dice: Option<f64>,
}

/// The example-weighted mean of the sites' metrics: each metric is
/// `Σ nᵢ·mᵢ / Σ nᵢ` over the sites that reported it, `nᵢ` the site's
/// validation examples.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WeightedMetrics {
    /// Sites whose reports count.
    pub sites: u32,
    /// Their validation examples, all together.
    pub num_eval_examples: u64,
    /// Weighted mean loss.
    pub loss: Option<f64>,
    /// Weighted mean accuracy.
    pub accuracy: Option<f64>,
    /// Weighted mean ROC AUC.
    pub auc: Option<f64>,
    /// Weighted mean Dice coefficient.
    pub dice: Option<f64>,
}

/// A site's report that does not count, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExcludedEvaluation {
    /// Site name.
    pub site: String,
    /// Why it was left out.
    pub reason: String,
}

/// Federated evaluation of one global model: each site's metrics on its
/// own validation split, and their example-weighted mean.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FederatedEvaluation {
    /// The evaluated global model (hex).
    pub model: String,
    /// Rounds completed when the model was made (0: the initial model).
    pub after_round: u64,
    /// The round whose updates carried the sites' metrics in their signed
    /// headers; `None`: the sites answered the coordinator's evaluation
    /// request (signed `EvalReport`s; the final model of a job).
    pub reported_in_round: Option<u64>,
    /// Per site, by name.
    pub sites: Vec<SiteEvaluation>,
    /// The example-weighted mean.
    pub weighted: WeightedMetrics,
    /// Reports left out (metrics missing, out of range or not finite).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<ExcludedEvaluation>,
}

/// `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Federation name.
    pub federation: FederationId,
    /// Coordinator version.
    pub coordinator_version: String,
    /// Seconds since the coordinator started.
    pub uptime_secs: u64,
    /// The job the coordinator runs (or ran last); `None`: no job has run
    /// since the coordinator started empty.
    pub current_job: Option<JobProgress>,
    /// Submitted jobs waiting for their turn, in order.
    pub queued_jobs: Vec<JobId>,
    /// Sites connected now, sorted (absent from older coordinators).
    #[serde(default)]
    pub connected_sites: Vec<SiteId>,
    /// How each connected site is connected, by site (absent from older
    /// coordinators).
    #[serde(default)]
    pub links: Vec<LinkInfo>,
}

/// A job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Job id.
    pub id: JobId,
    /// `running`, `paused`, `queued` or `finished`.
    pub state: String,
    /// Rounds completed.
    pub completed_rounds: u64,
    /// Rounds in the job.
    pub total_rounds: u64,
    /// Model it started from (hex in JSON).
    #[serde(with = "hex_hash")]
    pub initial_model: ModelHash,
    /// Model after the last completed round (hex in JSON).
    #[serde(with = "hex_hash")]
    pub current_model: ModelHash,
    /// Paused by an admin.
    pub paused: bool,
    /// How it ended, if it has (`completed: model <hex>`, `failed in round N: …`,
    /// `aborted after N completed round(s)`).
    pub outcome: Option<String>,
    /// The job file (`jobs show` only).
    pub job_toml: Option<String>,
}

/// A stored model version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Model hash (hex in JSON).
    #[serde(with = "hex_hash")]
    pub hash: ModelHash,
    /// Job that produced it.
    pub job: JobId,
    /// Round that produced it (0: initial model).
    pub round: RoundId,
    /// Size of the stored file, bytes.
    pub bytes: Option<u64>,
}

/// One update that went into a round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvenanceUpdate {
    /// Site.
    pub site: SiteId,
    /// blake3 of the payload (hex in JSON).
    #[serde(with = "hex_hash")]
    pub payload_hash: PayloadHash,
    /// Examples it was trained on.
    pub num_examples: u64,
    /// The site's ed25519 envelope signature (hex), from the update archive.
    pub envelope_sig: Option<String>,
}

/// One round of a provenance chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProvenanceStep {
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
    /// The model the round started from (hex in JSON).
    #[serde(with = "hex_hash")]
    pub base_model: ModelHash,
    /// The model it produced (hex in JSON).
    #[serde(with = "hex_hash")]
    pub output_model: ModelHash,
    /// The aggregation strategy (the StrategyConfig as JSON).
    pub strategy: serde_json::Value,
    /// The updates aggregated.
    pub updates: Vec<ProvenanceUpdate>,
}

/// One tensor of an export, in PyTorch naming and layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportTensor {
    /// PyTorch parameter name (`fc.weight`, `norm1.weight` for a GroupNorm gamma).
    pub name: String,
    /// fedlink (burn) tensor path.
    pub source_path: String,
    /// Shape as exported (PyTorch layout).
    pub shape: Vec<u64>,
    /// Shape as stored (burn layout).
    pub stored_shape: Vec<u64>,
    /// Whether the 2-D tensor is transposed on export (burn `Linear`
    /// `[in, out]` → PyTorch `[out, in]`).
    pub transposed: bool,
}

/// What precedes the values of an exported model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportHeader {
    /// Model hash (hex in JSON).
    #[serde(with = "hex_hash")]
    pub model: ModelHash,
    /// Job that produced it.
    pub job: JobId,
    /// Round that produced it.
    pub round: RoundId,
    /// The job's architecture spec (JSON).
    pub arch: serde_json::Value,
    /// Output format.
    pub format: ExportFormat,
    /// Tensors, in stored order (the order of the values that follow).
    pub tensors: Vec<ExportTensor>,
    /// Bytes of values that follow (4 per parameter).
    pub total_bytes: u64,
}

/// The PyTorch names and layouts of a fedlink model's tensors, in stored
/// order: `Linear` weights (2-D `*.weight`) are transposed from burn's
/// `[in, out]` to `[out, in]`; `Conv2d` (`[out, in, kh, kw]`) and
/// `ConvTranspose2d` (`[in, out, kh, kw]`) weights already match PyTorch;
/// `GroupNorm` `gamma`/`beta` become `weight`/`bias`.
pub fn pytorch_tensors(spec: &ModelSpec) -> Vec<ExportTensor> {
    spec.tensors()
        .iter()
        .map(|t| {
            let transposed = t.shape.len() == 2 && t.path.ends_with(".weight");
            let shape = if transposed {
                vec![t.shape[1], t.shape[0]]
            } else {
                t.shape.clone()
            };
            let name = if let Some(p) = t.path.strip_suffix(".gamma") {
                format!("{p}.weight")
            } else if let Some(p) = t.path.strip_suffix(".beta") {
                format!("{p}.bias")
            } else {
                t.path.clone()
            };
            ExportTensor {
                name,
                source_path: t.path.clone(),
                shape,
                stored_shape: t.shape.clone(),
                transposed,
            }
        })
        .collect()
}

/// A coordinator's answer.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
pub enum AdminResponse {
    /// `status`.
    Status(StatusReport),
    /// `sites list`.
    Sites(Vec<SiteInfo>),
    /// `sites show`, and the result of approve / revoke / rotate.
    Site(SiteInfo),
    /// `jobs list`.
    Jobs(Vec<JobInfo>),
    /// `jobs show`, and the result of submit / pause / resume / abort.
    Job(JobInfo),
    /// `rounds list`: the stored round records (JSON objects; fields as the
    /// coordinator's store has them).
    Rounds {
        /// Job id.
        job: JobId,
        /// Round records.
        rounds: Vec<serde_json::Value>,
    },
    /// `rounds show`.
    Round {
        /// Job id.
        job: JobId,
        /// The round record.
        round: serde_json::Value,
    },
    /// `models list`.
    Models(Vec<ModelInfo>),
    /// `models show`.
    Model {
        /// The model.
        model: ModelInfo,
        /// Rounds from the initial model to this one (with `provenance`).
        provenance: Option<Vec<ProvenanceStep>>,
    },
    /// `models export`: the values follow in chunk frames.
    Export(ExportHeader),
    /// The command was refused or failed.
    Error {
        /// Category.
        code: AdminErrorCode,
        /// What is wrong.
        message: String,
    },
}

impl AdminResponse {
    /// An error answer.
    pub fn error(code: AdminErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
        }
    }

    /// Whether this is an [`AdminResponse::Error`].
    pub fn is_error(&self) -> bool {
        matches!(self, Self::Error { .. })
    }

    /// Encode as a JSON document (at most one frame).
    pub fn to_json(&self) -> Result<Vec<u8>, AdminCodecError> {
        to_json(self)
    }

    /// Decode a JSON document.
    pub fn from_json(bytes: &[u8]) -> Result<Self, AdminCodecError> {
        from_json(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TensorSpec;

    #[test]
    fn requests_round_trip_and_name_args() {
        let reqs = [
            AdminRequest::Status,
            AdminRequest::SitesRevoke {
                name: "a".into(),
                reason: Some("stolen".into()),
            },
            AdminRequest::ModelsExport {
                hash: "00".into(),
                format: ExportFormat::Safetensors,
            },
            AdminRequest::RoundsShow {
                job: "j".into(),
                round: RoundId(3),
            },
        ];
        for r in reqs {
            let back = AdminRequest::from_json(&r.to_json().unwrap()).unwrap();
            assert_eq!(back, r);
            assert!(r.args().is_object());
        }
        let revoke = AdminRequest::SitesRevoke {
            name: "a".into(),
            reason: None,
        };
        assert_eq!(revoke.command(), "sites.revoke");
        assert_eq!(revoke.args()["name"], "a");
        assert_eq!(AdminRequest::Status.args(), serde_json::json!({}));
        let text = String::from_utf8(AdminRequest::Status.to_json().unwrap()).unwrap();
        assert_eq!(text, r#"{"command":"status"}"#);
    }

    /// `RoundsShow.round` and `JobProgress.round` are `RoundId`s; on the
    /// admin wire they are the JSON numbers they were as `u64`.
    #[test]
    fn typed_rounds_keep_the_admin_json() {
        let show = AdminRequest::RoundsShow {
            job: "j".into(),
            round: RoundId(3),
        };
        let raw = br#"{"command":"rounds_show","args":{"job":"j","round":3}}"#;
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&show.to_json().unwrap()).unwrap(),
            serde_json::from_slice::<serde_json::Value>(raw).unwrap()
        );
        assert_eq!(AdminRequest::from_json(raw).unwrap(), show);
        let progress = JobProgress {
            job: JobId::new("j").unwrap(),
            phase: "collecting".into(),
            round: Some(RoundId(4)),
            completed_rounds: 3,
            total_rounds: 9,
            current_model: ModelHash([0xab; 32]),
            paused: false,
            accepted: 1,
            outcome: None,
            sites: Vec::new(),
            evaluation: None,
        };
        let json = serde_json::to_value(&progress).unwrap();
        assert_eq!(json["round"], serde_json::json!(4u64));
        let mut none = progress.clone();
        none.round = None;
        assert!(serde_json::to_value(&none).unwrap()["round"].is_null());
        let back: JobProgress = serde_json::from_value(json).unwrap();
        assert_eq!(back, progress);
    }

    /// The responses' ids (`SiteId`, `JobId`, `FederationId`, `RoundId`)
    /// and hashes (`ModelHash`, `PayloadHash`) are typed since session 14;
    /// on the admin wire, and in what `--json` prints, they are the
    /// strings, numbers and 64-digit hex they were as `String` / `u64`:
    /// the documents below are the old encodings, byte for byte.
    #[test]
    fn typed_responses_keep_the_admin_bytes() {
        let site = |s: &str| SiteId::new(s).unwrap();
        let job = || JobId::new("job-1").unwrap();
        let (m1, m2) = (ModelHash([0x11; 32]), ModelHash([0x22; 32]));
        let (h1, h2) = ("11".repeat(32), "22".repeat(32));
        let link = LinkInfo {
            site: site("st-mary"),
            transport: "quic".into(),
            via_proxy: false,
            rtt_ms: 1.5,
            remote: "10.0.0.1:4433".into(),
        };
        let status = AdminResponse::Status(StatusReport {
            federation: FederationId::new("fed").unwrap(),
            coordinator_version: "0.1.0".into(),
            uptime_secs: 5,
            current_job: Some(JobProgress {
                job: job(),
                phase: "collecting".into(),
                round: Some(RoundId(2)),
                completed_rounds: 1,
                total_rounds: 3,
                current_model: m1,
                paused: false,
                accepted: 0,
                outcome: None,
                sites: vec![SiteProgress {
                    site: site("st-mary"),
                    state: "training".into(),
                    connected: true,
                }],
                evaluation: None,
            }),
            queued_jobs: vec![JobId::new("job-2").unwrap()],
            connected_sites: vec![site("st-mary")],
            links: vec![link.clone()],
        });
        let status_raw = format!(
            r#"{{"kind":"status","data":{{"federation":"fed","coordinator_version":"0.1.0","uptime_secs":5,"current_job":{{"job":"job-1","phase":"collecting","round":2,"completed_rounds":1,"total_rounds":3,"current_model":"{h1}","paused":false,"accepted":0,"outcome":null,"sites":[{{"site":"st-mary","state":"training","connected":true}}]}},"queued_jobs":["job-2"],"connected_sites":["st-mary"],"links":[{{"site":"st-mary","transport":"quic","via_proxy":false,"rtt_ms":1.5,"remote":"10.0.0.1:4433"}}]}}}}"#
        );
        let jobs = AdminResponse::Jobs(vec![JobInfo {
            id: job(),
            state: "running".into(),
            completed_rounds: 1,
            total_rounds: 3,
            initial_model: m1,
            current_model: m2,
            paused: false,
            outcome: None,
            job_toml: None,
        }]);
        let jobs_raw = format!(
            r#"{{"kind":"jobs","data":[{{"id":"job-1","state":"running","completed_rounds":1,"total_rounds":3,"initial_model":"{h1}","current_model":"{h2}","paused":false,"outcome":null,"job_toml":null}}]}}"#
        );
        let model = AdminResponse::Model {
            model: ModelInfo {
                hash: m2,
                job: job(),
                round: RoundId(1),
                bytes: Some(64),
            },
            provenance: Some(vec![ProvenanceStep {
                job: job(),
                round: RoundId(1),
                base_model: m1,
                output_model: m2,
                strategy: serde_json::json!({"name": "fedavg"}),
                updates: vec![ProvenanceUpdate {
                    site: site("st-mary"),
                    payload_hash: PayloadHash([0x33; 32]),
                    num_examples: 10,
                    envelope_sig: None,
                }],
            }]),
        };
        let h3 = "33".repeat(32);
        let model_raw = format!(
            r#"{{"kind":"model","data":{{"model":{{"hash":"{h2}","job":"job-1","round":1,"bytes":64}},"provenance":[{{"job":"job-1","round":1,"base_model":"{h1}","output_model":"{h2}","strategy":{{"name":"fedavg"}},"updates":[{{"site":"st-mary","payload_hash":"{h3}","num_examples":10,"envelope_sig":null}}]}}]}}}}"#
        );
        let export = AdminResponse::Export(ExportHeader {
            model: m2,
            job: job(),
            round: RoundId(1),
            arch: serde_json::Value::Null,
            format: ExportFormat::Safetensors,
            tensors: Vec::new(),
            total_bytes: 0,
        });
        let export_raw = format!(
            r#"{{"kind":"export","data":{{"model":"{h2}","job":"job-1","round":1,"arch":null,"format":"safetensors","tensors":[],"total_bytes":0}}}}"#
        );
        let rounds = AdminResponse::Rounds {
            job: job(),
            rounds: Vec::new(),
        };
        let rounds_raw = r#"{"kind":"rounds","data":{"job":"job-1","rounds":[]}}"#.to_owned();
        for (typed, raw) in [
            (status, status_raw),
            (jobs, jobs_raw),
            (model, model_raw),
            (export, export_raw),
            (rounds, rounds_raw),
        ] {
            assert_eq!(String::from_utf8(typed.to_json().unwrap()).unwrap(), raw);
            assert_eq!(AdminResponse::from_json(raw.as_bytes()).unwrap(), typed);
        }
        // A document whose hash or id is not one is refused, not wrapped.
        let bad_hash = jobs_raw_with(&h1, "xyz");
        assert!(AdminResponse::from_json(bad_hash.as_bytes()).is_err());
        let bad_id = jobs_raw_with("job-1", "job 1");
        assert!(AdminResponse::from_json(bad_id.as_bytes()).is_err());
    }

    fn jobs_raw_with(from: &str, to: &str) -> String {
        let h = |b: &str| b.repeat(32);
        format!(
            r#"{{"kind":"jobs","data":[{{"id":"job-1","state":"running","completed_rounds":1,"total_rounds":3,"initial_model":"{}","current_model":"{}","paused":false,"outcome":null,"job_toml":null}}]}}"#,
            h("11"),
            h("22")
        )
        .replacen(from, to, 1)
    }

    #[test]
    fn malformed_and_oversize_documents_are_errors() {
        assert!(matches!(
            AdminRequest::from_json(b"{\"command\":\"launch_missiles\"}"),
            Err(AdminCodecError::Json(_))
        ));
        assert!(AdminRequest::from_json(b"\xff\x00").is_err());
        let huge = vec![b' '; MAX_FRAME_LEN + 1];
        assert!(matches!(
            AdminResponse::from_json(&huge),
            Err(AdminCodecError::TooLarge { .. })
        ));
        let big = AdminRequest::JobsSubmit {
            job_toml: "x".repeat(MAX_FRAME_LEN),
        };
        assert!(matches!(
            big.to_json(),
            Err(AdminCodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn error_responses_round_trip() {
        let e = AdminResponse::error(AdminErrorCode::Refused, "no");
        let text = String::from_utf8(e.to_json().unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"kind":"error","data":{"code":"refused","message":"no"}}"#
        );
        assert_eq!(AdminResponse::from_json(text.as_bytes()).unwrap(), e);
    }

    #[test]
    fn pytorch_layout() {
        let spec = ModelSpec::new(vec![
            TensorSpec::f32("fc.weight", vec![12, 3]),
            TensorSpec::f32("fc.bias", vec![3]),
            TensorSpec::f32("conv.weight", vec![16, 1, 3, 3]),
            TensorSpec::f32("norm1.gamma", vec![8]),
            TensorSpec::f32("norm1.beta", vec![8]),
        ])
        .unwrap();
        let t = pytorch_tensors(&spec);
        let by = |n: &str| t.iter().find(|x| x.source_path == n).unwrap().clone();
        let fc = by("fc.weight");
        assert!(fc.transposed);
        assert_eq!(fc.shape, vec![3, 12]);
        assert_eq!(fc.stored_shape, vec![12, 3]);
        assert!(!by("conv.weight").transposed);
        assert_eq!(by("conv.weight").shape, vec![16, 1, 3, 3]);
        assert_eq!(by("norm1.gamma").name, "norm1.weight");
        assert_eq!(by("norm1.beta").name, "norm1.bias");
        assert!(!by("fc.bias").transposed);
        // Stored order is kept.
        let stored: Vec<_> = spec.tensors().iter().map(|x| x.path.clone()).collect();
        let out: Vec<_> = t.iter().map(|x| x.source_path.clone()).collect();
        assert_eq!(stored, out);
    }
}
