//! `fedlink audit replay`: recompute a completed round from its archive
//! (`<data_dir>/updates/<job>/round-NNNNNN/round.json`, the archived signed
//! envelopes and payloads, the base model in `<data_dir>/models/`) and check
//! that it reproduces the recorded model bit for bit. Needs no coordinator
//! and no database (it can run while the coordinator holds its store).
//!
//! ```text
//! fedlink audit replay --data-dir data --job breast-cancer --round 3 --ca-dir ca [--json]
//! ```
//!
//! Checks, in order: `round.json` parses; the server state file matches its
//! recorded blake3; the base model file matches its hash; for every input,
//! the envelope names the same site / job / round / base model / payload
//! hash / examples, its signature verifies with the site's update key from
//! `<ca-dir>/sites.toml` (skipped without `--ca-dir`, and said so), and the
//! payload file's length and blake3 match the signed header; then the round
//! is recomputed ([`fedlink_coordinator::round_archive::recompute`]) and the result's hash
//! compared with the recorded output model (and, if that model file exists,
//! value by value, naming the first differing tensor).
//!
//! | exit | meaning |
//! |---|---|
//! | 0 | reproduced bit for bit, every envelope signature checked |
//! | 1 | could not check (missing or unreadable files, malformed `round.json`) |
//! | 3 | **mismatch**: an input or step differs; the first difference is named |
//! | 4 | reproduced bit for bit but **signatures not checked** (no `--ca-dir`): proves the arithmetic, not who sent the inputs |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use ed25519_dalek::{Signature, VerifyingKey};
use fedlink_aggregation::round::ServerState;
use fedlink_certs::SiteManifest;
use fedlink_protocol::{FlatModel, ModelHash, PayloadHash, SignedEnvelope};
use serde::Serialize;

use fedlink_coordinator::round_archive::{
    self, ArchiveError, MAX_ENVELOPE_FILE, MAX_STATE_FILE, PayloadInput, RoundFile,
};
use fedlink_coordinator::store::{MODELS_DIR, StoreError, read_model_file};

/// Exit code: reproduced.
pub const EXIT_REPRODUCED: u8 = 0;
/// Exit code: could not check.
pub const EXIT_ERROR: u8 = 1;
/// Exit code: mismatch.
pub const EXIT_MISMATCH: u8 = 3;
/// Exit code: reproduced, but the envelope signatures were not checked
/// (no `--ca-dir`), as `fedlink audit verify` without `--key`.
pub const EXIT_UNSIGNED: u8 = 4;

/// Arguments of `fedlink audit replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The coordinator's data directory.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Job id.
    #[arg(long)]
    job: String,
    /// Round number.
    #[arg(long)]
    round: u64,
    /// Directory with the federation's `sites.toml` (the sites' update keys):
    /// every envelope signature is checked. Without it, signatures are not.
    #[arg(long, value_name = "CA")]
    ca_dir: Option<PathBuf>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

/// The result of a replay.
#[derive(Debug, Serialize)]
pub struct ReplayReport {
    /// Job.
    pub job: String,
    /// Round.
    pub round: u64,
    /// `reproduced`, `mismatch`.
    pub result: &'static str,
    /// Recorded output model (hex).
    pub recorded_model: String,
    /// Recomputed output model (hex), if the recomputation ran.
    pub recomputed_model: Option<String>,
    /// Inputs checked.
    pub inputs: usize,
    /// Whether envelope signatures were checked.
    pub signatures_checked: bool,
    /// The first difference found.
    pub mismatch: Option<String>,
}

/// A mismatch (exit 3) as opposed to an inability to check (exit 1).
#[derive(Debug)]
struct Mismatch(String);

enum Outcome {
    Report(ReplayReport),
    CannotCheck(anyhow::Error),
}

/// Run `fedlink audit replay`.
pub fn run(args: &ReplayArgs) -> ExitCode {
    match replay(args) {
        Outcome::Report(r) => {
            if args.json {
                match serde_json::to_string(&r) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(EXIT_ERROR);
                    }
                }
            } else {
                print_report(&r);
            }
            ExitCode::from(if r.mismatch.is_some() {
                EXIT_MISMATCH
            } else if !r.signatures_checked {
                EXIT_UNSIGNED
            } else {
                EXIT_REPRODUCED
            })
        }
        Outcome::CannotCheck(e) => {
            if args.json {
                let v = serde_json::json!({
                    "job": args.job, "round": args.round,
                    "result": "error", "error": format!("{e:#}"),
                });
                println!("{v}");
            }
            eprintln!("error: cannot check the round: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn print_report(r: &ReplayReport) {
    println!("job {} round {}: {} input(s)", r.job, r.round, r.inputs);
    println!("recorded   output model {}", r.recorded_model);
    println!(
        "recomputed output model {}",
        r.recomputed_model.as_deref().unwrap_or("(not recomputed)")
    );
    if !r.signatures_checked {
        println!("signatures: NOT checked (no --ca-dir)");
    }
    match &r.mismatch {
        None => println!("REPRODUCED bit for bit"),
        Some(m) => println!("MISMATCH: {m}"),
    }
}

fn replay(args: &ReplayArgs) -> Outcome {
    let dir = round_archive::round_dir(&args.data_dir, &args.job, args.round);
    let file = match RoundFile::load(&dir.join(round_archive::ROUND_FILE)) {
        Ok(f) => f,
        Err(e) => return Outcome::CannotCheck(e.into()),
    };
    let mut report = ReplayReport {
        job: file.job.clone(),
        round: file.round,
        result: "mismatch",
        recorded_model: file.output_model.clone(),
        recomputed_model: None,
        inputs: file.inputs.len(),
        signatures_checked: args.ca_dir.is_some(),
        mismatch: None,
    };
    if file.job != args.job || file.round != args.round {
        report.mismatch = Some(format!(
            "round.json describes job {} round {}, not job {} round {}",
            file.job, file.round, args.job, args.round
        ));
        return Outcome::Report(report);
    }
    match check_and_recompute(args, &dir, &file, &mut report) {
        Ok(Ok(())) => {
            report.result = "reproduced";
            Outcome::Report(report)
        }
        Ok(Err(Mismatch(m))) => {
            report.mismatch = Some(m);
            Outcome::Report(report)
        }
        Err(e) => Outcome::CannotCheck(e),
    }
}

fn check_and_recompute(
    args: &ReplayArgs,
    dir: &Path,
    file: &RoundFile,
    report: &mut ReplayReport,
) -> anyhow::Result<Result<(), Mismatch>> {
    let keys = match &args.ca_dir {
        Some(ca) => Some(site_keys(ca)?),
        None => None,
    };
    // Server state before the round.
    let state_path = dir.join(&file.state_before);
    let state_bytes = round_archive::read_bounded(&state_path, MAX_STATE_FILE)?;
    let actual = blake3::hash(&state_bytes).to_hex().to_string();
    if actual != file.state_before_blake3 {
        return Ok(Err(Mismatch(format!(
            "{}: blake3 is {actual}, round.json records {}",
            state_path.display(),
            file.state_before_blake3
        ))));
    }
    let state: ServerState = serde_json::from_slice(&state_bytes)
        .with_context(|| format!("{}: not a server state", state_path.display()))?;
    // Base model (content-addressed: a changed file fails its hash).
    let base_hash = file.base_hash().context("round.json: base_model")?;
    let recorded = file.output_hash().context("round.json: output_model")?;
    let seed = file.seed().context("round.json: dp_seed")?;
    let models = args.data_dir.join(MODELS_DIR);
    let base = match read_model_file(
        &models.join(format!("{}.bin", base_hash.to_hex())),
        &base_hash,
    ) {
        Ok(m) => m,
        Err(e @ StoreError::ModelCorrupt { .. }) => {
            return Ok(Err(Mismatch(format!("base model: {e}"))));
        }
        Err(e) => return Err(anyhow::Error::new(e).context("base model")),
    };
    // Inputs: envelope ↔ round.json ↔ signature ↔ payload bytes.
    let mut inputs = Vec::with_capacity(file.inputs.len());
    for (i, input) in file.inputs.iter().enumerate() {
        let env_path = dir.join(&input.envelope_file);
        let env_bytes = round_archive::read_bounded(&env_path, MAX_ENVELOPE_FILE)?;
        let env: SignedEnvelope = match serde_json::from_slice(&env_bytes) {
            Ok(e) => e,
            Err(e) => {
                return Ok(Err(Mismatch(format!(
                    "input {i} (site {}): {} is not a signed envelope: {e}",
                    input.site,
                    env_path.display()
                ))));
            }
        };
        let h = &env.header;
        let wrong = |what: &str, found: String, expected: String| {
            Mismatch(format!(
                "input {i} (site {}): {}: envelope {what} is {found}, round.json expects {expected}",
                input.site,
                env_path.display()
            ))
        };
        if h.site_id.as_str() != input.site {
            return Ok(Err(wrong(
                "site",
                h.site_id.to_string(),
                input.site.clone(),
            )));
        }
        if h.job_id.as_str() != file.job {
            return Ok(Err(wrong("job", h.job_id.to_string(), file.job.clone())));
        }
        if h.round.0 != file.round {
            return Ok(Err(wrong(
                "round",
                h.round.0.to_string(),
                file.round.to_string(),
            )));
        }
        if h.base_model != base_hash {
            return Ok(Err(wrong(
                "base model",
                h.base_model.to_hex(),
                file.base_model.clone(),
            )));
        }
        if h.payload_hash.to_hex() != input.payload_hash {
            return Ok(Err(wrong(
                "payload hash",
                h.payload_hash.to_hex(),
                input.payload_hash.clone(),
            )));
        }
        if h.num_examples != input.num_examples {
            return Ok(Err(wrong(
                "num_examples",
                h.num_examples.to_string(),
                input.num_examples.to_string(),
            )));
        }
        if let Some(keys) = &keys {
            let Some(key) = keys.get(&input.site) else {
                anyhow::bail!(
                    "input {i}: site {} is not in sites.toml: its signature cannot be checked",
                    input.site
                );
            };
            let sig = Signature::from_bytes(&env.signature.to_bytes());
            if key.verify_strict(&h.signed_bytes(), &sig).is_err() {
                return Ok(Err(Mismatch(format!(
                    "input {i} (site {}): {}: the signature does not verify with the site's \
                     update key",
                    input.site,
                    env_path.display()
                ))));
            }
        }
        let payload_path = dir.join(&input.payload_file);
        let (len, hash) = hash_file(&payload_path)?;
        if len != h.payload_len || hash != h.payload_hash {
            return Ok(Err(Mismatch(format!(
                "input {i} (site {}): payload {} was altered: {len} bytes with blake3 {}, the \
                 signed header says {} bytes with blake3 {}",
                input.site,
                payload_path.display(),
                hash.to_hex(),
                h.payload_len,
                h.payload_hash.to_hex()
            ))));
        }
        inputs.push(PayloadInput {
            site: input.site.clone(),
            num_examples: input.num_examples,
            encoding: h.encoding,
            path: payload_path,
        });
    }
    // Recompute.
    // With the round's downlink encoding, if it had one (older archives
    // have none and replay as before).
    let out = match round_archive::recompute(
        &file.strategy,
        file.max_sites,
        &state,
        seed,
        file.downlink,
        base,
        &inputs,
    ) {
        Ok(o) => o,
        Err(
            e @ (ArchiveError::Input { .. }
            | ArchiveError::Aggregate(_)
            | ArchiveError::Downlink(_)),
        ) => {
            return Ok(Err(Mismatch(format!("recomputation failed: {e}"))));
        }
        Err(e) => return Err(e.into()),
    };
    let got = out.model.hash();
    report.recomputed_model = Some(got.to_hex());
    if got == recorded {
        return Ok(Ok(()));
    }
    Ok(Err(Mismatch(describe_difference(
        &models, &recorded, &out.model,
    ))))
}

fn describe_difference(models: &Path, recorded: &ModelHash, got: &FlatModel) -> String {
    let path = models.join(format!("{}.bin", recorded.to_hex()));
    let stored = match read_model_file(&path, recorded) {
        Ok(m) => m,
        Err(e) => {
            return format!(
                "every input verified, but the recomputed model differs from the recorded one \
                 (the recorded model file cannot be compared: {e})"
            );
        }
    };
    if stored.spec() != got.spec() {
        return "every input verified, but the recomputed model has another spec than the \
                recorded one"
            .into();
    }
    let mut differing = 0u64;
    let mut first = None;
    for (i, (a, b)) in stored.values().iter().zip(got.values()).enumerate() {
        if a.to_bits() != b.to_bits() {
            differing += 1;
            first.get_or_insert((i, *a, *b));
        }
    }
    let Some((i, a, b)) = first else {
        return "every input verified; the values are equal but the hashes differ".into();
    };
    let tensor = got
        .spec()
        .tensor_at(i as u64)
        .and_then(|t| got.spec().tensors().get(t))
        .map_or_else(|| "?".to_owned(), |t| t.path.clone());
    format!(
        "every input verified, but the aggregation step differs: {differing} value(s) differ; \
         first at element {i} (tensor {tensor}): recorded {a:e}, recomputed {b:e}"
    )
}

fn hash_file(path: &Path) -> anyhow::Result<(u64, PayloadHash)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    let len = std::io::copy(&mut f, &mut hasher).with_context(|| format!("{}", path.display()))?;
    Ok((len, PayloadHash(*hasher.finalize().as_bytes())))
}

fn site_keys(ca_dir: &Path) -> anyhow::Result<BTreeMap<String, VerifyingKey>> {
    let path = ca_dir.join(fedlink_certs::SITES_FILE);
    let manifest = SiteManifest::load(&path).with_context(|| format!("{}", path.display()))?;
    let mut keys = BTreeMap::new();
    for s in &manifest.site {
        let key = s
            .update_verifying_key()
            .with_context(|| format!("{}: site {}", path.display(), s.name))?;
        keys.insert(s.name.clone(), key);
    }
    Ok(keys)
}
