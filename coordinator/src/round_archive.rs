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

use fedlink_aggregation::StrategyConfig;
use fedlink_aggregation::dp::NoiseRng;
use fedlink_aggregation::round::{RoundAggregator, RoundOutcome, ServerState};
use fedlink_aggregation::validate::ValidatedUpdate;
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
    /// An input update failed a step of the recomputation.
    #[error("input {index} (site {site}, {file}): {step}: {why}")]
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
        why: String,
    },
    /// The aggregation itself failed.
    #[error("aggregation: {0}")]
    Aggregate(String),
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
        f.check().map_err(bad)?;
        Ok(f)
    }

    /// Read and check a `round.json`.
    pub fn load(path: &Path) -> Result<Self, ArchiveError> {
        let bytes = read_bounded(path, MAX_ROUND_FILE)?;
        Self::parse(&bytes, path)
    }

    fn check(&self) -> Result<(), String> {
        if self.format != ROUND_FORMAT {
            return Err(format!(
                "format {} is not supported (this fedlink reads format {ROUND_FORMAT})",
                self.format
            ));
        }
        fedlink_protocol::JobId::new(&self.job).map_err(|e| format!("job: {e}"))?;
        if self.round == 0 {
            return Err("round must be at least 1".into());
        }
        for (name, v) in [
            ("base_model", &self.base_model),
            ("output_model", &self.output_model),
            ("state_before_blake3", &self.state_before_blake3),
            ("dp_seed", &self.dp_seed),
        ] {
            if !is_hex(v, 64) {
                return Err(format!("{name}: expected 64 lowercase hex digits"));
            }
        }
        if !plain_name(&self.state_before) {
            return Err("state_before: not a plain file name".into());
        }
        if self.inputs.is_empty() {
            return Err("a completed round has at least one input".into());
        }
        if self.inputs.len() > MAX_INPUTS {
            return Err(format!(
                "{} inputs, more than the {MAX_INPUTS} a round can fold",
                self.inputs.len()
            ));
        }
        if self.max_sites < self.inputs.len() || self.max_sites > MAX_INPUTS {
            return Err(format!(
                "max_sites {} is out of range for {} inputs",
                self.max_sites,
                self.inputs.len()
            ));
        }
        let mut sites = std::collections::BTreeSet::new();
        for (i, input) in self.inputs.iter().enumerate() {
            fedlink_protocol::SiteId::new(&input.site)
                .map_err(|e| format!("inputs[{i}].site: {e}"))?;
            if !sites.insert(input.site.as_str()) {
                return Err(format!("inputs[{i}]: site {} appears twice", input.site));
            }
            if !is_hex(&input.payload_hash, 64) {
                return Err(format!(
                    "inputs[{i}].payload_hash: expected 64 lowercase hex digits"
                ));
            }
            for (n, f) in [
                ("payload_file", &input.payload_file),
                ("envelope_file", &input.envelope_file),
            ] {
                if !plain_name(f) {
                    return Err(format!("inputs[{i}].{n}: not a plain file name"));
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
) -> Result<(Vec<u8>, T), String> {
    let bytes = serde_json::to_vec(v).map_err(|e| e.to_string())?;
    let back = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    Ok((bytes, back))
}

/// Open a round's aggregator (as the engine does when the round starts).
pub fn open_aggregator(
    strategy: &StrategyConfig,
    spec: &ModelSpec,
    max_sites: usize,
    state: &ServerState,
) -> Result<RoundAggregator, String> {
    RoundAggregator::new(strategy, Arc::new(spec.clone()), max_sites, state)
        .map_err(|e| e.to_string())
}

/// Pass 1 of one payload file: decode and validate it.
pub fn validate_payload(
    agg: &RoundAggregator,
    site: &str,
    num_examples: u64,
    encoding: Encoding,
    path: &Path,
) -> Result<ValidatedUpdate, String> {
    let spec = agg.spec().as_ref().clone();
    let mut validator = agg.validator(site, num_examples);
    let r = crate::server::spool::for_each_chunk(path, &spec, encoding, |offset, values| {
        validator.feed(offset, values).map_err(|e| e.to_string())
    });
    match r {
        Ok(Ok(())) => validator.finish().map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(e.to_string()),
    }
}

/// Pass 2 of one payload file: fold it into the round.
pub fn fold_payload(
    agg: &mut RoundAggregator,
    token: &ValidatedUpdate,
    encoding: Encoding,
    path: &Path,
) -> Result<(), String> {
    let spec = agg.spec().as_ref().clone();
    let mut sink = agg.begin(token).map_err(|e| e.to_string())?;
    let r = crate::server::spool::for_each_chunk(path, &spec, encoding, |offset, values| {
        sink.chunk(offset, values);
        Ok(())
    });
    sink.finish();
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(e.to_string()),
    }
}

/// Finish a round: strategy, clipping / DP noise from `seed`, server
/// optimizer; returns the outcome (the server update) and advances `state`.
pub fn finish_round(
    agg: RoundAggregator,
    state: &mut ServerState,
    seed: [u8; 32],
) -> Result<RoundOutcome, String> {
    let mut rng = NoiseRng::from_seed(seed);
    agg.finish(state, &mut rng).map_err(|e| e.to_string())
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
    /// Updates that clipping shrank.
    pub num_clipped: usize,
    /// Standard deviation of the noise added.
    pub noise_std: f64,
}

/// Recompute a round from its base model and inputs: exactly the engine's
/// computation, with no server. Inputs are folded in the given order.
pub fn recompute(
    strategy: &StrategyConfig,
    max_sites: usize,
    state_before: &ServerState,
    seed: [u8; 32],
    mut base: FlatModel,
    inputs: &[PayloadInput],
) -> Result<Recomputed, ArchiveError> {
    let mut agg = open_aggregator(strategy, base.spec(), max_sites, state_before)
        .map_err(ArchiveError::Aggregate)?;
    for (index, input) in inputs.iter().enumerate() {
        let fail = |step: &'static str, why: String| ArchiveError::Input {
            index,
            site: input.site.clone(),
            file: input.path.display().to_string(),
            step,
            why,
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
    outcome
        .apply_to(&mut base)
        .map_err(|e| ArchiveError::Aggregate(e.to_string()))?;
    Ok(Recomputed {
        model: base,
        state_after: state,
        num_clipped: outcome.num_clipped,
        noise_std: outcome.noise_std,
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
            let err = parse(&f).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
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
