//! The per-round archive and the pure recomputation of a round.
//!
//! For every completed round the coordinator keeps, in
//! `<data_dir>/updates/<job>/round-NNNNNN/`:
//!
//! ```text
//! <site>-<payloadhash>-<nonce>.payload        the update's payload bytes, as received
//! <site>-<payloadhash>-<nonce>.envelope.json  the site's signed header
//! state-before.json                           the server state (optimizer moments,
//!                                             adaptive clip norm, accountant) before the round
//! round.json                                  RoundFile: what went in, in fold order, and what came out
//! ```
//!
//! `round.json` is written (temporary file, fsync, rename, directory fsync)
//! before the round's model is published. [`recompute`] is the exact
//! computation the engine performs — validate → exact fixed-point fold →
//! strategy with the server state → clipping / DP noise from the round's
//! seed → server optimizer — as a function of files only, so that
//! `fedlink audit replay` can check a round without the coordinator or its
//! database.
//!
//! # The DP seed
//!
//! Each round's noise comes from ChaCha20 seeded with 32 fresh bytes from
//! the OS, recorded in `round.json` (`dp_seed`). Whoever holds the seed can
//! recompute and subtract the noise — but the archive next to it already
//! holds the raw, pre-noise updates of the round, so the seed reveals
//! nothing the archive does not. Protect the archive as a whole (mode 0700
//! data directory; retention with `update_retention`), and never publish it
//! where the noised model is published.
//!
//! # Exactness
//!
//! The engine computes with the server state and strategy as parsed back
//! from the exact JSON bytes written here, so a replay parsing the same bytes
//! uses bit-identical values.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedlink_aggregation::dp::NoiseRng;
use fedlink_aggregation::round::{RoundAggregator, RoundNumbers, RoundOutcome, ServerState};
use fedlink_aggregation::validate::{UpdateValidator, ValidatedUpdate};
use fedlink_aggregation::{
    AggregationError, Removal, StrategyConfig, Tentative, TentativeFold, UpdateError,
};
use fedlink_protocol::{Encoding, FlatModel, ModelHash, ModelSpec};
use serde::{Deserialize, Serialize};

/// The round description file in a round's archive directory.
pub const ROUND_FILE: &str = "round.json";
/// The server state before the round (JSON, exactly the bytes the engine used).
pub const STATE_BEFORE_FILE: &str = "state-before.json";
/// Format version of [`RoundFile`].
pub const ROUND_FORMAT: u32 = 1;
/// Largest `round.json` read.
pub const MAX_ROUND_FILE: u64 = 16 << 20;
/// Largest `state-before.json` read (optimizer moments are model-sized).
pub const MAX_STATE_FILE: u64 = 8 << 30;
/// Largest envelope file read.
pub const MAX_ENVELOPE_FILE: u64 = 4 << 20;
/// Most inputs a round can have (the exact accumulator's fold limit).
pub const MAX_INPUTS: usize = 8191;

/// `<data_dir>/updates/<job>/round-NNNNNN`.
pub fn round_dir(data_dir: &Path, job: &str, round: u64) -> PathBuf {
    data_dir
        .join("updates")
        .join(job)
        .join(format!("round-{round:06}"))
}

/// `round.json`: everything needed to recompute a round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundFile {
    /// [`ROUND_FORMAT`].
    pub format: u32,
    /// Job id.
    pub job: String,
    /// Round number (from 1).
    pub round: u64,
    /// The global model the round started from (hex; `models/<hash>.bin`).
    pub base_model: String,
    /// The model the round produced (hex).
    pub output_model: String,
    /// The aggregation strategy, as the engine used it.
    pub strategy: StrategyConfig,
    /// Capacity the round was opened with (robust strategies buffer this many).
    pub max_sites: usize,
    /// File (in the round directory) with the server state before the round.
    pub state_before: String,
    /// blake3 (hex) of that file.
    pub state_before_blake3: String,
    /// The round's 32-byte noise seed (64 hex digits); see the module docs.
    pub dp_seed: String,
    /// The updates, in the order they were folded.
    pub inputs: Vec<RoundInput>,
    /// The downlink encoding of the round's global update, when the round
    /// published `base + decoded(encoded(update))` ([`apply_downlink`])
    /// instead of `base + update`; absent in archives from before downlink
    /// updates (and for jobs with `downlink = "model"`), which replay as
    /// before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downlink: Option<Encoding>,
}

/// One update of a round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundInput {
    /// Site name.
    pub site: String,
    /// blake3 of the payload (hex).
    pub payload_hash: String,
    /// Aggregation weight the site signed.
    pub num_examples: u64,
    /// Payload file name in the round directory.
    pub payload_file: String,
    /// Signed envelope file name in the round directory.
    pub envelope_file: String,
}

/// Why a round archive could not be read or recomputed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is larger than this reader accepts.
    #[error("{}: {len} bytes, more than the {max} accepted", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// `round.json` (or another archive file) is malformed.
    #[error("{}: {why}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// `round.json` parses but a field is wrong.
    #[error("{}: {source}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: RoundFileError,
    },
    /// An input update failed a step of the recomputation.
    #[error("input {index} (site {site}, {file}): {step}: {source}")]
    Input {
        /// Position in [`RoundFile::inputs`].
        index: usize,
        /// Its site.
        site: String,
        /// Its payload file.
        file: String,
        /// Which step (decode, validate, fold).
        step: &'static str,
        /// Why.
        #[source]
        source: Box<PayloadError>,
    },
    /// The aggregation itself failed.
    #[error("aggregation: {0}")]
    Aggregate(#[source] fedlink_aggregation::Error),
    /// Encoding and applying the round's downlink update failed.
    #[error("downlink update: {0}")]
    Downlink(#[source] DownlinkApplyError),
}

pub use crate::server::spool::SpoolError;

/// What is wrong in a well-formed `round.json` ([`RoundFile::parse`]);
/// carried by [`ArchiveError::Invalid`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoundFileError {
    /// Another format version than this build reads.
    #[error("format {0} is not supported (this fedlink reads format {ROUND_FORMAT})")]
    Format(u32),
    /// The job id is not a valid id.
    #[error("job: {0}")]
    Job(#[source] fedlink_protocol::IdError),
    /// Round 0 is never completed.
    #[error("round must be at least 1")]
    RoundZero,
    /// A hash or seed field (named) is not 64 lowercase hex digits.
    #[error("{0}: expected 64 lowercase hex digits")]
    NotHex(String),
    /// A file field (named) is not a plain file name inside the round's
    /// directory.
    #[error("{0}: not a plain file name")]
    NotPlainName(String),
    /// A completed round without inputs.
    #[error("a completed round has at least one input")]
    NoInputs,
    /// More inputs than a round can fold.
    #[error("{0} inputs, more than the {MAX_INPUTS} a round can fold")]
    TooManyInputs(usize),
    /// `max_sites` below the number of inputs or above the limit.
    #[error("max_sites {max_sites} is out of range for {inputs} inputs")]
    MaxSites {
        /// The recorded `max_sites`.
        max_sites: usize,
        /// The number of inputs.
        inputs: usize,
    },
    /// An input's site is not a valid site id.
    #[error("inputs[{index}].site: {source}")]
    InputSite {
        /// Position in the inputs.
        index: usize,
        /// Why.
        source: fedlink_protocol::IdError,
    },
    /// Two inputs of the same site.
    #[error("inputs[{index}]: site {site} appears twice")]
    SiteTwice {
        /// Position of the second one.
        index: usize,
        /// The site.
        site: String,
    },
}

/// Why one payload file could not be validated (pass 1) or folded
/// (pass 2) — by the engine from its spool, by a replay from the archive.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// The file could not be read or decoded.
    #[error(transparent)]
    Read(#[from] SpoolError),
    /// The decoded update is not acceptable (shapes, NaN/Inf, bounds).
    #[error(transparent)]
    Invalid(#[from] UpdateError),
    /// The round's aggregator refused the update.
    #[error(transparent)]
    Aggregate(#[from] AggregationError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Read a whole file of at most `max` bytes (checked before reading).
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ArchiveError> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    if len > max {
        return Err(ArchiveError::TooLarge {
            path: path.to_owned(),
            len,
            max,
        });
    }
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    if buf.len() as u64 > max {
        return Err(ArchiveError::TooLarge {
            path: path.to_owned(),
            len: buf.len() as u64,
            max,
        });
    }
    Ok(buf)
}

/// A file name that stays inside the round directory.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl RoundFile {
    /// Parse and check `round.json` text (`path` names it in errors).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, ArchiveError> {
        let bad = |why: String| ArchiveError::Malformed {
            path: path.to_owned(),
            why,
        };
        if bytes.len() as u64 > MAX_ROUND_FILE {
            return Err(ArchiveError::TooLarge {
                path: path.to_owned(),
                len: bytes.len() as u64,
                max: MAX_ROUND_FILE,
            });
        }
        let f: Self = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        f.check().map_err(|source| ArchiveError::Invalid {
            path: path.to_owned(),
            source,
        })?;
        Ok(f)
    }

    /// Read and check a `round.json`.
    pub fn load(path: &Path) -> Result<Self, ArchiveError> {
        let bytes = read_bounded(path, MAX_ROUND_FILE)?;
        Self::parse(&bytes, path)
    }

    fn check(&self) -> Result<(), RoundFileError> {
        use RoundFileError as E;
        if self.format != ROUND_FORMAT {
            return Err(E::Format(self.format));
        }
        fedlink_protocol::JobId::new(&self.job).map_err(E::Job)?;
        if self.round == 0 {
            return Err(E::RoundZero);
        }
        for (name, v) in [
            ("base_model", &self.base_model),
            ("output_model", &self.output_model),
            ("state_before_blake3", &self.state_before_blake3),
            ("dp_seed", &self.dp_seed),
        ] {
            if !is_hex(v, 64) {
                return Err(E::NotHex(name.to_owned()));
            }
        }
        if !plain_name(&self.state_before) {
            return Err(E::NotPlainName("state_before".to_owned()));
        }
        if self.inputs.is_empty() {
            return Err(E::NoInputs);
        }
        if self.inputs.len() > MAX_INPUTS {
            return Err(E::TooManyInputs(self.inputs.len()));
        }
        if self.max_sites < self.inputs.len() || self.max_sites > MAX_INPUTS {
            return Err(E::MaxSites {
                max_sites: self.max_sites,
                inputs: self.inputs.len(),
            });
        }
        let mut sites = std::collections::BTreeSet::new();
        for (i, input) in self.inputs.iter().enumerate() {
            fedlink_protocol::SiteId::new(&input.site)
                .map_err(|source| E::InputSite { index: i, source })?;
            if !sites.insert(input.site.as_str()) {
                return Err(E::SiteTwice {
                    index: i,
                    site: input.site.clone(),
                });
            }
            if !is_hex(&input.payload_hash, 64) {
                return Err(E::NotHex(format!("inputs[{i}].payload_hash")));
            }
            for (n, f) in [
                ("payload_file", &input.payload_file),
                ("envelope_file", &input.envelope_file),
            ] {
                if !plain_name(f) {
                    return Err(E::NotPlainName(format!("inputs[{i}].{n}")));
                }
            }
        }
        Ok(())
    }

    /// The base model's hash.
    pub fn base_hash(&self) -> Option<ModelHash> {
        ModelHash::from_hex(&self.base_model)
    }

    /// The recorded output model's hash.
    pub fn output_hash(&self) -> Option<ModelHash> {
        ModelHash::from_hex(&self.output_model)
    }

    /// The noise seed.
    pub fn seed(&self) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&self.dp_seed, &mut out).ok()?;
        Some(out)
    }
}

/// Write `bytes` to `dir/name` atomically and durably
/// (`fedlink_durable::replace`: temporary file, fsync, rename, directory
/// fsync; mode 0600 like everything in the data directory).
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), ArchiveError> {
    fedlink_durable::replace(&dir.join(name), bytes, fedlink_durable::Mode::Private).map_err(|e| {
        ArchiveError::Io {
            path: e.path,
            source: e.source,
        }
    })
}

/// Serialize a value to JSON and parse it back: the engine computes with the
/// parsed value, so a replay parsing the same bytes gets identical floats.
pub fn json_roundtrip<T: Serialize + for<'de> Deserialize<'de>>(
    v: &T,
) -> Result<(Vec<u8>, T), serde_json::Error> {
    let bytes = serde_json::to_vec(v)?;
    let back = serde_json::from_slice(&bytes)?;
    Ok((bytes, back))
}

/// Open a round's aggregator (as the engine does when the round starts).
pub fn open_aggregator(
    strategy: &StrategyConfig,
    spec: &ModelSpec,
    max_sites: usize,
    state: &ServerState,
) -> Result<RoundAggregator, AggregationError> {
    RoundAggregator::new(strategy, Arc::new(spec.clone()), max_sites, state)
}

/// Pass 1 of one payload file: decode and validate it.
pub fn validate_payload(
    agg: &RoundAggregator,
    site: &str,
    num_examples: u64,
    encoding: Encoding,
    path: &Path,
) -> Result<ValidatedUpdate, PayloadError> {
    validate_with(
        agg.validator(site, num_examples),
        agg.spec(),
        encoding,
        path,
    )
}

/// Pass 1 of one payload file with a given validator (the engine's
/// connection tasks hold one per upload, made by the round's aggregator).
pub fn validate_with(
    mut validator: UpdateValidator,
    spec: &ModelSpec,
    encoding: Encoding,
    path: &Path,
) -> Result<ValidatedUpdate, PayloadError> {
    crate::server::spool::for_each_checked_chunk(path, spec, encoding, |chunk| {
        validator.feed_checked(chunk)
    })??;
    Ok(validator.finish()?)
}

/// Passes 1 and 2 of one payload file in one decode (streaming mean
/// without clipping; see `fedlink_aggregation::tentative`): each chunk is
/// checked and folded into the round's accumulator at once, *tentatively*:
/// uncounted until the round counts it. If a check fails (a chunk, or the
/// whole update at its end), what was folded is taken out again exactly
/// (the spool is decoded a second time up to where the fold got: the rare
/// path) before the error is returned.
pub fn check_and_fold(
    mut fold: TentativeFold,
    spec: &ModelSpec,
    encoding: Encoding,
    path: &Path,
) -> Result<Tentative, PayloadError> {
    let read = crate::server::spool::for_each_checked_chunk(path, spec, encoding, |chunk| {
        fold.feed_checked(chunk)
    });
    let (err, removal) = match read {
        Ok(Ok(())) => match fold.finish() {
            Ok(t) => return Ok(t),
            Err(rejected) => {
                let (e, removal) = *rejected;
                (PayloadError::from(e), removal)
            }
        },
        Ok(Err(e)) => (PayloadError::from(e), fold.abandon()),
        Err(e) => (PayloadError::from(e), fold.abandon()),
    };
    remove_payload(removal, spec, encoding, path);
    Err(err)
}

/// Take a tentative contribution out of its accumulator by decoding its
/// payload file again (only as far as it was folded). Returns whether it
/// is gone; if not (the file could not be read again), it stays uncounted
/// and the round's end rebuilds the accumulator from the counted updates.
pub fn remove_payload(
    mut removal: Removal,
    spec: &ModelSpec,
    encoding: Encoding,
    path: &Path,
) -> bool {
    if removal.folded() > 0 {
        let folded = removal.folded();
        let _ = crate::server::spool::for_each_chunk(path, spec, encoding, |offset, values| {
            if offset >= folded {
                // Past what was folded: stop reading (nothing more to take out).
                return Err(());
            }
            removal.chunk(offset, values);
            Ok(())
        });
    }
    removal.done()
}

/// Pass 2 of one payload file: fold it into the round.
pub fn fold_payload(
    agg: &mut RoundAggregator,
    token: &ValidatedUpdate,
    encoding: Encoding,
    path: &Path,
) -> Result<(), PayloadError> {
    let spec = agg.spec().as_ref().clone();
    let mut sink = agg.begin(token)?;
    let r = crate::server::spool::for_each_chunk(path, &spec, encoding, |offset, values| {
        sink.chunk(offset, values);
        Ok::<(), std::convert::Infallible>(())
    });
    sink.finish();
    let Ok(()) = r?;
    Ok(())
}

/// Finish a round: strategy, clipping / DP noise from `seed`, server
/// optimizer; returns the outcome (the server update) and advances `state`.
pub fn finish_round(
    agg: RoundAggregator,
    state: &mut ServerState,
    seed: [u8; 32],
) -> Result<RoundOutcome, fedlink_aggregation::Error> {
    let mut rng = NoiseRng::from_seed(seed);
    agg.finish(state, &mut rng)
}

/// The seed of a round's downlink encoding (stochastic int8 rounding draws
/// from it; the other codecs ignore it): the last 8 bytes of the round's
/// recorded `dp_seed`, little-endian, so that a replay derives the same.
pub fn downlink_seed(seed: [u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&seed[24..]);
    u64::from_le_bytes(b)
}

/// What [`apply_downlink`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DownlinkSummary {
    /// Bytes of the chunk records.
    pub payload_len: u64,
    /// Chunk records.
    pub num_chunks: u64,
    /// The published model's hash (of `base` after the update), computed
    /// chunk by chunk as the records were applied.
    pub model_hash: ModelHash,
}

/// Why a round's global update could not be encoded and applied.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum DownlinkApplyError {
    /// The update and the base have different layouts.
    #[error("the update's layout differs from the base model's")]
    SpecMismatch,
    /// Encoding the update failed (a non-finite value, …).
    #[error("encoding the global update: {0}")]
    Encode(#[from] fedlink_protocol::EncodeError),
    /// Decoding it back failed.
    #[error("decoding the global update: {0}")]
    Decode(#[from] fedlink_protocol::PayloadError),
    /// Applying the decoded values failed (a non-finite result).
    #[error(transparent)]
    Apply(#[from] fedlink_protocol::downlink::DownlinkError),
    /// The record sink (the update file) failed.
    #[error("writing the global update: {0}")]
    Write(#[from] std::io::Error),
    /// A thread encoding chunks ended without an answer.
    #[error("a thread encoding the global update panicked")]
    Thread,
}

/// Threads a round's end spreads its chunk encodes over ([`apply_downlink`],
/// and the new model's lossless wire form): the coordinator's two cores,
/// while sites wait for the next offer; fewer when the machine has fewer
/// cores or the model fewer chunks.
pub const DOWNLINK_THREADS: usize = 2;

/// Results (chunk records) an [`in_chunk_order`] thread may have ready
/// ahead of the sink (each about one chunk of the encoded payload).
const RECORDS_AHEAD: usize = 1;

/// [`DOWNLINK_THREADS`], bounded by the cores this process may use.
pub fn downlink_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(DOWNLINK_THREADS)
}

/// Encode the round's global `update` with the downlink `encoding`, hand
/// each chunk record to `sink` in order (the engine writes them to the
/// update file that sites download; a replay discards them), decode each
/// record back with the real chunk decoder and add the decoded values to
/// `base` ([`fedlink_protocol::downlink::apply_update`], the function sites
/// apply the same records with). `base` becomes the published model; sites
/// that apply the records to their copy of the base hold the same model,
/// bit for bit.
///
/// Chunks are independent (a chunk's record depends on its values, its
/// index and `seed` only: [`fedlink_protocol::ChunkEncoder`]), so with
/// `threads > 1` chunk `i` is encoded, decoded and applied by thread
/// `i mod threads` while this thread hands the records to `sink` in order
/// and hashes the result: the records, their order and the model are
/// those of `threads = 1`. Memory: per thread an encoder, a decoder and at
/// most `RECORDS_AHEAD` (one) + 2 records beyond the two models. On error
/// `base` holds nothing usable (chunks after the failing one may be
/// applied).
pub fn apply_downlink(
    base: &mut FlatModel,
    update: &FlatModel,
    encoding: Encoding,
    seed: u64,
    threads: usize,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<DownlinkSummary, DownlinkApplyError> {
    if base.spec() != update.spec() || base.values().len() != update.values().len() {
        return Err(DownlinkApplyError::SpecMismatch);
    }
    let spec = update.spec().clone();
    let chunk_elems = usize::try_from(encoding.chunk_elems()).unwrap_or(usize::MAX);
    let num_chunks = spec.num_params().div_ceil(encoding.chunk_elems());
    let threads = threads.clamp(1, usize::try_from(num_chunks).unwrap_or(1).max(1));
    let mut hasher = fedlink_protocol::ModelHasher::new(&spec);
    let mut payload_len = 0u64;
    if threads == 1 {
        let mut enc = fedlink_protocol::PayloadEncoder::new(spec.clone(), encoding, seed)?;
        let mut dec =
            fedlink_protocol::PayloadDecoder::new(spec.clone(), encoding)?.without_model_hash();
        let mut decoded = Vec::new();
        while let Some(r) = enc.next_chunk() {
            let values = update
                .values()
                .get(r.start as usize..r.end as usize)
                .ok_or(DownlinkApplyError::SpecMismatch)?;
            let record = enc.encode_chunk(values)?;
            sink(&record)?;
            let offset = dec.decode_chunk_into(&record, &mut decoded)?;
            fedlink_protocol::downlink::apply_update(base.values_mut(), offset, &decoded)?;
            hasher.update(
                base.values()
                    .get(r.start as usize..r.end as usize)
                    .ok_or(DownlinkApplyError::SpecMismatch)?,
            );
        }
        let summary = enc.finish()?;
        dec.finish()?;
        return Ok(DownlinkSummary {
            payload_len: summary.payload_len,
            num_chunks: summary.num_chunks,
            model_hash: hasher.finalize(),
        });
    }
    // Chunk i of the base (its exact slice: every chunk but the last is
    // `chunk_elems` long) goes to thread i mod threads, and comes back
    // applied, with its record.
    let chunks: Vec<(u64, &mut [f32])> = base
        .values_mut()
        .chunks_mut(chunk_elems)
        .enumerate()
        .map(|(i, slice)| (i as u64, slice))
        .collect();
    in_chunk_order(
        chunks,
        threads,
        || -> Result<_, DownlinkApplyError> {
            let enc = fedlink_protocol::ChunkEncoder::new(spec.clone(), encoding, seed)?;
            let dec = fedlink_protocol::ChunkDecoder::new(spec.clone(), encoding)?;
            Ok((enc, dec, Vec::<f32>::new()))
        },
        |(enc, dec, decoded), (index, slice)| {
            apply_chunk(enc, dec, decoded, update, index, chunk_elems, slice)
        },
        |(record, applied)| {
            sink(&record)?;
            payload_len += record.len() as u64;
            hasher.update(applied);
            Ok(())
        },
        || DownlinkApplyError::Thread,
    )?;
    Ok(DownlinkSummary {
        payload_len,
        num_chunks,
        model_hash: hasher.finalize(),
    })
}

/// Run `work` on every item of `items` over `threads` threads (item `i`
/// on thread `i mod threads`, with a state each from `init`) and hand the
/// results to `sink` on the calling thread, in the items' order. A thread
/// is at most [`RECORDS_AHEAD`] results ahead of `sink`. The first error
/// in the items' order (or `sink`'s) stops every thread and is returned;
/// `thread_gone` makes the error of a thread that panicked.
pub(crate) fn in_chunk_order<I, S, R, E>(
    items: Vec<I>,
    threads: usize,
    init: impl Fn() -> Result<S, E> + Sync,
    work: impl Fn(&mut S, I) -> Result<R, E> + Sync,
    mut sink: impl FnMut(R) -> Result<(), E>,
    thread_gone: impl Fn() -> E,
) -> Result<(), E>
where
    I: Send,
    R: Send,
    E: Send,
{
    let threads = threads.clamp(1, items.len().max(1));
    let n = items.len();
    let mut shares: Vec<Vec<I>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        if let Some(share) = shares.get_mut(i % threads) {
            share.push(item);
        }
    }
    let (init, work) = (&init, &work);
    std::thread::scope(|s| {
        let mut inboxes = Vec::with_capacity(threads);
        let mut workers = Vec::with_capacity(threads);
        for share in shares {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<R, E>>(RECORDS_AHEAD);
            inboxes.push(rx);
            workers.push(s.spawn(move || {
                let mut state = match init() {
                    Ok(state) => state,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                for item in share {
                    let done = work(&mut state, item);
                    let failed = done.is_err();
                    // The receiver is gone when the sink failed, or another
                    // item did: stop.
                    if tx.send(done).is_err() || failed {
                        return;
                    }
                }
            }));
        }
        let mut collect = || -> Result<(), E> {
            for i in 0..n {
                let inbox = inboxes.get(i % threads).ok_or_else(&thread_gone)?;
                let done = inbox.recv().map_err(|_| thread_gone())??;
                sink(done)?;
            }
            Ok(())
        };
        let collected = collect();
        // Threads still at work see their channel closed and stop.
        drop(inboxes);
        let mut joined = Ok(());
        for w in workers {
            if w.join().is_err() {
                joined = Err(thread_gone());
            }
        }
        collected.and(joined)
    })
}

/// One chunk of [`apply_downlink`]'s threads: encode chunk `index` of
/// `update`, decode the record back and add the values to `slice` (that
/// chunk of the base). Errors name the same elements as the sequential
/// path's.
fn apply_chunk<'m>(
    enc: &mut fedlink_protocol::ChunkEncoder,
    dec: &mut fedlink_protocol::ChunkDecoder,
    decoded: &mut Vec<f32>,
    update: &FlatModel,
    index: u64,
    chunk_elems: usize,
    slice: &'m mut [f32],
) -> Result<(Vec<u8>, &'m mut [f32]), DownlinkApplyError> {
    let start = (index as usize).saturating_mul(chunk_elems);
    let values = update
        .values()
        .get(start..start.saturating_add(slice.len()))
        .ok_or(DownlinkApplyError::SpecMismatch)?;
    let record = enc.encode(index, values)?;
    let offset = dec.decode_into(index, &record, decoded)?;
    if offset != start as u64 {
        return Err(DownlinkApplyError::SpecMismatch);
    }
    // `apply_update` on the chunk alone; a non-finite sum is reported at
    // its place in the model, as the sequential path reports it.
    fedlink_protocol::downlink::apply_update(slice, 0, decoded).map_err(|e| match e {
        fedlink_protocol::downlink::DownlinkError::NonFinite(i) => {
            fedlink_protocol::downlink::DownlinkError::NonFinite(offset + i)
        }
        other => other,
    })?;
    Ok((record, slice))
}

/// One input of [`recompute`].
#[derive(Debug, Clone)]
pub struct PayloadInput {
    /// Site name.
    pub site: String,
    /// Aggregation weight.
    pub num_examples: u64,
    /// Payload encoding (from the signed envelope).
    pub encoding: Encoding,
    /// The payload file.
    pub path: PathBuf,
}

/// What [`recompute`] produced.
#[derive(Debug)]
pub struct Recomputed {
    /// The new global model.
    pub model: FlatModel,
    /// The server state after the round.
    pub state_after: ServerState,
    /// The round's numbers (updates, examples, clipped, noise, ε).
    pub numbers: RoundNumbers,
}

/// Recompute a round from its base model and inputs: exactly the engine's
/// computation, with no server. Inputs are folded in the given order. With
/// a `downlink` encoding (the round's [`RoundFile::downlink`]) the update is
/// encoded, decoded and applied as the engine did ([`apply_downlink`]).
#[allow(clippy::too_many_arguments)]
pub fn recompute(
    strategy: &StrategyConfig,
    max_sites: usize,
    state_before: &ServerState,
    seed: [u8; 32],
    downlink: Option<Encoding>,
    mut base: FlatModel,
    inputs: &[PayloadInput],
) -> Result<Recomputed, ArchiveError> {
    let mut agg = open_aggregator(strategy, base.spec(), max_sites, state_before)
        .map_err(|e| ArchiveError::Aggregate(e.into()))?;
    for (index, input) in inputs.iter().enumerate() {
        let fail = |step: &'static str, source: PayloadError| ArchiveError::Input {
            index,
            site: input.site.clone(),
            file: input.path.display().to_string(),
            step,
            source: Box::new(source),
        };
        let token = validate_payload(
            &agg,
            &input.site,
            input.num_examples,
            input.encoding,
            &input.path,
        )
        .map_err(|why| fail("decode and validate", why))?;
        fold_payload(&mut agg, &token, input.encoding, &input.path)
            .map_err(|why| fail("fold", why))?;
    }
    let mut state = state_before.clone();
    let outcome = finish_round(agg, &mut state, seed).map_err(ArchiveError::Aggregate)?;
    match downlink {
        Some(encoding) => {
            apply_downlink(
                &mut base,
                &outcome.update,
                encoding,
                downlink_seed(seed),
                downlink_threads(),
                |_| Ok(()),
            )
            .map_err(ArchiveError::Downlink)?;
        }
        None => outcome
            .apply_to(&mut base)
            .map_err(|e| ArchiveError::Aggregate(e.into()))?,
    }
    Ok(Recomputed {
        model: base,
        state_after: state,
        numbers: outcome.numbers,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn sample() -> RoundFile {
        RoundFile {
            format: ROUND_FORMAT,
            job: "job-1".into(),
            round: 1,
            base_model: "a".repeat(64),
            output_model: "b".repeat(64),
            strategy: StrategyConfig::default(),
            max_sites: 2,
            state_before: STATE_BEFORE_FILE.into(),
            state_before_blake3: "c".repeat(64),
            dp_seed: "0".repeat(64),
            downlink: None,
            inputs: vec![RoundInput {
                site: "site-0".into(),
                payload_hash: "d".repeat(64),
                num_examples: 10,
                payload_file: "site-0-x.payload".into(),
                envelope_file: "site-0-x.envelope.json".into(),
            }],
        }
    }

    fn parse(f: &RoundFile) -> Result<RoundFile, ArchiveError> {
        RoundFile::parse(&serde_json::to_vec(f).unwrap(), Path::new("round.json"))
    }

    #[test]
    fn round_trips() {
        let f = sample();
        assert_eq!(parse(&f).unwrap(), f);
        assert!(f.seed().is_some() && f.base_hash().is_some());
    }

    #[test]
    fn bad_round_files_are_named_not_panics() {
        type Mutation = Box<dyn Fn(&mut RoundFile)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("format", Box::new(|f| f.format = 99)),
            ("round", Box::new(|f| f.round = 0)),
            ("base_model", Box::new(|f| f.base_model = "zz".into())),
            ("dp_seed", Box::new(|f| f.dp_seed = "A".repeat(64))),
            (
                "state_before",
                Box::new(|f| f.state_before = "../../etc/passwd".into()),
            ),
            (
                "payload_file",
                Box::new(|f| f.inputs[0].payload_file = "/etc/shadow".into()),
            ),
            (
                "envelope_file",
                Box::new(|f| f.inputs[0].envelope_file = "..".into()),
            ),
            (
                "appears twice",
                Box::new(|f| f.inputs.push(f.inputs[0].clone())),
            ),
            ("at least one input", Box::new(|f| f.inputs.clear())),
            ("max_sites", Box::new(|f| f.max_sites = usize::MAX)),
            ("site", Box::new(|f| f.inputs[0].site = "bad/site".into())),
            ("job", Box::new(|f| f.job = String::new())),
        ];
        for (needle, mutate) in cases {
            let mut f = sample();
            mutate(&mut f);
            let err = parse(&f).unwrap_err();
            assert!(
                matches!(err, ArchiveError::Invalid { .. }),
                "{needle}: {err:?}"
            );
            let err = err.to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        // The variants name the field.
        let mut f = sample();
        f.inputs[0].payload_hash = "x".into();
        assert!(matches!(
            parse(&f),
            Err(ArchiveError::Invalid { source: RoundFileError::NotHex(field), .. })
                if field == "inputs[0].payload_hash"
        ));
        let mut f = sample();
        f.inputs.push(f.inputs[0].clone());
        assert!(matches!(
            parse(&f),
            Err(ArchiveError::Invalid {
                source: RoundFileError::SiteTwice { index: 1, .. },
                ..
            })
        ));
        let mut f = sample();
        f.round = 0;
        assert!(matches!(
            parse(&f),
            Err(ArchiveError::Invalid {
                source: RoundFileError::RoundZero,
                ..
            })
        ));
    }

    #[test]
    fn the_downlink_encoding_is_recorded_and_old_round_files_read_without_it() {
        let f = sample();
        let json = serde_json::to_string(&f).unwrap();
        assert!(!json.contains("downlink"), "{json}");
        assert_eq!(parse(&f).unwrap().downlink, None);
        let mut g = sample();
        g.downlink = Some(Encoding::with_codec(fedlink_protocol::ValueCodec::F16).unwrap());
        assert_eq!(parse(&g).unwrap(), g);
    }

    #[test]
    fn apply_downlink_publishes_what_a_site_computes_from_the_records() {
        use fedlink_protocol::downlink::UpdateApplier;
        use fedlink_protocol::{TensorSpec, UpdateManifest, ValueCodec};
        let spec = ModelSpec::new(vec![
            TensorSpec::f32("a", vec![7]),
            TensorSpec::f32("b", vec![3, 3]),
        ])
        .unwrap();
        let base = FlatModel::new(
            spec.clone(),
            (0..16).map(|i| (i as f32 * 0.3).cos()).collect(),
        )
        .unwrap();
        let update = FlatModel::new(
            spec.clone(),
            (0..16).map(|i| (i as f32 * 1.7).sin() * 1e-3).collect(),
        )
        .unwrap();
        // Lossless: exactly `apply_to`'s plain sum.
        let f32e = Encoding::with_codec(ValueCodec::F32)
            .unwrap()
            .with_chunk_bytes(24)
            .unwrap();
        let mut exact = base.clone();
        apply_downlink(&mut exact, &update, f32e, 5, 1, |_| Ok(())).unwrap();
        let plain: Vec<f32> = base
            .values()
            .iter()
            .zip(update.values())
            .map(|(x, u)| x + u)
            .collect();
        assert_eq!(exact.values(), plain.as_slice());
        for codec in [ValueCodec::F16, ValueCodec::Int8 { stochastic: true }] {
            let enc = Encoding::with_codec(codec)
                .unwrap()
                .with_chunk_bytes(24)
                .unwrap();
            let mut published = base.clone();
            let mut records = Vec::new();
            let sum = apply_downlink(&mut published, &update, enc, 5, 1, |r| {
                records.push(r.to_vec());
                Ok(())
            })
            .unwrap();
            assert_eq!(sum.num_chunks, records.len() as u64);
            assert_ne!(published.values(), plain.as_slice(), "{}", codec.name());
            // Deterministic: the same seed gives the same model.
            let mut again = base.clone();
            apply_downlink(&mut again, &update, enc, 5, 1, |_| Ok(())).unwrap();
            assert_eq!(again, published);
            let manifest = UpdateManifest {
                base: base.hash(),
                hash: published.hash(),
                spec: spec.clone(),
                encoding: enc,
                payload_len: sum.payload_len,
                num_chunks: sum.num_chunks,
            };
            let mut site = UpdateApplier::new(manifest, base.clone(), 16).unwrap();
            for r in &records {
                site.push(r).unwrap();
            }
            assert_eq!(site.finish().unwrap(), published);
        }
        assert_eq!(downlink_seed([7; 32]), u64::from_le_bytes([7; 8]));
    }

    /// A base and an update of 5,851 seeded random values over three
    /// tensors (int8 segments cross chunk boundaries).
    fn seeded_pair(seed: u64) -> (FlatModel, FlatModel) {
        use rand::{Rng, SeedableRng};
        let spec = ModelSpec::new(vec![
            fedlink_protocol::TensorSpec::f32("a", vec![1000]),
            fedlink_protocol::TensorSpec::f32("b", vec![37, 50]),
            fedlink_protocol::TensorSpec::f32("c", vec![3001]),
        ])
        .unwrap();
        let n = spec.num_params() as usize;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let base: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let update: Vec<f32> = (0..n).map(|_| rng.gen_range(-1e-3f32..1e-3)).collect();
        (
            FlatModel::new(spec.clone(), base).unwrap(),
            FlatModel::new(spec, update).unwrap(),
        )
    }

    fn run_downlink(
        base: &FlatModel,
        update: &FlatModel,
        enc: Encoding,
        threads: usize,
    ) -> (FlatModel, Vec<Vec<u8>>, DownlinkSummary) {
        let mut published = base.clone();
        let mut records = Vec::new();
        let sum = apply_downlink(&mut published, update, enc, 9, threads, |r| {
            records.push(r.to_vec());
            Ok(())
        })
        .unwrap();
        (published, records, sum)
    }

    #[test]
    fn apply_downlink_on_several_threads_writes_and_publishes_the_sequential_bits() {
        use fedlink_protocol::ValueCodec;
        let (base, update) = seeded_pair(42);
        let bits = |m: &FlatModel| m.values().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for codec in [
            ValueCodec::F16,
            ValueCodec::Int8 { stochastic: true },
            ValueCodec::Int8 { stochastic: false },
            ValueCodec::Bf16,
            ValueCodec::F32,
        ] {
            // 256 elements per chunk: 23 chunks, the last one shorter.
            let enc = Encoding::with_codec(codec)
                .unwrap()
                .with_chunk_bytes(1024)
                .unwrap();
            let (seq, seq_records, seq_sum) = run_downlink(&base, &update, enc, 1);
            assert_eq!(seq_sum.num_chunks, 23);
            assert_eq!(seq_sum.model_hash, seq.hash(), "{}", codec.name());
            assert_ne!(bits(&seq), bits(&base));
            for threads in [2, 3, 8, 64] {
                let (par, par_records, par_sum) = run_downlink(&base, &update, enc, threads);
                assert_eq!(par_records, seq_records, "{} × {threads}", codec.name());
                assert_eq!(bits(&par), bits(&seq), "{} × {threads}", codec.name());
                assert_eq!(par_sum, seq_sum, "{} × {threads}", codec.name());
            }
        }
    }

    #[test]
    fn apply_downlink_on_several_threads_fails_as_the_sequential_path_does() {
        use fedlink_protocol::ValueCodec;
        let (mut base, mut update) = seeded_pair(7);
        let enc = Encoding::with_codec(ValueCodec::F32)
            .unwrap()
            .with_chunk_bytes(1024)
            .unwrap();
        // Element 3000 (chunk 11) overflows when the update is added.
        base.values_mut()[3000] = f32::MAX;
        update.values_mut()[3000] = f32::MAX;
        let fail = |threads| {
            let mut b = base.clone();
            apply_downlink(&mut b, &update, enc, 9, threads, |_| Ok(()))
                .unwrap_err()
                .to_string()
        };
        let seq = fail(1);
        assert!(seq.contains("element 3000"), "{seq}");
        assert_eq!(fail(2), seq);
        assert_eq!(fail(3), seq);
        // The sink fails at the fourth record: the threads stop, the error
        // is the sink's, whatever the number of threads.
        let (base, update) = seeded_pair(8);
        for threads in [1, 2, 3] {
            let mut b = base.clone();
            let mut calls = 0;
            let err = apply_downlink(&mut b, &update, enc, 9, threads, |_| {
                calls += 1;
                if calls == 4 {
                    Err(std::io::Error::other("disk full"))
                } else {
                    Ok(())
                }
            })
            .unwrap_err();
            assert!(
                matches!(&err, DownlinkApplyError::Write(e) if e.to_string() == "disk full"),
                "{err:?}"
            );
            assert_eq!(calls, 4);
        }
    }

    #[test]
    fn payload_errors_say_which_step_failed() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::new(vec![fedlink_protocol::TensorSpec::f32("w", vec![4])]).unwrap();
        let agg = open_aggregator(
            &StrategyConfig::default(),
            &spec,
            1,
            &ServerState::default(),
        )
        .unwrap();
        let encoding = Encoding::with_codec(fedlink_protocol::ValueCodec::F32).unwrap();
        // No file: the read fails, naming the path.
        let missing = dir.path().join("missing.payload");
        let err = validate_payload(&agg, "a", 1, encoding, &missing).unwrap_err();
        assert!(
            matches!(&err, PayloadError::Read(SpoolError::Io { path, .. }) if *path == missing),
            "{err:?}"
        );
        // A file cut inside a chunk record header.
        let cut = dir.path().join("cut.payload");
        fs::write(&cut, [0u8; 3]).unwrap();
        let err = validate_payload(&agg, "a", 1, encoding, &cut).unwrap_err();
        assert!(
            matches!(&err, PayloadError::Read(SpoolError::Truncated(p)) if *p == cut),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("ends in the middle of a chunk record")
        );
        // Through `recompute`: the input, its site and the step are named.
        let inputs = [PayloadInput {
            site: "a".into(),
            num_examples: 1,
            encoding,
            path: cut,
        }];
        let base = FlatModel::zeros(spec);
        let err = recompute(
            &StrategyConfig::default(),
            1,
            &ServerState::default(),
            [0; 32],
            None,
            base,
            &inputs,
        )
        .unwrap_err();
        assert!(
            matches!(
                &err,
                ArchiveError::Input { index: 0, step: "decode and validate", source, .. }
                    if matches!(**source, PayloadError::Read(SpoolError::Truncated(_)))
            ),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("input 0 (site a, "), "{err}");
    }

    #[test]
    fn malformed_json_and_sizes() {
        let p = Path::new("round.json");
        for text in [
            &b""[..],
            b"{",
            b"[]",
            b"{\"format\":1}",
            b"\xff\xfe",
            b"{\"format\":18446744073709551616}",
        ] {
            assert!(RoundFile::parse(text, p).is_err());
        }
        // Unknown fields are refused.
        let mut v = serde_json::to_value(sample()).unwrap();
        v["extra"] = serde_json::json!(1);
        let err = RoundFile::parse(&serde_json::to_vec(&v).unwrap(), p).unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
        // A huge inputs array is refused after parsing, bounded by the file size.
        let big = vec![b' '; (MAX_ROUND_FILE + 1) as usize];
        assert!(matches!(
            RoundFile::parse(&big, p),
            Err(ArchiveError::TooLarge { .. })
        ));
        let mut f = sample();
        f.inputs = (0..=MAX_INPUTS)
            .map(|i| RoundInput {
                site: format!("s{i}"),
                ..f.inputs[0].clone()
            })
            .collect();
        f.max_sites = MAX_INPUTS;
        let err = parse(&f).unwrap_err().to_string();
        assert!(err.contains("inputs"), "{err}");
    }

    #[test]
    fn read_bounded_refuses_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, vec![0u8; 100]).unwrap();
        assert!(matches!(
            read_bounded(&p, 99),
            Err(ArchiveError::TooLarge { .. })
        ));
        assert_eq!(read_bounded(&p, 100).unwrap().len(), 100);
    }
}
