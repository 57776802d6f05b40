//! What one authenticated peer may make the coordinator spend: connections
//! (per identity and in all) and control messages (a rate, with a burst).
//!
//! A hospital's machine can be compromised; its kit then opens connections
//! legitimately. These limits bound what such a peer can take from the
//! others. Sans-IO where it matters: the budget takes `now`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

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

/// What one connection may make the coordinator wait for or spend, from
/// coordinator.toml (defaults in [`crate::config`]).
#[derive(Clone, Debug)]
pub(crate) struct PeerLimits {
    /// A new connection opens its control stream and says Hello within this.
    pub(crate) hello_timeout: Duration,
    /// A control message, once its first byte arrived, arrives whole within this.
    pub(crate) control_frame_timeout: Duration,
    /// A new stream sends its first message within this.
    pub(crate) first_message_timeout: Duration,
    /// An upload holding a slot sends its next payload record within this.
    pub(crate) upload_stall_timeout: Duration,
    /// Control messages a site may send at once, and then per second
    /// (beyond: the connection is cut). Heartbeats come every few seconds,
    /// offer answers once a round.
    pub(crate) control: (u32, f64),
    /// Audit heads a site may have recorded at once, and then per second
    /// (each is a signed, fsynced entry; beyond: ignored). A site sends one
    /// per upload answer, and rounds of small models can come every few
    /// hundred milliseconds.
    pub(crate) heads: (u32, f64),
}

impl PeerLimits {
    /// The control-message budget of a new connection.
    pub(crate) fn control_budget(&self) -> Budget {
        Budget::new(self.control.0, self.control.1)
    }

    /// The audit-head budget of a new connection.
    pub(crate) fn head_budget(&self) -> Budget {
        Budget::new(self.heads.0, self.heads.1)
    }
}

/// Handshakes per source address: a token bucket per IP address, for
/// addresses QUIC has validated (a Retry round trip proves the peer can
/// receive at the address, so one host cannot spend others' budgets by
/// forging their address). Tracks at most `max_sources` addresses; when
/// that many are tracked, buckets that have refilled are forgotten first,
/// and if none has, the new address is let through (the cap on handshakes
/// in flight still holds): a flood from many real addresses must not lock
/// out a site that has not connected before.
#[derive(Debug)]
pub(crate) struct SourceRates {
    burst: u32,
    per_sec: f64,
    max_sources: usize,
    sources: HashMap<IpAddr, Budget>,
}

impl SourceRates {
    /// `burst` handshakes at once per address, then `per_sec` a second.
    pub(crate) fn new(burst: u32, per_sec: f64, max_sources: usize) -> Self {
        Self {
            burst,
            per_sec,
            max_sources,
            sources: HashMap::new(),
        }
    }

    /// May `source` start a handshake at `now`? Counts it if so.
    pub(crate) fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
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

    /// Addresses tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.sources.len()
    }
}

/// Events queued for the engine, at most. Every connection task waits for
/// room before it queues (one event each at a time), so the queue holds at
/// most this many plus one per connection waiting.
pub(crate) const ENGINE_QUEUE: usize = 1024;

/// Messages the coordinator may have queued for one site's control stream.
/// The engine sends a handful per round (offer, cancel, audit head, bye);
/// a full queue means the site has stopped reading.
pub(crate) const CONTROL_QUEUE: usize = 64;

/// What became of a message for a site's control stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Queued for the connection's writer.
    Queued,
    /// The connection has ended; nothing to do.
    Gone,
    /// The queue is full: the site is not reading. The reason to close its
    /// connection with.
    Full(String),
}

/// Queue `msg` without waiting (the engine never blocks on a site).
pub(crate) fn deliver<T>(control: &tokio::sync::mpsc::Sender<T>, msg: T) -> Delivery {
    use tokio::sync::mpsc::error::TrySendError;
    match control.try_send(msg) {
        Ok(()) => Delivery::Queued,
        Err(TrySendError::Closed(_)) => Delivery::Gone,
        Err(TrySendError::Full(_)) => Delivery::Full(format!(
            "not reading its control stream ({} messages queued)",
            control.max_capacity()
        )),
    }
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

/// Why a connection is refused by [`Connections::admit`]; the text is
/// the connection's close reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TooManyConnections {
    /// The coordinator's total (`max_connections`) is reached.
    #[error("the coordinator has {max} connections open, its limit (max_connections)")]
    Total { max: usize },
    /// This identity's share (`max_connections_per_identity`) is reached.
    #[error(
        "{identity} already has {open} connections open, the limit per identity \
         (max_connections_per_identity)"
    )]
    PerIdentity { identity: String, open: usize },
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
    pub(crate) fn admit(self: &Arc<Self>, identity: &str) -> Result<Slot, TooManyConnections> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.0 >= self.max_total {
            return Err(TooManyConnections::Total {
                max: self.max_total,
            });
        }
        let mine = open.1.get(identity).copied().unwrap_or(0);
        if mine >= self.max_per_identity {
            return Err(TooManyConnections::PerIdentity {
                identity: identity.to_owned(),
                open: mine,
            });
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
        let mut b = Budget::new(32, 4.0);
        // 10 000 messages over 10 s: 32 + 4 × 10 pass.
        let passed = (0..10_000u64)
            .filter(|i| b.take(t0 + Duration::from_millis(*i)))
            .count();
        assert!(passed <= 32 + 41, "{passed}");
        assert!(passed >= 32 + 39, "{passed}");
    }

    #[test]
    fn a_site_that_stops_reading_is_told_apart_from_one_that_is_gone() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(CONTROL_QUEUE);
        for i in 0..CONTROL_QUEUE as u32 {
            assert_eq!(deliver(&tx, i), Delivery::Queued);
        }
        let Delivery::Full(why) = deliver(&tx, 999) else {
            panic!("the 65th message must find the queue full");
        };
        assert!(why.contains("not reading") && why.contains("64"), "{why}");
        // The queue never grew past its bound; what was queued is intact.
        assert_eq!(rx.try_recv().ok(), Some(0));
        assert_eq!(
            deliver(&tx, 1000),
            Delivery::Queued,
            "room again after one read"
        );
        drop(rx);
        assert_eq!(deliver(&tx, 1), Delivery::Gone);
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
        let c = Connections::new(3, 2);
        let a1 = c.admit("a").unwrap();
        let _a2 = c.admit("a").unwrap();
        let err = c.admit("a").err().unwrap();
        assert_eq!(
            err,
            TooManyConnections::PerIdentity {
                identity: "a".into(),
                open: 2
            }
        );
        assert!(err.to_string().contains("per identity"));
        let _b1 = c.admit("b").unwrap();
        let err = c.admit("c").err().unwrap();
        assert!(matches!(err, TooManyConnections::Total { .. }), "{err:?}");
        assert!(err.to_string().contains("max_connections"));
        drop(a1);
        let _c1 = c.admit("c").unwrap();
        assert!(c.admit("a").is_err(), "the total is full again");
    }
}
