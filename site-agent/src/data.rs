//! data — work in progress.
