//! `fedlink status | sites | jobs | rounds | models`: the admin API of a
//! running coordinator, over QUIC (or TLS 1.3 over TCP with `--transport tcp`) with mutual TLS and an admin kit.
//!
//! ```text
//! fedlink status --kit admin-kit/
//! fedlink sites approve --cert st-mary/cert.pem --update-key st-mary/update-key.pub.pem
//! fedlink sites revoke st-mary --reason "laptop stolen"
//! fedlink jobs submit job.toml
//! fedlink rounds show demo 3 --json
//! fedlink models export 9b1c… --format safetensors --out model.safetensors
//! ```
//!
//! Every command takes `--kit ADMIN_KIT_DIR` (or `FEDLINK_KIT`), optionally
//! `--coordinator host:port` (default: the address in the kit) and `--json`
//! (the answer as JSON on stdout, stable field names; tables otherwise).
//!
//! # Exit codes
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | other error (local files, coordinator internal error) |
//! | 2 | usage error |
//! | 3 | the coordinator refused the command (refused, not found, invalid) |
//! | 4 | the coordinator could not be reached (network, TLS) |

pub mod client;
pub mod export;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use fedlink_protocol::admin::{AdminRequest, AdminResponse, ExportFormat};
use fedlink_transport::TransportKind;

use client::{AdminClient, ClientError};

/// Options every admin command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Admin kit directory.
    #[arg(long, env = "FEDLINK_KIT", value_name = "ADMIN_KIT_DIR", global = true)]
    kit: Option<PathBuf>,
    /// Coordinator address (default: the one in the kit).
    #[arg(long, value_name = "HOST:PORT", global = true)]
    coordinator: Option<String>,
    /// Print the answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Transport to the coordinator: `quic` (UDP), or `tcp` (TLS 1.3 over
    /// TCP to the same port number, for networks that block UDP).
    #[arg(long, value_name = "quic|tcp", default_value = "quic", value_parser = parse_transport, global = true)]
    transport: TransportKind,
}

fn parse_transport(s: &str) -> Result<TransportKind, String> {
    match s {
        "quic" => Ok(TransportKind::Quic),
        "tcp" => Ok(TransportKind::Tcp),
        other => Err(format!("{other:?}: expected quic or tcp")),
    }
}

/// `fedlink status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    common: Common,
}

/// `fedlink sites`.
#[derive(Debug, clap::Args)]
pub struct SitesArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: SitesCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SitesCommand {
    /// Registered sites.
    List,
    /// One site.
    Show {
        /// Site name.
        name: String,
    },
    /// Register a site whose certificate the federation CA issued.
    Approve {
        /// The site's certificate (PEM).
        #[arg(long, value_name = "CERT.pem")]
        cert: PathBuf,
        /// The site's ed25519 update public key (SPKI PEM, or hex).
        #[arg(long, value_name = "KEY.pub")]
        update_key: PathBuf,
        /// The most training examples its updates may claim (the size of
        /// its training set); an update claiming more is rejected. Default:
        /// only the job's `strategy.max_examples_per_site` applies.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        max_examples: Option<u64>,
    },
    /// Revoke a site: its certificate and update key are refused from now on.
    Revoke {
        /// Site name.
        name: String,
        /// Why (recorded).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Replace a site's certificate (e.g. after `fedlink certs renew`).
    Rotate {
        /// Site name.
        name: String,
        /// The new certificate (PEM).
        #[arg(long, value_name = "NEW.pem")]
        cert: PathBuf,
        /// A new update public key (SPKI PEM, or hex).
        #[arg(long, value_name = "KEY.pub")]
        update_key: Option<PathBuf>,
    },
}

/// `fedlink jobs`.
#[derive(Debug, clap::Args)]
pub struct JobsArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: JobsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum JobsCommand {
    /// Queue a job (it starts when the running job has finished).
    Submit {
        /// Job file.
        #[arg(value_name = "FILE.toml")]
        file: PathBuf,
    },
    /// Every job.
    List,
    /// One job, with its job file.
    Show {
        /// Job id.
        id: String,
    },
    /// Start no new round until resumed.
    Pause {
        /// Job id.
        id: String,
    },
    /// Lift a pause.
    Resume {
        /// Job id.
        id: String,
    },
    /// End a job (the round in flight is cancelled).
    Abort {
        /// Job id.
        id: String,
    },
}

/// `fedlink rounds`.
#[derive(Debug, clap::Args)]
pub struct RoundsArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: RoundsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum RoundsCommand {
    /// The rounds of a job.
    List {
        /// Job id.
        job: String,
    },
    /// One round.
    Show {
        /// Job id.
        job: String,
        /// Round number.
        round: u64,
    },
}

/// `fedlink models`.
#[derive(Debug, clap::Args)]
pub struct ModelsArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: ModelsCommand,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Safetensors,
}

#[derive(Debug, clap::Subcommand)]
enum ModelsCommand {
    /// Stored model versions.
    List,
    /// One model version.
    Show {
        /// Model hash (hex).
        hash: String,
        /// The rounds back to the initial model, with the sites' signed updates.
        #[arg(long)]
        provenance: bool,
    },
    /// Download a model version and write it for PyTorch.
    Export {
        /// Model hash (hex).
        hash: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "safetensors")]
        format: FormatArg,
        /// Output file (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

fn read_text(path: &std::path::Path) -> Result<String, ClientError> {
    Ok(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)
}

fn finish(common: &Common, result: Result<(), ClientError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if common.json
                && let ClientError::Coordinator { code, message } = &e
            {
                println!(
                    "{}",
                    serde_json::json!({"error": {"code": code, "message": message}})
                );
            }
            eprintln!("error: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run_with(
    common: &Common,
    f: impl AsyncFnOnce(&AdminClient) -> Result<(), ClientError>,
) -> ExitCode {
    let Some(kit) = common.kit.clone() else {
        eprintln!("error: no admin kit: pass --kit ADMIN_KIT_DIR or set FEDLINK_KIT");
        return ExitCode::from(2);
    };
    let result = (|| -> Result<(), ClientError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        rt.block_on(async {
            let client =
                AdminClient::connect(&kit, common.coordinator.as_deref(), common.transport).await?;
            let r = f(&client).await;
            client.close().await;
            r
        })
    })();
    finish(common, result)
}

fn show(common: &Common, resp: &AdminResponse) -> Result<(), ClientError> {
    if common.json {
        println!("{}", render::json(resp).map_err(anyhow::Error::from)?);
    } else {
        print!("{}", render::text(resp));
    }
    Ok(())
}

async fn simple(
    client: &AdminClient,
    common: &Common,
    req: AdminRequest,
) -> Result<(), ClientError> {
    let resp = client.request(&req).await?;
    show(common, &resp)
}

/// Run `fedlink status`.
pub fn run_status(args: StatusArgs) -> ExitCode {
    let common = args.common;
    run_with(&common, async |c| {
        simple(c, &common, AdminRequest::Status).await
    })
}

/// Run `fedlink sites …`.
pub fn run_sites(args: SitesArgs) -> ExitCode {
    let common = args.common;
    let req = match args.command {
        SitesCommand::List => Ok(AdminRequest::SitesList),
        SitesCommand::Show { name } => Ok(AdminRequest::SitesShow { name }),
        SitesCommand::Approve {
            cert,
            update_key,
            max_examples,
        } => read_text(&cert).and_then(|cert_pem| {
            Ok(AdminRequest::SitesApprove {
                cert_pem,
                update_key: read_text(&update_key)?,
                max_examples,
            })
        }),
        SitesCommand::Revoke { name, reason } => Ok(AdminRequest::SitesRevoke { name, reason }),
        SitesCommand::Rotate {
            name,
            cert,
            update_key,
        } => read_text(&cert).and_then(|cert_pem| {
            Ok(AdminRequest::SitesRotate {
                name,
                cert_pem,
                update_key: update_key.as_deref().map(read_text).transpose()?,
            })
        }),
    };
    match req {
        Ok(req) => run_with(&common, async |c| simple(c, &common, req).await),
        Err(e) => finish(&common, Err(e)),
    }
}

/// Run `fedlink jobs …`.
pub fn run_jobs(args: JobsArgs) -> ExitCode {
    let common = args.common;
    let req = match args.command {
        JobsCommand::Submit { file } => {
            read_text(&file).map(|job_toml| AdminRequest::JobsSubmit { job_toml })
        }
        JobsCommand::List => Ok(AdminRequest::JobsList),
        JobsCommand::Show { id } => Ok(AdminRequest::JobsShow { id }),
        JobsCommand::Pause { id } => Ok(AdminRequest::JobsPause { id }),
        JobsCommand::Resume { id } => Ok(AdminRequest::JobsResume { id }),
        JobsCommand::Abort { id } => Ok(AdminRequest::JobsAbort { id }),
    };
    match req {
        Ok(req) => run_with(&common, async |c| simple(c, &common, req).await),
        Err(e) => finish(&common, Err(e)),
    }
}

/// Run `fedlink rounds …`.
pub fn run_rounds(args: RoundsArgs) -> ExitCode {
    let common = args.common;
    let req = match args.command {
        RoundsCommand::List { job } => AdminRequest::RoundsList { job },
        RoundsCommand::Show { job, round } => AdminRequest::RoundsShow {
            job,
            round: fedlink_protocol::RoundId(round),
        },
    };
    run_with(&common, async |c| simple(c, &common, req).await)
}

/// Run `fedlink models …`.
pub fn run_models(args: ModelsArgs) -> ExitCode {
    let common = args.common;
    match args.command {
        ModelsCommand::List => run_with(&common, async |c| {
            simple(c, &common, AdminRequest::ModelsList).await
        }),
        ModelsCommand::Show { hash, provenance } => run_with(&common, async |c| {
            simple(c, &common, AdminRequest::ModelsShow { hash, provenance }).await
        }),
        ModelsCommand::Export { hash, format, out } => run_with(&common, async |c| {
            let format = match format {
                FormatArg::Safetensors => ExportFormat::Safetensors,
            };
            let (resp, mut recv) = c
                .request_stream(&AdminRequest::ModelsExport { hash, format })
                .await?;
            let AdminResponse::Export(header) = resp else {
                return Err(anyhow::anyhow!("expected an export header").into());
            };
            let bytes = export::receive(&header, &mut recv, &out).await?;
            if common.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "model": header.model.to_hex(),
                        "job": header.job,
                        "round": header.round,
                        "format": "safetensors",
                        "out": out.display().to_string(),
                        "bytes": bytes,
                        "tensors": header.tensors,
                    })
                );
            } else {
                println!(
                    "exported {} (job {}, round {}) to {}: {} tensors, {bytes} bytes of values",
                    header.model,
                    header.job,
                    header.round,
                    out.display(),
                    header.tensors.len()
                );
            }
            Ok(())
        }),
    }
}
