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

mod accept;
mod admin_api;
mod admin_state;
pub(crate) mod audit;
mod boot;
mod clock;
mod disk;
mod effects;
mod engine;
mod error;
mod event;
mod idle;
mod init_model;
mod limits;
mod links;
pub(crate) mod pool;
mod shared;
mod site_session;
pub(crate) mod spool;
pub mod status;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fedlink_audit::{CoordEvent, coord};
use fedlink_certs::{Kit, RevocationList, SiteManifest};
use fedlink_protocol::FederationId;
use tokio::sync::{Semaphore, mpsc};

use crate::config::CoordinatorConfig;
use crate::core::JobNeeds;
use crate::core::admin::update_keys;
use crate::core::jobs::StartUp;
use crate::core::refusals::Refusals;
use crate::core::registry::RegistryWatch;
use crate::round::JobOutcome;
use crate::store::Store;
use crate::store::wire;
pub(crate) use audit::Auditor;
use boot::{
    bind_listeners, build_engine, clean_spool, private_data_dir, select_job, start_job,
    wait_bounded,
};
use shared::{Shared, mtime};
use wire::ServedModels;

pub use crate::core::admin::KeysError;
pub use crate::core::jobs::strategy_config;
pub use audit::AuditError;
pub use error::ServeError;
pub use init_model::{InitModelError, initial_model};
pub(crate) use limits::PeerLimits;
pub use status::{STATUS_FILE, Status};

/// How long shutdown waits for connection tasks to record their ends.
const CONNECTIONS_GRACE: Duration = Duration::from_secs(10);

/// How often the coordinator looks for a changed manifest or revocation
/// list even when no site connects.
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

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

    let (acceptor, stop_tcp) = accept::spawn_acceptor(&cfg, &endpoint, tcp, &shared);

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
