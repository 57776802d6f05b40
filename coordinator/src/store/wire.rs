//! Global models in wire form, on disk: `models/<hash>.wire` holds the
//! lossless payload (f32, byte-shuffled, zstd) of a model version, written
//! once per version and streamed to every site that fetches it. Serving a
//! model therefore costs one page-cached file read per site and O(chunk)
//! memory, whatever the number of sites. `models/<base>-<hash>.update`
//! holds the latest round's global update in the job's downlink encoding.
//!
//! These files sit beside the store's `.bin` model files in `models/` and
//! are written with the same durable-write helpers, so their format and
//! file operations are the store's, not the network driver's: the driver
//! (`server`) only streams them. Which versions stay served and which
//! files are pruned is decided in [`crate::core::served`] (the file names
//! too); this module lists the directory, reads the files and removes
//! what it is told.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use fedlink_protocol::encoding::DEFAULT_CHUNK_BYTES;
use fedlink_protocol::payload::{CHUNK_HEADER_LEN, ChunkHeader};
use fedlink_protocol::{ChunkEncoder, Encoding, FlatModel, ModelHash, ModelSpec, ValueCodec};

use crate::core::served;

/// Why a model's wire form could not be written or read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// The serving encoding was refused (a build error, not an input's).
    #[error(transparent)]
    Encoding(#[from] fedlink_protocol::EncodingError),
    /// Writing the wire file failed.
    #[error(transparent)]
    Write(#[from] fedlink_durable::Error),
    /// Opening the wire file failed.
    #[error("{}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Reading a record header failed.
    #[error(transparent)]
    Read(std::io::Error),
    /// A record header does not parse.
    #[error(transparent)]
    Header(#[from] fedlink_protocol::payload::PayloadError),
    /// The file ends inside a record header.
    #[error("wire file ends inside a record header")]
    CutHeader,
    /// The file ends (or reading fails) inside a record's body.
    #[error("wire file ends inside a record: {0}")]
    CutBody(#[source] std::io::Error),
    /// Skipping a record's body found fewer bytes than its header says.
    #[error("wire file ends inside a record")]
    ShortBody,
    /// The thread writing the wire form ended without an answer.
    #[error("the thread writing the model's wire form panicked")]
    Thread,
    /// The stored model file a wire form is made from could not be read,
    /// or its values do not hash to its name.
    #[error(transparent)]
    Stored(Box<super::StoreError>),
    /// Encoding, decoding or applying the round's global update failed.
    #[error(transparent)]
    Downlink(#[from] crate::round_archive::DownlinkApplyError),
}

/// The encoding models are served with (lossless).
pub(crate) fn model_encoding() -> Result<Encoding, WireError> {
    Ok(Encoding::new(
        ValueCodec::F32,
        true,
        1,
        DEFAULT_CHUNK_BYTES,
    )?)
}

/// A model version available in wire form.
#[derive(Clone, Debug)]
pub(crate) struct WireModel {
    pub(crate) hash: ModelHash,
    pub(crate) spec: ModelSpec,
    pub(crate) encoding: Encoding,
    pub(crate) payload_len: u64,
    pub(crate) num_chunks: u64,
    pub(crate) path: PathBuf,
}

fn wire_path(models_dir: &Path, hash: &ModelHash) -> PathBuf {
    models_dir.join(served::wire_file_name(hash))
}

/// The names of the files in `models_dir` (names that are not UTF-8 are
/// none of the coordinator's); empty if it cannot be listed.
fn file_names(models_dir: &Path) -> Vec<String> {
    std::fs::read_dir(models_dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Write the wire form of `model` unless it exists; return its description.
pub(crate) fn ensure(models_dir: &Path, model: &FlatModel) -> Result<WireModel, WireError> {
    ensure_as(models_dir, model, model.hash())
}

/// [`ensure`] for a model whose hash the caller has just computed (the
/// round's end: not hashed a third time). Sites check the hash of what
/// they decode, so a wrong `hash` could only make a download fail.
pub(crate) fn ensure_as(
    models_dir: &Path,
    model: &FlatModel,
    hash: ModelHash,
) -> Result<WireModel, WireError> {
    let spec = model.spec();
    ensure_with(models_dir, hash, spec, |encoding, emit| {
        let elems = encoding.chunk_elems();
        let chunks = usize::try_from(spec.num_params().div_ceil(elems)).unwrap_or(0);
        // Chunk by chunk on the coordinator's cores (records in order,
        // the bytes of a sequential encoder: `ChunkEncoder`).
        crate::round_archive::in_chunk_order(
            (0..chunks as u64).collect(),
            crate::round_archive::downlink_threads(),
            || ChunkEncoder::new(spec.clone(), encoding, 0).map_err(std::io::Error::other),
            |enc, index| {
                let r = enc
                    .chunk_range(index)
                    .ok_or_else(|| std::io::Error::other("chunk past the model's end"))?;
                let values = model
                    .values()
                    .get(r.start as usize..r.end as usize)
                    .ok_or_else(|| std::io::Error::other("model shorter than its spec"))?;
                enc.encode(index, values).map_err(std::io::Error::other)
            },
            |rec| emit(&rec),
            || std::io::Error::other("a thread encoding the model's wire form panicked"),
        )
    })
}

/// [`ensure_as`] for a model read back from its stored file `bin` (the
/// store's `<hash>.bin`): with downlink updates the round's end does not
/// encode the new model's wire form — sites holding the base fetch the
/// update — and the first site that asks for the whole model has it made
/// from the store. The values are read, hashed and encoded one chunk at a
/// time on the calling thread (the model is never whole in memory: a
/// chunk's values, the encoder's scratch and the read and write buffers,
/// whatever round is in flight), and the file is put in place only if
/// the values read hash to `hash`. `values` is the chunk's buffer (a
/// pooled one: its pages are reused, not faulted in afresh).
pub(crate) fn ensure_from_stored(
    models_dir: &Path,
    bin: &Path,
    hash: ModelHash,
    values: &mut Vec<f32>,
) -> Result<WireModel, WireError> {
    let mut file =
        super::ModelFile::open(bin, &hash).map_err(|e| WireError::Stored(Box::new(e)))?;
    let spec = file.spec.clone();
    // The store's error, when reading or verifying the model file is what
    // failed (the write is then abandoned, the target left untouched).
    let mut stored: Option<super::StoreError> = None;
    let made = ensure_with(models_dir, hash, &spec, |encoding, emit| {
        let mut enc =
            ChunkEncoder::new(spec.clone(), encoding, 0).map_err(std::io::Error::other)?;
        let mut hasher = fedlink_protocol::ModelHasher::new(&spec);
        let mut unread = |e: super::StoreError| {
            let text = e.to_string();
            stored = Some(e);
            std::io::Error::other(text)
        };
        for index in 0..enc.num_chunks() {
            let r = enc
                .chunk_range(index)
                .ok_or_else(|| std::io::Error::other("chunk past the model's end"))?;
            values.resize((r.end - r.start) as usize, 0f32);
            file.read_values(values).map_err(&mut unread)?;
            hasher.update(values);
            emit(&enc.encode(index, values).map_err(std::io::Error::other)?)?;
        }
        file.verify(hasher, &hash).map_err(&mut unread)
    });
    match (made, stored) {
        (Err(_), Some(e)) => Err(WireError::Stored(Box::new(e))),
        (made, _) => made,
    }
}

/// The wire file of model `hash` (spec `spec`) in `models_dir`: the one
/// there if its records read back, else what `encode` hands to `emit`
/// (every record, in order, in the serving encoding), put in place
/// atomically and durably — not at all if `encode` fails.
fn ensure_with(
    models_dir: &Path,
    hash: ModelHash,
    spec: &ModelSpec,
    encode: impl FnOnce(Encoding, &mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()>,
) -> Result<WireModel, WireError> {
    let path = wire_path(models_dir, &hash);
    let encoding = model_encoding()?;
    if path.exists()
        && let Ok(w) = describe(&path, hash, spec.clone(), encoding)
    {
        return Ok(w);
    }
    let (payload_len, num_chunks) = fedlink_durable::replace_with(
        &path,
        fedlink_durable::Mode::Private,
        |out| -> std::io::Result<(u64, u64)> {
            let (mut payload_len, mut num_chunks) = (0u64, 0u64);
            encode(encoding, &mut |rec| {
                out.write_all(rec)?;
                payload_len += rec.len() as u64;
                num_chunks += 1;
                Ok(())
            })?;
            Ok((payload_len, num_chunks))
        },
    )?;
    Ok(WireModel {
        hash,
        spec: spec.clone(),
        encoding,
        payload_len,
        num_chunks,
        path,
    })
}

/// Describe an existing wire file (counts its records; checks each header).
fn describe(
    path: &Path,
    hash: ModelHash,
    spec: ModelSpec,
    encoding: Encoding,
) -> Result<WireModel, WireError> {
    let mut r = RecordReader::open(path)?;
    let mut payload_len = 0u64;
    let mut num_chunks = 0u64;
    while let Some((_, len)) = r.next_head()? {
        r.skip_body(len.saturating_sub(CHUNK_HEADER_LEN))?;
        payload_len += len as u64;
        num_chunks += 1;
    }
    Ok(WireModel {
        hash,
        spec,
        encoding,
        payload_len,
        num_chunks,
        path: path.to_owned(),
    })
}

/// A round's global update in wire form: `models/<base>-<hash>.update`
/// holds the update from model `base` to model `wire.hash`, encoded with
/// the job's downlink encoding (`wire.encoding`), written once per round
/// and streamed to every site that holds `base`.
#[derive(Clone, Debug)]
pub(crate) struct WireUpdate {
    pub(crate) base: ModelHash,
    pub(crate) wire: WireModel,
}

fn update_path(models_dir: &Path, base: &ModelHash, hash: &ModelHash) -> PathBuf {
    models_dir.join(served::update_file_name(base, hash))
}

/// Encode the round's global `update` with `encoding`, write the records to
/// the update file (atomically and durably, like a `.wire` file), and apply
/// the decoded records to `next` (the base model, `base`): `next` becomes
/// the model to publish ([`crate::round_archive::apply_downlink`]). Returns
/// the update's description, whose `wire.hash` is the new model's hash.
pub(crate) fn write_update(
    models_dir: &Path,
    base: ModelHash,
    next: &mut FlatModel,
    update: &FlatModel,
    encoding: Encoding,
    seed: u64,
) -> Result<WireUpdate, WireError> {
    // The file is named after the new model's hash, known only once every
    // record is applied: written under a staging name, then renamed.
    let staging = models_dir.join(served::update_staging_name(&base));
    let mut failure = None;
    let written = fedlink_durable::replace_with(
        &staging,
        fedlink_durable::Mode::Private,
        |out| -> std::io::Result<crate::round_archive::DownlinkSummary> {
            crate::round_archive::apply_downlink(
                next,
                update,
                encoding,
                seed,
                crate::round_archive::downlink_threads(),
                |r| out.write_all(r),
            )
            .map_err(|e| {
                let io = std::io::Error::other(e.to_string());
                failure = Some(e);
                io
            })
        },
    );
    let summary = match (written, failure) {
        (_, Some(e)) => return Err(e.into()),
        (Err(e), None) => return Err(e.into()),
        (Ok(s), None) => s,
    };
    // Hashed as the records were applied (not a second pass over the model).
    let hash = summary.model_hash;
    let path = update_path(models_dir, &base, &hash);
    fedlink_durable::install(&staging, &path)?;
    Ok(WireUpdate {
        base,
        wire: WireModel {
            hash,
            spec: next.spec().clone(),
            encoding,
            payload_len: summary.payload_len,
            num_chunks: summary.num_chunks,
            path,
        },
    })
}

/// The update file whose result is model `hash`, if the job sends
/// updates (`downlink`, its downlink encoding), exactly one such file is
/// there and its records fit that encoding and `spec`: what a restarted
/// coordinator serves again ([`served::update_to_serve_again`], then
/// [`served::update_fits`] over the record headers read here). A file that
/// does not fit is left alone (it is pruned when the next round writes its
/// update).
pub(crate) fn find_update(
    models_dir: &Path,
    hash: &ModelHash,
    spec: &ModelSpec,
    downlink: Option<Encoding>,
) -> Option<WireUpdate> {
    let names = file_names(models_dir);
    let file = served::update_to_serve_again(downlink, hash, names.iter().map(String::as_str))?;
    let path = models_dir.join(file.name);
    let mut r = RecordReader::open(&path).ok()?;
    let (mut payload_len, mut records) = (0u64, Vec::new());
    while let Some((head, len)) = r.next_head().ok()? {
        records.push(ChunkHeader::parse(&head).ok()?);
        r.skip_body(len.saturating_sub(CHUNK_HEADER_LEN)).ok()?;
        payload_len += len as u64;
    }
    if !served::update_fits(&records, spec, file.encoding) {
        return None;
    }
    Some(WireUpdate {
        base: file.base,
        wire: WireModel {
            hash: *hash,
            spec: spec.clone(),
            encoding: file.encoding,
            payload_len,
            num_chunks: records.len() as u64,
            path,
        },
    })
}

/// Remove every update file in `models_dir` but `keep` (the one being
/// served; [`served::updates_to_prune`]): a site holding an older model
/// gets the whole model anyway, so older updates are never served again.
/// Best effort, logged.
pub(crate) fn prune_updates(models_dir: &Path, keep: Option<&Path>) {
    let keep = keep.and_then(|k| k.file_name()).and_then(|n| n.to_str());
    let names = file_names(models_dir);
    for name in served::updates_to_prune(names.iter().map(String::as_str), keep) {
        let path = models_dir.join(name);
        // A download in progress keeps reading the open file.
        if let Err(err) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %err, "pruning an old update file");
        }
    }
}

/// Remove every model wire file (`<hash>.wire`) in `models_dir` but those
/// of the served versions (`keep`, [`served::Served::hashes`];
/// [`served::models_to_prune`]: none when nothing is served): at start, for files left by an earlier run. `.bin`
/// model files (the archive: export, replay) and update files are not
/// touched. Best effort, logged.
pub(crate) fn prune_models(models_dir: &Path, keep: &[ModelHash]) {
    let names = file_names(models_dir);
    for name in served::models_to_prune(names.iter().map(String::as_str), keep) {
        remove_model_file(&models_dir.join(name));
    }
}

/// Remove the wire file of a version no longer served
/// ([`served::Served::publish`] dropped it). Best effort, logged; a download
/// in progress keeps reading its open file.
pub(crate) fn remove_model_file(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(path = %path.display(), "old model wire file pruned"),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            tracing::warn!(path = %path.display(), error = %err, "pruning an old model wire file")
        }
    }
}

/// Reads chunk records back from a wire file.
pub(crate) struct RecordReader {
    inner: File,
}

impl RecordReader {
    pub(crate) fn open(path: &Path) -> Result<Self, WireError> {
        let f = File::open(path).map_err(|source| WireError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            // Unbuffered: a header read, then body pieces of 256 KiB.
            inner: f,
        })
    }

    /// The header of the next record and the record's whole length, or
    /// `None` at the end. The body follows through [`Self::read_body`].
    pub(crate) fn next_head(
        &mut self,
    ) -> Result<Option<([u8; CHUNK_HEADER_LEN], usize)>, WireError> {
        let mut head = [0u8; CHUNK_HEADER_LEN];
        let mut n = 0;
        while n < head.len() {
            match self
                .inner
                .read(head.get_mut(n..).unwrap_or_default())
                .map_err(WireError::Read)?
            {
                0 if n == 0 => return Ok(None),
                0 => return Err(WireError::CutHeader),
                k => n += k,
            }
        }
        let h = ChunkHeader::parse(&head)?;
        Ok(Some((head, h.record_len())))
    }

    /// Fill `buf` with the next bytes of the current record's body.
    pub(crate) fn read_body(&mut self, buf: &mut [u8]) -> Result<(), WireError> {
        self.inner.read_exact(buf).map_err(WireError::CutBody)
    }

    /// Skip `n` bytes of the current record's body.
    pub(crate) fn skip_body(&mut self, n: usize) -> Result<(), WireError> {
        let skipped = std::io::copy(
            &mut Read::by_ref(&mut self.inner).take(n as u64),
            &mut std::io::sink(),
        )
        .map_err(WireError::Read)?;
        if skipped == n as u64 {
            Ok(())
        } else {
            Err(WireError::ShortBody)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wire_file_is_written_once_and_read_back_record_by_record() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::new(vec![fedlink_protocol::TensorSpec::f32("w", vec![8])]).unwrap();
        let model = FlatModel::new(spec, (0..8).map(|i| i as f32).collect()).unwrap();
        let w = ensure(dir.path(), &model).unwrap();
        assert_eq!(w.hash, model.hash());
        assert!(w.num_chunks >= 1);
        let mut r = RecordReader::open(&w.path).unwrap();
        let mut total = 0u64;
        while let Some((head, len)) = r.next_head().unwrap() {
            let mut body = vec![0u8; len - head.len()];
            r.read_body(&mut body).unwrap();
            total += len as u64;
        }
        assert_eq!(total, w.payload_len);
        // Existing: described, not written again.
        assert_eq!(
            ensure(dir.path(), &model).unwrap().payload_len,
            w.payload_len
        );
    }

    #[test]
    fn a_wire_file_of_several_chunks_holds_the_sequential_encoders_bytes() {
        let dir = tempfile::tempdir().unwrap();
        // Three chunks of the serving encoding (512 Ki elements), the last short.
        let n = 2 * (DEFAULT_CHUNK_BYTES as usize / 4) + 1001;
        let spec = ModelSpec::new(vec![
            fedlink_protocol::TensorSpec::f32("a", vec![1000]),
            fedlink_protocol::TensorSpec::f32("b", vec![n as u64 - 1000]),
        ])
        .unwrap();
        let values = (0..n).map(|i| ((i * 7919) % 1013) as f32 * 1e-3).collect();
        let model = FlatModel::new(spec, values).unwrap();
        let w = ensure(dir.path(), &model).unwrap();
        let (records, summary) =
            fedlink_protocol::encode_payload(&model, model_encoding().unwrap(), 0).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(std::fs::read(&w.path).unwrap(), records.concat());
        assert_eq!(
            (w.payload_len, w.num_chunks),
            (summary.payload_len, summary.num_chunks)
        );
    }

    #[test]
    fn an_update_is_written_found_again_after_a_restart_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::new(vec![fedlink_protocol::TensorSpec::f32("w", vec![10])]).unwrap();
        let base = FlatModel::new(spec.clone(), (0..10).map(|i| i as f32).collect()).unwrap();
        let update = FlatModel::new(spec.clone(), vec![0.125; 10]).unwrap();
        let enc = Encoding::with_codec(ValueCodec::F16)
            .unwrap()
            .with_chunk_bytes(16)
            .unwrap();
        let mut next = base.clone();
        let u = write_update(dir.path(), base.hash(), &mut next, &update, enc, 1).unwrap();
        assert_eq!(u.base, base.hash());
        assert_eq!(u.wire.hash, next.hash());
        assert_eq!(u.wire.num_chunks, 3);
        assert!(u.wire.path.ends_with(format!(
            "{}-{}.update",
            base.hash().to_hex(),
            next.hash().to_hex()
        )));
        // Found again, as written; not in another encoding, nor for
        // another model.
        let found = find_update(dir.path(), &next.hash(), &spec, Some(enc)).unwrap();
        assert_eq!(found.base, u.base);
        assert_eq!(
            (
                found.wire.payload_len,
                found.wire.num_chunks,
                &found.wire.path
            ),
            (u.wire.payload_len, u.wire.num_chunks, &u.wire.path)
        );
        let int8 = Encoding::with_codec(ValueCodec::Int8 { stochastic: false })
            .unwrap()
            .with_chunk_bytes(16)
            .unwrap();
        assert!(find_update(dir.path(), &next.hash(), &spec, Some(int8)).is_none());
        assert!(find_update(dir.path(), &base.hash(), &spec, Some(enc)).is_none());
        assert!(find_update(dir.path(), &next.hash(), &spec, None).is_none());
        // Pruning keeps only the one named.
        let mut after = next.clone();
        let v = write_update(dir.path(), next.hash(), &mut after, &update, enc, 1).unwrap();
        prune_updates(dir.path(), Some(&v.wire.path));
        assert!(!u.wire.path.exists() && v.wire.path.exists());
        prune_updates(dir.path(), None);
        assert!(!v.wire.path.exists());
    }

    #[test]
    fn only_the_current_and_the_previous_versions_stay_served() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::new(vec![fedlink_protocol::TensorSpec::f32("w", vec![8])]).unwrap();
        let model = |r: u32| FlatModel::new(spec.clone(), vec![r as f32; 8]).unwrap();
        // What pruning must leave: the archive, updates, other files.
        let bin = dir.path().join(format!("{}.bin", model(0).hash().to_hex()));
        std::fs::write(&bin, b"archive").unwrap();
        let other = dir.path().join("notes.wire");
        std::fs::write(&other, b"not a model").unwrap();
        let enc = Encoding::with_codec(ValueCodec::F16).unwrap();
        let mut next = model(0);
        let update = write_update(
            dir.path(),
            model(0).hash(),
            &mut next,
            &FlatModel::new(spec.clone(), vec![0.5; 8]).unwrap(),
            enc,
            1,
        )
        .unwrap();
        let mut served = served::Served::<WireModel>::default();
        let mut written = Vec::new();
        // A file left by an earlier run (pruned at start).
        let stray = ensure(dir.path(), &model(99)).unwrap().path;
        for round in 0..6 {
            let w = ensure(dir.path(), &model(round)).unwrap();
            written.push(w.path.clone());
            let dropped = served.publish(w.hash, w);
            assert_eq!(dropped.is_some(), round >= 2, "round {round}");
            if let Some(d) = dropped {
                assert_eq!(d.path, written[round as usize - 2]);
                remove_model_file(&d.path);
            }
            if round == 0 {
                prune_models(dir.path(), &served.hashes());
                assert!(!stray.exists());
            }
            assert!(served.hashes().len() <= 2);
        }
        // Publishing the current version again changes nothing.
        assert!(
            served
                .publish(model(5).hash(), ensure(dir.path(), &model(5)).unwrap())
                .is_none()
        );
        remove_model_file(&written[0]); // already gone: not an error
        for (round, path) in written.iter().enumerate() {
            let kept = round >= 4;
            assert_eq!(path.exists(), kept, "round {round}");
            assert_eq!(
                served.get(&model(round as u32).hash()).is_some(),
                kept,
                "round {round}"
            );
        }
        assert_eq!(served.hashes().len(), 2);
        assert!(bin.exists() && other.exists() && update.wire.path.exists());
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".wire"))
            .collect();
        left.sort();
        assert_eq!(left.len(), 3, "{left:?}");
    }

    #[test]
    fn a_missing_or_cut_wire_file_is_an_error_naming_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.wire");
        let err = RecordReader::open(&missing).err().unwrap();
        assert!(matches!(&err, WireError::Open { path, .. } if *path == missing));
        assert!(err.to_string().contains("none.wire"), "{err}");

        let cut = dir.path().join("cut.wire");
        std::fs::write(&cut, [0u8; 3]).unwrap();
        let err = RecordReader::open(&cut).unwrap().next_head().unwrap_err();
        assert!(matches!(err, WireError::CutHeader), "{err:?}");
        assert_eq!(err.to_string(), "wire file ends inside a record header");

        // A whole header, then a body shorter than it says.
        let spec = ModelSpec::new(vec![fedlink_protocol::TensorSpec::f32("w", vec![8])]).unwrap();
        let model = FlatModel::new(spec, vec![1.0; 8]).unwrap();
        let w = ensure(dir.path(), &model).unwrap();
        let bytes = std::fs::read(&w.path).unwrap();
        let short = dir.path().join("short.wire");
        std::fs::write(&short, &bytes[..CHUNK_HEADER_LEN + 1]).unwrap();
        let mut r = RecordReader::open(&short).unwrap();
        let (head, len) = r.next_head().unwrap().unwrap();
        let err = r.skip_body(len - head.len()).unwrap_err();
        assert!(matches!(err, WireError::ShortBody), "{err:?}");
        let mut r = RecordReader::open(&short).unwrap();
        let (head, len) = r.next_head().unwrap().unwrap();
        let mut body = vec![0u8; len - head.len()];
        let err = r.read_body(&mut body).unwrap_err();
        assert!(matches!(err, WireError::CutBody(_)), "{err:?}");
    }
}
