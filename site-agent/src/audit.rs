//! The site's audit log: a [`fedlink_audit::AuditLog`] (hash-chained JSON
//! Lines, every entry signed with the site's ed25519 **update key** from its
//! kit) of what the agent received, trained, sent and refused.
//!
//! ```text
//!  agent ──record(now, SiteEvent)──▶ SiteAudit ──append + fsync──▶ <data_dir>/audit.jsonl
//!    │ (before the action)              │ rotate past audit_rotate_bytes ─▶ audit.NNNNNN.jsonl
//!    │                                  └─ signed_head(now) ──▶ AuditHead to the coordinator
//!    └─ coordinator's AuditHead ──▶ record(CoordinatorAuditHead)
//! ```
//!
//! Every entry is on disk before the action it records happens (an
//! `update.sent` before the first byte of the upload). The coordinator knows
//! the site's update public key from `sites.toml`, so an auditor can verify
//! this log (`fedlink audit verify --key update-key.pub.pem`) and compare it
//! with the coordinator's (`fedlink audit reconcile`).
//!
//! Entries hold identifiers, hashes, counts and aggregate metrics only:
//! never data. The dataset appears as its fingerprint (a blake3 over the
//! dataset's files and loader configuration, [`crate::data::Fingerprint`]).
//!
//! Event types and their `details` (field names are the federation-wide
//! audit schema; a few extra fields are added for the hospital's own use):
//!
//! | event | actor | details |
//! |---|---|---|
//! | `agent.started` | site | `version, site, config_blake3`, + dataset/device |
//! | `agent.stopped` | site | `reason` |
//! | `audit.tail_repaired` | site | `line, removed_bytes, removed_blake3` (a torn last line left by a crash) |
//! | `conn.established` | site | `coordinator`, + `site_id, federation, protocol_version` |
//! | `conn.lost` | site | `reason`, + `retry_in_ms` |
//! | `offer.received` | coordinator | `job, round, base_model`, + task summary (arch, epochs, encoding, privacy, augmentation, class weighting, `optimizer` as on the wire with its weight decay or momentum, `learning_rate`) |
//! | `offer.accepted` / `offer.declined` | site | `job, round` (+ `reason`: the policy's) |
//! | `round.cancelled` / `round.failed` | coordinator / site | `job, round, reason`/`error` |
//! | `model.received` | coordinator | `model, bytes, from_cache` (+ `as_update_of`: the base a downlink update was applied to, protocol ≥ 7) |
//! | `model.refused` | coordinator | `model, error` (+ `as_update_of`): a downlink update or model that failed to decode or to hash to the announced model; the whole model is fetched instead |
//! | `train.completed` | site | `job, round, base_model, dataset_fingerprint, num_examples, metrics` |
//! | `update.sent` | site | `job, round, payload_hash, payload_bytes, num_examples, nonce, base_model, encoding` |
//! | `update.result` | coordinator | `job, round, payload_hash, accepted, reason`, + `nonce, outcome` |
//! | `round.outcome` | coordinator | `job, round, model, job_completed` (protocol ≥ 4: the model a round the site contributed to produced; the job's final model) |
//! | `eval.reported` | site | `job, round, model, num_eval_examples, loss, accuracy, auc, dice` (protocol ≥ 6: the metrics of a model the coordinator asked about, on the validation split, recorded before they are sent) |
//! | `coordinator.audit_head` | coordinator | `seq, hash, ts_unix_ms, sig` (recorded, not verified) |
//!
//! Hashes are lowercase hex; the nonce is its 16 bytes in lowercase hex.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
/// The agent's events and who causes them: the audit vocabulary, kept in
/// `fedlink-audit` beside the coordinator's.
pub use fedlink_audit::site::{self, Cause, SiteEvent};
use fedlink_audit::{AuditLog, Error, SignedHead};
use fedlink_protocol::AuditHead;

/// Default file name of the audit log inside `data_dir`.
pub const DEFAULT_FILE: &str = "audit.jsonl";
/// Smallest accepted `audit_rotate_bytes`.
pub const MIN_ROTATE_BYTES: u64 = 64 * 1024;

/// One entry as written (for observers; the file is the record).
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    /// Sequence number (from 0, across rotations).
    pub seq: u64,
    /// Writer's time, unix milliseconds.
    pub ts_unix_ms: u64,
    /// Who caused it.
    pub actor: String,
    /// Event type.
    pub event: String,
    /// Event details.
    pub details: serde_json::Value,
}

/// The site's open audit log.
#[derive(Debug)]
pub struct SiteAudit {
    log: AuditLog,
    site_actor: String,
    coordinator_actor: String,
    rotate_bytes: Option<u64>,
}

impl SiteAudit {
    /// Open (or create, mode 0600) the log at `path`, signed with `key`,
    /// and continue its chain. A torn last line left by a crash during a
    /// write is removed and the repair recorded as `audit.tail_repaired` (the
    /// entry was never completed, so the action it announced did not
    /// happen). Any other invalid content is refused.
    pub fn open(
        path: &Path,
        key: SigningKey,
        site_actor: String,
        coordinator_actor: String,
        rotate_bytes: Option<u64>,
        now_unix_ms: u64,
    ) -> Result<Self, Error> {
        let (log, repair) = AuditLog::open_repairing(path, key)?;
        let mut audit = Self {
            log,
            site_actor,
            coordinator_actor,
            rotate_bytes,
        };
        if let Some(r) = repair {
            tracing::warn!(
                line = r.line,
                bytes = r.removed_bytes,
                "removed a torn last line of the audit log"
            );
            audit.record(
                now_unix_ms,
                &SiteEvent::TailRepaired(site::TailRepaired {
                    line: r.line,
                    removed_bytes: r.removed_bytes,
                    removed_blake3: r.removed_blake3,
                }),
            )?;
        }
        Ok(audit)
    }

    /// The current file.
    pub fn path(&self) -> &Path {
        self.log.path()
    }

    /// The actor of coordinator-caused entries from now on (the identity in
    /// the coordinator's certificate).
    pub fn set_coordinator_actor(&mut self, actor: String) {
        self.coordinator_actor = actor;
    }

    /// Append `event` and fsync it (then rotate if the file is past the
    /// configured size). Perform the action only after this returned `Ok`.
    pub fn record(&mut self, now_unix_ms: u64, event: &SiteEvent) -> Result<Recorded, Error> {
        let (name, details) = event.split();
        let actor = match event.cause() {
            Cause::Site => &self.site_actor,
            Cause::Coordinator => &self.coordinator_actor,
        };
        let head = self.log.append(now_unix_ms, actor, &name, &details)?;
        let recorded = Recorded {
            seq: head.seq,
            ts_unix_ms: now_unix_ms,
            actor: actor.clone(),
            event: name,
            details,
        };
        if let Some(limit) = self.rotate_bytes {
            let len = std::fs::metadata(self.log.path()).map_or(0, |m| m.len());
            if len >= limit {
                let rotated = self.log.rotate()?;
                tracing::info!(file = %rotated.display(), "audit log rotated");
            }
        }
        Ok(recorded)
    }

    /// The head of the log signed at `now_unix_ms`, as sent to the
    /// coordinator (`None` while the log is empty).
    pub fn wire_head(&self, now_unix_ms: u64) -> Result<Option<AuditHead>, Error> {
        if self.log.head().is_none() {
            return Ok(None);
        }
        let head = self.log.signed_head(now_unix_ms)?;
        Ok(Some(to_wire(&head)?))
    }
}

/// A [`SignedHead`] as a protocol [`AuditHead`].
pub fn to_wire(head: &SignedHead) -> Result<AuditHead, Error> {
    let mut sig = [0u8; 64];
    hex::decode_to_slice(&head.sig, &mut sig)
        .map_err(|e| Error::InvalidEntry(format!("head signature: {e}")))?;
    Ok(AuditHead {
        seq: head.seq,
        hash: head.hash.0,
        ts_unix_ms: head.ts_unix_ms,
        sig,
    })
}

/// A protocol [`AuditHead`] as a [`SignedHead`] (to verify it).
pub fn from_wire(head: &AuditHead) -> SignedHead {
    SignedHead {
        seq: head.seq,
        hash: fedlink_audit::EntryHash(head.hash),
        ts_unix_ms: head.ts_unix_ms,
        sig: hex::encode(head.sig),
    }
}

/// Why `fedlink-agent audit-head` failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The kit could not be loaded or has no update key.
    #[error("startup kit {}: {source}", dir.display())]
    Kit {
        /// The kit directory.
        dir: PathBuf,
        /// What is wrong.
        source: fedlink_certs::Error,
    },
    /// The log could not be read, does not verify, or the head could not be
    /// written.
    #[error(transparent)]
    Audit(#[from] Error),
    /// The log does not exist or has no entries: no head to vouch for.
    #[error("{}: the audit log is missing or empty", path.display())]
    Empty {
        /// The log.
        path: PathBuf,
    },
}

/// Sign the head of the site's audit log (after verifying the whole log,
/// rotated files included, with the kit's update key) and write it to `out`
/// as JSON, for an auditor to keep elsewhere (`fedlink audit verify --head`).
///
/// While the agent holds the log, the log is read without the lock (and
/// still verified); otherwise [`AuditLog::export_head`] is used.
pub fn export_head(
    config: &crate::SiteConfig,
    out: &Path,
    now_unix_ms: u64,
) -> Result<SignedHead, ExportError> {
    let kit_err = |source| ExportError::Kit {
        dir: config.kit_dir.clone(),
        source,
    };
    let kit = fedlink_certs::Kit::load(&config.kit_dir).map_err(kit_err)?;
    let key = kit
        .update_signing_key()
        .ok_or_else(|| {
            kit_err(fedlink_certs::Error::Refused(
                "the kit has no update-signing key".into(),
            ))
        })?
        .clone();
    let path = config.audit_log_path();
    // `AuditLog::open` would create a missing log: refuse first.
    if fedlink_audit::segments(&path)?.is_empty() {
        return Err(ExportError::Empty { path });
    }
    match AuditLog::open(&path, key.clone()) {
        Ok(log) if log.head().is_none() => Err(ExportError::Empty { path }),
        Ok(log) => Ok(log.export_head(now_unix_ms, out)?),
        Err(Error::Locked { .. }) => {
            // The agent is running: verify what is on disk, read-only.
            let files = fedlink_audit::segments(&path)?;
            let report = fedlink_audit::Verifier::new()
                .key(key.verifying_key())
                .verify(&files)
                .map_err(Error::from)?;
            let head = report.last.ok_or(ExportError::Empty { path })?;
            let signed = SignedHead::sign(&key, head, now_unix_ms);
            fedlink_audit::write_head(out, &signed)?;
            Ok(signed)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlink_audit::{EntryReader, verify};
    use fedlink_protocol::{FederationId, JobId, RoundId, SiteId};

    const SITE: &str = "fedlink://fed/site/a";
    const COORD: &str = "fedlink://fed/coordinator/coordinator";

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[9; 32])
    }

    fn open(path: &Path, rotate: Option<u64>) -> SiteAudit {
        SiteAudit::open(path, key(), SITE.into(), COORD.into(), rotate, 1).unwrap()
    }

    fn sent(round: u64) -> SiteEvent {
        SiteEvent::UpdateSent(site::UpdateSent {
            job: JobId::new("j").unwrap(),
            round: RoundId(round),
            payload_hash: "ab".repeat(32),
            payload_bytes: 10,
            num_examples: 3,
            nonce: "00".repeat(16),
            base_model: "cd".repeat(32),
            encoding: "f32".into(),
            feature_stats: false,
        })
    }

    #[test]
    fn entries_are_signed_with_the_update_key_and_name_the_actor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = open(&path, None);
        let r = log.record(5, &sent(1)).unwrap();
        assert_eq!(
            (r.seq, r.event.as_str(), r.actor.as_str()),
            (0, "update.sent", SITE)
        );
        assert_eq!(r.details["payload_bytes"], 10);
        let r = log
            .record(
                6,
                &SiteEvent::UpdateResult(site::UpdateResult {
                    job: JobId::new("j").unwrap(),
                    round: RoundId(1),
                    payload_hash: "ab".repeat(32),
                    nonce: "00".repeat(16),
                    outcome: "ack".into(),
                    accepted: true,
                    reason: None,
                }),
            )
            .unwrap();
        assert_eq!(r.actor, COORD);
        assert!(r.details["reason"].is_null());
        let head = log.wire_head(7).unwrap().unwrap();
        assert_eq!(head.seq, 1);
        drop(log);
        let report = verify(&[&path], &key().verifying_key(), Some(&from_wire(&head))).unwrap();
        assert_eq!(report.entries, 2);
        let entries: Vec<_> = EntryReader::new(&[&path]).map(|e| e.unwrap()).collect();
        assert_eq!(entries[1].entry.event, "update.result");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        }
    }

    /// The entry shape is the log format: the name from `EventKind`, the
    /// details exactly the variant's fields (no tag, no wrapper), as before
    /// the vocabulary moved into `fedlink-audit`.
    #[test]
    fn event_names_and_details_keep_the_log_format() {
        let (name, details) = sent(2).split();
        assert_eq!(name, "update.sent");
        assert_eq!(
            details,
            serde_json::json!({"job": "j", "round": 2, "payload_hash": "ab".repeat(32),
                "payload_bytes": 10, "num_examples": 3, "nonce": "00".repeat(16),
                "base_model": "cd".repeat(32), "encoding": "f32", "feature_stats": false})
        );
        let (name, details) = SiteEvent::AgentStopped(site::AgentStopped {
            reason: "signal".into(),
        })
        .split();
        assert_eq!(
            (name.as_str(), details),
            ("agent.stopped", serde_json::json!({"reason": "signal"}))
        );
        let (name, details) = SiteEvent::OfferReceived(site::OfferReceived {
            job: JobId::new("j").unwrap(),
            round: RoundId(1),
            base_model: "cd".repeat(32),
            arch: "mlp".into(),
            epochs: 1,
            encoding: "f32".into(),
            clip_norm: None,
            noise_multiplier: None,
            central_noise_multiplier: None,
            augmentation: None,
            class_weight: None,
            optimizer: None,
            learning_rate: None,
        })
        .split();
        assert_eq!(name, "offer.received");
        assert!(details.get("optimizer").is_none());
        assert!(details.get("learning_rate").is_none());
        assert!(details.get("central_noise_multiplier").is_none());
        assert!(details.get("augmentation").is_none());
        assert!(details["clip_norm"].is_null());
        let (_, details) = SiteEvent::OfferReceived(site::OfferReceived {
            job: JobId::new("j").unwrap(),
            round: RoundId(1),
            base_model: "cd".repeat(32),
            arch: "unet".into(),
            epochs: 1,
            encoding: "f16".into(),
            clip_norm: None,
            noise_multiplier: None,
            central_noise_multiplier: None,
            augmentation: Some(fedlink_protocol::message::Augmentation {
                flips: true,
                rotate90: false,
                intensity_jitter: None,
            }),
            class_weight: Some("balanced".into()),
            optimizer: Some(fedlink_protocol::Optimizer::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
                weight_decay: 0.1,
            }),
            learning_rate: Some(0.003),
        })
        .split();
        assert_eq!(details["class_weight"], "balanced");
        assert_eq!(details["optimizer"]["AdamW"]["weight_decay"], 0.1);
        assert_eq!(details["learning_rate"], 0.003);
        assert_eq!(details["augmentation"]["flips"], true);
        assert_eq!(details["augmentation"]["rotate90"], false);
    }

    /// `job`, `round`, `site_id` and `federation` are typed ids
    /// (`JobId`, `RoundId`, `SiteId`, `FederationId`) since session 13; in
    /// the log they are still the JSON string and number they were as
    /// `String` and `u64`.
    #[test]
    fn typed_ids_write_the_same_json_as_the_raw_ones() {
        let job = || JobId::new("job-7").unwrap();
        let round = RoundId(12);
        let events = [
            SiteEvent::OfferAccepted(site::OfferAccepted { job: job(), round }),
            SiteEvent::OfferDeclined(site::OfferDeclined {
                job: job(),
                round,
                reason: "r".into(),
            }),
            SiteEvent::RoundCancelled(site::RoundCancelled {
                job: job(),
                round,
                reason: "r".into(),
                dropped_work: true,
            }),
            SiteEvent::RoundFailed(site::RoundFailed {
                job: job(),
                round,
                error: "e".into(),
            }),
            SiteEvent::RoundOutcome(site::RoundOutcome {
                job: job(),
                round,
                model: "cd".repeat(32),
                job_completed: false,
            }),
            SiteEvent::UpdateResumed(site::UpdateResumed {
                job: job(),
                round,
                payload_hash: "ab".repeat(32),
                nonce: "00".repeat(16),
                from_record: 1,
                bytes_held: 2,
                bytes_sent: 3,
            }),
            SiteEvent::EvalReported(site::EvalReported {
                job: job(),
                round,
                model: "cd".repeat(32),
                num_eval_examples: 4,
                loss: None,
                accuracy: None,
                auc: None,
                dice: None,
            }),
        ];
        for event in events {
            let (name, details) = event.split();
            // The old form's fields, written as the raw types they were.
            assert_eq!(details["job"], serde_json::json!("job-7"), "{name}");
            assert_eq!(details["round"], serde_json::json!(12u64), "{name}");
            assert_eq!(
                serde_json::to_string(&details["round"]).unwrap(),
                serde_json::to_string(&12u64).unwrap()
            );
        }
        let (_, details) = SiteEvent::ConnEstablished(site::ConnEstablished {
            coordinator: "c".into(),
            site_id: SiteId::new("hospital-a").unwrap(),
            federation: FederationId::new("fed").unwrap(),
            protocol_version: 7,
            transport: "quic".into(),
            proxy: None,
            transport_reason: "configured".into(),
        })
        .split();
        assert_eq!(
            details,
            serde_json::json!({"coordinator": "c", "site_id": "hospital-a", "federation": "fed",
                "protocol_version": 7, "transport": "quic", "proxy": null,
                "transport_reason": "configured"})
        );
    }

    #[test]
    fn reopening_continues_and_a_torn_tail_is_repaired_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        open(&path, None).record(1, &sent(1)).unwrap();
        // a crash in the middle of the next write
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"seq\":1,\"ts_unix");
        std::fs::write(&path, &bytes).unwrap();
        let mut log = open(&path, None);
        let r = log.record(3, &sent(2)).unwrap();
        assert_eq!(r.seq, 2, "seq 1 is the repair entry");
        drop(log);
        let entries: Vec<_> = EntryReader::new(&[&path]).map(|e| e.unwrap()).collect();
        assert_eq!(entries[1].entry.event, "audit.tail_repaired");
        assert_eq!(entries[1].entry.details["removed_bytes"], 17);
        verify(&[&path], &key().verifying_key(), None).unwrap();
    }

    #[test]
    fn rotation_past_the_limit_keeps_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = open(&path, Some(MIN_ROTATE_BYTES));
        let mut n = 0;
        while fedlink_audit::segments(&path).unwrap().len() < 2 {
            log.record(n, &sent(n)).unwrap();
            n += 1;
        }
        log.record(n, &sent(n)).unwrap();
        drop(log);
        let files = fedlink_audit::segments(&path).unwrap();
        let report = verify(&files, &key().verifying_key(), None).unwrap();
        assert_eq!(report.entries, n + 1);
    }

    #[test]
    fn a_coordinator_head_is_recorded_as_hex() {
        let h = AuditHead {
            seq: 3,
            hash: [1; 32],
            ts_unix_ms: 4,
            sig: [2; 64],
        };
        let (name, d) = SiteEvent::coordinator_head(&h).split();
        assert_eq!(name, "coordinator.audit_head");
        assert_eq!(d["hash"], "01".repeat(32));
        assert_eq!(d["sig"], "02".repeat(64));
        assert_eq!(d["seq"], 3);
        assert_eq!(to_wire(&from_wire(&h)).unwrap(), h);
    }
}
