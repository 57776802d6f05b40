//! rustls configurations for the coordinator (server) and for sites and
//! admins (clients): TLS 1.3 only, ring provider only, federation CA only.
//!
//! Wrap them for quinn with
//! `quinn::crypto::rustls::QuicServerConfig::try_from(cfg)` /
//! `QuicClientConfig::try_from(cfg)`.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::Error;
use crate::certinfo::Serial;
use crate::identity::{Identity, PeerRejected, Role};
use crate::kit::Kit;
use crate::revocation::RevocationList;

/// ALPN protocol of site connections.
pub const ALPN_SITE: &[u8] = b"fedlink/1";
/// ALPN protocol of admin connections.
pub const ALPN_ADMIN: &[u8] = b"fedlink-admin/1";

/// The one crypto provider fedlink uses: rustls' ring provider. Never the
/// process default (with several providers compiled in, there is none).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, Error> {
    let mut store = RootCertStore::empty();
    store.add(ca.clone())?;
    Ok(Arc::new(store))
}

fn rejected(reason: PeerRejected) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(reason))))
}

/// Client-certificate verifier of the coordinator.
///
/// On every handshake it runs rustls' WebPKI verification against the
/// federation CA only (chain, validity period, client-auth usage), then
/// checks that the certificate is not revoked (serial or fingerprint in the
/// shared [`RevocationList`]), carries exactly one fedlink identity of this
/// federation, and that its role is `site` or `admin`.
#[derive(Debug)]
pub struct FederationClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    federation: String,
    revocations: Arc<RevocationList>,
}

impl FederationClientVerifier {
    /// A verifier trusting only `ca`, for `federation`, consulting `revocations`.
    pub fn new(
        ca: &CertificateDer<'static>,
        federation: &str,
        revocations: Arc<RevocationList>,
    ) -> Result<Self, Error> {
        crate::identity::validate_name(federation)?;
        let inner =
            WebPkiClientVerifier::builder_with_provider(roots(ca)?, crypto_provider()).build()?;
        Ok(Self {
            inner,
            federation: federation.to_owned(),
            revocations,
        })
    }
}

impl ClientCertVerifier for FederationClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| tracing::warn!(error = %e, "client certificate refused"))?;
        let identity = Identity::from_der(end_entity).map_err(|e| {
            tracing::warn!(error = %e, "client certificate refused");
            rejected(e.into())
        })?;
        if self.revocations.is_revoked(end_entity).is_some() {
            let serial = x509_parser::parse_x509_certificate(end_entity.as_ref())
                .ok()
                .and_then(|(_, c)| Serial::from_bytes(c.raw_serial()).ok())
                .map(|s| s.to_string())
                .unwrap_or_default();
            let reason = PeerRejected::Revoked {
                identity: identity.to_uri(),
                serial,
            };
            tracing::warn!(%reason, "client certificate refused");
            return Err(rejected(reason));
        }
        check_member(
            &identity,
            &self.federation,
            &[Role::Site, Role::Admin],
            "site, admin",
        )
        .map_err(|reason| {
            tracing::warn!(%reason, "client certificate refused");
            rejected(reason)
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The identity belongs to `federation` and has one of the `allowed` roles
/// (`allowed_text` names them for the error).
fn check_member(
    identity: &Identity,
    federation: &str,
    allowed: &[Role],
    allowed_text: &'static str,
) -> Result<(), PeerRejected> {
    if identity.federation() != federation {
        return Err(PeerRejected::WrongFederation {
            identity: identity.to_uri(),
            expected: federation.to_owned(),
        });
    }
    if !allowed.contains(&identity.role()) {
        return Err(PeerRejected::RoleNotAllowed {
            identity: identity.to_uri(),
            role: identity.role(),
            allowed: allowed_text,
        });
    }
    Ok(())
}

/// Server-certificate verifier of sites and admins.
///
/// Runs rustls' WebPKI verification against the pinned federation CA only
/// (chain, validity, server-auth usage, server name), then checks that the
/// certificate carries the `coordinator` role of the same federation.
#[derive(Debug)]
pub struct FederationServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    federation: String,
}

impl FederationServerVerifier {
    /// A verifier trusting only `ca`, expecting a coordinator of `federation`.
    pub fn new(ca: &CertificateDer<'static>, federation: &str) -> Result<Self, Error> {
        crate::identity::validate_name(federation)?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(roots(ca)?, crypto_provider()).build()?;
        Ok(Self {
            inner,
            federation: federation.to_owned(),
        })
    }
}

impl ServerCertVerifier for FederationServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let identity = Identity::from_der(end_entity).map_err(|e| rejected(e.into()))?;
        check_member(
            &identity,
            &self.federation,
            &[Role::Coordinator],
            "coordinator",
        )
        .map_err(rejected)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The coordinator's rustls server config from its kit.
///
/// TLS 1.3 only; client certificates are mandatory and verified by
/// [`FederationClientVerifier`] (federation CA only, revocation list,
/// identity, role); ALPN offers `fedlink/1` and `fedlink-admin/1`. After the
/// handshake the coordinator must still call
/// [`check_role_for_alpn`](crate::check_role_for_alpn).
pub fn server_tls_config(
    kit: &Kit,
    revocations: Arc<RevocationList>,
) -> Result<ServerConfig, Error> {
    if kit.identity().role() != Role::Coordinator {
        return Err(Error::Refused(format!(
            "server_tls_config needs a coordinator kit, {} is a {} kit",
            kit.dir().display(),
            kit.identity().role()
        )));
    }
    let verifier =
        FederationClientVerifier::new(kit.ca_cert(), kit.identity().federation(), revocations)?;
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(kit.cert_chain().to_vec(), kit.private_key())?;
    config.alpn_protocols = vec![ALPN_SITE.to_vec(), ALPN_ADMIN.to_vec()];
    Ok(config)
}

/// A site's or admin's rustls client config from its kit.
///
/// TLS 1.3 only; trusts only the kit's CA certificate; presents the kit's
/// certificate; verifies the coordinator with [`FederationServerVerifier`].
/// `alpn` must be the protocol of the kit's role ([`ALPN_SITE`] for a site
/// kit, [`ALPN_ADMIN`] for an admin kit). Connect with the name from
/// [`Kit::coordinator_server_name`].
pub fn client_tls_config(kit: &Kit, alpn: &[u8]) -> Result<ClientConfig, Error> {
    let role = kit.identity().role();
    if role.client_alpn() != Some(alpn) {
        return Err(Error::Refused(format!(
            "a {role} kit cannot connect with ALPN {:?}",
            String::from_utf8_lossy(alpn)
        )));
    }
    let verifier = FederationServerVerifier::new(kit.ca_cert(), kit.identity().federation())?;
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(kit.cert_chain().to_vec(), kit.private_key())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertificateAuthority, InitOptions, Validity};
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
    use time::OffsetDateTime;

    struct Fixture {
        _dir: tempfile::TempDir,
        ca: CertificateAuthority,
        coordinator: Kit,
        site: Kit,
        admin: Kit,
        foreign_site: Kit,
    }

    fn fixture() -> Fixture {
        let now = OffsetDateTime::now_utc();
        let dir = tempfile::tempdir().unwrap();
        let (ca, report) =
            CertificateAuthority::init(&InitOptions::new("fed", dir.path().join("fed")), now)
                .unwrap();
        let v = Validity::days_from(now, 1).unwrap();
        let site = dir.path().join("fed/sites/a");
        ca.issue_site("a", &site, v, None, now).unwrap();
        let (other, _) =
            CertificateAuthority::init(&InitOptions::new("fed", dir.path().join("other")), now)
                .unwrap();
        let foreign = dir.path().join("other/sites/a");
        other.issue_site("a", &foreign, v, None, now).unwrap();
        Fixture {
            coordinator: Kit::load(&report.coordinator_kit).unwrap(),
            admin: Kit::load(&report.admin_kit).unwrap(),
            site: Kit::load(&site).unwrap(),
            foreign_site: Kit::load(&foreign).unwrap(),
            ca,
            _dir: dir,
        }
    }

    /// A certificate signed by the real CA with arbitrary URI and EKU.
    fn rogue(
        ca: &CertificateAuthority,
        uri: &str,
        eku: ExtendedKeyUsagePurpose,
        dns: &[&str],
    ) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params
            .subject_alt_names
            .push(SanType::URI(uri.try_into().unwrap()));
        params.extended_key_usages = vec![eku];
        params.signed_by(&key, &ca.issuer).unwrap().der().clone()
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    #[test]
    fn client_verifier_checks() {
        let f = fixture();
        let list = RevocationList::load(f.ca.revoked_path()).unwrap();
        let v = FederationClientVerifier::new(f.ca.cert(), "fed", list.clone()).unwrap();
        assert!(v.client_auth_mandatory());
        v.verify_client_cert(&f.site.cert_chain()[0], &[], now())
            .unwrap();
        v.verify_client_cert(&f.admin.cert_chain()[0], &[], now())
            .unwrap();

        let err = v
            .verify_client_cert(&f.foreign_site.cert_chain()[0], &[], now())
            .unwrap_err();
        assert_eq!(
            err,
            // Same federation name, hence the same issuer DN: found by name, refused by signature.
            rustls::Error::InvalidCertificate(CertificateError::BadSignature)
        );
        // The real coordinator certificate lacks clientAuth.
        let err = v
            .verify_client_cert(&f.coordinator.cert_chain()[0], &[], now())
            .unwrap_err();
        assert!(err.to_string().contains("extended key usage"), "{err}");
        // A coordinator-role certificate with clientAuth: refused by role.
        let c = rogue(
            &f.ca,
            "fedlink://fed/coordinator/x",
            ExtendedKeyUsagePurpose::ClientAuth,
            &[],
        );
        let err = v
            .verify_client_cert(&c, &[], now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("role coordinator"), "{err}");
        // Another federation's name under our CA.
        let c = rogue(
            &f.ca,
            "fedlink://other/site/x",
            ExtendedKeyUsagePurpose::ClientAuth,
            &[],
        );
        let err = v
            .verify_client_cert(&c, &[], now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("another federation"), "{err}");
        // No identity at all.
        let c = rogue(
            &f.ca,
            "https://example.org/",
            ExtendedKeyUsagePurpose::ClientAuth,
            &[],
        );
        let err = v
            .verify_client_cert(&c, &[], now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no fedlink:// identity"), "{err}");

        // Revocation is consulted on every call, after reload.
        f.ca.revoke("a", Some(Role::Site), None, OffsetDateTime::now_utc())
            .unwrap();
        v.verify_client_cert(&f.site.cert_chain()[0], &[], now())
            .unwrap();
        list.reload().unwrap();
        let err = v
            .verify_client_cert(&f.site.cert_chain()[0], &[], now())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is revoked") && err.contains("fedlink://fed/site/a"),
            "{err}"
        );
    }

    #[test]
    fn server_verifier_checks() {
        let f = fixture();
        let v = FederationServerVerifier::new(f.ca.cert(), "fed").unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        v.verify_server_cert(&f.coordinator.cert_chain()[0], &[], &name, &[], now())
            .unwrap();
        let wrong = ServerName::try_from("elsewhere.example").unwrap();
        assert!(
            v.verify_server_cert(&f.coordinator.cert_chain()[0], &[], &wrong, &[], now())
                .is_err()
        );
        // A site-role certificate with serverAuth and the right name: refused by role.
        let c = rogue(
            &f.ca,
            "fedlink://fed/site/x",
            ExtendedKeyUsagePurpose::ServerAuth,
            &["localhost"],
        );
        let err = v
            .verify_server_cert(&c, &[], &name, &[], now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("role site"), "{err}");
        // Another CA's coordinator is unknown.
        let other = FederationServerVerifier::new(f.foreign_site.ca_cert(), "fed").unwrap();
        let err = other
            .verify_server_cert(&f.coordinator.cert_chain()[0], &[], &name, &[], now())
            .unwrap_err();
        assert_eq!(
            err,
            // Same federation name, hence the same issuer DN: found by name, refused by signature.
            rustls::Error::InvalidCertificate(CertificateError::BadSignature)
        );
    }

    #[test]
    fn configs_check_roles() {
        let f = fixture();
        let list = RevocationList::empty();
        let server = server_tls_config(&f.coordinator, list.clone()).unwrap();
        assert_eq!(
            server.alpn_protocols,
            vec![ALPN_SITE.to_vec(), ALPN_ADMIN.to_vec()]
        );
        assert!(server_tls_config(&f.site, list).is_err());
        let client = client_tls_config(&f.site, ALPN_SITE).unwrap();
        assert_eq!(client.alpn_protocols, vec![ALPN_SITE.to_vec()]);
        client_tls_config(&f.admin, ALPN_ADMIN).unwrap();
        assert!(client_tls_config(&f.site, ALPN_ADMIN).is_err());
        assert!(client_tls_config(&f.admin, ALPN_SITE).is_err());
        assert!(client_tls_config(&f.coordinator, ALPN_SITE).is_err());
    }
}
