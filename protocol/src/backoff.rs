//! Reconnection backoff: how long a client of the coordinator waits before
//! its next connection attempt after one failed or was refused.
//!
//! Pure (no clock, no randomness of its own): the caller sleeps for the
//! returned delay and supplies the jitter sample. The site agent and the
//! benchmark's simulated sites (`fedlink-loadgen`) share it, so a
//! benchmark's sites come back after a refusal the way real sites do.

use std::time::Duration;

/// Exponential reconnection backoff with jitter.
///
/// The `n`-th delay (from 0) is drawn uniformly from `[b/2, b]` with
/// `b = min(max, initial · 2ⁿ)` ("equal jitter"): sites that lost the
/// coordinator together do not come back in lockstep, and no delay is
/// shorter than half the nominal one.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// From `initial` up to `max` (`max` is raised to `initial` if smaller).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The next delay; `jitter` is a uniform sample in `[0, 1)` (clamped).
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(31));
        let nominal = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let j = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        nominal / 2 + nominal.mul_f64(0.5 * j)
    }

    /// Back to the first delay (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(250));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(1000));
        assert_eq!(b.next_delay(0.5), Duration::from_millis(1500));
        for _ in 0..40 {
            let d = b.next_delay(0.99);
            assert!(d <= Duration::from_secs(30));
        }
        assert_eq!(b.next_delay(1.0), Duration::from_secs(30));
        assert_eq!(b.next_delay(0.0), Duration::from_secs(15));
        b.reset();
        assert_eq!(b.next_delay(f64::NAN), Duration::from_millis(250));
    }
}
