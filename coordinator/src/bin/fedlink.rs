//! `fedlink`: the fedlink admin CLI.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use fedlink_coordinator::cli;

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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs(args) => cli::certs::run(args),
        Command::Aggregate(args) => cli::aggregate::run(args),
        Command::Audit(args) => return cli::audit::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(1)
        }
    }
}
