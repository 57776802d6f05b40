//! fedlink audit logs: append-only, hash-chained, ed25519-signed JSON Lines,
//! signed heads, verification and review queries.
//!
//! The coordinator and every site agent keep one log each. Each entry records
//! one event — who (`actor`, a certificate identity), what (`event`,
//! `details`), when (`ts_unix_ms`) — and is written and fsynced **before** the
//! action it records takes effect.
//!
//! ```text
//!  caller (coordinator / agent)             reviewer (fedlink audit …)
//!  ----------------------------             --------------------------
//!  AuditLog::append(now, actor, event, details)
//!    | encode U = {seq,ts_unix_ms,actor,event,details,prev}
//!    | sig = ed25519(blake3("fedlink/audit/v1\0" || U))
//!    | write U+sig as one line, fsync            audit.000001.jsonl ┐
//!    v                                           audit.jsonl        ┘ files in order
//!  EntryHead {seq, hash}  ── next entry's prev        | Verifier / verify()
//!    |                                                |  syntax, seq, prev chain,
//!  export_head(now, HEAD.json) ── kept elsewhere ──►  |  signatures, signed head
//!                                                     v
//!                                  VerifyReport | VerifyFailure (file:line, seq, why)
//!                                  EntryReader + Filter (show)
//! ```
//!
//! # What it does not do
//!
//! - It does not read the clock: the caller passes `now_unix_ms`.
//! - It does not decide *what* to log, nor hold keys: the caller passes a
//!   [`SigningKey`](ed25519_dalek::SigningKey) (e.g. a site's update key).
//! - It cannot detect a truncated tail on its own: that needs a
//!   [`SignedHead`] kept somewhere the attacker cannot rewrite.
//! - It does not encrypt: entries are readable by whoever can read the file
//!   (mode 0600). Never log training data; log hashes and fingerprints.
//! - It does not ship logs anywhere or enforce retention.
//!
//! # Entry format
//!
//! One JSON object per line (UTF-8, `\n`-terminated), members in this order:
//!
//! | member | type | meaning |
//! |---|---|---|
//! | `seq` | u64 | 0, 1, 2, … continuing across rotated files |
//! | `ts_unix_ms` | u64 | writer's time, ms since the Unix epoch |
//! | `actor` | string | certificate identity (`fedlink://fed/site/a`) or `system` |
//! | `event` | string | dotted type, `[A-Za-z0-9._-]{1,128}`, e.g. `update.received` |
//! | `details` | object | event-specific (`site`, `round`, hashes, reasons, …) |
//! | `prev` | 64 hex | hash of the previous entry's line; 64 zeros for the very first |
//! | `sig` | 128 hex | ed25519 signature, always the last member |
//!
//! # Canonical signed bytes
//!
//! Let `U` be the compact JSON (as written by `serde_json`) of the entry
//! **without** `sig`: `{"seq":…,"ts_unix_ms":…,"actor":…,"event":…,"details":…,"prev":"…"}`.
//! The line on disk is exactly `U` with its final `}` replaced by
//! `,"sig":"<128 lowercase hex>"}`. The signature is ed25519 (verified
//! strictly) over the 32-byte digest `blake3(b"fedlink/audit/v1\0" || U)`.
//! A verifier recovers `U` from the raw line (strip the 138-byte sig suffix,
//! append `}`) — it never re-serializes, so JSON number formatting or map
//! ordering cannot change what was signed, and every byte of the line is
//! covered by the signature or is the signature.
//!
//! The entry's hash (the next entry's `prev`, and the `hash` in heads) is
//! `blake3` of the whole line without its newline (signature included), in
//! lowercase hex: `head -n1 audit.jsonl | tr -d '\n' | b3sum`.
//!
//! A [`SignedHead`] `{seq, hash, ts_unix_ms, sig}` signs
//! `blake3(b"fedlink/audit-head/v1\0" || seq as u64 LE || hash (32 bytes) || ts_unix_ms as u64 LE)`
//! with the same key; the distinct domain keeps entry and head signatures
//! from being swapped.
//!
//! # Rotation
//!
//! [`AuditLog::rotate`] renames `audit.jsonl` to the next free
//! `audit.NNNNNN.jsonl` and starts an empty `audit.jsonl`; its first entry's
//! `prev` is the hash of the rotated file's last entry, and `seq` continues.
//! Verify the files in order (`audit.*.jsonl audit.jsonl`, which is also the
//! shell's glob order) — [`segments`] lists them. Old files may be archived;
//! to verify from the middle, anchor the chain with
//! [`Verifier::start_after`].
//!
//! # Threat model
//!
//! An attacker who can write the log files **but does not have the writer's
//! key** cannot, without [`verify`] (with the key) naming the first bad entry:
//! edit any byte of any entry; delete, insert, reorder or duplicate entries
//! (sequence numbers and the hash chain break); splice entries from another
//! log (another key: bad signature; same key: the chain breaks); forge a
//! head. They **can** delete the tail (the last *n* entries, or the whole
//! log) — the remaining prefix is still a valid log. That is only detected
//! against a [`SignedHead`] obtained earlier and kept elsewhere
//! ([`AuditLog::export_head`], [`Verifier::head`]); a head proves that the
//! log reached at least that entry, not that nothing came after it.
//!
//! An attacker **with the key** (a compromised coordinator or site host) can
//! write any log they like from now on, and can rewrite history that has no
//! head held elsewhere. Heads exchanged with a peer or exported to another
//! host bound what they can rewrite to what came after the newest such head.
//!
//! Without a key ([`verify_chain`]), only internal consistency is checked:
//! anyone can produce a consistent chain, so that result proves nothing about
//! who wrote the log.
//!
//! Readers are bounded: lines over [`MAX_LINE_LEN`] are refused before more
//! is buffered, and no input makes verification panic.
//!
//! # Example
//!
//! ```
//! use fedlink_audit::{AuditLog, Filter, EntryReader, verify};
//! use ed25519_dalek::SigningKey;
//! use serde_json::json;
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("audit.jsonl");
//! let key = SigningKey::from_bytes(&[7; 32]);
//! let public = key.verifying_key();
//!
//! let mut log = AuditLog::open(&path, key)?;
//! log.append(1_000, "system", "coordinator.started", &json!({}))?;
//! log.append(2_000, "fedlink://fed/site/a", "update.received",
//!            &json!({"site": "a", "round": 3, "accepted": true}))?;
//! let head = log.signed_head(2_500)?; // keep it somewhere else
//!
//! let report = verify(&[&path], &public, Some(&head))?;
//! assert_eq!(report.entries, 2);
//!
//! let filter = Filter { round: Some(3), ..Filter::default() };
//! let hits: Vec<_> = EntryReader::new(&[&path])
//!     .filter(|e| e.as_ref().map_or(true, |e| filter.matches(&e.entry)))
//!     .collect::<Result<_, _>>()?;
//! assert_eq!(hits.len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod coord;
mod entry;
mod error;
pub mod event;
mod keys;
mod lines;
mod log;
mod query;
pub mod reconcile;
pub mod site;
mod verify;

pub use coord::CoordEvent;
pub use entry::{
    ENTRY_DOMAIN, Entry, EntryHash, EntryHead, HEAD_DOMAIN, HexError, MAX_LINE_LEN, SignedHead,
};
pub use error::Error;
pub use event::EventKind;
pub use keys::{load_verifying_key, parse_verifying_key};
pub use log::{
    AuditLog, MAX_ACTOR_LEN, MAX_EVENT_LEN, TornTailRepair, read_head, segments, write_head,
};
pub use query::{EntryReader, Filter, LocatedEntry, TimeParseError, format_time, parse_time};
pub use site::SiteEvent;
pub use verify::{
    FailureKind, FileReport, Verifier, VerifyFailure, VerifyReport, verify, verify_chain,
};

pub use ed25519_dalek;
