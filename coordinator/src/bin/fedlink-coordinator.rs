//! `fedlink-coordinator`: the coordinator service.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fedlink_coordinator::config::CoordinatorConfig;
use fedlink_coordinator::server::{ServeError, ServeOptions, serve};

/// jemalloc instead of glibc malloc (feature `jemalloc`, on by default),
/// built to give freed pages back at once (`.cargo/config.toml`): with
/// glibc the peak RSS was ≈ 4 × the model without malloc environment
/// variables, with it ≈ 2.7 × (docs/PERFORMANCE.md).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The allocator this binary runs on, for the start-up log line.
fn allocator() -> String {
    #[cfg(feature = "jemalloc")]
    {
        match tikv_jemalloc_ctl::config::malloc_conf::read() {
            Ok(conf) if !conf.is_empty() => format!("jemalloc ({conf})"),
            Ok(_) => "jemalloc (defaults)".to_owned(),
            Err(e) => format!("jemalloc (its build options unreadable: {e})"),
        }
    }
    #[cfg(not(feature = "jemalloc"))]
    {
        "glibc malloc".to_owned()
    }
}

/// fedlink coordinator: runs federated jobs for the sites of a federation.
#[derive(Debug, Parser)]
#[command(name = "fedlink-coordinator", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the federation (QUIC + mutual TLS) and run its jobs. Without
    /// a job (none in the config, nothing unfinished in the store) it starts
    /// empty and waits for `fedlink jobs submit`.
    Serve {
        /// Path to coordinator.toml.
        #[arg(long)]
        config: PathBuf,
        /// Exit once the job has finished (completed, failed or aborted).
        /// Refused (exit 2) when there is no job to run.
        #[arg(long)]
        exit_after_job: bool,
    },
}

fn init_tracing(format: LogFormat) {
    // FEDLINK_LOG, else RUST_LOG, else info.
    let filter = tracing_subscriber::EnvFilter::try_from_env("FEDLINK_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    tracing::info!(allocator = %allocator(), "fedlink-coordinator {}", env!("CARGO_PKG_VERSION"));
    let Command::Serve {
        config,
        exit_after_job,
    } = cli.command;
    let cfg = match CoordinatorConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Each thread that allocates gets its own malloc arena (glibc) or
        // thread cache (jemalloc), which keeps some of what it freed:
        // tokio's default of up to 512 blocking threads (validation passes,
        // spool writes, store transactions) meant up to 16 glibc arenas.
        // Four keep the per-upload work parallel (uploads are limited to
        // `max_concurrent_uploads`, 4 by default) and cut glibc's peak RSS
        // by 10-20 % (docs/PERFORMANCE.md); round times were unchanged.
        .max_blocking_threads(4)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let opts = ServeOptions {
        exit_after_job,
        bound: None,
    };
    match runtime.block_on(serve(cfg, opts, shutdown_signal())) {
        Ok(out) => match out.outcome {
            Some(fedlink_coordinator::round::JobOutcome::Failed { round, reason }) => {
                eprintln!("job failed in round {round}: {reason:?}");
                ExitCode::from(4)
            }
            _ => ExitCode::SUCCESS,
        },
        Err(
            e @ (ServeError::ManifestFederation { .. }
            | ServeError::NoAuditKey { .. }
            | ServeError::Certs(_)
            | ServeError::Federation(_)
            | ServeError::Keys(_)),
        ) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
        // A bad job file or initial model, or a data_dir that cannot be
        // made private: restarting will not help.
        Err(
            e @ (ServeError::NoJob
            | ServeError::DoesNotFit(_)
            | ServeError::ModelWire(_)
            | ServeError::EngineStart(_)
            | ServeError::JobFile(_)
            | ServeError::JobRead { .. }
            | ServeError::InitialModel(_)
            | ServeError::Strategy(_)
            | ServeError::JobId(_)
            | ServeError::StoredState { .. }
            | ServeError::DataDir(_)),
        ) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(all(test, feature = "jemalloc"))]
mod tests {
    /// The options that keep the peak RSS ≤ 3 × the model are built into
    /// the allocator (`.cargo/config.toml`), not left to the environment.
    #[test]
    fn jemalloc_is_built_to_return_freed_pages_at_once() {
        let conf = tikv_jemalloc_ctl::config::malloc_conf::read().unwrap();
        assert!(conf.contains("dirty_decay_ms:0"), "{conf:?}");
        assert!(conf.contains("muzzy_decay_ms:0"), "{conf:?}");
        assert!(super::allocator().starts_with("jemalloc ("));
    }
}
