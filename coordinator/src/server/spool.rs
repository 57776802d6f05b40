//! Payload spool files: an upload's chunk records written to disk as they
//! arrive (the payload is never held in memory), read back record by record
//! for the validation pass and the fold pass, then archived (accepted) or
//! deleted (rejected).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use fedlink_protocol::payload::{CHUNK_HEADER_LEN, CheckedChunk, ChunkHeader, PayloadDecoder};
use fedlink_protocol::{Encoding, ModelSpec};

/// Why reading a spool (or an archived payload file, the same format)
/// failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// Opening or reading the file failed.
    #[error("spool I/O on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A chunk record does not decode against the model's spec and the
    /// update's encoding.
    #[error("payload: {0}")]
    Payload(#[from] fedlink_protocol::payload::PayloadError),
    /// The file ends inside a chunk record.
    #[error("spool {0} ends in the middle of a chunk record")]
    Truncated(PathBuf),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A spool being written.
#[derive(Debug)]
pub(crate) struct SpoolWriter {
    path: PathBuf,
    out: File,
}

impl SpoolWriter {
    /// Create a new spool file (never overwrites).
    pub(crate) fn create(path: PathBuf) -> Result<Self, SpoolError> {
        // Mode 0600: a spool is a site's raw update.
        let file = fedlink_certs::private::file_options()
            .create_new(true)
            .open(&path)
            .map_err(io(&path))?;
        // Unbuffered: records arrive whole (≈ 0.2–2 MB each); a buffer
        // would only add a copy and an allocation per upload in flight.
        Ok(Self { out: file, path })
    }

    /// Reopen the spool of an interrupted upload to append the rest:
    /// it must hold exactly the `len` bytes the upload's verifier hashed
    /// (a longer file is cut back to them).
    pub(crate) fn append(path: PathBuf, len: u64) -> Result<Self, SpoolError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        let on_disk = file.metadata().map_err(io(&path))?.len();
        if on_disk < len {
            return Err(SpoolError::Truncated(path));
        }
        if on_disk > len {
            file.set_len(len).map_err(io(&path))?;
        }
        let mut out = file;
        std::io::Seek::seek(&mut out, std::io::SeekFrom::Start(len)).map_err(io(&path))?;
        Ok(Self { out, path })
    }

    /// Make what was written durable (an interrupted upload is kept for a
    /// resume only once its records are on disk).
    pub(crate) fn sync(&self) -> Result<(), SpoolError> {
        self.out.sync_data().map_err(io(&self.path))
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        // In pieces of ≤ 1 MiB: a record can exceed 2 MiB (an f32 chunk
        // that does not compress), and one such write costs ≈ 10 × more
        // system time in some VMs (fedlink-durable's docs).
        fedlink_durable::write_in_pieces(&mut self.out, bytes).map_err(io(&self.path))
    }

    /// Flush and fsync; returns the path.
    pub(crate) fn finish(self) -> Result<PathBuf, SpoolError> {
        let Self { path, out } = self;
        out.sync_all().map_err(io(&path))?;
        Ok(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// Decode a spooled payload chunk by chunk, calling `f(offset, values)` for
/// each chunk in order. Every record header is checked by the decoder before
/// its body is read into memory.
pub(crate) fn for_each_chunk<E>(
    path: &Path,
    spec: &ModelSpec,
    encoding: Encoding,
    mut f: impl FnMut(u64, &[f32]) -> Result<(), E>,
) -> Result<Result<(), E>, SpoolError> {
    for_each_checked_chunk(path, spec, encoding, |c| f(c.offset(), c.values()))
}

/// [`for_each_chunk`], handing each chunk over as the decoder checked it
/// (every value finite, the largest `|x|` found), for a validator that
/// then need not scan the values again.
pub(crate) fn for_each_checked_chunk<E>(
    path: &Path,
    spec: &ModelSpec,
    encoding: Encoding,
    mut f: impl FnMut(CheckedChunk<'_>) -> Result<(), E>,
) -> Result<Result<(), E>, SpoolError> {
    let file = File::open(path).map_err(io(path))?;
    // Unbuffered: two reads per record (header, then the body straight
    // into `record`), no buffer allocated per pass.
    let mut r = file;
    // An update's records are covered by its signed payload hash, checked
    // as they arrived: no second hash over the decoded values.
    let mut dec = PayloadDecoder::new(spec.clone(), encoding)?.without_model_hash();
    // One record and one values buffer for the whole pass, from bounded
    // pools (the decoder keeps its own scratch too): no fresh allocation,
    // and no fresh pages, per chunk or per pass.
    let mut record = super::pool::RECORDS.take();
    let mut values = super::pool::VALUES.take();
    loop {
        let mut head = [0u8; CHUNK_HEADER_LEN];
        match read_full(&mut r, &mut head).map_err(io(path))? {
            0 => break,
            n if n < CHUNK_HEADER_LEN => return Err(SpoolError::Truncated(path.to_owned())),
            _ => {}
        }
        let h = ChunkHeader::parse(&head)?;
        let body_len = dec.check_header(&h)?;
        // Resized, not cleared: only bytes beyond the previous record's
        // length are zeroed (a pass's records are mostly the same size),
        // not the whole body before it is read over.
        record.resize(CHUNK_HEADER_LEN + body_len, 0);
        if let Some(h) = record.get_mut(..CHUNK_HEADER_LEN) {
            h.copy_from_slice(&head);
        }
        let body = record.get_mut(CHUNK_HEADER_LEN..).unwrap_or_default();
        if read_full(&mut r, body).map_err(io(path))? != body_len {
            return Err(SpoolError::Truncated(path.to_owned()));
        }
        let chunk = dec.decode_chunk_checked(&record, &mut values)?;
        if let Err(e) = f(chunk) {
            return Ok(Err(e));
        }
    }
    dec.finish()?;
    Ok(Ok(()))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(buf.get_mut(n..).unwrap_or_default())? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
