//! The site registry as loaded — the manifest (`sites.toml`) and the
//! revocation list (`revoked.toml`) — read as data: whether a site may
//! still contribute ([`site_allowed`]), what its updates may claim
//! ([`site_max_examples`]), whether an open connection may stay
//! ([`peer_allowed`]); and when the files are taken up again
//! ([`RegistryWatch`]).
//!
//! The driver (`crate::server`) reads the files and their modification
//! times, holds what it loaded behind its locks and asks here. The
//! simulator ([`super::sim`]) asks the same functions of the registry it
//! loaded ([`super::admin::Registry`]).
//!
//! ```text
//!  driver tick: mtime(sites.toml), mtime(revoked.toml)
//!     │ RegistryWatch::due(file, stamp)? ── no ──▶ nothing
//!     ▼ yes: load the file (driver)
//!  loaded and handed over ──▶ RegistryWatch::taken_up(file, stamp)
//!  failed / engine queue full ──▶ nothing: the old list stays, due again next tick
//!     │
//!  RegistryWatch::poll_recheck() ──▶ re-check every open connection
//!                                    (queue full ──▶ recheck_not_queued: next tick)
//! ```

use fedlink_certs::rustls_pki_types::CertificateDer;
use fedlink_certs::{
    CertInfo, Fingerprint, PeerRejected, RevocationList, RevokedBy, RevokedFile, Serial,
    SiteManifest,
};

/// A revocation list as the core reads it: the in-memory list the driver
/// shares with its TLS verifier ([`RevocationList`]) or the file's
/// contents as loaded ([`RevokedFile`]).
pub trait Revocations {
    /// Whether a certificate with this serial (if known) and fingerprint
    /// is listed, and by which.
    fn revoked_by(&self, serial: Option<&Serial>, fingerprint: &Fingerprint) -> Option<RevokedBy>;

    /// Whether a DER certificate is listed (by serial or fingerprint; one
    /// whose serial cannot be read is still checked by fingerprint).
    fn cert_revoked(&self, cert: &CertificateDer<'_>) -> Option<RevokedBy>;
}

impl Revocations for RevocationList {
    fn revoked_by(&self, serial: Option<&Serial>, fingerprint: &Fingerprint) -> Option<RevokedBy> {
        self.check(serial, fingerprint)
    }

    fn cert_revoked(&self, cert: &CertificateDer<'_>) -> Option<RevokedBy> {
        self.is_revoked(cert)
    }
}

impl Revocations for RevokedFile {
    fn revoked_by(&self, serial: Option<&Serial>, fingerprint: &Fingerprint) -> Option<RevokedBy> {
        // As `RevocationList::check`: a listed serial first, then a listed
        // fingerprint.
        if serial.is_some_and(|s| self.revoked.iter().any(|e| e.serial.as_ref() == Some(s))) {
            Some(RevokedBy::Serial)
        } else if self
            .revoked
            .iter()
            .any(|e| e.fingerprint == Some(*fingerprint))
        {
            Some(RevokedBy::Fingerprint)
        } else {
            None
        }
    }

    fn cert_revoked(&self, cert: &CertificateDer<'_>) -> Option<RevokedBy> {
        let serial = CertInfo::from_der(cert).ok().map(|i| i.serial);
        self.revoked_by(serial.as_ref(), &Fingerprint::of(cert))
    }
}

/// Why a site may no longer contribute ([`site_allowed`]) or its open
/// connection stay ([`peer_allowed`]). The text is the reason in the log,
/// the audit entry and the connection's close.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotAllowed {
    /// The driver could not read the manifest it holds (a panic while it
    /// was replaced).
    #[error("manifest lock poisoned")]
    ManifestLock,
    /// The site is not in the manifest.
    #[error("{0} is not a registered site (removed or revoked)")]
    NotRegistered(String),
    /// The site's registered certificate is revoked.
    #[error("the certificate of {site} is revoked ({by:?})")]
    Revoked {
        /// The site.
        site: String,
        /// Listed by serial or by fingerprint.
        by: RevokedBy,
    },
    /// The connection shows no certificate.
    #[error("no peer certificate")]
    NoPeerCertificate,
    /// The connection's certificate is revoked.
    #[error("certificate revoked ({0:?})")]
    PeerRevoked(RevokedBy),
    /// The connection's certificate is not the registered one of a site.
    #[error(transparent)]
    Manifest(#[from] PeerRejected),
}

/// Whether `site` may still contribute: it is in the manifest and its
/// registered certificate is not revoked. Asked when its update is
/// accepted and again when the round aggregates (a revocation that lands
/// while an upload is in flight, or after it was accepted, keeps the
/// update out).
pub fn site_allowed(
    manifest: &SiteManifest,
    revoked: &impl Revocations,
    site: &str,
) -> Result<(), NotAllowed> {
    let entry = manifest
        .get(site)
        .ok_or_else(|| NotAllowed::NotRegistered(site.to_owned()))?;
    match revoked.revoked_by(Some(&entry.cert_serial), &entry.cert_fingerprint) {
        Some(by) => Err(NotAllowed::Revoked {
            site: site.to_owned(),
            by,
        }),
        None => Ok(()),
    }
}

/// The most training examples `site`'s updates may claim, as declared in
/// the manifest (`max_examples` in `sites.toml`); `None` when the site
/// declares none or is not registered (then [`site_allowed`] refuses it
/// anyway).
pub fn site_max_examples(manifest: &SiteManifest, site: &str) -> Option<u64> {
    manifest.get(site).and_then(|e| e.max_examples)
}

/// Whether an open connection showing `cert` (its end-entity certificate,
/// `None` if it shows none) may stay: the certificate is not revoked and
/// is still the registered certificate of a site in the manifest.
pub fn peer_allowed(
    manifest: &SiteManifest,
    revoked: &impl Revocations,
    cert: Option<&CertificateDer<'_>>,
) -> Result<(), NotAllowed> {
    let cert = cert.ok_or(NotAllowed::NoPeerCertificate)?;
    if let Some(by) = revoked.cert_revoked(cert) {
        return Err(NotAllowed::PeerRevoked(by));
    }
    manifest.check_peer(cert)?;
    Ok(())
}

/// One of the registry's two files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watched {
    /// `sites.toml`.
    Manifest,
    /// `revoked.toml`.
    Revocations,
}

/// When the registry's files are taken up again: a file is due when its
/// modification time (the driver's stamp `S`; `None`: unreadable) differs
/// from the one last taken up. A load that fails, or whose result the
/// engine could not be handed (its queue full), takes nothing up: the old
/// list stays in force and the file is due again at the next tick. Every
/// file taken up asks for one re-check of the open connections; a re-check
/// that could not be queued is asked for again at the next tick.
#[derive(Clone, Debug)]
pub struct RegistryWatch<S> {
    manifest: Option<S>,
    revocations: Option<S>,
    recheck: bool,
}

impl<S: PartialEq> RegistryWatch<S> {
    /// The files as loaded at start, with these stamps.
    pub fn new(manifest: Option<S>, revocations: Option<S>) -> Self {
        Self {
            manifest,
            revocations,
            recheck: false,
        }
    }

    fn stamp(&mut self, file: Watched) -> &mut Option<S> {
        match file {
            Watched::Manifest => &mut self.manifest,
            Watched::Revocations => &mut self.revocations,
        }
    }

    /// Is `file`, stamped `stamp` now, to be loaded?
    pub fn due(&self, file: Watched, stamp: &Option<S>) -> bool {
        let taken = match file {
            Watched::Manifest => &self.manifest,
            Watched::Revocations => &self.revocations,
        };
        taken != stamp
    }

    /// `file`, stamped `stamp`, is loaded and in force.
    pub fn taken_up(&mut self, file: Watched, stamp: Option<S>) {
        *self.stamp(file) = stamp;
        self.recheck = true;
    }

    /// Forget what was taken up: both files are due at the next look,
    /// whatever their stamps (an admin changed them, perhaps within the
    /// stamps' resolution). A file with no stamp (unreadable) stays not
    /// due.
    pub fn forget(&mut self) {
        self.manifest = None;
        self.revocations = None;
    }

    /// Whether the open connections are to be re-checked now (a file was
    /// taken up since the last re-check, or a re-check could not be
    /// queued); asking clears it.
    pub fn poll_recheck(&mut self) -> bool {
        std::mem::take(&mut self.recheck)
    }

    /// The re-check [`poll_recheck`](Self::poll_recheck) asked for could
    /// not be queued: ask again at the next tick.
    pub fn recheck_not_queued(&mut self) {
        self.recheck = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlink_certs::{Identity, RevokedEntry, Role, SiteEntry};

    fn entry(name: &str, n: u8, max_examples: Option<u64>) -> SiteEntry {
        SiteEntry {
            name: name.to_owned(),
            identity: Identity::new("fed", Role::Site, name).unwrap(),
            cert_serial: Serial::from_bytes(&[n]).unwrap(),
            cert_fingerprint: hex::encode([n; 32]).parse().unwrap(),
            update_public_key: "00".repeat(32),
            added_at: "2026-01-01T00:00:00Z".into(),
            renewed_at: None,
            max_examples,
        }
    }

    fn manifest() -> SiteManifest {
        let mut m = SiteManifest::new("fed").unwrap();
        m.site.push(entry("a", 1, Some(500)));
        m.site.push(entry("b", 2, None));
        m
    }

    fn listed(serial: Option<Serial>, fingerprint: Option<Fingerprint>) -> RevokedFile {
        let mut f = RevokedFile::default();
        f.revoked.push(RevokedEntry {
            serial,
            fingerprint,
            identity: None,
            reason: None,
            revoked_at: None,
            update_public_key: None,
        });
        f
    }

    fn revoked(serial: Option<u8>, fingerprint: Option<u8>) -> RevokedFile {
        listed(
            serial.map(|n| Serial::from_bytes(&[n]).unwrap()),
            fingerprint.map(|n| hex::encode([n; 32]).parse().unwrap()),
        )
    }

    #[test]
    fn a_site_contributes_while_registered_and_not_revoked() {
        let m = manifest();
        assert!(site_allowed(&m, &RevokedFile::default(), "a").is_ok());
        let err = site_allowed(&m, &RevokedFile::default(), "zed").unwrap_err();
        assert!(matches!(&err, NotAllowed::NotRegistered(s) if s == "zed"));
        assert_eq!(
            err.to_string(),
            "zed is not a registered site (removed or revoked)"
        );
        // Listed by serial (checked first) or by fingerprint.
        let err = site_allowed(&m, &revoked(Some(1), Some(1)), "a").unwrap_err();
        assert!(
            matches!(&err, NotAllowed::Revoked { site, by: RevokedBy::Serial } if site == "a"),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "the certificate of a is revoked (Serial)");
        assert!(matches!(
            site_allowed(&m, &revoked(None, Some(2)), "b"),
            Err(NotAllowed::Revoked {
                by: RevokedBy::Fingerprint,
                ..
            })
        ));
        // Another site's revocation leaves this one alone.
        assert!(site_allowed(&m, &revoked(Some(2), Some(2)), "a").is_ok());
    }

    #[test]
    fn the_declared_examples_bound_is_the_manifests() {
        let m = manifest();
        assert_eq!(site_max_examples(&m, "a"), Some(500));
        assert_eq!(site_max_examples(&m, "b"), None);
        assert_eq!(site_max_examples(&m, "zed"), None);
    }

    #[test]
    fn a_peer_is_checked_for_revocation_before_the_manifest() {
        let m = manifest();
        let none = RevokedFile::default();
        assert!(matches!(
            peer_allowed(&m, &none, None),
            Err(NotAllowed::NoPeerCertificate)
        ));
        // Not a certificate of the federation: the manifest rejects it.
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x07]);
        assert!(matches!(
            peer_allowed(&m, &none, Some(&junk)),
            Err(NotAllowed::Manifest(_))
        ));
        // Its fingerprint listed: revoked, whatever the manifest says.
        let by_fp = listed(None, Some(Fingerprint::of(&junk)));
        assert!(matches!(
            peer_allowed(&m, &by_fp, Some(&junk)),
            Err(NotAllowed::PeerRevoked(RevokedBy::Fingerprint))
        ));
    }

    #[test]
    fn a_file_is_taken_up_once_per_change_and_retried_until_it_is() {
        let mut w = RegistryWatch::new(Some(1u32), Some(10));
        assert!(!w.due(Watched::Manifest, &Some(1)));
        assert!(!w.due(Watched::Revocations, &Some(10)));
        assert!(!w.poll_recheck(), "nothing changed, nothing to re-check");
        // The manifest changed; its load fails (or the engine's queue is
        // full): nothing is taken up, and it is due again next tick.
        assert!(w.due(Watched::Manifest, &Some(2)));
        assert!(!w.poll_recheck());
        assert!(w.due(Watched::Manifest, &Some(2)));
        // Next tick it loads: taken up, one re-check.
        w.taken_up(Watched::Manifest, Some(2));
        assert!(!w.due(Watched::Manifest, &Some(2)));
        assert!(!w.due(Watched::Revocations, &Some(10)), "files apart");
        assert!(w.poll_recheck());
        assert!(!w.poll_recheck(), "once");
        // A file that disappears is due (its stamp changed to none).
        assert!(w.due(Watched::Revocations, &None));
    }

    #[test]
    fn a_recheck_that_could_not_be_queued_is_asked_for_again() {
        let mut w = RegistryWatch::new(Some(1u32), None);
        w.taken_up(Watched::Revocations, Some(5));
        assert!(w.poll_recheck());
        w.recheck_not_queued();
        assert!(w.poll_recheck(), "asked for again at the next tick");
        assert!(!w.poll_recheck());
    }

    #[test]
    fn forgetting_makes_every_stamped_file_due() {
        let mut w = RegistryWatch::new(Some(1u32), Some(10));
        w.forget();
        assert!(w.due(Watched::Manifest, &Some(1)));
        assert!(w.due(Watched::Revocations, &Some(10)));
        assert!(!w.due(Watched::Manifest, &None), "no file: nothing to load");
        assert!(!w.poll_recheck(), "forgetting alone re-checks nothing");
    }
}
