//! Start-up around `serve`: loading the kit, the registry and the audit
//! log, building `Shared` (`start_up`), the data directory's checks, the
//! listeners, the reloader and the acceptor (`listen`), which job runs
//! first (`select_job`), building a job's engine (`build_engine`,
//! `start_job`: recovery, the initial model, the served wire files) and
//! the spool's clean-up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fedlink_audit::{CoordEvent, coord};
use fedlink_certs::{Kit, RevocationList, SiteManifest};
use fedlink_protocol::FederationId;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinHandle;

use super::served_wire::{ServedModels, ServedWire};
use crate::config::{CoordinatorConfig, TcpListen};
use crate::core::JobNeeds;
use crate::core::admin::update_keys;
use crate::core::jobs::{self, ConfigJob, StartUp};
use crate::core::recovery::{self, Create, Recovered, Reopened, Resumed, Stored};
use crate::core::refusals::Refusals;
use crate::core::registry::RegistryWatch;
use crate::job::Job;
use crate::round::{JobOutcome, JobRunner, RoundConfig};
use crate::store::Store;
use crate::store::wire;

use super::accept;
use super::admin_state;
use super::audit::Auditor;
use super::disk;
use super::effects;
use super::engine::{Engine, EngineParts};
use super::error::ServeError;
use super::event::Event;
use super::init_model::initial_model;
use super::limits;
use super::links;
use super::shared::{Shared, mtime};
use super::status::{self, STATUS_FILE};

/// How many times [`bind_listeners`] picks a new port when the listen
/// port is 0 and TCP must share QUIC's port number.
const SHARED_PORT_ATTEMPTS: usize = 16;

/// How often the coordinator looks for a changed manifest or revocation
/// list even when no site connects.
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// What [`start_up`] ends with.
pub(super) enum Started {
    /// The configured job has already finished and the coordinator was to
    /// stop after it (`exit_after_job`): its outcome, nothing served.
    Exit(JobOutcome),
    /// Ready to listen.
    Ready(Box<Boot>),
}

/// What `serve` runs with: the state the tasks share, the store, the
/// engine's inbox, the first job's engine (`None`: an empty start) and the
/// TLS config the listeners take.
pub(super) struct Boot {
    pub(super) shared: Arc<Shared>,
    pub(super) store: Arc<Store>,
    pub(super) rx: mpsc::Receiver<Event>,
    pub(super) engine: Option<Engine>,
    pub(super) tls: rustls::ServerConfig,
}

/// The kit, the federation, the revocation list and the site manifest
/// (which must name the kit's federation), the audit log (its
/// `coordinator.started` entry), the store, the job to run first
/// ([`select_job`]), [`Shared`] and that job's engine.
pub(super) fn start_up(
    cfg: &CoordinatorConfig,
    exit_after_job: bool,
) -> Result<Started, ServeError> {
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
    let job_id = match select_job(&store, cfg.job.as_deref(), &auditor, exit_after_job)? {
        StartUp::Create(id) | StartUp::Run(id) => Some(id),
        StartUp::Empty => None,
        StartUp::Exit(outcome) => return Ok(Started::Exit(outcome)),
        StartUp::NoJob => return Err(ServeError::NoJob),
    };

    let (tx, rx) = mpsc::channel(limits::ENGINE_QUEUE);
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
    let engine = match &job_id {
        Some(id) => Some(build_engine(&store, id, &shared, cfg)?),
        None => None,
    };
    Ok(Started::Ready(Box::new(Boot {
        shared,
        store,
        rx,
        engine,
        tls,
    })))
}

/// What runs beside the job loop until shutdown: the QUIC endpoint, the
/// acceptor task (and the notify that stops its TCP listener) and the
/// registry reloader.
pub(super) struct Listening {
    pub(super) endpoint: quinn::Endpoint,
    pub(super) acceptor: JoinHandle<()>,
    pub(super) stop_tcp: Arc<Notify>,
    pub(super) reloader: JoinHandle<()>,
}

/// Bind the listeners ([`bind_listeners`]), report the bound address on
/// `bound`, start the reloader (a changed manifest or revocation list is
/// read every [`RELOAD_INTERVAL`]; counted refusals are recorded) and the
/// acceptor.
pub(super) async fn listen(
    cfg: &CoordinatorConfig,
    tls: rustls::ServerConfig,
    shared: &Arc<Shared>,
    engine: Option<&Engine>,
    bound: Option<&mpsc::UnboundedSender<SocketAddr>>,
) -> Result<Listening, ServeError> {
    let (endpoint, local, tcp) = bind_listeners(cfg, tls).await?;
    let tcp_local = tcp.as_ref().and_then(|t| t.local_addr().ok());
    tracing::info!(listen = %local, tcp = ?tcp_local, job = engine.map_or("none", |e| e.job_id()), "coordinator listening");
    if let Some(b) = bound {
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

    let (acceptor, stop_tcp) = accept::spawn_acceptor(cfg, &endpoint, tcp, shared);
    Ok(Listening {
        endpoint,
        acceptor,
        stop_tcp,
        reloader,
    })
}

/// Create the data directory (mode 0700) or make an existing one owner-only:
/// it holds raw site updates. Every directory and file below it that group or
/// others could access is tightened, with a warning naming it and the mode
/// found; a mode that cannot be changed stops the start.
pub(super) fn private_data_dir(dir: &Path) -> Result<(), ServeError> {
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

/// Bind the QUIC endpoint and, unless `tcp_listen = "off"`, the TCP
/// listener. With `tcp_listen = "same"` TCP takes the port number QUIC got;
/// when the listen port is 0 (any), that number can already be in use on
/// TCP by an unrelated socket (UDP and TCP ports are separate), so another
/// port is tried. A configured port is bound once: its failure is the
/// operator's to see.
pub(super) async fn bind_listeners(
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

/// Build the engine of job `id` and give it the connected sites `held`
/// (the idle holder's after an empty start, the finished job's at a job
/// switch: the same way, [`Engine::adopt`]). The sites move only once the
/// engine is built: a job that cannot start leaves them where they were.
pub(super) fn start_job(
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
pub(super) fn build_engine(
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
    let (served, _) = shared.publish_wire(ServedWire::made(first_wire));
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
pub(super) fn append_own(
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

/// Remove partial uploads left by a crash (their rounds are re-opened and
/// the sites upload again).
pub(super) fn clean_spool(dir: &Path) {
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
pub(super) fn select_job(
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
        tracing::info!(job = %id, outcome = ?outcome, "the configured job has already finished; it is not run again");
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
