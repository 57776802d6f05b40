//! Error types of the aggregation engine.
//!
//! Four enums, one per boundary:
//! - [`UpdateError`]: a site's update is malformed or out of range (the site
//!   misbehaved or is buggy). It always names the site and, when there is one,
//!   the tensor. A rejected update never touches any accumulator.
//! - [`AggregationError`]: the round as a whole cannot be aggregated (too few
//!   updates for Krum, memory budget exceeded, capacity, misuse of the API).
//! - [`ConfigError`]: a strategy configuration is invalid (local config).
//! - [`SafetensorsError`]: a safetensors file could not be converted.

/// A site's update was refused. Nothing of it reached the accumulator.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpdateError {
    /// The update claims zero training examples.
    #[error("site {site}: num_examples is 0")]
    ZeroExamples {
        /// Site that sent the update.
        site: String,
    },
    /// The update claims more training examples than the configured limit.
    #[error("site {site}: num_examples = {num_examples} exceeds the limit of {limit}")]
    TooManyExamples {
        /// Site that sent the update.
        site: String,
        /// Claimed number of examples.
        num_examples: u64,
        /// Configured maximum.
        limit: u64,
    },
    /// A value is NaN or infinite.
    #[error("site {site}: tensor {tensor:?} element {index}: value {value} is not finite")]
    NonFinite {
        /// Site that sent the update.
        site: String,
        /// Tensor path.
        tensor: String,
        /// Element index within the tensor.
        index: u64,
        /// The offending value.
        value: f32,
    },
    /// A value is too large for the configured bound or for the exact
    /// fixed-point accumulator (`num_examples × |value| × 2^frac_bits` must
    /// stay below 2^50, after clipping).
    #[error(
        "site {site}: tensor {tensor:?} element {index}: |value| = {value} (weighted: {weighted}) exceeds the limit {limit} \
         (clip the update, lower frac_bits, or raise max_abs_value)"
    )]
    MagnitudeTooLarge {
        /// Site that sent the update.
        site: String,
        /// Tensor path.
        tensor: String,
        /// Element index within the tensor.
        index: u64,
        /// The offending value (after clipping).
        value: f32,
        /// The value times its weight factor, in accumulator units.
        weighted: f64,
        /// The limit that was exceeded, in the same units as `weighted`
        /// (or as `value` for the plain `max_abs_value` bound).
        limit: f64,
    },
    /// A chunk does not start where the previous one ended.
    #[error(
        "site {site}: chunk at element {offset} (tensor {tensor:?}) is out of order: expected offset {expected}"
    )]
    ChunkOutOfOrder {
        /// Site that sent the update.
        site: String,
        /// Tensor containing `offset` (or `"<end>"`).
        tensor: String,
        /// Offset of the chunk.
        offset: u64,
        /// Offset that was expected.
        expected: u64,
    },
    /// A chunk runs past the end of the model.
    #[error(
        "site {site}: chunk at element {offset} with {len} values runs past the end of the model ({num_params} values)"
    )]
    ChunkPastEnd {
        /// Site that sent the update.
        site: String,
        /// Offset of the chunk.
        offset: u64,
        /// Length of the chunk.
        len: u64,
        /// Number of values of the model.
        num_params: u64,
    },
    /// The update ended before every value was received.
    #[error(
        "site {site}: update ended after {received} of {expected} values (tensor {tensor:?} incomplete)"
    )]
    Incomplete {
        /// Site that sent the update.
        site: String,
        /// First tensor that is incomplete.
        tensor: String,
        /// Values received.
        received: u64,
        /// Values expected.
        expected: u64,
    },
    /// The update has a tensor the model does not have.
    #[error("site {site}: unknown tensor {tensor:?}")]
    UnknownTensor {
        /// Site that sent the update.
        site: String,
        /// Tensor path.
        tensor: String,
    },
    /// The update lacks a tensor of the model.
    #[error("site {site}: missing tensor {tensor:?}")]
    MissingTensor {
        /// Site that sent the update.
        site: String,
        /// Tensor path.
        tensor: String,
    },
    /// A tensor has the wrong shape.
    #[error("site {site}: tensor {tensor:?} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Site that sent the update.
        site: String,
        /// Tensor path.
        tensor: String,
        /// Shape of the model's tensor.
        expected: Vec<u64>,
        /// Shape in the update.
        actual: Vec<u64>,
    },
    /// A tensor has the wrong element type.
    #[error("site {site}: tensor {tensor:?} has dtype {actual}, expected F32")]
    WrongDType {
        /// Site that sent the update.
        site: String,
        /// Tensor path.
        tensor: String,
        /// Element type found.
        actual: String,
    },
}

/// The round cannot be aggregated, or the API was misused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregationError {
    /// No update was accepted this round.
    #[error("no update was accepted this round")]
    NoUpdates,
    /// A robust strategy needs more updates than were accepted.
    #[error("{strategy} needs at least {needed} updates, got {got}")]
    NotEnoughUpdates {
        /// Strategy name.
        strategy: &'static str,
        /// Minimum number of updates.
        needed: usize,
        /// Updates accepted.
        got: usize,
    },
    /// Holding every update of the round would exceed the memory budget.
    #[error(
        "{strategy} over {num_sites} sites × {num_params} parameters needs {needed_bytes} bytes, \
         more than the memory budget of {budget_bytes} bytes"
    )]
    MemoryBudgetExceeded {
        /// Strategy name.
        strategy: &'static str,
        /// Number of sites.
        num_sites: usize,
        /// Parameters per update.
        num_params: u64,
        /// Bytes needed.
        needed_bytes: u64,
        /// Configured budget.
        budget_bytes: u64,
    },
    /// More updates than the round was sized for.
    #[error("round capacity of {capacity} updates is exhausted")]
    CapacityExceeded {
        /// Maximum number of updates.
        capacity: usize,
    },
    /// A validated-update token was issued for another model or round.
    #[error(
        "validated update of site {site} does not belong to this aggregator (spec or round mismatch)"
    )]
    ForeignToken {
        /// Site named by the token.
        site: String,
    },
    /// A fold was abandoned or fed different values than were validated; the
    /// accumulator's contents are unreliable and the round must be restarted.
    #[error(
        "accumulator poisoned: an update fold by site {site} was incomplete ({folded} of {expected} values)"
    )]
    Poisoned {
        /// Site whose fold was incomplete.
        site: String,
        /// Values folded.
        folded: u64,
        /// Values expected.
        expected: u64,
    },
    /// Tentative folds (one decode per upload) left contributions in the
    /// accumulator that were not counted and not removed: the accumulator
    /// must be rebuilt from the counted updates.
    #[error(
        "the accumulator holds {uncounted} tentative folds that were neither counted nor removed"
    )]
    Uncounted {
        /// Contributions neither counted nor removed (an unfinished removal counts too).
        uncounted: usize,
    },
    /// The global model does not match the aggregated spec.
    #[error("global model spec does not match the update spec")]
    SpecMismatch,
    /// Optimizer state does not match the model (wrong length).
    #[error("optimizer state holds {actual} values, the model has {expected}")]
    StateMismatch {
        /// Model parameters.
        expected: u64,
        /// Values in the state.
        actual: u64,
    },
    /// The operating system's random number generator failed.
    #[error("OS random number generator failed: {0}")]
    Rng(String),
}

/// A strategy configuration is invalid.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// Unknown strategy name.
    #[error("unknown strategy {name:?} (known: {known})")]
    UnknownStrategy {
        /// Name given.
        name: String,
        /// Known names, comma-separated.
        known: &'static str,
    },
    /// A parameter the strategy does not take.
    #[error("strategy {strategy}: unknown parameter {key:?} (accepted: {accepted})")]
    UnknownKey {
        /// Strategy name.
        strategy: &'static str,
        /// Key given.
        key: String,
        /// Accepted keys, comma-separated.
        accepted: String,
    },
    /// A parameter value that does not parse or is out of range.
    #[error("strategy {strategy}: parameter {key} = {value:?}: {reason}")]
    BadValue {
        /// Strategy name.
        strategy: &'static str,
        /// Key.
        key: String,
        /// Value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A `key=value` argument without `=`.
    #[error("expected key=value, got {0:?}")]
    NotKeyValue(String),
    /// The same key was given twice.
    #[error("parameter {0:?} given twice")]
    DuplicateKey(String),
}

/// A safetensors buffer could not be converted to or from a flat model.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// The buffer is not valid safetensors.
    #[error("invalid safetensors data: {0}")]
    Format(#[from] safetensors::SafeTensorError),
    /// The tensors do not form a valid model spec.
    #[error("invalid model: {0}")]
    Model(#[from] fedlink_protocol::ModelError),
    /// A tensor is not F32, or its shape does not match the expected spec.
    #[error(transparent)]
    Update(#[from] UpdateError),
}

/// Any error of this crate, for callers that do not need to tell them apart.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The update was refused.
    #[error(transparent)]
    Update(#[from] UpdateError),
    /// The round cannot be aggregated.
    #[error(transparent)]
    Aggregation(#[from] AggregationError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}
