//! The federation CA and provisioning: `init`, `issue-site`, `issue-admin`,
//! `renew`, `revoke`.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use rand::RngCore;
use rand::rngs::OsRng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, ServerName};
use time::{Duration, OffsetDateTime};

use crate::Error;
use crate::certinfo::{CertInfo, Fingerprint, Serial};
use crate::files::{self, DirLock, io_err};
use crate::identity::{Identity, Role, validate_name};
use crate::kit::{
    CA_CERT_FILE, CERT_FILE, KEY_FILE, KIT_FILE, KIT_FORMAT, Kit, KitInfo, UPDATE_KEY_FILE,
    UPDATE_PUBLIC_KEY_FILE,
};
use crate::manifest::{SiteEntry, SiteManifest};
use crate::revocation::{RevokedEntry, RevokedFile};

/// Sub-directory of the federation directory holding the CA.
pub const CA_DIR: &str = "ca";
/// The CA private key file in the CA directory (mode 0600; never in a kit).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Federation settings in the CA directory.
pub const FEDERATION_FILE: &str = "federation.toml";
/// Audit register of every certificate issued, in the CA directory.
pub const ISSUED_FILE: &str = "issued.toml";
/// Revocation list in the CA directory.
pub const REVOKED_FILE: &str = "revoked.toml";
/// Provisioning manifest (approved sites) in the CA directory.
pub const SITES_FILE: &str = "sites.toml";
/// Name of the coordinator's identity.
pub const COORDINATOR_NAME: &str = "coordinator";
/// The coordinator's audit public key, as issued (SPKI PEM), kept in the CA
/// directory: what `fedlink audit verify --ca` checks the coordinator's log
/// with.
pub const COORDINATOR_AUDIT_KEY_FILE: &str = "coordinator-audit-key.pub.pem";
/// Default coordinator UDP port.
pub const DEFAULT_PORT: u16 = 4433;
/// Default end-entity validity (days).
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;
/// Default CA validity (days).
pub const DEFAULT_CA_VALIDITY_DAYS: u32 = 3650;
/// Certificates are back-dated by this much to tolerate clock skew.
pub const CLOCK_SKEW: Duration = Duration::minutes(5);

const FORMAT: u32 = 1;

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// A certificate validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl Validity {
    /// From `now - CLOCK_SKEW` to `now + days`. `days` must be 1..=36500.
    pub fn days_from(now: OffsetDateTime, days: u32) -> Result<Self, Error> {
        if !(1..=36_500).contains(&days) {
            return Err(Error::Refused(format!(
                "validity of {days} days is out of range (1 to 36500)"
            )));
        }
        Self::new(now - CLOCK_SKEW, now + Duration::days(i64::from(days)))
    }

    /// An explicit period (`not_before < not_after`). Either may be in the
    /// past: tests use this to make expired certificates.
    pub fn new(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Result<Self, Error> {
        if not_before >= not_after {
            return Err(Error::Refused(
                "validity: not_before must be before not_after".into(),
            ));
        }
        Ok(Self {
            not_before,
            not_after,
        })
    }

    /// Start of validity.
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }
}

/// `ca/federation.toml`: federation-wide settings copied into new kits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationInfo {
    /// Format version (1).
    pub format: u32,
    /// Federation name.
    pub federation: String,
    /// Default coordinator address for new kits (`host:port`).
    pub coordinator_addr: String,
    /// Name clients verify in the coordinator certificate.
    pub coordinator_server_name: String,
    /// When the CA was created (RFC 3339).
    pub created_at: String,
}

/// One record of `ca/issued.toml`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedRecord {
    /// Certificate serial.
    pub serial: Serial,
    /// SHA-256 of the certificate.
    pub fingerprint: Fingerprint,
    /// Identity in the certificate.
    pub identity: Identity,
    /// Start of validity (RFC 3339).
    pub not_before: String,
    /// End of validity (RFC 3339).
    pub not_after: String,
    /// When it was issued (RFC 3339).
    pub issued_at: String,
    /// Kit directory it was written to, as given at issue time.
    pub kit_dir: String,
    /// Serial of the certificate this one renewed, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renews: Option<Serial>,
}

/// `ca/issued.toml`: every certificate the CA issued (audit register).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedFile {
    /// Format version (1).
    pub format: u32,
    /// Issued certificates, oldest first.
    #[serde(default)]
    pub cert: Vec<IssuedRecord>,
}

impl IssuedFile {
    /// Read `issued.toml`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let file: Self = files::read_toml(path)?;
        if file.format != FORMAT {
            return Err(Error::Invalid {
                path: path.to_path_buf(),
                why: format!("unsupported format {}", file.format),
            });
        }
        Ok(file)
    }

    fn save(&self, path: &Path) -> Result<(), Error> {
        files::replace_public(path, files::to_toml(self, path)?.as_bytes())
    }
}

/// Options of [`CertificateAuthority::init`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InitOptions {
    /// Federation name.
    pub federation: String,
    /// Federation directory to create (`ca/`, `coordinator/`, `admins/`).
    pub out_dir: PathBuf,
    /// DNS names / IP addresses of the coordinator certificate
    /// (default `localhost`, `127.0.0.1`).
    pub server_names: Vec<String>,
    /// Coordinator address written into kits (default `<first name>:4433`).
    pub coordinator_addr: Option<String>,
    /// Name of the first admin.
    pub admin: String,
    /// Validity of the coordinator and admin certificates (days).
    pub validity_days: u32,
    /// Validity of the CA certificate (days).
    pub ca_validity_days: u32,
}

impl InitOptions {
    /// Defaults for `federation` in `out_dir`.
    pub fn new(federation: impl Into<String>, out_dir: impl Into<PathBuf>) -> Self {
        Self {
            federation: federation.into(),
            out_dir: out_dir.into(),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            coordinator_addr: None,
            admin: "admin".into(),
            validity_days: DEFAULT_VALIDITY_DAYS,
            ca_validity_days: DEFAULT_CA_VALIDITY_DAYS,
        }
    }
}

/// What [`CertificateAuthority::init`] created.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InitReport {
    /// The CA directory.
    pub ca_dir: PathBuf,
    /// The coordinator's kit.
    pub coordinator_kit: PathBuf,
    /// The first admin's kit.
    pub admin_kit: PathBuf,
}

/// A freshly issued kit.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct IssuedKit {
    /// The kit directory.
    pub dir: PathBuf,
    /// Its identity.
    pub identity: Identity,
    /// Its certificate's serial.
    pub serial: Serial,
    /// Its certificate's fingerprint.
    pub fingerprint: Fingerprint,
    /// The site's update public key (hex), for site kits.
    pub update_public_key: Option<String>,
}

/// Result of a renewal.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RenewReport {
    /// The new certificate.
    pub kit: IssuedKit,
    /// Serial of the replaced certificate.
    pub old_serial: Serial,
    /// Where the replaced certificate and key were kept.
    pub backups: Vec<PathBuf>,
}

struct KitRequest<'a> {
    identity: Identity,
    out_dir: &'a Path,
    validity: Validity,
    server_names: &'a [String],
    coordinator_addr: Option<&'a str>,
}

/// An opened federation CA (its directory, certificate and private key).
pub struct CertificateAuthority {
    dir: PathBuf,
    info: FederationInfo,
    cert: CertificateDer<'static>,
    cert_pem: String,
    pub(crate) issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("dir", &self.dir)
            .field("federation", &self.info.federation)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    // Positive and without a leading zero byte, so the DER form is exactly
    // these 16 bytes.
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

fn new_tls_key() -> Result<KeyPair, Error> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

fn validate_server_name(name: &str) -> Result<(), Error> {
    ServerName::try_from(name)
        .map(|_| ())
        .map_err(|_| Error::Refused(format!("{name:?} is not a valid DNS name or IP address")))
}

fn default_addr(server_name: &str) -> String {
    match server_name.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{DEFAULT_PORT}"),
        _ => format!("{server_name}:{DEFAULT_PORT}"),
    }
}

fn leaf_params(
    identity: &Identity,
    validity: Validity,
    server_names: &[String],
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(random_serial());
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.name());
    dn.push(DnType::OrganizationalUnitName, identity.role().as_str());
    dn.push(
        DnType::OrganizationName,
        format!("fedlink {}", identity.federation()),
    );
    params.distinguished_name = dn;
    params
        .subject_alt_names
        .push(SanType::URI(identity.to_uri().try_into()?));
    for name in server_names {
        validate_server_name(name)?;
        params.subject_alt_names.push(match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.as_str().try_into()?),
        });
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match identity.role() {
        Role::Coordinator => ExtendedKeyUsagePurpose::ServerAuth,
        Role::Site | Role::Admin => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

impl CertificateAuthority {
    /// Create a federation: `out_dir/ca` (CA certificate and key, empty
    /// registers), the coordinator kit in `out_dir/coordinator` and the first
    /// admin kit in `out_dir/admins/<admin>`. Refuses if `out_dir/ca` exists.
    pub fn init(opts: &InitOptions, now: OffsetDateTime) -> Result<(Self, InitReport), Error> {
        validate_name(&opts.federation)?;
        validate_name(&opts.admin)?;
        if opts.server_names.is_empty() {
            return Err(Error::Refused(
                "the coordinator certificate needs at least one DNS name or IP address".into(),
            ));
        }
        for n in &opts.server_names {
            validate_server_name(n)?;
        }
        let validity = Validity::days_from(now, opts.validity_days)?;
        let ca_validity = Validity::days_from(now, opts.ca_validity_days)?;
        let server_name = opts
            .server_names
            .iter()
            .find(|n| n.parse::<IpAddr>().is_err())
            .or_else(|| opts.server_names.first())
            .cloned()
            .unwrap_or_default();
        let coordinator_addr = opts
            .coordinator_addr
            .clone()
            .unwrap_or_else(|| default_addr(&server_name));

        let ca_dir = opts.out_dir.join(CA_DIR);
        let coordinator_kit = opts.out_dir.join("coordinator");
        let admin_kit = opts.out_dir.join("admins").join(&opts.admin);
        for p in [&ca_dir, &coordinator_kit, &admin_kit] {
            if p.exists() {
                return Err(Error::AlreadyExists { path: p.clone() });
            }
        }
        files::create_private_dir(&ca_dir)?;

        // The CA: P-256, path length 0 (issues end entities only).
        let key = new_tls_key()?;
        let mut params = CertificateParams::default();
        params.not_before = ca_validity.not_before;
        params.not_after = ca_validity.not_after;
        params.serial_number = Some(random_serial());
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("fedlink {} root CA", opts.federation),
        );
        dn.push(
            DnType::OrganizationName,
            format!("fedlink {}", opts.federation),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;

        files::write_secret(&ca_dir.join(CA_KEY_FILE), key.serialize_pem().as_bytes())?;
        files::write_public(&ca_dir.join(CA_CERT_FILE), cert.pem().as_bytes())?;
        let info = FederationInfo {
            format: FORMAT,
            federation: opts.federation.clone(),
            coordinator_addr,
            coordinator_server_name: server_name,
            created_at: rfc3339(now),
        };
        let fed_path = ca_dir.join(FEDERATION_FILE);
        files::write_public(&fed_path, files::to_toml(&info, &fed_path)?.as_bytes())?;
        let issued = IssuedFile {
            format: FORMAT,
            cert: Vec::new(),
        };
        let p = ca_dir.join(ISSUED_FILE);
        files::write_public(&p, files::to_toml(&issued, &p)?.as_bytes())?;
        let p = ca_dir.join(REVOKED_FILE);
        files::write_public(&p, files::to_toml(&RevokedFile::default(), &p)?.as_bytes())?;
        let p = ca_dir.join(SITES_FILE);
        files::write_public(
            &p,
            files::to_toml(&SiteManifest::new(&opts.federation)?, &p)?.as_bytes(),
        )?;

        let ca = Self::open(&ca_dir)?;
        ca.issue_coordinator(&coordinator_kit, &opts.server_names, validity, now)?;
        ca.issue_admin(&opts.admin, &admin_kit, validity, None, now)?;
        Ok((
            ca,
            InitReport {
                ca_dir,
                coordinator_kit,
                admin_kit,
            },
        ))
    }

    /// Open an existing CA directory (checks the key's mode and that it
    /// matches the CA certificate).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref().to_path_buf();
        let info: FederationInfo = files::read_toml(&dir.join(FEDERATION_FILE))?;
        validate_name(&info.federation)?;
        let key_path = dir.join(CA_KEY_FILE);
        files::check_private_mode(&key_path)?;
        let key_pem = files::read_string(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| Error::Invalid {
            path: key_path.clone(),
            why: format!("bad CA key: {e}"),
        })?;
        let cert_path = dir.join(CA_CERT_FILE);
        let cert = files::read_one_cert(&cert_path)?;
        let cert_pem = files::read_string(&cert_path)?;
        {
            let (_, parsed) =
                x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| Error::Invalid {
                    path: cert_path.clone(),
                    why: e.to_string(),
                })?;
            if !parsed.is_ca() {
                return Err(Error::Invalid {
                    path: cert_path.clone(),
                    why: "not a CA certificate".into(),
                });
            }
            if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(Error::Invalid {
                    path: key_path,
                    why: format!("does not match {}", cert_path.display()),
                });
            }
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(Self {
            dir,
            info,
            cert,
            cert_pem,
            issuer,
        })
    }

    /// The federation name.
    pub fn federation(&self) -> &str {
        &self.info.federation
    }

    /// The federation settings.
    pub fn info(&self) -> &FederationInfo {
        &self.info
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Path of the provisioning manifest (`sites.toml`).
    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join(SITES_FILE)
    }

    /// Path of the federation's record of the coordinator's audit public
    /// key ([`COORDINATOR_AUDIT_KEY_FILE`]).
    pub fn coordinator_audit_key_path(&self) -> PathBuf {
        self.dir.join(COORDINATOR_AUDIT_KEY_FILE)
    }

    /// Keep a copy of the coordinator kit's audit public key in the CA
    /// directory: the key an auditor verifies the coordinator's audit log
    /// with, held by the federation's operators rather than next to the log
    /// on the coordinator host (where whoever can rewrite the log could
    /// also replace the key).
    fn record_coordinator_audit_key(&self, kit_dir: &Path) -> Result<(), Error> {
        let src = kit_dir.join(UPDATE_PUBLIC_KEY_FILE);
        let pem = fs::read(&src).map_err(io_err(&src))?;
        files::replace_public(&self.coordinator_audit_key_path(), &pem)
    }

    /// Path of the revocation list (`revoked.toml`).
    pub fn revoked_path(&self) -> PathBuf {
        self.dir.join(REVOKED_FILE)
    }

    /// Path of the audit register (`issued.toml`).
    pub fn issued_path(&self) -> PathBuf {
        self.dir.join(ISSUED_FILE)
    }

    /// Set (or with `None` clear) the most training examples an update of
    /// site `name` may claim: `max_examples` of its entry in `sites.toml`.
    /// A running coordinator applies it when it reloads the manifest.
    pub fn set_site_max_examples(
        &self,
        name: &str,
        max_examples: Option<u64>,
    ) -> Result<(), Error> {
        let path = self.manifest_path();
        let mut m = SiteManifest::load(&path)?;
        let entry = m
            .get_mut(name)
            .ok_or_else(|| Error::Refused(format!("site {name} is not in {}", path.display())))?;
        entry.max_examples = max_examples;
        m.save(&path)
    }

    /// Issue a site kit into `out_dir` (which must not exist or be empty):
    /// TLS certificate and key, a separate ed25519 update-signing key and
    /// its public key, the CA certificate, `kit.toml`. Adds the site to
    /// `sites.toml`.
    pub fn issue_site(
        &self,
        name: &str,
        out_dir: &Path,
        validity: Validity,
        coordinator_addr: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<IssuedKit, Error> {
        self.issue(
            KitRequest {
                identity: Identity::new(self.federation(), Role::Site, name)?,
                out_dir,
                validity,
                server_names: &[],
                coordinator_addr,
            },
            now,
        )
    }

    /// Issue an admin kit into `out_dir` (no update key).
    pub fn issue_admin(
        &self,
        name: &str,
        out_dir: &Path,
        validity: Validity,
        coordinator_addr: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<IssuedKit, Error> {
        self.issue(
            KitRequest {
                identity: Identity::new(self.federation(), Role::Admin, name)?,
                out_dir,
                validity,
                server_names: &[],
                coordinator_addr,
            },
            now,
        )
    }

    /// Issue the coordinator's kit into `out_dir`, with `server_names` (DNS
    /// names, IP addresses) in its certificate.
    pub fn issue_coordinator(
        &self,
        out_dir: &Path,
        server_names: &[String],
        validity: Validity,
        now: OffsetDateTime,
    ) -> Result<IssuedKit, Error> {
        if server_names.is_empty() {
            return Err(Error::Refused(
                "the coordinator certificate needs at least one DNS name or IP address".into(),
            ));
        }
        self.issue(
            KitRequest {
                identity: Identity::new(self.federation(), Role::Coordinator, COORDINATOR_NAME)?,
                out_dir,
                validity,
                server_names,
                coordinator_addr: None,
            },
            now,
        )
    }

    fn issue(&self, req: KitRequest<'_>, now: OffsetDateTime) -> Result<IssuedKit, Error> {
        let _lock = DirLock::acquire(&self.dir)?;
        let mut issued = IssuedFile::load(&self.issued_path())?;
        if issued.cert.iter().any(|r| r.identity == req.identity) {
            return Err(Error::Refused(format!(
                "{} was already issued (see {}); names are not reused: renew the existing kit \
                 with `fedlink certs renew`, or pick a new name",
                req.identity,
                self.issued_path().display()
            )));
        }
        let mut manifest = match req.identity.role() {
            Role::Site => {
                let m = SiteManifest::load(&self.manifest_path())?;
                if m.get(req.identity.name()).is_some() {
                    return Err(Error::Refused(format!(
                        "site {} is already in {}",
                        req.identity.name(),
                        self.manifest_path().display()
                    )));
                }
                Some(m)
            }
            _ => None,
        };

        let out_dir = req.out_dir;
        if out_dir.exists()
            && fs::read_dir(out_dir)
                .map_err(io_err(out_dir))?
                .next()
                .is_some()
        {
            return Err(Error::AlreadyExists {
                path: out_dir.to_path_buf(),
            });
        }
        let key = new_tls_key()?;
        let cert = leaf_params(&req.identity, req.validity, req.server_names)?
            .signed_by(&key, &self.issuer)?;
        let cert_der = cert.der().clone();
        let cert_info = CertInfo::from_der(&cert_der)?;
        // Sites sign their updates and audit logs with it; the coordinator
        // signs its audit log.
        let update_key = matches!(req.identity.role(), Role::Site | Role::Coordinator)
            .then(|| SigningKey::generate(&mut OsRng));

        let info = KitInfo {
            format: KIT_FORMAT,
            federation: self.federation().to_owned(),
            role: req.identity.role(),
            name: req.identity.name().to_owned(),
            coordinator_addr: req
                .coordinator_addr
                .unwrap_or(&self.info.coordinator_addr)
                .to_owned(),
            coordinator_server_name: self.info.coordinator_server_name.clone(),
            ca_cert: CA_CERT_FILE.into(),
            cert: CERT_FILE.into(),
            key: KEY_FILE.into(),
            update_key: update_key.as_ref().map(|_| UPDATE_KEY_FILE.into()),
            update_public_key: update_key.as_ref().map(|_| UPDATE_PUBLIC_KEY_FILE.into()),
        };

        // Write everything into a staging directory next to the target, then
        // rename it into place: a kit is either complete or absent.
        let staging = files::sibling(out_dir, "partial");
        files::create_private_dir(&staging)?;
        let written = (|| -> Result<(), Error> {
            files::write_public(&staging.join(CA_CERT_FILE), self.cert_pem.as_bytes())?;
            files::write_public(&staging.join(CERT_FILE), cert.pem().as_bytes())?;
            files::write_secret(&staging.join(KEY_FILE), key.serialize_pem().as_bytes())?;
            if let Some(uk) = &update_key {
                let pem = uk
                    .to_pkcs8_pem(LineEnding::LF)
                    .map_err(|e| Error::Refused(format!("cannot encode the update key: {e}")))?;
                files::write_secret(&staging.join(UPDATE_KEY_FILE), pem.as_bytes())?;
                let public = uk
                    .verifying_key()
                    .to_public_key_pem(LineEnding::LF)
                    .map_err(|e| {
                        Error::Refused(format!("cannot encode the update public key: {e}"))
                    })?;
                files::write_public(&staging.join(UPDATE_PUBLIC_KEY_FILE), public.as_bytes())?;
            }
            let kit_toml = staging.join(KIT_FILE);
            files::write_public(&kit_toml, files::to_toml(&info, &kit_toml)?.as_bytes())?;
            if out_dir.exists() {
                // Known empty (checked above): replace it.
                fs::remove_dir(out_dir).map_err(io_err(out_dir))?;
            }
            // Rename into place and fsync the parent: the kit survives a crash.
            files::install(&staging, out_dir).map_err(|e| {
                if out_dir.exists() {
                    Error::AlreadyExists {
                        path: out_dir.to_path_buf(),
                    }
                } else {
                    e
                }
            })
        })();
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }

        // Sanity: the kit loads (identity, chain, key match, modes).
        Kit::load(out_dir)?;
        if req.identity.role() == Role::Coordinator {
            self.record_coordinator_audit_key(out_dir)?;
        }

        issued.cert.push(IssuedRecord {
            serial: cert_info.serial.clone(),
            fingerprint: cert_info.fingerprint,
            identity: req.identity.clone(),
            not_before: rfc3339(cert_info.not_before),
            not_after: rfc3339(cert_info.not_after),
            issued_at: rfc3339(now),
            kit_dir: out_dir.display().to_string(),
            renews: None,
        });
        issued.save(&self.issued_path())?;
        let update_public_key = update_key.map(|k| hex::encode(k.verifying_key().as_bytes()));
        if let (Some(m), Some(pk)) = (manifest.as_mut(), &update_public_key) {
            m.site.push(SiteEntry {
                name: req.identity.name().to_owned(),
                identity: req.identity.clone(),
                cert_serial: cert_info.serial.clone(),
                cert_fingerprint: cert_info.fingerprint,
                update_public_key: pk.clone(),
                added_at: rfc3339(now),
                renewed_at: None,
                max_examples: None,
            });
            m.save(&self.manifest_path())?;
        }
        Ok(IssuedKit {
            dir: out_dir.to_path_buf(),
            identity: req.identity,
            serial: cert_info.serial,
            fingerprint: cert_info.fingerprint,
            update_public_key,
        })
    }

    /// Renew the certificate of the kit in `kit_dir` (identity `name` with
    /// `role`): a new TLS key and certificate for the same identity under the
    /// same CA. The update key is kept. The old `cert.pem` / `key.pem` are
    /// kept as `cert.<old serial>.pem.bak` / `key.<old serial>.pem.bak`
    /// (hard links, so the key keeps mode 0600) and the new files are renamed
    /// into place. `sites.toml` gets the new fingerprint, `issued.toml` a new
    /// record. A revoked certificate is only renewed with `reinstate`.
    pub fn renew(
        &self,
        kit_dir: &Path,
        name: &str,
        role: Role,
        validity: Validity,
        reinstate: bool,
        now: OffsetDateTime,
    ) -> Result<RenewReport, Error> {
        let identity = Identity::new(self.federation(), role, name)?;
        let kit = Kit::load(kit_dir)?;
        if kit.identity() != &identity {
            return Err(Error::Refused(format!(
                "{} holds {}, not {identity}",
                kit_dir.display(),
                kit.identity()
            )));
        }
        if kit.ca_cert() != &self.cert {
            return Err(Error::Refused(format!(
                "{} was not issued by the CA in {}",
                kit_dir.display(),
                self.dir.display()
            )));
        }
        let _lock = DirLock::acquire(&self.dir)?;
        let old = kit.cert_info().clone();
        let revoked = RevokedFile::load(&self.revoked_path())?;
        let is_revoked = revoked.revoked.iter().any(|e| {
            e.serial.as_ref() == Some(&old.serial) || e.fingerprint == Some(old.fingerprint)
        });
        if is_revoked && !reinstate {
            return Err(Error::Refused(format!(
                "the current certificate of {identity} (serial {}) is revoked; renewing would \
                 restore its access. Pass --reinstate if that is intended",
                old.serial
            )));
        }
        let mut manifest = match role {
            Role::Site => {
                let m = SiteManifest::load(&self.manifest_path())?;
                let entry = m.get(name).ok_or_else(|| {
                    Error::Refused(format!(
                        "site {name} is not in {}",
                        self.manifest_path().display()
                    ))
                })?;
                if entry.cert_fingerprint != old.fingerprint {
                    return Err(Error::Refused(format!(
                        "{} does not hold the current certificate of site {name} (manifest \
                         fingerprint {}, kit {}); renew the current kit",
                        kit_dir.display(),
                        entry.cert_fingerprint,
                        old.fingerprint
                    )));
                }
                Some(m)
            }
            _ => None,
        };

        let key = new_tls_key()?;
        let cert =
            leaf_params(&identity, validity, &old.server_names)?.signed_by(&key, &self.issuer)?;
        let cert_info = CertInfo::from_der(cert.der())?;

        let info = kit.info();
        let cert_path = kit_dir.join(&info.cert);
        let key_path = kit_dir.join(&info.key);
        let new_cert = files::sibling(&cert_path, "new");
        let new_key = files::sibling(&key_path, "new");
        let cert_bak = kit_dir.join(format!("cert.{}.pem.bak", old.serial));
        let key_bak = kit_dir.join(format!("key.{}.pem.bak", old.serial));
        let result = (|| -> Result<(), Error> {
            files::write_public(&new_cert, cert.pem().as_bytes())?;
            files::write_secret(&new_key, key.serialize_pem().as_bytes())?;
            // hard_link fails if the backup exists: nothing is overwritten.
            fs::hard_link(&cert_path, &cert_bak).map_err(io_err(&cert_bak))?;
            fs::hard_link(&key_path, &key_bak).map_err(io_err(&key_bak))?;
            files::install(&new_key, &key_path)?;
            files::install(&new_cert, &cert_path)?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&new_cert);
            let _ = fs::remove_file(&new_key);
            return Err(e);
        }
        // Coordinator kits issued before coordinators signed their audit log
        // get the key now (never replacing an existing one).
        if role == Role::Coordinator && kit.update_signing_key().is_none() {
            add_audit_key(kit_dir, kit.info())?;
            self.record_coordinator_audit_key(kit_dir)?;
        }
        drop(kit);
        let kit = Kit::load(kit_dir)?;

        let mut issued = IssuedFile::load(&self.issued_path())?;
        issued.cert.push(IssuedRecord {
            serial: cert_info.serial.clone(),
            fingerprint: cert_info.fingerprint,
            identity: identity.clone(),
            not_before: rfc3339(cert_info.not_before),
            not_after: rfc3339(cert_info.not_after),
            issued_at: rfc3339(now),
            kit_dir: kit_dir.display().to_string(),
            renews: Some(old.serial.clone()),
        });
        issued.save(&self.issued_path())?;
        let mut update_public_key = None;
        if let Some(m) = manifest.as_mut() {
            if let Some(entry) = m.get_mut(name) {
                entry.cert_serial = cert_info.serial.clone();
                entry.cert_fingerprint = cert_info.fingerprint;
                entry.renewed_at = Some(rfc3339(now));
                update_public_key = Some(entry.update_public_key.clone());
            }
            m.save(&self.manifest_path())?;
        }
        Ok(RenewReport {
            kit: IssuedKit {
                dir: kit.dir().to_path_buf(),
                identity,
                serial: cert_info.serial,
                fingerprint: cert_info.fingerprint,
                update_public_key,
            },
            old_serial: old.serial,
            backups: vec![cert_bak, key_bak],
        })
    }

    /// Revoke every issued certificate matching `selector`: an entity name
    /// (all its certificates, optionally only of `role`), a serial, or a
    /// SHA-256 fingerprint. Appends to `revoked.toml` and returns the new
    /// entries (already revoked certificates are skipped). Running
    /// coordinators pick the change up on their next
    /// [`RevocationList::reload`](crate::RevocationList::reload).
    pub fn revoke(
        &self,
        selector: &str,
        role: Option<Role>,
        reason: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Vec<RevokedEntry>, Error> {
        let _lock = DirLock::acquire(&self.dir)?;
        let issued = IssuedFile::load(&self.issued_path())?;
        let serial = selector.parse::<Serial>().ok();
        let fingerprint = selector.parse::<Fingerprint>().ok();
        let matches: Vec<&IssuedRecord> = issued
            .cert
            .iter()
            .filter(|r| {
                r.identity.name() == selector
                    || Some(&r.serial) == serial.as_ref()
                    || Some(r.fingerprint) == fingerprint
            })
            .filter(|r| role.is_none_or(|role| r.identity.role() == role))
            .collect();
        if matches.is_empty() {
            return Err(Error::Refused(format!(
                "no issued certificate matches {selector:?} (see {})",
                self.issued_path().display()
            )));
        }
        let mut file = RevokedFile::load(&self.revoked_path())?;
        let mut added = Vec::new();
        for r in matches {
            let already = file.revoked.iter().any(|e| {
                e.serial.as_ref() == Some(&r.serial) || e.fingerprint == Some(r.fingerprint)
            });
            if already {
                continue;
            }
            let entry = RevokedEntry {
                serial: Some(r.serial.clone()),
                fingerprint: Some(r.fingerprint),
                identity: Some(r.identity.clone()),
                reason: reason.map(str::to_owned),
                revoked_at: Some(rfc3339(now)),
                update_public_key: None,
            };
            file.revoked.push(entry.clone());
            added.push(entry);
        }
        file.save(&self.revoked_path())?;
        Ok(added)
    }
}

/// Give a coordinator kit without one an ed25519 audit-log key: write the
/// key files (refusing to overwrite), then replace `kit.toml` atomically.
fn add_audit_key(kit_dir: &Path, info: &KitInfo) -> Result<(), Error> {
    let key = SigningKey::generate(&mut OsRng);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| Error::Refused(format!("cannot encode the audit key: {e}")))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| Error::Refused(format!("cannot encode the audit public key: {e}")))?;
    files::write_secret(&kit_dir.join(UPDATE_KEY_FILE), pem.as_bytes())?;
    files::write_public(&kit_dir.join(UPDATE_PUBLIC_KEY_FILE), public.as_bytes())?;
    let mut info = info.clone();
    info.update_key = Some(UPDATE_KEY_FILE.into());
    info.update_public_key = Some(UPDATE_PUBLIC_KEY_FILE.into());
    let kit_toml = kit_dir.join(KIT_FILE);
    files::replace_public(&kit_toml, files::to_toml(&info, &kit_toml)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RevocationList;

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn setup() -> (tempfile::TempDir, CertificateAuthority, InitReport) {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = InitOptions::new("fed", dir.path());
        opts.server_names = vec!["coord.example".into(), "127.0.0.1".into(), "::1".into()];
        let (ca, report) = CertificateAuthority::init(&opts, now()).unwrap();
        (dir, ca, report)
    }

    fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                all_files(&p, out);
            } else {
                out.push(p);
            }
        }
    }

    #[test]
    fn init_layout_and_kits() {
        let (dir, ca, report) = setup();
        for f in [
            CA_CERT_FILE,
            CA_KEY_FILE,
            FEDERATION_FILE,
            ISSUED_FILE,
            REVOKED_FILE,
            SITES_FILE,
        ] {
            assert!(report.ca_dir.join(f).is_file(), "{f} missing");
        }
        assert_eq!(ca.info().coordinator_server_name, "coord.example");
        assert_eq!(ca.info().coordinator_addr, "coord.example:4433");
        let coord = Kit::load(&report.coordinator_kit).unwrap();
        assert_eq!(
            coord.identity().to_uri(),
            "fedlink://fed/coordinator/coordinator"
        );
        assert_eq!(
            coord.cert_info().server_names,
            vec!["coord.example".to_owned(), "127.0.0.1".into(), "::1".into()]
        );
        let admin = Kit::load(&report.admin_kit).unwrap();
        assert_eq!(admin.identity().role(), Role::Admin);
        assert!(admin.update_signing_key().is_none());
        assert_eq!(report.admin_kit, dir.path().join("admins/admin"));
        let issued = IssuedFile::load(&ca.issued_path()).unwrap();
        assert_eq!(issued.cert.len(), 2);
        // A second init into the same directory is refused.
        let err =
            CertificateAuthority::init(&InitOptions::new("fed", dir.path()), now()).unwrap_err();
        assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    }

    #[test]
    #[cfg(unix)]
    fn key_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, ca, _) = setup();
        let site = dir.path().join("sites/a");
        ca.issue_site(
            "a",
            &site,
            Validity::days_from(now(), 1).unwrap(),
            None,
            now(),
        )
        .unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca.dir().join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&site.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&site.join(UPDATE_KEY_FILE)), 0o600);
        assert_eq!(mode(&site), 0o700);
        assert_eq!(mode(&dir.path().join("coordinator").join(KEY_FILE)), 0o600);

        // A key readable by the group makes the kit refuse to load.
        fs::set_permissions(
            site.join(UPDATE_KEY_FILE),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        assert!(matches!(
            Kit::load(&site).unwrap_err(),
            Error::KeyFileTooOpen { .. }
        ));
        fs::set_permissions(
            site.join(UPDATE_KEY_FILE),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        fs::set_permissions(site.join(KEY_FILE), fs::Permissions::from_mode(0o604)).unwrap();
        assert!(matches!(
            Kit::load(&site).unwrap_err(),
            Error::KeyFileTooOpen { .. }
        ));
        // And the CA refuses to open with a world-readable key.
        fs::set_permissions(
            ca.dir().join(CA_KEY_FILE),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(
            CertificateAuthority::open(ca.dir()).unwrap_err(),
            Error::KeyFileTooOpen { .. }
        ));
    }

    #[test]
    fn never_overwrites() {
        let (dir, ca, report) = setup();
        let v = Validity::days_from(now(), 1).unwrap();
        let site = dir.path().join("sites/a");
        ca.issue_site("a", &site, v, None, now()).unwrap();
        let before: Vec<Vec<u8>> = [KEY_FILE, CERT_FILE, UPDATE_KEY_FILE]
            .iter()
            .map(|f| fs::read(site.join(f)).unwrap())
            .collect();
        // Another site into the same (non-empty) directory: refused.
        let err = ca.issue_site("b", &site, v, None, now()).unwrap_err();
        assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
        // The same name again: refused (names are not reused).
        let err = ca
            .issue_site("a", &dir.path().join("elsewhere"), v, None, now())
            .unwrap_err();
        assert!(matches!(err, Error::Refused(_)), "{err}");
        assert!(!dir.path().join("elsewhere").exists());
        // Over the admin kit: refused.
        let err = ca
            .issue_admin("other", &report.admin_kit, v, None, now())
            .unwrap_err();
        assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
        let after: Vec<Vec<u8>> = [KEY_FILE, CERT_FILE, UPDATE_KEY_FILE]
            .iter()
            .map(|f| fs::read(site.join(f)).unwrap())
            .collect();
        assert_eq!(before, after);
        // An existing empty directory is fine.
        let empty = dir.path().join("sites/c");
        fs::create_dir_all(&empty).unwrap();
        ca.issue_site("c", &empty, v, None, now()).unwrap();
        // No staging directories are left behind.
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("sites"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn ca_key_never_in_kits() {
        let (dir, ca, _) = setup();
        let v = Validity::days_from(now(), 1).unwrap();
        ca.issue_site("a", &dir.path().join("sites/a"), v, None, now())
            .unwrap();
        ca.issue_admin("bob", &dir.path().join("admins/bob"), v, None, now())
            .unwrap();
        let ca_key_pem = fs::read_to_string(ca.dir().join(CA_KEY_FILE)).unwrap();
        let ca_key = KeyPair::from_pem(&ca_key_pem).unwrap();
        let ca_key_der = ca_key.serialized_der().to_vec();
        let body: String = ca_key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let mut kit_files = Vec::new();
        for kit in ["coordinator", "admins", "sites"] {
            all_files(&dir.path().join(kit), &mut kit_files);
        }
        assert!(kit_files.len() >= 15, "{kit_files:?}");
        for f in &kit_files {
            let bytes = fs::read(f).unwrap();
            let text = String::from_utf8_lossy(&bytes).replace(['\n', '\r'], "");
            assert!(!text.contains(&body), "{} contains the CA key", f.display());
            assert!(
                !bytes
                    .windows(ca_key_der.len())
                    .any(|w| w == ca_key_der.as_slice()),
                "{} contains the CA key (DER)",
                f.display()
            );
            assert_ne!(f.file_name().unwrap(), CA_KEY_FILE);
        }
        // A kit that holds a CA key file is refused.
        let site = dir.path().join("sites/a");
        fs::copy(ca.dir().join(CA_KEY_FILE), site.join(CA_KEY_FILE)).unwrap();
        let err = Kit::load(&site).unwrap_err();
        assert!(err.to_string().contains("CA private key"), "{err}");
    }

    #[test]
    fn site_kit_contents_and_manifest() {
        let (dir, ca, _) = setup();
        let site = dir.path().join("sites/st-mary");
        let issued = ca
            .issue_site(
                "st-mary",
                &site,
                Validity::days_from(now(), 10).unwrap(),
                Some("coord.example:9000"),
                now(),
            )
            .unwrap();
        let kit = Kit::load(&site).unwrap();
        assert_eq!(kit.identity().to_uri(), "fedlink://fed/site/st-mary");
        assert_eq!(kit.coordinator_addr(), "coord.example:9000");
        assert_eq!(kit.coordinator_server_name(), "coord.example");
        assert_eq!(kit.ca_cert(), ca.cert());
        let update_key = kit.update_signing_key().unwrap();
        assert_ne!(
            update_key.to_bytes().as_slice(),
            kit.private_key().secret_der(),
            "update key must be separate from the TLS key"
        );

        let manifest = SiteManifest::load(&ca.manifest_path()).unwrap();
        assert_eq!(manifest.federation, "fed");
        let entry = manifest.get("st-mary").unwrap();
        assert_eq!(entry.identity, *kit.identity());
        assert_eq!(entry.cert_fingerprint, kit.cert_info().fingerprint);
        assert_eq!(entry.cert_serial, issued.serial);
        assert_eq!(
            entry.update_verifying_key().unwrap(),
            update_key.verifying_key()
        );
        assert_eq!(
            manifest.check_peer(&kit.cert_chain()[0]).unwrap().name,
            "st-mary"
        );

        // Round trip through the file.
        let copy = dir.path().join("copy.toml");
        manifest.save(&copy).unwrap();
        assert_eq!(SiteManifest::load(&copy).unwrap(), manifest);

        // Tampered manifests are refused with a reason.
        let text = fs::read_to_string(&copy).unwrap();
        fs::write(&copy, text.replace("site/st-mary", "site/other")).unwrap();
        assert!(
            SiteManifest::load(&copy)
                .unwrap_err()
                .to_string()
                .contains("does not match")
        );
        fs::write(&copy, text.replace(&entry.update_public_key, "00")).unwrap();
        assert!(SiteManifest::load(&copy).is_err());
        fs::write(&copy, format!("{text}\nextra = 1\n")).unwrap();
        assert!(SiteManifest::load(&copy).is_err());
    }

    #[test]
    fn site_max_examples_is_optional_kept_and_never_zero() {
        let (dir, ca, _) = setup();
        let v = Validity::days_from(now(), 1).unwrap();
        ca.issue_site("a", &dir.path().join("sites/a"), v, None, now())
            .unwrap();
        // Absent by default, and then not written (older manifests load).
        let path = ca.manifest_path();
        assert_eq!(
            SiteManifest::load(&path).unwrap().site[0].max_examples,
            None
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("max_examples"), "{text}");

        ca.set_site_max_examples("a", Some(5_000)).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("max_examples = 5000"), "{text}");
        let m = SiteManifest::load(&path).unwrap();
        assert_eq!(m.get("a").unwrap().max_examples, Some(5_000));

        // 0 would refuse every update: refused when written and when read.
        assert!(ca.set_site_max_examples("a", Some(0)).is_err());
        fs::write(
            &path,
            text.replace("max_examples = 5000", "max_examples = 0"),
        )
        .unwrap();
        let err = SiteManifest::load(&path).unwrap_err().to_string();
        assert!(err.contains("max_examples"), "{err}");
        // Not a number: refused with the key's name.
        fs::write(
            &path,
            text.replace("max_examples = 5000", "max_examples = -3"),
        )
        .unwrap();
        assert!(SiteManifest::load(&path).is_err());
        fs::write(&path, &text).unwrap();
        ca.set_site_max_examples("a", None).unwrap();
        assert_eq!(
            SiteManifest::load(&path).unwrap().site[0].max_examples,
            None
        );
        assert!(ca.set_site_max_examples("nobody", Some(1)).is_err());
    }

    #[test]
    fn renew_keeps_identity_and_update_key() {
        let (dir, ca, report) = setup();
        let site = dir.path().join("sites/a");
        let v = Validity::days_from(now(), 1).unwrap();
        let first = ca.issue_site("a", &site, v, None, now()).unwrap();
        let old = Kit::load(&site).unwrap();
        let old_update = fs::read(site.join(UPDATE_KEY_FILE)).unwrap();
        let old_cert = fs::read(site.join(CERT_FILE)).unwrap();
        let old_key = fs::read(site.join(KEY_FILE)).unwrap();
        // A copy of the kit as it is now (fs::copy keeps the modes).
        let stale = dir.path().join("stale");
        fs::create_dir(&stale).unwrap();
        for e in fs::read_dir(&site).unwrap() {
            let p = e.unwrap().path();
            fs::copy(&p, stale.join(p.file_name().unwrap())).unwrap();
        }

        // Wrong name or role: refused.
        assert!(ca.renew(&site, "b", Role::Site, v, false, now()).is_err());
        assert!(ca.renew(&site, "a", Role::Admin, v, false, now()).is_err());

        let later = Validity::days_from(now(), 30).unwrap();
        let report2 = ca
            .renew(&site, "a", Role::Site, later, false, now())
            .unwrap();
        assert_eq!(report2.old_serial, first.serial);
        let new = Kit::load(&site).unwrap();
        assert_eq!(new.identity(), old.identity());
        assert_ne!(new.cert_info().serial, old.cert_info().serial);
        assert_ne!(
            new.private_key().secret_der(),
            old.private_key().secret_der()
        );
        assert_eq!(fs::read(site.join(UPDATE_KEY_FILE)).unwrap(), old_update);
        assert_eq!(
            new.update_signing_key().unwrap().to_bytes(),
            old.update_signing_key().unwrap().to_bytes()
        );
        // Old pair kept as backups, byte for byte.
        assert_eq!(fs::read(&report2.backups[0]).unwrap(), old_cert);
        assert_eq!(fs::read(&report2.backups[1]).unwrap(), old_key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let m = fs::metadata(&report2.backups[1])
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(m, 0o600);
        }
        // Manifest has the new fingerprint, same update key; the old cert is superseded.
        let manifest = SiteManifest::load(&ca.manifest_path()).unwrap();
        let entry = manifest.get("a").unwrap();
        assert_eq!(entry.cert_fingerprint, new.cert_info().fingerprint);
        assert_eq!(entry.update_public_key, first.update_public_key.unwrap());
        assert!(entry.renewed_at.is_some());
        assert!(matches!(
            manifest.check_peer(&old.cert_chain()[0]).unwrap_err(),
            crate::PeerRejected::SupersededCertificate { .. }
        ));
        assert!(manifest.check_peer(&new.cert_chain()[0]).is_ok());
        let issued = IssuedFile::load(&ca.issued_path()).unwrap();
        assert_eq!(
            issued.cert.last().unwrap().renews.as_ref(),
            Some(&first.serial)
        );

        // Renewing the stale copy (no longer the current certificate) is refused.
        let err = ca
            .renew(&stale, "a", Role::Site, v, false, now())
            .unwrap_err();
        assert!(err.to_string().contains("current certificate"), "{err}");

        // Renew the coordinator: same server names.
        let coord_before = Kit::load(&report.coordinator_kit).unwrap();
        ca.renew(
            &report.coordinator_kit,
            COORDINATOR_NAME,
            Role::Coordinator,
            v,
            false,
            now(),
        )
        .unwrap();
        let coord_after = Kit::load(&report.coordinator_kit).unwrap();
        assert_eq!(
            coord_after.cert_info().server_names,
            coord_before.cert_info().server_names
        );
        // The coordinator's audit key is issued with the kit and kept.
        let audit_key = coord_before.update_signing_key().unwrap().verifying_key();
        assert_eq!(
            coord_after.update_signing_key().unwrap().verifying_key(),
            audit_key
        );

        // A coordinator kit from before audit keys: renewing adds one.
        let dir_c = &report.coordinator_kit;
        let mut info = coord_after.info().clone();
        info.update_key = None;
        info.update_public_key = None;
        let kit_toml = dir_c.join(KIT_FILE);
        fs::write(&kit_toml, files::to_toml(&info, &kit_toml).unwrap()).unwrap();
        fs::remove_file(dir_c.join(UPDATE_KEY_FILE)).unwrap();
        fs::remove_file(dir_c.join(UPDATE_PUBLIC_KEY_FILE)).unwrap();
        assert!(Kit::load(dir_c).unwrap().update_signing_key().is_none());
        ca.renew(dir_c, COORDINATOR_NAME, Role::Coordinator, v, false, now())
            .unwrap();
        let renewed = Kit::load(dir_c).unwrap();
        let new_key = renewed.update_signing_key().unwrap().verifying_key();
        assert_ne!(new_key, audit_key);
    }

    #[test]
    fn revoke_by_name_serial_fingerprint() {
        let (dir, ca, _) = setup();
        let v = Validity::days_from(now(), 1).unwrap();
        let a = ca
            .issue_site("a", &dir.path().join("sites/a"), v, None, now())
            .unwrap();
        let b = ca
            .issue_site("b", &dir.path().join("sites/b"), v, None, now())
            .unwrap();
        let c = ca
            .issue_admin("c", &dir.path().join("admins/c"), v, None, now())
            .unwrap();
        let list = RevocationList::load(ca.revoked_path()).unwrap();
        assert!(list.check(Some(&a.serial), &a.fingerprint).is_none());

        assert!(ca.revoke("nobody", None, None, now()).is_err());
        let added = ca.revoke("a", None, Some("stolen"), now()).unwrap();
        assert_eq!(added.len(), 1);
        assert_eq!(added[0].serial.as_ref(), Some(&a.serial));
        // Idempotent.
        assert!(ca.revoke("a", None, None, now()).unwrap().is_empty());
        ca.revoke(&b.serial.to_string(), None, None, now()).unwrap();
        ca.revoke(&c.fingerprint.to_string(), Some(Role::Admin), None, now())
            .unwrap();
        // Role filter that matches nothing.
        assert!(ca.revoke("a", Some(Role::Admin), None, now()).is_err());

        // Visible after reload only.
        assert!(list.check(Some(&a.serial), &a.fingerprint).is_none());
        list.reload().unwrap();
        for k in [&a, &b, &c] {
            assert!(list.check(Some(&k.serial), &k.fingerprint).is_some());
        }

        // Renewing a revoked site needs --reinstate.
        let err = ca
            .renew(
                &dir.path().join("sites/a"),
                "a",
                Role::Site,
                v,
                false,
                now(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("revoked"), "{err}");
        ca.renew(&dir.path().join("sites/a"), "a", Role::Site, v, true, now())
            .unwrap();
    }

    #[test]
    fn tampered_kits_are_refused() {
        let (dir, ca, _) = setup();
        let v = Validity::days_from(now(), 1).unwrap();
        let a = dir.path().join("sites/a");
        let b = dir.path().join("sites/b");
        ca.issue_site("a", &a, v, None, now()).unwrap();
        ca.issue_site("b", &b, v, None, now()).unwrap();
        let kit_toml = fs::read_to_string(a.join(KIT_FILE)).unwrap();
        let check = |text: String, expect: &str| {
            fs::write(a.join(KIT_FILE), text).unwrap();
            let err = Kit::load(&a).unwrap_err().to_string();
            assert!(err.contains(expect), "{err}");
            fs::write(a.join(KIT_FILE), &kit_toml).unwrap();
        };
        check(
            kit_toml.replace("name = \"a\"", "name = \"b\""),
            "does not match",
        );
        check(
            kit_toml.replace("role = \"site\"", "role = \"admin\""),
            "does not match",
        );
        check(
            kit_toml.replace("cert = \"cert.pem\"", "cert = \"../b/cert.pem\""),
            "plain file name",
        );
        check(
            kit_toml.replace("format = 1", "format = 2"),
            "unsupported format",
        );
        check(format!("{kit_toml}unknown = 1\n"), "unknown field");
        Kit::load(&a).unwrap();

        // Another site's TLS key or update key in place of this one's.
        let swap = |file: &str, expect: &str| {
            let mine = a.join(file);
            let orig = fs::read(&mine).unwrap();
            fs::remove_file(&mine).unwrap();
            files::write_secret(&mine, &fs::read(b.join(file)).unwrap()).unwrap();
            let err = Kit::load(&a).unwrap_err().to_string();
            assert!(err.contains(expect), "{err}");
            fs::remove_file(&mine).unwrap();
            files::write_secret(&mine, &orig).unwrap();
        };
        swap(KEY_FILE, "does not match");
        swap(UPDATE_KEY_FILE, "does not match");
        // A certificate from another CA with this kit's CA file.
        let (other, _) =
            CertificateAuthority::init(&InitOptions::new("fed", dir.path().join("other")), now())
                .unwrap();
        let c = dir.path().join("other/sites/a");
        other.issue_site("a", &c, v, None, now()).unwrap();
        fs::remove_file(c.join(CA_CERT_FILE)).unwrap();
        fs::copy(a.join(CA_CERT_FILE), c.join(CA_CERT_FILE)).unwrap();
        let err = Kit::load(&c).unwrap_err().to_string();
        assert!(err.contains("signature does not verify"), "{err}");
        Kit::load(&a).unwrap();
    }

    #[test]
    fn validity_rules() {
        assert!(Validity::days_from(now(), 0).is_err());
        assert!(Validity::days_from(now(), 40_000).is_err());
        assert!(Validity::new(now(), now() - Duration::days(1)).is_err());
        let v = Validity::days_from(now(), 2).unwrap();
        assert!(v.not_before() < now() && v.not_after() > now());
    }
}
