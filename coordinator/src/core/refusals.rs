//! Refused handshakes, counted per source address and recorded in bulk.
//!
//! Anyone who can send UDP to the coordinator can make a handshake fail (no
//! certificate, a foreign CA, garbage). One signed, fsynced audit entry per
//! failure would let them grow the audit log, and fill the disk, at the rate
//! they send packets. So failed handshakes are *counted*: per source IP
//! address, with up to [`MAX_REASONS`] distinct reasons each, and every
//! interval (given to [`Refusals::new`]; `refusal_summary_secs`) and at
//! shutdown the coordinator records one `conn.refused` entry per source
//! that failed in the interval: how many times, first and last time, and
//! why. At most [`MAX_SOURCES`] sources are
//! tracked per interval; the rest are counted together under
//! `"other sources"`. What an auditor learns is the same — who tried, how
//! often, why they were refused — at a cost bounded by the interval, not by
//! the attacker.
//!
//! Refusals *after* the handshake (a certificate of the federation's CA with
//! the wrong role, or not registered) are accountable to a certificate and
//! stay individual entries.
//!
//! Sans-IO: time is an argument; the driver (`crate::server`) counts each
//! refusal with [`Refusals::note`], drives [`Refusals::poll_flush`] from a
//! timer (and [`Refusals::drain`] at shutdown) and appends one audit entry
//! per [`Summary`].

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::time::{Duration, Instant};

/// Distinct reasons kept per source and interval; more are counted as
/// `"other reasons"`.
pub const MAX_REASONS: usize = 4;

/// Sources tracked per interval; more are counted together.
pub const MAX_SOURCES: usize = 1024;

/// Longest peer-supplied text kept in a reason, bytes.
pub const MAX_PEER_TEXT: usize = 256;

/// Where the refusals of sources beyond [`MAX_SOURCES`] are counted.
pub const OTHER_SOURCES: &str = "other sources";

/// Text that came from the network, made safe for a log line and an audit
/// entry: control characters (newlines, escape sequences) escaped, and cut
/// to [`MAX_PEER_TEXT`] bytes at a character boundary, saying how long it
/// was.
pub fn peer_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_PEER_TEXT) + 32);
    for c in s.chars() {
        if out.len() >= MAX_PEER_TEXT {
            out.push_str(&format!("… ({} bytes in all)", s.len()));
            return out;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// What one source did in one interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tally {
    /// Failed handshakes.
    pub count: u64,
    /// Failures per reason (at most [`MAX_REASONS`] + 1 keys).
    pub reasons: BTreeMap<String, u64>,
    /// When the first and the last one happened.
    pub first: Instant,
    /// See `first`.
    pub last: Instant,
}

/// One entry to record: a source and what it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// The source IP address, or [`OTHER_SOURCES`].
    pub source: String,
    /// What it did.
    pub tally: Tally,
}

/// Failed handshakes of the current interval.
#[derive(Debug)]
pub struct Refusals {
    interval: Duration,
    started: Option<Instant>,
    sources: HashMap<String, Tally>,
}

impl Refusals {
    /// Count refusals for `interval` before each flush.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            started: None,
            sources: HashMap::new(),
        }
    }

    /// Count a failed handshake from `source` (its IP address) at `now`
    /// (`reason` is made safe with [`peer_text`]).
    pub fn note(&mut self, now: Instant, source: impl Display, reason: &str) {
        self.started.get_or_insert(now);
        let mut key = source.to_string();
        if !self.sources.contains_key(&key) && self.sources.len() >= MAX_SOURCES {
            key = OTHER_SOURCES.to_owned();
        }
        let tally = self.sources.entry(key).or_insert_with(|| Tally {
            count: 0,
            reasons: BTreeMap::new(),
            first: now,
            last: now,
        });
        tally.count += 1;
        tally.last = tally.last.max(now);
        let mut reason = peer_text(reason);
        if !tally.reasons.contains_key(&reason) && tally.reasons.len() >= MAX_REASONS {
            reason = "other reasons".to_owned();
        }
        *tally.reasons.entry(reason).or_default() += 1;
    }

    /// When the current interval ends (`None`: nothing counted).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.started.map(|s| s + self.interval)
    }

    /// The summaries to record, once the interval that started with the
    /// first refusal has passed at `now`; empty before that.
    pub fn poll_flush(&mut self, now: Instant) -> Vec<Summary> {
        match self.poll_timeout() {
            Some(t) if now >= t => self.drain(),
            _ => Vec::new(),
        }
    }

    /// Every summary counted so far, whatever the time (shutdown).
    pub fn drain(&mut self) -> Vec<Summary> {
        self.started = None;
        let mut out: Vec<Summary> = self
            .sources
            .drain()
            .map(|(source, tally)| Summary { source, tally })
            .collect();
        out.sort_by(|a, b| {
            a.tally
                .first
                .cmp(&b.tally.first)
                .then(a.source.cmp(&b.source))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_flood_from_one_source_is_one_summary_per_interval() {
        let t0 = Instant::now();
        let mut r = Refusals::new(Duration::from_secs(60));
        assert_eq!(r.poll_timeout(), None);
        for i in 0..10_000u64 {
            r.note(t0 + Duration::from_millis(i), ip(7), "unknown CA");
        }
        assert!(r.poll_flush(t0 + Duration::from_secs(59)).is_empty());
        let out = r.poll_flush(t0 + Duration::from_secs(60));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].source, "192.0.2.7");
        assert_eq!(out[0].tally.count, 10_000);
        assert_eq!(out[0].tally.reasons["unknown CA"], 10_000);
        assert_eq!(out[0].tally.first, t0);
        assert_eq!(out[0].tally.last, t0 + Duration::from_millis(9_999));
        // Nothing left, and no timer until the next refusal.
        assert_eq!(r.poll_timeout(), None);
        assert!(r.drain().is_empty());
    }

    #[test]
    fn reasons_and_sources_are_bounded() {
        let t0 = Instant::now();
        let mut r = Refusals::new(Duration::from_secs(60));
        for i in 0..10 {
            r.note(t0, ip(1), &format!("reason {i}"));
        }
        for i in 0..(MAX_SOURCES as u32 + 50) {
            r.note(t0, IpAddr::from(i.to_be_bytes()), "x");
        }
        let out = r.drain();
        assert_eq!(out.len(), MAX_SOURCES + 1);
        let one = out.iter().find(|s| s.source == "192.0.2.1").unwrap();
        assert_eq!(one.tally.count, 10);
        assert_eq!(one.tally.reasons.len(), MAX_REASONS + 1);
        assert_eq!(one.tally.reasons["other reasons"], 10 - MAX_REASONS as u64);
        let other = out.iter().find(|s| s.source == OTHER_SOURCES).unwrap();
        // 1024 tracked: 192.0.2.1 and 1023 of the others; 51 beyond.
        assert_eq!(other.tally.count, 51);
    }

    #[test]
    fn peer_text_is_escaped_and_bounded() {
        assert_eq!(peer_text("plain reason"), "plain reason");
        assert_eq!(
            peer_text("line\nINFO forged entry\u{1b}[31m"),
            "line\\nINFO forged entry\\u{1b}[31m"
        );
        let long = "é".repeat(10_000);
        let safe = peer_text(&long);
        assert!(safe.len() <= MAX_PEER_TEXT + 40, "{}", safe.len());
        assert!(safe.ends_with("(20000 bytes in all)"), "{safe}");
        assert!(!safe.contains('\n'));
    }
}
