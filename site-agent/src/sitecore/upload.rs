//! The upload of a signed update, without IO: what to send, how to read
//! each answer of the coordinator, and which audit records to make before
//! the next step.
//!
//! The driver ([`crate::agent`]) opens the streams and moves the frames:
//!
//! 1. A fresh upload: record [`super::task::Sealed::sent`], send
//!    [`opening`] and every record, then hand the answer to
//!    [`on_upload_answer`] and record the event it returns.
//! 2. A resume of a kept upload (protocol >= 5): send [`resume_request`],
//!    then hand the answer to [`on_resume_answer`] and execute the
//!    [`ResumeStep`] it returns: record its event first, then send the
//!    rest, sign again (with [`sign_again`]) or stop.
//!
//! The rules are today's: a `Replay` refusal of a resume means the
//! coordinator kept nothing, so the same payload is signed again under a
//! new nonce and sent whole (no training again); any other answer to a
//! resume ends the upload; a resume point that does not fit the records
//! kept is the coordinator's fault ([`UploadError::ResumePoint`]).

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use fedlink_protocol::{
    DeltaUpload, Message, RejectCode, SignedEnvelope, UpdateNonce, UploadResult, sign_update,
};

use super::task::{self, WrongAck};
use crate::audit::{SiteEvent, site};
use crate::resume::{KeptUpload, ProgressMismatch};

/// What the request named in [`UploadError::Unexpected`] was.
pub const UPLOAD_REQUEST: &str = "an upload";
/// The resume request, as named in [`UploadError::Unexpected`].
pub const RESUME_REQUEST: &str = "ResumeUpload";

/// The coordinator's answer does not fit the upload.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UploadError {
    /// An acknowledgement of a payload other than the one sent.
    #[error(transparent)]
    WrongAck(#[from] WrongAck),
    /// A message that does not answer the request it followed.
    #[error("sent {sent} in answer to {request}")]
    Unexpected {
        /// The message's name.
        sent: &'static str,
        /// The request it followed.
        request: &'static str,
    },
    /// The resume point does not fit the records kept.
    #[error(transparent)]
    ResumePoint(#[from] ProgressMismatch),
}

/// The first message of a fresh upload of `envelope` (its records follow).
pub fn opening(envelope: &SignedEnvelope) -> Message {
    Message::DeltaUpload(Box::new(DeltaUpload {
        envelope: envelope.clone(),
    }))
}

/// The request to resume the kept upload of `envelope` (the very same
/// signed envelope).
pub fn resume_request(envelope: &SignedEnvelope) -> Message {
    Message::ResumeUpload(Box::new(DeltaUpload {
        envelope: envelope.clone(),
    }))
}

/// The coordinator's answer to the (whole or resumed) upload of
/// `envelope`: the [`SiteEvent::UpdateResult`] to record, or what was
/// wrong with the answer. After either the upload is no longer kept.
pub fn on_upload_answer(
    envelope: &SignedEnvelope,
    answer: &Message,
) -> Result<SiteEvent, UploadError> {
    match answer {
        Message::UploadResult(result) => Ok(task::upload_answered(envelope, result)?),
        other => Err(UploadError::Unexpected {
            sent: other.name(),
            request: UPLOAD_REQUEST,
        }),
    }
}

/// What to do after the coordinator's answer to [`resume_request`].
#[derive(Debug)]
pub enum ResumeStep<'k> {
    /// The coordinator holds the first records: record `resumed`
    /// (`update.resumed`), then send `rest` and read the answer with
    /// [`on_upload_answer`].
    SendRest {
        /// The `update.resumed` record.
        resumed: SiteEvent,
        /// The records the coordinator does not hold.
        rest: &'k [Bytes],
    },
    /// The coordinator kept nothing to resume (`Replay`): record
    /// `refused` (`update.result`, the upload is no longer kept), then
    /// [`sign_again`] and send the whole payload.
    SignAgain {
        /// The refusal's `update.result` record.
        refused: SiteEvent,
    },
    /// The coordinator answered the upload itself: record `answered`;
    /// the upload is over.
    Answered {
        /// The `update.result` record.
        answered: SiteEvent,
    },
}

/// The coordinator's answer to the resume of `kept`.
pub fn on_resume_answer<'k>(
    kept: &'k KeptUpload,
    answer: &Message,
) -> Result<ResumeStep<'k>, UploadError> {
    let envelope = &kept.envelope;
    match answer {
        Message::UploadProgress(progress) => {
            let rest = kept.remaining(*progress)?;
            let bytes_sent: u64 = rest.iter().map(|r| r.len() as u64).sum();
            let h = &envelope.header;
            Ok(ResumeStep::SendRest {
                resumed: SiteEvent::UpdateResumed(site::UpdateResumed {
                    job: h.job_id.clone(),
                    round: h.round,
                    payload_hash: h.payload_hash.to_hex(),
                    nonce: hex::encode(h.nonce.0),
                    from_record: progress.records,
                    bytes_held: progress.bytes,
                    bytes_sent,
                }),
                rest,
            })
        }
        Message::UploadResult(result @ UploadResult::Reject { code, .. })
            if *code == RejectCode::Replay =>
        {
            Ok(ResumeStep::SignAgain {
                refused: task::upload_answered(envelope, result)?,
            })
        }
        Message::UploadResult(result) => Ok(ResumeStep::Answered {
            answered: task::upload_answered(envelope, result)?,
        }),
        other => Err(UploadError::Unexpected {
            sent: other.name(),
            request: RESUME_REQUEST,
        }),
    }
}

/// The kept upload's payload under `nonce` (fresh, from the caller) and a
/// new signature by `key`: the upload to keep and send whole, after
/// recording the `update.sent` event returned.
pub fn sign_again(
    kept: &KeptUpload,
    key: &SigningKey,
    nonce: UpdateNonce,
) -> (KeptUpload, SiteEvent) {
    let mut header = kept.envelope.header.clone();
    header.nonce = nonce;
    let envelope = sign_update(key, header);
    let sent = task::update_sent(&envelope);
    (
        KeptUpload {
            envelope,
            records: kept.records.clone(),
        },
        sent,
    )
}

#[cfg(test)]
mod tests;
