//! Job definitions (TOML) — work in progress.
