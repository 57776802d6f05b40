//! Reading entries for review: an iterator over one or more files, filters,
//! and time parsing/formatting. Reading does **not** verify the chain or the
//! signatures: run [`crate::verify`] for that.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::entry::{Entry, EntryHash, LineError, MAX_LINE_LEN, parse_line};
use crate::lines::{Lines, RawLine};
use crate::verify::{FailureKind, VerifyFailure};

/// One entry and where it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct LocatedEntry {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: u64,
    /// The entry.
    pub entry: Entry,
    /// The hash of its line.
    pub hash: EntryHash,
}

/// Iterates over the entries of `files` in order. Yields an error (and then
/// stops) at the first line that cannot be read or parsed.
pub struct EntryReader {
    files: std::vec::IntoIter<PathBuf>,
    current: Option<(PathBuf, Lines<BufReader<File>>, u64)>,
    failed: bool,
}

impl std::fmt::Debug for EntryReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryReader")
            .field("current", &self.current.as_ref().map(|(p, _, l)| (p, l)))
            .finish_non_exhaustive()
    }
}

impl EntryReader {
    /// A reader over `files`, in order.
    pub fn new<P: AsRef<Path>>(files: &[P]) -> Self {
        let files: Vec<PathBuf> = files.iter().map(|p| p.as_ref().to_path_buf()).collect();
        Self {
            files: files.into_iter(),
            current: None,
            failed: false,
        }
    }

    fn step(&mut self) -> Option<Result<LocatedEntry, VerifyFailure>> {
        loop {
            let Some((path, lines, line_no)) = &mut self.current else {
                let path = self.files.next()?;
                match File::open(&path) {
                    Ok(f) => self.current = Some((path, Lines::new(BufReader::new(f)), 0)),
                    Err(e) => {
                        return Some(Err(VerifyFailure {
                            file: Some(path),
                            line: None,
                            seq: None,
                            kind: Box::new(FailureKind::Io(e.to_string())),
                        }));
                    }
                }
                continue;
            };
            let fail = |line: u64, kind| VerifyFailure {
                file: Some(path.clone()),
                line: Some(line),
                seq: None,
                kind: Box::new(kind),
            };
            let raw = match lines.next_line() {
                Ok(raw) => raw,
                Err(e) => return Some(Err(fail(*line_no + 1, FailureKind::Io(e.to_string())))),
            };
            let Some(raw) = raw else {
                self.current = None;
                continue;
            };
            *line_no += 1;
            let line = match raw {
                RawLine::Complete(line) if line.is_empty() => {
                    return Some(Err(fail(*line_no, FailureKind::EmptyLine)));
                }
                RawLine::Complete(line) => line,
                RawLine::Torn(b) => {
                    return Some(Err(fail(*line_no, FailureKind::TornLine { len: b.len() })));
                }
                RawLine::TooLong => {
                    return Some(Err(fail(
                        *line_no,
                        FailureKind::LineTooLong { max: MAX_LINE_LEN },
                    )));
                }
            };
            return Some(match parse_line(&line) {
                Ok(p) => Ok(LocatedEntry {
                    file: path.clone(),
                    line: *line_no,
                    entry: p.entry,
                    hash: p.hash,
                }),
                Err(LineError::Json(s)) => Err(fail(*line_no, FailureKind::Malformed(s))),
                Err(LineError::Layout(s)) => {
                    Err(fail(*line_no, FailureKind::Malformed(s.to_owned())))
                }
            });
        }
    }
}

impl Iterator for EntryReader {
    type Item = Result<LocatedEntry, VerifyFailure>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = self.step();
        if matches!(item, Some(Err(_))) {
            self.failed = true;
        }
        item
    }
}

/// Which entries to show. Every set criterion must match (AND); an empty
/// filter matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Entries at or after this time (unix ms, inclusive).
    pub since: Option<u64>,
    /// Entries at or before this time (unix ms, inclusive).
    pub until: Option<u64>,
    /// A site: matches the actor or `details.site`, either equal to it or a
    /// `fedlink://<federation>/site/<name>` identity whose name is it.
    pub site: Option<String>,
    /// `details.round` equals this.
    pub round: Option<u64>,
    /// The event type starts with this (`update.` matches `update.received`).
    pub event_prefix: Option<String>,
    /// The actor equals this exactly.
    pub actor: Option<String>,
}

/// Whether `value` designates `site`: equal, or a fedlink site identity URI
/// whose name is `site`.
fn is_site(value: &str, site: &str) -> bool {
    if value == site {
        return true;
    }
    value
        .strip_prefix(crate::event::IDENTITY_SCHEME)
        .and_then(|rest| rest.split_once('/'))
        .and_then(|(_fed, rest)| rest.strip_prefix("site/"))
        .is_some_and(|name| name == site)
}

impl Filter {
    /// Whether `entry` passes every criterion.
    pub fn matches(&self, entry: &Entry) -> bool {
        if self.since.is_some_and(|t| entry.ts_unix_ms < t)
            || self.until.is_some_and(|t| entry.ts_unix_ms > t)
        {
            return false;
        }
        if let Some(site) = &self.site {
            let in_details = entry
                .details
                .get("site")
                .and_then(|v| v.as_str())
                .is_some_and(|v| is_site(v, site));
            if !is_site(&entry.actor, site) && !in_details {
                return false;
            }
        }
        if let Some(round) = self.round
            && entry.details.get("round").and_then(|v| v.as_u64()) != Some(round)
        {
            return false;
        }
        if let Some(prefix) = &self.event_prefix
            && !entry.event.starts_with(prefix.as_str())
        {
            return false;
        }
        if let Some(actor) = &self.actor
            && entry.actor != *actor
        {
            return false;
        }
        true
    }
}

/// A time given on the command line that is neither unix milliseconds nor RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid time {0:?}: expected milliseconds since the Unix epoch or RFC 3339 (2025-01-31T12:00:00Z)"
)]
pub struct TimeParseError(pub String);

/// Parse a time: milliseconds since the Unix epoch (`1735689600000`) or
/// RFC 3339 (`2025-01-01T00:00:00Z`, offsets and fractions allowed).
/// Times before 1970 are refused.
pub fn parse_time(s: &str) -> Result<u64, TimeParseError> {
    let err = || TimeParseError(s.chars().take(80).collect());
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| err());
    }
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| err())?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    u64::try_from(ms).map_err(|_| err())
}

/// Format unix milliseconds as RFC 3339 UTC with milliseconds
/// (`2025-01-01T00:00:00.000Z`); out-of-range values fall back to `<ms> ms`.
pub fn format_time(ts_unix_ms: u64) -> String {
    let format = time::format_description::parse_borrowed::<2>(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z",
    );
    i128::from(ts_unix_ms)
        .checked_mul(1_000_000)
        .and_then(|ns| OffsetDateTime::from_unix_timestamp_nanos(ns).ok())
        .zip(format.ok())
        .and_then(|(t, f)| t.format(&f).ok())
        .unwrap_or_else(|| format!("{ts_unix_ms} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_and_format() {
        assert_eq!(parse_time("1735689600000").unwrap(), 1_735_689_600_000);
        assert_eq!(
            parse_time("2025-01-01T00:00:00Z").unwrap(),
            1_735_689_600_000
        );
        assert_eq!(
            parse_time("2025-01-01T01:00:00+01:00").unwrap(),
            1_735_689_600_000
        );
        assert!(parse_time("1969-12-31T23:59:59Z").is_err());
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("").is_err());
        assert_eq!(format_time(1_735_689_600_000), "2025-01-01T00:00:00.000Z");
        assert_eq!(format_time(1_735_689_600_123), "2025-01-01T00:00:00.123Z");
        assert_eq!(format_time(u64::MAX), format!("{} ms", u64::MAX));
    }

    #[test]
    fn site_matches_name_or_identity() {
        assert!(is_site("fedlink://fed/site/a", "a"));
        assert!(is_site("fedlink://fed/site/a", "fedlink://fed/site/a"));
        assert!(!is_site("fedlink://fed/admin/a", "a"));
        assert!(!is_site("fedlink://fed/site/ab", "a"));
        assert!(is_site("a", "a"));
    }
}
