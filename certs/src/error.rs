//! The crate's error type.

use std::path::PathBuf;

use crate::identity::IdentityError;

/// Errors from provisioning, loading kits, registers and TLS configuration.
///
/// Local problems (files, arguments) and bad content are separate variants;
/// TLS handshake rejections are not reported here but through rustls (see
/// [`crate::PeerRejected`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file or directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file or (non-empty) directory exists already; fedlink never
    /// overwrites key material or kits.
    #[error("{} already exists; refusing to overwrite (choose a new path or remove it yourself)", path.display())]
    AlreadyExists {
        /// The existing path.
        path: PathBuf,
    },
    /// A file's content is malformed (PEM, TOML, certificate, key, size).
    #[error("{}: {why}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A private key file can be read or written by group or others.
    #[error("{}: private key file has mode {mode:03o}; it must not be accessible to group or others (chmod 600)", path.display())]
    KeyFileTooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file or directory holding site data is accessible to group or
    /// others and its mode could not be tightened.
    #[error("{}: mode {mode:03o} lets other local users read site data, and it could not be changed to owner-only: {source} (chmod go-rwx it, or fix its owner)", path.display())]
    TooOpen {
        /// The file or directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Why `chmod` failed.
        source: std::io::Error,
    },
    /// Another `fedlink certs` process holds the CA directory lock.
    #[error("{} exists: another fedlink certs command is running (remove the file if it crashed)", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A kit's files disagree with each other (identity, CA, key, role).
    #[error("kit {}: {why}", dir.display())]
    Kit {
        /// The kit directory.
        dir: PathBuf,
        /// What disagrees.
        why: String,
    },
    /// A name, role or identity is not valid.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A request is not acceptable (bad argument, wrong role for the
    /// operation, duplicate or unknown entity).
    #[error("{0}")]
    Refused(String),
    /// Certificate or key generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration (key, certificate, protocol).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// rustls refused to build a certificate verifier (e.g. empty root store).
    #[error("TLS verifier configuration: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}
