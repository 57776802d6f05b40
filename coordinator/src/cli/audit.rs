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

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
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
    #[arg(long, value_name = "PUBKEY.pem|HEX")]
    key: Option<String>,
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
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn resolve_key(arg: &str) -> anyhow::Result<VerifyingKey> {
    let path = Path::new(arg);
    if path.exists() {
        return load_verifying_key(path).context("reading --key");
    }
    parse_verifying_key(arg).with_context(|| {
        format!("--key {arg:?}: no such file, and not 64 hex digits of an ed25519 public key")
    })
}

fn run_verify(args: &VerifyArgs) -> anyhow::Result<u8> {
    let files = args.files.paths()?;
    let key = args.key.as_deref().map(resolve_key).transpose()?;
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
            "{:>6}  {:<24}  {:<28}  {:<22}  DETAILS",
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
                "{:>6}  {:<24}  {:<28}  {:<22}  {}",
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
