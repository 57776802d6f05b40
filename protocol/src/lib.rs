//! fedlink wire protocol: messages, framing, tensor encodings and signed
//! update envelopes.
//!
//! This crate is **pure**: no sockets, no async runtime, no clock, no burn.
//! It turns values into bytes and bytes back into values, and checks
//! signatures; the tokio/quinn drivers that move those bytes over QUIC
//! streams live in the coordinator and the site agent. Every decoder treats
//! its input as attacker-controlled: lengths are validated before anything
//! is allocated, decompression is bounded, errors are typed, nothing panics.
//!
//! # Data flow of an update
//!
//! ```text
//!  site                                                coordinator
//!  ----                                                -----------
//!  delta: FlatModel (f32, canonical order)
//!    | PayloadEncoder (chunk, codec, shuffle, zstd)
//!    v
//!  chunk records ──► PayloadSummary {len, blake3}
//!    |                    | UpdateHeader + sign_update(ed25519)
//!    |                    v
//!    |              Message::DeltaUpload ──frame──►  Frame/FrameDecoder
//!    |                                                 | verify_update: identity, key,
//!    |                                                 | signature, context, replay
//!    |                                                 v
//!    └─────────── Chunk frames ───────────────────►  PayloadVerifier (len, blake3)
//!                                                      | PayloadDecoder (bounded)
//!                                                      v
//!                                                    (offset, Vec<f32>) per chunk
//! ```
//!
//! Models travel the other way the same way: `ModelManifest` + chunk frames,
//! and the decoded values must hash to the announced [`ModelHash`].
//!
//! # Modules
//!
//! - [`codec`]: the [`Codec`] trait (bincode 2 with a byte limit behind it);
//! - [`frame`]: length-prefixed, versioned frames and the sans-IO
//!   [`FrameDecoder`];
//! - [`message`]: the [`Message`] enum and its parts;
//! - [`encoding`] and [`payload`]: chunked, compressed tensor payloads;
//! - [`envelope`]: signed update headers, verification and replay guard;
//! - [`scaling`]: federated feature standardisation (site statistics,
//!   pooled scaling);
//! - [`model`], [`arch`], [`ids`]: shared model, architecture and identifier types.
//!
//! The exact wire format, limits and verification order are in
//! `docs/PROTOCOL.md`.
//!
//! # Example
//!
//! ```
//! use fedlink_protocol::*;
//! use std::collections::BTreeMap;
//!
//! // A tiny delta and its encoded payload.
//! let spec = ModelSpec::new(vec![TensorSpec::f32("fc.weight", vec![4, 3])])?;
//! let delta = FlatModel::new(spec.clone(), (0..12).map(|i| i as f32 * 0.01).collect())?;
//! let encoding = Encoding::with_codec(ValueCodec::F16)?;
//! let (records, summary) = encode_payload(&delta, encoding, 42)?;
//!
//! // The site signs a header binding context and payload hash.
//! let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
//! let site = SiteId::new("hospital-a")?;
//! let header = UpdateHeader {
//!     protocol_version: PROTOCOL_VERSION,
//!     federation_id: FederationId::new("fed")?,
//!     site_id: site.clone(),
//!     job_id: JobId::new("job-1")?,
//!     round: RoundId(3),
//!     base_model: ModelHash([0; 32]),
//!     num_examples: 100,
//!     encoding,
//!     payload_len: summary.payload_len,
//!     payload_hash: summary.payload_hash,
//!     nonce: UpdateNonce([1; 16]),
//!     metrics: None,
//!     feature_stats: None,
//! };
//! let upload = Message::DeltaUpload(Box::new(DeltaUpload { envelope: sign_update(&key, header) }));
//! let mut wire = Vec::new();
//! encode_message_frame(&upload, &mut wire)?;
//! for r in &records {
//!     encode_frame(FrameKind::Chunk, r, &mut wire)?;
//! }
//!
//! // The coordinator decodes frames, verifies, then decodes the payload.
//! let mut frames = FrameDecoder::new();
//! frames.push(&wire);
//! let Message::DeltaUpload(up) = frames.pop()?.ok_or("no frame")?.into_message()? else {
//!     return Err("expected an upload".into());
//! };
//! let keys = BTreeMap::from([(site.clone(), key.verifying_key())]);
//! let expected = ExpectedUpdate {
//!     federation_id: FederationId::new("fed")?,
//!     job_id: JobId::new("job-1")?,
//!     round: RoundId(3),
//!     base_model: ModelHash([0; 32]),
//!     encoding: Some(encoding),
//!     max_payload_len: max_payload_len(&spec, &encoding),
//! };
//! let mut replay = ReplayGuard::new();
//! let mut verifier = verify_update(&up.envelope, &site, &keys, &expected, &mut replay)?;
//! let mut decoder = PayloadDecoder::new(spec, encoding)?;
//! let mut values = Vec::new();
//! while let Some(frame) = frames.pop()? {
//!     let record = frame.into_chunk()?;
//!     verifier.update(&record)?;
//!     values.extend(decoder.decode_chunk(&record)?.values);
//! }
//! let verified = verifier.finish()?;
//! decoder.finish()?;
//! replay.commit(&verified);
//! assert!((values[11] - 0.11).abs() < 1e-3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod admin;
pub mod arch;
pub mod backoff;
pub mod codec;
pub mod downlink;
pub mod encoding;
pub mod envelope;
pub mod evaluation;
pub mod frame;
pub mod ids;
pub mod message;
pub mod model;
pub mod payload;
pub mod scaling;

pub use codec::{Codec, DecodeError, MAX_MESSAGE_LEN};
pub use encoding::{Encoding, EncodingError, ValueCodec};
pub use envelope::{
    EvalMetrics, ExpectedUpdate, KeyDirectory, PayloadVerifier, ReplayGuard, SignatureBytes,
    SignedEnvelope, UPDATE_DOMAIN, UpdateHeader, UpdateNonce, VerifiedUpdate, VerifyError,
    sign_update, verify_resumed_update, verify_update,
};
pub use evaluation::{
    EvalReport, EvalRequest, FEDERATED_EVAL_VERSION, SignedEvalReport, sign_eval_report,
    supports_federated_eval, verify_eval_report,
};
pub use frame::{
    FRAME_HEADER_LEN, Frame, FrameDecoder, FrameError, FrameHeader, FrameKind, MAX_FRAME_LEN,
    encode_frame, encode_message_frame,
};
pub use ids::{FederationId, IdError, JobId, RoundId, SiteId};
pub use message::{
    AUDIT_HEAD_VERSION, AuditHead, Augmentation, Bye, CENTRAL_DP_VERSION, CLASS_WEIGHT_VERSION,
    Cancel, Capabilities, CentralDp, ClassWeight, DOWNLINK_VERSION, DeltaUpload, DpNoise,
    Heartbeat, Hello, IntensityJitter, MAX_INTENSITY_JITTER, MIN_PROTOCOL_VERSION, Message,
    ModelFetch, ModelFetchFrom, ModelManifest, ModelUpdateFetch, OfferDecision, OfferError,
    OfferResponse, Optimizer, PROTOCOL_VERSION, PrivacyRequirements, RESUME_VERSION,
    ROUND_OUTCOME_VERSION, Reject, RejectCode, RoundOutcome, TRAINING_V5_VERSION, TaskOffer,
    TrainingConfig, UpdateManifest, UploadProgress, UploadResult, VersionRange, Welcome,
    class_weight_min_version, min_protocol_version, supports_audit_head, supports_downlink_updates,
    supports_round_outcome,
};
pub use model::{DType, FlatModel, ModelError, ModelHash, ModelHasher, ModelSpec, TensorSpec};
pub use payload::{
    ChunkDecoder, ChunkEncoder, ChunkHeader, DecodedChunk, DecodedSummary, EncodeError,
    PayloadDecoder, PayloadEncoder, PayloadError, PayloadHash, PayloadSummary, decode_payload,
    encode_payload, max_payload_len,
};
pub use scaling::{FeatureScaling, FeatureStats, ScalingError};
