//! No code. Its dependencies (written by `cargo hakari generate` from `.config/hakari.toml`)
//! carry the union of the features the workspace members ask for, and every member depends on
//! it, so a crate built alone (`cargo test -p <crate>`) resolves the same features as the whole
//! workspace and reuses its build. `tests/tests/feature_sets.rs` checks that this still holds.
