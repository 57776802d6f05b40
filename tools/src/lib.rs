//! fedlink network tools for tests and benches. Not published, not part of a
//! deployment.
//!
//! - [`impair`]: an impairment proxy that relays UDP (QUIC) and TCP between
//!   a listening address and a target, adding delay, jitter, loss,
//!   reordering and a rate limit, with a "drop all UDP" switch and a "cut
//!   the connections" control. Linux netem is not available on the
//!   machines fedlink is built on; this stands in for it.
//!
//! - [`connect_proxy`]: an HTTP `CONNECT` proxy (optional Basic
//!   credentials, allow list) like those hospital networks run, for the
//!   agent's TLS-over-TCP path.
//!
//! It does not shape anything outside its own relays, and it is not a
//! security boundary: it forwards whatever arrives.
//!
//! ```text
//!  client ──UDP/TCP──▶ ImpairProxy ──(Link: delay, jitter, loss, rate)──▶ target
//!  client ◀──────────── ImpairProxy ◀──(Link, other direction)─────────── target
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod connect_proxy;
pub mod impair;
