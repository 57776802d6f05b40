//! Start-up and shutdown around `serve`: the data directory's checks, the
//! listeners, which job runs first (`select_job`), building a job's engine
//! (`build_engine`, `start_job`: recovery, the initial model, the served
//! wire files), the spool's clean-up and the bounded waits of shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{CoordinatorConfig, TcpListen};
use crate::core::JobNeeds;
use crate::core::admin::update_keys;
use crate::core::jobs::{self, ConfigJob, StartUp};
use crate::core::recovery::{self, Create, Recovered, Reopened, Resumed, Stored};
use crate::job::Job;
use crate::round::{JobRunner, RoundConfig};
use crate::store::Store;
use crate::store::wire::{self};

use super::audit::Auditor;
use super::effects;
use super::engine::{Engine, EngineParts};
use super::error::ServeError;
use super::init_model::initial_model;
use super::links;
use super::shared::Shared;
use super::status::{self, STATUS_FILE};

/// How many times [`bind_listeners`] picks a new port when the listen
/// port is 0 and TCP must share QUIC's port number.
const SHARED_PORT_ATTEMPTS: usize = 16;

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

/// Shutdown's bounded wait: `wait` for at most `grace`; past it, warn
/// "`still` `grace` s after `after`" and return `false` (the caller decides
/// whether to abort what it waited for).
pub(super) async fn wait_bounded(
    wait: impl Future,
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
        tracing::info!(job = %id, outcome = %crate::round::Plain(outcome), "the configured job has already finished; it is not run again");
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
