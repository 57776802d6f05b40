//! What one authenticated peer may make the coordinator spend: connections
//! (per identity and in all) and control messages (a rate, with a burst).
//!
//! A hospital's machine can be compromised; its kit then opens connections
//! legitimately. These limits bound what such a peer can take from the
//! others. Sans-IO where it matters: the budget takes `now`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
#[cfg(test)]
use std::time::Duration;
use std::time::Instant;

/// A token bucket: up to `burst` events at once, refilled at `per_sec`.
#[derive(Clone, Debug)]
pub(crate) struct Budget {
    burst: f64,
    per_sec: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl Budget {
    /// A full bucket of `burst`, refilled at `per_sec` events a second.
    pub(crate) fn new(burst: u32, per_sec: f64) -> Self {
        Self {
            burst: f64::from(burst),
            per_sec,
            tokens: f64::from(burst),
            last: None,
        }
    }

    /// Spend one event at `now`; `false` if the budget is exhausted (the
    /// event must be refused). Time must not go backwards (an earlier `now`
    /// refills nothing).
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        }
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Control messages a site may send: 32 at once, 4 a second after that
/// (heartbeats come every few seconds, offer answers once a round).
pub(crate) fn control_budget() -> Budget {
    Budget::new(32, 4.0)
}

/// Audit heads a site may have recorded (each is a signed, fsynced entry):
/// 16 at once, then one a second (a site sends one per upload answer, and
/// rounds of small models can come every few hundred milliseconds).
pub(crate) fn head_budget() -> Budget {
    Budget::new(16, 1.0)
}

/// Open connections, per identity and in all.
#[derive(Debug)]
pub(crate) struct Connections {
    max_total: usize,
    max_per_identity: usize,
    open: Mutex<(usize, HashMap<String, usize>)>,
}

/// One open connection, counted until dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    owner: Arc<Connections>,
    identity: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .owner
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.1.remove(&self.identity);
            }
        }
    }
}

impl Connections {
    /// At most `max_total` connections, `max_per_identity` of one identity.
    pub(crate) fn new(max_total: usize, max_per_identity: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_identity,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// Count a new connection of `identity`, or say why not.
    pub(crate) fn admit(self: &Arc<Self>, identity: &str) -> Result<Slot, String> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.0 >= self.max_total {
            return Err(format!(
                "the coordinator has {} connections open, its limit (max_connections)",
                self.max_total
            ));
        }
        let mine = open.1.get(identity).copied().unwrap_or(0);
        if mine >= self.max_per_identity {
            return Err(format!(
                "{identity} already has {mine} connections open, the limit per identity \
                 (max_connections_per_identity)"
            ));
        }
        open.0 += 1;
        *open.1.entry(identity.to_owned()).or_default() += 1;
        Ok(Slot {
            owner: self.clone(),
            identity: identity.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = Budget::new(3, 2.0);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0), "burst spent");
        assert!(!b.take(t0 + Duration::from_millis(400)));
        assert!(
            b.take(t0 + Duration::from_millis(500)),
            "one token after 0.5 s at 2/s"
        );
        assert!(!b.take(t0 + Duration::from_millis(500)));
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(3600);
        assert!((0..3).all(|_| b.take(later)));
        assert!(!b.take(later));
        // Time going backwards refills nothing.
        assert!(!b.take(t0));
    }

    #[test]
    fn a_flood_gets_the_rate_not_more() {
        let t0 = Instant::now();
        let mut b = control_budget();
        // 10 000 messages over 10 s: 32 + 4 × 10 pass.
        let passed = (0..10_000u64)
            .filter(|i| b.take(t0 + Duration::from_millis(*i)))
            .count();
        assert!(passed <= 32 + 41, "{passed}");
        assert!(passed >= 32 + 39, "{passed}");
    }

    #[test]
    fn connections_are_counted_per_identity_and_in_all() {
        let c = Connections::new(3, 2);
        let a1 = c.admit("a").unwrap();
        let _a2 = c.admit("a").unwrap();
        assert!(c.admit("a").unwrap_err().contains("per identity"));
        let _b1 = c.admit("b").unwrap();
        assert!(c.admit("c").unwrap_err().contains("max_connections"));
        drop(a1);
        let _c1 = c.admit("c").unwrap();
        assert!(c.admit("a").is_err(), "the total is full again");
    }
}
