//! Why `serve` could not start or had to stop ([`ServeError`]), with the
//! conversions from the engine's and the recovery's errors.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::core::admin::KeysError;
use crate::core::recovery::RecoveryError;
use crate::server::audit::AuditError;
use crate::server::engine::EngineError;
use crate::server::init_model::InitModelError;

/// Why the coordinator could not start or had to stop.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The site manifest is another federation's than the kit.
    #[error("TLS / kit: the site manifest is for federation {manifest}, the kit for {kit}")]
    ManifestFederation {
        /// The manifest's federation.
        manifest: String,
        /// The kit's federation.
        kit: String,
    },
    /// The coordinator kit has no ed25519 audit key (kits issued by older
    /// versions lack it).
    #[error(
        "TLS / kit: the coordinator kit {} has no ed25519 audit key (update_key in kit.toml; \
         kits issued by older versions lack it): renew it with `fedlink certs renew \
         coordinator --role coordinator --ca <ca dir> --out <kit dir>`, which adds the key",
        kit.display()
    )]
    NoAuditKey {
        /// The kit's directory.
        kit: PathBuf,
    },
    /// A kit, revocation list or site manifest that cannot be read, or the
    /// TLS configuration built from them.
    #[error("TLS / kit: {0}")]
    Certs(#[from] fedlink_certs::Error),
    /// The kit's federation name is not a valid federation id.
    #[error("TLS / kit: {0}")]
    Federation(#[source] fedlink_protocol::IdError),
    /// The site manifest's update keys cannot be used.
    #[error("TLS / kit: {0}")]
    Keys(#[from] KeysError),
    /// No job to run where one is needed (`--exit-after-job`).
    #[error(
        "job: no job to run: --exit-after-job needs a job (`job = ...` in the config, or an \
         unfinished job in the store); without it the coordinator starts empty and waits \
         for `fedlink jobs submit`"
    )]
    NoJob,
    /// The job's strategy does not fit its model.
    #[error("job: {0}")]
    DoesNotFit(#[source] fedlink_aggregation::AggregationError),
    /// The job's model has no wire form to serve (it could not be written
    /// or read back); the cause is the driver's own error.
    #[error("job: {0}")]
    ModelWire(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The engine cannot start on the job (its id, its strategy's record,
    /// its evaluations in the store); the cause is the engine's own error.
    #[error("job: {0}")]
    EngineStart(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The job file is unreadable or invalid.
    #[error("job: {0}")]
    JobFile(#[from] crate::job::JobError),
    /// The job file could not be read again to record its hash.
    #[error("job: {}: {source}", path.display())]
    JobRead {
        /// The job file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The job's initial model cannot be made or read.
    #[error("job: {0}")]
    InitialModel(#[from] InitModelError),
    /// The job's aggregation strategy is not valid.
    #[error("job: {0}")]
    Strategy(#[from] fedlink_aggregation::ConfigError),
    /// The job's id is not a valid job id.
    #[error("job: {0}")]
    JobId(#[source] fedlink_protocol::IdError),
    /// A job's state kept in the store does not decode (`what`: "stored
    /// optimizer state", "stored replay state").
    #[error("job: {what}: {source}")]
    StoredState {
        /// Which state.
        what: &'static str,
        /// Why it does not decode.
        source: serde_json::Error,
    },
    /// The store.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The data directory is unusable: not a directory, or too open (other
    /// local users could read site data) and its mode cannot be tightened.
    #[error("data_dir: {0}")]
    DataDir(#[source] fedlink_certs::Error),
    /// Binding the QUIC endpoint at `addr`.
    #[error("network: binding {addr}: {source}")]
    Bind {
        /// The configured listen address.
        addr: SocketAddr,
        /// Why it could not be bound.
        source: fedlink_transport::TransportError,
    },
    /// The bound QUIC endpoint has no local address.
    #[error("network: {0}")]
    LocalAddr(#[source] std::io::Error),
    /// Binding the TCP listener at `addr`.
    #[error("network: binding TCP {addr}: {source}")]
    BindTcp {
        /// The TCP listen address.
        addr: SocketAddr,
        /// Why it could not be bound.
        source: fedlink_transport::TransportError,
    },
    /// The audit log could not be opened or written: nothing runs
    /// unaudited.
    #[error("audit: {0}")]
    Audit(#[from] AuditError),
    /// The engine stopped on an error it cannot recover from in-process
    /// (e.g. a checkpoint could not be persisted). Restarting recovers. The
    /// cause is the engine's own error (it names the round or the step).
    #[error("fatal: {0}")]
    Fatal(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A thread panicked while holding the site manifest.
    #[error("fatal: manifest lock poisoned")]
    ManifestLock,
}

impl From<EngineError> for ServeError {
    fn from(e: EngineError) -> Self {
        Self::Fatal(Box::new(e))
    }
}

impl From<RecoveryError> for ServeError {
    fn from(e: RecoveryError) -> Self {
        match e {
            RecoveryError::Strategy(e) => Self::Strategy(e),
            RecoveryError::DoesNotFit(e) => Self::DoesNotFit(e),
            RecoveryError::StoredState { what, source } => Self::StoredState { what, source },
            RecoveryError::JobId(e) => Self::JobId(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// The start and stop errors read as their strings did before they
    /// were typed, and keep their cause as the error's source.
    #[test]
    fn serve_errors_read_as_before_and_keep_their_cause() {
        use std::error::Error as _;
        let e = ServeError::ManifestFederation {
            manifest: "fed-a".into(),
            kit: "fed-b".into(),
        };
        assert_eq!(
            e.to_string(),
            "TLS / kit: the site manifest is for federation fed-a, the kit for fed-b"
        );
        let e = ServeError::NoAuditKey {
            kit: PathBuf::from("/kits/coordinator"),
        };
        assert_eq!(
            e.to_string(),
            "TLS / kit: the coordinator kit /kits/coordinator has no ed25519 audit key \
             (update_key in kit.toml; kits issued by older versions lack it): renew it with \
             `fedlink certs renew coordinator --role coordinator --ca <ca dir> --out <kit dir>`, \
             which adds the key"
        );
        assert_eq!(
            ServeError::NoJob.to_string(),
            "job: no job to run: --exit-after-job needs a job (`job = ...` in the config, or an \
             unfinished job in the store); without it the coordinator starts empty and waits for \
             `fedlink jobs submit`"
        );
        assert_eq!(
            ServeError::ManifestLock.to_string(),
            "fatal: manifest lock poisoned"
        );
        let e = ServeError::from(EngineError::Checkpoint(
            crate::store::StoreError::Inconsistent {
                job: "j1".into(),
                reason: "no such round".into(),
            },
        ));
        assert!(
            e.to_string()
                .starts_with("fatal: persisting a checkpoint: "),
            "{e}"
        );
        assert!(e.source().and_then(|s| s.source()).is_some(), "{e:?}");
        let e = ServeError::from(AuditError::Lock);
        assert_eq!(
            e.to_string(),
            "audit: audit log: the writer lock is poisoned"
        );
        assert!(e.source().is_some());
    }
}
