//! Verification of a log (one or more files in order): syntax, sequence
//! numbers, the hash chain, every signature and, optionally, a signed head.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;

use crate::entry::{EntryHash, EntryHead, LineError, MAX_LINE_LEN, SignedHead, parse_line};
use crate::lines::{Lines, RawLine};

/// What is wrong at the place a [`VerifyFailure`] names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FailureKind {
    /// The file could not be opened or read.
    #[error("cannot read the file: {0}")]
    Io(String),
    /// A line is longer than [`MAX_LINE_LEN`] bytes; nothing more was buffered.
    #[error("line longer than {max} bytes")]
    LineTooLong {
        /// The limit.
        max: usize,
    },
    /// The file ends with a partial line (no final newline): an interrupted
    /// write, or a cut.
    #[error("torn last line: {len} bytes without a final newline (interrupted write or cut file)")]
    TornLine {
        /// Length of the partial line.
        len: usize,
    },
    /// An empty line.
    #[error("empty line")]
    EmptyLine,
    /// The line is not a well-formed entry.
    #[error("not a well-formed entry: {0}")]
    Malformed(String),
    /// The signature does not verify with the given key: the entry was
    /// altered, forged, or written by another key.
    #[error("bad signature: the entry was altered, or not signed by this key")]
    BadSignature,
    /// The sequence number is not the next one.
    #[error(
        "sequence number {found}, expected {expected} (an entry is missing, inserted or out of order)"
    )]
    SeqMismatch {
        /// The sequence number that should come next.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// `prev` is not the hash of the previous entry's line.
    #[error("prev is {found}, expected {expected}: the hash chain is broken")]
    ChainBreak {
        /// Hash of the previous line (or genesis / the start anchor).
        expected: EntryHash,
        /// The `prev` found in the entry.
        found: EntryHash,
    },
    /// Sequence numbers ran out (an entry at `u64::MAX` followed by another).
    #[error("sequence number overflow")]
    SeqOverflow,
    /// The signed head's own signature does not verify with the key.
    #[error("the signed head's signature is not valid for this key")]
    HeadSignature,
    /// The entry at the head's sequence number is not the one the head vouches for.
    #[error("entry hash {found} differs from the signed head's {expected}")]
    HeadMismatch {
        /// The head's hash.
        expected: EntryHash,
        /// The hash of the entry found at that sequence number.
        found: EntryHash,
    },
    /// The log ends before the signed head: its tail was removed.
    #[error("{}", truncated_msg(*.last_seq, *.head_seq))]
    Truncated {
        /// The last sequence number in the log (`None`: no entries).
        last_seq: Option<u64>,
        /// The head's sequence number.
        head_seq: u64,
    },
    /// The signed head lies before the first verified entry and cannot be checked.
    #[error(
        "the signed head (seq {head_seq}) lies before the verified range, which starts at seq {start}"
    )]
    HeadBeforeStart {
        /// The head's sequence number.
        head_seq: u64,
        /// The first sequence number verified.
        start: u64,
    },
}

fn truncated_msg(last_seq: Option<u64>, head_seq: u64) -> String {
    match last_seq {
        Some(last) => format!(
            "the log ends at seq {last} but the signed head vouches for seq {head_seq}: the tail was truncated"
        ),
        None => format!(
            "the log has no entries but the signed head vouches for seq {head_seq}: the tail was truncated"
        ),
    }
}

/// The first problem found, and where: file, 1-based line number, and the
/// entry's sequence number when it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyFailure {
    /// The file (`None` for a problem with the signed head itself).
    pub file: Option<PathBuf>,
    /// 1-based line number in `file` (for a truncated tail: the line where the
    /// missing entry should be).
    pub line: Option<u64>,
    /// Sequence number of the entry on that line, when it parsed.
    pub seq: Option<u64>,
    /// What is wrong (boxed: failures are the cold path).
    pub kind: Box<FailureKind>,
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, _) => f.write_str("signed head: ")?,
        }
        if let Some(seq) = self.seq {
            write!(f, "entry seq {seq}: ")?;
        }
        write!(f, "{}", *self.kind)
    }
}

impl std::error::Error for VerifyFailure {}

/// Entries found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    /// The file.
    pub path: PathBuf,
    /// Number of entries.
    pub entries: u64,
    /// First and last sequence numbers (`None` if the file is empty).
    pub seq_range: Option<(u64, u64)>,
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Total number of entries.
    pub entries: u64,
    /// Per file, in the order given.
    pub files: Vec<FileReport>,
    /// The newest entry (`None`: no entries).
    pub last: Option<EntryHead>,
    /// Whether every entry signature was checked against a key. If `false`,
    /// only the chain was checked: anyone could have rewritten the whole log.
    pub signatures_checked: bool,
    /// The signed head that was matched (its sequence number), if one was given.
    pub head_matched: Option<u64>,
    /// Whether the signed head's own signature was checked.
    pub head_signature_checked: bool,
    /// How many entries carry a timestamp earlier than their predecessor's
    /// (clock steps; not an integrity failure, reported for the reviewer).
    pub ts_regressions: u64,
}

/// Verifies logs. Built with options; [`verify`] and [`verify_chain`] are
/// shortcuts.
///
/// Checks, per line and in this order: length, final newline, JSON syntax
/// and layout, signature (with a key), sequence number, `prev` hash, and the
/// signed head (at its sequence number, and that the log reaches it). The
/// first failure is returned.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    key: Option<VerifyingKey>,
    head: Option<SignedHead>,
    start: Option<EntryHead>,
}

impl Verifier {
    /// A verifier that checks the chain only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Check every entry signature (and the head's) with `key`.
    pub fn key(mut self, key: VerifyingKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Require the log to contain the entry `head` vouches for (detects a
    /// truncated tail).
    pub fn head(mut self, head: SignedHead) -> Self {
        self.head = Some(head);
        self
    }

    /// The files do not start at the beginning of the log: the first entry
    /// must follow `anchor` (a head trusted from elsewhere), e.g. when old
    /// rotated files were deleted under a retention policy.
    pub fn start_after(mut self, anchor: EntryHead) -> Self {
        self.start = Some(anchor);
        self
    }

    /// Verify `files`, in order (oldest rotated file first, current file last).
    pub fn verify<P: AsRef<Path>>(&self, files: &[P]) -> Result<VerifyReport, VerifyFailure> {
        let mut state = self.state()?;
        for path in files {
            let path = path.as_ref();
            let file = File::open(path).map_err(|e| VerifyFailure {
                file: Some(path.to_path_buf()),
                line: None,
                seq: None,
                kind: Box::new(FailureKind::Io(e.to_string())),
            })?;
            state.feed_with(path, BufReader::new(file), true)?;
        }
        state.finish()
    }

    pub(crate) fn state(&self) -> Result<State<'_>, VerifyFailure> {
        let mut head_signature_checked = false;
        if let (Some(head), Some(key)) = (&self.head, &self.key) {
            if !head.signature_ok(key) {
                return Err(VerifyFailure {
                    file: None,
                    line: None,
                    seq: Some(head.seq),
                    kind: Box::new(FailureKind::HeadSignature),
                });
            }
            head_signature_checked = true;
        }
        let (next_seq, prev) = match self.start {
            None => (Some(0), EntryHash::GENESIS),
            Some(a) => (a.seq.checked_add(1), a.hash),
        };
        Ok(State {
            v: self,
            next_seq,
            prev,
            last: None,
            last_ts: None,
            entries: 0,
            files: Vec::new(),
            head_matched: None,
            head_signature_checked,
            ts_regressions: 0,
            last_pos: None,
        })
    }
}

/// Running verification state, fed file by file.
pub(crate) struct State<'a> {
    v: &'a Verifier,
    /// `None` after an entry at `u64::MAX`.
    next_seq: Option<u64>,
    prev: EntryHash,
    last: Option<EntryHead>,
    last_ts: Option<u64>,
    entries: u64,
    files: Vec<FileReport>,
    head_matched: Option<u64>,
    head_signature_checked: bool,
    ts_regressions: u64,
    /// File and number of lines of the last file fed.
    last_pos: Option<(PathBuf, u64)>,
}

impl State<'_> {
    /// Verify one more file; with `sigs == false`, skip its signatures even
    /// if the verifier has a key (the writer's `open` uses this for rotated files).
    pub(crate) fn feed_with(
        &mut self,
        path: &Path,
        reader: impl BufRead,
        sigs: bool,
    ) -> Result<(), VerifyFailure> {
        let fail = |line: u64, seq: Option<u64>, kind: FailureKind| VerifyFailure {
            file: Some(path.to_path_buf()),
            line: Some(line),
            seq,
            kind: Box::new(kind),
        };
        let mut lines = Lines::new(reader);
        let mut line_no = 0u64;
        let mut report = FileReport {
            path: path.to_path_buf(),
            entries: 0,
            seq_range: None,
        };
        loop {
            let raw = lines
                .next_line()
                .map_err(|e| fail(line_no + 1, None, FailureKind::Io(e.to_string())))?;
            let Some(raw) = raw else { break };
            line_no += 1;
            let line = match raw {
                RawLine::Complete(line) => line,
                RawLine::Torn(bytes) => {
                    return Err(fail(
                        line_no,
                        None,
                        FailureKind::TornLine { len: bytes.len() },
                    ));
                }
                RawLine::TooLong => {
                    return Err(fail(
                        line_no,
                        None,
                        FailureKind::LineTooLong { max: MAX_LINE_LEN },
                    ));
                }
            };
            if line.is_empty() {
                return Err(fail(line_no, None, FailureKind::EmptyLine));
            }
            let parsed = parse_line(&line).map_err(|e| {
                let why = match e {
                    LineError::Json(s) => s,
                    LineError::Layout(s) => s.to_owned(),
                };
                fail(line_no, None, FailureKind::Malformed(why))
            })?;
            let seq = parsed.entry.seq;
            if let Some(key) = self.v.key.as_ref().filter(|_| sigs)
                && !parsed.signature_ok(key)
            {
                return Err(fail(line_no, Some(seq), FailureKind::BadSignature));
            }
            let Some(expected) = self.next_seq else {
                return Err(fail(line_no, Some(seq), FailureKind::SeqOverflow));
            };
            if seq != expected {
                return Err(fail(
                    line_no,
                    Some(seq),
                    FailureKind::SeqMismatch {
                        expected,
                        found: seq,
                    },
                ));
            }
            if parsed.entry.prev != self.prev {
                return Err(fail(
                    line_no,
                    Some(seq),
                    FailureKind::ChainBreak {
                        expected: self.prev,
                        found: parsed.entry.prev,
                    },
                ));
            }
            if let Some(head) = &self.v.head
                && head.seq == seq
            {
                if head.hash != parsed.hash {
                    return Err(fail(
                        line_no,
                        Some(seq),
                        FailureKind::HeadMismatch {
                            expected: head.hash,
                            found: parsed.hash,
                        },
                    ));
                }
                self.head_matched = Some(seq);
            }
            let ts = parsed.entry.ts_unix_ms;
            if self.last_ts.is_some_and(|t| ts < t) {
                self.ts_regressions += 1;
            }
            self.last_ts = Some(ts);
            self.next_seq = seq.checked_add(1);
            self.prev = parsed.hash;
            self.last = Some(EntryHead {
                seq,
                hash: parsed.hash,
            });
            self.entries += 1;
            report.entries += 1;
            report.seq_range = Some(match report.seq_range {
                None => (seq, seq),
                Some((first, _)) => (first, seq),
            });
        }
        self.files.push(report);
        self.last_pos = Some((path.to_path_buf(), line_no));
        Ok(())
    }

    pub(crate) fn finish(self) -> Result<VerifyReport, VerifyFailure> {
        if let Some(head) = &self.v.head
            && self.head_matched.is_none()
        {
            let start = self.v.start.map_or(0, |a| a.seq.saturating_add(1));
            let kind = if self.v.start.is_some() && head.seq < start {
                FailureKind::HeadBeforeStart {
                    head_seq: head.seq,
                    start,
                }
            } else {
                FailureKind::Truncated {
                    last_seq: self.last.map(|h| h.seq),
                    head_seq: head.seq,
                }
            };
            let (file, line) = match self.last_pos {
                Some((file, lines)) => (Some(file), Some(lines + 1)),
                None => (None, None),
            };
            return Err(VerifyFailure {
                file,
                line,
                seq: None,
                kind: Box::new(kind),
            });
        }
        Ok(VerifyReport {
            entries: self.entries,
            files: self.files,
            last: self.last,
            signatures_checked: self.v.key.is_some(),
            head_matched: self.head_matched,
            head_signature_checked: self.head_signature_checked,
            ts_regressions: self.ts_regressions,
        })
    }
}

/// Verify `files` (in order) with `key`, and against `expected_head` if given.
pub fn verify<P: AsRef<Path>>(
    files: &[P],
    key: &VerifyingKey,
    expected_head: Option<&SignedHead>,
) -> Result<VerifyReport, VerifyFailure> {
    let mut v = Verifier::new().key(*key);
    if let Some(head) = expected_head {
        v = v.head(head.clone());
    }
    v.verify(files)
}

/// Verify the syntax, sequence numbers and hash chain of `files` **without
/// checking signatures** (nor the head's signature). This proves nothing
/// about who wrote the log: anyone can write a consistent chain.
pub fn verify_chain<P: AsRef<Path>>(
    files: &[P],
    expected_head: Option<&SignedHead>,
) -> Result<VerifyReport, VerifyFailure> {
    let mut v = Verifier::new();
    if let Some(head) = expected_head {
        v = v.head(head.clone());
    }
    v.verify(files)
}
