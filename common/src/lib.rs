//! What the device plugin and unseal-init share, so both read their configuration and log
//! the same way.
//!
//! # Layout
//!
//! - [`yaml`]: parses a configuration file; errors name the field path, line and column, and
//!   never quote the file. Both programs' `config` modules use it.
//! - [`layers`]: flags and their environment variables over the file over defaults, each
//!   value with its source, for both programs' settings declared once (clap + serde).
//! - [`logging`]: the `tracing` subscriber both `main`s install: stderr, `RUST_LOG`, text or
//!   JSON lines. The device plugin adds its own layer that spots kubelets too old to talk to.
//! - [`health`]: the HTTP endpoint both serve on their metrics address (`/metrics`,
//!   `/healthz`, `/readyz`), answering from each program's own state through `Probes`.
//! - [`backoff`]: doubling retry delays with a cap, for unseal-init's retry loops (the device
//!   plugin's kubelet state machine computes its own, as a pure function of a failure count).

pub mod backoff;
pub mod health;
pub mod layers;
pub mod logging;
pub mod yaml;
