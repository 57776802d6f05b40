//! [`Shared`]: the state the connection tasks, the admin API and the
//! engine (or idle holder) share: the engine's event queue, the site
//! manifest and revocations, served models, limits, the audit log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use fedlink_audit::{CoordEvent, coord};
use fedlink_certs::{RevocationList, SiteManifest};
use fedlink_protocol::{FederationId, ModelHash, SiteId};
use fedlink_transport::ServerConn;
use tokio::sync::{Semaphore, mpsc};

use super::admin_state::AdminState;
use super::audit::Auditor;
use super::event::Event;
use super::limits::PeerLimits;
use super::served_wire::{ServedModels, ServedWire};
use super::{disk, limits};
use crate::core::JobNeeds;
use crate::core::admin::update_keys;
use crate::core::disk::LowOnDisk;
use crate::core::refusals::Refusals;
use crate::core::registry::{self, NotAllowed, RegistryWatch, Watched};
use crate::store::wire::WireUpdate;

/// Uploads being received, by (site, nonce): each entry ends (its sender
/// is dropped) when its attempt does.
pub(crate) type UploadsInFlight = HashMap<(SiteId, [u8; 16]), tokio::sync::watch::Receiver<()>>;

/// State shared by the connection tasks.
pub(crate) struct Shared {
    /// Tasks spawned per connection beyond the connection's own (stream
    /// handlers, a site's stream acceptor, admin streams): shutdown waits
    /// for them, so that nothing holding the store outlives `serve` (a
    /// coordinator started again on the same data directory right after
    /// found the database still open).
    pub(crate) tasks: tokio_util::task::TaskTracker,
    /// Upload answers on their way: from the moment a received upload goes
    /// to the engine until the site has its `UploadResult` (or
    /// [`limits::ANSWER_GRACE`] passed). Shutdown waits for them before it closes
    /// the connections: closing a QUIC connection discards stream data the
    /// peer has not acknowledged, and the last round's acks were lost when
    /// a job ended (a site saw "coordinator shutting down" instead of its
    /// accepted update).
    pub(crate) answers: tokio_util::task::TaskTracker,
    /// The engine's (or idle holder's) event queue: bounded
    /// ([`limits::ENGINE_QUEUE`]); connection tasks wait for room, so a
    /// flood is held back by QUIC flow control instead of queued here.
    pub(super) engine: mpsc::Sender<Event>,
    pub(super) manifest: RwLock<SiteManifest>,
    pub(super) manifest_path: PathBuf,
    /// When the manifest and the revocation list are taken up again, and
    /// whether the open connections are to be re-checked.
    pub(super) registry_watch: Mutex<RegistryWatch<SystemTime>>,
    /// How each connected site is connected (operator view: transport,
    /// proxy, RTT), by site; the engine owns who is connected.
    pub(crate) site_links: Mutex<HashMap<SiteId, SiteLink>>,
    pub(super) revocations: Arc<RevocationList>,
    pub(super) federation: FederationId,
    pub(super) heartbeat: Duration,
    pub(super) uploads: Semaphore,
    pub(super) downloads: Semaphore,
    /// Uploads being received, by (site, nonce): a resume of one waits
    /// until its interrupted first attempt has ended and been kept.
    pub(crate) uploads_in_flight: Mutex<UploadsInFlight>,
    pub(super) next_conn: AtomicU64,
    /// The model versions served in wire form (the current one and the
    /// one before it: [`ServedModels`]).
    pub(super) wire: RwLock<ServedModels>,
    /// The latest round's global update (base → current global model),
    /// served to sites that hold the base; `None` when the job sends whole
    /// models or no round has completed since start.
    pub(super) downlink: RwLock<Option<Arc<WireUpdate>>>,
    /// What the running job asks of its sites (codec family, protocol
    /// version).
    pub(super) job_needs: RwLock<JobNeeds>,
    pub(super) audit: Arc<Auditor>,
    pub(super) admin: AdminState,
    /// Failed handshakes of the current interval (recorded in bulk).
    pub(super) refusals: Mutex<Refusals>,
    /// Keeps the disk from filling up past what the audit log needs.
    pub(super) disk: disk::DiskGuard,
    /// Open connections, per identity and in all.
    pub(super) connections: Arc<limits::Connections>,
    /// Timeouts and budgets of every connection.
    pub(super) peer: PeerLimits,
}

/// How a connected site reaches the coordinator, for `status` and `sites`.
#[derive(Clone, Debug)]
pub(crate) struct SiteLink {
    /// The connection (asked for its transport and RTT when shown).
    pub(crate) conn: ServerConn,
    /// The site reported (Hello feature [`VIA_PROXY_FEATURE`]) that its TCP
    /// connection goes through an HTTP proxy.
    pub(crate) via_proxy: bool,
}

/// The Hello capability feature a site sends when its connection goes
/// through an HTTP proxy (the coordinator sees only the proxy's address).
pub(crate) const VIA_PROXY_FEATURE: &str = fedlink_protocol::message::FEATURE_VIA_PROXY;

impl SiteLink {
    pub(crate) fn info(&self, site: SiteId) -> fedlink_protocol::admin::LinkInfo {
        fedlink_protocol::admin::LinkInfo {
            site,
            transport: self.conn.kind().as_str().to_owned(),
            via_proxy: self.via_proxy,
            rtt_ms: self.conn.rtt().as_secs_f64() * 1000.0,
            remote: self.conn.remote_address().to_string(),
        }
    }
}

/// Removes a site's link entry when its session ends — unless a newer
/// connection of the site has replaced it meanwhile.
pub(crate) struct LinkGuard<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) site: SiteId,
    pub(crate) conn_id: usize,
}

impl Drop for LinkGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut links) = self.shared.site_links.lock()
            && links
                .get(&self.site)
                .is_some_and(|l| l.conn.stable_id() == self.conn_id)
        {
            links.remove(&self.site);
        }
    }
}

pub(super) fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Shared {
    /// Count a failed handshake from `remote` (recorded in bulk by
    /// [`Shared::record_refusals`]).
    pub(super) fn note_refused(&self, remote: SocketAddr, reason: &str) {
        if let Ok(mut r) = self.refusals.lock() {
            r.note(Instant::now(), remote.ip(), reason);
        }
    }

    /// Record the failed handshakes counted so far: every source whose
    /// interval has passed, or all of them with `all` (shutdown).
    pub(super) fn record_refusals(&self, all: bool) {
        let now = Instant::now();
        let summaries = match self.refusals.lock() {
            Ok(mut r) if all => r.drain(),
            Ok(mut r) => r.poll_flush(now),
            Err(_) => return,
        };
        let to_unix_ms = |t: Instant| {
            super::clock::unix_ms()
                .saturating_sub(now.saturating_duration_since(t).as_millis() as u64)
        };
        for s in summaries {
            let top = s
                .tally
                .reasons
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(r, _)| r.clone())
                .unwrap_or_default();
            let r = self.audit.record_own_event(&CoordEvent::HandshakesRefused(
                coord::HandshakesRefused {
                    peer_addr: s.source.to_string(),
                    stage: "handshake".into(),
                    count: s.tally.count,
                    reason: top,
                    reasons: s.tally.reasons.clone(),
                    first_unix_ms: to_unix_ms(s.tally.first),
                    last_unix_ms: to_unix_ms(s.tally.last),
                },
            ));
            if let Err(e) = r {
                tracing::error!(error = %e, "cannot record refused handshakes");
            }
        }
    }

    /// May new work (a connection, an upload) start? Records the change
    /// when the disk becomes low or recovers; `Err` says why not.
    pub(crate) fn disk_allows_new_work(&self) -> Result<(), LowOnDisk> {
        let observed = self.disk.check(self.audit.actor());
        if let Some(crate::core::Effect::AppendAudit { actor, event }) = observed.audit
            && let Err(e) = self.audit.record(&actor, &event)
        {
            tracing::error!(error = %e, "cannot record the disk state");
        }
        observed.verdict
    }

    /// The coordinator's audit log. Record an event before the action it
    /// describes takes effect, and do not perform the action if recording
    /// fails.
    pub(crate) fn audit(&self) -> &Auditor {
        &self.audit
    }

    /// What the running job asks of its sites.
    pub(super) fn job_needs(&self) -> JobNeeds {
        self.job_needs.read().map_or(JobNeeds::ANY, |n| *n)
    }

    /// The served version `hash` (its wire form made, or made on first
    /// use: [`ServedWire::wire`]).
    pub(super) fn wire_model(&self, hash: &ModelHash) -> Option<Arc<ServedWire>> {
        self.wire.read().ok()?.get(hash)
    }

    /// The update from `base` to `hash`, if it is the one being served.
    pub(super) fn wire_update(
        &self,
        base: &ModelHash,
        hash: &ModelHash,
    ) -> Option<Arc<WireUpdate>> {
        let u = self.downlink.read().ok()?.clone()?;
        (u.base == *base && u.wire.hash == *hash).then_some(u)
    }

    /// Serve `u` (the latest round's update) from now on, instead of the
    /// one before.
    pub(crate) fn publish_update(&self, u: Option<WireUpdate>) {
        if let Ok(mut slot) = self.downlink.write() {
            *slot = u.map(Arc::new);
        }
    }

    /// Serve `w` as the current model version (the one before it stays
    /// served for a round, older ones are dropped: [`ServedModels`]).
    /// Returns the versions still served and the wire file no longer
    /// served.
    pub(crate) fn publish_wire(&self, w: ServedWire) -> (Vec<ModelHash>, Option<PathBuf>) {
        match self.wire.write() {
            Ok(mut served) => {
                // A version dropped before its wire form was made has no
                // file. (One being made right now for a fetch is written
                // after this: pruned at the next start, `prune_models`.)
                let dropped = served
                    .publish(w.hash(), w)
                    .and_then(|d| d.made_already().map(|m| m.path.clone()));
                (served.hashes(), dropped)
            }
            // Poisoned: nothing is served, nothing is known to be unserved.
            Err(_) => (Vec::new(), None),
        }
    }

    /// Re-read the manifest and the revocation list if their files changed
    /// (renewals, new sites, revocations take effect without a restart).
    /// A file that fails to load keeps the old list in force and is tried
    /// again next time. When anything changed, the engine re-checks every
    /// open connection (a revoked or superseded certificate is cut off).
    /// When a file is due and whether to re-check: [`RegistryWatch`].
    pub(super) fn reload_if_changed(&self) {
        let recheck = {
            let mut watch = self
                .registry_watch
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let m = mtime(&self.manifest_path);
            if watch.due(Watched::Manifest, &m) {
                match SiteManifest::load(&self.manifest_path) {
                    Ok(new) => match update_keys(&new) {
                        Ok(keys) => {
                            if let Ok(mut cur) = self.manifest.write() {
                                *cur = new;
                            }
                            // Queue full: nothing taken up, so the next
                            // reload tick (2 s) tries again.
                            if self.engine.try_send(Event::Keys(keys)).is_ok() {
                                tracing::info!(path = %self.manifest_path.display(), "site manifest reloaded");
                                watch.taken_up(Watched::Manifest, m);
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "the new site manifest has a bad update key; keeping the old one");
                        }
                    },
                    Err(e) => {
                        tracing::error!(error = %e, "reloading the site manifest failed; keeping the old one");
                    }
                }
            }
            if let Some(path) = self.revocations.path() {
                let r = mtime(path);
                if watch.due(Watched::Revocations, &r) {
                    match self.revocations.reload() {
                        Ok(n) => {
                            tracing::info!(revoked = n, "revocation list reloaded");
                            watch.taken_up(Watched::Revocations, r);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reloading the revocation list failed; keeping the old one");
                        }
                    }
                }
            }
            watch.poll_recheck()
        };
        if recheck {
            if let Err(mpsc::error::TrySendError::Full(_)) =
                self.engine.try_send(Event::RecheckPeers)
            {
                self.registry_watch
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .recheck_not_queued();
            }
            self.recheck_admins();
        }
    }

    /// Whether `site` may still contribute ([`registry::site_allowed`]
    /// over the manifest and the revocation list as loaded).
    pub(crate) fn site_allowed(&self, site: &str) -> Result<(), NotAllowed> {
        let manifest = self.manifest.read().map_err(|_| NotAllowed::ManifestLock)?;
        registry::site_allowed(&manifest, &*self.revocations, site)
    }

    /// The most training examples `site`'s updates may claim
    /// ([`registry::site_max_examples`]).
    pub(crate) fn site_max_examples(&self, site: &str) -> Result<Option<u64>, NotAllowed> {
        let manifest = self.manifest.read().map_err(|_| NotAllowed::ManifestLock)?;
        Ok(registry::site_max_examples(&manifest, site))
    }

    /// Whether an open connection may stay ([`registry::peer_allowed`]
    /// with its end-entity certificate).
    pub(crate) fn check_open_peer(&self, conn: &fedlink_transport::Conn) -> Result<(), NotAllowed> {
        let cert = conn.peer_end_entity();
        let manifest = self.manifest.read().map_err(|_| NotAllowed::ManifestLock)?;
        registry::peer_allowed(&manifest, &*self.revocations, cert.as_ref())
    }
}
