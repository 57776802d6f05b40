//! Who a certificate speaks for: `fedlink://<federation>/<role>/<name>`.
//!
//! Every certificate the federation CA issues to an end entity carries exactly
//! one subject-alternative-name URI of that form. The TLS verifiers in
//! [`crate::tls`] parse it on every handshake, and the coordinator reads it
//! back from the connection with [`peer_identity`] /
//! [`peer_identity_from_any`] to learn which site or admin it talks to.

use std::any::Any;
use std::fmt;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use crate::tls::{ALPN_ADMIN, ALPN_SITE};

/// URI scheme of fedlink identities.
pub const IDENTITY_SCHEME: &str = "fedlink://";

/// Longest accepted name (federation or entity), in bytes.
pub const MAX_NAME_LEN: usize = 63;

/// Why a name, a role, an identity URI or a certificate's identity is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A federation or entity name breaks the `[a-z0-9][a-z0-9._-]{0,62}` rule.
    #[error("invalid name {name:?}: {why} (allowed: [a-z0-9][a-z0-9._-]{{0,62}})")]
    InvalidName {
        /// The offending name (possibly truncated for display).
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The role is not one of `coordinator`, `site`, `admin`.
    #[error("unknown role {0:?} (expected coordinator, site or admin)")]
    UnknownRole(String),
    /// The URI is not of the form `fedlink://<federation>/<role>/<name>`.
    #[error("malformed identity URI {uri:?}: {why}")]
    MalformedUri {
        /// The offending URI (possibly truncated for display).
        uri: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The certificate could not be parsed as X.509 DER.
    #[error("certificate is not valid X.509 DER: {0}")]
    BadCertificate(String),
    /// The certificate carries no `fedlink://` URI.
    #[error("certificate carries no fedlink:// identity URI")]
    NoIdentity,
    /// The certificate carries more than one `fedlink://` URI (ambiguous, refused).
    #[error("certificate carries {0} fedlink:// identity URIs; exactly one is allowed")]
    MultipleIdentities(usize),
    /// The peer presented no certificate at all.
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// `peer_identity()` returned something other than rustls certificates.
    #[error("peer identity is not a rustls certificate chain")]
    UnexpectedPeerIdentityType,
}

/// What an identity is allowed to do in the federation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Role {
    /// The federation's coordinator (TLS server).
    Coordinator,
    /// A hospital site agent (TLS client, ALPN `fedlink/1`).
    Site,
    /// A federation administrator (TLS client, ALPN `fedlink-admin/1`).
    Admin,
}

impl Role {
    /// The role as it appears in identity URIs, kit files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Coordinator => "coordinator",
            Self::Site => "site",
            Self::Admin => "admin",
        }
    }

    /// The ALPN protocol a client of this role must negotiate, `None` for the
    /// coordinator (which is never a client).
    pub fn client_alpn(self) -> Option<&'static [u8]> {
        match self {
            Self::Coordinator => None,
            Self::Site => Some(ALPN_SITE),
            Self::Admin => Some(ALPN_ADMIN),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "coordinator" => Ok(Self::Coordinator),
            "site" => Ok(Self::Site),
            "admin" => Ok(Self::Admin),
            other => Err(IdentityError::UnknownRole(truncate(other))),
        }
    }
}

impl serde::Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Check a federation or entity name against `[a-z0-9][a-z0-9._-]{0,62}`.
///
/// Names become directory names and URI path segments, so the rule is strict:
/// lower-case ASCII only, no leading dot or dash, at most 63 bytes.
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    let bad = |why| IdentityError::InvalidName {
        name: truncate(name),
        why,
    };
    let bytes = name.as_bytes();
    let Some(&first) = bytes.first() else {
        return Err(bad("empty"));
    };
    if bytes.len() > MAX_NAME_LEN {
        return Err(bad("longer than 63 bytes"));
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(bad("must start with a lower-case letter or a digit"));
    }
    if !bytes
        .iter()
        .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad("only a-z, 0-9, '.', '_' and '-' are allowed"));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    const MAX: usize = 96;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A validated fedlink identity: federation, role and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    federation: String,
    role: Role,
    name: String,
}

impl Identity {
    /// Build an identity, validating both names.
    pub fn new(
        federation: impl Into<String>,
        role: Role,
        name: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let federation = federation.into();
        let name = name.into();
        validate_name(&federation)?;
        validate_name(&name)?;
        Ok(Self {
            federation,
            role,
            name,
        })
    }

    /// The federation this identity belongs to.
    pub fn federation(&self) -> &str {
        &self.federation
    }

    /// The role of this identity.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The entity name (site name, admin name, coordinator name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The SAN URI form, `fedlink://<federation>/<role>/<name>`.
    pub fn to_uri(&self) -> String {
        format!(
            "{IDENTITY_SCHEME}{}/{}/{}",
            self.federation, self.role, self.name
        )
    }

    /// Parse `fedlink://<federation>/<role>/<name>` (exactly three segments,
    /// no query, fragment, port, user info or trailing slash).
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let malformed = |why| IdentityError::MalformedUri {
            uri: truncate(uri),
            why,
        };
        let rest = uri
            .strip_prefix(IDENTITY_SCHEME)
            .ok_or_else(|| malformed("does not start with fedlink://"))?;
        let mut parts = rest.split('/');
        let (Some(federation), Some(role), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed(
                "expected exactly fedlink://<federation>/<role>/<name>",
            ));
        };
        let role: Role = role.parse()?;
        Self::new(federation, role, name)
    }

    /// Extract the identity from a DER certificate: exactly one `fedlink://`
    /// SAN URI must be present (other URIs are ignored).
    pub fn from_der(cert: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        Self::from_x509(&parsed)
    }

    pub(crate) fn from_x509(
        cert: &x509_parser::certificate::X509Certificate<'_>,
    ) -> Result<Self, IdentityError> {
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let Some(san) = san else {
            return Err(IdentityError::NoIdentity);
        };
        let uris: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|gn| match gn {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .filter(|u| {
                u.get(..IDENTITY_SCHEME.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(IDENTITY_SCHEME))
            })
            .collect();
        match uris.as_slice() {
            [] => Err(IdentityError::NoIdentity),
            [one] => Self::from_uri(one),
            many => Err(IdentityError::MultipleIdentities(many.len())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_uri())
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_uri(s)
    }
}

/// The identity of a TLS peer from its certificate chain (end entity first),
/// e.g. the `Vec<CertificateDer<'static>>` inside quinn's
/// `Connection::peer_identity()`.
///
/// The chain has already been verified by the handshake; this only reads the
/// identity back.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Result<Identity, IdentityError> {
    let end_entity = chain.first().ok_or(IdentityError::NoPeerCertificate)?;
    Identity::from_der(end_entity)
}

/// The identity of a peer from quinn's `Connection::peer_identity()` as is
/// (a `Box<dyn Any>` that holds a `Vec<CertificateDer<'static>>` with the
/// rustls crypto backend):
///
/// ```text
/// let identity = fedlink_certs::peer_identity_from_any(connection.peer_identity())?;
/// ```
pub fn peer_identity_from_any(any: Option<Box<dyn Any>>) -> Result<Identity, IdentityError> {
    let any = any.ok_or(IdentityError::NoPeerCertificate)?;
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| IdentityError::UnexpectedPeerIdentityType)?;
    peer_identity(&chain)
}

/// Why an authenticated peer is refused (handshake verifiers and the
/// post-handshake role/ALPN check).
///
/// Its `Debug` output is the same as its `Display` output because rustls
/// prints custom verifier errors with `{:?}`: the reason then reads well in
/// the TLS error on both ends of the connection.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerRejected {
    /// The certificate has no usable fedlink identity.
    #[error("certificate rejected: {0}")]
    Identity(#[from] IdentityError),
    /// The certificate names another federation.
    #[error(
        "certificate identity {identity} belongs to another federation (expected {expected:?})"
    )]
    WrongFederation {
        /// Identity found in the certificate.
        identity: String,
        /// The federation this endpoint serves.
        expected: String,
    },
    /// The certificate's role may not be used on this side of the connection.
    #[error(
        "certificate identity {identity} has role {role}, which is not allowed here (allowed: {allowed})"
    )]
    RoleNotAllowed {
        /// Identity found in the certificate.
        identity: String,
        /// Its role.
        role: Role,
        /// Allowed roles, for the message.
        allowed: &'static str,
    },
    /// The certificate was revoked (listed in `revoked.toml`).
    #[error("certificate of {identity} (serial {serial}) is revoked")]
    Revoked {
        /// Identity found in the certificate, if any.
        identity: String,
        /// Its serial (hex).
        serial: String,
    },
    /// The site is not in the provisioning manifest.
    #[error("{identity} is not an approved site of this federation")]
    UnknownSite {
        /// The peer's identity.
        identity: String,
    },
    /// The certificate was replaced by a renewal.
    #[error("certificate of {identity} was superseded by a renewal; use the current kit")]
    SupersededCertificate {
        /// The peer's identity.
        identity: String,
    },
    /// The client negotiated no ALPN protocol.
    #[error("no ALPN protocol negotiated (expected fedlink/1 or fedlink-admin/1)")]
    NoAlpn,
    /// The negotiated ALPN protocol does not match the client's role.
    #[error("identity {identity} with role {role} may not use ALPN {alpn:?}")]
    RoleAlpnMismatch {
        /// The client's identity.
        identity: String,
        /// Its role.
        role: Role,
        /// The ALPN protocol it negotiated (lossy UTF-8).
        alpn: String,
    },
}

impl fmt::Debug for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// After the handshake: check that a client's role matches the ALPN protocol
/// it negotiated (`fedlink/1` for sites, `fedlink-admin/1` for admins).
///
/// The client-certificate verifier cannot do this (it runs before ALPN is
/// known to it), so the coordinator must call this on every new connection,
/// with the protocol from quinn's `handshake_data()`.
pub fn check_role_for_alpn(identity: &Identity, alpn: Option<&[u8]>) -> Result<(), PeerRejected> {
    let alpn = alpn.ok_or(PeerRejected::NoAlpn)?;
    match identity.role().client_alpn() {
        Some(expected) if expected == alpn => Ok(()),
        _ => Err(PeerRejected::RoleAlpnMismatch {
            identity: identity.to_uri(),
            role: identity.role(),
            alpn: String::from_utf8_lossy(alpn).chars().take(64).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "0", "site-a", "st.mary_s", &"a".repeat(63)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "A",
            "site a",
            "site/a",
            "été",
            &"a".repeat(64),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn uri_round_trip() {
        let id = Identity::new("fed", Role::Site, "site-a").unwrap();
        assert_eq!(id.to_uri(), "fedlink://fed/site/site-a");
        assert_eq!(Identity::from_uri(&id.to_uri()).unwrap(), id);
        let id: Identity = "fedlink://f.1/admin/alice".parse().unwrap();
        assert_eq!(id.role(), Role::Admin);
        assert_eq!(id.federation(), "f.1");
        assert_eq!(id.name(), "alice");
    }

    #[test]
    fn bad_uris() {
        for bad in [
            "",
            "fedlink://",
            "fedlink://fed",
            "fedlink://fed/site",
            "fedlink://fed/site/",
            "fedlink://fed/site/a/",
            "fedlink://fed/site/a/b",
            "fedlink://fed/robot/a",
            "fedlink://Fed/site/a",
            "fedlink://fed/site/a?x=1",
            "fedlink://fed:443/site/a",
            "fedlink://user@fed/site/a",
            "https://fed/site/a",
            "fedlink:/fed/site/a",
            "fedlink://fed//a",
        ] {
            assert!(Identity::from_uri(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn cert_with_uris(uris: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn identity_from_certificates() {
        let one = cert_with_uris(&["fedlink://fed/site/a", "https://example.org/"]);
        let id = Identity::from_der(&one).unwrap();
        assert_eq!(id, Identity::new("fed", Role::Site, "a").unwrap());
        assert_eq!(peer_identity(std::slice::from_ref(&one)).unwrap(), id);
        let any: Box<dyn Any> = Box::new(vec![one]);
        assert_eq!(peer_identity_from_any(Some(any)).unwrap(), id);

        let two = cert_with_uris(&["fedlink://fed/site/a", "fedlink://fed/admin/a"]);
        assert_eq!(
            Identity::from_der(&two).unwrap_err(),
            IdentityError::MultipleIdentities(2)
        );
        let none = cert_with_uris(&["https://example.org/"]);
        assert_eq!(
            Identity::from_der(&none).unwrap_err(),
            IdentityError::NoIdentity
        );
        let malformed = cert_with_uris(&["fedlink://fed/site/A"]);
        assert!(matches!(
            Identity::from_der(&malformed).unwrap_err(),
            IdentityError::InvalidName { .. }
        ));
        assert!(matches!(
            Identity::from_der(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).unwrap_err(),
            IdentityError::BadCertificate(_)
        ));
        assert_eq!(
            peer_identity(&[]).unwrap_err(),
            IdentityError::NoPeerCertificate
        );
        assert_eq!(
            peer_identity_from_any(Some(Box::new(42_u8))).unwrap_err(),
            IdentityError::UnexpectedPeerIdentityType
        );
        assert_eq!(
            peer_identity_from_any(None).unwrap_err(),
            IdentityError::NoPeerCertificate
        );
    }

    #[test]
    fn role_alpn() {
        let site = Identity::new("fed", Role::Site, "a").unwrap();
        let admin = Identity::new("fed", Role::Admin, "a").unwrap();
        let coord = Identity::new("fed", Role::Coordinator, "c").unwrap();
        check_role_for_alpn(&site, Some(ALPN_SITE)).unwrap();
        check_role_for_alpn(&admin, Some(ALPN_ADMIN)).unwrap();
        assert!(check_role_for_alpn(&site, Some(ALPN_ADMIN)).is_err());
        assert!(check_role_for_alpn(&admin, Some(ALPN_SITE)).is_err());
        assert!(check_role_for_alpn(&coord, Some(ALPN_SITE)).is_err());
        assert_eq!(check_role_for_alpn(&site, None), Err(PeerRejected::NoAlpn));
        let msg = check_role_for_alpn(&admin, Some(ALPN_SITE))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("fedlink://fed/admin/a") && msg.contains("fedlink/1"),
            "{msg}"
        );
    }
}
