//! fedlink aggregation engine (work in progress: see module docs).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod accountant;
pub mod error;
pub mod fedavg;
pub mod validate;

pub use error::{AggregationError, ConfigError, Error, SafetensorsError, UpdateError};
pub use fedavg::{Averaged, FedAvgAccumulator, FedAvgOptions, Fold};
pub use validate::{UpdateValidator, ValidatedUpdate, ValidationPolicy, Weighting};
