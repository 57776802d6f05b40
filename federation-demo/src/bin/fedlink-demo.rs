//! `fedlink-demo`: the full local federation demo (run it with `./demo`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Run a local federation on the real hospital datasets under `data/`.
#[derive(Debug, Parser)]
#[command(name = "fedlink-demo", version, about)]
struct Args {
    /// The repository's data directory.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../data"))]
    data: PathBuf,
    /// Keep the work directory (kits, configs, logs, models) afterwards.
    #[arg(long)]
    keep: bool,
    /// Run only these tasks (`wdbc`, `opt`, `nuclei`; repeatable).
    /// Default: all.
    #[arg(long = "only")]
    only: Vec<String>,
    /// Train the nuclei task's full-size U-Net (base 20, depth 5: 12.2M
    /// parameters, 64×64 tiles, 15 rounds) instead of the small default
    /// one; takes much longer on a CPU (use a release build: about half
    /// an hour on 2 cores).
    #[arg(long)]
    full: bool,
    /// Override every task's number of rounds (the baselines then train as
    /// many epochs as the federation's sites do in all), e.g. a longer
    /// `--full` run.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: Option<u32>,
    /// Override the local epochs per round of every task without
    /// validation-chosen settings (WDBC, nuclei; their baselines then train
    /// as many epochs as the federation's sites do in all); OPT keeps the
    /// epochs `fedlink-opt-sweep` chose for each method.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    epochs: Option<u32>,
    /// Override the learning rate (the sites' and the baselines') of every
    /// task without validation-chosen settings (WDBC, nuclei); OPT keeps
    /// the learning rates `fedlink-opt-sweep` chose for each method.
    #[arg(long, value_parser = positive_finite)]
    lr: Option<f64>,
    /// Override the server strategy of every task without validation-chosen
    /// settings (WDBC, nuclei): `fedavg`, `fedadam:<eta>` or
    /// `fedavgm:<server lr>:<server momentum>`. OPT keeps the strategy
    /// `fedlink-opt-sweep` chose together with its optimizer and learning
    /// rates.
    #[arg(long)]
    server: Option<fedlink_demo::tabular_choice::Server>,
    /// Run the federations alone, without the central and local-only
    /// baselines (e.g. to compare settings on the sites' validation data
    /// in the federated evaluation; the summary then has no baselines).
    #[arg(long)]
    skip_baselines: bool,
    /// Override every task's delta codec: `f32`, `f16`, `bf16`, `int8` or
    /// `topk:<fraction>` (e.g. `topk:0.01`).
    #[arg(long)]
    codec: Option<String>,
    /// Sites download the whole model every round, not the round's global
    /// update encoded with the codec (`[encoding] downlink = "model"`): to
    /// compare the accuracy of the two.
    #[arg(long)]
    full_model_downloads: bool,
}

/// `--lr`'s value: a finite number > 0.
fn positive_finite(s: &str) -> Result<f64, String> {
    let x: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(format!("{x} is not a finite number > 0"))
    }
}

/// On Ctrl-C or SIGTERM: stop the coordinator and agents the demo started
/// (a signal ends the process without running destructors), then exit 130.
fn stop_children_on_signal() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let terminated = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = terminated => {}
            }
        });
        eprintln!("\ninterrupted: stopping the demo's coordinator and agents");
        fedlink_demo::kill_children();
        std::process::exit(130);
    });
}

fn main() -> ExitCode {
    stop_children_on_signal();
    let args = Args::parse();
    let mut tasks = fedlink_demo::tasks();
    if args.full {
        for t in &mut tasks {
            if t.name == "nuclei" {
                *t = fedlink_demo::nuclei_task(true);
            }
        }
    }
    if let Some(rounds) = args.rounds {
        for t in &mut tasks {
            t.rounds = rounds;
        }
    }
    let kept =
        fedlink_demo::override_unchosen(&mut tasks, args.epochs, args.lr, args.server.as_ref());
    for t in &mut tasks {
        t.baselines = !args.skip_baselines;
    }
    if !args.only.is_empty() {
        tasks.retain(|t| args.only.iter().any(|o| o == t.name));
        if tasks.is_empty() {
            eprintln!(
                "error: no task named {:?} (tasks: wdbc, opt, nuclei)",
                args.only
            );
            return ExitCode::from(2);
        }
    }
    if args.epochs.is_some() || args.lr.is_some() || args.server.is_some() {
        for name in kept.iter().filter(|n| tasks.iter().any(|t| t.name == **n)) {
            eprintln!(
                "note: --epochs, --lr and --server do not apply to {name}: it keeps its validation-chosen settings"
            );
        }
    }
    if let Some(codec) = args.codec {
        // One string for the whole run: leaking it gives the tasks' `&'static str`.
        let codec: &'static str = Box::leak(codec.into_boxed_str());
        for t in &mut tasks {
            t.codec = codec;
        }
    }
    for t in &mut tasks {
        t.full_model_downloads = args.full_model_downloads;
    }
    match fedlink_demo::run_tasks(tasks, &args.data, args.keep) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\ndemo FAILED: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Args;
    use clap::Parser;

    /// A zero or non-positive override is refused by the parser, naming
    /// the flag; valid ones parse.
    #[test]
    fn overrides_are_checked_and_named() {
        for (flag, value) in [
            ("--rounds", "0"),
            ("--epochs", "0"),
            ("--lr", "0"),
            ("--lr", "-0.1"),
            ("--lr", "inf"),
            ("--lr", "NaN"),
        ] {
            let arg = format!("{flag}={value}");
            let err = Args::try_parse_from(["fedlink-demo", arg.as_str()])
                .expect_err(&format!("{arg} accepted"));
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{arg}");
            assert!(err.to_string().contains(flag), "{arg}: {err}");
        }
        let args = Args::try_parse_from([
            "fedlink-demo",
            "--rounds",
            "1",
            "--epochs",
            "3",
            "--lr",
            "0.5",
        ])
        .unwrap();
        assert_eq!(
            (args.rounds, args.epochs, args.lr),
            (Some(1), Some(3), Some(0.5))
        );
    }
}
