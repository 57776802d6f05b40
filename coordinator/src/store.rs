//! Embedded persistence — work in progress.
