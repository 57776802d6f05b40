//! `fedlink-opt-sweep`: choose the OPT task's settings on validation data
//! (not run in CI; see `fedlink_demo::tabular_choice`). Prints the
//! validation table, the setting chosen for each method (federated,
//! central, each hospital's local-only model), and then, once, their
//! held-out test metrics.
//!
//! ```text
//! cargo build --locked --workspace --bins && target/debug/fedlink-opt-sweep [--epoch-budget 80 --splits 10]
//! ```

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use fedlink_agent::data::{Samples, Targets};
use fedlink_demo::tabular_choice::{
    SPLIT_SEED, TaskData, choose, methods, metrics, sweep, train_chunked,
};

/// Choose the OPT task's settings on validation data.
#[derive(Parser)]
struct Args {
    /// The repository's data directory.
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Local epochs per candidate in all: a candidate of `e` epochs per
    /// round (or per baseline chunk) is judged after each of
    /// `epoch_budget / e` rounds (or chunks).
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u32).range(2..))]
    epoch_budget: u32,
    /// Validation splits: split seeds 7, 8, … (7 is the agents' own split).
    #[arg(long, default_value_t = 10)]
    splits: u64,
    /// Bootstrap resamples of the test set for the uncertainty of the
    /// test AUC differences.
    #[arg(long, default_value_t = 1000)]
    bootstrap: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.data.join("opt_preterm_4hospitals/splits");
    let sites: Vec<(String, PathBuf)> = ["KY", "MN", "MS", "NY"]
        .iter()
        .map(|s| (s.to_lowercase(), dir.join(s).join("train.csv")))
        .collect();
    let drop: Vec<String> = ["site", "pid", "gestational_age_days"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let splits = (0..args.splits.max(1))
        .map(|k| {
            TaskData::load(
                &sites,
                &dir.join("global_test.csv"),
                "preterm",
                &drop,
                SPLIT_SEED + k,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .context("loading the OPT splits")?;
    let data = splits.first().context("no split")?;
    println!("split seed {SPLIT_SEED} (the agents' own split):");
    for (name, d) in &data.sites {
        let pos = |s: &Samples| match s.targets() {
            Targets::Classes(y) => y.iter().filter(|&&c| c == 1).count(),
            Targets::Masks(_) => 0,
        };
        println!(
            "{name}: train {} rows ({} preterm), validation {} rows ({} preterm)",
            d.data.train.len(),
            pos(&d.data.train),
            d.data.validation.len(),
            pos(&d.data.validation)
        );
    }
    let t = Instant::now();
    println!(
        "\nvalidation AUC (union of the 4 validation parts, mean over {} splits), best stopping point within {} local epochs:",
        splits.len(),
        args.epoch_budget
    );
    println!(
        "{:<10} {:<60} {:>8} {:>6} {:>8}",
        "method", "setting", "best AUC", "round", "at end"
    );
    let rows = sweep(&splits, args.epoch_budget, |r| {
        let (a, round) = r.best();
        println!(
            "{:<10} {:<60} {:>8.4} {:>6} {:>8.4}",
            r.method,
            r.setting.label(),
            a,
            round,
            r.curve.last().copied().unwrap_or(0.0)
        );
    })?;
    println!("(sweep took {:.0} s)", t.elapsed().as_secs_f64());

    println!(
        "\nchosen on validation, trained on the agents' split (seed {SPLIT_SEED}, 80 %), evaluated once on the held-out test set:"
    );
    let mut judged = Vec::new();
    for method in methods(data) {
        let (choice, val) = choose(&rows, &method).context("no candidate")?;
        let (model, scaling) = if method == "federated" {
            (
                data.federate(&choice.setting, choice.rounds, |_, _| Ok(()))?,
                data.pooled.clone(),
            )
        } else if method == "central" {
            let train = data.pooled_train(&data.pooled)?;
            (
                train_chunked(
                    &data.arch,
                    &data.init,
                    &train,
                    &choice.setting,
                    choice.rounds,
                    |_, _| Ok(()),
                )?,
                data.pooled.clone(),
            )
        } else {
            let (_, d) = data
                .sites
                .iter()
                .find(|(n, _)| format!("local {n}") == method)
                .context("unknown site")?;
            (
                train_chunked(
                    &data.arch,
                    &data.init,
                    &d.data.train,
                    &choice.setting,
                    choice.rounds,
                    |_, _| Ok(()),
                )?,
                d.scaling.clone(),
            )
        };
        let test = data.test(&scaling)?;
        let m = metrics(&data.arch, &model, &test)?;
        println!(
            "{method:<10} {:<60} rounds {:>3}  validation AUC {val:.4}  test AUC {:.4} acc {:.4} loss {:.4}",
            choice.setting.label(),
            choice.rounds,
            m.auc.unwrap_or(0.0),
            m.accuracy,
            m.loss
        );
        judged.push((method, model, test));
    }
    bootstrap(&data.arch, &judged, args.bootstrap)
}

/// How far the single test set can be trusted: paired bootstrap of the
/// test rows (seeded), AUC differences federated − other.
fn bootstrap(
    arch: &fedlink_protocol::arch::ArchSpec,
    judged: &[(String, fedlink_protocol::FlatModel, Samples)],
    rounds: u32,
) -> anyhow::Result<()> {
    let Some((_, fed, fed_test)) = judged.first() else {
        return Ok(());
    };
    let n = fed_test.len();
    let mut state = 0x5EED_u64;
    let mut next = move || {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut diffs: Vec<Vec<f64>> = vec![Vec::new(); judged.len()];
    for _ in 0..rounds {
        let idx: Vec<usize> = (0..n).map(|_| (next() % n as u64) as usize).collect();
        let f = metrics(arch, fed, &resample(fed_test, &idx)?)?.auc;
        for (k, (_, model, test)) in judged.iter().enumerate().skip(1) {
            let o = metrics(arch, model, &resample(test, &idx)?)?.auc;
            if let (Some(f), Some(o)) = (f, o) {
                diffs[k].push(f - o);
            }
        }
    }
    println!(
        "\npaired bootstrap of the {n} test rows ({rounds} resamples): federated AUC − method's AUC"
    );
    println!(
        "{:<10} {:>8} {:>8} {:>18} {:>14}",
        "method", "mean", "SE", "95 % interval", "P(fed ≥ it)"
    );
    for (k, (method, _, _)) in judged.iter().enumerate().skip(1) {
        let d = &mut diffs[k];
        if d.is_empty() {
            continue;
        }
        d.sort_by(f64::total_cmp);
        let len = d.len() as f64;
        let mean = d.iter().sum::<f64>() / len;
        let se = (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (len - 1.0).max(1.0)).sqrt();
        let q = |p: f64| d[((p * (len - 1.0)).round() as usize).min(d.len() - 1)];
        let ge = d.iter().filter(|&&x| x >= 0.0).count() as f64 / len;
        println!(
            "{method:<10} {mean:>+8.4} {se:>8.4} [{:>+7.4}, {:>+7.4}] {ge:>14.2}",
            q(0.025),
            q(0.975)
        );
    }
    Ok(())
}

fn resample(s: &Samples, idx: &[usize]) -> anyhow::Result<Samples> {
    let Targets::Classes(y) = s.targets() else {
        anyhow::bail!("no class labels");
    };
    let per = s.shape().len();
    let x = s.features();
    let mut xs = Vec::with_capacity(idx.len() * per);
    let mut ys = Vec::with_capacity(idx.len());
    for &i in idx {
        xs.extend_from_slice(&x[i * per..(i + 1) * per]);
        ys.push(y[i]);
    }
    Ok(Samples::new(s.shape(), xs, Targets::Classes(ys))?)
}
