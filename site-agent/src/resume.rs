//! What the agent keeps across a lost connection so that a transfer
//! resumes instead of starting over (protocol version >=
//! [`fedlink_protocol::RESUME_VERSION`]):
//!
//! - the **signed upload** of a round (envelope and encoded records),
//!   until the coordinator answers it. When the coordinator offers the same
//!   round on the same base model again after a reconnect, the agent does
//!   not train again: it sends `ResumeUpload` with the very same envelope
//!   and, after the coordinator's `UploadProgress`, only the records the
//!   coordinator does not hold.
//! - the records of a **model download** received so far; the next fetch
//!   of the same model asks for the rest (`ModelFetchFrom`), and the whole
//!   model's hash is checked at the end as for any download. A downlink
//!   update (protocol >= 7) is kept the same way, keyed by its base model
//!   too: the next `ModelUpdateFetch` of the same model from the same base
//!   asks for the rest (`from_record`).
//!
//! Both live in memory: an agent restart trains (and downloads) again.

use bytes::Bytes;
use fedlink_protocol::{JobId, ModelHash, RoundId, SignedEnvelope, TaskOffer, UploadProgress};

/// A signed upload kept until the coordinator answers it.
#[derive(Clone, Debug)]
pub struct KeptUpload {
    /// The signed envelope (its nonce, payload hash and signature are
    /// re-used as they are).
    pub envelope: SignedEnvelope,
    /// The payload's chunk records, in order.
    pub records: Vec<Bytes>,
}

impl KeptUpload {
    /// Whether `offer` asks for the update this upload carries: the same
    /// job, round and base model.
    pub fn answers(&self, offer: &TaskOffer) -> bool {
        let h = &self.envelope.header;
        h.job_id == offer.job_id && h.round == offer.round && h.base_model == offer.base_model
    }

    /// Job and round, for logs.
    pub fn round(&self) -> (&JobId, RoundId) {
        (&self.envelope.header.job_id, self.envelope.header.round)
    }

    /// The records to send after the coordinator's `progress`: checked
    /// against the records kept (the count, and the bytes they make up),
    /// so a coordinator that claims what was never sent is caught.
    pub fn remaining(&self, progress: UploadProgress) -> Result<&[Bytes], ProgressMismatch> {
        let held = usize::try_from(progress.records)
            .ok()
            .filter(|&n| n <= self.records.len())
            .ok_or(ProgressMismatch::Records {
                claimed: progress.records,
                kept: self.records.len(),
            })?;
        let (sent, rest) = self.records.split_at(held);
        let bytes: u64 = sent.iter().map(|r| r.len() as u64).sum();
        if bytes != progress.bytes {
            return Err(ProgressMismatch::Bytes {
                records: progress.records,
                claimed: progress.bytes,
                actual: bytes,
            });
        }
        Ok(rest)
    }
}

/// The coordinator's claim of what it holds of a resumed upload does not
/// match what the site sent ([`KeptUpload::remaining`]): it misbehaved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProgressMismatch {
    /// More records than the upload has.
    #[error("the coordinator holds {claimed} records of an upload of {kept}")]
    Records {
        /// Records the coordinator claims.
        claimed: u64,
        /// Records the upload has.
        kept: usize,
    },
    /// The records claimed do not make up the bytes claimed.
    #[error("the coordinator holds {records} records of {claimed} bytes, they make up {actual}")]
    Bytes {
        /// Records the coordinator claims.
        records: u64,
        /// Bytes the coordinator claims.
        claimed: u64,
        /// Bytes those records make up.
        actual: u64,
    },
}

/// The records of a model download received so far.
#[derive(Clone, Debug)]
pub struct PartialDownload {
    /// The model being downloaded.
    pub hash: ModelHash,
    /// `Some(base)`: the records are of the update from `base` to `hash`,
    /// not of the model itself.
    pub base: Option<ModelHash>,
    /// Its chunk records received, in order.
    pub records: Vec<Bytes>,
}

/// The transfers kept across connections.
#[derive(Debug, Default)]
pub struct Transfers {
    upload: Option<KeptUpload>,
    download: Option<PartialDownload>,
}

impl Transfers {
    /// Keep `upload` (replacing any older one).
    pub fn keep_upload(&mut self, upload: KeptUpload) {
        self.upload = Some(upload);
    }

    /// The kept upload that answers `offer`, if any. A kept upload of
    /// another round or base model is dropped: the coordinator moved on.
    pub fn upload_for(&mut self, offer: &TaskOffer) -> Option<KeptUpload> {
        match &self.upload {
            Some(u) if u.answers(offer) => Some(u.clone()),
            Some(_) => {
                self.upload = None;
                None
            }
            None => None,
        }
    }

    /// The coordinator answered the upload with this nonce: it is no
    /// longer kept.
    pub fn upload_answered(&mut self, envelope: &SignedEnvelope) {
        if self
            .upload
            .as_ref()
            .is_some_and(|u| u.envelope.header.nonce == envelope.header.nonce)
        {
            self.upload = None;
        }
    }

    /// The partial download kept, if any (the download machine,
    /// [`crate::sitecore::download`], decides whether it fits the model
    /// asked for).
    pub fn download(&self) -> Option<&PartialDownload> {
        self.download.as_ref()
    }

    /// The records of `hash` (as an update of `base`, when given) received
    /// so far (none for another model or base: a partial download of
    /// another one is dropped).
    pub fn download_of(&mut self, hash: &ModelHash, base: Option<&ModelHash>) -> Vec<Bytes> {
        match &self.download {
            Some(d) if d.hash == *hash && d.base.as_ref() == base => d.records.clone(),
            _ => {
                self.download = None;
                Vec::new()
            }
        }
    }

    /// One more record of the download of `hash` (as an update of `base`,
    /// when given).
    pub fn downloaded(&mut self, hash: &ModelHash, base: Option<&ModelHash>, record: Bytes) {
        match &mut self.download {
            Some(d) if d.hash == *hash && d.base.as_ref() == base => d.records.push(record),
            _ => {
                self.download = Some(PartialDownload {
                    hash: *hash,
                    base: base.copied(),
                    records: vec![record],
                });
            }
        }
    }

    /// The download of `hash` ended (complete, or failed its checks).
    pub fn download_done(&mut self, hash: &ModelHash) {
        if self.download.as_ref().is_some_and(|d| d.hash == *hash) {
            self.download = None;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use ed25519_dalek::SigningKey;
    use fedlink_protocol::{
        Encoding, FederationId, PROTOCOL_VERSION, PayloadHash, SiteId, UpdateHeader, UpdateNonce,
        ValueCodec, sign_update,
    };

    fn kept(records: &[usize]) -> KeptUpload {
        let h = UpdateHeader {
            protocol_version: PROTOCOL_VERSION,
            federation_id: FederationId::new("fed").unwrap(),
            site_id: SiteId::new("a").unwrap(),
            job_id: JobId::new("job").unwrap(),
            round: RoundId(2),
            base_model: ModelHash([1; 32]),
            num_examples: 10,
            encoding: Encoding::with_codec(ValueCodec::F32).unwrap(),
            payload_len: records.iter().sum::<usize>() as u64,
            payload_hash: PayloadHash([0; 32]),
            nonce: UpdateNonce([5; 16]),
            metrics: None,
            feature_stats: None,
        };
        KeptUpload {
            envelope: sign_update(&SigningKey::from_bytes(&[3; 32]), h),
            records: records
                .iter()
                .map(|&n| Bytes::from(vec![n as u8; n]))
                .collect(),
        }
    }

    #[test]
    fn the_rest_follows_the_records_the_coordinator_holds() {
        let k = kept(&[10, 20, 30]);
        let p = |records, bytes| UploadProgress { records, bytes };
        assert_eq!(k.remaining(p(0, 0)).unwrap().len(), 3);
        let rest = k.remaining(p(2, 30)).unwrap();
        assert_eq!(rest, &[Bytes::from(vec![30u8; 30])]);
        assert!(k.remaining(p(3, 60)).unwrap().is_empty());
        // Claims that do not match what was sent are caught.
        let err = k.remaining(p(4, 60)).unwrap_err();
        assert_eq!(
            err,
            ProgressMismatch::Records {
                claimed: 4,
                kept: 3
            }
        );
        assert!(
            err.to_string()
                .contains("holds 4 records of an upload of 3"),
            "{err}"
        );
        let err = k.remaining(p(2, 29)).unwrap_err();
        assert_eq!(
            err,
            ProgressMismatch::Bytes {
                records: 2,
                claimed: 29,
                actual: 30
            }
        );
        assert!(err.to_string().contains("they make up 30"), "{err}");
        let err = k.remaining(p(u64::MAX, 0)).unwrap_err();
        assert!(matches!(err, ProgressMismatch::Records { .. }), "{err}");
    }

    #[test]
    fn kept_transfers_follow_the_coordinator() {
        let mut t = Transfers::default();
        let up = kept(&[4, 4]);
        t.keep_upload(up.clone());
        let offer_like = |round: u64, base: ModelHash| {
            let mut o = crate::policy::tests::offer();
            o.job_id = JobId::new("job").unwrap();
            o.round = RoundId(round);
            o.base_model = base;
            o
        };
        // The same round on the same model: resume it.
        let same = offer_like(2, ModelHash([1; 32]));
        assert!(t.upload_for(&same).is_some());
        // The coordinator answered it: no longer kept.
        t.upload_answered(&up.envelope);
        assert!(t.upload_for(&same).is_none());
        // A newer round drops an older kept upload.
        t.keep_upload(up);
        assert!(t.upload_for(&offer_like(3, ModelHash([1; 32]))).is_none());
        assert!(t.upload_for(&same).is_none());

        // Downloads: records of one model, dropped for another.
        let a = ModelHash([7; 32]);
        let b = ModelHash([8; 32]);
        assert!(t.download_of(&a, None).is_empty());
        t.downloaded(&a, None, Bytes::from_static(b"r0"));
        t.downloaded(&a, None, Bytes::from_static(b"r1"));
        assert_eq!(t.download_of(&a, None).len(), 2);
        assert!(t.download_of(&b, None).is_empty());
        assert!(
            t.download_of(&a, None).is_empty(),
            "another model's fetch dropped it"
        );
        t.downloaded(&a, None, Bytes::from_static(b"r0"));
        t.download_done(&a);
        assert!(t.download_of(&a, None).is_empty());
        // An update's records are kept by (model, base): not the model's,
        // not another base's.
        t.downloaded(&a, Some(&b), Bytes::from_static(b"u0"));
        assert_eq!(t.download_of(&a, Some(&b)).len(), 1);
        assert!(t.download_of(&a, Some(&a)).is_empty(), "another base");
        t.downloaded(&a, Some(&b), Bytes::from_static(b"u0"));
        assert!(t.download_of(&a, None).is_empty(), "the whole model");
        assert!(t.download_of(&a, Some(&b)).is_empty(), "dropped by it");
    }
}
