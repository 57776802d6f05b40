//! File helpers: secrets with mode 0600, never overwrite, atomic replace,
//! permission checks, TOML and PEM reading with bounded sizes.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use rand::RngCore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// Largest PEM or TOML file we read (1 MiB): these files are small, and
/// anything larger is a mistake or an attack on memory.
pub(crate) const MAX_FILE_LEN: u64 = 1 << 20;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn durable_err(e: fedlink_durable::Error) -> Error {
    if e.kind() == std::io::ErrorKind::AlreadyExists {
        Error::AlreadyExists { path: e.path }
    } else {
        Error::Io {
            path: e.path,
            source: e.source,
        }
    }
}

/// Create `path` (which must not exist) with `mode` on unix, write `data`,
/// fsync the file and its directory (`fedlink_durable::create_new`).
fn write_new(path: &Path, data: &[u8], mode: fedlink_durable::Mode) -> Result<(), Error> {
    fedlink_durable::create_new(path, data, mode).map_err(durable_err)
}

/// Write a secret (private key) to a new file with mode 0600; refuse to
/// overwrite.
pub(crate) fn write_secret(path: &Path, data: &[u8]) -> Result<(), Error> {
    write_new(path, data, fedlink_durable::Mode::Private)
}

/// Write a public file (certificate, TOML) to a new file with mode 0644;
/// refuse to overwrite.
pub(crate) fn write_public(path: &Path, data: &[u8]) -> Result<(), Error> {
    write_new(path, data, fedlink_durable::Mode::Public)
}

/// Replace `path` atomically and durably with `data`
/// (`fedlink_durable::replace`). For the CA's registers, which are meant to
/// change.
pub(crate) fn replace_public(path: &Path, data: &[u8]) -> Result<(), Error> {
    fedlink_durable::replace(path, data, fedlink_durable::Mode::Public).map_err(durable_err)
}

/// Rename a finished file or directory into place and fsync the directory
/// (`fedlink_durable::install`).
pub(crate) fn install(from: &Path, to: &Path) -> Result<(), Error> {
    fedlink_durable::install(from, to).map_err(durable_err)
}

/// A fresh, unused sibling path: `.<file name>.<tag>-<random>`.
pub(crate) fn sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.{tag}-{:016x}",
        rand::rngs::OsRng.next_u64()
    ))
}

/// Create a directory for secrets (mode 0700 on unix). Parents are created
/// with default permissions. An existing *empty* directory is accepted (and
/// tightened); a non-empty one is refused.
pub(crate) fn create_private_dir(path: &Path) -> Result<(), Error> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let mut builder = fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    match builder.create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mut entries = fs::read_dir(path).map_err(io_err(path))?;
            if entries.next().is_some() {
                return Err(Error::AlreadyExists {
                    path: path.to_path_buf(),
                });
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(path, fs::Permissions::from_mode(0o700))
                    .map_err(io_err(path))?;
            }
            Ok(())
        }
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Read a small file fully, refusing anything larger than [`MAX_FILE_LEN`].
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>, Error> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut data = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut data)
        .map_err(io_err(path))?;
    if data.len() as u64 > MAX_FILE_LEN {
        return Err(Error::Invalid {
            path: path.to_path_buf(),
            why: format!("file larger than {MAX_FILE_LEN} bytes"),
        });
    }
    Ok(data)
}

pub(crate) fn read_string(path: &Path) -> Result<String, Error> {
    String::from_utf8(read_bounded(path)?).map_err(|_| Error::Invalid {
        path: path.to_path_buf(),
        why: "not UTF-8".into(),
    })
}

pub(crate) fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = read_string(path)?;
    toml::from_str(&text).map_err(|e| Error::Invalid {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

pub(crate) fn to_toml<T: serde::Serialize>(value: &T, path: &Path) -> Result<String, Error> {
    toml::to_string_pretty(value).map_err(|e| Error::Invalid {
        path: path.to_path_buf(),
        why: format!("cannot serialise: {e}"),
    })
}

/// Refuse a private key file that group or others may read or write.
pub(crate) fn check_private_mode(path: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(path).map_err(io_err(path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::KeyFileTooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// All certificates in a PEM file, in order (at least one).
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let data = read_bounded(path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid {
            path: path.to_path_buf(),
            why: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(Error::Invalid {
            path: path.to_path_buf(),
            why: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Exactly one certificate from a PEM file.
pub(crate) fn read_one_cert(path: &Path) -> Result<CertificateDer<'static>, Error> {
    let mut certs = read_certs(path)?;
    if certs.len() != 1 {
        return Err(Error::Invalid {
            path: path.to_path_buf(),
            why: format!("expected exactly one certificate, found {}", certs.len()),
        });
    }
    certs.pop().ok_or_else(|| Error::Invalid {
        path: path.to_path_buf(),
        why: "no certificate".into(),
    })
}

/// The TLS private key from a PEM file (mode checked first).
pub(crate) fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    check_private_mode(path)?;
    let data = read_bounded(path)?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| Error::Invalid {
        path: path.to_path_buf(),
        why: format!("bad private key PEM: {e}"),
    })
}

/// The lock that serialises changes to a CA directory's registers. Held
/// while `issued.toml`, `sites.toml` and `revoked.toml` are updated.
#[derive(Debug)]
pub(crate) struct DirLock {
    path: PathBuf,
}

impl DirLock {
    pub(crate) fn acquire(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(".lock");
        match write_secret(&path, std::process::id().to_string().as_bytes()) {
            Ok(()) => Ok(Self { path }),
            Err(Error::AlreadyExists { .. }) => Err(Error::Locked { path }),
            Err(e) => Err(e),
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(unix)]
    fn secret_mode_and_no_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        write_secret(&p, b"secret").unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        check_private_mode(&p).unwrap();
        let err = write_secret(&p, b"other").unwrap_err();
        assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
        assert_eq!(fs::read(&p).unwrap(), b"secret");

        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            check_private_mode(&p).unwrap_err(),
            Error::KeyFileTooOpen { mode: 0o640, .. }
        ));
    }

    #[test]
    fn replace_is_atomic_and_bounded_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.toml");
        replace_public(&p, b"a = 1\n").unwrap();
        replace_public(&p, b"a = 2\n").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"a = 2\n");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file left"
        );
        let big = dir.path().join("big");
        fs::write(&big, vec![b'x'; (MAX_FILE_LEN + 1) as usize]).unwrap();
        assert!(matches!(
            read_bounded(&big).unwrap_err(),
            Error::Invalid { .. }
        ));
    }

    #[test]
    fn private_dir_refuses_non_empty() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        create_private_dir(&d).unwrap();
        create_private_dir(&d).unwrap();
        fs::write(d.join("x"), b"").unwrap();
        assert!(matches!(
            create_private_dir(&d).unwrap_err(),
            Error::AlreadyExists { .. }
        ));
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let l = DirLock::acquire(dir.path()).unwrap();
        assert!(matches!(
            DirLock::acquire(dir.path()).unwrap_err(),
            Error::Locked { .. }
        ));
        drop(l);
        DirLock::acquire(dir.path()).unwrap();
    }
}
