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
}

fn main() -> ExitCode {
    let args = Args::parse();
    match fedlink_tests::demo::main_demo(&args.data, args.keep) {
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
