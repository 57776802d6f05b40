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
mod served_wire;
mod shared;
mod shutdown;
mod site_session;
pub(crate) mod spool;
pub mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::CoordinatorConfig;
use crate::round::JobOutcome;
use crate::store::Store;
use boot::{Boot, Started, start_job};
use shared::Shared;

pub use crate::core::admin::KeysError;
pub use crate::core::jobs::strategy_config;
pub use audit::AuditError;
pub use error::ServeError;
pub use init_model::{InitModelError, initial_model};
pub(crate) use limits::PeerLimits;
pub use status::{STATUS_FILE, Status};

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
///
/// Start-up (`boot::start_up`: kit, registry, audit log, store, the first
/// job, `Shared`), the listeners and the acceptor (`boot::listen`), the
/// job loop (`run_jobs`), shutdown (`shutdown::shut_down`).
pub async fn serve(
    cfg: CoordinatorConfig,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<ServeOutcome, ServeError> {
    let Boot {
        shared,
        store,
        mut rx,
        mut engine,
        tls,
    } = match boot::start_up(&cfg, opts.exit_after_job)? {
        Started::Ready(boot) => *boot,
        Started::Exit(outcome) => {
            return Ok(ServeOutcome {
                outcome: Some(outcome),
            });
        }
    };
    let mut idle = idle::Idle::default();
    let listening = boot::listen(&cfg, tls, &shared, engine.as_ref(), opts.bound.as_ref()).await?;
    let jobs = Jobs {
        store: &store,
        shared: &shared,
        cfg: &cfg,
        exit_after_job: opts.exit_after_job,
    };
    let result = run_jobs(&jobs, &mut engine, &mut idle, &mut rx, shutdown).await;
    shutdown::shut_down(listening, &shared, &mut idle, engine.as_mut()).await;
    result.map(|()| ServeOutcome {
        outcome: engine.as_ref().and_then(|e| e.outcome().cloned()),
    })
}

/// What the job loop needs besides the engine, the idle holder and the
/// engine's inbox.
struct Jobs<'a> {
    store: &'a Arc<Store>,
    shared: &'a Arc<Shared>,
    cfg: &'a CoordinatorConfig,
    exit_after_job: bool,
}

/// One job at a time: when the running job has finished and a submitted
/// job waits, the next one starts (sites reconnect into it). Returns when
/// `shutdown` resolves, when a job ends with
/// [`ServeOptions::exit_after_job`], or on the first error.
async fn run_jobs(
    jobs: &Jobs<'_>,
    engine: &mut Option<engine::Engine>,
    idle: &mut idle::Idle,
    rx: &mut mpsc::Receiver<event::Event>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let Jobs {
        store,
        shared,
        cfg,
        exit_after_job,
    } = *jobs;
    tokio::pin!(shutdown);
    loop {
        let Some(running) = engine.as_mut() else {
            // No job yet: hold the sites until one is submitted, then hand
            // them over to its engine.
            match idle::run_idle(idle, rx, shared, shutdown.as_mut()).await {
                Some(first) => {
                    tracing::info!(job = %first, "starting the first submitted job");
                    *engine = Some(start_job(store, &first, shared, cfg, idle.links_mut())?);
                    continue;
                }
                None => return Ok(()),
            }
        };
        shared.admin.set_current_job(running.job_id());
        match engine::driver::run_engine(running, rx, exit_after_job, shared, shutdown.as_mut())
            .await?
        {
            Some(next) => {
                tracing::info!(job = %next, "starting the next queued job");
                // The connected sites go to the next job, as after an
                // empty start.
                *engine = Some(start_job(store, &next, shared, cfg, running.links_mut())?);
            }
            None => return Ok(()),
        }
    }
}
