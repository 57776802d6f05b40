//! metrics — work in progress.
