//! A job's initial model: made from its seed or read from its file (the
//! operator's own file at start-up, a submitted job's file under
//! `init_dir`). File I/O only; the start-up and the admin API's `submit`
//! both use it.

use std::path::{Path, PathBuf};

use fedlink_aggregation::safetensors_io;
use fedlink_protocol::FlatModel;

use crate::job::{InitSource, Job};

/// Why a job's initial model could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitModelError {
    /// The architecture cannot be built or initialised.
    #[error(transparent)]
    Arch(#[from] fedlink_protocol::arch::ArchError),
    /// The file is not a regular file (a directory, a device, a FIFO).
    #[error("{}: not a regular file", path.display())]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// The file is larger than the architecture's f32 safetensors file can
    /// be.
    #[error(
        "{}: {len} bytes, more than the {max} an f32 safetensors file of this \
         architecture ({params} parameters) can need",
        path.display()
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The most it may have.
        max: u64,
        /// The architecture's number of parameters.
        params: u64,
    },
    /// Reading the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file grew past its limit while it was being read.
    #[error("{}: grew past {max} bytes while being read", path.display())]
    Grew {
        /// The file.
        path: PathBuf,
        /// The limit.
        max: u64,
    },
    /// The file is not a safetensors file of exactly the architecture's
    /// tensors.
    #[error(transparent)]
    Safetensors(#[from] fedlink_aggregation::SafetensorsError),
}

/// The initial global model of a job.
pub fn initial_model(job: &Job) -> Result<FlatModel, InitModelError> {
    match &job.init {
        InitSource::Seed(seed) => Ok(job.arch.init(*seed)?),
        InitSource::File(path) => read_initial_model(job, path),
    }
}

/// Room for the safetensors header (names, shapes, metadata) in an
/// initial-model file, beyond the f32 tensor bytes.
const INIT_HEADER_ROOM: u64 = 1 << 20;

/// Read `path` as the initial model of `job`: it must be a regular file no
/// larger than the f32 safetensors file of the job's architecture can be
/// (checked before reading: `/dev/zero`, a FIFO or a huge file is refused
/// without reading it), with exactly the architecture's tensors.
pub(crate) fn read_initial_model(job: &Job, path: &Path) -> Result<FlatModel, InitModelError> {
    use std::io::Read as _;
    let spec = job.arch.spec()?;
    let max = spec
        .num_params()
        .saturating_mul(4)
        .saturating_add(INIT_HEADER_ROOM);
    let check = |meta: &std::fs::Metadata| {
        if !meta.is_file() {
            return Err(InitModelError::NotAFile {
                path: path.to_owned(),
            });
        }
        if meta.len() > max {
            return Err(InitModelError::TooLarge {
                path: path.to_owned(),
                len: meta.len(),
                max,
                params: spec.num_params(),
            });
        }
        Ok(())
    };
    let io = |source| InitModelError::Io {
        path: path.to_owned(),
        source,
    };
    // Checked before opening (opening a FIFO would block), then again on
    // the open file (it may have been replaced in between).
    check(&std::fs::metadata(path).map_err(io)?)?;
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    check(&meta)?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(InitModelError::Grew {
            path: path.to_owned(),
            max,
        });
    }
    Ok(safetensors_io::parse_as(&path.display().to_string(), &bytes, &spec)?.model)
}

/// Resolve the initial-model file `file` of a job submitted over the admin
/// API: it must lie inside `init_dir` (coordinator.toml) after resolving
/// symbolic links and `..` — a relative `file` is taken relative to
/// `init_dir`. Nothing is read here. Jobs given in coordinator.toml (the
/// operator's own configuration) are not restricted.
pub(crate) fn resolve_submitted_init(
    init_dir: Option<&Path>,
    file: &Path,
) -> Result<PathBuf, SubmittedInitError> {
    let Some(dir) = init_dir else {
        return Err(SubmittedInitError::NoInitDir {
            file: file.to_owned(),
        });
    };
    let root = dir
        .canonicalize()
        .map_err(|source| SubmittedInitError::InitDir {
            dir: dir.to_owned(),
            source,
        })?;
    let joined = root.join(file);
    let resolved = joined
        .canonicalize()
        .map_err(|source| SubmittedInitError::Resolve {
            file: file.to_owned(),
            joined: joined.clone(),
            root: root.clone(),
            source,
        })?;
    if !resolved.starts_with(&root) || resolved == root {
        return Err(SubmittedInitError::Outside {
            file: file.to_owned(),
            resolved,
            root,
        });
    }
    Ok(resolved)
}

/// Why a submitted job's initial-model file is refused
/// ([`resolve_submitted_init`]); sent to the admin client.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SubmittedInitError {
    /// No `init_dir` is configured: submitted jobs read no files.
    #[error(
        "init = {{ file = {file:?} }}: this coordinator reads no initial-model files for \
         submitted jobs (no init_dir in coordinator.toml); use init = {{ seed = N }}, or set \
         init_dir and put the file there"
    )]
    NoInitDir { file: PathBuf },
    /// `init_dir` itself does not resolve.
    #[error("init_dir {}: {source}", dir.display())]
    InitDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// The file does not resolve inside `init_dir` (missing, unreadable).
    #[error(
        "init = {{ file = {file:?} }}: {} in init_dir {}: {source}",
        joined.display(),
        root.display()
    )]
    Resolve {
        file: PathBuf,
        joined: PathBuf,
        root: PathBuf,
        source: std::io::Error,
    },
    /// The file resolves outside `init_dir` (`..`, a symbolic link, an
    /// absolute path) or to `init_dir` itself.
    #[error(
        "init = {{ file = {file:?} }} resolves to {}, outside init_dir {}: submitted jobs may \
         read initial models only from there",
        resolved.display(),
        root.display()
    )]
    Outside {
        file: PathBuf,
        resolved: PathBuf,
        root: PathBuf,
    },
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn job() -> Job {
        Job::from_file(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/jobs/breast-cancer-logreg.toml"),
        )
        .unwrap()
    }

    #[test]
    #[cfg(unix)]
    fn initial_model_files_are_checked_before_reading() {
        let job = job();
        // Even the operator's own job file: /dev/zero is not read (it would
        // fill memory), nor a directory, nor a file larger than the
        // architecture's safetensors can be.
        let err = read_initial_model(&job, Path::new("/dev/zero")).unwrap_err();
        assert!(matches!(err, InitModelError::NotAFile { .. }), "{err:?}");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = read_initial_model(&job, dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let big = dir.path().join("big.safetensors");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(62 * 4 + INIT_HEADER_ROOM + 1)
            .unwrap();
        let err = read_initial_model(&job, &big).unwrap_err();
        assert!(
            matches!(err, InitModelError::TooLarge { len, .. } if len == 62 * 4 + INIT_HEADER_ROOM + 1),
            "{err:?}"
        );
        assert!(err.to_string().contains("more than the"), "{err}");
        let err = read_initial_model(&job, &dir.path().join("none.safetensors")).unwrap_err();
        assert!(matches!(err, InitModelError::Io { .. }), "{err:?}");
    }

    #[test]
    #[cfg(unix)]
    fn submitted_init_files_stay_inside_init_dir() {
        let root = tempfile::tempdir().unwrap();
        let init = root.path().join("init");
        std::fs::create_dir_all(init.join("sub")).unwrap();
        std::fs::write(init.join("m.safetensors"), b"x").unwrap();
        std::fs::write(root.path().join("o.safetensors"), b"x").unwrap();
        std::os::unix::fs::symlink("../o.safetensors", init.join("l")).unwrap();
        let ok = resolve_submitted_init(Some(&init), Path::new("sub/../m.safetensors")).unwrap();
        assert_eq!(ok, init.canonicalize().unwrap().join("m.safetensors"));
        for bad in [
            "../o.safetensors",
            "sub/../../o.safetensors",
            "l",
            "/etc/passwd",
            ".",
        ] {
            let err = resolve_submitted_init(Some(&init), Path::new(bad)).unwrap_err();
            assert!(
                matches!(err, SubmittedInitError::Outside { .. }),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().contains("outside init_dir"), "{bad}: {err}");
        }
        let err = resolve_submitted_init(Some(&init), Path::new("missing")).unwrap_err();
        assert!(matches!(err, SubmittedInitError::Resolve { .. }), "{err:?}");
        let err = resolve_submitted_init(None, Path::new("m.safetensors")).unwrap_err();
        assert!(
            matches!(err, SubmittedInitError::NoInitDir { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("no init_dir"), "{err}");
    }
}
