//! Model architectures known to fedlink (pure: tensor specs and seeded init) — work in progress.
