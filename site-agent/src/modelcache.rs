//! Global models received from the coordinator, cached by content hash.
//!
//! A model is identified by its [`ModelHash`] (blake3 of spec and values).
//! The cache keeps, per model, the exact frames received over the wire — one
//! `ModelManifest` message frame, then the chunk frames — in
//! `<data_dir>/models/<hex hash>.fedmodel` (mode 0600, written to a temporary
//! file, fsynced and renamed). Loading decodes the file exactly like a
//! download ([`ModelAssembler`]) and checks the hash again: a damaged or
//! swapped file is an error, never a model to train on.
//!
//! ```text
//!  ModelManifest + chunk records ──▶ ModelAssembler (spec = offer's arch,
//!        (network or cache file)      lossless f32, counts, lengths, hash)
//!                                              │
//!                                              ▼
//!                                          FlatModel
//! ```

use std::path::{Path, PathBuf};

use fedlink_protocol::{
    FlatModel, FrameDecoder, FrameKind, Message, ModelHash, ModelManifest, ModelSpec,
    PayloadDecoder, ValueCodec, encode_frame, encode_message_frame, max_payload_len,
};

/// File name suffix of cached models.
pub const SUFFIX: &str = "fedmodel";
/// File (in the cache directory) naming the global model the site last
/// trained from ([`ModelCache::hold`]).
pub const HELD_FILE: &str = "held";

/// Why a model could not be fetched, decoded or cached.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The manifest does not describe the model asked for.
    #[error("model manifest: {0}")]
    Manifest(String),
    /// A chunk record is malformed or out of place.
    #[error("model payload: {0}")]
    Payload(#[from] fedlink_protocol::PayloadError),
    /// The values do not hash to the announced hash.
    #[error("model hash mismatch: announced {announced}, received values hash to {actual}")]
    HashMismatch {
        /// Hash asked for.
        announced: ModelHash,
        /// Hash of what arrived.
        actual: ModelHash,
    },
    /// The number or length of records differs from the manifest.
    #[error("model payload: {0}")]
    Length(String),
    /// A cached file is not a valid model file.
    #[error("cached model {path}: {message}")]
    CorruptCache {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// File system error.
    #[error("model cache {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Check a manifest against what the site expects, then decode its chunk
/// records one by one into a [`FlatModel`].
#[derive(Debug)]
pub struct ModelAssembler {
    manifest: ModelManifest,
    decoder: PayloadDecoder,
    values: Vec<f32>,
    /// Each chunk is decoded here, then appended to `values` (one buffer
    /// reused for every chunk).
    chunk: Vec<f32>,
    records: u64,
    bytes: u64,
}

impl ModelAssembler {
    /// Accept `manifest` for the model `wanted` with layout `spec` (the
    /// offer's architecture): at most `max_params` parameters (the policy's
    /// `max_model_params`, checked first, before anything is allocated),
    /// same hash, same spec, lossless f32, a payload length within the bound
    /// and the exact chunk count.
    pub fn new(
        manifest: ModelManifest,
        wanted: ModelHash,
        spec: &ModelSpec,
        max_params: u64,
    ) -> Result<Self, ModelError> {
        let bad = |m: String| Err(ModelError::Manifest(m));
        let params = manifest.spec.num_params();
        if params > max_params {
            return bad(format!(
                "describes a model of {params} parameters, the policy's max_model_params is {max_params}"
            ));
        }
        if manifest.hash != wanted {
            return bad(format!(
                "announces model {}, {wanted} was asked for",
                manifest.hash
            ));
        }
        if manifest.spec != *spec {
            return bad("tensor layout differs from the offered architecture".into());
        }
        if manifest.encoding.values() != ValueCodec::F32 {
            return bad(format!(
                "encoding {} is lossy; models must be sent as f32",
                manifest.encoding.name()
            ));
        }
        let max = max_payload_len(spec, &manifest.encoding);
        if manifest.payload_len > max {
            return bad(format!(
                "payload of {} bytes exceeds the bound of {max}",
                manifest.payload_len
            ));
        }
        let chunks = spec.num_params().div_ceil(manifest.encoding.chunk_elems());
        if manifest.num_chunks != chunks {
            return bad(format!(
                "{} chunks announced, the layout needs {chunks}",
                manifest.num_chunks
            ));
        }
        let decoder = PayloadDecoder::new(spec.clone(), manifest.encoding)?;
        // The spec equals the offered architecture's, which the protocol
        // bounds (`MAX_ARCH_PARAMS`), so this allocation is bounded.
        let values = Vec::with_capacity(usize::try_from(spec.num_params()).unwrap_or(0));
        Ok(Self {
            manifest,
            decoder,
            values,
            chunk: Vec::new(),
            records: 0,
            bytes: 0,
        })
    }

    /// The accepted manifest.
    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    /// Records still expected.
    pub fn remaining(&self) -> u64 {
        self.manifest.num_chunks - self.records
    }

    /// Decode the next chunk record.
    pub fn push(&mut self, record: &[u8]) -> Result<(), ModelError> {
        if self.records >= self.manifest.num_chunks {
            return Err(ModelError::Length(format!(
                "more than the {} announced chunks",
                self.manifest.num_chunks
            )));
        }
        self.bytes = self.bytes.saturating_add(record.len() as u64);
        if self.bytes > self.manifest.payload_len {
            return Err(ModelError::Length(format!(
                "more than the {} announced bytes",
                self.manifest.payload_len
            )));
        }
        let offset = self.decoder.decode_chunk_into(record, &mut self.chunk)?;
        if offset != self.values.len() as u64 {
            return Err(ModelError::Length(format!(
                "chunk at offset {offset} where {} was expected",
                self.values.len()
            )));
        }
        self.values.extend_from_slice(&self.chunk);
        self.records += 1;
        Ok(())
    }

    /// Check completeness, length and hash; return the model.
    pub fn finish(self) -> Result<FlatModel, ModelError> {
        let summary = self.decoder.finish()?;
        if summary.payload_len != self.manifest.payload_len || self.bytes != summary.payload_len {
            return Err(ModelError::Length(format!(
                "{} payload bytes received, {} announced",
                self.bytes, self.manifest.payload_len
            )));
        }
        match summary.model_hash {
            Some(actual) if actual == self.manifest.hash => {}
            Some(actual) => {
                return Err(ModelError::HashMismatch {
                    announced: self.manifest.hash,
                    actual,
                });
            }
            // This download's decoder is never made `without_model_hash`.
            None => {
                return Err(ModelError::Manifest(
                    "the model's decoder did not hash the values".into(),
                ));
            }
        }
        let model = FlatModel::new(self.manifest.spec, self.values)
            .map_err(|e| ModelError::Length(e.to_string()))?;
        // Belt and braces: the decoder hashed what it decoded; hash what we
        // hold.
        let actual = model.hash();
        if actual != self.manifest.hash {
            return Err(ModelError::HashMismatch {
                announced: self.manifest.hash,
                actual,
            });
        }
        Ok(model)
    }
}

/// The content-addressed model cache directory.
#[derive(Clone, Debug)]
pub struct ModelCache {
    dir: PathBuf,
}

impl ModelCache {
    /// A cache in `dir` (created, mode 0700, if missing).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, ModelError> {
        let dir = dir.into();
        create_private_dir(&dir).map_err(|source| ModelError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    /// Where model `hash` is stored.
    pub fn path(&self, hash: &ModelHash) -> PathBuf {
        self.dir.join(format!("{}.{SUFFIX}", hash.to_hex()))
    }

    /// Whether a file for `hash` exists (not yet verified).
    pub fn contains(&self, hash: &ModelHash) -> bool {
        self.path(hash).is_file()
    }

    /// Load and verify model `hash` with layout `spec`; `Ok(None)` when not
    /// cached. A file that fails verification is an error (the caller may
    /// [`ModelCache::remove`] it and fetch again).
    pub fn load(
        &self,
        hash: &ModelHash,
        spec: &ModelSpec,
    ) -> Result<Option<FlatModel>, ModelError> {
        let path = self.path(hash);
        let corrupt = |message: String| ModelError::CorruptCache {
            path: path.clone(),
            message,
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ModelError::Io { path, source }),
        };
        // Manifest frame + chunk frames of a lossless model: bounded by the
        // largest f32 payload plus generous framing overhead.
        let limit = spec.num_params().saturating_mul(5).saturating_add(1 << 20);
        if meta.len() > limit {
            return Err(corrupt(format!(
                "{} bytes, more than {limit} for this model",
                meta.len()
            )));
        }
        let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let mut frames = FrameDecoder::new();
        frames.push(&bytes);
        let first = frames
            .pop()
            .map_err(|e| corrupt(e.to_string()))?
            .ok_or_else(|| corrupt("empty file".into()))?;
        let manifest = match first.into_message().map_err(|e| corrupt(e.to_string()))? {
            Message::ModelManifest(m) => *m,
            other => return Err(corrupt(format!("starts with {}", other.name()))),
        };
        let mut asm = ModelAssembler::new(manifest, *hash, spec, spec.num_params())
            .map_err(|e| corrupt(e.to_string()))?;
        while let Some(frame) = frames.pop().map_err(|e| corrupt(e.to_string()))? {
            let record = frame.into_chunk().map_err(|e| corrupt(e.to_string()))?;
            asm.push(&record).map_err(|e| corrupt(e.to_string()))?;
        }
        frames.finish().map_err(|e| corrupt(e.to_string()))?;
        asm.finish().map(Some).map_err(|e| corrupt(e.to_string()))
    }

    /// Store a verified model as its manifest and chunk records.
    pub fn store(
        &self,
        manifest: &ModelManifest,
        records: &[impl AsRef<[u8]>],
    ) -> Result<PathBuf, ModelError> {
        let path = self.path(&manifest.hash);
        let io = |source| ModelError::Io {
            path: path.clone(),
            source,
        };
        let mut buf = Vec::new();
        encode_message_frame(
            &Message::ModelManifest(Box::new(manifest.clone())),
            &mut buf,
        )
        .map_err(|e| ModelError::Manifest(e.to_string()))?;
        for r in records {
            encode_frame(FrameKind::Chunk, r.as_ref(), &mut buf)
                .map_err(|e| ModelError::Length(e.to_string()))?;
        }
        // Temporary file, fsync, rename, directory fsync (fedlink-durable);
        // mode 0600: a global model is derived from the federation's data.
        fedlink_durable::replace(&path, &buf, fedlink_durable::Mode::Private)
            .map_err(|e| io(e.source))?;
        Ok(path)
    }

    /// Record that `model` is the global model of `job` this site last
    /// trained from (`<cache dir>/held`, one line `<job> <hex hash>`,
    /// written atomically): after a restart the agent still asks for the
    /// next model as the update of it (protocol >= 7).
    pub fn hold(&self, job: &str, model: &ModelHash) -> Result<(), ModelError> {
        let path = self.dir.join(HELD_FILE);
        let line = format!("{job} {}\n", model.to_hex());
        fedlink_durable::replace(&path, line.as_bytes(), fedlink_durable::Mode::Private).map_err(
            |e| ModelError::Io {
                path,
                source: e.source,
            },
        )
    }

    /// The model [`ModelCache::hold`] recorded for `job`, if any (a missing
    /// or unreadable record is none: the whole model is fetched then).
    pub fn held(&self, job: &str) -> Option<ModelHash> {
        use std::io::Read;
        // One short line; a larger file is not one this agent wrote, and
        // is not read past this bound.
        const MAX_HELD_BYTES: u64 = 4096;
        let file = std::fs::File::open(self.dir.join(HELD_FILE)).ok()?;
        let mut text = String::new();
        file.take(MAX_HELD_BYTES).read_to_string(&mut text).ok()?;
        let (j, hash) = text.trim_end().split_once(' ')?;
        (j == job).then(|| ModelHash::from_hex(hash)).flatten()
    }

    /// Remove the file of model `hash` (after a failed verification).
    pub fn remove(&self, hash: &ModelHash) -> Result<(), ModelError> {
        let path = self.path(hash);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ModelError::Io { path, source }),
        }
    }
}

/// Create `dir` and its parents; new directories get mode 0700.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlink_protocol::arch::ArchSpec;
    use fedlink_protocol::{Encoding, encode_payload};

    #[test]
    fn the_model_held_is_recorded_per_job_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModelCache::open(dir.path().join("models")).unwrap();
        assert_eq!(cache.held("job-1"), None);
        cache.hold("job-1", &ModelHash([3; 32])).unwrap();
        let again = ModelCache::open(dir.path().join("models")).unwrap();
        assert_eq!(again.held("job-1"), Some(ModelHash([3; 32])));
        assert_eq!(again.held("job-2"), None, "another job's");
        std::fs::write(dir.path().join("models").join(HELD_FILE), "job-1 zz\n").unwrap();
        assert_eq!(again.held("job-1"), None, "garbage is none");
    }

    fn model() -> (FlatModel, ModelManifest, Vec<Vec<u8>>) {
        let arch = ArchSpec::LogReg {
            inputs: 30,
            classes: 2,
        };
        let m = arch.init(3).unwrap();
        let enc = Encoding::default().with_chunk_bytes(64).unwrap();
        let (records, summary) = encode_payload(&m, enc, 0).unwrap();
        let manifest = ModelManifest {
            hash: m.hash(),
            spec: m.spec().clone(),
            encoding: enc,
            payload_len: summary.payload_len,
            num_chunks: summary.num_chunks,
        };
        (m, manifest, records)
    }

    #[test]
    fn store_then_load_round_trips_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModelCache::open(dir.path().join("models")).unwrap();
        let (m, manifest, records) = model();
        assert!(cache.load(&m.hash(), m.spec()).unwrap().is_none());
        let path = cache.store(&manifest, &records).unwrap();
        assert!(cache.contains(&m.hash()));
        assert_eq!(cache.load(&m.hash(), m.spec()).unwrap().unwrap(), m);
        // Flip one byte in the last record: the load must fail.
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let e = cache.load(&m.hash(), m.spec()).unwrap_err();
        assert!(matches!(e, ModelError::CorruptCache { .. }), "{e}");
        cache.remove(&m.hash()).unwrap();
        assert!(!cache.contains(&m.hash()));
    }

    /// A manifest of a model larger than the site's `max_model_params` is
    /// refused before anything is allocated for the download.
    #[test]
    fn assembler_refuses_models_above_the_site_limit() {
        let (m, manifest, _) = model();
        let spec = m.spec().clone();
        let n = spec.num_params();
        let Err(e) = ModelAssembler::new(manifest.clone(), m.hash(), &spec, n - 1) else {
            panic!("a model above the limit was accepted")
        };
        assert!(e.to_string().contains("max_model_params"), "{e}");
        assert!(ModelAssembler::new(manifest, m.hash(), &spec, n).is_ok());
    }

    #[test]
    fn assembler_refuses_wrong_manifests_and_payloads() {
        let (m, manifest, records) = model();
        let spec = m.spec().clone();
        let mut wrong = manifest.clone();
        wrong.hash = ModelHash([9; 32]);
        assert!(ModelAssembler::new(wrong, m.hash(), &spec, u64::MAX).is_err());
        let mut wrong = manifest.clone();
        wrong.num_chunks += 1;
        assert!(ModelAssembler::new(wrong, m.hash(), &spec, u64::MAX).is_err());
        let mut wrong = manifest.clone();
        wrong.encoding = Encoding::with_codec(ValueCodec::F16).unwrap();
        assert!(ModelAssembler::new(wrong, m.hash(), &spec, u64::MAX).is_err());
        let other = ArchSpec::LogReg {
            inputs: 31,
            classes: 2,
        }
        .spec()
        .unwrap();
        assert!(ModelAssembler::new(manifest.clone(), m.hash(), &other, u64::MAX).is_err());

        // Values that do not hash to the announced hash.
        let mut other_values = m.values().to_vec();
        other_values[0] += 1.0;
        let tampered = FlatModel::new(spec.clone(), other_values).unwrap();
        let (bad_records, _) = encode_payload(&tampered, manifest.encoding, 0).unwrap();
        let mut lie = manifest.clone();
        lie.payload_len = bad_records.iter().map(|r| r.len() as u64).sum();
        let mut asm = ModelAssembler::new(lie, m.hash(), &spec, u64::MAX).unwrap();
        for r in &bad_records {
            asm.push(r).unwrap();
        }
        assert!(matches!(asm.finish(), Err(ModelError::HashMismatch { .. })));

        // Missing the last record.
        let mut asm = ModelAssembler::new(manifest.clone(), m.hash(), &spec, u64::MAX).unwrap();
        for r in &records[..records.len() - 1] {
            asm.push(r).unwrap();
        }
        assert!(asm.finish().is_err());

        // Good.
        let mut asm = ModelAssembler::new(manifest, m.hash(), &spec, u64::MAX).unwrap();
        for r in &records {
            asm.push(r).unwrap();
        }
        assert_eq!(asm.remaining(), 0);
        assert!(asm.push(&records[0]).is_err());
        assert_eq!(asm.finish().unwrap(), m);
    }
}
