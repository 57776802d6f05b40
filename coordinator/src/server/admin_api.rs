//! The admin API (ALPN `fedlink-admin/1`, admin certificates only): one
//! [`AdminRequest`] per bidirectional stream, answered with one
//! [`AdminResponse`] (see [`fedlink_protocol::admin`] for the wire form).
//!
//! Every command is recorded in the audit log as `admin.command` (actor: the
//! admin's identity) before it executes; a command whose audit entry cannot
//! be written is not executed. Registry changes (`sites approve | revoke |
//! rotate`) are decided by [`crate::core::admin::site_command`] on the
//! files as loaded; this driver verifies the presented certificate, loads
//! and saves `sites.toml` / `revoked.toml` (atomically) and reloads them at
//! once, which re-checks and cuts off open connections that are no longer
//! allowed. Job commands that concern the running job go through the engine
//! ([`super::engine::admin`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedlink_audit::{CoordEvent, coord};
use fedlink_certs::rustls::server::danger::ClientCertVerifier;
use fedlink_certs::rustls_pki_types::pem::PemObject;
use fedlink_certs::rustls_pki_types::{CertificateDer, UnixTime};
use fedlink_certs::{
    CertInfo, FederationClientVerifier, Identity, RevokedFile, SiteEntry, SiteManifest,
};
use fedlink_protocol::admin::{
    AdminErrorCode, AdminRequest, AdminResponse, EXPORT_CHUNK_BYTES, ExportFormat, ExportHeader,
    ModelInfo, ProvenanceStep, ProvenanceUpdate, SiteInfo, StatusReport, pytorch_tensors,
};
use fedlink_protocol::{
    JobId, ModelHash, ModelHasher, ModelSpec, PayloadHash, RoundId, SignedEnvelope, SiteId,
};
use fedlink_transport::{FramedRecv, FramedSend, ServerConn, TransportError, close};
use tokio::sync::oneshot;

use super::admin_state::{
    Fail, OpenAdmin, Registered, append_queue, internal, invalid, job_id, not_found, refused,
};
use super::effects;
use super::event::{AdminEvent, Event, JobCommand};
use super::init_model::{initial_model, read_initial_model, resolve_submitted_init};
use super::shared::Shared;
use crate::core::Effect;
use crate::core::admin::{self, Registry, SiteCert, SiteCommand};
use crate::core::jobs::strategy_config;
use crate::core::provenance;
use crate::core::recovery::{self, Create};
use crate::job::{InitSource, Job};
use crate::round::AdminCommand;
use crate::store::{JobRecord, Store};

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the engine may take to answer (it may be aggregating).
const ENGINE_TIMEOUT: Duration = Duration::from_secs(60);

fn now_rfc3339() -> String {
    let t = fedlink_certs::time::OffsetDateTime::now_utc();
    t.format(&fedlink_certs::time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

impl Shared {
    /// Re-read the manifest and the revocation list now (after an admin
    /// changed them), even if their modification times look unchanged.
    fn reload_now(&self) {
        self.registry_watch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .forget();
        self.reload_if_changed();
    }

    /// Cut every open admin connection whose certificate is now revoked
    /// (called when the revocation list changed).
    pub(super) fn recheck_admins(&self) {
        let Ok(conns) = self.admin.conns.lock() else {
            return;
        };
        for c in conns.values() {
            self.cut_if_revoked(c);
        }
    }

    /// Close `c` if its certificate is revoked; whether it was.
    fn cut_if_revoked(&self, c: &OpenAdmin) -> bool {
        let Some(why) = c
            .conn
            .peer_end_entity()
            .and_then(|ee| self.revocations.is_revoked(&ee))
        else {
            return false;
        };
        let reason = format!("the admin certificate has been revoked ({why:?})");
        tracing::warn!(reason = %reason, "closing an admin connection");
        c.conn.close(close::FORBIDDEN, reason.as_bytes());
        true
    }

    async fn ask_engine<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> AdminEvent,
    ) -> Result<T, Fail> {
        let (tx, rx) = oneshot::channel();
        self.engine
            .send(Event::Admin(make(tx)))
            .await
            .map_err(|_| internal("the engine has stopped"))?;
        tokio::time::timeout(ENGINE_TIMEOUT, rx)
            .await
            .map_err(|_| internal("the engine did not answer in time (busy aggregating?)"))?
            .map_err(|_| internal("the engine has stopped"))
    }
}

/// Serve one admin connection until it closes: each bidirectional stream
/// carries one command. Returns why it ended; the caller (`accept`) records
/// `conn.accepted` before and `conn.closed` after, as for sites.
pub(crate) async fn serve_admin(
    conn: &ServerConn,
    identity: &Identity,
    remote: SocketAddr,
    shared: &Arc<Shared>,
) -> String {
    let actor = identity.to_uri();
    tracing::info!(%remote, admin = %actor, "admin connected");
    serve_admin_streams(conn, &actor, remote, shared).await
}

/// Accept the streams of an admin connection until it ends; why it ended.
async fn serve_admin_streams(
    conn: &ServerConn,
    actor: &str,
    remote: SocketAddr,
    shared: &Arc<Shared>,
) -> String {
    let id = conn.stable_id();
    if let Ok(mut m) = shared.admin.conns.lock() {
        m.insert(id, OpenAdmin { conn: conn.clone() });
    }
    let _registered = Registered {
        state: &shared.admin,
        id,
    };
    // Registered, then checked: a revocation reloaded before the
    // registration is caught here, one reloaded after it by
    // `recheck_admins`.
    shared.cut_if_revoked(&OpenAdmin { conn: conn.clone() });
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%remote, admin = %actor, error = %e, "admin connection ended");
                return conn.end_reason(e);
            }
        };
        let shared = shared.clone();
        let actor = actor.to_owned();
        let conn = conn.clone();
        shared.tasks.clone().spawn(async move {
            if let Err(e) = handle_stream(&conn, &actor, remote, &shared, send, recv).await {
                tracing::warn!(admin = %actor, error = %e, "admin stream failed");
            }
        });
    }
}

async fn send_response(send: &mut FramedSend, resp: &AdminResponse) -> Result<(), TransportError> {
    let bytes = match resp.to_json() {
        Ok(b) => b,
        Err(e) => AdminResponse::error(AdminErrorCode::Internal, e.to_string())
            .to_json()
            .map_err(|e| TransportError::Stream(e.to_string()))?,
    };
    send.chunk(bytes).await
}

async fn handle_stream(
    conn: &ServerConn,
    actor: &str,
    remote: SocketAddr,
    shared: &Arc<Shared>,
    mut send: FramedSend,
    mut recv: FramedRecv,
) -> Result<(), TransportError> {
    let body = tokio::time::timeout(REQUEST_TIMEOUT, recv.chunk())
        .await
        .map_err(|_| TransportError::UnexpectedEnd("admin request within 30 s"))??;
    let req = match AdminRequest::from_json(&body) {
        Ok(r) => r,
        Err(e) => {
            send_response(
                &mut send,
                &AdminResponse::error(AdminErrorCode::Invalid, e.to_string()),
            )
            .await?;
            return send.finish();
        }
    };
    // A certificate revoked while the connection is open stops here.
    if let Some(ee) = conn.peer_end_entity()
        && shared.revocations.is_revoked(&ee).is_some()
    {
        let reason = "the admin certificate has been revoked";
        let _ = shared.audit().record(
            actor,
            &CoordEvent::AdminRefused(coord::AdminRefused {
                peer_addr: remote.to_string(),
                identity: actor.to_owned(),
                reason: reason.to_owned(),
            }),
        );
        send_response(
            &mut send,
            &AdminResponse::error(AdminErrorCode::Refused, reason),
        )
        .await?;
        send.finish()?;
        conn.close(close::FORBIDDEN, reason.as_bytes());
        return Ok(());
    }
    tracing::info!(admin = %actor, command = req.command(), "admin command");
    if let Err(e) = shared.audit().record(
        actor,
        &CoordEvent::AdminCommand(coord::AdminCommand {
            command: req.command().to_owned(),
            args: req.args(),
        }),
    ) {
        tracing::error!(error = %e, "audit log unavailable; admin command not executed");
        send_response(
            &mut send,
            &AdminResponse::error(
                AdminErrorCode::Internal,
                format!("the audit log is unavailable ({e}); nothing was done"),
            ),
        )
        .await?;
        return send.finish();
    }
    if let AdminRequest::ModelsExport { hash, format } = &req {
        return export(shared, actor, hash, *format, send).await;
    }
    let resp = execute(shared, actor, req)
        .await
        .unwrap_or_else(|(code, message)| AdminResponse::Error { code, message });
    send_response(&mut send, &resp).await?;
    send.finish()
}

async fn execute(
    shared: &Arc<Shared>,
    actor: &str,
    req: AdminRequest,
) -> Result<AdminResponse, Fail> {
    let admin = &shared.admin;
    match req {
        AdminRequest::Status => {
            let current = if admin.current_job().is_some() {
                Some(shared.ask_engine(AdminEvent::Progress).await?)
            } else {
                None
            };
            let connected_sites = shared.ask_engine(AdminEvent::ConnectedSites).await?;
            let links = link_infos(shared, &connected_sites);
            Ok(AdminResponse::Status(StatusReport {
                federation: shared.federation.clone(),
                coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
                uptime_secs: admin.started.elapsed().as_secs(),
                current_job: current,
                queued_jobs: admin.queued_jobs()?,
                connected_sites,
                links,
            }))
        }
        AdminRequest::SitesList => {
            let connected = shared.ask_engine(AdminEvent::ConnectedSites).await?;
            let manifest = shared
                .manifest
                .read()
                .map_err(|_| internal("manifest lock poisoned"))?
                .clone();
            let sites = manifest
                .site
                .iter()
                .map(|e| site_info(&admin.store, e, &connected, shared))
                .collect::<Result<_, _>>()?;
            Ok(AdminResponse::Sites(sites))
        }
        AdminRequest::SitesShow { name } => {
            let connected = shared.ask_engine(AdminEvent::ConnectedSites).await?;
            let entry = shared
                .manifest
                .read()
                .map_err(|_| internal("manifest lock poisoned"))?
                .get(&name)
                .cloned()
                .ok_or_else(|| not_found(format!("no registered site {name}")))?;
            Ok(AdminResponse::Site(site_info(
                &admin.store,
                &entry,
                &connected,
                shared,
            )?))
        }
        AdminRequest::SitesApprove {
            cert_pem,
            update_key,
            max_examples,
        } => {
            change_sites(shared, actor, |shared| {
                Ok(SiteCommand::Approve {
                    cert: verify_site_cert(shared, &cert_pem)?,
                    update_key,
                    max_examples,
                })
            })
            .await
        }
        AdminRequest::SitesRevoke { name, reason } => {
            change_sites(shared, actor, |_| Ok(SiteCommand::Revoke { name, reason })).await
        }
        AdminRequest::SitesRotate {
            name,
            cert_pem,
            update_key,
        } => {
            change_sites(shared, actor, |shared| {
                Ok(SiteCommand::Rotate {
                    name,
                    cert: verify_site_cert(shared, &cert_pem)?,
                    update_key,
                })
            })
            .await
        }
        AdminRequest::JobsSubmit { job_toml } => submit(shared, actor, &job_toml).await,
        AdminRequest::JobsList => {
            let jobs = admin.store.jobs().map_err(internal)?;
            Ok(AdminResponse::Jobs(
                jobs.iter()
                    .map(|r| admin.job_info(r, false))
                    .collect::<Result<_, _>>()?,
            ))
        }
        AdminRequest::JobsShow { id } => {
            let rec = find_job(&admin.store, &id)?;
            Ok(AdminResponse::Job(admin.job_info(&rec, true)?))
        }
        AdminRequest::JobsPause { id } => {
            job_command(shared, actor, &id, AdminCommand::Pause).await
        }
        AdminRequest::JobsResume { id } => {
            job_command(shared, actor, &id, AdminCommand::Resume).await
        }
        AdminRequest::JobsAbort { id } => {
            job_command(shared, actor, &id, AdminCommand::Abort).await
        }
        AdminRequest::RoundsList { job } => {
            let found = find_job(&admin.store, &job)?;
            let rounds = admin.store.rounds(&job).map_err(internal)?;
            let rounds = rounds
                .iter()
                .map(record_json)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(AdminResponse::Rounds {
                job: job_id(&found.id)?,
                rounds,
            })
        }
        AdminRequest::RoundsShow { job, round } => {
            let found = find_job(&admin.store, &job)?;
            let rec = admin
                .store
                .round(&job, round)
                .map_err(internal)?
                .ok_or_else(|| not_found(format!("job {job} has no round {round}")))?;
            Ok(AdminResponse::Round {
                job: job_id(&found.id)?,
                round: record_json(&rec)?,
            })
        }
        AdminRequest::ModelsList => Ok(AdminResponse::Models(models_list(&admin.store)?)),
        AdminRequest::ModelsShow { hash, provenance } => {
            let (hash, info) = model_info(&admin.store, &hash)?;
            let chain = if provenance {
                Some(tokio::task::block_in_place(|| {
                    provenance_chain(&admin.store, &hash, &info)
                })?)
            } else {
                None
            };
            Ok(AdminResponse::Model {
                model: info,
                provenance: chain,
            })
        }
        AdminRequest::ModelsExport { .. } => Err(internal("export is streamed")),
        _ => Err(invalid("unknown command")),
    }
}

/// A stored record as JSON for admins: hashes and signatures (32- and
/// 64-byte arrays in the store's serde form) as lowercase hex, as the
/// protocol types print them.
fn record_json<T: serde::Serialize>(rec: &T) -> Result<serde_json::Value, Fail> {
    fn hexify(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Array(items) => {
                let bytes: Option<Vec<u8>> = items
                    .iter()
                    .map(|x| x.as_u64().and_then(|n| u8::try_from(n).ok()))
                    .collect();
                match bytes {
                    Some(b) if b.len() == 32 || b.len() == 64 => {
                        *v = serde_json::Value::String(hex::encode(b));
                    }
                    _ => items.iter_mut().for_each(hexify),
                }
            }
            serde_json::Value::Object(map) => map.values_mut().for_each(hexify),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(rec).map_err(internal)?;
    hexify(&mut v);
    Ok(v)
}

fn find_job(store: &Store, id: &str) -> Result<JobRecord, Fail> {
    store
        .job(id)
        .map_err(internal)?
        .ok_or_else(|| not_found(format!("no job {id}")))
}

/// A site name from the registry or a connection as a typed id (site
/// names are identity names, validated when the site was approved, and
/// a subset of the ids `SiteId` allows).
fn site_id(name: &str) -> Result<SiteId, Fail> {
    SiteId::new(name).map_err(|e| internal(format!("site name: {e}")))
}

/// The links of the connected sites, in `connected`'s order.
fn link_infos(shared: &Shared, connected: &[SiteId]) -> Vec<fedlink_protocol::admin::LinkInfo> {
    let Ok(links) = shared.site_links.lock() else {
        return Vec::new();
    };
    connected
        .iter()
        .filter_map(|s| links.get(s).map(|l| l.info(s.clone())))
        .collect()
}

fn site_info(
    store: &Store,
    e: &SiteEntry,
    connected: &[SiteId],
    shared: &Shared,
) -> Result<SiteInfo, Fail> {
    let name = site_id(&e.name)?;
    let rec = store.site(&e.name).ok().flatten();
    let is_connected = connected.contains(&name);
    let link = if is_connected {
        shared
            .site_links
            .lock()
            .ok()
            .and_then(|l| l.get(&name).map(|l| l.info(name.clone())))
    } else {
        None
    };
    Ok(SiteInfo {
        name,
        identity: e.identity.to_uri(),
        cert_serial: e.cert_serial.to_string(),
        cert_fingerprint: e.cert_fingerprint.to_string(),
        update_public_key: e.update_public_key.clone(),
        added_at: e.added_at.clone(),
        renewed_at: e.renewed_at.clone(),
        max_examples: e.max_examples,
        connected: is_connected,
        last_seen_unix_ms: rec.as_ref().map(|r| r.last_seen_unix_ms),
        updates_aggregated: rec.as_ref().map(|r| r.updates_aggregated),
        link,
    })
}

/// Parse and verify a site certificate presented for approval or
/// rotation: it chains to the federation CA, is valid now and is not on
/// the TLS verifier's revocation list (the driver's part: it reads the
/// clock). The rest — a site's, not revoked in `revoked.toml`, fits the
/// registry — is [`admin::site_command`]'s.
fn verify_site_cert(shared: &Shared, cert_pem: &str) -> Result<SiteCert, Fail> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| invalid(format!("certificate: not a PEM certificate: {e}")))?;
    let verifier = FederationClientVerifier::new(
        &shared.admin.ca_cert,
        shared.federation.as_str(),
        shared.revocations.clone(),
    )
    .map_err(internal)?;
    verifier
        .verify_client_cert(&der, &[], UnixTime::now())
        .map_err(|e| invalid(format!("certificate refused: {e}")))?;
    let info = CertInfo::from_der(&der).map_err(invalid)?;
    Ok(SiteCert { info })
}

/// `sites approve | revoke | rotate`: under the registry lock, the
/// command made (`command`: approve and rotate verify their certificate
/// there), the registry loaded, the decision taken by
/// [`admin::site_command`], its effects executed in order by the one
/// executor (the audit entry first; the first that fails stops the rest),
/// the site's entry answered.
async fn change_sites(
    shared: &Arc<Shared>,
    actor: &str,
    command: impl FnOnce(&Shared) -> Result<SiteCommand, Fail>,
) -> Result<AdminResponse, Fail> {
    let _guard = shared.admin.registry.lock().await;
    let command = command(shared.as_ref())?;
    let revoking = matches!(command, SiteCommand::Revoke { .. });
    let registry = Registry {
        manifest: SiteManifest::load(&shared.manifest_path).map_err(internal)?,
        revoked: RevokedFile::load(&shared.admin.revoked_path).map_err(internal)?,
    };
    let change = admin::site_command(command, actor, registry, &now_rfc3339())
        .map_err(|r| (r.code, r.message))?;
    effects::execute(
        shared.audit(),
        &shared.admin.store,
        change.effects,
        |e| internal(e.cause()),
        |effect| match effect {
            Effect::SaveManifest(m) => m.save(&shared.manifest_path).map_err(internal),
            Effect::SaveRevocations(r) => r.save(&shared.admin.revoked_path).map_err(internal),
            Effect::ReloadRegistry => {
                shared.reload_now();
                Ok(())
            }
            other => Err(internal(format!("not a site command's effect: {other:?}"))),
        },
    )?;
    let mut info = site_info(&shared.admin.store, &change.entry, &[], shared)?;
    if revoking {
        info.connected = false;
    }
    Ok(AdminResponse::Site(info))
}

async fn submit(shared: &Arc<Shared>, actor: &str, job_toml: &str) -> Result<AdminResponse, Fail> {
    let store = &shared.admin.store;
    let refusal = |r: admin::AdminRefusal| (r.code, r.message);
    // Decided as at startup: the job file, its strategy, (once the driver
    // has it) its initial model and that the strategy fits it.
    let submitted = admin::submission(job_toml).map_err(refusal)?;
    let job = &submitted.job;
    // An initial-model file is read only from init_dir (refused otherwise,
    // before anything is opened), and only if its size fits the
    // architecture.
    let model = tokio::task::block_in_place(|| match &job.init {
        InitSource::File(file) => {
            let path = resolve_submitted_init(shared.admin.init_dir.as_deref(), file)
                .map_err(|e| refused(e.to_string()))?;
            read_initial_model(job, &path).map_err(invalid)
        }
        _ => initial_model(job).map_err(invalid),
    })?;
    let exists = store.job(&job.id).map_err(internal)?.is_some();
    let entry =
        admin::job_submitted(actor, &submitted, job_toml, model.spec(), exists).map_err(refusal)?;
    // Created in the configured job's order (its entry first, then its
    // model, then the job), then queued.
    let rec = tokio::task::block_in_place(|| -> Result<JobRecord, Fail> {
        let mut hash = model.hash();
        let mut rec = None;
        for step in recovery::submitted_job_created(entry) {
            match step {
                Create::Audit(entry) => effects::execute(
                    shared.audit(),
                    store,
                    [*entry],
                    |e| internal(e.cause()),
                    |other| Err(internal(format!("not a submission's effect: {other:?}"))),
                )?,
                Create::PutModel => hash = store.put_model(&model).map_err(internal)?,
                Create::CreateJob => {
                    rec = Some(store.create_job(job, hash).map_err(|e| match e {
                        crate::store::StoreError::JobExists(id) => {
                            refused(format!("a job with id {id} exists already"))
                        }
                        other => internal(other),
                    })?);
                }
                Create::Enqueue => {
                    append_queue(&shared.admin.queue_path, &job.id).map_err(internal)?
                }
            }
        }
        rec.ok_or_else(|| internal("the job was not created"))
    })?;
    tracing::info!(job = %job.id, "job submitted");
    let _ = shared.engine.send(Event::Admin(AdminEvent::Wake)).await;
    Ok(AdminResponse::Job(shared.admin.job_info(&rec, false)?))
}

async fn job_command(
    shared: &Arc<Shared>,
    actor: &str,
    id: &str,
    cmd: AdminCommand,
) -> Result<AdminResponse, Fail> {
    find_job(&shared.admin.store, id)?;
    shared
        .ask_engine(|reply| {
            AdminEvent::Job(JobCommand {
                id: id.to_owned(),
                cmd,
                actor: actor.to_owned(),
                reply,
            })
        })
        .await??;
    let rec = find_job(&shared.admin.store, id)?;
    Ok(AdminResponse::Job(shared.admin.job_info(&rec, false)?))
}

fn model_file_len(store: &Store, hash: &ModelHash) -> Option<u64> {
    std::fs::metadata(store.model_path(hash))
        .ok()
        .map(|m| m.len())
}

fn models_list(store: &Store) -> Result<Vec<ModelInfo>, Fail> {
    let mut out: Vec<ModelInfo> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for job in store.jobs().map_err(internal)? {
        let id = job_id(&job.id)?;
        let mut push = |hash: ModelHash, round: RoundId| {
            if seen.insert(hash) {
                out.push(ModelInfo {
                    hash,
                    job: id.clone(),
                    round,
                    bytes: model_file_len(store, &hash),
                });
            }
        };
        push(job.initial_model, RoundId(0));
        for r in store.rounds(&job.id).map_err(internal)? {
            if let Some(m) = r.model {
                push(m, RoundId(r.round));
            }
        }
    }
    Ok(out)
}

fn model_info(store: &Store, hash: &str) -> Result<(ModelHash, ModelInfo), Fail> {
    let h = ModelHash::from_hex(hash.trim())
        .ok_or_else(|| invalid(format!("{hash:?} is not a model hash (64 hex digits)")))?;
    let rec = store
        .model_record(&h)
        .map_err(internal)?
        .ok_or_else(|| not_found(format!("no model {h}")))?;
    Ok((
        h,
        ModelInfo {
            hash: h,
            job: job_id(&rec.job)?,
            round: RoundId(rec.round),
            bytes: model_file_len(store, &h),
        },
    ))
}

/// The envelope signature of an archived update (hex), if archived.
fn envelope_sig(
    store: &Store,
    job: &JobId,
    round: RoundId,
    site: &SiteId,
    payload_hash: &PayloadHash,
) -> Option<String> {
    let dir = store
        .dir()
        .join("updates")
        .join(job.as_str())
        .join(format!("round-{:06}", round.0));
    let prefix = format!("{site}-{}-", payload_hash.to_hex());
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".envelope.json"))
        })
        .collect();
    names.sort();
    let bytes = std::fs::read(names.first()?).ok()?;
    let env: SignedEnvelope = serde_json::from_slice(&bytes).ok()?;
    Some(hex::encode(env.signature.to_bytes()))
}

/// The provenance of `hash`: the walk back to its job's initial model is
/// [`provenance::walk`]'s over the stored round records; each step is built
/// here with its updates' envelope signatures.
fn provenance_chain(
    store: &Store,
    hash: &ModelHash,
    info: &ModelInfo,
) -> Result<Vec<ProvenanceStep>, Fail> {
    let job = find_job(store, info.job.as_str())?;
    let strategy = Job::from_toml(&job.job_toml)
        .ok()
        .and_then(|j| strategy_config(&j).ok())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(serde_json::Value::Null);
    let chain = provenance::walk(
        info.job.as_str(),
        *hash,
        info.round,
        job.initial_model,
        |r| store.round(info.job.as_str(), r),
    )
    .map_err(internal)?;
    let steps = chain
        .into_iter()
        .map(
            |provenance::Link {
                 round: r,
                 output,
                 record: rec,
             }| {
                let updates = rec
                    .accepted
                    .iter()
                    .map(|u| {
                        let site = u.site.clone();
                        // The round record keeps the payload's blake3 in a
                        // `ModelHash`; it is the payload hash.
                        let payload_hash = PayloadHash(u.payload_hash.0);
                        ProvenanceUpdate {
                            envelope_sig: envelope_sig(store, &info.job, r, &site, &payload_hash),
                            site,
                            payload_hash,
                            num_examples: u.num_examples,
                        }
                    })
                    .collect();
                ProvenanceStep {
                    job: info.job.clone(),
                    round: r,
                    base_model: rec.base_model,
                    output_model: output,
                    strategy: strategy.clone(),
                    updates,
                }
            },
        )
        .collect();
    Ok(steps)
}

/// What the provenance walk reads of a stored round record.
impl provenance::RoundLink for crate::store::RoundRecord {
    fn output(&self) -> Option<ModelHash> {
        self.model
    }
    fn base(&self) -> ModelHash {
        self.base_model
    }
}

/// Stream error code of an export whose model file failed its hash check
/// (the stream is reset; the client never sees a clean end).
const EXPORT_CORRUPT: quinn::VarInt = quinn::VarInt::from_u32(0x500);

/// A stored model file (`models/<hash>.bin`, written by
/// [`Store::put_model`]) read piece by piece for an export, so that an
/// export holds one piece in memory whatever the model's size. The header
/// and spec are checked against the file's size when it is opened; the
/// values are hashed as they are read, and the content hash is checked
/// before the last piece is handed out.
struct ModelFileStream {
    file: std::fs::File,
    path: PathBuf,
    /// Value bytes not read yet.
    left: u64,
    hasher: ModelHasher,
    expected: ModelHash,
    /// Reused buffer: the values of a slice of a piece, for the hasher.
    values: Vec<f32>,
}

impl ModelFileStream {
    /// Open the file of model `expected` and read its spec.
    fn open(path: &Path, expected: ModelHash) -> Result<(ModelSpec, Self), ModelFileError> {
        let io = |source| ModelFileError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ModelFileError::Missing(expected));
            }
            Err(e) => return Err(io(e)),
        };
        let len = file.metadata().map_err(io)?.len();
        let (spec, values_len) =
            crate::store::read_model_header(&mut file, len).map_err(|source| {
                ModelFileError::Header {
                    path: path.to_owned(),
                    source,
                }
            })?;
        let stream = Self {
            file,
            path: path.to_owned(),
            left: values_len,
            hasher: ModelHasher::new(&spec),
            expected,
            values: Vec::with_capacity(HASH_SLICE / 4),
        };
        if stream.left == 0 {
            stream.check_hash()?;
        }
        Ok((spec, stream))
    }

    fn check_hash(&self) -> Result<(), ModelFileError> {
        let actual = self.hasher.finalize();
        if actual != self.expected {
            return Err(ModelFileError::Hash {
                path: self.path.clone(),
                actual,
                expected: self.expected,
            });
        }
        Ok(())
    }

    /// The next piece of at most `max` bytes (`max` a multiple of 4), or
    /// `None` after the last one. The call that reads the last piece checks
    /// the content hash and fails instead of returning it on a mismatch.
    fn next_piece(&mut self, max: usize) -> Result<Option<Vec<u8>>, ModelFileError> {
        use std::io::Read;
        if self.left == 0 {
            return Ok(None);
        }
        let take = usize::try_from(self.left).map_or(max, |l| l.min(max));
        let mut piece = vec![0u8; take];
        self.file
            .read_exact(&mut piece)
            .map_err(|source| ModelFileError::ShortValues {
                path: self.path.clone(),
                source,
            })?;
        for slice in piece.chunks(HASH_SLICE) {
            self.values.clear();
            self.values.extend(
                slice
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            self.hasher.update(&self.values);
        }
        self.left -= take as u64;
        if self.left == 0 {
            self.check_hash()?;
        }
        Ok(Some(piece))
    }
}

/// Why a model file cannot be exported ([`ModelFileStream`]).
#[derive(Debug, thiserror::Error)]
enum ModelFileError {
    /// The store knows the model but its file is gone.
    #[error("the file of model {0} is missing")]
    Missing(ModelHash),
    /// Opening or inspecting the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The header (magic, spec, length) is wrong.
    #[error("model file {} is corrupt: {source}", path.display())]
    Header {
        path: PathBuf,
        source: crate::store::ModelHeaderError,
    },
    /// The file ends (or reading fails) inside the values.
    #[error("model file {}: short values: {source}", path.display())]
    ShortValues {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The values do not hash to the model's content hash.
    #[error(
        "model file {} is corrupt: content hash is {actual}, expected {expected}",
        path.display()
    )]
    Hash {
        path: PathBuf,
        actual: ModelHash,
        expected: ModelHash,
    },
}

/// Bytes of a piece converted to values at a time for hashing.
const HASH_SLICE: usize = 64 * 1024;

async fn export(
    shared: &Arc<Shared>,
    actor: &str,
    hash: &str,
    format: ExportFormat,
    mut send: FramedSend,
) -> Result<(), TransportError> {
    let store = &shared.admin.store;
    let prepared = (|| -> Result<_, Fail> {
        let (h, info) = model_info(store, hash)?;
        let job = find_job(store, info.job.as_str())?;
        let arch = Job::from_toml(&job.job_toml)
            .ok()
            .and_then(|j| serde_json::to_value(&j.arch).ok())
            .unwrap_or(serde_json::Value::Null);
        let path = store.model_path(&h);
        let (spec, stream) =
            tokio::task::block_in_place(|| ModelFileStream::open(&path, h)).map_err(internal)?;
        let header = ExportHeader {
            model: h,
            job: info.job,
            round: info.round,
            arch,
            format,
            tensors: pytorch_tensors(&spec),
            total_bytes: spec.num_params().saturating_mul(4),
        };
        Ok((stream, header))
    })();
    let (mut stream, header) = match prepared {
        Ok(p) => p,
        Err((code, message)) => {
            send_response(&mut send, &AdminResponse::Error { code, message }).await?;
            return send.finish();
        }
    };
    let format_name = match format {
        ExportFormat::Safetensors => "safetensors",
        _ => "unknown",
    };
    if let Err(e) = shared.audit().record(
        actor,
        &CoordEvent::ModelExported(coord::ModelExported {
            model: header.model.to_hex(),
            format: format_name.to_owned(),
        }),
    ) {
        send_response(
            &mut send,
            &AdminResponse::error(AdminErrorCode::Internal, e.to_string()),
        )
        .await?;
        return send.finish();
    }
    send_response(&mut send, &AdminResponse::Export(header)).await?;
    loop {
        match tokio::task::block_in_place(|| stream.next_piece(EXPORT_CHUNK_BYTES)) {
            Ok(Some(piece)) => send.chunk(piece).await?,
            Ok(None) => break,
            Err(e) => {
                // The values already sent cannot be taken back: reset the
                // stream so the client never takes them for a whole model.
                tracing::error!(admin = %actor, error = %e, "export stopped");
                send.reset(EXPORT_CORRUPT);
                return Err(TransportError::Stream(e.to_string()));
            }
        }
    }
    send.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use fedlink_protocol::{FlatModel, TensorSpec};

    use super::*;
    use crate::server::admin_state::{AdminState, QUEUE_FILE};

    fn model(n: u64) -> FlatModel {
        let spec = ModelSpec::new(vec![
            TensorSpec::f32("a.weight", vec![n, 3]),
            TensorSpec::f32("a.bias", vec![3]),
        ])
        .unwrap();
        let values = (0..(n * 3 + 3)).map(|i| i as f32 * 0.5 - 7.0).collect();
        FlatModel::new(spec, values).unwrap()
    }

    fn drain(stream: &mut ModelFileStream, max: usize) -> Result<Vec<u8>, ModelFileError> {
        let mut out = Vec::new();
        while let Some(p) = stream.next_piece(max)? {
            assert!(p.len() <= max);
            out.extend_from_slice(&p);
        }
        Ok(out)
    }

    /// A queue file that cannot be read is not an empty queue: no job is
    /// started from it, and `status` / `jobs list` / `jobs show` of a job
    /// that could be queued answer an error naming the file.
    #[test]
    fn an_unreadable_queue_is_an_error_not_an_empty_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let admin = AdminState::new(
            store.clone(),
            CertificateDer::from(Vec::new()),
            dir.path().join("revoked.toml"),
            None,
        );
        let job = Job::from_toml(
            "id = \"j1\"\nrounds = 2\nseed = 1\n\
             arch = { kind = \"logreg\", inputs = 3, classes = 2 }\n\
             init = { seed = 1 }\n[round]\ndeadline_secs = 30\n[strategy]\nname = \"fedavg\"\n",
        )
        .unwrap();
        let hash = store.put_model(&model(1)).unwrap();
        let rec = store.create_job(&job, hash).unwrap();
        append_queue(&admin.queue_path, "j1").unwrap();
        assert_eq!(admin.next_queued().as_deref(), Some("j1"));
        assert_eq!(admin.queued_jobs().unwrap().len(), 1);
        assert_eq!(admin.job_info(&rec, false).unwrap().state, "queued");

        std::fs::write(&admin.queue_path, b"[\"j1\"").unwrap();
        assert_eq!(admin.next_queued(), None);
        let (code, text) = admin.queued_jobs().unwrap_err();
        assert_eq!(code, AdminErrorCode::Internal);
        assert!(text.starts_with("reading the job queue: "), "{text}");
        assert!(text.contains(QUEUE_FILE), "{text}");
        let (code, text) = admin.job_info(&rec, false).unwrap_err();
        assert_eq!(code, AdminErrorCode::Internal);
        assert!(text.contains(QUEUE_FILE), "{text}");
    }

    #[test]
    fn a_model_file_streams_in_bounded_pieces_with_its_hash_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let m = model(1000);
        let h = store.put_model(&m).unwrap();
        let (spec, mut stream) = ModelFileStream::open(&store.model_path(&h), h).unwrap();
        assert_eq!(&spec, m.spec());
        // Pieces smaller than a hash slice, and a size that does not divide
        // the model.
        let bytes = drain(&mut stream, 4 * 7).unwrap();
        let expected: Vec<u8> = m.values().iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(bytes, expected);
        let (_, mut stream) = ModelFileStream::open(&store.model_path(&h), h).unwrap();
        assert_eq!(drain(&mut stream, EXPORT_CHUNK_BYTES).unwrap(), expected);
    }

    #[test]
    fn a_corrupt_model_file_is_refused_before_its_last_piece() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let m = model(1000);
        let h = store.put_model(&m).unwrap();
        let path = store.model_path(&h);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let (_, mut stream) = ModelFileStream::open(&path, h).unwrap();
        let mut pieces = 0;
        let err = loop {
            match stream.next_piece(4 * 100) {
                Ok(Some(_)) => pieces += 1,
                Ok(None) => panic!("a corrupt model streamed to the end"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, ModelFileError::Hash { .. }), "{err:?}");
        assert!(err.to_string().contains("content hash"), "{err}");
        // Every piece but the last went out; the last was held back.
        assert_eq!(pieces, (m.values().len() * 4).div_ceil(400) - 1);

        // Truncated: refused when opened.
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = ModelFileStream::open(&path, h).err().unwrap();
        assert!(
            matches!(
                err,
                ModelFileError::Header {
                    source: crate::store::ModelHeaderError::Length { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("spec declares"), "{err}");
        // Another model's hash: refused at the end.
        let other = model(2).hash();
        let fresh = store.model_path(&store.put_model(&model(2)).unwrap());
        let (_, mut stream) = ModelFileStream::open(&fresh, h).unwrap();
        assert!(drain(&mut stream, EXPORT_CHUNK_BYTES).is_err());
        let (_, mut stream) = ModelFileStream::open(&fresh, other).unwrap();
        assert!(drain(&mut stream, EXPORT_CHUNK_BYTES).is_ok());
        // Missing.
        let err = ModelFileStream::open(&dir.path().join("nope.bin"), h)
            .err()
            .unwrap();
        assert!(
            matches!(err, ModelFileError::Missing(m) if m == h),
            "{err:?}"
        );
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
