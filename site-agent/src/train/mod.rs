//! Local training with burn — work in progress.
