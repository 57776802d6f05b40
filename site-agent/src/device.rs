//! device — work in progress.
