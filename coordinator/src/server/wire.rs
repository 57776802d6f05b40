//! Global models in wire form, on disk: `models/<hash>.wire` holds the
//! lossless payload (f32, byte-shuffled, zstd) of a model version, written
//! once per version and streamed to every site that fetches it. Serving a
//! model therefore costs one page-cached file read per site and O(chunk)
//! memory, whatever the number of sites.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use fedlink_protocol::encoding::DEFAULT_CHUNK_BYTES;
use fedlink_protocol::payload::{CHUNK_HEADER_LEN, ChunkHeader};
use fedlink_protocol::{Encoding, FlatModel, ModelHash, ModelSpec, PayloadEncoder, ValueCodec};

/// The encoding models are served with (lossless).
pub(crate) fn model_encoding() -> Result<Encoding, String> {
    Encoding::new(ValueCodec::F32, true, 1, DEFAULT_CHUNK_BYTES).map_err(|e| e.to_string())
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
    models_dir.join(format!("{}.wire", hash.to_hex()))
}

/// Write the wire form of `model` unless it exists; return its description.
pub(crate) fn ensure(models_dir: &Path, model: &FlatModel) -> Result<WireModel, String> {
    let hash = model.hash();
    let path = wire_path(models_dir, &hash);
    let encoding = model_encoding()?;
    if path.exists()
        && let Ok(w) = describe(&path, hash, model.spec().clone(), encoding)
    {
        return Ok(w);
    }
    let (payload_len, num_chunks) = fedlink_durable::replace_with(
        &path,
        fedlink_durable::Mode::Private,
        |out| -> std::io::Result<(u64, u64)> {
            let mut enc = PayloadEncoder::new(model.spec().clone(), encoding, 0)
                .map_err(std::io::Error::other)?;
            let mut payload_len = 0u64;
            let mut num_chunks = 0u64;
            while let Some(r) = enc.next_chunk() {
                let values = model
                    .values()
                    .get(r.start as usize..r.end as usize)
                    .ok_or_else(|| std::io::Error::other("model shorter than its spec"))?;
                let rec = enc.encode_chunk(values).map_err(std::io::Error::other)?;
                out.write_all(&rec)?;
                payload_len += rec.len() as u64;
                num_chunks += 1;
            }
            enc.finish().map_err(std::io::Error::other)?;
            Ok((payload_len, num_chunks))
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(WireModel {
        hash,
        spec: model.spec().clone(),
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
) -> Result<WireModel, String> {
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

/// Reads chunk records back from a wire file.
pub(crate) struct RecordReader {
    inner: File,
}

impl RecordReader {
    pub(crate) fn open(path: &Path) -> Result<Self, String> {
        let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self {
            // Unbuffered: a header read, then body pieces of 256 KiB.
            inner: f,
        })
    }

    /// The header of the next record and the record's whole length, or
    /// `None` at the end. The body follows through [`Self::read_body`].
    pub(crate) fn next_head(&mut self) -> Result<Option<([u8; CHUNK_HEADER_LEN], usize)>, String> {
        let mut head = [0u8; CHUNK_HEADER_LEN];
        let mut n = 0;
        while n < head.len() {
            match self
                .inner
                .read(head.get_mut(n..).unwrap_or_default())
                .map_err(|e| e.to_string())?
            {
                0 if n == 0 => return Ok(None),
                0 => return Err("wire file ends inside a record header".into()),
                k => n += k,
            }
        }
        let h = ChunkHeader::parse(&head).map_err(|e| e.to_string())?;
        Ok(Some((head, h.record_len())))
    }

    /// Fill `buf` with the next bytes of the current record's body.
    pub(crate) fn read_body(&mut self, buf: &mut [u8]) -> Result<(), String> {
        self.inner
            .read_exact(buf)
            .map_err(|e| format!("wire file ends inside a record: {e}"))
    }

    /// Skip `n` bytes of the current record's body.
    pub(crate) fn skip_body(&mut self, n: usize) -> Result<(), String> {
        let skipped = std::io::copy(
            &mut Read::by_ref(&mut self.inner).take(n as u64),
            &mut std::io::sink(),
        )
        .map_err(|e| e.to_string())?;
        if skipped == n as u64 {
            Ok(())
        } else {
            Err("wire file ends inside a record".into())
        }
    }
}
