//! The revocation list: `revoked.toml`, consulted on every handshake,
//! reloadable without restarting.
//!
//! ```toml
//! format = 1
//!
//! [[revoked]]
//! serial = "3f0a…"                # certificate serial (hex), and/or
//! fingerprint = "9b1c…"           # SHA-256 of the certificate DER (hex)
//! identity = "fedlink://fed/site/st-mary"   # informational
//! reason = "laptop stolen"                   # informational
//! revoked_at = "2025-01-01T00:00:00Z"        # informational
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls_pki_types::CertificateDer;

use crate::Error;
use crate::certinfo::{Fingerprint, Serial};
use crate::files;
use crate::identity::Identity;

/// Current format version of `revoked.toml`.
pub const REVOKED_FORMAT: u32 = 1;

/// One entry of `revoked.toml`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RevokedEntry {
    /// Serial of the revoked certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<Serial>,
    /// SHA-256 fingerprint of the revoked certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    /// Identity of the certificate (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    /// Why it was revoked (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When, RFC 3339 (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// The revoked site's ed25519 update public key (hex), when the site
    /// itself was revoked: such a key is not approved again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_public_key: Option<String>,
}

/// The whole `revoked.toml` file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedFile {
    /// Format version, [`REVOKED_FORMAT`].
    pub format: u32,
    /// Revoked certificates.
    #[serde(default)]
    pub revoked: Vec<RevokedEntry>,
}

impl Default for RevokedFile {
    fn default() -> Self {
        Self {
            format: REVOKED_FORMAT,
            revoked: Vec::new(),
        }
    }
}

impl RevokedFile {
    /// Read and validate `revoked.toml`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let file: Self = files::read_toml(path)?;
        if file.format != REVOKED_FORMAT {
            return Err(Error::Invalid {
                path: path.to_path_buf(),
                why: format!(
                    "unsupported format {} (expected {REVOKED_FORMAT})",
                    file.format
                ),
            });
        }
        if let Some(i) = file
            .revoked
            .iter()
            .position(|e| e.serial.is_none() && e.fingerprint.is_none())
        {
            return Err(Error::Invalid {
                path: path.to_path_buf(),
                why: format!("entry {} has neither serial nor fingerprint", i + 1),
            });
        }
        Ok(file)
    }

    /// Write atomically (temporary file + rename).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        files::replace_public(path, files::to_toml(self, path)?.as_bytes())
    }

    /// Whether an update public key (hex, any case) belongs to a revoked site.
    pub fn is_update_key_revoked(&self, update_public_key: &str) -> bool {
        self.revoked.iter().any(|e| {
            e.update_public_key
                .as_deref()
                .is_some_and(|k| k.eq_ignore_ascii_case(update_public_key))
        })
    }

    /// Whether a certificate (serial or fingerprint) is listed.
    pub fn lists(&self, serial: &Serial, fingerprint: &Fingerprint) -> bool {
        self.revoked
            .iter()
            .any(|e| e.serial.as_ref() == Some(serial) || e.fingerprint == Some(*fingerprint))
    }
}

#[derive(Debug, Default)]
struct Sets {
    serials: HashSet<Serial>,
    fingerprints: HashSet<Fingerprint>,
}

impl Sets {
    fn from_file(file: &RevokedFile) -> Self {
        let mut sets = Self::default();
        for e in &file.revoked {
            if let Some(s) = &e.serial {
                sets.serials.insert(s.clone());
            }
            if let Some(f) = e.fingerprint {
                sets.fingerprints.insert(f);
            }
        }
        sets
    }
}

/// Why a certificate counts as revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RevokedBy {
    /// Its serial number is listed.
    Serial,
    /// Its SHA-256 fingerprint is listed.
    Fingerprint,
}

/// In-memory revocation list backed by `revoked.toml`.
///
/// Share it as `Arc<RevocationList>` between the TLS server config and
/// whatever triggers [`RevocationList::reload`] (a signal, an admin command,
/// a timer): every new handshake sees the list as of its last reload.
#[derive(Debug)]
pub struct RevocationList {
    path: Option<PathBuf>,
    sets: RwLock<Sets>,
}

impl RevocationList {
    /// Load `revoked.toml`. A missing file is an error: an unreadable
    /// revocation list must not silently mean "nothing is revoked".
    pub fn load(path: impl Into<PathBuf>) -> Result<Arc<Self>, Error> {
        let path = path.into();
        let sets = Sets::from_file(&RevokedFile::load(&path)?);
        Ok(Arc::new(Self {
            path: Some(path),
            sets: RwLock::new(sets),
        }))
    }

    /// A list with nothing revoked and no backing file (`reload` is a no-op).
    pub fn empty() -> Arc<Self> {
        Arc::new(Self {
            path: None,
            sets: RwLock::new(Sets::default()),
        })
    }

    /// Re-read the backing file. On error the previous list stays in force
    /// and the error is returned. Returns the number of entries now loaded.
    pub fn reload(&self) -> Result<usize, Error> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let file = RevokedFile::load(path)?;
        let sets = Sets::from_file(&file);
        *self.sets.write().unwrap_or_else(PoisonError::into_inner) = sets;
        tracing::info!(path = %path.display(), entries = file.revoked.len(), "revocation list reloaded");
        Ok(file.revoked.len())
    }

    /// Whether a serial / fingerprint pair is revoked.
    pub fn check(&self, serial: Option<&Serial>, fingerprint: &Fingerprint) -> Option<RevokedBy> {
        let sets = self.sets.read().unwrap_or_else(PoisonError::into_inner);
        if serial.is_some_and(|s| sets.serials.contains(s)) {
            Some(RevokedBy::Serial)
        } else if sets.fingerprints.contains(fingerprint) {
            Some(RevokedBy::Fingerprint)
        } else {
            None
        }
    }

    /// Whether a DER certificate is revoked (by serial or by fingerprint).
    /// A certificate whose serial cannot be parsed is still checked by
    /// fingerprint.
    pub fn is_revoked(&self, cert: &CertificateDer<'_>) -> Option<RevokedBy> {
        let serial = x509_parser::parse_x509_certificate(cert.as_ref())
            .ok()
            .and_then(|(_, c)| Serial::from_bytes(c.raw_serial()).ok());
        self.check(serial.as_ref(), &Fingerprint::of(cert))
    }

    /// The backing file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_sees_changes_and_keeps_old_list_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.toml");
        RevokedFile::default().save(&path).unwrap();
        let list = RevocationList::load(&path).unwrap();
        let cert = CertificateDer::from(vec![0x30, 0x00]);
        let fp = Fingerprint::of(&cert);
        let serial: Serial = "0102".parse().unwrap();
        assert_eq!(list.check(Some(&serial), &fp), None);

        let mut file = RevokedFile::load(&path).unwrap();
        file.revoked.push(RevokedEntry {
            serial: Some(serial.clone()),
            fingerprint: None,
            identity: None,
            reason: Some("test".into()),
            revoked_at: None,
            update_public_key: None,
        });
        file.save(&path).unwrap();
        // Not visible until reload.
        assert_eq!(list.check(Some(&serial), &fp), None);
        assert_eq!(list.reload().unwrap(), 1);
        assert_eq!(list.check(Some(&serial), &fp), Some(RevokedBy::Serial));

        file.revoked.push(RevokedEntry {
            serial: None,
            fingerprint: Some(fp),
            identity: None,
            reason: None,
            revoked_at: None,
            update_public_key: None,
        });
        file.save(&path).unwrap();
        list.reload().unwrap();
        assert_eq!(list.is_revoked(&cert), Some(RevokedBy::Fingerprint));

        // A broken file keeps the previous list in force.
        std::fs::write(&path, "format = 1\n[[revoked]]\nserial = \"xyz\"\n").unwrap();
        assert!(list.reload().is_err());
        assert_eq!(list.is_revoked(&cert), Some(RevokedBy::Fingerprint));

        // An entry with neither key is refused.
        std::fs::write(&path, "format = 1\n[[revoked]]\nreason = \"?\"\n").unwrap();
        assert!(list.reload().is_err());
    }

    #[test]
    fn missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(RevocationList::load(dir.path().join("nope.toml")).is_err());
        assert_eq!(RevocationList::empty().reload().unwrap(), 0);
    }
}
