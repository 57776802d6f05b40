//! The driver's side of the peer limits: the timeouts of a connection, the
//! bounded queues (engine events, a site's control stream) and the shared
//! count of open connections, whose slot is released when dropped.
//!
//! What is decided — the control-message and handshake budgets, the
//! connection caps — is the core's ([`crate::core::limits`]); here the
//! clock is read and the budgets are held.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::core::limits::{Budget, OpenConnections, TooManyConnections};

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

/// How long an upload's answer may take to reach the site (its
/// acknowledgement of the stream's end), and so how long shutdown waits for
/// answers on their way.
pub(crate) const ANSWER_GRACE: Duration = Duration::from_secs(5);

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

/// Open connections, per identity and in all ([`OpenConnections`]),
/// shared by the connection tasks.
#[derive(Debug)]
pub(crate) struct Connections {
    open: Mutex<OpenConnections>,
}

/// One open connection, counted until dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    owner: Arc<Connections>,
    identity: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.owner
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .release(&self.identity);
    }
}

impl Connections {
    /// At most `max_total` connections, `max_per_identity` of one identity.
    pub(crate) fn new(max_total: usize, max_per_identity: usize) -> Arc<Self> {
        Arc::new(Self {
            open: Mutex::new(OpenConnections::new(max_total, max_per_identity)),
        })
    }

    /// Count a new connection of `identity` until the slot is dropped, or
    /// say why not.
    pub(crate) fn admit(self: &Arc<Self>, identity: &str) -> Result<Slot, TooManyConnections> {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(identity)?;
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
    fn a_slot_counts_its_connection_until_dropped() {
        // The caps themselves are `core::limits::OpenConnections`'s (tested
        // there); here: a slot holds its count until it is dropped.
        let c = Connections::new(3, 2);
        let a1 = c.admit("a").unwrap();
        let _a2 = c.admit("a").unwrap();
        assert!(c.admit("a").is_err(), "two per identity");
        let _b1 = c.admit("b").unwrap();
        assert!(c.admit("c").is_err(), "three in all");
        drop(a1);
        let _c1 = c.admit("c").unwrap();
        assert!(c.admit("a").is_err(), "the total is full again");
    }
}
