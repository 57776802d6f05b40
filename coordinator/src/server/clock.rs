//! The wall clock of the driver (the core takes times as arguments).

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds now (wall clock; only for messages and records).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
