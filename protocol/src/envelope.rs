//! Signed update envelopes: the site signs a header, never the payload.
//!
//! A site signs, with its registered ed25519 *update key*, a canonical,
//! domain-separated [`UpdateHeader`] that binds the update to its context
//! (federation, site, job, round, base model), its encoding, its metrics,
//! a fresh nonce, and the length and blake3 hash of the payload bytes.
//! Signing the 300-odd header bytes costs ~30 µs whatever the model size.
//!
//! # Signed bytes
//!
//! `UPDATE_DOMAIN` (`b"fedlink/update/v1\0"`) followed by, all integers
//! little-endian, strings as `u32` length + UTF-8 bytes:
//!
//! ```text
//! u16  protocol_version
//! str  federation_id
//! str  site_id
//! str  job_id
//! u64  round
//! [32] base_model (ModelHash)
//! u64  num_examples
//! ...  encoding (Encoding::canonical_bytes)
//! u64  payload_len
//! [32] payload_hash (blake3 of the payload bytes)
//! [16] nonce
//! u8   metrics present (0/1), then if 1:
//!      u64 num_eval_examples; 4 × (u8 present, f64 bits) for loss,
//!      accuracy, auc, dice; u32 extra count, then per extra: str name, f64 bits
//! u8   feature_stats present (0/1), then if 1:
//!      u64 count; u32 n, n × str name; u32 n, n × f64 bits sum;
//!      u32 n, n × f64 bits sum_sq
//! ```
//!
//! # Verification order (coordinator)
//!
//! [`verify_update`], before any payload byte is decoded:
//!
//! 1. protocol version supported;
//! 2. the header's site id equals the identity authenticated by TLS;
//! 3. the site has a registered update key ([`KeyDirectory`]);
//! 4. the ed25519 signature verifies (strict) over the signed bytes;
//! 5. federation, job, round, base model (and encoding, if required) match;
//! 6. the declared payload length is within the bound for the model;
//! 7. the feature statistics, if any, are well formed
//!    ([`FeatureStats::validate`]);
//! 8. replay: the round was not already committed for this site, the
//!    nonce was not seen before ([`ReplayGuard`]); the nonce is recorded.
//!
//! Then the payload streams through the returned [`PayloadVerifier`]
//! (length and hash), whose [`PayloadVerifier::finish`] yields a
//! [`VerifiedUpdate`]; the coordinator commits the round with
//! [`ReplayGuard::commit`] when it accepts the update.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

use crate::codec::serde_codec;
use crate::encoding::Encoding;
use crate::ids::{FederationId, JobId, RoundId, SiteId};
use crate::message::VersionRange;
use crate::model::ModelHash;
use crate::payload::PayloadHash;
use crate::scaling::{FeatureStats, ScalingError};

/// Domain separation prefix of signed update headers.
pub const UPDATE_DOMAIN: &[u8] = b"fedlink/update/v1\0";
/// Nonce length in bytes.
pub const NONCE_LEN: usize = 16;
/// Most upload attempts (distinct nonces) a site may make in one round.
pub const MAX_ATTEMPTS_PER_ROUND: usize = 16;

/// A random, single-use nonce of an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UpdateNonce(pub [u8; NONCE_LEN]);

impl UpdateNonce {
    /// A fresh nonce from a cryptographic RNG (e.g. `rand::rngs::OsRng`).
    pub fn random(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut b = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut b);
        Self(b)
    }
}

/// A site's evaluation metrics, sent (and signed) with its update.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Examples evaluated.
    pub num_eval_examples: u64,
    /// Mean loss.
    pub loss: Option<f64>,
    /// Accuracy in `[0, 1]`.
    pub accuracy: Option<f64>,
    /// ROC AUC in `[0, 1]`.
    pub auc: Option<f64>,
    /// Dice coefficient in `[0, 1]` (segmentation).
    pub dice: Option<f64>,
    /// Other named metrics.
    pub extra: Vec<(String, f64)>,
}

impl EvalMetrics {
    pub(crate) fn canonical_bytes(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.num_eval_examples.to_le_bytes());
        for m in [self.loss, self.accuracy, self.auc, self.dice] {
            match m {
                Some(v) => {
                    out.push(1);
                    out.extend_from_slice(&v.to_bits().to_le_bytes());
                }
                None => out.push(0),
            }
        }
        out.extend_from_slice(&(self.extra.len() as u32).to_le_bytes());
        for (name, v) in &self.extra {
            put_str(out, name);
            out.extend_from_slice(&v.to_bits().to_le_bytes());
        }
    }
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The header a site signs for one update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateHeader {
    /// Protocol version the update was made for.
    pub protocol_version: u16,
    /// Federation.
    pub federation_id: FederationId,
    /// The signing site (must equal its TLS identity).
    pub site_id: SiteId,
    /// Job.
    pub job_id: JobId,
    /// Round.
    pub round: RoundId,
    /// Model the delta applies to.
    pub base_model: ModelHash,
    /// Training examples used (aggregation weight).
    pub num_examples: u64,
    /// Payload encoding.
    pub encoding: Encoding,
    /// Total payload bytes (chunk records).
    pub payload_len: u64,
    /// blake3 of the payload bytes.
    pub payload_hash: PayloadHash,
    /// Fresh random nonce.
    pub nonce: UpdateNonce,
    /// Evaluation metrics of the site.
    pub metrics: Option<EvalMetrics>,
    /// Sufficient statistics of the site's raw training features (tabular
    /// data), for federated standardisation; `None` for other data.
    pub feature_stats: Option<FeatureStats>,
}

impl UpdateHeader {
    /// The exact bytes that are signed: [`UPDATE_DOMAIN`] + canonical header.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(UPDATE_DOMAIN);
        out.extend_from_slice(&self.protocol_version.to_le_bytes());
        put_str(&mut out, self.federation_id.as_str());
        put_str(&mut out, self.site_id.as_str());
        put_str(&mut out, self.job_id.as_str());
        out.extend_from_slice(&self.round.0.to_le_bytes());
        out.extend_from_slice(&self.base_model.0);
        out.extend_from_slice(&self.num_examples.to_le_bytes());
        self.encoding.canonical_bytes(&mut out);
        out.extend_from_slice(&self.payload_len.to_le_bytes());
        out.extend_from_slice(&self.payload_hash.0);
        out.extend_from_slice(&self.nonce.0);
        match &self.metrics {
            Some(m) => {
                out.push(1);
                m.canonical_bytes(&mut out);
            }
            None => out.push(0),
        }
        match &self.feature_stats {
            Some(f) => {
                out.push(1);
                f.canonical_bytes(&mut out);
            }
            None => out.push(0),
        }
        out
    }
}

/// An ed25519 signature (64 bytes; serialised as two fixed 32-byte halves).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureBytes([u8; 32], [u8; 32]);

impl SignatureBytes {
    /// The 64 bytes.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[..32].copy_from_slice(&self.0);
        b[32..].copy_from_slice(&self.1);
        b
    }

    /// From 64 bytes.
    pub fn from_bytes(b: &[u8; 64]) -> Self {
        let mut r = [0u8; 32];
        let mut s = [0u8; 32];
        r.copy_from_slice(&b[..32]);
        s.copy_from_slice(&b[32..]);
        Self(r, s)
    }
}

/// A signed update header, as sent in
/// [`DeltaUpload`](crate::message::DeltaUpload).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    /// What is signed.
    pub header: UpdateHeader,
    /// ed25519 signature of [`UpdateHeader::signed_bytes`].
    pub signature: SignatureBytes,
}

serde_codec!(SignedEnvelope, ReplayGuard);

/// Sign an update header with the site's update key (site side).
pub fn sign_update(key: &SigningKey, header: UpdateHeader) -> SignedEnvelope {
    let sig = key.sign(&header.signed_bytes());
    SignedEnvelope {
        header,
        signature: SignatureBytes::from_bytes(&sig.to_bytes()),
    }
}

/// Registered update keys, by site identity.
pub trait KeyDirectory {
    /// The update key registered for `site`, if any.
    fn update_key(&self, site: &SiteId) -> Option<VerifyingKey>;
}

impl<S: std::hash::BuildHasher> KeyDirectory for HashMap<SiteId, VerifyingKey, S> {
    fn update_key(&self, site: &SiteId) -> Option<VerifyingKey> {
        self.get(site).copied()
    }
}

impl KeyDirectory for BTreeMap<SiteId, VerifyingKey> {
    fn update_key(&self, site: &SiteId) -> Option<VerifyingKey> {
        self.get(site).copied()
    }
}

/// What the coordinator expects of an update in the current round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedUpdate {
    /// Federation.
    pub federation_id: FederationId,
    /// Job.
    pub job_id: JobId,
    /// Current round.
    pub round: RoundId,
    /// Current global model.
    pub base_model: ModelHash,
    /// Required encoding (`None`: any valid encoding).
    pub encoding: Option<Encoding>,
    /// Largest acceptable payload length, e.g.
    /// [`max_payload_len`](crate::payload::max_payload_len) of the model.
    pub max_payload_len: u64,
}

/// Why an update was refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The header's protocol version is not supported.
    #[error("update made for unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    /// A resumed upload does not continue an interrupted one.
    #[error("upload cannot be resumed: {0}")]
    NotResumable(String),
    /// The header names another site than the TLS-authenticated one.
    #[error("update claims site {claimed} but the connection is authenticated as {authenticated}")]
    IdentityMismatch {
        /// From the certificate.
        authenticated: SiteId,
        /// From the header.
        claimed: SiteId,
    },
    /// No update key is registered for the site.
    #[error("no update key registered for site {0}")]
    UnknownSite(SiteId),
    /// The signature does not verify with the site's registered key.
    #[error("update signature does not verify with the key registered for the site")]
    BadSignature,
    /// Another federation.
    #[error("update is for federation {found}, expected {expected}")]
    FederationMismatch {
        /// Expected.
        expected: FederationId,
        /// In the header.
        found: FederationId,
    },
    /// Another job.
    #[error("update is for job {found}, expected {expected}")]
    JobMismatch {
        /// Expected.
        expected: JobId,
        /// In the header.
        found: JobId,
    },
    /// Another round.
    #[error("update is for round {found}, expected {expected}")]
    RoundMismatch {
        /// Expected.
        expected: RoundId,
        /// In the header.
        found: RoundId,
    },
    /// Another base model.
    #[error("update applies to model {found}, the round's model is {expected}")]
    BaseModelMismatch {
        /// Expected.
        expected: ModelHash,
        /// In the header.
        found: ModelHash,
    },
    /// Not the required encoding.
    #[error("update uses encoding {found}, the round requires {expected}")]
    EncodingMismatch {
        /// Required encoding name.
        expected: String,
        /// Encoding name in the header.
        found: String,
    },
    /// The declared payload length exceeds the bound.
    #[error("update declares {declared} payload bytes, more than the limit of {max}")]
    PayloadTooLarge {
        /// Declared.
        declared: u64,
        /// Limit.
        max: u64,
    },
    /// The nonce was already used by this site.
    #[error("nonce already used by site {0} (replay)")]
    NonceReplayed(SiteId),
    /// The site already had an update accepted in this round.
    #[error("site {site} already had an update accepted in round {round} (replay)")]
    RoundReplayed {
        /// Site.
        site: SiteId,
        /// Round.
        round: RoundId,
    },
    /// Too many upload attempts by this site in this round.
    #[error("site {0} made more than {MAX_ATTEMPTS_PER_ROUND} upload attempts this round")]
    TooManyAttempts(SiteId),
    /// The payload has more or fewer bytes than signed.
    #[error("payload length {actual} differs from the signed length {declared}")]
    PayloadLengthMismatch {
        /// Signed.
        declared: u64,
        /// Received (so far, when too long).
        actual: u64,
    },
    /// The payload hash differs from the signed hash.
    #[error("payload hash differs from the signed hash")]
    PayloadHashMismatch,
    /// The signed feature statistics are malformed or out of bounds.
    #[error("update carries bad feature statistics: {0}")]
    BadFeatureStats(ScalingError),
}

/// Verify a signed update header before any payload decoding (see the
/// module docs for the order). `authenticated` is the site identity of the
/// TLS connection. On success the nonce is recorded in `replay` and a
/// [`PayloadVerifier`] for the payload bytes is returned.
pub fn verify_update(
    envelope: &SignedEnvelope,
    authenticated: &SiteId,
    keys: &impl KeyDirectory,
    expected: &ExpectedUpdate,
    replay: &mut ReplayGuard,
) -> Result<PayloadVerifier, VerifyError> {
    verify_envelope(envelope, authenticated, keys, expected)?;
    let h = &envelope.header;
    replay.record_attempt(h)?;
    Ok(PayloadVerifier {
        header: h.clone(),
        hasher: blake3::Hasher::new(),
        seen: 0,
    })
}

/// Verify the envelope of an upload that resumes one a lost connection cut
/// short: every check of [`verify_update`] again (the site's key may have
/// been revoked, the round closed), then that it is the very same signed
/// header as the interrupted upload's, whose nonce the guard recorded and
/// whose round the site has not used. No new attempt is recorded. On
/// success `partial` — the hash and count of the payload bytes the
/// coordinator kept — continues with the remaining records, so the payload
/// hash still covers the whole payload.
pub fn verify_resumed_update(
    envelope: &SignedEnvelope,
    authenticated: &SiteId,
    keys: &impl KeyDirectory,
    expected: &ExpectedUpdate,
    replay: &ReplayGuard,
    partial: PayloadVerifier,
) -> Result<PayloadVerifier, VerifyError> {
    verify_envelope(envelope, authenticated, keys, expected)?;
    let h = &envelope.header;
    if partial.header != *h {
        return Err(VerifyError::NotResumable(
            "another signed header than the interrupted upload's".into(),
        ));
    }
    replay.check_resumable(h)?;
    Ok(partial)
}

/// The checks of [`verify_update`] short of the replay guard.
fn verify_envelope(
    envelope: &SignedEnvelope,
    authenticated: &SiteId,
    keys: &impl KeyDirectory,
    expected: &ExpectedUpdate,
) -> Result<(), VerifyError> {
    let h = &envelope.header;
    if !VersionRange::SUPPORTED.contains(h.protocol_version) {
        return Err(VerifyError::UnsupportedVersion(h.protocol_version));
    }
    if &h.site_id != authenticated {
        return Err(VerifyError::IdentityMismatch {
            authenticated: authenticated.clone(),
            claimed: h.site_id.clone(),
        });
    }
    let key = keys
        .update_key(authenticated)
        .ok_or_else(|| VerifyError::UnknownSite(authenticated.clone()))?;
    let sig = Signature::from_bytes(&envelope.signature.to_bytes());
    key.verify_strict(&h.signed_bytes(), &sig)
        .map_err(|_| VerifyError::BadSignature)?;
    if h.federation_id != expected.federation_id {
        return Err(VerifyError::FederationMismatch {
            expected: expected.federation_id.clone(),
            found: h.federation_id.clone(),
        });
    }
    if h.job_id != expected.job_id {
        return Err(VerifyError::JobMismatch {
            expected: expected.job_id.clone(),
            found: h.job_id.clone(),
        });
    }
    if h.round != expected.round {
        return Err(VerifyError::RoundMismatch {
            expected: expected.round,
            found: h.round,
        });
    }
    if h.base_model != expected.base_model {
        return Err(VerifyError::BaseModelMismatch {
            expected: expected.base_model,
            found: h.base_model,
        });
    }
    if let Some(e) = &expected.encoding
        && *e != h.encoding
    {
        return Err(VerifyError::EncodingMismatch {
            expected: e.name(),
            found: h.encoding.name(),
        });
    }
    if h.payload_len > expected.max_payload_len {
        return Err(VerifyError::PayloadTooLarge {
            declared: h.payload_len,
            max: expected.max_payload_len,
        });
    }
    if let Some(stats) = &h.feature_stats {
        stats.validate().map_err(VerifyError::BadFeatureStats)?;
    }
    Ok(())
}

/// Hashes and counts payload bytes as they stream in; [`finish`] checks
/// them against the signed header.
///
/// [`finish`]: PayloadVerifier::finish
#[derive(Debug, Clone)]
pub struct PayloadVerifier {
    header: UpdateHeader,
    hasher: blake3::Hasher,
    seen: u64,
}

impl PayloadVerifier {
    /// The verified (signature and context) header.
    pub fn header(&self) -> &UpdateHeader {
        &self.header
    }

    /// Feed the next payload bytes; fails as soon as more bytes than signed
    /// arrive.
    pub fn update(&mut self, bytes: &[u8]) -> Result<(), VerifyError> {
        let seen = self.seen.saturating_add(bytes.len() as u64);
        if seen > self.header.payload_len {
            return Err(VerifyError::PayloadLengthMismatch {
                declared: self.header.payload_len,
                actual: seen,
            });
        }
        self.seen = seen;
        self.hasher.update(bytes);
        Ok(())
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.seen
    }

    /// Bytes still expected.
    pub fn remaining(&self) -> u64 {
        self.header.payload_len - self.seen
    }

    /// Check length and hash.
    pub fn finish(self) -> Result<VerifiedUpdate, VerifyError> {
        if self.seen != self.header.payload_len {
            return Err(VerifyError::PayloadLengthMismatch {
                declared: self.header.payload_len,
                actual: self.seen,
            });
        }
        if PayloadHash(*self.hasher.finalize().as_bytes()) != self.header.payload_hash {
            return Err(VerifyError::PayloadHashMismatch);
        }
        Ok(VerifiedUpdate {
            header: self.header,
        })
    }
}

/// An update whose signature, context and payload were all verified.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedUpdate {
    header: UpdateHeader,
}

impl VerifiedUpdate {
    /// The verified header.
    pub fn header(&self) -> &UpdateHeader {
        &self.header
    }

    /// Into the verified header.
    pub fn into_header(self) -> UpdateHeader {
        self.header
    }
}

type RoundKey = (FederationId, JobId, RoundId, SiteId);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SiteRound {
    nonces: BTreeSet<UpdateNonce>,
    committed: bool,
}

/// Replay protection: nonces seen and rounds committed, per site.
///
/// Serialisable (serde, e.g. JSON or [`Codec`](crate::Codec)) so the
/// coordinator can persist it across restarts. Nonces are remembered per
/// (federation, job, round, site); since headers are bound to the current
/// round, entries of past rounds can be dropped with
/// [`ReplayGuard::prune_before`] once the coordinator will never reopen them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<ReplayEntry>", into = "Vec<ReplayEntry>")]
pub struct ReplayGuard {
    map: BTreeMap<RoundKey, SiteRound>,
}

/// Serialised form of one [`ReplayGuard`] entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayEntry {
    /// Federation.
    pub federation_id: FederationId,
    /// Job.
    pub job_id: JobId,
    /// Round.
    pub round: RoundId,
    /// Site.
    pub site_id: SiteId,
    /// Nonces seen.
    pub nonces: Vec<UpdateNonce>,
    /// Whether an update of this site was accepted in this round.
    pub committed: bool,
}

impl From<Vec<ReplayEntry>> for ReplayGuard {
    fn from(v: Vec<ReplayEntry>) -> Self {
        let mut map: BTreeMap<RoundKey, SiteRound> = BTreeMap::new();
        for e in v {
            let s = map
                .entry((e.federation_id, e.job_id, e.round, e.site_id))
                .or_default();
            s.nonces.extend(e.nonces);
            s.committed |= e.committed;
        }
        Self { map }
    }
}

impl From<ReplayGuard> for Vec<ReplayEntry> {
    fn from(g: ReplayGuard) -> Self {
        g.map
            .into_iter()
            .map(|((federation_id, job_id, round, site_id), s)| ReplayEntry {
                federation_id,
                job_id,
                round,
                site_id,
                nonces: s.nonces.into_iter().collect(),
                committed: s.committed,
            })
            .collect()
    }
}

fn key_of(h: &UpdateHeader) -> RoundKey {
    (
        h.federation_id.clone(),
        h.job_id.clone(),
        h.round,
        h.site_id.clone(),
    )
}

impl ReplayGuard {
    /// An empty guard.
    pub fn new() -> Self {
        Self::default()
    }

    /// Check a header against the guard without recording it.
    pub fn check(&self, h: &UpdateHeader) -> Result<(), VerifyError> {
        if let Some(s) = self.map.get(&key_of(h)) {
            if s.committed {
                return Err(VerifyError::RoundReplayed {
                    site: h.site_id.clone(),
                    round: h.round,
                });
            }
            if s.nonces.contains(&h.nonce) {
                return Err(VerifyError::NonceReplayed(h.site_id.clone()));
            }
            if s.nonces.len() >= MAX_ATTEMPTS_PER_ROUND {
                return Err(VerifyError::TooManyAttempts(h.site_id.clone()));
            }
        }
        Ok(())
    }

    /// Whether the upload of `h` may resume: its nonce was recorded (its
    /// first attempt got past the header check) and its site has not used
    /// the round.
    pub fn check_resumable(&self, h: &UpdateHeader) -> Result<(), VerifyError> {
        let s = self.map.get(&key_of(h));
        if s.is_some_and(|s| s.committed) {
            return Err(VerifyError::RoundReplayed {
                site: h.site_id.clone(),
                round: h.round,
            });
        }
        if !s.is_some_and(|s| s.nonces.contains(&h.nonce)) {
            return Err(VerifyError::NotResumable(
                "no upload with this nonce was started".into(),
            ));
        }
        Ok(())
    }

    /// Check and record the header's nonce (done by [`verify_update`]).
    pub fn record_attempt(&mut self, h: &UpdateHeader) -> Result<(), VerifyError> {
        self.check(h)?;
        self.map
            .entry(key_of(h))
            .or_default()
            .nonces
            .insert(h.nonce);
        Ok(())
    }

    /// Mark the round as used by the update's site: any later update of that
    /// site in that round is refused as a replay.
    pub fn commit(&mut self, update: &VerifiedUpdate) {
        self.commit_header(&update.header);
    }

    /// [`commit`](Self::commit) by the header of an update whose payload
    /// was verified earlier (a coordinator that keeps the verified header,
    /// not the [`VerifiedUpdate`], until it decides).
    pub fn commit_header(&mut self, h: &UpdateHeader) {
        self.map.entry(key_of(h)).or_default().committed = true;
    }

    /// Whether `site` already had an update accepted in this round.
    pub fn is_committed(
        &self,
        federation: &FederationId,
        job: &JobId,
        round: RoundId,
        site: &SiteId,
    ) -> bool {
        self.map
            .get(&(federation.clone(), job.clone(), round, site.clone()))
            .is_some_and(|s| s.committed)
    }

    /// A round opened again from scratch (after a coordinator restart, the
    /// updates it had accepted are set aside and every site reports again):
    /// the sites' commitments for it are lifted, the nonces they used stay
    /// (an envelope already seen is still a replay).
    pub fn reopen_round(&mut self, federation: &FederationId, job: &JobId, round: RoundId) {
        for ((f, j, r, _), s) in &mut self.map {
            if f == federation && j == job && *r == round {
                s.committed = false;
            }
        }
    }

    /// Forget every entry of `job` in `federation` for rounds before `round`.
    pub fn prune_before(&mut self, federation: &FederationId, job: &JobId, round: RoundId) {
        self.map
            .retain(|(f, j, r, _), _| !(f == federation && j == job && *r < round));
    }

    /// Number of (round, site) entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No entries?
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
