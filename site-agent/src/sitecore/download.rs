//! Obtaining a round's global model, without IO: from the cache, as the
//! downlink update of the model the site holds (protocol >= 7), or whole —
//! resuming a download a lost connection cut short (protocol >= 6).
//!
//! [`Download`] decides what to ask the coordinator, checks every answer
//! (manifests against what was asked, records one by one, the result's
//! hash), falls back to the whole model when an update is refused (the
//! refusal is put on record as `model.refused` first), and says which
//! records to keep for a resume. The driver ([`crate::agent`]) loads cache
//! files, opens streams, reads frames and executes the [`Effect`]s; it
//! decides nothing.
//!
//! ```text
//!  on_cached ── hit ───────────────────────────────────────────────▶ Done (from_cache)
//!     │ miss / corrupt (Uncache)
//!     ├─ held base ≠ hash, protocol ≥ 7 ─▶ LoadBase ─▶ on_base ── held ─▶ Ask(ModelUpdateFetch from kept)
//!     │                                                 │ not held         │ on_answer
//!     │                                                 ▼                  ▼
//!     └──────────────────────────────────────▶ Ask(ModelFetch | ModelFetchFrom)   UpdateManifest: Receive… ─▶ End ─▶ Done (as update)
//!                                                  ▲ on_answer: ModelManifest     ModelManifest: the whole model
//!                                                  │            ▼                 │
//!                                                  │  Receive… ─▶ End ─▶ Done     │ update refused (manifest, record,
//!                                                  └──── Record(model.refused) ◀──┘ hash): Forget, fetch the whole model
//! ```
//!
//! # How to drive it
//!
//! 1. [`Download::new`] with the [`Request`] and the partial download kept
//!    across connections ([`crate::resume::Transfers::download`]).
//! 2. Look the model up in the cache and pass what was found to
//!    [`Download::on_cached`].
//! 3. After every call, execute [`Download::take_effects`] in order (an
//!    audit record is appended before anything after it), then act on the
//!    returned [`Step`] (or stop with the error):
//!    [`Step::LoadBase`] → [`Download::on_base`]; [`Step::Ask`] → open a
//!    stream, send the request, finish sending, pass the first answer to
//!    [`Download::on_answer`]; [`Step::Receive`] → pass the stream's next
//!    chunk record to [`Download::on_record`]; [`Step::End`] → pass whether
//!    another frame follows to [`Download::on_end`]; [`Step::Done`] → keep
//!    the model in the cache as its [`CacheForm`] says, append its
//!    `model.received` record, use the model.
//!
//! A transport error stops the download where it is: the records kept so
//! far stay kept, and the next download of the same model resumes after
//! them.

use bytes::Bytes;
use fedlink_protocol::downlink::{DownlinkError, UpdateApplier};
use fedlink_protocol::{
    EncodeError, Encoding, FlatModel, Message, ModelFetch, ModelFetchFrom, ModelHash,
    ModelManifest, ModelSpec, ModelUpdateFetch, RESUME_VERSION, UpdateManifest, encode_payload,
    supports_downlink_updates,
};

use super::task::{reject_code, truncate};
use crate::audit::{SiteEvent, site};
use crate::modelcache::{ModelAssembler, ModelError};
use crate::resume::PartialDownload;

/// The model a round (or an evaluation request) needs.
#[derive(Clone, Debug)]
pub struct Request {
    /// The model.
    pub hash: ModelHash,
    /// Its layout (the offered architecture's).
    pub spec: ModelSpec,
    /// The site policy's `max_model_params`.
    pub max_params: u64,
    /// The session's protocol version.
    pub protocol_version: u16,
    /// The previous global model of the job that this site holds (the
    /// base of an update), if any.
    pub held: Option<ModelHash>,
}

/// What the model cache holds of a model.
#[derive(Clone, Debug, PartialEq)]
pub enum Cached {
    /// The model, verified; `bytes`: its cache file's size.
    Hit {
        /// The model.
        model: FlatModel,
        /// Size of its cache file.
        bytes: u64,
    },
    /// Not in the cache.
    Miss,
    /// A file that failed verification (the driver logs why).
    Corrupt,
}

/// What the driver does next.
#[derive(Debug)]
pub enum Step {
    /// Load this model (the base of an update) from the cache, checked
    /// against the request's layout; pass it to [`Download::on_base`].
    LoadBase(ModelHash),
    /// Open a stream, send this request, finish sending; pass the first
    /// answer to [`Download::on_answer`].
    Ask(Message),
    /// Pass the stream's next chunk record to [`Download::on_record`].
    Receive,
    /// Every record is in: pass whether the stream has another frame to
    /// [`Download::on_end`].
    End,
    /// The model, checked.
    Done(Box<Outcome>),
}

/// A model obtained.
#[derive(Debug)]
pub struct Outcome {
    /// The model (its hash is the one asked for).
    pub model: FlatModel,
    /// How to keep it in the cache (`None`: it came from there).
    pub cache: Option<CacheForm>,
    /// Its `model.received` record, appended once it is cached.
    pub received: SiteEvent,
}

/// How an obtained model is kept in the cache.
#[derive(Debug)]
pub enum CacheForm {
    /// As received: the manifest, then its records.
    Received {
        /// The manifest.
        manifest: ModelManifest,
        /// Its chunk records, in order.
        records: Vec<Bytes>,
    },
    /// Encoded losslessly first ([`cache_form`]): it came as an update.
    Reencode,
}

/// What the driver executes, in order, before the next step.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Remove the cache file of this model (it failed verification).
    Uncache(ModelHash),
    /// Append this to the site audit log.
    Record(SiteEvent),
    /// Keep this record of the download of `hash` (as an update of
    /// `base`, when given) for a resume.
    Keep {
        /// The model.
        hash: ModelHash,
        /// The base of an update.
        base: Option<ModelHash>,
        /// The record.
        record: Bytes,
    },
    /// The records kept of a download of this model go (it ended, or a
    /// download of it in another form starts).
    Forget(ModelHash),
}

/// What the coordinator answered that this site cannot go on with.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelViolation {
    /// The coordinator refused to serve the model (its reason, made safe).
    #[error("model {hash} refused: {code}: {message}")]
    Refused {
        /// The model asked for.
        hash: ModelHash,
        /// The coordinator's reject code.
        code: String,
        /// Its message, truncated.
        message: String,
    },
    /// A message that does not answer the request.
    #[error("sent {sent} in answer to {request}")]
    Unexpected {
        /// What was sent.
        sent: &'static str,
        /// The request.
        request: &'static str,
    },
    /// More model frames than the manifest announced.
    #[error("more model frames than the manifest announced")]
    ExtraFrames,
}

/// Why a download failed (the round fails with it; a refused *update* is
/// not an error: the whole model is fetched instead).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The coordinator broke the protocol or refused the model.
    #[error("coordinator: {0}")]
    Coordinator(#[from] ModelViolation),
    /// The whole model's manifest or records failed their checks.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The driver called a method the current step did not ask for.
    #[error("internal: download driven out of order ({0})")]
    OutOfOrder(&'static str),
}

enum Phase {
    /// Waiting for the cache lookup of the model.
    Cache,
    /// Waiting for the base model from the cache.
    Base(ModelHash),
    /// Asked for the update of `base`.
    AskedUpdate {
        base: ModelHash,
        base_model: FlatModel,
        kept: Vec<Bytes>,
    },
    /// Receiving the update's records (`end`: all are in).
    Update {
        base: ModelHash,
        applier: Box<UpdateApplier>,
        resumed: Option<u64>,
        end: bool,
    },
    /// Asked for the whole model.
    AskedModel { kept: Vec<Bytes> },
    /// Receiving the model's records (`end`: all are in).
    Model {
        asm: Box<ModelAssembler>,
        records: Vec<Bytes>,
        resumed: Option<u64>,
        end: bool,
    },
    /// Done, or failed.
    Over,
}

/// The download of one model (see the module docs).
pub struct Download {
    req: Request,
    /// The partial download kept across connections, until consulted.
    kept: Option<PartialDownload>,
    phase: Phase,
    effects: Vec<Effect>,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("hash", &self.req.hash)
            .field("phase", &self.phase_name())
            .finish_non_exhaustive()
    }
}

impl Download {
    /// A download of `req.hash`; `kept`: the partial download kept across
    /// connections (of any model).
    pub fn new(req: Request, kept: Option<PartialDownload>) -> Self {
        Self {
            req,
            kept,
            phase: Phase::Cache,
            effects: Vec::new(),
        }
    }

    /// The effects of the last call, to execute in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Cache => "cache",
            Phase::Base(_) => "base",
            Phase::AskedUpdate { .. } => "asked for the update",
            Phase::Update { .. } => "update",
            Phase::AskedModel { .. } => "asked for the model",
            Phase::Model { .. } => "model",
            Phase::Over => "over",
        }
    }

    fn resumable(&self) -> bool {
        self.req.protocol_version >= RESUME_VERSION
    }

    /// What the cache holds of the model: a verified copy is the answer;
    /// a corrupt one goes. Then the update of the base held, if the
    /// session has updates and the base is another model; else the whole
    /// model.
    pub fn on_cached(&mut self, cached: Cached) -> Result<Step, DownloadError> {
        if !matches!(self.phase, Phase::Cache) {
            return Err(DownloadError::OutOfOrder("on_cached"));
        }
        let hash = self.req.hash;
        match cached {
            Cached::Hit { model, bytes } => {
                self.phase = Phase::Over;
                return Ok(Step::Done(Box::new(Outcome {
                    model,
                    cache: None,
                    received: SiteEvent::ModelReceived(site::ModelReceived {
                        model: hash.to_hex(),
                        bytes,
                        from_cache: true,
                        resumed_from_record: None,
                        as_update_of: None,
                    }),
                })));
            }
            Cached::Miss => {}
            Cached::Corrupt => self.effects.push(Effect::Uncache(hash)),
        }
        match self.req.held.filter(|b| *b != hash) {
            Some(base) if supports_downlink_updates(self.req.protocol_version) => {
                self.phase = Phase::Base(base);
                Ok(Step::LoadBase(base))
            }
            _ => Ok(self.ask_model()),
        }
    }

    /// What the cache holds of the base: held → ask for the update of it
    /// (after the records kept of that update); not held (or corrupt,
    /// then it goes) → the whole model.
    pub fn on_base(&mut self, cached: Cached) -> Result<Step, DownloadError> {
        let Phase::Base(base) = self.phase else {
            return Err(DownloadError::OutOfOrder("on_base"));
        };
        match cached {
            Cached::Hit { model, .. } => {
                let kept = self.take_kept(Some(base));
                let request = Message::ModelUpdateFetch(ModelUpdateFetch {
                    hash: self.req.hash,
                    base,
                    from_record: kept.len() as u64,
                });
                self.phase = Phase::AskedUpdate {
                    base,
                    base_model: model,
                    kept,
                };
                Ok(Step::Ask(request))
            }
            Cached::Miss => Ok(self.ask_model()),
            Cached::Corrupt => {
                self.effects.push(Effect::Uncache(base));
                Ok(self.ask_model())
            }
        }
    }

    /// The coordinator's answer to the request: a manifest to check (an
    /// update's, or the whole model's — what a coordinator without the
    /// update sends), its refusal, or a violation.
    pub fn on_answer(&mut self, answer: Message) -> Result<Step, DownloadError> {
        match std::mem::replace(&mut self.phase, Phase::Over) {
            Phase::AskedUpdate {
                base,
                base_model,
                kept,
            } => match answer {
                Message::UpdateManifest(m) => Ok(self.start_update(base, base_model, *m, kept)),
                // No such update: the whole model, every record of it.
                Message::ModelManifest(m) => {
                    self.effects.push(Effect::Forget(self.req.hash));
                    self.start_model(*m, Vec::new())
                }
                other => Err(self.not_a_manifest(other, "ModelUpdateFetch")),
            },
            Phase::AskedModel { kept } => match answer {
                Message::ModelManifest(m) => self.start_model(*m, kept),
                other => Err(self.not_a_manifest(other, "ModelFetch")),
            },
            other => {
                self.phase = other;
                Err(DownloadError::OutOfOrder("on_answer"))
            }
        }
    }

    /// The next chunk record of the update or model.
    pub fn on_record(&mut self, record: Bytes) -> Result<Step, DownloadError> {
        let hash = self.req.hash;
        let resumable = self.resumable();
        match &mut self.phase {
            Phase::Update {
                base,
                applier,
                end: false,
                ..
            } => {
                let base = *base;
                if let Err(e) = applier.push(&record) {
                    return Ok(self.refuse_update(base, &e));
                }
                self.effects.push(Effect::Keep {
                    hash,
                    base: Some(base),
                    record,
                });
                if applier.remaining() > 0 {
                    return Ok(Step::Receive);
                }
            }
            Phase::Model {
                asm,
                records,
                end: false,
                ..
            } => {
                if let Err(e) = asm.push(&record) {
                    self.phase = Phase::Over;
                    self.effects.push(Effect::Forget(hash));
                    return Err(e.into());
                }
                if resumable {
                    self.effects.push(Effect::Keep {
                        hash,
                        base: None,
                        record: record.clone(),
                    });
                }
                records.push(record);
                if asm.remaining() > 0 {
                    return Ok(Step::Receive);
                }
            }
            _ => return Err(DownloadError::OutOfOrder("on_record")),
        }
        Ok(self.all_in())
    }

    /// Whether the stream carried a frame after the last record; else the
    /// result is checked: an update's against the hash asked for (refused:
    /// the whole model is fetched), the whole model's by its assembler.
    pub fn on_end(&mut self, extra_frame: bool) -> Result<Step, DownloadError> {
        let hash = self.req.hash;
        match std::mem::replace(&mut self.phase, Phase::Over) {
            Phase::Update { end: true, .. } | Phase::Model { end: true, .. } if extra_frame => {
                Err(ModelViolation::ExtraFrames.into())
            }
            Phase::Update {
                base,
                applier,
                resumed,
                end: true,
            } => {
                let payload_len = applier.manifest().payload_len;
                match applier.finish() {
                    Ok(model) => Ok(Step::Done(Box::new(Outcome {
                        model,
                        cache: Some(CacheForm::Reencode),
                        received: SiteEvent::ModelReceived(site::ModelReceived {
                            model: hash.to_hex(),
                            bytes: payload_len,
                            from_cache: false,
                            resumed_from_record: resumed,
                            as_update_of: Some(base.to_hex()),
                        }),
                    }))),
                    Err(e) => Ok(self.refuse_update(base, &e)),
                }
            }
            Phase::Model {
                asm,
                records,
                resumed,
                end: true,
            } => {
                let manifest = asm.manifest().clone();
                let model = asm.finish()?;
                Ok(Step::Done(Box::new(Outcome {
                    model,
                    received: SiteEvent::ModelReceived(site::ModelReceived {
                        model: hash.to_hex(),
                        bytes: manifest.payload_len,
                        from_cache: false,
                        resumed_from_record: resumed,
                        as_update_of: None,
                    }),
                    cache: Some(CacheForm::Received { manifest, records }),
                })))
            }
            other => {
                self.phase = other;
                Err(DownloadError::OutOfOrder("on_end"))
            }
        }
    }

    /// The records kept of this model in this form (`base`), consulted
    /// once; a partial download of another model or form goes.
    fn take_kept(&mut self, base: Option<ModelHash>) -> Vec<Bytes> {
        match self.kept.take() {
            Some(d) if d.hash == self.req.hash && d.base == base => d.records,
            Some(d) => {
                self.effects.push(Effect::Forget(d.hash));
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// Ask for the whole model, after the records kept of it (from
    /// protocol 6 on).
    fn ask_model(&mut self) -> Step {
        let kept = if self.resumable() {
            self.take_kept(None)
        } else {
            Vec::new()
        };
        let hash = self.req.hash;
        let request = if kept.is_empty() {
            Message::ModelFetch(ModelFetch { hash })
        } else {
            Message::ModelFetchFrom(ModelFetchFrom {
                hash,
                from_record: kept.len() as u64,
            })
        };
        self.phase = Phase::AskedModel { kept };
        Step::Ask(request)
    }

    /// An update's manifest: it must name the model asked for and fit the
    /// base held and the site's limit (checked before anything is
    /// decoded); the kept records go first.
    fn start_update(
        &mut self,
        base: ModelHash,
        base_model: FlatModel,
        manifest: UpdateManifest,
        kept: Vec<Bytes>,
    ) -> Step {
        if manifest.hash != self.req.hash {
            let e = DownlinkError::Manifest(format!(
                "announces model {}, {} was asked for",
                manifest.hash, self.req.hash
            ));
            return self.refuse_update(base, &e);
        }
        let mut applier = match UpdateApplier::new(manifest, base_model, self.req.max_params) {
            Ok(a) => Box::new(a),
            Err(e) => return self.refuse_update(base, &e),
        };
        for record in &kept {
            if let Err(e) = applier.push(record) {
                return self.refuse_update(base, &e);
            }
        }
        self.phase = Phase::Update {
            base,
            applier,
            resumed: (!kept.is_empty()).then_some(kept.len() as u64),
            end: false,
        };
        if self.remaining() > 0 {
            Step::Receive
        } else {
            self.all_in()
        }
    }

    /// The whole model's manifest (checked against the request and the
    /// site's limit before anything is allocated); the kept records go
    /// first.
    fn start_model(
        &mut self,
        manifest: ModelManifest,
        kept: Vec<Bytes>,
    ) -> Result<Step, DownloadError> {
        let hash = self.req.hash;
        let mut asm = Box::new(ModelAssembler::new(
            manifest,
            hash,
            &self.req.spec,
            self.req.max_params,
        )?);
        for record in &kept {
            if let Err(e) = asm.push(record) {
                self.effects.push(Effect::Forget(hash));
                return Err(e.into());
            }
        }
        self.phase = Phase::Model {
            asm,
            resumed: (!kept.is_empty()).then_some(kept.len() as u64),
            records: kept,
            end: false,
        };
        Ok(if self.remaining() > 0 {
            Step::Receive
        } else {
            self.all_in()
        })
    }

    fn remaining(&self) -> u64 {
        match &self.phase {
            Phase::Update { applier, .. } => applier.remaining(),
            Phase::Model { asm, .. } => asm.remaining(),
            _ => 0,
        }
    }

    /// Every record is in: the kept ones go; the stream's end is next.
    fn all_in(&mut self) -> Step {
        self.effects.push(Effect::Forget(self.req.hash));
        if let Phase::Update { end, .. } | Phase::Model { end, .. } = &mut self.phase {
            *end = true;
        }
        Step::End
    }

    /// A refused update: on record (`model.refused`), its kept records
    /// gone, the whole model asked for.
    fn refuse_update(&mut self, base: ModelHash, e: &DownlinkError) -> Step {
        let hash = self.req.hash;
        self.effects.push(Effect::Forget(hash));
        self.effects.push(Effect::Record(SiteEvent::ModelRefused(
            site::ModelRefused {
                model: hash.to_hex(),
                as_update_of: Some(base.to_hex()),
                error: e.to_string(),
            },
        )));
        self.ask_model()
    }

    /// An answer to a model request that is not a manifest: the
    /// coordinator's refusal, or a message out of place.
    fn not_a_manifest(&self, answer: Message, request: &'static str) -> DownloadError {
        match answer {
            Message::Reject(r) => ModelViolation::Refused {
                hash: self.req.hash,
                code: reject_code(r.code),
                message: truncate(&r.message),
            }
            .into(),
            other => ModelViolation::Unexpected {
                sent: other.name(),
                request,
            }
            .into(),
        }
    }
}

/// A model obtained as an update, in the form the cache keeps (the
/// lossless records a coordinator sends, so that the next round may ask
/// for an update of it): its manifest and chunk records. CPU-heavy for a
/// large model: the driver runs it off the async runtime.
pub fn cache_form(
    model: &FlatModel,
    hash: ModelHash,
) -> Result<(ModelManifest, Vec<Vec<u8>>), EncodeError> {
    let (records, summary) = encode_payload(model, Encoding::default(), 0)?;
    let manifest = ModelManifest {
        hash,
        spec: model.spec().clone(),
        encoding: Encoding::default(),
        payload_len: summary.payload_len,
        num_chunks: summary.num_chunks,
    };
    Ok((manifest, records))
}

#[cfg(test)]
mod tests;
