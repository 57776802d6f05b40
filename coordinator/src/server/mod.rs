//! The coordinator service: the tokio/quinn driver around the sans-IO round
//! machine ([`crate::round`]), the store ([`crate::store`]) and the
//! aggregation engine.
//!
//! ```text
//!  site ──QUIC/mTLS──▶ conn task ──(verify envelope, spool + hash, validate)──▶ Event ─▶ engine task
//!                        ▲   │                                                     │ JobRunner.handle(now, input)
//!                        │   └── model download (models/<hash>.wire)               │ actions, in order:
//!                        └──────── control messages (offers, cancel, bye) ◀────────┘ persist → offer/ack/fold/aggregate
//! ```
//!
//! One job runs at a time (the one named in the config, or the most recent
//! unfinished job in the store; submitted jobs queue behind it). With
//! neither, the coordinator starts empty: it serves the admin API and holds
//! site connections (`server::idle`, private) until the first job is submitted. The
//! connected sites (`server::links`: the core's [`crate::core::Sites`] plus
//! each connection's transport handles) are handed to every job that starts,
//! the first and each next queued one alike. After
//! `kill -9`, starting again resumes the job from the store (see
//! [`crate::store`] for the crash semantics).

mod admin;
mod admin_state;
pub(crate) mod audit;
mod clock;
mod conn;
mod disk;
mod effects;
mod engine;
mod event;
mod idle;
mod init_model;
mod limits;
mod links;
pub(crate) mod pool;
mod shared;
pub(crate) mod spool;
pub mod status;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fedlink_audit::{CoordEvent, coord};
use fedlink_certs::{Kit, RevocationList, SiteManifest};
use fedlink_protocol::FederationId;
use tokio::sync::{Semaphore, mpsc};

use crate::config::{CoordinatorConfig, TcpListen};
use crate::core::JobNeeds;
use crate::core::admin::update_keys;
use crate::core::jobs::{self, ConfigJob, StartUp};
use crate::core::recovery::{self, Create, Recovered, RecoveryError, Reopened, Resumed, Stored};
use crate::core::refusals::Refusals;
use crate::core::registry::RegistryWatch;
use crate::job::Job;
use crate::round::{JobOutcome, JobRunner, RoundConfig};
use crate::store::Store;
// The models' wire files are the store's (`store::wire`); named here so
// that the driver's modules reach them as `super::wire`.
use crate::store::wire;
pub(crate) use audit::Auditor;
use engine::{Engine, EngineParts};
use shared::{Shared, mtime};
use wire::ServedModels;

pub use crate::core::admin::KeysError;
pub use crate::core::jobs::strategy_config;
pub use audit::AuditError;
pub use init_model::{InitModelError, initial_model};
pub(crate) use limits::PeerLimits;
pub use status::{STATUS_FILE, Status};

/// Why the coordinator could not start or had to stop.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The site manifest is another federation's than the kit.
    #[error("TLS / kit: the site manifest is for federation {manifest}, the kit for {kit}")]
    ManifestFederation {
        /// The manifest's federation.
        manifest: String,
        /// The kit's federation.
        kit: String,
    },
    /// The coordinator kit has no ed25519 audit key (kits issued by older
    /// versions lack it).
    #[error(
        "TLS / kit: the coordinator kit {} has no ed25519 audit key (update_key in kit.toml; \
         kits issued by older versions lack it): renew it with `fedlink certs renew \
         coordinator --role coordinator --ca <ca dir> --out <kit dir>`, which adds the key",
        kit.display()
    )]
    NoAuditKey {
        /// The kit's directory.
        kit: PathBuf,
    },
    /// A kit, revocation list or site manifest that cannot be read, or the
    /// TLS configuration built from them.
    #[error("TLS / kit: {0}")]
    Certs(#[from] fedlink_certs::Error),
    /// The kit's federation name is not a valid federation id.
    #[error("TLS / kit: {0}")]
    Federation(#[source] fedlink_protocol::IdError),
    /// The site manifest's update keys cannot be used.
    #[error("TLS / kit: {0}")]
    Keys(#[from] KeysError),
    /// No job to run where one is needed (`--exit-after-job`).
    #[error(
        "job: no job to run: --exit-after-job needs a job (`job = ...` in the config, or an \
         unfinished job in the store); without it the coordinator starts empty and waits \
         for `fedlink jobs submit`"
    )]
    NoJob,
    /// The job's strategy does not fit its model.
    #[error("job: {0}")]
    DoesNotFit(#[source] fedlink_aggregation::AggregationError),
    /// The job's model has no wire form to serve (it could not be written
    /// or read back); the cause is the driver's own error.
    #[error("job: {0}")]
    ModelWire(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The engine cannot start on the job (its id, its strategy's record,
    /// its evaluations in the store); the cause is the engine's own error.
    #[error("job: {0}")]
    EngineStart(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The job file is unreadable or invalid.
    #[error("job: {0}")]
    JobFile(#[from] crate::job::JobError),
    /// The job file could not be read again to record its hash.
    #[error("job: {}: {source}", path.display())]
    JobRead {
        /// The job file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The job's initial model cannot be made or read.
    #[error("job: {0}")]
    InitialModel(#[from] InitModelError),
    /// The job's aggregation strategy is not valid.
    #[error("job: {0}")]
    Strategy(#[from] fedlink_aggregation::ConfigError),
    /// The job's id is not a valid job id.
    #[error("job: {0}")]
    JobId(#[source] fedlink_protocol::IdError),
    /// A job's state kept in the store does not decode (`what`: "stored
    /// optimizer state", "stored replay state").
    #[error("job: {what}: {source}")]
    StoredState {
        /// Which state.
        what: &'static str,
        /// Why it does not decode.
        source: serde_json::Error,
    },
    /// The store.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The data directory is unusable: not a directory, or too open (other
    /// local users could read site data) and its mode cannot be tightened.
    #[error("data_dir: {0}")]
    DataDir(#[source] fedlink_certs::Error),
    /// Binding the QUIC endpoint at `addr`.
    #[error("network: binding {addr}: {source}")]
    Bind {
        /// The configured listen address.
        addr: SocketAddr,
        /// Why it could not be bound.
        source: fedlink_transport::TransportError,
    },
    /// The bound QUIC endpoint has no local address.
    #[error("network: {0}")]
    LocalAddr(#[source] std::io::Error),
    /// Binding the TCP listener at `addr`.
    #[error("network: binding TCP {addr}: {source}")]
    BindTcp {
        /// The TCP listen address.
        addr: SocketAddr,
        /// Why it could not be bound.
        source: fedlink_transport::TransportError,
    },
    /// The audit log could not be opened or written: nothing runs
    /// unaudited.
    #[error("audit: {0}")]
    Audit(#[from] AuditError),
    /// The engine stopped on an error it cannot recover from in-process
    /// (e.g. a checkpoint could not be persisted). Restarting recovers. The
    /// cause is the engine's own error (it names the round or the step).
    #[error("fatal: {0}")]
    Fatal(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A thread panicked while holding the site manifest.
    #[error("fatal: manifest lock poisoned")]
    ManifestLock,
}

impl From<engine::EngineError> for ServeError {
    fn from(e: engine::EngineError) -> Self {
        Self::Fatal(Box::new(e))
    }
}

/// Create the data directory (mode 0700) or make an existing one owner-only:
/// it holds raw site updates. Every directory and file below it that group or
/// others could access is tightened, with a warning naming it and the mode
/// found; a mode that cannot be changed stops the start.
fn private_data_dir(dir: &Path) -> Result<(), ServeError> {
    let changed = fedlink_certs::private::make_private(dir).map_err(ServeError::DataDir)?;
    let (dirs, files): (Vec<_>, Vec<_>) = changed.iter().partition(|t| t.is_dir);
    for t in &dirs {
        tracing::warn!(
            path = %t.path.display(),
            mode = format!("{:03o}", t.from),
            now = format!("{:03o}", t.to),
            "directory in data_dir was accessible to other local users; made owner-only"
        );
    }
    if let Some(first) = files.first() {
        tracing::warn!(
            files = files.len(),
            first = %first.path.display(),
            mode = format!("{:03o}", first.from),
            "files in data_dir were accessible to other local users; made owner-only"
        );
    }
    Ok(())
}

/// Shutdown's bounded wait: `wait` for at most `grace`; past it, warn
/// "`still` `grace` s after `after`" and return `false` (the caller decides
/// whether to abort what it waited for).
async fn wait_bounded(
    wait: impl std::future::Future,
    grace: Duration,
    still: &str,
    after: &str,
) -> bool {
    let done = tokio::time::timeout(grace, wait).await.is_ok();
    if !done {
        tracing::warn!("{still} {} s after {after}", grace.as_secs());
    }
    done
}

/// How long shutdown waits for connection tasks to record their ends.
const CONNECTIONS_GRACE: Duration = Duration::from_secs(10);

/// How often the coordinator looks for a changed manifest or revocation
/// list even when no site connects.
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// Source addresses whose handshake rate is tracked, at most (a few
/// hundred kilobytes).
const MAX_RATE_SOURCES: usize = 8192;

/// How many times [`bind_listeners`] picks a new port when the listen
/// port is 0 and TCP must share QUIC's port number.
const SHARED_PORT_ATTEMPTS: usize = 16;

/// Bind the QUIC endpoint and, unless `tcp_listen = "off"`, the TCP
/// listener. With `tcp_listen = "same"` TCP takes the port number QUIC got;
/// when the listen port is 0 (any), that number can already be in use on
/// TCP by an unrelated socket (UDP and TCP ports are separate), so another
/// port is tried. A configured port is bound once: its failure is the
/// operator's to see.
async fn bind_listeners(
    cfg: &CoordinatorConfig,
    tls: rustls::ServerConfig,
) -> Result<
    (
        quinn::Endpoint,
        SocketAddr,
        Option<fedlink_transport::tcp::TcpServer>,
    ),
    ServeError,
> {
    let retry = cfg.listen.port() == 0 && cfg.tcp_listen == TcpListen::Same;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let endpoint = fedlink_transport::server_endpoint_with(
            cfg.listen,
            tls.clone(),
            cfg.idle_timeout(),
            cfg.congestion_control,
        )
        .map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let local = endpoint.local_addr().map_err(ServeError::LocalAddr)?;
        // TLS over TCP, for sites whose network blocks UDP: the same rustls
        // config (mutual TLS, federation CA, revocations, ALPNs), bound
        // after QUIC so that `same` with port 0 gets the port QUIC got.
        let Some(addr) = cfg.tcp_listen.resolve(local) else {
            return Ok((endpoint, local, None));
        };
        match fedlink_transport::tcp::TcpServer::bind(addr, tls.clone()).await {
            Ok(server) => return Ok((endpoint, local, Some(server))),
            Err(fedlink_transport::TransportError::Io(e))
                if retry
                    && attempt < SHARED_PORT_ATTEMPTS
                    && e.kind() == std::io::ErrorKind::AddrInUse =>
            {
                tracing::debug!(
                    port = local.port(),
                    "TCP port in use: another port for both"
                );
                endpoint.close(0u32.into(), b"rebinding");
            }
            Err(source) => return Err(ServeError::BindTcp { addr, source }),
        }
    }
}

/// What [`serve`] returns when it stops cleanly.
#[derive(Debug)]
pub struct ServeOutcome {
    /// How the job ended, if it did.
    pub outcome: Option<JobOutcome>,
}

/// Options of [`serve`] that are not in the config file.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// Stop once the job has finished (demo, tests, batch use).
    pub exit_after_job: bool,
    /// Report the bound address (useful with port 0).
    pub bound: Option<mpsc::UnboundedSender<SocketAddr>>,
}

/// Run the coordinator until `shutdown` resolves (or the job finishes, with
/// [`ServeOptions::exit_after_job`]). Must run on a multi-threaded tokio
/// runtime.
pub async fn serve(
    cfg: CoordinatorConfig,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<ServeOutcome, ServeError> {
    let kit = Kit::load(&cfg.kit)?;
    let federation =
        FederationId::new(kit.identity().federation()).map_err(ServeError::Federation)?;
    let revocations = RevocationList::load(cfg.revoked_path())?;
    let manifest = SiteManifest::load(&cfg.manifest_path())?;
    if manifest.federation != kit.identity().federation() {
        return Err(ServeError::ManifestFederation {
            manifest: manifest.federation.clone(),
            kit: kit.identity().federation().to_owned(),
        });
    }
    update_keys(&manifest)?;
    let tls = fedlink_certs::server_tls_config(&kit, revocations.clone())?;
    let audit_key = kit
        .update_signing_key()
        .cloned()
        .ok_or_else(|| ServeError::NoAuditKey {
            kit: kit.dir().to_owned(),
        })?;

    // Store and job.
    private_data_dir(&cfg.data_dir)?;
    let auditor = Arc::new(Auditor::open(
        &cfg.data_dir,
        audit_key,
        kit.identity().to_string(),
        cfg.audit_rotate_bytes,
    )?);
    auditor.record_own_event(&CoordEvent::CoordinatorStarted(coord::CoordinatorStarted {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        federation: kit.identity().federation().to_owned(),
        audit_public_key: auditor.public_key_hex(),
    }))?;
    let store = Arc::new(Store::open(&cfg.data_dir)?);
    clean_spool(&store.dir().join("spool"));
    let job_id = match select_job(&store, cfg.job.as_deref(), &auditor, opts.exit_after_job)? {
        StartUp::Create(id) | StartUp::Run(id) => Some(id),
        StartUp::Empty => None,
        StartUp::Exit(outcome) => {
            return Ok(ServeOutcome {
                outcome: Some(outcome),
            });
        }
        StartUp::NoJob => return Err(ServeError::NoJob),
    };

    let (tx, mut rx) = mpsc::channel(limits::ENGINE_QUEUE);
    let shared = Arc::new(Shared {
        tasks: tokio_util::task::TaskTracker::new(),
        answers: tokio_util::task::TaskTracker::new(),
        engine: tx,
        manifest: RwLock::new(manifest),
        registry_watch: Mutex::new(RegistryWatch::new(
            mtime(&cfg.manifest_path()),
            revocations.path().and_then(mtime),
        )),
        manifest_path: cfg.manifest_path(),
        revocations,
        site_links: Mutex::new(HashMap::new()),
        federation,
        heartbeat: cfg.heartbeat_interval(),
        uploads: Semaphore::new(cfg.max_concurrent_uploads),
        downloads: Semaphore::new(cfg.max_concurrent_downloads),
        uploads_in_flight: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        wire: RwLock::new(ServedModels::default()),
        downlink: RwLock::new(None),
        job_needs: RwLock::new(JobNeeds::ANY),
        audit: auditor.clone(),
        admin: admin_state::AdminState::new(
            store.clone(),
            kit.ca_cert().clone(),
            cfg.revoked_path(),
            cfg.init_dir.clone(),
        ),
        refusals: Mutex::new(Refusals::new(Duration::from_secs(cfg.refusal_summary_secs))),
        disk: disk::DiskGuard::new(&cfg.data_dir, cfg.min_free_disk_mib.saturating_mul(1 << 20)),
        connections: limits::Connections::new(
            cfg.max_connections,
            cfg.max_connections_per_identity,
        ),
        peer: cfg.peer_limits(),
    });
    let mut engine = match &job_id {
        Some(id) => Some(build_engine(&store, id, &shared, &cfg)?),
        None => None,
    };
    let mut idle = idle::Idle::default();

    let (endpoint, local, tcp) = bind_listeners(&cfg, tls).await?;
    let tcp_local = tcp.as_ref().and_then(|t| t.local_addr().ok());
    tracing::info!(listen = %local, tcp = ?tcp_local, job = job_id.as_deref().unwrap_or("none"), "coordinator listening");
    if let Some(b) = &opts.bound {
        let _ = b.send(local);
    }

    let reload_shared = shared.clone();
    let reloader = tokio::spawn(async move {
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        loop {
            tick.tick().await;
            reload_shared.reload_if_changed();
            reload_shared.record_refusals(false);
        }
    });

    let accept_shared = shared.clone();
    let accept_endpoint = endpoint.clone();
    let handshakes = Arc::new(Semaphore::new(cfg.max_handshakes_in_flight));
    let mut rates = crate::core::limits::SourceRates::new(
        cfg.handshake_burst_per_source,
        cfg.handshakes_per_source_per_sec,
        MAX_RATE_SOURCES,
    );
    // Connection tasks are owned here, so that shutdown can wait for them:
    // each records `conn.closed` as it ends, and a clean shutdown leaves an
    // audit log with every connection's end in it.
    let tcp_stop = Arc::new(tokio::sync::Notify::new());
    let stop_tcp = tcp_stop.clone();
    let acceptor = tokio::spawn(async move {
        let mut tcp = tcp;
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                incoming = accept_endpoint.accept() => match incoming {
                    Some(incoming) => {
                        if let Some(permit) = conn::admit(incoming, &handshakes, &mut rates, &accept_shared) {
                            tasks.spawn(conn::handle_incoming(permit, accept_shared.clone()));
                        }
                    }
                    // The endpoint is closed: shutting down.
                    None => break,
                },
                accepted = accept_tcp(tcp.as_ref()) => match accepted {
                    Ok(incoming) => {
                        if let Some(slot) = conn::admit_tcp(&incoming, &handshakes, &mut rates, &accept_shared) {
                            tasks.spawn(conn::handle_incoming_tcp(incoming, slot, accept_shared.clone()));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "accepting a TCP connection"),
                },
                _ = tcp_stop.notified() => tcp = None,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    });

    tokio::pin!(shutdown);
    // One job at a time: when the running job has finished and a submitted
    // job waits, the next one starts (sites reconnect into it).
    let result = loop {
        let Some(running) = engine.as_mut() else {
            // No job yet: hold the sites until one is submitted, then hand
            // them over to its engine.
            match idle::run_idle(&mut idle, &mut rx, &shared, shutdown.as_mut()).await {
                Some(first) => {
                    tracing::info!(job = %first, "starting the first submitted job");
                    match start_job(&store, &first, &shared, &cfg, idle.links_mut()) {
                        Ok(e) => engine = Some(e),
                        Err(e) => break Err(e),
                    }
                    continue;
                }
                None => break Ok(()),
            }
        };
        shared.admin.set_current_job(running.job_id());
        match engine::driver::run_engine(
            running,
            &mut rx,
            opts.exit_after_job,
            &shared,
            shutdown.as_mut(),
        )
        .await
        {
            Ok(Some(next)) => {
                tracing::info!(job = %next, "starting the next queued job");
                // The connected sites go to the next job, as after an
                // empty start.
                match start_job(&store, &next, &shared, &cfg, running.links_mut()) {
                    Ok(e) => engine = Some(e),
                    Err(e) => break Err(e),
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.into()),
        }
    };
    // Answers already decided reach their sites before the connections
    // close (bounded: a site that stopped reading must not hold shutdown).
    shared.answers.close();
    wait_bounded(
        shared.answers.wait(),
        limits::ANSWER_GRACE,
        "upload answers still unacknowledged",
        "the end; closing anyway",
    )
    .await;
    idle.close_all();
    if let Some(e) = engine.as_mut() {
        e.close_all();
    }
    endpoint.close(
        fedlink_transport::close::SHUTDOWN,
        b"coordinator shutting down",
    );
    stop_tcp.notify_one();
    reloader.abort();
    // The closed endpoint ends the acceptor's loop; it then waits for the
    // connection tasks to record their ends. Bounded: a task stuck on a
    // full disk must not hold the shutdown.
    let acceptor_abort = acceptor.abort_handle();
    if !wait_bounded(
        acceptor,
        CONNECTIONS_GRACE,
        "connection tasks still running",
        "shutdown; not waiting for them",
    )
    .await
    {
        acceptor_abort.abort();
    }
    // The reloader and every stream task hold `shared` (and through it the
    // store): wait until they are gone, bounded like the connections.
    let _ = reloader.await;
    shared.tasks.close();
    wait_bounded(
        shared.tasks.wait(),
        CONNECTIONS_GRACE,
        "stream tasks still running",
        "shutdown; not waiting for them",
    )
    .await;
    // Failed handshakes still counted are recorded before the coordinator
    // stops.
    shared.record_refusals(true);
    // Give quinn a moment to send the close frames.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result.map(|()| ServeOutcome {
        outcome: engine.as_ref().and_then(|e| e.outcome().cloned()),
    })
}

/// Build the engine of job `id` and give it the connected sites `held`
/// (the idle holder's after an empty start, the finished job's at a job
/// switch: the same way, [`Engine::adopt`]). The sites move only once the
/// engine is built: a job that cannot start leaves them where they were.
fn start_job(
    store: &Arc<Store>,
    id: &str,
    shared: &Arc<Shared>,
    cfg: &CoordinatorConfig,
    held: &mut links::Links,
) -> Result<Engine, ServeError> {
    let mut engine = build_engine(store, id, shared, cfg)?;
    engine.adopt(std::mem::take(held), Instant::now())?;
    Ok(engine)
}

/// Recover a job from the store and build its engine (the job's codec and
/// its current model are published for the connection tasks): what the
/// store holds is read here, [`recovery::recover`] decides what is
/// recorded and which state the engine starts from.
fn build_engine(
    store: &Arc<Store>,
    job_id: &str,
    shared: &Arc<Shared>,
    cfg: &CoordinatorConfig,
) -> Result<Engine, ServeError> {
    let recovery = store.recover(job_id)?;
    let replay_state = store.replay_state(&recovery.job.id)?;
    let reopened = recovery.reopened_round.map(|round| Reopened {
        round,
        discarded: recovery.discarded_updates.len(),
    });
    if let Some(r) = reopened {
        tracing::warn!(
            round = r.round.0,
            discarded = r.discarded,
            "resuming: the round in flight is re-opened; its updates are requested again"
        );
    }
    let Recovered { effects, outcome } = recovery::recover(Stored {
        actor: shared.audit().actor(),
        federation: &shared.federation,
        job: &recovery.job,
        reopened,
        model: recovery.model.spec(),
        optimizer_state: recovery.optimizer_state.as_deref(),
        replay_state: replay_state.as_deref(),
    });
    append_own(shared.audit(), store, effects)?;
    let Resumed {
        strategy,
        state: persisted,
        replay,
    } = outcome?;
    let job = recovery.job;
    let runner = JobRunner::resume(RoundConfig::from_job(&job), recovery.snapshot);
    let models_dir = store.dir().join(crate::store::MODELS_DIR);
    let first_wire = wire::ensure(&models_dir, &recovery.model)
        .map_err(|e| ServeError::ModelWire(Box::new(e)))?;
    if let Ok(mut n) = shared.job_needs.write() {
        *n = JobNeeds::of(&job);
    }
    let (served, _) = shared.publish_wire(first_wire);
    // Wire files of versions an earlier run served (none pruned when
    // nothing is served: `core::served::models_to_prune`).
    wire::prune_models(&models_dir, &served);
    // The update that made the current model, if the last round wrote one
    // in this job's encoding: sites holding its base get it after a
    // restart too (anything else gets whole models;
    // `core::served::update_to_serve_again`, `update_fits`).
    shared.publish_update(wire::find_update(
        &models_dir,
        &recovery.model.hash(),
        recovery.model.spec(),
        job.encoding.downlink_encoding(),
    ));

    let status = status::StatusWriter::new(store.dir().join(STATUS_FILE));
    let keys = update_keys(
        &*shared
            .manifest
            .read()
            .map_err(|_| ServeError::ManifestLock)?,
    )?;
    let engine = Engine::new(
        EngineParts {
            job,
            runner,
            store: store.clone(),
            strategy,
            server_state: persisted.server,
            scaling: persisted.scaling,
            global: recovery.model,
            federation: shared.federation.clone(),
            keys,
            replay,
            status,
            retention: cfg.update_retention,
            wire: shared.clone(),
            models_dir: models_dir.clone(),
        },
        Instant::now(),
    )
    .map_err(|e| ServeError::EngineStart(Box::new(e)))?;
    Ok(engine)
}

/// Append the core's audit `effects` (start-up's own entries); an append
/// that fails stops the start with the audit log's error.
fn append_own(
    audit: &Auditor,
    store: &Store,
    effects: impl IntoIterator<Item = crate::core::Effect>,
) -> Result<(), ServeError> {
    effects::execute(
        audit,
        store,
        effects,
        |failed| match failed {
            effects::Unexecuted::Audit { source, .. } => ServeError::Audit(source),
            effects::Unexecuted::Persist { source, .. } => ServeError::Store(source),
        },
        |other| {
            Err(ServeError::Fatal(
                format!("not a start-up effect: {other:?}").into(),
            ))
        },
    )
}

impl From<RecoveryError> for ServeError {
    fn from(e: RecoveryError) -> Self {
        match e {
            RecoveryError::Strategy(e) => Self::Strategy(e),
            RecoveryError::DoesNotFit(e) => Self::DoesNotFit(e),
            RecoveryError::StoredState { what, source } => Self::StoredState { what, source },
            RecoveryError::JobId(e) => Self::JobId(e),
        }
    }
}

/// Remove partial uploads left by a crash (their rounds are re-opened and
/// the sites upload again).
fn clean_spool(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "part") {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a partial upload left by a crash")
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "cannot remove a partial upload")
                }
            }
        }
    }
}

/// Which job to run ([`jobs::start_up`] decides): the config's job file
/// as the store knows it and the store's jobs are read here; a new
/// configured job is created here, in the steps
/// [`recovery::configured_job_created`] gives (its `job.submitted` entry
/// first).
fn select_job(
    store: &Store,
    job_file: Option<&Path>,
    auditor: &Auditor,
    exit_after_job: bool,
) -> Result<StartUp, ServeError> {
    let configured = match job_file {
        Some(path) => {
            let job = Job::from_file(path)?;
            let config = match store.job(&job.id)? {
                None => ConfigJob::New(job.id.clone()),
                Some(rec) => ConfigJob::Stored {
                    id: rec.id,
                    outcome: rec.outcome,
                },
            };
            Some((path, job, config))
        }
        None => None,
    };
    let stored: Vec<jobs::StoredJob> = store
        .jobs()?
        .into_iter()
        .map(|r| jobs::StoredJob {
            finished: r.outcome.is_some(),
            id: r.id,
        })
        .collect();
    let config = configured
        .as_ref()
        .map_or(ConfigJob::None, |(_, _, c)| c.clone());
    if let ConfigJob::Stored {
        id,
        outcome: Some(outcome),
    } = &config
    {
        tracing::info!(job = %id, outcome = %crate::round::plain_round_ids(&format!("{outcome:?}")), "the configured job has already finished; it is not run again");
    }
    let decision = jobs::start_up(config, &stored, exit_after_job);
    if let (StartUp::Create(_), Some((path, job, _))) = (&decision, &configured) {
        let model = initial_model(job)?;
        let toml = std::fs::read(path).map_err(|source| ServeError::JobRead {
            path: path.to_path_buf(),
            source,
        })?;
        // The store's content address of the model, as it returns it.
        let mut hash = model.hash();
        for step in recovery::configured_job_created(auditor.actor(), &job.id, &toml, &hash) {
            match step {
                Create::Audit(entry) => append_own(auditor, store, [*entry])?,
                Create::PutModel => hash = store.put_model(&model)?,
                Create::CreateJob => {
                    store.create_job(job, hash)?;
                }
                // Not a configured job's step: it runs now.
                Create::Enqueue => {}
            }
        }
        tracing::info!(job = %job.id, model = %hash, "job created");
    }
    Ok(decision)
}

/// The next TCP connection of the listener, if there is one (pending forever
/// otherwise, so that a `select!` arm without a listener never fires).
async fn accept_tcp(
    tcp: Option<&fedlink_transport::tcp::TcpServer>,
) -> Result<fedlink_transport::tcp::TcpIncoming, fedlink_transport::TransportError> {
    match tcp {
        Some(t) => t.accept().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// The start and stop errors read as their strings did before they
    /// were typed, and keep their cause as the error's source.
    #[test]
    fn serve_errors_read_as_before_and_keep_their_cause() {
        use std::error::Error as _;
        let e = ServeError::ManifestFederation {
            manifest: "fed-a".into(),
            kit: "fed-b".into(),
        };
        assert_eq!(
            e.to_string(),
            "TLS / kit: the site manifest is for federation fed-a, the kit for fed-b"
        );
        let e = ServeError::NoAuditKey {
            kit: PathBuf::from("/kits/coordinator"),
        };
        assert_eq!(
            e.to_string(),
            "TLS / kit: the coordinator kit /kits/coordinator has no ed25519 audit key \
             (update_key in kit.toml; kits issued by older versions lack it): renew it with \
             `fedlink certs renew coordinator --role coordinator --ca <ca dir> --out <kit dir>`, \
             which adds the key"
        );
        assert_eq!(
            ServeError::NoJob.to_string(),
            "job: no job to run: --exit-after-job needs a job (`job = ...` in the config, or an \
             unfinished job in the store); without it the coordinator starts empty and waits for \
             `fedlink jobs submit`"
        );
        assert_eq!(
            ServeError::ManifestLock.to_string(),
            "fatal: manifest lock poisoned"
        );
        let e = ServeError::from(engine::EngineError::Checkpoint(
            crate::store::StoreError::Inconsistent {
                job: "j1".into(),
                reason: "no such round".into(),
            },
        ));
        assert!(
            e.to_string()
                .starts_with("fatal: persisting a checkpoint: "),
            "{e}"
        );
        assert!(e.source().and_then(|s| s.source()).is_some(), "{e:?}");
        let e = ServeError::from(AuditError::Lock);
        assert_eq!(
            e.to_string(),
            "audit: audit log: the writer lock is poisoned"
        );
        assert!(e.source().is_some());
    }
}
