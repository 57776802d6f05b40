//! The coordinator's audit log: `<data_dir>/audit/audit.jsonl`, hash-chained
//! and signed with the ed25519 key of the coordinator's kit
//! (see [`fedlink_audit`] for the format and what it proves).
//!
//! Every entry is appended and fsynced **before** the action it records takes
//! effect: callers check [`Auditor::record`]'s result and do not perform the
//! action when it fails (an upload is refused, the engine stops). The public
//! key is exported next to the log as `audit-key.pub` (64 hex digits, what
//! `fedlink audit verify --key` reads) and written in the first entry of every
//! start (`coordinator.started`).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ed25519_dalek::{SigningKey, VerifyingKey};
use fedlink_audit::{AuditLog, CoordEvent, EventKind, SignedHead, coord};

/// Sub-directory of the data directory that holds the log.
pub(crate) const AUDIT_DIR: &str = "audit";
/// The current log file.
pub(crate) const AUDIT_FILE: &str = "audit.jsonl";
/// The exported public key (64 lowercase hex digits and a newline).
pub(crate) const AUDIT_KEY_FILE: &str = "audit-key.pub";

/// Why the audit log could not be opened or written.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log itself refused (I/O, torn tail, does not verify, poisoned …).
    #[error("audit log: {0}")]
    Log(#[from] fedlink_audit::Error),
    /// Setting up the audit directory or the exported key failed.
    #[error("audit log: {path}: {why}")]
    Setup {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A thread panicked while holding the log.
    #[error("audit log: the writer lock is poisoned")]
    Lock,
    /// The log's signed head is not a 64-byte hex signature.
    #[error("audit log: the signed head's signature is not 64 bytes of hex")]
    BadHead,
    /// An event's details could not be turned into JSON (nothing was
    /// written).
    #[error("audit log: the details of {event} cannot be written: {source}")]
    Details {
        /// The event.
        event: EventKind,
        /// Why.
        source: serde_json::Error,
    },
}

struct Inner {
    log: AuditLog,
    /// Size of the current file, for rotation.
    bytes: u64,
}

/// Handle to the coordinator's audit log, shared by the engine and the
/// connection tasks. Appends are serialized by a mutex; each fsyncs.
pub(crate) struct Auditor {
    inner: Mutex<Inner>,
    actor: String,
    public: VerifyingKey,
    rotate_bytes: u64,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("actor", &self.actor)
            .field("public", &hex::encode(self.public.as_bytes()))
            .finish_non_exhaustive()
    }
}

impl Auditor {
    /// Open (or create) the log in `<data_dir>/audit/`, repairing a torn
    /// last line first (the repair is recorded as `audit.tail_repaired`).
    /// `actor` is the coordinator's certificate identity. The log is rotated
    /// once the current file exceeds `rotate_bytes`.
    pub(crate) fn open(
        data_dir: &Path,
        key: SigningKey,
        actor: String,
        rotate_bytes: u64,
    ) -> Result<Self, AuditError> {
        let dir = data_dir.join(AUDIT_DIR);
        create_private_dir(&dir)?;
        let public = key.verifying_key();
        export_key(&dir.join(AUDIT_KEY_FILE), &public)?;
        let path = dir.join(AUDIT_FILE);
        let (log, repaired) = AuditLog::open_repairing(&path, key).map_err(|e| match e {
            fedlink_audit::Error::Invalid(f) => AuditError::Setup {
                path: path.clone(),
                why: format!(
                    "the existing log does not verify with this coordinator's key ({f}); if the \
                     coordinator kit was re-issued, move {} aside (keep it for review) to start \
                     a new log",
                    dir.display()
                ),
            },
            other => AuditError::Log(other),
        })?;
        let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let auditor = Self {
            inner: Mutex::new(Inner { log, bytes }),
            actor,
            public,
            rotate_bytes: rotate_bytes.max(1),
        };
        if let Some(r) = repaired {
            tracing::warn!(
                line = r.line,
                bytes = r.removed_bytes,
                "removed a torn last line from the audit log (an interrupted write)"
            );
            auditor.record_own_event(&CoordEvent::TailRepaired(coord::TailRepaired {
                line: r.line,
                removed_bytes: r.removed_bytes,
                removed_blake3: r.removed_blake3,
            }))?;
        }
        Ok(auditor)
    }

    /// The public key as 64 lowercase hex digits.
    pub(crate) fn public_key_hex(&self) -> String {
        hex::encode(self.public.as_bytes())
    }

    /// Append one entry (`actor` caused `event`) and fsync it. Only perform
    /// the recorded action when this returns `Ok`.
    ///
    /// Safe to call from async code on the multi-threaded runtime (the
    /// fsync runs under `block_in_place`) and from plain threads.
    pub(crate) fn record(&self, actor: &str, event: &CoordEvent) -> Result<(), AuditError> {
        let details = details(event)?;
        blocking(|| self.append(actor, event.kind(), &details))
    }

    /// The coordinator's own identity (the actor of its events).
    pub(crate) fn actor(&self) -> &str {
        &self.actor
    }

    /// [`record`](Self::record) with the coordinator as the actor.
    pub(crate) fn record_own_event(&self, event: &CoordEvent) -> Result<(), AuditError> {
        self.record(&self.actor, event)
    }

    /// Append `entries` by `actor`, all fsynced together (group commit:
    /// one fsync instead of one each). Only perform the recorded actions
    /// when this returns `Ok`; then all of them may take effect.
    pub(crate) fn record_batch(
        &self,
        actor: &str,
        entries: &[CoordEvent],
    ) -> Result<(), AuditError> {
        let details = entries
            .iter()
            .map(|e| Ok((e.kind(), details(e)?)))
            .collect::<Result<Vec<_>, AuditError>>()?;
        blocking(|| {
            let entries: Vec<_> = details.iter().map(|(k, d)| (k.as_str(), d)).collect();
            let mut inner = self.inner.lock().map_err(|_| AuditError::Lock)?;
            inner
                .log
                .append_batch(super::clock::unix_ms(), actor, &entries)?;
            self.after_append(&mut inner);
            Ok(())
        })
    }

    fn append(
        &self,
        actor: &str,
        event: EventKind,
        details: &serde_json::Value,
    ) -> Result<(), AuditError> {
        let mut inner = self.inner.lock().map_err(|_| AuditError::Lock)?;
        inner
            .log
            .append(super::clock::unix_ms(), actor, event.as_str(), details)?;
        self.after_append(&mut inner);
        Ok(())
    }

    /// After entries are on disk: note the file's size and rotate past
    /// `rotate_bytes`.
    fn after_append(&self, inner: &mut Inner) {
        // The line is on disk; its exact length only matters for rotation.
        let len = fs::metadata(inner.log.path()).map(|m| m.len());
        inner.bytes = len.unwrap_or(inner.bytes);
        if inner.bytes >= self.rotate_bytes {
            match inner.log.rotate() {
                Ok(rotated) => {
                    inner.bytes = 0;
                    tracing::info!(rotated = %rotated.display(), "audit log rotated");
                }
                // The entry is written; a half-done rotation makes the next
                // append fail (and the next start completes it).
                Err(e) => tracing::error!(error = %e, "rotating the audit log failed"),
            }
        }
    }

    /// The log's current head, signed now.
    pub(crate) fn signed_head(&self) -> Result<SignedHead, AuditError> {
        let inner = self.inner.lock().map_err(|_| AuditError::Lock)?;
        Ok(inner.log.signed_head(super::clock::unix_ms())?)
    }

    /// [`signed_head`](Self::signed_head) as the protocol's `AuditHead`
    /// message, to send to a site (which records it in its own log).
    pub(crate) fn head_message(&self) -> Result<fedlink_protocol::message::AuditHead, AuditError> {
        let own = self.signed_head()?;
        let sig = hex::decode(&own.sig)
            .ok()
            .and_then(|s| <[u8; 64]>::try_from(s).ok())
            .ok_or(AuditError::BadHead)?;
        Ok(fedlink_protocol::message::AuditHead {
            seq: own.seq,
            hash: own.hash.0,
            ts_unix_ms: own.ts_unix_ms,
            sig,
        })
    }
}

/// An event's details, as the entry holds them.
fn details(event: &CoordEvent) -> Result<serde_json::Value, AuditError> {
    event.details().map_err(|source| AuditError::Details {
        event: event.kind(),
        source,
    })
}

/// Run `f` (which blocks on disk I/O) without stalling other tasks of a
/// multi-threaded runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), AuditError> {
    let setup = |why: String| AuditError::Setup {
        path: dir.to_path_buf(),
        why,
    };
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|e| setup(e.to_string()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| setup(e.to_string()))?;
    }
    Ok(())
}

/// Write the public key file, or check that an existing one holds the same
/// key (a different one means the log was started with another key).
fn export_key(path: &Path, key: &VerifyingKey) -> Result<(), AuditError> {
    let setup = |why: String| AuditError::Setup {
        path: path.to_path_buf(),
        why,
    };
    let text = format!("{}\n", hex::encode(key.as_bytes()));
    match fs::read(path) {
        Ok(existing) => {
            let parsed = std::str::from_utf8(&existing)
                .ok()
                .and_then(|t| fedlink_audit::parse_verifying_key(t).ok());
            if parsed == Some(*key) {
                return Ok(());
            }
            Err(setup(format!(
                "holds another public key than this coordinator's audit key; the log next to it \
                 was written with another key. Move {} aside (keep it for review) to start a new \
                 log",
                path.parent().unwrap_or(path).display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Whole or absent, never overwritten, mode 0600 like everything
            // in the data directory.
            fedlink_durable::create_new(path, text.as_bytes(), fedlink_durable::Mode::Private)
                .map_err(|e| setup(e.to_string()))?;
            Ok(())
        }
        Err(e) => Err(setup(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A typed event is written as the `json!` details were: its name from
    /// `kind()`, its members sorted by name, batches alike.
    #[test]
    fn typed_events_are_written_with_the_bytes_of_their_json_details() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[9; 32]);
        let a =
            Auditor::open(dir.path(), key, "fedlink://f/coordinator/c".into(), 1 << 20).unwrap();
        let received = |accepted: bool| {
            CoordEvent::UpdateReceived(coord::UpdateReceived {
                job: "j".into(),
                round: 2,
                site: "a".into(),
                payload_hash: "ab".into(),
                payload_bytes: 10,
                num_examples: 3,
                nonce: "cd".into(),
                envelope_sig: "ef".into(),
                accepted,
                reason: (!accepted).then(|| "too late".to_owned()),
            })
        };
        a.record("fedlink://f/site/a", &received(true)).unwrap();
        a.record_batch("fedlink://f/site/a", &[received(false)])
            .unwrap();
        let text = fs::read_to_string(dir.path().join("audit/audit.jsonl")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        for (line, accepted, reason) in
            [(lines[0], true, "null"), (lines[1], false, "\"too late\"")]
        {
            let want = format!(
                r#""event":"update.received","details":{{"accepted":{accepted},"envelope_sig":"ef","job":"j","nonce":"cd","num_examples":3,"payload_bytes":10,"payload_hash":"ab","reason":{reason},"round":2,"site":"a"}},"prev":"#
            );
            assert!(line.contains(&want), "{line}\n{want}");
        }
    }

    #[test]
    fn records_verify_and_rotate_keeps_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[9; 32]);
        let a = Auditor::open(
            dir.path(),
            key.clone(),
            "fedlink://f/coordinator/coordinator".into(),
            600,
        )
        .unwrap();
        for i in 0..10 {
            a.record_own_event(&CoordEvent::DiskOk(coord::DiskSpace {
                free_bytes: i,
                min_free_bytes: 1,
            }))
            .unwrap();
        }
        let head = a.signed_head().unwrap();
        assert_eq!(head.seq, 9);
        let pubkey =
            fedlink_audit::load_verifying_key(dir.path().join("audit/audit-key.pub")).unwrap();
        assert_eq!(pubkey, key.verifying_key());
        let segs = fedlink_audit::segments(dir.path().join("audit/audit.jsonl")).unwrap();
        assert!(segs.len() > 1, "rotated: {segs:?}");
        let report = fedlink_audit::verify(&segs, &pubkey, Some(&head)).unwrap();
        assert_eq!(report.entries, 10);
        drop(a);
        // Another key: refused with a clear message.
        let other = SigningKey::from_bytes(&[1; 32]);
        let err = Auditor::open(dir.path(), other, "x".into(), 600).unwrap_err();
        assert!(err.to_string().contains("another public key"), "{err}");
    }
}
