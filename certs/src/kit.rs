//! Startup kits: the directory a coordinator, site or admin runs from.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::Error;
use crate::certinfo::CertInfo;
use crate::files;
use crate::identity::{Identity, Role, validate_name};

/// Current format version of `kit.toml`.
pub const KIT_FORMAT: u32 = 1;
/// File name of a kit's description.
pub const KIT_FILE: &str = "kit.toml";
/// Default file name of the federation CA certificate in a kit.
pub const CA_CERT_FILE: &str = "ca.pem";
/// Default file name of the TLS certificate in a kit.
pub const CERT_FILE: &str = "cert.pem";
/// Default file name of the TLS private key in a kit (mode 0600).
pub const KEY_FILE: &str = "key.pem";
/// Default file name of a site's ed25519 update-signing key (PKCS#8 PEM, 0600).
pub const UPDATE_KEY_FILE: &str = "update-key.pem";
/// Default file name of a site's ed25519 update public key (SPKI PEM).
pub const UPDATE_PUBLIC_KEY_FILE: &str = "update-key.pub.pem";

/// `kit.toml`: what a kit is and where its files are (names relative to the
/// kit directory; plain file names only).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KitInfo {
    /// Format version, [`KIT_FORMAT`].
    pub format: u32,
    /// Federation name.
    pub federation: String,
    /// Role of the kit's identity.
    pub role: Role,
    /// Entity name.
    pub name: String,
    /// Where the coordinator is reached (`host:port`); for the coordinator's
    /// own kit, the address it is advertised at.
    pub coordinator_addr: String,
    /// The name clients verify in the coordinator's certificate (TLS SNI).
    pub coordinator_server_name: String,
    /// CA certificate file.
    pub ca_cert: String,
    /// TLS certificate file (end entity first).
    pub cert: String,
    /// TLS private key file.
    pub key: String,
    /// ed25519 signing key file: a site's update key, or the coordinator's
    /// audit-log key (absent in admin kits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_key: Option<String>,
    /// Its ed25519 public key file (sites and coordinator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_public_key: Option<String>,
}

impl KitInfo {
    /// The identity this kit claims.
    pub fn identity(&self) -> Result<Identity, Error> {
        Ok(Identity::new(&self.federation, self.role, &self.name)?)
    }
}

/// Refuse anything but a plain file name (no directories, no `..`).
fn plain_file_name<'a>(dir: &Path, field: &str, name: &'a str) -> Result<&'a str, Error> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && Path::new(name).file_name().is_some_and(|n| n == name);
    if ok {
        Ok(name)
    } else {
        Err(Error::Kit {
            dir: dir.to_path_buf(),
            why: format!(
                "{KIT_FILE}: {field} = {name:?} must be a plain file name in the kit directory"
            ),
        })
    }
}

/// A loaded and cross-checked startup kit.
///
/// [`Kit::load`] checks that: `kit.toml` is valid; private key files are not
/// readable by group or others; the certificate carries exactly the identity
/// `kit.toml` claims; it was signed by the kit's CA certificate; the TLS key
/// matches the certificate; the TLS key is not the CA's key; a site kit has
/// an ed25519 update key matching its public key file. It does **not** refuse
/// an expired certificate (the peer will; see [`Kit::cert_info`]).
pub struct Kit {
    dir: PathBuf,
    info: KitInfo,
    identity: Identity,
    ca_cert: CertificateDer<'static>,
    cert_chain: Vec<CertificateDer<'static>>,
    cert_info: CertInfo,
    key: PrivateKeyDer<'static>,
    update_key: Option<SigningKey>,
}

impl fmt::Debug for Kit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kit")
            .field("dir", &self.dir)
            .field("identity", &self.identity.to_uri())
            .field("serial", &self.cert_info.serial.to_string())
            .field("key", &"[secret]")
            .field("update_key", &self.update_key.as_ref().map(|_| "[secret]"))
            .finish_non_exhaustive()
    }
}

impl Kit {
    /// Load and validate the kit in `dir`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref();
        let kit_err = |why: String| Error::Kit {
            dir: dir.to_path_buf(),
            why,
        };
        let info: KitInfo = files::read_toml(&dir.join(KIT_FILE))?;
        if info.format != KIT_FORMAT {
            return Err(kit_err(format!(
                "{KIT_FILE}: unsupported format {} (expected {KIT_FORMAT})",
                info.format
            )));
        }
        validate_name(&info.federation)?;
        validate_name(&info.name)?;
        let identity = info.identity()?;
        ServerName::try_from(info.coordinator_server_name.as_str()).map_err(|_| {
            kit_err(format!(
                "{KIT_FILE}: coordinator_server_name {:?} is not a DNS name or IP address",
                info.coordinator_server_name
            ))
        })?;

        let ca_path = dir.join(plain_file_name(dir, "ca_cert", &info.ca_cert)?);
        let cert_path = dir.join(plain_file_name(dir, "cert", &info.cert)?);
        let key_path = dir.join(plain_file_name(dir, "key", &info.key)?);

        let ca_cert = files::read_one_cert(&ca_path)?;
        let cert_chain = files::read_certs(&cert_path)?;
        let key = files::read_private_key(&key_path)?;
        let leaf = cert_chain
            .first()
            .ok_or_else(|| kit_err("no certificate".into()))?;

        // Identity in the certificate == identity in kit.toml.
        let cert_info = CertInfo::from_der(leaf).map_err(|e| Error::Invalid {
            path: cert_path.clone(),
            why: e.to_string(),
        })?;
        if cert_info.identity != identity {
            return Err(kit_err(format!(
                "certificate identity {} does not match {KIT_FILE} ({identity})",
                cert_info.identity
            )));
        }

        // The certificate was issued by this kit's CA.
        check_issued_by(leaf, &ca_cert)
            .map_err(|why| kit_err(format!("{}: {why}", cert_path.display())))?;

        // The key matches the certificate, and is not the CA's key.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        CertifiedKey::from_der(cert_chain.clone(), key.clone_key(), &provider).map_err(|e| {
            kit_err(format!(
                "{} does not match {}: {e}",
                key_path.display(),
                cert_path.display()
            ))
        })?;
        if CertifiedKey::from_der(vec![ca_cert.clone()], key.clone_key(), &provider).is_ok() {
            return Err(kit_err(
                "the TLS key is the CA's private key; a kit must never hold it".into(),
            ));
        }
        if dir.join(crate::ca::CA_KEY_FILE).exists() {
            return Err(kit_err(format!(
                "contains {}; the CA private key must never be in a kit",
                crate::ca::CA_KEY_FILE
            )));
        }

        let update_key = match (identity.role(), &info.update_key) {
            (Role::Site | Role::Coordinator, Some(file)) => {
                let path = dir.join(plain_file_name(dir, "update_key", file)?);
                Some(load_update_key(&path, dir, &info)?)
            }
            (Role::Site, None) => {
                return Err(kit_err(format!(
                    "{KIT_FILE}: a site kit needs update_key (its ed25519 update-signing key)"
                )));
            }
            (_, Some(_)) => {
                return Err(kit_err(format!(
                    "{KIT_FILE}: only site and coordinator kits carry an update_key"
                )));
            }
            (_, None) => None,
        };

        if cert_info.not_after < time::OffsetDateTime::now_utc() {
            tracing::warn!(
                kit = %dir.display(),
                not_after = %cert_info.not_after,
                "kit certificate has expired; peers will refuse it (run `fedlink certs renew`)"
            );
        }

        Ok(Self {
            dir: dir.to_path_buf(),
            info,
            identity,
            ca_cert,
            cert_chain,
            cert_info,
            key,
            update_key,
        })
    }

    /// The kit directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `kit.toml`.
    pub fn info(&self) -> &KitInfo {
        &self.info
    }

    /// The kit's identity (checked against its certificate).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The federation CA certificate (the only trust anchor).
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca_cert
    }

    /// The TLS certificate chain, end entity first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    /// Serial, fingerprint and validity of the kit's certificate.
    pub fn cert_info(&self) -> &CertInfo {
        &self.cert_info
    }

    /// A copy of the TLS private key.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// The ed25519 signing key: a site's update key, or the coordinator's
    /// audit-log key (`None` for admin kits and for coordinator kits issued
    /// before coordinators had one).
    pub fn update_signing_key(&self) -> Option<&SigningKey> {
        self.update_key.as_ref()
    }

    /// Where the coordinator is reached (`host:port`).
    pub fn coordinator_addr(&self) -> &str {
        &self.info.coordinator_addr
    }

    /// The TLS server name to expect in the coordinator's certificate.
    pub fn coordinator_server_name(&self) -> &str {
        &self.info.coordinator_server_name
    }
}

fn load_update_key(path: &Path, dir: &Path, info: &KitInfo) -> Result<SigningKey, Error> {
    files::check_private_mode(path)?;
    let pem = files::read_string(path)?;
    let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| Error::Invalid {
        path: path.to_path_buf(),
        why: format!("not an ed25519 PKCS#8 PEM private key: {e}"),
    })?;
    if let Some(pub_file) = &info.update_public_key {
        let pub_path = dir.join(plain_file_name(dir, "update_public_key", pub_file)?);
        let pem = files::read_string(&pub_path)?;
        let public =
            ed25519_dalek::VerifyingKey::from_public_key_pem(&pem).map_err(|e| Error::Invalid {
                path: pub_path.clone(),
                why: format!("not an ed25519 public key PEM: {e}"),
            })?;
        if public != key.verifying_key() {
            return Err(Error::Kit {
                dir: dir.to_path_buf(),
                why: format!("{} does not match {}", pub_path.display(), path.display()),
            });
        }
    }
    Ok(key)
}

/// Check that `leaf` names `ca` as issuer and carries a valid signature by
/// `ca`'s key, and that `ca` is a CA certificate.
pub(crate) fn check_issued_by(
    leaf: &CertificateDer<'_>,
    ca: &CertificateDer<'_>,
) -> Result<(), String> {
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("bad certificate: {e}"))?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca.as_ref())
        .map_err(|e| format!("bad CA certificate: {e}"))?;
    if !ca.is_ca() {
        return Err("the kit's CA certificate is not a CA certificate".into());
    }
    if leaf.issuer().as_raw() != ca.subject().as_raw() {
        return Err(format!(
            "issued by {:?}, not by the kit's CA {:?}",
            leaf.issuer().to_string(),
            ca.subject().to_string()
        ));
    }
    leaf.verify_signature(Some(ca.public_key()))
        .map_err(|e| format!("signature does not verify with the kit's CA key: {e}"))
}
