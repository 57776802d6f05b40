//! Subcommands of the `fedlink` binary. Each module exposes clap `Args` and a
//! `run` function; `src/main.rs` only dispatches.

pub mod admin;
pub mod aggregate;
pub mod audit;
pub mod certs;
pub mod replay;
