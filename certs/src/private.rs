//! Owner-only state directories: the coordinator's and the agent's
//! `data_dir` hold site data (raw update payloads, signed envelopes, model
//! caches, audit logs) that other local users must not read.
//!
//! - [`create_dir_all`] creates a directory and its missing parents with
//!   mode 0700;
//! - [`file_options`] opens new files with mode 0600;
//! - [`make_private`] runs at start: it creates the directory if needed and
//!   tightens an existing one — itself, and every directory and file below
//!   it — to owner-only (group and other bits cleared), returning what it
//!   changed so the caller can log it. If a mode cannot be changed (another
//!   owner, read-only file system) it fails, naming the path and the mode
//!   found: the service must not start with its site data readable by others.
//!
//! Symbolic links below the directory are neither followed nor changed.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use crate::Error;

/// A path whose mode [`make_private`] tightened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tightened {
    /// The file or directory.
    pub path: PathBuf,
    /// Whether it is a directory.
    pub is_dir: bool,
    /// The permission bits found.
    pub from: u32,
    /// The permission bits set.
    pub to: u32,
}

/// Create `dir` and its missing parents; directories created get mode 0700.
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// Options to create a file for writing with mode 0600 (the caller adds
/// `create_new`, `create` + `truncate`, or `append`).
pub fn file_options() -> OpenOptions {
    let mut opts = OpenOptions::new();
    opts.write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts
}

/// Create `dir` (mode 0700) if it is missing, then make it and everything
/// below it owner-only: group and other permission bits are cleared on
/// every directory and regular file. Returns the paths changed, in walk
/// order. Fails with [`Error::TooOpen`] naming the path and the mode found
/// when a mode cannot be changed.
pub fn make_private(dir: &Path) -> Result<Vec<Tightened>, Error> {
    create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut changed = Vec::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(Error::Invalid {
                path: dir.to_path_buf(),
                why: "not a directory".into(),
            });
        }
        let mut stack = vec![(dir.to_path_buf(), meta)];
        while let Some((path, meta)) = stack.pop() {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                let to = mode & !0o077;
                fs::set_permissions(&path, fs::Permissions::from_mode(to)).map_err(|source| {
                    Error::TooOpen {
                        path: path.clone(),
                        mode,
                        source,
                    }
                })?;
                changed.push(Tightened {
                    path: path.clone(),
                    is_dir: meta.is_dir(),
                    from: mode,
                    to,
                });
            }
            if meta.is_dir() {
                let io = |source| Error::Io {
                    path: path.clone(),
                    source,
                };
                for entry in fs::read_dir(&path).map_err(io)? {
                    let entry = entry.map_err(io)?;
                    let child = entry.path();
                    // `symlink_metadata`: a link is not followed (chmod
                    // would change its target, which may be anywhere).
                    let meta = fs::symlink_metadata(&child).map_err(|source| Error::Io {
                        path: child.clone(),
                        source,
                    })?;
                    if meta.is_dir() || meta.is_file() {
                        stack.push((child, meta));
                    }
                }
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    #[cfg(unix)]
    fn creates_0700_and_tightens_an_existing_tree() {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let fresh = root.path().join("a/b");
        assert!(make_private(&fresh).unwrap().is_empty());
        assert_eq!(mode(&root.path().join("a")), 0o700);
        assert_eq!(mode(&fresh), 0o700);
        let mut f = file_options()
            .create_new(true)
            .open(fresh.join("f"))
            .unwrap();
        f.write_all(b"x").unwrap();
        assert_eq!(mode(&fresh.join("f")), 0o600);

        let data = root.path().join("data");
        fs::create_dir_all(data.join("updates/job/round-000001")).unwrap();
        for d in ["", "updates", "updates/job", "updates/job/round-000001"] {
            fs::set_permissions(data.join(d), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let payload = data.join("updates/job/round-000001/s.payload");
        fs::write(&payload, b"delta").unwrap();
        fs::set_permissions(&payload, fs::Permissions::from_mode(0o644)).unwrap();
        // A link to a file outside is left alone (not followed).
        let outside = root.path().join("outside");
        fs::write(&outside, b"o").unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&outside, data.join("link")).unwrap();

        let changed = make_private(&data).unwrap();
        assert_eq!(changed.len(), 5, "{changed:?}");
        assert!(
            changed
                .iter()
                .all(|t| t.from & 0o077 != 0 && t.to & 0o077 == 0)
        );
        assert_eq!(changed[0].path, data);
        assert_eq!(changed[0].from, 0o755);
        for d in ["", "updates", "updates/job", "updates/job/round-000001"] {
            assert_eq!(mode(&data.join(d)), 0o700, "{d}");
        }
        assert_eq!(mode(&payload), 0o600);
        assert_eq!(mode(&outside), 0o644);
        // Nothing left to do the second time.
        assert!(make_private(&data).unwrap().is_empty());
    }

    #[test]
    fn a_file_is_not_a_data_directory() {
        let root = tempfile::tempdir().unwrap();
        let f = root.path().join("f");
        fs::write(&f, b"x").unwrap();
        assert!(make_private(&f).is_err());
    }
}
