//! fedlink coordinator: runs federated jobs round by round, and the logic
//! behind the `fedlink` admin CLI. Binaries in `src/bin/` stay thin.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod cli;
pub mod job;
pub mod round;
pub mod store;
