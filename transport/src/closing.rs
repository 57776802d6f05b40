//! A connection handle that remembers why *this* side closed it.
//!
//! quinn reports a connection this side closed as
//! [`ConnectionError::LocallyClosed`](quinn::ConnectionError::LocallyClosed):
//! the code and reason given to [`quinn::Connection::close`] are sent to the
//! peer but not kept. The coordinator must record that reason in its audit
//! log (`conn.closed`: "the admin certificate has been revoked", "a newer
//! connection of this site replaced this one", …), and the task that writes
//! that entry is not the task that closed the connection: it wakes up
//! *because* the connection closed. So the reason has to be stored **before**
//! the close, in the handle every task shares; stored after, a task woken by
//! the close can read the reason before it is there (issue 9: on a 2-core
//! machine it did, every time).
//!
//! [`ServerConn::close`] is the only way the coordinator closes a connection:
//! it records the reason, then closes. Whoever sees the connection closed
//! sees the reason too (quinn's close takes the connection's lock, and
//! `closed()` is woken under it, so the store happens-before the wake-up).

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use quinn::VarInt;

use crate::Conn;

/// Why this side closed a connection: set once, before the close, and shared
/// by every clone of the handle. The first reason wins, as quinn's first
/// close does.
#[derive(Clone, Debug, Default)]
pub struct CloseReason(Arc<OnceLock<String>>);

impl CloseReason {
    /// Record `reason`, *then* run `close`. A reason recorded earlier stays
    /// (a connection is closed once).
    pub fn record_then<T>(&self, reason: impl Into<String>, close: impl FnOnce() -> T) -> T {
        // Ignoring the error is right: an earlier reason stays in force.
        let _ = self.0.set(reason.into());
        close()
    }

    /// The recorded reason, if this side closed the connection.
    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// A server-side connection (QUIC or TLS over TCP: a [`Conn`]) plus the
/// reason this side closed it. Cloning is cheap and shares both.
///
/// It dereferences to the [`Conn`] for everything else (streams, peer
/// identity, RTT); its own [`close`](Self::close) shadows the connection's
/// so that no close goes unrecorded.
#[derive(Clone, Debug)]
pub struct ServerConn {
    conn: Conn,
    reason: CloseReason,
}

impl ServerConn {
    /// Wrap a connection that has completed its handshake.
    pub fn new(conn: impl Into<Conn>) -> Self {
        Self {
            conn: conn.into(),
            reason: CloseReason::default(),
        }
    }

    /// Record `reason` as why this side closed the connection, then close
    /// it with `code` (the peer receives `reason` as well). Only the first
    /// close counts.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        // Already closed (by the peer, a timeout, or here): its first
        // reason stands, and this close does nothing in quinn either.
        if self.conn.close_reason().is_some() {
            return;
        }
        self.reason
            .record_then(String::from_utf8_lossy(reason), || {
                self.conn.close(code, reason);
            });
    }

    /// The reason this side closed the connection, if it did.
    pub fn local_close_reason(&self) -> Option<&str> {
        self.reason.get()
    }

    /// Why the connection ended, for a log: this side's reason if it closed
    /// it, else what quinn knows (the peer's close, a timeout), else
    /// `fallback`.
    pub fn end_reason(&self, fallback: impl fmt::Display) -> String {
        if let Some(r) = self.reason.get() {
            return r.to_owned();
        }
        self.conn
            .close_reason()
            .unwrap_or_else(|| fallback.to_string())
    }

    /// The connection.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }
}

impl Deref for ServerConn {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        &self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ordering issue 9 was about, without sockets or timing: at the
    /// moment the close runs, the reason is already there for anyone to
    /// read.
    #[test]
    fn the_reason_is_recorded_before_the_close_runs() {
        let reason = CloseReason::default();
        let seen_during_close = reason
            .record_then("the admin certificate has been revoked", || {
                reason.get().map(str::to_owned)
            });
        assert_eq!(
            seen_during_close.as_deref(),
            Some("the admin certificate has been revoked")
        );
    }

    #[test]
    fn the_first_reason_wins_and_clones_share_it() {
        let reason = CloseReason::default();
        let other = reason.clone();
        assert_eq!(reason.get(), None);
        other.record_then("revoked", || ());
        reason.record_then("shutting down", || ());
        assert_eq!(reason.get(), Some("revoked"));
        assert_eq!(other.get(), Some("revoked"));
    }
}
