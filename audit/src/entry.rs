//! The entry format: fields, canonical signed bytes, entry hashes, signed heads.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Domain separator of entry signatures: the signed message is
/// `blake3(ENTRY_DOMAIN || U)`, `U` the entry's unsigned JSON (see the crate docs).
pub const ENTRY_DOMAIN: &[u8] = b"fedlink/audit/v1\0";

/// Domain separator of signed heads: the signed message is
/// `blake3(HEAD_DOMAIN || seq (u64 LE) || hash (32 bytes) || ts_unix_ms (u64 LE))`.
pub const HEAD_DOMAIN: &[u8] = b"fedlink/audit-head/v1\0";

/// Longest line (entry) accepted, newline excluded: 1 MiB. The writer refuses
/// to write a longer entry and readers stop before buffering more.
pub const MAX_LINE_LEN: usize = 1 << 20;

/// The suffix that closes every line: `,"sig":"` + 128 hex digits + `"}`.
const SIG_PREFIX: &[u8] = b",\"sig\":\"";
const SIG_HEX_LEN: usize = 128;
const SIG_SUFFIX_LEN: usize = SIG_PREFIX.len() + SIG_HEX_LEN + 2;

/// A 32-byte blake3 hash of one entry's line (without its newline); written
/// as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryHash(pub [u8; 32]);

impl EntryHash {
    /// The `prev` of the very first entry of a log: 32 zero bytes.
    pub const GENESIS: Self = Self([0; 32]);

    /// The hash of a line as stored (without its trailing newline).
    pub fn of_line(line: &[u8]) -> Self {
        Self(*blake3::hash(line).as_bytes())
    }
}

impl fmt::Display for EntryHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for EntryHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryHash({self})")
    }
}

/// A hex string that is not exactly the expected number of lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {expected} lowercase hex digits, got {got:?}")]
pub struct HexError {
    /// Number of hex digits expected.
    pub expected: usize,
    /// What was found (truncated to 80 characters).
    pub got: String,
}

/// Decode exactly `N` bytes from `2 N` lowercase hex digits (strict: no
/// uppercase, no prefix, no whitespace — so that one value has one spelling).
pub(crate) fn strict_hex<const N: usize>(s: &str) -> Result<[u8; N], HexError> {
    let err = || HexError {
        expected: 2 * N,
        got: s.chars().take(80).collect(),
    };
    if s.len() != 2 * N || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(err());
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
    Ok(out)
}

impl FromStr for EntryHash {
    type Err = HexError;
    fn from_str(s: &str) -> Result<Self, HexError> {
        strict_hex::<32>(s).map(Self)
    }
}

impl Serialize for EntryHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for EntryHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One audit entry, as stored on one line of the log.
///
/// Fields are serialized in this order; `sig` is always last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Sequence number: 0 for the first entry of a log, +1 per entry, across rotations.
    pub seq: u64,
    /// When the writer recorded it (milliseconds since the Unix epoch, as
    /// passed by the caller).
    pub ts_unix_ms: u64,
    /// Who caused it: a certificate identity (`fedlink://fed/site/a`) or `system`.
    pub actor: String,
    /// Event type, dotted, e.g. `update.received`.
    pub event: String,
    /// Event-specific details (a JSON object).
    pub details: serde_json::Value,
    /// Hash of the previous entry's line ([`EntryHash::GENESIS`] for the first).
    pub prev: EntryHash,
    /// ed25519 signature (128 hex digits) over the entry without `sig`.
    pub sig: String,
}

/// The signed part of an entry, borrowed; serialized in the same field order.
#[derive(Serialize)]
struct Unsigned<'a> {
    seq: u64,
    ts_unix_ms: u64,
    actor: &'a str,
    event: &'a str,
    details: &'a serde_json::Value,
    prev: EntryHash,
}

/// The position of the newest entry of a log: its sequence number and the
/// hash of its line. The next entry chains from `hash` and has `seq + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EntryHead {
    /// Sequence number of the entry.
    pub seq: u64,
    /// Hash of the entry's line.
    pub hash: EntryHash,
}

/// The digest an entry signature signs: `blake3(ENTRY_DOMAIN || unsigned_json)`.
pub(crate) fn entry_digest(unsigned_json: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(ENTRY_DOMAIN);
    h.update(unsigned_json);
    *h.finalize().as_bytes()
}

/// Encode and sign one entry. Returns the line (without newline) and its hash.
pub(crate) fn encode_entry(
    key: &SigningKey,
    seq: u64,
    ts_unix_ms: u64,
    actor: &str,
    event: &str,
    details: &serde_json::Value,
    prev: EntryHash,
) -> Result<(Vec<u8>, EntryHash), serde_json::Error> {
    let unsigned = serde_json::to_vec(&Unsigned {
        seq,
        ts_unix_ms,
        actor,
        event,
        details,
        prev,
    })?;
    let sig = key.sign(&entry_digest(&unsigned));
    // `unsigned` is a JSON object and so ends with `}`: replace it with the
    // signature member and close again.
    let mut line = unsigned;
    line.pop();
    line.extend_from_slice(SIG_PREFIX);
    line.extend_from_slice(hex::encode(sig.to_bytes()).as_bytes());
    line.extend_from_slice(b"\"}");
    let hash = EntryHash::of_line(&line);
    Ok((line, hash))
}

/// One line split into its parsed entry and its signed bytes.
#[derive(Debug)]
pub(crate) struct ParsedLine {
    pub(crate) entry: Entry,
    /// The unsigned JSON `U` (line without the sig member, closed by `}`).
    pub(crate) unsigned: Vec<u8>,
    pub(crate) sig: Signature,
    pub(crate) hash: EntryHash,
}

/// Why one line is not a well-formed entry (before chain and signature checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LineError {
    /// Not JSON, or not an entry object.
    Json(String),
    /// Valid JSON entry but `sig` is not the last member in canonical form.
    Layout(&'static str),
}

/// Parse one line (no newline) into an entry and the bytes its signature covers.
pub(crate) fn parse_line(line: &[u8]) -> Result<ParsedLine, LineError> {
    let entry: Entry = serde_json::from_slice(line).map_err(|e| LineError::Json(e.to_string()))?;
    if !entry.details.is_object() {
        return Err(LineError::Layout("details is not a JSON object"));
    }
    let Some(split) = line.len().checked_sub(SIG_SUFFIX_LEN) else {
        return Err(LineError::Layout("line too short for a signature member"));
    };
    let (body, suffix) = line.split_at(split);
    if !suffix.starts_with(SIG_PREFIX) || !suffix.ends_with(b"\"}") {
        return Err(LineError::Layout(
            "the line does not end with the sig member (`,\"sig\":\"<128 hex>\"}`)",
        ));
    }
    let sig_hex = &suffix[SIG_PREFIX.len()..SIG_PREFIX.len() + SIG_HEX_LEN];
    if sig_hex != entry.sig.as_bytes() {
        return Err(LineError::Layout("sig member is not the last member"));
    }
    let sig_bytes = strict_hex::<64>(&entry.sig)
        .map_err(|_| LineError::Layout("sig is not 128 lowercase hex digits"))?;
    let mut unsigned = Vec::with_capacity(body.len() + 1);
    unsigned.extend_from_slice(body);
    unsigned.push(b'}');
    Ok(ParsedLine {
        entry,
        unsigned,
        sig: Signature::from_bytes(&sig_bytes),
        hash: EntryHash::of_line(line),
    })
}

impl ParsedLine {
    /// Check the entry's signature with `key` (strict ed25519 verification).
    pub(crate) fn signature_ok(&self, key: &VerifyingKey) -> bool {
        key.verify_strict(&entry_digest(&self.unsigned), &self.sig)
            .is_ok()
    }
}

/// A log head signed by the writer, to be kept somewhere else (another host,
/// the peer, an operator's ticket) so that a truncated tail can be detected.
///
/// Stored as JSON: `{"seq":…,"hash":"<64 hex>","ts_unix_ms":…,"sig":"<128 hex>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedHead {
    /// Sequence number of the newest entry when the head was taken.
    pub seq: u64,
    /// Hash of that entry's line.
    pub hash: EntryHash,
    /// When the head was signed (milliseconds since the Unix epoch, from the caller).
    pub ts_unix_ms: u64,
    /// ed25519 signature (128 hex digits) over
    /// `blake3(HEAD_DOMAIN || seq LE || hash || ts_unix_ms LE)`.
    pub sig: String,
}

fn head_digest(seq: u64, hash: &EntryHash, ts_unix_ms: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(HEAD_DOMAIN);
    h.update(&seq.to_le_bytes());
    h.update(&hash.0);
    h.update(&ts_unix_ms.to_le_bytes());
    *h.finalize().as_bytes()
}

impl SignedHead {
    /// Sign `head` at `ts_unix_ms` with `key`.
    pub fn sign(key: &SigningKey, head: EntryHead, ts_unix_ms: u64) -> Self {
        let sig = key.sign(&head_digest(head.seq, &head.hash, ts_unix_ms));
        Self {
            seq: head.seq,
            hash: head.hash,
            ts_unix_ms,
            sig: hex::encode(sig.to_bytes()),
        }
    }

    /// The entry position this head vouches for.
    pub fn entry_head(&self) -> EntryHead {
        EntryHead {
            seq: self.seq,
            hash: self.hash,
        }
    }

    /// Whether the signature is valid for `key` (strict ed25519).
    pub fn signature_ok(&self, key: &VerifyingKey) -> bool {
        let Ok(bytes) = strict_hex::<64>(&self.sig) else {
            return false;
        };
        key.verify_strict(
            &head_digest(self.seq, &self.hash, self.ts_unix_ms),
            &Signature::from_bytes(&bytes),
        )
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_line_parses_back_and_verifies() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let details = serde_json::json!({"b": 1, "a": [1.5, "x\n\"y"]});
        let (line, hash) =
            encode_entry(&key, 7, 1000, "system", "x.y", &details, EntryHash::GENESIS).unwrap();
        assert!(!line.contains(&b'\n'));
        let p = parse_line(&line).unwrap();
        assert_eq!(p.entry.seq, 7);
        assert_eq!(p.entry.details, details);
        assert_eq!(p.hash, hash);
        assert!(p.signature_ok(&key.verifying_key()));
        let other = SigningKey::from_bytes(&[4; 32]);
        assert!(!p.signature_ok(&other.verifying_key()));
        // The signed bytes are the line without the sig member.
        let text = String::from_utf8(p.unsigned.clone()).unwrap();
        assert!(text.starts_with("{\"seq\":7,\"ts_unix_ms\":1000,\"actor\":\"system\""));
        assert!(text.ends_with(&format!("\"prev\":\"{}\"}}", "0".repeat(64))));
    }

    #[test]
    fn head_signature_is_domain_separated() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let head = EntryHead {
            seq: 3,
            hash: EntryHash([9; 32]),
        };
        let signed = SignedHead::sign(&key, head, 55);
        assert!(signed.signature_ok(&key.verifying_key()));
        let mut forged = signed.clone();
        forged.seq = 2;
        assert!(!forged.signature_ok(&key.verifying_key()));
        let mut upper = signed;
        upper.sig = upper.sig.to_uppercase();
        assert!(!upper.signature_ok(&key.verifying_key()));
    }

    #[test]
    fn strict_hex_rejects_other_spellings() {
        assert!("AB".repeat(32).parse::<EntryHash>().is_err());
        assert!("ab".repeat(31).parse::<EntryHash>().is_err());
        assert!("ab".repeat(32).parse::<EntryHash>().is_ok());
    }
}
