//! The free-space guard: the coordinator stops taking new work before its
//! disk is so full that the audit log cannot be written.
//!
//! Every action is recorded in the audit log before it takes effect, and an
//! action whose entry cannot be written is not performed — so a full disk
//! stops the coordinator, and a restart needs to write `coordinator.started`
//! too. Uploads (spool, archive) and connections (their audit entries) are
//! what fills the disk; below [`DiskGuard::min_free`] bytes free on the data
//! directory's file system, new connections are closed and new uploads
//! refused, each with a reason naming the cause, while what is already
//! accepted goes on. Entering and leaving that state is recorded once each
//! (`disk.low`, `disk.ok`), not once per refusal.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A change of state worth one audit entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Free space fell below the minimum.
    Low {
        /// Bytes free.
        free: u64,
    },
    /// Free space is back above the minimum.
    Ok {
        /// Bytes free.
        free: u64,
    },
}

/// Whether new work may start, given the free space; remembers the last
/// state so that only changes are reported.
#[derive(Debug)]
pub(crate) struct DiskGuard {
    path: PathBuf,
    min_free: u64,
    low: Mutex<bool>,
}

impl DiskGuard {
    /// Guard the file system of `path`, keeping `min_free` bytes free.
    pub(crate) fn new(path: &Path, min_free: u64) -> Self {
        Self {
            path: path.to_owned(),
            min_free,
            low: Mutex::new(false),
        }
    }

    /// The free space kept, bytes.
    pub(crate) fn min_free(&self) -> u64 {
        self.min_free
    }

    /// Bytes free for an unprivileged writer on the data directory's file
    /// system.
    fn free_bytes(&self) -> std::io::Result<u64> {
        let st = rustix::fs::statvfs(&self.path)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// May new work start now? `Err` names the reason. The transition, if
    /// this check changed the state, is returned for the caller to record.
    pub(crate) fn check(&self) -> (Result<(), LowOnDisk>, Option<Transition>) {
        match self.free_bytes() {
            Ok(free) => self.observe(free),
            // Cannot tell: do not refuse on a failing statvfs alone; the
            // audit log's own write errors still stop what must stop.
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read the free disk space");
                (Ok(()), None)
            }
        }
    }

    /// [`check`](Self::check) with the free space given (tests).
    pub(crate) fn observe(&self, free: u64) -> (Result<(), LowOnDisk>, Option<Transition>) {
        let now_low = free < self.min_free;
        let mut low = self
            .low
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let transition = match (*low, now_low) {
            (false, true) => Some(Transition::Low { free }),
            (true, false) => Some(Transition::Ok { free }),
            _ => None,
        };
        *low = now_low;
        let verdict = if now_low {
            Err(LowOnDisk {
                free,
                min_free: self.min_free,
            })
        } else {
            Ok(())
        };
        (verdict, transition)
    }
}

/// Why new work (a connection, an upload) is refused: the data
/// directory's file system has less free space than is kept for the audit
/// log. Sent to the site (close reason, upload refusal).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the coordinator is low on disk space ({} MiB free, {} MiB kept for its audit \
     log); it takes no new work until space is freed",
    free >> 20,
    min_free >> 20
)]
pub(crate) struct LowOnDisk {
    /// Bytes free.
    pub(crate) free: u64,
    /// Bytes kept free for the audit log.
    pub(crate) min_free: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_below_the_minimum_and_reports_each_change_once() {
        let g = DiskGuard::new(Path::new("/"), 100 << 20);
        assert_eq!(g.observe(200 << 20), (Ok(()), None));
        let (v, t) = g.observe(50 << 20);
        let err = v.unwrap_err();
        assert_eq!(
            err,
            LowOnDisk {
                free: 50 << 20,
                min_free: 100 << 20
            }
        );
        assert!(
            err.to_string().contains("50 MiB free, 100 MiB kept"),
            "{err}"
        );
        assert_eq!(t, Some(Transition::Low { free: 50 << 20 }));
        // Still low: refused, but no second report.
        let (v, t) = g.observe(40 << 20);
        assert!(v.is_err());
        assert_eq!(t, None);
        let (v, t) = g.observe(300 << 20);
        assert!(v.is_ok());
        assert_eq!(t, Some(Transition::Ok { free: 300 << 20 }));
    }

    #[test]
    fn reads_the_real_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let g = DiskGuard::new(dir.path(), 0);
        assert!(g.free_bytes().unwrap() > 0);
        assert_eq!(g.check().0, Ok(()));
        let g = DiskGuard::new(dir.path(), u64::MAX);
        assert!(g.check().0.is_err());
    }
}
