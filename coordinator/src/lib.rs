//! fedlink coordinator: runs federated jobs round by round. The `fedlink`
//! admin CLI lives in its own crate (`fedlink-cli`, `cli/`) and uses this one
//! as a library (store, round archive). Binaries in `src/bin/` stay thin.
//!
//! - [`core`] — the sans-IO core around it: site connections by id, the
//!   job queue, hand-over of sites to each job, and a seeded simulator;
//! - [`round`] — the sans-IO round state machine ([`round::JobRunner`]);
//! - [`store`] — crash-safe persistence (redb + content-addressed models);
//! - [`job`] — job definitions (TOML);
//! - [`round_archive`] — the per-round archive (`round.json`) and the pure
//!   recomputation of a round behind `fedlink audit replay`;
//! - [`config`] — `coordinator.toml`;
//! - [`server`] — the tokio/quinn driver that ties them to the network and to
//!   the aggregation engine.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod config;
pub mod core;
pub mod job;
pub mod round;
pub mod round_archive;
pub mod server;
pub mod store;
