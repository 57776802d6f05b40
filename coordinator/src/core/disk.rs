//! The free-space guard, decided: the coordinator stops taking new work
//! before its disk is so full that the audit log cannot be written.
//!
//! Every action is recorded in the audit log before it takes effect, and an
//! action whose entry cannot be written is not performed — so a full disk
//! stops the coordinator, and a restart needs to write `coordinator.started`
//! too. Uploads (spool, archive) and connections (their audit entries) are
//! what fills the disk; below [`DiskState::min_free`] bytes free on the
//! data directory's file system, new connections are closed and new uploads
//! refused, each with a reason naming the cause ([`LowOnDisk`]), while what
//! is already accepted goes on. Entering and leaving that state is recorded
//! once each (`disk.low`, `disk.ok`: an [`Effect::AppendAudit`] from
//! [`DiskState::observe`]), not once per refusal.
//!
//! The driver reads the free space (`statvfs`, `crate::server`) and
//! appends the entry.

use fedlink_audit::CoordEvent;
use fedlink_audit::coord::DiskSpace;

use super::Effect;

/// Whether new work may start, given the free space; remembers the last
/// state so that only changes are recorded.
#[derive(Clone, Debug)]
pub struct DiskState {
    min_free: u64,
    low: bool,
}

/// What one reading of the free space decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// May new work start? `Err` names the reason.
    pub verdict: Result<(), LowOnDisk>,
    /// The `disk.low` or `disk.ok` entry to append, when this reading
    /// changed the state.
    pub audit: Option<Effect>,
}

impl DiskState {
    /// Keep `min_free` bytes free; the disk counts as not low until a
    /// reading says otherwise.
    pub fn new(min_free: u64) -> Self {
        Self {
            min_free,
            low: false,
        }
    }

    /// The free space kept, bytes.
    pub fn min_free(&self) -> u64 {
        self.min_free
    }

    /// Whether the last reading was below the minimum.
    pub fn is_low(&self) -> bool {
        self.low
    }

    /// `free` bytes are free now: may new work start, and is the change
    /// (if any) to be recorded (by `actor`, the coordinator's identity)?
    pub fn observe(&mut self, free: u64, actor: &str) -> Observed {
        let now_low = free < self.min_free;
        let space = DiskSpace {
            free_bytes: free,
            min_free_bytes: self.min_free,
        };
        let event = match (self.low, now_low) {
            (false, true) => Some(CoordEvent::DiskLow(space)),
            (true, false) => Some(CoordEvent::DiskOk(space)),
            _ => None,
        };
        self.low = now_low;
        let audit = event.map(|event| Effect::AppendAudit {
            actor: actor.to_owned(),
            event,
        });
        let verdict = if now_low {
            Err(LowOnDisk {
                free,
                min_free: self.min_free,
            })
        } else {
            Ok(())
        };
        Observed { verdict, audit }
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
pub struct LowOnDisk {
    /// Bytes free.
    pub free: u64,
    /// Bytes kept free for the audit log.
    pub min_free: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlink_audit::EventKind;

    fn entry(kind: EventKind, free: u64) -> Option<Effect> {
        let Some(Effect::AppendAudit { actor, event }) = entry_of(kind, free) else {
            return None;
        };
        // The bytes the entry's details are written with.
        assert_eq!(
            serde_json::to_string(&event.details().unwrap()).unwrap(),
            format!(
                "{{\"free_bytes\":{free},\"min_free_bytes\":{}}}",
                100u64 << 20
            )
        );
        Some(Effect::AppendAudit { actor, event })
    }

    fn entry_of(kind: EventKind, free: u64) -> Option<Effect> {
        let space = DiskSpace {
            free_bytes: free,
            min_free_bytes: 100 << 20,
        };
        let event = match kind {
            EventKind::DiskLow => CoordEvent::DiskLow(space),
            EventKind::DiskOk => CoordEvent::DiskOk(space),
            _ => return None,
        };
        Some(Effect::AppendAudit {
            actor: "coord".into(),
            event,
        })
    }

    #[test]
    fn refuses_below_the_minimum_and_records_each_change_once() {
        let mut g = DiskState::new(100 << 20);
        assert_eq!(
            g.observe(200 << 20, "coord"),
            Observed {
                verdict: Ok(()),
                audit: None
            }
        );
        let o = g.observe(50 << 20, "coord");
        let err = o.verdict.unwrap_err();
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
        assert_eq!(o.audit, entry(EventKind::DiskLow, 50 << 20));
        assert!(g.is_low());
        // Still low: refused, but no second entry.
        let o = g.observe(40 << 20, "coord");
        assert!(o.verdict.is_err());
        assert_eq!(o.audit, None);
        let o = g.observe(300 << 20, "coord");
        assert!(o.verdict.is_ok());
        assert_eq!(o.audit, entry(EventKind::DiskOk, 300 << 20));
        assert!(!g.is_low());
        // Still fine: nothing to record.
        assert_eq!(g.observe(300 << 20, "coord").audit, None);
    }

    #[test]
    fn exactly_the_minimum_is_enough() {
        let mut g = DiskState::new(100);
        assert_eq!(g.observe(100, "coord").verdict, Ok(()));
        assert!(g.observe(99, "coord").verdict.is_err());
        assert_eq!(g.min_free(), 100);
    }
}
