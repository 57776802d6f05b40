//! `fedlink aggregate`: run an aggregation strategy offline on deltas stored
//! as safetensors files.
//!
//! ```text
//! fedlink aggregate --strategy fedadam --set eta=0.05 \
//!     --global global.safetensors --out new.safetensors \
//!     site-a.safetensors:120 site-b.safetensors:80
//! ```
//!
//! Each input is a delta (`local − global`) stored as F32 tensors under their
//! dotted paths, followed by `:NUM_EXAMPLES`. With `--global`, the output is
//! the new global model `global + update`; without it, the output is the
//! server update itself (for FedAvg, the weighted mean delta), so that
//! `new_global = global + output`. Server-optimizer state can be carried
//! between offline runs with `--state-in` / `--state-out` (JSON).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use fedlink_aggregation::{NoiseRng, RoundAggregator, ServerState, StrategyConfig, safetensors_io};

/// Arguments of `fedlink aggregate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Strategy: fedavg, fedavgm, fedadagrad, fedadam, fedyogi, fedmedian,
    /// fedtrimmedavg, krum, bulyan.
    #[arg(long)]
    pub strategy: String,
    /// Strategy parameter, `key=value` (repeatable), e.g. `--set eta=0.05`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Current global model; the output is then the new global model.
    #[arg(long, value_name = "G.safetensors")]
    pub global: Option<PathBuf>,
    /// Server state (optimizer moments, clip norm, privacy) from a previous run.
    #[arg(long, value_name = "STATE.json")]
    pub state_in: Option<PathBuf>,
    /// Where to write the server state after this round.
    #[arg(long, value_name = "STATE.json")]
    pub state_out: Option<PathBuf>,
    /// Output file (safetensors).
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
    /// Replace output files that already exist.
    #[arg(long)]
    pub force: bool,
    /// Updates: `DELTA.safetensors:NUM_EXAMPLES`.
    #[arg(required = true, value_name = "DELTA.safetensors:N")]
    pub updates: Vec<String>,
}

fn parse_update(arg: &str) -> anyhow::Result<(PathBuf, u64)> {
    let (path, n) = arg
        .rsplit_once(':')
        .with_context(|| format!("update {arg:?}: expected PATH:NUM_EXAMPLES"))?;
    let n: u64 = n.parse().with_context(|| {
        format!("update {arg:?}: NUM_EXAMPLES {n:?} is not a non-negative integer")
    })?;
    Ok((PathBuf::from(path), n))
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Write `bytes` to `path` atomically and durably (fedlink-durable); refuse
/// to replace an existing file unless `force`.
fn write_new(path: &Path, bytes: &[u8], force: bool) -> anyhow::Result<()> {
    let mode = fedlink_durable::Mode::Private;
    if force {
        fedlink_durable::replace(path, bytes, mode)?;
    } else {
        fedlink_durable::create_new(path, bytes, mode).with_context(|| {
            format!(
                "writing {} (it may already exist; pass --force to replace it)",
                path.display()
            )
        })?;
    }
    Ok(())
}

/// Run the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    let config = StrategyConfig::from_key_values(&args.strategy, &args.set)
        .context("invalid strategy configuration")?;
    for p in std::iter::once(&args.out).chain(args.state_out.as_ref()) {
        if p.exists() && !args.force {
            bail!("{} already exists; pass --force to replace it", p.display());
        }
    }
    let updates: Vec<(PathBuf, u64)> = args
        .updates
        .iter()
        .map(|u| parse_update(u))
        .collect::<anyhow::Result<_>>()?;

    let global = match &args.global {
        Some(p) => Some(
            safetensors_io::parse(&p.display().to_string(), &read(p)?)
                .with_context(|| format!("global model {}", p.display()))?
                .model,
        ),
        None => None,
    };
    let mut state: ServerState = match &args.state_in {
        Some(p) => serde_json::from_slice(&read(p)?)
            .with_context(|| format!("server state {}", p.display()))?,
        None => ServerState::default(),
    };

    // The model spec: from the global model, else from the first update.
    let mut first = None;
    let spec = match &global {
        Some(g) => Arc::new(g.spec().clone()),
        None => {
            let (p, _) = &updates[0];
            let parsed = safetensors_io::parse(&p.display().to_string(), &read(p)?)
                .with_context(|| format!("update {}", p.display()))?;
            let spec = Arc::new(parsed.model.spec().clone());
            first = Some(parsed.model);
            spec
        }
    };
    fedlink_aggregation::would_fit(&config, updates.len(), &spec)?;
    let mut round = RoundAggregator::new(&config, spec.clone(), updates.len(), &state)?;
    for (i, (path, n)) in updates.iter().enumerate() {
        let name = path.display().to_string();
        let delta = match first.take() {
            Some(m) if i == 0 => m,
            _ => {
                safetensors_io::parse_as(&name, &read(path)?, &spec)
                    .with_context(|| format!("update {name}"))?
                    .model
            }
        };
        round
            .fold(&name, &delta, *n)
            .with_context(|| format!("update {name} refused"))?;
    }
    let mut rng = NoiseRng::from_os_rng()?;
    let outcome = round.finish(&mut state, &mut rng)?;

    let (model, kind) = match global {
        Some(mut g) => {
            outcome.apply_to(&mut g)?;
            (g, "model")
        }
        None => (outcome.update.clone(), "update"),
    };
    let mut meta = BTreeMap::new();
    meta.insert("fedlink.kind".to_owned(), kind.to_owned());
    meta.insert("fedlink.strategy".to_owned(), config.name.clone());
    meta.insert(
        "fedlink.num_updates".to_owned(),
        outcome.numbers.num_updates.to_string(),
    );
    meta.insert(
        "fedlink.total_examples".to_owned(),
        outcome.numbers.total_examples.to_string(),
    );
    meta.insert("fedlink.model_hash".to_owned(), model.hash().to_hex());
    let bytes = safetensors_io::serialize(&model, &meta)?;
    write_new(&args.out, &bytes, args.force)?;
    if let Some(p) = &args.state_out {
        write_new(p, &serde_json::to_vec(&state)?, args.force)?;
    }
    eprintln!(
        "{}: aggregated {} updates ({} examples, {} clipped) -> {} {} ({})",
        config.name,
        outcome.numbers.num_updates,
        outcome.numbers.total_examples,
        outcome.numbers.num_clipped,
        kind,
        args.out.display(),
        model.hash()
    );
    if let Some((eps, delta)) = outcome.numbers.privacy {
        eprintln!("privacy spent so far: epsilon = {eps:.4} at delta = {delta:e}");
    }
    Ok(())
}
