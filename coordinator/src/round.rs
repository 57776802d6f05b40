//! Round state machine (sans-IO) — work in progress.
