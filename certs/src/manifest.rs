//! The provisioning manifest, `ca/sites.toml`: the approved sites with their
//! identity, current certificate and ed25519 update-signing public key.
//!
//! `fedlink certs issue-site` appends to it and `fedlink certs renew` updates
//! the fingerprint; the coordinator loads it with [`SiteManifest::load`] to
//! know which sites may join and which key must sign each site's updates.
//!
//! ```toml
//! format = 1
//! federation = "demo"
//!
//! [[site]]
//! name = "st-mary"
//! identity = "fedlink://demo/site/st-mary"
//! cert_serial = "5c1e…"
//! cert_fingerprint = "9b1c…"          # SHA-256 of the current certificate
//! update_public_key = "d75a…"         # ed25519, 32 bytes hex
//! added_at = "2025-01-01T00:00:00Z"
//! ```

use std::collections::HashSet;
use std::path::Path;

use ed25519_dalek::VerifyingKey;
use rustls_pki_types::CertificateDer;

use crate::Error;
use crate::certinfo::{Fingerprint, Serial};
use crate::files;
use crate::identity::{Identity, PeerRejected, Role, validate_name};

/// Current format version of `sites.toml`.
pub const MANIFEST_FORMAT: u32 = 1;

/// One approved site.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteEntry {
    /// Site name (as in its identity).
    pub name: String,
    /// `fedlink://<federation>/site/<name>`.
    pub identity: Identity,
    /// Serial of the site's current TLS certificate.
    pub cert_serial: Serial,
    /// SHA-256 fingerprint of the site's current TLS certificate.
    pub cert_fingerprint: Fingerprint,
    /// The site's ed25519 update-signing public key, 32 bytes as hex.
    pub update_public_key: String,
    /// When the site was provisioned (RFC 3339).
    pub added_at: String,
    /// When its certificate was last renewed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_at: Option<String>,
    /// The most training examples an update of this site may claim
    /// (`num_examples`, its weight in FedAvg), as the federation knows the
    /// site's data. The coordinator rejects an update claiming more before
    /// reading its payload. `None`: only the job's limit applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_examples: Option<u64>,
}

impl SiteEntry {
    /// The ed25519 key that must have signed this site's updates.
    pub fn update_verifying_key(&self) -> Result<VerifyingKey, Error> {
        parse_update_key(&self.update_public_key)
            .map_err(|why| Error::Refused(format!("site {}: {why}", self.name)))
    }
}

/// Why a manifest entry's `update_public_key` is not a key.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadUpdateKey {
    /// Not hex.
    #[error("update_public_key is not hex")]
    NotHex,
    /// Not 32 bytes.
    #[error("update_public_key must be 32 bytes")]
    Length,
    /// 32 bytes that are not an ed25519 point.
    #[error("update_public_key is not a valid ed25519 key: {0}")]
    NotEd25519(ed25519_dalek::SignatureError),
}

pub(crate) fn parse_update_key(hex_key: &str) -> Result<VerifyingKey, BadUpdateKey> {
    let bytes = hex::decode(hex_key).map_err(|_| BadUpdateKey::NotHex)?;
    let arr: [u8; 32] = bytes.try_into().map_err(|_| BadUpdateKey::Length)?;
    VerifyingKey::from_bytes(&arr).map_err(BadUpdateKey::NotEd25519)
}

/// The approved sites of a federation (`ca/sites.toml`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteManifest {
    /// Format version, [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Federation name.
    pub federation: String,
    /// Approved sites.
    #[serde(default)]
    pub site: Vec<SiteEntry>,
}

impl SiteManifest {
    /// An empty manifest for `federation`.
    pub fn new(federation: &str) -> Result<Self, Error> {
        validate_name(federation)?;
        Ok(Self {
            format: MANIFEST_FORMAT,
            federation: federation.to_owned(),
            site: Vec::new(),
        })
    }

    /// Load and validate: known format, valid names, unique sites, identities
    /// consistent with the federation and the site name, valid update keys.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let manifest: Self = files::read_toml(path)?;
        manifest.validate().map_err(|why| Error::Invalid {
            path: path.to_path_buf(),
            why,
        })?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "unsupported format {} (expected {MANIFEST_FORMAT})",
                self.format
            ));
        }
        validate_name(&self.federation).map_err(|e| e.to_string())?;
        let mut seen = HashSet::new();
        for s in &self.site {
            let expected = Identity::new(&self.federation, Role::Site, &s.name)
                .map_err(|e| format!("site {:?}: {e}", s.name))?;
            if s.identity != expected {
                return Err(format!(
                    "site {:?}: identity {} does not match (expected {expected})",
                    s.name, s.identity
                ));
            }
            if !seen.insert(s.name.as_str()) {
                return Err(format!("site {:?} listed twice", s.name));
            }
            parse_update_key(&s.update_public_key)
                .map_err(|e| format!("site {:?}: {e}", s.name))?;
            if s.max_examples == Some(0) {
                return Err(format!(
                    "site {:?}: max_examples = 0 would refuse every update (omit it for no \
                     site limit)",
                    s.name
                ));
            }
        }
        Ok(())
    }

    /// Write atomically (temporary file + rename).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        self.validate().map_err(|why| Error::Invalid {
            path: path.to_path_buf(),
            why,
        })?;
        files::replace_public(path, files::to_toml(self, path)?.as_bytes())
    }

    /// The entry for a site name.
    pub fn get(&self, name: &str) -> Option<&SiteEntry> {
        self.site.iter().find(|s| s.name == name)
    }

    /// The entry for a site name, to change it (then [`Self::save`]).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut SiteEntry> {
        self.site.iter_mut().find(|s| s.name == name)
    }

    /// Remove a site's entry; returns it.
    pub fn remove(&mut self, name: &str) -> Option<SiteEntry> {
        let i = self.site.iter().position(|s| s.name == name)?;
        Some(self.site.remove(i))
    }

    /// After the handshake: find the site entry for a connected peer and
    /// check that it presents the site's *current* certificate (a certificate
    /// replaced by `renew` is refused here even though it still chains to
    /// the CA).
    pub fn check_peer(&self, end_entity: &CertificateDer<'_>) -> Result<&SiteEntry, PeerRejected> {
        let identity = Identity::from_der(end_entity)?;
        if identity.federation() != self.federation {
            return Err(PeerRejected::WrongFederation {
                identity: identity.to_uri(),
                expected: self.federation.clone(),
            });
        }
        if identity.role() != Role::Site {
            return Err(PeerRejected::RoleNotAllowed {
                identity: identity.to_uri(),
                role: identity.role(),
                allowed: "site",
            });
        }
        let entry = self
            .get(identity.name())
            .ok_or_else(|| PeerRejected::UnknownSite {
                identity: identity.to_uri(),
            })?;
        if entry.cert_fingerprint != Fingerprint::of(end_entity) {
            return Err(PeerRejected::SupersededCertificate {
                identity: identity.to_uri(),
            });
        }
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reasons' texts (they reach `Error::Invalid` / `Error::Refused`
    /// and the operator) are what they were as strings.
    #[test]
    fn bad_update_keys_read_as_before() {
        let text = |k: &str| parse_update_key(k).err().map(|e| e.to_string());
        assert_eq!(text("zz").as_deref(), Some("update_public_key is not hex"));
        assert_eq!(
            text("00ff").as_deref(),
            Some("update_public_key must be 32 bytes")
        );
        assert_eq!(text(&"00".repeat(32)), None);
    }
}
