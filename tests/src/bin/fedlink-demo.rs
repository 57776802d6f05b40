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
    /// parameters, 64×64 tiles) instead of the small default one; takes
    /// much longer on a CPU.
    #[arg(long)]
    full: bool,
    /// Override every task's delta codec: `f32`, `f16`, `bf16`, `int8` or
    /// `topk:<fraction>` (e.g. `topk:0.01`).
    #[arg(long)]
    codec: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut tasks = fedlink_tests::demo::tasks();
    if args.full {
        for t in &mut tasks {
            if t.name == "nuclei" {
                *t = fedlink_tests::demo::nuclei_task(true);
            }
        }
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
    if let Some(codec) = args.codec {
        // One string for the whole run: leaking it gives the tasks' `&'static str`.
        let codec: &'static str = Box::leak(codec.into_boxed_str());
        for t in &mut tasks {
            t.codec = codec;
        }
    }
    match fedlink_tests::demo::run_tasks(tasks, &args.data, args.keep) {
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
