//! The one way fedlink puts a file on disk that must be whole and must
//! survive a crash.
//!
//! Every write in fedlink whose loss or tearing would matter — models, the
//! round archive, signed audit heads, the model cache, certificates and keys,
//! the CA's registers, exports — goes through this crate, so that one set of
//! guarantees holds everywhere:
//!
//! * **atomic**: a reader sees the old file or the new one, never a mix or a
//!   prefix ([`replace`], [`replace_with`]: a temporary file in the target's
//!   directory, then `rename(2)` over the target);
//! * **durable on return**: the file's data is fsynced before the rename and
//!   the directory after it, so a power cut after `Ok` keeps the new file;
//! * **exact mode**: the file is created with its final permissions
//!   ([`Mode::Private`] 0600 for secrets and anything holding site data,
//!   [`Mode::Public`] 0644), never widened later, whatever the umask;
//! * **no leftovers on error**: a failed write removes its temporary file.
//!
//! Temporary files come from the `tempfile` crate (created with the final
//! mode, removed on drop if the write fails), named `.fedlink-tmp-*` so that
//! [`remove_leftovers`] can clear what a crash left behind without guessing.
//!
//! Appends (the audit log, the spool) are not here: they have their own
//! `fsync` discipline, documented where they live.
//!
//! **Writes in pieces of at most 1 MiB.** Every `write(2)` this crate makes
//! is at most [`WRITE_PIECE`] bytes; appenders elsewhere use
//! [`write_in_pieces`] for the same reason. A single larger write into the
//! page cache can be an order of magnitude dearer: on Linux 6.18 / ext4 in
//! the development VM (a Firecracker guest), one 40 MB `write` took 130 ms
//! of system time and the same bytes in 1 MiB writes 11–13 ms (any piece of
//! 2 MiB or more was slow; 64 KiB–1.7 MB were not), because a large write
//! gets large page-cache folios (most likely: the guest's free high-order
//! blocks are the ones it has handed back to the host, so each is faulted
//! in again). Pieces of 1 MiB cost nothing measurable where that does not
//! happen (docs/PERFORMANCE.md, "Issue #10, session 17").
//!
//! **Group commit of directory entries.** A caller that places many files in
//! one directory and needs them durable only at a later point (the round
//! archive: the accepted updates of a round, needed once the round's
//! `round.json` names them) may use [`replace_defer_dir_sync`] and
//! [`install_defer_dir_sync`]: the data is fsynced as usual, but the
//! directory fsync is left to one [`sync_dir`] for all of them. Until that
//! returns, a crash may lose the new names (never tear a file). Files that
//! need no durability at all, only atomicity for readers (a status snapshot
//! rewritten every few seconds), use [`replace_atomic_only`].

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Prefix of the temporary files [`replace`] writes (see
/// [`remove_leftovers`]).
pub const TEMP_PREFIX: &str = ".fedlink-tmp-";

/// The largest single write this crate makes (see the crate docs).
pub const WRITE_PIECE: usize = 1 << 20;

/// `w.write_all(bytes)` in writes of at most [`WRITE_PIECE`] bytes: for
/// large buffers written straight to a file (a spooled record, a model).
pub fn write_in_pieces(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    for piece in bytes.chunks(WRITE_PIECE) {
        w.write_all(piece)?;
    }
    Ok(())
}

/// Permissions of a file written here (unix; ignored elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 0600: keys, tokens, and anything derived from a site's data.
    Private,
    /// 0644: certificates, public configuration, published models.
    Public,
}

impl Mode {
    /// The unix permission bits.
    pub const fn bits(self) -> u32 {
        match self {
            Self::Private => 0o600,
            Self::Public => 0o644,
        }
    }
}

/// A durable write that failed: which step, on which path.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct Error {
    /// The step that failed (`"create"`, `"write"`, `"commit"`, ...).
    pub op: &'static str,
    /// The file or directory it failed on.
    pub path: PathBuf,
    /// The operating system's error.
    #[source]
    pub source: io::Error,
}

impl Error {
    fn new<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The kind of the underlying IO error (e.g. `AlreadyExists` from
    /// [`create_new`]).
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        Self::new(e.source.kind(), e)
    }
}

/// Replace `path` with `bytes`, atomically and durably (see the crate docs).
pub fn replace(path: &Path, bytes: &[u8], mode: Mode) -> Result<(), Error> {
    replace_with(path, mode, |w| w.write_all(bytes))
}

/// [`replace`] without the directory fsync: the data is fsynced and renamed
/// over `path`, so a reader sees the old file or the new one; the new name
/// is durable once the caller has fsynced `path`'s directory
/// ([`sync_dir`]), which it must do before anything relies on the file
/// surviving a crash. One directory fsync can then cover many files.
pub fn replace_defer_dir_sync(path: &Path, bytes: &[u8], mode: Mode) -> Result<(), Error> {
    let mut staged = Staged::new(path, mode)?;
    staged.write_all(bytes).map_err(Error::new("write", path))?;
    staged.finish(false, Durability::DataOnly)
}

/// Replace `path` with `bytes` atomically for readers (temporary file, then
/// rename), with **no** fsync: after a power cut the file may be the old
/// one, or empty. Only for files that are rewritten often and are not a
/// record of anything (a status snapshot).
pub fn replace_atomic_only(path: &Path, bytes: &[u8], mode: Mode) -> Result<(), Error> {
    let mut staged = Staged::new(path, mode)?;
    staged.write_all(bytes).map_err(Error::new("write", path))?;
    staged.finish(false, Durability::None)
}

/// Replace `path` with what `write` produces (through a 1 MiB buffer),
/// atomically and durably. If `write` fails, the target is untouched and
/// the temporary file removed; the error is returned as a `"write"` error.
pub fn replace_with<T>(
    path: &Path,
    mode: Mode,
    write: impl FnOnce(&mut dyn Write) -> io::Result<T>,
) -> Result<T, Error> {
    let mut staged = Staged::new(path, mode)?;
    let out = {
        // Through the `Staged` (whose `Write` hands the file ≤ 1 MiB per
        // call: a `BufWriter` passes larger writes straight on).
        let mut w = BufWriter::with_capacity(1 << 20, &mut staged);
        let out = write(&mut w).map_err(Error::new("write", path))?;
        w.flush().map_err(Error::new("write", path))?;
        out
    };
    staged.commit()?;
    Ok(out)
}

/// A file being written next to its final path, invisible there until
/// [`Staged::commit`] (or [`Staged::commit_new`]); dropped uncommitted, it
/// is removed. For writes that are fed over time (a streamed export).
#[derive(Debug)]
pub struct Staged {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl Staged {
    /// Create the temporary file (with `mode`) in `path`'s directory.
    pub fn new(path: &Path, mode: Mode) -> Result<Self, Error> {
        let dir = parent(path);
        let mut builder = tempfile::Builder::new();
        builder.prefix(TEMP_PREFIX);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            builder.permissions(std::fs::Permissions::from_mode(mode.bits()));
        }
        let tmp = builder
            .tempfile_in(&dir)
            .map_err(Error::new("create a temporary file in", &dir))?;
        set_exact_mode(tmp.as_file(), tmp.path(), mode)?;
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
        })
    }

    /// fsync the data, rename it over the target, fsync the directory.
    pub fn commit(self) -> Result<(), Error> {
        self.finish(false, Durability::Full)
    }

    /// Like [`Staged::commit`], but never replaces an existing target: an
    /// error of kind `AlreadyExists` then, and the temporary file is removed.
    pub fn commit_new(self) -> Result<(), Error> {
        self.finish(true, Durability::Full)
    }

    fn finish(self, no_clobber: bool, durability: Durability) -> Result<(), Error> {
        let Self { tmp, path } = self;
        if durability != Durability::None {
            fsync(tmp.as_file(), tmp.path())?;
        }
        let persisted = if no_clobber {
            tmp.persist_noclobber(&path)
        } else {
            tmp.persist(&path)
        };
        persisted.map_err(|e| Error::new("create", &path)(e.error))?;
        if durability == Durability::Full {
            sync_dir(&parent(&path))?;
        }
        Ok(())
    }
}

impl Write for Staged {
    /// Writes at most [`WRITE_PIECE`] bytes per call.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tmp.write(buf.get(..WRITE_PIECE).unwrap_or(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tmp.flush()
    }
}

/// Remove the temporary files a crash left in `dir` (names starting with
/// `.fedlink-tmp-`; never anything else) and return their paths, for the
/// caller to log. Call at start-up on directories written with [`replace`].
pub fn remove_leftovers(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(Error::new("list", dir))? {
        let entry = entry.map_err(Error::new("list", dir))?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let p = entry.path();
            std::fs::remove_file(&p).map_err(Error::new("remove", &p))?;
            removed.push(p);
        }
    }
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Create `path`, which must not exist (an error of kind `AlreadyExists`
/// otherwise: nothing is ever overwritten), atomically and durably: the
/// file appears whole or not at all. For keys, certificates and outputs
/// that are written once.
pub fn create_new(path: &Path, bytes: &[u8], mode: Mode) -> Result<(), Error> {
    let mut staged = Staged::new(path, mode)?;
    staged.write_all(bytes).map_err(Error::new("write", path))?;
    staged.commit_new()
}

/// Move `from` (a complete file, already fsynced by whoever wrote it — a
/// spooled upload, a staged kit) to `to` and fsync `to`'s directory (and
/// `from`'s, when it differs), so the move survives a crash.
pub fn install(from: &Path, to: &Path) -> Result<(), Error> {
    std::fs::rename(from, to).map_err(Error::new("rename", to))?;
    let (src, dst) = (parent(from), parent(to));
    sync_dir(&dst)?;
    if src != dst {
        sync_dir(&src)?;
    }
    Ok(())
}

/// [`install`] without the directory fsyncs: `from` is renamed to `to`; the
/// move is durable once the caller has fsynced both directories
/// ([`sync_dir`]), which it must do before anything relies on it.
pub fn install_defer_dir_sync(from: &Path, to: &Path) -> Result<(), Error> {
    std::fs::rename(from, to).map_err(Error::new("rename", to))
}

/// fsync a directory, making the renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| {
            count_fsync();
            d.sync_all()
        })
        .map_err(Error::new("fsync directory", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// How much of a staged write reaches the disk before `finish` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Data fsynced, renamed, directory fsynced.
    Full,
    /// Data fsynced and renamed; the caller fsyncs the directory later.
    DataOnly,
    /// Renamed only.
    None,
}

fn fsync(file: &File, path: &Path) -> Result<(), Error> {
    count_fsync();
    file.sync_all().map_err(Error::new("fsync", path))
}

thread_local! {
    static FSYNCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn count_fsync() {
    FSYNCS.with(|n| n.set(n.get().wrapping_add(1)));
}

/// How many fsyncs (of files and directories) this crate has made on the
/// calling thread so far: for tests and benchmarks that check how many a
/// write path costs.
pub fn fsyncs_on_this_thread() -> u64 {
    FSYNCS.with(std::cell::Cell::get)
}

/// The directory holding `path` (`.` for a bare file name).
fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The umask can only clear bits; still set the mode exactly, in case the
/// file system ignored the mode given at creation.
fn set_exact_mode(file: &File, path: &Path, mode: Mode) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(mode.bits()))
            .map_err(Error::new("chmod", path))?;
    }
    #[cfg(not(unix))]
    let _ = (file, path, mode);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replace_writes_whole_files_with_exact_modes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        replace(&p, b"first", Mode::Private).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        assert_eq!(mode_of(&p), 0o600);
        // A wider existing file does not widen the replacement, and a
        // narrower mode is applied on replace.
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
        replace(&p, b"second", Mode::Private).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(mode_of(&p), 0o600);
        let q = dir.path().join("cert.pem");
        replace(&q, b"c", Mode::Public).unwrap();
        assert_eq!(mode_of(&q), 0o644);
        assert_eq!(entries(dir.path()), ["cert.pem", "key.pem"]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.bin");
        replace(&p, b"old model", Mode::Public).unwrap();
        let err = replace_with(&p, Mode::Public, |w| {
            w.write_all(b"half of a new")?;
            Err::<(), _>(io::Error::other("encoder failed"))
        })
        .unwrap_err();
        assert_eq!(err.op, "write");
        assert!(err.to_string().contains("model.bin"), "{err}");
        assert!(err.to_string().contains("encoder failed"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old model");
        assert_eq!(entries(dir.path()), ["model.bin"]);
    }

    /// Records the size of every write it is handed.
    #[derive(Default)]
    struct Sizes(Vec<usize>);

    impl Write for Sizes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn large_buffers_are_written_in_pieces_of_at_most_one_mib() {
        let big = vec![3u8; 2 * WRITE_PIECE + 5];
        let mut w = Sizes::default();
        write_in_pieces(&mut w, &big).unwrap();
        assert_eq!(w.0, [WRITE_PIECE, WRITE_PIECE, 5]);
        // Files written whole (`replace`) and through `replace_with`'s
        // buffer (one write larger than it) hold every byte.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        replace(&p, &big, Mode::Private).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), big);
        let q = dir.path().join("streamed");
        replace_with(&q, Mode::Private, |w| {
            w.write_all(&[1, 2, 3])?;
            w.write_all(&big)
        })
        .unwrap();
        assert_eq!(std::fs::read(&q).unwrap()[3..], big[..]);
        let mut staged = Staged::new(&dir.path().join("staged"), Mode::Private).unwrap();
        assert_eq!(staged.write(&big).unwrap(), WRITE_PIECE);
    }

    #[test]
    fn replace_with_returns_the_writers_value_and_streams_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        let n = replace_with(&p, Mode::Private, |w| {
            let block = [7u8; 4096];
            for _ in 0..1000 {
                w.write_all(&block)?;
            }
            Ok(1000 * block.len())
        })
        .unwrap();
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got.len(), n);
        assert!(got.iter().all(|&b| b == 7));
    }

    #[test]
    fn leftovers_of_a_crash_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        replace(&dir.path().join("a"), b"a", Mode::Public).unwrap();
        // What a crash between create and rename leaves behind.
        let torn = dir.path().join(format!("{TEMP_PREFIX}a123"));
        std::fs::write(&torn, b"half").unwrap();
        std::fs::write(dir.path().join(".hidden"), b"mine").unwrap();
        let removed = remove_leftovers(dir.path()).unwrap();
        assert_eq!(removed, [torn]);
        assert_eq!(entries(dir.path()), [".hidden", "a"]);
        assert!(remove_leftovers(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_staged_file_is_invisible_until_committed_and_gone_if_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("export.bin");
        let mut st = Staged::new(&p, Mode::Private).unwrap();
        st.write_all(b"part 1, ").unwrap();
        assert!(!p.exists());
        st.write_all(b"part 2").unwrap();
        st.commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"part 1, part 2");
        let mut st = Staged::new(&p, Mode::Private).unwrap();
        st.write_all(b"abandoned").unwrap();
        drop(st);
        assert_eq!(std::fs::read(&p).unwrap(), b"part 1, part 2");
        assert_eq!(entries(dir.path()), ["export.bin"]);
        let mut st = Staged::new(&p, Mode::Private).unwrap();
        st.write_all(b"must not clobber").unwrap();
        assert_eq!(
            st.commit_new().unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(entries(dir.path()), ["export.bin"]);
    }

    #[test]
    fn create_new_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("site.key");
        create_new(&p, b"secret", Mode::Private).unwrap();
        assert_eq!(mode_of(&p), 0o600);
        let err = create_new(&p, b"other", Mode::Private).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(err.op, "create");
        assert_eq!(std::fs::read(&p).unwrap(), b"secret");
        assert_eq!(entries(dir.path()), ["site.key"]);
    }

    #[test]
    fn install_moves_a_finished_file_across_directories() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let archive = dir.path().join("archive");
        std::fs::create_dir_all(&spool).unwrap();
        std::fs::create_dir_all(&archive).unwrap();
        let from = spool.join("u.part");
        std::fs::write(&from, b"payload").unwrap();
        install(&from, &archive.join("u.payload")).unwrap();
        assert_eq!(entries(&spool), Vec::<String>::new());
        assert_eq!(
            std::fs::read(archive.join("u.payload")).unwrap(),
            b"payload"
        );
        let err = install(&from, &archive.join("again")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(err.op, "rename");
    }

    /// What each write path costs in fsyncs, and that the deferred ones
    /// still put whole files in place.
    #[test]
    fn fsyncs_per_write_path() {
        let dir = tempfile::tempdir().unwrap();
        let count = |f: &dyn Fn()| {
            let before = fsyncs_on_this_thread();
            f();
            fsyncs_on_this_thread() - before
        };
        let p = dir.path().join("a");
        // Full durability: the data, then the directory.
        assert_eq!(count(&|| replace(&p, b"1", Mode::Private).unwrap()), 2);
        // Directory fsync deferred: the data only.
        assert_eq!(
            count(&|| replace_defer_dir_sync(&p, b"22", Mode::Private).unwrap()),
            1
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"22");
        assert_eq!(mode_of(&p), 0o600);
        // Atomic only: none.
        assert_eq!(
            count(&|| replace_atomic_only(&p, b"333", Mode::Public).unwrap()),
            0
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"333");
        assert_eq!(mode_of(&p), 0o644);
        // A move: two directory fsyncs, or none when deferred.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let q = sub.join("b");
        assert_eq!(count(&|| install(&p, &q).unwrap()), 2);
        assert_eq!(count(&|| install_defer_dir_sync(&q, &p).unwrap()), 0);
        assert_eq!(std::fs::read(&p).unwrap(), b"333");
        assert!(!q.exists());
        // The one fsync that makes the deferred names durable.
        assert_eq!(count(&|| sync_dir(dir.path()).unwrap()), 1);
        assert_eq!(entries(dir.path()), ["a", "sub"]);
        // Other threads' fsyncs are not counted here.
        let before = fsyncs_on_this_thread();
        let d = dir.path().to_path_buf();
        std::thread::spawn(move || sync_dir(&d).unwrap())
            .join()
            .unwrap();
        assert_eq!(fsyncs_on_this_thread(), before);
    }

    #[test]
    fn errors_name_the_step_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir").join("f");
        let err = replace(&missing, b"x", Mode::Public).unwrap_err();
        assert_eq!(err.op, "create a temporary file in");
        assert!(err.to_string().contains("no-such-dir"), "{err}");
        let err = sync_dir(&dir.path().join("absent")).unwrap_err();
        assert_eq!(err.op, "fsync directory");
    }
}
