//! Shared test fixtures for fedlink. Not published; never used by production
//! code.
//!
//! [`TestPki`] provisions a throwaway federation in a temporary directory
//! with the real provisioning code of `fedlink-certs` (no hand-made shortcuts):
//! a CA, the coordinator kit, `N` site kits and an admin kit, plus "bad"
//! material for rejection tests:
//!
//! - a site kit and a coordinator kit from **another CA** (same federation
//!   name, so only the CA pinning tells them apart),
//! - an **expired** site certificate (validity ended yesterday),
//! - a **revoked** site (listed in `revoked.toml` at creation),
//! - a **coordinator-role certificate usable as a client** (signed by the
//!   real CA with the clientAuth usage, as a mis-issuing tool would): only the
//!   role check can refuse it.
//!
//! Creation takes a few milliseconds (P-256 keys, no sleeps).
//!
//! ```
//! let pki = fedlink_test_util::TestPki::new(2)?;
//! let site = pki.site_kit(0)?;
//! assert_eq!(site.identity().to_uri(), "fedlink://testfed/site/site-0");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use fedlink_certs::time::{Duration, OffsetDateTime};
use fedlink_certs::{CertificateAuthority, InitOptions, Kit, KitInfo, Role, Validity};

/// Federation name used by [`TestPki`].
pub const FEDERATION: &str = "testfed";

/// Errors while building fixtures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestPkiError {
    /// Provisioning failed.
    #[error(transparent)]
    Certs(#[from] fedlink_certs::Error),
    /// Building a deliberately bad certificate failed.
    #[error("rcgen: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// File system error.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// No site with that index.
    #[error("no site #{0}")]
    NoSuchSite(usize),
}

/// A throwaway federation in a temporary directory (removed on drop).
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
    ca: CertificateAuthority,
    coordinator: PathBuf,
    admin: PathBuf,
    sites: Vec<PathBuf>,
    foreign_site: PathBuf,
    foreign_coordinator: PathBuf,
    expired_site: PathBuf,
    revoked_site: PathBuf,
    rogue_coordinator: PathBuf,
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TestPkiError> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    opts.open(path)?.write_all(data)?;
    Ok(())
}

impl TestPki {
    /// Provision a federation named [`FEDERATION`] with `n_sites` good sites
    /// (`site-0`, `site-1`, …), the admin `admin`, a coordinator for
    /// `localhost` / `127.0.0.1`, and the bad material described in the crate
    /// docs.
    pub fn new(n_sites: usize) -> Result<Self, TestPkiError> {
        let dir = tempfile::tempdir()?;
        let now = OffsetDateTime::now_utc();
        let fed = dir.path().join("fed");
        let (ca, report) = CertificateAuthority::init(&InitOptions::new(FEDERATION, &fed), now)?;
        let valid = Validity::days_from(now, 1)?;

        let mut sites = Vec::with_capacity(n_sites);
        for i in 0..n_sites {
            let name = format!("site-{i}");
            let kit = fed.join("sites").join(&name);
            ca.issue_site(&name, &kit, valid, None, now)?;
            sites.push(kit);
        }

        let expired_site = fed.join("sites/expired-site");
        let expired = Validity::new(now - Duration::days(2), now - Duration::days(1))?;
        ca.issue_site("expired-site", &expired_site, expired, None, now)?;

        let revoked_site = fed.join("sites/revoked-site");
        ca.issue_site("revoked-site", &revoked_site, valid, None, now)?;
        ca.revoke("revoked-site", Some(Role::Site), Some("test fixture"), now)?;

        // Another CA of a federation with the same name.
        let other = dir.path().join("other");
        let (other_ca, other_report) =
            CertificateAuthority::init(&InitOptions::new(FEDERATION, &other), now)?;
        let foreign_site = other.join("sites/foreign-site");
        other_ca.issue_site("foreign-site", &foreign_site, valid, None, now)?;

        let rogue_coordinator = dir.path().join("rogue-coordinator");
        make_rogue_coordinator_client(ca.dir(), &rogue_coordinator, &ca)?;

        Ok(Self {
            dir,
            ca,
            coordinator: report.coordinator_kit,
            admin: report.admin_kit,
            sites,
            foreign_site,
            foreign_coordinator: other_report.coordinator_kit,
            expired_site,
            revoked_site,
            rogue_coordinator,
        })
    }

    /// The temporary root directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The federation CA (to issue, renew or revoke more).
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The federation name.
    pub fn federation(&self) -> &str {
        FEDERATION
    }

    /// `ca/revoked.toml`.
    pub fn revoked_path(&self) -> PathBuf {
        self.ca.revoked_path()
    }

    /// `ca/sites.toml`.
    pub fn manifest_path(&self) -> PathBuf {
        self.ca.manifest_path()
    }

    /// The coordinator's kit directory.
    pub fn coordinator_dir(&self) -> &Path {
        &self.coordinator
    }

    /// The coordinator's kit.
    pub fn coordinator_kit(&self) -> Result<Kit, TestPkiError> {
        Ok(Kit::load(&self.coordinator)?)
    }

    /// The admin's kit directory (`admin`).
    pub fn admin_dir(&self) -> &Path {
        &self.admin
    }

    /// The admin's kit.
    pub fn admin_kit(&self) -> Result<Kit, TestPkiError> {
        Ok(Kit::load(&self.admin)?)
    }

    /// Number of good sites.
    pub fn n_sites(&self) -> usize {
        self.sites.len()
    }

    /// Kit directory of good site `i` (`site-<i>`).
    pub fn site_dir(&self, i: usize) -> Result<&Path, TestPkiError> {
        self.sites
            .get(i)
            .map(PathBuf::as_path)
            .ok_or(TestPkiError::NoSuchSite(i))
    }

    /// Kit of good site `i`.
    pub fn site_kit(&self, i: usize) -> Result<Kit, TestPkiError> {
        Ok(Kit::load(self.site_dir(i)?)?)
    }

    /// A site kit issued by another CA (same federation name).
    pub fn foreign_site_dir(&self) -> &Path {
        &self.foreign_site
    }

    /// The coordinator kit of that other CA (an impostor coordinator for
    /// the real sites: same federation name, same server name).
    pub fn foreign_coordinator_dir(&self) -> &Path {
        &self.foreign_coordinator
    }

    /// A site kit whose certificate expired yesterday.
    pub fn expired_site_dir(&self) -> &Path {
        &self.expired_site
    }

    /// A site kit whose certificate is listed in `revoked.toml`.
    pub fn revoked_site_dir(&self) -> &Path {
        &self.revoked_site
    }

    /// A kit with a coordinator-role certificate (from the real CA) that
    /// carries the clientAuth usage: only the role check refuses it as a
    /// client.
    pub fn rogue_coordinator_dir(&self) -> &Path {
        &self.rogue_coordinator
    }

    /// Issue one more good site (valid one day) and return its kit directory.
    pub fn issue_site(&self, name: &str) -> Result<PathBuf, TestPkiError> {
        let now = OffsetDateTime::now_utc();
        let kit = self.dir.path().join("fed/sites").join(name);
        self.ca
            .issue_site(name, &kit, Validity::days_from(now, 1)?, None, now)?;
        Ok(kit)
    }
}

/// Write a kit whose certificate says `coordinator` but may act as a TLS
/// client, signed by the real CA key (what a buggy or malicious issuing tool
/// could produce).
fn make_rogue_coordinator_client(
    ca_dir: &Path,
    out: &Path,
    ca: &CertificateAuthority,
) -> Result<(), TestPkiError> {
    let ca_pem = std::fs::read_to_string(ca_dir.join(fedlink_certs::CA_CERT_FILE))?;
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(
        ca_dir.join(fedlink_certs::CA_KEY_FILE),
    )?)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let name = "rogue-coordinator";
    let uri = format!("fedlink://{FEDERATION}/coordinator/{name}");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(uri.as_str().try_into()?));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x42, 0x42]));
    let cert = params.signed_by(&key, &issuer)?;

    std::fs::create_dir(out)?;
    write_file(
        &out.join(fedlink_certs::CA_CERT_FILE),
        ca_pem.as_bytes(),
        0o644,
    )?;
    write_file(
        &out.join(fedlink_certs::CERT_FILE),
        cert.pem().as_bytes(),
        0o644,
    )?;
    write_file(
        &out.join(fedlink_certs::KEY_FILE),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    let info = KitInfo {
        format: fedlink_certs::KIT_FORMAT,
        federation: FEDERATION.into(),
        role: Role::Coordinator,
        name: name.into(),
        coordinator_addr: ca.info().coordinator_addr.clone(),
        coordinator_server_name: ca.info().coordinator_server_name.clone(),
        ca_cert: fedlink_certs::CA_CERT_FILE.into(),
        cert: fedlink_certs::CERT_FILE.into(),
        key: fedlink_certs::KEY_FILE.into(),
        update_key: None,
        update_public_key: None,
    };
    let text = toml::to_string(&info).map_err(|e| std::io::Error::other(e.to_string()))?;
    write_file(&out.join(fedlink_certs::KIT_FILE), text.as_bytes(), 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlink_certs::{RevocationList, SiteManifest};

    #[test]
    fn fixture_material() {
        let pki = TestPki::new(3).unwrap();
        assert_eq!(pki.n_sites(), 3);
        for i in 0..3 {
            let kit = pki.site_kit(i).unwrap();
            assert_eq!(kit.identity().name(), format!("site-{i}"));
            assert!(kit.update_signing_key().is_some());
        }
        assert!(pki.site_kit(3).is_err());
        assert_eq!(
            pki.coordinator_kit().unwrap().identity().role(),
            Role::Coordinator
        );
        assert_eq!(pki.admin_kit().unwrap().identity().role(), Role::Admin);

        let expired = Kit::load(pki.expired_site_dir()).unwrap();
        assert!(expired.cert_info().not_after < OffsetDateTime::now_utc());

        let list = RevocationList::load(pki.revoked_path()).unwrap();
        let revoked = Kit::load(pki.revoked_site_dir()).unwrap();
        assert!(list.is_revoked(&revoked.cert_chain()[0]).is_some());
        assert!(
            list.is_revoked(&pki.site_kit(0).unwrap().cert_chain()[0])
                .is_none()
        );

        let foreign = Kit::load(pki.foreign_site_dir()).unwrap();
        assert_eq!(foreign.identity().federation(), FEDERATION);
        assert_ne!(foreign.ca_cert(), pki.ca().cert());

        let rogue = Kit::load(pki.rogue_coordinator_dir()).unwrap();
        assert_eq!(rogue.identity().role(), Role::Coordinator);
        assert_eq!(rogue.ca_cert(), pki.ca().cert());

        let manifest = SiteManifest::load(&pki.manifest_path()).unwrap();
        assert_eq!(manifest.site.len(), 5); // 3 good + expired + revoked

        let extra = pki.issue_site("late-site").unwrap();
        assert_eq!(Kit::load(extra).unwrap().identity().name(), "late-site");
    }
}
