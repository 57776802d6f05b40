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
//!   model's hash is checked at the end as for any download.
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
    pub fn remaining(&self, progress: UploadProgress) -> Result<&[Bytes], String> {
        let held = usize::try_from(progress.records)
            .ok()
            .filter(|&n| n <= self.records.len())
            .ok_or_else(|| {
                format!(
                    "the coordinator holds {} records of an upload of {}",
                    progress.records,
                    self.records.len()
                )
            })?;
        let (sent, rest) = self.records.split_at(held);
        let bytes: u64 = sent.iter().map(|r| r.len() as u64).sum();
        if bytes != progress.bytes {
            return Err(format!(
                "the coordinator holds {} records of {} bytes, they make up {bytes}",
                progress.records, progress.bytes
            ));
        }
        Ok(rest)
    }
}

/// The records of a model download received so far.
#[derive(Clone, Debug)]
pub struct PartialDownload {
    /// The model being downloaded.
    pub hash: ModelHash,
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

    /// The records of `hash` received so far (none for another model:
    /// a partial download of another one is dropped).
    pub fn download_of(&mut self, hash: &ModelHash) -> Vec<Bytes> {
        match &self.download {
            Some(d) if d.hash == *hash => d.records.clone(),
            _ => {
                self.download = None;
                Vec::new()
            }
        }
    }

    /// One more record of the download of `hash`.
    pub fn downloaded(&mut self, hash: &ModelHash, record: Bytes) {
        match &mut self.download {
            Some(d) if d.hash == *hash => d.records.push(record),
            _ => {
                self.download = Some(PartialDownload {
                    hash: *hash,
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
