//! DVM's performance tooling: counters printed by `dvm run --stats`, perf maps for JIT'd code,
//! and profiling helpers.
//!
//! Nothing is implemented yet; this crate deliberately exposes no API until the engine has
//! counters to report.
