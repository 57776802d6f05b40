//! `fedlink-agent`: the hospital site agent. Thin: parse arguments, load
//! `site.toml`, start tracing, run [`fedlink_agent::run`] until ctrl-c or
//! SIGTERM, map errors to exit codes (2 usage/config, 3 TLS/kit, 1 other).
//! `audit-head` exports the signed head of the site's audit log
//! ([`fedlink_agent::audit::export_head`]).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use fedlink_agent::SiteConfig;
use tracing_subscriber::EnvFilter;

/// fedlink hospital site agent: connects out to the coordinator, trains
/// locally, sends signed weight deltas. Opens no listening port.
#[derive(Debug, Parser)]
#[command(name = "fedlink-agent", version)]
struct Cli {
    /// Diagnostic log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until ctrl-c / SIGTERM (then say Bye and exit 0).
    Run {
        /// The site configuration.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check what a start checks, without connecting or writing anything:
    /// site.toml (syntax, fields, policy), the kit (site role, key file
    /// modes, update key, TLS), the device and the dataset (loaded in full).
    /// Exit 0 ok, 2 config / dataset / device, 3 kit.
    CheckConfig {
        /// The site configuration.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Verify the site's audit log with the kit's update key and write its
    /// signed head (JSON) for an auditor to keep elsewhere; works while the
    /// agent runs. Exit 0 written, 1 failed (e.g. the log does not verify).
    AuditHead {
        /// The site configuration.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Where to write the head (replaced atomically if it exists).
        #[arg(long, value_name = "HEAD.json")]
        out: PathBuf,
    },
}

fn init_tracing(format: LogFormat, file: Option<&Path>) -> anyhow::Result<()> {
    // FEDLINK_LOG, else RUST_LOG, else info (same as the coordinator).
    let filter = EnvFilter::try_from_env("FEDLINK_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match (format, file) {
        (LogFormat::Pretty, None) => builder.with_writer(std::io::stderr).try_init(),
        (LogFormat::Json, None) => builder.json().with_writer(std::io::stderr).try_init(),
        (format, Some(path)) => {
            let mut opts = std::fs::OpenOptions::new();
            opts.create(true).append(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o640);
            }
            let f = opts
                .open(path)
                .with_context(|| format!("log_file {}", path.display()))?;
            let writer = std::sync::Mutex::new(f);
            match format {
                LogFormat::Pretty => builder.with_ansi(false).with_writer(writer).try_init(),
                LogFormat::Json => builder.json().with_writer(writer).try_init(),
            }
        }
    };
    result.map_err(|e| anyhow::anyhow!("tracing: {e}"))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; ctrl-c only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown requested");
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let (Command::Run { config }
    | Command::CheckConfig { config }
    | Command::AuditHead { config, .. }) = &cli.command;
    let site = match SiteConfig::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fedlink-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::AuditHead { out, .. } = &cli.command {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        return match fedlink_agent::audit::export_head(&site, out, now) {
            Ok(head) => {
                println!(
                    "{}: head seq {} hash {} written to {}",
                    site.audit_log_path().display(),
                    head.seq,
                    head.hash,
                    out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fedlink-agent: {e}");
                ExitCode::from(1)
            }
        };
    }
    if let Command::CheckConfig { .. } = cli.command {
        return match fedlink_agent::check(&site) {
            Ok(r) => {
                println!(
                    "{}: ok\n  site {} -> coordinator {}\n  federations {:?}, architectures \
                     {:?}\n  device {}\n  dataset {}: {} training + {} validation samples \
                     (fingerprint {})",
                    config.display(),
                    r.identity,
                    r.coordinator_addr,
                    site.policy
                        .federations
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>(),
                    site.policy.architectures,
                    r.device,
                    r.dataset_kind,
                    r.train_samples,
                    r.validation_samples,
                    r.dataset_fingerprint,
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fedlink-agent: {e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    if let Err(e) = init_tracing(cli.log_format, site.log_file.as_deref()) {
        eprintln!("fedlink-agent: {e:#}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fedlink-agent: tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(fedlink_agent::run(site, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "fedlink-agent stopped");
            eprintln!("fedlink-agent: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
