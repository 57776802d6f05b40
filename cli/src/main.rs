//! `fedlink`: the fedlink admin CLI.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use fedlink_cli as cli;

/// fedlink admin CLI: provisioning, offline aggregation, federation admin.
#[derive(Debug, Parser)]
#[command(name = "fedlink", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Provision the federation PKI: CA, coordinator, site and admin kits.
    Certs(cli::certs::Args),
    /// Run an aggregation strategy offline over deltas stored as safetensors.
    Aggregate(cli::aggregate::Args),
    /// Review audit logs: verify the chain and signatures, show entries.
    Audit(cli::audit::Args),
    /// A running coordinator: federation, job and round progress, queue.
    Status(cli::admin::StatusArgs),
    /// Site registry of a running coordinator: list, show, approve, revoke, rotate.
    Sites(cli::admin::SitesArgs),
    /// Jobs of a running coordinator: submit, list, show, pause, resume, abort.
    Jobs(cli::admin::JobsArgs),
    /// Rounds of a job: list, show.
    Rounds(cli::admin::RoundsArgs),
    /// Model versions: list, show (with provenance), export for PyTorch.
    Models(cli::admin::ModelsArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Diagnostics on stderr only when asked for (`FEDLINK_LOG` or
    // `RUST_LOG`, e.g. `FEDLINK_LOG=debug`): stdout stays the command's.
    let filter = tracing_subscriber::EnvFilter::try_from_env("FEDLINK_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Certs(args) => cli::certs::run(args),
        Command::Aggregate(args) => cli::aggregate::run(args),
        Command::Audit(args) => return cli::audit::run(args),
        Command::Status(args) => return cli::admin::run_status(args),
        Command::Sites(args) => return cli::admin::run_sites(args),
        Command::Jobs(args) => return cli::admin::run_jobs(args),
        Command::Rounds(args) => return cli::admin::run_rounds(args),
        Command::Models(args) => return cli::admin::run_models(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(1)
        }
    }
}
