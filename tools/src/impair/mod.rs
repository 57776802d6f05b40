//! The impairment proxy: a sans-IO [`Link`] that decides, packet by packet,
//! when (or whether) a packet comes out of one direction of a relay, and the
//! tokio relays ([`ImpairProxy`]) that apply it to UDP datagrams and TCP
//! byte streams.
//!
//! ```text
//!            ┌──────────────── ImpairProxy (one port, UDP and TCP) ───────────────┐
//!  client ──▶│ recv ─▶ Link(up).on_packet(now, len) ─▶ Deliver(t) ─▶ queue ─▶ send │──▶ target
//!  client ◀──│ send ◀─ queue ◀─ Deliver(t) ◀─ Link(down).on_packet(now, len) ◀─ recv│◀── target
//!            └────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! What each knob does:
//!
//! | knob | UDP datagram | TCP bytes (the proxy terminates TCP on each side) |
//! |---|---|---|
//! | `delay` | added one way | added one way |
//! | `jitter` | uniform extra `0..jitter`; may reorder | uniform extra, order kept |
//! | `loss` | datagram dropped | the segment is held back one extra round trip (`2 × delay`, at least 1 ms), and everything behind it waits — what a fast retransmit costs |
//! | `reorder` | datagram held back `delay + jitter + 1 ms` more, so later ones overtake it | ignored |
//! | `rate` | serialised at the rate; tail drop once the queue holds more than `queue_limit` of sending time | serialised at the rate (the relay's bounded buffer pushes back on the sender) |
//! | drop all UDP | every datagram dropped, both ways | — |
//! | cut | existing flows black-holed for good (new client ports get through) | every open relayed connection closed |
//!
//! Every random choice comes from a ChaCha8 generator seeded from the
//! configured seed, the direction and the flow number: for the same seed and
//! the same sequence of packets, the same packets are lost.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use fedlink_tools::impair::{Impairment, Link, Verdict};
//!
//! let cfg = Impairment { delay: Duration::from_millis(20), ..Impairment::default() };
//! let mut link = Link::datagrams(7);
//! let now = Instant::now();
//! assert_eq!(link.on_packet(&cfg, now, 1200), Verdict::Deliver(now + Duration::from_millis(20)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod relay;

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use relay::{ImpairError, ImpairHandle, ImpairProxy, ProxyConfig, Stats};

/// How one direction of a relay is impaired. The default is a perfect link
/// (no delay, no loss, no rate limit).
#[derive(Debug, Clone, PartialEq)]
pub struct Impairment {
    /// One-way delay added to every packet.
    pub delay: Duration,
    /// Uniform extra delay in `0..jitter`.
    pub jitter: Duration,
    /// Probability in `[0, 1]` that a datagram is lost (UDP) or held back by
    /// a retransmission (TCP).
    pub loss: f64,
    /// Probability in `[0, 1]` that a datagram is held back so that later
    /// ones overtake it (UDP only).
    pub reorder: f64,
    /// Rate limit in bytes per second; `None` for none.
    pub rate: Option<u64>,
    /// With a rate limit: how much sending time may queue up before
    /// datagrams are tail-dropped (a router buffer).
    pub queue_limit: Duration,
}

impl Default for Impairment {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            reorder: 0.0,
            rate: None,
            queue_limit: Duration::from_millis(100),
        }
    }
}

impl Impairment {
    /// Check the probabilities and the rate.
    pub fn validate(&self) -> Result<(), ImpairError> {
        for (name, p) in [("loss", self.loss), ("reorder", self.reorder)] {
            if !(0.0..=1.0).contains(&p) {
                return Err(ImpairError::Config(format!(
                    "{name} must be a probability in [0, 1], got {p}"
                )));
            }
        }
        if self.rate == Some(0) {
            return Err(ImpairError::Config(
                "rate must be positive (leave it out for no limit)".into(),
            ));
        }
        Ok(())
    }

    /// Time to put `len` bytes on the wire at the rate limit.
    fn serialisation(&self, len: usize) -> Duration {
        match self.rate {
            Some(rate) if rate > 0 => {
                let nanos = (len as u128).saturating_mul(1_000_000_000) / u128::from(rate);
                Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
            }
            _ => Duration::ZERO,
        }
    }
}

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it at this time.
    Deliver(Instant),
    /// It is lost.
    Drop(DropReason),
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Random loss.
    Loss,
    /// The rate limiter's queue was full.
    QueueFull,
}

/// One direction of a relay, sans IO: given the time a packet arrived and
/// its length, when it leaves (or that it is lost). Time must only move
/// forward between calls.
#[derive(Debug)]
pub struct Link {
    rng: ChaCha8Rng,
    /// When the rate limiter has finished sending what it holds.
    free_at: Option<Instant>,
    /// Latest delivery time handed out (byte streams keep their order).
    last_delivery: Option<Instant>,
    ordered: bool,
}

impl Link {
    /// A link for datagrams (UDP): packets may be lost and reordered.
    pub fn datagrams(seed: u64) -> Self {
        Self::new(seed, false)
    }

    /// A link for a byte stream (TCP): nothing is lost or reordered; loss
    /// shows as a retransmission stall.
    pub fn stream(seed: u64) -> Self {
        Self::new(seed, true)
    }

    fn new(seed: u64, ordered: bool) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            free_at: None,
            last_delivery: None,
            ordered,
        }
    }

    /// When the rate limiter will have sent everything handed to it so far
    /// (`None` before the first packet or without a rate limit).
    pub fn busy_until(&self) -> Option<Instant> {
        self.free_at
    }

    /// The fate of a `len`-byte packet that arrived at `now`.
    pub fn on_packet(&mut self, cfg: &Impairment, now: Instant, len: usize) -> Verdict {
        // Draw every random number for every packet, whatever the settings,
        // so that one packet's fate depends only on the seed and its index.
        let lost = self.rng.r#gen::<f64>() < cfg.loss;
        let reordered = self.rng.r#gen::<f64>() < cfg.reorder;
        let jitter = cfg.jitter.mul_f64(self.rng.r#gen::<f64>());
        if lost && !self.ordered {
            return Verdict::Drop(DropReason::Loss);
        }
        let mut leaves = now;
        if cfg.rate.is_some() {
            let start = self.free_at.map_or(now, |f| f.max(now));
            if !self.ordered && start.saturating_duration_since(now) > cfg.queue_limit {
                return Verdict::Drop(DropReason::QueueFull);
            }
            leaves = start + cfg.serialisation(len);
            self.free_at = Some(leaves);
        }
        let mut at = leaves + cfg.delay + jitter;
        if self.ordered {
            if lost {
                at += (cfg.delay * 2).max(Duration::from_millis(1));
            }
            if let Some(last) = self.last_delivery {
                at = at.max(last);
            }
            self.last_delivery = Some(at);
        } else if reordered {
            at += cfg.delay + cfg.jitter + Duration::from_millis(1);
        }
        Verdict::Deliver(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_perfect_link_delivers_at_once() {
        let mut l = Link::datagrams(1);
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(
                l.on_packet(&Impairment::default(), now, 1500),
                Verdict::Deliver(now)
            );
        }
    }

    #[test]
    fn seeded_loss_is_reproducible_and_near_its_rate() {
        let cfg = Impairment {
            loss: 0.1,
            ..Impairment::default()
        };
        let now = Instant::now();
        let fates = |seed| {
            let mut l = Link::datagrams(seed);
            (0..10_000)
                .map(|_| l.on_packet(&cfg, now, 100) == Verdict::Drop(DropReason::Loss))
                .collect::<Vec<_>>()
        };
        let a = fates(42);
        assert_eq!(a, fates(42), "same seed, same losses");
        assert_ne!(a, fates(43), "another seed, other losses");
        let lost = a.iter().filter(|l| **l).count();
        // 10 000 draws at p = 0.1: mean 1000, sd 30.
        assert!((850..=1150).contains(&lost), "{lost} lost");
    }

    #[test]
    fn delay_and_jitter_stay_in_bounds() {
        let cfg = Impairment {
            delay: ms(20),
            jitter: ms(5),
            ..Impairment::default()
        };
        let mut l = Link::datagrams(3);
        let now = Instant::now();
        let mut spread = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let Verdict::Deliver(at) = l.on_packet(&cfg, now, 100) else {
                panic!("nothing is lost without loss");
            };
            let d = at - now;
            assert!(d >= ms(20) && d < ms(25), "{d:?}");
            spread.insert(d.as_micros() / 500);
        }
        assert!(spread.len() >= 8, "jitter spreads deliveries: {spread:?}");
    }

    #[test]
    fn the_rate_limit_serialises_and_the_queue_tail_drops() {
        // 1 MB/s: a 1000-byte datagram takes 1 ms on the wire.
        let cfg = Impairment {
            rate: Some(1_000_000),
            queue_limit: ms(10),
            ..Impairment::default()
        };
        let mut l = Link::datagrams(5);
        let now = Instant::now();
        let mut delivered = Vec::new();
        let mut dropped = 0;
        for _ in 0..50 {
            match l.on_packet(&cfg, now, 1000) {
                Verdict::Deliver(at) => delivered.push(at - now),
                Verdict::Drop(DropReason::QueueFull) => dropped += 1,
                Verdict::Drop(DropReason::Loss) => panic!("no random loss configured"),
            }
        }
        // Packets leave 1 ms apart; the 12th would wait more than 10 ms.
        assert_eq!(delivered.len(), 11, "{delivered:?}");
        assert_eq!(dropped, 39);
        for (i, d) in delivered.iter().enumerate() {
            assert_eq!(*d, ms(i as u64 + 1));
        }
        // Once the queue has drained, packets flow again.
        assert_eq!(
            l.on_packet(&cfg, now + ms(100), 1000),
            Verdict::Deliver(now + ms(101))
        );
    }

    #[test]
    fn reordering_lets_later_datagrams_overtake() {
        let cfg = Impairment {
            delay: ms(10),
            reorder: 0.2,
            ..Impairment::default()
        };
        let mut l = Link::datagrams(9);
        let start = Instant::now();
        let times: Vec<Instant> = (0..200u64)
            .map(
                |i| match l.on_packet(&cfg, start + Duration::from_micros(i * 10), 100) {
                    Verdict::Deliver(at) => at,
                    Verdict::Drop(_) => panic!("no loss configured"),
                },
            )
            .collect();
        let overtaken = times.windows(2).filter(|w| w[1] < w[0]).count();
        assert!((15..=65).contains(&overtaken), "{overtaken} inversions");
    }

    #[test]
    fn a_stream_keeps_its_order_and_turns_loss_into_a_stall() {
        let cfg = Impairment {
            delay: ms(20),
            jitter: ms(5),
            loss: 0.05,
            reorder: 0.5,
            ..Impairment::default()
        };
        let mut l = Link::stream(11);
        let start = Instant::now();
        let mut last = start;
        let mut stalls = 0;
        for i in 0..1000u64 {
            let now = start + Duration::from_micros(i * 100);
            let Verdict::Deliver(at) = l.on_packet(&cfg, now, 1000) else {
                panic!("a stream loses nothing");
            };
            assert!(at >= last, "order kept");
            if at - now >= ms(60) {
                stalls += 1;
            }
            last = at;
        }
        assert!(stalls > 0, "some segments waited for a retransmission");
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let bad = Impairment {
            loss: 1.5,
            ..Impairment::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("loss"));
        let bad = Impairment {
            rate: Some(0),
            ..Impairment::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("rate"));
        assert!(Impairment::default().validate().is_ok());
    }
}
