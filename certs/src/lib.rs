//! fedlink PKI: the federation CA, startup kits, identities in certificates,
//! revocation, and the rustls configurations that enforce mutual TLS.
//!
//! # What it does
//!
//! - **Provisioning** ([`CertificateAuthority`]): creates a federation root
//!   CA (ECDSA P-256, rcgen with ring), the coordinator's server certificate,
//!   admin and site *kits*, renews and revokes certificates, and keeps three
//!   registers next to the CA: `issued.toml` (audit), `revoked.toml`
//!   (revocation list) and `sites.toml` (the provisioning manifest: approved
//!   sites, certificate fingerprints and ed25519 update public keys).
//! - **Identity**: every end-entity certificate carries exactly one SAN URI
//!   `fedlink://<federation>/<role>/<name>`; [`Identity::from_der`],
//!   [`peer_identity`] and [`peer_identity_from_any`] read it back.
//! - **TLS** ([`server_tls_config`], [`client_tls_config`]): rustls 0.23,
//!   TLS 1.3 only, the ring provider only (never the process default), the
//!   federation CA as the only trust anchor (never the OS store). The server
//!   requires a client certificate and checks chain, validity, revocation
//!   ([`RevocationList`], reloadable at run time), federation and role on
//!   every handshake; the client checks that the server is the federation's
//!   coordinator. After the handshake the coordinator calls
//!   [`check_role_for_alpn`].
//!
//! # What it does not do
//!
//! No network I/O and no QUIC: wrap the configs with
//! `quinn::crypto::rustls::QuicServerConfig::try_from(cfg)` /
//! `QuicClientConfig::try_from(cfg)`. No CRL/OCSP distribution, no
//! intermediate CAs, no HSM: the CA key is a 0600 PEM file that the operator
//! should keep offline once the kits are issued. Sites do not check the
//! coordinator's revocation (they have no list). No "accept any certificate"
//! escape hatch exists.
//!
//! ```text
//!  fedlink certs init/issue-site/...        coordinator                 site agent
//!  ───────────────────────────────          ───────────                 ──────────
//!  CertificateAuthority ──writes──► kits ─► Kit::load ──┐      ┌── Kit::load ◄── site kit
//!        │                                              ▼      ▼
//!        ├─► ca/revoked.toml ─► RevocationList ─► server_tls_config   client_tls_config
//!        └─► ca/sites.toml ──► SiteManifest (allowed sites, update keys)
//!                                       │                 ▲ QUIC + mTLS ▲
//!                 peer_identity + check_role_for_alpn ◄───┴─────────────┘
//! ```
//!
//! # Directory layout
//!
//! `fedlink certs init --federation demo --out fed/` creates:
//!
//! ```text
//! fed/
//! ├── ca/                     keep private; ca-key.pem can go offline after issuing
//! │   ├── ca.pem              federation root CA certificate
//! │   ├── ca-key.pem          CA private key (0600) — never copied into a kit
//! │   ├── federation.toml     federation name, default coordinator address / server name
//! │   ├── issued.toml         audit register: every certificate issued (serial, fingerprint, identity, validity)
//! │   ├── revoked.toml        revocation list read by the coordinator (reloadable)
//! │   └── sites.toml          provisioning manifest read by the coordinator
//! ├── coordinator/            the coordinator's kit
//! └── admins/<name>/          the first admin's kit
//! ```
//!
//! and `fedlink certs issue-site st-mary --ca fed/ca --out fed/sites/st-mary`
//! a site kit (directory mode 0700):
//!
//! ```text
//! fed/sites/st-mary/
//! ├── kit.toml                federation, identity, role, coordinator address and TLS server name, file names
//! ├── ca.pem                  federation CA certificate (the only trust anchor)
//! ├── cert.pem                TLS client certificate (SAN fedlink://demo/site/st-mary)
//! ├── key.pem                 TLS private key (0600)
//! ├── update-key.pem          ed25519 update-signing key, PKCS#8 PEM (0600), separate from the TLS key
//! └── update-key.pub.pem      its public key (also recorded in ca/sites.toml)
//! ```
//!
//! Admin and coordinator kits are the same without the update key. Files are
//! created with `create_new`: nothing is ever overwritten. `renew` puts a new
//! `cert.pem`/`key.pem` in place by atomic rename and keeps the previous pair
//! as `cert.<serial>.pem.bak` / `key.<serial>.pem.bak`.
//!
//! # Example
//!
//! ```
//! use fedlink_certs::{
//!     CertificateAuthority, InitOptions, Kit, RevocationList, Validity, ALPN_SITE,
//!     client_tls_config, server_tls_config,
//! };
//! let dir = tempfile::tempdir()?;
//! let now = time::OffsetDateTime::now_utc();
//! let (ca, report) = CertificateAuthority::init(&InitOptions::new("demo", dir.path()), now)?;
//! let site_dir = dir.path().join("sites/st-mary");
//! ca.issue_site("st-mary", &site_dir, Validity::days_from(now, 30)?, None, now)?;
//!
//! let server = server_tls_config(
//!     &Kit::load(&report.coordinator_kit)?,
//!     RevocationList::load(ca.revoked_path())?,
//! )?;
//! let site = Kit::load(&site_dir)?;
//! let client = client_tls_config(&site, ALPN_SITE)?;
//! assert_eq!(site.identity().to_uri(), "fedlink://demo/site/st-mary");
//! # let _ = (server, client);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod ca;
mod certinfo;
mod error;
mod files;
mod identity;
mod kit;
mod manifest;
pub mod private;
mod revocation;
mod tls;

pub use ca::{
    CA_DIR, CA_KEY_FILE, CLOCK_SKEW, COORDINATOR_AUDIT_KEY_FILE, COORDINATOR_NAME,
    CertificateAuthority, DEFAULT_CA_VALIDITY_DAYS, DEFAULT_PORT, DEFAULT_VALIDITY_DAYS,
    FEDERATION_FILE, FederationInfo, ISSUED_FILE, InitOptions, InitReport, IssuedFile, IssuedKit,
    IssuedRecord, REVOKED_FILE, RenewReport, SITES_FILE, Validity,
};
pub use certinfo::{CertInfo, Fingerprint, HexError, Serial};
pub use error::Error;
pub use identity::{
    IDENTITY_SCHEME, Identity, IdentityError, MAX_NAME_LEN, PeerRejected, Role,
    check_role_for_alpn, peer_identity, peer_identity_from_any, validate_name,
};
pub use kit::{
    CA_CERT_FILE, CERT_FILE, KEY_FILE, KIT_FILE, KIT_FORMAT, Kit, KitInfo, UPDATE_KEY_FILE,
    UPDATE_PUBLIC_KEY_FILE,
};
pub use manifest::{MANIFEST_FORMAT, SiteEntry, SiteManifest};
pub use revocation::{REVOKED_FORMAT, RevocationList, RevokedBy, RevokedEntry, RevokedFile};
pub use tls::{
    ALPN_ADMIN, ALPN_SITE, FederationClientVerifier, FederationServerVerifier, client_tls_config,
    crypto_provider, server_tls_config,
};

/// Re-exported so callers can name the types in this crate's API.
pub use {ed25519_dalek, rustls, rustls_pki_types, time};
