//! The agent's driver: connects out to the coordinator, keeps the session
//! alive, and runs accepted rounds. All decisions are made by
//! [`SiteCore`], and a round's work (train behind the
//! [`Trainer`](crate::train::Trainer) trait, delta, clipping, noise, audit
//! records, signed envelope) by [`crate::sitecore::task`], and obtaining
//! its global model (cache, downlink update, whole model, resumed
//! download) by [`crate::sitecore::download`], and an evaluation
//! request's answer by [`crate::sitecore::eval`]; this module only
//! moves bytes, runs timers, runs the work on the blocking pool and appends
//! the audit records it is handed before acting.
//!
//! ```text
//!            ┌──────────── reconnect loop (Backoff: 0.5 s → 30 s, jitter) ───────────┐
//!            ▼                                                                      │
//!  resolve coordinator ─▶ QUIC + mTLS ─▶ control stream: Hello ─▶ Welcome ─▶ session ┘
//!                                           │   ▲
//!                      TaskOffer/Cancel/Bye │   │ OfferResponse, Heartbeat, Bye
//!                                           ▼   │
//!                                         SiteCore ──start──▶ round task:
//!                                                              model: sitecore::download (cache | update of
//!                                                                the model held | ModelFetch stream)
//!                                                              sitecore::task::train_round (blocking pool,
//!                                                                BurnTrainer: evaluate global + train_local)
//!                                                              make_update: delta = local − global, clip, DP noise
//!                                                              encode, seal_update (sign), DeltaUpload stream
//!                                                              ◀── UploadResult
//!  every step ─▶ audit log (signed, fsynced before the action); after each
//!  UploadResult the site's signed head ─▶ AuditHead (protocol ≥ 2), and the
//!  coordinator's AuditHead ─▶ recorded as coordinator.audit_head
//! ```
//!
//! # Network footprint (for hospital IT)
//!
//! The agent only dials **out**: UDP to the coordinator's address (QUIC,
//! mutual TLS 1.3 with the federation CA; default port 4433). It opens **no
//! listening port**: each connection binds one ephemeral local UDP port
//! chosen by the OS, on an endpoint with no server configuration, so it
//! accepts no incoming connection. Liveness is kept by QUIC keep-alives
//! (a third of the idle timeout) and by protocol heartbeats at the interval
//! the coordinator asks for.
//!
//! # What leaves the site
//!
//! Only the signed header (identifiers, sample count, aggregate metrics of
//! the *global* model on the local validation split: loss, accuracy, AUC,
//! Dice; for CSV data the per-column count, Σx and Σx² of the training
//! split, from which the federation pools its feature standardisation) and
//! the encoded weight delta. Never samples, labels or per-sample values.
//!
//! # Feature standardisation (CSV data)
//!
//! When an offer carries a `scaling` (the federation's pooled mean and std
//! per column), the round standardises the raw local features with it; an
//! offer whose scaling does not name the local columns in order is
//! declined. Without one (the first round), local statistics are used.
//!
//! # Clipping and DP
//!
//! When the offer sets `privacy.clip_norm`, the delta is scaled by
//! `min(1, C / ‖Δ‖₂)` here, before encoding; the coordinator clips again on
//! its side (a site is not trusted to have done it). When the offer also
//! sets `privacy.dp`, Gaussian noise of standard deviation `z · C` is added
//! after clipping, drawn from ChaCha20 seeded by the OS.
//!
//! # Work and connection loss
//!
//! Work on a round belongs to the connection it was accepted on: when the
//! connection ends, or the round is cancelled or superseded, the task is
//! aborted. Training that is already running in the blocking pool finishes
//! in the background and its result is dropped. After reconnecting, the
//! coordinator re-sends the offer if the round is still open. With
//! protocol version >= 6 a transfer that was cut resumes ([`crate::resume`]):
//! an update that was signed and being uploaded is not trained again — the
//! same signed envelope goes out with `ResumeUpload`, then only the records
//! the coordinator does not hold; a model download asks for the records it
//! lacks (`ModelFetchFrom`). Otherwise the round starts over (the global
//! model is then read from the cache).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fedlink_certs::{ALPN_SITE, Identity, Kit, Role, client_tls_config};
use fedlink_protocol::{
    Bye, CENTRAL_DP_VERSION, CLASS_WEIGHT_VERSION, Capabilities, EncodeError, EvalRequest,
    FlatModel, Hello, Message, ModelHash, ModelSpec, PROTOCOL_VERSION, RESUME_VERSION, RejectCode,
    SignedEnvelope, SignedEvalReport, TRAINING_V5_VERSION, UpdateNonce, VersionRange, Welcome,
    encode_payload, supports_audit_head, supports_federated_eval, supports_round_outcome,
};
use fedlink_transport::{Conn, FramedRecv, FramedSend, TransportError, close};
use quinn::Endpoint;

use crate::dial::{Dialer, Proxy, Route, Selector};
use rand::RngCore;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::audit::{Recorded, SiteAudit, SiteEvent, site};
use crate::config::SiteConfig;
use crate::data::{DataError, SiteData};
use crate::device::{DeviceChoice, DeviceError};
use crate::modelcache::{ModelCache, ModelError, create_private_dir};
use crate::resume::{KeptUpload, Transfers};
use crate::sitecore::download::{self, CacheForm, Cached, Download, DownloadError, Step};
use crate::sitecore::eval;
use crate::sitecore::task::{self, truncate};
use crate::sitecore::upload;
use crate::sitecore::{Assignment, Backoff, Session, SiteCore, TaskKey};
use crate::train::{BurnTrainer, TrainError};
use fedlink_aggregation::dp::NoiseRng;

pub use crate::sitecore::task::{clip_l2, l2_norm};

/// How long a shutdown waits for the goodbye to reach the coordinator.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Why the agent stopped with an error.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is unusable (beyond what `SiteConfig` validation
    /// catches, e.g. an unresolvable setting).
    #[error("configuration: {0}")]
    Config(String),
    /// The startup kit could not be loaded or is not a site kit.
    #[error("startup kit {}: {source}", dir.display())]
    Kit {
        /// The kit directory.
        dir: PathBuf,
        /// What is wrong.
        source: fedlink_certs::Error,
    },
    /// The TLS configuration could not be built from the kit.
    #[error("TLS configuration: {0}")]
    Tls(fedlink_certs::Error),
    /// The configured device is unavailable.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The local dataset could not be loaded.
    #[error("local data: {0}")]
    Data(#[from] DataError),
    /// The audit log could not be opened or written.
    #[error("audit log: {0}")]
    AuditLog(#[from] fedlink_audit::Error),
    /// The model cache directory is unusable.
    #[error(transparent)]
    ModelCache(#[from] ModelError),
    /// A directory could not be created.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A background task failed unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AgentError {
    /// Process exit code: 2 configuration/usage (including a dataset that
    /// cannot be loaded), 3 TLS or kit, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            // A dataset that cannot be loaded (missing file, bad columns)
            // needs a fix, not a restart every few seconds.
            Self::Config(_) | Self::Device(_) | Self::Data(_) => 2,
            Self::Kit { .. } | Self::Tls(_) => 3,
            _ => 1,
        }
    }
}

/// Why work on one round failed (recorded in the audit log as
/// `round.failed`; the agent carries on).
#[derive(Debug, thiserror::Error)]
enum TaskError {
    #[error("audit log: {0}")]
    Log(#[from] fedlink_audit::Error),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The global model could not be obtained (a refused downlink update
    /// is not an error: the whole model is fetched then).
    #[error(transparent)]
    Download(#[from] DownloadError),
    #[error("training: {0}")]
    Train(#[from] TrainError),
    #[error("local data: {0}")]
    Data(#[from] DataError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("network: {0}")]
    Transport(#[from] TransportError),
    #[error("encoding the delta: {0}")]
    Encode(#[from] EncodeError),
    /// The coordinator broke the protocol, or refused what was asked.
    #[error("coordinator: {0}")]
    Protocol(#[from] Violation),
    /// The coordinator named an architecture this agent cannot build
    /// (`which`: "offered" or "requested").
    #[error("coordinator: {which} architecture: {source}")]
    Architecture {
        which: &'static str,
        #[source]
        source: fedlink_protocol::arch::ArchError,
    },
    /// The coordinator's resume point does not fit the upload kept.
    #[error("coordinator: {0}")]
    ResumePoint(#[source] crate::resume::ProgressMismatch),
    #[error("internal: {0}")]
    Internal(String),
    /// The trained model could not be turned into an update.
    #[error("internal: {0}")]
    Update(#[from] task::UpdateError),
}

/// What the coordinator answered that this site cannot go on with.
#[derive(Debug, thiserror::Error)]
enum Violation {
    /// An evaluation request for another federation.
    #[error("evaluation request for federation {asked}, this site is in {ours}")]
    OtherFederation {
        asked: fedlink_protocol::FederationId,
        ours: fedlink_protocol::FederationId,
    },
    /// An acknowledgement of a payload other than the one sent.
    #[error(transparent)]
    WrongAck(#[from] task::WrongAck),
    /// A message that does not answer the request it followed.
    #[error("sent {sent} in answer to {request}")]
    Unexpected {
        sent: &'static str,
        request: &'static str,
    },
}

impl From<eval::EvalError> for TaskError {
    fn from(e: eval::EvalError) -> Self {
        match e {
            eval::EvalError::OtherFederation { asked, ours } => {
                Violation::OtherFederation { asked, ours }.into()
            }
            eval::EvalError::Architecture(source) => Self::Architecture {
                which: "requested",
                source,
            },
            eval::EvalError::Train(e) => Self::Train(e),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<upload::UploadError> for TaskError {
    fn from(e: upload::UploadError) -> Self {
        match e {
            upload::UploadError::WrongAck(w) => Violation::WrongAck(w).into(),
            upload::UploadError::Unexpected { sent, request } => {
                Violation::Unexpected { sent, request }.into()
            }
            upload::UploadError::ResumePoint(m) => Self::ResumePoint(m),
        }
    }
}

/// Wall clock, unix milliseconds.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes the audit log and mirrors each entry to an optional observer.
#[derive(Debug)]
struct Recorder {
    log: Mutex<SiteAudit>,
    events: Option<mpsc::UnboundedSender<Recorded>>,
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, SiteAudit> {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, event: SiteEvent) -> Result<Recorded, fedlink_audit::Error> {
        let entry = self.lock().record(unix_ms(), &event)?;
        tracing::info!(seq = entry.seq, event = %entry.event, details = %entry.details, "audit log");
        if let Some(tx) = &self.events {
            // The observer may have gone away; the file is the record.
            let _ = tx.send(entry.clone());
        }
        Ok(entry)
    }
}

/// Everything a session and its tasks share.
#[derive(Debug)]
struct Ctx {
    config: SiteConfig,
    kit: Kit,
    tls: rustls::ClientConfig,
    coordinator_addr: String,
    data: Arc<SiteData>,
    device: DeviceChoice,
    cache: ModelCache,
    recorder: Recorder,
    /// Which transport the next connection attempt uses.
    selector: Mutex<Selector>,
    /// The HTTP proxy for the TCP path, if any.
    proxy: Option<Proxy>,
    /// Transfers kept across connections, to resume.
    transfers: Mutex<Transfers>,
}

impl Ctx {
    fn record(&self, event: SiteEvent) -> Result<Recorded, fedlink_audit::Error> {
        self.recorder.record(event)
    }

    /// The global model of `job` this site last trained from (kept in
    /// the model cache, so it outlives a restart).
    fn held_model(&self, job: &fedlink_protocol::JobId) -> Option<ModelHash> {
        self.cache.held(job.as_str())
    }

    fn hold_model(&self, job: &fedlink_protocol::JobId, model: ModelHash) {
        if let Err(e) = self.cache.hold(job.as_str(), &model) {
            tracing::warn!(error = %e, "recording the model held; the next one comes whole");
        }
    }

    fn transfers<T>(&self, f: impl FnOnce(&mut Transfers) -> T) -> T {
        let mut t = self
            .transfers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut t)
    }
}

/// A configured agent; [`Agent::run`] runs it until `shutdown` completes.
#[derive(Debug)]
pub struct Agent {
    config: SiteConfig,
    events: Option<mpsc::UnboundedSender<Recorded>>,
}

/// Run an agent with `config` until `shutdown` completes (then say `Bye`
/// and close). Returns `Ok(())` after an orderly shutdown; errors are
/// startup problems (kit, TLS, data, device) or an audit log that cannot be
/// opened or written. Network problems never end the agent: it reconnects.
pub async fn run(config: SiteConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    Agent::new(config).run(shutdown).await
}

impl Agent {
    /// An agent with `config`.
    pub fn new(config: SiteConfig) -> Self {
        Self {
            config,
            events: None,
        }
    }

    /// Also send every audit-log entry to `events` as it is written (for
    /// tests and embedding; the file stays the record).
    #[must_use]
    pub fn with_events(mut self, events: mpsc::UnboundedSender<Recorded>) -> Self {
        self.events = Some(events);
        self
    }

    async fn prepare(self) -> Result<Ctx, AgentError> {
        let config = self.config;
        let (kit, update_key, tls) = load_kit(&config)?;
        let coordinator_addr = config
            .coordinator_addr
            .clone()
            .unwrap_or_else(|| kit.coordinator_addr().to_owned());
        // Fail early on an unusable device; tasks resolve it again in the
        // blocking pool (the wgpu device is initialised once per process).
        let device = config.device;
        device.resolve()?;
        let io = |path: PathBuf| move |source| AgentError::Io { path, source };
        make_data_dir_private(&config.data_dir)?;
        let log_path = config.audit_log_path();
        if let Some(parent) = log_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            create_private_dir(parent).map_err(io(parent.to_path_buf()))?;
        }
        // Entries the coordinator caused name it by the identity in its
        // certificate (set per connection); until then by its role URI.
        let coordinator_actor = Identity::new(
            kit.identity().federation(),
            Role::Coordinator,
            "coordinator",
        )
        .map_or_else(
            |_| fedlink_audit::event::SYSTEM_ACTOR.to_owned(),
            |i| i.to_uri(),
        );
        let log = SiteAudit::open(
            &log_path,
            update_key,
            kit.identity().to_uri(),
            coordinator_actor,
            config.audit_rotate_bytes,
            unix_ms(),
        )?;
        let proxy = proxy_for(&config, &coordinator_addr)?;
        let selector = Selector::new(
            config.transport,
            config.connection.quic_head_start(),
            config.connection.tcp_fallback(),
        );
        let cache = ModelCache::open(config.model_cache_dir())?;
        let dataset = config.dataset.clone();
        let data = tokio::task::spawn_blocking(move || dataset.load())
            .await
            .map_err(|e| AgentError::Internal(format!("data loading task: {e}")))??;
        Ok(Ctx {
            config,
            kit,
            tls,
            coordinator_addr,
            data: Arc::new(data),
            device,
            cache,
            recorder: Recorder {
                log: Mutex::new(log),
                events: self.events,
            },
            selector: Mutex::new(selector),
            proxy,
            transfers: Mutex::new(Transfers::default()),
        })
    }

    /// Run until `shutdown` completes (see [`run`]).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let ctx = Arc::new(self.prepare().await?);
        let device_name = ctx
            .device
            .resolve()
            .map(|d| d.name)
            .unwrap_or("unavailable");
        ctx.record(SiteEvent::AgentStarted(site::AgentStarted {
            version: agent_version(),
            site: ctx.kit.identity().name().to_owned(),
            config_blake3: config_blake3(&ctx.config),
            identity: ctx.kit.identity().to_uri(),
            dataset_kind: ctx.config.dataset.kind().to_owned(),
            dataset_fingerprint: ctx.data.local().fingerprint.to_string(),
            train_samples: ctx.data.local().train.len(),
            validation_samples: ctx.data.local().validation.len(),
            device: device_name.to_owned(),
        }))?;
        let mut core = SiteCore::new(ctx.config.policy.clone(), ctx.data.clone());
        let conn_cfg = &ctx.config.connection;
        let mut backoff = Backoff::new(conn_cfg.backoff_initial(), conn_cfg.backoff_max());
        let shutdown = std::pin::pin!(shutdown);
        let mut shutdown: Pin<&mut _> = shutdown;
        let reason = loop {
            let attempt = tokio::select! {
                biased;
                () = shutdown.as_mut() => break "shutdown",
                r = connect(&ctx) => r,
            };
            let end = match attempt {
                Ok(connected) => {
                    backoff.reset();
                    run_session(&ctx, &mut core, connected, &mut shutdown).await?
                }
                Err(why) => SessionEnd::Lost(why.to_string()),
            };
            match end {
                SessionEnd::Shutdown => break "shutdown",
                SessionEnd::Lost(reason) => {
                    let delay = backoff.next_delay(rand::random::<f64>());
                    tracing::warn!(%reason, retry_in = ?delay, "not connected to the coordinator");
                    ctx.record(SiteEvent::ConnLost(site::ConnLost {
                        reason,
                        retry_in_ms: Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
                    }))?;
                    tokio::select! {
                        biased;
                        () = shutdown.as_mut() => break "shutdown",
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        ctx.record(SiteEvent::AgentStopped(site::AgentStopped {
            reason: reason.to_owned(),
        }))?;
        Ok(())
    }
}

/// The site kit (a site's, with its update-signing key) and the TLS client
/// configuration built from it.
fn load_kit(
    config: &SiteConfig,
) -> Result<(Kit, ed25519_dalek::SigningKey, rustls::ClientConfig), AgentError> {
    let kit_err = |source| AgentError::Kit {
        dir: config.kit_dir.clone(),
        source,
    };
    let kit = Kit::load(&config.kit_dir).map_err(kit_err)?;
    if kit.identity().role() != Role::Site {
        return Err(kit_err(fedlink_certs::Error::Refused(format!(
            "this is a {} kit; fedlink-agent needs a site kit",
            kit.identity().role()
        ))));
    }
    let Some(update_key) = kit.update_signing_key().cloned() else {
        return Err(kit_err(fedlink_certs::Error::Refused(
            "the kit has no update-signing key".into(),
        )));
    };
    let tls = client_tls_config(&kit, ALPN_SITE).map_err(AgentError::Tls)?;
    Ok((kit, update_key, tls))
}

/// What [`check`] found.
#[derive(Debug)]
#[non_exhaustive]
pub struct CheckReport {
    /// The site's identity from its kit.
    pub identity: String,
    /// The coordinator address the agent would connect to.
    pub coordinator_addr: String,
    /// The compute device resolved.
    pub device: String,
    /// The dataset kind (`csv`, …).
    pub dataset_kind: String,
    /// Training samples loaded.
    pub train_samples: usize,
    /// Validation samples loaded.
    pub validation_samples: usize,
    /// The dataset fingerprint (as in `agent.started`).
    pub dataset_fingerprint: String,
}

/// Check what a start checks, without connecting or writing anything: load
/// the kit (site role, update key, key file modes, TLS configuration),
/// resolve the device and load the dataset. Errors carry the same exit
/// codes as [`run`]'s.
pub fn check(config: &SiteConfig) -> Result<CheckReport, AgentError> {
    let (kit, _, _) = load_kit(config)?;
    let device = config.device.resolve()?;
    let data = config.dataset.load()?;
    let local = data.local();
    Ok(CheckReport {
        identity: kit.identity().to_uri(),
        coordinator_addr: config
            .coordinator_addr
            .clone()
            .unwrap_or_else(|| kit.coordinator_addr().to_owned()),
        device: device.name.to_owned(),
        dataset_kind: config.dataset.kind().to_owned(),
        train_samples: local.train.len(),
        validation_samples: local.validation.len(),
        dataset_fingerprint: local.fingerprint.to_string(),
    })
}

/// Create `data_dir` (mode 0700) or make an existing one owner-only (it
/// holds the audit log and the model cache): every directory and file that
/// group or others could access is tightened, with a warning naming it and
/// the mode found. A mode that cannot be changed is a configuration error.
fn make_data_dir_private(dir: &Path) -> Result<(), AgentError> {
    let changed = fedlink_certs::private::make_private(dir)
        .map_err(|e| AgentError::Config(format!("data_dir: {e}")))?;
    for t in changed {
        tracing::warn!(
            path = %t.path.display(),
            mode = format!("{:03o}", t.from),
            now = format!("{:03o}", t.to),
            "accessible to other local users; made owner-only"
        );
    }
    Ok(())
}

/// The proxy for the TCP path: `proxy` in `site.toml` (with its
/// credentials file), else `HTTPS_PROXY` unless `NO_PROXY` covers the
/// coordinator's host. Not used with `transport = "quic"`.
fn proxy_for(config: &SiteConfig, coordinator_addr: &str) -> Result<Option<Proxy>, AgentError> {
    if config.transport == crate::dial::TransportMode::Quic {
        return Ok(None);
    }
    let bad = |field: &str, m: crate::dial::ProxyError| AgentError::Config(format!("{field}: {m}"));
    let Some(url) = &config.proxy else {
        let host = coordinator_addr
            .rsplit_once(':')
            .map_or(coordinator_addr, |(h, _)| h);
        return crate::dial::proxy_from_env(host, |k| std::env::var(k).ok())
            .map_err(|m| bad("HTTPS_PROXY", m));
    };
    let proxy = Proxy::parse(url, "site.toml").map_err(|m| bad("proxy", m))?;
    match &config.proxy_credentials_file {
        Some(path) => proxy
            .with_credentials_file(path)
            .map(Some)
            .map_err(|m| bad("proxy_credentials_file", m)),
        None => Ok(Some(proxy)),
    }
}

fn agent_version() -> String {
    format!("fedlink-agent {}", env!("CARGO_PKG_VERSION"))
}

/// blake3 (hex) of the effective configuration as canonical JSON.
fn config_blake3(config: &SiteConfig) -> String {
    // A plain data struct: serialising cannot fail.
    let json = serde_json::to_vec(config).unwrap_or_default();
    blake3::hash(&json).to_hex().to_string()
}

/// A welcomed connection.
struct Connected {
    /// The QUIC endpoint (none over TCP).
    endpoint: Option<Endpoint>,
    conn: Conn,
    route: Route,
    send: FramedSend,
    recv: FramedRecv,
    welcome: Welcome,
    remote: SocketAddr,
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Why a connection attempt ended before Welcome ([`connect`]); its text
/// is the `reason` of the site's `conn.lost` audit entry.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    /// The coordinator's name does not resolve.
    #[error("resolving {addr}: {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    /// It resolves to no address.
    #[error("{0} resolves to no address")]
    NoAddress(String),
    /// The transport selector's lock is poisoned.
    #[error("transport selector lock poisoned")]
    SelectorLock,
    /// No transport connected.
    #[error(transparent)]
    Dial(#[from] crate::dial::DialError),
    /// The control stream could not be opened.
    #[error("opening the control stream: {0}")]
    ControlStream(#[source] TransportError),
    /// Hello could not be sent.
    #[error("sending Hello: {0}")]
    Hello(#[source] TransportError),
    /// The coordinator refused the site (its message, bounded).
    #[error("coordinator refused the site: {code:?}: {message}")]
    Refused { code: RejectCode, message: String },
    /// Another message than Welcome.
    #[error("coordinator sent {0} instead of Welcome")]
    Unexpected(&'static str),
    /// Reading the answer to Hello failed.
    #[error("waiting for Welcome: {0}")]
    Welcome(#[source] TransportError),
    /// No Welcome within the connect timeout.
    #[error("no Welcome from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
}

/// Resolve, connect, say Hello, wait for Welcome (bounded by the connect
/// timeout). The error is a reason for the audit log.
async fn connect(ctx: &Ctx) -> Result<Connected, ConnectError> {
    let cfg = &ctx.config.connection;
    let attempt = async {
        let remote = tokio::net::lookup_host(&ctx.coordinator_addr)
            .await
            .map_err(|source| ConnectError::Resolve {
                addr: ctx.coordinator_addr.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| ConnectError::NoAddress(ctx.coordinator_addr.clone()))?;
        let plan = ctx
            .selector
            .lock()
            .map_err(|_| ConnectError::SelectorLock)?
            .plan(Instant::now());
        let dialer = Dialer {
            target: &ctx.coordinator_addr,
            remote,
            server_name: ctx.kit.coordinator_server_name(),
            tls: &ctx.tls,
            idle_timeout: cfg.idle_timeout(),
            congestion: cfg.congestion_control,
            timeout: cfg.connect_timeout(),
            proxy: ctx.proxy.as_ref(),
        };
        let dialed = dialer.dial(&plan).await?;
        if matches!(plan, crate::dial::Plan::Race { .. })
            && let Ok(mut s) = ctx.selector.lock()
        {
            s.raced(Instant::now(), dialed.route.kind);
        }
        let crate::dial::Dialed {
            conn,
            endpoint,
            route,
        } = dialed;
        tracing::info!(transport = %route.kind, proxy = ?route.proxy, reason = %route.reason, "connected");
        let (mut send, mut recv) = conn.open_bi().await.map_err(ConnectError::ControlStream)?;
        let mut capabilities = Capabilities::default();
        if route.proxy.is_some() {
            // The coordinator sees only the proxy's address: say so, for
            // its operator's view.
            capabilities
                .features
                .push(fedlink_protocol::message::FEATURE_VIA_PROXY.to_owned());
        }
        send.message(&Message::Hello(Hello {
            versions: VersionRange::SUPPORTED,
            agent_version: agent_version(),
            capabilities,
        }))
        .await
        .map_err(ConnectError::Hello)?;
        // With TLS 1.3 a refused client certificate shows up here, on the
        // first read, not in `connect`.
        match recv.message().await {
            Ok(Message::Welcome(welcome)) => Ok(Connected {
                endpoint,
                conn,
                route,
                send,
                recv,
                welcome,
                remote,
            }),
            Ok(Message::Reject(r)) => {
                conn.close(close::NORMAL, b"rejected");
                Err(ConnectError::Refused {
                    code: r.code,
                    message: truncate(&r.message),
                })
            }
            Ok(other) => {
                conn.close(close::PROTOCOL, b"expected Welcome");
                Err(ConnectError::Unexpected(other.name()))
            }
            Err(e) => Err(ConnectError::Welcome(e)),
        }
    };
    tokio::time::timeout(cfg.connect_timeout(), attempt)
        .await
        .map_err(|_| ConnectError::Timeout {
            addr: ctx.coordinator_addr.clone(),
            timeout: cfg.connect_timeout(),
        })?
}

/// Read control messages on a task of their own (reads are not
/// cancellation-safe, so they must not race in a `select!`).
async fn read_control(
    mut recv: FramedRecv,
    tx: mpsc::UnboundedSender<Result<Message, TransportError>>,
) {
    loop {
        match recv.message_or_end().await {
            Ok(Some(m)) => {
                if tx.send(Ok(m)).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

/// A finished round task: `Ok(true)` when it recorded an `update.result`
/// (then the site's audit head is due), `Err` when the audit log failed.
type TaskDone = (TaskKey, Result<bool, fedlink_audit::Error>);

async fn run_session<F: Future<Output = ()>>(
    ctx: &Arc<Ctx>,
    core: &mut SiteCore,
    connected: Connected,
    shutdown: &mut Pin<&mut F>,
) -> Result<SessionEnd, AgentError> {
    let Connected {
        endpoint,
        conn,
        route,
        mut send,
        recv,
        welcome,
        remote,
    } = connected;
    let session = match core.on_welcome(Instant::now(), &welcome) {
        Ok(s) => s.clone(),
        Err(e) => {
            conn.close(close::PROTOCOL, b"bad Welcome");
            return Ok(SessionEnd::Lost(e.to_string()));
        }
    };
    if let Ok(identity) = conn.peer_identity() {
        ctx.recorder.lock().set_coordinator_actor(identity.to_uri());
    }
    ctx.record(SiteEvent::ConnEstablished(site::ConnEstablished {
        coordinator: format!("{} ({remote})", ctx.coordinator_addr),
        site_id: session.site_id.clone(),
        federation: session.federation_id.clone(),
        protocol_version: session.protocol_version,
        transport: route.kind.as_str().to_owned(),
        proxy: route.proxy.clone(),
        transport_reason: route.reason.clone(),
    }))?;
    let (ctrl_tx, mut ctrl_rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(read_control(recv, ctrl_tx));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<TaskDone>();
    let (eval_tx, mut eval_rx) = mpsc::unbounded_channel::<Box<SignedEvalReport>>();
    let mut task: Option<(TaskKey, JoinHandle<()>)> = None;

    let result: Result<SessionEnd, AgentError> = async {
        loop {
            let beat = core
                .next_heartbeat()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                () = shutdown.as_mut() => {
                    let _ = send
                        .message(&Message::Bye(Bye {
                            reason: "site agent shutting down".into(),
                        }))
                        .await;
                    return Ok(SessionEnd::Shutdown);
                }
                Some((key, result)) = done_rx.recv() => {
                    core.on_task_finished(&key);
                    if task.as_ref().is_some_and(|(k, _)| *k == key) {
                        task = None;
                    }
                    if result? && supports_audit_head(session.protocol_version) {
                        let head = ctx.recorder.lock().wire_head(unix_ms())?;
                        if let Some(head) = head
                            && let Err(e) = send.message(&Message::AuditHead(head)).await
                        {
                            return Ok(SessionEnd::Lost(format!("sending the audit head: {e}")));
                        }
                    }
                }
                Some(report) = eval_rx.recv() => {
                    if let Err(e) = send.message(&Message::EvalReport(report)).await {
                        return Ok(SessionEnd::Lost(format!("sending an evaluation report: {e}")));
                    }
                }
                msg = ctrl_rx.recv() => {
                    let msg = match msg {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => return Ok(SessionEnd::Lost(format!("control stream: {e}"))),
                        None => return Ok(SessionEnd::Lost("coordinator ended the control stream".into())),
                    };
                    if let Some(end) = handle_control(
                        ctx, core, &conn, &mut send, &session, &mut task, &done_tx, &eval_tx, msg,
                    )
                    .await?
                    {
                        return Ok(end);
                    }
                }
                () = tokio::time::sleep_until(beat.into()) => {
                    if let Some(hb) = core.poll_heartbeat(Instant::now(), unix_ms())
                        && let Err(e) = send.message(&Message::Heartbeat(hb)).await
                    {
                        return Ok(SessionEnd::Lost(format!("sending a heartbeat: {e}")));
                    }
                }
            }
        }
    }
    .await;

    reader.abort();
    if let Some((_, handle)) = task.take() {
        handle.abort();
    }
    core.on_disconnect();
    match &result {
        Ok(SessionEnd::Shutdown) => {
            // Closing the connection at once would discard the unsent Bye:
            // finish the control stream and wait (bounded) until the
            // coordinator has acknowledged it, then close.
            let _ = send.finish();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, send.stopped()).await;
            conn.close(close::NORMAL, b"bye");
            match &endpoint {
                Some(endpoint) => {
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, endpoint.wait_idle()).await;
                }
                None => {
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn.closed()).await;
                }
            }
        }
        _ => conn.close(close::NORMAL, b"reconnecting"),
    }
    result
}

/// React to one control message; `Some(end)` ends the session.
#[allow(clippy::too_many_arguments)]
async fn handle_control(
    ctx: &Arc<Ctx>,
    core: &mut SiteCore,
    conn: &Conn,
    send: &mut FramedSend,
    session: &Session,
    task: &mut Option<(TaskKey, JoinHandle<()>)>,
    done_tx: &mpsc::UnboundedSender<TaskDone>,
    eval_tx: &mpsc::UnboundedSender<Box<SignedEvalReport>>,
    msg: Message,
) -> Result<Option<SessionEnd>, AgentError> {
    let too_new = match &msg {
        Message::TaskOfferV3(_) => session.protocol_version < CENTRAL_DP_VERSION,
        Message::TaskOfferV5(_) => session.protocol_version < TRAINING_V5_VERSION,
        Message::TaskOfferV6(_) => session.protocol_version < CLASS_WEIGHT_VERSION,
        _ => false,
    };
    if too_new {
        conn.close(close::PROTOCOL, b"unexpected message on the control stream");
        return Ok(Some(SessionEnd::Lost(format!(
            "coordinator sent {} at protocol version {}",
            msg.name(),
            session.protocol_version
        ))));
    }
    match msg {
        Message::TaskOffer(offer)
        | Message::TaskOfferV3(offer)
        | Message::TaskOfferV5(offer)
        | Message::TaskOfferV6(offer) => {
            let outcome = core.on_offer(unix_ms(), &offer);
            // The offer and the decision are on disk before the coordinator
            // hears it.
            ctx.record(outcome.received)?;
            ctx.record(outcome.decided)?;
            if let Err(e) = send
                .message(&Message::OfferResponse(outcome.response))
                .await
            {
                return Ok(Some(SessionEnd::Lost(format!("answering an offer: {e}"))));
            }
            if let Some(abort) = outcome.abort {
                ctx.record(abort.cancelled)?;
                abort_task(task, &abort.key);
            }
            if let Some(assignment) = outcome.start {
                let key = assignment.key();
                let handle = spawn_task(ctx, conn, session, assignment, done_tx);
                if let Some((_, old)) = task.replace((key, handle)) {
                    old.abort();
                }
            }
        }
        Message::Cancel(c) => {
            let outcome = core.on_cancel(&c);
            ctx.record(outcome.cancelled)?;
            if let Some(key) = outcome.drop {
                abort_task(task, &key);
            }
        }
        Message::Heartbeat(h) => tracing::trace!(seq = h.seq, "coordinator heartbeat"),
        // Recorded as received; `fedlink audit reconcile` checks its
        // signature with the coordinator's audit key.
        Message::AuditHead(h) if supports_audit_head(session.protocol_version) => {
            ctx.record(SiteEvent::coordinator_head(&h))?;
        }
        // The model a round this site contributed to produced (or the job's
        // final model): recorded, so the site holds the result in its own
        // log; `fedlink audit reconcile` compares it with the coordinator's.
        Message::RoundOutcome(o) if supports_round_outcome(session.protocol_version) => {
            ctx.record(SiteEvent::RoundOutcome(site::RoundOutcome {
                job: o.job_id.clone(),
                round: o.round,
                model: o.model.to_hex(),
                job_completed: o.job_completed,
            }))?;
        }
        // Evaluate a model on the validation split, off this loop; the
        // signed report comes back through `eval_tx` and goes out on the
        // control stream.
        Message::EvalRequest(req) if supports_federated_eval(session.protocol_version) => {
            spawn_eval(ctx, conn, session, *req, eval_tx);
        }
        Message::Bye(b) => {
            return Ok(Some(SessionEnd::Lost(format!(
                "coordinator said bye: {}",
                truncate(&b.reason)
            ))));
        }
        other => {
            conn.close(close::PROTOCOL, b"unexpected message on the control stream");
            return Ok(Some(SessionEnd::Lost(format!(
                "coordinator sent {} on the control stream",
                other.name()
            ))));
        }
    }
    Ok(None)
}

/// Drop the work on `key`, if it is the work in progress (the core and
/// the driver agree on that: both change it on the same events).
fn abort_task(task: &mut Option<(TaskKey, JoinHandle<()>)>, key: &TaskKey) {
    if let Some((_, handle)) = task.take_if(|(k, _)| k == key) {
        handle.abort();
    }
}

fn spawn_task(
    ctx: &Arc<Ctx>,
    conn: &Conn,
    session: &Session,
    assignment: Assignment,
    done_tx: &mpsc::UnboundedSender<TaskDone>,
) -> JoinHandle<()> {
    let ctx = ctx.clone();
    let conn = conn.clone();
    let session = session.clone();
    let done_tx = done_tx.clone();
    tokio::spawn(async move {
        let key = assignment.key();
        let result = match run_task(&ctx, &conn, &session, &assignment).await {
            Ok(()) => Ok(true),
            Err(TaskError::Log(e)) => Err(e),
            Err(e) => {
                tracing::warn!(task = %key, error = %e, "round failed");
                ctx.record(SiteEvent::RoundFailed(site::RoundFailed {
                    job: key.job_id.clone(),
                    round: key.round,
                    error: e.to_string(),
                }))
                .map(|_| false)
            }
        };
        let _ = done_tx.send((key, result));
    })
}

/// Evaluate the model of an evaluation request on a task of its own; the
/// signed report goes to `eval_tx` (a failure is logged: the coordinator
/// stops waiting at its deadline).
fn spawn_eval(
    ctx: &Arc<Ctx>,
    conn: &Conn,
    session: &Session,
    req: EvalRequest,
    eval_tx: &mpsc::UnboundedSender<Box<SignedEvalReport>>,
) {
    let (ctx, conn, session, eval_tx) =
        (ctx.clone(), conn.clone(), session.clone(), eval_tx.clone());
    tokio::spawn(async move {
        match evaluate_request(&ctx, &conn, &session, &req).await {
            Ok(report) => {
                let _ = eval_tx.send(report);
            }
            Err(e) => tracing::warn!(
                job = %req.job_id,
                round = req.round.0,
                model = %req.model,
                error = %e,
                "evaluation request failed"
            ),
        }
    });
}

/// The driver of [`eval`]: the request checked, the requested model
/// obtained (cache or `ModelFetch`, hash-verified), evaluated on the
/// validation split (with the request's feature scaling; never the training
/// data, never augmented) on the blocking pool, `eval.reported` recorded,
/// and the report signed with the update key. A site without a validation
/// split reports 0 examples (the coordinator leaves it out).
async fn evaluate_request(
    ctx: &Arc<Ctx>,
    conn: &Conn,
    session: &Session,
    req: &EvalRequest,
) -> Result<Box<SignedEvalReport>, TaskError> {
    let spec = eval::check_request(session, req)?;
    let model = obtain_model(ctx, conn, session, req.model, &spec, None).await?;
    let (req_owned, site_data, device) = (req.clone(), ctx.data.clone(), ctx.device);
    let metrics = tokio::task::spawn_blocking(move || {
        let data = site_data.for_scaling(req_owned.scaling.as_ref())?;
        let trainer = || Ok::<_, TaskError>(BurnTrainer::new(device.resolve()?.device));
        eval::evaluate(trainer, &req_owned, &model, &data)
    })
    .await
    .map_err(|e| TaskError::Internal(format!("evaluation task: {e}")))??;
    let key = ctx
        .kit
        .update_signing_key()
        .ok_or_else(|| TaskError::Internal("the kit has no update-signing key".into()))?;
    let sealed = eval::answer(session, req, metrics.as_ref(), key);
    // On disk before the report leaves.
    ctx.record(sealed.reported)?;
    Ok(Box::new(sealed.report))
}

async fn run_task(
    ctx: &Arc<Ctx>,
    conn: &Conn,
    session: &Session,
    a: &Assignment,
) -> Result<(), TaskError> {
    let offer = &a.offer;
    // The update of this round was signed and being uploaded when the
    // connection was lost: send the rest of it, do not train again.
    if session.protocol_version >= RESUME_VERSION
        && let Some(kept) = ctx.transfers(|t| t.upload_for(offer))
    {
        return resume_upload(ctx, conn, session, kept).await;
    }
    let spec = offer
        .arch
        .spec()
        .map_err(|source| TaskError::Architecture {
            which: "offered",
            source,
        })?;
    // The previous global model this site trained from, if it still holds
    // it: the new one may come as the update of it.
    let held = ctx.held_model(&offer.job_id);
    let global = obtain_model(ctx, conn, session, offer.base_model, &spec, held).await?;
    ctx.hold_model(&offer.job_id, offer.base_model);

    // Standardise (with the offer's scaling, if any), evaluate the global
    // model, then train: CPU-heavy, off the runtime so that heartbeats keep
    // flowing.
    let (arch, site_data, scaling, train_cfg, device) = (
        offer.arch.clone(),
        ctx.data.clone(),
        offer.scaling.clone(),
        a.train.clone(),
        ctx.device,
    );
    let feature_scaling = match (&*ctx.data, &offer.scaling) {
        (SiteData::Fixed(_), _) => "none",
        (SiteData::Tabular(_), Some(_)) => "federated",
        (SiteData::Tabular(_), None) => "local",
    };
    let global_for_training = global.clone();
    let trained = tokio::task::spawn_blocking(move || {
        let data = site_data.for_scaling(scaling.as_ref())?;
        let trainer = BurnTrainer::new(device.resolve()?.device);
        Ok::<_, TaskError>(task::train_round(
            &trainer,
            &arch,
            &global_for_training,
            &data,
            &train_cfg,
        )?)
    })
    .await
    .map_err(|e| TaskError::Internal(format!("training task: {e}")))??;

    // delta = local − global, then the offer's clipping and DP noise.
    let update = task::make_update(
        &offer.privacy,
        &global,
        &trained.local,
        NoiseRng::from_os_rng,
    )?;
    let metrics = trained.global_eval.as_ref().map(task::eval_to_protocol);
    ctx.record(task::train_completed(
        offer,
        ctx.data.local().fingerprint.to_string(),
        &trained.report,
        metrics.as_ref(),
        &update,
        feature_scaling,
    ))?;

    // Encode (deterministic for the seed), sign the header, upload.
    let encoding = offer.encoding;
    let seed = rand::rngs::OsRng.next_u64();
    let delta = update.delta;
    let (records, summary) =
        tokio::task::spawn_blocking(move || encode_payload(&delta, encoding, seed))
            .await
            .map_err(|e| TaskError::Internal(format!("encoding task: {e}")))??;
    debug_assert!(session.protocol_version <= PROTOCOL_VERSION);
    let key = ctx
        .kit
        .update_signing_key()
        .ok_or_else(|| TaskError::Internal("the kit has no update-signing key".into()))?;
    let claims = task::Claims {
        num_examples: trained.report.samples as u64,
        metrics,
        feature_stats: ctx.data.feature_stats().cloned(),
        nonce: UpdateNonce::random(&mut rand::rngs::OsRng),
    };
    let task::Sealed { envelope, sent } = task::seal_update(session, offer, &summary, claims, key);
    // On disk before the first byte of the upload leaves.
    ctx.record(sent)?;
    let records: Vec<bytes::Bytes> = records.into_iter().map(bytes::Bytes::from).collect();
    if session.protocol_version >= RESUME_VERSION {
        // Kept until answered: a lost connection resumes it.
        ctx.transfers(|t| {
            t.keep_upload(KeptUpload {
                envelope: envelope.clone(),
                records: records.clone(),
            })
        });
    }
    let (send, recv) = conn.open_bi().await?;
    let opening = upload::opening(&envelope);
    let (fully_sent, answer) = send_and_answer(send, recv, Some(opening), &records).await?;
    if !fully_sent {
        tracing::info!(round = %offer.round, "the coordinator answered before the whole payload was sent");
    }
    upload_answered(ctx, &envelope, &answer)
}

/// Record the coordinator's answer to the upload of `envelope` (and stop
/// keeping the upload for a resume).
fn upload_answered(
    ctx: &Ctx,
    envelope: &SignedEnvelope,
    answer: &Message,
) -> Result<(), TaskError> {
    ctx.transfers(|t| t.upload_answered(envelope));
    ctx.record(upload::on_upload_answer(envelope, answer)?)?;
    Ok(())
}

/// Resume the kept upload of a round: `ResumeUpload` with the same signed
/// envelope; the coordinator answers how many records it holds
/// (`UploadProgress`), and only the rest are sent. A coordinator that kept
/// nothing (it restarted, or the round moved on) refuses: the update is
/// then signed again with a new nonce and sent whole — still without
/// training again.
async fn resume_upload(
    ctx: &Arc<Ctx>,
    conn: &Conn,
    session: &Session,
    kept: KeptUpload,
) -> Result<(), TaskError> {
    let (job, round) = kept.round();
    tracing::info!(job = %job, round = %round, "resuming the upload cut short by the lost connection");
    let envelope = &kept.envelope;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.message(&upload::resume_request(envelope)).await?;
    let answer = recv.message().await?;
    if matches!(answer, Message::UploadResult(_)) {
        // Answered (even by a wrong acknowledgement): no longer kept.
        ctx.transfers(|t| t.upload_answered(envelope));
    }
    match upload::on_resume_answer(&kept, &answer)? {
        upload::ResumeStep::SendRest { resumed, rest } => {
            ctx.record(resumed)?;
            let (_, answer) = send_and_answer(send, recv, None, rest).await?;
            upload_answered(ctx, envelope, &answer)
        }
        upload::ResumeStep::SignAgain { refused } => {
            // Not resumable: record the refusal, then the same update under
            // a new nonce.
            ctx.record(refused)?;
            resend_signed_again(ctx, conn, session, &kept).await
        }
        upload::ResumeStep::Answered { answered } => {
            ctx.record(answered)?;
            Ok(())
        }
    }
}

/// The kept update's payload under a fresh nonce and signature (the
/// coordinator kept nothing to resume): recorded as a new `update.sent`,
/// sent whole.
async fn resend_signed_again(
    ctx: &Arc<Ctx>,
    conn: &Conn,
    session: &Session,
    kept: &KeptUpload,
) -> Result<(), TaskError> {
    let key = ctx
        .kit
        .update_signing_key()
        .ok_or_else(|| TaskError::Internal("the kit has no update-signing key".into()))?;
    let nonce = UpdateNonce::random(&mut rand::rngs::OsRng);
    let (again, sent) = upload::sign_again(kept, key, nonce);
    // On disk before the first byte of the upload leaves.
    ctx.record(sent)?;
    if session.protocol_version >= RESUME_VERSION {
        ctx.transfers(|t| t.keep_upload(again.clone()));
    }
    let (send, recv) = conn.open_bi().await?;
    let opening = upload::opening(&again.envelope);
    let (_, answer) = send_and_answer(send, recv, Some(opening), &again.records).await?;
    upload_answered(ctx, &again.envelope, &answer)
}

/// The global model `hash`: the driver of [`Download`], which decides
/// everything — the cache, the update of the model held (`base`, protocol
/// 7 and later; a refused update is recorded as `model.refused` and the
/// whole model fetched instead), the whole model, resuming a cut download
/// (protocol 6 and later). This function loads cache files, moves frames,
/// executes the machine's effects (audit records before the next step)
/// and caches the result before its `model.received` record.
async fn obtain_model(
    ctx: &Arc<Ctx>,
    conn: &Conn,
    session: &Session,
    hash: ModelHash,
    spec: &ModelSpec,
    base: Option<ModelHash>,
) -> Result<FlatModel, TaskError> {
    let request = download::Request {
        hash,
        spec: spec.clone(),
        max_params: ctx.config.policy.max_model_params,
        protocol_version: session.protocol_version,
        held: base,
    };
    let mut dl = Download::new(request, ctx.transfers(|t| t.download().cloned()));
    let mut next = dl.on_cached(load_cached(ctx, hash, spec).await?);
    let mut stream: Option<FramedRecv> = None;
    loop {
        for effect in dl.take_effects() {
            match effect {
                download::Effect::Uncache(h) => ctx.cache.remove(&h)?,
                download::Effect::Record(event) => {
                    ctx.record(event)?;
                }
                download::Effect::Keep { hash, base, record } => {
                    ctx.transfers(|t| t.downloaded(&hash, base.as_ref(), record));
                }
                download::Effect::Forget(h) => ctx.transfers(|t| t.download_done(&h)),
            }
        }
        next = match next? {
            Step::LoadBase(base) => dl.on_base(load_cached(ctx, base, spec).await?),
            Step::Ask(request) => {
                if let Message::ModelFetchFrom(f) = &request {
                    tracing::info!(model = %hash, records = f.from_record, "resuming the model download");
                }
                let (mut send, mut recv) = conn.open_bi().await?;
                send.message(&request).await?;
                send.finish()?;
                let answer = recv.message().await?;
                stream = Some(recv);
                dl.on_answer(answer)
            }
            Step::Receive => match stream.as_mut() {
                Some(recv) => dl.on_record(recv.chunk().await?),
                None => return Err(TaskError::Internal("no model stream".into())),
            },
            Step::End => match stream.as_mut() {
                Some(recv) => dl.on_end(recv.next_frame().await?.is_some()),
                None => return Err(TaskError::Internal("no model stream".into())),
            },
            Step::Done(outcome) => {
                let download::Outcome {
                    model,
                    cache,
                    received,
                } = *outcome;
                let model = store_model(ctx, hash, model, cache).await?;
                ctx.record(received)?;
                return Ok(model);
            }
        };
    }
}

/// Model `hash` from the cache, checked against `spec` (a file that fails
/// verification is reported as corrupt; the download machine has it
/// removed).
async fn load_cached(ctx: &Ctx, hash: ModelHash, spec: &ModelSpec) -> Result<Cached, TaskError> {
    let (cache, spec_owned) = (ctx.cache.clone(), spec.clone());
    let cached = tokio::task::spawn_blocking(move || cache.load(&hash, &spec_owned))
        .await
        .map_err(|e| TaskError::Internal(format!("cache task: {e}")))?;
    Ok(match cached {
        Ok(Some(model)) => Cached::Hit {
            model,
            bytes: std::fs::metadata(ctx.cache.path(&hash)).map_or(0, |m| m.len()),
        },
        Ok(None) => Cached::Miss,
        Err(e) => {
            tracing::warn!(model = %hash, error = %e, "cached model failed verification");
            Cached::Corrupt
        }
    })
}

/// Keep an obtained model in the cache as the download machine says: as
/// received, or (obtained as an update) its lossless records, encoded on
/// the blocking pool. The model goes to the blocking task and comes back:
/// no copy of it.
async fn store_model(
    ctx: &Ctx,
    hash: ModelHash,
    model: FlatModel,
    form: Option<CacheForm>,
) -> Result<FlatModel, TaskError> {
    let cache = ctx.cache.clone();
    let store = move || -> Result<FlatModel, TaskError> {
        match form {
            None => {}
            Some(CacheForm::Received { manifest, records }) => {
                cache.store(&manifest, &records)?;
            }
            Some(CacheForm::Reencode) => {
                let (manifest, records) = download::cache_form(&model, hash)?;
                cache.store(&manifest, &records)?;
            }
        }
        Ok(model)
    };
    tokio::task::spawn_blocking(store)
        .await
        .map_err(|e| TaskError::Internal(format!("cache task: {e}")))?
}

/// Send the opening message (if any) and the chunk records on an upload
/// stream while waiting for the answer (the coordinator may refuse early
/// without reading the payload). Returns whether everything was sent, and
/// the answer.
async fn send_and_answer(
    mut send: FramedSend,
    mut recv: FramedRecv,
    opening: Option<Message>,
    records: &[bytes::Bytes],
) -> Result<(bool, Message), TaskError> {
    let sending = async {
        if let Some(m) = &opening {
            send.message(m).await?;
        }
        for r in records {
            send.chunk(r.clone()).await?;
        }
        send.finish()
    };
    let receiving = recv.message();
    let mut sending = std::pin::pin!(sending);
    let mut receiving = std::pin::pin!(receiving);
    let mut sent: Option<Result<(), TransportError>> = None;
    let reply = loop {
        tokio::select! {
            r = &mut sending, if sent.is_none() => sent = Some(r),
            m = &mut receiving => break m,
        }
    };
    let fully_sent = matches!(sent, Some(Ok(())));
    match reply {
        Ok(m) => Ok((fully_sent, m)),
        Err(e) => Err(match sent {
            Some(Err(send_err)) => send_err.into(),
            _ => e.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A round that fails on the coordinator's answer records why in
    /// `round.failed`: the typed violations read as the reasons did.
    #[test]
    fn coordinator_violations_name_what_was_wrong() {
        let unexpected = TaskError::from(Violation::Unexpected {
            sent: "Bye",
            request: "ResumeUpload",
        });
        assert_eq!(
            unexpected.to_string(),
            "coordinator: sent Bye in answer to ResumeUpload"
        );
        let hash = ModelHash([7; 32]);
        let refused = TaskError::from(DownloadError::from(download::ModelViolation::Refused {
            hash,
            code: "not_found".into(),
            message: "no such model".into(),
        }));
        assert_eq!(
            refused.to_string(),
            format!("coordinator: model {hash} refused: not_found: no such model")
        );
        let extra = TaskError::from(DownloadError::from(download::ModelViolation::ExtraFrames));
        assert_eq!(
            extra.to_string(),
            "coordinator: more model frames than the manifest announced"
        );
    }

    #[test]
    fn exit_codes() {
        assert_eq!(AgentError::Config("x".into()).exit_code(), 2);
        assert_eq!(
            AgentError::Tls(fedlink_certs::Error::Refused("x".into())).exit_code(),
            3
        );
        assert_eq!(AgentError::Internal("x".into()).exit_code(), 1);
    }
}
