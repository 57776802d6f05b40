//! weights — work in progress.
