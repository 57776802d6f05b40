//! `fedlink audit`: review audit logs written by the coordinator or a site
//! agent (see `fedlink_audit` for the format and the threat model).
//!
//! ```text
//! fedlink audit verify audit.000001.jsonl audit.jsonl --key update-key.pub.pem [--head head.json] [--json]
//! fedlink audit verify audit.jsonl --rotated --key 3b6a27bc…(64 hex)
//! fedlink audit show audit.jsonl --rotated --since 2025-01-01T00:00:00Z --site st-mary --event update.
//! ```
//!
//! Files are read in the order given (oldest rotated file first); with
//! `--rotated`, each LOG also brings its rotated files (`LOG.NNNNNN.ext`)
//! before it.
//!
//! # Exit codes of `verify`
//!
//! | code | meaning |
//! |---|---|
//! | 0 | valid: chain intact, every signature checked with `--key` (and the `--head` matched, if given) |
//! | 1 | could not check: unreadable log, key or head file |
//! | 2 | usage error |
//! | 3 | **invalid**: the first bad entry is named (file:line, seq, what is wrong) |
//! | 4 | chain intact but **signatures not checked** (no `--key`): proves nothing about who wrote the log |
//!
//! `show` exits 0, 1 (unreadable), 2 (usage) or 3 (a line that is not a
//! well-formed entry; the entries before it are shown). `show` does not
//! verify signatures or the chain: run `verify` for that.
//!
//! # `reconcile`: a site's log against the coordinator's
//!
//! ```text
//! fedlink audit reconcile --site site/audit.jsonl [--site-rotated] --site-key update-key.pub.pem \
//!     --coordinator data/audit/audit.jsonl [--coordinator-rotated] [--coordinator-key KEY] [--json]
//! ```
//!
//! Verifies both logs (chain and every signature; the coordinator's only
//! by chain without `--coordinator-key`), then compares them: every update
//! the site sent was received by the coordinator with the same payload hash,
//! bytes and example count; every update the coordinator accepted or
//! aggregated in the site's name was sent by the site; neither log ends
//! before (or differs at) a signed head the other side recorded. See
//! `fedlink_audit::reconcile` for the exact list of differences. Exit codes: 0
//! consistent, 1 could not check (unreadable log or key, a log that does not
//! verify: the bad entry is named), 2 usage, 3 differences found (each with
//! job, round, nonce, both payload hashes and the entries in both logs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use fedlink_audit::ed25519_dalek::VerifyingKey;
use fedlink_audit::{
    EntryReader, FailureKind, Filter, Verifier, VerifyFailure, VerifyReport, format_time,
    load_verifying_key, parse_time, parse_verifying_key, read_head, segments,
};

/// Exit code: the log is valid (signatures checked).
pub const EXIT_VALID: u8 = 0;
/// Exit code: the check could not be run (I/O, bad key or head file).
pub const EXIT_ERROR: u8 = 1;
/// Exit code: the log is invalid; the first bad entry was named.
pub const EXIT_INVALID: u8 = 3;
/// Exit code: the chain is intact but signatures were not checked (no `--key`).
pub const EXIT_UNSIGNED: u8 = 4;
/// Exit code of `reconcile`: the two logs disagree (differences listed).
pub const EXIT_DIFFERENCES: u8 = 3;

mod reconcile;

/// Arguments of `fedlink audit`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Check the chain and every signature; name the first bad entry.
    ///
    /// Exit codes: 0 valid, 1 could not check, 2 usage, 3 invalid,
    /// 4 chain intact but signatures not checked (no --key).
    Verify(VerifyArgs),
    /// Show entries, filtered, as a table or JSON Lines (does not verify).
    Show(ShowArgs),
    /// Recompute a completed round from its archive and check that it
    /// reproduces the recorded model bit for bit.
    ///
    /// Exit codes: 0 reproduced, 1 could not check, 2 usage, 3 mismatch.
    Replay(super::replay::ReplayArgs),
    /// Compare a site's audit log with the coordinator's: updates sent vs
    /// received (same nonce, payload hash, bytes), updates accepted or
    /// aggregated in the site's name, and the signed heads each side holds.
    ///
    /// Exit codes: 0 consistent, 1 could not check, 2 usage, 3 differences.
    Reconcile(ReconcileArgs),
}

#[derive(Debug, clap::Args)]
struct ReconcileArgs {
    /// The site's audit log (the agent's <data_dir>/audit.jsonl).
    #[arg(long, value_name = "SITE.log")]
    site: PathBuf,
    /// Also read the site log's rotated files, oldest first, before it.
    #[arg(long)]
    site_rotated: bool,
    /// The site's update public key (the kit's update-key.pub.pem, or 64
    /// hex digits): every site entry and the site heads the coordinator
    /// recorded must verify with it.
    #[arg(long, value_name = "PUBKEY.pem|HEX")]
    site_key: String,
    /// The coordinator's audit log (<data_dir>/audit/audit.jsonl).
    #[arg(long, value_name = "COORD.log")]
    coordinator: PathBuf,
    /// Also read the coordinator log's rotated files before it.
    #[arg(long)]
    coordinator_rotated: bool,
    /// The coordinator's audit public key. Without it the coordinator log
    /// is checked as a chain only and its heads recorded by the site are
    /// not verified (reported as a note).
    #[arg(long, value_name = "PUBKEY.pem|HEX", conflicts_with = "ca")]
    coordinator_key: Option<String>,
    /// The federation's CA directory: the coordinator's audit key is read
    /// from its `coordinator-audit-key.pub.pem` (recorded when the
    /// coordinator kit was issued), not from next to the log.
    #[arg(long, value_name = "CA_DIR")]
    ca: Option<PathBuf>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct Files {
    /// Log files in chain order: oldest rotated file first, current file last.
    #[arg(required = true, value_name = "LOG")]
    logs: Vec<PathBuf>,
    /// Also read each LOG's rotated files (LOG.NNNNNN.ext), oldest first, before it.
    #[arg(long)]
    rotated: bool,
}

impl Files {
    fn paths(&self) -> anyhow::Result<Vec<PathBuf>> {
        if !self.rotated {
            return Ok(self.logs.clone());
        }
        let mut out = Vec::new();
        for log in &self.logs {
            let segs = segments(log)
                .with_context(|| format!("listing the rotated files of {}", log.display()))?;
            if segs.is_empty() {
                bail!("{}: no such log (and no rotated files)", log.display());
            }
            out.extend(segs);
        }
        Ok(out)
    }
}

#[derive(Debug, clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    files: Files,
    /// The writer's ed25519 public key: an SPKI PEM file (e.g. a site kit's
    /// update-key.pub.pem) or 64 hex digits. Without it, signatures are not
    /// checked and the exit code is 4.
    #[arg(long, value_name = "PUBKEY.pem|HEX", conflicts_with = "ca")]
    key: Option<String>,
    /// Verify a coordinator log with the audit key the federation's CA
    /// directory recorded when the coordinator kit was issued
    /// (`CA_DIR/coordinator-audit-key.pub.pem`). Prefer it to the copy the
    /// coordinator exports next to its log: whoever can rewrite the log
    /// there can replace that copy too.
    #[arg(long, value_name = "CA_DIR")]
    ca: Option<PathBuf>,
    /// A signed head exported earlier (kept elsewhere): the log must contain
    /// that entry, which detects a truncated tail.
    #[arg(long, value_name = "HEAD.json")]
    head: Option<PathBuf>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct ShowArgs {
    #[command(flatten)]
    files: Files,
    /// Entries at or after this time: unix milliseconds or RFC 3339
    /// (2025-01-31T12:00:00Z).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Entries at or before this time: unix milliseconds or RFC 3339.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Entries by or about this site: actor or details.site equal to it, or
    /// a fedlink://<federation>/site/<SITE> identity.
    #[arg(long)]
    site: Option<String>,
    /// Entries whose details.round is N.
    #[arg(long, value_name = "N")]
    round: Option<u64>,
    /// Entries whose event type starts with this (e.g. `update.`).
    #[arg(long, value_name = "PREFIX")]
    event: Option<String>,
    /// Entries whose actor is exactly this identity.
    #[arg(long)]
    actor: Option<String>,
    /// Print matching entries as JSON Lines.
    #[arg(long)]
    json: bool,
}

/// Run `fedlink audit`; returns the process exit code (see the module docs).
pub fn run(args: Args) -> ExitCode {
    let result = match args.command {
        Command::Verify(a) => run_verify(&a),
        Command::Show(a) => run_show(&a),
        Command::Replay(a) => return super::replay::run(&a),
        Command::Reconcile(a) => run_reconcile(&a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The coordinator's audit key as the CA directory recorded it.
fn ca_coordinator_key(ca: &Path) -> anyhow::Result<VerifyingKey> {
    let path = ca.join(fedlink_certs::COORDINATOR_AUDIT_KEY_FILE);
    load_verifying_key(&path).with_context(|| {
        format!(
            "reading the coordinator's audit key from the CA directory ({}); kits issued \
             before this file existed: copy the coordinator kit's update-key.pub.pem there",
            path.display()
        )
    })
}

fn resolve_key(arg: &str) -> anyhow::Result<VerifyingKey> {
    resolve_key_flag(arg, "--key")
}

fn resolve_key_flag(arg: &str, flag: &str) -> anyhow::Result<VerifyingKey> {
    let path = Path::new(arg);
    if path.exists() {
        return load_verifying_key(path).with_context(|| format!("reading {flag}"));
    }
    parse_verifying_key(arg).with_context(|| {
        format!("{flag} {arg:?}: no such file, and not 64 hex digits of an ed25519 public key")
    })
}

/// The files of one log (its rotated files first with `rotated`).
fn log_files(log: &Path, rotated: bool) -> anyhow::Result<Vec<PathBuf>> {
    Files {
        logs: vec![log.to_path_buf()],
        rotated,
    }
    .paths()
}

/// Verify one log and read its entries; `what` names it in errors.
fn verified_entries(
    what: &str,
    files: &[PathBuf],
    key: Option<&VerifyingKey>,
) -> anyhow::Result<Vec<fedlink_audit::LocatedEntry>> {
    let mut verifier = Verifier::new();
    if let Some(key) = key {
        verifier = verifier.key(*key);
    }
    verifier
        .verify(files)
        .map_err(|f| anyhow!("the {what} log does not verify: {f}"))?;
    EntryReader::new(files)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|f| anyhow!("reading the {what} log: {f}"))
}

fn run_reconcile(args: &ReconcileArgs) -> anyhow::Result<u8> {
    let site_key = resolve_key_flag(&args.site_key, "--site-key")?;
    let coordinator_key = match &args.ca {
        Some(ca) => Some(ca_coordinator_key(ca)?),
        None => args
            .coordinator_key
            .as_deref()
            .map(|k| resolve_key_flag(k, "--coordinator-key"))
            .transpose()?,
    };
    let site_files = log_files(&args.site, args.site_rotated)?;
    let coord_files = log_files(&args.coordinator, args.coordinator_rotated)?;
    let site = verified_entries("site", &site_files, Some(&site_key))?;
    let coordinator = verified_entries("coordinator", &coord_files, coordinator_key.as_ref())?;
    let name = reconcile::site_name(&site).map_err(|e| anyhow!("{}: {e}", args.site.display()))?;
    let mut report = reconcile::reconcile(
        &name,
        &site,
        &coordinator,
        &site_key,
        coordinator_key.as_ref(),
    );
    if coordinator_key.is_none() {
        report.notes.insert(
            0,
            "coordinator log checked as a chain only (no --coordinator-key): its signatures \
             were not verified"
                .to_owned(),
        );
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = serde_json::json!({
            "consistent": report.consistent(),
            "site": report.site,
            "counts": report.counts,
            "differences": report.differences,
            "notes": report.notes,
        });
        writeln!(out, "{value}")?;
    } else {
        let c = &report.counts;
        if report.consistent() {
            writeln!(
                out,
                "CONSISTENT: site {}: {} update(s) sent, {} received identically by the \
                 coordinator; {} attributed to the site on the coordinator, {} aggregation \
                 input(s), {} round outcome(s) the site was told; heads checked: {} of the \
                 site, {} of the coordinator ({} site entries, {} coordinator entries)",
                printable(&report.site),
                c.updates_sent,
                c.updates_matched,
                c.updates_received,
                c.aggregated_inputs,
                c.round_outcomes,
                c.site_heads,
                c.coordinator_heads,
                c.site_entries,
                c.coordinator_entries
            )?;
        } else {
            writeln!(
                out,
                "DIFFERENCES: site {}: {} difference(s)",
                printable(&report.site),
                report.differences.len()
            )?;
            for f in &report.differences {
                writeln!(out, "{}", printable_multiline(&f.to_string()))?;
            }
        }
        for n in &report.notes {
            writeln!(out, "note: {}", printable(n))?;
        }
    }
    Ok(if report.consistent() {
        EXIT_VALID
    } else {
        EXIT_DIFFERENCES
    })
}

fn run_verify(args: &VerifyArgs) -> anyhow::Result<u8> {
    let files = args.files.paths()?;
    let key = match &args.ca {
        Some(ca) => Some(ca_coordinator_key(ca)?),
        None => args.key.as_deref().map(resolve_key).transpose()?,
    };
    let head = args
        .head
        .as_deref()
        .map(|p| read_head(p).context("reading --head"))
        .transpose()?;
    let mut verifier = Verifier::new();
    if let Some(key) = key {
        verifier = verifier.key(key);
    }
    if let Some(head) = head {
        verifier = verifier.head(head);
    }
    let result = verifier.verify(&files);
    if let Err(f) = &result
        && matches!(*f.kind, FailureKind::Io(_))
    {
        bail!("{f}");
    }
    let code = match &result {
        Ok(r) if r.signatures_checked => EXIT_VALID,
        Ok(_) => EXIT_UNSIGNED,
        Err(_) => EXIT_INVALID,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = verify_json(&result, key.as_ref());
        writeln!(out, "{value}")?;
    } else {
        match &result {
            Ok(r) => print_report(&mut out, r, key.as_ref())?,
            Err(f) => writeln!(out, "INVALID: {f}")?,
        }
    }
    Ok(code)
}

fn print_report(
    out: &mut impl Write,
    r: &VerifyReport,
    key: Option<&VerifyingKey>,
) -> std::io::Result<()> {
    let range = match r.last {
        Some(last) => {
            let first = r
                .files
                .iter()
                .find_map(|f| f.seq_range)
                .map_or(last.seq, |(first, _)| first);
            format!("{} entries (seq {first}..={})", r.entries, last.seq)
        }
        None => "0 entries".to_owned(),
    };
    match key {
        Some(key) => writeln!(
            out,
            "VALID: {range} in {} file(s); chain intact; every signature checked with key {}",
            r.files.len(),
            hex::encode(key.as_bytes())
        )?,
        None => writeln!(
            out,
            "CHAIN ONLY: {range} in {} file(s); chain intact; signatures NOT checked (no --key): \
             this does not show who wrote the log",
            r.files.len()
        )?,
    }
    if let Some(last) = r.last {
        writeln!(out, "last entry: seq {} hash {}", last.seq, last.hash)?;
    }
    if let Some(seq) = r.head_matched {
        let signed = if r.head_signature_checked {
            "signature checked"
        } else {
            "head signature NOT checked"
        };
        writeln!(out, "signed head: seq {seq} found in the log ({signed})")?;
    }
    if r.ts_regressions > 0 {
        writeln!(
            out,
            "note: {} entries are timestamped earlier than their predecessor (clock steps?)",
            r.ts_regressions
        )?;
    }
    Ok(())
}

fn verify_json(
    result: &Result<VerifyReport, VerifyFailure>,
    key: Option<&VerifyingKey>,
) -> serde_json::Value {
    let key = key.map(|k| hex::encode(k.as_bytes()));
    match result {
        Ok(r) => serde_json::json!({
            "valid": r.signatures_checked,
            "chain_intact": true,
            "signatures_checked": r.signatures_checked,
            "key": key,
            "entries": r.entries,
            "last_seq": r.last.map(|h| h.seq),
            "last_hash": r.last.map(|h| h.hash.to_string()),
            "head_matched": r.head_matched,
            "head_signature_checked": r.head_signature_checked,
            "ts_regressions": r.ts_regressions,
            "files": r.files.iter().map(|f| serde_json::json!({
                "path": f.path.display().to_string(),
                "entries": f.entries,
                "first_seq": f.seq_range.map(|r| r.0),
                "last_seq": f.seq_range.map(|r| r.1),
            })).collect::<Vec<_>>(),
        }),
        Err(f) => serde_json::json!({
            "valid": false,
            "chain_intact": false,
            "signatures_checked": key.is_some(),
            "key": key,
            "failure": {
                "file": f.file.as_ref().map(|p| p.display().to_string()),
                "line": f.line,
                "seq": f.seq,
                "error": f.kind.to_string(),
                "message": f.to_string(),
            },
        }),
    }
}

/// [`printable`] per line.
fn printable_multiline(s: &str) -> String {
    s.lines().map(printable).collect::<Vec<_>>().join("\n")
}

/// Escape control characters (terminal escape sequences in a hostile log).
fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

fn run_show(args: &ShowArgs) -> anyhow::Result<u8> {
    let time = |s: &Option<String>, what: &str| -> anyhow::Result<Option<u64>> {
        s.as_deref()
            .map(parse_time)
            .transpose()
            .with_context(|| format!("--{what}"))
    };
    let filter = Filter {
        since: time(&args.since, "since")?,
        until: time(&args.until, "until")?,
        site: args.site.clone(),
        round: args.round,
        event_prefix: args.event.clone(),
        actor: args.actor.clone(),
    };
    let files = args.files.paths()?;
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "{:>6}  {:<24}  {:<40}  {:<22}  DETAILS",
            "SEQ", "TIME (UTC)", "ACTOR", "EVENT"
        )?;
    }
    let (mut total, mut shown) = (0u64, 0u64);
    for item in EntryReader::new(&files) {
        let e = match item {
            Ok(e) => e,
            Err(f) if matches!(*f.kind, FailureKind::Io(_)) => bail!("{f}"),
            Err(f) => {
                out.flush()?;
                eprintln!("INVALID: {f}");
                return Ok(EXIT_INVALID);
            }
        };
        total += 1;
        if !filter.matches(&e.entry) {
            continue;
        }
        shown += 1;
        if args.json {
            serde_json::to_writer(&mut out, &e.entry)?;
            writeln!(out)?;
        } else {
            let row = format!(
                "{:>6}  {:<24}  {:<40}  {:<22}  {}",
                e.entry.seq,
                format_time(e.entry.ts_unix_ms),
                e.entry.actor,
                e.entry.event,
                e.entry.details
            );
            writeln!(out, "{}", printable(&row))?;
        }
    }
    if !args.json {
        writeln!(
            out,
            "-- {shown} of {total} entries (not verified here: use `fedlink audit verify`)"
        )?;
    }
    Ok(EXIT_VALID)
}
