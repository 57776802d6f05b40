//! What the connection tasks (and the admin API, and the idle holder) tell
//! the engine: the [`Event`]s on its queue, the replies they carry and the
//! upload hand-over types. Nothing here depends on another module of
//! `server/`; every task that talks to the engine depends on this one.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ed25519_dalek::VerifyingKey;
use fedlink_aggregation::round::RoundAggregator;
use fedlink_aggregation::validate::{UpdateValidator, ValidatedUpdate};
use fedlink_aggregation::{Tentative, TentativeFold};
use fedlink_protocol::admin::{AdminErrorCode, JobProgress};
use fedlink_protocol::envelope::{PayloadVerifier, SignedEnvelope};
use fedlink_protocol::message::{RejectCode, UploadProgress, UploadResult};
use fedlink_protocol::{Message, RoundId, SiteId};
use fedlink_transport::ServerConn;
use tokio::sync::{mpsc, oneshot};

use crate::round::{AdminCommand, ConnId, SiteCapabilities};
use crate::round_archive;

/// A site that completed Hello/Welcome: its connection and what it
/// announced ([`Event::Connected`]; the engine and the idle holder take it
/// into their links alike).
#[derive(Debug)]
pub(crate) struct SiteConnected {
    pub(crate) site: SiteId,
    pub(crate) conn_id: ConnId,
    pub(crate) conn: ServerConn,
    pub(crate) control: mpsc::Sender<Message>,
    pub(crate) capabilities: SiteCapabilities,
    /// The codecs the site announced in its Hello.
    pub(crate) codecs: Vec<fedlink_protocol::ValueCodec>,
    /// The protocol version negotiated with it.
    pub(crate) protocol_version: u16,
}

/// Something a connection task tells the engine.
#[derive(Debug)]
pub(crate) enum Event {
    /// A site completed Hello/Welcome.
    Connected(SiteConnected),
    /// A site's connection ended.
    Disconnected { site: SiteId, conn_id: ConnId },
    /// A site's signed answer to an evaluation request (control stream).
    EvalReport {
        site: SiteId,
        report: Box<fedlink_protocol::SignedEvalReport>,
    },
    /// A site answered an offer.
    OfferResponse {
        site: SiteId,
        round: RoundId,
        accepted: bool,
        reason: String,
    },
    /// A site wants to upload: verify the signed envelope first. With
    /// `resume`, the site resumes an upload a lost connection cut short
    /// (the same signed envelope): it is verified against the kept partial
    /// upload.
    PrepareUpload {
        site: SiteId,
        envelope: Box<SignedEnvelope>,
        resume: bool,
        reply: oneshot::Sender<Result<UploadTicket, (RejectCode, String)>>,
    },
    /// An upload's connection was lost (or its site stalled) part way: keep
    /// what arrived for a resume, or drop it.
    UploadInterrupted(Box<UploadInterrupted>),
    /// An upload arrived completely and went through pass 1.
    UpdateReady(Box<UpdateReady>),
    /// The site manifest changed: the update keys to use from now on.
    Keys(BTreeMap<SiteId, VerifyingKey>),
    /// The manifest or the revocation list changed: re-check every open
    /// connection.
    RecheckPeers,
    /// An admin command for the engine.
    Admin(AdminEvent),
}

/// An admin request for the engine.
#[derive(Debug)]
pub(crate) enum AdminEvent {
    /// Where the running job stands.
    Progress(oneshot::Sender<JobProgress>),
    /// Pause, resume or abort a job (running or queued).
    Job(JobCommand),
    /// The sites connected now (sorted), with or without a job.
    ConnectedSites(oneshot::Sender<Vec<SiteId>>),
    /// A job was queued: a finished engine looks for its next job.
    Wake,
}

/// An admin's pause, resume or abort of a job ([`AdminEvent::Job`]).
#[derive(Debug)]
pub(crate) struct JobCommand {
    pub(crate) id: String,
    pub(crate) cmd: AdminCommand,
    /// The admin's identity (the audit actor).
    pub(crate) actor: String,
    pub(crate) reply: oneshot::Sender<Result<(), (AdminErrorCode, String)>>,
}

/// Why an update failed pass 1 (decoded from its spool and validated by a
/// connection task); the text is the update's rejection reason.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckError {
    /// The spool could not be read or decoded, or the update is invalid.
    #[error(transparent)]
    Payload(#[from] round_archive::PayloadError),
    /// The validation task panicked or was cancelled.
    #[error("validation task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// How a connection task checks an upload's payload once it is spooled.
#[derive(Debug)]
pub(crate) enum PayloadCheck {
    /// Pass 1 only: decode and validate; the engine folds the update at
    /// its ack (pass 2, decoding the spool again). For strategies whose
    /// fold needs the whole update first (clipping, robust strategies).
    TwoPass(UpdateValidator),
    /// One pass, where the strategy allows it (streaming mean, no
    /// clipping): check and fold each chunk at once, uncounted until the
    /// ack (the fold holds its own validator).
    OnePass(TentativeFold),
}

impl PayloadCheck {
    /// The check for an update of `site` claiming `num_examples` in the
    /// round of `agg`: one pass where its strategy allows it.
    pub(super) fn for_round(agg: &RoundAggregator, site: &str, num_examples: u64) -> Self {
        match agg.tentative(site, num_examples) {
            Some(fold) => Self::OnePass(fold),
            None => Self::TwoPass(agg.validator(site, num_examples)),
        }
    }
}

/// What a connection task needs to receive one upload.
#[derive(Debug)]
pub(crate) struct UploadTicket {
    pub(crate) verifier: PayloadVerifier,
    pub(crate) check: PayloadCheck,
    pub(crate) spec: fedlink_protocol::ModelSpec,
    pub(crate) spool_path: PathBuf,
    /// For a resumed upload: the records (and their bytes) already in the
    /// spool, which the verifier has hashed.
    pub(crate) resume_from: Option<UploadProgress>,
}

/// What arrived of an upload before its connection was lost.
#[derive(Debug)]
pub(crate) struct UploadInterrupted {
    pub(crate) site: SiteId,
    pub(crate) envelope: SignedEnvelope,
    /// Over exactly the records in the spool.
    pub(crate) verifier: PayloadVerifier,
    pub(crate) records: u64,
    /// The spool, fsynced (`None`: it could not be made durable).
    pub(crate) spool_path: Option<PathBuf>,
    /// Whether the site's protocol version can resume.
    pub(crate) resumable: bool,
    /// Bytes that arrived of a record the cut left incomplete (dropped: the
    /// site sends that record again).
    pub(crate) partial_bytes: u64,
    /// What ended the upload.
    pub(crate) cause: String,
}

/// An upload received whole: its signed envelope and its payload in the
/// spool. Handed from the connection task ([`UpdateReady`]) to the
/// engine, which keeps it while the round machine decides ([`Held`] in
/// the core's [`Uploads`]), then archives (accepted) or deletes (refused)
/// the spool.
#[derive(Debug)]
pub(crate) struct ReceivedUpload {
    pub(crate) envelope: SignedEnvelope,
    pub(crate) spool_path: PathBuf,
    pub(crate) bytes: u64,
    /// How long receiving the payload took (milliseconds).
    pub(crate) upload_ms: u64,
}

/// The result of receiving and checking an upload.
#[derive(Debug)]
pub(crate) struct UpdateReady {
    pub(crate) site: SiteId,
    pub(crate) upload: ReceivedUpload,
    /// Pass 1: the validated token, or why the update is invalid.
    pub(crate) check: Result<ValidatedUpdate, CheckError>,
    /// The update, checked and folded in one pass (uncounted until its ack).
    pub(crate) tentative: Option<Tentative>,
    pub(crate) reply: oneshot::Sender<UploadResult>,
}
