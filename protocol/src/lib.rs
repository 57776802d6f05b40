//! fedlink wire protocol (pure: no sockets, no async runtime, no burn).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod arch;
pub mod model;

pub use model::{DType, FlatModel, ModelError, ModelHash, ModelHasher, ModelSpec, TensorSpec};
