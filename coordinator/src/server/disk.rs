//! The free-space guard's driver side: reads the free space of the data
//! directory's file system (`statvfs`) and hands it to the core's
//! [`DiskState`], which decides whether new work may start and whether the
//! change is recorded (`disk.low`, `disk.ok`).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::core::disk::{DiskState, Observed};

/// The free-space guard of one file system, shared by the connection tasks.
#[derive(Debug)]
pub(crate) struct DiskGuard {
    path: PathBuf,
    state: Mutex<DiskState>,
}

impl DiskGuard {
    /// Guard the file system of `path`, keeping `min_free` bytes free.
    pub(crate) fn new(path: &Path, min_free: u64) -> Self {
        Self {
            path: path.to_owned(),
            state: Mutex::new(DiskState::new(min_free)),
        }
    }

    /// Bytes free for an unprivileged writer on the data directory's file
    /// system.
    fn free_bytes(&self) -> std::io::Result<u64> {
        let st = rustix::fs::statvfs(&self.path)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// May new work start now? The verdict, and the audit entry to append
    /// if this reading changed the state (`actor`: the coordinator).
    pub(crate) fn check(&self, actor: &str) -> Observed {
        match self.free_bytes() {
            Ok(free) => {
                let observed = self
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .observe(free, actor);
                if let Some(crate::core::Effect::AppendAudit { event, .. }) = &observed.audit {
                    tracing::warn!(event = %event.kind(), free_mib = free >> 20, "disk space");
                }
                observed
            }
            // Cannot tell: do not refuse on a failing statvfs alone; the
            // audit log's own write errors still stop what must stop.
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read the free disk space");
                Observed {
                    verdict: Ok(()),
                    audit: None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlink_audit::EventKind;

    #[test]
    fn reads_the_real_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let g = DiskGuard::new(dir.path(), 0);
        assert!(g.free_bytes().unwrap() > 0);
        assert_eq!(g.check("coord").verdict, Ok(()));
        let g = DiskGuard::new(dir.path(), u64::MAX);
        let o = g.check("coord");
        assert!(o.verdict.is_err());
        assert!(
            matches!(
                o.audit,
                Some(crate::core::Effect::AppendAudit { ref event, .. })
                    if event.kind() == EventKind::DiskLow
            ),
            "{:?}",
            o.audit
        );
        assert_eq!(g.check("coord").audit, None, "recorded once");
    }
}
