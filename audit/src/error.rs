//! Errors of the writer and of the file helpers.

use std::path::PathBuf;

use crate::verify::VerifyFailure;

/// Why an audit-log operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on `path` failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another `AuditLog` in this one) holds the log's lock.
    #[error("{}: the audit log is locked by another writer", path.display())]
    Locked {
        /// The log file.
        path: PathBuf,
    },
    /// The log's last line is incomplete (a crash during a write). Opening is
    /// refused; [`crate::AuditLog::repair_torn_tail`] removes the partial line.
    #[error(
        "{}:{line}: torn last line ({len} bytes without a final newline, probably an interrupted write); \
         inspect it, then run repair_torn_tail to remove it",
        path.display()
    )]
    TornTail {
        /// The log file.
        path: PathBuf,
        /// 1-based number of the partial line.
        line: u64,
        /// Its length in bytes.
        len: usize,
    },
    /// The existing log does not verify (with the writer's own key): it was
    /// altered, or written with another key. It is never appended to.
    #[error("existing audit log does not verify: {0}")]
    Invalid(Box<VerifyFailure>),
    /// The caller's entry is not acceptable (empty actor, bad event name,
    /// details not an object, …).
    #[error("invalid entry: {0}")]
    InvalidEntry(String),
    /// The encoded entry would exceed [`crate::MAX_LINE_LEN`].
    #[error("entry of {len} bytes exceeds the {max}-byte line limit")]
    EntryTooLarge {
        /// Encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An earlier write failed part-way; the file's state is unknown, so this
    /// writer refuses further appends. Reopen the log (which re-verifies it).
    #[error("an earlier write to the audit log failed; reopen it before appending")]
    Poisoned,
    /// No entry has been written yet, so there is no head to sign.
    #[error("the audit log has no entries yet")]
    Empty,
    /// Sequence numbers are exhausted.
    #[error("sequence numbers exhausted")]
    SeqExhausted,
    /// A file that must not be overwritten exists.
    #[error("{} already exists; refusing to overwrite it", path.display())]
    AlreadyExists {
        /// The file.
        path: PathBuf,
    },
    /// The entry could not be serialized as JSON.
    #[error("cannot encode the entry as JSON: {0}")]
    Encode(#[from] serde_json::Error),
    /// A head or key file is not in the expected format.
    #[error("{}: {why}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A public key given as text is neither an ed25519 SPKI PEM nor 64 hex digits.
    #[error("not an ed25519 public key (SPKI PEM or 64 hex digits): {0}")]
    BadKey(String),
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl From<VerifyFailure> for Error {
    fn from(f: VerifyFailure) -> Self {
        Self::Invalid(Box::new(f))
    }
}
