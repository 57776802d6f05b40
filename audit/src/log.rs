//! The writer: [`AuditLog`] appends signed, chained entries and fsyncs them.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::entry::{EntryHead, MAX_LINE_LEN, SignedHead, encode_entry};
use crate::error::{Error, io_err};
use crate::verify::{FailureKind, Verifier};

/// Longest actor string accepted by [`AuditLog::append`], in bytes.
pub const MAX_ACTOR_LEN: usize = 1024;
/// Longest event type accepted by [`AuditLog::append`], in bytes.
pub const MAX_EVENT_LEN: usize = 128;
/// Number of digits of a rotated file's number (`audit.000001.jsonl`).
const ROTATED_DIGITS: usize = 6;
/// Largest head or key file read.
const MAX_SMALL_FILE: u64 = 64 * 1024;

/// An append-only, hash-chained, signed audit log (one writer).
///
/// Every [`append`](Self::append) writes one line and fsyncs it before
/// returning: perform the action the entry records only after `append`
/// returned `Ok`. Entries must not be written by two writers: the file is
/// locked (advisory `flock`) while an `AuditLog` holds it.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    key: SigningKey,
    head: Option<EntryHead>,
    poisoned: bool,
}

/// What [`AuditLog::repair_torn_tail`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTailRepair {
    /// The log file.
    pub path: PathBuf,
    /// 1-based number of the removed partial line.
    pub line: u64,
    /// How many bytes were removed.
    pub removed_bytes: u64,
    /// blake3 of the removed bytes (hex), to record in the next entry.
    pub removed_blake3: String,
}

impl AuditLog {
    /// Open the log at `path` for appending, creating it (mode 0600) if it
    /// does not exist, and continue its chain.
    ///
    /// Rotated files next to it (`audit.000001.jsonl`, … for `audit.jsonl`)
    /// are part of the log: the whole chain is re-hashed, and every signature
    /// of the current file is checked with `key`'s public half (rotated files
    /// were checked while they were current; [`crate::verify`] checks
    /// everything). A log that does not verify is refused
    /// ([`Error::Invalid`]), and so is one whose last line is torn
    /// ([`Error::TornTail`]; see [`repair_torn_tail`](Self::repair_torn_tail)).
    /// A rotation interrupted by a crash is completed.
    pub fn open(path: impl AsRef<Path>, key: SigningKey) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let rotated = rotated_segments(&path)?;
        #[cfg(unix)]
        if let Some((_, last)) = rotated.last() {
            finish_interrupted_rotation(&path, last)?;
        }
        let file = open_or_create(&path)?;
        lock(&file, &path)?;

        let verifier = Verifier::new().key(key.verifying_key());
        let mut state = verifier.state()?;
        for (_, seg) in &rotated {
            let f = File::open(seg).map_err(io_err(seg))?;
            state.feed_with(seg, std::io::BufReader::new(f), false)?;
        }
        let mut reader = file.try_clone().map_err(io_err(&path))?;
        reader.seek(SeekFrom::Start(0)).map_err(io_err(&path))?;
        match state.feed_with(&path, std::io::BufReader::new(reader), true) {
            Ok(()) => {}
            Err(f) => {
                if let (FailureKind::TornLine { len }, Some(line)) = (&*f.kind, f.line) {
                    return Err(Error::TornTail {
                        path,
                        line,
                        len: *len,
                    });
                }
                return Err(f.into());
            }
        }
        let report = state.finish()?;
        Ok(Self {
            path,
            file,
            key,
            head: report.last,
            poisoned: false,
        })
    }

    /// [`open`](Self::open), first removing a torn last line left by a
    /// crash ([`repair_torn_tail`](Self::repair_torn_tail)) if there is one.
    /// Returns what was removed: record it in the log (e.g. event
    /// `audit.tail_repaired`), as both services do at start.
    pub fn open_repairing(
        path: impl AsRef<Path>,
        key: SigningKey,
    ) -> Result<(Self, Option<TornTailRepair>), Error> {
        let path = path.as_ref();
        match Self::open(path, key.clone()) {
            Ok(log) => Ok((log, None)),
            Err(Error::TornTail { .. }) => {
                let repair = Self::repair_torn_tail(path)?;
                Ok((Self::open(path, key)?, repair))
            }
            Err(e) => Err(e),
        }
    }

    /// The current file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The newest entry (`None` while the log is empty).
    pub fn head(&self) -> Option<EntryHead> {
        self.head
    }

    /// The public key that verifies this log.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Append one entry and fsync it; returns its position.
    ///
    /// `now_unix_ms` is the caller's clock (the writer never reads one);
    /// `actor` is a certificate identity or `system`; `event` a dotted type
    /// (`[A-Za-z0-9._-]`, at most [`MAX_EVENT_LEN`] bytes); `details` a JSON
    /// object. When this returns `Ok`, the entry is on disk; if it returns an
    /// I/O error the entry may be partly written and the writer refuses
    /// further appends ([`Error::Poisoned`]) until reopened.
    pub fn append(
        &mut self,
        now_unix_ms: u64,
        actor: &str,
        event: &str,
        details: &serde_json::Value,
    ) -> Result<EntryHead, Error> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        check_actor(actor)?;
        check_event(event)?;
        if !details.is_object() {
            return Err(Error::InvalidEntry("details must be a JSON object".into()));
        }
        let (seq, prev) = match self.head {
            None => (0, crate::EntryHash::GENESIS),
            Some(h) => (h.seq.checked_add(1).ok_or(Error::SeqExhausted)?, h.hash),
        };
        let (mut line, hash) =
            encode_entry(&self.key, seq, now_unix_ms, actor, event, details, prev)?;
        if line.len() > MAX_LINE_LEN {
            return Err(Error::EntryTooLarge {
                len: line.len(),
                max: MAX_LINE_LEN,
            });
        }
        line.push(b'\n');
        if let Err(e) = self
            .file
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
        {
            self.poisoned = true;
            return Err(io_err(&self.path)(e));
        }
        let head = EntryHead { seq, hash };
        self.head = Some(head);
        Ok(head)
    }

    /// Append several entries with **one** fsync (group commit); returns
    /// their positions, in order.
    ///
    /// Each entry is what [`append`](Self::append) would write (same
    /// sequence numbers, chain and signatures; `now_unix_ms` and `actor` are
    /// shared). Every entry is checked before anything is written: one
    /// invalid entry writes none. When this returns `Ok`, all of them are on
    /// disk, so the actions they record may all take effect; on an I/O error
    /// some may be partly written and the writer is poisoned as with
    /// `append`. An empty batch writes nothing.
    pub fn append_batch(
        &mut self,
        now_unix_ms: u64,
        actor: &str,
        entries: &[(&str, &serde_json::Value)],
    ) -> Result<Vec<EntryHead>, Error> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        check_actor(actor)?;
        let mut out = Vec::with_capacity(entries.len());
        let mut bytes = Vec::new();
        let mut head = self.head;
        for &(event, details) in entries {
            check_event(event)?;
            if !details.is_object() {
                return Err(Error::InvalidEntry("details must be a JSON object".into()));
            }
            let (seq, prev) = match head {
                None => (0, crate::EntryHash::GENESIS),
                Some(h) => (h.seq.checked_add(1).ok_or(Error::SeqExhausted)?, h.hash),
            };
            let (line, hash) =
                encode_entry(&self.key, seq, now_unix_ms, actor, event, details, prev)?;
            if line.len() > MAX_LINE_LEN {
                return Err(Error::EntryTooLarge {
                    len: line.len(),
                    max: MAX_LINE_LEN,
                });
            }
            bytes.extend_from_slice(&line);
            bytes.push(b'\n');
            let h = EntryHead { seq, hash };
            head = Some(h);
            out.push(h);
        }
        if out.is_empty() {
            return Ok(out);
        }
        if let Err(e) = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data())
        {
            self.poisoned = true;
            return Err(io_err(&self.path)(e));
        }
        self.head = head;
        Ok(out)
    }

    /// Close the current file and start a new one that continues the chain.
    ///
    /// `audit.jsonl` becomes `audit.NNNNNN.jsonl` (the next free number;
    /// an existing file is never overwritten) and a new, empty `audit.jsonl`
    /// (0600) takes its place; the next entry's `prev` is the hash of the last
    /// entry of the rotated file. Returns the rotated file's path.
    ///
    /// Crash safety: the old file is first hard-linked to its new name, then
    /// an empty file is renamed over the current name. If this fails (or the
    /// process dies) in between, appends are refused and the next
    /// [`open`](Self::open) completes the rotation.
    pub fn rotate(&mut self) -> Result<PathBuf, Error> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let next = rotated_segments(&self.path)?
            .last()
            .map_or(Some(1), |(n, _)| n.checked_add(1))
            .ok_or(Error::SeqExhausted)?;
        let target = rotated_path(&self.path, next)?;
        fs::hard_link(&self.path, &target).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                Error::AlreadyExists {
                    path: target.clone(),
                }
            } else {
                io_err(&target)(source)
            }
        })?;
        // From here on, a failure leaves the rotation half done: refuse
        // appends; `open` completes it.
        self.poisoned = true;
        let dir = parent_dir(&self.path);
        sync_dir(&dir)?;
        let tmp = tempfile::Builder::new()
            .prefix(".fedlink-audit-")
            .tempfile_in(&dir)
            .map_err(io_err(&dir))?;
        set_private(tmp.as_file(), tmp.path())?;
        lock(tmp.as_file(), tmp.path())?;
        let file = tmp
            .persist(&self.path)
            .map_err(|e| io_err(&self.path)(e.error))?;
        sync_dir(&dir)?;
        self.file = file;
        self.poisoned = false;
        Ok(target)
    }

    /// A head for the newest entry, signed at `now_unix_ms`.
    pub fn signed_head(&self, now_unix_ms: u64) -> Result<SignedHead, Error> {
        let head = self.head.ok_or(Error::Empty)?;
        Ok(SignedHead::sign(&self.key, head, now_unix_ms))
    }

    /// Sign the current head and write it to `path` as JSON (atomically,
    /// replacing an earlier head file there). Keep it away from the log
    /// (another host or medium): whoever can rewrite both can truncate both.
    pub fn export_head(
        &self,
        now_unix_ms: u64,
        path: impl AsRef<Path>,
    ) -> Result<SignedHead, Error> {
        let head = self.signed_head(now_unix_ms)?;
        write_head(path, &head)?;
        Ok(head)
    }

    /// Remove a torn (partial, unterminated) last line left by a crash during
    /// [`append`](Self::append), so that the log can be opened again.
    ///
    /// Returns `None` if the file ends with a newline (nothing to repair).
    /// Only bytes after the last newline are removed; complete lines, valid
    /// or not, are never touched. The removed entry was never acknowledged
    /// (its `append` did not return), so the action it announced was not
    /// performed. Record the returned [`TornTailRepair`] in the log after
    /// reopening it (e.g. event `audit.tail_repaired`). Refused while another
    /// writer holds the log.
    pub fn repair_torn_tail(path: impl AsRef<Path>) -> Result<Option<TornTailRepair>, Error> {
        let path = path.as_ref();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        lock(&file, path)?;
        let len = file.metadata().map_err(io_err(path))?.len();
        // One pass: find the last newline and count lines before it.
        let mut reader = std::io::BufReader::new(&file);
        let mut buf = [0u8; 64 * 1024];
        let mut pos = 0u64;
        let mut cut = 0u64;
        let mut newlines = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            let chunk = buf.get(..n).unwrap_or_default();
            for (i, b) in chunk.iter().enumerate() {
                if *b == b'\n' {
                    newlines += 1;
                    cut = pos + i as u64 + 1;
                }
            }
            pos += n as u64;
        }
        drop(reader);
        if cut == len {
            return Ok(None);
        }
        file.seek(SeekFrom::Start(cut)).map_err(io_err(path))?;
        let mut hasher = blake3::Hasher::new();
        std::io::copy(&mut (&mut file).take(len - cut), &mut hasher).map_err(io_err(path))?;
        file.set_len(cut).map_err(io_err(path))?;
        file.sync_all().map_err(io_err(path))?;
        Ok(Some(TornTailRepair {
            path: path.to_path_buf(),
            line: newlines + 1,
            removed_bytes: len - cut,
            removed_blake3: hasher.finalize().to_hex().to_string(),
        }))
    }
}

fn check_actor(actor: &str) -> Result<(), Error> {
    if actor.is_empty() || actor.len() > MAX_ACTOR_LEN {
        return Err(Error::InvalidEntry(format!(
            "actor must be 1..={MAX_ACTOR_LEN} bytes"
        )));
    }
    if actor.chars().any(char::is_control) {
        return Err(Error::InvalidEntry(
            "actor contains control characters".into(),
        ));
    }
    Ok(())
}

fn check_event(event: &str) -> Result<(), Error> {
    if event.is_empty()
        || event.len() > MAX_EVENT_LEN
        || !event
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(Error::InvalidEntry(format!(
            "event {:?} must be 1..={MAX_EVENT_LEN} characters of [A-Za-z0-9._-]",
            event.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `(stem, ext)` of the current file's name: `audit.jsonl` → `("audit", Some("jsonl"))`.
fn name_parts(path: &Path) -> Result<(String, Option<String>), Error> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::BadFile {
            path: path.to_path_buf(),
            why: "the log's file name must be valid UTF-8".into(),
        })?;
    Ok(match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem.to_owned(), Some(ext.to_owned())),
        _ => (name.to_owned(), None),
    })
}

fn rotated_path(path: &Path, n: u64) -> Result<PathBuf, Error> {
    let (stem, ext) = name_parts(path)?;
    let name = match ext {
        Some(ext) => format!("{stem}.{n:0ROTATED_DIGITS$}.{ext}"),
        None => format!("{stem}.{n:0ROTATED_DIGITS$}"),
    };
    Ok(path.with_file_name(name))
}

/// Rotated files of the log at `path`, ordered by number.
fn rotated_segments(path: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let (stem, ext) = name_parts(path)?;
    let dir = parent_dir(path);
    let mut out = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(&dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(&dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name
            .strip_prefix(stem.as_str())
            .and_then(|r| r.strip_prefix('.'))
        else {
            continue;
        };
        let digits = match &ext {
            Some(ext) => match rest
                .strip_suffix(ext.as_str())
                .and_then(|r| r.strip_suffix('.'))
            {
                Some(d) => d,
                None => continue,
            },
            None => rest,
        };
        if digits.len() < ROTATED_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(n) = digits.parse::<u64>() else {
            continue;
        };
        out.push((n, dir.join(name)));
    }
    out.sort();
    Ok(out)
}

/// All files of the log whose current file is `path`, in chain order: the
/// rotated files (`audit.000001.jsonl`, …) then `path` itself if it exists.
pub fn segments(path: impl AsRef<Path>) -> Result<Vec<PathBuf>, Error> {
    let path = path.as_ref();
    let mut out: Vec<PathBuf> = rotated_segments(path)?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    if path.exists() {
        out.push(path.to_path_buf());
    }
    Ok(out)
}

/// If a crash hit `rotate` between the hard link and the rename, the current
/// file and the newest rotated file are the same inode: drop the current name.
#[cfg(unix)]
fn finish_interrupted_rotation(path: &Path, last_rotated: &Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let cur = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let old = fs::metadata(last_rotated).map_err(io_err(last_rotated))?;
    if cur.dev() == old.dev() && cur.ino() == old.ino() {
        fs::remove_file(path).map_err(io_err(path))?;
        sync_dir(&parent_dir(path))?;
    }
    Ok(())
}

fn open_or_create(path: &Path) -> Result<File, Error> {
    let mut opts = OpenOptions::new();
    opts.append(true).read(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(file) => {
            set_private(&file, path)?;
            file.sync_all().map_err(io_err(path))?;
            sync_dir(&parent_dir(path))?;
            Ok(file)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => OpenOptions::new()
            .append(true)
            .read(true)
            .open(path)
            .map_err(io_err(path)),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn set_private(file: &File, path: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
    }
    #[cfg(not(unix))]
    let _ = (file, path);
    Ok(())
}

fn lock(file: &File, path: &Path) -> Result<(), Error> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(fs::TryLockError::WouldBlock) => Err(Error::Locked {
            path: path.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(e)) => Err(io_err(path)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    fedlink_durable::sync_dir(dir).map_err(durable_err)
}

fn durable_err(e: fedlink_durable::Error) -> Error {
    Error::Io {
        path: e.path,
        source: e.source,
    }
}

/// Write a signed head to `path` as JSON, atomically and durably
/// (`fedlink_durable::replace`: temporary file, fsync, rename, directory
/// fsync; mode 0600); what [`AuditLog::export_head`] writes and
/// [`read_head`] reads.
pub fn write_head(path: impl AsRef<Path>, head: &SignedHead) -> Result<(), Error> {
    let path = path.as_ref();
    let mut json = serde_json::to_vec_pretty(head)?;
    json.push(b'\n');
    fedlink_durable::replace(path, &json, fedlink_durable::Mode::Private).map_err(durable_err)
}

/// Read a signed head written by [`AuditLog::export_head`].
pub fn read_head(path: impl AsRef<Path>) -> Result<SignedHead, Error> {
    let path = path.as_ref();
    let text = read_small(path)?;
    serde_json::from_str(&text).map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        why: format!("not a signed audit head: {e}"),
    })
}

/// Read a small text file (at most 64 KiB).
pub(crate) fn read_small(path: &Path) -> Result<String, Error> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut data = Vec::new();
    file.take(MAX_SMALL_FILE + 1)
        .read_to_end(&mut data)
        .map_err(io_err(path))?;
    if data.len() as u64 > MAX_SMALL_FILE {
        return Err(Error::BadFile {
            path: path.to_path_buf(),
            why: format!("larger than {MAX_SMALL_FILE} bytes"),
        });
    }
    String::from_utf8(data).map_err(|_| Error::BadFile {
        path: path.to_path_buf(),
        why: "not UTF-8 text".into(),
    })
}
