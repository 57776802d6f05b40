//! `fedlink certs`: provision the federation PKI (see `fedlink_certs` for the
//! directory layout).
//!
//! ```text
//! fedlink certs init --federation demo --out fed [--san coord.example --san 10.0.0.5]
//!                    [--coordinator-addr coord.example:4433] [--admin alice] [--days 365]
//! fedlink certs issue-site st-mary --ca fed/ca [--out fed/sites/st-mary]
//! fedlink certs issue-admin bob --ca fed/ca [--out fed/admins/bob]
//! fedlink certs renew st-mary --role site --ca fed/ca [--out fed/sites/st-mary]
//! fedlink certs revoke st-mary --ca fed/ca [--role site] [--reason "laptop stolen"]
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use fedlink_certs::time::OffsetDateTime;
use fedlink_certs::{
    CertificateAuthority, DEFAULT_CA_VALIDITY_DAYS, DEFAULT_VALIDITY_DAYS, InitOptions, IssuedKit,
    Role, Validity,
};

/// Arguments of `fedlink certs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create a federation: root CA, coordinator kit and a first admin kit.
    Init(InitArgs),
    /// Issue a site's startup kit (TLS certificate + key, ed25519 update key,
    /// CA certificate, kit.toml) and add the site to the manifest.
    IssueSite(IssueSiteArgs),
    /// Issue an admin's kit (TLS certificate + key, CA certificate, kit.toml).
    IssueAdmin(IssueArgs),
    /// Replace the certificate and TLS key of an existing kit (same identity,
    /// same CA, same update key); keeps the old pair as *.bak.
    Renew(RenewArgs),
    /// Add certificates to the revocation list (by name, serial or SHA-256
    /// fingerprint). Running coordinators apply it when they reload the list.
    Revoke(RevokeArgs),
}

#[derive(Debug, clap::Args)]
struct InitArgs {
    /// Federation name ([a-z0-9][a-z0-9._-]{0,62}).
    #[arg(long)]
    federation: String,
    /// Federation directory to create (ca/, coordinator/, admins/).
    #[arg(long)]
    out: PathBuf,
    /// DNS name or IP address of the coordinator (repeatable; default
    /// localhost and 127.0.0.1). The first DNS name is the TLS server name.
    #[arg(long = "san", value_name = "DNS_OR_IP")]
    sans: Vec<String>,
    /// Coordinator address written into kits (default <server name>:4433).
    #[arg(long, value_name = "HOST:PORT")]
    coordinator_addr: Option<String>,
    /// Name of the first admin.
    #[arg(long, default_value = "admin")]
    admin: String,
    /// Validity of the coordinator and admin certificates, in days.
    #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS)]
    days: u32,
    /// Validity of the CA certificate, in days.
    #[arg(long, default_value_t = DEFAULT_CA_VALIDITY_DAYS)]
    ca_days: u32,
}

#[derive(Debug, clap::Args)]
struct IssueSiteArgs {
    #[command(flatten)]
    kit: IssueArgs,
    /// The most training examples the site's updates may claim (the size of
    /// its training set), written to the manifest as `max_examples`; an
    /// update claiming more is rejected. Default: only the job's
    /// `strategy.max_examples_per_site` applies.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_examples: Option<u64>,
}

#[derive(Debug, clap::Args)]
struct IssueArgs {
    /// Name of the site or admin ([a-z0-9][a-z0-9._-]{0,62}).
    name: String,
    /// The CA directory (holding ca.pem and ca-key.pem).
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// Kit directory to create (must not exist or be empty; default
    /// <ca>/../sites/<name> or <ca>/../admins/<name>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Coordinator address for this kit (default: from ca/federation.toml).
    #[arg(long, value_name = "HOST:PORT")]
    coordinator_addr: Option<String>,
    /// Certificate validity, in days.
    #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS)]
    days: u32,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Site,
    Admin,
    Coordinator,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Site => Self::Site,
            RoleArg::Admin => Self::Admin,
            RoleArg::Coordinator => Self::Coordinator,
        }
    }
}

#[derive(Debug, clap::Args)]
struct RenewArgs {
    /// Name of the identity to renew (`coordinator` for the coordinator).
    name: String,
    /// Role of the identity.
    #[arg(long, value_enum)]
    role: RoleArg,
    /// The CA directory.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// The existing kit directory (default <ca>/../sites/<name>,
    /// <ca>/../admins/<name> or <ca>/../coordinator).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Validity of the new certificate, in days.
    #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS)]
    days: u32,
    /// Renew even though the current certificate is revoked (restores access).
    #[arg(long)]
    reinstate: bool,
}

#[derive(Debug, clap::Args)]
struct RevokeArgs {
    /// Name, certificate serial (hex) or SHA-256 fingerprint (hex) to revoke.
    /// A name revokes every certificate ever issued to it.
    target: String,
    /// The CA directory.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// Only revoke certificates of this role.
    #[arg(long, value_enum)]
    role: Option<RoleArg>,
    /// Reason, recorded in revoked.toml.
    #[arg(long)]
    reason: Option<String>,
}

fn default_kit_dir(ca: &Path, role: Role, name: &str) -> PathBuf {
    let federation_dir = ca.parent().unwrap_or_else(|| Path::new("."));
    match role {
        Role::Site => federation_dir.join("sites").join(name),
        Role::Admin => federation_dir.join("admins").join(name),
        _ => federation_dir.join("coordinator"),
    }
}

fn open_ca(dir: &Path) -> anyhow::Result<CertificateAuthority> {
    CertificateAuthority::open(dir).with_context(|| format!("opening the CA in {}", dir.display()))
}

fn print_kit(kit: &IssuedKit) {
    println!("  identity:     {}", kit.identity);
    println!("  kit:          {}", kit.dir.display());
    println!("  serial:       {}", kit.serial);
    println!("  sha256:       {}", kit.fingerprint);
    if let Some(pk) = &kit.update_public_key {
        println!("  update key:   {pk} (ed25519 public)");
    }
}

/// Run the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    match args.command {
        Command::Init(a) => {
            let mut opts = InitOptions::new(a.federation, a.out);
            if !a.sans.is_empty() {
                opts.server_names = a.sans;
            }
            opts.coordinator_addr = a.coordinator_addr;
            opts.admin = a.admin;
            opts.validity_days = a.days;
            opts.ca_validity_days = a.ca_days;
            let (ca, report) =
                CertificateAuthority::init(&opts, now).context("creating the federation")?;
            println!("federation {} created", ca.federation());
            println!(
                "  CA:           {} (keep ca-key.pem private; it can go offline)",
                report.ca_dir.display()
            );
            println!("  coordinator:  {}", report.coordinator_kit.display());
            println!("  admin:        {}", report.admin_kit.display());
            println!("  manifest:     {}", ca.manifest_path().display());
            println!("  revocations:  {}", ca.revoked_path().display());
            println!(
                "  server name:  {} at {}",
                ca.info().coordinator_server_name,
                ca.info().coordinator_addr
            );
        }
        Command::IssueSite(IssueSiteArgs {
            kit: a,
            max_examples,
        }) => {
            let ca = open_ca(&a.ca)?;
            let out = a
                .out
                .unwrap_or_else(|| default_kit_dir(&a.ca, Role::Site, &a.name));
            let kit = ca
                .issue_site(
                    &a.name,
                    &out,
                    Validity::days_from(now, a.days)?,
                    a.coordinator_addr.as_deref(),
                    now,
                )
                .with_context(|| format!("issuing site {}", a.name))?;
            if max_examples.is_some() {
                ca.set_site_max_examples(&a.name, max_examples)
                    .with_context(|| format!("setting max_examples of site {}", a.name))?;
            }
            println!(
                "site kit issued (added to {})",
                ca.manifest_path().display()
            );
            print_kit(&kit);
            println!(
                "Hand the kit directory to the site over a trusted channel; it holds private keys."
            );
        }
        Command::IssueAdmin(a) => {
            let ca = open_ca(&a.ca)?;
            let out = a
                .out
                .unwrap_or_else(|| default_kit_dir(&a.ca, Role::Admin, &a.name));
            let kit = ca
                .issue_admin(
                    &a.name,
                    &out,
                    Validity::days_from(now, a.days)?,
                    a.coordinator_addr.as_deref(),
                    now,
                )
                .with_context(|| format!("issuing admin {}", a.name))?;
            println!("admin kit issued");
            print_kit(&kit);
        }
        Command::Renew(a) => {
            let ca = open_ca(&a.ca)?;
            let role = Role::from(a.role);
            let out = a
                .out
                .unwrap_or_else(|| default_kit_dir(&a.ca, role, &a.name));
            let report = ca
                .renew(
                    &out,
                    &a.name,
                    role,
                    Validity::days_from(now, a.days)?,
                    a.reinstate,
                    now,
                )
                .with_context(|| format!("renewing {role} {}", a.name))?;
            println!("certificate renewed (old serial {})", report.old_serial);
            print_kit(&report.kit);
            for b in &report.backups {
                println!("  kept:         {}", b.display());
            }
        }
        Command::Revoke(a) => {
            let ca = open_ca(&a.ca)?;
            let added = ca
                .revoke(&a.target, a.role.map(Role::from), a.reason.as_deref(), now)
                .with_context(|| format!("revoking {}", a.target))?;
            if added.is_empty() {
                println!("nothing to do: every matching certificate is already revoked");
            }
            for e in &added {
                let id = e
                    .identity
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                let serial = e
                    .serial
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                println!("revoked {id} serial {serial}");
            }
            if !added.is_empty() {
                println!(
                    "Written to {}; running coordinators apply it when they reload the revocation list.",
                    ca.revoked_path().display()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        certs: Top,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Top {
        Certs(Args),
    }

    fn run_cli(args: &[&str]) -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(std::iter::once("fedlink").chain(args.iter().copied()))?;
        let Top::Certs(args) = cli.certs;
        run(args)
    }

    #[test]
    fn full_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let fed = dir.path().join("fed");
        let fed_s = fed.to_str().unwrap();
        let ca = fed.join("ca");
        let ca_s = ca.to_str().unwrap();
        run_cli(&[
            "certs",
            "init",
            "--federation",
            "demo",
            "--out",
            fed_s,
            "--san",
            "coord.example",
            "--san",
            "10.0.0.5",
            "--coordinator-addr",
            "coord.example:7000",
            "--admin",
            "alice",
            "--days",
            "30",
        ])
        .unwrap();
        assert!(fed.join("admins/alice/kit.toml").is_file());
        run_cli(&["certs", "issue-site", "st-mary", "--ca", ca_s]).unwrap();
        let kit = fedlink_certs::Kit::load(fed.join("sites/st-mary")).unwrap();
        assert_eq!(kit.coordinator_addr(), "coord.example:7000");
        assert_eq!(kit.coordinator_server_name(), "coord.example");
        // Issuing again is refused, nothing is overwritten.
        assert!(run_cli(&["certs", "issue-site", "st-mary", "--ca", ca_s]).is_err());
        run_cli(&["certs", "issue-admin", "bob", "--ca", ca_s]).unwrap();
        run_cli(&["certs", "renew", "st-mary", "--role", "site", "--ca", ca_s]).unwrap();
        let renewed = fedlink_certs::Kit::load(fed.join("sites/st-mary")).unwrap();
        assert_ne!(renewed.cert_info().serial, kit.cert_info().serial);
        run_cli(&[
            "certs",
            "renew",
            "coordinator",
            "--role",
            "coordinator",
            "--ca",
            ca_s,
        ])
        .unwrap();
        run_cli(&["certs", "revoke", "bob", "--ca", ca_s, "--reason", "left"]).unwrap();
        let revoked = fedlink_certs::RevokedFile::load(&ca.join("revoked.toml")).unwrap();
        assert_eq!(revoked.revoked.len(), 1);
        assert!(run_cli(&["certs", "revoke", "nobody", "--ca", ca_s]).is_err());
        assert!(run_cli(&["certs", "init", "--federation", "Bad Name", "--out", "x"]).is_err());
    }
}
