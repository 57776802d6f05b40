//! What one authenticated peer may make the coordinator spend, decided:
//! control messages and handshakes (a rate, with a burst; time is an
//! argument) and open connections (per identity and in all).
//!
//! A hospital's machine can be compromised; its kit then opens connections
//! legitimately. These limits bound what such a peer can take from the
//! others. The driver holds them (behind a lock where tasks share them),
//! reads the clock and closes or refuses what they refuse
//! (`crate::server::limits`).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A token bucket: up to `burst` events at once, refilled at `per_sec`.
#[derive(Clone, Debug)]
pub struct Budget {
    burst: f64,
    per_sec: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl Budget {
    /// A full bucket of `burst`, refilled at `per_sec` events a second.
    pub fn new(burst: u32, per_sec: f64) -> Self {
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
    pub fn take(&mut self, now: Instant) -> bool {
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

/// Handshakes per source (the driver's key: an IP address), for addresses
/// the transport has validated (a Retry round trip proves the peer can
/// receive at the address, so one host cannot spend others' budgets by
/// forging their address). Tracks at most `max_sources` sources; when
/// that many are tracked, buckets that have refilled are forgotten first,
/// and if none has, the new source is let through (the cap on handshakes
/// in flight still holds): a flood from many real addresses must not lock
/// out a site that has not connected before.
#[derive(Debug)]
pub struct SourceRates<K> {
    burst: u32,
    per_sec: f64,
    max_sources: usize,
    sources: HashMap<K, Budget>,
}

impl<K: Hash + Eq> SourceRates<K> {
    /// `burst` handshakes at once per source, then `per_sec` a second.
    pub fn new(burst: u32, per_sec: f64, max_sources: usize) -> Self {
        Self {
            burst,
            per_sec,
            max_sources,
            sources: HashMap::new(),
        }
    }

    /// May `source` start a handshake at `now`? Counts it if so.
    pub fn allow(&mut self, source: K, now: Instant) -> bool {
        if let Some(b) = self.sources.get_mut(&source) {
            return b.take(now);
        }
        if self.sources.len() >= self.max_sources {
            let full_after = Duration::from_secs_f64(f64::from(self.burst) / self.per_sec);
            self.sources.retain(|_, b| {
                b.last
                    .is_none_or(|last| now.saturating_duration_since(last) < full_after)
            });
            if self.sources.len() >= self.max_sources {
                return true;
            }
        }
        let mut b = Budget::new(self.burst, self.per_sec);
        let ok = b.take(now);
        self.sources.insert(source, b);
        ok
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }
}

/// Why a connection is refused by [`OpenConnections::admit`]; the text is
/// the connection's close reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TooManyConnections {
    /// The coordinator's total (`max_connections`) is reached.
    #[error("the coordinator has {max} connections open, its limit (max_connections)")]
    Total {
        /// The limit.
        max: usize,
    },
    /// This identity's share (`max_connections_per_identity`) is reached.
    #[error(
        "{identity} already has {open} connections open, the limit per identity \
         (max_connections_per_identity)"
    )]
    PerIdentity {
        /// The identity (its URI).
        identity: String,
        /// Its connections open.
        open: usize,
    },
}

/// Open connections, per identity and in all: the count the caps decide
/// on. Each [`admit`](Self::admit)ted connection is
/// [`release`](Self::release)d once when it ends.
#[derive(Debug)]
pub struct OpenConnections {
    max_total: usize,
    max_per_identity: usize,
    total: usize,
    per_identity: HashMap<String, usize>,
}

impl OpenConnections {
    /// At most `max_total` connections, `max_per_identity` of one identity.
    pub fn new(max_total: usize, max_per_identity: usize) -> Self {
        Self {
            max_total,
            max_per_identity,
            total: 0,
            per_identity: HashMap::new(),
        }
    }

    /// Count a new connection of `identity`, or say why not (then nothing
    /// is counted).
    pub fn admit(&mut self, identity: &str) -> Result<(), TooManyConnections> {
        if self.total >= self.max_total {
            return Err(TooManyConnections::Total {
                max: self.max_total,
            });
        }
        let mine = self.per_identity.get(identity).copied().unwrap_or(0);
        if mine >= self.max_per_identity {
            return Err(TooManyConnections::PerIdentity {
                identity: identity.to_owned(),
                open: mine,
            });
        }
        self.total += 1;
        *self.per_identity.entry(identity.to_owned()).or_default() += 1;
        Ok(())
    }

    /// A connection of `identity` admitted before has ended.
    pub fn release(&mut self, identity: &str) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.per_identity.get_mut(identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_identity.remove(identity);
            }
        }
    }

    /// Connections open now, in all.
    pub fn open(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

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
        let mut b = Budget::new(32, 4.0);
        // 10 000 messages over 10 s: 32 + 4 × 10 pass.
        let passed = (0..10_000u64)
            .filter(|i| b.take(t0 + Duration::from_millis(*i)))
            .count();
        assert!(passed <= 32 + 41, "{passed}");
        assert!(passed >= 32 + 39, "{passed}");
    }

    #[test]
    fn handshakes_are_rate_limited_per_source_address() {
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut r = SourceRates::new(4, 1.0, 16);
        assert!((0..4).all(|_| r.allow(a, t0)), "the burst passes");
        assert!(!r.allow(a, t0), "then the rate");
        assert!(r.allow(b, t0), "another address has its own budget");
        assert!(r.allow(a, t0 + Duration::from_secs(1)), "refilled at 1/s");
        assert!(!r.allow(a, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn the_tracked_sources_are_bounded_and_idle_ones_forgotten_first() {
        let t0 = Instant::now();
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        let mut r = SourceRates::new(2, 1.0, 8);
        for i in 0..8 {
            assert!(r.allow(ip(i), t0));
        }
        assert_eq!(r.tracked(), 8);
        // Full, nothing refilled yet: a new address passes untracked.
        assert!(r.allow(ip(100), t0));
        assert_eq!(r.tracked(), 8);
        // An address that keeps hammering stays limited meanwhile.
        assert!(r.allow(ip(0), t0));
        assert!(!r.allow(ip(0), t0));
        // After the buckets refill (2 s at 1/s), idle addresses are dropped
        // to make room; a busy one stays.
        let later = t0 + Duration::from_secs(3);
        assert!(r.allow(ip(0), later));
        assert!(r.allow(ip(200), later));
        assert_eq!(r.tracked(), 2, "only the busy address and the new one");
        // 10 000 new addresses: the map never grows past its bound.
        for i in 0..10_000 {
            r.allow(ip(1000 + i), later);
        }
        assert!(r.tracked() <= 8);
    }

    #[test]
    fn connections_are_counted_per_identity_and_in_all() {
        let mut c = OpenConnections::new(3, 2);
        c.admit("a").unwrap();
        c.admit("a").unwrap();
        let err = c.admit("a").unwrap_err();
        assert_eq!(
            err,
            TooManyConnections::PerIdentity {
                identity: "a".into(),
                open: 2
            }
        );
        assert!(err.to_string().contains("per identity"));
        c.admit("b").unwrap();
        let err = c.admit("c").unwrap_err();
        assert!(matches!(err, TooManyConnections::Total { .. }), "{err:?}");
        assert!(err.to_string().contains("max_connections"));
        assert_eq!(c.open(), 3, "a refusal counts nothing");
        c.release("a");
        c.admit("c").unwrap();
        assert!(c.admit("a").is_err(), "the total is full again");
        // Released down to nothing, an identity is forgotten; a release
        // too many does not underflow.
        for id in ["a", "b", "c", "c"] {
            c.release(id);
        }
        assert_eq!(c.open(), 0);
        assert!(c.per_identity.is_empty());
        c.admit("a").unwrap();
        c.admit("a").unwrap();
        assert!(c.admit("a").is_err());
    }
}
